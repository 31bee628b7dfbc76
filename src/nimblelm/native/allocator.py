"""Keep freed memory in glibc's heap, so large temporaries are not page-faulted in again.

With glibc's defaults every block above the (dynamic) mmap threshold is mapped fresh and
unmapped on free, and the heap top is trimmed back to the OS; a prefill that creates dozens of
multi-MB temporaries then spends much of its time in page faults: an elementwise op on
[2048, 256] fp32 ran at ~3 GB/s, a batched [256, 64, 64] matmul at 22 GFLOP/s against 37
into a reused buffer (docs/performance.md). :func:`keep_freed_memory` raises the mmap
threshold to its maximum (32 MiB on 64-bit glibc) and trimming to 2 GiB of free heap top, the same as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment.

It is a process-wide choice: the process keeps its peak heap instead of returning it. The
``nimblelm`` command line makes it at start-up (``NIMBLELM_MALLOC=default`` opts out);
importing the library changes nothing, and library users may call it themselves.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's ceiling: 32 MiB on 64-bit
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free heap top


def _mallopt():
    """glibc's ``mallopt`` from the symbols already loaded in this process (no ``find_library``,
    which runs ldconfig or a compiler at every start-up), or None where there is none."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Configure glibc malloc as described above. Returns True when both settings took
    effect, False where there is no glibc ``mallopt`` (macOS, musl) or it refused."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def configure_from_environment() -> bool:
    """What the command line calls at start-up: :func:`keep_freed_memory` unless
    ``NIMBLELM_MALLOC`` is ``default``. Returns whether the settings were applied."""
    if os.environ.get("NIMBLELM_MALLOC", "").strip().lower() == "default":
        return False
    return keep_freed_memory()
