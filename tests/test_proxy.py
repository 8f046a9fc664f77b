"""The nginx proxy in front of the SuperLink (issue #19), on this machine's loopback: a real
SuperLink (TLS, SuperNode authentication) and real nginx processes with deploy/proxy.py's
configuration. What a node host can reach is checked from its own network namespace in
test_deployment.py; here, what each listener routes where, request by request, whatever the
request line looks like, that the proxy checks the SuperLink's certificate, and that the compose
files (resolved by the real ``docker-compose config``) publish nothing but the proxy.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import ssl
import subprocess
import sys

import pytest

from deploy import compose, proxy
from deploy.certs import make_ca_and_server_cert

from . import test_compose
from .deployment_lab import Deployment, require_nginx
from .flwr_utils import REPO, free_port, processes_matching
from .netlab import NetLab, wait_for_line
from .test_compose import COMMITTED, generate, mounts, resolved

compose_tool = test_compose.compose_tool  # the fixture: docker-compose v1 (and v2 where installed)

pytestmark = [pytest.mark.deployment]


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A SuperLink with the proxy in front, on loopback; yields the Deployment."""
    require_nginx()
    root = tmp_path_factory.mktemp("proxy")
    deployment = Deployment(root, NetLab(use_namespaces=False), 1)
    try:
        deployment.start_superlink()
        yield deployment
    finally:
        deployment.close()
    assert processes_matching(str(root)) == []


def probe(address: str, ca) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.proxy_probe", address, str(ca)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_nginx(deployment: Deployment, name: str, layout: proxy.ProxyLayout) -> None:
    conf = proxy.write_config(layout, deployment.root / name / "nginx.conf")
    deployment.start(name, deployment.link, proxy.nginx_command(conf, deployment.root / name, require_nginx()))
    wait_for_line(deployment.root / name / "error.log", "start worker process", timeout=30)


