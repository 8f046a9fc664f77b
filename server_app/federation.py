"""The server's round loop: stages, progress, history, checkpoints, resume, final test.

``FedDMMRStrategy`` decides what goes out and how replies combine, a collector (plain, or SecAgg+)
moves the round's messages and checks the replies; this loop only drives them (``Strategy.start``
cannot resume or write per-round files) and records what happened in ``outputs/<run-name>/``:
config.json, history.json, summary.json (``feddmmr_flower.run_record``), best.pt,
checkpoint-<stage>.pt, last.pt (``feddmmr_flower.checkpoint``) and curves.png.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from feddmmr_flower import checkpoint
from feddmmr_flower import run_record as names
from feddmmr_flower.atomic import writable_dir
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.errors import ConfigError
from feddmmr_flower.experiment import load_data, load_weights, model_config, resolve_path
from feddmmr_flower.models.feddmmr import FedDMMR
from feddmmr_flower.plots import plot_curves
from feddmmr_flower.run_record import RunRecorder, round_record, split_protocols
from feddmmr_flower.stages import StageSchedule, trainable_names
from feddmmr_wire import evaluate_settings, to_numpy, train_settings
from feddmmr_wire.keys import NUM_EXAMPLES
from strategies import EvaluationOptions, FedDMMRStrategy, PlainCollector, PrototypeOptions, SecAggPlusCollector
from strategies.collect import Collector
from strategies.dp import make_dp

QUANTIZATION_RANGE = 2**22  # SecAgg+ quantisation levels (Flower's default)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _pickle(obj) -> bytes:
    """Pickle strategy state; in a deployment, arrays that came over the wire are memoryviews."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda view: (bytes, (view.tobytes(),))}
    pickler.dump(obj)
    return buffer.getvalue()


def build_strategy(cfg: ExperimentConfig, model: FedDMMR, privacy) -> FedDMMRStrategy:  # noqa: ANN001
    """The run config's strategy: base, stages, prototypes, evaluation, privacy."""
    return FedDMMRStrategy(
        schedule=cfg.stage_schedule,
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
        trainable_names=lambda stage: trainable_names(model, stage),
        prototypes=PrototypeOptions(
            num=cfg.num_prototypes,
            ema=cfg.prototype_ema,
            seed=cfg.seed,
            dim=model.config.prototype_dim if model.config.uses_prototypes else None,
        ),
        evaluation=EvaluationOptions(every=cfg.eval_every),
        privacy=privacy,
        pack_wire=not cfg.secure_aggregation,  # SecAgg+ masks the arrays record itself
    )


