"""Aggregate throughput of the serving engine (no HTTP): N concurrent requests with fixed denoising steps.

    python benchmarks/engine_bench.py --preset 26b-a4b --concurrency 1,8 --steps 48 --json out.json
    python benchmarks/engine_bench.py --model DIR --concurrency 1,4

Random weights of a preset are built directly on the device (`bench.random_model`); every request has a random
prompt of --prompt-len tokens and asks for --max-tokens tokens with early stopping off, so each level does a
fixed amount of work. Reports canvas tokens/s (committed tokens / wall time), iterations/s and ms per iteration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dgemma.bench import NO_EARLY_STOP, random_model
from dgemma.engine import Engine, SamplingParams


def run_level(model, n: int, prompt_len: int, max_tokens: int, steps: int, seed: int = 0) -> dict:
    eng = Engine(model, max_num_seqs=max(n, 1), kv_cache_bytes=None)
    g = torch.Generator().manual_seed(seed)
    V = model.config.text.vocab_size
    done: dict[str, list] = {}

    def add_all(tag: str):
        for i in range(n):
            prompt = torch.randint(4, V, (prompt_len,), generator=g).tolist()
            p = SamplingParams(max_tokens=max_tokens, seed=seed + i, max_denoising_steps=steps,
                               confidence_threshold=NO_EARLY_STOP)
            eng.add(prompt, p, done.setdefault(f"{tag}{i}", []).append, f"{tag}{i}")

    add_all("warm")  # compiles / captures every shape this level uses
    while eng.has_work():
        eng.step()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    it0, t0 = eng.iterations, time.perf_counter()
    add_all("r")
    while eng.has_work():
        eng.step()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    toks = sum(len(v[-1].token_ids) for k, v in done.items() if k.startswith("r"))
    iters = eng.iterations - it0
    return {"concurrency": n, "tokens": toks, "seconds": dt, "canvas_tok_s": toks / dt, "iterations": iters,
            "ms_per_iteration": dt / max(1, iters) * 1e3, "compile_s": eng.stepper.compile_seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random weights of this preset, built on the device")
    src.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--json", help="write the results to this file")
    a = ap.parse_args()
    if a.preset:
        model = random_model(a.preset, a.device, a.dtype)
    else:
        import dgemma

        model = dgemma.load(a.model, device=a.device, dtype=a.dtype)
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    res = []
    for n in levels:
        r = run_level(model, n, a.prompt_len, a.max_tokens, a.steps)
        print(f"concurrency {n}: {r['canvas_tok_s']:.1f} canvas tok/s, {r['ms_per_iteration']:.1f} ms/iteration, "
              f"compile {r['compile_s']:.1f} s", file=sys.stderr, flush=True)
        res.append(r)
    report = {"device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
              "dtype": str(model.dtype), "settings": vars(a), "results": res}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
