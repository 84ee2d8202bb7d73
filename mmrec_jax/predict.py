"""Scoring a whole split with a jit-compiled, data-parallel forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from mmrec_jax import metrics, runtime, schema, sharding

# Row fields gathered beside the logits, where the batch has them, for metrics.
_ROW_FIELDS = ("label", "weight", "user_index")


def forward_compiler_options(model: Any) -> dict[str, str | bool] | None:
    """`runtime.compiler_options` for a forward pass of `model` over a batch or an item
    block: those of a content forward pass where it runs BERT or the image or audio tower."""
    content = schema.content_in_step(model.config.towers, model.config.text.mode)
    return runtime.compiler_options(model.config.dtype, content)


def make_predict_fn(model: Any, param_shardings: Any) -> Callable:
    """A jitted `(params, batch) -> {"logit", "label", "weight", "user_index"}`.

    The batch's `label`, `weight` and `user_index` come back beside the logits where it
    has them. Outputs stay split over the `data` axis; `predict_batches` gathers them to
    the host. Compiled with `forward_compiler_options`.
    """

    def predict(params, batch):
        logits = model.apply({"params": params}, batch, train=False)
        rows = {k: batch[k] for k in _ROW_FIELDS if k in batch}
        return {"logit": logits.astype("float32"), **rows}

    return jax.jit(
        predict,
        in_shardings=(param_shardings, None),
        compiler_options=forward_compiler_options(model),
    )


def predict_batches(
    predict_fn: Callable, params: Any, batches: Iterable[dict], mesh: jax.sharding.Mesh
) -> dict[str, np.ndarray]:
    """Runs `predict_fn` over local batches; returns every process's rows, padding dropped.

    Rows with `weight` 0 are padding; batches without a `weight` field have none.

    Returns:
      {"logit", and "label", "weight", "user_index" where the batches have them}: 1-D
      numpy arrays over the split's rows.
    """
    chunks: list[dict] = []
    for local_batch in batches:
        batch = sharding.global_batch(mesh, local_batch)
        chunks.append(sharding.to_host(predict_fn(params, batch)))
    if not chunks:
        raise ValueError("The split yielded no batches: it is empty.")
    merged = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    if "weight" not in merged:
        return merged
    keep = merged["weight"] > 0
    return {key: value[keep] for key, value in merged.items()}


def click_metrics(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, GAUC (by user), logloss, accuracy and ECE of `predict_batches`' rows."""
    return metrics.click_metrics(rows["label"], rows["logit"], user_ids=rows["user_index"])


def gauc_users(rows: dict[str, np.ndarray]) -> int:
    """How many users GAUC averages over among `predict_batches`' rows (`metrics.gauc_users`)."""
    return metrics.gauc_users(rows["user_index"], rows["label"] > 0.5)
