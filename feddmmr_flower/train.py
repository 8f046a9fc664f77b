"""Local training (shared by the centralized trainer and the federated client) and the central loop.

``train_epoch`` runs one pass over some users' sequences and updates their memories — a
federated client calls it with its single user, the centralized trainer with all users in
shuffled batches. Every position of a sequence is trained at once (next-item prediction).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, writable_dir
from .data.sequences import SequenceData, atomic_write_json
from .errors import ConfigError
from .evaluation import all_candidates, evaluate
from .losses import LOSSES, masked_mean, recommendation_loss, sample_negatives
from .memory import LocalDynamicMemory
from .models.feddmmr import FedDMMR, info_nce
from .prototypes import PrototypeConfig, local_prototypes
from .stages import StageSchedule, apply_stage


@dataclass
class TrainConfig:
    epochs: int = 200  # central: total epochs when no stage schedule is given
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"
    num_negatives: int = 100  # per sequence for "ce" (shared by its positions), per position otherwise
    lambda_c: float = 0.1  # weight of the visual/semantic InfoNCE alignment (finetune)
    lambda_lb: float = 0.01  # weight of the router load-balance loss (finetune)
    surprise_alpha: float = 1.0  # InfoNCE sample weight = 1 + alpha * surprise
    temperature: float = 0.07
    align_samples: int = 512  # positives per batch in the InfoNCE (a random subset)
    eval_every: int = 5
    patience: int = 10  # evaluations without a better validation NDCG@10 before a stage ends
    eval_negatives: int = 100
    eval_seed: int = 0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        for name in (
            "epochs",
            "batch_size",
            "num_negatives",
            "eval_every",
            "patience",
            "eval_negatives",
            "align_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("lambda_c", "lambda_lb", "surprise_alpha", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


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
    for start in range(0, len(users), config.batch_size):
        batch = make_batch(
            data,
            users[start : start + config.batch_size],
            rows[start : start + config.batch_size],
            model.config.maxlen,
            device,
        )
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
    for start in range(0, len(users), config.batch_size):
        batch = make_batch(
            data,
            users[start : start + config.batch_size],
            rows[start : start + config.batch_size],
            model.config.maxlen,
            device,
        )
        _, position_loss, _ = batch_loss(model, batch, config, "pretrain", None, generator)
        memory.write(batch.rows, batch.targets.cpu(), batch.target_positions.cpu(), position_loss.cpu())


def prototype_vectors(model: FedDMMR, items: torch.Tensor) -> torch.Tensor:
    """[ID | text | image] vectors of items (the space prototypes live in)."""
    with torch.no_grad():
        return torch.cat([model.item_emb(items), model.txt_feat[items], model.vis_feat[items]], -1)


def memory_prototypes(
    model: FedDMMR, memory: LocalDynamicMemory, row: int, config: PrototypeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A client's releasable prototypes: K-Means over its memory entries, utility-weighted."""
    items, utility = memory.entries(row)
    if len(items) == 0:
        return np.zeros((0, model.config.prototype_dim), np.float32), np.zeros(0, np.float32)
    vectors = prototype_vectors(model, torch.as_tensor(items, device=model.vis_feat.device)).cpu().numpy()
    return local_prototypes(vectors, utility, config)


def central_prototypes(model: FedDMMR, memory: LocalDynamicMemory, config: PrototypeConfig) -> torch.Tensor | None:
    """Centralized stand-in for the server's aggregation: one weighted K-Means over all entries."""
    valid = memory.item > 0
    if not valid.any():
        return None
    items = memory.item[valid]
    utility = memory.utility(torch.arange(len(memory.step)))[valid]
    vectors = prototype_vectors(model, items.to(model.vis_feat.device)).cpu().numpy()
    centroids, _ = local_prototypes(vectors, utility.numpy(), config)
    return torch.as_tensor(centroids, device=model.vis_feat.device) if len(centroids) else None


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


