"""`dgemma sudoku …`: generate puzzle files, solve one puzzle (optionally watching the board converge), evaluate a
model on a puzzle file; and `SudokuWatcher`, the live 9×9 board view.

`add_sudoku_parser(subparsers)` adds the `sudoku` command to an argparse subparsers object; each subcommand sets
`func(args) -> exit status`. Errors are raised as `DGemmaError`s (the `dgemma` main prints `error: ...`, exit 2);
`main(argv)` here does the same for standalone use (`python -m dgemma.tasks.sudoku_cli sudoku ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console, Group, RenderableType
from rich.text import Text

from ..watch import ACCEPTED_STYLE, DRAFT_STYLE, HEADER_STYLE, CanvasWatcher, StepView
from .sudoku import (BUCKETS, SUDOKU_CANVAS, SudokuError, _digit_table, check_answer, count_solutions,
                     decode_answer, default_model_dir, encode_prompt, evaluate, format_board, generate_puzzles,
                     parse_grid, read_puzzle_file, write_puzzle_file)

CLUE_STYLE = "bold white"
NOISE = "·"


# ===========================================================================================================
# live board
# ===========================================================================================================
class SudokuWatcher(CanvasWatcher):
    """The watched row's canvas drawn as a 9×9 board: clues in bold white, digits accepted this step in bold
    green, draft digits not yet accepted dim, anything that is not a digit 1–9 as `·`; box separators.
    The header shows step k/N, the mean entropy, the accepted count and how many blanks hold a digit."""

    def __init__(self, tokenizer: Any, console: Console | None = None, *, puzzle: str, **kwargs: Any):
        kwargs.setdefault("prompt", None)
        super().__init__(tokenizer, console, **kwargs)
        self.puzzle = parse_grid(puzzle)
        self._digits = _digit_table(tokenizer)

    def render(self) -> RenderableType:
        view = self.current_view()
        if view is None:
            return Text("waiting for the first denoising step…", style=DRAFT_STYLE)
        return Group(self.render_header(view), self.render_canvas(view))

    def _cells(self, view: StepView) -> list[str]:
        return [self._digits.get(t, "0") for t in view.tokens[:SUDOKU_CANVAS]] + ["0"] * max(
            0, SUDOKU_CANVAS - len(view.tokens))

    def render_header(self, view: StepView) -> Text:
        cells = self._cells(view)
        blanks = [i for i, ch in enumerate(self.puzzle) if ch == "0"]
        filled = sum(1 for i in blanks if cells[i] != "0")
        acc = sum(view.accepted[:SUDOKU_CANVAS])
        items = [f"step {view.step}/{view.max_steps}", f"mean H {view.mean_entropy:.3f}",
                 f"accepted {acc}/{SUDOKU_CANVAS}", f"filled {filled}/{len(blanks)}"]
        if view.canvas_index:
            items.insert(0, f"canvas {view.canvas_index + 1}")
        if not view.active:
            items.append("finished")
        elif view.done:
            items.append("stable")
        return Text(" · ".join(items), style=HEADER_STYLE)

    def render_canvas(self, view: StepView) -> Text:
        cells = self._cells(view)
        accepted = list(view.accepted[:SUDOKU_CANVAS]) + [False] * max(0, SUDOKU_CANVAS - len(view.accepted))
        text = Text()
        text.append("┌───────┬───────┬───────┐\n", style=DRAFT_STYLE)
        for r in range(9):
            if r in (3, 6):
                text.append("├───────┼───────┼───────┤\n", style=DRAFT_STYLE)
            for c in range(9):
                text.append("│ " if c == 0 else " │ " if c % 3 == 0 else " ", style=DRAFT_STYLE)
                i = r * 9 + c
                if self.puzzle[i] != "0":
                    text.append(self.puzzle[i], style=CLUE_STYLE)
                elif cells[i] == "0":
                    text.append(NOISE, style=DRAFT_STYLE)
                else:
                    text.append(cells[i], style=ACCEPTED_STYLE if accepted[i] else DRAFT_STYLE)
            text.append(" │\n", style=DRAFT_STYLE)
        text.append("└───────┴───────┴───────┘", style=DRAFT_STYLE)
        return text


# ===========================================================================================================
# argument parsing
# ===========================================================================================================
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {s}")
    return v


def parse_clue_range(s: str) -> tuple[int, int]:
    """`A-B` (or a single `A`) as (A, B), checked to be a usable clue range."""
    parts = s.strip().split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or hi is None:
        raise SudokuError(f"--clues {s!r} is invalid; expected a range like 22-45 (or one number)")
    if not 17 <= lo <= hi <= 81:
        raise SudokuError(f"--clues {s!r} is invalid; expected 17 <= A <= B <= 81 (no Sudoku with fewer than 17 "
                          "clues has a unique solution; below 22 generation gets slow)")
    return lo, hi


def add_sudoku_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `sudoku` command (generate / solve / eval) to `subparsers`; returns its parser."""
    p = subparsers.add_parser(
        "sudoku", help="Sudoku task: generate puzzles, solve one with a model, evaluate a model",
        description="Sudoku with a DiffusionGemma model trained from scratch: the prompt is the 81 puzzle digits "
                    "(0 = blank), the answer one canvas of 81 solution digits.",
        epilog="examples:\n"
               "  dgemma sudoku generate --n 1000 --clues 22-45 --out puzzles.txt\n"
               "  dgemma sudoku solve 530070000600195000098000060800060003400803001700020006060000280000419005"
               "000080079 --watch\n"
               "  dgemma sudoku eval --puzzles puzzles.txt --limit 200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sudoku_command", metavar="SUBCOMMAND", title="subcommands")

    g = sub.add_parser(
        "generate", help="write puzzles with unique solutions to a file",
        description="Generate puzzles with a unique solution and a clue count drawn uniformly from --clues, and "
                    "write one `puzzle,solution` line each (81 digits, 0 = blank). Uses all cores; the output "
                    "depends only on --seed. Practical clue range: 22 and up (21 ~1 s/puzzle, 20 ~20 s).")
    g.add_argument("--n", type=_positive_int, required=True, metavar="N", help="number of puzzles")
    g.add_argument("--clues", default="22-45", metavar="A-B", help="clue-count range, inclusive (default 22-45)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--workers", type=_positive_int, metavar="W", help="processes (default: all cores)")
    g.add_argument("--out", required=True, metavar="FILE", help="output file ('-' for stdout)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress or summary on stderr")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "solve", help="solve one puzzle with a model and check the answer",
        description="Solve PUZZLE (81 characters, row by row, 0 or . for blanks) with a Sudoku model, print the "
                    "board and a check line (valid? keeps the clues? denoising steps). Exit status 0 even when the "
                    "model fails; the check line says so.")
    s.add_argument("puzzle", metavar="PUZZLE81", help="the puzzle: 81 characters, 0 or . for blanks")
    _model_args(s)
    s.add_argument("--watch", action="store_true", help="show the board converging live (on stderr)")
    s.add_argument("--delay", type=_non_negative_float, metavar="SECONDS",
                   help="with --watch: pause after each step so the board can be followed (default 0.4)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--steps", type=_positive_int, metavar="N", help="maximum denoising steps (default: the "
                   "checkpoint's)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the board")
    s.set_defaults(func=cmd_solve)

    e = sub.add_parser(
        "eval", help="evaluate a model on a puzzle file",
        description="Solve every puzzle of FILE (lines `puzzle[,solution]`) and report the solved rate, the "
                    "accuracy on blank cells, denoising steps and tokens per forward, overall and by difficulty "
                    "(easy >= 40 clues, medium 30-39, hard < 30).")
    e.add_argument("--puzzles", required=True, metavar="FILE", help="puzzle file")
    _model_args(e)
    e.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="puzzles per batch (default 32)")
    e.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N puzzles")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    e.add_argument("--steps", type=_positive_int, metavar="N", help="maximum denoising steps (default: the "
                   "checkpoint's)")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.set_defaults(func=cmd_eval)

    def no_subcommand(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=no_subcommand)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", metavar="DIR", help="Sudoku checkpoint directory (default: the shipped model "
                   "for --mode)")
    p.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (default) or ar: greedy autoregressive decoding")
    p.add_argument("--sampler", choices=("fast", "reference"), default="fast",
                   help="diffusion sampler: fast (default) or reference (the transformers reference's RNG and "
                        "arithmetic)")
    p.add_argument("--device", metavar="DEV", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the checkpoint's)")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dgemma.tasks.sudoku_cli sudoku ...`: the `dgemma` command itself (same parser, same errors)."""
    from ..cli import main as dgemma_main

    return dgemma_main(list(sys.argv[1:] if argv is None else argv))


# ===========================================================================================================
# helpers
# ===========================================================================================================
def resolve_model_dir(path: str | None, mode: str) -> Path:
    """--model, or the shipped model of `mode`; a SudokuError when neither is usable."""
    if path is None:
        d = default_model_dir(mode)
        if not (d / "config.json").is_file():
            raise SudokuError(f"no shipped Sudoku {mode} model is present (looked in {d}); pass --model DIR with a "
                              "trained Sudoku checkpoint")
        return d
    d = Path(path)
    if not d.exists():
        raise SudokuError(f"{d}: no such directory; expected a Sudoku checkpoint directory (config.json, "
                          "*.safetensors, tokenizer.json)")
    if not d.is_dir() or not (d / "config.json").is_file():
        raise SudokuError(f"{d}: not a checkpoint directory (expected config.json, *.safetensors, tokenizer.json)")
    return d


def load_sudoku_model(args: argparse.Namespace) -> Any:
    """Load --model (or the shipped one) and check that it can be used for Sudoku in --mode."""
    from ..api import load

    d = resolve_model_dir(args.model, args.mode)
    console = Console(stderr=True)
    if console.is_terminal:
        with console.status(f"loading {d} …"):
            model = load(d, dtype=args.dtype, device=args.device)
    else:
        model = load(d, dtype=args.dtype, device=args.device)
    tok = model.tokenizer
    encode_prompt(tok, "0" * 81)  # raises when the tokenizer has no digit tokens
    if args.mode == "ar" and not callable(getattr(model, "generate_ar", None)):
        raise SudokuError("this dgemma has no autoregressive decoding (DiffusionGemma.generate_ar); use "
                          "--mode diffusion")
    return model


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def check_line(chk: dict[str, Any], steps: int, mode: str) -> str:
    """`valid ✓, keeps all 34 clues ✓, 11 denoising steps` (with what is wrong when the answer is not a solution)."""
    what = f"{steps} denoising step{'s' if steps != 1 else ''}" if mode == "diffusion" else \
        f"{steps} autoregressive steps"
    if chk["valid"]:
        valid = "valid ✓"
    else:
        why = []
        if chk["empty_cells"]:
            why.append(f"{chk['empty_cells']} empty cell{'s' if chk['empty_cells'] != 1 else ''}")
        if chk["conflicts"]:
            units = "row/column/box" if chk["conflicts"] == 1 else "rows/columns/boxes"
            why.append(f"{chk['conflicts']} {units} with a repeated digit")
        valid = f"valid ✗ ({', '.join(why)})"
    keeps = (f"keeps all {chk['clues']} clues ✓" if chk["keeps_clues"] else
             f"keeps the {chk['clues']} clues ✗ ({chk['changed_clues']} changed)")
    line = f"{valid}, {keeps}, {what}"
    return line if chk["solved"] else f"NOT SOLVED: {line}"


# ===========================================================================================================
# dgemma sudoku generate
# ===========================================================================================================
def cmd_generate(args: argparse.Namespace) -> int:
    lo, hi = parse_clue_range(args.clues)
    out = args.out
    if out != "-":
        parent = Path(out).resolve().parent
        if not parent.is_dir():
            raise SudokuError(f"{out}: directory {parent} does not exist")
        if Path(out).is_dir():
            raise SudokuError(f"{out} is a directory; expected a file name")
    progress, finish = (None, lambda: None) if args.quiet else _count_progress(args.n, "generating puzzles")
    t0 = time.perf_counter()
    try:
        pairs = generate_puzzles(args.n, clues=(lo, hi), seed=args.seed, workers=args.workers, progress=progress)
    finally:
        finish()
    elapsed = time.perf_counter() - t0
    header = f"dgemma sudoku generate --n {args.n} --clues {lo}-{hi} --seed {args.seed}\npuzzle,solution"
    if out == "-":
        sys.stdout.write(f"# {header.splitlines()[0]}\n# puzzle,solution\n")
        sys.stdout.write("".join(f"{p},{s}\n" for p, s in pairs))
        sys.stdout.flush()
    else:
        write_puzzle_file(out, pairs, header=header)
    if not args.quiet:
        rate = f" ({len(pairs) / elapsed:.1f} puzzles/s)" if elapsed > 0 else ""
        where = "stdout" if out == "-" else out
        print(f"wrote {len(pairs)} puzzles (clues {lo}-{hi}, seed {args.seed}) to {where} in {elapsed:.1f} s{rate}",
              file=sys.stderr)
    return 0


def _count_progress(total: int, label: str) -> tuple[Any, Any]:
    """(progress(done, total), finish()) drawing a bar on a terminal stderr, else a line every ~10%."""
    console = Console(stderr=True)
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True)
        task = bar.add_task(label, total=total)
        bar.start()

        def progress(done: int, total_: int) -> None:
            bar.update(task, completed=done, total=total_)

        return progress, bar.stop
    step = max(1, total // 10)

    def progress_lines(done: int, total_: int) -> None:
        if done % step == 0 and done < total_:
            print(f"{label}: {done}/{total_}", file=sys.stderr, flush=True)

    return progress_lines, lambda: None


# ===========================================================================================================
# dgemma sudoku solve
# ===========================================================================================================
def cmd_solve(args: argparse.Namespace) -> int:
    import torch

    puzzle = parse_grid(args.puzzle)  # fail before loading the model
    if args.watch and args.mode != "diffusion":
        raise SudokuError("--watch shows denoising steps; it needs --mode diffusion")
    if args.delay is not None and not args.watch:
        raise SudokuError("--delay paces the live board; it needs --watch")
    delay = 0.4 if args.delay is None else args.delay
    slept = 0.0
    model = load_sudoku_model(args)
    tok = model.tokenizer
    ids = torch.tensor([encode_prompt(tok, puzzle)])
    t0 = time.perf_counter()
    if args.mode == "ar":
        out = model.generate_ar(ids, max_new_tokens=SUDOKU_CANVAS)
        steps, tpf = SUDOKU_CANVAS, 1.0
    else:
        kw: dict[str, Any] = dict(seed=args.seed, max_new_tokens=SUDOKU_CANVAS, max_denoising_steps=args.steps,
                                  eos_token_id=None, sampler=args.sampler)
        if args.watch:
            with SudokuWatcher(tok, Console(stderr=True), puzzle=puzzle) as w:
                def on_step(info: Any) -> None:
                    nonlocal slept
                    w.on_step(info)
                    if delay > 0:
                        time.sleep(delay)  # let the eye follow each step (not counted in elapsed_s)
                        slept += delay

                out = model.generate(ids, on_step=on_step, on_canvas=w.on_canvas, **kw)
        else:
            out = model.generate(ids, **kw)
        steps = int(sum(out.steps_per_canvas[0]))
        tpf = float(out.tokens_per_forward[0])
    elapsed = time.perf_counter() - t0 - slept
    P = ids.shape[1]
    answer = decode_answer(tok, torch.as_tensor(out.sequences)[0, P:P + SUDOKU_CANVAS].tolist())
    chk = check_answer(answer, puzzle)
    n_sol = count_solutions(puzzle, limit=2)
    if args.json:
        record = {"puzzle": puzzle, "answer": answer, **chk, "puzzle_solutions": n_sol, "mode": args.mode,
                  "steps": steps, "tokens_per_forward": round(tpf, 4), "seed": args.seed if args.mode ==
                  "diffusion" else None, "elapsed_s": round(elapsed, 4)}
        print(json.dumps(record))
        return 0
    print(format_board(answer))
    print(check_line(chk, steps, args.mode))
    if n_sol == 0:
        print("note: this puzzle has no solution", file=sys.stderr)
    elif n_sol > 1:
        print("note: this puzzle has more than one solution (any valid one counts)", file=sys.stderr)
    return 0


# ===========================================================================================================
# dgemma sudoku eval
# ===========================================================================================================
def cmd_eval(args: argparse.Namespace) -> int:
    pairs = read_puzzle_file(args.puzzles)
    if args.limit is not None:
        pairs = pairs[:args.limit]
    if not pairs:
        raise SudokuError(f"{args.puzzles}: no puzzles in the file (lines: 81-character puzzle[,solution])")
    model = load_sudoku_model(args)
    progress, finish = _count_progress(len(pairs), "solving")
    t0 = time.perf_counter()
    try:
        report = evaluate(model, pairs, mode=args.mode, batch_size=args.batch_size, seed=args.seed,
                          max_denoising_steps=args.steps, progress=progress, sampler=args.sampler)
    finally:
        finish()
    elapsed = time.perf_counter() - t0
    if args.json:
        report.update(mode=args.mode, seed=args.seed, sampler=args.sampler, elapsed_s=round(elapsed, 3))
        print(json.dumps(report))
        return 0
    print(format_report(report, title=f"{model.path or 'model'} · {args.mode} · {report['n']} puzzles · seed "
                                      f"{args.seed} · {elapsed:.1f} s"))
    return 0


def format_report(report: dict[str, Any], title: str | None = None) -> str:
    """The `dgemma sudoku eval` table: overall and per bucket."""
    head = f"{'':<8} {'n':>6} {'solved':>8} {'cell acc':>9} {'mean steps':>11} {'median':>7} {'tok/fwd':>8}"
    lines = [title] if title else []
    lines.append(head)
    ranges = {"easy": ">=40 clues", "medium": "30-39", "hard": "<30"}
    rows = [("all", report, "")] + [(name, report["buckets"][name], ranges.get(name, "")) for name, _, _ in BUCKETS]
    for name, r, note in rows:
        lines.append(f"{name:<8} {r['n']:>6} {_pct(r['solved_rate']):>8} {_pct(r['cell_accuracy']):>9} "
                     f"{_num(r['mean_steps']):>11} {_num(r['median_steps']):>7} "
                     f"{_num(r['tokens_per_forward'], 2):>8}  {note}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
