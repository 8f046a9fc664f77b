"""Two runs of the same configuration, metric by metric: did a change alter behaviour?

``metrics_of`` flattens a run (its history rounds and its summary's test metrics) into
``{"<round>/train/loss": value, ...}`` without the timings; ``max_differences`` gives, per metric
name, the largest absolute difference over the rounds, and the entries only one run has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Wall-clock figures: they differ between any two runs.
TIMINGS = {"seconds", "client-train-seconds", "total-client-train-seconds"}


def metrics_of(history: list[dict], summary: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in history:
        prefix = f"{record['round']}/"
        out[prefix + "stage"] = record["stage"]
        out[prefix + "trainable_arrays"] = record.get("trainable_arrays")
        for part in ("train", "valid"):
            for key, value in (record.get(part) or {}).items():
                if key not in TIMINGS:
                    out[f"{prefix}{part}/{key}"] = value
    for protocol in ("sampled", "full"):
        for key, value in summary["test"].get(protocol, {}).items():
            out[f"test/{protocol}/{key}"] = value
    out["best_round"] = summary.get("best_round")
    return out


def read_run(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    history = json.loads((folder / "history.json").read_text())["rounds"]
    return metrics_of(history, json.loads((folder / "summary.json").read_text()))


def max_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """({metric name without the round: max |before - after|}, keys only one side has)."""
    diffs: dict[str, float] = {}
    for key in sorted(set(before) & set(after)):
        name = key.split("/", 1)[1] if key[0].isdigit() else key
        a, b = before[key], after[key]
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            diffs[name] = max(diffs.get(name, 0.0), abs(float(a) - float(b)))
        elif a != b:
            diffs[name] = float("inf")
    return diffs, sorted(set(before) ^ set(after))
