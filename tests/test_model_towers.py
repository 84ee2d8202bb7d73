"""Tests of the recommender's building blocks against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.signal

from mmrec_jax import schema, sharding
from mmrec_jax.models import audio as audio_lib
from mmrec_jax.models import layers
from mmrec_jax.models.fusion import Fusion, modality_dropout
from mmrec_jax.models.image import ImageTower
from mmrec_jax.models.layers import (
    Conv,
    MultiHeadAttention,
    absorbed_attention_is_cheaper,
    masked_mean,
    max_pool,
)
from mmrec_jax.models.user import HistoryAttention, IdEmbedding

# Parameter init key; XLA's RngBitGenerator is much cheaper to compile than threefry.
INIT_KEY = jax.random.key(0, impl="rbg")


# --- pooling -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 11, 4)])
def test_max_pool_matches_flax_max_pool(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    window = (2,) * (len(shape) - 2)

    def ours(x):
        return max_pool(x, 2)

    def reference(x):
        return nn.max_pool(x, window, strides=window, padding="VALID")

    np.testing.assert_array_equal(ours(x), reference(x))
    # Random normal inputs have no ties, so the gradients must agree exactly too.
    cotangent = jax.random.normal(jax.random.key(1), reference(x).shape)
    grad_ours = jax.vjp(ours, x)[1](cotangent)[0]
    grad_ref = jax.vjp(reference, x)[1](cotangent)[0]
    np.testing.assert_array_equal(grad_ours, grad_ref)


def test_max_pool_rejects_too_small_input():
    with pytest.raises(ValueError, match="larger than the spatial shape"):
        max_pool(jnp.zeros((1, 1, 4, 3)), 2)


@pytest.mark.parametrize(
    "kernel_grad,shape,kernel_size",
    [
        ("im2col", (5, 6, 7, 3), (3, 3)),
        ("im2col", (5, 9, 2), (3,)),
        ("xla", (5, 6, 7, 3), (3, 3)),
        ("xla", (5, 9, 2), (3,)),
        # Even kernels pad one more after than before: the input gradient pads the other way.
        ("xla", (5, 6, 7, 3), (2, 4)),
        ("im2col", (5, 9, 2), (2,)),
        ("native", (5, 6, 7, 3), (3, 3)),
        ("native", (5, 9, 2), (2,)),
        ("auto", (5, 6, 7, 3), (2, 4)),
    ],
)
def test_conv_matches_flax_conv_and_its_gradients(monkeypatch, kernel_grad, shape, kernel_size):
    # A small chunk budget makes the im2col gradient scan over padded batch chunks.
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 2 * 4 * 9 * 3 * 7 * 6)
    x = jax.random.normal(jax.random.key(0), shape)
    ours = Conv(4, kernel_size, kernel_grad=kernel_grad)
    reference = nn.Conv(4, kernel_size, padding="SAME")
    params = reference.init(INIT_KEY, x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)

    def loss(module, params, x):
        out = module.apply(params, x)
        return jnp.sum(out * jnp.cos(out))

    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-6)
    grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    for got, want in zip(
        jax.tree.leaves(grads(ours, params, x)),
        jax.tree.leaves(grads(reference, params, x)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # One gradient alone (a frozen kernel; data that is not differentiated).
    for argnum in (1, 2):
        one = jax.grad(loss, argnums=argnum)
        for got, want in zip(
            jax.tree.leaves(one(ours, params, x)),
            jax.tree.leaves(one(reference, params, x)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_auto_takes_forward_conv_gradients_on_cpu_and_xla_own_elsewhere(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    conv = Conv(4, (3, 3))
    params = conv.init(INIT_KEY, x)

    def forward_jaxpr():  # conv_same's custom VJP shows in the forward jaxpr
        return str(jax.make_jaxpr(lambda p: conv.apply(p, x))(params))

    assert layers.resolve_kernel_grad("auto") == "xla"  # the tests run on XLA's CPU
    assert "custom_vjp_call" in forward_jaxpr()
    monkeypatch.setattr(layers, "cpu_fast_paths", lambda: False)  # as on a GPU or TPU
    assert layers.resolve_kernel_grad("auto") == "native"
    assert layers.resolve_kernel_grad("im2col") == "im2col"  # a choice is kept anywhere
    assert "custom_vjp_call" not in forward_jaxpr()
    with pytest.raises(ValueError, match="kernel_grad='fast'; choose one of"):
        Conv(4, (3, 3), kernel_grad="fast").init(INIT_KEY, x)


def test_conv_same_names_an_unknown_kernel_gradient():
    x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3))
    with pytest.raises(ValueError, match="kernel_grad='fast'; choose one of"):
        layers.conv_same(x, kernel, "fast")
    with pytest.raises(ValueError, match="kernel_grad='fast'; choose one of"):  # under grad too
        jax.grad(lambda k: layers.conv_same(x, k, "fast").sum())(kernel)


def test_masked_mean_ignores_masked_entries_even_nan():
    x = np.array([[[1.0], [3.0], [np.nan]], [[5.0], [np.inf], [7.0]]], np.float32)
    mask = np.array([[True, True, False], [False, False, False]])
    out = masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=1)
    np.testing.assert_array_equal(out, [[2.0], [0.0]])


def _attention_reference(p, q, kv, mask, heads, xp):
    """Textbook multi-head attention: project keys and values, softmax over the keys."""
    query = xp.einsum("btd,dnh->btnh", q, p["query"]["kernel"]) + p["query"]["bias"]
    key = xp.einsum("bsd,dnh->bsnh", kv, p["key"]["kernel"]) + p["key"]["bias"]
    value = xp.einsum("bsd,dnh->bsnh", kv, p["value"]["kernel"]) + p["value"]["bias"]
    logits = xp.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(q.shape[-1] // heads)
    logits = xp.where(mask[:, None, None, :], logits, -np.inf)
    weights = xp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    attended = xp.einsum("bnts,bsnh->btnh", weights, value)
    return xp.einsum("btnh,nhd->btd", attended, p["out"]["kernel"]) + p["out"]["bias"]


# (T queries, S keys, width, heads, form): one candidate over a history (absorbed), a
# borderline case either side, and self-attention over a few tokens (standard).
ATTENTION_SHAPES = [
    (1, 20, 16, 4, True),
    (3, 5, 8, 2, True),
    (3, 5, 8, 4, False),
    (4, 4, 8, 2, False),
]


@pytest.mark.parametrize("cpu_paths, inference", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("t,s,width,heads,absorbed", ATTENTION_SHAPES)
def test_attention_matches_numpy_reference(
    monkeypatch, t, s, width, heads, absorbed, cpu_paths, inference
):
    # The CPU's broadcast form (inference, few keys) and the other paths, all run here.
    monkeypatch.setattr(layers, "cpu_fast_paths", lambda: cpu_paths)
    broadcast = layers.attention_by_broadcast
    used = []
    monkeypatch.setattr(
        layers, "attention_by_broadcast", lambda *a: used.append(1) or broadcast(*a)
    )
    assert absorbed_attention_is_cheaper(t, s, width, heads) == absorbed
    batch = 3
    rng = np.random.default_rng(0)
    q = rng.normal(size=(batch, t, width)).astype(np.float32)
    kv = rng.normal(size=(batch, s, width)).astype(np.float32)
    mask = rng.random((batch, s)) < 0.6
    mask[:, 0] = True
    layer = MultiHeadAttention(heads)
    params = layer.init(INIT_KEY, q, kv, mask)["params"]
    # Non-zero biases, so that the absorbed form's handling of them is exercised.
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
    out = layer.apply({"params": params}, q, kv, mask, inference)
    expected = _attention_reference(jax.tree.map(np.asarray, params), q, kv, mask, heads, np)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    # Gradients with respect to the parameters and both inputs, against autodiff of the
    # reference written with jax.numpy.
    def loss(fn):
        return lambda p, q, kv: jnp.sum(jnp.sin(fn(p, q, kv)))

    # Compiled: op by op, the backward passes would compile each primitive on its own.
    grads = jax.jit(
        jax.grad(
            loss(lambda p, q, kv: layer.apply({"params": p}, q, kv, mask, inference)), (0, 1, 2)
        )
    )(params, q, kv)
    reference = jax.jit(
        jax.grad(loss(lambda p, q, kv: _attention_reference(p, q, kv, mask, heads, jnp)), (0, 1, 2))
    )(params, q, kv)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert bool(used) == (cpu_paths and inference and not absorbed)


@pytest.mark.parametrize("t,s,width,heads,absorbed", ATTENTION_SHAPES)
def test_grid_attention_matches_attention_over_every_pair_of_rows(t, s, width, heads, absorbed):
    rng = np.random.default_rng(1)
    queries, keys = 4, 3
    q = rng.normal(size=(queries, t, width)).astype(np.float32)
    kv = rng.normal(size=(keys, s, width)).astype(np.float32)
    mask = rng.random((keys, s)) < 0.6
    mask[:, 0] = True
    layer = MultiHeadAttention(heads)
    params = layer.init(INIT_KEY, kv[:, :t], kv, mask)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
    grid = layer.apply({"params": params}, q, kv, mask, grid=True)
    assert grid.shape == (keys, queries, t, width)
    pairs = layer.apply(
        {"params": params},
        np.tile(q, (keys, 1, 1)),
        np.repeat(kv, queries, axis=0),
        np.repeat(mask, queries, axis=0),
    ).reshape(keys, queries, t, width)
    np.testing.assert_allclose(grid, pairs, rtol=1e-5, atol=1e-5)


def test_attention_parameters_are_those_of_dense_general_layers():
    """Checkpoints written with nn.DenseGeneral projections load, and init is unchanged."""

    class DenseGeneralAttention(nn.Module):
        @nn.compact
        def __call__(self, q, kv):
            width, heads = q.shape[-1], 2
            for name in ("query", "key", "value"):
                nn.DenseGeneral((heads, width // heads), name=name)(kv)
            return nn.DenseGeneral(width, axis=(-2, -1), name="out")(
                q.reshape(*q.shape[:-1], heads, width // heads)
            )

    q = np.ones((2, 1, 8), np.float32)
    kv = np.ones((2, 6, 8), np.float32)
    ours = MultiHeadAttention(2).init(INIT_KEY, q, kv)["params"]
    theirs = DenseGeneralAttention().init(INIT_KEY, q, kv)["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


# --- image ---------------------------------------------------------------------------


def _image_config(size=8, channels=(4, 8), hidden=16, conv_kernel_grad="xla"):
    return ml_collections.ConfigDict(
        dict(size=size, channels=channels, hidden=hidden, conv_kernel_grad=conv_kernel_grad)
    )


def test_image_tower_shape_and_param_count():
    cfg = _image_config(size=12, channels=(4, 6), hidden=10)
    tower = ImageTower(cfg, width=7)
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    variables = tower.init(INIT_KEY, images)
    assert tower.apply(variables, images).shape == (3, 7)
    # Conv 3->4 and 4->6 (3x3 + bias), 12 -> 6 -> 3 pixels, Dense 3*3*6 -> 10, Dense 10 -> 7.
    expected = (27 * 4 + 4) + (36 * 6 + 6) + (54 * 10 + 10) + (10 * 7 + 7)
    count = sum(x.size for x in jax.tree.leaves(variables))
    assert count == expected


def test_image_tower_matches_torch_style_reference():
    """The conv stack equals a numpy conv/relu/pool computation with the same weights."""
    cfg = _image_config(size=4, channels=(2,), hidden=3)
    tower = ImageTower(cfg, width=2)
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    params = jax.tree.map(np.asarray, tower.init(INIT_KEY, images)["params"])
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    x = (images / 255.0 - mean) / std  # (N, 4, 4, 3)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = params["conv0"]["kernel"]  # (3, 3, 3, 2)
    conv = np.zeros((2, 4, 4, 2))
    for i in range(4):
        for j in range(4):
            patch = padded[:, i : i + 3, j : j + 3, :]
            conv[:, i, j, :] = np.einsum("nabc,abco->no", patch, kernel)
    conv = np.maximum(conv + params["conv0"]["bias"], 0)
    pooled = conv.reshape(2, 2, 2, 2, 2, 2).max(axis=(2, 4)).reshape(2, -1)
    hidden = np.maximum(pooled @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0)
    expected = hidden @ params["project"]["kernel"] + params["project"]["bias"]
    out = tower.apply({"params": params}, images)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_image_tower_rejects_wrong_size_and_float_pixels():
    tower = ImageTower(_image_config(size=8), width=4)
    with pytest.raises(ValueError, match="config.model.image.size=8"):
        tower.init(INIT_KEY, np.zeros((1, 10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB pixels in .0, 255.; got float32"):
        tower.init(INIT_KEY, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(U, 8, 8, 3\).*got \(8, 8, 3\)"):
        tower.init(INIT_KEY, np.zeros((8, 8, 3), np.uint8))  # one image, no leading axis
    with pytest.raises(ValueError, match="uint8 RGB pixels"):  # a nested list: int64
        tower.init(INIT_KEY, np.zeros((1, 8, 8, 3), np.uint8).tolist())
    with pytest.raises(ValueError, match=r"present must be \(U,\) = \(2,\).*got \(3,\)"):
        tower.init(INIT_KEY, np.zeros((2, 8, 8, 3), np.uint8), np.ones(3, bool))


# --- audio ---------------------------------------------------------------------------


def _slaney_mel(hz):
    """Slaney's Auditory Toolbox mel scale, written out independently of the model."""
    hz = float(hz)
    if hz < 1000.0:
        return 3.0 * hz / 200.0
    return 15.0 + 27.0 * np.log(hz / 1000.0) / np.log(6.4)


