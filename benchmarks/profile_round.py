"""Profile of one federated round: where the time of a round goes, top 10 hot spots.

The real ServerApp round loop, strategy and ClientApp (mods, Flower's message serialisation)
run in one process (``benchmarks.harness``), so one cProfile sees the server and all 94
clients of an ML-100K round. Schedule ``pretrain:3,finetune:3``; the profiler is on for exactly
round 2 (pretrain) and round 5 (finetune): from the end of the round before to the end of the round
(neither ends a stage, so neither validates or plots).

    python -m benchmarks.profile_round --data-dir ../shared/data/ml-100k --shared ../shared/data
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ml100k_features
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.provenance import command_line, machine_description

PROFILED_ROUNDS = {2: "pretrain", 5: "finetune"}
# What the profiles led to (before = benchmarks/results/profile_round_before.json, the code before).
ACTIONS = [
    "Flower's Array(ndarray) / Array.numpy() go through np.save / np.load, whose header parsing "
    "(ast.literal_eval: builtins.compile, ast._convert, _read_array_header) was the top non-torch cost: "
    "feddmmr_wire/arrays.py now writes and reads the same .npy bytes directly (to_array / from_array, 5x faster "
    "per array, byte-identical, tested).",
    "The ClientApp unpacked the packed model into ~55 Flower Arrays and read them straight back: it now reads "
    "the packed vector itself (read_arrays) and packs its reply (arrays_records); the mod only unpacks when a "
    "DP mod needs named arrays.",
    "The server unpacked every reply into ~55 Flower Arrays, read them back to check them, and Flower's base "
    "strategy read them once more per array (aggregate_train 0.6 s of a profiled round): the server now reads "
    "each reply's packed vector once as numpy, and the base strategy aggregates ONE packed vector (exact: every "
    "base here is elementwise; tested against per-array aggregation for six bases): 0.23 s.",
    "Evaluation scored every user twice (sampled candidates, then the whole catalogue): with both protocols one "
    "pass over the catalogue now serves both (scores are per item), saving one sequence encoding per user.",
    "Left: torch itself (backward, linear, attention) is the rest of a client's time; Flower's per-message cost "
    "in the Ray simulation is outside this in-process profile (see the round-time table).",
]
TOP = 10


def _short(func: tuple) -> str:
    """A profile entry's place without machine-specific paths (packages, the standard library, ours)."""
    filename, line, name = func
    if filename == "~":
        return name
    if "site-packages/" in filename:
        filename = filename.split("site-packages/", 1)[1]
    elif "/lib/python" in filename:
        filename = "python" + filename.split("/lib/python", 1)[1]
    elif os.path.isabs(filename):
        filename = os.path.relpath(filename)
    return f"{filename}:{line}({name})"


def top(stats: pstats.Stats, key: str, only_ours: bool = False) -> list[dict]:
    rows = []
    for func, (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        ours = any(part in func[0] for part in ("/feddmmr_flower/", "/client_app/", "/server_app/", "/strategies/"))
        if only_ours and not ours:
            continue
        rows.append({"function": _short(func), "calls": nc, "self_s": round(tt, 3), "cumulative_s": round(ct, 3)})
    rows.sort(key=lambda r: -r[key])
    return rows[:TOP]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ml-100k")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--label", default="after", help="names this profile (before/after a change)")
    parser.add_argument("--out", default="benchmarks/results/profile_round.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from benchmarks.harness import run_federation

    tmp = tempfile.mkdtemp(prefix="profile-round-")
    config = {
        "data-dir": args.data_dir,
        "cache-dir": args.cache_dir,
        **ml100k_features(args.shared),
        "stage-schedule": "pretrain:3,finetune:3",
        "eval-every": 1000,
        "eval-users": 1,
        "final-test": False,
        "output-dir": tmp,
        "run-name": "profile",
        "min-available-nodes": 1,
    }
    profiles: dict[int, cProfile.Profile] = {}
    seconds: dict[int, float] = {}

    def after_round(rnd: int) -> None:  # the profiler spans whole rounds
        if rnd in profiles:
            profiles[rnd].disable()
            seconds[rnd] = time.perf_counter() - seconds[rnd]
        if rnd + 1 in PROFILED_ROUNDS:
            profiles[rnd + 1] = cProfile.Profile()
            seconds[rnd + 1] = time.perf_counter()
            profiles[rnd + 1].enable()

    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.experiment import load_data

    users = load_data(ExperimentConfig.from_flat(config))[0].num_users
    run_federation(config, users, after_round=after_round)
    result = {
        "command": command_line(),
        "machine": machine_description(),
        "label": args.label,
        "clients_per_round": round(config["fraction-train"] * users),
        "rounds": {},
        "actions": ACTIONS,
    }
    for rnd, stage in PROFILED_ROUNDS.items():
        stats = pstats.Stats(profiles[rnd], stream=io.StringIO())
        result["rounds"][stage] = {
            "round": rnd,
            "seconds": round(seconds[rnd], 3),
            "profiled_seconds": round(stats.total_tt, 3),  # type: ignore[attr-defined]
            "top_self_time": top(stats, "self_s"),
            "top_our_functions_cumulative": top(stats, "cumulative_s", True),
        }
        print(f"[profile] round {rnd} ({stage}): {seconds[rnd]:.2f} s", file=sys.stderr)
        for row in result["rounds"][stage]["top_self_time"]:
            print(f"  {row['self_s']:7.3f} s self  {row['calls']:>7} calls  {row['function']}", file=sys.stderr)
    atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
