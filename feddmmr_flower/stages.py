"""Training stages: the schedule, which tensors train in each stage, and moving exactly those.

A stage is a set of named parameter groups (``FedDMMR.parameter_groups``); freezing is applied
to the model the training step actually uses, and the tensors exchanged with a server are
exactly the stage's trainable ones, by their stable ``state_dict`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .models.feddmmr import STAGES, FedDMMR

__all__ = [
    "STAGES",
    "StageSchedule",
    "StageSegment",
    "apply_stage",
    "load_arrays",
    "parse_stage_schedule",
    "trainable_names",
    "trainable_state",
]


@dataclass(frozen=True)
class StageSegment:
    """A run of consecutive rounds in one stage (rounds are 1-based and inclusive)."""

    index: int  # position in the schedule, so a repeated stage is a new segment
    stage: str
    first_round: int
    last_round: int

    @property
    def num_rounds(self) -> int:
        return self.last_round - self.first_round + 1


class StageSchedule:
    """Ordered (stage, number of rounds) pairs; stages with 0 rounds are skipped."""

    def __init__(self, parts: Sequence[tuple[str, int]]) -> None:
        segments: list[StageSegment] = []
        next_round = 1
        for i, (stage, count) in enumerate(parts):
            if stage not in STAGES:
                raise ConfigError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
            if count < 0:
                raise ConfigError(f"stage {stage!r} has a negative round count {count}")
            if count:
                segments.append(StageSegment(i, stage, next_round, next_round + count - 1))
                next_round += count
        if not segments:
            raise ConfigError("stage schedule has no rounds (every count is 0)")
        self.parts: list[tuple[str, int]] = [(s, int(c)) for s, c in parts]
        self.segments: list[StageSegment] = segments

    @classmethod
    def parse(cls, text: str) -> StageSchedule:
        """Parse "stage:count,stage:count,..." (whitespace allowed around items)."""
        if not text or not text.strip():
            raise ConfigError("empty stage schedule; expected e.g. 'pretrain:40,align:10,finetune:40'")
        parts: list[tuple[str, int]] = []
        for raw in text.split(","):
            item = raw.strip()
            stage, sep, count = item.partition(":")
            stage, count = stage.strip(), count.strip()
            if not sep or not stage or not count:
                raise ConfigError(f"bad stage schedule item {item!r}: expected 'stage:count'")
            if stage not in STAGES:
                raise ConfigError(
                    f"bad stage schedule item {item!r}: unknown stage {stage!r} (choose from {', '.join(STAGES)})"
                )
            try:
                n = int(count)
            except ValueError:
                raise ConfigError(f"bad stage schedule item {item!r}: count {count!r} is not an integer") from None
            if n < 0:
                raise ConfigError(f"bad stage schedule item {item!r}: count must be >= 0")
            parts.append((stage, n))
        return cls(parts)

    @property
    def total_rounds(self) -> int:
        return self.segments[-1].last_round

    def segment_for_round(self, server_round: int) -> StageSegment:
        if not 1 <= server_round <= self.total_rounds:
            raise ConfigError(
                f"round {server_round} is outside the stage schedule '{self}' (rounds 1..{self.total_rounds})"
            )
        return next(s for s in self.segments if server_round <= s.last_round)

    def stage_for_round(self, server_round: int) -> str:
        return self.segment_for_round(server_round).stage

    def continues(self, earlier: StageSchedule, done_rounds: int) -> bool:
        """True when rounds 1..done_rounds mean the same here as in ``earlier`` (so a resumed run may
        give later stages, or the current one, more rounds without redoing or skipping any)."""
        started = [seg for seg in earlier.segments if seg.first_round <= done_rounds]
        if len(started) > len(self.segments):
            return False
        for old, new in zip(started, self.segments):
            if (old.stage, old.first_round) != (new.stage, new.first_round):
                return False
            if old.last_round < done_rounds and new.last_round != old.last_round:
                return False
            if new.last_round < min(old.last_round, done_rounds):
                return False
        return done_rounds <= self.total_rounds

    def __str__(self) -> str:
        return ",".join(f"{s}:{c}" for s, c in self.parts)

    def __repr__(self) -> str:
        return f"StageSchedule.parse({str(self)!r})"


def parse_stage_schedule(text: str) -> StageSchedule:
    """Shorthand for ``StageSchedule.parse``."""
    return StageSchedule.parse(text)


def trainable_names(model: FedDMMR, stage: str) -> list[str]:
    groups = model.parameter_groups()
    return [name for group in model.stage_groups(stage) for name in groups[group]]


def apply_stage(model: FedDMMR, stage: str) -> list[torch.nn.Parameter]:
    """Freeze everything but ``stage``'s groups (on this very model); returns the trainable params."""
    names = set(trainable_names(model, stage))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    return params


def trainable_state(model: FedDMMR, stage: str) -> dict[str, np.ndarray]:
    """The stage's trainable tensors as numpy arrays, keyed by state_dict name."""
    state = model.state_dict()
    return {name: state[name].detach().cpu().numpy().copy() for name in trainable_names(model, stage)}


def load_arrays(model: FedDMMR, arrays: dict[str, np.ndarray], *, allowed: list[str] | None = None) -> None:
    """Copy named arrays into the model, checking names, shapes and finiteness first (all or nothing)."""
    state = model.state_dict()
    allowed_set = set(allowed) if allowed is not None else set(state)
    problems = []
    for name, value in arrays.items():
        if name not in state or name not in allowed_set:
            problems.append(f"unexpected tensor {name!r}")
            continue
        value = np.asarray(value)
        if tuple(value.shape) != tuple(state[name].shape):
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
        elif np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            problems.append(f"{name}: contains NaN/Inf")
    if problems:
        raise ValueError("cannot load arrays: " + "; ".join(problems[:5]))
    with torch.no_grad():
        for name, value in arrays.items():
            state[name].copy_(torch.as_tensor(np.asarray(value), dtype=state[name].dtype))
