"""Raw-file readers for MovieLens-1M, MovieLens-100K and a generic CSV/TSV.

Every reader returns a ``RawData``: interactions in *file order* (the order is the
tie-breaker of the chronological sort, so it must survive) and an item table keyed by
the raw item id. Malformed input raises ``DataFormatError`` naming file and line:
a silently dropped or mis-parsed row would change every number downstream.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataFormatError, MissingDataError

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

ITEM_TABLE_COLUMNS = ("title", "genres", "description", "image")


@dataclass
class RawData:
    """Interactions (columns user, item: str; timestamp: int64) and items (index: raw id)."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    source_files: list[Path]


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", "|": "'|'", "::": "'::'", ";": "';'"}.get(sep, repr(sep))


def read_delimited(
    path: Path,
    sep: str,
    num_fields: int,
    *,
    encoding: str = "utf-8",
    header: bool = False,
    min_fields: int | None = None,
) -> pd.DataFrame:
    """Read a delimited text file as strings, checking the field count of every line.

    Lines with fewer than ``min_fields`` (default: ``num_fields``) or more than
    ``num_fields`` fields raise ``DataFormatError`` with the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found")
    min_fields = num_fields if min_fields is None else min_fields
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not valid {encoding} text ({exc.reason} at byte {exc.start})") from None
    first_line = 2 if header else 1
    if header:
        head, _, text = text.partition("\n")
    if not text.strip():
        raise DataFormatError(path, "file is empty (no data rows)")
    parse_sep = sep
    if len(sep) > 1:  # the C parser takes one character: map '::' to a control char
        parse_sep = "\x1f"
        text = text.replace(sep, parse_sep)
    # pandas turns extra leading fields of the *first* line into an index (or, with
    # index_col=False, drops them) instead of failing, so that line is counted here.
    first_row = text.split("\n", 1)[0].rstrip("\r")
    quoting = csv.QUOTE_NONE if sep != "," else csv.QUOTE_MINIMAL
    first_count = len(next(csv.reader([first_row], delimiter=parse_sep, quoting=quoting), []))
    if first_count > num_fields:
        raise DataFormatError(
            path, f"expected {num_fields} {_sep_name(sep)}-separated fields, found {first_count}", first_line
        )
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=parse_sep,
            header=None,
            names=list(range(num_fields)),
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            quoting=quoting,
            engine="c",
        )
    except pd.errors.ParserError as exc:
        match = re.search(r"line (\d+), saw (\d+)", str(exc))
        if match:
            line = int(match.group(1)) + first_line - 1
            raise DataFormatError(
                path, f"expected {num_fields} {_sep_name(sep)}-separated fields, found {match.group(2)}", line
            ) from None
        raise DataFormatError(path, f"cannot parse: {exc}") from None
    # Trailing blank lines are harmless; blank lines in the middle are an error.
    blank = (frame == "").all(axis=1).to_numpy()
    last = len(blank) - 1
    while last >= 0 and blank[last]:
        last -= 1
    frame = frame.iloc[: last + 1]
    blank = blank[: last + 1]
    if blank.any():
        raise DataFormatError(path, "blank line inside the data", int(np.argmax(blank)) + first_line)
    filled = (frame != "").to_numpy()
    counts = np.where(filled, np.arange(1, num_fields + 1), 0).max(axis=1)
    short = counts < min_fields
    if short.any():
        row = int(np.argmax(short))
        raise DataFormatError(
            path,
            f"expected {num_fields} {_sep_name(sep)}-separated fields, found {counts[row]}"
            + (" (wrong separator?)" if counts[row] <= 1 else ""),
            row + first_line,
        )
    frame.attrs["first_line"] = first_line
    return frame


def parse_int_column(frame: pd.DataFrame, column: int | str, path: Path, what: str) -> np.ndarray:
    """Integers of one column; the first non-integer names its line and value."""
    values = frame[column].str.strip()
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy() | (numeric.to_numpy(dtype=float, na_value=np.nan) % 1 != 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataFormatError(
            path, f"{what} must be an integer, got {values.iloc[row]!r}", row + frame.attrs.get("first_line", 1)
        )
    return numeric.to_numpy(dtype=np.int64)


def parse_timestamp_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Unix seconds, or any date pandas understands (ISO 8601 recommended)."""
    values = frame[column].str.strip()
    numeric = pd.to_numeric(values, errors="coerce")
    if not numeric.isna().any():
        return numeric.to_numpy(dtype=np.float64).astype(np.int64)
    dates = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    # Name the first value that is neither a number nor a date; only when there is none is
    # the problem a mix of the two (each alone would be fine).
    bad = (dates.isna() & numeric.isna()).to_numpy()
    problem = "timestamp must be a number or a date"
    if not bad.any():
        bad, problem = dates.isna().to_numpy(), "timestamps mix numbers and dates"
    if bad.any():
        row = int(np.argmax(bad))
        raise DataFormatError(
            path,
            f"{problem}, got {values.iloc[row]!r}",
            row + frame.attrs.get("first_line", 1),
        )
    # Seconds since the epoch whatever the datetime unit (pandas >= 3 parses to microseconds).
    return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _interactions(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"user": users.astype(str), "item": items.astype(str), "timestamp": timestamps.astype(np.int64)}
    )


