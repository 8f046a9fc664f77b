"""FedDMMR ServerApp: reads the run config and drives the federated run (see federation.py)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from feddmmr_flower.config import ExperimentConfig

from .federation import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    FederatedRun(grid, ExperimentConfig.from_flat(context.run_config)).run()
