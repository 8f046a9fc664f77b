"""Collecting a round's train replies: the step between "instructions built" and "aggregate".

A ``Collector`` gets the round's instruction messages, the grid and what a reply must hold
(``Expected``), and returns ``RoundReplies``: the accepted replies (or, under SecAgg+, only their
weighted mean) and every other sampled node sorted into rejected / failed / skipped. The round loop
(``server_app/federation.py``) is given one: ``PlainCollector`` here, ``SecAggPlusCollector`` in
``secagg.py``. Both move messages through an ``Exchange`` (default: ``grid.send_and_receive``), so a
different transport (e.g. push/pull with a round deadline) is one function to swap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from feddmmr_flower.replies import Expected, NodeOutcome, RoundReplies, accept
from feddmmr_wire import MessageError, TrainReply, TrainStatus

#: (grid, messages, timeout) -> the replies that came back.
Exchange = Callable[[Grid, list[Message], float | None], Iterable[Message]]


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Flower's own exchange: push every message, wait for every reply (or the timeout)."""
    return list(grid.send_and_receive(messages, timeout=timeout))


class Collector(Protocol):
    def collect(
        self, server_round: int, instructions: list[Message], grid: Grid, expected: Expected
    ) -> RoundReplies: ...


def reply_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for. Error replies may carry the SuperLink as source: map them back
    through the id of the message we sent (``sent``: message id -> node)."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def sent_ids(instructions: list[Message]) -> dict[str, int]:
    return {m.metadata.message_id: m.metadata.dst_node_id for m in instructions if m.metadata.message_id}


def unanswered(instructions: list[Message], answered: set[int], reasons: dict[int, str], default: str) -> list:
    """A failure for every node that was sent an instruction and did not answer."""
    return [
        NodeOutcome(m.metadata.dst_node_id, None, reasons.get(m.metadata.dst_node_id, default))
        for m in instructions
        if m.metadata.dst_node_id not in answered
    ]


def error_reason(reply: Message) -> str:
    return f"error reply (code {reply.error.code}): {reply.error.reason}"


def read_train_replies(instructions: list[Message], replies: Iterable[Message], expected: Expected) -> RoundReplies:
    """Parse and check every plain train reply; every sampled node ends up in exactly one list."""
    sent = sent_ids(instructions)
    out = RoundReplies(sampled=len(instructions))
    answered: set[int] = set()
    for msg in replies:
        node = reply_node(msg, sent)
        answered.add(node)
        if msg.has_error():
            out.failed.append(NodeOutcome(node, None, error_reason(msg)))
            continue
        try:
            reply = TrainReply.from_content(msg.content)
        except MessageError as exc:
            out.rejected.append(NodeOutcome(node, exc.partition_id, str(exc)))
            continue
        if reply.status == TrainStatus.NOTHING_TO_TRAIN:
            out.skipped.append(NodeOutcome(node, reply.partition_id, reply.reason or "nothing to train"))
            continue
        prototypes = None if reply.centroids is None else (reply.centroids, reply.sizes)
        result = accept(node, reply.partition_id, reply.num_examples, reply.metrics, reply.arrays, prototypes, expected)
        (out.accepted if not isinstance(result, NodeOutcome) else out.rejected).append(result)  # type: ignore[arg-type]
    out.failed += unanswered(instructions, answered, {}, "no reply before the timeout")
    return out


class PlainCollector:
    """Send the instructions, read every reply, check each one (``feddmmr_flower.replies.accept``)."""

    def __init__(self, exchange: Exchange = send_and_receive, timeout: float | None = None) -> None:
        self.exchange, self.timeout = exchange, timeout

    def collect(self, server_round: int, instructions: list[Message], grid: Grid, expected: Expected) -> RoundReplies:
        return read_train_replies(instructions, self.exchange(grid, instructions, self.timeout), expected)
