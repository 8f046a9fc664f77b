"""What the nginx proxy in front of the SuperLink (issue #19) costs per request and per round.

A deployment as tests/deployment_lab.py builds it (SuperLink + N SuperNodes as separate processes,
network namespaces when run as root, else loopback; TLS and SuperNode authentication on), once
with the SuperLink's single public port (``direct``) and once behind nginx (``proxy``,
deploy/proxy.py's configuration), in the order direct, proxy, proxy, direct, so that drift on a
shared machine hits both alike. On each, R rounds of the no-op app (benchmarks/noop_app: Flower's
own floor) with no payload and with ~1 MB echoed as 48 arrays (the most requests per round: Flower
moves each array as an object of its own). Round times on a few cores are dominated by Flower's
3 s polling and by the machine's load, so the proxy's cost is also measured directly:

* per request, on the SuperLink host, direct vs proxied, interleaved request by request
  (benchmarks/proxy_latency.py: health, a signed SuperNode poll, a 1 MiB upload);
* per round, from nginx's access log of the proxied runs: Fleet requests and bytes per round;
  their product with the per-request and per-byte cost is the proxy's cost per round.

    python -m benchmarks.proxy_overhead --out benchmarks/results/proxy_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import parse_deployment_size
from benchmarks.deployment_overhead import steady
from deploy.proxy import ACCESS_LOG_LINE
from feddmmr_flower.atomic import atomic_write_json
from feddmmr_flower.provenance import command_line, machine_description
from tests.deployment_lab import Deployment
from tests.flwr_utils import BIN, run_config_arg
from tests.netlab import NetLab, namespaces_available

REPO = Path(__file__).resolve().parents[1]

PAYLOADS = {"empty": (0, 0), "48_arrays": (48, 5000)}  # arrays x float32 each, echoed both ways


def say(text: str) -> None:
    print(f"[proxy-overhead] {text}", file=sys.stderr, flush=True)


def fleet_traffic(lines: list[str], port: int, rounds: int) -> dict:
    """Fleet requests, MB and nginx's own milliseconds (request time - upstream time) per round."""
    requests, mb, added = 0, 0.0, []
    for line in lines:
        entry = ACCESS_LOG_LINE.match(line)
        if entry and int(entry["port"]) == port and entry["path"].startswith("/v1/fleet/") and entry["upstream"] != "-":
            requests += 1
            mb += (int(entry["bytes_in"]) + int(entry["bytes_out"])) / 2**20
            added.append(float(entry["seconds"]) - float(entry["upstream"]))
    return {
        "fleet_requests_per_round": round(requests / rounds, 1),
        "fleet_mb_per_round": round(mb / rounds, 3),
        "nginx_logged_ms_per_request_max": round(max(added) * 1000, 1) if added else None,
    }


