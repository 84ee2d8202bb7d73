"""Tests of the assembled recommender: tower subsets, masking, gradients, validation."""

import functools
import re
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_bert import make_tiny_bert, torch_outputs

from configs import default
from mmrec_jax import schema
from mmrec_jax.config import ConfigError
from mmrec_jax.models import audio as audio_lib
from mmrec_jax.models import bert_weights
from mmrec_jax.models import image as image_lib
from mmrec_jax.models.bert import Bert, BertConfig
from mmrec_jax.models.layers import absorbed_attention_is_cheaper
from mmrec_jax.models.recommender import (
    Recommender,
    build_model,
    count_params_by_tower,
    format_param_counts,
    with_pretrained_text,
)

ALL = "text,image,audio,id,history"
B, U, H, DT, L = 5, 7, 3, 6, 5
NUM_USERS, NUM_ITEMS = 6, 9


def tiny_config(towers=ALL, text_mode="frozen", dtype="float32"):
    """config.model shrunk to a few parameters per tower."""
    cfg = default.get_config().model
    cfg.towers = towers
    cfg.width = 8
    cfg.dtype = dtype
    cfg.num_users = NUM_USERS
    cfg.num_items = NUM_ITEMS
    cfg.text.mode = text_mode
    cfg.image.size = 8
    cfg.image.channels = (2, 3)
    cfg.image.hidden = 6
    cfg.audio.clip_samples = 96
    cfg.audio.n_fft = 32
    cfg.audio.hop_length = 16
    cfg.audio.mel_bins = 4
    cfg.audio.channels = (3,)
    cfg.audio.hidden = 6
    cfg.user.num_heads = 2
    cfg.fusion.num_layers = 1
    cfg.fusion.num_heads = 2
    cfg.fusion.mlp_dim = 8
    return cfg


def init_key(seed=0):
    """A PRNG key whose random-bit generator compiles fast (init compiles 2-3x quicker)."""
    return jax.random.key(seed, impl="rbg")


def random_params(model, batch, seed=0):
    """Random parameters of `model`'s shapes, without compiling its init."""
    shapes = jax.eval_shape(model.init, init_key(), batch)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def make_batch(cfg, seed=0, history=True):
    """A random batch following mmrec_jax.schema for `cfg`'s towers."""
    rng = np.random.default_rng(seed)
    towers = schema.parse_towers(cfg.towers)
    items = {
        "item_id": rng.integers(0, NUM_ITEMS + 1, U).astype(np.int32),
        "item_index": np.arange(U, dtype=np.int32),
    }
    if "text" in towers:
        if cfg.text.mode == "frozen":
            items["text_embedding"] = rng.normal(size=(U, DT)).astype(np.float32)
        else:
            items["text_ids"] = rng.integers(1, 30, (U, L)).astype(np.int32)
            items["text_mask"] = (np.arange(L)[None] < rng.integers(1, L + 1, (U, 1))).astype(
                np.int32
            )
        items["has_text"] = np.ones(U, bool)
    if "image" in towers:
        size = cfg.image.size
        items["image"] = rng.integers(0, 256, (U, size, size, 3)).astype(np.uint8)
        items["has_image"] = np.ones(U, bool)
    if "audio" in towers:
        items["audio"] = rng.uniform(-1, 1, (U, cfg.audio.clip_samples)).astype(np.float32)
        items["has_audio"] = np.ones(U, bool)
    batch = {
        "user_id": rng.integers(0, NUM_USERS + 1, B).astype(np.int32),
        "user_index": np.arange(B, dtype=np.int32),
        "item_slot": rng.permutation(U)[:B].astype(np.int32),
        "label": rng.integers(0, 2, B).astype(np.float32),
        "weight": np.ones(B, np.float32),
        "items": items,
    }
    if "history" in towers and history:
        batch["history_slot"] = rng.integers(0, U, (B, H)).astype(np.int32)
        mask = np.arange(H)[None] < rng.integers(1, H + 1, (B, 1))
        mask[0] = False  # a user without history
        batch["history_mask"] = mask
    return batch


@functools.cache
def full_model():
    """The all-towers model (frozen text, log-mel audio), its variables and a jitted apply."""
    model = Recommender(tiny_config())
    variables = jax.jit(model.init)(init_key(), make_batch(model.config))
    return model, variables, jax.jit(functools.partial(model.apply, train=False))


def _replace_items(batch, **fields):
    return {**batch, "items": {**batch["items"], **fields}}


