"""What a round costs in a real Flower deployment, and how much of it is ours.

One SuperLink + N SuperNodes as separate processes (network namespaces when run as root, else
loopback; TLS and SuperNode authentication on, as docker-compose.yml deploys them; the harness
is tests/deployment_lab.py). On the same deployment, R rounds of:

* a no-op app (benchmarks/noop_app: the ClientApp replies at once): Flower's own floor, with no
  payload and with ~1 MB echoed as 48 arrays or as 1 (Flower moves each array as an object);
* FedDMMR (variant full, text features, one train message per node per round, no validation; the
  model packed into one array on the wire, feddmmr_wire/packing.py);

plus a Ray simulation of the same FedDMMR run for comparison, and the import cost of a fresh
ClientApp process (Flower alone vs ours), since a deployed SuperNode starts one per message.
Round 1 includes start-up and the last round also validates: means are over train-only rounds
after round 1. Users are ML-100K's first N (top-users).

    python -m benchmarks.deployment_overhead --data-dir ../shared/data/ml-100k \
        --descriptions ../shared/data/ml-100k-llm/item_descriptions.json --out benchmarks/results/deployment_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_deployment_size
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.experiment import load_assets
from feddmmr_flower.provenance import command_line, machine_description
from tests.deployment_lab import Deployment
from tests.flwr_utils import BIN, copy_app, flwr_run, run_config_arg
from tests.netlab import NetLab, namespaces_available

REPO = Path(__file__).resolve().parents[1]


def say(text: str) -> None:
    print(f"[deployment-overhead] {text}", file=sys.stderr, flush=True)


def import_seconds(statement: str, repeats: int = 3) -> float:
    """Median wall time of ``statement`` in a fresh interpreter (what a new ClientApp process pays)."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for _ in range(repeats)
    ]
    return round(statistics.median(runs), 3)


