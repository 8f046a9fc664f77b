"""Per-user chronological item sequences with a leave-one-out split.

Storage is ragged (one flat item array + offsets) so that 100k users cost a few MB,
and every batch view (left-padded windows, targets, histories) is built with numpy
fancy indexing instead of a Python loop over users.

Split (leave-one-out, DESIGN §1): for a sequence s of length n,
  * test target  = s[n-1], its input = s[:n-1] (training items + the validation item)
  * valid target = s[n-2], its input = s[:n-2] (the training items)
  * training     = s[:n-2]: inputs s[:n-3], next-item targets s[1:n-2].
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_json
from ..errors import DataFormatError

SPLITS = ("train", "valid", "test")
# How many items at the end of a sequence are *not* visible to each split's input.
_HIDDEN_TAIL = {"train": 2, "valid": 2, "test": 1}


@dataclass
class SequenceData:
    """Prepared dataset: item id 0 is padding, ids 1..num_items are real items."""

    items: np.ndarray  # int32 [num_interactions], chronological per user
    timestamps: np.ndarray  # int64 [num_interactions]
    offsets: np.ndarray  # int64 [num_users + 1]
    user_raw_ids: np.ndarray  # str [num_users]
    item_raw_ids: np.ndarray  # str [num_items + 1], "" at 0
    item_titles: np.ndarray  # str [num_items + 1]
    item_genres: np.ndarray  # str [num_items + 1]
    manifest: dict = field(default_factory=dict)
    item_extra: dict[str, np.ndarray] = field(default_factory=dict)  # description/image from an item table

    # ------------------------------------------------------------------ basics
    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def train_lengths(self, users: np.ndarray | None = None) -> np.ndarray:
        lengths = self.lengths if users is None else self.lengths[np.asarray(users)]
        return lengths - _HIDDEN_TAIL["train"]

    def stats(self) -> dict:
        lengths = self.lengths
        return {
            "num_users": int(self.num_users),
            "num_items": int(self.num_items),
            "num_interactions": int(len(self.items)),
            "avg_seq_len": round(float(lengths.mean()), 4),
            "min_seq_len": int(lengths.min()),
            "max_seq_len": int(lengths.max()),
            "density": round(float(len(self.items)) / (self.num_users * self.num_items), 6),
        }

    #: Training items a user needs for one training position: an input item and its next-item target.
    MIN_TRAIN_ITEMS = 2

    def can_train(self, users: np.ndarray) -> np.ndarray:
        """Boolean per user: does the training part (before the held-out items) hold a training position?
        Under the leave-one-out split, a user of 3 interactions (``min-seq-len = 3``) has none."""
        return self.train_lengths(self.check_users(users)) >= self.MIN_TRAIN_ITEMS

    def check_users(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        bad = (users < 0) | (users >= self.num_users)
        if bad.any():
            raise IndexError(f"user index {int(users[bad][0])} out of range [0, {self.num_users})")
        return users

    # ------------------------------------------------------------ batch views
    def input_window(self, users: np.ndarray, split: str, maxlen: int) -> np.ndarray:
        """Left-padded [B, maxlen] item ids the model sees when predicting ``split``'s target.

        For ``train`` this is the training input s[:n-3] (targets from ``train_targets``).
        """
        users = self.check_users(users)
        tail = _HIDDEN_TAIL[split] + (1 if split == "train" else 0)
        start = self.offsets[users]
        end = self.offsets[users + 1] - tail
        index = end[:, None] - maxlen + np.arange(maxlen)[None, :]
        valid = index >= start[:, None]
        return np.where(valid, self.items[np.clip(index, 0, None)], 0).astype(np.int64)

    def train_targets(self, users: np.ndarray, maxlen: int) -> np.ndarray:
        """[B, maxlen] next-item targets aligned with ``input_window(users, 'train')`` (0 = none)."""
        users = self.check_users(users)
        start = self.offsets[users] + 1
        end = self.offsets[users + 1] - _HIDDEN_TAIL["train"]
        index = end[:, None] - maxlen + np.arange(maxlen)[None, :]
        valid = index >= start[:, None]
        return np.where(valid, self.items[np.clip(index, 0, None)], 0).astype(np.int64)

    def train_target_positions(self, users: np.ndarray, maxlen: int) -> np.ndarray:
        """[B, maxlen] index of each training target within its user's sequence (-1: no target).

        The memory stores these source positions; position p may only see entries from < p.
        """
        users = self.check_users(users)
        length = self.lengths[users] - _HIDDEN_TAIL["train"]
        index = length[:, None] - maxlen + np.arange(maxlen)[None, :]
        return np.where(index >= 1, index, -1).astype(np.int64)

    def target(self, users: np.ndarray, split: str) -> np.ndarray:
        """Held-out item of ``split`` ('valid' or 'test') for each user."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        users = self.check_users(users)
        return self.items[self.offsets[users + 1] - (2 if split == "valid" else 1)].astype(np.int64)

    def history_mask(self, users: np.ndarray, part: str = "all") -> np.ndarray:
        """Boolean [B, num_items + 1]: items in each user's ``part`` ('train' or 'all') history."""
        users = self.check_users(users)
        mask = np.zeros((len(users), self.num_items + 1), dtype=bool)
        lengths = self.lengths[users] - (_HIDDEN_TAIL["train"] if part == "train" else 0)
        rows = np.repeat(np.arange(len(users)), lengths)
        starts = np.repeat(self.offsets[users], lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        mask[rows, self.items[starts + within]] = True
        mask[:, 0] = True  # padding is never a candidate
        return mask

    # -------------------------------------------------------------- persistence
    def save(self, folder: Path) -> None:
        """Write ``sequences.npz`` + ``manifest.json`` atomically (temp file + rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            items=self.items,
            timestamps=self.timestamps,
            offsets=self.offsets,
            user_raw_ids=self.user_raw_ids.astype(str),
            item_raw_ids=self.item_raw_ids.astype(str),
            item_titles=self.item_titles.astype(str),
            item_genres=self.item_genres.astype(str),
            **{f"extra_{k}": v.astype(str) for k, v in self.item_extra.items()},
        )
        with atomic_path(folder / "sequences.npz") as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)
        atomic_write_json(folder / "manifest.json", self.manifest)  # last: a cache hit needs both

    @classmethod
    def load(cls, folder: Path) -> SequenceData:
        folder = Path(folder)
        path = folder / "sequences.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            manifest = json.loads((folder / "manifest.json").read_text())
        except FileNotFoundError as exc:
            raise DataFormatError(
                folder, f"not a prepared dataset folder ({Path(exc.filename).name} missing)"
            ) from None
        except (ValueError, OSError, EOFError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
            raise DataFormatError(
                path, f"unreadable prepared dataset ({exc}); delete {folder} to prepare it again"
            ) from None
        extra = {k[len("extra_") :]: arrays.pop(k) for k in list(arrays) if k.startswith("extra_")}
        return cls(**arrays, manifest=manifest, item_extra=extra)
