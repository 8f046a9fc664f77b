"""Client-side memory prototypes (DESIGN §3): what a client may reveal about its memory.

Utility-weighted K-Means (greedy k-means++ seeding, then Lloyd; fixed seed) over the memory entries' [ID | text | image]
vectors; a centroid is released only when its cluster has at least ``min_cluster_size``
members, optionally with Gaussian noise. Entries themselves never leave the client.
"""

from __future__ import annotations

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


def weighted_kmeans(
    vectors: np.ndarray, weights: np.ndarray, clusters: int, seed: int, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm after a seeded greedy k-means++ initialisation: (centres, labels).

    On a client's ≤ 50 entries this takes ~1 ms; ``sklearn.cluster.KMeans`` spends ~25 ms per
    call on input checks and thread-pool set-up (measured), and importing scikit-learn costs a
    deployed ClientApp (a fresh process per message) ~1-2 s, so both steps are written out here.
    """
    centres = kmeans_plusplus(vectors, weights, clusters, np.random.default_rng(seed))
    labels = np.zeros(len(vectors), dtype=np.int64)
    for _ in range(max_iter):
        distances = ((vectors[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        labels = distances.argmin(1)
        member = np.eye(clusters)[labels] * weights[:, None]  # [n, k] weighted one-hot
        mass = member.sum(0)
        updated = np.where(mass[:, None] > 0, member.T @ vectors / np.maximum(mass, 1e-12)[:, None], centres)
        if np.allclose(updated, centres):
            break
        centres = updated
    return centres, labels


def kmeans_plusplus(vectors: np.ndarray, weights: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted greedy k-means++ (Arthur & Vassilvitskii; the variant scikit-learn uses): each new
    centre is the best of 2 + log(k) candidates drawn in proportion to weight x squared distance."""
    n = len(vectors)
    trials = 2 + int(np.log(clusters))
    probs = weights / weights.sum()
    centres = [vectors[rng.choice(n, p=probs)]]
    closest = ((vectors - centres[0]) ** 2).sum(1)
    for _ in range(1, clusters):
        mass = weights * closest
        total = mass.sum()
        if total <= 0:  # every point already sits on a centre
            centres.append(vectors[rng.choice(n, p=probs)])
            continue
        candidates = rng.choice(n, size=trials, p=mass / total)
        dist = ((vectors[None, :, :] - vectors[candidates][:, None, :]) ** 2).sum(-1)  # [trials, n]
        new_closest = np.minimum(closest[None, :], dist)
        best = int(np.argmin((new_closest * weights[None, :]).sum(1)))
        centres.append(vectors[candidates[best]])
        closest = new_closest[best]
    return np.stack(centres)


def local_prototypes(
    vectors: np.ndarray, weights: np.ndarray, config: PrototypeConfig, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, P] float32, cluster sizes [k] float32) with k ≤ num_prototypes."""
    vectors = np.asarray(vectors, dtype=np.float64)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    empty = (np.zeros((0, dim), np.float32), np.zeros(0, np.float32))
    if len(vectors) < config.min_cluster_size:
        return empty
    weights = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 1e-6, None)
    distinct = len({row.tobytes() for row in vectors})  # np.unique(axis=0) costs ~5 ms on 960 columns
    clusters = min(config.num_prototypes, distinct)
    centroids, labels = weighted_kmeans(vectors, weights, clusters, config.seed)
    sizes = np.bincount(labels, minlength=clusters)
    keep = sizes >= config.min_cluster_size
    centroids = centroids[keep]
    if config.noise_std > 0:
        # Fresh OS entropy, never the run seed: noise a server could regenerate protects nothing.
        rng = rng or np.random.default_rng()
        centroids = centroids + rng.normal(0.0, config.noise_std, centroids.shape)
    return centroids.astype(np.float32), sizes[keep].astype(np.float32)
