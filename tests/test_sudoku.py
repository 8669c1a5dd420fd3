"""The Sudoku task: solver, validator, generator, puzzle files, tokenizer, encoding, evaluation, board view, CLI."""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dgemma.api import DiffusionGemma
from dgemma.config import GenerationConfig, ModelConfig, TextConfig
from dgemma.errors import DGemmaError
from dgemma.model import Backbone
from dgemma.model.layers import init_weights
from dgemma.presets import PRESETS
from dgemma.tasks import sudoku as S
from dgemma.tasks import sudoku_cli
from dgemma.tokenizer import Tokenizer

# Gordon Royle's first 17-clue puzzle, and the 17-clue puzzle built to defeat naive backtracking (its first row
# is 987654321), both with their unique solutions; Arto Inkala's "world's hardest" (21 clues).
ROYLE17 = ("000000010400000000020000000000050407008000300001090000300400200050100000000806000",
           "693784512487512936125963874932651487568247391741398625319475268856129743274836159")
ANTI_BF17 = ("..............3.85..1.2.......5.7.....4...1...9.......5......73..2.1........4...9",
             "987654321246173985351928746128537694634892157795461832519286473472319568863745219")
INKALA = ("800000000003600000070090200050007000000045700000100030001000068008500010090000400",
          "812753649943682175675491283154237896369845721287169534521974368438526917796318452")
EASY = ("530070000600195000098000060800060003400803001700020006060000280000419005000080079",
        "534678912672195348198342567859761423426853791713924856961537284287419635345286179")
# ROYLE17's solution with a rectangle a b / b a (two boxes) blanked: exactly two solutions.
TWO_SOLUTIONS = "693784002487512936125963874932651487568247391741398625319475268856129743274836009"


def swap(grid: str, i: int, j: int) -> str:
    g = list(grid)
    g[i], g[j] = g[j], g[i]
    return "".join(g)


# ---------------------------------------------------------------------------------------------------------------
# solver and validator
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("puzzle,solution", [EASY, ROYLE17, ANTI_BF17, INKALA], ids=["easy", "royle17", "anti-bf17",
                                                                                      "inkala"])
def test_solve_known_puzzles(puzzle, solution):
    t0 = time.perf_counter()
    assert S.solve(puzzle) == solution
    assert S.count_solutions(puzzle) == 1
    assert time.perf_counter() - t0 < 1.0
    assert S.is_valid_solution(solution) and S.solves(solution, puzzle)


def test_clue_counts_of_known_puzzles():
    assert S.clue_count(ROYLE17[0]) == 17 and S.clue_count(ANTI_BF17[0]) == 17 and S.clue_count(INKALA[0]) == 21


def test_count_solutions_multiple_and_none():
    assert S.count_solutions(TWO_SOLUTIONS) == 2
    assert S.count_solutions(TWO_SOLUTIONS, limit=10) == 2
    assert S.count_solutions(TWO_SOLUTIONS, limit=1) == 1
    assert S.solves(S.solve(TWO_SOLUTIONS), TWO_SOLUTIONS)
    assert S.count_solutions("0" * 81, limit=5) == 5
    clash = "11" + "0" * 79  # two 1s in row 1
    assert S.count_solutions(clash) == 0 and S.solve(clash) is None
    with pytest.raises(ValueError):
        S.count_solutions(EASY[0], limit=0)


def test_validator_negatives():
    sol = EASY[1]
    assert S.is_valid_solution(sol)
    row_dup = swap(sol, 0, 9)  # (0,0) <-> (1,0): column 0 and box 0 stay valid, rows 0 and 1 repeat a digit
    col_dup = swap(sol, 0, 1)  # (0,0) <-> (0,1): row 0 and box 0 stay valid, columns 0 and 1 repeat a digit
    box_dup = sol[27:36] + sol[9:27] + sol[0:9] + sol[36:]  # rows 0 and 3 exchanged: rows and columns stay valid
    for bad in (row_dup, col_dup, box_dup):
        assert not S.is_valid_solution(bad)
    units = S.check_answer  # conflicts: rows/columns/boxes with a repeat
    assert units(row_dup, "0" * 81)["conflicts"] == 2 and units(col_dup, "0" * 81)["conflicts"] == 2
    assert units(box_dup, "0" * 81)["conflicts"] > 0
    assert not S.is_valid_solution("0" + sol[1:])  # incomplete
    assert not S.is_valid_solution(sol[:80]) and not S.is_valid_solution(sol + "1")
    assert not S.is_valid_solution("x" + sol[1:]) and not S.is_valid_solution(None)
    puzzle = EASY[0]
    assert S.solves(sol, puzzle)
    relabelled = sol.translate(str.maketrans("53", "35"))  # a valid grid, but clues 5 and 3 changed
    assert S.is_valid_solution(relabelled) and not S.solves(relabelled, puzzle)
    assert not S.solves(row_dup, puzzle)


