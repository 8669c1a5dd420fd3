"""Block-autoregressive diffusion generation for one batch (spec §4.2).

encode prompt → [denoise × ≤N → commit argmax canvas → encode canvas]* . With default settings and a
`torch.Generator` seeded with s this returns exactly what `torch.manual_seed(s); reference.generate(...)` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import sampling
from .config import GenerationConfig
from .model import Backbone


@dataclass
class StepInfo:
    """What one denoising step did, for live views (`--watch`) and analysis. Tensors are [B, L] unless noted."""

    canvas_index: int
    step: int  # 1-based step within this canvas
    steps_remaining: int  # n in the schedule (N…1), including this step
    temperature: float
    draft: torch.Tensor  # argmax canvas (frozen rows keep theirs)
    canvas: torch.Tensor  # the next decoder input: accepted samples + fresh noise
    accepted: torch.Tensor  # bool: positions whose sample was accepted this step
    entropy: torch.Tensor  # fp32 per-position entropy of the temperature-scaled logits
    done: torch.Tensor  # bool [B]: rows stopped for this canvas (stable and confident)
    active: torch.Tensor  # bool [B]: rows that actually advanced this step (not done before, not finished)


@dataclass
class CanvasInfo:
    index: int
    tokens: torch.Tensor  # [B, L] committed tokens after EOS/pad rules
    steps: torch.Tensor  # [B] denoising steps each row used on this canvas
    finished: torch.Tensor  # [B] rows that have produced EOS (now or before)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + generated] (prompt left padding kept)
    tokens_per_forward: torch.Tensor  # [B] float: non-pad new tokens / decoder passes of that row
    steps_per_canvas: list[list[int]] = field(default_factory=list)  # per row, steps used on each canvas
    revisions: torch.Tensor | None = None  # [B]: accepted tokens later replaced by a different accepted token
    finish_reasons: list[str] = field(default_factory=list)  # per row: "eos", "stop" or "length"
    num_canvases: int = 0


class BlockState:
    """Sampler state of one canvas for B rows (spec §4.2): the decoder input, the argmax draft, the
    self-conditioning soft embedding, frozen-row bookkeeping and the stopping history."""

    def __init__(self, canvas: torch.Tensor, gcfg: GenerationConfig):
        B, L = canvas.shape
        dev = canvas.device
        self.canvas = canvas
        self.draft = canvas
        self.sc: torch.Tensor | None = None  # soft embeddings [B, L, H]; None = zero signal
        self.h_prev = torch.zeros(B, L, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.last_acc = torch.full((B, L), -1, dtype=torch.long, device=dev)
        self.steps = torch.zeros(B, dtype=torch.int32, device=dev)
        self.revisions = torch.zeros(B, dtype=torch.long, device=dev)
        self.stopper = sampling.StableConfidentStop(gcfg.stability_threshold, gcfg.confidence_threshold)


def denoise_step(backbone: Backbone, st: BlockState, raw: torch.Tensor, n: int, gcfg: GenerationConfig,
                 generator: torch.Generator | None, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything after one decoder call (raw fp32 logits [B, L, V]) at steps-remaining n: temperature,
    sample, entropy-bound acceptance, renoising, frozen rows, stopping, self-conditioning. Updates `st`;
    returns (T, accepted, entropy). `active` [B]: rows that are neither done nor finished (for counting)."""
    B, L, V = raw.shape
    dev = raw.device
    T = sampling.temperature(n, gcfg.max_denoising_steps, gcfg.t_min, gcfg.t_max, dev)
    z = raw / T
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    amax = torch.argmax(z, dim=-1)
    h = sampling.entropy(z)
    acc = sampling.entropy_bound_accept(h, gcfg.entropy_bound)
    # The sample is drawn after the (deterministic) acceptance, still before the renoising draw, so the stream
    # order is the reference's; only accepted positions of active rows read it, so only those are computed.
    taken = acc & active[:, None]
    samp = sampling.sample(probs, generator, taken)
    new = torch.where(acc, samp, sampling.noise((B, L), V, generator, dev))
    changed = taken & (st.last_acc >= 0) & (samp != st.last_acc)
    st.revisions += changed.sum(-1)
    st.last_acc = torch.where(taken, samp, st.last_acc)
    sc_new = backbone.soft_embed(z, probs)
    del z, probs
    if bool(st.done.any()):  # frozen rows keep canvas, argmax and self-conditioning (spec §4.2)
        keep = st.done[:, None]
        amax = torch.where(keep, st.draft, amax)
        new = torch.where(keep, st.canvas, new)
        h = torch.where(keep, st.h_prev, h)
        sc_new = torch.where(keep[:, :, None], st.sc, sc_new)
    st.done = st.done | st.stopper(amax, h)
    st.canvas, st.draft, st.sc, st.h_prev = new, amax, sc_new, h
    return T, acc, h


