"""FedDMMR server strategy: a stock Flower aggregation + stages + prototypes + reply checks.

Why a wrapper and not a FedAvg subclass: the base strategy (FedAvg, FedAdam, ...) must only
ever see the tensors that are trainable in the current stage, because

* clients reply with the trainable subset only, while ``Strategy.start()`` replaces the
  global arrays with whatever ``aggregate_train`` returns -> we overlay the aggregated
  subset on the full model;
* FedOpt/FedAvgM keep server optimiser state (``current_arrays``, ``m_t``, ``v_t``,
  momentum) keyed by tensor name and fail when the key sets differ -> the base is handed
  the subset in ``configure_train`` and only accepted subset replies in
  ``aggregate_train``; it is re-created (fresh optimiser state) at each stage change;
* stock ``validate_message_reply_consistency`` stops the whole run (exit code) when a
  reply carries a second ArrayRecord ("prototypes") or different metric keys -> replies
  are validated here, and the base gets clean copies {"arrays", "metrics": num-examples}.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from client_app.wire import PACKED, from_array, pack_content, read_arrays, to_array, to_numpy, to_record
from feddmmr_flower.packing import pack, unpack
from feddmmr_flower.prototype_aggregation import Metric, aggregate_prototypes
from feddmmr_flower.stages import STAGES, StageSchedule, StageSegment

from .base import make_base_strategy

logger = logging.getLogger("flwr.feddmmr")

#: stage -> names of the arrays trained in it (a callable or a dict).
TrainableNames = Callable[[str], Iterable[str]] | Mapping[str, Iterable[str]]
ConfigValues = Mapping[str, Any]


@dataclass
class BestModel:
    """Global model with the best validation metric seen so far."""

    server_round: int
    value: float
    arrays: ArrayRecord
    prototypes: np.ndarray | None


@dataclass
class _Candidate:
    """A train reply that passed the per-reply checks."""

    msg: Message
    node_id: int
    partition_id: int | None
    num_examples: float
    arrays: dict[str, np.ndarray]  # the trainable arrays it sent (read once from the wire)
    metrics: MetricRecord
    update_norm: float
    prototypes: tuple[np.ndarray, np.ndarray] | None


def weighted_metrics(
    records: list[MetricRecord],
    weight_key: str = "num-examples",
    exclude: Iterable[str] = ("partition-id",),
) -> MetricRecord:
    """Mean of each metric over the records that have it, weighted by ``weight_key``.

    Unlike Flower's ``aggregate_metricrecords`` it tolerates records with different keys
    and does not average ids (``partition-id``). The output's ``weight_key`` is the total.
    """
    skip = set(exclude) | {weight_key}
    sums: dict[str, Any] = {}
    totals: dict[str, float] = {}
    bad: set[str] = set()
    total = 0.0
    for rec in records:
        w = float(rec.get(weight_key, 0) or 0)
        if not w > 0:
            continue
        total += w
        for k, v in rec.items():
            if k in skip or k in bad:
                continue
            val = np.asarray(v, dtype=np.float64)
            if k in sums and np.shape(sums[k]) != val.shape:
                bad.add(k)  # lists of different lengths cannot be averaged
                continue
            sums[k] = sums.get(k, 0.0) + w * val
            totals[k] = totals.get(k, 0.0) + w
    out = MetricRecord()
    for k, s in sums.items():
        if k not in bad:
            mean = s / totals[k]
            out[k] = [float(x) for x in mean] if np.ndim(mean) else float(mean)
    out[weight_key] = int(total) if float(total).is_integer() else total
    return out


class FedDMMRStrategy(Strategy):
    """Stage-aware FedDMMR strategy wrapping one of Flower's stock strategies.

    Parameters (all keyword-only)
    ----------
    schedule: "pretrain:40,align:10,finetune:40" or a StageSchedule; rounds beyond it fail.
    base: stock strategy name (see ``strategies.base.BASE_STRATEGIES``) or an un-started
        strategy instance (deep-copied as a template: a fresh copy per stage).
    base_kwargs: keyword arguments for ``make_base_strategy`` (fraction_train,
        min_available_nodes, eta, ...), only with a name.
    trainable_names: stage -> array names trained in it; None = every global array.
    stage_config: per-stage config entries, e.g. {"align": {"lr": 1e-3}}.
    round_config_fn: (server_round, stage) -> extra config entries (e.g. an lr decay).
    num_prototypes, prototype_ema, prototype_metric, prototype_seed, prototype_dim,
        initial_prototypes: see ``feddmmr_flower.prototype_aggregation.aggregate_prototypes``.
    norm_outlier_factor: reject replies with ||client - global|| >= factor x the round's
        median (needs >= 3 replies and a median > 0); None disables.
    evaluate_node_ids: fixed node ids for federated evaluation (else the base samples).
    evaluate_every: evaluate every N rounds and on the last round of each stage.
    evaluate_split: "split" put in the evaluate config unless it already has one.
    best_metric: validation metric to keep the best global model for (higher is better).
    pre_aggregate: (round, accepted replies, current trainable arrays, number sampled) -> the
        replies the base aggregates (e.g. ``strategies.dp``: one clipped, noised mean); may have
        ``metrics()``, ``state_dict()``/``load_state_dict()``.
    """

    def __init__(
        self,
        *,
        schedule: str | StageSchedule,
        base: str | Strategy = "fedavg",
        base_kwargs: Mapping[str, Any] | None = None,
        trainable_names: TrainableNames | None = None,
        stage_config: Mapping[str, ConfigValues] | None = None,
        round_config_fn: Callable[[int, str], ConfigValues] | None = None,
        num_prototypes: int = 5,
        prototype_ema: float = 0.5,
        prototype_metric: Metric = "cosine",
        prototype_seed: int = 0,
        prototype_dim: int | None = None,
        initial_prototypes: np.ndarray | None = None,
        norm_outlier_factor: float | None = 100.0,
        evaluate_node_ids: Iterable[int] | None = None,
        evaluate_every: int = 1,
        evaluate_split: str = "valid",
        best_metric: str | None = "NDCG@10",
        weighted_by_key: str = "num-examples",
        pre_aggregate: Callable[[int, list[Message], ArrayRecord, int], list[Message]] | None = None,
        pack_arrays: bool = False,
    ) -> None:
        self.schedule = schedule if isinstance(schedule, StageSchedule) else StageSchedule.parse(schedule)
        if isinstance(base, str):
            self._template: Strategy = make_base_strategy(base, **dict(base_kwargs or {}))
        elif base_kwargs:
            raise ValueError("base_kwargs only apply when base is given by name")
        else:
            self._template = copy.deepcopy(base)
        if stage_config and (unknown := set(stage_config) - set(STAGES)):
            raise ValueError(f"stage_config has unknown stages {sorted(unknown)}")
        if evaluate_every < 1:
            raise ValueError("evaluate_every must be >= 1")
        self.trainable_names = trainable_names
        self.stage_config = {k: dict(v) for k, v in (stage_config or {}).items()}
        self.round_config_fn = round_config_fn
        self.num_prototypes = num_prototypes
        self.prototype_ema = prototype_ema
        self.prototype_metric: Metric = prototype_metric
        self.prototype_seed = prototype_seed
        self.prototype_dim = prototype_dim
        self.norm_outlier_factor = norm_outlier_factor
        self.evaluate_node_ids = None if evaluate_node_ids is None else [int(n) for n in evaluate_node_ids]
        self.evaluate_every = evaluate_every
        self.evaluate_split = evaluate_split
        self.best_metric = best_metric
        self.weighted_by_key = weighted_by_key
        self.pre_aggregate = pre_aggregate
        self.pack_arrays = pack_arrays  # one array on the wire instead of one per tensor (client_app/wire.py)
        self._pack_base, self._base_layout = False, ""  # see configure_train

        self.prototypes: np.ndarray | None = (
            None if initial_prototypes is None else np.asarray(initial_prototypes, np.float32)
        )
        self.base: Strategy = copy.deepcopy(self._template)
        self._base_key: tuple[int, tuple[str, ...]] | None = None
        self._base_step = 0  # aggregations done by the current base (its Adam "t")
        # Per-round records, keyed by server round.
        self.rejected: dict[int, list[dict[str, Any]]] = {}
        self.failed: dict[int, list[dict[str, Any]]] = {}
        self.prototype_rejected: dict[int, list[dict[str, Any]]] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id (from replies)
        self.best: BestModel | None = None
        # State of the round in progress.
        self._global: ArrayRecord | None = None
        self._names: list[str] = []
        self._sent: list[Message] = []
        self._eval_arrays: ArrayRecord | None = None

    # ------------------------------------------------------------------ stages
    def stage_for_round(self, server_round: int) -> str:
        return self.schedule.stage_for_round(server_round)

    @property
    def stage_boundaries(self) -> list[StageSegment]:
        return self.schedule.boundaries

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

    def _enter(self, segment: StageSegment, names: list[str]) -> None:
        """Fresh base strategy (server optimiser state) when the stage segment changes."""
        key = (segment.index, tuple(names))
        if key != self._base_key:
            self.base = copy.deepcopy(self._template)
            self._base_key, self._base_step = key, 0
            logger.info(
                "FedDMMR stage %r (rounds %d-%d): %d trainable arrays, fresh %s state",
                segment.stage,
                segment.first_round,
                segment.last_round,
                len(names),
                type(self.base).__name__,
            )

    # ---------------------------------------------------------------- messages
    def prototype_record(self, prototypes: np.ndarray | None = None) -> ArrayRecord:
        """{"centroids": [K, P] float32}; [0, P] or no key while none exist."""
        g = self.prototypes if prototypes is None else prototypes
        if g is not None:
            return ArrayRecord({"centroids": Array(np.ascontiguousarray(g, dtype=np.float32))})
        if self.prototype_dim:
            return ArrayRecord({"centroids": Array(np.zeros((0, self.prototype_dim), np.float32))})
        return ArrayRecord()

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Per-round train config: base config + stage entries + round entries."""
        seg = self.schedule.segment_for_round(server_round)
        cfg = ConfigRecord(dict(config))  # never mutate start()'s shared train_config
        cfg.update(self.stage_config.get(seg.stage, {}))
        if self.round_config_fn is not None:
            cfg.update(dict(self.round_config_fn(server_round, seg.stage)))
        cfg["server-round"] = server_round
        cfg["stage"] = seg.stage
        cfg["stage-round"] = server_round - seg.first_round + 1
        return cfg

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the base (it sees the trainable subset), send the full model."""
        seg = self.schedule.segment_for_round(server_round)
        names = self.trainable_for(seg.stage, arrays)
        self._enter(seg, names)
        self._global, self._names = arrays, names
        cfg = self.round_config(server_round, config)
        subset = ArrayRecord({n: arrays[n] for n in names})
        # The base sees the trainable arrays as ONE vector when nothing hooks in between (no DP, no
        # SecAgg+): every base strategy here is elementwise, so this is exact, and Flower's
        # per-array work (Array.numpy per array and reply) drops out of aggregation.
        self._pack_base = self.pack_arrays and self.pre_aggregate is None
        if self._pack_base:
            flat, self._base_layout = pack(to_numpy(subset))
            subset = ArrayRecord({PACKED: to_array(flat)})
        sampled = list(self.base.configure_train(server_round, subset, cfg, grid))
        if sampled:  # the base may have added entries (FedProx: "proximal-mu")
            cfg = sampled[0].content.config_records.get("config", cfg)
        content = self._wire(RecordDict({"arrays": arrays, "prototypes": self.prototype_record(), "config": cfg}))
        self._sent = [
            Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type) for m in sampled
        ]
        return self._sent

    # --------------------------------------------------------------- aggregate
    def _record(
        self,
        table: dict[int, list[dict[str, Any]]],
        server_round: int,
        node_id: int,
        partition_id: int | None,
        reason: str,
        what: str,
    ) -> None:
        table.setdefault(server_round, []).append({"node_id": node_id, "partition_id": partition_id, "reason": reason})
        logger.warning(
            "Round %d: %s reply from node %d (partition-id %s): %s",
            server_round,
            what,
            node_id,
            partition_id,
            reason,
        )

    def _check_reply(
        self, msg: Message, node_id: int, global_np: dict[str, np.ndarray], arrays: dict[str, np.ndarray] | None
    ) -> tuple[_Candidate | None, int | None, str | None]:
        """Validate one train reply (``arrays``: its model arrays, None if it has none) -> (candidate,
        partition id, reason if rejected)."""
        content = msg.content
        metrics = content.metric_records.get("metrics")
        if metrics is None and len(content.metric_records) == 1:
            metrics = next(iter(content.metric_records.values()))
        pid = None
        if metrics is not None and isinstance(metrics.get("partition-id"), int | float):
            pid = int(metrics["partition-id"])
            self.partition_of[node_id] = pid
        pid = self.partition_of.get(node_id, pid)
        if metrics is None:
            return None, pid, "no 'metrics' MetricRecord"
        n = metrics.get(self.weighted_by_key)
        if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
            return None, pid, f"'{self.weighted_by_key}' missing or not > 0: {n!r}"
        if arrays is None:
            return None, pid, "no 'arrays' ArrayRecord"
        got, want = set(arrays.keys()), set(self._names)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            return (
                None,
                pid,
                (f"unexpected key set: {len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}"),
            )
        sq = 0.0
        for name in self._names:
            g = global_np[name]
            if tuple(arrays[name].shape) != g.shape:
                return None, pid, f"wrong shape for {name!r}: {tuple(arrays[name].shape)} != {g.shape}"
            a = arrays[name]
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                return None, pid, f"NaN/Inf in {name!r}"
            sq += float(np.sum((a.astype(np.float64) - g) ** 2))
        protos = None
        proto_rec = content.array_records.get("prototypes")
        if proto_rec is not None and "centroids" in proto_rec:
            c = from_array(proto_rec["centroids"])
            s = from_array(proto_rec["sizes"]) if "sizes" in proto_rec else np.zeros(0)
            if not (np.isfinite(c).all() and np.isfinite(s.astype(np.float64)).all()):
                return None, pid, "NaN/Inf in prototypes"
            protos = (c, s)
        return _Candidate(msg, node_id, pid, float(n), arrays, metrics, math.sqrt(sq), protos), pid, None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate the accepted subsets with the base, return the FULL model."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        replies = list(replies)
        self.rejected[server_round], self.failed[server_round] = [], []
        # Error replies may carry the SuperLink as source: map them back via our message ids.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        answered = {m.metadata.reply_to_message_id for m in replies}
        global_np = {n: from_array(self._global[n]).astype(np.float64) for n in self._names}

        candidates: list[_Candidate] = []
        for msg in replies:
            node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self._record(
                    self.failed,
                    server_round,
                    node,
                    self.partition_of.get(node),
                    f"error reply (code {msg.error.code}): {msg.error.reason}",
                    "failed",
                )
                continue
            try:  # packed or not, read once: the checks and the base use these numpy arrays
                arrays = read_arrays(msg.content) if "arrays" in msg.content.array_records else None
            except (ValueError, KeyError) as exc:
                self._record(self.rejected, server_round, node, self.partition_of.get(node), str(exc), "rejected")
                continue
            cand, pid, reason = self._check_reply(msg, node, global_np, arrays)
            if cand is None:
                self._record(self.rejected, server_round, node, pid, str(reason), "rejected")
            else:
                candidates.append(cand)
        for mid, node in sent_to.items():
            if mid not in answered:
                self._record(
                    self.failed,
                    server_round,
                    node,
                    self.partition_of.get(node),
                    "no reply before the timeout",
                    "failed",
                )

        # Replies arrive in any order; aggregate in partition order so that a deployment and a
        # simulation of the same run compute the same sums (and the same prototype clustering).
        candidates.sort(key=lambda c: (-1 if c.partition_id is None else int(c.partition_id), c.node_id))
        accepted = self._drop_norm_outliers(server_round, candidates)
        arrays = self._global
        if accepted:
            aggregated = self._base_aggregate(server_round, accepted)
            if aggregated is not None:
                arrays = self._overlay(aggregated, global_np)
            self._aggregate_prototypes(server_round, accepted)
        else:
            logger.warning("Round %d: no usable train reply, global model unchanged", server_round)

        metrics = self.round_metrics(server_round, accepted)
        if accepted:
            metrics["update-norm-median"] = float(np.median([c.update_norm for c in accepted]))
        return arrays, metrics

    def round_metrics(self, server_round: int, accepted: list[_Candidate]) -> MetricRecord:
        """A round's train metrics: the clients' weighted means plus what the server saw of the round."""
        metrics = weighted_metrics([c.metrics for c in accepted], self.weighted_by_key)
        metrics["num-accepted"] = len(accepted)
        metrics["num-rejected"] = len(self.rejected[server_round])
        metrics["num-failed"] = len(self.failed[server_round])
        metrics["num-prototypes"] = 0 if self.prototypes is None else int(self.prototypes.shape[0])
        metrics["stage-index"] = STAGES.index(self.stage_for_round(server_round))
        if accepted:
            seconds = [float(c.metrics.get("client-train-seconds", 0.0)) for c in accepted]  # type: ignore[arg-type]
            metrics["total-client-train-seconds"] = float(sum(seconds))
        if self.pre_aggregate is not None and hasattr(self.pre_aggregate, "metrics"):
            metrics.update(self.pre_aggregate.metrics())
        return metrics

    def _drop_norm_outliers(self, server_round: int, cands: list[_Candidate]) -> list[_Candidate]:
        if self.norm_outlier_factor is None or len(cands) < 3:
            return cands
        median = float(np.median([c.update_norm for c in cands]))
        if median <= 0:
            return cands
        limit = self.norm_outlier_factor * median
        keep = []
        for c in cands:
            if c.update_norm >= limit:
                reason = f"update norm {c.update_norm:.4g} >= {self.norm_outlier_factor:g} x median {median:.4g}"
                self._record(self.rejected, server_round, c.node_id, c.partition_id, reason, "rejected")
            else:
                keep.append(c)
        return keep

    def _base_aggregate(self, server_round: int, accepted: list[_Candidate]) -> ArrayRecord | None:
        """Run the base on clean copies: only the subset and the weight, same metadata."""
        clean = []
        for c in accepted:
            m = copy.copy(c.msg)  # shares metadata; content replaced on the copy only
            subset = {n: c.arrays[n] for n in self._names}
            arrays = ArrayRecord({PACKED: to_array(pack(subset)[0])}) if self._pack_base else to_record(subset)
            m.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({self.weighted_by_key: c.num_examples})})
            clean.append(m)
        if self.pre_aggregate is not None:
            current = ArrayRecord({n: self._global[n] for n in self._names})  # type: ignore[index]
            clean = self.pre_aggregate(server_round, clean, current, len(self._sent))
            if not clean:
                return None
        self._base_step += 1
        try:
            aggregated, _ = self.base.aggregate_train(self._base_step, clean)
        except (AggregationError, InconsistentMessageReplies) as exc:
            logger.error("Round %d: base aggregation failed (%s); global model unchanged", server_round, exc)
            return None
        if self._pack_base and aggregated is not None:
            aggregated = to_record(unpack(from_array(aggregated[PACKED]), self._base_layout))
        return aggregated

    def _overlay(self, aggregated: ArrayRecord, global_np: dict[str, np.ndarray]) -> ArrayRecord:
        """Full global model with the aggregated trainable arrays put in (global dtypes kept)."""
        assert self._global is not None
        out = ArrayRecord()
        for name, arr in self._global.items():
            if name in global_np and name in aggregated:
                dtype = np.dtype(arr.dtype) if arr.dtype else np.float32
                out[name] = to_array(np.asarray(from_array(aggregated[name]), dtype=dtype))
            else:
                out[name] = arr
        return out

    def _aggregate_prototypes(self, server_round: int, accepted: list[_Candidate]) -> None:
        with_protos = [c for c in accepted if c.prototypes is not None]
        if not with_protos:
            return
        res = aggregate_prototypes(
            self.prototypes,
            [c.prototypes for c in with_protos],  # type: ignore[misc]
            num_prototypes=self.num_prototypes,
            ema=self.prototype_ema,
            metric=self.prototype_metric,
            seed=self.prototype_seed,
            dim=self.prototype_dim,
        )
        for i, reason in res.rejected:
            c = with_protos[i]
            self._record(
                self.prototype_rejected,
                server_round,
                c.node_id,
                c.partition_id,
                f"prototypes ignored: {reason}",
                "partly used",
            )
        if res.prototypes is not None:
            self.prototypes = res.prototypes

    # ---------------------------------------------------------------- evaluate
    def _evaluate_now(self, server_round: int) -> bool:
        seg = self.schedule.segment_for_round(server_round)
        return server_round % self.evaluate_every == 0 or server_round == seg.last_round

    def _evaluate_messages(
        self,
        node_ids: Iterable[int],
        arrays: ArrayRecord,
        cfg: ConfigRecord,
        prototypes: np.ndarray | None = None,
    ) -> list[Message]:
        protos = self.prototype_record(prototypes)
        content = self._wire(RecordDict({"arrays": arrays, "prototypes": protos, "config": cfg}))
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in node_ids]

    def _wire(self, content: RecordDict) -> RecordDict:
        return pack_content(content) if self.pack_arrays else content

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate every ``evaluate_every`` rounds on the fixed nodes (or the base's sample)."""
        if not self._evaluate_now(server_round):
            return []
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["stage"] = self.stage_for_round(server_round)
        if "split" not in cfg:
            cfg["split"] = self.evaluate_split
        if self.evaluate_node_ids is not None:
            connected = set(grid.get_node_ids())
            nodes = [n for n in self.evaluate_node_ids if n in connected]
            if len(nodes) < len(self.evaluate_node_ids):
                logger.warning(
                    "Round %d: %d of the fixed evaluation nodes are not connected",
                    server_round,
                    len(self.evaluate_node_ids) - len(nodes),
                )
        else:
            sampled = self.base.configure_evaluate(server_round, arrays, cfg, grid)
            nodes = [m.metadata.dst_node_id for m in sampled]
        self._eval_arrays = arrays
        return self._evaluate_messages(nodes, arrays, cfg)

    def _aggregate_eval_replies(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok, failed = [], 0
        for msg in replies:
            if msg.has_error() or not msg.content.metric_records:
                failed += 1
                reason = msg.error.reason if msg.has_error() else "no metrics"
                logger.warning(
                    "Round %d: evaluation reply from node %d failed: %s", server_round, msg.metadata.src_node_id, reason
                )
                continue
            records = msg.content.metric_records
            rec = records.get("metrics") or next(iter(records.values()))
            ok.append(rec)
        if not ok:
            return None
        metrics = weighted_metrics(ok, self.weighted_by_key)
        metrics["num-replies"] = len(ok)
        metrics["num-failed"] = failed
        return metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the client metrics; remembers the best global model."""
        metrics = self._aggregate_eval_replies(server_round, replies)
        key = self.best_metric
        if metrics is not None and key and key in metrics and self._eval_arrays is not None:
            value = float(metrics[key])  # type: ignore[arg-type]
            if self.best is None or value > self.best.value:
                protos = None if self.prototypes is None else self.prototypes.copy()
                self.best = BestModel(server_round, value, self._eval_arrays, protos)
                logger.info("Round %d: new best %s = %.5f", server_round, key, value)
        return metrics

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
        cfg = ConfigRecord({**dict(config or {}), "split": split})
        nodes = list(grid.get_node_ids()) if node_ids is None else list(node_ids)
        messages = self._evaluate_messages(nodes, arrays, cfg, prototypes)
        replies = grid.send_and_receive(messages, timeout=timeout)
        return self._aggregate_eval_replies(0, replies)

    # -------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed run needs: server-optimiser state, prototypes, best model (picklable)."""
        privacy = getattr(self.pre_aggregate, "state_dict", None)
        return {
            "base": self.base,
            "base_key": self._base_key,
            "base_step": self._base_step,
            "prototypes": self.prototypes,
            "best": self.best,
            "privacy": privacy() if privacy else None,
            "partition_of": dict(self.partition_of),
        }  # so a node that dies before replying is named

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.base, self._base_key, self._base_step = state["base"], state["base_key"], state["base_step"]
        self.prototypes, self.best = state["prototypes"], state["best"]
        self.partition_of.update(state.get("partition_of", {}))
        if state.get("privacy") is not None and hasattr(self.pre_aggregate, "load_state_dict"):
            self.pre_aggregate.load_state_dict(state["privacy"])  # type: ignore[union-attr]

    def summary(self) -> None:
        """Log the FedDMMR settings, then the base strategy's."""
        logger.info(
            "\t├──> FedDMMR: stages %s (%d rounds), base %s",
            self.schedule,
            self.schedule.total_rounds,
            type(self._template).__name__,
        )
        logger.info(
            "\t│\t├── prototypes: K=%d, ema=%g, metric=%s, seed=%d",
            self.num_prototypes,
            self.prototype_ema,
            self.prototype_metric,
            self.prototype_seed,
        )
        fixed = self.evaluate_node_ids
        logger.info(
            "\t│\t└── norm outlier factor: %s, evaluate every %d round(s) on %s",
            self.norm_outlier_factor,
            self.evaluate_every,
            "sampled nodes" if fixed is None else f"{len(fixed)} fixed nodes",
        )
        self.base.summary()
