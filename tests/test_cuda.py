"""The fast path on CUDA (skipped without a GPU; `benchmarks/gpu_check.sh` runs these): compiled vs eager logits
through FlexAttention, the fast sampler on the device, CUDA-graph replay."""

from __future__ import annotations

import math

import pytest
import torch

import dgemma
from dgemma import sampling
from dgemma.model import Batch, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def micro(micro_checkpoint):
    return dgemma.load(micro_checkpoint, device="cuda", dtype=torch.float32)


def test_compiled_flex_logits_match_eager_dense(micro):
    """CUDA runs FlexAttention; compiled, its logits equal the reference (dense) numerics within 1e-3 (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    bb, L = micro.backbone, micro.config.canvas_length
    V = micro.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (1, 13), generator=g).cuda()
    canvas = torch.randint(3, V, (1, L), generator=g).cuda()
    pad = ops.gemm_pad(bb.dtype, bb.device)

    def run(cache, numerics):
        bb.forward(Batch.rectangle(prompt, 0, canvas=False), cache, numerics=numerics, pad=pad)
        return bb.logits(bb.forward(Batch.rectangle(canvas, 13, canvas=True), cache, numerics=numerics, pad=pad))

    with torch.no_grad():
        ref = run(bb.new_cache(1, 64), "reference")
        fast = torch.compile(lambda c: run(c, "fast"), fullgraph=True, dynamic=False)(bb.new_cache(1, 64))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-3)


def test_fast_sampler_on_cuda_matches_softmax_and_the_cpu():
    V, n, T = 24, 200_000, 0.7
    z = torch.linspace(-3, 2, V)
    keys = sampling.stream_keys(torch.tensor([sampling.seed_key(7)]), torch.tensor([0]), torch.tensor([1]), sampling.SAMPLE, n)[0]
    cpu, *_ = sampling.fast_draw(z.expand(n, V), torch.full((n,), T), keys)
    gpu, *_ = sampling.fast_draw(z.cuda().expand(n, V), torch.full((n,), T, device="cuda"), keys.cuda())
    counts = torch.bincount(gpu.cpu(), minlength=V).double()
    expected = n * torch.softmax(z / T, -1).double()
    df = V - 1
    limit = df * (1 - 2 / (9 * df) + 5 * math.sqrt(2 / (9 * df))) ** 3
    assert float(((counts - expected) ** 2 / expected).sum()) < limit
    assert (gpu.cpu() == cpu).float().mean() > 0.999  # the same keys draw the same tokens on either device
    assert torch.equal(sampling.uniform_tokens(keys.cuda(), 1000).cpu(), sampling.uniform_tokens(keys, 1000))


def test_cuda_graph_replay_is_deterministic_and_close_to_eager(micro):
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
    kw = dict(max_new_tokens=2 * micro.config.canvas_length, max_denoising_steps=6, eos_token_id=None)
    a = micro.generate(ids, seed=1, compile=True, **kw)  # compiles and captures
    b = micro.generate(ids, seed=1, compile=True, **kw)  # replays
    assert torch.equal(a.sequences, b.sequences)
    e = micro.generate(ids, seed=1, compile=False, **kw)
    assert (e.sequences == a.sequences).float().mean() > 0.5


def test_ar_token_step_as_a_cuda_graph_matches_eager(micro):
    """The AR token pass compiled and replayed as a CUDA graph gives eager's greedy tokens (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], device="cuda")
    am = ids != 0
    eager = micro.generate_ar(ids, am, max_new_tokens=24, eos_token_id=None, compile=False)
    graph = micro.generate_ar(ids, am, max_new_tokens=24, eos_token_id=None, compile=True)
    again = micro.generate_ar(ids, am, max_new_tokens=24, eos_token_id=None, compile=True)  # replays
    assert torch.equal(graph.sequences, again.sequences)
    assert (graph.sequences == eager.sequences).float().mean() > 0.9


def test_grouped_mm_backward_in_bf16_matches_per_group_products():
    """The experts' weight gradient as one grouped product (bf16, the training dtype) equals per-group products."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).cuda().bfloat16().requires_grad_(True)
    w = torch.randn(4, 32, 16, generator=g).cuda().bfloat16().requires_grad_(True)
    offs = torch.tensor([10, 10, 40, 56], dtype=torch.int32, device="cuda")  # an empty group, padding rows
    up = torch.randn(64, 16, generator=g).cuda().bfloat16()
    (ops.grouped_mm(x, w, offs)[:56].float() * up[:56].float()).sum().backward()
    xr, wr = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    yr = torch.cat([xr[0:10] @ wr[0], xr[10:40] @ wr[2], xr[40:56] @ wr[3]])
    (yr * up[:56].float()).sum().backward()
    torch.testing.assert_close(w.grad.float(), wr.grad, rtol=2e-2, atol=2e-1)
    torch.testing.assert_close(x.grad[:56].float(), xr.grad[:56], rtol=2e-2, atol=2e-1)
    assert bool((w.grad[1] == 0).all())


def test_training_step_makes_no_host_sync(micro_checkpoint):
    """A diffusion training step (device-side batch, bf16 autocast, backward, clipping, fused AdamW) runs without
    one device-to-host sync after the first (warm-up) step: torch's sync debug mode raises on any."""
    from dgemma.train.data import Example, TensorData
    from dgemma.train.objective import DiffusionObjective, ObjectiveConfig

    model = dgemma.load(micro_checkpoint, device="cuda", dtype=torch.float32)
    bb = model.backbone.train().requires_grad_(True)
    L = model.config.canvas_length
    g = torch.Generator().manual_seed(0)
    V = model.config.text.vocab_size
    examples = [Example(torch.randint(3, V, (9,), generator=g).tolist(), torch.randint(3, V, (2 * L,), generator=g).tolist())
                for _ in range(16)]
    data = TensorData(examples, 0, "cuda")
    obj = DiffusionObjective(bb, ObjectiveConfig(ar_weight=0.0))
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    host = torch.Generator().manual_seed(0)

    def step(i):
        batch = data.batch(list(range(8 * (i % 2), 8 * (i % 2) + 8)), L, host).prefix_only()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = obj(batch, gen)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"].detach()

    first = step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(x)) for x in [first, *losses])


