"""The training loop: end to end, device-count invariance, exact resume, divergence."""

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from _processes import finish, launch_two_processes, start_two_processes, subprocess_env
from _profile_trace import traced_steps
from _tiny_bert import make_tiny_bert

from mmrec_jax import checkpoint, reporting, runtime, train
from mmrec_jax.config import ConfigError, load_config
from mmrec_jax.data import builder, pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"

# This module's runs share a dataset (built once per xdist worker). The tests that use the
# reference run carry a second group mark (xdist joins a test's group names), so the two
# halves of the module can run on different workers and the reference run is made once.
pytestmark = pytest.mark.xdist_group("train")
WITH_REFERENCE_RUN = pytest.mark.xdist_group("train_reference_run")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One tiny synthetic dataset (and its text cache) shared by this module's runs."""
    return tmp_path_factory.mktemp("data")


def tiny_config(data_dir, **overrides):
    pairs = [("data.data_dir", str(data_dir))]
    pairs += [(key, str(value)) for key, value in overrides.items()]
    return load_config(TINY, [(k.replace("__", "."), v) for k, v in pairs])


def loop_config(data_dir, **overrides):
    """`tiny_config` with the ID and history towers alone, for the tests of how the loop
    handles signals, failures and early stopping: the loop treats every model alike, and
    this one traces, compiles and saves in a fraction of the time."""
    return tiny_config(data_dir, model__towers="id,history", **overrides)


def _losses(workdir) -> dict[int, float]:
    return {
        r["step"]: r["train/loss"] for r in reporting.read_metrics(workdir) if "train/loss" in r
    }


def test_tiny_run_end_to_end(data_dir, tmp_path, capsys):
    # Validations and checkpoints at steps 40 and 80 and at the end of the epoch.
    config = tiny_config(
        data_dir, train__profile_steps=3, train__eval_every=40, train__checkpoint_every=40
    )
    assert config.model.dtype == "auto"
    summary = train.train_and_evaluate(config, tmp_path)
    out, err = capsys.readouterr()
    assert "compiling the train step" in err  # beside the bar while the first step compiles
    # The run records the dtype it computed in: "auto" is float32 on a CPU.
    run_config = json.loads((tmp_path / "config.json").read_text())
    assert run_config["model"]["dtype"] == runtime.compute_dtype("auto") == "float32"
    assert {"train", "validation", "test", "test_cold"} <= set(summary)
    for split, entry in summary.items():
        assert 0.0 <= entry["model"]["auc"] <= 1.0, split
        assert np.isfinite(entry["model"]["logloss"]), split
        assert entry["oracle"] is not None and "auc" in entry["oracle"], split
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert payload["splits"]["test"]["model"]["auc"] == summary["test"]["model"]["auc"]
    # The users each split's GAUC averages, counted from the split's records.
    for split in ("validation", "test", "test_cold"):
        source = tfds.data_source(config.data.name, data_dir=str(data_dir))[split]
        labels_of_user = {}
        for record in source.__getitems__(list(range(len(source)))):
            labels_of_user.setdefault(int(record["user_index"]), set()).add(int(record["label"]))
        both = sum(len(labels) == 2 for labels in labels_of_user.values())
        assert payload["splits"][split]["gauc_users"] == both > 0, split
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "auc.png").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    assert "oracle auc" in out and "test_cold" in out
    records = reporting.read_metrics(tmp_path)
    assert any("validation/auc" in r for r in records)
    assert any("train/examples_per_s" in r for r in records)
    # The logged rate is the one the step's update used: optax counts updates from 0.
    total = max(r["step"] for r in records if "train/loss" in r)  # one epoch's steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.train.learning_rate, config.train.warmup_steps, total, 0.0
    )
    for r in records:
        if "train/learning_rate" in r:
            assert r["train/learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)))
    # Three steps traced after the compiling and a warm-up step, beside the scalars.
    assert traced_steps(tmp_path / "tensorboard") == [3, 4, 5]
    assert "Traced steps 3-5" in out


def test_one_and_eight_devices_and_fsdp_give_the_same_losses(data_dir, tmp_path):
    # No evaluations before the final report: the losses are compared.
    every_step = tiny_config(data_dir, train__num_steps=20, train__log_every=1, train__eval_every=0)
    train.train_and_evaluate(every_step, tmp_path / "one", devices=jax.devices()[:1])
    # Logged every 5 steps, with checkpoints (steps 7 and 14) inside the logging windows:
    # each logged loss is the mean of its window's 5 steps.
    windows = dict(
        train__num_steps=20, train__log_every=5, train__checkpoint_every=7, train__eval_every=0
    )
    eight = tiny_config(data_dir, **windows)
    train.train_and_evaluate(eight, tmp_path / "eight", devices=jax.devices()[:8])
    fsdp = tiny_config(data_dir, **windows, train__fsdp=True)
    train.train_and_evaluate(fsdp, tmp_path / "fsdp", devices=jax.devices()[:8])
    one = _losses(tmp_path / "one")
    assert sorted(one) == list(range(1, 21))
    for name in ("eight", "fsdp"):
        other = _losses(tmp_path / name)
        assert sorted(other) == [5, 10, 15, 20]
        for step, logged in other.items():
            mean = np.mean([one[s] for s in range(step - 4, step + 1)])
            assert abs(logged - mean) <= 1e-5 * abs(mean), (name, step, logged, mean)
    _, _, params, _ = train.restore_params(tmp_path / "fsdp", "latest")
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(params)}
    assert jax.sharding.PartitionSpec() in specs and len(specs) > 1, specs


