"""`mmrec_local`: your own interactions and item content as a TFDS dataset.

    python -m mmrec_jax.data.local --input DIR --output DATA_DIR [--name NAME]
        [--split leave_last|random|cold_items] [--positive_threshold 4.0] [--positives_only]
        [--skip_invalid]

DIR holds

- `interactions.csv` (or `.jsonl` / `.parquet`): `user_id`, `item_id`, and `label` (0/1)
  or `rating` (a number; `rating >= --positive_threshold` is a positive), optional
  `timestamp` (a number, or an ISO 8601 date and time). Without `label` and `rating` every
  row is a positive: the pipeline samples negatives (config.data.negatives_per_positive).
  `--positives_only` keeps only the positives of labelled or rated data, so that training
  samples negatives among the items a user has no interaction with: a model of the items
  a user engaged with rarely sees one they never met, and ranks the whole catalogue
  (and recommends) poorly.
- `items.csv` (or `.jsonl` / `.parquet`): `item_id` and any of `text` (or several
  columns `text_*`, or the columns named by `--text_columns`, joined into one text),
  `image` (a path relative to DIR, JPEG or PNG, any size and mode) and `audio` (a path,
  WAV, FLAC or OGG, any sample rate and channel count). An empty cell means the item
  lacks that modality.

Images are stored as RGB PNGs at most `--max_image_side` pixels on their longer side,
audio as mono 16-bit WAV at `--audio_sample_rate` Hz, cut to `--max_audio_seconds`; the
pipeline resizes and resamples them to the model's sizes.

Every bad row is reported with its file and line (`items.csv:7: ...`): an interaction
naming an unknown item, a duplicate item id, a missing or undecodable image or audio
file, a non-numeric label or rating, a bad timestamp, an empty id, an unreadable JSON
line; an empty file is an error too. Without `--skip_invalid` the import fails listing
them all. With it, the rows are skipped (for a bad image or audio file, only that file:
the item keeps its other content and lacks that modality) and the counts of each kind
are printed. Columns the import does not read are named, with the expected name that a
misspelt one likely stands for (`Time`: `timestamp`); in interactions without `label` and
`rating`, a column that likely stands for one of them (`Rating`, `labels`) is an error,
since every row would otherwise be a positive. Nothing is dropped silently. A file
that is not UTF-8 or not valid CSV (an unclosed quote) is an error naming the file and
line. A user's repeated interactions with one item are kept once, the last positive or
else the last (by time, ties by file order), so that no pair is both in training and in
an evaluation split; the import prints how many were left out.

Splits (`--split`): `leave_last` (the default when timestamps exist): per user with at
least 3 interactions, the last one (by time, ties by file order) is test and the one
before validation. `random` (the default otherwise): a seeded `--eval_share` of the
interactions each for validation and test. `cold_items`: a seeded `--cold_item_share` of
the items never appear in train (all their interactions are test_cold); the rest is
split leave_last (random without timestamps, with `--eval_share`). Either share given
for a split that does not use it is an error. With every method, validation and test
interactions with items that never occur in train move to test_cold, so validation and
test hold only items seen in training.

The importer ends by printing the command that trains on what it built.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import difflib
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmrec_jax.cli import HelpFormatter, exits_quietly, require_writable_folder
from mmrec_jax.data import builder, media, pipeline

DEFAULT_NAME = "mmrec_local"
SPLIT_METHODS = ("leave_last", "random", "cold_items")
# The shares a split uses where --eval_share / --cold_item_share are not given.
DEFAULT_EVAL_SHARE = 0.1
DEFAULT_COLD_ITEM_SHARE = 0.1
# configs/local.py's batch size, which the printed train command lowers for small data.
_LOCAL_BATCH_SIZE = 1024
# The largest CSV cell read (Python's csv module stops at 128 KiB by default).
_MAX_CELL_BYTES = 64 * 1024 * 1024
# The interaction columns an import reads.
INTERACTION_COLUMNS = ("user_id", "item_id", "label", "rating", "timestamp")
TABLE_SUFFIXES = {
    "interactions": (".csv", ".jsonl", ".parquet"),
    "items": (".csv", ".jsonl", ".parquet"),
}


class ImportFailed(ValueError):
    """The input has problems (each named with its file and line) or a wrong structure."""


@dataclasses.dataclass
class ImportOptions:
    """How an import turns input rows into a dataset (the command-line flags)."""

    # Dataset name (snake_case).
    name: str = DEFAULT_NAME
    # leave_last, random or cold_items; None: leave_last with timestamps, else random.
    split: str | None = None
    # Ratings at or above this are positives.
    positive_threshold: float = 4.0
    # Keep the positive interactions only (labels 1, ratings at or above the threshold):
    # training then samples negatives among the items a user has no interaction with.
    positives_only: bool = False
    # Skip bad rows (and bad media files) instead of failing.
    skip_invalid: bool = False
    # Seed of the random and cold_items splits (and of `build_content`'s shuffled ties).
    seed: int = 0
    # History entries stored per interaction.
    history_len: int = builder.DEFAULT_HISTORY_LEN
    # Longer side of stored images in pixels.
    max_image_side: int = 128
    # Sample rate of stored audio in Hz.
    audio_sample_rate: int = 16000
    # Longest stored audio clip in seconds.
    max_audio_seconds: float = 10.0
    # random split (and cold_items without timestamps, for the items it keeps): share of
    # interactions for validation, and for test. None: DEFAULT_EVAL_SHARE. A value given
    # for a split that does not use it is an error.
    eval_share: float | None = None
    # cold_items split: share of the items held out of training. None:
    # DEFAULT_COLD_ITEM_SHARE. A value given for another split is an error.
    cold_item_share: float | None = None
    # Item text columns to join (None: "text", else every "text_*" column).
    text_columns: tuple[str, ...] | None = None

    def split_method(self, has_timestamps: bool) -> str:
        """The split in effect: `split`, else leave_last with timestamps, else random."""
        return self.split or ("leave_last" if has_timestamps else "random")

    def shares(self) -> tuple[float, float]:
        """(eval_share, cold_item_share), the defaults filled in where not given."""
        return (
            DEFAULT_EVAL_SHARE if self.eval_share is None else self.eval_share,
            DEFAULT_COLD_ITEM_SHARE if self.cold_item_share is None else self.cold_item_share,
        )

    def check(self, has_timestamps: bool | None = None) -> None:
        """Raises ImportFailed naming each option (by its flag) outside its valid range, and
        each share given for a split that does not use it.

        Args:
          has_timestamps: whether the interactions have timestamps, which decides the
            split without --split (and the one cold_items uses for the rest); None: not
            known yet, so only what holds either way is checked.
        """
        errors = []
        if self.split is not None and self.split not in SPLIT_METHODS:
            errors.append(f"--split {self.split!r}; choose one of {', '.join(SPLIT_METHODS)}.")
        if not math.isfinite(self.positive_threshold):
            errors.append(
                f"--positive_threshold {self.positive_threshold} must be a finite number: "
                "ratings at or above it are positives."
            )
        if self.seed < 0:
            errors.append(f"--seed {self.seed} must be 0 or more.")
        if self.history_len < 1:
            errors.append(
                f"--history_len {self.history_len} must be 1 or more: the history entries "
                "stored per interaction."
            )
        if self.max_image_side < 1:
            errors.append(
                f"--max_image_side {self.max_image_side} must be 1 or more: the longer side "
                "of stored images in pixels."
            )
        if self.audio_sample_rate < 1:
            errors.append(
                f"--audio_sample_rate {self.audio_sample_rate} must be 1 or more: the sample "
                "rate of stored audio in Hz."
            )
        if not (math.isfinite(self.max_audio_seconds) and self.max_audio_seconds > 0):
            errors.append(
                f"--max_audio_seconds {self.max_audio_seconds} must be a number above 0: the "
                "longest stored clip in seconds."
            )
        elif (
            self.audio_sample_rate >= 1
            and round(self.max_audio_seconds * self.audio_sample_rate) < 1
        ):
            errors.append(
                f"--max_audio_seconds {self.max_audio_seconds} keeps no sample at "
                f"--audio_sample_rate {self.audio_sample_rate}; give a longer clip."
            )
        if self.eval_share is not None and not 0 < self.eval_share < 0.5:
            errors.append(
                f"--eval_share {self.eval_share} must lie in (0, 0.5): that share of the "
                "interactions goes to validation and as much to test."
            )
        if self.cold_item_share is not None and not 0 < self.cold_item_share < 1:
            errors.append(
                f"--cold_item_share {self.cold_item_share} must lie in (0, 1): the share of "
                "the items held out of training."
            )
        errors += self._unused_shares(has_timestamps)
        if errors:
            raise ImportFailed("\n".join(errors))

    def _unused_shares(self, has_timestamps: bool | None) -> list[str]:
        """An error for each share given for a split that does not read it."""
        errors = []
        split = self.split if self.split in SPLIT_METHODS else None
        if self.cold_item_share is not None and split != "cold_items":
            in_effect = (
                f"this import splits {split}"
                if split
                else "without --split this import splits leave_last (with timestamps) or random"
            )
            errors.append(
                f"--cold_item_share {self.cold_item_share} applies to --split cold_items "
                f"only; {in_effect}. Leave --cold_item_share out, or pass --split cold_items."
            )
        if self.eval_share is None or (split is None and has_timestamps is None):
            return errors
        if split == "leave_last" or (split is None and has_timestamps):
            in_effect = "leave_last" + ("" if split else " (the default with timestamps)")
        elif split == "cold_items" and has_timestamps:
            in_effect = "cold_items, and the rest leave_last (the interactions have timestamps)"
        else:
            return errors  # random, or cold_items on interactions without timestamps
        # Switching to random would drop the cold items asked for.
        fix = "" if split == "cold_items" else ", or pass --split random"
        errors.append(
            f"--eval_share {self.eval_share} applies to --split random (and to cold_items on "
            f"interactions without timestamps, for the items it keeps); this import splits "
            f"{in_effect}. Leave --eval_share out{fix}."
        )
        return errors


@dataclasses.dataclass
class Row:
    """One input row: its values and where it came from ("items.csv:7")."""

    values: dict[str, Any]
    where: str


@dataclasses.dataclass
class RawItem:
    """An item as read from the input, before its media are checked."""

    key: str
    text: str
    image: Path | None
    audio: Path | None
    where: str


@dataclasses.dataclass
class RawInteraction:
    """An interaction as read from the input."""

    user: str
    item: str
    label: float | None  # from a label column
    rating: float | None  # from a rating column
    timestamp: int | None
    where: str


class Problems:
    """Bad rows found in the input, each with its location, grouped by kind."""

    # Problems of one kind listed by default (the rest are counted).
    SHOWN_PER_KIND = 20

    def __init__(self):
        self.entries: list[tuple[str, str, str]] = []  # (where, kind, detail)

    def add(self, where: str, kind: str, detail: str) -> None:
        """Records one bad row: its location ("items.csv:7"), kind and what is wrong."""
        self.entries.append((where, kind, detail))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def counts(self) -> dict[str, int]:
        """How many problems of each kind."""
        return dict(collections.Counter(kind for _, kind, _ in self.entries))

    def summary(self) -> str:
        """The counts in one line, e.g. "2 bad image, 1 empty item_id"."""
        return ", ".join(f"{n} {kind}" for kind, n in self.counts().items())

    def lines(self, per_kind: int | None = SHOWN_PER_KIND) -> list[str]:
        """One "where: kind: detail" line per problem, by file and then line.

        Only the first `per_kind` problems of each kind are listed (None: all), then a line
        with the count of the others: a column that is wrong throughout (dates in another
        format, say) is one kind of problem, not a hundred thousand lines.
        """

        def position(entry: tuple[str, str, str]) -> tuple[str, int]:
            found = re.fullmatch(r"(.*?)(?::| row )(\d+)", entry[0])  # "f.csv:7", "f.parquet row 7"
            return (found[1], int(found[2])) if found else (entry[0], 0)

        entries = sorted(self.entries, key=position)  # stable: a line's problems keep order
        shown: collections.Counter = collections.Counter()
        lines = []
        for where, kind, detail in entries:
            shown[kind] += 1
            if per_kind is None or shown[kind] <= per_kind:
                lines.append(f"{where}: {kind}: {detail}")
        for kind, count in shown.items():
            if per_kind is not None and count > per_kind:
                lines.append(f"... and {count - per_kind} more {kind} (the first are above)")
        return lines


# ------------------------------------------------------------------------------ reading


def find_table(folder: Path, stem: str) -> Path:
    """FOLDER/STEM.csv, .jsonl or .parquet (exactly one of them)."""
    found = [
        folder / f"{stem}{s}" for s in TABLE_SUFFIXES[stem] if (folder / f"{stem}{s}").is_file()
    ]
    if not found:
        names = " or ".join(f"{stem}{s}" for s in TABLE_SUFFIXES[stem])
        raise ImportFailed(f"{folder} has no {names}.")
    if len(found) > 1:
        raise ImportFailed(
            f"{folder} has {' and '.join(p.name for p in found)}; keep only one of them."
        )
    return found[0]


def _cell(value: Any) -> str:
    """A cell as stripped text ("" for missing values; lists joined with ', ')."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        # An integer column with gaps comes out of pandas (Parquet, JSON Lines) as floats:
        # id 1 is 1.0 there, and must match the "1" of another file.
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value if _cell(v))
    return str(value).strip()


def read_table(path: Path, problems: Problems) -> tuple[list[str], list[Row]]:
    """Reads a CSV, JSON Lines or Parquet table into rows that know their location.

    Returns:
      (column names, rows). An empty file is recorded as a problem and gives no rows.
    """
    rows: list[Row] = []
    if path.stat().st_size == 0:
        problems.add(path.name, "empty file", "the file has no content")
        return [], rows
    try:
        columns = _read_rows(path, rows, problems)
    except UnicodeDecodeError:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:  # the offset in the whole file, not in a chunk
            line = data.count(b"\n", 0, error.start) + 1
            byte = data[error.start : error.start + 1].hex()
            raise ImportFailed(
                f"{path.name}:{line}: not UTF-8 text (byte 0x{byte} at offset {error.start} "
                "of the file). Save the file as UTF-8 (in a spreadsheet: 'CSV UTF-8'; or "
                f"`iconv -f latin1 -t utf-8 {path.name}`)."
            ) from error
        raise
    if not rows:
        problems.add(path.name, "empty file", "the file has no data rows")
    return columns, rows


def _read_rows(path: Path, rows: list[Row], problems: Problems) -> list[str]:
    """`read_table`'s reading: appends the rows of `path` and returns its column names."""
    if path.suffix == ".csv":
        csv.field_size_limit(_MAX_CELL_BYTES)
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            line = 1
            try:
                header = next(reader, None)
                if header is None:
                    problems.add(path.name, "empty file", "the file has no header")
                    return []
                columns = [c.strip() for c in header]
                line = reader.line_num + 1
                for values in reader:
                    where = f"{path.name}:{line}"
                    line = reader.line_num + 1
                    if not any(v.strip() for v in values):
                        continue
                    if any(v.strip() for v in values[len(columns) :]):
                        problems.add(
                            where,
                            "extra cells",
                            f"{len(values)} cells for {len(columns)} columns; quote cells "
                            'that contain commas ("a, b")',
                        )
                        continue
                    rows.append(Row(dict(zip(columns, values, strict=False)), where))
            except csv.Error as error:
                raise ImportFailed(
                    f"{path.name}:{line}: not valid CSV ({error}). Check the quotes there: a "
                    'quoted cell must end with a quote, and a quote inside it is written "".'
                ) from error
        return columns
    if path.suffix == ".jsonl":
        columns = []
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not JSON
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    values = json.loads(text)
                except json.JSONDecodeError as error:
                    problems.add(where, "bad JSON line", str(error))
                    continue
                if not isinstance(values, dict):
                    problems.add(where, "bad JSON line", "a line must hold one JSON object")
                    continue
                columns += [k for k in values if k not in columns]
                rows.append(Row(values, where))
        return columns
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, values in enumerate(table.to_pylist(), start=1):
        rows.append(Row(values, f"{path.name} row {number}"))
    return list(table.column_names)


