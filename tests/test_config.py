"""Config files and command-line overrides."""

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.config import (
    ConfigError,
    check_values,
    config_from_dict,
    config_to_json,
    load_config,
    split_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("[a-z]*.py"))


def test_every_default_field_has_a_comment():
    """configs/default.py defines every field; each has a comment on the line above it."""
    path = ROOT / "configs/default.py"
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Assign):
            continue
        if not any(isinstance(target, ast.Attribute) for target in node.targets):
            continue
        above = lines[node.lineno - 2].strip()
        assert above.startswith("#"), f"default.py:{node.lineno} field without a comment above"


def test_derived_configs_only_set_known_fields():
    """Other configs start from the default and change its fields, never invent new ones."""
    keys = _flat_keys(load_config(ROOT / "configs/default.py").to_dict())
    for path in CONFIGS:
        assert _flat_keys(load_config(path).to_dict()) == keys, path.name


def _flat_keys(tree, prefix=""):
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load(path):
    config = load_config(path)
    assert {"seed", "data", "model", "train"} <= set(config.keys())


def test_override_keeps_types():
    config = load_config(
        ROOT / "configs/tiny.py",
        [
            ("train.batch_size", "64"),
            ("train.learning_rate", "0.5"),
            ("train.fsdp", "true"),
            ("model.image.channels", "(3,5)"),
            ("model.towers", "id"),
        ],
    )
    assert config.train.batch_size == 64 and isinstance(config.train.batch_size, int)
    assert config.train.learning_rate == 0.5
    assert config.train.fsdp is True
    assert config.model.image.channels == (3, 5)
    assert config.model.towers == "id"


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("no_such_key", "1", "no_such_key"),
        ("model.image.chanels", "1", "chanels"),
        ("train.batch_size", "abc", "train.batch_size"),
        ("train.fsdp", "maybe", "train.fsdp"),
        ("model", "1", "model"),
    ],
)
def test_bad_override_names_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ROOT / "configs/tiny.py", [(key, value)])


def test_split_overrides_both_spellings():
    others, overrides = split_overrides(
        ["--workdir", "x", "--config.a.b=1", "--config.c", "2", "--config", "f.py"]
    )
    assert others == ["--workdir", "x", "--config", "f.py"]
    assert overrides == [("a.b", "1"), ("c", "2")]


@pytest.mark.parametrize(
    "argv",
    [["--config.train.batch_size"], ["--config.train.batch_size", "--workdir", "runs/x"]],
)
def test_split_overrides_missing_value(argv):
    # A flag after the key is not its value: the user left the value out.
    with pytest.raises(ConfigError, match="'--config.train.batch_size' has no value"):
        split_overrides(argv)


def test_config_argument_documents_and_applies_overrides():
    parser = argparse.ArgumentParser(prog="train.py")
    cli.add_config_argument(parser)
    assert "--config.KEY=VALUE" in parser.format_help()
    args, config = cli.parse_config_args(
        parser, ["--config.train.batch_size=4", "--config", str(ROOT / "configs/tiny.py")]
    )
    assert args.config.endswith("tiny.py") and config.train.batch_size == 4


def test_split_overrides_negative_value():
    _, overrides = split_overrides(["--config.train.max_loss", "-1"])
    assert overrides == [("train.max_loss", "-1")]


def test_json_round_trip():
    config = load_config(ROOT / "configs/default.py")
    restored = config_from_dict(json.loads(config_to_json(config)))
    assert restored.to_dict() == config.to_dict()


