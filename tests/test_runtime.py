"""mmrec_jax.runtime: the huge-page restart, the compute dtype and the compiler options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _processes import xla_flags

from mmrec_jax import runtime

ROOT = Path(__file__).resolve().parents[1]

# Prints one JSON line per start (so a restart shows as two), restarts, then allocates
# 64 MiB from malloc's heap and reports how much of the process sits on huge pages.
SCRIPT = """
import ctypes, json, os, sys
from mmrec_jax import runtime
print(json.dumps({"start": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES")}),
      flush=True)
runtime.restart_with_huge_pages()
huge_kib = None
if sys.platform.startswith("linux"):
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: served from the heap, as tune_host_allocator does
    size = 64 * 2**20
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    with open("/proc/self/smaps_rollup") as f:
        huge_kib = sum(int(l.split()[1]) for l in f if l.startswith("AnonHugePages"))
print(json.dumps({"done": sys.argv[1:], "huge_kib": huge_kib}), flush=True)
"""


def _run(tmp_path, env_update: dict[str, str | None]) -> list[dict]:
    script = tmp_path / "restart.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, str(script), "--flag", "a b"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_restart_runs_the_same_command_once_with_huge_pages(tmp_path):
    lines = _run(tmp_path, {"GLIBC_TUNABLES": None, runtime.HUGE_PAGES_ENV: None})
    if not runtime.huge_pages_available():  # another OS or C library: no restart at all
        assert [line.get("tunables") for line in lines[:1]] == [None]
        assert len(lines) == 2 and lines[1]["done"] == ["--flag", "a b"]
        return
    starts = [line for line in lines if "start" in line]
    assert [s["start"] for s in starts] == [["--flag", "a b"]] * 2
    assert starts[0]["tunables"] is None
    assert starts[1]["tunables"] == runtime.HUGE_PAGES_TUNABLE
    # The restarted process really gets huge pages for its heap (most of the 64 MiB).
    assert lines[-1]["done"] == ["--flag", "a b"]
    assert lines[-1]["huge_kib"] >= 32 * 1024


def test_restart_keeps_the_users_tunables(tmp_path):
    own = "glibc.malloc.trim_threshold=1000000"
    lines = _run(tmp_path, {"GLIBC_TUNABLES": own, runtime.HUGE_PAGES_ENV: None})
    if not runtime.huge_pages_available():
        assert len(lines) == 2
        return
    assert [line["tunables"] for line in lines if "start" in line] == [
        own,
        f"{own}:{runtime.HUGE_PAGES_TUNABLE}",
    ]


def test_restart_can_be_turned_off(tmp_path):
    lines = _run(tmp_path, {"GLIBC_TUNABLES": None, runtime.HUGE_PAGES_ENV: "0"})
    assert lines[0] == {"start": ["--flag", "a b"], "tunables": None}
    assert lines[1]["done"] == ["--flag", "a b"]
    assert len(lines) == 2
    if sys.platform.startswith("linux"):  # a 4 KiB-page heap: at most a stray huge page
        assert lines[1]["huge_kib"] < 32 * 1024


def test_failed_restart_carries_on_with_the_environment_unchanged(monkeypatch):
    calls = []

    def failing_execv(path, argv):
        calls.append((path, list(argv)))
        raise OSError("exec refused")

    monkeypatch.setattr(os, "execv", failing_execv)
    monkeypatch.delenv(runtime.HUGE_PAGES_ENV, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    runtime.restart_with_huge_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1000000"
    assert len(calls) == (1 if runtime.huge_pages_available() else 0)
    monkeypatch.delenv("GLIBC_TUNABLES")
    runtime.restart_with_huge_pages()
    assert "GLIBC_TUNABLES" not in os.environ


@pytest.mark.parametrize(
    "name, platform, expected",
    [
        ("auto", "cpu", "float32"),
        ("auto", "gpu", "bfloat16"),
        ("auto", "tpu", "bfloat16"),
        ("float32", "tpu", "float32"),
        ("bfloat16", "cpu", "bfloat16"),
        ("float16", "gpu", "float16"),
    ],
)
def test_compute_dtype_resolves_auto_by_platform(name, platform, expected):
    assert runtime.compute_dtype(name, platform) == expected


def test_compute_dtype_defaults_to_jaxs_backend_and_rejects_unknown_names():
    import jax

    expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    assert runtime.compute_dtype("auto") == expected
    with pytest.raises(ValueError, match=r"config.model.dtype='fp32'.*auto, float32, bfloat16"):
        runtime.compute_dtype("fp32")
    # XLA's CPU matmuls have no float16: said before a run starts, not in its first step.
    with pytest.raises(ValueError, match="'float16' does not run on a CPU"):
        runtime.compute_dtype("float16", "cpu")


def test_compiler_options_follow_the_resolved_dtype():
    import jax

    auto = runtime.compiler_options("auto")
    assert auto == runtime.compiler_options(runtime.compute_dtype("auto"))
    assert (auto is not None) == (jax.default_backend() == "cpu")  # float32 on a CPU
    assert runtime.compiler_options("bfloat16") is None


def test_content_forward_options_take_onednn_or_else_the_plain_options(monkeypatch):
    plain = runtime.compiler_options("float32")
    runtime.compiler_options.cache_clear()
    content = runtime.compiler_options("float32", content_forward=True)
    # All of them where this jaxlib has the oneDNN option (jaxlib 0.10 does).
    assert content in (runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS, plain)
    assert runtime.compiler_options("bfloat16", content_forward=True) is None
    # A jaxlib without the oneDNN option: the products stay YNNPACK's.
    without = {**runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS, "xla_cpu_use_onednn": "no"}
    monkeypatch.setattr(runtime, "CONTENT_FORWARD_CPU_COMPILER_OPTIONS", without)
    runtime.compiler_options.cache_clear()
    try:
        assert runtime.compiler_options("float32", content_forward=True) == plain
    finally:
        runtime.compiler_options.cache_clear()


# Runs a jitted program with a 96 MiB temporary buffer (above glibc's 64 MiB per-thread
# heaps) a few times, inline or on JAX's worker threads, and reports the page faults of
# a run once the heap has settled (its first runs still grow it): the median of 7 runs,
# since now and then one inline run also faults in the whole block (seen in 1 run of
# 10 to 30, half of its pages touched first by XLA's intra-op threads).
INLINE_SCRIPT = """
import json, resource, sys
import jax, jax.numpy as jnp
from mmrec_jax import runtime

runtime.tune_host_allocator()
inline = runtime.run_cpu_computations_inline() if sys.argv[1] == "inline" else None

@jax.jit
def step(x, v):
    # (1024, 64, 384) float32: 96 MiB, kept whole by the barrier
    h = jax.lax.optimization_barrier(jnp.sin(x[:, :, None] * v))
    return x + 1e-3 * (h.sum(-1) - h.max(-1))

x, v = jnp.linspace(0, 1, 1024 * 64).reshape(1024, 64), jnp.linspace(0, 1, 384)
temporaries = step.lower(x, v).compile().memory_analysis().temp_size_in_bytes
for _ in range(5):
    x = jax.block_until_ready(step(x, v))
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = jax.block_until_ready(step(x, v))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({
    "inline": inline,
    "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch"),
    "faults_per_run": sorted(faults)[len(faults) // 2],  # the median
    "temporary_pages": temporaries // resource.getpagesize(),
    "result": [float(x.sum()), float(x[17, 5])],
}))
"""


def _run_inline_script(tmp_path, mode: str) -> dict:
    script = tmp_path / "inline.py"
    script.write_text(INLINE_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("GLIBC_TUNABLES", None)  # 4 KiB pages: every page of a fresh buffer faults
    env["XLA_FLAGS"] = xla_flags(1)
    result = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_inline_computations_reuse_their_temporary_buffer(tmp_path):
    inline = _run_inline_script(tmp_path, "inline")
    threaded = _run_inline_script(tmp_path, "threaded")
    assert inline["inline"] is True and inline["async_dispatch"] is False
    assert threaded["inline"] is None and threaded["async_dispatch"] is True
    assert inline["temporary_pages"] * os.sysconf("SC_PAGE_SIZE") >= 96 * 2**20
    # The same program computes the same numbers either way.
    assert inline["result"] == threaded["result"]
    if runtime._glibc_version() is not None:
        # On JAX's worker threads glibc maps the block afresh on every run, so each run
        # faults in every page of it; run inline it comes from the kept main heap.
        assert threaded["faults_per_run"] > 0.5 * threaded["temporary_pages"]
        assert inline["faults_per_run"] < 0.25 * inline["temporary_pages"]


def test_inline_setting_is_refused_once_the_backends_exist():
    import jax

    jax.devices()  # this process's backends exist from here on
    before = jax.config.read("jax_cpu_enable_async_dispatch")
    assert runtime.run_cpu_computations_inline() is False
    assert jax.config.read("jax_cpu_enable_async_dispatch") == before


@pytest.mark.parametrize("mode, inline", [("finetune", True), ("frozen", False)])
def test_train_py_runs_fine_tuning_inline_before_training(monkeypatch, tmp_path, mode, inline):
    import argparse
    import importlib.util

    from mmrec_jax import train
    from mmrec_jax.config import load_config

    config = load_config(str(ROOT / "configs/tiny.py"))
    config.model.text.mode = mode
    calls = []
    monkeypatch.setattr(runtime, "tune_host_allocator", lambda: calls.append("allocator"))
    monkeypatch.setattr(runtime, "run_cpu_computations_inline", lambda: calls.append("inline"))
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: calls.append("train"))
    spec = importlib.util.spec_from_file_location("train_entry_point", ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry._train(argparse.ArgumentParser(), argparse.Namespace(workdir=str(tmp_path)), config)
    assert calls == (["allocator", "inline", "train"] if inline else ["allocator", "train"])


def test_only_runs_that_fine_tune_their_text_run_inline():
    from mmrec_jax import train_step
    from mmrec_jax.config import load_config

    config = load_config(str(ROOT / "configs/seed.py"))
    assert train_step.runs_inline(config)  # BERT fine-tuned
    config.model.towers = "image,audio,id"
    assert not train_step.runs_inline(config)  # no text tower at all
    assert not train_step.runs_inline(load_config(str(ROOT / "configs/default.py")))  # cached text


@pytest.mark.parametrize(
    "jaxlib_version, devices, xla_flags, hangs",
    [
        ("0.11.2", 8, "", True),
        ("0.11.0", 2, "--xla_force_host_platform_device_count=2", True),
        ("0.11.2", 1, "", False),  # one device: no two FFTs at once
        ("0.11.2", 8, "--xla_cpu_multi_thread_eigen=false", False),  # the fix
        ("0.10.2", 8, "", False),
        ("0.12.0.1", 8, "", False),
    ],
)
def test_fft_deadlock_is_foreseen_for_jaxlib_0_11_on_several_cpu_devices(
    monkeypatch, jaxlib_version, devices, xla_flags, hangs
):
    import jax  # before the version is patched: importing JAX checks it
    import jaxlib.version

    assert jax.default_backend() == "cpu"

    monkeypatch.setattr(jaxlib.version, "__version__", jaxlib_version)
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    assert runtime.fft_can_deadlock(devices) is hangs


def test_a_log_mel_run_that_would_hang_stops_with_the_fixes(monkeypatch):
    import jax
    import jaxlib.version

    from mmrec_jax import schema, sharding, train_step
    from mmrec_jax.config import ConfigError, load_config
    from mmrec_jax.models import recommender

    several = sharding.make_mesh(jax.devices()[:2])  # the suite's virtual CPU devices
    one = sharding.make_mesh(jax.devices()[:1])
    monkeypatch.setattr(jaxlib.version, "__version__", "0.11.2")
    monkeypatch.setenv("XLA_FLAGS", "")
    config = load_config(str(ROOT / "configs/tiny.py"))
    assert config.model.audio.frontend == "logmel"
    with pytest.raises(ConfigError) as info:
        train_step.check_no_fft_deadlock(config, several)
    message = str(info.value)
    assert "jaxlib 0.11.2" in message and "2 here" in message
    assert "Add --xla_cpu_multi_thread_eigen=false to XLA_FLAGS" in message
    assert "--config.model.audio.frontend=raw" in message
    # The train state (training, and evaluation and export restoring a run) checks it too.
    model = recommender.build_model(config.model)
    with pytest.raises(ConfigError, match="hangs for good"):
        train_step.build_train_state(
            config, model, several, schema.example_batch(config), 1, abstract=True
        )
    train_step.check_no_fft_deadlock(config, one)
    config.model.audio.frontend = "raw"  # no FFT
    train_step.check_no_fft_deadlock(config, several)


@pytest.mark.parametrize(
    "mode, tune_allocator, inline, calls",
    [
        ("finetune", True, True, ["allocator", "inline"]),
        ("frozen", True, True, ["allocator"]),  # runs_inline: only fine-tuning
        ("finetune", False, True, ["inline"]),
        ("finetune", True, False, ["allocator"]),
    ],
)
def test_set_up_cpu_host_applies_what_the_run_and_the_caller_ask(
    monkeypatch, mode, tune_allocator, inline, calls
):
    from mmrec_jax import train_step
    from mmrec_jax.config import load_config

    config = load_config(str(ROOT / "configs/seed.py"))
    config.model.text.mode = mode
    made = []
    monkeypatch.setattr(runtime, "tune_host_allocator", lambda: made.append("allocator") or True)
    monkeypatch.setattr(
        runtime, "run_cpu_computations_inline", lambda: made.append("inline") or True
    )
    applied = train_step.set_up_cpu_host(config, tune_allocator=tune_allocator, inline=inline)
    assert made == calls
    assert applied == ("allocator" in calls, "inline" in calls)


@pytest.mark.parametrize(
    "version,affected",
    [("0.10.1", False), ("0.10.2", True), ("0.10.2.dev20260601", True), ("0.11.0", True)]
    + [("0.11.1", False), ("0.11.2", False), ("0.12.0.1", False), ("nightly", False)],
)
def test_gpu_atomics_are_cas_loops_in_jaxlib_0_10_2_to_0_11_0(version, affected):
    assert runtime.gpu_atomics_are_cas_loops(version) is affected


@pytest.mark.parametrize(
    "flags,expected",
    [
        ("", "--xla_backend_extra_options=-opt"),
        ("--xla_foo=1", "--xla_foo=1 --xla_backend_extra_options=-opt"),
        ("--xla_backend_extra_options=a=1 --x", "--xla_backend_extra_options=a=1,-opt --x"),
        ("--xla_backend_extra_options=", "--xla_backend_extra_options=-opt"),
        ("--xla_backend_extra_options=-opt,b", "--xla_backend_extra_options=-opt,b"),
    ],
)
def test_a_backend_option_joins_the_users_xla_flags(flags, expected):
    assert runtime.with_backend_option(flags, "-opt") == expected


def test_native_gpu_atomics_are_asked_for_only_where_jaxlib_needs_them(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.setattr(runtime, "_backends_initialized", lambda: False)
    monkeypatch.setattr(runtime, "_cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(runtime, "gpu_atomics_are_cas_loops", lambda: False)
    assert runtime.use_native_gpu_atomics() is False
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1"
    monkeypatch.setattr(runtime, "gpu_atomics_are_cas_loops", lambda: True)
    monkeypatch.setattr(runtime, "_cuda_plugin_installed", lambda: False)  # a CPU-only JAX
    assert runtime.use_native_gpu_atomics() is False
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1"
    monkeypatch.setattr(runtime, "_cuda_plugin_installed", lambda: True)
    assert runtime.use_native_gpu_atomics() is True
    want = f"--xla_foo=1 --xla_backend_extra_options={runtime.NATIVE_GPU_ATOMICS_OPTION}"
    assert os.environ["XLA_FLAGS"] == want
    assert runtime.use_native_gpu_atomics() is True  # already there: unchanged
    assert os.environ["XLA_FLAGS"] == want
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.setattr(runtime, "_backends_initialized", lambda: True)
    with pytest.warns(UserWarning, match="XLA_FLAGS='--xla_backend_extra_options=-nvptx"):
        assert runtime.use_native_gpu_atomics() is False
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1"
