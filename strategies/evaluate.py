"""Federated evaluation for ``FedDMMRStrategy``: when, on which nodes, the weighted metrics, the best model.

Validation runs every ``every`` rounds and on the last round of each stage, on a fixed sample of
nodes when one is set (the same users every time, so rounds compare), else on the base strategy's
sample. The best global model by ``best_metric`` (higher is better) is kept with its prototypes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from feddmmr_flower import run_record as names
from feddmmr_flower.replies import as_count, weighted_means
from feddmmr_flower.stages import StageSchedule
from feddmmr_wire import EvaluateInstruction, EvaluateReply, MessageError, round_entries
from feddmmr_wire.keys import NUM_EXAMPLES, SPLIT

logger = logging.getLogger("flwr.feddmmr")

#: (server round, arrays, config, grid) -> the node ids a base strategy samples for evaluation.
Sampler = Callable[[int, ArrayRecord, ConfigRecord, Grid], list[int]]


@dataclass(frozen=True)
class EvaluationOptions:
    """every: evaluate every N rounds (and on each stage's last round); node_ids: fixed evaluation
    nodes (None: the base strategy samples); best_metric: the validation metric the best model is
    kept for."""

    every: int = 1
    node_ids: tuple[int, ...] | None = None
    best_metric: str = "NDCG@10"

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("evaluation every must be >= 1")


@dataclass
class BestModel:
    """Global model with the best validation metric seen so far."""

    server_round: int
    value: float
    arrays: ArrayRecord
    prototypes: np.ndarray | None


class Evaluation:
    """The evaluation half of the strategy (configure, aggregate, best model, one-off evaluations)."""

    def __init__(self, options: EvaluationOptions, schedule: StageSchedule, pack_wire: bool) -> None:
        self.options, self.schedule, self.pack_wire = options, schedule, pack_wire
        self.node_ids: list[int] | None = None if options.node_ids is None else [int(n) for n in options.node_ids]
        self.best: BestModel | None = None
        self.arrays: ArrayRecord | None = None  # the model of the evaluation in progress

    def due(self, server_round: int) -> bool:
        seg = self.schedule.segment_for_round(server_round)
        return server_round % self.options.every == 0 or server_round == seg.last_round

    def messages(
        self, node_ids: Iterable[int], arrays: ArrayRecord, config: Mapping[str, Any], prototypes: np.ndarray | None
    ) -> list[Message]:
        content = EvaluateInstruction(arrays, prototypes, config).to_content(self.pack_wire)
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in node_ids]

    def configure(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        prototypes: np.ndarray | None,
        sample: Sampler,
    ) -> list[Message]:
        if not self.due(server_round):
            return []
        stage = self.schedule.stage_for_round(server_round)
        cfg = ConfigRecord({**dict(config), **round_entries(server_round, stage)})
        if SPLIT not in cfg:
            cfg[SPLIT] = "valid"
        if self.node_ids is not None:
            connected = set(grid.get_node_ids())
            nodes = [n for n in self.node_ids if n in connected]
            if len(nodes) < len(self.node_ids):
                missing = len(self.node_ids) - len(nodes)
                logger.warning("Round %d: %d of the fixed evaluation nodes are not connected", server_round, missing)
        else:
            nodes = sample(server_round, arrays, cfg, grid)
        self.arrays = arrays
        return self.messages(nodes, arrays, cfg, prototypes)

    def metrics(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted means of the replies' metrics (None when every reply failed)."""
        ok: list[EvaluateReply] = []
        failed = 0
        for msg in replies:
            try:
                if msg.has_error():
                    raise MessageError(msg.error.reason)
                ok.append(EvaluateReply.from_content(msg.content))
            except MessageError as exc:
                failed += 1
                node = msg.metadata.src_node_id
                logger.warning("Round %d: evaluation reply from node %d failed: %s", server_round, node, exc)
        if not ok:
            return None
        means, total = weighted_means((r.num_examples, r.metrics) for r in ok)
        metrics = MetricRecord({**means, NUM_EXAMPLES: as_count(total)})
        metrics[names.NUM_REPLIES] = len(ok)
        metrics[names.NUM_FAILED] = failed
        return metrics

    def aggregate(
        self, server_round: int, replies: Iterable[Message], prototypes: np.ndarray | None
    ) -> MetricRecord | None:
        metrics = self.metrics(server_round, replies)
        key = self.options.best_metric
        if metrics is not None and key in metrics and self.arrays is not None:
            value = float(metrics[key])  # type: ignore[arg-type]
            if self.best is None or value > self.best.value:
                kept = None if prototypes is None else prototypes.copy()
                self.best = BestModel(server_round, value, self.arrays, kept)
                logger.info("Round %d: new best %s = %.5f", server_round, key, value)
        return metrics

    def evaluate_all(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        split: str,
        prototypes: np.ndarray | None,
        node_ids: Iterable[int] | None,
        config: Mapping[str, Any] | None,
        timeout: float,
    ) -> MetricRecord | None:
        nodes = list(grid.get_node_ids()) if node_ids is None else list(node_ids)
        messages = self.messages(nodes, arrays, {**dict(config or {}), SPLIT: split}, prototypes)
        return self.metrics(0, grid.send_and_receive(messages, timeout=timeout))
