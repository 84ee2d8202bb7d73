"""The Grain pipeline: schema, item blocks, order, resume, multi-process slices, negatives."""

import io
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds
from PIL import Image

from mmrec_jax import schema
from mmrec_jax.config import ConfigError, load_config
from mmrec_jax.data import builder, local, pipeline, synthetic

ROOT = Path(__file__).resolve().parents[1]
TOWERS = "image,audio,id,history"
BATCH = 16


def make_config(data_dir, name="mmrec_synthetic", **overrides):
    pairs = [
        ("data.data_dir", str(data_dir)),
        ("data.name", name),
        ("model.towers", TOWERS),
        ("train.batch_size", str(BATCH)),
        ("data.synthetic.num_users", "40"),
        ("data.synthetic.num_items", "60"),
        ("data.synthetic.seed", "1"),
        # The stored side of the synthetic images: batches carry them byte for byte.
        ("model.image.size", "56"),
    ]
    pairs += [(k.replace("__", "."), str(v)) for k, v in overrides.items()]
    return load_config(ROOT / "configs" / "tiny.py", pairs)


def records(data_dir, name, config=None):
    full = name if config is None else f"{name}/{config}"
    return {
        split: [source[i] for i in range(len(source))]
        for split, source in tfds.data_source(full, data_dir=str(data_dir)).items()
    }


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "items":
                assert_same_batches([a[key]], [b[key]])
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def rows_of(batch):
    """(user_index, candidate item row, label, weight, history item rows) per row."""
    items = batch["items"]["item_index"]
    out = []
    for r in range(batch["label"].shape[0]):
        history = tuple(
            int(items[s])
            for s, m in zip(batch["history_slot"][r], batch["history_mask"][r], strict=True)
            if m
        )
        out.append(
            (
                int(batch["user_index"][r]),
                int(items[batch["item_slot"][r]]),
                float(batch["label"][r]),
                float(batch["weight"][r]),
                history,
            )
        )
    return out


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pipeline")
    pipeline.ensure_dataset(make_config(data_dir).data)
    return data_dir


@pytest.fixture(scope="module")
def implicit(tmp_path_factory):
    """A positives-only, text-only dataset with cold items, built by the local importer."""
    folder = tmp_path_factory.mktemp("implicit_input")
    rng = np.random.default_rng(7)
    items = ["item_id,text"] + [f"m{i},movie number {i} about topic {i % 5}" for i in range(50)]
    (folder / "items.csv").write_text("\n".join(items) + "\n")
    lines = ["user_id,item_id,timestamp"]
    for user in range(30):
        chosen = rng.choice(50, size=int(rng.integers(8, 16)), replace=False)
        lines += [f"u{user},m{item},{1000 + 10 * k}" for k, item in enumerate(chosen)]
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    data_dir = tmp_path_factory.mktemp("implicit")
    options = local.ImportOptions(name="implicit", split="cold_items", cold_item_share=0.2)
    local.import_folder(folder, data_dir, options, verbose=False)
    return data_dir


def test_first_use_builds_the_synthetic_dataset(tmp_path, capsys):
    config = make_config(tmp_path, data__synthetic__num_users=20, data__synthetic__num_items=30)
    pipeline.ensure_dataset(config.data)
    assert "oracle AUC" in capsys.readouterr().out
    info = pipeline.load_dataset_info(config.data)
    assert info.num_user_rows == 20 and info.num_item_rows == 30
    assert set(info.oracle) == set(builder.SPLITS)
    pipeline.ensure_dataset(config.data)  # built: nothing to do
    assert "oracle" not in capsys.readouterr().out
    other = make_config(tmp_path, data__synthetic__num_users=21, data__synthetic__num_items=30)
    with pytest.raises(ValueError, match="num_users: built 20, configured 21"):
        pipeline.ensure_dataset(other.data)
    # An interrupted build (interactions never written) is generated again, by a run or
    # by the generator's command without --overwrite.
    shutil.rmtree(builder.config_dir(tmp_path, "mmrec_synthetic", "interactions"))
    pipeline.ensure_dataset(config.data)
    assert "incomplete" in capsys.readouterr().out
    assert builder.is_built(tmp_path, "mmrec_synthetic")
    shutil.rmtree(builder.config_dir(tmp_path, "mmrec_synthetic", "interactions"))
    synthetic.main(["--output", str(tmp_path), "--num_users", "20", "--num_items", "30"])
    assert "incomplete" in capsys.readouterr().out
    assert builder.is_built(tmp_path, "mmrec_synthetic")
    # A folder of that name that is not this layout is never taken for a partial build.
    foreign = tmp_path / "foreign"
    (foreign / "mmrec_synthetic" / "notes").mkdir(parents=True)
    with pytest.raises(SystemExit):
        synthetic.main(["--output", str(foreign), "--num_users", "20", "--num_items", "30"])
    assert "already exists" in capsys.readouterr().err
    assert (foreign / "mmrec_synthetic" / "notes").is_dir()


