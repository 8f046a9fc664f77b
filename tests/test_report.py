"""``feddmmr report`` on tiny ``train-central`` runs (issue #8); the federated folder layout is
reported on in tests/test_readme.py (the quickstart ``flwr run``, compared with a central run).

The PNGs are checked as images: their text chunks name the runs drawn, and the run colours and
stage shading colours are found among their pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feddmmr_flower.plots import RUN_COLOURS, STAGE_COLOURS
from feddmmr_flower.report import load_run_record, stage_bests

from .conftest import synthetic_ml100k
from .test_readme import run_feddmmr

pytestmark = pytest.mark.slow
TINY = ["--hidden", "16", "--maxlen", "30", "--negatives", "20", "--eval-negatives", "20", "--eval-every", "1"]
PLOTS = ("validation.png", "losses.png", "memory.png", "time.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two central runs: SASRec (pretrain only) and FedDMMR full (all three stages)."""
    root = tmp_path_factory.mktemp("report")
    data_dir = synthetic_ml100k(root / "ml-100k")
    folders = {}
    for variant, schedule in (("full", "pretrain:3,align:1,finetune:2"), ("sasrec", "pretrain:4")):
        folders[variant] = root / f"central-{variant}"
        done = run_feddmmr(
            [
                "feddmmr",
                "train-central",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(data_dir),
                "--cache-dir",
                str(root / "cache"),
                "--variant",
                variant,
                "--stage-schedule",
                schedule,
                "--out",
                str(folders[variant]),
                *TINY,
            ],
            root,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    folders["root"] = root
    return folders


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)


def _has_colour(pixels: np.ndarray, hex_colour: str, tolerance: int = 6, at_least: int = 20) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(1) <= tolerance).sum()) >= at_least


def test_report_writes_markdown_and_plots(runs):
    done = run_feddmmr(["feddmmr", "report", "--run", str(runs["full"])], runs["root"])
    assert done.returncode == 0, done.stderr
    out = runs["full"] / "report"
    assert done.stdout.splitlines()[0] == f"report: {out / 'report.md'}"
    page = (out / "report.md").read_text()
    for section in ("## Test metrics", "## Configuration", "## Best validation per stage", "## Memory", "## Time"):
        assert section in page
    summary = json.loads((runs["full"] / "summary.json").read_text())
    assert f"{summary['test']['sampled']['NDCG@10']:.4f}" in page and f"{summary['test']['full']['HR@10']:.4f}" in page
    for stage in ("pretrain", "align", "finetune"):
        assert f"| central-full | {stage} |" in page
    for name in PLOTS:
        assert f"]({name})" in page
        image = Image.open(out / name)
        assert image.size[0] > 800 and image.text["Description"] == "runs: central-full"
    pixels = _pixels(out / "validation.png")
    assert all(_has_colour(pixels, STAGE_COLOURS[s]) for s in ("pretrain", "align", "finetune"))  # stages shaded
    assert _has_colour(pixels, RUN_COLOURS[0])


def test_compare_puts_runs_on_the_same_plots(runs):
    out = runs["root"] / "compared"
    done = run_feddmmr(
        [
            "feddmmr",
            "report",
            "--run",
            str(runs["full"]),
            "--compare",
            str(runs["sasrec"]),
            "--out",
            str(out),
            "--json",
        ],
        runs["root"],
    )
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    assert written["report"] == str(out / "report.md") and len(written["plots"]) == 4
    for name in PLOTS:
        assert Image.open(out / name).text["Description"] == "runs: central-full; central-sasrec"
    pixels = _pixels(out / "validation.png")
    assert _has_colour(pixels, RUN_COLOURS[0]) and _has_colour(pixels, RUN_COLOURS[1])
    page = (out / "report.md").read_text()
    assert "compared with central-sasrec" in page
    assert "| `stage-schedule` | pretrain:3,align:1,finetune:2 | pretrain:4 |" in page
    assert "| central-sasrec | no memory (variant sasrec) |" in page


def test_a_central_run_folder_has_the_federated_shape(runs):
    """run_record.py writes both kinds: one record per epoch (as a round), per-user memory figures
    under the federated metric names, and the same summary keys."""
    history = json.loads((runs["full"] / "history.json").read_text())
    assert history["kind"] == "central" and [r["round"] for r in history["rounds"]] == [1, 2, 3, 4, 5, 6]
    last = history["rounds"][-1]
    assert {"memory-size", "memory-writes", "memory-rewrites", "memory-evictions", "memory-passes"} <= set(
        last["train"]
    )
    assert 0 < last["train"]["memory-size"] <= 50 and last["valid"]["NDCG@10"] >= 0
    summary = json.loads((runs["full"] / "summary.json").read_text())
    assert {"kind", "run", "rounds", "best_round", "best_stage", "best_valid_NDCG@10", "test", "wall_time_s"} <= set(
        summary
    )
    record = load_run_record(runs["full"])
    assert record.kind == "central" and record.x == "epoch"
    best = {row["stage"]: row["best"]["valid"]["NDCG@10"] for row in stage_bests(record.history)}
    assert set(best) == {"pretrain", "align", "finetune"}


def test_report_errors_are_one_line(runs):
    empty = runs["root"] / "empty"
    empty.mkdir(exist_ok=True)
    for args, message in (
        (["--run", str(runs["root"] / "nope")], "run folder"),
        (["--run", str(empty)], "no history.json"),
        (["--run", str(runs["full"]), "--compare", str(empty)], "no history.json"),
    ):
        done = run_feddmmr(["feddmmr", "report", *args], runs["root"])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
