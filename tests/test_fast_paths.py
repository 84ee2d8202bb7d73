"""The model's fast paths against the plain implementations they replace."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmrec_jax.models import bert
from mmrec_jax.models.layers import (
    Dense,
    Dropout,
    MultiHeadAttention,
    absorbed_attention_is_cheaper,
    dense_dot_general,
    keep_mask,
    max_pool,
)


def _flax_max_pool(x, window):
    """`flax.linen.max_pool` over every spatial axis (XLA's reduce_window and its
    select_and_scatter gradient: each window's first maximum gets the gradient)."""
    spatial = len(x.shape) - 2
    return nn.max_pool(x, (window,) * spatial, strides=(window,) * spatial, padding="VALID")


def _torch_max_pool_grad(x, window, cotangent):
    """PyTorch's MaxPool{1,2,3}d gradient for channels-last x (N, *spatial, C)."""
    import torch

    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d}
    pool[3] = torch.nn.functional.max_pool3d
    spatial = x.ndim - 2
    to_first = (0, spatial + 1, *range(1, spatial + 1))  # channels-last -> channels-first
    to_last = (0, *range(2, spatial + 2), 1)
    xt = torch.tensor(np.asarray(x, np.float32)).permute(*to_first).requires_grad_()
    out = pool[spatial](xt, window, window)
    out.backward(torch.tensor(np.asarray(cotangent, np.float32)).permute(*to_first))
    return xt.grad.permute(*to_last).numpy()


@pytest.mark.parametrize(
    "shape,window", [((2, 7, 9, 3), 2), ((3, 11, 4), 2), ((2, 5, 4, 6, 2), 2), ((2, 9, 8, 3), 3)]
)
def test_max_pool_and_its_gradient_match_flax_and_torch(shape, window):
    # Rounded values after a ReLU: many windows hold tied maxima (zeros and repeats).
    x = jax.nn.relu(jnp.round(2 * jax.random.normal(jax.random.key(0), shape)) / 2)
    out = max_pool(x, window)
    np.testing.assert_array_equal(out, _flax_max_pool(x, window))
    cotangent = jax.random.normal(jax.random.key(1), out.shape)
    grad = jax.vjp(lambda x: max_pool(x, window), x)[1](cotangent)[0]
    want = jax.vjp(lambda x: _flax_max_pool(x, window), x)[1](cotangent)[0]
    np.testing.assert_array_equal(grad, want)
    np.testing.assert_array_equal(grad, _torch_max_pool_grad(x, window, cotangent))
    jitted = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, window) * cotangent)))(x)
    np.testing.assert_array_equal(jitted, want)


def test_max_pool_gradient_in_bfloat16_matches_flax():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4)).astype(jnp.bfloat16)
    x = jnp.round(x * 2) / 2  # ties
    cotangent = jax.random.normal(jax.random.key(1), (2, 3, 3, 4)).astype(jnp.bfloat16)
    grad = jax.vjp(lambda x: max_pool(x, 2), x)[1](cotangent)[0]
    want = jax.vjp(lambda x: _flax_max_pool(x, 2), x)[1](cotangent)[0]
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad.astype(np.float32), want.astype(np.float32))


# --- dropout ---------------------------------------------------------------------------


