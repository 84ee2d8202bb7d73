"""The image tower: the original design's small conv net over RGB images.

Per block: 3x3 conv (same padding), ReLU, 2x2 max-pool; then flatten, a dense layer
with ReLU (the original's 512-wide output) and a projection to the fusion width. The
original is Conv 3->64, Conv 64->128 on 56x56 inputs, Dense 128*14*14 -> 512
(`configs/seed.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmrec_jax.models.layers import (
    Conv,
    Dense,
    apply_in_chunks,
    flatten_rows,
    input_dtype,
    max_pool,
)

# Per-channel RGB statistics used to normalise pixels (the ImageNet values).
_RGB_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_RGB_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_pixels(image: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 RGB pixels (..., 3) in [0, 255] -> per-channel standardised floats."""
    x = image.astype(jnp.float32) / 255.0
    return ((x - _RGB_MEAN) / _RGB_STD).astype(dtype)


class ImageTower(nn.Module):
    """Conv tower for (U, S, S, 3) uint8 images.

    Attributes:
      config: `config.model.image` (size, channels, hidden, conv_kernel_grad).
      width: output width (the fusion token width).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    config: ml_collections.ConfigDict
    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __call__(self, image: jax.Array, present: jax.Array | None = None) -> jax.Array:
        """Encodes images; a large item block in chunks (`layers.apply_in_chunks`).

        Args:
          image: (U, S, S, 3) uint8 RGB, S = config.size.
          present: (U,) bool, whether each slot holds an image; a large block's chunks
            without one are skipped and get zeros (None: every chunk is encoded).

        Returns:
          (U, width).
        """
        size = self.config.size
        dtype = input_dtype(image)  # as passed: jnp.asarray would turn int64 into int32
        image = jnp.asarray(image)
        if image.ndim != 4 or image.shape[1:] != (size, size, 3):
            raise ValueError(
                f"Image tower expects images of shape (U, {size}, {size}, 3) "
                f"(config.model.image.size={size}); got {image.shape}."
            )
        if dtype != np.uint8:
            raise ValueError(
                f"Image tower expects uint8 RGB pixels in [0, 255]; got {dtype}. Pass the "
                "decoded pixels as they are (float images in [0, 1]: multiply by 255 and round "
                "to uint8); the tower standardises them itself."
            )
        if size >> len(self.config.channels) < 1:
            raise ValueError(
                f"config.model.image.size={size} is too small for "
                f"{len(self.config.channels)} 2x2 pooling blocks; use fewer channels entries."
            )
        return apply_in_chunks(self, "encode", image, present)

    @nn.compact
    def encode(self, image: jax.Array) -> jax.Array:
        """(U, S, S, 3) uint8 images -> (U, width), in one go."""
        x = normalize_pixels(image, self.dtype)  # (U, S, S, 3)
        for i, channels in enumerate(self.config.channels):
            x = Conv(
                channels,
                (3, 3),
                kernel_grad=self.config.conv_kernel_grad,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x)
            x = max_pool(nn.relu(x), 2)  # (U, S / 2^(i+1), S / 2^(i+1), C_i)
        x = flatten_rows(x)  # (U, S' * S' * C)
        x = Dense(
            self.config.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden"
        )(x)
        x = nn.relu(x)  # (U, hidden)
        return Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="project")(
            x
        )  # (U, width)
