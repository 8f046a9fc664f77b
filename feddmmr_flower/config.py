"""Every knob of an experiment, its default and its validation, in one place.

``ExperimentConfig`` is the single source of truth: the CLI builds its flags from it, the Flower
apps read it from ``context.run_config`` (``[tool.flwr.app.config]`` in pyproject.toml mirrors it
key for key and value for value, which a test checks), and results files record it. Keys are
kebab-case in flat form (``lambda-c``), snake_case as attributes. Empty strings mean "not set" for
optional paths. The defaults are the federated run's; ``CENTRAL_DEFAULTS`` names the centralized
trainer's deliberate differences. ``validate`` is the one place a configuration is checked; the
training, memory and prototype settings are derived from a validated config
(``feddmmr_flower.experiment``), never built with defaults of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError
from .losses import LOSSES
from .models.feddmmr import VARIANTS

DP_MODES = ("off", "central-fixed", "local")
STRATEGIES = ("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox", "fedmedian", "fedtrimmedavg")


@dataclass
class ExperimentConfig:
    # data
    dataset: str = "ml-100k"
    data_dir: str = "data/ml-100k"
    cache_dir: str = "data/cache"
    items_file: str = ""
    top_users: int = 0  # 0: every user
    min_seq_len: int = 5
    download_url: str = ""
    # item features
    text_features: bool = True
    descriptions: str = ""  # JSON {raw item id: text}; else "title — genres"
    text_model: str = ""  # sentence-transformers name or path; "" = offline all-MiniLM-L6-v2
    visual_features: bool = False  # needs posters-dir
    posters_dir: str = ""
    movies_dat: str = ""  # ML-1M movies.dat, to map ML-100K titles to posters
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = ""  # open_clip tag or local weights file; "" = random init (labelled)
    # model
    variant: str = "full"
    hidden: int = 64
    maxlen: int = 200
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    expert_heads: int = 2
    # optimisation
    loss: str = "ce"
    negatives: int = 100
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    lambda_c: float = 0.1
    lambda_lb: float = 0.01
    surprise_alpha: float = 1.0
    temperature: float = 0.07
    stage_schedule: str = "pretrain:120,align:5,finetune:25"
    # memory and prototypes
    memory_capacity: int = 50
    memory_topk: int = 20
    surprise_threshold: float = 1.0
    max_writes: int = 10
    num_prototypes: int = 5
    min_cluster_size: int = 3
    prototype_noise: float = 1.5  # N(0, noise^2) per released centroid coordinate (docs/privacy.md)
    prototype_ema: float = 0.5
    # federation (ignored by the centralized trainer)
    strategy: str = "fedadam"
    fraction_train: float = 0.1
    local_epochs: int = 1
    client_lr: float = 0.05  # plain SGD on the client (travels as the instruction entry "client-lr")
    server_lr: float = 1e-2  # FedAdam/FedYogi/FedAdagrad eta, FedAvgM server learning rate
    server_tau: float = 1e-9  # FedAdam/FedYogi/FedAdagrad epsilon; Flower's 1e-3 swamps one-step client updates
    proximal_mu: float = 0.0  # FedProx
    min_available_nodes: int = 2
    eval_users: int = 150  # fixed validation sample every eval-every rounds (0: all users)
    resume_from: str = ""  # a run folder (or its last.pt): continue that run where it stopped
    init_from: str = ""  # a checkpoint (.pt) whose model weights start this run
    fault_nan_partition: int = -1  # testing only: this partition replies with NaN arrays
    client_state_dir: str = ""  # node-local folder for client memories ("" = off; node-config state-dir wins)
    # privacy (docs/privacy.md): DP on the model arrays, SecAgg+ for their sum
    dp_mode: str = "off"  # "off" | "central-fixed" (client clipping + server noise) | "local" (LocalDpMod)
    dp_clipping_norm: float = 0.1  # L2 bound on one client's update (typical norms here: 0.05-0.1)
    dp_noise_multiplier: float = 1.0  # central-fixed: noise std on the sum of updates = this x clipping norm
    dp_epsilon: float = 1.0  # local: LocalDpMod's per-release epsilon
    dp_delta: float = 1e-5  # local: LocalDpMod's delta; central: the delta epsilon is reported at
    secure_aggregation: bool = False  # SecAgg+ (Flower's workflow + secaggplus_mod) for the model arrays
    secagg_num_shares: int = 3  # SecAgg+ neighbours a client's secrets are shared with (itself included)
    secagg_threshold: int = 2  # shares needed to unmask a dropped client (< num-shares)
    secagg_clipping_range: float = 1.0  # SecAgg+ clips each update coordinate to +-this before quantising
    # evaluation and bookkeeping
    eval_every: int = 10
    # federated: test every user with the best model at the end (false: skip it, e.g. for 100k-user
    # scaling runs, where it means 100k evaluate messages)
    final_test: bool = True
    eval_negatives: int = 100
    eval_seed: int = 0
    patience: int = 10
    seed: int = 42
    device: str = "cpu"
    output_dir: str = "outputs"
    run_name: str = ""

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], strict: bool = False) -> ExperimentConfig:
        """Build from kebab-case keys (a Flower run config); unknown keys are ignored unless ``strict``."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                if strict:
                    raise ConfigError(f"unknown config key {key!r}")
                continue
            kwargs[name] = coerce(key, value, known[name].type)
        return cls(**kwargs)

    def flat(self) -> dict[str, Any]:
        return {kebab(k): v for k, v in asdict(self).items()}


