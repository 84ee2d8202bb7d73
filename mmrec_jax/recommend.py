"""Top-K recommendations for a user, served from an export folder alone.

    python -m mmrec_jax.recommend --export export/ --user USER_ID [--k 10]
        [--include_interacted] [--show_history]
    python -m mmrec_jax.recommend --export export/ --items ITEM_ID,ITEM_ID,... [--k 10]
    python -m mmrec_jax.recommend --export export/ --list_users

The user's ID embedding and latest history (from the export's user table) are scored
against every item of the export's encoded item table with the model's `score`, in
jit-compiled chunks of items; the items the user already interacted with (in any split of
the dataset, whether the interaction was positive or not) are left out unless
--include_interacted is given. The top K are printed best first, each with the start of
its text (`--show_history` prints the user's latest history first). `--items` recommends
for a user the export does not know, from the items they engaged with (most recent
first): the model's history tower reads them, and the user's ID token is absent, as for
any user no training row has; those items are left out of the list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import exported, runtime, schema
from mmrec_jax import metrics as metrics_lib
from mmrec_jax.cli import exits_quietly

# Items scored per jit call (the last chunk is padded to this size).
ITEMS_PER_CALL = 4096
# Characters of each item's text shown in the printed table.
CLI_TEXT_CHARS = 60


class UnknownIdError(KeyError):
    """An id that is not in the export's tables."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnknownUserError(UnknownIdError):
    """A user id that is not in the export's user table."""


class UnknownItemError(UnknownIdError):
    """An item id that is not in the export's item table."""


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """One recommended item."""

    item_id: object  # the original item id
    logit: float
    probability: float
    text: str  # the item's text on one line, cut as the export keeps it ("" without text)


