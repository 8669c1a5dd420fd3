"""Optional native helpers, compiled from `dgemma/csrc` with the system C compiler on first use.

dgemma needs no compiler: everything here has a pure-PyTorch path, taken when there is no compiler, the build fails,
the result would not match torch, or `DGEMMA_NATIVE=0`. The shared library is cached per source, compiler and
machine in `$DGEMMA_CACHE` (default `$XDG_CACHE_HOME/dgemma` or `~/.cache/dgemma`, or a temporary directory when
that is not writable); a build takes about a tenth of a second and happens once. A library is loaded only from a
directory and file owned by the user and writable by nobody else.

- `mt19937`: advances torch's CPU generator over a multinomial's draws, tempering only the rows that are used
  (see `csrc/mt19937.c` and `fastrand.py`).
- `cpu_ops`: operators for the CPU trace of the decoder pass: a MoE layer's experts spread over OpenMP threads,
  calling torch's own MKL and SLEEF, the tied head's transposing copy, and a layer's RMSNorms, RoPE and residual
  adds (AVX2 only; see `csrc/cpu_ops.c` and `model/native_ops.py`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ENABLED = os.environ.get("DGEMMA_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")
_SRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]  # portable code: no -march=native, so a cache may be shared
# per-source extras: cpu_ops.c is AVX2 code (used only where torch itself runs its AVX2 kernels), with no contraction of
# products and sums beyond the fused ones it writes out, and OpenMP (torch's own runtime, already loaded)
_EXTRA = {"cpu_ops": ["-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]}
_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cc) if cc else None
        if path:
            return path
    return None


def _cache_dirs() -> list[Path]:
    env = os.environ.get("DGEMMA_CACHE")
    if env:
        return [Path(env)]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [base / "dgemma", Path(tempfile.gettempdir()) / f"dgemma-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _private(path: Path, want_dir: bool) -> bool:
    """Is `path` a real directory (or regular file) owned by us and writable by nobody else? A library is only
    loaded from such places: another local user must not be able to plant one (e.g. in the temp fallback)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    return kind_ok and _ours(st) and not st.st_mode & _OTHERS_WRITE


_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _ours(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def _tighten(d: Path) -> None:
    """Drop group/other write permission from a cache directory of ours (a umask of 002 creates it so)."""
    st = os.lstat(d)
    if stat.S_ISDIR(st.st_mode) and _ours(st) and st.st_mode & _OTHERS_WRITE:
        os.chmod(d, stat.S_IMODE(st.st_mode) & ~_OTHERS_WRITE)


def _build(name: str) -> ctypes.CDLL | None:
    src = _SRC / f"{name}.c"
    cc = _compiler()
    if cc is None or not src.is_file() or sys.platform == "win32":
        return None
    flags = _FLAGS + _EXTRA.get(name, [])
    key = hashlib.sha256(b"\0".join([src.read_bytes(), cc.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    for d in _cache_dirs():
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            _tighten(d)
        except OSError:
            continue  # not creatable here: try the next place
        if not _private(d, want_dir=True):
            continue
        so = d / f"{name}-{key}.so"
        if not so.exists():
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
                os.close(fd)
                r = subprocess.run([cc, *flags, str(src), "-o", tmp], capture_output=True, timeout=120)
                if r.returncode != 0:
                    return None  # the compiler refused the source: no point trying elsewhere
                os.chmod(tmp, 0o755)  # the linker's mode follows the umask, which may let the group write
                os.replace(tmp, so)  # atomic: a concurrent build of the same key is harmless
                tmp = None
            except subprocess.TimeoutExpired:
                return None  # a stuck compiler: do not wait for it again elsewhere
            except (OSError, subprocess.SubprocessError):
                continue  # this directory is not writable (or the compiler vanished): try the next one
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        if not _private(so, want_dir=False):
            continue
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
