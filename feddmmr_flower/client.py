"""What one federated client (one user) does, without Flower: the ClientApp only converts records.

A ``ClientRuntime`` is built once per process and run configuration (dataset, feature tables
and a model replica); each message then loads the global arrays into the replica, restores
the user's memory from its small state arrays, works, and returns plain numpy values.
What leaves the client: the stage's trainable tensors, ``num-examples``, released
prototypes with their cluster sizes, and scalar metrics. Never item ids or memory entries.
"""

from __future__ import annotations

import functools
import time
from dataclasses import astuple, dataclass, fields

import numpy as np
import torch

from .config import ExperimentConfig
from .evaluation import evaluate, metrics_from_ranks
from .experiment import build_model, first_memory, load_assets, memory_config, prototype_config, train_config
from .local_training import loss_parts, model_scorer, train_epoch
from .memory import LocalDynamicMemory
from .prototypes import memory_prototypes
from .run_record import CLIENT_TRAIN_SECONDS, FULL_PREFIX
from .stages import apply_stage, load_arrays, trainable_names, trainable_state


def no_training_position(min_length: int) -> str:
    """Why a user with no training position sends no update: exactly what the server learns."""
    return f"no training position (fewer than {min_length} interactions)"


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]  # the stage's trainable tensors only
    num_examples: int  # training positions of this user
    centroids: np.ndarray  # [k, P] released prototypes
    sizes: np.ndarray  # [k] their cluster sizes
    memory: dict[str, np.ndarray]  # the new memory state (stays on the client)
    metrics: dict[str, float]


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    memory: dict[str, np.ndarray]


