"""The server's global prototypes: what is sent, and how the clients' released ones are merged in.

A Flower-free merge lives in ``feddmmr_flower.prototype_aggregation``; this module holds the
strategy's settings for it and turns its per-client refusals into node outcomes to record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feddmmr_flower.prototype_aggregation import Metric, aggregate_prototypes
from feddmmr_flower.replies import Accepted, NodeOutcome


@dataclass(frozen=True)
class PrototypeOptions:
    """Server-side prototype aggregation (``feddmmr_flower.prototype_aggregation``).

    ``dim``: the prototype width P (None: the model has no prototypes, none are sent)."""

    num: int = 5
    ema: float = 0.5
    seed: int = 0
    dim: int | None = None
    metric: Metric = "cosine"


def prototype_payload(options: PrototypeOptions, prototypes: np.ndarray | None) -> np.ndarray | None:
    """The global prototypes to send: [K, P], [0, P] while none exist, None without prototypes."""
    if prototypes is None and options.dim:
        return np.zeros((0, options.dim), np.float32)
    return prototypes


def merge_prototypes(
    options: PrototypeOptions, current: np.ndarray | None, accepted: list[Accepted]
) -> tuple[np.ndarray | None, list[NodeOutcome]]:
    """(the new global prototypes, the replies whose prototypes were ignored and why)."""
    with_protos = [a for a in accepted if a.prototypes is not None]
    if not with_protos:
        return current, []
    result = aggregate_prototypes(
        current,
        [a.prototypes for a in with_protos],  # type: ignore[misc]
        num_prototypes=options.num,
        ema=options.ema,
        metric=options.metric,
        seed=options.seed,
        dim=options.dim,
    )
    ignored = [
        NodeOutcome(with_protos[i].node_id, with_protos[i].partition_id, f"prototypes ignored: {reason}")
        for i, reason in result.rejected
    ]
    return (current if result.prototypes is None else result.prototypes), ignored
