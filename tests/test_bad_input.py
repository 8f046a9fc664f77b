"""Malformed inputs through the real CLI and run config: one clear line, non-zero exit, no debris.

Each case builds a small valid setup, breaks one thing, runs ``feddmmr`` (``cli.main``, the console
script's entry point, in-process; one case through a real subprocess) or the ServerApp's
configuration path, and checks: exit code 2 / ConfigError, a single ``feddmmr: error:`` line
naming the problem, and no temporary or half-written file in the cache or output folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from feddmmr_flower import cli
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.errors import FedDMMRError

from .conftest import synthetic_ml100k

TINY_MODEL = [
    "--hidden",
    "8",
    "--maxlen",
    "20",
    "--negatives",
    "10",
    "--eval-negatives",
    "10",
    "--blocks",
    "1",
    "--variant",
    "sasrec",
    "--eval-every",
    "1",
    "--patience",
    "1",
    "--threads",
    "1",
]


class Setup:
    """A tmp folder with a valid 20-user ML-100K copy, a cache and an output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = synthetic_ml100k(root / "ml-100k")
        self.cache = root / "cache"
        self.out = root / "outputs"
        self.out.mkdir()

    def data_args(self) -> list[str]:
        return ["--dataset", "ml-100k", "--data-dir", str(self.data), "--cache-dir", str(self.cache)]

    def train(self, *extra: str) -> list[str]:
        epochs = [] if "--stage-schedule" in extra else ["--epochs", "1"]
        return ["train-central", *self.data_args(), *TINY_MODEL, *epochs, "--out", str(self.out / "run"), *extra]

    def checkpoint(self, name: str = "best.pt") -> Path:
        """A real checkpoint (1 epoch) written to a folder the checks below do not look at."""
        done = cli.main(
            ["train-central", *self.data_args(), *TINY_MODEL, "--epochs", "1", "--out", str(self.root / "good")]
        )
        assert done == 0
        return self.root / "good" / name


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("[feddmmr]")]


# Each case: (id, how to break the setup -> CLI argv, words the error line must contain).
Case = tuple[str, Callable[[Setup], list[str]], tuple[str, ...]]


def _garbage_ratings(s: Setup) -> list[str]:
    with (s.data / "u.data").open("a") as out:
        out.write("7\tnot-a-number\t4\t880000000\n")
    return ["prepare", *s.data_args()]


def _short_ratings(s: Setup) -> list[str]:
    with (s.data / "u.data").open("a") as out:
        out.write("7\t12\n")
    return ["prepare", *s.data_args()]


def _missing_ratings(s: Setup) -> list[str]:
    (s.data / "u.data").unlink()
    return ["prepare", *s.data_args(), "--download-url", (s.root / "nowhere.zip").as_uri()]


def _no_users_left(s: Setup) -> list[str]:
    return ["prepare", *s.data_args(), "--min-seq-len", "1000"]


def _descriptions_not_json(s: Setup) -> list[str]:
    (s.root / "desc.json").write_text("{1: 'not json'")
    return ["features", *s.data_args(), "--descriptions", str(s.root / "desc.json")]


def _descriptions_not_a_mapping(s: Setup) -> list[str]:
    (s.root / "desc.json").write_text(json.dumps(["a", "b"]))
    return ["features", *s.data_args(), "--descriptions", str(s.root / "desc.json")]


def _descriptions_missing(s: Setup) -> list[str]:
    return ["features", *s.data_args(), "--descriptions", str(s.root / "absent.json")]


def _corrupt_feature_cache(s: Setup) -> list[str]:
    (s.root / "desc.json").write_text(json.dumps({str(i): f"movie {i}" for i in range(1, 81)}))
    argv = ["features", *s.data_args(), "--descriptions", str(s.root / "desc.json")]
    assert cli.main(argv) == 0
    (feature,) = (s.cache / "features").glob("text-*.npz")
    feature.write_bytes(feature.read_bytes()[:200])  # truncated
    return argv


def _corrupt_sequence_cache(s: Setup) -> list[str]:
    assert cli.main(["prepare", *s.data_args()]) == 0
    (npz,) = s.cache.glob("ml-100k-*/sequences.npz")
    npz.write_bytes(b"PK\x03\x04 not really a zip")
    return ["prepare", *s.data_args()]


