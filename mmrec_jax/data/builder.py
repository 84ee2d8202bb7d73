"""The on-disk layout every mmrec dataset shares, and the TFDS builder that writes it.

A dataset NAME is one TFDS dataset with three builder configs, written as ArrayRecord
files (no TensorFlow needed):

    DATA_DIR/NAME/interactions/1.0.0/   splits train, validation, test, test_cold (default)
    DATA_DIR/NAME/items/1.0.0/          split "items": the item table, one record per item
    DATA_DIR/NAME/users/1.0.0/          split "users": the user table, one record per user

`tfds.data_source(NAME, data_dir=DATA_DIR)` opens the interactions,
`tfds.data_source(f"{NAME}/items", data_dir=DATA_DIR)` the item table.

Interaction record: `user_index`, `item_index` (rows of the user and item tables),
`user_id`, `item_id` (ID-vocabulary indices), `label` (0/1), `timestamp`, and `history`:
the item rows of the user's `history_len` most recent earlier positives from the train
split, most recent first, padded with -1 ("earlier" is by timestamp, ties by input order).
Storing the history with the record keeps the pipeline's work per example constant.

Item record: `item_key` (the original id), `item_id`, `text`, `image` (PNG bytes of an RGB
picture, b"" when absent), `audio` (16-bit mono WAV bytes, b"" when absent), `has_text`,
`has_image`, `has_audio`.

User record: `user_key`, `user_id`, `history` (the latest `history_len` train positives,
most recent first, -1 padded), `train_positives` (sorted unique item rows the user engaged
with in train: what ranking excludes), `engaged` (the same over every split: what negative
sampling avoids), `interacted` (the items of every interaction of the user, positive or
not, in any split: what recommendations leave out).

ID vocabularies: users and items that appear in the train split get indices 1..n in
table-row order; every other user or item maps to 0, the out-of-vocabulary bucket (so
test_cold items have item_id 0). The interactions config's TFDS metadata
(`metadata.json`) holds the vocabulary sizes, the modalities present, the split sizes,
the oracle metrics (synthetic data), the original item and user ids, and how the dataset
was built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from mmrec_jax.files import error_line

# Interaction splits, in time order of a leave-last split.
SPLITS = ("train", "validation", "test", "test_cold")
# Builder configs: interactions (the default), the item table and the user table.
INTERACTIONS, ITEMS, USERS = "interactions", "items", "users"
CONFIGS = (INTERACTIONS, ITEMS, USERS)
# Content modalities an item can have.
MODALITIES = ("text", "image", "audio")
VERSION = "1.0.0"
# Version of the metadata layout below.
METADATA_FORMAT = 1
# History entries stored per interaction unless an importer is told otherwise.
DEFAULT_HISTORY_LEN = 50

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class DatasetExistsError(FileExistsError):
    """The output dataset already exists and overwriting was not asked for."""


def check_name(name: str) -> str:
    """Returns `name` if it is a valid dataset name (snake_case), else raises ValueError."""
    if not _NAME_PATTERN.match(name or ""):
        raise ValueError(
            f"Dataset name {name!r} is not valid: use lower-case letters, digits and "
            "underscores, starting with a letter (for example my_shop)."
        )
    return name


@dataclasses.dataclass
class ItemTable:
    """Item content, one entry per item row.

    Attributes:
      keys: original item ids.
      texts: item texts ("" when the item has none).
      images: PNG bytes of RGB pictures (b"" when the item has none).
      audios: 16-bit mono WAV bytes (b"" when the item has none).
      extra: more per-item int32/float32 columns stored in the item records.
    """

    keys: list[str]
    texts: list[str]
    images: list[bytes]
    audios: list[bytes]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@dataclasses.dataclass
class InteractionTable:
    """Every interaction of every split.

    Attributes:
      user: (n,) user rows.
      item: (n,) item rows.
      label: (n,) 1.0 engaged, 0.0 not.
      timestamp: (n,) int64 times (any unit; only their order matters).
      split: (n,) index into SPLITS.
      extra: more per-interaction int32/float32 columns stored in the records.
    """

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray
    split: np.ndarray
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclasses.dataclass
class DatasetContent:
    """Everything a dataset's three configs hold, ready to write (see `prepare`)."""

    name: str
    items: ItemTable
    item_id: np.ndarray  # (N,) ID-vocabulary index per item row
    user_keys: list[str]
    user_id: np.ndarray  # (U,) ID-vocabulary index per user row
    user_history: np.ndarray  # (U, H) latest train positives, -1 padded
    user_train_positives: list[np.ndarray]
    user_engaged: list[np.ndarray]
    user_interacted: list[np.ndarray]
    interactions: InteractionTable
    history: np.ndarray  # (n, H) per interaction, -1 padded
    split_order: dict[str, np.ndarray]  # split -> interaction indices in record order
    metadata: dict[str, Any]


