"""Hosts for deployment tests: one Linux network namespace per host, joined by veth pairs to a
bridge (itself in a namespace of its own, so the machine's own network is never touched).

Without root or ``ip`` every "host" is this machine's loopback instead, with distinct ports.
Everything a lab creates is removed by ``close()``; ``leftovers()`` tells what still exists.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, namespace: str | None = None) -> None:
    cmd = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def namespaces_available() -> bool:
    """Root with iproute2, and the kernel lets us make a namespace (not so in every container)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"fdmprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError:
        return False
    _ip("netns", "del", probe)
    return True


def list_namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@dataclass
class Host:
    name: str
    address: str  # where other hosts reach it
    namespace: str | None  # None: this machine's loopback

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as it runs on this host."""
        return argv if self.namespace is None else ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class NetLab:
    """A private 10.213.X.0/24 network of named hosts (or loopback when namespaces are unavailable)."""

    use_namespaces: bool
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    _created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fdm{self.tag}-sw"

    def __post_init__(self) -> None:
        self.subnet = f"10.213.{int(self.tag, 16) % 250 + 1}"
        if self.use_namespaces:
            self._add_namespace(self.switch)
            _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
            _ip("link", "set", "br0", "up", namespace=self.switch)

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("link", "set", "lo", "up", namespace=name)  # a SuperNode talks to its ClientApps on 127.0.0.1

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        if not self.use_namespaces:
            host = Host(name, "127.0.0.1", None)
        else:
            namespace = f"fdm{self.tag}-{name}"
            self._add_namespace(namespace)
            outside, inside = f"v{self.tag}{index}s", f"v{self.tag}{index}h"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "netns", self.switch)
            _ip("link", "set", outside, "master", "br0", namespace=self.switch)
            _ip("link", "set", outside, "up", namespace=self.switch)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", inside, "name", "eth0", namespace=namespace)
            address = f"{self.subnet}.{index}"
            _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
            _ip("link", "set", "eth0", "up", namespace=namespace)
            host = Host(name, address, namespace)
        self.hosts[name] = host
        return host

    def mine(self) -> set[str]:
        return {n for n in list_namespaces() if n.startswith(f"fdm{self.tag}-")} if self.use_namespaces else set()

    def close(self) -> None:
        """Delete every namespace (host namespaces first; their veth ends go with them)."""
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created.clear()


def wait_for_line(path: Path, text: str, count: int = 1, timeout: float = 60.0) -> None:
    """Block until ``path`` (a process's log) holds ``text`` at least ``count`` times."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.3)
    tail = path.read_text(errors="replace")[-2000:] if path.is_file() else "(no log)"
    raise TimeoutError(f"{path.name}: no {count}x {text!r} after {timeout:.0f} s; log ends:\n{tail}")
