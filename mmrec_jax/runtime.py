"""Process-wide settings for running jitted steps on a CPU host.

XLA's CPU runtime allocates the buffers of a jitted computation with `malloc` and frees
them when it ends. glibc serves allocations above its mmap threshold (at most 32 MiB)
with fresh pages from `mmap` and unmaps them on `free`, so every large buffer is
page-faulted in (and zeroed by the kernel) again on every step. Measured on the 2-core
CPU machine: one elementwise pass over a 51 MB array took 35-100 ms with glibc's
defaults and 3-12 ms with the setting below, and the training step of the embedded
default config is dominated by such passes (the optimizer update of the large dense
and embedding tables, activation gradients of the image tower).

`tune_host_allocator` makes glibc serve every allocation from its heap and keep freed
memory for reuse. The process then keeps its peak heap size until it exits, which is
what a training or serving process needs anyway.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Largest value mallopt accepts (an int): never hand heap memory back to the system.
_NEVER_TRIM = 2**31 - 1


def tune_host_allocator() -> bool:
    """Keeps freed memory in glibc's heap instead of unmapping it (see the module doc).

    Call it once at the start of a process that runs jitted steps on the CPU; it
    affects allocations made after the call. Does nothing where the C library is not
    glibc.

    Returns:
      True when the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
