"""Item side information (DESIGN §1): text (SBERT) and visual (CLIP) feature tables.

raw item table ──text.item_texts / visual.poster_paths──▶ strings / image paths
               ──encode_texts / encode_images──▶ L2-normalised vectors + availability mask
               ──store──▶ cached FeatureTable [num_items + 1, dim] (row 0 = padding)
"""

from .store import (
    COMPUTE_COUNT,
    KINDS,
    FeatureTable,
    compute_item_features,
    compute_or_load_features,
    features_summary,
)
from .text import DEFAULT_TEXT_MODEL, encode_texts, item_texts, load_descriptions
from .visual import DEFAULT_CLIP_MODEL, RANDOM_INIT, encode_images, poster_paths

__all__ = [
    "COMPUTE_COUNT",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_TEXT_MODEL",
    "KINDS",
    "RANDOM_INIT",
    "FeatureTable",
    "compute_item_features",
    "compute_or_load_features",
    "encode_images",
    "encode_texts",
    "features_summary",
    "item_texts",
    "load_descriptions",
    "poster_paths",
]
