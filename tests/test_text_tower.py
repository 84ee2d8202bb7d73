"""The text tower: pooling, the three training modes and which parameters they train."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmrec_jax import schema, sharding
from mmrec_jax.models import text as text_lib
from mmrec_jax.models.bert import BertConfig
from mmrec_jax.models.text import TextTower, frozen_text_param, pool

BERT = BertConfig(
    vocab_size=30,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
WIDTH = 8


def _text_config(mode: str, pooling: str = "mean", top_n: int = 1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"model": "tiny", "mode": mode, "top_n": top_n, "pooling": pooling}
    )


def _items(num: int = 4, length: int = 6) -> dict:
    rng = np.random.default_rng(0)
    mask = (np.arange(length)[None, :] < np.array([6, 3, 1, 4])[:num, None]).astype(np.int32)
    ids = rng.integers(1, BERT.vocab_size, size=(num, length)).astype(np.int32) * mask
    return {"text_ids": ids, "text_mask": mask, "has_text": np.ones(num, bool)}


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_pool_matches_numpy(pooling):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(4, 5, 3)).astype(np.float32)
    pooled = rng.normal(size=(4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), jnp.asarray(pooled), pooling))
    if pooling == "cls":
        want = hidden[:, 0]
    elif pooling == "pooler":
        want = pooled
    else:
        want = np.zeros((4, 3), np.float32)
        for row in range(4):
            real = hidden[row][mask[row] == 1]
            if len(real):
                want[row] = real.mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pool_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        pool(jnp.zeros((1, 2, 3)), jnp.ones((1, 2)), None, "max")
    with pytest.raises(ValueError, match="no pooler"):
        pool(jnp.zeros((1, 2, 3)), jnp.ones((1, 2)), None, "pooler")


def test_frozen_mode_has_no_bert_params():
    tower = TextTower(_text_config("frozen"), WIDTH)
    items = {"text_embedding": np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)}
    params = tower.init(jax.random.key(0), items)["params"]
    assert set(params) == {"proj", "norm"}
    assert params["proj"]["kernel"].shape == (12, WIDTH)
    assert tower.apply({"params": params}, items).shape == (5, WIDTH)
    with pytest.raises(ValueError, match="text_embedding"):
        tower.apply({"params": params}, _items())


def _grad_fn(mode: str, pooling: str, top_n: int = 1):
    """The tower's parameters and the gradient function of a loss over its output."""
    tower = TextTower(_text_config(mode, pooling, top_n), WIDTH, BERT)
    items = _items()
    params = tower.init(jax.random.key(0), items)["params"]
    target = jax.random.normal(jax.random.key(1), (4, WIDTH))

    def loss(params):
        return jnp.sum(tower.apply({"params": params}, items, train=True) * target)

    return params, jax.grad(loss)


@pytest.mark.parametrize(
    "mode,pooling,top_n",
    [("finetune_top_n", "mean", 1), ("finetune_top_n", "pooler", 2), ("finetune", "cls", 1)],
)
def test_gradients_are_exactly_zero_where_frozen(mode, pooling, top_n):
    params, grad_fn = _grad_fn(mode, pooling, top_n)
    grads = flax.traverse_util.flatten_dict(jax.jit(grad_fn)(params)["bert"])
    config = _text_config(mode, pooling, top_n)
    assert any(path[0] == "embeddings" for path in grads) and ("pooler", "dense", "kernel") in grads
    for path, grad in grads.items():
        frozen = frozen_text_param(path, config, BERT.num_hidden_layers)
        if frozen:
            assert not np.any(np.asarray(grad)), path
        elif path[-2:] != ("key", "bias"):  # softmax ignores a bias shared by all keys
            assert np.any(np.asarray(grad) != 0), path
    layers_trained = {
        p[2] for p in grads if p[0] == "encoder" and not frozen_text_param(p, config, 3)
    }
    want = {str(i) for i in range(3 - top_n, 3)} if mode == "finetune_top_n" else {"0", "1", "2"}
    assert layers_trained == want


def test_frozen_layers_backward_is_not_computed():
    def matmuls(mode):
        params, grad_fn = _grad_fn(mode, "mean", top_n=1)
        return str(jax.make_jaxpr(grad_fn)(params)).count("dot_general")

    # Forward and backward of 3 layers vs forward of 3 and backward of the top one only.
    assert matmuls("finetune_top_n") < matmuls("finetune")


def test_frozen_text_param_table():
    config = _text_config("finetune_top_n", "cls", top_n=2)
    frozen = lambda *path: frozen_text_param(path, config, 4)  # noqa: E731
    assert frozen("embeddings", "word_embeddings", "embedding")
    assert frozen("encoder", "layer", "1", "output", "dense", "kernel")
    assert not frozen("encoder", "layer", "2", "output", "dense", "kernel")
    assert frozen("pooler", "dense", "kernel")
    assert frozen_text_param(("embeddings", "LayerNorm", "scale"), _text_config("frozen"), 4)
    with pytest.raises(ValueError, match="top_n"):
        frozen_text_param(("pooler",), _text_config("finetune_top_n", top_n=5), 4)


