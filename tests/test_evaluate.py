"""`mmrec_jax.evaluate` on a tiny trained run: full-catalogue ranking, the CLI, ablation."""

import collections
import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow_datasets as tfds
from _trained_run import GROUP, restored_checkpoint, trained_run

from mmrec_jax import evaluate, reporting, sharding, train
from mmrec_jax.config import load_config
from mmrec_jax.data import builder, pipeline

pytestmark = pytest.mark.xdist_group(GROUP)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    """(config, model, params, catalogue, encoded catalogue, mesh) of the best checkpoint."""
    config, model, params = restored_checkpoint(tmp_path_factory)
    mesh = sharding.make_mesh()
    catalogue = evaluate.open_catalogue(config)
    encoded = evaluate.encode_catalogue(
        model, params, catalogue.item_block, catalogue.num_items, mesh, items_per_call=16
    )
    return config, model, params, catalogue, encoded, mesh


def _records(config, table: str, split: str) -> list[dict]:
    source = builder.open_source(config.data.data_dir, config.data.name, table, split)
    return source.__getitems__(list(range(len(source))))


def test_catalogue_scores_equal_the_full_model_per_user(restored):
    """The (users x items) grid from encoded items equals `model.apply` on whole batches."""
    config, model, params, catalogue, encoded, mesh = restored
    users = np.array([0, 3, 5, 11, 17])
    scores = evaluate.catalogue_scores(
        model, params, encoded, catalogue.users, users, mesh, rows_per_call=64
    )
    n = catalogue.num_items
    items = catalogue.item_store.block(np.arange(n), n)
    history, mask = catalogue.item_store.users.latest_history(config.data.history_len)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))
    for row, user in enumerate(users):
        batch = {
            "user_id": np.full(n, catalogue.users.user_id[user], np.int32),
            "user_index": np.full(n, user, np.int32),
            "item_slot": np.arange(n, dtype=np.int32),
            "history_slot": np.repeat(history[user][None], n, axis=0),
            "history_mask": np.repeat(mask[user][None], n, axis=0),
            "label": np.zeros(n, np.float32),
            "weight": np.ones(n, np.float32),
            "items": items,
        }
        np.testing.assert_allclose(scores[row], apply(params, batch), rtol=1e-5, atol=1e-5)


