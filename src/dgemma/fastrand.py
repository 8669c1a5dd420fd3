"""Exact, faster CPU draws for the sampler's multinomial step.

`torch.multinomial(probs, 1, generator=g)` on the CPU draws one Exp(1) variate per vocabulary entry
(q = empty_like(probs).exponential_(g); argmax(probs / q)); torch's CPU `exponential_` is a scalar loop, and it is a
quarter of a small model's decoding step. `exponential(n, g)` returns the same float32 values and leaves `g` in the
same state, computed with NumPy's MT19937 (the same Mersenne Twister) and vectorised float64 math:

    x = (w₁ << 32) | w₂              two consecutive 32-bit outputs per variate (torch's random64())
    u = (x mod 2⁵³) · 2⁻⁵³           torch's uniform_real_distribution<double>
    e = float32(−log1p(−u))          torch's exponential transformation (λ = 1), cast to float32

The generator state is read and written through `Generator.get_state()/set_state()` (torch's CPU state layout:
int32 `left` at byte 8, uint64 `next` at byte 16, 624 uint64 words from byte 24). Torch builds have differed here
(some 2.4 builds drew CPU exponentials through MKL from a single seed word), so the first use runs a self-check
against the installed torch — values and generator state on 3 × 4096 draws — and the fast path stays off for good if
it differs. `multinomial1()` falls back to torch.multinomial whenever anything is unusual (not a CPU float32 tensor,
gradients, no NumPy, an unexpected state layout, a row that is not a valid distribution), so errors and edge cases
stay torch's own. (The float64 log1p here is torch's vectorised one, torch's scalar loop uses the C library's; the
two can differ in the last bit of a double, which the float32 cast absorbs — 0 differences in 21M draws measured.)
tests/test_sampling.py checks token-for-token equality with torch.multinomial over many seeds, shapes and
interleavings with other draws.
"""

from __future__ import annotations

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
    np = None

_STATE_BYTES = 5056
_CHUNK = 1 << 20  # variates per NumPy call: bounds the temporaries (~40 bytes per variate) whatever the vocabulary
_SELF_CHECK: bool | None = None  # None = not run yet
_KEY = slice(24, 24 + 624 * 8)
_MASK53 = (1 << 53) - 1


def _mirror(gen: torch.Generator):
    st = gen.get_state()
    if st.numel() != _STATE_BYTES:
        return None, None
    a = st.numpy()
    left = int.from_bytes(a[8:12].tobytes(), "little", signed=True)
    nxt = int.from_bytes(a[16:24].tobytes(), "little")
    pos = 624 if left == 1 else nxt
    if not 0 <= pos <= 624:
        return None, None
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": {"key": a[_KEY].view(np.uint64).astype(np.uint32), "pos": pos}}
    return st, bg


def _store(gen: torch.Generator, st: torch.Tensor, bg) -> None:
    s = bg.state["state"]
    pos = int(s["pos"])
    a = st.numpy()
    a[_KEY].view(np.uint64)[:] = s["key"].astype(np.uint64)
    a[8:12] = np.frombuffer((625 - pos if pos < 624 else 1).to_bytes(4, "little", signed=True), dtype=np.uint8)
    a[16:24] = np.frombuffer(pos.to_bytes(8, "little"), dtype=np.uint8)
    gen.set_state(st)


def _draw(n: int, g: torch.Generator) -> torch.Tensor | None:
    st, bg = _mirror(g)
    if st is None:
        return None
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        raw = torch.from_numpy(bg.random_raw(2 * m).view(np.int64))  # 32-bit words as int64
        x = (raw[0::2] << 32) | raw[1::2]  # two's complement wrap is harmless: only the low 53 bits are kept
        u = (x & _MASK53).double().mul_(2.0 ** -53)
        out[start:start + m] = u.neg_().log1p_().neg_()
    _store(g, st, bg)
    return out


def _self_check() -> bool:
    """Does `_draw` reproduce this torch's CPU exponential_ (values and generator state)?"""
    for seed, skip in ((0, 0), (1, 1), (12345, 3)):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        if skip:  # an odd number of words consumed first: draws do not start pair-aligned
            torch.randint(0, 7, (skip,), generator=g1), torch.randint(0, 7, (skip,), generator=g2)
        want = torch.empty(4096).exponential_(generator=g1)
        got = _draw(4096, g2)
        if got is None or not torch.equal(want, got) or not torch.equal(g1.get_state(), g2.get_state()):
            return False
    return True


def exponential(n: int, gen: torch.Generator | None) -> torch.Tensor | None:
    """n float32 Exp(1) variates as `torch.empty(n).exponential_(generator=gen)` draws them (and `gen` advanced the
    same way); None when the fast path cannot be used (no NumPy, a CUDA generator, an unknown state layout, or the
    one-time self-check found this torch drawing differently)."""
    global _SELF_CHECK
    if np is None:
        return None
    g = gen if gen is not None else torch.default_generator
    if g.device.type != "cpu":
        return None
    if _SELF_CHECK is None:
        try:
            _SELF_CHECK = _self_check()
        except Exception:  # any surprise in the state layout: stay on torch's path
            _SELF_CHECK = False
    if not _SELF_CHECK:
        return None
    return _draw(n, g)


def multinomial1(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`torch.multinomial(probs, 1, generator=generator)` for a 2-D CPU float32 probs, identical result and
    generator state, with the exponential draws computed by `exponential`."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or not probs.is_contiguous() \
            or probs.requires_grad:
        return torch.multinomial(probs, 1, generator=generator)
    sums = probs.sum(-1)
    if not bool(torch.isfinite(sums).all()) or not bool((sums > 0).all()) or bool((probs.amin(-1) < 0).any()):
        return torch.multinomial(probs, 1, generator=generator)  # torch's own error message
    q = exponential(probs.numel(), generator)
    if q is None:
        return torch.multinomial(probs, 1, generator=generator)
    q = torch.div(probs, q.view_as(probs), out=q.view_as(probs))
    return torch.argmax(q, dim=-1, keepdim=True)