def _train_py(workdir, *overrides) -> subprocess.CompletedProcess:
    """train.py on the tiny config with `overrides`, its output captured."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py")]
    return subprocess.run(
        [*command, "--workdir", str(workdir), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_train_py_rejects_unknown_key(tmp_path):
    result = _train_py(tmp_path, "--config.no_such_key=1")
    assert result.returncode == 2
    assert "no_such_key" in result.stderr


def test_missing_config_file_is_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/default.py is not found from here
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config("configs/default.py")
    assert str(tmp_path) in str(info.value)  # where relative paths start
    assert f"configs are in {Path(__file__).resolve().parents[1] / 'configs'}" in str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_pass_the_value_checks(path):
    check_values(load_config(path))


# String fields checked where they are used: free names, a path, a parsed list.
FREE_STRINGS = {"data.name", "data.data_dir", "model.text.model", "model.towers"}
FREE_STRINGS |= {"train.tower_lr_scale"}


def test_every_default_field_has_a_value_check():
    """A new numeric or named-choice field must get a rule, or bad values go unchecked."""
    choices = config_lib._choice_rules()
    for key, value in config_lib.flatten(load_config(ROOT / "configs/default.py")).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, str):
            assert key in choices or key in FREE_STRINGS, f"{key}: no choice rule"
        else:
            assert key in config_lib._VALUE_RULES, f"{key}={value!r}: no range rule"


def test_a_misspelt_field_is_named_with_the_one_meant():
    config = load_config(ROOT / "configs/default.py")
    with config.model.fusion.unlocked():
        config.model.fusion.num_head = 3
    with config.unlocked():
        config.banana = 1
    with pytest.raises(ConfigError) as error:
        check_values(config)
    message = str(error.value)
    assert (
        "config.model.fusion.num_head is not a field of the config: did you mean "
        "config.model.fusion.num_heads? Remove it." in message
    )
    assert "config.banana is not a field of the config: Remove it." in message


def test_build_model_checks_the_model_config():
    """What research code passes to build_model gets the checks train.py runs."""
    from mmrec_jax.models.recommender import build_model

    def model_config(**fields):
        config = load_config(ROOT / "configs/default.py").model
        config.num_users, config.num_items = 5, 7
        for dotted, value in fields.items():
            *groups, leaf = dotted.split("__")
            node = config
            for group in groups:
                node = node[group]
            with node.unlocked():
                node[leaf] = value
        return config

    build_model(model_config())
    build_model(model_config().to_dict())  # a plain dict works too
    for fields, needle in [
        ({"fusion__dropout": 1.5}, "config.model.fusion.dropout=1.5 must be a number in [0, 1)"),
        ({"audio__hop_length": 0}, "config.model.audio.hop_length=0 must be an integer >= 1"),
        ({"param_dtype": "float8"}, "config.model.param_dtype='float8' must be one of"),
        ({"fusion__num_head": 3}, "did you mean config.model.fusion.num_heads?"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            build_model(model_config(**fields))
    with pytest.raises(ConfigError, match="Pass config.model, not the whole config"):
        build_model(load_config(ROOT / "configs/default.py"))


def test_settings_that_cannot_work_are_refused():
    for overrides, needle in [
        # Adam's update underflows in float16 parameters: NaN at the first step.
        ([("model.param_dtype", "float16")], "param_dtype='float16' must be one of float32, "),
        (
            [("model.audio.n_fft", "64"), ("model.audio.mel_bins", "200")],
            "mel_bins=200 is too many for config.model.audio.n_fft=64: 138 of the mel filters "
            "fall between its 33 frequency bins and stay empty",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(ROOT / "configs/default.py", overrides)
    load_config(ROOT / "configs/default.py", [("model.audio.mel_bins", "64")])  # all filled


def test_a_missing_field_is_named():
    """Every field a run reads must be there (older runs lack only profile_steps)."""
    for key in config_lib.flatten(load_config(ROOT / "configs/default.py")):
        config = load_config(ROOT / "configs/default.py")
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        with node.unlocked():
            del node[leaf]
        if key == "train.profile_steps":
            check_values(config)
            continue
        with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)} is missing: add it"):
            check_values(config)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ([("train.batch_size", "0")], "config.train.batch_size=0 must be an integer >= 1"),
        ([("train.learning_rate", "nan")], "config.train.learning_rate=nan must be a finite"),
        ([("train.learning_rate", "inf")], "config.train.learning_rate=inf must be a finite"),
        ([("train.learning_rate", "-1e-3")], "config.train.learning_rate=-0.001"),
        ([("model.fusion.dropout", "1.0")], r"config.model.fusion.dropout=1.0 must be .* \[0, 1\)"),
        ([("data.history_len", "-3")], "config.data.history_len=-3"),
        ([("model.image.channels", "()")], r"config.model.image.channels=\(\)"),
        ([("model.audio.channels", "(4, 0)")], r"config.model.audio.channels=\(4, 0\)"),
        ([("model.text.mode", "foo")], "config.model.text.mode='foo' must be one of frozen"),
        ([("model.dtype", "float64")], "config.model.dtype='float64'"),
        ([("model.towers", "text,foo")], "unknown or empty tower list"),
        ([("model.fusion.num_heads", "7")], "width=32 does not split into .*fusion.num_heads=7"),
        ([("train.num_epochs", "0")], "train nothing"),
        ([("train.tower_lr_scale", "text")], "'text' is not NAME=NUMBER"),
        ([("train.tower_lr_scale", "text=nan")], "scale of 'text' must be a finite number >= 0"),
        ([("train.tower_lr_scale", "image=-5")], "scale of 'image' must be a finite"),
        ([("train.tower_lr_scale", "txt=0.1")], r"names \['txt'\], which are no towers"),
        ([("data.data_dir", "")], "config.data.data_dir='' must be a folder"),
        ([("data.name", " ")], "config.data.name=' ' must be a dataset name"),
        ([("model.towers", "history")], "towers='history' has no item tower"),
        ([("model.image.size", "2")], r"image.size=2 is too small for 2 2x2 pooling .* 4 or"),
        (
            [("model.audio.clip_samples", "10")],  # n_fft 256 in the default log-mel front end
            "clip_samples=10 is too short for config.model.audio.n_fft=256",
        ),
        (
            [("model.audio.frontend", "raw"), ("model.audio.clip_samples", "3")],
            "clip_samples=3 gives 3 samples, too few for 2 2x pooling blocks",
        ),
    ],
)
def test_bad_values_are_named_before_any_work(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ROOT / "configs/tiny.py", overrides)


def test_value_checks_report_every_bad_field_and_allow_what_is_sane():
    with pytest.raises(ConfigError) as error:
        load_config(
            ROOT / "configs/tiny.py",
            [("train.batch_size", "0"), ("train.warmup_steps", "-1"), ("seed", "-2")],
        )
    assert all(k in str(error.value) for k in ("batch_size=0", "warmup_steps=-1", "seed=-2"))
    # Edges that are valid: no dropout, no clipping, no loss limit, steps instead of epochs.
    config = load_config(
        ROOT / "configs/tiny.py",
        [
            ("model.fusion.dropout", "0"),
            ("train.grad_clip_norm", "0"),
            ("train.max_loss", "inf"),
            ("train.num_epochs", "0"),
            ("train.num_steps", "5"),
        ],
    )
    assert config.train.num_steps == 5
    # A fractional memory budget, also where an older run's config.json holds an integer.
    config = load_config(ROOT / "configs/tiny.py", [("data.max_item_memory_mib", "0.5")])
    assert config.data.max_item_memory_mib == 0.5
    stored = json.loads(config_lib.config_to_json(config))
    stored["data"]["max_item_memory_mib"] = 4096  # as a run's config.json once held it
    config = config_lib.config_from_dict(stored)
    assert isinstance(config.data.max_item_memory_mib, int)
    config_lib.apply_override(config, "data.max_item_memory_mib", "0.5")
    assert config.data.max_item_memory_mib == 0.5
    with pytest.raises(ConfigError, match="expects an integer"):
        config_lib.apply_override(config, "train.batch_size", "0.5")
    # The user tower's heads only matter when the history tower is used.
    load_config(
        ROOT / "configs/tiny.py", [("model.user.num_heads", "7"), ("model.towers", "text,id")]
    )
    with pytest.raises(ConfigError, match="user.num_heads=7"):
        load_config(ROOT / "configs/tiny.py", [("model.user.num_heads", "7")])


def test_train_and_evaluate_checks_values_before_building_the_dataset(tmp_path):
    from mmrec_jax import train

    config = load_config(ROOT / "configs/tiny.py")
    config.data.data_dir = str(tmp_path / "data")
    config.train.batch_size = -4
    with pytest.raises(ConfigError, match="batch_size=-4"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "data").exists()
    # A batch the 8 devices cannot share equally: named with the sizes that divide.
    config.train.batch_size = 30
    with pytest.raises(ConfigError, match=r"batch_size=30 must be divisible .* \(8\).* 24 or 32"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()  # the failed start took its new workdir away
    (tmp_path / "mine").mkdir()  # a workdir that was there before is left
    with pytest.raises(ConfigError, match=r"batch_size=30 must be divisible"):
        train.train_and_evaluate(config, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()
    config.train.batch_size = 4
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file; pass a folder"):
        train.train_and_evaluate(config, tmp_path / "file")
    with pytest.raises(ConfigError, match="The workdir is empty"):
        train.train_and_evaluate(config, "")
    config.model.dtype = "float16"  # valid on a GPU; this suite runs on the CPU
    with pytest.raises(ConfigError, match="'float16' does not run on a CPU"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "data").exists()


def test_train_py_reports_bad_values_without_a_traceback(tmp_path):
    result = _train_py(tmp_path, "--config.train.batch_size=0")
    assert result.returncode == 2
    assert "config.train.batch_size=0 must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_py_names_the_config_key_of_a_missing_text_model(tmp_path):
    result = _train_py(
        tmp_path / "run",
        f"--config.data.data_dir={tmp_path / 'data'}",
        f"--config.model.text.model={tmp_path / 'no_such_bert'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: config.model.text.model: Pretrained text model" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_runs_config_json_loads_as_a_config(tmp_path):
    """train.py --config RUN/config.json reruns or resumes a run with its own settings."""
    original = load_config(ROOT / "configs/tiny.py")
    (tmp_path / "config.json").write_text(config_to_json(original))
    loaded = load_config(tmp_path / "config.json", [("train.num_steps", "7")])
    assert loaded.train.num_steps == 7
    loaded.train.num_steps = original.train.num_steps
    assert loaded.to_dict() == original.to_dict()
    assert loaded.model.image.channels == original.model.image.channels  # tuples again


def test_unusable_config_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("batch_size = 3")
    with pytest.raises(ConfigError, match="neither a Python config"):
        load_config(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(tmp_path / "list.json")
    # Errors in the user's own Python: named with the file and line, not a traceback.
    (tmp_path / "syntax.py").write_text("def get_config():\n    return (\n")
    with pytest.raises(ConfigError, match=r"syntax.py' failed to load: line \d+: SyntaxError"):
        load_config(tmp_path / "syntax.py")
    (tmp_path / "raises.py").write_text("X = 1\n\n\ndef get_config():\n    return {}['key']\n")
    with pytest.raises(ConfigError, match=r"raises.py' failed to load: line 5: KeyError"):
        load_config(tmp_path / "raises.py")


COMMAND_ENDING = """
import gc, os, signal, sys, threading, time
from argparse import ArgumentParser
from mmrec_jax.cli import ExitNow, exits_quietly

