"""Client-side memory prototypes (DESIGN §3): what a client may reveal about its memory.

Utility-weighted K-Means (scikit-learn, fixed seed) over the memory entries' [ID | text | image]
vectors; a centroid is released only when its cluster has at least ``min_cluster_size``
members, optionally with Gaussian noise. Entries themselves never leave the client.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class PrototypeConfig:
    num_prototypes: int = 5
    min_cluster_size: int = 3
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prototypes < 1 or self.min_cluster_size < 1:
            raise ValueError("num_prototypes and min_cluster_size must be >= 1")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


def local_prototypes(
    vectors: np.ndarray, weights: np.ndarray, config: PrototypeConfig, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, P] float32, cluster sizes [k] float32) with k ≤ num_prototypes."""
    from sklearn.cluster import KMeans

    vectors = np.asarray(vectors, dtype=np.float64)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    empty = (np.zeros((0, dim), np.float32), np.zeros(0, np.float32))
    if len(vectors) < config.min_cluster_size:
        return empty
    weights = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 1e-6, None)
    clusters = min(config.num_prototypes, len(np.unique(vectors, axis=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about ties/convergence on tiny inputs
        kmeans = KMeans(n_clusters=clusters, n_init=1, random_state=config.seed).fit(vectors, sample_weight=weights)
    sizes = np.bincount(kmeans.labels_, minlength=clusters)
    keep = sizes >= config.min_cluster_size
    centroids = kmeans.cluster_centers_[keep]
    if config.noise_std > 0:
        # Fresh OS entropy, never the run seed: noise a server could regenerate protects nothing.
        rng = rng or np.random.default_rng()
        centroids = centroids + rng.normal(0.0, config.noise_std, centroids.shape)
    return centroids.astype(np.float32), sizes[keep].astype(np.float32)