def test_check_answer_details():
    puzzle, sol = EASY
    assert S.check_answer(sol, puzzle) == {"valid": True, "keeps_clues": True, "solved": True, "clues": 30,
                                          "changed_clues": 0, "empty_cells": 0, "conflicts": 0}
    c = S.check_answer("0" * 81, puzzle)
    assert c["empty_cells"] == 81 and c["changed_clues"] == 30 and not c["solved"]
    c = S.check_answer(swap(sol, 0, 1), puzzle)
    assert c["conflicts"] == 2 and c["changed_clues"] == 2 and not c["valid"]


def test_parse_grid():
    assert S.parse_grid(" " + ANTI_BF17[0] + "\n") == ANTI_BF17[0].replace(".", "0")
    with pytest.raises(ValueError, match="81 cells.*got 80"):
        S.parse_grid(EASY[0][:80])
    with pytest.raises(ValueError, match=r"'x' at position 5 \(row 1, column 5\)"):
        S.parse_grid(EASY[0][:4] + "x" + EASY[0][5:])
    with pytest.raises(DGemmaError):  # PuzzleFormatError is both a ValueError and a DGemmaError
        S.parse_grid("")
    assert "5 3 . | . 7 . | . . ." in S.format_board(EASY[0]).splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated():
    return S.generate_puzzles(12, clues=(22, 40), seed=5, workers=1)


def test_generator_unique_in_range_and_valid(generated):
    assert len(generated) == 12
    for puzzle, solution in generated:
        assert 22 <= S.clue_count(puzzle) <= 40
        assert S.count_solutions(puzzle) == 1
        assert S.is_valid_solution(solution) and S.solves(solution, puzzle)
        assert S.solve(puzzle) == solution
    assert len({p for p, _ in generated}) == 12
    assert len({S.clue_count(p) for p, _ in generated}) > 3  # the clue count varies


def test_generator_deterministic_across_workers(generated):
    assert S.generate_puzzles(12, clues=(22, 40), seed=5, workers=2) == generated
    assert S.generate_puzzles(3, clues=(22, 40), seed=5, workers=1) == generated[:3]  # puzzle i depends on i only
    assert S.generate_puzzles(3, clues=(22, 40), seed=6, workers=1) != generated[:3]


def test_generator_exact_clue_count_and_errors():
    for p, _ in S.generate_puzzles(4, clues=(35, 35), seed=1, workers=1):
        assert S.clue_count(p) == 35
    assert S.generate_puzzles(0) == []
    with pytest.raises(ValueError, match="17"):
        S.generate_puzzles(1, clues=(16, 30))
    with pytest.raises(ValueError):
        S.generate_puzzles(1, clues=(40, 30))
    with pytest.raises(ValueError):
        S.generate_puzzles(1, workers=0)


def test_augment_keeps_clues_uniqueness_and_maps_the_solution(generated):
    import random

    rng = random.Random(0)
    for puzzle, solution in generated[:6]:
        images = set()
        for _ in range(4):
            p, s = S.augment(puzzle, solution, rng)
            assert S.clue_count(p) == S.clue_count(puzzle)
            assert S.is_valid_solution(s) and S.solves(s, p)
            assert S.count_solutions(p) == 1 and S.solve(p) == s
            # a cell's clue and its solution digit move together: same blank pattern size, digits relabelled
            assert sorted(p.count(d) for d in "123456789") == sorted(puzzle.count(d) for d in "123456789")
            images.add(p)
        assert len(images) == 4 and puzzle not in images
    assert S.augment(*generated[0], random.Random(7)) == S.augment(*generated[0], random.Random(7))
    with pytest.raises(S.PuzzleFormatError, match="does not solve"):
        S.augment(generated[0][0], generated[1][1], rng)


