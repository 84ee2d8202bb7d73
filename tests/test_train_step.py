"""Tests of the train state as `train_step.build_train_state` creates it."""

from pathlib import Path

import jax
import numpy as np
import pytest
from _tiny_bert import make_tiny_bert

from mmrec_jax import schema, sharding, train_step
from mmrec_jax.config import load_config
from mmrec_jax.models import recommender

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode, fsdp", [("finetune", True), ("finetune_top_n", False)])
def test_the_state_holds_the_pretrained_bert_and_inits_every_other_parameter(tmp_path, mode, fsdp):
    make_tiny_bert(tmp_path, seed=4)
    config = load_config(str(ROOT / "configs/tiny.py"))
    config.model.towers = "text,image,id,history"
    config.model.text.model = str(tmp_path)
    config.model.text.mode = mode
    config.model.text.top_n = 1
    config.train.fsdp = fsdp
    config.model.num_users, config.model.num_items = 6, 9
    mesh = sharding.make_mesh()
    batch = schema.example_batch(config)
    model = recommender.build_model(config.model)

    setup = train_step.build_train_state(config, model, mesh, batch, 10)

    init_key = jax.random.split(jax.random.key(config.seed))[0]
    init = jax.jit(model.init, static_argnames="train")
    initialised = init({"params": init_key, "dropout": init_key}, batch, train=False)
    expected = recommender.with_pretrained_text(initialised["params"], config.model)
    params = setup.state["params"]
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        want = expected
        for key in path:
            want = want[key.key]
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=str(path))
    random_bert = initialised["params"]["text"]["bert"]["embeddings"]["word_embeddings"]
    loaded = params["text"]["bert"]["embeddings"]["word_embeddings"]
    assert not np.allclose(loaded["embedding"], random_bert["embedding"], atol=1e-2)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    assert shardings == setup.shardings["params"]
    assert shardings == sharding.state_shardings(mesh, params, fsdp)
