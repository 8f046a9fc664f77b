"""The wire (``feddmmr_wire``): the packed model, the fast array conversion, the typed messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client_app.wire_mod import wire_mod
from feddmmr_wire import (
    arrays_records,
    from_array,
    pack,
    pack_content,
    packable,
    read_arrays,
    to_array,
    unpack,
    unpack_content,
)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb.weight": rng.standard_normal((7, 4)).astype(np.float32),
        "ln.bias": rng.standard_normal(4).astype(np.float32),
        "scalar": np.float32(rng.standard_normal(())),
    }


def test_pack_round_trip_is_exact_and_keeps_order():
    arrays = _arrays()
    flat, layout = pack(arrays)
    assert flat.shape == (7 * 4 + 4 + 1,) and flat.dtype == np.float32
    back = unpack(flat, layout)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].shape == np.shape(value) and np.array_equal(back[name], value)


@pytest.mark.parametrize(
    "flat, layout, problem",
    [
        (np.zeros(5, np.float32), '[["a", [2, 2]]]', "does not match"),
        (np.zeros((2, 2), np.float32), '[["a", [2, 2]]]', "does not match"),
        (np.zeros(4, np.float32), "not json", "unreadable layout"),
    ],
)
def test_a_vector_that_does_not_fit_its_layout_is_refused(flat, layout, problem):
    with pytest.raises(ValueError, match=problem):
        unpack(flat, layout)


def test_only_several_float32_arrays_are_packed():
    assert packable(_arrays())
    assert not packable({"one": np.zeros(3, np.float32)})
    assert not packable({"a": np.zeros(3, np.float32), "ids": np.zeros(3, np.int64)})


def _content(arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "prototypes": ArrayRecord({"centroids": Array(np.ones((2, 3), np.float32))}),
            "config": ConfigRecord({"stage": "pretrain"}),
        }
    )


def test_content_packs_into_one_array_and_back():
    packed = pack_content(_content(_arrays()))
    assert list(packed.array_records["arrays"]) == ["packed"]
    assert "centroids" in packed.array_records["prototypes"] and packed.config_records["config"]["stage"] == "pretrain"
    plain = unpack_content(packed)
    assert "layout" not in plain.config_records
    for name, value in _arrays().items():
        assert np.array_equal(plain.array_records["arrays"][name].numpy(), np.asarray(value))


def _message(content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=3,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def test_with_dp_the_client_mod_shows_the_app_named_arrays_and_packs_its_reply():
    seen = {}

    def app(msg: Message, context: Context) -> Message:
        assert "layout" not in msg.content.config_records  # the DP mods clip named arrays
        seen.update({k: v.numpy() for k, v in msg.content.array_records["arrays"].items()})
        update = {k: v + 1 for k, v in seen.items()}
        return Message(content=_content(update), reply_to=msg)

    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={"dp-mode": "local"})
    reply = wire_mod(_message(pack_content(_content(_arrays()))), context, app)
    assert set(seen) == set(_arrays())
    assert list(reply.content.array_records["arrays"]) == ["packed"]
    back = unpack_content(reply.content).array_records["arrays"]
    assert np.array_equal(back["emb.weight"].numpy(), _arrays()["emb.weight"] + 1)


def test_without_dp_the_app_reads_the_packed_model_and_replies_packed():
    def app(msg: Message, context: Context) -> Message:
        arrays = read_arrays(msg.content)
        assert list(arrays) == list(_arrays())
        update = {k: v + 1 for k, v in arrays.items()}
        return Message(
            content=RecordDict(arrays_records(update, packed="layout" in msg.content.config_records)), reply_to=msg
        )

    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={"dp-mode": "off"})
    reply = wire_mod(_message(pack_content(_content(_arrays()))), context, app)
    assert list(reply.content.array_records["arrays"]) == ["packed"]
    back = read_arrays(reply.content)
    for name, value in _arrays().items():
        assert back[name].shape == np.shape(value) and np.array_equal(back[name], np.asarray(value) + 1)


@pytest.mark.parametrize(
    "value",
    [
        np.array(3.0, np.float32),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5),
        np.array([True, False]),
        np.zeros((0, 5), np.float32),
        np.arange(12.0).reshape(3, 4).T,
        np.array([1, 2], dtype=">i4"),
    ],
)
def test_fast_array_conversion_writes_and_reads_what_flower_does(value):
    ours, flowers = to_array(value), Array(np.ascontiguousarray(value) if value.ndim else value)
    assert ours.data == flowers.data and ours.dtype == flowers.dtype and tuple(ours.shape) == tuple(flowers.shape)
    for array in (ours, flowers):
        back = from_array(array)
        assert back.dtype == value.dtype and back.shape == value.shape and np.array_equal(back, value)
        assert back.flags.writeable


def test_the_client_mod_leaves_unpacked_messages_alone():
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    reply = wire_mod(
        _message(_content(_arrays())), context, lambda msg, ctx: Message(content=_content(_arrays(1)), reply_to=msg)
    )
    assert "packed" not in reply.content.array_records["arrays"]


# ------------------------------------------------------------------ typed messages
def test_train_instruction_round_trip_packed_and_plain():
    from feddmmr_wire import TrainInstruction, round_entries, train_settings

    config = {**dict(train_settings(0.05, 2, "run-x", clipping_norm=0.1)), **round_entries(7, "align", 2)}
    prototypes = np.ones((3, 5), np.float32)
    for packed in (False, True):
        content = TrainInstruction(_arrays(), prototypes, config).to_content(packed)
        assert ("layout" in content.config_records) == packed
        back = TrainInstruction.from_content(content)
        assert list(back.arrays) == list(_arrays()) and np.array_equal(back.prototypes, prototypes)
        assert (back.server_round, back.stage, back.client_lr, back.local_epochs, back.run_key) == (
            7,
            "align",
            0.05,
            2,
            "run-x",
        )
        assert back.proximal_mu == 0.0 and back.config["clipping_norm"] == 0.1 and back.config["stage-round"] == 2
    lacking = TrainInstruction.from_content(
        TrainInstruction(_arrays(), None, round_entries(1, "pretrain")).to_content(True)
    )
    assert lacking.prototypes is None
    with pytest.raises(ValueError, match="'client-lr'"):
        _ = lacking.client_lr


def test_evaluate_instruction_and_reply_round_trip():
    from feddmmr_wire import EvaluateInstruction, EvaluateReply, evaluate_settings

    content = EvaluateInstruction(_arrays(), None, {**dict(evaluate_settings("run-y")), "split": "test"}).to_content(
        True
    )
    back = EvaluateInstruction.from_content(content)
    assert back.split == "test" and back.run_key == "run-y" and set(back.arrays) == set(_arrays())
    reply = EvaluateReply.from_content(EvaluateReply({"NDCG@10": 0.5, "full-HR@10": 0.25}, 4).to_content())
    assert reply.metrics == {"NDCG@10": 0.5, "full-HR@10": 0.25} and reply.partition_id == 4 and reply.num_examples == 1


@pytest.mark.parametrize("packed", [False, True])
def test_train_reply_round_trip(packed):
    from feddmmr_wire import TrainReply

    centroids, sizes = np.ones((2, 4), np.float32), np.array([3.0, 5.0], np.float32)
    sent = TrainReply(_arrays(), 17, 3, {"loss": 1.5, "memory-size": 4.0}, centroids, sizes)
    back = TrainReply.from_content(sent.to_content(packed))
    assert (back.num_examples, back.partition_id, back.metrics, back.status) == (17, 3, sent.metrics, "ok")
    assert np.array_equal(back.centroids, centroids) and np.array_equal(back.sizes, sizes)
    for name, value in _arrays().items():
        assert np.array_equal(back.arrays[name], value)


def test_a_reply_with_nothing_to_train_says_so():
    from feddmmr_wire import TrainReply, TrainStatus

    content = TrainReply.nothing_to_train(5, "no training position", {"loss": 0.0}).to_content(packed=True)
    assert "arrays" not in content.array_records
    back = TrainReply.from_content(content)
    assert (back.status, back.reason, back.partition_id, back.num_examples) == (
        TrainStatus.NOTHING_TO_TRAIN,
        "no training position",
        5,
        0,
    )


@pytest.mark.parametrize(
    "records, reason",
    [
        ({}, "no 'metrics' MetricRecord"),
        ({"metrics": MetricRecord({"partition-id": 4})}, "'num-examples' missing"),
        ({"metrics": MetricRecord({"num-examples": 3, "partition-id": 4})}, "no 'arrays' ArrayRecord"),
        (
            {
                "metrics": MetricRecord({"num-examples": 3, "partition-id": 4}),
                "arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
                "layout": ConfigRecord({"arrays": '[["w", [3]]]'}),
            },
            "a layout but no packed arrays",
        ),
        (
            {"metrics": MetricRecord({"num-examples": 3}), "status": ConfigRecord({"code": "tired"})},
            "unknown reply status 'tired'",
        ),
    ],
)
def test_a_malformed_train_reply_names_its_problem_and_user(records, reason):
    from feddmmr_wire import MessageError, TrainReply

    with pytest.raises(MessageError, match=reason) as info:
        TrainReply.from_content(RecordDict(records))
    assert info.value.partition_id == (4 if "partition-id" in records.get("metrics", {}) else None)


def test_secagg_plaintext_round_trip():
    from feddmmr_wire import SecAggPlaintext, TrainReply
    from feddmmr_wire.keys import SECAGG_EXTRAS

    plain = SecAggPlaintext(["a", "b"], "non-finite", np.ones((1, 3), np.float32), np.array([4.0], np.float32))
    content = RecordDict(
        {SECAGG_EXTRAS: plain.to_record(), "metrics": MetricRecord({"num-examples": 9, "partition-id": 2})}
    )
    reply, back = TrainReply.from_secagg_content(content)
    assert back.array_names == ["a", "b"] and back.withheld == "non-finite" and reply.arrays == {}
    assert (reply.num_examples, reply.partition_id) == (9, 2) and np.array_equal(reply.centroids, plain.centroids)
