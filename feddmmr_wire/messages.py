"""FedDMMR's four messages as typed classes: the record layout of each lives here only.

The server sends a ``TrainInstruction`` or an ``EvaluateInstruction``; a client answers with a
``TrainReply`` or an ``EvaluateReply``. Each converts to and from the ``RecordDict`` content of a
Flower ``Message`` (``to_content`` / ``from_content``). Parsing a reply never guesses: a reply
without FedDMMR's layout raises ``MessageError`` with a one-line reason (and the user's partition id
when the reply says it), which the server records as a rejected reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from .arrays import from_array, to_array, to_numpy, to_record
from .keys import (
    ARRAY_NAMES,
    ARRAYS,
    CENTROIDS,
    CLIENT_LR,
    CLIPPING_NORM,
    CONFIG,
    LOCAL_EPOCHS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PROTOTYPES,
    PROXIMAL_MU,
    RUN_KEY,
    SECAGG_EXTRAS,
    SERVER_ROUND,
    SIZES,
    SPLIT,
    STAGE,
    STAGE_ROUND,
    STATUS,
    STATUS_CODE,
    STATUS_REASON,
    WITHHELD,
)
from .packing import arrays_records, pack_content, read_arrays

Arrays = ArrayRecord | Mapping[str, np.ndarray]


class MessageError(ValueError):
    """A message without FedDMMR's layout (``partition_id``: the user, when the message says it)."""

    def __init__(self, reason: str, partition_id: int | None = None) -> None:
        super().__init__(reason)
        self.partition_id = partition_id


class TrainStatus:
    """What a train reply reports: it trained, or it had nothing to train on (a skipped node, not a failure)."""

    OK = "ok"
    NOTHING_TO_TRAIN = "nothing-to-train"


def train_settings(
    client_lr: float, local_epochs: int, run_key: str, clipping_norm: float | None = None
) -> ConfigRecord:
    """The run-wide entries of every train instruction's config (the strategy adds the round's)."""
    entries: dict[str, Any] = {CLIENT_LR: client_lr, LOCAL_EPOCHS: local_epochs, RUN_KEY: run_key}
    if clipping_norm is not None:
        entries[CLIPPING_NORM] = clipping_norm  # read by Flower's fixedclipping_mod
    return ConfigRecord(entries)


def evaluate_settings(run_key: str) -> ConfigRecord:
    return ConfigRecord({RUN_KEY: run_key})


def round_entries(server_round: int, stage: str, stage_round: int | None = None) -> dict[str, Any]:
    """The per-round config entries of an instruction."""
    entries: dict[str, Any] = {SERVER_ROUND: server_round, STAGE: stage}
    if stage_round is not None:
        entries[STAGE_ROUND] = stage_round
    return entries


def _prototype_record(centroids: np.ndarray | None) -> ArrayRecord:
    if centroids is None:
        return ArrayRecord()
    return ArrayRecord({CENTROIDS: to_array(np.ascontiguousarray(centroids, dtype=np.float32))})


@dataclass
class Instruction:
    """What the server sends: the model (every tensor), the global prototypes, config entries."""

    arrays: Arrays
    prototypes: np.ndarray | None
    config: Mapping[str, Any]

    def to_content(self, packed: bool) -> RecordDict:
        record = self.arrays if isinstance(self.arrays, ArrayRecord) else to_record(dict(self.arrays))
        prototypes = _prototype_record(self.prototypes)
        content = RecordDict({ARRAYS: record, PROTOTYPES: prototypes, CONFIG: ConfigRecord(dict(self.config))})
        return pack_content(content) if packed else content

    @classmethod
    def from_content(cls, content: RecordDict):  # noqa: ANN206 - an instance of the subclass
        """The client's view (arrays as numpy, packed or not)."""
        centroids = to_numpy(content.array_records.get(PROTOTYPES)).get(CENTROIDS)
        return cls(read_arrays(content), centroids, dict(content.config_records[CONFIG]))

    @property
    def run_key(self) -> str:
        return str(self.config.get(RUN_KEY, ""))

    def required(self, key: str, kind: type) -> Any:
        """A config entry the sender must have set (``MessageError`` naming it otherwise)."""
        if key not in self.config:
            raise MessageError(f"instruction config lacks {key!r}")
        return kind(self.config[key])


