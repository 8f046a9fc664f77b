"""Visual modality: one image per item, encoded with an open_clip image tower (DESIGN §1).

Where items get their image:
  * ml-1m   — ``posters_dir/<MovieID>.jpg`` (the raw item id is the MovieID);
  * ml-100k — ML-1M MovieID found by exact title (whitespace-stripped) in ML-1M ``movies.dat``;
  * csv     — the item table's ``image`` column (absolute, or relative to the posters folder).
An item without an image gets a zero row and mask 0, never noise.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from ..data.readers import read_delimited
from ..data.sequences import SequenceData
from ..errors import ConfigError, FeatureError, MissingDataError
from .text import use_offline_hub

DEFAULT_CLIP_MODEL = "ViT-B-32"
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0  # a random-init model is still reproducible (same features every run)
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")

_MODELS: dict[tuple[str, str, str], tuple[object, object]] = {}  # (model, weights, device) -> (model, preprocess)


def dataset_name(data: SequenceData, dataset: str | None = None) -> str:
    """The dataset kind ('ml-1m', 'ml-100k', 'csv') from the argument or the manifest."""
    name = dataset or data.manifest.get("options", {}).get("dataset")
    if name not in ("ml-1m", "ml-100k", "csv"):
        raise ConfigError(f"cannot tell which dataset this is (got {name!r}): pass dataset='ml-1m', 'ml-100k' or 'csv'")
    return name


def ml1m_title_index(movies_dat: Path) -> dict[str, str]:
    """{normalised title: MovieID} from ML-1M ``movies.dat`` (first id wins on duplicates).

    Titles match exactly up to surrounding whitespace and letter case (ML-100K writes
    "Like Water For Chocolate", ML-1M "Like Water for Chocolate"): 1,398 of 1,682 ML-100K items.
    """
    movies_dat = Path(movies_dat)
    if not movies_dat.is_file():
        raise MissingDataError(f"{movies_dat}: ML-1M movies.dat not found (needed to map ML-100K titles to posters)")
    table = read_delimited(movies_dat, "::", 3, encoding="iso-8859-1")
    index: dict[str, str] = {}
    for movie_id, title in zip(table[0].str.strip(), table[1].str.strip()):
        index.setdefault(title.casefold(), movie_id)
    return index


def _csv_image_base(data: SequenceData, posters_dir: Path | None) -> Path | None:
    if posters_dir is not None:
        return posters_dir
    sources = data.manifest.get("source_files", [])
    return Path(sources[-1]).parent if len(sources) >= 2 else None  # folder of the item table


def poster_paths(
    data: SequenceData,
    posters_dir: Path | None,
    movies_dat: Path | None = None,
    dataset: str | None = None,
) -> tuple[list[Path | None], np.ndarray]:
    """Image path per item id (index 0 = padding: None) and a bool mask of items that have one.

    ``movies_dat`` (ML-100K only) defaults to ``posters_dir/../movies.dat``.
    """
    kind = dataset_name(data, dataset)
    posters_dir = Path(posters_dir) if posters_dir is not None else None
    if posters_dir is not None and not posters_dir.is_dir():
        raise MissingDataError(f"{posters_dir}: image folder not found")
    paths: list[Path | None] = [None] * (data.num_items + 1)
    raw_ids = [str(r).strip() for r in data.item_raw_ids]
    if kind in ("ml-1m", "ml-100k"):
        if posters_dir is None:
            raise ConfigError(f"visual features for {kind} need the posters folder (posters/<MovieID>.jpg)")
        available = {p.stem for p in posters_dir.glob("*.jpg")}
        if kind == "ml-1m":
            movie_ids = raw_ids
        else:
            index = ml1m_title_index(movies_dat if movies_dat is not None else posters_dir.parent / "movies.dat")
            movie_ids = [index.get(str(t).strip().casefold(), "") for t in data.item_titles]
        for item in range(1, data.num_items + 1):
            if movie_ids[item] and movie_ids[item] in available:
                paths[item] = posters_dir / f"{movie_ids[item]}.jpg"
    else:
        column = data.item_extra.get("image")
        base = _csv_image_base(data, posters_dir)
        for item in range(1, data.num_items + 1):
            value = str(column[item]).strip() if column is not None else ""
            if not value:
                continue
            path = Path(value)
            if not path.is_absolute():
                if base is None:
                    raise ConfigError(
                        f"item {raw_ids[item]!r} has a relative image path {value!r}: pass the image folder"
                    )
                path = base / path
            if not path.is_file():
                raise MissingDataError(f"{path}: image of item {raw_ids[item]!r} not found")
            paths[item] = path
    mask = np.array([p is not None for p in paths], dtype=bool)
    return paths, mask


def pretrained_label(pretrained: str | Path | None) -> str:
    """How the weights are recorded: 'random-init', a tag, or the weights file's absolute path."""
    if pretrained is None:
        return RANDOM_INIT
    path = Path(pretrained)
    return str(path.resolve()) if path.is_file() else str(pretrained)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith(WEIGHT_SUFFIXES)


