"""Recommendations from a saved model: ``feddmmr recommend`` (issue #8).

A run folder's checkpoint (federated: ``best.pt``, ``checkpoint-<stage>.pt``, ``last.pt``;
``train-central``: ``best.pt``) knows which dataset and feature tables it was trained on; this
module reloads them, scores every item for one user with the same scorer as the evaluation
protocol and explains the top items (router weights, the memory items each expert read).

A federated run's memories stay on the clients, so the user's memory is rebuilt here from the
user's training sequence with ``refresh_memory`` — what a client that never trained does before
it evaluates. A ``train-central`` checkpoint saves every user's memory, and that one is used.

User ids: ``prepare`` numbers users 0..U-1 in the order of their raw ids (numeric order when all
raw ids are integers, else text order); the index is also the Flower ``partition-id`` of the
user's node. People know the raw id (ML-100K ``u.data`` column 1), so that is what ``--user`` takes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint
from .checkpoint import load as load_checkpoint
from .config import ExperimentConfig
from .data.sequences import SequenceData
from .errors import ConfigError, FedDMMRError, MissingDataError
from .experiment import first_memory, install_features, load_assets
from .local_training import memory_slots
from .memory import LocalDynamicMemory
from .models.feddmmr import EXPERT_NAMES, FedDMMR, FedDMMRConfig

NAMED_CHECKPOINTS = ("best", "last")


class UnknownUserError(FedDMMRError, KeyError):
    """The user id is not in the prepared dataset."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class SavedRun:
    """A checkpoint and the experiment configuration it was trained with."""

    folder: Path
    path: Path
    checkpoint: Checkpoint
    cfg: ExperimentConfig

    def describe(self) -> str:
        """One line: which weights these are (round/epoch, stage, validation score when known)."""
        saved = self.checkpoint
        parts = [f"{self.path.name} ({saved.kind}, {saved.unit} {saved.round}"]
        if saved.stage:
            parts.append(f" [{saved.stage}]")
        if saved.valid and "NDCG@10" in saved.valid:
            parts.append(f", validation NDCG@10 {saved.valid['NDCG@10']:.4f}")
        return "".join(parts) + ")"


def checkpoint_path(run: Path | None, which: str) -> Path:
    """``best``/``last``/``<stage>`` inside the run folder, or a ``.pt`` path."""
    if which.endswith(".pt") or "/" in which:
        path = Path(which).expanduser()
    else:
        if run is None:
            raise ConfigError("give --run (a run folder) or --checkpoint path/to/file.pt")
        name = f"{which}.pt" if which in NAMED_CHECKPOINTS else f"checkpoint-{which}.pt"
        path = run / name
    if not path.is_file():
        if run is not None and not run.is_dir():
            raise MissingDataError(f"run folder {run} not found")
        found = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        raise MissingDataError(
            f"checkpoint {path} not found"
            + (f" (the folder has {', '.join(found)})" if found else " (the folder has no .pt file)")
        )
    return path


