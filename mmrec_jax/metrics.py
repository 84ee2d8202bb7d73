"""Evaluation metrics for click prediction and full-catalogue ranking.

Plain functions on arrays: numpy (or anything `np.asarray` accepts) in, Python floats or
a dict of them out. The one exception is `top_k_items`, a jitted JAX function that
evaluation code runs on the device before handing the top items to
`per_user_ranking_metrics`.

Conventions shared by every function here:

- Labels are binary: `bool`, or numbers that are all 0 or 1.
- Inputs that are empty, of the wrong rank, of mismatched lengths, or hold NaN raise
  `ValueError` naming the argument.
- A metric that is undefined for the input (AUC with a single class, ranking metrics with
  no user that has a relevant item) raises `ValueError`; nothing returns NaN.

Click prediction (one row per impression):

- `auc`: the Mann-Whitney statistic, P(score of a positive > score of a negative), ties
  counting 1/2; equal to the area under the ROC curve as scikit-learn computes it.
- `gauc`: per-user AUC averaged with weights equal to each user's number of impressions,
  over the users that have both a positive and a negative.
- `logloss`, `accuracy`, `expected_calibration_error`, and `click_metrics` for all at once.

Ranking (one row per user, one column per catalogue item):

- `ranking_metrics(scores, relevant, k, exclude)`: HR, Recall, NDCG, MRR and MAP at K,
  averaged over users with at least one relevant item. Definitions in its docstring.
- `top_k_items`, `per_user_ranking_metrics`: the same in two steps, so that scoring and
  top-K selection can run on the device in batches of users.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- validation


def _vector(name: str, values) -> np.ndarray:
    """`values` as a non-empty 1-D numpy array, or a ValueError naming `name`."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array (one entry per impression), got shape {array.shape}; "
            "flatten it with .reshape(-1) if it holds one value per row."
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one impression.")
    return array


def _same_length(reference_name: str, reference: np.ndarray, name: str, array: np.ndarray):
    if array.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{name} has {array.shape[0]} entries but {reference_name} has "
            f"{reference.shape[0]}; pass one {name} value per impression."
        )


def _binary(name: str, values) -> np.ndarray:
    """Binary labels as a bool array, or a ValueError naming `name`."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        found = np.unique(array[~np.isin(array, (0, 1))])[:5]
        raise ValueError(f"{name} must hold only 0 and 1 (or bool); found {found.tolist()}.")
    return array.astype(bool)


def _finite(name: str, values, allow_neg_inf: bool = False) -> np.ndarray:
    """A float array without NaN (and without infinities unless allowed)."""
    array = np.asarray(values)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; metrics need a number for every entry.")
    if not allow_neg_inf and np.isinf(array).any():
        raise ValueError(f"{name} contains an infinity; pass finite values.")
    return array


def _probabilities(name: str, values) -> np.ndarray:
    array = _finite(name, _vector(name, values)).astype(np.float64)
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{name} must be probabilities in [0, 1], found values in "
            f"[{array.min()}, {array.max()}]; pass sigmoid(logits), or logits to click_metrics."
        )
    return array


def _click_inputs(labels, name: str, values) -> tuple[np.ndarray, np.ndarray]:
    labels = _binary("labels", _vector("labels", labels))
    values = _vector(name, values)
    _same_length("labels", labels, name, values)
    return labels, values


# ----------------------------------------------------------------------- click prediction


def _grouped_auc(
    groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group Mann-Whitney sums, vectorised: one sort by (group, score), no Python loop.

    Rows are sorted by (group, score) and cut into runs of equal (group, score). A run
    with positive weight P_r and negative weight N_r contributes P_r * (N_below + N_r / 2),
    where N_below is the negative weight of the same group at strictly lower scores.

    Returns:
      (sum of contributions, positive weight, negative weight, number of rows), each of
      shape (num_groups,), groups in sorted order.
    """
    order = np.lexsort((scores, groups))  # (N,) by group, then score
    groups, labels, scores, weights = groups[order], labels[order], scores[order], weights[order]
    group_start = np.empty(groups.shape[0], dtype=bool)  # (N,) first row of a group
    group_start[0] = True
    group_start[1:] = groups[1:] != groups[:-1]
    run_start = group_start.copy()  # (N,) first row of a (group, score) run
    run_start[1:] |= scores[1:] != scores[:-1]
    run_of_row = np.cumsum(run_start) - 1  # (N,)
    group_of_row = np.cumsum(group_start) - 1  # (N,)
    run_pos = np.bincount(run_of_row, weights=weights * labels)  # (R,)
    run_neg = np.bincount(run_of_row, weights=weights * ~labels)  # (R,)
    group_of_run = group_of_row[run_start]  # (R,)
    neg_before = np.cumsum(run_neg) - run_neg  # (R,) over all earlier runs, every group
    first_run_of_group = np.flatnonzero(group_start[run_start])  # (G,)
    neg_below = neg_before - neg_before[first_run_of_group][group_of_run]  # (R,) same group
    contribution = run_pos * (neg_below + 0.5 * run_neg)  # (R,)
    return (
        np.bincount(group_of_run, weights=contribution),
        np.bincount(group_of_run, weights=run_pos),
        np.bincount(group_of_run, weights=run_neg),
        np.bincount(group_of_row),
    )


