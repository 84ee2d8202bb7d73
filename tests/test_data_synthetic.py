"""mmrec_synthetic: layout, determinism, oracle, vocabularies, histories, learnable renderings."""

import io

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from mmrec_jax.data import builder, synthetic

SIZES = dict(num_users=40, num_items=60)


def _all_records(data_dir, config=None):
    name = synthetic.NAME if config is None else f"{synthetic.NAME}/{config}"
    return {
        split: [source[i] for i in range(len(source))]
        for split, source in tfds.data_source(name, data_dir=str(data_dir)).items()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("synthetic")
    synthetic.build(data_dir, **SIZES, seed=3, verbose=False)
    return data_dir


def test_opens_with_plain_tfds_and_has_the_splits(built):
    interactions = tfds.data_source(synthetic.NAME, data_dir=str(built))
    assert set(interactions) == {"train", "validation", "test", "test_cold"}
    items = tfds.data_source(f"{synthetic.NAME}/items", data_dir=str(built))
    users = tfds.data_source(f"{synthetic.NAME}/users", data_dir=str(built))
    assert len(items["items"]) == SIZES["num_items"]
    assert len(users["users"]) == SIZES["num_users"]
    meta = tfds.builder(synthetic.NAME, data_dir=str(built)).info.metadata
    assert meta["split_sizes"] == {s: len(interactions[s]) for s in builder.SPLITS}
    record = items["items"][0]
    if record["has_image"]:
        assert Image.open(io.BytesIO(record["image"])).size == (56, 56)
    if record["has_audio"]:
        wave, rate = soundfile.read(io.BytesIO(record["audio"]))
        assert rate == 8000 and wave.shape == (4000,)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    synthetic.build(tmp_path / "again", **SIZES, seed=3, verbose=False)
    synthetic.build(tmp_path / "other", **SIZES, seed=4, verbose=False)
    for config in (None, "items", "users"):
        first = _all_records(built, config)
        again = _all_records(tmp_path / "again", config)
        assert first.keys() == again.keys()
        for split in first:
            assert len(first[split]) == len(again[split])
            for a, b in zip(first[split], again[split], strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key])
    assert builder.read_metadata(built, synthetic.NAME) == builder.read_metadata(
        tmp_path / "again", synthetic.NAME
    )
    other = _all_records(tmp_path / "other")["train"]
    first = _all_records(built)["train"]
    assert [r["label"] for r in other] != [r["label"] for r in first]


