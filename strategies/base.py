"""Base Flower aggregation strategies, selectable by name from the run config.

FedDMMR adds prototypes, stages and reply validation on top of one of Flower's stock
message-based strategies; this module only builds that stock strategy.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

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
