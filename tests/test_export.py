"""Export -> load_exported -> the checkpoint's logits; the files alone; recommend."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers
from _tiny_bert import make_tiny_bert, torch_outputs
from _trained_run import GROUP, restored_checkpoint, trained_run
from safetensors.numpy import load_file, save_file

import mmrec_jax
from mmrec_jax import export, exported, recommend
from mmrec_jax.config import load_config
from mmrec_jax.data import builder, pipeline
from mmrec_jax.data.text_cache import item_text_fields
from mmrec_jax.models.bert import Bert, load_bert_config
from mmrec_jax.models.bert_weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group(GROUP)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def export_dir(workdir, tmp_path_factory):
    # As typed on a command line: relative to the working folder.
    relative = os.path.relpath(workdir)
    return export.export_run(relative, tmp_path_factory.mktemp("exports") / "export")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(config, model, params) of the checkpoint the export came from (the best)."""
    return restored_checkpoint(tmp_path_factory)


def test_load_exported_gives_the_checkpoint_logits(export_dir, checkpoint):
    config, model, params = checkpoint
    loaded_model, variables = mmrec_jax.load_exported(export_dir)
    batch = next(iter(pipeline.make_batches(config, "test", train=False)))
    expected = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))(params, batch)
    logits = jax.jit(lambda v, b: loaded_model.apply(v, b, train=False))(variables, batch)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    assert mmrec_jax.load_exported is exported.load_exported


def test_safetensors_file_alone_holds_every_parameter(export_dir, checkpoint):
    _, _, params = checkpoint
    tensors = load_file(export_dir / "params.safetensors")
    flat = flax.traverse_util.flatten_dict(jax.device_get(params))
    assert set(tensors) == {"/".join(path) for path in flat}
    assert any(key.startswith("text/bert/encoder/layer/") for key in tensors)
    for path, value in flat.items():
        array = tensors["/".join(path)]
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, np.asarray(value, np.float32))