def test_oracle_metrics_match_sklearn_and_are_printed(tmp_path, capsys):
    synthetic.main(["--output", str(tmp_path), "--num_users", "30", "--num_items", "40"])
    printed = capsys.readouterr().out
    meta = builder.read_metadata(tmp_path, synthetic.NAME)
    for split, records in _all_records(tmp_path).items():
        labels = np.array([r["label"] for r in records])
        probs = np.array([r["true_prob"] for r in records], np.float64)
        oracle = meta["oracle"][split]
        assert oracle["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
        assert oracle["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-5)
        assert f"{oracle['auc']:.4f}" in printed
    assert "oracle AUC" in printed


def test_vocabularies_splits_and_cold_items(built):
    records = _all_records(built)
    items = _all_records(built, "items")["items"]
    train_items = sorted({r["item_index"] for r in records["train"]})
    expected = {row: rank for rank, row in enumerate(train_items, start=1)}
    for row, item in enumerate(items):
        assert item["item_id"] == expected.get(row, 0)
    for r in records["test"] + records["validation"]:
        assert r["item_index"] in expected and r["item_id"] == expected[r["item_index"]]
    for r in records["test_cold"]:
        assert r["item_index"] not in expected and r["item_id"] == 0
    meta = builder.read_metadata(built, synthetic.NAME)
    assert meta["num_items"] == len(train_items)
    assert meta["num_users"] == len({r["user_index"] for r in records["train"]})
    # Every user's train interactions precede the evaluation ones.
    last_train = {}
    for r in records["train"]:
        last_train[r["user_index"]] = max(last_train.get(r["user_index"], 0), r["timestamp"])
    for split in ("validation", "test", "test_cold"):
        assert all(r["timestamp"] > last_train[r["user_index"]] for r in records[split])


def test_histories_are_the_latest_earlier_train_positives(built):
    records = _all_records(built)
    train = records["train"]
    users = _all_records(built, "users")["users"]
    hist_len = builder.DEFAULT_HISTORY_LEN
    for split, rows in records.items():
        for r in rows:
            earlier = [
                t
                for t in train
                if t["user_index"] == r["user_index"]
                and t["label"] == 1
                and t["timestamp"] < r["timestamp"]
            ]
            earlier.sort(key=lambda t: t["timestamp"], reverse=True)
            want = [t["item_index"] for t in earlier[:hist_len]]
            want += [-1] * (hist_len - len(want))
            np.testing.assert_array_equal(r["history"], want, err_msg=split)
    for row, user in enumerate(users):
        positives = sorted(
            (t for t in train if t["user_index"] == row and t["label"] == 1),
            key=lambda t: t["timestamp"],
            reverse=True,
        )
        want = [t["item_index"] for t in positives[:hist_len]]
        np.testing.assert_array_equal(user["history"][: len(want)], want)
        np.testing.assert_array_equal(
            user["train_positives"], sorted({t["item_index"] for t in positives})
        )
        engaged = {
            r["item_index"]
            for rows in records.values()
            for r in rows
            if r["user_index"] == row and r["label"] == 1
        }
        np.testing.assert_array_equal(user["engaged"], sorted(engaged))
        interacted = {
            r["item_index"] for rows in records.values() for r in rows if r["user_index"] == row
        }
        np.testing.assert_array_equal(user["interacted"], sorted(interacted))
        assert engaged <= interacted


def test_each_rendering_reveals_its_attribute():
    """A plain classifier reads each latent attribute off its rendering on held-out items."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, synthetic.NUM_VALUES, 240)
    train, test = slice(0, 160), slice(160, None)

    texts = [synthetic.render_text(int(v), rng) for v in values]
    words = CountVectorizer().fit(texts[train])
    text_clf = LogisticRegression(max_iter=2000).fit(words.transform(texts[train]), values[train])
    assert text_clf.score(words.transform(texts[test]), values[test]) >= 0.95

    def image_features(v):
        pixels = synthetic.render_image(int(v), rng).astype(np.float64) / 255
        # Mean colour of the clearly coloured pixels: independent of position and size.
        coloured = pixels[pixels.max(-1) - pixels.min(-1) > 0.3]
        return coloured.mean(0) if coloured.shape[0] else np.zeros(3)

    images = np.stack([image_features(v) for v in values])
    image_clf = LogisticRegression(max_iter=2000).fit(images[train], values[train])
    assert image_clf.score(images[test], values[test]) >= 0.95

    def audio_features(v):
        spectrum = np.abs(np.fft.rfft(synthetic.render_audio(int(v), rng)))
        return np.log1p(spectrum[:2000].reshape(80, 25).sum(1))  # 80 bands of 50 Hz

    sounds = np.stack([audio_features(v) for v in values])
    audio_clf = LogisticRegression(max_iter=4000).fit(sounds[train], values[train])
    assert audio_clf.score(sounds[test], values[test]) >= 0.95


def test_each_modality_explains_only_part_of_the_signal(built):
    """On cold items, knowing one modality (or only the user) ranks clearly worse than the oracle.

    The best score from one attribute is the user's mean true logit over train items with
    the same value of it; from the user alone, the user's mean true logit.
    """
    records = _all_records(built)
    items = _all_records(built, "items")["items"]
    cold = records["test_cold"]
    labels = np.array([r["label"] for r in cold])
    full = roc_auc_score(labels, [r["true_prob"] for r in cold])

    def logit(r):
        return np.log(r["true_prob"] / (1 - r["true_prob"]))

    def auc_of(key):
        groups = {}
        for r in records["train"]:
            groups.setdefault(key(r), []).append(logit(r))
        overall = np.mean([logit(r) for r in records["train"]])
        scores = [np.mean(groups.get(key(r), [overall])) for r in cold]
        return roc_auc_score(labels, scores)

    user_only = auc_of(lambda r: r["user_index"])
    assert user_only < full - 0.10
    for attribute in ("topic", "style", "sound"):
        single = auc_of(lambda r, a=attribute: (r["user_index"], items[r["item_index"]][a]))
        assert user_only < single < full - 0.05, attribute


def test_too_small_sizes_are_refused():
    with pytest.raises(ValueError, match="at least"):
        synthetic.generate(num_users=1, num_items=60)
