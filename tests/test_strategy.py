"""Server-side FedDMMR strategy: base selection, stages, reply checks, prototypes.

Real Flower 1.41 records and messages, a fake in-process Grid, no network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedTrimmedAvg

from benchmarks.harness import server_identity
from feddmmr_flower.prototype_aggregation import aggregate_prototypes
from feddmmr_flower.stages import StageSchedule, parse_stage_schedule
from strategies import EvaluationOptions, FedDMMRStrategy, PrototypeOptions, make_base_strategy

SHAPES = {"emb": (4, 2), "w": (2, 2), "b": (2,)}
TRAINABLE = {"pretrain": ["emb", "w"], "align": ["b"], "finetune": ["w", "b"]}


@pytest.fixture(autouse=True)
def task_identity():
    """Message() for instructions reads the run/node id the ServerApp process gets from Flower."""
    with server_identity():
        yield


def global_arrays(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def to_np(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def reply(
    ins: Message,
    arrays: dict[str, np.ndarray],
    n: int,
    pid: int,
    centroids: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
) -> Message:
    """A client's train reply as the ClientApp builds it: Message(content, reply_to=ins)."""
    c = np.zeros((0, 3), np.float32) if centroids is None else centroids.astype(np.float32)
    s = np.zeros(0, np.float32) if sizes is None else sizes.astype(np.float32)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "prototypes": ArrayRecord({"centroids": Array(c), "sizes": Array(s)}),
            "metrics": MetricRecord({"num-examples": n, "loss": float(pid), "partition-id": pid}),
        }
    )
    return Message(content, reply_to=ins)


class FakeGrid:
    """Just what Strategy.start() and the base strategies use: node ids and send_and_receive."""

    def __init__(self, clients: dict[int, Callable[[Message], Message]]) -> None:
        self.clients = clients
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.clients)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        out = []
        for m in messages:
            self.sent.append(m)
            out.append(self.clients[m.metadata.dst_node_id](m))
        return out


BASE_KWARGS = {"min_available_nodes": 1, "min_train_nodes": 1, "min_evaluate_nodes": 1}


def make_strategy(base: str = "fedavg", schedule: str = "pretrain:3,align:1,finetune:2", **kw) -> FedDMMRStrategy:
    base_kwargs = {**BASE_KWARGS, **kw.pop("base_kwargs", {})}
    return FedDMMRStrategy(schedule=schedule, base=base, base_kwargs=base_kwargs, trainable_names=TRAINABLE, **kw)


def configure(strategy: FedDMMRStrategy, rnd: int, arrays: ArrayRecord, nodes: list[int]) -> list[Message]:
    grid = FakeGrid({n: lambda m: m for n in nodes})
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(nodes)
    return sorted(msgs, key=lambda m: m.metadata.dst_node_id)


# --------------------------------------------------------------------------- base
def test_unknown_strategy_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="choose one of: fedavg, fedadam, fedyogi"):
        make_base_strategy("fedsgd")


def test_make_base_strategy_passes_only_accepted_kwargs() -> None:
    common = {
        "fraction_train": 0.2,
        "min_available_nodes": 3,
        "eta": 0.01,
        "server_momentum": 0.9,
        "proximal_mu": 0.1,
        "beta": 0.1,
        "tau": None,
    }
    avg = make_base_strategy("FedAvg", **common)
    assert type(avg) is FedAvg and avg.fraction_train == 0.2 and avg.min_available_nodes == 3
    adam = make_base_strategy("fedadam", **common)
    assert isinstance(adam, FedAdam) and adam.eta == 0.01 and adam.tau == 1e-3  # None -> default
    avgm = make_base_strategy("fedavgm", **common)
    assert isinstance(avgm, FedAvgM) and avgm.server_momentum == 0.9
    assert make_base_strategy("fedprox", **common).proximal_mu == 0.1
    assert isinstance(trim := make_base_strategy("fedtrimmedavg", **common), FedTrimmedAvg) and trim.beta == 0.1
    for name in ("fedyogi", "fedadagrad", "fedmedian"):
        assert make_base_strategy(name, **common).fraction_train == 0.2


