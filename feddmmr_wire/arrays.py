"""Numpy <-> Flower ``Array`` without ``np.save``/``np.load``, and whole records of them.

Flower's ``Array(ndarray)`` and ``Array.numpy()`` go through ``np.save``/``np.load``, whose header
parsing (``ast.literal_eval``) costs ~50 µs an array; with ~60 arrays a message that was the
largest cost of a simulated round outside training (benchmarks/profile_round.py). ``to_array`` and
``from_array`` write and read the same .npy bytes directly (byte-identical, tested).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(value: np.ndarray) -> Array:
    """``Array(value)`` with the same bytes, without ``np.save``."""
    value = np.asarray(value)
    if value.dtype.hasobject:
        return Array(value)  # Flower refuses it with its own message
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)  # keeps 0-d shapes (np.ascontiguousarray alone would not)
    data = _npy_header(np.lib.format.dtype_to_descr(value.dtype), value.shape) + value.tobytes()
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=data)


def from_array(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable copy) without ``np.load``."""
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != _NPY_MAGIC or data[6] != 1:
        return array.numpy()
    start = 10 + int.from_bytes(data[8:10], "little")
    header = bytes(data[10:start])
    if b"'fortran_order': False" not in header:
        return array.numpy()
    descr = header.split(b"'descr': '", 1)[1].split(b"'", 1)[0].decode()
    shape = tuple(array.shape)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=np.dtype(descr), count=count, offset=start).reshape(shape).copy()


def to_numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    """Every array of a record as numpy ({} for no record)."""
    return {} if record is None else {name: from_array(array) for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: to_array(value) for name, value in arrays.items()})
