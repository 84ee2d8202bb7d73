"""Orbax checkpoints of the train state plus the data iterator, with safe fallbacks.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `state` is the pytree
(params, opt_state, step, rng), `data` the input position as JSON (`{"rows": N}`, the
training rows consumed, so a resumed run sees exactly the next batch, and the step
metrics summed since the last logging step, so it logs the same means), `meta` the run
config, the early-stopping record and metrics as JSON.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
process killed mid-save leaves no folder that looks finished. A finished checkpoint that
later fails to restore (a damaged disk, a deleted file) is reported and the previous one
is tried; the training run then moves the damaged folder to `WORKDIR/checkpoints_damaged/`
(kept for inspection), so that the step can be trained and saved again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mmrec_jax import files, runtime, sharding

# The validation metric that picks the best checkpoint (higher is better).
BEST_METRIC = "validation_auc"

# Orbax can split the saving of a replicated array over its replicas: each device slices
# out its part (a small program per array shape and device, compiled at the first save,
# then one dispatch per slice at every save). That pays off for large arrays only; an
# array whose part would be smaller than this is saved whole by one replica.
MIN_REPLICA_SLICE_BYTES = 16 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the train state: Orbax's PyTree handler, splitting the save of a
    replicated array over its replicas only where each part has `MIN_REPLICA_SLICE_BYTES`
    or more.

    Its checkpoints restore with Orbax's standard handler and the other way round. They
    lack that handler's per-array metadata sidecar (`array_metadatas/`: write shapes and
    the implementation of typed PRNG keys; the state holds the rng as raw key data),
    which Orbax builds only through a private module.
    """
    array_handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, array_handler),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
        (bytes, ocp.type_handlers.ScalarHandler()),
        (str, ocp.type_handlers.StringHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class _ExpectedOrbaxWarningsFilter(logging.Filter):
    """Drops Orbax's warnings about what this module does on purpose.

    Checkpoints made between evaluations (the step-0 one, those on a signal or at the
    end) carry no validation metrics by design; `BestN` simply does not rank them. A
    read-only checkpointer (evaluation, export) is read-only by design.
    """

    EXPECTED = (
        "did not provide metrics",
        "read_only=True, setting save_interval_steps=0",
        "Given directory is read only",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(expected in message for expected in self.EXPECTED)


class _OneLineOrbaxStorageErrors(logging.Filter):
    """Logs Orbax's reports of a failed file operation (a full disk, a read-only folder)
    as one line each, without the traceback.

    Orbax logs such a failure from each of its background threads with a traceback of
    ~50 lines; `Checkpointer` raises it again as a `CheckpointError` that names the step,
    the cause and the checkpoints still intact. Failures of other kinds keep their
    tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError) and "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


class _AbandonedSavesFilter(logging.Filter):
    """Drops Orbax's report of a wait for a save that the user stopped on purpose.

    A second Ctrl-C or SIGTERM (`cli.ExitNow`, or an interrupt) that lands while the
    training process waits for a save makes Orbax log the interrupted wait as a failed
    save thread, with a traceback; the run has already said it stops without saving.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (SystemExit, KeyboardInterrupt))


_ABSL_LOGGER = logging.getLogger("absl")
for _filter in (_ExpectedOrbaxWarningsFilter, _OneLineOrbaxStorageErrors, _AbandonedSavesFilter):
    if not any(isinstance(f, _filter) for f in _ABSL_LOGGER.filters):
        _ABSL_LOGGER.addFilter(_filter())


# How Orbax begins the message of an array that failed to read.
READ_ERROR = "Encountered error while reading array index"


class _QuietFailedRestore:
    """`sys.unraisablehook` that drops the echoes of a failed restore.

    When one array of a checkpoint fails to read, Orbax closes its event loop while
    TensorStore still completes the reads of the other arrays; each completion then
    reports "RuntimeError: Event loop is closed" with a traceback (hundreds of lines for
    one damaged checkpoint), and each read abandoned mid-way reports its own failure when
    its coroutine is collected. Other unraisable errors go to the previous hook.
    """

    ECHOES = ("Event loop is closed", READ_ERROR)

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if str(unraisable.exc_value).startswith(self.ECHOES):
            return
        self.previous(unraisable)


class CheckpointError(RuntimeError):
    """No checkpoint could be restored, or one could not be saved."""


class Checkpointer:
    """Saves and restores train state; keeps the last `keep` checkpoints and the best.

    Args:
      workdir: the run folder; checkpoints go to `workdir/checkpoints`.
      keep: how many of the latest checkpoints to keep (the best is kept besides).
      async_save: write in a background thread while training continues.
      read_only: only restore (evaluation, export): nothing is created, saved or deleted,
        so reading a run that is still training cannot disturb the save in progress.
    """

    def __init__(
        self, workdir: str | Path, keep: int = 2, async_save: bool = True, read_only: bool = False
    ):
        self.workdir = Path(workdir).resolve()
        self.directory = self.workdir / "checkpoints"
        self.read_only = read_only
        self._in_flight: int | None = None  # the step of an asynchronous save not yet waited for
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=max(keep, 1)),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Makes Orbax store each checkpoint's metrics beside it (best_step reads them).
            best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode="max",
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            # Removes the temporary folders of saves that a killed process left behind.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": _state_handler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        if not read_only:
            self._check_writable()

    def _check_writable(self) -> None:
        """Raises CheckpointError now if no checkpoint can be written in the folder.

        Without this, the first save fails in Orbax's background threads, which then
        keep the process from exiting for minutes while they wait for the step folder.
        Every process learns whether any of them failed, so all raise together.
        """
        problem = sharding.shared_problem(
            files.unwritable_reason(self.directory),
            "process {process} cannot write there; see its error",
        )
        if problem is not None:
            self.manager.close()
            raise CheckpointError(
                f"Cannot write checkpoints in {self.directory} ({problem}). Make the folder "
                "writable, or pass another --workdir."
            )

    @classmethod
    def has_checkpoints(cls, workdir: str | Path) -> bool:
        """Whether `workdir` holds a finished checkpoint (read without changing anything)."""
        if not (Path(workdir) / "checkpoints").is_dir():
            return False
        reader = cls(workdir, read_only=True)
        try:
            return bool(reader.all_steps())
        finally:
            reader.close()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best validation AUC, or None before any evaluation."""
        best, best_value = None, -math.inf
        for step in self.all_steps():
            value = (self.manager.metrics(step) or {}).get(BEST_METRIC)
            if value is not None and value > best_value:
                best, best_value = step, value
        return best

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts saving a checkpoint (asynchronously unless disabled).

        Args:
          step: the step the state has reached.
          state: the train state pytree.
          data_state: the input position, JSON-serialisable (e.g. {"rows": N}).
          meta: JSON metadata (the run config, the dataset's name ...).
          metrics: validation metrics of this state, if it was just evaluated;
            `BEST_METRIC` among them makes it a candidate for the best checkpoint.
        """
        if metrics is not None and not all(math.isfinite(v) for v in metrics.values()):
            raise ValueError(f"Refusing to save non-finite metrics at step {step}: {metrics}")
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        self.wait()  # a failure of the save before this one is reported as that save's
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except jax.errors.JaxRuntimeError:
            raise  # device errors (out of memory) are the caller's to explain
        except Exception as error:  # noqa: BLE001 - Orbax raises a save's failure as it is
            raise self._save_failed(step, error) from error
        self._in_flight = step

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        """The error for a save that failed (a full or read-only disk), naming what is safe.

        Orbax writes into a temporary folder and renames it when complete: the failed save
        never looks finished, and the checkpoints finished before it are intact.
        """
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        steps = self.all_steps()
        intact = (
            f"The checkpoints finished before it (steps {steps}) are intact"
            if steps
            else "No checkpoint was finished before it"
        )
        cause = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return CheckpointError(
            f"Saving {what} in {self.directory} failed: {type(error).__name__}: {cause}. "
            f"{intact}. Fix the cause (free disk space, write permission) and rerun the "
            "same command: it resumes from the newest intact checkpoint."
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores one checkpoint into the shapes and shardings of `abstract_state`.

        Returns:
          (state, data_state, meta).
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                ),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def _restore_everywhere(
        self, step: int, abstract_state: Any
    ) -> tuple[tuple[Any, dict, dict] | None, str | None, list[int]]:
        """`restore` on every process, which agree on the outcome.

        Each process reads its own shards, so a checkpoint counts as read only where
        every process read it. The echoes of a failed read are dropped
        (`_QuietFailedRestore`, kept installed after a failure: they may arrive later).
        Running out of device memory is raised as it is: it says nothing about the files.

        Returns:
          (restored, problem, failed): `restore`'s result (None where this process failed),
          this process's failure described in one line (None if it read its part), and the
          processes that failed (empty: the checkpoint restored everywhere).
        """
        previous_hook = sys.unraisablehook
        installed = not isinstance(previous_hook, _QuietFailedRestore)
        if installed:
            sys.unraisablehook = _QuietFailedRestore(previous_hook)
        restored, problem = None, None
        try:
            restored = self.restore(step, abstract_state)
        except Exception as error:  # noqa: BLE001 -- any failure means "damaged" ...
            if runtime.is_out_of_memory(error):
                if installed:
                    sys.unraisablehook = previous_hook
                raise  # ... but memory: the state does not fit, the files are fine
            # Orbax appends TensorStore's whole spec to a failed read: it names no cause.
            problem = files.error_line(error).split(" See full TensorStore")[0]
        failed = sharding.failed_processes(problem is not None)
        if installed and not failed:
            sys.unraisablehook = previous_hook
        return restored, problem, failed

    def restore_or_explain(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """`restore`, raising a failure (other than running out of memory) as one
        `CheckpointError` that names the checkpoint and the run's other steps.

        For readers of a finished run (evaluation, export, the final report), which do
        not move damaged checkpoints aside as a resuming run does.
        """
        restored, problem, failed = self._restore_everywhere(step, abstract_state)
        if failed:
            others = [other for other in self.all_steps() if other != step]
            choose = (
                f"The run's other checkpoints are steps {others}: evaluate or export one of "
                f"them with --checkpoint STEP (--checkpoint {others[-1]}: the newest)."
                if others
                else "It is the run's only checkpoint."
            )
            problem = problem or f"process {failed[0]} could not read its part"
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} cannot be restored ({problem}); "
                f"its files may be damaged. {choose}"
            )
        return restored

    def restore_meta(self, step: int) -> dict:
        """Restores only the JSON metadata of a checkpoint (the run config)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_latest_good(
        self, abstract_state: Any, steps: list[int] | None = None
    ) -> tuple[int, Any, dict, dict, list[int]] | None:
        """Restores the newest checkpoint that restores cleanly.

        A checkpoint that fails is reported with its step and error, and the one before
        it is tried. Running out of device memory is raised as it is: it says nothing
        about the files.

        Returns:
          (step, state, data_state, meta, damaged): `damaged` lists the newer steps that
          failed to restore (see `set_aside`); None when the folder holds no checkpoint.

        Raises:
          CheckpointError: checkpoints exist but none restores.
        """
        steps = self.all_steps() if steps is None else steps
        if not steps:
            return None
        failures: list[int] = []
        is_chief = jax.process_index() == 0
        for step in reversed(steps):
            restored, problem, failed = self._restore_everywhere(step, abstract_state)
            if failed:  # a step is good only where every process restored it
                if problem is None and is_chief:
                    problem = f"process {failed[0]} could not read its part"
                if problem is not None:
                    print(
                        f"WARNING: Checkpoint {self.directory / str(step)} is damaged and was "
                        f"skipped ({problem}).",
                        flush=True,
                    )
                failures.append(step)
                continue
            if failures and is_chief:
                print(f"Resuming from the previous good checkpoint, step {step}.", flush=True)
            return step, *restored, failures
        raise CheckpointError(
            f"None of the checkpoints in {self.directory} (steps {steps}) could be restored. "
            "Move the folder away to start afresh."
        )

    def set_aside(self, steps: list[int]) -> dict[int, Path]:
        """Moves damaged checkpoints to `WORKDIR/checkpoints_damaged/<step>`.

        Nothing is deleted; the steps can then be saved again. Call it on one process
        (the files are shared), then `reload` on every process.

        Returns:
          {step: where it went} for the checkpoints moved.
        """
        moved = {}
        for step in steps:
            if not (self.directory / str(step)).exists():
                continue  # another process or person moved it already
            target = files.free_path(self.workdir / "checkpoints_damaged" / str(step))
            target.parent.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(target)
            moved[step] = target
        return moved

    def reload(self) -> None:
        """Rereads which checkpoints exist (after `set_aside`, on every process)."""
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until any asynchronous save has been written and committed.

        Raises:
          CheckpointError: the save in flight failed.
        """
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except jax.errors.JaxRuntimeError:
            raise
        except Exception as error:  # noqa: BLE001 - Orbax raises a save's failure as it is
            raise self._save_failed(step, error) from error

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        try:
            self.wait()
        except CheckpointError:
            with contextlib.suppress(Exception):  # it would raise the same failure again
                self.manager.close()
            raise
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) describing a state pytree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )
