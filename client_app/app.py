"""FedDMMR ClientApp: one Flower node = one user (``node_config["partition-id"]``).

A thin adapter: it converts Flower records to numpy values and back and calls
``feddmmr_flower.client``. The user's LocalDynamicMemory lives in ``context.state``
("memory"), so it survives across rounds on the same node.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddmmr_flower.client import runtime_for
from feddmmr_flower.config import ExperimentConfig

app = ClientApp()


def _numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {} if record is None else {name: array.numpy() for name, array in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _inputs(msg: Message, context: Context):
    cfg = ExperimentConfig.from_flat(context.run_config)
    runtime = runtime_for(cfg)
    user = int(context.node_config["partition-id"])
    arrays = _numpy(msg.content.array_records.get("arrays"))
    prototypes = _numpy(msg.content.array_records.get("prototypes")).get("centroids")
    memory = _numpy(context.state.array_records.get("memory")) or None
    return cfg, runtime, user, arrays, prototypes, memory


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, runtime, user, arrays, prototypes, memory = _inputs(msg, context)
    config = msg.content.config_records["config"]
    outcome = runtime.train(
        user, arrays, prototypes, memory,
        stage=str(config["stage"]), lr=float(config.get("lr", cfg.client_lr)),
        local_epochs=int(config.get("local-epochs", cfg.local_epochs)),
        server_round=int(config.get("server-round", 0)), proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    context.state["memory"] = _record(outcome.memory)
    arrays_out = outcome.arrays
    if user == cfg.fault_nan_partition:  # fault injection for tests: the server must reject this
        arrays_out = {name: np.full_like(value, np.nan) for name, value in arrays_out.items()}
    metrics = MetricRecord({**outcome.metrics, "num-examples": outcome.num_examples, "partition-id": user})
    content = RecordDict({
        "arrays": _record(arrays_out),
        "prototypes": _record({"centroids": outcome.centroids, "sizes": outcome.sizes}),
        "metrics": metrics,
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, runtime, user, arrays, prototypes, memory = _inputs(msg, context)
    split = str(msg.content.config_records["config"].get("split", "valid"))
    outcome = runtime.evaluate(user, arrays, prototypes, memory, split=split)
    context.state["memory"] = _record(outcome.memory)
    metrics = MetricRecord({**outcome.metrics, "num-examples": 1, "partition-id": user})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
