"""Our Flax BERT against transformers' PyTorch BertModel, and checkpoint loading/saving."""

from __future__ import annotations

import json
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from _tiny_bert import WORDS, make_tiny_bert, torch_outputs, write_tiny_tokenizer
from safetensors.numpy import load_file, save_file

from mmrec_jax.hub import resolve_pretrained
from mmrec_jax.models.bert import Bert, BertConfig, load_bert_config
from mmrec_jax.models.bert_weights import CheckpointError, load_pretrained, save_pretrained

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, PyTorch model) of a tiny random BERT saved by transformers."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    return folder, make_tiny_bert(folder)


def _tiny_batch():
    """Token ids with padding in the batch and both token types."""
    rng = np.random.default_rng(1)
    ids = rng.integers(5, len(WORDS), size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 4:] = 1
    return ids, mask, types


def _assert_parity(bert, params, model, ids, mask, types=None):
    hidden, pooled = bert.apply({"params": params}, ids, mask, types)
    ref_hidden, ref_pooled = torch_outputs(model, ids, mask, types)
    assert hidden.shape == ref_hidden.shape
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=TOL, rtol=0)


def _write_msgpack(state_dict: dict, path) -> None:
    """Writes Hugging Face's Flax layout by hand, independently of our name table."""
    tree = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        array = tensor.numpy()
        *module, leaf = key.split(".")
        if module[-1] == "LayerNorm":
            leaf = {"weight": "scale", "bias": "bias"}[leaf]
        elif module[-1].endswith("_embeddings"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, array = "kernel", array.T
        node = tree
        for part in module:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(array)
    path.write_bytes(flax.serialization.msgpack_serialize(tree))


def _checkpoint_variant(tiny, tmp_path, variant: str):
    """A copy of the tiny checkpoint in another on-disk format."""
    folder, model = tiny
    target = tmp_path / variant
    if variant == "safetensors":
        return folder
    if variant == "sharded":  # transformers writes the shards and the index itself
        model.save_pretrained(str(target), max_shard_size="20KB")
        assert (target / "model.safetensors.index.json").is_file()
        assert not (target / "model.safetensors").exists()
    else:
        target.mkdir()
        state = model.state_dict()
        if variant == "msgpack":
            _write_msgpack(state, target / "flax_model.msgpack")
        else:  # old names: "bert." prefix, LayerNorm gamma/beta, and a pretraining head
            renamed = {}
            for key, tensor in state.items():
                key = "bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma")
                renamed[key.replace("LayerNorm.bias", "LayerNorm.beta")] = tensor.numpy()
            renamed["cls.predictions.bias"] = np.zeros(len(WORDS) + 3, np.float32)
            save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(folder / "config.json", target / "config.json")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(folder / name, target / name)
    return target


@pytest.mark.parametrize("variant", ["safetensors", "sharded", "msgpack", "legacy_names"])
def test_tiny_parity_every_format(tiny, tmp_path, variant):
    folder = _checkpoint_variant(tiny, tmp_path, variant)
    bert, params, tokenizer = load_pretrained(folder)
    assert bert.config.layer_norm_eps == 1e-3
    assert tokenizer.convert_tokens_to_ids("cat") == WORDS.index("cat")
    _assert_parity(bert, params, tiny[1], *_tiny_batch())


def test_minilm_parity_with_padding():
    bert, params, tokenizer = load_pretrained(MINILM)
    model = transformers.BertModel.from_pretrained(str(resolve_pretrained(MINILM))).eval()
    texts = ["a cat video", "rain at night, a long walk home through the quiet city", "jazz"]
    enc = tokenizer(texts, return_tensors="np", padding=True)
    assert enc["attention_mask"].min() == 0  # the batch has padding
    _assert_parity(bert, params, model, enc["input_ids"], enc["attention_mask"])


def test_round_trip_save_load_and_transformers_opens_it(tiny, tmp_path):
    folder, model = tiny
    bert, params, tokenizer = load_pretrained(folder)
    out = save_pretrained(params, bert.config, tmp_path / "saved", tokenizer=tokenizer)
    bert2, params2, tokenizer2 = load_pretrained(out)
    assert bert2.config == bert.config
    flat, flat2 = (flax.traverse_util.flatten_dict(p) for p in (params, params2))
    assert flat.keys() == flat2.keys()
    for path in flat:
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(flat2[path]))
    assert tokenizer2("a cat video")["input_ids"] == tokenizer("a cat video")["input_ids"]
    reopened = transformers.BertModel.from_pretrained(str(out)).eval()
    ids, mask, types = _tiny_batch()
    ref = torch_outputs(model, ids, mask, types)
    got = torch_outputs(reopened, ids, mask, types)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-6, rtol=0)