def _require(path: Path, columns: Sequence[str], required: Iterable[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ImportFailed(
            f"{path.name} lacks the column(s) {', '.join(missing)} (it has "
            f"{', '.join(columns) or 'none'})."
        )


def _close_column(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate column that `name` likely misspells ("Rating", "image_path"), or None.

    Names are compared ignoring case, spaces, dashes and underscores, then by similarity.
    """
    by_plain = {_plain_column(c): c for c in candidates}
    found = difflib.get_close_matches(_plain_column(name), list(by_plain), n=1, cutoff=0.6)
    return by_plain[found[0]] if found else None


def _plain_column(column: str) -> str:
    """A column name lower-cased, without spaces, dashes and underscores."""
    return re.sub(r"[\W_]", "", column.lower())


def _label_column_meant(name: str) -> str | None:
    """ "label" or "rating" if column `name` surely stands for it, else None.

    Stricter than `_close_column`, since such a column stops an import: the name holds
    the word ("Rating", "user_rating", "labels") or misspells it ("lable", "raitng");
    merely similar names ("duration", "rank", "level") do not count.
    """
    plain = _plain_column(name)
    for known in ("label", "rating"):
        if known in plain or difflib.SequenceMatcher(None, plain, known).ratio() >= 0.8:
            return known
    return None


def _ignoring_line(
    path: Path, ignored: Sequence[str], known: str, guesses: dict[str, str], hints: Sequence[str]
) -> str:
    """The line naming the columns of `path` an import leaves out, e.g. "interactions.csv:
    ignoring column Rating (known: ...; did you mean 'rating'?)".

    Args:
      ignored: the columns left out.
      known: the columns the import reads, as the line describes them.
      guesses: for ignored columns that look like a known one the table lacks, that one.
      hints: sentences of more advice, appended to the line.
    """
    details = [f"known: {known}"]
    if len(ignored) == 1 and guesses:
        details.append(f"did you mean {guesses[ignored[0]]!r}?")
    elif guesses:
        pairs = ", ".join(f"{guess!r} for {name!r}" for name, guess in guesses.items())
        details.append(f"did you mean {pairs}?")
    names = ", ".join(c or "(unnamed)" for c in ignored)
    plural = "s" if len(ignored) > 1 else ""
    return " ".join(
        [f"{path.name}: ignoring column{plural} {names} ({'; '.join(details)}).", *hints]
    )


def _guesses(
    ignored: Sequence[str], columns: Sequence[str], known: Sequence[str]
) -> dict[str, str]:
    """For each ignored column close to a known column that `columns` lacks, that one."""
    absent = [c for c in known if c not in columns]
    found = {name: _close_column(name, absent) for name in ignored}
    return {name: guess for name, guess in found.items() if guess}


def _check_no_misspelt_label(path: Path, ignored: Sequence[str]) -> None:
    """Raises ImportFailed if interactions without a label or rating column have an
    ignored column that stands for one (`_label_column_meant`): read as written, every
    row would silently become a positive."""
    meant = {name: _label_column_meant(name) for name in ignored}
    misspelt = {name: guess for name, guess in meant.items() if guess}
    if not misspelt:
        return
    meaning = {"label": "0/1", "rating": "rating >= --positive_threshold is a positive"}
    names = ", ".join(repr(name) for name in misspelt)
    renames = "; ".join(
        f"{name!r} to {guess!r} ({meaning[guess]})" for name, guess in misspelt.items()
    )
    one = len(misspelt) == 1
    raise ImportFailed(
        f"{path.name} has no label or rating column, so every row would be a positive, but "
        f"its column{'' if one else 's'} {names} likely mean{'s' if one else ''} "
        f"{' and '.join(repr(g) for g in misspelt.values())}. Rename {renames}. If every row "
        f"really is a positive (negatives are then sampled), remove "
        f"{'that column' if one else 'those columns'} or give "
        f"{'it a name' if one else 'them names'} unlike label and rating."
    )


def _text_columns(columns: Sequence[str], wanted: Sequence[str] | None, path: Path) -> list[str]:
    if wanted:
        _require(path, columns, wanted)
        return list(wanted)
    if "text" in columns:
        return ["text"]
    return [c for c in columns if c.startswith("text_")]


def read_items(
    folder: Path, options: ImportOptions, problems: Problems, verbose: bool = True
) -> list[RawItem]:
    """The item rows of FOLDER/items.*, with media paths resolved against FOLDER.

    With `verbose`, prints the columns it leaves out (a misnamed `image` column would
    otherwise silently give items without images).
    """
    path = find_table(folder, "items")
    columns, rows = read_table(path, problems)
    if not rows:
        return []
    _require(path, columns, ["item_id"])
    text_columns = _text_columns(columns, options.text_columns, path)
    ignored = [c for c in columns if c not in ("item_id", "image", "audio", *text_columns)]
    if ignored and verbose:
        if options.text_columns:
            known = f"item_id, image, audio, and the --text_columns {', '.join(text_columns)}"
            guesses = _guesses(ignored, columns, ["item_id", "image", "audio"])
        else:
            known = "item_id, text (or text_* columns), image, audio"
            guesses = _guesses(ignored, columns, ["item_id", "text", "image", "audio"])
        unmatched = [c for c in ignored if c and c not in guesses]
        hints = []
        if unmatched:
            wanted = shlex.quote(",".join([*text_columns, *unmatched]))
            joined = "it" if len(unmatched) == 1 else "them"
            hints.append(f"Pass --text_columns {wanted} to join {joined} into the item text.")
        print(_ignoring_line(path, ignored, known, guesses, hints))
    items = []
    for row in rows:
        key = _cell(row.values.get("item_id"))
        if not key:
            problems.add(row.where, "empty item_id", "the row has no item_id")
            continue
        text = ". ".join(t for t in (_cell(row.values.get(c)) for c in text_columns) if t)
        paths = {}
        for m in ("image", "audio"):
            value = _cell(row.values.get(m))
            paths[m] = (folder / value) if value else None
        items.append(RawItem(key, text, paths["image"], paths["audio"], row.where))
    return items


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _timestamp(text: str) -> int:
    try:
        value = _number(text)
    except ValueError:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.UTC)
        return int(stamp.timestamp())
    if abs(value) >= 2**62:  # stored as int64
        raise ValueError(f"timestamp {text} is out of range")
    return int(round(value))


def read_interactions(
    folder: Path, problems: Problems, verbose: bool = True
) -> tuple[list[RawInteraction], dict]:
    """The interaction rows of FOLDER/interactions.* and which columns they had.

    With `verbose`, prints the columns it leaves out, and that a `label` column wins over
    a `rating` column.

    Raises:
      ImportFailed: the interactions lack user_id or item_id, or have neither label nor
        rating but a column that likely misspells one of them ("Rating", "labels"), which
        would otherwise make every row a positive.
    """
    path = find_table(folder, "interactions")
    columns, rows = read_table(path, problems)
    if not rows:
        return [], {}
    _require(path, columns, ["user_id", "item_id"])
    has = {c: c in columns for c in ("label", "rating", "timestamp")}
    ignored = [c for c in columns if c not in INTERACTION_COLUMNS]
    if not has["label"] and not has["rating"]:
        _check_no_misspelt_label(path, ignored)
    if ignored and verbose:
        hints = []
        if not has["label"] and not has["rating"]:
            hints.append("Without a label or rating column every row is a positive.")
        guesses = _guesses(ignored, columns, INTERACTION_COLUMNS)
        print(_ignoring_line(path, ignored, ", ".join(INTERACTION_COLUMNS), guesses, hints))
    if has["label"] and has["rating"] and verbose:
        print(
            f"{path.name}: ignoring column rating: the label column gives the labels (without "
            "it, rating >= --positive_threshold would)."
        )
    out = []
    for row in rows:
        values = {k: _cell(v) for k, v in row.values.items()}
        user, item = values.get("user_id", ""), values.get("item_id", "")
        if not user:
            problems.add(row.where, "empty user_id", "the row has no user_id")
            continue
        if not item:
            problems.add(row.where, "empty item_id", "the row has no item_id")
            continue
        label = rating = stamp = None
        if has["label"]:
            text = values.get("label", "")
            try:
                label = _number(text)
            except ValueError:
                if text.lower() in ("true", "false"):
                    label = float(text.lower() == "true")
                else:
                    problems.add(row.where, "non-numeric label", f"label {text!r} is not 0 or 1")
                    continue
            if label not in (0.0, 1.0):
                problems.add(row.where, "non-numeric label", f"label {text!r} is not 0 or 1")
                continue
        elif has["rating"]:
            text = values.get("rating", "")
            try:
                rating = _number(text)
            except ValueError:
                problems.add(row.where, "non-numeric rating", f"rating {text!r} is not a number")
                continue
        if has["timestamp"]:
            text = values.get("timestamp", "")
            try:
                stamp = _timestamp(text)
            except (ValueError, OverflowError, OSError):
                problems.add(
                    row.where,
                    "bad timestamp",
                    f"timestamp {text!r} is neither a number nor an ISO 8601 date and time",
                )
                continue
        out.append(RawInteraction(user, item, label, rating, stamp, row.where))
    return out, has


# ----------------------------------------------------------------------------- building


def _load_media(
    items: list[RawItem], options: ImportOptions, problems: Problems, verbose: bool
) -> tuple[list[bytes], list[bytes]]:
    """Each item's normalized image and audio bytes (b"" when absent or bad)."""
    images, audios = [], []
    verbose = verbose and any(i.image or i.audio for i in items)
    max_samples = int(round(options.max_audio_seconds * options.audio_sample_rate))
    start = time.perf_counter()
    if verbose:
        print(f"Checking {len(items)} items' images and audio...", flush=True)
    for done, item in enumerate(items, start=1):
        for m, path, out in (("image", item.image, images), ("audio", item.audio, audios)):
            if path is None:
                out.append(b"")
                continue
            if not path.is_file():
                state = "is a folder, not a file" if path.is_dir() else "does not exist"
                problems.add(item.where, f"missing {m} file", f"{path} {state}")
                out.append(b"")
                continue
            try:
                data = path.read_bytes()
                if m == "image":
                    out.append(media.normalize_image(data, options.max_image_side))
                else:
                    out.append(media.normalize_audio(data, options.audio_sample_rate, max_samples))
            except media.MediaError as error:
                problems.add(item.where, f"undecodable {m}", f"{path}: {error}")
                out.append(b"")
        if verbose and (done % 2000 == 0 or (done == len(items) and done >= 2000)):
            print(f"  media: {done}/{len(items)} items ({time.perf_counter() - start:.0f} s)")
    return images, audios


def _split_codes(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    method: str,
    options: ImportOptions,
    num_items: int,
    has_time: bool,
) -> np.ndarray:
    """Split code (index into builder.SPLITS) per interaction."""
    n = users.shape[0]
    rng = np.random.default_rng(options.seed)
    codes = np.zeros(n, np.int8)
    eval_share, cold_item_share = options.shares()
    if method == "cold_items":
        used = np.unique(items)
        count = max(1, int(round(cold_item_share * used.shape[0])))
        cold = np.zeros(num_items, bool)
        cold[rng.permutation(used)[:count]] = True
        codes[cold[items]] = 3
        rest = ~cold[items]
        rest_method = "leave_last" if has_time else "random"
        codes[rest] = _split_codes(
            users[rest], items[rest], times[rest], rest_method, options, num_items, has_time
        )
        return codes
    if method == "random":
        draw = rng.random(n)
        codes[draw < 2 * eval_share] = 2
        codes[draw < eval_share] = 1
        return codes
    order = np.lexsort((np.arange(n), times, users))
    sorted_users = users[order]
    # Position of each interaction counted from its user's last one (0 = last).
    ends = np.r_[np.flatnonzero(np.diff(sorted_users)), n - 1]
    counts = np.diff(np.r_[-1, ends])
    from_end = np.repeat(ends, counts) - np.arange(n)
    enough = np.repeat(counts, counts) >= 3
    sorted_codes = np.where(enough & (from_end == 0), 2, np.where(enough & (from_end == 1), 1, 0))
    codes[order] = sorted_codes
    return codes


def _chosen_of_each_pair(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """(n,) bool: the one interaction kept of each (user, item) pair.

    The last positive if the pair has one (by time, ties by position: file order, or
    `build_content`'s shuffled order), else the last.
    """
    n = users.shape[0]
    order = np.lexsort((np.arange(n), times, labels, items, users))  # by pair, label, time
    pair = users[order].astype(np.int64) * (int(items.max()) + 1) + items[order]
    last_sorted = np.r_[pair[1:] != pair[:-1], True]  # (n,) the pair's last in the order
    last = np.empty(n, bool)
    last[order] = last_sorted
    return last


def _positives(
    interactions: list[RawInteraction], columns: dict, threshold: float
) -> list[RawInteraction]:
    """The positive interactions (label 1, or rating >= threshold; all of implicit data).

    Raises:
      ImportFailed: none is positive.
    """
    if columns.get("label"):
        kept = [i for i in interactions if i.label == 1.0]
        rule = "label 1"
    elif columns.get("rating"):
        kept = [i for i in interactions if i.rating >= threshold]
        rule = f"a rating at or above --positive_threshold {threshold:g}"
    else:
        return interactions  # every row is a positive already
    if interactions and not kept:
        raise ImportFailed(
            f"No interaction has {rule}: --positives_only keeps nothing."
            + (" Lower the threshold." if columns.get("rating") else "")
        )
    return kept


def build_content(
    raw_items: list[RawItem],
    raw_interactions: list[RawInteraction],
    columns: dict,
    options: ImportOptions,
    problems: Problems,
    source: str,
    verbose: bool = True,
    shuffle_ties: bool = False,
) -> builder.DatasetContent:
    """Validates rows and media, splits, and prepares a dataset (the importers' shared path).

    Args:
      shuffle_ties: the input's order says nothing about the order of a user's
        interactions at one timestamp (MovieLens lists them by movie id): order them at
        random (seeded by `options.seed`) instead of by file order wherever time order
        decides (the kept one of a repeated pair, leave_last, histories).

    Raises:
      ImportFailed: an option is out of range, there are problems and
        `options.skip_invalid` is False, or nothing valid is left.
    """
    builder.check_name(options.name)
    has_time = bool(columns.get("timestamp"))
    options.check(has_timestamps=has_time)

    index: dict[str, int] = {}
    items: list[RawItem] = []
    for item in raw_items:
        if item.key in index:
            first = items[index[item.key]].where
            problems.add(
                item.where, "duplicate item id", f"item_id {item.key!r} already at {first}"
            )
            continue
        index[item.key] = len(items)
        items.append(item)
    images, audios = _load_media(items, options, problems, verbose)

    kept: list[RawInteraction] = []
    for inter in raw_interactions:
        if inter.item not in index:
            problems.add(
                inter.where, "unknown item", f"item_id {inter.item!r} is not in the items file"
            )
            continue
        kept.append(inter)
    if options.positives_only:
        kept = _positives(kept, columns, options.positive_threshold)

    if problems:
        if not options.skip_invalid:
            raise ImportFailed(
                "\n".join(problems.lines())
                + f"\n{len(problems.entries)} problem(s) in the input ({problems.summary()}). "
                "Fix them, or pass --skip_invalid to skip those rows (a bad image or audio "
                "file is then left out and the item keeps its other content)."
            )
        if verbose:
            for line in problems.lines():
                print(f"  skipped {line}")
            print(f"Skipped {len(problems.entries)} invalid entries: {problems.summary()}.")
    if not items:
        raise ImportFailed("No valid items: the items file is empty or every row is invalid.")
    if not kept:
        raise ImportFailed("No valid interactions: the file is empty or every row is invalid.")

    user_index: dict[str, int] = {}
    for inter in kept:
        user_index.setdefault(inter.user, len(user_index))
    users = np.array([user_index[i.user] for i in kept], np.int32)
    item_rows = np.array([index[i.item] for i in kept], np.int32)
    times = np.array(
        [i.timestamp if has_time else position for position, i in enumerate(kept)], np.int64
    )
    if columns.get("label"):
        labels, label_source = np.array([i.label for i in kept], np.float32), "the label column"
    elif columns.get("rating"):
        ratings = np.array([i.rating for i in kept], np.float32)
        labels = (ratings >= options.positive_threshold).astype(np.float32)
        label_source = f"rating >= {options.positive_threshold:g}"
    else:
        labels, label_source = np.ones(len(kept), np.float32), "implicit (every row a positive)"
    if shuffle_ties:
        # Every tie-break below is by position, so same-time interactions then come in a
        # seeded random order. Its own stream: the splits draw from `options.seed` too.
        order = np.random.default_rng([options.seed, 1]).permutation(users.shape[0])
        users, item_rows, times, labels = (a[order] for a in (users, item_rows, times, labels))
    # A positive counts over a later negative of the same pair (a click over a later
    # impression without one; a rating at or above the threshold over a later low one).
    chosen = _chosen_of_each_pair(users, item_rows, times, labels)  # (n,) bool
    repeats = int((~chosen).sum())
    if repeats:
        # A pair in two splits would put the answer to a test row into training.
        users, item_rows, times = users[chosen], item_rows[chosen], times[chosen]
        labels = labels[chosen]
        if verbose:
            print(
                f"Kept one of each user's repeated interactions with an item: {repeats} "
                "others left out, so that no (user, item) pair is in two splits."
            )
    method = options.split_method(has_time)
    if method == "leave_last" and not has_time and verbose:
        print("No timestamp column: leave_last takes each user's file order as time order.")
    codes = _split_codes(users, item_rows, times, method, options, len(items), has_time)
    in_train = np.zeros(len(items), bool)
    in_train[item_rows[codes == 0]] = True
    # Validation and test rows of items never trained on are cold-item evaluation: the
    # split whose every item is unseen, so that validation (which picks the best
    # checkpoint) and test measure the same thing.
    codes[np.isin(codes, (1, 2)) & ~in_train[item_rows]] = 3

    table = builder.ItemTable(
        keys=[i.key for i in items], texts=[i.text for i in items], images=images, audios=audios
    )
    interactions = builder.InteractionTable(
        user=users, item=item_rows, label=labels, timestamp=times, split=codes
    )
    has_audio = any(audios)
    metadata = {
        "source": source,
        "split_method": method,
        "labels": label_source,
        "positive_threshold": options.positive_threshold,
        "skipped": problems.counts(),
        "repeated_interactions_left_out": repeats,
        "max_image_side": options.max_image_side if any(images) else None,
        "audio_sample_rate": options.audio_sample_rate if has_audio else None,
        "audio_max_samples": (
            int(round(options.max_audio_seconds * options.audio_sample_rate)) if has_audio else None
        ),
        "seed": options.seed,
        "same_time_order": "seeded random" if shuffle_ties else "file order",
        # Positive interactions per split: a split of one class has no AUC.
        "split_positives": {
            split: int(labels[codes == code].sum()) for code, split in enumerate(builder.SPLITS)
        },
    }
    return builder.prepare(
        options.name, table, list(user_index), interactions, options.history_len, metadata
    )


def train_command(name: str, data_dir: str | Path, train_rows: int | None = None) -> str:
    """The command that trains on an imported dataset (with `train_rows` training
    interactions, a batch size that fits them when configs/local.py's would not), run by
    the Python that runs this (the project's environment, activated or not)."""
    command = (
        f"{_this_python()} train.py --config configs/local.py --workdir runs/{name} "
        f"--config.data.name={name} --config.data.data_dir={data_dir}"
    )
    if train_rows is not None and train_rows < 8 * _LOCAL_BATCH_SIZE:
        command += f" --config.train.batch_size={_fitting_batch_size(train_rows)}"
    return command


def _this_python() -> str:
    """This interpreter as a command line names it: relative to the working folder where it
    lies under it (`.venv/bin/python`), else its absolute path."""
    executable = Path(sys.executable or "python")
    try:
        relative = executable.relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(executable))
    # A bare name would be looked up on the PATH: "./python" names this one.
    return shlex.quote(str(relative) if relative.parent != Path(".") else f"./{relative}")


def _fitting_batch_size(train_rows: int) -> int:
    """A batch size for `train_rows` (1 or more) training interactions, at most that many.

    A multiple of 8, so that it splits evenly over 1, 2, 4 or 8 devices as training
    requires (the importer cannot know how many the training machine has), giving about
    8 batches per pass where the rows allow; with fewer than 8 rows, the largest power of
    2 that fits.
    """
    return pipeline.fitting_batch_size(train_rows, 8) or 1 << (train_rows.bit_length() - 1)


def format_summary(content: builder.DatasetContent) -> str:
    """What was built, as text."""
    meta = content.metadata
    sizes = ", ".join(f"{s} {meta['split_sizes'][s]}" for s in builder.SPLITS)
    modalities = ", ".join(f"{m} {meta['items_with'][m]}" for m in builder.MODALITIES)
    sampled = " (positives only: negatives are sampled)" if meta["positives_only"] else ""
    summary = (
        f"{meta['name']}: {meta['num_user_rows']} users, {meta['num_item_rows']} items "
        f"({meta['num_items']} in training); items with {modalities}; labels: "
        f"{meta['labels']}{sampled}; {meta['split_method']} split: {sizes}"
    )
    empty = [s for s in ("validation", "test") if meta["split_sizes"][s] == 0]
    positives = meta.get("split_positives") or {}

    def label_class(split: str) -> str | None:
        """A labelled split's one class ("only positives" or "only negatives"), or None."""
        size = meta["split_sizes"][split]
        if meta["positives_only"] or size == 0 or positives.get(split, -1) not in (0, size):
            return None
        return "only positives" if positives[split] else "only negatives"

    train_class = label_class("train")
    if train_class:
        check = (
            f"compare --positive_threshold {meta['positive_threshold']:g} with the ratings"
            if meta["labels"].startswith("rating")
            else "check the label column"
        )
        summary += (
            f"\nNote: train holds {train_class} (labels: {meta['labels']}), so the model "
            f"has nothing to tell apart and learns one answer for every item: {check}."
        )
    one_class = [s for s in ("validation", "test", "test_cold") if label_class(s)]
    if one_class:
        named = " and ".join(f"{s} ({label_class(s)})" for s in one_class)
        # Validation alone picks the best checkpoint; the leave_last advice is for the
        # splits it fills by time (test_cold holds whatever rows have unseen items).
        best = (
            "; without a validation AUC no checkpoint is marked best"
            if "validation" in one_class
            else ""
        )
        summary += (
            f"\nNote: {named} hold{'s' if len(one_class) == 1 else ''} one class of label, "
            f"for which AUC is undefined (reported as '-'{best})."
        )
        if meta["split_method"] == "leave_last" and {"validation", "test"} & set(one_class):
            summary += (
                " With leave_last, each user's last interactions form the evaluation splits; "
                "--split random mixes them."
            )
    if empty:
        summary += (
            f"\nNote: {' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty, so "
            "training reports no such metrics (the best checkpoint and early stopping need "
            "validation). leave_last needs users with at least 3 interactions; try "
            "--split random."
        )
    return summary


def write(
    content: builder.DatasetContent, output: str | Path, overwrite: bool, verbose: bool
) -> Path:
    """Writes an imported dataset and prints what was built and how to train on it."""
    target = builder.write_dataset(content, output, overwrite=overwrite)
    if verbose:
        print(f"Wrote {content.name} to {target}.")
        print(format_summary(content))
        print("Train on it with:")
        rows = content.metadata["split_sizes"]["train"]
        print(f"  {train_command(content.name, output, rows)}")
    return target


def import_folder(
    input_dir: str | Path,
    output: str | Path,
    options: ImportOptions | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Imports DIR (interactions + items files) into DATA_DIR/NAME.

    Returns:
      DATA_DIR/NAME.

    Raises:
      ImportFailed: bad input, every problem named with its file and line.
      builder.DatasetExistsError: the dataset exists and `overwrite` is False.
    """
    options = options or ImportOptions()
    folder = Path(input_dir)
    if not folder.is_dir():
        raise ImportFailed(f"--input {str(folder)!r} is not a folder.")
    builder.check_can_write(output, builder.check_name(options.name), overwrite)
    problems = Problems()
    raw_items = read_items(folder, options, problems, verbose)
    raw_interactions, columns = read_interactions(folder, problems, verbose)
    empty = [w for w, kind, _ in problems.entries if kind == "empty file"]
    if empty:
        raise ImportFailed(
            "\n".join(problems.lines()) + f"\nNothing to import from {', '.join(empty)}."
        )
    content = build_content(
        raw_items, raw_interactions, columns, options, problems, str(folder.resolve()), verbose
    )
    return write(content, output, overwrite, verbose)


def add_common_flags(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Flags shared by the local and MovieLens importers."""
    parser.add_argument("--output", required=True, help="data folder (DATA_DIR)")
    parser.add_argument("--name", default=default_name, help="dataset name (snake_case)")
    parser.add_argument(
        "--split",
        choices=SPLIT_METHODS,
        default=None,
        help="split method (default: leave_last when the interactions have timestamps, "
        "else random)",
    )
    parser.add_argument(
        "--positive_threshold", type=float, default=4.0, help="ratings >= this are positives"
    )
    parser.add_argument(
        "--positives_only",
        action="store_true",
        help="keep only the positives (label 1, rating >= --positive_threshold): training "
        "samples negatives among the items a user has no interaction with "
        "(config.data.negatives_per_positive), for full-catalogue ranking and recommending",
    )
    parser.add_argument("--skip_invalid", action="store_true", help="skip bad rows, report counts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random splits (and of MovieLens's same-second order)",
    )
    parser.add_argument(
        "--history_len", type=int, default=builder.DEFAULT_HISTORY_LEN, help="history stored"
    )
    parser.add_argument(
        "--eval_share",
        type=float,
        default=None,
        help="random split (and cold_items without timestamps, for the items it keeps): "
        f"share of the interactions for validation, and as much for test (default: "
        f"{DEFAULT_EVAL_SHARE}); an error with a split that does not use it",
    )
    parser.add_argument(
        "--cold_item_share",
        type=float,
        default=None,
        help="cold_items split: share of the items held out of training (default: "
        f"{DEFAULT_COLD_ITEM_SHARE}); an error with another split",
    )


def options_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    has_timestamps: bool | None = None,
    **more: Any,
) -> ImportOptions:
    """ImportOptions from parsed common flags (and any more fields).

    A flag outside its range, or a share given for a split that does not use it, is a
    usage error (status 2), before any input is read. `has_timestamps`: whether the
    input has timestamps, where that is known before reading it (see
    `ImportOptions.check`).
    """
    options = ImportOptions(
        name=args.name,
        split=args.split,
        positive_threshold=args.positive_threshold,
        positives_only=args.positives_only,
        skip_invalid=args.skip_invalid,
        seed=args.seed,
        history_len=args.history_len,
        eval_share=args.eval_share,
        cold_item_share=args.cold_item_share,
        **more,
    )
    try:
        options.check(has_timestamps)
    except ImportFailed as error:
        parser.error(str(error))
    return options


def main(argv: list[str] | None = None) -> None:
    """Command line: import a folder (see the module docstring); exits 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.data.local",
        formatter_class=HelpFormatter,
        description=__doc__,
    )
    parser.add_argument("--input", required=True, help="folder with interactions.* and items.*")
    add_common_flags(parser, DEFAULT_NAME)
    parser.add_argument(
        "--text_columns",
        default="",
        help='item text columns, comma-separated (default: "text", else every "text_*")',
    )
    parser.add_argument("--max_image_side", type=int, default=128, help="stored image size")
    parser.add_argument("--audio_sample_rate", type=int, default=16000, help="stored audio rate")
    parser.add_argument("--max_audio_seconds", type=float, default=10.0, help="stored audio length")
    args = parser.parse_args(argv)
    text_columns = tuple(c.strip() for c in args.text_columns.split(",") if c.strip()) or None
    options = options_from_args(
        parser,
        args,
        max_image_side=args.max_image_side,
        audio_sample_rate=args.audio_sample_rate,
        max_audio_seconds=args.max_audio_seconds,
        text_columns=text_columns,
    )
    require_writable_folder(parser, "--output", args.output)
    try:
        with exits_quietly(parser, exit_process=argv is None):
            import_folder(args.input, args.output, options, overwrite=args.overwrite)
    except (ImportFailed, builder.DatasetExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
