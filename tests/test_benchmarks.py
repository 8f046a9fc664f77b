"""The benchmark machinery (#6) on tiny data: the quality table's aggregation, synthetic users,
per-process memory watching, and the run knobs the benchmarks rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from feddmmr_flower.evaluation import history_buckets

from .conftest import synthetic_ml100k

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--set",
    'stage-schedule="pretrain:2,align:1,finetune:1"',
    "--set",
    "hidden=16",
    "--set",
    "maxlen=20",
    "--set",
    "eval-every=1",
    "--set",
    "eval-users=3",
    "--set",
    "visual-features=false",
    "--set",
    'descriptions=""',
    "--set",
    "negatives=10",
    "--set",
    "eval-negatives=10",
]


def test_history_buckets_cover_every_user_once():
    lengths = np.array([3, 50, 51, 150, 151, 900])
    buckets = history_buckets(lengths)
    assert list(buckets) == ["<=50", "51-150", ">150"]
    assert [int(m.sum()) for m in buckets.values()] == [2, 2, 2]
    assert np.array_equal(sum(m.astype(int) for m in buckets.values()), np.ones(6, int))


@pytest.mark.slow
def test_quality_table_runs_every_kind_of_row_and_aggregates_over_seeds(tmp_path):
    data = synthetic_ml100k(tmp_path / "ml-100k", users=6, items=120)
    out = tmp_path / "results"
    rows = "central-sasrec,central-full,fedavg-sasrec,feddmmr-full-fedadam,local-only"
    command = [
        sys.executable,
        "-m",
        "benchmarks.quality",
        "--data-dir",
        str(data),
        "--shared",
        str(tmp_path / "none"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--seeds",
        "1,2",
        "--rows",
        rows,
        *TINY,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((out / "quality_ml100k.json").read_text())
    assert set(table["rows"]) == set(rows.split(","))
    for name, row in table["rows"].items():
        runs = [json.loads((out / "quality" / f"{name}_seed{s}.json").read_text()) for s in (1, 2)]
        values = [r["test"]["sampled"]["NDCG@10"] for r in runs]
        assert row["sampled"]["NDCG@10"]["n"] == 2
        assert row["sampled"]["NDCG@10"]["mean"] == pytest.approx(np.mean(values), abs=1e-5)
        assert row["sampled"]["NDCG@10"]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-5)
        assert all(0.0 <= r["test"]["full"]["NDCG@10"] <= 1.0 for r in runs)
        assert sum(b["num_users"] for b in runs[0]["by_history_length"].values()) == 6
        assert all(r["cpu_time_s"] > 0 for r in runs) and "--rows" in runs[0]["command"]
    assert table["rows"]["fedavg-sasrec"]["curve"], "federated rows keep their validation curve"
    assert {t["target"].split(" (")[0] for t in table["targets"]} == {
        "federated FedDMMR full ≥ centralized SASRec",
        "FedDMMR full ≥ FedAvg-SASRec + 3%",
    }
    for target in table["targets"]:
        assert target["met"] == (target["value"] >= target["bar"])
    assert (out / "quality_curves.png").stat().st_size > 10_000
    # re-running resumes: every (row, seed) file exists, so nothing runs again
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "started" not in again.stdout


def test_synthetic_users_match_the_source_lengths_and_read_as_ml100k(tmp_path):
    from benchmarks.synthetic_users import write_synthetic
    from feddmmr_flower.data.readers import read_ml100k

    source = synthetic_ml100k(tmp_path / "src", users=30, items=200, per_user=40)
    ratings = source / "u.data"
    rng = np.random.default_rng(1)  # varied lengths: drop a random tail of each user's ratings
    rows = [line for line in ratings.read_text().splitlines() if rng.random() < 0.7]
    ratings.write_text("\n".join(rows) + "\n")
    real = np.loadtxt(ratings, dtype=np.int64)
    out = write_synthetic(source, tmp_path / "synthetic-500", users=500, seed=3)
    fake = np.loadtxt(out / "u.data", dtype=np.int64)
    _, real_lengths = np.unique(real[:, 0], return_counts=True)
    _, fake_lengths = np.unique(fake[:, 0], return_counts=True)
    assert len(fake_lengths) == 500 and set(fake_lengths) <= set(real_lengths)
    assert abs(fake_lengths.mean() - real_lengths.mean()) < 0.1 * real_lengths.mean()
    assert len(np.unique(fake[:, :2], axis=0)) == len(fake), "no user rates an item twice"
    assert set(np.unique(fake[:, 1])) <= set(np.unique(real[:, 1]))
    assert "SYNTHETIC" in (out / "SYNTHETIC.md").read_text()
    raw = read_ml100k(out)
    assert len(raw.interactions) == len(fake)


def test_memory_watch_sees_a_child_process_peak(tmp_path):
    from benchmarks.sim_lab import MemoryWatch, by_kind

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)",
        ]
    )
    watch = MemoryWatch("no-such-marker-" + tmp_path.name, child.pid, period=0.1)
    watch.start()
    child.wait(timeout=30)
    time.sleep(0.2)
    processes = watch.stop()
    assert processes and max(p["peak_rss_mb"] for p in processes) >= 290
    assert sum(v["processes"] for v in by_kind(processes).values()) == len(processes)


def test_final_test_can_be_switched_off(tmp_path):
    from benchmarks.harness import run_federation

    data = synthetic_ml100k(tmp_path / "ml-100k", users=4, items=120)
    splits = []

    def tap(ins, _data, _reply):
        config = ins.content.config_records.get("config")
        splits.append(None if config is None else config.get("split"))

    summary = run_federation(
        {
            "data-dir": str(data),
            "cache-dir": str(tmp_path / "cache"),
            "output-dir": str(tmp_path / "out"),
            "run-name": "no-test",
            "stage-schedule": "pretrain:2",
            "hidden": 16,
            "maxlen": 20,
            "text-features": False,
            "variant": "sasrec",
            "fraction-train": 1.0,
            "eval-every": 1,
            "eval-users": 2,
            "negatives": 10,
            "eval-negatives": 10,
            "final-test": False,
            "min-available-nodes": 4,
            "strategy": "fedavg",
        },
        4,
        tap,
    )
    assert "test" not in splits and "valid" in splits
    assert summary["test"]["sampled"] == {} and summary["best_round"] in (1, 2)
    assert (tmp_path / "out" / "no-test" / "best.pt").is_file()


def test_the_floor_runs_the_server_loop_and_client_handler_in_one_process(tmp_path):
    """benchmarks.inprocess_federation (round_time's floor): the real strategy and ClientApp train
    handler without Flower's transport; its history has the federated shape round_time reads."""
    data = synthetic_ml100k(tmp_path / "ml-100k", users=6, items=120)
    out = tmp_path / "floor.json"
    run_config = (
        f"data-dir='{data}' cache-dir='{tmp_path / 'cache'}' stage-schedule='pretrain:2,finetune:2' hidden=16 "
        "maxlen=20 negatives=10 eval-negatives=10 eval-users=2 eval-every=1000 fraction-train=0.5 final-test=false"
    )
    command = [sys.executable, "-m", "benchmarks.inprocess_federation", "--run-config", run_config, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("python -m benchmarks.inprocess_federation --run-config")
    rounds = payload["history"]
    assert [r["stage"] for r in rounds] == ["pretrain", "pretrain", "finetune", "finetune"]
    assert all(r["train"]["num-accepted"] == 3 and r["train"]["total-client-train-seconds"] > 0 for r in rounds)
    bad = subprocess.run(
        [*command[:4], "stage-schedule='warmup:2'", "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "warmup" in bad.stderr.strip().splitlines()[-1]
