"""A real ``flwr run`` (Ray simulation) of the app, watched: per-round times and every process's peak memory.

Used by ``round_time.py`` and ``scaling.py``. The app runs from a copy with its own FLWR_HOME and
ports (``tests/flwr_utils.py``); a sampler reads ``/proc/<pid>/status`` of every process of the run
(the ``flwr`` CLI, the SuperLink, the ServerApp, Ray's daemons and its ClientApp workers) twice a
second and keeps each one's peak resident memory (VmHWM, which the kernel tracks between samples).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.flwr_utils import BIN, copy_app, descendants, flwr_env, kill_matching, processes_matching, run_config_arg

NOOP_APP = Path(__file__).resolve().parent / "noop_app"
KINDS = (  # (substring of the command line, label), first match wins
    ("flower-superlink", "SuperLink"),
    ("flower-superexec", "SuperExec"),
    ("flwr-simulation", "simulation runtime (ServerApp, Ray driver)"),
    ("raylet/raylet", "Ray daemons"),
    ("gcs_server", "Ray daemons"),
    ("ray/dashboard", "Ray daemons"),
    ("runtime_env/agent", "Ray daemons"),
    ("autoscaler", "Ray daemons"),
    ("log_monitor", "Ray daemons"),
    ("setup_worker.py", "Ray worker (ClientApp)"),
    ("default_worker.py", "Ray worker (ClientApp)"),
    ("ray::", "Ray worker (ClientApp)"),
    ("flwr run", "flwr CLI"),
)


def _kind(cmdline: str) -> str:
    for needle, label in KINDS:
        if needle in cmdline:
            return label
    return "other (" + Path(cmdline.split(" ", 1)[0]).name + ")"


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryWatch(threading.Thread):
    """Peak RSS (MB) of every process whose command line names ``marker``, and of their children."""

    def __init__(self, marker: str, root_pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.marker, self.root_pid, self.period = marker, root_pid, period
        self.peaks: dict[int, dict] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def sample(self) -> None:
        pids = set(processes_matching(self.marker)) | {self.root_pid}
        for pid in list(pids):
            pids.update(descendants(pid))
        for pid in pids:
            peak = _status_kb(pid, "VmHWM")
            if peak is None:
                continue
            if pid not in self.peaks:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                self.peaks[pid] = {"pid": pid, "kind": _kind(cmdline), "cmd": cmdline[:160], "peak_rss_mb": 0.0}
            self.peaks[pid]["peak_rss_mb"] = max(self.peaks[pid]["peak_rss_mb"], round(peak / 1024, 1))

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join()
        return sorted(self.peaks.values(), key=lambda p: -p["peak_rss_mb"])


def by_kind(processes: list[dict]) -> dict[str, dict]:
    """Per kind of process: how many, and the largest peak RSS among them (MB)."""
    out: dict[str, dict] = {}
    for proc in processes:
        entry = out.setdefault(proc["kind"], {"processes": 0, "max_peak_rss_mb": 0.0})
        entry["processes"] += 1
        entry["max_peak_rss_mb"] = max(entry["max_peak_rss_mb"], proc["peak_rss_mb"])
    return out


def _flwr_run(app: Path, home: Path, nodes: int, run_config: dict, timeout: float, log: Path | None) -> dict:
    federation = f"num-supernodes={nodes} client-resources-num-cpus=1"
    command = [
        str(BIN / "flwr"),
        "run",
        ".",
        "--stream",
        "--federation-config",
        federation,
        "--run-config",
        run_config_arg(run_config),
    ]
    started = time.time()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, cwd=app, env=flwr_env(home), stdout=out, stderr=subprocess.STDOUT)
    watch = MemoryWatch(str(home), proc.pid)
    watch.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        processes = watch.stop()
        kill_matching(str(home))
        if log:
            out.close()
    return {
        "exit_code": code,
        "seconds": round(time.time() - started, 1),
        "federation_config": federation,
        "processes": processes,
        "memory_by_kind": by_kind(processes),
    }


def run_simulation(run_config: dict, nodes: int, *, timeout: float = 1800, log: Path | None = None) -> dict:
    """``flwr run`` of FedDMMR with ``nodes`` SuperNodes, one CPU per ClientApp (as many at a time as cores).

    ``run_config`` must name absolute paths and an ``output-dir``/``run-name`` to read back.
    """
    with tempfile.TemporaryDirectory(prefix="feddmmr-sim-") as tmp:
        result = _flwr_run(copy_app(Path(tmp) / "app"), Path(tmp) / "home", nodes, run_config, timeout, log)
    run = Path(run_config["output-dir"]) / run_config["run-name"]
    if result["exit_code"] != 0 or not (run / "history.json").is_file():
        raise RuntimeError(f"flwr run failed (exit {result['exit_code']}); see {log or 'its output'}")
    return {**result, "history": json.loads((run / "history.json").read_text())["rounds"]}


def run_noop_simulation(
    nodes: int, sample: int, floats: int, rounds: int = 5, *, timeout: float = 900, log: Path | None = None
) -> list[float]:
    """Seconds per round of Flower's no-op app (benchmarks/noop_app) sending ``floats`` float32 as one
    array to ``sample`` of ``nodes`` nodes and back: Flower's own floor for a round of that size."""
    with tempfile.TemporaryDirectory(prefix="noop-sim-") as tmp:
        app = Path(tmp) / "app"
        shutil.copytree(NOOP_APP, app, ignore=shutil.ignore_patterns("__pycache__"))
        output = Path(tmp) / "noop.json"
        result = _flwr_run(
            app,
            Path(tmp) / "home",
            nodes,
            {
                "rounds": rounds,
                "min-nodes": nodes,
                "output": str(output),
                "payload-arrays": 1 if floats else 0,
                "payload-floats": floats,
                "sample": sample,
            },
            timeout,
            log,
        )
        if result["exit_code"] != 0 or not output.is_file():
            raise RuntimeError(f"no-op flwr run failed (exit {result['exit_code']}); see {log or 'its output'}")
        return json.loads(output.read_text())["round_seconds"]


