"""Raw HTTPS requests against a proxy listener, run on a lab host: ``python -m tests.proxy_probe ADDRESS CA``.

Why raw (http.client, not httpx): the request line must reach nginx exactly as written, ``..`` and
``%2F`` included, the way an attacker would send it. Prints one JSON object: probe name -> HTTP
status (or the error's class name when no HTTP answer came back).
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

# name -> (method, raw path, body)
PROBES: dict[str, tuple[str, str, bytes]] = {
    "health": ("GET", "/health", b""),
    "control_list_runs": ("POST", "/v1/control/list-runs", b""),
    "control_start_run": ("POST", "/v1/control/start-run", b""),
    "control_register_node": ("POST", "/v1/control/register-node", b""),
    "runtime_get_nodes": ("POST", "/v1/runtime/get-nodes", b""),
    "docs": ("GET", "/docs", b""),
    "openapi": ("GET", "/openapi.json", b""),
    "fleet_dotdot": ("POST", "/v1/fleet/../control/list-runs", b""),
    "fleet_encoded_dotdot": ("POST", "/v1/fleet/%2E%2E/control/list-runs", b""),
    "fleet_encoded_slash": ("POST", "/v1/fleet/..%2Fcontrol%2Flist-runs", b""),
    "fleet_double_slash": ("POST", "/v1/fleet//../../v1/control/list-runs", b""),
    "fleet_query": ("POST", "/v1/fleet/pull-messages?x=/v1/control/list-runs", b""),
    "fleet_get": ("GET", "/v1/fleet/pull-messages", b""),
    "fleet_unsigned": ("POST", "/v1/fleet/pull-messages", b""),
}


def forged_headers() -> dict[str, str]:
    """SuperNode auth headers, correctly signed (as Flower's SuperNode signs them) by a key the SuperLink
    has never seen: what a rogue node host sends."""
    key = ec.generate_private_key(ec.SECP384R1())
    stamp = dt.datetime.now(dt.UTC).isoformat()
    signature = sign_message(key, stamp.encode("ascii"))
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(signature).decode(),
    }


def request(host: str, port: int, ca: str, method: str, path: str, body: bytes, headers: dict) -> int | str:
    context = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # the path goes out byte for byte
        for name, value in {"content-type": "application/protobuf", **headers}.items():
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        return conn.getresponse().status
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def plain_http(host: str, port: int) -> int | str:
    """A request without TLS to the TLS port."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def main(argv: list[str]) -> None:
    address, ca = argv[0], argv[1]
    host, port = address.rsplit(":", 1)
    out: dict[str, int | str] = {}
    for name, (method, path, body) in PROBES.items():
        out[name] = request(host, int(port), ca, method, path, body, {})
    out["fleet_forged_signature"] = request(
        host, int(port), ca, "POST", "/v1/fleet/pull-messages", b"\x0a\x02\x08\x01", forged_headers()
    )
    out["plain_http"] = plain_http(host, int(port))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
