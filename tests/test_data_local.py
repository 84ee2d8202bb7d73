"""Importers (local folder, MovieLens) and real-world media decoding."""

import collections
import csv
import dataclasses
import io
import json
import re
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import tensorflow_datasets as tfds
from PIL import Image

from mmrec_jax import schema
from mmrec_jax.config import load_config
from mmrec_jax.data import builder, local, media, movielens, pipeline

ROOT = Path(__file__).resolve().parents[1]
ML_SMALL = Path("/work/shared/data/ml-latest-small")
if not ML_SMALL.is_dir():  # the same data beside a checkout elsewhere
    ML_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sound(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.sin(2 * np.pi * freq * t)


def records(data_dir, name, config=None):
    full = name if config is None else f"{name}/{config}"
    return {
        split: [source[i] for i in range(len(source))]
        for split, source in tfds.data_source(full, data_dir=str(data_dir)).items()
    }


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------------- media


def test_images_of_any_mode_become_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    np.testing.assert_array_equal(
        media.decode_image(png(Image.fromarray(gray, "L")), 20), np.stack([gray] * 3, -1)
    )
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    on_white = rgba[..., :3] * alpha + 255 * (1 - alpha)
    decoded = media.decode_image(png(Image.fromarray(rgba, "RGBA")), 20).astype(np.float64)
    assert np.abs(decoded - on_white).max() <= 1.0
    palette = Image.new("P", (20, 20))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    indices = (rng.random((20, 20)) < 0.5).astype(np.uint8)
    palette.putdata(indices.ravel().tolist())
    palette.info["transparency"] = 1  # index 1 (blue) is transparent: white on output
    want = np.where(indices[..., None] == 0, [255, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(media.decode_image(png(palette), 20), want)
    deep = rng.integers(0, 65536, (20, 20)).astype(np.uint16)
    decoded = media.decode_image(png(Image.fromarray(deep)), 20)
    np.testing.assert_array_equal(decoded[..., 1], np.clip(np.rint(deep / 257), 0, 255))
    photo = np.zeros((120, 240, 3), np.uint8)
    photo[:, :120] = [200, 30, 30]
    photo[:, 120:] = [30, 30, 200]
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=95)
    small = media.decode_image(buffer.getvalue(), 56)
    assert small.shape == (56, 56, 3)
    assert np.abs(small[:, :20].astype(int) - [200, 30, 30]).max() < 12
    assert np.abs(small[:, -20:].astype(int) - [30, 30, 200]).max() < 12
    stored = Image.open(io.BytesIO(media.normalize_image(buffer.getvalue(), 100)))
    assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == (100, 50)
    with pytest.raises(media.MediaError, match="not a readable image"):
        media.decode_image(b"\x89PNG broken", 56)


def test_exif_orientation_is_applied_and_huge_images_are_named():
    # A camera's portrait picture: stored 40 wide, 20 tall, tagged "rotate 90 clockwise".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = [250, 0, 0]  # left half red: the top half once upright
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    upright = np.asarray(media.open_image(buffer.getvalue()))
    assert upright.shape == (40, 20, 3)
    assert upright[:20, :, 0].min() > 200 and upright[20:, :, 0].max() < 50
    huge = io.BytesIO()
    Image.new("L", (15000, 13000)).save(huge, format="PNG")  # 195 M pixels
    with pytest.raises(media.MediaError, match="image too large to decode safely"):
        media.open_image(huge.getvalue())


@pytest.mark.parametrize(
    "fmt,subtype,rate,atol",
    [("WAV", "FLOAT", 44100, 0.01), ("FLAC", None, 22050, 0.01), ("OGG", "VORBIS", 48000, 0.05)],
)
def test_audio_of_any_rate_and_channels_becomes_mono_at_the_model_rate(fmt, subtype, rate, atol):
    left, right = 0.6 * tone(rate, 0.7), 0.2 * tone(rate, 0.7)
    data = sound(np.stack([left, right], 1), rate, fmt, subtype)
    wave = media.decode_audio(data, 8000, 4000)
    assert wave.shape == (4000,) and wave.dtype == np.float32
    # Mixed down to the mean of the channels, resampled: 0.4 * a 440 Hz sine at 8 kHz.
    expected = 0.4 * tone(8000, 0.5)
    np.testing.assert_allclose(wave[200:-200], expected[200:-200], atol=atol)
    padded = media.decode_audio(data, 8000, 8000)  # 0.7 s of sound, then zeros
    assert np.abs(padded[5800:]).max() == 0.0 and np.abs(padded[:5400]).max() > 0.3
    with pytest.raises(media.MediaError, match="not a readable audio file"):
        media.decode_audio(b"RIFF....WAVEfmt garbage", 8000, 4000)


def test_audio_with_nan_or_infinite_samples_is_refused():
    wave = 0.5 * tone(8000, 0.2)
    wave[[100, 700]] = [np.nan, np.inf]
    data = sound(wave, 8000, "WAV", "FLOAT")
    with pytest.raises(media.MediaError, match="2 NaN or infinite samples .*sample 100"):
        media.read_audio(data)
    with pytest.raises(media.MediaError, match="NaN or infinite"):
        media.decode_audio(data, 8000, 4000)


def test_truncated_wav_is_refused(tmp_path):
    whole = sound(0.5 * tone(8000, 1.0), 8000, "WAV", "PCM_16")  # 8000 samples, 16044 bytes
    assert media.read_audio(whole)[0].shape == (8000,)
    # libsndfile reads a cut file as a shorter clip (28 and 3978 samples here).
    for cut in (100, 8000, len(whole) - 1):
        with pytest.raises(media.MediaError, match="audio file is truncated: its header "):
            media.read_audio(whole[:cut])
    # The sound chunk found past others (an odd-sized one is padded); a cut after it, or
    # a streamed file's unknown length (0xFFFFFFFF, 0x7FFFFFFF), is no truncation.
    at = whole.index(b"data")
    listed = whole[:at] + b"LIST\x03\x00\x00\x00abc\x00" + whole[at:]
    listed = listed[:4] + (len(listed) - 8).to_bytes(4, "little") + listed[8:]
    assert media.read_audio(listed)[0].shape == (8000,)
    with pytest.raises(media.MediaError, match="declares 16000 bytes of sound, the file holds 99"):
        media.read_audio(listed[: at + 12 + 8 + 99])
    media.read_audio(whole + b"LIST\x04\x00\x00\x00ab")
    for placeholder in (b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f"):
        streamed = whole[: at + 4] + placeholder + whole[at + 8 :]
        assert media.read_audio(streamed)[0].shape == (8000,)
    # An import names it as it names a truncated image, and --skip_invalid skips it.
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cut.wav").write_bytes(whole[:8000])
    write_csv(folder / "items.csv", ["item_id", "audio"], [["a", "cut.wav"], ["b", ""]])
    write_csv(folder / "interactions.csv", ["user_id", "item_id"], [["u", "a"], ["u", "b"]])
    options = local.ImportOptions(name="cut")
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(folder, tmp_path / "d", options, verbose=False)
    message = str(failure.value)
    assert "items.csv:2: undecodable audio: " in message
    assert "cut.wav: audio file is truncated" in message
    assert "pass --skip_invalid" in message
    options.skip_invalid = True
    local.import_folder(folder, tmp_path / "d", options, verbose=False)
    assert builder.read_metadata(tmp_path / "d", "cut")["items_with"]["audio"] == 0


# --------------------------------------------------------------------------- local folder


def media_folder(folder: Path) -> None:
    """Items with every image and audio kind, and interactions with labels and times."""
    rng = np.random.default_rng(1)
    (folder / "media").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(
        folder / "media/gray.png"
    )
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(
        folder / "media/rgba.png"
    )
    Image.new("P", (50, 50), 3).save(folder / "media/palette.png")
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(
        folder / "media/photo.jpg", quality=90
    )
    stereo = np.stack([tone(44100, 1.0), tone(44100, 1.0, 660)], 1) * 0.5
    (folder / "media/stereo.wav").write_bytes(sound(stereo, 44100, "WAV", "PCM_16"))
    (folder / "media/clip.flac").write_bytes(sound(tone(22050, 0.3) * 0.5, 22050, "FLAC"))
    (folder / "media/clip.ogg").write_bytes(sound(tone(48000, 0.4) * 0.5, 48000, "OGG"))
    write_csv(
        folder / "items.csv",
        ["item_id", "text", "image", "audio"],
        [
            ["a", "A grey picture with a tone", "media/gray.png", "media/stereo.wav"],
            ["b", "A see-through square", "media/rgba.png", "media/clip.flac"],
            ["c", "", "media/palette.png", "media/clip.ogg"],
            ["d", "A photo, no sound", "media/photo.jpg", ""],
            ["e", "Only words here", "", ""],
            ["f", "Never rated", "", "media/clip.ogg"],
        ],
    )
    rows = []
    for user in range(6):
        for k, item in enumerate(np.roll(list("abcde"), user)):
            rows.append([f"user{user}", item, (user + k) % 2, 1000 * user + 10 * k])
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"], rows)


def test_folder_with_every_media_kind_imports_and_feeds_the_pipeline(tmp_path, capsys):
    media_folder(tmp_path / "in")
    local.main(
        ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "data"), "--name", "shop"]
    )
    out = capsys.readouterr().out
    train_rows = builder.read_metadata(tmp_path / "data", "shop")["split_sizes"]["train"]
    command = local.train_command("shop", tmp_path / "data", train_rows)
    # A small dataset's command lowers configs/local.py's batch to one that fits it.
    assert train_rows == 18 and command in out and "batch_size=8" in out
    assert load_config(ROOT / "configs" / "local.py").train.batch_size == local._LOCAL_BATCH_SIZE
    splits = tfds.data_source("shop", data_dir=str(tmp_path / "data"))
    assert {"train", "validation", "test"} <= set(splits)
    items = {
        builder.text(r["item_key"]): r for r in records(tmp_path / "data", "shop", "items")["items"]
    }
    assert [bool(items[k]["has_image"]) for k in "abcdef"] == [1, 1, 1, 1, 0, 0]
    assert [bool(items[k]["has_audio"]) for k in "abcdef"] == [1, 1, 1, 0, 0, 1]
    assert [bool(items[k]["has_text"]) for k in "abcdef"] == [1, 1, 0, 1, 1, 1]
    assert items["f"]["item_id"] == 0  # in the catalogue, never in training
    photo = Image.open(io.BytesIO(items["d"]["image"]))
    assert photo.mode == "RGB" and photo.size == (85, 128)  # longer side 128
    wave, rate = soundfile.read(io.BytesIO(items["a"]["audio"]))
    assert rate == 16000 and wave.ndim == 1 and wave.shape[0] == 16000
    config = load_config(
        ROOT / "configs" / "local.py",
        [
            ("data.name", "shop"),
            ("data.data_dir", str(tmp_path / "data")),
            ("model.towers", "image,audio,id,history"),
            ("train.batch_size", "8"),
        ],
    )
    info = pipeline.load_dataset_info(config.data)
    assert info.modalities == ("text", "image", "audio") and not info.positives_only
    batch = next(pipeline.make_batches(config, "train", train=True))
    schema.validate_batch(batch, config.model.towers, expected_dims={"S": 56, "T": 4000})


def test_the_printed_batch_size_fits_the_rows_and_up_to_8_devices():
    for rows in range(1, 8 * local._LOCAL_BATCH_SIZE):
        command = local.train_command("shop", "data", rows)
        batch = int(command.rsplit("--config.train.batch_size=", 1)[1])
        assert 1 <= batch <= rows, rows
        if rows >= 8:
            assert batch % 8 == 0, (rows, batch)  # divisible by 1, 2, 4 and 8 devices
        else:
            assert batch & (batch - 1) == 0 and 2 * batch > rows, (rows, batch)
        if rows >= 128:
            assert rows // batch >= 8, (rows, batch)  # a few batches per pass
    assert local.train_command("shop", "data", 8).endswith("batch_size=8")
    assert "batch_size" not in local.train_command("shop", "data", 8 * local._LOCAL_BATCH_SIZE)


def bad_folder(folder: Path) -> None:
    """One corrupt image, one missing audio file, one interaction with an unknown item."""
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (folder / "tone.wav").write_bytes(sound(tone(16000, 0.2), 16000, "WAV"))
    write_csv(
        folder / "items.csv",
        ["item_id", "text", "image", "audio"],
        [
            ["i1", "first", "good.png", "tone.wav"],
            ["i2", "second", "broken.png", "tone.wav"],
            ["i3", "third", "good.png", "sounds/missing.wav"],
            ["i4", "fourth", "", ""],
        ],
    )
    rows = [[f"u{u}", f"i{k}", 1, 100 * u + k] for u in range(3) for k in (1, 2, 3, 4)]
    rows.insert(3, ["u9", "i99", 1, 5])
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"], rows)


def test_bad_rows_fail_naming_each_one(tmp_path):
    bad_folder(tmp_path / "in")
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(tmp_path / "in", tmp_path / "data", local.ImportOptions(name="bad"))
    message = str(failure.value)
    assert "items.csv:3: undecodable image" in message and "broken.png" in message
    assert "items.csv:4: missing audio file" in message and "missing.wav" in message
    assert "interactions.csv:5: unknown item" in message and "'i99'" in message
    assert "3 problem(s)" in message and "--skip_invalid" in message
    assert not builder.is_built(tmp_path / "data", "bad")
    # A dataset of that name already there is named first, before the input is read.
    (tmp_path / "data" / "bad" / "notes").mkdir(parents=True)
    with pytest.raises(builder.DatasetExistsError, match="Pass --overwrite"):
        local.import_folder(tmp_path / "in", tmp_path / "data", local.ImportOptions(name="bad"))
    with pytest.raises(builder.DatasetExistsError):
        movielens.import_movielens(
            tmp_path / "in", tmp_path / "data", local.ImportOptions(name="bad")
        )


def test_skip_invalid_builds_and_reports_the_three_skips(tmp_path, capsys):
    bad_folder(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "data"), "--name", "bad"]
    with pytest.raises(SystemExit) as exit_info:
        local.main(argv)
    assert exit_info.value.code == 2
    assert "unknown item" in capsys.readouterr().err
    local.main([*argv, "--skip_invalid"])
    out = capsys.readouterr().out
    assert (
        "Skipped 3 invalid entries: 1 undecodable image, 1 missing audio file, 1 unknown item"
        in out
    )
    items = {
        builder.text(r["item_key"]): r for r in records(tmp_path / "data", "bad", "items")["items"]
    }
    assert not items["i2"]["has_image"] and items["i2"]["has_audio"] and items["i2"]["has_text"]
    assert items["i3"]["has_image"] and not items["i3"]["has_audio"]
    total = sum(len(v) for v in records(tmp_path / "data", "bad").values())
    assert total == 12  # the unknown item's row alone is gone
    meta = builder.read_metadata(tmp_path / "data", "bad")
    assert meta["skipped"] == {"undecodable image": 1, "missing audio file": 1, "unknown item": 1}


