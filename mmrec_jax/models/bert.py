"""BERT in Flax Linen, with Hugging Face's Flax parameter layout.

The parameter tree matches the one `transformers`' (4.x) `FlaxBertModel` used, so
checkpoints map onto it by name (see `bert_weights.py`):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer/{i}/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer/{i}/attention/output/{dense/{kernel,bias},LayerNorm/{scale,bias}}
    encoder/layer/{i}/intermediate/dense/{kernel,bias}
    encoder/layer/{i}/output/{dense/{kernel,bias},LayerNorm/{scale,bias}}
    pooler/dense/{kernel,bias}

`dtype` is the compute dtype and `param_dtype` the parameters' dtype, so bfloat16
compute over float32 parameters works. Attention goes through
`jax.nn.dot_product_attention`, which lets XLA pick fused kernels on GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import schema
from mmrec_jax.models.layers import Dense, Dropout, check_has_params, input_dtype


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x), spelled with `erf` as PyTorch and `transformers` do.

    Equal to `jax.nn.gelu(x, approximate=False)` to about 1e-6, whose `erfc` form XLA
    evaluates with an exponential and several selects per element; `erf` is one
    polynomial, which made a MiniLM training step about 2% faster on CPU.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


# config.json activations we implement: name -> function.
_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture of a BERT, read from a Hugging Face `config.json`.

    `has_pooler` is not a `config.json` field: it says whether the checkpoint holds
    pooler weights (models saved from a masked-LM head often do not). Without them
    the module has no pooler and returns `None` as the pooled output.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    has_pooler: bool = True

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BERT config hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BERT config hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_dict(cls, config: dict, has_pooler: bool = True) -> BertConfig:
        """Builds the config from a `config.json` dict; unknown keys are ignored.

        Raises:
          ValueError: the config describes a model this BERT does not implement
            (another model type, relative position embeddings, a decoder, an unknown
            activation).
        """
        model_type = config.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(
                f"config.json has model_type={model_type!r}; this text tower implements "
                "BERT (model_type 'bert') only. Models such as RoBERTa, XLM-RoBERTa or "
                "CamemBERT store weights under BERT's names but number positions and mask "
                "padding differently, so they would load and give wrong outputs. Choose a "
                "BERT checkpoint (e.g. sentence-transformers/all-MiniLM-L6-v2)."
            )
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"BERT config position_embedding_type={position_type!r} is not supported; "
                "only 'absolute' position embeddings are implemented."
            )
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("BERT config describes a decoder; only the encoder is implemented.")
        names = {f.name for f in dataclasses.fields(cls)} - {"has_pooler"}
        kwargs = {k: config[k] for k in names if config.get(k) is not None}
        return cls(**kwargs, has_pooler=has_pooler)

    def to_dict(self) -> dict:
        """The `config.json` dict `transformers.BertModel.from_pretrained` reads."""
        config = dataclasses.asdict(self)
        del config["has_pooler"]
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "position_embedding_type": "absolute",
            **config,
        }


def load_bert_config(name_or_path: str | os.PathLike) -> BertConfig:
    """Reads the `BertConfig` of a hub id or a local folder.

    Whether the checkpoint has pooler weights is read from its weight index (key names
    only, no weights loaded).

    Args:
      name_or_path: a hub id (resolved by `mmrec_jax.hub.resolve_pretrained`) or a folder
        holding `config.json`.
    """
    from mmrec_jax.hub import resolve_pretrained
    from mmrec_jax.models.bert_weights import checkpoint_has_pooler

    folder = resolve_pretrained(name_or_path)
    config = json.loads((Path(folder) / "config.json").read_text())
    return BertConfig.from_dict(config, has_pooler=checkpoint_has_pooler(folder))


def small_table_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` for a table of a few rows, as a select per row and a sum.

    Its gradient is a masked reduction per row. A gather's gradient is a scatter-add
    whose updates all land on the same few rows (every token of a single-segment text
    has segment 0), which a GPU serializes: on an H200 the token-type gradient of 32768
    tokens took 110 ms as a scatter-add, 70% of the GPU time of a BERT-base training step.

    Args:
      table: (V, H) rows, V small (BERT's segment types: 2).
      ids: int (...) row indices in [0, V).

    Returns:
      (..., H) the rows of `ids`.
    """
    rows = jnp.arange(table.shape[0])
    picked = jnp.where((ids[..., None] == rows)[..., None], table, 0)  # (..., V, H)
    return picked.sum(axis=-2)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    The embeddings are looked up and summed in the parameter dtype and cast to the
    compute dtype after: the word embeddings' gradient is then a scatter-add in the
    parameter dtype (float32), which a GPU adds with native atomics, and the tables are
    never cast whole. Token types are looked up by `small_table_rows`.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num, name):
            return nn.Embed(
                num,
                cfg.hidden_size,
                embedding_init=init,
                dtype=self.param_dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        length = input_ids.shape[1]
        positions = jnp.arange(length)[None, :]  # (1, L)
        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)  # (B, L, H)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
        token_types = embed(cfg.type_vocab_size, "token_type_embeddings").embedding  # (T, H)
        x = (x + small_table_rows(token_types, token_type_ids)).astype(self.dtype)
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            name="LayerNorm",
        )(x)  # fmt: skip
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def _dense(config: BertConfig, features: int, dtype, param_dtype, name: str) -> Dense:
    return Dense(
        features,
        kernel_init=nn.initializers.normal(config.initializer_range),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BertSelfAttention(nn.Module):
    """Multi-head self-attention over the unmasked keys: query/key/value projections.

    With `num_queries` Q, only the first Q positions attend (their outputs are the
    only ones returned); every position still serves as a key and a value.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, num_queries: int | None = None):
        cfg = self.config
        batch, length, hidden = x.shape
        heads = cfg.num_attention_heads
        head_dim = hidden // heads
        queries = length if num_queries is None else num_queries

        def project(name, inputs):  # (B, L or Q, N, Dh)
            y = _dense(cfg, hidden, self.dtype, self.param_dtype, name)(inputs)
            return y.reshape(batch, inputs.shape[1], heads, head_dim)

        q = project("query", x[:, :queries])
        k, v = project("key", x), project("value", x)
        mask = mask[:, None, None, :]  # (B, 1, 1, L): which keys each query may see
        rate = cfg.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # (B, Q, N, Dh)
        else:
            # dot_product_attention has no dropout on the attention probabilities, so
            # training with attention dropout spells the same math out.
            logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(head_dim)
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
            probs = Dropout(rate)(probs, deterministic=False)  # (B, N, Q, L)
            out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        return out.reshape(batch, queries, hidden)  # (B, Q, H)


class BertDenseLayerNorm(nn.Module):
    """Dense, dropout, residual and LayerNorm: BERT's attention and layer outputs."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, self.dtype, self.param_dtype, "dense")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return nn.LayerNorm(
            epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            name="LayerNorm",
        )(x + residual)  # fmt: skip


