"""The serving engine: continuous batching of diffusion requests over one model (see engine.py)."""

from .engine import AsyncEngine, Engine, Phase
from .types import EngineStopped, QueueFull, RequestOutput, RequestRefused, SamplingParams

__all__ = ["AsyncEngine", "Engine", "Phase", "SamplingParams", "RequestOutput", "RequestRefused", "QueueFull",
           "EngineStopped"]
