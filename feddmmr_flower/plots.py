"""Plots of run histories: one module for the run's own ``curves.png`` and ``feddmmr report``.

A history is a list of per-round records as ``server_app/federation.py`` writes them
(``round``, ``stage``, ``seconds``, ``train`` {loss parts, memory statistics}, ``valid`` {metrics});
``report.py`` converts ``train-central`` epochs to the same shape. Every function takes
``runs`` = {label: history}; several runs share the axes, one colour each. Stages are shaded when
every run has the same stage layout, otherwise each run's stage boundaries are dotted lines in
its colour, so stage changes stay visible when comparing runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .atomic import atomic_path  # noqa: E402

STAGE_COLOURS = {"pretrain": "#ececec", "align": "#fff2cc", "finetune": "#e2f0d9"}
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
Runs = dict[str, Sequence[dict]]
Getter = Callable[[dict], "float | None"]

LOSS_PARTS = (
    ("loss", "total training loss"),
    ("rec", "recommendation loss (sampled softmax)"),
    ("align", "alignment InfoNCE\n(align stage: features↔ID; finetune: visual↔semantic)"),
    ("balance", "router load balance (1 = even)"),
    ("w_visual", "router: mean weight of the visual expert"),
)


def _x(record: dict, x: str) -> float:
    return record.get(x, record.get("round", record.get("epoch")))


def _train(key: str) -> Getter:
    return lambda r: (r.get("train") or {}).get(key)


def _valid(key: str) -> Getter:
    return lambda r: (r.get("valid") or {}).get(key)


def _colour(i: int) -> str:
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def stage_spans(history: Sequence[dict], x: str = "round") -> list[tuple[str, float, float]]:
    """(stage, first x, last x) for each consecutive run of rounds in one stage."""
    spans: list[tuple[str, float, float]] = []
    for rec in history:
        stage, pos = rec.get("stage", "?"), _x(rec, x)
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], pos)
        else:
            spans.append((stage, pos, pos))
    return spans


def _mark_stages(axes, runs: Runs, x: str) -> list:
    """Shade stages (shared layout) or draw each run's stage boundaries; returns legend handles."""
    layouts = [stage_spans(h, x) for h in runs.values() if h]
    if not layouts:
        return []
    if all(layout == layouts[0] for layout in layouts):
        for ax in axes:
            for stage, start, end in layouts[0]:
                ax.axvspan(start - 0.5, end + 0.5, color=STAGE_COLOURS.get(stage, "#eeeeee"), zorder=0, lw=0)
        stages = dict.fromkeys(stage for stage, _, _ in layouts[0])
        return [Patch(color=STAGE_COLOURS.get(s, "#eeeeee"), label=f"{s} stage") for s in stages]
    owners: dict[tuple[float, str], list[int]] = {}  # (boundary, next stage) -> runs that have it
    for i, layout in enumerate(layouts):
        for stage, start, _ in layout[1:]:
            owners.setdefault((start - 0.5, stage), []).append(i)
    xs = [_x(r, x) for h in runs.values() for r in h]
    close = 0.04 * (max(xs) - min(xs) or 1)
    previous, low = None, False
    for (pos, stage), who in sorted(owners.items()):
        colour = _colour(who[0]) if len(who) == 1 else "#444444"
        low = previous is not None and pos - previous < close and not low  # alternate heights when crowded
        previous = pos
        for ax in axes:
            ax.axvline(pos, color=colour, linestyle=":", linewidth=1.2, zorder=1)
            ax.text(
                pos,
                0.5 if low else 0.99,
                f" {stage}",
                color=colour,
                fontsize=7,
                rotation=90,
                va="top",
                ha="left",
                transform=ax.get_xaxis_transform(),
            )
    return [Line2D([], [], color="#444444", linestyle=":", label="stage starts (run colour; grey: several runs)")]


def _style_legend(ax, styles: list[tuple[str, str]]) -> None:
    """A legend of line styles only (the run colours are named in the first panel)."""
    ax.legend(
        handles=[Line2D([], [], color="black", linestyle=s, label=label) for s, label in styles], fontsize=8, loc="best"
    )


def _lines(
    ax, runs: Runs, value: Getter, x: str, *, style: str = "-", marker: str | None = None, gaps: bool = True
) -> bool:
    """One line per run; True when something was drawn.

    ``gaps``: break the line where a record lacks the value (a loss part absent in a stage), else
    join the records that have it (validation every few rounds). Short series get markers, so a
    value recorded once is still visible.
    """
    drawn = False
    for i, (label, history) in enumerate(runs.items()):
        points = [(_x(r, x), value(r)) for r in history if value(r) is not None or gaps]
        if not any(y is not None for _, y in points):
            continue
        xs = [p[0] for p in points]
        ys = [float("nan") if p[1] is None else p[1] for p in points]
        known = sum(y == y for y in ys)
        ax.plot(
            xs,
            ys,
            linestyle=style,
            marker=marker or ("o" if known < 20 else None),
            markersize=3,
            color=_colour(i),
            label=label,
            linewidth=1.4,
        )
        drawn = True
    return drawn


