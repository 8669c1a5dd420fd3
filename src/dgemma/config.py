"""Model and generation configuration (spec §1).

Reads both config.json forms: the one transformers 5.23 writes (`text_config.per_layer_config`) and the released
one (`global_head_dim` / `num_global_key_value_heads`). Writes the 5.23 form.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# Every denoising step's temperature must lie in [TEMPERATURE_MIN, TEMPERATURE_MAX]. Below 1e-6 sampling is
# already argmax for any logit gap above ~1e-4, and a temperature that rounds to 0 in fp32 (t_max = 1e-300) turns
# the logits into inf/NaN; above 1e6 every token is equally likely, and t_min, t_max beyond fp32's range give
# inf − inf = NaN in the schedule.
TEMPERATURE_MIN = 1e-6
TEMPERATURE_MAX = 1e6
MAX_STEPS = 1_000_000  # per canvas; the server allows fewer (dgemma.engine.engine.MAX_DENOISING_STEPS)

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class TextConfig:
    """The text backbone (spec §1.2). Field names follow the HF config so the JSON maps one to one."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int | None = None
    num_experts: int | None = None
    top_k_experts: int | None = None
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512  # full layers; 512 when absent (spec §1.3)
    num_global_key_value_heads: int | None = None  # full layers; None -> num_key_value_heads
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ROPE))
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: str | None = None
    attention_bias: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    max_position_embeddings: int = 131_072
    initializer_range: float = 0.02
    # Per-layer overrides resolved from either config form: layer index -> {"head_dim", "num_key_value_heads"}.
    per_layer_config: dict[int, dict[str, int]] = field(default_factory=dict)

    INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
                  "top_k_experts", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "global_head_dim", "sliding_window")

    def __post_init__(self) -> None:
        for name in self.INT_FIELDS:
            v = getattr(self, name)
            if name in ("num_experts", "top_k_experts", "moe_intermediate_size") and v is None:
                raise ConfigError(f"text_config.{name} is missing; DiffusionGemma always has a MoE block")
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"text_config.{name}={v!r} is invalid; expected a positive integer")
        if self.num_global_key_value_heads is not None and (
                not _is_int(self.num_global_key_value_heads) or self.num_global_key_value_heads <= 0):
            raise ConfigError(f"text_config.num_global_key_value_heads={self.num_global_key_value_heads!r} is "
                              "invalid; expected a positive integer or null")
        if not _is_num(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ConfigError(f"text_config.rms_norm_eps={self.rms_norm_eps!r} is invalid; expected a number > 0")
        if self.final_logit_softcapping is not None and not _is_num(self.final_logit_softcapping):
            raise ConfigError(f"text_config.final_logit_softcapping={self.final_logit_softcapping!r} is invalid; "
                              "expected a number or null")
        if not self.layer_types:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"text_config.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; expected one layer type per layer"
            )
        self.layer_types = list(self.layer_types)
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"text_config.layer_types contains {bad}; expected only '{SLIDING}' or '{FULL}'")
        self.layer_types[-1] = FULL  # the last layer is always full attention (spec §1.3)
        if not self.per_layer_config:
            override: dict[str, int] = {"head_dim": self.global_head_dim}
            if self.num_global_key_value_heads is not None:
                override["num_key_value_heads"] = self.num_global_key_value_heads
            self.per_layer_config = {i: dict(override) for i, t in enumerate(self.layer_types) if t == FULL}
        else:
            self.per_layer_config = self._parse_per_layer(self.per_layer_config)
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(
                f"text_config.top_k_experts={self.top_k_experts} must be between 1 and num_experts={self.num_experts}"
            )
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(
                f"text_config.hidden_activation={self.hidden_activation!r} is not supported; expected 'gelu_pytorch_tanh'"
            )
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ConfigError(
                f"text_config.use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported; "
                "dgemma implements the released causal-text encoder (None or 'vision')"
            )
        for t in set(self.layer_types):
            if t not in self.rope_parameters:
                raise ConfigError(f"text_config.rope_parameters has no entry for '{t}'")
            rtype = self.rope_parameters[t].get("rope_type", "default")
            if rtype not in ("default", "proportional"):
                raise ConfigError(
                    f"text_config.rope_parameters['{t}'].rope_type={rtype!r} is not supported; "
                    "expected 'default' or 'proportional'"
                )
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise ConfigError(
                    f"layer {i}: num_attention_heads={self.num_attention_heads} is not a multiple of its "
                    f"{self.layer_kv_heads(i)} key/value heads"
                )

    def _parse_per_layer(self, plc: Any) -> dict[int, dict[str, int]]:
        if not isinstance(plc, dict):
            raise ConfigError("text_config.per_layer_config must be an object of layer index -> overrides")
        out: dict[int, dict[str, int]] = {}
        for k, v in plc.items():
            if not str(k).isdigit() or not 0 <= int(k) < self.num_hidden_layers:
                raise ConfigError(f"text_config.per_layer_config has key {k!r}; expected a layer index in "
                                  f"[0, {self.num_hidden_layers})")
            if not isinstance(v, dict) or not all(_is_int(x) and x > 0 for x in v.values()):
                raise ConfigError(f"text_config.per_layer_config[{k!r}]={v!r}; expected an object of positive "
                                  "integers (head_dim, num_key_value_heads)")
            out[int(k)] = dict(v)
        return out

    # -- per-layer geometry (spec §1.3) --
    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == FULL

    def layer_head_dim(self, i: int) -> int:
        return int(self.per_layer_config.get(i, {}).get("head_dim", self.head_dim))

    def layer_kv_heads(self, i: int) -> int:
        return int(self.per_layer_config.get(i, {}).get("num_key_value_heads", self.num_key_value_heads))

    @property
    def eos_ids(self) -> list[int]:
        return _as_list(self.eos_token_id)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("rope_parameters") is None:
            kwargs.pop("rope_parameters", None)
        if kwargs.get("global_head_dim") is None:
            kwargs.pop("global_head_dim", None)
        if kwargs.get("layer_types") is None:
            kwargs.pop("layer_types", None)
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong value types surface here
            raise ConfigError(f"text_config is invalid: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The transformers 5.23 form: overrides in `per_layer_config`, no global_head_dim."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        d.pop("global_head_dim")
        d.pop("num_global_key_value_heads")
        d["per_layer_config"] = {str(k): v for k, v in sorted(self.per_layer_config.items())}
        d["model_type"] = "diffusion_gemma_text"
        d["tie_word_embeddings"] = True
        d["attention_dropout"] = 0.0
        return d

    # -- sizes, for `dgemma info` and the bench floor --
    def param_counts(self) -> dict[str, int]:
        """Parameter counts of the text model (tied embedding counted once)."""
        H, I, Ie, E, K = (self.hidden_size, self.intermediate_size, self.moe_intermediate_size,
                          self.num_experts, self.top_k_experts)
        embed = self.vocab_size * H
        attn = dense = experts = active_experts = norms = 0
        for i in range(self.num_hidden_layers):
            d, g, nh = self.layer_head_dim(i), self.layer_kv_heads(i), self.num_attention_heads
            attn += nh * d * H * 2 + g * d * H * (1 if self.is_full(i) else 2)
            dense += 3 * H * I
            experts += E * 3 * Ie * H
            active_experts += K * 3 * Ie * H
            norms += 7 * H + 2 * d + E * H + H + E + 2  # norms, q/k norm, router proj+scale, per-expert, scalars
        sc = 3 * H * I + H
        total = embed + attn + dense + experts + norms + sc + H
        active = total - experts + active_experts
        return {"total": total, "active": active, "embedding": embed, "experts": experts,
                "attention": attn, "dense_mlp": dense}


@dataclass
class ModelConfig:
    """Top-level `diffusion_gemma` config (spec §1.1)."""

    text: TextConfig
    canvas_length: int = 256
    tie_word_embeddings: bool = True
    image_token_id: int | None = 258_880
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882
    dtype: str | None = None
    vision_config: dict[str, Any] | None = None  # kept verbatim for saving; dgemma has no vision tower
    quantization_config: dict[str, Any] | None = None  # dgemma's FP8 / int4 weights (quant.py), verbatim

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt != "diffusion_gemma":
            raise ConfigError(
                f"{source}: model_type is {mt!r}; dgemma loads DiffusionGemma checkpoints (model_type 'diffusion_gemma')"
            )
        if "text_config" not in d or not isinstance(d["text_config"], dict):
            raise ConfigError(f"{source}: 'text_config' is missing or not an object")
        if d.get("tie_word_embeddings", True) is False or d["text_config"].get("tie_word_embeddings", True) is False:
            raise ConfigError(
                f"{source}: tie_word_embeddings=false is not supported; DiffusionGemma shares one weight set between "
                "encoder, decoder and lm_head"
            )
        text = TextConfig.from_dict(d["text_config"])
        L = d.get("canvas_length", 256)
        if not isinstance(L, int) or L <= 0:
            raise ConfigError(f"{source}: canvas_length must be a positive integer, found {L!r}")
        return cls(text=text, canvas_length=L,
                   image_token_id=d.get("image_token_id", 258_880), boi_token_id=d.get("boi_token_id", 255_999),
                   eoi_token_id=d.get("eoi_token_id", 258_882), dtype=d.get("dtype") or d.get("torch_dtype"),
                   vision_config=d.get("vision_config"), quantization_config=d.get("quantization_config"))

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(_read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "text_config": self.text.to_dict(),
            "tie_word_embeddings": True,
            "image_token_id": self.image_token_id,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "initializer_range": self.text.initializer_range,
        }
        if self.dtype:
            d["dtype"] = self.dtype
        if self.quantization_config:
            d["quantization_config"] = copy.deepcopy(self.quantization_config)
        # transformers always instantiates a vision tower; a missing config means the full-size default one.
        d["vision_config"] = copy.deepcopy(self.vision_config) if self.vision_config else dict(TINY_VISION_CONFIG)
        return d


TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64,
    "patch_size": 4, "pooling_kernel_size": 1,
}


