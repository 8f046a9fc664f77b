"""The ``feddmmr`` command line: prepare, features, train-central, recommend, report.

prepare/features/train-central print one JSON object on stdout (progress goes to stderr), so
their output can be piped; recommend and report print text for a person (``--json`` for the
machine form). Bad input exits with code 2 and a one-line message naming the problem. The flags of
``features`` and ``train-central`` are generated from ``ExperimentConfig`` (one source of truth
shared with the Flower run config): ``--lambda-c 0.2`` is the run-config key ``lambda-c``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import CENTRAL_DEFAULTS, ExperimentConfig, kebab
from .errors import ConfigError, FedDMMRError


def add_config_flags(
    parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None, defaults: Mapping[str, Any] | None = None
) -> None:
    """One flag per ExperimentConfig field (``--no-<flag>`` for booleans); help shows ``defaults`` first."""
    for spec in fields(ExperimentConfig):
        if only is not None and spec.name not in only:
            continue
        flag = "--" + kebab(spec.name)
        if spec.type in (bool, "bool"):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            caster = {"int": int, "float": float}.get(
                spec.type if isinstance(spec.type, str) else spec.type.__name__, str
            )
            parser.add_argument(
                flag,
                dest=spec.name,
                type=caster,
                default=None,
                help=f"default: {(defaults or {}).get(kebab(spec.name), spec.default)!r}",
            )


def config_from_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The flags given, over ``defaults`` (e.g. ``CENTRAL_DEFAULTS``), over ExperimentConfig's defaults."""
    given = {
        kebab(f.name): getattr(args, f.name)
        for f in fields(ExperimentConfig)
        if getattr(args, f.name, None) is not None
    }
    if "dataset" in given and "data-dir" not in given:
        given["data-dir"] = f"data/{given['dataset']}"
    return ExperimentConfig.from_flat({**(defaults or {}), **given}, strict=True)


DATA_FLAGS = ("dataset", "data_dir", "cache_dir", "items_file", "top_users", "min_seq_len", "download_url")


def cmd_prepare(args: argparse.Namespace) -> dict:
    from .experiment import load_data

    cfg = config_from_args(args)
    data, folder = load_data(cfg)
    return {**data.stats(), "dataset": cfg.dataset, "cache": str(folder)}


def cmd_features(args: argparse.Namespace) -> dict:
    from .experiment import load_data, load_features
    from .features import features_summary

    cfg = config_from_args(args)
    data, _ = load_data(cfg)
    return features_summary(load_features(cfg, data))


