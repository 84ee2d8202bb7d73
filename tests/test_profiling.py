"""Tracing a window of training steps with jax.profiler."""

import jax
import jax.numpy as jnp
from _profile_trace import traced_steps

from mmrec_jax import profiling


def _loop(trace: profiling.StepTrace, num_steps: int) -> jax.Array:
    """A training-like loop of `num_steps` jitted steps, each annotated as the train loop does."""
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
    state = jnp.eye(32)
    try:
        for step in range(1, num_steps + 1):
            trace.before_step(step, state)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state = step_fn(state)
            trace.after_step(state)
    finally:
        trace.close()
    return state


def test_traces_exactly_the_requested_steps(tmp_path):
    lines = []
    _loop(profiling.StepTrace(tmp_path, first_step=3, num_steps=2, report=lines.append), 6)
    assert traced_steps(tmp_path) == [3, 4]
    folder = profiling.newest_trace(tmp_path)
    assert list(folder.glob("*.xplane.pb"))
    assert len(lines) == 1 and "Traced steps 3-4" in lines[0] and str(folder) in lines[0]


def test_a_loop_that_ends_inside_the_window_stops_the_trace(tmp_path):
    lines = []
    _loop(profiling.StepTrace(tmp_path, first_step=2, num_steps=10, report=lines.append), 4)
    assert traced_steps(tmp_path) == [2, 3, 4]
    assert "Traced steps 2-4" in lines[0]
    # The profiler is free again: a later trace can start.
    _loop(profiling.StepTrace(tmp_path / "again", first_step=1, num_steps=1), 1)
    assert traced_steps(tmp_path / "again") == [1]


def test_a_loop_that_ends_before_the_window_says_so(tmp_path):
    lines = []
    _loop(profiling.StepTrace(tmp_path, first_step=5, num_steps=2, report=lines.append), 3)
    assert profiling.newest_trace(tmp_path) is None
    assert lines == [
        "Nothing was profiled: the run ended before step 5, the first one traced (the steps "
        "before it compile and warm up)."
    ]


def test_disabled_or_zero_steps_trace_nothing(tmp_path):
    lines = []
    _loop(profiling.StepTrace(tmp_path / "a", 1, 2, enabled=False, report=lines.append), 3)
    _loop(profiling.StepTrace(tmp_path / "b", 1, 0, report=lines.append), 3)
    assert lines == []
    assert profiling.newest_trace(tmp_path / "a") is None
    assert profiling.newest_trace(tmp_path / "b") is None
