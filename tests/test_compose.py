"""Deployment files: the compose generator, the committed compose files and the certificate tools.

The compose files are checked by the real ``docker-compose config`` (Debian's v1.29, and
``docker compose`` v2 where installed), which validates the schema, merges the GPU override and
resolves variables and paths; the assertions read that resolved configuration. Certificates are
checked with a real TLS handshake (Python's ssl) and by loading the keys the way Flower does.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy import compose
from deploy.certs import CertError, make_ca_and_server_cert, make_deployment, make_node_keys

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docker-compose.yml"
COMMITTED_GPU = REPO / "docker-compose.gpu.yml"
# Variables the compose files read: unset, so the defaults written in the files apply.
COMPOSE_VARS = (
    "SUPERLINK_ADDRESS",
    "SUPERLINK_PORT",
    "FEDDMMR_CERTS_DIR",
    "FEDDMMR_NODES_DIR",
    "FEDDMMR_SERVER_DIR",
    "FEDDMMR_IMAGE_TAG",
    "FEDDMMR_PROXY_IMAGE",
    "SUPERLINK_CONTROL_ADDRESS",
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
)


def _compose_tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            tools.append(["docker", "compose"])
    return tools


TOOLS = _compose_tools()


@pytest.fixture(params=[" ".join(t) for t in TOOLS] or ["docker-compose"])
def compose_tool(request) -> list[str]:
    if not TOOLS:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (CI must install it: apt-get install -y docker-compose)")
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return request.param.split()


def resolved(tool: list[str], *files: Path, env: dict[str, str] | None = None) -> dict:
    """``<tool> -f a [-f b] config`` parsed: the configuration compose would run."""
    run_env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    run_env.update(env or {})
    cmd = [*tool, *[arg for f in files for arg in ("-f", str(f))], "config"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=files[0].parent, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def generate(folder: Path, *args: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / ("docker-compose.gpu.yml" if "--gpu-override" in args else "docker-compose.yml")
    assert compose.main([*args, "--output", str(out)]) == 0
    return out


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def node_config(service: dict) -> dict:
    """The SuperNode's --node-config, parsed by Flower's own parser (as flower-supernode does)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([flag(service["command"], "--node-config")])


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) for short (v1) and long (v2) volume syntax."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, dict):
            out[vol["target"]] = (vol["source"], "ro" if vol.get("read_only") else "rw")
        else:
            source, target, *mode = vol.split(":")
            out[target] = (source, mode[0] if mode else "rw")
    return out


def by_image(config: dict, prefix: str) -> dict[str, dict]:
    return {name: svc for name, svc in config["services"].items() if str(svc.get("image", "")).startswith(prefix)}


