"""The training loop: `train_and_evaluate(config, workdir)`.

Builds (or opens) the dataset, creates the model and optimizer state already sharded on
the mesh, resumes from the newest good checkpoint in `workdir`, trains with one jitted
step per batch, evaluates on validation, checkpoints (the data iterator too), and at the
end reports every split beside the dataset's oracle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from mmrec_jax import checkpoint as checkpoint_lib
from mmrec_jax import (
    cli,
    evaluate,
    files,
    predict,
    profiling,
    reporting,
    runtime,
    schema,
    sharding,
    train_step,
)
from mmrec_jax.config import (
    ConfigError,
    check_values,
    config_from_dict,
    config_to_json,
    flatten,
    missing_fields,
)
from mmrec_jax.data import builder, pipeline
from mmrec_jax.files import write_atomic
from mmrec_jax.models import recommender
from mmrec_jax.models.text import cached_text_dim

# Steps dispatched ahead of the last finished one (keeps host and device busy).
_MAX_STEPS_AHEAD = 2
# Splits reported at the end, in this order, when the dataset has them.
REPORT_SPLITS = ("train", "validation", "test", "test_cold")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class OutOfMemory(RuntimeError):
    """A train step or evaluation needed more memory than a device has."""


class StorageError(RuntimeError):
    """A file of the run could not be written or read while training (a full disk, say)."""


def halved_batch_size(batch_size: int, num_devices: int) -> int:
    """Half of `batch_size` rounded down to a multiple of the devices (0: none is smaller)."""
    return batch_size // 2 // num_devices * num_devices


def _fixes_message(what: str, then: str, options: list[str]) -> str:
    """An out-of-memory message: what failed, what to do, one option per line."""
    return "\n".join([what, then, *(f"  {option}" for option in options)])


def _out_of_memory_message(
    error: Exception,
    config: ml_collections.ConfigDict,
    num_devices: int,
    step: int,
    checkpoint: str,
) -> str:
    """What ran out of memory, the overrides that use less, and whether each resumes."""
    train_cfg = config.train
    batch, accum = train_cfg.batch_size, train_cfg.grad_accum_steps
    half = halved_batch_size(batch, num_devices)
    options = []
    if not train_cfg.fsdp and num_devices > 1:
        options.append(
            f"--config.train.fsdp=True (resumes): parameters and optimizer state sharded over "
            f"the {num_devices} devices"
        )
    if config.model.dtype != "bfloat16":
        options.append("--config.model.dtype=bfloat16 (resumes): bfloat16 compute")
    if half:
        options.append(
            f"--config.train.batch_size={half} --config.train.grad_accum_steps={accum * 2} "
            "(in a new --workdir: the same effective batch, in two halves)"
        )
    if config.model.text.mode == "finetune":
        options.append(
            "--config.model.text.mode=finetune_top_n or frozen (in a new --workdir: another "
            "model): fewer trained BERT layers"
        )
    return _fixes_message(
        f"Out of memory after step {step}, in the train step or the validation pass (both "
        f"run batches of config.train.batch_size={batch}): {str(error).splitlines()[0]}",
        f"{checkpoint} To fit, rerun the same command with one of:",
        options,
    )


def _state_out_of_memory_message(
    error: Exception,
    config: ml_collections.ConfigDict,
    num_devices: int,
    checkpoints: Path | None = None,
) -> str:
    """Out of memory creating (or restoring from `checkpoints`) the train state: the
    overrides that make it smaller (and, when restoring, whether each resumes)."""
    resumes, new_run = (
        (" (resumes)", " (in a new --workdir: another model)") if checkpoints else ("", "")
    )
    options = []
    if not config.train.fsdp and num_devices > 1:
        options.append(
            f"--config.train.fsdp=True{resumes}: parameters and optimizer state sharded "
            f"over the {num_devices} devices instead of copied to each"
        )
    if config.model.text.mode != "frozen":
        options.append(
            f"--config.model.text.mode=frozen{new_run}: BERT's embeddings cached once, no "
            "BERT parameters or optimizer state in training"
        )
    options.append(f"a smaller text model{new_run}: --config.model.text.model=NAME_OR_FOLDER")
    doing, then = "creating", "Nothing was trained or saved yet. To fit, rerun with one of:"
    if checkpoints is not None:
        doing = "restoring"
        then = f"The checkpoints in {checkpoints} are intact. To fit, rerun with one of:"
    return _fixes_message(
        f"Out of memory {doing} the parameters and optimizer state on {num_devices} "
        f"device(s): {str(error).splitlines()[0]}",
        then,
        options,
    )


@dataclasses.dataclass
class _StopRequest:
    """Set by SIGTERM / SIGINT: the loop saves a checkpoint and exits.

    A second signal stops at once, without that checkpoint (a save in progress never
    leaves a checkpoint that looks finished; the previous ones are kept).
    """

    when: str = "after the current step"
    # What a second signal means for the run's other processes ("" in a one-process run).
    others: str = ""
    signum: int | None = None
    forced: bool = False

    def __call__(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if cli.in_gc_callback(frame):  # raised there, it would be dropped
                cli.deliver_later(signum)
                return
            self.forced = True
            _tell(f"\n{name} received again: stopping without saving.{self.others}")
            raise cli.ExitNow(128 + signum)  # the command ends without waiting for a save
        self.signum = signum
        _tell(
            f"\n{name} received: saving a checkpoint {self.when} (send it again to stop at "
            "once without saving)."
        )


def _os_error_text(error: OSError) -> str:
    """A failed write or read for a message: its reason, and the file where it has one."""
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _tell(message: str) -> None:
    """Prints to stderr from a signal handler: a closed pipe (`| tee` killed by the same
    Ctrl-C) must not raise in the middle of whatever the loop was doing."""
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def resolve_config(
    config: ml_collections.ConfigDict, info: Any, verbose: bool = True
) -> ml_collections.ConfigDict:
    """Fills the dataset- and platform-dependent fields of a config.

    Sets `model.num_users` / `model.num_items` from the dataset's ID vocabularies (when 0),
    drops content towers for modalities the dataset does not have, resolves
    `model.dtype = "auto"` for this platform (`runtime.compute_dtype`), so that the run's
    config.json records the dtype it trained with, and makes `data.data_dir` (and a local
    `model.text.model` folder) absolute, so that evaluation and export find the dataset
    and the text model from any working directory.

    Returns:
      A copy of `config`.

    Raises:
      ValueError: `model.dtype` names no compute dtype.
      ConfigError: `data.max_text_len` is longer than the text model's positions, or
        pooling "pooler" asks for a pooler the text model does not have.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.data_dir = str(Path(config.data.data_dir).resolve())
    model = config.model
    model.dtype = runtime.compute_dtype(model.dtype)
    if model.num_users == 0:
        model.num_users = int(info.num_users)
    if model.num_items == 0:
        model.num_items = int(info.num_items)
    text_folder = Path(model.text.model).expanduser()
    if text_folder.is_dir():  # a local folder, found from any working directory later
        model.text.model = str(text_folder.resolve())
    towers = pipeline.available_towers(model.towers, info)
    if towers != ",".join(schema.parse_towers(model.towers)) and verbose:
        print(
            f"Dataset {info.name!r} has only {', '.join(info.modalities) or 'no content'}: "
            f"training towers {towers}."
        )
    model.towers = towers
    if verbose and config.data.negatives_per_positive and not info.positives_only:
        print(
            f"Note: dataset {info.name!r} has labels, so no negatives are sampled: "
            f"config.data.negatives_per_positive={config.data.negatives_per_positive} is for "
            "positives-only data."
        )
    if "text" in schema.parse_towers(towers):
        from mmrec_jax.models.bert import load_bert_config
        from mmrec_jax.models.text import check_pooler

        bert_config = load_bert_config(model.text.model)
        check_pooler(model.text.pooling, bert_config.has_pooler)
        limit = bert_config.max_position_embeddings
        if config.data.max_text_len > limit:
            raise ConfigError(
                f"config.data.max_text_len={config.data.max_text_len} is more tokens than "
                f"the text model {model.text.model} takes ({limit}, its "
                f"max_position_embeddings): lower it to {limit} or less."
            )
    return config