# ---------------------------------------------------------------------------------------------------------------
# puzzle files
# ---------------------------------------------------------------------------------------------------------------
def test_puzzle_file_round_trip(tmp_path, generated):
    path = tmp_path / "p.txt"
    assert S.write_puzzle_file(path, generated[:3], header="made by a test") == 3
    text = path.read_text()
    assert text.startswith("# made by a test\n")
    assert text.splitlines()[1] == f"{generated[0][0]},{generated[0][1]}"
    extra = f"\n   \n# comment\n{ANTI_BF17[0]}\n{EASY[0].replace('0', '.')},{EASY[1]}\n"
    path.write_text(text + extra)
    got = S.read_puzzle_file(path)
    assert got[:3] == generated[:3]
    assert got[3] == (ANTI_BF17[0].replace(".", "0"), None)
    assert got[4] == EASY
    S.write_puzzle_file(path, [ANTI_BF17[0]])  # puzzle-only entries
    assert S.read_puzzle_file(path) == [(ANTI_BF17[0].replace(".", "0"), None)]


@pytest.mark.parametrize("bad,match", [
    (EASY[0][:80], "81 cells"),
    (EASY[0][:10] + "a" + EASY[0][11:], "'a' at position 11"),
    (f"{EASY[0]},{EASY[1]},{EASY[1]}", "3 comma-separated fields"),
    (f"{EASY[0]},{EASY[0]}", "solution has blanks"),
    (f"{EASY[0]},{swap(EASY[1], 0, 1)}", "breaks the Sudoku rules"),
    (f"{EASY[0]},{EASY[1].translate(str.maketrans('53', '35'))}", "does not keep the puzzle's clues"),
])
def test_puzzle_file_bad_lines_name_the_line(tmp_path, bad, match):
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\n{EASY[0]}\n\n{bad}\n")
    with pytest.raises(ValueError, match=match) as e:
        S.read_puzzle_file(path)
    assert f"{path}:4:" in str(e.value)
    assert isinstance(e.value, DGemmaError)


def test_puzzle_file_missing(tmp_path):
    with pytest.raises(DGemmaError, match="not found"):
        S.read_puzzle_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and encoding
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return S.build_sudoku_tokenizer()


def test_tokenizer_ids_and_round_trip(tok, tmp_path):
    assert tok.vocab_size == S.SUDOKU_VOCAB_SIZE == 32
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(str(d)) for d in range(10)] == list(range(4, 14))
    assert tok.token_to_id("\n") == 14 and tok.token_to_id("|") == 15
    board = S.format_board(EASY[0]) + "\n" + f"{EASY[0]},{EASY[1]}"
    ids = tok.encode(board, add_special_tokens=False)
    assert len(ids) == len(board) and tok.decode(ids) == board
    assert tok.encode("12")[0] == 2  # BOS prepended
    assert tok.encode("a") == [2, 3]  # unknown character -> <unk>
    for i in range(32):  # every id decodes to something
        assert tok.decode([i]) != ""
    tok.save(tmp_path / "t")
    again = Tokenizer.from_dir(tmp_path / "t")
    assert again.vocab_size == 32 and again.encode(board) == tok.encode(board) and again.decode(ids) == board
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 1, 2)


def test_encode_prompt_and_decode_answer(tok):
    ids = S.encode_prompt(tok, ANTI_BF17[0])
    assert len(ids) == 82 and ids[0] == 2 and ids[1:] == [4 + int(c) for c in ANTI_BF17[0].replace(".", "0")]
    sol_ids = [4 + int(c) for c in EASY[1]]
    assert S.decode_answer(tok, sol_ids) == EASY[1]
    assert S.decode_answer(tok, torch.tensor(sol_ids)) == EASY[1]
    noisy = [0, 1, 2, 3, 14, 31] + sol_ids[6:]
    assert S.decode_answer(tok, noisy) == "000000" + EASY[1][6:]
    assert S.decode_answer(tok, sol_ids[:80]) == EASY[1][:80] + "0"
    with pytest.raises(ValueError):
        S.encode_prompt(tok, "123")