# ------------------------------------------------------------------------- stages
def test_stage_schedule_parsing() -> None:
    s = parse_stage_schedule(" pretrain:2, align:0 ,finetune:3,align:1")
    assert [s.stage_for_round(r) for r in range(1, 7)] == ["pretrain"] * 2 + ["finetune"] * 3 + ["align"]
    assert [(b.stage, b.first_round, b.last_round) for b in s.segments] == [
        ("pretrain", 1, 2),
        ("finetune", 3, 5),
        ("align", 6, 6),
    ]
    assert s.total_rounds == 6 and str(s) == "pretrain:2,align:0,finetune:3,align:1"
    with pytest.raises(ValueError, match="outside the stage schedule"):
        s.stage_for_round(7)


@pytest.mark.parametrize(
    "text, bad",
    [
        ("", "empty"),
        ("pretrain", "'pretrain'"),
        ("pretrain:40,,align:2", "''"),
        ("pretrain:x", "'x' is not an integer"),
        ("warmup:3", "unknown stage 'warmup'"),
        ("pretrain:4,align:-1", "'align:-1'"),
        ("pretrain:0,align:0", "no rounds"),
    ],
)
def test_stage_schedule_errors_name_the_bad_part(text: str, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        StageSchedule.parse(text)


# ---------------------------------------------------------------------- training
def test_configure_train_sends_full_model_prototypes_and_round_config() -> None:
    st = make_strategy(prototypes=PrototypeOptions(dim=3))
    g = global_arrays()
    shared = ConfigRecord({"client-lr": 0.1, "local-epochs": 1})
    msgs = list(st.configure_train(4, g, shared, FakeGrid({7: lambda m: m})))
    content = msgs[0].content
    assert msgs[0].metadata.message_type == MessageType.TRAIN
    assert set(content["arrays"].keys()) == set(SHAPES)  # full model, frozen tensors included
    assert content["prototypes"]["centroids"].numpy().shape == (0, 3)
    cfg = content["config"]
    assert (cfg["server-round"], cfg["stage"], cfg["stage-round"], cfg["client-lr"], cfg["local-epochs"]) == (
        4,
        "align",
        1,
        0.1,
        1,
    )
    assert dict(shared) == {"client-lr": 0.1, "local-epochs": 1}  # start()'s shared config untouched
    assert st.round is not None and st.round.names == ["b"] and st.round.expected.names == ("b",)


def test_fedavg_aggregates_trainable_subset_and_keeps_frozen() -> None:
    st = make_strategy("fedavg")
    g = global_arrays()
    gn = to_np(g)
    a, b = configure(st, 1, g, [11, 12])
    up1 = {"emb": gn["emb"] + 1.0, "w": gn["w"] + 2.0}
    up2 = {"emb": gn["emb"] - 1.0, "w": gn["w"] + 4.0}
    arrays, metrics = st.aggregate_train(1, [reply(a, up1, 1, 0), reply(b, up2, 3, 1)])
    out = to_np(arrays)
    assert list(out) == list(SHAPES)  # full model, global key order
    np.testing.assert_allclose(out["emb"], (1 * up1["emb"] + 3 * up2["emb"]) / 4, rtol=1e-6)
    np.testing.assert_allclose(out["w"], (1 * up1["w"] + 3 * up2["w"]) / 4, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], gn["b"])  # frozen in "pretrain"
    assert out["emb"].dtype == np.float32
    assert metrics["num-examples"] == 4 and metrics["loss"] == pytest.approx(0.75)
    assert "partition-id" not in metrics
    assert (metrics["num-accepted"], metrics["num-rejected"], metrics["num-failed"]) == (2, 0, 0)
    assert st.partition_of == {11: 0, 12: 1}


