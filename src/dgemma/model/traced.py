"""The decoder pass as a TorchScript trace on the CPU: the same kernels, without Python between them.

A `small` decoder pass is ~1,500 ATen calls of which only ~150 are matrix products; on a 2-core CPU the Python and
dispatch work between them is a sixth of the pass. `torch.jit.trace` records `Backbone.denoise_body` once per call
signature (which optional inputs are present, batch and canvas size), on the signature's 65th call (see TRACE_AFTER
for when a trace pays), and then replays the recorded ATen graph from C++. The graph holds the same operators in the
same order on the same tensors, so the logits are the same bits as eager; each new trace is also checked against an
eager pass, and a trace that differs is dropped. Positions, cached prefix lengths and masks are inputs, so one trace
serves every canvas of a generation.

The graph runs with TorchScript's optimising executor off (`optimized_execution(False)`). The profiling executor
was ~1 ms a pass faster in steady state, but it re-specialises on every new prefix length and, once out of
"bailouts", fell back to a path slower than eager (37 instead of 28 ms a pass in a long bench). It also could not
change the arithmetic after the check.

Used only where it is known to help and to be exact: CPU tensors, no gradients, eval mode, no autocast.
`DGEMMA_TRACE=0` turns it off; anything that fails while tracing falls back to the eager pass for that signature,
with a warning.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .layers import feature_major_products, native_cpu_ops

if TYPE_CHECKING:
    from .backbone import Backbone

_LOCK = threading.Lock()
# Making a trace costs ~0.35 s (`small`, batch 1) and saves the per-call overhead, ~4 ms a pass (25.7 -> 21.7 ms):
# it pays after ~80 passes of small calls and never for large ones, whose time is GEMMs (Sudoku eval, batch 32 x 81
# tokens: 310 -> 296 ms a pass). So only calls of at most TRACE_MAX_TOKENS canvas tokens are traced, and only once a
# signature has run TRACE_AFTER times: a one-off 16-step generation of 256 tokens never traces (2.18 s, eager 2.15),
# a one-off 48-step one gains (6.18 against 6.58 s), and a process that keeps generating gains from then on.
TRACE_AFTER = 64
TRACE_MAX_TOKENS = 256
ENABLED = os.environ.get("DGEMMA_TRACE", "1").strip().lower() not in ("0", "false", "no", "off")


class _Body(nn.Module):
    """`denoise_body` with a flat tuple of tensors in, for the tracer (it takes no None and no nesting)."""

    def __init__(self, bb: "Backbone", has_sc: bool, has_sc_mask: bool, has_mask: tuple[bool, ...], n_rope: int,
                 n_kv: int):
        super().__init__()
        self.bb = bb
        self.layout = (has_sc, has_sc_mask, has_mask, n_rope, n_kv)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        has_sc, has_sc_mask, has_mask, n_rope, n_kv = self.layout
        it = iter(args)
        canvas = next(it)
        sc = next(it) if has_sc else None
        sc_mask = next(it) if has_sc_mask else None
        rope = [next(it) for _ in range(n_rope)]
        masks = [next(it) if h else None for h in has_mask]
        kv = [next(it) for _ in range(n_kv)]
        return self.bb.denoise_body(canvas, sc, sc_mask, rope, masks, kv)


def _usable(bb: "Backbone", canvas: torch.Tensor) -> bool:
    return (ENABLED and canvas.device.type == "cpu" and canvas.numel() <= TRACE_MAX_TOKENS
            and not torch.is_grad_enabled() and not bb.training and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not _cpu_fuser_on())


def _cpu_fuser_on() -> bool:
    """TorchScript's CPU fuser (off by default) would change the arithmetic of the replayed graph."""
    can_fuse = getattr(torch._C, "_jit_can_fuse_on_cpu", None)
    return bool(can_fuse()) if can_fuse is not None else False


def _weights_identity(bb: "Backbone") -> tuple:
    """What a trace holds on to besides its inputs: the parameter and buffer objects and the softcap. Replacing any
    of them (load_state_dict(assign=True), a swapped module, a new buffer) drops the traces; in-place updates need
    nothing, the trace reads the same tensors. (The traces keep the old objects alive, so an id is never reused
    while it is compared.) A plain walk over the module tree: ~0.2 ms, against ~0.4 ms for parameters()."""
    out: list = [bb.softcap]
    stack: list[nn.Module] = [bb]
    while stack:
        mod = stack.pop()
        out.extend(map(id, mod._parameters.values()))
        out.extend(map(id, mod._buffers.values()))
        stack.extend(mod._modules.values())
    return tuple(out)


