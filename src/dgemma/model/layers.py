"""Building blocks of the Gemma 4 MoE layer (spec §2). Parameter names match the HF decoder keys.

Numerics follow the reference op for op where it matters for bit-parity: RMSNorm in fp32 with `pow(-0.5)`,
eager attention with an fp32 softmax, fp32 router, experts summed over the top-k slots in fp32.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class RMSNorm(nn.Module):
    """`x · (mean(x²) + ε)^-½ · w` in fp32, cast back (spec §2.1). The scale is `w`, not `1 + w`."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


def rms_norm_noscale(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class _Layout(threading.local):
    feature_major = False
    native = False
    tokens: int | None = None  # the pass's token count while tracing (a traced tensor's sizes are tensors)


_LAYOUT = _Layout()


def gelu_all_vector(numel: int) -> bool:
    """Does ATen's GELU over `numel` elements (rows of a multiple of 16) take its vector path for every element?
    Its CPU kernel splits work over threads above 16,384 elements with a grain of numel / threads; each piece is
    vectorised in blocks of 16 with a scalar tail (another tanh), so every piece must be a multiple of 16. Where it
    is, the GELU's bits do not depend on where an element sits, which the weight-first MLP and the native experts
    rely on."""
    if numel % 16:
        return False
    nt = torch.get_num_threads()
    grain = numel // nt if numel > 16384 else 32768
    if nt == 1 or numel <= grain:
        return True
    threads = min(nt, -(-numel // grain))
    return (-(-numel // threads)) % 16 == 0


@contextmanager
def _layout(tokens: int | None, **flags: bool):
    """Set this thread's flags (and the token count, when given) for the duration."""
    names = list(flags) + ["tokens"]
    old = [getattr(_LAYOUT, n) for n in names]
    for n, v in flags.items():
        setattr(_LAYOUT, n, v)
    if tokens is not None:
        _LAYOUT.tokens = tokens
    try:
        yield
    finally:
        for n, v in zip(names, old):
            setattr(_LAYOUT, n, v)


@contextmanager
def feature_major_products(tokens: int | None = None):
    """While active (in this thread), inference matrix products of the tied head and the dense MLPs with the weight as
    the left operand, W·xᵀ, where MKL is faster at batch 1 (the head: [V, H]·[H, 64] took 1.6 ms against 2.3-3.6 ms
    for x·Wᵀ on this 2-core VM). Every output is the same K-long dot product, and MKL gives the same bits in both
    orientations here, but that is a property of the BLAS, not a guarantee: only the CPU trace uses it, and a trace
    is kept only if its logits equal the eager pass's (model/traced.py), which takes the reference's orientation.
    tokens: the tokens per pass, for a pass being traced (whose sizes the tracer hands out as tensors)."""
    with _layout(feature_major=True, tokens=tokens):
        yield


def feature_major() -> bool:
    return _LAYOUT.feature_major


def native_active() -> bool:
    return _LAYOUT.native


@contextmanager
def native_cpu_ops(tokens: int | None = None):
    """While active (in this thread), inference on the CPU uses dgemma's native operators (model/native_ops.py)
    where they are usable: the MoE experts spread over threads, the head's transposing copy and a layer's norms,
    RoPE and residual adds, with torch's bits.
    Like `feature_major_products`, only the CPU trace uses it, and keeps a trace only if it gives the eager pass's
    logits.
    tokens: the tokens per pass, for a pass being traced (whose sizes the tracer hands out as tensors)."""
    with _layout(native=True, tokens=tokens):
        yield


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gated_mlp(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(gelu(gate(x)) ⊙ up(x)). Under `feature_major_products` (fp32, no gradients) the three products are taken
    weight-first with the activations feature-major in between ([I, N]: the GELU and the product are elementwise, so
    the layout does not change their bits), and one small transposing copy at the end; each GEMM is the same K-long
    dot product per output, which MKL gives the same bits here (checked by the trace, as for the head)."""
    n = _LAYOUT.tokens if _LAYOUT.tokens is not None or torch.jit.is_tracing() else x.numel() // x.shape[-1]
    if (_LAYOUT.feature_major and x.dtype == torch.float32 and not x.requires_grad and n is not None
            and gelu_all_vector(n * gate.out_features)):  # the GELU's bits must not depend on the layout
        xt = x.reshape(-1, x.shape[-1]).t()
        g = torch.mm(gate.weight, xt)
        a = gelu_tanh(g) * torch.mm(up.weight, xt)
        return token_major(torch.mm(down.weight, a), x.shape[:-1])  # [H, N] -> [.., H]
    return down(gelu_tanh(gate(x)) * up(x))


def token_major(prod_t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """A weight-first product [F, N] back in the usual contiguous layout [*lead, F] (N = the product of lead)."""
    view = prod_t.t().view(lead + (prod_t.shape[0],))
    return torch.empty(view.shape, dtype=prod_t.dtype, device=prod_t.device).copy_(view)


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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [S] or per-row [B, S] (int) -> cos, sin [S, d] / [B, S, d] in `dtype` (fp32 angles, cast after)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, d]; half-split rotation `x·cos + rot(x)·sin`, rot([a, b]) = [-b, a].
    cos/sin: [S, d] shared by the batch, or [B, S, d] per row."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class MLP(nn.Module):
    """Gated GELU-tanh MLP (spec §2.4): down(gelu(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj)


class Attention(nn.Module):
    """q/k/v norms, RoPE, scale 1.0, GQA; full layers have no v_proj (V = k_proj output, weightless norm)."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H = cfg.hidden_size
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

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [B,S,H] (already input-normed) -> q [B,nh,S,d], k, v [B,g,S,d] (k post-norm post-RoPE, v normed)."""
        q = self.q_proj(h)
        k = self.k_proj(h)
        v = self.v_proj(h) if self.v_proj is not None else None
        return self.qkv_post(q, k, v, cos, sin)

    def qkv_post(self, q: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor):
        """Projected q [B,S,nh·d], k/v [B,S,g·d] (v None on full layers: V = K) -> normed, rotated, head-major."""
        if _LAYOUT.native and cos.dim() == 2:
            from . import native_ops

            if native_ops.layer_glue_usable(q, self.head_dim) and self.q_norm.eps == self.k_norm.eps == self.eps:
                q, k, v = torch.ops.dgemma.qkv_post(q, k_raw, v_raw, cos, sin, self.q_norm.weight,
                                                    self.k_norm.weight, self.n_heads, self.n_kv, self.eps)
                return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # constant sizes: nothing for a trace to read back
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k_raw = k_raw.unflatten(-1, (self.n_kv, self.head_dim))
        v_raw = v_raw.unflatten(-1, (self.n_kv, self.head_dim)) if v_raw is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = rms_norm_noscale(v_raw, self.eps).transpose(1, 2)
        return q, k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Eager attention softmax(q kᵀ · 1.0 + mask) v with an fp32 softmax -> [B, S, nh·d] (before o_proj).
        mask: additive [B,1,Sq,Sk] or None. k/v are made contiguous (as the reference's concatenated cache)."""
        k, v = k.contiguous(), v.contiguous()
        rep = self.n_heads // self.n_kv
        if rep > 1:  # repeat-interleave order: query head j uses KV head j // rep
            k = k[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
        w = torch.matmul(q, k.transpose(2, 3))
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).contiguous()
        return out.flatten(2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(self.core(q, k, v, mask))


class Router(nn.Module):
    """Top-k routing from the un-normalised residual (spec §2.6). Weights stay fp32."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.root = H ** -0.5
        self.hidden = H
        self.proj = nn.Linear(H, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(rms_norm_noscale(x, self.eps) * self.scale * self.root)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing from the scaled, normalised residual h (what `forward` computes first)."""
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


@torch.compiler.disable  # data-dependent group sizes and a dtype-dependent kernel: run eagerly under torch.compile
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [S, in] sorted by expert; w [E, in, out]; offs = cumulative counts (int32). One GEMM per expert group.

    Under autocast (bf16 training on GPU) the operands are cast to the autocast dtype first: the fused kernel is not
    on autocast's list and on CUDA takes bf16 only."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
    if hasattr(F, "grouped_mm"):
        try:
            return F.grouped_mm(x, w, offs=offs)
        except RuntimeError:
            pass  # unsupported dtype/alignment/device for the fused kernel: loop below
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start:start + n], w[e], out=out[start:start + n])
            start += n
    return out


class Experts(nn.Module):
    """E gated experts as 3-D tensors (spec §2.7): gate_up [E, 2·Ie, H] (gate rows first), down [E, H, Ie].

    Tokens are sorted by expert and each expert runs one GEMM over its tokens; slot outputs are weighted and
    summed over the K slots in fp32, then cast once (HF's default grouped_mm numerics)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, H, Ie = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.hidden, self.inter, self.top_k = E, H, Ie, cfg.top_k_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Ie))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if _LAYOUT.native:
            from . import native_ops

            T = _LAYOUT.tokens if _LAYOUT.tokens is not None else x.shape[0]
            if native_ops.usable(x, T, self.top_k, self.num_experts, self.hidden, self.inter):
                sorted_ids, perm = torch.sort(idx.reshape(-1))
                counts = torch.bincount(sorted_ids, minlength=self.num_experts)
                return torch.ops.dgemma.moe_experts(x, perm, counts, weights, self.gate_up_proj,
                                                    self.down_proj).to(x.dtype)
        return self.torch_forward(x, weights, idx)

    def torch_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        T, K = idx.shape
        flat = idx.reshape(-1)
        sorted_ids, perm = torch.sort(flat)
        xs = x[perm // K]
        counts_t = torch.bincount(sorted_ids, minlength=self.num_experts)
        offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
        u = grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs, counts_t)
        gate, up = u.chunk(2, dim=-1)
        y = grouped_mm(gelu_tanh(gate) * up, self.down_proj.transpose(-2, -1), offs, counts_t)
        y = y * weights.reshape(-1)[perm].unsqueeze(-1)  # fp32 (weights are fp32)
        out = torch.empty_like(y)
        out[perm] = y
        return out.view(T, K, -1).sum(dim=1).to(x.dtype)


class Layer(nn.Module):
    """One layer (spec §2.8): attention, then dense MLP and MoE in parallel, then `layer_scalar` on the stream.

    Encoder and decoder run this same module; only the layer scalar differs (`enc_layer_scalar` for the encoder)."""

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

    def finish(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scalar: torch.Tensor) -> torch.Tensor:
        """The rest of the layer once q/k/v are known: attention + residual, FFN, then the layer scalar
        (`layer_scalar` in the decoder, `enc_layer_scalar` in the encoder)."""
        o = self.self_attn.attend(q, k, v, mask)
        if _LAYOUT.native:
            from . import native_ops

            if native_ops.layer_glue_usable(x, self.router.hidden) and self._glue_weights_ok():
                return self._ffn_native(x, o, scalar)
        x = x + self.post_attention_layernorm(o)
        return self.ffn(x) * scalar

    def _glue_weights_ok(self) -> bool:
        norms = [getattr(self, n) for n in self.NORMS]
        return all(n.weight is not None and n.eps == self.router.eps for n in norms)

    def _ffn_native(self, x: torch.Tensor, o: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        """`finish` after attention through dgemma's native layer glue (model/native_ops.py, inside the CPU trace
        only): the same arithmetic, the norms and residual adds fused into two calls."""
        r = self.router
        x2, n1, n2, h = torch.ops.dgemma.pre_ffn(
            x, o, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
            self.pre_feedforward_layernorm_2.weight, r.scale, r.root, r.eps)
        h1 = self.mlp(n1)
        w, idx = r.route(h.flatten(0, -2))
        h2 = self.experts(n2.flatten(0, -2), w, idx).view_as(x2)
        return torch.ops.dgemma.ffn_tail(x2, h1, h2, self.post_feedforward_layernorm_1.weight,
                                         self.post_feedforward_layernorm_2.weight,
                                         self.post_feedforward_layernorm.weight, scalar, r.eps)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Everything after attention; x is the residual stream after the attention add."""
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.flatten(0, -2)
        w, idx = self.router(flat)
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).view_as(x)
        h2 = self.post_feedforward_layernorm_2(h2)
        return x + self.post_feedforward_layernorm(h1 + h2)


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


__all__ = ["feature_major_products", "feature_major", "native_cpu_ops", "RMSNorm", "MLP", "Attention", "Router", "Experts", "Layer", "rope_inv_freq", "rope_cos_sin",
           "apply_rope", "rms_norm_noscale", "gelu_tanh", "gated_mlp", "token_major", "init_weights"]