def test_fedadam_with_subsets_matches_stock_fedadam_and_survives_stage_change() -> None:
    st = make_strategy("fedadam", schedule="pretrain:2,align:1", base_kwargs={"eta": 0.1})
    stock = FedAdam(eta=0.1, min_available_nodes=1, min_train_nodes=1)
    g = global_arrays()
    for rnd in (1, 2):
        gn = to_np(g)
        (ins,) = configure(st, rnd, g, [5])
        update = {"emb": gn["emb"] + 0.5 * rnd, "w": gn["w"] - 0.25}
        new, _ = st.aggregate_train(rnd, [reply(ins, update, 2, 0)])
        # Stock FedAdam on the subset alone must give the same trainable tensors.
        subset = ArrayRecord({k: g[k] for k in ("emb", "w")})
        (sins,) = stock.configure_train(rnd, subset, ConfigRecord(), FakeGrid({5: lambda m: m}))
        sub_reply = Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                    "metrics": MetricRecord({"num-examples": 2}),
                }
            ),
            reply_to=sins,
        )
        expected, _ = stock.aggregate_train(rnd, [sub_reply])
        for k in ("emb", "w"):
            np.testing.assert_allclose(new[k].numpy(), expected[k].numpy(), rtol=1e-5)
        np.testing.assert_array_equal(new["b"].numpy(), gn["b"])
        g = new
    # Stage change: a different subset gets a fresh optimiser state, no key-mismatch error.
    gn = to_np(g)
    (ins,) = configure(st, 3, g, [5])
    assert getattr(st.aggregation.base, "m_t", None) is None
    new, metrics = st.aggregate_train(3, [reply(ins, {"b": gn["b"] + 1.0}, 2, 0)])
    assert metrics["num-accepted"] == 1 and metrics["stage-index"] == 1
    np.testing.assert_array_equal(new["emb"].numpy(), gn["emb"])
    assert np.all(new["b"].numpy() > gn["b"])  # moved towards the client update


def test_bad_replies_are_rejected_and_logged_while_others_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    st = make_strategy("fedavg")
    g = global_arrays()
    gn = to_np(g)
    nodes = [101, 102, 103, 104, 105, 106, 107]
    ins = configure(st, 1, g, nodes)
    good = [{"emb": gn["emb"] + d, "w": gn["w"] + d} for d in (0.1, 0.2, 0.3)]
    nan = {"emb": gn["emb"].copy(), "w": gn["w"]}
    nan["emb"][0, 0] = np.nan
    replies = [
        reply(ins[0], good[0], 1, 0),
        reply(ins[1], good[1], 1, 1),
        reply(ins[2], good[2], 2, 2),
        reply(ins[3], nan, 1, 3),
        reply(ins[4], {"emb": gn["emb"], "w": np.zeros((3, 2), np.float32)}, 1, 4),  # wrong shape
        reply(ins[5], {"emb": gn["emb"], "w": gn["w"], "b": gn["b"]}, 1, 5),  # frozen sent
        reply(ins[6], {"emb": gn["emb"] + 1e3, "w": gn["w"]}, 1, 6),  # norm outlier
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = st.aggregate_train(1, replies)
    rejected = {r["partition_id"]: r for r in st.rejected[1]}
    assert sorted(rejected) == [3, 4, 5, 6]
    assert "NaN/Inf in 'emb'" in rejected[3]["reason"]
    assert "wrong shape for 'w'" in rejected[4]["reason"]
    assert "unexpected key set" in rejected[5]["reason"] and "'b'" in rejected[5]["reason"]
    assert "update norm" in rejected[6]["reason"] and rejected[6]["node_id"] == 107
    for pid in (3, 4, 5, 6):
        assert f"(partition-id {pid})" in caplog.text
    np.testing.assert_allclose(arrays["w"].numpy(), gn["w"] + (0.1 + 0.2 + 2 * 0.3) / 4, rtol=1e-6)
    assert (metrics["num-accepted"], metrics["num-rejected"]) == (3, 4)


def test_all_rejected_keeps_global_and_error_replies_are_failures() -> None:
    st = make_strategy("fedavg")
    g = global_arrays()
    gn = to_np(g)
    a, b = configure(st, 1, g, [1, 2])
    st.aggregate_train(
        1, [reply(a, {"emb": gn["emb"], "w": gn["w"]}, 1, 40), reply(b, {"emb": gn["emb"], "w": gn["w"]}, 1, 41)]
    )
    a, b = configure(st, 2, g, [1, 2])
    bad = {"emb": np.full(SHAPES["emb"], np.inf, np.float32), "w": gn["w"]}
    err = Message(Error(code=1, reason="ClientApp crashed"), reply_to=a)
    arrays, metrics = st.aggregate_train(2, [err, reply(b, bad, 1, 41)])
    for k in SHAPES:
        np.testing.assert_array_equal(arrays[k].numpy(), gn[k])
    assert st.failed[2] == [{"node_id": 1, "partition_id": 40, "reason": "error reply (code 1): ClientApp crashed"}]
    assert st.rejected[2][0]["partition_id"] == 41
    assert (metrics["num-accepted"], metrics["num-rejected"], metrics["num-failed"]) == (0, 1, 1)
    # A node that never answered is a failure too.
    configure(st, 3, g, [2])
    st.aggregate_train(3, [])
    assert st.failed[3][0]["node_id"] == 2 and "no reply" in st.failed[3][0]["reason"]


# -------------------------------------------------------------------- prototypes
def _clients(seed: int, dim: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(k, dim)), rng.integers(1, 9, size=k).astype(float)) for k in (3, 0, 4, 2)]