# ---------------------------------------------------------------------------------------------------------------
# scoring and evaluation
# ---------------------------------------------------------------------------------------------------------------
def test_score():
    puzzle, sol = EASY
    assert S.score(puzzle, sol, sol) == (True, 51, 51)
    assert S.score(puzzle, None, sol) == (True, 51, 51)  # reference from the solver
    wrong = swap(sol, 2, 3)  # two blank cells swapped: row fine, columns broken
    assert S.score(puzzle, sol, wrong) == (False, 49, 51)
    assert S.score(puzzle, sol, "0" * 81) == (False, 0, 51)
    assert S.score(puzzle, sol, puzzle) == (False, 0, 51)
    # a valid grid keeping the clues that differs from the given solution does not count as solved
    alt = swap(swap(ROYLE17[1], 6, 7), 78, 79)  # the other solution of TWO_SOLUTIONS
    assert S.solves(alt, TWO_SOLUTIONS) and alt != ROYLE17[1]
    assert S.score(TWO_SOLUTIONS, ROYLE17[1], alt)[0] is False
    assert S.score(TWO_SOLUTIONS, None, alt)[0] is True


def test_buckets():
    assert [S.bucket_of(n) for n in (17, 29, 30, 39, 40, 81)] == ["hard", "hard", "medium", "medium", "easy", "easy"]


class OracleModel:
    """Answers every puzzle with its solution (diffusion: 3 steps; ar: generate_ar)."""

    def __init__(self, tok):
        self.tokenizer = tok
        self.calls = []

    def _answer(self, input_ids):
        rows = []
        for row in input_ids.tolist():
            puzzle = "".join(str(t - 4) for t in row[1:])
            rows.append(row + [4 + int(c) for c in S.solve(puzzle)])
        return torch.tensor(rows)

    def generate(self, input_ids, **kw):
        self.calls.append(kw)
        B = input_ids.shape[0]
        return SimpleNamespace(sequences=self._answer(input_ids), steps_per_canvas=[[3] for _ in range(B)],
                               tokens_per_forward=torch.full((B,), 27.0))

    def generate_ar(self, input_ids, max_new_tokens):
        assert max_new_tokens == 81
        return SimpleNamespace(sequences=self._answer(input_ids))


MIXED = [EASY, ROYLE17, INKALA, (ANTI_BF17[0], None)]  # medium 30, hard 17, hard 21, hard 17 (no solution given)


def test_evaluate_oracle(tok, generated):
    pairs = MIXED + generated[:4]
    model = OracleModel(tok)
    rep = S.evaluate(model, pairs, batch_size=3, seed=7, max_denoising_steps=5)
    assert rep["n"] == 8 and rep["solved_rate"] == 1.0 and rep["cell_accuracy"] == 1.0
    assert rep["mean_steps"] == 3.0 and rep["median_steps"] == 3.0 and rep["tokens_per_forward"] == 27.0
    counts = {name: sum(1 for p, _ in pairs if S.bucket_of(S.clue_count(p)) == name) for name in ("easy", "medium",
                                                                                                    "hard")}
    assert {k: v["n"] for k, v in rep["buckets"].items()} == counts
    # the fast sampler: puzzle i gets seed + i (its answer does not depend on the batching)
    assert [c["seed"] for c in model.calls] == [[7, 8, 9], [10, 11, 12], [13, 14]]
    assert all(c["max_new_tokens"] == 81 and c["max_denoising_steps"] == 5 for c in model.calls)
    ar = S.evaluate(model, pairs, mode="ar", batch_size=4)
    assert ar["solved_rate"] == 1.0 and ar["mean_steps"] == 81.0 and ar["tokens_per_forward"] == 1.0
    only_hard = S.evaluate(model, [ROYLE17])
    assert only_hard["buckets"]["easy"] == {"solved_rate": None, "cell_accuracy": None, "mean_steps": None,
                                            "median_steps": None, "tokens_per_forward": None, "n": 0}
    with pytest.raises(DGemmaError, match="mode"):
        S.evaluate(model, pairs, mode="beam")