def check_layout(config: dict, nodes: int, gpu: bool = False) -> None:
    """One TLS SuperLink with SuperNode auth, N authenticated TLS SuperNodes with distinct
    partitions, keys, data and state, one ClientApp SuperExec per SuperNode."""
    links = by_image(config, "flwr/superlink:")
    assert list(links) == ["superlink"]
    link = links["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert flag(link, "--isolation") == "process"
    link_mounts = mounts(links["superlink"])
    for opt in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--superexec-auth-secret-file"):
        source, mode = link_mounts[flag(link, opt)]
        assert mode == "ro", f"{opt} file must be mounted read-only"
    # state database: relative to /app, which is a named volume (survives container re-creation)
    assert not flag(link, "--database").startswith("/") and link_mounts["/app"][0] in config["volumes"]

    server = config["services"]["superexec-serverapp"]["command"]
    assert flag(server, "--runtime-api-address") == "superlink:8000" and "--insecure" not in server
    assert flag(server, "--root-certificates") in mounts(config["services"]["superexec-serverapp"])

    supernodes = by_image(config, "flwr/supernode:")
    assert len(supernodes) == nodes
    partitions, keys = set(), set()
    for name, svc in supernodes.items():
        cmd = svc["command"]
        assert "--insecure" not in cmd and flag(cmd, "--isolation") == "process"
        own = mounts(svc)
        assert own[flag(cmd, "--root-certificates")][1] == "ro"
        key_source, key_mode = own[flag(cmd, "--auth-supernode-private-key")]
        assert key_mode == "ro"
        keys.add(key_source)
        cfg = node_config(svc)
        assert cfg["num-partitions"] == nodes
        assert (cfg["data-dir"], cfg["state-dir"]) == ("/data", "/state")
        assert (cfg.get("device") == "cuda") == gpu
        partitions.add(cfg["partition-id"])
        assert name == f"supernode-{cfg['partition-id']}"
    assert partitions == set(range(nodes)), "partition ids must be 0..N-1, each once"
    assert len(keys) == nodes, "every SuperNode needs its own auth key"

    data, state = set(), set()
    for i in range(nodes):
        svc = config["services"][f"superexec-clientapp-{i}"]
        assert flag(svc["command"], "--runtime-api-address") == f"supernode-{i}:{compose.NODE_RUNTIME_PORT}"
        own = mounts(svc)
        assert own["/data"][1] == "ro"
        data.add(own["/data"][0])
        state.add(own["/state"][0])
        assert own["/state"][0] in config["volumes"], "client state must live on a named volume"
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if gpu:
            assert any("gpu" in d.get("capabilities", []) for d in devices), f"no GPU reservation for {i}"
        else:
            assert not devices
    assert len(data) == nodes and len(state) == nodes, "every node needs its own data folder and state volume"


# ------------------------------------------------------------------ generator


def test_committed_files_are_the_generator_output(tmp_path):
    args = ["--nodes", str(compose.DEFAULT_NODES), "--host", compose.DEFAULT_HOST]
    assert generate(tmp_path, *args).read_text() == COMMITTED.read_text(), (
        "docker-compose.yml differs from the generator: python -m deploy.compose "
        + " ".join(args)
        + " -o docker-compose.yml"
    )
    assert generate(tmp_path, *args, "--gpu-override").read_text() == COMMITTED_GPU.read_text(), (
        "docker-compose.gpu.yml differs: python -m deploy.compose "
        + " ".join(args)
        + " --gpu-override -o docker-compose.gpu.yml"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0", "--host", "h"], "--nodes must be an integer from 1"),
        (["--nodes", "-3", "--host", "h"], "--nodes must be an integer from 1"),
        (["--nodes", "2"], "--host is required"),
        (["--host", "h"], "--nodes is required"),
        (["--nodes", "2", "--host", "https://h:8000"], "must be a bare name or IP address"),
        (["--nodes", "2", "--host", "bad host"], "not a valid DNS name"),
        (["--nodes", "2", "--host", "h", "--port", "70000"], "--port must be from 1 to 65535"),
    ],
)
def test_generator_rejects_bad_input_in_one_line(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "deploy.compose", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_generator_bakes_in_host_and_port(tmp_path):
    doc = yaml.safe_load(generate(tmp_path, "--nodes", "2", "--host", "10.1.2.3", "--port", "9443").read_text())
    assert doc["services"]["superlink-proxy"]["ports"][0] == "${SUPERLINK_PORT:-9443}:8000"
    for i in range(2):
        assert (
            flag(doc["services"][f"supernode-{i}"]["command"], "--superlink") == "${SUPERLINK_ADDRESS:-10.1.2.3:9443}"
        )


# ------------------------------------------------------------------ docker-compose config


@pytest.mark.parametrize("nodes", [1, 4])
def test_generated_compose_resolves_to_the_layout(compose_tool, tmp_path, nodes):
    base = generate(tmp_path, "--nodes", str(nodes), "--host", "superlink.example.org")
    config = resolved(compose_tool, base)
    check_layout(config, nodes)
    # default: SuperNodes dial the public host; SUPERLINK_ADDRESS re-points them (one-host trial)
    assert flag(config["services"]["supernode-0"]["command"], "--superlink") == "superlink.example.org:8000"
    one_host = resolved(compose_tool, base, env={"SUPERLINK_ADDRESS": "superlink-proxy:8000"})
    assert flag(one_host["services"][f"supernode-{nodes - 1}"]["command"], "--superlink") == "superlink-proxy:8000"
    # --gpu: one file with the override built in
    check_layout(
        resolved(compose_tool, generate(tmp_path / "gpu", "--nodes", str(nodes), "--host", "h", "--gpu")),
        nodes,
        gpu=True,
    )


def test_committed_files_and_gpu_override_resolve(compose_tool):
    nodes = compose.DEFAULT_NODES
    check_layout(resolved(compose_tool, COMMITTED), nodes)
    merged = resolved(compose_tool, COMMITTED, COMMITTED_GPU)
    check_layout(merged, nodes, gpu=True)
    for i in range(nodes):
        svc = merged["services"][f"superexec-clientapp-{i}"]
        assert svc["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
        assert svc["image"].endswith("-gpu")
    assert "deploy" not in merged["services"]["superlink"]


def test_certificate_layout_matches_compose_mounts(compose_tool, tmp_path):
    """Every certificate, key and secret the compose files mount is what deploy.certs writes."""
    project = tmp_path / "project"
    base = generate(project, "--nodes", "3", "--host", "superlink.example.org")
    made = make_deployment(project / "deploy" / "certs", ["superlink.example.org"], 3)
    config = resolved(compose_tool, base)
    certs_root = str(project / "deploy" / "certs")
    checked = 0
    for svc in config["services"].values():
        for source, _mode in mounts(svc).values():
            if source.startswith(certs_root):
                assert Path(source).is_file(), f"compose mounts {source}, which deploy.certs did not write"
                checked += 1
    assert checked == 4 + 3 + 2 + 3 * 4  # superlink 4, proxy 3, serverapp 2, per node 3 (supernode) + 1 (clientapp)
    assert not (made.superlink / "ca.key").exists(), "the CA key must not sit with the SuperLink's files"


# ------------------------------------------------------------------ certificates and keys


def _tls_handshake(certs, server_name: str, ca_file: Path) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


def test_server_certificate_passes_tls_for_its_names_only(tmp_path):
    certs = make_ca_and_server_cert(tmp_path, ["superlink.example.org", "10.0.0.7"])
    for name in ("superlink.example.org", "superlink", "superlink-proxy", "localhost", "127.0.0.1", "10.0.0.7"):
        _tls_handshake(certs, name, certs.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, "other.example.org", certs.ca_cert)
    other = make_ca_and_server_cert(tmp_path / "other", ["superlink.example.org"])
    with pytest.raises(ssl.SSLCertVerificationError):  # a certificate from another CA is refused
        _tls_handshake(certs, "superlink.example.org", other.ca_cert)
    for path in (certs.ca_key, certs.server_key):
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} must not be readable by others"


def test_existing_ca_is_not_replaced_silently(tmp_path):
    make_ca_and_server_cert(tmp_path, ["h"])
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertError, match="already holds"):
        make_ca_and_server_cert(tmp_path, ["h"])
    make_ca_and_server_cert(tmp_path, ["h"], overwrite=True)
    assert (tmp_path / "ca.crt").read_bytes() != before
    with pytest.raises(CertError, match="bare name"):
        make_ca_and_server_cert(tmp_path / "x", ["h:8000"])


