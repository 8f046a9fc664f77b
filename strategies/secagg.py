"""SecAgg+ for FedDMMR's model arrays: Flower's ``SecAggPlusWorkflow`` as one round's collector.

Why not ``ServerApp`` + ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` as in Flower's
examples: in 1.41 that workflow only runs inside the legacy ``LegacyContext`` loop (legacy
``Strategy.configure_fit/aggregate_fit``, ``Parameters`` without names, no stages, no resume),
while FedDMMR drives its own Message-API round loop (``server_app/federation.py``). The workflow
object itself only needs a ``Grid`` and a ``LegacyContext`` for one round, so ``collect``

1. takes the instructions ``FedDMMRStrategy.configure_train`` built (sampled nodes, full model,
   global prototypes, round config), exactly as without SecAgg+;
2. runs Flower's four SecAgg+ stages (setup, share keys, collect masked vectors, unmask) with a
   tiny legacy shim whose ``configure_fit`` hands over those nodes and whose ``aggregate_fit``
   receives the unmasked weighted mean; the messages of the "collect" stage carry FedDMMR's
   content, which ``client_app.privacy_mods`` turns into the masked *update* of the trained
   tensors (``secaggplus_mod``, unchanged Flower code);
3. returns ``RoundReplies`` whose ``mean`` is that mean (as model values), for
   ``FedDMMRStrategy.aggregate_round`` like any other round.

The server never sees one client's update, so per-client NaN / norm checks are impossible; what
it can check before summing (masked-vector shapes, the tensor names a client declares, its
weight, its plaintext prototypes) is checked in the grid proxy below, and a failing reply is
turned into a dropout, which SecAgg+ recovers from with the dropped client's key shares.
Prototypes and metrics stay plaintext (they are separate releases; see docs/privacy.md).
A node with nothing to train takes part with a zero update of weight 0 (``client_app.privacy_mods``):
no dropout to recover from, nothing added to the sum, and the node is counted as skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from feddmmr_flower.prototype_aggregation import validate_client
from feddmmr_flower.replies import Accepted, Expected, NodeOutcome, RoundReplies, check_weight
from feddmmr_wire import MessageError, TrainReply, TrainStatus

from .collect import Exchange, error_reason, send_and_receive, unanswered

logger = logging.getLogger("flwr.feddmmr")
REJECTED_CODE = 600  # error code of a reply turned into a dropout by the checks here
SECURE_AGGREGATION = "secure-aggregation"  # train metric: 1 in a SecAgg+ round


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
    """The real grid, plus: FedDMMR content for the "collect" stage, reply checks, parsed replies."""

    grid: Grid
    contents: dict[int, RecordDict]
    expected: Expected
    max_weight: float
    exchange: Exchange
    replies: dict[int, TrainReply] = field(default_factory=dict)
    rejected: dict[int, NodeOutcome] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, NodeOutcome] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def _check(self, node: int, reply: Message) -> TrainReply | NodeOutcome:
        try:
            parsed, plain = TrainReply.from_secagg_content(reply.content)
        except MessageError as exc:
            return NodeOutcome(node, exc.partition_id, str(exc))
        pid = parsed.partition_id
        if plain.withheld:
            return NodeOutcome(node, pid, f"client withheld its update: {plain.withheld}")
        if plain.array_names != list(self.expected.names):
            return NodeOutcome(node, pid, f"unexpected key set: {plain.array_names[:5]}")
        skip = parsed.status == TrainStatus.NOTHING_TO_TRAIN
        if skip and parsed.num_examples != 0:
            return NodeOutcome(node, pid, f"nothing to train but 'num-examples' {parsed.num_examples!r}")
        if not skip and (reason := check_weight(parsed.num_examples, self.max_weight)) is not None:
            return NodeOutcome(node, pid, reason)
        secagg = reply.content.config_records[RECORD_KEY_CONFIGS]
        shapes = [tuple(bytes_to_ndarray(b).shape) for b in secagg[Key.MASKED_PARAMETERS]][1:]
        if shapes != self.expected.shapes():
            return NodeOutcome(node, pid, f"wrong shapes of the masked update: {shapes[:3]} ...")
        if skip:  # in the sum with weight 0 (its masks must cancel the others'), not aggregated as a reply
            self.skipped[node] = NodeOutcome(node, pid, parsed.reason or "nothing to train")
            return parsed
        if parsed.centroids is not None:
            reason = validate_client(parsed.centroids, parsed.sizes, self.expected.prototype_dim)
            if reason is not None:
                return NodeOutcome(node, pid, f"prototypes: {reason}")
        return parsed

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
        for reply in self.exchange(self.grid, messages, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed.setdefault(node, error_reason(reply))
            elif collect:
                checked = self._check(node, reply)
                if isinstance(checked, NodeOutcome):
                    self.rejected[node] = checked
                    reply = Message(Error(code=REJECTED_CODE, reason=checked.reason), reply_to=sent[node])
                elif node not in self.skipped:
                    self.replies[node] = checked
            out.append(reply)
        return out


class SecAggPlusCollector:
    """Collect one round through SecAgg+; parameters as ``SecAggPlusWorkflow``'s."""

    def __init__(
        self,
        num_shares: int,
        reconstruction_threshold: int,
        clipping_range: float,
        max_weight: float,
        quantization_range: int = 2**22,
        timeout: float | None = None,
        exchange: Exchange = send_and_receive,
    ) -> None:
        self.workflow = SecAggPlusWorkflow(
            num_shares,
            reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=clipping_range,
            quantization_range=quantization_range,
            timeout=timeout,
        )
        self.max_weight, self.exchange = max_weight, exchange

    def collect(self, server_round: int, instructions: list[Message], grid: Grid, expected: Expected) -> RoundReplies:
        """SecAgg+'s stages over the sampled nodes -> the accepted replies and their unmasked mean."""
        contents = {m.metadata.dst_node_id: m.content for m in instructions}
        checked = _CheckedGrid(grid, contents, expected, self.max_weight, self.exchange)
        shim = _Shim([m.metadata.dst_node_id for m in instructions])
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=shim
        )  # type: ignore[arg-type]
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        if len(instructions) >= 2:
            # When every node that answered had nothing to train, the total weight is 0 and Flower's
            # unmasking divides by it: no aggregate is used then (``_replies``), so no warning either.
            with np.errstate(divide="ignore", invalid="ignore"):
                self.workflow(checked, context)  # type: ignore[arg-type]
        else:
            logger.warning(
                "Round %d: SecAgg+ needs >= 2 sampled nodes, got %d; round skipped", server_round, len(instructions)
            )
        return self._replies(server_round, shim, checked, instructions, expected)

    @staticmethod
    def _replies(
        server_round: int, shim: _Shim, checked: _CheckedGrid, instructions: list[Message], expected: Expected
    ) -> RoundReplies:
        out = RoundReplies(sampled=len(instructions), metrics={SECURE_AGGREGATION: 1})
        out.rejected = list(checked.rejected.values())
        out.skipped = list(checked.skipped.values())
        answered = set(checked.replies) | set(checked.rejected) | set(checked.skipped)
        out.failed = unanswered(instructions, answered, checked.failed, "no reply in the SecAgg+ protocol")
        accepted = [
            Accepted(node, r.partition_id, float(r.num_examples), r.metrics, prototypes=_prototypes(r))
            for node, r in checked.replies.items()
        ]
        if not accepted:  # no update to aggregate: the strategy keeps the model and says why
            return out
        mean = shim.mean
        problem = None
        if mean is None:
            problem = "SecAgg+ produced no aggregate"
        elif len(mean) != len(expected.names) or not all(np.isfinite(a).all() for a in mean):
            problem = "SecAgg+ result unusable (shape or non-finite)"
        if problem is not None:
            logger.warning("Round %d: %s, global model unchanged", server_round, problem)
            out.failed += [NodeOutcome(a.node_id, a.partition_id, problem) for a in accepted]
            return out
        out.accepted = accepted
        out.mean = {  # the clients sent updates (trained minus received): back to model values
            n: (expected.reference[n] + delta).astype(np.float32) for n, delta in zip(expected.names, mean)
        }
        return out


def _prototypes(reply: TrainReply) -> tuple[np.ndarray, np.ndarray] | None:
    return None if reply.centroids is None else (reply.centroids, reply.sizes)  # type: ignore[return-value]
