"""The real ClientApp and ServerApp round loop in one process, messages through Flower's wire format.

``InProcessGrid`` gives each simulated node its own ``Context`` (partition id, state) and hands
every message to the real ``client_app.app.app`` (with its mods) after a protobuf round trip
(``flwr.common.serde``), as a SuperLink would; replies come back the same way. ``tap`` sees each
(instruction, serialised reply bytes, reply) as it would cross the network. Seconds per round here
exclude Ray and process start-up, so they isolate what a feature costs in compute.

``run_federation`` runs a whole ``FederatedRun`` this way: the same strategy, client code and
outputs as ``flwr run``, only without Ray and the SuperLink. The benchmarks use it for the
3-seed quality table (a ``flwr run`` of 943 nodes costs ~3 s per round here, this ~1 s), and tests
use it to inspect every message.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from feddmmr_flower.config import ExperimentConfig

CLIENT_EXCEPTION = 400  # the code Flower puts on a reply whose ClientApp raised

Tap = Callable[[Message, bytes, Message], None]


def wire(msg: Message) -> tuple[bytes, Message]:
    proto = message_to_proto(msg)
    data = proto.SerializeToString()
    return data, message_from_proto(type(proto).FromString(data))


class InProcessGrid:
    def __init__(self, run_config: dict, num_nodes: int, tap: Tap | None = None, first_node_id: int = 1001) -> None:
        self.contexts = {
            first_node_id + p: Context(
                run_id=1,
                node_id=first_node_id + p,
                state=RecordDict(),
                run_config=dict(run_config),
                node_config={"partition-id": p, "num-partitions": num_nodes},
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
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does on push
            size, received = wire(msg)
            self.bytes_sent += len(size)
            node = msg.metadata.dst_node_id
            try:
                reply = client_app(received, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - as Flower: a raising ClientApp becomes an error reply
                reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
                traceback.clear_frames(exc.__traceback__)
            data, back = wire(reply)
            self.bytes_received += len(data)
            if self.tap is not None:
                self.tap(msg, data, back)
            replies.append(back)
        return replies


def run_federation(run_config: dict, num_nodes: int, tap: Tap | None = None) -> dict:
    """One ``FederatedRun`` over an ``InProcessGrid`` of ``num_nodes`` users; returns its summary."""
    from server_app.federation import FederatedRun  # the ServerApp's round loop

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    # What a ServerApp process gets from Flower: instruction messages read these ids.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    try:
        cfg = ExperimentConfig.from_flat(run_config)
        return FederatedRun(InProcessGrid(cfg.flat(), num_nodes, tap), cfg).run()
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
