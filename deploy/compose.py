"""Generate the docker compose files for a Flower 1.41 deployment of FedDMMR with N SuperNodes.

Why a generator: every SuperNode (one user) needs its own service pair, partition id, key, data
folder and state volume, and the GPU override must repeat each SuperNode's full command (compose
replaces, not merges, ``command``). The committed ``docker-compose.yml`` and
``docker-compose.gpu.yml`` are this module's output for :data:`DEFAULT_NODES` nodes and
:data:`DEFAULT_HOST`; a test checks they agree.

Layout (Flower's own for 1.41, process isolation: user code runs only in SuperExec containers):

* ``superlink`` (flwr/superlink): one HTTPS port (8000) for the Fleet, Control and Runtime APIs,
  ``--isolation process``, state database on the ``superlink-state`` volume, TLS, SuperNode
  authentication and SuperExec authentication on. It is published nowhere: it sits on the private
  network ``superlink-net`` with only the proxy and its SuperExec (issue #19).
* ``superlink-proxy`` (nginx, :mod:`deploy.proxy`): the public port serves the Fleet API (and
  health) only; the Control API is published on the host's 127.0.0.1 only (the operator's).
* ``superexec-serverapp`` (our image): runs ServerApps; reads the server's data and writes outputs.
* per node i: ``supernode-<i>`` (flwr/supernode) with ``--node-config "partition-id=i ..."`` and its
  auth key, and ``superexec-clientapp-<i>`` (our image) that runs its ClientApps, with the node's
  data folder (read-only, ``/data``) and its own state volume (``/state``).

Usage::

    python -m deploy.compose --nodes 3 --host superlink.example.org > docker-compose.yml
    python -m deploy.compose --nodes 3 --host superlink.example.org --gpu-override > docker-compose.gpu.yml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from . import proxy
from .certs import CertError, check_host

DEFAULT_NODES = 3
DEFAULT_HOST = "superlink.example.org"
DEFAULT_PORT = 8000
FLWR_VERSION = "1.41.0"
SUPEREXEC_IMAGE = "feddmmr-superexec"
NODE_RUNTIME_PORT = 9094  # each SuperNode's Runtime API (its own container: no clash between nodes)
MAX_NODES = 10_000
LINK_NETWORK = "superlink-net"  # the SuperLink's private network: SuperLink, proxy, ServerApp SuperExec


class ComposeError(ValueError):
    """Bad generator input (message is one line, names the problem)."""


def node_config(partition: int, nodes: int, gpu: bool = False) -> str:
    """The SuperNode's ``--node-config``: its user, and node-local paths the ClientApp reads."""
    text = (
        f"partition-id={partition} num-partitions={nodes} data-dir='/data' cache-dir='/data/cache' state-dir='/state'"
    )
    return text + (" device='cuda'" if gpu else "")


def _superexec_build(gpu: bool) -> dict[str, Any]:
    build: dict[str, Any] = {"context": ".", "dockerfile": "deploy/Dockerfile.superexec"}
    if gpu:  # PyPI's Linux torch wheels carry CUDA; the default (CPU index) ones are much smaller
        build["args"] = {"TORCH_INDEX_URL": "https://pypi.org/simple"}
    return build


def _superexec_image(gpu: bool) -> str:
    return f"{SUPEREXEC_IMAGE}:${{FEDDMMR_IMAGE_TAG:-0.1.0}}{'-gpu' if gpu else ''}"


def _supernode_command(i: int, nodes: int, host: str, port: int, gpu: bool) -> list[str]:
    return [
        "--superlink",
        f"${{SUPERLINK_ADDRESS:-{host}:{port}}}",
        "--root-certificates",
        "/certs/ca.crt",
        "--auth-supernode-private-key",
        "/certs/node.key",
        "--superexec-auth-secret-file",
        "/certs/superexec.secret",
        "--isolation",
        "process",
        "--host",
        "0.0.0.0",
        "--port",
        str(NODE_RUNTIME_PORT),
        "--node-config",
        node_config(i, nodes, gpu),
    ]


def _gpu_reservation() -> dict[str, Any]:
    return {
        "resources": {
            "reservations": {
                "devices": [
                    {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]},
                ]
            }
        }
    }


def _check(nodes: int, host: str, port: int) -> str:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ComposeError(f"--nodes must be an integer from 1 to {MAX_NODES}, got {nodes!r}")
    if not host or not str(host).strip():
        raise ComposeError("--host is required: the name or IP address SuperNodes use to reach the SuperLink")
    try:
        check_host(str(host))
    except CertError as exc:
        raise ComposeError(str(exc)) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ComposeError(f"--port must be from 1 to 65535, got {port!r}")
    return str(host).strip()


