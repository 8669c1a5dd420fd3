"""The uniform-state diffusion objective (spec §6.1), on the same backbone dgemma generates with.

Per example: t ~ U(t_lo, 1); one canvas of the response is chosen uniformly among those holding supervised
tokens; each supervised token of that canvas becomes a uniformly random token with probability t (no mask token;
padding is never corrupted or scored). The encoder runs once over the *clean* sequence — its causal KV up to the
chosen canvas is exactly the prefix the decoder reads, and its logits give the optional next-token loss. The decoder
runs twice (self-conditioning): pass 1 without gradients and without a signal; for a random half of the examples its
logits feed pass 2 as soft embeddings, the others get a zero signal through the mask. Only pass 2 is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Backbone
from ..model import Batch as ModelBatch


@dataclass
class ObjectiveConfig:
    t_lo: float = 1e-3  # t ~ U(t_lo, 1)
    sc_prob: float = 0.5  # fraction of examples whose pass 2 gets the pass-1 self-conditioning signal
    ar_weight: float = 1.0  # encoder next-token loss weight (0 disables it)
    weighting: str = "none"  # "none": flat mean CE; "inv_1mt": weight 1/(1−t), clipped at `max_weight`
    max_weight: float = 10.0
    mode: str = "diffusion"  # "ar": next-token loss on the response only (the autoregressive baseline)


@dataclass
class Batch:
    """Right-padded clean sequences and the chosen canvas per example."""

    ids: torch.Tensor  # [B, S] prompt + response (+ pad)
    valid: torch.Tensor  # [B, S] bool: real tokens
    canvas_start: torch.Tensor  # [B] position of the chosen canvas
    supervised: torch.Tensor  # [B, L] bool: canvas positions holding response tokens (scored, corruptible)
    canvas: torch.Tensor  # [B, L] clean canvas tokens (pad where not supervised)
    response: torch.Tensor  # [B, S] bool: response tokens (targets of the AR baseline's loss)
    span: tuple[int, int] | None = None  # host ints: the lowest canvas start and the highest start + L (no sync)
    tokens: int = 0  # host int: real plus supervised tokens (the trainer's tokens/s count)

    def prefix_only(self) -> "Batch":
        """Drop the columns at and after the latest chosen canvas. Without the encoder's next-token loss nothing
        reads them (the decoder sees only the prefix before its canvas), so the loss is unchanged and the encoder
        pass is shorter: half as long for a one-canvas answer such as Sudoku's."""
        L = self.canvas.shape[1]
        keep = max(1, (self.span[1] - L) if self.span is not None else int(self.canvas_start.max()))
        if keep >= self.ids.shape[1]:
            return self
        return Batch(self.ids[:, :keep], self.valid[:, :keep], self.canvas_start, self.supervised, self.canvas,
                     self.response[:, :keep], self.span, self.tokens)

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in
                       ("ids", "valid", "canvas_start", "supervised", "canvas", "response")), self.span, self.tokens)