def _process_index_and_count() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


# The most memory an encoded catalogue may take on each device for the training loop's
# evaluations to score from it (see `SplitScorer`).
_MAX_ENCODED_CATALOGUE_BYTES = 512 * 2**20


class SplitScorer:
    """Scores splits for the training loop's evaluations and its final report.

    Rows are scored from the encoded catalogue (every item encoded once for the
    parameters, `evaluate.encode_catalogue`, each row's items looked up in it,
    `evaluate.catalogue_rows`), as `mmrec_jax.evaluate` does, where that encodes no more
    items than the batches' own item blocks would and the encoding takes at most
    `_MAX_ENCODED_CATALOGUE_BYTES` per device; otherwise each batch encodes its own item
    block (`predict.make_predict_fn`). Both give the same values to float rounding.

    Args:
      model: the `Recommender`.
      mesh: the device mesh.
      param_shardings: the parameters' shardings.
      loader: `(split, train=False, sample=None) -> batch iterator`, e.g. a partial of
        `pipeline.make_batches` with this process's index and a shared item store.
      item_store: that `pipeline.ItemStore`.
      config: the resolved run config.
      info: the dataset's `DatasetInfo`.
    """

    def __init__(self, model, mesh, param_shardings, loader, item_store, config, info):
        self.model, self.mesh, self.loader, self.info = model, mesh, loader, info
        self.item_store, self.config = item_store, config
        self.predict_fn = predict.make_predict_fn(model, param_shardings)
        self.split_fn = evaluate.make_split_fn(model)

    def num_rows(self, split: str, sample: int | None = None) -> int:
        """Rows that scoring `split` (or a sample of it) takes."""
        examples = pipeline.num_examples(
            self.info, split, int(self.config.data.negatives_per_positive)
        )
        return examples if sample is None else min(sample, examples)

    def catalogue(self, params, rows: int) -> dict | None:
        """The encoded catalogue on the mesh for scoring `rows` rows with `params`, or None
        where the batches' own item blocks are the cheaper (or the only fitting) way."""
        towers = schema.parse_towers(self.config.model.towers)
        slots_per_row = 1 + (int(self.config.data.history_len) if "history" in towers else 0)
        num_items = self.item_store.num_item_rows
        tokens = len(recommender.token_names(towers)[0])
        encoded_bytes = num_items * (tokens + 1) * int(self.config.model.width) * 4
        if num_items > rows * slots_per_row or encoded_bytes > _MAX_ENCODED_CATALOGUE_BYTES:
            return None
        encoded = evaluate.encode_catalogue(
            self.model,
            params,
            lambda item_rows: self.item_store.block(item_rows, len(item_rows)),
            num_items,
            self.mesh,
        )
        return sharding.put_replicated(self.mesh, encoded)

    def rows(
        self, params, split: str, sample: int | None = None, catalogue: dict | None = None
    ) -> dict[str, np.ndarray] | None:
        """`predict.predict_batches`' rows of `split` (None if it is empty), from
        `catalogue` (`self.catalogue(params, ...)`) when given."""
        if int(self.info.split_sizes.get(split, 0)) == 0:
            return None
        batches = self.loader(split, train=False, sample=sample)
        with contextlib.closing(batches):  # stops its workers
            if catalogue is None:
                return predict.predict_batches(self.predict_fn, params, batches, self.mesh)
            return evaluate.score_batches(self.split_fn, params, catalogue, batches, self.mesh)


def evaluate_split(
    scorer: SplitScorer, params, split: str, sample: int | None = None
) -> dict[str, float] | None:
    """AUC, GAUC, logloss, accuracy and ECE of `params` on `split` (None if it is empty).

    Args:
      scorer: the run's `SplitScorer`.
      params: the parameters on the mesh.
      split: the split's name.
      sample: score only a seeded random sample of this many of the split's
        interactions (`pipeline.make_batches`' `sample`; None: all).
    """
    catalogue = scorer.catalogue(params, scorer.num_rows(split, sample))
    rows = scorer.rows(params, split, sample, catalogue)
    return None if rows is None else predict.click_metrics(rows)


def _stored_config(path: Path) -> dict:
    """The settings a run's config.json holds; ValueError when it holds no JSON object."""
    stored = json.loads(path.read_text())
    if not isinstance(stored, dict):
        raise ValueError(f"it holds a JSON {type(stored).__name__}, not an object")
    return stored


