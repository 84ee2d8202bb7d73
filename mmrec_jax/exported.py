"""Reading an export folder written by `python -m mmrec_jax.export`.

    import mmrec_jax
    model, variables = mmrec_jax.load_exported("export/")
    logits = model.apply(variables, batch, train=False)   # batch: see mmrec_jax.schema

The folder's layout (file names are the constants below):

    export.json              what was exported: format, checkpoint step, shapes, and the
                             SHA-256 of every other file (checked as they are read);
                             written last, so a folder without it is not a complete export
    config.json              the full resolved run config
    params.safetensors       every parameter, key = "/"-joined path, float32
    item_ids.npy             (N,) original item ids, in item-table order
    item_id_index.npy        (N,) each item's ID-vocabulary index (0 = out of vocabulary):
                             the `items["item_id"]` of a batch holding that item
    item_texts.npy           (N,) each item's text on one line, cut to 120 characters
                             ("" for an item without text): to show the item
    item_embeddings.npy      (N, D) each item's summary vector (`encode_items`' embedding)
    item_tokens.npy          (N, M, D) each item's modality tokens (`encode_items`' tokens)
    item_token_mask.npy      (N, M) True where the item has that modality
    user_ids.npy             (U,) original user ids, in user-table order
    user_id_index.npy        (U,) each user's ID-vocabulary index (0 = out of vocabulary)
    user_history.npy         (U, H) each user's latest history, as rows of the item table
    user_history_mask.npy    (U, H) True where a history entry is real
    user_interacted_offsets.npy, user_interacted_items.npy
                             (U + 1,) offsets and (E,) item rows, CSR: user u interacted
                             with items[offsets[u]:offsets[u + 1]] (in any split,
                             positive or not: what recommendations leave out)
    text_model/              the text tower's BERT as a Hugging Face folder (when the run
                             has a text tower), with its tokenizer
    tokenizer/               the tokenizer files (when the run has a text tower)
    README.md                how to load it

Nothing here needs the dataset: `mmrec_jax.recommend` serves from the folder alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmrec_jax import schema
from mmrec_jax.config import config_from_dict
from mmrec_jax.files import error_line

# Version of the layout above; bumped when it changes incompatibly.
EXPORT_FORMAT = 4

MANIFEST_FILE = "export.json"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
TEXT_MODEL_DIR = "text_model"
TOKENIZER_DIR = "tokenizer"
README_FILE = "README.md"

# Table name -> file: what `load_tables` reads.
TABLE_FILES = {
    "item_ids": "item_ids.npy",
    "item_id_index": "item_id_index.npy",
    "item_texts": "item_texts.npy",
    "item_embeddings": "item_embeddings.npy",
    "item_tokens": "item_tokens.npy",
    "item_token_mask": "item_token_mask.npy",
    "user_ids": "user_ids.npy",
    "user_id_index": "user_id_index.npy",
    "user_history": "user_history.npy",
    "user_history_mask": "user_history_mask.npy",
    "user_interacted_offsets": "user_interacted_offsets.npy",
    "user_interacted_items": "user_interacted_items.npy",
}

# Characters of each item's text that item_texts.npy keeps: enough to tell the item.
ITEM_TEXT_CHARS = 120


def text_preview(text: str, max_chars: int = ITEM_TEXT_CHARS) -> str:
    """`text` on one line (runs of whitespace become one space), cut to `max_chars`
    characters with a trailing "…" when longer."""
    line = " ".join(text.split())
    return line if len(line) <= max_chars else line[: max_chars - 1] + "…"


# Separator of the parameter paths in the safetensors keys.
KEY_SEPARATOR = "/"


class ExportError(ValueError):
    """A folder that is not a complete, readable export."""


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
    """A params tree as {"text/proj/kernel": float32 numpy array}.

    Args:
      params: the model's params (no "params" wrapper); jax or numpy leaves, sharded
        arrays are gathered.

    Raises:
      ValueError: a module or parameter name contains the separator "/".
    """
    flat = flax.traverse_util.flatten_dict(dict(params))
    tensors = {}
    for path, value in flat.items():
        bad = [name for name in path if KEY_SEPARATOR in str(name)]
        if bad:
            raise ValueError(f"Parameter name {bad[0]!r} contains {KEY_SEPARATOR!r}.")
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        tensors[KEY_SEPARATOR.join(str(name) for name in path)] = np.ascontiguousarray(array)
    return tensors


def unflatten_params(tensors: Mapping[str, np.ndarray]) -> dict:
    """The inverse of `flatten_params`: {"a/b/c": array} -> nested dicts."""
    return flax.traverse_util.unflatten_dict(
        {tuple(key.split(KEY_SEPARATOR)): value for key, value in tensors.items()}
    )


def file_checksums(folder: Path) -> dict[str, str]:
    """{path relative to `folder` ("/"-separated): SHA-256 hex digest} of every file in
    it, the manifest aside."""
    return {
        file.relative_to(folder).as_posix(): _sha256(file)
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.relative_to(folder).as_posix() != MANIFEST_FILE
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


_EXPORT_AGAIN = "Export the run again (python -m mmrec_jax.export ... --overwrite)."


def _verify(folder: Path, relative: str, manifest: Mapping) -> None:
    """Raises `ExportError` if the file's bytes differ from the checksum the manifest
    records (exports written before checksums record none: nothing to compare)."""
    expected = manifest.get("sha256", {}).get(relative)
    path = folder / relative
    try:
        same = expected is None or _sha256(path) == expected
    except OSError as error:
        raise _unreadable(path, error) from error
    if not same:
        raise ExportError(
            f"{path} is damaged: its bytes differ from those the export wrote (the SHA-256 "
            f"in {folder / MANIFEST_FILE}). {_EXPORT_AGAIN}"
        )


def _read(folder: Path, relative: str, read: Callable[[Path], Any], manifest: Mapping) -> Any:
    """`read(path)` for a file of an export, after checking it against the manifest's
    checksum; one that is missing, changed or cannot be parsed (a cut or damaged file) is
    an `ExportError` naming it."""
    _verify(folder, relative, manifest)
    path = folder / relative
    try:
        return read(path)
    except Exception as error:  # noqa: BLE001 - JSON, numpy and safetensors raise their own
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> ExportError:
    return ExportError(
        f"{path} cannot be read ({error_line(error)}): the export is damaged. {_EXPORT_AGAIN}"
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _require_export(path: Path) -> dict:
    """The manifest of a complete export folder, or an `ExportError` saying what is wrong."""
    if not path.is_dir():
        raise ExportError(
            f"Export folder {str(path)!r} does not exist. Create one with "
            "`python -m mmrec_jax.export --workdir RUN --out EXPORT`."
        )
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(
            f"{str(path)!r} has no {MANIFEST_FILE}: it is not a complete export (an export "
            "writes that file last). Export again with `python -m mmrec_jax.export`."
        )
    manifest = _read(path, MANIFEST_FILE, _read_json, {})
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"{str(path)!r} has export format {manifest.get('format')!r}; this version of "
            f"mmrec_jax reads format {EXPORT_FORMAT}. Export the run again."
        )
    return manifest


def load_export_config(path: str | Path) -> ml_collections.ConfigDict:
    """The run config of an export, pointed at the export's own text model folder.

    `config.model.text.model` names the pretrained BERT the run started from; when the
    export holds the text tower's BERT (`text_model/`), it is set to that folder, so the
    model builds from the export alone, and the folder's files (and the tokenizer's) are
    checked against the export's checksums first.
    """
    path = Path(path)
    manifest = _require_export(path)
    for relative in manifest.get("sha256", {}):  # what the text model folder is read for
        if relative.startswith((f"{TEXT_MODEL_DIR}/", f"{TOKENIZER_DIR}/")):
            _verify(path, relative, manifest)
    return _export_config(path, manifest)


def _export_config(path: Path, manifest: Mapping) -> ml_collections.ConfigDict:
    config = config_from_dict(_read(path, CONFIG_FILE, _read_json, manifest))
    if (path / TEXT_MODEL_DIR / "config.json").is_file():
        config.model.text.model = str((path / TEXT_MODEL_DIR).resolve())
    return config


def _check_params(model: Any, config: ml_collections.ConfigDict, params: dict, where: Path):
    """Raises `ExportError` naming any parameter missing, unexpected or misshaped."""
    text_dim = None
    if "text" in params and "proj" in params["text"] and "bert" not in params["text"]:
        text_dim = params["text"]["proj"]["kernel"].shape[0]
    batch = schema.example_batch(config, text_dim)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, train=False)["params"])
    expected = {
        KEY_SEPARATOR.join(path): tuple(leaf.shape)
        for path, leaf in flax.traverse_util.flatten_dict(expected).items()
    }
    found = {
        KEY_SEPARATOR.join(path): tuple(leaf.shape)
        for path, leaf in flax.traverse_util.flatten_dict(params).items()
    }
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if extra:
            details.append(f"unexpected {extra[:5]}")
        if wrong:
            details.append(
                "misshaped " + ", ".join(f"{k} {found[k]} != {expected[k]}" for k in wrong[:5])
            )
        raise ExportError(
            f"{where / PARAMS_FILE} does not fit the model of {where / CONFIG_FILE}: "
            f"{'; '.join(details)}. Export the run again."
        )


def load_exported(path: str | Path) -> tuple[Any, dict]:
    """Loads an export's model and variables.

    Args:
      path: a folder written by `python -m mmrec_jax.export`.

    Returns:
      (model, variables): the `Recommender` built from the export's config and
      {"params": params} as jax arrays of `config.model.param_dtype`, so that
      `model.apply(variables, batch, train=False)` gives the checkpoint's logits.

    Raises:
      ExportError: the folder is missing, incomplete, or its parameters do not fit its
        config.
    """
    from safetensors.numpy import load_file

    from mmrec_jax.models.recommender import build_model

    path = Path(path)
    manifest = _require_export(path)
    config = _export_config(path, manifest)
    bert_config = f"{TEXT_MODEL_DIR}/config.json"  # what build_model reads (and key names)
    if (path / bert_config).is_file():
        _verify(path, bert_config, manifest)
    model = build_model(config.model)
    param_dtype = jnp.dtype(config.model.param_dtype)
    params = unflatten_params(_read(path, PARAMS_FILE, load_file, manifest))
    _check_params(model, config, params, path)
    params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
    return model, {"params": params}


def load_tables(path: str | Path) -> dict[str, np.ndarray]:
    """The item and user tables of an export (see the module docstring), as numpy arrays."""
    path = Path(path)
    manifest = _require_export(path)
    tables = {}
    for name, file in TABLE_FILES.items():
        if not (path / file).is_file():
            raise ExportError(f"Export {str(path)!r} is missing {file}. Export the run again.")
        tables[name] = _read(path, file, functools.partial(np.load, allow_pickle=False), manifest)
    return tables