def one_layout(root: Path, nodes: int, rounds: int, proxied: bool) -> dict:
    """Start a deployment, run the no-op app per payload (and the latency probe when proxied), stop it."""
    lab = NetLab(use_namespaces=namespaces_available())
    deployment = Deployment(root, lab, nodes, proxy=proxied)
    out: dict = {"round_seconds": {}, "traffic": {}}
    access_log = root / "proxy" / "access.log"
    try:
        deployment.start_all()
        app = root / "noop"
        shutil.copytree(REPO / "benchmarks" / "noop_app", app, ignore=shutil.ignore_patterns("__pycache__"))
        for label, (arrays, floats) in PAYLOADS.items():
            seen = len(access_log.read_text().splitlines()) if proxied else 0
            output = root / f"noop-{label}.json"
            config = {"rounds": rounds, "min-nodes": nodes, "output": str(output)}
            config |= {"payload-arrays": arrays, "payload-floats": floats}
            argv = [str(BIN / "flwr"), "run", ".", "deployment", "--stream", "--run-config", run_config_arg(config)]
            done = deployment.cli_run(argv, cwd=app, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
            out["round_seconds"][label] = [round(s, 3) for s in json.loads(output.read_text())["round_seconds"]]
            say(f"{'proxy' if proxied else 'direct'} {label}: {steady(out['round_seconds'][label])} s/round")
            if proxied:
                lines = access_log.read_text().splitlines()[seen:]
                out["traffic"][label] = fleet_traffic(lines, deployment.node_port, rounds)
        if proxied:  # on the SuperLink's host: the SuperLink itself and the proxy's public address
            argv = [sys.executable, "-m", "benchmarks.proxy_latency", f"127.0.0.1:{deployment.port}"]
            argv += [deployment.public_address, str(deployment.certs.ca / "ca.crt")]
            argv += [str(deployment.certs.nodes[0] / "node.key"), str(deployment.node_ids[0])]
            done = subprocess.run(deployment.link.command(argv), cwd=REPO, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            out["latency"] = json.loads(done.stdout)
        out["network"] = "network namespaces + veth + bridge" if lab.use_namespaces else "loopback"
    finally:
        deployment.close()
        lab.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_deployment_size(parser, 4, str(REPO / "benchmarks" / "results" / "proxy_overhead.json"))
    root = Path(tempfile.mkdtemp(prefix="feddmmr-proxy-bench-"))
    order = ("direct", "proxy", "proxy", "direct")
    runs: dict[str, list[dict]] = {"direct": [], "proxy": []}
    try:
        for i, layout in enumerate(order):
            say(f"{layout} (pass {i + 1}/{len(order)})")
            runs[layout].append(one_layout(root / f"{i}-{layout}", args.nodes, args.rounds, layout == "proxy"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def mean_steady(layout: str, label: str) -> float:
        return round(statistics.mean(steady(r["round_seconds"][label]) for r in runs[layout]), 2)

    latency = [r["latency"] for r in runs["proxy"]]
    per_request_ms = statistics.mean(run["pull_messages"]["proxy_minus_direct_median_ms"] for run in latency)
    upload_ms = statistics.mean(run["upload_1mb"]["proxy_minus_direct_median_ms"] for run in latency)
    per_mb_ms = max(upload_ms - per_request_ms, 0.0)  # what a MiB adds over a small request
    per_round = {}
    for label in PAYLOADS:
        traffic = [r["traffic"][label] for r in runs["proxy"]]
        requests = statistics.mean(t["fleet_requests_per_round"] for t in traffic)
        mb = statistics.mean(t["fleet_mb_per_round"] for t in traffic)
        per_round[label] = {
            "round_s_direct": mean_steady("direct", label),
            "round_s_proxy": mean_steady("proxy", label),
            "fleet_requests_per_round": round(requests, 1),
            "fleet_mb_per_round": round(mb, 3),
            "proxy_cost_ms_per_round": round(requests * per_request_ms + mb * per_mb_ms, 1),
        }
    result = {
        "command": command_line(),
        "machine": machine_description(),
        "network": runs["proxy"][0]["network"],
        "nodes": args.nodes,
        "rounds": args.rounds,
        "order": list(order),
        "payloads": {k: {"arrays": a, "floats_per_array": f} for k, (a, f) in PAYLOADS.items()},
        "round_seconds": {layout: [r["round_seconds"] for r in rs] for layout, rs in runs.items()},
        "latency_per_proxied_pass": latency,
        "traffic_per_proxied_pass": [r["traffic"] for r in runs["proxy"]],
        "proxy_ms_per_request": round(per_request_ms, 3),
        "proxy_ms_per_mib": round(per_mb_ms, 3),
        "per_round": per_round,
        "how": "proxy_cost_ms_per_round = Fleet requests per round x proxy_ms_per_request (signed SuperNode "
        "poll, proxied minus direct median) + MiB per round x proxy_ms_per_mib (1 MiB upload minus a small "
        "request); round_s_* = mean round time after round 1 (polling-bound and load-bound on this machine)",
    }
    atomic_write_json(Path(args.out), result)
    say(json.dumps({"per_request_ms": result["proxy_ms_per_request"], "per_mib_ms": result["proxy_ms_per_mib"]}))
    say(json.dumps(per_round))
    say(f"-> {args.out}")


if __name__ == "__main__":
    main()
