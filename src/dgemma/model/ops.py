"""The device seam: the few operations whose implementation depends on the device, dtype or numerics wanted.

Layers call these and nothing else device-specific:
- `attention`: "dense" is the reference's eager arithmetic (q·kᵀ + additive mask, fp32 softmax, ·v) over a
  rectangular batch; `sdpa` the same through `scaled_dot_product_attention` (the fast path on a CPU); "flex" is
  FlexAttention over any packing of segments, block-sparse, with the mask of `batch.py`. Flex visits a query's key blocks in a fixed order at fixed offsets inside its own KV slot, so its
  result does not depend on the other segments in the call or on the cache capacity (tested).
- `linear` / `grouped_mm` / `expert_mm`: matrix products; a quantized weight (`quant.QTensor`) runs its own
  product (FP8 scaled GEMMs on FP8 GPUs, else dequantized inside the call). With a `pad` table (the fast path) the row count of every product is
  raised to one whose rows get their canonical bits (see `gemm_pad_table`), so a row never depends on how many
  other rows share the product: batch invariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import quant

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense backend only
    BlockMask = flex_attention = None

KV_BLOCK = 128  # FlexAttention block size; KV slots are aligned to it so every slot sees the same block grid


# ------------------------------------------------------------------------------------------------------------
# matrix products
# ------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dgemma::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by group; w [G, in, out]; offs [G] int32 cumulative row counts. Rows past offs[-1] are
    undefined. One product per group: F.grouped_mm where the device and dtype have it, else a loop."""
    if hasattr(F, "grouped_mm"):
        try:
            return F.grouped_mm(x, w, offs=offs)
        except RuntimeError:
            pass  # unsupported dtype / alignment here (fp32 on CUDA): the loop below
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


def _grouped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    # d x = grad · wᵀ per group; d w[g] = x_gᵀ · grad_g
    gx = _grouped_mm(grad.contiguous(), w.transpose(1, 2).contiguous(), offs)
    if hasattr(F, "grouped_mm"):  # one product grouped along the rows: no host loop, no device sync
        try:
            return gx, F.grouped_mm(x.t(), grad, offs=offs).to(w.dtype), None
        except RuntimeError:
            pass  # unsupported dtype / alignment here: the loop below
    gw = torch.zeros_like(w)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            gw[g] = x[start:end].t() @ grad[start:end]
        start = end
    return gx, gw, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped product; under autocast the operands take the autocast dtype (the fused CUDA kernel takes bf16)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
    return _grouped_mm(x, w.to(x.dtype), offs)


@dataclass(frozen=True)
class Pad:
    """Row counts for batch-invariant products (see `gemm_pad`): `rows[m]` is the count a product of m rows runs at;
    `table` is the same on the device (for the experts' groups), `extra` the most any group grows."""

    rows: tuple[int, ...]
    table: torch.Tensor
    extra: int

    def __call__(self, m: int) -> int:
        return self.rows[m] if m < len(self.rows) else m


def linear(x: torch.Tensor, w: torch.Tensor | quant.QTensor, pad: Pad | None = None) -> torch.Tensor:
    """x [M, in] · wᵀ. With `pad`, M is raised to a row count whose rows get their canonical bits."""
    mm = w.linear if isinstance(w, quant.QTensor) else (lambda a: F.linear(a, w))
    m = x.shape[0] if pad is None else pad(x.shape[0])
    if m == x.shape[0]:
        return mm(x)
    return mm(F.pad(x, (0, 0, 0, m - x.shape[0])))[: x.shape[0]]


def expert_mm(x: torch.Tensor, w: torch.Tensor | quant.QTensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' product: x [M, in] (rows sorted by expert) · w[g]ᵀ for w [E, out, in]."""
    if isinstance(w, quant.QTensor):
        return quant.expert_mm(x, w, offs)
    return grouped_mm(x, w.transpose(-2, -1), offs)


_PADS: dict[tuple, Pad] = {}


def gemm_pad(dtype: torch.dtype, device: torch.device, limit: int = 64) -> Pad:
    """For each row count m < limit, the smallest m' ≥ m whose product gives every row the bits it gets in a large
    product. BLAS libraries switch kernels for small m (MKL fp32 on x86 with 2 threads: m in 1–3, 5–7, 9–11 give
    other bits), so without this a row's result would depend on its neighbours. Probed once per dtype, device and
    thread count on a plain and a grouped product (a few ms)."""
    device = torch.device(device)
    key = (dtype, device, torch.get_num_threads())
    if key in _PADS:
        return _PADS[key]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g).to(device=device, dtype=dtype)
    wg = w.t()[None].contiguous()
    x = torch.randn(4 * limit, 80, generator=g).to(device=device, dtype=dtype)
    ref = F.linear(x, w)
    ref_g = _grouped_mm(x, wg, torch.tensor([x.shape[0]], dtype=torch.int32, device=device))

    def safe(m: int) -> bool:
        offs = torch.tensor([m], dtype=torch.int32, device=device)
        return all(torch.equal(F.linear(x[o:o + m], w), ref[o:o + m])
                   and torch.equal(_grouped_mm(x[o:o + m], wg, offs)[:m], ref_g[o:o + m]) for o in (0, 3, 17))

    ok = [m == 0 or safe(m) for m in range(limit + 1)]
    rows = []
    for m in range(limit):
        up = m
        while up < limit and not ok[up]:
            up += 1
        rows.append(up)
    pad = Pad(tuple(rows), torch.tensor(rows, dtype=torch.long, device=device), max(r - m for m, r in enumerate(rows)))
    _PADS[key] = pad
    return pad


# ------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's eager attention (spec §2.5): q [B, nh, S, d], k/v [B, g, n, d] contiguous, additive mask
    [B, 1, S, n]; softmax(q kᵀ · 1.0 + mask) in fp32, cast back, · v. GQA repeats KV heads in interleave order.
    Returns [B·S, nh·d]."""
    B, nh, S, d = q.shape
    rep = nh // k.shape[1]
    if rep > 1:
        k = k[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
        v = v[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
    w = torch.matmul(q, k.transpose(2, 3)) + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2).reshape(B * S, nh * d)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention through `F.scaled_dot_product_attention` (a fused kernel, no [S, n] temporaries in
    Python, GQA without copying K/V): equal to `dense_attention` within float rounding, not bit for bit. A query's
    result depends only on its own keys, so it does not change with the batch or with masked keys appended in
    blocks of 512 (the CPU kernel's key block). Returns [B·S, nh·d]."""
    B, nh, S, d = q.shape
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=nh != k.shape[1])
    return o.transpose(1, 2).reshape(B * S, nh * d)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """q [T, nh, d]; k/v the layer's whole cache [1, g, slots·C, d]; -> [T, nh·d]. (q is made a contiguous 4-D
    tensor and the cache is stored 4-D: inductor's CPU template reads the shapes of its inputs' buffers.)"""
    T, nh, d = q.shape
    o = flex_attention(q.transpose(0, 1)[None].contiguous(), k, v, block_mask=block_mask, scale=1.0,
                       enable_gqa=nh != k.shape[1])
    return o[0].transpose(0, 1).reshape(T, nh * d)


def flex_available() -> bool:
    return flex_attention is not None