def test_a_foreign_folder_in_the_datasets_place_is_kept_and_named(tmp_path):
    (tmp_path / "mmrec_synthetic" / "notes").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a dataset this version of mmrec_jax wrote"):
        pipeline.ensure_dataset(make_config(tmp_path).data)
    assert (tmp_path / "mmrec_synthetic" / "notes").is_dir()


def test_a_data_dir_that_cannot_be_written_is_named_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    config = make_config(tmp_path / "file" / "data")
    with pytest.raises(ConfigError, match=r"config.data.data_dir=.*file/data.*Not a directory"):
        pipeline.ensure_dataset(config.data)


def test_missing_imported_dataset_names_the_importer(tmp_path):
    config = make_config(tmp_path, name="my_shop")
    with pytest.raises(pipeline.DatasetNotBuiltError, match="mmrec_jax.data.local"):
        pipeline.ensure_dataset(config.data)
    with pytest.raises(pipeline.DatasetNotBuiltError, match="my_shop"):
        pipeline.load_dataset_info(config.data)
    # The synthetic one: the command that generates it with the config's own settings.
    config = make_config(tmp_path)
    with pytest.raises(pipeline.DatasetNotBuiltError) as error:
        pipeline.load_dataset_info(config.data)
    command = str(error.value).split("settings: ")[1].split(" (from Python")[0]
    assert command.startswith("python -m mmrec_jax.data.synthetic --output ")
    synthetic.main(command.split()[3:])
    assert pipeline.load_dataset_info(config.data).num_user_rows == 40
    pipeline.ensure_dataset(config.data)  # what the config asks for: nothing to redo


