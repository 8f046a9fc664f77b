"""Scaling in the number of users: 1k, 10k, 100k SYNTHETIC users, 100 sampled per round.

For each size: synthetic users drawn to match ML-100K's lengths and item popularity
(``synthetic_users.py``; labelled synthetic everywhere), prepared and featurised once (not timed),
then a real ``flwr run`` (Ray simulation, one CPU per ClientApp) of FedDMMR ``full`` with text
features, 4 pretrain + 4 finetune rounds, no final test. Reported per size: start-up (first
round), mean steady round time per stage, and the peak resident memory of every process of the
run (SuperLink, ServerApp, Ray workers running ClientApps, Ray daemons), plus a plot.

    python -m benchmarks.scaling --source ../shared/data/ml-100k --shared ../shared/data
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ml100k_features
from benchmarks.sim_lab import DriverProfile, run_simulation, steady_rounds
from benchmarks.synthetic_users import write_synthetic
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.provenance import command_line, machine_description

SCHEDULE = "pretrain:4,finetune:4"


def prepare(folder: Path, args) -> dict:
    """Prepared sequences + text features in the cache, so that the timed run only reads them."""
    flags = [
        "--data-dir",
        str(folder),
        "--cache-dir",
        args.cache_dir,
        "--descriptions",
        str(Path(args.shared) / "ml-100k-llm/item_descriptions.json"),
    ]
    tick = time.time()
    subprocess.run(
        [sys.executable, "-m", "feddmmr_flower.cli", "prepare", *flags[:4]], check=True, stdout=subprocess.DEVNULL
    )
    subprocess.run(
        [sys.executable, "-m", "feddmmr_flower.cli", "features", *flags, "--no-visual-features"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {"prepare_and_features_s": round(time.time() - tick, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="data/ml-100k", help="ML-100K folder the synthetic users imitate")
    parser.add_argument("--shared", default="../shared/data", help="folder with ml-100k-llm/item_descriptions.json")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--users", default="1000,10000,100000")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--data-root", default="data", help="where the synthetic folders go (git-ignored)")
    parser.add_argument(
        "--py-spy",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also sample the simulation driver of the largest size with py-spy for this long, after its "
        "first round (needs pip install py-spy)",
    )
    parser.add_argument("--out", default="benchmarks/results/scaling_synthetic.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for users in (int(u) for u in args.users.split(",")):
            folder = write_synthetic(Path(args.source), Path(args.data_root) / f"synthetic-{users}", users)
            prep = prepare(folder, args)
            config = {
                "data-dir": str(folder.resolve()),
                "cache-dir": str(Path(args.cache_dir).resolve()),
                **ml100k_features(args.shared, visual=False, absolute=True),
                "stage-schedule": SCHEDULE,
                "fraction-train": args.per_round / users,
                "eval-users": 10,
                "eval-every": 1000,
                "final-test": False,
                "output-dir": tmp,
                "run-name": f"users-{users}",
                "min-available-nodes": 1,
            }
            log = Path(tmp) / f"users-{users}.log"
            largest = users == max(int(u) for u in args.users.split(","))  # py-spy slows what it samples
            spy = (
                DriverProfile(log, args.py_spy, Path(tmp) / f"py-spy-{users}.txt") if args.py_spy and largest else None
            )
            if spy:  # where the simulation driver's time goes, during the steady rounds
                spy.start()
            sim = run_simulation(config, users, log=log, timeout=3600)
            steady = steady_rounds(sim["history"])
            stages = {}
            for stage in ("pretrain", "finetune"):
                rounds = [r for r in steady if r["stage"] == stage]
                if rounds:
                    stages[stage] = {
                        "rounds": [r["round"] for r in rounds],
                        "round_s": round(float(np.mean([r["seconds"] for r in rounds])), 3),
                        "clients": float(np.mean([r["train"].get("num-accepted", 0) for r in rounds])),
                    }
            row = {
                "users": users,
                "synthetic": True,
                **prep,
                "first_round_s": sim["history"][0]["seconds"],
                "run_s": sim["seconds"],
                "stages": stages,
                "memory_by_kind": sim["memory_by_kind"],
                "processes": sim["processes"],
            }
            if spy:
                spy.join(timeout=120)
                row["driver_profile"] = spy.summary
            rows.append(row)
            print(
                f"[scaling] {users} synthetic users: "
                + ", ".join(f"{s} {v['round_s']:.2f} s/round" for s, v in stages.items())
                + "; peak RSS "
                + ", ".join(f"{k} {v['max_peak_rss_mb']:.0f} MB" for k, v in sim["memory_by_kind"].items()),
                file=sys.stderr,
                flush=True,
            )
    payload = {
        "command": command_line(),
        "machine": machine_description(),
        "synthetic": True,
        "schedule": SCHEDULE,
        "per_round": args.per_round,
        "rows": rows,
    }
    if len(rows) > 1:  # flat = the largest size costs at most 1.5x the smallest
        first, last = rows[0], rows[-1]
        payload["flatness"] = {
            "round_s_ratio": {
                s: round(last["stages"][s]["round_s"] / first["stages"][s]["round_s"], 2)
                for s in first["stages"]
                if s in last["stages"]
            },
            "peak_rss_ratio": {
                k: round(last["memory_by_kind"][k]["max_peak_rss_mb"] / v["max_peak_rss_mb"], 2)
                for k, v in first["memory_by_kind"].items()
                if k in last["memory_by_kind"]
            },
        }
    atomic_write_json(Path(args.out), payload)
    from feddmmr_flower.plots import plot_scaling

    plot_scaling(rows, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
