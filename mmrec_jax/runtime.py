"""Settings for running jitted steps fast on a CPU host (allocator, threads, XLA options),
and the one GPU setting some jaxlib versions need.

Huge pages. XLA's CPU buffers are large (a 47 MB gradient of BERT's word-embedding
table, 51 MB for the seed image tower's dense layer) and every step touches hundreds of
megabytes of them. Many are allocated from XLA's worker threads, in glibc's per-thread
arenas, which unmap a heap whenever it empties whatever the trim threshold: even with
`tune_host_allocator` the MiniLM fine-tuning step of configs/seed.py took ~102,000
minor page faults (4 KiB each), and with 4 KiB pages the TLB misses add to that. glibc
(2.35 and later) backs its heaps with transparent huge pages when started with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, a setting read only when a process starts:
`restart_with_huge_pages()`, called first thing by the command-line entry points
(`train.py`, `python -m mmrec_jax.evaluate` and `export`, the benchmarks), re-executes
the process once with it. Measured on the 2-core CPU machine, idle: no page faults left
per step (about 800 on a later, slower state of the machine; BENCHMARKS.md), the
fine-tuning step 400 -> 323 ms, the embedded default config's step
615 -> 417 ms; the PyTorch original unchanged. (One arena for every thread,
`M_ARENA_MAX=1`, also removed the faults but gained only 7%.) Set `MMREC_HUGE_PAGES=0`
to turn it off.

Allocator. XLA's CPU runtime allocates the buffers of a jitted computation with `malloc`
and frees them when it ends. glibc serves allocations above its mmap threshold (at most
32 MiB) with fresh pages from `mmap` and unmaps them on `free`, so every large buffer
is page-faulted in (and zeroed by the kernel) again on every step. Measured on the
2-core CPU machine: one elementwise pass over a 51 MB array took 35-100 ms with glibc's
defaults and 3-12 ms with `tune_host_allocator`, which makes glibc serve allocations
from its heap and keep freed memory for reuse (the process then keeps its peak heap
size until it exits, which is what a training or serving process needs anyway). The
MiniLM fine-tuning step of configs/seed.py ran about 20% faster with it while another
job used one of the cores, and 2% faster on an idle machine (PyTorch's step, 22%
faster).

Execution thread. That holds on the main thread only. A thread other than the main one
allocates from its own glibc arena, made of heaps of at most 64 MiB, and glibc serves a
larger request there with `mmap` whatever `M_MMAP_MAX` says, and unmaps it on `free`.
JAX's CPU client runs each computation on one of its worker threads by default, so a
step's temporary buffer (XLA allocates all of a step's temporaries as one block: 372 MiB
for the MiniLM fine-tuning step of configs/seed.py at 32 tokens, 1244 MiB at 128) was
mapped, faulted in and unmapped again on every step, and on a virtual machine that hands
freed memory back to its host, faulting it in again made the step at 128 tokens 13-16%
slower, single steps up to 1.6x. `run_cpu_computations_inline()` has JAX run
single-device CPU computations on the thread that launches them instead
(`jax_cpu_enable_async_dispatch` off), so that the block comes from the main heap and
stays there. Measured on the 2-core machine, interleaved: the fine-tuning step at 128
tokens 2081-2140 -> 1816-1847 ms (and steady: 1.81-2.01 s against 1.85-2.32 s within a
run), at 32 tokens 538-578 -> 518-527 ms, the cached-text (frozen) step 140 -> 135 ms,
the embedded default config's step 616-696 -> 573-581 ms; inference (56 MiB of
temporaries) unchanged. Python then waits for each computation instead of running ahead
of it, so the host's work between steps no longer overlaps them: `make train` (the
embedded default config, frozen text, Grain's pipeline) took 3:24-3:25 instead of
3:17-3:18. `train.py` therefore runs inline only the runs that fine-tune their text model
(`mmrec_jax.train_step.runs_inline`). Computations over several devices always run on the
worker threads.

Compiler options. XLA's CPU backend hands matrix multiplies, reductions and convolutions
to YNNPACK by default; its convolutions ran on one thread here (240 GFLOP/s for the
seed's second image conv, where XLA's own Eigen convolution reached 440 on the two
cores). `compiler_options()` keeps YNNPACK for matrix multiplies and reductions only.
Measured on an idle machine, interleaved in one process: the training step of
configs/seed.py took 20% less time with the cached (frozen) text tower and 6% less with
MiniLM fine-tuned at 32 tokens, the embedded default config's 31% less; inference was
unchanged. It also turns on region analysis in copy insertion, which leaves out buffer
copies around the donated train state's in-place updates: the MiniLM fine-tuning step
3-4% faster, the frozen one 2.5%, the default config's unchanged (interleaved, idle).
Forward passes that run a content network, BERT or the image or audio tower
(`compiler_options(..., content_forward=True)`), take oneDNN's matrix multiplies instead
of YNNPACK's, whose product fused with the ReLU after it ran at about half speed on the
image tower's wide dense layer (512 x 25088 by 25088 x 512: 114 ms against 67-71 ms).
Measured on the 2-core AMD machine, each program compiled both ways in one process and
called in turn: the MiniLM forward pass of configs/seed.py at 32 tokens, batch 32,
157.8-160.1 ms against 169.3-176.2 (three runs; 8-14% less on an Intel Xeon); encoding
512 items of configs/seed.py 2.34 s against 3.30 with MiniLM, 0.57 against 1.32 with the
text tower frozen; the embedded default config's forward pass at batch 1024 287-334 ms
against 336-371. Training steps were not faster with it, and an evaluation of the
embedded default run with every program compiled so was slower (on the Intel Xeon), so
the training steps and the programs that score encoded items keep the options above.
Pass them to `jax.jit(compiler_options=...)`. Only for float32 compute: with bfloat16,
XLA 0.10.2 aborted compiling the seed's training step under these options.

Compute dtype. `config.model.dtype = "auto"` (the configs' default) computes in bfloat16
on GPU and TPU, whose matrix units run it at several times their float32 rate, and in
float32 on a CPU, where bfloat16 was slower (the MiniLM fine-tuning step at 0.73x of
float32 on the 2-core machine; BENCHMARKS.md). `compute_dtype` resolves it.

GPU atomics. A trained BERT's embedding gradient is a scatter-add, which a GPU computes
with atomic adds. jaxlib 0.10.2 to 0.11.0 compile float32 atomic adds to compare-and-swap
loops that collapse when many tokens add into one row (padding, [CLS]);
`use_native_gpu_atomics()`, called by `train.py` and the benchmarks before their first
computation, sets the XLA option that restores the GPU's own atomic adds there.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import sys
import warnings

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


def run_cpu_computations_inline() -> bool:
    """Runs each single-device CPU computation on the thread that launches it.

    Turns JAX's asynchronous CPU dispatch off, so that the buffers of a jitted step
    come from the launching thread's glibc heap, which `tune_host_allocator` keeps,
    instead of fresh pages mapped on every step (see the module doc). Call it once at
    the start of a process, before its first JAX computation: the setting is read when
    JAX creates its CPU client. It changes neither results nor computations over
    several devices, and nothing on GPU or TPU.

    Returns:
      True when the setting will take effect; False when JAX's backends already exist
      or this JAX has no such option (nothing is changed then).
    """
    import jax

    if _backends_initialized():
        return False
    try:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    except AttributeError:  # a JAX without the option
        return False
    return True


# glibc's tunable that backs malloc's heap with transparent huge pages (glibc >= 2.35).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Environment variable that turns the restart off when set to 0.
HUGE_PAGES_ENV = "MMREC_HUGE_PAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _backends_initialized() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS and the CPU client's
    settings are no longer read)."""
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX that moved it: assume a fresh process
        return False


