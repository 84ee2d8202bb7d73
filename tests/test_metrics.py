"""Metrics against independent references: scikit-learn, or brute-force Python loops.

Inputs are random with ties on purpose (scores rounded to one decimal), and include users
with a single class, users without relevant items, and excluded items that are relevant.
"""

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, log_loss, ndcg_score, roc_auc_score

from mmrec_jax import metrics

SEEDS = range(5)


def _click_data(seed, n=400, num_users=40):
    """Labels, tied scores, and users: some with one impression, some with one class."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, n)
    labels = rng.random(n) < 0.35
    labels[users == 0] = True  # a user with positives only
    labels[users == 1] = False  # a user with negatives only
    users[-1] = num_users + 7  # a user with a single impression
    scores = np.round(rng.normal(size=n) + labels * 0.7, 1)  # many ties
    return rng, users, labels, scores


# ------------------------------------------------------------------------------------ AUC


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_sklearn_with_ties_and_weights(seed):
    rng, _, labels, scores = _click_data(seed)
    weights = rng.integers(0, 4, labels.shape[0]).astype(float)  # zeros among them
    weights[:50] = rng.random(50)  # and fractional weights
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert metrics.auc(labels, scores, weights) == pytest.approx(
        roc_auc_score(labels, scores, sample_weight=weights), abs=1e-6
    )
    kept = weights > 0
    assert metrics.auc(labels, scores, weights) == pytest.approx(
        roc_auc_score(labels[kept], scores[kept], sample_weight=weights[kept]), abs=1e-6
    )


def test_auc_accepts_integer_labels_and_lists():
    labels = [0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.4, 0.4, 0.9]
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_with_one_class_is_an_error():
    with pytest.raises(ValueError, match="only positives"):
        metrics.auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only negatives"):
        metrics.auc([0, 0], [0.1, 0.2])
    # The only negative has weight 0: the rows that count hold one class.
    with pytest.raises(ValueError, match="only positives"):
        metrics.auc([1, 0, 1], [0.1, 0.2, 0.3], weights=[1.0, 0.0, 2.0])


# ----------------------------------------------------------------------------------- GAUC


def _gauc_reference(users, labels, scores):
    total = weight = 0.0
    for user in np.unique(users):
        rows = users == user
        if labels[rows].all() or not labels[rows].any():
            continue
        total += rows.sum() * roc_auc_score(labels[rows], scores[rows])
        weight += rows.sum()
    return total / weight


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_matches_per_user_loop(seed):
    _, users, labels, scores = _click_data(seed)
    assert metrics.gauc(users, labels, scores) == pytest.approx(
        _gauc_reference(users, labels, scores), abs=1e-6
    )


def test_gauc_with_string_user_ids():
    rng, users, labels, scores = _click_data(0)
    names = np.array([f"user-{u}" for u in users])
    assert metrics.gauc(names, labels, scores) == pytest.approx(
        _gauc_reference(users, labels, scores), abs=1e-6
    )


def test_gauc_without_a_user_with_both_classes_is_an_error():
    with pytest.raises(ValueError, match="no user has both"):
        metrics.gauc([0, 0, 1, 1], [1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert metrics.gauc_users([0, 0, 1, 1], [1, 1, 0, 0]) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_users_counts_the_users_gauc_averages(seed):
    _, users, labels, _ = _click_data(seed)
    both = {u for u in users.tolist() if len(set(labels[users == u].tolist())) == 2}
    assert 0 < len(both) < np.unique(users).size  # users of one class are left out
    assert metrics.gauc_users(users, labels) == len(both)
    names = np.array([f"user-{u}" for u in users])
    assert metrics.gauc_users(names, labels.astype(float)) == len(both)
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.gauc_users(users, labels * 2)


# ------------------------------------------------------------- logloss, accuracy, ECE


@pytest.mark.parametrize("seed", SEEDS)
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.4
    probs = np.round(rng.uniform(0.1, 0.9, 300), 1)  # tied, none clipped
    assert metrics.logloss(labels, probs) == pytest.approx(log_loss(labels, probs), abs=1e-6)


def test_logloss_clips_certain_probabilities():
    labels = np.array([1, 0, 1, 0, 1])
    probs = np.array([0.0, 1.0, 1.0, 0.0, 0.3])
    eps = 1e-7
    clipped = [min(max(p, eps), 1 - eps) for p in probs]
    expected = -np.mean(
        [math.log(p) if y else math.log(1 - p) for y, p in zip(labels, clipped, strict=True)]
    )
    assert metrics.logloss(labels, probs, eps=eps) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.4
    probs = np.round(rng.random(300), 1)  # includes exactly 0.5 and 0.7
    for threshold in (0.5, 0.7):
        expected = accuracy_score(labels, [p >= threshold for p in probs])
        assert metrics.accuracy(labels, probs, threshold) == pytest.approx(expected, abs=1e-12)


def _ece_reference(labels, probs, num_bins):
    total = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        rows = [i for i, p in enumerate(probs) if low <= p < high or (b == num_bins - 1 and p == 1)]
        if rows:
            gap = abs(np.mean([labels[i] for i in rows]) - np.mean([probs[i] for i in rows]))
            total += len(rows) / len(probs) * gap
    return total


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_expected_calibration_error_matches_per_bin_loop(seed, num_bins):
    rng = np.random.default_rng(seed)
    probs = np.round(rng.random(300), 2)  # many on bin edges
    probs[:4] = [0.0, 1.0, 0.3, 0.2]
    labels = rng.random(300) < probs
    assert metrics.expected_calibration_error(labels, probs, num_bins) == pytest.approx(
        _ece_reference(labels, probs, num_bins), abs=1e-6
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_calibration_curve_matches_per_bin_loop_and_gives_the_ece(seed, num_bins):
    rng = np.random.default_rng(seed)
    probs = np.round(rng.random(300) ** 2, 2)  # many on bin edges, few high ones
    probs[:4] = [0.0, 1.0, 0.3, 0.2]
    labels = rng.random(300) < probs
    curve = metrics.calibration_curve(labels, probs, num_bins)
    assert curve["bin_edges"] == pytest.approx([b / num_bins for b in range(num_bins + 1)])
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        rows = [i for i, p in enumerate(probs) if low <= p < high or (b == num_bins - 1 and p == 1)]
        assert curve["count"][b] == len(rows)
        if rows:
            assert curve["mean_prob"][b] == pytest.approx(np.mean(probs[rows]), abs=1e-12)
            assert curve["positive_rate"][b] == pytest.approx(np.mean(labels[rows]), abs=1e-12)
        else:
            assert curve["mean_prob"][b] is None and curve["positive_rate"][b] is None
    gap = sum(
        n * abs(r - p)
        for n, r, p in zip(curve["count"], curve["positive_rate"], curve["mean_prob"], strict=True)
        if n
    )
    assert gap / len(probs) == pytest.approx(
        metrics.expected_calibration_error(labels, probs, num_bins), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_calibration_curve_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    probs = rng.random(500) ** 3  # continuous: no probability on a bin edge
    labels = rng.random(500) < probs
    curve = metrics.calibration_curve(labels, probs, 10)
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    assert np.allclose([r for r in curve["positive_rate"] if r is not None], prob_true)
    assert np.allclose([p for p in curve["mean_prob"] if p is not None], prob_pred)


# ---------------------------------------------------------------------------- all at once


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("seed", SEEDS)
def test_click_metrics_from_logits_match_references(seed):
    _, users, labels, scores = _click_data(seed)
    logits = 3 * scores  # tied, moderate
    probs = _sigmoid(logits)
    results = metrics.click_metrics(labels, logits, user_ids=users, num_bins=10)
    assert list(results) == ["auc", "gauc", "logloss", "accuracy", "ece"]
    assert results["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert results["gauc"] == pytest.approx(_gauc_reference(users, labels, logits), abs=1e-6)
    assert results["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-6)
    assert results["accuracy"] == pytest.approx(accuracy_score(labels, logits >= 0), abs=1e-12)
    assert results["ece"] == pytest.approx(_ece_reference(labels, probs, 10), abs=1e-6)


def test_click_metrics_from_probabilities_match_references():
    _, users, labels, scores = _click_data(1)
    probs = np.round(_sigmoid(scores), 2)
    results = metrics.click_metrics(labels, probs=probs)
    assert "gauc" not in results
    assert results["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
    assert results["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-6)
    assert results["accuracy"] == pytest.approx(accuracy_score(labels, probs >= 0.5), abs=1e-12)
    assert results["ece"] == pytest.approx(_ece_reference(labels, probs, 15), abs=1e-6)


def test_click_metrics_logloss_is_exact_for_saturated_logits():
    labels = np.array([1, 0, 1, 0, 1, 0])
    logits = np.array([-60.0, 45.0, 800.0, -800.0, 0.3, 2.0])
    # Cross-entropy of a logit x: max(x, 0) - x * y + log(1 + exp(-|x|)).
    expected = np.mean(
        [
            max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))
            for x, y in zip(logits, labels, strict=True)
        ]
    )
    results = metrics.click_metrics(labels, logits)
    assert results["logloss"] == pytest.approx(expected, rel=1e-9)
    assert results["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)


def test_click_metrics_needs_exactly_one_of_logits_and_probs():
    with pytest.raises(ValueError, match="exactly one of logits and probs"):
        metrics.click_metrics([0, 1], [0.1, 0.2], probs=[0.1, 0.2])
    with pytest.raises(ValueError, match="exactly one of logits and probs"):
        metrics.click_metrics([0, 1])


# -------------------------------------------------------------------------------- ranking


def _ranking_data(seed, levels=10, num_users=30, num_items=25):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((num_users, num_items)) * levels) / levels  # many ties
    relevant = rng.random((num_users, num_items)) < 0.15
    exclude = rng.random((num_users, num_items)) < 0.2  # overlaps relevant on purpose
    relevant[0] = False  # a user without relevant items
    relevant[1] = exclude[1] = False
    relevant[1, 3] = exclude[1, 3] = True  # a user whose only relevant item is excluded
    exclude[2, 1:] = True  # a user with a single item that can be recommended
    relevant[2, 0] = True
    return scores, relevant, exclude


def _ranking_reference(scores, relevant, exclude, k):
    """Per-user loops over a ranking sorted by (-score, item index), excluded items removed."""
    sums = {name: 0.0 for name in ("hr", "recall", "ndcg", "mrr", "map")}
    users = 0
    for user in range(scores.shape[0]):
        allowed = [j for j in range(scores.shape[1]) if not exclude[user, j]]
        wanted = {j for j in allowed if relevant[user, j]}
        if not wanted:
            continue
        users += 1
        ranking = sorted(allowed, key=lambda j, user=user: (-scores[user, j], j))[:k]
        hits = [j in wanted for j in ranking]
        sums["hr"] += float(any(hits))
        sums["recall"] += sum(hits) / len(wanted)
        dcg = sum(1 / math.log2(i + 2) for i, hit in enumerate(hits) if hit)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(wanted), k)))
        sums["ndcg"] += dcg / ideal
        sums["mrr"] += next((1 / (i + 1) for i, hit in enumerate(hits) if hit), 0.0)
        precisions = [sum(hits[: i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit]
        sums["map"] += sum(precisions) / min(len(wanted), k)
    return {f"{name}@{k}": total / users for name, total in sums.items()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [10, 2])
@pytest.mark.parametrize("ks", [(1, 3, 10), (5, 25)])  # 25: the whole catalogue
def test_ranking_metrics_match_per_user_loops_with_ties_and_exclusion(seed, levels, ks):
    scores, relevant, exclude = _ranking_data(seed, levels)
    results = metrics.ranking_metrics(scores, relevant, ks, exclude=exclude)
    expected = {}
    for k in ks:
        expected.update(_ranking_reference(scores, relevant, exclude, k))
    assert results.keys() == expected.keys()
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-6), name


def test_ranking_metrics_without_exclusion_and_with_an_int_k():
    scores, relevant, _ = _ranking_data(7)
    results = metrics.ranking_metrics(scores, relevant, 5)
    expected = _ranking_reference(scores, relevant, np.zeros_like(relevant), 5)
    assert results == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_ndcg_matches_sklearn_on_tie_free_scores(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((30, 25))  # continuous: no ties, where sklearn would average
    relevant = rng.random((30, 25)) < 0.2
    relevant[:, 0] = True  # every user has a relevant item, as sklearn averages over all
    exclude = (rng.random((30, 25)) < 0.2) & ~relevant
    # sklearn sees excluded items as irrelevant and scored below everything else.
    masked = np.where(exclude, -1.0 - rng.random((30, 25)), scores)
    for k in (1, 5, 10):
        ours = metrics.ranking_metrics(scores, relevant, k, exclude=exclude)[f"ndcg@{k}"]
        assert ours == pytest.approx(ndcg_score(relevant, masked, k=k), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [10, 2])
def test_top_k_items_on_device_breaks_ties_by_item_index(seed, levels):
    scores, relevant, exclude = _ranking_data(seed, levels)
    top_scores, top_items = metrics.top_k_items(scores, 10, exclude)
    for user in range(scores.shape[0]):
        ranking = sorted(range(scores.shape[1]), key=lambda j, u=user: (-scores[u, j], j))
        ranking = [j for j in ranking if not exclude[user, j]] + [
            j for j in range(scores.shape[1]) if exclude[user, j]
        ]
        assert np.asarray(top_items[user]).tolist() == ranking[:10], user
        expected = [-np.inf if exclude[user, j] else scores[user, j] for j in ranking[:10]]
        np.testing.assert_allclose(np.asarray(top_scores[user]), expected, rtol=1e-6)


def test_excluded_items_rank_after_minus_infinity_and_nan_on_the_device():
    scores = np.array([[-np.inf, -np.inf, 0.0, np.nan, -0.0, 2.0]], np.float32)
    exclude = np.array([[True, False, False, False, False, True]])
    relevant = np.array([[False, True, False, False, False, False]])
    # Brute force: by (-score, index) among the allowed items, -inf last but for NaN.
    top_scores, top_items = metrics.top_k_items(scores, 6, exclude)
    assert np.asarray(top_items[0]).tolist() == [2, 4, 1, 3, 0, 5]
    np.testing.assert_array_equal(top_scores[0], [0.0, 0.0, -np.inf, np.nan, -np.inf, -np.inf])
    finite = np.where(np.isnan(scores), -np.inf, scores)
    assert metrics.ranking_metrics(finite, relevant, 3, exclude)["hr@3"] == 1.0
    assert metrics.ranking_metrics(finite, relevant, 2, exclude)["hr@2"] == 0.0
    _, top_items = metrics.top_k_items(np.array([[np.nan, 1.0, -np.inf]], np.float32), 3)
    assert np.asarray(top_items[0]).tolist() == [1, 2, 0]
    # -0.0 and 0.0 tie (by index) on the fast path too, where no -inf is reached.
    _, top_items = metrics.top_k_items(np.array([[-0.0, 0.0, 1.0, -1.0]], np.float32), 3)
    assert np.asarray(top_items[0]).tolist() == [2, 0, 1]


def test_per_user_metrics_from_device_top_items_match_loops():
    scores, relevant, exclude = _ranking_data(3)
    _, top_items = metrics.top_k_items(scores, 10, exclude)
    per_user = metrics.per_user_ranking_metrics(np.asarray(top_items), relevant, [3, 10], exclude)
    counted = (relevant & ~exclude).any(axis=1).sum()
    for k in (3, 10):
        expected = _ranking_reference(scores, relevant, exclude, k)
        for name, value in expected.items():
            assert per_user[name].shape == (counted,)
            assert per_user[name].mean() == pytest.approx(value, abs=1e-6), name


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.auc([], []),
        lambda: metrics.gauc([], [], []),
        lambda: metrics.logloss([], []),
        lambda: metrics.accuracy([], []),
        lambda: metrics.expected_calibration_error([], []),
        lambda: metrics.click_metrics([], []),
    ],
)
def test_empty_click_inputs_are_errors(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_bad_click_inputs_name_the_argument():
    with pytest.raises(ValueError, match="scores has 2 entries but labels has 3"):
        metrics.auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="weights has 2 entries"):
        metrics.auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="user_ids has 2 entries"):
        metrics.gauc([0, 1], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="probs has 1 entries"):
        metrics.logloss([0, 1], [0.5])
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        metrics.auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores contains NaN"):
        metrics.auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="scores must be a 1-D array"):
        metrics.auc([0, 1], [[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]"):
        metrics.accuracy([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        metrics.auc([0, 1], [0.1, 0.2], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="user_ids contains NaN"):
        metrics.gauc([np.nan, np.nan, 1, 1], [1, 0, 1, 0], [0.1, 0.2, 0.3, 0.1])
    for mixed in (["u1", "u1", None, None], ["u1", "u1", 2, 2]):
        with pytest.raises(ValueError, match="user_ids cannot be sorted"):
            metrics.gauc(np.array(mixed, object), [1, 0, 1, 0], [0.1, 0.2, 0.3, 0.1])
    # Python objects of one kind are ids like any other.
    assert metrics.gauc(
        np.array(["u1", "u1", "u2", "u2"], object), [1, 0, 0, 1], [0.9, 0.1, 0.2, 0.8]
    ) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="every row has weight 0"):
        metrics.auc([0, 1], [0.1, 0.2], weights=[0.0, 0.0])


def test_bad_ranking_inputs_name_the_argument():
    scores = np.zeros((3, 5))
    relevant = np.ones((3, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"relevant has shape \(3, 4\) but scores"):
        metrics.ranking_metrics(scores, relevant[:, :4], 2)
    with pytest.raises(ValueError, match=r"exclude has shape \(2, 5\) but scores"):
        metrics.ranking_metrics(scores, relevant, 2, exclude=relevant[:2])
    with pytest.raises(ValueError, match=r"scores must be 2-D"):
        metrics.ranking_metrics(scores[0], relevant, 2)
    with pytest.raises(ValueError, match=r"scores is empty"):
        metrics.ranking_metrics(np.zeros((0, 5)), np.zeros((0, 5), dtype=bool), 2)
    with pytest.raises(ValueError, match=r"k=6 must be in \[1, 5\]"):
        metrics.ranking_metrics(scores, relevant, [2, 6])
    with pytest.raises(ValueError, match="scores contains NaN"):
        metrics.ranking_metrics(np.full((3, 5), np.nan), relevant, 2)
    with pytest.raises(ValueError, match="no user has a relevant item"):
        metrics.ranking_metrics(scores, relevant, 2, exclude=relevant)
    with pytest.raises(ValueError, match="top_items holds 2 items per user, fewer than k=3"):
        metrics.per_user_ranking_metrics(np.zeros((3, 2), dtype=int), relevant, 3)
    for k in (5.0, None, "5"):
        with pytest.raises(ValueError, match="k must be an int or a sequence of ints"):
            metrics.ranking_metrics(scores, relevant, k)
    with pytest.raises(ValueError, match=r"scores must be 2-D \(users, items\)"):
        metrics.top_k_items(scores[0], 2)
    for k in (0, 6, 2.0):
        with pytest.raises(ValueError, match=rf"k={k!r} must be an int in \[1, 5\]"):
            metrics.top_k_items(scores, k)
    with pytest.raises(ValueError, match=r"exclude has shape \(2, 5\)"):
        metrics.top_k_items(scores, 2, relevant[:2])


def test_click_metrics_reports_an_undefined_auc_as_none():
    result = metrics.click_metrics([1, 1, 1], np.array([0.3, -1.0, 2.0]), user_ids=[0, 0, 1])
    assert result["auc"] is None and result["gauc"] is None
    assert result["logloss"] == pytest.approx(
        metrics.logloss([1, 1, 1], metrics.sigmoid(np.array([0.3, -1.0, 2.0])))
    )
    with pytest.raises(metrics.UndefinedMetricError, match="hold only positives"):
        metrics.auc([1, 1, 1], [0.3, -1.0, 2.0])


def test_click_metrics_reports_undefined_gauc_as_none():
    """One held-out row per user (leave-last splits): GAUC is undefined, the rest is not."""
    labels = np.array([1, 0, 1, 0])
    logits = np.array([2.0, -1.0, 0.5, 0.7])
    result = metrics.click_metrics(labels, logits, user_ids=np.array([1, 2, 3, 4]))
    assert result["gauc"] is None
    assert result["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    with pytest.raises(metrics.UndefinedMetricError):
        metrics.gauc(np.array([1, 2, 3, 4]), labels, logits)
