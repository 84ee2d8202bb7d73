"""The model's fast paths against the plain implementations they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.models.layers import max_pool


def _plain_max_pool(x, window):
    """Reshape-and-max pooling, differentiated by JAX's own rule for `jnp.max`."""
    spatial = x.shape[1:-1]
    pooled = [s // window for s in spatial]
    x = x[(slice(None), *(slice(0, p * window) for p in pooled), slice(None))]
    split = [x.shape[0]]
    for p in pooled:
        split += [p, window]
    x = x.reshape(*split, x.shape[-1])
    return jnp.max(x, axis=tuple(2 + 2 * i for i in range(len(spatial))))


@pytest.mark.parametrize(
    "shape,window", [((2, 7, 9, 3), 2), ((3, 11, 4), 2), ((2, 5, 4, 6, 2), 2), ((2, 9, 8, 3), 3)]
)
def test_max_pool_and_its_gradient_match_the_plain_reshape_and_max(shape, window):
    # Rounded values after a ReLU: many windows hold tied maxima (zeros and repeats).
    x = jax.nn.relu(jnp.round(2 * jax.random.normal(jax.random.key(0), shape)) / 2)
    out = max_pool(x, window)
    np.testing.assert_array_equal(out, _plain_max_pool(x, window))
    cotangent = jax.random.normal(jax.random.key(1), out.shape)
    grad = jax.vjp(lambda x: max_pool(x, window), x)[1](cotangent)[0]
    want = jax.vjp(lambda x: _plain_max_pool(x, window), x)[1](cotangent)[0]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=0)
    jitted = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, window) * cotangent)))(x)
    np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=0)


def test_max_pool_gradient_in_bfloat16_matches_the_plain_one():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4)).astype(jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(1), (2, 3, 3, 4)).astype(jnp.bfloat16)
    grad = jax.vjp(lambda x: max_pool(x, 2), x)[1](cotangent)[0]
    want = jax.vjp(lambda x: _plain_max_pool(x, 2), x)[1](cotangent)[0]
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad.astype(np.float32), want.astype(np.float32))
