"""The ``feddmmr`` CLI and the single experiment config (pyproject run config ⇔ ExperimentConfig)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from feddmmr_flower.cli import main
from feddmmr_flower.config import CENTRAL_DEFAULTS, STRATEGIES, ExperimentConfig, central_config, kebab
from feddmmr_flower.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_run_config_mirrors_experiment_config():
    """Every knob exists once: pyproject's [tool.flwr.app.config] has exactly the dataclass's keys,
    and every default equals the dataclass's, value by value and type by type."""
    run_config = pyproject()["tool"]["flwr"]["app"]["config"]
    assert set(run_config) == {kebab(f.name) for f in fields(ExperimentConfig)}
    defaults = ExperimentConfig().flat()
    different = {
        k: (v, defaults[k]) for k, v in run_config.items() if v != defaults[k] or type(v) is not type(defaults[k])
    }
    assert not different, f"pyproject value vs ExperimentConfig default: {different}"
    assert ExperimentConfig.from_flat(run_config, strict=True) == ExperimentConfig()  # the shipped values are valid


def test_the_central_trainer_differs_from_the_federated_defaults_only_where_named():
    """CENTRAL_DEFAULTS is the one list of train-central's deliberate differences, each a real one."""
    assert CENTRAL_DEFAULTS == {"stage-schedule": "pretrain:200", "prototype-noise": 0.0, "eval-every": 5}
    federated, central = ExperimentConfig().flat(), central_config({}).flat()
    assert {k: v for k, v in central.items() if federated[k] != v} == CENTRAL_DEFAULTS
    assert central_config({"eval-every": 2}).eval_every == 2  # a given value wins


def test_federations_and_components():
    flwr = pyproject()["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "server_app.app:app", "clientapp": "client_app.app:app"}
    sims = flwr["federations"]
    assert sims["local-simulation"]["options"]["num-supernodes"] == 943
    assert 0 < sims["local-simulation-gpu"]["options"]["backend"]["client-resources"]["num-gpus"] < 1


def test_strategy_names_match_the_flower_factory():
    from strategies import BASE_STRATEGIES

    assert set(STRATEGIES) == set(BASE_STRATEGIES)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"variant": "bogus"}, "variant"),
        ({"strategy": "fedfoo"}, "strategy"),
        ({"lr": 0}, "lr"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"memory-topk": 80, "memory-capacity": 50}, "memory-topk"),
        ({"stage-schedule": "pretrain:10,warmup:3"}, "warmup"),
        ({"hidden": "sixty-four"}, "hidden"),
        ({"text-features": "maybe"}, "text-features"),
        ({"visual-features": True}, "posters-dir"),
    ],
)
def test_bad_config_values_name_the_key(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ExperimentConfig.from_flat(values)


def test_unknown_key_is_an_error_when_strict():
    with pytest.raises(ConfigError, match="lamda-c"):
        ExperimentConfig.from_flat({"lamda-c": 0.1}, strict=True)


def test_prepare_prints_the_statistics(tiny_ml100k, tmp_path, capsys):
    assert (
        main(
            ["prepare", "--dataset", "ml-100k", "--data-dir", str(tiny_ml100k), "--cache-dir", str(tmp_path / "cache")]
        )
        == 0
    )
    stats = json.loads(capsys.readouterr().out)
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (3, 6, 16)
    assert stats["avg_seq_len"] == pytest.approx(16 / 3, abs=1e-3)


def test_prepare_real_ml100k(real_ml100k_dir, tmp_path, capsys):
    assert (
        main(["prepare", "--dataset", "ml-100k", "--data-dir", str(real_ml100k_dir), "--out", str(tmp_path / "cache")])
        == 0
    )
    stats = json.loads(capsys.readouterr().out)
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (943, 1682, 100000)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["prepare", "--dataset", "ml-20m"], "unknown dataset 'ml-20m'"),
        (
            [
                "prepare",
                "--dataset",
                "ml-100k",
                "--data-dir",
                "/nonexistent/ml",
                "--download-url",
                "file:///nonexistent.zip",
            ],
            "could not download",
        ),
        (["train-central", "--dataset", "ml-100k", "--variant", "bogus"], "variant"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, fragment, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "feddmmr_flower.cli", *args, "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("feddmmr: error:") and fragment in last


def test_train_central_writes_results(small_ml100k, tmp_path, capsys):
    assert (
        main(
            [
                "train-central",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(small_ml100k),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--variant",
                "sasrec",
                "--stage-schedule",
                "pretrain:2",
                "--hidden",
                "8",
                "--maxlen",
                "20",
                "--negatives",
                "5",
                "--eval-negatives",
                "20",
                "--eval-every",
                "1",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    out = tmp_path / "out" / "central-ml-100k-sasrec"
    assert printed["out"] == str(out) and set(printed["test"]) == {"sampled", "full"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] and summary["machine"]["torch"] and summary["kind"] == "central"
    assert [h["round"] for h in json.loads((out / "history.json").read_text())["rounds"]] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"]["prototype-noise"] == 0.0 and config["data"]["num_users"] == 20  # CENTRAL_DEFAULTS
    assert (out / "best.pt").is_file()


def test_train_central_epochs_and_out_shorthands(small_ml100k, tmp_path, capsys):
    out = tmp_path / "my-run"
    assert (
        main(
            [
                "train-central",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(small_ml100k),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--variant",
                "sasrec",
                "--epochs",
                "1",
                "--hidden",
                "8",
                "--maxlen",
                "20",
                "--negatives",
                "5",
                "--eval-negatives",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["schedule"] == "pretrain:1" and len(json.loads((out / "history.json").read_text())["rounds"]) == 1
    assert main(["train-central", "--epochs", "1", "--stage-schedule", "pretrain:1"]) == 2
    assert "not both" in capsys.readouterr().err