def test_a_workdir_another_process_trains_in_or_unwritable_is_refused(
    data_dir, tmp_path, monkeypatch
):
    from mmrec_jax import files

    with files.exclusive_lock(tmp_path / ".lock"):  # as a running train.py holds it
        with pytest.raises(ConfigError, match="Another training process is running in"):
            train.train_and_evaluate(tiny_config(data_dir), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing was touched

    def read_only(path, enabled=True):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "exclusive_lock", read_only)
    with pytest.raises(ConfigError, match=r"Cannot write in the workdir .* \(Permission denied\)"):
        train.train_and_evaluate(tiny_config(data_dir), tmp_path)


def test_a_local_text_model_folder_is_recorded_absolute(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir)
    pipeline.ensure_dataset(config.data)
    info = pipeline.load_dataset_info(config.data)
    make_tiny_bert(tmp_path / "my_bert")  # 40 positions
    monkeypatch.chdir(tmp_path)
    config.model.text.model = "my_bert"
    config.data.max_text_len = 40
    resolved = train.resolve_config(config, info, verbose=False)
    assert resolved.model.text.model == str(tmp_path / "my_bert")
    assert train._same_folder("my_bert", resolved.model.text.model)  # resumes a relative run
    hub_name = tiny_config(data_dir).model.text.model  # not a folder here: kept as it is
    assert train.resolve_config(tiny_config(data_dir), info, False).model.text.model == hub_name
    # Texts longer than the model's positions: a config error before any work.
    config.data.max_text_len = 41
    with pytest.raises(ConfigError, match=r"max_text_len=41 is more tokens than .* \(40, its"):
        train.resolve_config(config, info, verbose=False)
    # So is pooling "pooler" with a checkpoint without one (in every text mode).
    make_tiny_bert(tmp_path / "no_pooler", pooler=False)
    config = tiny_config(data_dir, model__text__model=tmp_path / "no_pooler")
    config.model.text.pooling = "pooler"
    with pytest.raises(ConfigError, match="pooling='pooler' but the checkpoint has no pooler"):
        train.resolve_config(config, info, verbose=False)


def test_settings_this_run_does_not_use_are_noted(data_dir, capsys):
    config = tiny_config(data_dir, data__negatives_per_positive=2)
    pipeline.ensure_dataset(config.data)
    info = pipeline.load_dataset_info(config.data)
    assert not info.positives_only  # the synthetic data has labels
    capsys.readouterr()
    train.resolve_config(config, info, verbose=True)
    assert (
        f"Note: dataset {info.name!r} has labels, so no negatives are sampled: "
        "config.data.negatives_per_positive=2 is for positives-only data."
    ) in capsys.readouterr().out
    # Accumulation: too few steps for one update is refused; steps left over are noted.
    short = tiny_config(data_dir, train__grad_accum_steps=3).train
    with pytest.raises(ConfigError, match=r"grad_accum_steps=3 micro-batches .* trains 2 steps"):
        train._check_updates(short, 2, verbose=True)
    assert train._check_updates(short, 13, verbose=True) == 4  # 2 of warmup, 2 of decay
    out = capsys.readouterr().out
    assert "Note: the last 1 of the run's 13 steps make no update" in out
    assert "warmup" not in out
    for warmup in (3, 100):  # both end the warmup at the last of 4 updates
        long_warmup = tiny_config(data_dir, train__warmup_steps=warmup).train
        train._check_updates(long_warmup, 4, verbose=True)
        assert (
            f"Note: config.train.warmup_steps={warmup} leaves no decay in the run's 4 optimizer "
            "updates: the warmup ends at update 3"
        ) in capsys.readouterr().out


def test_a_loss_above_max_loss_names_the_setting():
    what, fix = train._divergence(0.6893, 1.0, 0.5)
    assert what == "0.6893, above config.train.max_loss=0.5,"
    assert fix.endswith(", or raise config.train.max_loss if such a loss is expected,")
    assert train._divergence(float("nan"), 1.0, 0.5) == (
        "NaN or infinite",
        "Lower config.train.learning_rate (or raise config.train.warmup_steps)",
    )


