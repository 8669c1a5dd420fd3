"""The DiffusionGemma text backbone: one weight set, two modes (spec §3).

`encode()` is causal and the only writer of the KV cache; `denoise()` is bidirectional over
[cached prefix ; canvas] and never writes it. Parameter names equal the HF decoder keys minus `model.decoder.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, TextConfig
from .cache import KVCache
from .layers import (Layer, RMSNorm, feature_major, gated_mlp, rms_norm_noscale, rope_cos_sin, rope_inv_freq,
                     token_major)
from . import native_ops
from .traced import run_denoise


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))


class SelfConditioning(nn.Module):
    """Decoder-only input block (spec §3.3): x0 = RMSNorm∅(embed + MLP(RMSNorm_pre(s)))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.eps = cfg.rms_norm_eps

    def forward(self, e: torch.Tensor, s: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask [B] (optional) zeroes the signal per row, exactly like passing no signal for that row."""
        if s is not None and mask is not None:
            s = s * mask.to(s.dtype)[:, None, None]
        if s is None:  # zero signal: MLP(pre_norm(0)) is exactly 0, so skip it
            return rms_norm_noscale(e, self.eps)
        n = self.pre_norm(s)
        return rms_norm_noscale(e + gated_mlp(n, self.gate_proj, self.up_proj, self.down_proj), self.eps)


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
        self._inv_freq: dict[str, torch.Tensor] = {}
        for t in sorted(set(cfg.layer_types)):
            i = cfg.layer_types.index(t)
            self._inv_freq[t] = rope_inv_freq(cfg.rope_parameters[t], cfg.layer_head_dim(i))
        self._types = sorted(set(cfg.layer_types))  # a fixed order of the layer types
        self._type_index = [self._types.index(t) for t in cfg.layer_types]
        self._traced: dict = {}  # TorchScript traces of denoise_body (model/traced.py)
        self._scale_cache: dict[tuple, torch.Tensor] = {}
        self._canvas_rope: dict[tuple, list[torch.Tensor]] = {}  # (start, length, device, dtype, mode) -> cos/sin

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the traces behind (a copy traces its own weights when it runs)."""
        state = self.__dict__.copy()
        state["_traced"], state["_traced_ident"], state["_canvas_rope"] = {}, None, {}
        return state

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed_scale(self) -> torch.Tensor:
        """√H as an fp32 scalar cast to the model dtype (53.0 in bf16 for H=2816, spec §1.3). Made once per dtype,
        so a traced pass holds it as a constant instead of recording a tensor construction."""
        key = (self.dtype, torch.is_inference_mode_enabled())  # an inference tensor cannot be saved for backward
        c = self._scale_cache.get(key)
        if c is None:
            c = self._scale_cache[key] = torch.tensor(math.sqrt(self.cfg.hidden_size),
                                                      dtype=torch.float32).to(self.dtype)
        return c

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens.weight) * self.embed_scale().to(ids.device)

    def _rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: rope_cos_sin(f, positions, self.dtype) for t, f in self._inv_freq.items()}

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [B, Sq, Sk] -> additive mask [B, 1, Sq, Sk] (0 or dtype-min, as the reference's eager path)."""
        m = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        m.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return m[:, None]

    # ----------------------------------------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
               final_norm: bool = False) -> torch.Tensor:
        """Causal pass over new tokens `ids` [B, S] at positions [P, P+S); appends their K/V to `cache`.

        attention_mask [B, S] marks real (True) vs padding (False) tokens among the new ones."""
        B, S = ids.shape
        P = cache.length
        cache.reserve(S)
        dev = ids.device
        cache.valid[:, P:P + S] = True if attention_mask is None else attention_mask.to(torch.bool)
        pos = torch.arange(P, P + S, device=dev)
        rope = self._rope(pos)
        # masks per layer type over keys [lo, P+S): j <= i, valid[j], and j > i - W on sliding layers
        masks: dict[str, torch.Tensor] = {}
        for t in set(self.cfg.layer_types):
            layer = self.cfg.layer_types.index(t)
            lo = cache.start(layer, P)
            j = torch.arange(lo, P + S, device=dev)
            allowed = j[None, :] <= pos[:, None]
            if t == SLIDING:
                allowed = allowed & (j[None, :] > pos[:, None] - self.cfg.sliding_window)
            allowed = allowed[None] & cache.valid[:, None, lo:P + S]
            masks[t] = self._additive(allowed)
        x = self.embed(ids)
        for li, layer in enumerate(self.layers):
            t = self.cfg.layer_types[li]
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), *rope[t])
            cache.keys[li][:, :, P:P + S] = k
            cache.values[li][:, :, P:P + S] = v
            lo = cache.start(li, P)
            x = layer.finish(x, q, cache.keys[li][:, :, lo:P + S], cache.values[li][:, :, lo:P + S], masks[t],
                             layer.enc_layer_scalar)
        cache.length = P + S
        return self.norm(x) if final_norm else x

    def soft_embed(self, z: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Self-conditioning signal (spec §3.3): softmax(z) · E · √H, with z cast to the model dtype first.
        Returns [B, L, H]: this is all a request needs to keep between steps, not its [L, V] logits.
        probs: softmax(z, dtype=float32) when the caller has it and the model is fp32 (the same tensor)."""
        if probs is not None and self.dtype == torch.float32 and z.dtype == torch.float32:
            p = probs
        else:
            p = torch.softmax(z.to(self.dtype), dim=-1, dtype=torch.float32).to(self.dtype)
        return torch.matmul(p, self.embed_tokens.weight) * self.embed_scale().to(z.device)

    def denoise(self, canvas: torch.Tensor, cache: KVCache, sc: torch.Tensor | None = None,
                sc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over `canvas` [B, L] reading the cache; returns fp32 logits [B, L, V].

        sc: soft embeddings [B, L, H] from `soft_embed` (None on the first step); sc_mask [B] zeroes it per row.
        Without gradients on the CPU the pass runs as a TorchScript trace of `denoise_body` (dgemma/model/traced.py):
        the same ATen kernels in the same order, so the same bits, without Python in between."""
        B, L = canvas.shape
        P = cache.length
        dev = canvas.device
        rkey = (P, L, dev, self.dtype, torch.is_inference_mode_enabled())  # inference tensors stay in their mode
        rope = self._canvas_rope.get(rkey)
        if rope is None:  # the same positions for every step of a canvas: computed once
            if len(self._canvas_rope) >= 64:
                self._canvas_rope.clear()
            cos_sin = self._rope(torch.arange(P, P + L, device=dev))
            rope = self._canvas_rope[rkey] = [x for t in self._types for x in cos_sin[t]]
        masks: list[torch.Tensor | None] = []
        for t in self._types:
            lo = cache.start(self.cfg.layer_types.index(t), P)
            prefix = cache.valid[:, lo:P]
            if bool(prefix.all()):
                masks.append(None)  # no padding: no mask at all (as the reference)
            else:
                allowed = torch.cat([prefix, prefix.new_ones(B, L)], dim=1)[:, None, :].expand(B, L, P - lo + L)
                masks.append(self._additive(allowed))
        kv = []
        for li in range(len(self.layers)):
            lo = cache.start(li, P)
            kv += [cache.keys[li][:, :, lo:P], cache.values[li][:, :, lo:P]]
        return run_denoise(self, canvas, sc, sc_mask, rope, masks, kv)

    def denoise_body(self, canvas: torch.Tensor, sc: torch.Tensor | None, sc_mask: torch.Tensor | None,
                     rope: list[torch.Tensor], masks: list[torch.Tensor | None], kv: list[torch.Tensor]) -> torch.Tensor:
        """The decoder pass proper, a function of tensors only (what gets traced). rope: cos, sin per layer type
        (in `_types` order); masks: additive mask or None per layer type; kv: cached prefix K, V per layer."""
        x = self.self_conditioning(self.embed(canvas), sc, sc_mask)
        for li, layer in enumerate(self.layers):
            ti = self._type_index[li]
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), rope[2 * ti], rope[2 * ti + 1])
            kk = torch.cat([kv[2 * li], k], dim=2)
            vv = torch.cat([kv[2 * li + 1], v], dim=2)
            x = layer.finish(x, q, kk, vv, masks[ti], layer.layer_scalar)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, tied head on the raw embedding, fp32, softcap (spec §2.9)."""
        h = self.norm(x)
        divided = False
        if feature_major() and h.dtype == torch.float32 and not h.requires_grad:
            out, divided = _head_feature_major(h, self.embed_tokens.weight, self.softcap)
        else:
            out = F.linear(h, self.embed_tokens.weight).float()
        if self.softcap:
            if out.requires_grad:  # training: autograd needs tanh's output intact
                out = torch.tanh(out / self.softcap) * self.softcap
            else:  # inference: the same arithmetic in place, without two [.., V] temporaries
                out = (out if divided else out.div_(self.softcap)).tanh_().mul_(self.softcap)
        return out

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.dtype, self.device)


def _head_feature_major(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, bool]:
    """The fp32 head product `F.linear(h, weight)` taken as W·hᵀ ([V, N], see `layers.feature_major_products`) and
    brought back to the usual contiguous [.., V] layout, on which `logits` applies the softcap. Returns (product,
    divided): with the native transposing copy (model/native_ops.py) the softcap's division is done on the way."""
    prod_t = torch.mm(weight, h.reshape(-1, h.shape[-1]).t())  # [V, N]
    if softcap and native_ops.transpose_usable(prod_t):
        return torch.ops.dgemma.transpose_div(prod_t, float(softcap)).view(h.shape[:-1] + (weight.shape[0],)), True
    return token_major(prod_t, h.shape[:-1]), False
