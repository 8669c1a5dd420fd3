"""The Python API: `dgemma.load(path)` → `DiffusionGemma` with `.generate()`, `.tokenizer`, `.save()`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint, quant
from .config import GenerationConfig, ModelConfig
from .errors import CheckpointError, DGemmaError, UnsupportedInputError
from .generate import CanvasInfo, GenerateOutput, StepInfo, generate_ar, generate_fast, generate_reference
from .model import Backbone

UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, default: str | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or default or "float32"
    if name not in DTYPES:
        raise DGemmaError(f"unknown dtype {name!r}; expected one of float32, bfloat16, float16")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DGemmaError(f"unknown device {device!r}; expected e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DGemmaError("device 'cuda' requested but torch sees no CUDA device")
    return dev


class DiffusionGemma:
    """A loaded model: config, generation defaults, backbone and (when the checkpoint has one) tokenizer."""

    def __init__(self, config: ModelConfig, backbone: Backbone, generation_config: GenerationConfig | None = None,
                 tokenizer: Any = None, path: Path | None = None):
        self.config = config
        self.backbone = backbone
        if backbone.device.type == "cpu":
            from .cpu import tune_malloc

            tune_malloc()  # reuse freed step buffers instead of page-faulting fresh ones (dgemma/cpu.py)
        self.generation_config = generation_config or GenerationConfig()
        self._tokenizer = tokenizer
        self.path = path

    # ------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            where = f" in {self.path}" if self.path else ""
            raise CheckpointError(f"this model has no tokenizer (no tokenizer.json{where}); pass token ids instead")
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def resolve_generation_config(self, **overrides: Any) -> GenerationConfig:
        """kwargs > the checkpoint's generation_config.json > the reference defaults (spec §4.1)."""
        return self.generation_config.merged(**overrides)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "fast",
        max_denoising_steps: int | None = None,
        entropy_bound: float | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        stability_threshold: int | None = None,
        confidence_threshold: float | None = None,
        eos_token_id: Any = UNSET,
        pad_token_id: Any = UNSET,
        trim: bool = False,
        stop: str | Sequence[str] | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        on_canvas: Callable[[CanvasInfo], None] | None = None,
        compile: bool | None = None,
    ) -> GenerateOutput:
        """Generate with the block-diffusion sampler (spec §4).

        sampler: "fast" (default) draws from the reference's distributions with a counter-based generator, each
        row on its own (its tokens do not depend on the rest of the batch); "reference" is the transformers
        algorithm and draw order: with default settings (no `trim`, no `stop`) on the CPU,
        `generate(ids, seed=s, sampler="reference")` returns exactly the tokens of
        `torch.manual_seed(s); reference.generate(ids)` (eager attention): whole canvases, padded after EOS.
        seed: an int (every row), one int per row (fast), or None for a random one; `generator` (reference) a
        torch.Generator instead. compile: fast sampler only; None = the device default (`step.compile_default`).

        Sampler settings left as None come from the checkpoint's generation_config.json, then the reference
        defaults. `eos_token_id` / `pad_token_id`: omitted = the checkpoint's; an explicit None disables them.
        Opt-in extras: `trim=True` cuts each row to exactly `max_new_tokens` new tokens; `stop` ends a row at the
        first occurrence of any stop string (tokens from there on become pad) and needs the tokenizer."""
        ids = self._as_batch(input_ids)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.shape != ids.shape:
                raise DGemmaError(
                    f"attention_mask has shape {list(attention_mask.shape)}, expected {list(ids.shape)} (2-D, like input_ids)")
        gcfg = self.resolve_generation_config(
            max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound,
            t_min=t_min, t_max=t_max, stability_threshold=stability_threshold,
            confidence_threshold=confidence_threshold)
        # As in the reference, an explicit eos/pad of None disables EOS stopping / padding; omitted = checkpoint's.
        if eos_token_id is not UNSET:
            gcfg.eos_token_id = eos_token_id
        if pad_token_id is not UNSET:
            gcfg.pad_token_id = pad_token_id
        gcfg.validate()
        if sampler not in ("fast", "reference"):
            raise DGemmaError(f"unknown sampler {sampler!r}; expected 'fast' or 'reference'")
        B = ids.shape[0]
        seeds = _row_seeds(seed, B, generator)
        if sampler == "reference" and generator is None:
            if len(set(seeds)) > 1:
                raise DGemmaError("the reference sampler takes one seed for the batch (one torch.Generator)")
            generator = torch.Generator(device=self.device).manual_seed(seeds[0])
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        P0 = ids.shape[1]
        stopped: dict[int, int] = {}  # row -> number of new tokens kept
        canvas_cb = on_canvas
        if stops:
            tok = self.tokenizer
            if gcfg.pad_token_id is None:
                raise DGemmaError("stop strings need a pad_token_id (tokens after the stop become pad)")
            produced: list[list[int]] = [[] for _ in range(ids.shape[0])]

            def canvas_cb(info: CanvasInfo) -> bool:
                for b in range(ids.shape[0]):
                    if b in stopped:
                        continue
                    produced[b].extend(info.tokens[b].tolist())
                    keep = _stop_cut(tok, produced[b], stops, gcfg.pad_token_id)
                    if keep is not None:
                        stopped[b] = keep
                if on_canvas is not None:
                    on_canvas(info)
                return len(stopped) == ids.shape[0]

        if sampler == "reference":
            out = generate_reference(self.backbone, ids, gcfg, self.config.canvas_length, attention_mask, generator,
                                     on_step=on_step, on_canvas=canvas_cb)
        else:
            out = generate_fast(self.backbone, ids, gcfg, self.config.canvas_length, attention_mask, seeds,
                                on_step=on_step, on_canvas=canvas_cb, compile=compile)
        if stopped:
            for b, keep in stopped.items():
                out.sequences[b, P0 + keep:] = gcfg.pad_token_id
                out.finish_reasons[b] = "stop"
        if trim:
            out.sequences = out.sequences[:, : P0 + gcfg.max_new_tokens]
            new = out.sequences[:, P0:]
            eos_t = torch.tensor(gcfg.eos_ids, device=new.device)
            for b in range(ids.shape[0]):
                if out.finish_reasons[b] == "eos" and not bool(torch.isin(new[b], eos_t).any()):
                    out.finish_reasons[b] = "length"  # the EOS lay beyond max_new_tokens
        return out

    @torch.no_grad()
    def generate_ar(self, input_ids: Any, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int | None = None, eos_token_id: Any = UNSET,
                    pad_token_id: Any = UNSET, compile: bool | None = None) -> GenerateOutput:
        """Greedy autoregressive decoding on the same weights (encoder + tied head, KV cache): the baseline the
        diffusion sampler is compared with. One token per forward; stops at EOS. `compile`: as for `generate`
        (the token pass is compiled, a CUDA graph on CUDA)."""
        ids = self._as_batch(input_ids)
        g = self.resolve_generation_config(max_new_tokens=max_new_tokens)
        eos = g.eos_ids if eos_token_id is UNSET else GenerationConfig(eos_token_id=eos_token_id).eos_ids
        pad = g.pad_token_id if pad_token_id is UNSET else pad_token_id
        return generate_ar(self.backbone, ids, g.max_new_tokens, attention_mask, eos, pad, compile)

    def _as_batch(self, input_ids: Any) -> torch.Tensor:
        try:
            ids = torch.as_tensor(input_ids)
        except (ValueError, TypeError, RuntimeError):
            raise DGemmaError("input_ids must be a rectangular batch of integer token ids; pad rows to one "
                              "length (left padding) and pass an attention_mask") from None
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype in (torch.float16, torch.float32, torch.float64,
                                                                 torch.bfloat16, torch.bool):
            raise DGemmaError(f"input_ids must be a non-empty 2-D integer tensor [batch, tokens], got shape "
                              f"{list(ids.shape)} {ids.dtype}")
        ids = ids.long()
        V = self.config.text.vocab_size
        if bool((ids < 0).any()) or bool((ids >= V).any()):
            raise DGemmaError(f"input_ids contain ids outside the vocabulary [0, {V})")
        if self.config.image_token_id is not None and bool((ids == self.config.image_token_id).any()):
            raise UnsupportedInputError("input contains image tokens; dgemma is text-only (vision is not supported)")
        return ids

    # ------------------------------------------------------------------------------------------------------
    def generate_text(self, prompt: str | list[dict], *, chat: bool = False, **kwargs: Any) -> str:
        """Convenience: text (or chat messages) in, decoded completion out (special tokens removed)."""
        tok = self.tokenizer
        if chat or isinstance(prompt, list):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        else:
            ids = tok.encode(prompt)
        out = self.generate(torch.tensor([ids]), **kwargs)
        return tok.decode(out.sequences[0, len(ids):].tolist(), skip_special_tokens=True)

    def save(self, out_dir: str | Path, dtype: str | torch.dtype | None = None,
             max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write an HF-format DiffusionGemma directory that transformers and dgemma load."""
        save_model(self, Path(out_dir), dtype=dtype, max_shard_bytes=max_shard_bytes)


def _row_seeds(seed: Any, rows: int, generator: torch.Generator | None) -> list[int]:
    """One int seed per row from an int, a sequence of ints, a generator (its initial seed) or None (random)."""
    if seed is None:
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 2**62, (1,)))
    if isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() == 1):
        seeds = [int(s) for s in seed]
        if len(seeds) != rows:
            raise DGemmaError(f"seed has {len(seeds)} entries for {rows} rows; expected one int or one per row")
        return seeds
    try:
        return [int(seed)] * rows
    except (TypeError, ValueError):
        raise DGemmaError(f"seed={seed!r} is invalid; expected an int, one int per row, or None") from None


def _stop_cut(tok: Any, tokens: list[int], stops: list[str], pad: int) -> int | None:
    """If the decoded text contains a stop string, the number of tokens to keep: the longest prefix whose text
    ends at or before the first stop string (a token straddling the stop's start is dropped); else None."""
    tokens = [t for t in tokens if t != pad]
    text = tok.decode(tokens, skip_special_tokens=False)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return None
    cut = min(hits)
    lo, hi = 0, len(tokens)  # binary search: decoded length grows with the prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.decode(tokens[:mid], skip_special_tokens=False)) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------------------
def load(path: str | Path, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None,
         group_size: int | None = None) -> DiffusionGemma:
    """Load an HF-format DiffusionGemma checkpoint directory.

    dtype: None = the checkpoint's dtype; device: None = CUDA if available else CPU. Weights are memory-mapped and
    converted tensor by tensor; vision weights are skipped (dgemma is text-only). A checkpoint written by
    `dgemma quantize` loads quantized as it is; `quantize="fp8" | "int4"` (with an int4 `group_size`) quantizes a
    float checkpoint while loading, one tensor at a time (see dgemma.quant)."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    if not d.is_dir():
        raise CheckpointError(f"{d} is a file; expected an HF-format checkpoint directory (config.json, "
                              "model.safetensors, tokenizer.json)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: missing config.json (expected an HF-format DiffusionGemma checkpoint directory)")
    config = ModelConfig.from_file(cfg_path)
    gen_path = d / "generation_config.json"
    gcfg = GenerationConfig.from_file(gen_path) if gen_path.is_file() else GenerationConfig(
        eos_token_id=config.text.eos_token_id, pad_token_id=config.text.pad_token_id)
    if dtype is None and config.dtype not in DTYPES:
        dtype = checkpoint.stored_dtype(d)
    tdtype = resolve_dtype(dtype, config.dtype if config.dtype in DTYPES else None)
    dev = resolve_device(device)
    stored = quant.Scheme.from_config(config.quantization_config, str(cfg_path)) \
        if config.quantization_config else None
    if quantize is not None and stored is not None:
        raise quant.QuantError(f"{d} is already quantized ({stored.format}); load it without quantize=, or "
                               "quantize the original float checkpoint")
    with torch.device("meta"):
        backbone = Backbone(config.text)
    parts = None
    if stored is not None:
        quant.prepare(backbone, stored)
        parts = quant.parts(backbone)
    tensors = checkpoint.read_state_dict(d, config.text, tdtype, dev, quantized=parts)
    if quantize is not None:
        scheme = quant.Scheme(quantize, group_size)
        groups = quant.prepare(backbone, scheme)
        tensors = quant.quantize_stream(tensors, scheme.format, groups)
        config.quantization_config = scheme.to_config()
    backbone.load_state_dict(dict(tensors), strict=True, assign=True)
    backbone.eval().requires_grad_(False)
    tokenizer = None
    if (d / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(d)
    return DiffusionGemma(config, backbone, gcfg, tokenizer, path=d)


def save_model(model: DiffusionGemma, out_dir: Path, dtype: str | torch.dtype | None = None,
               max_shard_bytes: int = 5 * 1024**3, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` as an HF-format directory. `state` (dgemma names -> tensors) overrides the backbone's own
    parameters, e.g. LoRA-merged weights from training."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tdtype = resolve_dtype(dtype, None) if dtype is not None else model.dtype
    if state is None:
        state = dict(list(model.backbone.named_parameters()) + list(model.backbone.named_buffers()))
    keep = quant.parts(model.backbone)  # quantized parts keep their dtype
    tensors = {checkpoint.quantized_key(n): (t, t.dtype if n in keep else tdtype) for n, t in state.items()}
    sizes = {k: t.numel() * dt.itemsize for k, (t, dt) in tensors.items()}
    checkpoint.write_weights(out_dir, sizes, lambda k: tensors[k][0].detach().to(tensors[k][1]), max_shard_bytes)
    cfg = model.config.to_dict()
    cfg["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[tdtype]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(model.generation_config.to_hf_dict(), indent=2) + "\n")
    if model._tokenizer is not None:
        model._tokenizer.save(out_dir)