def test_early_stopping_after_evaluations_without_gain(data_dir, tmp_path, capsys):
    # A zero learning rate never improves validation AUC, so patience 1 stops at the
    # second evaluation.
    config = loop_config(
        data_dir,
        train__learning_rate=0.0,
        train__num_steps=40,
        train__eval_every=5,
        train__early_stopping_patience=1,
    )
    # A run's config.json from before train.profile_steps existed still trains.
    del config.train["profile_steps"]
    train.train_and_evaluate(config, tmp_path)
    assert "Early stopping at step 10" in capsys.readouterr().out
    steps = [r["step"] for r in reporting.read_metrics(tmp_path) if "validation/auc" in r]
    assert steps == [5, 10]
    # Rerun, the run stays stopped; with more patience it counts on from its record
    # (one evaluation without gain so far), as an uninterrupted run with patience 3 would.
    train.train_and_evaluate(config, tmp_path)
    assert "the run stops at step 10 and reports it" in capsys.readouterr().out
    config.train.early_stopping_patience = 3
    train.train_and_evaluate(config, tmp_path)
    assert "Early stopping at step 20" in capsys.readouterr().out
    steps = [r["step"] for r in reporting.read_metrics(tmp_path) if "validation/auc" in r]
    assert steps == [5, 10, 15, 20]


