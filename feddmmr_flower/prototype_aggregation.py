"""Server-side aggregation of client memory prototypes (DESIGN §4). numpy + scikit-learn only;
the Flower strategy calls it, and so can any other server loop.

A client's centroids come out of its own K-Means, so their order carries no meaning:
centroid 0 of one client and centroid 0 of another are unrelated. Averaging them
index-wise (the research prototype's defect) mixes unrelated clusters. Instead:

* no global prototypes yet -> weighted K-Means over the union of all client centroids
  (weights = cluster sizes);
* afterwards -> each client centroid is assigned to its nearest global prototype, every
  global slot takes the size-weighted mean of the centroids assigned to it, and moves
  towards that mean by an EMA step: ``new = (1 - ema) * old + ema * mean``. Slots that
  received nothing keep their value.

Matching uses cosine similarity by default: prototypes are concatenated
[ID | text | image] vectors used as attention keys, where direction is what matters,
and a centroid's norm shrinks with the spread of its cluster (a mean of spread-out
vectors is shorter), so Euclidean matching would send loose clusters to whichever
prototype happens to be shortest. ``metric="euclidean"`` is available. Means and
the EMA are always taken in the raw vector space.

The functions return reasons for rejected clients rather than logging them, so the
caller can name the node (see ``strategies.feddmmr``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

Metric = Literal["cosine", "euclidean"]


@dataclass
class PrototypeAggregation:
    """Result of one aggregation.

    prototypes: new global prototypes float32 [K, P], or None while none exist.
    slot_weights: total cluster size assigned to each slot this round, float64 [K].
    rejected: (client index, reason) for clients whose prototypes were not used.
    """

    prototypes: np.ndarray | None
    slot_weights: np.ndarray
    rejected: list[tuple[int, str]] = field(default_factory=list)


def _as_client(centroids: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise shapes: k = 0 may arrive as shape (0,), (0, P) or sizes of shape ()."""
    c = np.asarray(centroids, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if c.size == 0 and c.ndim < 2:
        c = c.reshape(0, 0)
    return c, s


def validate_client(centroids: np.ndarray, sizes: np.ndarray, dim: int | None) -> str | None:
    """Return why this client's prototypes are unusable, or None if they are fine.

    ``dim`` is the expected prototype width P (None: any width). Empty (k = 0) is fine.
    """
    c, s = _as_client(centroids, sizes)
    if c.ndim != 2:
        return f"centroids must be 2-D [k, P], got shape {tuple(np.shape(centroids))}"
    if c.shape[0] == 0:
        return None if s.size == 0 else f"0 centroids but {s.size} sizes"
    if s.shape[0] != c.shape[0]:
        return f"{c.shape[0]} centroids but {s.shape[0]} sizes"
    if dim is not None and c.shape[1] != dim:
        return f"dimension mismatch: P={c.shape[1]}, expected P={dim}"
    if not np.isfinite(c).all():
        return "non-finite values in centroids"
    if not np.isfinite(s).all() or (s < 0).any():
        return "sizes must be finite and >= 0"
    return None


def match_to_prototypes(centroids: np.ndarray, prototypes: np.ndarray, metric: Metric = "cosine") -> np.ndarray:
    """Index of the nearest global prototype for each centroid, int [k]."""
    c = np.asarray(centroids, dtype=np.float64)
    g = np.asarray(prototypes, dtype=np.float64)
    if metric == "cosine":
        cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return np.argmax(cn @ gn.T, axis=1)
    if metric == "euclidean":
        d2 = (c**2).sum(1)[:, None] - 2.0 * c @ g.T + (g**2).sum(1)[None, :]
        return np.argmin(d2, axis=1)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def kmeans_centres(points: np.ndarray, weights: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Weighted K-Means centres float64 [min(num_clusters, #distinct points), P].

    Rows are sorted first, so the result does not depend on the order in which
    clients (or their centroids) arrived, only on the seed.
    """
    keep = weights > 0
    x, w = points[keep], weights[keep]
    if x.shape[0] == 0:
        return np.zeros((0, points.shape[1]))
    order = np.lexsort(x.T[::-1])
    x, w = x[order], w[order]
    k = min(num_clusters, np.unique(x, axis=0).shape[0])
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    km.fit(x, sample_weight=w)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


def aggregate_prototypes(
    global_prototypes: np.ndarray | None,
    clients: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    num_prototypes: int = 5,
    ema: float = 0.5,
    metric: Metric = "cosine",
    seed: int = 0,
    dim: int | None = None,
) -> PrototypeAggregation:
    """Aggregate client prototypes ``[(centroids [k_i, P], sizes [k_i]), ...]``.

    global_prototypes: current global [K, P], or None / an empty array before the first
        aggregation (then weighted K-Means with ``num_prototypes`` clusters).
    ema: step towards this round's slot means, in (0, 1]; 1 replaces the slot.
    dim: expected width P when no global exists yet (default: the most common width
        among the clients; clients of another width are rejected).
    An all-empty round returns the previous global unchanged.
    """
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be in (0, 1], got {ema}")
    if num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
    has_global = global_prototypes is not None and np.asarray(global_prototypes).size > 0
    g = np.asarray(global_prototypes, dtype=np.float64) if has_global else None

    normalised = [_as_client(c, s) for c, s in clients]
    if g is not None:
        dim = g.shape[1]
    elif dim is None:
        widths = Counter(c.shape[1] for c, _ in normalised if c.ndim == 2 and c.shape[0] > 0)
        dim = widths.most_common(1)[0][0] if widths else None

    rejected: list[tuple[int, str]] = []
    points, weights = [], []
    for i, (c, s) in enumerate(normalised):
        reason = validate_client(c, s, dim)
        if reason is not None:
            rejected.append((i, reason))
        elif c.shape[0] > 0:
            points.append(c)
            weights.append(s)

    if not points:  # all-empty (or all-rejected) round: keep what we had
        k = 0 if g is None else g.shape[0]
        old = None if g is None else g.astype(np.float32)
        return PrototypeAggregation(old, np.zeros(k), rejected)
    x, w = np.concatenate(points), np.concatenate(weights)

    if g is None:
        centres = kmeans_centres(x, w, num_prototypes, seed)
        if centres.shape[0] == 0:  # every size was 0
            return PrototypeAggregation(None, np.zeros(0), rejected)
        slot_weights = np.bincount(match_to_prototypes(x, centres, "euclidean"), weights=w, minlength=len(centres))
        return PrototypeAggregation(centres.astype(np.float32), slot_weights, rejected)

    slots = match_to_prototypes(x, g, metric)
    slot_weights = np.bincount(slots, weights=w, minlength=g.shape[0])
    sums = np.zeros_like(g)
    np.add.at(sums, slots, x * w[:, None])
    hit = slot_weights > 0
    new = g.copy()
    new[hit] = (1.0 - ema) * g[hit] + ema * sums[hit] / slot_weights[hit, None]
    return PrototypeAggregation(new.astype(np.float32), slot_weights, rejected)
