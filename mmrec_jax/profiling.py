"""Traces a window of training steps with `jax.profiler`, to see where a step's time goes.

`StepTrace` starts the profiler just before a chosen step and stops it once a given
number of steps have finished, so the trace holds those steps whole: the train loop
waits for the steps already dispatched before it starts, and for the last traced step
before it stops. `jax.profiler` writes into `log_dir/plugins/profile/<date_time>/`:
`<host>.xplane.pb` for XProf (`pip install xprof`, then `xprof --logdir LOG_DIR`: the
trace viewer, per-op statistics, memory; TensorBoard's profile tab is the same tool) and
`<host>.trace.json.gz`, a Chrome trace that https://ui.perfetto.dev opens as it is. On a
CPU its events are the XLA operations of each step (fusions, dots, convolutions) on the
threads that ran them; on a GPU or TPU, the kernels on each device. The train loop marks
each step's dispatch with `jax.profiler.StepTraceAnnotation("train", step_num=n)`, which
XProf uses for its step-time breakdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_TRACE_FOLDER = Path("plugins") / "profile"


def newest_trace(log_dir: str | Path) -> Path | None:
    """The newest trace folder `jax.profiler` wrote under `log_dir`, or None if there is none."""
    folders = sorted(p for p in (Path(log_dir) / _TRACE_FOLDER).glob("*") if p.is_dir())
    return folders[-1] if folders else None


def how_to_view(folder: Path) -> str:
    """One line telling where a trace folder is and how to open it."""
    log_dir = folder.parent.parent.parent
    return (
        f"Profile trace in {folder}: view it with `xprof --logdir {log_dir}` (pip install "
        "xprof) or open its .trace.json.gz in https://ui.perfetto.dev."
    )


class StepTrace:
    """Traces steps `first_step` to `first_step + num_steps - 1` of a training loop.

    Steps are numbered from 1: `before_step(n, ...)` is called just before step n is
    dispatched, `after_step(...)` just after it, and `close()` when the loop ends
    (normally or not): it stops a trace the loop did not finish, or says that the loop
    ended before the first traced step.

    Args:
      log_dir: folder the trace goes under (`plugins/profile/<date_time>/`).
      first_step: the first step traced (leave the compiling step out of it).
      num_steps: how many steps to trace; 0 traces nothing.
      enabled: False on processes that do not trace.
      report: prints a line (say, a progress bar's `write`).
    """

    def __init__(
        self,
        log_dir: str | Path,
        first_step: int,
        num_steps: int,
        enabled: bool = True,
        report: Callable[[str], None] = print,
    ):
        self.log_dir = Path(log_dir)
        self.first_step = first_step
        self.num_steps = num_steps
        self.enabled = enabled and num_steps > 0
        self.report = report
        self.active = False
        self.traced = 0

    def before_step(self, step: int, previous_outputs: Any) -> None:
        """Starts tracing before `first_step`, once `previous_outputs` are computed."""
        if self.enabled and step == self.first_step:
            jax.block_until_ready(previous_outputs)
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True

    def after_step(self, outputs: Any) -> None:
        """Counts a traced step; after the last one, waits for its `outputs` and stops."""
        if not self.active:
            return
        self.traced += 1
        if self.traced == self.num_steps:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops the trace if it is running and says where it went."""
        if self.active:
            self.active = False
            self.enabled = False
            jax.profiler.stop_trace()
            last = self.first_step + self.traced - 1
            self.report(
                f"Traced steps {self.first_step}-{last}. {how_to_view(newest_trace(self.log_dir))}"
            )
        elif self.enabled and self.traced == 0:
            self.enabled = False
            self.report(
                f"Nothing was profiled: the run ended before step {self.first_step}, the "
                "first one traced (the steps before it compile and warm up)."
            )
