"""``ensure_dataset``: download (file:// URLs), checksum, flat extraction, no half datasets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from feddmmr_flower.data import PrepareOptions, download, prepare_dataset
from feddmmr_flower.data import prepare as prepare_module
from feddmmr_flower.data.download import DatasetSource, ensure_dataset, file_digest
from feddmmr_flower.errors import DataFormatError, MissingDataError


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_file_digest(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # more than one read block
    assert file_digest(path) == hashlib.md5(path.read_bytes()).hexdigest()
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_and_extract_flat(tmp_path, ml100k_zip, tiny_ml100k):
    archive, md5 = ml100k_zip
    target = tmp_path / "data" / "ml-100k"
    assert ensure_dataset("ml-100k", target, url=archive.as_uri(), md5=md5) == target
    assert files_under(target) == ["README", "u.data", "u.item"]  # flat, no ml-100k/ subfolder, no temp dir
    assert (target / "u.data").read_bytes() == (tiny_ml100k / "u.data").read_bytes()
    assert (target / "u.item").read_bytes() == (tiny_ml100k / "u.item").read_bytes()


def test_md5_is_case_insensitive_and_optional_for_custom_urls(tmp_path, ml100k_zip):
    archive, md5 = ml100k_zip
    ensure_dataset("ml-100k", tmp_path / "a", url=archive.as_uri(), md5=md5.upper())
    ensure_dataset("ml-100k", tmp_path / "b", url=archive.as_uri())  # no md5 given: not checked
    assert files_under(tmp_path / "a") == files_under(tmp_path / "b") == ["README", "u.data", "u.item"]


def test_wrong_md5_leaves_nothing_behind(tmp_path, ml100k_zip):
    archive, _ = ml100k_zip
    target = tmp_path / "target"
    with pytest.raises(DataFormatError) as exc:
        ensure_dataset("ml-100k", target, url=archive.as_uri(), md5="0" * 32)
    message = str(exc.value)
    assert "checksum" in message and "0" * 32 in message and archive.as_uri() in message
    assert files_under(target) == []


def test_default_url_is_checked_against_the_published_md5(tmp_path, ml100k_zip, monkeypatch):
    """With no url argument the source's own md5 applies (here a 'GroupLens' served from disk)."""
    archive, md5 = ml100k_zip
    fake = DatasetSource(archive.as_uri(), "f" * 32, ("u.data", "u.item"))
    monkeypatch.setitem(download.SOURCES, "ml-100k", fake)
    with pytest.raises(DataFormatError, match="checksum"):
        ensure_dataset("ml-100k", tmp_path / "bad")
    monkeypatch.setitem(download.SOURCES, "ml-100k", DatasetSource(archive.as_uri(), md5, ("u.data", "u.item")))
    ensure_dataset("ml-100k", tmp_path / "good")
    assert (tmp_path / "good" / "u.data").is_file()


def test_unreachable_url(tmp_path):
    missing = tmp_path / "no-such-archive.zip"
    target = tmp_path / "target"
    with pytest.raises(MissingDataError) as exc:
        ensure_dataset("ml-100k", target, url=missing.as_uri())
    message = str(exc.value)
    assert f"could not download {missing.as_uri()}" in message
    assert "--data-dir" in message  # tells the user what to do offline
    assert files_under(target) == []


def test_existing_files_mean_no_download(tmp_path, tiny_ml100k, monkeypatch):
    def no_fetch(url, target):
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setattr(download, "fetch", no_fetch)
    before = files_under(tiny_ml100k)
    assert ensure_dataset("ml-100k", tiny_ml100k, url=(tmp_path / "missing.zip").as_uri()) == tiny_ml100k
    assert ensure_dataset("ml-100k", tiny_ml100k, download=False) == tiny_ml100k
    assert files_under(tiny_ml100k) == before


def test_partial_folder_is_completed(tmp_path, ml100k_zip):
    archive, md5 = ml100k_zip
    target = tmp_path / "target"
    target.mkdir()
    (target / "u.item").write_text("stale\n")
    ensure_dataset("ml-100k", target, url=archive.as_uri(), md5=md5)
    assert (target / "u.data").is_file() and (target / "u.item").read_text() != "stale\n"


