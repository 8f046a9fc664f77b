"""The outermost client mod: the model arrives packed into one array (``feddmmr_wire.packing``).

The ClientApp reads packed and plain messages alike and packs its reply when the server packed,
so this mod only unpacks when a privacy mod needs named arrays: DP clipping and noise
(``privacy_mods.py``) work on the named arrays of train messages.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MessageType

from feddmmr_wire import is_packed, pack_content, unpack_content

from .context import experiment_config


def _privacy_mod_reads_arrays(msg: Message, context: Context) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and experiment_config(context).dp_mode != "off"


def wire_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Unpack the incoming model for the privacy mods (when they need it) and pack the reply again."""
    if msg.has_error() or not is_packed(msg.content) or not _privacy_mod_reads_arrays(msg, context):
        return call_next(msg, context)  # the ClientApp reads packed arrays itself
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = pack_content(reply.content)
    return reply
