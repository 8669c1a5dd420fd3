"""The DiffusionGemma text backbone: one weight set, one forward (spec §3).

`forward(batch, cache, sc)` runs the layer stack once over packed tokens of any mix: encode tokens (causal, they
write the KV cache for good) and canvas tokens (bidirectional over [cached prefix ; canvas], spec §3.3). Offline
generation, the serving engine and the trainer all call it. `encode` / `denoise` are the rectangular forms the
reference API and the tests use. Parameter names equal the HF decoder keys minus `model.decoder.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from . import ops
from .batch import Batch, Plan
from .cache import KVCache
from .layers import MLP, Layer, RMSNorm, rms_norm, rope_inv_freq


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))


class SelfConditioning(MLP):
    """Decoder-only input block (spec §3.3): x0 = RMSNorm∅(embed + MLP(RMSNorm_pre(s)))."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def condition(self, e: torch.Tensor, s: torch.Tensor | None, pad: ops.Pad | None = None) -> torch.Tensor:
        if s is None:  # zero signal: MLP(pre_norm(0)) is exactly 0
            return rms_norm(e, self.eps)
        return rms_norm(e + self.forward(self.pre_norm(s), pad), self.eps)


class Backbone(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self.softcap = cfg.final_logit_softcapping
        # RoPE inverse frequencies per layer type (each type has its own head dim, spec §2.3)
        self.inv_freq = {t: rope_inv_freq(cfg.rope_parameters[t], cfg.layer_head_dim(cfg.layer_types.index(t)))
                         for t in sorted(set(cfg.layer_types))}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed_scale(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """√H as an fp32 scalar cast to the model dtype (53.0 in bf16 for H=2816, spec §1.3). Made on `device` by
        a fill, not copied there: a host-to-device copy would make the host wait for the GPU."""
        return torch.full((), math.sqrt(self.cfg.hidden_size), dtype=torch.float32, device=device).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens.weight) * self.embed_scale(ids.device)

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, cache: KVCache, sc: torch.Tensor | None = None, numerics: str = "reference",
                pad: ops.Pad | None = None):
        """The one forward: hidden states [T, H] (before the final norm) of `batch`'s tokens.

        sc: the self-conditioning signal [n_canvas, H] of the canvas tokens (`soft_embed`), None for none.
        numerics: "reference" (HF's arithmetic, rectangular batches) or "fast" (any packing, batch-invariant;
        `pad`: the product padding, `ops.gemm_pad` by default)."""
        if next(iter(self.inv_freq.values())).device != batch.ids.device:  # moved once, not copied per pass
            self.inv_freq = {t: f.to(batch.ids.device) for t, f in self.inv_freq.items()}
        plan = Plan(batch, cache, self.cfg, self.inv_freq, self.dtype, numerics, pad)
        x = self.embed(batch.ids)
        n = batch.n_canvas
        if n:
            xc = self.self_conditioning.condition(x[:n], sc, plan.pad)
            x = xc if n == x.shape[0] else torch.cat([xc, x[n:]])
        for li, layer in enumerate(self.layers):
            x = layer(x, plan.rope[self.cfg.layer_types[li]], plan, cache)
        return x

    def logits(self, x: torch.Tensor, pad: ops.Pad | None = None) -> torch.Tensor:
        """Final norm, tied head on the raw embedding, fp32, softcap (spec §2.9)."""
        h = self.norm(x)
        out = ops.linear(h.reshape(-1, h.shape[-1]), self.embed_tokens.weight, pad).float()
        out = out.view(*h.shape[:-1], -1)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def soft_embed(self, z: torch.Tensor) -> torch.Tensor:
        """Self-conditioning signal (spec §3.3): softmax(z) · E · √H, with z cast to the model dtype first.
        [.., V] -> [.., H]: all a request keeps between steps, not its [L, V] logits. z beyond the dtype's range
        (float16 at a temperature near 0) is clamped to it first: the plain cast would give inf, and softmax NaN."""
        if z.dtype != self.dtype and z.is_floating_point():
            big = torch.finfo(self.dtype).max
            z = z.clamp(-big, big)
        p = torch.softmax(z.to(self.dtype), dim=-1, dtype=torch.float32).to(self.dtype)
        return self.soft_embed_probs(p)

    def soft_embed_probs(self, p: torch.Tensor, pad: ops.Pad | None = None) -> torch.Tensor:
        """probabilities [.., V] (model dtype) · E · √H."""
        if pad is None:
            out = torch.matmul(p, self.embed_tokens.weight)
        else:
            out = ops.linear(p.reshape(-1, p.shape[-1]), self.embed_tokens.weight.t(), pad).view(*p.shape[:-1], -1)
        return out * self.embed_scale(p.device)

    # -- the rectangular forms (the reference generate loop, the API's lower level, tests) ---------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.dtype, self.device)

    def encode(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
               final_norm: bool = False) -> torch.Tensor:
        """Causal pass over new tokens `ids` [B, S] at positions [P, P+S) (P = cache.length, shared by the rows);
        writes their K/V. attention_mask [B, S] marks real (True) vs left-padding (False) tokens."""
        B, S = ids.shape
        P = cache.length
        cache.reserve(S)
        if attention_mask is not None:
            cache.valid[:B, P:P + S] = attention_mask.to(device=cache.valid.device, dtype=torch.bool)
        x = self.forward(Batch.rectangle(ids, P, canvas=False), cache).view(B, S, -1)
        cache.length = P + S
        return self.norm(x) if final_norm else x

    def denoise(self, canvas: torch.Tensor, cache: KVCache, sc: torch.Tensor | None = None,
                sc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over `canvas` [B, L] reading the cache (left unchanged); fp32 logits [B, L, V].
        sc: soft embeddings [B, L, H] (None on the first step); sc_mask [B] zeroes it per row."""
        B, L = canvas.shape
        cache.reserve(L)  # room for the canvas's scratch K/V
        if sc is not None and sc_mask is not None:
            sc = sc * sc_mask.to(sc.dtype)[:, None, None]
        x = self.forward(Batch.rectangle(canvas, cache.length, canvas=True), cache,
                         None if sc is None else sc.reshape(B * L, -1))
        return self.logits(x).view(B, L, -1)
