"""One local training step, shared by the federated client and the centralized trainer.

``train_epoch`` runs one pass over some users' sequences and updates their memories — a
federated client calls it with its single user, the centralized trainer with all users in
shuffled batches. Every position of a sequence is trained at once (next-item prediction).
``refresh_memory`` fills memories without training, and ``model_scorer`` is what evaluation
scores with (``feddmmr_flower.evaluation``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .data.sequences import SequenceData
from .losses import masked_mean, recommendation_loss, sample_negatives
from .memory import LocalDynamicMemory
from .models.experts import info_nce
from .models.feddmmr import FedDMMR

#: Counters ``train_epoch`` returns beside the loss parts (not metrics of the model).
COUNT_KEYS = ("positions", "sequences", "memory_writes")


@dataclass(frozen=True)
class TrainConfig:
    """The loss of one step; built from a validated ``ExperimentConfig`` (``experiment.train_config``)."""

    batch_size: int
    loss: str
    num_negatives: int  # per sequence for "ce" (shared by its positions), per position otherwise
    lambda_c: float  # weight of the visual/semantic InfoNCE alignment (finetune)
    lambda_lb: float  # weight of the router load-balance loss (finetune)
    surprise_alpha: float  # InfoNCE sample weight = 1 + alpha * surprise
    temperature: float
    align_samples: int = 512  # positives per batch in the InfoNCE (a random subset)


@dataclass
class Batch:
    users: np.ndarray
    rows: torch.Tensor  # memory rows of these users
    inputs: torch.Tensor  # [B, L] left-padded training inputs
    targets: torch.Tensor  # [B, L] next item at each position (0: no target)
    target_positions: torch.Tensor  # [B, L] index of the target in its user's sequence
    exclude: torch.Tensor  # [B, num_items + 1] training history (never sampled as negative)


def make_batch(
    data: SequenceData, users: np.ndarray, rows: np.ndarray, maxlen: int, device: torch.device | str = "cpu"
) -> Batch:
    return Batch(
        users=np.asarray(users),
        rows=torch.as_tensor(np.asarray(rows), dtype=torch.int64),
        inputs=torch.as_tensor(data.input_window(users, "train", maxlen), device=device),
        targets=torch.as_tensor(data.train_targets(users, maxlen), device=device),
        target_positions=torch.as_tensor(data.train_target_positions(users, maxlen), device=device),
        exclude=torch.as_tensor(data.history_mask(users, "train"), device=device),
    )


def batches(
    data: SequenceData, users: np.ndarray, rows: np.ndarray, size: int, maxlen: int, device: torch.device | str
) -> Iterator[Batch]:
    """``users`` (memory rows ``rows``) in consecutive batches of ``size``."""
    for start in range(0, len(users), size):
        yield make_batch(data, users[start : start + size], rows[start : start + size], maxlen, device)


def memory_slots(
    model: FedDMMR,
    memory: LocalDynamicMemory | None,
    rows: torch.Tensor,
    prototypes: torch.Tensor | None,
    device: torch.device | str = "cpu",
):
    """Slots for a batch (None when the model has no experts or there is no memory)."""
    if memory is None or not model.config.uses_experts:
        return None
    items, positions = memory.retrieve(rows)
    return model.slots(items.to(device), positions.to(device), prototypes)


def normalised_surprise(position_loss: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-position loss / the sequence's mean loss (1 = an ordinary position)."""
    mean = (position_loss * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)
    return position_loss / mean.clamp(min=1e-12) * real