def build_collector(cfg: ExperimentConfig) -> Collector:
    """How a round's replies are collected: plain, or through SecAgg+ (docs/privacy.md)."""
    if not cfg.secure_aggregation:
        return PlainCollector()
    return SecAggPlusCollector(
        cfg.secagg_num_shares,
        cfg.secagg_threshold,
        cfg.secagg_clipping_range,
        max_weight=float(cfg.maxlen),
        quantization_range=QUANTIZATION_RANGE,
    )


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
        last = self._resume_path(cfg)
        self.out = resolve_path(cfg.output_dir) / (
            cfg.run_name or (last.parent.name if last else "") or time.strftime("run-%Y%m%d-%H%M%S")
        )
        resumed = checkpoint.load(last, "resume-from") if last else None  # checked before any output exists
        writable_dir(self.out, "output-dir")  # a one-line ConfigError now, not a traceback later
        self.recorder = RunRecorder(self.out, "federated")
        self.start_round = 1
        # Names this run on the clients' disks (their memory files): unique per fresh run, kept on resume.
        self.run_key = f"{self.out.name}-{uuid.uuid4().hex[:8]}"
        self.arrays = ArrayRecord(self.model.state_dict())
        self.dp = make_dp(cfg)  # docs/privacy.md
        self.strategy = build_strategy(cfg, self.model, self.dp)
        self.collector = build_collector(cfg)
        self.after_round: Callable[[int], None] | None = None  # called once a round is recorded (profilers)
        if resumed is not None:
            self._resume(last, resumed)  # type: ignore[arg-type]

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _resume_path(cfg: ExperimentConfig) -> Path | None:
        """resume-from as a last.pt path (a resumed run keeps writing into the folder it continues)."""
        if not cfg.resume_from:
            return None
        path = Path(cfg.resume_from)
        return path / "last.pt" if path.is_dir() else path

    def _resume(self, path: Path, saved: checkpoint.Checkpoint) -> None:
        earlier = saved.experiment["stage-schedule"]
        if saved.resume is None:
            raise ConfigError(f"resume-from: {path} is a {saved.kind} model checkpoint, not a run's last.pt")
        if not self.schedule.continues(StageSchedule.parse(earlier), saved.round):
            raise ConfigError(
                f"resume-from: {path} stopped after round {saved.round} of stage-schedule "
                f"{earlier!r}; this run's {self.cfg.stage_schedule!r} does not continue it "
                "(it may only add rounds after that round)"
            )
        self.run_key = saved.resume["run_key"]
        self.arrays = ArrayRecord(saved.state_dict)  # a torch state_dict
        self.strategy.restore_state(pickle.loads(saved.resume["strategy"]))
        self.recorder.history = list(saved.resume["history"])
        self.start_round = saved.round + 1
        _say(f"[feddmmr] resuming {path} after round {saved.round} of {self.schedule.total_rounds}")

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
        self.recorder.write_config(
            self.cfg.flat(),
            schedule=str(self.schedule),
            nodes=len(nodes),
            eval_nodes=sample,
            run_key=self.run_key,
            model=asdict(self.model.config),
            privacy=self._privacy(),
        )
        clipping = self.cfg.dp_clipping_norm if self.cfg.dp_mode == "central-fixed" else None
        train_cfg = train_settings(self.cfg.client_lr, self.cfg.local_epochs, self.run_key, clipping)
        eval_cfg = evaluate_settings(self.run_key)
        if self.cfg.dp_mode == "central-fixed":
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
            instructions = list(self.strategy.configure_train(rnd, self.arrays, train_cfg, self.grid))
            current = self.strategy.round
            assert current is not None
            replies = self.collector.collect(rnd, instructions, self.grid, current.expected)
            self.arrays, train_metrics = self.strategy.aggregate_round(rnd, replies)
            eval_msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, eval_cfg, self.grid))
            valid = None
            if eval_msgs:
                valid = self.strategy.aggregate_evaluate(rnd, self.grid.send_and_receive(eval_msgs))
                if valid is None:
                    _say(f"[feddmmr] round {rnd}: all {len(eval_msgs)} evaluation replies failed (see the client log)")
            seconds = time.time() - tick
            record = round_record(
                rnd,
                stage,
                seconds,
                train_metrics,
                valid,
                trainable_arrays=list(current.names),
                valid_requested=len(eval_msgs),
                rejected=self.strategy.rejected.get(rnd, []),
                failed=self.strategy.failed.get(rnd, []),
                skipped=self.strategy.skipped.get(rnd, []),
            )
            self.recorder.add(record)
            self._save_round(rnd, stage, valid)
            if self.after_round is not None:
                self.after_round(rnd)
            eta = (time.time() - started) / (rnd - self.start_round + 1) * (total - rnd)
            line = (
                f"round {rnd}/{total} [{stage}] nodes {int(record['train'].get(names.NUM_ACCEPTED, 0))}"
                f" loss {record['train'].get('loss', float('nan')):.4f}"
            )
            if valid is not None:
                line += f"  valid NDCG@10 {valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}"
            if record["skipped"]:  # nodes with nothing to train (left out of training afterwards)
                line += f"  skipped {len(record['skipped'])} (nothing to train)"
            if record["rejected"] or record["failed"]:
                line += f"  rejected {len(record['rejected'])} failed {len(record['failed'])}"
            _say(line + f"  {seconds:.1f}s  ETA {eta / 60:.1f} min")
        return self._finish(time.time() - started)

    def _checkpoint(self, arrays: ArrayRecord, prototypes, rnd: int, **extra) -> checkpoint.Checkpoint:  # noqa: ANN001
        return checkpoint.Checkpoint(
            kind="federated",
            model_config=asdict(self.model.config),
            state_dict=checkpoint.model_state(to_numpy(arrays)),
            experiment=self.cfg.flat(),
            prototypes=None if prototypes is None else torch.as_tensor(prototypes),
            round=rnd,
            stage=self.schedule.stage_for_round(rnd),
            **extra,
        )

    def _save_round(self, rnd: int, stage: str, valid) -> None:  # noqa: ANN001
        best = self.strategy.best
        if valid is not None and best is not None and best.server_round == rnd:
            saved = self._checkpoint(best.arrays, best.prototypes, rnd, valid=dict(valid))
            checkpoint.save(self.out / "best.pt", saved)
        segment = self.schedule.segment_for_round(rnd)
        if rnd == segment.last_round:
            checkpoint.save(
                self.out / f"checkpoint-{stage}.pt", self._checkpoint(self.arrays, self.strategy.prototypes, rnd)
            )
        resume = {
            "history": self.recorder.history,
            "run_key": self.run_key,
            "strategy": _pickle(self.strategy.checkpoint_state()),
        }
        checkpoint.save(
            self.out / "last.pt", self._checkpoint(self.arrays, self.strategy.prototypes, rnd, resume=resume)
        )
        if valid is not None or rnd == segment.last_round:  # a plot costs ~0.3 s: not every round
            plot_curves({self.out.name: self.recorder.history}, self.out / "curves.png")

    def _privacy(self) -> dict:
        """What protects the model arrays of this run (docs/privacy.md), with epsilon so far."""
        secagg = None
        if self.cfg.secure_aggregation:
            secagg = {
                "num_shares": self.cfg.secagg_num_shares,
                "reconstruction_threshold": self.cfg.secagg_threshold,
                "clipping_range": self.cfg.secagg_clipping_range,
                "quantization_range": QUANTIZATION_RANGE,
                "max_weight": float(self.cfg.maxlen),
            }
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
            config = evaluate_settings(self.run_key)
            test = dict(
                self.strategy.evaluate_all(self.grid, arrays, split="test", prototypes=prototypes, config=config) or {}
            )
        else:
            _say("[feddmmr] final-test = false: no test evaluation (best.pt holds the selected model)")
        protocols = split_protocols(test)
        client = [r["train"].get(names.TOTAL_CLIENT_TRAIN_SECONDS, 0.0) for r in self.recorder.history]
        best_valid = None
        if best is not None:
            best_valid = next((r["valid"] for r in self.recorder.history if r["round"] == best.server_round), None)
            best_valid = {**(best_valid or {}), "NDCG@10": best.value}
        summary = self.recorder.write_summary(
            wall_time_s=seconds,
            best_round=best.server_round if best else None,
            best_valid=best_valid,
            test=protocols,
            num_users=test.get(NUM_EXAMPLES),
            mean_client_train_seconds_per_round=round(float(np.mean(client)), 3) if client else None,
            privacy=self._privacy(),
        )
        sampled, full = protocols["sampled"], protocols["full"]
        _say(
            f"[feddmmr] done in {seconds / 60:.1f} min: test NDCG@10 {sampled.get('NDCG@10', float('nan')):.4f} "
            f"HR@10 {sampled.get('HR@10', float('nan')):.4f} (sampled), NDCG@10 {full.get('NDCG@10', float('nan')):.4f} "
            f"(full). Outputs in {self.out}"
        )
        return summary