def auc(labels, scores, weights=None) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with half credit for ties.

    AUC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i == s_j] / 2) / (W_pos * W_neg),
    with W_pos, W_neg the total weight of positives and negatives. This is the area that
    `sklearn.metrics.roc_auc_score` computes, with `sample_weight=weights`. Computed with
    one sort, O(N log N).

    Args:
      labels: (N,) binary labels.
      scores: (N,) real scores, any monotone scale (logits or probabilities).
      weights: optional (N,) non-negative row weights; rows of weight 0 are ignored.

    Returns:
      The AUC in [0, 1].

    Raises:
      ValueError: bad input.
      UndefinedMetricError (a ValueError): the (non-zero-weight) rows hold a single
        class, for which AUC is undefined.
    """
    labels, scores = _click_inputs(labels, "scores", scores)
    scores = _finite("scores", scores)
    if weights is None:
        weights = np.ones(labels.shape[0])
    else:
        weights = _finite("weights", _vector("weights", weights)).astype(np.float64)
        _same_length("labels", labels, "weights", weights)
        if weights.min() < 0:
            raise ValueError("weights must be non-negative; found a negative weight.")
    groups = np.zeros(labels.shape[0], dtype=np.int8)
    (total,), (positive,), (negative,), _ = _grouped_auc(groups, labels, scores, weights)
    if positive == 0 and negative == 0:
        raise ValueError("AUC is undefined: every row has weight 0; pass non-zero weights.")
    if positive == 0 or negative == 0:
        present = "positives" if positive > 0 else "negatives"
        raise UndefinedMetricError(
            f"AUC is undefined: labels (with non-zero weight) hold only {present}; "
            "it needs at least one positive and one negative."
        )
    return float(total / (positive * negative))


class UndefinedMetricError(ValueError):
    """A metric that the input does not define (e.g. GAUC when no user has both classes)."""


def gauc(user_ids, labels, scores) -> float:
    """Group AUC: per-user AUC averaged with weights equal to the user's impressions.

    GAUC = sum_u n_u * AUC_u / sum_u n_u, over users u whose impressions include both a
    positive and a negative (other users are left out: their AUC is undefined); n_u is the
    number of impressions of user u and AUC_u is `auc` on those impressions (ties count
    1/2). Vectorised: one sort by (user, score), then per-user rank sums; 1e6 rows take
    well under a second.

    Args:
      user_ids: (N,) user of each impression; any dtype numpy can sort (integers, strings).
      labels: (N,) binary labels.
      scores: (N,) real scores.

    Returns:
      The GAUC in [0, 1].

    Raises:
      ValueError: bad input, or no user has both a positive and a negative.
    """
    labels, scores = _click_inputs(labels, "scores", scores)
    scores = _finite("scores", scores)
    user_ids = _vector("user_ids", user_ids)
    _same_length("labels", labels, "user_ids", user_ids)
    if user_ids.dtype.kind in "fc" and np.isnan(user_ids).any():
        raise ValueError("user_ids contains NaN; every impression needs the id of its user.")
    if user_ids.dtype == object:  # Python objects: a None or a mix of kinds cannot sort
        try:
            np.unique(user_ids)
        except TypeError as error:
            raise ValueError(
                f"user_ids cannot be sorted ({error}): pass ids of one kind (all integers "
                "or all strings); every impression needs the id of its user."
            ) from None
    total, positive, negative, count = _grouped_auc(
        user_ids, labels, scores, np.ones(labels.shape[0])
    )
    valid = (positive > 0) & (negative > 0)  # (G,)
    if not valid.any():
        raise UndefinedMetricError(
            "GAUC is undefined: no user has both a positive and a negative impression."
        )
    per_user = total[valid] / (positive[valid] * negative[valid])
    return float(np.sum(count[valid] * per_user) / np.sum(count[valid]))


def gauc_users(user_ids, labels) -> int:
    """How many users `gauc` averages over: those with both a positive and a negative
    impression among the rows given (sampled negatives included), 0 where GAUC is
    undefined. A GAUC over a handful of users is noise.

    Args:
      user_ids: (N,) user of each impression.
      labels: (N,) binary labels.
    """
    labels, user_ids = _click_inputs(labels, "user_ids", user_ids)
    return int(np.intersect1d(user_ids[labels], user_ids[~labels]).size)


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities.

    logloss = -mean(y * log(p) + (1 - y) * log(1 - p)), with p clipped to [eps, 1 - eps]
    so that a confident wrong prediction costs at most -log(eps) (about 16.1 for 1e-7).

    Args:
      labels: (N,) binary labels.
      probs: (N,) predicted probabilities of the positive class, in [0, 1].
      eps: clipping bound for the probabilities.

    Returns:
      The mean log loss (natural log).
    """
    labels, probs = _click_inputs(labels, "probs", probs)
    probs = np.clip(_probabilities("probs", probs), eps, 1.0 - eps)
    return float(-np.mean(np.where(labels, np.log(probs), np.log1p(-probs))))