def test_split_rows_scored_from_the_catalogue_equal_their_own_item_block(restored):
    """A pipeline batch scored by `model.apply` on its own item block (as training does)
    gives the logits of its rows looked up in the encoded catalogue."""
    config, model, params, catalogue, encoded, mesh = restored
    batches = pipeline.make_batches(config, "test", train=False, item_store=catalogue.item_store)
    batch = next(iter(batches))
    batches.close()
    # Some history slots left out, one pointing at a padding slot (item_index -1).
    batch["history_mask"][::2, -1] = False
    padding = np.flatnonzero(batch["items"]["item_index"] < 0)
    batch["history_slot"][::2, -1] = padding[0] if padding.size else 0
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))
    split_fn = evaluate.make_split_fn(model)
    on_mesh = jax.tree.map(jax.numpy.asarray, encoded)
    rows = evaluate.catalogue_rows(batch)
    scored = split_fn(params, rows, on_mesh)
    np.testing.assert_allclose(scored["logit"], apply(params, batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        scored["item_index"], batch["items"]["item_index"][batch["item_slot"]]
    )
    # Process 1 of two: its slots are offset by its block's capacity.
    capacity = batch["items"]["item_index"].shape[0]
    shifted = dict(batch, item_slot=batch["item_slot"] + capacity)
    shifted["history_slot"] = batch["history_slot"] + capacity
    again = evaluate.catalogue_rows(shifted, process_index=1)
    for key in ("item_slot", "history_slot"):
        np.testing.assert_array_equal(again[key], rows[key])


def test_the_training_loops_scorer_gives_the_same_rows_either_way(restored, monkeypatch):
    config, model, params, catalogue, _, mesh = restored
    store = catalogue.item_store
    loader = functools.partial(pipeline.make_batches, config, item_store=store)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    scorer = train.SplitScorer(model, mesh, shardings, loader, store, config, catalogue.info)
    rows = scorer.num_rows("test")
    slots = 1 + config.data.history_len  # the run has the history tower
    assert rows * slots >= store.num_item_rows  # encoding the catalogue costs less
    encoded = scorer.catalogue(params, rows)
    assert encoded["mask"].shape[0] == store.num_item_rows
    from_catalogue = scorer.rows(params, "test", catalogue=encoded)
    batch_by_batch = scorer.rows(params, "test")
    np.testing.assert_allclose(
        from_catalogue["logit"], batch_by_batch["logit"], rtol=1e-5, atol=1e-5
    )
    for key in ("label", "weight", "user_index"):
        np.testing.assert_array_equal(from_catalogue[key], batch_by_batch[key])
    # Fewer rows' items than the catalogue holds, or an encoding over the memory bound:
    # each batch encodes its own item block.
    assert scorer.catalogue(params, store.num_item_rows // slots - 1) is None
    monkeypatch.setattr(train, "_MAX_ENCODED_CATALOGUE_BYTES", 1000)
    assert scorer.catalogue(params, rows) is None


def _brute_force_ranking(scores, relevant, exclude, ks):
    """Per-user loops over a full sort: the textbook definitions, nothing vectorised."""
    per_user = {f"{m}@{k}": [] for k in ks for m in ("hr", "recall", "ndcg", "mrr", "map")}
    for user in range(scores.shape[0]):
        rel = {i for i in relevant[user] if i not in exclude[user]}
        if not rel:
            continue
        candidates = [i for i in range(scores.shape[1]) if i not in exclude[user]]
        ranked = sorted(candidates, key=lambda i: (-scores[user, i], i))
        for k in ks:
            hits = [1.0 if i in rel else 0.0 for i in ranked[:k]]
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(rel), k)))
            first = next((r for r, h in enumerate(hits) if h), None)
            precisions = [sum(hits[: r + 1]) / (r + 1) for r in range(len(hits))]
            per_user[f"hr@{k}"].append(float(any(hits)))
            per_user[f"recall@{k}"].append(sum(hits) / len(rel))
            per_user[f"ndcg@{k}"].append(dcg / idcg)
            per_user[f"mrr@{k}"].append(0.0 if first is None else 1 / (first + 1))
            per_user[f"map@{k}"].append(
                sum(p * h for p, h in zip(precisions, hits, strict=True)) / min(len(rel), k)
            )
    return {name: float(np.mean(values)) for name, values in per_user.items()}, len(
        per_user[f"hr@{ks[0]}"]
    )


def _positives_of_users(config, split: str, num_users: int) -> tuple[list[set], list[set]]:
    """Each user's positives in `split` and in train (the relevant and the excluded items),
    read straight from the records."""
    positives = {}
    for name in (split, "train"):
        positives[name] = [set() for _ in range(num_users)]
        for r in _records(config, builder.INTERACTIONS, name):
            if r["label"] > 0.5:
                positives[name][int(r["user_index"])].add(int(r["item_index"]))
    return positives[split], positives["train"]


@pytest.mark.parametrize("split", ["test", "test_cold"])
def test_full_catalogue_ranking_equals_brute_force(restored, split):
    config, model, params, catalogue, encoded, mesh = restored
    num_users = catalogue.users.user_id.shape[0]
    relevant, exclude = _positives_of_users(config, split, num_users)
    scores = evaluate.catalogue_scores(
        model, params, encoded, catalogue.users, np.arange(num_users), mesh
    )
    ks = (1, 5, 10)
    expected, counted = _brute_force_ranking(scores, relevant, exclude, ks)
    pairs = [(u, i) for u in range(num_users) for i in relevant[u]]
    csr = evaluate.csr_from_pairs(*np.array(pairs).T, num_users)
    # Few users per call: several calls, the last one padded.
    result = evaluate.rank_catalogue(
        model, params, encoded, catalogue.users, csr, ks, mesh, rows_per_call=300
    )
    assert result.pop("users") == counted
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name


