"""Fetch MovieLens archives from GroupLens (or any URL, ``file://`` included) with a checksum.

Files already present are used as they are; a download is verified before it is unpacked,
and unpacking goes through a temporary folder so a broken archive never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataFormatError, MissingDataError


@dataclass(frozen=True)
class DatasetSource:
    url: str
    md5: str | None
    required_files: tuple[str, ...]


# Checksums as published by GroupLens next to each archive (<archive>.md5).
SOURCES: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        ("u.data", "u.item"),
    ),
    "ml-1m": DatasetSource(
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
        ("ratings.dat", "movies.dat"),
    ),
}


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, target: Path) -> None:
    """Copy ``url`` to ``target``, showing progress for long downloads."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                if total and sys.stderr.isatty():
                    print(f"\r  {done / 2**20:.1f}/{total / 2**20:.1f} MiB", end="", file=sys.stderr)
            if total and sys.stderr.isatty():
                print(file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MissingDataError(
            f"could not download {url}: {reason}. Without internet access, download the archive "
            f"elsewhere and pass its folder as --data-dir (or its location as --download-url file://...)."
        ) from None


def ensure_dataset(
    name: str, data_dir: Path, *, url: str | None = None, md5: str | None = None, download: bool = True
) -> Path:
    """Return ``data_dir`` holding the dataset's files, downloading them when missing.

    The default GroupLens URL is checked against the published md5; a custom ``url``
    is checked only when ``md5`` is given.
    """
    if name not in SOURCES:
        raise MissingDataError(f"no download source for dataset {name!r} (known: {', '.join(SOURCES)})")
    source = SOURCES[name]
    data_dir = Path(data_dir)
    missing = [f for f in source.required_files if not (data_dir / f).is_file()]
    if not missing:
        return data_dir
    if not download:
        raise MissingDataError(f"{data_dir}: missing {', '.join(missing)} for {name} (download disabled)")
    url = url or source.url
    expected = md5 if md5 is not None else (source.md5 if url == source.url else None)
    print(f"[feddmmr] {data_dir} lacks {', '.join(missing)}: downloading {url}", file=sys.stderr)
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            fetch(url, archive)
        except MissingDataError as exc:  # say which folder lacked the files, not only the URL
            raise MissingDataError(f"{data_dir} lacks {', '.join(missing)} for {name}, and {exc}") from None
        if expected is not None:
            actual = file_digest(archive, "md5")
            if actual != expected.lower():
                raise DataFormatError(url, f"md5 checksum mismatch: expected {expected}, got {actual}")
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = [
                    m
                    for m in zipped.namelist()
                    if Path(m).name in source.required_files or Path(m).parent.name == name or "/" not in m.rstrip("/")
                ]
                zipped.extractall(Path(tmp) / "unpacked", members)
        except zipfile.BadZipFile:
            raise DataFormatError(url, "not a zip archive") from None
        unpacked = Path(tmp) / "unpacked"
        roots = [p.parent for p in unpacked.rglob(source.required_files[0])]
        if not roots:
            raise DataFormatError(url, f"archive holds no {source.required_files[0]}")
        for item in roots[0].iterdir():
            if item.is_file():
                shutil.move(str(item), data_dir / item.name)
    still_missing = [f for f in source.required_files if not (data_dir / f).is_file()]
    if still_missing:
        raise DataFormatError(url, f"archive lacks {', '.join(still_missing)}")
    return data_dir
