"""Evaluate a Sudoku checkpoint under several sampler settings (to choose the shipped generation_config).

    python recipes/sudoku/sweep.py --model DIR --puzzles runs/sudoku/test.txt [--limit N] [--json-out FILE]

Each setting is `name:key=value,key=value` (keys: entropy_bound, t_min, t_max, stability_threshold,
confidence_threshold, max_denoising_steps); the default list covers the reference defaults and greedier variants.
Prints one line per setting (solved % overall/easy/medium/hard, mean steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import dgemma
from dgemma.tasks.sudoku import evaluate, read_puzzle_file

DEFAULT = [
    "default:",
    "eb0.3:entropy_bound=0.3",
    "eb1:entropy_bound=1.0",
    "eb1_cold:entropy_bound=1.0,t_min=0.1,t_max=0.3",
    "eb3_cold:entropy_bound=3.0,t_min=0.1,t_max=0.3",
    "eb0.3_cold:entropy_bound=0.3,t_min=0.1,t_max=0.3",
]


def parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kw = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        kw[k] = int(v) if k in ("stability_threshold", "max_denoising_steps") else float(v)
    return name, kw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--puzzles", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--setting", action="append", help="name:key=value,... (repeatable; default: a built-in list)")
    ap.add_argument("--mode", default="diffusion")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    model = dgemma.load(args.model, dtype="float32")
    pairs = read_puzzle_file(args.puzzles)[: args.limit]
    base = model.generation_config
    results = {}
    for spec in (args.setting or DEFAULT) if args.mode == "diffusion" else ["ar:"]:
        name, kw = parse(spec)
        model.generation_config = base.merged(**kw)
        t = time.time()
        r = evaluate(model, pairs, mode=args.mode, batch_size=args.batch_size)
        dt = time.time() - t
        b = r["buckets"]
        pct = lambda x: "  n/a" if x is None else f"{100 * x:5.1f}"
        print(f"{name:14s} solved {pct(r['solved_rate'])}%  easy {pct(b['easy']['solved_rate'])}  medium "
              f"{pct(b['medium']['solved_rate'])}  hard {pct(b['hard']['solved_rate'])}  cells "
              f"{pct(r['cell_accuracy'])}  steps {r['mean_steps']:.2f}  ({dt:.1f} s, n={r['n']})", flush=True)
        results[name] = {"settings": kw, **r}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
