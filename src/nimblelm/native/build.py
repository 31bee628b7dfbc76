"""Compile nimblelm's C kernels on first use and load them with ctypes.

A kernel source ``NAME.c`` next to this file (with the ``*.inc`` files it includes) is compiled
once per machine into
``$NIMBLELM_CACHE/native/NAME-<key>.so`` (default cache: ``$XDG_CACHE_HOME/nimblelm`` or
``~/.cache/nimblelm``), where the key hashes the source, the flags, the compiler's version and
the CPU's feature flags (the build uses ``-march=native``). The library is written to a
temporary name and renamed into place, so concurrent first uses never see half a file.

Nothing here is required: with no C compiler, a failed build, or ``NIMBLELM_NATIVE=0`` in the
environment, :func:`load_library` returns None (warning once for a failed build) and callers
use their pure-PyTorch form. ``NIMBLELM_CC`` (else ``CC``, else ``cc``/``gcc``) picks the
compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_SOURCE_DIR = Path(__file__).resolve().parent
_FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99",
          "-ffp-contract=fast"]
_ARCH_FLAGS = ["-march=native"]
_BUILD_TIMEOUT_S = 300


def native_enabled() -> bool:
    """False when the environment sets ``NIMBLELM_NATIVE`` to 0 / false / no / off."""
    return os.environ.get("NIMBLELM_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """Directory holding compiled kernels (created on demand)."""
    root = os.environ.get("NIMBLELM_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nimblelm")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("NIMBLELM_CC"), os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """The CPU feature line (Linux); the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _build_key(source: bytes, compiler: str, flags: list[str]) -> str:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    text = b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_flags().encode()])
    return hashlib.sha256(text).hexdigest()[:16]


def _compile(compiler: str, source: Path, target: Path, flags: list[str]) -> str | None:
    """Compile ``source`` into ``target`` atomically; returns None on success, else the error text."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            return done.stderr.strip() or f"{compiler} exited with {done.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def load_library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (source ``native/NAME.c``), or None when unavailable."""
    if not native_enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    source = _SOURCE_DIR / f"{name}.c"
    code = source.read_bytes() + b"".join(p.read_bytes() for p in sorted(_SOURCE_DIR.glob("*.inc")))
    errors = []
    for flags in (_FLAGS + _ARCH_FLAGS, _FLAGS):  # a compiler without -march=native still builds
        target = cache_dir() / f"{name}-{_build_key(code, compiler, flags)}.so"
        if not target.exists():
            error = _compile(compiler, source, target, flags)
            if error is not None:
                errors.append(error)
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(str(exc))
    warnings.warn(f"nimblelm: could not build the native kernels {name!r} (using the PyTorch form instead; "
                  f"set NIMBLELM_NATIVE=0 to silence): {errors[-1][:500]}", RuntimeWarning, stacklevel=2)
    return None