@pytest.mark.parametrize(
    "towers",
    ["text", "image", "audio", "id", "text,image,audio,id", ALL, "image,history", "id,history"],
)
def test_output_shape_for_every_tower_combination(towers):
    cfg = tiny_config(towers)
    model = Recommender(cfg)
    batch = make_batch(cfg)
    logits, variables = jax.eval_shape(model.init_with_output, init_key(), batch)
    assert logits.shape == (B,) and logits.dtype == jnp.float32
    expected = {
        "text": {"text"},
        "image": {"image"},
        "audio": {"audio"},
        "id": {"item_id", "user_id"},
        "history": {"history"},
    }
    names = {"fusion"}.union(*(expected[t] for t in schema.parse_towers(towers)))
    assert set(variables["params"]) == names


def test_jit_and_eager_give_the_same_logits():
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=1)
    eager = model.apply(variables, batch)
    np.testing.assert_allclose(apply(variables, batch), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "flag,field,new_content",
    [
        ("has_text", "text_embedding", lambda x, r: r.normal(size=x.shape).astype(x.dtype)),
        ("has_image", "image", lambda x, r: r.integers(0, 256, x.shape).astype(x.dtype)),
        ("has_audio", "audio", lambda x, r: r.uniform(-1, 1, x.shape).astype(x.dtype)),
    ],
)
def test_absent_modality_content_is_ignored_present_is_used(flag, field, new_content):
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=2)
    rng = np.random.default_rng(3)
    changed = new_content(batch["items"][field], rng)
    # Present: the content matters.
    assert not np.allclose(
        apply(variables, batch), apply(variables, _replace_items(batch, **{field: changed}))
    )
    # Absent on every item (candidates and history items): the content does not matter.
    absent = _replace_items(batch, **{flag: np.zeros(U, bool)})
    before = apply(variables, absent)
    after = apply(variables, _replace_items(absent, **{field: changed}))
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("field,flag", [("text_embedding", "has_text"), ("audio", "has_audio")])
def test_nan_in_absent_content_reaches_neither_logits_nor_gradients(field, flag):
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=5)
    has = np.arange(U) % 2 == 0  # every other item lacks the modality
    clean = _replace_items(batch, **{flag: has})
    content = np.array(clean["items"][field])
    content[~has] = np.nan
    content[np.flatnonzero(~has)[0]] = np.inf
    dirty = _replace_items(clean, **{field: content})

    def loss(params, batch):
        return jnp.mean(model.apply({"params": params}, batch) ** 2)

    grad = jax.jit(jax.grad(loss))
    np.testing.assert_array_equal(apply(variables, dirty), apply(variables, clean))
    dirty_grads = jax.tree_util.tree_leaves_with_path(grad(variables["params"], dirty))
    clean_grads = jax.tree.leaves(grad(variables["params"], clean))
    for (path, leaf), expected in zip(dirty_grads, clean_grads, strict=True):
        np.testing.assert_array_equal(leaf, expected, err_msg=jax.tree_util.keystr(path))


def test_history_padding_does_not_change_the_output():
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=4)
    mask = batch["history_mask"]
    assert (~mask).any() and mask.any()
    slots = batch["history_slot"].copy()
    slots[~mask] = (slots[~mask] + 1 + np.arange((~mask).sum())) % U
    np.testing.assert_array_equal(
        apply(variables, batch), apply(variables, {**batch, "history_slot": slots})
    )
    # A real history entry does change the output of its row.
    row, col = np.argwhere(mask)[0]
    slots = batch["history_slot"].copy()
    slots[row, col] = (slots[row, col] + 1) % U
    changed = apply(variables, {**batch, "history_slot": slots})
    assert not np.allclose(changed[row], apply(variables, batch)[row])


