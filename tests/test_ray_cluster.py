"""A ``flwr run`` simulation on a two-node Ray cluster (issue #5: simulation beyond one machine).

A Ray head and one more Ray node (each ``--num-cpus=1``, own ``--temp-dir`` and ports) run on this
machine the way they would on two machines; ``RAY_ADDRESS`` makes Flower's Ray backend join that
cluster instead of starting its own (``ray.init()`` in flwr's RayBackend reads it). With one CPU
per ClientApp, Ray must place one ClientApp actor on each node; the test then reads Ray's own
records (actor table + task timeline, from the GCS) to check that *both* nodes executed
``ClientAppActor.run`` tasks, and that the federated run finished.

Clean-up never uses ``ray stop``: it kills every Ray process on the machine, other people's
simulations included. The cluster's processes are found by its temp dir and ports instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import synthetic_ml100k
from .flwr_utils import BIN, copy_app, flwr_run, free_port, kill_matching, processes_matching

pytestmark = [pytest.mark.deployment, pytest.mark.slow]
NUM_USERS = 6

# Runs in a separate driver connected to the cluster: which Ray node executed which ClientApp task.
# Ray's state API (`ray list ...`) needs the dashboard (ray[default]), which flwr[simulation] does not
# install; the actor table and the task timeline come straight from the GCS. An actor task's id ends
# with its actor's id (Ray's ID spec: TaskID = 8 unique bytes + ActorID).
PROBE = r"""
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = {a["ActorID"]: a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"}
runs = {}
for event in ray.timeline():
    if event.get("cat") == "task::ClientAppActor.run":
        node = actors.get(event["args"]["task_id"][16:], {}).get("Address", {}).get("NodeID", "unknown")
        runs[node] = runs.get(node, 0) + 1
print("PROBE " + json.dumps({
    "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    "actor_nodes": sorted(a["Address"]["NodeID"] for a in actors.values()),
    "runs_per_node": runs,
}))
"""


class RayCluster:
    """A head and one extra node on this machine, every port chosen free, every file under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.client_port = free_port()

    def _ports(self) -> list[str]:
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def _ray(self, *args: str, temp: str) -> None:
        cmd = [
            str(BIN / "ray"),
            "start",
            "--num-cpus=1",
            "--object-store-memory=100000000",
            f"--temp-dir={self.root / temp}",
            "--disable-usage-stats",
            *self._ports(),
            *args,
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=180, env={**_env(), "RAY_USAGE_STATS_ENABLED": "0"}
        )
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    def start(self) -> None:
        self._ray(
            "--head",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={self.client_port}",
            temp="head",
        )
        self._ray(f"--address={self.address}", temp="node")
        deadline = time.time() + 60  # the second node registers with the head asynchronously
        while len(self.probe()["alive_nodes"]) < 2 and time.time() < deadline:
            time.sleep(1)

    def probe(self) -> dict:
        done = subprocess.run(
            [str(BIN / "python"), "-c", PROBE, self.address], capture_output=True, text=True, timeout=120, env=_env()
        )
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
        assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(line[-1][len("PROBE ") :])

    def _marks(self) -> list[str]:
        # the temp dir names most processes; the Ray client server names only its ports
        return [str(self.root), f":{self.port} ", f"--port={self.client_port} "]

    def pids(self) -> list[int]:
        """Every live process of this cluster."""
        return sorted({pid for mark in self._marks() for pid in processes_matching(mark)})

    def stop(self) -> None:
        for mark in self._marks():
            kill_matching(mark)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


@pytest.fixture
def ray_cluster():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is missing from the environment (flwr[simulation] installs it)")
    # Short root: Ray's Unix socket paths must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="fdray-", dir="/tmp"))
    cluster = RayCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = cluster.pids()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def test_flwr_simulation_runs_clientapps_on_both_ray_nodes(ray_cluster, tmp_path, monkeypatch):
    started = time.time()
    nodes = ray_cluster.probe()["alive_nodes"]
    assert len(nodes) == 2, f"expected a head and one more Ray node, got {nodes}"

    data_dir = synthetic_ml100k(tmp_path / "ml-100k", users=NUM_USERS, items=40, per_user=15)
    config = {
        "data-dir": str(data_dir),
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "ray",
        "variant": "sasrec",
        "stage-schedule": "pretrain:1",
        "fraction-train": 1.0,
        "eval-every": 1,
        "eval-users": 2,
        "hidden": 16,
        "maxlen": 20,
        "negatives": 10,
        "eval-negatives": 10,
        "min-available-nodes": NUM_USERS,
    }
    app = copy_app(tmp_path / "app")
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)  # flwr_env copies os.environ
    done = flwr_run(
        app, tmp_path / "flwr-home", config, f"num-supernodes={NUM_USERS} client-resources-num-cpus=1", timeout=240
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    summary = json.loads((tmp_path / "outputs" / "ray" / "summary.json").read_text())
    assert summary["test"]["num_users"] == NUM_USERS

    seen = ray_cluster.probe()
    assert seen["alive_nodes"] == nodes, "a Ray node died during the run"
    assert sorted(set(seen["actor_nodes"])) == nodes, f"ClientApp actors were not placed on both nodes: {seen}"
    runs = seen["runs_per_node"]
    assert set(runs) == set(nodes) and all(runs[n] > 0 for n in nodes), f"ClientApp tasks per node: {runs}"
    # every message (train, evaluation, final test) ran as one ClientAppActor.run task somewhere
    assert sum(runs.values()) >= NUM_USERS * 2
    rounds = [line.strip() for line in log.splitlines() if line.startswith("round ")]
    print(f"\n[ray-cluster] {rounds}; ClientApp tasks per Ray node {runs}; {time.time() - started:.1f} s")
