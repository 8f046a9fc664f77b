"""FedDMMR ClientApp: one Flower node = one user (``node_config["partition-id"]``).

A thin adapter: it reads the typed instruction (``feddmmr_wire``), calls
``feddmmr_flower.client`` and answers with the typed reply. The user's LocalDynamicMemory lives in
``context.state`` ("memory"), so it survives across rounds on the same node, and, when the node has
a state folder (node-config ``state-dir`` or run-config ``client-state-dir``), also on node-local
disk, so it survives a SuperNode restart. Node-local paths (``data-dir``, ``cache-dir``, …) may be
set per node with ``--node-config``; they win over the run config, which is the same for every node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from feddmmr_flower.client import ClientRuntime, runtime_for
from feddmmr_flower.client_state import MemoryFile
from feddmmr_flower.config import ExperimentConfig
from feddmmr_wire import (
    EvaluateInstruction,
    EvaluateReply,
    TrainInstruction,
    TrainReply,
    is_packed,
    to_numpy,
    to_record,
)
from feddmmr_wire.keys import MEMORY, STATE_DIR

from .context import experiment_config, partition_id
from .privacy_mods import privacy_mod
from .wire_mod import wire_mod

# Outermost: the wire mod (it unpacks the packed model only for the DP mods; the app reads it packed);
# then DP / SecAgg+ per run config.
app = ClientApp(mods=[wire_mod, privacy_mod])


@dataclass
class ClientInputs:
    """What every message handler starts from: the config, the process's runtime, the user, their memory."""

    cfg: ExperimentConfig
    runtime: ClientRuntime
    user: int
    memory: dict[str, np.ndarray] | None
    disk: MemoryFile | None


def _inputs(context: Context, run_key: str) -> ClientInputs:
    cfg = experiment_config(context)
    user = partition_id(context)
    folder = str(context.node_config.get(STATE_DIR, "") or cfg.client_state_dir)
    disk = MemoryFile(folder, run_key or f"run-{context.run_id}", user) if folder else None
    memory = to_numpy(context.state.array_records.get(MEMORY)) or None
    if memory is None and disk is not None:
        memory = disk.load()  # a restarted node: its RAM state is gone, its disk is not
    return ClientInputs(cfg, runtime_for(cfg), user, memory, disk)


def _keep_memory(context: Context, disk: MemoryFile | None, memory: dict[str, np.ndarray]) -> None:
    context.state[MEMORY] = to_record(memory)
    if disk is not None:
        disk.save(memory)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = TrainInstruction.from_content(msg.content)
    inputs = _inputs(context, ins.run_key)
    if (reason := inputs.runtime.nothing_to_train(inputs.user)) is not None:
        # No training position: no arrays, no prototypes, memory untouched; the server counts a skip.
        skipped = TrainReply.nothing_to_train(inputs.user, reason)
        return Message(content=skipped.to_content(packed=is_packed(msg.content)), reply_to=msg)
    outcome = inputs.runtime.train(
        inputs.user,
        ins.arrays,
        ins.prototypes,
        inputs.memory,
        stage=ins.stage,
        lr=ins.client_lr,
        local_epochs=ins.local_epochs,
        server_round=ins.server_round,
        proximal_mu=ins.proximal_mu,
    )
    _keep_memory(context, inputs.disk, outcome.memory)
    arrays = outcome.arrays
    if inputs.user == inputs.cfg.fault_nan_partition:  # fault injection for tests: the server must reject this
        arrays = {name: np.full_like(value, np.nan) for name, value in arrays.items()}
    reply = TrainReply(arrays, outcome.num_examples, inputs.user, outcome.metrics, outcome.centroids, outcome.sizes)
    return Message(content=reply.to_content(packed=is_packed(msg.content)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ins = EvaluateInstruction.from_content(msg.content)
    inputs = _inputs(context, ins.run_key)
    outcome = inputs.runtime.evaluate(inputs.user, ins.arrays, ins.prototypes, inputs.memory, split=ins.split)
    _keep_memory(context, inputs.disk, outcome.memory)
    return Message(content=EvaluateReply(outcome.metrics, inputs.user).to_content(), reply_to=msg)
