"""Readers, preprocessing + cache, and the leave-one-out views (DESIGN §1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feddmmr_flower.data import DATASETS, PrepareOptions, SequenceData, build_sequences, prepare_dataset
from feddmmr_flower.data import prepare as prepare_module
from feddmmr_flower.data.prepare import cache_key
from feddmmr_flower.data.readers import RawData, read_csv_dataset, read_delimited, read_ml1m, read_ml100k
from feddmmr_flower.errors import ConfigError, DataFormatError, FedDMMRError, MissingDataError


def raw_from(rows: list[tuple[str, str, int]], items: pd.DataFrame | None = None) -> RawData:
    """RawData from (user, item, timestamp) rows in file order."""
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"timestamp": np.int64})
    if items is None:
        items = pd.DataFrame(columns=["title", "genres"], index=pd.Index([], name="item"))
    return RawData(frame, items, [Path("memory.csv")])


def user_sequences(data: SequenceData) -> dict[str, list[str]]:
    """{raw user id: [raw item ids in sequence order]}."""
    return {
        str(data.user_raw_ids[u]): [str(data.item_raw_ids[i]) for i in data.sequence(u)] for u in range(data.num_users)
    }


def assert_same_data(a: SequenceData, b: SequenceData) -> None:
    for name in ("items", "timestamps", "offsets", "user_raw_ids", "item_raw_ids", "item_titles", "item_genres"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.item_extra.keys() == b.item_extra.keys()
    for key in a.item_extra:
        np.testing.assert_array_equal(a.item_extra[key], b.item_extra[key])


def assert_error_at(exc_info, path: Path, line: int | None, *fragments: str) -> None:
    """The error names ``path`` (and ``line``) in its message and carries them as attributes."""
    err = exc_info.value
    message = str(err)
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message
        assert err.line == line
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ====================================================================== real data
@pytest.fixture(scope="module")
def prepared(real_ml100k_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_dataset(PrepareOptions("ml-100k"), real_ml100k_dir, cache, download=False, verbose=False)


class TestRealML100K:
    def test_counts(self, prepared):
        data, folder = prepared
        assert (data.num_users, data.num_items, len(data.items)) == (943, 1682, 100_000)
        assert data.stats()["min_seq_len"] == 20  # every ML-100K user has >= 20 ratings
        assert folder.name.startswith("ml-100k-")

    def test_item_ids_and_titles(self, prepared):
        data, _ = prepared
        # numeric raw ids 1..1682 map to contiguous ids in numeric order
        np.testing.assert_array_equal(data.item_raw_ids[1:], np.arange(1, 1683).astype(str))
        assert data.item_raw_ids[1] == "1"
        assert data.item_titles[1] == "Toy Story (1995)"
        assert data.item_genres[1] == "Animation|Children's|Comedy"
        np.testing.assert_array_equal(data.user_raw_ids, np.arange(1, 944).astype(str))

    def test_sequences_are_chronological(self, prepared):
        data, _ = prepared
        same_user = np.repeat(np.arange(data.num_users), data.lengths)
        step = np.diff(data.timestamps)[np.diff(same_user) == 0]
        assert (step >= 0).all()
        assert data.items.min() >= 1 and data.items.max() == data.num_items

    def test_cache_hit_on_real_data(self, prepared, real_ml100k_dir, monkeypatch):
        data, folder = prepared
        monkeypatch.setattr(prepare_module, "build_sequences", _must_not_build)
        again, folder2 = prepare_dataset(PrepareOptions("ml-100k"), real_ml100k_dir, folder.parent, download=False)
        assert folder2 == folder
        assert_same_data(data, again)


def test_real_ml1m_movies_latin1(shared_data):
    movies_dat = shared_data / "ml-1m" / "movies.dat"
    if not movies_dat.is_file():
        pytest.skip(f"{movies_dat} not found")
    table = read_delimited(movies_dat, "::", 3, encoding="iso-8859-1")
    assert len(table) == 3883
    titles = dict(zip(table[0], table[1]))
    assert titles["73"] == "Misérables, Les (1995)" and titles["1"] == "Toy Story (1995)"


# ====================================================================== ML-100K format
def test_read_ml100k_tiny(tiny_ml100k):
    raw = read_ml100k(tiny_ml100k)
    # file order survives, ids are strings, timestamps int64
    assert raw.interactions["user"].tolist()[:3] == ["1", "1", "2"]
    assert raw.interactions["item"].tolist()[:3] == ["10", "20", "10"]
    assert raw.interactions["timestamp"].dtype == np.int64
    assert len(raw.interactions) == 19
    assert raw.items.loc["10", "title"] == "Toy Story (1995)"
    assert raw.items.loc["20", "genres"] == "Drama|War"
    assert raw.items.loc["99", "genres"] == "Comedy"
    assert raw.source_files == [tiny_ml100k / "u.data", tiny_ml100k / "u.item"]


def test_prepare_tiny_ml100k(tiny_ml100k, tmp_path, tiny_sequences):
    data, _ = prepare_dataset(PrepareOptions("ml-100k"), tiny_ml100k, tmp_path / "cache", verbose=False)
    assert data.num_users == 3 and data.num_items == 6 and len(data.items) == 16
    assert list(data.user_raw_ids) == ["1", "2", "4"]
    assert list(data.item_raw_ids) == ["", "10", "20", "30", "40", "50", "60"]  # no ghost '99'
    assert {u: data.sequence(i).tolist() for i, u in enumerate(data.user_raw_ids)} == tiny_sequences
    assert data.item_titles[1] == "Toy Story (1995)" and data.item_titles[0] == ""
    assert data.items.dtype == np.int32 and data.offsets.dtype == np.int64
    # timestamps travel with their items (user '4': 30@7, 20@8, 60@9, 10@9, 50@10)
    assert data.timestamps[data.offsets[2] : data.offsets[3]].tolist() == [7, 8, 9, 9, 10]


# ====================================================================== ML-1M format
MOVIES_1M = [
    ("1", "Toy Story (1995)", "Animation|Children's|Comedy"),
    ("73", "Misérables, Les (1995)", "Drama|Musical"),
    ("260", "Star Wars: Episode IV - A New Hope (1977)", "Action|Adventure|Fantasy|Sci-Fi"),
    ("2", "Jumanji (1995)", "Adventure|Children's|Fantasy"),  # never rated: must get no id
]


def write_ml1m(folder: Path, ratings: list[tuple[int, int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    (folder / "movies.dat").write_bytes("".join(f"{m}::{t}::{g}\n" for m, t, g in MOVIES_1M).encode("iso-8859-1"))
    return folder


ML1M_RATINGS = [  # ML-1M files are grouped by user but not sorted by time
    (6, 260, 4, 978300760),
    (6, 73, 3, 978300100),
    (6, 1, 5, 978302109),
    (10, 1, 5, 978224375),
    (10, 73, 2, 978224375),
    (10, 260, 4, 978220000),
]


def test_read_ml1m_latin1_titles(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    assert "é".encode("iso-8859-1") in (folder / "movies.dat").read_bytes()  # really not UTF-8
    raw = read_ml1m(folder)
    assert raw.items.loc["73", "title"] == "Misérables, Les (1995)"
    assert raw.items.loc["260", "title"] == "Star Wars: Episode IV - A New Hope (1977)"  # ':' inside a field
    assert raw.items.loc["260", "genres"] == "Action|Adventure|Fantasy|Sci-Fi"
    assert raw.interactions.values.tolist()[0] == ["6", "260", 978300760]


def test_prepare_ml1m_sorting_and_ids(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", ML1M_RATINGS)
    data, _ = prepare_dataset(
        PrepareOptions("ml-1m", min_seq_len=3), folder, tmp_path / "cache", download=False, verbose=False
    )
    assert list(data.user_raw_ids) == ["6", "10"]  # numeric order, not '10' < '6'
    assert list(data.item_raw_ids) == ["", "1", "73", "260"]  # '2' is never rated
    assert list(data.item_titles) == [
        "",
        "Toy Story (1995)",
        "Misérables, Les (1995)",
        "Star Wars: Episode IV - A New Hope (1977)",
    ]
    assert user_sequences(data) == {"6": ["73", "260", "1"], "10": ["260", "1", "73"]}  # tie: file order
    assert data.sequence(0).tolist() == [2, 3, 1]


def test_ml1m_wrong_separator(tmp_path):
    folder = tmp_path / "ml-1m"
    write_ml1m(folder, ML1M_RATINGS)
    (folder / "ratings.dat").write_text("1::1::5::978300760\n1:2:5:978300761\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml1m(folder)
    assert_error_at(exc, folder / "ratings.dat", 2, "'::'", "found 1", "wrong separator")


# ====================================================================== generic CSV / TSV
def test_csv_with_timestamps_and_string_ids(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text(
        "user,item,timestamp,rating\n"
        "alice,tt-b,300,4\nbob,tt-a,100,5\nalice,tt-a,100,3\nalice,tt-c,200,1\nbob,tt-c,100,2\nbob,tt-b,50,2\n"
    )
    raw = read_csv_dataset(path)
    assert raw.interactions.values.tolist()[0] == ["alice", "tt-b", 300]
    assert raw.items.empty
    data = build_sequences(raw, PrepareOptions("csv", min_seq_len=3))
    assert list(data.user_raw_ids) == ["alice", "bob"]
    assert list(data.item_raw_ids) == ["", "tt-a", "tt-b", "tt-c"]  # lexicographic for string ids
    # bob: tt-b@50, then tt-a@100 and tt-c@100 in file order
    assert user_sequences(data) == {"alice": ["tt-a", "tt-c", "tt-b"], "bob": ["tt-b", "tt-a", "tt-c"]}
    assert data.timestamps.tolist() == [100, 200, 300, 50, 100, 100]
    assert (data.item_titles == "").all()


def test_csv_without_timestamp_uses_file_order(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("item,user\nz,u1\ny,u2\nx,u1\ny,u1\nz,u2\nx,u2\n")  # column order is free
    raw = read_csv_dataset(path)
    np.testing.assert_array_equal(raw.interactions["timestamp"], np.arange(6))
    data = build_sequences(raw, PrepareOptions("csv", min_seq_len=3))
    assert user_sequences(data) == {"u1": ["z", "x", "y"], "u2": ["y", "z", "x"]}


def test_tsv_by_extension_and_item_table(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("user\titem\n" + "".join(f"u\t{i}\n" for i in ("m2", "m1", "m3", "m2")))
    items = tmp_path / "items.tsv"
    items.write_text(
        "item\ttitle\tgenres\tdescription\timage\tbudget\n"
        "m1\tFirst, The\tDrama\tA film.\tposters/m1.jpg\t10\n"
        "m9\tNever rated\tHorror\t\t\t1\n"
        "m2\tSecond\tComedy|Drama\tAnother film.\t\t5\n"
    )
    raw = read_csv_dataset(path, items)
    assert raw.source_files == [path, items]
    assert "budget" not in raw.items.columns  # unknown columns are dropped
    data = build_sequences(raw, PrepareOptions("csv", min_seq_len=3))
    assert list(data.item_raw_ids) == ["", "m1", "m2", "m3"]
    assert list(data.item_titles) == ["", "First, The", "Second", ""]  # m3 not in the table: empty
    assert list(data.item_genres) == ["", "Drama", "Comedy|Drama", ""]
    assert list(data.item_extra["description"]) == ["", "A film.", "Another film.", ""]
    assert list(data.item_extra["image"]) == ["", "posters/m1.jpg", "", ""]
    assert user_sequences(data) == {"u": ["m2", "m1", "m3", "m2"]}  # repeats count


def test_csv_quoted_fields_and_bom(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_bytes('\ufeffuser,item,timestamp\n"Doe, Jane","Film, A",3\n"Doe, Jane",b,1\n'.encode("utf-8"))
    raw = read_csv_dataset(path)
    assert raw.interactions.values.tolist() == [["Doe, Jane", "Film, A", 3], ["Doe, Jane", "b", 1]]


def test_csv_iso_dates(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text(
        "user,item,timestamp\n"
        "a,x,2020-01-01T00:10:00Z\n"
        "a,y,2020-01-01T00:00:00Z\n"  # 600 s earlier: must sort first
        "a,z,2019-12-31\n"
        "a,w,2020-01-01T01:00:00+01:00\n"  # == 2020-01-01T00:00:00Z: a tie with y, after it in the file
    )
    raw = read_csv_dataset(path)
    assert raw.interactions["timestamp"].tolist() == [1577837400, 1577836800, 1577750400, 1577836800]
    data = build_sequences(raw, PrepareOptions("csv", min_seq_len=3))
    assert user_sequences(data) == {"a": ["z", "y", "w", "x"]}


def test_csv_numeric_timestamps_may_be_fractional(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item,timestamp\na,x,1.9\na,y,1.2e3\n")
    assert read_csv_dataset(path).interactions["timestamp"].tolist() == [1, 1200]


# ====================================================================== preprocessing
def test_stable_chronological_sort():
    rows = [
        ("u", "a", 5),
        ("u", "b", 3),
        ("u", "c", 3),
        ("u", "d", 1),
        ("u", "e", 3),
        ("v", "a", 2),
        ("v", "b", 2),
        ("v", "c", 2),
    ]
    data = build_sequences(raw_from(rows), PrepareOptions("csv", min_seq_len=3))
    assert user_sequences(data) == {"u": ["d", "b", "c", "e", "a"], "v": ["a", "b", "c"]}
    assert data.timestamps.tolist() == [1, 3, 3, 3, 5, 2, 2, 2]


def test_contiguous_reindexing_numeric_order():
    rows = [("10", "100", 1), ("10", "9", 2), ("10", "20", 3), ("2", "9", 1), ("2", "1000", 2), ("2", "100", 3)]
    data = build_sequences(raw_from(rows), PrepareOptions("csv", min_seq_len=3))
    assert list(data.user_raw_ids) == ["2", "10"]
    assert list(data.item_raw_ids) == ["", "9", "20", "100", "1000"]
    assert data.sequence(0).tolist() == [1, 4, 3] and data.sequence(1).tolist() == [3, 1, 2]
    assert sorted(set(data.items.tolist())) == list(range(1, data.num_items + 1))  # every id is used
    assert data.offsets.tolist() == [0, 3, 6]


def test_no_ghost_items_and_min_length_filter():
    rows = [
        ("a", "x", 1),
        ("a", "y", 2),
        ("a", "z", 3),  # len 3: kept at min 3
        ("b", "ghost", 1),
        ("b", "x", 2),  # len 2: dropped
        ("c", "y", 1),
        ("c", "x", 2),
        ("c", "y", 3),
        ("c", "z", 4),
    ]
    data = build_sequences(raw_from(rows), PrepareOptions("csv", min_seq_len=3))
    assert list(data.user_raw_ids) == ["a", "c"]
    assert "ghost" not in data.item_raw_ids
    assert data.num_items == 3
    # min_seq_len=4 keeps only c; item ids are contiguous over c's items only
    data4 = build_sequences(raw_from(rows), PrepareOptions("csv", min_seq_len=4))
    assert list(data4.user_raw_ids) == ["c"] and data4.lengths.tolist() == [4]


def test_min_length_filter_can_leave_nothing():
    with pytest.raises(DataFormatError, match=r"memory\.csv: no user has >= 5 interactions"):
        build_sequences(raw_from([("a", "x", 1), ("a", "y", 2)]), PrepareOptions("csv"))


def test_top_users_most_active_with_deterministic_ties():
    rows = (
        [("d", f"i{k}", k) for k in range(3)]
        + [("d", "only-d", 3)]
        + [("c", f"i{k}", k) for k in range(5)]
        + [("a", f"i{k}", k) for k in range(6)]
        + [("b", f"i{k}", k) for k in range(5)]
    )
    data = build_sequences(raw_from(rows), PrepareOptions("csv", top_users=2, min_seq_len=3))
    # a (6) first, then the tie c/b (5 each) goes to c, which appears first in the file
    assert list(data.user_raw_ids) == ["a", "c"]
    data3 = build_sequences(raw_from(rows), PrepareOptions("csv", top_users=3, min_seq_len=3))
    assert list(data3.user_raw_ids) == ["a", "b", "c"]
    assert "only-d" not in data3.item_raw_ids  # no ghost id for an item only a dropped user had
    assert data3.num_items == 6
    everyone = build_sequences(raw_from(rows), PrepareOptions("csv", top_users=99, min_seq_len=3))
    assert everyone.num_users == 4 and "only-d" in everyone.item_raw_ids


def test_build_is_deterministic(tiny_ml100k):
    options = PrepareOptions("ml-100k", min_seq_len=3)
    first = build_sequences(read_ml100k(tiny_ml100k), options)
    second = build_sequences(read_ml100k(tiny_ml100k), options)
    assert_same_data(first, second)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="ml-20m"), "unknown dataset 'ml-20m': choose one of ml-1m, ml-100k, csv"),
        (dict(dataset="csv", min_seq_len=2), "min_seq_len must be >= 3"),
        (dict(dataset="csv", top_users=0), "top_users must be >= 1"),
    ],
)
def test_prepare_options_validation(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        PrepareOptions(**kwargs)
    assert message in str(exc.value)
    assert isinstance(exc.value, FedDMMRError)
    assert set(DATASETS) == {"ml-1m", "ml-100k", "csv"}


# ====================================================================== cache
def _must_not_build(*args, **kwargs):
    raise AssertionError("build_sequences ran although the cache should have been used")


def test_cache_hit_and_roundtrip(tiny_ml100k, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    options = PrepareOptions("ml-100k", min_seq_len=3)
    built, folder = prepare_dataset(options, tiny_ml100k, cache, verbose=False)
    assert (folder / "sequences.npz").is_file() and (folder / "manifest.json").is_file()
    assert (
        folder.parent == cache
        and folder.name == f"ml-100k-{cache_key(options, [tiny_ml100k / 'u.data', tiny_ml100k / 'u.item'])}"
    )
    assert built.manifest["stats"] == built.stats()
    assert built.manifest["options"] == {"dataset": "ml-100k", "top_users": None, "min_seq_len": 3}
    monkeypatch.setattr(prepare_module, "build_sequences", _must_not_build)
    loaded, folder2 = prepare_dataset(options, tiny_ml100k, cache, verbose=False)
    assert folder2 == folder
    assert_same_data(built, loaded)
    assert loaded.manifest == built.manifest
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]
    assert not list(folder.glob("*.tmp"))


def test_cache_roundtrip_keeps_item_extra(tmp_path, monkeypatch):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item\n" + "".join(f"u,{i}\n" for i in "abc"))
    items = tmp_path / "items.csv"
    items.write_text("item,title,description\na,A,Alpha\nb,B,\n")
    built, folder = prepare_dataset(
        PrepareOptions("csv", min_seq_len=3), path, tmp_path / "cache", items_file=items, verbose=False
    )
    assert list(built.item_extra["description"]) == ["", "Alpha", "", ""]
    monkeypatch.setattr(prepare_module, "build_sequences", _must_not_build)
    loaded, _ = prepare_dataset(
        PrepareOptions("csv", min_seq_len=3), path, tmp_path / "cache", items_file=items, verbose=False
    )
    assert_same_data(built, loaded)


def test_cache_key_changes_with_options_and_contents(tiny_ml100k, tmp_path):
    cache = tmp_path / "cache"
    _, base = prepare_dataset(PrepareOptions("ml-100k", min_seq_len=3), tiny_ml100k, cache, verbose=False)
    _, other_len = prepare_dataset(PrepareOptions("ml-100k", min_seq_len=5), tiny_ml100k, cache, verbose=False)
    _, other_top = prepare_dataset(
        PrepareOptions("ml-100k", min_seq_len=3, top_users=2), tiny_ml100k, cache, verbose=False
    )
    assert len({base, other_len, other_top}) == 3
    # same options, one rating changed -> new key and new contents
    u_data = tiny_ml100k / "u.data"
    u_data.write_text(u_data.read_text().replace("1\t10\t5\t100", "1\t10\t4\t100"))
    data, changed = prepare_dataset(PrepareOptions("ml-100k", min_seq_len=3), tiny_ml100k, cache, verbose=False)
    assert changed != base
    # an added interaction must show up (not a stale cache)
    with u_data.open("a") as handle:
        handle.write("1\t99\t5\t200\n")
    data2, changed2 = prepare_dataset(PrepareOptions("ml-100k", min_seq_len=3), tiny_ml100k, cache, verbose=False)
    assert changed2 not in (base, changed) and len(data2.items) == len(data.items) + 1
    # the key depends on contents, not on where the files are
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("u.data", "u.item"):
        (moved / name).write_bytes((tiny_ml100k / name).read_bytes())
    assert (
        cache_key(PrepareOptions("ml-100k", min_seq_len=3), [moved / "u.data", moved / "u.item"])
        == changed2.name.split("-")[-1]
    )


def test_csv_cache_key_includes_item_table(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item\n" + "".join(f"u,{i}\n" for i in "abc"))
    items = tmp_path / "items.csv"
    items.write_text("item,title\na,A\n")
    cache = tmp_path / "cache"
    options = PrepareOptions("csv", min_seq_len=3)
    _, without = prepare_dataset(options, path, cache, verbose=False)
    first, with_items = prepare_dataset(options, path, cache, items_file=items, verbose=False)
    items.write_text("item,title\na,Renamed\n")
    second, renamed = prepare_dataset(options, path, cache, items_file=items, verbose=False)
    assert len({without, with_items, renamed}) == 3
    assert first.item_titles[1] == "A" and second.item_titles[1] == "Renamed"
    # a folder holding interactions.csv works like the file itself
    _, via_folder = prepare_dataset(options, tmp_path, cache, verbose=False)
    assert via_folder == without


def test_load_rejects_a_non_dataset_folder(tmp_path):
    with pytest.raises(DataFormatError, match="not a prepared dataset folder"):
        SequenceData.load(tmp_path)


# ====================================================================== leave-one-out views
@pytest.fixture
def loo() -> SequenceData:
    """user 0: 1..8 (8 items), user 1: [9, 3, 10] (the minimum length 3), user 2: [4, 2, 6, 1, 5]."""
    sequences = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 3, 10], [4, 2, 6, 1, 5]]
    items = np.concatenate(sequences).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    names = np.array([""] + [f"i{k}" for k in range(1, 11)])
    return SequenceData(
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        offsets=offsets,
        user_raw_ids=np.array(["a", "b", "c"]),
        item_raw_ids=names,
        item_titles=names,
        item_genres=np.full(11, ""),
    )


def test_input_windows(loo):
    users = np.array([0, 1, 2])
    np.testing.assert_array_equal(loo.input_window(users, "test", 4), [[4, 5, 6, 7], [0, 0, 9, 3], [4, 2, 6, 1]])
    np.testing.assert_array_equal(loo.input_window(users, "valid", 4), [[3, 4, 5, 6], [0, 0, 0, 9], [0, 4, 2, 6]])
    np.testing.assert_array_equal(loo.input_window(users, "train", 4), [[2, 3, 4, 5], [0, 0, 0, 0], [0, 0, 4, 2]])
    np.testing.assert_array_equal(loo.input_window([0], "train", 8), [[0, 0, 0, 1, 2, 3, 4, 5]])
    assert loo.input_window(users, "test", 4).dtype == np.int64
    # a different batch composition gives the same rows
    np.testing.assert_array_equal(loo.input_window([2, 0], "valid", 4), [[0, 4, 2, 6], [3, 4, 5, 6]])


def test_train_targets_are_next_items(loo):
    users = np.array([0, 1, 2])
    for maxlen in (3, 4, 10):
        inputs = loo.input_window(users, "train", maxlen)
        targets = loo.train_targets(users, maxlen)
        assert inputs.shape == targets.shape == (3, maxlen)
        np.testing.assert_array_equal(inputs == 0, targets == 0)  # same padding
        for row, user in enumerate(users):
            seq = loo.sequence(user).tolist()
            for t in range(maxlen):
                if inputs[row, t]:
                    pos = seq.index(inputs[row, t])
                    assert targets[row, t] == seq[pos + 1]  # target at t = input at t+1
            if maxlen > 1:
                shifted = inputs[row, :-1] != 0
                np.testing.assert_array_equal(targets[row, :-1][shifted], inputs[row, 1:][shifted])
    np.testing.assert_array_equal(loo.train_targets(users, 4), [[3, 4, 5, 6], [0, 0, 0, 0], [0, 0, 2, 6]])
    # neither held-out item is ever a training target
    assert 7 not in loo.train_targets([0], 20) and 8 not in loo.train_targets([0], 20)
    assert loo.train_lengths().tolist() == [6, 1, 3]


def test_train_target_positions_match_train_targets(loo):
    users = np.array([0, 1, 2])
    for maxlen in (2, 4, 10):
        positions = loo.train_target_positions(users, maxlen)
        targets = loo.train_targets(users, maxlen)
        np.testing.assert_array_equal(positions == -1, targets == 0)
        for row, user in enumerate(users):
            seq = loo.sequence(user)
            np.testing.assert_array_equal(seq[positions[row][positions[row] >= 0]], targets[row][targets[row] > 0])
    np.testing.assert_array_equal(loo.train_target_positions([0], 4), [[2, 3, 4, 5]])


def test_targets(loo):
    np.testing.assert_array_equal(loo.target([0, 1, 2], "valid"), [7, 3, 1])
    np.testing.assert_array_equal(loo.target([0, 1, 2], "test"), [8, 10, 5])
    with pytest.raises(ValueError, match="'valid' or 'test'"):
        loo.target([0], "train")


def test_history_masks(loo):
    train = loo.history_mask([0, 2], "train")
    full = loo.history_mask([0, 2], "all")
    assert train.shape == full.shape == (2, 11)
    assert np.flatnonzero(train[0]).tolist() == [0, 1, 2, 3, 4, 5, 6]  # 0 = padding, never a candidate
    assert np.flatnonzero(full[0]).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert np.flatnonzero(train[1]).tolist() == [0, 2, 4, 6]  # [4, 2, 6] without held-out 1 and 5
    assert np.flatnonzero(full[1]).tolist() == [0, 1, 2, 4, 5, 6]
    assert np.flatnonzero(loo.history_mask([1], "train")[0]).tolist() == [0, 9]


def test_user_index_out_of_range(loo):
    with pytest.raises(IndexError, match=r"user index 3 out of range \[0, 3\)"):
        loo.input_window([0, 3], "test", 4)
    with pytest.raises(IndexError):
        loo.target([-1], "test")


# ====================================================================== bad input
def test_comma_separated_u_data(tmp_path, make_ml100k):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5)
    (folder / "u.data").write_text("1,1,5,10\n1,2,5,11\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", 1, "expected 4 tab-separated fields, found 1", "wrong separator")


def test_non_numeric_id(tmp_path, make_ml100k):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5)
    (folder / "u.data").write_text("1\t1\t5\t10\n1\t2\t5\t11\n1\tx42\t5\t12\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", 3, "item id must be an integer", "'x42'")
    (folder / "u.data").write_text("1\t1\t5\t10\nbob\t2\t5\t11\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", 2, "user id", "'bob'")
    (folder / "u.data").write_text("1\t1\t5\t10\n2\t2\t5\t1.5e\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", 2, "timestamp", "'1.5e'")


@pytest.mark.parametrize(
    "text, line, found",
    [
        ("1\t1\t5\t10\n1\t2\t5\t11\t7\n1\t3\t5\t12\n", 2, 5),
        ("1\t1\t5\t10\t7\n1\t2\t5\t11\n", 1, 5),  # the first line: pandas would make it an index
        ("1\t1\t5\t10\t7\n1\t2\t5\t11\t7\n", 1, 5),  # ...and would silently shift every column
        ("1\t1\t5\t10\n1\t2\t5\t11\t\n", 2, 5),  # a trailing tab is an extra (empty) field
        ("1\t1\t5\t10\n1\t2\t5\n", 2, 3),  # too few
    ],
)
def test_wrong_field_count(tmp_path, make_ml100k, text, line, found):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5)
    (folder / "u.data").write_text(text)
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", line, f"expected 4 tab-separated fields, found {found}")


def test_too_many_fields_in_csv(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item,timestamp\na,x,1\na,y,2,9\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path)
    assert_error_at(exc, path, 3, "expected 3 comma-separated fields, found 4")


def test_empty_files(tmp_path, make_ml100k):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5)
    (folder / "u.data").write_text("")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", None, "empty")
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text("")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(csv_path)
    assert_error_at(exc, csv_path, 1, "empty")


def test_blank_line_in_the_middle(tmp_path, make_ml100k):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5)
    (folder / "u.data").write_text("1\t1\t5\t10\n1\t2\t5\t11\n\n1\t3\t5\t12\n\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", 3, "blank line")
    # trailing blank lines are fine
    (folder / "u.data").write_text("1\t1\t5\t10\n1\t2\t5\t11\n\n\n")
    assert len(read_ml100k(folder).interactions) == 2
    path = tmp_path / "interactions.csv"
    path.write_text("user,item\na,x\n\na,y\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path)
    assert_error_at(exc, path, 3, "blank line")


def test_csv_missing_column(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,movie,timestamp\na,x,1\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path)
    assert_error_at(exc, path, 1, "missing column(s) item")
    tsv = tmp_path / "interactions.tsv"
    tsv.write_text("user,item\na,x\n")  # commas in a .tsv
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(tsv)
    assert_error_at(exc, tsv, 1, "user, item", "separator")
    items = tmp_path / "items.csv"
    items.write_text("id,title\na,A\n")
    path.write_text("user,item\na,x\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path, items)
    assert_error_at(exc, items, 1, "missing column(s) item")


def test_csv_only_header(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item,timestamp\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path)
    assert_error_at(exc, path, None, "no data rows")


@pytest.mark.parametrize(
    "body, line, fragment",
    [
        ("a,x,1\na,y,last tuesday\n", 3, "'last tuesday'"),
        ("a,x,2020-01-01\na,y,last tuesday\n", 3, "'last tuesday'"),
        ("a,x,10\na,y,2020-01-01\n", 2, "timestamps mix numbers and dates, got '10'"),
        ("a,x,1\n,y,2\n", 3, "empty user id"),
        ("a,x,1,5\na,y,2,five\n", 3, "rating must be a number, got 'five'"),
    ],
)
def test_csv_bad_values(tmp_path, body, line, fragment):
    path = tmp_path / "interactions.csv"
    header = "user,item,timestamp,rating\n" if body.count(",") > 5 else "user,item,timestamp\n"
    path.write_text(header + body)
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path)
    assert_error_at(exc, path, line, fragment)


def test_csv_duplicate_item_in_table(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("user,item\na,x\n")
    items = tmp_path / "items.csv"
    items.write_text("item,title\nx,X\ny,Y\nx,X again\n")
    with pytest.raises(DataFormatError) as exc:
        read_csv_dataset(path, items)
    assert_error_at(exc, items, 4, "'x' listed twice")


def test_u_item_not_latin1_is_fine_but_u_data_utf8_error_is_named(tmp_path, make_ml100k):
    folder = make_ml100k(tmp_path / "d", [(1, 1, 5, 10)] * 5, {1: "Misérables, Les (1995)"})
    assert read_ml100k(folder).items.loc["1", "title"] == "Misérables, Les (1995)"
    (folder / "u.data").write_bytes(b"1\t1\t5\t10\n1\t\xe9\t5\t11\n")
    with pytest.raises(DataFormatError) as exc:
        read_ml100k(folder)
    assert_error_at(exc, folder / "u.data", None, "not valid utf-8")


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as exc:
        PrepareOptions("movielens")
    assert "ml-1m" in str(exc.value) and "ml-100k" in str(exc.value) and "csv" in str(exc.value)


def test_missing_folder_with_download_disabled(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError) as exc:
        prepare_dataset(PrepareOptions("ml-100k"), missing, tmp_path / "cache", download=False)
    assert str(missing) in str(exc.value) and "u.data" in str(exc.value) and "download disabled" in str(exc.value)
    assert not missing.exists()
    with pytest.raises(MissingDataError) as exc:
        prepare_dataset(PrepareOptions("csv"), missing, tmp_path / "cache", download=False)
    assert str(missing) in str(exc.value) and "interactions.csv" in str(exc.value)
    with pytest.raises(MissingDataError) as exc:
        read_csv_dataset(missing / "x.csv")
    assert str(missing / "x.csv") in str(exc.value)
