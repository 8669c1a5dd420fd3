"""The fast decoding step shared by offline `generate` and the serving engine.

A `Stepper` owns a KV cache with one slot per request row and every row's sampler state in preallocated tensors.
One `iterate()` is one forward over [the canvases of the rows being denoised ; the tokens being encoded] — a
committed canvas is encoded in the same pass as the first step of the next one, a prompt too — followed by the
fast sampler on every canvas row at once (spec §4.2–4.4 with counter-based draws, `sampling.py`). Rows are
independent: a row whose canvas is stable and confident (or out of steps) is reported for commit after the step
and starts its next canvas when the caller encodes the committed one.

The pass and the sampler are one function under `torch.compile` (fullgraph, static shapes per bucket of rows and
encode tokens); on CUDA each bucket is also captured as a CUDA graph. On a CPU compiling is opt-in
(`DGEMMA_COMPILE=1`, `compile=True`) and covers the iterations without encodes only; `DGEMMA_COMPILE=0` runs
everything eagerly.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch

from . import sampling
from .config import GenerationConfig
from .model import Backbone, Batch, KVCache
from .model import ops

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def compile_default(device: torch.device) -> bool:
    """Compile unless DGEMMA_COMPILE=0 (or on a CPU, unless DGEMMA_COMPILE=1: see docs/performance.md)."""
    env = os.environ.get("DGEMMA_COMPILE", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return device.type == "cuda"


def _bucket(n: int, step: int = 1) -> int:
    for b in ROW_BUCKETS:
        if b * step >= n:
            return b * step
    return -(-n // step) * step


def stepper_for(backbone: Backbone, rows: int, capacity: int, canvas_length: int,
                compile: bool | None = None) -> "Stepper":
    """A Stepper for `rows` rows of at least `capacity` positions, reused across calls (its compiled steps and
    buffers with it): the capacity is rounded up to a power of two (≥ 512) and the last two are kept."""
    cap = _capacity(capacity)
    on = compile_default(backbone.device) if compile is None else compile
    return _reuse(backbone, ("diffusion", rows, cap, canvas_length, on),
                  lambda: Stepper(backbone, rows, cap, canvas_length, on))


def ar_stepper_for(backbone: Backbone, rows: int, capacity: int, compile: bool | None = None) -> "ARStepper":
    """The same for greedy autoregressive decoding."""
    cap = _capacity(capacity)
    on = compile_default(backbone.device) if compile is None else compile
    return _reuse(backbone, ("ar", rows, cap, on), lambda: ARStepper(backbone, rows, cap, on))


def _capacity(n: int) -> int:
    return max(512, 1 << (max(n, 1) - 1).bit_length())


def _reuse(backbone: Backbone, key: tuple, make):
    cache = backbone.__dict__.setdefault("_dgemma_steppers", {})
    if key not in cache:
        while len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    else:
        cache[key] = cache.pop(key)  # most recently used last
    return cache[key]


def encode_rectangle(encodes: list[tuple[int, int, torch.Tensor]], n_seg: int, S_e: int, scratch: int):
    """Encode segments (slot, first position, token ids) as a rectangle [5, n_seg, S_e] of (ids, pos, kv slot,
    row slot, hi) on the host; padding tokens write their K/V to the `scratch` slot and see nothing (hi = 0)."""
    enc = torch.zeros(5, n_seg, S_e, dtype=torch.long)
    enc[1] = torch.arange(S_e)
    enc[2:4] = scratch
    for i, (slot, first, ids) in enumerate(encodes):
        n = int(ids.numel())
        enc[0, i, :n] = ids.reshape(-1).cpu()
        enc[1, i, :n] = torch.arange(first, first + n)
        enc[2, i, :n] = slot
        enc[3, i] = slot
        enc[4, i, :n] = enc[1, i, :n] + 1
    return enc


@dataclass
class StepOut:
    """What one iteration did, per canvas row (tensors on the host, [R, L] unless noted)."""

    rows: list[int]  # the slots of the canvas rows, in order
    draft: torch.Tensor  # argmax canvas
    canvas: torch.Tensor  # the next decoder input: accepted samples + fresh noise
    accepted: torch.Tensor  # bool
    entropy: torch.Tensor  # fp32, of the temperature-scaled logits
    temperature: torch.Tensor  # [R]
    step: torch.Tensor  # [R] 1-based step within the row's canvas
    commit: torch.Tensor  # [R] bool: the canvas is done (stable and confident) or out of steps


class Stepper:
    """Batched fast decoding over `slots` request rows (plus one scratch slot that padding writes to)."""

    def __init__(self, backbone: Backbone, slots: int, capacity: int, canvas_length: int,
                 compile: bool | None = None):
        self.bb = backbone
        cfg = backbone.cfg
        dev, dt = backbone.device, backbone.dtype
        self.L, self.V, self.slots = canvas_length, cfg.vocab_size, slots
        self.scratch = slots
        self.cache = KVCache(cfg, slots + 1, capacity + canvas_length, dt, dev)
        self.pad = ops.gemm_pad(dt, dev)
        S, L = slots + 1, canvas_length

        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        # per-slot sampler settings (set by `start`)
        self.key, self.N, self.S = z(S), z(S), z(S)
        self.t_min, self.t_max = z(S, dtype=torch.float32), z(S, dtype=torch.float32)
        self.bound, self.conf = z(S, dtype=torch.float32), z(S, dtype=torch.float32)
        # per-slot progress and state of the canvas in progress
        self.start, self.canvas_idx, self.n_left, self.steps = z(S), z(S), z(S), z(S)
        self.canvas, self.draft, self.last_acc = z(S, L), z(S, L), z(S, L)
        self.sc = z(S, L, cfg.hidden_size, dtype=dt)
        self.run, self.revisions = z(S), z(S)
        self.start_row(self.scratch, GenerationConfig().merged(), 0, 0)  # finite settings for padding rows
        self.compile = compile_default(dev) if compile is None else compile
        self._fns: dict[tuple[int, int], object] = {}
        self.compile_seconds = 0.0

    # -- per-row settings ----------------------------------------------------------------------------------
    def start_row(self, slot: int, gcfg: GenerationConfig, seed: int, start: int) -> None:
        """Set a row's sampler settings; its first canvas starts at position `start` (after its prompt). S ≥ N
        already means "never stable" and a bound or threshold above fp32's range accepts everything, so those
        are saturated to fit the int64 / fp32 slots with the same results."""
        big = torch.finfo(torch.float32).max
        vals = {"key": sampling.seed_key(seed), "N": gcfg.max_denoising_steps,
                "S": min(gcfg.stability_threshold, gcfg.max_denoising_steps), "t_min": gcfg.t_min,
                "t_max": gcfg.t_max, "bound": min(gcfg.entropy_bound, big),
                "conf": min(gcfg.confidence_threshold, big), "start": start, "canvas_idx": 0, "revisions": 0}
        for name, v in vals.items():
            getattr(self, name)[slot] = v

    def next_canvas(self, slot: int) -> None:
        """After a commit: the row's next canvas starts L positions further."""
        self.start[slot] += self.L
        self.canvas_idx[slot] += 1

    # -- one iteration -------------------------------------------------------------------------------------
    def iterate(self, rows: list[int], fresh: list[bool], encodes: list[tuple[int, int, torch.Tensor]]) -> StepOut:
        """One forward + sampler step. rows: slots to denoise (each at its canvas's next step; `fresh` ones start
        a new canvas with this step); encodes: (slot, first position, token ids) written to the cache in the same
        pass (they precede that slot's canvas). Returns the step's results for `rows`."""
        dev = self.bb.device
        R = _bucket(len(rows)) if rows else 0
        n_seg = _bucket(len(encodes)) if encodes else 0
        S_e = _bucket(max(int(t.numel()) for _, _, t in encodes), 16) if encodes else 0
        rows_t = torch.full((R,), self.scratch, dtype=torch.long)
        rows_t[:len(rows)] = torch.tensor(rows, dtype=torch.long)
        fresh_t = torch.ones(R, dtype=torch.bool)
        fresh_t[:len(rows)] = torch.tensor(fresh, dtype=torch.bool)
        enc = encode_rectangle(encodes, n_seg, S_e, self.scratch)
        args = rows_t.to(dev), fresh_t.to(dev), enc.to(dev)
        # on a CPU only iterations without encodes are compiled: one shape per row bucket (a compile takes minutes
        # there), and the few iterations that encode run eagerly
        compiled = self.compile and R and (dev.type != "cpu" or not encodes)
        out = self._fn(R, n_seg, S_e)(*args) if compiled else self._iterate(*args, begin=any(fresh))
        draft, canvas, acc, h, T, step, commit = (t[:len(rows)].cpu() for t in out)
        return StepOut(rows, draft, canvas, acc, h, T, step, commit)

    def padding_args(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Arguments of the same shapes that touch only the scratch slot (to warm up a CUDA graph capture)."""
        rows, fresh, enc = (a.clone() for a in args)
        rows.fill_(self.scratch)
        enc[0].zero_(), enc[2:4].fill_(self.scratch), enc[4].zero_()
        return rows, fresh.fill_(True), enc

    def _fn(self, R: int, n_seg: int, S_e: int) -> "_Compiled":
        key = (R, n_seg, S_e)
        if key not in self._fns:
            self._fns[key] = _Compiled(self._iterate, self.compile, dev=self.bb.device, owner=self)
        return self._fns[key]

    def _iterate(self, rows: torch.Tensor, fresh: torch.Tensor, enc: torch.Tensor, begin: bool = True):
        """The compiled function: (rows [R], fresh [R], enc [5, n_seg, S_e]) -> per-row results; updates the slot
        state. `begin=False` (eager only) skips starting canvases: no row is fresh."""
        bb, L, V = self.bb, self.L, self.V
        R = rows.shape[0]
        dev = rows.device
        if R and begin:
            self._begin_canvas(rows, fresh)
        start = self.start[rows]
        ar = torch.arange(L, device=dev)
        pos = (start[:, None] + ar).reshape(-1)
        anchor = start.repeat_interleave(L)
        e = enc.flatten(1)
        rects = tuple(r for r in ((R, L), tuple(enc.shape[1:])) if r[0])
        batch = Batch(ids=torch.cat([self.canvas[rows].reshape(-1), e[0]]), pos=torch.cat([pos, e[1]]),
                      slot=torch.cat([rows.repeat_interleave(L), e[2]]), anchor=torch.cat([anchor, e[1]]),
                      hi=torch.cat([anchor + L, e[4]]), n_canvas=R * L, rects=rects,
                      row_slot=torch.cat([rows.repeat_interleave(L), e[3]]))
        sc = self.sc[rows].reshape(R * L, -1)
        x = bb.forward(batch, self.cache, sc, numerics="fast", pad=self.pad)
        if not R:
            return ()
        raw = bb.logits(x[:R * L], self.pad)
        n = self.n_left[rows]
        N = self.N[rows]
        # T = t_min + (t_max − t_min)·n/N in fp32 (spec §4.2), per row
        T = self.t_min[rows] + (self.t_max[rows] - self.t_min[rows]) * (n.to(torch.int32) / N)
        step = N - n + 1
        key, cidx = self.key[rows], self.canvas_idx[rows]
        keys = sampling.stream_keys(key, cidx, step, sampling.SAMPLE, L).reshape(-1)
        samp, amax, h, p = sampling.fast_draw(raw, T.repeat_interleave(L), keys)
        samp, amax, h = samp.view(R, L), amax.view(R, L), h.view(R, L)
        acc = sampling.accept_stable(h, self.bound[rows])
        noise = sampling.uniform_tokens(sampling.stream_keys(key, cidx, step, sampling.RENOISE, L), V)
        new = torch.where(acc, samp, noise)
        sc_new = bb.soft_embed_probs(p.to(bb.dtype), self.pad).view(R, L, -1)
        # stable: the argmax equals each of the last S argmax canvases, i.e. the last S+1 are equal (spec §4.4)
        run = torch.where((amax == self.draft[rows]).all(-1), self.run[rows] + 1, 1)
        done = (run > self.S[rows]) & (h.mean(-1) < self.conf[rows])
        last = self.last_acc[rows]
        self.revisions.index_add_(0, rows, (acc & (last >= 0) & (samp != last)).sum(-1))
        for name, val in (("canvas", new), ("draft", amax), ("sc", sc_new), ("run", run), ("n_left", n - 1),
                          ("steps", self.steps[rows] + 1), ("last_acc", torch.where(acc, samp, last))):
            getattr(self, name).index_copy_(0, rows, val)
        return amax, new, acc, h, T, step, done | (n == 1)

    def _begin_canvas(self, rows: torch.Tensor, fresh: torch.Tensor) -> None:
        """Rows flagged fresh start a canvas: uniform noise (spec §4.7), no self-conditioning, a new history."""
        key, cidx = self.key[rows], self.canvas_idx[rows]
        noise = sampling.uniform_tokens(sampling.stream_keys(key, cidx, torch.zeros_like(cidx), sampling.INIT,
                                                             self.L), self.V)
        f = fresh[:, None]
        self.canvas.index_copy_(0, rows, torch.where(f, noise, self.canvas[rows]))
        self.draft.index_copy_(0, rows, torch.where(f, -1, self.draft[rows]))
        self.last_acc.index_copy_(0, rows, torch.where(f, -1, self.last_acc[rows]))
        self.sc.index_copy_(0, rows, torch.where(f[:, :, None], 0, self.sc[rows]))
        for name, init in (("run", 0), ("steps", 0), ("n_left", self.N[rows])):
            t = getattr(self, name)
            t.index_copy_(0, rows, torch.where(fresh, init, t[rows]))


class ARStepper:
    """Greedy autoregressive decoding on the fast forward: each row's prompt is encoded at positions [0, n) of its
    own KV slot, then every pass feeds one token per row (causal, spec §3.2) and takes the argmax of the tied head.
    The token pass is compiled like the diffusion step (a CUDA graph on CUDA); the prompt encode is compiled per
    prompt length on CUDA and runs eagerly on a CPU."""

    def __init__(self, backbone: Backbone, rows: int, capacity: int, compile: bool | None = None):
        self.bb, self.rows, self.scratch = backbone, rows, rows
        self.cache = KVCache(backbone.cfg, rows + 1, capacity, backbone.dtype, backbone.device)
        self.pad = ops.gemm_pad(backbone.dtype, backbone.device)
        self.compile = compile_default(backbone.device) if compile is None else compile
        self.compile_seconds = 0.0
        self._token = _Compiled(self._token_step, self.compile, dev=backbone.device, owner=self)
        # the prompt encode: compiled too (once per prompt length, no graph) except on a CPU, as for the diffusion
        # step's encodes
        self._prefill = _Compiled(self._prefill_step, self.compile and backbone.device.type != "cpu",
                                  dev=backbone.device, owner=self, graph=False)

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Encode each row's prompt (1-D, no padding) into its slot; returns the first greedy token per row [B]."""
        B, S = len(prompts), max(int(p.numel()) for p in prompts)
        enc = encode_rectangle([(b, 0, p) for b, p in enumerate(prompts)], B, S, self.scratch)
        last = torch.tensor([int(p.numel()) - 1 for p in prompts])
        return self._prefill(enc.to(self.bb.device), last.to(self.bb.device))

    def _prefill_step(self, enc: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """enc [5, B, S] (`encode_rectangle`); last [B]: each row's last prompt index."""
        B, S = enc.shape[1:]
        ids, pos, slot, rows, hi = enc.flatten(1)
        batch = Batch(ids=ids, pos=pos, slot=slot, anchor=pos, hi=hi, n_canvas=0, rects=((B, S),), row_slot=rows)
        x = self.bb.forward(batch, self.cache, numerics="fast", pad=self.pad).view(B, S, -1)
        return torch.argmax(self.bb.logits(x[torch.arange(B, device=x.device), last], self.pad), dim=-1)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] at positions [B] (each row's next position); returns the next greedy token per row."""
        dev = self.bb.device
        return self._token(tokens.to(dev), pos.to(dev), torch.arange(self.rows, device=dev))

    def padding_args(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, pos, slots = (a.clone() for a in args)
        return tokens.zero_(), pos.zero_(), slots.fill_(self.scratch)

    def _token_step(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        batch = Batch(ids=tokens, pos=pos, slot=slots, anchor=pos, hi=pos + 1, n_canvas=0, rects=((B, 1),),
                      row_slot=slots)
        x = self.bb.forward(batch, self.cache, numerics="fast", pad=self.pad)
        return torch.argmax(self.bb.logits(x, self.pad), dim=-1)


class _Compiled:
    """`torch.compile(fn, fullgraph=True)` for one static bucket, made on first call (its time added to the
    owner's `compile_seconds`); on CUDA replayed as a CUDA graph (unless `graph=False`). Any failure to compile or
    capture warns once and runs `fn` eagerly from then on."""

    _warned = False

    def __init__(self, fn, enabled: bool, dev: torch.device, owner: "Stepper | ARStepper", graph: bool = True):
        self.fn, self.enabled, self.dev, self.owner, self.use_graph = fn, enabled, dev, owner, graph
        self.compiled = None
        self.graph = None

    def __call__(self, *args):
        if not self.enabled:
            return self.fn(*args)
        try:
            if self.compiled is None:
                t = time.perf_counter()
                self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
                out = self.compiled(*args)
                if self.dev.type == "cuda" and self.use_graph:
                    self.graph = _CudaGraph(self.compiled, self.owner.padding_args(args))
                self.owner.compile_seconds += time.perf_counter() - t
                return out
            return self.graph(*args) if self.graph is not None else self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from now on
            if not _Compiled._warned:
                warnings.warn(f"dgemma: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running eagerly (set DGEMMA_COMPILE=0 to skip compiling)", RuntimeWarning, stacklevel=2)
                _Compiled._warned = True
            self.enabled = False
            return self.fn(*args)


class _CudaGraph:
    """A captured replay of `fn` on static copies of its tensor arguments (the state it mutates lives at fixed
    addresses in the Stepper). `__call__` copies the new arguments in, replays, and returns the static outputs."""

    def __init__(self, fn, args):
        self.static = list(args)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(*self.static)  # warm-up on a side stream (allocations settle)
        torch.cuda.current_stream().wait_stream(s)
        self.g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g):
            self.out = fn(*self.static)

    def __call__(self, *args):
        for s, a in zip(self.static, args):
            s.copy_(a)
        self.g.replay()
        return self.out
