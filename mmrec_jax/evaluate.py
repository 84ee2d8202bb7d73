"""Evaluating a checkpoint: click metrics on a split and ranking over the full catalogue.

    python -m mmrec_jax.evaluate --workdir runs/default [--split test] [--split test_cold]
        [--checkpoint best|latest|STEP] [--k 10,20] [--ablate] [--batch_size N]
        [--ranking_users N]

Every item of the catalogue is encoded once (`encode_items`, jit-compiled, item blocks
split over the devices), and everything is scored from those encoded items (`score`).
Click prediction (AUC, GAUC, logloss, accuracy, ECE) scores the split's rows, in batches
of the run's `train.batch_size` rows or `--batch_size`, each row's candidate and history
looked up among them (the values of the training loop's scoring, which encodes each
batch's own item block, to float rounding).
Ranking scores every user that has a positive in the split against every item of the
catalogue: a (users x items) grid per call is scored from the encoded items
(`score_grid`: each user's tokens and history attention computed once) and reduced to
each user's top K on the device (`top_k_items`), with the user's training positives
excluded and the split's positives as the relevant items (`--ranking_users N` ranks a
seeded random sample of N users instead, for catalogues too large to rank every user).
The results are printed beside the dataset's
oracle, the ranking metrics also beside those of recommending every user the most
popular items (`popularity_ranking`), and written to `WORKDIR/eval/<split>.json` (with
the split's calibration curve, bin by bin); the reliability diagrams of every split
evaluated at that checkpoint (by this call or an earlier one) go to
`WORKDIR/eval/calibration.png`. `--ablate` re-scores the split with each content modality
marked absent in every item in turn (the catalogue encoded again without it) and reports
the AUC each one is worth.

Every step is a function (`encode_catalogue`, `catalogue_scores`, `rank_catalogue`,
`popularity_ranking`, `make_split_fn`, `evaluate_params`), so other code (the training
summary) can call them with a model and parameters in memory. Their jit-compiled
programs belong to the model object (`programs_of`): calling again with the same model,
for another split or another checkpoint's parameters, reuses the compilations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import metrics as metrics_lib
from mmrec_jax import predict, reporting, runtime, schema, sharding
from mmrec_jax.cli import exits_quietly
from mmrec_jax.files import write_atomic

# Content modalities `--ablate` marks absent in turn (those the model's towers have).
ABLATABLE = ("text", "image", "audio")

# Default cut-offs of the ranking metrics.
DEFAULT_KS = (10, 20)

# Items per `encode_items` call, and (user, item) rows per ranking call; both are rounded
# up to a multiple of the device count. On the 2-core CPU, 4096 rows per call ranked the
# default run's 1000-item catalogue in 14% less time than 16384 did (the same metrics).
ITEMS_PER_CALL = 512
ROWS_PER_CALL = 4096


@dataclasses.dataclass(frozen=True)
class UserTable:
    """What ranking and serving need about each user of the dataset's user table.

    Per-user item sets are CSR pairs (offsets (U + 1,), item rows): user u's items are
    `items[offsets[u]:offsets[u + 1]]`.

    Attributes:
      user_id: (U,) int32 ID-vocabulary index (0 = out of vocabulary).
      history: (U, H) int32 the user's latest history, as rows of the item table.
      history_mask: (U, H) bool, True where a history entry is real.
      train_positives: CSR of the items the user engaged with in the train split (what
        evaluation excludes from the ranking).
      interacted: CSR of the items of any interaction of the user in any split,
        positive or not (what serving excludes).
    """

    user_id: np.ndarray
    history: np.ndarray
    history_mask: np.ndarray
    train_positives: tuple[np.ndarray, np.ndarray]
    interacted: tuple[np.ndarray, np.ndarray]

    def __post_init__(self):
        users = self.user_id.shape[0]
        if self.history.shape[0] != users or self.history_mask.shape != self.history.shape:
            raise ValueError(
                f"UserTable: user_id has {users} users but history {self.history.shape} and "
                f"history_mask {self.history_mask.shape}; pass (U,), (U, H), (U, H)."
            )
        for name in ("train_positives", "interacted"):
            if getattr(self, name)[0].shape != (users + 1,):
                raise ValueError(
                    f"UserTable: {name} offsets must have shape ({users + 1},), got "
                    f"{getattr(self, name)[0].shape}."
                )


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The dataset as ranking and export see it: every item and every user.

    Attributes:
      info: the dataset's `DatasetInfo` (split sizes, oracle metrics).
      num_items: N, items in the item table.
      item_block: item rows (n,) -> the item block of exactly those items, in order.
      item_ids: (N,) original item ids, in item-table order.
      item_id_index: (N,) int32 each item's ID-vocabulary index (0 = out of vocabulary).
      item_texts: (N,) each item's text ("" without one).
      user_ids: (U,) original user ids, in user-table order.
      users: the `UserTable` (ID index, latest history, training positives).
      item_store: the `pipeline.ItemStore` the blocks come from (shared with the
        split's batches so the items are decoded once).
    """

    info: Any
    num_items: int
    item_block: Callable[[np.ndarray], Mapping]
    item_ids: np.ndarray
    item_id_index: np.ndarray
    item_texts: list[str]
    user_ids: np.ndarray
    users: UserTable
    item_store: Any = None


