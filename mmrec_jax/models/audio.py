"""The audio tower: a Conv1d tower over the raw waveform or over a log-mel spectrogram.

`frontend="raw"` is the original design: the waveform is a 1-channel sequence; per
block a kernel-3 conv (same padding), ReLU and 2x max-pool; then flatten, a dense
layer with ReLU and a projection to the fusion width (the original: 56 samples,
Conv 1->64, Conv 64->128, Dense 128*14 -> 512; `configs/seed.py`).

`frontend="logmel"` computes a log-mel spectrogram in JAX (zero-padded centred frames,
periodic Hann window, power spectrum by `rfft`, a Slaney-style mel filterbank with
Slaney area normalisation as in librosa's default, natural log with a floor), then
normalises each clip (LayerNorm over frames and bins) and runs the same conv blocks
over the frames, with the mel bins as input channels.
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

FRONTENDS = ("raw", "logmel")

# Floor of the mel power before the log (librosa's `power_to_db` amin).
LOG_FLOOR = 1e-10

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Frequency in Hz -> Slaney mel (librosa's `hz_to_mel(htk=False)`)."""
    hz = np.asarray(hz, np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    log = _SLANEY_BREAK_MEL + np.log(np.maximum(hz, 1e-12) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_BREAK_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Slaney mel -> frequency in Hz (the inverse of `hz_to_mel`)."""
    mel = np.asarray(mel, np.float64)
    linear = mel * _SLANEY_HZ_PER_MEL
    log = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return np.where(mel >= _SLANEY_BREAK_MEL, log, linear)


def mel_filterbank(
    sample_rate: int, n_fft: int, mel_bins: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular mel filters with Slaney area normalisation.

    Filter i rises from mel point i to i+1 and falls to i+2, over `mel_bins + 2` points
    equally spaced on the Slaney mel scale between `fmin` and `fmax`; each filter is
    scaled by 2 / (its bandwidth in Hz), so every filter has the same area.

    Returns:
      (n_fft // 2 + 1, mel_bins) float32 weights, applied as `power @ weights`.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # (F,) bin k at k * rate / n_fft
    points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), mel_bins + 2))  # (M+2,)
    lower, center, upper = points[:-2, None], points[1:-1, None], points[2:, None]  # (M, 1)
    rising = (fft_hz[None, :] - lower) / (center - lower)  # (M, F)
    falling = (upper - fft_hz[None, :]) / (upper - center)  # (M, F)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (M, F)
    weights *= 2.0 / (upper - lower)
    return weights.T.astype(np.float32)  # (F, M)


def log_mel_spectrogram(
    audio: jax.Array, sample_rate: int, n_fft: int, hop_length: int, mel_bins: int
) -> jax.Array:
    """Log-mel spectrogram of mono waveforms, computed in float32.

    Frames are centred: frame j holds the `n_fft` samples from j * hop_length - n_fft // 2
    on (zeros outside the clip), for j = 0 .. T // hop_length, each multiplied by a
    periodic Hann window; the power spectrum |rfft|^2 is mapped by `mel_filterbank` and
    the result is `log(max(mel_power, LOG_FLOOR))`. These are the frames of `torch.stft`
    and librosa with `center=True`, which for an odd `n_fft` leave out the last one when
    `hop_length` divides T.

    Args:
      audio: (U, T) waveforms in [-1, 1].
      sample_rate: in Hz.
      n_fft: FFT size (frame length) in samples.
      hop_length: samples between frame starts.
      mel_bins: mel filters.

    Returns:
      (U, 1 + T // hop_length, mel_bins) float32.
    """
    audio = jnp.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(
            f"log_mel_spectrogram takes waveforms of shape (U, T); got {audio.shape}. Add "
            "the leading axis for a single clip: audio[None]."
        )
    num_samples = audio.shape[-1]
    if num_samples < n_fft // 2 + 1:
        raise ValueError(
            f"Audio clips of {num_samples} samples are too short for n_fft={n_fft}; "
            "lower config.model.audio.n_fft or raise clip_samples."
        )
    pad = n_fft // 2  # before the clip; after it, enough for the last frame to fit
    x = jnp.pad(audio.astype(jnp.float32), ((0, 0), (pad, n_fft - pad)))  # (U, T + n_fft)
    num_frames = 1 + num_samples // hop_length
    starts = np.arange(num_frames) * hop_length
    index = starts[:, None] + np.arange(n_fft)[None, :]  # (F, n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = x[:, index] * window.astype(np.float32)  # (U, F, n_fft)
    spectrum = jnp.fft.rfft(frames, axis=-1)  # (U, F, n_fft // 2 + 1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    weights = mel_filterbank(sample_rate, n_fft, mel_bins)  # (n_fft // 2 + 1, M)
    mel = jnp.einsum("ufk,km->ufm", power, weights, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, LOG_FLOOR))  # (U, F, M)


class AudioTower(nn.Module):
    """Audio tower for (U, T) float waveforms.

    Attributes:
      config: `config.model.audio` (frontend, sample_rate, clip_samples, n_fft,
        hop_length, mel_bins, channels, hidden).
      width: output width (the fusion token width).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    config: ml_collections.ConfigDict
    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __call__(self, audio: jax.Array, present: jax.Array | None = None) -> jax.Array:
        """Encodes waveforms; a large item block in chunks (`layers.apply_in_chunks`).

        Args:
          audio: (U, T) float waveforms, T = config.clip_samples.
          present: (U,) bool, whether each slot holds a clip; a large block's chunks
            without one are skipped and get zeros (None: every chunk is encoded).

        Returns:
          (U, width).
        """
        cfg = self.config
        dtype = input_dtype(audio)  # as passed: jnp.asarray would turn int64 into int32
        audio = jnp.asarray(audio)
        if audio.ndim != 2 or audio.shape[1] != cfg.clip_samples:
            raise ValueError(
                f"Audio tower expects waveforms of shape (U, {cfg.clip_samples}) "
                f"(config.model.audio.clip_samples); got {audio.shape}."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"Audio tower expects float waveforms in [-1, 1]; got {dtype}. Scale "
                "integer PCM to floats first (int16: divide by 32768)."
            )
        return apply_in_chunks(self, "encode", audio, present)

    @nn.compact
    def encode(self, audio: jax.Array) -> jax.Array:
        """(U, T) float waveforms -> (U, width), in one go."""
        cfg = self.config
        if cfg.frontend == "raw":
            x = audio.astype(self.dtype)[..., None]  # (U, T, 1)
        elif cfg.frontend == "logmel":
            x = log_mel_spectrogram(
                audio, cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.mel_bins
            )  # (U, F, M)
            x = nn.LayerNorm(
                reduction_axes=(-2, -1),
                feature_axes=-1,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                name="spec_norm",
            )(x).astype(self.dtype)  # (U, F, M)
        else:
            raise ValueError(
                f"config.model.audio.frontend={cfg.frontend!r}; choose one of {FRONTENDS}."
            )
        if x.shape[1] >> len(cfg.channels) < 1:
            raise ValueError(
                f"Audio input of length {x.shape[1]} (samples or frames) is too short for "
                f"{len(cfg.channels)} 2x pooling blocks; use fewer config.model.audio.channels."
            )
        for i, channels in enumerate(cfg.channels):
            x = Conv(
                channels,
                (3,),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x)
            x = max_pool(nn.relu(x), 2)  # (U, T / 2^(i+1), C_i)
        x = flatten_rows(x)  # (U, T' * C)
        x = Dense(cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(x)
        x = nn.relu(x)  # (U, hidden)
        return Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="project")(
            x
        )  # (U, width)
