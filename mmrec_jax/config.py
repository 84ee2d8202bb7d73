"""Loading run configurations: a config file plus `--config.KEY=VALUE` overrides.

Config files are Python files with a `get_config()` returning an
`ml_collections.ConfigDict` (see `configs/`). Overrides name a dotted key and a value
that is parsed to the type the key already has; an unknown key or a value of the
wrong type is a `ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

_OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Loads a config file: a Python file's `get_config()`, or a run's `config.json`.

    Args:
      path: a Python file defining `get_config()` (see configs/), or the config.json a
        training run wrote into its workdir (to rerun or resume it with its settings).

    Raises:
      ConfigError: the file does not exist, is neither kind, or defines no `get_config`.
    """
    path = Path(path)
    if not path.is_file():
        project_configs = Path(__file__).resolve().parents[1] / "configs"
        where = (
            f"the project's configs are in {project_configs}"
            if project_configs.is_dir()
            else "the configs/ folder of the mmrec_jax repository"
        )
        raise ConfigError(
            f"Config file {str(path)!r} does not exist (relative paths start at the current "
            f"directory, {Path.cwd()}). Pass one of the files in configs/, for example "
            f"--config configs/default.py from the repository root; {where}."
        )
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"Config file {str(path)!r} is not valid JSON ({error}).") from error
        if not isinstance(values, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a JSON object.")
        return config_from_dict(values)
    if path.suffix != ".py":
        raise ConfigError(
            f"Config file {str(path)!r} is neither a Python config (.py with get_config(), "
            "see configs/) nor a run's config.json."
        )
    # Config files import each other as `configs.<name>`: make the folder above importable.
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_mmrec_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"Config file {str(path)!r} defines no get_config() function.")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any error of the user's code, named
        raise ConfigError(
            f"Config file {str(path)!r} failed to load: {_where_in(error, path)}"
            f"{type(error).__name__}: {error}. Fix the file (configs/ holds working ones)."
        ) from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict."
        )
    return config


def _where_in(error: Exception, path: Path) -> str:
    """'line N: ' of the deepest frame of `error` inside the file `path`, or ''."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}: "
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve() == path.resolve()
    ]
    return f"line {lines[-1]}: " if lines else ""


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Config key {key!r} is a bool; got {text!r}. Use true or false.")


# How a parse error names the type a key holds.
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` to the type of `current`, the value the key has now."""
    try:
        if isinstance(current, bool):
            return _parse_bool(key, text)
        if isinstance(current, int):
            try:
                return int(text)
            except ValueError:
                if not _takes_fractions(key):
                    raise
                return float(text)  # a run's config.json may hold 4096 for 4096.0
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
            f"Config key {key!r} expects {_TYPE_NAMES.get(type(current), type(current).__name__)} "
            f"(now {current!r}); "
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
    value = _parse_value(key, text, current)
    with node.unlocked():
        if type(value) is not type(current):
            del node[leaf]  # a fraction for a field an older config.json wrote as an int
        node[leaf] = value


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
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                # The next argument is another flag (or there is none): a value was left out.
                raise ConfigError(f"Override {arg!r} has no value; write {arg}=VALUE.")
            overrides.append((key, value))
        else:
            others.append(arg)
        i += 1
    return others, overrides


