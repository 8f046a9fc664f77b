"""Privacy (issue #7): what leaves a client, DP (central and local), SecAgg+, prototype release.

The federated runs here are the real ``FederatedRun`` round loop driving the real ClientApp (with
its mods) through ``benchmarks.harness.InProcessGrid``, every message serialised to Flower's wire
format; ``test_secagg_in_a_flwr_run_simulation_equals_the_plain_loop`` repeats the SecAgg+ comparison in a real ``flwr run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType

from benchmarks.harness import InProcessGrid, server_identity
from feddmmr_flower import checkpoint
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.errors import ConfigError
from feddmmr_flower.experiment import load_assets, prototype_config
from feddmmr_flower.memory import LocalDynamicMemory
from feddmmr_flower.privacy import (
    RdpAccountant,
    local_dp_epsilon,
    local_dp_noise_std,
    rdp_subsampled_gaussian,
)
from feddmmr_flower.prototypes import local_prototypes

from .conftest import synthetic_ml100k

NUM_USERS = 6
TINY = {
    "stage-schedule": "pretrain:1,align:1,finetune:1",
    "fraction-train": 1.0,
    "eval-every": 1,
    "eval-users": 3,
    "hidden": 16,
    "maxlen": 30,
    "negatives": 20,
    "eval-negatives": 20,
    "min-available-nodes": NUM_USERS,
    "dropout": 0.0,
    "strategy": "fedavg",
    "prototype-noise": 0.0,  # fresh noise per release would make the runs differ by design
}
MODES = {
    "off": {},
    "central-fixed": {"dp-mode": "central-fixed", "dp-clipping-norm": 0.05, "dp-noise-multiplier": 1.0},
    "local": {"dp-mode": "local", "dp-clipping-norm": 0.05, "dp-epsilon": 1.0},
    "secagg": {"secure-aggregation": True},
}


class Wire:
    """Everything that crossed the network, as (instruction, serialised reply, reply)."""

    def __init__(self) -> None:
        self.items: list[tuple[Message, bytes, Message]] = []

    def __call__(self, ins: Message, data: bytes, reply: Message) -> None:
        self.items.append((ins, data, reply))


def run_inprocess(root: Path, name: str, overrides: dict, tap=None, users: int = NUM_USERS) -> dict:
    """One FederatedRun over InProcessGrid; returns summary, history, grid, config."""
    from server_app.federation import FederatedRun  # imports Flower's server side

    data = root / "ml-100k"
    if not data.exists():
        synthetic_ml100k(data, users=users)
    flat = ExperimentConfig.from_flat(
        {
            "data-dir": str(data),
            "cache-dir": str(root / "cache"),
            "output-dir": str(root / "out"),
            "run-name": name,
            **TINY,
            "min-available-nodes": users,
            **overrides,
        }
    ).flat()
    grid = InProcessGrid(flat, users, tap)
    summary = FederatedRun(grid, ExperimentConfig.from_flat(flat)).run()
    out = root / "out" / name
    return {
        "summary": summary,
        "history": json.loads((out / "history.json").read_text())["rounds"],
        "config": json.loads((out / "config.json").read_text()),
        "grid": grid,
        "flat": flat,
        "last": checkpoint.load(out / "last.pt"),
    }


@pytest.fixture(scope="module")
def task_identity():
    """Instruction messages read the run/node id a ServerApp process gets from Flower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with server_identity():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, task_identity) -> dict:
    root = tmp_path_factory.mktemp("privacy")
    out = {}
    for mode, overrides in MODES.items():
        wire = Wire()
        out[mode] = {**run_inprocess(root, mode, overrides, wire), "wire": wire}
    return out


def _model(run: dict):
    from feddmmr_flower.experiment import build_model

    cfg = ExperimentConfig.from_flat(run["flat"])
    return build_model(cfg, load_assets(cfg)), cfg


