"""Orbax checkpoints: round trip, best/latest retention, damaged and half-written ones."""

import logging
import shutil
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import checkpoint, files, sharding
from mmrec_jax.checkpoint import Checkpointer, CheckpointError, abstract_like


def _state(mesh, value):
    def init():
        return {
            "params": {"w": jnp.full((16, 8), value, jnp.float32), "b": jnp.arange(8.0)},
            "step": jnp.asarray(int(value), jnp.int32),
        }

    state, _ = sharding.create_sharded(init, mesh, True)
    return state


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=2)
    state = _state(mesh, 3.0)
    checkpointer.save(3, state, {"epoch": 1, "index": 7}, {"config": "x"})
    checkpointer.wait()
    step, restored, data_state, meta, damaged = checkpointer.restore_latest_good(
        abstract_like(state)
    )
    checkpointer.close()
    assert not damaged
    assert step == 3 and data_state == {"epoch": 1, "index": 7} and meta == {"config": "x"}
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding


def _slice_compilations_while_saving(tmp_path, rows: int) -> int:
    """Compilations of Orbax's per-device slicing while saving a small replicated array."""
    mesh = sharding.make_mesh()
    state = {"w": jax.device_put(np.ones((rows, 8), np.float32), sharding.replicated(mesh))}
    compiled = []

    def record(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        checkpointer = Checkpointer(tmp_path, async_save=False)
        checkpointer.save(1, state, {}, {})
        checkpointer.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert checkpointer.all_steps() == [1]
    return sum("slice" in str(name) for name in compiled)


def test_small_replicated_arrays_are_saved_whole_without_slicing_per_device(tmp_path, monkeypatch):
    # Each test uses its own array shape: a compiled slice is reused within the process.
    assert _slice_compilations_while_saving(tmp_path / "threshold", rows=24) == 0
    # Orbax's default (no threshold) slices the array on each of the 8 devices.
    monkeypatch.setattr(checkpoint, "MIN_REPLICA_SLICE_BYTES", None)
    assert _slice_compilations_while_saving(tmp_path / "default", rows=40) == 8


def test_saving_without_metrics_does_not_warn(tmp_path, caplog):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
    with caplog.at_level(logging.DEBUG):
        checkpointer.save(0, _state(mesh, 0.0), {}, {})
        checkpointer.save(1, _state(mesh, 1.0), {}, {}, {"validation_auc": 0.5})
    checkpointer.close()
    assert checkpointer.all_steps() == [0, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings


def test_keeps_latest_and_best(tmp_path):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
    aucs = {1: 0.6, 2: 0.9, 3: 0.7, 4: 0.65, 5: 0.66}
    for step, auc in aucs.items():
        checkpointer.save(step, _state(mesh, step), {}, {}, {"validation_auc": auc})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 5]
    assert checkpointer.best_step() == 2
    checkpointer.close()


def test_damaged_latest_falls_back_to_previous(tmp_path, capsys):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(mesh, step), {"step": step}, {})
    checkpointer.close()
    # Damage the newest checkpoint's array data.
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    step, restored, data_state, _, damaged = checkpointer.restore_latest_good(
        abstract_like(_state(mesh, 0.0))
    )
    assert step == 1 and data_state == {"step": 1} and damaged == [2]
    assert float(restored["params"]["w"][0, 0]) == 1.0
    assert "damaged" in capsys.readouterr().out
    # Set aside (not deleted), the step can be saved again.
    moved = checkpointer.set_aside(damaged)
    checkpointer.reload()
    assert moved == {2: tmp_path / "checkpoints_damaged" / "2"}
    assert (moved[2] / "state").is_dir() and checkpointer.all_steps() == [1]
    assert checkpointer.set_aside([2]) == {}  # already moved (by another process)
    checkpointer.save(2, _state(mesh, 2.0), {"step": 2}, {})
    step, restored, _, _, damaged = checkpointer.restore_latest_good(
        abstract_like(_state(mesh, 0.0))
    )
    checkpointer.close()
    assert step == 2 and not damaged and float(restored["params"]["w"][0, 0]) == 2.0


