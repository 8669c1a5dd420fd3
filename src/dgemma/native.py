"""Optional native helpers, compiled from `dgemma/csrc` with the system C compiler on first use.

dgemma needs no compiler: everything here has a pure-PyTorch path, taken when there is no compiler, the build fails,
the result would not match torch, or `DGEMMA_NATIVE=0`. The shared library is cached per source, compiler and
machine in `$DGEMMA_CACHE` (default `$XDG_CACHE_HOME/dgemma` or `~/.cache/dgemma`, or a temporary directory when
that is not writable); a build takes about half a second and happens once.

- `mt19937`: advances torch's CPU generator over a multinomial's draws, tempering only the rows that are used
  (see `csrc/mt19937.c` and `fastrand.py`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ENABLED = os.environ.get("DGEMMA_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")
_SRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]  # portable code: no -march=native, so a cache may be shared
_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cache_dirs() -> list[Path]:
    env = os.environ.get("DGEMMA_CACHE")
    if env:
        return [Path(env)]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [base / "dgemma", Path(tempfile.gettempdir()) / f"dgemma-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _build(name: str) -> ctypes.CDLL | None:
    src = _SRC / f"{name}.c"
    cc = _compiler()
    if cc is None or not src.is_file() or sys.platform == "win32":
        return None
    key = hashlib.sha256(b"\0".join([src.read_bytes(), cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    for d in _cache_dirs():
        so = d / f"{name}-{key}.so"
        if not so.is_file():
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
                os.close(fd)
                r = subprocess.run([cc, *_FLAGS, str(src), "-o", tmp], capture_output=True, timeout=120)
                if r.returncode != 0:
                    os.unlink(tmp)
                    return None  # the compiler refused the source: no point trying elsewhere
                os.replace(tmp, so)  # atomic: a concurrent build of the same key is harmless
            except (OSError, subprocess.SubprocessError):
                continue  # this directory is not writable (or the compiler vanished): try the next one
        try:
            return ctypes.CDLL(str(so))
        except OSError:
            continue
    return None


def library(name: str) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c`, or None where native helpers are off or cannot be built."""
    if not ENABLED:
        return None
    with _LOCK:
        if name not in _LIBS:
            try:
                _LIBS[name] = _build(name)
            except Exception:  # never let an optional speed-up break generation
                _LIBS[name] = None
        return _LIBS[name]