def test_ranking_a_sample_of_users_equals_brute_force_on_those_users(workdir, restored, capsys):
    config, model, params, catalogue, encoded, mesh = restored
    num_users = catalogue.users.user_id.shape[0]
    relevant, exclude = _positives_of_users(config, "test", num_users)
    rankable = [u for u in range(num_users) if relevant[u] - exclude[u]]
    ks = (1, 5)
    results = evaluate.evaluate_run(workdir, ["test"], ks=ks, write=False, ranking_users=3)
    result = results["test"]
    sample = result["ranking_sample"]
    user_ids = catalogue.user_ids.tolist()
    drawn = [user_ids.index(u) for u in sample["user_ids"]]
    assert sample["of"] == len(rankable) > 3 and result["ranked_users"] == 3
    assert drawn == sorted(set(drawn)) and set(drawn) <= set(rankable)
    scores = evaluate.catalogue_scores(model, params, encoded, catalogue.users, drawn, mesh)
    expected, counted = _brute_force_ranking(
        scores, [relevant[u] for u in drawn], [exclude[u] for u in drawn], ks
    )
    assert counted == 3
    for name, value in expected.items():
        assert result["ranking"][name] == pytest.approx(value, abs=1e-6), name
    # The popularity baseline ranks the same users.
    pairs = [(u, i) for u in drawn for i in relevant[u]]
    csr = evaluate.csr_from_pairs(*np.array(pairs).T, num_users)
    popular = evaluate.popularity_ranking(catalogue.users, csr, ks, catalogue.num_items)
    assert result["popularity"] == pytest.approx(popular, abs=1e-12)
    # The click metrics still score every row.
    summary = json.loads((workdir / "summary.json").read_text())["splits"]["test"]["model"]
    assert result["click"]["auc"] == pytest.approx(summary["auc"], abs=1e-6)
    note = f"ranked users of test: a random sample of 3 of its {len(rankable)} users"
    assert note in evaluate.format_results(results)
    # As many users as there are to rank: every one, and no sample recorded.
    pairs = [(u, i) for u in range(num_users) for i in relevant[u]]
    rows = dict(zip(("user_index", "item_index"), np.array(pairs).T, strict=True))
    positive = np.ones(len(pairs), bool)
    kept, sample = evaluate.ranking_sample(rows, positive, catalogue, len(rankable), seed=0)
    assert sample is None and kept is positive
    kept, sample = evaluate.ranking_sample(rows, positive, catalogue, len(rankable) - 1, 0)
    assert sample["of"] == len(rankable) and len(sample["user_ids"]) == len(rankable) - 1
    assert len(set(rows["user_index"][kept])) == len(rankable) - 1
    one_row = {"user_index": np.array([drawn[0]]), "item_index": np.array([0])}
    for count in (0, -1):  # from Python, as from the command line
        with pytest.raises(ValueError, match=f"--ranking_users {count} must be at least 1"):
            evaluate.ranking_sample(one_row, np.array([True]), catalogue, count, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(workdir), "--ranking_users", "0"])
    assert exit_info.value.code == 2
    assert "--ranking_users 0 must be at least 1" in capsys.readouterr().err