def proxy_service(certs: str, port: int) -> dict[str, Any]:
    """nginx in front of the SuperLink: the public ``port`` reaches only the Fleet API; the
    Control API is published on the host's loopback (``SUPERLINK_CONTROL_ADDRESS`` re-points it,
    e.g. to a VPN address only the operator reaches). Its configuration is ``deploy/nginx.conf``."""
    return {
        "image": f"${{FEDDMMR_PROXY_IMAGE:-{proxy.PROXY_IMAGE}}}",
        "ports": [
            f"${{SUPERLINK_PORT:-{port}}}:{proxy.NODE_PORT}",
            f"${{SUPERLINK_CONTROL_ADDRESS:-127.0.0.1:{proxy.OPERATOR_PORT}}}:{proxy.OPERATOR_PORT}",
        ],
        "volumes": [
            f"./{proxy.COMPOSE_CONF}:{proxy.CONTAINER_CONF}:ro",
            f"{certs}/superlink/ca.crt:/certs/ca.crt:ro",
            f"{certs}/superlink/server.pem:/certs/server.pem:ro",
            f"{certs}/superlink/server.key:/certs/server.key:ro",
        ],
        "networks": ["default", LINK_NETWORK],
        "depends_on": ["superlink"],
        "restart": "unless-stopped",
    }


def isolate_superlink(services: dict[str, Any], certs: str, port: int) -> dict[str, Any]:
    """Put the SuperLink (unpublished) and its SuperExec on the private network, add the proxy;
    returns the ``networks`` section. Nodes stay on ``default`` and reach only the proxy."""
    services["superlink"].pop("ports", None)
    services["superlink"]["networks"] = [LINK_NETWORK]
    services["superexec-serverapp"]["networks"] = [LINK_NETWORK]
    services["superlink-proxy"] = proxy_service(certs, port)
    return {LINK_NETWORK: {"internal": True}}


def base_compose(
    nodes: int, host: str, port: int = DEFAULT_PORT, gpu: bool = False, flwr_version: str = FLWR_VERSION
) -> dict[str, Any]:
    """The full compose document (``gpu``: with the GPU settings of the override built in)."""
    host = _check(nodes, host, port)
    certs = "${FEDDMMR_CERTS_DIR:-./deploy/certs}"
    services: dict[str, Any] = {
        "superlink": {
            "image": f"flwr/superlink:{flwr_version}",
            "command": [
                "--isolation",
                "process",
                "--host",
                "0.0.0.0",
                "--port",
                str(DEFAULT_PORT),
                "--database",
                "state.db",
                "--ssl-ca-certfile",
                "/certs/ca.crt",
                "--ssl-certfile",
                "/certs/server.pem",
                "--ssl-keyfile",
                "/certs/server.key",
                "--enable-supernode-auth",
                "--superexec-auth-secret-file",
                "/certs/superexec.secret",
                "--disable-runtime-dependency-installation",
            ],
            "volumes": [
                # /app is the image's (app-owned) working directory: the volume inherits its owner
                "superlink-state:/app",
                f"{certs}/superlink/ca.crt:/certs/ca.crt:ro",
                f"{certs}/superlink/server.pem:/certs/server.pem:ro",
                f"{certs}/superlink/server.key:/certs/server.key:ro",
                f"{certs}/superlink/superexec.secret:/certs/superexec.secret:ro",
            ],
            "restart": "unless-stopped",
        },
        "superexec-serverapp": {
            "build": _superexec_build(False),
            "image": _superexec_image(False),
            "command": [
                "--runtime-api-address",
                f"superlink:{DEFAULT_PORT}",
                "--root-certificates",
                "/certs/ca.crt",
                "--superexec-auth-secret-file",
                "/certs/superexec.secret",
            ],
            # Relative run-config paths (data-dir, cache-dir, output-dir) resolve against FEDDMMR_HOME.
            "environment": {"FEDDMMR_HOME": "/feddmmr"},
            "volumes": [
                "${FEDDMMR_SERVER_DIR:-./deploy/server}/data:/feddmmr/data:ro",
                "${FEDDMMR_SERVER_DIR:-./deploy/server}/outputs:/feddmmr/outputs",
                f"{certs}/superlink/ca.crt:/certs/ca.crt:ro",
                f"{certs}/superlink/superexec.secret:/certs/superexec.secret:ro",
            ],
            "depends_on": ["superlink"],
            "restart": "unless-stopped",
        },
    }
    networks = isolate_superlink(services, certs, port)
    volumes: dict[str, Any] = {"superlink-state": {}}
    for i in range(nodes):
        node_certs = f"{certs}/nodes/node-{i}"
        services[f"supernode-{i}"] = {
            "image": f"flwr/supernode:{flwr_version}",
            "command": _supernode_command(i, nodes, host, port, gpu),
            "volumes": [
                f"{node_certs}/ca.crt:/certs/ca.crt:ro",
                f"{node_certs}/node.key:/certs/node.key:ro",
                f"{node_certs}/superexec.secret:/certs/superexec.secret:ro",
            ],
            "restart": "unless-stopped",
        }
        clientapp: dict[str, Any] = {
            "build": _superexec_build(gpu),
            "image": _superexec_image(gpu),
            "command": [
                # Same-host network only; the shared secret keeps other nodes' SuperExecs out.
                "--runtime-api-address",
                f"supernode-{i}:{NODE_RUNTIME_PORT}",
                "--insecure",
                "--superexec-auth-secret-file",
                "/certs/superexec.secret",
            ],
            "environment": {"FEDDMMR_HOME": "/data"},
            "volumes": [
                f"${{FEDDMMR_NODES_DIR:-./deploy/nodes}}/node-{i}/data:/data:ro",
                f"node-{i}-state:/state",
                f"{node_certs}/superexec.secret:/certs/superexec.secret:ro",
            ],
            "depends_on": [f"supernode-{i}"],
            "restart": "unless-stopped",
        }
        if gpu:
            clientapp["deploy"] = _gpu_reservation()
        services[f"superexec-clientapp-{i}"] = clientapp
        volumes[f"node-{i}-state"] = {}
    return {"services": services, "volumes": volumes, "networks": networks}