def command_line() -> str:
    """The command as a person would type it again (program name without its install path)."""
    import shlex

    program = sys.argv[0]
    program = os.path.relpath(program) if program.endswith(".py") else Path(program).name
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def machine_description() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class CentralResult:
    config: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_stage: str = ""
    best_valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    test_by_history_length: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    train_sequences_per_s: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_central(
    model: FedDMMR,
    data: SequenceData,
    config: TrainConfig,
    schedule: StageSchedule | None = None,
    memory: LocalDynamicMemory | None = None,
    proto_config: PrototypeConfig | None = None,
    out_dir: Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = _log,
    extra_config: dict | None = None,
) -> CentralResult:
    """Train all users through the stage schedule; keep the epoch with the best validation
    NDCG@10 (sampled protocol), then evaluate the test split once with it."""
    schedule = schedule or StageSchedule([("pretrain", config.epochs)])
    proto_config = proto_config or PrototypeConfig()
    if out_dir is not None:
        writable_dir(out_dir)  # fail now, not after the training
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    valid_candidates = all_candidates(data, "valid", config.eval_negatives, config.eval_seed)
    users = np.arange(data.num_users)
    result = CentralResult(
        config={
            **asdict(config),
            "schedule": str(schedule),
            "model": asdict(model.config),
            "memory": asdict(memory.config) if memory else None,
            "prototypes": asdict(proto_config),
            **(extra_config or {}),
        }
    )
    best = {
        "ndcg": -1.0,
        "state": copy.deepcopy(model.state_dict()),
        "memory": copy.deepcopy(memory),
        "prototypes": None,
    }
    prototypes = None
    started = time.perf_counter()
    seconds_by_stage: dict[str, list[float]] = {}
    epoch = 0
    for segment in schedule.segments:
        stage, length = segment.stage, segment.num_rounds
        optimizer = torch.optim.Adam(
            apply_stage(model, stage), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
        )
        stale = 0
        for _ in range(length):
            epoch += 1
            if stage == "finetune" and memory is not None and model.config.uses_prototypes:
                prototypes = central_prototypes(model, memory, proto_config)
            tick = time.perf_counter()
            order = rng.permutation(users)
            stats = train_epoch(
                model, data, order, order, optimizer, config, stage, memory, prototypes, generator, device
            )
            seconds = time.perf_counter() - tick
            seconds_by_stage.setdefault(stage, [0.0, 0.0])
            seconds_by_stage[stage][0] += seconds
            seconds_by_stage[stage][1] += stats["sequences"]
            record = {
                "epoch": epoch,
                "stage": stage,
                "seconds": round(seconds, 3),
                **{k: round(v, 5) for k, v in stats.items() if isinstance(v, float)},
            }
            line = f"epoch {epoch}/{schedule.total_rounds} [{stage}] loss {stats['loss']:.4f}  {stats['sequences'] / seconds:.0f} seq/s"
            if epoch % config.eval_every == 0 or epoch == segment.last_round:
                model.eval()
                valid = evaluate(
                    data,
                    model_scorer(model, memory, None, prototypes),
                    "valid",
                    maxlen=model.config.maxlen,
                    protocols=("sampled",),
                    num_negatives=config.eval_negatives,
                    seed=config.eval_seed,
                    candidates_cache=valid_candidates,
                    device=device,
                ).metrics("sampled")
                record["valid"] = {k: round(v, 5) for k, v in valid.items()}
                line += f"  valid NDCG@10 {valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}"
                if valid["NDCG@10"] > best["ndcg"]:
                    best = {
                        "ndcg": valid["NDCG@10"],
                        "state": copy.deepcopy(model.state_dict()),
                        "memory": copy.deepcopy(memory),
                        "prototypes": prototypes,
                    }
                    result.best_epoch, result.best_stage, result.best_valid = epoch, stage, record["valid"]
                    stale = 0
                    line += "  *"
                else:
                    stale += 1
            if memory is not None:
                record["memory"] = memory.stats()
            result.history.append(record)
            log(line)
            if stale >= config.patience:
                log(f"stage {stage}: no better validation NDCG@10 in {config.patience} evaluations, moving on")
                break
    model.load_state_dict(best["state"])
    memory, prototypes = best["memory"], best["prototypes"]
    model.eval()
    test = evaluate(
        data,
        model_scorer(model, memory, None, prototypes),
        "test",
        maxlen=model.config.maxlen,
        num_negatives=config.eval_negatives,
        seed=config.eval_seed,
        device=device,
    )
    result.test = {p: {k: round(v, 5) for k, v in m.items()} for p, m in test.summary().items()}
    result.test_by_history_length = test.by_history_length(data)
    result.wall_time_s = round(time.perf_counter() - started, 2)
    result.train_sequences_per_s = {s: round(n / max(t, 1e-9), 1) for s, (t, n) in seconds_by_stage.items()}
    result.memory = memory.stats() if memory is not None else {}
    log(
        f"best epoch {result.best_epoch} [{result.best_stage}]: test sampled NDCG@10 "
        f"{result.test['sampled']['NDCG@10']:.4f} HR@10 {result.test['sampled']['HR@10']:.4f} | full NDCG@10 "
        f"{result.test['full']['NDCG@10']:.4f} HR@10 {result.test['full']['HR@10']:.4f}  ({result.wall_time_s:.0f} s)"
    )
    if out_dir is not None:
        save_checkpoint(Path(out_dir) / "best.pt", model, memory, prototypes, extra={"epoch": result.best_epoch})
        atomic_write_json(Path(out_dir) / "results.json", result_payload(result))
    return result


def save_checkpoint(
    path: Path,
    model: FedDMMR,
    memory: LocalDynamicMemory | None = None,
    prototypes: torch.Tensor | None = None,
    extra: dict | None = None,
) -> None:
    """Atomic checkpoint: model config + state, optional memory bank and global prototypes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "memory": None
        if memory is None
        else {
            "config": asdict(memory.config),
            **{
                k: getattr(memory, k).clone()
                for k in ("item", "position", "freq", "last_write", "surprise", "step", "counters")
            },
        },
        "prototypes": None if prototypes is None else prototypes.detach().cpu(),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def result_payload(result: CentralResult) -> dict:
    return {"command": command_line(), "machine": machine_description(), **asdict(result)}