def _vocabulary(rows: np.ndarray, size: int) -> np.ndarray:
    """(size,) ID-vocabulary index per row: 1..n for the rows in `rows`, in row order; else 0."""
    vocab = np.zeros(size, np.int32)
    seen = np.unique(rows)
    vocab[seen] = np.arange(1, seen.shape[0] + 1, dtype=np.int32)
    return vocab


def _unique_sorted(values: list[int]) -> np.ndarray:
    return np.unique(np.asarray(values, np.int32)).astype(np.int32)


def content_sha256(items: ItemTable, interactions: InteractionTable) -> str:
    """sha256 over what a model learns from: every item's text, image and audio bytes
    and extra columns, and every interaction's user, item, label, time, split and extra
    columns (the ids are fingerprinted apart, `pipeline.dataset_fingerprint`)."""
    digest = hashlib.sha256(b"mmrec-content-v1")

    def add(raw: bytes) -> None:
        digest.update(len(raw).to_bytes(8, "little") + raw)

    for text, image, audio in zip(items.texts, items.images, items.audios, strict=True):
        add(text.encode("utf-8"))
        add(image)
        add(audio)
    arrays = [interactions.user, interactions.item, interactions.label]
    arrays += [interactions.timestamp, interactions.split]
    for table in (items.extra, interactions.extra):
        for name in sorted(table):
            add(name.encode("utf-8"))
            arrays.append(table[name])
    for array in arrays:
        array = np.ascontiguousarray(array)
        add(str(array.dtype).encode() + array.tobytes())
    return digest.hexdigest()


def prepare(
    name: str,
    items: ItemTable,
    user_keys: Sequence[str],
    interactions: InteractionTable,
    history_len: int,
    metadata: Mapping[str, Any],
) -> DatasetContent:
    """Computes ID vocabularies, histories and the user table; assembles the metadata.

    Args:
      name: dataset name.
      items: the item table.
      user_keys: original user ids, one per user row.
      interactions: every interaction (rows refer to `items` and `user_keys`).
      history_len: history entries stored per interaction and per user.
      metadata: more metadata (source, build options, oracle metrics, media sizes, ...).

    Returns:
      The dataset content, ready for `write_dataset`.
    """
    check_name(name)
    num_items, num_users, n = len(items), len(user_keys), len(interactions)
    if n == 0:
        raise ValueError(f"Dataset {name!r} has no interactions.")
    train = interactions.split == 0
    if not train.any():
        raise ValueError(f"Dataset {name!r} has no training interactions.")
    item_id = _vocabulary(interactions.item[train], num_items)
    user_id = _vocabulary(interactions.user[train], num_users)
    positive = interactions.label > 0.5

    # Walk each user's interactions in time order (ties: input order), keeping the
    # train positives seen so far: the history of a record is the latest of those.
    order = np.lexsort((np.arange(n), interactions.timestamp, interactions.user))
    history = np.full((n, history_len), -1, np.int32)
    user_history = np.full((num_users, history_len), -1, np.int32)
    train_pos: list[list[int]] = [[] for _ in range(num_users)]
    engaged: list[list[int]] = [[] for _ in range(num_users)]
    interacted: list[list[int]] = [[] for _ in range(num_users)]
    users, item_rows = interactions.user.tolist(), interactions.item.tolist()
    is_train, is_pos = train.tolist(), positive.tolist()
    for index in order.tolist():
        user = users[index]
        seen = train_pos[user]
        if seen:
            recent = seen[-history_len:][::-1]
            history[index, : len(recent)] = recent
        interacted[user].append(item_rows[index])
        if is_pos[index]:
            engaged[user].append(item_rows[index])
            if is_train[index]:
                seen.append(item_rows[index])
    for user, seen in enumerate(train_pos):
        recent = seen[-history_len:][::-1]
        user_history[user, : len(recent)] = recent

    split_order = {}
    split_of = interactions.split[order]
    for code, split in enumerate(SPLITS):
        split_order[split] = order[split_of == code]

    present = {
        "text": [bool(t) for t in items.texts],
        "image": [bool(b) for b in items.images],
        "audio": [bool(b) for b in items.audios],
    }
    meta = {
        "format": METADATA_FORMAT,
        "name": name,
        "num_users": int(user_id.max(initial=0)),
        "num_items": int(item_id.max(initial=0)),
        "num_user_rows": num_users,
        "num_item_rows": num_items,
        "modalities": [m for m in MODALITIES if any(present[m])],
        "items_with": {m: int(sum(present[m])) for m in MODALITIES},
        "history_len": int(history_len),
        "positives_only": bool(positive.all()),
        "split_sizes": {s: int(split_order[s].shape[0]) for s in SPLITS},
        "oracle": None,
        "image_size": None,
        "audio_sample_rate": None,
        "audio_max_samples": None,
        "item_ids": [str(k) for k in items.keys],
        "user_ids": [str(k) for k in user_keys],
    }
    meta["content_sha256"] = content_sha256(items, interactions)
    meta.update(metadata)
    return DatasetContent(
        name=name,
        items=items,
        item_id=item_id,
        user_keys=[str(k) for k in user_keys],
        user_id=user_id,
        user_history=user_history,
        user_train_positives=[_unique_sorted(v) for v in train_pos],
        user_engaged=[_unique_sorted(v) for v in engaged],
        user_interacted=[_unique_sorted(v) for v in interacted],
        interactions=interactions,
        history=history,
        split_order=split_order,
        metadata=meta,
    )