def _tolerance(p, n):
    """Five standard deviations of a frequency estimated from n Bernoulli(p) draws."""
    return 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_keep_mask_has_the_keep_probability_and_no_pattern(keep_prob):
    shape = (64, 12, 32, 32)  # an attention-probability shape, 786k draws
    n = int(np.prod(shape))
    mask = np.asarray(keep_mask(jax.random.key(3), keep_prob, shape)).reshape(-1)
    assert abs(mask.mean() - keep_prob) < _tolerance(keep_prob, n)
    # Neighbours (consecutive counters) and elements 2**k apart are independent.
    for gap in (1, 2, 32, 1024):
        both = np.mean(mask[:-gap] & mask[gap:])
        assert abs(both - keep_prob**2) < _tolerance(keep_prob**2, n - gap), gap
    # Every position of a row is kept equally often (no stripes along an axis).
    per_column = mask.reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(per_column - keep_prob) < _tolerance(keep_prob, n // 32))


def test_keep_mask_is_a_function_of_the_key():
    shape = (1000, 100)
    first = np.asarray(keep_mask(jax.random.key(0), 0.5, shape))
    again = np.asarray(keep_mask(jax.random.key(0), 0.5, shape))
    other = np.asarray(keep_mask(jax.random.key(1), 0.5, shape))
    np.testing.assert_array_equal(first, again)
    # Two keys agree on about half the elements, as independent fair coins would.
    assert abs(np.mean(first == other) - 0.5) < _tolerance(0.5, first.size)


def test_dropout_scales_kept_values_and_matches_flax_in_distribution():
    x = jax.random.normal(jax.random.key(0), (256, 64, 48)) + 2.0
    rate = 0.1
    rngs = {"dropout": jax.random.key(7)}
    ours = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs=rngs))
    flax_out = np.asarray(nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs))
    kept = ours != 0
    np.testing.assert_allclose(ours[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < _tolerance(1 - rate, kept.size)
    # Same expectation as flax's dropout (and as the input).
    assert abs(ours.mean() - float(x.mean())) < 0.01
    assert abs(ours.mean() - flax_out.mean()) < 0.01
    assert abs(ours.std() - flax_out.std()) < 0.01
    # The gradient is the mask over the keep probability.
    grad = jax.grad(lambda x: jnp.sum(Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)))(
        x
    )
    np.testing.assert_allclose(np.asarray(grad), kept / (1 - rate), rtol=1e-6)


def test_dropout_off_and_full():
    x = jnp.arange(12.0).reshape(3, 4)
    rngs = {"dropout": jax.random.key(0)}
    np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
    zeros = Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(zeros, np.zeros((3, 4)))


# --- GELU ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dtype",
    [((5, 7), jnp.float32), ((2, 4, 7), jnp.float32), ((2, 3, 4, 7), jnp.float32),
     ((2, 4, 7), jnp.bfloat16)],
)  # fmt: skip
def test_dense_matches_flax_dense_and_a_float64_reference(shape, dtype):
    """`Dense`: flax's parameters, values and gradients; the gradients are x^T g and g W^T."""
    x = jax.random.normal(jax.random.key(0), shape)
    cotangent = jax.random.normal(jax.random.key(1), (*shape[:-1], 3))
    ours, flax_dense = Dense(3, dtype=dtype), nn.Dense(3, dtype=dtype)
    params = ours.init(jax.random.key(2), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_dense.init(jax.random.key(2), x)
    )

    def loss(module, params, x):
        return jnp.sum(module.apply(params, x).astype(jnp.float32) * cotangent)

    got = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, flax_dense), argnums=(0, 1)))(
        params, x
    )
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
    kernel = np.asarray(params["params"]["kernel"], np.float64)
    x64, g64 = np.asarray(x, np.float64).reshape(-1, 7), np.asarray(cotangent, np.float64)
    g64 = g64.reshape(-1, 3)
    (_, (grads, grad_x)) = got
    np.testing.assert_allclose(grads["params"]["kernel"], x64.T @ g64, rtol=tol, atol=tol)
    np.testing.assert_allclose(grads["params"]["bias"], g64.sum(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.float32(grad_x).reshape(-1, 7), g64 @ kernel.T, rtol=tol, atol=tol
    )


def _equations(jaxpr, scope: str = ""):
    """(name scope, equation) of every equation in a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        where = f"{scope}/{eqn.source_info.name_stack}"
        yield where, eqn
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", None)
            if sub is not None:
                yield from _equations(getattr(sub, "jaxpr", sub), where)


def test_dense_kernel_gradient_is_computed_in_the_kernel_layout():
    """Autodiff of flax's Dense transposes a (Out, In) kernel gradient; `Dense` has none."""
    x = jnp.ones((4, 6, 8))

    def transposes(module):
        params = module.init(jax.random.key(0), x)
        grad = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))
        jaxpr = jax.make_jaxpr(grad)(params).jaxpr
        return any(eqn.primitive.name == "transpose" for _, eqn in _equations(jaxpr))

    assert transposes(nn.Dense(5))
    assert not transposes(Dense(5))


