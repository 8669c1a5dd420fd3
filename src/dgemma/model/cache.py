"""KV cache (spec §3.2): preallocated per-layer buffers written only by the encoder.

Keys are post-norm post-RoPE, values normalised. Every layer stores all positions; a sliding layer *reads* only the
last W−1 cached positions (exactly what HF's dynamic cache retains), so results match the reference.
`valid[b, j]` is the 2-D attention mask of cached position j (False for left padding).
"""

from __future__ import annotations

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.window = cfg.sliding_window
        self.full = [cfg.is_full(i) for i in range(cfg.num_hidden_layers)]
        self.keys = [torch.zeros(batch, cfg.layer_kv_heads(i), capacity, cfg.layer_head_dim(i), dtype=dtype,
                                 device=device) for i in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def start(self, layer: int, end: int) -> int:
        """First cached index visible to a query block whose cached prefix ends at `end` (exclusive)."""
        return 0 if self.full[layer] else max(0, end - (self.window - 1))

    def reserve(self, n: int) -> None:
        """Make room for `n` more tokens, growing the buffers if needed."""
        need = self.length + n
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        grow = new_cap - self.capacity
        for buf in (self.keys, self.values):
            for i, t in enumerate(buf):
                buf[i] = torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, grow)], dim=1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
