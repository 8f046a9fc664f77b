"""SecAgg+ for FedDMMR's model arrays: Flower's ``SecAggPlusWorkflow`` run as one round's aggregation step.

Why not ``ServerApp`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` as in Flower's
examples: in 1.41 that workflow only runs inside the legacy ``LegacyContext`` loop (legacy
``Strategy.configure_fit/aggregate_fit``, ``Parameters`` without names, no stages, no resume),
while FedDMMR drives its own Message-API round loop (``server_app/federation.py``). The workflow
object itself only needs a ``Grid`` and a ``LegacyContext`` for one round, so each round we:

1. let ``FedDMMRStrategy.configure_train`` sample nodes and build their messages (full model,
   global prototypes, round config), exactly as without SecAgg+;
2. run Flower's four SecAgg+ stages (setup, share keys, collect masked vectors, unmask) with a
   tiny legacy shim whose ``configure_fit`` hands over those nodes and whose ``aggregate_fit``
   receives the unmasked weighted mean; the messages of the "collect" stage carry FedDMMR's
   content, which ``client_app.privacy_mods`` turns into the masked *update* of the trained
   tensors (``secaggplus_mod``, unchanged Flower code);
3. give the base strategy (FedAvg, FedAdam, ...) that mean as a single pre-aggregated reply and
   overlay the result on the full model, as ``FedDMMRStrategy.aggregate_train`` does.

The server never sees one client's update, so per-client NaN / norm checks are impossible; what
it can check before summing (masked-vector shapes, the tensor names a client declares, its
weight, its plaintext prototypes) is checked in the grid proxy below, and a failing reply is
turned into a dropout, which SecAgg+ recovers from with the dropped client's key shares.
Prototypes and metrics stay plaintext (they are separate releases; see docs/privacy.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from feddmmr_flower.prototype_aggregation import validate_client

from .dp import LocalDPReport
from .feddmmr import FedDMMRStrategy, _Candidate

logger = logging.getLogger("flwr.feddmmr")
SECAGG_EXTRAS = "feddmmr-plaintext"  # same name as client_app.privacy_mods.SECAGG_EXTRAS
REJECTED_CODE = 600  # error code of a reply turned into a dropout by the checks here


@dataclass
class _Proxy:
    """What the workflow needs of a legacy ClientProxy: the node id."""

    node_id: int


@dataclass
class _Shim:
    """Legacy-strategy shim: hands the sampled nodes to the workflow, keeps its unmasked mean."""

    node_ids: list[int]
    mean: list[np.ndarray] | None = None
    num_results: int = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        return [(_Proxy(n), FitIns(Parameters(tensors=[], tensor_type=""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        self.num_results = len(results)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


@dataclass
class _CheckedGrid:
    """The real grid, plus: FedDMMR content for the "collect" stage, reply checks, reply capture."""

    grid: Grid
    contents: dict[int, RecordDict]
    names: list[str]
    shapes: list[tuple[int, ...]]
    max_weight: float
    prototype_dim: int | None
    replies: dict[int, Message] = field(default_factory=dict)
    rejected: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # node -> (reason, partition id)
    failed: dict[int, str] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def _check(self, reply: Message) -> str | None:
        content = reply.content
        extras = content.config_records.get(SECAGG_EXTRAS)
        metrics = content.metric_records.get("metrics")
        if extras is None or metrics is None:
            return "no plaintext part (array names, metrics)"
        if "withheld" in extras:
            return f"client withheld its update: {extras['withheld']}"
        if list(extras.get("array-names", [])) != self.names:
            return f"unexpected key set: {list(extras.get('array-names', []))[:5]}"
        n = metrics.get("num-examples")
        if not isinstance(n, int | float) or not 0 < n <= self.max_weight:
            return f"'num-examples' {n!r} not in (0, {self.max_weight:g}]"
        masked = [bytes_to_ndarray(b) for b in content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        shapes = [tuple(a.shape) for a in masked[1:]]
        if shapes != self.shapes:
            return f"wrong shapes of the masked update: {shapes[:3]} ..."
        if "centroids" in extras:
            reason = validate_client(
                bytes_to_ndarray(extras["centroids"]), bytes_to_ndarray(extras["sizes"]), self.prototype_dim
            )
            if reason is not None:
                return f"prototypes: {reason}"
        return None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        collect = [
            m
            for m in messages
            if m.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
        ]
        for m in collect:  # the workflow's content is the legacy FitIns placeholder: use ours
            secagg = m.content.config_records[RECORD_KEY_CONFIGS]
            content = RecordDict(dict(self.contents[m.metadata.dst_node_id].items()))
            content[RECORD_KEY_CONFIGS] = secagg
            m.content = content
        sent = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed.setdefault(node, f"error reply (code {reply.error.code}): {reply.error.reason}")
            elif collect:
                reason = self._check(reply)
                if reason is not None:
                    metrics = reply.content.metric_records.get("metrics") or {}
                    pid = metrics.get("partition-id")
                    self.rejected[node] = (reason, int(pid) if isinstance(pid, int | float) else None)
                    reply = Message(Error(code=REJECTED_CODE, reason=reason), reply_to=sent[node])
                else:
                    self.replies[node] = reply
            out.append(reply)
        return out


class SecAggPlusAggregation:
    """One SecAgg+ round for a ``FedDMMRStrategy``; parameters as ``SecAggPlusWorkflow``'s."""

    def __init__(
        self,
        num_shares: int,
        reconstruction_threshold: int,
        clipping_range: float,
        max_weight: float,
        quantization_range: int = 2**22,
        timeout: float | None = None,
    ) -> None:
        self.workflow = SecAggPlusWorkflow(
            num_shares,
            reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=clipping_range,
            quantization_range=quantization_range,
            timeout=timeout,
        )
        self.max_weight = max_weight

    def train_round(
        self, strategy: FedDMMRStrategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[ArrayRecord, MetricRecord]:
        """configure_train -> SecAgg+ -> base strategy on the mean -> (full model, train metrics)."""
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        names = list(strategy._names)
        checked = _CheckedGrid(
            grid,
            {m.metadata.dst_node_id: m.content for m in messages},
            names,
            [tuple(arrays[n].shape) for n in names],
            self.max_weight,
            strategy.prototype_dim,
        )
        shim = _Shim([m.metadata.dst_node_id for m in messages])
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=shim
        )  # type: ignore[arg-type]
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        if len(messages) >= 2:
            self.workflow(checked, context)  # type: ignore[arg-type]
        else:
            logger.warning(
                "Round %d: SecAgg+ needs >= 2 sampled nodes, got %d; round skipped", server_round, len(messages)
            )
        return self._aggregate(strategy, server_round, shim, checked, messages)

    def _aggregate(
        self, strategy: FedDMMRStrategy, server_round: int, shim: _Shim, checked: _CheckedGrid, messages: list[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        strategy.rejected[server_round], strategy.failed[server_round] = [], []
        global_arrays = strategy._global
        assert global_arrays is not None
        candidates = []
        for node, reply in checked.replies.items():
            metrics = reply.content.metric_records["metrics"]
            pid = metrics.get("partition-id")
            if isinstance(pid, int | float):
                strategy.partition_of[node] = int(pid)
            extras = reply.content.config_records[SECAGG_EXTRAS]
            protos = None
            if "centroids" in extras:
                protos = (bytes_to_ndarray(extras["centroids"]), bytes_to_ndarray(extras["sizes"]))
            candidates.append(
                _Candidate(
                    reply,
                    node,
                    strategy.partition_of.get(node),
                    float(metrics["num-examples"]),
                    {},
                    metrics,
                    math.nan,
                    protos,
                )
            )
        for node, (reason, pid) in checked.rejected.items():
            if pid is not None:
                strategy.partition_of[node] = pid
            strategy._record(strategy.rejected, server_round, node, strategy.partition_of.get(node), reason, "rejected")
        answered = set(checked.replies) | set(checked.rejected)
        for m in messages:
            node = m.metadata.dst_node_id
            if node not in answered:
                reason = checked.failed.get(node, "no reply in the SecAgg+ protocol")
                strategy._record(strategy.failed, server_round, node, strategy.partition_of.get(node), reason, "failed")

        out = global_arrays
        if shim.mean is not None and checked.replies:
            names = strategy._names
            if len(shim.mean) != len(names) or not all(np.isfinite(a).all() for a in shim.mean):
                logger.error(
                    "Round %d: SecAgg+ result unusable (shape or non-finite); global model unchanged", server_round
                )
            else:
                mean = {n: global_arrays[n].numpy().astype(np.float64) + d for n, d in zip(names, shim.mean)}
                weight = float(sum(c.num_examples for c in candidates))
                reply = candidates[0].msg
                pre = _Candidate(
                    reply,
                    candidates[0].node_id,
                    None,
                    weight,
                    {n: v.astype(np.float32) for n, v in mean.items()},
                    MetricRecord({strategy.weighted_by_key: weight}),
                    math.nan,
                    None,
                )
                hook, strategy.pre_aggregate = strategy.pre_aggregate, None  # DP is the clients' (local) here
                try:
                    aggregated = strategy._base_aggregate(server_round, [pre])
                finally:
                    strategy.pre_aggregate = hook
                if aggregated is not None:
                    global_np = {n: global_arrays[n].numpy().astype(np.float64) for n in names}
                    out = strategy._overlay(aggregated, global_np)
                if isinstance(hook, LocalDPReport):
                    for c in candidates:
                        hook.releases[c.node_id] = hook.releases.get(c.node_id, 0) + 1
                strategy._aggregate_prototypes(server_round, candidates)
        else:
            candidates = []
            logger.warning("Round %d: SecAgg+ produced no aggregate, global model unchanged", server_round)

        metrics = strategy.round_metrics(server_round, candidates)
        metrics["secure-aggregation"] = 1
        return out, metrics
