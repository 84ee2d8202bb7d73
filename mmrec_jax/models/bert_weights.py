"""Loading and saving BERT checkpoints for `mmrec_jax.models.bert.Bert`.

Reads a hub id (resolved offline first by `mmrec_jax.hub.resolve_pretrained`) or a local
folder holding `config.json` and one of:

- `model.safetensors`: PyTorch names (`encoder.layer.0.attention.self.query.weight`),
  with or without the `bert.` prefix of pretraining checkpoints, and the old
  `LayerNorm.gamma` / `LayerNorm.beta` names;
- `model.safetensors.index.json`: the same, sharded over several files;
- `flax_model.msgpack`: Hugging Face's Flax layout, which is ours already.

`_RULES` is the one table between PyTorch names and our parameter paths; loading and
saving both read it. Keys we never use (`position_ids`, the `cls.*` pretraining heads)
are skipped; other keys that match no parameter are reported in a warning. A missing
or misshaped weight raises `CheckpointError` naming the key and the shapes: nothing is
ever initialised at random.

The pooler: some checkpoints (saved from a masked-LM model) have no pooler weights.
Then the module is built with `BertConfig.has_pooler=False` and returns no pooled
output, rather than a randomly initialised pooler; `save_pretrained` writes none either.

    bert, params, tokenizer = load_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    enc = tokenizer(["a cat video"], return_tensors="np", padding=True)
    hidden, pooled = bert.apply({"params": params}, enc["input_ids"],
                                enc["attention_mask"], enc["token_type_ids"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mmrec_jax.hub import resolve_pretrained
from mmrec_jax.models.bert import Bert, BertConfig, load_bert_config

logger = logging.getLogger(__name__)

# (module name suffix, PyTorch leaf, our leaf, transpose?): the one table between
# checkpoint names and our parameter paths. The module path maps one-to-one
# ("encoder.layer.0.attention.self.query" <-> encoder/layer/0/attention/self/query); the
# first rule matching a module and leaf wins, in both directions, so the gamma/beta
# rules only read old checkpoints and `save_pretrained` writes weight/bias.
_RULES = (
    ("LayerNorm", "weight", "scale", False),
    ("LayerNorm", "bias", "bias", False),
    ("LayerNorm", "gamma", "scale", False),
    ("LayerNorm", "beta", "bias", False),
    ("_embeddings", "weight", "embedding", False),  # (vocab, H) in both layouts
    ("", "weight", "kernel", True),  # torch Linear (out, in) vs Flax Dense (in, out)
    ("", "bias", "bias", False),
)

# Checkpoint keys we never use: buffers and pretraining heads.
_SKIP = re.compile(r"(^|\.)position_ids$|^cls\.|^(bert\.)?embeddings\.token_type_ids$")

# Prefix of pretraining checkpoints (BertForPreTraining, BertForMaskedLM, ...).
_PREFIX = "bert."

# Files that carry the tokenizer (hashed into the text cache fingerprint).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the BERT its config describes."""


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], bool] | None:
    """Maps a PyTorch checkpoint key to our parameter path through `_RULES`.

    Returns:
      (path, transpose), or None for a skipped or unknown key.
    """
    if _SKIP.search(key):
        return None
    if key.startswith(_PREFIX):
        key = key[len(_PREFIX) :]
    *module, leaf = key.split(".")
    for module_suffix, torch_leaf, our_leaf, transpose in _RULES:
        if module and leaf == torch_leaf and module[-1].endswith(module_suffix):
            return (*module, our_leaf), transpose
    return None


def path_to_torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """Maps our parameter path to its canonical PyTorch key through `_RULES`.

    Returns:
      (key, transpose).
    """
    *module, leaf = path
    for module_suffix, torch_leaf, our_leaf, transpose in _RULES:
        if module and leaf == our_leaf and module[-1].endswith(module_suffix):
            return ".".join((*module, torch_leaf)), transpose
    raise ValueError(f"Parameter path {'/'.join(path)} has no PyTorch name.")


def _weight_format(folder: Path) -> Path:
    """The weight file (or index) of a checkpoint folder, in order of preference."""
    for name in ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"Checkpoint folder {str(folder)!r} has no weights: expected model.safetensors, "
        "model.safetensors.index.json or flax_model.msgpack (PyTorch .bin files are not read; "
        "convert them with transformers' save_pretrained(..., safe_serialization=True))."
    )


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """Every file holding the weights of a checkpoint folder (shards included)."""
    folder = Path(folder)
    main = _weight_format(folder)
    if main.name.endswith(".index.json"):
        shards = sorted(set(json.loads(main.read_text())["weight_map"].values()))
        return [main] + [folder / s for s in shards]
    return [main]


def _flax_tree(path: Path) -> dict:
    tree = flax.serialization.msgpack_restore(path.read_bytes())
    if "bert" in tree and "embeddings" not in tree:  # a pretraining model's checkpoint
        tree = tree["bert"]
    return tree


