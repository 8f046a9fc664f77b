"""The model on the wire as one flat float32 array plus a layout.

Flower 1.41 moves every array of a message as an object of its own, and in a deployment each
object costs a round trip: 48 arrays of 5,000 floats took 17-22 s per round against 6.5 s for the
same floats in 4 arrays (benchmarks/deployment_overhead.py). Packing is exact (a copy, no
conversion), so aggregation, validation and everything after unpacking are unchanged.

A packed message holds ``ARRAYS = {PACKED: vector}`` and a ``LAYOUT`` ConfigRecord. The server packs
what it sends; a client reads packed and plain messages alike (``read_arrays``) and packs its reply
when the server packed (``arrays_records``).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .arrays import from_array, to_array, to_numpy, to_record
from .keys import ARRAYS, LAYOUT, PACKED


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


def read_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """The named model arrays of a message, packed or not."""
    record = content.array_records.get(ARRAYS)
    layout = content.config_records.get(LAYOUT)
    if layout is None:
        return to_numpy(record)
    if record is None or PACKED not in record:
        raise ValueError("packed message: a layout but no packed arrays")
    return unpack(from_array(record[PACKED]), str(layout[ARRAYS]))


def arrays_records(arrays: dict[str, np.ndarray], packed: bool) -> dict:
    """The records carrying ``arrays``: packed (with its layout) when ``packed`` and possible."""
    if not packed or not packable(arrays):
        return {ARRAYS: to_record(arrays)}
    flat, layout = pack(arrays)
    return {ARRAYS: ArrayRecord({PACKED: to_array(flat)}), LAYOUT: ConfigRecord({ARRAYS: layout})}


def is_packed(content: RecordDict) -> bool:
    return LAYOUT in content.config_records


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with its ARRAYS record packed (unchanged when there is nothing to gain)."""
    record = content.array_records.get(ARRAYS)
    if record is None or is_packed(content):
        return content
    arrays = to_numpy(record)
    if not packable(arrays):
        return content
    return RecordDict({**dict(content), **arrays_records(arrays, packed=True)})


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of ``pack_content`` (content without a layout is returned as it is)."""
    if not is_packed(content):
        return content
    arrays = read_arrays(content)
    plain = RecordDict({k: v for k, v in content.items() if k != LAYOUT})
    plain[ARRAYS] = to_record(arrays)
    return plain