def test_trained_modes_need_bert_config_and_tokens():
    with pytest.raises(ValueError, match="bert_config"):
        TextTower(_text_config("finetune"), WIDTH).init(jax.random.key(0), _items())
    with pytest.raises(ValueError, match="text_ids"):
        tower = TextTower(_text_config("finetune"), WIDTH, BERT)
        tower.init(jax.random.key(0), {"text_embedding": np.zeros((2, 16), np.float32)})
    with pytest.raises(ValueError, match=r"no tokens \(L=0\)"):
        tower.init(
            jax.random.key(0),
            {"text_ids": np.zeros((2, 0), np.int32)} | {"text_mask": np.zeros((2, 0), np.int32)},
        )


@pytest.mark.parametrize(
    "embedding,found",
    [(np.zeros(16, np.float32), "float32 (16,)"), (np.zeros((2, 16), np.int64), "int64 (2, 16)")],
)
def test_frozen_mode_needs_float_embeddings_one_per_item(embedding, found):
    tower = TextTower(_text_config("frozen"), WIDTH)
    with pytest.raises(schema.BatchError, match=r"must be float \(U, Dt\)") as error:
        tower.init(jax.random.key(0), {"text_embedding": embedding})
    assert str(error.value).endswith(f"got {found}."), error.value  # as passed


def _large_block(filled: int) -> dict:
    """A block just large enough for chunks; its first `filled` positions hold text."""
    slots = schema.BLOCK_CHUNKS * schema.MIN_CHUNK_ITEMS
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 7, slots)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, BERT.vocab_size, size=(slots, 6)).astype(np.int32) * mask
    has_text = np.zeros(slots, bool)
    has_text[schema.slot_order(slots)[:filled]] = True
    return {"text_ids": ids, "text_mask": mask, "has_text": has_text}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 items, so that a block of 32 is encoded in 8 chunks (fast to test)."""
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 4)
    assert schema.block_chunks(31) == schema.block_chunks(28) == 1  # not a multiple; too small
    assert schema.block_chunks(32) == schema.BLOCK_CHUNKS == 8


def test_a_large_block_in_chunks_matches_one_go_and_skips_chunks_without_text(
    small_chunks, monkeypatch
):
    items = _large_block(filled=3 * 4 - 1)  # 3 of the 8 chunks hold text
    slots = items["has_text"].shape[0]
    tower = TextTower(_text_config("finetune_top_n", "mean", top_n=2), WIDTH, BERT)
    params = tower.init(jax.random.key(0), items)["params"]
    target = jax.random.normal(jax.random.key(1), (slots, WIDTH))
    has_text = items["has_text"][:, None]

    def loss(params):  # what the model reads: the outputs of items with text
        return jnp.sum(jnp.where(has_text, tower.apply({"params": params}, items), 0) * target)

    def outputs_and_grads():
        out, grads = jax.jit(lambda p: (tower.apply({"params": p}, items), jax.grad(loss)(p)))(
            params
        )
        return np.asarray(out), jax.tree.map(np.asarray, grads)

    # Count BERT runs (each pools its output once): once per chunk encoded, never for a
    # chunk without text.
    runs = []

    def counted_pool(*args):
        jax.debug.callback(lambda: runs.append(1))
        return pool(*args)

    monkeypatch.setattr(text_lib, "pool", counted_pool)
    chunked, chunked_grads = jax.block_until_ready(outputs_and_grads())
    assert len(runs) == 3 + 3  # the forward pass of the outputs and of the gradient
    monkeypatch.setattr(text_lib, "pool", pool)
    # The block sharded over the 8 devices, as a train step shards it: the same outputs.
    placed = jax.device_put(items, sharding.data_sharding(sharding.make_mesh()))
    sharded = np.asarray(jax.jit(lambda i: tower.apply({"params": params}, i))(placed))
    monkeypatch.setattr(schema, "block_chunks", lambda slots: 1)
    whole, whole_grads = outputs_and_grads()
    np.testing.assert_allclose(chunked[has_text[:, 0]], whole[has_text[:, 0]], atol=2e-6)
    np.testing.assert_allclose(sharded[has_text[:, 0]], whole[has_text[:, 0]], atol=2e-6)
    flat, flat_whole = (flax.traverse_util.flatten_dict(g) for g in (chunked_grads, whole_grads))
    for path, grad in flat.items():
        np.testing.assert_allclose(grad, flat_whole[path], rtol=1e-4, atol=1e-5, err_msg=path)
    assert any(np.any(g != 0) for p, g in flat.items() if p[0] == "bert")


def test_chunked_dropout_is_reproducible_and_varies_with_the_key(small_chunks):
    config = dataclasses.replace(BERT, hidden_dropout_prob=0.3)
    items = _large_block(filled=2 * 4)
    tower = TextTower(_text_config("finetune", "mean"), WIDTH, config)
    params = tower.init(jax.random.key(0), items)["params"]

    @jax.jit
    def run(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return tower.apply({"params": params}, items, train=True, rngs=rngs)

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    # Without has_text flags every chunk is encoded, as with every flag set.
    unflagged = {k: v for k, v in items.items() if k != "has_text"}
    flagged = dict(unflagged, has_text=np.ones_like(items["has_text"]))
    apply = jax.jit(lambda i: tower.apply({"params": params}, i))
    np.testing.assert_allclose(apply(unflagged), apply(flagged), atol=1e-6)