def _logloss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy from logits, exact without clipping (as in training)."""
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x).
    return float(np.mean(np.logaddexp(0.0, np.where(labels, -logits, logits))))


def accuracy(labels, probs, threshold: float = 0.5) -> float:
    """Fraction of impressions whose prediction `probs >= threshold` equals the label.

    Args:
      labels: (N,) binary labels.
      probs: (N,) predicted probabilities of the positive class, in [0, 1].
      threshold: probabilities at or above it predict a positive.

    Returns:
      The accuracy in [0, 1].
    """
    labels, probs = _click_inputs(labels, "probs", probs)
    probs = _probabilities("probs", probs)
    return float(np.mean((probs >= threshold) == labels))


def _calibration_bins(
    labels: np.ndarray, probs: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bin edges and per-bin count, label sum and probability sum.

    Bin b in 0..num_bins-1 holds the probabilities in [b / num_bins, (b + 1) / num_bins)
    (the last bin also holds 1.0), with the edges b / num_bins rounded once to float64.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}.")
    # Not np.linspace: its i * (1 / num_bins) puts 3 / 10 at 0.30000000000000004.
    edges = np.arange(num_bins + 1) / num_bins  # (num_bins + 1,)
    bins = np.minimum(np.searchsorted(edges, probs, side="right") - 1, num_bins - 1)  # (N,)
    count = np.bincount(bins, minlength=num_bins)  # (num_bins,)
    label_sum = np.bincount(bins, weights=labels, minlength=num_bins)
    prob_sum = np.bincount(bins, weights=probs, minlength=num_bins)
    return edges, count, label_sum, prob_sum


def expected_calibration_error(labels, probs, num_bins: int = 15) -> float:
    """Expected calibration error over equal-width probability bins.

    ECE = sum_b (n_b / N) * |mean label in b - mean probability in b| over the bins of
    `calibration_curve`, empty bins adding 0.

    Args:
      labels: (N,) binary labels.
      probs: (N,) predicted probabilities of the positive class, in [0, 1].
      num_bins: number of equal-width bins.

    Returns:
      The ECE in [0, 1].
    """
    labels, probs = _click_inputs(labels, "probs", probs)
    probs = _probabilities("probs", probs)
    _, _, label_sum, prob_sum = _calibration_bins(labels, probs, num_bins)
    return float(np.sum(np.abs(label_sum - prob_sum)) / labels.shape[0])


def calibration_curve(labels, probs, num_bins: int = 15) -> dict[str, list]:
    """The reliability diagram behind `expected_calibration_error`, bin by bin.

    Bin b in 0..num_bins-1 holds the probabilities in [b / num_bins, (b + 1) / num_bins)
    (the last bin also holds 1.0), as in `expected_calibration_error`.

    Args:
      labels: (N,) binary labels.
      probs: (N,) predicted probabilities of the positive class, in [0, 1].
      num_bins: number of equal-width bins.

    Returns:
      {"bin_edges": num_bins + 1 floats, "count": per-bin examples, "mean_prob": per-bin
      mean predicted probability, "positive_rate": per-bin fraction of positives}; the
      means are None for empty bins. Lists, ready for JSON.
    """
    labels, probs = _click_inputs(labels, "probs", probs)
    probs = _probabilities("probs", probs)
    edges, count, label_sum, prob_sum = _calibration_bins(labels, probs, num_bins)

    def means(sums: np.ndarray) -> list[float | None]:
        return [float(s / n) if n else None for s, n in zip(sums, count, strict=True)]

    return {
        "bin_edges": [float(e) for e in edges],
        "count": [int(n) for n in count],
        "mean_prob": means(prob_sum),
        "positive_rate": means(label_sum),
    }


def sigmoid(logits) -> np.ndarray:
    """Sigmoid in float64 without overflow: exp(-softplus(-x))."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, np.float64)))


