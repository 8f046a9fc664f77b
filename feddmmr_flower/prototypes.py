"""Memory prototypes: what a client may reveal about its memory.

Utility-weighted K-Means (greedy k-means++ seeding, then Lloyd; fixed seed) over the memory
entries' [ID | text | image] vectors; a centroid is released only when its cluster has at least
``min_cluster_size`` members, optionally with Gaussian noise. Entries themselves never leave the
client. ``central_prototypes`` is the centralized trainer's stand-in for the server's aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .memory import LocalDynamicMemory
    from .models.feddmmr import FedDMMR


@dataclass(frozen=True)
class PrototypeConfig:
    """Built from a validated ``ExperimentConfig`` (``experiment.prototype_config``)."""

    num_prototypes: int
    min_cluster_size: int
    noise_std: float
    seed: int


def kmeans_with_labels(
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
    centroids, labels = kmeans_with_labels(vectors, weights, clusters, config.seed)
    sizes = np.bincount(labels, minlength=clusters)
    keep = sizes >= config.min_cluster_size
    centroids = centroids[keep]
    if config.noise_std > 0:
        # Fresh OS entropy, never the run seed: noise a server could regenerate protects nothing.
        rng = rng or np.random.default_rng()
        centroids = centroids + rng.normal(0.0, config.noise_std, centroids.shape)
    return centroids.astype(np.float32), sizes[keep].astype(np.float32)


def prototype_vectors(model: FedDMMR, items: torch.Tensor) -> torch.Tensor:
    """[ID | text | image] vectors of items (the space prototypes live in)."""
    with torch.no_grad():
        return torch.cat([model.item_emb(items), model.txt_feat[items], model.vis_feat[items]], -1)


def memory_prototypes(
    model: FedDMMR, memory: LocalDynamicMemory, row: int, config: PrototypeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A client's releasable prototypes: K-Means over its memory entries, utility-weighted."""
    items, utility = memory.entries(row)
    if len(items) == 0:
        return np.zeros((0, model.config.prototype_dim), np.float32), np.zeros(0, np.float32)
    vectors = prototype_vectors(model, torch.as_tensor(items, device=model.vis_feat.device)).cpu().numpy()
    return local_prototypes(vectors, utility, config)


def central_prototypes(model: FedDMMR, memory: LocalDynamicMemory, config: PrototypeConfig) -> torch.Tensor | None:
    """Centralized stand-in for the server's aggregation: one weighted K-Means over all entries."""
    valid = memory.item > 0
    if not valid.any():
        return None
    items = memory.item[valid]
    utility = memory.utility(torch.arange(len(memory.step)))[valid]
    vectors = prototype_vectors(model, items.to(model.vis_feat.device)).cpu().numpy()
    centroids, _ = local_prototypes(vectors, utility.numpy(), config)
    return torch.as_tensor(centroids, device=model.vis_feat.device) if len(centroids) else None