def gpu_override(nodes: int, host: str, port: int = DEFAULT_PORT) -> dict[str, Any]:
    """``-f docker-compose.yml -f docker-compose.gpu.yml``: one GPU per ClientApp SuperExec,
    a CUDA torch build in its image, and ``device='cuda'`` in each SuperNode's node config."""
    host = _check(nodes, host, port)
    services: dict[str, Any] = {}
    for i in range(nodes):
        services[f"supernode-{i}"] = {"command": _supernode_command(i, nodes, host, port, gpu=True)}
        services[f"superexec-clientapp-{i}"] = {
            "build": _superexec_build(True),
            "image": _superexec_image(True),
            "deploy": _gpu_reservation(),
        }
    return {"services": services}


def _header(args: list[str], gpu_only: bool) -> str:
    command = " ".join(["python -m deploy.compose", *args])
    lines = [
        "# GENERATED by: " + command,
        "# Edit deploy/compose.py (and re-run it), not this file. Guide: docs/deploy.md.",
    ]
    if gpu_only:
        lines.append("# GPU override: docker-compose -f docker-compose.yml -f docker-compose.gpu.yml up -d ...")
    else:
        lines += [
            "# FedDMMR on Flower 1.41: 1 SuperLink (+ ServerApp SuperExec) and one SuperNode (+ ClientApp",
            "# SuperExec) per user; TLS, SuperNode authentication and SuperExec authentication are on.",
            "#   SuperLink host: docker-compose up -d --build superlink superlink-proxy superexec-serverapp",
            "#   node host i:    docker-compose up -d --build supernode-<i> superexec-clientapp-<i>",
            "#   one host:       SUPERLINK_ADDRESS=superlink-proxy:8000 docker-compose up -d --build",
            "# Node hosts reach only the Fleet API (superlink-proxy, deploy/nginx.conf); the operator's flwr",
            f"# CLI uses the Control API on the SuperLink host's 127.0.0.1:{proxy.OPERATOR_PORT}.",
            "# Needs deploy/certs (python -m deploy.certs), deploy/nodes/node-<i>/data, deploy/server/data.",
        ]
    return "\n".join(lines) + "\n"


def render(doc: dict[str, Any], header: str) -> str:
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.compose",
        description=("Write a docker compose file for a SuperLink and N SuperNodes (TLS and SuperNode auth on)."),
    )
    parser.add_argument("--nodes", type=int, default=None, help=f"number of SuperNodes (e.g. {DEFAULT_NODES})")
    parser.add_argument("--host", default=None, help="name or IP address SuperNodes use to reach the SuperLink")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="SuperLink port published on its host")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="one file with the GPU settings built in")
    mode.add_argument("--gpu-override", action="store_true", help="only the GPU override file")
    parser.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        if args.nodes is None:
            raise ComposeError("--nodes is required: the number of SuperNodes (one per user)")
        if args.host is None:
            raise ComposeError("--host is required: the name or IP address SuperNodes use to reach the SuperLink")
        if args.gpu_override:
            doc = gpu_override(args.nodes, args.host, args.port)
        else:
            doc = base_compose(args.nodes, args.host, args.port, gpu=args.gpu)
    except ComposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = ["--nodes", str(args.nodes), "--host", args.host.strip()]
    shown += ["--port", str(args.port)] if args.port != DEFAULT_PORT else []
    shown += ["--gpu"] if args.gpu else ["--gpu-override"] if args.gpu_override else []
    text = render(doc, _header(shown, args.gpu_override))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
