"""Round time in a Flower simulation vs clients per round, against the in-process floor.

For each number of sampled clients (default 10, 50, 100, 300 of ML-100K's 943 users) this runs

* a real ``flwr run`` (Ray simulation, one CPU per ClientApp, so 2 at a time here) of FedDMMR
  ``full``, 5 pretrain + 5 finetune rounds, and
* ``benchmarks.inprocess_federation``: the same ServerApp loop, strategy and ClientApp train
  handler in one process, without Flower's transport (the floor),

and reports the mean seconds of the steady rounds (not the first, not those with validation) per
stage, split into client compute (summed client training seconds / parallel ClientApps) and the
rest, and the ratio of the simulation to the floor (as run, in one process; and spread ideally
over every core, floor / cores).

    python -m benchmarks.round_time --data-dir ../shared/data/ml-100k --shared ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ml100k_features, parse_overrides
from benchmarks.sim_lab import run_noop_simulation, run_simulation, steady_rounds
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.provenance import command_line, machine_description
from feddmmr_flower.run_record import TOTAL_CLIENT_TRAIN_SECONDS

SCHEDULE = "pretrain:5,finetune:5"
FLOOR_METHOD = (
    "`python -m benchmarks.inprocess_federation`, the same ServerApp loop, strategy and ClientApp train handler "
    "in one process without Flower's transport (no serialisation, mods, Ray or SuperLink)"
)


def base_config(args, out: Path, name: str, fraction: float) -> dict:
    return {
        "data-dir": str(Path(args.data_dir).resolve()),
        "cache-dir": str(Path(args.cache_dir).resolve()),
        **ml100k_features(args.shared, absolute=True),
        "stage-schedule": SCHEDULE,
        "fraction-train": fraction,
        "eval-users": 10,
        "eval-every": 1000,
        "final-test": False,
        "output-dir": str(out),
        "run-name": name,
        "min-available-nodes": 1,
        **parse_overrides(args.set),
    }


def per_stage(history: list[dict], cores: int) -> dict:
    out = {}
    for stage in ("pretrain", "finetune"):
        rounds = [r for r in steady_rounds(history) if r["stage"] == stage]
        if not rounds:
            continue
        seconds = float(np.mean([r["seconds"] for r in rounds]))
        client = float(np.mean([r["train"].get(TOTAL_CLIENT_TRAIN_SECONDS, 0.0) for r in rounds]))
        out[stage] = {
            "rounds": [r["round"] for r in rounds],
            "round_s": round(seconds, 3),
            "client_compute_s": round(client / cores, 3),
            "rest_s": round(seconds - client / cores, 3),
            "summed_client_train_s": round(client, 3),
        }
    return out


def model_floats(config: dict) -> int:
    """Floats the server sends each client (the full model, packed into one array)."""
    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.experiment import load_data, model_config
    from feddmmr_flower.models.feddmmr import FedDMMR

    cfg = ExperimentConfig.from_flat(config)
    return int(sum(t.numel() for t in FedDMMR(model_config(cfg, load_data(cfg)[0])).state_dict().values()))


def floor(args, config: dict, out: Path) -> dict:
    """The in-process loop (one process) over the same config."""
    result = out / f"{config['run-name']}-floor.json"
    overrides = " ".join(
        f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
        for k, v in config.items()
        if k not in ("output-dir", "run-name")
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.inprocess_federation",
            "--threads",
            "1",
            "--run-config",
            overrides,
            "--out",
            str(result),
        ],
        check=True,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ml-100k")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--clients", default="10,50,100,300")
    parser.add_argument("--users", type=int, default=943, help="users in the dataset (ML-100K: 943)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config value (TOML), e.g. --set top-users=6 (smoke tests)",
    )
    parser.add_argument("--out", default="benchmarks/results/round_time_ml100k.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="round-time-") as tmp:
        out = Path(tmp)
        for clients in (int(c) for c in args.clients.split(",")):
            config = base_config(args, out, f"clients-{clients}", clients / args.users)
            tick = time.time()
            sim = run_simulation(config, args.users, log=out / f"clients-{clients}.log")
            first_round = sim["history"][0]["seconds"]
            flo = floor(args, config, out)
            noop = run_noop_simulation(args.users, clients, model_floats(config), log=out / f"noop-{clients}.log")
            row = {
                "clients_per_round": clients,
                "simulation": per_stage(sim["history"], cores),
                "simulation_first_round_s": first_round,
                "simulation_total_s": sim["seconds"],
                "floor": per_stage(flo["history"], 1),
                "memory_by_kind": sim["memory_by_kind"],
                # Flower alone: a no-op ClientApp echoing the model-sized array (rounds after the first)
                "noop_simulation_round_s": round(float(np.mean(noop[1:])), 3),
            }
            for stage, fl in row["floor"].items():
                if stage in row["simulation"]:
                    sim_stage = row["simulation"][stage]
                    ideal = fl["round_s"] / cores  # the floor spread over every core, no overhead at all
                    sim_stage["floor_s"] = fl["round_s"]
                    sim_stage["ratio_to_floor"] = round(sim_stage["round_s"] / fl["round_s"], 2)
                    sim_stage["floor_on_all_cores_s"] = round(ideal, 3)
                    sim_stage["ratio_to_floor_on_all_cores"] = round(sim_stage["round_s"] / ideal, 2)
            rows.append(row)
            print(
                f"[round-time] {clients} clients: no-op Flower {row['noop_simulation_round_s']:.2f}s/round; "
                + ", ".join(
                    f"{s} {v['round_s']:.2f}s/round (floor {v.get('floor_s', float('nan')):.2f}s, "
                    f"x{v.get('ratio_to_floor', float('nan'))})"
                    for s, v in row["simulation"].items()
                )
                + f" [{time.time() - tick:.0f}s]",
                file=sys.stderr,
                flush=True,
            )
    hundred = next((r for r in rows if r["clients_per_round"] == 100), None)
    targets = []
    if hundred:
        for stage, v in hundred["simulation"].items():
            targets.append(
                {
                    "target": f"100 sampled users: round ≤ 3 s after start-up ({stage})",
                    "value": v["round_s"],
                    "bar": 3.0,
                    "met": v["round_s"] <= 3.0,
                }
            )
            if "ratio_to_floor" in v:
                targets.append(
                    {
                        "target": f"100 sampled users: simulation ≤ 1.5× the in-process floor ({stage}; "
                        f"× {v['ratio_to_floor_on_all_cores']} of the floor spread over {cores} cores)",
                        "value": v["ratio_to_floor"],
                        "bar": 1.5,
                        "met": v["ratio_to_floor"] <= 1.5,
                    }
                )
    payload = {
        "command": command_line(),
        "machine": machine_description(),
        "cores": cores,
        "schedule": SCHEDULE,
        "floor_method": FLOOR_METHOD,
        "users": args.users,
        "rows": rows,
        "targets": targets,
    }
    atomic_write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
