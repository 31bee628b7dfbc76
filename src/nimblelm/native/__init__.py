"""Native CPU kernels, compiled from C on first use (see :mod:`nimblelm.native.build`).

Every kernel here is a fast path with a pure-PyTorch twin in :mod:`nimblelm.ops`; when no C
compiler is available, or ``NIMBLELM_NATIVE=0``, callers use the PyTorch form and results are
the same (the tests compare the two).
"""

from .build import load_library, native_enabled

__all__ = ["load_library", "native_enabled"]