def open_catalogue(config: Any) -> Catalogue:
    """Reads the item and user tables of a run's dataset (items decoded once, in memory).

    Args:
      config: the resolved run config (its data, model towers and history length).
    """
    from mmrec_jax.data import pipeline

    info = pipeline.load_dataset_info(config.data)
    store = pipeline.ItemStore(config, info)
    history, history_mask = store.users.latest_history(int(config.data.history_len))
    users = UserTable(
        user_id=store.users.user_id,
        history=history,
        history_mask=history_mask,
        train_positives=store.users.train_positives,
        interacted=store.users.interacted,
    )
    return Catalogue(
        info=info,
        num_items=info.num_item_rows,
        item_block=lambda rows: store.block(rows, len(rows)),
        item_ids=np.asarray(info.item_ids),
        item_id_index=store.item_id,
        item_texts=store.texts,
        user_ids=np.asarray(info.user_ids),
        users=users,
        item_store=store,
    )


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, num_rows: int) -> tuple[np.ndarray, ...]:
    """(offsets (num_rows + 1,), sorted unique cols per row) from (row, col) pairs."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"Row indices must lie in [0, {num_rows}).")
    pairs = np.unique(np.stack([rows, cols], axis=1), axis=0) if rows.size else np.zeros((0, 2))
    offsets = np.zeros(num_rows + 1, np.int64)
    np.add.at(offsets, pairs[:, 0].astype(np.int64) + 1, 1)
    return np.cumsum(offsets), pairs[:, 1].astype(np.int32)


def _dense_rows(csr: tuple[np.ndarray, np.ndarray], rows: np.ndarray, num_cols: int) -> np.ndarray:
    """(len(rows), num_cols) bool, True at the CSR entries of each of `rows`."""
    offsets, cols = csr
    dense = np.zeros((rows.shape[0], num_cols), bool)
    for i, row in enumerate(rows):
        dense[i, cols[offsets[row] : offsets[row + 1]]] = True
    return dense


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _local_part(global_rows: np.ndarray) -> np.ndarray:
    """This process's share of a global chunk (processes own equal consecutive parts)."""
    count, index = jax.process_count(), jax.process_index()
    per = global_rows.shape[0] // count
    return global_rows[index * per : (index + 1) * per]


def _progress_bar(label: str | None, total: int, unit: str):
    """A progress bar on process 0 when `label` is given; a silent one otherwise."""
    return reporting.progress_bar(label or "", total, unit, enabled=label is not None)


# ------------------------------------------------------------------ compiled programs


class _ByIdentity:
    """A hashable handle on a model: equal only to a handle on the same object.

    Flax modules hash their fields, and a model's `ConfigDict` is not hashable.
    """

    def __init__(self, model: Any):
        self.model = model

    def __hash__(self) -> int:
        return id(self.model)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.model is self.model


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jit-compiled programs of evaluation for one model.

    Attributes:
      encode: (params, item block) -> `encode_items`' output.
      grid: (params, encoded, users) -> `grid_logits`.
      rank: (params, encoded, users, exclude, *, top) -> (Bu, top) item indices, best first.
      split_rows: `make_split_fn`'s function.
    """

    encode: Callable
    grid: Callable
    rank: Callable
    split_rows: Callable


def make_encode_fn(model: Any) -> Callable:
    """A jitted `(params, item block) -> encode_items' output`, the program that encodes
    items for evaluation and export. It runs the content networks over the items, so it
    compiles with `predict.forward_compiler_options`; the programs that score encoded
    items never run them."""

    def encode(params, items):
        return model.apply({"params": params}, items, method="encode_items")

    return jax.jit(encode, compiler_options=predict.forward_compiler_options(model))


@functools.lru_cache(maxsize=8)
def _programs(handle: _ByIdentity) -> Programs:
    model = handle.model
    jit = functools.partial(jax.jit, compiler_options=runtime.compiler_options(model.config.dtype))

    def grid(params, encoded, users):
        return grid_logits(model, params, encoded, users)

    def rank(params, encoded, users, exclude, *, top):
        logits = grid_logits(model, params, encoded, users)  # (Bu, N)
        top_items = metrics_lib.top_k_items(logits, top, exclude)[1]  # (Bu, top)
        return top_items, jnp.isnan(logits).any(axis=1)  # (Bu, top), (Bu,)

    def split_rows(params, rows, encoded):
        logits = model.apply({"params": params}, rows, encoded, method="score")  # (B,)
        return {
            "logit": logits.astype(jnp.float32),
            "label": rows["label"],
            "weight": rows["weight"],
            "user_index": rows["user_index"],
            "item_index": rows["item_slot"],
        }

    return Programs(
        encode=make_encode_fn(model),
        grid=jit(grid),
        rank=jit(rank, static_argnames="top"),
        split_rows=jit(split_rows),
    )


def programs_of(model: Any) -> Programs:
    """The model's evaluation programs, built once per model object and then reused.

    Each is a `jax.jit` function, so calling `encode_catalogue`, `rank_catalogue` or
    `make_split_fn` again with the same model (another split, another checkpoint's
    parameters) reuses the compilations of the same shapes instead of compiling anew.
    The last few models are kept.
    """
    return _programs(_ByIdentity(model))


def encode_catalogue(
    model: Any,
    params: Any,
    item_block: Callable[[np.ndarray], Mapping],
    num_items: int,
    mesh: jax.sharding.Mesh,
    items_per_call: int = ITEMS_PER_CALL,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Encodes every item of the item table once (`encode_items`, jit, split over devices).

    Args:
      model: the `Recommender`.
      params: its parameters (on the mesh, or host arrays).
      item_block: item rows (n,) -> the item block of exactly those items in that order
        (`mmrec_jax.schema` item fields, n entries each), as numpy arrays.
      num_items: N, the items in the item table.
      mesh: the device mesh; each call's item block is split over its `data` axis.
      items_per_call: items per jit call (rounded up to a multiple of the device count).
      progress: the label of a progress bar over the items (process 0 prints it), or
        None for none.

    Returns:
      {"tokens": (N, M, D), "mask": (N, M) bool, "embedding": (N, D)} as numpy arrays on
      every process, in item-table order.
    """
    chunk = _round_up(min(items_per_call, _round_up(num_items, mesh.size)), mesh.size)
    encode = programs_of(model).encode
    parts = []
    bar = _progress_bar(progress, num_items, "item")
    for start in range(0, num_items, chunk):
        rows = np.arange(start, min(start + chunk, num_items))
        padded = np.concatenate([rows, np.full(chunk - rows.size, rows[-1])])  # (chunk,)
        block = item_block(_local_part(padded))
        encoded = sharding.to_host(encode(params, sharding.global_batch(mesh, block)))
        parts.append({key: value[: rows.size] for key, value in encoded.items()})
        bar.update(rows.size)
    bar.close()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def grid_logits(model: Any, params: Any, encoded: Mapping, users: Mapping) -> jax.Array:
    """(Bu, N) logits of Bu users against all N encoded items, one `score_grid` call.

    `users` holds (Bu,) `user_id` and, with the history tower, (Bu, H) `history_slot`
    and `history_mask` indexing the encoded items; traceable under `jax.jit`.
    """
    logits = model.apply({"params": params}, users, encoded, method="score_grid")  # (Bu, N)
    return logits.astype(jnp.float32)


