"""The entropy-bound sampler as pure tensor functions (spec §4.2–4.4).

Each function reproduces the reference's arithmetic exactly (dtype of the temperature, entropy via normalised
log-probs clamped at the dtype minimum, unstable sort), so a seed gives the reference's tokens.
"""

from __future__ import annotations

import os

import torch


def temperature(n: int, N: int, t_min: float, t_max: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Linear schedule over steps *remaining* n = N…1: T = t_min + (t_max − t_min)·n/N, an fp32 scalar tensor
    (the reference divides an int32 step tensor by N)."""
    return t_min + (t_max - t_min) * (torch.tensor(n, dtype=torch.int32, device=device) / N)


_FLUSH = -80.0  # exp(-80) = 1.8e-35: terms below it cannot move a float32 sum that holds exp(0) = 1


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """`z.logsumexp(-1, keepdim=True)` with torch's own steps (max, exp of the differences, sum, log, add back),
    except that differences below -80 are raised to -80 before the exp. torch's CPU exp is ~10x slower on arguments
    whose result is subnormal or zero, and at low temperature a third of a random model's [64, 8192] logits are
    there (entropy 4.8 -> 1.4 ms). The sum holds exp(0) = 1, so the ≤ V·1.8e-35 this adds is far below half a
    float32 ulp of it: the result is the same float (0 of 7,680 rows differed on the bench model; a difference
    needs the exact sum within 1e-31 of a rounding boundary)."""
    top = z.amax(dim=-1, keepdim=True)
    m = top.masked_fill(top.abs() == float("inf"), 0)
    out = (z - m).clamp_(min=_FLUSH).exp_().sum(dim=-1, keepdim=True).log_().add_(m)
    return torch.where(top == float("-inf"), top, out)  # an all −inf row: −inf, as torch (not the floor's −78.6)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(z) over the last dim: −Σ p·log p with log p = z − logsumexp(z) clamped
    at the dtype minimum (torch's Categorical). The clamp only changes log p = −inf, where p = 0 and the unclamped
    product is NaN; so on the CPU it is applied only when a row came out NaN (the same bits, one pass fewer)."""
    logp = z - logsumexp(z)
    p = torch.softmax(logp, dim=-1)
    h = -(logp * p).sum(-1) if z.device.type == "cpu" else None  # no host sync on accelerators: always clamp
    if h is None or bool(h.isnan().any()):
        h = -(torch.clamp(logp, min=torch.finfo(z.dtype).min) * p).sum(-1)
    return h


def entropy_bound_accept(h: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept rank k of the ascending entropies iff Σ_{m≤k} h_(m) − h_(k) ≤ bound (spec §4.3).
    h [B, L] -> bool [B, L]. The lowest-entropy position is always accepted."""
    hs, order = torch.sort(h, dim=-1, descending=False)
    keep = torch.cumsum(hs, dim=-1) - hs <= bound
    return torch.scatter(torch.zeros_like(keep), dim=-1, index=order, src=keep)


_TORCH_MULTINOMIAL = os.environ.get("DGEMMA_TORCH_MULTINOMIAL", "") not in ("", "0")  # A/B switch for benchmarks


def sample(probs: torch.Tensor, generator: torch.Generator | None, need: torch.Tensor | None = None) -> torch.Tensor:
    """One multinomial draw per position from probs [B, L, V] (fp32), in the reference's draw order.

    need: optional bool [B, L]: positions whose sample is used; on the CPU the others are not computed (they read
    0) while the generator advances exactly as for all of them."""
    B, L, V = probs.shape
    if probs.device.type == "cpu" and not _TORCH_MULTINOMIAL:  # same draws, without torch's scalar exponential_
        from .fastrand import multinomial1

        return multinomial1(probs.reshape(-1, V), generator, need).view(B, L)
    return torch.multinomial(probs.view(-1, V), num_samples=1, generator=generator).view(B, L)


def noise(shape: tuple[int, int], vocab: int, generator: torch.Generator | None,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform random tokens: the initial canvas and the renoising draw."""
    return torch.randint(0, vocab, shape, generator=generator, device=device)


class StableConfidentStop:
    """Stable-and-confident early stopping for one block (spec §4.4).

    stable: the argmax equals each of the last S argmax canvases at every position (history starts at −1, so the
    first S steps are never stable; S = 0 means always stable). confident: mean entropy < threshold."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.S = stability_threshold
        self.threshold = confidence_threshold
        self.history: torch.Tensor | None = None

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.S == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.S, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (h.mean(dim=-1) < self.threshold)


def finalize_canvas(new: torch.Tensor, finished: torch.Tensor, eos_ids: list[int],
                    pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """EOS / pad rules for a just-committed canvas `new` [B, L] (spec §4.5). Returns (canvas, finished)."""
    new = new.clone()
    this = torch.isin(new, torch.tensor(eos_ids, device=new.device)).any(-1) if eos_ids else torch.zeros_like(finished)
    prev = finished
    finished = prev | this
    if pad_id is not None and bool(finished.any()):
        new[prev] = pad_id
        if eos_ids and bool(this.any()):
            is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
            c = is_eos.cumsum(dim=-1)
            new[(c > 0) & ~((c == 1) & is_eos)] = pad_id
    return new, finished
