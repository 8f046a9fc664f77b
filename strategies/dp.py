"""Differential privacy for FedDMMR's model arrays, composed with the stage-aware strategy.

Two modes (run config ``dp-mode``):

* ``central-fixed`` — every client clips its update to ``dp-clipping-norm`` (Flower's
  ``fixedclipping_mod``, see ``client_app/privacy_mods.py``); the server averages the clipped
  updates *uniformly* and adds Gaussian noise with Flower's
  ``DifferentialPrivacyClientSideFixedClipping`` wrapped around a plain ``FedAvg``. Only that
  noised mean reaches the base strategy (FedAdam, FedYogi, ...), as one pre-aggregated reply:
  the server optimiser is post-processing of a DP release. (Wrapping FedAdam itself, as Flower's
  examples do with FedAvg, would add the noise *after* the Adam step, whose output is not a
  bounded-sensitivity function of the client updates, so it would not be DP.)
* ``local`` — every client clips and noises its own update (Flower's ``LocalDpMod``); the server
  aggregates as usual and only counts how often each node released an update, for the report.

Both plug into ``FedDMMRStrategy(privacy=...)`` (its ``PrivacyHook``): ``before_aggregation`` gets
the round's accepted updates (trained tensors + weight) and returns what the base strategy aggregates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.privacy import RdpAccountant, local_dp_epsilon, local_dp_noise_std
from feddmmr_flower.replies import WeightedUpdate
from feddmmr_wire import to_numpy, to_record
from feddmmr_wire.keys import NUM_EXAMPLES

from .base import reply_message

logger = logging.getLogger("flwr.feddmmr")


@dataclass
class Release:
    """One round's accepted updates as a DP mode sees them before the base strategy does.

    nodes: the accepted nodes (each released an update); current: the trained tensors' values
    before the round; sampled: the nodes sent an instruction (the DP mean's denominator); left_out:
    connected nodes not in the draw because they said they have nothing to train."""

    server_round: int
    nodes: list[int]
    updates: list[WeightedUpdate]
    current: dict[str, np.ndarray]
    sampled: int
    left_out: int = 0


class PrivacyHook(Protocol):
    """The server side of a DP mode: returns what the base strategy aggregates instead of the updates."""

    def before_aggregation(self, release: Release) -> list[WeightedUpdate]: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CentralFixedClippingDP:
    """Uniform mean of clipped updates + N(0, (z·C/m)²) per coordinate, m = clients sampled this round.

    Replies are re-clipped on the server (a no-op for an honest ``fixedclipping_mod`` client, a
    guarantee for any other); clients sampled but rejected, silent or with nothing to train count as
    zero updates, so the denominator m (and with it the sensitivity C/m of the mean) never depends on
    the replies. The accountant's sampling rate is m over the nodes the round drew from: connected
    nodes minus those left out for having nothing to train (they can never be drawn).
    """

    def __init__(self, clipping_norm: float, noise_multiplier: float, delta: float) -> None:
        self.clipping_norm, self.noise_multiplier = clipping_norm, noise_multiplier
        self.accountant = RdpAccountant(delta)
        self.population = 0  # connected nodes (set by the server loop before the first round)
        self.last: dict[str, float] = {}

    def before_aggregation(self, release: Release) -> list[WeightedUpdate]:
        updates, current = release.updates, release.current
        if not updates:
            return updates
        names = list(current)
        base = [current[n] for n in names]
        clipped, server_clipped = [], 0
        for update in updates:
            arrays = [update.arrays[n].astype(np.float64) for n in names]
            norm = get_norm([a - b for a, b in zip(arrays, base)])
            if norm > self.clipping_norm * (1 + 1e-4):
                server_clipped += 1
            if norm > self.clipping_norm:  # (Flower's clip divides by the norm: skip a zero update)
                compute_clip_model_update(arrays, base, self.clipping_norm)
            clipped.append(reply_message(update.node_id, to_record(dict(zip(names, arrays))), 1.0))
        zero = to_record(dict(zip(names, base)))
        padded = clipped + [reply_message(0, zero, 1.0) for _ in range(max(0, release.sampled - len(clipped)))]
        wrapper = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(weighted_by_key=NUM_EXAMPLES), self.noise_multiplier, self.clipping_norm, len(padded)
        )
        mean, _ = wrapper.aggregate_train(release.server_round, padded)
        if mean is None:
            return []
        population = max(self.population - release.left_out, len(padded))
        self.accountant.compose(len(padded) / population, self.noise_multiplier)
        self.last = {
            "dp-noise-std": compute_stdv(self.noise_multiplier, self.clipping_norm, len(padded)),
            "dp-server-clipped": float(server_clipped),
            "dp-zero-padded": float(len(padded) - len(clipped)),
            "dp-epsilon": self.accountant.epsilon(),
            "dp-epsilon-no-amplification": self.accountant.epsilon(amplified=False),
        }
        values = to_numpy(mean)
        out = {n: np.ascontiguousarray(values[n], dtype=current[n].dtype) for n in names}
        return [WeightedUpdate(updates[0].node_id, float(sum(u.weight for u in updates)), out)]

    def metrics(self) -> dict[str, float]:
        return dict(self.last)

    def report(self) -> dict[str, Any]:
        q = [e[0] for e in self.accountant.events]
        return {
            "dp-mode": "central-fixed",
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.accountant.delta,
            "releases": self.accountant.releases,
            "sampling_rate": {"min": min(q), "max": max(q)} if q else None,
            "epsilon": round(self.accountant.epsilon(), 4),
            "epsilon_no_amplification": round(self.accountant.epsilon(amplified=False), 4),
            "accountant": "RDP of the Poisson-subsampled Gaussian mechanism (integer orders 2-512), q = sampled/"
            "eligible nodes per round (connected, less those that said they have nothing to train), "
            "composed over rounds, converted to (epsilon, delta) with Canonne-Kamath-Steinke 2020; Flower samples a fixed-size subset without replacement, "
            "for which Poisson amplification is the usual approximation. epsilon_no_amplification "
            "ignores sampling and holds for any sampling scheme. Client-level, add/remove one "
            "client, model arrays only (prototypes and metrics are not covered).",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "population": self.population}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant = RdpAccountant.from_state(state["accountant"])
        self.population = int(state["population"])


class LocalDPReport:
    """Local DP needs nothing from the server; this only counts releases per node for the report."""

    def __init__(self, clipping_norm: float, epsilon: float, delta: float) -> None:
        self.clipping_norm, self.epsilon, self.delta = clipping_norm, epsilon, delta
        self.noise_std = local_dp_noise_std(clipping_norm, epsilon, delta)
        self.releases: dict[int, int] = {}

    def before_aggregation(self, release: Release) -> list[WeightedUpdate]:
        for node in release.nodes:
            self.releases[node] = self.releases.get(node, 0) + 1
        return release.updates

    def metrics(self) -> dict[str, float]:
        return {
            "dp-noise-std": self.noise_std,
            "dp-max-releases-per-node": float(max(self.releases.values(), default=0)),
        }

    def report(self) -> dict[str, Any]:
        most = max(self.releases.values(), default=0)
        return {
            "dp-mode": "local",
            "clipping_norm": self.clipping_norm,
            "sensitivity": self.clipping_norm,
            "epsilon_per_release": self.epsilon,
            "delta": self.delta,
            "noise_std": round(self.noise_std, 6),
            "epsilon_per_release_rdp": round(local_dp_epsilon(self.clipping_norm, self.noise_std, self.delta, 1), 4),
            "max_releases_per_node": most,
            "epsilon_composed_max_node": round(
                local_dp_epsilon(self.clipping_norm, self.noise_std, self.delta, most), 4
            ),
            "accountant": "LocalDpMod: sigma = C*sqrt(2 ln(1.25/delta))/epsilon per release (classic Gaussian "
            "mechanism, proven for epsilon < 1; epsilon_per_release_rdp is the RDP-derived epsilon of "
            "the same sigma). epsilon_composed_max_node: RDP composition over the releases of the "
            "node that released most often. Sensitivity = clipping norm (add/remove); "
            "model arrays only.",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"releases": dict(self.releases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.releases = {int(k): int(v) for k, v in state["releases"].items()}


def make_dp(cfg: ExperimentConfig) -> CentralFixedClippingDP | LocalDPReport | None:
    """The server side of ``cfg.dp_mode`` (None when off)."""
    if cfg.dp_mode == "central-fixed":
        return CentralFixedClippingDP(cfg.dp_clipping_norm, cfg.dp_noise_multiplier, cfg.dp_delta)
    if cfg.dp_mode == "local":
        return LocalDPReport(cfg.dp_clipping_norm, cfg.dp_epsilon, cfg.dp_delta)
    return None
