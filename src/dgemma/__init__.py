"""dgemma: a fast, hackable PyTorch implementation of DiffusionGemma."""

from .api import DiffusionGemma, load
from .config import GenerationConfig, ModelConfig, TextConfig
from .errors import CheckpointError, ConfigError, DGemmaError, UnsupportedInputError
from .generate import CanvasInfo, GenerateOutput, StepInfo

__version__ = "0.1.0"

__all__ = ["load", "DiffusionGemma", "GenerationConfig", "ModelConfig", "TextConfig", "GenerateOutput",
           "StepInfo", "CanvasInfo", "DGemmaError", "CheckpointError", "ConfigError", "UnsupportedInputError"]
