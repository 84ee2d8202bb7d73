"""Frozen-mode text embeddings: one pooled BERT vector per item, cached on disk.

`text_embeddings` runs BERT once over every item text in jit-compiled batches of one
fixed size, each split over the process's devices, and stores the (N, Dt) float32 result
in `cache_dir`, named by a fingerprint: sha256 over the weight files, the tokenizer
files, `config.json`, max_len, pooling and every item text. Any change gives a new
fingerprint and a rebuild; an unchanged rerun loads the file. Files are written
atomically (temp file, then `os.replace`), and a JSON sidecar holds the array's sha256,
so a corrupted or truncated cache is detected, reported with a warning and rebuilt,
never used. A cache folder that cannot be written (a read-only dataset folder) is warned
about; the embeddings are then computed every run.

`tokenize_for_model` is the tokenization the input pipeline uses for the trained text
modes: `tokenize_texts` with the model's own tokenizer, every id checked against its
vocabulary (under jit an id past it would read NaN embeddings).
`item_text_fields` makes an item block's text fields for new texts, as the input
pipeline makes them for the dataset's, so that serving code can score items a model
has never seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmrec_jax import schema, sharding
from mmrec_jax.config import ConfigError
from mmrec_jax.files import write_atomic
from mmrec_jax.hub import resolve_pretrained
from mmrec_jax.models.bert import load_bert_config
from mmrec_jax.models.bert_weights import (
    TOKENIZER_FILES,
    checkpoint_has_pooler,
    load_pretrained,
    load_tokenizer,
    weight_files,
)
from mmrec_jax.models.text import POOLINGS, check_pooler, pool
from mmrec_jax.reporting import progress_bar

# Bump when the stored format or the computation changes, so old caches are not reused.
_CACHE_VERSION = 1


def tokenize_texts(tokenizer, texts: Sequence[str | None], max_len: int) -> tuple[np.ndarray, ...]:
    """Tokenizes texts, truncated and padded to exactly `max_len` tokens.

    Args:
      tokenizer: a Hugging Face BERT tokenizer.
      texts: N texts; None is tokenized as the empty text.
      max_len: tokens per text, [CLS] and [SEP] included.

    Returns:
      ids (N, max_len) int32 and mask (N, max_len) int32 (1 for real tokens).
    """
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must be at least 2 ([CLS] and [SEP]).")
    enc = tokenizer(
        [text or "" for text in texts],
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def check_token_ids(ids: np.ndarray, texts: Sequence[str], vocab_size: int, folder) -> None:
    """Raises ConfigError when a tokenized text holds an id past the model's vocabulary.

    Args:
      ids: (N, L) token ids of `texts`.
      texts: the N texts they came from (the message quotes the first offending one).
      vocab_size: the BERT's number of token embeddings (its config.json's vocab_size).
      folder: the pretrained model folder, named in the message.
    """
    outside = np.argwhere(ids >= vocab_size)
    if outside.size == 0:
        return
    row, column = outside[0]
    text = texts[row]
    quoted = repr(text if len(text) <= 60 else text[:57] + "...")
    raise ConfigError(
        f"The tokenizer in {folder} gives token id {int(ids[row, column])} (in the text "
        f"{quoted}), but the BERT there has vocab_size={vocab_size} (its config.json): "
        "the tokenizer files belong to another model, or tokens were added to it without "
        "growing the embeddings. Put the model's own tokenizer files in the folder "
        "(tokenizer.save_pretrained)."
    )


def tokenize_for_model(
    name_or_path: str | Path, texts: Sequence[str | None], max_len: int
) -> tuple[np.ndarray, ...]:
    """`tokenize_texts` with a pretrained BERT's own tokenizer, checked against its vocabulary.

    Args:
      name_or_path: a hub id (resolved offline first) or a local BERT folder.
      texts: N texts; None is tokenized as the empty text.
      max_len: tokens per text, [CLS] and [SEP] included.

    Returns:
      ids (N, max_len) int32 and mask (N, max_len) int32 (1 for real tokens).

    Raises:
      ConfigError: the tokenizer gives an id the model has no embedding for.
    """
    folder = resolve_pretrained(name_or_path)
    ids, mask = tokenize_texts(load_tokenizer(folder), texts, max_len)
    vocab_size = load_bert_config(folder).vocab_size
    check_token_ids(ids, [text or "" for text in texts], vocab_size, folder)
    return ids, mask


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.digest()


def _fingerprint(
    folder: Path, texts: Sequence[str | None], pooling: str, max_len: int
) -> tuple[str, str]:
    """sha256 over everything the embeddings depend on, and over the weight files alone."""
    weights = hashlib.sha256()
    digest = hashlib.sha256(f"mmrec-text-cache-v{_CACHE_VERSION}".encode())
    for file in weight_files(folder):
        file_sha = _file_sha256(file)
        weights.update(file_sha)
        digest.update(file.name.encode() + b"\0" + file_sha)
    for name in ("config.json", *TOKENIZER_FILES):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + _file_sha256(folder / name))
    digest.update(f"\0pooling={pooling}\0max_len={max_len}\0n={len(texts)}\0".encode())
    for text in texts:
        if text is None:
            digest.update(b"\1")
        else:
            raw = text.encode("utf-8")
            digest.update(b"\2" + len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest(), weights.hexdigest()


def _check_settings(pooling: str, batch_size: int, pooling_name: str = "pooling") -> None:
    """Raises ValueError for an unknown pooling (named `pooling_name`) or batch size < 1."""
    if pooling not in POOLINGS:
        raise ValueError(f"{pooling_name}={pooling!r}; choose one of {POOLINGS}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")


def _compute_embeddings(
    folder: Path, texts: Sequence[str | None], pooling: str, max_len: int, batch_size: int
) -> np.ndarray:
    """Runs BERT over the non-empty texts in fixed-size batches; empty texts get zeros.

    Each batch is split over this process's devices (BERT's weights on each of them), and
    in a multi-process run the processes take turns over the batches and then exchange
    their results (a collective: every process calls this at the same point), so every
    device of the run embeds part of the catalogue. The values can differ in their last
    bits (~1e-6) with the number of devices per process, as any computation's do with its
    batch shape; the cache keeps the first ones computed.
    """
    bert, params, tokenizer = load_pretrained(folder)
    width = bert.config.hidden_size
    out = np.zeros((len(texts), width), np.float32)
    rows = np.array([i for i, text in enumerate(texts) if text], dtype=np.int64)
    if rows.size == 0:
        return out
    chosen = [texts[i] for i in rows]
    ids, mask = tokenize_texts(tokenizer, chosen, max_len)  # (M, L)
    check_token_ids(ids, chosen, bert.config.vocab_size, folder)
    mesh = Mesh(np.array(jax.local_devices()), ("batch",))
    batch = -(-min(batch_size, rows.size) // mesh.size) * mesh.size  # a multiple of devices
    processes, index = jax.process_count(), jax.process_index()
    batches = -(-rows.size // (batch * processes)) * processes  # the same count per process
    padded = batches * batch
    ids = np.pad(ids, ((0, padded - rows.size), (0, 0)))
    mask = np.pad(mask, ((0, padded - rows.size), (0, 0)))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    split = NamedSharding(mesh, PartitionSpec("batch"))

    @jax.jit
    def embed(params, ids, mask):  # (b, L) -> (b, H)
        hidden, pooled = bert.apply({"params": params}, ids, mask)
        return pool(hidden, mask, pooled, pooling)

    chunks = []  # fetched batch by batch, so the progress bar shows finished work
    mine = range(index * batch, padded, processes * batch)  # batches p, p + P, p + 2P, ...
    for start in progress_bar("text embeddings", unit="batch", iterable=mine):
        window = jax.device_put((ids[start : start + batch], mask[start : start + batch]), split)
        chunk = embed(params, *window)
        chunks.append(np.asarray(chunk, np.float32))
    computed = np.concatenate(chunks)  # (batches / P * b, H): this process's batches
    if processes > 1:
        from jax.experimental import multihost_utils

        every = multihost_utils.process_allgather(computed)  # (P, batches / P * b, H)
        # (P, batches / P, b, H) -> batch j of process p is batch j * P + p.
        computed = every.reshape(processes, -1, batch, width).swapaxes(0, 1).reshape(-1, width)
    out[rows] = computed[: rows.size]
    return out


def _load_cached(array_path: Path, meta_path: Path, fingerprint: str, n: int) -> np.ndarray | None:
    """The cached array if it is present, complete and intact; None otherwise."""
    if not array_path.exists() and not meta_path.exists():
        return None
    problem = None
    try:
        meta = json.loads(meta_path.read_text())
        data = array_path.read_bytes()
        if meta.get("fingerprint") != fingerprint:
            problem = "its sidecar names another fingerprint"
        elif hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            problem = "its checksum does not match (corrupted or truncated)"
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != n:
                problem = f"it holds {array.dtype} {array.shape}, not float32 ({n}, Dt)"
    except (OSError, ValueError, KeyError) as error:
        problem = f"it cannot be read ({type(error).__name__}: {error})"
    if problem is None:
        return array
    warnings.warn(
        f"Text embedding cache {array_path} is unusable: {problem}; rebuilding it.",
        stacklevel=3,
    )
    return None


def text_embeddings(
    texts: Sequence[str | None],
    model_name: str,
    pooling: str,
    max_len: int,
    cache_dir: str | Path,
    batch_size: int = 64,
) -> np.ndarray:
    """Pooled BERT embeddings of item texts, from the disk cache when it is current.

    In a multi-process run this is a collective: every process calls it with the same
    texts, and they compute the embeddings together (see `_compute_embeddings`).

    Args:
      texts: N item texts; None or "" for items without text (they get zeros; the model
        ignores them through `has_text`).
      model_name: a hub id or a local BERT folder (config.model.text.model).
      pooling: "cls", "mean" or "pooler" (config.model.text.pooling).
      max_len: tokens per text (config.data.max_text_len).
      cache_dir: folder for the cache files (created if needed), e.g. beside the dataset;
        when it cannot be written, a warning says so and nothing is cached.
      batch_size: texts per jit-compiled BERT call (rounded up to a multiple of this
        process's devices, which share each call).

    Returns:
      (N, Dt) float32, Dt the BERT's hidden size.
    """
    _check_settings(pooling, batch_size)
    folder = resolve_pretrained(model_name)
    check_pooler(pooling, checkpoint_has_pooler(folder))
    fingerprint, weights_sha = _fingerprint(folder, texts, pooling, max_len)
    cache_dir = Path(cache_dir)
    array_path = cache_dir / f"text_embeddings_{fingerprint[:24]}.npy"
    meta_path = array_path.with_suffix(".json")
    cached = _load_cached(array_path, meta_path, fingerprint, len(texts))
    # With several processes, all of them use the cache or all compute the embeddings
    # together (a process may not see the others' disk).
    if not sharding.failed_processes(cached is None):
        return cached
    array = _compute_embeddings(folder, texts, pooling, max_len, batch_size)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    meta = {
        "fingerprint": fingerprint,
        "sha256": hashlib.sha256(data).hexdigest(),
        "shape": list(array.shape),
        "dtype": "float32",
        "model": str(model_name),
        "weights_sha256": weights_sha,
        "pooling": pooling,
        "max_len": max_len,
        "num_texts": len(texts),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(array_path, data)
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    except OSError as error:  # a read-only dataset folder, a full disk: the run goes on
        warnings.warn(
            f"Cannot write the text embedding cache {array_path} ({error.strerror or error}): "
            "the embeddings serve this run only and are computed again by the next one. "
            f"Make {cache_dir} writable to keep them.",
            stacklevel=2,
        )
    return array


def item_text_fields(
    texts: Sequence[str | None], config: Any, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """The text fields of an item block for `texts`, made as the input pipeline makes them.

    The text model (`config.model.text.model`; an export's own `text_model/` when the
    config comes from `mmrec_jax.exported.load_export_config`) reads each text truncated
    to `config.data.max_text_len` tokens; in the frozen mode its output is pooled with
    `config.model.text.pooling`. A model scores a new item only from the fields it was
    trained on: BERT's output over whole texts, or with another pooling, is another
    embedding. Nothing is cached; in a multi-process run this is a collective (see
    `text_embeddings`).

    Args:
      texts: N item texts; None or "" for items without text.
      config: the run config (`model.text` and `data.max_text_len` are read).
      batch_size: texts per BERT call in the frozen mode.

    Returns:
      {"has_text": (N,) bool} and, in the frozen mode, "text_embedding" (N, Dt) float32
      (zeros without text); in the trained modes "text_ids" and "text_mask" (N, L) int32
      ([CLS] [SEP] without text).
    """
    text_config, max_len = config.model.text, int(config.data.max_text_len)
    _check_settings(text_config.pooling, batch_size, "config.model.text.pooling")
    texts = [text or "" for text in texts]
    fields = {"has_text": np.array([bool(text) for text in texts], bool)}
    folder = resolve_pretrained(text_config.model)
    if schema.text_is_trained(text_config.mode):
        ids, mask = tokenize_for_model(folder, texts, max_len)
        return {**fields, "text_ids": ids, "text_mask": mask}
    embedding = _compute_embeddings(folder, texts, text_config.pooling, max_len, batch_size)
    return {**fields, "text_embedding": embedding}
