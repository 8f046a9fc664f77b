"""The nginx reverse proxy in front of the SuperLink: node hosts reach only the Fleet API (issue #19).

Why: Flower 1.41 serves the Fleet (``/v1/fleet/``), Control (``/v1/control/``) and Runtime
(``/v1/runtime/``) APIs on one HTTPS port, and open-source Flower has no accounts on the Control
API. Whoever reaches that port can ``flwr run`` an app, i.e. run code as a ClientApp on every
SuperNode. So the SuperLink listens only where the proxy and its own SuperExec reach it, and nginx
(a real, well-kept proxy; Debian's package on hosts and in CI, the official image in compose)
serves two listeners:

* **node-facing** (public, ``--node-listen``): ``POST /v1/fleet/<rpc>`` and ``GET /health`` only;
  everything else is refused (403 for the Control and Runtime APIs, 404 otherwise). The allow-list
  is also checked on the raw request line, so ``..`` or ``%2F`` tricks cannot reach another API.
* **operator-facing** (``--operator-listen``, default 127.0.0.1): ``POST /v1/control/<rpc>`` and
  ``GET /health``.

Both terminate TLS with the SuperLink's own certificate (``server.pem``: its SANs already name the
public host and localhost) and re-encrypt to the SuperLink, verifying it with ``ca.crt`` (Flower
requires TLS on the SuperLink whenever SuperNode authentication is on). SuperNode authentication
passes through untouched: a SuperNode signs a timestamp per request and sends it in the
``flwr-public-key``, ``flwr-timestamp`` and ``flwr-signature`` headers, which nginx forwards as is
(hyphens, no underscores), and the SuperLink verifies. Bodies are streamed both ways (no request
or response buffering: no temporary files, ``flwr log --stream`` stays live); bodies above
:data:`MAX_BODY` are refused (Flower sends arrays in 5 MB chunks, a FAB is at most 10 MB).

One module makes the configuration for the compose file (:func:`compose_layout`, committed as
:data:`COMPOSE_CONF`), for plain processes (CLI below, ``docs/deploy.md``) and for the tests::

    python -m deploy.proxy --certs deploy/certs/superlink --superlink 127.0.0.1:9092 \\
        --node-listen 0.0.0.0:8000 --operator-listen 127.0.0.1:9093 --run-dir /var/lib/feddmmr-proxy -o nginx.conf
    python -m deploy.proxy --compose -o deploy/nginx.conf          # the file docker-compose.yml mounts
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .certs import DEFAULT_SANS, CertError, subject_alt_names

NODE_PORT = 8000  # node-facing port (the SuperNodes' --superlink port; compose publishes it)
OPERATOR_PORT = 9093  # operator-facing port (Flower's historical Control API port)
SUPERLINK_LOOPBACK_PORT = 9092  # where a plain-process SuperLink listens on its host's loopback (not public)
MAX_BODY = "64m"
CONTAINER_CONF = "/etc/nginx/nginx.conf"
COMPOSE_CONF = "deploy/nginx.conf"
# The official image (Debian-based, maintained by the NGINX team), stable branch; override with
# FEDDMMR_PROXY_IMAGE (e.g. a local image with Debian's nginx where Docker Hub is unreachable).
PROXY_IMAGE = "nginx:1.30"
UPSTREAM_NAME = DEFAULT_SANS[0]  # "superlink": in every SuperLink certificate deploy.certs makes
# Every Fleet and Control RPC of Flower 1.41 (pull-messages, start-run, ...): no dots, slashes or query.
FLEET_PATH = r"^/v1/fleet/[a-z][a-z-]*$"
CONTROL_PATH = r"^/v1/control/[a-z][a-z-]*$"
# One line of the access log (log_format "timed" in render()): listener port, client, method, path,
# status, bytes in, bytes out, total seconds, seconds waiting for the SuperLink ("-" when not proxied).
ACCESS_LOG_LINE = re.compile(
    r'^(?P<port>\d+) (?P<client>\S+) \[[^\]]+\] "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) '
    r"(?P<bytes_in>\d+) (?P<bytes_out>\d+) rt=(?P<seconds>[\d.]+) urt=(?P<upstream>[\d.]+|-) "
)
_UNSAFE = re.compile(r"[\"'\\$;{}#\s]")  # would break out of, or be expanded in, an nginx directive
_UNSAFE_PATH = re.compile(r"[\"'\\$;{}#\x00-\x1f]")


class ProxyError(ValueError):
    """Bad proxy configuration input (message is one line, names the problem)."""


@dataclass(frozen=True)
class ProxyLayout:
    """Everything the nginx configuration depends on.

    ``upstream_name`` is the name checked in the SuperLink's certificate (one of its SANs, whatever
    address nginx dials: nginx matches DNS names only, not IP addresses);
    ``run_dir`` holds the pid file, logs and temporary folders (None: the nginx image's
    defaults, logs to stdout/stderr).
    """

    node_listen: str
    operator_listen: str
    upstream: str
    certificate: str
    certificate_key: str
    ca_certificate: str
    run_dir: str | None = None
    worker_processes: str = "auto"
    max_body: str = MAX_BODY
    upstream_name: str = UPSTREAM_NAME


def split_address(address: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), or a one-line :class:`ProxyError`."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", str(address).strip())
    if not match:
        raise ProxyError(f"{what} {address!r} must be host:port (IPv6 as [addr]:port)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ProxyError(f"{what} {address!r}: port must be from 1 to 65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProxyError(f"{what} {address!r}: {host!r} is not an IPv6 address") from None
    elif host != "*":
        try:
            subject_alt_names([host], include_defaults=False)
        except CertError as exc:
            raise ProxyError(f"{what}: {exc}") from None
    return host, port


def _check(layout: ProxyLayout) -> None:
    addresses = {
        "node-facing address": layout.node_listen,
        "operator-facing address": layout.operator_listen,
        "SuperLink address": layout.upstream,
    }
    for what, address in addresses.items():
        split_address(address, what)
    if split_address(layout.node_listen, "") == split_address(layout.operator_listen, ""):
        raise ProxyError("the node-facing and operator-facing addresses must differ")
    for what, value in (("SuperLink TLS name", layout.upstream_name), ("worker_processes", layout.worker_processes)):
        if not value or _UNSAFE.search(value):
            raise ProxyError(f"{what} {value!r} is empty or holds characters nginx would misread")
    paths = {
        "certificate": layout.certificate,
        "certificate key": layout.certificate_key,
        "CA certificate": layout.ca_certificate,
    }
    if layout.run_dir is not None:
        paths["run dir"] = layout.run_dir
    for what, path in paths.items():
        if not str(path).startswith("/") or _UNSAFE_PATH.search(str(path)):
            raise ProxyError(f"{what} path {path!r} must be absolute, without quotes, '$', ';', '{{', '}}' or '#'")
    if not re.fullmatch(r"\d+[km]?", layout.max_body):
        raise ProxyError(f"max body size {layout.max_body!r} must be a number with an optional k or m suffix")


def _location(path: str, methods: str, *, raw_check: str | None = None) -> list[str]:
    lines = [f"        location {path} {{"]
    if raw_check:  # the raw request line, before nginx decodes %XX and resolves '..'
        lines.append(f'            if ($request_uri !~ "{raw_check}") {{ return 404; }}')
    lines += [
        f"            limit_except {methods} {{ deny all; }}",
        "            proxy_pass https://superlink;",
        "        }",
    ]
    return lines


def _server(listen: str, name: str, allowed: list[list[str]], refused: list[str]) -> list[str]:
    lines = [
        f"    # {name}",
        "    server {",
        f"        listen {listen} ssl;",
        "        location / { return 404; }",
    ]
    for prefix in refused:
        lines.append(f'        location {prefix} {{ return 403 "{prefix} is not served on this address\\n"; }}')
    for block in allowed:
        lines += block
    return lines + ["    }"]


def render(layout: ProxyLayout) -> str:
    """The complete ``nginx.conf`` (an ``http`` block with the two servers)."""
    _check(layout)
    run = layout.run_dir
    if run is None:  # in the container: the image's pid and temp paths, logs to the container's output
        top = ["pid /tmp/nginx.pid;", "error_log /dev/stderr notice;"]
        access, temp = "/dev/stdout", []
    else:
        top = [f'pid "{run}/nginx.pid";', f'error_log "{run}/error.log" notice;']
        access = f'"{run}/access.log"'
        temp = [f'    {kind}_temp_path "{run}/{kind}_temp";' for kind in ("client_body", "proxy")]
        temp += [f'    {kind}_temp_path "{run}/{kind}_temp";' for kind in ("fastcgi", "uwsgi", "scgi")]
    health = _location("= /health", "GET")
    fleet = _location("/v1/fleet/", "POST", raw_check=FLEET_PATH)
    control = _location("/v1/control/", "POST", raw_check=CONTROL_PATH)
    lines = [
        "# GENERATED by deploy/proxy.py (python -m deploy.proxy); see docs/deploy.md.",
        "# Node hosts reach only the Fleet API; the Control API only on the operator-facing address.",
        f"worker_processes {layout.worker_processes};",
        *top,
        "",
        "events { worker_connections 4096; }",
        "",
        "http {",
        "    default_type text/plain;",
        "    server_tokens off;",
        "    # per request: listener port, client, bytes in/out, total time and time waiting for the SuperLink",
        "    log_format timed '$server_port $remote_addr [$time_local] \"$request\" $status $request_length $bytes_sent '",
        "                     'rt=$request_time urt=$upstream_response_time uct=$upstream_connect_time';",
        f"    access_log {access} timed;",
        *temp,
        "",
        "    # TLS towards SuperNodes and the operator: the SuperLink's own certificate",
        f'    ssl_certificate "{layout.certificate}";',
        f'    ssl_certificate_key "{layout.certificate_key}";',
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        "    ssl_session_cache shared:tls:10m;",
        "",
        "    # TLS towards the SuperLink, verified against the deployment's CA; connections are kept open",
        "    upstream superlink {",
        f"        server {layout.upstream};",
        "        keepalive 32;",
        "    }",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Proto https;",
        "    proxy_ssl_verify on;",
        f'    proxy_ssl_trusted_certificate "{layout.ca_certificate}";',
        f"    proxy_ssl_name {layout.upstream_name};",
        "    proxy_ssl_server_name on;",
        "    proxy_ssl_protocols TLSv1.2 TLSv1.3;",
        "    proxy_ssl_session_reuse on;",
        "",
        "    # Stream bodies both ways: nothing on disk, live log streams; cap what a node may upload",
        f"    client_max_body_size {layout.max_body};",
        "    proxy_request_buffering off;",
        "    proxy_buffering off;",
        "    proxy_read_timeout 1h;",
        "    proxy_send_timeout 5m;",
        "",
        *_server(
            layout.node_listen,
            "node-facing: SuperNodes (Fleet API) and health checks",
            [fleet, health],
            ["/v1/control/", "/v1/runtime/"],
        ),
        "",
        *_server(
            layout.operator_listen,
            "operator-facing: the flwr CLI (Control API)",
            [control, health],
            ["/v1/fleet/", "/v1/runtime/"],
        ),
        "}",
    ]
    return "\n".join(lines) + "\n"


def compose_layout() -> ProxyLayout:
    """The proxy container of docker-compose.yml: certificates under /certs, the SuperLink service
    ``superlink`` (a SAN of its certificate) on the SuperLink's private network."""
    return ProxyLayout(
        node_listen=f"0.0.0.0:{NODE_PORT}",
        operator_listen=f"0.0.0.0:{OPERATOR_PORT}",  # compose publishes it on the host's 127.0.0.1 only
        upstream=f"superlink:{NODE_PORT}",
        certificate="/certs/server.pem",
        certificate_key="/certs/server.key",
        ca_certificate="/certs/ca.crt",
    )