def test_first_round_weighted_kmeans_is_deterministic_and_order_free() -> None:
    clients = _clients(0)
    r1 = aggregate_prototypes(None, clients, num_prototypes=4, seed=7)
    r2 = aggregate_prototypes(None, clients, num_prototypes=4, seed=7)
    r3 = aggregate_prototypes(None, clients[::-1], num_prototypes=4, seed=7)
    assert r1.prototypes is not None and r1.prototypes.shape == (4, 3) and r1.prototypes.dtype == np.float32
    np.testing.assert_array_equal(r1.prototypes, r2.prototypes)
    np.testing.assert_array_equal(r1.prototypes, r3.prototypes)
    assert r1.slot_weights.sum() == pytest.approx(sum(s.sum() for _, s in clients))
    # Fewer distinct centroids than K -> that many prototypes; weights pull the centre.
    few = aggregate_prototypes(
        None,
        [(np.array([[0.0, 0], [0, 0]]), np.array([1.0, 1])), (np.array([[4.0, 0]]), np.array([2.0]))],
        num_prototypes=5,
    )
    assert few.prototypes is not None and few.prototypes.shape == (2, 2)
    one = aggregate_prototypes(None, [(np.array([[0.0, 0], [4, 0]]), np.array([1.0, 3]))], num_prototypes=1)
    np.testing.assert_allclose(one.prototypes, [[3.0, 0.0]])


def test_later_rounds_match_slots_not_indices() -> None:
    g = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    c = np.array([[0.1, 0.2, 2.0], [2.0, 0.1, 0.0], [0.0, 3.0, 0.2]])
    s = np.array([1.0, 2.0, 3.0])
    other = (np.array([[0.0, 0.5, 0.1]]), np.array([4.0]))
    base = aggregate_prototypes(g, [(c, s), other], ema=0.5)
    for perm in ([2, 0, 1], [1, 2, 0]):
        permuted = aggregate_prototypes(g, [(c[perm], s[perm]), other], ema=0.5)
        np.testing.assert_allclose(permuted.prototypes, base.prototypes, rtol=1e-6)
    np.testing.assert_allclose(base.slot_weights, [2.0, 7.0, 1.0])


def test_ema_on_a_hand_example() -> None:
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    clients = [(np.array([[3.0, 0.1]]), np.array([1.0])), (np.array([[1.0, 0.0]]), np.array([3.0]))]
    res = aggregate_prototypes(g, clients, ema=0.5)
    # slot 0 mean = (1*[3, .1] + 3*[1, 0]) / 4 = [1.5, .025]; new = .5*[1, 0] + .5*mean
    np.testing.assert_allclose(res.prototypes, [[1.25, 0.0125], [0.0, 1.0]], rtol=1e-6)
    res = aggregate_prototypes(g, clients, ema=0.2)
    np.testing.assert_allclose(res.prototypes[0], 0.8 * g[0] + 0.2 * np.array([1.5, 0.025]), rtol=1e-6)


