"""Feature tables on disk and the cache that computes each one once (DESIGN §1).

A table is float32 [num_items + 1, dim] + a bool availability mask; row 0 (padding) is
zero with mask 0. A table that does not match the dataset is an error naming the file
and the mismatch, never a silent truncation or padding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_json
from ..data.download import file_digest
from ..data.sequences import SequenceData
from ..errors import ConfigError, FeatureError, MissingDataError
from . import text as text_mod
from . import visual as visual_mod

FORMAT_VERSION = 1
KINDS = ("text", "visual")
NORM_TOLERANCE = 1e-3
# How many tables this process actually computed (not loaded), per kind: lets tests see cache hits.
COMPUTE_COUNT: dict[str, int] = {kind: 0 for kind in KINDS}


@dataclass
class FeatureTable:
    """One modality's item vectors, aligned with item ids (row 0 = padding)."""

    name: str
    vectors: np.ndarray  # float32 [num_items + 1, dim]
    mask: np.ndarray  # bool [num_items + 1]
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # where it was saved/loaded, if anywhere

    @property
    def num_items(self) -> int:
        return len(self.vectors) - 1

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def coverage(self) -> float:
        """Share of real items (padding excluded) that have this feature."""
        return float(self.mask[1:].mean()) if self.num_items > 0 else 0.0

    def validate(
        self, where: str | Path, expected_num_items: int | None = None, expected_dim: int | None = None
    ) -> None:
        """Raise ``FeatureError`` naming ``where`` and the first thing that is wrong."""
        v, m = self.vectors, self.mask
        if v.ndim != 2:
            raise FeatureError(f"feature file {where}: vectors must be 2-D [items + 1, dim], got shape {v.shape}")
        if expected_num_items is not None and len(v) != expected_num_items + 1:
            raise FeatureError(
                f"feature file {where} has {len(v)} rows, dataset has {expected_num_items + 1} "
                f"({expected_num_items} items + padding)"
            )
        if expected_dim is not None and v.shape[1] != expected_dim:
            raise FeatureError(f"feature file {where} has {v.shape[1]}-d vectors, expected {expected_dim}-d")
        if m.shape != (len(v),) or m.dtype != bool:
            raise FeatureError(f"feature file {where}: mask has shape {m.shape} ({m.dtype}), expected ({len(v)},) bool")
        finite = np.isfinite(v).all(axis=1)
        if not finite.all():
            raise FeatureError(
                f"feature file {where}: non-finite values (NaN/Inf) in {int((~finite).sum())} rows, first row {int(np.argmin(finite))}"
            )
        if m[0] or np.any(v[0]):
            raise FeatureError(f"feature file {where}: row 0 (padding) must be zero with mask 0")
        stray = ~m & np.any(v != 0, axis=1)
        if stray.any():
            raise FeatureError(f"feature file {where}: row {int(np.argmax(stray))} has mask 0 but a non-zero vector")
        norms = np.linalg.norm(v[m].astype(np.float64), axis=1)
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            row = int(np.flatnonzero(m)[np.argmax(off)])
            raise FeatureError(
                f"feature file {where}: row {row} has norm {norms[np.argmax(off)]:.4f}, expected unit length"
            )

    def save(self, path: Path) -> Path:
        """Write ``<path>.npz`` (vectors, mask, meta) + a ``.json`` sidecar, each atomically."""
        path = Path(path)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.validate(path)
        self.meta = {
            **self.meta,
            "name": self.name,
            "num_items": self.num_items,
            "dim": self.dim,
            "coverage": round(self.coverage, 6),
            "format": FORMAT_VERSION,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, vectors=self.vectors, mask=self.mask, meta_json=np.array(json.dumps(self.meta)))
        atomic_write_json(path.with_suffix(".json"), self.meta)
        self.path = path
        return path

    @classmethod
    def load(
        cls,
        path: Path,
        expected_num_items: int,
        expected_dim: int | None = None,
        expected_dataset_key: str | None = None,
    ) -> FeatureTable:
        """Read and check a table; every mismatch with the dataset is a ``FeatureError``."""
        path = Path(path)
        if not path.is_file():
            raise FeatureError(f"feature file {path} not found (compute it with `feddmmr features`)")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                vectors, mask = arrays["vectors"], arrays["mask"]
                meta = json.loads(str(arrays["meta_json"])) if "meta_json" in arrays.files else {}
        except KeyError as exc:
            raise FeatureError(f"feature file {path}: missing array {exc}") from None
        except (OSError, ValueError, EOFError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
            raise FeatureError(f"feature file {path}: unreadable ({exc}); delete it to compute it again") from None
        if not np.issubdtype(vectors.dtype, np.floating):
            raise FeatureError(f"feature file {path}: vectors must be floating point, got {vectors.dtype}")
        table = cls(meta.get("name", path.stem), vectors.astype(np.float32, copy=False), mask, meta, path)
        table.validate(path, expected_num_items, expected_dim)
        stored_key = meta.get("dataset_cache_key")
        if expected_dataset_key is not None and stored_key not in (None, expected_dataset_key):
            raise FeatureError(
                f"feature file {path} was computed for dataset {stored_key}, this dataset is {expected_dataset_key}"
            )
        return table


# ---------------------------------------------------------------------- cache


def item_table_digest(data: SequenceData) -> str:
    """sha256 of the item ids and side information: what the features are a function of."""
    digest = hashlib.sha256()
    columns = [data.item_raw_ids, data.item_titles, data.item_genres]
    columns += [data.item_extra[k] for k in sorted(data.item_extra)]
    for column in columns:
        digest.update("\x1f".join(map(str, column)).encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _text_model_spec(text_model: str | None) -> str:
    if text_model is None:
        return f"{text_mod.DEFAULT_TEXT_PACKAGE}=={_package_version(text_mod.DEFAULT_TEXT_PACKAGE)}"
    path = Path(text_model)
    return str(path.resolve()) if path.exists() else str(text_model)


def _weights_spec(pretrained: str | Path | None) -> str:
    label = visual_mod.pretrained_label(pretrained)
    if pretrained is not None and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        label += f"|{stat.st_size}|{stat.st_mtime_ns}"
    return label


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[feddmmr] {message}", file=sys.stderr)


def _text_job(data: SequenceData, descriptions: Path | None, text_model: str | None) -> tuple[dict, dict]:
    """(cache key parts, meta) for the text table."""
    parts = {"model": _text_model_spec(text_model), "descriptions": None}
    meta = {"model": text_model or text_mod.DEFAULT_TEXT_MODEL, "pretrained": parts["model"]}
    if descriptions is not None:
        descriptions = Path(descriptions)
        if not descriptions.is_file():
            raise MissingDataError(f"{descriptions}: item descriptions file not found")
        parts["descriptions"] = file_digest(descriptions, "sha256")
        meta.update(descriptions=str(descriptions.resolve()), descriptions_sha256=parts["descriptions"])
    return parts, meta


def _compute_text(
    data: SequenceData,
    descriptions: Path | None,
    text_model: str | None,
    device: str,
    batch_size: int | None,
    meta: dict,
) -> tuple[np.ndarray, np.ndarray]:
    table = text_mod.load_descriptions(descriptions) if descriptions is not None else None
    if table is not None:
        matched = sum(1 for raw in data.item_raw_ids[1:] if table.get(str(raw).strip(), "").strip())
        if matched == 0:
            raise FeatureError(f"{descriptions}: none of its {len(table)} item ids is an item id of this dataset")
        meta["items_with_description"] = matched
    texts, mask = text_mod.item_texts(data, table)
    rows = np.flatnonzero(mask)
    encoded = text_mod.encode_texts([texts[i] for i in rows], text_model, batch_size or 64, device)
    vectors = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
    vectors[rows] = encoded
    return vectors, mask


def _visual_job(
    data: SequenceData,
    posters_dir: Path | None,
    movies_dat: Path | None,
    dataset: str | None,
    clip_model: str,
    clip_pretrained: str | Path | None,
) -> tuple[dict, dict]:
    kind = visual_mod.dataset_name(data, dataset)
    parts: dict = {
        "model": clip_model,
        "weights": _weights_spec(clip_pretrained),
        "dataset": kind,
        "posters": None,
        "movies_dat": None,
    }
    meta = {"model": clip_model, "pretrained": visual_mod.pretrained_label(clip_pretrained), "dataset": kind}
    if clip_pretrained is None:
        meta["init_seed"] = visual_mod.RANDOM_INIT_SEED
    if posters_dir is not None:
        posters_dir = Path(posters_dir)
        if not posters_dir.is_dir():
            raise MissingDataError(f"{posters_dir}: image folder not found")
        parts["posters"] = visual_mod.folder_fingerprint(posters_dir)
        meta["posters_dir"] = str(posters_dir.resolve())
    elif kind != "csv":
        raise ConfigError(f"visual features for {kind} need the posters folder (posters/<MovieID>.jpg)")
    if kind == "ml-100k":
        movies_dat = Path(movies_dat) if movies_dat is not None else posters_dir.parent / "movies.dat"
        if not movies_dat.is_file():
            raise MissingDataError(
                f"{movies_dat}: ML-1M movies.dat not found (needed to map ML-100K titles to posters)"
            )
        parts["movies_dat"] = file_digest(movies_dat, "sha256")
        meta["movies_dat"] = str(movies_dat.resolve())
    return parts, meta


def compute_or_load_features(
    data: SequenceData,
    kind: str,
    cache_dir: Path,
    *,
    descriptions: Path | None = None,
    text_model: str | None = None,
    posters_dir: Path | None = None,
    movies_dat: Path | None = None,
    dataset: str | None = None,
    clip_model: str = visual_mod.DEFAULT_CLIP_MODEL,
    clip_pretrained: str | Path | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    force: bool = False,
    verbose: bool = True,
) -> FeatureTable:
    """The ``kind`` table for ``data``, from ``cache_dir`` when its inputs were seen before.

    The file name carries a hash of (dataset cache key, item table, kind, model, weights,
    descriptions sha256 / image folder listing), so a changed input computes a new table.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown feature kind {kind!r}: choose one of {', '.join(KINDS)}")
    dataset_key = data.manifest.get("cache_key")
    if kind == "text":
        parts, meta = _text_job(data, descriptions, text_model)
    else:
        parts, meta = _visual_job(data, posters_dir, movies_dat, dataset, clip_model, clip_pretrained)
    key = _digest(
        {"format": FORMAT_VERSION, "kind": kind, "dataset_key": dataset_key, "items": item_table_digest(data), **parts}
    )
    path = Path(cache_dir) / f"{kind}-{key}.npz"
    if path.is_file() and not force:
        _log(verbose, f"{kind} features: cached {path}")
        return FeatureTable.load(path, data.num_items, expected_dataset_key=dataset_key)

    COMPUTE_COUNT[kind] += 1
    started = time.perf_counter()
    _log(verbose, f"{kind} features: encoding {data.num_items} items with {meta['model']} on {device}")
    if kind == "text":
        vectors, mask = _compute_text(data, descriptions, text_model, device, batch_size, meta)
    else:
        paths, _ = visual_mod.poster_paths(data, posters_dir, movies_dat, meta["dataset"])
        vectors, mask = visual_mod.encode_images(paths, clip_model, clip_pretrained, batch_size or 32, device)
    if not mask[1:].any():
        what = "a text (no title, genres or description)" if kind == "text" else "an image"
        raise FeatureError(f"no item of this dataset has {what}: nothing to compute {kind} features from")
    meta.update(
        kind=kind,
        dataset_cache_key=dataset_key,
        cache_key=key,
        seconds=round(time.perf_counter() - started, 2),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    table = FeatureTable(kind, vectors, mask, meta)
    table.save(path)
    _log(verbose, f"{kind} features: {int(mask.sum())}/{data.num_items} items, {table.dim}-d -> {path}")
    return table


def compute_item_features(
    data: SequenceData,
    cache_dir: Path,
    *,
    text: bool = True,
    visual: bool = True,
    descriptions: Path | None = None,
    text_model: str | None = None,
    posters_dir: Path | None = None,
    movies_dat: Path | None = None,
    clip_model: str = visual_mod.DEFAULT_CLIP_MODEL,
    clip_pretrained: str | None = None,
    device: str = "cpu",
    dataset: str | None = None,
    force: bool = False,
    verbose: bool = True,
) -> dict[str, FeatureTable]:
    """Compute (or load from the cache) the requested modalities: {'text': ..., 'visual': ...}."""
    if not (text or visual):
        raise ConfigError("nothing to compute: enable text and/or visual features")
    tables: dict[str, FeatureTable] = {}
    if text:
        tables["text"] = compute_or_load_features(
            data,
            "text",
            cache_dir,
            descriptions=descriptions,
            text_model=text_model,
            device=device,
            force=force,
            verbose=verbose,
        )
    if visual:
        tables["visual"] = compute_or_load_features(
            data,
            "visual",
            cache_dir,
            posters_dir=posters_dir,
            movies_dat=movies_dat,
            dataset=dataset,
            clip_model=clip_model,
            clip_pretrained=clip_pretrained,
            device=device,
            force=force,
            verbose=verbose,
        )
    return tables


def features_summary(tables: dict[str, FeatureTable]) -> dict[str, dict]:
    """JSON-able summary per kind: path, dim, num_items, coverage, model, pretrained."""
    return {
        kind: {
            "path": str(table.path) if table.path is not None else None,
            "dim": table.dim,
            "num_items": table.num_items,
            "coverage": round(table.coverage, 6),
            "model": table.meta.get("model"),
            "pretrained": table.meta.get("pretrained"),
        }
        for kind, table in tables.items()
    }