def _step_1_and_a_temporary_step_2(tmp_path, mesh):
    """Checkpoint 1, and Orbax's temporary folder for step 2: what a save in progress (or
    a process killed mid-save) leaves."""
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    checkpointer.save(1, _state(mesh, 1.0), {}, {})
    checkpointer.close()
    temporary = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "checkpoints" / "1", temporary)
    return temporary


def test_a_failed_restore_quiets_only_its_own_echoes_and_only_once(tmp_path, monkeypatch):
    mesh = sharding.make_mesh()
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(mesh, step), {}, {})
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
    for _ in range(2):  # two restores that fall back: one filter, not two
        assert checkpointer.restore_latest_good(abstract_like(_state(mesh, 0.0)))[0] == 1
    checkpointer.close()
    hook = sys.unraisablehook
    assert hook.previous == seen.append  # the hook before, wrapped once
    echo = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(echo)
    hook(other)
    assert seen == [other]


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path, caplog):
    mesh = sharding.make_mesh()
    in_progress = _step_1_and_a_temporary_step_2(tmp_path, mesh)
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1] and in_progress.is_dir()
    restored, _, _ = reader.restore(1, abstract_like(_state(mesh, 0.0)))
    reader.close()
    assert float(restored["params"]["w"][0, 0]) == 1.0 and in_progress.is_dir()
    assert Checkpointer(tmp_path / "no_run", read_only=True).all_steps() == []
    assert not (tmp_path / "no_run").exists()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_half_written_checkpoint_is_never_taken(tmp_path):
    mesh = sharding.make_mesh()
    _step_1_and_a_temporary_step_2(tmp_path, mesh)
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    assert checkpointer.all_steps() == [1]
    checkpointer.close()


def test_nothing_restorable_is_an_error(tmp_path):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    checkpointer.save(1, _state(mesh, 1.0), {}, {})
    checkpointer.close()
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    with pytest.raises(CheckpointError, match="could be restored"):
        checkpointer.restore_latest_good(abstract_like(_state(mesh, 0.0)))


def test_fsdp_shards_large_arrays_only():
    mesh = sharding.make_mesh()
    abstract = {
        "big": jax.ShapeDtypeStruct((1024, 64), jnp.float32),
        "odd": jax.ShapeDtypeStruct((1023, 33), jnp.float32),
        "small": jax.ShapeDtypeStruct((8,), jnp.float32),
    }
    shardings = sharding.state_shardings(mesh, abstract, fsdp=True)
    assert shardings["big"].spec == jax.sharding.PartitionSpec("data", None)
    assert shardings["odd"].spec == jax.sharding.PartitionSpec()
    assert shardings["small"].spec == jax.sharding.PartitionSpec()
    replicated = sharding.state_shardings(mesh, abstract, fsdp=False)
    assert replicated["big"].spec == jax.sharding.PartitionSpec()


