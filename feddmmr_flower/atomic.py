"""Atomic file writes and early output-folder checks: a failure never leaves half a file behind.

Every cache, checkpoint and results file is written to a *unique* temporary file beside its
target and renamed over it only once complete (``os.replace`` is atomic on one file system). A
fixed temporary name (``x.tmp``) is not enough: Flower runs many ClientApps at once, and two
processes preparing the same cache would write into the same temporary file. On any error the
temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it over ``path`` when the block succeeds."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make caches unreadable for others
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, payload: dict) -> None:
    """Indented JSON, written atomically (a crash never leaves half a file)."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check a file can be written there, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
    return path
