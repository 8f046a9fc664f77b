"""Per-request latency, SuperLink directly vs through the nginx proxy, interleaved request by request.

Run on the SuperLink's host (the only place both are reachable; benchmarks/proxy_overhead.py does
it in the lab): ``python -m benchmarks.proxy_latency DIRECT PROXY CA NODE_KEY NODE_ID [N]``. Each
target gets one kept-alive TLS connection (as a SuperNode keeps one); the two alternate, so load
from elsewhere on the machine hits both alike. Kinds of request:

* ``health``: ``GET /health``;
* ``pull_messages``: a SuperNode's idle poll, signed with a registered node's key (what nodes send
  most);
* ``upload_1mb``: ``POST /v1/fleet/push-object`` with 1 MiB, read in full by the SuperLink before
  it refuses the junk body: the cost of moving bytes through the second TLS hop.

Prints JSON: per kind, median/mean/p90 milliseconds per target and the median difference.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message


def signed_headers(key) -> dict[str, str]:
    """SuperNode authentication headers, exactly as Flower's SuperNode makes them."""
    stamp = dt.datetime.now(dt.UTC).isoformat()
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(sign_message(key, stamp.encode("ascii"))).decode(),
        "content-type": "application/protobuf",
        "accept": "application/protobuf",
    }


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "mean_ms": round(statistics.mean(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
    }


def main(argv: list[str]) -> None:
    direct, proxied, ca, key_path, node_id = argv[:5]
    count = int(argv[5]) if len(argv) > 5 else 300
    key = serialization.load_ssh_private_key(Path(key_path).read_bytes(), password=None)
    poll = PullMessagesRequest(node=Node(node_id=int(node_id))).SerializeToString()
    upload = bytes(2**20)
    kinds = {
        "health": lambda c, base: c.get(f"{base}/health"),
        "pull_messages": lambda c, base: c.post(
            f"{base}/v1/fleet/pull-messages", content=poll, headers=signed_headers(key)
        ),
        "upload_1mb": lambda c, base: c.post(
            f"{base}/v1/fleet/push-object", content=upload, headers=signed_headers(key)
        ),
    }
    targets = {"direct": f"https://{direct}", "proxy": f"https://{proxied}"}
    out: dict = {}
    with httpx.Client(verify=ca, timeout=60) as a, httpx.Client(verify=ca, timeout=60) as b:
        clients = {"direct": a, "proxy": b}
        for kind, call in kinds.items():
            times: dict[str, list[float]] = {"direct": [], "proxy": []}
            statuses: dict[str, set[int]] = {"direct": set(), "proxy": set()}
            for name in targets:  # connection set-up and TLS handshake, not timed
                call(clients[name], targets[name])
            for i in range(count):
                order = ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")
                for name in order:
                    tick = time.perf_counter()
                    response = call(clients[name], targets[name])
                    times[name].append(time.perf_counter() - tick)
                    statuses[name].add(response.status_code)
            if statuses["direct"] != statuses["proxy"]:
                raise SystemExit(f"{kind}: the proxy answered {statuses['proxy']}, the SuperLink {statuses['direct']}")
            out[kind] = {name: summary(values) for name, values in times.items()}
            out[kind]["status"] = sorted(statuses["direct"])
            out[kind]["proxy_minus_direct_median_ms"] = round(
                out[kind]["proxy"]["median_ms"] - out[kind]["direct"]["median_ms"], 3
            )
    out["requests_per_kind_and_target"] = count
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
