"""The entropy-bound sampler as pure tensor functions (spec §4.2–4.4), in two forms of one algorithm.

- The reference form reproduces HF's arithmetic and draw order exactly (dtype of the temperature, entropy via
  normalised log-probs clamped at the dtype minimum, unstable sort, torch's generator), so a seed gives the
  reference's tokens.
- The fast form (`fast_draw`, `draw_tokens`) draws from the same distributions with a counter-based generator:
  every random number is a hash of (request seed, canvas, step, position[, vocabulary index]), so a request's
  draws never depend on its batch, its neighbours or the device, and the sample comes out of the same pass over
  the logits as the log-sum-exp, the entropy and the argmax.
"""

from __future__ import annotations

import torch


def temperature(n: int, N: int, t_min: float, t_max: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Linear schedule over steps *remaining* n = N…1: T = t_min + (t_max − t_min)·n/N, an fp32 scalar tensor
    (the reference divides an int32 step tensor by N)."""
    return t_min + (t_max - t_min) * (torch.tensor(n, dtype=torch.int32, device=device) / N)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(z) over the last dim, as torch's Categorical computes it: −Σ p·log p with
    log p = z − logsumexp(z) clamped at the dtype minimum."""
    logp = z - z.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(logp, dim=-1)
    return -(torch.clamp(logp, min=torch.finfo(z.dtype).min) * p).sum(-1)


def entropy_bound_accept(h: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept rank k of the ascending entropies iff Σ_{m≤k} h_(m) − h_(k) ≤ bound (spec §4.3).
    h [B, L] -> bool [B, L]. The lowest-entropy position is always accepted."""
    hs, order = torch.sort(h, dim=-1, descending=False)
    keep = torch.cumsum(hs, dim=-1) - hs <= bound
    return torch.scatter(torch.zeros_like(keep), dim=-1, index=order, src=keep)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One multinomial draw per position from probs [B, L, V] (fp32), in the reference's draw order."""
    B, L, V = probs.shape
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


# ---------------------------------------------------------------------------------------------------------------
# The fast form: counter-based random numbers (int64 tensors holding 32-bit values, so every device and compiler
# computes the same bits without relying on integer overflow)
# ---------------------------------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF
SAMPLE, RENOISE, INIT = 1, 2, 3  # salts: the race's exponentials, the renoising tokens, a canvas's first noise
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²), c < 2³², with every intermediate below 2⁶³."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2³²) with low bias (C. Wellons' `lowbias32`: xor-shift, multiply, twice)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """Any Python int seed as two 32-bit words (seeds are taken modulo 2⁶⁴)."""
    s = int(seed) % (1 << 64)
    return s & M32, s >> 32


def stream_keys(seed: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, salt: int, length: int):
    """Keys [R, length] of one random stream per (request seed [R, 2], canvas [R], step [R], salt, position)."""
    h = hash32(seed[:, 0] ^ 0x6A09E667)
    for part in (seed[:, 1], canvas, step):
        h = hash32(h ^ (part & M32))
    h = hash32(h ^ salt)
    return hash32(h[:, None] ^ _mul32(torch.arange(length, device=seed.device), _GOLDEN))


def uniform_tokens(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """One uniform token in [0, vocab) per key (multiply-shift of a 32-bit hash)."""
    return (hash32(keys) * vocab) >> 32


def exponentials(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) variates [N, vocab] (fp32): the inverse CDF of a uniform in (0, 1) from 23 bits of
    hash(key, vocabulary index); never 0 or infinite."""
    bits = hash32(keys[:, None] ^ _mul32(torch.arange(vocab, device=keys.device), _GOLDEN))
    u = ((bits >> 9) * 2 + 1).float() * (2.0 ** -24)
    return -torch.log(u)


def fast_draw(raw: torch.Tensor, T: torch.Tensor, keys: torch.Tensor):
    """One pass over logits raw [N, V] at temperatures T [N]: returns (sample, argmax, entropy, probabilities).

    z = raw / T; the sample is an exponential race, argmax_v p_v / e_v with e ~ Exp(1) (exactly a draw from
    softmax(z), up to the generator's 23-bit resolution); the entropy is log Σ e^{z−m} − Σ p (z − m)."""
    z = raw / T[:, None]
    m, amax = z.max(dim=-1)
    zs = z - m[:, None]
    e = torch.exp(zs)
    s = e.sum(-1)
    h = (torch.log(s) - (e * zs).sum(-1) / s).clamp(min=0)
    sample = torch.argmax(e / exponentials(keys, raw.shape[-1]), dim=-1)
    return sample, amax, h, e / s[:, None]


def accept_stable(h: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`entropy_bound_accept` with a stable sort (ties broken by position) and a bound per row [R]."""
    hs, order = torch.sort(h, dim=-1, stable=True)
    keep = torch.cumsum(hs, dim=-1) - hs <= bound[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)
