"""The one evaluation protocol (DESIGN §5), used by every model, baseline and Flower client.

Protocols
  * ``sampled``: the held-out item + ``num_negatives`` (default 100) items drawn uniformly
    *without replacement* from the real items the user never interacted with (whole history,
    held-out items included). Drawn once per (user, split) from a generator seeded by
    ``(seed, split, user)``, so every model, every round and every federated client (which
    knows only its own user) sees the same candidates.
  * ``full``: every real item is ranked; the user's other history items are excluded.

Tie rule ("average"): rank = 1 + #candidates scoring strictly higher + 0.5 · #other candidates
scoring exactly the same. A model that scores everything equally gets the expected rank of a
random ordering, not rank 1. Ranks may therefore be fractional; HR@k counts rank ≤ k.

Metrics: HR@{5,10,20}, NDCG@{5,10,20} (= 1/log2(1+rank) when rank ≤ k), MRR (= 1/rank),
each the mean over users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .data.sequences import SequenceData
from .errors import ConfigError

KS = (5, 10, 20)
PROTOCOLS = ("sampled", "full")
TIE_RULE = "average"
_SPLIT_SEED = {"valid": 1, "test": 2}

# scorer(users, input_window [B, L], candidates [B, C] or None for all items) -> scores [B, C | num_items+1]
Scorer = Callable[[np.ndarray, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def sample_candidates(
    data: SequenceData, users: np.ndarray, split: str, num_negatives: int = 100, seed: int = 0
) -> np.ndarray:
    """[B, 1 + num_negatives] item ids: column 0 the held-out target, then the negatives."""
    users = data.check_users(users)
    history = data.history_mask(users, "all")
    available = (~history).sum(axis=1)
    if (available < num_negatives).any():
        worst = int(users[np.argmin(available)])
        raise ConfigError(
            f"user {worst} has only {int(available.min())} never-interacted items, fewer than "
            f"num_negatives={num_negatives}: lower eval-negatives"
        )
    split_id = _SPLIT_SEED[split]
    # One generator per user (not per batch) so that a user's candidates never depend on
    # which other users share the batch -- a federated client computes its own alone.
    keys = np.stack([np.random.default_rng((seed, split_id, int(u))).random(data.num_items + 1) for u in users])
    keys[history] = np.inf
    negatives = np.argpartition(keys, num_negatives - 1, axis=1)[:, :num_negatives]
    negatives = np.sort(negatives, axis=1)
    return np.concatenate([data.target(users, split)[:, None], negatives], axis=1)


def rank_of_first(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of column 0 among the valid columns of each row, with the average tie rule."""
    target = scores[:, :1]
    others = torch.ones_like(scores, dtype=torch.bool)
    others[:, 0] = False
    if valid is not None:
        others &= valid
    # NaN compares false with everything: a diverged model would get rank 1 (HR = 1.0).
    if torch.isnan(target).any() or torch.isnan(scores[others]).any():
        raise ValueError("scores contain NaN (diverged model?): ranks would be meaningless")
    higher = ((scores > target) & others).sum(dim=1)
    ties = ((scores == target) & others).sum(dim=1)
    return 1.0 + higher.double() + 0.5 * ties.double()


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    if ranks.numel() == 0:
        return {}
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).mean())
    out["MRR"] = float((1.0 / ranks).mean())
    return out


HISTORY_EDGES = (50, 150)  # training items: the per-history-length breakdown's buckets


@dataclass
class EvalResult:
    """Per-user ranks of one split under each protocol; metrics are derived, never stored twice."""

    split: str
    users: np.ndarray
    ranks: dict[str, np.ndarray]

    def metrics(self, protocol: str, mask: np.ndarray | None = None) -> dict[str, float]:
        ranks = self.ranks[protocol]
        return metrics_from_ranks(ranks if mask is None else ranks[mask])

    def summary(self) -> dict[str, dict[str, float]]:
        return {protocol: self.metrics(protocol) for protocol in self.ranks}

    def by_history_length(self, data: SequenceData, edges: tuple[int, ...] = HISTORY_EDGES) -> dict:
        """Metrics per bucket of training-history length: ≤ e0, e0+1..e1, > e1."""
        return {
            name: {"num_users": int(mask.sum()), **{p: self.metrics(p, mask) for p in self.ranks}}
            for name, mask in history_buckets(data.train_lengths(self.users), edges).items()
        }


def history_buckets(lengths: np.ndarray, edges: tuple[int, ...] = HISTORY_EDGES) -> dict[str, np.ndarray]:
    """{"<=50": mask, "51-150": mask, ">150": mask} over users' training-history lengths."""
    lengths = np.asarray(lengths)
    bounds = (0,) + tuple(edges) + (np.iinfo(np.int64).max,)
    out = {}
    for low, high in zip(bounds[:-1], bounds[1:]):
        name = f"<={high}" if low == 0 else (f">{low}" if high == bounds[-1] else f"{low + 1}-{high}")
        out[name] = (lengths > low) & (lengths <= high)
    return out


@torch.no_grad()
def evaluate(
    data: SequenceData,
    scorer: Scorer,
    split: str,
    *,
    maxlen: int,
    users: np.ndarray | None = None,
    protocols: Iterable[str] = PROTOCOLS,
    num_negatives: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    candidates_cache: dict | None = None,
) -> EvalResult:
    """Rank the held-out item of ``split`` for ``users`` (default: all) under each protocol."""
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    protocols = tuple(protocols)
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}: choose from {PROTOCOLS}")
    users = np.arange(data.num_users) if users is None else data.check_users(users)
    ranks: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        inputs = torch.as_tensor(data.input_window(batch, split, maxlen), device=device)
        # Scores are per item, so with both protocols one pass over the catalogue serves both.
        full_scores = scorer(batch, inputs, None).float() if "full" in protocols else None
        if "sampled" in protocols:
            key = (split, num_negatives, seed)
            if candidates_cache is not None and key in candidates_cache:
                cand = candidates_cache[key][batch]
            else:
                cand = sample_candidates(data, batch, split, num_negatives, seed)
            cand_t = torch.as_tensor(cand, device=device)
            scores = full_scores.gather(1, cand_t) if full_scores is not None else scorer(batch, inputs, cand_t).float()
            ranks["sampled"].append(rank_of_first(scores).cpu())
        if full_scores is not None:
            scores = full_scores
            target = torch.as_tensor(data.target(batch, split), device=device)
            valid = ~torch.as_tensor(data.history_mask(batch, "all"), device=device)
            valid[torch.arange(len(batch), device=device), target] = True
            # Put the target in column 0 so that rank_of_first applies unchanged.
            order = torch.cat([target[:, None], torch.arange(scores.shape[1], device=device).expand(len(batch), -1)], 1)
            valid_ordered = torch.cat([torch.ones_like(target[:, None], dtype=torch.bool), valid], 1)
            valid_ordered[torch.arange(len(batch), device=device), 1 + target] = False
            ranks["full"].append(rank_of_first(scores.gather(1, order), valid_ordered).cpu())
    return EvalResult(split, users, {p: torch.cat(r).numpy() for p, r in ranks.items()})


def all_candidates(data: SequenceData, split: str, num_negatives: int = 100, seed: int = 0) -> dict:
    """Precompute sampled candidates for every user once (a cache for ``evaluate``)."""
    users = np.arange(data.num_users)
    return {(split, num_negatives, seed): sample_candidates(data, users, split, num_negatives, seed)}