def ranking_sample(
    rows: Mapping[str, np.ndarray],
    positive: np.ndarray,
    catalogue: Catalogue,
    count: int,
    seed: int,
) -> tuple[np.ndarray, dict | None]:
    """Keeps the positives of a seeded random sample of `count` users to rank.

    The users drawn from are those ranking counts: with a positive row whose item is not
    among their training positives (the excluded items).

    Args:
      rows: a scored split's rows ("user_index", "item_index").
      positive: (R,) bool, the rows that are positives.
      catalogue: the dataset's catalogue (its user table's training positives).
      count: users to keep, at least 1.
      seed: seeds the draw.

    Returns:
      ((R,) the positives of the users drawn, {"user_ids": their original ids in user-table
      order, "of": how many users could be drawn}), or (`positive`, None) when there are
      no more than `count` users to draw from.

    Raises:
      ValueError: `count` < 1.
    """
    _check_ranking_users(count)
    offsets, excluded = catalogue.users.train_positives
    num_items = catalogue.num_items
    owner = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))  # (E,)
    user, item = rows["user_index"].astype(np.int64), rows["item_index"].astype(np.int64)
    seen = np.isin(user * num_items + item, owner * num_items + excluded)  # (R,)
    candidates = np.unique(user[positive & ~seen])
    if candidates.size <= count:
        return positive, None
    drawn = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    sample = {"user_ids": catalogue.user_ids[drawn].tolist(), "of": int(candidates.size)}
    return positive & np.isin(user, drawn), sample


def _check_ranking_users(count: int) -> None:
    if count < 1:
        raise ValueError(f"--ranking_users {count} must be at least 1.")


