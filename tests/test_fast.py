"""The fast path: the counter-based sampler (exact in distribution), the one packed forward (a token's result does
not depend on the rest of the pass), seeds, and the compiled step."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import dgemma
from dgemma import sampling
from dgemma.model import Batch, ops
from dgemma.presets import init_checkpoint
from dgemma.step import Stepper


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dgemma.load(init_checkpoint("tiny", tmp_path_factory.mktemp("tiny")))


def _chi2_limit(df: int, z: float = 5.0) -> float:
    """Upper tail of χ²(df) at ~z standard normal deviations (Wilson–Hilferty): p ≈ 3e-7 for z = 5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.4, 0.8, 1.5])
@pytest.mark.parametrize("V,spread", [(24, 3.0), (300, 2.5)])
def test_fast_draw_frequencies_match_softmax(T, V, spread):
    """2·10^5 draws (one per key) from fixed logits: the frequencies match softmax(z / T) (chi-square), and the
    test has power: against softmax(z) (temperature ignored) the statistic is far past the limit. V = 300 spans
    three sampling blocks, the last one partly padding."""
    n = 200_000
    z = torch.linspace(-spread / 2, spread / 2, V)[torch.randperm(V, generator=torch.Generator().manual_seed(1))]
    keys = sampling.stream_keys(torch.tensor([sampling.seed_key(7)]), torch.tensor([0]), torch.tensor([1]), sampling.SAMPLE, n)[0]
    samp, *_ = sampling.fast_draw(z.expand(n, V), torch.full((n,), T), keys)
    counts = torch.bincount(samp, minlength=V).double()

    def chi2(p):
        expected = n * p.double()
        return float(((counts - expected) ** 2 / expected).sum())

    limit = _chi2_limit(V - 1)
    assert n * float(torch.softmax(z / T, -1).min()) >= 5  # the χ² approximation holds
    assert chi2(torch.softmax(z / T, -1)) < limit
    assert chi2(torch.softmax(z, -1)) > 5 * limit


def test_fast_draw_entropy_argmax_probs_equal_the_reference_functions():
    g = torch.Generator().manual_seed(0)
    raw = 8 * torch.randn(64, 1000, generator=g)
    raw[3] = 0.0  # uniform row: every index ties for the argmax
    raw[5, 17] = 400.0  # one-hot row (entropy 0)
    T = torch.rand(64, generator=g) + 0.3
    samp, amax, h, p = sampling.fast_draw(raw, T, torch.arange(64))
    z = raw / T[:, None]
    torch.testing.assert_close(h, sampling.entropy(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, torch.softmax(z, -1), rtol=1e-5, atol=1e-7)
    assert torch.equal(amax, torch.argmax(z, -1))
    assert float(h[3]) == pytest.approx(math.log(1000), rel=1e-6) and float(h[5]) < 1e-25
    assert int(samp[5]) == 17 and samp.min() >= 0 and samp.max() < 1000


def test_counter_based_draws_depend_only_on_their_key():
    """A draw is a function of (seed, canvas, step, salt, position[, vocabulary index]): the same key gives the
    same numbers in any batch, any other key gives other numbers."""
    seed = torch.tensor([sampling.seed_key(s) for s in (1, 2, 1 + 2 ** 32)])
    one = sampling.stream_keys(seed, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), sampling.SAMPLE, 64)
    assert torch.equal(one[0], sampling.stream_keys(seed[:1], torch.tensor([0]), torch.tensor([1]),
                                                    sampling.SAMPLE, 64)[0])
    others = [one[1], one[2],
              sampling.stream_keys(seed[:1], torch.tensor([1]), torch.tensor([1]), sampling.SAMPLE, 64)[0],
              sampling.stream_keys(seed[:1], torch.tensor([0]), torch.tensor([2]), sampling.SAMPLE, 64)[0],
              sampling.stream_keys(seed[:1], torch.tensor([0]), torch.tensor([1]), sampling.RENOISE, 64)[0]]
    for o in others:
        assert (o != one[0]).float().mean() > 0.99
    assert one.unique().numel() == one.numel()  # positions get distinct keys
    x = torch.arange(100_000) * 7919
    assert sampling.hash32(x).unique().numel() == x.numel()  # a bijection: no collisions
    tok = sampling.uniform_tokens(one.reshape(-1), 1000)
    assert tok.min() >= 0 and tok.max() < 1000
    u = sampling.uniforms(one.reshape(-1))
    assert u.dtype == torch.float64 and u.shape == (192, 2) and (u >= 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.05 and abs(float(torch.corrcoef(u.t())[0, 1])) < 0.2


def test_inverse_cdf_never_draws_a_zero_weight():
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(5, 5)
    u = torch.tensor([0.0, 0.25 - 1e-12, 0.25, 0.9, 1 - 2 ** -53], dtype=torch.float64)
    assert sampling.inverse_cdf(w, u).tolist() == [1, 1, 3, 3, 3]


def test_fast_draw_has_no_subnormal_probabilities():
    """Logits far below the maximum get a probability of at most V·2⁻¹²⁶, never a subnormal float (slow on x86);
    the rest are untouched."""
    raw = torch.tensor([[0.0, -20.0, -86.0, -200.0] + [-300.0] * 4])
    _, _, _, p = sampling.fast_draw(raw, torch.ones(1), torch.arange(1))
    tiny = torch.finfo(torch.float32).tiny
    assert float(p[0, 1]) == pytest.approx(math.exp(-20), rel=1e-5)
    assert (p[0, 2:] >= tiny).all() and (p[0, 2:] <= 8 * tiny * 1.001).all()


def test_accept_stable_equals_entropy_bound_accept_without_ties():
    g = torch.Generator().manual_seed(3)
    h = torch.rand(16, 256, generator=g) * 2
    for bound in (0.0, 0.1, 3.0, 1e9):
        assert torch.equal(sampling.accept_stable(h, torch.full((16,), bound)),
                           sampling.entropy_bound_accept(h, bound))


# ---------------------------------------------------------------------------------------------------------------
# seeds and batch invariance
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_tokens_and_rows_do_not_depend_on_the_batch(tiny):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=g) for n in (3, 11, 7)]
    kw = dict(max_new_tokens=40, max_denoising_steps=9, confidence_threshold=0.3)
    alone = [tiny.generate(p[None], seed=10 + i, **kw).sequences[0] for i, p in enumerate(prompts)]
    assert torch.equal(tiny.generate(prompts[0][None], seed=10, **kw).sequences[0], alone[0])
    assert not torch.equal(tiny.generate(prompts[0][None], seed=11, **kw).sequences[0], alone[0])
    # the same rows left-padded into one batch, one seed per row
    P = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(P - len(p), dtype=torch.long), p]) for p in prompts])
    am = torch.stack([torch.arange(P) >= P - len(p) for p in prompts])
    out = tiny.generate(ids, am, seed=[10, 11, 12], **kw)
    for i, p in enumerate(prompts):
        mine = alone[i][len(p):]
        assert torch.equal(out.sequences[i, P:P + len(mine)], mine), f"row {i} changed in a batch"


