"""W4A16 grouped GEMM in Triton: the int4 dequantization fused into the product, so a weight is read from memory
as 4-bit codes and never exists in 16 bits.

    y[rows of group e] = x[rows of group e] · (q[e] · s[e])ᵀ

x [M, K] (bf16 / fp16 / fp32, rows sorted by group), q [E, N, K/2] packed codes (low nibble = even column, each
stored as q + 8, see `quant.quantize_int4`), s [E, N, K/G] one scale per G input columns, offs [E] cumulative row
counts (int32, as for `torch._grouped_mm`). A plain matrix is the case E = 1, offs = [M].

How it computes: program (n, e, j) owns BLOCK_N output columns of group e and every S-th tile of BLOCK_M rows of
that group, S being the grid's third dimension. Its K loop goes one scale group at a time: it loads the x tile's even and odd columns separately
(so the packed byte's two nibbles need no interleaving), the matching bytes of q, splits them into two int tiles,
and accumulates s · (x_even · lo + x_odd · hi) in fp32. The group's row range is read on the device, so there is
no host sync and a CUDA graph can capture the launch. S only spreads the work; any value gives the same result.
Row ranges are clipped to x's rows, so a bad `offs` cannot read or write out of bounds.

Triton is optional: without it (or on a CPU) `quant` dequantizes inside the product instead. Under
`TRITON_INTERPRET=1` the kernel runs on CPU tensors, which is how the tests check it against its PyTorch twin.
The interpreter's `tl.dot` gives garbage for bf16 tiles (numpy has no bf16), so there, and only there, bf16 tiles
are widened to fp32 before the dot (the `WIDEN` flag); fp16 and fp32 run the GPU code unchanged.
"""

from __future__ import annotations

import functools
import math
import os

import torch

GROUPS = (32, 64, 128, 256)  # tl.dot needs K ≥ 16 per operand (G/2 columns of each parity), tl.arange a power of
# two, and larger groups would not fit the K tile in shared memory; other groups take the dequantizing path
MAX_SPLITS = 65535  # CUDA's limit on the grid's z dimension
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(x: torch.Tensor, group: int | None) -> bool:
    """Whether `grouped_mm` can run here: Triton importable, a CUDA tensor (or a CPU one under the interpreter), a
    float dtype it supports, and a group size in GROUPS. `DGEMMA_INT4_KERNEL=dequant` turns it off (to compare
    against the dequantizing path)."""
    if os.environ.get("DGEMMA_INT4_KERNEL", "triton") == "dequant":
        return False
    if group not in GROUPS or x.dtype not in _DTYPES:
        return False
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return False
    return _triton() is not None


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel; `interpret` keys the cache, since Triton picks the interpreter when it decorates."""
    triton, tl = _triton()

    @triton.jit
    def int4_grouped_mm_kernel(x_ptr, q_ptr, s_ptr, bounds_ptr, y_ptr, M, N, K,
                               stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_ym,
                               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               IEEE: tl.constexpr, WIDEN: tl.constexpr):
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        j = tl.program_id(2)
        splits = tl.num_programs(2)  # a launch argument, not a constant: no new compile per row count
        start = tl.minimum(tl.load(bounds_ptr + e), M)
        end = tl.minimum(tl.load(bounds_ptr + e + 1), M)
        HALF: tl.constexpr = GROUP // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, HALF)
        q_base = q_ptr + e.to(tl.int64) * stride_qe + rn[None, :].to(tl.int64) * stride_qn  # [1, BLOCK_N]
        s_base = s_ptr + e.to(tl.int64) * stride_se + rn.to(tl.int64) * stride_sn  # [BLOCK_N]
        for m0 in range(start + j * BLOCK_M, end, splits * BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < end
            x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (tl.zeros is a jit helper: not under a late interpreter)
            for g in range(0, K // GROUP):
                col = g * GROUP + 2 * rk
                x_even = tl.load(x_row + col[None, :], mask=m_ok[:, None], other=0.0)
                x_odd = tl.load(x_row + col[None, :] + 1, mask=m_ok[:, None], other=0.0)
                packed = tl.load(q_base + (g * HALF + rk)[:, None], mask=n_ok[None, :], other=0)  # [HALF, BLOCK_N]
                lo = ((packed & 0xF).to(tl.int32) - 8).to(tl.float32).to(x_even.dtype)
                hi = ((packed >> 4).to(tl.int32) - 8).to(tl.float32).to(x_even.dtype)
                if WIDEN:  # the interpreter's tl.dot gets bf16 wrong (numpy has no bf16): fp32 tiles there
                    x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                    lo, hi = lo.to(tl.float32), hi.to(tl.float32)
                if IEEE:
                    part = tl.dot(x_even, lo, input_precision="ieee") + tl.dot(x_odd, hi, input_precision="ieee")
                else:
                    part = tl.dot(x_even, lo) + tl.dot(x_odd, hi)
                scale = tl.load(s_base + g, mask=n_ok, other=0.0).to(tl.float32)
                acc += part * scale[None, :]
            y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return int4_grouped_mm_kernel


def _blocks(m: int, groups: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, row splits) from the shapes alone (no host sync): small row tiles when the average group
    has few rows (a decode step's experts), and enough row splits that a group twice the average size is still
    spread over programs. fp32 tiles stop at 32 rows (64 spill registers)."""
    avg = max(1, m // max(groups, 1))
    block_m = 16 if avg <= 16 else 32 if avg <= 32 or dtype == torch.float32 else 64
    block_n = 64 if n >= 64 else 32 if n >= 32 else 16
    msplit = max(1, min(math.ceil(m / block_m), math.ceil(2 * avg / block_m), MAX_SPLITS))
    return block_m, block_n, msplit


def grouped_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] · dequant(q[e], s[e])ᵀ per group (see the module docstring) -> [M, N] in x's dtype. Rows past
    offs[-1] are zero. The caller checks `available` first."""
    if qdata.dim() == 2:
        qdata, scale = qdata[None], scale[None]
    E, N, half = qdata.shape
    K = 2 * half
    if x.dim() != 2 or x.shape[1] != K or scale.shape[:2] != (E, N) or K % scale.shape[2]:
        raise ValueError(f"int4 grouped_mm: x {tuple(x.shape)}, q {tuple(qdata.shape)}, s {tuple(scale.shape)}")
    if offs.shape != (E,):
        raise ValueError(f"int4 grouped_mm: {E} groups but offs has shape {tuple(offs.shape)}")
    group = K // scale.shape[2]
    x = x.contiguous()
    qdata, scale = qdata.contiguous(), scale.contiguous()
    bounds = torch.cat([offs.new_zeros(1), offs]).to(torch.int32)
    M = x.shape[0]
    y = torch.zeros(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    block_m, block_n, msplit = _blocks(M, E, N, x.dtype)
    grid = (math.ceil(N / block_n), E, msplit)
    _kernel(interpreting())[grid](x, qdata, scale, bounds, y, M, N, K,
                    x.stride(0), qdata.stride(0), qdata.stride(1), scale.stride(0), scale.stride(1), y.stride(0),
                    GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=x.dtype == torch.float32,
                    WIDEN=interpreting() and x.dtype == torch.bfloat16)
    return y


def grouped_mm_twin(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` in plain PyTorch: each group's weight dequantized (fp32), multiplied in fp32."""
    from .quant import dequantize_int4

    if qdata.dim() == 2:
        qdata, scale = qdata[None], scale[None]
    out = torch.zeros(x.shape[0], qdata.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end].float() @ dequantize_int4(qdata[g], scale[g], torch.float32).t()
        start = end
    return out.to(x.dtype)
