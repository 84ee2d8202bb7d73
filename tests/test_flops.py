"""The analytic FLOP count against the multiplies JAX actually traces.

An independent count: walk the jaxpr of the model's forward pass and of its training
gradient, and add up every `dot_general` and convolution from its operand shapes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import flops as flops_lib
from mmrec_jax.models import layers
from mmrec_jax.models.bert import BertConfig
from mmrec_jax.models.recommender import Recommender
from tests.test_recommender import init_key, tiny_config

B, U, H, L, DT = 4, 6, 3, 5, 6
BERT = BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _jaxpr_flops(jaxpr) -> float:
    """2 * multiply-adds of every dot_general and convolution, nested jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            inner = np.prod([lhs[d] for d in contract])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * inner
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            groups = eqn.params["feature_group_count"] * eqn.params["batch_group_count"]
            per_output = np.prod(rhs) / out_features / groups * eqn.params["batch_group_count"]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeat * _jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * _jaxpr_flops(sub)
    return total


def _batch(config, text_mode):
    rng = np.random.default_rng(0)
    items = {
        "item_id": rng.integers(1, 9, U).astype(np.int32),
        "item_index": np.arange(U, dtype=np.int32),
        "image": rng.integers(0, 256, (U, 8, 8, 3)).astype(np.uint8),
        "audio": rng.uniform(-1, 1, (U, config.audio.clip_samples)).astype(np.float32),
        "has_text": np.ones(U, bool),
        "has_image": np.ones(U, bool),
        "has_audio": np.ones(U, bool),
    }
    if text_mode == "frozen":
        items["text_embedding"] = rng.standard_normal((U, DT)).astype(np.float32)
    else:
        items["text_ids"] = rng.integers(1, BERT.vocab_size, (U, L)).astype(np.int32)
        items["text_mask"] = np.ones((U, L), np.int32)
    return {
        "user_id": rng.integers(1, 6, B).astype(np.int32),
        "user_index": np.arange(B, dtype=np.int32),
        "item_slot": np.arange(B, dtype=np.int32),
        "history_slot": rng.integers(0, U, (B, H)).astype(np.int32),
        "history_mask": np.ones((B, H), bool),
        "label": np.ones(B, np.float32),
        "weight": np.ones(B, np.float32),
        "items": items,
    }


@pytest.mark.parametrize(
    "text_mode,frontend,top_n,pooling",
    [
        ("frozen", "logmel", 0, "pooler"),
        ("finetune", "raw", 0, "pooler"),
        ("finetune_top_n", "raw", 2, "cls"),
        ("finetune", "raw", 0, "mean"),
    ],
)
def test_count_matches_traced_multiplies(monkeypatch, text_mode, frontend, top_n, pooling):
    # The count is of matrix products: the CPU's broadcast attention computes the same
    # products as elementwise multiplies and sums, which the trace would not count.
    monkeypatch.setattr(layers, "BROADCAST_ATTENTION_MAX_KEYS", 0)
    config = tiny_config(text_mode=text_mode)
    config.text.pooling = pooling
    config.text.top_n = top_n
    config.audio.frontend = frontend
    # A BERT without a pooler unless it is used, so that every traced multiply is used.
    bert = dataclasses.replace(BERT, has_pooler=pooling == "pooler")
    model = Recommender(config, None if text_mode == "frozen" else bert)
    batch = _batch(config, text_mode)
    params = jax.eval_shape(model.init, init_key(), batch)["params"]

    def forward(params):
        return model.apply({"params": params}, batch)

    def loss(params):
        return jnp.sum(forward(params))

    shape = flops_lib.BatchShape(rows=B, items=U, text_len=L, history_len=H, text_dim=DT)
    counted = flops_lib.count_flops(config, shape, bert)
    traced_forward = _jaxpr_flops(jax.make_jaxpr(forward)(params).jaxpr)
    traced_train = _jaxpr_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert counted["forward"]["total"] == pytest.approx(traced_forward, rel=1e-9)
    assert counted["train"]["total"] == pytest.approx(traced_train, rel=1e-9)
    assert counted["train"]["total"] > 2 * counted["forward"]["total"]


def test_count_needs_bert_config_when_bert_runs():
    config = tiny_config(text_mode="finetune")
    with pytest.raises(ValueError, match="bert_config"):
        flops_lib.count_flops(config, flops_lib.BatchShape(rows=B, items=U, text_len=L))