def load_run_config(
    workdir: str | Path, data_dir: str | Path | None = None
) -> ml_collections.ConfigDict:
    """The resolved config a run in `workdir` trained with (its config.json).

    Args:
      workdir: the run's folder.
      data_dir: where the run's dataset is now, if it moved (default: where it was).
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a training workdir. Pass the --workdir "
            "that train.py was run with."
        )
    try:
        stored = _stored_config(path)
    except ValueError as error:
        raise ConfigError(
            f"{path} is damaged ({error}): it records the run's settings. Rerun train.py "
            f"with the run's own --config and --workdir {workdir}: it writes the file back "
            "from the checkpoints' record of the config."
        ) from error
    config = config_from_dict(stored)
    missing = missing_fields(config)
    if missing:
        raise ConfigError(
            f"{path} lacks the fields {', '.join(missing)} of the run's settings: it was "
            "edited or cut short. Put them back with the values the run trained with, or "
            f"delete the file and rerun train.py with the run's own --config and --workdir "
            f"{workdir}: it writes the file back from the checkpoints' record of the config."
        )
    if data_dir is not None:
        config.data.data_dir = str(data_dir)
    return config


# Resolved config fields a resumed run may change besides `train.*` and `seed`: the
# compute dtype follows the platform ("auto"); where the data lives and how it is loaded
# do not change what is trained.
_RESUME_MAY_DIFFER = (
    "model.dtype",
    "data.data_dir",
    "data.prefetch",
    "data.num_workers",
    "data.max_item_memory_mib",
)


# Training settings a resumed run keeps: a step's batch (the data position, the partly
# accumulated gradient of `optax.MultiSteps` and the learning-rate schedule all count in
# steps of this batch).
_RESUME_KEEPS = ("train.batch_size", "train.grad_accum_steps")

# Training settings that decide the optimizer state's structure, not only its values
# (`optim.build_optimizer`): clipping adds a stage. A resumed run may change the value
# but not switch it on or off.
_OPTIMIZER_SWITCHES = {
    "train.grad_clip_norm": (lambda value: value > 0, "above 0", "0"),
}


def _recover_run_config(
    reader: checkpoint_lib.Checkpointer, steps: list[int], path: Path
) -> dict | None:
    """A missing or damaged config.json, read from the newest checkpoint's metadata and
    written back.

    Returns the config as stored (None when no checkpoint's metadata reads).
    """
    for step in reversed(steps):
        try:
            stored = reader.restore_meta(step)["config"]
        except Exception:  # noqa: BLE001 -- a damaged checkpoint: try the one before
            continue
        if jax.process_index() == 0:
            write_atomic(path, json.dumps(stored, indent=2, sort_keys=True))
            print(f"{path} was missing or damaged: wrote it back from checkpoint step {step}.")
        return stored
    return None


def _resumed_batch_size(workdir: Path) -> int | None:
    """The batch size a run in `workdir` keeps when resumed; None with no checkpoint."""
    if not checkpoint_lib.Checkpointer.has_checkpoints(workdir):
        return None
    try:
        return int(_stored_config(workdir / "config.json")["train"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no readable config.json: resuming restores it, then compares


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths (a run's recorded relative one, say) name one existing folder."""
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def check_resumable(
    workdir: str | Path, config: ml_collections.ConfigDict, info: Any | None = None
) -> None:
    """Refuses to resume checkpoints in `workdir` that another model, dataset or optimizer wrote.

    A workdir's checkpoints can only continue the run its `config.json` describes: the
    same model (its `model.*` fields, the compute dtype aside) on the same data (the
    `data.*` fields but the folder and loading options, and `negatives_per_positive`
    where `info` shows labelled data, which samples none). Training settings (`train.*`,
    `seed`) may change, for example to train longer, except the batch size and gradient
    accumulation (every count of the run is in steps of that batch) and switching
    clipping on or off (it changes what the optimizer state holds).
    Fields only one of the two configs has (a run written by another version) are not
    compared. A missing or damaged config.json is first written back from the
    checkpoints' own record of the config.

    Args:
      workdir: the run folder.
      config: the resolved config of the new command (`resolve_config`).
      info: the dataset the command opened; when given, it must be the one the newest
        checkpoint recorded (`pipeline.dataset_fingerprint`).

    Raises:
      ConfigError: `workdir` holds checkpoints from a run whose config differs, naming
        the fields with both values.
      DatasetMismatchError: the dataset is another one than the run trained on.
    """
    workdir = Path(workdir)
    stored_path = workdir / "config.json"
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        steps = reader.all_steps()
        if not steps:
            return
        stored = None
        if stored_path.is_file():
            with contextlib.suppress(ValueError):  # damaged: the checkpoints hold the record
                stored = _stored_config(stored_path)
        if stored is None:
            stored = _recover_run_config(reader, steps, stored_path)
        try:
            recorded = reader.restore_meta(steps[-1]).get("dataset_fingerprint")
        except Exception:  # noqa: BLE001 - a damaged checkpoint is reported when restoring
            recorded = None
    finally:
        reader.close()
    if stored is None:
        return  # no checkpoint reads: restoring reports it
    stored = flatten(stored)
    wanted = flatten(json.loads(config_to_json(config)))  # tuples as lists, as stored
    may_differ = set(_RESUME_MAY_DIFFER)
    if info is not None and not info.positives_only:
        may_differ.add("data.negatives_per_positive")  # labelled data samples no negatives
    differences = [
        f"{key} is {stored[key]!r} there and {wanted[key]!r} now"
        for key in sorted(set(stored) & set(wanted))
        if key.startswith(("model.", "data."))
        and key not in may_differ
        and stored[key] != wanted[key]
        and not (key == "model.text.model" and _same_folder(stored[key], wanted[key]))
    ]
    reasons = []
    for key in _RESUME_KEEPS:
        if key in stored and key in wanted and stored[key] != wanted[key]:
            reasons.append(
                f"config.{key}={stored[key]!r} there and {wanted[key]!r} now: the data "
                "position, the gradient accumulation and the learning-rate schedule count "
                f"in steps of one batch; keep {stored[key]!r}"
            )
    if "seed" in stored and "seed" in wanted and stored["seed"] != wanted["seed"]:
        reasons.append(
            f"config.seed={stored['seed']!r} there and {wanted['seed']!r} now: the seed "
            "orders the training examples, and a new order in the middle of an epoch would "
            f"show some examples twice and skip others; keep {stored['seed']!r}"
        )
    for key, (switched_on, on, off) in _OPTIMIZER_SWITCHES.items():
        if key not in stored or key not in wanted:
            continue
        was_on = switched_on(stored[key])
        if was_on != switched_on(wanted[key]):
            keep = f"any value {on}" if was_on else off
            reasons.append(
                f"config.{key}={stored[key]!r} there and {wanted[key]!r} now: switching it "
                f"between {off} and {on} changes the optimizer state those checkpoints hold; "
                f"keep it at {keep}"
            )
    # Every field that refuses the resume is named at once.
    held = f"{workdir} holds checkpoints (steps {steps})"
    settings = "\n  ".join(["", *reasons])
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        also = f" Besides, these training settings cannot change:{settings}\n" if reasons else " "
        raise ConfigError(
            f"{held} of a run with another model or data: {shown}.{also}Resume it with its "
            f"own settings (--config {stored_path}), or pass a new --workdir to train this "
            "config from scratch."
        )
    if reasons:
        raise ConfigError(
            f"{held} that cannot resume with these training settings:{settings}\nKeep those "
            "values to resume, or pass a new --workdir to train from scratch."
        )
    if info is not None:  # the same settings, and yet another dataset
        pipeline.check_same_dataset(
            recorded,
            info,
            f"step {steps[-1]} of {workdir}",
            "Point --config.data.data_dir at the run's own dataset, or pass a new --workdir "
            "to train on this one from scratch.",
        )


def best_checkpoint_step(workdir: str | Path) -> int | None:
    """The step of a run's best checkpoint (by validation AUC), or None when no checkpoint
    was validated (then "best" means the latest)."""
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    best = checkpointer.best_step()
    checkpointer.close()
    return best


def restore_params(
    workdir: str | Path,
    which: str | int = "best",
    devices: list | None = None,
    data_dir: str | Path | None = None,
) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
    """Loads the parameters of a checkpoint of a finished or running training run.

    Args:
      workdir: the run's folder.
      which: "best" (by validation AUC; the latest if never evaluated), "latest", or a step.
      devices: mesh devices (default: all).
      data_dir: where the run's dataset is now, if it moved (default: where it was).

    Returns:
      (config, model, params, step): the resolved run config, the model built from it,
      its parameters on the mesh (replicated or FSDP as trained), and the step loaded.

    Raises:
      FileNotFoundError: no config.json or no checkpoint in `workdir`.
      ValueError: no checkpoint at the step asked for.
      DatasetMismatchError: the dataset found is not the one the checkpoint recorded.
      DatasetDamagedError: the dataset's files cannot be read (`check_dataset_readable`).
      CheckpointError: the checkpoint's files cannot be read (damaged).
    """
    config = load_run_config(workdir, data_dir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}; train first.")
    if which == "best":
        step = checkpointer.best_step() or steps[-1]
    elif which == "latest":
        step = steps[-1]
    else:
        step = int(which)
        if step not in steps:
            raise ValueError(f"No checkpoint at step {step} in {workdir}; it has {steps}.")
    info = pipeline.load_dataset_info(config.data)
    pipeline.check_same_dataset(
        checkpointer.restore_meta(step).get("dataset_fingerprint"),
        info,
        f"step {step} of {workdir}",
        "Pass --data_dir with the folder of the run's own dataset.",
    )
    check_dataset_readable(info)
    mesh = sharding.make_mesh(devices)
    model = recommender.build_model(config.model)
    # Shapes only: no data is read.
    example = schema.example_batch(config, cached_text_dim(config.model))
    abstract = train_step.build_train_state(config, model, mesh, example, 1, abstract=True).state
    state, _, _ = checkpointer.restore_or_explain(step, abstract)
    checkpointer.close()
    return config, model, state["params"], step


def check_dataset_readable(info: pipeline.DatasetInfo) -> None:
    """`builder.check_readable` on every process, which agree on the outcome (a collective:
    a process that raised alone would leave the others waiting in the next collective).

    Raises:
      DatasetDamagedError: on every process, naming what cannot be read where it failed.
    """
    damage = None
    try:
        builder.check_readable(info.data_dir, info.name, info.split_sizes)
    except builder.DatasetDamagedError as error:
        damage = error
    problem = sharding.shared_problem(
        None if damage is None else str(damage),
        "Process {process} found the dataset damaged; its output names the file.",
    )
    if problem is not None:
        raise damage or builder.DatasetDamagedError(problem)


def _check_updates(train_config: ml_collections.ConfigDict, total_steps: int, verbose: bool) -> int:
    """The run's number of optimizer updates (at least 1). Refuses a run too short for
    one; notes steps that make none and a warmup the run is too short for.

    Raises:
      ConfigError: fewer steps than `grad_accum_steps` micro-batches, which make an update.
    """
    accum = train_config.grad_accum_steps
    if total_steps < accum:
        raise ConfigError(
            f"config.train.grad_accum_steps={accum} micro-batches make one optimizer update, "
            f"but the run trains {total_steps} steps: its parameters would never change. "
            f"Train at least {accum} steps, or accumulate fewer."
        )
    updates = total_steps // accum
    if verbose and total_steps % accum:
        print(
            f"Note: the last {total_steps % accum} of the run's {total_steps} steps make no "
            f"update (config.train.grad_accum_steps={accum} micro-batches make one)."
        )
    warmup = train_config.warmup_steps
    if verbose and updates > 1 and warmup >= updates - 1:
        print(
            f"Note: config.train.warmup_steps={warmup} leaves no decay in the run's {updates} "
            f"optimizer updates: the warmup ends at update {updates - 1}, and the learning "
            "rate peaks at the end without decaying."
        )
    return updates


def _divergence(loss: float, grad_norm: float, max_loss: float) -> tuple[str, str]:
    """(what the loss became, what to change) for a step whose loss or gradient is not
    finite, or whose loss is above `max_loss`."""
    fix = "Lower config.train.learning_rate (or raise config.train.warmup_steps)"
    if not np.isfinite(loss):
        return "NaN or infinite", fix
    if not np.isfinite(grad_norm):
        return f"{loss:.4g} with a non-finite gradient", fix
    return (
        f"{loss:.4g}, above config.train.max_loss={max_loss:g},",
        f"{fix}, or raise config.train.max_loss if such a loss is expected,",
    )


def _device_count_note(meta: dict, devices: int, step: int) -> str | None:
    """What resuming on another number of devices than the checkpoint's run changes."""
    saved_on = meta.get("devices")  # absent in checkpoints of older versions
    if saved_on is None or saved_on == devices:
        return None
    return (
        f"Step {step} was saved by a run on {saved_on} devices; this one has {devices}. It "
        "trains on from the same state and batches, but sums over each batch now add up "
        f"in another order, so the steps from here differ from a run kept on {saved_on} "
        "devices in float rounding."
    )


def _early_stopping_record(meta: dict, workdir: Path, step: int) -> tuple[float, int]:
    """(best validation AUC, evaluations since it) of a run at its checkpoint `step`.

    From the checkpoint's metadata; checkpoints written before it kept the record are
    replayed from the run's metrics.jsonl.
    """
    record = meta.get("early_stopping")
    if record is not None:
        best = record.get("best_auc")
        return (-math.inf if best is None else float(best)), int(record["evals_without_gain"])
    aucs = {
        r["step"]: r["validation/auc"]
        for r in reporting.read_metrics(workdir)
        if "validation/auc" in r and r["step"] <= step
    }  # by step: a resumed run may have logged a step twice
    best, since = -math.inf, 0
    for _, auc in sorted(aucs.items()):
        best, since = (auc, 0) if auc > best else (best, since + 1)
    return best, since


def _set_aside(checkpointer: checkpoint_lib.Checkpointer, steps: list[int], is_chief: bool) -> None:
    """Moves checkpoints that failed to restore out of the way, so their steps can be saved."""
    problem = None
    if is_chief:
        try:
            for step, target in checkpointer.set_aside(steps).items():
                print(f"Moved damaged checkpoint step {step} to {target} (delete it when done).")
        except OSError as error:
            problem = str(error.strerror or error)
    problem = sharding.shared_problem(problem, "on process {process}")
    if problem is not None:
        checkpointer.close()
        raise checkpoint_lib.CheckpointError(
            f"Could not move the damaged checkpoints {steps} out of {checkpointer.directory} "
            f"({problem}). Move them away by hand, or make the folder writable, and rerun."
        )
    checkpointer.reload()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, devices: list | None = None
) -> dict:
    """Trains `config` in `workdir`, resuming from its newest good checkpoint.

    Args:
      config: a run config (see configs/default.py).
      workdir: folder for checkpoints, metrics.jsonl, TensorBoard events, plots and
        summary.json.
      devices: devices of the mesh (default: all devices of all processes).

    Returns:
      The summary: {split: {"model": metrics, "oracle": oracle metrics or None}}.

    Raises:
      ConfigError: a config value that is bad in itself, or does not fit the dataset or
        the devices (a batch larger than the training split, a history longer than the
        stored one, ...); or another process is training in `workdir`.
      DatasetNotBuiltError: `config.data.name` is not in `config.data.data_dir`.
      DatasetMismatchError: the checkpoints in `workdir` were trained on another dataset.
      DatasetDamagedError: the dataset's files cannot be read (`check_dataset_readable`).
      CheckpointError: `workdir` holds checkpoints and none of them restores, or a
        checkpoint could not be saved (the ones saved before are intact).
      TrainingDiverged: the loss became NaN or infinite (nothing non-finite is saved).
      OutOfMemory: the train state, a train step or a validation pass ran out of device
        memory (the message says how to fit it; the checkpoints already saved are kept).
      StorageError: the run's records or data could not be written or read (a full disk),
        on every process of the run (the checkpoints already saved are kept).
      SystemExit: after SIGTERM or Ctrl-C, once a checkpoint is saved (status 128+signal);
        `cli.ExitNow` after a second one, without waiting for a save in flight.
    """
    sharding.maybe_initialize_distributed()
    check_values(config)  # bad values fail before the dataset is built
    try:
        runtime.compute_dtype(config.model.dtype)  # the dtype runs on this backend
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not str(workdir).strip():
        raise ConfigError("The workdir is empty; pass a folder for the run, e.g. runs/demo.")
    process_index, process_count = _process_index_and_count()
    is_chief = process_index == 0
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"The workdir {workdir} is a file; pass a folder for the run.")
    created = not workdir.exists()
    with contextlib.ExitStack() as stack:
        problem = None  # process 0 takes the workdir; every process learns the outcome
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            locked = stack.enter_context(files.exclusive_lock(workdir / ".lock", enabled=is_chief))
            if not locked:
                problem = (
                    f"Another training process is running in {workdir} (it holds "
                    f"{workdir / '.lock'}). Wait for it to finish, stop it, or pass another "
                    "--workdir."
                )
        except OSError as error:
            problem = (
                f"Cannot write in the workdir {workdir} ({error.strerror or error}): "
                "training writes its checkpoints and records there. Pass a --workdir you "
                "can write to (python -m mmrec_jax.evaluate scores a finished run's "
                "checkpoints)."
            )
        problem = sharding.shared_problem(
            problem, f"Process {{process}} cannot train in the workdir {workdir}; see its error."
        )
        if problem is not None:
            raise ConfigError(problem)
        try:
            return _train_and_evaluate(config, workdir, devices, process_index, process_count)
        except BaseException:
            if created and is_chief:
                _remove_if_only_lock(workdir)
            raise


