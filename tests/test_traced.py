"""The traced CPU decoder pass (dgemma/model/traced.py) gives the eager pass's exact bits, or steps aside."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.model import traced
from dgemma.presets import init_checkpoint


@pytest.fixture(autouse=True)
def quick_traces(monkeypatch):
    monkeypatch.setattr(traced, "TRACE_AFTER", 4)  # the policy's threshold is for speed; correctness is the same


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return dgemma.load(init_checkpoint("tiny", tmp_path_factory.mktemp("traced") / "tiny"), device="cpu")


def _eager(bb, *args, **kw):
    old, traced.ENABLED = traced.ENABLED, False
    try:
        return bb.denoise(*args, **kw)
    finally:
        traced.ENABLED = old


def _traces(bb):
    return [v for v in bb._traced.values() if not isinstance(v, (int, bool))]


def _prefilled(bb, B, P, left_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, bb.cfg.vocab_size, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[0, :left_pad] = False
    cache = bb.new_cache(B, P + 16)
    bb.encode(ids, cache, mask if left_pad else None)
    return cache


@torch.no_grad()
def test_trace_is_bit_exact_across_prefix_lengths_masks_and_signals(model):
    bb = model.backbone
    bb._traced.clear()
    g = torch.Generator().manual_seed(1)
    # (batch, prefix length, left padding of row 0): prefixes shorter and longer than the sliding window (32)
    cases = [(1, 20, 0), (1, 45, 0), (1, 31, 0), (2, 40, 5), (2, 12, 3)]
    checked = 0
    for B, P, pad in cases:
        cache = _prefilled(bb, B, P, pad, seed=P)
        canvas = torch.randint(0, bb.cfg.vocab_size, (B, 16), generator=g)
        sc = bb.soft_embed(_eager(bb, canvas, cache))
        sc_mask = torch.tensor([True, False])[:B]
        for kw in ({}, {"sc": sc}, {"sc": sc, "sc_mask": sc_mask}):
            want = _eager(bb, canvas, cache, **kw)
            for _ in range(traced.TRACE_AFTER + 3):  # eager calls, then the trace is made, then replayed
                assert torch.equal(bb.denoise(canvas, cache, **kw), want), (B, P, pad, sorted(kw))
                checked += 1
    # one trace per signature, shared by every prefix length: batch 1 without padding masks x 3 signal variants,
    # batch 2 with a full-attention mask only (the padding left the sliding window) or with both masks, x 3
    assert len(_traces(bb)) == len(bb._traced) == 9, bb._traced.keys()
    assert checked == len(cases) * 3 * (traced.TRACE_AFTER + 3)


def test_generation_is_the_same_with_and_without_the_trace(model, monkeypatch):
    kw = dict(max_new_tokens=48, seed=7, max_denoising_steps=12, confidence_threshold=1e-12, eos_token_id=None)
    ids = [[5, 9, 14, 200, 31, 7, 77, 3]]
    model.backbone._traced.clear()
    traced_out = model.generate(ids, **kw)
    assert _traces(model.backbone), "the run was long enough to trace"
    monkeypatch.setattr(traced, "ENABLED", False)
    eager_out = model.generate(ids, **kw)
    assert torch.equal(traced_out.sequences, eager_out.sequences)


@torch.no_grad()
def test_not_traced_with_gradients_or_when_switched_off(model, monkeypatch):
    bb = model.backbone
    cache = _prefilled(bb, 1, 20)
    canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16))
    monkeypatch.setattr(traced, "ENABLED", False)
    bb._traced.clear()
    for _ in range(traced.TRACE_AFTER + 2):
        bb.denoise(canvas, cache)
    assert not bb._traced
    monkeypatch.setattr(traced, "ENABLED", True)
    with torch.enable_grad():
        for _ in range(traced.TRACE_AFTER + 2):
            bb.denoise(canvas, cache)
    assert not bb._traced
    # large calls are GEMM-bound: a trace would not repay its making
    B = traced.TRACE_MAX_TOKENS // 16 + 1
    big_cache = _prefilled(bb, B, 20)
    big = torch.randint(0, bb.cfg.vocab_size, (B, 16))
    for _ in range(traced.TRACE_AFTER + 2):
        bb.denoise(big, big_cache)
    assert not bb._traced


@torch.no_grad()
def test_a_trace_that_fails_or_differs_falls_back_to_eager_with_a_warning(model, monkeypatch):
    bb = model.backbone
    cache = _prefilled(bb, 1, 20)
    canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16))
    want = _eager(bb, canvas, cache)

    def broken(*a, **k):
        raise RuntimeError("no tracing today")

    bb._traced.clear()
    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.warns(RuntimeWarning, match="tracing the decoder pass failed.*no tracing today"):
        outs = [bb.denoise(canvas, cache) for _ in range(traced.TRACE_AFTER + 3)]
    assert all(torch.equal(o, want) for o in outs) and not _traces(bb)

    class Off:  # a "trace" whose numbers are not the eager ones
        def __call__(self, *args):
            return want + 1e-3

    bb._traced.clear()
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: Off())
    with pytest.warns(RuntimeWarning, match="differs from the eager one"):
        outs = [bb.denoise(canvas, cache) for _ in range(traced.TRACE_AFTER + 3)]
    assert all(torch.equal(o, want) for o in outs)
    assert list(bb._traced.values()) == [False]


@torch.no_grad()
def test_replaced_weights_drop_the_traces_and_copies_trace_their_own(model):
    import copy
    import pickle

    bb = model.backbone
    cache = _prefilled(bb, 1, 20)
    canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16))
    bb._traced.clear()
    for _ in range(traced.TRACE_AFTER + 2):
        bb.denoise(canvas, cache)
    assert _traces(bb)
    twin = copy.deepcopy(bb)  # its own parameters; the original's traces stay behind
    assert not twin._traced
    pickle.dumps(bb)  # a model with traces still pickles (torch.save)
    old_scalar = bb.layers[0].layer_scalar
    try:
        bb.layers[0].layer_scalar = torch.full((1,), 0.5)  # a replaced buffer: the trace would hold the old one
        want = _eager(bb, canvas, cache)
        assert torch.equal(bb.denoise(canvas, cache), want)
        assert not _traces(bb)
        with torch.no_grad():
            twin.layers[1].mlp.up_proj.weight.mul_(2.0)  # in place: the twin's own trace reads the new values
        for _ in range(traced.TRACE_AFTER + 2):
            got = twin.denoise(canvas, cache)
        assert _traces(twin) and torch.equal(got, _eager(twin, canvas, cache))
        twin.layers[1].mlp.up_proj.weight.mul_(0.5)
        assert torch.equal(twin.denoise(canvas, cache), _eager(twin, canvas, cache))
    finally:
        bb.layers[0].layer_scalar = old_scalar


@torch.no_grad()
def test_no_trace_when_the_experts_would_loop_in_python(model, monkeypatch):
    """Without a usable F.grouped_mm the experts loop over this input's per-expert counts: a trace would freeze
    them, so none is made and every canvas gets its own routing."""
    import torch.nn.functional as F

    bb = model.backbone
    cache = _prefilled(bb, 1, 20)
    monkeypatch.delattr(F, "grouped_mm")
    bb._traced.clear()
    g = torch.Generator().manual_seed(5)
    for _ in range(traced.TRACE_AFTER + 4):
        canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16), generator=g)
        assert torch.equal(bb.denoise(canvas, cache), _eager(bb, canvas, cache))
    assert not _traces(bb)


@torch.no_grad()
def test_weight_first_head_only_where_it_gives_the_same_bits(model, monkeypatch):
    """The trace takes the head product as W·hᵀ (faster in MKL at batch 1) only when its logits equal the eager
    pass's; on a BLAS where they differ it is made again in the reference's orientation, without a warning."""
    import warnings

    import dgemma.model.backbone as backbone

    bb = model.backbone
    cache = _prefilled(bb, 1, 20)
    canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    want = _eager(bb, canvas, cache)
    bb._traced.clear()
    assert all(torch.equal(bb.denoise(canvas, cache), want) for _ in range(traced.TRACE_AFTER + 2))
    (fn,) = _traces(bb)
    # the weight-first products are in the graph: the head's and the three of each layer's dense MLP (this call
    # has no self-conditioning signal, so no self-conditioning MLP)
    assert str(fn.inlined_graph).count("aten::mm(") == 1 + 3 * bb.cfg.num_hidden_layers

    real = backbone._head_feature_major
    def off(h, w, cap):
        out, divided = real(h, w, cap)
        return out * (1 + 1e-6), divided

    monkeypatch.setattr(backbone, "_head_feature_major", off)
    bb._traced.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # falling back to the usual orientation is silent
        assert all(torch.equal(bb.denoise(canvas, cache), want) for _ in range(traced.TRACE_AFTER + 2))
    (fn,) = _traces(bb)
    assert "aten::mm(" not in str(fn.inlined_graph)