CASES: list[Case] = [
    ("ratings-not-a-number", _garbage_ratings, ("u.data", "not-a-number")),
    ("ratings-missing-columns", _short_ratings, ("u.data",)),
    ("ratings-file-missing", _missing_ratings, ("nowhere.zip",)),
    ("min-seq-len-leaves-no-user", _no_users_left, ("no user", "1000")),
    ("descriptions-not-json", _descriptions_not_json, ("desc.json",)),
    ("descriptions-not-a-mapping", _descriptions_not_a_mapping, ("desc.json",)),
    ("descriptions-missing", _descriptions_missing, ("absent.json",)),
    ("feature-cache-truncated", _corrupt_feature_cache, ("text-",)),
    ("sequence-cache-corrupt", _corrupt_sequence_cache, ("sequences.npz",)),
    ("fraction-train-out-of-range", lambda s: s.train("--fraction-train", "1.5"), ("fraction-train", "1.5")),
    ("negative-prototype-noise", lambda s: s.train("--prototype-noise", "-0.1"), ("prototype-noise",)),
    ("dp-mode-unknown", lambda s: s.train("--dp-mode", "global"), ("dp-mode", "global")),
    ("secagg-threshold-too-high", lambda s: s.train("--secagg-threshold", "5"), ("secagg-threshold",)),
    ("schedule-not-a-number", lambda s: s.train("--stage-schedule", "pretrain:x"), ("'x'",)),
    ("schedule-unknown-stage", lambda s: s.train("--stage-schedule", "warmup:3"), ("warmup",)),
    ("schedule-no-rounds", lambda s: s.train("--stage-schedule", "pretrain:0"), ("no rounds",)),
    ("unknown-variant", lambda s: s.train("--variant", "huge"), ("variant", "huge")),
    ("init-from-missing", lambda s: s.train("--init-from", str(s.root / "absent.pt")), ("init-from", "absent.pt")),
    (
        "init-from-not-a-checkpoint",
        lambda s: (s.root / "junk.pt").write_bytes(b"junk") and s.train("--init-from", str(s.root / "junk.pt")),
        ("init-from", "junk.pt"),
    ),
    (
        "init-from-other-model",
        lambda s: s.train("--init-from", str(s.checkpoint()), "--hidden", "16"),
        ("init-from", "does not fit"),
    ),
    (
        "output-dir-unwritable",
        lambda s: (s.root / "afile").write_text("x") and s.train("--out", str(s.root / "afile" / "run")),
        ("afile",),
    ),
]


def _debris(*folders: Path) -> list[Path]:
    """Temporary files, or a prepared-dataset folder with one of its two files (half a cache)."""
    found = []
    for folder in folders:
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            if path.name.endswith(".tmp") or ".tmp" in path.name:
                found.append(path)
        for prepared in folder.glob("ml-100k-*"):
            if (prepared / "sequences.npz").exists() != (prepared / "manifest.json").exists():
                found.append(prepared)
    return found


@pytest.mark.parametrize("name, make, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    make: Callable[[Setup], list[str]],
    words: tuple[str, ...],
    one_torch_thread,
) -> None:
    setup = Setup(tmp_path)
    argv = make(setup)
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    errors = _lines(captured.err)
    assert code == 2, (code, captured.err[-2000:])
    assert len(errors) == 1 and errors[0].startswith("feddmmr: error: "), captured.err[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert captured.out == ""  # no half result on stdout
    assert not _debris(setup.cache, setup.out), _debris(setup.cache, setup.out)
    assert not list((setup.out).rglob("*.pt")) and not list(setup.out.rglob("summary.json"))


def test_console_script_exit_code_and_one_line(tmp_path: Path) -> None:
    """The installed ``feddmmr`` command, as a person runs it."""
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "feddmmr"),
            "prepare",
            "--dataset",
            "ml-100k",
            "--data-dir",
            str(tmp_path / "empty"),
            "--download-url",
            (tmp_path / "no.zip").as_uri(),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 2
    lines = _lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("feddmmr: error: ") and "no.zip" in lines[0], done.stderr


# ------------------------------------------------------------ run config (the Flower apps)
RUN_CONFIG_CASES = [
    ({"fraction-train": 0.0}, "fraction-train"),
    ({"hidden": "wide"}, "hidden"),
    ({"local-epochs": 1.5}, "local-epochs"),
    ({"dp-delta": 2.0}, "dp-delta"),
    ({"strategy": "fedsgd"}, "strategy"),
    ({"stage-schedule": "pretrain:10,,align:2"}, "''"),
]


@pytest.mark.parametrize("values, word", RUN_CONFIG_CASES, ids=[w for _, w in RUN_CONFIG_CASES])
def test_bad_run_config_values_name_the_key(values: dict, word: str) -> None:
    """What ``server_app.app.main`` and every ClientApp do first with ``context.run_config``."""
    with pytest.raises(FedDMMRError, match=word) as info:
        ExperimentConfig.from_flat(values)
    assert "\n" not in str(info.value)


def test_resume_from_missing_checkpoint_creates_nothing(tmp_path: Path, one_torch_thread) -> None:
    from server_app.federation import FederatedRun

    data = synthetic_ml100k(tmp_path / "ml-100k")
    cfg = ExperimentConfig.from_flat(
        {
            "data-dir": str(data),
            "cache-dir": str(tmp_path / "cache"),
            "output-dir": str(tmp_path / "outputs"),
            "hidden": 8,
            "maxlen": 20,
            "resume-from": str(tmp_path / "outputs" / "gone"),
        }
    )
    with pytest.raises(FedDMMRError, match="resume-from: no checkpoint at .*gone") as info:
        FederatedRun(None, cfg)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (tmp_path / "outputs").exists() and not _debris(tmp_path / "cache")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    from feddmmr_flower.atomic import atomic_path

    target = tmp_path / "x.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
    with atomic_path(target) as tmp, tmp.open("wb") as out:
        np.save(out, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2] and len(list(tmp_path.iterdir())) == 1
