"""Differential-privacy bookkeeping without Flower: what a run's noise is worth in (ε, δ).

Flower 1.41 ships an RDP accountant (``flwr.supercore.privacy_accounting``) that needs the
optional ``dp-accounting`` package, which this project does not depend on. This module is a
small, self-contained implementation of the standard Rényi-DP accountant for the (Poisson-)
subsampled Gaussian mechanism (Mironov, Talwar & Zhang 2019, integer orders, the same sum as
TF-Privacy's ``_compute_log_a_int``) with the (ε, δ) conversion of Canonne, Kamath & Steinke
(2020, Prop. 12) / Balle et al. (2020, Thm. 21), which dp-accounting also uses. Integer orders
only: the ε it returns is a valid upper bound, at most slightly looser than with fractional orders
(``tests/test_privacy.py`` pins it against dp-accounting's values for the same orders).

What is accounted: one Gaussian release per round of the *model arrays* (client-level DP,
add/remove-one-client adjacency, sensitivity = clipping norm of one client's update). Prototypes,
metrics and evaluation replies are separate releases and are not covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: RDP orders (integers: the closed-form sum below is exact for them).
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 384, 512)


def rdp_subsampled_gaussian(q: float, noise_multiplier: float, orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """RDP ε(α) of one Gaussian release with noise multiplier z, each client included w.p. q (Poisson).

    For integer α: ε(α) = log Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2z²)) / (α-1).
    With q = 1 this is the plain Gaussian mechanism, α / (2 z²).
    """
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    out = np.empty(len(orders))
    for j, alpha in enumerate(orders):
        if int(alpha) != alpha or alpha < 2:
            raise ValueError(f"orders must be integers >= 2, got {alpha}")
        alpha = int(alpha)
        if q == 1.0:
            out[j] = alpha / (2 * noise_multiplier**2)
            continue
        k = np.arange(alpha + 1, dtype=np.float64)
        log_binom = math.lgamma(alpha + 1) - np.array([math.lgamma(i + 1) + math.lgamma(alpha - i + 1) for i in k])
        terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * noise_multiplier**2)
        top = terms.max()
        out[j] = (top + math.log(np.exp(terms - top).sum())) / (alpha - 1)
    return out


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: tuple[int, ...] = ORDERS) -> tuple[float, int]:
    """(ε, best order) from cumulative RDP: min over α of ε(α) + log((α-1)/α) - (log δ + log α)/(α-1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp) + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), int(orders[best])


@dataclass
class RdpAccountant:
    """Composes per-round releases (sampling rate q, noise multiplier z) and reports ε at δ."""

    delta: float
    events: list[tuple[float, float, int]] = field(default_factory=list)  # (q, z, count)

    def compose(self, q: float, noise_multiplier: float, count: int = 1) -> None:
        if self.events and self.events[-1][:2] == (q, noise_multiplier):
            self.events[-1] = (q, noise_multiplier, self.events[-1][2] + count)
        else:
            self.events.append((q, noise_multiplier, count))

    @property
    def releases(self) -> int:
        return sum(c for _, _, c in self.events)

    def rdp(self, amplified: bool = True) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        for q, z, count in self.events:
            total += count * rdp_subsampled_gaussian(q if amplified else 1.0, z)
        return total

    def epsilon(self, amplified: bool = True) -> float:
        """ε at ``delta`` so far; ``amplified=False`` ignores sampling (valid for any sampling scheme)."""
        if not self.events:
            return 0.0
        return rdp_to_epsilon(self.rdp(amplified), self.delta)[0]

    def state_dict(self) -> dict:
        return {"delta": self.delta, "events": [list(e) for e in self.events]}

    @classmethod
    def from_state(cls, state: dict) -> RdpAccountant:
        return cls(float(state["delta"]), [(float(q), float(z), int(c)) for q, z, c in state["events"]])


def local_dp_noise_std(clipping_norm: float, epsilon: float, delta: float) -> float:
    """σ of Flower's LocalDpMod (classic Gaussian mechanism, sensitivity = clipping norm):
    C·sqrt(2 ln(1.25/δ))/ε. The classic bound is only proven for ε < 1; ``local_dp_epsilon``
    gives the RDP-derived ε of the same σ, valid for any ε."""
    return clipping_norm * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def local_dp_epsilon(clipping_norm: float, noise_std: float, delta: float, releases: int) -> float:
    """ε at δ of ``releases`` Gaussian releases of one user's clipped update (RDP composition)."""
    if releases < 1:
        return 0.0
    z = noise_std / clipping_norm
    return rdp_to_epsilon(releases * rdp_subsampled_gaussian(1.0, z), delta)[0]