def read_ml100k(data_dir: Path) -> RawData:
    """``u.data`` (tab: user item rating timestamp) + ``u.item`` ('|', ISO-8859-1)."""
    data_dir = Path(data_dir)
    ratings_path, items_path = data_dir / "u.data", data_dir / "u.item"
    ratings = read_delimited(ratings_path, "\t", 4)
    users = parse_int_column(ratings, 0, ratings_path, "user id")
    items = parse_int_column(ratings, 1, ratings_path, "item id")
    parse_int_column(ratings, 2, ratings_path, "rating")
    stamps = parse_int_column(ratings, 3, ratings_path, "timestamp")
    table = read_delimited(items_path, "|", 5 + len(ML100K_GENRES), encoding="iso-8859-1")
    ids = parse_int_column(table, 0, items_path, "item id").astype(str)
    flags = table[list(range(5, 5 + len(ML100K_GENRES)))].to_numpy() == "1"
    genres = ["|".join(g for g, on in zip(ML100K_GENRES, row) if on) for row in flags]
    item_frame = pd.DataFrame({"title": table[1].to_numpy(), "genres": genres}, index=pd.Index(ids, name="item"))
    return RawData(_interactions(users, items, stamps), item_frame, [ratings_path, items_path])


def read_ml1m(data_dir: Path) -> RawData:
    """``ratings.dat`` (UserID::MovieID::Rating::Timestamp) + ``movies.dat`` (ISO-8859-1)."""
    data_dir = Path(data_dir)
    ratings_path, movies_path = data_dir / "ratings.dat", data_dir / "movies.dat"
    ratings = read_delimited(ratings_path, "::", 4, encoding="iso-8859-1")
    users = parse_int_column(ratings, 0, ratings_path, "user id")
    items = parse_int_column(ratings, 1, ratings_path, "movie id")
    parse_int_column(ratings, 2, ratings_path, "rating")
    stamps = parse_int_column(ratings, 3, ratings_path, "timestamp")
    movies = read_delimited(movies_path, "::", 3, encoding="iso-8859-1")
    ids = parse_int_column(movies, 0, movies_path, "movie id").astype(str)
    item_frame = pd.DataFrame(
        {"title": movies[1].to_numpy(), "genres": movies[2].to_numpy()}, index=pd.Index(ids, name="item")
    )
    return RawData(_interactions(users, items, stamps), item_frame, [ratings_path, movies_path])


def _sep_for(path: Path, sep: str | None) -> str:
    if sep:
        return "\t" if sep in ("tab", "\\t") else sep
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _read_header_table(path: Path, sep: str | None, required: tuple[str, ...], optional: tuple[str, ...]):
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found")
    sep = _sep_for(path, sep)
    with path.open(encoding="utf-8-sig", errors="replace") as handle:  # -sig: tolerate a BOM
        header_line = handle.readline().rstrip("\r\n")
    if not header_line.strip():
        raise DataFormatError(path, "file is empty (expected a header row)", 1)
    header = [name.strip().lower() for name in header_line.split(sep)]
    missing = [name for name in required if name not in header]
    if missing:
        hint = "" if len(header) > 1 else f" (only one column: is the separator {_sep_name(sep)} right?)"
        raise DataFormatError(path, f"missing column(s) {', '.join(missing)} in header {header}{hint}", 1)
    frame = read_delimited(path, sep, len(header), header=True, min_fields=max(header.index(c) for c in required) + 1)
    frame.columns = header
    unknown = [c for c in header if c not in required + optional]
    return frame.drop(columns=unknown), frame.attrs["first_line"]


def read_csv_dataset(interactions_path: Path, items_path: Path | None = None, sep: str | None = None) -> RawData:
    """Generic ``user,item,timestamp[,rating]`` file with a header row (+ optional item table).

    Ids may be any strings. Without a ``timestamp`` column the file order is the time
    order. The optional item table has ``item`` plus any of title, genres, description, image.
    """
    interactions_path = Path(interactions_path)
    frame, first = _read_header_table(interactions_path, sep, ("user", "item"), ("timestamp", "rating"))
    frame.attrs["first_line"] = first
    for column in ("user", "item"):
        empty = (frame[column].str.strip() == "").to_numpy()
        if empty.any():
            raise DataFormatError(interactions_path, f"empty {column} id", int(np.argmax(empty)) + first)
    if "timestamp" in frame:
        stamps = parse_timestamp_column(frame, "timestamp", interactions_path)
    else:
        stamps = np.arange(len(frame), dtype=np.int64)
    if "rating" in frame:
        ratings = pd.to_numeric(frame["rating"].str.strip(), errors="coerce")
        if ratings.isna().any():
            row = int(np.argmax(ratings.isna().to_numpy()))
            raise DataFormatError(
                interactions_path, f"rating must be a number, got {frame['rating'].iloc[row]!r}", row + first
            )
    interactions = _interactions(frame["user"].str.strip().to_numpy(), frame["item"].str.strip().to_numpy(), stamps)
    files = [interactions_path]
    if items_path is not None:
        items_path = Path(items_path)
        table, _ = _read_header_table(items_path, sep, ("item",), ITEM_TABLE_COLUMNS)
        table["item"] = table["item"].str.strip()
        duplicated = table["item"].duplicated().to_numpy()
        if duplicated.any():
            row = int(np.argmax(duplicated))
            raise DataFormatError(items_path, f"item {table['item'].iloc[row]!r} listed twice", row + 2)
        item_frame = table.set_index("item")
        files.append(items_path)
    else:
        item_frame = pd.DataFrame(columns=["title", "genres"], index=pd.Index([], name="item"))
    return RawData(interactions, item_frame, files)
