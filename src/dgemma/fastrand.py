"""Exact, faster CPU draws for the sampler's multinomial step.

`torch.multinomial(probs, 1, generator=g)` on the CPU draws one Exp(1) variate per vocabulary entry
(q = empty_like(probs).exponential_(g); argmax(probs / q)); torch's CPU `exponential_` is a scalar loop, and it is a
quarter of a small model's decoding step. `exponential(n, g)` returns the same float32 values and leaves `g` in the
same state with cheaper work. torch's scalar loop computes, per variate,

    x = random64()                   two consecutive 32-bit Mersenne Twister outputs
    u = (x mod 2⁵³) · 2⁻⁵³           uniform_real_distribution<double>
    e = float32(−log1p(−u))          the exponential transformation (λ = 1)

and `torch.empty(n, dtype=int64).random_(generator=g)` draws exactly random64() mod 2⁶³ per element from the same
stream — the low 53 bits are the same — so the rest is vectorised float64 arithmetic. Torch builds have differed
here (some 2.4 builds drew CPU exponentials through MKL from a single seed word), so the first use runs a self-check
against the installed torch (values and generator state) and the fast path stays off for good if it differs. The
float64 log1p here is torch's vectorised one, torch's loop calls the C library's; they can differ in the last bit of a
double, which the float32 cast absorbs (0 differences in 21M draws measured, and the self-check covers it).

`multinomial1()` falls back to torch.multinomial whenever anything is unusual (not a CPU float32 tensor, gradients,
a row that is not a valid distribution), so errors and edge cases stay torch's own. tests/test_sampling.py checks
token-for-token equality with torch.multinomial over many seeds, shapes and interleavings with other draws.
"""

from __future__ import annotations

import ctypes

import torch

from . import native

_CHUNK = 1 << 20  # variates per step of the loop: bounds the temporaries (~20 bytes per variate) for any vocabulary
_MASK53 = (1 << 53) - 1
_SELF_CHECK: bool | None = None  # None = not run yet


def _exp_of_words(x: torch.Tensor) -> torch.Tensor:
    """float32 Exp(1) variates from random64() words (consumed in place): −log1p(−u), u = (x mod 2⁵³) · 2⁻⁵³."""
    u = x.bitwise_and_(_MASK53).double().mul_(2.0 ** -53)
    return u.neg_().log1p_().neg_().float()


def _draw(n: int, g: torch.Generator) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    words = torch.empty(min(n, _CHUNK), dtype=torch.int64)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        out[start:start + m] = _exp_of_words(words[:m].random_(generator=g))  # random64() mod 2^63, stream order
    return out


def _self_check() -> bool:
    """Does `_draw` reproduce this torch's CPU exponential_ (values and generator state)?"""
    for seed, skip in ((0, 0), (1, 1), (12345, 3)):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        if skip:  # an odd number of words consumed first: draws do not start pair-aligned
            torch.randint(0, 7, (skip,), generator=g1), torch.randint(0, 7, (skip,), generator=g2)
        want = torch.empty(4096).exponential_(generator=g1)
        got = _draw(4096, g2)
        if not torch.equal(want, got) or not torch.equal(g1.get_state(), g2.get_state()):
            return False
    return True


def _fast_generator(gen: torch.Generator | None) -> torch.Generator | None:
    """The generator to draw from on the fast path, or None when it cannot be used (a CUDA generator, or the
    one-time self-check found this torch drawing differently)."""
    global _SELF_CHECK
    g = gen if gen is not None else torch.default_generator
    if g.device.type != "cpu":
        return None
    if _SELF_CHECK is None:
        try:
            _SELF_CHECK = _self_check()
        except Exception:  # any surprise: stay on torch's own path
            _SELF_CHECK = False
    return g if _SELF_CHECK else None


def exponential(n: int, gen: torch.Generator | None) -> torch.Tensor | None:
    """n float32 Exp(1) variates as `torch.empty(n).exponential_(generator=gen)` draws them (and `gen` advanced the
    same way); None when the fast path cannot be used (see `_fast_generator`)."""
    g = _fast_generator(gen)
    return None if g is None else _draw(n, g)


