"""Small building blocks shared by the towers: pooling, dropout, masked means, attention,
and the checks of their inputs and variables.

These are the model's fast paths on XLA's CPU backend as well as plain layers. Three of
them apply only where JAX compiles for the CPU (`cpu_fast_paths`); on GPU and TPU the
plain forms are the fast ones:

- `max_pool` is the elementwise maximum of the window's strided slices, with a custom
  backward pass that routes each gradient to its window's first maximum (row-major) by
  elementwise selects: the values and gradients of `flax.linen.max_pool` (and of
  PyTorch's `MaxPool`), whose `reduce_window` / `select_and_scatter` pair is slow on
  CPU, as is the autodiff of a reshape-and-max (a small-axis reduction and a broadcast
  per window, and it splits the gradient between tied maxima).
- `Dropout` draws its mask from a counter-based integer hash of the element index keyed
  by the module's rng, one fused elementwise pass: the threefry bits behind
  `flax.linen.Dropout` cost about 10 ns per element on CPU (75 ms for the 7.5 M
  dropout draws of one MiniLM training step at 32 tokens, 16x the hash).
- `Conv` (stride 1, same padding) computes its gradients on CPU as forward convolutions
  in the NHWC / HWIO layout (`conv_same`'s custom VJP): XLA's own convolution gradients use
  transposed layouts that its CPU backend runs 40-130x slower inside a loop or a
  conditional (as the item-block chunks below run them); outside them the default
  config's train step measured the same either way (398-401 vs 404-405 ms). The
  kernel gradient can instead be im2col matrix multiplies over cache-sized chunks of
  the batch (`kernel_grad="im2col"`). Measured on a 2-core CPU (jax 0.10.2), XLA's
  kernel gradient was fast for small batches (about 190 GFLOP/s at 32 images of
  28x28x64 -> 128) and slower for large ones (34 GFLOP/s at 352), where the chunked
  im2col was about 2x faster for that conv; inside the whole image tower the two
  measured the same. Hence an option. On GPU and TPU it takes XLA's own gradients
  (`kernel_grad="auto"`), which cuDNN and the TPU compiler run directly.
- `Dense` (every dense layer of the model, BERT's included) and `MultiHeadAttention`'s
  projections compute their kernel gradients as `x^T @ grad` in the kernel's (In, Out)
  layout (`dense_product`'s custom VJP), where autodiff computes `grad^T @ x` and
  transposes it; on the CPU that product then runs on YNNPACK's matrix multiply instead
  of XLA's own dot, without the transpose: a MiniLM fine-tuning step 7-10% faster.
  Everywhere, not only on the CPU (the same products; not measured on GPU or TPU yet).
- `apply_in_chunks` / `encode_in_chunks` run a content tower over a large item block
  chunk by chunk (`schema.BLOCK_CHUNKS`) on CPU, skipping the chunks that hold no item
  with its modality: the padding of a block its batch does not fill. On GPU and TPU a
  block is encoded in one go: on an H200 the seed config's train step (batch 1024,
  BERT-base) took 600 ms with the chunks' loop and conditionals, 172 ms without.
- `attention_by_broadcast`: attention over a few keys (the fusion's self-attention over
  its handful of tokens) as broadcast products and sums, which fuse into a few
  elementwise passes, where XLA's CPU backend runs `jax.nn.dot_product_attention`'s
  products as many tiny matrix multiplies; for the forward pass of scoring and ranking
  (`MultiHeadAttention`'s `inference`), which it makes faster, not in training, whose
  step it did not.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import schema


def input_dtype(x: Any) -> np.dtype:
    """The dtype of an input as the caller passed it, before any conversion.

    `jnp.asarray` turns float64 into float32 and int64 into int32 (64-bit types are off
    by default), so a dtype check after it would name a dtype the caller never passed.
    An array's own dtype (numpy, JAX, a tracer); else the one numpy gives it (lists,
    scalars, arrays of other libraries).
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        try:
            return np.dtype(dtype)
        except TypeError:
            pass
    return np.asarray(x).dtype


def check_has_params(module: nn.Module, what: str = "The model") -> None:
    """Refuses variables without a "params" collection: the bare parameter tree.

    `module.apply(params, ...)` with the tree `init` returned under "params" reads its
    top-level keys as collections, and Flax then fails deep inside with a scope error.

    Args:
      module: a bound module.
      what: the module as the message names it ("The model": "The model's variables").

    Only the module applied at the top is checked: inside a model, a submodule's
    variables are its part of the tree, and Flax names the part a tree lacks.

    Raises:
      ValueError: the module is applied (not initialized) without "params".
    """
    if module.scope.parent is not None:
        return
    if module.is_initializing() or "params" in module.variables:
        return
    found = ", ".join(repr(k) for k in sorted(module.variables))
    held = f"hold {found} but" if found else "hold"
    raise ValueError(
        f"{what}'s variables {held} no 'params': pass "
        "{'params': params}, as init returns them, not the parameter tree itself."
    )


