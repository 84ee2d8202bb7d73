"""MovieLens ratings as an mmrec dataset, through the same path as `mmrec_jax.data.local`.

    python -m mmrec_jax.data.movielens --input DIR --output DATA_DIR [--name movielens]
        [--split leave_last|random|cold_items] [--positive_threshold 4.0] [--skip_invalid]

DIR is an unpacked MovieLens release in one of two layouts:

- ml-latest-small (and the other ml-latest / ml-20m / ml-25m style releases):
  `ratings.csv` (userId, movieId, rating, timestamp), `movies.csv` (movieId, title,
  genres separated by "|"), optional `tags.csv` (userId, movieId, tag, timestamp);
- ml-100k: `u.data` (user, item, rating, timestamp, tab-separated), `u.item` (movie id |
  title | release date | video release date | IMDb URL | 19 genre flags, Latin-1), and
  `u.genre` for the genre names.

The `::`-separated `.dat` files of ml-1m and ml-10m are not read (convert them to the
first layout).

Each movie's text is "TITLE. Genres: A, B. Tags: x, y" (tags as users gave them, each
once). Ratings at or above `--positive_threshold` are positives, the others negatives.
Movies have no image or audio, so the dataset is text-only and trains with the text,
id and history towers. Bad rows are reported with their file and line exactly as the
local importer does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmrec_jax.data import builder, local

DEFAULT_NAME = "movielens"
# The columns of ratings.csv (ml-latest layout).
_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
# Tags kept per movie text (the first ones given).
MAX_TAGS = 20
# ml-100k's genres, in the order of u.item's flags (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def detect_layout(folder: Path) -> str:
    """'latest' (ratings.csv + movies.csv) or '100k' (u.data + u.item)."""
    if (folder / "ratings.csv").is_file() and (folder / "movies.csv").is_file():
        return "latest"
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        return "100k"
    raise local.ImportFailed(
        f"{folder} is not a MovieLens folder this importer reads: expected ratings.csv and "
        "movies.csv (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m layout) or u.data "
        "and u.item (ml-100k layout). The '::'-separated .dat files of ml-1m and ml-10m are "
        "not read: convert them to the CSV layout (ratings.csv: userId,movieId,rating,"
        "timestamp; movies.csv: movieId,title,genres)."
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
    try:
        time = local._timestamp(stamp)
    except (ValueError, OverflowError, OSError):
        problems.add(where, "bad timestamp", f"timestamp {stamp!r} is not a number")
        return None
    return local.RawInteraction(user, item, None, value, time, where)


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


def import_movielens(
    input_dir: str | Path,
    output: str | Path,
    options: local.ImportOptions | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Converts a MovieLens folder into DATA_DIR/NAME.

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
    layout = detect_layout(folder)
    problems = local.Problems()
    items, interactions = (read_latest if layout == "latest" else read_100k)(folder, problems)
    empty = [w for w, kind, _ in problems.entries if kind == "empty file"]
    if empty:
        raise local.ImportFailed(
            "\n".join(problems.lines()) + f"\nNothing to import from {', '.join(empty)}."
        )
    columns = {"rating": True, "timestamp": True}
    source = f"MovieLens ({'ml-latest' if layout == 'latest' else 'ml-100k'}) {folder.resolve()}"
    content = local.build_content(items, interactions, columns, options, problems, source, verbose)
    return local.write(content, output, overwrite, verbose)


def main(argv: list[str] | None = None) -> None:
    """Command line: convert a MovieLens folder (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.data.movielens",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert MovieLens into an mmrec TFDS dataset.",
    )
    parser.add_argument("--input", required=True, help="unpacked MovieLens folder")
    local.add_common_flags(parser, DEFAULT_NAME)
    args = parser.parse_args(argv)
    try:
        import_movielens(
            args.input, args.output, local.options_from_args(args), overwrite=args.overwrite
        )
    except (local.ImportFailed, builder.DatasetExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