def corrupt(canvas: torch.Tensor, supervised: torch.Tensor, t: torch.Tensor, vocab: int,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each supervised token by a uniform random token with probability t[b]. Returns (noisy, mask)."""
    u = torch.rand(canvas.shape, generator=generator, device=canvas.device)
    mask = (u < t[:, None]) & supervised
    noise = torch.randint(0, vocab, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(mask, noise, canvas), mask


def encode_clean(bb: Backbone, ids: torch.Tensor, valid: torch.Tensor):
    """Causal pass over whole right-padded sequences (with gradients), through the one forward. Returns the last
    hidden state [B, S, H] and each layer's (k, v) [B, g, S, d]."""
    B, S = ids.shape
    cache = bb.new_cache(B, S)
    cache.valid[:, :S] = valid
    x = bb.forward(ModelBatch.rectangle(ids, 0, canvas=False), cache).view(B, S, -1)
    C = cache.capacity

    def rows(t: torch.Tensor) -> torch.Tensor:  # [1, g, B·C, d] -> [B, g, S, d]
        return t.view(t.shape[1], B, C, t.shape[3])[:, :, :S].transpose(0, 1)

    return x, [(rows(k), rows(v)) for k, v in zip(cache.k, cache.v)]


def denoise_at(bb: Backbone, canvas: torch.Tensor, start: torch.Tensor, kvs, valid: torch.Tensor,
               sc: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None,
               span: tuple[int, int] | None = None) -> torch.Tensor:
    """Decoder pass over canvases [B, L] at per-row positions start[b] + [0, L), reading the clean prefix
    [0, start[b]) from `kvs` (sliding layers: its last W−1 tokens). `span` = (min start, max start + L) as host
    ints, if known (else read from `start`: a device sync). Returns fp32 logits [B, L, V]."""
    B, L = canvas.shape
    S = valid.shape[1]
    first, last = span if span is not None else (int(start.min()), int(start.max()) + L)
    cache = bb.new_cache(B, max(S, last))
    C = cache.capacity
    for li, (k, v) in enumerate(kvs):  # the prefix KV as the cache's contents (differentiable: no in-place copy)
        cache.k[li] = F.pad(k, (0, 0, 0, C - S)).transpose(0, 1).reshape(1, k.shape[1], B * C, -1)
        cache.v[li] = F.pad(v, (0, 0, 0, C - S)).transpose(0, 1).reshape(1, v.shape[1], B * C, -1)
    cache.valid[:, :S] = valid
    j = torch.arange(C, device=canvas.device)
    cache.valid |= (j >= start[:, None]) & (j < start[:, None] + L)  # the canvas's own keys
    if sc is not None and sc_mask is not None:
        sc = sc * sc_mask.to(sc.dtype)[:, None, None]
    batch = ModelBatch.rectangle(canvas, start, canvas=True, span=(first, last))
    x = bb.forward(batch, cache, None if sc is None else sc.reshape(B * L, -1))
    return bb.logits(x).view(B, L, -1)


class DiffusionObjective(nn.Module):
    """Wraps the backbone so `forward(batch)` returns the loss (what DDP wraps)."""

    def __init__(self, backbone: Backbone, cfg: ObjectiveConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if self.cfg.mode == "ar":
            return self._ar_only(batch)
        bb, cfg = self.backbone, self.cfg
        B = batch.ids.shape[0]
        dev = batch.ids.device
        V = bb.cfg.vocab_size
        t = cfg.t_lo + (1 - cfg.t_lo) * torch.rand(B, generator=generator, device=dev)
        noisy, _ = corrupt(batch.canvas, batch.supervised, t, V, generator)
        h, kvs = encode_clean(bb, batch.ids, batch.valid)
        with torch.no_grad():  # pass 1: no signal, no gradients
            first = denoise_at(bb, noisy, batch.canvas_start, [(k.detach(), v.detach()) for k, v in kvs],
                               batch.valid, span=batch.span)
            sc = bb.soft_embed(first)
        use_sc = torch.rand(B, generator=generator, device=dev) < cfg.sc_prob
        logits = denoise_at(bb, noisy, batch.canvas_start, kvs, batch.valid, sc, use_sc, batch.span)
        ce = F.cross_entropy(logits.transpose(1, 2), batch.canvas, reduction="none")  # [B, L]
        sup = batch.supervised.float()
        if cfg.weighting == "inv_1mt":
            w = (1.0 / (1.0 - t).clamp_min(1e-6)).clamp_max(cfg.max_weight)
            sup = sup * w[:, None]
        elif cfg.weighting != "none":
            raise ValueError(f"unknown loss weighting {cfg.weighting!r}; expected 'none' or 'inv_1mt'")
        diff = (ce * sup).sum() / batch.supervised.float().sum().clamp_min(1.0)
        out = {"diffusion_loss": diff, "loss": diff}
        if cfg.ar_weight > 0:
            ar_logits = bb.logits(h[:, :-1])
            tgt_ok = batch.valid[:, 1:] & batch.valid[:, :-1]
            ar = F.cross_entropy(ar_logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")
            ar = (ar * tgt_ok).sum() / tgt_ok.sum().clamp_min(1)
            out["ar_loss"] = ar
            out["loss"] = diff + cfg.ar_weight * ar
        with torch.no_grad():
            pred = logits.argmax(-1)
            out["canvas_accuracy"] = ((pred == batch.canvas) & batch.supervised).sum() / batch.supervised.sum().clamp_min(1)
        return out

    def _ar_only(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on the response tokens only (SFT-style), through the causal encoder."""
        bb = self.backbone
        h, _ = encode_clean(bb, batch.ids, batch.valid)
        logits = bb.logits(h[:, :-1])
        tgt = batch.response[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")
        loss = (ce * tgt).sum() / tgt.sum().clamp_min(1)
        with torch.no_grad():
            acc = ((logits.argmax(-1) == batch.ids[:, 1:]) & tgt).sum() / tgt.sum().clamp_min(1)
        return {"loss": loss, "ar_loss": loss, "canvas_accuracy": acc}


# CPU inductor (torch 2.13) miscompiles the objective's backward when it vectorises: the loss matches eager but the
# attention keys' gradients differ by more than 100% (`aot_eager` is exact; `cpp.simdlen=1`, scalar C++ loops,
# gives the eager gradients to 3e-4). Until that is fixed upstream, CPU compiles of the objective go scalar.
CPU_COMPILE_OPTIONS = {"cpp.simdlen": 1}


def compile_objective(module: nn.Module, device: torch.device) -> nn.Module:
    """`torch.compile` of a DiffusionObjective (or a wrapper of it), with the CPU workaround above."""
    return torch.compile(module, options=CPU_COMPILE_OPTIONS if torch.device(device).type == "cpu" else None)

