"""Collecting a round's replies (``strategies/collect.py``) and the strategy's ``aggregate_round``.

Real Flower messages built by the real ``FedDMMRStrategy.configure_train``; replies built with the
typed ``TrainReply`` as the ClientApp builds them; a grid that is just a function per node.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata

from benchmarks.harness import server_identity
from feddmmr_flower.replies import RoundReplies
from feddmmr_wire import TrainReply, read_arrays, to_record
from strategies import FedDMMRStrategy, PlainCollector, read_train_replies

SHAPES = {"emb": (4, 2), "w": (2, 2), "b": (2,)}
TRAINED = ["emb", "w"]


@pytest.fixture(autouse=True)
def identity():
    with server_identity():
        yield


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        raise AssertionError("the collector must use its exchange")


def _strategy(pack_wire: bool) -> FedDMMRStrategy:
    return FedDMMRStrategy(
        schedule="pretrain:2",
        base="fedavg",
        base_kwargs={"min_available_nodes": 1, "min_train_nodes": 1, "fraction_train": 1.0},
        trainable_names={"pretrain": TRAINED},
        pack_wire=pack_wire,
    )


def _global() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return to_record({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})


def _reply(ins: Message, shift: float, weight: int, pid: int) -> Message:
    full = read_arrays(ins.content)
    arrays = {k: full[k] + shift for k in TRAINED}
    reply = TrainReply(arrays, weight, pid, {"loss": float(pid)}, np.zeros((0, 3), np.float32), np.zeros(0))
    return Message(reply.to_content(packed="layout" in ins.content.config_records), reply_to=ins)


def _round(pack_wire: bool) -> tuple[FedDMMRStrategy, list[Message]]:
    strategy = _strategy(pack_wire)
    instructions = list(strategy.configure_train(1, _global(), ConfigRecord({"client-lr": 0.1}), Grid([1, 2, 3])))
    return strategy, sorted(instructions, key=lambda m: m.metadata.dst_node_id)


def test_plain_and_packed_replies_are_collected_and_aggregated_alike():
    results = {}
    for packed in (False, True):
        strategy, instructions = _round(packed)
        replies = [_reply(m, 0.1 * (i + 1), i + 1, i) for i, m in enumerate(instructions)]
        collected = PlainCollector(exchange=lambda grid, msgs, timeout, replies=replies: replies).collect(
            1, instructions, Grid([1, 2, 3]), strategy.round.expected
        )
        assert [a.partition_id for a in collected.accepted] == [0, 1, 2] and not collected.rejected
        arrays, metrics = strategy.aggregate_round(1, collected)
        results[packed] = ({a.node_id: a.update_norm for a in collected.accepted}, arrays, dict(metrics))
    (norms_a, arrays_a, metrics_a), (norms_b, arrays_b, metrics_b) = results[False], results[True]
    assert norms_a == norms_b and metrics_a == metrics_b
    for name in SHAPES:
        assert np.array_equal(arrays_a[name].numpy(), arrays_b[name].numpy())
    expected = _global()["w"].numpy() + (1 * 0.1 + 2 * 0.2 + 3 * 0.3) / 6
    np.testing.assert_allclose(arrays_a["w"].numpy(), expected, rtol=1e-6)


def test_every_sampled_node_ends_up_in_exactly_one_list():
    strategy, (a, b, c) = _round(pack_wire=True)
    skipped = Message(TrainReply.nothing_to_train(1, "no training position").to_content(packed=True), reply_to=b)
    # an error reply the SuperLink sends on the node's behalf (its source is the SuperLink, node 0):
    # mapped back to the node through the id of the message sent to it
    error = Message(error=Error(code=2, reason="node gone"), metadata=_metadata(c, "", src=0, reply_to="mid-c"))
    sent = [a, _with_id(b, "mid-b"), _with_id(c, "mid-c")]
    collected = read_train_replies(sent, [_reply(a, 0.1, 2, 0), skipped, error], strategy.round.expected)
    assert [x.node_id for x in collected.accepted] == [a.metadata.dst_node_id]
    assert [(x.node_id, x.reason) for x in collected.skipped] == [(b.metadata.dst_node_id, "no training position")]
    assert [x.node_id for x in collected.failed] == [c.metadata.dst_node_id]
    _, metrics = strategy.aggregate_round(1, collected)
    assert (metrics["num-accepted"], metrics["num-skipped"], metrics["num-failed"], metrics["num-rejected"]) == (
        1,
        1,
        1,
        0,
    )
    assert strategy.skipped[1] == [
        {"node_id": b.metadata.dst_node_id, "partition_id": 1, "reason": "no training position"}
    ]


def test_a_node_that_never_answers_is_a_failure_and_a_mean_replaces_the_updates():
    strategy, instructions = _round(pack_wire=False)
    collected = read_train_replies(instructions, [_reply(instructions[0], 0.5, 4, 0)], strategy.round.expected)
    assert sorted(x.reason for x in collected.failed) == ["no reply before the timeout"] * 2
    # Only the weighted mean known (as under SecAgg+): the strategy aggregates that, no norm filter.
    mean = {k: v + 1.0 for k, v in strategy.round.expected.reference.items()}
    secure = RoundReplies(
        sampled=3, accepted=collected.accepted, mean={k: v.astype(np.float32) for k, v in mean.items()}
    )
    for a in secure.accepted:  # what the SecAgg+ collector knows of a reply
        a.arrays, a.update_norm = None, float("nan")
    arrays, metrics = strategy.aggregate_round(1, secure)
    np.testing.assert_allclose(arrays["emb"].numpy(), _global()["emb"].numpy() + 1.0, rtol=1e-6)
    assert metrics["num-accepted"] == 1 and "update-norm-median" not in metrics


def _metadata(ins: Message, message_id: str, src: int | None = None, reply_to: str = "") -> Metadata:
    m = ins.metadata
    return Metadata(
        run_id=m.run_id,
        message_id=message_id,
        src_node_id=m.src_node_id if src is None else src,
        dst_node_id=m.dst_node_id,
        reply_to_message_id=reply_to,
        group_id=m.group_id,
        created_at=m.created_at,
        ttl=m.ttl,
        message_type=m.message_type,
    )


def _with_id(ins: Message, message_id: str) -> Message:
    """The instruction as the grid returns it after pushing: with its message id."""
    return Message(ins.content, metadata=_metadata(ins, message_id))
