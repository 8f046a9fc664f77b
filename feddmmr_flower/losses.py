"""Recommendation losses and vectorised negative sampling.

Every loss returns a *per-position* tensor [B, L] (0 at padding): the memory uses it as the
surprise signal, and the caller decides how to reduce it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "bce", "bpr")


def sample_negatives(
    exclude: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None, max_rounds: int = 16
) -> torch.Tensor:
    """Uniform item ids in [1, num_items] not marked in ``exclude`` [B, num_items + 1].

    Rejection sampling on the whole tensor at once; the rare leftovers after ``max_rounds``
    are drawn exactly from each row's allowed set. ``shape`` is (B, ...).
    """
    batch, num_ids = exclude.shape
    if (~exclude[:, 1:]).sum(dim=1).min() == 0:
        raise ValueError("a user has interacted with every item: no negative can be sampled")
    device = exclude.device
    flat = torch.randint(1, num_ids, shape, generator=generator, device=device).view(batch, -1)
    for _ in range(max_rounds):
        bad = exclude.gather(1, flat)
        if not bad.any():
            return flat.view(shape)
        redraw = torch.randint(1, num_ids, (int(bad.sum()),), generator=generator, device=device)
        flat[bad] = redraw
    bad = exclude.gather(1, flat)
    rows = bad.any(dim=1).nonzero().flatten()
    for row in rows.tolist():  # at most a handful of rows ever reach this
        allowed = (~exclude[row]).float()
        allowed[0] = 0
        count = int(bad[row].sum())
        flat[row, bad[row]] = torch.multinomial(allowed, count, replacement=True, generator=generator)
    return flat.view(shape)


def recommendation_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, real: torch.Tensor, kind: str = "ce"
) -> torch.Tensor:
    """Per-position loss [B, L] from positive logits [B, L] and negative logits [B, L, n]."""
    if kind == "ce":  # sampled softmax: the positive against its n negatives
        logits = torch.cat([pos_logits.unsqueeze(-1), neg_logits], dim=-1)
        loss = torch.logsumexp(logits, dim=-1) - pos_logits
    elif kind == "bce":  # SASRec's original: sigmoid on positive and each negative
        loss = F.softplus(-pos_logits) + F.softplus(neg_logits).mean(dim=-1)
    elif kind == "bpr":
        loss = F.softplus(neg_logits - pos_logits.unsqueeze(-1)).mean(dim=-1)
    else:
        raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
    return loss * real


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)