class TrainInstruction(Instruction):
    """``config`` holds SERVER_ROUND, STAGE, STAGE_ROUND, CLIENT_LR, LOCAL_EPOCHS, RUN_KEY and whatever a
    Flower base strategy or mod adds (PROXIMAL_MU from FedProx, CLIPPING_NORM for DP clipping)."""

    @property
    def server_round(self) -> int:
        return self.required(SERVER_ROUND, int)

    @property
    def stage(self) -> str:
        return self.required(STAGE, str)

    @property
    def client_lr(self) -> float:
        return self.required(CLIENT_LR, float)

    @property
    def local_epochs(self) -> int:
        return self.required(LOCAL_EPOCHS, int)

    @property
    def proximal_mu(self) -> float:
        return float(self.config.get(PROXIMAL_MU, 0.0))


class EvaluateInstruction(Instruction):
    """``config`` holds SPLIT ("valid"/"test") and RUN_KEY (and the round's entries during a run)."""

    @property
    def split(self) -> str:
        return self.required(SPLIT, str)


def _partition_id(metrics: MetricRecord | None) -> int | None:
    value = None if metrics is None else metrics.get(PARTITION_ID)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _metric_values(metrics: MetricRecord) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in (NUM_EXAMPLES, PARTITION_ID)}


@dataclass
class TrainReply:
    """A client's answer to a TrainInstruction.

    ``arrays``: the stage's trained tensors only; ``num_examples``: the aggregation weight (its
    training positions); ``centroids``/``sizes``: its released prototypes; ``metrics``: scalars.
    ``status`` NOTHING_TO_TRAIN: the user had no training position (no arrays, weight 0)."""

    arrays: dict[str, np.ndarray]
    num_examples: float
    partition_id: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    centroids: np.ndarray | None = None
    sizes: np.ndarray | None = None
    status: str = TrainStatus.OK
    reason: str = ""

    @classmethod
    def nothing_to_train(cls, partition_id: int, reason: str, metrics: dict | None = None) -> TrainReply:
        return cls({}, 0, partition_id, dict(metrics or {}), status=TrainStatus.NOTHING_TO_TRAIN, reason=reason)

    @staticmethod
    def says_nothing_to_train(content: RecordDict) -> bool:
        """Whether a train reply's content is a NOTHING_TO_TRAIN reply (read without parsing the rest)."""
        return _status(content, None)[0] == TrainStatus.NOTHING_TO_TRAIN

    def to_content(self, packed: bool) -> RecordDict:
        metrics = MetricRecord({**self.metrics, NUM_EXAMPLES: self.num_examples, PARTITION_ID: self.partition_id})
        if self.status != TrainStatus.OK:
            status = ConfigRecord({STATUS_CODE: self.status, STATUS_REASON: self.reason})
            return RecordDict({METRICS: metrics, STATUS: status})
        records: dict[str, Any] = dict(arrays_records(self.arrays, packed))
        if self.centroids is not None:
            records[PROTOTYPES] = to_record({CENTROIDS: self.centroids, SIZES: self.sizes})
        records[METRICS] = metrics
        return RecordDict(records)

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        """Parse a plain reply; ``MessageError`` names what is missing or unreadable."""
        metrics, pid = _header(content)
        code, reason = _status(content, pid)
        if code == TrainStatus.NOTHING_TO_TRAIN:
            return cls.nothing_to_train(pid, reason, _metric_values(metrics))  # type: ignore[arg-type]
        n = _weight(metrics, pid)
        if ARRAYS not in content.array_records:
            raise MessageError(f"no {ARRAYS!r} ArrayRecord", pid)
        try:  # packed or not, read once: the server's checks and aggregation use these numpy arrays
            arrays = read_arrays(content)
        except (ValueError, KeyError) as exc:
            raise MessageError(str(exc), pid) from None
        centroids = sizes = None
        protos = content.array_records.get(PROTOTYPES)
        if protos is not None and CENTROIDS in protos:
            centroids = from_array(protos[CENTROIDS])
            sizes = from_array(protos[SIZES]) if SIZES in protos else np.zeros(0)
        return cls(arrays, n, pid, _metric_values(metrics), centroids, sizes)

    @classmethod
    def from_secagg_content(cls, content: RecordDict) -> tuple[TrainReply, SecAggPlaintext]:
        """Parse a SecAgg+ reply's plaintext part: no arrays (only their masked sum is ever known).
        A NOTHING_TO_TRAIN reply takes part in the protocol with weight 0 (its masked vector is zero)."""
        metrics, pid = _header(content)
        plain = SecAggPlaintext.from_content(content)
        if plain is None:
            raise MessageError("no plaintext part (array names, metrics)", pid)
        code, reason = _status(content, pid)
        values = _metric_values(metrics)
        reply = cls({}, _weight(metrics, pid), pid, values, plain.centroids, plain.sizes, code, reason)
        return reply, plain