def test_encode_items_then_score_ranks_a_catalogue():
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=5)
    batch["user_id"][1] = 0  # an unknown user
    encoded = jax.jit(functools.partial(model.apply, method=model.encode_items))(
        variables, batch["items"]
    )
    assert encoded["tokens"].shape == (U, 4, 8)
    assert encoded["mask"].shape == (U, 4)
    assert encoded["embedding"].shape == (U, 8)
    # Every user of the batch against every item of the block, without re-encoding items.
    users = np.repeat(np.arange(B), U)
    rows = {
        "user_id": batch["user_id"][users],
        "item_slot": np.tile(np.arange(U, dtype=np.int32), B),
        "history_slot": batch["history_slot"][users],
        "history_mask": batch["history_mask"][users],
    }
    score = jax.jit(functools.partial(model.apply, method=model.score))
    grid = score(variables, rows, encoded).reshape(B, U)
    np.testing.assert_allclose(
        grid[np.arange(B), batch["item_slot"]], apply(variables, batch), rtol=1e-5, atol=1e-6
    )
    # score_grid gives the same grid without repeating the users per item (a user
    # without history and an unknown one among them).
    assert not batch["history_mask"][0].any() and (batch["user_id"] == 0).any()
    users = {key: batch[key] for key in ("user_id", "history_slot", "history_mask")}
    score_grid = jax.jit(functools.partial(model.apply, method=model.score_grid))
    np.testing.assert_allclose(score_grid(variables, users, encoded), grid, rtol=1e-5, atol=1e-6)
    # Some of the items, in any order; the histories still index the whole block.
    slots = np.array([U - 1, 0, 2, 2], np.int32)
    np.testing.assert_allclose(
        score_grid(variables, users, encoded, slots), grid[:, slots], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("towers", ["image,history", "id", "text,audio"])
def test_score_grid_matches_score_for_other_towers(towers):
    cfg = tiny_config(towers)
    model = Recommender(cfg)
    batch = make_batch(cfg, seed=6)
    variables = {"params": random_params(model, batch)}
    encoded = jax.jit(functools.partial(model.apply, method="encode_items"))(
        variables, batch["items"]
    )
    users = {k: batch[k] for k in ("user_id", "history_slot", "history_mask") if k in batch}
    rows = {key: np.repeat(value, U, axis=0) for key, value in users.items()}
    rows["item_slot"] = np.tile(np.arange(U, dtype=np.int32), B)
    pairs = jax.jit(functools.partial(model.apply, method="score"))(variables, rows, encoded)
    grid = jax.jit(functools.partial(model.apply, method="score_grid"))(variables, users, encoded)
    pairs = pairs.reshape(B, U)
    assert grid.shape == (B, U)
    np.testing.assert_allclose(grid, pairs, rtol=1e-5, atol=1e-6)


def test_score_grid_names_a_slot_outside_the_block():
    model, variables, _ = full_model()
    batch = make_batch(model.config, seed=7)
    encoded = jax.jit(functools.partial(model.apply, method="encode_items"))(
        variables, batch["items"]
    )
    users = {key: batch[key] for key in ("user_id", "history_slot", "history_mask")}
    row = int(np.flatnonzero(batch["history_mask"][:, 0])[0])
    slots = batch["history_slot"].copy()
    slots[row, 0] = U  # one past the block
    users = {**users, "history_slot": slots}
    with pytest.raises(schema.BatchError, match=rf"history_slot.*{U} items of the encoded"):
        model.apply(variables, users, encoded, method="score_grid")
    # Under jit, where values cannot be checked, that user's logits are NaN, not wrong.
    grid = jax.jit(functools.partial(model.apply, method=model.score_grid))(
        variables, users, encoded
    )
    assert np.isnan(grid[row]).all() and np.isfinite(np.delete(grid, row, 0)).all()
    slots = np.array([0, U], np.int32)
    with pytest.raises(schema.BatchError, match=rf"item_slots.*{U} items of the encoded"):
        model.apply(variables, users, encoded, slots, method="score_grid")
    grid = jax.jit(functools.partial(model.apply, method=model.score_grid))(
        variables, {**users, "history_slot": batch["history_slot"]}, encoded, slots
    )
    assert np.isnan(grid[:, 1]).all() and np.isfinite(grid[:, 0]).all()
    with pytest.raises(schema.BatchError, match="Users are missing the required field 'user_id'"):
        model.apply(variables, {"history_slot": slots}, encoded, method="score_grid")
    # Towers that read nothing of the users still need to know how many there are.
    content = Recommender(tiny_config("text,audio"))
    batch = make_batch(content.config)
    variables = {"params": random_params(content, batch)}
    encoded = jax.jit(functools.partial(content.apply, method="encode_items"))(
        variables, batch["items"]
    )
    with pytest.raises(schema.BatchError, match=r"score_grid needs the users' 'user_id' \(U,\)"):
        content.apply(variables, {}, encoded, method="score_grid")


def test_encode_items_lets_the_content_towers_skip_items_without_their_modality(monkeypatch):
    model, variables, _ = full_model()
    items = make_batch(model.config, seed=6)["items"]
    items = {**items, "has_image": np.arange(U) % 2 == 0, "has_audio": np.arange(U) % 3 == 0}
    seen = {}
    for module in (image_lib, audio_lib):
        real = module.apply_in_chunks

        def recording(tower, method, inputs, present, real=real):
            seen[type(tower).__name__] = present
            return real(tower, method, inputs, present)

        monkeypatch.setattr(module, "apply_in_chunks", recording)
    model.apply(variables, items, method=model.encode_items)
    np.testing.assert_array_equal(seen["ImageTower"], items["has_image"])
    np.testing.assert_array_equal(seen["AudioTower"], items["has_audio"])


def _grads(model, variables, batch):
    def loss(params):
        return jnp.sum(model.apply({"params": params}, batch))

    return jax.jit(jax.grad(loss))(variables["params"])


def test_gradients_reach_every_parameter_with_frozen_text():
    model, variables, _ = full_model()
    grads = _grads(model, variables, make_batch(model.config, seed=6))
    flat = flax.traverse_util.flatten_dict(grads)
    zero = [k for k, g in flat.items() if not np.any(np.asarray(g))]
    # The key bias of attention adds the same logit to every key of a query, so its
    # gradient is zero in exact arithmetic; the absorbed form (one candidate over the
    # history) computes it exactly so.
    cfg = model.config
    history_len = make_batch(cfg, seed=6)["history_slot"].shape[1]
    expected = []
    if absorbed_attention_is_cheaper(1, history_len, cfg.width, cfg.user.num_heads):
        expected = [("history", "attention", "key", "bias")]
    assert zero == expected, f"parameters without gradient: {zero}"
    assert "bert" not in grads["text"]  # frozen: the text tower holds only its projection


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A 2-layer random BERT checkpoint folder (config.json + model.safetensors)."""
    bert_config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    ids = np.ones((1, L), np.int32)
    shapes = jax.eval_shape(Bert(bert_config).init, init_key(), ids, ids)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.5 * rng.normal(size=s.shape).astype(np.float32), shapes)
    folder = tmp_path_factory.mktemp("tiny_bert")
    bert_weights.save_pretrained(params, bert_config, folder)
    return str(folder)


@pytest.mark.parametrize("mode,pooling", [("finetune_top_n", "cls"), ("finetune", "pooler")])
def test_gradients_in_trained_text_modes(tiny_bert_folder, mode, pooling):
    cfg = tiny_config("text,id", text_mode=mode)
    cfg.text.model = tiny_bert_folder
    cfg.text.top_n = 1
    cfg.text.pooling = pooling
    model = build_model(cfg)
    batch = make_batch(cfg, seed=7)
    grads = _grads(model, {"params": random_params(model, batch)}, batch)
    bert = flax.traverse_util.flatten_dict(grads["text"]["bert"])
    for path, grad in bert.items():
        trained = mode == "finetune" or (path[:3] == ("encoder", "layer", "1"))
        if path[0] == "pooler":
            trained = pooling == "pooler"
        if trained:
            assert np.any(np.asarray(grad)), f"no gradient for trained BERT parameter {path}"
        else:
            assert not np.any(np.asarray(grad)), f"gradient for frozen BERT parameter {path}"
    others = {k: v for k, v in grads.items() if k != "text"}
    others["text_proj"] = grads["text"]["proj"]
    for path, grad in flax.traverse_util.flatten_dict(others).items():
        assert np.any(np.asarray(grad)), f"no gradient for {path}"


def test_build_model_checks_the_text_settings_against_the_bert(tmp_path):
    make_tiny_bert(tmp_path, pooler=False)  # 2 encoder layers, no pooler
    cfg = tiny_config("text,id", text_mode="finetune_top_n")
    cfg.text.model = str(tmp_path)
    cfg.text.top_n = 3
    with pytest.raises(ConfigError, match=r"top_n=3 must lie in \[1, 2\] \(the BERT's number"):
        build_model(cfg)
    cfg.text.top_n, cfg.text.pooling = 2, "pooler"
    with pytest.raises(ConfigError, match="pooling='pooler' but the checkpoint has no pooler"):
        build_model(cfg)
    cfg.text.pooling = "cls"
    build_model(cfg)


def test_ids_outside_the_vocabulary_count_as_unknown_and_warn_when_eager():
    cfg = tiny_config("image,id")
    model = build_model(cfg)
    batch = make_batch(cfg, seed=2)
    variables = model.init(init_key(), batch)
    unknown = {**batch, "user_id": np.zeros(B, np.int32)}
    unknown = _replace_items(unknown, item_id=np.zeros(U, np.int32))
    want = model.apply(variables, unknown)
    raw = {**batch, "user_id": np.full(B, NUM_USERS + 1, np.int32)}  # raw ids, not indices
    raw = _replace_items(raw, item_id=np.arange(-1, U - 1, dtype=np.int32) * 100)
    with pytest.warns(UserWarning) as caught:
        got = model.apply(variables, raw)
    messages = [str(w.message) for w in caught]
    assert any(
        f"'user_id' holds ID-vocabulary indices in [{NUM_USERS + 1}, {NUM_USERS + 1}], outside "
        f"[0, {NUM_USERS}] (config.model.num_users={NUM_USERS})" in m
        for m in messages
    ), messages
    assert any("'item_id' holds ID-vocabulary indices in [-100, " in m for m in messages)
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under jit: nothing to check, and no warning
        np.testing.assert_allclose(jax.jit(model.apply)(variables, raw), want, atol=1e-6)
        model.apply(variables, batch)  # indices in range: no warning
        schema.warn_outside_vocabulary("user_id", raw["user_id"], 0, "num_users")  # unset:
        # the ID embedding itself refuses a vocabulary of 0


@pytest.mark.parametrize("towers", ["image,id,history", "id"])
def test_unknown_ids_are_absent_tokens_not_the_untrained_table_row(towers):
    """No training row reaches the OOV rows of the ID tables, so an unknown user or item
    leaves its ID token out of the fusion, whatever those rows hold."""
    cfg = tiny_config(towers)
    model = build_model(cfg)
    batch = make_batch(cfg, seed=3)
    variables = {"params": random_params(model, batch)}
    apply = jax.jit(model.apply)
    user_id = batch["user_id"].copy()
    user_id[:2] = 0
    user_id[3] = NUM_USERS  # known
    item_id = batch["items"]["item_id"].copy()
    item_id[batch["item_slot"][1:3]] = 0  # rows 1 (both unknown) and 2 (the item only)
    batch = _replace_items({**batch, "user_id": user_id}, item_id=item_id)
    logits = apply(variables, batch)
    assert np.isfinite(logits).all()

    def with_row(variables, table, index, value):
        params = flax.core.unfreeze(variables)["params"]
        embedding = params[table]["embedding"]["embedding"]
        params[table]["embedding"]["embedding"] = jnp.asarray(embedding).at[index].set(value)
        return {"params": params}

    # Whatever the OOV rows hold, the logits stay.
    changed = with_row(variables, "user_id", 0, 50.0)
    changed = with_row(changed, "item_id", 0, -50.0)
    np.testing.assert_allclose(apply(changed, batch), logits, rtol=1e-6, atol=1e-6)
    # A known user's row does count.
    moved = apply(with_row(variables, "user_id", NUM_USERS, 50.0), batch)
    assert np.abs(moved[3] - logits[3]) > 1e-3
    if towers == "id":  # row 1 has no token at all: the fusion's bias alone, like any such row
        items = dict(batch["items"], item_id=np.zeros(U, np.int32))
        nothing = apply(variables, {**batch, "user_id": np.zeros(B, np.int32), "items": items})
        np.testing.assert_allclose(nothing, np.full(B, nothing[0]), rtol=1e-6)
        np.testing.assert_allclose(logits[1], nothing[0], rtol=1e-6)


def test_with_pretrained_text_puts_the_pretrained_bert_in(tmp_path):
    reference = make_tiny_bert(tmp_path, seed=4)  # saved by transformers
    cfg = tiny_config("text,id", text_mode="finetune")
    cfg.text.model = str(tmp_path)
    model = build_model(cfg)
    batch = make_batch(cfg, seed=3)
    vocab = model.bert_config.vocab_size
    batch = _replace_items(batch, text_ids=batch["items"]["text_ids"] % vocab)
    params = model.init(init_key(), batch)["params"]
    loaded = with_pretrained_text(params, cfg)
    ids = np.array([[2, 5, 7, 9, 3], [2, 8, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    hidden, _ = Bert(model.bert_config).apply({"params": loaded["text"]["bert"]}, ids, mask)
    np.testing.assert_allclose(hidden, torch_outputs(reference, ids, mask)[0], atol=1e-5)
    random_hidden, _ = Bert(model.bert_config).apply({"params": params["text"]["bert"]}, ids, mask)
    assert not np.allclose(random_hidden, hidden, atol=1e-2)  # init's BERT is not it
    kept = {k: v for k, v in loaded.items() if k != "text"} | {"proj": loaded["text"]["proj"]}
    before = {k: v for k, v in params.items() if k != "text"} | {"proj": params["text"]["proj"]}
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, kept, before))  # the rest as it was
    model.apply({"params": loaded}, batch)
    frozen = tiny_config("text,id")
    frozen_params = build_model(frozen).init(init_key(), make_batch(frozen))["params"]
    assert with_pretrained_text(frozen_params, frozen) == frozen_params  # no BERT: unchanged


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda b: {k: v for k, v in b.items() if k != "item_slot"}, "item_slot"),
        (lambda b: {**b, "history_mask": b["history_mask"][:, :2]}, "history_mask"),
        (lambda b: _replace_items(b, image=b["items"]["image"][:, :4]), "image"),
        (lambda b: _replace_items(b, audio=b["items"]["audio"][:, :50]), "audio"),
        (
            lambda b: {**b, "items": {k: v for k, v in b["items"].items() if k != "has_text"}},
            "has_text",
        ),
        (lambda b: _replace_items(b, text_embedding=b["items"]["text_embedding"][0]), "text_"),
    ],
)
def test_bad_batch_fails_naming_the_field(edit, field):
    cfg = tiny_config()
    model = Recommender(cfg)
    bad = edit(make_batch(cfg))
    with pytest.raises(schema.BatchError, match=f"'{field}"):
        jax.eval_shape(model.init, init_key(), bad)


def test_out_of_range_slots_and_a_foreign_text_width_are_errors_when_applied_eagerly():
    model, variables, _ = full_model()
    batch = make_batch(model.config)
    for field, value in (("item_slot", U), ("history_slot", -1)):
        bad = {**batch, field: np.full_like(batch[field], value)}
        with pytest.raises(schema.BatchError, match=rf"'{field}' holds indices .* \[0, {U}\)"):
            model.apply(variables, bad)
    wide = np.zeros((U, DT + 2), np.float32)
    with pytest.raises(schema.BatchError, match=f"is {DT + 2} wide but .* read {DT}-wide"):
        model.apply(variables, _replace_items(batch, text_embedding=wide))
    assert model.apply(variables, batch).shape == (B,)
    # Scoring needs no loss or metric fields.
    rows = {k: v for k, v in batch.items() if k not in ("label", "weight", "user_index")}
    np.testing.assert_array_equal(model.apply(variables, rows), model.apply(variables, batch))


def test_padding_history_slots_may_hold_anything_but_real_ones_are_checked():
    model, variables, _ = full_model()
    batch = make_batch(model.config, seed=4)
    mask = batch["history_mask"]
    padded = {**batch, "history_slot": np.where(mask, batch["history_slot"], -1)}
    np.testing.assert_array_equal(model.apply(variables, padded), model.apply(variables, batch))
    real = np.where(mask, U, batch["history_slot"])  # a real entry out of range
    with pytest.raises(schema.BatchError, match=r"'history_slot' holds indices in \[.*, 7\]"):
        model.apply(variables, {**batch, "history_slot": real})


def test_the_model_needs_only_the_fields_it_reads():
    model, variables, _ = full_model()
    batch = make_batch(model.config)
    items = {k: v for k, v in batch["items"].items() if k != "item_index"}  # metrics only
    np.testing.assert_array_equal(
        model.apply(variables, {**batch, "items": items}), model.apply(variables, batch)
    )
    with pytest.raises(schema.BatchError, match="'user_id'"):  # read by the id tower
        model.apply(variables, {k: v for k, v in batch.items() if k != "user_id"})
    cfg = tiny_config("text,image")  # no id tower: user_id is not read
    content = Recommender(cfg)
    content_batch = make_batch(cfg)
    params = {"params": random_params(content, content_batch)}
    rows = {k: v for k, v in content_batch.items() if k != "user_id"}
    np.testing.assert_array_equal(content.apply(params, rows), content.apply(params, content_batch))


def test_predict_batches_scores_rows_without_metric_fields():
    from mmrec_jax import predict, sharding

    model, variables, apply = full_model()
    batch = make_batch(model.config)
    rows = {k: v for k, v in batch.items() if k not in ("label", "weight", "user_index")}
    mesh = sharding.make_mesh(jax.devices()[:1])
    predict_fn = predict.make_predict_fn(model, None)
    out = predict.predict_batches(predict_fn, variables["params"], [rows, rows], mesh)
    assert sorted(out) == ["logit"]
    expected = np.asarray(apply(variables, batch))
    # predict's program is compiled with the CPU compiler options for a content forward
    # pass (oneDNN's products), so its sums may round differently (1e-7 apart).
    np.testing.assert_allclose(
        out["logit"], np.concatenate([expected, expected]), rtol=1e-5, atol=1e-6
    )
    padded = {**batch, "weight": np.array([1, 1, 0, 1, 0], np.float32)}  # 2 padding rows
    out = predict.predict_batches(predict_fn, variables["params"], [padded], mesh)
    np.testing.assert_array_equal(out["user_index"], [0, 1, 3])


@pytest.mark.parametrize(
    "towers, text_mode, content",
    [
        ("image,id,history", "frozen", True),
        ("text,id", "frozen", False),
        ("text,id", "finetune", True),
    ],
)
def test_forward_programs_take_the_content_options_where_a_content_network_runs(
    towers, text_mode, content, monkeypatch
):
    from mmrec_jax import evaluate, predict, runtime

    asked = []
    real = runtime.compiler_options

    def spy(dtype="float32", content_forward=False):
        asked.append(content_forward)
        return real(dtype, content_forward)

    monkeypatch.setattr(runtime, "compiler_options", spy)
    model = Recommender(tiny_config(towers, text_mode))
    predict.make_predict_fn(model, None)
    assert asked == [content]
    asked.clear()
    evaluate.programs_of(model)
    assert sorted(asked) == sorted([False, content])  # scoring encoded items; encoding


def test_encoding_with_the_content_options_matches_the_plain_program():
    from mmrec_jax import evaluate

    model, variables, _ = full_model()
    items = make_batch(model.config, seed=3)["items"]
    got = evaluate.programs_of(model).encode(variables["params"], items)
    plain = jax.jit(functools.partial(model.apply, method="encode_items"))(variables, items)
    for name in ("tokens", "mask", "embedding"):
        np.testing.assert_allclose(got[name], plain[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_and_float64_inputs_are_floats_lists_are_named():
    model, variables, apply = full_model()
    batch = make_batch(model.config)
    expected = apply(variables, batch)
    for dtype in (jnp.bfloat16, np.float64):  # e.g. from a BERT computing in bfloat16
        embedding = batch["items"]["text_embedding"].astype(dtype)
        got = model.apply(variables, _replace_items(batch, text_embedding=embedding))
        rounded = _replace_items(batch, text_embedding=embedding.astype(np.float32))
        np.testing.assert_allclose(got, apply(variables, rounded), rtol=1e-5, atol=1e-5)
    assert expected.shape == (B,)
    as_list = {**batch, "item_slot": batch["item_slot"].tolist()}
    with pytest.raises(schema.BatchError, match="'item_slot' .* is a list; pass a numpy"):
        model.apply(variables, as_list)
    with pytest.raises(schema.BatchError, match="'image' must be uint8; got float32.*by 255"):
        model.apply(variables, _replace_items(batch, image=np.zeros((U, 8, 8, 3), np.float32)))
    pcm = np.zeros(batch["items"]["audio"].shape, np.int16)
    with pytest.raises(schema.BatchError, match="'audio' must be float32; got int16.*32768"):
        model.apply(variables, _replace_items(batch, audio=pcm))


def test_example_batch_reads_the_text_width_and_validation_reports_every_size():
    cfg = default.get_config()
    batch = schema.example_batch(cfg)  # frozen MiniLM: 384-wide cached embeddings
    assert batch["items"]["text_embedding"].shape == (1, 384)
    dims = schema.validate_batch(batch, cfg.model.towers, expected_dims={"S": 56, "T": 4000})
    assert dims == {"B": 1, "U": 1, "H": cfg.data.history_len, "Dt": 384, "S": 56, "T": 4000}


def test_config_errors_name_the_key():
    cfg = tiny_config("text,id")
    cfg.num_users = 0
    with pytest.raises(ValueError, match="config.model.num_users=0"):
        jax.eval_shape(Recommender(cfg).init, init_key(), make_batch(cfg))
    cfg = tiny_config("history")
    with pytest.raises(ValueError, match="no item tower"):
        jax.eval_shape(Recommender(cfg).init, init_key(), make_batch(cfg))


def test_bfloat16_compute_with_float32_params():
    model, variables, apply = full_model()
    model16 = Recommender(tiny_config(dtype="bfloat16"))
    batch = make_batch(model.config, seed=8)
    params16 = jax.eval_shape(model16.init, init_key(), batch)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    logits16 = jax.jit(model16.apply)(variables, batch)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, apply(variables, batch), atol=0.1)
    # The logit itself is not rounded to bfloat16 (whose rounding ties scores).
    logits16 = np.asarray(logits16)
    rounded = logits16.astype(jnp.bfloat16).astype(np.float32)
    assert np.mean(logits16 != rounded) > 0.5, logits16


def test_auto_dtype_computes_in_bfloat16_on_accelerators_and_float32_on_cpu(monkeypatch):
    model, variables, _ = full_model()
    batch = make_batch(model.config, seed=8)
    auto = Recommender(tiny_config(dtype="auto"))

    def token_dtype():
        encode = functools.partial(auto.apply, method="encode_items")
        return jax.eval_shape(encode, variables, batch["items"])["tokens"].dtype

    assert token_dtype() == jnp.float32  # the tests run on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert token_dtype() == jnp.bfloat16
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert token_dtype() == jnp.bfloat16


def test_training_mode_uses_dropout_rng():
    model, variables, _ = full_model()
    batch = make_batch(model.config, seed=9)
    train = jax.jit(functools.partial(model.apply, train=True))
    a = train(variables, batch, rngs={"dropout": jax.random.key(1)})
    b = train(variables, batch, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, train(variables, batch, rngs={"dropout": jax.random.key(1)}))
    assert not np.allclose(a, b)


def test_param_counts_per_tower():
    model, variables, _ = full_model()
    counts = count_params_by_tower(variables)
    cfg = model.config
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(variables))
    assert counts["id"] == (NUM_USERS + 1 + NUM_ITEMS + 1) * cfg.width
    # Conv 3->2, conv 2->3 (3x3 + bias); 8 -> 4 -> 2 pixels; dense 2*2*3 -> 6; dense 6 -> 8.
    assert counts["image"] == (27 * 2 + 2) + (18 * 3 + 3) + (12 * 6 + 6) + (6 * 8 + 8)
    # Frozen text: Dense DT -> width and a LayerNorm.
    assert counts["text"] == DT * 8 + 8 + 2 * 8
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    table = format_param_counts(variables)
    for tower in ("text", "image", "audio", "id", "history", "fusion", "total"):
        assert tower in table


def test_nan_in_an_item_seen_only_through_padding_history_slots_is_ignored():
    model, variables, apply = full_model()  # jitted: content values are not checked
    batch = make_batch(model.config, seed=4)
    hidden = U - 1  # the item no row reads except through padding history slots
    mask = batch["history_mask"]
    slots = np.where(mask, batch["history_slot"] % hidden, hidden)
    clean = {**batch, "item_slot": batch["item_slot"] % hidden, "history_slot": slots}
    audio = np.array(batch["items"]["audio"])
    audio[hidden] = np.nan
    logits = apply(variables, _replace_items(clean, audio=audio))
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, apply(variables, clean), rtol=1e-6, atol=1e-6)


def test_out_of_range_slots_under_jit_give_nan_logits_not_another_items_score():
    model, variables, apply = full_model()
    batch = make_batch(model.config, seed=4)
    mask = batch["history_mask"]
    row = int(np.flatnonzero(mask.any(1))[0])  # a row with a real history entry
    item_slot = batch["item_slot"].copy()
    item_slot[1:3] = (-1, U)  # wrapped and clamped by plain indexing
    history_slot = np.where(mask, batch["history_slot"], U + 5)  # padding: may hold anything
    history_slot[row, np.flatnonzero(mask[row])[0]] = U
    bad = {**batch, "item_slot": item_slot, "history_slot": history_slot}
    logits, clean = np.asarray(apply(variables, bad)), np.asarray(apply(variables, batch))
    nan_rows = {1, 2, row}
    np.testing.assert_array_equal(np.isnan(logits), [r in nan_rows for r in range(B)])
    ok = [r for r in range(B) if r not in nan_rows]
    np.testing.assert_allclose(logits[ok], clean[ok], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field,flag", [("text_embedding", "has_text"), ("audio", "has_audio")])
def test_nan_in_present_content_is_an_error_when_applied_eagerly(field, flag):
    model, variables, _ = full_model()
    batch = make_batch(model.config)
    content = np.array(batch["items"][field])
    content[2, 0], content[5, -1] = np.nan, -np.inf
    with pytest.raises(schema.BatchError, match=rf"'{field}' holds NaN .* 2 item.*\[2, 5\]"):
        model.apply(variables, _replace_items(batch, **{field: content}))
    has = np.ones(U, bool)
    has[[2, 5]] = False  # marked absent: ignored
    absent = model.apply(variables, _replace_items(batch, **{field: content, flag: has}))
    assert np.isfinite(absent).all()


def test_score_names_a_misshaped_encoded_block():
    model, variables, _ = full_model()
    batch = make_batch(model.config)
    encoded = model.apply(variables, batch["items"], method="encode_items")
    tokens, mask, embedding = encoded["tokens"], encoded["mask"], encoded["embedding"]
    m, width = tokens.shape[1:]
    for bad, needle in (
        ({"tokens": tokens, "mask": mask}, "encoded is missing 'embedding'"),
        ({**encoded, "tokens": tokens[:, 1:], "mask": mask[:, 1:]}, f"with M={m}"),
        ({**encoded, "embedding": embedding[:, :-1]}, f"with D={width}"),
        ({**encoded, "embedding": embedding[:2]}, f"N={U}, as in encoded.'tokens'"),
        ({**encoded, "mask": np.asarray(mask, np.float32)}, "'mask' must be bool"),
    ):
        with pytest.raises(schema.BatchError, match=re.escape(needle) + ".*encode_items"):
            model.apply(variables, batch, bad, method="score")


def test_an_empty_item_block_and_disagreeing_sizes_are_named():
    model, variables, _ = full_model()
    batch = make_batch(model.config)
    empty = {key: value[:0] for key, value in batch["items"].items()}
    with pytest.raises(schema.BatchError, match=r"item block is empty \(U=0\)"):
        model.apply(variables, {**batch, "items": empty})
    longer = _replace_items(batch, item_id=np.zeros(U + 1, np.int32))
    with pytest.raises(schema.BatchError, match=rf"U={U + 1}, as in items.'item_id'"):
        model.apply(variables, longer)
    with pytest.raises(schema.BatchError, match=rf"'item_slot' .* B={B - 1}, as in 'user_id'"):
        model.apply(variables, {**batch, "user_id": batch["user_id"][:-1]})


def test_the_bare_parameter_tree_is_refused_naming_the_fix():
    model, variables, _ = full_model()
    with pytest.raises(ValueError, match=r"hold 'audio', .* no 'params': pass \{'params'"):
        model.apply(variables["params"], make_batch(model.config))


def test_a_traced_train_flag_names_static_argnames():
    model, variables, _ = full_model()
    with pytest.raises(TypeError, match="static_argnames='train'"):
        jax.jit(model.apply)(
            variables, make_batch(model.config), train=True, rngs={"dropout": init_key(1)}
        )
