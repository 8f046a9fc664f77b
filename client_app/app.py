"""FedDMMR ClientApp: one Flower node = one user (``node_config["partition-id"]``).

A thin adapter: it converts Flower records to numpy values and back and calls
``feddmmr_flower.client``. The user's LocalDynamicMemory lives in ``context.state``
("memory"), so it survives across rounds on the same node, and, when the node has a state
folder (node-config ``state-dir`` or run-config ``client-state-dir``), also on node-local disk,
so it survives a SuperNode restart. Node-local paths (``data-dir``, ``cache-dir``, …) may be set
per node with ``--node-config``; they win over the run config, which is the same for every node.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddmmr_flower.client import runtime_for
from feddmmr_flower.client_state import MemoryFile
from feddmmr_flower.config import ExperimentConfig

from .privacy_mods import privacy_mod
from .wire import LAYOUT, arrays_record, read_arrays, to_numpy, to_record, wire_mod

# Outermost: the wire mod (it unpacks the packed model only for the DP mods; the app reads it packed);
# then DP / SecAgg+ per run config.
app = ClientApp(mods=[wire_mod, privacy_mod])

# Settings that describe the node's own disk and hardware, not the experiment.
NODE_LOCAL_KEYS = ("data-dir", "cache-dir", "items-file", "descriptions", "posters-dir", "movies-dat", "device")


def _config(context: Context) -> ExperimentConfig:
    node = {key: context.node_config[key] for key in NODE_LOCAL_KEYS if key in context.node_config}
    return ExperimentConfig.from_flat({**dict(context.run_config), **node})


def _memory_file(msg: Message, context: Context, cfg: ExperimentConfig, user: int) -> MemoryFile | None:
    folder = str(context.node_config.get("state-dir", "") or cfg.client_state_dir)
    if not folder:
        return None
    run_key = str(msg.content.config_records["config"].get("run-key", "") or f"run-{context.run_id}")
    return MemoryFile(folder, run_key, user)


def _inputs(msg: Message, context: Context):
    cfg = _config(context)
    runtime = runtime_for(cfg)
    user = int(context.node_config["partition-id"])
    arrays = read_arrays(msg.content)
    prototypes = to_numpy(msg.content.array_records.get("prototypes")).get("centroids")
    disk = _memory_file(msg, context, cfg, user)
    memory = to_numpy(context.state.array_records.get("memory")) or None
    if memory is None and disk is not None:
        memory = disk.load()  # a restarted node: its RAM state is gone, its disk is not
    return cfg, runtime, user, arrays, prototypes, memory, disk


def _keep_memory(context: Context, disk: MemoryFile | None, memory: dict[str, np.ndarray]) -> None:
    context.state["memory"] = to_record(memory)
    if disk is not None:
        disk.save(memory)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, runtime, user, arrays, prototypes, memory, disk = _inputs(msg, context)
    config = msg.content.config_records["config"]
    outcome = runtime.train(
        user,
        arrays,
        prototypes,
        memory,
        stage=str(config["stage"]),
        lr=float(config.get("lr", cfg.client_lr)),
        local_epochs=int(config.get("local-epochs", cfg.local_epochs)),
        server_round=int(config.get("server-round", 0)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    _keep_memory(context, disk, outcome.memory)
    arrays_out = outcome.arrays
    if user == cfg.fault_nan_partition:  # fault injection for tests: the server must reject this
        arrays_out = {name: np.full_like(value, np.nan) for name, value in arrays_out.items()}
    metrics = MetricRecord({**outcome.metrics, "num-examples": outcome.num_examples, "partition-id": user})
    content = RecordDict(
        {
            **arrays_record(arrays_out, packed=LAYOUT in msg.content.config_records),
            "prototypes": to_record({"centroids": outcome.centroids, "sizes": outcome.sizes}),
            "metrics": metrics,
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, runtime, user, arrays, prototypes, memory, disk = _inputs(msg, context)
    split = str(msg.content.config_records["config"].get("split", "valid"))
    outcome = runtime.evaluate(user, arrays, prototypes, memory, split=split)
    _keep_memory(context, disk, outcome.memory)
    metrics = MetricRecord({**outcome.metrics, "num-examples": 1, "partition-id": user})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
