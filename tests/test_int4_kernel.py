"""The Triton W4A16 grouped GEMM (dgemma.int4_kernel) under TRITON_INTERPRET=1 on the CPU, against its PyTorch
twin, and the model's int4 path through it. The same kernel runs compiled on CUDA (tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dgemma import int4_kernel, quant  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DGEMMA_INT4_KERNEL", raising=False)


def _operands(E, N, K, group, counts, dtype, extra_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, N, K, generator=g) * 0.05
    w[:, 1, 5] = 1.5  # an outlier in one group
    q, s = quant.quantize_int4(w, group)
    x = torch.randn(sum(counts) + extra_rows, K, generator=g).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, q, s, offs


def _close(got, want, dtype):
    """Within the output dtype's rounding of the largest value (fp32: the summation order's error)."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * scale, f"max error {err:.3g} against max |y| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,N,K,group,counts", [
    (1, 48, 64, 32, [37]),  # a plain matrix: N not a multiple of the column block
    (4, 40, 128, 64, [5, 0, 23, 9]),  # an empty group
    (3, 96, 256, 128, [17, 70, 1]),  # one group far above the average (several row tiles, strided over the splits)
])
def test_kernel_equals_its_twin(interpret, dtype, E, N, K, group, counts):
    x, q, s, offs = _operands(E, N, K, group, counts, dtype)
    assert int4_kernel.available(x, group)
    got = int4_kernel.grouped_mm(x, q, s, offs)
    want = int4_kernel.grouped_mm_twin(x, q, s, offs)
    assert got.dtype == dtype and got.shape == (x.shape[0], N)
    _close(got, want, dtype)
    assert torch.equal(got[offs[-1]:], torch.zeros_like(got[offs[-1]:]))  # rows past offs[-1] are zero
    # and the twin is the dequantized product
    dense = torch.cat([x[a:b].float() @ quant.dequantize_int4(q[e], s[e], torch.float32).t()
                       for e, (a, b) in enumerate(zip([0] + offs.tolist(), offs.tolist()))])
    _close(want[: offs[-1]], dense, dtype)


def test_row_splits_do_not_change_the_result(interpret, monkeypatch):
    """The row splits only spread the row tiles over programs: 1 split and many give the same numbers."""
    x, q, s, offs = _operands(2, 64, 128, 64, [90, 40], torch.float32)
    base = int4_kernel.grouped_mm(x, q, s, offs)
    blocks = int4_kernel._blocks
    monkeypatch.setattr(int4_kernel, "_blocks", lambda m, g, n, dt: (16, 32, 1))
    one = int4_kernel.grouped_mm(x, q, s, offs)
    monkeypatch.setattr(int4_kernel, "_blocks", lambda m, g, n, dt: (16, 32, 9))
    many = int4_kernel.grouped_mm(x, q, s, offs)
    monkeypatch.setattr(int4_kernel, "_blocks", blocks)
    assert torch.equal(one, many)
    _close(base, one, torch.float32)


def test_availability(monkeypatch):
    x = torch.zeros(4, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not int4_kernel.available(x, 64)  # a CPU tensor without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_kernel.available(x, 64)
    assert not int4_kernel.available(x, 16)  # groups below 32 columns: the dequantizing path
    assert not int4_kernel.available(x, 48)  # not a power of two
    assert not int4_kernel.available(x, 512)  # the K tile would not fit in shared memory
    assert not int4_kernel.available(x.to(torch.int32), 64)
    monkeypatch.setenv("DGEMMA_INT4_KERNEL", "dequant")
    assert not int4_kernel.available(x, 64)


def test_offsets_beyond_the_rows_stay_in_bounds(interpret):
    """offs[-1] larger than x's rows (a caller's bug) is clipped: no read or write past x and y."""
    x, q, s, offs = _operands(2, 32, 64, 32, [3, 4], torch.float32, extra_rows=0)
    got = int4_kernel.grouped_mm(x, q, s, torch.tensor([3, 50], dtype=torch.int32))
    _close(got, int4_kernel.grouped_mm_twin(x, q, s, offs), torch.float32)


def test_bad_operands_get_a_clear_error(interpret):
    x, q, s, offs = _operands(2, 32, 64, 32, [3, 4], torch.float32)
    with pytest.raises(ValueError, match="2 groups but offs"):
        int4_kernel.grouped_mm(x, q, s, offs[:1])
    with pytest.raises(ValueError, match="x \\(10, 32\\)"):
        int4_kernel.grouped_mm(x[:, :32], q, s, offs)


def test_int4_model_runs_through_the_kernel(interpret, monkeypatch, tmp_path):
    """With the kernel available every int4 product of the tiny model goes through it (projections and experts),
    and the logits equal the dequantizing path's within fp32 summation error."""
    import dgemma
    from dgemma.presets import init_checkpoint

    ckpt = init_checkpoint("tiny", tmp_path / "tiny")
    model = dgemma.load(ckpt, device="cpu", dtype=torch.float32, quantize="int4")
    ids = torch.tensor([[2, 17, 40, 33, 9, 81, 5]])

    calls = []
    real = int4_kernel.grouped_mm
    monkeypatch.setattr(int4_kernel, "grouped_mm", lambda *a: calls.append(a[1].data_ptr()) or real(*a))
    got = _forward(model, ids)
    tokens = model.generate(ids, max_new_tokens=16, max_denoising_steps=2, seed=0).sequences
    weights = {m.qdata.data_ptr() for m in model.backbone.modules() if isinstance(m, quant.QTensor)}
    assert len(weights) > 30 and weights == set(calls), (len(weights), len(set(calls)))  # self-conditioning too
    monkeypatch.setenv("DGEMMA_INT4_KERNEL", "dequant")
    calls.clear()
    want = _forward(model, ids)
    assert torch.equal(model.generate(ids, max_new_tokens=16, max_denoising_steps=2, seed=0).sequences, tokens)
    assert not calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

def _forward(model, ids):
    """The encoder pass's logits at every position."""
    bb = model.backbone
    with torch.no_grad():
        h = bb.encode(ids, bb.new_cache(1, 64), final_norm=False)
        return bb.logits(h).float()
