"""Messages with the model packed into one array (see feddmmr_flower/packing.py for why).

The server packs what it sends (``pack_content``) and reads replies with ``read_arrays``. On
the client, the ClientApp reads packed and plain records alike (``read_arrays``) and packs its
reply when the server packed (``arrays_record``); the outermost mod (``wire_mod``) unpacks only
when a privacy mod needs named arrays.

Flower's ``Array(ndarray)`` and ``Array.numpy()`` go through ``np.save``/``np.load``, whose header
parsing (``ast.literal_eval``) costs ~50 µs an array; with ~60 arrays a message that was the
largest cost of a simulated round outside training (benchmarks/profile_round.py). ``to_array`` and
``from_array`` write and read the same .npy bytes directly.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from feddmmr_flower.packing import pack, packable, unpack

ARRAYS, LAYOUT, PACKED = "arrays", "layout", "packed"
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
    return {} if record is None else {name: from_array(array) for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: to_array(value) for name, value in arrays.items()})


def read_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """The named model arrays of a message, packed or not."""
    record = content.array_records.get(ARRAYS)
    layout = content.config_records.get(LAYOUT)
    if layout is None:
        return to_numpy(record)
    if record is None or PACKED not in record:
        raise ValueError("packed message: a layout but no packed arrays")
    return unpack(from_array(record[PACKED]), str(layout[ARRAYS]))


def arrays_record(arrays: dict[str, np.ndarray], packed: bool) -> dict:
    """Reply records for the model arrays: packed (with its layout) when ``packed`` and possible."""
    if not packed or not packable(arrays):
        return {ARRAYS: to_record(arrays)}
    flat, layout = pack(arrays)
    return {ARRAYS: ArrayRecord({PACKED: to_array(flat)}), LAYOUT: ConfigRecord({ARRAYS: layout})}


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with its "arrays" record packed (unchanged when there is nothing to gain)."""
    record = content.array_records.get(ARRAYS)
    if record is None or LAYOUT in content.config_records:
        return content
    arrays = to_numpy(record)
    if not packable(arrays):
        return content
    return RecordDict({**dict(content), **arrays_record(arrays, packed=True)})


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of ``pack_content`` (content without a layout is returned as it is)."""
    if LAYOUT not in content.config_records:
        return content
    arrays = read_arrays(content)
    plain = RecordDict({k: v for k, v in content.items() if k != LAYOUT})
    plain[ARRAYS] = to_record(arrays)
    return plain


def _privacy_mod_reads_arrays(msg: Message, context: Context) -> bool:
    """DP clipping and noise (client_app/privacy_mods.py) work on named arrays of train messages."""
    return msg.metadata.message_type == MessageType.TRAIN and str(context.run_config.get("dp-mode", "off")) != "off"


def wire_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Unpack the incoming model for the privacy mods (when they need it) and pack the reply again."""
    if msg.has_error() or LAYOUT not in msg.content.config_records or not _privacy_mod_reads_arrays(msg, context):
        return call_next(msg, context)  # the ClientApp reads packed arrays itself
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = pack_content(reply.content)
    return reply
