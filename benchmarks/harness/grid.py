"""A Grid whose nodes are ClientApp calls in this process, with Flower's wire format in between.

Every node has its own ``Context`` (partition id, state). A message is serialised to Flower's
protobuf and back (``flwr.common.serde``) and gets a message id on the way, as a SuperLink gives it;
the reply travels back the same way. ``tap`` sees each (instruction, serialised reply bytes, reply)
as it would cross the network. Seconds per round here exclude Ray and process start-up, so they
isolate what a feature costs in compute. Only Flower's public API is used: the ServerApp's task
identity through ``TaskIdentity``'s setters, message ids through the protobuf message.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from client_app.app import train as client_train
from feddmmr_wire.keys import NUM_PARTITIONS, PARTITION_ID

CLIENT_EXCEPTION = 400  # the code Flower puts on a reply whose ClientApp raised

Tap = Callable[[Message, bytes, Message], None]


def wire(msg: Message, message_id: str = "") -> tuple[bytes, Message]:
    """``msg`` through Flower's protobuf format: (its bytes, the message read back)."""
    proto = message_to_proto(msg)
    if message_id:
        proto.metadata.message_id = message_id  # as the SuperLink does on push
    data = proto.SerializeToString()
    return data, message_from_proto(type(proto).FromString(data))


@contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """What a ServerApp process gets from Flower: instruction messages read these ids."""
    saved = {}
    for name in ("run_id", "node_id", "task_id"):
        try:
            saved[name] = getattr(TaskIdentity, name)
        except RuntimeError:  # not set in this process
            saved[name] = None
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class InProcessGrid:
    def __init__(self, run_config: dict, num_nodes: int, tap: Tap | None = None, first_node_id: int = 1001) -> None:
        self.contexts = {
            first_node_id + p: Context(
                run_id=1,
                node_id=first_node_id + p,
                state=RecordDict(),
                run_config=dict(run_config),
                node_config={PARTITION_ID: p, NUM_PARTITIONS: num_nodes},
            )
            for p in range(num_nodes)
        }
        self.tap = tap
        self.bytes_sent = 0
        self.bytes_received = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            sent, received = wire(msg, uuid.uuid4().hex)
            self.bytes_sent += len(sent)
            try:
                reply = client_app(received, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as Flower: a raising ClientApp becomes an error reply
                reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
                traceback.clear_frames(exc.__traceback__)
            data, back = wire(reply, uuid.uuid4().hex)
            self.bytes_received += len(data)
            if self.tap is not None:
                self.tap(msg, data, back)
            replies.append(back)
        return replies


def direct_exchange(grid: InProcessGrid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Train messages straight into the ClientApp's train handler: no serialisation, no mods (the
    floor of a round: the client and server computations alone). A ``collect.Exchange``."""
    return [client_train(msg, grid.contexts[msg.metadata.dst_node_id]) for msg in messages]
