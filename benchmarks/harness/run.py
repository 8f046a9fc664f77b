"""A whole ``FederatedRun`` (the ServerApp's round loop) over an ``InProcessGrid``."""

from __future__ import annotations

from collections.abc import Callable

from feddmmr_flower.config import ExperimentConfig
from server_app.federation import FederatedRun
from strategies import PlainCollector

from .grid import InProcessGrid, Tap, direct_exchange, server_identity


def run_federation(
    run_config: dict,
    num_nodes: int,
    tap: Tap | None = None,
    direct: bool = False,
    after_round: Callable[[int], None] | None = None,
) -> dict:
    """One ``FederatedRun`` of ``num_nodes`` users; returns its summary.

    ``direct``: train messages skip serialisation and the client mods (``direct_exchange``);
    ``after_round``: called with the round number once each round is recorded."""
    with server_identity():
        cfg = ExperimentConfig.from_flat(run_config)
        run = FederatedRun(InProcessGrid(cfg.flat(), num_nodes, tap), cfg)
        if direct:
            run.collector = PlainCollector(exchange=direct_exchange)
        run.after_round = after_round
        return run.run()
