"""Loading run configurations: a config file plus `--config.KEY=VALUE` overrides.

Config files are Python files with a `get_config()` returning an
`ml_collections.ConfigDict` (see `configs/`). Overrides name a dotted key and a value
that is parsed to the type the key already has; an unknown key or a value of the
wrong type is a `ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

_OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`.

    Args:
      path: a Python file defining `get_config()`.

    Raises:
      ConfigError: the file does not exist or defines no `get_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {str(path)!r} does not exist. Pass one of the files in configs/, "
            "for example --config configs/default.py."
        )
    # Config files import each other as `configs.<name>`: make the folder above importable.
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_mmrec_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {str(path)!r} defines no get_config() function.")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict."
        )
    return config


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Config key {key!r} is a bool; got {text!r}. Use true or false.")


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` to the type of `current`, the value the key has now."""
    try:
        if isinstance(current, bool):
            return _parse_bool(key, text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            stripped = text.strip()
            if stripped.startswith(("(", "[")):
                value = ast.literal_eval(stripped)
            else:
                value = ast.literal_eval(f"({stripped},)") if stripped else ()
            if not isinstance(value, (tuple, list)):
                raise ValueError(text)
            return type(current)(value)
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError) as error:
        raise ConfigError(
            f"Config key {key!r} expects a {type(current).__name__} (now {current!r}); "
            f"cannot parse {text!r}."
        ) from error
    raise ConfigError(f"Config key {key!r} holds a {type(current).__name__}, which cannot be set.")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` of `config` from its command-line text, keeping the key's type.

    Raises:
      ConfigError: the key does not exist or the value does not parse to its type.
    """
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = f"config.{prefix}" if prefix else "config"
            known = (
                ", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict)
                else ""
            )
            raise ConfigError(
                f"Unknown config key {key!r}: {where} has no field {part!r}. "
                f"Known fields of {where}: {known}."
            )
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"Config key {key!r} is a group; set one of its fields instead.")
    with node.unlocked():
        node[leaf] = _parse_value(key, text, current)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.KEY=VALUE` arguments from the others.

    Returns:
      (other arguments, [(key, value text), ...]) in command-line order.
    """
    others, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(_OVERRIDE_PREFIX):
            body = arg[len(_OVERRIDE_PREFIX) :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args):
                key, value = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"Override {arg!r} has no value; write {arg}=VALUE.")
            overrides.append((key, value))
        else:
            others.append(arg)
        i += 1
    return others, overrides


def load_config(
    path: str | Path, overrides: Sequence[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    """Loads a config file and applies `(key, value text)` overrides in order."""
    config = load_config_file(path)
    for key, text in overrides:
        apply_override(config, key, text)
    return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuilds a config from `config_to_json` output, restoring tuples where lists were."""

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return ml_collections.ConfigDict({k: restore(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(restore(v) for v in value)
        return value

    return restore(values)