def kebab(name: str) -> str:
    return name.replace("_", "-")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a run-config value to the field's type, with an error naming the key."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None


#: The centralized trainer's deliberate differences from the federated defaults (``train-central``).
CENTRAL_DEFAULTS: dict[str, Any] = {
    "stage-schedule": "pretrain:200",  # epochs over every user, where a round trains 10% of them once
    "prototype-noise": 0.0,  # nothing is released: the noise protects prototypes that leave a client
    "eval-every": 5,  # an epoch is ~10 rounds of work: validate every 5 epochs
}

#: Settings that describe a node's own disk and hardware, not the experiment: a SuperNode's
#: ``--node-config`` may set them (and wins over the run config, which is the same for every node).
NODE_LOCAL_KEYS = ("data-dir", "cache-dir", "items-file", "descriptions", "posters-dir", "movies-dat", "device")


def central_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """The configuration of a centralized run: ``values`` over ``CENTRAL_DEFAULTS`` over the defaults."""
    return ExperimentConfig.from_flat({**CENTRAL_DEFAULTS, **values}, strict=True)


def validate(cfg: ExperimentConfig) -> None:
    """Every check of a configuration (``ConfigError`` naming the key), run on every construction."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"variant: unknown {cfg.variant!r}, choose one of {', '.join(VARIANTS)}")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy: unknown {cfg.strategy!r}, choose one of {', '.join(STRATEGIES)}")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss: unknown {cfg.loss!r}, choose one of {', '.join(LOSSES)}")
    positive = (
        "min_seq_len",
        "hidden",
        "maxlen",
        "blocks",
        "heads",
        "expert_heads",
        "negatives",
        "batch_size",
        "memory_capacity",
        "memory_topk",
        "max_writes",
        "num_prototypes",
        "min_cluster_size",
        "eval_every",
        "eval_negatives",
        "patience",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{kebab(name)} must be >= 1, got {getattr(cfg, name)}")
    non_negative = ("top_users", "weight_decay", "lambda_c", "lambda_lb", "surprise_alpha", "prototype_noise")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{kebab(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "client_lr", "server_lr", "server_tau"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{kebab(name)} must be > 0, got {getattr(cfg, name)}")
    if not 0 < cfg.fraction_train <= 1:
        raise ConfigError(f"fraction-train must be in (0, 1], got {cfg.fraction_train}")
    if cfg.local_epochs < 1:
        raise ConfigError(f"local-epochs must be >= 1, got {cfg.local_epochs}")
    if cfg.eval_users < 0 or cfg.proximal_mu < 0 or cfg.min_available_nodes < 1:
        raise ConfigError("eval-users and proximal-mu must be >= 0, min-available-nodes >= 1")
    if cfg.visual_features and not cfg.posters_dir and cfg.variant != "sasrec":
        raise ConfigError(
            "visual-features is on but posters-dir is empty: set posters-dir (a folder of "
            "<item>.jpg posters) or visual-features=false"
        )
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.prototype_ema <= 1:
        raise ConfigError(f"prototype-ema must be in (0, 1], got {cfg.prototype_ema}")
    if cfg.memory_topk > cfg.memory_capacity:
        raise ConfigError(f"memory-topk ({cfg.memory_topk}) cannot exceed memory-capacity ({cfg.memory_capacity})")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    _check_privacy(cfg)
    from .stages import StageSchedule

    StageSchedule.parse(cfg.stage_schedule)  # fail early on a bad schedule


def _check_privacy(cfg: ExperimentConfig) -> None:
    if cfg.dp_mode not in DP_MODES:
        raise ConfigError(f"dp-mode: unknown {cfg.dp_mode!r}, choose one of {', '.join(DP_MODES)}")
    for name in ("dp_clipping_norm", "dp_epsilon", "secagg_clipping_range"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{kebab(name)} must be > 0, got {getattr(cfg, name)}")
    if cfg.dp_noise_multiplier < 0 or (cfg.dp_mode == "central-fixed" and not cfg.dp_noise_multiplier > 0):
        raise ConfigError(
            f"dp-noise-multiplier must be > 0 with dp-mode='central-fixed', got {cfg.dp_noise_multiplier}"
        )
    if not 0 < cfg.dp_delta < 1:
        raise ConfigError(f"dp-delta must be in (0, 1), got {cfg.dp_delta}")
    if not 3 <= cfg.secagg_num_shares or not 2 <= cfg.secagg_threshold < cfg.secagg_num_shares:
        raise ConfigError(
            f"secagg-num-shares must be >= 3 and 2 <= secagg-threshold < secagg-num-shares, "
            f"got {cfg.secagg_num_shares} and {cfg.secagg_threshold}"
        )
    if cfg.secure_aggregation and cfg.dp_mode == "central-fixed":
        raise ConfigError(
            "secure-aggregation cannot be combined with dp-mode='central-fixed' (the server clips "
            "and noises individual replies, which SecAgg+ hides); use dp-mode='local'"
        )
    if (cfg.secure_aggregation or cfg.dp_mode == "central-fixed") and cfg.strategy in (
        "fedmedian",
        "fedtrimmedavg",
    ):
        raise ConfigError(
            f"strategy {cfg.strategy!r} needs every client's update; it cannot run with "
            "secure-aggregation or dp-mode='central-fixed' (they release only a mean)"
        )
