"""Typed boundary between the engine and its clients (the HTTP server, benchmarks, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import DGemmaError


@dataclass
class SamplingParams:
    """Per-request settings. None = the checkpoint's generation_config.json, then the reference defaults."""

    max_tokens: int | None = None  # exact: output is trimmed to this many tokens
    seed: int | None = None  # None = random
    temperature: float | None = None  # multiplies the t_max→t_min schedule (1.0 = checkpoint schedule)
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    stop: list[str] = field(default_factory=list)
    stream_drafts: bool = False  # also emit each denoising step's argmax draft (for live UIs)
    sampler: str | None = None  # "fast" (default) or "reference" (the reference's RNG and arithmetic, per request)


@dataclass
class RequestOutput:
    """One event of a request's stream.

    kind "canvas": newly committed text (one per committed canvas; `text` may be "" when held back, e.g. a
    possible stop-string prefix). kind "draft": a denoising step's argmax canvas as text (only with stream_drafts).
    kind "finished": the last event, with finish_reason and any remaining text."""

    request_id: str
    kind: Literal["canvas", "draft", "finished"]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    draft_text: str | None = None
    canvas_index: int = 0
    step: int | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    canvases: int = 0  # cumulative committed canvases
    denoising_steps: int = 0  # cumulative decoder passes of this request


class RequestRefused(DGemmaError):
    """A request that can never be served as asked (HTTP 400): too long for the context or the KV cache, or bad
    parameters. `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class QueueFull(DGemmaError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""


class EngineStopped(DGemmaError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""