def _user_chunks(
    users: UserTable, user_rows: np.ndarray, num_items: int, mesh, history: bool, rows_per_call
):
    """Yields (global rows, sharded user arrays, this process's local rows) per call."""
    if user_rows.size == 0:
        raise ValueError("No users to score: pass at least one row of the user table.")
    per_call = _round_up(max(1, rows_per_call // max(num_items, 1)), mesh.size)
    per_call = min(per_call, _round_up(user_rows.size, mesh.size))
    for start in range(0, user_rows.size, per_call):
        rows = user_rows[start : start + per_call]
        padded = np.concatenate([rows, np.full(per_call - rows.size, rows[-1])])
        local = _local_part(padded)
        arrays = {"user_id": users.user_id[local].astype(np.int32)}
        if history:
            arrays["history_slot"] = users.history[local].astype(np.int32)
            arrays["history_mask"] = users.history_mask[local].astype(bool)
        yield rows, sharding.global_batch(mesh, arrays), local


def _uses_history(model: Any) -> bool:
    return "history" in schema.parse_towers(model.config.towers)


def catalogue_scores(
    model: Any,
    params: Any,
    encoded: Mapping[str, np.ndarray],
    users: UserTable,
    user_rows: Sequence[int],
    mesh: jax.sharding.Mesh,
    rows_per_call: int = ROWS_PER_CALL,
) -> np.ndarray:
    """Logits of users against every item: the scores `rank_catalogue` ranks.

    Args:
      model, params: the model and its parameters.
      encoded: `encode_catalogue`'s output.
      users: the user table.
      user_rows: rows of the user table to score.
      mesh: the device mesh; each call's users are split over its `data` axis.
      rows_per_call: (user, item) rows per jit call.

    Returns:
      (len(user_rows), N) float32 logits.
    """
    user_rows = np.asarray(user_rows, np.int64)
    num_items = encoded["mask"].shape[0]
    items = sharding.put_replicated(mesh, dict(encoded))
    grid = programs_of(model).grid
    out = []
    for rows, arrays, _ in _user_chunks(
        users, user_rows, num_items, mesh, _uses_history(model), rows_per_call
    ):
        out.append(sharding.to_host(grid(params, items, arrays))[: rows.size])
    return np.concatenate(out)


def _check_ks(ks: Sequence[int], num_items: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or max(ks) > num_items:
        raise ValueError(
            f"Ranking cut-offs k={list(ks)} must lie in [1, {num_items}] (the catalogue size)."
        )
    return ks


def rank_catalogue(
    model: Any,
    params: Any,
    encoded: Mapping[str, np.ndarray],
    users: UserTable,
    relevant: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int],
    mesh: jax.sharding.Mesh,
    rows_per_call: int = ROWS_PER_CALL,
    progress: str | None = None,
) -> dict[str, float | int]:
    """Full-catalogue HR, Recall, NDCG, MRR and MAP at each K, averaged over users.

    Each user with a relevant item is scored against all N items in (users x items)
    grids; excluded items (the user's training positives) are ranked last and the
    top max(K) are taken on the device (`metrics.top_k_items`); the metrics are those of
    `metrics.ranking_metrics` (an excluded item is never relevant).

    Args:
      model, params: the model and its parameters.
      encoded: `encode_catalogue`'s output.
      users: the user table.
      relevant: CSR (offsets (U + 1,), item rows) of each user's relevant items (the
        split's positives).
      ks: cut-offs, each in [1, N].
      mesh: the device mesh.
      rows_per_call: (user, item) rows per jit call.
      progress: the label of a progress bar over the users (process 0 prints it), or
        None for none.

    Returns:
      {"hr@K", "recall@K", "ndcg@K", "mrr@K", "map@K"} for each K, and "users": the
      number of users averaged over.

    Raises:
      ValueError: a K outside [1, N], no user has a relevant item that is not excluded, or
        the model scores NaN.
    """
    num_items = encoded["mask"].shape[0]
    ks = _check_ks(ks, num_items)
    top = max(ks)
    offsets = relevant[0]
    user_rows = np.flatnonzero(np.diff(offsets) > 0)  # users with a relevant item
    if user_rows.size == 0:
        raise ValueError("Ranking metrics are undefined: the split has no positive.")
    items = sharding.put_replicated(mesh, dict(encoded))
    rank = functools.partial(programs_of(model).rank, top=top)
    data = sharding.data_sharding(mesh)
    per_user: dict[str, list[np.ndarray]] = {}
    bar = _progress_bar(progress, user_rows.size, "user")
    for rows, arrays, local in _user_chunks(
        users, user_rows, num_items, mesh, _uses_history(model), rows_per_call
    ):
        exclude = _dense_rows(users.train_positives, local, num_items)  # (local Bu, N)
        exclude = jax.make_array_from_process_local_data(data, exclude)
        top_items, has_nan = (
            a[: rows.size] for a in sharding.to_host(rank(params, items, arrays, exclude))
        )  # (Bu, top), (Bu,): the padding users dropped
        if has_nan.any():
            raise ValueError(
                f"The model's scores hold NaN for {int(has_nan.sum())} of the {rows.size} "
                "users scored last; ranking them would be meaningless. The parameters are "
                "not finite: evaluate a checkpoint from before the run diverged."
            )
        chunk = metrics_lib.per_user_ranking_metrics(
            top_items,
            _dense_rows(relevant, rows, num_items),
            ks,
            _dense_rows(users.train_positives, rows, num_items),
        )
        for name, values in chunk.items():
            per_user.setdefault(name, []).append(values)
        bar.update(rows.size)
    bar.close()
    counted = int(sum(v.size for v in next(iter(per_user.values()))))
    if counted == 0:
        raise ValueError(
            "Ranking metrics are undefined: every positive of the split is an item the "
            "user already engaged with in training."
        )
    results: dict[str, float | int] = {
        name: float(np.mean(np.concatenate(values))) for name, values in per_user.items()
    }
    results["users"] = counted
    return results


def popularity_ranking(
    users: UserTable,
    relevant: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int],
    num_items: int,
    users_per_chunk: int = 1024,
) -> dict[str, float]:
    """The ranking metrics of recommending every user the most popular items.

    The baseline a model's full-catalogue ranking has to beat: items ordered by how many
    users have them among their training positives (ties by item row), each user's own
    training positives ranked last, scored by `metrics.per_user_ranking_metrics` over the
    same users as `rank_catalogue`.

    Args:
      users: the user table (its `train_positives` give the popularity and the exclusions).
      relevant: CSR (offsets (U + 1,), item rows) of each user's relevant items.
      ks: cut-offs, each in [1, num_items].
      num_items: N, the catalogue size.
      users_per_chunk: users per dense (users, N) block.

    Returns:
      {"hr@K", "recall@K", "ndcg@K", "mrr@K", "map@K"} for each K, averaged over users.

    Raises:
      ValueError: a K outside [1, N], or no user has a relevant item that is not excluded.
    """
    ks = _check_ks(ks, num_items)
    top = max(ks)
    liked_by = np.bincount(users.train_positives[1], minlength=num_items)  # (N,)
    order = np.argsort(-liked_by, kind="stable")  # (N,) the most liked first
    excluded = np.diff(users.train_positives[0])  # (U,) each user's training positives
    user_rows = np.flatnonzero(np.diff(relevant[0]) > 0)
    per_user: dict[str, list[np.ndarray]] = {}
    for start in range(0, user_rows.size, users_per_chunk):
        rows = user_rows[start : start + users_per_chunk]
        exclude = _dense_rows(users.train_positives, rows, num_items)  # (b, N)
        # Per user, the order with their excluded items moved to the end (a stable sort).
        # A user's top items lie within the first top + (their exclusions) of the order.
        prefix = order[: min(num_items, top + int(excluded[rows].max()))]  # (P,)
        ranked = prefix[np.argsort(exclude[:, prefix], axis=1, kind="stable")[:, :top]]
        chunk = metrics_lib.per_user_ranking_metrics(
            ranked, _dense_rows(relevant, rows, num_items), ks, exclude
        )
        for name, values in chunk.items():
            per_user.setdefault(name, []).append(values)
    if not per_user or sum(v.size for v in next(iter(per_user.values()))) == 0:
        raise ValueError("Ranking metrics are undefined: the split has no positive to rank.")
    return {name: float(np.mean(np.concatenate(values))) for name, values in per_user.items()}


# ------------------------------------------------------------------------ click metrics


def make_split_fn(model: Any) -> Callable:
    """A jitted `(params, rows, encoded) -> {"logit", "label", "weight", "user_index",
    "item_index"}`: `catalogue_rows` scored against the encoded catalogue (on the mesh).

    `item_index` is each row's candidate item as a row of the item table, so one pass
    over a split gives both the click metrics and the relevant items of the ranking.
    The same function (and its compilations) is returned for the same model object.
    """
    return programs_of(model).split_rows


def catalogue_rows(batch: Mapping, process_index: int | None = None) -> dict:
    """A (numpy) local batch's rows, their slots turned into rows of the item table.

    A batch's `item_slot` and `history_slot` index the global item block (process p's
    block at offset p x its capacity, see `mmrec_jax.data.pipeline`); its
    `items["item_index"]` says which item of the table each of its slots holds. The
    result indexes an encoded catalogue (`encode_catalogue`) instead, and has no
    `items`. History slots that the mask leaves out point at item 0.

    Args:
      batch: a local batch of `pipeline.make_batches`.
      process_index: the process that made it (default: this one).
    """
    if process_index is None:
        process_index = jax.process_index()
    item_rows = np.asarray(batch["items"]["item_index"])  # (U,)
    offset = process_index * item_rows.shape[0]
    rows = {key: value for key, value in batch.items() if key != "items"}
    rows["item_slot"] = item_rows[np.asarray(batch["item_slot"]) - offset]  # (B,)
    if "history_slot" in batch:
        history = item_rows[np.asarray(batch["history_slot"]) - offset]  # (B, H)
        rows["history_slot"] = np.where(batch["history_mask"], history, 0).astype(np.int32)
    return rows


def mark_absent(items: Mapping, modalities: Sequence[str]) -> dict:
    """A copy of a (numpy) item block in which every item lacks `modalities` (has_* False)."""
    items = dict(items)
    for modality in modalities:
        flag = f"has_{modality}"
        if flag not in items:
            raise ValueError(f"The items have no {flag!r}: the model has no {modality} tower.")
        items[flag] = np.zeros_like(items[flag])
    return items


def score_split(
    split_fn: Callable,
    params: Any,
    config: Any,
    split: str,
    mesh: jax.sharding.Mesh,
    encoded: Mapping,
    item_store: Any = None,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Scores every row of a split (this process's share of it, gathered from all).

    Args:
      split_fn: `make_split_fn(model)`.
      params: the model's parameters.
      config: the resolved run config.
      split: the split's name.
      mesh: the device mesh.
      encoded: the encoded catalogue, replicated on the mesh (`encode_catalogue`).
      item_store: a `pipeline.ItemStore` of this config to share (default: a new one).
      progress: the label of a progress bar over the batches (process 0 prints it), or
        None for none.

    Returns:
      `split_fn`'s fields as 1-D numpy arrays over the split's real rows.
    """
    from mmrec_jax.data import pipeline

    batches = pipeline.make_batches(
        config,
        split,
        train=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        item_store=item_store,
        multiple=len(mesh.local_devices),
    )
    total = pipeline.num_batches(config, split, train=False)

    def counted(bar):
        for batch in batches:
            yield batch
            bar.update(1)

    # The pipeline's worker processes, if any, stop when the pass is done.
    with contextlib.closing(batches), _progress_bar(progress, total, "batch") as bar:
        return score_batches(split_fn, params, encoded, counted(bar), mesh)


def score_batches(
    split_fn: Callable,
    params: Any,
    encoded: Mapping,
    batches: Iterable[Mapping],
    mesh: jax.sharding.Mesh,
) -> dict[str, np.ndarray]:
    """`predict.predict_batches` of local pipeline batches against the encoded catalogue:
    each batch's rows through `catalogue_rows`, scored by `split_fn` (`make_split_fn`)
    with `encoded` replicated on the mesh."""
    rows = (catalogue_rows(batch) for batch in batches)
    split_rows = functools.partial(split_fn, encoded=encoded)
    return predict.predict_batches(split_rows, params, rows, mesh)


# --------------------------------------------------------------------------- evaluation


def _encoded_catalogue(
    model: Any, params: Any, catalogue: Catalogue, mesh: jax.sharding.Mesh, absent: str = ""
) -> dict[str, np.ndarray]:
    """`encode_catalogue` of the catalogue's items, with the modality `absent` marked
    absent in every item (`mark_absent`) when one is named."""

    def item_block(rows: np.ndarray) -> Mapping:
        block = catalogue.item_block(rows)
        return mark_absent(block, [absent]) if absent else block

    label = f"encoding items without {absent}" if absent else "encoding items"
    return encode_catalogue(model, params, item_block, catalogue.num_items, mesh, progress=label)


def content_modalities(model: Any) -> tuple[str, ...]:
    """The content modalities the model has a tower for (those `--ablate` removes)."""
    towers = schema.parse_towers(model.config.towers)
    return tuple(m for m in ABLATABLE if m in towers)


def evaluate_params(
    config: Any,
    model: Any,
    params: Any,
    splits: Sequence[str],
    mesh: jax.sharding.Mesh,
    ks: Sequence[int] = DEFAULT_KS,
    ablate: bool = False,
    catalogue: Catalogue | None = None,
    ranking_users: int | None = None,
) -> dict[str, dict]:
    """Every metric of `params` on each split.

    Args:
      config: the resolved run config.
      model: the `Recommender`.
      params: its parameters (on `mesh`).
      splits: split names; empty splits are left out.
      mesh: the device mesh.
      ks: ranking cut-offs.
      ablate: also score each split with each content modality marked absent.
      catalogue: `open_catalogue(config)`, if already open.
      ranking_users: rank only a random sample of this many of a split's users (seeded
        by `config.seed`; `ranking_sample`), for catalogues too large to rank every
        user; None ranks them all.

    Returns:
      {split: {"click": {...}, "calibration": `metrics.calibration_curve`, "ranking":
      {...} or None, "ranked_users": int, "popularity": the ranking metrics of
      recommending the most popular items (`popularity_ranking`) or None,
      "rows": {"examples", "positive_rate", "gauc_users" (the users GAUC averages: those
      with a positive and a negative row)}, "oracle": {...} or None,
      "ranking_sample": {"user_ids": the users ranked, "of": how many could have been}
      (only where `ranking_users` left users out),
      "ablation": {modality: {..., "auc_drop"}} (with `ablate`; empty for a model with
      no content modality)}}. Ranking is None for "train": its positives are the
      excluded items.
    """
    catalogue = catalogue or open_catalogue(config)
    info = catalogue.info
    _check_ks(ks, catalogue.num_items)
    split_fn = make_split_fn(model)
    splits = [split for split in splits if int(info.split_sizes.get(split, 0)) > 0]
    encoded = _encoded_catalogue(model, params, catalogue, mesh) if splits else None
    on_mesh = sharding.put_replicated(mesh, encoded) if splits else None
    results = {}
    for split in splits:
        rows = score_split(
            split_fn, params, config, split, mesh, on_mesh, catalogue.item_store, f"scoring {split}"
        )
        entry: dict[str, Any] = {
            "click": predict.click_metrics(rows),
            "calibration": metrics_lib.calibration_curve(
                rows["label"], metrics_lib.sigmoid(rows["logit"])
            ),
            "ranking": None,
            "rows": {
                "examples": int(rows["label"].shape[0]),
                "positive_rate": float(np.mean(rows["label"] > 0.5)),
                "gauc_users": predict.gauc_users(rows),
            },
        }
        if split != "train":
            positive = rows["label"] > 0.5
            if ranking_users is not None:
                positive, sample = ranking_sample(
                    rows, positive, catalogue, ranking_users, int(config.seed)
                )
                if sample is not None:
                    entry["ranking_sample"] = sample
            relevant = csr_from_pairs(
                rows["user_index"][positive],
                rows["item_index"][positive],
                catalogue.users.user_id.shape[0],
            )
            ranking = rank_catalogue(
                model,
                params,
                encoded,
                catalogue.users,
                relevant,
                ks,
                mesh,
                progress=f"ranking {split}",
            )
            entry["ranked_users"] = int(ranking.pop("users"))
            entry["ranking"] = ranking
            entry["popularity"] = popularity_ranking(
                catalogue.users, relevant, ks, catalogue.num_items
            )
        entry["oracle"] = (getattr(info, "oracle", None) or {}).get(split)
        if ablate:
            entry["ablation"] = {}
            for modality in content_modalities(model):
                without_modality = _encoded_catalogue(model, params, catalogue, mesh, modality)
                absent = predict.click_metrics(
                    score_split(
                        split_fn,
                        params,
                        config,
                        split,
                        mesh,
                        sharding.put_replicated(mesh, without_modality),
                        catalogue.item_store,
                        f"scoring {split} without {modality}",
                    )
                )
                full, without = entry["click"]["auc"], absent["auc"]
                absent["auc_drop"] = None if None in (full, without) else full - without
                entry["ablation"][modality] = absent
        results[split] = entry
    return results


def format_results(results: Mapping[str, Mapping]) -> str:
    """The metrics of each split as a text table, each split beside its oracle and the
    ranking metrics of recommending the most popular items.

    With `--ablate`, each split's ablation table follows; a model with no content
    modality (every "ablation" empty) gets one line saying so instead.
    """

    def values(entry: Mapping) -> dict:
        return {**entry["click"], **(entry.get("ranking") or {}), **entry.get("rows", {})}

    names: list[str] = []
    for group in ("click", "ranking", "rows", "oracle"):  # in this order, whatever the split
        for entry in results.values():
            names += [n for n in entry.get(group) or {} if n not in names]
    header = ["metric"]
    for split, entry in results.items():
        header += [split] + ([f"{split} oracle"] if entry.get("oracle") else [])
        header += [f"{split} popular"] if entry.get("popularity") else []
    table = [header]
    for name in names:
        row = [name]
        for entry in results.values():
            row.append(reporting.format_cell(values(entry).get(name)))
            for baseline in ("oracle", "popularity"):
                if entry.get(baseline):
                    row.append(reporting.format_cell(entry[baseline].get(name)))
        table.append(row)
    users = ["ranked users"]
    for entry in results.values():
        users.append(reporting.format_cell(entry.get("ranked_users")))
        users += [reporting.format_cell(None)] if entry.get("oracle") else []  # no oracle count
        if entry.get("popularity"):  # the same users
            users.append(reporting.format_cell(entry.get("ranked_users")))
    table.append(users)
    lines = reporting.align_table(table)
    lines += reporting.undefined_gauc_note({s: e["click"] for s, e in results.items()})
    lines += reporting.few_gauc_users_note(
        {s: {"model": e["click"], **e.get("rows", {})} for s, e in results.items()}
    )
    for split, entry in results.items():
        if entry.get("ranking_sample"):
            sample = entry["ranking_sample"]
            lines.append(
                f"ranked users of {split}: a random sample of {len(sample['user_ids'])} of its "
                f"{sample['of']} users with a positive to rank (--ranking_users)."
            )
    if any("ablation" in e for e in results.values()) and not any(
        e.get("ablation") for e in results.values()
    ):
        lines += [
            "",
            f"Note: the run's model has no content modality ({', '.join(ABLATABLE)}) to ablate.",
        ]
    for split, entry in results.items():
        if entry.get("ablation"):
            rows = [["without", "auc", "auc drop", "logloss"]]
            for modality, values in entry["ablation"].items():
                cells = [values[n] for n in ("auc", "auc_drop", "logloss")]
                rows.append([modality] + [reporting.format_cell(v) for v in cells])
            auc = reporting.format_cell(entry["click"]["auc"])
            lines += ["", f"Modality ablation on {split} (AUC {auc}):"]
            lines += reporting.align_table(rows)
    return "\n".join(lines)


def evaluate_run(
    workdir: str | Path,
    splits: Sequence[str] | None = None,
    checkpoint: str | int = "best",
    ks: Sequence[int] = DEFAULT_KS,
    ablate: bool = False,
    devices: list | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    write: bool = True,
    ranking_users: int | None = None,
) -> dict[str, dict]:
    """Evaluates a checkpoint of a run; writes `workdir/eval/<split>.json` for each split.

    Also draws the reliability diagrams of the splits evaluated at this checkpoint, by
    this call or an earlier one, into `workdir/eval/calibration.png`.

    Args:
      workdir: the training run's folder.
      splits: split names, or None for test and test_cold; "all" for every split.
      checkpoint: "best", "latest" or a step.
      ks: ranking cut-offs.
      ablate: also report the AUC lost without each content modality.
      devices: mesh devices (default: all).
      data_dir: where the run's dataset is now, if it moved (default: where it was).
      batch_size: rows scored per batch (default: the run's `train.batch_size`, rounded
        up to a multiple of the devices); the metrics do not depend on it, the memory
        used does.
      write: write the results (`write_results`); False only returns them.
      ranking_users: rank a seeded random sample of this many users of each split
        (`evaluate_params`); None: every user.

    Returns:
      `evaluate_params`' results, each with "checkpoint_step" and "k" added.

    Raises:
      ValueError: a bad split, cut-off, batch size or number of users to rank.
    """
    from mmrec_jax import train
    from mmrec_jax.data import pipeline

    # Bad arguments fail before anything is loaded.
    info = pipeline.load_dataset_info(train.load_run_config(workdir, data_dir).data)
    splits = resolve_splits(splits, info)
    _check_ks(ks, info.num_item_rows)
    mesh = sharding.make_mesh(devices)
    if batch_size is not None and (batch_size < 1 or batch_size % mesh.size):
        raise ValueError(
            f"--batch_size {batch_size} must be a positive multiple of the number of devices "
            f"({mesh.size})."
        )
    if ranking_users is not None:
        _check_ranking_users(ranking_users)
    config, model, params, step = train.restore_params(workdir, checkpoint, devices, data_dir)
    if str(checkpoint) == "best" and train.best_checkpoint_step(workdir) is None:
        checkpoint = "latest"  # the run was never validated
    config.train.batch_size = batch_size or default_batch_size(config, mesh.size)
    catalogue = open_catalogue(config)
    results = evaluate_params(
        config, model, params, splits, mesh, ks, ablate, catalogue, ranking_users
    )
    for split, entry in results.items():
        entry.update(split=split, checkpoint=str(checkpoint), checkpoint_step=int(step))
        entry["k"] = [int(k) for k in ks]
    if write and results and jax.process_index() == 0:
        write_results(workdir, results)
    return results


def write_results(workdir: str | Path, results: Mapping[str, dict]) -> list[Path]:
    """Writes `evaluate_run`'s results to `workdir/eval/<split>.json` and the diagrams.

    Returns:
      The files written, the reliability diagrams' `calibration.png` last.

    Raises:
      OSError: the eval folder cannot be written.
    """
    out = Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, entry in results.items():
        written.append(out / f"{split}.json")
        write_atomic(written[-1], json.dumps(entry, indent=2) + "\n")
    step = int(next(iter(results.values()))["checkpoint_step"])
    curves = calibration_curves(out, step)
    written.append(reporting.plot_calibration(curves, out / "calibration.png"))
    return written


def calibration_curves(eval_dir: str | Path, step: int) -> dict[str, dict]:
    """The calibration curves of every split in `eval_dir` evaluated at checkpoint `step`.

    Each `evaluate_run` call writes its splits' `<split>.json`; the reliability diagram
    draws these together with the splits an earlier call evaluated at the same checkpoint
    (a later `--split validation` keeps test's curve beside it), never a curve of another
    checkpoint.

    Returns:
      {split: `metrics.calibration_curve`}, in the order train, validation, test, test_cold.
    """
    from mmrec_jax.train import REPORT_SPLITS

    curves = {}
    for split in REPORT_SPLITS:
        path = Path(eval_dir) / f"{split}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not evaluated (or not readable): not drawn
        if entry.get("checkpoint_step") == step and "calibration" in entry:
            curves[split] = entry["calibration"]
    return curves


def default_batch_size(config: Any, num_devices: int) -> int:
    """Rows per evaluation batch: the run's batch, rounded up to a multiple of the devices.

    A run trained on another number of devices may have a batch they cannot share.
    """
    return -(-int(config.train.batch_size) // num_devices) * num_devices


def resolve_splits(splits: Sequence[str] | None, info: Any) -> list[str]:
    """Split names from the command line: None -> test, test_cold; "all" -> every split.

    Raises:
      ValueError: a split the dataset does not have.
    """
    from mmrec_jax.train import REPORT_SPLITS

    available = [s for s in REPORT_SPLITS if int(info.split_sizes.get(s, 0)) > 0]
    if not splits:
        chosen = [s for s in ("test", "test_cold") if s in available] or available[-1:]
        if jax.process_index() == 0:
            for split in ("test", "test_cold"):
                if split not in chosen:
                    print(f"Note: {info.name!r} has no {split} rows; it is not evaluated.")
            if chosen and chosen[0] not in ("test", "test_cold"):
                print(f"Note: evaluating {chosen[0]} instead.")
        return chosen
    names: list[str] = []
    for value in splits:
        for name in (n.strip() for n in value.split(",") if n.strip()):
            for split in available if name == "all" else [name]:
                if split not in available:
                    raise ValueError(
                        f"--split {split!r}: the dataset has no such (non-empty) split; "
                        f"choose from {', '.join(available)} or all."
                    )
                if split not in names:
                    names.append(split)
    return names


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r}: give comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k {text!r}: give positive integers, e.g. 10,20")
    return ks


def parse_checkpoint(text: str) -> str | int:
    """`--checkpoint` of the command lines: "best", "latest" or a step number."""
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"--checkpoint {text!r}: use best, latest or a step")


def moved_data_hint(error: Exception, args: argparse.Namespace) -> str:
    """For a command line: how to point a run at its dataset after the data moved."""
    from mmrec_jax.data import builder
    from mmrec_jax.data.pipeline import DatasetNotBuiltError

    if not isinstance(error, DatasetNotBuiltError):
        return ""
    if not args.data_dir:
        return " If the run's dataset moved since training, pass --data_dir NEW_FOLDER."
    given = Path(args.data_dir).resolve()
    if (given / builder.INTERACTIONS).is_dir():  # the dataset's own folder
        return (
            f" --data_dir {args.data_dir} is the dataset's own folder: pass the folder that "
            f"holds it, --data_dir {given.parent}."
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    """`python -m mmrec_jax.evaluate`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="Prints the metrics and writes them to WORKDIR/eval/<split>.json, with the "
        "reliability diagrams in WORKDIR/eval/calibration.png.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument(
        "--split",
        action="append",
        help="split to evaluate (repeatable, or comma-separated, or all); "
        "default: test and test_cold",
    )
    parser.add_argument(
        "--checkpoint",
        type=parse_checkpoint,
        default="best",
        help="best (validation AUC; the default), latest, or a step",
    )
    parser.add_argument(
        "--k", type=_parse_ks, default=DEFAULT_KS, help="ranking cut-offs (default 10,20)"
    )
    parser.add_argument(
        "--ablate", action="store_true", help="report the AUC lost without each modality"
    )
    parser.add_argument(
        "--data_dir",
        help="the folder holding the run's dataset folder (an importer's --output), if the "
        "dataset moved since training",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        help="rows scored per batch (default: the run's train.batch_size, rounded up to a "
        "multiple of the devices); lower it if evaluation runs out of memory",
    )
    parser.add_argument(
        "--ranking_users",
        type=int,
        help="rank a random sample of this many of each split's users (seeded by the run's "
        "config.seed; a split with no more ranks them all; default: every user), for "
        "catalogues too large to rank them all",
    )
    args = parser.parse_args(argv)
    sharding.maybe_initialize_distributed()
    with exits_quietly(parser, exit_process=argv is None):
        return _evaluate_and_report(parser, args)


def _evaluate_and_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`main` once the arguments are parsed: evaluates, prints the table, writes the files."""
    from mmrec_jax.checkpoint import CheckpointError

    try:
        results = evaluate_run(
            args.workdir,
            args.split,
            args.checkpoint,
            args.k,
            args.ablate,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            write=False,
            ranking_users=args.ranking_users,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}{moved_data_hint(error, args)}\n")
    except CheckpointError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except jax.errors.JaxRuntimeError as error:
        from mmrec_jax import train

        if not runtime.is_out_of_memory(error):
            raise
        batch = args.batch_size or default_batch_size(
            train.load_run_config(args.workdir, args.data_dir), jax.device_count()
        )
        smaller = train.halved_batch_size(batch, jax.device_count()) or jax.device_count()
        parser.exit(
            1,
            f"{parser.prog}: error: out of memory evaluating, with batches of {batch} rows "
            f"({str(error).splitlines()[0]}). Rerun with a smaller --batch_size, e.g. "
            f"--batch_size {smaller}; the metrics do not depend on it.\n",
        )
    if not results:
        parser.exit(2, f"{parser.prog}: error: none of the splits has any rows.\n")
    if jax.process_index() != 0:  # process 0 writes the results and reports them
        return 0
    first = next(iter(results.values()))
    step, which = first["checkpoint_step"], first["checkpoint"]
    if which != str(args.checkpoint):  # "best" of a run never validated
        which = f"{which}: the run was never validated, so it has no best"
    which = "" if which == str(step) else f" ({which})"
    print(f"{args.workdir}, checkpoint step {step}{which}:\n")
    print(format_results(results))
    try:
        written = [str(path) for path in write_results(args.workdir, results)]
    except OSError as error:
        parser.exit(
            1,
            f"{parser.prog}: error: the results above could not be written to "
            f"{Path(args.workdir) / 'eval'}: {error}\n",
        )
    print(f"\nWrote {', '.join(written[:-1])} and {written[-1]}.")
    return 0


if __name__ == "__main__":
    runtime.restart_with_huge_pages()
    runtime.tune_host_allocator()
    sys.exit(main())