def test_prototype_edge_cases() -> None:
    g = np.eye(3)
    empty = [(np.zeros((0, 3)), np.zeros(0)), (np.zeros(0), np.zeros(0))]
    res = aggregate_prototypes(g, empty)
    np.testing.assert_array_equal(res.prototypes, g)
    assert not res.rejected
    assert aggregate_prototypes(None, empty).prototypes is None
    res = aggregate_prototypes(g, [(np.ones((2, 4)), np.ones(2)), (np.array([[2.0, 0, 0]]), np.ones(1))], ema=1.0)
    assert res.rejected == [(0, "dimension mismatch: P=4, expected P=3")]
    np.testing.assert_allclose(res.prototypes, [[2, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="ema"):
        aggregate_prototypes(g, empty, ema=0.0)


def test_strategy_stores_and_sends_aggregated_prototypes() -> None:
    st = make_strategy("fedavg", prototypes=PrototypeOptions(num=2))
    g = global_arrays()
    gn = to_np(g)
    a, b, c = configure(st, 1, g, [1, 2, 3])
    keep = {"emb": gn["emb"], "w": gn["w"]}
    st.aggregate_train(
        1,
        [
            reply(a, keep, 1, 0, np.array([[1.0, 0, 0], [0, 1, 0]]), np.array([3, 4])),
            reply(b, keep, 1, 1),  # k = 0
            reply(c, keep, 1, 2, np.ones((1, 5)), np.ones(1)),  # wrong P: only its prototypes are ignored
        ],
    )
    assert st.prototypes is not None and st.prototypes.shape == (2, 3)
    assert st.prototype_rejected[1][0]["partition_id"] == 2 and st.rejected[1] == []
    (m,) = configure(st, 2, g, [1])
    np.testing.assert_array_equal(m.content["prototypes"]["centroids"].numpy(), st.prototypes)


# ---------------------------------------------------------------- start() loop
def test_start_runs_all_stages_with_fedadam_and_evaluation() -> None:
    def client(pid: int) -> Callable[[Message], Message]:
        def handle(ins: Message) -> Message:
            cfg = ins.content["config"]
            full = to_np(ins.content["arrays"])
            if ins.metadata.message_type == MessageType.EVALUATE:
                rnd = cfg.get("server-round", 0)
                assert cfg["split"] == ("valid" if rnd else "test")
                assert "centroids" in ins.content["prototypes"]
                score = 0.1 * rnd + 0.01 * pid
                return Message(
                    RecordDict({"metrics": MetricRecord({"num-examples": 1, "NDCG@10": score, "partition-id": pid})}),
                    reply_to=ins,
                )
            names = TRAINABLE[cfg["stage"]]
            upd = {k: full[k] + 0.1 * (pid + 1) for k in names}
            rng = np.random.default_rng(pid + 10 * cfg["server-round"])
            return reply(ins, upd, pid + 1, pid, rng.normal(size=(2, 3)), np.array([2.0, 3.0]))

        return handle

    grid = FakeGrid({100 + p: client(p) for p in range(3)})
    st = make_strategy(
        "fedadam",
        schedule="pretrain:2,align:1,finetune:2",
        evaluation=EvaluationOptions(every=2, node_ids=(100, 102)),
        prototypes=PrototypeOptions(dim=3),
    )
    seen: list[int] = []
    g0 = global_arrays()
    result = st.start(
        grid=grid,
        initial_arrays=g0,
        num_rounds=st.schedule.total_rounds,
        train_config=ConfigRecord({"local-epochs": 1}),
        evaluate_fn=lambda rnd, arrays: seen.append(rnd) or None,
    )
    assert seen == [0, 1, 2, 3, 4, 5]
    assert set(result.arrays.keys()) == set(SHAPES)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5]
    assert sorted(result.evaluate_metrics_clientapp) == [2, 3, 4, 5]  # every 2 + stage ends
    assert all(not v for v in st.rejected.values()) and all(not v for v in st.failed.values())
    assert st.best is not None and st.best.server_round == 5 and st.prototypes.shape == (5, 3)
    # Frozen tensors per stage: "b" untouched in pretrain, "emb" never touched after it.
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    b_before_align = [to_np(m.content["arrays"])["b"] for m in train_msgs if m.content["config"]["server-round"] <= 3]
    for b in b_before_align:
        np.testing.assert_array_equal(b, g0["b"].numpy())
    emb_after = to_np(result.arrays)["emb"]
    emb_at_align = [to_np(m.content["arrays"])["emb"] for m in train_msgs if m.content["config"]["server-round"] == 3][
        0
    ]
    np.testing.assert_array_equal(emb_after, emb_at_align)
    eval_nodes = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE}
    assert eval_nodes == {100, 102}
    test = st.evaluate_all(grid, st.best.arrays, split="test")
    assert test is not None and test["num-replies"] == 3