def steady(seconds: list[float]) -> float:
    """Mean round time without round 1 (start-up)."""
    return round(statistics.mean(seconds[1:] if len(seconds) > 1 else seconds), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="ML-100K folder (u.data, u.item)")
    parser.add_argument("--descriptions", default="", help="item descriptions JSON for the text features")
    parser.add_argument("--cache-dir", default=str(REPO / "data" / "cache"))
    args = parse_deployment_size(parser, 5, str(REPO / "benchmarks" / "results" / "deployment_overhead.json"))

    root = Path(tempfile.mkdtemp(prefix="feddmmr-deploy-bench-"))
    config = {
        "data-dir": str(Path(args.data_dir).resolve()),
        "cache-dir": str(Path(args.cache_dir).resolve()),
        "descriptions": str(Path(args.descriptions).resolve()) if args.descriptions else "",
        "top-users": args.nodes,
        "stage-schedule": f"pretrain:{args.rounds}",
        "fraction-train": 1.0,
        "eval-every": 10 * args.rounds,
        "eval-users": args.nodes,
        "min-available-nodes": args.nodes,
        "output-dir": str(root / "outputs"),
    }
    load_assets(ExperimentConfig.from_flat(config))  # prepared data + SBERT features, once, then copied
    for i in range(args.nodes):  # node-local disks
        shutil.copytree(config["data-dir"], root / f"node{i}" / "data")
        shutil.copytree(config["cache-dir"], root / f"node{i}" / "cache")
    app = copy_app(root / "app")
    noop = root / "noop"
    shutil.copytree(REPO / "benchmarks" / "noop_app", noop, ignore=shutil.ignore_patterns("__pycache__"))

    say("fresh-process imports")
    imports = {
        "flwr_clientapp_s": import_seconds("import flwr.clientapp, flwr.app"),
        "feddmmr_clientapp_s": import_seconds("import client_app.app"),
        "torch_s": import_seconds("import torch"),
        "removed_from_client_path": {
            "pandas_s": import_seconds("import pandas"),
            "sklearn_cluster_s": import_seconds("import sklearn.cluster"),
        },
    }

    say(f"Ray simulation, {args.nodes} nodes, {args.rounds} rounds")
    sim = flwr_run(
        app,
        root / "sim-home",
        {**config, "run-name": "simulation"},
        f"num-supernodes={args.nodes} client-resources-num-cpus=1",
        timeout=900,
    )
    if sim.returncode != 0:
        raise SystemExit(sim.stdout[-2000:] + sim.stderr[-2000:])
    sim_history = json.loads((root / "outputs" / "simulation" / "history.json").read_text())["rounds"]

    lab = NetLab(use_namespaces=namespaces_available())
    deployment = Deployment(root, lab, args.nodes)
    try:
        deployment.start_all()
        say(f"deployment up ({'network namespaces' if lab.use_namespaces else 'loopback'}); no-op app")
        run = [str(BIN / "flwr"), "run", ".", "deployment", "--stream", "--run-config"]
        noop_runs = {}
        # No payload; then ~1 MB echoed both ways as 48 arrays (a model sent tensor by tensor) and as 1.
        for label, arrays, floats in (("empty", 0, 0), ("48_arrays", 48, 5000), ("1_array", 1, 240000)):
            output = root / f"noop-{label}.json"
            done = deployment.cli_run(
                run
                + [
                    run_config_arg(
                        {
                            "rounds": args.rounds,
                            "min-nodes": args.nodes,
                            "output": str(output),
                            "payload-arrays": arrays,
                            "payload-floats": floats,
                        }
                    )
                ],
                cwd=noop,
                timeout=900,
            )
            if done.returncode != 0:
                raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
            noop_runs[label] = json.loads(output.read_text())["round_seconds"]
            say(f"no-op {label}: {steady(noop_runs[label])} s/round")
        noop_seconds = noop_runs["empty"]
        say("FedDMMR")
        started = time.time()
        done = deployment.cli_run(run + [run_config_arg({**config, "run-name": "deployed"})], cwd=app, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
        ours_wall = time.time() - started
    finally:
        deployment.close()
        lab.close()
    history = json.loads((root / "outputs" / "deployed" / "history.json").read_text())["rounds"]
    # The last round also validates (a second message per node): compare train-only rounds.
    ours = [r["seconds"] for r in history if not r["valid_requested"]]
    sim_train_only = [r["seconds"] for r in sim_history if not r["valid_requested"]]
    train = [r["train"].get("client-train-seconds", 0.0) for r in history]  # mean over the round's clients
    result = {
        "command": command_line(),
        "machine": machine_description(),
        "network": "network namespaces + veth + bridge" if lab.use_namespaces else "loopback",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "tls": True,
        "supernode_auth": True,
        "dataset": f"ML-100K, users 0..{args.nodes - 1}",
        "config": config,
        "round_seconds": {
            **{f"noop_deployment_{k}": [round(s, 2) for s in v] for k, v in noop_runs.items()},
            "feddmmr_deployment": [r["seconds"] for r in history],
            "feddmmr_simulation": [r["seconds"] for r in sim_history],
            "validation_rounds": [r["round"] for r in history if r["valid_requested"]],
        },
        "mean_round_seconds_after_round_1": {
            **{f"noop_deployment_{k}": steady(v) for k, v in noop_runs.items()},
            "noop_deployment": steady(noop_seconds),
            "feddmmr_deployment": steady(ours),
            "feddmmr_simulation": steady(sim_train_only),
        },
        "feddmmr_client_train_seconds_mean": round(statistics.mean(train[1:]), 3),
        "feddmmr_deployment_wall_s": round(ours_wall, 1),
        "fresh_process_imports": imports,
    }
    means = result["mean_round_seconds_after_round_1"]
    result["ours_per_round_s"] = round(means["feddmmr_deployment"] - means["noop_deployment"], 2)
    # Paths as a reader of the repository sees them (relative to the checkout), not this machine's.
    text = json.dumps(result).replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")
    atomic_write_json(Path(args.out), json.loads(text))
    shutil.rmtree(root, ignore_errors=True)
    say(
        f"no-op {means['noop_deployment']} s/round, FedDMMR {means['feddmmr_deployment']} s/round "
        f"(simulation {means['feddmmr_simulation']}); ours {result['ours_per_round_s']} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
