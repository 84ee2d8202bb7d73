"""Config files and command-line overrides."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrec_jax.config import (
    ConfigError,
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


def test_json_round_trip():
    config = load_config(ROOT / "configs/default.py")
    restored = config_from_dict(json.loads(config_to_json(config)))
    assert restored.to_dict() == config.to_dict()


def test_train_py_rejects_unknown_key(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(ROOT / "configs/tiny.py"),
            "--workdir",
            str(tmp_path),
            "--config.no_such_key=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no_such_key" in result.stderr


def test_missing_config_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")
