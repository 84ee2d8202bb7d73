"""Test-suite set-up: 8 virtual CPU devices, so sharding code runs for real.

The XLA flags must be set before JAX is imported anywhere, which is why they live at the
top of the suite's conftest. Besides the devices, they lower the optimization level of
XLA's CPU backend (its LLVM code generation) to 0: most of the suite's time is compiling
small programs, which then compile about twice as fast, while XLA's HLO passes, where a
program's semantics are decided, run as they do in production. For the same reason the
fused computations are emitted to LLVM by XLA's older elemental emitters rather than its
fusion emitters (`--xla_cpu_use_fusion_emitters=false`): the same HLO, compiled in about
half the time again (the tiny config's train step: 3.2 s to 1.5 s). XLA stops the process
on a flag it does not know, so the flag is added only where this jaxlib accepts it.
`MMREC_TEST_PRODUCTION_CODEGEN=1` leaves both at XLA's defaults, to run the suite on the
code generation that training and serving use (616 s against 347 s on 2 cores). Under
jaxlib 0.11, whose CPU FFT hangs when several devices run one at once
(`mmrec_jax.runtime.fft_can_deadlock`), XLA's operations are kept to one thread each,
as the library tells its users to do there.

Many tests compile the same programs (the tiny config's train and evaluation steps, in
this process, in the other pytest-xdist worker and in the training subprocesses), so the
suite shares JAX's persistent compilation cache: a folder made fresh for each run of the
suite (by the controlling process, before the workers start, which inherit it) and
removed at its end, so that no run reads what an earlier run or another code version
compiled; the folder of a run that was killed is removed by the next run. A
`JAX_COMPILATION_CACHE_DIR` set by the caller is used as it is, and
`MMREC_TEST_COMPILATION_CACHE=0` turns the cache off.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mmrec_jax.runtime import SINGLE_THREADED_EIGEN_FLAG, jaxlib_fft_can_hang

_FAST_CODEGEN_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's CPU backend starts with `flag` in XLA_FLAGS."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


_SUITE_XLA_FLAGS = "--xla_force_host_platform_device_count=8"
# pytest-xdist's workers inherit the controlling process's flags: probed there once.
if "PYTEST_XDIST_WORKER" not in os.environ:
    if os.environ.get("MMREC_TEST_PRODUCTION_CODEGEN", "0") != "1":
        _SUITE_XLA_FLAGS += " --xla_backend_optimization_level=0"
        if _xla_accepts(_FAST_CODEGEN_FLAG):
            _SUITE_XLA_FLAGS += f" {_FAST_CODEGEN_FLAG}"
    if jaxlib_fft_can_hang():
        _SUITE_XLA_FLAGS += f" {SINGLE_THREADED_EIGEN_FLAG}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SUITE_XLA_FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CACHE_PREFIX = "mmrec-jax-test-xla-"


def _remove_caches_of_dead_runs() -> None:
    """Removes the cache folders of suite runs whose process is gone (killed runs)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_CACHE_PREFIX}*-*"):
        try:
            os.kill(int(folder.name[len(_CACHE_PREFIX) :].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process


_CACHE_OWNER = False
if (
    os.environ.get("MMREC_TEST_COMPILATION_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    and "PYTEST_XDIST_WORKER" not in os.environ
):
    _remove_caches_of_dead_runs()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix=f"{_CACHE_PREFIX}{os.getpid()}-"
    )
    # Programs that took a second or more to compile; caching the many tiny programs of
    # eager tests costs more file traffic than it saves.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    # A size limit makes JAX lock the cache folder: processes read whole entries only.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    _CACHE_OWNER = True


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


class _ClosedPipe:
    """A stream whose reader is gone: every write and flush raises BrokenPipeError."""

    def write(self, text):
        raise BrokenPipeError

    def flush(self):
        raise BrokenPipeError


@pytest.fixture
def closed_stderr(monkeypatch):
    """sys.stderr as a pipe whose reader is gone (a `| tee` killed by the same Ctrl-C)."""
    monkeypatch.setattr(sys, "stderr", _ClosedPipe())