def _remove_if_only_lock(workdir: Path) -> None:
    """Removes a workdir that a failed start left holding nothing but its lock file."""
    with contextlib.suppress(OSError):
        if [p.name for p in workdir.iterdir()] == [".lock"]:
            (workdir / ".lock").unlink()
            workdir.rmdir()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: Path,
    devices: list | None,
    process_index: int,
    process_count: int,
) -> dict:
    """`train_and_evaluate` once the workdir is this process's alone."""
    is_chief = process_index == 0
    mesh = sharding.make_mesh(devices)
    if config.train.batch_size % mesh.size:  # the workdir's run is read for the message only
        kept = _resumed_batch_size(workdir)
        train_step.check_batch_divides(config.train.batch_size, mesh.size, kept)
    train_step.check_no_fft_deadlock(config, mesh)  # before the dataset is built
    build_error = None
    if is_chief:  # builds the dataset if needed; the others wait for it
        try:
            pipeline.ensure_dataset(config.data)
        except Exception as error:  # noqa: BLE001 - raised below, once every process knows
            build_error = error
    if sharding.failed_processes(build_error is not None):
        raise build_error or ConfigError("Process 0 could not prepare the dataset; see its error.")
    info = pipeline.load_dataset_info(config.data)
    check_dataset_readable(info)  # a cut test split fails now, not after training
    config = resolve_config(config, info, verbose=is_chief)
    check_resumable(workdir, config, info)

    model = recommender.build_model(config.model)
    epoch_steps = pipeline.num_batches(config, "train", train=True, info=info)
    if epoch_steps == 0:
        examples = pipeline.num_examples(info, "train", config.data.negatives_per_positive)
        fitting = pipeline.fitting_batch_size(examples, mesh.size)
        fix = (
            f"Lower the batch size, for example --config.train.batch_size={fitting}."
            if fitting
            else f"It has fewer examples than the {mesh.size} devices: add data."
        )
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is larger than the training "
            f"split of {info.name!r} ({examples} examples). {fix}"
        )
    total_steps = config.train.num_steps or config.train.num_epochs * epoch_steps
    updates = _check_updates(config.train, total_steps, verbose=is_chief)

    item_store = pipeline.ItemStore(config, info)
    loader = functools.partial(
        pipeline.make_batches,
        config,
        process_index=process_index,
        process_count=process_count,
        item_store=item_store,
        multiple=len(mesh.local_devices),
    )
    with contextlib.closing(loader("train", train=True)) as batches:
        first_local = next(batches)
    example = sharding.global_batch(mesh, first_local)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    restored = None
    if checkpointer.all_steps():
        # Restored into the state's shapes and shardings: a resumed run never creates a
        # state (initialises it, loads the pretrained BERT into it) only to replace it.
        setup = train_step.build_train_state(config, model, mesh, example, updates, abstract=True)
        try:
            restored = checkpointer.restore_latest_good(setup.state)
        except checkpoint_lib.CheckpointError:
            checkpointer.close()  # release Orbax's background threads before the error
            raise
        except jax.errors.JaxRuntimeError as error:
            checkpointer.close()
            if not runtime.is_out_of_memory(error):
                raise
            message = _state_out_of_memory_message(error, config, mesh.size, checkpointer.directory)
            raise OutOfMemory(message) from error
    else:
        try:
            setup = train_step.build_train_state(config, model, mesh, example, updates)
            jax.block_until_ready(setup.state)  # an allocation failure surfaces here
        except jax.errors.JaxRuntimeError as error:
            checkpointer.close()
            if not runtime.is_out_of_memory(error):
                raise
            raise OutOfMemory(_state_out_of_memory_message(error, config, mesh.size)) from error
    param_shardings = setup.shardings["params"]
    schedule = setup.schedule
    if is_chief:
        recommender.print_param_counts(setup.state["params"])
    start_step = 0
    # Early stopping's record travels in each checkpoint's metadata, so a resumed run
    # counts on (and an early-stopped run stays stopped) as an uninterrupted one would.
    best_auc, evals_without_gain = -math.inf, 0
    if restored is None:
        state = setup.state
    else:
        start_step, state, data_state, restored_meta, damaged = restored
        if damaged:
            _set_aside(checkpointer, damaged, is_chief)
        if is_chief and start_step == total_steps:
            print(
                f"The run has already trained all {total_steps} steps (checkpoints in "
                f"{checkpointer.directory}): nothing to train; reporting its results. Raise "
                "config.train.num_epochs or num_steps to train on."
            )
        elif is_chief:
            print(f"Resuming from checkpoint step {start_step} in {checkpointer.directory}.")
            note = _device_count_note(restored_meta, mesh.size, start_step)
            if note:
                print(note)
        best_auc, evals_without_gain = _early_stopping_record(restored_meta, workdir, start_step)
    patience = config.train.early_stopping_patience
    stopped_early = bool(patience) and evals_without_gain >= patience
    if is_chief and stopped_early:
        print(
            f"No validation gain in the last {evals_without_gain} evaluations "
            f"(config.train.early_stopping_patience={patience}): the run stops at step "
            f"{start_step} and reports it. Raise the patience (0: never stop) to train on."
        )
    if is_chief and start_step > total_steps:
        print(
            f"The run has trained {start_step} steps, more than the {total_steps} asked for "
            f"now: nothing is trained, and it reports its checkpoints as they are (step "
            f"{start_step} the newest). Pass a new --workdir to train {total_steps} steps."
        )
    # Process 0 writes the run's records; failing to (a full disk), it stops every process.
    unwritable = None
    try:
        if is_chief and start_step < total_steps and not stopped_early:
            # The settings the checkpoints from now on are trained with (not written when
            # nothing trains, so a finished run's record keeps the settings it finished with).
            write_atomic(workdir / "config.json", config_to_json(config))
            state_bytes = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
            warning = files.too_little_room(workdir, state_bytes, "the run's train state")
            if warning:
                print(warning)
        # A fresh run starts at 0: records of an earlier attempt that saved nothing go too.
        writer = reporting.MetricsWriter(workdir, enabled=is_chief, resume_step=start_step)
    except OSError as error:
        unwritable = _os_error_text(error)
    unwritable = sharding.shared_problem(
        unwritable, "process {process} could not write the run's records (its output says why)"
    )
    if unwritable is not None:
        raise StorageError(
            f"Training could not start: {unwritable}. Fix the cause (free disk space, write "
            "permission) and rerun the same command."
        )
    # The data position is the rows trained on (checkpoints before it was recorded hold
    # Grain's own iterator state; their batch size cannot have changed, see check_resumable).
    rows_done = int(data_state.get("rows", start_step * config.train.batch_size)) if restored else 0
    train_iter = loader("train", train=True, start_row=rows_done)

    jit_step = train_step.jit_train_step(model, setup, mesh, first_local, config.model.dtype)
    del first_local, example  # their shapes were all they were for: free the memory now
    scorer = SplitScorer(model, mesh, param_shardings, loader, item_store, config, info)
    meta = {
        "config": json.loads(config_to_json(config)),
        "dataset": info.name,
        "dataset_fingerprint": pipeline.dataset_fingerprint(info),
        "devices": mesh.size,
    }

    # Saving is collective: under several processes, all stop at the same step, the first
    # logging step after any of them got the signal.
    stop = (
        _StopRequest()
        if process_count == 1
        else _StopRequest(
            f"at the next logging step (config.train.log_every={config.train.log_every})",
            " The other processes stop when JAX notices this one is gone (within about two "
            "minutes, with an error of their own): send it to every process to stop all at "
            "once.",
        )
    )

    # Records that process 0 could not write (a full disk) under several processes: raised
    # at once, the error would leave the others waiting in the next collective, so it waits
    # for the next point where all processes agree (`signal_of_any_process`).
    unwritten: list[OSError] = []

    def write_records(values: dict[str, float]) -> None:
        """`writer.write` of this step's values (process 0 writes)."""
        try:
            writer.write(step, values)
        except OSError as error:
            if process_count == 1:
                raise
            unwritten.append(error)

    def signal_of_any_process() -> int | None:
        """The signal some process received, the same on every process (a collective).

        Raises:
          OSError: some process could not write the run's records: its own error there.
        """
        if process_count == 1:
            return stop.signum
        from jax.experimental import multihost_utils

        mine = np.array([stop.signum or 0, len(unwritten)], np.int32)
        every = multihost_utils.process_allgather(mine)  # (P, 2)
        if unwritten:
            raise unwritten[0]
        if every[:, 1].any():
            failed = ", ".join(str(p) for p in np.flatnonzero(every[:, 1]))
            raise OSError(
                f"process {failed} could not write the run's records (its output says why)"
            )
        return int(every[:, 0].max()) or None

    def stopped_by_storage(error: OSError) -> StorageError:
        """The error that stops training when the disk fails, naming the intact checkpoint."""
        intact = (
            f"Checkpoint step {last_saved} in {checkpointer.directory} is intact"
            if last_saved is not None
            else f"No checkpoint was saved in {checkpointer.directory}"
        )
        return StorageError(
            f"Training stopped at step {step}: {_os_error_text(error)}. {intact}. "
            "Fix the cause (free disk space, write permission) and rerun the same command: "
            "it resumes from the newest intact checkpoint."
        )

    def agreed_stop() -> int | None:
        """The signal to stop for, checked by all processes at logging steps; None to train
        on."""
        if process_count > 1 and step % config.train.log_every:
            return None
        return signal_of_any_process()

    def say(message: str) -> None:
        """Prints a line above the progress bar, on process 0 only."""
        if is_chief:
            progress.write(message)

    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked
    # Sums of the step metrics since the last logging step; saved with each checkpoint, so
    # a resumed run logs the same means as an uninterrupted one.
    restored_window = data_state.get("log_window") if restored else None
    window = {"steps": 0, "sums": {}} if restored_window is None else dict(restored_window)
    last_saved = checkpointer.all_steps()[-1] if checkpointer.all_steps() else None
    examples_per_step = config.train.batch_size

    def check_pending() -> None:
        """Adds the pending step metrics to the logging window; raises at the first
        diverged step."""
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (step, _), values in zip(pending, host, strict=True):
            loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
            if np.isfinite(loss) and np.isfinite(grad_norm) and loss <= config.train.max_loss:
                continue
            what, fix = _divergence(loss, grad_norm, config.train.max_loss)
            raise TrainingDiverged(
                f"Training diverged: the loss became {what} at step {step}. The last good "
                f"checkpoint is step {last_saved} in {checkpointer.directory} (nothing after "
                f"it was saved). {fix} and rerun the same command: it resumes from that "
                "checkpoint."
            )
        for values in host:
            for name, value in values.items():
                window["sums"][name] = window["sums"].get(name, 0.0) + float(value)
        window["steps"] += len(host)
        pending.clear()

    def window_means() -> dict[str, float]:
        """The means of the step metrics since the last logging step; starts a new window."""
        check_pending()
        means = {name: total / window["steps"] for name, total in window["sums"].items()}
        window.update(steps=0, sums={})
        return means

    def save(step: int, metrics: dict | None = None) -> None:
        nonlocal last_saved
        check_pending()
        stopping = {
            "best_auc": None if best_auc == -math.inf else best_auc,
            "evals_without_gain": evals_without_gain,
        }
        step_meta = dict(meta, early_stopping=stopping)
        # A copy: the asynchronous save writes it while the window fills again.
        log_window = {"steps": window["steps"], "sums": dict(window["sums"])}
        position = {"rows": rows_done, "log_window": log_window}
        checkpointer.save(step, state, position, step_meta, metrics)
        last_saved = step

    # The first step compiles the program (up to a minute for a large model on a GPU).
    progress = reporting.progress_bar(
        "train",
        total_steps,
        "step",
        initial=start_step,
        enabled=is_chief,
        note="compiling the train step",
    )
    # The first step after a start or resume compiles and the second warms up (its dispatch
    # still takes longer): the trace starts at the third.
    profiler = profiling.StepTrace(
        workdir / "tensorboard",
        first_step=start_step + 3,
        num_steps=config.train.get("profile_steps", 0),  # absent in older runs' config.json
        enabled=is_chief,
        report=say,
    )
    step = start_step
    window_start, window_steps = time.perf_counter(), 0
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if restored is None:
            # A fresh run starts with a checkpoint of its initial state, so even a run that
            # diverges at its first steps leaves a usable checkpoint to resume from.
            save(0)
        while step < total_steps and not stopped_early:
            signum = agreed_stop()
            if signum is not None:
                if last_saved != step:  # the signal may have come during a save or evaluation
                    save(step)
                checkpointer.wait()
                progress.close()
                if is_chief:
                    print(
                        f"\n{signal.Signals(signum).name} received: saved checkpoint step "
                        f"{step} in {checkpointer.directory}. Rerun the same command to resume."
                    )
                raise SystemExit(128 + signum)
            local_batch = next(train_iter)
            profiler.before_step(step + 1, state)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, step_metrics = jit_step(state, sharding.global_batch(mesh, local_batch))
            step += 1
            if step == start_step + 1:
                progress.set_postfix_str("", refresh=False)  # compiled
            rows_done += config.train.batch_size
            profiler.after_step(state)
            window_steps += 1
            pending.append((step, step_metrics))
            if len(pending) > _MAX_STEPS_AHEAD:
                # Bound how far dispatch runs ahead of the device, so the progress bar
                # (and its ETA) shows steps done, not steps queued.
                jax.block_until_ready(pending[-_MAX_STEPS_AHEAD - 1][1]["loss"])
            progress.update(1)
            if step % config.train.log_every == 0 or step == total_steps:
                means = window_means()
                elapsed = time.perf_counter() - window_start
                rate = window_steps / max(elapsed, 1e-9)
                logged = {f"train/{k}": v for k, v in means.items()}
                # The rate of the last update (the schedule counts updates from 0).
                updates_done = step // config.train.grad_accum_steps
                logged["train/learning_rate"] = float(schedule(max(updates_done - 1, 0)))
                logged["train/steps_per_s"] = rate
                logged["train/examples_per_s"] = rate * examples_per_step
                write_records(logged)
                progress.set_postfix(  # shown with the bar's next update
                    {
                        "loss": f"{means['loss']:.4f}",
                        "examples/s": f"{rate * examples_per_step:.0f}",
                    },
                    refresh=False,
                )
                window_start, window_steps = time.perf_counter(), 0
            evaluate_now = config.train.eval_every and step % config.train.eval_every == 0
            if evaluate_now or step == total_steps:
                check_pending()
                result = evaluate_split(scorer, state["params"], "validation")
                if result is not None:
                    write_records({f"validation/{k}": v for k, v in result.items()})
                if result is not None and result["auc"] is None:
                    # One class only: no AUC to rank checkpoints or stop early by.
                    say(
                        f"step {step}: validation logloss {result['logloss']:.4f} (AUC "
                        "undefined: the validation split holds one class only, so no "
                        "checkpoint is marked best and early stopping does not count)"
                    )
                    save(step)
                elif result is not None:
                    say(
                        f"step {step}: validation auc {result['auc']:.4f} "
                        f"logloss {result['logloss']:.4f}"
                    )
                    if result["auc"] > best_auc:
                        best_auc, evals_without_gain = result["auc"], 0
                    else:
                        evals_without_gain += 1
                    save(step, {checkpoint_lib.BEST_METRIC: result["auc"]})
                    if patience and evals_without_gain >= patience:
                        say(
                            f"Early stopping at step {step}: no validation gain in "
                            f"{patience} evaluations."
                        )
                        break
                elif step == total_steps:
                    save(step)
                window_start, window_steps = time.perf_counter(), 0
            elif step % config.train.checkpoint_every == 0:
                save(step)
        if step == total_steps and last_saved != step:
            save(step)
    except jax.errors.JaxRuntimeError as error:
        if not runtime.is_out_of_memory(error):
            raise
        saved = f"Checkpoint step {last_saved} in {checkpointer.directory} is intact."
        message = _out_of_memory_message(error, config, mesh.size, step, saved)
        raise OutOfMemory(message) from error
    except OSError as error:
        # A full disk or a lost file system: the records and the data reader fail like
        # this; a failed checkpoint save is a CheckpointError of its own.
        raise stopped_by_storage(error) from error
    finally:
        if not stop.forced:  # a save in flight completes, unless told to stop at once
            checkpointer.wait()
        train_iter.close()
        profiler.close()
        progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    try:
        signum = signal_of_any_process()
    except OSError as error:  # the last records
        raise stopped_by_storage(error) from error
    if signum is not None:  # it came during the last evaluation or save: stop before the report
        if is_chief:
            print(
                f"\n{signal.Signals(signum).name} received: training ended at step {step}, "
                f"saved in {checkpointer.directory}. Rerun the same command for the final "
                "report."
            )
        raise SystemExit(128 + signum)

    summary = _final_report(workdir, checkpointer, state, scorer, info)
    checkpointer.close()
    writer.close()
    return summary


