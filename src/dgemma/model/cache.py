"""KV cache (spec §3.2): static per-layer buffers, one slot per request row.

Layer l holds K and V as [1, g, slots·C, d]: slot s's position p lives at index s·C + p, and C is a multiple of the
attention block size, so every slot sees the same block grid (batch invariance, `ops.py`). Keys are post-norm
post-RoPE, values normalised. Every layer stores every position; a sliding layer *reads* only the last W−1 cached
positions (exactly what HF's dynamic cache retains). Encode tokens write their K/V here for good; canvas tokens
write theirs at [start, start + L) as scratch, which the encode of the committed canvas later overwrites.
`valid[s, p]` is False for left padding (reference batches only).
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from .ops import KV_BLOCK


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.cfg = cfg
        self.slots = slots
        self.capacity = -(-max(capacity, 1) // KV_BLOCK) * KV_BLOCK
        n = slots * self.capacity
        self.k = [torch.zeros(1, cfg.layer_kv_heads(i), n, cfg.layer_head_dim(i), dtype=dtype, device=device)
                  for i in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.ones(slots, self.capacity, dtype=torch.bool, device=device)
        self.length = 0  # tokens cached in every slot (the rectangular API: encode / denoise)

    @staticmethod
    def bytes_per_token(cfg: TextConfig, dtype: torch.dtype) -> int:
        """K and V bytes one position takes over all layers."""
        return sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) for i in range(cfg.num_hidden_layers)) \
            * dtype.itemsize

    def index(self, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return slot * self.capacity + pos

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, g, d] at flat indices [T]. In place, except while autograd records (training): then the
        layer's buffers are replaced by written copies, so earlier passes keep what they read."""
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        if self.k[layer].requires_grad or (torch.is_grad_enabled() and k.requires_grad):
            self.k[layer] = self.k[layer].index_copy(2, index, k[None])
            self.v[layer] = self.v[layer].index_copy(2, index, v[None])
        else:
            self.k[layer].index_copy_(2, index, k[None])
            self.v[layer].index_copy_(2, index, v[None])

    def rows(self, layer: int, slots: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous k, v [B, g, hi − lo, d] of slots [B] over positions [lo, hi)."""
        _, g, _, d = self.k[layer].shape

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.view(g, self.slots, self.capacity, d).index_select(1, slots)[:, :, lo:hi].transpose(0, 1)

        return take(self.k[layer]).contiguous(), take(self.v[layer]).contiguous()

    def reserve(self, n: int) -> None:
        """Room for `length + n` positions per slot (the rectangular API grows the buffers if needed)."""
        if self.length + n <= self.capacity:
            return
        new = KVCache(self.cfg, self.slots, max(self.length + n, 2 * self.capacity), self.k[0].dtype,
                      self.k[0].device)
        for old, fresh in ((self.k, new.k), (self.v, new.v)):
            for i, t in enumerate(old):
                _, g, _, d = t.shape
                fresh[i].view(g, self.slots, new.capacity, d)[:, :, :self.capacity] = t.view(g, self.slots, -1, d)
        new.valid[:, :self.capacity] = self.valid
        self.capacity, self.k, self.v, self.valid = new.capacity, new.k, new.v, new.valid

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
