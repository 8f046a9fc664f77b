"""A Flower deployment on this machine for tests and benchmarks: SuperLink + SuperNodes as separate
processes, each on its own lab host (network namespace or loopback, see netlab.py) with its own
FLWR_HOME and node-local disk (``<root>/node<i>/{data,cache,state}``). TLS and SuperNode
authentication are on, with the certificates and keys of ``deploy/certs.py`` (what
docker-compose.yml mounts); ServerApps/ClientApps run in subprocesses of their SuperLink/SuperNode.

With ``proxy=True`` (the documented layout, issue #19) the SuperLink listens on its host's loopback
only and a real nginx process on the same host (``deploy/proxy.py``'s configuration) serves the
Fleet API on the host's lab address to the SuperNodes and the Control API on 127.0.0.1 to the
operator, whose ``flwr`` CLI then runs on the SuperLink host. Without it: the old single public port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from deploy import proxy
from deploy.certs import make_deployment

from .flwr_utils import BIN, descendants, flwr_env, free_port, kill_matching
from .netlab import NetLab, wait_for_line


def nginx_binary() -> str | None:
    """Debian's nginx (``/usr/sbin`` is not on every PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def require_nginx() -> str:
    """The nginx binary, or skip (fail under CI, which must install it: .ci/run)."""
    import pytest

    nginx = nginx_binary()
    if nginx is None:
        message = "nginx is not installed (apt-get install -y nginx); the deployment's proxy needs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return nginx


class Deployment:
    """The processes of one deployment, each started on its lab host in its own session."""

    def __init__(self, root: Path, lab: NetLab, num_nodes: int, proxy: bool = True) -> None:
        self.root, self.lab, self.num_nodes, self.proxied = root, lab, num_nodes, proxy
        self.procs: dict[str, subprocess.Popen] = {}
        self.link = lab.add_host("link")
        # The operator: on the SuperLink host behind the proxy, else a host of its own on the lab network.
        self.cli = self.link if proxy else lab.add_host("cli")
        self.nodes = [lab.add_host(f"node{i}") for i in range(num_nodes)]
        self.port = free_port()  # the SuperLink's own port
        self.node_port, self.operator_port = (free_port(), free_port()) if proxy else (self.port, self.port)
        # what SuperNodes dial, and where the operator's flwr CLI connects
        self.public_address = f"{self.link.address}:{self.node_port}"
        self.operator_address = f"127.0.0.1:{self.operator_port}" if proxy else self.public_address
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
                "127.0.0.1" if self.proxied else self.link.address,
                "--port",
                str(self.port),
                "--database",
                str(self.root / "link-state.db"),
            ],
        )
        wait_for_line(self.log("superlink"), "Uvicorn running", timeout=60)
        if self.proxied:
            self.start_proxy()
        self.write_connections("cli", {"deployment": self.operator_address}, self.certs.ca / "ca.crt")

    def start_proxy(self) -> None:
        """nginx on the SuperLink host, with deploy/proxy.py's configuration and its own run folder."""
        nginx = nginx_binary()
        if nginx is None:
            raise RuntimeError("nginx is not installed (apt-get install -y nginx); the proxied layout needs it")
        run_dir = self.root / "proxy"
        layout = proxy.process_layout(
            self.certs.superlink,
            f"127.0.0.1:{self.port}",
            node_listen=self.public_address,
            operator_listen=self.operator_address,
            run_dir=run_dir,
            workers="1",
        )
        conf = proxy.write_config(layout, run_dir / "nginx.conf")
        self.start("proxy", self.link, proxy.nginx_command(conf, run_dir, nginx))
        wait_for_line(run_dir / "error.log", "start worker process", timeout=30)

    def write_connections(self, home: str, addresses: dict[str, str], ca: Path) -> Path:
        """``$FLWR_HOME/config.toml`` of ``home`` with one TLS connection per name (the first is the default)."""
        folder = self.root / "homes" / home
        folder.mkdir(parents=True, exist_ok=True)
        text = f'[superlink]\ndefault = "{next(iter(addresses))}"\n'
        for name, address in addresses.items():
            text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
        (folder / "config.toml").write_text(text)
        return folder

    def cli_run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """The operator's ``flwr`` CLI."""
        return self.run_on(self.cli, "cli", argv, cwd, timeout)

    def run_on(self, host, home: str, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """A command on ``host`` with ``FLWR_HOME`` = homes/``home`` (e.g. ``flwr`` from a node host)."""
        return subprocess.run(
            host.command(argv), env=self.env(home), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def register_nodes(self) -> None:
        """Register every node key (operator); ``node_ids[i]`` is node i's id on the SuperLink."""
        self.node_ids: list[int] = []
        for node_dir in self.certs.nodes:
            done = self.cli_run(
                [str(BIN / "flwr"), "supernode", "register", str(node_dir / "node.pub"), "deployment"],
                cwd=self.root,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            self.node_ids.append(int(re.search(r"SuperNode (\d+) registered", done.stdout).group(1)))

    def start_node(self, i: int) -> None:
        keys, disk = self.certs.nodes[i], self.root / f"node{i}"
        node_config = (
            f"partition-id={i} num-partitions={self.num_nodes} data-dir='{disk / 'data'}' "
            f"cache-dir='{disk / 'cache'}' state-dir='{disk / 'state'}'"
        )
        self.start_supernode(f"node{i}", self.nodes[i], keys / "node.key", keys / "ca.crt", node_config)

    def start_supernode(self, name: str, host, key: Path, ca: Path, node_config: str) -> subprocess.Popen:
        """A SuperNode on ``host`` dialling the public address with this auth key and CA certificate."""
        return self.start(
            name,
            host,
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(ca),
                "--superlink",
                self.public_address,
                "--auth-supernode-private-key",
                str(key),
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
