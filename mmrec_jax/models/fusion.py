"""Attention fusion of the modality and user tokens into one logit.

Each row brings T tokens of width D: first the candidate item's modality tokens (text,
image, audio, item ID, as enabled), then the user tokens (user ID, history). A learned
type embedding per token position says which is which. L pre-LN transformer layers of
multi-head self-attention (absent tokens masked as keys) and MLPs mix them; a masked
mean over the present tokens, an MLP and a linear layer give one logit.

While training, modality dropout removes whole item-modality tokens (each with
probability `modality_dropout`) so the model learns to score items that lack a
modality; if it would remove every present item token of a row, that row keeps them
all.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmrec_jax.models.layers import Dense, Dropout, MultiHeadAttention, masked_mean


def modality_dropout(
    rng: jax.Array, mask: jax.Array, num_item_tokens: int, rate: float
) -> jax.Array:
    """Drops item-modality tokens from a token mask, never all present ones of a row.

    Args:
      rng: PRNG key.
      mask: (B, T) bool, True for present tokens; the first `num_item_tokens` are the
        item's modality tokens, the rest are never dropped.
      num_item_tokens: M.
      rate: probability of dropping each item token.

    Returns:
      (B, T) bool mask with dropped tokens False.
    """
    item_mask = mask[:, :num_item_tokens]  # (B, M)
    keep = jax.random.bernoulli(rng, 1.0 - rate, item_mask.shape)  # (B, M)
    kept = item_mask & keep
    nothing_left = ~jnp.any(kept, axis=1, keepdims=True)  # (B, 1)
    kept = jnp.where(nothing_left, item_mask, kept)
    return jnp.concatenate([kept, mask[:, num_item_tokens:]], axis=1)


class FusionLayer(nn.Module):
    """One pre-LN transformer layer: masked self-attention, then an MLP."""

    num_heads: int
    mlp_dim: int
    dropout: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """x: (B, T, D), mask: (B, T) bool -> (B, T, D)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(name="attention_norm", **kw)(x)
        attention = MultiHeadAttention(self.num_heads, name="attention", **kw)
        h = attention(h, h, mask, inference=not train)
        x = x + Dropout(self.dropout)(h, deterministic=not train)
        h = nn.LayerNorm(name="mlp_norm", **kw)(x)
        h = Dense(self.mlp_dim, name="mlp_in", **kw)(h)
        h = Dense(x.shape[-1], name="mlp_out", **kw)(nn.gelu(h, approximate=False))
        return x + Dropout(self.dropout)(h, deterministic=not train)  # (B, T, D)


class Fusion(nn.Module):
    """Fuses a row's tokens into one logit.

    Attributes:
      config: `config.model.fusion` (num_layers, num_heads, mlp_dim, dropout,
        modality_dropout).
      num_item_tokens: how many leading tokens are item-modality tokens (subject to
        modality dropout).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    config: ml_collections.ConfigDict
    num_item_tokens: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        """Scores rows.

        Args:
          tokens: (B, T, D) item-modality tokens then user tokens.
          mask: (B, T) bool, True for tokens that are present.
          train: enables dropout and modality dropout (rng stream "dropout").

        Returns:
          (B,) float32 logits.
        """
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if tokens.ndim != 3 or jnp.shape(mask) != tokens.shape[:2]:
            raise ValueError(
                f"Fusion takes tokens (B, T, D) and a mask (B, T); got tokens {tokens.shape} "
                f"and mask {jnp.shape(mask)}."
            )
        mask = jnp.asarray(mask, bool)  # (B, T)
        if train and cfg.modality_dropout > 0 and self.num_item_tokens > 1:
            mask = modality_dropout(
                self.make_rng("dropout"), mask, self.num_item_tokens, cfg.modality_dropout
            )
        num_tokens, width = tokens.shape[1:]
        types = self.param(
            "type_embedding", nn.initializers.normal(0.02), (num_tokens, width), self.param_dtype
        )  # (T, D)
        x = tokens.astype(self.dtype) + types.astype(self.dtype)  # (B, T, D)
        for i in range(cfg.num_layers):
            x = FusionLayer(cfg.num_heads, cfg.mlp_dim, cfg.dropout, name=f"layer{i}", **kw)(
                x, mask, train
            )
        x = nn.LayerNorm(name="final_norm", **kw)(x)
        pooled = masked_mean(x, mask, axis=1)  # (B, D)
        h = nn.gelu(Dense(cfg.mlp_dim, name="head_hidden", **kw)(pooled), approximate=False)
        # The logit in float32 under any compute dtype: bfloat16 keeps 8 bits of mantissa,
        # and its rounding would tie scores that AUC and the ranking must tell apart.
        out_kw = dict(kw, dtype=jnp.float32)
        logits = Dense(1, name="head_out", **out_kw)(h.astype(jnp.float32))  # (B, 1)
        return logits[:, 0]