class BertAttention(nn.Module):
    """Self-attention followed by its output projection and LayerNorm."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, num_queries: int | None = None):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        y = BertSelfAttention(**kw, name="self")(x, mask, deterministic, num_queries)
        residual = x if num_queries is None else x[:, :num_queries]
        return BertDenseLayerNorm(**kw, name="output")(y, residual, deterministic)


class BertIntermediate(nn.Module):
    """The feed-forward block's expansion and activation."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _dense(cfg, cfg.intermediate_size, self.dtype, self.param_dtype, "dense")(x)
        return _ACTIVATIONS[cfg.hidden_act](x)


class BertLayer(nn.Module):
    """One encoder layer: attention, then the feed-forward block.

    With `num_queries` Q it computes the outputs of the first Q positions only, (B, Q, H).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, num_queries: int | None = None):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(**kw, name="attention")(x, mask, deterministic, num_queries)
        y = BertIntermediate(**kw, name="intermediate")(x)
        return BertDenseLayerNorm(**kw, name="output")(y, x, deterministic)


class BertLayers(nn.Module):
    """The stack of encoder layers, named "0".."N-1" (the `encoder/layer` scope).

    With `trainable_top_n`, the hidden state entering the top N layers goes through
    `jax.lax.stop_gradient`: everything below gets exactly-zero gradients and its
    backward pass is never computed. With `first_token_only`, the last layer computes
    the first position's output only (it still attends over every position).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    trainable_top_n: int | None = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        num_layers = self.config.num_hidden_layers
        first_trained = None if self.trainable_top_n is None else num_layers - self.trainable_top_n
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(num_layers):
            if i == first_trained:
                x = jax.lax.stop_gradient(x)
            queries = 1 if self.first_token_only and i == num_layers - 1 else None
            x = BertLayer(**kw, name=str(i))(x, mask, deterministic, queries)
        if first_trained == num_layers:
            x = jax.lax.stop_gradient(x)
        return x


