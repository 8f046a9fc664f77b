"""Federated FedDMMR without Flower: the same client computations in one process (the "floor").

Each round samples users, runs ``ClientRuntime.train`` for each (exactly what a ClientApp does),
averages the trainable tensors weighted by num-examples and applies the server optimiser
(``fedavg``: the average; ``fedadam``: Adam on the pseudo-gradient, as Flower's FedAdam).
Prototype aggregation uses the same core function as the strategy. Used to (a) measure how much
of a simulated round is Flower/Ray overhead and (b) explore federated hyper-parameters quickly,
selecting on the validation split only.

    python benchmarks/inprocess_federation.py --run-config "data-dir='...' stage-schedule='pretrain:100'" \
        --out benchmarks/results/inprocess_<name>.json
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import app_defaults  # noqa: E402
from feddmmr_flower.client import runtime_for  # noqa: E402
from feddmmr_flower.config import ExperimentConfig  # noqa: E402
from feddmmr_flower.data.sequences import atomic_write_json  # noqa: E402
from feddmmr_flower.prototype_aggregation import aggregate_prototypes  # noqa: E402
from feddmmr_flower.stages import StageSchedule, trainable_names  # noqa: E402
from feddmmr_flower.train import command_line, machine_description  # noqa: E402


def parse_run_config(text: str) -> dict:
    return tomllib.loads("\n".join(part for part in _split(text))) if text else {}


def _split(text: str):
    token, quote = "", None
    for char in text:
        if char in "'\"":
            quote = None if quote == char else (quote or char)
        if char == " " and quote is None:
            if token:
                yield token
            token = ""
        else:
            token += char
    if token:
        yield token


def evaluate_users(runtime, users, arrays, prototypes, memories, split) -> dict:
    rows = []
    for user in users:
        outcome = runtime.evaluate(int(user), arrays, prototypes, memories.get(int(user)), split=split)
        memories[int(user)] = outcome.memory
        rows.append(outcome.metrics)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="flwr-style overrides, e.g. \"strategy='fedavg' lr=0.1\"")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--final-test", action="store_true", help="evaluate the test split on all users at the end")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.from_flat({**app_defaults(), **parse_run_config(args.run_config)}, strict=True)
    if cfg.strategy not in ("fedavg", "fedadam"):
        raise SystemExit("the in-process floor implements fedavg and fedadam only")
    runtime = runtime_for(cfg)
    model = runtime.model
    schedule = StageSchedule.parse(cfg.stage_schedule)
    rng = np.random.default_rng(cfg.seed)
    users_all = np.arange(runtime.num_users)
    eval_users = np.sort(
        rng.choice(users_all, min(cfg.eval_users or runtime.num_users, runtime.num_users), replace=False)
    )
    per_round = max(1, int(round(cfg.fraction_train * runtime.num_users)))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    memories: dict[int, dict] = {}
    prototypes = None
    history, best = [], {"ndcg": -1.0}
    started = time.perf_counter()
    for segment in schedule.segments:
        names = trainable_names(model, segment.stage)
        params = [torch.nn.Parameter(global_state[n].clone()) for n in names]
        server_opt = (
            torch.optim.Adam(params, lr=cfg.server_lr, betas=(0.9, 0.99), eps=1e-9)
            if cfg.strategy == "fedadam"
            else None
        )
        for rnd in range(segment.first_round, segment.last_round + 1):
            tick = time.perf_counter()
            arrays = {k: v.numpy() for k, v in global_state.items()}
            sampled = rng.choice(users_all, per_round, replace=False)
            sums = {n: torch.zeros_like(global_state[n], dtype=torch.float64) for n in names}
            total, losses, protos, client_seconds = 0.0, [], [], 0.0
            for user in sampled:
                outcome = runtime.train(
                    int(user),
                    arrays,
                    prototypes,
                    memories.get(int(user)),
                    stage=segment.stage,
                    lr=cfg.client_lr,
                    local_epochs=cfg.local_epochs,
                    server_round=rnd,
                )
                memories[int(user)] = outcome.memory
                for n in names:
                    sums[n] += torch.as_tensor(outcome.arrays[n], dtype=torch.float64) * outcome.num_examples
                total += outcome.num_examples
                losses.append(outcome.metrics.get("rec", outcome.metrics.get("loss")))
                client_seconds += outcome.metrics["client-train-seconds"]
                if len(outcome.centroids):
                    protos.append((outcome.centroids, outcome.sizes))
            average = {n: (sums[n] / total).float() for n in names}
            if server_opt is None:
                for n in names:
                    global_state[n] = average[n]
            else:
                server_opt.zero_grad()
                for p, n in zip(params, names):
                    p.grad = -(average[n] - global_state[n])
                server_opt.step()
                for p, n in zip(params, names):
                    global_state[n] = p.detach().clone()
            if protos and model.config.uses_prototypes:
                result = aggregate_prototypes(
                    prototypes, protos, num_prototypes=cfg.num_prototypes, ema=cfg.prototype_ema, seed=cfg.seed
                )
                prototypes = result.prototypes
            record = {
                "round": rnd,
                "stage": segment.stage,
                "loss": float(np.mean(losses)),
                "seconds": round(time.perf_counter() - tick, 3),
                "client_seconds": round(client_seconds, 3),
            }
            if rnd % cfg.eval_every == 0 or rnd == segment.last_round:
                valid = evaluate_users(
                    runtime, eval_users, {k: v.numpy() for k, v in global_state.items()}, prototypes, memories, "valid"
                )
                record["valid"] = {k: round(v, 5) for k, v in valid.items() if "@" in k or "MRR" in k}
                if valid["NDCG@10"] > best["ndcg"]:
                    best = {
                        "ndcg": valid["NDCG@10"],
                        "round": rnd,
                        "state": {k: v.clone() for k, v in global_state.items()},
                        "prototypes": prototypes,
                    }
            history.append(record)
            print(
                f"round {rnd}/{schedule.total_rounds} [{segment.stage}] loss {record['loss']:.4f} "
                f"{record['seconds']:.1f}s"
                + (f" valid NDCG@10 {record['valid']['NDCG@10']:.4f}" if "valid" in record else ""),
                file=sys.stderr,
                flush=True,
            )
    payload = {
        "command": "python " + command_line(),
        "machine": machine_description(),
        "config": cfg.flat(),
        "history": history,
        "best_round": best.get("round"),
        "best_valid_NDCG@10": best["ndcg"],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    if args.final_test:
        arrays = {k: v.numpy() for k, v in best["state"].items()}
        payload["test"] = evaluate_users(runtime, users_all, arrays, best["prototypes"], memories, "test")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
