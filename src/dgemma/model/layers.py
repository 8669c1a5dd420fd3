"""The Gemma 4 MoE layer (spec §2), written once for every caller: tokens come packed as [T, H], whatever mix of
requests, encode segments and canvases they belong to (`batch.py` says which is which).

Parameter names match the HF decoder keys. Numerics follow the reference where it matters for bit-parity: RMSNorm
in fp32, an fp32 router, the experts' top-k outputs summed in fp32. Everything device-specific (attention backend,
padded products) goes through `ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from . import ops


class RMSNorm(nn.Module):
    """`x · (mean(x²) + ε)^-½ · w` in fp32, cast back (spec §2.1). The scale is `w`, not `1 + w`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm with an optional scale; without one it is the weightless RMSNorm∅ (v, router, decoder input).
    torch's fused kernel computes the reference's `x · (mean(x²) + ε)^-½ · w` with the same bits on a CPU."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps)
    return h.type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (spec §2.3). `proportional` rotates only the first `int(p·d//2)` pairs, with the
    exponent over the full head dim; the remaining frequencies are 0 (those dimensions pass through)."""
    base = float(params["rope_theta"])
    if params.get("rope_type", "default") == "proportional":
        r = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * r, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - r, device="cpu")]) if head_dim // 2 > r else rotated
        return inv / float(params.get("factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [T] (int) -> cos, sin [T, d] in `dtype` (fp32 angles, cast after)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; half-split rotation `x·cos + rot(x)·sin`, rot([a, b]) = [-b, a]; cos/sin [T, d]."""
    cos, sin = cos[:, None], sin[:, None]
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class MLP(nn.Module):
    """Gated GELU-tanh MLP (spec §2.4): down(gelu(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor, pad: ops.Pad | None = None) -> torch.Tensor:
        g = ops.linear(x, self.gate_proj.weight, pad)
        return ops.linear(gelu_tanh(g) * ops.linear(x, self.up_proj.weight, pad), self.down_proj.weight, pad)


class Attention(nn.Module):
    """q/k/v norms, RoPE, scale 1.0, GQA (spec §2.5); full layers have no v_proj (V = k_proj output, weightless
    norm, no RoPE). The new keys and values are written to the cache, then every query attends over its own
    visible keys there."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H = cfg.hidden_size
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.layer_head_dim(layer)
        self.n_kv = cfg.layer_kv_heads(layer)
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = None if cfg.is_full(layer) else nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, rope, plan, cache) -> torch.Tensor:
        """h [T, H] (already input-normed) -> [T, H]. `plan` (batch.Plan) holds the masks and where tokens go."""
        T, pad = h.shape[0], plan.pad
        q = ops.linear(h, self.q_proj.weight, pad).view(T, self.n_heads, self.head_dim)
        k_raw = ops.linear(h, self.k_proj.weight, pad).view(T, self.n_kv, self.head_dim)
        v_raw = k_raw if self.v_proj is None else ops.linear(h, self.v_proj.weight, pad).view(T, self.n_kv, -1)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k_raw), *rope)
        v = rms_norm(v_raw, self.eps)
        cache.write(self.layer, plan.kv_index, k, v)
        return ops.linear(plan.attend(self.layer, q, cache), self.o_proj.weight, pad)


class Router(nn.Module):
    """Top-k routing from the un-normalised residual (spec §2.6). Weights stay fp32."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.root = H ** -0.5
        self.proj = nn.Linear(H, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor, pad: ops.Pad | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = rms_norm(x, self.eps) * self.scale * self.root
        probs = F.softmax(ops.linear(h, self.proj.weight, pad), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """E gated experts as 3-D tensors (spec §2.7): gate_up [E, 2·Ie, H] (gate rows first), down [E, H, Ie].

    The (token, slot) pairs are sorted by expert and each expert runs one product over its rows; slot outputs are
    weighted and summed over the K slots in fp32, then cast once (HF's default grouped_mm numerics). With a pad
    table (the fast path) each expert's group is padded with zero rows to a row count whose rows get their
    canonical bits, so a token's result does not depend on the other tokens routed to its experts."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, H, Ie = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Ie))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                pad: ops.Pad | None = None) -> torch.Tensor:
        T, K = idx.shape
        E = self.num_experts
        flat = idx.reshape(-1)
        sorted_ids, perm = torch.sort(flat, stable=pad is not None)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        # (not bincount: on CUDA it reads the largest id back to the host, a sync per layer)
        grow = pad is not None and pad.extra > 0
        if not grow:  # rows in sorted order, groups as they come
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            xs = x[perm // K]
        else:  # rows placed in groups padded with zero rows to safe sizes, in a buffer of static size
            limit = pad.table.numel()
            padded = torch.where(counts < limit, pad.table[counts.clamp(max=limit - 1)], counts)
            ends = torch.cumsum(padded, 0)
            rank = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
            rows = (ends - padded)[sorted_ids] + rank  # buffer row of the i-th sorted pair
            xs = x.new_zeros(flat.numel() + E * pad.extra, x.shape[1]).index_copy(0, rows, x[perm // K])
            offs = ends.to(torch.int32)
        u = ops.expert_mm(xs, self.gate_up_proj, offs)
        gate, up = u.chunk(2, dim=-1)
        y = ops.expert_mm(gelu_tanh(gate) * up, self.down_proj, offs)
        y = (y[rows] if grow else y) * weights.reshape(-1)[perm].unsqueeze(-1)  # fp32 (weights are fp32)
        out = torch.empty_like(y).index_copy(0, perm, y)
        return out.view(T, K, -1).sum(dim=1).to(x.dtype)


class Layer(nn.Module):
    """One layer (spec §2.8): attention, then dense MLP and MoE in parallel, then `layer_scalar` on the stream.
    Encoder and decoder tokens run this same module; they differ only in the layer scalar (`enc_layer_scalar` for
    encode tokens)."""

    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
             "pre_feedforward_layernorm_2")

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for n in self.NORMS:
            setattr(self, n, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("enc_layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, rope, plan, cache) -> torch.Tensor:
        pad = plan.pad
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, plan, cache))
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x), pad))
        w, idx = self.router(x, pad)
        h2 = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(x), w, idx, pad))
        x = x + self.post_feedforward_layernorm(h1 + h2)
        n = plan.n_canvas  # tokens [0, n) are canvas (decoder) tokens, the rest encode (encoder) tokens
        if n == x.shape[0]:
            return x * self.layer_scalar
        if n == 0:
            return x * self.enc_layer_scalar
        return torch.cat([x[:n] * self.layer_scalar, x[n:] * self.enc_layer_scalar])


def init_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random init for fresh checkpoints: N(0, std) for matrices, ones for norms, scales and layer scalars."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.fill_(1.0)
        for name, b in module.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