class ExportedRecommender:
    """Loads an export once and answers top-K queries.

    Args:
      path: a folder written by `python -m mmrec_jax.export`.
      items_per_call: items scored per jit call.
    """

    def __init__(self, path: str | Path, items_per_call: int = ITEMS_PER_CALL):
        self.path = Path(path)
        self.model, self.variables = exported.load_exported(self.path)
        self.tables = exported.load_tables(self.path)
        self.history = "history" in schema.parse_towers(self.model.config.towers)
        num_items = self.tables["item_ids"].shape[0]
        self.items_per_call = min(items_per_call, num_items)
        self.encoded = {
            "tokens": jnp.asarray(self.tables["item_tokens"]),
            "mask": jnp.asarray(self.tables["item_token_mask"]),
            "embedding": jnp.asarray(self.tables["item_embeddings"]),
        }
        self._index = {self._key(u): i for i, u in enumerate(self.tables["user_ids"].tolist())}
        self._item_index = {
            self._key(i): row for row, i in enumerate(self.tables["item_ids"].tolist())
        }
        self._score = jax.jit(
            self._score_chunk,
            compiler_options=runtime.compiler_options(self.model.config.dtype),
        )

    @staticmethod
    def _key(original_id) -> str:
        return str(original_id)

    @property
    def user_ids(self) -> np.ndarray:
        """The original ids of the users this export knows."""
        return self.tables["user_ids"]

    def user_row(self, user_id) -> int:
        """The row of `user_id` (an original id, as given or as text) in the user table.

        Raises:
          UnknownUserError: the export has no such user.
        """
        command = f"python -m mmrec_jax.recommend --export {self.path} --list_users"
        hint = f" List them all with `{command}`."
        return self._row(self._index, user_id, "user", self.user_ids, UnknownUserError, hint)

    def item_row(self, item_id) -> int:
        """The row of `item_id` (an original id, as given or as text) in the item table.

        Raises:
          UnknownItemError: the export has no such item.
        """
        ids = self.tables["item_ids"]
        return self._row(self._item_index, item_id, "item", ids, UnknownItemError, "")

    def _row(self, index, key, what: str, ids: np.ndarray, error: type, hint: str) -> int:
        """`index[key]` (as text), or `error` naming `key` and a few of the `ids` known."""
        row = index.get(self._key(key))
        if row is None:
            examples = ", ".join(str(i) for i in ids[:5].tolist())
            raise error(
                f"Unknown {what} {key!r}: export {str(self.path)!r} has no such {what} among "
                f"its {ids.shape[0]} {what}s (ids like {examples}).{hint}"
            )
        return row

    def item_rows(self, item_ids: Sequence) -> list[int]:
        """The item-table rows of `item_ids`, each item once (where it first appears).

        Raises:
          UnknownItemError: an item the export does not have.
        """
        return list(dict.fromkeys(self.item_row(i) for i in item_ids))

    @property
    def history_len(self) -> int:
        """H: the most recent items of a history the model reads."""
        return int(self.tables["user_history"].shape[1])

    def _score_chunk(self, variables, encoded, user_id, history, history_mask, slots):
        users = {"user_id": user_id[None]}  # one user: (1,), (1, H)
        if self.history:
            users["history_slot"] = history[None]
            users["history_mask"] = history_mask[None]
        logits = self.model.apply(variables, users, encoded, slots, method="score_grid")
        return logits[0].astype(jnp.float32)  # (chunk,)

    def scores(self, user_id) -> np.ndarray:
        """(N,) logits of the user against every item of the export, in item-table order."""
        row = self.user_row(user_id)
        return self._scores(
            self.tables["user_id_index"][row],
            self.tables["user_history"][row],
            self.tables["user_history_mask"][row],
        )

    def scores_for_history(self, item_ids: Sequence) -> np.ndarray:
        """(N,) logits of a user the export does not know, who engaged with `item_ids`.

        Args:
          item_ids: original item ids, most recent first (a repeated id counts where it
            first appears); the model reads the first `history_len` items (with no history
            tower, none: every new user then gets the same scores).

        Raises:
          UnknownItemError: an item the export does not have.
        """
        rows = self.item_rows(item_ids)[: self.history_len]
        history = np.zeros(self.history_len, np.int32)  # (H,)
        history[: len(rows)] = rows
        return self._scores(0, history, np.arange(self.history_len) < len(rows))

    def _scores(self, user_index, history: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
        """(N,) logits of one user (ID-vocabulary index, (H,) history rows and mask)."""
        num_items = self.tables["item_ids"].shape[0]
        chunk = self.items_per_call
        user = jnp.asarray(user_index, jnp.int32)
        history = jnp.asarray(history, jnp.int32)  # (H,)
        history_mask = jnp.asarray(history_mask, bool)
        out = []
        for start in range(0, num_items, chunk):
            slots = np.arange(start, start + chunk, dtype=np.int32) % num_items  # (chunk,)
            logits = self._score(self.variables, self.encoded, user, history, history_mask, slots)
            out.append(np.asarray(logits)[: min(chunk, num_items - start)])
        return np.concatenate(out)

    def interacted_items(self, user_id) -> np.ndarray:
        """Rows of the item table the user already interacted with, positive or not."""
        row = self.user_row(user_id)
        offsets = self.tables["user_interacted_offsets"]
        return self.tables["user_interacted_items"][offsets[row] : offsets[row + 1]]

    def latest_history(self, user_id) -> list[tuple[object, str]]:
        """(item id, item text) of the user's latest history, most recent first: the items
        the history tower reads for this user."""
        row = self.user_row(user_id)
        rows = self.tables["user_history"][row][self.tables["user_history_mask"][row]]
        item_ids, item_texts = self.tables["item_ids"], self.tables["item_texts"]
        return [(item_ids[i].item(), str(item_texts[i])) for i in rows]

    def recommend(
        self, user_id, k: int = 10, leave_out_interacted: bool = True
    ) -> list[Recommendation]:
        """The user's top-K items by score, best first.

        Args:
          user_id: the user's original id (as given, or as text).
          k: how many items; fewer come back when fewer are left to recommend.
          leave_out_interacted: leave out the items the user interacted with in the
            dataset, positively or not (False: rank every item, e.g. for replays).

        Raises:
          UnknownUserError: the export has no such user.
          ValueError: k < 1.
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1.")
        left_out = self.interacted_items(user_id) if leave_out_interacted else []
        return self._top(self.scores(user_id), left_out, k, f"user {user_id!r}")

    def recommend_for_history(
        self, item_ids: Sequence, k: int = 10, leave_out_given: bool = True
    ) -> list[Recommendation]:
        """Top-K items for a user the export does not know, best first.

        Args:
          item_ids: original ids of the items the user engaged with, most recent first
            (`scores_for_history`).
          k: how many items; fewer come back when fewer are left to recommend.
          leave_out_given: leave out the items of `item_ids` (False: rank every item).

        Raises:
          UnknownItemError: an item the export does not have.
          ValueError: k < 1.
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1.")
        left_out = self.item_rows(item_ids) if leave_out_given else []
        return self._top(self.scores_for_history(item_ids), left_out, k, "the new user")

    def _top(self, logits: np.ndarray, left_out, k: int, who: str) -> list[Recommendation]:
        """The top `k` of (N,) `logits` without the item rows `left_out`, best first."""
        if np.isnan(logits).any():
            raise ValueError(
                f"The scores of {who} hold NaN for {int(np.isnan(logits).sum())} "
                f"of {logits.size} items: the exported parameters or item encodings are not "
                "finite. Export again from a checkpoint of a run that trained without NaN."
            )
        exclude = np.zeros(logits.shape, bool)
        exclude[np.asarray(left_out, np.int64)] = True
        k = min(k, int((~exclude).sum()))
        if k == 0:
            return []
        top_logits, top_items = metrics_lib.top_k_items(logits[None], k, exclude[None])
        item_ids, item_texts = self.tables["item_ids"], self.tables["item_texts"]
        return [
            Recommendation(
                item_ids[i].item(),
                float(s),
                float(0.5 + 0.5 * np.tanh(0.5 * s)),
                str(item_texts[i]),
            )
            for s, i in zip(np.asarray(top_logits[0]), np.asarray(top_items[0]), strict=True)
        ]


def main(argv: list[str] | None = None) -> int:
    """`python -m mmrec_jax.recommend`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.recommend", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--export", required=True, help="a folder from mmrec_jax.export")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user's original id")
    who.add_argument(
        "--items",
        help="recommend for a user the export does not know, who engaged with these items: "
        "original ids, comma-separated, most recent first",
    )
    who.add_argument("--list_users", action="store_true", help="print every known user id")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument(
        "--show_history",
        action="store_true",
        help="with --user: first print the user's latest history, the items the model reads",
    )
    parser.add_argument(
        "--include_interacted",
        action="store_true",
        help="rank the items the user interacted with (or --items) too (left out by default)",
    )
    args = parser.parse_args(argv)
    if args.show_history and args.user is None:
        parser.error("--show_history goes with --user (--items are the history).")
    with exits_quietly(parser, exit_process=argv is None):
        return _recommend_and_print(parser, args)


def _recommend_and_print(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`main` once the arguments are parsed."""
    try:
        recommender = ExportedRecommender(args.export)
        if args.list_users:
            print("\n".join(str(u) for u in recommender.user_ids.tolist()))
            return 0
        if args.items is not None:
            item_ids = [i.strip() for i in args.items.split(",") if i.strip()]
            if not item_ids:
                raise ValueError("--items: give at least one item id.")
            leave_out = not args.include_interacted
            results = recommender.recommend_for_history(item_ids, args.k, leave_out)
            given = len(recommender.item_rows(item_ids))
            left_out = (" (leaving it out)" if given == 1 else " (leaving those out)") * leave_out
            who = f"a new user who engaged with {given} item{'s' * (given != 1)}{left_out}"
        else:
            results = recommender.recommend(args.user, args.k, not args.include_interacted)
            seen = recommender.interacted_items(args.user).size
            left_out = f" (leaving out the {seen} they interacted with)"
            who = f"user {args.user}{'' if args.include_interacted else left_out}"
    except (UnknownIdError, exported.ExportError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.items is not None and not recommender.history:
        print("Note: the model has no history tower, so every new user gets this list.")
    elif args.items is not None and given > recommender.history_len:
        print(
            f"Note: the model reads the first {recommender.history_len} of the "
            f"{given} items given (the most recent)."
        )
    if args.show_history:
        history = recommender.latest_history(args.user)
        count = f"{len(history)} item{'s' * (len(history) != 1)}"
        print(f"Latest history of user {args.user} ({count}, most recent first):")
        id_width = max([len(str(i)) for i, _ in history] + [4])
        for item_id, text in history:
            text = exported.text_preview(text, CLI_TEXT_CHARS)
            print(f"      {str(item_id):<{id_width}}  {text}".rstrip())
    print(f"Top {len(results)} items for {who}:")
    width = max([len(str(r.item_id)) for r in results] + [4])
    print(f"{'rank':>4}  {'item':<{width}}  {'probability':>11}  {'logit':>8}  text")
    for rank, result in enumerate(results, 1):
        text = exported.text_preview(result.text, CLI_TEXT_CHARS)
        print(
            f"{rank:>4}  {str(result.item_id):<{width}}  {result.probability:>11.4f}  "
            f"{result.logit:>8.3f}  {text}".rstrip()
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
