"""A real ``flwr run`` Ray simulation of FedDMMR on a 20-user dataset (issue: Flower apps).

One run of 2 rounds (pretrain, then align) with every node sampled each round, one node
(partition 3) replying with NaN arrays; the assertions read the run's own output files.
"""

from __future__ import annotations

import json

import pytest

from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.experiment import load_assets

from .conftest import synthetic_ml100k
from .flwr_utils import copy_app, flwr_run

pytestmark = pytest.mark.slow
NUM_USERS = 20
NAN_PARTITION = 3


@pytest.fixture(scope="module")
def simulation_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sim")
    data_dir = synthetic_ml100k(root / "ml-100k")
    config = {
        "data-dir": str(data_dir),
        "cache-dir": str(root / "cache"),
        "output-dir": str(root / "outputs"),
        "run-name": "sim",
        "stage-schedule": "pretrain:1,align:1",
        "fraction-train": 1.0,
        "eval-every": 1,
        "eval-users": 5,
        "hidden": 16,
        "maxlen": 30,
        "negatives": 20,
        "eval-negatives": 20,
        "fault-nan-partition": NAN_PARTITION,
        "min-available-nodes": NUM_USERS,
    }
    # Features once, before the run, so the 20 clients only read the cache.
    load_assets(ExperimentConfig.from_flat(config))
    app = copy_app(root / "app")
    done = flwr_run(
        app, root / "flwr-home", config, f"num-supernodes={NUM_USERS} client-resources-num-cpus=1", timeout=900
    )
    out = root / "outputs" / "sim"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "summary.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())["rounds"]
    return {
        "out": out,
        "history": history,
        "log": done.stdout + done.stderr,
        "root": root,
        "app": app,
        "config": config,
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_history_has_one_record_per_round(simulation_run):
    history = simulation_run["history"]
    assert [r["round"] for r in history] == [1, 2]
    assert [r["stage"] for r in history] == ["pretrain", "align"]
    for rec in history:
        assert rec["seconds"] > 0 and "NDCG@10" in rec["valid"]


def test_memory_persists_across_rounds_on_each_node(simulation_run):
    """Every node trains in both rounds; a memory kept in context.state has seen 2 passes in round 2."""
    first, second = (r["train"] for r in simulation_run["history"])
    assert first["memory-passes"] == pytest.approx(1.0)
    assert second["memory-passes"] == pytest.approx(2.0)
    assert second["memory-size"] > first["memory-size"] > 0


def test_align_round_exchanges_only_projection_tensors(simulation_run):
    """The server accepted replies only if their key set was exactly the stage's trainable names."""
    align = simulation_run["history"][1]
    assert sorted(align["trainable_arrays"]) == ["proj_txt.bias", "proj_txt.weight", "proj_vis.bias", "proj_vis.weight"]
    assert align["train"]["num-accepted"] == NUM_USERS - 1
    pretrain = simulation_run["history"][0]
    assert "backbone.item_emb.weight" in pretrain["trainable_arrays"]
    assert not any(
        name.startswith(("proj_", "vis_expert", "sem_expert", "router")) for name in pretrain["trainable_arrays"]
    )


def test_nan_reply_is_rejected_and_the_run_goes_on(simulation_run):
    for rec in simulation_run["history"]:
        rejected = rec["rejected"]
        assert [r["partition_id"] for r in rejected] == [NAN_PARTITION]
        assert "NaN" in rejected[0]["reason"]
    assert simulation_run["summary"]["rounds"] == 2


def test_outputs_and_final_test_on_all_users(simulation_run):
    out = simulation_run["out"]
    for name in (
        "config.json",
        "history.json",
        "best.pt",
        "checkpoint-pretrain.pt",
        "checkpoint-align.pt",
        "last.pt",
        "curves.png",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    test = simulation_run["summary"]["test"]
    assert test["num_users"] == NUM_USERS
    for protocol in ("sampled", "full"):
        assert 0.0 <= test[protocol]["NDCG@10"] <= test[protocol]["HR@10"] <= 1.0
    assert "round 2/2 [align]" in simulation_run["log"]


def test_resume_from_a_finished_run_adds_no_round(simulation_run):
    """resume-from restores model, strategy state and history from last.pt and goes on from there."""
    root = simulation_run["root"]
    config = {**simulation_run["config"], "resume-from": str(simulation_run["out"])}
    done = flwr_run(
        simulation_run["app"],
        root / "flwr-home-resume",
        config,
        f"num-supernodes={NUM_USERS} client-resources-num-cpus=1",
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "resuming" in log and "after round 2 of 2" in log
    assert "round 1/2" not in log.split("resuming", 1)[1]
    history = json.loads((simulation_run["out"] / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [1, 2]