def test_attention_projection_gradients_are_computed_in_the_kernels_layouts():
    """`MultiHeadAttention`'s projections are `dense_product`s: no kernel-shaped transpose
    in its gradient (autodiff of the head einsums transposes each kernel's gradient)."""
    width, heads, tokens = 12, 3, 4
    assert not absorbed_attention_is_cheaper(tokens, tokens, width, heads)
    x = jax.random.normal(jax.random.key(0), (2, tokens, width))
    layer = MultiHeadAttention(heads)
    params = layer.init(jax.random.key(1), x, x)
    kernel_shapes = {dense["kernel"].shape for dense in params["params"].values()}
    assert kernel_shapes == {(width, heads, width // heads), (heads, width // heads, width)}
    grad = jax.grad(lambda p: jnp.sum(layer.apply(p, x, x) ** 2))
    jaxpr = jax.make_jaxpr(grad)(params).jaxpr
    transposed = [
        eqn.outvars[0].aval.shape
        for _, eqn in _equations(jaxpr)
        if eqn.primitive.name == "transpose" and eqn.outvars[0].aval.shape in kernel_shapes
    ]
    assert transposed == []


def test_dense_dot_general_passes_other_contractions_to_lax():
    """Batch dimensions, another contraction or a preferred type: `lax.dot_general` itself."""
    a = jax.random.normal(jax.random.key(0), (2, 3, 4))
    b = jax.random.normal(jax.random.key(1), (2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(
        dense_dot_general(a, b, batched), jax.lax.dot_general(a, b, batched)
    )
    kernel = jax.random.normal(jax.random.key(2), (4, 5))
    plain = (((2,), (0,)), ((), ()))
    want = jax.lax.dot_general(a, kernel, plain, preferred_element_type=jnp.float32)
    got = dense_dot_general(a, kernel, plain, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(got, want)
    first_axis = (((0,), (0,)), ((), ()))
    c = jax.random.normal(jax.random.key(3), (4, 5))
    np.testing.assert_array_equal(
        dense_dot_general(kernel, c, first_axis), jax.lax.dot_general(kernel, c, first_axis)
    )


def test_gelu_matches_jax_exact_gelu_and_torch():
    import torch

    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    ours = np.asarray(bert.gelu(jnp.asarray(x)))
    np.testing.assert_allclose(ours, jax.nn.gelu(x, approximate=False), rtol=0, atol=2e-6)
    want = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=2e-6)
    grad = jax.vmap(jax.grad(bert.gelu))(jnp.asarray(x))
    want_grad = jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate=False)))(x)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=2e-6)


# --- BERT's first-token-only last layer ------------------------------------------------

_TINY_BERT = bert.BertConfig(
    vocab_size=50,
    hidden_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=16,
)


def test_small_table_rows_and_their_gradient_are_a_gather_and_its_gradient():
    table = jax.random.normal(jax.random.key(0), (3, 5))
    ids = jnp.array([[0, 2, 2, 1], [1, 1, 0, 0]])
    weights = jax.random.normal(jax.random.key(1), (2, 4, 5))
    np.testing.assert_array_equal(bert.small_table_rows(table, ids), table[ids])
    got = jax.grad(lambda t: jnp.sum(bert.small_table_rows(t, ids) * weights))(table)
    want = jax.grad(lambda t: jnp.sum(t[ids] * weights))(table)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _scatter_adds(jaxpr, scope: str = "") -> list[tuple[str, str]]:
    """(name scope, output dtype) of every scatter-add in a jaxpr and its sub-jaxprs."""
    return [
        (where, str(eqn.outvars[0].aval.dtype))
        for where, eqn in _equations(jaxpr, scope)
        if eqn.primitive.name == "scatter-add"
    ]


def test_embedding_gradients_scatter_only_into_word_and_position_tables_in_float32():
    """bfloat16 compute, float32 tables: no bfloat16 scatter-add, none for token types."""
    embeddings = bert.BertEmbeddings(_TINY_BERT, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(0), (3, 9), 1, 50)
    token_types = jnp.zeros_like(ids)
    params = embeddings.init(jax.random.key(1), ids, token_types, True)

    def loss(params):
        out = embeddings.apply(params, ids, token_types, True)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    scatters = _scatter_adds(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    tables = sorted(
        name for where, _ in scatters for name in ("word", "position", "token_type")
        if f"/{name}_embeddings/" in where
    )  # fmt: skip
    assert tables == ["position", "word"], scatters
    assert all(dtype == "float32" for _, dtype in scatters), scatters
    grads = jax.jit(jax.grad(loss))(params)["params"]
    got = grads["token_type_embeddings"]["embedding"]
    # Every token is of type 0: its row's gradient is every token's, as is the word table's.
    want = grads["word_embeddings"]["embedding"].sum(0)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], 0)


