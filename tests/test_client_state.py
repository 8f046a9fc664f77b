"""Client memory on node-local disk: it survives a lost ``context.state`` (a SuperNode restart).

Drives the real ClientApp functions with real Flower Message/Context objects on a small
synthetic dataset; the multi-process version (a restarted SuperNode) is in test_deployment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client_app.app import evaluate as client_evaluate
from client_app.app import train as client_train
from feddmmr_flower.client_state import MemoryFile
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.errors import DataFormatError
from feddmmr_flower.experiment import build_model, load_assets
from feddmmr_flower.stages import trainable_state

from .conftest import synthetic_ml100k


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("client-state")
    run_config = {
        "data-dir": str(synthetic_ml100k(root / "ml-100k", users=4)),
        "cache-dir": str(root / "cache"),
        "hidden": 16,
        "maxlen": 30,
        "negatives": 20,
        "eval-negatives": 20,
    }
    cfg = ExperimentConfig.from_flat(run_config)
    arrays = trainable_state(build_model(cfg, load_assets(cfg)), "pretrain")
    return {"root": root, "run_config": run_config, "arrays": arrays}


def _message(arrays: dict, config: dict, kind: str) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": ConfigRecord(config)}
    )
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)  # as the SuperNode hands it to the ClientApp


def _context(setup: dict, state_dir, state: RecordDict | None = None, run_id: int = 1) -> Context:
    node = {"partition-id": 2, "num-partitions": 4, "state-dir": str(state_dir)}
    return Context(
        run_id=run_id, node_id=7, node_config=node, state=state or RecordDict(), run_config=dict(setup["run_config"])
    )


def _train(setup: dict, context: Context, rnd: int, run_key: str = "run-a") -> dict:
    msg = _message(
        setup["arrays"],
        {"stage": "pretrain", "client-lr": 0.05, "local-epochs": 1, "server-round": rnd, "run-key": run_key},
        "train",
    )
    return dict(client_train(msg, context).content.metric_records["metrics"])


def test_memory_survives_a_lost_context_state(setup, tmp_path):
    context = _context(setup, tmp_path)
    assert _train(setup, context, 1)["memory-passes"] == 1.0
    saved = MemoryFile(tmp_path, "run-a", 2).load()
    assert saved is not None and np.array_equal(saved["item"], context.state.array_records["memory"]["item"].numpy())
    restarted = _context(setup, tmp_path)  # a new SuperNode process: RAM state gone, disk kept
    assert _train(setup, restarted, 2)["memory-passes"] == 2.0


def test_a_new_run_never_reads_another_runs_memory(setup, tmp_path):
    _train(setup, _context(setup, tmp_path), 1, run_key="run-a")
    assert _train(setup, _context(setup, tmp_path), 1, run_key="run-b")["memory-passes"] == 1.0


def test_without_a_state_dir_nothing_is_written(setup, tmp_path):
    context = _context(setup, "")
    _train(setup, context, 1)
    assert "memory" in context.state.array_records and not any(tmp_path.iterdir())


def test_evaluate_keeps_memory_on_disk_too(setup, tmp_path):
    msg = _message(setup["arrays"], {"split": "valid", "run-key": "run-e"}, "evaluate")
    reply = client_evaluate(msg, _context(setup, tmp_path))
    assert "NDCG@10" in reply.content.metric_records["metrics"]
    assert MemoryFile(tmp_path, "run-e", 2).path.is_file()


def test_node_config_paths_win_over_the_run_config(setup, tmp_path):
    context = _context(setup, tmp_path)
    context.node_config["data-dir"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="nowhere"):
        _train(setup, context, 1)


def test_a_corrupt_memory_file_is_named_not_guessed(tmp_path):
    store = MemoryFile(tmp_path, "run-a", 0)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not an npz")
    with pytest.raises(DataFormatError, match="partition-0.npz"):
        store.load()


@pytest.mark.parametrize("key", ["", "../up", "a/b", "x" * 200])
def test_unsafe_run_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="run key"):
        MemoryFile(tmp_path, key, 0)
