"""The model travels as one packed array (Flower's per-array cost in a deployment, see packing.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.wire import arrays_record, from_array, pack_content, read_arrays, to_array, unpack_content, wire_mod
from feddmmr_flower.packing import pack, packable, unpack


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
            content=RecordDict(arrays_record(update, packed="layout" in msg.content.config_records)), reply_to=msg
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
