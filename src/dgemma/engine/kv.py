"""Paged KV cache for the engine: fixed-size blocks in per-layer pools, a block table per request.

Admission reserves a request's worst case (prompt + every canvas it may commit) up front, so a running request
never runs out of blocks and nothing needs preempting; blocks are mapped lazily as tokens are written and all
return to the pool when the request leaves.

Known limitation (next step): sliding layers keep every position like full layers, although they only read the
last W−1; a separate sliding-window pool would cut long-context KV memory by ~10× on the released model.
"""

from __future__ import annotations

import math

import torch

from ..config import TextConfig


class KVPool:
    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.window = cfg.sliding_window
        self.full = [cfg.is_full(i) for i in range(cfg.num_hidden_layers)]
        self.k = [torch.zeros(num_blocks, cfg.layer_kv_heads(i), block_size, cfg.layer_head_dim(i), dtype=dtype,
                              device=device) for i in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.reserved = 0  # blocks promised to admitted requests (mapped or not)

    @staticmethod
    def bytes_per_token(cfg: TextConfig, dtype: torch.dtype) -> int:
        return sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) for i in range(cfg.num_hidden_layers)) \
            * dtype.itemsize

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def available(self) -> int:
        return self.num_blocks - self.reserved

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def reserve(self, n: int) -> bool:
        if n > self.available:
            return False
        self.reserved += n
        return True


class SeqKV:
    """One request's KV: a block table into the pool and the number of cached tokens."""

    def __init__(self, pool: KVPool, reserved_blocks: int):
        self.pool = pool
        self.table: list[int] = []
        self.length = 0
        self.reserved = reserved_blocks

    def start(self, layer: int, end: int) -> int:
        """First cached position visible to queries whose cached prefix ends at `end` (spec §3.2/§3.3)."""
        return 0 if self.pool.full[layer] else max(0, end - (self.pool.window - 1))

    def map(self, start: int, n: int) -> None:
        """Map blocks for positions [start, start + n) (within the reservation)."""
        need = self.pool.blocks_for(start + n)
        while len(self.table) < need:
            if len(self.table) >= self.reserved:
                raise RuntimeError("KV reservation exceeded")  # an engine bug, never user input
            self.table.append(self.pool.free.pop())

    def _index(self, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n)
        bs = self.pool.block_size
        blocks = torch.tensor(self.table, dtype=torch.long)[pos // bs]
        return blocks.to(device), (pos % bs).to(device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """k, v [1, g, n, d] for positions [start, start + n)."""
        blk, off = self._index(start, k.shape[2], k.device)
        self.pool.k[layer][blk, :, off] = k[0].transpose(0, 1)
        self.pool.v[layer][blk, :, off] = v[0].transpose(0, 1)

    def read(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous k, v [1, g, hi − lo, d] for positions [lo, hi)."""
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        if hi <= lo:
            g, d = kp.shape[1], kp.shape[3]
            e = kp.new_zeros(1, g, 0, d)
            return e, e
        blk, off = self._index(lo, hi - lo, kp.device)
        return (kp[blk, :, off].transpose(0, 1).unsqueeze(0).contiguous(),
                vp[blk, :, off].transpose(0, 1).unsqueeze(0).contiguous())

    def release(self) -> None:
        self.pool.free.extend(reversed(self.table))
        self.pool.reserved -= self.reserved
        self.table, self.reserved, self.length = [], 0, 0
