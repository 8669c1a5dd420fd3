"""CPU runtime settings (dgemma/cpu.py): applied once when a model lands on the CPU, opt-out honoured."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from dgemma.presets import init_checkpoint
import dgemma, dgemma.cpu as c
assert c._state is None  # importing dgemma changes nothing
m = dgemma.load(init_checkpoint("tiny", sys.argv[1]), device="cpu")
print(c._state)
"""


def _probe(tmp_path, env_extra):
    import os

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tiny")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_tuning_applies_on_cpu_load_and_can_be_switched_off(tmp_path):
    assert _probe(tmp_path, {}) == "True"
    assert _probe(tmp_path, {"DGEMMA_TUNE_MALLOC": "0"}) == "False"
