"""README.md's commands work: every command of its ``bash`` blocks is run here or mapped to its test.

The cheap ones run for real, unchanged except for tiny sizes, in a copy of the app whose
``data/ml-100k`` is a synthetic 20-user dataset and whose ``../shared/data`` holds synthetic
descriptions, posters and an ML-1M ``movies.dat``: ``feddmmr prepare/features/train-central/
recommend/report`` and the quickstart ``flwr run`` (4 nodes, one round per stage). The others
(installation, the test command, ``flwr run`` variants that differ only in configuration,
deployment) are in ``COVERED_ELSEWHERE`` with the test that covers them. A README command that is
neither run nor mapped fails ``test_every_command_is_run_or_mapped``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from .conftest import synthetic_ml100k
from .flwr_utils import BIN, REPO, copy_app, flwr_run

pytestmark = pytest.mark.slow
README = REPO / "README.md"

# Command prefix -> the test(s) covering a command that is not run here.
COVERED_ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install": "tests/test_readme.py::test_install_and_test_commands_are_what_ci_runs",
    "python -m pytest -q": "tests/test_readme.py::test_install_and_test_commands_are_what_ci_runs",
    "flwr run . local-simulation-gpu": "tests/test_readme.py::test_other_flwr_run_commands_are_valid",
    "flwr run . --federation-config": "tests/test_readme.py::test_other_flwr_run_commands_are_valid",
    "flwr run . --run-config": "tests/test_readme.py::test_other_flwr_run_commands_are_valid",
    "python -m deploy.certs": "tests/test_compose.py",
    "flwr supernode register": "tests/test_deployment.py",
    "flwr run . feddmmr": "tests/test_deployment.py",
    "docker compose": "tests/test_compose.py",
    "docker-compose": "tests/test_compose.py",
    "python -m deploy.compose": "tests/test_compose.py",
    "ray ": "tests/test_ray_cluster.py",
    "RAY_ADDRESS=": "tests/test_ray_cluster.py",
    "benchmarks/": "tests/test_readme.py::test_results_block_is_rendered_from_benchmark_results",
    "python -m benchmarks.render_readme": "tests/test_readme.py::test_results_block_is_rendered_from_benchmark_results",
    # the benchmarks' machinery on tiny data; their full-size results are checked as rendered above
    "python -m benchmarks.": "tests/test_benchmarks.py",
}
RUN_HERE = ("feddmmr ", "export ")
QUICKSTART = "quickstart"  # run-name of the flwr run command that is run for real
TINY_MODEL = {"hidden": 16, "maxlen": 30, "negatives": 20, "eval-negatives": 20, "eval-every": 1}
TINY_FLWR = {**TINY_MODEL, "eval-users": 3, "fraction-train": 1.0, "min-available-nodes": 3}
TINY_FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"
# Data commands first, then training, then the commands that read what training wrote.
PHASES = (
    ("export ", "feddmmr prepare", "feddmmr features"),
    ("feddmmr train-central", "flwr run"),
    ("feddmmr recommend", "feddmmr report"),
)


# ------------------------------------------------------------------ parsing
def readme_commands(text: str | None = None) -> list[str]:
    """Logical command lines of the ``bash`` blocks (bash joins backslash-newline, also inside quotes)."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def covering_test(command: str) -> str | None:
    return next((test for prefix, test in COVERED_ELSEWHERE.items() if command.startswith(prefix)), None)


def run_config(args: list[str], option: str = "--run-config") -> dict:
    from flwr.common.config import parse_config_args

    values = [args[i + 1] for i, a in enumerate(args) if a == option]
    return parse_config_args(values)


def is_quickstart(command: str) -> bool:
    return command.startswith("flwr run") and run_config(shlex.split(command)).get("run-name") == QUICKSTART


def runs_here(command: str) -> bool:
    return command.startswith(RUN_HERE) or is_quickstart(command)


def phase(command: str) -> int:
    return next(i for i, prefixes in enumerate(PHASES) if command.startswith(prefixes))


def tiny_schedule(schedule: str) -> str:
    return re.sub(r"([a-z]+):\d+", r"\1:1", schedule)


