"""Render the README's results section from ``benchmarks/results/*.json`` (never typed by hand).

    python benchmarks/render_readme.py            # rewrites the block between the markers in README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = Path("benchmarks/results")


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _central_label(path: Path) -> str:
    """central_full_lr2e-4_ml100k.json -> 'full, finetune lr 2e-4'."""
    tag = path.stem[len("central_"):].removesuffix("_ml100k")
    variant, _, extra = tag.partition("_")
    return variant + (f", finetune {extra.replace('lr', 'lr ')}" if extra else "")


def quality_rows() -> list[str]:
    rows = []
    for path in sorted(RESULTS.glob("central_*.json")) + sorted(RESULTS.glob("federated_*.json")):
        data = json.loads(path.read_text())
        test = data.get("test", {})
        sampled, full = test.get("sampled", {}), test.get("full", {})
        if path.name.startswith("central_"):
            setting = "central, " + _central_label(path)
            best = f"epoch {data.get('best_epoch')} ({data.get('best_stage')})"
        else:
            exp = data["config"]["experiment"]
            setting = f"federated {exp['strategy']}, {exp['variant']}"
            best = f"round {data.get('best_round')} of {data.get('rounds')}"
        wall = data.get("wall_time_s")
        rows.append(f"| {setting} | {_fmt(sampled.get('HR@10'))} | {_fmt(sampled.get('NDCG@10'))} | "
                    f"{_fmt(sampled.get('MRR'))} | {_fmt(full.get('HR@10'))} | {_fmt(full.get('NDCG@10'))} | "
                    f"{best} | {_fmt(wall / 60 if wall else None, 1)} | `{path.name}` |")
    return rows


def bucket_rows() -> list[str]:
    rows = []
    for path in sorted(RESULTS.glob("central_*.json")):
        data = json.loads(path.read_text())
        buckets = data.get("test_by_history_length", {})
        variant = _central_label(path)
        cells = [f"{_fmt(b['sampled']['NDCG@10'])} / {_fmt(b['full']['NDCG@10'])} (n={b['num_users']})"
                 for b in buckets.values()]
        if cells:
            rows.append(f"| central {variant} | " + " | ".join(cells) + " |")
    return rows


def federated_speed_rows(parallel: int = 2) -> list[str]:
    """Mean round time and the share of it outside client training (clients run ``parallel`` at a time)."""
    rows = []
    for path in sorted(RESULTS.glob("federated_*.json")):
        data = json.loads(path.read_text())
        round_s, client_s = data.get("mean_round_seconds"), data.get("mean_client_train_seconds_per_round")
        if not round_s or client_s is None:
            continue
        outside = 1.0 - min(1.0, client_s / parallel / round_s)
        exp = data["config"]["experiment"]
        rows.append(f"| {exp['strategy']}, {exp['variant']} | {data.get('rounds')} | {round_s:.2f} | "
                    f"{client_s / parallel:.2f} | {outside:.0%} |")
    return rows


def throughput_rows() -> list[str]:
    path = RESULTS / "throughput_ml100k.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    c, p = data["central"], data["per_client"]
    return [
        f"| central (batch {c['sasrec']['batch_size']}) | {c['sasrec']['sequences_per_s']} | "
        f"{c['full']['sequences_per_s']} | {data['central_ratio_sasrec_over_full']}× |",
        f"| one federated client | {p['sasrec']['sequences_per_s']} | {p['full']['sequences_per_s']} | "
        f"{data['per_client_ratio_sasrec_over_full']}× |",
    ]


def render() -> str:
    lines = [START, "", "Test split, sampled protocol (1 positive + 100 negatives) and full ranking; the model of",
             "each row was selected on the validation split.", "",
             "| setting | HR@10 | NDCG@10 | MRR | full HR@10 | full NDCG@10 | selected | minutes | file |",
             "|---|---|---|---|---|---|---|---|---|", *quality_rows()]
    buckets = bucket_rows()
    if buckets:
        lines += ["", "Test NDCG@10 (sampled / full) by training-history length:", "",
                  "| model | ≤ 50 items | 51–150 | > 150 |", "|---|---|---|---|", *buckets]
    fed = federated_speed_rows()
    if fed:
        lines += ["", "Federated round time (Ray simulation, 94 clients per round, 2 ClientApps at a time; "
                  "client time = summed client training seconds / 2):", "",
                  "| run | rounds | s / round | client training s / round | outside client training |",
                  "|---|---|---|---|---|", *fed]
    speed = throughput_rows()
    if speed:
        lines += ["", "Training throughput, user sequences per second (2 CPU cores):", "",
                  "| where | SASRec | FedDMMR full | ratio |", "|---|---|---|---|", *speed]
    lines += ["", END]
    return "\n".join(lines)


DEPLOY_START, DEPLOY_END = "<!-- deployment:start -->", "<!-- deployment:end -->"


def render_deployment() -> str:
    """The measured cost of a deployed round (benchmarks/deployment_overhead.py), before and after."""
    path = RESULTS / "deployment_overhead.json"
    if not path.is_file():
        return f"{DEPLOY_START}\n{DEPLOY_END}"
    data = json.loads(path.read_text())
    means, imports = data["mean_round_seconds_after_round_1"], data["fresh_process_imports"]
    before_path = RESULTS / "deployment_overhead_before.json"
    before = json.loads(before_path.read_text())["mean_round_seconds_after_round_1"] if before_path.is_file() else {}
    rows = [
        ("no-op ClientApp, empty messages", means.get("noop_deployment_empty", means["noop_deployment"]), None),
        ("no-op ClientApp, ~1 MB echoed as 48 arrays", means.get("noop_deployment_48_arrays"), None),
        ("no-op ClientApp, ~1 MB echoed as 1 array", means.get("noop_deployment_1_array"), None),
        ("FedDMMR (full, text features), deployment", means["feddmmr_deployment"], before.get("feddmmr_deployment")),
        ("FedDMMR, the same run in the Ray simulation", means["feddmmr_simulation"], before.get("feddmmr_simulation")),
    ]
    lines = [DEPLOY_START, "",
             f"**Measured** (`{path.name}`: {data['nodes']} SuperNodes of ML-100K users, {data['network']}, TLS + "
             f"authentication, {data['rounds']} rounds, mean of the rounds after round 1 that send one train message "
             "per node (no validation); this 2-core machine, so the nodes share two cores, with other benchmarks "
             "running beside them):", "",
             "| seconds per round | now | before |", "|---|---|---|"]
    for label, now, then in rows:
        if now is not None:
            lines.append(f"| {label} | {now:.2f} | {_fmt(then, 2)} |")
    lines += ["",
              f"Our share of a deployed round is {data['ours_per_round_s']:.1f} s over the no-op floor. A SuperNode "
              f"starts a fresh ClientApp process per message: importing Flower takes {imports['flwr_clientapp_s']:.2f} s, "
              f"our ClientApp {imports['feddmmr_clientapp_s']:.2f} s (mostly torch); the "
              f"mean client training call {data['feddmmr_client_train_seconds_mean']:.2f} s. Cut so far: the model "
              "travels packed into one array (Flower 1.41 moves every array as an object of its own), the client's "
              "SGD no longer builds a `torch.optim` optimizer (that imports `torch._dynamo`, about 2 s per process), "
              "and pandas (" + f"{imports['removed_from_client_path']['pandas_s']:.2f} s) and scikit-learn "
              f"({imports['removed_from_client_path']['sklearn_cluster_s']:.2f} s) are off the client's import path. "
              "A simulation keeps its ClientApp processes alive, which is why it is so much faster per round.",
              "", DEPLOY_END]
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} … {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def main() -> int:
    readme = Path("README.md")
    text = _replace(readme.read_text(), START, END, render())
    readme.write_text(_replace(text, DEPLOY_START, DEPLOY_END, render_deployment()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
