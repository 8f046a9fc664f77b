"""The quality table's arithmetic: a row's mean ± std over seeds, and the targets it is judged by."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def mean_std(values: list[float]) -> dict:
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
    return mean_std(values) if values else None


def summarise_row(runs: list[dict], files: list[Path], metrics: tuple[str, ...]) -> dict:
    """One row of the table from its per-seed result files."""
    entry: dict = {"seeds": [r["seed"] for r in runs], "files": [str(f) for f in files]}
    for protocol in ("sampled", "full"):
        entry[protocol] = {m: mean_std([r["test"][protocol][m] for r in runs]) for m in metrics}
    entry["best"] = mean_std([r["best"] for r in runs])
    entry["best_unit"] = runs[0]["best_unit"]
    entry["wall_time_s"] = mean_std([r["wall_time_s"] for r in runs])
    entry["cpu_time_s"] = mean_std([r["cpu_time_s"] for r in runs])
    entry["by_history_length"] = {
        name: {
            "num_users": runs[0]["by_history_length"][name]["num_users"],
            **{p: {m: _bucket_stat(runs, name, p, m) for m in ("NDCG@10", "HR@10")} for p in ("sampled", "full")},
        }
        for name in runs[0]["by_history_length"]
    }
    rounds = sorted({x for r in runs for x, _ in r["curve"]})
    entry["curve"] = [
        (x, *mean_std([dict(r["curve"])[x] for r in runs if x in dict(r["curve"])]).values()) for x in rounds
    ]
    return entry


def _target(name: str, row: str, chosen: str, value: float, bar: float) -> dict:
    return {
        "target": name,
        "row": row,
        "selected": row == chosen,
        "value": value,
        "bar": round(bar, 5),
        "met": value >= bar,
    }


def quality_targets(rows: dict) -> tuple[list[dict], str | None]:
    """Both FedDMMR full rows against the bars (FedAvg: the same aggregation as FedAvg-SASRec, so the
    model's own gain); the one with the higher mean *validation* NDCG@10 is marked selected."""
    fed_full = [r for r in ("feddmmr-full-fedavg", "feddmmr-full-fedadam") if r in rows]
    if not fed_full:
        return [], None
    chosen = max(
        fed_full,
        key=lambda r: np.mean([json.loads(Path(f).read_text())["best_valid_NDCG@10"] for f in rows[r]["files"]]),
    )

    def ndcg(row: str, protocol: str) -> float:
        return rows[row][protocol]["NDCG@10"]["mean"]

    targets = []
    for row in fed_full:
        for protocol in ("sampled", "full"):
            if "central-sasrec" in rows:
                name = f"federated FedDMMR full ≥ centralized SASRec (test NDCG@10, {protocol})"
                targets.append(_target(name, row, chosen, ndcg(row, protocol), ndcg("central-sasrec", protocol)))
            if "fedavg-sasrec" in rows:
                name = f"FedDMMR full ≥ FedAvg-SASRec + 3% (test NDCG@10, {protocol})"
                targets.append(_target(name, row, chosen, ndcg(row, protocol), ndcg("fedavg-sasrec", protocol) * 1.03))
    return targets, chosen
