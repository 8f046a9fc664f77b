"""A client's memory on node-local disk, beside Flower's ``context.state``.

``context.state`` lives in the SuperNode's RAM: a restarted SuperNode (or a restarted
simulation) starts with it empty. The ClientApp therefore also writes the user's memory to
``<state-dir>/<run-key>/partition-<id>.npz`` after every message and reads it back when
``context.state`` is empty. The file never leaves the node. ``run-key`` is the server's
output-folder name, so a resumed run finds the memories of the run it continues and a new
run never picks up those of another.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import DataFormatError

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class MemoryFile:
    """One user's memory state for one run, written atomically (a crash never leaves half a file)."""

    def __init__(self, state_dir: str | Path, run_key: str, partition: int) -> None:
        if not _SAFE_KEY.match(run_key):
            raise ValueError(f"run key {run_key!r} is not a safe folder name (letters, digits, '.', '_', '-')")
        self.path = Path(state_dir).expanduser() / run_key / f"partition-{int(partition)}.npz"

    def load(self) -> dict[str, np.ndarray] | None:
        """The saved state, or None when this node has not saved one for this run yet."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                return {key: saved[key] for key in saved.files}
        except (OSError, ValueError) as exc:  # truncated or foreign file: never guess
            raise DataFormatError(
                self.path, f"unreadable client memory file ({exc}); delete it to start this user's memory afresh"
            ) from None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, tmp.open("wb") as out:
            np.savez(out, **arrays)