def test_popularity_ranking_equals_brute_force():
    # 37 users, 30 items, popularity with ties; chunks of 8 users, the last one short.
    rng = np.random.default_rng(3)
    num_users, num_items, ks = 37, 30, (1, 5, 10)
    liked = rng.random((num_users, num_items)) < rng.uniform(0.0, 0.4, num_items)
    held_out = rng.random((num_users, num_items)) < 0.1
    held_out[:, 0] = True  # item 0: relevant to everyone, excluded for those who liked it
    liked[-1] = True  # a user who liked every item: no relevant item left to rank
    liked[-2] = True
    liked[-2, [0, 5, 6, 7]] = False  # four items left to rank, fewer than K: the rest excluded
    users = evaluate.UserTable(
        user_id=np.arange(1, num_users + 1, dtype=np.int32),
        history=np.zeros((num_users, 1), np.int32),
        history_mask=np.zeros((num_users, 1), bool),
        train_positives=evaluate.csr_from_pairs(*np.nonzero(liked), num_users),
        interacted=evaluate.csr_from_pairs(*np.nonzero(liked | held_out), num_users),
    )
    relevant = evaluate.csr_from_pairs(*np.nonzero(held_out), num_users)
    result = evaluate.popularity_ranking(users, relevant, ks, num_items, users_per_chunk=8)
    # Every user's scores: how many users liked each item in training.
    scores = np.broadcast_to(liked.sum(axis=0), (num_users, num_items))
    expected, counted = _brute_force_ranking(
        scores,
        [set(np.flatnonzero(row)) for row in held_out],
        [set(np.flatnonzero(row)) for row in liked],
        ks,
    )
    assert counted == num_users - 1 and result.keys() == expected.keys()  # all but the last
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name
    with pytest.raises(ValueError, match="no positive to rank"):
        evaluate.popularity_ranking(
            users, evaluate.csr_from_pairs([], [], num_users), ks, num_items
        )


def test_ranking_nan_scores_is_an_error(restored):
    config, model, params, catalogue, encoded, mesh = restored
    broken = jax.tree.map(lambda leaf: leaf * np.nan, params)
    csr = evaluate.csr_from_pairs(np.array([0, 1]), np.array([0, 1]), catalogue.user_ids.shape[0])
    with pytest.raises(ValueError, match=r"scores hold NaN for \d+ of the \d+ users"):
        evaluate.rank_catalogue(model, broken, encoded, catalogue.users, csr, (1,), mesh)


def test_programs_compile_once_per_model_and_shape(restored):
    """Encoding and ranking again with the same model reuse the compiled programs."""
    config, model, params, catalogue, encoded, mesh = restored
    programs = evaluate.programs_of(model)
    assert evaluate.programs_of(model) is programs
    compiled = programs.encode._cache_size()
    again = evaluate.encode_catalogue(
        model, params, catalogue.item_block, catalogue.num_items, mesh, items_per_call=16
    )
    assert programs.encode._cache_size() == compiled > 0
    for key, value in encoded.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    users = np.arange(6)
    first = evaluate.catalogue_scores(model, params, encoded, catalogue.users, users, mesh)
    compiled = programs.grid._cache_size()
    second = evaluate.catalogue_scores(model, params, again, catalogue.users, users, mesh)
    assert programs.grid._cache_size() == compiled
    np.testing.assert_array_equal(first, second)
    # Another model object (equal fields) gets its own programs.
    other = type(model)(model.config, model.bert_config)
    assert evaluate.programs_of(other) is not programs