def test_a_media_path_naming_a_folder_is_named_so(tmp_path):
    folder = tmp_path / "in"
    (folder / "pictures").mkdir(parents=True)
    write_csv(
        folder / "items.csv",
        ["item_id", "image", "audio"],
        [["a", "pictures", ""], ["b", "pictures/b.png", "."]],
    )
    write_csv(folder / "interactions.csv", ["user_id", "item_id"], [["u", "a"], ["u", "b"]])
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="f"), verbose=False)
    lines = str(failure.value).splitlines()
    assert lines[:3] == [
        f"items.csv:2: missing image file: {folder / 'pictures'} is a folder, not a file",
        f"items.csv:3: missing image file: {folder / 'pictures/b.png'} does not exist",
        f"items.csv:3: missing audio file: {folder} is a folder, not a file",
    ]


def test_other_bad_rows_are_named_with_their_line(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id", "text"], [["a", "x"], ["b", "y"], ["a", "z"]])
    write_csv(
        folder / "interactions.csv",
        ["user_id", "item_id", "label", "timestamp"],
        [["u", "a", "yes", 1], ["u", "b", 2, 2], ["", "a", 1, 3], ["u", "a", 1, "soon"]],
    )
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(folder, tmp_path / "data", local.ImportOptions(name="x"))
    message = str(failure.value)
    assert "items.csv:4: duplicate item id: item_id 'a' already at items.csv:2" in message
    assert "interactions.csv:2: non-numeric label: label 'yes' is not 0 or 1" in message
    assert "interactions.csv:3: non-numeric label: label '2' is not 0 or 1" in message
    assert "interactions.csv:4: empty user_id" in message
    assert "interactions.csv:5: bad timestamp" in message
    (folder / "interactions.csv").write_text("")
    with pytest.raises(local.ImportFailed, match="interactions.csv: empty file"):
        local.import_folder(folder, tmp_path / "data", local.ImportOptions(name="x"))


def test_malformed_csv_and_other_encodings_are_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "interactions.csv", ["user_id", "item_id"], [["u", "a"], ["u", "b"]])
    items = folder / "items.csv"
    options = local.ImportOptions(name="x")
    items.write_text("item_id,text\na,hello, world\nb,fine\n")
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(folder, tmp_path / "data", options)
    assert "items.csv:2: extra cells: 3 cells for 2 columns" in str(failure.value)
    # Empty trailing cells (a trailing comma, as some exports write) are no extra content.
    items.write_text("item_id,text\na,hello,\nb,fine,,\n")
    local.import_folder(folder, tmp_path / "trailing", options, verbose=False)
    items.write_text('item_id,text\na,fine\nb,"a quote that never ends\nc,more\n')
    with pytest.raises(local.ImportFailed, match=r"items.csv:3: not valid CSV"):
        local.import_folder(folder, tmp_path / "data", options)
    # The line of the first bad byte in the whole file, not in the decoder's chunk.
    rows = "".join(f"i{n},plain text {n}\n" for n in range(4000))
    items.write_bytes(f"item_id,text\n{rows}a,café\nb,x\n".encode("latin-1"))
    with pytest.raises(local.ImportFailed) as failure:
        local.import_folder(folder, tmp_path / "data", options)
    message = str(failure.value)
    assert message.startswith("items.csv:4002: not UTF-8 text (byte 0xe9 at offset ")
    assert "Save the file as UTF-8" in message
    # A byte-order mark (Notepad's UTF-8) starts JSON Lines as it starts CSV.
    items.unlink()
    jsonl = '{"item_id": "a", "text": "one"}\n{"item_id": "b", "text": "two"}\n'
    (folder / "items.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.encode())
    local.import_folder(folder, tmp_path / "bom", options, verbose=False)
    assert len(records(tmp_path / "bom", "x", "items")["items"]) == 2
    (folder / "items.jsonl").unlink()
    long_text = "word " * 40_000  # 200 KB: over the csv module's default cell limit
    write_csv(items, ["item_id", "text"], [["a", long_text], ["b", "short"]])
    local.import_folder(folder, tmp_path / "data", options, verbose=False)
    texts = [builder.text(r["text"]) for r in records(tmp_path / "data", "x", "items")["items"]]
    assert long_text.strip() in texts


def test_ignored_columns_are_named_with_the_name_they_likely_mean(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(
        folder / "items.csv",
        ["item_id", "description", "image_path", "audio"],
        [["a", "red", "a.png", ""], ["b", "blue", "b.png", ""]],
    )
    rows = [["u", "a", 5, 1], ["u", "b", 1, 2], ["v", "a", 2, 3]]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "rating", "Timestamp"], rows)
    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="c"), overwrite=True)
    lines = capsys.readouterr().out.splitlines()
    assert (
        "interactions.csv: ignoring column Timestamp (known: user_id, item_id, label, rating, "
        "timestamp; did you mean 'timestamp'?)."
    ) in lines
    assert (
        "items.csv: ignoring columns description, image_path (known: item_id, text (or text_* "
        "columns), image, audio; did you mean 'image' for 'image_path'?). Pass --text_columns "
        "description to join it into the item text."
    ) in lines
    # Columns read as text are not ignored; a column close to no known one gets no guess.
    header = ["user_id", "item_id", "clicked", "time"]
    write_csv(folder / "interactions.csv", header, rows)
    options = local.ImportOptions(name="c", text_columns=("description",))
    local.import_folder(folder, tmp_path / "d", options, overwrite=True)
    lines = capsys.readouterr().out.splitlines()
    assert (
        "interactions.csv: ignoring columns clicked, time (known: user_id, item_id, label, "
        "rating, timestamp; did you mean 'timestamp' for 'time'?). Without a label or rating "
        "column every row is a positive."
    ) in lines
    assert [line for line in lines if line.startswith("items.csv")] == [
        "items.csv: ignoring column image_path (known: item_id, image, audio, and the "
        "--text_columns description; did you mean 'image'?)."
    ]
    # Both label and rating: the label column wins, and the output says so.
    write_csv(
        folder / "interactions.csv",
        ["user_id", "item_id", "rating", "label"],
        [[u, i, r, int(r < 3)] for u, i, r, _ in rows],
    )
    local.import_folder(folder, tmp_path / "d", options, overwrite=True)
    out = capsys.readouterr().out
    assert (
        "interactions.csv: ignoring column rating: the label column gives the labels "
        "(without it, rating >= --positive_threshold would)."
    ) in out.splitlines()
    assert "labels: the label column" in out and "interactions.csv: ignoring columns" not in out
    local.import_folder(folder, tmp_path / "d", options, overwrite=True, verbose=False)
    assert capsys.readouterr().out == ""