def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | Path | None = None, device: str = "cpu"):
    """(model, eval preprocess), created once per process; random init is seeded."""
    use_offline_hub()
    label = pretrained_label(pretrained)
    key = (model_name, label, str(device))
    if key in _MODELS:
        return _MODELS[key]
    import open_clip
    import torch

    if ":" not in model_name and model_name.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r} (e.g. ViT-B-32, ViT-B-16, RN50)")
    is_file = pretrained is not None and Path(pretrained).is_file()
    is_tag = pretrained is not None and not is_file and bool(open_clip.get_pretrained_cfg(model_name, str(pretrained)))
    if pretrained is not None and not is_file and not is_tag:
        if _looks_like_path(str(pretrained)):
            raise MissingDataError(f"{pretrained}: CLIP weights file not found")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)[:6])
        raise ConfigError(
            f"{pretrained!r} is neither a weights file nor a pretrained tag of {model_name} (tags: {tags}, ...)"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if pretrained is None else str(pretrained), device="cpu"
            )
    except Exception as exc:  # open_clip reports download and checkpoint problems as bare RuntimeErrors
        if is_tag:
            raise MissingDataError(
                f"cannot get the {model_name} weights {pretrained!r} (no internet or not in the local cache): "
                "pass a local weights file instead, e.g. --clip-pretrained /path/to/open_clip_pytorch_model.bin"
            ) from None
        if is_file:
            raise FeatureError(f"{pretrained}: cannot load as {model_name} weights ({exc})") from None
        raise
    model = model.to(device).eval()
    _MODELS[key] = (model, preprocess)
    return _MODELS[key]


def _read_image(path: Path, preprocess):
    from PIL import Image

    if not Path(path).is_file():
        raise MissingDataError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise FeatureError(f"{path}: unreadable or corrupt image ({exc})") from None
    return preprocess(rgb)


def encode_images(
    paths: list[Path | None],
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] L2-normalised image embeddings (zero rows where path is None) + bool mask."""
    import torch
    from tqdm.auto import tqdm

    model, preprocess = load_clip(model_name, pretrained, device)
    mask = np.array([p is not None for p in paths], dtype=bool)
    todo = np.flatnonzero(mask)
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:  # some towers (timm) do not expose it: ask the model
        with torch.inference_mode():
            dim = model.encode_image(torch.zeros(1, 3, 224, 224, device=device)).shape[-1]
    vectors = np.zeros((len(paths), int(dim)), dtype=np.float32)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="images", unit="batch", disable=not sys.stderr.isatty() or len(batches) < 4):
        pixels = torch.stack([_read_image(paths[i], preprocess) for i in batch]).to(device)
        with torch.inference_mode():
            out = model.encode_image(pixels).float()
        out = torch.nn.functional.normalize(out, dim=-1)
        vectors[batch] = out.cpu().numpy()
    if not np.isfinite(vectors).all():
        raise FeatureError(f"{model_name} produced non-finite image features")
    return vectors, mask


def folder_fingerprint(folder: Path, pattern: str = "*") -> str:
    """sha256 of the sorted (name, size) listing: changes when images are added or replaced."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob(pattern)):
        if path.is_file():
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()
