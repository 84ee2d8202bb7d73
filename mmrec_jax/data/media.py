"""Decoding and normalizing item images and audio.

Datasets store each item's image as PNG bytes of an RGB picture and its audio as WAV
bytes of a mono clip (16-bit PCM); the importers convert whatever they are given into
that form, and the pipeline decodes it into the model's arrays:

    image bytes -> uint8 (S, S, 3) RGB          (`decode_image`)
    audio bytes -> float32 (T,) mono in [-1, 1] (`decode_audio`)

Real-world input is converted, never rejected for its form: images of any size and mode
(grayscale, grayscale + alpha, RGBA, palette with or without transparency, 16-bit, CMYK)
become RGB, transparent pixels composited on white; audio of any sample rate and channel
count is mixed down to mono and resampled (`scipy.signal.resample_poly`). Bytes that are
not a readable image or sound raise `MediaError`.
"""

from __future__ import annotations

import io
import math
import struct
import warnings

import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError


class MediaError(ValueError):
    """Bytes that cannot be decoded as an image or as audio."""


# ------------------------------------------------------------------------------ images


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; alpha is composited on a white background."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            # Float pictures hold [0, 1] or [0, 255] values.
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0  # 16-bit range -> 8-bit range
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """Decodes image bytes (JPEG, PNG, or anything PIL reads) into an RGB PIL image.

    Raises:
      MediaError: the bytes are not a readable image.
    """
    if not data:
        raise MediaError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        # Cameras store pictures unrotated with an EXIF orientation tag; apply it.
        return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise MediaError(
            f"image too large to decode safely ({error}); scale it down (for example to "
            "4096 pixels on its longer side)"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise MediaError(f"not a readable image ({type(error).__name__}: {error})") from error


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB pixels -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def normalize_image(data: bytes, max_side: int) -> bytes:
    """Any image's bytes -> PNG bytes of its RGB picture, longer side at most `max_side`.

    Raises:
      MediaError: the bytes are not a readable image.
    """
    image = open_image(data)
    width, height = image.size
    if max(width, height) > max_side:
        factor = max_side / max(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 (size, size, 3) RGB pixels (resized without cropping)."""
    image = open_image(data)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


# ------------------------------------------------------------------------------- audio


# Sound chunk sizes that streaming WAV writers put in place of a length they do not know.
_STREAMED_WAV_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)


def _wav_shortfall(data: bytes) -> tuple[int, int] | None:
    """(declared, present) bytes of sound of a WAV file cut short, else None.

    libsndfile reads a cut WAV file as a shorter clip without a word (its sample count
    comes from the bytes present), so the sound ("data") chunk's size is compared with
    the bytes after it here. A size of 0xFFFFFFFF or 0x7FFFFFFF (placeholders written by
    programs that stream WAV, not knowing the length) declares nothing.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    order = "<" if data[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(data):
        chunk = data[offset : offset + 4]
        (size,) = struct.unpack(order + "I", data[offset + 4 : offset + 8])
        start = offset + 8
        if chunk == b"data":
            present = len(data) - start
            unknown = size in _STREAMED_WAV_SIZES
            return (size, present) if not unknown and present < size else None
        offset = start + size + (size & 1)  # chunks are padded to an even size
    return None


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decodes WAV, FLAC or OGG bytes into a mono float32 waveform and its sample rate.

    Channels are averaged; samples are clipped to [-1, 1].

    Raises:
      MediaError: the bytes are not a readable sound file, are cut short (a WAV file
        holding fewer bytes of sound than its header declares), hold no samples, or
        hold NaN or infinite samples (possible in floating-point WAV files).
    """
    if not data:
        raise MediaError("empty audio file")
    shortfall = _wav_shortfall(data)
    if shortfall is not None:
        declared, present = shortfall
        raise MediaError(
            f"audio file is truncated: its header declares {declared} bytes of sound, the "
            f"file holds {present}; copy or export it again"
        )
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise MediaError(f"not a readable audio file ({error})") from error
    if samples.shape[0] == 0:
        raise MediaError("audio file holds no samples")
    finite = np.isfinite(samples).all(axis=1)  # (n,)
    if not finite.all():
        first = int(np.argmin(finite))
        raise MediaError(
            f"audio holds {int((~finite).sum())} NaN or infinite samples (the first at sample "
            f"{first}); fix or re-export the file"
        )
    mono = samples.mean(axis=1)  # (n,)
    return np.clip(mono, -1.0, 1.0).astype(np.float32), int(rate)


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resamples a mono waveform from `rate` to `target_rate` Hz (polyphase filter)."""
    if rate == target_rate:
        return np.asarray(wave, np.float32)
    from scipy import signal  # imported here: slow to import, and only resampling needs it

    divisor = math.gcd(int(rate), int(target_rate))
    out = signal.resample_poly(wave, target_rate // divisor, rate // divisor)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """The first `length` samples, zero-padded at the end when the clip is shorter."""
    out = np.zeros(length, np.float32)
    count = min(length, wave.shape[0])
    out[:count] = wave[:count]
    return out


def encode_wav(wave: np.ndarray, rate: int) -> bytes:
    """float32 (n,) mono samples in [-1, 1] -> 16-bit PCM WAV bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(wave, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def normalize_audio(data: bytes, rate: int, max_samples: int) -> bytes:
    """Any sound file's bytes -> WAV bytes of its mono clip at `rate` Hz, cut to `max_samples`.

    Raises:
      MediaError: the bytes are not a readable sound file.
    """
    wave, source_rate = read_audio(data)
    # Cut before resampling (with a margin for the filter) so that long files stay cheap.
    keep = math.ceil(max_samples * source_rate / rate) + 64
    wave = resample(wave[:keep], source_rate, rate)[:max_samples]
    return encode_wav(wave, rate)


def decode_audio(data: bytes, rate: int, length: int) -> np.ndarray:
    """Audio bytes -> float32 (length,) mono waveform at `rate` Hz, cropped or zero-padded."""
    wave, source_rate = read_audio(data)
    keep = math.ceil(length * source_rate / rate) + 64
    return fit_length(resample(wave[:keep], source_rate, rate), length)