def process_layout(
    certs: str | Path,
    superlink: str,
    node_listen: str,
    operator_listen: str = f"127.0.0.1:{OPERATOR_PORT}",
    run_dir: str | Path | None = None,
    workers: str = "auto",
) -> ProxyLayout:
    """A proxy beside a plain-process SuperLink: ``certs`` is deploy.certs' ``superlink/`` folder."""
    certs = Path(certs).resolve()
    return ProxyLayout(
        node_listen=node_listen,
        operator_listen=operator_listen,
        upstream=superlink,
        certificate=str(certs / "server.pem"),
        certificate_key=str(certs / "server.key"),
        ca_certificate=str(certs / "ca.crt"),
        run_dir=str(Path(run_dir).resolve()) if run_dir is not None else None,
        worker_processes=workers,
    )


def nginx_command(conf: str | Path, run_dir: str | Path, nginx: str = "nginx") -> list[str]:
    """nginx in the foreground with this configuration only (no system paths; stop it with SIGQUIT)."""
    run = Path(run_dir).resolve()
    return [nginx, "-p", str(run), "-c", str(Path(conf).resolve()), "-e", str(run / "error.log"), "-g", "daemon off;"]


def write_config(layout: ProxyLayout, path: str | Path) -> Path:
    """Render ``layout`` to ``path`` (and create its run dir, owner-only: it holds the logs)."""
    text = render(layout)
    if layout.run_dir is not None:
        Path(layout.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.proxy",
        description="Write the nginx configuration that serves only the Fleet API to node hosts "
        "and the Control API only to the operator.",
    )
    parser.add_argument("--compose", action="store_true", help=f"the compose file's proxy ({COMPOSE_CONF})")
    parser.add_argument("--certs", help="deploy.certs' superlink/ folder (server.pem, server.key, ca.crt)")
    parser.add_argument(
        "--superlink",
        default=f"127.0.0.1:{SUPERLINK_LOOPBACK_PORT}",
        help="where the SuperLink listens (its --host:--port)",
    )
    parser.add_argument("--node-listen", default=f"0.0.0.0:{NODE_PORT}", help="node-facing address (public)")
    parser.add_argument(
        "--operator-listen", default=f"127.0.0.1:{OPERATOR_PORT}", help="operator-facing address (loopback or VPN)"
    )
    parser.add_argument("--run-dir", help="pid file, logs and temporary folders (created)")
    parser.add_argument("--workers", default="auto", help="nginx worker_processes")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        if args.compose:
            layout = compose_layout()
        else:
            if not args.certs:
                raise ProxyError("--certs is required: the SuperLink's certificate folder (deploy/certs/superlink)")
            if not args.run_dir:
                raise ProxyError("--run-dir is required: a folder for nginx's pid file, logs and temporary files")
            for name in ("server.pem", "server.key", "ca.crt"):
                if not (Path(args.certs) / name).is_file():
                    raise ProxyError(f"{Path(args.certs) / name} not found (make it with python -m deploy.certs)")
            layout = process_layout(
                args.certs, args.superlink, args.node_listen, args.operator_listen, args.run_dir, args.workers
            )
        if args.output:
            write_config(layout, args.output)
        else:
            sys.stdout.write(render(layout))
    except ProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
