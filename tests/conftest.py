"""Shared fixtures: tiny DiffusionGemma checkpoints written by transformers (the oracle), built on the fly.

Each variant perturbs every 1-D text parameter and the layer scalars (spec §5.2), or `w` vs `1+w`, scalar and
routing bugs hide behind init values of 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4, pooling_kernel_size=1)

# name -> (text_config overrides, canvas_length, generation config overrides)
VARIANTS: dict[str, tuple[dict, int, dict]] = {
    # the spec §5.2 recipe exactly (its model.safetensors has a known sha256)
    "spec": (dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
                  sliding_window=8, max_position_embeddings=512, use_bidirectional_attention="vision",
                  final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2), 8, {}),
    # derived 5:1 layout (layer 5 full, last forced full), 3 KV heads vs 6 query heads, 6 experts top-3,
    # no num_global_key_value_heads (full layers keep num_key_value_heads), a wider canvas, several EOS ids
    "wide": (dict(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=7,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=8, global_head_dim=16,
                  num_experts=6, top_k_experts=3, moe_intermediate_size=16, sliding_window=5,
                  max_position_embeddings=512, final_logit_softcapping=30.0,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                   "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                      "rope_theta": 50000.0}},
                  pad_token_id=0, eos_token_id=[1, 7], bos_token_id=2), 16, {"eos_token_id": [1, 7]}),
}


def build_hf_checkpoint(out: Path, variant: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a DiffusionGemma checkpoint with transformers' own save_pretrained."""
    from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                              DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    text, canvas, gen = VARIANTS[variant]
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(text_config=dict(text), vision_config=dict(TINY_VISION), canvas_length=canvas)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.startswith("model.encoder.vision_tower"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for dec_layer, enc_layer in zip(model.model.decoder.layers, model.model.encoder.language_model.layers):
            s = 0.5 + torch.rand(1, generator=g)
            dec_layer.layer_scalar.copy_(s)
            enc_layer.layer_scalar.copy_(s)
        model.model.decoder.embed_tokens.weight.normal_(0.0, 1.0, generator=g)
    gkw = dict(max_new_tokens=256, max_denoising_steps=48, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
               t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
               eos_token_id=text["eos_token_id"], pad_token_id=0, bos_token_id=2)
    gkw.update(gen)
    model.generation_config = DiffusionGemmaGenerationConfig(**gkw)
    model.to(dtype).save_pretrained(out)
    return out


def to_released_config_form(ckpt: Path) -> None:
    """Rewrite config.json into the released (transformers 5.8) form: global_head_dim /
    num_global_key_value_heads instead of per_layer_config."""
    cfg = json.loads((ckpt / "config.json").read_text())
    plc = cfg["text_config"].pop("per_layer_config")
    first = next(iter(plc.values()))
    cfg["text_config"]["global_head_dim"] = first["head_dim"]
    if "num_key_value_heads" in first:
        cfg["text_config"]["num_global_key_value_heads"] = first["num_key_value_heads"]
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """ckpt_factory(variant, dtype=torch.float32) -> Path, cached per session."""
    pytest.importorskip("transformers")
    made: dict[tuple, Path] = {}

    def make(variant: str = "spec", dtype: torch.dtype = torch.float32, released_form: bool = False) -> Path:
        key = (variant, dtype, released_form)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{variant}-{str(dtype).split('.')[-1]}")
            build_hf_checkpoint(out, variant, dtype)
            if released_form:
                to_released_config_form(out)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def load_reference():
    """load_reference(path, dtype=None, attn="eager") -> transformers model, cached per session.

    Note: the reference's `generate` crashes with eager attention when an attention_mask is passed (its decoder
    mask is built from a Long dummy tensor and the eager mask path calls finfo on it); use attn="sdpa" there."""
    pytest.importorskip("transformers")
    from transformers import DiffusionGemmaForBlockDiffusion

    cache: dict[tuple, object] = {}

    def load(path: Path, dtype: torch.dtype | None = None, attn: str = "eager"):
        key = (str(path), dtype, attn)
        if key not in cache:
            kw = {"attn_implementation": attn}
            if dtype is not None:
                kw["dtype"] = dtype
            cache[key] = DiffusionGemmaForBlockDiffusion.from_pretrained(path, **kw).eval()
        return cache[key]

    return load


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """The tiny preset cut to one sliding and one full layer (the compile tests' cost grows with the layers)."""
    import dataclasses

    from dgemma.presets import init_from_config, preset_config
    from dgemma.tokenizer import build_tokenizer

    cfg, gcfg = preset_config("tiny")
    plc = {i: v for i, v in cfg.text.per_layer_config.items() if i < 2}
    cfg.text = dataclasses.replace(cfg.text, num_hidden_layers=2, per_layer_config=plc,
                                   layer_types=["sliding_attention", "full_attention"])
    return init_from_config(cfg, gcfg, build_tokenizer(cfg.text.vocab_size), tmp_path_factory.mktemp("micro"))