# ------------------------------------------------------------------------ accountant
# Reference values: dp-accounting 0.6.0 RdpAccountant(orders=feddmmr_flower.privacy.ORDERS,
# ADD_OR_REMOVE_ONE), PoissonSampledDpEvent(q, GaussianDpEvent(z)) x T, get_epsilon(1e-5).
@pytest.mark.parametrize(
    "q, z, rounds, epsilon",
    [
        (0.1, 1.0, 150, 9.55853652554936),
        (94 / 943, 0.8, 450, 26.678949948766615),
        (1.0, 2.0, 10, 8.087861628831664),
        (0.01, 1.1, 1000, 1.7252908180449444),
        (0.5, 5.0, 3, 0.768094014166763),
    ],
)
def test_rdp_accountant_matches_dp_accounting(q, z, rounds, epsilon) -> None:
    acc = RdpAccountant(1e-5)
    acc.compose(q, z, rounds)
    assert acc.epsilon() == pytest.approx(epsilon, rel=1e-9)
    again = RdpAccountant.from_state(json.loads(json.dumps(acc.state_dict())))
    assert again.epsilon() == acc.epsilon() and again.releases == rounds


def test_rdp_basics() -> None:
    np.testing.assert_allclose(rdp_subsampled_gaussian(1.0, 2.0, (2, 10)), [2 / 8, 10 / 8])
    assert (rdp_subsampled_gaussian(0.1, 1.0, (2, 8)) < rdp_subsampled_gaussian(1.0, 1.0, (2, 8))).all()
    acc = RdpAccountant(1e-5)
    for _ in range(20):
        acc.compose(0.1, 1.0)
    assert acc.releases == 20 and len(acc.events) == 1 and acc.epsilon() < acc.epsilon(amplified=False)
    # LocalDpMod's sigma; its RDP epsilon for one release is below the nominal one (classic bound is loose).
    sigma = local_dp_noise_std(0.1, 1.0, 1e-5)
    assert sigma == pytest.approx(0.1 * np.sqrt(2 * np.log(1.25e5)))
    assert local_dp_epsilon(0.1, sigma, 1e-5, 1) < 1.0 < local_dp_epsilon(0.1, sigma, 1e-5, 10)


