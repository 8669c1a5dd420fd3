"""The entropy-bound sampler as pure tensor functions (spec §4.2–4.4), in two forms of one algorithm.

- The reference form reproduces HF's arithmetic and draw order exactly (dtype of the temperature, entropy via
  normalised log-probs clamped at the dtype minimum, unstable sort, torch's generator), so a seed gives the
  reference's tokens.
- The fast form (`fast_draw`, `uniform_tokens`) draws from the same distributions with a counter-based
  generator: every random number is a hash of (request seed, canvas, step, salt, position), so a request's draws
  never depend on its batch, its neighbours or the device. The sample is an inverse-CDF draw over the
  exponentials the entropy needs anyway (two uniforms per position), the soft embedding's probabilities come
  from the same pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
SAMPLE, RENOISE, INIT = 1, 2, 3  # stream salts (< 4): the sample, the renoising tokens, a canvas's first noise
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²), c < 2³², with every intermediate below 2⁶³."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2³²) with low bias (C. Wellons' `lowbias32`: xor-shift, multiply, twice)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A request's seed (any Python int, taken modulo 2⁶⁴) as the 32-bit key its streams start from."""
    s = int(seed) % (1 << 64)
    return hash32(hash32((s & M32) ^ 0x6A09E667) ^ (s >> 32))


def stream_keys(key: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, salt: int, length: int):
    """Keys [R, length] of one random stream per (request key [R] from `seed_key`, canvas [R], step [R] < 2³⁰,
    salt < 4, position)."""
    h = hash32(hash32(key ^ (canvas & M32)) ^ ((step << 2) | salt))
    return hash32(h[:, None] ^ _mul32(torch.arange(length, device=key.device), _GOLDEN))


def uniform_tokens(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """One uniform token in [0, vocab) per key (multiply-shift of a 32-bit hash)."""
    return (hash32(keys) * vocab) >> 32


BLOCK = 128  # the vocabulary is sampled in two levels: a block of BLOCK entries, then an entry inside it


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """Two independent uniforms in (0, 1) per key, float64 on a grid of 2⁻³²: [N] -> [N, 2]."""
    return torch.stack([(hash32(keys ^ c).double() + 0.5) * 2.0 ** -32 for c in (0x243F6A88, 0x85A308D3)], -1)


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index j with Σ_{i<j} w_i ≤ u·Σw < Σ_{i≤j} w_i: a draw from w [N, n] (≥ 0, not all 0) with u [N] in [0, 1).
    The running sums are float64, so an index is drawn with its probability to within the uniforms' 2⁻³² grid; an
    entry of weight 0 is never drawn (short of u·Σw rounding up to Σw, which the clamp keeps in range)."""
    c = w.double().cumsum(-1)
    return (c <= (u * c[:, -1])[:, None]).sum(-1).clamp(max=w.shape[-1] - 1)


def fast_draw(raw: torch.Tensor, T: torch.Tensor, keys: torch.Tensor):
    """One pass over logits raw [N, V] at temperatures T [N]: returns (sample, argmax, entropy, probabilities).

    z = raw / T; the entropy is log Σ e^{z−m} − Σ p (z − m). The sample is an inverse-CDF draw from softmax(z) in
    two levels (a block of `BLOCK` entries by the block sums, then an entry inside it, one uniform each), so the
    only work over [N, V] is the block sums beside the exponentials the entropy needs anyway. Logits more than
    log(2¹²⁶/V) ≈ 78 below the row's maximum (for V = 8192) are raised to that floor, so no probability is a
    subnormal float: subnormal arithmetic is many times slower on x86 CPUs (in the exp and in the
    self-conditioning product). The floor gives such an entry a probability below V·2⁻¹²⁶ (≈ 10⁻³⁴) instead of
    a smaller one; all of them together move the distribution by less than V²·2⁻¹²⁶."""
    N, V = raw.shape
    z = raw / T[:, None]
    m, amax = z.max(dim=-1)
    zs = (z - m[:, None]).clamp_(min=math.log(torch.finfo(z.dtype).tiny) + math.log(V))
    e = torch.exp(zs)
    eb = (F.pad(e, (0, -V % BLOCK)) if V % BLOCK else e).view(N, -1, BLOCK)
    block_sums = eb.sum(-1)
    s = block_sums.sum(-1)
    h = (torch.log(s) - (e * zs).sum(-1) / s).clamp(min=0)
    u = uniforms(keys)
    blk = inverse_cdf(block_sums, u[:, 0])
    inside = inverse_cdf(eb.gather(1, blk[:, None, None].expand(N, 1, BLOCK))[:, 0], u[:, 1])
    return blk * BLOCK + inside, amax, h, e / s[:, None]


def accept_stable(h: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`entropy_bound_accept` with a stable sort (ties broken by position) and a bound per row [R]."""
    hs, order = torch.sort(h, dim=-1, stable=True)
    keep = torch.cumsum(hs, dim=-1) - hs <= bound[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)