def multinomial1(probs: torch.Tensor, generator: torch.Generator | None,
                 need: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.multinomial(probs, 1, generator=generator)` for a 2-D CPU float32 probs, identical result and
    generator state, with the exponential draws computed by `exponential`.

    need: optional bool [rows]: only these rows' samples are wanted. The generator still advances over every row
    (the words are drawn in stream order, so everything drawn later is unchanged), but the exponential transform,
    the division and the argmax run on the needed rows only; the other rows return 0. The sampler needs a sample
    only where a position is accepted, typically a few of a canvas's rows per step."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or not probs.is_contiguous() \
            or probs.requires_grad:
        return torch.multinomial(probs, 1, generator=generator)
    sums = probs.sum(-1)
    if not bool(torch.isfinite(sums).all() & (sums > 0).all() & (probs.amin() >= 0)):
        return torch.multinomial(probs, 1, generator=generator)  # torch's own error message
    if need is not None:
        out = _multinomial_rows(probs, generator, need.reshape(-1))
        if out is not None:
            return out
    q = exponential(probs.numel(), generator)
    if q is None:
        return torch.multinomial(probs, 1, generator=generator)
    q = torch.div(probs, q.view_as(probs), out=q.view_as(probs))
    return torch.argmax(q, dim=-1, keepdim=True)


def _multinomial_rows(probs: torch.Tensor, gen: torch.Generator | None, need: torch.Tensor) -> torch.Tensor | None:
    """multinomial1 for the rows in `need` (bool [R]); None when the fast path is off (nothing drawn then)."""
    g = _fast_generator(gen)
    if g is None:
        return None
    R, V = probs.shape
    out = torch.zeros(R, 1, dtype=torch.long)
    per = max(1, _CHUNK // V)  # rows per chunk of words
    fn = _native_rows() if _native_ok(g, need, R) else None  # the generator stepped in C (below)
    words = None if fn is not None else torch.empty(min(R, per) * V, dtype=torch.int64)
    for r0 in range(0, R, per):
        r1 = min(R, r0 + per)
        sel = need[r0:r1].nonzero().squeeze(1)
        if fn is not None:  # only the needed rows' words are tempered and returned
            x = _native_words(fn, g, need[r0:r1], V)
        else:  # every row's words, in stream order, then the needed rows
            x = words[:(r1 - r0) * V].random_(generator=g).view(r1 - r0, V)[sel]
        if sel.numel():  # the same float32 Exp(1) variates as _draw
            out[r0 + sel] = torch.argmax(torch.div(probs[r0 + sel], _exp_of_words(x)), dim=-1, keepdim=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# Native stepping of the generator (dgemma/csrc/mt19937.c): torch's Mersenne Twister produces and tempers every
# 32-bit word (~2 ms for a [64, 8192] draw on a 2-core VM); the sampler needs the words of a few rows and the state
# after all of them. The C helper twists the state in vectorisable loops and tempers only the needed rows' words.
# It works on torch's serialised generator state (get_state / set_state), whose layout is checked once against torch.
# ------------------------------------------------------------------------------------------------------------
_STATE_BYTES = 5056  # CPUGeneratorImplState: seed, int32 left, int32 seeded, uint64 next, uint64 words[624], ...
_LEFT, _NEXT, _WORDS = 8, 16, 24  # byte offsets of the fields used here
_NATIVE: object = None  # None = not tried yet; False = unavailable; else the C function


def _native_ok(g: torch.Generator, need: torch.Tensor, rows: int) -> bool:
    """The C stepping reads and writes the generator's state outside torch's lock, so it is used only on a generator
    of the caller's own (not the process-wide default one other threads may draw from), with a CPU bool mask of one
    entry per row."""
    return (g is not torch.default_generator and need.dtype == torch.bool and need.device.type == "cpu"
            and need.numel() == rows)


def _native_words(fn, g: torch.Generator, need: torch.Tensor, V: int) -> torch.Tensor:
    """Advance `g` over need.numel() rows of V random64() draws; the needed rows' words as int64 [n, V]
    (torch's int64 random_() values)."""
    st = g.get_state()
    b = st.numpy()
    left = ctypes.c_int64(int(b[_LEFT:_LEFT + 4].view("int32")[0]))
    nxt = ctypes.c_int64(int(b[_NEXT:_NEXT + 8].view("uint64")[0]))
    mask = need.reshape(-1).contiguous().view(torch.uint8)
    out = torch.empty(int(mask.sum()), V, dtype=torch.int64)
    fn(ctypes.c_void_p(st.data_ptr() + _WORDS), ctypes.byref(left), ctypes.byref(nxt), ctypes.c_int64(mask.numel()),
       ctypes.c_int64(V), ctypes.c_void_p(mask.data_ptr()), ctypes.c_void_p(out.data_ptr()))
    b[_LEFT:_LEFT + 4].view("int32")[0] = left.value
    b[_NEXT:_NEXT + 8].view("uint64")[0] = nxt.value
    g.set_state(st)
    return out


def _native_check(fn) -> bool:
    """Does the C helper leave the words and the generator exactly as torch's int64 random_() does?"""
    for seed, skip, rows, V, pattern in ((0, 0, 3, 700, (1, 0, 1)), (1, 1, 5, 333, (0, 1, 0, 0, 1)),
                                         (7, 3, 4, 1000, (0, 0, 0, 0)), (9, 0, 2, 5, (1, 1))):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        if skip:  # not pair-aligned
            torch.randint(0, 7, (skip,), generator=g1), torch.randint(0, 7, (skip,), generator=g2)
        need = torch.tensor(pattern, dtype=torch.bool)
        want = torch.empty(rows, V, dtype=torch.int64).random_(generator=g1)[need]
        got = _native_words(fn, g2, need, V)
        if not torch.equal(want, got) or not torch.equal(g1.get_state(), g2.get_state()):
            return False
        if not torch.equal(torch.randint(0, 1 << 30, (50,), generator=g1), torch.randint(0, 1 << 30, (50,), generator=g2)):
            return False
    return True


def _native_rows():
    """The C function, once it has been built and checked against this torch; None otherwise."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = False
        try:
            lib = native.library("mt19937")
            if lib is not None and torch.Generator().get_state().numel() == _STATE_BYTES:
                fn = lib.dgemma_mt_rows
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                if _native_check(fn):
                    _NATIVE = fn
        except Exception:  # any surprise: torch's own stepping
            _NATIVE = False
    return _NATIVE or None