@pytest.mark.parametrize(
    "name", ["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox", "fedmedian", "fedtrimmedavg"]
)
def test_every_base_strategy_runs_two_stages(name: str) -> None:
    configs: list[ConfigRecord] = []

    def handle(ins: Message) -> Message:
        cfg = ins.content["config"]
        configs.append(cfg)
        full = to_np(ins.content["arrays"])
        pid = ins.metadata.dst_node_id
        return reply(ins, {k: full[k] + 0.01 * pid for k in TRAINABLE[cfg["stage"]]}, 1, pid)

    grid = FakeGrid({n: handle for n in (1, 2, 3)})
    st = make_strategy(
        name,
        schedule="pretrain:2,finetune:1",
        base_kwargs={"fraction_evaluate": 0.0, "server_momentum": 0.5, "proximal_mu": 0.1},
    )
    g0 = global_arrays()
    result = st.start(grid=grid, initial_arrays=g0, num_rounds=3)
    out, g0n = to_np(result.arrays), to_np(g0)
    assert list(out) == list(SHAPES)
    assert not np.allclose(out["w"], g0n["w"]) and np.isfinite(out["w"]).all()
    assert all(result.train_metrics_clientapp[r]["num-accepted"] == 3 for r in (1, 2, 3))
    assert ("proximal-mu" in configs[0]) == (name == "fedprox")


