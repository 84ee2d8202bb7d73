"""The input pipeline: TFDS ArrayRecord sources -> Grain -> batches in the model's schema.

    source (interaction ids) -> per-epoch seeded shuffle -> repeat -> global batch
      -> this process's slice -> read records, sample negatives, join item content
      -> item block -> prefetch (threads, or Grain worker processes)

Item content is decoded once: `ItemStore` reads the dataset's item table and holds every
item's decoded content in memory arrays (images uint8 (N, S, S, 3) resized to
`config.model.image.size`; audio float32 (N, T) mono, resampled to
`config.model.audio.sample_rate` and cropped or zero-padded to `clip_samples`; text token
ids, or the cached frozen-BERT embeddings; has_* flags; ID-vocabulary indices). A batch
then only gathers rows. When the decoded images and audio would exceed
`config.data.max_item_memory_mib`, images and audio are instead decoded per batch from
the item table (the text arrays stay in memory): slower per batch, bounded memory.

Batches (`make_batches`) follow `mmrec_jax.schema`. Example positions: the training
stream is every epoch's seeded permutation of the split's examples, one after the other
(seed `config.seed`, epoch e shuffled with seed + e); global batch k is positions
[k*B, (k+1)*B) of it, and process p of P takes the p-th contiguous B/P rows of it, so the
global batch of a step is the same whatever P is. The item block of process p holds the
unique items (candidates, and history items when the history tower is on) of its rows,
padded to `capacity` slots; the slots its rows point at are offset by p * capacity, so
the global item block is the processes' blocks concatenated. Padding slots have
item_id 0, item_index -1 and every has_* False. A block large enough for the content towers
(a trained BERT, image, audio) to encode in chunks (`schema.BLOCK_CHUNKS`) places its
items chunk by chunk (`schema.slot_order`), so its padding fills whole chunks that they
skip.

Positives-only datasets get `config.data.negatives_per_positive` (k) sampled negatives
per positive: example e of a split with n interactions (0 <= e < n * (1 + k)) is
interaction e // (1 + k) itself when e % (1 + k) == 0, else a negative: the same user and
history with an item the user never engaged with (in any split), drawn from the training
catalogue (items with an ID; for test_cold, the items without one) by a counter-based
hash of (seed, epoch, e). The evaluation splits are sampled the same way with epoch 0,
so their AUC is defined and fixed.

Evaluation (`train=False`) is one ordered pass; the last global batch is completed with
weight-0 rows. A training stream resumes at a position counted in rows (`start_row`: the
rows of the batches already trained on), so a run resumes at the exact next batch
whatever its loading options (worker processes, prefetch) were before.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from mmrec_jax import files, schema
from mmrec_jax.config import ConfigError
from mmrec_jax.data import builder, media

# Records read from the item table per chunk while decoding it.
_ITEM_CHUNK = 1024
# Rejection-sampling attempts before a negative is drawn from the explicit complement.
_NEGATIVE_ATTEMPTS = 32
_DEFAULT_EPOCHS = object()


class DatasetNotBuiltError(FileNotFoundError):
    """The configured dataset is not in the configured data folder."""


class DatasetMismatchError(ValueError):
    """The dataset opened is not the one a checkpoint was trained on."""


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training, evaluation and export code needs to know about a dataset.

    Attributes:
      name: dataset name.
      data_dir: the folder holding it.
      num_users: user ID-vocabulary size without the OOV bucket (users in train).
      num_items: item ID-vocabulary size without the OOV bucket (items in train).
      num_user_rows: users in the user table.
      num_item_rows: items in the item table.
      modalities: content modalities at least one item has, from ("text", "image", "audio").
      image_size: side of the stored images when they all share it (synthetic), else None.
      audio_sample_rate: sample rate of the stored audio in Hz, None without audio.
      audio_max_samples: longest stored clip in samples, None without audio.
      history_len: history entries stored per interaction (config.data.history_len <= it).
      positives_only: every interaction is a positive (negatives are sampled).
      split_sizes: interactions per split (0 for a split the dataset lacks).
      oracle: {split: {"auc", "logloss", ...}} of the true probabilities, or None.
      item_ids: original item ids, one per item row.
      user_ids: original user ids, one per user row.
      metadata: the whole stored metadata.
    """

    name: str
    data_dir: str
    num_users: int
    num_items: int
    num_user_rows: int
    num_item_rows: int
    modalities: tuple[str, ...]
    image_size: int | None
    audio_sample_rate: int | None
    audio_max_samples: int | None
    history_len: int
    positives_only: bool
    split_sizes: dict[str, int]
    oracle: dict[str, dict] | None
    item_ids: tuple[str, ...] = dataclasses.field(repr=False)
    user_ids: tuple[str, ...] = dataclasses.field(repr=False)
    metadata: dict[str, Any] = dataclasses.field(repr=False)

    @property
    def dataset_dir(self) -> Path:
        """DATA_DIR/NAME."""
        return builder.dataset_dir(self.data_dir, self.name)


