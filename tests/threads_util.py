"""Running a test body with a given number of torch intra-op threads."""

import torch


def with_threads(threads: int, fn):
    """fn() with torch using ``threads`` intra-op threads (native kernels split their work across them)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)
