"""A round's train replies on the server, without Flower: checks, the norm-outlier filter, weighted means.

A *collector* (``strategies/collect.py``: plain, or SecAgg+ in ``strategies/secagg.py``) sends the
round's instructions, reads the replies and sorts every sampled node into ``accepted``,
``rejected`` (a reply that failed a check), ``failed`` (an error reply or none) or ``skipped`` (a
user with nothing to train on). The checks a reply must pass live here, with the numbers that
describe a round, so that every collector and any other server loop apply the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NodeOutcome:
    """A node whose reply was not aggregated, and why (``partition_id``: its user, when known)."""

    node_id: int
    partition_id: int | None
    reason: str

    def as_record(self) -> dict[str, Any]:
        """The entry written to ``history.json`` (rejected / failed / skipped lists)."""
        return {"node_id": self.node_id, "partition_id": self.partition_id, "reason": self.reason}


@dataclass
class Accepted:
    """A train reply that passed the checks.

    ``arrays``: the stage's trained tensors (None under SecAgg+, where the server never sees one
    client's update); ``update_norm``: ||arrays - global|| (NaN when unknown)."""

    node_id: int
    partition_id: int | None
    weight: float
    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None
    update_norm: float = math.nan
    prototypes: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class WeightedUpdate:
    """What the server update step aggregates: trained tensors with their weight (one client's, or a
    mean of several when only the mean is known: SecAgg+, central DP)."""

    node_id: int
    weight: float
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Expected:
    """What this round's train replies must hold: the stage's tensor names, in order, and the global
    values of those tensors (float64) that updates are measured against."""

    names: tuple[str, ...]
    reference: Mapping[str, np.ndarray]
    prototype_dim: int | None = None

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(self.reference[n].shape) for n in self.names]


@dataclass
class RoundReplies:
    """What a collector hands the strategy: every sampled node sorted into one of four lists.

    ``mean``: the weighted mean of the accepted updates when only that is known (SecAgg+);
    ``metrics``: the collector's own figures for the round's train metrics."""

    sampled: int
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[NodeOutcome] = field(default_factory=list)
    failed: list[NodeOutcome] = field(default_factory=list)
    skipped: list[NodeOutcome] = field(default_factory=list)
    mean: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def check_update(arrays: Mapping[str, np.ndarray], expected: Expected) -> tuple[float, str | None]:
    """(update norm, None) for a usable update, else (NaN, why): the exact tensor set, shapes, finite values."""
    got, want = set(arrays), set(expected.names)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        return (
            math.nan,
            f"unexpected key set: {len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}",
        )
    squares = 0.0
    for name in expected.names:
        value, reference = arrays[name], expected.reference[name]
        if tuple(value.shape) != reference.shape:
            return math.nan, f"wrong shape for {name!r}: {tuple(value.shape)} != {reference.shape}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return math.nan, f"NaN/Inf in {name!r}"
        squares += float(np.sum((value.astype(np.float64) - reference) ** 2))
    return math.sqrt(squares), None


def check_weight(weight: Any, max_weight: float = math.inf) -> str | None:
    """Why an aggregation weight (a reply's num-examples) is unusable, or None."""
    if not isinstance(weight, int | float) or not math.isfinite(weight) or not 0 < weight <= max_weight:
        bound = "" if math.isinf(max_weight) else f" and <= {max_weight:g}"
        return f"'num-examples' missing or not > 0{bound}: {weight!r}"
    return None


def finite_prototypes(centroids: np.ndarray, sizes: np.ndarray) -> bool:
    return bool(np.isfinite(centroids).all() and np.isfinite(np.asarray(sizes, np.float64)).all())


def accept(
    node_id: int,
    partition_id: int | None,
    weight: float,
    metrics: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    prototypes: tuple[np.ndarray, np.ndarray] | None,
    expected: Expected,
) -> Accepted | NodeOutcome:
    """One plain train reply through every check: ``Accepted``, or the ``NodeOutcome`` that rejects it."""
    reason = check_weight(weight)
    norm = math.nan
    if reason is None:
        norm, reason = check_update(arrays, expected)
    if reason is None and prototypes is not None and not finite_prototypes(*prototypes):
        reason = "NaN/Inf in prototypes"
    if reason is not None:
        return NodeOutcome(node_id, partition_id, reason)
    return Accepted(node_id, partition_id, float(weight), metrics, dict(arrays), norm, prototypes)


def in_partition_order(accepted: Iterable[Accepted]) -> list[Accepted]:
    """Replies arrive in any order; aggregating in partition order makes a deployment and a simulation
    of the same run compute the same sums (and the same prototype clustering)."""
    return sorted(accepted, key=lambda a: (-1 if a.partition_id is None else int(a.partition_id), a.node_id))


def drop_norm_outliers(accepted: list[Accepted], factor: float | None) -> tuple[list[Accepted], list[NodeOutcome]]:
    """Reject updates with a norm >= ``factor`` x the round's median (needs >= 3 updates and a median > 0)."""
    if factor is None or len(accepted) < 3:
        return accepted, []
    median = float(np.median([a.update_norm for a in accepted]))
    if median <= 0:
        return accepted, []
    keep, rejected = [], []
    for a in accepted:
        if a.update_norm >= factor * median:
            reason = f"update norm {a.update_norm:.4g} >= {factor:g} x median {median:.4g}"
            rejected.append(NodeOutcome(a.node_id, a.partition_id, reason))
        else:
            keep.append(a)
    return keep, rejected


def weighted_means(records: Iterable[tuple[float, Mapping[str, Any]]]) -> tuple[dict[str, Any], float]:
    """(mean of each metric over the records that have it, weighted; total weight).

    Records with weight <= 0 are left out; a metric whose values are lists of different lengths is
    dropped (it cannot be averaged)."""
    sums: dict[str, Any] = {}
    totals: dict[str, float] = {}
    bad: set[str] = set()
    total = 0.0
    for weight, metrics in records:
        w = float(weight or 0)
        if not w > 0:
            continue
        total += w
        for key, value in metrics.items():
            if key in bad:
                continue
            val = np.asarray(value, dtype=np.float64)
            if key in sums and np.shape(sums[key]) != val.shape:
                bad.add(key)
                continue
            sums[key] = sums.get(key, 0.0) + w * val
            totals[key] = totals.get(key, 0.0) + w
    means: dict[str, Any] = {}
    for key, value in sums.items():
        if key not in bad:
            mean = value / totals[key]
            means[key] = [float(x) for x in mean] if np.ndim(mean) else float(mean)
    return means, total


def as_count(total: float) -> int | float:
    """A total weight as an int when it is whole (num-examples in the metrics)."""
    return int(total) if float(total).is_integer() else total
