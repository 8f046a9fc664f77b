"""``feddmmr report``: a run folder (or several) as a markdown page and PNG plots (issue #8).

Reads only what runs write: ``config.json``, ``history.json``, ``summary.json``, in the one shape
federated and ``train-central`` runs share (``run_record.py``), so ``plots.py`` draws both kinds with
the same code and comparisons put them on the same axes (x = round or epoch).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .atomic import atomic_write_bytes
from .errors import DataFormatError, MissingDataError

PLOTS = (
    ("validation", plots.plot_validation, "Validation metrics per round"),
    ("losses", plots.plot_losses, "Training loss parts"),
    ("memory", plots.plot_memory, "Memory size and writes"),
    ("time", plots.plot_round_time, "Time per round"),
)
CONFIG_KEYS = (
    "dataset",
    "variant",
    "strategy",
    "stage-schedule",
    "fraction-train",
    "local-epochs",
    "client-lr",
    "server-lr",
    "lr",
    "batch-size",
    "hidden",
    "maxlen",
    "negatives",
    "text-features",
    "descriptions",
    "visual-features",
    "clip-pretrained",
    "memory-capacity",
    "num-prototypes",
    "eval-every",
    "eval-users",
    "seed",
)
FEDERATED_ONLY = {"strategy", "fraction-train", "local-epochs", "client-lr", "server-lr", "eval-users"}
CENTRAL_ONLY = {"lr", "batch-size"}
NOT_COMPARED = {"output-dir", "run-name", "cache-dir", "data-dir", "resume-from", "device"}
METRICS = ("HR@10", "NDCG@10", "MRR")


@dataclass
class RunRecord:
    """What a report needs from one run folder."""

    label: str
    folder: Path
    kind: str  # "federated" or "central"
    experiment: dict
    history: list[dict]
    test: dict = field(default_factory=dict)  # {"sampled": {...}, "full": {...}}
    meta: dict = field(default_factory=dict)  # config.json (without the experiment) and summary.json
    files: list[str] = field(default_factory=list)

    @property
    def x(self) -> str:
        return "round" if self.kind == "federated" else "epoch"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not valid JSON ({exc.msg})", exc.lineno) from None


def load_run_record(folder: str | Path, label: str | None = None) -> RunRecord:
    """A run folder (federated or ``train-central``: config.json, history.json, summary.json)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingDataError(f"run folder {folder} not found")
    if not (folder / "history.json").is_file():
        raise MissingDataError(f"{folder} holds no history.json: not a run folder (federated or train-central)")
    label = label or folder.name
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    summary = _json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    history = _json(folder / "history.json")
    files = [name for name in ("config.json", "history.json", "summary.json") if (folder / name).is_file()]
    return RunRecord(
        label,
        folder,
        history.get("kind") or config.get("kind") or "federated",
        config.get("experiment", {}),
        history.get("rounds", []),
        {k: v for k, v in summary.get("test", {}).items() if k != "num_users"},
        {**{k: v for k, v in config.items() if k != "experiment"}, **summary},
        files,
    )


# ------------------------------------------------------------------ numbers
def stage_bests(history: list[dict]) -> list[dict]:
    """Per stage span: its rounds and the record with the best validation NDCG@10 (None if never evaluated)."""
    rows = []
    for stage, start, end in plots.stage_spans(history):
        evaluated = [
            r for r in history if start <= r["round"] <= end and (r.get("valid") or {}).get("NDCG@10") is not None
        ]
        best = max(evaluated, key=lambda r: r["valid"]["NDCG@10"], default=None)
        rows.append({"stage": stage, "first": start, "last": end, "best": best})
    return rows


def memory_stats(run: RunRecord) -> dict:
    """Final and peak memory figures per user (federated: mean over the last round's clients)."""
    with_memory = [r for r in run.history if (r.get("train") or {}).get("memory-size") is not None]
    if not with_memory:
        return {}
    last = with_memory[-1]["train"]
    out = {
        "round": with_memory[-1]["round"],
        "size": last["memory-size"],
        "peak": max(r["train"]["memory-size"] for r in with_memory),
    }
    for name in ("writes", "rewrites", "evictions", "passes"):
        out[name] = last.get(f"memory-{name}")
    out["prototypes"] = last.get("num-prototypes")
    return out


