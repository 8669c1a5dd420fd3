"""Sudoku as a DiffusionGemma task: solver, puzzle generator, tokenizer, encoding, evaluation.

Grids are 81-character strings, row-major, digits 1–9 and `0` for a blank (`.` is accepted on input and normalised
to `0`).

- Solver (pure Python): candidates as 9-bit masks per row/column/box; depth-first search that always branches on the
  most constrained cell and takes hidden singles first. The hardest known 17-clue puzzles take a few milliseconds.
- Generator: a random complete grid (randomised search from the empty grid), then clues are removed in random order
  while the solution stays unique, down to a clue count drawn uniformly from the requested range. When a removal pass
  gets stuck above the target (the puzzle is already minimal), it hill-climbs: put two removed clues back and try to
  remove again (up to 30 times) before starting over from a new grid. Puzzle i is made from
  `random.Random(seed * 1_000_003 + i)` alone, so the output depends on the seed and not on the number of workers.
  Practical range: 22–81 clues (22 itself takes about 0.2 s per puzzle and core); 21 takes about 1 s, 20 about 20 s,
  and fewer than 20 is impractical. No unique puzzle has fewer than 17 clues, so lower targets are rejected.
- Model encoding: prompt = BOS + the 81 puzzle digits (blanks as `0`); the answer is one canvas of exactly 81 tokens,
  the solution digits (`SUDOKU_CANVAS`).
- Puzzle files: one puzzle per line, 81 characters (`0` or `.` for blanks), optionally `,` and the 81-digit
  solution; blank lines and lines starting with `#` are ignored.

torch, rich and tokenizers are imported only by the functions that need them; `SudokuWatcher` and
`add_sudoku_parser` live in `dgemma.tasks.sudoku_cli` and are re-exported here lazily.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..errors import DGemmaError

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

__all__ = [
    "SUDOKU_CANVAS", "SUDOKU_VOCAB_SIZE", "SUDOKU_TOKENS", "BUCKETS",
    "SudokuError", "PuzzleFormatError",
    "parse_grid", "solve", "count_solutions", "is_valid_solution", "solves", "clue_count", "check_answer",
    "generate_puzzles", "augment", "SymmetryAugment", "checked_pair", "write_puzzle_file", "read_puzzle_file",
    "build_sudoku_tokenizer", "encode_prompt", "decode_answer",
    "score", "bucket_of", "evaluate", "format_board", "default_model_dir",
    "SudokuWatcher", "add_sudoku_parser",
]

SUDOKU_CANVAS = 81
SUDOKU_VOCAB_SIZE = 32
MIN_CLUES = 17  # no 9×9 Sudoku with fewer clues has a unique solution (McGuire et al., 2012)

# Buckets by clue count (name, lowest clue count, highest clue count).
BUCKETS: tuple[tuple[str, int, int], ...] = (("easy", 40, 81), ("medium", 30, 39), ("hard", 0, 29))


class SudokuError(DGemmaError):
    """A Sudoku task error the CLI reports as `error: ...`."""


class PuzzleFormatError(SudokuError, ValueError):
    """A grid string or puzzle-file line that is not a Sudoku grid (also a ValueError)."""


# ===========================================================================================================
# grids
# ===========================================================================================================
_ALLOWED = frozenset("0123456789.")


def parse_grid(s: str) -> str:
    """`s` as a normalised 81-character grid: digits 1–9 and `0` for blanks (`.` becomes `0`).

    Surrounding whitespace is ignored. Raises PuzzleFormatError (a ValueError) for a wrong length or character."""
    if not isinstance(s, str):
        raise PuzzleFormatError(f"a Sudoku grid must be a string of 81 characters, got {type(s).__name__}")
    g = s.strip()
    for pos, ch in enumerate(g):
        if ch not in _ALLOWED:
            raise PuzzleFormatError(
                f"invalid character {ch!r} at position {pos + 1} (row {pos // 9 + 1}, column {pos % 9 + 1}) of the "
                "grid; expected digits 1-9 and 0 or . for blanks" if pos < 81 else
                f"invalid character {ch!r} at position {pos + 1}; a grid has 81 cells (digits 1-9, 0 or . for blanks)")
    if len(g) != 81:
        raise PuzzleFormatError(f"a Sudoku grid has 81 cells (9 rows of 9, row by row, 0 or . for blanks); got "
                                f"{len(g)} character{'s' if len(g) != 1 else ''}")
    return g.replace(".", "0")


def clue_count(puzzle: str) -> int:
    """Number of given digits in `puzzle`."""
    g = parse_grid(puzzle)
    return 81 - g.count("0")


def is_valid_solution(grid: Any) -> bool:
    """True when `grid` is a complete grid (81 digits 1–9) whose rows, columns and boxes each hold 1–9 once."""
    if not isinstance(grid, str) or len(grid) != 81 or not set(grid) <= _DIGITS19:
        return False
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, ch in enumerate(grid):
        bit = 1 << (ord(ch) - 49)
        r, c, b = _R[i], _C[i], _B[i]
        if (rows[r] | cols[c] | boxes[b]) & bit:
            return False
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    return True


def solves(grid: Any, puzzle: str) -> bool:
    """True when `grid` is a valid complete grid that keeps every clue of `puzzle`."""
    p = parse_grid(puzzle)
    return is_valid_solution(grid) and all(q == "0" or q == g for q, g in zip(p, grid))


def check_answer(answer: str, puzzle: str) -> dict[str, Any]:
    """What is right and wrong with `answer` (81 chars, `0` = empty) as a solution of `puzzle`:
    {"valid", "keeps_clues", "solved", "clues", "changed_clues", "empty_cells", "conflicts"} where conflicts is the
    number of rows, columns and boxes holding some digit more than once."""
    p, a = parse_grid(puzzle), parse_grid(answer)
    changed = sum(1 for q, g in zip(p, a) if q != "0" and q != g)
    empty = a.count("0")
    conflicts = 0
    for unit in _UNITS:
        digits = [a[i] for i in unit if a[i] != "0"]
        if len(digits) != len(set(digits)):
            conflicts += 1
    valid = empty == 0 and conflicts == 0
    return {"valid": valid, "keeps_clues": changed == 0, "solved": valid and changed == 0,
            "clues": 81 - p.count("0"), "changed_clues": changed, "empty_cells": empty, "conflicts": conflicts}


def format_board(grid: str, blank: str = ".") -> str:
    """A grid as 9 text lines with box separators (`5 3 . | . 7 . | . . .`, `------+-------+------`)."""
    g = parse_grid(grid)
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        cells = [g[r * 9 + c] if g[r * 9 + c] != "0" else blank for c in range(9)]
        lines.append(" | ".join(" ".join(cells[k:k + 3]) for k in (0, 3, 6)))
    return "\n".join(lines)


# ===========================================================================================================
# solver: bitmask candidates, most-constrained cell first, hidden singles
# ===========================================================================================================
_DIGITS19 = frozenset("123456789")
_R = tuple(i // 9 for i in range(81))
_C = tuple(i % 9 for i in range(81))
_B = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
_POP = tuple(bin(m).count("1") for m in range(512))
_BITS = tuple(tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512))  # single-digit bits of a mask
_DIGIT = {1 << d: str(d + 1) for d in range(9)}
_UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
          + [[i for i in range(81) if _B[i] == b] for b in range(9)])


class _State:
    """A partly filled grid: `grid[i]` is a digit bit (0 = empty), row/column/box masks of placed digits and the
    list of empty cells."""

    __slots__ = ("grid", "rows", "cols", "boxes", "empties")

    def __init__(self) -> None:
        self.grid = [0] * 81
        self.rows, self.cols, self.boxes = [0] * 9, [0] * 9, [0] * 9
        self.empties: list[int] = []

    @classmethod
    def of(cls, puzzle: str) -> "_State | None":
        """The state of a normalised puzzle, or None when two clues clash."""
        st = cls()
        grid, rows, cols, boxes = st.grid, st.rows, st.cols, st.boxes
        for i, ch in enumerate(puzzle):
            if ch == "0":
                st.empties.append(i)
                continue
            bit = 1 << (ord(ch) - 49)
            r, c, b = _R[i], _C[i], _B[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = bit
        return st

    def search(self, limit: int, out: list, rng: random.Random | None = None, hidden: bool = True) -> int:
        """Number of completions found (stops at `limit`); the first is appended to `out` as a bit list."""
        if not self.empties:
            if not out:
                out.append(list(self.grid))
            return 1
        fn = _search_hidden if hidden else _search_mrv
        return fn(self.grid, self.rows, self.cols, self.boxes, self.empties, limit, out, rng)


def _search_mrv(grid: list, rows: list, cols: list, boxes: list, empties: list, limit: int, out: list,
                rng: random.Random | None) -> int:
    """Backtracking on the cell with the fewest candidates. Cheapest per node: best for the many small searches
    of the generator. `empties` is non-empty; all lists are restored on return."""
    R, C, B, POP = _R, _C, _B, _POP
    best_k, best_n, best_m = -1, 10, 0
    for k, i in enumerate(empties):
        m = 511 & ~(rows[R[i]] | cols[C[i]] | boxes[B[i]])
        n = POP[m]
        if n < best_n:
            best_k, best_n, best_m = k, n, m
            if n <= 1:
                break
    if best_n == 0:
        return 0
    return _branch(grid, rows, cols, boxes, empties, limit, out, rng, best_k, best_m, _search_mrv)


def _search_hidden(grid: list, rows: list, cols: list, boxes: list, empties: list, limit: int, out: list,
                   rng: random.Random | None) -> int:
    """As `_search_mrv`, but when no cell is forced it also looks for hidden singles (a digit with one place left
    in a row, column or box) and dead units (a missing digit with no place): far fewer nodes on hard puzzles."""
    R, C, B, POP = _R, _C, _B, _POP
    best_k, best_n, best_m = -1, 10, 0
    once_r, twice_r, once_c, twice_c, once_b, twice_b = [0] * 9, [0] * 9, [0] * 9, [0] * 9, [0] * 9, [0] * 9
    masks = []
    for k, i in enumerate(empties):
        r, c, b = R[i], C[i], B[i]
        m = 511 & ~(rows[r] | cols[c] | boxes[b])
        n = POP[m]
        if n < best_n:
            best_k, best_n, best_m = k, n, m
            if n <= 1:
                break
        masks.append(m)
        twice_r[r] |= once_r[r] & m
        once_r[r] |= m
        twice_c[c] |= once_c[c] & m
        once_c[c] |= m
        twice_b[b] |= once_b[b] & m
        once_b[b] |= m
    else:  # no forced cell: hidden singles
        for placed, once, twice, unit_of in ((rows, once_r, twice_r, R), (cols, once_c, twice_c, C),
                                             (boxes, once_b, twice_b, B)):
            for u in range(9):
                need = 511 & ~placed[u]
                if need & ~once[u]:
                    return 0  # a digit this unit still needs fits nowhere
                h = need & ~twice[u]
                if h:
                    bit = h & -h
                    for k, i in enumerate(empties):
                        if unit_of[i] == u and masks[k] & bit:
                            return _branch(grid, rows, cols, boxes, empties, limit, out, rng, k, bit,
                                           _search_hidden)
    if best_n == 0:
        return 0
    return _branch(grid, rows, cols, boxes, empties, limit, out, rng, best_k, best_m, _search_hidden)


def _branch(grid: list, rows: list, cols: list, boxes: list, empties: list, limit: int, out: list,
            rng: random.Random | None, k: int, mask: int, recurse: Callable[..., int]) -> int:
    """Try each digit of `mask` in cell empties[k] (in random order when rng is given)."""
    empties[k], empties[-1] = empties[-1], empties[k]
    i = empties.pop()
    r, c, b = _R[i], _C[i], _B[i]
    bits: Sequence[int] = _BITS[mask]
    if rng is not None and len(bits) > 1:
        bits = list(bits)
        rng.shuffle(bits)
    found = 0
    for bit in bits:
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        grid[i] = bit
        if empties:
            found += recurse(grid, rows, cols, boxes, empties, limit - found, out, rng)
        else:
            found += 1
            if not out:
                out.append(list(grid))
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        if found >= limit:
            break
    grid[i] = 0
    empties.append(i)
    empties[k], empties[-1] = empties[-1], empties[k]
    return found


def _grid_str(bits: Sequence[int]) -> str:
    return "".join(_DIGIT.get(b, "0") for b in bits)


def solve(puzzle: str) -> str | None:
    """A solution of `puzzle` (the first found), or None when it has none."""
    st = _State.of(parse_grid(puzzle))
    if st is None:
        return None
    out: list = []
    return _grid_str(out[0]) if st.search(1, out) else None


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions of `puzzle`, counting stops at `limit` (so 2 means "2 or more")."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    st = _State.of(parse_grid(puzzle))
    return 0 if st is None else st.search(limit, [])


# ===========================================================================================================
# generator
# ===========================================================================================================
_CLIMB_ROUNDS = 30  # hill-climbing rounds on one grid before starting over
_CLIMB_ADD = 2  # clues put back per round
_MAX_ALTS = 256  # remembered alternative solutions per grid


def _random_full_grid(rng: random.Random) -> list[int]:
    st = _State()
    st.empties = list(range(81))
    out: list = []
    st.search(1, out, rng, hidden=False)
    return out[0]


class _Reducer:
    """Removes clues from a full grid while the solution stays unique.

    Removing clue i is safe iff no grid other than the solution fits the remaining clues; that is searched for with
    cell i set to each other candidate. Each alternative grid found is remembered as the set of cells where it
    differs from the solution: while exactly one of those cells is still a clue, removing that clue is unsafe
    without searching again (this skips most searches when hill-climbing)."""

    def __init__(self, solution: list[int]):
        self.sol = solution
        self.st = _State()
        self.st.grid = list(solution)
        self.st.rows, self.st.cols, self.st.boxes = [511] * 9, [511] * 9, [511] * 9
        self.clue_mask = (1 << 81) - 1
        self.clues = 81
        self.alts: list[int] = []

    def put_back(self, i: int) -> None:
        st = self.st
        st.empties.remove(i)
        bit = self.sol[i]
        st.grid[i] = bit
        st.rows[_R[i]] |= bit
        st.cols[_C[i]] |= bit
        st.boxes[_B[i]] |= bit
        self.clue_mask |= 1 << i
        self.clues += 1

    def try_remove(self, i: int) -> bool:
        me, cm = 1 << i, self.clue_mask
        for d in self.alts:
            if d & cm == me:
                return False
        st = self.st
        grid, rows, cols, boxes = st.grid, st.rows, st.cols, st.boxes
        bit = grid[i]
        r, c, b = _R[i], _C[i], _B[i]
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        grid[i] = 0
        cand = 511 & ~(rows[r] | cols[c] | boxes[b])
        unique = True
        if _POP[cand] > 1:
            for alt in _BITS[cand ^ bit]:
                rows[r] |= alt
                cols[c] |= alt
                boxes[b] |= alt
                grid[i] = alt
                out: list = []
                found = st.search(1, out, hidden=False)
                rows[r] ^= alt
                cols[c] ^= alt
                boxes[b] ^= alt
                grid[i] = 0
                if found:
                    diff = 0
                    for j, (x, y) in enumerate(zip(out[0], self.sol)):
                        if x != y:
                            diff |= 1 << j
                    if len(self.alts) < _MAX_ALTS:
                        self.alts.append(diff)
                    unique = False
                    break
        if unique:
            st.empties.append(i)
            self.clue_mask ^= me
            self.clues -= 1
            return True
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        grid[i] = bit
        return False

    def reduce(self, order: Iterable[int], target: int) -> bool:
        for i in order:
            if self.clues <= target:
                break
            if self.st.grid[i]:
                self.try_remove(i)
        return self.clues == target


def _make_puzzle(target: int, rng: random.Random) -> tuple[str, str]:
    """One (puzzle, solution) with exactly `target` clues and a unique solution."""
    while True:
        sol = _random_full_grid(rng)
        red = _Reducer(sol)
        order = list(range(81))
        rng.shuffle(order)
        done = red.reduce(order, target)
        for _ in range(_CLIMB_ROUNDS):
            if done:
                break
            back = rng.sample(red.st.empties, _CLIMB_ADD)
            for i in back:
                red.put_back(i)
            order = [i for i in range(81) if red.st.grid[i] and i not in back]
            rng.shuffle(order)
            done = red.reduce(order + back, target)
        if done:
            return _grid_str(red.st.grid), _grid_str(sol)


def _puzzle_task(task: tuple[int, int, int, int]) -> tuple[str, str]:
    """Puzzle `i` of `seed`: its own RNG draws the clue count, then the puzzle (picklable for worker processes)."""
    seed, i, lo, hi = task
    rng = random.Random(seed * 1_000_003 + i)
    return _make_puzzle(rng.randint(lo, hi), rng)


def _check_clues(clues: Any) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in clues)
    except (TypeError, ValueError):
        raise ValueError(f"clues must be a (low, high) pair of integers, got {clues!r}") from None
    if not MIN_CLUES <= lo <= hi <= 81:
        raise ValueError(f"clue range {lo}-{hi} is invalid; expected {MIN_CLUES} <= low <= high <= 81 (no Sudoku "
                         f"with fewer than {MIN_CLUES} clues has a unique solution; below 22 generation gets slow)")
    return lo, hi


def generate_puzzles(n: int, clues: tuple[int, int] = (22, 45), seed: int = 0, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs, each with a unique solution and a clue count drawn uniformly from `clues`
    (inclusive).

    Deterministic for a given `seed` whatever `workers` is (puzzle i uses `random.Random(seed * 1_000_003 + i)`).
    workers: processes to use (None = all cores, 1 = this process). progress(done, n) is called as puzzles
    arrive. Practical clue range: >= 22 (see the module docstring for the cost of lower targets)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    lo, hi = _check_clues(clues)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    tasks = [(int(seed), i, lo, hi) for i in range(n)]
    workers = min(workers, n)
    out: list[tuple[str, str]] = []
    if workers <= 1:
        for t in tasks:
            out.append(_puzzle_task(t))
            if progress:
                progress(len(out), n)
        return out
    import multiprocessing as mp

    # fork where it is safe: the workers run pure Python (never torch), and unlike spawn/forkserver it does not
    # re-import the caller's __main__ (a script without an `if __name__ == "__main__":` guard still works).
    # macOS and Windows use spawn, which needs that guard.
    method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux") else "spawn"
    chunk = max(1, min(32, n // (workers * 64)))  # small chunks: puzzle times vary a lot at low clue counts
    with mp.get_context(method).Pool(workers) as pool:
        for pair in pool.imap(_puzzle_task, tasks, chunksize=chunk):
            out.append(pair)
            if progress:
                progress(len(out), n)
    return out


def checked_pair(puzzle: str, solution: str) -> tuple[str, str]:
    """(puzzle, solution) normalised by parse_grid; PuzzleFormatError unless the solution solves the puzzle."""
    p, s = parse_grid(puzzle), parse_grid(solution)
    if not solves(s, p):
        raise PuzzleFormatError(f"solution {s} does not solve puzzle {p}")
    return p, s


def augment(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    """A random symmetry of a (puzzle, solution) pair: digits relabelled, bands and stacks shuffled, rows within
    each band and columns within each stack shuffled, optionally transposed. The result is again a puzzle with the
    same clue count and exactly one solution (the image of the old one), so one generated puzzle yields many
    training examples at no solver cost (3 359 232 · 9! distinct images in general)."""
    p, s = checked_pair(puzzle, solution)
    digits = list("123456789")
    rng.shuffle(digits)
    relabel = {"0": "0", **{str(i + 1): d for i, d in enumerate(digits)}}

    def lines() -> list[int]:  # a permutation of 0..8 that keeps bands (stacks) together
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols, transpose = lines(), lines(), rng.random() < 0.5

    def image(g: str) -> str:
        cells = [relabel[g[9 * r + c]] for r in rows for c in cols]
        if transpose:
            cells = [cells[9 * c + r] for r in range(9) for c in range(9)]
        return "".join(cells)

    return image(p), image(s)


class SymmetryAugment:
    """`augment` for tokenised batches on the training device: a fresh random symmetry per row and per call, so a
    training set of N puzzles gives a new image of every puzzle each epoch with no extra data on disk.

    Rows are laid out as the trainer's Sudoku examples are: BOS, the 81 puzzle cells, the 81 solution cells
    (`encode_prompt` + the solution's digits), anything after left alone. The same cell permutation (bands, stacks,
    rows within bands, columns within stacks, an optional transposition) and the same relabelling of the digits
    1–9 are applied to a row's puzzle and its solution; blanks stay blanks. `check(examples)` says, before training,
    whether every example has that layout."""

    CELLS = 2 * SUDOKU_CANVAS  # puzzle + solution, after BOS

    def __init__(self, tokenizer: Any, vocab_size: int):
        import torch

        digits = [tokenizer.token_to_id(str(d)) for d in range(10)]
        if any(i is None for i in digits):
            raise SudokuError("Sudoku augmentation needs a tokenizer with single-character digit tokens 0-9 "
                              "(build_sudoku_tokenizer())")
        self.bos = tokenizer.bos_token_id
        self.digit_ids = torch.tensor(digits)  # digit d -> token id
        self.digit_of = torch.full((vocab_size,), -1, dtype=torch.long)  # token id -> digit (-1: not a digit)
        self.digit_of[self.digit_ids] = torch.arange(10)

    def check(self, examples: Sequence[Any]) -> None:
        """Raise SudokuError naming the first example that is not BOS + 81 puzzle digits -> 81 solution digits 1-9."""
        digit = set(self.digit_ids.tolist())
        nonzero = set(self.digit_ids[1:].tolist())
        for n, e in enumerate(examples):
            ok = (len(e.prompt) == SUDOKU_CANVAS + 1 and len(e.response) == SUDOKU_CANVAS and e.prompt[0] == self.bos
                  and all(i in digit for i in e.prompt[1:]) and all(i in nonzero for i in e.response))
            if not ok:
                raise SudokuError(
                    f"example {n + 1}: augment='sudoku' needs every example to be a puzzle of 81 digits (0 for a "
                    f"blank) answered by its 81 solution digits, without an EOS (append_eos = false); this one has "
                    f"a {len(e.prompt)}-token prompt and a {len(e.response)}-token response")

    def __call__(self, ids: "torch.Tensor", generator: "torch.Generator | None" = None) -> "torch.Tensor":
        import torch

        B, dev = ids.shape[0], ids.device
        if ids.shape[1] < 1 + self.CELLS:
            raise SudokuError(f"Sudoku rows need at least {1 + self.CELLS} tokens; got {ids.shape[1]}")

        def lines() -> torch.Tensor:  # [B, 9]: a permutation of 0..8 per row that keeps bands (stacks) together
            bands = torch.rand(B, 3, generator=generator, device=dev).argsort(1)
            within = torch.rand(B, 3, 3, generator=generator, device=dev).argsort(2)
            return (3 * bands[:, :, None] + within).reshape(B, 9)

        rows, cols = lines(), lines()
        src = rows[:, :, None] * 9 + cols[:, None, :]  # new cell (r, c) takes old cell (rows[r], cols[c])
        flip = torch.rand(B, generator=generator, device=dev) < 0.5
        src = torch.where(flip[:, None, None], src.transpose(1, 2), src).reshape(B, 1, SUDOKU_CANVAS)
        relabel = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev),  # blanks stay blanks
                             torch.rand(B, 9, generator=generator, device=dev).argsort(1) + 1], 1)
        cells = ids[:, 1:1 + self.CELLS].reshape(B, 2, SUDOKU_CANVAS)
        cells = cells.gather(2, src.expand(B, 2, SUDOKU_CANVAS))
        d = self.digit_of.to(dev)[cells].reshape(B, self.CELLS)
        new = self.digit_ids.to(dev)[relabel.gather(1, d)]
        return torch.cat([ids[:, :1], new.to(ids.dtype), ids[:, 1 + self.CELLS:]], 1)


# ===========================================================================================================
# puzzle files
# ===========================================================================================================
def write_puzzle_file(path: str | Path, pairs: Iterable[tuple[str, str | None] | str],
                      header: str | None = None) -> int:
    """Write one `puzzle[,solution]` line per pair (blanks as 0); `header` lines are written as `# ` comments.
    Returns the number of puzzles written."""
    lines = [f"# {h}".rstrip() for h in header.splitlines()] if header else []
    count = 0
    for item in pairs:
        count += 1
        puzzle, solution = (item, None) if isinstance(item, str) else item
        if solution is None:
            lines.append(parse_grid(puzzle))
        else:
            p, s = checked_pair(puzzle, solution)
            lines.append(f"{p},{s}")
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return count


def read_puzzle_file(path: str | Path) -> list[tuple[str, str | None]]:
    """(puzzle, solution or None) per puzzle line of `path`. Lines: 81 characters (`0`/`.` blanks), optionally `,`
    and the 81-digit solution; blank lines and `#` lines are skipped. A bad line raises PuzzleFormatError (a
    ValueError) naming the file and line number."""
    p = Path(path)
    if not p.is_file():
        raise SudokuError(f"{p}: puzzle file not found" if not p.exists() else f"{p}: not a file")
    out: list[tuple[str, str | None]] = []
    with p.open(encoding="utf-8", errors="strict") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                out.append(_parse_line(line, f"{p}:{lineno}"))
        except UnicodeDecodeError as e:
            raise PuzzleFormatError(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return out


def _parse_line(line: str, where: str) -> tuple[str, str | None]:
    parts = line.split(",")
    if len(parts) > 2:
        raise PuzzleFormatError(f"{where}: expected `puzzle` or `puzzle,solution`, found {len(parts)} "
                                "comma-separated fields")
    try:
        puzzle = parse_grid(parts[0])
    except PuzzleFormatError as e:
        raise PuzzleFormatError(f"{where}: puzzle: {e}") from None
    if len(parts) == 1 or not parts[1].strip():
        return puzzle, None
    try:
        solution = parse_grid(parts[1])
    except PuzzleFormatError as e:
        raise PuzzleFormatError(f"{where}: solution: {e}") from None
    if "0" in solution:
        raise PuzzleFormatError(f"{where}: the solution has blanks; expected 81 digits 1-9")
    if not is_valid_solution(solution):
        raise PuzzleFormatError(f"{where}: the solution breaks the Sudoku rules (a digit repeats in a row, "
                                "column or box)")
    if not solves(solution, puzzle):
        raise PuzzleFormatError(f"{where}: the solution does not keep the puzzle's clues")
    return puzzle, solution


# ===========================================================================================================
# tokenizer and encoding
# ===========================================================================================================
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
# ids 0-3 special, 4-13 the digits 0-9, then the characters of boards and puzzle files, then filler.
SUDOKU_CHARS = tuple("0123456789") + ("\n", "|", " ", ".", "-", "+", ",")
SUDOKU_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + SUDOKU_CHARS + tuple(
    f"<unused{i}>" for i in range(len(SPECIAL_TOKENS) + len(SUDOKU_CHARS), SUDOKU_VOCAB_SIZE))
DIGIT_ID0 = len(SPECIAL_TOKENS)  # id of "0"; digit d has id DIGIT_ID0 + d


def build_sudoku_tokenizer() -> "Tokenizer":
    """The character-level Sudoku tokenizer (`SUDOKU_VOCAB_SIZE` = 32 ids, every one decodable):
    0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4–13 the digits 0–9, 14 `\\n`, 15 `|`, 16 space, 17 `.`, 18 `-`, 19 `+`,
    20 `,`, 21–31 <unused21>…<unused31> (special, never produced by encoding). Any other character encodes as <unk>.
    `decode(encode(s, add_special_tokens=False)) == s` for text made of those characters; encode() prepends BOS."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

    vocab = {tok: i for i, tok in enumerate(SUDOKU_TOKENS)}
    backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character is a token
    backend.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    specials = list(SPECIAL_TOKENS) + [t for t in SUDOKU_TOKENS if t.startswith("<unused")]
    backend.add_special_tokens(specials)  # already in the vocab: they keep their ids
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                     add_bos_token=True, chat_template=None, model_max_length=1024,
                     extra_config={"dgemma_task": "sudoku"})


