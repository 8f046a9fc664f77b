"""Users whose history leaves no training position (issue #17, part 4): skipped, never "rejected".

Under ``min-seq-len = 3`` a user of 3 interactions keeps one input item and no next-item target
once the last two are held out for validation and test. Their node answers a train message with
"nothing to train"; the server counts a skip (INFO, not a warning), leaves the node out of later
draws, and still evaluates it. The runs here are real: the ``FederatedRun`` round loop and the
ClientApp with its mods through Flower's wire format (``benchmarks.harness``), plain and SecAgg+,
and one ``flwr run`` simulation; the DP and sampling details are checked on the strategy itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

from benchmarks.harness import InProcessGrid, run_federation, server_identity
from client_app.privacy_mods import single_record
from feddmmr_flower import checkpoint
from feddmmr_flower.client import no_training_position
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.data.sequences import SequenceData
from feddmmr_flower.experiment import load_assets
from feddmmr_wire import TrainInstruction, TrainReply, TrainStatus

from .conftest import write_ml100k
from .flwr_utils import copy_app, flwr_run

LONG, SHORT = 6, 2  # users with 25 interactions, then users with 3 (partition ids 6 and 7)
USERS = LONG + SHORT
SHORT_PARTITIONS = [LONG, LONG + 1]
NO_TRAINING_POSITION = no_training_position(4)  # 1 training item, then the validation and test items
#: Logged by Flower's own FedAvg constructor for the base strategy (FedDMMR evaluates fixed nodes itself).
FLOWER_CONSTRUCTOR_WARNING = "fraction_evaluate is set to 0.0"
#: Flower's simulation runtime, on every ``flwr run``: the CLI's notice about its default federation
#: size, and Ray's ClientApp actors being stopped at the end of the run.
FLOWER_RUNTIME_WARNINGS = (
    FLOWER_CONSTRUCTOR_WARNING,
    "default simulated SuperNodes changed from 10 to 2",
    "Manually terminating ClientAppActor",
)
RUN = {
    "min-seq-len": 3,
    "fraction-train": 1.0,
    "eval-every": 1,
    "eval-users": 0,  # every node evaluates
    "hidden": 16,
    "maxlen": 30,
    "negatives": 20,
    "eval-negatives": 20,
    "dropout": 0.0,
    "strategy": "fedavg",
    "prototype-noise": 0.0,
    "min-available-nodes": USERS,
}


def short_history_ml100k(folder: Path) -> Path:
    """LONG users of 25 ratings, then SHORT users of 3, over 80 items (raw ids in partition order)."""
    rng = np.random.default_rng(0)
    ratings = []
    for user, length in enumerate([25] * LONG + [3] * SHORT, start=1):
        for step, item in enumerate(rng.choice(np.arange(1, 81), length, replace=False)):
            ratings.append((user, int(item), 4, 880000000 + 1000 * step))
    return write_ml100k(folder, ratings, {i: f"Movie number {i} (199{i % 10})" for i in range(1, 81)})


class Records(logging.Handler):
    """Every record of Flower's logger tree (FedDMMR's server logs under ``flwr.feddmmr``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.levelno >= logging.WARNING and FLOWER_CONSTRUCTOR_WARNING not in r.getMessage()
        ]


@pytest.fixture(autouse=True)
def identity():
    """Instruction messages read the run/node id a ServerApp process gets from Flower."""
    with server_identity():
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short-history")
    short_history_ml100k(root / "ml-100k")
    load_assets(ExperimentConfig.from_flat(_config(root, "features")))  # features once: the runs read the cache
    return root


def _config(root: Path, name: str, **overrides) -> dict:
    return {
        **RUN,
        "data-dir": str(root / "ml-100k"),
        "cache-dir": str(root / "cache"),
        "output-dir": str(root / "out"),
        "run-name": name,
        **overrides,
    }


