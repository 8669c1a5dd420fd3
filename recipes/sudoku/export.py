"""Export a trained Sudoku checkpoint for shipping: weights stored as bfloat16 (half the size; one file under 16 MB
for the base model), config dtype float32 so dgemma computes in fp32 by default, generation settings optionally
replaced (e.g. the sampler settings chosen by sweep.py), trainer state left behind.

    python recipes/sudoku/export.py runs/sudoku/diffusion/checkpoint-N src/dgemma/assets/sudoku/diffusion \
        [--set entropy_bound=0.5 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dgemma


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="generation_config override")
    args = ap.parse_args()
    model = dgemma.load(args.src, dtype="float32", device="cpu")
    over = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        over[k] = json.loads(v)
    if over:
        model.generation_config = model.generation_config.merged(**over)
    dst = Path(args.dst)
    model.save(dst, dtype="bfloat16")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "float32"  # stored in bf16, computed in fp32
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"exported {args.src} -> {dst} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