def _column_feature(values: np.ndarray):
    return np.float32 if np.issubdtype(values.dtype, np.floating) else np.int32


class MmrecBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a `DatasetContent` as the three configs described in the module docstring.

    Subclasses set `name` and either pass `content=` (importers) or override
    `_make_content` (the synthetic generator).
    """

    RELEASE_NOTES = {VERSION: "Interactions, item table and user table as ArrayRecord."}
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=INTERACTIONS, description="Interactions per split."),
        tfds.core.BuilderConfig(name=ITEMS, description="The item table."),
        tfds.core.BuilderConfig(name=USERS, description="The user table."),
    ]
    # Extra columns: {config: {column: numpy dtype}}; fixed by subclasses that have them.
    EXTRA_FEATURES: dict[str, dict[str, Any]] = {}
    # History entries per record; fixed by subclasses whose code opens built datasets.
    HISTORY_LEN = DEFAULT_HISTORY_LEN

    def __init__(self, *, content: DatasetContent | None = None, **kwargs):
        self._content = content
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: these builders download nothing, so they have no checksums file to find.

        (TFDS's own lookup of the module's package resources fails for editable installs
        without the importlib_resources backport.)
        """
        return None

    def _log_download_bytes(self) -> None:
        """Silent: TFDS would announce a download; these builders download nothing."""

    def _log_download_done(self) -> None:
        """Silent: the importers print their own summary."""

    def _make_content(self) -> DatasetContent:
        raise RuntimeError(
            f"Dataset {self.name!r} is written by its importer; it cannot be generated here."
        )

    def content(self) -> DatasetContent:
        """The content to write (generated on first use by subclasses that generate)."""
        if self._content is None:
            self._content = self._make_content()
        return self._content

    def _history_len(self) -> int:
        if self._content is not None:
            return int(self._content.history.shape[1])
        return self.HISTORY_LEN

    def _extra(self, config: str) -> dict[str, Any]:
        if self._content is None:
            return dict(self.EXTRA_FEATURES.get(config, {}))
        table = self._content.interactions if config == INTERACTIONS else self._content.items
        columns = table.extra if config in (INTERACTIONS, ITEMS) else {}
        return {k: _column_feature(v) for k, v in sorted(columns.items())}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config.name
        history = tfds.features.Tensor(shape=(self._history_len(),), dtype=np.int32)
        if config == INTERACTIONS:
            features = {
                "user_index": np.int32,
                "user_id": np.int32,
                "item_index": np.int32,
                "item_id": np.int32,
                "label": np.float32,
                "timestamp": np.int64,
                "history": history,
            }
        elif config == ITEMS:
            features = {
                "item_key": tfds.features.Text(),
                "item_id": np.int32,
                "text": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "audio": tfds.features.Tensor(shape=(), dtype=np.object_),
                "has_text": np.bool_,
                "has_image": np.bool_,
                "has_audio": np.bool_,
            }
        else:
            features = {
                "user_key": tfds.features.Text(),
                "user_id": np.int32,
                "history": history,
                "train_positives": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "engaged": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "interacted": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }
        features.update(self._extra(config))
        metadata = {}
        if self._content is not None and config == INTERACTIONS:
            metadata = self._content.metadata
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"mmrec dataset {self.name}: {config}.",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(metadata),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        content = self.content()
        config = self.builder_config.name
        if config == ITEMS:
            return {"items": self._items(content)}
        if config == USERS:
            return {"users": self._users(content)}
        # TFDS cannot write an empty split: a split without interactions is left out
        # (its size is 0 in the metadata).
        return {
            split: self._interactions(content, split)
            for split in SPLITS
            if content.split_order[split].shape[0] > 0
        }

    def _generate_examples(self):
        raise NotImplementedError("Examples come from _split_generators' generators.")

    @staticmethod
    def _items(content: DatasetContent) -> Iterator[tuple[int, dict]]:
        items = content.items
        for row in range(len(items)):
            record = {
                "item_key": items.keys[row],
                "item_id": int(content.item_id[row]),
                "text": items.texts[row],
                "image": items.images[row],
                "audio": items.audios[row],
                "has_text": bool(items.texts[row]),
                "has_image": bool(items.images[row]),
                "has_audio": bool(items.audios[row]),
            }
            record.update({k: v[row] for k, v in items.extra.items()})
            yield row, record

    @staticmethod
    def _users(content: DatasetContent) -> Iterator[tuple[int, dict]]:
        for row, key in enumerate(content.user_keys):
            yield (
                row,
                {
                    "user_key": key,
                    "user_id": int(content.user_id[row]),
                    "history": content.user_history[row],
                    "train_positives": content.user_train_positives[row],
                    "engaged": content.user_engaged[row],
                    "interacted": content.user_interacted[row],
                },
            )

    @staticmethod
    def _interactions(content: DatasetContent, split: str) -> Iterator[tuple[int, dict]]:
        table = content.interactions
        for position, index in enumerate(content.split_order[split].tolist()):
            user, item = int(table.user[index]), int(table.item[index])
            record = {
                "user_index": user,
                "user_id": int(content.user_id[user]),
                "item_index": item,
                "item_id": int(content.item_id[item]),
                "label": float(table.label[index]),
                "timestamp": int(table.timestamp[index]),
                "history": content.history[index],
            }
            record.update({k: v[index] for k, v in table.extra.items()})
            yield position, record


