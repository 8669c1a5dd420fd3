"""Tests for the pure sampler functions in dgemma.sampling (spec §4.2–4.5), on hand-made tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma import sampling
from dgemma.sampling import StableConfidentStop, entropy, entropy_bound_accept, finalize_canvas, temperature

NEG_INF = float("-inf")


# ---------------------------------------------------------------- temperature (spec §4.2)


@pytest.mark.parametrize("N", [1, 7, 48])
@pytest.mark.parametrize("t_min,t_max", [(0.4, 0.8), (0.0, 1.0), (0.25, 2.5)])
def test_temperature_linear_schedule(N: int, t_min: float, t_max: float) -> None:
    for n in range(N, 0, -1):
        T = temperature(n, N, t_min, t_max)
        assert isinstance(T, torch.Tensor)
        assert T.dtype == torch.float32
        assert T.dim() == 0
        want = t_min + (t_max - t_min) * n / N
        assert abs(T.item() - want) <= 1e-7 * max(1.0, want)  # fp32: 1e-7 absolute below 1, relative above


def test_temperature_endpoints_never_reach_t_min() -> None:
    N, t_min, t_max = 48, 0.4, 0.8
    assert temperature(N, N, t_min, t_max).item() == pytest.approx(t_max, abs=1e-7)
    last = temperature(1, N, t_min, t_max).item()
    assert last == pytest.approx(t_min + (t_max - t_min) / N, abs=1e-7)
    assert last > t_min + 1e-3  # the last step is t_min + (t_max - t_min)/N, never t_min itself
    assert all(temperature(n, N, t_min, t_max).item() > t_min for n in range(1, N + 1))


def test_temperature_matches_reference_arithmetic() -> None:
    """The reference divides an int32 step tensor by N and scales with Python floats: bit-identical fp32."""
    N, t_min, t_max = 48, 0.4, 0.8
    for n in (48, 31, 17, 1):
        want = t_min + (t_max - t_min) * (torch.tensor(n, dtype=torch.int32) / N)
        assert torch.equal(temperature(n, N, t_min, t_max), want)


# ---------------------------------------------------------------- entropy (spec §4.3)


@pytest.mark.parametrize("V", [2, 17, 256])
def test_entropy_uniform_is_log_v(V: int) -> None:
    for z in (torch.zeros(3, 5, V), torch.full((3, 5, V), 12.5), torch.full((3, 5, V), -40.0)):
        h = entropy(z)
        assert h.shape == (3, 5)
        torch.testing.assert_close(h, torch.full((3, 5), math.log(V)), atol=1e-5, rtol=0)


def test_entropy_one_hot_is_zero_and_finite_with_neg_inf() -> None:
    V = 64
    huge = torch.zeros(2, 4, V)
    huge[..., 7] = 1e4  # one huge value: a one-hot distribution in fp32
    h = entropy(huge)
    assert torch.isfinite(h).all()
    assert h.abs().max().item() < 1e-6

    masked = torch.full((2, 4, V), NEG_INF)
    masked[..., 3] = 0.5  # everything else -inf: exactly one-hot
    h = entropy(masked)
    assert not torch.isnan(h).any()
    assert torch.isfinite(h).all()
    assert h.abs().max().item() == 0.0

    partly = torch.randn(2, 4, V, generator=torch.Generator().manual_seed(0))
    partly[..., ::3] = NEG_INF  # some vocab entries impossible
    h = entropy(partly)
    assert torch.isfinite(h).all()
    dense = partly[..., [i for i in range(V) if i % 3]]
    torch.testing.assert_close(h, entropy(dense), atol=1e-5, rtol=0)  # -inf entries contribute nothing


def test_entropy_two_way_known_value() -> None:
    p = 0.2
    z = torch.tensor([[math.log(p), math.log(1 - p)]])
    want = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert entropy(z).item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_equals_categorical_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 8, 256, generator=g) * (1 + 10 * seed)
    assert z.dtype == torch.float32
    assert torch.equal(entropy(z), torch.distributions.Categorical(logits=z).entropy())
    z[0, :, ::5] = NEG_INF
    z[1, 2, :] = NEG_INF
    z[1, 2, 9] = 3.0
    assert torch.equal(entropy(z), torch.distributions.Categorical(logits=z).entropy())
    z[2, 0, 4] = float("nan")  # NaN and +inf rows: NaN like the reference, the other rows unchanged
    z[2, 1, 4] = float("inf")
    want = torch.distributions.Categorical(logits=z, validate_args=False).entropy()
    torch.testing.assert_close(entropy(z), want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- entropy_bound_accept (spec §4.3)


def test_accept_hand_computed_example() -> None:
    # sorted [0.01, 0.05, 0.2, 0.3]; sum of strictly lower-ranked ones [0, 0.01, 0.06, 0.26] vs bound 0.1
    # -> ranks 0, 1, 2 pass: positions 1 (0.01), 2 (0.05) and 3 (0.2); position 0 (0.3, the highest) fails
    h = torch.tensor([[0.3, 0.01, 0.05, 0.2]])
    acc = entropy_bound_accept(h, 0.1)
    assert acc.dtype == torch.bool
    assert acc.tolist() == [[False, True, True, True]]
    # a bigger bound admits the last one too (0.26 <= 0.3); a bound between 0.01 and 0.06 admits two
    assert entropy_bound_accept(h, 0.3).tolist() == [[True, True, True, True]]
    assert entropy_bound_accept(h, 0.03).tolist() == [[False, True, True, False]]


def test_accept_boundary_is_inclusive() -> None:
    # exactly representable values: sorted 0.25 (pos 1), 0.5 (pos 2), 1.0 (pos 0), 2.0 (pos 3);
    # lower-ranked sums [0, 0.25, 0.75, 1.75]
    h = torch.tensor([[1.0, 0.25, 0.5, 2.0]])
    assert entropy_bound_accept(h, 0.75).tolist() == [[True, True, True, False]]
    assert entropy_bound_accept(h, 0.7499).tolist() == [[False, True, True, False]]
    assert entropy_bound_accept(h, 1.75).tolist() == [[True, True, True, True]]


@pytest.mark.parametrize("bound", [1e-30, 1e-12, 0.0])
def test_accept_lowest_entropy_always_accepted(bound: float) -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.rand(5, 16, generator=g) + 0.5
    acc = entropy_bound_accept(h, bound)
    assert acc.sum(-1).tolist() == [1] * 5
    assert torch.equal(acc.float().argmax(-1), h.argmin(-1))


def test_accept_ties() -> None:
    # four equal entropies: lower-ranked sums [0, 0.25, 0.5, 0.75], so exactly three of them pass bound 0.5
    acc = entropy_bound_accept(torch.full((1, 4), 0.25), 0.5)
    assert acc.sum().item() == 3
    # two zeros tie for the lowest rank: both accepted; of the two tied 0.5s exactly one (sums [0, 0, 0, 0.5])
    acc = entropy_bound_accept(torch.tensor([[0.5, 0.0, 0.0, 0.5]]), 0.0)
    assert acc[0, 1] and acc[0, 2]
    assert acc.sum().item() == 3
    assert bool(acc[0, 0]) != bool(acc[0, 3])
    # all zero: everything accepted
    assert entropy_bound_accept(torch.zeros(2, 6), 0.1).all()


def test_accept_batch_rows_independent() -> None:
    g = torch.Generator().manual_seed(5)
    h = torch.rand(6, 32, generator=g) * 0.05
    h[2] *= 100  # one row of high entropies
    h[4] = 0.0
    acc = entropy_bound_accept(h, 0.1)
    assert acc.shape == h.shape
    for b in range(h.shape[0]):
        assert torch.equal(acc[b], entropy_bound_accept(h[b : b + 1], 0.1)[0])
    assert acc[4].all()
    assert acc[2].sum().item() == 1
    # brute force: position i is accepted iff the sum of entropies ranked strictly below it is <= bound
    for b in range(h.shape[0]):
        hs, order = torch.sort(h[b])
        below = torch.cumsum(hs, 0) - hs
        want = torch.zeros(32, dtype=torch.bool)
        want[order] = below <= 0.1
        assert torch.equal(acc[b], want)


# ---------------------------------------------------------------- StableConfidentStop (spec §4.4)


def _low(B: int = 2, L: int = 4) -> torch.Tensor:
    return torch.full((B, L), 0.001)


def test_stop_s1_needs_same_argmax_twice() -> None:
    stop = StableConfidentStop(1, 0.005)
    a = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    assert stop(a, _low()).tolist() == [False, False]  # the first step is never stable
    assert stop(a, _low()).tolist() == [True, True]
    b = a.clone()
    b[1, 2] = 0
    assert stop(b, _low()).tolist() == [True, False]  # row 1 changed at one position
    assert stop(b, _low()).tolist() == [True, True]


def test_stop_first_call_never_stable_even_for_minus_one_free_input() -> None:
    # the history starts at -1; no real token id equals it, so the first S calls are never stable
    for S in (1, 2, 4):
        stop = StableConfidentStop(S, 1.0)
        a = torch.zeros(3, 5, dtype=torch.long)
        for _ in range(S):
            assert not stop(a, torch.zeros(3, 5)).any()
        assert stop(a, torch.zeros(3, 5)).all()


def test_stop_s3_needs_three_previous_identical() -> None:
    stop = StableConfidentStop(3, 0.005)
    a = torch.tensor([[1, 2, 3]])
    c = torch.tensor([[1, 2, 4]])
    assert stop(a, _low(1, 3)).tolist() == [False]
    assert stop(a, _low(1, 3)).tolist() == [False]
    assert stop(a, _low(1, 3)).tolist() == [False]
    assert stop(a, _low(1, 3)).tolist() == [True]  # three previous identical
    assert stop(c, _low(1, 3)).tolist() == [False]  # a change resets...
    assert stop(a, _low(1, 3)).tolist() == [False]  # ...and c stays in the history for three calls
    assert stop(a, _low(1, 3)).tolist() == [False]
    assert stop(a, _low(1, 3)).tolist() == [False]
    assert stop(a, _low(1, 3)).tolist() == [True]


def test_stop_s0_always_stable() -> None:
    stop = StableConfidentStop(0, 0.005)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a = torch.randint(0, 100, (2, 4), generator=g)
        assert stop(a, _low()).tolist() == [True, True]
    assert stop(a, torch.tensor([[0.001] * 4, [1.0] * 4])).tolist() == [True, False]


def test_stop_confidence_is_strict_mean_entropy() -> None:
    stop = StableConfidentStop(0, 0.5)
    a = torch.zeros(1, 4, dtype=torch.long)
    assert stop(a, torch.full((1, 4), 0.5)).tolist() == [False]  # mean == threshold: not confident
    assert stop(a, torch.full((1, 4), 0.25)).tolist() == [True]
    # the mean, not the max: one high position is fine if the mean stays below
    assert stop(a, torch.tensor([[0.0, 0.0, 0.0, 1.75]])).tolist() == [True]  # mean 0.4375
    assert stop(a, torch.tensor([[0.0, 0.0, 0.0, 2.0]])).tolist() == [False]  # mean 0.5
    # stable but not confident (S=1)
    stop = StableConfidentStop(1, 0.5)
    stop(a, torch.zeros(1, 4))
    assert stop(a, torch.ones(1, 4)).tolist() == [False]
    assert stop(a, torch.zeros(1, 4)).tolist() == [True]


def test_stop_reset_clears_history() -> None:
    stop = StableConfidentStop(1, 0.005)
    a = torch.tensor([[1, 2]])
    stop(a, _low(1, 2))
    assert stop(a, _low(1, 2)).tolist() == [True]
    stop.reset()
    assert stop.history is None
    assert stop(a, _low(1, 2)).tolist() == [False]
    assert stop(a, _low(1, 2)).tolist() == [True]


# ---------------------------------------------------------------- finalize_canvas (spec §4.5)


def test_finalize_pads_after_first_eos() -> None:
    new = torch.tensor([[5, 1, 6, 1, 7], [8, 9, 10, 11, 12], [1, 3, 4, 5, 6]])
    finished = torch.tensor([False, False, False])
    out, fin = finalize_canvas(new, finished, [1], 0)
    assert out.tolist() == [[5, 1, 0, 0, 0], [8, 9, 10, 11, 12], [1, 0, 0, 0, 0]]
    assert fin.tolist() == [True, False, True]
    assert new.tolist()[0] == [5, 1, 6, 1, 7]  # input not modified in place
    assert not finished.any()


def test_finalize_previously_finished_row_all_pad() -> None:
    new = torch.tensor([[5, 6, 7, 8], [4, 4, 4, 4], [9, 1, 3, 3]])
    out, fin = finalize_canvas(new, torch.tensor([True, False, False]), [1], 0)
    assert out.tolist() == [[0, 0, 0, 0], [4, 4, 4, 4], [9, 1, 0, 0]]
    assert fin.tolist() == [True, False, True]
    # previously finished and no EOS anywhere now: still padded, other rows untouched
    out, fin = finalize_canvas(torch.tensor([[5, 6], [7, 8]]), torch.tensor([True, False]), [1], 0)
    assert out.tolist() == [[0, 0], [7, 8]]
    assert fin.tolist() == [True, False]
    # previously finished and an EOS again: whole canvas pad (the EOS too)
    out, _ = finalize_canvas(torch.tensor([[1, 6], [7, 8]]), torch.tensor([True, False]), [1], 0)
    assert out.tolist() == [[0, 0], [7, 8]]


def test_finalize_no_eos_untouched() -> None:
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out, fin = finalize_canvas(new, torch.tensor([False, False]), [1], 0)
    assert torch.equal(out, new)
    assert fin.tolist() == [False, False]


def test_finalize_empty_eos_changes_nothing() -> None:
    new = torch.tensor([[5, 1, 7], [8, 9, 10]])
    out, fin = finalize_canvas(new, torch.tensor([False, False]), [], 0)
    assert torch.equal(out, new)
    assert fin.tolist() == [False, False]
    # a row finished before still gets padded (rule 1 needs only pad and a finished row)
    out, fin = finalize_canvas(new, torch.tensor([False, True]), [], 0)
    assert out.tolist() == [[5, 1, 7], [0, 0, 0]]
    assert fin.tolist() == [False, True]


def test_finalize_pad_none_pads_nothing_but_updates_finished() -> None:
    new = torch.tensor([[5, 1, 6, 1], [7, 8, 9, 10], [3, 3, 3, 3]])
    out, fin = finalize_canvas(new, torch.tensor([False, False, True]), [1], None)
    assert torch.equal(out, new)
    assert fin.tolist() == [True, False, True]


def test_finalize_multiple_eos_ids() -> None:
    new = torch.tensor([[5, 7, 6, 1, 8], [5, 6, 1, 7, 8], [2, 3, 4, 5, 6]])
    out, fin = finalize_canvas(new, torch.tensor([False, False, False]), [1, 7], 0)
    assert out.tolist() == [[5, 7, 0, 0, 0], [5, 6, 1, 0, 0], [2, 3, 4, 5, 6]]
    assert fin.tolist() == [True, True, False]


def test_finalize_pad_equal_to_eos() -> None:
    # pad id that is also an EOS id (some checkpoints do this): same result, nothing after the first EOS survives
    out, fin = finalize_canvas(torch.tensor([[5, 1, 6, 7]]), torch.tensor([False]), [1], 1)
    assert out.tolist() == [[5, 1, 1, 1]]
    assert fin.tolist() == [True]


# ---------------------------------------------------------------- RNG: noise and sample (spec §4.7)


def test_noise_reproducible_and_in_range() -> None:
    a = sampling.noise((3, 8), 256, torch.Generator().manual_seed(11))
    b = sampling.noise((3, 8), 256, torch.Generator().manual_seed(11))
    c = sampling.noise((3, 8), 256, torch.Generator().manual_seed(12))
    assert a.shape == (3, 8)
    assert a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    want = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, want)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        assert torch.equal(sampling.noise((3, 8), 256, None), a)  # None: the global RNG


def _probs(B: int, L: int, V: int, seed: int) -> torch.Tensor:
    z = torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed)) * 2
    return torch.softmax(z, dim=-1, dtype=torch.float32)


def test_sample_reproducible_and_matches_global_multinomial() -> None:
    B, L, V = 2, 8, 256
    probs = _probs(B, L, V, 0)
    a = sampling.sample(probs, torch.Generator().manual_seed(7))
    b = sampling.sample(probs, torch.Generator().manual_seed(7))
    assert a.shape == (B, L)
    assert torch.equal(a, b)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        want = torch.multinomial(probs.view(-1, V), 1).view(B, L)
        torch.manual_seed(7)
        glob = sampling.sample(probs, None)
    assert torch.equal(a, want)
    assert torch.equal(glob, want)


def test_sample_then_noise_consumes_rng_in_reference_order() -> None:
    """Per step: multinomial on [B*L, V], then randint(0, V, (B, L)), from one RNG (spec §4.7)."""
    B, L, V = 3, 4, 64
    probs = _probs(B, L, V, 1)
    g = torch.Generator().manual_seed(99)
    s, n = sampling.sample(probs, g), sampling.noise((B, L), V, g)
    with torch.random.fork_rng():
        torch.manual_seed(99)
        s2 = torch.multinomial(probs.view(-1, V), 1).view(B, L)
        n2 = torch.randint(0, V, (B, L))
    assert torch.equal(s, s2)
    assert torch.equal(n, n2)


def test_sample_one_hot_is_deterministic() -> None:
    V = 32
    idx = torch.tensor([[3, 31, 0], [7, 7, 12]])
    probs = torch.nn.functional.one_hot(idx, V).float()
    assert torch.equal(sampling.sample(probs, torch.Generator().manual_seed(0)), idx)
