"""Server-side FedDMMR strategy: stock Flower aggregation + stages + prototypes + reply checks.

``FedDMMRStrategy`` builds each round's instructions and turns a collector's ``RoundReplies`` into
the new model; a collector (``PlainCollector``, ``SecAggPlusCollector``) moves the messages and
checks the replies; ``BaseAggregation`` wraps the stock Flower strategy; ``dp`` holds the server
side of the DP modes.
"""

from .base import BASE_STRATEGIES, BaseAggregation, make_base_strategy
from .collect import Collector, PlainCollector, read_train_replies
from .evaluate import BestModel, EvaluationOptions
from .feddmmr import FedDMMRStrategy
from .prototypes import PrototypeOptions
from .secagg import SecAggPlusCollector

__all__ = [
    "BASE_STRATEGIES",
    "BaseAggregation",
    "BestModel",
    "Collector",
    "EvaluationOptions",
    "FedDMMRStrategy",
    "PlainCollector",
    "PrototypeOptions",
    "SecAggPlusCollector",
    "make_base_strategy",
    "read_train_replies",
]