def steady_rounds(history: list[dict]) -> list[dict]:
    """Rounds after the first (Ray and process start-up), without a validation pass."""
    return [r for r in history[1:] if not r.get("valid_requested") and not r.get("valid")]


def summarise_py_spy(raw: Path, top: int = 12) -> dict:
    """Top frames (own and inclusive share of samples) of a ``py-spy record -f raw`` file."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            if "threading.py" not in frame and "concurrent/futures" not in frame:  # every thread's own frames
                inclusive[frame] = inclusive.get(frame, 0) + n

    def share(table: dict[str, int]) -> list[dict]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])
        return [{"frame": frame, "share": round(n / total, 3)} for frame, n in rows[:top] if total]

    return {"samples": total, "top_own": share(own), "top_inclusive": share(inclusive)}


class DriverProfile(threading.Thread):
    """py-spy (if installed) on the simulation driver for ``seconds``, once ``log`` shows round ``after``."""

    def __init__(self, log: Path, seconds: float, out: Path, after: int = 1) -> None:
        super().__init__(daemon=True)
        self.log, self.seconds, self.out, self.after = log, seconds, out, after
        self.summary: dict | None = None

    def run(self) -> None:
        spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
        if spy is None:
            self.summary = {"error": "py-spy not installed (pip install py-spy)"}
            return
        deadline = time.time() + 3600
        while time.time() < deadline:
            if self.log.is_file() and f"round {self.after}/" in self.log.read_text(errors="replace"):
                break
            time.sleep(1.0)
        pids = processes_matching("flwr-simulation")
        if not pids:
            self.summary = {"error": "no flwr-simulation process"}
            return
        pid = max(pids, key=lambda p: _status_kb(p, "VmRSS") or 0)
        subprocess.run(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(self.seconds)),
                "-r",
                "50",
                "-f",
                "raw",
                "-o",
                str(self.out),
                "--nonblocking",
            ],
            capture_output=True,
            timeout=self.seconds + 60,
        )
        self.summary = summarise_py_spy(self.out) if self.out.is_file() else {"error": "py-spy wrote nothing"}
        self.summary["command"] = (
            f"py-spy record -p <flwr-simulation pid> -d {int(self.seconds)} -r 50 -f raw --nonblocking"
        )