def test_a_misspelt_label_or_rating_column_is_an_error(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [["a"], ["b"]])
    rows = [["u", "a", 5, 1], ["u", "b", 1, 2], ["v", "a", 2, 3]]
    for column, meant in [
        ("Rating", "rating"), ("ratings", "rating"), ("user_rating", "rating"),
        ("raitng", "rating"), ("Label", "label"), ("labels", "label"), ("lable", "label"),
    ]:  # fmt: skip
        write_csv(folder / "interactions.csv", ["user_id", "item_id", column, "timestamp"], rows)
        with pytest.raises(local.ImportFailed) as error:
            local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="c"))
        message = str(error.value)
        assert message.startswith(
            "interactions.csv has no label or rating column, so every row would be a "
            f"positive, but its column {column!r} likely means {meant!r}. Rename {column!r} "
            f"to {meant!r} ("
        )
        assert message.endswith(
            "If every row really is a positive (negatives are then sampled), remove that "
            "column or give it a name unlike label and rating."
        )
        assert not (tmp_path / "d" / "c").exists()
    argv = ["--input", str(folder), "--output", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as exit_info:
        local.main(argv)
    assert exit_info.value.code == 2
    assert "error: interactions.csv has no label or rating column" in capsys.readouterr().err
    # Names merely like them stay warnings: a click log may well have a duration.
    for column in ("duration", "rank", "level", "rate"):
        write_csv(folder / "interactions.csv", ["user_id", "item_id", column, "timestamp"], rows)
        local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="c"), True)
        assert f"interactions.csv: ignoring column {column}" in capsys.readouterr().out
    # With a label or rating column, a column like the other one stays a warning.
    header = ["user_id", "item_id", "rating", "labels"]
    write_csv(folder / "interactions.csv", header, [r[:3] + [1] for r in rows])
    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="c"), True)
    assert "interactions.csv: ignoring column labels" in capsys.readouterr().out


