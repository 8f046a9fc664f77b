"""One checkpoint format for every run, with a version: written here, read here.

Federated runs write ``best.pt``, ``checkpoint-<stage>.pt`` and ``last.pt`` (which also holds what
``resume-from`` needs); ``train-central`` writes ``best.pt`` with every user's memory. They are
read by ``resume-from``, ``init-from`` and ``feddmmr recommend``. A file without this format's name
and version is refused with a one-line error instead of being half-read.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import ConfigError
from .memory import LocalDynamicMemory

FORMAT = "feddmmr-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """Model weights and what they mean.

    ``round``: the federated round (central: the epoch) these weights are from; ``memory``: every
    user's LocalDynamicMemory (central runs; a federated run's memories stay on the clients);
    ``resume``: what continues a federated run (history, run key, pickled strategy state)."""

    kind: str  # "federated" or "central"
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    experiment: dict[str, Any]  # the flat ExperimentConfig
    prototypes: torch.Tensor | None
    round: int
    stage: str = ""
    valid: dict[str, float] | None = None
    memory: dict[str, Any] | None = None
    resume: dict[str, Any] | None = None

    @property
    def unit(self) -> str:
        return "round" if self.kind == "federated" else "epoch"

    def memory_bank(self) -> LocalDynamicMemory | None:
        return None if self.memory is None else LocalDynamicMemory.from_state_dict(self.memory)


def save(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write atomically (a crash never leaves half a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **asdict(checkpoint)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp, pickle_protocol=pickle.HIGHEST_PROTOCOL)


def load(path: str | Path, what: str = "checkpoint") -> Checkpoint:
    """Read a checkpoint; a missing, foreign, truncated or other-version file is a ``ConfigError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what}: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"{what}: {path} is not a FedDMMR checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{what}: {path} is not a FedDMMR checkpoint (no {FORMAT!r} format mark)")
    if payload.get("version") != VERSION:
        raise ConfigError(
            f"{what}: {path} has checkpoint format version {payload.get('version')!r}; this FedDMMR reads "
            f"version {VERSION} only (train again, or use the FedDMMR version that wrote it)"
        )
    names = {f.name for f in fields(Checkpoint)}
    return Checkpoint(**{k: v for k, v in payload.items() if k in names})


def model_state(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Named numpy arrays (or tensors) as a CPU state dict."""
    return {name: torch.as_tensor(value).detach().cpu() for name, value in arrays.items()}
