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


def main() -> int:
    readme = Path("README.md")
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the {START} … {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + render() + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