def _importer_hint(name: str, data_dir: str) -> str:
    return (
        f"Build it first, for example:\n"
        f"  python -m mmrec_jax.data.local --input FOLDER --output {data_dir} --name {name}\n"
        f"  python -m mmrec_jax.data.movielens --input ml-latest-small --output {data_dir} "
        f"--name {name}\n"
        f"or set config.data.name / config.data.data_dir to a dataset that exists."
    )


def ensure_dataset(data_config) -> None:
    """Makes sure `data_config.name` is built in `data_config.data_dir`.

    `mmrec_synthetic` is generated there on first use, with the sizes in
    `data_config.synthetic`; any other missing dataset is an error naming the importer
    command that builds it.

    Raises:
      DatasetNotBuiltError: a dataset other than mmrec_synthetic is missing.
      ValueError: mmrec_synthetic exists there, generated with other settings.
    """
    from mmrec_jax.data import synthetic

    name, data_dir = data_config.name, str(data_config.data_dir)
    built = builder.is_built(data_dir, name)
    if name != synthetic.NAME:
        if not built:
            raise DatasetNotBuiltError(
                f"Dataset {name!r} is not built in {data_dir!r} (no complete "
                f"{builder.dataset_dir(data_dir, name)}). " + _importer_hint(name, data_dir)
            )
        return
    wanted = _synthetic_args(data_config)
    if built:
        stored = builder.read_metadata(data_dir, name).get("generator", {})
        different = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if different:
            details = ", ".join(
                f"{k}: built {a}, configured {b}" for k, (a, b) in different.items()
            )
            raise ConfigError(
                f"{builder.dataset_dir(data_dir, name)} was generated with other settings "
                f"({details}). Point config.data.data_dir at another folder, or delete that "
                "folder to regenerate it."
            )
        return
    reason = files.unwritable_reason(data_dir)
    if reason is not None:
        raise ConfigError(
            f"Cannot write the dataset {name} into config.data.data_dir={data_dir!r} "
            f"({reason}). Point config.data.data_dir at a folder you can write to."
        )
    # A folder left by an interrupted build is replaced by `write_dataset`; any other
    # folder of that name is not this layout and is kept.
    try:
        synthetic.build(data_dir, **wanted)
    except builder.DatasetExistsError as error:
        raise ConfigError(
            f"{builder.dataset_dir(data_dir, name)} exists but is not a dataset this version "
            "of mmrec_jax wrote, so it is left alone. Move it away, or point "
            "config.data.data_dir at another folder."
        ) from error


def _synthetic_args(data_config) -> dict[str, Any]:
    syn = data_config.synthetic
    return {
        "num_users": int(syn.num_users),
        "num_items": int(syn.num_items),
        "seed": int(syn.seed),
        "cold_item_share": float(syn.cold_item_share),
        "missing_share": float(syn.missing_share),
    }


def load_dataset_info(data_config) -> DatasetInfo:
    """Reads the metadata of the dataset `data_config.name` in `data_config.data_dir`.

    Raises:
      DatasetNotBuiltError: the dataset is not there.
    """
    name, data_dir = data_config.name, str(data_config.data_dir)
    if not builder.is_built(data_dir, name):
        raise DatasetNotBuiltError(
            f"Dataset {name!r} is not built in {data_dir!r}. "
            + (
                "train.py generates it on first use; to generate it now with this "
                "config's settings: python -m mmrec_jax.data.synthetic --output "
                f"{data_dir} "
                + " ".join(f"--{k} {v}" for k, v in _synthetic_args(data_config).items())
                + " (from Python: pipeline.ensure_dataset(config.data))."
                if name == "mmrec_synthetic"
                else _importer_hint(name, data_dir)
            )
        )
    meta = builder.read_metadata(data_dir, name)
    return DatasetInfo(
        name=name,
        data_dir=data_dir,
        num_users=int(meta["num_users"]),
        num_items=int(meta["num_items"]),
        num_user_rows=int(meta["num_user_rows"]),
        num_item_rows=int(meta["num_item_rows"]),
        modalities=tuple(meta["modalities"]),
        image_size=meta.get("image_size"),
        audio_sample_rate=meta.get("audio_sample_rate"),
        audio_max_samples=meta.get("audio_max_samples"),
        history_len=int(meta["history_len"]),
        positives_only=bool(meta["positives_only"]),
        split_sizes={s: int(meta["split_sizes"].get(s, 0)) for s in builder.SPLITS},
        oracle=meta.get("oracle"),
        item_ids=tuple(meta["item_ids"]),
        user_ids=tuple(meta["user_ids"]),
        metadata=meta,
    )