def test_node_keys_are_the_format_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pairs = make_node_keys(tmp_path, 3)
    assert [p.name for p, _ in pairs] == ["node-0.key", "node-1.key", "node-2.key"]
    publics = set()
    for private, public in pairs:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)  # as flower-supernode
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert private.stat().st_mode & 0o077 == 0
        # `flwr supernode register` loads the public half of exactly this private key
        assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
        publics.add(public.read_bytes())
    assert len(publics) == 3
    # re-running keeps existing pairs (they may be registered already) and adds the missing ones
    again = make_node_keys(tmp_path, 4)
    assert [pub.read_bytes() for _, pub in again[:3]] == [pub.read_bytes() for _, pub in pairs]
    with pytest.raises(CertError, match="positive integer"):
        make_node_keys(tmp_path, 0)


def test_certs_cli_writes_the_per_host_layout(tmp_path):
    out = tmp_path / "certs"
    done = subprocess.run(
        [sys.executable, "-m", "deploy.certs", "--host", "superlink.example.org", "--nodes", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "superlink").iterdir()) == [
        "ca.crt",
        "server.key",
        "server.pem",
        "superexec.secret",
    ]
    for i in range(2):
        assert sorted(p.name for p in (out / "nodes" / f"node-{i}").iterdir()) == [
            "ca.crt",
            "node.key",
            "node.pub",
            "superexec.secret",
        ]
    cert = x509.load_pem_x509_certificate((out / "superlink" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in sans.get_values_for_type(x509.DNSName)
    # a second run for a host the certificate lacks fails in one line instead of mismatching
    done = subprocess.run(
        [sys.executable, "-m", "deploy.certs", "--host", "other.org", "--nodes", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "other.org" in done.stderr
