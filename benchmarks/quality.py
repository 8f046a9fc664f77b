"""The quality table on ML-100K: every row × 3 seeds, test split under both protocols, mean ± std.

    python benchmarks/quality.py --data-dir ../shared/data/ml-100k --shared ../shared/data \
        [--seeds 42,43,44] [--rows all] [--jobs 2]

Rows (ROWS below): centralized SASRec and FedDMMR ``full``; FedAvg- and FedAdam-SASRec; FedDMMR
``no-proto``, ``no-contrast`` and ``full`` with FedAvg and with FedAdam; each user training alone
(the floor). Every (row, seed) is its own process writing ``benchmarks/results/quality/<row>_seed<S>.json``;
a file already there is kept, so re-running resumes. Then ``quality_ml100k.json`` holds the
mean ± std (sample std over seeds) of every metric, the per-history-length breakdown, the
targets and ``quality_curves.png`` (validation NDCG@10 vs round of the federated rows).

Federated rows run the real ServerApp round loop, strategy and ClientApp (mods and Flower's
message serialisation included) in one process (``server_app/inprocess.py``): the same code and
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import app_defaults, ml100k_features, parse_overrides  # noqa: E402

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
LOCAL_LRS, LOCAL_EPOCHS = (0.05, 2.0), (1, 3, 10)


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
    raw = OUT_ROOT / f"{row}-s{seed}.central.json"
    subprocess.run(command + ["--results-json", str(raw)], check=True)
    payload = json.loads(raw.read_text())
    curve = [(r["epoch"], r["valid"]["NDCG@10"]) for r in payload["history"] if r.get("valid")]
    return {
        "test": payload["test"],
        "by_history_length": payload["test_by_history_length"],
        "best": payload["best_epoch"],
        "best_unit": "epoch",
        "best_valid_NDCG@10": payload["best_valid"]["NDCG@10"],
        "wall_time_s": payload["wall_time_s"],
        "curve": curve,
        "central_command": payload["command"],
    }


def run_federated(row: str, seed: int, args) -> dict:
    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.evaluation import history_buckets
    from feddmmr_flower.experiment import load_data
    from server_app.inprocess import run_federation

    _, _, overrides = ROWS[row]
    flat = {
        **app_defaults(),
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
        config = ins.content.config_records.get("config")
        if config is not None and config.get("split") == "test" and not reply.has_error():
            per_user.append(dict(reply.content.metric_records["metrics"]))

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
    import torch

    from feddmmr_flower.client import runtime_for
    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.evaluation import history_buckets

    _, _, overrides = ROWS[row]
    cfg = ExperimentConfig.from_flat(
        {
            **{k: v for k, v in data_flags(args).items() if k in ("data-dir", "cache-dir")},
            "text-features": False,
            **overrides,
            "seed": seed,
        }
    )
    torch.manual_seed(seed)
    runtime = runtime_for(cfg)
    initial = {k: v.detach().numpy().copy() for k, v in runtime.model.state_dict().items()}
    started, users = time.perf_counter(), runtime.num_users
    # results[(lr, epochs)][split] = per-user metric dicts
    results: dict[tuple, dict[str, list]] = {
        (lr, e): {"valid": [], "test": []} for lr in LOCAL_LRS for e in LOCAL_EPOCHS
    }
    for user in range(users):
        for lr in LOCAL_LRS:
            arrays = dict(initial)
            for epoch in range(1, max(LOCAL_EPOCHS) + 1):
                arrays.update(
                    runtime.train(
                        user, arrays, None, None, stage="pretrain", lr=lr, local_epochs=1, server_round=epoch
                    ).arrays
                )
                if epoch in LOCAL_EPOCHS:
                    for split in ("valid", "test"):
                        metrics = runtime.evaluate(user, arrays, None, None, split=split).metrics
                        results[(lr, epoch)][split].append(metrics)
        if user % 100 == 99:
            print(
                f"[local-only] {user + 1}/{users} users, {time.perf_counter() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def mean(rows: list[dict], prefix: str = "") -> dict:
        return {m: float(np.mean([r[prefix + m] for r in rows])) for m in METRICS}

    selection = {f"lr={lr},epochs={e}": mean(v["valid"])["NDCG@10"] for (lr, e), v in results.items()}
    best = max(results, key=lambda key: mean(results[key]["valid"])["NDCG@10"])
    test_rows = results[best]["test"]
    buckets = {
        name: {
            "num_users": int(mask.sum()),
            "sampled": mean([r for r, k in zip(test_rows, mask) if k]),
            "full": mean([r for r, k in zip(test_rows, mask) if k], "full-"),
        }
        for name, mask in history_buckets(runtime.assets.data.train_lengths(np.arange(users))).items()
    }
    return {
        "test": {"sampled": mean(test_rows), "full": mean(test_rows, "full-"), "num_users": users},
        "by_history_length": buckets,
        "best": best[1],
        "best_unit": "local epochs",
        "best_valid_NDCG@10": selection[f"lr={best[0]},epochs={best[1]}"],
        "selected": {"lr": best[0], "epochs": best[1]},
        "validation_grid": selection,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "curve": [],
    }


RUNNERS = {"central": run_central, "federated": run_federated, "local": run_local}


def run_one(row: str, seed: int, args) -> None:
    import torch

    from feddmmr_flower.data.sequences import atomic_write_json
    from feddmmr_flower.train import machine_description

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
        "command": f"python benchmarks/quality.py --data-dir {args.data_dir} --shared {args.shared} "
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
                __file__,
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
def _mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    return {
        "mean": round(float(array.mean()), 5),
        "std": round(float(array.std(ddof=1)) if len(array) > 1 else 0.0, 5),
        "n": len(array),
    }


def _bucket_stat(runs: list[dict], bucket: str, protocol: str, metric: str) -> dict | None:
    """Mean ± std over seeds of one bucket's metric (None for a bucket without users)."""
    values = [
        r["by_history_length"][bucket][protocol].get(metric)
        for r in runs
        if r["by_history_length"][bucket]["num_users"]
    ]
    values = [v for v in values if v is not None and v == v]
    return _mean_std(values) if values else None


