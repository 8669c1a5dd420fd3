"""One packed forward pass over many requests in mixed phases, batch-invariant by construction.

Every active request contributes *segments*: an encode segment (its prompt, or the canvas it just committed —
causal, writes its KV) and/or a denoise segment (its canvas — bidirectional, reads its KV). All segments' tokens
are packed into one [T, H] batch, so each weight matrix is read once per iteration for everybody. Attention, RoPE
and the sampler run per request, on exactly the shapes `model.generate` uses for that request alone.

Batch invariance (a request's tokens never depend on its neighbours). A GEMM's result for one row can depend on how
many rows share the call: BLAS libraries switch to other kernels for small M. `GemmPolicy` probes, once per
dtype/device, which row counts M give each row its canonical (large-M) result — on x86 CPUs with torch 2.13 fp32:
every M except 1–3, 5–7 and 9–11; bf16: every M. Rows of segments whose own size is "safe" are packed into one
GEMM (a sum of safe sizes is safe); a segment of unsafe size gets its own GEMM, exactly as it would alone. The same
rule applies per expert inside the MoE, with each request's expert rows in the order its own routing sort gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SLIDING
from ..model import Backbone
from ..model.layers import Layer, gelu_tanh, rms_norm_noscale
from .kv import SeqKV


class GemmPolicy:
    """Which GEMM row counts produce each row's canonical result on this device/dtype (probed once)."""

    PROBE_MAX = 64

    def __init__(self, dtype: torch.dtype, device: torch.device):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 80, generator=g).to(device=device, dtype=dtype)
        x = torch.randn(4 * self.PROBE_MAX, 80, generator=g).to(device=device, dtype=dtype)
        ref = F.linear(x, w)
        self.unsafe = {m for m in range(1, self.PROBE_MAX + 1)
                       if not all(torch.equal(F.linear(x[o:o + m], w), ref[o:o + m]) for o in (0, 3, 17))}

    def safe(self, m: int) -> bool:
        return m not in self.unsafe

    def linear(self, x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """F.linear over packed rows `x` [T, in] made of segments `sizes`, batch-invariantly."""
        if all(self.safe(n) for n in sizes):
            return F.linear(x, w)
        out = x.new_empty(x.shape[0], w.shape[0])
        safe_rows, start = [], 0
        for n in sizes:
            if self.safe(n):
                safe_rows.append(torch.arange(start, start + n, device=x.device))
            elif n:
                out[start:start + n] = F.linear(x[start:start + n], w)
            start += n
        if safe_rows:
            idx = torch.cat(safe_rows)
            out[idx] = F.linear(x[idx], w)
        return out


@dataclass
class Segment:
    """A run of one request's tokens in the packed batch."""

    kv: SeqKV
    ids: torch.Tensor  # [n]
    start: int  # position of the first token
    encode: bool  # True: causal, writes KV; False: bidirectional canvas, reads KV
    sc: torch.Tensor | None = None  # denoise only: self-conditioning soft embedding [1, n, H] or None

    @property
    def n(self) -> int:
        return self.ids.shape[0]


class Runner:
    def __init__(self, backbone: Backbone):
        self.bb = backbone
        self.cfg = backbone.cfg
        self.gemm = GemmPolicy(backbone.dtype, backbone.device)

    @torch.no_grad()
    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Run every segment through the model (encode segments must precede a denoise segment of the same
        request). Returns fp32 logits [1, n, V] for each denoise segment, in order."""
        bb, cfg, gemm = self.bb, self.cfg, self.gemm
        dev = bb.device
        sizes = [s.n for s in segments]
        rows = _row_ranges(sizes)
        x = bb.embed(torch.cat([s.ids for s in segments]).to(dev))
        x = self._decoder_input(x, segments, rows)
        scal_rows = torch.cat([torch.full((s.n,), float(s.encode), device=dev) for s in segments]).bool()[:, None]
        ropes = [bb._rope(torch.arange(s.start, s.start + s.n, device=dev)) for s in segments]
        prefix = [s.start for s in segments]  # cached length when the segment is written (encode) / read (denoise)
        masks = [self._encode_masks(s, prefix[i]) if s.encode else None for i, s in enumerate(segments)]
        for li, layer in enumerate(bb.layers):
            t = cfg.layer_types[li]
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = gemm.linear(h, attn.q_proj.weight, sizes)
            k = gemm.linear(h, attn.k_proj.weight, sizes)
            v = gemm.linear(h, attn.v_proj.weight, sizes) if attn.v_proj is not None else None
            outs = []
            for i, s in enumerate(segments):
                a, b = rows[i]
                qs, ks, vs = attn.qkv_post(q[None, a:b], k[None, a:b], None if v is None else v[None, a:b], *ropes[i][t])
                P = prefix[i]
                lo = s.kv.start(li, P)
                if s.encode:
                    s.kv.write(li, ks, vs, P)
                    kk, vv = s.kv.read(li, lo, P + s.n)
                    outs.append(attn.core(qs, kk, vv, masks[i][t]))
                else:
                    kp, vp = s.kv.read(li, lo, P)
                    outs.append(attn.core(qs, torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), None))
            o = gemm.linear(torch.cat(outs, 1)[0], attn.o_proj.weight, sizes)
            x = x + layer.post_attention_layernorm(o)
            x = self._ffn(layer, x, sizes, rows)
            x = torch.where(scal_rows, x * layer.enc_layer_scalar, x * layer.layer_scalar)
        for i, s in enumerate(segments):
            if s.encode:
                s.kv.length = prefix[i] + s.n
        dec = [i for i, s in enumerate(segments) if not s.encode]
        if not dec:
            return []
        hd = torch.cat([x[rows[i][0]:rows[i][1]] for i in dec])
        logits = gemm.linear(bb.norm(hd), bb.embed_tokens.weight, [sizes[i] for i in dec]).float()
        if bb.softcap:
            logits = torch.tanh(logits / bb.softcap) * bb.softcap
        out, a = [], 0
        for i in dec:
            out.append(logits[None, a:a + sizes[i]])
            a += sizes[i]
        return out

    # ------------------------------------------------------------------------------------------------------
    def _decoder_input(self, e: torch.Tensor, segments: list[Segment], rows) -> torch.Tensor:
        """Denoise rows get RMSNorm∅(embed + MLP_sc(pre_norm(s))) (spec §3.3); encode rows stay as embedded."""
        bb, gemm = self.bb, self.gemm
        sc_mod = bb.self_conditioning
        x = e.clone()
        with_sc = [i for i, s in enumerate(segments) if not s.encode and s.sc is not None]
        for i, s in enumerate(segments):
            if not s.encode and s.sc is None:
                a, b = rows[i]
                x[a:b] = rms_norm_noscale(e[a:b], bb.cfg.rms_norm_eps)
        if with_sc:
            sz = [segments[i].n for i in with_sc]
            n = sc_mod.pre_norm(torch.cat([segments[i].sc[0] for i in with_sc]))
            mlp = gemm.linear(gelu_tanh(gemm.linear(n, sc_mod.gate_proj.weight, sz))
                              * gemm.linear(n, sc_mod.up_proj.weight, sz), sc_mod.down_proj.weight, sz)
            a2 = 0
            for i, m in zip(with_sc, sz):
                a, b = rows[i]
                x[a:b] = rms_norm_noscale(e[a:b] + mlp[a2:a2 + m], bb.cfg.rms_norm_eps)
                a2 += m
        return x

    def _encode_masks(self, s: Segment, P: int) -> dict[str, torch.Tensor]:
        """Causal (+ sliding window) additive masks for an encode segment at cached length P (no padding)."""
        dev = self.bb.device
        pos = torch.arange(P, P + s.n, device=dev)
        masks = {}
        for t in set(self.cfg.layer_types):
            lo = s.kv.start(self.cfg.layer_types.index(t), P)
            j = torch.arange(lo, P + s.n, device=dev)
            allowed = j[None, :] <= pos[:, None]
            if t == SLIDING:
                allowed = allowed & (j[None, :] > pos[:, None] - self.cfg.sliding_window)
            masks[t] = self.bb._additive(allowed[None])
        return masks

    def _ffn(self, layer: Layer, x: torch.Tensor, sizes: list[int], rows) -> torch.Tensor:
        """Layer.ffn over packed rows, batch-invariantly (spec §2.4–2.8)."""
        gemm = self.gemm
        mlp = layer.mlp
        hx = layer.pre_feedforward_layernorm(x)
        h1 = gemm.linear(gelu_tanh(gemm.linear(hx, mlp.gate_proj.weight, sizes)) *
                         gemm.linear(hx, mlp.up_proj.weight, sizes), mlp.down_proj.weight, sizes)
        h1 = layer.post_feedforward_layernorm_1(h1)
        r = layer.router
        hr = rms_norm_noscale(x, r.eps) * r.scale * r.root
        probs = F.softmax(gemm.linear(hr, r.proj.weight, sizes), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=r.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        w = w * r.per_expert_scale[idx]
        h2 = self._experts(layer, layer.pre_feedforward_layernorm_2(x), w, idx, rows)
        h2 = layer.post_feedforward_layernorm_2(h2)
        return x + layer.post_feedforward_layernorm(h1 + h2)

    def _experts(self, layer: Layer, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, rows) -> torch.Tensor:
        """Experts over packed tokens. Each request's (token, slot) pairs are ordered by its own routing sort (as
        when it runs alone); per expert, request groups of safe size share one GEMM, others run on their own."""
        ex = layer.experts
        T, K = idx.shape
        E = ex.num_experts
        flat_w = w.reshape(-1)
        safe_parts: list[list[torch.Tensor]] = [[] for _ in range(E)]
        solo: list[tuple[int, torch.Tensor]] = []
        for a, b in rows:
            ids_r, perm_r = torch.sort(idx[a:b].reshape(-1))
            slots = perm_r + a * K  # global (token·K + slot) indices in this request's canonical order
            counts = torch.bincount(ids_r, minlength=E).tolist()
            start = 0
            for e, c in enumerate(counts):
                if c:
                    part = slots[start:start + c]
                    if self.gemm.safe(c):
                        safe_parts[e].append(part)
                    else:
                        solo.append((e, part))
                    start += c
        pieces = [(e, torch.cat(p)) for e, p in enumerate(safe_parts) if p] + solo
        order = torch.cat([p for _, p in pieces])
        xs = x[order // K]
        y = x.new_empty(order.shape[0], ex.down_proj.shape[1])
        start = 0
        for e, p in pieces:
            n = p.shape[0]
            u = torch.mm(xs[start:start + n], ex.gate_up_proj[e].transpose(0, 1))
            gate, up = u.chunk(2, dim=-1)
            y[start:start + n] = torch.mm(gelu_tanh(gate) * up, ex.down_proj[e].transpose(0, 1))
            start += n
        yw = y * flat_w[order].unsqueeze(-1)  # fp32
        out = torch.empty_like(yw)
        out[order] = yw
        return out.view(T, K, -1).sum(dim=1).to(x.dtype)


def _row_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out
