"""Time one 26b-a4b layer's products on the GPU in bf16, int4 through the Triton kernel, and int4 through the
dequantizing fallback, at a decode step's shapes (one canvas of 256 tokens: 2,048 routed rows over 128 experts)
and at a 4,096-token prefill. Reports microseconds per product and the weight bytes read per second.

    python benchmarks/int4_kernel_bench.py [--json FILE] [--iters 50]

CUDA only (the CPU check of the same kernel is tests/test_int4_kernel.py under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dgemma import int4_kernel, quant  # noqa: E402
from dgemma.model import ops  # noqa: E402

# (name, experts, out, in) of the 26b-a4b preset: the experts' two products and the dense MLP's up projection
SHAPES = [("experts.gate_up", 128, 1408, 2816), ("experts.down", 128, 2816, 704), ("mlp.up", 1, 2112, 2816)]
TOKENS = {"decode": 256, "prefill": 4096}
TOP_K = 8


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters  # µs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_kernel_bench: needs a CUDA device (none found)", file=sys.stderr)
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, E, N, K in SHAPES:
        group = 128 if K % 128 == 0 else 64
        w = torch.randn(E, N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        q, s = quant.quantize_int4(w, group)
        bytes_bf16, bytes_int4 = w.numel() * 2, q.numel() + s.numel() * 2
        for phase, tokens in TOKENS.items():
            m = tokens * (TOP_K if E > 1 else 1)
            x = torch.randn(m, K, device="cuda", generator=g, dtype=torch.bfloat16)
            offs = torch.full((E,), m // E, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
            offs[-1] = m
            runs = {
                "bf16": (lambda: ops._grouped_mm(x, w.transpose(-2, -1), offs), bytes_bf16),
                "int4_triton": (lambda: int4_kernel.grouped_mm(x, q, s, offs), bytes_int4),
                "int4_dequant": (lambda: ops._grouped_mm(x, quant.dequantize_int4(q, s, x.dtype).transpose(-2, -1),
                                                         offs), bytes_int4),
            }
            ref = runs["bf16"][0]().float()
            for kind, (fn, nbytes) in runs.items():
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                us = _time(fn, args.iters)
                row = dict(product=name, phase=phase, rows=m, kind=kind, us=round(us, 1),
                           weight_gb_per_s=round(nbytes / us / 1e3, 1), rel_err_vs_bf16=round(err, 4))
                rows.append(row)
                print(f"{name:16s} {phase:8s} {kind:13s} {us:9.1f} µs  {row['weight_gb_per_s']:7.1f} GB/s  "
                      f"err {err:.4f}", flush=True)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
