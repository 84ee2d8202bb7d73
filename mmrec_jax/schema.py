"""The batch schema: what the input pipeline yields and the model consumes.

A batch holds B interaction rows and one block of U items. Item content is never copied
into rows: each row points at its candidate item (and its history items) by slot in the
item block, so every item's content towers run once per batch.

    batch = {
        "user_id":      int32   (B,)     user ID-vocabulary index; 0 = out of vocabulary
        "user_index":   int32   (B,)     user's row in the dataset's user table (metrics only)
        "item_slot":    int32   (B,)     candidate item's slot in batch["items"]
        "history_slot": int32   (B, H)   history items' slots, most recent first   [history]
                                         (any value where history_mask is False)
        "history_mask": bool    (B, H)   True where a history entry is real        [history]
        "label":        float32 (B,)     1 engaged, 0 not
        "weight":       float32 (B,)     1 for real rows, 0 for padding rows
        "items": {
            "item_id":        int32   (U,)       item ID-vocabulary index; 0 = out of vocabulary
            "item_index":     int32   (U,)       item's row in the dataset's item table
            "text_ids":       int32   (U, L)     BERT token ids                  [text, trained]
            "text_mask":      int32   (U, L)     1 for real tokens               [text, trained]
            "text_embedding": float32 (U, Dt)    cached pooled BERT output       [text, frozen]
            "image":          uint8   (U, S, S, 3)  RGB pixels                   [image]
            "audio":          float32 (U, T)     mono waveform in [-1, 1]        [audio]
            "has_text":       bool    (U,)       False: the item has no text     [text]
            "has_image":      bool    (U,)       False: the item has no image    [image]
            "has_audio":      bool    (U,)       False: the item has no audio    [audio]
        },
    }

Fields marked [tower] are present exactly when that tower is enabled (text needs
`text_ids` and `text_mask` when BERT is trained, `text_embedding` when it is frozen). A
modality an item lacks is marked by its `has_*` flag; its content array then holds zeros
that the model must ignore.

`encode_items` of the model takes the `items` dict alone.

Block chunks: the towers that run a network over item content (a trained BERT, the
image and audio towers) encode an item block of U >= BLOCK_CHUNKS * MIN_CHUNK_ITEMS slots
(U a multiple of BLOCK_CHUNKS) in BLOCK_CHUNKS chunks, one after the other, and each
skips a chunk none of whose items has its modality. Chunk c holds the slots s with
s % BLOCK_CHUNKS == c, so every chunk is spread evenly over the devices the block is
sharded across. The input pipeline fills the chunks in order (`slot_order`), so the
padding of a block that its batch does not fill lands in whole chunks at the end, which
those towers then skip. Any other placement gives the same results, only without the
saving. The towers chunk a block only where JAX compiles for the CPU
(`layers.cpu_fast_paths`); on GPU and TPU they encode it in one pass, which was faster.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Chunks of a large item block that the content towers encode one by one (see above),
# and the fewest items a chunk has: smaller blocks are encoded in one go.
BLOCK_CHUNKS = 8
MIN_CHUNK_ITEMS = 64

# Towers a model can enable (config.model.towers).
TOWERS = ("text", "image", "audio", "id", "history")
# The towers that give an item a token; a model needs at least one (history attends over
# the items' tokens).
ITEM_TOWERS = ("text", "image", "audio", "id")


@dataclass(frozen=True)
class FieldSpec:
    """One array of the batch: its dtype and its shape as symbols or numbers."""

    name: str
    dtype: str
    shape: tuple  # entries are ints or symbol names resolved by `batch_dims`
    doc: str
    fix: str = ""  # how to convert an array of another dtype, said when one is passed


class BatchError(ValueError):
    """A batch that does not follow the schema."""


def parse_towers(towers: str | tuple | list) -> tuple[str, ...]:
    """Parses `config.model.towers` ("text,image,id") into a tuple of known tower names."""
    names = towers.split(",") if isinstance(towers, str) else list(towers)
    names = tuple(n.strip() for n in names if n.strip())
    unknown = [n for n in names if n not in TOWERS]
    if unknown or not names:
        raise BatchError(
            f"config.model.towers={towers!r}: unknown or empty tower list {unknown}; "
            f"choose a comma-separated subset of {', '.join(TOWERS)}."
        )
    return names


def text_is_trained(text_mode: str) -> bool:
    """Whether the text tower runs BERT in the model (else it reads cached embeddings)."""
    modes = ("frozen", "finetune", "finetune_top_n")
    if text_mode not in modes:
        raise BatchError(f"config.model.text.mode={text_mode!r}; choose one of {modes}.")
    return text_mode != "frozen"


def bert_in_step(towers: tuple[str, ...] | str, text_mode: str) -> bool:
    """Whether the model runs BERT on the item block: a text tower in a trained mode."""
    return "text" in parse_towers(towers) and text_is_trained(text_mode)


def content_in_step(towers: tuple[str, ...] | str, text_mode: str) -> bool:
    """Whether a tower runs a network over the item block's content (BERT, image, audio).

    Those towers encode a large block in chunks (see "Block chunks" above); the ID
    tower and a frozen text tower only look rows up.
    """
    return bert_in_step(towers, text_mode) or bool({"image", "audio"} & set(parse_towers(towers)))


def row_fields(towers: tuple[str, ...]) -> list[FieldSpec]:
    """Per-row fields for the enabled towers."""
    fields = [
        FieldSpec("user_id", "int32", ("B",), "user ID-vocabulary index, 0 = OOV"),
        FieldSpec("user_index", "int32", ("B",), "user's row in the dataset's user table"),
        FieldSpec("item_slot", "int32", ("B",), "candidate item's slot in items"),
        FieldSpec("label", "float32", ("B",), "1 engaged, 0 not"),
        FieldSpec("weight", "float32", ("B",), "1 real row, 0 padding"),
    ]
    if "history" in towers:
        fields += [
            FieldSpec("history_slot", "int32", ("B", "H"), "history items' slots"),
            FieldSpec("history_mask", "bool", ("B", "H"), "True where history is real"),
        ]
    return fields


def item_fields(towers: tuple[str, ...], text_mode: str = "frozen") -> list[FieldSpec]:
    """Item-block fields for the enabled towers."""
    fields = [
        FieldSpec("item_id", "int32", ("U",), "item ID-vocabulary index, 0 = OOV"),
        FieldSpec("item_index", "int32", ("U",), "item's row in the dataset's item table"),
    ]
    if "text" in towers:
        if text_is_trained(text_mode):
            fields += [
                FieldSpec("text_ids", "int32", ("U", "L"), "BERT token ids"),
                FieldSpec(
                    "text_mask",
                    "int32",
                    ("U", "L"),
                    "1 for real tokens",
                    "Convert a boolean mask with .astype(np.int32).",
                ),
            ]
        else:
            fields.append(
                FieldSpec("text_embedding", "float32", ("U", "Dt"), "cached BERT embedding")
            )
        fields.append(FieldSpec("has_text", "bool", ("U",), "item has text"))
    if "image" in towers:
        fields += [
            FieldSpec(
                "image",
                "uint8",
                ("U", "S", "S", 3),
                "RGB pixels",
                "Pass decoded pixels as they are; float images in [0, 1]: multiply by 255 "
                "and round to uint8.",
            ),
            FieldSpec("has_image", "bool", ("U",), "item has an image"),
        ]
    if "audio" in towers:
        fields += [
            FieldSpec(
                "audio",
                "float32",
                ("U", "T"),
                "mono waveform in [-1, 1]",
                "Scale integer PCM to floats first (int16: divide by 32768).",
            ),
            FieldSpec("has_audio", "bool", ("U",), "item has audio"),
        ]
    return fields


class _Sizes(dict):
    """Symbol sizes found so far, and the field each was first read from."""

    def __init__(self, sizes: Mapping[str, int] | None = None):
        super().__init__(sizes or {})
        self.fields: dict[str, str] = {}


def _sizes_of(dims: dict[str, int] | None) -> _Sizes:
    return dims if isinstance(dims, _Sizes) else _Sizes(dims)


def _check_field(
    where: str, spec: FieldSpec, array, dims: _Sizes, expected_dims: Mapping[str, int]
) -> None:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise BatchError(
            f"Batch field {where}{spec.name!r} ({spec.doc}) is a {type(array).__name__}; "
            f"pass a numpy or jax array of dtype {spec.dtype} and shape {spec.shape}."
        )
    shape = tuple(array.shape)
    if len(shape) != len(spec.shape):
        raise BatchError(
            f"Batch field {where}{spec.name!r} ({spec.doc}) must have shape "
            f"{spec.shape}; got {shape}."
        )
    for axis, (symbol, size) in enumerate(zip(spec.shape, shape, strict=True)):
        source = ""
        if isinstance(symbol, int):
            want = symbol
        elif symbol in expected_dims:
            want = expected_dims[symbol]
        elif symbol in dims:
            want = dims[symbol]
            if symbol in dims.fields:
                source = f", as in {dims.fields[symbol]}"
        else:
            dims[symbol] = size
            dims.fields[symbol] = f"{where}{spec.name!r}"
            continue
        if size != want:
            raise BatchError(
                f"Batch field {where}{spec.name!r} ({spec.doc}) must have shape {spec.shape} "
                f"with {symbol}={want}{source}; got {shape} (axis {axis} is {size})."
            )
        if isinstance(symbol, str):
            dims[symbol] = size
    if _dtype_kind(array.dtype) != _dtype_kind(spec.dtype):
        raise BatchError(
            f"Batch field {where}{spec.name!r} must be {spec.dtype}; got {array.dtype} "
            f"({spec.doc}).{' ' + spec.fix if spec.fix else ''}"
        )


def _dtype_kind(dtype) -> str:
    """numpy's kind letter, with bfloat16 (numpy kind "V") counted as a float ("f")."""
    from jax import dtypes

    if dtypes.issubdtype(dtype, np.floating):
        return "f"
    return np.dtype(dtype).kind