# The fewest training interactions the final report scores (if the split has them).
_MIN_TRAIN_SAMPLE = 1000


def _final_report(workdir, checkpointer, state, scorer: SplitScorer, info) -> dict:
    """Evaluates the best checkpoint on every split; writes summary.json and the plots."""
    is_chief = jax.process_index() == 0
    params = state["params"]
    final = int(jax.device_get(state["step"]))
    best = checkpointer.best_step()
    reported = f"best checkpoint, step {best}" if best is not None else None
    if best is not None and best != final:
        try:
            restored, _, _ = checkpointer.restore_or_explain(
                best, checkpoint_lib.abstract_like(state)
            )
            params = restored["params"]
        except checkpoint_lib.CheckpointError as error:
            if is_chief:
                print(f"WARNING: {error} The results below are of the final state instead.")
            best, reported = None, f"final state, step {final}"
    if reported is None:
        reported = f"final state, step {final}: no best checkpoint"
    summary = {}
    # The train split is scored on a random sample of as many interactions as validation
    # has (at least _MIN_TRAIN_SAMPLE): enough to show over- or underfitting without a full
    # pass over the largest split. Its first rows would be a few users' (stored by user).
    train_size = int(info.split_sizes["train"])
    sample = min(max(int(info.split_sizes.get("validation", 0)), _MIN_TRAIN_SAMPLE), train_size)
    samples = {split: sample if split == "train" else None for split in REPORT_SPLITS}
    # One encoding of the catalogue, where it pays, for every split.
    total_rows = sum(scorer.num_rows(split, samples[split]) for split in REPORT_SPLITS)
    catalogue = scorer.catalogue(params, total_rows)
    for split in REPORT_SPLITS:
        rows = scorer.rows(params, split, samples[split], catalogue)
        if rows is None:
            continue
        oracle = (info.oracle or {}).get(split)
        if oracle is not None:
            oracle = {
                k: None if oracle[k] is None else float(oracle[k])  # AUC of one class: None
                for k in ("auc", "logloss")
                if k in oracle
            }
        summary[split] = {
            "model": predict.click_metrics(rows),
            "oracle": oracle,
            # The users GAUC averages: a handful make it noise (the table says so).
            "gauc_users": predict.gauc_users(rows),
        }
    if is_chief:
        table = reporting.summary_table(summary)
        sampled = (
            f"all {train_size} interactions"
            if sample == train_size
            else f"{sample} of its {train_size} interactions, at random"
        )
        print(f"\nResults ({reported}; train: {sampled}):\n{table}")
        payload = {
            "checkpoint_step": final if best is None else best,
            # The train row scores this many of the split's interactions; its oracle all.
            "train_sample": {"interactions": sample, "of": train_size},
            "splits": summary,
        }
        try:
            write_atomic(Path(workdir) / "summary.json", json.dumps(payload, indent=2))
            plots = reporting.plot_curves(workdir)
        except OSError as error:
            raise StorageError(
                f"The results above could not be written to {workdir}: {error}. Fix the cause "
                "(free disk space, write permission) and rerun the same command to report again."
            ) from error
        print(f"Wrote {Path(workdir) / 'summary.json'} and {', '.join(p.name for p in plots)}.")
    return summary
