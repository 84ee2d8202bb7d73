"""The frozen-mode text embedding cache: correct values, reuse, rebuilds, corruption."""

from __future__ import annotations

import shutil
import sys

import ml_collections
import numpy as np
import pytest
import transformers
from _processes import launch_two_processes
from _tiny_bert import make_tiny_bert, torch_outputs

from mmrec_jax.config import ConfigError
from mmrec_jax.data import text_cache
from mmrec_jax.data.text_cache import item_text_fields, text_embeddings, tokenize_texts

TEXTS = [
    "a cat video",
    None,
    "the quick brown fox jumps over the lazy dog about a song of rain",
    "",
    "music",
    "a dog video at night",
    "song of the night",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert_cache")
    return folder, make_tiny_bert(folder, seed=5)


@pytest.fixture
def computations(monkeypatch):
    """Counts how often BERT actually runs over the texts."""
    calls = []
    compute = text_cache._compute_embeddings

    def counting(*args, **kwargs):
        calls.append(args)
        return compute(*args, **kwargs)

    monkeypatch.setattr(text_cache, "_compute_embeddings", counting)
    return calls


def _reference(model, folder, texts, max_len, pooling):
    """PyTorch BertModel + numpy pooling, text by text, without padding."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i, text in enumerate(texts):
        if not text:
            continue
        enc = tokenizer([text], truncation=True, max_length=max_len, return_tensors="np")
        hidden, pooled = torch_outputs(model, enc["input_ids"], enc["attention_mask"])
        out[i] = {"mean": hidden[0].mean(0), "cls": hidden[0, 0], "pooler": pooled[0]}[pooling]
    return out


def _cache_files(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if p.suffix in (".npy", ".json"))


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_cache_equals_direct_computation(tiny, tmp_path, pooling):
    folder, model = tiny
    got = text_embeddings(TEXTS, str(folder), pooling, max_len=8, cache_dir=tmp_path, batch_size=4)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(model, folder, TEXTS, 8, pooling), atol=1e-4)
    assert not got[1].any() and not got[3].any()


TWO_PROCESS_SCRIPT = """
import sys

import ml_collections
import numpy as np

from mmrec_jax import sharding

sharding.maybe_initialize_distributed()
import jax  # noqa: E402

from mmrec_jax.data.text_cache import text_embeddings  # noqa: E402

folder, cache, out, *texts = sys.argv[1:]
for call in ("first", "again"):
    print(f"{call} call", flush=True)
    array = text_embeddings(texts, folder, "mean", max_len=8, cache_dir=cache, batch_size=1)
    np.save(f"{out}/{call}_{jax.process_index()}.npy", array)
"""


def test_two_processes_share_the_work_and_both_get_every_embedding(tiny, tmp_path):
    folder, model = tiny
    script = tmp_path / "embed.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    texts = [text or "" for text in TEXTS]  # 5 with text, 1 a batch: process 0 runs 0, 2, 4
    command = [sys.executable, str(script), str(folder), str(tmp_path / "cache"), str(tmp_path)]
    outputs = launch_two_processes([*command, *texts])
    first, again = outputs[0].split("again call")
    assert "text embeddings: 100%" in first and "3/3" in first, first  # 3 of the 6 batches
    assert "text embeddings" not in again and "text embeddings" not in outputs[1]
    want = _reference(model, folder, TEXTS, 8, "mean")
    for name in ("first_0", "first_1", "again_0", "again_1"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), want, atol=1e-4)
    first_0, first_1 = (np.load(tmp_path / f"first_{p}.npy") for p in (0, 1))
    np.testing.assert_array_equal(first_0, first_1)


def test_rerun_reuses_and_changes_rebuild(tiny, tmp_path, computations):
    folder, _ = tiny
    args = dict(model_name=str(folder), pooling="mean", cache_dir=tmp_path, batch_size=4)
    first = text_embeddings(TEXTS, max_len=8, **args)
    files = _cache_files(tmp_path)
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = text_embeddings(TEXTS, max_len=8, **args)
    assert len(computations) == 1
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    np.testing.assert_array_equal(first, again)

    text_embeddings(TEXTS, max_len=6, **args)
    assert len(computations) == 2
    text_embeddings(TEXTS[:-1] + ["another song"], max_len=8, **args)
    assert len(computations) == 3
    text_embeddings(TEXTS, max_len=8, **{**args, "pooling": "cls"})
    assert len(computations) == 4
    text_embeddings(TEXTS, max_len=8, **args)  # the first cache is still there
    assert len(computations) == 4


def test_changed_weights_rebuild(tiny, tmp_path, computations):
    folder, _ = tiny
    other = tmp_path / "model"
    shutil.copytree(folder, other)
    args = dict(texts=TEXTS, model_name=str(other), pooling="mean", max_len=8)
    first = text_embeddings(**args, cache_dir=tmp_path / "cache")
    make_tiny_bert(other, seed=6)  # same names and shapes, other values
    second = text_embeddings(**args, cache_dir=tmp_path / "cache")
    assert len(computations) == 2
    assert not np.allclose(first, second)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_sidecar"])
def test_corrupted_cache_is_rebuilt_with_a_warning(tiny, tmp_path, computations, damage):
    folder, _ = tiny
    args = dict(texts=TEXTS, model_name=str(folder), pooling="mean", max_len=8)
    first = text_embeddings(**args, cache_dir=tmp_path)
    array_file = next(p for p in _cache_files(tmp_path) if p.suffix == ".npy")
    data = array_file.read_bytes()
    if damage == "truncate":
        array_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        array_file.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        array_file.with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = text_embeddings(**args, cache_dir=tmp_path)
    assert len(computations) == 2
    np.testing.assert_array_equal(rebuilt, first)
    assert array_file.read_bytes() == data  # the rebuilt file is whole again
    text_embeddings(**args, cache_dir=tmp_path)
    assert len(computations) == 2


def test_pooler_pooling_needs_a_checkpoint_with_a_pooler(tmp_path, computations):
    make_tiny_bert(tmp_path / "bert", pooler=False)
    with pytest.raises(ConfigError, match="pooling='pooler' but the checkpoint has no pooler"):
        text_embeddings(TEXTS, str(tmp_path / "bert"), "pooler", max_len=8, cache_dir=tmp_path)
    assert computations == []  # refused before BERT ran


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on(tiny, tmp_path, computations):
    # A dataset folder the user cannot write (a shared, read-only copy): the embeddings
    # are computed and returned; the warning says nothing was cached and why.
    folder, _ = tiny
    args = dict(texts=TEXTS, model_name=str(folder), pooling="mean", max_len=8)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="Cannot write the text embedding cache .*a_file"):
        got = text_embeddings(**args, cache_dir=blocked / "text_cache")
    np.testing.assert_array_equal(got, text_embeddings(**args, cache_dir=tmp_path / "cache"))
    assert len(computations) == 2 and blocked.read_text() == "not a folder"


def test_tokenize_texts_pads_to_max_len(tiny):
    folder, _ = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids, mask = tokenize_texts(tokenizer, TEXTS, max_len=8)
    assert ids.shape == mask.shape == (len(TEXTS), 8)
    assert ids.dtype == mask.dtype == np.int32
    assert mask[2].all()  # truncated to max_len
    assert mask[1].sum() == 2  # None: [CLS] [SEP]
    want = tokenizer("a cat video")["input_ids"]
    assert ids[0, : len(want)].tolist() == want and not ids[0, len(want) :].any()


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_item_text_fields_are_what_training_read(tiny, mode):
    folder, model = tiny
    config = ml_collections.ConfigDict(
        {
            "model": {"text": {"model": str(folder), "mode": mode, "pooling": "mean"}},
            "data": {"max_text_len": 8},
        }
    )
    fields = item_text_fields(TEXTS, config, batch_size=4)
    np.testing.assert_array_equal(fields["has_text"], [bool(text) for text in TEXTS])
    if mode == "frozen":
        assert sorted(fields) == ["has_text", "text_embedding"]
        # Truncated to max_text_len tokens, as the cache the model trained on.
        reference = _reference(model, folder, TEXTS, 8, "mean")
        np.testing.assert_allclose(fields["text_embedding"], reference, atol=1e-4)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        ids, mask = tokenize_texts(tokenizer, TEXTS, max_len=8)
        np.testing.assert_array_equal(fields["text_ids"], ids)
        np.testing.assert_array_equal(fields["text_mask"], mask)


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_a_tokenizer_with_ids_past_the_vocabulary_is_named(tiny, tmp_path, mode):
    # Two words added to the tokenizer (vocab.txt) but not to the BERT's embeddings: under
    # jit their ids would read NaN embeddings.
    folder, _ = tiny
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    words = (folder / "vocab.txt").read_text().split()
    vocab_size = transformers.BertConfig.from_pretrained(str(folder)).vocab_size
    extra = vocab_size - len(words) + 1  # the second added word's id is past the vocabulary
    (grown / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(extra)]) + "\n")
    config = ml_collections.ConfigDict(
        {
            "model": {"text": {"model": str(grown), "mode": mode, "pooling": "mean"}},
            "data": {"max_text_len": 8},
        }
    )
    known = ["a cat video", f"w{extra - 2} song"]  # every id inside the vocabulary
    assert item_text_fields(known, config, batch_size=4)["has_text"].all()
    texts = [*known, None, f"a dog w{extra - 1}"]
    with pytest.raises(ConfigError) as error:
        item_text_fields(texts, config, batch_size=4)
    message = str(error.value)
    assert f"The tokenizer in {grown} gives token id {vocab_size} " in message
    assert f"(in the text 'a dog w{extra - 1}')" in message
    assert f"vocab_size={vocab_size}" in message and "tokenizer.save_pretrained" in message
