"""The real ServerApp round loop and the real ClientApp in one process, for benchmarks and tests.

``InProcessGrid`` hands every message to the real ClientApp (with its mods) after a protobuf round
trip (``flwr.common.serde``), as a SuperLink would; ``run_federation`` runs a whole ``FederatedRun``
over it: the same strategy, client code and outputs as ``flwr run``, only without Ray and the
SuperLink. ``direct_exchange`` skips even the messages' transport (the benchmarks' "floor").
"""

from .grid import CLIENT_EXCEPTION, InProcessGrid, Tap, direct_exchange, server_identity, wire
from .run import run_federation

__all__ = ["CLIENT_EXCEPTION", "InProcessGrid", "Tap", "direct_exchange", "run_federation", "server_identity", "wire"]
