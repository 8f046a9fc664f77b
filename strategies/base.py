"""Flower's stock strategies (FedAvg, FedAdam, ...) as FedDMMR's node sampler and server update step.

FedDMMR adds stages, prototypes and reply checks around one of Flower's message-based strategies.
``BaseAggregation`` is the only place that talks to that strategy, and only the way it expects: it
sees the tensors trained in the current stage, as ONE packed vector when they are all float32
(every base here is elementwise, so this is exact, and Flower's per-array work drops out), the
replies as plain ``Message``s carrying those tensors and their weight, and it is re-created (fresh
server-optimiser state) whenever a stage segment starts.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Collection, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from feddmmr_flower.replies import WeightedUpdate
from feddmmr_wire import from_array, pack, packable, to_array, to_numpy, to_record, unpack
from feddmmr_wire.keys import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PACKED

logger = logging.getLogger("flwr.feddmmr")

#: Run-config name -> Flower 1.41 strategy class (all are FedAvg subclasses).
BASE_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


def accepted_kwargs(cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``kwargs`` into those ``cls.__init__`` accepts and the names it does not.

    One run config carries the knobs of every strategy (eta for FedAdam, server_momentum
    for FedAvgM, ...); each class only gets the ones it understands. ``None`` values
    are dropped so that the class default applies.
    """
    params = inspect.signature(cls.__init__).parameters
    ok = {k: v for k, v in kwargs.items() if k in params and k != "self" and v is not None}
    dropped = sorted(k for k, v in kwargs.items() if k not in params and v is not None)
    return ok, dropped


def make_base_strategy(name: str, **kwargs: Any) -> FedAvg:
    """Build the stock Flower strategy called ``name`` (case-insensitive).

    Keyword arguments the chosen class does not accept are ignored (logged at DEBUG),
    e.g. ``make_base_strategy("fedavg", eta=0.1)`` is plain FedAvg. Typical keys:
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes; eta, eta_l, beta_1, beta_2, tau (FedAdam/FedYogi/FedAdagrad);
    server_learning_rate, server_momentum (FedAvgM); proximal_mu (FedProx);
    beta (FedTrimmedAvg).
    """
    key = name.strip().lower()
    if key not in BASE_STRATEGIES:
        raise ValueError(f"Unknown base strategy {name!r}; choose one of: {', '.join(BASE_STRATEGIES)}")
    cls = BASE_STRATEGIES[key]
    ok, dropped = accepted_kwargs(cls, kwargs)
    if dropped:
        logger.debug("%s ignores keyword arguments: %s", cls.__name__, ", ".join(dropped))
    return cls(**ok)


def reply_message(node_id: int, arrays: ArrayRecord, weight: float) -> Message:
    """A train reply as a Flower strategy reads it (arrays + weight), built with Flower's public constructors."""
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=0.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: weight})})
    return Message(content=content, metadata=metadata)


@dataclass
class TrainSample:
    """A round's sampled nodes, the config with what the base added, and how many connected nodes
    were left out of the draw (they said they have nothing to train)."""

    nodes: list[int]
    config: ConfigRecord
    left_out: int = 0


@dataclass
class _Eligible:
    """The grid as the base's sampler sees it: without the excluded nodes (Flower's samplers only
    call ``get_node_ids``, and call it again while they wait for nodes to connect)."""

    grid: Grid
    exclude: Collection[int]

    def get_node_ids(self) -> list[int]:
        return [n for n in self.grid.get_node_ids() if n not in self.exclude]


@contextmanager
def _minimums_for(base: Strategy, left_out: int, eligible: int) -> Iterator[None]:
    """The base's node minimums over the eligible nodes: ``min_available_nodes`` still counts every
    connected node (``left_out`` of them are not eligible), and at most ``eligible`` can be drawn."""
    saved = {k: getattr(base, k) for k in ("min_available_nodes", "min_train_nodes") if hasattr(base, k)}
    if "min_available_nodes" in saved:
        base.min_available_nodes = max(0, saved["min_available_nodes"] - left_out)  # type: ignore[attr-defined]
    if "min_train_nodes" in saved:
        base.min_train_nodes = min(saved["min_train_nodes"], eligible)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(base, key, value)


class BaseAggregation:
    """A stock Flower strategy (by name, or an un-started instance used as a template) that samples
    each round's nodes and turns the round's updates into the new trained tensors."""

    def __init__(self, base: str | Strategy = "fedavg", **kwargs: Any) -> None:
        if isinstance(base, str):
            self.template: Strategy = make_base_strategy(base, **kwargs)
        elif kwargs:
            raise ValueError("base strategy keyword arguments only apply when the base is given by name")
        else:
            self.template = copy.deepcopy(base)
        self.base: Strategy = copy.deepcopy(self.template)
        self.segment: Hashable | None = None
        self.step = 0  # aggregations done by the current base (its Adam "t")
        self.layout = ""  # the packed vector's layout ("" when the base sees named arrays)

    @property
    def name(self) -> str:
        return type(self.template).__name__

    def start_segment(self, key: Hashable) -> bool:
        """Fresh base (server-optimiser state) when ``key`` (stage segment, trained names) changes."""
        if key == self.segment:
            return False
        self.base = copy.deepcopy(self.template)
        self.segment, self.step = key, 0
        return True

    def _view(self, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        """What the base sees of some trained tensors: one packed vector when possible."""
        if self.layout:
            return ArrayRecord({PACKED: to_array(pack(arrays)[0])})
        return to_record(arrays)

    def sample_train(
        self, server_round: int, current: ArrayRecord, config: ConfigRecord, grid: Grid, exclude: Collection[int] = ()
    ) -> TrainSample:
        """The nodes the base samples (never one in ``exclude``), and the config with what the base
        adds (FedProx: proximal-mu). ``fraction_train`` applies to the nodes that may be drawn."""
        arrays = to_numpy(current)
        self.layout = pack(arrays)[1] if packable(arrays) else ""
        left_out = 0
        if exclude:
            connected = list(grid.get_node_ids())
            eligible = [n for n in connected if n not in exclude]
            left_out = len(connected) - len(eligible)
            if not eligible:
                return TrainSample([], config, left_out)
            with _minimums_for(self.base, left_out, len(eligible)):
                view = _Eligible(grid, exclude)
                messages = list(self.base.configure_train(server_round, self._view(arrays), config, view))  # type: ignore[arg-type]
        else:
            messages = list(self.base.configure_train(server_round, self._view(arrays), config, grid))
        if messages:
            config = messages[0].content.config_records.get(CONFIG, config)
        return TrainSample([m.metadata.dst_node_id for m in messages], config, left_out)

    def sample_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[int]:
        return [m.metadata.dst_node_id for m in self.base.configure_evaluate(server_round, arrays, config, grid)]

    def aggregate(self, server_round: int, updates: list[WeightedUpdate]) -> dict[str, np.ndarray] | None:
        """The base's new trained tensors from the round's updates (None: it failed; logged)."""
        replies = [reply_message(u.node_id, self._view(u.arrays), u.weight) for u in updates]
        self.step += 1
        try:
            aggregated, _ = self.base.aggregate_train(self.step, replies)
        except (AggregationError, InconsistentMessageReplies) as exc:
            logger.error("Round %d: base aggregation failed (%s); global model unchanged", server_round, exc)
            return None
        if aggregated is None:
            return None
        if self.layout:
            return unpack(from_array(aggregated[PACKED]), self.layout)
        return to_numpy(aggregated)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "segment": self.segment, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base, self.segment, self.step = state["base"], state["segment"], state["step"]

    def summary(self) -> None:
        self.base.summary()