def _slaney_hz(mel):
    mel = float(mel)
    if mel < 15.0:
        return 200.0 * mel / 3.0
    return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def _reference_filterbank(sample_rate, n_fft, mel_bins):
    """Triangles between mel-spaced edges, area-normalised, one frequency at a time."""
    top = _slaney_mel(sample_rate / 2)
    edges = [_slaney_hz(top * i / (mel_bins + 1)) for i in range(mel_bins + 2)]
    bank = np.zeros((n_fft // 2 + 1, mel_bins))
    for m in range(mel_bins):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sample_rate / n_fft
            if lo <= f <= mid:
                value = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                value = (hi - f) / (hi - mid)
            else:
                value = 0.0
            bank[k, m] = value * 2.0 / (hi - lo)
    return bank, edges


@pytest.mark.parametrize("n_fft", [256, 255])  # an odd FFT's top bin lies below rate / 2
def test_mel_filterbank_matches_reference(n_fft):
    ours = audio_lib.mel_filterbank(8000, n_fft, 20)
    reference, _ = _reference_filterbank(8000, n_fft, 20)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_fft, samples", [(128, 1000), (127, 1024)])
def test_log_mel_matches_scipy_stft_reference(n_fft, samples):
    sample_rate, hop, mel_bins = 8000, 32, 16
    wave = np.random.default_rng(0).uniform(-1, 1, (2, samples)).astype(np.float32)
    ours = np.asarray(audio_lib.log_mel_spectrogram(wave, sample_rate, n_fft, hop, mel_bins))
    window = scipy.signal.get_window("hann", n_fft)  # periodic
    _, _, spectrum = scipy.signal.stft(
        wave.astype(np.float64),
        window=window,
        nperseg=n_fft,
        noverlap=n_fft - hop,
        boundary="zeros",
        padded=False,
    )  # (2, n_fft // 2 + 1, frames), scaled by 1 / sum(window)
    power = np.abs(spectrum * window.sum()) ** 2
    bank, _ = _reference_filterbank(sample_rate, n_fft, mel_bins)
    expected = np.log(np.maximum(np.einsum("ukf,km->ufm", power, bank), 1e-10))
    assert ours.shape == (2, 1 + samples // hop, mel_bins)
    # An odd n_fft with hop dividing T: scipy (as torch.stft) has no frame centred on T.
    assert expected.shape[1] == ours.shape[1] - (n_fft % 2 and samples % hop == 0)
    np.testing.assert_allclose(ours[:, : expected.shape[1]], expected, rtol=1e-4, atol=1e-3)
    # The last frame is centred on sample (T // hop) * hop, zeros beyond the clip.
    start = (samples // hop) * hop - n_fft // 2
    frame = np.zeros((2, n_fft))
    frame[:, : samples - start] = wave[:, start:]
    power = np.abs(np.fft.rfft(frame * window, axis=-1)) ** 2  # (2, n_fft // 2 + 1)
    last = np.log(np.maximum(power @ bank, 1e-10))
    np.testing.assert_allclose(ours[:, -1], last, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("tone_hz", [440.0, 1000.0, 2500.0])
def test_log_mel_peak_is_the_tone_bin(tone_hz):
    sample_rate, n_fft, hop, mel_bins = 8000, 256, 128, 24
    t = np.arange(4000) / sample_rate
    wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None]
    spec = np.asarray(audio_lib.log_mel_spectrogram(wave, sample_rate, n_fft, hop, mel_bins))
    peak = int(np.argmax(spec[0, 2:-2].mean(axis=0)))  # frames away from the zero padding
    _, edges = _reference_filterbank(sample_rate, n_fft, mel_bins)
    centers = np.array(edges[1:-1])
    assert edges[peak] < tone_hz < edges[peak + 2]  # the peak filter covers the tone
    assert peak == int(np.argmin(np.abs(centers - tone_hz)))


def test_log_mel_floor_on_silence():
    spec = audio_lib.log_mel_spectrogram(np.zeros((1, 512), np.float32), 8000, 64, 32, 8)
    np.testing.assert_allclose(spec, np.log(1e-10), rtol=1e-6)


def _audio_config(frontend, clip_samples, **kw):
    base = dict(
        frontend=frontend,
        sample_rate=8000,
        clip_samples=clip_samples,
        n_fft=64,
        hop_length=32,
        mel_bins=8,
        channels=(4, 6),
        hidden=10,
    )
    return ml_collections.ConfigDict({**base, **kw})


def test_raw_audio_tower_is_the_seed_conv1d_stack():
    cfg = _audio_config("raw", 56, channels=(64, 128), hidden=512)
    tower = audio_lib.AudioTower(cfg, width=16)
    wave = np.random.default_rng(0).uniform(-1, 1, (2, 56)).astype(np.float32)
    variables = tower.init(INIT_KEY, wave)
    params = variables["params"]
    # The seed: Conv1d(1, 64, 3), Conv1d(64, 128, 3), Linear(128 * 14, 512).
    assert params["conv0"]["kernel"].shape == (3, 1, 64)
    assert params["conv1"]["kernel"].shape == (3, 64, 128)
    assert params["hidden"]["kernel"].shape == (128 * 14, 512)
    assert tower.apply(variables, wave).shape == (2, 16)


def test_logmel_audio_tower_shape():
    cfg = _audio_config("logmel", 256)
    tower = audio_lib.AudioTower(cfg, width=5)
    wave = np.random.default_rng(0).uniform(-1, 1, (3, 256)).astype(np.float32)
    variables = tower.init(INIT_KEY, wave)
    # 1 + 256 // 32 = 9 frames -> 4 -> 2 after two pools, 6 channels.
    assert variables["params"]["hidden"]["kernel"].shape == (2 * 6, 10)
    assert tower.apply(variables, wave).shape == (3, 5)


def test_audio_tower_rejects_bad_input():
    tower = audio_lib.AudioTower(_audio_config("raw", 56), width=4)
    with pytest.raises(ValueError, match="clip_samples"):
        tower.init(INIT_KEY, np.zeros((1, 60), np.float32))
    with pytest.raises(ValueError, match="float waveforms in .-1, 1.; got int16"):
        tower.init(INIT_KEY, np.zeros((1, 56), np.int16))
    with pytest.raises(ValueError, match=r"\(U, T\); got \(56,\).*audio\[None\]"):
        audio_lib.log_mel_spectrogram(np.zeros(56, np.float32), 16000, 16, 8, 4)
    tower = audio_lib.AudioTower(_audio_config("mfcc", 56), width=4)
    with pytest.raises(ValueError, match="frontend='mfcc'"):
        tower.init(INIT_KEY, np.zeros((1, 56), np.float32))


@pytest.mark.parametrize("modality", ["image", "raw", "logmel"])
def test_content_towers_encode_an_empty_block(modality):
    """An empty block gives (0, width), as the text tower and the ID embeddings do."""
    if modality == "image":
        tower = ImageTower(_image_config(), width=6)
        content = np.zeros((2, 8, 8, 3), np.uint8)
    else:
        tower = audio_lib.AudioTower(_audio_config(modality, 128), width=6)
        content = np.zeros((2, 128), np.float32)
    variables = tower.init(INIT_KEY, content)
    empty = content[:0]
    assert tower.apply(variables, empty).shape == (0, 6)
    assert tower.apply(variables, empty, np.zeros(0, bool)).shape == (0, 6)
    assert jax.jit(tower.apply)(variables, empty).shape == (0, 6)
    assert layers.flatten_rows(jnp.zeros((0, 2, 3))).shape == (0, 6)


@pytest.mark.parametrize(
    "layer,inputs,needle",
    [
        (ImageTower(_image_config(), width=4), np.zeros((1, 8, 8, 3)), "got float64"),
        (
            ImageTower(_image_config(), width=4),
            np.zeros((1, 8, 8, 3), np.int64).tolist(),
            "got int64",
        ),
        (
            audio_lib.AudioTower(_audio_config("raw", 56), width=4),
            np.zeros((1, 56), np.int64),
            "got int64",
        ),
        (IdEmbedding(num_ids=4, width=3), np.zeros(2), "got float64"),
    ],
    ids=["image-float64", "image-list", "audio-int64", "ids-float64"],
)
def test_dtype_errors_name_the_dtype_as_passed(layer, inputs, needle):
    """Not the one `jnp.asarray` converts it to (64-bit types are off by default)."""
    with pytest.raises(ValueError, match=needle):
        layer.init(INIT_KEY, inputs)


# --- item blocks in chunks ------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_content_towers_encode_a_large_block_in_chunks_skipping_chunks_without_content(
    monkeypatch, modality
):
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 4)  # a block of 32: 8 chunks of 4
    slots = 32
    rng = np.random.default_rng(0)
    if modality == "image":
        tower = ImageTower(_image_config(), width=6)
        content = rng.integers(0, 256, (slots, 8, 8, 3), dtype=np.uint8)
    else:
        tower = audio_lib.AudioTower(_audio_config("logmel", 128), width=6)
        content = rng.uniform(-1, 1, (slots, 128)).astype(np.float32)
    present = np.zeros(slots, bool)
    present[schema.slot_order(slots)[: 3 * 4 - 1]] = True  # 3 of the 8 chunks hold content
    params = tower.init(INIT_KEY, content)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    target = jax.random.normal(jax.random.key(1), (slots, 6))

    def loss(params):  # what the model reads: the outputs of slots with content
        out = tower.apply({"params": params}, content, present)
        return jnp.sum(jnp.where(present[:, None], out, 0) * jnp.sin(out) * target)

    def outputs_and_grads(present):
        apply = jax.jit(lambda p: (tower.apply({"params": p}, content, present), jax.grad(loss)(p)))
        return apply(params)

    chunked, chunked_grads = outputs_and_grads(present)
    # The block sharded over the 8 devices, as a train step shards it: the same outputs.
    placed = jax.device_put((content, present), sharding.data_sharding(sharding.make_mesh()))
    sharded = jax.jit(lambda c, m: tower.apply({"params": params}, c, m))(*placed)
    unflagged = jax.jit(lambda p: tower.apply({"params": p}, content))(params)
    monkeypatch.setattr(schema, "block_chunks", lambda slots: 1)
    whole, whole_grads = outputs_and_grads(present)
    np.testing.assert_allclose(chunked[present], whole[present], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded[present], whole[present], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unflagged, whole, rtol=1e-5, atol=1e-5)  # no flags: every chunk
    # Chunks without content are skipped: zeros, where the tower would give other values.
    chunk_used = np.isin(np.arange(slots) % 8, np.arange(3))
    assert (np.asarray(chunked)[~chunk_used] == 0).all()
    assert (np.abs(np.asarray(whole)[~chunk_used]) > 0).any()
    for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert all(np.any(g != 0) for g in jax.tree.leaves(chunked_grads))


def test_content_towers_encode_a_large_block_in_one_go_on_gpu_and_tpu(monkeypatch):
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 4)  # a block of 32: 8 chunks of 4 on CPU
    slots = 32
    tower = ImageTower(_image_config(), width=6)
    content = np.random.default_rng(0).integers(0, 256, (slots, 8, 8, 3), dtype=np.uint8)
    present = np.zeros(slots, bool)
    present[schema.slot_order(slots)[:5]] = True  # content in the first chunk only
    params = tower.init(INIT_KEY, content)

    def encode():
        apply = jax.jit(lambda p: tower.apply(p, content, present))
        jaxpr = str(jax.make_jaxpr(lambda p: tower.apply(p, content, present))(params))
        return np.asarray(apply(params)), jaxpr

    chunked, chunked_jaxpr = encode()
    assert "cond[" in chunked_jaxpr
    monkeypatch.setattr(layers, "cpu_fast_paths", lambda: False)  # as on a GPU or TPU
    whole, whole_jaxpr = encode()
    assert "cond[" not in whole_jaxpr
    np.testing.assert_allclose(whole[present], chunked[present], rtol=1e-5, atol=1e-5)
    assert (chunked[~present] == 0).any() and (np.abs(whole[~present]) > 0).all()


# --- user ----------------------------------------------------------------------------


def test_id_embedding_maps_unknown_ids_to_the_oov_row():
    layer = IdEmbedding(num_ids=5, width=3)
    ids = np.array([0, 1, 5, 6, -1, 100], np.int32)
    variables = layer.init(INIT_KEY, ids)
    table = variables["params"]["embedding"]["embedding"]
    assert table.shape == (6, 3)
    out = layer.apply(variables, ids)
    np.testing.assert_array_equal(out, table[np.array([0, 1, 5, 0, 0, 0])])


def test_id_embedding_needs_a_vocabulary_and_integer_ids():
    with pytest.raises(ValueError, match="num_users / num_items"):
        IdEmbedding(num_ids=0, width=3).init(INIT_KEY, np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="integer ID-vocabulary indices; got float32"):
        IdEmbedding(num_ids=4, width=3).init(INIT_KEY, np.zeros(2, np.float32))


def test_history_attention_ignores_padding_and_empty_histories():
    rng = np.random.default_rng(0)
    candidate = rng.normal(size=(3, 8)).astype(np.float32)
    history = rng.normal(size=(3, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    layer = HistoryAttention(num_heads=2)
    variables = layer.init(INIT_KEY, candidate, history, mask)
    token, present = layer.apply(variables, candidate, history, mask)
    changed = history.copy()
    changed[~mask] = rng.normal(size=changed[~mask].shape) * 100
    token2, _ = layer.apply(variables, candidate, changed, mask)
    np.testing.assert_array_equal(token, token2)
    changed[~mask] = np.nan  # even NaN: a masked entry's zero weight would not hide it
    np.testing.assert_array_equal(layer.apply(variables, candidate, changed, mask)[0], token)
    np.testing.assert_array_equal(present, [True, True, False])
    np.testing.assert_array_equal(token[2], 0.0)
    # A real history entry does matter.
    changed = history.copy()
    changed[0, 0] = rng.normal(size=8)
    assert not np.allclose(layer.apply(variables, candidate, changed, mask)[0][0], token[0])
    # An integer mask means the same; a mask of another shape is named.
    token3, _ = layer.apply(variables, candidate, history, mask.astype(np.int32))
    np.testing.assert_array_equal(token3, token)
    # Every candidate seen from every history (NaN padding, an empty history) is the
    # token of each (history, candidate) pair.
    candidates = rng.normal(size=(5, 8)).astype(np.float32)
    padded = history.copy()
    padded[~mask] = np.nan
    grid, present_grid = layer.apply(variables, candidates, padded, mask, grid=True)
    assert grid.shape == (3, 5, 8)
    pairs, _ = layer.apply(
        variables,
        np.tile(candidates, (3, 1)),
        np.repeat(padded, 5, axis=0),
        np.repeat(mask, 5, axis=0),
    )
    np.testing.assert_allclose(grid, pairs.reshape(3, 5, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(present_grid, present)
    np.testing.assert_array_equal(grid[2], 0.0)
    with pytest.raises(ValueError, match=r"history_mask \(B, H\); got .* and \(3, 3\)"):
        layer.apply(variables, candidate, history, mask[:, :3])


# --- fusion --------------------------------------------------------------------------


def test_modality_dropout_never_drops_all_item_tokens_nor_user_tokens():
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 0, 1, 0], [0, 1, 0, 1, 1]], bool)
    for seed in range(20):
        out = np.asarray(modality_dropout(jax.random.key(seed), mask, 3, rate=0.7))
        assert not np.any(out & ~np.asarray(mask))  # only drops
        assert np.all(out[:, :3].any(axis=1))  # never all present item tokens
        np.testing.assert_array_equal(out[:, 3:], mask[:, 3:])  # user tokens stay
    rates = [modality_dropout(jax.random.key(s), mask[:1], 3, 0.3)[0, :3] for s in range(300)]
    assert 0.55 < float(np.mean(rates)) < 0.85  # ~0.7 kept (plus the all-dropped fallback)


def _fusion(num_item_tokens=2, modality_rate=0.0):
    cfg = ml_collections.ConfigDict(
        dict(num_layers=2, num_heads=2, mlp_dim=8, dropout=0.0, modality_dropout=modality_rate)
    )
    return Fusion(cfg, num_item_tokens)


def test_fusion_ignores_masked_tokens_and_scores_each_row():
    tokens = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]], bool)
    fusion = _fusion()
    variables = fusion.init(INIT_KEY, tokens, mask)
    logits = fusion.apply(variables, tokens, mask)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    changed = np.where(mask[..., None], tokens, 1e3).astype(np.float32)
    np.testing.assert_array_equal(fusion.apply(variables, changed, mask), logits)
    changed = tokens.copy()
    changed[:, 0] = np.random.default_rng(1).normal(size=(3, 8))
    assert not np.allclose(fusion.apply(variables, changed, mask)[:2], logits[:2])
    np.testing.assert_array_equal(fusion.apply(variables, tokens, mask.astype(np.int32)), logits)
    with pytest.raises(ValueError, match=r"mask \(B, T\); got tokens \(3, 4, 8\) and mask"):
        fusion.apply(variables, tokens, mask[:, :3])


def test_fusion_modality_dropout_only_in_training():
    tokens = np.random.default_rng(0).normal(size=(16, 4, 8)).astype(np.float32)
    mask = np.ones((16, 4), bool)
    fusion = _fusion(num_item_tokens=3, modality_rate=0.5)
    variables = fusion.init(INIT_KEY, tokens, mask)
    eval_logits = fusion.apply(variables, tokens, mask)
    a = fusion.apply(variables, tokens, mask, True, rngs={"dropout": jax.random.key(1)})
    b = fusion.apply(variables, tokens, mask, True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_logits)