with exits_quietly(ArgumentParser(prog="prog"), exit_process=True):
    threading.Thread(target=time.sleep, args=(60,)).start()  # work that would keep it alive
    how = sys.argv[1]
    if how == "ctrl-c":
        raise KeyboardInterrupt
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if how == "swallowed":  # an interrupt inside native code, surfacing as another error
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None
    if how == "exit-now":
        raise ExitNow(7)
    if how.startswith("during-gc"):  # as when Ctrl-C lands in JAX's gc callback

        def collecting(phase, info):
            if phase == "start" and not os.environ.get("SENT"):
                os.environ["SENT"] = "1"
                signal.raise_signal(signal.SIGINT)

        gc.callbacks.append(collecting)
        gc.collect()
    if how != "during-gc-at-the-end":  # else the block ends before the signal comes again
        time.sleep(60)
"""


@pytest.mark.parametrize(
    "how,status,said",
    [
        ("ctrl-c", 130, "prog: interrupted."),
        ("sigterm", 143, "prog: stopped by SIGTERM."),
        ("swallowed", 130, "prog: interrupted."),
        ("exit-now", 7, ""),
        ("during-gc", 130, "prog: interrupted."),
        ("during-gc-at-the-end", 130, "prog: interrupted."),
    ],
)
def test_commands_end_at_once_with_one_line_on_a_signal(how, status, said):
    ended = subprocess.run(
        [sys.executable, "-c", COMMAND_ENDING, how],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,  # the thread's 60 s are not waited for
    )
    assert (ended.returncode, ended.stderr.strip()) == (status, said)


def test_a_command_called_in_process_raises_systemexit(capsys):
    from mmrec_jax import cli

    parser = argparse.ArgumentParser(prog="prog")
    with pytest.raises(SystemExit) as exit_info, cli.exits_quietly(parser):
        raise KeyboardInterrupt  # a notebook's interrupt: its kernel lives on
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "prog: interrupted."


def test_an_interrupted_command_ends_with_its_status_on_a_closed_stderr(closed_stderr):
    from mmrec_jax import cli

    with pytest.raises(SystemExit) as exit_info, cli.exits_quietly(argparse.ArgumentParser()):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130


def test_commands_end_on_a_closed_pipe_and_unwritable_output_with_one_line(tmp_path, capsys):
    from mmrec_jax.data import synthetic

    # Output piped into a program that stops reading (`| head`): no traceback either.
    script = (
        "import argparse\nfrom mmrec_jax.cli import exits_quietly\n"
        "with exits_quietly(argparse.ArgumentParser(prog='p')):\n"
        "    for i in range(10**6):\n        print(i)\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert reader.stdout.readline() == b"0\n"
    reader.stdout.close()
    assert reader.wait(timeout=60) == 141
    assert reader.stderr.read() == b""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--output", str(tmp_path / "file" / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write in --output" in err and "Not a directory" in err
    assert "Traceback" not in err


def test_commands_show_warnings_without_the_source_line(monkeypatch):
    import warnings

    from mmrec_jax import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    cli.show_warnings_plainly()
    shown = warnings.formatwarning("Cannot write the cache", UserWarning, "cache.py", 7, None)
    assert shown == "UserWarning: Cannot write the cache\n"
