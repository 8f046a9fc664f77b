"""A Flower deployment on this machine for tests and benchmarks: SuperLink + SuperNodes as separate
processes, each on its own lab host (network namespace or loopback, see netlab.py) with its own
FLWR_HOME and node-local disk (``<root>/node<i>/{data,cache,state}``). TLS and SuperNode
authentication are on, with the certificates and keys of ``deploy/certs.py`` (what
docker-compose.yml mounts); ServerApps/ClientApps run in subprocesses of their SuperLink/SuperNode.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from deploy.certs import make_deployment

from .flwr_utils import BIN, descendants, flwr_env, free_port, kill_matching
from .netlab import NetLab, wait_for_line


class Deployment:
    """The processes of one deployment, each started on its lab host in its own session."""

    def __init__(self, root: Path, lab: NetLab, num_nodes: int) -> None:
        self.root, self.lab, self.num_nodes = root, lab, num_nodes
        self.procs: dict[str, subprocess.Popen] = {}
        self.link = lab.add_host("link")
        self.cli = lab.add_host("cli")
        self.nodes = [lab.add_host(f"node{i}") for i in range(num_nodes)]
        self.port = free_port()
        self.certs = make_deployment(root / "certs", hosts=[self.link.address], nodes=num_nodes)
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, name: str) -> dict[str, str]:
        env = flwr_env(self.root / "homes" / name)
        (self.root / "homes" / name).mkdir(parents=True, exist_ok=True)
        return env

    def start(self, name: str, host, argv: list[str]) -> subprocess.Popen:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            host.command(argv),
            env=self.env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start_superlink(self) -> None:
        link = self.certs.superlink
        self.start(
            "superlink",
            self.link,
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(link / "ca.crt"),
                "--ssl-certfile",
                str(link / "server.pem"),
                "--ssl-keyfile",
                str(link / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                self.link.address,
                "--port",
                str(self.port),
                "--database",
                str(self.root / "link-state.db"),
            ],
        )
        wait_for_line(self.log("superlink"), "Uvicorn running", timeout=60)
        home = self.root / "homes" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
            f'address = "{self.link.address}:{self.port}"\nroot-certificates = "{self.certs.ca / "ca.crt"}"\n'
        )

    def cli_run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cli.command(argv), env=self.env("cli"), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def register_nodes(self) -> None:
        for node_dir in self.certs.nodes:
            done = self.cli_run(
                [str(BIN / "flwr"), "supernode", "register", str(node_dir / "node.pub"), "deployment"],
                cwd=self.root,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr

    def start_node(self, i: int) -> None:
        keys, disk = self.certs.nodes[i], self.root / f"node{i}"
        node_config = (
            f"partition-id={i} num-partitions={self.num_nodes} data-dir='{disk / 'data'}' "
            f"cache-dir='{disk / 'cache'}' state-dir='{disk / 'state'}'"
        )
        self.start(
            f"node{i}",
            self.nodes[i],
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(keys / "ca.crt"),
                "--superlink",
                f"{self.link.address}:{self.port}",
                "--auth-supernode-private-key",
                str(keys / "node.key"),
                "--node-config",
                node_config,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
        )

    def stop(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        group = [proc.pid, *descendants(proc.pid)]
        for pid in group:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)

    def client_app_running(self, name: str) -> bool:
        for pid in descendants(self.procs[name].pid):
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    def start_all(self) -> None:
        """SuperLink, node keys registered, every SuperNode connected."""
        self.start_superlink()
        self.register_nodes()
        for i in range(self.num_nodes):
            self.start_node(i)
        wait_for_line(self.log("superlink"), "Activated node_id", count=self.num_nodes, timeout=120)

    def close(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.stop(name, signal.SIGKILL)
        kill_matching(str(self.root))
