"""The server's round loop: stages, progress, history, checkpoints, resume, final test.

``FedDMMRStrategy`` decides what goes out and how replies combine; this loop only drives it
(``Strategy.start`` cannot resume or write per-round files) and records what happened in
``outputs/<run-name>/``: config.json, history.json, best.pt, checkpoint-<stage>.pt, last.pt,
curves.png and summary.json.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import random
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from feddmmr_flower.atomic import atomic_path, writable_dir
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.data.sequences import atomic_write_json
from feddmmr_flower.errors import ConfigError
from feddmmr_flower.experiment import load_data, load_weights, model_config, resolve_path
from feddmmr_flower.models.feddmmr import FedDMMR
from feddmmr_flower.plots import plot_curves
from feddmmr_flower.stages import StageSchedule, trainable_names
from strategies import FedDMMRStrategy
from strategies.dp import make_dp
from strategies.secagg import SecAggPlusAggregation


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _metrics(record) -> dict:
    return {} if record is None else {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}


def _save_pt(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:  # unique temp name, removed on failure
        torch.save(payload, tmp, pickle_protocol=pickle.HIGHEST_PROTOCOL)


def _pickle(obj) -> bytes:
    """Pickle strategy state; in a deployment, arrays that came over the wire are memoryviews."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda view: (bytes, (view.tobytes(),))}
    pickler.dump(obj)
    return buffer.getvalue()


