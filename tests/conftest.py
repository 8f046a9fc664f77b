"""Shared fixtures: tiny MovieLens-format folders written into tmp_path, and the real data."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from feddmmr_flower.data.readers import ML100K_GENRES


def shared_data_root() -> Path:
    """``../shared/data`` next to the repository, or ``$FEDDMMR_SHARED_DATA``."""
    override = os.environ.get("FEDDMMR_SHARED_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} not found (set FEDDMMR_SHARED_DATA to point at it)")
    return root


@pytest.fixture(scope="session")
def real_ml100k_dir(shared_data: Path) -> Path:
    folder = shared_data / "ml-100k"
    if not (folder / "u.data").is_file() or not (folder / "u.item").is_file():
        pytest.skip(f"{folder} lacks u.data/u.item")
    return folder


def ml100k_item_line(item: int, title: str, genres: tuple[str, ...] = ("Drama",)) -> str:
    flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
    return f"{item}|{title}|01-Jan-1995||http://example.org/{item}|{flags}"


def write_ml100k(folder: Path, ratings: list[tuple[int, int, int, int]], titles: dict[int, str] | None = None) -> Path:
    """Write ``u.data`` (user, item, rating, timestamp) and a ``u.item`` covering every item."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    items = sorted({i for _, i, _, _ in ratings} | set(titles or {}))
    titles = {i: f"Movie {i} (1995)" for i in items} | dict(titles or {})
    lines = [ml100k_item_line(i, titles[i], ("Comedy",) if i % 2 else ("Drama", "War")) for i in items]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("iso-8859-1"))
    return folder


# 4 users: 1 -> 6 ratings, 2 -> 5, 3 -> 3 (dropped at min_seq_len=5), 4 -> 5. Item 99 is rated
# only by user 3, so it must not get an id when user 3 is dropped.
TINY_RATINGS = [
    (1, 10, 5, 100),
    (1, 20, 4, 101),
    (2, 10, 3, 50),
    (1, 30, 3, 102),
    (3, 99, 1, 10),
    (2, 40, 2, 51),
    (1, 40, 5, 103),
    (2, 20, 5, 52),
    (3, 10, 4, 11),
    (1, 50, 1, 104),
    (2, 50, 4, 53),
    (1, 60, 2, 105),
    (3, 20, 5, 12),
    (2, 60, 1, 54),
    (4, 50, 5, 10),
    (4, 30, 4, 7),
    (4, 60, 1, 9),
    (4, 20, 3, 8),
    (4, 10, 2, 9),
]
# After preparing with min_seq_len=5 (raw item r -> id r // 10; user 4 has a timestamp tie
# 60@9 / 10@9 that file order breaks): users '1', '2', '4' with these sequences.
TINY_SEQUENCES = {"1": [1, 2, 3, 4, 5, 6], "2": [1, 4, 2, 5, 6], "4": [3, 2, 6, 1, 5]}


@pytest.fixture
def make_ml100k():
    """Function writing an ML-100K-format folder: ``make_ml100k(folder, ratings, titles=None)``."""
    return write_ml100k


@pytest.fixture
def tiny_ml100k(tmp_path: Path) -> Path:
    return write_ml100k(tmp_path / "ml-100k", TINY_RATINGS, {10: "Toy Story (1995)"})


def build_zip(zip_path: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    """Write a zip archive with the given members; returns (path, md5 hex digest)."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return zip_path, hashlib.md5(zip_path.read_bytes()).hexdigest()


@pytest.fixture
def make_zip():
    """Function writing a zip archive: ``make_zip(path, {member: bytes}) -> (path, md5)``."""
    return build_zip


@pytest.fixture
def tiny_sequences() -> dict[str, list[int]]:
    return {user: list(items) for user, items in TINY_SEQUENCES.items()}


@pytest.fixture
def ml100k_zip(tmp_path: Path, tiny_ml100k: Path) -> tuple[Path, str]:
    """A GroupLens-like ``ml-100k.zip`` (folder ml-100k/ with u.data, u.item, README)."""
    return build_zip(
        tmp_path / "ml-100k.zip",
        {
            "ml-100k/": b"",
            "ml-100k/u.data": (tiny_ml100k / "u.data").read_bytes(),
            "ml-100k/u.item": (tiny_ml100k / "u.item").read_bytes(),
            "ml-100k/README": b"tiny test archive\n",
        },
    )


def synthetic_ml100k(folder: Path, users: int = 20, items: int = 80, per_user: int = 25) -> Path:
    rng = np.random.default_rng(0)
    ratings = []
    for user in range(1, users + 1):
        chosen = rng.choice(np.arange(1, items + 1), per_user, replace=False)
        for step, item in enumerate(chosen):
            ratings.append((user, int(item), 4, 880000000 + 1000 * step))
    titles = {i: f"Movie number {i} (199{i % 10})" for i in range(1, items + 1)}
    return write_ml100k(folder, ratings, titles)


@pytest.fixture
def small_ml100k(tmp_path: Path) -> Path:
    """20 users x 25 ratings over 80 items: enough never-seen items for 20 evaluation negatives."""
    return synthetic_ml100k(tmp_path / "small-ml100k")


def distinct_item_data(num_users: int = 6, num_items: int = 30, seed: int = 0, min_len: int = 8, max_len: int = 14):
    """A SequenceData whose users have *distinct* items (no repeats), lengths in [min_len, max_len]."""
    from feddmmr_flower.data.sequences import SequenceData

    rng = np.random.default_rng(seed)
    seqs = [
        rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(min_len, max_len + 1)), replace=False)
        for _ in range(num_users)
    ]
    items = np.concatenate(seqs).astype(np.int32)
    ids = np.array([""] + [f"i{i}" for i in range(1, num_items + 1)])
    return SequenceData(
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
        user_raw_ids=np.array([f"u{u}" for u in range(num_users)]),
        item_raw_ids=ids,
        item_titles=ids.copy(),
        item_genres=np.array([""] * (num_items + 1)),
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids OpenMP spin contention on busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