def published(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port), short (v1) and long (v2) port syntax."""
    out = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out[int(entry["target"])] = (entry.get("host_ip", ""), int(entry["published"]))
        else:
            *host, port, target = str(entry).split("/")[0].split(":")
            out[int(target)] = (host[0] if host else "", int(port))
    return out


def check_isolation(config: dict, public_port: int = 8000) -> None:
    """Only the proxy is published (the Control API on the host's loopback); the SuperLink and its
    SuperExec sit on an internal network that no node service joins."""
    services = config["services"]
    assert config["networks"][compose.LINK_NETWORK].get("internal") is True
    assert set(services["superlink"]["networks"]) == {compose.LINK_NETWORK}
    assert set(services["superexec-serverapp"]["networks"]) == {compose.LINK_NETWORK}
    edge = services["superlink-proxy"]
    assert set(edge["networks"]) == {"default", compose.LINK_NETWORK}
    assert published(edge) == {
        proxy.NODE_PORT: ("", public_port),
        proxy.OPERATOR_PORT: ("127.0.0.1", proxy.OPERATOR_PORT),
    }
    source, mode = mounts(edge)[proxy.CONTAINER_CONF]
    assert mode == "ro" and source.endswith(proxy.COMPOSE_CONF)
    for name, svc in services.items():
        assert name == "superlink-proxy" or "ports" not in svc, f"{name} must not be published"
        if name.startswith(("supernode-", "superexec-clientapp-")):
            assert compose.LINK_NETWORK not in (svc.get("networks") or {}), f"{name} must not reach the SuperLink"


def test_compose_files_publish_only_the_proxy(compose_tool, tmp_path):
    check_isolation(resolved(compose_tool, COMMITTED))
    base = generate(tmp_path, "--nodes", "2", "--host", "superlink.example.org", "--port", "9443")
    check_isolation(resolved(compose_tool, base), public_port=9443)
    # the operator's Control API can move to an address only the operator reaches (e.g. a VPN)
    vpn = resolved(compose_tool, base, env={"SUPERLINK_CONTROL_ADDRESS": "10.8.0.1:9443"})
    assert published(vpn["services"]["superlink-proxy"])[proxy.OPERATOR_PORT] == ("10.8.0.1", 9443)


def test_committed_compose_config_is_the_generator_output():
    assert (REPO / proxy.COMPOSE_CONF).read_text() == proxy.render(proxy.compose_layout()), (
        f"{proxy.COMPOSE_CONF} differs from the generator: python -m deploy.proxy --compose -o {proxy.COMPOSE_CONF}"
    )


def test_node_facing_address_serves_only_the_fleet_api(link):
    got = probe(link.public_address, link.certs.ca / "ca.crt")
    refused = {k: v for k, v in got.items() if k.startswith(("control_", "runtime_", "fleet_", "docs", "openapi"))}
    # the Fleet API reaches the SuperLink, whose SuperNode authentication refuses unsigned/unknown nodes
    assert refused.pop("fleet_unsigned") == 401 and refused.pop("fleet_forged_signature") == 401
    assert got["health"] == 200 and got["plain_http"] == 400
    assert all(status in (403, 404) for status in refused.values()), refused
    for api in ("control_list_runs", "control_start_run", "control_register_node", "runtime_get_nodes"):
        assert got[api] == 403, api
    # nothing refused ever reached the SuperLink: no upstream time in nginx's log for those requests
    port = link.public_address.rsplit(":", 1)[1]
    lines = [line for line in (link.root / "proxy" / "access.log").read_text().splitlines() if line.startswith(port)]
    assert len(lines) == len(got)  # every probe was answered (and logged) by the node-facing listener
    for line in lines:
        entry = proxy.ACCESS_LOG_LINE.match(line)
        assert entry, line
        if entry["status"] in ("400", "403", "404"):
            assert entry["upstream"] == "-", line


def test_operator_facing_address_serves_only_the_control_api(link):
    got = probe(link.operator_address, link.certs.ca / "ca.crt")
    assert got["health"] == 200 and got["control_list_runs"] == 200  # reached the SuperLink's Control API
    assert got["runtime_get_nodes"] == 403 and got["fleet_unsigned"] == 403 and got["fleet_get"] == 403
    assert got["docs"] == 404 and got["openapi"] == 404


def test_uploads_above_the_cap_are_refused_before_the_superlink(link):
    host, port = link.public_address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(link.certs.ca / "ca.crt")), timeout=30
    )
    try:
        conn.putrequest("POST", "/v1/fleet/push-object")
        conn.putheader("content-length", str(65 * 2**20))  # > MAX_BODY (64m); the body is never sent
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_proxy_refuses_a_superlink_whose_certificate_it_cannot_verify(link, tmp_path):
    """TLS holds on the proxy -> SuperLink leg too: with another CA's certificate to check against,
    nginx answers 502 instead of talking to the SuperLink."""
    other = make_ca_and_server_cert(tmp_path / "other-ca", ["localhost"])
    port = free_port()
    layout = proxy.process_layout(
        link.certs.superlink,
        f"127.0.0.1:{link.port}",
        node_listen=f"127.0.0.1:{port}",
        operator_listen=f"127.0.0.1:{free_port()}",
        run_dir=link.root / "proxy-other-ca",
        workers="1",
    )
    start_nginx(link, "proxy-other-ca", dataclasses.replace(layout, ca_certificate=str(other.ca_cert)))
    assert probe(f"127.0.0.1:{port}", link.certs.ca / "ca.crt")["health"] == 502
    assert "upstream SSL certificate verify error" in (link.root / "proxy-other-ca" / "error.log").read_text()


def test_compose_variant_is_a_valid_nginx_config(link, tmp_path):
    """The compose layout (logs to stdout/stderr, image paths) with this machine's files: ``nginx -t``."""
    layout = dataclasses.replace(
        proxy.compose_layout(),
        upstream=f"127.0.0.1:{link.port}",
        certificate=str(link.certs.superlink / "server.pem"),
        certificate_key=str(link.certs.superlink / "server.key"),
        ca_certificate=str(link.certs.superlink / "ca.crt"),
        node_listen=f"127.0.0.1:{free_port()}",
        operator_listen=f"127.0.0.1:{free_port()}",
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(proxy.render(layout))
    done = subprocess.run(
        [require_nginx(), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--certs is required"),
        (["--certs", "CERTS"], "--run-dir is required"),
        (["--certs", "/nonexistent", "--run-dir", "/tmp/x"], "server.pem not found"),
        (["--certs", "CERTS", "--run-dir", "/tmp/x", "--node-listen", "8000"], "must be host:port"),
        (["--certs", "CERTS", "--run-dir", "/tmp/x", "--node-listen", "h:70000"], "port must be from 1 to 65535"),
        (["--certs", "CERTS", "--run-dir", "/tmp/x", "--superlink", "bad host:1"], "not a valid DNS name"),
        (["--certs", "CERTS", "--run-dir", "/tmp/x;", "--workers", "1"], "must be absolute, without quotes"),
        (["--certs", "CERTS", "--run-dir", "/tmp/x", "--workers", "1; user root"], "characters nginx would misread"),
        (
            ["--certs", "CERTS", "--run-dir", "/tmp/x", "--node-listen", "127.0.0.1:9093"],
            "must differ",
        ),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, message, tmp_path):
    certs = tmp_path / "certs"
    make_ca_and_server_cert(certs, ["h"])
    done = subprocess.run(
        [sys.executable, "-m", "deploy.proxy", *[str(certs) if a == "CERTS" else a for a in args]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_cli_writes_a_config_nginx_accepts(tmp_path):
    certs = tmp_path / "certs"
    make_ca_and_server_cert(certs, ["h"])
    conf, run = tmp_path / "nginx.conf", tmp_path / "run"
    argv = ["--certs", str(certs), "--run-dir", str(run), "--node-listen", f"127.0.0.1:{free_port()}", "-o", str(conf)]
    done = subprocess.run(
        [sys.executable, "-m", "deploy.proxy", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    check = subprocess.run(
        [*proxy.nginx_command(conf, run, require_nginx())[:-2], "-t"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr
