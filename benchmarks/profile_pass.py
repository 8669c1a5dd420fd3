"""Profile one decoder pass (diffusion canvas) and one AR token of a preset, with random weights and fewer layers,
and print the top operators — where a GPU pass spends its time.

    python benchmarks/profile_pass.py --preset 26b-a4b --layers 2 --context 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.bench import random_backbone
from dgemma.presets import preset_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    cfg, gcfg = preset_config(args.preset)
    t = cfg.text
    types = t.layer_types[: args.layers - 1] + ["full_attention"]
    t = dataclasses.replace(t, num_hidden_layers=args.layers, layer_types=types, per_layer_config={})
    dev = torch.device(args.device)
    bb = random_backbone(t, dev, getattr(torch, args.dtype))
    L = cfg.canvas_length
    ids = torch.randint(4, t.vocab_size, (1, args.context), device=dev)
    cache = bb.new_cache(1, args.context + L + 32)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        bb.encode(ids, cache, None)
        canvas = torch.randint(4, t.vocab_size, (1, L), device=dev)
        for name, fn in [("denoise pass", lambda: bb.denoise(canvas, cache)),
                         ("ar token", lambda: bb.logits(bb.encode(canvas[:, :1], cache, None)))]:
            for _ in range(2):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            sync()
            print(f"{name}: {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms for {args.layers} layers", flush=True)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                fn()
                sync()
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
