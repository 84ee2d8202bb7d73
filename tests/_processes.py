"""Subprocesses for the tests: JAX programs on a few virtual CPU devices, and runs of two
JAX processes (`jax.distributed` over localhost, one device each)."""

from __future__ import annotations

import os
import socket
import subprocess


def xla_flags(devices: int) -> str:
    """The suite's XLA flags with `devices` virtual CPU devices instead of its 8."""
    flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: 2 CPU devices, offline, unbuffered."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=xla_flags(2),
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_two_processes(command: list[str]) -> list[subprocess.Popen]:
    """Starts `command` as processes 0 and 1 of a two-process JAX run."""
    port = _free_port()
    return [
        subprocess.Popen(
            command,
            env=subprocess_env(
                XLA_FLAGS=xla_flags(1),
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(index),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]


def finish(processes: list[subprocess.Popen], returncode: int = 0) -> list[str]:
    """Waits for the processes; checks their exit status and returns their outputs."""
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == returncode, output[-3000:]
    return outputs


def launch_two_processes(command: list[str], returncode: int = 0) -> list[str]:
    """Runs `command` as two JAX processes of one device each; returns their outputs."""
    return finish(start_two_processes(command), returncode)