def test_problems_are_listed_by_file_and_line():
    problems = local.Problems()
    for where in ("b.csv:10", "a.parquet row 10", "b.csv:9", "a.parquet row 2", "a.parquet"):
        problems.add(where, "bad", "x")
    assert [line.split(": ")[0] for line in problems.lines()] == [
        "a.parquet", "a.parquet row 2", "a.parquet row 10", "b.csv:9", "b.csv:10"
    ]  # fmt: skip
    # A column wrong throughout: its first problems, then their count.
    for line in range(2, 100_002):
        problems.add(f"c.csv:{line}", "bad timestamp", "x")
    lines = problems.lines()
    assert len(lines) == 5 + 20 + 1 and lines[-1].startswith("... and 99980 more bad timestamp")
    assert lines[5] == "c.csv:2: bad timestamp: x" and len(problems.lines(per_kind=None)) == 100_005


def test_split_shares_out_of_range_and_empty_splits_are_named(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [["a"], ["b"]])
    write_csv(folder / "interactions.csv", ["user_id", "item_id"], [["u", "a"], ["v", "b"]])
    for options, needle in [
        (local.ImportOptions(name="s", split="random", eval_share=-0.1), "--eval_share -0.1"),
        (local.ImportOptions(name="s", split="random", eval_share=0.5), "--eval_share 0.5"),
        (local.ImportOptions(name="s", cold_item_share=1.0), "--cold_item_share 1.0"),
    ]:
        with pytest.raises(local.ImportFailed, match=needle):
            local.import_folder(folder, tmp_path / "d", options, verbose=False)
    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="s", split="leave_last"))
    assert "Note: validation and test are empty" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--max_audio_seconds", "-1", "must be a number above 0"),
        ("--max_audio_seconds", "0", "must be a number above 0"),
        ("--max_audio_seconds", "inf", "must be a number above 0"),
        ("--max_audio_seconds", "0.00001", "keeps no sample at --audio_sample_rate 16000"),
        ("--max_image_side", "0", "must be 1 or more"),
        ("--max_image_side", "-5", "must be 1 or more"),
        ("--audio_sample_rate", "0", "must be 1 or more"),
        ("--audio_sample_rate", "-8000", "must be 1 or more"),
        ("--history_len", "0", "must be 1 or more"),
        ("--positive_threshold", "nan", "must be a finite number"),
        ("--seed", "-1", "must be 0 or more"),
        ("--eval_share", "0.5", "must lie in (0, 0.5)"),
    ],
)
def test_options_out_of_range_are_usage_errors(tmp_path, capsys, flag, value, needle):
    argv = ["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "d"), flag, value]
    with pytest.raises(SystemExit) as exit_info:  # before the input is looked at
        local.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and f"error: {flag} " in err and needle in err
    field = flag.removeprefix("--")
    number = (int if isinstance(getattr(local.ImportOptions, field), int) else float)(value)
    with pytest.raises(local.ImportFailed, match=re.escape(needle)):
        local.ImportOptions(**{field: number}).check()
    if field in ("history_len", "positive_threshold", "seed", "eval_share"):  # common flags
        with pytest.raises(SystemExit):
            movielens.main(argv)
        assert needle in capsys.readouterr().err


def test_a_share_given_for_a_split_that_does_not_use_it_is_a_usage_error(tmp_path, capsys):
    absent = ["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "d")]
    # Decided by the flags alone: an error before the input is looked at.
    for flags, needle in [
        (
            ["--split", "leave_last", "--eval_share", "0.2"],
            "--eval_share 0.2 applies to --split random (and to cold_items on interactions "
            "without timestamps, for the items it keeps); this import splits leave_last.",
        ),
        (
            ["--cold_item_share", "0.2"],
            "--cold_item_share 0.2 applies to --split cold_items only; without --split this "
            "import splits leave_last (with timestamps) or random.",
        ),
        (
            ["--split", "random", "--cold_item_share", "0.2"],
            "--cold_item_share 0.2 applies to --split cold_items only; this import splits random.",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            local.main(absent + flags)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: ") and needle in err
    with pytest.raises(SystemExit) as exit_info:  # every MovieLens release has timestamps
        movielens.main(absent + ["--eval_share", "0.2"])
    assert exit_info.value.code == 2
    assert "this import splits leave_last (the default with timestamps)" in capsys.readouterr().err
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [[f"i{k}"] for k in range(10)])
    rows = [[f"u{u}", f"i{(u + k) % 10}", 10 * k] for u in range(10) for k in range(5)]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "timestamp"], rows)
    # Decided by the timestamps: leave_last without --split, and for cold_items' rest.
    for split, in_effect, fix in [
        (None, "leave_last (the default with timestamps)", ", or pass --split random."),
        (
            "cold_items",
            "cold_items, and the rest leave_last (the interactions have timestamps)",
            ".",  # --split random would drop the cold items
        ),
    ]:
        options = local.ImportOptions(name="s", split=split, eval_share=0.2)
        expected = f"this import splits {in_effect}. Leave --eval_share out{fix}"
        with pytest.raises(local.ImportFailed, match=re.escape(expected) + "$"):
            local.import_folder(folder, tmp_path / "d", options, verbose=False)
    argv = ["--input", str(folder), "--output", str(tmp_path / "d"), "--eval_share", "0.2"]
    with pytest.raises(SystemExit) as exit_info:
        local.main(argv)
    assert exit_info.value.code == 2
    assert "error: --eval_share 0.2 applies to --split random" in capsys.readouterr().err
    assert not (tmp_path / "d" / "s").exists()
    # Without timestamps the default split (random) and cold_items' rest use the share.
    write_csv(folder / "interactions.csv", ["user_id", "item_id"], [r[:2] for r in rows])
    for split in (None, "cold_items"):
        options = local.ImportOptions(name="s", split=split, eval_share=0.4)
        local.import_folder(folder, tmp_path / "d", options, overwrite=True, verbose=False)
        sizes = builder.read_metadata(tmp_path / "d", "s")["split_sizes"]
        assert sizes["validation"] + sizes["test"] > 10  # 0.1 would give about 10 in all
    assert local.ImportOptions().shares() == (0.1, 0.1)


def test_evaluation_splits_of_one_class_are_pointed_out(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [[f"i{k}"] for k in range(6)])
    # Every user's last interactions are positives: leave_last puts only them in
    # validation and test.
    rows = [[f"u{u}", f"i{(u + k) % 6}", int(k >= 3), 10 * k] for u in range(4) for k in range(5)]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"], rows)
    options = local.ImportOptions(name="s", split="leave_last")
    local.import_folder(folder, tmp_path / "d", options)
    out = capsys.readouterr().out
    assert "Note: validation (only positives) and test (only positives) hold one class" in out
    meta = builder.read_metadata(tmp_path / "d", "s")
    assert meta["split_positives"]["validation"] == meta["split_sizes"]["validation"] > 0
    mixed = [[u, i, 1 - label if u == "u0" else label, t] for u, i, label, t in rows]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"], mixed)
    local.import_folder(folder, tmp_path / "d2", options)
    out = capsys.readouterr().out
    assert "one class" not in out and "Note: train" not in out
    # Every rating below the threshold: training has only negatives.
    low = [[u, i, 2 + label, t] for u, i, label, t in mixed]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "rating", "timestamp"], low)
    local.import_folder(folder, tmp_path / "d3", options)
    assert (
        "Note: train holds only negatives (labels: rating >= 4), so the model has nothing to "
        "tell apart and learns one answer for every item: compare --positive_threshold 4 "
        "with the ratings."
    ) in capsys.readouterr().out.splitlines()
    local.import_folder(folder, tmp_path / "d4", dataclasses.replace(options, positive_threshold=3))
    assert "Note: train" not in capsys.readouterr().out