def dataset_fingerprint(info: DatasetInfo) -> dict:
    """What identifies a dataset's content: its sizes, a hash of its user and item ids and
    one of the content itself (`builder.content_sha256`; datasets built before it have
    none, and nothing is compared for it).

    A run records it with each checkpoint; evaluation, export and resuming compare it with
    the dataset they open, so that another dataset under the same name is refused.
    """
    ids = json.dumps([list(info.user_ids), list(info.item_ids)]).encode()
    content = info.metadata.get("content_sha256")
    return {
        "name": info.name,
        "num_users": info.num_users,
        "num_items": info.num_items,
        "num_user_rows": info.num_user_rows,
        "num_item_rows": info.num_item_rows,
        "split_sizes": dict(info.split_sizes),
        "ids_sha256": hashlib.sha256(ids).hexdigest(),
        **({"content_sha256": content} if content else {}),
    }


def check_same_dataset(recorded: Mapping | None, info: DatasetInfo, what: str, fix: str) -> None:
    """Raises DatasetMismatchError when `info` is not the dataset `recorded` describes.

    Args:
      recorded: a `dataset_fingerprint` kept with a checkpoint (None for checkpoints
        written before fingerprints: nothing to compare).
      info: the dataset opened now.
      what: the checkpoint, for the message ("step 30 of runs/demo").
      fix: what the user of this command does about it, for the message.
    """
    if not recorded:
        return
    found = dataset_fingerprint(info)
    differences = [
        f"its content (item texts or media, labels or times) differs ({recorded[key][:12]} "
        f"then, {found[key][:12]} now)"
        if key == "content_sha256"
        else f"{key} {recorded[key]!r} then, {found[key]!r} now"
        for key in found
        if key in recorded and recorded[key] != found[key]
    ]
    if differences:
        raise DatasetMismatchError(
            f"The dataset in {info.data_dir} is not the one {what} was trained on: "
            f"{'; '.join(differences)}. {fix}"
        )


def available_towers(towers: str | Sequence[str], info: DatasetInfo) -> str:
    """`towers` without the content towers of modalities the dataset lacks ("text,id")."""
    names = schema.parse_towers(towers)
    kept = [t for t in names if t not in builder.MODALITIES or t in info.modalities]
    if not set(kept) & set(schema.ITEM_TOWERS):
        raise ConfigError(
            f"Towers {','.join(names)} need modalities dataset {info.name!r} lacks (it has "
            f"{', '.join(info.modalities) or 'none'}), which leaves no item tower; add the "
            "id tower (--config.model.towers=" + ",".join([*kept, "id"]) + ")."
        )
    return ",".join(kept)


# ------------------------------------------------------------------------------- tables


class _SplitReader:
    """Random access to one split of one config; reopened after pickling (Grain workers)."""

    def __init__(self, data_dir: str, name: str, config: str, split: str):
        self._where = (data_dir, name, config, split)
        self._source = None

    def __getstate__(self):
        return {"_where": self._where, "_source": None}

    def __len__(self) -> int:
        return len(self._open())

    def _open(self):
        if self._source is None:
            self._source = builder.open_source(*self._where)
        return self._source

    def read(self, indices: Sequence[int]) -> list[dict]:
        """The records at `indices`, decoded to numpy values.

        Raises:
          builder.DatasetDamagedError: a record cannot be read.
        """
        data_dir, name, config, split = self._where
        what = f"the {split} records of {builder.config_dir(data_dir, name, config)}"
        return builder.read_records(self._open(), [int(i) for i in indices], data_dir, name, what)


def _csr(lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(v) for v in lists])
    values = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    return offsets, values