class PlainSGD:
    """``torch.optim.SGD(params, lr)`` without momentum, written out: building any ``torch.optim``
    optimizer imports torch._dynamo (~2 s, measured), which a deployed ClientApp, a fresh process
    per message, would pay on every message."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr = list(params), lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


class ClientRuntime:
    """Dataset, features and a model replica for every client served by this process."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.assets = load_assets(cfg)
        self.model = build_model(cfg, self.assets)
        self.train_cfg = train_config(cfg)
        self.memory_cfg = memory_config(cfg)
        self.proto_cfg = prototype_config(cfg)

    @property
    def num_users(self) -> int:
        return self.assets.data.num_users

    def _check_user(self, user: int) -> int:
        if not 0 <= user < self.num_users:
            raise ValueError(
                f"partition-id {user} out of range: the dataset has {self.num_users} users "
                "(one SuperNode serves one user)"
            )
        return user

    def nothing_to_train(self, user: int) -> str | None:
        """Why ``user`` cannot train (their history has no next-item target before the held-out
        items), or None. Such a node answers a train message with "nothing to train"."""
        data, users = self.assets.data, np.array([self._check_user(user)])
        if data.can_train(users)[0]:
            return None
        held_out = int(data.lengths[user] - data.train_lengths(users)[0])  # the validation and test items
        return no_training_position(data.MIN_TRAIN_ITEMS + held_out)

    def trainable_names(self, stage: str) -> list[str]:
        """The tensors trained in ``stage``, in the model's order (what a train reply carries)."""
        return trainable_names(self.model, stage)

    def _prepare(self, arrays: dict[str, np.ndarray], prototypes: np.ndarray | None):
        load_arrays(self.model, arrays)
        if prototypes is None or len(prototypes) == 0 or not self.model.config.uses_prototypes:
            return None
        expected = self.model.config.prototype_dim
        if prototypes.ndim != 2 or prototypes.shape[1] != expected:
            raise ValueError(f"global prototypes have shape {prototypes.shape}, expected [K, {expected}]")
        return torch.as_tensor(prototypes, dtype=torch.float32, device=self.cfg.device)

    def _memory(self, state: dict[str, np.ndarray] | None) -> LocalDynamicMemory:
        return LocalDynamicMemory.single(self.memory_cfg, state or None)

    def train(
        self,
        user: int,
        arrays: dict[str, np.ndarray],
        prototypes: np.ndarray | None,
        memory_state: dict[str, np.ndarray] | None,
        *,
        stage: str,
        lr: float,
        local_epochs: int,
        server_round: int,
        proximal_mu: float = 0.0,
    ) -> TrainOutcome:
        started = time.perf_counter()
        if (reason := self.nothing_to_train(user)) is not None:
            raise ValueError(f"partition-id {user}: {reason}")  # the ClientApp asks nothing_to_train first
        proto = self._prepare(arrays, prototypes)
        memory = self._memory(memory_state)
        params = apply_stage(self.model, stage)
        optimizer = PlainSGD(params, lr=lr)
        anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        extra = (
            (lambda: 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor)))
            if anchor is not None
            else None
        )
        seed = hash((self.cfg.seed, user, server_round)) % 2**63
        generator = torch.Generator(device=self.cfg.device).manual_seed(seed)
        # Dropout draws from the global RNG: seed it too, so a client's update does not depend on
        # which clients its process served before (Ray workers serve many; a deployment, one per process).
        torch.manual_seed(seed)
        users = np.array([user])
        stats: dict[str, float] = {}
        for _ in range(local_epochs):
            stats = train_epoch(
                self.model,
                self.assets.data,
                users,
                np.zeros(1, dtype=np.int64),
                optimizer,
                self.train_cfg,
                stage,
                memory,
                proto,
                generator,
                self.cfg.device,
                extra,
            )
        if self.model.config.uses_prototypes:
            centroids, sizes = memory_prototypes(self.model, memory, 0, self.proto_cfg)
        else:
            centroids = np.zeros((0, self.model.config.prototype_dim), np.float32)
            sizes = np.zeros(0, np.float32)
        metrics = {**loss_parts(stats), **memory.stats()}
        metrics[CLIENT_TRAIN_SECONDS] = time.perf_counter() - started
        return TrainOutcome(
            trainable_state(self.model, stage),
            int(stats["positions"]),
            centroids,
            sizes,
            memory.state_arrays(0),
            metrics,
        )

    @torch.no_grad()
    def evaluate(
        self,
        user: int,
        arrays: dict[str, np.ndarray],
        prototypes: np.ndarray | None,
        memory_state: dict[str, np.ndarray] | None,
        *,
        split: str,
    ) -> EvalOutcome:
        """Both protocols for this user; a client that never trained first builds its memory."""
        user = self._check_user(user)
        proto = self._prepare(arrays, prototypes)
        memory = self._memory(memory_state)
        if self.model.config.uses_experts and int(memory.step[0]) == 0:
            memory = first_memory(self.model, self.assets.data, user, self.cfg)
        self.model.eval()
        result = evaluate(
            self.assets.data,
            model_scorer(self.model, memory, lambda u: np.zeros(len(u), np.int64), proto),
            split,
            maxlen=self.model.config.maxlen,
            users=np.array([user]),
            num_negatives=self.cfg.eval_negatives,
            seed=self.cfg.eval_seed,
            device=self.cfg.device,
        )
        metrics = dict(result.metrics("sampled"))
        metrics.update({f"{FULL_PREFIX}{k}": v for k, v in metrics_from_ranks(result.ranks["full"]).items()})
        metrics["train-length"] = float(self.assets.data.train_lengths(np.array([user]))[0])
        return EvalOutcome(metrics, memory.state_arrays(0))


@functools.lru_cache(maxsize=2)
def _runtime(key: tuple) -> ClientRuntime:
    return ClientRuntime(ExperimentConfig(**dict(key)))


def runtime_for(cfg: ExperimentConfig) -> ClientRuntime:
    """The process-wide runtime of this configuration (built on the first message only)."""
    return _runtime(tuple(zip((f.name for f in fields(cfg)), astuple(cfg))))