def test_sharding_helpers_name_a_mesh_without_a_data_axis_and_an_indivisible_field():
    other = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    abstract = {"w": jax.ShapeDtypeStruct((1024, 64), jnp.float32)}
    with pytest.raises(ValueError, match=r"axes \('batch',\); .* an axis named 'data'"):
        sharding.state_shardings(other, abstract, fsdp=True)
    mesh = sharding.make_mesh()  # 8 devices
    batch = {"label": np.ones(16, np.float32), "items": {"audio": np.zeros((12, 5), np.float32)}}
    with pytest.raises(ValueError, match=r"'items.audio' has shape \(12, 5\): .* 8 device"):
        sharding.global_batch(mesh, batch)
    batch["items"]["audio"] = np.arange(80, dtype=np.float32).reshape(16, 5)
    placed = sharding.global_batch(mesh, batch)
    np.testing.assert_array_equal(placed["items"]["audio"], batch["items"]["audio"])
    assert placed["label"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_a_failed_save_names_the_intact_checkpoints(tmp_path, monkeypatch):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
    checkpointer.save(1, _state(mesh, 1.0), {}, {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer.manager, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        checkpointer.save(2, _state(mesh, 2.0), {}, {})
    message = str(info.value)
    assert "Saving checkpoint step 2" in message and "No space left on device" in message
    assert "steps [1]) are intact" in message and "rerun the same command" in message
    # An asynchronous save's failure surfaces later, from the next save or from wait (and
    # close), and is reported as that save's.
    monkeypatch.undo()
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(3, _state(mesh, 3.0), {}, {})
    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", disk_full)
    with pytest.raises(CheckpointError, match="Saving checkpoint step 3 .* No space left"):
        checkpointer.save(4, _state(mesh, 4.0), {}, {})
    with pytest.raises(CheckpointError, match="Saving a checkpoint in .* No space left"):
        checkpointer.close()  # nothing in flight any more: no step to name


def test_orbax_storage_errors_are_logged_in_one_line(caplog):
    # Orbax logs a failed write from each of its background threads with a ~50-line
    # traceback; the CheckpointError raised afterwards names the cause, so one line each.
    import orbax.checkpoint

    orbax_file = str(Path(orbax.checkpoint.__file__).parent / "_src" / "futures" / "future.py")
    logger = logging.getLogger("absl")

    def log(error, pathname=orbax_file):
        try:
            raise error
        except type(error):
            record = logging.LogRecord(
                "absl", logging.ERROR, pathname, 1, "write failed", None, sys.exc_info()
            )
        logger.handle(record)
        return caplog.records[-1]

    with caplog.at_level(logging.ERROR, logger="absl"):
        disk_full = log(OSError(28, "No space left on device"))
        assert disk_full.exc_info is None and disk_full.getMessage() == "write failed"
        assert "Traceback" not in caplog.text
        # Other failures, and other libraries' records, keep their tracebacks.
        assert log(ValueError("a bug")).exc_info is not None
        assert log(OSError(28, "No space left"), pathname=__file__).exc_info is not None


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_at_once(tmp_path, monkeypatch):
    # Otherwise the first save fails inside Orbax's background threads, which keep the
    # process from exiting for minutes.
    Checkpointer(tmp_path / "fine").close()
    assert list((tmp_path / "fine" / "checkpoints").iterdir()) == []  # the probe is gone
    real_open = files.os.open

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path / "run" / "checkpoints":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", read_only)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path / "run")
    assert str(info.value) == (
        f"Cannot write checkpoints in {tmp_path / 'run' / 'checkpoints'} (Permission "
        "denied). Make the folder writable, or pass another --workdir."
    )
    Checkpointer(tmp_path / "run", read_only=True).close()  # reading needs no writing


def test_a_save_abandoned_by_a_second_signal_is_not_logged_as_a_failure(caplog):
    from mmrec_jax import cli

    absl = logging.getLogger("absl")
    for error in (cli.ExitNow(130), KeyboardInterrupt(), RuntimeError("disk on fire")):
        try:
            raise error
        except BaseException:  # as Orbax logs a failed wait for its save thread
            absl.error("Save Finalize thread failed (%s).", type(error).__name__, exc_info=True)
    assert "failed (ExitNow)" not in caplog.text and "failed (KeyboardInterrupt)" not in caplog.text
    assert "failed (RuntimeError)" in caplog.text  # real failures are still reported


def test_a_reader_names_a_checkpoint_that_fails_even_without_a_message(tmp_path, monkeypatch):
    mesh = sharding.make_mesh()
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(mesh, step), {"step": step}, {})

    def failing(self, step, abstract_state):
        raise AssertionError()  # as some library checks fail: no message at all

    monkeypatch.setattr(Checkpointer, "restore", failing)
    with pytest.raises(
        CheckpointError, match=r"2 cannot be restored \(AssertionError: .*steps \[1\]"
    ):
        checkpointer.restore_or_explain(2, abstract_like(_state(mesh, 0.0)))
    checkpointer.close()
