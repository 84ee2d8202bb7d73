"""The recommender's text tower: a BERT item embedding projected to the fusion width.

Three modes (config.model.text.mode):

- `frozen`: BERT never trains. Its pooled output is computed once per item
  (`mmrec_jax.data.text_cache`) and arrives as `items["text_embedding"]`; the tower
  holds only the projection, no BERT parameters.
- `finetune`: BERT runs on `items["text_ids"]` / `items["text_mask"]` and every layer
  trains.
- `finetune_top_n`: as `finetune`, but the gradient stops below the top `top_n`
  encoder layers; `frozen_text_param` tells the optimizer which parameters those are.

The BERT submodule is named "bert", so its parameters live at
`params[<tower name>]["bert"]` in the layout of `mmrec_jax.models.bert`, ready to be
replaced by `load_pretrained`'s parameters. Items without text (`has_text` False) are
masked downstream by the fusion, not here, except that in the trained modes a large
block is encoded in chunks and a chunk without any text is skipped (`schema.BLOCK_CHUNKS`,
`layers.apply_in_chunks`): its items get zeros, as the fusion ignores them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmrec_jax import schema
from mmrec_jax.config import ConfigError
from mmrec_jax.models.bert import Bert, BertConfig, load_bert_config
from mmrec_jax.models.layers import Dense, apply_in_chunks, input_dtype

# Pooling choices of config.model.text.pooling.
POOLINGS = ("cls", "mean", "pooler")
# Training modes of config.model.text.mode.
MODES = ("frozen", "finetune", "finetune_top_n")


def pool(hidden: jax.Array, mask: jax.Array, pooled: jax.Array | None, pooling: str) -> jax.Array:
    """Pools BERT's output into one vector per text.

    Args:
      hidden: (N, L, H) last hidden state ((N, 1, H), the first token's, suffices for
        "cls" and "pooler").
      mask: (N, L) 1 for real tokens.
      pooled: (N, H) BERT's pooler output, or None if the model has no pooler.
      pooling: "cls" (first token), "mean" (mean over real tokens; 0 for a text with
        none) or "pooler" (BERT's pooler output).

    Returns:
      (N, H) in hidden's dtype.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]  # (N, L, 1)
        total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)  # (N, H)
        count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # (N, 1)
        return (total / count).astype(hidden.dtype)
    if pooling == "pooler":
        check_pooler(pooling, has_pooler=pooled is not None)
        return pooled
    raise ValueError(f"config.model.text.pooling={pooling!r}; choose one of {POOLINGS}.")


def check_pooler(pooling: str, has_pooler: bool) -> None:
    """Raises ConfigError for pooling "pooler" with a BERT checkpoint that has no pooler."""
    if pooling == "pooler" and not has_pooler:
        raise ConfigError(
            "config.model.text.pooling='pooler' but the checkpoint has no pooler weights; "
            "use pooling 'cls' or 'mean'."
        )


def check_text_config(
    text_config: ml_collections.ConfigDict, bert_config: BertConfig | None = None
) -> None:
    """Raises ConfigError for a text mode, pooling or top_n the tower cannot use.

    Args:
      text_config: config.model.text.
      bert_config: the BERT's architecture: with it, top_n must not exceed its encoder
        layers, and pooling "pooler" needs its pooler.
    """
    num_layers = None if bert_config is None else bert_config.num_hidden_layers
    _check_text_config(text_config, num_layers)
    if bert_config is not None:
        check_pooler(text_config.pooling, bert_config.has_pooler)


def _check_text_config(text_config: ml_collections.ConfigDict, num_layers: int | None) -> None:
    if text_config.mode not in MODES:
        raise ConfigError(f"config.model.text.mode={text_config.mode!r}; choose one of {MODES}.")
    if text_config.pooling not in POOLINGS:
        raise ConfigError(
            f"config.model.text.pooling={text_config.pooling!r}; choose one of {POOLINGS}."
        )
    if text_config.mode == "finetune_top_n" and num_layers is not None:
        if not 1 <= text_config.top_n <= num_layers:
            raise ConfigError(
                f"config.model.text.top_n={text_config.top_n} must lie in [1, {num_layers}] "
                "(the BERT's number of encoder layers) for mode 'finetune_top_n'."
            )


def frozen_text_param(
    path: tuple[str, ...], text_config: ml_collections.ConfigDict, num_layers: int
) -> bool:
    """Whether a BERT parameter is frozen (gets no update and no weight decay).

    Args:
      path: the parameter's path inside the BERT params tree, e.g.
        ("encoder", "layer", "3", "attention", "self", "query", "kernel").
      text_config: config.model.text (mode, top_n, pooling).
      num_layers: the BERT's number of encoder layers.

    Returns:
      True in `frozen` mode; in `finetune_top_n` for the embeddings and the encoder
      layers below the top `top_n`. The pooler is trained only when pooling is
      "pooler" (otherwise the output never depends on it).
    """
    _check_text_config(text_config, num_layers)
    if text_config.mode == "frozen":
        return True
    if path[0] == "pooler":
        return text_config.pooling != "pooler"
    if text_config.mode == "finetune":
        return False
    if path[0] == "embeddings":
        return True
    if path[:2] == ("encoder", "layer"):
        return int(path[2]) < num_layers - text_config.top_n
    raise ValueError(f"Unknown BERT parameter path {'/'.join(path)}.")


