"""LocalDynamicMemory (DESIGN §3): a per-user, fixed-capacity memory of surprising items.

One object holds the memories of ``num_users`` users as [U, C] tensors, so the centralized
trainer updates a whole batch of users with tensor ops; a federated client holds one user
(U = 1) and serialises it to a few small arrays for Flower's ``context.state`` (~1 KB).

An entry stores only ids and counters: item id, the item's source position in the user's
sequence (the no-leakage mask needs it), write count, last-write step and surprise.
Embeddings and features are looked up by item id when needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

STATE_KEYS = ("item", "position", "freq", "last_write", "surprise", "step", "counters")
_COUNTERS = ("writes", "rewrites", "evictions", "passes")
NEVER = torch.iinfo(torch.int64).max  # position of an empty slot: never visible


@dataclass(frozen=True)
class MemoryConfig:
    """The first four come from the experiment (``feddmmr_flower.experiment.memory_config``, validated
    there); the utility weights are fixed by the design."""

    capacity: int
    topk: int  # slots retrieved for the experts (by utility)
    surprise_threshold: float  # surprise = loss / the user's mean loss in that pass
    max_writes: int  # at most this many (most surprising) writes per pass
    alpha: float = 0.6  # utility weight of recency
    beta: float = 0.4  # utility weight of frequency
    recency_decay: float = 0.9  # recency = decay ** (steps since last write)


class LocalDynamicMemory:
    """Memories of ``num_users`` users; every method takes the rows (users) it acts on."""

    def __init__(self, num_users: int, config: MemoryConfig) -> None:
        self.config = config
        shape = (num_users, self.config.capacity)
        self.item = torch.zeros(shape, dtype=torch.int64)  # 0 = empty slot
        self.position = torch.full(shape, NEVER, dtype=torch.int64)
        self.freq = torch.zeros(shape, dtype=torch.int64)
        self.last_write = torch.zeros(shape, dtype=torch.int64)
        self.surprise = torch.zeros(shape, dtype=torch.float32)
        self.step = torch.zeros(num_users, dtype=torch.int64)
        self.counters = torch.zeros(num_users, len(_COUNTERS), dtype=torch.int64)

    # ------------------------------------------------------------------ scoring
    def utility(self, rows: torch.Tensor) -> torch.Tensor:
        """α · recency + β · frequency score; -inf for empty slots (evicted first, never retrieved)."""
        age = (self.step[rows, None] - self.last_write[rows]).clamp(min=0).float()
        recency = self.config.recency_decay**age
        freq = self.freq[rows].float()
        freq_score = torch.log1p(freq) / torch.log1p(freq + 10.0)
        value = self.config.alpha * recency + self.config.beta * freq_score
        return torch.where(self.item[rows] > 0, value, torch.full_like(value, -math.inf))

    # ------------------------------------------------------------------- writes
    @torch.no_grad()
    def write(self, rows: torch.Tensor, items: torch.Tensor, positions: torch.Tensor, loss: torch.Tensor) -> dict:
        """Write the surprising items of one training pass.

        ``items``/``positions``/``loss`` are [B, L] (item 0 = no target at that position).
        Surprise = loss / the row's mean loss over real positions; items above the threshold
        (at most ``max_writes``, most surprising first) are written. A re-written item bumps its
        frequency, refreshes its write step, keeps its max surprise and earliest position; new
        items take empty slots or evict the lowest-utility entries.
        """
        rows = torch.as_tensor(rows, dtype=torch.int64)
        real = items > 0
        mean = (loss * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)
        surprise = torch.where(real, loss / mean.clamp(min=1e-12), torch.zeros_like(loss))
        self.step[rows] += 1
        self.counters[rows, _COUNTERS.index("passes")] += 1
        step = self.step[rows]

        # 1. candidates: top max_writes surprising positions above the threshold, one per item
        eligible = real & (surprise > self.config.surprise_threshold)
        score = torch.where(eligible, surprise, torch.full_like(surprise, -1.0))
        width = min(self.config.max_writes, score.shape[1])
        top_s, top_i = score.topk(width, dim=1)
        cand_item = torch.where(top_s >= 0, items.gather(1, top_i), torch.zeros_like(top_i))
        cand_pos = positions.gather(1, top_i)
        cand_sur = top_s.clamp(min=0)
        same = (cand_item[:, :, None] == cand_item[:, None, :]) & (cand_item[:, :, None] > 0)
        earlier = torch.ones(width, width, dtype=torch.bool).tril(-1)
        duplicate = (same & earlier[None]).any(2)  # keep the most surprising copy only
        cand_item = torch.where(duplicate, torch.zeros_like(cand_item), cand_item)

        # 2. re-writes of items already in memory
        mem_item = self.item[rows]
        hit = (cand_item[:, :, None] == mem_item[:, None, :]) & (cand_item[:, :, None] > 0)  # [B, W, C]
        hit_slot = hit.any(1)  # [B, C]
        sur_for_slot = torch.where(hit, cand_sur[:, :, None], torch.zeros_like(cand_sur[:, :, None])).amax(1)
        pos_for_slot = torch.where(hit, cand_pos[:, :, None], torch.full_like(cand_pos[:, :, None], NEVER)).amin(1)
        self.freq[rows] += hit_slot.long()
        self.last_write[rows] = torch.where(hit_slot, step[:, None], self.last_write[rows])
        self.surprise[rows] = torch.maximum(self.surprise[rows], sur_for_slot)
        self.position[rows] = torch.minimum(self.position[rows], pos_for_slot)
        rewrites = hit_slot.sum(1)

        # 3. new items: pool old entries + new ones, keep the top-capacity by utility
        new = (cand_item > 0) & ~hit.any(2)
        old_util = self.utility(rows)
        new_util = torch.full_like(cand_sur, self.config.alpha + self.config.beta * math.log(2) / math.log(12))
        new_util = torch.where(new, new_util, torch.full_like(new_util, -math.inf))
        pool_util = torch.cat([old_util, new_util], 1)
        keep = pool_util.topk(self.config.capacity, dim=1).indices  # [B, C]
        pool = {
            "item": torch.cat([mem_item, torch.where(new, cand_item, torch.zeros_like(cand_item))], 1),
            "position": torch.cat(
                [self.position[rows], torch.where(new, cand_pos, torch.full_like(cand_pos, NEVER))], 1
            ),
            "freq": torch.cat([self.freq[rows], new.long()], 1),
            "last_write": torch.cat([self.last_write[rows], step[:, None].expand_as(cand_item)], 1),
            "surprise": torch.cat([self.surprise[rows], cand_sur], 1),
        }
        kept_valid = pool_util.gather(1, keep) > -math.inf
        for name, values in pool.items():
            chosen = values.gather(1, keep)
            empty = {"item": 0, "position": NEVER, "freq": 0, "last_write": 0, "surprise": 0.0}[name]
            getattr(self, name)[rows] = torch.where(kept_valid, chosen, torch.full_like(chosen, empty))
        old_valid = (mem_item > 0).sum(1)
        new_written = new.sum(1)
        now_valid = kept_valid.sum(1)
        evictions = old_valid + new_written - now_valid
        self.counters[rows, _COUNTERS.index("writes")] += new_written + rewrites
        self.counters[rows, _COUNTERS.index("rewrites")] += rewrites
        self.counters[rows, _COUNTERS.index("evictions")] += evictions
        return {"writes": int((new_written + rewrites).sum()), "evictions": int(evictions.sum())}

    # ---------------------------------------------------------------- retrieval
    def retrieve(self, rows: torch.Tensor, topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k entries by utility, *sorted by source position* (earliest first).

        Returns (items [B, k], positions [B, k]); empty slots have item 0 and position
        ``NEVER`` and sort last, so "slots visible before position t" is always a prefix.
        """
        rows = torch.as_tensor(rows, dtype=torch.int64)
        k = min(topk or self.config.topk, self.config.capacity)
        chosen = self.utility(rows).topk(k, dim=1).indices
        items = self.item[rows].gather(1, chosen)
        positions = torch.where(items > 0, self.position[rows].gather(1, chosen), torch.full_like(items, NEVER))
        order = positions.argsort(dim=1, stable=True)
        return items.gather(1, order), positions.gather(1, order)

    def entries(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ids and utilities of one user's valid entries (for prototypes)."""
        valid = self.item[row] > 0
        utility = self.utility(torch.tensor([row]))[0]
        return self.item[row][valid].numpy(), utility[valid].numpy()

    def stats(self, rows: torch.Tensor | None = None) -> dict[str, float]:
        """Per-user means over ``rows`` (all users by default): entries held, and the cumulative
        writes, re-writes, evictions and passes (the metric names of a run's history)."""
        rows = torch.arange(len(self.step)) if rows is None else torch.as_tensor(rows)
        counters = self.counters[rows].double().mean(0)
        return {
            "memory-size": float((self.item[rows] > 0).sum(1).float().mean()),
            **{f"memory-{name}": float(counters[i]) for i, name in enumerate(_COUNTERS)},
        }

    # ------------------------------------------------------------- persistence
    def state_arrays(self, row: int = 0) -> dict[str, np.ndarray]:
        """One user's memory as small numpy arrays (bit-exact round trip with ``load_state``)."""
        return {key: getattr(self, key)[row].numpy().copy() for key in STATE_KEYS}

    def load_state(self, arrays: dict[str, np.ndarray], row: int = 0) -> None:
        """Restore one user's memory; everything is checked before anything is written."""
        missing = [k for k in STATE_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"memory state lacks {missing}")
        values = {}
        for key in STATE_KEYS:
            target = getattr(self, key)[row]
            value = np.asarray(arrays[key])
            if value.size == target.numel() and value.ndim <= 1:
                value = value.reshape(tuple(target.shape))  # transports may turn scalars into [1]
            if value.shape != tuple(target.shape):
                raise ValueError(f"memory state {key!r} has shape {value.shape}, expected {tuple(target.shape)}")
            if not target.is_floating_point() and not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"memory state {key!r} must hold integers, got {value.dtype}")
            if target.is_floating_point() and not np.isfinite(value).all():
                raise ValueError(f"memory state {key!r} contains NaN/Inf")
            values[key] = torch.as_tensor(value, dtype=target.dtype)
        for key, value in values.items():
            getattr(self, key)[row] = value

    @classmethod
    def single(cls, config: MemoryConfig, arrays: dict[str, np.ndarray] | None = None) -> LocalDynamicMemory:
        memory = cls(1, config)
        if arrays:
            memory.load_state(arrays)
        return memory

    def state_dict(self) -> dict:
        """Every user's memory and the config (what a central checkpoint saves)."""
        return {"config": asdict(self.config), **{key: getattr(self, key).clone() for key in STATE_KEYS}}

    @classmethod
    def from_state_dict(cls, state: dict) -> LocalDynamicMemory:
        memory = cls(len(state["step"]), MemoryConfig(**state["config"]))
        for key in STATE_KEYS:
            setattr(memory, key, state[key].clone())
        return memory