def builder_class(name: str) -> type[MmrecBuilder]:
    """An unregistered builder class for an imported dataset called `name`."""
    check_name(name)
    class_name = "".join(part.capitalize() for part in name.split("_")) or "Dataset"
    with registered.skip_registration():
        return type(class_name, (MmrecBuilder,), {"name": name, "__module__": __name__})


def dataset_dir(data_dir: str | Path, name: str) -> Path:
    """DATA_DIR/NAME: the folder holding the three configs."""
    return Path(data_dir) / name


def config_dir(data_dir: str | Path, name: str, config: str) -> Path:
    """DATA_DIR/NAME/CONFIG/VERSION: one config's files."""
    return dataset_dir(data_dir, name) / config / VERSION


def is_built(data_dir: str | Path, name: str) -> bool:
    """Whether all three configs of `name` are completely written in `data_dir`."""
    return all((config_dir(data_dir, name, c) / "dataset_info.json").is_file() for c in CONFIGS)


def is_incomplete(data_dir: str | Path, name: str) -> bool:
    """Whether DATA_DIR/NAME is what an interrupted build leaves: this layout's folders
    (and TFDS's own), but not all three configs complete."""
    target = dataset_dir(data_dir, name)
    if not target.is_dir() or is_built(data_dir, name):
        return False
    return all(child.name in (*CONFIGS, ".config") for child in target.iterdir())


def check_can_write(data_dir: str | Path, name: str, overwrite: bool) -> None:
    """Raises `DatasetExistsError` if writing `name` into `data_dir` would replace a
    dataset without `overwrite` (a folder left by an interrupted build does not count).
    Importers call it first, before reading their input."""
    target = dataset_dir(data_dir, name)
    if target.exists() and not overwrite and not is_incomplete(data_dir, name):
        raise DatasetExistsError(
            f"Dataset {name!r} already exists in {target}. Pass --overwrite to replace it, "
            "or choose another --name or --output."
        )