def run_denoise(bb: "Backbone", canvas: torch.Tensor, sc: torch.Tensor | None, sc_mask: torch.Tensor | None,
                rope: list[torch.Tensor], masks: list[torch.Tensor | None], kv: list[torch.Tensor]) -> torch.Tensor:
    """`bb.denoise_body(...)`, through a cached trace where `_usable`."""
    if not _usable(bb, canvas):
        return bb.denoise_body(canvas, sc, sc_mask, rope, masks, kv)
    has_mask = tuple(m is not None for m in masks)
    # the thread count is part of the key: MKL's GEMM bits depend on it, and a trace was checked under one count
    key = (sc is not None, sc_mask is not None, has_mask, tuple(canvas.shape), bb.dtype, torch.get_num_threads())
    ident = _weights_identity(bb)
    if getattr(bb, "_traced_ident", None) != ident:
        bb._traced.clear()
        bb._traced_ident = ident
    fn = bb._traced.get(key, 0)
    if fn is False:  # tracing failed or differed for this signature (or another thread is making it)
        return bb.denoise_body(canvas, sc, sc_mask, rope, masks, kv)
    args = tuple([canvas] + ([sc] if sc is not None else []) + ([sc_mask] if sc_mask is not None else []) + rope
                 + [m for m in masks if m is not None] + kv)
    if not isinstance(fn, int):
        with torch.jit.optimized_execution(False):  # see the module docstring
            return fn(*args)
    with _LOCK:  # eager calls seen so far for this signature; one thread makes the trace
        fn = bb._traced.get(key, 0)
        if isinstance(fn, int) and fn >= TRACE_AFTER:
            bb._traced[key] = False  # taken: eager until the trace is in place
            fn, out = _make(bb, key, args, (canvas, sc, sc_mask, rope, masks, kv))
            bb._traced[key] = fn
            return out
        if isinstance(fn, int):
            bb._traced[key] = fn + 1
    return bb.denoise_body(canvas, sc, sc_mask, rope, masks, kv)


def _make(bb: "Backbone", key: tuple, args: tuple, eager_args: tuple):
    """Trace one signature and check it against eager on the same inputs. Returns (trace or False, logits).

    Two kinds of exact speed-up are tried first, each resting on properties of this machine's libraries rather than
    a guarantee: the head's and dense MLPs' products weight-first (`layers.feature_major_products`) and dgemma's
    native operators (`layers.native_cpu_ops`, model/native_ops.py). A trace is kept only if its logits are the
    eager pass's bits; otherwise the next variant is traced, down to the plain one."""
    want = bb.denoise_body(*eager_args)
    if not _grouped_mm_fused(bb):
        return False, want  # the experts would run a Python loop over this input's routing: not traceable
    body = _Body(bb, key[0], key[1], key[2], len(eager_args[3]), len(eager_args[5]))
    tokens = eager_args[0].numel()
    # (weight-first products, native operators)
    variants = ((True, True), (False, True), (True, False), (False, False))
    for i, (weight_first, native) in enumerate(variants):
        last = i == len(variants) - 1
        try:
            with contextlib.ExitStack() as ctx:
                if weight_first:
                    ctx.enter_context(feature_major_products(tokens))
                if native:
                    ctx.enter_context(native_cpu_ops(tokens))
                    bb.denoise_body(*eager_args)  # runs the native operators' checks outside the tracer
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fn = torch.jit.trace(body, args, check_trace=False)
            # A TracerWarning means a value of this input was frozen into the graph (e.g. a tensor read as a Python
            # number): such a trace would be wrong for other inputs. (torch's deprecation notice is not a problem.)
            frozen = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
            if frozen:
                raise RuntimeError(f"the tracer froze an input-dependent value: {frozen[0]}")
            with torch.jit.optimized_execution(False):
                got = fn(*args)
        except Exception as e:  # any tracer limitation: the next variant, then eager for this signature
            if not last:
                continue
            warnings.warn(f"dgemma: tracing the decoder pass failed ({type(e).__name__}: {e}); running it eagerly",
                          RuntimeWarning, stacklevel=3)
            return False, want
        if torch.equal(got, want):
            return fn, want
    warnings.warn("dgemma: the traced decoder pass differs from the eager one; running it eagerly",
                  RuntimeWarning, stacklevel=3)
    return False, want


def _grouped_mm_fused(bb: "Backbone") -> bool:
    """Does `F.grouped_mm` take both expert GEMMs of this model (dtype, shapes, strides) on the CPU? Otherwise
    `layers.grouped_mm` loops over per-expert counts in Python, which a trace would freeze."""
    if not hasattr(F, "grouped_mm"):
        return False
    ex = bb.layers[0].experts
    E = ex.num_experts
    offs = torch.arange(1, E + 1, dtype=torch.int32)
    try:
        for w in (ex.gate_up_proj, ex.down_proj):
            F.grouped_mm(torch.zeros(E, w.shape[2], dtype=w.dtype), w.transpose(-2, -1), offs=offs)
    except RuntimeError:
        return False
    return True