def tiny_central(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg == "--epochs":
            out[i + 1] = "2"
        elif arg == "--stage-schedule":
            out[i + 1] = tiny_schedule(out[i + 1])
    for key, value in TINY_MODEL.items():
        out += [f"--{key}", str(value)]
    return out


# ------------------------------------------------------------------ workspace
def _write_shared(shared: Path, data_dir: Path) -> None:
    """``../shared/data`` as the README expects it, synthetic: ML-100K, descriptions, posters, movies.dat."""
    from PIL import Image

    shutil.copytree(data_dir, shared / "ml-100k")
    titles = {}
    for line in (data_dir / "u.item").read_text(encoding="iso-8859-1").splitlines():
        item, title = line.split("|")[:2]
        titles[item] = title
    (shared / "ml-100k-llm").mkdir(parents=True)
    (shared / "ml-100k-llm" / "item_descriptions.json").write_text(
        json.dumps({item: f"{title}: a film about number {item}" for item, title in titles.items()})
    )
    posters = shared / "ml-1m" / "posters"
    posters.mkdir(parents=True)
    movies = [f"{1000 + int(item)}::{title}::Drama" for item, title in titles.items()]
    (shared / "ml-1m" / "movies.dat").write_text("\n".join(movies) + "\n", encoding="iso-8859-1")
    rng = np.random.default_rng(0)
    for item in list(titles)[::2]:  # half the items have a poster
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(posters / f"{1000 + int(item)}.jpg")


def _write_csv(folder: Path, data_dir: Path) -> None:
    """``data/mydata``: the synthetic ratings as a user,item,timestamp CSV with string ids + an item table."""
    folder.mkdir(parents=True)
    rows = [line.split("\t") for line in (data_dir / "u.data").read_text().splitlines()]
    (folder / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"u{u},m{i},{t}\n" for u, i, _, t in rows)
    )
    items = sorted({int(r[1]) for r in rows})
    (folder / "items.csv").write_text("item,title,genres\n" + "".join(f"m{i},Film {i},Drama|War\n" for i in items))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of the app (the README's working directory) with synthetic data in the README's places."""
    root = tmp_path_factory.mktemp("readme")
    app = copy_app(root / "app")
    data_dir = synthetic_ml100k(app / "data" / "ml-100k")
    _write_shared(root / "shared" / "data", data_dir)
    _write_csv(app / "data" / "mydata", data_dir)
    return app


def _run(command: str, app: Path, env: dict) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    if args[0] == "export":
        name, _, value = args[1].partition("=")
        env[name] = value
        return subprocess.CompletedProcess(args, 0, "", "")
    if args[0] == "flwr":
        config = {**run_config(args), **TINY_FLWR}
        config["stage-schedule"] = tiny_schedule(config.get("stage-schedule", "pretrain:1,align:1,finetune:1"))
        done = flwr_run(app, app.parent / "flwr-home", config, TINY_FEDERATION, timeout=600)
        return subprocess.CompletedProcess(args, done.returncode, done.stdout, done.stderr)
    if args[:2] == ["feddmmr", "train-central"]:
        args = tiny_central(args)
    return run_feddmmr(args, app)


def run_feddmmr(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The ``feddmmr`` console script's entry point, in this process (saves a torch import per command)."""
    import torch

    from feddmmr_flower.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args[1:])
    except Exception:  # a crash is a failed command, with its traceback
        code = 1
        err.write(traceback.format_exc())
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def results(workspace: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run every command that runs here, data → training → reading, each in README order."""
    env = dict(os.environ)
    commands = sorted((c for c in readme_commands() if runs_here(c)), key=phase)  # stable: README order within
    done = {}
    for command in commands:
        done[command] = _run(command, workspace, env)
    return done


# ------------------------------------------------------------------ tests
def test_every_command_is_run_or_mapped():
    commands = readme_commands()
    assert any(c.startswith("feddmmr recommend") for c in commands) and any(is_quickstart(c) for c in commands)
    orphans = [c for c in commands if not runs_here(c) and covering_test(c) is None]
    assert not orphans, (
        f"README commands neither run by tests/test_readme.py nor mapped in COVERED_ELSEWHERE: {orphans}"
    )
    for command in commands:
        test = covering_test(command) if not runs_here(command) else None
        if test:  # a mapped command names a test that exists
            path, _, name = test.partition("::")
            assert (REPO / path).is_file(), f"{command!r} is mapped to {test}, which does not exist"
            assert not name or f"def {name}(" in (REPO / path).read_text(), f"{test} not found"


@pytest.mark.parametrize("command", [c for c in readme_commands() if runs_here(c)], ids=lambda c: c[:70])
def test_command_runs(results, command):
    done = results[command]
    assert done.returncode == 0, f"{command}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}"


def test_quickstart_prints_progress_and_names_its_output_folder(results, workspace):
    command = next(c for c in results if is_quickstart(c))
    log = results[command].stdout + results[command].stderr
    out = workspace / "outputs" / QUICKSTART
    assert re.search(
        r"round 1/3 \[pretrain\] nodes 3 loss \d+\.\d+  valid NDCG@10 \d\.\d{4} HR@10 \d\.\d{4}  "
        r"\d+\.\ds  ETA \d+\.\d min",
        log,
    ), log[-3000:]
    assert "round 3/3 [finetune]" in log
    assert re.search(r"done in .* min: test NDCG@10 .* Outputs in \S*outputs/quickstart", log), log[-2000:]
    for name in ("config.json", "history.json", "best.pt", "checkpoint-finetune.pt", "last.pt", "summary.json"):
        assert (out / name).is_file(), name


def test_reading_commands_print_what_they_promise(results, workspace):
    for command, done in results.items():
        if command.startswith("feddmmr recommend"):
            if "--json" in command:
                assert len(json.loads(done.stdout)["recommendations"]) == 5
            else:
                assert "top 10 recommendations" in done.stdout and "router: visual" in done.stdout
        if command.startswith("feddmmr report"):
            report = Path(done.stdout.split("report: ", 1)[1].split()[0])
            report = report if report.is_absolute() else workspace / report
            assert report.is_file() and (report.parent / "validation.png").is_file()


def test_other_flwr_run_commands_are_valid():
    """The flwr run variants differ from the quickstart only in configuration: it must be valid."""
    from feddmmr_flower.config import ExperimentConfig

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    federations = pyproject["tool"]["flwr"].get("federations", {})
    checked = 0
    for command in readme_commands():
        if not command.startswith("flwr run") or is_quickstart(command) or command.startswith("flwr run . feddmmr"):
            continue  # the deployment's flwr run is run for real by tests/test_deployment.py
        args = shlex.split(command)
        assert args[2] == ".", command
        ExperimentConfig.from_flat({**defaults, **run_config(args)}, strict=True)
        federation = run_config(args, "--federation-config")
        assert all(isinstance(v, (int, float)) for v in federation.values()), command
        if len(args) > 3 and not args[3].startswith("-"):
            assert args[3] in federations, f"{command}: no federation {args[3]!r} in pyproject.toml"
        checked += 1
    assert checked >= 3


def test_install_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    commands = readme_commands()
    install = next(c for c in commands if c.startswith("python3 -m venv"))
    for step in install.split(" && "):
        assert step.replace('"', "") in ci.replace('"', "").replace("--quiet ", ""), step
    assert "python -m pytest -q" in commands and "\npython -m pytest -q\n" in ci
    assert (BIN / "feddmmr").is_file(), "the feddmmr console script is not installed next to this python"


def test_results_block_is_rendered_from_benchmark_results(monkeypatch):
    """The README's results block is exactly what benchmarks/render_readme.py makes of benchmarks/results."""
    monkeypatch.chdir(REPO)
    from benchmarks import render_readme

    text = README.read_text()
    block = text[text.index(render_readme.START) : text.index(render_readme.END) + len(render_readme.END)]
    assert block == render_readme.render(), "README results block is stale: run python -m benchmarks.render_readme"
    deploy = text[
        text.index(render_readme.DEPLOY_START) : text.index(render_readme.DEPLOY_END) + len(render_readme.DEPLOY_END)
    ]
    assert deploy == render_readme.render_deployment(), "README deployment figures are stale: run render_readme.py"