def click_metrics(
    labels,
    logits=None,
    *,
    probs=None,
    user_ids=None,
    threshold: float = 0.5,
    num_bins: int = 15,
) -> dict[str, float]:
    """All click-prediction metrics at once, from logits (or from probabilities).

    From logits: AUC and GAUC rank the logits themselves (no ties added by a saturated
    sigmoid), logloss is the exact cross-entropy of the logits (as the training loss,
    no clipping), and accuracy and ECE use sigmoid(logits). From probabilities, each is
    the function of the same name.

    Args:
      labels: (N,) binary labels.
      logits: (N,) predicted logits; give exactly one of `logits` and `probs`.
      probs: (N,) predicted probabilities in [0, 1].
      user_ids: optional (N,) user of each impression; adds "gauc" (None when no user
        has both a positive and a negative, e.g. one held-out row per user).
      threshold: probability at or above which `accuracy` predicts a positive.
      num_bins: number of bins of `expected_calibration_error`.

    Returns:
      {"auc" (None if undefined: labels of one class), "gauc" (only with user_ids; None
      if undefined), "logloss", "accuracy", "ece"} as floats.

    Raises:
      ValueError: bad input.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of logits and probs to click_metrics.")
    if logits is not None:
        labels, logits = _click_inputs(labels, "logits", logits)
        scores = _finite("logits", logits).astype(np.float64)
        probs = sigmoid(scores)
        loss = _logloss_from_logits(labels, scores)
    else:
        labels, probs = _click_inputs(labels, "probs", probs)
        scores = probs = _probabilities("probs", probs)
        loss = logloss(labels, probs)
    try:
        results = {"auc": auc(labels, scores)}
    except UndefinedMetricError:
        results = {"auc": None}
    if user_ids is not None:
        try:
            results["gauc"] = gauc(user_ids, labels, scores)
        except UndefinedMetricError:
            results["gauc"] = None
    results["logloss"] = loss
    results["accuracy"] = accuracy(labels, probs, threshold)
    results["ece"] = expected_calibration_error(labels, probs, num_bins)
    return results


# -------------------------------------------------------------------------------- ranking


def _cutoffs(k, num_items: int) -> tuple[int, ...]:
    """`k` (an int or a sequence of ints) as a tuple of cut-offs in [1, num_items]."""
    if isinstance(k, int | np.integer) and not isinstance(k, bool):
        ks = (k,)
    elif isinstance(k, str) or not hasattr(k, "__iter__"):
        raise ValueError(f"k must be an int or a sequence of ints, got {k!r}.")
    else:
        ks = tuple(k)
    if not ks:
        raise ValueError("k is empty; pass an int or a non-empty sequence of ints.")
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"k must hold ints, got {value!r}.")
        if not 1 <= value <= num_items:
            raise ValueError(f"k={value} must be in [1, {num_items}], the number of items.")
    return tuple(int(value) for value in ks)


def _user_item_matrix(name: str, values, shape: tuple[int, ...] | None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (users, items), got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one user and one item.")
    if shape is not None and array.shape != shape:
        raise ValueError(
            f"{name} has shape {array.shape} but scores has shape {shape}; "
            "pass one entry per (user, item)."
        )
    return array


def _order_key_numpy(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """(U, I) int64 keys that order like the float scores, excluded items below them all.

    A float's bits, read as a signed integer with the magnitude bits of negative numbers
    flipped, order like the float itself (-inf lowest, -0.0 taken as 0.0). Excluded
    items get a key below -inf's, so they come after every other item, -inf included.
    """
    scores = np.where(scores == 0, 0.0, scores).astype(np.float64)  # (U, I), no -0.0
    bits = scores.view(np.int64)
    key = np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)  # (U, I)
    if exclude is not None:
        key = np.where(exclude, np.iinfo(np.int64).min + 1, key)  # negation cannot overflow
    return key


def _order_key(scores: jax.Array, exclude: jax.Array | None) -> jax.Array:
    """`_order_key_numpy` on the device for float32 scores (int32 keys), NaN above excluded.

    NaN, which `jax.lax.top_k` would rank first, gets a key just below -inf's.
    """
    scores = jnp.asarray(scores, jnp.float32)
    scores = jnp.where(scores == 0, 0.0, scores)  # (U, I), no -0.0
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # (U, I)
    lowest = jnp.iinfo(jnp.int32).min
    key = jnp.where(jnp.isnan(scores), lowest + 1, key)  # -inf's key is far above this
    if exclude is not None:
        key = jnp.where(exclude, lowest, key)
    return key


@functools.partial(jax.jit, static_argnames="k")
def top_k_items(scores: jax.Array, k: int, exclude: jax.Array | None = None):
    """The K highest-scoring items of each user, on the device, excluded items last.

    Items are ordered by descending score, equal scores by ascending item index (the
    order `ranking_metrics` uses); NaN scores come after -inf, and excluded items after
    everything else, so an excluded item is never chosen before one that is not. Callers
    that must not rank NaN scores check for them.

    Args:
      scores: (users, items) float scores (computed in float32).
      k: number of items to return, static; at most the number of items.
      exclude: optional (users, items) bool, True where an item must not be recommended
        (for example the user's training positives).

    Returns:
      (top_scores, top_items), each (users, k): float32 scores in ranking order (-inf for
      excluded items) and the item indices (int32) they belong to.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (users, items), got shape {scores.shape}.")
    num_items = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_items:
        raise ValueError(f"k={k!r} must be an int in [1, {num_items}], the number of items.")
    if exclude is not None and jnp.shape(exclude) != scores.shape:
        raise ValueError(
            f"exclude has shape {jnp.shape(exclude)} but scores has shape {scores.shape}; "
            "pass one entry per (user, item)."
        )
    lowest = jnp.finfo(jnp.float32).min
    # Fast path: XLA's float top-k (on integer keys it sorts every row in full). Excluded
    # items and NaN go to -inf, a real -inf to the lowest finite float, -0.0 to 0.0; the
    # order is then exact unless a row's K-th value is that lowest float or below.
    unranked = jnp.isnan(scores) if exclude is None else jnp.isnan(scores) | exclude
    fast = jnp.where(scores == -jnp.inf, lowest, jnp.where(scores == 0, 0.0, scores))
    # The barrier keeps XLA's CPU top-k kernel: with its outputs computed on in the same
    # fusion scope, XLA falls back to sorting every row (50x slower at 20k items).
    fast_values, fast_items = jax.lax.optimization_barrier(
        jax.lax.top_k(jnp.where(unranked, -jnp.inf, fast), k)
    )  # (U, k)
    top_items = jax.lax.cond(
        jnp.any(fast_values[:, -1] <= lowest),
        lambda: jax.lax.top_k(_order_key(scores, exclude), k)[1],
        lambda: fast_items,
    )  # (U, k)
    if exclude is not None:
        scores = jnp.where(exclude, -jnp.inf, scores)  # (U, I)
    return jnp.take_along_axis(scores, top_items, axis=1), top_items  # (U, k), (U, k)


def _top_k_numpy(key: np.ndarray, k: int) -> np.ndarray:
    """(users, k) item indices by descending key, ties by ascending index, in O(U * I)."""
    num_users, num_items = key.shape
    kth = np.partition(key, num_items - k, axis=1)[:, num_items - k, None]  # (U, 1)
    above = key > kth  # (U, I): all of these are in the top k
    at = key == kth  # (U, I): the lowest-index ones fill the remaining places
    needed = k - above.sum(axis=1, keepdims=True)  # (U, 1)
    chosen = above | (at & (np.cumsum(at, axis=1) <= needed))  # (U, I), k per row
    items = np.nonzero(chosen)[1].reshape(num_users, k)  # (U, k) ascending index
    order = np.argsort(-np.take_along_axis(key, items, axis=1), axis=1, kind="stable")
    return np.take_along_axis(items, order, axis=1)  # (U, k)


def per_user_ranking_metrics(top_items, relevant, k, exclude=None) -> dict[str, np.ndarray]:
    """Per-user ranking metrics from each user's ranked top items.

    The users that count are those with at least one relevant item that is not excluded;
    the others are dropped from the output. Definitions are those of `ranking_metrics`.
    Evaluation that scores users in batches on the device pairs this with `top_k_items`,
    concatenates the arrays of all batches and takes their mean.

    Args:
      top_items: (users, K) item indices, best first, with K >= max(k).
      relevant: (users, items) bool, True for the items each user engaged with (the
        held-out positives).
      k: a cut-off, or a sequence of cut-offs.
      exclude: optional (users, items) bool of items that cannot be recommended; an
        excluded item is never a hit and does not count as relevant.

    Returns:
      {"hr@K", "recall@K", "ndcg@K", "mrr@K", "map@K"} for each K in k, each an array of
      shape (users that count,), in user order.
    """
    relevant = _binary("relevant", _user_item_matrix("relevant", relevant, None))
    ks = _cutoffs(k, relevant.shape[1])
    if exclude is not None:
        exclude = _binary("exclude", _user_item_matrix("exclude", exclude, relevant.shape))
        relevant = relevant & ~exclude
    top_items = np.asarray(top_items)
    if top_items.ndim != 2 or top_items.shape[0] != relevant.shape[0]:
        raise ValueError(
            f"top_items must have shape (users, K) = ({relevant.shape[0]}, K), the users of "
            f"relevant, got {top_items.shape}."
        )
    if top_items.shape[1] < max(ks):
        raise ValueError(
            f"top_items holds {top_items.shape[1]} items per user, fewer than k={max(ks)}; "
            "compute at least max(k) top items."
        )
    if not np.issubdtype(top_items.dtype, np.integer):
        raise ValueError(f"top_items must hold item indices (integers), got {top_items.dtype}.")
    if top_items.min() < 0 or top_items.max() >= relevant.shape[1]:
        raise ValueError(f"top_items must be item indices in [0, {relevant.shape[1]}).")
    num_relevant = relevant.sum(axis=1)  # (U,)
    counted = num_relevant > 0
    num_relevant = num_relevant[counted]  # (U',)
    hits = np.take_along_axis(relevant, top_items[:, : max(ks)], axis=1)[counted]  # (U', K)
    ranks = np.arange(1, max(ks) + 1)  # (K,)
    discounts = 1.0 / np.log2(ranks + 1.0)  # (K,)
    results = {}
    for cutoff in ks:
        hit = hits[:, :cutoff]  # (U', cutoff)
        any_hit = hit.any(axis=1)  # (U',)
        ideal = np.minimum(num_relevant, cutoff)  # (U',)
        first = np.argmax(hit, axis=1)  # (U',) 0-based rank of the first hit
        precision = np.cumsum(hit, axis=1) / ranks[:cutoff]  # (U', cutoff) precision@i
        results[f"hr@{cutoff}"] = any_hit.astype(np.float64)
        results[f"recall@{cutoff}"] = hit.sum(axis=1) / num_relevant
        results[f"ndcg@{cutoff}"] = (hit @ discounts[:cutoff]) / np.cumsum(discounts)[ideal - 1]
        results[f"mrr@{cutoff}"] = np.where(any_hit, 1.0 / (first + 1), 0.0)
        results[f"map@{cutoff}"] = np.sum(precision * hit, axis=1) / ideal
    return results


def ranking_metrics(scores, relevant, k, exclude=None) -> dict[str, float]:
    """HR, Recall, NDCG, MRR and MAP at K over the full catalogue, averaged over users.

    Each user's items are ranked by descending score, equal scores by ascending item index
    (deterministic, and the order `top_k_items` gives). Excluded items (the user's
    training positives) are ranked last, so they cannot be recommended ahead of any other
    item, and are not counted as relevant. With R the user's number of relevant
    (non-excluded) items and hit_i = 1 if the item at rank i (1-based) is relevant:

    - HR@K = 1 if any of the top K is relevant, else 0.
    - Recall@K = sum_{i<=K} hit_i / R (the standard definition: it is below 1 when R > K).
    - NDCG@K = DCG@K / IDCG@K with binary gains, DCG@K = sum_{i<=K} hit_i / log2(i + 1),
      and IDCG@K the DCG of min(R, K) hits at ranks 1..min(R, K).
    - MRR@K = 1 / (rank of the first hit) if it is within K, else 0.
    - MAP@K = sum_{i<=K} hit_i * precision@i / min(R, K), precision@i = sum_{j<=i} hit_j / i.

    Each is averaged over the users with R > 0; users without relevant items are skipped.

    Args:
      scores: (users, items) real scores (numpy or anything `np.asarray` accepts); -inf
        is allowed, NaN is not.
      relevant: (users, items) bool, True for the items each user engaged with (the
        held-out positives of the split).
      k: a cut-off, or a sequence of cut-offs, each in [1, items].
      exclude: optional (users, items) bool, True for items the user must not be
        recommended (their training positives).

    Returns:
      {"hr@K", "recall@K", "ndcg@K", "mrr@K", "map@K"} for each K in k, as floats.

    Raises:
      ValueError: bad input, or no user has a relevant item that is not excluded.
    """
    scores = _finite("scores", _user_item_matrix("scores", scores, None), allow_neg_inf=True)
    relevant = _user_item_matrix("relevant", relevant, scores.shape)
    ks = _cutoffs(k, scores.shape[1])
    if exclude is not None:
        exclude = _binary("exclude", _user_item_matrix("exclude", exclude, scores.shape))
    top_items = _top_k_numpy(_order_key_numpy(scores, exclude), max(ks))  # (U, K)
    per_user = per_user_ranking_metrics(top_items, relevant, ks, exclude)
    if next(iter(per_user.values())).size == 0:
        raise ValueError(
            "Ranking metrics are undefined: no user has a relevant item that is not excluded."
        )
    return {name: float(np.mean(values)) for name, values in per_user.items()}