def test_the_one_class_note_gives_only_the_advice_for_the_splits_affected(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [[f"i{k}"] for k in range(6)] + [["x"]])
    # Mixed labels in train, validation and test; u0's and u1's last interactions, liked,
    # are with an item no training row has: test_cold holds only positives.
    rows = [[f"u{u}", f"i{(u + k) % 6}", k % 2, 10 * k] for u in range(4) for k in range(3)]
    rows += [[f"u{u}", f"i{(u + 3) % 6}", u % 2, 30] for u in range(4)]
    rows += [
        [f"u{u}", "x" if u < 2 else f"i{(u + 4) % 6}", 1 if u < 2 else u % 2, 40] for u in range(4)
    ]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"], rows)
    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="s"))
    notes = [line for line in capsys.readouterr().out.splitlines() if "one class" in line]
    assert notes == [
        "Note: test_cold (only positives) holds one class of label, for which AUC is "
        "undefined (reported as '-')."
    ]
    meta = builder.read_metadata(tmp_path / "d", "s")
    assert meta["split_sizes"]["test_cold"] == meta["split_positives"]["test_cold"] == 2

    def note(split_method: str, one_class: str) -> str:
        """The summary's one-class note with only `one_class` of one class."""
        positives = {**meta["split_positives"], "test_cold": 1}
        positives[one_class] = meta["split_sizes"][one_class]
        changed = {**meta, "split_method": split_method, "split_positives": positives}
        summary = local.format_summary(types.SimpleNamespace(metadata=changed))
        [line] = [line for line in summary.splitlines() if "one class" in line]
        return line

    leave_last = (
        " With leave_last, each user's last interactions form the evaluation splits; "
        "--split random mixes them."
    )
    best = "; without a validation AUC no checkpoint is marked best"
    test_only = (
        "Note: test (only positives) holds one class of label, for which AUC is undefined "
        "(reported as '-')."
    )
    assert note("leave_last", "test") == test_only + leave_last
    assert note("random", "test") == test_only
    assert note("random", "validation") == (
        "Note: validation (only positives) holds one class of label, for which AUC is "
        f"undefined (reported as '-'{best})."
    )


def test_a_dataset_of_the_same_sizes_and_ids_but_other_content_is_not_the_same(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    items = [[f"i{k}", f"item number {k}"] for k in range(6)]
    rows = [[f"u{u}", f"i{(u + k) % 6}", (u + k) % 2, 10 * k] for u in range(4) for k in range(5)]
    header = ["user_id", "item_id", "label", "timestamp"]
    options = local.ImportOptions(name="s", split="leave_last")

    def imported(output, items, rows):
        write_csv(folder / "items.csv", ["item_id", "text"], items)
        write_csv(folder / "interactions.csv", header, rows)
        local.import_folder(folder, tmp_path / output, options, verbose=False)
        return pipeline.load_dataset_info(
            ml_collections.ConfigDict({"name": "s", "data_dir": str(tmp_path / output)})
        )

    first = pipeline.dataset_fingerprint(imported("a", items, rows))
    pipeline.check_same_dataset(first, imported("again", items, rows), "the run", "")
    flipped = [[u, i, 1 - label if (u, t) == ("u0", 0) else label, t] for u, i, label, t in rows]
    retexted = [[key, text.upper() if key == "i3" else text] for key, text in items]
    for output, changed_items, changed_rows in (
        ("label", items, flipped),
        ("text", retexted, rows),
    ):
        info = imported(output, changed_items, changed_rows)
        same = pipeline.dataset_fingerprint(info)
        assert {k: v for k, v in same.items() if k != "content_sha256"} == {
            k: v for k, v in first.items() if k != "content_sha256"
        }  # the same sizes and ids
        with pytest.raises(pipeline.DatasetMismatchError, match=r"its content .* differs"):
            pipeline.check_same_dataset(first, info, "the run", "")


def test_repeated_pairs_are_kept_once_so_no_pair_is_in_two_splits(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id"], [[f"m{i}"] for i in range(6)])
    events = [("u", "m0", 1), ("u", "m1", 2), ("u", "m2", 3), ("u", "m3", 4), ("u", "m0", 5)]
    events += [("u", "m1", 6), ("v", "m4", 1), ("v", "m5", 2), ("v", "m4", 3), ("v", "m0", 4)]
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "timestamp"], events)
    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="rep"))
    assert "3 others left out" in capsys.readouterr().out
    meta = builder.read_metadata(tmp_path / "d", "rep")
    got = records(tmp_path / "d", "rep")
    pairs = {}
    for split, rows in got.items():
        for r in rows:
            pair = (meta["user_ids"][r["user_index"]], meta["item_ids"][r["item_index"]])
            pairs.setdefault(pair, []).append((split, int(r["timestamp"])))
    # Brute force: each pair once, at its last time; u's last is m1 at 6, then m0 at 5.
    last = {}
    for user, item, stamp in events:
        last[(user, item)] = max(stamp, last.get((user, item), stamp))
    assert {pair: [t for _, t in where] for pair, where in pairs.items()} == {
        pair: [stamp] for pair, stamp in last.items()
    }
    # u's last two (m1, m0) and v's (m0, m4) are test and validation rows, of items in no
    # train row (u trained on m2, m3; v on m5): all test_cold.
    for pair in (("u", "m1"), ("u", "m0"), ("v", "m0"), ("v", "m4")):
        assert pairs[pair][0][0] == "test_cold", pair
    assert "validation" not in got and "test" not in got
    assert meta["repeated_interactions_left_out"] == 3
    # A click outweighs a later impression of the same item without one; a rating of 5
    # a later 2 alike.
    for column, values in (("label", (1, 0, 0, 0)), ("rating", (5, 2, 3, 1))):
        events = [("u", "m0", values[0], 1), ("u", "m0", values[1], 2)]
        events += [("u", "m1", values[2], 3), ("u", "m1", values[3], 4)]
        write_csv(folder / "interactions.csv", ["user_id", "item_id", column, "timestamp"], events)
        options = local.ImportOptions(name=column)
        local.import_folder(folder, tmp_path / "d", options, verbose=False)
        rows = [r for split in records(tmp_path / "d", column).values() for r in split]
        item_keys = builder.read_metadata(tmp_path / "d", column)["item_ids"]
        kept = sorted((item_keys[r["item_index"]], r["label"], int(r["timestamp"])) for r in rows)
        assert kept == [("m0", 1.0, 1), ("m1", 0.0, 4)], column