def _header(content: RecordDict) -> tuple[MetricRecord, int | None]:
    metrics = content.metric_records.get(METRICS)
    pid = _partition_id(metrics)
    if metrics is None:
        raise MessageError(f"no {METRICS!r} MetricRecord", pid)
    return metrics, pid


def _status(content: RecordDict, pid: int | None) -> tuple[str, str]:
    """(TrainStatus code, reason) of a train reply; OK when it has no STATUS record."""
    status = content.config_records.get(STATUS)
    if status is None:
        return TrainStatus.OK, ""
    code = str(status.get(STATUS_CODE))
    if code not in (TrainStatus.OK, TrainStatus.NOTHING_TO_TRAIN):
        raise MessageError(f"unknown reply status {code!r}", pid)
    return code, str(status.get(STATUS_REASON, ""))


def _weight(metrics: MetricRecord, pid: int | None) -> float:
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, int | float):  # its range is the server's check (feddmmr_flower.replies)
        raise MessageError(f"{NUM_EXAMPLES!r} missing or not a number: {n!r}", pid)
    return n


@dataclass
class EvaluateReply:
    """A client's metrics for one split (weight 1: every user counts the same)."""

    metrics: dict[str, Any]
    partition_id: int | None
    num_examples: int = 1

    def to_content(self) -> RecordDict:
        values = {**self.metrics, NUM_EXAMPLES: self.num_examples, PARTITION_ID: self.partition_id}
        return RecordDict({METRICS: MetricRecord(values)})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateReply:
        metrics = content.metric_records.get(METRICS)
        if metrics is None:
            raise MessageError("no metrics", None)
        n = metrics.get(NUM_EXAMPLES, 1)
        return cls(_metric_values(metrics), _partition_id(metrics), n)  # type: ignore[arg-type]


@dataclass
class SecAggPlaintext:
    """The plaintext part of a SecAgg+ train reply (``secaggplus_mod`` clears every ArrayRecord and
    sends only the masked update): the masked tensors' names, why an update was withheld, and the
    released prototypes (a separate release, see docs/privacy.md)."""

    array_names: list[str]
    withheld: str = ""
    centroids: np.ndarray | None = None
    sizes: np.ndarray | None = None

    def to_record(self) -> ConfigRecord:
        entries: dict[str, Any] = {ARRAY_NAMES: list(self.array_names)}
        if self.withheld:
            entries[WITHHELD] = self.withheld
        if self.centroids is not None:
            entries[CENTROIDS] = ndarray_to_bytes(self.centroids)
            entries[SIZES] = ndarray_to_bytes(self.sizes)
        return ConfigRecord(entries)

    @classmethod
    def from_content(cls, content: RecordDict) -> SecAggPlaintext | None:
        record = content.config_records.get(SECAGG_EXTRAS)
        if record is None:
            return None
        centroids = bytes_to_ndarray(record[CENTROIDS]) if CENTROIDS in record else None
        sizes = bytes_to_ndarray(record[SIZES]) if SIZES in record else None
        return cls(list(record.get(ARRAY_NAMES, [])), str(record.get(WITHHELD, "")), centroids, sizes)
