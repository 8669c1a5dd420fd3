"""LoRA on attention (q/k/v/o) and the dense MLP (gate/up/down) — not the experts, not the router (spec §6.1).

A ~50-line module of our own rather than peft: peft imports transformers (dgemma's runtime never does) and
targets HF model classes; our layers are plain `nn.Linear`, so wrapping them directly is simpler and clearer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (x Aᵀ) Bᵀ · alpha/r, with B initialised to 0 (the wrapped model starts unchanged)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # what code reading `.weight` directly sees: the merged matrix
        return self.merged_weight()

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


def apply_lora(backbone: nn.Module, rank: int, alpha: float) -> list[str]:
    """Freeze the backbone and wrap the target linears of every layer; returns the wrapped module names."""
    backbone.requires_grad_(False)
    wrapped = []
    for li, layer in enumerate(backbone.layers):
        for path in TARGETS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, attr, None)
            if isinstance(lin, nn.Linear):
                setattr(parent, attr, LoRALinear(lin, rank, alpha))
                wrapped.append(f"layers.{li}.{path}")
    return wrapped


def merge_lora(backbone: nn.Module) -> None:
    """Fold every LoRA delta into its base weight and unwrap (for export)."""
    for layer in backbone.layers:
        for path in TARGETS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            mod = getattr(parent, attr, None)
            if isinstance(mod, LoRALinear):
                with torch.no_grad():
                    mod.base.weight.copy_(mod.merged_weight())
                setattr(parent, attr, mod.base)


def export_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under their checkpoint names, LoRA deltas merged (the model itself is unchanged)."""
    out: dict[str, torch.Tensor] = {}
    lora = {n: m for n, m in backbone.named_modules() if isinstance(m, LoRALinear)}
    for n, m in lora.items():
        out[n + ".weight"] = m.merged_weight().detach()
    for n, t in list(backbone.named_parameters()) + list(backbone.named_buffers()):
        owner = n.rsplit(".", 2)[0] if ".base." in n or ".lora_" in n else None
        if owner is not None and any(n.startswith(k + ".") for k in lora):
            continue
        out[n] = t.detach()
    return out


def lora_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.named_parameters() if ".lora_" in n}
