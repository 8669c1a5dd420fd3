"""Live terminal view of block diffusion: watch each canvas converge (`dgemma generate --watch`).

`CanvasWatcher` plugs into `DiffusionGemma.generate(on_step=..., on_canvas=...)`::

    with CanvasWatcher(model.tokenizer, Console(stderr=True), prompt=prompt) as w:
        model.generate(ids, on_step=w.on_step, on_canvas=w.on_canvas)

On a terminal it draws a `rich.live.Live` view: a header (canvas index, step k/N, temperature, mean entropy,
accepted count), the prompt and the text committed so far, and the current canvas with every position rendered as
its decoded argmax token — bold green where the entropy-bound sampler accepted the position this step, dim where it
is still a draft. The step callbacks only record a reference to the latest step; a background thread renders at
most `refresh_per_second` times a second, so drawing never slows a fast model down.

When the console is not a terminal (output piped to a file, tests) nothing is animated: one plain frame is printed
per committed canvas (its last step), which makes a readable log.

Only one batch row (`row`, default 0) is shown. Subclasses can change how a canvas looks (e.g. a Sudoku board) by
overriding `render_canvas`, and the header by overriding `render_header`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from .generate import CanvasInfo, StepInfo

ACCEPTED_STYLE = "bold green"
DRAFT_STYLE = "dim"
SPECIAL_STYLE = "magenta"
PROMPT_STYLE = "cyan"
HEADER_STYLE = "bold"


# C0 controls (except newline) as their Unicode "control pictures" (␀ ␎ …), DEL as ␡, C1 controls as �, so
# random tokens cannot move the cursor or ring the bell; tabs become a space.
_PRINTABLE = {i: 0x2400 + i for i in range(32) if i != ord("\n")} | {ord("\t"): ord(" "), 0x7F: 0x2421} | {
    i: 0xFFFD for i in range(0x80, 0xA0)}


def printable(text: str) -> str:
    """`text` with control characters made visible (newlines kept)."""
    return text.translate(_PRINTABLE)


class _Decoder(Protocol):
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str: ...


@dataclass
class StepView:
    """One denoising step of the watched row, as plain Python values (what the renderer draws)."""

    canvas_index: int  # 0-based
    step: int  # 1-based step within the canvas
    max_steps: int  # N
    temperature: float
    mean_entropy: float
    tokens: list[int]  # the argmax draft
    accepted: list[bool]  # accepted this step
    done: bool  # the row stopped on this canvas (stable and confident)
    active: bool  # the row advanced this step (False once it has finished)

    @property
    def accepted_count(self) -> int:
        return sum(self.accepted)

    @classmethod
    def from_info(cls, info: StepInfo, row: int = 0) -> "StepView":
        return cls(
            canvas_index=info.canvas_index,
            step=info.step,
            max_steps=info.step + info.steps_remaining - 1,
            temperature=float(info.temperature),
            mean_entropy=float(info.entropy[row].float().mean()),
            tokens=info.draft[row].tolist(),
            accepted=info.accepted[row].tolist(),
            done=bool(info.done[row]),
            active=bool(info.active[row]),
        )


class CanvasWatcher:
    """Renders the watched row's canvas as generation runs. Use as a context manager around `generate`."""

    def __init__(self, tokenizer: _Decoder, console: Console | None = None, *, prompt: str | None = None,
                 row: int = 0, refresh_per_second: float = 8.0, transient: bool = True,
                 pad_token_id: int | None = None, max_context_lines: int | None = None):
        """tokenizer: anything with `decode(ids, skip_special_tokens=...)`. console: where to draw (default: a
        stderr console, so stdout stays clean for the completion). prompt: shown (in cyan) above the committed
        text. transient: erase the live view when it stops (the caller then prints the result).
        pad_token_id: dropped from the committed text. max_context_lines: how many (wrapped) lines of the
        prompt + committed text to show, the last ones; default: what fits above the canvas."""
        self.tokenizer = tokenizer
        self.console = console if console is not None else Console(stderr=True)
        self.prompt = prompt or ""
        self.row = row
        self.refresh_per_second = refresh_per_second
        self.transient = transient
        self.pad_token_id = pad_token_id
        self.max_context_lines = max_context_lines
        self.committed_ids: list[int] = []
        self.canvases_done = 0
        self._latest: StepInfo | None = None  # set by on_step; converted lazily by the renderer
        self._view: StepView | None = None
        self._view_of: StepInfo | None = None
        self._committed_text = ""
        self._pieces: dict[int, tuple[str, bool]] = {}
        self._live: Live | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def animated(self) -> bool:
        """True when the console is an interactive terminal that can redraw in place."""
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def start(self) -> None:
        if self.animated and self._live is None:
            self._live = Live(console=self.console, get_renderable=self.render, auto_refresh=True,
                              refresh_per_second=self.refresh_per_second, transient=self.transient,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start(refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def __enter__(self) -> "CanvasWatcher":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- generate() callbacks ----------------------------------------------------------------------------
    def on_step(self, info: StepInfo) -> None:
        """Record the step. Cheap: the tensors are only read when a frame is drawn."""
        self._latest = info

    def on_canvas(self, info: CanvasInfo) -> None:
        """Append the committed canvas to the text; off-terminal, print the canvas's final frame."""
        tokens = info.tokens[self.row].tolist()
        if self.pad_token_id is not None:
            tokens = [t for t in tokens if t != self.pad_token_id]
        self.committed_ids.extend(tokens)
        self._committed_text = self.tokenizer.decode(self.committed_ids, skip_special_tokens=True)
        self.canvases_done = info.index + 1
        if not self.animated:
            view = self.current_view()
            if view is not None and view.canvas_index == info.index:
                self.console.print(Group(self.render_header(view), self.render_canvas(view)))
        elif self._live is not None:
            self._live.refresh()

    # -- rendering ---------------------------------------------------------------------------------------
    def current_view(self) -> StepView | None:
        """The latest step as a StepView (converted once per step, however often it is drawn)."""
        latest = self._latest
        if latest is not None and latest is not self._view_of:
            self._view, self._view_of = StepView.from_info(latest, self.row), latest
        return self._view

    def render(self) -> RenderableType:
        """The whole frame: header, the tail of prompt + committed text that fits, the current canvas."""
        view = self.current_view()
        if view is None:
            return Text("waiting for the first denoising step…", style=DRAFT_STYLE)
        header, canvas = self.render_header(view), self.render_canvas(view)
        width, height = self.console.size
        budget = self.max_context_lines
        if budget is None:  # fill the terminal: everything above the canvas
            options = self.console.options.update(width=width)
            used = len(self.console.render_lines(header, options, pad=False)) + len(
                self.console.render_lines(canvas, options, pad=False))
            budget = height - used - 1
        context = self.render_context(budget, width)
        return Group(header, context, canvas) if context.plain else Group(header, canvas)

    def render_header(self, view: StepView) -> Text:
        """`canvas 2 · step 5/48 · T 0.62 · mean H 1.234 · accepted 12/256`, plus the row's state."""
        items = [f"canvas {view.canvas_index + 1}", f"step {view.step}/{view.max_steps}",
                 f"T {view.temperature:.3f}", f"mean H {view.mean_entropy:.3f}",
                 f"accepted {view.accepted_count}/{len(view.tokens)}"]
        if not view.active:
            items.append("finished")
        elif view.done:
            items.append("stable")
        return Text(" · ".join(items), style=HEADER_STYLE)

    def render_context(self, max_lines: int, width: int) -> Text:
        """The prompt (cyan) and the committed text: their last `max_lines` lines when wrapped to `width`."""
        if max_lines <= 0:
            return Text()
        text = Text()
        # A wrapped line holds at most `width` characters, so this tail is enough (and keeps wrapping cheap).
        tail = max_lines * width
        committed = self._committed_text[-tail:]
        prompt = self.prompt[max(0, len(self.prompt) - (tail - len(committed))):] if len(committed) < tail else ""
        text.append(printable(prompt), style=PROMPT_STYLE)
        text.append(printable(committed))
        lines = text.wrap(self.console, width)
        truncated = len(committed) < len(self._committed_text) or len(prompt) < len(self.prompt)
        if len(lines) <= max_lines and not truncated:
            return text
        kept = lines[-max_lines:]
        kept[0] = Text("…", style=DRAFT_STYLE) + kept[0][1:]
        return Text("\n").join(kept)

    def render_canvas(self, view: StepView) -> Text:
        """Each canvas position as its token: accepted this step in bold green, drafts dim, special tokens
        magenta. Newlines are shown as ↵ so the canvas keeps its shape while it converges."""
        text = Text()
        for tok, acc in zip(view.tokens, view.accepted):
            piece, special = self.piece(tok)
            style = ACCEPTED_STYLE if acc else DRAFT_STYLE
            text.append(piece, style=f"{style} {SPECIAL_STYLE}" if special else style)
        return text

    def piece(self, token_id: int) -> tuple[str, bool]:
        """(display string, is special) for one token id, cached."""
        hit = self._pieces.get(token_id)
        if hit is None:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False)
            special = bool(raw) and not self.tokenizer.decode([token_id], skip_special_tokens=True)
            shown = printable(raw.replace("\r", "").replace("\n", "↵"))
            hit = self._pieces[token_id] = (shown or "∅", special)
        return hit
