"""A real Flower deployment of FedDMMR: SuperLink + 3 SuperNodes as separate processes (issue #5).

Each process runs on its own "host": a network namespace joined to the others by veth pairs and a
bridge when the test runs as root with ``ip`` (else this machine's loopback), with its own
``FLWR_HOME`` and its own node-local data, cache and state folders. TLS and SuperNode
authentication are on, with the certificates and keys of ``deploy/certs.py`` (the ones
docker-compose.yml mounts). The SuperLink listens on its host's loopback only; nginx on its host
(deploy/proxy.py) serves the Fleet API to the nodes and the Control API to the operator's ``flwr``
on 127.0.0.1 (issue #19). One module fixture plays the whole story, then the tests read it:

1. a reference Ray simulation of the same run config;
1b. from a node host, ``flwr ls``, ``flwr run`` and ``flwr supernode register`` at the node-facing
   address are refused, and the SuperLink's own port and the operator port are unreachable; a
   SuperNode with an unregistered key, and one trusting another CA, are refused through the proxy;
2. run A (2 rounds) on the deployment: same outputs as the simulation; the operator lists it;
3. SuperNode 0 is restarted (SIGTERM, start again: new process, new node id, empty RAM state);
4. run B resumes run A for a third round; in the middle of it SuperNode 2 is SIGKILLed. The run
   finishes with the other two, history.json names partition 2 as failed, and the memories of
   partitions 0 and 1 carried on from disk (their third training pass, not a first);
5. everything is stopped and every namespace deleted; what is left is recorded and asserted.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from deploy.certs import make_ca_and_server_cert, make_node_key
from feddmmr_flower import checkpoint
from feddmmr_flower.config import ExperimentConfig
from feddmmr_flower.experiment import load_assets

from .conftest import synthetic_ml100k
from .deployment_lab import Deployment, require_nginx
from .flwr_utils import BIN, copy_app, flwr_run, processes_matching, run_config_arg
from .netlab import NetLab, namespaces_available, wait_for_line

pytestmark = [pytest.mark.deployment, pytest.mark.slow]
NODES = 3
KILLED = 2  # SIGKILLed in the middle of run B's round
RESTARTED = 0  # restarted between run A and run B


def _node_disks(root: Path, data: Path, cache: Path) -> None:
    """Every node host gets its own copy of the prepared dataset (node-local disks)."""
    for i in range(NODES):
        shutil.copytree(data, root / f"node{i}" / "data")
        shutil.copytree(cache, root / f"node{i}" / "cache")


def intrude(deployment: Deployment, app: Path) -> dict:
    """What node host 0 gets from the Control API, and what rogue SuperNodes get from the Fleet API."""
    node, flwr = deployment.nodes[0], str(BIN / "flwr")
    connections = {
        "public": deployment.public_address,  # the node-facing proxy address: what SuperNodes dial
        "superlink-port": f"{deployment.link.address}:{deployment.port}",  # the SuperLink itself
        "operator-port": f"{deployment.link.address}:{deployment.operator_port}",  # the proxy's operator side
    }
    deployment.write_connections("intruder", connections, deployment.certs.nodes[0] / "ca.crt")
    out = {}
    for name, argv in {
        "ls": [flwr, "ls", "public"],
        "run": [flwr, "run", ".", "public"],
        "register": [flwr, "supernode", "register", str(deployment.certs.nodes[0] / "node.pub"), "public"],
        "ls_superlink_port": [flwr, "ls", "superlink-port"],
        "ls_operator_port": [flwr, "ls", "operator-port"],
    }.items():
        done = deployment.run_on(node, "intruder", argv, cwd=app, timeout=120)
        out[name] = {"returncode": done.returncode, "log": done.stdout + done.stderr}
    # SuperNodes the SuperLink must refuse, through the proxy: an unregistered key; another CA.
    rogue_key, _ = make_node_key(deployment.root / "rogue" / "node.key")
    other_ca = make_ca_and_server_cert(deployment.root / "other-ca", [deployment.link.address]).ca_cert
    keys = deployment.certs.nodes[1]
    rogues = {
        "unregistered_key": deployment.start_supernode(
            "rogue-key", deployment.nodes[1], rogue_key, keys / "ca.crt", "partition-id=1 num-partitions=3"
        ),
        "other_ca": deployment.start_supernode(
            "rogue-ca", deployment.nodes[1], keys / "node.key", other_ca, "partition-id=1 num-partitions=3"
        ),
    }
    for name, proc in rogues.items():
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        log = deployment.log("rogue-key" if name == "unregistered_key" else "rogue-ca").read_text(errors="replace")
        out[name] = {"returncode": proc.poll(), "log": log}
    return out


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> dict:
    require_nginx()
    root = tmp_path_factory.mktemp("deploy")
    data = synthetic_ml100k(root / "server-data", users=NODES)
    config = {
        "data-dir": str(data),
        "cache-dir": str(root / "server-cache"),
        "output-dir": str(root / "outputs"),
        "stage-schedule": "pretrain:1,align:1",
        "fraction-train": 1.0,
        "eval-every": 2,
        "eval-users": NODES,
        "hidden": 16,
        "maxlen": 30,
        "negatives": 20,
        "eval-negatives": 20,
        "min-available-nodes": NODES,
        # FedAvg: FedAdam's tiny tau turns float noise (a Ray worker and a ClientApp process use different
        # thread counts) on zero-gradient entries (e.g. attention key biases) into ~1e-5 steps.
        "strategy": "fedavg",
    }
    load_assets(ExperimentConfig.from_flat(config))  # features once; every node copies the cache
    _node_disks(root, data, root / "server-cache")
    app = copy_app(root / "app")
    result: dict = {"root": root}

    # 1. the reference simulation
    sim = flwr_run(
        app,
        root / "sim-home",
        {**config, "run-name": "reference"},
        f"num-supernodes={NODES} client-resources-num-cpus=1",
        timeout=600,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]

    lab = NetLab(use_namespaces=namespaces_available())
    result["namespaces"] = lab.use_namespaces
    deployment = Deployment(root, lab, NODES)
    try:
        deployment.start_all()
        result["intruder"] = intrude(deployment, app)
        run = [str(BIN / "flwr"), "run", ".", "deployment", "--stream"]

        # 2. run A: the same run config as the simulation
        started = time.time()
        done = deployment.cli_run(
            run + ["--run-config", run_config_arg({**config, "run-name": "deployed"})], cwd=app, timeout=600
        )
        result["run_a"] = {
            "returncode": done.returncode,
            "log": done.stdout + done.stderr,
            "seconds": time.time() - started,
        }
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        shutil.copytree(root / "outputs" / "deployed", root / "outputs" / "deployed-run-a")  # B extends it
        listed = deployment.cli_run([str(BIN / "flwr"), "ls", "deployment", "--format", "json"], cwd=root, timeout=120)
        result["operator_ls"] = {"returncode": listed.returncode, "stdout": listed.stdout, "stderr": listed.stderr}

        # 3. restart SuperNode 0 between rounds 2 and 3
        deployment.stop(f"node{RESTARTED}", signal.SIGTERM)
        deployment.start_node(RESTARTED)
        wait_for_line(deployment.log("superlink"), "Activated node_id", count=NODES + 1, timeout=90)

        # 4. run B: resume for one more round; SIGKILL SuperNode 2 while its ClientApp trains
        resume = {
            **config,
            "run-name": "deployed",
            "resume-from": str(root / "outputs" / "deployed"),
            "stage-schedule": "pretrain:1,align:2",
            "min-available-nodes": NODES - 1,
        }
        started = time.time()
        run_b = subprocess.Popen(
            deployment.cli.command(run + ["--run-config", run_config_arg(resume)]),
            env=deployment.env("cli"),
            cwd=app,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 240
        while not deployment.client_app_running(f"node{KILLED}"):
            assert time.time() < deadline and run_b.poll() is None, "node 2 never started a ClientApp"
            time.sleep(0.2)
        deployment.stop(f"node{KILLED}", signal.SIGKILL)
        result["killed_after_s"] = time.time() - started
        out, _ = run_b.communicate(timeout=600)
        result["run_b"] = {"returncode": run_b.returncode, "log": out, "seconds": time.time() - started}
    finally:
        deployment.close()
        lab.close()
    result["superlink_log"] = deployment.log("superlink").read_text(errors="replace")
    result["node_addresses"] = [host.address for host in deployment.nodes]
    result["leftover_processes"] = processes_matching(str(root))
    result["leftover_namespaces"] = lab.mine()
    return result


def _outputs(root: Path, name: str) -> dict:
    out = root / "outputs" / name
    return {
        "history": json.loads((out / "history.json").read_text())["rounds"],
        "summary": json.loads((out / "summary.json").read_text()),
        "best": checkpoint.load(out / "best.pt"),
    }


def test_deployment_runs_on_separate_hosts_with_tls_and_auth(story):
    assert story["run_a"]["returncode"] == 0
    log = story["run_a"]["log"]
    assert "round 2/2 [align]" in log and "final test on all 3 nodes" in log
    assert "Using SuperLink: deployment (127.0.0.1:" in log  # the operator, on the SuperLink host


def test_a_node_host_cannot_use_the_control_api(story):
    """``flwr ls``, ``flwr run`` and ``flwr supernode register`` from node host 0, pointed at the
    address its SuperNode uses, are refused by the proxy; nothing reached the SuperLink's Control API."""
    intruder = story["intruder"]
    for call in ("ls", "run", "register"):
        assert intruder[call]["returncode"] != 0, intruder[call]["log"]
        assert "403 Forbidden" in intruder[call]["log"], intruder[call]["log"]
    if story["namespaces"]:  # the SuperLink's own port and the operator port: not reachable from a node host
        for call in ("ls_superlink_port", "ls_operator_port"):
            assert intruder[call]["returncode"] != 0
            assert "Connection to the SuperLink is unavailable" in intruder[call]["log"], intruder[call]["log"]
        # the SuperLink logs the proxied client's address: no node ever reached its Control API
        control = [line for line in story["superlink_log"].splitlines() if "/v1/control/" in line]
        assert control and not [line for line in control if any(a + ":" in line for a in story["node_addresses"])]


