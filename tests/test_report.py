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
from feddmmr_flower.report import central_history, load_run_record, stage_bests

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
    results = json.loads((runs["full"] / "results.json").read_text())
    assert f"{results['test']['sampled']['NDCG@10']:.4f}" in page and f"{results['test']['full']['HR@10']:.4f}" in page
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


def test_central_history_in_the_federated_shape(runs):
    results = json.loads((runs["full"] / "results.json").read_text())
    history = central_history(results)
    assert [r["round"] for r in history] == [r["epoch"] for r in results["history"]]
    last, raw = history[-1], results["history"][-1]
    assert last["train"]["memory-size"] == raw["memory"]["memory_size"]
    assert last["train"]["memory-writes"] == pytest.approx(raw["memory"]["memory_writes"] / 20)  # per user
    assert last["valid"]["NDCG@10"] == raw["valid"]["NDCG@10"]
    record = load_run_record(runs["full"])
    assert record.kind == "central" and record.x == "epoch"
    best = {row["stage"]: row["best"]["valid"]["NDCG@10"] for row in stage_bests(record.history)}
    assert set(best) == {"pretrain", "align", "finetune"}


def test_report_errors_are_one_line(runs):
    empty = runs["root"] / "empty"
    empty.mkdir(exist_ok=True)
    for args, message in (
        (["--run", str(runs["root"] / "nope")], "run folder"),
        (["--run", str(empty)], "neither history.json"),
        (["--run", str(runs["full"]), "--compare", str(empty)], "neither history.json"),
    ):
        done = run_feddmmr(["feddmmr", "report", *args], runs["root"])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
