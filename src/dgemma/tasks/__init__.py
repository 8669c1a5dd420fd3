"""Task modules: small, self-contained problems that a DiffusionGemma model is trained on and evaluated against.

`dgemma.tasks.sudoku`: 9×9 Sudoku — solver, unique-solution puzzle generator, character tokenizer, prompt/answer
encoding, evaluation, a live board view and the `dgemma sudoku` CLI commands.

Modules here import torch only where a model is used, so the pure-Python parts (solver, generator) stay light.
"""