def test_download_disabled(tmp_path):
    target = tmp_path / "ml-1m"
    with pytest.raises(MissingDataError) as exc:
        ensure_dataset("ml-1m", target, download=False)
    message = str(exc.value)
    assert str(target) in message and "ratings.dat" in message and "download disabled" in message
    assert not target.exists()


def test_unknown_dataset_has_no_source(tmp_path):
    with pytest.raises(MissingDataError, match="no download source for dataset 'csv'.*ml-100k"):
        ensure_dataset("csv", tmp_path)


def test_not_a_zip(tmp_path):
    fake = tmp_path / "ml-100k.zip"
    fake.write_text("<html>404</html>")
    target = tmp_path / "target"
    with pytest.raises(DataFormatError, match="not a zip archive"):
        ensure_dataset("ml-100k", target, url=fake.as_uri())
    assert files_under(target) == []


def test_archive_without_the_required_files(tmp_path, make_zip):
    archive, md5 = make_zip(tmp_path / "x.zip", {"ml-100k/README": b"nothing here"})
    target = tmp_path / "a"
    with pytest.raises(DataFormatError, match="archive holds no u.data"):
        ensure_dataset("ml-100k", target, url=archive.as_uri(), md5=md5)
    assert files_under(target) == []
    archive, md5 = make_zip(tmp_path / "y.zip", {"ml-100k/u.data": b"1\t1\t5\t1\n"})
    with pytest.raises(DataFormatError, match="archive lacks u.item"):
        ensure_dataset("ml-100k", tmp_path / "b", url=archive.as_uri(), md5=md5)


def test_archive_without_a_folder(tmp_path, make_zip, tiny_ml100k):
    archive, md5 = make_zip(
        tmp_path / "flat.zip",
        {
            "u.data": (tiny_ml100k / "u.data").read_bytes(),
            "u.item": (tiny_ml100k / "u.item").read_bytes(),
        },
    )
    target = tmp_path / "t"
    ensure_dataset("ml-100k", target, url=archive.as_uri(), md5=md5)
    assert files_under(target) == ["u.data", "u.item"]


def test_prepare_end_to_end_through_download(tmp_path, ml100k_zip, tiny_sequences, monkeypatch):
    archive, _ = ml100k_zip
    data_dir, cache = tmp_path / "fresh" / "ml-100k", tmp_path / "cache"
    data, folder = prepare_dataset(
        PrepareOptions("ml-100k"), data_dir, cache, download_url=archive.as_uri(), verbose=False
    )
    assert (data_dir / "u.data").is_file()
    assert {u: data.sequence(i).tolist() for i, u in enumerate(data.user_raw_ids)} == tiny_sequences
    assert data.item_titles[1] == "Toy Story (1995)"
    # second call: files present, cache hit, neither download nor build
    monkeypatch.setattr(download, "fetch", lambda *a: pytest.fail("downloaded twice"))
    monkeypatch.setattr(prepare_module, "build_sequences", lambda *a: pytest.fail("built twice"))
    again, folder2 = prepare_dataset(PrepareOptions("ml-100k"), data_dir, cache, verbose=False)
    assert folder2 == folder
    assert again.items.tolist() == data.items.tolist()


def test_prepare_ml1m_through_download(tmp_path, make_zip):
    ratings = "".join(f"{u}::{m}::4::{978300000 + 10 * u + k}\n" for u in (1, 2) for k, m in enumerate((1, 73, 260)))
    movies = "1::Toy Story (1995)::Comedy\n73::Misérables, Les (1995)::Drama\n260::Star Wars (1977)::Sci-Fi\n"
    archive, md5 = make_zip(
        tmp_path / "ml-1m.zip",
        {
            "ml-1m/ratings.dat": ratings.encode(),
            "ml-1m/movies.dat": movies.encode("iso-8859-1"),
            "ml-1m/users.dat": b"1::F::1::10::48067\n",
        },
    )
    data, _ = prepare_dataset(
        PrepareOptions("ml-1m", min_seq_len=3),
        tmp_path / "ml-1m",
        tmp_path / "cache",
        download_url=archive.as_uri(),
        verbose=False,
    )
    assert data.num_users == 2 and data.num_items == 3
    assert list(data.item_titles) == ["", "Toy Story (1995)", "Misérables, Les (1995)", "Star Wars (1977)"]
    assert (tmp_path / "ml-1m" / "users.dat").is_file()