def cmd_train_central(args: argparse.Namespace) -> dict:
    import torch

    from .central import train_central
    from .experiment import build_model, load_assets, load_weights, memory_config
    from .memory import LocalDynamicMemory

    if args.epochs is not None:
        if args.stage_schedule is not None:
            raise ConfigError("give either --epochs or --stage-schedule, not both")
        args.stage_schedule = f"pretrain:{args.epochs}"
    cfg = config_from_args(args, CENTRAL_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = load_assets(cfg)
    model = build_model(cfg, assets)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    memory = LocalDynamicMemory(assets.data.num_users, memory_config(cfg)) if cfg.variant != "sasrec" else None
    out = (
        Path(args.out) if args.out else Path(cfg.output_dir) / (cfg.run_name or f"central-{cfg.dataset}-{cfg.variant}")
    )
    facts = {"data": assets.data.stats(), "features": _feature_labels(assets.features)}
    result = train_central(model, assets.data, cfg, memory, out_dir=out, facts=facts)
    return {
        "out": str(out),
        "best_epoch": result.best_epoch,
        "best_stage": result.best_stage,
        "test": result.test,
        "wall_time_s": result.wall_time_s,
        "train_sequences_per_s": result.train_sequences_per_s,
    }


RUN_OVERRIDES = (
    "data_dir",
    "cache_dir",
    "items_file",
    "download_url",
    "descriptions",
    "text_model",
    "posters_dir",
    "movies_dat",
    "clip_pretrained",
    "device",
)


def cmd_recommend(args: argparse.Namespace) -> dict | str:
    from .recommend import Recommender, format_text, load_run, user_index

    if (args.user is None) == (args.user_index is None):
        raise ConfigError("give the user as --user RAW_ID (the id in your data) or --user-index N (0-based)")
    overrides = {kebab(name): getattr(args, name) for name in RUN_OVERRIDES}
    recommender = Recommender(load_run(args.run, args.checkpoint, overrides))
    data = recommender.data
    if args.user is not None:
        index = user_index(data, args.user)
    elif not 0 <= args.user_index < data.num_users:
        raise ConfigError(f"--user-index {args.user_index} out of range: the dataset has {data.num_users} users")
    else:
        index = args.user_index
    result = recommender.recommend(index, k=args.k, explain=args.explain, history=args.history)
    return result if args.json else format_text(result)


def cmd_report(args: argparse.Namespace) -> dict | str:
    from .report import write_report

    written = write_report(args.run, args.compare or [], args.out)
    if args.json:
        return written
    return "\n".join([f"report: {written['report']}", *[f"plot:   {p}" for p in written["plots"]]])


def _feature_labels(tables: dict) -> dict:
    """What the feature tables are, for results files (random-init CLIP must be visible there)."""
    return {
        kind: {"model": t.meta.get("model"), "pretrained": t.meta.get("pretrained"), "coverage": round(t.coverage, 4)}
        for kind, t in tables.items()
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddmmr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="read, filter, split and cache a dataset; print its statistics")
    add_config_flags(prepare, DATA_FLAGS)
    prepare.add_argument("--out", dest="cache_dir", help="alias of --cache-dir")
    prepare.set_defaults(func=cmd_prepare)

    features = sub.add_parser("features", help="compute (or load from cache) item text/visual feature tables")
    add_config_flags(
        features,
        DATA_FLAGS
        + (
            "text_features",
            "descriptions",
            "text_model",
            "visual_features",
            "posters_dir",
            "movies_dat",
            "clip_model",
            "clip_pretrained",
            "device",
        ),
    )
    features.set_defaults(func=cmd_features)

    central = sub.add_parser("train-central", help="train SASRec/FedDMMR centrally through a stage schedule")
    add_config_flags(central, defaults=CENTRAL_DEFAULTS)
    central.add_argument("--epochs", type=int, default=None, help="shorthand for --stage-schedule pretrain:N")
    central.add_argument("--out", default="", help="output folder (default: <output-dir>/<run-name>)")
    central.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    central.set_defaults(func=cmd_train_central)

    rec = sub.add_parser(
        "recommend",
        help="top-K unseen items for one user from a saved run (--explain: why)",
        description="Top-K recommendations for one user from a run folder's checkpoint. The run's "
        "config names its dataset and features; override paths if it was made on another machine.",
    )
    rec.add_argument("--run", help="run folder (outputs/<run>: federated or train-central)")
    rec.add_argument("--user", help="the user's raw id, as in your data (ML-100K: u.data column 1)")
    rec.add_argument("--user-index", type=int, help="or the 0-based user index (= Flower partition-id)")
    rec.add_argument("-k", "--k", type=int, default=10, help="number of recommendations (default 10)")
    rec.add_argument(
        "--checkpoint",
        default="best",
        help="best, last, a stage (pretrain/align/finetune: checkpoint-<stage>.pt) or a .pt path",
    )
    rec.add_argument(
        "--explain",
        action="store_true",
        help="router weights and the memory items each expert read, per recommendation",
    )
    rec.add_argument("--history", type=int, default=10, help="how many of the user's last items to show")
    rec.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_config_flags(rec, RUN_OVERRIDES)
    rec.set_defaults(func=cmd_recommend)

    rep = sub.add_parser("report", help="markdown summary + PNG plots of a run (or several, compared)")
    rep.add_argument("--run", required=True, help="run folder (federated or train-central)")
    rep.add_argument("--compare", nargs="+", metavar="RUN", help="more run folders drawn on the same plots")
    rep.add_argument("--out", help="output folder (default <run>/report)")
    rep.add_argument("--json", action="store_true", help="print the written paths as JSON")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        payload = args.func(args)
    except FedDMMRError as exc:
        print(f"feddmmr: error: {exc}", file=sys.stderr)
        return 2
    print(payload if isinstance(payload, str) else json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