def test_evaluate_prints_every_metric_beside_the_oracle_and_the_ablation(workdir, capsys):
    assert evaluate.main(["--workdir", str(workdir), "--k", "5,10", "--ablate"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith(" (best):")
    # Progress bars for the long phases, on stderr.
    for label in ("encoding items", "ranking test", "ranking test_cold"):
        assert label in err, label
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    columns = ["test", "test oracle", "test popular"]
    columns += [c.replace("test", "test_cold") for c in columns]
    assert header.split() == ["metric"] + " ".join(columns).split()
    metrics = ["auc", "gauc", "logloss", "accuracy", "ece"] + [
        f"{m}@{k}" for k in (5, 10) for m in ("hr", "recall", "ndcg", "mrr", "map")
    ]
    lines = {
        line.split()[0]: dict(zip(columns, line.split()[1:], strict=True))
        for line in out.splitlines()
        if line.split() and line.split()[0] in metrics
    }
    for name in metrics:  # a value for test and for test_cold
        assert np.isfinite([float(lines[name][c]) for c in ("test", "test_cold")]).all(), name
    for name in ("auc", "logloss"):  # and the oracle's beside them
        cells = [lines[name][c] for c in ("test oracle", "test_cold oracle")]
        assert np.isfinite([float(cell) for cell in cells]).all(), name
    assert "Modality ablation on test " in out and "Modality ablation on test_cold " in out
    gauc_users_row = next(
        dict(zip(columns, line.split()[1:], strict=True))
        for line in out.splitlines()
        if line.startswith("gauc_users ")
    )
    run = load_config(str(workdir / "config.json"))
    # Click metrics equal those of the training loop's own evaluation of the same checkpoint.
    summary = json.loads((workdir / "summary.json").read_text())["splits"]
    for split in ("test", "test_cold"):
        result = json.loads((workdir / "eval" / f"{split}.json").read_text())
        assert result["split"] == split and result["k"] == [5, 10]
        assert set(result["ranking"]) == set(result["popularity"]) == set(metrics[5:])
        # The ranking metrics of recommending the most popular items beside the model's;
        # no popularity baseline for click metrics.
        for name in metrics:
            want = result["popularity"].get(name)
            assert lines[name][f"{split} popular"] == reporting.format_cell(want), (split, name)
        for name in ("auc", "logloss"):
            assert result["oracle"][name] == summary[split]["oracle"][name], (split, name)
        for name, value in summary[split]["model"].items():
            assert result["click"][name] == pytest.approx(value, abs=1e-6), (split, name)
        # The calibration curve covers every row and gives back the ECE.
        curve = result["calibration"]
        assert sum(curve["count"]) == result["rows"]["examples"]
        gaps = [
            n * abs(rate - prob)
            for n, rate, prob in zip(
                curve["count"], curve["positive_rate"], curve["mean_prob"], strict=True
            )
            if n
        ]
        ece = sum(gaps) / result["rows"]["examples"]
        assert ece == pytest.approx(result["click"]["ece"], abs=1e-9)
        # GAUC averages the users with both a positive and a negative row of the split,
        # counted here from the split's records (plain TFDS), and the table says how many.
        source = tfds.data_source(run.data.name, data_dir=str(run.data.data_dir))[split]
        labels_of_user = collections.defaultdict(set)
        for record in source.__getitems__(list(range(len(source)))):
            labels_of_user[int(record["user_index"])].add(int(record["label"]))
        both = sum(len(labels) == 2 for labels in labels_of_user.values())
        assert 0 < both == result["rows"]["gauc_users"]
        assert gauc_users_row[split] == str(both)
        assert set(result["ablation"]) == {"text"}  # the run's only content modality
        ablated = result["ablation"]["text"]
        assert ablated["auc_drop"] == pytest.approx(result["click"]["auc"] - ablated["auc"])
        assert ablated["logloss"] != result["click"]["logloss"]  # the text was really removed
    image = plt.imread(workdir / "eval" / "calibration.png")  # a whole, readable PNG
    assert image.shape[:2] == (600, 600) and image.std() > 0
    assert f"{workdir / 'eval' / 'calibration.png'}" in out


def test_mark_absent_clears_only_the_flag_and_copies():
    items = {"has_text": np.ones(3, bool), "image": np.ones(3)}
    absent = evaluate.mark_absent(items, ["text"])
    assert not absent["has_text"].any() and items["has_text"].all()
    np.testing.assert_array_equal(absent["image"], items["image"])
    with pytest.raises(ValueError, match="no 'has_audio'"):
        evaluate.mark_absent(items, ["audio"])


def test_batch_size_changes_memory_not_metrics(workdir, capsys, monkeypatch):
    real_score_split, batch_sizes = evaluate.score_split, []

    def score_split(split_fn, params, config, *args):
        batch_sizes.append(config.train.batch_size)
        return real_score_split(split_fn, params, config, *args)

    monkeypatch.setattr(evaluate, "score_split", score_split)
    small = evaluate.evaluate_run(workdir, ["test"], ks=(5,), batch_size=8)["test"]
    assert batch_sizes == [8] and train.load_run_config(workdir).train.batch_size == 32
    # The training loop's final report scored the same checkpoint in batches of 32.
    trained_with_32 = json.loads((workdir / "summary.json").read_text())["splits"]["test"]
    for name, value in trained_with_32["model"].items():
        assert small["click"][name] == pytest.approx(value, abs=1e-6), name
    with pytest.raises(
        ValueError,
        match=r"--batch_size 12 must be a positive multiple of the number of devices \(8\)",
    ):
        evaluate.evaluate_run(workdir, ["test"], batch_size=12)
    # On 3 devices the run's 32 rows do not split: the next multiple, 33, is scored.
    three = evaluate.evaluate_run(workdir, ["test"], ks=(5,), devices=jax.devices()[:3])
    assert batch_sizes[-1] == 33
    for name, value in trained_with_32["model"].items():
        assert three["test"]["click"][name] == pytest.approx(value, abs=1e-6), name

    # Running out of memory names the batch size and a smaller one.
    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")

    monkeypatch.setattr(evaluate, "score_split", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(workdir), "--split", "test"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "out of memory evaluating, with batches of 32 rows" in err
    assert "allocating 9 bytes" in err and "--batch_size 16" in err


def test_bad_split_and_k_are_clear_errors(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(workdir), "--split", "tset"])
    assert exit_info.value.code == 2
    assert "--split 'tset'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", str(workdir), "--split", "test", "--k", "10,500"])
    assert "catalogue size" in capsys.readouterr().err


