"""What every benchmark needs the same way: ML-100K's item features and run-config
overrides (``--set KEY=VALUE``, ``--run-config "k=v k2='text'"``) read by Flower's own parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def ml100k_features(shared: str | Path, *, visual: bool = True, absolute: bool = False) -> dict:
    """Run-config entries for ML-100K's item features in ``shared`` (ml-100k-llm/, ml-1m/).

    ``absolute``: for a ``flwr run``, which starts from a copy of the app elsewhere."""
    root = Path(shared).resolve() if absolute else Path(shared)
    flags = {"descriptions": str(root / "ml-100k-llm/item_descriptions.json"), "visual-features": visual}
    if visual:
        flags.update({"posters-dir": str(root / "ml-1m/posters"), "movies-dat": str(root / "ml-1m/movies.dat")})
    return flags


def parse_overrides(items: list[str]) -> dict:
    """``["hidden=16", "stage-schedule='pretrain:2' fraction-train=0.5"]`` -> {"hidden": 16, ...}: the parser
    ``flwr run --run-config`` uses (TOML values); a malformed item is a one-line error, exit code 2."""
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(list(items))
    except ClickException as exc:
        print(f"benchmark: error: run-config overrides {items!r}: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


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
