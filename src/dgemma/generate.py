"""Block-autoregressive diffusion generation for one batch (spec §4.2): encode prompt → [denoise × ≤N → commit
the argmax canvas → encode it]*, with either sampler.

- `generate_reference`: the reference's loop, batch-shared and token for token: with default settings and a
  `torch.Generator` seeded with s it returns exactly what `torch.manual_seed(s); reference.generate(...)` returns.
- `generate_fast`: the same algorithm with the fast sampler through `step.Stepper`, the engine's step for one
  batch: every row runs on its own (its own positions, counter-based draws, its own early stop), so a row's tokens
  do not depend on the rest of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import sampling
from .config import GenerationConfig
from .errors import DGemmaError
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
        # S ≥ N steps can never be stable: the same result as S, without S canvases of history
        self.stopper = sampling.StableConfidentStop(min(gcfg.stability_threshold, gcfg.max_denoising_steps),
                                                    gcfg.confidence_threshold)


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
    taken = acc & active[:, None]
    samp = sampling.sample(probs, generator)
    new = torch.where(acc, samp, sampling.noise((B, L), V, generator, dev))
    changed = taken & (st.last_acc >= 0) & (samp != st.last_acc)
    st.revisions += changed.sum(-1)
    st.last_acc = torch.where(taken, samp, st.last_acc)
    sc_new = backbone.soft_embed(z)
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
def generate_reference(
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
def generate_fast(
    backbone: Backbone,
    input_ids: torch.Tensor,
    gcfg: GenerationConfig,
    canvas_length: int,
    attention_mask: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_canvas: Callable[[CanvasInfo], None | bool] | None = None,
    compile: bool | None = None,
) -> GenerateOutput:
    """The algorithm of `generate_reference` with the fast sampler, each row on its own: a left-padded row's
    prompt is its real tokens at positions [0, n); a row commits as soon as its canvas is stable and confident and
    goes on with the next one; a finished row (EOS, with a pad id) leaves the batch. seeds: one per row.
    The output has the reference's shape: whole canvases, positions after the first EOS padded, and as many
    canvases as the longest row (shorter rows padded). Callbacks: `on_step` after every iteration (rows not in it
    keep their last values and are not `active`); `on_canvas` once every row has committed canvas c (or left)."""
    from .step import stepper_for

    dev = backbone.device
    B, P0 = input_ids.shape
    L, N = canvas_length, gcfg.max_denoising_steps
    n_canvases = math.ceil(gcfg.max_new_tokens / L)
    eos, pad = gcfg.eos_ids, gcfg.pad_token_id
    am = torch.ones(B, P0, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    prompts = [input_ids[b].cpu()[am[b]] for b in range(B)]
    stepper = stepper_for(backbone, B, max(len(p) for p in prompts) + n_canvases * L, L, compile)
    for b in range(B):
        stepper.start_row(b, gcfg, seeds[b], len(prompts[b]))
    committed: list[list[torch.Tensor]] = [[] for _ in range(B)]
    steps_per_canvas: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool)
    passes = torch.zeros(B, dtype=torch.int32)
    rows, fresh = list(range(B)), [True] * B
    encodes = [(b, 0, prompts[b]) for b in range(B)]
    view = StepView(B, L)
    reported, stop_requested = 0, False
    while rows and not stop_requested:
        out = stepper.iterate(rows, fresh, encodes)
        passes[rows] += 1
        if on_step is not None:
            on_step(view.update(out, N))
        next_rows, fresh, encodes = [], [], []
        for i, b in enumerate(rows):
            if not bool(out.commit[i]):
                next_rows.append(b), fresh.append(False)
                continue
            steps_per_canvas[b].append(int(out.step[i]))
            canvas, fin = sampling.finalize_canvas(out.draft[i:i + 1], finished[b:b + 1], eos, pad)
            finished[b] = fin[0]
            committed[b].append(canvas[0])
            if len(committed[b]) < n_canvases and not (fin[0] and pad is not None):
                encodes.append((b, int(stepper.start[b]), canvas[0]))
                stepper.next_canvas(b)
                next_rows.append(b), fresh.append(True)
        rows = next_rows
        while on_canvas is not None and reported < n_canvases and all(
                len(committed[b]) > reported or b not in rows for b in range(B)):
            tokens = torch.stack([committed[b][reported] if len(committed[b]) > reported
                                  else torch.full((L,), pad if pad is not None else 0) for b in range(B)])
            steps = torch.tensor([s[reported] if len(s) > reported else 0 for s in steps_per_canvas])
            stop_requested |= bool(on_canvas(CanvasInfo(reported, tokens, steps, finished.clone())))
            reported += 1
    n_out = max(len(c) for c in committed)
    fill = pad if pad is not None else 0
    new = torch.stack([torch.cat(c + [torch.full((L,), fill)] * (n_out - len(c))) for c in committed])
    seq = torch.cat([input_ids.cpu(), new], dim=1).to(dev)
    valid = (new != pad).sum(-1) if pad is not None else torch.full((B,), new.shape[1])
    return GenerateOutput(
        sequences=seq, tokens_per_forward=(valid / passes).to(dev), steps_per_canvas=steps_per_canvas,
        revisions=stepper.revisions[:B].clone().to(dev), finish_reasons=["eos" if f else "length" for f in finished.tolist()],
        num_canvases=n_out)


class StepView:
    """The batch-shaped `StepInfo` of a fast iteration: rows not in it keep their last values."""

    def __init__(self, B: int, L: int):
        self.draft = torch.zeros(B, L, dtype=torch.long)
        self.canvas = torch.zeros(B, L, dtype=torch.long)
        self.accepted = torch.zeros(B, L, dtype=torch.bool)
        self.entropy = torch.zeros(B, L)
        self.canvas_index = [0] * B

    def update(self, out, N: int) -> StepInfo:
        active = torch.zeros(self.draft.shape[0], dtype=torch.bool)
        active[out.rows] = True
        for name in ("draft", "canvas", "accepted", "entropy"):
            getattr(self, name)[out.rows] = getattr(out, name)
        done = torch.zeros_like(active)
        done[out.rows] = out.commit & (out.step < N)
        first = out.rows[0]
        info = StepInfo(self.canvas_index[first], int(out.step[0]), N - int(out.step[0]) + 1,
                        float(out.temperature[0]), self.draft.clone(), self.canvas.clone(), self.accepted.clone(),
                        self.entropy.clone(), done, active)
        for i, b in enumerate(out.rows):
            self.canvas_index[b] += int(out.commit[i])
        return info


@torch.no_grad()
def generate_ar(backbone: Backbone, input_ids: torch.Tensor, max_new_tokens: int,
                attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None,
                pad_id: int | None = None, compile: bool | None = None) -> GenerateOutput:
    """Greedy autoregressive decoding with the same backbone: the causal encoder plus the tied head, one token per
    forward on the fast path (`step.ARStepper`), reusing the KV cache. A left-padded row's prompt is its real
    tokens at positions [0, n). Rows stop at EOS; positions after it become pad (like the diffusion path)."""
    from .step import ar_stepper_for

    dev = backbone.device
    B, P0 = input_ids.shape
    am = torch.ones(B, P0, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    prompts = [input_ids[b].cpu()[am[b]] for b in range(B)]
    if any(p.numel() == 0 for p in prompts):
        raise DGemmaError("every row needs at least one prompt token (its attention_mask row is all False)")
    lens = torch.tensor([p.numel() for p in prompts])
    stepper = ar_stepper_for(backbone, B, int(lens.max()) + max_new_tokens, compile)
    eos_t = torch.tensor(eos_ids or [], dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    nxt = stepper.prefill(prompts)
    for i in range(max_new_tokens):
        if pad_id is not None:
            nxt = torch.where(finished, pad_id, nxt)
        out.append(nxt[:, None])
        if len(eos_t):
            finished |= torch.isin(nxt, eos_t)
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        nxt = stepper.step(nxt, lens + i)
    ids = input_ids.to(dev)
    seq = torch.cat([ids] + out, dim=1)
    n = seq.shape[1] - P0
    return GenerateOutput(sequences=seq, tokens_per_forward=torch.ones(B, device=dev),
                          steps_per_canvas=[[n] for _ in range(B)], finish_reasons=[
                              "eos" if f else "length" for f in finished.tolist()], num_canvases=0)
