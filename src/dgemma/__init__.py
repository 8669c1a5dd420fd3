"""dgemma: a fast, hackable PyTorch implementation of DiffusionGemma.

Public names are imported lazily (PEP 562) so `dgemma --help` and `dgemma info` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api", "DiffusionGemma": "api",
    "GenerationConfig": "config", "ModelConfig": "config", "TextConfig": "config",
    "GenerateOutput": "generate", "StepInfo": "generate", "CanvasInfo": "generate",
    "DGemmaError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "UnsupportedInputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgemma' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