# ------------------------------------------------------ bad updates, one kind at a time
def _bad_update(kind: str, gn: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, str]:
    """(arrays, num-examples, expected reason) of one malformed reply; good replies move by 0.1-0.3."""
    emb, w = gn["emb"].copy(), gn["w"].copy()
    if kind == "nan":
        emb[1, 1] = np.nan
        return {"emb": emb, "w": w}, 1, "NaN/Inf in 'emb'"
    if kind in ("+inf", "-inf"):
        w[0, 0] = np.inf if kind == "+inf" else -np.inf
        return {"emb": emb, "w": w}, 1, "NaN/Inf in 'w'"
    if kind == "wrong-shape":
        return {"emb": np.zeros((5, 2), np.float32), "w": w}, 1, "wrong shape for 'emb': (5, 2) != (4, 2)"
    if kind == "missing-key":
        return {"emb": emb}, 1, "1 missing ['w']"
    if kind == "extra-key":
        return {"emb": emb, "w": w, "b": gn["b"]}, 1, "1 unexpected ['b']"
    if kind == "absurd-norm":  # 100.8 x the median update norm (median of 0.1, 0.2, 0.3, 25.2 -> 0.25)
        return {"emb": emb + 25.2, "w": w + 25.2}, 1, "update norm"
    if kind == "zero-weight":
        return {"emb": emb, "w": w}, 0, "'num-examples' missing or not > 0"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["nan", "+inf", "-inf", "wrong-shape", "missing-key", "extra-key", "absurd-norm", "zero-weight"]
)
def test_each_bad_update_is_rejected_with_partition_id_and_the_round_completes(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    st = make_strategy("fedadam", base_kwargs={"eta": 0.1})
    g = global_arrays()
    gn = to_np(g)
    ins = configure(st, 1, g, [201, 202, 203, 204])
    good = [{"emb": gn["emb"] + d, "w": gn["w"] + d} for d in (0.1, 0.2, 0.3)]
    bad, n, reason = _bad_update(kind, gn)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = st.aggregate_train(
            1,
            [
                reply(ins[0], good[0], 1, 10),
                reply(ins[1], good[1], 1, 11),
                reply(ins[2], bad, n, 77),
                reply(ins[3], good[2], 1, 12),
            ],
        )
    assert [(r["partition_id"], r["node_id"]) for r in st.rejected[1]] == [(77, 203)]
    assert reason in st.rejected[1][0]["reason"]
    assert "partition-id 77" in caplog.text and reason.split(":")[0] in caplog.text
    assert (metrics["num-accepted"], metrics["num-rejected"]) == (3, 1)
    for name in ("emb", "w"):  # FedAdam moved the model from the three good replies only
        out = arrays[name].numpy()
        assert np.isfinite(out).all() and out.shape == gn[name].shape and np.all(out > gn[name])
    np.testing.assert_array_equal(arrays["b"].numpy(), gn["b"])


def test_norm_below_the_outlier_factor_is_accepted() -> None:
    st = make_strategy("fedavg")
    g = global_arrays()
    gn = to_np(g)
    ins = configure(st, 1, g, [1, 2, 3, 4])
    deltas = (0.1, 0.2, 0.3, 24.0)  # 96 x the median (0.25): large, but under 100 x
    _, metrics = st.aggregate_train(
        1, [reply(m, {"emb": gn["emb"] + d, "w": gn["w"] + d}, 1, i) for i, (m, d) in enumerate(zip(ins, deltas))]
    )
    assert metrics["num-accepted"] == 4 and st.rejected[1] == []


@pytest.mark.parametrize("base", ["fedavg", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg"])
def test_the_model_equals_the_stock_base_aggregating_each_array_with_or_without_wire_packing(base: str) -> None:
    """The base sees one packed vector, the wire may pack the model too: every base here is
    elementwise, so the result equals stock Flower aggregating each named array of the subset."""
    trained = TRAINABLE["pretrain"]
    results = {}
    for packed in (False, True):
        strategy = make_strategy(base, schedule="pretrain:3", pack_wire=packed)
        stock = make_base_strategy(base, **BASE_KWARGS)
        arrays, expected, rng = global_arrays(), global_arrays(), np.random.default_rng(7)
        for rnd in (1, 2, 3):
            msgs = configure(strategy, rnd, arrays, [1, 2, 3, 4])
            assert ("layout" in msgs[0].content.config_records) == packed
            subset = ArrayRecord({k: expected[k] for k in trained})
            stock.configure_train(rnd, subset, ConfigRecord(), FakeGrid({1: lambda m: m}))
            current = to_np(arrays)
            updates = [
                {k: current[k] + rng.normal(scale=0.1, size=current[k].shape).astype(np.float32) for k in trained}
                for _ in msgs
            ]
            replies = [reply(m, u, n=10 * (i + 1), pid=i) for i, (m, u) in enumerate(zip(msgs, updates))]
            arrays, _ = strategy.aggregate_train(rnd, replies)
            plain = [
                Message(
                    RecordDict(
                        {
                            "arrays": ArrayRecord({k: Array(v) for k, v in u.items()}),
                            "metrics": MetricRecord({"num-examples": 10 * (i + 1)}),
                        }
                    ),
                    reply_to=m,
                )
                for i, (m, u) in enumerate(zip(msgs, updates))
            ]
            new, _ = stock.aggregate_train(rnd, plain)
            expected = ArrayRecord({k: new[k] if k in trained else expected[k] for k in SHAPES})
        results[packed] = to_np(arrays)
        for name, value in to_np(expected).items():
            np.testing.assert_allclose(results[packed][name], value, rtol=0, atol=1e-6, err_msg=name)
    for name, value in results[False].items():
        np.testing.assert_array_equal(results[True][name], value, err_msg=name)