# LLVM option, through XLA's backend options, that lets XLA's GPU backend add floats
# with the GPU's own atomic instructions (which flush subnormals to zero).
NATIVE_GPU_ATOMICS_OPTION = "-nvptx-allow-ftz-atomics"
_BACKEND_OPTIONS_FLAG = "--xla_backend_extra_options="


def _jaxlib_release(jaxlib_version: str | None = None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a jaxlib version string (None: the installed jaxlib's,
    read without starting JAX's backends); None for a string that does not start so."""
    if jaxlib_version is None:
        import jaxlib.version

        jaxlib_version = jaxlib.version.__version__
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", jaxlib_version)
    return None if match is None else tuple(int(n) for n in match.groups())


def gpu_atomics_are_cas_loops(jaxlib_version: str | None = None) -> bool:
    """Whether this jaxlib compiles a float32 scatter-add on GPU to compare-and-swap loops.

    The LLVM of jaxlib 0.10.2 to 0.11.0 lowers XLA's float atomic adds to compare-and-swap
    retry loops instead of the GPU's atomic add (jax-ml/jax#38806, fixed in 0.11.1).
    Under contention they collapse: in an embedding table's gradient every padding token
    of the batch adds into one row, and the reports measured 450-2000x slower scatters.

    Args:
      jaxlib_version: a version string; None reads the installed jaxlib's.
    """
    release = _jaxlib_release(jaxlib_version)
    return release is not None and (0, 10, 2) <= release <= (0, 11, 0)


def with_backend_option(xla_flags: str, option: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with `option` added to --xla_backend_extra_options."""
    flags = xla_flags.split()
    for index, flag in enumerate(flags):
        if flag.startswith(_BACKEND_OPTIONS_FLAG):
            options = flag[len(_BACKEND_OPTIONS_FLAG) :]
            if option not in options.split(","):
                flags[index] = f"{flag},{option}" if options else flag + option
            return " ".join(flags)
    return " ".join([*flags, _BACKEND_OPTIONS_FLAG + option])


def _cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))


def use_native_gpu_atomics() -> bool:
    """Has XLA add floats with the GPU's atomic instructions where this jaxlib would not.

    With a jaxlib of `gpu_atomics_are_cas_loops` and JAX's CUDA plugin installed, adds
    `NATIVE_GPU_ATOMICS_OPTION` to XLA_FLAGS, which XLA reads when JAX starts its
    backends: call it before the process's first JAX computation. Elsewhere it changes
    nothing. The atomic adds then flush float32 subnormals (below 1.2e-38) to zero, as
    every jaxlib before 0.10.2 and after 0.11.0 does.

    Returns:
      True when the option takes effect; False when it is not needed, or when JAX's
      backends already started (a warning then names the fix).
    """
    if not gpu_atomics_are_cas_loops() or not _cuda_plugin_installed():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if NATIVE_GPU_ATOMICS_OPTION in flags:
        return True
    if _backends_initialized():
        warnings.warn(
            "This jaxlib adds floats on GPU with slow compare-and-swap loops "
            "(jax-ml/jax#38806), and JAX's backends have started, so XLA_FLAGS is no longer "
            "read: embedding gradients may run hundreds of times slower. Start the process "
            f"with XLA_FLAGS='{_BACKEND_OPTIONS_FLAG}{NATIVE_GPU_ATOMICS_OPTION}', or use "
            "jax 0.11.1 or later.",
            stacklevel=2,
        )
        return False
    os.environ["XLA_FLAGS"] = with_backend_option(flags, NATIVE_GPU_ATOMICS_OPTION)
    return True


def _glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# XLA option that keeps XLA's CPU operations (its FFT among them) on one thread each.
SINGLE_THREADED_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"


def jaxlib_fft_can_hang() -> bool:
    """Whether the installed jaxlib is one whose CPU FFT can hang (0.11; see
    `fft_can_deadlock`). Reads the version without starting JAX's backends."""
    release = _jaxlib_release()
    return release is not None and release[:2] == (0, 11)


def fft_can_deadlock(num_cpu_devices: int) -> bool:
    """Whether XLA's CPU FFT can hang this process for good.

    jaxlib 0.11's FFT hands the FFT library (ducc0) the intra-op thread pool it runs on;
    when every thread of that pool runs an FFT at once, as several CPU devices each
    computing one do, each waits for the others' work. Seen with jaxlib 0.11.2 on 2 and 8
    CPU devices: the first training step with the log-mel audio frontend never finished,
    every time; one device, jaxlib 0.10.2 and 0.12.0.1 ran. `SINGLE_THREADED_EIGEN_FLAG`
    in XLA_FLAGS avoids it.

    Args:
      num_cpu_devices: the CPU devices this process runs computations on.
    """
    import jax

    if jax.default_backend() != "cpu" or num_cpu_devices < 2:
        return False
    if SINGLE_THREADED_EIGEN_FLAG in os.environ.get("XLA_FLAGS", "").lower():
        return False
    return jaxlib_fft_can_hang()


def huge_pages_available() -> bool:
    """Whether this host can back malloc's heap with transparent huge pages on request.

    True on Linux with glibc 2.35 or later and the kernel's transparent huge pages set to
    `always` or `madvise` (not `never`).
    """
    if not sys.platform.startswith("linux"):
        return False
    version = _glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_enabled() -> bool:
    """Whether this process was started with glibc's huge-page tunable set."""
    return "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")


def restart_with_huge_pages() -> None:
    """Re-executes the current command once with glibc's heap on transparent huge pages.

    Call it first thing in a command-line entry point (`if __name__ == "__main__":`),
    never from library code or a notebook: it replaces the running process with a new
    one that runs the same command line (`sys.orig_argv`) with `GLIBC_TUNABLES` extended
    by `HUGE_PAGES_TUNABLE` (see the module doc). Returns without restarting when the
    tunable is already set (the restarted process, or a user's own choice), when
    `MMREC_HUGE_PAGES=0`, or when `huge_pages_available()` is False; carries on as
    started if the re-execution fails.
    """
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0" or huge_pages_enabled():
        return
    if not sys.executable or not huge_pages_available():
        return
    before = os.environ.get("GLIBC_TUNABLES")
    tunables = [t for t in (before or "").split(":") if t]
    os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES_TUNABLE])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # could not re-execute: carry on as started
        if before is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = before