# ------------------------------------------------------------------------------------------------------------
# quantized weights (dgemma.quant) on the GPU
# ------------------------------------------------------------------------------------------------------------
def _fp8_gpu() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not torch.cuda.is_available() or not _fp8_gpu(), reason="needs FP8 tensor cores (sm89+)")
def test_fp8_scaled_gemms_on_cuda_equal_their_twins():
    from dgemma import quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 256, generator=g).cuda().bfloat16()
    wq, ws = quant.quantize_fp8((torch.randn(512, 256, generator=g) * 0.05).cuda())
    got, want = quant.fp8_linear(x, wq, ws).float(), quant.fp8_linear_twin(x, wq, ws).float()
    assert (got - want).norm() / want.norm() < 1e-2
    wq3, ws3 = quant.quantize_fp8((torch.randn(4, 384, 256, generator=g) * 0.05).cuda())
    offs = torch.tensor([64, 64, 192, 300], dtype=torch.int32, device="cuda")
    got = quant.fp8_grouped_mm(x, wq3, ws3, offs).float()
    want = quant.fp8_grouped_mm_twin(x, wq3, ws3, offs).float()
    assert (got - want).norm() / want.norm() < 1e-2


def test_int4_triton_kernel_on_cuda_equals_its_twin():
    """The W4A16 Triton kernel compiled for the GPU, at the 26b-a4b expert shapes (a decode step's 2048 rows over
    128 experts, one expert taking many) and as a plain matrix, against the dequantized fp32 product."""
    pytest.importorskip("triton")
    from dgemma import int4_kernel, quant

    g = torch.Generator().manual_seed(0)
    for E, N, K, counts in [(128, 1408, 2816, [16] * 120 + [0] * 7 + [128]), (128, 2816, 704, [16] * 128),
                            (1, 4096, 2816, [300])]:
        group = 128 if K % 128 == 0 else 64
        q, s = quant.quantize_int4((torch.randn(E, N, K, generator=g) * 0.02).cuda(), group)
        x = torch.randn(sum(counts) + 5, K, generator=g).cuda().bfloat16()
        offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        assert int4_kernel.available(x, group)
        got = int4_kernel.grouped_mm(x, q, s, offs).float()
        want = int4_kernel.grouped_mm_twin(x, q, s, offs).float()
        assert (got - want).norm() / want.norm() < 1e-2, (E, N, K)
        assert got[offs[-1]:].abs().max() == 0


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantized_model_on_cuda_matches_the_cpu(micro_checkpoint, fmt):
    """The quantized micro model generates on the GPU (eager and compiled fast step) and its logits stay within
    the activation-rounding error of the CPU's dequantized products."""
    from dgemma import quant

    cpu = dgemma.load(micro_checkpoint, device="cpu", dtype=torch.float32, quantize=fmt)
    gpu = dgemma.load(micro_checkpoint, device="cuda", dtype=torch.bfloat16, quantize=fmt)
    assert quant.is_quantized(gpu.backbone) == fmt
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def logits(m):
        bb = m.backbone
        cache = bb.new_cache(1, 64)
        return bb.logits(bb.encode(ids.to(m.device), cache)).float().cpu()

    a, b = logits(cpu), logits(gpu)
    assert (a - b).norm() / a.norm() < 0.05
    for compile in (False, True):
        out = gpu.generate(ids.cuda(), max_new_tokens=32, seed=1, max_denoising_steps=4, compile=compile)
        assert out.sequences.shape[1] > ids.shape[1]


def test_compiled_objective_gives_the_eager_gradients_on_cuda(micro_checkpoint):
    """Compiled training on the GPU (Triton codegen, no CPU workaround): eager's loss and gradients. (CPU inductor
    needed cpp.simdlen=1 for this; see train/objective.py.)"""
    from dgemma.train import Batch, DiffusionObjective, ObjectiveConfig
    from dgemma.train.objective import compile_objective

    torch.backends.cuda.matmul.allow_tf32 = False
    m = dgemma.load(micro_checkpoint, device="cuda", dtype=torch.float32)
    bb = m.backbone.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    V, L = m.config.text.vocab_size, m.config.canvas_length
    ids = torch.randint(3, V, (4, 40), generator=g)
    valid = torch.ones(4, 40, dtype=torch.bool)
    valid[1, 20:] = False
    start = torch.tensor([8, 4, 24, 10])
    canvas = torch.stack([ids[b, s:s + L] for b, s in enumerate(start.tolist())])
    sup = torch.ones(4, L, dtype=torch.bool)
    resp = torch.zeros(4, 40, dtype=torch.bool)
    batch = Batch(ids, valid, start, sup, canvas, resp).prefix_only().to(torch.device("cuda"))
    obj = DiffusionObjective(bb, ObjectiveConfig(ar_weight=0.0))

    def run(f):
        bb.zero_grad(set_to_none=True)
        out = f(batch, torch.Generator(device="cuda").manual_seed(5))
        out["loss"].backward()
        return float(out["loss"]), {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}

    (le, ge), (lc, gc) = run(obj), run(compile_objective(obj, torch.device("cuda")))
    assert abs(le - lc) <= 1e-4 * max(1.0, le)
    for n in ge:
        err = float((gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12))
        assert err < 1e-3, f"{n}: relative gradient difference {err:.2e}"