def checkpoint_has_pooler(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds pooler weights (reads key names only)."""
    main = _weight_format(Path(folder))
    if main.name == "flax_model.msgpack":
        return "pooler" in _flax_tree(main)
    if main.name.endswith(".index.json"):
        keys = json.loads(main.read_text())["weight_map"]
    else:
        with safe_open(main, framework="numpy") as f:
            keys = list(f.keys())
    return any((torch_key_to_path(k) or ((),))[0][:1] == ("pooler",) for k in keys)


def _read_checkpoint(folder: Path) -> tuple[dict[tuple[str, ...], tuple], list[str]]:
    """Reads a checkpoint as {our path: (checkpoint key, array as stored, transpose?)}.

    Returns:
      The weights, and the checkpoint keys that matched no parameter path.
    """
    main = _weight_format(folder)
    if main.name == "flax_model.msgpack":
        flat = flax.traverse_util.flatten_dict(_flax_tree(main))
        return {tuple(p): ("/".join(p), np.asarray(a), False) for p, a in flat.items()}, []
    tensors = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            tensors.update(load_file(file))
    weights, unmatched = {}, []
    for key, array in tensors.items():
        mapped = torch_key_to_path(key)
        if mapped is not None:
            weights[mapped[0]] = (key, array, mapped[1])
        elif not _SKIP.search(key):
            unmatched.append(key)
    return weights, unmatched


def load_params(bert: Bert, folder: str | os.PathLike) -> dict:
    """Loads a checkpoint folder's weights into `bert`'s parameter tree.

    Args:
      bert: the module whose parameter shapes the checkpoint must match.
      folder: a checkpoint folder (see the module docstring for the formats).

    Returns:
      The params tree (no "params" wrapper), as jax arrays of `bert.param_dtype`.

    Raises:
      CheckpointError: a parameter is missing from the checkpoint, or has the wrong
        shape; the message names the checkpoint key and both shapes.
    """
    folder = Path(folder)
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(lambda: bert.init(jax.random.key(0), ids, ids))["params"]
    expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
    weights, unmatched = _read_checkpoint(folder)
    flax_format = _weight_format(folder).name == "flax_model.msgpack"
    params = {}
    for path, spec in expected.items():
        shape = tuple(spec.shape)
        if path not in weights:
            key, transpose = ("/".join(path), False) if flax_format else path_to_torch_key(path)
            raise CheckpointError(
                f"Checkpoint {str(folder)!r} is missing the weight {key!r} of shape "
                f"{shape[::-1] if transpose else shape} (parameter {'/'.join(path)}), which "
                "its config.json requires."
            )
        key, array, transpose = weights.pop(path)
        want = shape[::-1] if transpose else shape  # in the checkpoint's layout
        if tuple(array.shape) != want:
            raise CheckpointError(
                f"Checkpoint {str(folder)!r} weight {key!r} has shape {tuple(array.shape)}, but "
                f"its config.json needs shape {want} (parameter {'/'.join(path)})."
            )
        params[path] = jnp.asarray(array.T if transpose else array, dtype=bert.param_dtype)
    unmatched += [key for key, _, _ in weights.values()]
    if unmatched:
        logger.warning(
            "Checkpoint %s: ignored %d weights that BertModel does not use: %s",
            folder,
            len(unmatched),
            ", ".join(sorted(unmatched)[:10]) + (" ..." if len(unmatched) > 10 else ""),
        )
    return flax.traverse_util.unflatten_dict(params)


def load_tokenizer(name_or_path: str | os.PathLike):
    """The Hugging Face tokenizer (`AutoTokenizer`) of a hub id or a local folder."""
    from transformers import AutoTokenizer

    folder = resolve_pretrained(name_or_path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"Pretrained model folder {str(folder)!r} has no tokenizer files (one of "
            f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there with "
            "tokenizer.save_pretrained(folder)."
        )
    return AutoTokenizer.from_pretrained(str(folder))


def load_pretrained(
    name_or_path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32
) -> tuple[Bert, dict, object]:
    """Loads a pretrained BERT: the module, its parameters and its tokenizer.

    Args:
      name_or_path: a hub id such as "sentence-transformers/all-MiniLM-L6-v2" (resolved
        offline first) or a local checkpoint folder.
      dtype: compute dtype of the module.
      param_dtype: dtype the parameters are returned in.

    Returns:
      (bert, params, tokenizer); apply with `bert.apply({"params": params}, ids, mask)`.
    """
    folder = resolve_pretrained(name_or_path)
    bert = Bert(load_bert_config(folder), dtype=dtype, param_dtype=param_dtype)
    return bert, load_params(bert, folder), load_tokenizer(folder)


def save_pretrained(
    params: Mapping,
    bert_config: BertConfig,
    folder: str | os.PathLike,
    tokenizer=None,
) -> Path:
    """Writes a checkpoint that `transformers.BertModel.from_pretrained(folder)` opens.

    Writes `config.json`, `model.safetensors` (PyTorch names and layout, float32) and,
    when given, the tokenizer's files.

    Args:
      params: our BERT params tree (no "params" wrapper).
      bert_config: its architecture.
      folder: created if needed; existing files of the same names are replaced.
      tokenizer: a Hugging Face tokenizer to save beside the weights.

    Returns:
      The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    has_pooler = any(path[0] == "pooler" for path in flat)
    config = dataclasses.replace(bert_config, has_pooler=has_pooler)
    tensors = {}
    for path, value in flat.items():
        key, transpose = path_to_torch_key(path)
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        tensors[key] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