@pytest.mark.parametrize("top_n", [None, 1])
def test_first_token_only_matches_the_full_bert_and_its_gradients(top_n):
    ids = jax.random.randint(jax.random.key(0), (3, 9), 1, 50)
    mask = jnp.array([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    full = bert.Bert(_TINY_BERT, trainable_top_n=top_n)
    fast = bert.Bert(_TINY_BERT, trainable_top_n=top_n, first_token_only=True)
    params = full.init(jax.random.key(1), ids, mask)
    hidden, pooled = full.apply(params, ids, mask)
    first, fast_pooled = fast.apply(params, ids, mask)
    assert first.shape == (3, 1, 24)
    np.testing.assert_allclose(first[:, 0], hidden[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast_pooled, pooled, rtol=1e-5, atol=1e-6)

    def loss(module, params):
        hidden, pooled = module.apply(params, ids, mask)
        return jnp.sum(jnp.sin(hidden[:, 0])) + jnp.sum(pooled**2)

    for got, want in zip(
        jax.tree.leaves(jax.jit(jax.grad(functools.partial(loss, fast)))(params)),
        jax.tree.leaves(jax.jit(jax.grad(functools.partial(loss, full)))(params)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling,first_only", [("cls", True), ("pooler", True), ("mean", False)])
def test_text_tower_runs_the_first_token_only_for_cls_and_pooler(pooling, first_only):
    from mmrec_jax.models.text import TextTower

    config = ml_collections.ConfigDict(dict(mode="finetune", top_n=0, pooling=pooling))
    tower = TextTower(config, 8, _TINY_BERT)
    items = {"text_ids": jnp.ones((2, 5), jnp.int32), "text_mask": jnp.ones((2, 5))}
    params = tower.init(jax.random.key(0), items)
    jaxpr = str(jax.make_jaxpr(lambda p: tower.apply(p, items))(params))
    # The last layer's feed-forward activation is (U, 1, I) exactly when only CLS is read.
    assert ("f32[2,1,40]" in jaxpr) == first_only


# --- XLA options on CPU ----------------------------------------------------------------


def test_cpu_compiler_options_keep_donated_in_place_updates_right():
    """Copy insertion's region analysis must not let an update clobber a value still read."""
    from mmrec_jax import runtime

    def step(state, rows, grad):
        table = state["table"]
        old_rows = table[rows]  # read before the in-place scatter below
        table = table.at[rows].add(grad)
        momentum = 0.9 * state["momentum"] + jnp.sum(old_rows, axis=0)
        return {"table": table * 0.5, "momentum": momentum}, jnp.sum(old_rows * table[rows])

    def run(options):
        jitted = jax.jit(step, donate_argnums=0, compiler_options=options)
        state = {"table": jnp.arange(60.0).reshape(20, 3), "momentum": jnp.zeros(3)}
        outs = []
        for k in range(4):
            rows = jnp.array([k, 2 * k + 1, 7])
            state, out = jitted(state, rows, jnp.full((3, 3), float(k)))
            outs.append(out)
        return state, outs

    options = runtime.compiler_options("float32")
    assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
    got, want = run(options), run(None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cpu_compiler_options_give_the_same_convolutions_and_gradients():
    from mmrec_jax import runtime
    from mmrec_jax.models.layers import Conv

    options = runtime.compiler_options("float32")
    assert options == runtime.CPU_COMPILER_OPTIONS  # the test backend is XLA's CPU
    assert runtime.compiler_options("bfloat16") is None
    x = jax.random.normal(jax.random.key(0), (4, 10, 10, 3))
    conv = Conv(8, (3, 3))
    params = conv.init(jax.random.key(1), x)

    def loss(params, x):
        return jnp.sum(jnp.tanh(conv.apply(params, x)) * jnp.arange(8.0))

    grad = jax.grad(loss, argnums=(0, 1))
    want = jax.jit(grad)(params, x)
    got = jax.jit(grad, compiler_options=options)(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
