"""Model presets and `dgemma init`: randomly initialised checkpoints in the released format.

`26b-a4b` is the released DiffusionGemma-26B-A4B text configuration (spec §1.2); `tiny` and `small` keep its
structure (5:1 sliding/full, full layers with K=V and a wider head, MoE beside a dense MLP) at test size.
Tensors are generated one at a time from a per-key seed and streamed into shards, so a checkpoint larger than RAM
can be written.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import GenerationConfig, ModelConfig, TextConfig
from .errors import DGemmaError

if TYPE_CHECKING:  # torch is imported where used, so listing presets (`dgemma --help`) stays instant
    import torch

    from . import quant

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                  sliding_window=32, max_position_embeddings=4096),
        canvas_length=16, dtype="float32", embed_std=1.0),
    "small": dict(
        text=dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
                  num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=128,
                  sliding_window=128, max_position_embeddings=32768),
        canvas_length=64, dtype="float32", embed_std=1.0),
    "26b-a4b": dict(
        text=dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                  num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                  sliding_window=1024, max_position_embeddings=262144, use_bidirectional_attention="vision",
                  eos_token_id=[1, 106, 50]),
        canvas_length=256, dtype="bfloat16", embed_std=0.02),
}


def preset_config(name: str) -> tuple[ModelConfig, GenerationConfig]:
    if name not in PRESETS:
        raise DGemmaError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    text = dict(p["text"])
    text.setdefault("eos_token_id", [1, 106])  # <eos> and <end_of_turn>
    cfg = ModelConfig(text=TextConfig(**text), canvas_length=p["canvas_length"], dtype=p["dtype"])
    gcfg = GenerationConfig(max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                            stability_threshold=1, confidence_threshold=0.005, eos_token_id=text["eos_token_id"],
                            pad_token_id=0, bos_token_id=2)
    return cfg, gcfg


def random_tensor(name: str, shape: tuple[int, ...], seed: int, embed_std: float, std: float = 0.02) -> "torch.Tensor":
    """Deterministic per-key random init (fp32): N(0, std) for matrices, N(1, 0.1) for 1-D scales and scalars
    (not exactly 1, so the checkpoint exercises every scale), N(0, embed_std) for the embedding."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name == "embed_tokens.weight":
        return torch.randn(shape, generator=g) * embed_std
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * std


def init_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, dtype: str | None = None,
                    max_shard_bytes: int = 2 * 1024**3, progress: Callable[[int, int], None] | None = None,
                    quantize: "quant.Scheme | None" = None) -> Path:
    """Write a random checkpoint (config, generation config, weights, tokenizer) for `preset` into `out_dir`."""
    from .tokenizer import build_tokenizer

    cfg, gcfg = preset_config(preset)
    return init_from_config(cfg, gcfg, build_tokenizer(cfg.text.vocab_size), out_dir, seed=seed, dtype=dtype,
                            embed_std=PRESETS[preset]["embed_std"], max_shard_bytes=max_shard_bytes,
                            progress=progress, quantize=quantize)


def init_from_config(cfg: ModelConfig, gcfg: GenerationConfig, tokenizer: Any, out_dir: str | Path, *,
                     seed: int = 0, dtype: str | None = None, embed_std: float = 0.02,
                     max_shard_bytes: int = 2 * 1024**3, progress: Callable[[int, int], None] | None = None,
                     quantize: "quant.Scheme | None" = None) -> Path:
    """Write a randomly initialised checkpoint for any config and tokenizer (e.g. a model trained from scratch);
    with `quantize`, its matrices go straight to FP8 / int4 (a float copy never exists)."""
    import torch

    from . import checkpoint
    from . import quant as qmod
    from .api import resolve_dtype

    tdtype = resolve_dtype(dtype, cfg.dtype)
    cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[tdtype]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DGemmaError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint.expected_shapes(cfg.text)
    qmod.write_weights(out, shapes, lambda n: random_tensor(n, shapes[n], seed, embed_std), lambda n: tdtype,
                       quantize, max_shard_bytes, progress)
    cfg.quantization_config = quantize.to_config() if quantize is not None else None
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(gcfg.to_hf_dict(), indent=2) + "\n")
    tokenizer.save(out)
    return out