def test_jsonl_and_parquet_inputs_with_several_text_columns(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [
        json.dumps({"item_id": f"m{i}", "text_title": f"Title {i}", "text_body": f"Body {i}"})
        for i in range(8)
    ]
    lines.insert(2, "{not json")
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    users = [f"u{u}" for u in range(4) for _ in range(6)]
    items = [f"m{(u * 3 + k) % 8}" for u in range(4) for k in range(6)]
    pq.write_table(pa.table({"user_id": users, "item_id": items}), folder / "interactions.parquet")
    options = local.ImportOptions(name="pq", split="random")
    with pytest.raises(local.ImportFailed, match="items.jsonl:3: bad JSON line"):
        local.import_folder(folder, tmp_path / "data", options)
    options.skip_invalid = True
    local.import_folder(folder, tmp_path / "data", options, verbose=False)
    item_rows = records(tmp_path / "data", "pq", "items")["items"]
    assert builder.text(item_rows[0]["text"]) == "Title 0. Body 0"
    meta = builder.read_metadata(tmp_path / "data", "pq")
    assert meta["positives_only"] and meta["split_method"] == "random"
    assert sum(meta["split_sizes"].values()) == 24
    # Integer ids stored as floats (pandas' integer column with a gap) match "1", "2", ...
    write_csv(folder / "items.csv", ["item_id", "text"], [[str(i), f"t {i}"] for i in range(8)])
    (folder / "items.jsonl").unlink()
    float_ids = [float(i[1:]) for i in items]
    pq.write_table(
        pa.table({"user_id": users, "item_id": float_ids}), folder / "interactions.parquet"
    )
    local.import_folder(folder, tmp_path / "floats", options, verbose=False)
    meta = builder.read_metadata(tmp_path / "floats", "pq")
    assert sum(meta["split_sizes"].values()) == 24 and not meta.get("skipped")


def test_split_methods(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(
        folder / "items.csv", ["item_id", "text"], [[f"m{i}", f"movie {i}"] for i in range(30)]
    )
    rng = np.random.default_rng(3)
    rows = []
    for user in range(20):
        for item in rng.choice(30, size=int(rng.integers(2, 9)), replace=False):
            rows.append(
                [f"u{user}", f"m{item}", float(rng.integers(1, 6)), int(rng.integers(0, 10**6))]
            )
    write_csv(folder / "interactions.csv", ["user_id", "item_id", "rating", "timestamp"], rows)
    by_user = {}
    for user, item, rating, stamp in rows:
        by_user.setdefault(user, []).append((stamp, item, rating))

    local.import_folder(folder, tmp_path / "d", local.ImportOptions(name="last"), verbose=False)
    got = records(tmp_path / "d", "last")
    meta = builder.read_metadata(tmp_path / "d", "last")
    user_keys, item_keys = meta["user_ids"], meta["item_ids"]
    for split in ("test", "validation"):
        position = -1 if split == "test" else -2
        for r in got[split]:
            events = sorted(by_user[user_keys[r["user_index"]]])
            assert len(events) >= 3
            assert item_keys[r["item_index"]] == events[position][1]
    tested = {(r["user_index"]) for s in ("test", "test_cold") for r in got.get(s, [])}
    assert tested == {meta["user_ids"].index(u) for u, e in by_user.items() if len(e) >= 3}
    all_rows = [r for split_rows in got.values() for r in split_rows]
    for r in all_rows:
        rating = dict((i, x) for _, i, x in by_user[user_keys[r["user_index"]]])[
            item_keys[r["item_index"]]
        ]
        assert r["label"] == float(rating >= 4.0)

    options = local.ImportOptions(name="cold", split="cold_items", cold_item_share=0.2)
    local.import_folder(folder, tmp_path / "d", options, verbose=False)
    got = records(tmp_path / "d", "cold")
    train_items = {r["item_index"] for r in got["train"]}
    assert got["test_cold"] and all(r["item_index"] not in train_items for r in got["test_cold"])
    assert all(r["item_index"] in train_items and r["item_id"] > 0 for r in got["test"])
    assert all(r["item_id"] == 0 for r in got["test_cold"])


# ------------------------------------------------------------------------------ MovieLens


def ml_subset(folder: Path, max_user: int = 15, max_movie: int = 150) -> None:
    """ml-latest-small restricted to its first users and movies, same file layout."""
    folder.mkdir(parents=True)
    for name, keep in (
        ("movies.csv", lambda r: int(r["movieId"]) <= max_movie),
        ("ratings.csv", lambda r: int(r["userId"]) <= max_user and int(r["movieId"]) <= max_movie),
        ("tags.csv", lambda r: int(r["movieId"]) <= max_movie),
    ):
        with open(ML_SMALL / name, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if keep(r)]
            header = reader.fieldnames
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, header)
            writer.writeheader()
            writer.writerows(rows)


def test_movielens_subset_converts_and_trains(tmp_path, capsys):
    ml_subset(tmp_path / "ml")
    argv = ["--input", str(tmp_path / "ml"), "--output", str(tmp_path / "data")]
    movielens.main(argv)
    assert local.train_command("movielens", tmp_path / "data") in capsys.readouterr().out
    splits = tfds.data_source("movielens", data_dir=str(tmp_path / "data"))
    assert {"train", "validation", "test"} <= set(splits)
    with open(tmp_path / "ml" / "movies.csv", newline="") as f:
        movies = list(csv.DictReader(f))
    with open(tmp_path / "ml" / "tags.csv", newline="") as f:
        tags = {}
        for r in csv.DictReader(f):
            tags.setdefault(r["movieId"], []).append(r["tag"])
    items = records(tmp_path / "data", "movielens", "items")["items"]
    assert len(items) == len(movies)
    for movie, item in zip(movies, items, strict=True):
        text = builder.text(item["text"])
        assert builder.text(item["item_key"]) == movie["movieId"]
        assert text.startswith(movie["title"])
        assert all(g in text for g in movie["genres"].split("|") if "no genres" not in g)
        assert all(t in text for t in tags.get(movie["movieId"], [])[:5])
    with open(tmp_path / "ml" / "ratings.csv", newline="") as f:
        ratings = list(csv.DictReader(f))
    info = pipeline.load_dataset_info(
        load_config(
            ROOT / "configs" / "local.py",
            [("data.name", "movielens"), ("data.data_dir", str(tmp_path / "data"))],
        ).data
    )
    assert sum(info.split_sizes.values()) == len(ratings)
    assert info.modalities == ("text",) and not info.positives_only

    # Train a few steps on its batches (the model's functional API, frozen MiniLM texts).
    import jax
    import optax

    from mmrec_jax.models.recommender import build_model

    overrides = [
        ("data.name", "movielens"),
        ("data.data_dir", str(tmp_path / "data")),
        ("data.max_text_len", "16"),
        ("model.num_users", str(info.num_users)),
        ("model.num_items", str(info.num_items)),
        ("model.towers", pipeline.available_towers("text,image,audio,id,history", info)),
        ("model.width", "32"),
        ("model.fusion.num_layers", "1"),
        ("model.fusion.mlp_dim", "32"),
        ("train.batch_size", "64"),
    ]
    config = load_config(ROOT / "configs" / "local.py", overrides)
    assert config.model.towers == "text,id,history"
    batches = pipeline.make_batches(config, "train", train=True, multiple=1)
    model = build_model(config.model)
    first = next(batches)
    params = model.init(jax.random.key(0), first)["params"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch, train=True, rngs={"dropout": rng})
            return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for k in range(6):
        params, opt_state, loss = step(params, opt_state, first, jax.random.key(k))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_movielens_same_second_ratings_are_held_out_at_random(tmp_path):
    # ratings.csv lists each user's ratings by movie id; 40 users rate movies 1-6 in one
    # second. By file order every user's test movie would be 6 and validation 5.
    folder = tmp_path / "ml"
    folder.mkdir()
    write_csv(folder / "movies.csv", ["movieId", "title", "genres"],
              [[m, f"Movie {m} (2000)", "Drama"] for m in range(1, 7)])  # fmt: skip
    write_csv(folder / "ratings.csv", ["userId", "movieId", "rating", "timestamp"],
              [[u, m, 4.5, 1000] for u in range(1, 41) for m in range(1, 7)])  # fmt: skip

    def held_out(seed: int) -> tuple[dict, dict]:
        name = f"ml_seed{seed}"
        options = local.ImportOptions(name=name, seed=seed)
        movielens.import_movielens(folder, tmp_path / "data", options, True, verbose=False)
        rows = records(tmp_path / "data", name, "interactions")
        assert builder.read_metadata(tmp_path / "data", name)["same_time_order"] == (
            "seeded random"
        )
        test = {r["user_index"]: int(r["item_index"]) for r in rows["test"]}
        validation = {r["user_index"]: int(r["item_index"]) for r in rows["validation"]}
        # Histories follow the same order: the test row's history is all of the user's
        # training movies, and the training rows' histories hold 0, 1, 2, 3 of them.
        train = collections.defaultdict(list)
        for r in rows["train"]:
            train[r["user_index"]].append(r)
        for user, item in test.items():
            (test_row,) = [r for r in rows["test"] if r["user_index"] == user]
            movies = {int(r["item_index"]) for r in train[user]}
            assert set(test_row["history"][test_row["history"] >= 0].tolist()) == movies
            sizes = sorted(int((r["history"] >= 0).sum()) for r in train[user])
            assert sizes == [0, 1, 2, 3]
            assert item not in movies and validation[user] not in movies | {item}
        return test, validation

    test, validation = held_out(seed=0)
    assert len(test) == len(validation) == 40
    counts = collections.Counter(test.values())
    assert len(counts) >= 4 and max(counts.values()) <= 20, counts  # not all the last movie
    assert held_out(seed=0) == (test, validation)  # seeded: the same dataset again
    assert held_out(seed=1)[0] != test
    # The local importer keeps file order, which an event log's order means.
    local_folder = tmp_path / "log"
    local_folder.mkdir()
    write_csv(local_folder / "items.csv", ["item_id"], [[m] for m in range(1, 7)])
    write_csv(local_folder / "interactions.csv", ["user_id", "item_id", "label", "timestamp"],
              [[u, m, 1, 1000] for u in range(1, 41) for m in range(1, 7)])  # fmt: skip
    local.import_folder(local_folder, tmp_path / "data", local.ImportOptions(name="log"))
    meta = builder.read_metadata(tmp_path / "data", "log")
    assert meta["same_time_order"] == "file order"
    # Every user holds out the last two in file order, which then no training row has.
    rows = records(tmp_path / "data", "log", "interactions")
    assert {meta["item_ids"][r["item_index"]] for r in rows["test_cold"]} == {"5", "6"}
    assert len(rows["test_cold"]) == 80 and len(rows["train"]) == 160


def test_ml100k_layout(tmp_path):
    folder = tmp_path / "ml100k"
    folder.mkdir()
    genres = "\n".join(f"{g}|{i}" for i, g in enumerate(movielens.ML100K_GENRES)) + "\n"
    (folder / "u.genre").write_text(genres, encoding="latin-1")
    flags = ["0"] * 19
    action = flags.copy()
    action[1] = "1"
    lines = [
        "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *flags]),
        "|".join(["2", "Café Society (1995)", "01-Jan-1995", "", "http://y", *action]),
        "|".join(["3", "GoldenEye (1995)", "01-Jan-1995", "", "http://z", *action]),
    ]
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    data = [
        f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + 10 * i + u}" for u in (1, 2) for i in (1, 2, 3)
    ]
    data.append("3\t2\tfour\t880000999")
    (folder / "u.data").write_text("\n".join(data) + "\n")
    options = local.ImportOptions(name="ml100k", skip_invalid=True)
    movielens.import_movielens(folder, tmp_path / "data", options, verbose=False)
    items = records(tmp_path / "data", "ml100k", "items")["items"]
    assert builder.text(items[1]["text"]) == "Café Society (1995). Genres: Action"
    meta = builder.read_metadata(tmp_path / "data", "ml100k")
    assert meta["skipped"] == {"non-numeric rating": 1}
    assert sum(meta["split_sizes"].values()) == 6


