"""Exporting a trained run for other code: parameters, config, tokenizer, item table.

    python -m mmrec_jax.export --workdir runs/default --out export/ [--checkpoint best]

Writes the layout described in `mmrec_jax.exported` (parameters as safetensors, the run
config, the text tower as a Hugging Face BERT folder with its tokenizer, the encoded item
table and what `mmrec_jax.recommend` needs about each user) into a temporary folder
beside `--out` and renames it into place when complete, so an interrupted export never
leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from mmrec_jax import evaluate, exported, runtime, schema, sharding
from mmrec_jax.cli import exits_quietly, require_writable_folder
from mmrec_jax.config import config_to_json

_README = """\
# mmrec_jax export

Run `{workdir}`, checkpoint step {step}; exported by `python -m mmrec_jax.export`.

```python
import mmrec_jax

model, variables = mmrec_jax.load_exported("{name}")
logits = model.apply(variables, batch, train=False)  # batch: see mmrec_jax/schema.py
```

Without mmrec_jax:

```python
import numpy
from safetensors.numpy import load_file
params = load_file("{name}/params.safetensors")     # {{"fusion/...": float32 array}}
item_embeddings = numpy.load("{name}/item_embeddings.npy")  # (N, D), rows of item_ids.npy
```
{text}
Top-K items for a user: `python -m mmrec_jax.recommend --export {name} --user USER_ID`.

| file | what |
| --- | --- |
| `config.json` | the full run config |
| `params.safetensors` | every parameter; key = "/"-joined path, float32 |
| `item_ids.npy`, `item_embeddings.npy` | original item ids and each item's (D,) embedding |
| `item_id_index.npy` | each item's ID-vocabulary index (`items["item_id"]` of a batch) |
| `item_texts.npy` | each item's text cut to {text_chars} characters, to show it ("": none) |
| `item_tokens.npy`, `item_token_mask.npy` | each item's (M, D) modality tokens and mask |
| `user_ids.npy`, `user_id_index.npy` | original user ids and their ID-vocabulary index |
| `user_history.npy`, `user_history_mask.npy` | each user's latest history (item rows) |
| `user_interacted_items.npy` | the items (rows) each user interacted with, liked or not |
| `user_interacted_offsets.npy` | user u's are `user_interacted_items[offsets[u]:offsets[u+1]]` |
| `text_model/`, `tokenizer/` | the text tower's BERT and its tokenizer (runs with text) |
| `export.json` | format, checkpoint step, shapes, SHA-256 of each other file; written last |
"""

_README_TEXT = """
The text tower's BERT opens with Hugging Face transformers (where PyTorch is installed),
or in JAX with `mmrec_jax.models.bert_weights.load_pretrained("{name}/text_model")`:

```python
from transformers import AutoTokenizer, BertModel
bert = BertModel.from_pretrained("{name}/text_model")
tokenizer = AutoTokenizer.from_pretrained("{name}/tokenizer")
```

The model read each text truncated to the config's `data.max_text_len` tokens (and, with a
frozen text tower, pooled as `model.text.pooling` says). For new items, make the item
block's text fields as training did:

```python
from mmrec_jax.data.text_cache import item_text_fields
from mmrec_jax.exported import load_export_config

text_fields = item_text_fields(["a new item's text"], load_export_config("{name}"))
```
"""


def _text_model(config: ml_collections.ConfigDict, model: Any, params: Any):
    """(BERT params, BertConfig) of the run's text tower, or None without one.

    A trained text tower's BERT lives in the parameters; a frozen one is the pretrained
    BERT that computed the cached embeddings, read from `config.model.text.model`.
    """
    if "text" not in schema.parse_towers(config.model.towers):
        return None
    if schema.text_is_trained(config.model.text.mode):
        return params["text"]["bert"], model.bert_config
    from mmrec_jax.models.bert_weights import load_pretrained

    bert, bert_params, _ = load_pretrained(config.model.text.model)
    return bert_params, bert.config


def _text_array(values: np.ndarray) -> np.ndarray:
    """Ids as an array `np.load` reads without pickle: numbers stay, others become str."""
    values = np.asarray(values)
    if values.dtype.kind in "iub" or values.dtype.kind == "U":
        return values
    return values.astype(str)


def write_export(
    folder: Path,
    config: ml_collections.ConfigDict,
    model: Any,
    params: Any,
    step: int,
    catalogue: evaluate.Catalogue,
    encoded: dict[str, np.ndarray],
    workdir: str,
    name: str,
) -> None:
    """Writes every file of an export into `folder` (an empty folder); the manifest last.

    `name` is the export's final folder name, used in the README's examples.
    """
    from safetensors.numpy import save_file

    from mmrec_jax.models.bert_weights import load_tokenizer, save_pretrained

    tensors = exported.flatten_params(params)
    save_file(tensors, folder / exported.PARAMS_FILE, metadata={"step": str(step)})
    (folder / exported.CONFIG_FILE).write_text(config_to_json(config) + "\n")
    text = _text_model(config, model, params)
    if text is not None:
        tokenizer = load_tokenizer(config.model.text.model)
        tokenizer.save_pretrained(str(folder / exported.TOKENIZER_DIR))
        save_pretrained(text[0], text[1], folder / exported.TEXT_MODEL_DIR, tokenizer)
    users = catalogue.users
    tables = {
        "item_ids": _text_array(catalogue.item_ids),
        "item_id_index": catalogue.item_id_index.astype(np.int32),
        "item_texts": np.array([exported.text_preview(t) for t in catalogue.item_texts], dtype=str),
        "item_embeddings": encoded["embedding"].astype(np.float32),
        "item_tokens": encoded["tokens"].astype(np.float32),
        "item_token_mask": encoded["mask"].astype(bool),
        "user_ids": _text_array(catalogue.user_ids),
        "user_id_index": users.user_id.astype(np.int32),
        "user_history": users.history.astype(np.int32),
        "user_history_mask": users.history_mask.astype(bool),
        "user_interacted_offsets": users.interacted[0].astype(np.int64),
        "user_interacted_items": users.interacted[1].astype(np.int32),
    }
    for table, array in tables.items():
        np.save(folder / exported.TABLE_FILES[table], array, allow_pickle=False)
    readme = _README.format(
        workdir=workdir,
        step=step,
        name=name,
        text_chars=exported.ITEM_TEXT_CHARS,
        text=_README_TEXT.format(name=name) if text is not None else "",
    )
    (folder / exported.README_FILE).write_text(readme)
    manifest = {
        "format": exported.EXPORT_FORMAT,
        "workdir": str(workdir),
        "checkpoint_step": int(step),
        "dataset": config.data.name,
        "towers": config.model.towers,
        "text_model": text is not None,
        "num_items": int(tables["item_ids"].shape[0]),
        "num_users": int(tables["user_ids"].shape[0]),
        "num_parameters": int(sum(t.size for t in tensors.values())),
        "tables": {k: list(v.shape) for k, v in tables.items()},
        "sha256": exported.file_checksums(folder),
    }
    (folder / exported.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _default_permissions(folder: Path) -> None:
    """Gives the staged folder the permissions of ordinary new files (mkdtemp's are 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _check_out(out: Path, workdir: Path, overwrite: bool) -> None:
    """Refuses an `out` whose replacement would lose anything but an earlier export."""
    if out == workdir or out in workdir.parents:
        raise FileExistsError(
            f"--out {out} is or holds the training run {workdir}; choose a folder outside it."
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder made for the export
    is_export = out.is_dir() and (out / exported.MANIFEST_FILE).is_file()
    if not is_export:
        what = "a folder that is not an export" if out.is_dir() else "a file"
        raise FileExistsError(
            f"{out} already exists and is {what} (an export holds {exported.MANIFEST_FILE}); "
            "--overwrite replaces only an earlier export. Choose another --out."
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds an export. Choose another --out, or pass --overwrite to "
            "replace it."
        )


def export_run(
    workdir: str | Path,
    out: str | Path,
    checkpoint: str | int = "best",
    overwrite: bool = False,
    devices: list | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """Exports a checkpoint of a training run to the folder `out`.

    Args:
      workdir: the training run's folder.
      out: the export folder to create.
      checkpoint: "best", "latest" or a step.
      overwrite: replace `out` if it exists (it is swapped out only once the new export
        is complete).
      devices: mesh devices for encoding the item table (default: all).
      data_dir: where the run's dataset is now, if it moved (default: where it was).

    Returns:
      The export folder.

    Raises:
      FileExistsError: `out` exists and `overwrite` is False, or `out` is not an earlier
        export (only an export is ever replaced), or it holds the training run.
      DatasetMismatchError: the dataset found is not the one the checkpoint recorded.
    """
    from mmrec_jax import train

    out = Path(out).resolve()
    _check_out(out, Path(workdir).resolve(), overwrite)
    config, model, params, step = train.restore_params(workdir, checkpoint, devices, data_dir)
    mesh = sharding.make_mesh(devices)
    catalogue = evaluate.open_catalogue(config)
    encoded = evaluate.encode_catalogue(
        model, params, catalogue.item_block, catalogue.num_items, mesh, progress="encoding items"
    )
    # Parameters sharded over processes (FSDP) are gathered by all of them together.
    params = sharding.to_host(params)
    if jax.process_index() != 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_export(
            staging,
            config,
            model,
            params,
            step,
            catalogue,
            encoded,
            str(Path(workdir).resolve()),
            out.name,
        )
        _default_permissions(staging)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m mmrec_jax.export`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[2],  # the paragraph on what it writes
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--out", required=True, help="the export folder to create")
    parser.add_argument(
        "--checkpoint",
        default="best",
        type=evaluate.parse_checkpoint,
        help="best (validation AUC; the default), latest, or a step",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds an earlier export"
    )
    parser.add_argument(
        "--data_dir",
        help="the folder holding the run's dataset folder (an importer's --output), if the "
        "dataset moved since training",
    )
    args = parser.parse_args(argv)
    require_writable_folder(parser, "the folder of --out", Path(args.out).resolve().parent)
    sharding.maybe_initialize_distributed()
    from mmrec_jax.checkpoint import CheckpointError

    try:
        with exits_quietly(parser, exit_process=argv is None):
            out = export_run(
                args.workdir, args.out, args.checkpoint, args.overwrite, data_dir=args.data_dir
            )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}{evaluate.moved_data_hint(error, args)}\n")
    except CheckpointError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    if jax.process_index() != 0:  # process 0 writes the export and reports it
        return 0
    manifest = json.loads((out / exported.MANIFEST_FILE).read_text())
    print(
        f"Exported step {manifest['checkpoint_step']} of {args.workdir} to {out}: "
        f"{manifest['num_parameters']:,} parameters, {manifest['num_items']} items, "
        f"{manifest['num_users']} users. Load it with mmrec_jax.load_exported({str(out)!r})."
    )
    return 0


if __name__ == "__main__":
    runtime.restart_with_huge_pages()
    runtime.tune_host_allocator()
    sys.exit(main())
