"""User modelling: ID embeddings with an out-of-vocabulary bucket, and history attention.

A user (or item) ID-vocabulary index is 0 for IDs unseen in training: they all share
one OOV row of the table. Ids outside the vocabulary are mapped to 0 too, so an
evaluation set with new users cannot index out of range. No training row reaches the OOV
row (every user and item of the training split has an ID), so the recommender marks an
OOV token absent rather than read it (`mmrec_jax.models.recommender`).

History attention (DIN / BST style): the candidate item's content embedding attends
over the embeddings of the items the user engaged with before (up to H, most recent
first, masked where the history is shorter). The history items are described by their
content (the same towers that encode the candidate), so a new item, or a new user with
a history, still gets a meaningful user token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmrec_jax.models.layers import MultiHeadAttention, input_dtype


class IdEmbedding(nn.Module):
    """Embedding of ID-vocabulary indices with index 0 as the out-of-vocabulary bucket.

    Attributes:
      num_ids: IDs in the vocabulary, without the OOV bucket (the table has
        `num_ids + 1` rows).
      width: embedding width.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_ids: int
    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """(...,) int indices in [0, num_ids] (others count as OOV) -> (..., width)."""
        if self.num_ids < 1:
            raise ValueError(
                f"ID embedding needs a vocabulary size >= 1; got {self.num_ids}. Set "
                "config.model.num_users / num_items (the training code fills them from "
                "the dataset)."
            )
        dtype = input_dtype(ids)  # as passed: jnp.asarray would turn float64 into float32
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"ID embedding takes integer ID-vocabulary indices; got {dtype} values."
            )
        ids = jnp.asarray(ids)
        ids = jnp.where((ids < 0) | (ids > self.num_ids), 0, ids)
        return nn.Embed(
            self.num_ids + 1,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding",
        )(ids)


class HistoryAttention(nn.Module):
    """Attention from the candidate item over the user's history items.

    Attributes:
      num_heads: attention heads (`config.model.user.num_heads`).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        candidate: jax.Array,
        history: jax.Array,
        history_mask: jax.Array,
        grid: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Summarises the history as seen from the candidate.

        Args:
          candidate: (B, D) candidate item embeddings; with `grid`, (Q, D).
          history: (B, H, D) history item embeddings.
          history_mask: (B, H) bool, True where the history entry is real; the others
            are ignored whatever they hold (NaN included).
          grid: every one of the Q candidates is seen from every one of the B histories
            (scoring users against a catalogue): each history is normalised and projected
            once, not once per candidate.

        Returns:
          token: (B, D) the history token, zeros for rows without any history; with
            `grid`, (B, Q, D).
          present: (B,) bool, whether the row has any history.
        """
        if (
            candidate.ndim != 2
            or candidate.shape[-1] != history.shape[-1]
            or (not grid and history.shape[0] != candidate.shape[0])
            or jnp.shape(history_mask) != history.shape[:2]
        ):
            rows = "Q" if grid else "B"
            raise ValueError(
                f"History attention takes candidate ({rows}, D), history (B, H, D) and "
                f"history_mask (B, H); got {candidate.shape}, {history.shape} and "
                f"{jnp.shape(history_mask)}."
            )
        history_mask = jnp.asarray(history_mask, bool)  # (B, H)
        # A masked entry gets no attention weight, but 0 * NaN is NaN: zero it first.
        history = jnp.where(history_mask[..., None], history, 0)  # (B, H, D)
        norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = nn.LayerNorm(name="query_norm", **norm)(candidate)[:, None, :]  # (B or Q, 1, D)
        keys = nn.LayerNorm(name="history_norm", **norm)(history)  # (B, H, D)
        attention = MultiHeadAttention(self.num_heads, name="attention", **norm)
        present = jnp.any(history_mask, axis=1)  # (B,)
        if grid:
            token = attention(query, keys, history_mask, grid=True)[:, :, 0, :]  # (B, Q, D)
            return jnp.where(present[:, None, None], token, 0), present
        token = attention(query, keys, history_mask)[:, 0, :]  # (B, D)
        return jnp.where(present[:, None], token, 0), present
