"""Running real Flower processes from tests: an isolated app copy, FLWR_HOME, ports, clean-up.

``flwr run`` edits pyproject.toml (it migrates the federations section) and leaves a SuperLink
running on fixed ports, so every test runs a *copy* of the app with its own FLWR_HOME and
ports, and kills every process whose command line names that FLWR_HOME when it is done.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_PARTS = ("pyproject.toml", "README.md", "feddmmr_flower", "feddmmr_wire", "client_app", "server_app", "strategies")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_app(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for part in APP_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / part)
    return dst


def flwr_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
        }
    )
    return env


def run_config_arg(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, str):
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def processes_matching(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_matching(text: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process naming ``text`` and all their descendants."""
    pids = set()
    for pid in processes_matching(text):
        pids.add(pid)
        pids.update(descendants(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def flwr_run(
    app: Path,
    home: Path,
    run_config: dict,
    federation_config: str,
    timeout: float = 600,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``flwr run . --stream`` in ``app``; always cleans up the SuperLink it started."""
    cmd = [
        str(BIN / "flwr"),
        "run",
        ".",
        *extra_args,
        "--stream",
        "--federation-config",
        federation_config,
        "--run-config",
        run_config_arg(run_config),
    ]
    try:
        return subprocess.run(cmd, cwd=app, env=flwr_env(home), capture_output=True, text=True, timeout=timeout)
    finally:
        kill_matching(str(home))