def test_privacy_config_errors_name_the_knob() -> None:
    for values, needle in [
        ({"dp-mode": "global"}, "dp-mode"),
        ({"dp-clipping-norm": 0}, "dp-clipping-norm"),
        ({"dp-delta": 1.5}, "dp-delta"),
        ({"secagg-threshold": 3}, "secagg-threshold"),
        ({"dp-mode": "central-fixed", "dp-noise-multiplier": 0.0}, "dp-noise-multiplier"),
        ({"secure-aggregation": True, "dp-mode": "central-fixed"}, "secure-aggregation"),
        ({"secure-aggregation": True, "strategy": "fedmedian"}, "fedmedian"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            ExperimentConfig.from_flat(values)


# ------------------------------------------------------------------- prototype release
def test_min_cluster_size_and_noise_applied_before_release() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    vectors = np.concatenate(
        [
            centres[0] + 0.01 * rng.normal(size=(6, 3)),
            centres[1] + 0.01 * rng.normal(size=(2, 3)),
            centres[2] + 0.01 * rng.normal(size=(4, 3)),
        ]
    )
    weights = np.ones(len(vectors))
    cfg = prototype_config(num_prototypes=3, min_cluster_size=3, noise_std=0.0, seed=0)
    c, s = local_prototypes(vectors, weights, cfg)
    assert sorted(s.tolist()) == [4.0, 6.0]  # the 2-member cluster is never released
    assert local_prototypes(
        vectors, weights, prototype_config(num_prototypes=3, min_cluster_size=7, noise_std=0.0, seed=0)
    )[0].shape == (0, 3)
    assert local_prototypes(vectors[:2], weights[:2], cfg)[0].shape == (0, 3)  # fewer entries than the minimum
    noisy = [
        local_prototypes(
            vectors, weights, prototype_config(num_prototypes=3, min_cluster_size=3, noise_std=0.5, seed=0)
        )[0]
        for _ in range(2)
    ]
    order = np.argsort(s)
    for n in noisy:
        diff = n[np.argsort(local_prototypes(vectors, weights, cfg)[1])] - c[order]
        assert 0.1 < diff.std() < 1.5
    assert not np.allclose(noisy[0], noisy[1])  # fresh noise each release, not the run seed


def test_client_releases_only_filtered_noised_prototypes(small_ml100k: Path, tmp_path: Path, one_torch_thread) -> None:
    """The real client training step: released prototypes obey min-cluster-size and carry the noise."""
    from feddmmr_flower.client import ClientRuntime
    from feddmmr_flower.prototypes import memory_prototypes
    from feddmmr_flower.stages import trainable_state

    base = {
        "data-dir": str(small_ml100k),
        "cache-dir": str(tmp_path / "cache"),
        "hidden": 16,
        "maxlen": 30,
        "negatives": 20,
        "prototype-noise": 0.0,
    }
    released = {}
    for key, extra in {"plain": {}, "noisy": {"prototype-noise": 0.3}, "strict": {"min-cluster-size": 50}}.items():
        runtime = ClientRuntime(ExperimentConfig.from_flat({**base, **extra}))
        arrays = trainable_state(runtime.model, "finetune") | trainable_state(runtime.model, "pretrain")
        memory = None
        for rnd in (1, 2, 3):  # fill the memory over a few passes
            outcome = runtime.train(
                0, arrays, None, memory, stage="finetune", lr=0.05, local_epochs=1, server_round=rnd
            )
            memory = outcome.memory
        exact, sizes = memory_prototypes(
            runtime.model,
            LocalDynamicMemory.single(runtime.memory_cfg, memory),
            0,
            prototype_config(runtime.cfg, num_prototypes=5, noise_std=0.0),
        )
        released[key] = (outcome, exact, sizes)
    plain, exact, sizes = released["plain"]
    assert len(plain.sizes) > 0 and (plain.sizes >= 3).all()
    np.testing.assert_allclose(plain.centroids, exact, atol=1e-5)
    noisy, exact, _ = released["noisy"]
    assert noisy.centroids.shape == exact.shape and 0.2 < float((noisy.centroids - exact).std()) < 0.4
    assert released["strict"][0].centroids.shape[0] == 0 and released["strict"][0].sizes.shape == (0,)


# ------------------------------------------------------------------------ wire test
def _stage_of(ins: Message) -> str:
    return str(ins.content.config_records["config"]["stage"])


def _arrays(msg: Message):
    """The named arrays of a message (the model travels packed into one array: feddmmr_wire.packing)."""
    from feddmmr_wire import unpack_content

    return unpack_content(msg.content).array_records["arrays"]


def _check_train_reply(ins: Message, data: bytes, reply: Message, model, cfg) -> None:
    from feddmmr_flower.stages import trainable_names

    content = reply.content
    assert set(content.array_records) == {"arrays", "prototypes"}
    assert set(content.metric_records) == {"metrics"} and set(content.config_records) <= {"layout"}
    arrays = _arrays(reply)
    assert list(arrays.keys()) == trainable_names(model, _stage_of(ins))  # the stage's tensors, nothing else
    sent = _arrays(ins)
    for name, arr in arrays.items():
        assert arr.shape == sent[name].shape and np.dtype(arr.dtype).kind == "f"
    protos = content.array_records["prototypes"]
    assert set(protos.keys()) == {"centroids", "sizes"}
    k = protos["sizes"].shape[0]
    assert protos["centroids"].shape == (k, model.config.prototype_dim) and k <= cfg.num_prototypes
    assert (protos["sizes"].numpy() >= cfg.min_cluster_size).all()
    metrics = content.metric_records["metrics"]
    assert all(isinstance(v, int | float) for v in metrics.values())  # scalars only: no lists, no ids
    payload = sum(arr.numpy().nbytes for arr in arrays.values()) + protos["centroids"].numpy().nbytes + 4 * k
    overhead = 2048 + 300 * (len(arrays) + 2)  # names, npy headers, metric keys
    assert len(data) < payload + overhead  # nothing of substance besides the arrays, prototypes, metrics


def _check_no_memory(data: bytes, grid: InProcessGrid, node: int) -> None:
    memory = grid.contexts[node].state.array_records["memory"]
    items = memory["item"].numpy()
    held = items[items > 0]
    assert len(held) >= 3
    for dtype in (np.int64, np.int32, np.int16):
        assert held.astype(dtype).tobytes() not in data  # the memory's item ids never cross the wire


@pytest.mark.parametrize("mode", ["off", "central-fixed", "local"])
def test_wire_holds_only_trainable_arrays_prototypes_and_scalars(runs, mode) -> None:
    run = runs[mode]
    model, cfg = _model(run)
    seen = {"train": set(), "evaluate": 0}
    for ins, data, reply in run["wire"].items:
        assert not reply.has_error(), reply.error
        if ins.metadata.message_type == MessageType.TRAIN:
            _check_train_reply(ins, data, reply, model, cfg)
            _check_no_memory(data, run["grid"], ins.metadata.dst_node_id)
            seen["train"].add(_stage_of(ins))
        else:
            assert set(reply.content.keys()) == {"metrics"}  # evaluation: scalar metrics only
            assert all(isinstance(v, int | float) for v in reply.content["metrics"].values()) and len(data) < 4096
            seen["evaluate"] += 1
    assert seen["train"] == {"pretrain", "align", "finetune"} and seen["evaluate"] > 0


def test_secagg_wire_holds_only_masked_updates(runs) -> None:
    from flwr.common import bytes_to_ndarray

    from feddmmr_wire.keys import SECAGG_EXTRAS

    run = runs["secagg"]
    model, cfg = _model(run)
    collected = 0
    for ins, data, reply in run["wire"].items:
        assert not reply.has_error(), reply.error
        content = reply.content
        if ins.metadata.message_type != MessageType.TRAIN:
            continue
        assert all(len(rec) == 0 for rec in content.array_records.values())  # no plaintext tensor at all
        secagg = content.config_records["secaggplus_configs"]
        if "masked_params" not in secagg:
            assert set(content.keys()) == {"secaggplus_configs"}  # keys and shares only
            continue
        collected += 1
        _check_no_memory(data, run["grid"], ins.metadata.dst_node_id)
        masked = [bytes_to_ndarray(b) for b in secagg["masked_params"]][1:]
        extras = content.config_records[SECAGG_EXTRAS]
        names = list(extras["array-names"])
        assert [m.shape for m in masked] == [tuple(ins.content["arrays"][n].shape) for n in names]
        # Masked values are uniform over [0, 2^32): nothing of the update shows through.
        flat = np.concatenate([m.ravel() for m in masked]).astype(np.float64)
        assert abs(flat.mean() / 2**32 - 0.5) < 0.02 and flat.std() / 2**32 > 0.25
        assert set(extras.keys()) <= {"array-names", "centroids", "sizes"}
        if "sizes" in extras:
            assert (bytes_to_ndarray(extras["sizes"]) >= cfg.min_cluster_size).all()
    assert collected == NUM_USERS * 3  # every node, every round


def test_plain_item_embedding_update_reveals_touched_rows_local_dp_hides_them(runs) -> None:
    """docs/privacy.md: rows of items the user touched change, the others stay exactly equal."""
    run = runs["off"]
    cfg = ExperimentConfig.from_flat(run["flat"])
    data = load_assets(cfg).data
    changed_fraction = {}
    for mode in ("off", "local"):
        for ins, _, reply in runs[mode]["wire"].items:
            if ins.metadata.message_type != MessageType.TRAIN or _stage_of(ins) != "pretrain":
                continue
            name = "backbone.item_emb.weight"
            delta = _arrays(reply)[name].numpy() - _arrays(ins)[name].numpy()
            rows = np.flatnonzero(np.abs(delta).sum(1) > 0)
            user = int(runs[mode]["grid"].contexts[ins.metadata.dst_node_id].node_config["partition-id"])
            history = set(data.sequence(user)[:-2].tolist())  # the training split
            if mode == "off":
                assert history <= set(rows.tolist())  # every training item's row moved
            changed_fraction.setdefault(mode, []).append(len(rows) / delta.shape[0])
    assert max(changed_fraction["off"]) < 0.9  # plain: the untouched rows are exactly unchanged
    assert min(changed_fraction["local"]) == 1.0  # local DP: every row moves, touched or not


# --------------------------------------------------------------------------------- DP
def test_central_dp_clips_on_the_client_and_reports_epsilon(runs) -> None:
    run = runs["central-fixed"]
    clip = run["flat"]["dp-clipping-norm"]
    norms = []
    for ins, _, reply in run["wire"].items:
        if ins.metadata.message_type == MessageType.TRAIN:
            assert ins.content["config"]["clipping_norm"] == clip
            sent = _arrays(ins)
            norms.append(
                np.sqrt(
                    sum(
                        float(((a.numpy().astype(np.float64) - sent[n].numpy()) ** 2).sum())
                        for n, a in _arrays(reply).items()
                    )
                )
            )
    assert max(norms) <= clip * (1 + 1e-5) and min(norms) > 0.5 * clip  # clipped by fixedclipping_mod
    # Plain updates of this model are larger than the clip: clipping really happened.
    plain = [r["train"]["update-norm-median"] for r in runs["off"]["history"]]
    assert max(plain) > clip
    expected = RdpAccountant(1e-5)
    for r in run["history"]:
        expected.compose(1.0, 1.0)
        assert r["train"]["dp-epsilon"] == pytest.approx(expected.epsilon(), abs=1e-6)
        assert r["train"]["dp-noise-std"] == pytest.approx(1.0 * clip / NUM_USERS, abs=1e-6)
        assert r["train"]["dp-server-clipped"] == 0
    dp = run["summary"]["privacy"]["dp"]
    assert dp["releases"] == 3 and dp["epsilon"] == pytest.approx(expected.epsilon(), abs=1e-4)
    assert run["config"]["privacy"]["dp"]["noise_multiplier"] == 1.0
    assert run["last"].resume["strategy"]  # accountant state is in the checkpoint (resume keeps counting)


def test_local_dp_noise_and_report(runs) -> None:
    run = runs["local"]
    sigma = local_dp_noise_std(0.05, 1.0, 1e-5)
    for ins, _, reply in run["wire"].items:
        if ins.metadata.message_type == MessageType.TRAIN:
            sent = _arrays(ins)
            delta = np.concatenate(
                [(a.numpy().astype(np.float64) - sent[n].numpy()).ravel() for n, a in _arrays(reply).items()]
            )
            assert delta.std() == pytest.approx(sigma, rel=0.1)  # LocalDpMod's Gaussian noise on every entry
    dp = run["summary"]["privacy"]["dp"]
    assert dp["noise_std"] == pytest.approx(sigma, rel=1e-5) and dp["max_releases_per_node"] == 3
    assert dp["epsilon_composed_max_node"] == pytest.approx(local_dp_epsilon(0.05, sigma, 1e-5, 3), abs=1e-4)


# ---------------------------------------------------------------------------- SecAgg+
def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_secagg_equals_plain_within_quantisation(runs) -> None:
    plain, secure = runs["off"], runs["secagg"]
    assert _max_diff(plain["last"].state_dict, secure["last"].state_dict) < 1e-4
    assert secure["summary"]["test"] == plain["summary"]["test"]
    for r in secure["history"]:
        assert r["train"]["secure-aggregation"] == 1 and r["train"]["num-accepted"] == NUM_USERS
    assert secure["summary"]["privacy"]["secure_aggregation"]["num_shares"] == 3


def test_secagg_with_fedadam_and_a_dropout_equals_plain_rejection(tmp_path, task_identity) -> None:
    """A client whose update is NaN: rejected by the plain server, dropped (and unmasked around) by
    SecAgg+. Both aggregate the same five clients, so the models agree; FedAdam on top."""
    common = {"strategy": "fedadam", "fault-nan-partition": 2, "stage-schedule": "pretrain:2"}
    plain = run_inprocess(tmp_path, "plain", common)
    secure = run_inprocess(tmp_path, "secure", {**common, "secure-aggregation": True})
    assert [len(r["rejected"]) for r in plain["history"]] == [1, 1]
    for r in secure["history"]:
        assert not r["failed"] and [f["partition_id"] for f in r["rejected"]] == [2]
        assert "withheld" in r["rejected"][0]["reason"] and "NaN" in r["rejected"][0]["reason"]
        assert r["train"]["num-accepted"] == NUM_USERS - 1
    a, b = plain["last"].state_dict, secure["last"].state_dict
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    # FedAdam with tau = 1e-9 turns the *sign* of each coordinate's mean update into a step of up to
    # server-lr: where the true mean is below SecAgg+'s quantisation step (~5e-7) the sign can flip.
    # Elsewhere the two runs agree; the flipped coordinates differ by at most one step per round.
    assert float((diff < 1e-4).double().mean()) > 0.99
    assert float(diff.max()) <= 2 * 0.01 * 2 + 1e-6


# ------------------------------------------------------------------ real simulation
@pytest.mark.slow
def test_secagg_in_a_flwr_run_simulation_equals_the_plain_loop(tmp_path, task_identity) -> None:
    """SecAgg+ over Flower's real simulation runtime (Ray, SuperLink, one ClientApp per node) gives
    the model the plain round loop gives on the same data (within quantisation)."""
    from .flwr_utils import copy_app, flwr_run

    users = 4
    overrides = {"stage-schedule": "pretrain:2", "eval-users": 2, "eval-every": 1000}
    plain = run_inprocess(tmp_path, "plain", overrides, users=users)
    flat = {**plain["flat"], **overrides, "run-name": "secure", "secure-aggregation": True}
    flat = {k: v for k, v in flat.items() if v != ""}
    done = flwr_run(
        copy_app(tmp_path / "app"),
        tmp_path / "flwr-home",
        flat,
        f"num-supernodes={users} client-resources-num-cpus=1",
        timeout=240,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    out = tmp_path / "out" / "secure"
    assert (out / "summary.json").is_file(), log[-3000:]
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["train"]["secure-aggregation"] for r in history] == [1, 1]
    assert all(r["train"]["num-accepted"] == users for r in history)
    secure = checkpoint.load(out / "last.pt").state_dict
    assert _max_diff(plain["last"].state_dict, secure) < 1e-4


def test_central_dp_mean_is_fixed_denominator_clipped_and_noised_then_fedadam(task_identity) -> None:
    """Unit level: replies re-clipped on the server, absent sampled clients count as zero updates,
    noise std = z C / m, and the server optimiser only ever sees that noised mean."""
    from strategies.dp import CentralFixedClippingDP

    from .test_strategy import configure, global_arrays, make_strategy, reply, to_np

    dp = CentralFixedClippingDP(clipping_norm=1.0, noise_multiplier=1e-9, delta=1e-5)
    dp.population = 10
    st = make_strategy("fedavg", privacy=dp)
    g = global_arrays()
    gn = to_np(g)
    ins = configure(st, 1, g, [1, 2, 3, 4])  # 4 sampled, 2 answer
    big = {"emb": gn["emb"] + 3.0, "w": gn["w"]}  # norm 3 * sqrt(8): clipped to 1 on the server
    small = {"emb": gn["emb"], "w": gn["w"] + 0.1}  # norm 0.2: untouched
    arrays, metrics = st.aggregate_train(1, [reply(ins[0], big, 5, 0), reply(ins[1], small, 1, 1)])
    clipped = 3.0 / (3.0 * np.sqrt(8))
    np.testing.assert_allclose(arrays["emb"].numpy(), gn["emb"] + clipped / 4, atol=1e-6)  # uniform, over m = 4
    np.testing.assert_allclose(arrays["w"].numpy(), gn["w"] + 0.1 / 4, atol=1e-6)
    assert metrics["dp-server-clipped"] == 1 and metrics["dp-zero-padded"] == 2
    assert dp.accountant.events == [(0.4, 1e-9, 1)]
    # Noise: std z C / m on every coordinate of the mean.
    dp = CentralFixedClippingDP(clipping_norm=2.0, noise_multiplier=1.0, delta=1e-5)
    dp.population = 4
    big_g = {"emb": np.zeros((400, 50), np.float32)}
    st = make_strategy("fedavg", privacy=dp)
    st.trainable_names = {"pretrain": ["emb"], "align": ["emb"], "finetune": ["emb"]}
    from flwr.app import Array, ArrayRecord

    g2 = ArrayRecord({"emb": Array(big_g["emb"])})
    ins = configure(st, 1, g2, [1, 2, 3, 4])
    out, metrics = st.aggregate_train(1, [reply(m, {"emb": big_g["emb"]}, 1, i) for i, m in enumerate(ins)])
    assert metrics["dp-noise-std"] == pytest.approx(2.0 / 4)
    assert float(out["emb"].numpy().std()) == pytest.approx(0.5, rel=0.03)  # zero updates + N(0, (zC/m)^2)
    assert dp.accountant.epsilon() == pytest.approx(RdpAccountant(1e-5, [(1.0, 1.0, 1)]).epsilon())


def test_local_dp_composes_with_secagg(tmp_path, task_identity) -> None:
    """LocalDpMod noises the update before secaggplus_mod masks it; the server counts releases."""
    run = run_inprocess(
        tmp_path, "local-secagg", {"secure-aggregation": True, "dp-mode": "local", "stage-schedule": "pretrain:2"}
    )
    assert [r["train"]["num-accepted"] for r in run["history"]] == [NUM_USERS, NUM_USERS]
    assert run["summary"]["privacy"]["dp"]["max_releases_per_node"] == 2
    assert run["summary"]["privacy"]["secure_aggregation"] is not None
    plain = run["last"].state_dict["backbone.item_emb.weight"].numpy()
    assert np.isfinite(plain).all()
