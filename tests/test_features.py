"""Item features: texts and their fallbacks, real offline SBERT, random-init CLIP, the table file, the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from feddmmr_flower.data import PrepareOptions, SequenceData, prepare_dataset
from feddmmr_flower.errors import ConfigError, FeatureError, MissingDataError
from feddmmr_flower.features import (
    COMPUTE_COUNT,
    RANDOM_INIT,
    FeatureTable,
    compute_item_features,
    compute_or_load_features,
    encode_images,
    encode_texts,
    features_summary,
    item_texts,
    load_descriptions,
    poster_paths,
)
from feddmmr_flower.features.text import title_genre_text

SHARED_DATA = Path(os.environ.get("FEDDMMR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

TITLES = ["Toy Story (1995)", "Aladdin (1992)", "Platoon (1986)", "Heat (1995)", "", "Fargo (1996)"]
GENRES = [
    "Animation|Children's|Comedy",
    "Animation|Children's|Comedy|Musical",
    "Drama|War",
    "Action|Crime|Thriller",
    "",
    "Crime|Drama|Thriller",
]
RAW_IDS = ["1", "95", "1090", "6", "x5", "608"]


def tiny_data(extra: dict[str, list[str]] | None = None, titles=TITLES, genres=GENRES) -> SequenceData:
    """Two users over six items; item 5 has no title, genres or description."""
    items = np.array([1, 2, 3, 4, 5, 6, 1, 3, 5], dtype=np.int32)
    return SequenceData(
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        offsets=np.array([0, 5, 9]),
        user_raw_ids=np.array(["u1", "u2"]),
        item_raw_ids=np.array([""] + RAW_IDS),
        item_titles=np.array([""] + list(titles)),
        item_genres=np.array([""] + list(genres)),
        manifest={"cache_key": "tiny0001", "options": {"dataset": "csv"}},
        item_extra={k: np.array([""] + v) for k, v in (extra or {}).items()},
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------ text


def test_item_texts_precedence_and_mask():
    data = tiny_data(extra={"description": ["", "", "", "A heist film in Los Angeles.", "", ""]})
    texts, mask = item_texts(data, {"95": "  A street urchin finds a magic lamp.  ", "1090": ""})
    assert texts[0] == "" and not mask[0]
    assert texts[1] == "Toy Story (1995) — Animation, Children's, Comedy"  # no description: title — genres
    assert texts[2] == "A street urchin finds a magic lamp."  # description file, keyed by raw id
    assert texts[3] == "Platoon (1986) — Drama, War"  # empty description falls through
    assert texts[4] == "A heist film in Los Angeles."  # item table column
    assert texts[5] == "" and not mask[5]  # nothing at all: mask 0
    assert mask.tolist() == [False, True, True, True, True, False, True]
    assert title_genre_text("Heat (1995) ", "") == "Heat (1995)"
    assert title_genre_text("", "Drama|War") == "Drama, War"


def test_load_descriptions_validates(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"1": "a toy film", "2": "a spy film"}))
    assert load_descriptions(good) == {"1": "a toy film", "2": "a spy film"}
    cases = {"list.json": json.dumps(["a"]), "value.json": json.dumps({"1": 3}), "broken.json": '{"1": "a",'}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(FeatureError, match=name):
            load_descriptions(tmp_path / name)
    with pytest.raises(FeatureError, match="item '1'"):
        load_descriptions(tmp_path / "value.json")
    with pytest.raises(MissingDataError, match="absent.json"):
        load_descriptions(tmp_path / "absent.json")


def test_sbert_puts_the_two_animated_films_together():
    texts, mask = item_texts(tiny_data())
    vectors = encode_texts([texts[i] for i in np.flatnonzero(mask)])
    assert vectors.dtype == np.float32 and vectors.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    toy, aladdin, platoon = vectors[0], vectors[1], vectors[2]
    assert cosine(toy, aladdin) > cosine(toy, platoon) + 0.1


def test_text_table_cache_and_description_override(tmp_path):
    data = tiny_data()
    before = COMPUTE_COUNT["text"]
    plain = compute_or_load_features(data, "text", tmp_path, verbose=False)
    assert COMPUTE_COUNT["text"] == before + 1
    assert plain.vectors.shape == (7, 384) and plain.mask.tolist() == [False, True, True, True, True, False, True]
    assert not plain.vectors[0].any() and not plain.vectors[5].any()
    mtime = plain.path.stat().st_mtime_ns
    again = compute_or_load_features(data, "text", tmp_path, verbose=False)
    assert COMPUTE_COUNT["text"] == before + 1 and again.path == plain.path  # cache hit: nothing recomputed
    assert plain.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.vectors, plain.vectors)

    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"1": "A war film about soldiers in Vietnam."}))
    described = compute_or_load_features(data, "text", tmp_path, descriptions=descriptions, verbose=False)
    assert COMPUTE_COUNT["text"] == before + 2 and described.path != plain.path
    assert described.meta["items_with_description"] == 1
    # Toy Story now reads like a war film; the items without a description are unchanged.
    assert cosine(described.vectors[1], plain.vectors[3]) > cosine(plain.vectors[1], plain.vectors[3])
    np.testing.assert_allclose(described.vectors[2:], plain.vectors[2:], atol=1e-6)

    descriptions.write_text(json.dumps({"9999": "an item of another dataset"}))
    with pytest.raises(FeatureError, match="none of its 1 item ids"):
        compute_or_load_features(data, "text", tmp_path, descriptions=descriptions, verbose=False)


def test_no_text_at_all_is_an_error(tmp_path):
    data = tiny_data(titles=[""] * 6, genres=[""] * 6)
    with pytest.raises(FeatureError, match="no item of this dataset has a text"):
        compute_or_load_features(data, "text", tmp_path, verbose=False)


# ---------------------------------------------------------------------- visual


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Poster folder: two identical images, two different ones, one corrupt file."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("posters")
    rng = np.random.default_rng(0)
    same = rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(same).save(folder / "a.png")
    Image.fromarray(same).save(folder / "b.png")
    Image.fromarray(np.full((50, 30, 3), (200, 30, 30), dtype=np.uint8)).save(folder / "red.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_encode_images_random_init(images):
    paths = [None, images / "a.png", images / "b.png", None, images / "red.jpg", images / "gray.jpg"]
    vectors, mask = encode_images(paths, pretrained=None, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (6, 512)
    assert mask.tolist() == [False, True, True, False, True, True]
    assert not vectors[0].any() and not vectors[3].any()  # no image: zeros, never noise
    np.testing.assert_allclose(np.linalg.norm(vectors[mask], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[1], vectors[2], atol=1e-6)  # identical images, identical vectors
    assert not np.allclose(vectors[1], vectors[4], atol=1e-4)
    again, _ = encode_images(paths[:3], pretrained=None, batch_size=8)  # batching does not change results
    np.testing.assert_allclose(again, vectors[:3], atol=1e-5)


def test_encode_images_errors(images, tmp_path):
    with pytest.raises(FeatureError, match="corrupt.jpg"):
        encode_images([images / "a.png", images / "corrupt.jpg"])
    with pytest.raises(MissingDataError, match="no-such-weights.bin"):
        encode_images([images / "a.png"], pretrained=str(tmp_path / "no-such-weights.bin"))
    with pytest.raises(ConfigError, match="not-a-tag"):
        encode_images([images / "a.png"], pretrained="not-a-tag")
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        encode_images([images / "a.png"], model_name="ViT-Q-99")


def test_pretrained_tag_offline_says_to_pass_a_file(images):
    import huggingface_hub.constants as hub

    if not hub.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is off: a tag would try the network")
    with pytest.raises(MissingDataError, match="local weights file"):
        encode_images([images / "a.png"], pretrained="openai")


def test_poster_paths_csv_and_ml1m(images, tmp_path):
    data = tiny_data(extra={"image": ["a.png", "", str(images / "red.jpg"), "", "", "gray.jpg"]})
    paths, mask = poster_paths(data, images)
    assert paths[1] == images / "a.png" and paths[3] == images / "red.jpg" and paths[0] is None
    assert mask.tolist() == [False, True, False, True, False, False, True]
    with pytest.raises(MissingDataError, match="no-such-folder"):
        poster_paths(data, tmp_path / "no-such-folder")
    missing = tiny_data(extra={"image": ["nope.png", "", "", "", "", ""]})
    with pytest.raises(MissingDataError, match="nope.png"):
        poster_paths(missing, images)

    ml1m = tmp_path / "ml1m-posters"
    ml1m.mkdir()
    for movie_id in ("1", "1090"):
        (ml1m / f"{movie_id}.jpg").write_bytes((images / "red.jpg").read_bytes())
    paths, mask = poster_paths(tiny_data(), ml1m, dataset="ml-1m")
    assert paths[1] == ml1m / "1.jpg" and paths[3] == ml1m / "1090.jpg"
    assert mask.sum() == 2
    with pytest.raises(MissingDataError, match="no-such-folder"):
        compute_or_load_features(
            tiny_data(), "visual", tmp_path, posters_dir=tmp_path / "no-such-folder", dataset="ml-1m", verbose=False
        )


def test_visual_table_records_random_init_and_caches(images, tmp_path):
    data = tiny_data(extra={"image": ["a.png", "b.png", "", "red.jpg", "", "gray.jpg"]})
    before = COMPUTE_COUNT["visual"]
    table = compute_or_load_features(data, "visual", tmp_path, posters_dir=images, verbose=False)
    assert table.meta["pretrained"] == RANDOM_INIT and table.meta["model"] == "ViT-B-32"
    assert table.vectors.shape == (7, 512) and table.mask.tolist() == [False, True, True, False, True, False, True]
    again = compute_or_load_features(data, "visual", tmp_path, posters_dir=images, verbose=False)
    assert COMPUTE_COUNT["visual"] == before + 1
    np.testing.assert_array_equal(again.vectors, table.vectors)


def test_ml100k_titles_map_to_ml1m_posters(tmp_path):
    posters, movies = SHARED_DATA / "ml-1m" / "posters", SHARED_DATA / "ml-1m" / "movies.dat"
    if not (movies.is_file() and posters.is_dir() and (SHARED_DATA / "ml-100k" / "u.data").is_file()):
        pytest.skip(f"shared MovieLens data not found under {SHARED_DATA} (set FEDDMMR_SHARED_DATA)")
    data, _ = prepare_dataset(
        PrepareOptions("ml-100k"), SHARED_DATA / "ml-100k", tmp_path, download=False, verbose=False
    )
    paths, mask = poster_paths(data, posters)  # movies.dat found next to the posters folder
    # Exact title match after stripping whitespace. (A case-insensitive match would add one more:
    # "Like Water For Chocolate ..." vs ML-1M's "Like Water for Chocolate ...".)
    assert data.num_items == 1682 and int(mask.sum()) == 1398
    toy_story = int(np.flatnonzero(data.item_raw_ids == "1")[0])
    assert paths[toy_story] == posters / "1.jpg"
    explicit, _ = poster_paths(data, posters, movies_dat=movies)
    assert explicit == paths


# ----------------------------------------------------------------------- store


def table(rows: int = 4, dim: int = 3) -> FeatureTable:
    vectors = np.zeros((rows, dim), dtype=np.float32)
    vectors[1:, 0] = 1.0
    vectors[2] = 0.0
    mask = np.array([False, True, False] + [True] * (rows - 3))
    return FeatureTable("text", vectors, mask, {"model": "m", "dataset_cache_key": "k1"})


def test_feature_table_round_trip(tmp_path):
    path = table().save(tmp_path / "t.npz")
    sidecar = json.loads((tmp_path / "t.json").read_text())
    assert sidecar["num_items"] == 3 and sidecar["dim"] == 3 and sidecar["model"] == "m"
    loaded = FeatureTable.load(path, expected_num_items=3, expected_dim=3, expected_dataset_key="k1")
    np.testing.assert_array_equal(loaded.vectors, table().vectors)
    assert loaded.mask.tolist() == [False, True, False, True] and loaded.coverage == pytest.approx(2 / 3)
    summary = features_summary({"text": loaded})
    assert json.loads(json.dumps(summary))["text"]["path"] == str(path)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "spoil, load_kwargs, message",
    [
        (None, {"expected_num_items": 1682}, "has 4 rows, dataset has 1683 \\(1682 items \\+ padding\\)"),
        (None, {"expected_num_items": 3, "expected_dim": 512}, "has 3-d vectors, expected 512-d"),
        (None, {"expected_num_items": 3, "expected_dataset_key": "k2"}, "computed for dataset k1"),
        ("nan", {"expected_num_items": 3}, "non-finite"),
        ("padding", {"expected_num_items": 3}, "row 0 \\(padding\\)"),
        ("masked", {"expected_num_items": 3}, "row 2 has mask 0"),
        ("norm", {"expected_num_items": 3}, "row 3 has norm 2"),
    ],
)
def test_feature_table_load_rejects_mismatches(tmp_path, spoil, load_kwargs, message):
    path = table().save(tmp_path / "bad-table.npz")
    if spoil is not None:  # write a broken file behind save()'s back
        good = table()
        vectors, mask = good.vectors.copy(), good.mask.copy()
        if spoil == "nan":
            vectors[1, 1] = np.nan
        elif spoil == "padding":
            vectors[0, 0] = 0.5
        elif spoil == "masked":
            vectors[2, 1] = 1.0
        else:
            vectors[3] *= 2
        np.savez(path, vectors=vectors, mask=mask, meta_json=np.array("{}"))
    with pytest.raises(FeatureError, match=message) as info:
        FeatureTable.load(path, **load_kwargs)
    assert str(path) in str(info.value)


def test_feature_table_missing_file(tmp_path):
    with pytest.raises(FeatureError, match="absent.npz"):
        FeatureTable.load(tmp_path / "absent.npz", expected_num_items=3)


def test_compute_item_features_summary(images, tmp_path):
    data = tiny_data(extra={"image": ["a.png", "", "", "", "", "red.jpg"]})
    tables = compute_item_features(data, tmp_path, posters_dir=images, verbose=False)
    summary = json.loads(json.dumps(features_summary(tables)))
    assert summary["text"]["dim"] == 384 and summary["visual"]["dim"] == 512
    assert summary["visual"]["coverage"] == pytest.approx(2 / 6) and summary["text"]["coverage"] == pytest.approx(5 / 6)
    assert summary["visual"]["pretrained"] == RANDOM_INIT and summary["text"]["model"] == "all-MiniLM-L6-v2"
    with pytest.raises(ConfigError):
        compute_item_features(data, tmp_path, text=False, visual=False)