def aggregate(seeds: list[int], args) -> dict:
    from feddmmr_flower.data.sequences import atomic_write_json
    from feddmmr_flower.plots import plot_mean_curves
    from feddmmr_flower.train import machine_description

    rows = {}
    for row, (kind, label, overrides) in ROWS.items():
        runs = [json.loads(result_path(row, s).read_text()) for s in seeds if result_path(row, s).is_file()]
        if not runs:
            continue
        entry = {
            "label": label,
            "kind": kind,
            "overrides": overrides,
            "seeds": [r["seed"] for r in runs],
            "files": [str(result_path(row, r["seed"])) for r in runs],
        }
        for protocol in ("sampled", "full"):
            entry[protocol] = {m: _mean_std([r["test"][protocol][m] for r in runs]) for m in METRICS}
        entry["best"] = _mean_std([r["best"] for r in runs])
        entry["best_unit"] = runs[0]["best_unit"]
        entry["wall_time_s"] = _mean_std([r["wall_time_s"] for r in runs])
        entry["cpu_time_s"] = _mean_std([r["cpu_time_s"] for r in runs])
        entry["by_history_length"] = {
            name: {
                "num_users": runs[0]["by_history_length"][name]["num_users"],
                **{p: {m: _bucket_stat(runs, name, p, m) for m in ("NDCG@10", "HR@10")} for p in ("sampled", "full")},
            }
            for name in runs[0]["by_history_length"]
        }
        rounds = sorted({x for r in runs for x, _ in r["curve"]})
        entry["curve"] = [
            (x, *_mean_std([dict(r["curve"])[x] for r in runs if x in dict(r["curve"])]).values()) for x in rounds
        ]
        rows[row] = entry
    targets = []

    def ndcg(row: str, protocol: str = "sampled") -> float | None:
        return rows[row][protocol]["NDCG@10"]["mean"] if row in rows else None

    # "full with the best strategy": the one with the higher mean validation NDCG@10 (never the test split)
    fed_full = [r for r in ("feddmmr-full-fedavg", "feddmmr-full-fedadam") if r in rows]
    if fed_full:
        chosen = max(
            fed_full,
            key=lambda r: np.mean([json.loads(Path(f).read_text())["best_valid_NDCG@10"] for f in rows[r]["files"]]),
        )
        # both FedDMMR full rows are judged (FedAvg: same aggregation as FedAvg-SASRec, so the model's own
        # gain), and the one selected on validation is marked
        for row in fed_full:
            for protocol in ("sampled", "full"):
                if "central-sasrec" in rows:
                    value, bar = ndcg(row, protocol), ndcg("central-sasrec", protocol)
                    targets.append(
                        {
                            "target": f"federated FedDMMR full ≥ centralized SASRec (test NDCG@10, {protocol})",
                            "row": row,
                            "selected": row == chosen,
                            "value": value,
                            "bar": bar,
                            "met": value >= bar,
                        }
                    )
                if "fedavg-sasrec" in rows:
                    value, bar = ndcg(row, protocol), ndcg("fedavg-sasrec", protocol) * 1.03
                    targets.append(
                        {
                            "target": f"FedDMMR full ≥ FedAvg-SASRec + 3% (test NDCG@10, {protocol})",
                            "row": row,
                            "selected": row == chosen,
                            "value": value,
                            "bar": round(bar, 5),
                            "met": value >= bar,
                        }
                    )
    payload = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_description(),
        "seeds": seeds,
        "std": "sample std (ddof=1) over seeds",
        "selected_full_row": fed_full and chosen,
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
