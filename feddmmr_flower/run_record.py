"""The record a run leaves behind, one shape for federated and central runs.

A run folder holds ``config.json`` (what ran), ``history.json`` (one record per federated round or
central epoch) and ``summary.json`` (the selected model's test metrics, times), written here only,
so ``feddmmr report``, the plots and the benchmarks read one shape with one set of metric names.
A history record is ``{"round", "stage", "seconds", "train": {...}, "valid": {...}, ...}`` (central
epochs count as rounds; ``config.json``'s ``kind`` says which); ``train`` holds the loss parts and the
per-user memory figures (``memory-size``, ``memory-writes``, ...), ``valid`` the validation metrics
(empty when the round was not evaluated).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json

KINDS = ("federated", "central")

# --------------------------------------------------- metric names of a federated round's "train" part
NUM_ACCEPTED = "num-accepted"
NUM_REJECTED = "num-rejected"
NUM_FAILED = "num-failed"
NUM_SKIPPED = "num-skipped"  # sampled nodes that said they have nothing to train
NUM_LEFT_OUT = "num-left-out"  # connected nodes not sampled: they said so in an earlier round
NUM_REPLIES = "num-replies"
NUM_PROTOTYPES = "num-prototypes"
STAGE_INDEX = "stage-index"
CLIENT_TRAIN_SECONDS = "client-train-seconds"  # one client's training call (a client metric)
TOTAL_CLIENT_TRAIN_SECONDS = "total-client-train-seconds"
UPDATE_NORM_MEDIAN = "update-norm-median"
FULL_PREFIX = "full-"  # full-ranking metrics next to the sampled ones in one flat record


def rounded(metrics: Mapping[str, Any] | None, digits: int = 6) -> dict[str, Any]:
    """A metrics mapping for JSON: floats rounded, {} for none."""
    if metrics is None:
        return {}
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in metrics.items()}


def round_record(
    number: int, stage: str, seconds: float, train: Mapping[str, Any], valid: Mapping[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    """One history record (``extra``: what only one kind of run knows, e.g. rejected nodes)."""
    return {
        "round": number,
        "stage": stage,
        "seconds": round(seconds, 3),
        "train": rounded(train),
        "valid": rounded(valid),
        **extra,
    }


def split_protocols(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"sampled": HR/NDCG/MRR, "full": the same without FULL_PREFIX} from one flat metrics record."""
    sampled = {k: v for k, v in flat.items() if k.split("@")[0] in ("HR", "NDCG") or k == "MRR"}
    full = {k[len(FULL_PREFIX) :]: v for k, v in flat.items() if k.startswith(FULL_PREFIX)}
    return {"sampled": sampled, "full": full}


class RunRecorder:
    """Writes a run folder's config.json, history.json and summary.json (each atomically)."""

    def __init__(self, folder: str | Path, kind: str, history: list[dict] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"run kind must be one of {KINDS}, got {kind!r}")
        self.folder, self.kind = Path(folder), kind
        self.history: list[dict] = list(history or [])

    def write_config(self, experiment: Mapping[str, Any], **facts: Any) -> None:
        atomic_write_json(self.folder / "config.json", {"kind": self.kind, "experiment": dict(experiment), **facts})

    def add(self, record: dict[str, Any]) -> None:
        """Append one round's record and rewrite history.json (a run read while it goes is whole)."""
        self.history.append(record)
        atomic_write_json(self.folder / "history.json", {"kind": self.kind, "rounds": self.history})

    def write_summary(
        self,
        *,
        wall_time_s: float,
        best_round: int | None,
        best_valid: Mapping[str, Any] | None,
        test: Mapping[str, Any],
        num_users: int | None,
        **extra: Any,
    ) -> dict[str, Any]:
        """summary.json: the selected model (``best_round``) and its test metrics under both protocols."""
        seconds = [r["seconds"] for r in self.history]
        stage = next((r["stage"] for r in self.history if r["round"] == best_round), None)
        summary = {
            "kind": self.kind,
            "run": str(self.folder),
            "rounds": len(self.history),
            "wall_time_s": round(wall_time_s, 1),
            "best_round": best_round,
            "best_stage": stage,
            "best_valid_NDCG@10": None if not best_valid else best_valid.get("NDCG@10"),
            "best_valid": rounded(best_valid),
            "test": {**{p: rounded(m) for p, m in test.items()}, "num_users": num_users},
            "mean_round_seconds": round(float(np.mean(seconds)), 3) if seconds else None,
            **extra,
        }
        atomic_write_json(self.folder / "summary.json", summary)
        return summary