def _rewrite(tiny, tmp_path, edit):
    """A copy of the tiny checkpoint with its tensors edited by `edit(dict)`."""
    folder, _ = tiny
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_misshaped_weight_names_key_and_both_shapes(tiny, tmp_path):
    key = "encoder.layer.1.intermediate.dense.weight"

    def edit(tensors):
        tensors[key] = np.zeros((40, 32), np.float32)  # the config wants (48, 32)

    with pytest.raises(CheckpointError) as error:
        load_pretrained(_rewrite(tiny, tmp_path, edit))
    message = str(error.value)
    assert key in message and "(40, 32)" in message and "(48, 32)" in message


def test_missing_weight_names_key(tiny, tmp_path):
    key = "encoder.layer.0.attention.self.value.bias"
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_pretrained(_rewrite(tiny, tmp_path, lambda tensors: tensors.pop(key)))


def test_a_roberta_checkpoint_is_refused_not_loaded_with_shifted_positions(tmp_path):
    """RoBERTa saves its weights under BERT's names: only model_type tells them apart."""
    config = transformers.RobertaConfig(
        vocab_size=len(WORDS) + 3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
        pad_token_id=1, type_vocab_size=1,
    )  # fmt: skip
    transformers.RobertaModel(config).save_pretrained(str(tmp_path))
    shutil.copy(tmp_path / "config.json", tmp_path / "roberta.json")
    with pytest.raises(ValueError, match="model_type='roberta'.*BERT"):
        load_pretrained(tmp_path)
    # The same weights under a BERT config.json load: the weights were not the problem.
    bert_config = json.loads((tmp_path / "roberta.json").read_text())
    bert_config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(bert_config))
    write_tiny_tokenizer(tmp_path)
    load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("position_embedding_type", "relative_key", "position_embedding_type"),
        ("is_decoder", True, "decoder"),
    ],
)
def test_configs_this_bert_does_not_implement_are_named(tiny, tmp_path, field, value, needle):
    folder = tmp_path / "bert"
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=needle):
        load_pretrained(folder)