class BertEncoder(nn.Module):
    """The `encoder` scope holding the layer stack."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    trainable_top_n: int | None = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        return BertLayers(
            self.config,
            self.dtype,
            self.param_dtype,
            self.trainable_top_n,
            self.first_token_only,
            name="layer",
        )(x, mask, deterministic)


class BertPooler(nn.Module):
    """tanh(Dense(first token's hidden state))."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return jnp.tanh(_dense(cfg, cfg.hidden_size, self.dtype, self.param_dtype, "dense")(x))


class Bert(nn.Module):
    """A BERT encoder with Hugging Face's Flax parameter layout.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. bfloat16 on GPU/TPU).
      param_dtype: parameter dtype.
      trainable_top_n: None trains everything; N in [0, num_hidden_layers] stops the
        gradient below the top N encoder layers (the embeddings are then never trained).
      first_token_only: compute the last layer's output for the first token only, for
        callers that read nothing else (CLS or pooler pooling): the same first-token
        vector and pooled output, without the last layer's work for the other tokens
        (about 1/7 of a 6-layer BERT's FLOPs). last_hidden_state is then (B, 1, H).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    trainable_top_n: int | None = None
    first_token_only: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encodes token ids.

        Args:
          input_ids: int (B, L) token ids.
          attention_mask: (B, L), 1 (or True) for real tokens, 0 for padding; None means
            every token is real.
          token_type_ids: int (B, L) segment ids; None means all zeros.
          deterministic: False applies the config's dropout (needs a "dropout" rng).

        Returns:
          last_hidden_state (B, L, H) in `dtype` ((B, 1, H) with `first_token_only`),
          and the pooled output (B, H) (None when `config.has_pooler` is False).
        """
        cfg = self.config
        check_has_params(self, "BERT")
        dtype = input_dtype(input_ids)  # as passed: jnp.asarray would turn float64 into float32
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"BERT input_ids must be integer token ids; got {dtype}. Tokenize "
                "the texts with this model's tokenizer."
            )
        input_ids = jnp.asarray(input_ids)
        attention_mask = (
            jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        )
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"BERT input_ids must be (B, L) with an attention_mask of the same shape; got "
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape}."
            )
        if input_ids.shape[1] == 0:
            raise ValueError(
                "BERT input_ids have no tokens (L=0); tokenize every text, the empty one "
                "included, to at least [CLS] and [SEP]."
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"BERT input has {input_ids.shape[1]} tokens; this model takes at most "
                f"max_position_embeddings={cfg.max_position_embeddings}. Truncate the texts."
            )
        top_n = self.trainable_top_n
        if top_n is not None and not 0 <= top_n <= cfg.num_hidden_layers:
            raise ValueError(
                f"trainable_top_n={top_n} must lie in [0, {cfg.num_hidden_layers}] "
                "(the number of encoder layers)."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif jnp.shape(token_type_ids) != input_ids.shape:
            raise ValueError(
                f"BERT token_type_ids must have input_ids' shape {input_ids.shape}; got "
                f"{jnp.shape(token_type_ids)}. Pass None for single-segment texts."
            )
        # Out-of-range ids would read NaN embeddings; checked when the values are concrete.
        schema.check_index_range(
            "BERT input_ids",
            input_ids,
            cfg.vocab_size,
            "tokenize with this model's own tokenizer (its vocab.txt).",
        )
        schema.check_index_range(
            "BERT token_type_ids",
            token_type_ids,
            cfg.type_vocab_size,
            f"this model has {cfg.type_vocab_size} segment types.",
        )
        mask_values = schema.concrete_values(attention_mask)
        if mask_values is not None and not np.isin(mask_values, (0, 1)).all():
            odd = mask_values[~np.isin(mask_values, (0, 1))].flat[0]
            raise ValueError(
                f"BERT attention_mask holds {odd.item()!r}; it must be 1 (or True) for real tokens "
                "and 0 for padding. An additive mask (0 for real tokens, a large negative "
                "number for padding) would be read the wrong way round: pass the tokenizer's "
                "attention_mask."
            )
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertEmbeddings(**kw, name="embeddings")(input_ids, token_type_ids, deterministic)
        mask = jnp.asarray(attention_mask).astype(bool)  # (B, L)
        x = BertEncoder(
            **kw, trainable_top_n=top_n, first_token_only=self.first_token_only, name="encoder"
        )(x, mask, deterministic)  # (B, L, H), or (B, 1, H)
        pooled = BertPooler(**kw, name="pooler")(x[:, 0]) if cfg.has_pooler else None
        return x, pooled