def test_early_stopping_record_of_older_checkpoints_is_replayed_from_the_metrics(tmp_path):
    aucs = [(5, 0.60), (10, 0.70), (10, 0.70), (15, 0.65), (20, 0.68), (25, 0.90)]
    lines = [json.dumps({"step": step, "validation/auc": auc}) for step, auc in aucs]
    lines.insert(2, json.dumps({"step": 12, "train/loss": 0.5}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 2')  # a cut line
    # Brute force up to step 20: best 0.70 at step 10 (logged twice), then two without gain.
    assert train._early_stopping_record({}, tmp_path, 20) == (0.70, 2)
    assert train._early_stopping_record({}, tmp_path, 25) == (0.90, 0)
    assert train._early_stopping_record({}, tmp_path / "none", 20) == (-math.inf, 0)
    record = {"early_stopping": {"best_auc": 0.8, "evals_without_gain": 3}}
    assert train._early_stopping_record(record, tmp_path, 20) == (0.8, 3)


def test_a_validation_split_of_one_class_trains_on_without_a_best_checkpoint(tmp_path, capsys):
    # Two users: this seed's validation split holds 6 negatives and no positive.
    config = loop_config(
        tmp_path / "data",
        data__synthetic__num_users=2,
        data__synthetic__seed=51,
        train__num_steps=4,
        train__eval_every=2,
        train__checkpoint_every=2,
        train__early_stopping_patience=1,
    )
    pipeline.ensure_dataset(config.data)
    info = pipeline.load_dataset_info(config.data)
    source = builder.open_source(
        config.data.data_dir, config.data.name, builder.INTERACTIONS, "validation"
    )
    labels = {float(r["label"]) for r in source.__getitems__(list(range(len(source))))}
    assert len(labels) == 1 and info.oracle["validation"]["auc"] is None
    summary = train.train_and_evaluate(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert out.count("AUC undefined: the validation split holds one class only") == 2
    assert summary["validation"]["model"]["auc"] is None and summary["test"]["model"]["auc"]
    assert summary["validation"]["oracle"]["auc"] is None
    assert "validation" in out.split("Results (")[1]  # the report's table has the split
    reader = checkpoint.Checkpointer(tmp_path / "run", read_only=True)
    assert reader.all_steps() == [2, 4] and reader.best_step() is None  # none marked best
    reader.close()
    records = reporting.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "validation/logloss" in r] == [2, 4]
    assert not any("validation/auc" in r for r in records)


def _sigterm_after_each_validation(monkeypatch) -> None:
    """Makes the training loop receive SIGTERM as each validation pass ends."""
    evaluate_split = train.evaluate_split

    def evaluate_then_signal(*args, **kwargs):
        result = evaluate_split(*args, **kwargs)
        if "validation" in args:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "evaluate_split", evaluate_then_signal)


def test_a_signal_during_evaluation_saves_once_and_exits(data_dir, tmp_path, monkeypatch):
    _sigterm_after_each_validation(monkeypatch)  # before the checkpoint of that step
    config = loop_config(data_dir, train__num_steps=20, train__eval_every=5)
    with pytest.raises(SystemExit) as exit_info:
        train.train_and_evaluate(config, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [0, 5]


def test_the_stop_handler_never_drops_a_signal_nor_fails_on_a_closed_stderr(
    monkeypatch, closed_stderr
):
    from mmrec_jax import cli

    delivered = []
    monkeypatch.setattr(cli, "deliver_later", delivered.append)
    stop = train._StopRequest()
    stop(signal.SIGTERM, None)  # the first: a checkpoint, then stop
    assert stop.signum == signal.SIGTERM and not stop.forced
    raised = []

    def collecting(phase, info):  # the second lands in a garbage-collection callback
        if phase == "start" and not raised:
            try:
                stop(signal.SIGTERM, sys._getframe())
                raised.append(None)
            except BaseException as error:
                raised.append(error)

    gc.callbacks.append(collecting)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(collecting)
    assert raised == [None] and delivered == [signal.SIGTERM] and not stop.forced
    with pytest.raises(cli.ExitNow) as exit_info:  # delivered again, outside it
        stop(signal.SIGTERM, None)
    assert exit_info.value.code == 128 + signal.SIGTERM and stop.forced


def test_a_signal_during_the_last_evaluation_stops_before_the_report(
    data_dir, tmp_path, monkeypatch, capsys
):
    _sigterm_after_each_validation(monkeypatch)  # the last: after the loop's last check
    config = loop_config(data_dir, train__num_steps=2, train__eval_every=2)
    with pytest.raises(SystemExit) as exit_info:
        train.train_and_evaluate(config, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "SIGTERM received: training ended at step 2" in capsys.readouterr().out
    assert 2 in checkpoint.Checkpointer(tmp_path, read_only=True).all_steps()
    assert not (tmp_path / "summary.json").exists()  # the report comes with a rerun


def test_a_second_signal_stops_at_once(data_dir, tmp_path, monkeypatch, capsys):
    def hung_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint ...
        os.kill(os.getpid(), signal.SIGINT)  # ... the second, during the evaluation, stops
        pytest.fail("the second signal did not stop the run")

    monkeypatch.setattr(train, "evaluate_split", hung_evaluation)
    config = loop_config(data_dir, train__num_steps=20, train__eval_every=5)
    with pytest.raises(SystemExit) as exit_info:
        train.train_and_evaluate(config, tmp_path)
    assert exit_info.value.code == 128 + signal.SIGINT
    assert "SIGINT received again: stopping without saving" in capsys.readouterr().err
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [0]


def test_a_second_signal_during_a_save_does_not_wait_for_it(data_dir, tmp_path, monkeypatch):
    save, wait = checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait
    waits, checkpointers, stopped = [], [], []

    def save_then_signal_twice(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)  # an asynchronous save is now in flight
        checkpointers.append(self)
        if step == 5:
            stopped.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    def wait_for_writer(self):
        if stopped and not self.read_only:  # a reader's wait has nothing to wait for
            waits.append(self)
        wait(self)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal_twice)
    monkeypatch.setattr(checkpoint.Checkpointer, "wait", wait_for_writer)
    config = loop_config(data_dir, train__num_steps=20, train__checkpoint_every=5)
    config.train.eval_every = 0
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.train_and_evaluate(config, tmp_path)
    finally:
        for checkpointer in checkpointers:
            checkpointer.manager.wait_until_finished()  # before tmp_path goes
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert waits == []  # the run did not block on the save in flight


def _train_cmd(workdir, data_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(TINY),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


def _final_params(workdir):
    _, _, params, _ = train.restore_params(workdir, "latest")
    return jax.tree.map(np.asarray, params)


# Arguments of the subprocess runs: short, checkpointing often, no evaluation; the
# parameters sharded over the devices (and over the processes of a two-process run).
RUN_ARGS = [
    "--config.train.num_steps=30",
    "--config.train.checkpoint_every=10",
    "--config.train.eval_every=0",
    "--config.train.log_every=5",
    "--config.train.fsdp=True",
]


@pytest.fixture(scope="session")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted single-process run on 2 devices (it also builds the dataset)."""
    workdir = tmp_path_factory.mktemp("reference")
    command = _train_cmd(workdir, data_dir, *RUN_ARGS)
    subprocess.run(command, env=subprocess_env(), check=True, timeout=900)
    return workdir


@WITH_REFERENCE_RUN
def test_resume_refuses_another_model_and_keeps_the_run(reference_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = (run / "config.json").read_text()
    config = train.load_run_config(run)
    config.model.width = 64
    with pytest.raises(ConfigError, match="model.width is 32 there and 64 now"):
        train.train_and_evaluate(config, run)
    assert (run / "config.json").read_text() == before
    both = train.load_run_config(run)
    both.model.width, both.seed = 64, 3
    with pytest.raises(ConfigError) as error:
        train.check_resumable(run, both)  # a model field and a training setting: both named
    assert "model.width is 32 there and 64 now" in str(error.value)
    assert "Besides, these training settings cannot change:\n  config.seed=0" in str(error.value)
    # What a resumed run may change: its length, the data loading, the compute dtype.
    same = train.load_run_config(run)
    same.train.num_steps = 60
    same.data.prefetch, same.data.num_workers, same.model.dtype = 0, 2, "bfloat16"
    same.train.grad_clip_norm = 0.5  # clipping stays on
    train.check_resumable(run, same)
    # Every count of the run is in steps of one batch; switching clipping on or off
    # changes the optimizer state's structure.
    switched = train.load_run_config(run)
    switched.train.batch_size, switched.train.grad_accum_steps = 16, 2
    switched.train.grad_clip_norm = 0.0
    switched.seed = 3  # another data order
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(switched, run)
    for needle in (
        "config.train.batch_size=32 there and 16 now",
        "config.train.grad_accum_steps=1 there and 2 now",
        "config.train.grad_clip_norm=1.0 there and 0.0 now",  # every field, not the first
        "config.seed=0 there and 3 now: the seed orders the training examples",
    ):
        assert needle in str(error.value)
    assert (run / "config.json").read_text() == before
    # A finished run rerun with other training settings trains nothing and keeps its record.
    other = train.load_run_config(run)
    other.train.learning_rate = 0.5
    capsys.readouterr()
    train.train_and_evaluate(other, run)
    out = capsys.readouterr().out
    assert "already trained all 30 steps" in out and "Resuming" not in out
    assert (run / "config.json").read_text() == before
    other.train.num_steps = 20  # shorter than the run: said, not silently ignored
    train.train_and_evaluate(other, run)
    assert "trained 30 steps, more than the 20 asked for" in capsys.readouterr().out
    assert (run / "config.json").read_text() == before
    # Without config.json the checkpoints' own record of the config is compared, and the
    # file is written back from it.
    (run / "config.json").unlink()
    with pytest.raises(ConfigError, match="model.width is 32 there and 64 now"):
        train.train_and_evaluate(config, run)
    assert json.loads((run / "config.json").read_text()) == json.loads(before)
    (run / "config.json").write_text(before[:50])  # damaged: readers say so, train repairs it
    with pytest.raises(ConfigError, match=r"config.json is damaged \(.*\): it records the run"):
        train.load_run_config(run)
    train.check_resumable(run, train.load_run_config(reference_run))
    assert json.loads((run / "config.json").read_text()) == json.loads(before)
    # A field only one side has (a run written by another version) is not compared.
    stored = json.loads(before)
    del stored["model"]["fusion"]["mlp_dim"]
    (run / "config.json").write_text(json.dumps(stored))
    same.model.fusion.mlp_dim = 7
    train.check_resumable(run, same)
    # Readers of the run, though, need every field: the missing one is named.
    with pytest.raises(ConfigError, match=r"lacks the fields model\.fusion\.mlp_dim of"):
        train.load_run_config(run)
    (run / "config.json").write_text("[]")  # JSON, but not the settings
    with pytest.raises(ConfigError, match=r"damaged \(it holds a JSON list, not an object\)"):
        train.load_run_config(run)
    (run / "config.json").write_text(json.dumps(stored))
    # On devices that cannot share its batch, the run is pointed at counts that can.
    keep = r"keep its batch size 32 and run on a number of devices that divides it \(1, 2, 4, 8"
    with pytest.raises(ConfigError, match=keep):
        train.train_and_evaluate(same, run, devices=jax.devices()[:3])
    wider = train.load_run_config(reference_run)
    wider.train.batch_size = 36  # nor does 36 split over 8, and a resume keeps 32
    with pytest.raises(ConfigError, match=r"use 32 or 40; to resume this one, keep .* 32"):
        train.train_and_evaluate(wider, run)
    # Another dataset under the same name and settings (here: more users) is refused.
    train.check_resumable(run, same, pipeline.load_dataset_info(same.data))
    same.data.negatives_per_positive = 2  # no negatives are sampled for labelled data
    train.check_resumable(run, same, pipeline.load_dataset_info(same.data))
    with pytest.raises(ConfigError, match="data.negatives_per_positive is 0 there and 2 now"):
        train.check_resumable(run, same)  # without the dataset, it may matter
    other = tiny_config(tmp_path / "other", data__synthetic__num_users=50)
    pipeline.ensure_dataset(other.data)
    with pytest.raises(pipeline.DatasetMismatchError, match="num_users 60 then, 50 now"):
        train.check_resumable(run, same, pipeline.load_dataset_info(other.data))
    # Without checkpoints (a run that stopped before saving) any config may start there.
    shutil.rmtree(run / "checkpoints")
    train.check_resumable(run, config)


@WITH_REFERENCE_RUN
def test_resuming_on_another_device_count_says_what_changes(reference_run):
    reader = checkpoint.Checkpointer(reference_run, read_only=True)
    meta = reader.restore_meta(30)
    reader.close()
    assert meta["devices"] == 2  # subprocess_env's
    note = train._device_count_note(meta, 8, 30)
    assert note.startswith("Step 30 was saved by a run on 2 devices; this one has 8.")
    assert "differ from a run kept on 2 devices in float rounding" in note
    assert train._device_count_note(meta, 2, 30) is None
    assert train._device_count_note({}, 8, 30) is None  # saved before devices were recorded


@WITH_REFERENCE_RUN
def test_a_resumed_run_restores_its_state_without_creating_one(
    reference_run, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "checkpoints" / "30")
    built = []
    build = train.train_step.build_train_state

    def build_train_state(*args, **kwargs):
        built.append("shapes" if kwargs.get("abstract") else "arrays")
        return build(*args, **kwargs)

    monkeypatch.setattr(train.train_step, "build_train_state", build_train_state)
    train.train_and_evaluate(train.load_run_config(run), run)
    assert built == ["shapes"]  # restored into them from step 20: no state made to discard
    assert max(_losses(run)) == 30


@WITH_REFERENCE_RUN
def test_damaged_newest_checkpoint_is_set_aside_and_its_steps_retrained(
    data_dir, reference_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest = run / "checkpoints" / "30"
    for path in (newest / "state").rglob("*"):
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    command = _train_cmd(run, data_dir, *RUN_ARGS)
    out = subprocess.run(
        command, env=subprocess_env(), check=True, timeout=900, capture_output=True, text=True
    ).stdout
    assert "is damaged and was skipped" in out and "step 20" in out
    assert "was saved by a run on" not in out  # the same 2 devices: nothing changes
    assert f"Moved damaged checkpoint step 30 to {run / 'checkpoints_damaged' / '30'}" in out
    assert (run / "checkpoints_damaged" / "30" / "state").is_dir()
    # Steps 21-30 trained again from checkpoint 20 give the uninterrupted run's parameters.
    full, again = _final_params(reference_run), _final_params(run)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@WITH_REFERENCE_RUN
def test_a_damaged_best_checkpoint_is_named_by_readers_and_the_report_falls_back(
    reference_run, tmp_path, monkeypatch, capsys
):
    from mmrec_jax import evaluate

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    best = run / "checkpoints" / "20"  # as if validation had picked step 20
    monkeypatch.setattr(checkpoint.Checkpointer, "best_step", lambda self: 20)
    largest = max((p for p in (best / "state").rglob("*") if p.is_file()), key=os.path.getsize)
    largest.write_bytes(largest.read_bytes()[:100])  # cut short, as by a failing disk
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(run), "--split", "test"])
    gc.collect()  # the reads abandoned by the failed restore report here, and are dropped
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
    assert f"Checkpoint {best} cannot be restored" in err
    others = sorted(int(p.name) for p in best.parent.iterdir() if p != best)
    assert f"other checkpoints are steps {others}: evaluate or export one of them" in err
    assert f"(--checkpoint {others[-1]}: the newest)" in err
    # The finished run, rerun, reports its final state with a warning instead of failing.
    train.train_and_evaluate(train.load_run_config(run), run)
    out = capsys.readouterr().out
    assert f"WARNING: Checkpoint {best} cannot be restored" in out
    sizes = pipeline.load_dataset_info(train.load_run_config(run).data).split_sizes
    sample = min(max(sizes["validation"], 1000), sizes["train"])
    sampled = f"{sample} of its {sizes['train']} interactions, at random"
    if sample == sizes["train"]:
        sampled = f"all {sample} interactions"
    assert f"Results (final state, step 30; train: {sampled})" in out
    recorded = json.loads((run / "summary.json").read_text())["train_sample"]
    assert recorded == {"interactions": sample, "of": sizes["train"]}
    assert json.loads((run / "summary.json").read_text())["checkpoint_step"] == 30
    assert best.is_dir()  # readers move nothing


def _wait_while_running(process, ready, timeout: float = 600) -> None:
    """Returns once `ready()` holds, the process has ended, or `timeout` seconds passed."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)


def _logged_past(workdir, step: int) -> bool:
    """Whether the run in `workdir` has logged a record of `step` or later."""
    return any(r.get("step", 0) >= step for r in reporting.read_metrics(workdir))


def _checkpoint_steps(workdir) -> list[int]:
    """The steps of the finished checkpoints in `workdir` (Orbax renames a step's folder
    to its number once the step is complete)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


@WITH_REFERENCE_RUN
@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(
    data_dir, reference_run, tmp_path
):
    # SIGTERM: the run saves a checkpoint at once and exits with the signal's status.
    run = tmp_path / "run"
    process = subprocess.Popen(
        _train_cmd(run, data_dir, *RUN_ARGS),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_while_running(process, lambda: _logged_past(run, 5))
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM received: saved checkpoint step" in output
    saved = int(output.split("SIGTERM received: saved checkpoint step")[1].split()[0])
    assert 5 <= saved < 20 and saved in _checkpoint_steps(run)  # another save lies ahead
    # SIGKILL of the resumed run once it has saved a checkpoint of its own: no warning,
    # nothing saved, the steps after that checkpoint lost.
    process = subprocess.Popen(
        _train_cmd(run, data_dir, *RUN_ARGS),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_while_running(process, lambda: max(_checkpoint_steps(run)) > saved)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(_checkpoint_steps(run)) < 30 and reporting.read_metrics(run)[-1]["step"] < 30
    # Resumed once more, the run ends as the uninterrupted one did.
    _resume_and_compare(run, data_dir, reference_run)


def _resume_and_compare(workdir, data_dir, reference_run):
    """Reruns the interrupted run; its final parameters and records equal the reference's."""
    command = _train_cmd(workdir, data_dir, *RUN_ARGS)
    subprocess.run(command, env=subprocess_env(), check=True, timeout=900)
    full, resumed = _final_params(reference_run), _final_params(workdir)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # The steps trained again after the checkpoint are recorded once, with the values of
    # the uninterrupted run (a window cut by the interruption included).
    names = ("step", "train/loss", "train/grad_norm", "train/learning_rate")

    def logged(run):
        records = reporting.read_metrics(run)
        return [tuple(r[n] for n in names) for r in records if "train/loss" in r]

    assert logged(workdir) == logged(reference_run)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.train.batch_size=100000", "larger than the training split"),
        ("--config.data.history_len=51", "history_len=51 must lie in [1, "),
    ],
)
def test_config_that_does_not_fit_the_dataset_exits_with_the_fix(
    data_dir, tmp_path, override, needle
):
    """Values fine in themselves but wrong for the dataset: status 2, no traceback."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(TINY),
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.data_dir={data_dir}",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and "train.py: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_absurd_learning_rate_stops_with_nan_message(data_dir, tmp_path):
    overrides = dict(
        learning_rate=1e30,
        num_steps=40,
        checkpoint_every=2,
        eval_every=0,
        log_every=1,
        warmup_steps=0,
        grad_clip_norm=0.0,
    )
    result = subprocess.run(
        _train_cmd(tmp_path, data_dir, *(f"--config.train.{k}={v}" for k, v in overrides.items())),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # train.py ends with the message alone: no traceback to bury it.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: error: Training diverged")
    assert "at step" in message and "last good checkpoint is step" in message
    _, _, params, step = train.restore_params(tmp_path, "latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert f"checkpoint is step {step} " in message


def test_out_of_memory_names_the_fixes_and_keeps_the_checkpoints(
    data_dir, tmp_path, monkeypatch, capsys
):
    from mmrec_jax import sharding

    # Moving the batch of step 5 to the devices fails as XLA does when memory runs out.
    real_global_batch, calls = sharding.global_batch, []

    def global_batch(mesh, batch):
        calls.append(1)
        if len(calls) == 6:  # the example batch, then steps 1-5
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes."
            )
        return real_global_batch(mesh, batch)

    monkeypatch.setattr(sharding, "global_batch", global_batch)
    base = dict(train__num_steps=6, train__checkpoint_every=2, train__eval_every=0)
    with pytest.raises(train.OutOfMemory) as info:
        train.train_and_evaluate(loop_config(data_dir, **base), tmp_path)
    message = str(info.value)
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    assert "Out of memory after step 4" in message and "allocating 9 bytes" in message
    assert f"Checkpoint step 4 in {tmp_path / 'checkpoints'} is intact" in message
    assert "--config.train.fsdp=True (resumes)" in message
    assert "--config.train.batch_size=16 --config.train.grad_accum_steps=2 (in a new" in message
    _, _, params, step = train.restore_params(tmp_path, "latest")
    assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # The fixes the message says resume do resume from that checkpoint; the others do not.
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    halved = loop_config(data_dir, **base, train__batch_size=16, train__grad_accum_steps=2)
    with pytest.raises(ConfigError, match="batch_size=32 there and 16 now"):
        train.train_and_evaluate(halved, tmp_path)
    sharded = loop_config(data_dir, **base, train__fsdp=True)
    capsys.readouterr()
    train.train_and_evaluate(sharded, tmp_path)
    assert "Resuming from checkpoint step 4" in capsys.readouterr().out
    assert train.restore_params(tmp_path, "latest")[3] == 6
    # Out of memory restoring says the checkpoints are intact, and moves none aside.

    def restore(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5 bytes.")

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore)
    with pytest.raises(train.OutOfMemory) as info:
        train.train_and_evaluate(sharded, tmp_path)
    assert "Out of memory restoring the parameters" in str(info.value)
    assert f"The checkpoints in {tmp_path / 'checkpoints'} are intact" in str(info.value)
    assert "a smaller text model (in a new --workdir: another model)" in str(info.value)
    assert not (tmp_path / "checkpoints_damaged").exists()
    assert "damaged" not in capsys.readouterr().out


def test_a_full_disk_while_training_names_the_intact_checkpoint(data_dir, tmp_path, monkeypatch):
    # The records of step 4 cannot be written, as on a full disk.
    real_write = reporting.MetricsWriter.write

    def write(self, step, metrics):
        if step >= 4:
            raise OSError(28, "No space left on device", str(self.path))
        real_write(self, step, metrics)

    monkeypatch.setattr(reporting.MetricsWriter, "write", write)
    config = loop_config(
        data_dir,
        train__num_steps=6,
        train__log_every=2,
        train__checkpoint_every=2,
        train__eval_every=0,
    )
    with pytest.raises(train.StorageError) as info:
        train.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert message.startswith("Training stopped at step 4: No space left on device (")
    assert f"{tmp_path / 'metrics.jsonl'}). Checkpoint step 2 in" in message
    assert "rerun the same command" in message
    assert train.restore_params(tmp_path, "latest")[3] == 2
    # Once the disk has room again, the same command resumes and finishes the run; a
    # report that cannot be written says so, and a rerun reports again.
    monkeypatch.setattr(reporting.MetricsWriter, "write", real_write)
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(train.StorageError, match="The results above could not be written"):
        train.train_and_evaluate(config, tmp_path)
    assert train.restore_params(tmp_path, "latest")[3] == 6
    (tmp_path / "summary.json").rmdir()
    train.train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint_step"] == 6
    # Records that cannot be written at the start stop the run before it trains.
    fresh = tmp_path / "fresh"
    (fresh / "config.json").mkdir(parents=True)
    with pytest.raises(train.StorageError, match=r"Training could not start: Is a directory \("):
        train.train_and_evaluate(config, fresh)
    assert not any((fresh / "checkpoints").iterdir())  # nothing was saved


def test_a_damaged_dataset_stops_the_run_before_it_trains(data_dir, tmp_path):
    config = loop_config(data_dir, train__num_steps=2)
    pipeline.ensure_dataset(config.data)
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    folder = builder.config_dir(copy, config.data.name, builder.INTERACTIONS)
    shard = next(folder.glob(f"{config.data.name}-test.array_record-*"))
    shard.write_bytes(shard.read_bytes()[:1000])  # read only after training, before
    config.data.data_dir = str(copy)
    with pytest.raises(builder.DatasetDamagedError, match=f"the test records of {folder}"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not any((tmp_path / "run" / "checkpoints").glob("*"))  # nothing was trained


def test_out_of_memory_creating_the_state_names_the_fixes(data_dir, tmp_path, monkeypatch):
    build_shapes = train.train_step.build_train_state

    def build_train_state(*args, **kwargs):
        if kwargs.get("abstract"):  # only shapes: nothing allocated
            return build_shapes(*args, **kwargs)
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 7 bytes.")

    monkeypatch.setattr(train.train_step, "build_train_state", build_train_state)
    with pytest.raises(train.OutOfMemory) as info:
        train.train_and_evaluate(loop_config(data_dir, train__num_steps=2), tmp_path)
    message = str(info.value)
    assert "creating the parameters and optimizer state on 8 device(s)" in message
    assert "allocating 7 bytes" in message and "Nothing was trained or saved yet" in message
    assert "--config.train.fsdp=True" in message
    assert not any((tmp_path / "checkpoints").glob("*"))


def test_every_process_stops_when_process_0_cannot_take_the_workdir(data_dir, tmp_path):
    from mmrec_jax import files

    with files.exclusive_lock(tmp_path / ".lock"):  # a run already trains there
        outputs = launch_two_processes(_train_cmd(tmp_path, data_dir), returncode=2)
    assert "Another training process is running in" in outputs[0]
    assert "Process 0 cannot train in the workdir" in outputs[1]


def test_every_process_stops_when_process_0_cannot_write_the_records(data_dir, tmp_path):
    # metrics.jsonl is a folder: process 0's first record fails, as on a full disk.
    (tmp_path / "metrics.jsonl").mkdir()
    args = ["--config.train.num_steps=4", "--config.train.log_every=2"]
    outputs = launch_two_processes(_train_cmd(tmp_path, data_dir, *args), returncode=1)
    assert "Training stopped at step 2: Is a directory (" in outputs[0]
    assert "Training stopped at step 2: process 0 could not write the run's records" in outputs[1]
    assert "Checkpoint step 0 in" in outputs[1] and "rerun the same command" in outputs[1]


@WITH_REFERENCE_RUN
@pytest.mark.slow
def test_two_processes_match_one_also_when_one_of_them_is_stopped(
    data_dir, reference_run, tmp_path
):
    # SIGTERM reaches process 1 only: both save the same step together and stop.
    multi = tmp_path / "multi"
    processes = start_two_processes(_train_cmd(multi, data_dir, *RUN_ARGS))
    _wait_while_running(processes[1], lambda: _logged_past(multi, 5))
    processes[1].send_signal(signal.SIGTERM)
    outputs = finish(processes, returncode=128 + signal.SIGTERM)
    assert "saving a checkpoint at the next logging step" in outputs[1]
    saved = int(outputs[0].split("SIGTERM received: saved checkpoint step")[1].split()[0])
    assert 5 <= saved < 30 and saved % 5 == 0
    launch_two_processes(_train_cmd(multi, data_dir, *RUN_ARGS))
    one, two = _losses(reference_run), _losses(multi)
    assert sorted(one) == sorted(two) and 30 in one
    # The gradient sums cross processes in another order than within one: rounding that
    # Adam carries from step to step (1.7e-5 of the loss by step 30 on the tiny config).
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step]), (step, one, two)


# Evaluation and then export in one process of a two-process run, as a user's script may
# call them: each main joins the run (the second finds it up).
EVALUATE_THEN_EXPORT = """
import sys

from mmrec_jax import evaluate, export

workdir, out = sys.argv[1:]
run = ["--workdir", workdir, "--checkpoint", "latest"]
status = evaluate.main([*run, "--split", "test", "--k", "5"])
sys.exit(status or export.main([*run, "--out", out]))
"""


@WITH_REFERENCE_RUN
@pytest.mark.slow
def test_two_process_evaluate_and_export_match_one(reference_run, tmp_path):
    from safetensors.numpy import load_file

    from mmrec_jax import evaluate, export

    one = evaluate.evaluate_run(reference_run, ["test"], "latest", (5,))["test"]
    single_export = export.export_run(reference_run, tmp_path / "one", "latest")
    (reference_run / "eval" / "test.json").unlink()

    double_export = tmp_path / "two"
    script = tmp_path / "evaluate_then_export.py"
    script.write_text(EVALUATE_THEN_EXPORT)
    outputs = launch_two_processes(
        [sys.executable, str(script), str(reference_run), str(double_export)]
    )
    two = json.loads((reference_run / "eval" / "test.json").read_text())
    for wrote in ("Wrote", "Exported step"):  # process 0 reports
        assert wrote in outputs[0] and wrote not in outputs[1], wrote
    for group in ("click", "ranking"):
        for name, value in one[group].items():
            if isinstance(value, float):
                assert two[group][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
            else:
                assert two[group][name] == value, name

    a = load_file(single_export / "params.safetensors")
    b = load_file(double_export / "params.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for name in ("item_embeddings.npy", "user_history.npy"):
        np.testing.assert_allclose(
            np.load(single_export / name), np.load(double_export / name), rtol=1e-6
        )
