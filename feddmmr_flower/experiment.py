"""From an ``ExperimentConfig`` to data, feature tables, a model and the training, memory and
prototype settings (derived here, never built with defaults of their own).

The CLI, the centralized trainer and both Flower apps build everything through these
functions, so a run means the same thing wherever it runs. ``load_assets`` caches per
process: a Flower worker serving many clients loads the dataset and features once.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import ExperimentConfig
from .data import PrepareOptions, SequenceData, prepare_dataset
from .errors import ConfigError
from .local_training import TrainConfig, refresh_memory
from .memory import LocalDynamicMemory, MemoryConfig
from .models.feddmmr import FedDMMR, FedDMMRConfig
from .prototypes import PrototypeConfig


@dataclass
class Assets:
    """Everything a process needs that does not change during a run."""

    data: SequenceData
    data_folder: Path
    features: dict  # kind -> FeatureTable


def resolve_path(value: str) -> Path:
    """Relative paths of a run config resolve against ``$FEDDMMR_HOME`` when set, else the
    working directory (for ``flwr run .``: the directory it was started from)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and os.environ.get("FEDDMMR_HOME"):
        path = Path(os.environ["FEDDMMR_HOME"]).expanduser() / path
    return path


def _path(value: str) -> Path | None:
    return resolve_path(value) if value else None


def load_data(cfg: ExperimentConfig) -> tuple[SequenceData, Path]:
    options = PrepareOptions(cfg.dataset, cfg.top_users or None, cfg.min_seq_len)
    return prepare_dataset(
        options,
        resolve_path(cfg.data_dir),
        resolve_path(cfg.cache_dir),
        items_file=_path(cfg.items_file),
        download_url=cfg.download_url or None,
        verbose=False,
    )


def load_features(cfg: ExperimentConfig, data: SequenceData) -> dict:
    """Feature tables the variant needs (computed once, then read from the cache)."""
    if cfg.variant == "sasrec" or not (cfg.text_features or cfg.visual_features):
        return {}
    from .features import compute_item_features

    return compute_item_features(
        data,
        resolve_path(cfg.cache_dir) / "features",
        text=cfg.text_features,
        visual=cfg.visual_features,
        descriptions=_path(cfg.descriptions),
        text_model=cfg.text_model or None,
        posters_dir=_path(cfg.posters_dir),
        movies_dat=_path(cfg.movies_dat),
        clip_model=cfg.clip_model,
        clip_pretrained=cfg.clip_pretrained or None,
        device=cfg.device,
        verbose=sys.stderr.isatty(),
    )


@functools.lru_cache(maxsize=4)
def _cached_assets(key: tuple) -> Assets:
    cfg = ExperimentConfig(**dict(key))
    data, folder = load_data(cfg)
    return Assets(data, folder, load_features(cfg, data))


ASSET_FIELDS = (
    "dataset",
    "data_dir",
    "cache_dir",
    "items_file",
    "top_users",
    "min_seq_len",
    "download_url",
    "text_features",
    "descriptions",
    "text_model",
    "visual_features",
    "posters_dir",
    "movies_dat",
    "clip_model",
    "clip_pretrained",
    "variant",
    "device",
)


def load_assets(cfg: ExperimentConfig) -> Assets:
    """Dataset + features, loaded once per process for a given data/feature configuration."""
    key = tuple((name, getattr(cfg, name)) for name in ASSET_FIELDS)
    return _cached_assets(key)


def model_config(cfg: ExperimentConfig, data: SequenceData) -> FedDMMRConfig:
    return FedDMMRConfig(
        num_items=data.num_items,
        hidden=cfg.hidden,
        maxlen=cfg.maxlen,
        num_blocks=cfg.blocks,
        num_heads=cfg.heads,
        dropout=cfg.dropout,
        variant=cfg.variant,
        expert_heads=cfg.expert_heads,
    )


def build_model(cfg: ExperimentConfig, assets: Assets) -> FedDMMR:
    """A freshly initialised model (seeded) with the item feature tables installed."""
    torch.manual_seed(cfg.seed)
    model = FedDMMR(model_config(cfg, assets.data))
    if cfg.variant != "sasrec" and assets.features.get("text") is None and assets.features.get("visual") is None:
        raise ConfigError(f"variant {cfg.variant!r} needs item features: enable text-features or visual-features")
    install_features(model, assets)
    return model.to(cfg.device)


def install_features(model: FedDMMR, assets: Assets) -> None:
    """Put the (non-trained, never sent) item feature tables into ``model``."""
    text, visual = assets.features.get("text"), assets.features.get("visual")
    model.set_features(
        visual=None if visual is None else visual.vectors,
        visual_mask=None if visual is None else visual.mask,
        text=None if text is None else text.vectors,
        text_mask=None if text is None else text.mask,
    )


def first_memory(model: FedDMMR, data: SequenceData, user: int, cfg: ExperimentConfig) -> LocalDynamicMemory:
    """The memory a client builds from its training sequence before it ever trained (a client that
    evaluates first, ``feddmmr recommend`` on a federated run): one code path for both."""
    memory = LocalDynamicMemory.single(memory_config(cfg))
    refresh_memory(
        model,
        data,
        np.array([user]),
        np.zeros(1, dtype=np.int64),
        memory,
        train_config(cfg),
        torch.Generator(device=cfg.device).manual_seed(cfg.seed),
        cfg.device,
    )
    return memory


def load_weights(model: FedDMMR, path: str | Path) -> list[str]:
    """Start from a checkpoint of any stage (central ``best.pt`` or a federated ``checkpoint-<stage>.pt``).

    Tensors the checkpoint lacks keep their fresh initialisation; a shape mismatch is an error.
    Returns the names that were not in the checkpoint.
    """
    state = checkpoint.load(path, "init-from").state_dict
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(
            f"init-from: {path} does not fit this model ({wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); same dataset and sizes?"
        )
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return list(result.missing_keys)


def train_config(cfg: ExperimentConfig | None = None, **changes) -> TrainConfig:
    """The loss of one local step (client and central): ``cfg``'s (default: the default experiment's),
    with ``changes`` to individual fields (tests, benchmarks)."""
    cfg = cfg or ExperimentConfig()
    derived = TrainConfig(
        batch_size=cfg.batch_size,
        loss=cfg.loss,
        num_negatives=cfg.negatives,
        lambda_c=cfg.lambda_c,
        lambda_lb=cfg.lambda_lb,
        surprise_alpha=cfg.surprise_alpha,
        temperature=cfg.temperature,
    )
    return replace(derived, **changes)


def memory_config(cfg: ExperimentConfig | None = None, **changes) -> MemoryConfig:
    """The LocalDynamicMemory settings of ``cfg`` (default: the default experiment's), with ``changes``."""
    cfg = cfg or ExperimentConfig()
    derived = MemoryConfig(
        capacity=cfg.memory_capacity,
        topk=cfg.memory_topk,
        surprise_threshold=cfg.surprise_threshold,
        max_writes=cfg.max_writes,
    )
    return replace(derived, **changes)


def prototype_config(cfg: ExperimentConfig | None = None, **changes) -> PrototypeConfig:
    """The client prototype settings of ``cfg`` (default: the default experiment's), with ``changes``."""
    cfg = cfg or ExperimentConfig()
    derived = PrototypeConfig(
        num_prototypes=cfg.num_prototypes,
        min_cluster_size=cfg.min_cluster_size,
        noise_std=cfg.prototype_noise,
        seed=cfg.seed,
    )
    return replace(derived, **changes)
