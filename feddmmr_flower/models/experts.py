"""The memory experts' building blocks: the slots a batch of users' memories become, the cosine
attention that reads them (``MemoryExpert``), and the InfoNCE loss that aligns the two modalities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Slots:
    """Memory slots of a batch of users, earliest source position first (prototypes first of all)."""

    vis: torch.Tensor  # [B, S, D] projected image features
    txt: torch.Tensor  # [B, S, D] projected text features
    vis_ok: torch.Tensor  # [B, S] slot valid and has an image
    txt_ok: torch.Tensor  # [B, S] slot valid and has a text
    positions: torch.Tensor  # [B, S] source position (-1: prototype, int64 max: empty)


class MemoryExpert(nn.Module):
    """Multi-head cosine attention from candidate queries over memory slots."""

    def __init__(self, hidden: int, heads: int, scale: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, scale
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def _logits(self, queries: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine logits [B, Q, H, S] and head-split values [B, S, H, dh]."""
        q = F.normalize(self._heads(self.query(queries)), dim=-1)
        k = F.normalize(self._heads(self.key(slots)), dim=-1)
        logits = torch.einsum("bqhd,bshd->bqhs", q, k) * self.scale
        return logits, self._heads(self.value(slots))

    def forward(self, queries: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Outputs [B, Q, D] for queries [B, Q, D] over slots [B, S, D] with ``visible`` [B, Q, S]."""
        logits, values = self._logits(queries, slots)
        logits = logits.masked_fill(~visible[:, :, None, :], -math.inf)
        weights = torch.softmax(logits, -1).nan_to_num(0.0)  # no visible slot: output 0
        out = torch.einsum("bqhs,bshd->bqhd", weights, values)
        return out.flatten(-2)

    def attention(self, queries: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The weights [B, Q, S] ``forward`` reads the slots with, averaged over heads (explanations)."""
        logits, _ = self._logits(queries, slots)
        logits = logits.masked_fill(~visible[:, :, None, :], -math.inf)
        return torch.softmax(logits, -1).nan_to_num(0.0).mean(2)

    def prefix_scores(
        self, queries: torch.Tensor, slots: torch.Tensor, usable: torch.Tensor, norm: nn.LayerNorm, emb: torch.Tensor
    ) -> torch.Tensor:
        """``norm(output) · emb`` [B, Q, S + 1] when only the first k slots are visible, k = 0..S.

        Exact closed form, so no [B, Q, S + 1, D] output is ever built: with attention weights
        w_s (per head) the output of head h is x_h = Σ w_s v_s / Σ w_s, and
        LN(x)·e = ((γ⊙e)·x − mean(x)·Σ(γ⊙e)) / sqrt(var(x) + ε) + β·e, where (γ⊙e)·x, mean(x)
        and mean(x²) are prefix sums of per-slot scalars (the last one through the slots' Gram
        matrix). Cost O(B·Q·H·S²) scalars instead of O(B·Q·S·D) vectors.
        """
        logits, values = self._logits(queries, slots)  # [B,Q,H,S], [B,S,H,dh]
        # float64: a prefix may hold only slots far below the row's best logit (exp(-2·scale)),
        # and its squared weights must not underflow. These tensors are small ([B, Q, H, S]).
        logits, values, emb = logits.double(), values.double(), emb.double()
        w = torch.exp(logits - self.scale) * usable[:, None, None, :]
        dim = queries.shape[-1]
        u = self._heads(norm.weight.double() * emb)  # γ⊙e per head [B, Q, H, dh]

        def prefix(x: torch.Tensor) -> torch.Tensor:  # Σ_{s<k} x_s for k = 0..S
            return F.pad(torch.cumsum(x, -1), (1, 0))

        den = prefix(w).clamp(min=1e-300)
        vu = torch.einsum("bshd,bqhd->bqhs", values, u)
        x_dot_u = (prefix(w * vu) / den).sum(2)  # (γ⊙e)·x  [B, Q, S+1]
        mean = (prefix(w * values.sum(-1).transpose(1, 2)[:, None]) / den).sum(2) / dim
        gram = torch.einsum("bshd,bthd->bhst", values, values)  # [B, H, S, S]
        lower = torch.ones(gram.shape[-1], gram.shape[-1], dtype=torch.bool, device=gram.device).tril(-1)
        cross = torch.einsum("bqht,bhst->bqhs", w, gram * lower)  # Σ_{t<s} w_t G_st
        diag = torch.diagonal(gram, dim1=-2, dim2=-1)[:, None]  # [B, 1, H, S]
        sq = prefix(2 * w * cross + w * w * diag) / (den * den).clamp(min=1e-300)  # Σ_d x_h,d² per head
        mean_sq = sq.sum(2) / dim
        var = (mean_sq - mean * mean).clamp(min=0)
        u_sum = u.sum((-1, -2))[..., None]
        beta_e = (norm.bias.double() * emb).sum(-1)[..., None]
        return ((x_dot_u - mean * u_sum) / torch.sqrt(var + norm.eps) + beta_e).float()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, weights: torch.Tensor | None = None):
    """Symmetric InfoNCE between matching rows of a and b (None when fewer than 2 rows)."""
    if len(a) < 2:
        return None
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(len(a), device=a.device)
    per_row = 0.5 * (
        F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")
    )
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum()