def _figure(panels: int, cols: int, height: float = 3.4):
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, height * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.remove()
    return fig, axes[:panels]


def _finish(fig, axes, runs: Runs, x: str, title: str, path: Path, stage_handles: list[Patch]) -> Path:
    xlabel = {"round": "round", "epoch": "epoch (central)"}.get(x, x)
    xs = [_x(r, x) for h in runs.values() for r in h]
    for ax in axes:
        if xs:  # every panel spans every round, also those where its value is not recorded
            ax.set_xlim(min(xs) - 0.5 - 0.02 * (max(xs) - min(xs)), max(xs) + 0.5 + 0.02 * (max(xs) - min(xs)))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "not recorded in this run", transform=ax.transAxes, ha="center", color="grey")
    handles, labels = axes[0].get_legend_handles_labels()
    named: dict = {}
    for handle, label in zip(handles, labels):  # one entry per run (its first, solid line)
        named.setdefault(label, handle)
    if len(runs) > 1 and named:  # run names once; the other panels use the same colours
        styles = axes[0].get_legend()
        if styles is not None:
            axes[0].add_artist(styles)
        axes[0].legend(named.values(), named.keys(), fontsize=8, loc="lower right" if styles else "best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if stage_handles else 0.97))
    if stage_handles:
        fig.legend(handles=stage_handles, loc="upper right", ncol=len(stage_handles), fontsize=8, frameon=False)
    return _save(fig, path, title, "runs: " + "; ".join(runs))


def _save(fig, path: Path, title: str, description: str = "") -> Path:
    """Write the figure atomically; PNG text chunks say what is drawn (image viewers and tests read them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Title": title, "Description": description})
    plt.close(fig)
    return path


def _title(what: str, runs: Runs) -> str:
    names = list(runs)
    return f"{what} — {names[0]}" if len(names) == 1 else f"{what} — {len(names)} runs compared"


# ------------------------------------------------------------------ figures
def plot_validation(runs: Runs, path: Path, x: str = "round") -> Path:
    """Validation NDCG@10 and HR@10 (sampled protocol; full ranking too when recorded)."""
    full = any(_valid("full-NDCG@10")(r) is not None for h in runs.values() for r in h)
    metrics = [("NDCG@10", "validation NDCG@10 (sampled protocol)"), ("HR@10", "validation HR@10 (sampled protocol)")]
    if full:
        metrics += [
            ("full-NDCG@10", "validation NDCG@10 (full ranking)"),
            ("full-HR@10", "validation HR@10 (full ranking)"),
        ]
    fig, axes = _figure(len(metrics), 2)
    stage_handles = _mark_stages(axes, runs, x)
    for ax, (key, title) in zip(axes, metrics):
        _lines(ax, runs, _valid(key), x, marker="o", gaps=False)
        ax.set_title(title, fontsize=10)
    return _finish(fig, axes, runs, x, _title("Validation", runs), path, stage_handles)


def plot_losses(runs: Runs, path: Path, x: str = "round") -> Path:
    """Training loss parts (mean over the round's clients, or over the epoch's batches)."""
    parts = [
        (key, title) for key, title in LOSS_PARTS if any(_train(key)(r) is not None for h in runs.values() for r in h)
    ]
    parts = parts or list(LOSS_PARTS[:2])
    fig, axes = _figure(len(parts), min(3, len(parts)))
    stage_handles = _mark_stages(axes, runs, x)
    for ax, (key, title) in zip(axes, parts):
        _lines(ax, runs, _train(key), x)
        ax.set_title(title, fontsize=10)
    return _finish(fig, axes, runs, x, _title("Training loss parts", runs), path, stage_handles)


def plot_memory(runs: Runs, path: Path, x: str = "round") -> Path:
    """LocalDynamicMemory: entries per user, cumulative writes (and re-writes), evictions."""
    fig, axes = _figure(3, 3)
    stage_handles = _mark_stages(axes, runs, x)
    _lines(axes[0], runs, _train("memory-size"), x)
    axes[0].set_title("memory entries per user", fontsize=10)
    if _lines(axes[1], runs, _train("memory-writes"), x):
        _lines(axes[1], runs, _train("memory-rewrites"), x, style="--")
        _style_legend(axes[1], [("-", "writes"), ("--", "re-writes of an item already in memory")])
    axes[1].set_title("cumulative writes per user", fontsize=10)
    _lines(axes[2], runs, _train("memory-evictions"), x)
    axes[2].set_title("cumulative evictions per user", fontsize=10)
    return _finish(
        fig, axes, runs, x, _title("Memory (federated: mean over the round's clients)", runs), path, stage_handles
    )


def plot_round_time(runs: Runs, path: Path, x: str = "round") -> Path:
    """Seconds per round (and the clients' summed training seconds), and cumulative minutes."""
    fig, axes = _figure(2, 2)
    stage_handles = _mark_stages(axes, runs, x)
    _lines(axes[0], runs, lambda r: r.get("seconds"), x)
    if _lines(axes[0], runs, _train("total-client-train-seconds"), x, style="--"):
        _style_legend(axes[0], [("-", "whole round"), ("--", "clients' training, summed")])
    axes[0].set_title("seconds per round / epoch (spikes: validation rounds)", fontsize=10)
    for i, (label, history) in enumerate(runs.items()):
        xs, total, cumulative = [], 0.0, []
        for rec in history:
            total += rec.get("seconds") or 0.0
            xs.append(_x(rec, x))
            cumulative.append(total / 60)
        if xs:
            axes[1].plot(xs, cumulative, color=_colour(i), label=label, linewidth=1.4)
    axes[1].set_title("cumulative minutes (rounds only, no start-up)", fontsize=10)
    return _finish(fig, axes, runs, x, _title("Time", runs), path, stage_handles)


def plot_curves(runs: Runs, path: Path, x: str = "round") -> Path:
    """The run's at-a-glance ``curves.png``: validation, recommendation loss, memory size, seconds per round."""
    fig, axes = _figure(4, 2, height=3.6)
    stage_handles = _mark_stages(axes, runs, x)
    _lines(axes[0], runs, _valid("NDCG@10"), x, marker="o", gaps=False)
    if _lines(axes[0], runs, _valid("HR@10"), x, style="--", marker=".", gaps=False):
        _style_legend(axes[0], [("-", "NDCG@10"), ("--", "HR@10")])
    _lines(axes[1], runs, _train("rec"), x)
    _lines(axes[2], runs, _train("memory-size"), x)
    _lines(axes[3], runs, lambda r: r.get("seconds"), x)
    titles = (
        "validation (sampled protocol)",
        "training loss (recommendation part)",
        "memory entries per client (mean of sampled)",
        "seconds per round",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
    return _finish(fig, axes, runs, x, _title("FedDMMR run", runs), path, stage_handles)


def plot_mean_curves(
    curves: dict[str, Sequence[tuple[float, float, float]]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    xlabel: str = "round",
) -> Path:
    """One line per label: the mean over seeds at each x with a ±1 std band (benchmarks)."""
    fig, (ax,) = _figure(1, 1, height=4.2)
    fig.set_size_inches(8.0, 4.6)
    for i, (label, points) in enumerate(curves.items()):
        xs = [p[0] for p in points]
        mean = [p[1] for p in points]
        ax.plot(xs, mean, color=_colour(i), label=label, linewidth=1.5)
        ax.fill_between(
            xs,
            [m - p[2] for m, p in zip(mean, points)],
            [m + p[2] for m, p in zip(mean, points)],
            color=_colour(i),
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path, title, "runs: " + "; ".join(curves))


def plot_scaling(rows: Sequence[dict], path: Path) -> Path:
    """Round time per stage and peak memory per kind of process vs the number of (synthetic) users."""
    fig, (left, right) = _figure(2, 2, height=4.0)
    users = [r["users"] for r in rows]
    stages = sorted({s for r in rows for s in r["stages"]})
    for i, stage in enumerate(stages):
        ys = [r["stages"].get(stage, {}).get("round_s", float("nan")) for r in rows]
        left.plot(users, ys, marker="o", color=_colour(i), label=f"{stage} round")
    left.plot(
        users,
        [r["first_round_s"] for r in rows],
        marker="s",
        linestyle="--",
        color="grey",
        label="first round (start-up)",
    )
    left.set_ylabel("seconds")
    kinds = sorted(
        {k for r in rows for k in r["memory_by_kind"]},
        key=lambda k: -max(r["memory_by_kind"].get(k, {}).get("max_peak_rss_mb", 0) for r in rows),
    )
    for i, kind in enumerate(kinds[:6]):
        ys = [r["memory_by_kind"].get(kind, {}).get("max_peak_rss_mb", float("nan")) for r in rows]
        right.plot(users, ys, marker="o", color=_colour(i), label=kind)
    right.set_ylabel("peak RSS per process (MB)")
    for ax, title in ((left, "time per round"), (right, "peak memory of each kind of process")):
        ax.set_xscale("log")
        ax.set_xlabel("users in the federation (synthetic)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = "Scaling with SYNTHETIC users (a fixed number sampled per round)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path, title, "users: " + ", ".join(str(u) for u in users))
