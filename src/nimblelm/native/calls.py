"""Calling the native kernels: pointers and sizes for ctypes, an ABI check per loaded library,
and splitting one call's work across ``torch.get_num_threads()`` threads (ctypes releases the
GIL, so the parts run in parallel)."""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from .build import load_library

_pool: ThreadPoolExecutor | None = None  # shared by every kernel call that splits its work
_pool_size = 0


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The data pointer of a contiguous tensor (NULL for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def int64s(*sizes: int) -> list[ctypes.c_int64]:
    return [ctypes.c_int64(v) for v in sizes]


def checked_library(name: str, abi: int, functions: Sequence[str]) -> ctypes.CDLL | None:
    """The kernel library ``name`` with the ``int`` return type set on ``functions``, or None
    when it is unavailable or was built from sources whose ``nl_<name>_abi()`` differs from
    ``abi`` (the argument lists the caller passes would not match)."""
    lib = load_library(name)
    return None if lib is None else _checked(lib, name, abi, tuple(functions))


@functools.lru_cache(maxsize=None)
def _checked(lib: ctypes.CDLL, name: str, abi: int, functions: tuple[str, ...]) -> ctypes.CDLL | None:
    if getattr(lib, f"nl_{name}_abi")() != abi:
        return None
    for function in functions:
        getattr(lib, function).restype = ctypes.c_int
    return lib


def even_ranges(n: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``torch.get_num_threads()`` ranges whose cuts are
    multiples of ``align``."""
    blocks = -(-n // align)
    parts = max(1, min(torch.get_num_threads(), blocks))
    cuts = [n if i == parts else min(n, (blocks * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def run_split(kernel: Callable[..., int], make_args: Callable[[int], list], ranges: list[tuple[int, int]],
              what: str) -> None:
    """Call ``kernel(*make_args(i), start, stop)`` for every range i, in parallel when several;
    a nonzero return (the kernel could not allocate its buffers) raises MemoryError naming ``what``."""
    global _pool, _pool_size

    def call(i: int) -> int:
        start, stop = ranges[i]
        return kernel(*make_args(i), ctypes.c_int64(start), ctypes.c_int64(stop))

    if len(ranges) == 1:
        codes = [call(0)]
    else:
        if _pool is None or _pool_size < len(ranges):
            _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="nimblelm-native")
            _pool_size = len(ranges)
        codes = list(_pool.map(call, range(len(ranges))))
    if any(codes):
        raise MemoryError(f"{what}: the native kernel could not allocate its work buffers")