def _num(value, digits: int = 4) -> str:
    """A number for a table cell ("—" when unknown)."""
    if value is None or value == "":
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def _plain(value) -> str:
    """A configuration value as a person would type it."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _selected(run: RunRecord) -> str:
    if run.meta.get("best_round") is None:
        return "—"
    return f"{run.x} {run.meta['best_round']} ({run.meta.get('best_stage') or ''})"


def _config_value(run: RunRecord, key: str):
    if (run.kind == "central" and key in FEDERATED_ONLY) or (run.kind == "federated" and key in CENTRAL_ONLY):
        return "—"
    value = run.experiment.get(key)
    if key == "descriptions" and value:
        return Path(str(value)).name
    return value


def render_markdown(runs: list[RunRecord], images: dict[str, Path]) -> str:
    """The report page; ``images`` maps a plot name to its file (linked relative to the page)."""
    main = runs[0]
    title = main.label if len(runs) == 1 else f"{main.label} compared with {', '.join(r.label for r in runs[1:])}"
    lines = [
        f"# FedDMMR run report: {title}",
        "",
        f"Made by `feddmmr report` on {time.strftime('%Y-%m-%d %H:%M')} from:",
        "",
    ]
    for run in runs:
        lines.append(
            f"- **{run.label}** ({run.kind}): `{run.folder}` — {', '.join(run.files)}"
            + ("" if run.test else " — no test metrics yet (the run has not finished)")
        )
    lines += [
        "",
        "## Test metrics",
        "",
        "The model selected on validation NDCG@10 (sampled protocol), evaluated once on the test split of "
        f"every user: sampled = the held-out item + {main.experiment.get('eval-negatives', 100)} sampled "
        "negatives (`eval-negatives`), full = every item ranked.",
        "",
    ]
    rows = []
    for run in runs:
        sampled, full = run.test.get("sampled", {}), run.test.get("full", {})
        rows.append(
            [
                run.label,
                run.kind,
                _selected(run),
                *[_num(sampled.get(m)) for m in METRICS],
                *[_num(full.get(m)) for m in METRICS],
            ]
        )
    lines += _table(["run", "kind", "selected", *METRICS, *[f"full {m}" for m in METRICS]], rows)

    lines += ["## Configuration", ""]
    header = ["setting", *[r.label for r in runs]]
    rows = [
        ["kind", *[r.kind for r in runs]],
        ["rounds / epochs run", *[f"{len(r.history)} {r.x}s" for r in runs]],
        [
            "users",
            *[_plain(r.meta.get("nodes") or r.meta.get("data", {}).get("num_users")) for r in runs],
        ],
    ]
    keys = list(CONFIG_KEYS)
    if len(runs) > 1:  # and whatever else differs between the runs
        others = sorted({k for r in runs for k in r.experiment} - set(CONFIG_KEYS) - NOT_COMPARED)
        keys += [k for k in others if len({json.dumps(r.experiment.get(k)) for r in runs}) > 1]
    for key in keys:
        values = [_plain(_config_value(r, key)) for r in runs]
        if any(v != "—" for v in values):
            rows.append([f"`{key}`", *values])
    lines += _table(header, rows)

    lines += [
        "## Best validation per stage",
        "",
        "Validation runs on a fixed sample of users every `eval-every` rounds (central: all users).",
        "",
    ]
    rows = []
    for run in runs:
        for span in stage_bests(run.history):
            best = span["best"]
            valid = best["valid"] if best else {}
            rows.append(
                [
                    run.label,
                    span["stage"],
                    f"{span['first']}–{span['last']}",
                    f"{run.x} {best['round']}" if best else "not evaluated",
                    *[_num(valid.get(m)) for m in ("NDCG@10", "HR@10", "full-NDCG@10", "full-HR@10")],
                ]
            )
    lines += _table(["run", "stage", f"{main.x}s", "best at", "NDCG@10", "HR@10", "full NDCG@10", "full HR@10"], rows)

    lines += [
        "## Memory",
        "",
        "LocalDynamicMemory per user at the end of training (federated: mean over the last round's "
        "clients; central: mean over all users). Writes, re-writes, evictions and passes are cumulative.",
        "",
    ]
    rows = []
    for run in runs:
        stats = memory_stats(run)
        if stats:
            rows.append(
                [
                    run.label,
                    f"{run.x} {stats['round']}",
                    *[_num(stats[k], 1) for k in ("size", "peak", "writes", "rewrites", "evictions", "passes")],
                    _num(stats["prototypes"], 0),
                ]
            )
        else:
            rows.append([run.label, "no memory (variant sasrec)", *["—"] * 7])
    lines += _table(
        [
            "run",
            "last record",
            "entries",
            "peak entries",
            "writes",
            "re-writes",
            "evictions",
            "passes",
            "global prototypes",
        ],
        rows,
    )

    lines += ["## Time", ""]
    rows = []
    for run in runs:
        seconds = [r.get("seconds") or 0.0 for r in run.history]
        client = [(r.get("train") or {}).get("total-client-train-seconds") for r in run.history]
        client = [c for c in client if c is not None]
        wall = run.meta.get("wall_time_s")
        rows.append(
            [
                run.label,
                str(len(run.history)),
                _num(None if wall is None else wall / 60, 1),
                _num(sum(seconds) / len(seconds) if seconds else None, 2),
                _num(sum(client) / len(client) if client else None, 2),
            ]
        )
    lines += _table(["run", "rounds / epochs", "minutes", "s per round / epoch", "client training s per round"], rows)

    lines += ["## Plots", ""]
    for name, _, caption in PLOTS:
        if name in images:
            lines += [f"### {caption}", "", f"![{caption}]({images[name].name})", ""]
    return "\n".join(lines)


def write_report(run: str | Path, compare: list[str | Path] = (), out: str | Path | None = None) -> dict:
    """Write ``report.md`` and the PNGs into ``out`` (default ``<run>/report``); returns their paths."""
    runs = [load_run_record(run), *[load_run_record(other) for other in compare]]
    labels = [r.label for r in runs]
    for r in runs:  # two folders with the same name: tell them apart by their parent
        if labels.count(r.label) > 1:
            r.label = f"{r.folder.parent.name}/{r.folder.name}"
    out = Path(out).expanduser() if out else runs[0].folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    histories = {r.label: r.history for r in runs}
    kinds = {r.x for r in runs}
    x = kinds.pop() if len(kinds) == 1 else "round / epoch"
    images = {name: draw(histories, out / f"{name}.png", x=x) for name, draw, _ in PLOTS}
    page = out / "report.md"
    atomic_write_bytes(page, render_markdown(runs, images).encode())
    return {"report": str(page), "plots": [str(p) for p in images.values()], "runs": [str(r.folder) for r in runs]}
