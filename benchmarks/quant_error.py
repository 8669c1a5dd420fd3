"""Logits error of quantized weights on real Sudoku prompts: the shipped diffusion model in bf16 / fp8 / int4
against its float32 weights, on the first denoising step (a random canvas) and on a step from the solution with
half the blank cells re-noised. Prints one JSON object.

    python benchmarks/quant_error.py --puzzles all.txt [--n 64]
"""

from __future__ import annotations

import argparse
import json

import torch

import dgemma
from dgemma.tasks import sudoku


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--puzzles", required=True, help="puzzle file (puzzle,solution lines)")
    p.add_argument("--model", default=str(sudoku.default_model_dir("diffusion")))
    p.add_argument("--n", type=int, default=64, help="puzzles (default 64)")
    args = p.parse_args()
    pairs = [line.strip().split(",") for line in open(args.puzzles) if line.strip() and not line.startswith("#")]
    pairs = pairs[: args.n]
    models = {"float32": dgemma.load(args.model, dtype="float32"), "bfloat16": dgemma.load(args.model, dtype="bfloat16"),
              "fp8": dgemma.load(args.model, dtype="float32", quantize="fp8"),
              "int4": dgemma.load(args.model, dtype="float32", quantize="int4")}
    tok = models["float32"].tokenizer
    prompts = [sudoku.encode_prompt(tok, pz) for pz, _ in pairs]
    S = max(map(len, prompts))
    assert all(len(x) == S for x in prompts), "puzzle prompts have one length"
    ids = torch.tensor(prompts)
    L = models["float32"].config.canvas_length
    V = models["float32"].config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, V, (len(pairs), L), generator=g)
    sol = torch.tensor([[tok.token_to_id(ch) for ch in s[:L]] for _, s in pairs])  # canvas = the 81 digits
    half = torch.where(torch.rand(len(pairs), L, generator=g) < 0.5, noise, sol)

    def logits(m, canvas):
        bb = m.backbone
        with torch.no_grad():
            cache = bb.new_cache(len(pairs), S + L)
            bb.encode(ids, cache)
            return bb.denoise(canvas, cache).float()

    report = {"model": args.model, "puzzles": len(pairs)}
    for name, canvas in (("random_canvas", noise), ("half_solved_canvas", half)):
        ref = logits(models["float32"], canvas)
        row = {}
        for fmt in ("bfloat16", "fp8", "int4"):
            z = logits(models[fmt], canvas)
            kl = torch.nn.functional.kl_div(z.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean()
            row[fmt] = {"rel_l2": round(((z - ref).norm() / ref.norm()).item(), 5),
                        "argmax_agree": round((z.argmax(-1) == ref.argmax(-1)).float().mean().item(), 5),
                        "kl": round(kl.item(), 6)}
        report[name] = row
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
