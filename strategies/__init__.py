"""Server-side FedDMMR strategy: stock Flower aggregation + stages + prototypes + reply checks."""

from feddmmr_flower.prototype_aggregation import PrototypeAggregation, aggregate_prototypes, match_to_prototypes
from feddmmr_flower.stages import STAGES, StageSchedule, StageSegment, parse_stage_schedule

from .base import BASE_STRATEGIES, make_base_strategy
from .feddmmr import BestModel, FedDMMRStrategy, weighted_metrics

__all__ = [
    "BASE_STRATEGIES",
    "STAGES",
    "BestModel",
    "FedDMMRStrategy",
    "PrototypeAggregation",
    "StageSchedule",
    "StageSegment",
    "aggregate_prototypes",
    "make_base_strategy",
    "match_to_prototypes",
    "parse_stage_schedule",
    "weighted_metrics",
]