def _digit_table(tok: Any) -> dict[int, str]:
    """token id -> digit character for the tokenizer's digit tokens `0`–`9`."""
    table = {}
    for d in "0123456789":
        i = tok.token_to_id(d)
        if i is not None:
            table[i] = d
    return table


def encode_prompt(tok: Any, puzzle: str) -> list[int]:
    """BOS + the 81 puzzle digits (blanks as `0`): 82 ids."""
    p = parse_grid(puzzle)
    bos = tok.bos_token_id
    if bos is None:
        raise SudokuError("the tokenizer has no BOS token; a Sudoku prompt is BOS + 81 digits")
    ids = [tok.token_to_id(ch) for ch in p]
    if any(i is None for i in ids):
        raise SudokuError("the tokenizer has no single-character digit tokens 0-9; build it with "
                          "build_sudoku_tokenizer()")
    return [bos, *ids]


def decode_answer(tok: Any, ids: Iterable[int]) -> str:
    """The first 81 generated ids as an 81-character grid; a non-digit token (or a missing one) becomes `0`."""
    table = _digit_table(tok)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    cells = [table.get(int(i), "0") for i in list(ids)[:SUDOKU_CANVAS]]
    return "".join(cells).ljust(SUDOKU_CANVAS, "0")


# ===========================================================================================================
# evaluation
# ===========================================================================================================
def score(puzzle: str, solution: str | None, answer: str) -> tuple[bool, int, int]:
    """(solved, correct_cells, blanks) of `answer` for `puzzle`.

    solved: `answer` is a complete valid grid keeping every clue, and equals `solution` when one is given.
    correct_cells: blank cells of the puzzle filled with the right digit (vs `solution`, or vs `solve(puzzle)`
    when no solution is given; 0 when the puzzle has no solution)."""
    p, a = parse_grid(puzzle), parse_grid(answer)
    s = parse_grid(solution) if solution is not None else None
    blanks = [i for i, ch in enumerate(p) if ch == "0"]
    ref = s if s is not None else solve(p)
    correct = sum(1 for i in blanks if a[i] == ref[i]) if ref is not None else 0
    solved = solves(a, p) and (s is None or a == s)
    return solved, correct, len(blanks)


