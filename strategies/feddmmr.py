"""FedDMMR server strategy: a stock Flower aggregation + stages + prototypes + reply checks.

Why a wrapper and not a FedAvg subclass: the base strategy (FedAvg, FedAdam, ...) must only
ever see the tensors that are trainable in the current stage, because

* clients reply with the trainable subset only, while ``Strategy.start()`` replaces the
  global arrays with whatever ``aggregate_train`` returns -> we overlay the aggregated
  subset on the full model;
* FedOpt/FedAvgM keep server optimiser state (``current_arrays``, ``m_t``, ``v_t``,
  momentum) keyed by tensor name and fail when the key sets differ -> the base sees the subset
  only and is re-created (fresh optimiser state) at each stage change (``BaseAggregation``);
* stock ``validate_message_reply_consistency`` stops the whole run (exit code) when a reply
  carries a second ArrayRecord ("prototypes") or different metric keys -> replies are checked
  here (``feddmmr_flower.replies``), and the base only gets clean updates.

One round is ``configure_train`` -> a collector (``collect.py``: plain or SecAgg+) ->
``aggregate_round``; ``aggregate_train`` is the same with the plain collector's reading, so
Flower's ``Strategy.start()`` drives this strategy too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddmmr_flower import run_record as names
from feddmmr_flower.replies import (
    Accepted,
    Expected,
    NodeOutcome,
    RoundReplies,
    WeightedUpdate,
    as_count,
    drop_norm_outliers,
    in_partition_order,
    weighted_means,
)
from feddmmr_flower.stages import STAGES, StageSchedule, StageSegment
from feddmmr_wire import TrainInstruction, from_array, round_entries, to_array
from feddmmr_wire.keys import NUM_EXAMPLES

from .base import BaseAggregation
from .collect import read_train_replies
from .dp import PrivacyHook, Release
from .evaluate import Evaluation, EvaluationOptions
from .prototypes import PrototypeOptions, merge_prototypes, prototype_payload

logger = logging.getLogger("flwr.feddmmr")

Outcome = TypeVar("Outcome", Accepted, NodeOutcome)
#: stage -> names of the arrays trained in it (a callable or a dict).
TrainableNames = Callable[[str], Iterable[str]] | Mapping[str, Iterable[str]]


@dataclass
class TrainRound:
    """The round in progress, from ``configure_train`` on: what was sent and what replies must hold."""

    server_round: int
    segment: StageSegment
    names: list[str]
    expected: Expected
    instructions: list[Message]
    global_arrays: ArrayRecord
    left_out: int = 0  # connected nodes not drawn: they said they have nothing to train


class FedDMMRStrategy(Strategy):
    """Stage-aware FedDMMR strategy around one of Flower's stock strategies.

    schedule: "pretrain:40,align:10,finetune:40" or a StageSchedule; rounds beyond it fail.
    base, base_kwargs: a stock strategy name (``strategies.base.BASE_STRATEGIES``) and its keyword
        arguments (fraction_train, min_available_nodes, eta, ...), or an un-started instance; or a
        ``BaseAggregation`` (a subclass replaces the server update step, e.g. a per-row one).
    trainable_names: stage -> array names trained in it; None = every global array.
    prototypes: ``PrototypeOptions``; evaluation: ``EvaluationOptions``.
    norm_outlier_factor: reject updates with a norm >= factor x the round's median; None disables.
    privacy: the server side of a DP mode (``strategies.dp``), or None.
    pack_wire: send the model packed into one array (``feddmmr_wire.packing``).
    """

    def __init__(
        self,
        *,
        schedule: str | StageSchedule,
        base: str | Strategy | BaseAggregation = "fedavg",
        base_kwargs: Mapping[str, Any] | None = None,
        trainable_names: TrainableNames | None = None,
        prototypes: PrototypeOptions | None = None,
        evaluation: EvaluationOptions | None = None,
        norm_outlier_factor: float | None = 100.0,
        privacy: PrivacyHook | None = None,
        pack_wire: bool = False,
    ) -> None:
        self.schedule = schedule if isinstance(schedule, StageSchedule) else StageSchedule.parse(schedule)
        if isinstance(base, BaseAggregation):
            self.aggregation = base
        else:
            self.aggregation = BaseAggregation(base, **dict(base_kwargs or {}))
        self.trainable_names = trainable_names
        self.prototype_options = prototypes or PrototypeOptions()
        self.norm_outlier_factor = norm_outlier_factor
        self.privacy = privacy
        self.pack_wire = pack_wire
        self.evaluation = Evaluation(evaluation or EvaluationOptions(), self.schedule, pack_wire)
        self.prototypes: np.ndarray | None = None
        # Per-round records, keyed by server round.
        self.rejected: dict[int, list[dict[str, Any]]] = {}
        self.failed: dict[int, list[dict[str, Any]]] = {}
        self.skipped: dict[int, list[dict[str, Any]]] = {}
        self.prototype_rejected: dict[int, list[dict[str, Any]]] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id (from replies)
        # node id -> why it cannot train (its own "nothing to train" reply): never sampled for training again
        self.nothing_to_train: dict[int, str] = {}
        self.round: TrainRound | None = None

    # ------------------------------------------------------------------ stages
    def stage_for_round(self, server_round: int) -> str:
        return self.schedule.stage_for_round(server_round)

    def trainable_for(self, stage: str, arrays: ArrayRecord) -> list[str]:
        """Names trained in ``stage``, in the global arrays' order; unknown names fail."""
        if self.trainable_names is None:
            return list(arrays.keys())
        if isinstance(self.trainable_names, Mapping):
            if stage not in self.trainable_names:
                raise ValueError(f"trainable_names has no entry for stage {stage!r}")
            wanted = set(self.trainable_names[stage])
        else:
            wanted = set(self.trainable_names(stage))
        if unknown := sorted(wanted - set(arrays.keys())):
            raise ValueError(f"trainable names of stage {stage!r} not in the global arrays: {unknown[:5]}")
        if not wanted:
            raise ValueError(f"stage {stage!r} has no trainable arrays")
        return [k for k in arrays.keys() if k in wanted]

    # ---------------------------------------------------------------- messages
    def prototype_payload(self, prototypes: np.ndarray | None = None) -> np.ndarray | None:
        """The global prototypes to send (``prototypes``: others than the current ones)."""
        return prototype_payload(self.prototype_options, self.prototypes if prototypes is None else prototypes)

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Per-round train config: the run's entries + the round's (never mutates start()'s config)."""
        seg = self.schedule.segment_for_round(server_round)
        stage_round = server_round - seg.first_round + 1
        return ConfigRecord({**dict(config), **round_entries(server_round, seg.stage, stage_round)})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the base (it sees the trainable subset; nodes with nothing to train are left
        out), send the full model."""
        seg = self.schedule.segment_for_round(server_round)
        trained = self.trainable_for(seg.stage, arrays)
        if self.aggregation.start_segment((seg.index, tuple(trained))):
            logger.info(
                "FedDMMR stage %r (rounds %d-%d): %d trainable arrays, fresh %s state",
                seg.stage,
                seg.first_round,
                seg.last_round,
                len(trained),
                self.aggregation.name,
            )
        subset = ArrayRecord({n: arrays[n] for n in trained})
        round_cfg = self.round_config(server_round, config)
        sample = self.aggregation.sample_train(server_round, subset, round_cfg, grid, self.nothing_to_train)
        nodes, cfg = sample.nodes, sample.config
        content = TrainInstruction(arrays, self.prototype_payload(), cfg).to_content(self.pack_wire)
        instructions = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        reference = {n: from_array(arrays[n]).astype(np.float64) for n in trained}
        expected = Expected(tuple(trained), reference, self.prototype_options.dim)
        self.round = TrainRound(server_round, seg, trained, expected, instructions, arrays, sample.left_out)
        return instructions

    # --------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's API: check the plain replies (``collect.read_train_replies``), then ``aggregate_round``."""
        current = self._current(server_round)
        return self.aggregate_round(server_round, read_train_replies(current.instructions, replies, current.expected))

    def _current(self, server_round: int) -> TrainRound:
        if self.round is None or self.round.server_round != server_round:
            raise RuntimeError(f"configure_train must run for round {server_round} before its aggregation")
        return self.round

    def aggregate_round(self, server_round: int, replies: RoundReplies) -> tuple[ArrayRecord, MetricRecord]:
        """A collector's ``RoundReplies`` -> (the FULL new model, the round's train metrics)."""
        current = self._current(server_round)
        for table in (self.rejected, self.failed, self.skipped):
            table[server_round] = []
        for outcome in replies.failed:
            self._record(self.failed, server_round, outcome, "failed")
        for outcome in replies.rejected:
            self._record(self.rejected, server_round, outcome, "rejected")
        self._record_skipped(server_round, replies.skipped)
        accepted = in_partition_order(self._with_partition(a) for a in replies.accepted)
        if replies.mean is None:
            accepted, outliers = drop_norm_outliers(accepted, self.norm_outlier_factor)
            for outcome in outliers:
                self._record(self.rejected, server_round, outcome, "rejected")
        arrays = current.global_arrays
        if accepted:
            new = self._server_update(server_round, current, accepted, replies)
            if new is not None:
                arrays = self._overlay(current.global_arrays, new)
            self._aggregate_prototypes(server_round, accepted)
        else:
            fault = self.rejected[server_round] or self.failed[server_round]  # else: only skips, or no one drawn
            level = logging.WARNING if fault else logging.INFO
            logger.log(level, "Round %d: no usable train reply, global model unchanged", server_round)
        return arrays, self.round_metrics(server_round, accepted, replies.metrics)

    def _with_partition(self, item: Outcome) -> Outcome:
        """Learn node -> partition from replies that say it; name the partition of those that do not."""
        if item.partition_id is not None:
            self.partition_of[item.node_id] = item.partition_id
            return item
        known = self.partition_of.get(item.node_id)
        if isinstance(item, Accepted):
            item.partition_id = known
            return item
        return NodeOutcome(item.node_id, known, item.reason)

    def _record(self, table: dict[int, list[dict[str, Any]]], server_round: int, outcome: NodeOutcome, what: str):
        outcome = self._with_partition(outcome)
        table.setdefault(server_round, []).append(outcome.as_record())
        logger.warning(
            "Round %d: %s reply from node %d (partition-id %s): %s",
            server_round,
            what,
            outcome.node_id,
            outcome.partition_id,
            outcome.reason,
        )

    def _record_skipped(self, server_round: int, skipped: list[NodeOutcome]) -> None:
        """Nodes with nothing to train: recorded, logged once per round (INFO: not a fault), and left
        out of training from now on (they still evaluate)."""
        for outcome in skipped:
            outcome = self._with_partition(outcome)
            self.skipped[server_round].append(outcome.as_record())
            self.nothing_to_train[outcome.node_id] = outcome.reason
        if pids := sorted(str(r["partition_id"]) for r in self.skipped[server_round]):
            shown = ", ".join(pids[:10]) + (", ..." if len(pids) > 10 else "")
            what = "nothing to train: skipped, left out of training from now on"
            logger.info("Round %d: %d node(s) (partition-ids %s) had %s", server_round, len(pids), shown, what)

    def _server_update(
        self, server_round: int, current: TrainRound, accepted: list[Accepted], replies: RoundReplies
    ) -> dict[str, np.ndarray] | None:
        """The accepted updates (or their mean) through the privacy hook and the base strategy."""
        if replies.mean is not None:
            total = float(sum(a.weight for a in accepted))
            updates = [WeightedUpdate(accepted[0].node_id, total, {n: replies.mean[n] for n in current.names})]
        else:
            updates = [WeightedUpdate(a.node_id, a.weight, {n: a.arrays[n] for n in current.names}) for a in accepted]  # type: ignore[index]
        if self.privacy is not None:
            present = {n: from_array(current.global_arrays[n]) for n in current.names}
            nodes = [a.node_id for a in accepted]
            release = Release(server_round, nodes, updates, present, replies.sampled, current.left_out)
            updates = self.privacy.before_aggregation(release)
            if not updates:
                return None
        return self.aggregation.aggregate(server_round, updates)

    @staticmethod
    def _overlay(full: ArrayRecord, trained: dict[str, np.ndarray]) -> ArrayRecord:
        """The full model with the new trained tensors put in (the global dtypes kept)."""
        out = ArrayRecord()
        for name, array in full.items():
            if name in trained:
                dtype = np.dtype(array.dtype) if array.dtype else np.float32
                out[name] = to_array(np.asarray(trained[name], dtype=dtype))
            else:
                out[name] = array
        return out

    def _aggregate_prototypes(self, server_round: int, accepted: list[Accepted]) -> None:
        self.prototypes, ignored = merge_prototypes(self.prototype_options, self.prototypes, accepted)
        for outcome in ignored:
            self._record(self.prototype_rejected, server_round, outcome, "partly used")

    def round_metrics(self, server_round: int, accepted: list[Accepted], extra: Mapping[str, float]) -> MetricRecord:
        """A round's train metrics: the clients' weighted means plus what the server saw of the round."""
        means, total = weighted_means((a.weight, a.metrics) for a in accepted)
        metrics = MetricRecord({**means, NUM_EXAMPLES: as_count(total)})
        metrics[names.NUM_ACCEPTED] = len(accepted)
        metrics[names.NUM_REJECTED] = len(self.rejected[server_round])
        metrics[names.NUM_FAILED] = len(self.failed[server_round])
        metrics[names.NUM_SKIPPED] = len(self.skipped[server_round])
        metrics[names.NUM_LEFT_OUT] = self._current(server_round).left_out
        metrics[names.NUM_PROTOTYPES] = 0 if self.prototypes is None else int(self.prototypes.shape[0])
        metrics[names.STAGE_INDEX] = STAGES.index(self.stage_for_round(server_round))
        if accepted:
            seconds = [float(a.metrics.get(names.CLIENT_TRAIN_SECONDS, 0.0)) for a in accepted]
            metrics[names.TOTAL_CLIENT_TRAIN_SECONDS] = float(sum(seconds))
        if self.privacy is not None:
            metrics.update(self.privacy.metrics())
        metrics.update(dict(extra))
        norms = [a.update_norm for a in accepted if not np.isnan(a.update_norm)]
        if norms:
            metrics[names.UPDATE_NORM_MEDIAN] = float(np.median(norms))
        return metrics

    # ---------------------------------------------------------------- evaluate
    @property
    def evaluate_node_ids(self) -> list[int] | None:
        return self.evaluation.node_ids

    @evaluate_node_ids.setter
    def evaluate_node_ids(self, node_ids: Iterable[int] | None) -> None:
        self.evaluation.node_ids = None if node_ids is None else [int(n) for n in node_ids]

    @property
    def best(self):  # noqa: ANN201 - BestModel | None
        return self.evaluation.best

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate every ``evaluation.every`` rounds on the fixed nodes (or the base's sample)."""
        return self.evaluation.configure(
            server_round, arrays, config, grid, self.prototype_payload(), self.aggregation.sample_evaluate
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the client metrics; remembers the best global model."""
        return self.evaluation.aggregate(server_round, replies, self.prototypes)

    def evaluate_all(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        *,
        split: str = "test",
        prototypes: np.ndarray | None = None,
        node_ids: Iterable[int] | None = None,
        config: Mapping[str, Any] | None = None,
        timeout: float = 3600,
    ) -> MetricRecord | None:
        """One federated evaluation outside ``start()`` (e.g. test split, best model, all nodes)."""
        payload = self.prototype_payload(prototypes)
        return self.evaluation.evaluate_all(grid, arrays, split, payload, node_ids, config, timeout)

    # -------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed run needs: server-optimiser state, prototypes, best model (picklable)."""
        return {
            "aggregation": self.aggregation.state_dict(),
            "prototypes": self.prototypes,
            "best": self.evaluation.best,
            "privacy": None if self.privacy is None else self.privacy.state_dict(),
            "partition_of": dict(self.partition_of),  # so a node that dies before replying is named
            "nothing_to_train": dict(self.nothing_to_train),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.aggregation.load_state_dict(state["aggregation"])
        self.prototypes, self.evaluation.best = state["prototypes"], state["best"]
        self.partition_of.update(state.get("partition_of", {}))
        self.nothing_to_train.update(state.get("nothing_to_train", {}))
        if state.get("privacy") is not None and self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])

    def summary(self) -> None:
        """Log the FedDMMR settings, then the base strategy's."""
        options = self.prototype_options
        logger.info(
            "\t├──> FedDMMR: stages %s (%d rounds), base %s",
            self.schedule,
            self.schedule.total_rounds,
            self.aggregation.name,
        )
        logger.info(
            "\t│\t├── prototypes: K=%d, ema=%g, metric=%s, seed=%d",
            options.num,
            options.ema,
            options.metric,
            options.seed,
        )
        fixed = self.evaluation.node_ids
        logger.info(
            "\t│\t└── norm outlier factor: %s, evaluate every %d round(s) on %s",
            self.norm_outlier_factor,
            self.evaluation.options.every,
            "sampled nodes" if fixed is None else f"{len(fixed)} fixed nodes",
        )
        self.aggregation.summary()