def test_batches_follow_the_schema_and_point_at_the_right_items(syn):
    config = make_config(syn)
    item_records = records(syn, "mmrec_synthetic", "items")["items"]
    expected = records(syn, "mmrec_synthetic")["validation"]
    batches = list(pipeline.make_batches(config, "validation", train=False))
    assert len(batches) == -(-len(expected) // BATCH)
    rows, user_ids = [], []
    for batch in batches:
        dims = schema.validate_batch(
            batch, TOWERS, expected_dims={"B": BATCH, "H": 4, "S": 56, "T": 4000}
        )
        assert dims["U"] % 8 == 0  # a multiple of the 8 local devices
        items = batch["items"]
        for slot, row in enumerate(items["item_index"]):
            if row < 0:  # padding slot
                assert items["item_id"][slot] == 0
                assert not items["has_image"][slot] and not items["has_audio"][slot]
                assert not items["image"][slot].any() and not items["audio"][slot].any()
                continue
            record = item_records[row]
            assert items["item_id"][slot] == record["item_id"]
            assert items["has_image"][slot] == record["has_image"]
            assert items["has_audio"][slot] == record["has_audio"]
            if record["has_image"]:
                image = Image.open(io.BytesIO(record["image"])).convert("RGB")
                np.testing.assert_array_equal(items["image"][slot], np.asarray(image))
            else:
                assert not items["image"][slot].any()
            if record["has_audio"]:
                wave, _ = soundfile.read(io.BytesIO(record["audio"]), dtype="float32")
                np.testing.assert_allclose(items["audio"][slot], wave, atol=1e-6)
        rows += rows_of(batch)
        user_ids += batch["user_id"].tolist()
    real = [r for r in rows if r[3] == 1.0]
    assert user_ids[: len(expected)] == [r["user_id"] for r in expected]
    assert len(real) == len(expected)
    assert all(r[3] == 0.0 for r in rows[len(expected) :])
    for row, record in zip(real, expected, strict=True):
        history = tuple(h for h in record["history"][:4] if h >= 0)
        assert row == (record["user_index"], record["item_index"], record["label"], 1.0, history)


def test_a_block_large_enough_for_block_chunks_fills_them_in_order(syn, monkeypatch):
    trained = make_config(syn, model__towers="text,image,id,history", model__text__mode="finetune")
    images = make_config(syn, model__towers="image,id,history")
    lookups = make_config(syn, model__towers="text,id,history")  # frozen text: nothing to skip
    configs = (trained, images, lookups)
    plain, plain_images, plain_lookups = (
        take(pipeline.make_batches(c, "train", train=True), 2) for c in configs
    )
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 2)  # blocks of 16 or more: in 8 chunks
    chunked, chunked_images, chunked_lookups = (
        take(pipeline.make_batches(c, "train", train=True), 2) for c in configs
    )
    pairs = zip(plain + plain_images, chunked + chunked_images, strict=True)
    for one_go, in_chunks in pairs:
        assert rows_of(in_chunks) == rows_of(one_go)  # the same rows, items in other slots
        items, before = in_chunks["items"], one_go["items"]
        capacity = items["item_index"].shape[0]
        assert schema.block_chunks(capacity) == 8 and capacity % (8 * 8) == 0  # x 8 devices
        used = int((items["item_index"] >= 0).sum())
        assert used == int((before["item_index"] >= 0).sum()) <= capacity * 7 // 8
        chunks_used = -(-used // (capacity // 8))  # the chunks fill in order
        chunk = np.arange(capacity) % 8
        assert (items["item_index"][chunk >= chunks_used] == -1).all()
        assert (items["item_index"][chunk < chunks_used] >= 0).sum() == used
        for slot in np.flatnonzero(items["item_index"] >= 0):  # content moved with its item
            (was,) = np.flatnonzero(before["item_index"] == items["item_index"][slot])
            for name in items:
                np.testing.assert_array_equal(items[name][slot], before[name][was], name)
    # No tower runs a network over a frozen text tower's blocks: they stay as they were.
    assert_same_batches(chunked_lookups, plain_lookups)
    # Two processes' blocks of 40 items each are chunked when together they reach 48 slots
    # (the model sees the global block): each fills its own chunks in order.
    monkeypatch.setattr(schema, "MIN_CHUNK_ITEMS", 6)
    halves = [
        next(pipeline.make_batches(trained, "train", train=True, process_index=p, process_count=2))
        for p in range(2)
    ]
    merged_rows = []
    for half in halves:
        items = half["items"]["item_index"]
        capacity = items.shape[0]
        assert capacity == 64  # rounded to 8 chunks x 8 devices (40 slots without chunks)
        used = int((items >= 0).sum())
        chunks_used = -(-used // (capacity // 8))
        assert chunks_used < 8 and (items[np.arange(capacity) % 8 >= chunks_used] == -1).all()
        local = {k: half[k] % capacity for k in ("item_slot", "history_slot")}  # offsets off
        merged_rows += rows_of({**half, **local})
    assert merged_rows == rows_of(plain[0])


def test_every_process_block_of_a_chunked_global_block_takes_the_slot_order():
    # Brute force over block sizes, device counts and process counts: whenever the model
    # encodes the global block in chunks, each process's block fills its own chunks.
    for num_items, multiple, processes in itertools.product(
        range(1, 700, 7), (1, 2, 4, 6, 8, 10), (1, 2, 3, 4, 10)
    ):
        capacity = schema.item_capacity(1000, 0, num_items, multiple, False, True, processes)
        assert capacity % multiple == 0 and capacity >= num_items
        if schema.block_chunks(capacity * processes) > 1:
            assert capacity % (multiple * schema.BLOCK_CHUNKS) == 0, (num_items, multiple)
            assert sorted(schema.slot_order(capacity)) == list(range(capacity))
        # Without a content tower nothing is chunked, so nothing is rounded further.
        plain = schema.item_capacity(1000, 0, num_items, multiple, False, False, processes)
        assert plain == -(-num_items // multiple) * multiple


def test_training_order_is_a_fresh_permutation_every_epoch(syn):
    config = make_config(syn)
    train = records(syn, "mmrec_synthetic")["train"]
    n = len(train)
    batches = list(pipeline.make_batches(config, "train", train=True, num_epochs=2))
    assert len(batches) == (2 * n) // BATCH  # whole batches only, across the epoch boundary
    keys = [(r[0], r[1]) for b in batches for r in rows_of(b)]
    every = {(r["user_index"], r["item_index"]) for r in train}
    first, second = keys[:n], keys[n : 2 * n]
    assert set(first) == every and len(set(first)) == n  # one epoch: each example once
    assert set(second[: len(keys) - n]) <= every
    assert first[:50] != second[:50]
    again = take(pipeline.make_batches(config, "train", train=True, num_epochs=2), 3)
    assert_same_batches(again, batches[:3])
    reseeded = take(pipeline.make_batches(make_config(syn, seed=5), "train", train=True), 1)
    assert rows_of(reseeded[0]) != rows_of(batches[0])


@pytest.mark.parametrize("stop", [3, "epoch_end"])
def test_restored_iterator_yields_the_same_following_batches(syn, stop):
    config = make_config(syn, data__prefetch=3)
    n = len(records(syn, "mmrec_synthetic")["train"])
    stop = n // BATCH - 1 if stop == "epoch_end" else stop

    def batches(**kwargs):
        return pipeline.make_batches(config, "train", train=True, num_epochs=2, **kwargs)

    following = take(batches(), stop + 4)[stop:]
    assert len(following) == 4
    assert_same_batches(take(batches(start_row=stop * BATCH), 4), following)


def test_a_stream_resumed_at_another_batch_size_neither_skips_nor_repeats_rows(syn):
    config = make_config(syn)

    def stream_rows(batch_size, start_row, count):
        iterator = pipeline.make_batches(
            config, "train", train=True, batch_size=batch_size, start_row=start_row
        )
        return [row for batch in take(iterator, count) for row in rows_of(batch)]

    uninterrupted = stream_rows(BATCH, 0, 6)
    assert stream_rows(BATCH // 2, 2 * BATCH, 8) == uninterrupted[2 * BATCH :]
    with pytest.raises(ValueError, match="start_row=-1 must be 0 or more"):
        pipeline.make_batches(config, "train", train=True, start_row=-1)


@pytest.mark.parametrize("train, sample", [(True, None), (False, None), (False, 7)])
def test_two_processes_concatenate_to_the_one_process_batches(syn, train, sample):
    config = make_config(syn)
    count = 6 if train else None
    single = pipeline.make_batches(config, "test", train=train, sample=sample)
    parts = [
        pipeline.make_batches(
            config, "test", train=train, process_index=p, process_count=2, sample=sample
        )
        for p in range(2)
    ]
    single = take(single, count) if train else list(single)
    halves = [take(p, count) if train else list(p) for p in parts]
    assert len(halves[0]) == len(halves[1]) == len(single)
    if sample:
        assert sum(int(b["weight"].sum()) for b in single) == sample
    for whole, first, second in zip(single, *halves, strict=True):
        assert first["label"].shape == (BATCH // 2,)
        capacity = first["items"]["item_id"].shape[0]
        assert first["item_slot"].max() < capacity <= second["item_slot"].min()
        merged = {key: np.concatenate([first[key], second[key]]) for key in first if key != "items"}
        merged["items"] = {
            key: np.concatenate([first["items"][key], second["items"][key]])
            for key in first["items"]
        }
        schema.validate_batch(merged, TOWERS, expected_dims={"B": BATCH})
        assert rows_of(merged) == rows_of(whole)


def test_text_tokens_in_trained_mode(syn):
    from transformers import AutoTokenizer

    from mmrec_jax.hub import resolve_pretrained

    config = make_config(syn, model__towers="text,id", model__text__mode="finetune")
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(config.model.text.model))
    item_records = records(syn, "mmrec_synthetic", "items")["items"]
    batch = next(pipeline.make_batches(config, "test_cold", train=False))
    schema.validate_batch(batch, "text,id", "finetune", expected_dims={"L": 16})
    items = batch["items"]
    for slot, row in enumerate(items["item_index"]):
        text = item_records[row]["text"].decode() if row >= 0 else ""
        want = tokenizer(text, max_length=16, truncation=True, padding="max_length")
        np.testing.assert_array_equal(items["text_ids"][slot], want["input_ids"])
        np.testing.assert_array_equal(items["text_mask"][slot], want["attention_mask"])
        assert items["has_text"][slot] == (row >= 0 and bool(item_records[row]["has_text"]))


def test_decoding_per_block_matches_the_in_memory_table(syn):
    config = make_config(syn)
    lazy_config = make_config(syn, data__max_item_memory_mib=0)
    store = pipeline.ItemStore(lazy_config)
    assert not store.in_memory and pipeline.ItemStore(config).in_memory
    lazy = take(pipeline.make_batches(lazy_config, "train", train=True, item_store=store), 3)
    assert_same_batches(lazy, take(pipeline.make_batches(config, "train", train=True), 3))


def test_user_store_history_and_positives(syn):
    config = make_config(syn)
    store = pipeline.ItemStore(config)
    train = records(syn, "mmrec_synthetic")["train"]
    history, mask = store.users.latest_history(4)
    offsets, rows = store.users.train_positives
    for user in range(store.info.num_user_rows):
        positives = sorted(
            (r for r in train if r["user_index"] == user and r["label"] == 1),
            key=lambda r: r["timestamp"],
            reverse=True,
        )
        latest = [r["item_index"] for r in positives[:4]]
        assert mask[user].sum() == len(latest)
        np.testing.assert_array_equal(history[user][mask[user]], latest)
        np.testing.assert_array_equal(
            rows[offsets[user] : offsets[user + 1]], sorted({r["item_index"] for r in positives})
        )


def test_a_dataset_without_interacted_items_serves_its_positives_instead(syn, monkeypatch):
    """User tables written before the `interacted` field existed still load."""
    info = pipeline.load_dataset_info(make_config(syn).data)
    current = pipeline.UserStore.load(info)
    assert current.interacted[1].size > current.engaged[1].size  # negatives are in it
    real_read = pipeline._SplitReader.read

    def read_without_interacted(self, indices):
        return [{k: v for k, v in r.items() if k != "interacted"} for r in real_read(self, indices)]

    monkeypatch.setattr(pipeline._SplitReader, "read", read_without_interacted)
    older = pipeline.UserStore.load(info)
    for ours, theirs in zip(older.interacted, current.engaged, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_negatives_avoid_every_positive_and_are_deterministic(implicit):
    config = make_config(implicit, name="implicit", model__towers="id,history")
    info = pipeline.load_dataset_info(config.data)
    assert info.positives_only and info.split_sizes["test_cold"] > 0
    with pytest.raises(ValueError, match="negatives_per_positive"):
        pipeline.make_batches(config, "train", train=True)
    config = make_config(
        implicit, name="implicit", model__towers="id,history", data__negatives_per_positive=3
    )
    everything = records(implicit, "implicit")
    engaged = {}
    for split_rows in everything.values():
        for r in split_rows:
            engaged.setdefault(r["user_index"], set()).add(r["item_index"])
    store = pipeline.ItemStore(config)
    n = len(everything["train"]) * 4
    epochs = []
    for _ in range(2):
        rows = [
            r
            for b in take(pipeline.make_batches(config, "train", train=True), 2 * (n // BATCH))
            for r in rows_of(b)
        ]
        epochs.append(rows)
    assert epochs[0] == epochs[1]  # deterministic
    first, second = epochs[0][:n], epochs[0][n : 2 * n]
    for rows in (first, second[: (2 * n // BATCH) * BATCH - n]):
        negatives = [r for r in rows if r[2] == 0.0]
        assert all(r[1] not in engaged[r[0]] for r in negatives)
        assert all(store.item_id[r[1]] > 0 for r in negatives)  # the training catalogue
    assert len([r for r in first if r[2] == 0.0]) == 3 * len([r for r in first if r[2] == 1.0])
    negatives_by_epoch = [sorted(r for r in rows if r[2] == 0.0) for rows in (first, second)]
    assert negatives_by_epoch[0] != negatives_by_epoch[1][: len(negatives_by_epoch[0])]
    cold = [r for b in pipeline.make_batches(config, "test_cold", train=False) for r in rows_of(b)]
    cold = [r for r in cold if r[3] == 1.0]
    assert len(cold) == 4 * info.split_sizes["test_cold"]
    cold_negatives = [r for r in cold if r[2] == 0.0]
    assert all(store.item_id[r[1]] == 0 and r[1] not in engaged[r[0]] for r in cold_negatives)
    again = [r for b in pipeline.make_batches(config, "test_cold", train=False) for r in rows_of(b)]
    assert [r for r in again if r[3] == 1.0] == cold


def test_an_evaluation_sample_is_a_seeded_random_subset_of_the_full_pass(implicit):
    config = make_config(
        implicit, name="implicit", model__towers="id,history", data__negatives_per_positive=3
    )

    def scored(**kwargs):  # rows of weight 1, in order
        batches = pipeline.make_batches(config, "train", train=False, **kwargs)
        return [r for b in batches for r in rows_of(b) if r[3] == 1.0]

    full = scored()
    groups = [tuple(full[i : i + 4]) for i in range(0, len(full), 4)]  # a positive, 3 negatives
    assert all(g[0][2] == 1.0 and {r[2] for r in g[1:]} == {0.0} for g in groups)
    sample = scored(sample=10)
    assert len(sample) == 40
    picked = [tuple(sample[i : i + 4]) for i in range(0, 40, 4)]
    # Whole groups of the full pass, each with the same negatives, in stored order.
    positions = [groups.index(g) for g in picked]
    assert positions == sorted(set(positions))
    assert positions != list(range(10)) and positions[-1] >= len(groups) // 2  # not the first
    assert scored(sample=10) == sample
    assert scored(sample=len(groups)) == full
    config.seed = config.seed + 1
    assert scored(sample=10)[::4] != sample[::4]  # other interactions
    with pytest.raises(ValueError, match="evaluation"):
        pipeline.make_batches(config, "train", train=True, sample=10)
    with pytest.raises(ValueError, match="at least 1"):
        pipeline.make_batches(config, "train", train=False, sample=0)


def test_a_damaged_dataset_is_named_with_the_way_to_rebuild_it(syn, tmp_path):
    info = pipeline.load_dataset_info(make_config(syn).data)
    name, sizes = info.name, info.split_sizes
    builder.check_readable(syn, name, sizes)  # intact
    for damage in ("cut", "deleted", "metadata", "flipped"):
        copy = tmp_path / damage
        shutil.copytree(syn, copy)
        folder = builder.config_dir(copy, name, builder.INTERACTIONS)
        split = "train" if damage == "flipped" else "test"
        shard = next(folder.glob(f"{name}-{split}.array_record-*"))
        data = shard.read_bytes()
        if damage == "cut":  # as by a full disk: most of it is missing
            shard.write_bytes(data[:1000])
        elif damage == "deleted":
            shard.unlink()
        elif damage == "metadata":
            (folder / "metadata.json").write_bytes(b'{"num_users": \xff')  # not even UTF-8
        else:  # bytes changed in the middle: caught where they are read
            middle = len(data) // 2
            shard.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64])
                              + data[middle + 64 :])  # fmt: skip
        with pytest.raises(builder.DatasetDamagedError) as error:
            builder.check_readable(copy, name, sizes)
            batches = pipeline.make_batches(make_config(copy), "train", train=False, multiple=1)
            list(batches)
        message = str(error.value)
        assert message.startswith(f"Dataset {name!r} in {copy} is damaged: "), message
        assert f"Build it again: move {copy / name} away" in message
        if damage != "metadata":
            assert f"the {split} records of {folder}" in message
        else:
            with pytest.raises(builder.DatasetDamagedError, match="Build it again"):
                builder.read_metadata(copy, name)


def test_available_towers_follow_the_dataset(implicit):
    info = pipeline.load_dataset_info(make_config(implicit, name="implicit").data)
    assert info.modalities == ("text",)
    assert pipeline.available_towers("text,image,audio,id,history", info) == "text,id,history"
    with pytest.raises(ValueError, match="lacks"):
        pipeline.available_towers("image,audio", info)


def test_grain_worker_processes_give_the_same_batches(syn):
    config = make_config(syn)
    plain = take(pipeline.make_batches(config, "train", train=True), 6)
    workers = make_config(syn, data__num_workers=2)
    iterator = pipeline.make_batches(workers, "train", train=True)
    try:
        assert_same_batches(take(iterator, 3), plain[:3])
    finally:
        iterator.close()
    resumed = pipeline.make_batches(workers, "train", train=True, start_row=3 * BATCH)
    try:
        assert_same_batches(take(resumed, 3), plain[3:])
    finally:
        resumed.close()


def _grain_workers() -> set:
    return {p for p in multiprocessing.active_children() if p.name.startswith("grain")}


def _exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (an orphan's new parent may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_grain_workers_leave_ctrl_c_and_sigterm_to_the_training_process(syn):
    """Ctrl-C and a scheduler's SIGTERM reach the workers too; they must keep serving
    while training finishes its validation pass and saves."""
    plain = list(pipeline.make_batches(make_config(syn), "validation", train=False))
    before = _grain_workers()
    workers_config = make_config(syn, data__num_workers=2)
    iterator = pipeline.make_batches(workers_config, "validation", train=False)
    try:
        batches = take(iterator, 2)  # one from each worker: both have started
        workers = _grain_workers() - before
        assert len(workers) == 2
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
            os.kill(worker.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert all(worker.is_alive() for worker in workers)
        batches += list(iterator)
    finally:
        iterator.close()
    assert_same_batches(batches, plain)


def test_grain_workers_exit_when_their_process_dies(syn):
    script = f"""
import multiprocessing, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_data_pipeline import make_config
from mmrec_jax.data import pipeline
iterator = pipeline.make_batches(
    make_config({str(syn)!r}, data__num_workers=2), "train", train=False
)
next(iterator), next(iterator)  # one batch from each worker: both have started
workers = [p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")]
print(" ".join(map(str, workers)), flush=True)
os._exit(0)  # gone without a word to the workers, as when killed
"""
    # The workers hold the pipe too: read the line, not to the end of the output.
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    with process.stdout:
        workers = [int(pid) for pid in process.stdout.readline().split()]
    assert process.wait(timeout=300) == 0
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while not all(_exited(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = [pid for pid in workers if not _exited(pid)]
    for pid in running:
        os.kill(pid, signal.SIGKILL)
    assert not running, "Grain workers outlived the process they served"


def test_a_batch_from_grain_workers_freed_at_exit_leaks_no_shared_memory(syn):
    """The training loop keeps its first batch until the run returns, just before exit.
    Grain unlinks a batch's shared memory on a thread pool that exit stops; the unlinks
    it dropped made the resource tracker warn of "leaked shared_memory objects"."""
    script = f"""
import contextlib, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_data_pipeline import make_config
from mmrec_jax.data import pipeline

def run():
    config = make_config({str(syn)!r}, data__num_workers=2)
    with contextlib.closing(pipeline.make_batches(config, "train", train=True)) as batches:
        first = next(batches)
    return len(first)  # the batch is freed here, as the run returns

run()
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "leaked shared_memory" not in result.stderr, result.stderr[-3000:]


def test_bad_arguments_are_named(syn):
    config = make_config(syn)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_batches(config, "train", train=True, process_count=3)
    with pytest.raises(ValueError, match="history_len"):
        pipeline.make_batches(make_config(syn, data__history_len=60), "train", train=True)
    with pytest.raises(ValueError, match="Unknown split"):
        pipeline.make_batches(config, "tests", train=False)
    assert synthetic.NAME == config.data.name


def test_negatives_avoid_engaged_items_and_a_user_with_none_left_is_named():
    offsets = np.array([0, 3, 4, 8])  # user 0: items 1, 2, 5; user 1: item 0; user 2: all
    rows = np.array([1, 2, 5, 0, 0, 2, 4, 6])
    pool = np.array([0, 2, 4, 6])
    sampler = pipeline.NegativeSampler((offsets[:3], rows[:4]), pool, 7, seed=1)
    users = np.repeat([0, 1], 200)
    drawn = sampler.sample(users, np.zeros(400, np.int64), np.arange(400))
    assert set(drawn[:200]) == {0, 4, 6} and set(drawn[200:]) == {2, 4, 6}  # brute force
    with pytest.raises(ConfigError, match=r"1 user\(s\) \(rows \[2\] .* every one of the 4"):
        pipeline.NegativeSampler((offsets, rows), pool, 7, seed=1)


@pytest.mark.parametrize("devices", [1, 2, 6, 8])
def test_fitting_batch_sizes_fit_the_split_and_the_devices(devices):
    for examples in range(1, 3000):
        size = pipeline.fitting_batch_size(examples, devices)
        if examples < devices:
            assert size == 0
            continue
        assert size % devices == 0 and devices <= size <= examples, (examples, size)
        if examples >= 16 * devices:
            assert examples // size >= 8, (examples, size)  # a few batches per epoch
