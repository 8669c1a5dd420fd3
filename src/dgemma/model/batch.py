"""What one forward pass is made of: packed tokens with explicit metadata, and the attention plan built from them.

A forward takes T tokens, each with a position, a KV slot (its request row) and a visible key range inside its
slot: an encode token (a prompt or a committed canvas: causal, spec §3.2) sees positions [.., pos]; a canvas token
(bidirectional, spec §3.3) sees the cached prefix before its canvas and the whole canvas, [.., start + L). On
sliding layers the range starts at `anchor − (W − 1)`, the anchor being the token's own position (encode) or its
canvas's start (canvas). Canvas tokens come first in the packing, then encode tokens.

Two numerics:
- "reference": the dense backend (the reference's eager attention over a rectangular batch) and plain products:
  the arithmetic of HF transformers, bit for bit on the CPU.
- "fast": padded products (`ops.Pad`) and an attention whose result for a token does not depend on the other
  tokens in the pass: FlexAttention on CUDA (block-sparse, any packing); on a CPU `scaled_dot_product_attention`
  over the first keys of each row's KV slot, fixed shapes per row (the packing must then be rectangles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SLIDING, TextConfig
from . import ops
from .cache import KVCache
from .layers import rope_cos_sin


@dataclass
class Batch:
    ids: torch.Tensor  # [T] token ids
    pos: torch.Tensor  # [T] absolute positions (RoPE and the KV index)
    slot: torch.Tensor  # [T] KV cache slot
    anchor: torch.Tensor  # [T] sliding-window anchor: own position (encode) or canvas start (canvas)
    hi: torch.Tensor  # [T] keys at positions < hi are visible (an empty range marks a padding token)
    n_canvas: int  # tokens [0, n_canvas) are canvas tokens
    # consecutive rectangles (B, S) of the packing: B rows of S tokens, each row in one slot (the dense backends)
    rects: tuple[tuple[int, int], ...] | None = None
    span: tuple[int, int] | None = None  # one rectangle: the lowest anchor and highest hi in it (host ints)
    row_slot: torch.Tensor | None = None  # [T] the slot of each token's rectangle row (default: `slot`); padding
    # tokens inside a row write their K/V elsewhere (the scratch slot), so their `slot` may differ from the row's

    @property
    def rect(self) -> tuple[int, int] | None:
        return self.rects[0] if self.rects is not None and len(self.rects) == 1 else None

    @staticmethod
    def rectangle(ids: torch.Tensor, start: int | torch.Tensor, canvas: bool, span: tuple[int, int] | None = None,
                  slots: torch.Tensor | None = None) -> "Batch":
        """B rows of S tokens at positions start + [0, S) (start: an int, or one per row with `span` given as
        (min start, max start + S)). Canvas rows see their whole row; encode rows are causal."""
        B, S = ids.shape
        dev = ids.device
        if isinstance(start, int):  # a fill on the device, not a host-to-device copy (which waits for the GPU)
            start_t = torch.full((B, 1), start, dtype=torch.long, device=dev)
        else:
            start_t = start.to(dev).reshape(-1, 1).expand(B, 1)
        pos = (start_t + torch.arange(S, device=dev)).reshape(-1)
        if span is None:
            span = (int(start), int(start) + S)
        slot = (torch.arange(B, device=dev) if slots is None else slots.to(dev)).repeat_interleave(S)
        anchor = start_t.expand(B, S).reshape(-1) if canvas else pos
        hi = anchor + S if canvas else pos + 1
        return Batch(ids.reshape(-1), pos, slot, anchor, hi, B * S if canvas else 0, ((B, S),), span)


SLOT_KEYS = 512  # eager CPU attention reads a slot's keys in multiples of this


class Plan:
    """Per-pass attention state shared by all layers: RoPE tables and masks per layer type, KV write indices, the
    product padding. Built once per forward."""

    def __init__(self, batch: Batch, cache: KVCache, cfg: TextConfig, inv_freq: dict[str, torch.Tensor],
                 dtype: torch.dtype, numerics: str, pad: ops.Pad | None = None):
        if numerics not in ("reference", "fast"):
            raise ValueError(f"numerics={numerics!r}; expected 'reference' or 'fast'")
        self.cfg, self.batch, self.n_canvas = cfg, batch, batch.n_canvas
        self.dense = numerics == "reference"
        self.pad = None if self.dense else (pad or ops.gemm_pad(dtype, batch.ids.device))
        self.flex = not self.dense and batch.ids.device.type == "cuda"
        if not self.dense and not self.flex and batch.rects is None:
            raise ValueError("eager fast attention on a CPU needs the batch as rectangles (Batch.rects)")
        self.kv_index = cache.index(batch.slot, batch.pos)
        self.rope = {t: rope_cos_sin(f, batch.pos, dtype) for t, f in inv_freq.items()}
        self.masks = {}
        W = cfg.sliding_window
        for t in set(cfg.layer_types):
            lo = (batch.anchor - (W - 1)).clamp(min=0) if t == SLIDING else torch.zeros_like(batch.anchor)
            if self.dense:
                self.masks[t] = self._dense_mask(batch, cache, lo, t == SLIDING, dtype)
            elif self.flex:
                self.masks[t] = _block_mask(batch.slot, lo, batch.hi, cache.capacity, cache.slots)
            else:
                self.masks[t] = self._slot_masks(batch, cache, lo, dtype)

    def _dense_mask(self, batch: Batch, cache: KVCache, lo: torch.Tensor, sliding: bool, dtype: torch.dtype):
        """The keys [k_lo, k_hi) every row reads and the additive mask (0 or dtype-min, as the reference's eager
        path) [B, 1, S, k_hi − k_lo] for them."""
        if batch.rect is None:
            raise ValueError("the dense (reference) attention needs a rectangular batch")
        B, S = batch.rect
        k_lo = max(0, batch.span[0] - (self.cfg.sliding_window - 1)) if sliding else 0
        k_hi = batch.span[1]
        slots = batch.slot.view(B, S)[:, 0]
        j = torch.arange(k_lo, k_hi, device=lo.device)
        allowed = (j >= lo.view(B, S, 1)) & (j < batch.hi.view(B, S, 1))
        allowed &= cache.valid.index_select(0, slots)[:, None, k_lo:k_hi]
        m = torch.zeros(allowed.shape, dtype=dtype, device=lo.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        return slots, k_lo, k_hi, m[:, None]

    def _slot_masks(self, batch: Batch, cache: KVCache, lo: torch.Tensor, dtype: torch.dtype):
        """Per rectangle: its rows' slots and the additive mask [B, 1, S, K] over the first K positions of each
        row's slot. K is the whole slot under torch.compile (static shapes), else the visible range rounded up to
        a multiple of 512: masked keys add exact zeros in whole key blocks of the CPU attention kernel, so the
        bits do not change (checked by the engine's batch-invariance tests)."""
        out, a = [], 0
        for B, S in batch.rects:
            n = B * S
            K = cache.capacity
            if not torch.compiler.is_compiling():
                K = min(K, max(SLOT_KEYS, -(-int(batch.hi[a:a + n].max()) // SLOT_KEYS) * SLOT_KEYS))
            j = torch.arange(K, device=lo.device)
            allowed = (j >= lo[a:a + n].view(B, S, 1)) & (j < batch.hi[a:a + n].view(B, S, 1))
            m = torch.zeros(allowed.shape, dtype=dtype, device=lo.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)
            rs = batch.slot if batch.row_slot is None else batch.row_slot
            out.append((rs[a:a + n].view(B, S)[:, 0], m[:, None]))
            a += n
        return out

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """q [T, nh, d] -> attention output [T, nh·d] over each token's visible keys in the cache."""
        mask = self.masks[self.cfg.layer_types[layer]]
        if self.flex:
            return ops.flex(q, cache.k[layer], cache.v[layer], mask)
        if not self.dense:  # every row attends over its whole slot: fixed shapes whatever else is in the pass
            parts, a = [], 0
            for slots, m in mask:
                B, S = m.shape[0], m.shape[2]
                k, v = cache.rows(layer, slots, 0, m.shape[3])
                parts.append(ops.sdpa(q[a:a + B * S].view(B, S, *q.shape[1:]).transpose(1, 2), k, v, m))
                a += B * S
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        slots, k_lo, k_hi, m = mask
        B, S = self.batch.rect
        k, v = cache.rows(layer, slots, k_lo, k_hi)
        return ops.dense_attention(q.view(B, S, *q.shape[1:]).transpose(1, 2), k, v, m)


def _block_mask(slot: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, C: int, slots: int):
    """FlexAttention block mask over the flattened cache [slots·C]: query t sees flat keys [slot·C + lo, slot·C + hi).
    Each query block visits the key blocks spanned by its queries' ranges, in order."""
    T, BLK = slot.numel(), ops.KV_BLOCK
    n_kv = slots * C
    real = hi > lo
    a = torch.where(real, slot * C + lo, n_kv)
    b = torch.where(real, slot * C + hi, 0)
    nq = -(-T // BLK)
    a = torch.nn.functional.pad(a, (0, nq * BLK - T), value=n_kv).view(nq, BLK).amin(1)
    b = torch.nn.functional.pad(b, (0, nq * BLK - T), value=0).view(nq, BLK).amax(1)
    first = a // BLK
    count = ((b + BLK - 1) // BLK - first).clamp(min=0)
    nkb = n_kv // BLK
    indices = (first[:, None] + torch.arange(nkb, device=slot.device)).clamp(max=nkb - 1)

    # one stacked tensor: inductor's CPU flex template needs its captured tensors to be plain buffers
    meta = torch.stack([slot, lo, hi])
    q_slot, q_lo, q_hi = meta[0], meta[1], meta[2]

    def mask_mod(b_, h_, q, kv):
        s = kv // C
        p = kv - s * C
        return (s == q_slot[q]) & (p >= q_lo[q]) & (p < q_hi[q])

    return ops.BlockMask.from_kv_blocks(count[None, None].to(torch.int32), indices[None, None].to(torch.int32),
                                        BLOCK_SIZE=(BLK, BLK), mask_mod=mask_mod, seq_lengths=(T, n_kv),
                                        compute_q_blocks=False)
