"""Messages with the model packed into one array (see feddmmr_flower/packing.py for why).

The server packs what it sends (``pack_content``) and unpacks replies (``unpack_message``); the
client's outermost mod (``wire_mod``) unpacks what arrives and packs its reply, so the privacy
mods and the ClientApp itself only ever see named arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from feddmmr_flower.packing import pack, packable, unpack

ARRAYS, LAYOUT, PACKED = "arrays", "layout", "packed"


def to_numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {} if record is None else {name: array.numpy() for name, array in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with its "arrays" record packed (unchanged when there is nothing to gain)."""
    record = content.array_records.get(ARRAYS)
    if record is None:
        return content
    arrays = to_numpy(record)
    if not packable(arrays):
        return content
    flat, layout = pack(arrays)
    packed = RecordDict(dict(content))
    packed[ARRAYS] = ArrayRecord({PACKED: Array(flat)})
    packed[LAYOUT] = ConfigRecord({ARRAYS: layout})
    return packed


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of ``pack_content`` (content without a layout is returned as it is)."""
    layout = content.config_records.get(LAYOUT)
    if layout is None:
        return content
    record = content.array_records.get(ARRAYS)
    if record is None or PACKED not in record:
        raise ValueError("packed message: a layout but no packed arrays")
    arrays = unpack(record[PACKED].numpy(), str(layout[ARRAYS]))
    plain = RecordDict({k: v for k, v in content.items() if k != LAYOUT})
    plain[ARRAYS] = ArrayRecord({name: Array(value) for name, value in arrays.items()})  # keeps 0-d shapes
    return plain


def unpack_message(msg: Message) -> Message:
    """A reply with its arrays unpacked in place (error replies pass through)."""
    if not msg.has_error():
        msg.content = unpack_content(msg.content)
    return msg


def wire_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Unpack the incoming model; pack the reply's arrays when the server packed its message."""
    if msg.has_error() or LAYOUT not in msg.content.config_records:
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = pack_content(reply.content)
    return reply