def batch_loss(
    model: FedDMMR, batch: Batch, config: TrainConfig, stage: str, slots, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(total loss, per-position recommendation loss [B, L] (detached), loss parts)."""
    real = (batch.targets != 0).float()
    if stage == "align" and model.config.uses_experts:
        loss = model.align_stage_loss(torch.cat([batch.inputs, batch.targets], 1), config.temperature)
        with torch.no_grad():  # the memory still needs this pass's surprise signal
            _, position_loss, _ = batch_loss(model, batch, config, "pretrain", None, generator)
        return loss, position_loss, {"align": float(loss.detach())}
    hidden = model.encode(batch.inputs)
    shape = (
        (len(batch.users), config.num_negatives)
        if config.loss == "ce"
        else (*batch.targets.shape, config.num_negatives)
    )
    negatives = sample_negatives(batch.exclude, shape, generator)
    use_experts = stage == "finetune"
    out = model.train_logits(hidden, batch.targets, batch.target_positions, negatives, slots, use_experts)
    position_loss = recommendation_loss(out["pos"], out["neg"], real, config.loss)
    rec = masked_mean(position_loss, real)
    loss, parts = rec, {"rec": float(rec.detach())}
    if "vis" in out:
        both = real.bool() & (out["weights"] > 0).all(-1)  # positions where both experts have input
        if model.config.uses_contrast and config.lambda_c > 0 and both.sum() >= 2:
            index = both.flatten().nonzero().flatten()
            if len(index) > config.align_samples:
                pick = torch.randperm(len(index), generator=generator, device=index.device)[: config.align_samples]
                index = index[pick]
            surprise = normalised_surprise(position_loss.detach(), real).flatten()[index]
            dim = out["vis"].shape[-1]
            align = info_nce(
                out["vis"].reshape(-1, dim)[index],
                out["sem"].reshape(-1, dim)[index],
                config.temperature,
                1.0 + config.surprise_alpha * surprise,
            )
            loss = loss + config.lambda_c * align
            parts["align"] = float(align.detach())
        if config.lambda_lb > 0:
            usage = out["weights"][real.bool()].mean(0)
            balance = len(usage) * (usage**2).sum()
            loss = loss + config.lambda_lb * balance
            parts["balance"] = float(balance.detach())
            parts["w_visual"] = float(usage[0].detach())
    return loss, position_loss.detach(), parts


def train_epoch(
    model: FedDMMR,
    data: SequenceData,
    users: np.ndarray,
    rows: np.ndarray,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    stage: str,
    memory: LocalDynamicMemory | None = None,
    prototypes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over ``users`` (memory rows ``rows``) in batches; writes surprising items to memory.

    ``extra_loss`` is added to every batch's loss (e.g. FedProx's proximal term)."""
    model.train()
    totals: dict[str, float] = {}
    positions_seen, writes = 0.0, 0
    for batch in batches(data, users, rows, config.batch_size, model.config.maxlen, device):
        slots = memory_slots(model, memory, batch.rows, prototypes, device) if stage == "finetune" else None
        loss, position_loss, parts = batch_loss(model, batch, config, stage, slots, generator)
        if extra_loss is not None:
            loss = loss + extra_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({float(loss)}) in stage {stage!r}: "
                "lower the learning rate; the model was not updated"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if memory is not None:
            writes += memory.write(batch.rows, batch.targets.cpu(), batch.target_positions.cpu(), position_loss.cpu())[
                "writes"
            ]
        weight = float((batch.targets != 0).sum())
        positions_seen += weight
        for key, value in {"loss": float(loss.detach()), **parts}.items():
            totals[key] = totals.get(key, 0.0) + value * weight
    stats = {key: value / max(positions_seen, 1.0) for key, value in totals.items()}
    return {**stats, "positions": positions_seen, "sequences": len(users), "memory_writes": writes}


@torch.no_grad()
def refresh_memory(
    model: FedDMMR,
    data: SequenceData,
    users: np.ndarray,
    rows: np.ndarray,
    memory: LocalDynamicMemory,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Fill memories from the training histories with the current model (no parameter update):
    for a client evaluated before it ever trained."""
    model.eval()
    for batch in batches(data, users, rows, config.batch_size, model.config.maxlen, device):
        _, position_loss, _ = batch_loss(model, batch, config, "pretrain", None, generator)
        memory.write(batch.rows, batch.targets.cpu(), batch.target_positions.cpu(), position_loss.cpu())


def model_scorer(
    model: FedDMMR,
    memory: LocalDynamicMemory | None = None,
    rows_of: Callable[[np.ndarray], np.ndarray] | None = None,
    prototypes: torch.Tensor | None = None,
) -> Callable:
    """Evaluation scorer: last-position state (+ experts over the user's memory) vs candidates."""

    def score(users: np.ndarray, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        rows = torch.as_tensor(rows_of(users) if rows_of else users)
        slots = memory_slots(model, memory, rows, prototypes, inputs.device)
        return model.score(model.encode(inputs)[:, -1], candidates, slots)

    return score


def loss_parts(stats: dict[str, float]) -> dict[str, float]:
    """The loss parts of ``train_epoch``'s result (its counters left out): what a history records."""
    return {k: float(v) for k, v in stats.items() if k not in COUNT_KEYS}