def load_config(
    path: str | Path, overrides: Sequence[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    """Loads a config file, applies `(key, value text)` overrides in order, checks values.

    Raises:
      ConfigError: a bad file, key or value (`check_values`).
    """
    config = load_config_file(path)
    for key, text in overrides:
        apply_override(config, key, text)
    check_values(config)
    return config


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _integer(v) and v >= low), f"an integer >= {low}"


def _number_in(
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> tuple[Callable[[Any], bool], str]:
    def test(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        if math.isinf(v) and not allow_inf:
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    left = "(" if low_open else "["
    right = ")" if high_open or high == math.inf else "]"
    finite = "" if allow_inf or high < math.inf else "finite "
    return test, f"a {finite}number in {left}{low:g}, {high:g}{right}"


def _channel_list() -> tuple[Callable[[Any], bool], str]:
    return (
        lambda v: (
            isinstance(v, (tuple, list)) and len(v) > 0 and all(_integer(c) and c >= 1 for c in v)
        )
    ), "a non-empty tuple of integers >= 1, e.g. (16, 32)"


def _non_empty_text(what: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v.strip() != ""), f"{what} (it is empty)"


# What each field of a run config may hold (fields a config lacks are named as missing).
_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int_at_least(0),
    # An empty path would mean the current directory without saying so.
    "data.data_dir": _non_empty_text("a folder for datasets, e.g. data"),
    "data.name": _non_empty_text("a dataset name, e.g. mmrec_synthetic"),
    "data.max_text_len": _int_at_least(2),  # [CLS] and [SEP] take two
    "data.history_len": _int_at_least(1),
    "data.negatives_per_positive": _int_at_least(0),
    "data.num_workers": _int_at_least(0),
    "data.prefetch": _int_at_least(0),
    "data.max_item_memory_mib": _number_in(0),
    "data.synthetic.num_users": _int_at_least(1),
    "data.synthetic.num_items": _int_at_least(1),
    "data.synthetic.seed": _int_at_least(0),
    "data.synthetic.cold_item_share": _number_in(0, 1, high_open=True),
    "data.synthetic.missing_share": _number_in(0, 1),
    "model.width": _int_at_least(1),
    "model.num_users": _int_at_least(0),
    "model.num_items": _int_at_least(0),
    "model.text.top_n": _int_at_least(1),
    "model.image.size": _int_at_least(1),
    "model.image.channels": _channel_list(),
    "model.image.hidden": _int_at_least(1),
    "model.audio.sample_rate": _int_at_least(1),
    "model.audio.clip_samples": _int_at_least(1),
    "model.audio.n_fft": _int_at_least(2),
    "model.audio.hop_length": _int_at_least(1),
    "model.audio.mel_bins": _int_at_least(1),
    "model.audio.channels": _channel_list(),
    "model.audio.hidden": _int_at_least(1),
    "model.user.num_heads": _int_at_least(1),
    "model.fusion.num_layers": _int_at_least(1),
    "model.fusion.num_heads": _int_at_least(1),
    "model.fusion.mlp_dim": _int_at_least(1),
    "model.fusion.dropout": _number_in(0, 1, high_open=True),
    "model.fusion.modality_dropout": _number_in(0, 1, high_open=True),
    "train.batch_size": _int_at_least(1),
    "train.num_epochs": _int_at_least(0),
    "train.num_steps": _int_at_least(0),
    "train.learning_rate": _number_in(0),  # 0: parameters never move (an evaluation run)
    "train.warmup_steps": _int_at_least(0),
    "train.weight_decay": _number_in(0),
    "train.grad_clip_norm": _number_in(0),
    "train.grad_accum_steps": _int_at_least(1),
    "train.eval_every": _int_at_least(0),
    "train.early_stopping_patience": _int_at_least(0),
    "train.checkpoint_every": _int_at_least(1),
    "train.keep_checkpoints": _int_at_least(1),
    "train.max_loss": _number_in(0, low_open=True, allow_inf=True),
    "train.log_every": _int_at_least(1),
    "train.profile_steps": _int_at_least(0),
}

_MISSING = object()

# Fields whose values are checked where they are used (free names, a path, a parsed list).
_FIELDS_WITHOUT_RULES = ("model.towers", "model.text.model", "train.fsdp", "train.tower_lr_scale")

# Fields a config may lack, read with a default where used (absent in older runs' config.json).
_OPTIONAL_FIELDS = ("train.profile_steps",)


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _known_fields() -> set[str]:
    return {*_VALUE_RULES, *_choice_rules(), *_FIELDS_WITHOUT_RULES}


def missing_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Dotted names of the fields every run config needs that `config` lacks."""
    return sorted(
        key
        for key in _known_fields()
        if key not in _OPTIONAL_FIELDS and _lookup(config, key) is _MISSING
    )


def _choice_rules() -> dict[str, tuple[str, ...]]:
    """The named choices of the string fields, from the modules that implement them."""
    from mmrec_jax import runtime
    from mmrec_jax.models import audio, layers, text

    return {
        "model.dtype": runtime.COMPUTE_DTYPES,
        # float16 parameters underflow Adam's update (its epsilon, small squared gradients).
        "model.param_dtype": ("float32", "bfloat16"),
        "model.text.mode": text.MODES,
        "model.text.pooling": text.POOLINGS,
        "model.image.conv_kernel_grad": layers.CONV_KERNEL_GRADS,
        "model.audio.frontend": audio.FRONTENDS,
    }


def _takes_fractions(key: str) -> bool:
    """Whether a numeric field may hold a fraction (its rule asks for a number)."""
    rule = _VALUE_RULES.get(key)
    return rule is not None and "number" in rule[1]


def _tower_shape_problems(config: ml_collections.ConfigDict, towers: tuple) -> list[str]:
    """Inputs too small for the conv towers' 2x pooling blocks (one per channels entry)."""
    problems = []
    blocks = _lookup(config, "model.image.channels")
    size = _lookup(config, "model.image.size")
    if "image" in towers and _integer(size) and isinstance(blocks, tuple | list):
        if size >= 1 and size >> len(blocks) < 1:
            problems.append(
                f"config.model.image.size={size} is too small for {len(blocks)} 2x2 pooling "
                f"blocks (config.model.image.channels); use at least {1 << len(blocks)} or "
                "fewer channels entries."
            )
    audio = {
        key: _lookup(config, f"model.audio.{key}")
        for key in (
            "frontend", "clip_samples", "n_fft", "hop_length", "channels", "sample_rate",
            "mel_bins",
        )
    }  # fmt: skip
    numbers = [audio[k] for k in ("clip_samples", "n_fft", "hop_length")]
    if "audio" not in towers or not all(_integer(n) and n >= 1 for n in numbers):
        return problems
    if not isinstance(audio["channels"], tuple | list):
        return problems
    length = audio["clip_samples"]
    if audio["frontend"] == "logmel":
        if length < audio["n_fft"] // 2 + 1:
            return problems + [
                f"config.model.audio.clip_samples={length} is too short for "
                f"config.model.audio.n_fft={audio['n_fft']}; lower n_fft or raise clip_samples."
            ]
        length = 1 + length // audio["hop_length"]  # frames
        problems += _empty_mel_filters(audio)
    blocks = len(audio["channels"])
    if length >> blocks < 1:
        problems.append(
            f"config.model.audio.clip_samples={audio['clip_samples']} gives {length} "
            f"{'frames' if audio['frontend'] == 'logmel' else 'samples'}, too few for "
            f"{blocks} 2x pooling blocks (config.model.audio.channels); raise clip_samples "
            "or use fewer channels entries."
        )
    return problems


def _empty_mel_filters(audio: dict) -> list[str]:
    """Mel filters that fall between the FFT's frequency bins, and so stay all zero."""
    rate, mel_bins = audio["sample_rate"], audio["mel_bins"]
    if not (_integer(rate) and rate >= 1 and _integer(mel_bins) and mel_bins >= 1):
        return []
    from mmrec_jax.models.audio import mel_filterbank

    empty = int((mel_filterbank(rate, audio["n_fft"], mel_bins).max(axis=0) == 0).sum())
    if not empty:
        return []
    return [
        f"config.model.audio.mel_bins={mel_bins} is too many for config.model.audio.n_fft="
        f"{audio['n_fft']}: {empty} of the mel filters fall between its "
        f"{audio['n_fft'] // 2 + 1} frequency bins and stay empty. Lower mel_bins or raise "
        "n_fft."
    ]


def check_values(config: ml_collections.ConfigDict) -> None:
    """Checks that every field of a run config holds a usable value, before any work.

    Every field a run reads must be present and no other (a misspelt name is not
    silently ignored), numbers must lie in their ranges (a batch size of at least 1, a
    finite learning rate >= 0, dropout rates in [0, 1), ...), named choices must be
    known, the tower list must parse and the attention widths must split into their
    heads.

    Raises:
      ConfigError: naming every bad field, its value and what it must be.
    """
    problems = _problems(config, scope="")
    if problems:
        raise ConfigError(
            "Bad config values (set them in the config file or with "
            "--config.KEY=VALUE):\n  " + "\n  ".join(problems)
        )


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
    """`check_values` for `config.model` alone, the part `build_model` takes.

    Raises:
      ConfigError: naming every bad field of config.model.
    """
    if "model" in model_config and "towers" not in model_config:
        raise ConfigError("Pass config.model, not the whole config: it holds the model's fields.")
    problems = _problems(ml_collections.ConfigDict({"model": model_config}), scope="model.")
    if problems:
        raise ConfigError("Bad config.model values:\n  " + "\n  ".join(problems))


def _problems(config: ml_collections.ConfigDict, scope: str) -> list[str]:
    """What is wrong with the fields of `config` whose dotted names start with `scope`."""
    from mmrec_jax import optim, schema

    known = _known_fields()
    problems = [
        f"config.{key} is missing: add it to the config file (configs/default.py has every "
        "field with its default)."
        for key in missing_fields(config)
        if key.startswith(scope)
    ]
    for key in flatten(config):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            meant = f"did you mean config.{close[0]}? " if close else ""
            problems.append(f"config.{key} is not a field of the config: {meant}Remove it.")
    for key, (test, must) in _VALUE_RULES.items():
        value = _lookup(config, key)
        if key.startswith(scope) and value is not _MISSING and not test(value):
            problems.append(f"config.{key}={value!r} must be {must}.")
    for key, choices in _choice_rules().items():
        value = _lookup(config, key)
        if key.startswith(scope) and value is not _MISSING and value not in choices:
            problems.append(f"config.{key}={value!r} must be one of {', '.join(choices)}.")
    towers = _lookup(config, "model.towers")
    try:
        towers = () if towers is _MISSING else schema.parse_towers(towers)
    except schema.BatchError as error:
        problems.append(str(error))
        towers = ()
    if towers and not set(towers) & set(schema.ITEM_TOWERS):
        problems.append(
            f"config.model.towers={','.join(towers)!r} has no item tower; add at least one "
            "of text, image, audio or id."
        )
    problems += _tower_shape_problems(config, towers)
    width = _lookup(config, "model.width")
    heads = {"model.fusion.num_heads": True, "model.user.num_heads": "history" in towers}
    for key, used in heads.items():
        count = _lookup(config, key)
        if used and _integer(width) and _integer(count) and count >= 1 and width % count:
            problems.append(
                f"config.model.width={width} does not split into config.{key}={count} heads; "
                "make the width a multiple of the heads."
            )
    scales = _lookup(config, "train.tower_lr_scale")
    if scales is not _MISSING:
        from mmrec_jax.models.recommender import PARAM_TOWERS

        known = set(schema.TOWERS) | set(PARAM_TOWERS) | set(PARAM_TOWERS.values())
        try:
            problem = optim.unknown_scale_names(scales, known)
        except ValueError as error:
            problem = str(error)
        if problem is not None:
            problems.append(problem)
    if _lookup(config, "train.num_steps") == 0 and _lookup(config, "train.num_epochs") == 0:
        problems.append(
            "config.train.num_steps=0 and config.train.num_epochs=0 train nothing; "
            "set either to at least 1."
        )
    return problems


def flatten(values: Mapping) -> dict[str, Any]:
    """Dotted key -> leaf value of a nested config or dict, e.g. {"train.batch_size": 32}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


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
