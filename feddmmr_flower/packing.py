"""Many named float32 arrays as one flat array plus a layout, for the wire.

Flower 1.41 moves every array of a message as an object of its own, and in a deployment each
object costs a round trip: 48 arrays of 5,000 floats took 17-22 s per round against 6.5 s for the
same floats in 4 arrays (benchmarks/deployment_overhead.py). Packing is exact (a copy, no
conversion), so aggregation, validation and everything after unpacking are unchanged.
"""

from __future__ import annotations

import json

import numpy as np


def packable(arrays: dict[str, np.ndarray]) -> bool:
    return len(arrays) > 1 and all(np.asarray(a).dtype == np.float32 for a in arrays.values())


def pack(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """(flat float32 vector, JSON layout [[name, shape], ...]) in the arrays' order."""
    layout = [[name, list(np.shape(value))] for name, value in arrays.items()]
    flat = (
        np.concatenate([np.ascontiguousarray(v, dtype=np.float32).ravel() for v in arrays.values()])
        if arrays
        else np.zeros(0, np.float32)
    )
    return flat, json.dumps(layout)


def unpack(flat: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """The inverse of ``pack``; a vector that does not match its layout is an error, not a guess."""
    try:
        entries = [(str(name), tuple(int(d) for d in shape)) for name, shape in json.loads(layout)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"packed arrays: unreadable layout ({exc})") from None
    sizes = [int(np.prod(shape)) for _, shape in entries]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(
            f"packed arrays: vector of shape {flat.shape} does not match its layout "
            f"({sum(sizes)} values in {len(entries)} arrays)"
        )
    out, start = {}, 0
    for (name, shape), size in zip(entries, sizes):
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out
