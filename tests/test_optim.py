"""The optimizer: per-tower rates, frozen parameters, gradient accumulation, schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmrec_jax import optim


def _train_config(**overrides):
    config = ml_collections.ConfigDict(
        {
            "learning_rate": 0.1,
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
            "grad_accum_steps": 1,
            "tower_lr_scale": "",
        }
    )
    config.update(overrides)
    return config


def _params():
    return {
        "image": {"kernel": jnp.ones((3, 2))},
        "text": {"bert": {"embeddings": jnp.ones((4,)), "top": jnp.ones((2,))}},
        "user_id": {"embedding": jnp.ones((5, 2))},
    }


def _step(optimizer, params, grads):
    state = optimizer.init(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates)


def test_tower_scales_and_frozen_parameters():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    optimizer, _ = optim.build_optimizer(
        _train_config(tower_lr_scale="text=0.5,id=0.25"),
        params,
        total_steps=10,
        is_frozen=lambda path: path[:3] == ("text", "bert", "embeddings"),
        param_towers={"user_id": "id", "image": "image", "text": "text"},
    )
    new = _step(optimizer, params, grads)
    # Adam's first step moves every parameter by the learning rate times its scale.
    moved = jax.tree.map(lambda a, b: np.asarray(a - b), params, new)
    np.testing.assert_allclose(moved["image"]["kernel"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(moved["text"]["bert"]["top"], 0.05, rtol=1e-5)
    np.testing.assert_allclose(moved["user_id"]["embedding"], 0.025, rtol=1e-5)
    np.testing.assert_array_equal(moved["text"]["bert"]["embeddings"], 0.0)


def test_unknown_tower_scale_is_an_error_and_absent_tower_is_ignored():
    params = _params()
    with pytest.raises(ValueError, match="no towers"):
        optim.build_optimizer(_train_config(tower_lr_scale="txet=0.1"), params, 10)
    # "audio" is a tower this model has switched off: its scale is ignored.
    optim.build_optimizer(_train_config(tower_lr_scale="audio=0.1"), params, 10)
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        optim.parse_lr_scales("text:0.1")


def test_accumulation_equals_one_step_on_the_mean_gradient():
    params = _params()
    keys = jax.random.split(jax.random.key(0), 2)
    grads = [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), params) for k in keys]
    accumulate, _ = optim.build_optimizer(_train_config(grad_accum_steps=2), params, 10)
    state = accumulate.init(params)
    current = params
    for g in grads:
        updates, state = accumulate.update(g, state, current)
        current = optax.apply_updates(current, updates)
    single, _ = optim.build_optimizer(_train_config(), params, 10)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    expected = _step(single, params, mean)
    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_schedule_warms_up_then_decays_to_zero():
    schedule = optim.learning_rate_schedule(_train_config(warmup_steps=10), 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    values = [float(schedule(s)) for s in range(10, 101, 10)]
    assert values == sorted(values, reverse=True)
