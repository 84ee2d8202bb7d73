"""Settings for running jitted steps fast on a CPU host: the allocator and XLA's options.

Allocator. XLA's CPU runtime allocates the buffers of a jitted computation with `malloc`
and frees them when it ends. glibc serves allocations above its mmap threshold (at most
32 MiB) with fresh pages from `mmap` and unmaps them on `free`, so every large buffer
is page-faulted in (and zeroed by the kernel) again on every step. Measured on the
2-core CPU machine: one elementwise pass over a 51 MB array took 35-100 ms with glibc's
defaults and 3-12 ms with `tune_host_allocator`, which makes glibc serve every
allocation from its heap and keep freed memory for reuse (the process then keeps its
peak heap size until it exits, which is what a training or serving process needs
anyway). The MiniLM fine-tuning step of configs/seed.py ran about 20% faster with it
while another job used one of the cores, and 2% faster on an idle machine (PyTorch's
step, 22% faster).

Compiler options. XLA's CPU backend hands matrix multiplies, reductions and convolutions
to YNNPACK by default; its convolutions ran on one thread here (240 GFLOP/s for the
seed's second image conv, where XLA's own Eigen convolution reached 440 on the two
cores). `compiler_options()` keeps YNNPACK for matrix multiplies and reductions only.
Measured on an idle machine, interleaved in one process: the training step of
configs/seed.py took 20% less time with the cached (frozen) text tower and 6% less with
MiniLM fine-tuned at 32 tokens, the embedded default config's 31% less; inference was
unchanged. Pass it to `jax.jit(compiler_options=...)`. Only for float32 compute: with
bfloat16, XLA 0.10.2 aborted compiling the seed's training step under these options.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import jax
import numpy as np

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


# XLA options for the CPU backend (see the module docstring): YNNPACK for dots and
# reductions, not convolutions.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def compiler_options(compute_dtype: str = "float32") -> dict[str, str] | None:
    """XLA compiler options for jitting the model's steps on the default backend.

    Args:
      compute_dtype: the model's compute dtype (`config.model.dtype`). The options are
        for float32 only: with bfloat16 compute, XLA 0.10.2's YNNPACK emitter aborted
        the process compiling the seed's training step under them.

    Returns:
      `CPU_COMPILER_OPTIONS` on the CPU backend with float32 compute when this jaxlib
      accepts them (checked once by compiling a tiny function), else None (XLA's
      defaults).
    """
    if jax.default_backend() != "cpu" or np.dtype(compute_dtype) != np.float32:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            np.zeros((2,), np.float32)
        ).compile()
    except (TypeError, jax.errors.JaxRuntimeError):  # an XLA without the option
        return None
    return dict(CPU_COMPILER_OPTIONS)
