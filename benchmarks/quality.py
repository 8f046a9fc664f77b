"""The quality table on ML-100K: every row × 3 seeds, test split under both protocols, mean ± std.

    python -m benchmarks.quality --data-dir ../shared/data/ml-100k --shared ../shared/data \
        [--seeds 42,43,44] [--rows all] [--jobs 2]

Rows (ROWS below): centralized SASRec and FedDMMR ``full``; FedAvg- and FedAdam-SASRec; FedDMMR
``no-proto``, ``no-contrast`` and ``full`` with FedAvg and with FedAdam; each user training alone
(the floor). Every (row, seed) is its own process writing ``benchmarks/results/quality/<row>_seed<S>.json``;
a file already there is kept, so re-running resumes. Then ``quality_ml100k.json`` holds the
mean ± std (sample std over seeds) of every metric, the per-history-length breakdown, the
targets and ``quality_curves.png`` (validation NDCG@10 vs round of the federated rows).

Federated rows run the real ServerApp round loop, strategy and ClientApp (mods and Flower's
message serialisation included) in one process (``benchmarks.harness``): the same code and
outputs as ``flwr run``, without Ray. Model selection uses the validation split only; the test
split is read once, for the selected model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ml100k_features, parse_overrides
from benchmarks.quality_local import run_local_only
from benchmarks.quality_table import quality_targets, summarise_row

RESULTS = Path("benchmarks/results")
PER_RUN = RESULTS / "quality"
OUT_ROOT = Path("outputs/quality")
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")

# name: (kind, label, overrides). Federated rows take the app's defaults (pyproject.toml) plus these.
ROWS: dict[str, tuple[str, str, dict]] = {
    "central-sasrec": (
        "central",
        "centralized SASRec",
        {"variant": "sasrec", "stage-schedule": "pretrain:200", "eval-every": 5, "patience": 6},
    ),
    "central-full": (
        "central",
        "centralized FedDMMR full",
        {"variant": "full", "stage-schedule": "align:5,finetune:60", "eval-every": 5, "patience": 4},
    ),
    "fedavg-sasrec": ("federated", "FedAvg-SASRec", {"variant": "sasrec", "strategy": "fedavg", "client-lr": 2.0}),
    "fedadam-sasrec": ("federated", "FedAdam-SASRec", {"variant": "sasrec", "strategy": "fedadam"}),
    "feddmmr-no-proto": ("federated", "FedDMMR no-proto (FedAdam)", {"variant": "no-proto"}),
    "feddmmr-no-contrast": ("federated", "FedDMMR no-contrast (FedAdam)", {"variant": "no-contrast"}),
    "feddmmr-full-fedavg": (
        "federated",
        "FedDMMR full, FedAvg",
        {"variant": "full", "strategy": "fedavg", "client-lr": 2.0},
    ),
    "feddmmr-full-fedadam": ("federated", "FedDMMR full, FedAdam", {"variant": "full", "strategy": "fedadam"}),
    "local-only": ("local", "local only (each user alone, SASRec)", {"variant": "sasrec"}),
}
# central-full starts from the SASRec checkpoint of the same seed (stages 2-3 over a trained backbone).
DEPENDS = {"central-full": "central-sasrec"}


def data_flags(args) -> dict:
    return {"data-dir": args.data_dir, "cache-dir": args.cache_dir, **ml100k_features(args.shared)}


def result_path(row: str, seed: int) -> Path:
    return PER_RUN / f"{row}_seed{seed}.json"


def relative(text: str, *roots: str) -> str:
    """No machine-specific paths in committed results."""
    for root in sorted({str(Path(r).resolve()) for r in roots}, key=len, reverse=True):
        text = text.replace(root, os.path.relpath(root))
    return text


# ------------------------------------------------------------------ one run
def run_central(row: str, seed: int, args) -> dict:
    _, _, overrides = ROWS[row]
    flags = {**data_flags(args), **overrides, "seed": seed, "output-dir": str(OUT_ROOT), "run-name": f"{row}-s{seed}"}
    if row in DEPENDS:
        flags["init-from"] = str(OUT_ROOT / f"{DEPENDS[row]}-s{seed}" / "best.pt")
    if overrides["variant"] == "sasrec":  # no item features: keep the run free of the feature files
        for key in ("descriptions", "posters-dir", "movies-dat", "visual-features"):
            flags.pop(key)
    command = [sys.executable, "-m", "feddmmr_flower.cli", "train-central", "--threads", "1"]
    for key, value in flags.items():
        if isinstance(value, bool):
            command.append(f"--{key}" if value else f"--no-{key}")
        else:
            command += [f"--{key}", str(value)]
    subprocess.run(command, check=True)
    folder = OUT_ROOT / f"{row}-s{seed}"
    summary = json.loads((folder / "summary.json").read_text())
    history = json.loads((folder / "history.json").read_text())["rounds"]
    curve = [(r["round"], r["valid"]["NDCG@10"]) for r in history if r.get("valid")]
    return {
        "test": {p: summary["test"][p] for p in ("sampled", "full")},
        "by_history_length": summary["test_by_history_length"],
        "best": summary["best_round"],
        "best_unit": "epoch",
        "best_valid_NDCG@10": summary["best_valid_NDCG@10"],
        "wall_time_s": summary["wall_time_s"],
        "curve": curve,
        "central_command": summary["command"],
    }


def run_federated(row: str, seed: int, args) -> dict:
    from benchmarks.harness import run_federation
    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.evaluation import history_buckets
    from feddmmr_flower.experiment import load_data
    from feddmmr_wire import keys

    _, _, overrides = ROWS[row]
    flat = {
        **data_flags(args),
        **overrides,
        "seed": seed,
        "output-dir": str(OUT_ROOT),
        "run-name": f"{row}-s{seed}",
        "min-available-nodes": 1,
    }
    data, _ = load_data(ExperimentConfig.from_flat(flat))
    per_user: list[dict] = []

    def tap(ins, _data, reply) -> None:  # the final test replies, one per user (for the breakdown)
        config = ins.content.config_records.get(keys.CONFIG)
        if config is not None and config.get(keys.SPLIT) == "test" and not reply.has_error():
            per_user.append(dict(reply.content.metric_records[keys.METRICS]))

    summary = run_federation(flat, data.num_users, tap)
    history = json.loads((OUT_ROOT / f"{row}-s{seed}" / "history.json").read_text())["rounds"]
    lengths = np.array([u["train-length"] for u in per_user])
    buckets = {}
    for name, mask in history_buckets(lengths).items():
        chosen = [u for u, keep in zip(per_user, mask) if keep]
        buckets[name] = {
            "num_users": len(chosen),
            "sampled": {m: float(np.mean([u[m] for u in chosen])) for m in METRICS} if chosen else {},
            "full": {m: float(np.mean([u[f"full-{m}"] for u in chosen])) for m in METRICS} if chosen else {},
        }
    curve = [(r["round"], r["valid"]["NDCG@10"]) for r in history if r.get("valid")]
    return {
        "test": summary["test"],
        "by_history_length": buckets,
        "best": summary["best_round"],
        "best_unit": "round",
        "rounds": summary["rounds"],
        "best_valid_NDCG@10": summary["best_valid_NDCG@10"],
        "wall_time_s": summary["wall_time_s"],
        "mean_round_seconds": summary["mean_round_seconds"],
        "curve": curve,
    }


def run_local(row: str, seed: int, args) -> dict:
    """Each user trains its own model on its own sequence; lr and epochs chosen on validation."""
    return run_local_only({**data_flags(args), **ROWS[row][2]}, seed, METRICS)


RUNNERS = {"central": run_central, "federated": run_federated, "local": run_local}


def run_one(row: str, seed: int, args) -> None:
    import torch

    from feddmmr_flower.atomic import atomic_write_json
    from feddmmr_flower.provenance import machine_description

    torch.set_num_threads(1)
    kind, label, overrides = ROWS[row]
    result = RUNNERS[kind](row, seed, args)
    # CPU seconds of this process and its children: single-threaded runs, so this is the run's
    # compute even when other work shared the machine (wall_time_s is not).
    result["cpu_time_s"] = round(
        sum(
            u.ru_utime + u.ru_stime
            for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        ),
        1,
    )
    payload = {
        "row": row,
        "label": label,
        "kind": kind,
        "seed": seed,
        "overrides": overrides,
        "command": f"python -m benchmarks.quality --data-dir {args.data_dir} --shared {args.shared} "
        f"--rows {row} --seeds {seed}" + "".join(f" --set {item}" for item in args.set),
        "machine": machine_description(),
        **result,
    }
    PER_RUN.mkdir(parents=True, exist_ok=True)
    text = relative(json.dumps(payload, indent=2), args.data_dir, args.shared, ".")
    atomic_write_json(result_path(row, seed), json.loads(text))


def configure(args) -> None:
    """--out and --set: where results go, and overrides for every row (smoke tests)."""
    global RESULTS, PER_RUN, OUT_ROOT
    RESULTS = Path(args.out)
    PER_RUN = RESULTS / "quality"
    OUT_ROOT = RESULTS / "runs" if args.out != "benchmarks/results" else Path("outputs/quality")
    extra = parse_overrides(args.set)
    for row, (kind, label, overrides) in ROWS.items():
        ROWS[row] = (kind, label, {**overrides, **extra})


# --------------------------------------------------------------- scheduling
def schedule(tasks: list[tuple[str, int]], args) -> None:
    """Run tasks as child processes, ``--jobs`` at a time, dependencies first."""
    pending, running, started = list(tasks), {}, time.time()
    logs = OUT_ROOT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done = 0
    while pending or running:
        for key, (proc, tick) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                done += 1
                status = (
                    "ok"
                    if proc.returncode == 0
                    else f"FAILED (exit {proc.returncode}, see {logs}/{key[0]}_seed{key[1]}.log)"
                )
                print(
                    f"[quality] {key[0]} seed {key[1]}: {status} in {(time.time() - tick) / 60:.1f} min "
                    f"({done}/{len(tasks)} done, {(time.time() - started) / 60:.0f} min so far)",
                    flush=True,
                )
        ready = [t for t in pending if t[0] not in DEPENDS or result_path(DEPENDS[t[0]], t[1]).is_file()]
        while ready and len(running) < args.jobs:
            row, seed = task = ready.pop(0)
            pending.remove(task)
            command = [
                sys.executable,
                "-m",
                "benchmarks.quality",
                "--one",
                row,
                "--seeds",
                str(seed),
                "--data-dir",
                args.data_dir,
                "--shared",
                args.shared,
                "--cache-dir",
                args.cache_dir,
                "--out",
                args.out,
                *[f"--set={item}" for item in args.set],
            ]
            log = open(logs / f"{row}_seed{seed}.log", "w")  # noqa: SIM115 - closed with the process
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
            running[task] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
            print(f"[quality] started {row} seed {seed}", flush=True)
        if pending and not ready and not running:
            raise SystemExit(f"[quality] cannot run {pending}: a dependency failed")
        time.sleep(2)


# --------------------------------------------------------------- aggregation
def aggregate(seeds: list[int], args) -> dict:
    from feddmmr_flower.atomic import atomic_write_json
    from feddmmr_flower.plots import plot_mean_curves
    from feddmmr_flower.provenance import command_line, machine_description

    rows = {}
    for row, (kind, label, overrides) in ROWS.items():
        files = [result_path(row, s) for s in seeds if result_path(row, s).is_file()]
        if files:
            runs = [json.loads(f.read_text()) for f in files]
            rows[row] = {"label": label, "kind": kind, "overrides": overrides, **summarise_row(runs, files, METRICS)}
    targets, chosen = quality_targets(rows)
    payload = {
        "command": command_line(),
        "machine": machine_description(),
        "seeds": seeds,
        "std": "sample std (ddof=1) over seeds",
        "selected_full_row": chosen,
        "rows": rows,
        "targets": targets,
    }
    text = relative(json.dumps(payload, indent=2), args.data_dir, args.shared, ".")
    atomic_write_json(RESULTS / "quality_ml100k.json", json.loads(text))
    curves = {
        rows[r]["label"]: [(x, m, s) for x, m, s, _ in rows[r]["curve"]] for r in rows if rows[r]["kind"] == "federated"
    }
    if curves:
        plot_mean_curves(
            curves,
            RESULTS / "quality_curves.png",
            ylabel="validation NDCG@10 (150 users, sampled)",
            title="ML-100K federated rows: validation NDCG@10 vs round (mean ± std over "
            f"{max(len(rows[r]['seeds']) for r in rows if rows[r]['kind'] == 'federated')} seeds)",
        )
    return payload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ml-100k")
    parser.add_argument("--shared", default="../shared/data", help="folder with ml-100k-llm/ and ml-1m/")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--rows", default="all", help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one CPU thread)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value in every row (TOML value), e.g. --set stage-schedule='\"pretrain:2\"' "
        "(smoke tests; the results name them)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--aggregate", action="store_true", help="only aggregate the per-run files already there")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this row
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    configure(args)
    if args.one:
        run_one(args.one, seeds[0], args)
        return 0
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    # the cheapest first within a seed; seeds interleaved so that every row gets a first seed early
    tasks = [(row, seed) for seed in seeds for row in rows if not result_path(row, seed).is_file()]
    if not args.aggregate:
        schedule(tasks, args)
    payload = aggregate(seeds, args)
    for target in payload["targets"]:
        print(
            f"[quality] {'met   ' if target['met'] else 'MISSED'} {target['target']} [{target['row']}]: {target['value']:.4f} vs "
            f"{target['bar']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