@dataclass
class GenerationConfig:
    """Sampler settings (spec §4.1). `None` means "not set"; `resolve` fills from the reference defaults."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    DEFAULTS = {"max_new_tokens": 256, "max_denoising_steps": 48, "entropy_bound": 0.1, "t_min": 0.4,
                "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        d = dict(d)
        sc = d.pop("sampler_config", None)
        if isinstance(sc, dict) and "entropy_bound" in sc:
            d.setdefault("entropy_bound", sc["entropy_bound"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        return cls.from_dict(_read_json(path))

    def merged(self, **overrides: Any) -> "GenerationConfig":
        """Overrides (non-None) > self > reference defaults, validated."""
        out = copy.copy(self)
        for k, v in overrides.items():
            if v is not None:
                setattr(out, k, v)
        for k, v in self.DEFAULTS.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r} is invalid; expected {expected}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise bad("max_new_tokens", "a positive integer")
        if not _is_int(self.max_denoising_steps) or not 0 < self.max_denoising_steps <= MAX_STEPS:
            raise bad("max_denoising_steps", f"a positive integer up to {MAX_STEPS:,}")
        if not _is_num(self.entropy_bound) or not self.entropy_bound > 0:
            raise bad("entropy_bound", "a number > 0")
        if not _is_num(self.t_min) or self.t_min < 0:
            raise bad("t_min", "a number >= 0")
        if not _is_num(self.t_max) or not self.t_max > self.t_min:
            raise bad("t_max", f"a number > t_min ({self.t_min})")
        if self.t_max > TEMPERATURE_MAX:
            raise bad("t_max", f"a number <= {TEMPERATURE_MAX:g} (the first step's temperature)")
        last = self.t_min + (self.t_max - self.t_min) / self.max_denoising_steps  # spec §4.2 at n = 1
        if not last >= TEMPERATURE_MIN:
            raise ConfigError(
                f"t_max={self.t_max:.6g} is invalid with t_min={self.t_min:.6g} and max_denoising_steps="
                f"{self.max_denoising_steps}: the last step's temperature, t_min + (t_max - t_min) / "
                f"max_denoising_steps, would be {last:.3g}; expected at least {TEMPERATURE_MIN:g}")
        if not _is_int(self.stability_threshold) or self.stability_threshold < 0:
            raise bad("stability_threshold", "an integer >= 0")
        if not _is_num(self.confidence_threshold) or not self.confidence_threshold > 0:
            raise bad("confidence_threshold", "a number > 0")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise bad(name, "an integer token id or null")
        for e in _as_list(self.eos_token_id):
            if not _is_int(e):
                raise bad("eos_token_id", "an integer token id, a list of them, or null")

    @property
    def eos_ids(self) -> list[int]:
        return _as_list(self.eos_token_id)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in
                             ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                              "confidence_threshold", "eos_token_id", "pad_token_id", "bos_token_id")
                             if getattr(self, k) is not None}
        if self.entropy_bound is not None:
            d["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": float(self.entropy_bound)}
        d["return_dict_in_generate"] = True
        return d


def _as_list(v: int | list[int] | None) -> list[int]:
    if v is None:
        return []
    return [v] if isinstance(v, int) else list(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object at the top level")
    return d
