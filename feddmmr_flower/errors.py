"""Exceptions that carry enough context for a person to fix their input."""

from __future__ import annotations

from pathlib import Path


class FedDMMRError(Exception):
    """Base class: the CLI turns these into a one-line message and exit code 2."""


class DataFormatError(FedDMMRError, ValueError):
    """A data file is malformed; the message names the file and, when known, the line."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


class MissingDataError(FedDMMRError, FileNotFoundError):
    """A required file or folder is missing (and could not be downloaded)."""


class ConfigError(FedDMMRError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class FeatureError(FedDMMRError, ValueError):
    """An item-feature file is missing, of the wrong shape, or does not match the dataset."""