def validate_batch(
    batch: Mapping,
    towers: tuple[str, ...] | str,
    text_mode: str = "frozen",
    expected_dims: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Checks a batch against the schema for the enabled towers.

    Works on numpy arrays, jax arrays and `jax.ShapeDtypeStruct`s.

    Args:
      batch: the batch dict (rows plus an "items" dict).
      towers: enabled towers, a tuple or the config string.
      text_mode: config.model.text.mode.
      expected_dims: sizes some symbols must have, e.g. {"S": 56, "T": 4000, "L": 32}.

    Returns:
      The sizes of the symbols B, U, H, L, Dt, S, T found in the batch.

    Raises:
      BatchError: naming the missing or misshaped field, with expected and actual shapes.
    """
    towers = parse_towers(towers)
    expected_dims = dict(expected_dims or {})
    dims = _Sizes()
    for spec in row_fields(towers):
        if spec.name not in batch:
            raise BatchError(
                f"Batch is missing the required field {spec.name!r} ({spec.doc}), shape "
                f"{spec.shape}, for towers {','.join(towers)}."
            )
        _check_field("", spec, batch[spec.name], dims, expected_dims)
    if "items" not in batch:
        raise BatchError("Batch is missing the required 'items' dict (the item block).")
    items = batch["items"]
    validate_items(items, towers, text_mode, expected_dims, dims)
    return dict(dims)


def validate_items(
    items: Mapping,
    towers: tuple[str, ...] | str,
    text_mode: str = "frozen",
    expected_dims: Mapping[str, int] | None = None,
    dims: dict[str, int] | None = None,
    for_model: bool = False,
) -> dict[str, int]:
    """Checks an item block (batch["items"], or the input of `encode_items`).

    `for_model` checks only what the model reads: `item_index` (for the metrics) may then
    be absent.

    Returns the symbol sizes found; raises `BatchError` like `validate_batch`, and for a
    block without items.
    """
    towers = parse_towers(towers)
    sizes = _sizes_of(dims)
    for spec in item_fields(towers, text_mode):
        if for_model and spec.name == "item_index":
            continue
        if spec.name not in items:
            raise BatchError(
                f"Item block is missing the required field {spec.name!r} ({spec.doc}), shape "
                f"{spec.shape}, for towers {','.join(towers)} (text mode {text_mode!r})."
            )
        _check_field("items.", spec, items[spec.name], sizes, dict(expected_dims or {}))
    if sizes.get("U") == 0:
        raise BatchError(
            "The item block is empty (U=0): its fields have no rows. Give it at least one "
            "item; the rows' slots index it."
        )
    if dims is not None and dims is not sizes:
        dims.update(sizes)
    return dict(sizes)


def concrete_values(array) -> np.ndarray | None:
    """`array` as numpy, or None while it is traced (under `jax.jit`, `grad`, `vmap`).

    Value checks (ids and slots in range) run on concrete inputs, when a module is
    applied eagerly; compiled code cannot raise on values.
    """
    import jax

    try:
        return np.asarray(array)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_index_range(name: str, array, size: int, fix: str, where=None) -> None:
    """Raises BatchError when concrete `array` holds an index outside [0, size).

    `where`, a boolean mask of `array`'s shape, limits the check to the entries it marks
    (padding entries may hold anything); a traced mask skips the check like a traced array.
    """
    values = concrete_values(array)
    if values is None or values.size == 0:
        return
    if where is not None:
        mask = concrete_values(where)
        if mask is None:
            return
        values = values[np.broadcast_to(mask.astype(bool), values.shape)]
        if values.size == 0:
            return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
        raise BatchError(
            f"{name} holds indices in [{low}, {high}] but must lie in [0, {size}); {fix}"
        )


def warn_outside_vocabulary(name: str, array, num_ids: int, size_field: str) -> None:
    """Warns when concrete ID-vocabulary indices lie outside [0, num_ids].

    The ID embedding counts them as out of vocabulary (index 0), as it must under jit;
    applied eagerly, the model says so, since raw ids passed for indices would
    otherwise train an ID tower that tells no one apart.
    """
    values = concrete_values(array)
    if values is None or values.size == 0 or num_ids < 1:  # no vocabulary: the tower says so
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > num_ids:
        warnings.warn(
            f"Batch field {name!r} holds ID-vocabulary indices in [{low}, {high}], outside "
            f"[0, {num_ids}] (config.model.{size_field}={num_ids}): those count as out of "
            f"vocabulary, like index 0. Map ids to their vocabulary index first: 1 to "
            f"{num_ids} for known ids, 0 for unknown ones.",
            stacklevel=2,
        )


# Row fields the model reads (the rest are for the loss and the metrics); `user_id` only
# with the id tower, the history fields only with the history tower.
SCORE_FIELDS = ("user_id", "item_slot", "history_slot", "history_mask")


def validate_score_rows(
    rows: Mapping, towers: tuple[str, ...] | str, dims: dict[str, int] | None = None
) -> dict[str, int]:
    """Checks the row fields the model's `score` reads: `SCORE_FIELDS` for the towers.

    Unlike `validate_batch` it needs no `label`, `weight` or `user_index`, so serving code
    can score (user, item) pairs without them.

    Returns the symbol sizes found; raises `BatchError` like `validate_batch`.
    """
    return _validate_row_fields(rows, towers, SCORE_FIELDS, "Rows", dims)


def validate_score_users(users: Mapping, towers: tuple[str, ...] | str) -> dict[str, int]:
    """Checks the user fields the model's `score_grid` reads: `SCORE_FIELDS` but the slot.

    The fields are those of `validate_score_rows` without `item_slot`, with one row per
    user ("B" is the number of users). Returns the symbol sizes found; raises
    `BatchError` like `validate_batch`.
    """
    names = tuple(name for name in SCORE_FIELDS if name != "item_slot")
    return _validate_row_fields(users, towers, names, "Users", None)


def _validate_row_fields(
    rows: Mapping,
    towers: tuple[str, ...] | str,
    names: tuple[str, ...],
    what: str,
    dims: dict[str, int] | None,
) -> dict[str, int]:
    towers = parse_towers(towers)
    sizes = _sizes_of(dims)
    for spec in row_fields(towers):
        if spec.name not in names or (spec.name == "user_id" and "id" not in towers):
            continue
        if spec.name not in rows:
            raise BatchError(
                f"{what} are missing the required field {spec.name!r} ({spec.doc}), shape "
                f"{spec.shape}, for towers {','.join(towers)}."
            )
        _check_field("", spec, rows[spec.name], sizes, {})
    if dims is not None and dims is not sizes:
        dims.update(sizes)
    return dict(sizes)


# What `encode_items` returns and `score` reads: N items, M item tokens of width D.
ENCODED_FIELDS = (
    FieldSpec("tokens", "float32", ("N", "M", "D"), "the items' modality tokens"),
    FieldSpec("mask", "bool", ("N", "M"), "True where the item has that modality"),
    FieldSpec("embedding", "float32", ("N", "D"), "each item's summary vector"),
)


def validate_encoded(encoded: Mapping, num_tokens: int, width: int) -> int:
    """Checks the encoded item block `score` reads (`ENCODED_FIELDS`); returns N.

    Args:
      encoded: `encode_items`' output, or an export's `item_tokens`, `item_token_mask`
        and `item_embeddings` tables as its `tokens`, `mask` and `embedding`.
      num_tokens: M, the model's item tokens (one per item tower).
      width: D, the model's width.

    Raises:
      BatchError: naming the missing or misshaped entry.
    """
    fix = (
        "pass the output of the model's encode_items, or an export's item_tokens, "
        "item_token_mask and item_embeddings tables (mmrec_jax.load_tables) of the same model."
    )
    if not isinstance(encoded, Mapping):
        raise BatchError(f"encoded is a {type(encoded).__name__}, not a dict; {fix}")
    sizes = _Sizes()
    for spec in ENCODED_FIELDS:
        if spec.name not in encoded:
            raise BatchError(
                f"encoded is missing {spec.name!r} ({spec.doc}), shape {spec.shape}; {fix}"
            )
        try:
            _check_field("encoded.", spec, encoded[spec.name], sizes, {"M": num_tokens, "D": width})
        except BatchError as error:
            raise BatchError(
                f"{error} For this model M={num_tokens} and D={width}: {fix}"
            ) from None
    return sizes["N"]


# Float content fields and the flag that says whether an item has them. (Images are
# uint8 and token ids integers: they cannot hold NaN.)
FLOAT_CONTENT = (("text_embedding", "has_text"), ("audio", "has_audio"))


def check_finite_content(items: Mapping) -> None:
    """Raises BatchError when concrete float content of an item that has it is NaN or inf.

    A traced block (under jit) is not checked, nor the content of items whose `has_*`
    flag is False (the model ignores it).
    """
    for field, flag in FLOAT_CONTENT:
        if field not in items or flag not in items:
            continue
        values, has = concrete_values(items[field]), concrete_values(items[flag])
        if values is None or has is None or values.size == 0:
            continue
        bad = ~np.isfinite(values.astype(np.float32)).reshape(values.shape[0], -1).all(axis=1)
        bad &= has.astype(bool)
        if bad.any():
            slots = np.flatnonzero(bad)
            raise BatchError(
                f"Item block field {field!r} holds NaN or infinite values for {slots.size} "
                f"item(s) with {flag} True, at slots {slots[:5].tolist()}; fix the content "
                f"(a corrupt or failed decode?) or set {flag} False for those items."
            )


def item_capacity(
    batch_size: int,
    history_len: int,
    num_items: int,
    multiple: int = 1,
    use_history: bool = True,
    content: bool = False,
    process_count: int = 1,
) -> int:
    """Slots in the item block: enough for every candidate and history item of a batch.

    Args:
      batch_size: rows per batch (per process).
      history_len: H.
      num_items: items in the dataset's item table (an upper bound on distinct items).
      multiple: round up to this (the number of devices the block is sharded over).
      use_history: whether history items take slots.
      content: whether towers encode the block's content (`content_in_step`): in
        chunks, when the global block, every process's together, is large enough (see
        `BLOCK_CHUNKS`).
      process_count: processes whose blocks make up the global block.

    Returns:
      U, a multiple of `multiple` (of `multiple * BLOCK_CHUNKS` when it is encoded in
      chunks).
    """
    per_row = 1 + (history_len if use_history else 0)
    capacity = min(batch_size * per_row, num_items)
    rounded = -(-capacity // multiple) * multiple
    if content and rounded * process_count >= BLOCK_CHUNKS * MIN_CHUNK_ITEMS:
        # Chunked (decided on the size the block will have): each process's block then
        # fills its own chunks in slot order, and each chunk (every BLOCK_CHUNKS-th slot)
        # splits evenly over the devices.
        multiple *= BLOCK_CHUNKS
    return -(-capacity // multiple) * multiple


def block_chunks(num_slots: int) -> int:
    """How many chunks the content towers encode an item block of `num_slots` in (1: one go)."""
    if num_slots % BLOCK_CHUNKS or num_slots < BLOCK_CHUNKS * MIN_CHUNK_ITEMS:
        return 1
    return BLOCK_CHUNKS


def slot_order(capacity: int) -> np.ndarray:
    """(capacity,) int: the slot of a block's j-th item, filling the block chunks in order.

    Chunk 0's slots (0, k, 2k, ...) first, then chunk 1's (1, k + 1, ...), and so on,
    k = BLOCK_CHUNKS. A process's block takes this order too: with `capacity` a multiple of
    k, its chunk c is part of the global block's chunk c.
    """
    if capacity % BLOCK_CHUNKS:
        raise ValueError(f"capacity={capacity} must be a multiple of {BLOCK_CHUNKS} chunks.")
    position = np.arange(capacity)
    per_chunk = capacity // BLOCK_CHUNKS
    return (position % per_chunk) * BLOCK_CHUNKS + position // per_chunk


def batch_dims(config: Any, rows: int, items: int, text_dim: int | None = None) -> dict[str, int]:
    """The sizes of the schema's symbols for a run config's batches.

    Args:
      config: a run config (data.history_len, data.max_text_len, model.image.size,
        model.audio.clip_samples).
      rows: B, rows per batch.
      items: U, slots in the item block.
      text_dim: Dt, the cached text embedding width (frozen text mode only); left out
        when None.
    """
    dims = {
        "B": int(rows),
        "U": int(items),
        "H": int(config.data.history_len),
        "L": int(config.data.max_text_len),
        "S": int(config.model.image.size),
        "T": int(config.model.audio.clip_samples),
    }
    if text_dim is not None:
        dims["Dt"] = int(text_dim)
    return dims


def example_batch(config: Any, text_dim: int | None = None) -> dict:
    """A one-row batch of zeros in the schema of `config` (for shapes, not for scores).

    Args:
      config: a run config (model towers and sizes, data.history_len, data.max_text_len).
        Parameter shapes follow from it and `text_dim` alone, so this batch initialises
        (or gives the abstract shapes of) a model without reading any dataset.
      text_dim: Dt, the cached text embedding width (frozen text mode only); None reads
        it from the text model's config.json (`models.text.cached_text_dim`: a local
        file, or the model hub's copy when the model is named by its hub id).
    """
    towers = parse_towers(config.model.towers)
    if text_dim is None:
        from mmrec_jax.models.text import cached_text_dim

        text_dim = cached_text_dim(config.model)
    dims = batch_dims(config, 1, 1, text_dim or 1)

    def zeros(spec: FieldSpec) -> np.ndarray:
        shape = tuple(dims[s] if isinstance(s, str) else s for s in spec.shape)
        return np.zeros(shape, spec.dtype)

    batch = {spec.name: zeros(spec) for spec in row_fields(towers)}
    batch["items"] = {
        spec.name: zeros(spec) for spec in item_fields(towers, config.model.text.mode)
    }
    return batch