def test_a_cut_movielens_row_is_a_named_problem(tmp_path):
    # A truncated last line of ratings.csv ("1,1029,3.0") lacks its timestamp cell.
    ml_subset(tmp_path / "ml", max_user=3, max_movie=40)
    ratings = tmp_path / "ml" / "ratings.csv"
    lines = ratings.read_text().splitlines()
    ratings.write_text("\n".join([*lines, "1,29,3.0"]) + "\n")
    options = local.ImportOptions(name="ml")
    with pytest.raises(local.ImportFailed, match=rf"ratings.csv:{len(lines) + 1}: bad timestamp"):
        movielens.import_movielens(tmp_path / "ml", tmp_path / "data", options, verbose=False)
    options.skip_invalid = True
    movielens.import_movielens(tmp_path / "ml", tmp_path / "data", options, verbose=False)
    meta = builder.read_metadata(tmp_path / "data", "ml")
    assert meta["skipped"] == {"bad timestamp": 1}
    assert sum(meta["split_sizes"].values()) == len(lines) - 1


def test_movielens_positives_only_keeps_the_liked_ratings_and_samples_negatives(tmp_path):
    ml_subset(tmp_path / "ml", max_user=6, max_movie=400)
    with open(tmp_path / "ml" / "ratings.csv", newline="") as f:
        ratings = list(csv.DictReader(f))
    liked = sorted(
        (r["userId"], r["movieId"], 1.0, int(r["timestamp"]))
        for r in ratings
        if float(r["rating"]) >= 3.5
    )
    assert 0 < len(liked) < len(ratings)
    argv = ["--input", str(tmp_path / "ml"), "--output", str(tmp_path / "data")]
    movielens.main([*argv, "--positives_only", "--positive_threshold", "3.5"])
    assert rated(tmp_path / "data", "movielens") == liked
    meta = builder.read_metadata(tmp_path / "data", "movielens")
    assert meta["positives_only"] and meta["labels"] == "rating >= 3.5"
    config = load_config(
        ROOT / "configs" / "local.py",
        [("data.name", "movielens"), ("data.data_dir", str(tmp_path / "data"))],
    )
    info = pipeline.load_dataset_info(config.data)
    negatives = config.data.negatives_per_positive
    assert info.positives_only and negatives >= 1
    assert pipeline.num_examples(info, "train", negatives) == (
        info.split_sizes["train"] * (1 + negatives)
    )
    options = local.ImportOptions(name="none", positive_threshold=6.0, positives_only=True)
    with pytest.raises(
        local.ImportFailed, match=r"a rating at or above --positive_threshold 6: --positives_only"
    ):
        movielens.import_movielens(tmp_path / "ml", tmp_path / "data", options, verbose=False)


@pytest.mark.parametrize("column", ["label", "rating"])
def test_local_positives_only_keeps_the_positives_of_labelled_data(tmp_path, column):
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "items.csv", ["item_id", "text"], [[f"i{n}", f"item {n}"] for n in range(6)])
    rows = [
        [f"u{u}", f"i{(u + n) % 6}", 1000 * u + n, (u + n) % 3] for u in range(4) for n in range(5)
    ]
    # label: 1 where the last cell is 0; rating: 5 there, else 2 or 3.
    values = {"label": lambda c: int(c == 0), "rating": lambda c: 5 if c == 0 else c + 1}[column]
    write_csv(
        folder / "interactions.csv",
        ["user_id", "item_id", "timestamp", column],
        [[u, i, t, values(c)] for u, i, t, c in rows],
    )
    argv = ["--input", str(folder), "--output", str(tmp_path / "data")]
    local.main([*argv, "--name", "kept", "--positives_only", "--split", "random"])
    liked = sorted((u, i, 1.0, t) for u, i, t, c in rows if c == 0)
    assert rated(tmp_path / "data", "kept") == liked
    assert builder.read_metadata(tmp_path / "data", "kept")["positives_only"]
    local.main([*argv, "--name", "every", "--split", "random"])  # without: every row kept
    assert len(rated(tmp_path / "data", "every")) == len(rows)


def rated(data_dir: Path, name: str) -> list[tuple[str, str, float, int]]:
    """(user key, movie key, label, timestamp) of every interaction of a dataset, sorted."""
    meta = builder.read_metadata(data_dir, name)
    return sorted(
        (meta["user_ids"][r["user_index"]], meta["item_ids"][r["item_index"]], float(r["label"]),
         int(r["timestamp"]))
        for rows in records(data_dir, name).values()
        for r in rows
    )  # fmt: skip