def write_dataset(
    content: DatasetContent,
    data_dir: str | Path,
    builder_cls: type[MmrecBuilder] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the three configs of `content` into `data_dir` as ArrayRecord.

    Each config is written to a temporary folder and renamed into place by TFDS; the
    interactions config, whose presence marks a complete dataset, is written last.

    Args:
      content: from `prepare`.
      data_dir: folder holding datasets.
      builder_cls: builder class (default: an unregistered one named `content.name`).
      overwrite: replace an existing dataset of that name.

    Returns:
      DATA_DIR/NAME.

    Raises:
      DatasetExistsError: the dataset exists and `overwrite` is False (a folder left by
        an interrupted build is replaced without it).
    """
    target = dataset_dir(data_dir, content.name)
    check_can_write(data_dir, content.name, overwrite)
    if is_incomplete(data_dir, content.name):
        print(f"{target} is incomplete (an interrupted build); writing it again.")
    if target.exists():
        shutil.rmtree(target)
    builder_cls = builder_cls or builder_class(content.name)
    tfds.display_progress_bar(False)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmrec_tfds_") as downloads:
        for config in (ITEMS, USERS, INTERACTIONS):
            builder = builder_cls(
                data_dir=str(data_dir), config=config, content=content, file_format="array_record"
            )
            builder.download_and_prepare(download_dir=downloads)
    return target


class DatasetDamagedError(ValueError):
    """A built dataset's files cannot be read as they were written (a damaged disk, a
    deleted or cut file)."""


def damaged(
    data_dir: str | Path, name: str, what: str, error: BaseException
) -> DatasetDamagedError:
    """The error for dataset `name` whose `what` cannot be read, with the way to rebuild it."""
    return DatasetDamagedError(
        f"Dataset {name!r} in {data_dir} is damaged: {what} cannot be read "
        f"({error_line(error)}). Build it again: move {Path(data_dir) / name} "
        "away and rerun (train.py builds the synthetic dataset again; import your own data "
        "again with the importer's command)."
    )


def read_metadata(data_dir: str | Path, name: str) -> dict[str, Any]:
    """The interactions config's metadata.json of a built dataset.

    Raises:
      DatasetDamagedError: the file is not valid JSON.
    """
    path = config_dir(data_dir, name, INTERACTIONS) / "metadata.json"
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # not UTF-8, or not JSON
        raise damaged(data_dir, name, str(path), error) from error


def open_source(data_dir: str | Path, name: str, config: str, split: str):
    """A random-access source (len, [i], __getitems__) of one split of one config.

    Raises:
      DatasetDamagedError: the config's description files cannot be read.
    """
    folder = config_dir(data_dir, name, config)
    try:
        return tfds.builder_from_directory(str(folder)).as_data_source(split=split)
    except Exception as error:  # noqa: BLE001 - TFDS raises JSON, protobuf or OS errors
        raise damaged(data_dir, name, f"the description of {folder}", error) from error


def read_records(source, indices: list[int], data_dir: str | Path, name: str, what: str) -> list:
    """`source.__getitems__(indices)`, a failed or missing read raised as damage.

    Raises:
      DatasetDamagedError: a record cannot be read (a cut or corrupted shard file).
    """
    try:
        records = source.__getitems__(indices)
    except (RuntimeError, OSError, ValueError) as error:
        raise damaged(data_dir, name, what, error) from error
    if any(record is None for record in records):
        raise damaged(data_dir, name, what, ValueError("a record came back empty"))
    return records


def check_readable(data_dir: str | Path, name: str, split_sizes: dict[str, int]) -> None:
    """Reads the first and last record of every split of a built dataset (its
    interaction splits' sizes are `split_sizes`, as its metadata records them).

    A deleted or cut shard file fails here, at once, instead of in the middle of a run
    (its test split is read after training). Bytes changed inside a file are caught
    where they are read.

    Raises:
      DatasetDamagedError: naming what cannot be read.
    """
    parts = [(INTERACTIONS, s) for s in SPLITS if split_sizes.get(s)]
    parts += [(ITEMS, ITEMS), (USERS, USERS)]
    for config, split in parts:
        source = open_source(data_dir, name, config, split)
        size = len(source)
        what = f"the {split} records of {config_dir(data_dir, name, config)}"
        read_records(source, sorted({0, size - 1}) if size else [], data_dir, name, what)


def text(value: bytes | str) -> str:
    """A TFDS Text feature's value as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
