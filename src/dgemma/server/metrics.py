"""Prometheus metrics for the dgemma server (a per-app `CollectorRegistry`, so several apps can share a process).

`ServerMetrics` is the engine's `observer`: the engine calls `on_iteration` and `on_request_finished` from its
iteration thread (prometheus_client metrics are thread-safe). Gauges (queue depth, running requests, KV cache use)
are read from `engine.stats()` at scrape time by a custom collector.

Exposed metrics:
  dgemma_requests_total{finish_reason}           requests the engine finished (stop / length / abort)
  dgemma_requests_rejected_total{status}         requests refused before reaching the engine (400, 429, 503, ...)
  dgemma_prompt_tokens_total                     prompt tokens of finished requests
  dgemma_completion_tokens_total                 completion tokens of finished requests
  dgemma_denoising_steps_per_canvas              histogram: decoder passes each committed canvas took
  dgemma_tokens_per_forward                      histogram: completion tokens / denoising steps, per request
  dgemma_iteration_latency_seconds               histogram: one engine iteration (a batched decoder pass)
  dgemma_iteration_batch_size                    histogram: requests in one engine iteration
  dgemma_request_latency_seconds                 histogram: request latency, submit to finish
  dgemma_requests_waiting / dgemma_requests_running            gauges (engine.stats())
  dgemma_kv_cache_usage_ratio                    gauge 0..1
  dgemma_kv_cache_blocks_used / dgemma_kv_cache_blocks_total   gauges
  dgemma_engine_iterations                       gauge: engine iterations since start
  dgemma_max_num_seqs                            gauge: the engine's slot count
  dgemma_server_draining                         gauge: 1 while the server drains for shutdown
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger("dgemma.server")

STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
TPF_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
ITER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]


class ServerMetrics:
    """Metrics of one server app; pass it to the engine as `observer=`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dgemma_requests", "Requests finished by the engine, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("dgemma_requests_rejected", "Requests refused before generation, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("dgemma_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("dgemma_completion_tokens", "Completion tokens of finished requests",
                                         registry=r)
        self.steps_per_canvas = Histogram("dgemma_denoising_steps_per_canvas",
                                          "Denoising steps (decoder passes) per committed canvas",
                                          buckets=STEP_BUCKETS, registry=r)
        self.tokens_per_forward = Histogram("dgemma_tokens_per_forward",
                                            "Completion tokens per denoising step, per request",
                                            buckets=TPF_BUCKETS, registry=r)
        self.iteration_latency = Histogram("dgemma_iteration_latency_seconds", "Latency of one engine iteration",
                                           buckets=ITER_BUCKETS, registry=r)
        self.iteration_batch = Histogram("dgemma_iteration_batch_size", "Requests in one engine iteration",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.request_latency = Histogram("dgemma_request_latency_seconds", "Request latency from submit to finish",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self._stats_source: Callable[[], dict[str, Any]] | None = None
        self._draining: Callable[[], bool] = lambda: False
        self._collector: _EngineCollector | None = None

    # ---- engine observer interface (called from the engine thread) ------------------------------------------
    def on_iteration(self, latency_s: float, num_requests: int) -> None:
        try:
            self.iteration_latency.observe(max(0.0, float(latency_s)))
            self.iteration_batch.observe(int(num_requests))
        except Exception:  # never let metrics break the engine loop
            log.exception("metrics: on_iteration failed")

    def on_request_finished(self, prompt_tokens: int, completion_tokens: int, canvases: int, denoising_steps: int,
                            steps_per_canvas: list[int], latency_s: float, finish_reason: str) -> None:
        try:
            self.requests.labels(finish_reason=str(finish_reason)).inc()
            self.prompt_tokens.inc(max(0, int(prompt_tokens)))
            self.completion_tokens.inc(max(0, int(completion_tokens)))
            for s in steps_per_canvas or ():
                self.steps_per_canvas.observe(int(s))
            if denoising_steps and denoising_steps > 0:
                self.tokens_per_forward.observe(completion_tokens / denoising_steps)
            self.request_latency.observe(max(0.0, float(latency_s)))
        except Exception:
            log.exception("metrics: on_request_finished failed")

    # ---- server side -----------------------------------------------------------------------------------------
    def count_rejected(self, status: int) -> None:
        self.rejected.labels(status=str(status)).inc()

    def bind_engine(self, stats: Callable[[], dict[str, Any]], draining: Callable[[], bool]) -> None:
        """Read gauges from `stats()` (engine.stats) at scrape time."""
        self._stats_source, self._draining = stats, draining
        if self._collector is None:
            self._collector = _EngineCollector(self)
            self.registry.register(self._collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # collected lazily; no describe-time call into the engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        draining = GaugeMetricFamily("dgemma_server_draining", "1 while the server drains for shutdown")
        draining.add_metric([], 1.0 if self.m._draining() else 0.0)
        yield draining
        if self.m._stats_source is None:
            return
        try:
            s = self.m._stats_source() or {}
        except Exception:
            log.exception("metrics: engine.stats() failed")
            return
        for name, key, doc in (
                ("dgemma_requests_waiting", "waiting", "Requests waiting in the engine queue"),
                ("dgemma_requests_running", "running", "Requests being generated"),
                ("dgemma_kv_cache_usage_ratio", "kv_usage", "Fraction of KV cache blocks in use (0..1)"),
                ("dgemma_kv_cache_blocks_used", "kv_blocks_used", "KV cache blocks in use"),
                ("dgemma_kv_cache_blocks_total", "kv_blocks_total", "KV cache blocks in total"),
                ("dgemma_engine_iterations", "iterations", "Engine iterations since start"),
                ("dgemma_max_num_seqs", "max_num_seqs", "Most requests generated at once"),
        ):
            v = s.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(v))
                yield g