def _model_payload(cfg: ExperimentConfig, model: FedDMMR, arrays: ArrayRecord, prototypes, **extra) -> dict:
    state = {name: torch.as_tensor(array.numpy()) for name, array in arrays.items()}
    return {
        "model_config": asdict(model.config),
        "state_dict": state,
        "experiment": cfg.flat(),
        "prototypes": None if prototypes is None else torch.as_tensor(prototypes),
        **extra,
    }


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.schedule = StageSchedule.parse(cfg.stage_schedule)
        data, _ = load_data(cfg)  # the catalogue size only: the server never sees interactions
        torch.manual_seed(cfg.seed)
        self.model = FedDMMR(model_config(cfg, data))
        if cfg.init_from:
            fresh = load_weights(self.model, cfg.init_from)
            _say(f"[feddmmr] init-from {cfg.init_from} ({len(fresh)} tensors kept from a fresh model)")
        self.out = resolve_path(cfg.output_dir) / (
            cfg.run_name or self._resumed_name(cfg) or time.strftime("run-%Y%m%d-%H%M%S")
        )
        if cfg.resume_from:  # checked before the output folder is created
            last = Path(cfg.resume_from)
            if not (last / "last.pt" if last.is_dir() else last).is_file():
                raise ConfigError(f"resume-from: no checkpoint at {last / 'last.pt' if last.is_dir() else last}")
        writable_dir(self.out, "output-dir")  # a one-line ConfigError now, not a traceback later
        self.history: list[dict] = []
        self.start_round = 1
        # Names this run on the clients' disks (their memory files): unique per fresh run, kept on resume.
        self.run_key = f"{self.out.name}-{uuid.uuid4().hex[:8]}"
        self.arrays = ArrayRecord(self.model.state_dict())
        self.dp = make_dp(cfg)  # docs/privacy.md
        self.secagg = (
            SecAggPlusAggregation(
                cfg.secagg_num_shares, cfg.secagg_threshold, cfg.secagg_clipping_range, max_weight=float(cfg.maxlen)
            )
            if cfg.secure_aggregation
            else None
        )
        self.strategy = FedDMMRStrategy(
            schedule=self.schedule,
            base=cfg.strategy,
            base_kwargs=dict(
                fraction_train=cfg.fraction_train,
                fraction_evaluate=0.0,
                min_available_nodes=cfg.min_available_nodes,
                min_train_nodes=1,
                eta=cfg.server_lr,
                eta_l=cfg.client_lr,
                tau=cfg.server_tau,
                server_learning_rate=cfg.server_lr,
                proximal_mu=cfg.proximal_mu,
            ),
            trainable_names=lambda stage: trainable_names(self.model, stage),
            num_prototypes=cfg.num_prototypes,
            prototype_ema=cfg.prototype_ema,
            prototype_seed=cfg.seed,
            prototype_dim=self.model.config.prototype_dim if self.model.config.uses_prototypes else None,
            evaluate_every=cfg.eval_every,
            evaluate_split="valid",
            pre_aggregate=self.dp,
            pack_arrays=not cfg.secure_aggregation,  # SecAgg+ masks the arrays record itself
        )
        if cfg.resume_from:
            self._resume(Path(cfg.resume_from))

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _resumed_name(cfg: ExperimentConfig) -> str:
        """A resumed run keeps writing into the folder it continues (and clients find its memories)."""
        if not cfg.resume_from:
            return ""
        path = Path(cfg.resume_from)
        return (path if path.is_dir() else path.parent).name

    def _resume(self, path: Path) -> None:
        path = path / "last.pt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"resume-from: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        earlier = state["experiment"]["stage-schedule"]
        if not self.schedule.continues(StageSchedule.parse(earlier), int(state["round"])):
            raise ConfigError(
                f"resume-from: {path} stopped after round {state['round']} of stage-schedule "
                f"{earlier!r}; this run's {self.cfg.stage_schedule!r} does not continue it "
                "(it may only add rounds after that round)"
            )
        self.run_key = state.get("run_key", self.run_key)
        self.arrays = ArrayRecord(state["state_dict"])  # a torch state_dict
        self.strategy.restore_state(pickle.loads(state["strategy"]))
        self.history = state["history"]
        self.start_round = int(state["round"]) + 1
        _say(f"[feddmmr] resuming {path} after round {state['round']} of {self.schedule.total_rounds}")

    def _wait_for_nodes(self, timeout: float = 600.0) -> list[int]:
        deadline = time.time() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_available_nodes:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of min-available-nodes={self.cfg.min_available_nodes} "
                    f"nodes connected after {timeout:.0f} s"
                )
            time.sleep(1.0)

    # -------------------------------------------------------------- loop
    def run(self) -> dict:
        nodes = self._wait_for_nodes()
        sample = len(nodes) if self.cfg.eval_users == 0 else min(self.cfg.eval_users, len(nodes))
        self.strategy.evaluate_node_ids = sorted(random.Random(self.cfg.seed).sample(nodes, sample))
        atomic_write_json(
            self.out / "config.json",
            {
                "experiment": self.cfg.flat(),
                "schedule": str(self.schedule),
                "nodes": len(nodes),
                "eval_nodes": sample,
                "run_key": self.run_key,
                "model": asdict(self.model.config),
                "privacy": self._privacy(),
            },
        )
        # run-key: names the run on the clients' disks (node-local memory files, see client_state.py)
        train_cfg = ConfigRecord(
            {"lr": self.cfg.client_lr, "local-epochs": self.cfg.local_epochs, "run-key": self.run_key}
        )
        eval_cfg = ConfigRecord({"run-key": self.run_key})
        if self.cfg.dp_mode == "central-fixed":
            train_cfg["clipping_norm"] = self.cfg.dp_clipping_norm  # read by Flower's fixedclipping_mod
            self.dp.population = len(nodes)  # type: ignore[union-attr]
        total = self.schedule.total_rounds
        started = time.time()
        _say(
            f"[feddmmr] {len(nodes)} nodes, {total} rounds ({self.schedule}), strategy {self.cfg.strategy}, "
            f"data {resolve_path(self.cfg.data_dir).resolve()}, output {self.out.resolve()}"
        )
        for rnd in range(self.start_round, total + 1):
            tick = time.time()
            stage = self.strategy.stage_for_round(rnd)
            if self.secagg is not None:
                arrays, train_metrics = self.secagg.train_round(self.strategy, rnd, self.arrays, train_cfg, self.grid)
            else:
                replies = self.grid.send_and_receive(
                    self.strategy.configure_train(rnd, self.arrays, train_cfg, self.grid)
                )
                arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
            if arrays is not None:
                self.arrays = arrays
            eval_msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, eval_cfg, self.grid))
            valid = None
            if eval_msgs:
                valid = self.strategy.aggregate_evaluate(rnd, self.grid.send_and_receive(eval_msgs))
                if valid is None:
                    _say(f"[feddmmr] round {rnd}: all {len(eval_msgs)} evaluation replies failed (see the client log)")
            seconds = time.time() - tick
            record = {
                "round": rnd,
                "stage": stage,
                "seconds": round(seconds, 3),
                "trainable_arrays": list(self.strategy._names),
                "train": _metrics(train_metrics),
                "valid": _metrics(valid),
                "valid_requested": len(eval_msgs),
                "rejected": self.strategy.rejected.get(rnd, []),
                "failed": self.strategy.failed.get(rnd, []),
            }
            self.history.append(record)
            self._save_round(rnd, stage, valid)
            done = rnd - self.start_round + 1
            eta = (time.time() - started) / done * (total - rnd)
            line = (
                f"round {rnd}/{total} [{stage}] nodes {int(record['train'].get('num-accepted', 0))}"
                f" loss {record['train'].get('loss', float('nan')):.4f}"
            )
            if valid is not None:
                line += f"  valid NDCG@10 {valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}"
            if record["rejected"] or record["failed"]:
                line += f"  rejected {len(record['rejected'])} failed {len(record['failed'])}"
            _say(line + f"  {seconds:.1f}s  ETA {eta / 60:.1f} min")
        return self._finish(time.time() - started)

    def _save_round(self, rnd: int, stage: str, valid) -> None:
        atomic_write_json(self.out / "history.json", {"rounds": self.history})
        best = self.strategy.best
        if valid is not None and best is not None and best.server_round == rnd:
            _save_pt(
                self.out / "best.pt",
                _model_payload(self.cfg, self.model, best.arrays, best.prototypes, round=rnd, valid=_metrics(valid)),
            )
        segment = self.schedule.segment_for_round(rnd)
        if rnd == segment.last_round:
            _save_pt(
                self.out / f"checkpoint-{stage}.pt",
                _model_payload(self.cfg, self.model, self.arrays, self.strategy.prototypes, round=rnd),
            )
        _save_pt(
            self.out / "last.pt",
            _model_payload(
                self.cfg,
                self.model,
                self.arrays,
                self.strategy.prototypes,
                round=rnd,
                history=self.history,
                run_key=self.run_key,
                strategy=_pickle(self.strategy.checkpoint_state()),
            ),
        )
        if valid is not None or rnd == segment.last_round:  # a plot costs ~0.3 s: not every round
            plot_curves({self.out.name: self.history}, self.out / "curves.png")

    def _privacy(self) -> dict:
        """What protects the model arrays of this run (docs/privacy.md), with epsilon so far."""
        secagg = (
            None
            if self.secagg is None
            else {
                "num_shares": self.cfg.secagg_num_shares,
                "reconstruction_threshold": self.cfg.secagg_threshold,
                "clipping_range": self.cfg.secagg_clipping_range,
                "quantization_range": 2**22,
                "max_weight": float(self.cfg.maxlen),
            }
        )
        return {
            "dp": None if self.dp is None else self.dp.report(),
            "secure_aggregation": secagg,
            "prototypes": {"min_cluster_size": self.cfg.min_cluster_size, "noise_std": self.cfg.prototype_noise},
        }

    def _finish(self, seconds: float) -> dict:
        best = self.strategy.best
        arrays = best.arrays if best is not None else self.arrays
        prototypes = best.prototypes if best is not None else self.strategy.prototypes
        test: dict = {}
        if self.cfg.final_test:
            _say(
                f"[feddmmr] final test on all {len(self.grid.get_node_ids())} nodes with the best model "
                f"(round {best.server_round if best else 'last'})"
            )
            test = _metrics(
                self.strategy.evaluate_all(
                    self.grid,
                    arrays,
                    split="test",
                    prototypes=prototypes,
                    config=ConfigRecord({"run-key": self.run_key}),
                )
            )
        else:
            _say("[feddmmr] final-test = false: no test evaluation (best.pt holds the selected model)")
        sampled = {k: v for k, v in test.items() if k.split("@")[0] in ("HR", "NDCG") or k == "MRR"}
        full = {k[len("full-") :]: v for k, v in test.items() if k.startswith("full-")}
        rounds = [r["seconds"] for r in self.history]
        client = [r["train"].get("total-client-train-seconds", 0.0) for r in self.history]
        summary = {
            "run": str(self.out),
            "rounds": len(self.history),
            "wall_time_s": round(seconds, 1),
            "best_round": best.server_round if best else None,
            "best_valid_NDCG@10": best.value if best else None,
            "test": {"sampled": sampled, "full": full, "num_users": test.get("num-examples")},
            "mean_round_seconds": round(float(np.mean(rounds)), 3) if rounds else None,
            "mean_client_train_seconds_per_round": round(float(np.mean(client)), 3) if client else None,
            "privacy": self._privacy(),
        }
        atomic_write_json(self.out / "summary.json", summary)
        _say(
            f"[feddmmr] done in {seconds / 60:.1f} min: test NDCG@10 {sampled.get('NDCG@10', float('nan')):.4f} "
            f"HR@10 {sampled.get('HR@10', float('nan')):.4f} (sampled), NDCG@10 {full.get('NDCG@10', float('nan')):.4f} "
            f"(full). Outputs in {self.out}"
        )
        return summary