def flatten_rows(x: jax.Array) -> jax.Array:
    """(N, ...) -> (N, F), F the product of the other axes; also for N = 0.

    `x.reshape(N, -1)` cannot infer F from an empty array (it divides by N).
    """
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _window_slices(x: jax.Array, window: int) -> tuple[list[jax.Array], list[int]]:
    """The strided slices of `x` at each offset of a non-overlapping window.

    Returns:
      ([x[:, o1::w, o2::w, ..., :] cropped to whole windows, for every offset in
      row-major order], the pooled size of each spatial axis).
    """
    spatial = x.shape[1:-1]
    pooled = [s // window for s in spatial]
    slices = []
    for offset in itertools.product(range(window), repeat=len(spatial)):  # row-major
        index = (slice(o, o + p * window, window) for o, p in zip(offset, pooled, strict=True))
        slices.append(x[(slice(None), *index, slice(None))])  # (N, *pooled, C)
    return slices, pooled


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: int) -> jax.Array:
    return functools.reduce(jnp.maximum, _window_slices(x, window)[0])


def _max_pool_fwd(x, window):
    pooled = _max_pool(x, window)
    return pooled, (x, pooled)


def _max_pool_bwd(window, residuals, grad):
    x, pooled = residuals
    slices, sizes = _window_slices(x, window)
    # The offset of each window's first maximum in row-major order: one elementwise pass
    # over the slices, which XLA fuses into the gradient's selects below.
    first = jnp.full(pooled.shape, len(slices) - 1, jnp.int32)
    for offset in reversed(range(len(slices) - 1)):
        first = jnp.where(slices[offset] == pooled, offset, first)
    parts = [jnp.where(first == offset, grad, 0) for offset in range(len(slices))]
    parts = jnp.stack(parts, axis=-2)  # (N, *pooled, w^n, C)
    n = len(sizes)
    parts = parts.reshape(*parts.shape[:-2], *([window] * n), parts.shape[-1])
    # (N, p1, ..., pn, w1, ..., wn, C) -> (N, p1, w1, ..., pn, wn, C): the input's layout.
    order = [0, *(a for i in range(n) for a in (1 + i, 1 + n + i)), 1 + 2 * n]
    whole = [size * window for size in sizes]
    grad_x = jnp.transpose(parts, order).reshape(x.shape[0], *whole, x.shape[-1])
    remainder = [(0, s - w) for s, w in zip(x.shape[1:-1], whole, strict=True)]
    return (jnp.pad(grad_x, [(0, 0), *remainder, (0, 0)]),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling over every spatial axis.

    Equals `nn.max_pool(x, (window,) * n, strides=(window,) * n, padding="VALID")`: a
    trailing remainder of an axis that does not fill a window is dropped (as PyTorch's
    `MaxPool` does). The gradient goes to each window's first maximum in row-major order,
    as with `nn.max_pool` and PyTorch; see the module docstring for why it has its own
    backward pass.

    Args:
      x: (N, *spatial, C), e.g. (N, H, W, C) images or (N, T, C) sequences.
      window: window size and stride on every spatial axis.

    Returns:
      (N, *(s // window for s in spatial), C).
    """
    spatial = x.shape[1:-1]
    if not spatial:
        raise ValueError(f"max_pool needs (N, *spatial, C) input; got shape {x.shape}.")
    if any(s < window for s in spatial):
        raise ValueError(
            f"max_pool window {window} is larger than the spatial shape {spatial}; "
            "use a larger input or fewer pooling blocks."
        )
    return _max_pool(x, window)


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective avalanche hash of uint32 values ("lowbias32": xor-shift-multiply)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(rng: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """A Bernoulli(`keep_prob`) mask from a counter-based hash keyed by `rng`.

    Element i is kept when hash(i) < keep_prob * 2**32, where the hash mixes i with two
    32-bit words drawn from `rng` in two rounds of `_mix32`. The same `rng` gives the
    same mask; different keys give independent-looking masks.

    Args:
      rng: a PRNG key.
      keep_prob: probability of True, in [0, 1].
      shape: the mask's shape; at most 2**32 elements.

    Returns:
      bool array of `shape`.
    """
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"keep_mask draws at most 2**32 elements; got shape {shape}.")
    if keep_prob >= 1.0:
        return jnp.ones(shape, bool)
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    hashed = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    return hashed < jnp.uint32(int(keep_prob * 2**32))


class Dropout(nn.Module):
    """`flax.linen.Dropout` with its mask from `keep_mask` (see the module docstring).

    Zeroes each element with probability `rate` and scales the others by
    1 / (1 - rate), using the rng stream `rng_collection`.

    Attributes:
      rate: the probability of dropping an element.
      rng_collection: the rng stream the mask is keyed by.
    """

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """x, unchanged when `deterministic` or the rate is 0, else dropped and rescaled."""
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = keep_mask(self.make_rng(self.rng_collection), keep_prob, x.shape)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def _same_padding(kernel_size: tuple[int, ...]) -> list[tuple[int, int]]:
    """XLA's "SAME" padding for stride 1: (k - 1) // 2 before, the rest after."""
    return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size]


def _conv(
    x: jax.Array,
    kernel: jax.Array,
    padding: list[tuple[int, int]] | None = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Stride-1 convolution, (N, *spatial, C_in) x (*k, C_in, C_out); SAME padding by default."""
    spatial = "HWD"[: x.ndim - 2]
    numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * (x.ndim - 2),
        padding=_same_padding(kernel.shape[:-2]) if padding is None else padding,
        dimension_numbers=numbers,
        preferred_element_type=preferred_element_type,
    )


def im2col(x: jax.Array, kernel_size: tuple[int, ...]) -> jax.Array:
    """Same-padded, stride-1 patches of `x`, ordered like a (*kernel_size, C, O) kernel.

    Args:
      x: (N, *spatial, C).
      kernel_size: window per spatial axis.

    Returns:
      (N, *spatial, prod(kernel_size) * C), entry [n, *s, (*k, c)] = padded x[n, *(s + k), c].
    """
    spatial = x.shape[1:-1]
    padded = jnp.pad(x, [(0, 0), *_same_padding(kernel_size), (0, 0)])
    shifts = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):  # row-major
        index = tuple(slice(o, o + n) for o, n in zip(offset, spatial, strict=True))
        shifts.append(padded[(slice(None), *index, slice(None))])  # (N, *spatial, C)
    patches = jnp.stack(shifts, axis=-2)  # (N, *spatial, prod(k), C)
    return patches.reshape(*x.shape[:-1], len(shifts) * x.shape[-1])


# Bytes of im2col patches the kernel gradient builds at once: chunks this size stay in
# the CPU's cache, where one patch matrix for a whole batch would not.
PATCH_CHUNK_BYTES = 8 * 2**20


def conv_kernel_grad_im2col(
    x: jax.Array, grad: jax.Array, kernel_size: tuple[int, ...]
) -> jax.Array:
    """The kernel gradient of a stride-1 same-padded conv as im2col matrix multiplies.

    The batch is processed in chunks of about `PATCH_CHUNK_BYTES` of patches (a
    `lax.scan`); chunk j holds items j, j + steps, j + 2 * steps, ..., so a batch
    sharded in contiguous blocks keeps its sharding inside each chunk.

    Args:
      x: (N, *spatial, C_in) the conv's input.
      grad: (N, *spatial, C_out) the gradient of its output.
      kernel_size: window per spatial axis.

    Returns:
      (*kernel_size, C_in, C_out) float32.
    """
    n, c_in, c_out = x.shape[0], x.shape[-1], grad.shape[-1]
    taps = math.prod(kernel_size) * c_in
    per_item = math.prod(x.shape[1:-1]) * taps * x.dtype.itemsize
    chunk = max(1, min(n, PATCH_CHUNK_BYTES // per_item))
    steps = -(-n // chunk)

    def step(acc, inputs):
        xs, gs = inputs  # (chunk, *spatial, C_in), (chunk, *spatial, C_out)
        patches = im2col(xs, kernel_size).reshape(-1, taps)  # (P, K * C_in)
        return acc + jnp.einsum(
            "pk,po->ko", patches, gs.reshape(-1, c_out), preferred_element_type=jnp.float32
        ), None

    if steps == 1:
        total, _ = step(jnp.zeros((taps, c_out), jnp.float32), (x, grad))
    else:

        def split(a: jax.Array) -> jax.Array:
            a = jnp.pad(a, [(0, steps * chunk - n)] + [(0, 0)] * (a.ndim - 1))
            return a.reshape(chunk, steps, *a.shape[1:]).swapaxes(0, 1)  # (steps, chunk, ...)

        total, _ = jax.lax.scan(
            step, jnp.zeros((taps, c_out), jnp.float32), (split(x), split(grad))
        )
    return total.reshape(*kernel_size, c_in, c_out)


def conv_input_grad(grad: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient of a stride-1 same-padded conv, as a forward convolution.

    The gradient's convolution with the spatially flipped kernel, its input and output
    channels swapped, padded the other way round.

    Args:
      grad: (N, *spatial, C_out) the gradient of the conv's output.
      kernel: (*kernel_size, C_in, C_out).

    Returns:
      (N, *spatial, C_in).
    """
    kernel_size = kernel.shape[:-2]
    flipped = jnp.flip(kernel, tuple(range(len(kernel_size)))).swapaxes(-1, -2)  # (*k, O, I)
    padding = [(after, before) for before, after in _same_padding(kernel_size)]
    return _conv(grad, flipped, padding)


def conv_kernel_grad_as_conv(
    x: jax.Array, grad: jax.Array, kernel_size: tuple[int, ...]
) -> jax.Array:
    """The kernel gradient of a stride-1 same-padded conv, as a forward convolution.

    The input's channels take the batch's place and its batch the channels' (C_in, *spatial,
    N); the output gradient, as (*spatial, N, C_out), is the kernel whose window spans
    the whole input: the result's spatial extent is the kernel's.

    Args:
      x: (N, *spatial, C_in) the conv's input.
      grad: (N, *spatial, C_out) the gradient of its output.
      kernel_size: window per spatial axis.

    Returns:
      (*kernel_size, C_in, C_out) float32.
    """
    lhs = jnp.moveaxis(x, (0, -1), (-1, 0))  # (C_in, *spatial, N)
    rhs = jnp.moveaxis(grad, 0, -2)  # (*spatial, N, C_out)
    out = _conv(lhs, rhs, _same_padding(kernel_size), jnp.float32)  # (C_in, *k, C_out)
    return jnp.moveaxis(out, 0, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, kernel_grad: str = "xla") -> jax.Array:
    """Stride-1, same-padded convolution whose gradients are forward convolutions.

    The input gradient is `conv_input_grad`; the kernel gradient is
    `conv_kernel_grad_as_conv` ("xla") or `conv_kernel_grad_im2col` ("im2col").
    Every convolution is then in the NHWC / HWIO layout, which XLA's CPU backend runs
    fast also inside a loop or a conditional, where the transposed layouts of its own
    convolution gradients run 40-130x slower.

    Args:
      x: (N, *spatial, C_in), 1 to 3 spatial axes.
      kernel: (*kernel_size, C_in, C_out).
      kernel_grad: "xla" or "im2col".

    Returns:
      (N, *spatial, C_out), equal to `jax.lax.conv_general_dilated` with SAME padding.

    Reverse-mode only (`jax.grad`, `jax.vjp`), as every custom VJP: forward mode
    (`jax.jvp`, `jax.jacfwd`) is not defined for it.
    """
    _check_kernel_grad(kernel_grad, FORWARD_CONV_KERNEL_GRADS)
    return _conv(x, kernel)


def _check_kernel_grad(kernel_grad: str, choices: tuple[str, ...]) -> None:
    if kernel_grad not in choices:
        raise ValueError(f"Conv kernel_grad={kernel_grad!r}; choose one of {choices}.")


@flax.struct.dataclass
class _ProductResiduals:
    """The inputs of `conv_same` or `dense_product`, kept for their custom gradients."""

    x: jax.Array
    kernel: jax.Array
    # Which gradients are needed: a first layer's input (the data) is not differentiated.
    input_grad: bool = flax.struct.field(pytree_node=False)
    kernel_grad: bool = flax.struct.field(pytree_node=False)


def _conv_same_fwd(x, kernel, kernel_grad):
    _check_kernel_grad(kernel_grad, FORWARD_CONV_KERNEL_GRADS)
    out = _conv(x.value, kernel.value)
    return out, _ProductResiduals(x.value, kernel.value, x.perturbed, kernel.perturbed)


def _conv_same_bwd(kernel_grad, residuals, grad):
    if isinstance(grad, jax.custom_derivatives.SymbolicZero):
        return None, None
    x, kernel = residuals.x, residuals.kernel
    grad_x = grad_kernel = None
    if residuals.input_grad:
        grad_x = conv_input_grad(grad, kernel).astype(x.dtype)
    if residuals.kernel_grad:
        kernel_size = kernel.shape[:-2]
        if kernel_grad == "im2col":
            grad_kernel = conv_kernel_grad_im2col(x, grad, kernel_size)
        else:
            grad_kernel = conv_kernel_grad_as_conv(x, grad, kernel_size)
        grad_kernel = grad_kernel.astype(kernel.dtype)
    return grad_x, grad_kernel


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd, symbolic_zeros=True)


# Kernel-gradient implementations of `conv_same`, and the choices of `Conv`: those, XLA's
# own gradients ("native"), or the fast one for the backend ("auto").
FORWARD_CONV_KERNEL_GRADS = ("xla", "im2col")
CONV_KERNEL_GRADS = ("auto", "native", *FORWARD_CONV_KERNEL_GRADS)


def _dense_dimension_numbers(ndim: int) -> tuple:
    """`nn.Dense`'s contraction: the input's last axis with the kernel's first."""
    return (((ndim - 1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_product(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """`x @ kernel` over x's last axis, (..., In) x (In, Out) -> (..., Out), whose kernel
    gradient is computed as (In, Out) directly.

    The same values and gradients as `lax.dot_general`. Autodiff of a dot computes the
    kernel's gradient as `grad^T @ x`, (Out, In), and transposes it; XLA's CPU backend then
    runs that product on its own dot instead of YNNPACK's and pays for the transpose (for
    the image tower's 25088 x 512 kernel, 51 MB a step). Taking `x^T @ grad` made a MiniLM
    fine-tuning step 7-10% faster (`Dense`).
    """
    return jax.lax.dot_general(x, kernel, _dense_dimension_numbers(x.ndim), precision=precision)


def _dense_product_fwd(x, kernel, precision):
    out = dense_product(x.value, kernel.value, precision)
    return out, _ProductResiduals(x.value, kernel.value, x.perturbed, kernel.perturbed)


def _dense_product_bwd(precision, residuals, grad):
    if isinstance(grad, jax.custom_derivatives.SymbolicZero):
        return None, None
    x, kernel = residuals.x, residuals.kernel  # (..., In), (In, Out); grad (..., Out)
    grad_x = grad_kernel = None
    if residuals.input_grad:
        grad_x = jax.lax.dot_general(
            grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())), precision=precision
        ).astype(x.dtype)  # (..., In)
    if residuals.kernel_grad:
        leading = tuple(range(x.ndim - 1))
        grad_kernel = jax.lax.dot_general(
            x, grad, ((leading, leading), ((), ())), precision=precision
        ).astype(kernel.dtype)  # (In, Out)
    return grad_x, grad_kernel


dense_product.defvjp(_dense_product_fwd, _dense_product_bwd, symbolic_zeros=True)


def dense_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: tuple,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.dot_general` for `nn.Dense`'s `dot_general`: `dense_product` for Dense's own
    contraction (the input's last axis with a 2-D kernel's first, equal dtypes, no
    preferred output type), `lax.dot_general` itself for any other."""
    if (
        rhs.ndim == 2
        and lhs.dtype == rhs.dtype
        and preferred_element_type is None
        and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
        and not any(dimension_numbers[1])
    ):
        return dense_product(lhs, rhs, precision)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


class Dense(nn.Dense):
    """`flax.linen.Dense` whose kernel gradient comes out in the kernel's layout
    (`dense_product`): the same parameters, values and gradients."""

    dot_general: Any = dense_dot_general


def cpu_fast_paths() -> bool:
    """Whether the CPU-only fast paths apply: JAX compiles for XLA's CPU backend.

    True when JAX's default backend is the CPU. Then `Conv` takes `conv_same`'s
    gradients, a large item block is encoded in chunks (`apply_in_chunks`) and scoring
    attends over few keys by `attention_by_broadcast`; on GPU and TPU the first two are
    slower than the plain forms, and the last is not measured there (see the module
    docstring).
    """
    return jax.default_backend() == "cpu"


def item_block_chunks(num_slots: int) -> int:
    """How many chunks the content towers encode an item block of `num_slots` in here:
    `schema.block_chunks` on CPU (`cpu_fast_paths`), else 1 (one pass)."""
    return schema.block_chunks(num_slots) if cpu_fast_paths() else 1


def resolve_kernel_grad(kernel_grad: str) -> str:
    """`Conv`'s kernel gradient: "auto" is "xla" on CPU (`cpu_fast_paths`), else "native"."""
    _check_kernel_grad(kernel_grad, CONV_KERNEL_GRADS)
    if kernel_grad == "auto":
        return "xla" if cpu_fast_paths() else "native"
    return kernel_grad


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, padding="SAME")` with a choice of gradients.

    Same parameters (`kernel` (*kernel_size, C_in, C_out), `bias` (C_out,)), the same
    initialisers and the same output as `flax.linen.Conv`. Its gradients are forward
    convolutions with `kernel_grad="xla"` (`conv_same`; reverse mode only), the same
    with the kernel's from `conv_kernel_grad_im2col` with "im2col", XLA's own with
    "native", and with "auto" (the default) "xla" on CPU and "native" on GPU and TPU.

    Attributes:
      features: output channels.
      kernel_size: window per spatial axis.
      kernel_grad: "auto", "native", "xla" or "im2col".
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    features: int
    kernel_size: tuple[int, ...]
    kernel_grad: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, *spatial, C_in) -> (N, *spatial, features)."""
        kernel_size = tuple(self.kernel_size)
        if x.ndim != len(kernel_size) + 2:
            raise ValueError(
                f"Conv with kernel_size {kernel_size} needs (N, *spatial, C) input with "
                f"{len(kernel_size)} spatial axes; got shape {x.shape}."
            )
        kernel_grad = resolve_kernel_grad(self.kernel_grad)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if kernel_grad == "native":
            return _conv(x, kernel) + bias
        return conv_same(x, kernel, kernel_grad) + bias


def encode_in_chunks(
    encode: Callable[..., jax.Array],
    inputs: Any,
    present: jax.Array | None,
    chunks: int,
    rng: jax.Array | None = None,
    unroll: bool = False,
) -> jax.Array:
    """`encode` over an item block chunk by chunk, skipping chunks without a present item.

    Chunk c is the slots s with s % chunks == c (`schema.slot_order`), so each chunk is
    spread over the devices the block is sharded across. Each chunk runs under a
    `lax.cond`; the chunks run one after the other in a `lax.scan` (one copy of
    `encode` to compile), or unrolled (`unroll`: a copy per chunk, where the loop would
    cost more than the compile time: XLA's CPU backend runs convolutions about 20%
    slower inside a loop).

    Args:
      encode: (chunk_inputs, key) -> (m, ...) rows for the m = U / chunks items of a
        chunk; key is the chunk's rng (None when `rng` is None).
      inputs: a pytree of arrays with U leading rows, U a multiple of `chunks`.
      present: (U,) bool; a chunk where it is all False gets zeros (None: none skipped).
      chunks: the number of chunks.
      rng: a key split over the chunks, or None.
      unroll: unroll the chunks instead of scanning over them.

    Returns:
      (U, ...) in slot order.
    """
    slots = jax.tree.leaves(inputs)[0].shape[0]
    if present is None:
        present = jnp.ones((slots,), bool)

    def by_chunk(x):  # (U, ...) -> (chunks, U / chunks, ...)
        return jnp.swapaxes(x.reshape(slots // chunks, chunks, *x.shape[1:]), 0, 1)

    keys = jax.random.split(rng, chunks) if rng is not None else jnp.zeros((chunks,))

    def run(chunk_inputs, key):
        return encode(chunk_inputs, key if rng is not None else None)

    def encode_or_skip(chunk_inputs, chunk_present, key):
        shape = jax.eval_shape(run, chunk_inputs, key)
        return jax.lax.cond(
            chunk_present.any(),
            run,
            lambda *_: jnp.zeros(shape.shape, shape.dtype),
            chunk_inputs,
            key,
        )

    chunked = (jax.tree.map(by_chunk, inputs), by_chunk(present), keys)
    if unroll:
        out = jnp.stack(
            [encode_or_skip(*jax.tree.map(lambda x, c=c: x[c], chunked)) for c in range(chunks)]
        )
    else:
        _, out = jax.lax.scan(lambda carry, chunk: (carry, encode_or_skip(*chunk)), None, chunked)
    return jnp.swapaxes(out, 0, 1).reshape(slots, *out.shape[2:])  # (chunks, m, ...) -> (U, ...)


def apply_in_chunks(
    module: nn.Module,
    method: str,
    inputs: Any,
    present: jax.Array | None,
    *,
    dropout: bool = False,
    unroll: bool = True,
    **kwargs,
) -> jax.Array:
    """`module.<method>(inputs, **kwargs)` over an item block: a large block in chunks.

    A block of U slots with `item_block_chunks(U)` > 1 (on CPU only) runs through
    `encode_in_chunks` (chunks without a present item are skipped); a smaller one, any
    block on GPU and TPU, and any block while the module initializes, in one go.

    Args:
      module: a bound module whose `method` (its compact method) encodes items.
      method: the method's name.
      inputs: the items' content: an array or a pytree of arrays with U leading rows.
      present: (U,) bool, whether each slot holds content (None: every slot does).
      dropout: the method draws dropout masks: each chunk gets its own "dropout" rng,
        split from one the module draws (in one go the method draws its own).
      unroll: unroll the chunks rather than scan over them (see `encode_in_chunks`).
      **kwargs: further keyword arguments of the method.

    Returns:
      (U, ...) the method's output.
    """
    slots = jax.tree.leaves(inputs)[0].shape[0]
    if present is not None and jnp.shape(present) != (slots,):
        raise ValueError(
            f"present must be (U,) = ({slots},), one flag per item of the block; got "
            f"{jnp.shape(present)}."
        )
    chunks = item_block_chunks(slots)
    if chunks == 1 or module.is_initializing():
        return getattr(module, method)(inputs, **kwargs)
    unbound, params = module.clone(parent=None), module.variables["params"]

    def encode(chunk, key):  # (m, ...) inputs -> (m, ...)
        rngs = {} if key is None else {"dropout": key}
        return unbound.apply({"params": params}, chunk, method=method, rngs=rngs, **kwargs)

    rng = module.make_rng("dropout") if dropout else None
    return encode_in_chunks(encode, inputs, present, chunks, rng, unroll)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Mean of `x` over `axis` counting only entries where `mask` is True.

    Masked entries are excluded with `where`, so their content (even inf or NaN) never
    reaches the result; an all-masked slice gives zeros.

    Args:
      x: (..., K, ..., D) values.
      mask: bool with the shape of `x` up to its last axis, e.g. (..., K, ...).
      axis: the axis of `x` to average over (not the last one).

    Returns:
      `x` reduced over `axis`.
    """
    mask = mask[..., None]
    total = jnp.sum(jnp.where(mask, x, 0), axis=axis)
    count = jnp.sum(mask, axis=axis).astype(x.dtype)
    return total / jnp.maximum(count, 1)


def absorbed_attention_is_cheaper(queries: int, keys: int, width: int, num_heads: int) -> bool:
    """Whether `MultiHeadAttention` computes T queries over S keys in the absorbed form.

    Per query the standard form projects every key and value, 2 S D^2 multiply-adds per
    row of keys; the absorbed form maps each query's heads back into the input space
    through the key kernel and projects the attention-weighted inputs through the value
    kernel, 2 T D^2 plus 2 T N S D for the scores and the weighted sums over N heads.
    It is the cheaper one when T (D + N S - S) < S D: one candidate attending over a
    history of 20 items at width 512 with 8 heads costs about a tenth.
    """
    return queries * (width + num_heads * keys - keys) < keys * width


class _ProjectionParams(nn.Module):
    """The kernel and bias of a `nn.DenseGeneral` from `(in_dims)` to `features`.

    Same names, shapes and initialisers (LeCun normal over the flattened kernel, zero
    bias), so the parameter tree and its initial values are those `nn.DenseGeneral`
    creates; returns them instead of applying them.
    """

    in_dims: tuple[int, ...]
    features: tuple[int, ...]
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        def kernel_init(rng, shape, dtype):
            flat = (math.prod(self.in_dims), math.prod(self.features))
            return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)

        kernel = self.param(
            "kernel", kernel_init, (*self.in_dims, *self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), self.features, self.param_dtype)
        return kernel, bias


# Attention over at most this many keys runs as broadcast products on the CPU.
BROADCAST_ATTENTION_MAX_KEYS = 16


def _masked_softmax(logits: jax.Array, mask: jax.Array | None, axis: int, dtype: Any) -> jax.Array:
    """Softmax over `axis` in float32, cast to `dtype`; a logit where `mask` (broadcast
    against `logits`) is False gets the lowest value, so no weight unless all are masked."""
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=axis).astype(dtype)


def sum_of_terms(term: Callable[[int], jax.Array], count: int) -> jax.Array:
    """`term(0) + term(1) + ... + term(count - 1)`, as one chain of elementwise adds.

    XLA fuses the chain with the terms' products into one elementwise pass, where its
    CPU backend runs a reduction over a short axis as a separate, slower pass (see
    `attention_by_broadcast`). Not for a sum that a matrix product consumes: XLA's CPU
    backend then pulls the chain into the product's fusion, which runs it several times
    slower than a batched matrix product would compute the sum (the history attention's
    weighted inputs, which feed its value kernel).
    """
    total = term(0)
    for index in range(1, count):
        total = total + term(index)
    return total


def attention_by_broadcast(
    query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array | None = None
) -> jax.Array:
    """`jax.nn.dot_product_attention` as broadcast products and sums, for few keys.

    The same function (softmax in float32). Over a few tokens, XLA's CPU backend runs
    the query-key and weight-value products as many tiny batched matrix multiplies; as
    elementwise products, a reduction over the head dimension and an unrolled sum over
    the keys (`sum_of_terms`) they fuse instead: with the default config a
    full-catalogue ranking call (4 users x 1000 items, 6 tokens each) took 152-177 ms
    this way with a reduction over the keys against 181-211 ms
    (`benchmarks/serve_throughput.py`); with the keys' sum unrolled, evaluating the
    default run's test and test_cold (`python -m mmrec_jax.evaluate`) took 86-90 s
    instead of 103-113 s (see BENCHMARKS.md). The default train step was not faster with
    it (645-652 against 623-629 ms at best), so `MultiHeadAttention` takes it for
    inference only (2-core CPU, jax 0.10.2).

    Args:
      query: (B, T, N, Dh).
      key, value: (B, S, N, Dh).
      key_mask: (B, S) bool, True for keys that take part; a query whose keys are all
        masked attends uniformly to them.

    Returns:
      (B, T, N, Dh).
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = (query[:, :, None] * key[:, None]).sum(-1) * scale  # (B, T, S, N)
    mask = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, S, 1)
    probs = _masked_softmax(logits, mask, 2, value.dtype)
    return sum_of_terms(
        lambda s: probs[:, :, s, :, None] * value[:, None, s], key.shape[1]
    )  # (B, T, N, Dh)


def grid_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array | None = None
) -> jax.Array:
    """`jax.nn.dot_product_attention` of every query row over every key row.

    The same function as attending from `query` repeated B times to `key` and `value`
    repeated Q times, without repeating either: scoring users against a catalogue, each
    user's keys and values are projected once and each item's query once, and the
    products run as one matrix multiply per key row and head over all Q query rows.

    Args:
      query: (Q, T, N, Dh).
      key, value: (B, S, N, Dh).
      key_mask: (B, S) bool, True for keys that take part; a query whose keys are all
        masked attends uniformly to them.

    Returns:
      (B, Q, T, N, Dh).
    """
    logits = jnp.einsum("qtnh,bsnh->bnqts", query, key) / math.sqrt(query.shape[-1])
    mask = None if key_mask is None else key_mask[:, None, None, None, :]  # (B, 1, 1, 1, S)
    probs = _masked_softmax(logits, mask, -1, value.dtype)
    return jnp.einsum("bnqts,bsnh->bqtnh", probs, value)  # (B, Q, T, N, Dh)


def _project_to_heads(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(..., D) x (D, N, Dh) -> (..., N, Dh), as one `dense_product` with the kernel's
    heads flattened: its gradient comes out in the kernel's layout (see `Dense`)."""
    width, heads, head_dim = kernel.shape
    out = dense_product(x, kernel.reshape(width, heads * head_dim))  # (..., N * Dh)
    return out.reshape(*out.shape[:-1], heads, head_dim)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a key mask; query, key, value and output projections.

    The parameters are those of four `nn.DenseGeneral` layers ("query", "key", "value":
    (D, N, Dh) kernels; "out": (N, Dh, D)). Few queries over many keys (the history
    attention's one candidate over H items) run in the absorbed form, which never
    projects the keys and values (`absorbed_attention_is_cheaper`): the key bias adds
    the same logit to every key of a query and cancels in the softmax, and the value
    bias passes through the weighted sum because the weights sum to one. Otherwise the
    projections feed `jax.nn.dot_product_attention`, or, for inference on the CPU over
    at most `BROADCAST_ATTENTION_MAX_KEYS` keys, `attention_by_broadcast`. All compute
    the same function. The projections are `dense_product`s (the head kernels viewed as
    (D, N * Dh) and (N * Dh, D) matrices), so their kernel gradients come out in the
    kernels' layouts, as `Dense`'s do.

    Attributes:
      num_heads: heads; the model width must be divisible by it.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        key_mask: jax.Array | None = None,
        inference: bool = False,
        grid: bool = False,
    ) -> jax.Array:
        """Attends from `inputs_q` (B, T, D) to `inputs_kv` (B, S, D).

        Args:
          inputs_q: (B, T, D) queries; with `grid`, (Q, T, D).
          inputs_kv: (B, S, D) keys and values.
          key_mask: (B, S) bool, True for keys that take part. A row whose keys are all
            masked attends uniformly to them; callers must ignore such rows' output.
          inference: the call computes no gradients (scoring, not training): picks the
            form that is fastest forward only (the same values either way).
          grid: every one of the Q query rows attends to every one of the B key rows,
            each projected once (`grid_attention`), instead of row b to row b.

        Returns:
          (B, T, D); with `grid`, (B, Q, T, D).
        """
        width = inputs_q.shape[-1]
        heads = self.num_heads
        if width % heads:
            raise ValueError(
                f"Attention width {width} is not divisible by num_heads={heads}; "
                "change config.model.width or the heads."
            )
        head_dim = width // heads
        params = {
            name: _ProjectionParams(dims_in, dims_out, param_dtype=self.param_dtype, name=name)()
            for name, dims_in, dims_out in (
                ("query", (width,), (heads, head_dim)),
                ("key", (width,), (heads, head_dim)),
                ("value", (width,), (heads, head_dim)),
                ("out", (heads, head_dim), (width,)),
            )
        }
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (
            (kernel.astype(self.dtype), bias.astype(self.dtype)) for kernel, bias in params.values()
        )
        inputs_q, inputs_kv = inputs_q.astype(self.dtype), inputs_kv.astype(self.dtype)
        query = _project_to_heads(inputs_q, wq) + bq  # (B or Q, T, N, Dh)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        cheaper = absorbed_attention_is_cheaper(inputs_q.shape[1], inputs_kv.shape[1], width, heads)
        if cheaper and not grid:
            query_in = jnp.einsum("btnh,dnh->bntd", query, wk)  # (B, N, T, D)
            logits = jnp.einsum("bntd,bsd->bnts", query_in, inputs_kv) / math.sqrt(head_dim)
            probs = _masked_softmax(logits, mask, -1, self.dtype)
            mixed = jnp.einsum("bnts,bsd->btnd", probs, inputs_kv)  # (B, T, N, D)
            out = jnp.einsum("btnd,dnh->btnh", mixed, wv) + bv  # (B, T, N, Dh)
        else:
            key = _project_to_heads(inputs_kv, wk) + bk  # (B, S, N, Dh)
            value = _project_to_heads(inputs_kv, wv) + bv  # (B, S, N, Dh)
            few_keys = inputs_kv.shape[1] <= BROADCAST_ATTENTION_MAX_KEYS
            if grid:
                out = grid_attention(query, key, value, key_mask)  # (B, Q, T, N, Dh)
            elif inference and few_keys and cpu_fast_paths():
                out = attention_by_broadcast(query, key, value, key_mask)  # (B, T, N, Dh)
            else:
                out = jax.nn.dot_product_attention(query, key, value, mask=mask)
        out = out.reshape(*out.shape[:-2], width)  # (B, T, D) or (B, Q, T, D)
        return dense_product(out, wo.reshape(width, width)) + bo