def test_text_tower_opens_with_transformers_and_matches(export_dir):
    _, variables = mmrec_jax.load_exported(export_dir)
    torch_bert = transformers.BertModel.from_pretrained(str(export_dir / "text_model"))
    torch_bert.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export_dir / "tokenizer"))
    enc = tokenizer(
        ["a cat video", "the quick brown fox jumps over the lazy dog"],
        padding=True,
        return_tensors="np",
    )
    hidden, pooled = torch_outputs(torch_bert, enc["input_ids"], enc["attention_mask"])
    bert_params = variables["params"]["text"]["bert"]
    ours = Bert(load_bert_config(export_dir / "text_model"))
    our_hidden, our_pooled = jax.jit(ours.apply)(
        {"params": bert_params}, enc["input_ids"], enc["attention_mask"]
    )
    np.testing.assert_allclose(our_hidden, hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(our_pooled, pooled, rtol=1e-4, atol=1e-4)


def test_frozen_text_tower_exports_the_pretrained_bert(tmp_path):
    """In frozen mode the parameters hold no BERT: the export writes the one it used."""
    original = make_tiny_bert(tmp_path / "bert", seed=3)
    config = load_config(
        Path(__file__).parents[1] / "configs" / "tiny.py",
        [("model.text.model", str(tmp_path / "bert")), ("model.text.mode", "frozen")],
    )
    bert_params, bert_config = export._text_model(config, None, {})
    save_pretrained(bert_params, bert_config, tmp_path / "text_model")
    reloaded = transformers.BertModel.from_pretrained(str(tmp_path / "text_model"))
    reloaded.eval()
    ids = np.array([[2, 5, 6, 7, 3]])
    mask = np.ones_like(ids)
    for ours, reference in zip(
        torch_outputs(reloaded, ids, mask), torch_outputs(original, ids, mask), strict=True
    ):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_item_table_and_manifest(export_dir, checkpoint, workdir):
    config, _, _ = checkpoint
    info = pipeline.load_dataset_info(config.data)
    manifest = json.loads((export_dir / "export.json").read_text())
    tables = exported.load_tables(export_dir)
    n = info.num_item_rows
    assert tables["item_ids"].tolist() == list(info.item_ids)
    assert tables["user_ids"].tolist() == list(info.user_ids)
    assert tables["item_embeddings"].shape == (n, config.model.width)
    assert manifest["num_items"] == n and manifest["checkpoint_step"] >= 1
    assert manifest["workdir"] == str(workdir.resolve())  # meaningful from any folder
    # The embedding is the mean of the item's present modality tokens.
    tokens, mask = tables["item_tokens"], tables["item_token_mask"]
    mean = (tokens * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
    np.testing.assert_allclose(tables["item_embeddings"], mean, rtol=1e-5, atol=1e-6)
    run_config = json.loads((workdir / "config.json").read_text())
    assert json.loads((export_dir / "config.json").read_text()) == run_config
    # Each item's text as the dataset stores it (read with plain TFDS), on one line and
    # cut to 120 characters, the last an ellipsis.
    source = tfds.data_source(f"{config.data.name}/items", data_dir=str(config.data.data_dir))
    stored = [r["text"] for r in source["items"].__getitems__(list(range(n)))]
    lines = [" ".join((t.decode() if isinstance(t, bytes) else t).split()) for t in stored]
    assert any(len(line) > 120 for line in lines) and "" in lines  # both cases met
    expected = [line if len(line) <= 120 else line[:119] + "…" for line in lines]
    assert tables["item_texts"].tolist() == expected


def test_text_preview_keeps_one_line_and_cuts_long_texts():
    assert exported.text_preview("  Toy Story (1995).\n Genres:\tAnimation ") == (
        "Toy Story (1995). Genres: Animation"
    )
    long = "word " * 100
    preview = exported.text_preview(long)
    assert len(preview) == exported.ITEM_TEXT_CHARS and preview.endswith("…")
    assert preview[:-1] == " ".join(long.split())[: exported.ITEM_TEXT_CHARS - 1]
    assert exported.text_preview("abcdef", 6) == "abcdef"
    assert exported.text_preview("abcdefg", 6) == "abcde…"
    assert exported.text_preview("") == ""


def test_item_id_index_builds_batches_that_reproduce_the_item_tokens(export_dir, checkpoint):
    """With item_id_index.npy, the export alone says what `items["item_id"]` to feed."""
    config, _, _ = checkpoint
    tables = exported.load_tables(export_dir)
    info = pipeline.load_dataset_info(config.data)
    source = builder.open_source(info.data_dir, info.name, builder.ITEMS, "items")
    records = source.__getitems__(list(range(len(source))))
    np.testing.assert_array_equal(tables["item_id_index"], [r["item_id"] for r in records])
    assert tables["item_id_index"].dtype == np.int32 and (tables["item_id_index"] == 0).any()

    model, variables = mmrec_jax.load_exported(export_dir)
    rows = np.arange(tables["item_ids"].shape[0])
    items = dict(pipeline.ItemStore(config, info).block(rows, len(rows)))
    items["item_id"] = tables["item_id_index"]
    # The texts' fields as serving code makes them for new items, from the export alone.
    texts = [builder.text(r["text"]) if r["has_text"] else None for r in records]
    served = item_text_fields(texts, exported.load_export_config(export_dir))
    assert sorted(served) == ["has_text", "text_ids", "text_mask"]  # a fine-tuned BERT
    for field, value in served.items():
        np.testing.assert_array_equal(value, items[field], err_msg=field)
    encoded = model.apply(variables, {**items, **served}, method="encode_items")
    np.testing.assert_allclose(encoded["tokens"], tables["item_tokens"], rtol=1e-5, atol=1e-5)


def test_incomplete_or_damaged_exports_are_refused(export_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(export_dir, partial)
    (partial / "export.json").unlink()
    with pytest.raises(exported.ExportError, match="not a complete export"):
        mmrec_jax.load_exported(partial)
    # Bytes changed inside a file that still parses: the manifest's checksums catch them.
    manifest = json.loads((export_dir / "export.json").read_text())
    assert set(manifest["sha256"]) == {
        p.relative_to(export_dir).as_posix()
        for p in export_dir.rglob("*")
        if p.is_file() and p.name != "export.json"
    }
    flipped = tmp_path / "flipped"
    shutil.copytree(export_dir, flipped)
    for name, load in [
        ("params.safetensors", mmrec_jax.load_exported),
        ("item_embeddings.npy", mmrec_jax.load_tables),
        ("text_model/config.json", mmrec_jax.load_exported),
        ("text_model/model.safetensors", mmrec_jax.load_export_config),  # to encode texts
    ]:
        data = (export_dir / name).read_bytes()
        if name.endswith(".json"):  # still valid JSON, with the same values
            changed = data.replace(b"\n", b" ", 1)
        else:  # a value's last byte
            changed = data[:-1] + bytes([data[-1] ^ 1])
        (flipped / name).write_bytes(changed)
        with pytest.raises(exported.ExportError, match="its bytes differ from those the export"):
            load(flipped)
        (flipped / name).write_bytes(data)
    mmrec_jax.load_exported(flipped)
    # An export without checksums (written before they were recorded) is still checked
    # against its config.
    damaged = tmp_path / "damaged"
    shutil.copytree(export_dir, damaged)
    del manifest["sha256"]
    (damaged / "export.json").write_text(json.dumps(manifest))
    tensors = load_file(damaged / "params.safetensors")
    del tensors["fusion/head/kernel" if "fusion/head/kernel" in tensors else sorted(tensors)[-1]]
    save_file(tensors, damaged / "params.safetensors")
    with pytest.raises(exported.ExportError, match="missing"):
        mmrec_jax.load_exported(damaged)
    # Files cut short, or deleted: named, with the fix.
    for name, load in [
        ("params.safetensors", mmrec_jax.load_exported),
        ("config.json", mmrec_jax.load_exported),
        ("export.json", mmrec_jax.load_tables),
        ("item_embeddings.npy", mmrec_jax.load_tables),
    ]:
        cut = tmp_path / f"cut_{name}"
        shutil.copytree(export_dir, cut)
        (cut / name).write_bytes((cut / name).read_bytes()[:100])
        with pytest.raises(exported.ExportError) as error:
            load(cut)
        assert str(error.value).startswith(f"{cut / name} "), error.value
        assert "damaged" in str(error.value) and "Export the run again" in str(error.value)
        if name != "export.json":  # without checksums, the reader itself names the file
            (cut / "export.json").write_text(json.dumps(manifest))
            with pytest.raises(exported.ExportError, match="cannot be read") as error:
                load(cut)
            assert str(error.value).startswith(f"{cut / name} cannot be read ("), error.value
    (cut / "params.safetensors").unlink()
    with pytest.raises(exported.ExportError, match=r"params.safetensors cannot be read \(File"):
        mmrec_jax.load_exported(cut)


def test_interrupted_export_leaves_the_old_export_and_no_partial_folder(
    workdir, export_dir, monkeypatch
):
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_run(workdir, export_dir)
    before = sorted(p.name for p in export_dir.iterdir())

    def interrupted(folder, *args):
        (folder / "params.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(workdir, export_dir, overwrite=True)
    assert sorted(p.name for p in export_dir.iterdir()) == before
    assert sorted(p.name for p in export_dir.parent.iterdir()) == [export_dir.name]
    mmrec_jax.load_exported(export_dir)


def test_overwrite_replaces_only_an_earlier_export(workdir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("important")
    a_file = tmp_path / "a_file"
    a_file.write_text("important")
    for out in (notes, a_file):
        with pytest.raises(FileExistsError, match="--overwrite replaces only an earlier export"):
            export.export_run(workdir, out, overwrite=True)
    for out in (workdir, workdir.parent):
        with pytest.raises(FileExistsError, match="is or holds the training run"):
            export.export_run(workdir, out, overwrite=True)
    assert (notes / "thesis.txt").read_text() == a_file.read_text() == "important"
    assert (workdir / "checkpoints").is_dir()
    empty = tmp_path / "made_for_it"  # an empty folder is no one's data: it is used
    empty.mkdir()
    export._check_out(empty, workdir.resolve(), overwrite=False)


def test_a_bad_checkpoint_argument_is_named(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--checkpoint", "x"])
    assert exit_info.value.code == 2
    assert "--checkpoint 'x': use best, latest or a step" in capsys.readouterr().err


def _user_records(config) -> list[dict]:
    source = builder.open_source(config.data.data_dir, config.data.name, builder.USERS, "users")
    return source.__getitems__(list(range(len(source))))


def test_recommend_leaves_out_items_interacted_with_and_matches_brute_force(
    export_dir, checkpoint, monkeypatch
):
    config, model, params = checkpoint
    users = _user_records(config)
    store = pipeline.ItemStore(config)
    n = store.num_item_rows
    items = store.block(np.arange(n), n)
    # A user with negative interactions too (shown, not clicked) and items left.
    user = next(
        u for u, r in enumerate(users) if 0 < len(r["engaged"]) < len(r["interacted"]) < n - 1
    )
    record = users[user]
    # Serving must not touch the dataset.
    for name in ("ItemStore", "load_dataset_info", "make_batches"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("dataset opened"))
    recommender = recommend.ExportedRecommender(export_dir, items_per_call=16)
    results = recommender.recommend(record["user_key"].decode(), k=5)

    history = record["history"][: config.data.history_len]
    batch = {
        "user_id": np.full(n, record["user_id"], np.int32),
        "user_index": np.full(n, user, np.int32),
        "item_slot": np.arange(n, dtype=np.int32),
        "history_slot": np.repeat(np.maximum(history, 0)[None], n, axis=0).astype(np.int32),
        "history_mask": np.repeat((history >= 0)[None], n, axis=0),
        "label": np.zeros(n, np.float32),
        "weight": np.ones(n, np.float32),
        "items": items,
    }
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch))
    interacted = set(record["interacted"].tolist())
    np.testing.assert_array_equal(
        recommender.interacted_items(record["user_key"].decode()), record["interacted"]
    )
    ranked = sorted((i for i in range(n) if i not in interacted), key=lambda i: (-logits[i], i))
    item_ids = recommender.tables["item_ids"].tolist()
    assert [r.item_id for r in results] == [item_ids[i] for i in ranked[:5]]
    assert [r.text for r in results] == [recommender.tables["item_texts"][i] for i in ranked[:5]]
    np.testing.assert_allclose([r.logit for r in results], logits[ranked[:5]], atol=1e-5)
    assert not {r.item_id for r in results} & {item_ids[i] for i in interacted}
    # Every item left: all but those interacted with, the negative ones included.
    everything = recommender.recommend(record["user_key"].decode(), k=n)
    assert [r.item_id for r in everything] == [item_ids[i] for i in ranked]
    # Or every item, for replays.
    replays = recommender.recommend(record["user_key"].decode(), k=n, leave_out_interacted=False)
    assert [r.item_id for r in replays] == [
        item_ids[i] for i in sorted(range(n), key=lambda i: (-logits[i], i))
    ]
    probabilities = [r.probability for r in results]
    assert probabilities == sorted(probabilities, reverse=True)
    # The latest history, as the dataset's user record holds it, with the items' texts.
    latest = recommender.latest_history(record["user_key"].decode())
    rows = [int(i) for i in history if i >= 0]
    assert rows and [i for i, _ in latest] == [item_ids[i] for i in rows]
    assert [t for _, t in latest] == [recommender.tables["item_texts"][i] for i in rows]


def test_recommend_for_a_new_user_from_their_items_matches_brute_force(
    export_dir, checkpoint, capsys
):
    config, model, params = checkpoint
    store = pipeline.ItemStore(config)
    n = store.num_item_rows
    recommender = recommend.ExportedRecommender(export_dir, items_per_call=16)
    item_ids = recommender.tables["item_ids"].tolist()
    h = config.data.history_len
    given = [7, 2, 11, 5, 3, 8][: h + 1]  # item rows, most recent first; one past H
    assert len(given) == h + 1
    # The model reads the first H, with an unknown user ID (index 0).
    history = np.array(given[:h])
    batch = {
        "user_id": np.zeros(n, np.int32),
        "user_index": np.zeros(n, np.int32),
        "item_slot": np.arange(n, dtype=np.int32),
        "history_slot": np.repeat(history[None], n, axis=0).astype(np.int32),
        "history_mask": np.ones((n, h), bool),
        "label": np.zeros(n, np.float32),
        "weight": np.ones(n, np.float32),
        "items": store.block(np.arange(n), n),
    }
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch))
    ids = [str(item_ids[i]) for i in given]  # as typed on a command line
    np.testing.assert_allclose(recommender.scores_for_history(ids), logits, atol=1e-5)
    # A repeated item counts once, where it first appears.
    repeated = [ids[0], ids[1], ids[0], *ids[1:]]
    np.testing.assert_allclose(recommender.scores_for_history(repeated), logits, atol=1e-5)
    results = recommender.recommend_for_history(ids, k=4)
    ranked = sorted((i for i in range(n) if i not in given), key=lambda i: (-logits[i], i))
    assert [r.item_id for r in results] == [item_ids[i] for i in ranked[:4]]
    np.testing.assert_allclose([r.logit for r in results], logits[ranked[:4]], atol=1e-5)
    everything = recommender.recommend_for_history(ids, k=n, leave_out_given=False)
    assert len(everything) == n
    # Another history, other scores: the history is what the model reads.
    other = recommender.scores_for_history([str(item_ids[i]) for i in (1, 4)])
    assert np.abs(other - logits).max() > 1e-4
    with pytest.raises(recommend.UnknownItemError, match="Unknown item 'no_such_item'"):
        recommender.recommend_for_history([ids[0], "no_such_item"])

    assert recommend.main(["--export", str(export_dir), "--items", ",".join(ids), "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[0]
        == f"Note: the model reads the first {h} of the {h + 1} items given (the most recent)."
    )
    assert (
        lines[1]
        == f"Top 3 items for a new user who engaged with {h + 1} items (leaving those out):"
    )
    assert [line.split()[1] for line in lines[3:]] == [str(item_ids[i]) for i in ranked[:3]]
    args = ["--export", str(export_dir), "--items", f"{ids[0]},{ids[0]}", "--k", "2"]
    assert recommend.main(args) == 0
    out = capsys.readouterr().out
    assert "Top 2 items for a new user who engaged with 1 item (leaving it out):" in out
    with pytest.raises(SystemExit) as exit_info:
        recommend.main(["--export", str(export_dir), "--items", ids[0], "--show_history"])
    assert exit_info.value.code == 2
    assert "--show_history goes with --user" in capsys.readouterr().err
    for bad in (",", "no_such_item"):
        with pytest.raises(SystemExit) as exit_info:
            recommend.main(["--export", str(export_dir), "--items", bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--items: give at least one item id" in err and "Unknown item 'no_such_item'" in err


def test_the_exports_own_readme_runs_without_mmrec_jax(export_dir, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (export_dir / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "load_file" in b]
    monkeypatch.chdir(export_dir.parent)  # its paths are relative to the export's folder
    namespace = {}
    exec(block, namespace)
    tables = exported.load_tables(export_dir)
    np.testing.assert_array_equal(namespace["item_embeddings"], tables["item_embeddings"])
    assert namespace["params"].keys() == load_file(export_dir / "params.safetensors").keys()
    (block,) = [b for b in blocks if "item_text_fields" in b]  # new items' text, with it
    exec(block, namespace)
    fields = namespace["text_fields"]
    max_len = exported.load_export_config(export_dir).data.max_text_len
    assert fields["text_ids"].shape == (1, max_len) and fields["has_text"].tolist() == [True]


def test_readme_scores_from_the_export_alone_as_recommend_does(export_dir):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if 'method="score"' in b]
    namespace = {}
    exec(block.replace('"export/"', repr(str(export_dir))), namespace)
    user_id = namespace["tables"]["user_ids"][namespace["user"]]
    expected = recommend.ExportedRecommender(export_dir).scores(user_id)
    np.testing.assert_allclose(namespace["scores"], expected, rtol=1e-5, atol=1e-5)


def test_readme_scores_a_batch_with_the_exported_model(export_dir, checkpoint):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "load_exported" in b and "example_batch" in b]
    namespace = {}
    exec(block.replace('"export/"', repr(str(export_dir))), namespace)
    _, model, params = checkpoint
    expected = jax.jit(model.apply)({"params": params}, namespace["batch"])
    assert namespace["logits"].shape == (1,)
    np.testing.assert_allclose(namespace["logits"], expected, rtol=1e-5, atol=1e-6)


def test_recommend_cli_and_unknown_user(export_dir, capsys):
    user = str(exported.load_tables(export_dir)["user_ids"][0])
    assert recommend.main(["--export", str(export_dir), "--user", user, "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"Top 3 items for user {user}" in out and len(out.strip().splitlines()) == 5
    # Each row ends with the start of its item's text.
    best = recommend.ExportedRecommender(export_dir).recommend(user, 3)
    for line, result in zip(out.strip().splitlines()[2:], best, strict=True):
        assert line.split()[1] == str(result.item_id)
        assert line.endswith(exported.text_preview(result.text, recommend.CLI_TEXT_CHARS))
    assert "they interacted with" in out
    args = ["--export", str(export_dir), "--user", user, "--k", "2", "--show_history"]
    assert recommend.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    latest = recommend.ExportedRecommender(export_dir).latest_history(user)
    assert lines[0].startswith(f"Latest history of user {user} ({len(latest)} item")
    assert [line.split()[0] for line in lines[1 : 1 + len(latest)]] == [str(i) for i, _ in latest]
    assert lines[1 + len(latest)].startswith("Top 2 items") and len(lines) == len(latest) + 5
    args = ["--export", str(export_dir), "--user", user, "--k", "6", "--include_interacted"]
    assert recommend.main(args) == 0
    out = capsys.readouterr().out
    assert f"Top 6 items for user {user}:" in out and len(out.strip().splitlines()) == 8
    with pytest.raises(SystemExit) as exit_info:
        recommend.main(["--export", str(export_dir), "--user", "no_such_user"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown user 'no_such_user'" in err and "--list_users" in err
    with pytest.raises(recommend.UnknownUserError):
        recommend.ExportedRecommender(export_dir).recommend("no_such_user")


def test_recommending_from_nan_scores_is_an_error(export_dir):
    recommender = recommend.ExportedRecommender(export_dir)
    user = str(recommender.user_ids[0])
    recommender.variables = jax.tree.map(lambda leaf: leaf * np.nan, recommender.variables)
    with pytest.raises(ValueError, match=f"scores of user '{user}' hold NaN"):
        recommender.recommend(user)


def test_import_mmrec_jax_stays_cheap():
    code = "import sys, mmrec_jax; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_says_what_the_commands_write(capsys):
    from mmrec_jax import evaluate

    for main, written in [
        (export.main, "renames it into place when complete"),
        (evaluate.main, "WORKDIR/eval/<split>.json"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        assert written in " ".join(capsys.readouterr().out.split())
