"""Render the README's results section from ``benchmarks/results/*.json`` (never typed by hand).

python -m benchmarks.render_readme            # rewrites the block between the markers in README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = Path("benchmarks/results")
#: What the floor of round_time results written before it recorded ``floor_method`` was.
LEGACY_FLOOR = (
    "the in-process loop of that time, which ran the same client computations (`ClientRuntime.train`) and a "
    "re-implemented FedAvg/FedAdam aggregation in one process without Flower"
)


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(stat: dict | None, digits: int = 4) -> str:
    """mean ± std over seeds (std omitted for a single seed)."""
    if not stat:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat.get("n", 1) > 1 else "")


QUALITY_METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")


def quality_section() -> list[str]:
    data = _load("quality_ml100k.json")
    if data is None:
        return []
    rows = data["rows"]
    seeds = ", ".join(map(str, data["seeds"]))
    lines = [
        f"**Quality** (`quality_ml100k.json`, `python -m benchmarks.quality`; seeds {seeds}, mean ± sample std "
        "over the seeds that finished — column n). Test split of all 943 users with the model each run selected "
        "on the validation split. Federated rows: 943 clients, 10% sampled per round, the default 150-round "
        "schedule, run by the real ServerApp loop, strategy and ClientApp in one process "
        "(`benchmarks/harness/`, no Ray). Each run used one CPU thread, two runs at a time; *wall min* "
        "also counts pauses while the speed benchmarks ran, *CPU min* is the run's own compute.",
        "",
    ]
    for protocol, what in (
        ("sampled", "sampled protocol (the held-out item among 100 sampled negatives)"),
        ("full", "full ranking (every item the user has not interacted with)"),
    ):
        lines += [
            f"Test, {what}:",
            "",
            "| row | n | " + " | ".join(QUALITY_METRICS) + " | selected at | wall min | CPU min |",
            "|---|---|" + "---|" * len(QUALITY_METRICS) + "---|---|---|",
        ]
        for row in rows.values():
            best = f"{row['best_unit']} {_ms(row['best'], 0)}"
            lines.append(
                f"| {row['label']} | {row['best']['n']} | "
                + " | ".join(_ms(row[protocol][m]) for m in QUALITY_METRICS)
                + f" | {best} | {row['wall_time_s']['mean'] / 60:.1f} | {row['cpu_time_s']['mean'] / 60:.1f} |"
            )
        lines.append("")
    if data.get("targets"):
        chosen = rows.get(data.get("selected_full_row") or "", {}).get("label", "")
        lines += [
            f"Targets, for both FedDMMR full rows (✓ = *{chosen}*, the one with the higher mean validation "
            "NDCG@10; the FedAvg row shares FedAvg-SASRec's aggregation, so it isolates the model):",
            "",
            "| target | row | measured | bar | |",
            "|---|---|---|---|---|",
        ]
        for t in data["targets"]:
            label = rows.get(t.get("row", ""), {}).get("label", t.get("row", "")) + (" ✓" if t.get("selected") else "")
            lines.append(
                f"| {t['target']} | {label} | {t['value']:.4f} | {t['bar']:.4f} | "
                f"{'met' if t['met'] else '**missed**'} |"
            )
        lines.append("")
    buckets = [
        r
        for k, r in rows.items()
        if k
        in (
            "central-sasrec",
            "central-full",
            "fedavg-sasrec",
            "fedadam-sasrec",
            "feddmmr-full-fedavg",
            "feddmmr-full-fedadam",
            "local-only",
        )
    ]
    if buckets:
        names = list(buckets[0]["by_history_length"])
        counts = ", ".join(f"{n}: {buckets[0]['by_history_length'][n]['num_users']} users" for n in names)
        lines += [
            f"Test NDCG@10 by training-history length ({counts}), sampled / full ranking:",
            "",
            "| row | " + " | ".join(f"{n} items" for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for row in buckets:
            cells = [
                f"{_ms(row['by_history_length'][n]['sampled']['NDCG@10'], 3)} / "
                f"{_ms(row['by_history_length'][n]['full']['NDCG@10'], 3)}"
                for n in names
            ]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    if (RESULTS / "quality_curves.png").is_file():
        lines += [
            "Validation NDCG@10 per round of the federated rows (mean ± std over seeds):",
            "",
            "![learning curves](benchmarks/results/quality_curves.png)",
            "",
        ]
    longer = _load("federated_full_450rounds.json")
    if longer:
        test = longer["test"]
        lines += [
            f"A longer schedule through a real `flwr run` (Ray, 1 seed, `federated_full_450rounds.json`, "
            f"`{longer['config']['experiment']['stage-schedule']}`): FedDMMR full, FedAdam, test NDCG@10 "
            f"{test['sampled']['NDCG@10']:.4f} sampled / {test['full']['NDCG@10']:.4f} full, selected at round "
            f"{longer['best_round']} of {longer['rounds']}, {longer['wall_time_s'] / 60:.0f} min.",
            "",
        ]
    return lines


def round_time_section() -> list[str]:
    data = _load("round_time_ml100k.json")
    if data is None:
        return []
    lines = [
        f"**Round time vs clients per round** (`round_time_ml100k.json`, `python -m benchmarks.round_time`): a "
        f"real `flwr run` (Ray simulation, {data['users']} ML-100K users, FedDMMR full, one CPU per ClientApp so "
        f"{data['cores']} at a time) against the floor, {data.get('floor_method', LEGACY_FLOOR)} (and that floor "
        "spread ideally over the cores: floor / cores). Steady rounds (not the first, no validation). *client* = summed client training "
        "seconds / cores; *no-op Flower* = Flower's no-op app moving one model-sized array to the same number "
        "of clients and back.",
        "",
        "| clients | stage | s / round | client | rest | no-op Flower | floor | × floor | floor / cores | × |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        for stage, v in row["simulation"].items():
            lines.append(
                f"| {row['clients_per_round']} | {stage} | {v['round_s']:.2f} | {v['client_compute_s']:.2f} | "
                f"{v['rest_s']:.2f} | {_fmt(row.get('noop_simulation_round_s'), 2)} | "
                f"{_fmt(v.get('floor_s'), 2)} | {v.get('ratio_to_floor', '–')} | "
                f"{_fmt(v.get('floor_on_all_cores_s'), 2)} | {v.get('ratio_to_floor_on_all_cores', '–')} |"
            )
    lines.append("")
    for t in data.get("targets", []):
        lines.append(f"- {t['target']}: {t['value']} (bar {t['bar']}) — {'met' if t['met'] else '**missed**'}")
    return lines + [""]


def scaling_section() -> list[str]:
    data = _load("scaling_synthetic.json")
    if data is None:
        return []
    kinds = sorted({k for r in data["rows"] for k in r["memory_by_kind"]})
    lines = [
        f"**Scaling with SYNTHETIC users** (`scaling_synthetic.json`, `python -m benchmarks.scaling`): users drawn "
        "to match ML-100K's sequence lengths and item popularity (`benchmarks/synthetic_users.py`; no real "
        f"preferences, so time and memory only), {data['per_round']} sampled per round, a real `flwr run`, "
        "FedDMMR full with text features. Peak resident memory is per process (the largest of its kind).",
        "",
        "| users | first round (s) | "
        + " | ".join(f"{s} s / round" for s in ("pretrain", "finetune"))
        + " | "
        + " | ".join(f"{k} (MB)" for k in kinds)
        + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['users']:,} | {r['first_round_s']:.1f} | "
            + " | ".join(_fmt(r["stages"].get(s, {}).get("round_s"), 2) for s in ("pretrain", "finetune"))
            + " | "
            + " | ".join(_fmt(r["memory_by_kind"].get(k, {}).get("max_peak_rss_mb"), 0) for k in kinds)
            + " |"
        )
    if data.get("flatness"):
        f = data["flatness"]
        lines += [
            "",
            "Largest ÷ smallest size: round time "
            + ", ".join(f"{k} ×{v}" for k, v in f["round_s_ratio"].items())
            + "; peak memory "
            + ", ".join(f"{k} ×{v}" for k, v in f["peak_rss_ratio"].items())
            + ".",
        ]
    profiled = [r for r in data["rows"] if r.get("driver_profile", {}).get("top_inclusive")]
    if profiled:
        r = profiled[-1]
        frames = [
            f for f in r["driver_profile"]["top_inclusive"] if "flwr/" in f["frame"] or "server_app/" in f["frame"]
        ]
        lines += [
            "",
            f"Where the simulation driver's time goes at {r['users']:,} users (py-spy, "
            f"{r['driver_profile']['samples']} samples during that size's steady rounds, share including "
            "callees; sampling competes for the two cores, so that row's round times are inflated by it):",
            "",
        ]
        lines += [f"- {f['share']:.0%} `{f['frame']}`" for f in frames[:6]]
    if (RESULTS / "scaling_synthetic.png").is_file():
        lines += ["", "![scaling](benchmarks/results/scaling_synthetic.png)"]
    return lines + [""]


def eval_section() -> list[str]:
    data = _load("eval_speed_ml100k.json")
    if data is None:
        return []
    c = data["central"]
    return [
        f"**Evaluating every user** (`eval_speed_ml100k.json`, FedDMMR full, {data['users']} users, "
        f"{data['threads']} threads): sampled protocol {c['sampled_all_users_s']:.2f} s + "
        f"{c['build_memories_s']:.2f} s to build every user's memory = {c['sampled_with_memories_s']:.2f} s "
        f"(target ≤ 10 s: {'met' if data['target']['met'] else '**missed**'}); both protocols "
        f"{c['both_protocols_all_users_s']:.2f} s; as {data['users']} federated clients one after another "
        f"(each its own memory, both protocols) {data['federated_clients_one_after_another_s']:.1f} s "
        f"({data['federated_per_client_ms']:.1f} ms each).",
        "",
    ]


def throughput_section() -> list[str]:
    data = _load("throughput_ml100k.json")
    if data is None:
        return []
    c, p = data["central"], data["per_client"]
    return [
        "**Training throughput**, user sequences per second (`throughput_ml100k.json`, 2 CPU cores):",
        "",
        "| where | SASRec | FedDMMR full | ratio |",
        "|---|---|---|---|",
        f"| central (batch {c['sasrec']['batch_size']}) | {c['sasrec']['sequences_per_s']} | "
        f"{c['full']['sequences_per_s']} | {data['central_ratio_sasrec_over_full']}× |",
        f"| one federated client | {p['sasrec']['sequences_per_s']} | {p['full']['sequences_per_s']} | "
        f"{data['per_client_ratio_sasrec_over_full']}× |",
        "",
    ]


def profile_section() -> list[str]:
    after, before = _load("profile_round.json"), _load("profile_round_before.json")
    if after is None:
        return []
    lines = [
        f"**Profile of one federated round** (`profile_round.json`, `python -m benchmarks.profile_round`: "
        f"cProfile over the server and all {after['clients_per_round']} clients of one ML-100K round in one "
        "process, so times include the profiler's overhead)."
    ]
    for stage, r in after["rounds"].items():
        then = (before or {}).get("rounds", {}).get(stage)
        lines += [
            "",
            f"{stage} round: {r['seconds']:.2f} s"
            + (f" (before: {then['seconds']:.2f} s)" if then else "")
            + ". Top 10 by own time:",
            "",
            "| own s | calls | function |",
            "|---|---|---|",
        ]
        lines += [f"| {x['self_s']:.3f} | {x['calls']} | `{x['function']}` |" for x in r["top_self_time"]]
        ours = ", ".join(
            f"`{x['function'].split('(')[-1].rstrip(')')}` {x['cumulative_s']:.2f} s"
            for x in r["top_our_functions_cumulative"][:8]
        )
        lines += ["", f"Our functions by cumulative time: {ours}."]
    if after.get("actions"):
        lines += ["", "What was done about the hot spots:", ""] + [f"- {a}" for a in after["actions"]]
    return lines + [""]


def render() -> str:
    lines = [START, ""]
    for section in (
        quality_section,
        round_time_section,
        scaling_section,
        eval_section,
        throughput_section,
        profile_section,
    ):
        lines += section()
    lines += [END]
    return "\n".join(lines)


DEPLOY_START, DEPLOY_END = "<!-- deployment:start -->", "<!-- deployment:end -->"


def render_deployment() -> str:
    """The measured cost of a deployed round (benchmarks/deployment_overhead.py), before and after."""
    path = RESULTS / "deployment_overhead.json"
    if not path.is_file():
        return f"{DEPLOY_START}\n{DEPLOY_END}"
    data = json.loads(path.read_text())
    means, imports = data["mean_round_seconds_after_round_1"], data["fresh_process_imports"]
    before_path = RESULTS / "deployment_overhead_before.json"
    before = json.loads(before_path.read_text())["mean_round_seconds_after_round_1"] if before_path.is_file() else {}
    rows = [
        ("no-op ClientApp, empty messages", means.get("noop_deployment_empty", means["noop_deployment"]), None),
        ("no-op ClientApp, ~1 MB echoed as 48 arrays", means.get("noop_deployment_48_arrays"), None),
        ("no-op ClientApp, ~1 MB echoed as 1 array", means.get("noop_deployment_1_array"), None),
        ("FedDMMR (full, text features), deployment", means["feddmmr_deployment"], before.get("feddmmr_deployment")),
        ("FedDMMR, the same run in the Ray simulation", means["feddmmr_simulation"], before.get("feddmmr_simulation")),
    ]
    lines = [
        DEPLOY_START,
        "",
        f"**Measured** (`{path.name}`: {data['nodes']} SuperNodes of ML-100K users, {data['network']}, TLS + "
        f"authentication, {data['rounds']} rounds, mean of the rounds after round 1 that send one train message "
        "per node (no validation); this 2-core machine, so the nodes share two cores, with other benchmarks "
        "running beside them):",
        "",
        "| seconds per round | now | before |",
        "|---|---|---|",
    ]
    for label, now, then in rows:
        if now is not None:
            lines.append(f"| {label} | {now:.2f} | {_fmt(then, 2)} |")
    lines += [
        "",
        f"Our share of a deployed round is {data['ours_per_round_s']:.1f} s over the no-op floor. A SuperNode "
        f"starts a fresh ClientApp process per message: importing Flower takes {imports['flwr_clientapp_s']:.2f} s, "
        f"our ClientApp {imports['feddmmr_clientapp_s']:.2f} s (mostly torch); the "
        f"mean client training call {data['feddmmr_client_train_seconds_mean']:.2f} s. Cut so far: the model "
        "travels packed into one array (Flower 1.41 moves every array as an object of its own), the client's "
        "SGD no longer builds a `torch.optim` optimizer (that imports `torch._dynamo`, about 2 s per process), "
        "and pandas (" + f"{imports['removed_from_client_path']['pandas_s']:.2f} s) and scikit-learn "
        f"({imports['removed_from_client_path']['sklearn_cluster_s']:.2f} s) are off the client's import path. "
        "A simulation keeps its ClientApp processes alive, which is why it is so much faster per round.",
        "",
        DEPLOY_END,
    ]
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} … {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def main() -> int:
    readme = Path("README.md")
    text = _replace(readme.read_text(), START, END, render())
    readme.write_text(_replace(text, DEPLOY_START, DEPLOY_END, render_deployment()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