@dataclasses.dataclass
class UserStore:
    """The user table in memory.

    Attributes:
      user_id: (U,) ID-vocabulary index per user row (0 = OOV).
      history: (U, Hmax) the latest train positives (item rows), most recent first, -1 pad.
      train_positives: CSR (offsets (U+1,), item rows): what ranking excludes.
      engaged: CSR (offsets (U+1,), item rows): positives of any split.
      interacted: CSR (offsets (U+1,), item rows): items of any interaction of any
        split, positive or not (a dataset built without this field: its positives).
    """

    user_id: np.ndarray
    history: np.ndarray
    train_positives: tuple[np.ndarray, np.ndarray]
    engaged: tuple[np.ndarray, np.ndarray]
    interacted: tuple[np.ndarray, np.ndarray]

    @classmethod
    def load(cls, info: DatasetInfo) -> UserStore:
        """Reads the user table of `info`'s dataset."""
        reader = _SplitReader(info.data_dir, info.name, builder.USERS, "users")
        records = []
        for start in range(0, info.num_user_rows, _ITEM_CHUNK):
            records += reader.read(range(start, min(start + _ITEM_CHUNK, info.num_user_rows)))
        engaged = _csr([r["engaged"] for r in records])
        return cls(
            user_id=np.array([r["user_id"] for r in records], np.int32),
            history=np.stack([r["history"] for r in records]).astype(np.int32),
            train_positives=_csr([r["train_positives"] for r in records]),
            engaged=engaged,
            interacted=(
                _csr([r["interacted"] for r in records])
                if records and "interacted" in records[0]
                else engaged
            ),
        )

    def latest_history(self, history_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's latest `history_len` train positives, for scoring a whole catalogue.

        Returns:
          rows (U, H) int32 item rows (padding entries point at row 0) and
          mask (U, H) bool, True where an entry is real.
        """
        history = self.history[:, :history_len]
        return np.maximum(history, 0).astype(np.int32), history >= 0


class ItemStore:
    """The item table decoded into memory arrays for the towers of a config.

    Attributes:
      info: the dataset's `DatasetInfo`.
      towers: enabled towers (config.model.towers, parsed).
      num_item_rows: N.
      item_id: (N,) int32 ID-vocabulary index per item row (0 = OOV).
      has: {modality: (N,) bool} for the dataset's modalities.
      arrays: {"image": (N, S, S, 3) uint8, "audio": (N, T) float32, "text_ids",
        "text_mask": (N, L) int32 or "text_embedding": (N, Dt) float32}, for the enabled
        towers; image and audio are absent here when they are decoded per block.
      texts: (N,) each item's text ("" without one), as the dataset stores it.
      users: the `UserStore`.
    """

    def __init__(self, config, info: DatasetInfo | None = None):
        """Reads and decodes the item table of `config.data`'s dataset.

        Args:
          config: the run config (data, model.towers, model.text, model.image/audio).
          info: the dataset's info (read from config.data when None).
        """
        self.info = info or load_dataset_info(config.data)
        self.towers = schema.parse_towers(config.model.towers)
        self.text_mode = config.model.text.mode
        self.image_size = int(config.model.image.size)
        self.sample_rate = int(config.model.audio.sample_rate)
        self.clip_samples = int(config.model.audio.clip_samples)
        self.num_item_rows = self.info.num_item_rows
        self._reader = _SplitReader(self.info.data_dir, self.info.name, builder.ITEMS, "items")
        n = self.num_item_rows
        wanted = [m for m in ("image", "audio") if m in self.towers and m in self.info.modalities]
        per_item = {"image": self.image_size**2 * 3, "audio": self.clip_samples * 4}
        decoded_mib = n * sum(per_item[m] for m in wanted) / 2**20
        self.in_memory = decoded_mib <= float(config.data.max_item_memory_mib)
        self._decoded = wanted if self.in_memory else []
        self._lazy = [] if self.in_memory else wanted

        self.item_id = np.zeros(n, np.int32)
        self.has = {m: np.zeros(n, bool) for m in builder.MODALITIES}
        self.arrays: dict[str, np.ndarray] = {}
        if "image" in self._decoded:
            self.arrays["image"] = np.zeros((n, self.image_size, self.image_size, 3), np.uint8)
        if "audio" in self._decoded:
            self.arrays["audio"] = np.zeros((n, self.clip_samples), np.float32)
        self.texts: list[str] = []
        for start in range(0, n, _ITEM_CHUNK):
            rows = range(start, min(start + _ITEM_CHUNK, n))
            for row, record in zip(rows, self._reader.read(rows), strict=True):
                self.item_id[row] = record["item_id"]
                for m in builder.MODALITIES:
                    self.has[m][row] = bool(record[f"has_{m}"])
                self.texts.append(builder.text(record["text"]) if record["has_text"] else "")
                self._decode_into(self.arrays, row, record, self._decoded)
        if "text" in self.towers:
            self._load_text(config, self.texts)
        self.users = UserStore.load(self.info)

    def _decode_into(self, arrays: dict, slot: int, record: Mapping, modalities) -> None:
        """Decodes `record`'s image/audio (validated when the dataset was built) into `arrays`."""
        for m in modalities:
            if not record[f"has_{m}"]:
                continue
            if m == "image":
                arrays["image"][slot] = media.decode_image(record["image"], self.image_size)
            else:
                arrays["audio"][slot] = media.decode_audio(
                    record["audio"], self.sample_rate, self.clip_samples
                )

    def _load_text(self, config, texts: list[str]) -> None:
        max_len = int(config.data.max_text_len)
        if schema.text_is_trained(self.text_mode):
            from mmrec_jax.data.text_cache import tokenize_for_model

            ids, mask = tokenize_for_model(config.model.text.model, texts + [""], max_len)
            # The last row, the empty text, fills padding slots: [CLS] [SEP], never all-masked.
            self.arrays["text_ids"], self.arrays["text_mask"] = ids[:-1], mask[:-1]
            self._empty_text = (ids[-1], mask[-1])
        else:
            from mmrec_jax.data.text_cache import text_embeddings

            embeddings = text_embeddings(
                texts,
                config.model.text.model,
                config.model.text.pooling,
                max_len,
                self.info.dataset_dir / "text_cache",
            )
            embeddings = np.asarray(embeddings, np.float32)
            embeddings[~self.has["text"]] = 0.0
            self.arrays["text_embedding"] = embeddings

    def block(self, item_rows: np.ndarray, capacity: int) -> dict[str, np.ndarray]:
        """The item block of `item_rows` (in that order), padded to `capacity` slots.

        Args:
          item_rows: (n,) item-table rows, n <= capacity.
          capacity: slots in the block.

        Returns:
          The schema's `items` dict for the enabled towers; padding slots have item_id 0,
          item_index -1 and has_* False.
        """
        rows = np.asarray(item_rows, np.int64)
        n = rows.shape[0]
        if n > capacity:
            raise ValueError(f"{n} items do not fit an item block of capacity {capacity}.")
        out = {
            "item_id": np.zeros(capacity, np.int32),
            "item_index": np.full(capacity, -1, np.int32),
        }
        out["item_id"][:n] = self.item_id[rows]
        out["item_index"][:n] = rows
        if "text" in self.towers:
            if schema.text_is_trained(self.text_mode):
                empty_ids, empty_mask = self._empty_text
                for key, empty in (("text_ids", empty_ids), ("text_mask", empty_mask)):
                    out[key] = np.broadcast_to(empty, (capacity, empty.shape[0])).copy()
                    out[key][:n] = self.arrays[key][rows]
            else:
                table = self.arrays["text_embedding"]
                out["text_embedding"] = np.zeros((capacity, table.shape[1]), np.float32)
                out["text_embedding"][:n] = table[rows]
        if "image" in self.towers:
            out["image"] = np.zeros((capacity, self.image_size, self.image_size, 3), np.uint8)
        if "audio" in self.towers:
            out["audio"] = np.zeros((capacity, self.clip_samples), np.float32)
        for m in ("image", "audio"):
            if m in self._decoded:
                out[m][:n] = self.arrays[m][rows]
        if self._lazy and n:
            unique, inverse = np.unique(rows, return_inverse=True)
            decoded = {
                m: np.zeros((unique.shape[0], *out[m].shape[1:]), out[m].dtype) for m in self._lazy
            }
            for slot, record in enumerate(self._reader.read(unique)):
                self._decode_into(decoded, slot, record, self._lazy)
            for m in self._lazy:
                out[m][:n] = decoded[m][inverse]
        for m in builder.MODALITIES:
            if m in self.towers:
                out[f"has_{m}"] = np.zeros(capacity, bool)
                out[f"has_{m}"][:n] = self.has[m][rows]
        return out


# ------------------------------------------------------------------------------ batches


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays: a well-spread hash of each value."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class NegativeSampler:
    """Deterministic negatives: items a user never engaged with, hashed from the example.

    Args:
      engaged: CSR (offsets (U+1,), sorted item rows) of each user's positives.
      pool: (P,) item rows negatives are drawn from.
      num_item_rows: N.
      seed: the run's seed.
    """

    def __init__(
        self,
        engaged: tuple[np.ndarray, np.ndarray],
        pool: np.ndarray,
        num_item_rows: int,
        seed: int,
    ):
        if pool.shape[0] == 0:
            raise ValueError("No items to sample negatives from (the candidate pool is empty).")
        offsets, rows = engaged
        users = np.repeat(np.arange(offsets.shape[0] - 1, dtype=np.int64), np.diff(offsets))
        in_pool = np.bincount(
            users, weights=np.isin(rows, pool), minlength=offsets.shape[0] - 1
        )  # (U,) engaged items that negatives could be drawn from
        saturated = np.flatnonzero(in_pool >= np.unique(pool).shape[0])
        if saturated.size:
            raise ConfigError(
                f"{saturated.size} user(s) (rows {saturated[:5].tolist()} of the dataset's "
                f"user table) engaged with every one of the {pool.shape[0]} items negatives "
                "are drawn from, so no negative exists for them. Remove those users from the "
                "interactions, or give the interactions labels (0/1) instead of sampling."
            )
        self._keys = np.sort(users * num_item_rows + rows.astype(np.int64))
        self._engaged = engaged
        self._pool = np.asarray(pool, np.int64)
        self._n = int(num_item_rows)
        self._seed = np.uint64(seed)

    def _is_engaged(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self._n + items
        found = np.searchsorted(self._keys, keys)
        found = np.minimum(found, max(self._keys.shape[0] - 1, 0))
        return (self._keys.shape[0] > 0) & (self._keys[found] == keys)

    def sample(self, users: np.ndarray, epochs: np.ndarray, examples: np.ndarray) -> np.ndarray:
        """One negative item row per (user, epoch, example), the same on every call."""
        with np.errstate(over="ignore"):
            base = _mix(_mix(_mix(np.full(users.shape, self._seed)) ^ epochs.astype(np.uint64)))
            base = _mix(base ^ examples.astype(np.uint64))
            out = np.full(users.shape, -1, np.int64)
            todo = np.ones(users.shape, bool)
            size = np.uint64(self._pool.shape[0])
            for attempt in range(_NEGATIVE_ATTEMPTS):
                hashed = _mix(base ^ np.uint64(attempt))
                candidates = self._pool[(hashed % size).astype(np.int64)]
                ok = todo & ~self._is_engaged(users, candidates)
                out[ok] = candidates[ok]
                todo &= ~ok
                if not todo.any():
                    return out
            for i in np.flatnonzero(todo):  # users who engaged with nearly the whole pool
                offsets, rows = self._engaged
                seen = rows[offsets[users[i]] : offsets[users[i] + 1]]
                free = np.setdiff1d(self._pool, seen)
                if free.shape[0] == 0:
                    raise ValueError(
                        f"User row {int(users[i])} engaged with every candidate item; no "
                        "negative can be sampled for it."
                    )
                out[i] = free[int(base[i] % np.uint64(free.shape[0]))]
        return out


def _tag_position(position: int, example: int) -> np.ndarray:
    """(position in the stream, example id) of one stream element."""
    return np.array([position, example], np.int64)


class _ProcessSlice:
    """Global batch of (position, example) -> this process's rows, padded to full size."""

    def __init__(self, index: int, count: int, batch_size: int):
        self.index, self.count, self.batch_size = index, count, batch_size

    def __call__(self, tagged: np.ndarray) -> dict[str, np.ndarray]:
        real = tagged.shape[0]
        if real < self.batch_size:  # the evaluation pass's last batch
            pad = np.repeat(tagged[:1], self.batch_size - real, axis=0)
            tagged = np.concatenate([tagged, pad])
        weight = (np.arange(self.batch_size) < real).astype(np.float32)
        local = self.batch_size // self.count
        part = slice(self.index * local, (self.index + 1) * local)
        return {"position": tagged[part, 0], "example": tagged[part, 1], "weight": weight[part]}


class _Assembler:
    """This process's (position, example) rows -> a batch in the schema."""

    def __init__(
        self,
        reader: _SplitReader,
        store: ItemStore,
        sampler: NegativeSampler | None,
        group: int,
        epoch_length: int,
        train: bool,
        history_len: int,
        capacity: int,
        slot_offset: int,
        in_chunks: bool,
    ):
        self.reader, self.store, self.sampler = reader, store, sampler
        self.group, self.epoch_length, self.train = group, epoch_length, train
        self.history_len, self.capacity, self.slot_offset = history_len, capacity, slot_offset
        self.use_history = "history" in store.towers
        # (capacity,) block position -> slot, filling the block chunks in order; None: the
        # slot is the position.
        self.slot_order = schema.slot_order(capacity) if in_chunks else None

    def __call__(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
        examples = rows["example"]
        records = self.reader.read(examples // self.group)
        user_index = np.array([r["user_index"] for r in records], np.int32)
        candidate = np.array([r["item_index"] for r in records], np.int64)
        label = np.array([r["label"] for r in records], np.float32)
        history = np.stack([r["history"][: self.history_len] for r in records]).astype(np.int64)
        if self.sampler is not None:
            negative = examples % self.group != 0
            if negative.any():
                epochs = rows["position"] // self.epoch_length if self.train else 0 * examples
                candidate[negative] = self.sampler.sample(
                    user_index[negative].astype(np.int64), epochs[negative], examples[negative]
                )
                label[negative] = 0.0
        history_mask = history >= 0
        needed = [candidate]
        if self.use_history:
            needed.append(history[history_mask])
        block_rows = np.unique(np.concatenate(needed))  # (n,) in block position order
        batch = {
            "user_id": self.store.users.user_id[user_index],
            "user_index": user_index,
            "item_slot": (
                self._slot(np.searchsorted(block_rows, candidate)) + self.slot_offset
            ).astype(np.int32),
            "label": label,
            "weight": rows["weight"].astype(np.float32),
        }
        if self.use_history:
            slots = self._slot(np.searchsorted(block_rows, np.maximum(history, 0)))
            slots = np.where(history_mask, slots, 0) + self.slot_offset
            batch["history_slot"] = slots.astype(np.int32)
            batch["history_mask"] = history_mask
        items = self.store.block(block_rows, self.capacity)  # by position: used ones first
        if self.slot_order is not None:
            items = {name: _by_slot(array, self.slot_order) for name, array in items.items()}
        batch["items"] = items
        return batch

    def _slot(self, positions: np.ndarray) -> np.ndarray:
        """The slots of block positions."""
        return positions if self.slot_order is None else self.slot_order[positions]


def _by_slot(array: np.ndarray, slot_of: np.ndarray) -> np.ndarray:
    """`array` (capacity, ...) in block position order, rearranged into slot order."""
    placed = np.empty_like(array)
    placed[slot_of] = array
    return placed


def num_examples(info: DatasetInfo, split: str, negatives_per_positive: int) -> int:
    """Examples in one pass over `split`: interactions times (1 + negatives) if sampled."""
    group = 1 + _negatives(info, negatives_per_positive)
    return info.split_sizes.get(split, 0) * group


def _negatives(info: DatasetInfo, negatives_per_positive: int) -> int:
    if not info.positives_only:
        return 0
    if negatives_per_positive < 1:
        raise ConfigError(
            f"Dataset {info.name!r} holds positives only; set "
            "config.data.negatives_per_positive to 1 or more (for example 4) so that the "
            "model also sees negatives."
        )
    return int(negatives_per_positive)


def fitting_batch_size(examples: int, num_devices: int = 1) -> int:
    """A batch size for a small training split, divisible by the devices: a power of two
    giving about 8 batches per epoch where the split allows, else the largest that fits.

    Returns 0 when the split has fewer examples than there are devices.
    """
    power = 1 << (max(examples // 8, 1).bit_length() - 1)  # the largest power of 2 <= n / 8
    size = max(power // num_devices * num_devices, num_devices)
    return size if size <= examples else examples // num_devices * num_devices


def num_batches(
    config,
    split: str,
    *,
    train: bool,
    info: DatasetInfo | None = None,
    batch_size: int | None = None,
) -> int:
    """Global batches in one pass over `split` (train: whole batches only)."""
    info = info or load_dataset_info(config.data)
    size = int(batch_size or config.train.batch_size)
    examples = num_examples(info, split, int(config.data.negatives_per_positive))
    return examples // size if train else -(-examples // size)


def make_batches(
    config,
    split: str,
    *,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
    start_row: int = 0,
    item_store: ItemStore | None = None,
    multiple: int | None = None,
    batch_size: int | None = None,
    num_epochs: Any = _DEFAULT_EPOCHS,
    sample: int | None = None,
) -> grain.DatasetIterator:
    """An iterator over this process's part of the batches of `split`.

    Args:
      config: the run config (data, model.towers, model.text.mode, seed, train.batch_size).
      split: "train", "validation", "test" or "test_cold".
      train: shuffle every epoch, repeat, drop the last partial batch; else one ordered
        pass whose last batch is completed with weight-0 rows.
      process_index: this JAX process (jax.process_index()).
      process_count: number of JAX processes (jax.process_count()).
      start_row: global rows of the stream to skip: the batches of an earlier iterator
        of the same arguments (and any batch size) that were already consumed. The next
        batch starts at that row.
      item_store: an `ItemStore` of this config, to share the decoded items.
      multiple: the item block's capacity is a multiple of this (default: the local
        device count, over which the block is sharded).
      batch_size: global rows per batch (default config.train.batch_size).
      num_epochs: train passes before the iterator ends (default: forever when
        config.train.num_steps > 0, else config.train.num_epochs); None: forever.
      sample: evaluation only: pass over this many of the split's interactions (each with
        its negatives), drawn at random (seeded by config.seed) and read in stored order;
        None, or at least the split's size: all of them.

    Returns:
      A Grain `DatasetIterator` of numpy batch dicts (see `mmrec_jax.schema`) with B/P
      rows each.
    """
    info = load_dataset_info(config.data)
    if split not in builder.SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(builder.SPLITS)}.")
    if info.split_sizes[split] == 0:
        present = [s for s in builder.SPLITS if info.split_sizes[s]]
        raise ValueError(
            f"Dataset {info.name!r} has no {split!r} interactions; its splits are "
            f"{', '.join(present)}."
        )
    size = int(batch_size or config.train.batch_size)
    if start_row < 0:
        raise ValueError(f"start_row={start_row} must be 0 or more (rows already consumed).")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
    if size % process_count:
        raise ConfigError(
            f"Batch size {size} must be divisible by the number of processes ({process_count})."
        )
    history_len = int(config.data.history_len)
    if not 1 <= history_len <= info.history_len:
        raise ConfigError(
            f"config.data.history_len={history_len} must lie in [1, {info.history_len}] (the "
            f"history stored in dataset {info.name!r})."
        )
    negatives = _negatives(info, int(config.data.negatives_per_positive))
    group = 1 + negatives
    examples = info.split_sizes[split] * group
    if train and examples < size:
        raise ConfigError(
            f"Batch size {size} is larger than the {split!r} split ({examples} examples); "
            "lower config.train.batch_size."
        )
    store = item_store or ItemStore(config, info)
    if multiple is None:
        import jax

        multiple = jax.local_device_count()
    local = size // process_count
    # Content towers encode the item block, a large one in chunks that fill in order.
    content = schema.content_in_step(store.towers, store.text_mode)
    capacity = schema.item_capacity(
        local,
        history_len,
        info.num_item_rows,
        multiple,
        "history" in store.towers,
        content,
        process_count,
    )
    # The model decides on the global block: every process's together.
    in_chunks = content and schema.block_chunks(capacity * process_count) > 1
    sampler = None
    if negatives:
        cold_split = split == "test_cold"
        pool = np.flatnonzero((store.item_id == 0) if cold_split else (store.item_id > 0))
        sampler = NegativeSampler(store.users.engaged, pool, info.num_item_rows, int(config.seed))
    if num_epochs is _DEFAULT_EPOCHS:
        num_epochs = None if int(config.train.num_steps) > 0 else int(config.train.num_epochs)

    if sample is not None and train:
        raise ValueError("sample= is for an evaluation pass (train=False).")
    if sample is not None and sample < 1:
        raise ValueError(f"sample={sample} must be at least 1 interaction.")
    interactions = info.split_sizes[split]
    if sample is not None and sample < interactions:
        rng = np.random.default_rng(int(config.seed))
        chosen = np.sort(rng.choice(interactions, sample, replace=False))  # (S,) records
        ds = grain.MapDataset.source((chosen[:, None] * group + np.arange(group)).ravel())
    else:
        ds = grain.MapDataset.range(examples)
    if train:
        ds = ds.shuffle(seed=int(config.seed)).repeat(num_epochs)
    ds = ds.map_with_index(_tag_position)  # positions count from the stream's start
    if start_row:
        ds = ds[start_row:]
    ds = ds.batch(size, drop_remainder=train)
    ds = ds.map(_ProcessSlice(process_index, process_count, size))
    reader = _SplitReader(info.data_dir, info.name, builder.INTERACTIONS, split)
    ds = ds.map(
        _Assembler(
            reader,
            store,
            sampler,
            group,
            examples,
            train,
            history_len,
            capacity,
            process_index * capacity,
            in_chunks,
        )
    )
    prefetch = int(config.data.prefetch)
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)
    )
    workers = int(config.data.num_workers)
    if workers > 0:
        from absl import flags

        # Grain's worker processes read absl flags; programs without absl.app (train.py,
        # tests) have not parsed them, so use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(prefetch, 1)
            ),
            worker_init_fn=functools.partial(_init_worker, parent=os.getpid()),
        )
        _unlink_freed_batches_at_exit()
    return iter(iter_ds)


@functools.cache
def _unlink_freed_batches_at_exit() -> None:
    """Registers `_finish_unlinking_batches` to run at exit (once per process).

    `multiprocessing` registered its own exit handler when Grain imported it, before
    this: exit handlers run last registered first, so this one runs before it.
    """
    atexit.register(_finish_unlinking_batches)


def _finish_unlinking_batches() -> None:
    """Completes the release of the shared memory of worker batches freed before exit.

    Grain's worker processes hand each batch over in shared memory; the main process
    unlinks a batch's blocks when its arrays are freed, through a background thread pool
    (`SharedMemoryArray`'s asynchronous deletion, started by the first worker pipeline).
    At exit, `multiprocessing` terminates that pool and drops the unlinks still queued:
    those of the batches freed last (the training loop keeps its first batch until the
    run ends). The resource tracker then removes the blocks itself but warns "There
    appear to be N leaked shared_memory objects to clean up at shutdown". Here, arrays
    freed from now on unlink at once, and the queued unlinks complete. If Grain's
    internals change, this does nothing (and the warning may come back).
    """
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    lock = getattr(SharedMemoryArray, "_lock", None)
    with lock or contextlib.nullcontext():
        pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
        if pool is None:
            return
        SharedMemoryArray._del_thread_pool = None  # arrays freed from now on unlink at once
    pool.close()
    pool.join()  # the unlinks already queued


# How often a Grain worker checks that the process it serves is still there.
_PARENT_CHECK_S = 1.0


def _init_worker(worker_index: int, worker_count: int, *, parent: int) -> None:
    """Runs first in each Grain worker process.

    Ctrl-C in a terminal reaches every process of the foreground group, and a cluster
    scheduler's SIGTERM (preemption, cancellation) every process of the job: the workers
    ignore both and leave them to the training process, which then saves a checkpoint
    (and may need the workers' batches to finish a validation pass first; a worker that
    died would end the pass early or leave it waiting). Grain stops its workers through
    its own channel, and a worker whose parent process is gone (killed, out of memory)
    exits by itself instead of waiting forever.

    Args:
      worker_index, worker_count: from Grain (unused).
      parent: the process id of the process the worker serves (taken there, since it
        may be gone before the worker starts).
    """
    del worker_index, worker_count
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="parent-watch", daemon=True).start()