def test_checkpoint_without_pooler_has_no_pooled_output(tmp_path):
    model = make_tiny_bert(tmp_path, pooler=False, seed=3)
    assert not load_bert_config(tmp_path).has_pooler
    bert, params, _ = load_pretrained(tmp_path)
    assert "pooler" not in params
    ids, mask, types = _tiny_batch()
    hidden, pooled = bert.apply({"params": params}, ids, mask, types)
    assert pooled is None
    np.testing.assert_allclose(hidden, torch_outputs(model, ids, mask, types)[0], atol=TOL)
    save_pretrained(params, bert.config, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "bert" and "has_pooler" not in config
    assert not load_bert_config(tmp_path / "saved").has_pooler


def test_bf16_compute_with_f32_params_is_close():
    bert32, params, tokenizer = load_pretrained(MINILM)
    bert16, params16, _ = load_pretrained(MINILM, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    enc = tokenizer(["a cat video", "music for a rainy night"], return_tensors="np", padding=True)
    ref, ref_pooled = bert32.apply({"params": params}, enc["input_ids"], enc["attention_mask"])
    got, got_pooled = bert16.apply({"params": params16}, enc["input_ids"], enc["attention_mask"])
    assert got.dtype == jnp.bfloat16
    mask = enc["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(ref))[mask]
    # bf16 keeps ~3 significant digits; hidden states are O(1) after LayerNorm.
    assert np.median(diff) < 0.05 and diff.max() < 0.5, (np.median(diff), diff.max())
    cosine = np.sum(np.asarray(got_pooled, np.float32) * ref_pooled, -1) / (
        np.linalg.norm(got_pooled.astype(np.float32), axis=-1) * np.linalg.norm(ref_pooled, axis=-1)
    )
    assert cosine.min() > 0.99


def test_dropout_only_when_not_deterministic(tiny):
    folder, _ = tiny
    bert, params, _ = load_pretrained(folder)
    ids, mask, types = _tiny_batch()
    clean, _ = bert.apply({"params": params}, ids, mask, types)
    rngs = {"dropout": jax.random.key(0)}
    noisy = bert.apply({"params": params}, ids, mask, types, deterministic=False, rngs=rngs)[0]
    again = bert.apply({"params": params}, ids, mask, types, deterministic=False, rngs=rngs)[0]
    assert not np.allclose(noisy, clean, atol=1e-3)
    np.testing.assert_array_equal(noisy, again)
    np.testing.assert_allclose(clean, torch_outputs(tiny[1], ids, mask, types)[0], atol=TOL)


def test_bad_token_ids_are_errors_naming_the_input(tiny):
    folder, _ = tiny
    bert, params, _ = load_pretrained(folder)
    ids, mask, types = _tiny_batch()
    variables = {"params": params}
    cfg = bert.config
    bad_ids = ids.copy()
    bad_ids[1, 0] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds indices in \[0, {cfg.vocab_size}\]"):
        bert.apply(variables, bad_ids, mask, types)
    with pytest.raises(ValueError, match="token_type_ids holds indices"):
        bert.apply(variables, ids, mask, np.full_like(types, cfg.type_vocab_size))
    with pytest.raises(ValueError, match=r"token_type_ids must have input_ids' shape \(3, 9\)"):
        bert.apply(variables, ids, mask, types[:, :4])
    with pytest.raises(ValueError, match="attention_mask of the same shape"):
        bert.apply(variables, ids, mask[:, :4], types)
    with pytest.raises(ValueError, match="integer token ids; got float32"):
        bert.apply(variables, ids.astype(np.float32), mask, types)
    additive = np.where(mask == 1, 0.0, -10000.0).astype(np.float32)  # Hugging Face's inner form
    with pytest.raises(ValueError, match=r"attention_mask holds -10000\.0.*wrong way round"):
        bert.apply(variables, ids, additive, types)
    # Boolean and float 0/1 masks are the same mask.
    for same in (mask.astype(bool), mask.astype(np.float32)):
        np.testing.assert_array_equal(
            bert.apply(variables, ids, same, types)[0], bert.apply(variables, ids, mask, types)[0]
        )
    # No mask: every token is real.
    np.testing.assert_array_equal(
        bert.apply(variables, ids, None, types)[0],
        bert.apply(variables, ids, np.ones_like(mask), types)[0],
    )
    # Compiled code cannot check values; valid ids run there as eagerly.
    hidden = jax.jit(bert.apply)(variables, ids, mask, types)[0]
    np.testing.assert_allclose(hidden, bert.apply(variables, ids, mask, types)[0], atol=1e-5)


def _small_bert():
    """A one-layer random BERT and its parameters, without a checkpoint."""
    config = BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    bert = Bert(config)
    ids = np.ones((2, 4), np.int32)
    return bert, bert.init(jax.random.key(0, impl="rbg"), ids)["params"], ids


def test_float_token_ids_are_named_as_passed():
    bert, params, ids = _small_bert()
    # float64 is named as such, not as the float32 jnp.asarray turns it into.
    with pytest.raises(ValueError, match="integer token ids; got float64"):
        bert.apply({"params": params}, ids.astype(np.float64))


def test_the_bare_parameter_tree_is_refused_with_the_fix():
    bert, params, ids = _small_bert()
    held = "hold 'embeddings', 'encoder', 'pooler' but no 'params'"
    with pytest.raises(ValueError, match=rf"BERT's variables {held}: pass \{{'params': params\}}"):
        bert.apply(params, ids)  # the tree init returned under "params"
    with pytest.raises(ValueError, match=r"BERT's variables hold no 'params'"):
        bert.apply({}, ids)
    assert bert.apply({"params": params}, ids)[0].shape == (2, 4, 8)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(Bert(bert.config)(ids)[0])

    outer = Outer()
    variables = outer.init(jax.random.key(0), ids)
    del variables["params"]["Bert_0"]  # a tree without the BERT part: Flax names it
    with pytest.raises(Exception, match="Bert_0") as error:
        outer.apply(variables, ids)
    assert "pass {'params': params}" not in str(error.value)
