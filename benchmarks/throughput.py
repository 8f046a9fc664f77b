"""Training throughput (user sequences / s) of SASRec vs FedDMMR, centrally and per federated client.

Central: ``train_epoch`` over batches of 128 ML-100K users (SASRec: the pretrain stage of the
``sasrec`` variant; FedDMMR: the finetune stage of ``full`` with a filled memory and prototypes).
Per client: ``ClientRuntime.train`` for one user, as a ClientApp runs it (K-Means prototypes
included). Median of repeated timings after a warm-up, same process, same threads.

    python -m benchmarks.throughput --data-dir DATA --shared SHARED --out benchmarks/results/throughput_ml100k.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ml100k_features
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.client import runtime_for
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.experiment import build_model, load_assets, memory_config, prototype_config, train_config
from feddmmr_flower.local_training import train_epoch
from feddmmr_flower.memory import LocalDynamicMemory
from feddmmr_flower.prototypes import central_prototypes
from feddmmr_flower.provenance import command_line, machine_description
from feddmmr_flower.stages import apply_stage


def config(args, variant: str) -> ExperimentConfig:
    return ExperimentConfig.from_flat(
        {"data-dir": args.data_dir, "cache-dir": args.cache_dir, "variant": variant, **ml100k_features(args.shared)}
    )


def central(cfg: ExperimentConfig, stage: str, batches: int, repeats: int) -> dict:
    assets = load_assets(cfg)
    model = build_model(cfg, assets)
    tcfg = train_config(cfg)
    data = assets.data
    memory = LocalDynamicMemory(data.num_users, memory_config(cfg)) if cfg.variant != "sasrec" else None
    users = np.arange(data.num_users)
    generator = torch.Generator().manual_seed(0)
    warm = torch.optim.Adam(apply_stage(model, "pretrain"), lr=tcfg.lr)
    train_epoch(model, data, users, users, warm, tcfg, "pretrain", memory, None, generator)  # fills memories
    prototypes = central_prototypes(model, memory, prototype_config(cfg)) if memory is not None else None
    optimizer = torch.optim.Adam(apply_stage(model, stage), lr=tcfg.lr)
    chunk = users[: batches * tcfg.batch_size]
    rates = []
    for _ in range(repeats):
        tick = time.perf_counter()
        train_epoch(model, data, chunk, chunk, optimizer, tcfg, stage, memory, prototypes, generator)
        rates.append(len(chunk) / (time.perf_counter() - tick))
    return {
        "stage": stage,
        "batch_size": tcfg.batch_size,
        "sequences_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def per_client(cfg: ExperimentConfig, stage: str, clients: int) -> dict:
    runtime = runtime_for(cfg)
    arrays = {k: v.numpy().copy() for k, v in runtime.model.state_dict().items()}
    times, memory = [], None
    for user in range(clients + 2):
        outcome = runtime.train(user, arrays, None, memory, stage=stage, lr=0.05, local_epochs=1, server_round=1)
        if user >= 2:  # warm-up
            times.append(outcome.metrics["client-train-seconds"])
    return {
        "stage": stage,
        "sequences_per_s": round(1.0 / statistics.median(times), 1),
        "median_ms": round(1000 * statistics.median(times), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ml-100k")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/throughput_ml100k.json")
    args = parser.parse_args()
    sasrec, full = config(args, "sasrec"), config(args, "full")
    result = {
        "command": command_line(),
        "machine": machine_description(),
        "central": {
            "sasrec": central(sasrec, "pretrain", args.batches, args.repeats),
            "full": central(full, "finetune", args.batches, args.repeats),
        },
        "per_client": {
            "sasrec": per_client(sasrec, "pretrain", args.clients),
            "full": per_client(full, "finetune", args.clients),
        },
    }
    c = result["central"]
    result["central_ratio_sasrec_over_full"] = round(c["sasrec"]["sequences_per_s"] / c["full"]["sequences_per_s"], 2)
    p = result["per_client"]
    result["per_client_ratio_sasrec_over_full"] = round(
        p["sasrec"]["sequences_per_s"] / p["full"]["sequences_per_s"], 2
    )
    atomic_write_json(Path(args.out), result)
    print(result, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