def _inprocess(root: Path, name: str, **overrides) -> dict:
    """One run over the in-process harness: its history, summary, log records, Python warnings, stderr."""
    logger, handler, stderr = logging.getLogger("flwr"), Records(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            summary = run_federation(_config(root, name, **overrides), USERS)
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(threads)
    out = root / "out" / name
    return {
        "out": out,
        "summary": summary,
        "history": json.loads((out / "history.json").read_text())["rounds"],
        "log": handler,
        "python_warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "stderr": stderr.getvalue(),
    }


@pytest.fixture(scope="module")
def plain(root) -> dict:
    """All three stages; every node is sampled in round 1, the short users only then."""
    return _inprocess(root, "plain", **{"stage-schedule": "pretrain:1,align:1,finetune:1"})


@pytest.fixture(scope="module")
def secure(root) -> dict:
    return _inprocess(root, "secure", **{"stage-schedule": "pretrain:1,align:1", "secure-aggregation": True})


# ------------------------------------------------------------------------------- the data rule
def test_a_user_needs_four_interactions_for_a_training_position() -> None:
    lengths = np.array([3, 4, 9])
    data = SequenceData(
        items=np.arange(1, lengths.sum() + 1, dtype=np.int32),
        timestamps=np.zeros(lengths.sum(), np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        user_raw_ids=np.array(["a", "b", "c"]),
        item_raw_ids=np.array([""] + [str(i) for i in range(1, lengths.sum() + 1)]),
        item_titles=np.array([""] * (lengths.sum() + 1)),
        item_genres=np.array([""] * (lengths.sum() + 1)),
    )
    assert data.can_train(np.arange(3)).tolist() == [False, True, True]
    # the training targets agree: none for the 3-interaction user, one for the 4-interaction user
    assert [(data.train_targets(np.array([u]), 10) > 0).sum() for u in range(3)] == [0, 1, 6]


# ------------------------------------------------------------------------- in-process runs
def test_short_users_are_skipped_once_then_left_out_and_nothing_is_rejected(plain) -> None:
    first, *later = plain["history"]
    assert sorted(r["partition_id"] for r in first["skipped"]) == SHORT_PARTITIONS
    assert {r["reason"] for r in first["skipped"]} == {NO_TRAINING_POSITION}
    assert (first["train"]["num-skipped"], first["train"]["num-left-out"], first["train"]["num-accepted"]) == (
        SHORT,
        0,
        LONG,
    )
    for record in later:  # align and finetune: the short users are no longer drawn
        assert record["skipped"] == [] and record["train"]["num-skipped"] == 0
        assert record["train"]["num-left-out"] == SHORT and record["train"]["num-accepted"] == LONG
    for record in plain["history"]:
        assert record["rejected"] == [] and record["failed"] == []


def test_no_warning_and_the_skip_is_on_the_progress_line(plain) -> None:
    assert plain["log"].warnings() == []
    assert plain["python_warnings"] == []
    skip_lines = [r for r in plain["log"].records if "nothing to train" in r.getMessage()]
    assert [r.levelno for r in skip_lines] == [logging.INFO]
    assert "round 1/3 [pretrain] nodes 6" in plain["stderr"] and "skipped 2 (nothing to train)" in plain["stderr"]
    assert "round 2/3 [align] nodes 6" in plain["stderr"] and plain["stderr"].count("skipped 2") == 1


def test_every_user_is_evaluated_and_tested(plain) -> None:
    for record in plain["history"]:
        assert record["valid"]["num-examples"] == USERS
    assert plain["summary"]["test"]["num_users"] == USERS


def test_secagg_round_with_a_skipped_node_aggregates_like_the_plain_round(plain, secure) -> None:
    """The short users take part in SecAgg+ with weight 0 (no dropout to recover), so the masked
    mean equals the plain mean over the users that trained, within quantisation."""
    first, second = secure["history"]
    assert sorted(r["partition_id"] for r in first["skipped"]) == SHORT_PARTITIONS
    assert first["train"]["num-accepted"] == LONG and first["train"]["secure-aggregation"] == 1
    assert second["skipped"] == [] and second["train"]["num-left-out"] == SHORT
    for record in secure["history"]:
        assert record["rejected"] == [] and record["failed"] == []
    assert secure["log"].warnings() == [] and secure["python_warnings"] == []
    for stage in ("pretrain", "align"):
        a = checkpoint.load(plain["out"] / f"checkpoint-{stage}.pt").state_dict
        b = checkpoint.load(secure["out"] / f"checkpoint-{stage}.pt").state_dict
        assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < 1e-4, stage


def test_a_secagg_round_of_only_skipped_nodes_keeps_the_model_quietly(root) -> None:
    """Every node that answers has nothing to train: total weight 0, no update; no warning, no error."""
    from server_app.federation import FederatedRun

    cfg = ExperimentConfig.from_flat(_config(root, "only-skipped", **{"secure-aggregation": True}))
    handler = Records()
    logging.getLogger("flwr").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a numpy division by zero would raise here
            run = FederatedRun(InProcessGrid(cfg.flat(), USERS), cfg)
            train_cfg = ConfigRecord({"client-lr": 0.05, "local-epochs": 1, "run-key": "only-skipped"})
            sent = list(run.strategy.configure_train(1, run.arrays, train_cfg, run.grid))
            short = [m for m in sent if run.grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] >= LONG]
            replies = run.collector.collect(1, short, run.grid, run.strategy.round.expected)
            run.strategy.round.instructions = short
            arrays, metrics = run.strategy.aggregate_round(1, replies)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert (len(replies.skipped), replies.accepted, replies.rejected, replies.failed) == (SHORT, [], [], [])
    assert arrays is run.arrays and metrics["num-skipped"] == SHORT and metrics["num-accepted"] == 0
    assert handler.warnings() == []


# ----------------------------------------------------------------------- client mods (DP)
@pytest.mark.parametrize("mod", [fixedclipping_mod, LocalDpMod(0.1, 0.1, 1.0, 1e-5)], ids=["central", "local"])
def test_dp_mods_pass_a_nothing_to_train_reply_on_untouched(mod) -> None:
    arrays = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    config = {"server-round": 1, "stage": "pretrain", "clipping_norm": 0.1}
    content = TrainInstruction(arrays, None, config).to_content(packed=False)
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    skipped = TrainReply.nothing_to_train(7, NO_TRAINING_POSITION)

    def app(m: Message, _: Context) -> Message:
        return Message(skipped.to_content(packed=False), reply_to=m)

    out = single_record(mod)(msg, context, app)
    assert not out.has_error()
    parsed = TrainReply.from_content(out.content)
    assert (parsed.status, parsed.reason, parsed.partition_id, parsed.arrays) == (
        TrainStatus.NOTHING_TO_TRAIN,
        NO_TRAINING_POSITION,
        7,
        {},
    )


# ------------------------------------------------------------------------- the strategy
def _strategy(**kw):
    from .test_strategy import make_strategy

    return make_strategy("fedavg", schedule="pretrain:3", base_kwargs={"fraction_train": 1.0, **kw})


def _round(strategy, rnd: int, nodes: list[int], skip: set[int]):
    """One round on a grid of ``nodes``: the nodes in ``skip`` reply "nothing to train"."""
    from .test_strategy import FakeGrid, global_arrays, reply, to_np

    g = global_arrays()
    grid = FakeGrid({n: (lambda m: m) for n in nodes})
    sent = list(strategy.configure_train(rnd, g, ConfigRecord({"client-lr": 0.1}), grid))
    replies = []
    for m in sent:
        node = m.metadata.dst_node_id
        if node in skip:
            content = TrainReply.nothing_to_train(node, NO_TRAINING_POSITION).to_content(packed=True)
            replies.append(Message(content, reply_to=m))
        else:
            replies.append(reply(m, {k: v + 0.01 for k, v in to_np(g).items() if k in ("emb", "w")}, 3, node))
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return sorted(m.metadata.dst_node_id for m in sent), metrics


def test_skipped_nodes_are_never_drawn_again_and_waiting_for_nodes_still_counts_them(caplog) -> None:
    """min_available_nodes = every node: the draw still completes once two nodes are left out."""
    strategy = _strategy(min_available_nodes=5, min_train_nodes=5)
    nodes = [1, 2, 3, 4, 5]
    caplog.set_level(logging.INFO, logger="flwr")
    drawn, metrics = _round(strategy, 1, nodes, skip={2, 4})
    assert drawn == nodes and metrics["num-skipped"] == 2 and metrics["num-accepted"] == 3
    assert strategy.skipped[1] and strategy.rejected[1] == []
    drawn, metrics = _round(strategy, 2, nodes, skip={2, 4})
    assert drawn == [1, 3, 5] and metrics["num-skipped"] == 0 and metrics["num-left-out"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert strategy.aggregation.base.min_available_nodes == 5 and strategy.aggregation.base.min_train_nodes == 5
    # a resumed run keeps leaving them out
    again = _strategy(min_available_nodes=5)
    again.restore_state(strategy.checkpoint_state())
    assert _round(again, 3, nodes, skip={2, 4})[0] == [1, 3, 5]


def test_when_no_node_can_train_nothing_is_sent_and_nothing_is_warned(caplog) -> None:
    strategy = _strategy(min_available_nodes=2)
    caplog.set_level(logging.INFO, logger="flwr")
    _round(strategy, 1, [1, 2], skip={1, 2})
    drawn, metrics = _round(strategy, 2, [1, 2], skip={1, 2})
    assert drawn == [] and metrics["num-left-out"] == 2 and metrics["num-accepted"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_central_dp_counts_a_skip_as_a_zero_update_and_samples_from_the_eligible_nodes() -> None:
    """Round 1: 4 drawn, 1 skips -> mean over m = 4 (one zero update), q = 4/4. Round 2: the skipped
    node cannot be drawn -> m = 3 of 3 eligible, q = 1 (not 3/4: that would understate epsilon)."""
    from strategies.dp import CentralFixedClippingDP

    dp = CentralFixedClippingDP(clipping_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    dp.population = 4
    strategy = _strategy(min_available_nodes=4)
    strategy.privacy = dp
    _, first = _round(strategy, 1, [1, 2, 3, 4], skip={3})
    _, second = _round(strategy, 2, [1, 2, 3, 4], skip={3})
    assert (first["dp-zero-padded"], second["dp-zero-padded"]) == (1, 0)
    assert first["dp-noise-std"] == pytest.approx(1.0 / 4) and second["dp-noise-std"] == pytest.approx(1.0 / 3)
    assert [q for q, _, _ in dp.accountant.events] == [1.0]  # both releases at q = 1
    assert dp.accountant.releases == 2


def test_a_secagg_reply_says_nothing_to_train_in_plaintext() -> None:
    from client_app.privacy_mods import legacy_reply

    arrays = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32), "frozen": np.ones(3, np.float32)}
    content = TrainInstruction(arrays, None, {"stage": "pretrain", "server-round": 1}).to_content(packed=False)
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    skipped = Message(TrainReply.nothing_to_train(7, NO_TRAINING_POSITION).to_content(packed=False), reply_to=msg)
    legacy = legacy_reply(msg, skipped, lambda stage: ["b", "w"])
    masked = legacy.content.array_records["fitres.parameters"]
    assert list(masked.keys()) == ["w", "b"]  # the model's order, zero update
    assert all(not a.numpy().any() for a in masked.values())
    assert legacy.content.metric_records["fitres.num_examples"]["num_examples"] == 0
    parsed, plain = TrainReply.from_secagg_content(legacy.content)
    assert (parsed.status, parsed.reason, parsed.num_examples, plain.array_names) == (
        TrainStatus.NOTHING_TO_TRAIN,
        NO_TRAINING_POSITION,
        0,
        ["w", "b"],
    )


# ------------------------------------------------------------------------ flwr run
@pytest.mark.slow
def test_a_flwr_run_simulation_skips_short_users_without_warnings(root) -> None:
    config = _config(root, "sim", **{"stage-schedule": "pretrain:1,align:1"})
    done = flwr_run(
        copy_app(root / "app"),
        root / "flwr-home",
        config,
        f"num-supernodes={USERS} client-resources-num-cpus=1",
        timeout=600,
    )
    log = done.stdout + done.stderr
    out = root / "out" / "sim"
    assert done.returncode == 0 and (out / "summary.json").is_file(), log[-3000:]
    first, second = json.loads((out / "history.json").read_text())["rounds"]
    assert sorted(r["partition_id"] for r in first["skipped"]) == SHORT_PARTITIONS
    assert second["skipped"] == [] and second["train"]["num-left-out"] == SHORT
    for record in (first, second):
        assert record["rejected"] == [] and record["failed"] == [] and record["train"]["num-accepted"] == LONG
        assert record["valid"]["num-examples"] == USERS
    assert json.loads((out / "summary.json").read_text())["test"]["num_users"] == USERS
    assert "skipped 2 (nothing to train)" in log
    noisy = [
        line
        for line in log.splitlines()
        if "WARNING" in line and not any(known in line for known in FLOWER_RUNTIME_WARNINGS)
    ]
    assert noisy == [], noisy
