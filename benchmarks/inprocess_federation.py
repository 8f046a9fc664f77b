"""The floor of a federated round: the ServerApp's loop and the ClientApp's train handler in one process.

``FederatedRun`` (the same strategy, aggregation and outputs as ``flwr run``) over the in-process
harness, with train messages handed straight to the ClientApp's train handler (no serialisation,
no mods, no Ray, no SuperLink: ``benchmarks.harness.direct_exchange``). What a simulated round costs
beyond this is Flower's. Used by ``benchmarks.round_time`` (the "floor" columns).

    python -m benchmarks.inprocess_federation --run-config "data-dir='...' stage-schedule='pretrain:100'" \
        --out benchmarks/results/inprocess_<name>.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import parse_overrides
from benchmarks.harness import run_federation
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.errors import FedDMMRError
from feddmmr_flower.experiment import load_data
from feddmmr_flower.provenance import command_line, machine_description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="flwr-style overrides, e.g. \"strategy='fedavg' lr=0.1\"")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides([args.run_config])
    try:
        cfg = ExperimentConfig.from_flat(overrides, strict=True)
        users = load_data(cfg)[0].num_users
    except FedDMMRError as exc:
        print(f"inprocess_federation: error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    random.seed(cfg.seed)  # Flower's node sampling draws from the global random module
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        config = {**cfg.flat(), "output-dir": tmp, "run-name": "floor", "min-available-nodes": 1}
        summary = run_federation(config, users, direct=True)
        history = json.loads((Path(tmp) / "floor" / "history.json").read_text())["rounds"]
    summary.pop("run", None)
    payload = {
        "command": command_line(),
        "machine": machine_description(),
        "config": cfg.flat(),
        "history": history,
        "summary": summary,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