@torch.no_grad()
def generate(
    backbone: Backbone,
    input_ids: torch.Tensor,
    gcfg: GenerationConfig,
    canvas_length: int,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_canvas: Callable[[CanvasInfo], None | bool] | None = None,
) -> GenerateOutput:
    """Run the reference algorithm on a (left-padded) batch. `gcfg` must be resolved (`GenerationConfig.merged`).

    `on_canvas` may return True to request that generation stop after this canvas (used for stop strings)."""
    dev = backbone.device
    input_ids = input_ids.to(dev)
    B, P0 = input_ids.shape
    L, V = canvas_length, backbone.cfg.vocab_size
    N = gcfg.max_denoising_steps
    n_canvases = math.ceil(gcfg.max_new_tokens / L)
    eos, pad = gcfg.eos_ids, gcfg.pad_token_id
    am = torch.ones(B, P0, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.to(dev).bool()

    cache = backbone.new_cache(B, P0 + n_canvases * L)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.int32, device=dev)
    revisions = torch.zeros(B, dtype=torch.long, device=dev)
    steps_per_canvas: list[list[int]] = [[] for _ in range(B)]
    pieces = [input_ids]
    to_encode, enc_mask = input_ids, am
    stop_requested = False
    c = 0
    for c in range(n_canvases):
        backbone.encode(to_encode, cache, enc_mask)
        st = BlockState(sampling.noise((B, L), V, generator, dev), gcfg)
        for step, n in enumerate(range(N, 0, -1), start=1):
            active = ~(st.done | finished)
            passes += active
            st.steps += active
            raw = backbone.denoise(st.canvas, cache, st.sc)
            T, acc, h = denoise_step(backbone, st, raw, n, gcfg, generator, active)
            if on_step is not None:
                on_step(StepInfo(c, step, n, float(T), st.draft, st.canvas, acc, h, st.done.clone(), active))
            if bool(st.done.all()):
                break
        revisions += st.revisions
        for b, s in enumerate(st.steps.tolist()):
            steps_per_canvas[b].append(s)
        committed, finished = sampling.finalize_canvas(st.draft, finished, eos, pad)
        pieces.append(committed)
        if on_canvas is not None:
            stop_requested = bool(on_canvas(CanvasInfo(c, committed, st.steps, finished.clone())))
        if bool(finished.all()) or stop_requested:
            break
        to_encode, enc_mask = committed, torch.ones(B, L, dtype=torch.bool, device=dev)

    seq = torch.cat(pieces, dim=1)
    new_tokens = seq[:, P0:]
    valid = (new_tokens != pad).sum(-1) if pad is not None else torch.full((B,), new_tokens.shape[1], device=dev)
    return GenerateOutput(
        sequences=seq, tokens_per_forward=valid / passes, steps_per_canvas=steps_per_canvas,
        revisions=revisions, finish_reasons=["eos" if f else "length" for f in finished.tolist()],
        num_canvases=c + 1,
    )


@torch.no_grad()
def generate_ar(backbone: Backbone, input_ids: torch.Tensor, max_new_tokens: int,
                attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None,
                pad_id: int | None = None) -> GenerateOutput:
    """Greedy autoregressive decoding with the same backbone: the causal encoder plus the tied head, one token per
    forward, reusing the KV cache. Rows stop at EOS; positions after it become pad (like the diffusion path)."""
    dev = backbone.device
    ids = input_ids.to(dev)
    B, P0 = ids.shape
    am = torch.ones(B, P0, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.to(dev).bool()
    cache = backbone.new_cache(B, P0 + max_new_tokens)
    eos_t = torch.tensor(eos_ids or [], dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    x = backbone.encode(ids, cache, am, final_norm=False)
    for _ in range(max_new_tokens):
        nxt = torch.argmax(backbone.logits(x[:, -1:]), dim=-1)  # [B, 1]
        if pad_id is not None:
            nxt = torch.where(finished[:, None], torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        if len(eos_t):
            finished |= torch.isin(nxt[:, 0], eos_t)
        if bool(finished.all()):
            break
        x = backbone.encode(nxt, cache, None, final_norm=False)
    seq = torch.cat([ids] + out, dim=1)
    n = seq.shape[1] - P0
    return GenerateOutput(sequences=seq, tokens_per_forward=torch.ones(B, device=dev),
                          steps_per_canvas=[[n] for _ in range(B)], finish_reasons=[
                              "eos" if f else "length" for f in finished.tolist()], num_canvases=0)
