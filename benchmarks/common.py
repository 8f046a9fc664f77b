"""What every benchmark script needs the same way: the app's defaults, ML-100K's item features,
and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_defaults() -> dict:
    """The Flower app's run config as ``pyproject.toml`` sets it (what ``flwr run`` starts from)."""
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def ml100k_features(shared: str | Path, *, visual: bool = True, absolute: bool = False) -> dict:
    """Run-config entries for ML-100K's item features in ``shared`` (ml-100k-llm/, ml-1m/).

    ``absolute``: for a ``flwr run``, which starts from a copy of the app elsewhere."""
    root = Path(shared).resolve() if absolute else Path(shared)
    flags = {"descriptions": str(root / "ml-100k-llm/item_descriptions.json"), "visual-features": visual}
    if visual:
        flags.update({"posters-dir": str(root / "ml-1m/posters"), "movies-dat": str(root / "ml-1m/movies.dat")})
    return flags


def parse_overrides(items: list[str]) -> dict:
    """``["hidden=16", 'stage-schedule="pretrain:2"']`` -> {"hidden": 16, "stage-schedule": "pretrain:2"} (TOML values)."""
    return tomllib.loads("\n".join(f"{key.strip()} = {value}" for key, value in (i.split("=", 1) for i in items)))


def parse_deployment_size(parser: argparse.ArgumentParser, rounds: int, out: str) -> argparse.Namespace:
    """``--nodes``/``--rounds``/``--out`` of the deployment benchmarks, parsed and checked (round 1 is
    start-up, so a steady round needs at least 2)."""
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default=out)
    args = parser.parse_args()
    if args.nodes < 1 or args.rounds < 2:
        parser.error("--nodes must be >= 1 and --rounds >= 2 (round 1 is start-up)")
    return args
