"""Fine-tuning and training with the uniform-state diffusion objective (spec §6.1)."""

from .data import DataError, Example, collate, load_jsonl
from .lora import apply_lora, merge_lora
from .objective import Batch, DiffusionObjective, ObjectiveConfig, corrupt
from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train", "DiffusionObjective", "ObjectiveConfig", "Batch", "corrupt", "collate",
           "load_jsonl", "Example", "DataError", "apply_lora", "merge_lora"]