def cached_text_dim(model_config: ml_collections.ConfigDict) -> int | None:
    """Dt, the width of the cached text embeddings a frozen text tower reads.

    BERT's hidden size (read from the text model's `config.json`, no weights), or None
    when the text tower is off or runs BERT itself.
    """
    if "text" not in schema.parse_towers(model_config.towers):
        return None
    if schema.text_is_trained(model_config.text.mode):
        return None
    return load_bert_config(model_config.text.model).hidden_size


class TextTower(nn.Module):
    """Item text -> (U, width) fusion token.

    Attributes:
      config: config.model.text (model, mode, top_n, pooling).
      width: the fusion width (output size).
      bert_config: the BERT architecture; required unless mode is "frozen".
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    config: ml_collections.ConfigDict
    width: int
    bert_config: BertConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __call__(self, items: dict, train: bool = False) -> jax.Array:
        """Embeds the item block's texts; a large block in chunks (`layers.apply_in_chunks`).

        Args:
          items: the item block (see `mmrec_jax.schema`): `text_embedding` (U, Dt) in
            frozen mode, else `text_ids` and `text_mask` (U, L), and optionally
            `has_text` (U,): a large block's chunks without text are then skipped and
            their items get zeros.
          train: applies BERT's dropout (needs a "dropout" rng) in the trained modes.

        Returns:
          (U, width) in `dtype`.
        """
        cfg = self.config
        check_text_config(cfg, self.bert_config)
        if cfg.mode == "frozen":
            if "text_embedding" not in items:
                raise ValueError(
                    "TextTower in mode 'frozen' needs items['text_embedding'] (U, Dt), the "
                    "cached BERT embeddings (mmrec_jax.data.text_cache.text_embeddings)."
                )
            return self.encode({"text_embedding": items["text_embedding"]})
        if self.bert_config is None:
            raise ValueError(
                f"TextTower in mode {cfg.mode!r} needs bert_config "
                "(mmrec_jax.models.bert.load_bert_config(config.model.text.model))."
            )
        if "text_ids" not in items or "text_mask" not in items:
            raise ValueError(
                f"TextTower in mode {cfg.mode!r} needs items['text_ids'] and "
                "items['text_mask'] (U, L) int32 token ids and mask."
            )
        text = {"text_ids": items["text_ids"], "text_mask": items["text_mask"]}
        return apply_in_chunks(
            self,
            "encode",
            text,
            items.get("has_text"),
            dropout=train,
            unroll=False,  # one BERT to compile, not one per chunk
            deterministic=not train,
        )

    @nn.compact
    def encode(self, text: dict, deterministic: bool = True) -> jax.Array:
        """Texts -> (U, width), in one go.

        Args:
          text: `text_embedding` (U, Dt) in frozen mode, else `text_ids` and `text_mask`
            (U, L).
          deterministic: no dropout in BERT (else it needs a "dropout" rng).
        """
        cfg = self.config
        if cfg.mode == "frozen":
            passed = input_dtype(text["text_embedding"])
            x = jnp.asarray(text["text_embedding"])  # (U, Dt)
            if x.ndim != 2 or not jnp.issubdtype(passed, jnp.floating):
                raise schema.BatchError(
                    f"items['text_embedding'] must be float (U, Dt), one pooled BERT vector "
                    f"per item; got {passed} {x.shape}."
                )
            x = x.astype(self.dtype)
            if self.has_variable("params", "proj"):
                trained_on = self.variables["params"]["proj"]["kernel"].shape[0]
                if x.shape[-1] != trained_on:
                    raise schema.BatchError(
                        f"items['text_embedding'] is {x.shape[-1]} wide but these parameters "
                        f"read {trained_on}-wide embeddings; compute the text cache with the "
                        f"text model they were trained with (config.model.text.model)."
                    )
        else:
            bert = Bert(
                self.bert_config,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                trainable_top_n=cfg.top_n if cfg.mode == "finetune_top_n" else None,
                # CLS and pooler pooling read only the first token's last hidden state.
                first_token_only=cfg.pooling in ("cls", "pooler"),
                name="bert",
            )
            ids, mask = text["text_ids"], text["text_mask"]  # (U, L)
            hidden, pooled = bert(ids, mask, deterministic=deterministic)
            x = pool(hidden, mask, pooled, cfg.pooling)  # (U, H)
        x = Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
