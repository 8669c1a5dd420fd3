"""Prepare the Sudoku recipe: a randomly initialised DiffusionGemma-architecture model with the Sudoku tokenizer,
training data as JSONL for `dgemma train`, and held-out puzzles for `dgemma sudoku eval`.

    python recipes/sudoku/prepare.py --out runs/sudoku --n-train 40000 --n-test 1000 --size base --augment 10

Writes OUT/init/ (checkpoint), OUT/train.jsonl ({"prompt": puzzle, "completion": solution}), OUT/test.txt and,
with --augment K, OUT/train_aug.jsonl: every training puzzle plus K random symmetries of it (digit relabelling,
band/stack and row/column shuffles, transposition; each keeps the unique solution), so a large training set costs
no extra solver time. Existing train.jsonl/test.txt in OUT are reused (the generator is the slow part), as is an
existing OUT/init.
The model answers with one canvas of exactly 81 digits, so `append_eos = false` in the training config.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from dgemma.config import GenerationConfig, ModelConfig, TextConfig
from dgemma.presets import init_from_config
from dgemma.tasks.sudoku import (SUDOKU_CANVAS, SUDOKU_VOCAB_SIZE, augment, build_sudoku_tokenizer,
                                 generate_puzzles, read_puzzle_file, write_puzzle_file)

COMMON = dict(vocab_size=SUDOKU_VOCAB_SIZE, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
              num_experts=4, top_k_experts=2, sliding_window=256, max_position_embeddings=512, pad_token_id=0,
              eos_token_id=1, bos_token_id=2)
SIZES = {
    # 2.2M parameters: the first CPU run
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, moe_intermediate_size=128),
    # 6.5M parameters (13 MB in bf16): the shipped model
    "base": dict(hidden_size=192, intermediate_size=384, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=3, moe_intermediate_size=192),
}
MODEL = {**COMMON, **SIZES["small"]}  # kept for scripts that import it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sudoku")
    ap.add_argument("--n-train", type=int, default=40_000)
    ap.add_argument("--n-test", type=int, default=1_000)
    ap.add_argument("--clues", default="22-45", help="clue range of the puzzles (inclusive)")
    ap.add_argument("--size", choices=sorted(SIZES), default="base", help="model size (default base)")
    ap.add_argument("--augment", type=int, default=0, metavar="K",
                    help="also write train_aug.jsonl with K random symmetries of every training puzzle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = (int(x) for x in args.clues.split("-"))

    tok = build_sudoku_tokenizer()
    cfg = ModelConfig(text=TextConfig(**COMMON, **SIZES[args.size]), canvas_length=SUDOKU_CANVAS, dtype="float32")
    gcfg = GenerationConfig(max_new_tokens=SUDOKU_CANVAS, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4,
                            t_max=0.8, stability_threshold=1, confidence_threshold=0.005, eos_token_id=1,
                            pad_token_id=0, bos_token_id=2)
    if not (out / "init" / "config.json").exists():
        init_from_config(cfg, gcfg, tok, out / "init", seed=args.seed, embed_std=0.02)
    print(f"model ({args.size}): {cfg.text.param_counts()['total']:,} parameters -> {out / 'init'}", file=sys.stderr)

    t = time.time()
    if (out / "train.jsonl").exists() and (out / "test.txt").exists():
        with open(out / "train.jsonl") as fh:
            train = [(r["prompt"], r["completion"]) for r in map(json.loads, fh)]
        print(f"data: reusing {len(train)} train puzzles in {out}", file=sys.stderr)
    else:
        test = generate_puzzles(args.n_test, clues=(lo, hi), seed=10_000_000 + args.seed, workers=args.workers)
        write_puzzle_file(out / "test.txt", test)
        train = generate_puzzles(args.n_train, clues=(lo, hi), seed=args.seed, workers=args.workers)
        held = {p for p, _ in test}
        train = [(p, s) for p, s in train if p not in held]
        with open(out / "train.jsonl", "w") as fh:
            for p, s in train:
                fh.write(json.dumps({"prompt": p, "completion": s}) + "\n")
        print(f"data: {len(train)} train, {len(test)} test puzzles in {time.time() - t:.0f} s", file=sys.stderr)

    if args.augment > 0:
        t = time.time()
        held = {p for p, _ in read_puzzle_file(out / "test.txt")}
        rng = random.Random(args.seed + 1)
        n = 0
        with open(out / "train_aug.jsonl", "w") as fh:
            for p, s in train:
                pairs = [(p, s)] + [augment(p, s, rng) for _ in range(args.augment)]
                for ap_, as_ in pairs:
                    if ap_ not in held:
                        fh.write(json.dumps({"prompt": ap_, "completion": as_}) + "\n")
                        n += 1
        print(f"augmented: {n} examples -> {out / 'train_aug.jsonl'} in {time.time() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