def load_run(run: str | Path | None, which: str = "best", overrides: dict[str, Any] | None = None) -> SavedRun:
    """Open a run folder's checkpoint and rebuild its ``ExperimentConfig`` (``overrides``: flat keys,
    e.g. ``{"data-dir": ...}`` when the run was made on another machine)."""
    folder = Path(run).expanduser() if run else None
    path = checkpoint_path(folder, which)
    saved = load_checkpoint(path, "recommend")
    flat = {**saved.experiment, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    flat["variant"] = saved.model_config.get("variant", flat.get("variant"))
    return SavedRun(folder or path.parent, path, saved, ExperimentConfig.from_flat(flat))


def user_index(data: SequenceData, raw_id: str) -> int:
    """Index (= Flower partition-id) of the user whose raw id is ``raw_id``."""
    matches = np.flatnonzero(data.user_raw_ids == str(raw_id).strip())
    if len(matches) == 0:
        ids = data.user_raw_ids
        raise UnknownUserError(
            f"user {raw_id!r} is not in this dataset ({data.num_users} users, raw ids "
            f"{ids[0]} … {ids[-1]}; users with fewer than min-seq-len interactions were dropped)"
        )
    return int(matches[0])


class Recommender:
    """A saved model with its dataset, ready to score users."""

    def __init__(self, run: SavedRun) -> None:
        self.run = run
        cfg = run.cfg
        self.assets = load_assets(cfg)
        self.data = self.assets.data
        model_cfg = FedDMMRConfig(**run.checkpoint.model_config)
        if model_cfg.num_items != self.data.num_items:
            raise ConfigError(
                f"dataset mismatch: {run.path} was trained on {model_cfg.num_items} items, the "
                f"dataset prepared from {cfg.data_dir} has {self.data.num_items} (--data-dir?)"
            )
        self.model = FedDMMR(model_cfg)
        install_features(self.model, self.assets)
        try:
            self.model.load_state_dict(run.checkpoint.state_dict)
        except RuntimeError as exc:
            raise ConfigError(f"{run.path} does not fit its model config: {str(exc).splitlines()[0]}") from None
        self.model.to(cfg.device).eval()
        protos = run.checkpoint.prototypes
        self.prototypes = (
            None
            if protos is None or len(protos) == 0 or not model_cfg.uses_prototypes
            else torch.as_tensor(protos, dtype=torch.float32, device=cfg.device)
        )

    # ------------------------------------------------------------------ memory
    def memory(self, user: int) -> tuple[LocalDynamicMemory | None, int, str]:
        """(memory, its row for this user, where it came from)."""
        if not self.model.config.uses_experts:
            return None, 0, "none (variant sasrec has no experts)"
        saved = self.run.checkpoint.memory_bank()
        if saved is not None and len(saved.step) == self.data.num_users:
            return saved, user, "saved with the checkpoint (central training keeps every user's memory)"
        memory = first_memory(self.model, self.data, user, self.run.cfg)
        return (
            memory,
            0,
            (
                "rebuilt here from the user's training sequence with this model (refresh_memory, the "
                "client's code path): a federated run's memories stay on the clients"
            ),
        )

    # --------------------------------------------------------------- scoring
    def _title(self, item: int) -> str:
        return str(self.data.item_titles[item]) or f"item {self.data.item_raw_ids[item]}"

    def _item(self, item: int, **extra) -> dict:
        return {"item": str(self.data.item_raw_ids[item]), "title": self._title(item), **extra}

    @torch.no_grad()
    def recommend(self, user: int, k: int = 10, explain: bool = False, history: int = 10, top_memory: int = 3) -> dict:
        """Top-``k`` unseen items for the user at index ``user``, scored after their whole history."""
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        data, model, device = self.data, self.model, self.run.cfg.device
        seq = data.sequence(user)
        stamps = data.timestamps[data.offsets[user] : data.offsets[user + 1]]
        window = np.zeros((1, model.config.maxlen), dtype=np.int64)
        recent = seq[-model.config.maxlen :]
        window[0, model.config.maxlen - len(recent) :] = recent
        memory, row, memory_source = self.memory(user)
        rows = torch.tensor([row])
        slots = memory_slots(model, memory, rows, self.prototypes, device)
        hidden = model.encode(torch.as_tensor(window, device=device))[:, -1]
        scores = model.score(hidden, None, slots)[0].cpu()
        seen = torch.as_tensor(data.history_mask(np.array([user]), "all")[0])
        scores = scores.masked_fill(seen, -float("inf"))
        k = min(k, int((~seen).sum()))
        top = torch.topk(scores, k)
        items = top.indices.tolist()
        recs = [
            self._item(i, rank=r + 1, score=round(float(s), 4))
            for r, (i, s) in enumerate(zip(items, top.values.tolist()))
        ]
        result = {
            "run": str(self.run.folder),
            "checkpoint": str(self.run.path),
            "weights": self.run.describe(),
            "dataset": {
                "name": self.run.cfg.dataset,
                "data_dir": self.run.cfg.data_dir,
                "num_users": data.num_users,
                "num_items": data.num_items,
            },
            "user": {"raw_id": str(data.user_raw_ids[user]), "index": user, "num_items_seen": len(seq)},
            "history": [
                self._item(int(i), time=_date(int(t))) for i, t in zip(seq[-history:][::-1], stamps[-history:][::-1])
            ]
            if history > 0
            else [],
            "recommendations": recs,
            "excluded": "every item the user has seen",
        }
        if explain:
            result["memory"] = self._memory_summary(memory, row, memory_source)
            if slots is not None:
                self._explain(recs, items, slots, memory, row, top_memory)
        return result

    def _memory_summary(self, memory: LocalDynamicMemory | None, row: int, source: str) -> dict:
        summary = {"source": source, "entries": 0, "prototypes": 0 if self.prototypes is None else len(self.prototypes)}
        if memory is not None:
            summary["entries"] = int((memory.item[row] > 0).sum())
            summary["retrieved"] = int((memory.retrieve(torch.tensor([row]))[0] > 0).sum())
        return summary

    def _explain(
        self, recs: list[dict], items: list[int], slots, memory: LocalDynamicMemory, row: int, top_memory: int
    ) -> None:
        """Add router weights, the expert term of the score and the most-read memory items to ``recs``."""
        cand = torch.as_tensor([items], device=self.run.cfg.device)
        why = self.model.explain(cand, slots)
        slot_items, _ = memory.retrieve(torch.tensor([row]))
        slot_items = slot_items[0].tolist()
        num_protos = slots.vis.shape[1] - len(slot_items)  # prototypes come first
        for q, rec in enumerate(recs):
            rec["router"] = {name: round(float(why["router"][0, q, e]), 4) for e, name in enumerate(EXPERT_NAMES)}
            rec["expert_term"] = round(float(why["term"][0, q]), 4)
            for name in EXPERT_NAMES:
                if rec["router"][name] == 0:  # the router switched it off: what it read does not count
                    rec[f"{name}_read"], rec[f"{name}_prototype_attention"] = [], 0.0
                    rec[f"{name}_unused"] = self._unused_reason(name, items[q], slots)
                    continue
                weights = why[name][0, q].cpu()
                read = []
                for s in torch.argsort(weights[num_protos:], descending=True).tolist():
                    if len(read) == top_memory or weights[num_protos + s] < 0.005 or slot_items[s] == 0:
                        break
                    read.append(self._item(slot_items[s], attention=round(float(weights[num_protos + s]), 4)))
                rec[f"{name}_read"] = read
                rec[f"{name}_prototype_attention"] = round(float(weights[:num_protos].sum()), 4)

    def _unused_reason(self, expert: str, item: int, slots) -> str:
        if expert == "visual" and not bool(self.model.vis_avail[item]):
            return "this item has no image"
        available = slots.vis_ok if expert == "visual" else slots.txt_ok
        if not bool(available.any()):
            return f"no memory slot has {'an image' if expert == 'visual' else 'a text'}"
        return "the router gave it weight 0"


def _date(stamp: int) -> str:
    """A unix time as a date; anything else (e.g. file order for CSVs without timestamps) as is."""
    if 0 < stamp < 4_102_444_800:  # 2100-01-01
        return time.strftime("%Y-%m-%d", time.gmtime(stamp))
    return str(stamp)


def format_text(result: dict) -> str:
    """The human-readable form of ``Recommender.recommend``'s result."""
    user, ds = result["user"], result["dataset"]
    lines = [
        f"run {result['run']}: {result['weights']}",
        f"dataset {ds['name']} ({ds['num_users']} users, {ds['num_items']} items) from {ds['data_dir']}",
        f"user {user['raw_id']} (index {user['index']} = Flower partition-id), {user['num_items_seen']} items seen",
    ]
    if result["history"]:
        lines.append(f"last {len(result['history'])} items, most recent first:")
        lines += [f"  {h['time']:>10}  {h['title']}" for h in result["history"]]
    lines.append(f"top {len(result['recommendations'])} recommendations ({result['excluded']} excluded):")
    width = max(len(f"{r['score']:.3f}") for r in result["recommendations"])
    for rec in result["recommendations"]:
        lines.append(f"  {rec['rank']:>3}. {rec['score']:>{width}.3f}  {rec['title']}")
        if "router" in rec:
            router = rec["router"]
            lines.append(
                f"       router: visual {router['visual']:.2f}, semantic {router['semantic']:.2f}; "
                f"experts add {rec['expert_term']:+.3f} to the score"
            )
            for name in EXPERT_NAMES:
                if f"{name}_unused" in rec:
                    lines.append(f"       {name} expert not used: {rec[f'{name}_unused']}")
                    continue
                read = ", ".join(f"{m['title']} ({m['attention']:.2f})" for m in rec[f"{name}_read"]) or "nothing"
                proto = rec[f"{name}_prototype_attention"]
                lines.append(f"       {name} expert read: {read}" + (f"; prototypes {proto:.2f}" if proto else ""))
    if "memory" in result and result["memory"]["source"].startswith("none"):
        lines.append(
            "explain: this model has no experts (variant sasrec): a score is the SASRec state · item embedding"
        )
    elif "memory" in result:
        mem = result["memory"]
        lines.append(
            f"memory: {mem['entries']} items ({mem.get('retrieved', 0)} retrieved for the experts) + "
            f"{mem['prototypes']} global prototypes; {mem['source']}"
        )
    return "\n".join(lines)