def test_the_operator_uses_the_control_api_on_the_superlink_host(story):
    """register (every node, in start_all) and run (run A) worked from the operator's side; so does ls."""
    listed = story["operator_ls"]
    assert listed["returncode"] == 0, listed["stdout"] + listed["stderr"]
    runs = json.loads(listed["stdout"][listed["stdout"].index("{") :])["runs"]
    # exactly run A: the node host's `flwr run` never created a run
    assert [(r["fab-id"], r["status"]) for r in runs] == [("feddmmr/feddmmr-flower", "finished:completed")], runs


def test_supernode_authentication_and_tls_hold_through_the_proxy(story):
    rogue = story["intruder"]["unregistered_key"]
    # Flower prints its exit code (305: no connection to the SuperLink); the process exits with 1
    assert rogue["returncode"] not in (0, None) and "Exit Code: 305" in rogue["log"], rogue["log"][-2000:]
    assert "Failed to activate SuperNode" in rogue["log"]
    assert "No SuperNode found with the given public key" in story["superlink_log"]
    other_ca = story["intruder"]["other_ca"]
    assert other_ca["returncode"] not in (0, None) and "Exit Code: 305" in other_ca["log"], other_ca["log"][-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in other_ca["log"]


def test_deployment_gives_the_same_outputs_as_the_simulation(story):
    sim, dep = _outputs(story["root"], "reference"), _outputs(story["root"], "deployed-run-a")
    first_two = dep["history"]
    assert [r["stage"] for r in first_two] == [r["stage"] for r in sim["history"]] == ["pretrain", "align"]
    for a, b in zip(sim["history"], first_two):
        assert a["train"]["num-accepted"] == b["train"]["num-accepted"] == NODES
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-4)
        assert a["train"]["memory-size"] == b["train"]["memory-size"]
    assert sim["history"][1]["valid"]["NDCG@10"] == pytest.approx(first_two[1]["valid"]["NDCG@10"], abs=1e-6)
    for protocol in ("sampled", "full"):
        for metric, value in sim["summary"]["test"][protocol].items():
            assert dep["summary"]["test"][protocol][metric] == pytest.approx(value, abs=1e-6), (protocol, metric)
    for name, tensor in sim["best"].state_dict.items():
        np.testing.assert_allclose(dep["best"].state_dict[name].numpy(), tensor.numpy(), atol=1e-5, err_msg=name)


def test_a_killed_supernode_is_reported_and_the_run_finishes_without_it(story):
    assert story["run_b"]["returncode"] == 0, story["run_b"]["log"][-3000:]
    dep = _outputs(story["root"], "deployed")
    assert [r["round"] for r in dep["history"]] == [1, 2, 3]
    third = dep["history"][2]
    assert third["train"]["num-accepted"] == NODES - 1
    assert [f["partition_id"] for f in third["failed"]] == [KILLED], third["failed"]
    assert dep["summary"]["test"]["num_users"] == NODES - 1


def test_memories_survive_the_supernode_restart_on_node_local_disk(story):
    """Round 3 is each surviving node's third training pass: the memory was read back from disk."""
    third = _outputs(story["root"], "deployed")["history"][2]
    assert third["train"]["memory-passes"] == pytest.approx(3.0)
    for i in (RESTARTED, 1):
        assert list((story["root"] / f"node{i}" / "state").glob(f"deployed-*/partition-{i}.npz"))


def test_nothing_is_left_running_and_every_namespace_is_removed(story):
    assert story["leftover_processes"] == []
    assert story["leftover_namespaces"] == set()