# XLA options for the CPU backend (see the module docstring): YNNPACK for dots and
# reductions, not convolutions; copy insertion with region analysis (fewer buffer copies
# around the in-place updates of a donated train state).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_copy_insertion_use_region_analysis": True,
}

# For the forward-only programs that run the content networks (see the module docstring):
# oneDNN's matrix multiplies in place of YNNPACK's, which keeps the reductions.
CONTENT_FORWARD_CPU_COMPILER_OPTIONS = {
    **CPU_COMPILER_OPTIONS,
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_use_onednn": True,
}


# What `config.model.dtype` may name; "auto" is the platform's (`compute_dtype`).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(name: str, platform: str | None = None) -> str:
    """The compute dtype that `config.model.dtype` names, with "auto" resolved.

    Args:
      name: "auto", "float32", "bfloat16" or "float16".
      platform: "cpu", "gpu", "tpu", ...; default: JAX's default backend.

    Returns:
      `name` itself, or for "auto": "bfloat16" on GPU and TPU, "float32" elsewhere.

    Raises:
      ValueError: `name` is not one of `COMPUTE_DTYPES`.
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.model.dtype={name!r} is not a compute dtype; use one of "
            f"{', '.join(COMPUTE_DTYPES)} (auto: bfloat16 on GPU and TPU, float32 on CPU)."
        )
    if platform is None:
        import jax

        platform = jax.default_backend()
    if name == "float16" and platform == "cpu":
        raise ValueError(
            "config.model.dtype='float16' does not run on a CPU (XLA's CPU matrix "
            "multiplies have no float16); use auto, float32 or bfloat16."
        )
    if name != "auto":
        return name
    return "bfloat16" if platform in ("gpu", "cuda", "rocm", "tpu") else "float32"


@functools.cache
def compiler_options(
    compute_dtype_name: str = "float32", content_forward: bool = False
) -> dict[str, str | bool] | None:
    """XLA compiler options for jitting the model's steps on the default backend.

    Args:
      compute_dtype_name: the model's compute dtype (`config.model.dtype`, "auto"
        allowed). The options are for float32 only: with bfloat16 compute, XLA 0.10.2's
        YNNPACK emitter aborted the process compiling the seed's training step under
        them.
      content_forward: the program is a forward pass of the model that runs a content
        network, BERT or the image or audio tower (scoring a batch, encoding items):
        `CONTENT_FORWARD_CPU_COMPILER_OPTIONS`, with oneDNN's matrix multiplies. Not for
        training steps, nor for the small products of scoring encoded items, which it
        did not speed up.

    Returns:
      On the CPU backend with float32 compute, the options of `CPU_COMPILER_OPTIONS` (or
      `CONTENT_FORWARD_CPU_COMPILER_OPTIONS`) this jaxlib accepts, each checked once by
      compiling a tiny function; the plain CPU options for a content forward pass when
      this jaxlib has no oneDNN option; None elsewhere or when it accepts none of them
      (XLA's defaults).
    """
    import jax
    import numpy as np

    if jax.default_backend() != "cpu" or compute_dtype(compute_dtype_name) != "float32":
        return None
    wanted = CONTENT_FORWARD_CPU_COMPILER_OPTIONS if content_forward else CPU_COMPILER_OPTIONS
    accepted = {}
    for name, value in wanted.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
                np.zeros((2,), np.float32)
            ).compile()
        except (TypeError, ValueError, jax.errors.JaxRuntimeError):  # an XLA without it
            continue
        accepted[name] = value
    if content_forward and "xla_cpu_use_onednn" not in accepted:
        return compiler_options(compute_dtype_name)  # no oneDNN: YNNPACK's products
    return accepted or None


def is_out_of_memory(error: Exception) -> bool:
    """Whether XLA failed for lack of memory (on any platform it says RESOURCE_EXHAUSTED)."""
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)