def bucket_of(clues: int) -> str:
    """"easy" (>= 40 clues), "medium" (30–39) or "hard" (< 30)."""
    for name, lo, hi in BUCKETS:
        if lo <= clues <= hi:
            return name
    raise ValueError(f"clue count {clues} is out of range 0-81")


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"solved_rate": None, "cell_accuracy": None, "mean_steps": None, "median_steps": None,
                "tokens_per_forward": None, "n": 0}
    blanks = sum(r["blanks"] for r in rows)
    steps = [r["steps"] for r in rows]
    return {
        "solved_rate": sum(r["solved"] for r in rows) / len(rows),
        "cell_accuracy": sum(r["correct"] for r in rows) / blanks if blanks else 1.0,
        "mean_steps": statistics.fmean(steps),
        "median_steps": float(statistics.median(steps)),
        "tokens_per_forward": statistics.fmean(r["tokens_per_forward"] for r in rows),
        "n": len(rows),
    }


def evaluate(model: Any, pairs: Sequence[tuple[str, str | None] | str], *, mode: str = "diffusion",
             batch_size: int = 32, seed: int = 0, max_denoising_steps: int | None = None,
             progress: Callable[[int, int], None] | None = None, return_rows: bool = False,
             sampler: str = "fast") -> dict[str, Any]:
    """Solve `pairs` (puzzle, solution or None) with `model` and score the answers.

    mode "diffusion": `model.generate(prompts, seed=..., max_new_tokens=81, max_denoising_steps=...,
    eos_token_id=None, sampler=sampler)` on batches of `batch_size` (every prompt is 82 tokens, so no padding);
    seeds: puzzle i gets seed + i with the fast sampler (its answer does not depend on the batching), batch j
    gets seed + j with the reference sampler (one generator per batch); the answer is the 81
    tokens after the prompt (EOS handling is off: a stray <eos> is just a wrong cell). Steps per puzzle: the
    denoising steps its row used (summed over canvases, one canvas when canvas_length >= 81).
    mode "ar": `model.generate_ar(prompts, max_new_tokens=81)`; 81 steps per puzzle, 1 token per forward.

    Returns {"solved_rate", "cell_accuracy", "mean_steps", "median_steps", "tokens_per_forward", "n",
    "buckets": {"easy": {...}, "medium": {...}, "hard": {...}}} (an empty bucket has n 0 and null metrics);
    cell_accuracy is correct blank cells / all blank cells. return_rows adds "rows": per-puzzle records.
    progress(done, total) is called after each batch."""
    import torch

    if mode not in ("diffusion", "ar"):
        raise SudokuError(f"unknown evaluation mode {mode!r}; expected 'diffusion' or 'ar'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SudokuError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mode == "ar" and not callable(getattr(model, "generate_ar", None)):
        raise SudokuError("this model has no generate_ar() (autoregressive decoding); use mode 'diffusion'")
    items: list[tuple[str, str | None]] = []
    for item in pairs:
        puzzle, solution = (item, None) if isinstance(item, str) else item
        items.append((parse_grid(puzzle), parse_grid(solution) if solution is not None else None))
    tok = model.tokenizer
    rows: list[dict[str, Any]] = []
    total = len(items)
    for bi, start in enumerate(range(0, total, batch_size)):
        batch = items[start:start + batch_size]
        ids = torch.tensor([encode_prompt(tok, p) for p, _ in batch], dtype=torch.long)
        P = ids.shape[1]
        if mode == "diffusion":
            seeds = seed + bi if sampler == "reference" else [seed + start + r for r in range(len(batch))]
            out = model.generate(ids, seed=seeds, max_new_tokens=SUDOKU_CANVAS,
                                 max_denoising_steps=max_denoising_steps, eos_token_id=None, sampler=sampler)
            steps = [int(sum(out.steps_per_canvas[r])) for r in range(len(batch))]
            tpf = [float(x) for x in torch.as_tensor(out.tokens_per_forward).reshape(-1).tolist()]
        else:
            out = model.generate_ar(ids, max_new_tokens=SUDOKU_CANVAS)
            steps = [SUDOKU_CANVAS] * len(batch)
            tpf = [1.0] * len(batch)
        seqs = torch.as_tensor(out.sequences)
        for r, (puzzle, solution) in enumerate(batch):
            answer = decode_answer(tok, seqs[r, P:P + SUDOKU_CANVAS].tolist())
            solved, correct, blanks = score(puzzle, solution, answer)
            rows.append({"puzzle": puzzle, "solution": solution, "answer": answer, "solved": solved,
                         "correct": correct, "blanks": blanks, "clues": 81 - blanks, "steps": steps[r],
                         "tokens_per_forward": tpf[r]})
        if progress:
            progress(len(rows), total)
    report = _summary(rows)
    report["buckets"] = {name: _summary([r for r in rows if bucket_of(r["clues"]) == name])
                         for name, _, _ in BUCKETS}
    if return_rows:
        report["rows"] = rows
    return report


# ===========================================================================================================
# shipped models
# ===========================================================================================================
def default_model_dir(mode: str = "diffusion") -> Path:
    """Where the shipped Sudoku model of `mode` ("diffusion" or "ar") lives: dgemma/assets/sudoku/<mode>."""
    import dgemma

    return Path(dgemma.__file__).parent / "assets" / "sudoku" / mode


# ===========================================================================================================
# lazy re-exports (they need rich / torch)
# ===========================================================================================================
def __getattr__(name: str) -> Any:
    if name in ("SudokuWatcher", "add_sudoku_parser"):
        from . import sudoku_cli

        return getattr(sudoku_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
