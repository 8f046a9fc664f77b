"""The centralized trainer (``feddmmr train-central``): every user in shuffled batches, stage by stage.

The same model, memory and loss code as a federated client (``local_training``), with Adam instead
of the client's SGD. Each stage ends after its epochs or after ``patience`` evaluations without a
better validation NDCG@10; the epoch with the best validation NDCG@10 (sampled protocol) is kept and
the test split is evaluated once with it. The run folder has the federated run's shape
(``run_record``: config.json, history.json, summary.json; ``checkpoint``: best.pt).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .atomic import writable_dir
from .config import ExperimentConfig
from .data.sequences import SequenceData
from .evaluation import all_candidates, evaluate
from .experiment import prototype_config, train_config
from .local_training import loss_parts, model_scorer, train_epoch
from .memory import LocalDynamicMemory
from .models.feddmmr import FedDMMR
from .prototypes import central_prototypes
from .provenance import command_line, machine_description
from .run_record import RunRecorder, round_record
from .stages import StageSchedule, apply_stage


@dataclass
class CentralResult:
    """What ``train_central`` returns (and writes as history.json / summary.json)."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_stage: str = ""
    best_valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    test_by_history_length: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    train_sequences_per_s: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


@dataclass
class _Best:
    ndcg: float
    state: dict
    memory: LocalDynamicMemory | None
    prototypes: torch.Tensor | None


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _snapshot(ndcg: float, model: FedDMMR, memory, prototypes) -> _Best:
    return _Best(ndcg, copy.deepcopy(model.state_dict()), copy.deepcopy(memory), prototypes)


def _evaluate(model: FedDMMR, data: SequenceData, cfg: ExperimentConfig, memory, prototypes, split: str, **options):  # noqa: ANN001, ANN202
    """The evaluation protocol on every user (``options``: protocols, a candidates cache)."""
    model.eval()
    scorer = model_scorer(model, memory, None, prototypes)
    return evaluate(
        data,
        scorer,
        split,
        maxlen=model.config.maxlen,
        num_negatives=cfg.eval_negatives,
        seed=cfg.eval_seed,
        device=cfg.device,
        **options,
    )


def train_central(
    model: FedDMMR,
    data: SequenceData,
    cfg: ExperimentConfig,
    memory: LocalDynamicMemory | None = None,
    out_dir: Path | None = None,
    log: Callable[[str], None] = _log,
    facts: dict[str, Any] | None = None,
) -> CentralResult:
    """Train all users through ``cfg.stage_schedule``; ``facts`` go into config.json (data, features)."""
    schedule = StageSchedule.parse(cfg.stage_schedule)
    step_cfg, proto_cfg, device = train_config(cfg), prototype_config(cfg), cfg.device
    recorder = None
    if out_dir is not None:
        recorder = RunRecorder(writable_dir(out_dir), "central")  # fail now, not after the training
        recorder.write_config(cfg.flat(), schedule=str(schedule), model=asdict(model.config), **(facts or {}))
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device)
    valid_candidates = all_candidates(data, "valid", cfg.eval_negatives, cfg.eval_seed)
    users = np.arange(data.num_users)
    result = CentralResult()
    best = _snapshot(-1.0, model, memory, None)
    prototypes = None
    started = time.perf_counter()
    seconds_by_stage: dict[str, list[float]] = {}
    epoch = 0
    for segment in schedule.segments:
        stage = segment.stage
        optimizer = torch.optim.Adam(
            apply_stage(model, stage), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
        )
        stale = 0
        for _ in range(segment.num_rounds):
            epoch += 1
            if stage == "finetune" and memory is not None and model.config.uses_prototypes:
                prototypes = central_prototypes(model, memory, proto_cfg)
            tick = time.perf_counter()
            order = rng.permutation(users)
            stats = train_epoch(
                model, data, order, order, optimizer, step_cfg, stage, memory, prototypes, generator, device
            )
            seconds = time.perf_counter() - tick
            spent = seconds_by_stage.setdefault(stage, [0.0, 0.0])
            spent[0] += seconds
            spent[1] += stats["sequences"]
            line = f"epoch {epoch}/{schedule.total_rounds} [{stage}] loss {stats['loss']:.4f}  {stats['sequences'] / seconds:.0f} seq/s"
            valid = None
            if epoch % cfg.eval_every == 0 or epoch == segment.last_round:
                options = {"protocols": ("sampled",), "candidates_cache": valid_candidates}
                valid = _evaluate(model, data, cfg, memory, prototypes, "valid", **options).metrics("sampled")
                line += f"  valid NDCG@10 {valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}"
                if valid["NDCG@10"] > best.ndcg:
                    best = _snapshot(valid["NDCG@10"], model, memory, prototypes)
                    result.best_epoch, result.best_stage, result.best_valid = epoch, stage, valid
                    stale = 0
                    line += "  *"
                else:
                    stale += 1
            train = {**loss_parts(stats), **(memory.stats() if memory is not None else {})}
            record = round_record(epoch, stage, seconds, train, valid)
            result.history.append(record)
            if recorder is not None:
                recorder.add(record)
            log(line)
            if stale >= cfg.patience:
                log(f"stage {stage}: no better validation NDCG@10 in {cfg.patience} evaluations, moving on")
                break
    model.load_state_dict(best.state)
    memory, prototypes = best.memory, best.prototypes
    test = _evaluate(model, data, cfg, memory, prototypes, "test")
    result.test = test.summary()
    result.test_by_history_length = test.by_history_length(data)
    result.wall_time_s = round(time.perf_counter() - started, 2)
    result.train_sequences_per_s = {s: round(n / max(t, 1e-9), 1) for s, (t, n) in seconds_by_stage.items()}
    result.memory = memory.stats() if memory is not None else {}
    log(
        f"best epoch {result.best_epoch} [{result.best_stage}]: test sampled NDCG@10 "
        f"{result.test['sampled']['NDCG@10']:.4f} HR@10 {result.test['sampled']['HR@10']:.4f} | full NDCG@10 "
        f"{result.test['full']['NDCG@10']:.4f} HR@10 {result.test['full']['HR@10']:.4f}  ({result.wall_time_s:.0f} s)"
    )
    if recorder is not None:
        saved = checkpoint.Checkpoint(
            kind="central",
            model_config=asdict(model.config),
            state_dict=checkpoint.model_state(model.state_dict()),
            experiment=cfg.flat(),
            prototypes=None if prototypes is None else prototypes.detach().cpu(),
            round=result.best_epoch,
            stage=result.best_stage,
            valid=dict(result.best_valid),
            memory=None if memory is None else memory.state_dict(),
        )
        checkpoint.save(recorder.folder / "best.pt", saved)
        result.summary = recorder.write_summary(
            wall_time_s=result.wall_time_s,
            best_round=result.best_epoch,
            best_valid=result.best_valid,
            test=result.test,
            num_users=data.num_users,
            test_by_history_length=result.test_by_history_length,
            train_sequences_per_s=result.train_sequences_per_s,
            memory=result.memory,
            command=command_line(),
            machine=machine_description(),
        )
    return result