def item_texts(data_dir: Path, name: str) -> dict[str, str]:
    items = records(data_dir, name, "items")["items"]
    return {builder.text(r["item_key"]): builder.text(r["text"]) for r in items}


def test_ml1m_dat_layout(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    with pytest.raises(local.ImportFailed, match="ratings.dat and movies.dat"):
        movielens.import_movielens(folder, tmp_path / "data", verbose=False)
    movies = [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Misérables, Les (1995)::Drama|Musical",
        '3::"Great Performances" Cats (1998)::Musical',
        "4::Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)"
        "::Sci-Fi|War",
        "5::Rosencrantz & Guildenstern Are Dead (1990)::Comedy|Drama",
    ]
    # ISO-8859-1 with CRLF line ends: "é" is the single byte 0xE9.
    (folder / "movies.dat").write_bytes("".join(m + "\r\n" for m in movies).encode("latin-1"))
    assert b"Mis\xe9rables" in (folder / "movies.dat").read_bytes()
    (folder / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    ratings = [
        "1::1::5::978300760",
        "1::2::3::978300761",
        "1::3::4::978300762",
        "1::4::2::978300763",
        "2::2::4::978300770",
        "2::5::1::978300771",
        "2::4::5::978300772",
        "2::3::5",  # line 8: cut short
        "x2::1::4::978300790",  # line 9
        "3::99::5::978300800",  # line 10: movie 99 is not in movies.dat
        "3::1::3::978300801",
    ]
    (folder / "ratings.dat").write_text("\n".join(ratings) + "\n", encoding="ascii")
    options = local.ImportOptions(name="ml1m")
    with pytest.raises(local.ImportFailed) as failed:
        movielens.import_movielens(folder, tmp_path / "data", options, verbose=False)
    message = str(failed.value)
    assert (
        "ratings.dat:8: bad row: expected 4 '::'-separated fields "
        "(UserID::MovieID::Rating::Timestamp), found 3" in message
    )
    assert "ratings.dat:9: non-numeric id: UserID 'x2' is not a whole number" in message
    assert "ratings.dat:10: unknown item: item_id '99'" in message
    assert "3 problem(s)" in message

    options.skip_invalid = True
    movielens.import_movielens(folder, tmp_path / "data", options, verbose=False)
    meta = builder.read_metadata(tmp_path / "data", "ml1m")
    assert meta["skipped"] == {"bad row": 1, "non-numeric id": 1, "unknown item": 1}
    assert meta["source"].startswith("MovieLens (ml-1m / ml-10m) ")
    assert (meta["num_user_rows"], meta["num_item_rows"]) == (3, 5)
    assert item_texts(tmp_path / "data", "ml1m") == {
        "1": "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "2": "Misérables, Les (1995). Genres: Drama, Musical",
        "3": '"Great Performances" Cats (1998). Genres: Musical',
        "4": "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963). "
        "Genres: Sci-Fi, War",
        "5": "Rosencrantz & Guildenstern Are Dead (1990). Genres: Comedy, Drama",
    }
    # Ratings of 4 and 5 stars are positives (--positive_threshold 4).
    assert rated(tmp_path / "data", "ml1m") == [
        ("1", "1", 1.0, 978300760),
        ("1", "2", 0.0, 978300761),
        ("1", "3", 1.0, 978300762),
        ("1", "4", 0.0, 978300763),
        ("2", "2", 1.0, 978300770),
        ("2", "4", 1.0, 978300772),
        ("2", "5", 0.0, 978300771),
        ("3", "1", 0.0, 978300801),
    ]


def test_ml10m_dat_layout_with_half_stars_and_tags(tmp_path):
    folder = tmp_path / "ml-10M100K"
    folder.mkdir()
    movies = [
        b"1::Toy Story (1995)::Adventure|Animation|Children|Comedy|Fantasy",
        "2::Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)::Comedy|Romance".encode(),
        # One Latin-1 line in a UTF-8 file is read as Latin-1, the others stay UTF-8.
        "3::Pokémon: The First Movie (1998)::Animation|Children".encode("latin-1"),
        b"4::Pull My Daisy (1958)::(no genres listed)",
    ]
    (folder / "movies.dat").write_bytes(b"\n".join(movies) + b"\n")
    tags = [
        "15::1::pixar::1215184630",
        "15::2::quirky, romantic::1215184640",
        "20::2::Audrey Tautou::1215184641",
        "21::2::quirky, romantic::1215184642",  # the same tag again: kept once
        "15::3::classic:::1215184650",  # the tag "classic:"
        "15::4::Kerouac – beat::1215184660",
        "15::999::orphan::1215184670",  # a movie not in movies.dat: no text to add it to
        "15::1::broken",  # line 8: cut short
    ]
    (folder / "tags.dat").write_text("\n".join(tags) + "\n", encoding="utf-8")
    ratings = [
        "1::1::5::838985046",
        "1::2::3.5::838983525",
        "1::3::4.5::838983392",
        "1::4::0.5::838983421",
        "2::1::4::868245777",
        "2::2::2.5::868245920",
        "2::3::3::868245645",
        "2::77::4.5::868246000",  # line 8: movie 77 is not in movies.dat
    ]
    (folder / "ratings.dat").write_text("\r\n".join(ratings) + "\r\n", encoding="ascii")
    options = local.ImportOptions(name="ml10m", positive_threshold=3.5)
    with pytest.raises(local.ImportFailed) as failed:
        movielens.import_movielens(folder, tmp_path / "data", options, verbose=False)
    message = str(failed.value)
    assert (
        "tags.dat:8: bad row: expected 4 '::'-separated fields "
        "(UserID::MovieID::Tag::Timestamp), found 3" in message
    )
    assert "ratings.dat:8: unknown item: item_id '77'" in message

    options.skip_invalid = True
    movielens.import_movielens(folder, tmp_path / "data", options, verbose=False)
    meta = builder.read_metadata(tmp_path / "data", "ml10m")
    assert meta["skipped"] == {"bad row": 1, "unknown item": 1}
    assert (meta["num_user_rows"], meta["num_item_rows"]) == (2, 4)
    assert item_texts(tmp_path / "data", "ml10m") == {
        "1": "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. "
        "Tags: pixar",
        "2": "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001). Genres: Comedy, Romance. "
        "Tags: quirky, romantic, Audrey Tautou",
        "3": "Pokémon: The First Movie (1998). Genres: Animation, Children. Tags: classic:",
        "4": "Pull My Daisy (1958). Tags: Kerouac – beat",
    }
    # Half stars: 3.5 meets --positive_threshold 3.5, 3 and 2.5 do not.
    assert rated(tmp_path / "data", "ml10m") == [
        ("1", "1", 1.0, 838985046),
        ("1", "2", 1.0, 838983525),
        ("1", "3", 1.0, 838983392),
        ("1", "4", 0.0, 838983421),
        ("2", "1", 1.0, 868245777),
        ("2", "2", 0.0, 868245920),
        ("2", "3", 0.0, 868245645),
    ]


def test_the_printed_train_command_runs_the_importers_own_python(tmp_path, monkeypatch):
    python = tmp_path / "repo" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.chdir(tmp_path / "repo")  # the project folder, where train.py is
    assert local.train_command("shop", "data").startswith(".venv/bin/python train.py ")
    monkeypatch.chdir(python.parent)  # not a bare name that the PATH would resolve
    assert local.train_command("shop", "data").startswith("./python train.py ")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", "/opt/my env/bin/python")  # outside: absolute
    assert local.train_command("shop", "data").startswith("'/opt/my env/bin/python' train.py ")
