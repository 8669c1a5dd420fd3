"""The native MoE experts (dgemma/csrc/cpu_ops.c via model/native_ops.py) give the torch path's exact bits, are used in
the CPU trace only where they do, and step aside otherwise."""

from __future__ import annotations

import ctypes

import pytest
import torch

import dgemma
from dgemma.model import native_ops, traced
from dgemma.model.layers import Experts, native_cpu_ops
from dgemma.presets import init_checkpoint

needs_native = pytest.mark.skipif(native_ops._bind() is None,
                                  reason="no C compiler, no AVX2 kernels in this torch, or no sgemm_/SLEEF symbols")


class _Cfg:
    def __init__(self, E, H, I, K):
        self.num_experts, self.hidden_size, self.moe_intermediate_size, self.top_k_experts = E, H, I, K


def _experts(E, H, I, seed=0, K=2):
    ex = Experts(_Cfg(E, H, I, K))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.05)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.05)
    return ex


def _usable(ex, x):
    return native_ops.usable(x, x.shape[0], ex.top_k, ex.num_experts, ex.hidden, ex.inter)


def _routing(T, E, K, counts_for_first=None, seed=0):
    """Random top-k routing; with counts_for_first = n, expert 0 gets exactly n slots (n <= T)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if counts_for_first is not None:
        logits[:, 0] = -10.0
        logits[:counts_for_first, 0] = 10.0
    w, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


@needs_native
@torch.no_grad()
@pytest.mark.parametrize("E,H,I,K", [(4, 64, 32, 2), (8, 256, 128, 2), (8, 64, 48, 3), (16, 64, 32, 4)])
def test_native_experts_equal_the_torch_path(E, H, I, K):
    ex = _experts(E, H, I, K=K)
    g = torch.Generator().manual_seed(1)
    # every group size up to 24 for one expert (MKL treats sizes 5-7 and 9-11 differently across threads), and
    # ordinary routings over several token counts
    for T, n in [(24, n) for n in range(1, 25)] + [(T, None) for T in (1, 2, 3, 7, 16, 33, 64)]:
        x = torch.randn(T, H, generator=g) * 2
        w, idx = _routing(T, E, K, n, seed=T * 31 + (n or 0))
        want = ex.torch_forward(x, w, idx)
        with native_cpu_ops():
            assert _usable(ex, x)
            got = ex(x, w, idx)
        assert torch.equal(got, want), (T, n)


@needs_native
@torch.no_grad()
def test_rows_marked_unsafe_run_on_the_calling_thread_with_the_same_bits(monkeypatch):
    ex = _experts(8, 64, 32, seed=3)
    monkeypatch.setattr(native_ops, "_safe_table", lambda lib, H, I, upto: (ctypes.c_ubyte * (upto + 1))())  # none safe
    g = torch.Generator().manual_seed(2)
    for T in (5, 16, 40):
        x = torch.randn(T, 64, generator=g)
        w, idx = _routing(T, 8, 2, seed=T)
        with native_cpu_ops():
            assert torch.equal(ex(x, w, idx), ex.torch_forward(x, w, idx))


@torch.no_grad()
def test_not_used_outside_the_trace_context_nor_with_gradients_or_other_shapes(monkeypatch):
    ex = _experts(4, 64, 32)
    x = torch.randn(8, 64)
    w, idx = _routing(8, 4, 2)
    calls = []
    monkeypatch.setattr(native_ops, "_moe_experts", lambda *a: calls.append(1))
    assert torch.equal(ex(x, w, idx), ex.torch_forward(x, w, idx))  # no context: the torch path
    assert not calls
    with native_cpu_ops():
        with torch.enable_grad():
            assert not _usable(ex, x)
        assert not _usable(ex, x.double())
        odd = _experts(4, 64, 24)  # rows of 24 would put part of ATen's GELU on its scalar path
        assert not _usable(odd, x)
        assert torch.equal(odd(x, w, idx), odd.torch_forward(x, w, idx))
    assert not calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return dgemma.load(init_checkpoint("tiny", tmp_path_factory.mktemp("moe") / "tiny"), device="cpu")


def _traced_graph(bb, monkeypatch) -> str:
    """Trace one decoder signature of `bb`; check every traced call gives the eager pass's bits; the trace's graph."""
    monkeypatch.setattr(traced, "TRACE_AFTER", 2)
    cache = bb.new_cache(1, 40)
    bb.encode(torch.randint(3, bb.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0)), cache)
    canvas = torch.randint(0, bb.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    old, traced.ENABLED = traced.ENABLED, False
    try:
        want = bb.denoise(canvas, cache)
    finally:
        traced.ENABLED = old
    bb._traced.clear()
    assert all(torch.equal(bb.denoise(canvas, cache).view(torch.int32), want.view(torch.int32)) for _ in range(4))
    (fn,) = [v for v in bb._traced.values() if not isinstance(v, (int, bool))]
    return str(fn.inlined_graph)


@needs_native
@torch.no_grad()
def test_the_trace_holds_the_native_operators_and_stays_exact(model, monkeypatch):
    graph = _traced_graph(model.backbone, monkeypatch)
    cfg = model.backbone.cfg
    L = cfg.num_hidden_layers
    assert graph.count("dgemma::moe_experts") == L
    assert graph.count("dgemma::pre_ffn") == L and graph.count("dgemma::ffn_tail") == L
    # the head comes back through the transposing copy, which also divides by the softcap
    assert graph.count("dgemma::transpose_div") == 1 and "aten::div_" not in graph.split("transpose_div")[-1]
    # heads of whole blocks of 32 only: tiny's full layers (32) take qkv_post, its sliding ones (16) keep torch's ops
    fits = [i for i in range(L) if cfg.layer_head_dim(i) % 32 == 0]
    assert 0 < len(fits) < L and graph.count("dgemma::qkv_post") == len(fits)


@torch.no_grad()
def test_a_failed_self_check_keeps_the_torch_experts_in_the_trace(model, monkeypatch):
    monkeypatch.setattr(native_ops, "_STATE", {})
    monkeypatch.setattr(native_ops, "_self_check", lambda *a: False)
    assert "dgemma::moe_experts" not in _traced_graph(model.backbone, monkeypatch)


@needs_native
@torch.no_grad()
def test_native_experts_that_differ_are_dropped_by_the_trace_check(model, monkeypatch):
    """Should the operator ever differ on a real pass, the trace made with it differs from eager and the next
    variant (the torch experts) is traced instead, silently."""
    import warnings

    real = native_ops._moe_experts
    monkeypatch.setattr(native_ops, "_STATE", {})
    monkeypatch.setattr(native_ops, "_self_check", lambda *a: True)  # so that only the trace's check can catch it
    monkeypatch.setattr(native_ops, "_moe_experts", lambda *a: real(*a) * (1 + 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "dgemma::moe_experts" not in _traced_graph(model.backbone, monkeypatch)


def test_native_operators_are_optional(monkeypatch):
    monkeypatch.setattr(native_ops, "_STATE", {})
    monkeypatch.setattr(native_ops.native, "ENABLED", False)
    ex = _experts(4, 64, 32)
    x = torch.randn(8, 64)
    w, idx = _routing(8, 4, 2)
    with torch.no_grad(), native_cpu_ops():
        assert not _usable(ex, x)
        assert torch.equal(ex(x, w, idx), ex.torch_forward(x, w, idx))


@needs_native
@pytest.mark.parametrize("V,N", [(8192, 64), (1024, 16), (1000, 13), (7, 5), (16, 1)])
def test_transpose_div_is_torch_copy_then_division(V, N):
    x = torch.randn(V, N, generator=torch.Generator().manual_seed(V + N)) * 50
    want = torch.empty(N, V).copy_(x.t()).div_(30.0)
    assert torch.equal(torch.ops.dgemma.transpose_div(x, 30.0), want)


@needs_native
@torch.no_grad()
def test_layer_glue_equals_the_torch_layer_tail(model):
    """pre_ffn + ffn_tail (the norms and residual adds around the FFN) against Layer's own ATen arithmetic, with
    non-trivial norm weights and residual scales."""
    import copy

    from dgemma.model import layers

    bb = copy.deepcopy(model.backbone)
    g = torch.Generator().manual_seed(4)
    H = bb.cfg.hidden_size
    for layer in bb.layers:
        for n in layer.NORMS:
            getattr(layer, n).weight.copy_(torch.randn(H, generator=g))
        layer.router.scale.copy_(torch.randn(H, generator=g))
        layer.layer_scalar.fill_(0.75)
        for scale in (1e-3, 1.0, 30.0):
            x = torch.randn(2, 16, H, generator=g) * scale
            o = torch.randn(2, 16, H, generator=g)
            want = layer.ffn(x + layer.post_attention_layernorm(o)) * layer.layer_scalar
            with layers.native_cpu_ops(32):
                assert native_ops.layer_glue_usable(x, H)
                got = layer._ffn_native(x, o, layer.layer_scalar)
            assert torch.equal(got, want), scale


@needs_native
def test_layer_glue_only_for_rows_it_reproduces():
    from dgemma.model import layers

    with torch.no_grad(), layers.native_cpu_ops():
        assert not native_ops.layer_glue_usable(torch.randn(4, 48), 48)  # not whole blocks of 32
        assert not native_ops.layer_glue_usable(torch.randn(4, 544), 544)  # ATen's sum cascades beyond 16 blocks
        assert native_ops.layer_glue_usable(torch.randn(4, 512), 512)
    assert not native_ops.layer_glue_usable(torch.randn(4, 64), 64)  # outside the trace's native variant


@needs_native
@torch.no_grad()
@pytest.mark.parametrize("D", [32, 256, 480, 512])
def test_layer_glue_rows_up_to_512_equal_torch(D):
    """The reproduced sum order holds up to 16 blocks of 32 (where ATen's first cascade level only moves block sums
    onto zeros); compared bit for bit, signed zeros included."""
    from dgemma.config import TextConfig
    from dgemma.model import layers

    cfg = TextConfig(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                     layer_types=["sliding_attention"])
    layer = layers.Layer(cfg, 0)
    layers.init_weights(layer, generator=torch.Generator().manual_seed(D))
    g = torch.Generator().manual_seed(1)
    for n in layer.NORMS:
        getattr(layer, n).weight.copy_(torch.randn(D, generator=g))
    x, o = torch.randn(1, 8, D, generator=g) * 4, torch.randn(1, 8, D, generator=g)
    want = layer.ffn(x + layer.post_attention_layernorm(o)) * layer.layer_scalar
    with layers.native_cpu_ops(8):
        got = layer._ffn_native(x, o, layer.layer_scalar)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_native
@torch.no_grad()
def test_gelu_splits_over_odd_thread_counts_are_respected():
    """ATen's GELU splits work over threads with a grain of numel / threads above 16,384 elements; with 3 threads the
    pieces of a `small` layer's gate are not whole blocks of 16 at 80 or 128 tokens (part of it takes ATen's scalar
    tanh), so the native experts step aside there, and where they are used they agree."""
    ex = _experts(8, 256, 128, seed=9)
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert not _usable(ex, torch.randn(80, 256)) and not _usable(ex, torch.randn(128, 256))
        for T in (24, 64):
            x = torch.randn(T, 256, generator=torch.Generator().manual_seed(T))
            w, idx = _routing(T, 8, 2, seed=T)
            with native_cpu_ops():
                assert _usable(ex, x)
                assert torch.equal(ex(x, w, idx), ex.torch_forward(x, w, idx))
    finally:
        torch.set_num_threads(old)


@needs_native
@torch.no_grad()
def test_qkv_post_equals_the_torch_norms_and_rope():
    """q/k norms with RoPE and the weightless v norm at the `small` preset's shapes: a sliding layer (d = 64, own v)
    and a full one (d = 128, V = K, partial RoPE), batch 2, bit for bit (signed zeros included) and with the same
    strides as the torch path."""
    from dgemma.model import layers
    from dgemma.model.backbone import Backbone
    from dgemma.presets import preset_config

    cfg = preset_config("small")[0].text
    bb = Backbone(cfg)
    layers.init_weights(bb, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(6)
    seen = set()
    for li in (0, cfg.num_hidden_layers - 1):
        at = bb.layers[li].self_attn
        at.q_norm.weight.copy_(torch.randn(at.head_dim, generator=g))
        at.k_norm.weight.copy_(torch.randn(at.head_dim, generator=g))
        t = cfg.layer_types[li]
        cos, sin = bb._rope(torch.arange(37, 53))[t]
        x = torch.randn(2, 16, cfg.hidden_size, generator=g) * 3
        x[0, 0] = 0.0  # zero rows: RoPE's negation must give torch's signed zeros
        x[0, 1, :] = -0.0
        want = at.qkv(x, cos, sin)
        with layers.native_cpu_ops(32):
            got = at.qkv(x, cos, sin)
        for a, b in zip(want, got):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)) and a.stride() == b.stride(), (li, t)
        seen.add((t, at.v_proj is None, at.head_dim))
    assert seen == {("sliding_attention", False, 64), ("full_attention", True, 128)}




@needs_native
def test_operators_refuse_bad_inputs_with_a_clear_error():
    """The operators are registered process-wide: malformed inputs get an error naming what is expected, never a
    read past a buffer."""
    ex = _experts(4, 64, 32)
    x = torch.randn(8, 64)
    w, idx = _routing(8, 4, 2)
    sorted_ids, perm = torch.sort(idx.reshape(-1))
    counts = torch.bincount(sorted_ids, minlength=4)
    op = torch.ops.dgemma
    with pytest.raises(RuntimeError, match="perm hold slot ids below T\\*K"):
        op.moe_experts(x, torch.full_like(perm, 10_000), counts, w, ex.gate_up_proj, ex.down_proj)
    with pytest.raises(RuntimeError, match="counts must sum to T\\*K"):
        op.moe_experts(x, perm, counts * 2, w, ex.gate_up_proj, ex.down_proj)
    with pytest.raises(RuntimeError, match=r"gate_up \[E, 2I, H\]"):
        op.moe_experts(x, perm, counts, w, ex.gate_up_proj[:, :, :8], ex.down_proj)
    with pytest.raises(RuntimeError, match="takes a 2-D CPU float32 tensor"):
        op.transpose_div(torch.randn(2, 3, 4), 30.0)
    v48 = torch.ones(48)
    with pytest.raises(RuntimeError, match="rows of a multiple of 32 up to 512"):
        op.pre_ffn(torch.randn(2, 48), torch.randn(2, 48), v48, v48, v48, v48, 0.1, 1e-6)
    v64 = torch.ones(64)
    with pytest.raises(RuntimeError, match="weights of that size"):
        op.ffn_tail(torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64), v64, v64, torch.ones(32),
                    torch.ones(1), 1e-6)
    q = torch.randn(1, 4, 2 * 32)
    with pytest.raises(RuntimeError, match=r"cos/sin \[S, d\]"):
        op.qkv_post(q, torch.randn(1, 4, 32), None, torch.randn(5, 32), torch.randn(5, 32), torch.ones(32),
                    torch.ones(32), 2, 1, 1e-6)