def test_results_are_printed_even_where_they_cannot_be_written(workdir, capsys, monkeypatch):
    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "write_atomic", read_only)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(workdir), "--split", "test", "--k", "5"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "auc" in captured.out and "hr@5" in captured.out  # the table came first
    assert "the results above could not be written" in captured.err
    assert "Permission denied" in captured.err


def test_a_run_never_validated_is_evaluated_at_its_latest_checkpoint_and_says_so(
    workdir, capsys, monkeypatch
):
    from mmrec_jax import checkpoint

    monkeypatch.setattr(checkpoint.Checkpointer, "best_step", lambda self: None)
    assert evaluate.main(["--workdir", str(workdir), "--split", "test", "--k", "5"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(" (latest: the run was never validated, so it has no best):"), first
    saved = json.loads((workdir / "eval" / "test.json").read_text())
    assert saved["checkpoint"].startswith("latest")


def test_resolve_splits(workdir, capsys):
    info = pipeline.load_dataset_info(train.load_run_config(workdir).data)
    assert evaluate.resolve_splits(None, info) == ["test", "test_cold"]
    assert evaluate.resolve_splits(["all"], info) == ["train", "validation", "test", "test_cold"]
    assert evaluate.resolve_splits(["test_cold", "test,test_cold"], info) == ["test_cold", "test"]
    assert not capsys.readouterr().out
    # A default split the dataset lacks is named, not skipped silently.
    warm_only = dataclasses.replace(info, split_sizes={**info.split_sizes, "test_cold": 0})
    assert evaluate.resolve_splits(None, warm_only) == ["test"]
    assert "has no test_cold rows; it is not evaluated" in capsys.readouterr().out


def test_a_run_whose_data_moved_evaluates_with_data_dir(workdir, tmp_path, capsys):
    config = train.load_run_config(workdir)
    assert Path(config.data.data_dir).is_absolute()  # recorded so at training time
    moved = tmp_path / "run"
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("eval"))
    stored = json.loads((moved / "config.json").read_text())
    stored["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(moved), "--split", "test"])
    assert exit_info.value.code == 2
    assert "pass --data_dir" in capsys.readouterr().err
    own_folder = str(Path(config.data.data_dir) / config.data.name)  # one level too deep
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(moved), "--split", "test", "--data_dir", own_folder])
    assert exit_info.value.code == 2
    assert f"holds it, --data_dir {config.data.data_dir}." in capsys.readouterr().err
    results = evaluate.evaluate_run(moved, ["test"], data_dir=config.data.data_dir)
    reference = json.loads((workdir / "summary.json").read_text())["splits"]["test"]["model"]
    assert results["test"]["click"]["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    from mmrec_jax import export, exported

    out = export.export_run(moved, tmp_path / "export", data_dir=config.data.data_dir)
    assert (out / exported.MANIFEST_FILE).is_file()
    # Another dataset under the run's name is refused, not scored.
    other = train.load_run_config(workdir, tmp_path / "other")
    other.data.synthetic.num_items += 8
    pipeline.ensure_dataset(other.data)
    with pytest.raises(pipeline.DatasetMismatchError, match="num_item_rows 40 then, 48 now"):
        evaluate.evaluate_run(moved, ["test"], data_dir=other.data.data_dir)
    with pytest.raises(pipeline.DatasetMismatchError, match="is not the one step"):
        export.export_run(moved, tmp_path / "export2", data_dir=other.data.data_dir)


def test_calibration_plot_keeps_earlier_splits_of_the_same_checkpoint(tmp_path):
    def curve(rate):
        return {"bin_edges": [0.0, 1.0], "count": [2], "mean_prob": [0.5], "positive_rate": [rate]}

    written = {
        "test": {"checkpoint_step": 30, "calibration": curve(0.4)},  # an earlier call
        "validation": {"checkpoint_step": 30, "calibration": curve(0.6)},  # this call
        "train": {"checkpoint_step": 20, "calibration": curve(0.1)},  # another checkpoint
    }
    for split, entry in written.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(entry))
    (tmp_path / "test_cold.json").write_text('{"checkpoint_step": 30, "calib')  # cut off

    curves = evaluate.calibration_curves(tmp_path, 30)
    assert list(curves) == ["validation", "test"]
    assert curves["test"]["positive_rate"] == [0.4]
    assert list(evaluate.calibration_curves(tmp_path, 20)) == ["train"]


