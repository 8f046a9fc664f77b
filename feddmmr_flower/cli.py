"""The ``feddmmr`` command line: prepare, features, train-central.

Every subcommand prints one JSON object on stdout (progress goes to stderr), so its output
can be piped; bad input exits with code 2 and a one-line message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import FedDMMRError

DEFAULT_CACHE = os.environ.get("FEDDMMR_CACHE_DIR", "data/cache")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="ml-1m | ml-100k | csv")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the raw files (downloaded there when missing; default data/<dataset>); "
                             "for csv: the folder holding interactions.csv/.tsv, or the file itself")
    parser.add_argument("--items-file", type=Path, default=None, help="csv only: item table (item,title,genres,description,image)")
    parser.add_argument("--top-users", type=int, default=None, help="keep only the N most active users")
    parser.add_argument("--min-seq-len", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=Path(DEFAULT_CACHE), help="prepared-data cache")
    parser.add_argument("--download-url", default=None, help="archive URL (file:// works) instead of GroupLens")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading missing files")


def load_data(args: argparse.Namespace):
    from .data import PrepareOptions, prepare_dataset

    options = PrepareOptions(args.dataset, args.top_users, args.min_seq_len)
    data_dir = args.data_dir or Path("data") / args.dataset
    return prepare_dataset(options, data_dir, args.cache_dir, items_file=args.items_file,
                           download_url=args.download_url, download=not args.no_download)


def cmd_prepare(args: argparse.Namespace) -> dict:
    data, folder = load_data(args)
    return {**data.stats(), "dataset": args.dataset, "cache": str(folder)}


def cmd_train_central(args: argparse.Namespace) -> dict:
    import torch

    from .models.sasrec import SASRec, SASRecConfig
    from .train import TrainConfig, result_payload, train_central

    if args.threads:
        torch.set_num_threads(args.threads)
    data, folder = load_data(args)
    model_config = SASRecConfig(num_items=data.num_items, hidden=args.hidden, maxlen=args.maxlen,
                                num_blocks=args.blocks, num_heads=args.heads, dropout=args.dropout)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                               num_negatives=args.negatives, eval_every=args.eval_every, patience=args.patience,
                               seed=args.seed)
    torch.manual_seed(args.seed)
    out = args.out or Path("outputs") / f"central-{args.dataset}-sasrec"
    result = train_central(SASRec(model_config), data, train_config, out_dir=out, device=args.device,
                           extra_config={"dataset": args.dataset, "data_cache": str(folder), "data": data.stats()})
    payload = result_payload(result)
    return {"out": str(out), "best_epoch": payload["best_epoch"], "test": payload["test"],
            "wall_time_s": payload["wall_time_s"], "train_sequences_per_s": payload["train_sequences_per_s"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddmmr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="read, filter, split and cache a dataset; print its statistics")
    _add_data_args(prepare)
    prepare.add_argument("--out", dest="cache_dir", type=Path, help="alias of --cache-dir")
    prepare.set_defaults(func=cmd_prepare)

    central = sub.add_parser("train-central", help="train SASRec centrally and write a results JSON")
    _add_data_args(central)
    central.add_argument("--epochs", type=int, default=200)
    central.add_argument("--batch-size", type=int, default=128)
    central.add_argument("--lr", type=float, default=1e-3)
    central.add_argument("--loss", default="ce", help="ce (sampled softmax) | bce | bpr")
    central.add_argument("--negatives", type=int, default=100, help="training negatives per sequence (ce) or position")
    central.add_argument("--hidden", type=int, default=64)
    central.add_argument("--maxlen", type=int, default=200)
    central.add_argument("--blocks", type=int, default=2)
    central.add_argument("--heads", type=int, default=1)
    central.add_argument("--dropout", type=float, default=0.2)
    central.add_argument("--eval-every", type=int, default=5)
    central.add_argument("--patience", type=int, default=10)
    central.add_argument("--seed", type=int, default=42)
    central.add_argument("--device", default="cpu")
    central.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    central.add_argument("--out", type=Path, default=None, help="output folder (results.json, best.pt)")
    central.set_defaults(func=cmd_train_central)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        payload = args.func(args)
    except FedDMMRError as exc:
        print(f"feddmmr: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
