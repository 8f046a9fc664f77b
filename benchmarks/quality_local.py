"""The quality table's floor row: every user trains a model of its own on its own sequence alone."""

from __future__ import annotations

import sys
import time

import numpy as np

LOCAL_LRS, LOCAL_EPOCHS = (0.05, 2.0), (1, 3, 10)
#: ML-100K feature flags (``benchmarks.common.ml100k_features``): not used by a SASRec of one user
DATA_FLAGS = ("data-dir", "cache-dir", "descriptions", "visual-features", "posters-dir", "movies-dat")


def run_local_only(flags: dict, seed: int, metric_names: tuple[str, ...]) -> dict:
    """Each user trains its own model on its own sequence; lr and epochs chosen on validation."""
    import torch

    from feddmmr_flower.client import runtime_for
    from feddmmr_flower.config import ExperimentConfig
    from feddmmr_flower.evaluation import history_buckets

    data = {k: v for k, v in flags.items() if k in ("data-dir", "cache-dir")}
    overrides = {k: v for k, v in flags.items() if k not in DATA_FLAGS}
    cfg = ExperimentConfig.from_flat({**data, "text-features": False, **overrides, "seed": seed})
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
        return {m: float(np.mean([r[prefix + m] for r in rows])) for m in metric_names}

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
