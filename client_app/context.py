"""What a ClientApp reads from its ``Context``: the experiment config (run config + node-local paths)
and the user (partition) the node serves."""

from __future__ import annotations

import functools

from flwr.app import Context

from feddmmr_flower.config import NODE_LOCAL_KEYS, ExperimentConfig
from feddmmr_wire.keys import PARTITION_ID


def experiment_config(context: Context) -> ExperimentConfig:
    """The run config, with the node's own paths and device (``--node-config``) winning over it."""
    node = {key: context.node_config[key] for key in NODE_LOCAL_KEYS if key in context.node_config}
    return _parsed(tuple(sorted({**dict(context.run_config), **node}.items())))


@functools.lru_cache(maxsize=8)
def _parsed(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_flat(dict(items))


def partition_id(context: Context) -> int:
    return int(context.node_config[PARTITION_ID])