def test_ar_rows_do_not_depend_on_the_batch(tiny):
    """Greedy AR on the fast forward: a left-padded row gives the tokens it gives alone."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 500, (n,), generator=g) for n in (4, 9)]
    alone = [tiny.generate_ar(p[None], max_new_tokens=20, eos_token_id=None).sequences[0, len(p):] for p in prompts]
    ids = torch.stack([torch.cat([torch.zeros(9 - len(p), dtype=torch.long), p]) for p in prompts])
    out = tiny.generate_ar(ids, ids != 0, max_new_tokens=20, eos_token_id=None)
    for i in range(2):
        assert torch.equal(out.sequences[i, 9:], alone[i]), f"row {i} changed in a batch"


def test_packed_forward_equals_per_request_forward(tiny):
    """One fast forward over [request A's canvas ; request B's canvas ; A's encode] gives each token exactly what
    a forward over that request's tokens alone gives (fp32, CPU)."""
    bb, L = tiny.backbone, tiny.config.canvas_length
    V = tiny.config.text.vocab_size
    g = torch.Generator().manual_seed(2)
    prompt_a, prompt_b = torch.randint(3, V, (21,), generator=g), torch.randint(3, V, (5,), generator=g)
    canvas_a, canvas_b = torch.randint(3, V, (L,), generator=g), torch.randint(3, V, (L,), generator=g)

    def run(parts, slots=2):
        cache = bb.new_cache(slots + 1, 256)
        with torch.no_grad():
            for slot, prompt in parts["prefill"]:  # prompts first, alone
                bb.forward(Batch.rectangle(prompt[None], 0, canvas=False, slots=torch.tensor([slot])), cache,
                           numerics="fast")
            return bb.forward(parts["batch"], cache, numerics="fast")

    def canvas_batch(items, encode=None):
        ids = torch.cat([c for _, c, _ in items])
        pos = torch.cat([s + torch.arange(L) for _, _, s in items])
        slot = torch.cat([torch.full((L,), k) for k, _, _ in items])
        anchor = torch.cat([torch.full((L,), s) for _, _, s in items])
        rects = [(len(items), L)]
        if encode is not None:
            k, toks, s = encode
            n = len(toks)
            ids, pos = torch.cat([ids, toks]), torch.cat([pos, s + torch.arange(n)])
            slot, anchor = torch.cat([slot, torch.full((n,), k)]), torch.cat([anchor, s + torch.arange(n)])
            rects.append((1, n))
        hi = torch.where(torch.arange(len(ids)) < len(items) * L, anchor + L, anchor + 1)
        return Batch(ids, pos, slot, anchor, hi, len(items) * L, tuple(rects))

    # A: prompt encoded, canvas at 21 + 8 with the 8 tokens [21, 29) encoded in the same pass
    extra = torch.randint(3, V, (8,), generator=g)
    packed = run({"prefill": [(0, prompt_a), (1, prompt_b)],
                  "batch": canvas_batch([(0, canvas_a, 29), (1, canvas_b, 5)], encode=(0, extra, 21))})
    only_a = run({"prefill": [(0, prompt_a)], "batch": canvas_batch([(0, canvas_a, 29)], encode=(0, extra, 21))})
    only_b = run({"prefill": [(1, prompt_b)], "batch": canvas_batch([(1, canvas_b, 5)])})
    assert torch.equal(packed[:L], only_a[:L])
    assert torch.equal(packed[L:2 * L], only_b)
    assert torch.equal(packed[2 * L:], only_a[L:])


def test_fast_and_reference_samplers_agree_in_distribution(tiny):
    """Over many seeds the two samplers' first-canvas argmax tokens have the same token distribution (the same
    algorithm, other random numbers): a coarse two-sample check on the frequency of the most common tokens."""
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=8, max_denoising_steps=4, confidence_threshold=1e-9, eos_token_id=None)
    fast = torch.cat([tiny.generate(ids, seed=s, **kw).sequences[0, 3:] for s in range(60)])
    ref = torch.cat([tiny.generate(ids, seed=s, sampler="reference", **kw).sequences[0, 3:] for s in range(60)])
    top = torch.bincount(torch.cat([fast, ref])).topk(5).indices
    for t in top:
        a, b = float((fast == t).float().mean()), float((ref == t).float().mean())
        se = math.sqrt((a * (1 - a) + b * (1 - b)) / fast.numel()) + 1e-3
        assert abs(a - b) < 5 * se, (int(t), a, b)


