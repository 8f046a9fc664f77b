"""Does a change alter behaviour? A fixed federated run on ML-100K, compared metric by metric.

The real ``FederatedRun`` and ClientApp in one process (``benchmarks.harness``): 943 users, 10%
sampled per round, ``pretrain:12,align:3,finetune:5`` (every stage), validation every 5 rounds on 60
users, the final test on every user, text features from the LLM descriptions, one CPU thread,
prototype noise off (it is fresh OS entropy by design). With ``--baseline`` (the run folder of the
same command on the code before the change) it writes the largest absolute difference of every
metric over the 20 rounds into ``--out``.

    python -m benchmarks.same_history --data-dir ../shared/data/ml-100k --shared ../shared/data \
        --run outputs/same-history --baseline outputs/same-history-before --out benchmarks/results/same_history.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from benchmarks.common import ml100k_features
from benchmarks.harness import run_federation
from benchmarks.harness.compare import max_differences, read_run
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.provenance import command_line, machine_description

RUN = {
    "stage-schedule": "pretrain:12,align:3,finetune:5",
    "eval-every": 5,
    "eval-users": 60,
    "final-test": True,
    "prototype-noise": 0.0,
}
USERS = 943


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ml-100k")
    parser.add_argument("--shared", default="../shared/data", help="folder with ml-100k-llm/")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--run", required=True, help="run folder to write (its parent is the output-dir)")
    parser.add_argument("--baseline", help="run folder of the same command before the change")
    parser.add_argument("--out", help="comparison JSON (with --baseline)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    config = {
        **RUN,
        **ml100k_features(args.shared, visual=False),
        "data-dir": args.data_dir,
        "cache-dir": args.cache_dir,
        "output-dir": str(run.parent),
        "run-name": run.name,
    }
    torch.set_num_threads(1)
    random.seed(1234)  # Flower's node sampling draws from the global random module
    run_federation(config, USERS)
    if args.baseline:
        diffs, only_one = max_differences(read_run(args.baseline), read_run(run))
        print(f"[same-history] max abs difference over {len(diffs)} metrics: {max(diffs.values()):.3g}")
        if args.out:
            payload = {
                "command": command_line(),
                "machine": machine_description(),
                "config": config,
                "max_abs_difference": max(diffs.values()),
                "by_metric": diffs,
                "only_in_one_run": sorted({k.split("/", 1)[-1] for k in only_one}),
            }
            atomic_write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