# ---------------------------------------------------------------------------------------------------------------
# a tiny random model with the Sudoku vocabulary
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tok):
    text = dict(PRESETS["tiny"]["text"])
    text.update(vocab_size=32, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg = ModelConfig(text=TextConfig(**text), canvas_length=S.SUDOKU_CANVAS, dtype="float32")
    backbone = Backbone(cfg.text)
    init_weights(backbone, generator=torch.Generator().manual_seed(0))
    backbone.eval().requires_grad_(False)
    gcfg = GenerationConfig(max_new_tokens=81, max_denoising_steps=6, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return DiffusionGemma(cfg, backbone, gcfg, tok)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("sudoku-tiny")
    tiny.save(d)
    return d


def test_evaluate_tiny_model(tiny, generated):
    pairs = MIXED + generated[:3]
    seen = []
    rep = S.evaluate(tiny, pairs, batch_size=4, seed=0, progress=lambda done, total: seen.append((done, total)))
    keys = {"solved_rate", "cell_accuracy", "mean_steps", "median_steps", "tokens_per_forward", "n"}
    assert set(rep) == keys | {"buckets"} and set(rep["buckets"]) == {"easy", "medium", "hard"}
    assert rep["n"] == 7 and sum(b["n"] for b in rep["buckets"].values()) == 7
    assert all(set(b) == keys for b in rep["buckets"].values())
    assert 0.0 <= rep["solved_rate"] <= 1.0 and 0.0 <= rep["cell_accuracy"] <= 1.0
    assert 1 <= rep["mean_steps"] <= 6 and rep["tokens_per_forward"] > 0
    assert seen == [(4, 7), (7, 7)]
    again = S.evaluate(tiny, pairs, batch_size=4, seed=0)
    assert again == rep  # seeded
    rows = S.evaluate(tiny, pairs[:2], batch_size=2, max_denoising_steps=2, return_rows=True)["rows"]
    assert [r["puzzle"] for r in rows] == [MIXED[0][0], MIXED[1][0]] and all(r["steps"] <= 2 for r in rows)
    assert all(len(r["answer"]) == 81 for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# board view
# ---------------------------------------------------------------------------------------------------------------
def test_watcher_renders_board(tiny, tok):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=100)
    puzzle = EASY[0]
    with S.SudokuWatcher(tok, console, puzzle=puzzle) as w:
        tiny.generate(torch.tensor([S.encode_prompt(tok, puzzle)]), seed=0, max_new_tokens=81, eos_token_id=None,
                      on_step=w.on_step, on_canvas=w.on_canvas)
    out = buf.getvalue()
    lines = out.splitlines()
    assert lines[0].startswith("step ") and "mean H" in lines[0] and "accepted" in lines[0] and "/81" in lines[0]
    assert "┌───────┬───────┬───────┐" in out and "├───────┼───────┼───────┤" in out
    board = [ln for ln in lines if ln.startswith("│")]
    assert len(board) == 9 and all(len(ln) == 25 for ln in board)
    assert board[0].startswith("│ 5 3 ") and board[0][8] == "│"  # clues shown, box separator after 3 cells

    # styles: clue, accepted digit, draft digit, noise
    view = sudoku_cli.StepView(canvas_index=0, step=2, max_steps=6, temperature=0.7, mean_entropy=0.5,
                               tokens=[4 + int(c) for c in EASY[1][:2]] + [13, 6] + [0] * 77,
                               accepted=[False, False, True, False] + [False] * 77, done=False, active=True)
    text = w.render_canvas(view)
    first_row = text.plain.index("│ 5")  # the row of cells 0-8: `│ 5 3 4 │ 2 7 · │ · · · │`
    col = {0: 2, 1: 4, 2: 6, 3: 10, 5: 14}  # character offset of a cell in its line

    def cell(c):
        at = first_row + col[c]
        styles = [str(sp.style) for sp in text.spans if sp.start <= at < sp.end]
        return text.plain[at], styles[-1]

    assert cell(0) == ("5", sudoku_cli.CLUE_STYLE) and cell(1) == ("3", sudoku_cli.CLUE_STYLE)
    assert cell(2) == ("9", "bold green")  # blank in the puzzle, accepted this step
    assert cell(3) == ("2", "dim")  # drafted, not accepted
    assert cell(5) == ("·", "dim")  # noise (the pad token)
    assert w.render_header(view).plain == "step 2/6 · mean H 0.500 · accepted 1/81 · filled 2/51"


# ---------------------------------------------------------------------------------------------------------------
# CLI (through add_sudoku_parser, as `dgemma` wires it)
# ---------------------------------------------------------------------------------------------------------------
def run_cli(argv):
    parser = argparse.ArgumentParser(prog="dgemma")
    S.add_sudoku_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_solve(tiny_dir, capsys):
    assert run_cli(["sudoku", "solve", EASY[0], "--model", str(tiny_dir), "--steps", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 12 and out[3] == "------+-------+------"
    assert "clues" in out[-1] and "denoising step" in out[-1]
    assert out[-1].startswith("NOT SOLVED") == ("keeps all 30 clues ✓" not in out[-1] or "valid ✗" in out[-1])

    assert run_cli(["sudoku", "solve", EASY[0], "--model", str(tiny_dir), "--json", "--seed", "3"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["puzzle"] == EASY[0] and len(rec["answer"]) == 81 and rec["clues"] == 30 and rec["seed"] == 3
    assert rec["puzzle_solutions"] == 1 and 1 <= rec["steps"] <= 6 and isinstance(rec["solved"], bool)

    assert run_cli(["sudoku", "solve", EASY[0], "--model", str(tiny_dir), "--watch", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "┌───────┬" in captured.err and "step 2/2" in captured.err


def test_cli_solve_check_line():
    chk = S.check_answer(EASY[1], EASY[0])
    assert sudoku_cli.check_line(chk, 11, "diffusion") == "valid ✓, keeps all 30 clues ✓, 11 denoising steps"
    bad = sudoku_cli.check_line(S.check_answer("0" + EASY[1][1:], EASY[0]), 48, "diffusion")
    assert bad.startswith("NOT SOLVED: valid ✗ (1 empty cell)") and "keeps the 30 clues ✗ (1 changed)" in bad


def test_cli_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(DGemmaError, match="81 cells"):
        run_cli(["sudoku", "solve", "123", "--model", str(tiny_dir)])
    assert sudoku_cli.main(["sudoku", "solve", "12x"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid character 'x' at position 3")
    monkeypatch.setattr(sudoku_cli, "default_model_dir", lambda mode="diffusion": tmp_path / "none" / mode)
    with pytest.raises(DGemmaError, match="no shipped Sudoku diffusion model.*--model"):
        run_cli(["sudoku", "solve", EASY[0]])
    with pytest.raises(DGemmaError, match="no such directory"):
        run_cli(["sudoku", "solve", EASY[0], "--model", str(tmp_path / "missing")])
    with pytest.raises(DGemmaError, match="--clues"):
        run_cli(["sudoku", "generate", "--n", "2", "--clues", "10-20", "--out", str(tmp_path / "x.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_text("123\n")
    assert sudoku_cli.main(["sudoku", "eval", "--puzzles", str(bad), "--model", str(tiny_dir)]) == 2
    assert f"error: {bad}:1:" in capsys.readouterr().err
    assert sudoku_cli.main(["sudoku"]) == 2


def test_cli_eval(tiny_dir, tmp_path, generated, capsys):
    path = tmp_path / "p.txt"
    S.write_puzzle_file(path, MIXED + generated[:4])
    assert run_cli(["sudoku", "eval", "--puzzles", str(path), "--model", str(tiny_dir), "--json", "--limit", "5",
                    "--batch-size", "3", "--steps", "3"]) == 0
    rep = json.loads(capsys.readouterr().out)
    first5 = [p for p, _ in (MIXED + generated[:4])[:5]]
    assert rep["n"] == 5
    for name in ("easy", "medium", "hard"):
        assert rep["buckets"][name]["n"] == sum(1 for p in first5 if S.bucket_of(S.clue_count(p)) == name)
    assert rep["mode"] == "diffusion" and rep["mean_steps"] <= 3
    assert run_cli(["sudoku", "eval", "--puzzles", str(path), "--model", str(tiny_dir), "--steps", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["n", "solved"]
    assert [ln.split()[0] for ln in table[2:]] == ["all", "easy", "medium", "hard"]
    assert table[2].split()[1] == "8"


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "g.txt"
    assert run_cli(["sudoku", "generate", "--n", "6", "--clues", "30-34", "--seed", "2", "--workers", "1",
                    "--out", str(out)]) == 0
    assert "wrote 6 puzzles" in capsys.readouterr().err
    pairs = S.read_puzzle_file(out)
    assert pairs == S.generate_puzzles(6, clues=(30, 34), seed=2, workers=1)
    assert out.read_text().startswith("# dgemma sudoku generate --n 6 --clues 30-34 --seed 2\n")


# ---------------------------------------------------------------------------------------------------------------
# the shipped models (src/dgemma/assets/sudoku): trained from scratch on a GPU, see docs/sudoku.md
# ---------------------------------------------------------------------------------------------------------------
MEDIUM50 = Path(__file__).parent / "data" / "sudoku_medium50.txt"


@pytest.fixture(scope="module")
def shipped():
    import dgemma

    d = S.default_model_dir("diffusion")
    assert (d / "model.safetensors").is_file(), f"the shipped Sudoku model is missing from {d}"
    for f in d.iterdir():
        assert f.stat().st_size <= 16 * 2**20, f"{f} is over the 16 MB per-file limit"
    return dgemma.load(d, device="cpu")


def test_shipped_model_solves_held_out_medium_puzzles_on_cpu(shipped):
    # 50 fixed held-out medium puzzles (30-39 clues), never in the training set. The target is >= 95%;
    # the shipped model (18 GPU-minutes of training) solves 76% of them (38/50 at seed 0 on CPU). This floor
    # guards the model and the whole inference path against regressions; raise it when a better model ships.
    pairs = S.read_puzzle_file(MEDIUM50)
    assert len(pairs) == 50 and all(30 <= S.clue_count(p) <= 39 for p, _ in pairs)
    assert shipped.dtype == torch.float32  # stored in bf16, computed in fp32
    # the default (fast) sampler over three seeds pooled (150 runs: measured 70% / 70% / 78% at seeds 0 / 1 / 2;
    # the reference sampler: 76% / 76% / 82%)
    reps = [S.evaluate(shipped, pairs, batch_size=50, seed=s) for s in (0, 1, 2)]
    assert all(r["n"] == 50 for r in reps)
    mean = {k: sum(r[k] for r in reps) / 3 for k in ("solved_rate", "cell_accuracy", "mean_steps")}
    assert mean["solved_rate"] >= 0.70, mean
    assert mean["cell_accuracy"] >= 0.90, mean
    assert mean["mean_steps"] <= 20, mean


def test_shipped_ar_baseline_loads_and_decodes(shipped):
    import dgemma

    ar = dgemma.load(S.default_model_dir("ar"), device="cpu")
    assert ar.config.text.hidden_size == shipped.config.text.hidden_size  # same backbone and size
    assert ar.config.text.num_hidden_layers == shipped.config.text.num_hidden_layers
    pairs = S.read_puzzle_file(MEDIUM50)[:8]
    r = S.evaluate(ar, pairs, mode="ar", batch_size=8, return_rows=True)
    assert r["n"] == 8 and r["tokens_per_forward"] == 1.0
    # greedy left-to-right decoding writes 81 digits; the answers keep the clues far more often than chance
    assert all(len(row["answer"]) == 81 for row in r["rows"])
    assert r["cell_accuracy"] > 0.3, r


def test_recipe_scripts_prepare_export_sweep(tmp_path):
    """The Sudoku recipe end to end at toy size: prepare (data, augmentation, init), export, sweep."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sdk"
    r = subprocess.run([sys.executable, str(root / "recipes/sudoku/prepare.py"), "--out", str(out), "--n-train", "12",
                        "--n-test", "4", "--clues", "38-45", "--size", "small", "--augment", "2", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    aug = [json.loads(line) for line in (out / "train_aug.jsonl").read_text().splitlines()]
    assert len(train) == 12 and len(aug) == 36  # every puzzle plus 2 symmetries
    for rec in aug:
        assert S.solves(rec["completion"], rec["prompt"]) and S.count_solutions(rec["prompt"]) == 1
    assert len(S.read_puzzle_file(out / "test.txt")) == 4
    assert (out / "init" / "config.json").is_file()

    exp = tmp_path / "exported"
    r = subprocess.run([sys.executable, str(root / "recipes/sudoku/export.py"), str(out / "init"), str(exp),
                        "--set", "entropy_bound=0.3"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["dtype"] == "float32"  # computed in fp32 ...
    from dgemma.checkpoint import stored_dtype

    assert stored_dtype(exp) == torch.bfloat16  # ... stored in bf16
    assert json.loads((exp / "generation_config.json").read_text())["sampler_config"]["entropy_bound"] == 0.3

    r = subprocess.run([sys.executable, str(root / "recipes/sudoku/sweep.py"), "--model", str(exp), "--puzzles",
                        str(out / "test.txt"), "--setting", "default:", "--setting", "short:max_denoising_steps=2",
                        "--batch-size", "4", "--json-out", str(tmp_path / "sweep.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert set(res) == {"default", "short"} and res["short"]["mean_steps"] <= 2 and res["default"]["n"] == 4


def _token_rows(tok, pairs):
    digits = {d: tok.token_to_id(d) for d in "0123456789"}
    return torch.tensor([S.encode_prompt(tok, p) + [digits[c] for c in s] + [0] for p, s in pairs])  # + 1 pad


def _untokenise(tok, row):
    table = {tok.token_to_id(d): d for d in "0123456789"}
    cells = [table[int(i)] for i in row[1:163]]
    return "".join(cells[:81]), "".join(cells[81:])


def test_symmetry_augment_on_token_rows_keeps_puzzles_valid(tok, generated):
    """The trainer's on-device augmentation: every image is a valid puzzle with the same clue count whose unique
    solution is the image of the old one; BOS and anything after the 162 cells stay in place."""
    aug = S.SymmetryAugment(tok, S.SUDOKU_VOCAB_SIZE)
    ids = _token_rows(tok, generated)
    out = aug(ids, torch.Generator().manual_seed(0))
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert torch.equal(out[:, 0], ids[:, 0]) and torch.equal(out[:, 163:], ids[:, 163:])
    for (puzzle, solution), row in zip(generated, out):
        p, s = _untokenise(tok, row)
        assert p != puzzle and S.clue_count(p) == S.clue_count(puzzle)
        assert S.is_valid_solution(s) and S.solves(s, p) and S.count_solutions(p) == 1
        assert sorted(p.count(d) for d in "123456789") == sorted(puzzle.count(d) for d in "123456789")
    # fresh images per call and per row; seeded
    again = aug(ids, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    many = aug(ids[:1].expand(64, -1), torch.Generator().manual_seed(1))
    assert len({tuple(r.tolist()) for r in many}) == 64
    # both orientations occur: rows are permuted among rows (their clue counts keep their multiset) unless the
    # image is transposed (then the rows carry the old columns' counts)
    def counts(p):
        rows = sorted(sum(c != "0" for c in p[9 * r:9 * r + 9]) for r in range(9))
        cols = sorted(sum(p[9 * r + c] != "0" for r in range(9)) for c in range(9))
        return rows, cols

    i = next(i for i, (p, _) in enumerate(generated) if counts(p)[0] != counts(p)[1])
    many = aug(ids[i:i + 1].expand(64, -1), torch.Generator().manual_seed(2))
    orient = [counts(_untokenise(tok, r)[0]) for r in many]
    base = counts(generated[i][0])
    assert all(o in (base, base[::-1]) for o in orient)
    assert 10 < sum(o == base for o in orient) < 54


def test_symmetry_augment_check_names_a_bad_example(tok):
    from dgemma.train.data import Example

    aug = S.SymmetryAugment(tok, S.SUDOKU_VOCAB_SIZE)
    good = Example(S.encode_prompt(tok, "0" * 81), [tok.token_to_id("5")] * 81)
    aug.check([good])
    with pytest.raises(S.SudokuError, match="example 2: augment='sudoku' needs .* 82-token prompt and a 82-token"):
        aug.check([good, Example(good.prompt, good.response + [1])])  # an EOS after the answer
    with pytest.raises(S.SudokuError, match="example 1"):
        aug.check([Example(good.prompt, [tok.token_to_id("0")] * 81)])  # a blank in the answer


def test_training_with_sudoku_augmentation_logs_flops_and_mfu(tiny_dir, generated, tmp_path):
    from dgemma.train import TrainConfig, train

    data = tmp_path / "sdk.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": s}) + "\n" for p, s in generated))
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_dir), data=str(data), out=str(out), steps=4, batch_size=4, log_every=2,
                      save_every=100, append_eos=False, ar_weight=0.0, augment="sudoku", peak_tflops=0.5)
    train(cfg, show_progress=False)
    import csv

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert float(r["loss"]) > 0 and float(r["tflops"]) > 0
        assert abs(float(r["mfu"]) - float(r["tflops"]) / 0.5) <= 1e-3 * float(r["mfu"]) + 1e-4
    with pytest.raises(S.SudokuError, match="augment='sudoku' needs"):  # the EOS makes it no Sudoku example
        train(TrainConfig(**{**cfg.__dict__, "append_eos": True, "out": str(tmp_path / "bad")}), show_progress=False)