def test_results_table_marks_each_cell_without_a_value():
    entry = {
        "click": {"auc": 0.75},
        "ranking": {"recall@10": 0.5},
        "rows": {"examples": 8},
        "oracle": {"auc": 0.9},
        "ranked_users": 3,
    }
    lines = evaluate.format_results({"test": entry}).splitlines()
    row = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines}
    assert row["auc"] == ["0.7500", "0.9000"]
    assert row["recall@10"] == ["0.5000", "-"]  # the oracle ranks no catalogue
    assert row["ranked users"] == ["3", "-"]
    assert not any(line.startswith("gauc -") for line in lines)
    # A GAUC left undefined (each user has one row of the split) is explained.
    one_row_each = dict(entry, click={"auc": 0.7, "gauc": None})
    lines = evaluate.format_results({"test": one_row_each, "train": entry}).splitlines()
    assert lines[-1].startswith("gauc -: no user of test has both a positive and a negative")
    # A GAUC of a few users is said to be noise, as in the training summary.
    few = dict(entry, click={"auc": 0.7, "gauc": 0.5}, rows={"examples": 8, "gauc_users": 2})
    lines = evaluate.format_results({"test_cold": few, "test": entry}).splitlines()
    assert (
        lines[-1]
        == reporting.few_gauc_users_note({"test_cold": {"model": few["click"], "gauc_users": 2}})[0]
    )
    assert "test_cold 2; read it as noise" in lines[-1]


def test_ablating_a_model_without_content_modalities_says_so():
    """--ablate on an ID/history-only model prints one note instead of nothing."""

    def model(towers):
        return type("Model", (), {"config": type("Config", (), {"towers": towers})})()

    assert evaluate.content_modalities(model("id,history")) == ()
    assert evaluate.content_modalities(model("audio,id,text")) == ("text", "audio")
    entry = {"click": {"auc": 0.75}, "ranking": None, "ablation": {}}
    lines = evaluate.format_results({"test": entry, "test_cold": entry}).splitlines()
    notes = [line for line in lines if "content modality" in line]
    assert notes == [
        "Note: the run's model has no content modality (text, image, audio) to ablate."
    ]
    assert not any(line.startswith("Modality ablation") for line in lines)
    # Without --ablate, no note; with a content modality, its table and no note.
    del entry["ablation"]
    assert "content modality" not in evaluate.format_results({"test": entry})
    ablated = dict(entry, ablation={"text": {"auc": 0.7, "auc_drop": 0.05, "logloss": 0.6}})
    out = evaluate.format_results({"test": ablated})
    assert "Modality ablation on test " in out and "content modality" not in out
