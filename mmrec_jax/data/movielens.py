"""MovieLens ratings as an mmrec dataset, through the same path as `mmrec_jax.data.local`.

    python -m mmrec_jax.data.movielens --input DIR --output DATA_DIR [--name movielens]
        [--split leave_last|random|cold_items] [--positive_threshold 4.0] [--positives_only]
        [--skip_invalid]

DIR is an unpacked MovieLens release in one of three layouts:

- ml-latest-small (and the other ml-latest / ml-20m / ml-25m style releases):
  `ratings.csv` (userId, movieId, rating, timestamp), `movies.csv` (movieId, title,
  genres separated by "|"), optional `tags.csv` (userId, movieId, tag, timestamp);
- ml-100k: `u.data` (user, item, rating, timestamp, tab-separated), `u.item` (movie id |
  title | release date | video release date | IMDb URL | 19 genre flags, Latin-1), and
  `u.genre` for the genre names;
- ml-1m and ml-10m (ml-10M100K): `::`-separated `.dat` files without a header:
  `ratings.dat` (UserID::MovieID::Rating::Timestamp), `movies.dat`
  (MovieID::Title::Genres, genres separated by "|") and, in ml-10m, `tags.dat`
  (UserID::MovieID::Tag::Timestamp); `users.dat` is not read. ml-1m's files are Latin-1,
  ml-10m's UTF-8, so each line is read as UTF-8, or as Latin-1 where it is not valid
  UTF-8 (Latin-1 text with accents is practically never valid UTF-8, so a file in either
  encoding, or mixing them, reads right). A title or tag is what lies between the fields
  before and after it, so one that ends or begins with ":" keeps it ("Foo:::Drama" is
  "Foo:"). A line with another number of fields (a title or tag holding "::" included),
  or with an id that is not a whole number, is a bad row.

Each movie's text is "TITLE. Genres: A, B. Tags: x, y" (tags as users gave them, each
once). Ratings at or above `--positive_threshold` are positives, the others negatives:
a model of which of the movies a user rated they liked, which ranks the whole catalogue
poorly, since it never sees a movie the user did not rate. `--positives_only` keeps the
positives only, and training samples negatives among the movies each user did not rate
(`config.data.negatives_per_positive`): a model for full-catalogue ranking and
`mmrec_jax.recommend`.
A user's ratings given in the same second are put in a seeded random order (`--seed`),
not the files' order by movie id, wherever time order decides (which rating is held out
by leave_last, which ratings are history). Movies have no image or audio, so the dataset
is text-only and trains with the text, id and history towers. Bad rows (a rating of a
movie missing from the movies file among them) are reported with their file and line
exactly as the local importer does, and `--skip_invalid` skips them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from mmrec_jax.cli import HelpFormatter, exits_quietly, require_writable_folder
from mmrec_jax.data import builder, local

DEFAULT_NAME = "movielens"
# The columns of ratings.csv (ml-latest layout).
_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
# The fields of each .dat file (ml-1m and ml-10m layout), and which one is free text.
_DAT_FIELDS = {
    "ratings.dat": (("UserID", "MovieID", "Rating", "Timestamp"), None),
    "movies.dat": (("MovieID", "Title", "Genres"), 1),
    "tags.dat": (("UserID", "MovieID", "Tag", "Timestamp"), 2),
}
# Tags kept per movie text (the first ones given).
MAX_TAGS = 20
# ml-100k's genres, in the order of u.item's flags (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def detect_layout(folder: Path) -> str:
    """'latest' (ratings.csv + movies.csv), '100k' (u.data + u.item) or 'dat' (ratings.dat
    + movies.dat)."""
    if (folder / "ratings.csv").is_file() and (folder / "movies.csv").is_file():
        return "latest"
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        return "100k"
    if (folder / "ratings.dat").is_file() and (folder / "movies.dat").is_file():
        return "dat"
    raise local.ImportFailed(
        f"{folder} is not a MovieLens folder this importer reads: expected ratings.csv and "
        "movies.csv (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m layout), u.data "
        "and u.item (ml-100k layout), or ratings.dat and movies.dat (ml-1m, ml-10m layout)."
    )


def _movie_text(title: str, genres: list[str], tags: list[str]) -> str:
    parts = [title]
    genres = [g for g in genres if g and g != "(no genres listed)"]
    if genres:
        parts.append("Genres: " + ", ".join(genres))
    if tags:
        parts.append("Tags: " + ", ".join(tags[:MAX_TAGS]))
    return ". ".join(parts)


def _csv_rows(path: Path, problems: local.Problems, required: list[str]) -> list[local.Row]:
    columns, rows = local.read_table(path, problems)
    if rows:
        local._require(path, columns, required)
    return rows


def _read_tags(folder: Path, problems: local.Problems) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    path = folder / "tags.csv"
    if not path.is_file():
        return tags
    for row in _csv_rows(path, problems, ["movieId", "tag"]):
        movie, tag = local._cell(row.values.get("movieId")), local._cell(row.values.get("tag"))
        if movie and tag and tag not in tags.setdefault(movie, []):
            tags[movie].append(tag)
    return tags


def read_latest(folder: Path, problems: local.Problems):
    """Items and interactions of an ml-latest-small style folder."""
    tags = _read_tags(folder, problems)
    items = []
    for row in _csv_rows(folder / "movies.csv", problems, ["movieId", "title", "genres"]):
        key = local._cell(row.values.get("movieId"))
        if not key:
            problems.add(row.where, "empty item_id", "the row has no movieId")
            continue
        genres = local._cell(row.values.get("genres")).split("|")
        text = _movie_text(local._cell(row.values.get("title")), genres, tags.get(key, []))
        items.append(local.RawItem(key, text, None, None, row.where))
    interactions = []
    rows = _csv_rows(folder / "ratings.csv", problems, list(_RATING_COLUMNS))
    for row in rows:
        # A short (cut) row lacks its last cells: they read as "", a named problem.
        values = {k: local._cell(row.values.get(k)) for k in _RATING_COLUMNS}
        parsed = _interaction(values["userId"], values["movieId"], values["rating"],
                              values["timestamp"], row.where, problems)  # fmt: skip
        if parsed is not None:
            interactions.append(parsed)
    return items, interactions


def _interaction(user, item, rating, stamp, where, problems) -> local.RawInteraction | None:
    if not user:
        problems.add(where, "empty user_id", "the row has no user id")
        return None
    if not item:
        problems.add(where, "empty item_id", "the row has no movie id")
        return None
    try:
        value = local._number(rating)
    except ValueError:
        problems.add(where, "non-numeric rating", f"rating {rating!r} is not a number")
        return None
    time = _time(stamp, where, problems)
    if time is None:
        return None
    return local.RawInteraction(user, item, None, value, time, where)


def _time(stamp: str, where: str, problems: local.Problems) -> int | None:
    try:
        return local._timestamp(stamp)
    except (ValueError, OverflowError, OSError):
        problems.add(where, "bad timestamp", f"timestamp {stamp!r} is not a number")
        return None


def read_100k(folder: Path, problems: local.Problems):
    """Items and interactions of an ml-100k folder."""
    genres = list(ML100K_GENRES)
    genre_file = folder / "u.genre"
    if genre_file.is_file():
        pairs = [line.split("|") for line in genre_file.read_text("latin-1").splitlines()]
        named = {int(i): name for name, i in (p for p in pairs if len(p) == 2 and p[1].isdigit())}
        genres = [named.get(i, g) for i, g in enumerate(genres)]
    items = []
    for number, line in enumerate((folder / "u.item").read_text("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        where = f"u.item:{number}"
        fields = line.split("|")
        if len(fields) < 5 + len(genres) or not fields[0].strip():
            problems.add(where, "bad row", f"expected {5 + len(genres)} '|'-separated fields")
            continue
        flags = fields[5 : 5 + len(genres)]
        names = [g for g, flag in zip(genres, flags, strict=True) if flag.strip() == "1"]
        items.append(
            local.RawItem(
                fields[0].strip(), _movie_text(fields[1].strip(), names, []), None, None, where
            )
        )
    interactions = []
    with open(folder / "u.data", encoding="latin-1") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"u.data:{number}"
            fields = line.split("\t")
            if len(fields) != 4:
                problems.add(where, "bad row", "expected 4 tab-separated fields")
                continue
            parsed = _interaction(*(x.strip() for x in fields), where, problems)
            if parsed is not None:
                interactions.append(parsed)
    return items, interactions


def _split_dat(line: str, count: int, text_at: int | None) -> list[str] | None:
    """The `count` stripped fields of a .dat line, or None if it has another number.

    The free-text field `text_at` (a title, a tag) is what lies between the fields before
    and after it, so that its own leading or trailing ":" is not taken for a separator.
    """
    if text_at is None:
        fields = line.split("::")
    else:
        head = line.split("::", text_at)
        if len(head) <= text_at:
            return None
        text, *tail = head[-1].rsplit("::", count - text_at - 1)
        if "::" in text:
            return None
        fields = [*head[:-1], text, *tail]
    return [f.strip() for f in fields] if len(fields) == count else None


def _dat_rows(path: Path, problems: local.Problems) -> Iterator[tuple[str, list[str]]]:
    """(location, fields) of each well-formed line of a .dat file; the others are problems.

    A line is decoded as UTF-8, or as Latin-1 where it is not valid UTF-8 (see the module
    docstring). A file without data lines is an "empty file" problem.
    """
    names, text_at = _DAT_FIELDS[path.name]
    empty = True
    with open(path, "rb") as f:
        for number, data in enumerate(f, 1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError:
                line = data.decode("latin-1")
            if number == 1:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            empty = False
            where = f"{path.name}:{number}"
            fields = _split_dat(line, len(names), text_at)
            if fields is None:
                problems.add(
                    where,
                    "bad row",
                    f"expected {len(names)} '::'-separated fields ({'::'.join(names)}), "
                    f"found {len(line.split('::'))}",
                )
                continue
            yield where, fields
    if empty:
        problems.add(path.name, "empty file", "the file has no data lines")


def _dat_ids(where: str, problems: local.Problems, **ids: str) -> bool:
    """Whether each id (UserID=..., MovieID=...) is a whole number; records the first that
    is not."""
    for name, value in ids.items():
        if not value:
            kind = "user_id" if name == "UserID" else "item_id"
            problems.add(where, f"empty {kind}", f"the row has no {name}")
            return False
        if not (value.isascii() and value.isdigit()):
            problems.add(where, "non-numeric id", f"{name} {value!r} is not a whole number")
            return False
    return True


def read_dat(folder: Path, problems: local.Problems):
    """Items and interactions of an ml-1m or ml-10m folder (`::`-separated .dat files)."""
    tags: dict[str, list[str]] = {}
    if (folder / "tags.dat").is_file():
        for where, (user, movie, tag, stamp) in _dat_rows(folder / "tags.dat", problems):
            if not _dat_ids(where, problems, UserID=user, MovieID=movie):
                continue
            if _time(stamp, where, problems) is None:
                continue
            if tag and tag not in tags.setdefault(movie, []):
                tags[movie].append(tag)
    items = []
    for where, (key, title, genres) in _dat_rows(folder / "movies.dat", problems):
        if _dat_ids(where, problems, MovieID=key):
            text = _movie_text(title, genres.split("|"), tags.get(key, []))
            items.append(local.RawItem(key, text, None, None, where))
    interactions = []
    for where, (user, movie, rating, stamp) in _dat_rows(folder / "ratings.dat", problems):
        if _dat_ids(where, problems, UserID=user, MovieID=movie):
            parsed = _interaction(user, movie, rating, stamp, where, problems)
            if parsed is not None:
                interactions.append(parsed)
    return items, interactions


# Each layout's reader, and the releases it stands for (in the dataset's "source").
_LAYOUTS = {
    "latest": (read_latest, "ml-latest"),
    "100k": (read_100k, "ml-100k"),
    "dat": (read_dat, "ml-1m / ml-10m"),
}


def import_movielens(
    input_dir: str | Path,
    output: str | Path,
    options: local.ImportOptions | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Converts a MovieLens folder into DATA_DIR/NAME.

    With `options.positives_only`, only the ratings at or above
    `options.positive_threshold` are kept, as positives: training then samples negatives
    among the movies a user did not rate, which full-catalogue ranking (and recommending)
    needs. Otherwise every rating is kept, labelled by the threshold: a model of which
    rated movies a user liked.

    Returns:
      DATA_DIR/NAME.

    Raises:
      local.ImportFailed: not a MovieLens folder, or bad rows (each named with its file
        and line) without `options.skip_invalid`.
    """
    options = options or local.ImportOptions(name=DEFAULT_NAME)
    folder = Path(input_dir)
    if not folder.is_dir():
        raise local.ImportFailed(f"--input {str(folder)!r} is not a folder.")
    builder.check_can_write(output, builder.check_name(options.name), overwrite)
    layout = detect_layout(folder)
    problems = local.Problems()
    read, release = _LAYOUTS[layout]
    items, interactions = read(folder, problems)
    empty = [w for w, kind, _ in problems.entries if kind == "empty file"]
    if empty:
        raise local.ImportFailed(
            "\n".join(problems.lines()) + f"\nNothing to import from {', '.join(empty)}."
        )
    columns = {"rating": True, "timestamp": True}
    source = f"MovieLens ({release}) {folder.resolve()}"
    # The files list each user's ratings by movie id, which says nothing about the order
    # of ratings given in the same second (a fifth of ml-latest-small's users end so).
    content = local.build_content(
        items, interactions, columns, options, problems, source, verbose, shuffle_ties=True
    )
    return local.write(content, output, overwrite, verbose)


def main(argv: list[str] | None = None) -> None:
    """Command line: convert a MovieLens folder (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.data.movielens",
        formatter_class=HelpFormatter,
        description=__doc__,
    )
    parser.add_argument("--input", required=True, help="unpacked MovieLens folder")
    local.add_common_flags(parser, DEFAULT_NAME)
    args = parser.parse_args(argv)
    options = local.options_from_args(parser, args, has_timestamps=True)  # every release
    require_writable_folder(parser, "--output", args.output)
    try:
        with exits_quietly(parser, exit_process=argv is None):
            import_movielens(args.input, args.output, options, overwrite=args.overwrite)
    except (local.ImportFailed, builder.DatasetExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
