"""Deterministic preprocessing (DESIGN §1) and the cache keyed by a hash of inputs + options.

raw interactions ──(top-N users, min length, stable chronological sort, contiguous ids)──▶ SequenceData
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, DataFormatError
from .download import ensure_dataset, file_digest
from .sequences import SequenceData

if TYPE_CHECKING:  # pandas (and the readers) load only when raw files are parsed: a federated
    from .readers import RawData  # client reading the prepared cache never pays their import

DATASETS = ("ml-1m", "ml-100k", "csv")
FORMAT_VERSION = 1  # bump when the preprocessing changes: old caches stop matching


@dataclass(frozen=True)
class PrepareOptions:
    dataset: str
    top_users: int | None = None
    min_seq_len: int = 5

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.top_users is not None and self.top_users < 1:
            raise ConfigError(f"top_users must be >= 1, got {self.top_users}")
        if self.min_seq_len < 3:
            raise ConfigError(
                f"min_seq_len must be >= 3 (train, valid and test need one item each), got {self.min_seq_len}"
            )


def _id_order(raw_ids: np.ndarray) -> np.ndarray:
    """Sort key for raw ids: numeric order when every id is an integer, else lexicographic."""
    import pandas as pd

    numeric = pd.to_numeric(pd.Series(raw_ids), errors="coerce")
    if not numeric.isna().any():
        return np.argsort(numeric.to_numpy(), kind="stable")
    return np.argsort(raw_ids.astype(str), kind="stable")


def build_sequences(raw: RawData, options: PrepareOptions) -> SequenceData:
    """Filter, sort and re-index ``raw`` into a ``SequenceData`` (pure function of its inputs)."""
    import pandas as pd

    frame = raw.interactions
    if frame.empty:
        raise DataFormatError(raw.source_files[0], "no interactions")
    users = frame["user"].to_numpy(dtype=str)
    user_codes, user_uniques = pd.factorize(users, sort=False)
    counts = np.bincount(user_codes)
    keep_user = counts >= options.min_seq_len
    if options.top_users is not None:
        # Most active first; ties broken by first appearance in the file (deterministic).
        ranking = np.lexsort((np.arange(len(counts)), -counts))
        top = np.zeros(len(counts), dtype=bool)
        top[ranking[: options.top_users]] = True
        keep_user &= top
    rows = keep_user[user_codes]
    if not rows.any():
        raise DataFormatError(raw.source_files[0], f"no user has >= {options.min_seq_len} interactions")
    user_codes = user_codes[rows]
    items = frame["item"].to_numpy(dtype=str)[rows]
    stamps = frame["timestamp"].to_numpy(dtype=np.int64)[rows]
    file_order = np.flatnonzero(rows)

    # Contiguous ids ordered by raw id; only items that occur get one (no ghost ids).
    kept_users = user_uniques[np.flatnonzero(keep_user)]
    user_rank = np.empty(len(kept_users), dtype=np.int64)
    user_rank[_id_order(np.asarray(kept_users))] = np.arange(len(kept_users))
    old_to_new_user = np.full(len(user_uniques), -1, dtype=np.int64)
    old_to_new_user[np.flatnonzero(keep_user)] = user_rank
    user_index = old_to_new_user[user_codes]
    user_raw_ids = np.empty(len(kept_users), dtype=object)
    user_raw_ids[user_rank] = kept_users

    item_codes, item_uniques = pd.factorize(items, sort=False)
    item_rank = np.empty(len(item_uniques), dtype=np.int64)
    item_rank[_id_order(np.asarray(item_uniques))] = np.arange(1, len(item_uniques) + 1)
    item_index = item_rank[item_codes]
    item_raw_ids = np.empty(len(item_uniques) + 1, dtype=object)
    item_raw_ids[0] = ""
    item_raw_ids[item_rank] = item_uniques

    # Stable chronological order per user: (user, timestamp, file order).
    order = np.lexsort((file_order, stamps, user_index))
    seq_items = item_index[order].astype(np.int32)
    seq_stamps = stamps[order]
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_index, minlength=len(kept_users)), out=offsets[1:])

    table = raw.items

    def column(name: str) -> np.ndarray:
        values = np.full(len(item_raw_ids), "", dtype=object)
        if name in table.columns:
            looked_up = table[name].reindex(item_raw_ids[1:].astype(str))
            values[1:] = looked_up.fillna("").astype(str).to_numpy()
        return values.astype(str)

    extra = {name: column(name) for name in ("description", "image") if name in table.columns}
    return SequenceData(
        items=seq_items,
        timestamps=seq_stamps,
        offsets=offsets,
        user_raw_ids=user_raw_ids.astype(str),
        item_raw_ids=item_raw_ids.astype(str),
        item_titles=column("title"),
        item_genres=column("genres"),
        item_extra=extra,
    )


def read_raw(
    options: PrepareOptions,
    data_dir: Path,
    *,
    items_file: Path | None = None,
    download_url: str | None = None,
    download: bool = True,
) -> RawData:
    from .readers import read_csv_dataset, read_ml1m, read_ml100k

    data_dir = Path(data_dir)
    if options.dataset == "ml-100k":
        return read_ml100k(ensure_dataset("ml-100k", data_dir, url=download_url, download=download))
    if options.dataset == "ml-1m":
        return read_ml1m(ensure_dataset("ml-1m", data_dir, url=download_url, download=download))
    interactions = data_dir if data_dir.is_file() else _find_csv(data_dir)
    return read_csv_dataset(interactions, items_file)


def _find_csv(folder: Path) -> Path:
    for name in ("interactions.csv", "interactions.tsv"):
        if (folder / name).is_file():
            return folder / name
    from ..errors import MissingDataError

    raise MissingDataError(f"{folder}: no interactions.csv or interactions.tsv (or pass the file itself as --data-dir)")


def cache_key(options: PrepareOptions, source_files: list[Path]) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "options": asdict(options),
        "files": [(Path(f).name, file_digest(f, "sha256")) for f in source_files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _source_files(options: PrepareOptions, data_dir: Path, items_file: Path | None) -> list[Path] | None:
    """The raw files the cache key depends on, or None when they are not all on disk yet."""
    data_dir = Path(data_dir)
    if options.dataset == "ml-100k":
        files = [data_dir / "u.data", data_dir / "u.item"]
    elif options.dataset == "ml-1m":
        files = [data_dir / "ratings.dat", data_dir / "movies.dat"]
    else:
        try:
            files = [data_dir if data_dir.is_file() else _find_csv(data_dir)]
        except FileNotFoundError:
            return None
        if items_file is not None:
            files.append(Path(items_file))
    return files if all(f.is_file() for f in files) else None


def prepare_dataset(
    options: PrepareOptions,
    data_dir: Path,
    cache_dir: Path,
    *,
    items_file: Path | None = None,
    download_url: str | None = None,
    download: bool = True,
    verbose: bool = True,
) -> tuple[SequenceData, Path]:
    """Load the prepared dataset from the cache, building (and downloading) it if needed."""
    files = _source_files(options, data_dir, items_file)
    if files is not None:
        key = cache_key(options, files)
        folder = Path(cache_dir) / f"{options.dataset}-{key}"
        if (folder / "sequences.npz").is_file() and (folder / "manifest.json").is_file():
            return SequenceData.load(folder), folder
    raw = read_raw(options, data_dir, items_file=items_file, download_url=download_url, download=download)
    key = cache_key(options, raw.source_files)
    folder = Path(cache_dir) / f"{options.dataset}-{key}"
    data = build_sequences(raw, options)
    data.manifest = {
        "format": FORMAT_VERSION,
        "cache_key": key,
        "options": asdict(options),
        "source_files": [str(Path(f).resolve()) for f in raw.source_files],
        "stats": data.stats(),
    }
    data.save(folder)
    if verbose:
        print(f"[feddmmr] prepared {options.dataset} -> {folder}", file=sys.stderr)
    return data, folder
