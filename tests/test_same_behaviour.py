"""A federated run gives the same history as before the architecture refactor (issue #13).

The real ``FederatedRun`` and ClientApp (``benchmarks.harness``) on the 12-user synthetic dataset,
through all three stages with node sampling, validation, prototypes and the final test. Its
metrics must equal the ones the code before the refactor recorded (``tests/golden/``), round by
round and metric by metric, up to float noise. The same comparison on ML-100K (20 rounds) is
``python -m benchmarks.same_history``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from benchmarks.harness import run_federation
from benchmarks.harness.compare import max_differences, read_run

from .conftest import synthetic_ml100k

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "inprocess_federation_12users.json"
USERS = 12
RUN = {
    "stage-schedule": "pretrain:3,align:1,finetune:2",
    "fraction-train": 0.5,
    "eval-every": 2,
    "eval-users": 6,
    "hidden": 16,
    "maxlen": 30,
    "negatives": 20,
    "eval-negatives": 20,
    "prototype-noise": 0.0,  # fresh OS entropy otherwise: different by design
    "min-available-nodes": USERS,
    "final-test": True,
}
# added after the golden run: nodes with nothing to train (issue #17), skipped and then left out of the draw
NEW_METRICS = {"train/num-skipped", "train/num-left-out"}


def test_the_run_repeats_the_history_recorded_before_the_refactor(tmp_path):
    data = synthetic_ml100k(tmp_path / "ml-100k", users=USERS)
    config = {**RUN, "data-dir": str(data), "cache-dir": str(tmp_path / "cache"), "output-dir": str(tmp_path)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(1234)  # Flower's node sampling draws from the global random module
    try:
        run_federation({**config, "run-name": "run"}, USERS)
    finally:
        torch.set_num_threads(threads)
    golden = json.loads(GOLDEN.read_text())["metrics"]
    diffs, only_one = max_differences(golden, read_run(tmp_path / "run"))
    assert {key.split("/", 1)[1] for key in only_one} <= NEW_METRICS, only_one
    assert len(diffs) >= 45 and {"train/loss", "valid/NDCG@10", "test/full/NDCG@10", "train/num-prototypes"} <= set(
        diffs
    )
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}
