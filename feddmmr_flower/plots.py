"""Learning curves from a run's ``history.json`` (one figure a person can read at a glance)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLOURS = {"pretrain": "#f2f2f2", "align": "#fff2cc", "finetune": "#e2f0d9"}


def _shade_stages(ax, history: Sequence[dict]) -> None:
    start = None
    for i, rec in enumerate(history):
        stage = rec.get("stage")
        if start is None or stage != history[start].get("stage"):
            if start is not None:
                ax.axvspan(history[start]["round"] - 0.5, history[i - 1]["round"] + 0.5,
                           color=STAGE_COLOURS.get(history[start]["stage"], "#eeeeee"), zorder=0)
            start = i
    if start is not None:
        ax.axvspan(history[start]["round"] - 0.5, history[-1]["round"] + 0.5,
                   color=STAGE_COLOURS.get(history[start]["stage"], "#eeeeee"), zorder=0)


def plot_curves(runs: dict[str, Sequence[dict]], path: Path, x: str = "round") -> Path:
    """2×2 panels: validation NDCG@10/HR@10, training loss, memory size, seconds per round.

    ``runs`` maps a label to a history (list of per-round records); several runs share the axes.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_val, ax_loss), (ax_mem, ax_time) = axes
    for label, history in runs.items():
        if not history:
            continue
        if len(runs) == 1:
            for ax in axes.flat:
                _shade_stages(ax, history)
        evaluated = [r for r in history if r.get("valid")]
        if evaluated:
            xs = [r[x] for r in evaluated]
            ax_val.plot(xs, [r["valid"].get("NDCG@10", float("nan")) for r in evaluated], marker=".", label=f"{label} NDCG@10")
            ax_val.plot(xs, [r["valid"].get("HR@10", float("nan")) for r in evaluated], linestyle="--", label=f"{label} HR@10")
        xs = [r[x] for r in history]
        ax_loss.plot(xs, [r.get("train", {}).get("rec", float("nan")) for r in history], label=label)
        ax_mem.plot(xs, [r.get("train", {}).get("memory-size", float("nan")) for r in history], label=label)
        ax_time.plot(xs, [r.get("seconds", float("nan")) for r in history], label=label)
    titles = ("validation (sampled protocol)", "training loss (recommendation part)",
              "memory entries per client (mean of sampled)", "seconds per round")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("FedDMMR run" + ("s" if len(runs) > 1 else "") + " — stages shaded: pretrain grey, align yellow, finetune green"
                 if len(runs) == 1 else "FedDMMR runs", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
