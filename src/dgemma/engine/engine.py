"""The serving engine: many requests, one model, one packed forward per iteration.

Each request moves PREFILL → DENOISE … → COMMIT → DENOISE … → DONE. An iteration advances every running request by
one decoder pass: one `step.Stepper.iterate` call packs every fast-sampler request's canvas, and the prompt or
just-committed canvas any of them has to encode, into one forward (one weight read for all), then runs the fast
sampler over all their rows at once. Each request owns a KV slot; new requests join between iterations, finished
or cancelled ones leave at once and free their slot.

A fast-sampler request's tokens equal `model.generate(prompt, seed=…)` for it alone (counter-based draws keyed on
its seed, batch-invariant products and attention: `model/ops.py`), trimmed to exactly `max_tokens` and cut at EOS
/ stop strings. A `sampler="reference"` request runs the reference loop (`generate.denoise_step`, its own torch
generator and rectangular cache) one step per iteration: a verification mode, exact but not batched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Callable

import torch

from .. import sampling
from ..api import DiffusionGemma
from ..config import GenerationConfig
from ..errors import ConfigError
from ..generate import BlockState, denoise_step
from ..model.cache import KVCache
from ..step import Stepper
from .types import EngineStopped, QueueFull, RequestOutput, RequestRefused, SamplingParams

TEMPERATURE_FLOOR = 1e-3
MAX_DENOISING_STEPS = 1024  # a bound per canvas, so one request cannot hold a slot indefinitely

log = logging.getLogger("dgemma.engine")


class Phase(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DENOISE = "denoise"
    COMMIT = "commit"
    DONE = "done"


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    gcfg: GenerationConfig
    max_tokens: int
    emit: Callable[[RequestOutput], None]
    seed: int
    n_canvases: int
    tokens: int  # KV positions the request may need (prompt + every canvas)
    phase: Phase = Phase.WAITING
    slot: int | None = None
    pending_encode: torch.Tensor | None = None  # tokens to encode with the next step (prompt / committed canvas)
    fresh: bool = True  # the next step starts a new canvas
    ref: "_ReferenceRow | None" = None  # sampler="reference": the reference loop's state
    canvas_index: int = 0
    out_ids: list[int] = field(default_factory=list)
    emitted_text: str = ""
    steps_total: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    t_start: float = field(default_factory=time.perf_counter)


class _ReferenceRow:
    """The reference loop for one request (spec §4.2 with torch's generator, `generate.denoise_step`): its own
    rectangular cache; one decoder pass per `step()`."""

    def __init__(self, model: DiffusionGemma, r: Request):
        bb = model.backbone
        self.bb, self.gcfg, self.L = bb, r.gcfg, model.config.canvas_length
        self.g = torch.Generator(device=model.device).manual_seed(r.seed)
        self.cache = bb.new_cache(1, len(r.prompt) + r.n_canvases * self.L)
        self.st: BlockState | None = None
        self.n = 0

    def step(self, encode: torch.Tensor | None) -> tuple[torch.Tensor, int, bool]:
        """(argmax draft [L], 1-based step, canvas done)."""
        bb, dev = self.bb, self.bb.device
        if encode is not None:
            bb.encode(encode.view(1, -1).to(dev), self.cache)
        if self.st is None:
            self.st = BlockState(sampling.noise((1, self.L), bb.cfg.vocab_size, self.g, dev), self.gcfg)
            self.n = self.gcfg.max_denoising_steps
        st = self.st
        st.steps += 1
        raw = bb.denoise(st.canvas, self.cache, st.sc)
        denoise_step(bb, st, raw, self.n, self.gcfg, self.g, torch.ones(1, dtype=torch.bool, device=dev))
        step = self.gcfg.max_denoising_steps - self.n + 1
        self.n -= 1
        done = bool(st.done.all()) or self.n == 0
        draft = st.draft[0]
        if done:
            self.st = None
        return draft, step, done


class Engine:
    """Synchronous core: `add()`, `abort()`, `step()`. `AsyncEngine` runs it on a thread for the server."""

    def __init__(self, model: DiffusionGemma, *, max_num_seqs: int = 16, max_queue: int = 256,
                 kv_cache_bytes: int | None = None, block_size: int = 16, observer: Any = None,
                 compile: bool | None = None):
        self.model = model
        self.cfg = model.config
        self.tok = model._tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.observer = observer
        self.L = model.config.canvas_length
        self.context = model.config.text.max_position_embeddings
        self.kv_bytes_per_token = KVCache.bytes_per_token(model.config.text, model.dtype)
        if kv_cache_bytes is None:
            kv_cache_bytes = _default_kv_bytes(self.kv_bytes_per_token, max_num_seqs, self.context, model.device)
        # one KV slot per running request; a slot holds `slot_tokens` positions (block_size: the unit of the stats)
        self.block_size = block_size
        per_slot = kv_cache_bytes // (self.kv_bytes_per_token * max_num_seqs)
        self.slot_tokens = int(max(self.L, min(per_slot, self.context + self.L)))
        self.stepper = Stepper(model.backbone, max_num_seqs, self.slot_tokens, self.L, compile)
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.aborted: set[str] = set()
        self.lock = threading.Lock()
        self.iterations = 0

    # -- admission -------------------------------------------------------------------------------------------
    def prepare(self, prompt: list[int], params: SamplingParams) -> tuple[GenerationConfig, int, int, int]:
        """Validate a request; return (resolved config, max_tokens, canvases, KV positions). Raises
        RequestRefused."""
        V = self.cfg.text.vocab_size
        if not prompt:
            raise RequestRefused("the prompt is empty; expected at least one token", "prompt")
        if any((not isinstance(t, int)) or t < 0 or t >= V for t in prompt):
            raise RequestRefused(f"prompt token ids must be integers in [0, {V})", "prompt")
        if self.cfg.image_token_id is not None and self.cfg.image_token_id in prompt:
            raise RequestRefused("image input is not supported: dgemma serves text only", "prompt", "unsupported")
        t = params.temperature
        if t is not None and (not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0):
            raise RequestRefused(f"temperature={t!r} is invalid; expected a number >= 0", "temperature")
        base = self.model.generation_config.merged()
        t_min = params.t_min if params.t_min is not None else base.t_min
        t_max = params.t_max if params.t_max is not None else base.t_max
        if t is not None:
            scale = max(float(t), TEMPERATURE_FLOOR)
            t_min, t_max = t_min * scale, t_max * scale
        room = self.context - len(prompt)
        if room <= 0:
            raise RequestRefused(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}",
                                 "prompt", "context_length_exceeded")
        mt = params.max_tokens
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0):
            raise RequestRefused(f"max_tokens={mt!r} is invalid; expected a positive integer", "max_tokens")
        max_tokens = mt if mt is not None else min(base.max_new_tokens, room)
        steps = params.max_denoising_steps if params.max_denoising_steps is not None else base.max_denoising_steps
        if isinstance(steps, int) and steps > MAX_DENOISING_STEPS:  # before merged(), whose bound is wider
            raise RequestRefused(f"max_denoising_steps={steps} is too large; expected at most "
                                 f"{MAX_DENOISING_STEPS}", "max_denoising_steps")
        try:
            gcfg = self.model.generation_config.merged(
                max_new_tokens=max_tokens, max_denoising_steps=params.max_denoising_steps,
                entropy_bound=params.entropy_bound, t_min=t_min, t_max=t_max,
                stability_threshold=params.stability_threshold, confidence_threshold=params.confidence_threshold)
        except ConfigError as e:
            name, msg = str(e).split("=", 1)[0], str(e)
            if t is not None and name in ("t_min", "t_max"):
                msg += f" (t_min and t_max as scaled by temperature={t!r}: x{scale:g}, at least x{TEMPERATURE_FLOOR:g})"
            raise RequestRefused(msg, name) from None
        n_canvases = math.ceil(max_tokens / self.L)
        total = len(prompt) + n_canvases * self.L
        if len(prompt) + max_tokens > self.context:
            raise RequestRefused(
                f"this request needs {len(prompt)} prompt + {max_tokens} completion tokens = "
                f"{len(prompt) + max_tokens}, beyond the model's context of {self.context}", "max_tokens",
                "context_length_exceeded")
        if total > self.slot_tokens:
            raise RequestRefused(
                f"this request needs KV cache for {total} tokens (prompt {len(prompt)} + {n_canvases} canvases of "
                f"{self.L}); a request's KV slot on this server holds {self.slot_tokens}", "max_tokens",
                "kv_cache_exceeded")
        if params.sampler not in (None, "fast", "reference"):
            raise RequestRefused(f"sampler={params.sampler!r} is invalid; expected 'fast' or 'reference'", "sampler")
        return gcfg, max_tokens, n_canvases, total

    def add(self, prompt: list[int], params: SamplingParams, emit: Callable[[RequestOutput], None],
            request_id: str | None = None) -> str:
        gcfg, max_tokens, n_canvases, tokens = self.prepare(prompt, params)
        seed = int(params.seed) if params.seed is not None else secrets.randbits(63)
        req = Request(request_id or uuid.uuid4().hex, list(prompt), params, gcfg, max_tokens, emit, seed, n_canvases,
                      tokens)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(req)
        return req.id

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one iteration ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        self._reap_aborted()
        self._admit()
        if not self.running:
            return
        t0 = time.perf_counter()
        fast = [r for r in self.running if r.ref is None]
        results: list[tuple[Request, torch.Tensor, int, bool]] = []  # (request, draft, step, commit)
        if fast:
            encodes = [(r.slot, int(self.stepper.start[r.slot]) - r.pending_encode.numel(), r.pending_encode)
                       for r in fast if r.pending_encode is not None]
            out = self.stepper.iterate([r.slot for r in fast], [r.fresh for r in fast], encodes)
            for i, r in enumerate(fast):
                results.append((r, out.draft[i], int(out.step[i]), bool(out.commit[i])))
        for r in self.running:
            if r.ref is not None:
                results.append((r, *r.ref.step(r.pending_encode)))
        finished_now = []
        for r, draft, step, commit in results:
            r.pending_encode, r.fresh = None, False
            r.steps_total += 1
            r.phase = Phase.DENOISE
            if r.params.stream_drafts and self.tok is not None:
                r.emit(self._out(r, "draft", draft_text=self.tok.decode(draft.tolist(), skip_special_tokens=True),
                                 step=step))
            if commit and self._commit(r, draft, step):
                finished_now.append(r)
        for r in finished_now:
            self._finish(r)
        self.iterations += 1
        if self.observer is not None:
            self.observer.on_iteration(time.perf_counter() - t0, len(results))

    def _commit(self, r: Request, draft: torch.Tensor, steps: int) -> bool:
        """Commit the argmax canvas (spec §4.5); emit its text. Returns True when the request is finished."""
        r.steps_per_canvas.append(steps)
        committed, finished = sampling.finalize_canvas(draft.view(1, -1), torch.zeros(1, dtype=torch.bool),
                                                       r.gcfg.eos_ids, r.gcfg.pad_token_id)
        r.canvas_index += 1
        toks = committed[0].tolist()
        eos = set(r.gcfg.eos_ids)
        new = []
        for t in toks:
            if t in eos:
                break
            new.append(t)
        room = r.max_tokens - len(r.out_ids)
        hit_eos = bool(finished.item()) and len(new) <= room
        r.out_ids.extend(new[:room])
        stop_hit, delta = self._new_text(r, final=False)
        r.emit(self._out(r, "canvas", text=delta))
        if stop_hit:
            r.finish_reason = "stop"
        elif hit_eos:
            r.finish_reason = "stop"
        elif len(r.out_ids) >= r.max_tokens or r.canvas_index >= r.n_canvases:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            return True
        r.pending_encode, r.fresh = committed[0], True
        if r.ref is None:
            self.stepper.next_canvas(r.slot)
        r.phase = Phase.COMMIT
        return False

    def _new_text(self, r: Request, final: bool) -> tuple[bool, str]:
        """Decode the output so far; return (stop string found, new text to emit). Unless `final`, an incomplete
        character or a possible stop-string prefix at the end is held back. On a stop string the output (text and
        token ids) is cut where it starts."""
        if self.tok is None:
            return False, ""
        text = self.tok.decode(r.out_ids, skip_special_tokens=True)
        stops = [s for s in r.params.stop if s]
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            while r.out_ids and len(self.tok.decode(r.out_ids, skip_special_tokens=True)) > cut:
                r.out_ids.pop()  # completion_tokens count what was kept
        safe = len(text)
        if cut < 0 and not final:
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            for s in stops:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        safe = max(safe, len(r.emitted_text))
        delta = text[len(r.emitted_text):safe]
        r.emitted_text = text[:safe]
        return cut >= 0, delta

    def _finish(self, r: Request) -> None:
        _, tail = self._new_text(r, final=True)
        r.phase = Phase.DONE
        self._release(r)
        r.emit(self._out(r, "finished", text=tail, finish_reason=r.finish_reason))
        if self.observer is not None:
            self.observer.on_request_finished(len(r.prompt), len(r.out_ids), r.canvas_index, r.steps_total,
                                              list(r.steps_per_canvas), time.perf_counter() - r.t_start,
                                              r.finish_reason or "abort")

    def _out(self, r: Request, kind: str, text: str = "", draft_text: str | None = None, step: int | None = None,
             finish_reason: str | None = None) -> RequestOutput:
        return RequestOutput(r.id, kind, text=text, token_ids=list(r.out_ids) if kind == "finished" else [],
                             draft_text=draft_text, canvas_index=r.canvas_index, step=step,
                             finish_reason=finish_reason, prompt_tokens=len(r.prompt),
                             completion_tokens=len(r.out_ids), canvases=r.canvas_index,
                             denoising_steps=r.steps_total)

    def _release(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        if r.slot is not None:
            self.free_slots.append(r.slot)
            r.slot = None
        r.ref = None

    def _reap_aborted(self) -> None:
        with self.lock:
            if not self.aborted:
                return
            ids, self.aborted = self.aborted, set()
            gone = [r for r in self.waiting if r.id in ids]
            for r in gone:
                self.waiting.remove(r)
        for r in gone + [r for r in self.running if r.id in ids]:
            self._fail(r)

    def _fail(self, r: Request) -> None:
        """End a request without output: cancelled by its client, drained at shutdown, or an engine error."""
        r.finish_reason = "abort"
        self._release(r)
        r.phase = Phase.DONE
        r.emit(self._out(r, "finished", finish_reason="abort"))
        if self.observer is not None:
            self.observer.on_request_finished(len(r.prompt), len(r.out_ids), r.canvas_index, r.steps_total,
                                              list(r.steps_per_canvas), time.perf_counter() - r.t_start, "abort")

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and self.free_slots:
                r = self.waiting.popleft()
                r.slot = self.free_slots.pop()
                r.t_start = time.perf_counter()
                try:
                    r.pending_encode = torch.tensor(r.prompt, dtype=torch.long)
                    r.fresh = True
                    if r.params.sampler == "reference":
                        r.ref = _ReferenceRow(self.model, r)
                    else:
                        self.stepper.start_row(r.slot, r.gcfg, r.seed, len(r.prompt))
                except Exception:  # end this request (its slot freed), not the engine iteration
                    log.exception("%s: could not start the request; aborting it", r.id)
                    self._fail(r)
                    continue
                r.phase = Phase.PREFILL
                self.running.append(r)

    def abort_all(self) -> None:
        with self.lock:
            ids = {r.id for r in itertools.chain(self.running, self.waiting)}
            self.aborted |= ids

    def stats(self) -> dict[str, Any]:
        total = self.max_num_seqs * self.slot_tokens
        used = sum(r.tokens for r in self.running)
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_blocks_total": total // self.block_size, "kv_blocks_used": -(-used // self.block_size),
                "kv_usage": used / total, "iterations": self.iterations,
                "max_num_seqs": self.max_num_seqs, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_block_size": self.block_size, "max_tokens_per_request": min(self.context, self.slot_tokens),
                "compile_seconds": self.stepper.compile_seconds}


class AsyncEngine:
    """Runs `Engine.step()` on a background thread; `generate()` is an async stream of RequestOutput."""

    def __init__(self, model: DiffusionGemma, **kwargs: Any):
        self.engine = Engine(model, **kwargs)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self.error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work() and not self.engine.aborted:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # keep serving: fail the running requests, report, go on
                self.error = e
                log.exception("engine iteration failed; aborting %d running request(s)", len(self.engine.running))
                for r in list(self.engine.running):
                    self.engine._fail(r)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.prepare(prompt_ids, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if not self._accepting:
            raise EngineStopped("the server is shutting down; retry on another instance")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.engine.add(prompt_ids, params, lambda o: loop.call_soon_threadsafe(queue.put_nowait, o),
                              request_id)
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.kind == "finished":
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.engine.abort(rid)
                self._wake.set()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.engine.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.has_work():
            self.engine.abort_all()
            self._wake.set()
            t = time.monotonic() + 5
            while self.engine.has_work() and time.monotonic() < t:
                await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


def _default_kv_bytes(per_token: int, max_num_seqs: int, context: int, device: torch.device) -> int:
    """Enough for every slot at 4k tokens (or the context), capped by a share of free memory."""
    want = per_token * max_num_seqs * min(context, 4096)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = int(free * 0.8)
    else:
        cap = _mem_available() // 4
    return max(per_token * 256, min(want, cap))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3
