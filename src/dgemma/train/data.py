"""SFT data: JSONL of `{"prompt", "completion"}` or chat `{"messages": [...]}`, tokenised into (prompt, response)
pairs, and batches for the objective (one canvas chosen per example)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DGemmaError
from .objective import Batch


class DataError(DGemmaError):
    """A training file dgemma cannot use (names the file and line)."""


@dataclass
class Example:
    prompt: list[int]
    response: list[int]


def load_jsonl(path: str | Path, tokenizer: Any, *, max_len: int, append_eos: bool = True,
               eos_id: int | None = None) -> list[Example]:
    """Read and tokenise a JSONL file. Chat records use the checkpoint's template for every message but the last
    (which must be the assistant's); the response ends with `eos_id` (default: `<end_of_turn>` for chat when the
    tokenizer has it, else the tokenizer's EOS) unless append_eos is False. Examples longer than max_len are
    dropped (counted in the returned list's `dropped` attribute)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: training data file not found")
    out: list[Example | None] = []
    plain: list[tuple[int, str, str, str]] = []  # prompt/completion records, tokenised together below
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            where = f"{p}:{n}"
            if isinstance(rec, dict) and "messages" not in rec and rec.get("completion") == "" \
                    and not (append_eos and eos is not None):
                raise DataError(f"{where}: the completion is empty")  # reported in file order, before tokenising
            if isinstance(rec, dict) and "messages" not in rec and isinstance(rec.get("prompt"), str) \
                    and isinstance(rec.get("completion"), str) and hasattr(tokenizer, "encode_batch"):
                plain.append((len(out), rec["prompt"], rec["completion"], where))
                out.append(None)
            else:
                out.append(_tokenise(rec, tokenizer, append_eos, eos_id, where))
    for c in range(0, len(plain), 50_000):  # chunks: the backend's Encoding objects are much larger than the ids
        chunk = plain[c:c + 50_000]
        prompts = tokenizer.encode_batch([r[1] for r in chunk])
        resps = tokenizer.encode_batch([r[2] for r in chunk], add_special_tokens=False)
        for (i, _, _, where), prompt, resp in zip(chunk, prompts, resps):
            if append_eos and eos is not None:
                resp = resp + [eos]
            if not resp:
                raise DataError(f"{where}: the completion is empty")
            out[i] = Example(prompt, resp)
    kept = [ex for ex in out if ex is not None and len(ex.prompt) + len(ex.response) <= max_len]
    dropped = len(out) - len(kept)
    out = kept
    if not out:
        raise DataError(f"{p}: no usable examples (dropped {dropped} longer than max_len={max_len})")
    result = _ExampleList(out)
    result.dropped = dropped
    return result


class _ExampleList(list):
    dropped: int = 0


def _tokenise(rec: Any, tok: Any, append_eos: bool, eos_id: int | None, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt'/'completion' or 'messages'")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
            raise DataError(f"{where}: 'messages' must be a list ending with an assistant message with string content")
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True)
        resp = tok.encode(msgs[-1]["content"], add_special_tokens=False)
        if eos_id is None:
            eos_id = tok.token_to_id("<end_of_turn>") or tok.eos_token_id
    elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        prompt = tok.encode(rec["prompt"])
        resp = tok.encode(rec["completion"], add_special_tokens=False)
        if eos_id is None:
            eos_id = tok.eos_token_id
    else:
        raise DataError(f"{where}: expected string fields 'prompt' and 'completion', or 'messages'")
    if append_eos and eos_id is not None:
        resp = resp + [eos_id]
    if not resp:
        raise DataError(f"{where}: the completion is empty")
    return Example(list(prompt), list(resp))


class TensorData:
    """A tokenised dataset as one padded id tensor on the training device, and the per-example lengths on the host.

    `batch(idx)` takes rows by index on the device; only the lengths and the canvas choice are handled on the host
    (B small integers), so a step costs no Python per example, no host-to-device copy of the ids and no device-to-
    host sync. Ids are stored as int32 (half the memory of int64) and widened per batch."""

    def __init__(self, examples: list[Example], pad_id: int, device: torch.device | str = "cpu"):
        if not examples:
            raise DataError("no examples to train on")
        self.plen = torch.tensor([len(e.prompt) for e in examples])
        self.rlen = torch.tensor([len(e.response) for e in examples])
        empty = (self.rlen == 0).nonzero()
        if empty.numel():
            raise DataError(f"example {int(empty[0])} of the batch has an empty response; "
                            "every example needs at least one response token")
        lens = self.plen + self.rlen
        S = int(lens.max())
        ids = torch.tensor([e.prompt + e.response + [pad_id] * (S - len(e.prompt) - len(e.response))
                            for e in examples], dtype=torch.int32)
        self.ids = ids.to(device)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, idx: torch.Tensor | list[int], canvas_length: int, generator: torch.Generator | None = None,
              transform: Any = None) -> Batch:
        """Rows `idx` (host indices), right-padded to their longest, with one canvas chosen per example uniformly
        among those holding response tokens (one host draw per example from `generator`). `transform(ids)`, if
        given, rewrites the [B, S] id rows on the device before the canvas is cut (data augmentation); it must keep
        every token's role (prompt, response, padding) in place."""
        L = canvas_length
        idx = torch.as_tensor(idx, dtype=torch.long)
        plen, rlen = self.plen[idx], self.rlen[idx]
        B = idx.numel()
        lens = plen + rlen
        S = int(lens.max())
        n_canvases = (rlen + L - 1) // L
        k = torch.minimum((torch.rand(B, generator=generator) * n_canvases).long(), n_canvases - 1)
        start = plen + k * L
        span = (int(start.min()), int(start.max()) + L)
        tokens = int(lens.sum()) + int((lens - start).clamp(0, L).sum())  # valid + supervised, for tokens/s
        dev = self.ids.device
        ids = self.ids.index_select(0, idx.to(dev, non_blocking=True))[:, :S].long()
        if transform is not None:
            ids = transform(ids)
        lens_d, plen_d, start_d = torch.stack([lens, plen, start]).to(dev, non_blocking=True)
        j = torch.arange(S, device=dev)
        valid = j[None, :] < lens_d[:, None]
        response = valid & (j[None, :] >= plen_d[:, None])
        cpos = start_d[:, None] + torch.arange(L, device=dev)[None, :]  # [B, L] sequence positions of the canvas
        sup = cpos < lens_d[:, None]
        canvas = torch.where(sup, ids.gather(1, cpos.clamp_max(S - 1)), torch.full_like(cpos, self.pad_id))
        return Batch(ids, valid, start_d, sup, canvas, response, span=span, tokens=tokens)


def collate(examples: list[Example], canvas_length: int, pad_id: int,
            generator: torch.Generator | None = None) -> Batch:
    """Right-pad prompt+response and choose one canvas per example uniformly among those holding response tokens
    (`TensorData` over just these examples)."""
    return TensorData(examples, pad_id).batch(range(len(examples)), canvas_length, generator)