# ---------------------------------------------------------------------------------------------------------------
# the compiled step
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    return dgemma.load(micro_checkpoint)


def test_compiled_forward_matches_eager(micro):
    """Under torch.compile(fullgraph=True) (inductor) the fast forward's logits equal the eager ones within 1e-4."""
    bb, L = micro.backbone, micro.config.canvas_length
    V = micro.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (13,), generator=g)
    canvas = torch.randint(3, V, (1, L), generator=g)

    pad = ops.gemm_pad(bb.dtype, bb.device)  # probed outside the graph (the step holds its own)

    def logits(cache):
        bb.forward(Batch.rectangle(prompt[None], 0, canvas=False), cache, numerics="fast", pad=pad)
        x = bb.forward(Batch.rectangle(canvas, 13, canvas=True), cache, numerics="fast", pad=pad)
        return bb.logits(x, pad)

    with torch.no_grad():
        eager = logits(bb.new_cache(1, 64))
        compiled = torch.compile(logits, fullgraph=True, dynamic=False)(bb.new_cache(1, 64))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)  # |logits| ~ 5-30: fp32 summation order


@pytest.mark.skipif(not os.environ.get("DGEMMA_SLOW_TESTS"),
                    reason="compiling the whole step takes ~3 minutes on 2 cores; DGEMMA_SLOW_TESTS=1 runs it "
                           "(benchmarks/gpu_check.sh does)")
def test_compiled_step_builds_fullgraph_and_matches_eager(micro):
    """The whole step (forward + sampler + state updates) builds as one graph (fullgraph=True) and gives the eager
    step's entropies within 1e-4 and its argmax draft."""
    bb, L = micro.backbone, micro.config.canvas_length
    prompt = torch.randint(3, micro.config.text.vocab_size, (13,), generator=torch.Generator().manual_seed(0))
    gcfg = micro.generation_config.merged(max_denoising_steps=6)
    enc = torch.zeros(5, 1, 16, dtype=torch.long)
    ent = {}
    for on in (False, True):
        st = Stepper(bb, 2, 64, L, compile=False)
        st.start_row(0, gcfg, 3, len(prompt))
        enc[0, 0, :13], enc[1, 0], enc[2:4, 0], enc[2, 0, 13:] = prompt, torch.arange(16), 0, st.scratch
        enc[4, 0, :13] = torch.arange(1, 14)
        fn = torch.compile(st._iterate, fullgraph=True, dynamic=False) if on else st._iterate
        with torch.no_grad():
            first = fn(torch.tensor([0]), torch.tensor([True]), enc)
            second = fn(torch.tensor([0]), torch.tensor([False]), torch.zeros(5, 0, 0, dtype=torch.long))
        ent[on] = (first[3], second[3], first[0])
    torch.testing.assert_close(ent[True][0], ent[False][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ent[True][1], ent[False][1], rtol=0, atol=1e-4)
    assert torch.equal(ent[True][2], ent[False][2])  # the first step's argmax draft


@pytest.mark.skipif(not os.environ.get("DGEMMA_SLOW_TESTS"),
                    reason="compiling the AR token pass takes minutes on 2 cores; DGEMMA_SLOW_TESTS=1 runs it")
def test_compiled_ar_step_matches_eager(micro):
    ids = torch.tensor([[5, 6, 7, 8]])
    eager = micro.generate_ar(ids, max_new_tokens=12, eos_token_id=None, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no eager fallback
        compiled = micro.generate_ar(ids, max_new_tokens=12, eos_token_id=None, compile=True)
    st = next(v for k, v in micro.backbone._dgemma_steppers.items() if k[0] == "ar" and k[-1])
    assert st._token.compiled is not None and st._token.enabled
    assert (compiled.sequences == eager.sequences).float().mean() > 0.9
