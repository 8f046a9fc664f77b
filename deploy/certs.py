"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

Why Python and not an openssl script: the deployment test imports these functions, and
``cryptography`` is already installed with flwr. What Flower 1.41 expects:

* SuperLink: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``. One
  HTTPS port serves the Fleet, Control and Runtime APIs; the nginx proxy in front of it
  (``deploy/proxy.py``) presents the same certificate. So it must name every address either is
  reached at: the public host name the SuperNodes dial, ``superlink`` (the compose service its
  SuperExec dials, and the name the proxy checks), ``superlink-proxy`` (what SuperNodes dial when
  everything runs on one host) and localhost for ``flwr`` on the host itself.
* SuperNode / SuperExec / ``flwr`` CLI: the CA certificate (``--root-certificates``,
  ``root-certificates = "/abs/path/ca.crt"`` in ``$FLWR_HOME/config.toml``).
* SuperNode authentication: an EC key pair on a NIST curve; the private key in OpenSSH format
  (``--auth-supernode-private-key``), the public key in OpenSSH format registered on the SuperLink
  with ``flwr supernode register node.pub <connection>``.
* SuperExec authentication (experimental in 1.41): a shared secret file read as raw bytes by a
  SuperLink/SuperNode and its SuperExec (``--superexec-auth-secret-file``). The SuperLink's Runtime
  API shares its port: the proxy keeps node hosts away from it, the secret keeps out anything else
  that reaches the SuperLink (other processes on its host or network) from pulling ServerApp tasks.

CLI: ``python -m deploy.certs --host superlink.example.org --nodes 3 [--out deploy/certs] [--force]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Always in the server certificate: the compose service names and the loopback addresses.
DEFAULT_SANS = ("superlink", "superlink-proxy", "localhost", "127.0.0.1", "::1")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class CertError(ValueError):
    """Bad input for certificate generation (message is one line, names the problem)."""


@dataclass(frozen=True)
class ServerCerts:
    """Paths of the CA and SuperLink server material written by :func:`make_ca_and_server_cert`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def check_host(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise CertError("empty host name: pass the name or IP address SuperNodes use to reach the SuperLink")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if "://" in host or "/" in host or ":" in host:
        raise CertError(f"host {host!r} must be a bare name or IP address (no scheme, port or path)")
    if not _HOSTNAME.match(host):
        raise CertError(f"host {host!r} is not a valid DNS name or IP address")
    return x509.DNSName(host.rstrip(".").lower())


def subject_alt_names(hosts: list[str], include_defaults: bool = True) -> list[x509.GeneralName]:
    """The server certificate's SANs: ``hosts`` first, then :data:`DEFAULT_SANS`, without duplicates."""
    if isinstance(hosts, str):
        hosts = [hosts]
    names: list[x509.GeneralName] = []
    for host in [*hosts, *(DEFAULT_SANS if include_defaults else ())]:
        name = check_host(host)
        if name not in names:
            names.append(name)
    if not names:
        raise CertError("no host names given for the SuperLink certificate")
    return names


def _write(path: Path, data: bytes, private: bool) -> Path:
    """Write atomically; private material is created 0600 (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca_and_server_cert(
    out_dir: str | Path, hosts: list[str], days: int = 365, *, include_defaults: bool = True, overwrite: bool = False
) -> ServerCerts:
    """A self-signed CA (``ca.crt``/``ca.key``) and a SuperLink certificate it signs
    (``server.pem``/``server.key``) whose SANs are ``hosts`` plus superlink/localhost/127.0.0.1/::1.

    Refuses to replace an existing CA unless ``overwrite``: every node holds a copy of ``ca.crt``.
    """
    if days < 1:
        raise CertError(f"days must be >= 1, got {days}")
    sans = subject_alt_names([hosts] if isinstance(hosts, str) else list(hosts), include_defaults)
    out = Path(out_dir)
    paths = ServerCerts(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    existing = [p.name for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise CertError(
            f"{out} already holds {', '.join(existing)}; pass --force (overwrite=True) to replace "
            "them (then every node needs the new ca.crt)"
        )

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedDMMR"),
            x509.NameAttribute(NameOID.COMMON_NAME, "FedDMMR deployment CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    first = sans[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedDMMR"),
                    x509.NameAttribute(NameOID.COMMON_NAME, str(first)),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def make_node_key(
    private_path: str | Path, public_path: str | Path | None = None, comment: str = ""
) -> tuple[Path, Path]:
    """One SuperNode key pair (EC P-384, OpenSSH format); an existing pair is kept, not replaced,
    because its public key may already be registered on the SuperLink."""
    private = Path(private_path)
    public = Path(public_path) if public_path is not None else private.with_suffix(".pub")
    if private.exists() and public.exists():
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{private} is not an EC private key (Flower needs a NIST EC curve)")
        return private, public
    if private.exists() != public.exists():
        raise CertError(
            f"only one of {private.name}/{public.name} exists in {private.parent}; delete it to "
            "generate a new pair (and register the new public key)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public, line + (f" {comment}".encode() if comment else b"") + b"\n", private=False)
    return private, public


def make_node_keys(out_dir: str | Path, n: int) -> list[tuple[Path, Path]]:
    """``node-<i>.key`` / ``node-<i>.pub`` for i = 0..n-1 (i = the node's partition id)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CertError(f"number of nodes must be a positive integer, got {n!r}")
    out = Path(out_dir)
    return [make_node_key(out / f"node-{i}.key", out / f"node-{i}.pub", comment=f"feddmmr-node-{i}") for i in range(n)]


def make_superexec_secret(path: str | Path) -> Path:
    """A random shared secret (64 hex characters, no newline) for ``--superexec-auth-secret-file``;
    an existing file is kept (both sides of a pair must read the same bytes)."""
    path = Path(path)
    if path.exists():
        if not path.read_bytes():
            raise CertError(f"{path} is empty; delete it to generate a new secret")
        return path
    return _write(path, secrets.token_hex(32).encode(), private=True)


@dataclass(frozen=True)
class Deployment:
    """Everything :func:`make_deployment` wrote, folder by folder (one folder per host role)."""

    ca: Path  # ca.crt + ca.key: keep ca.key off the servers
    superlink: Path  # ca.crt, server.pem, server.key, superexec.secret: the SuperLink host
    nodes: list[Path]  # nodes/node-<i>/: ca.crt, node.key, node.pub, superexec.secret: node host i


def make_deployment(
    out_dir: str | Path, hosts: list[str], nodes: int, days: int = 365, overwrite: bool = False
) -> Deployment:
    """The layout docker-compose.yml mounts: ``ca/``, ``superlink/`` and ``nodes/node-<i>/``.

    Re-running with more nodes adds the missing node folders and keeps the CA and existing keys.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise CertError(f"number of nodes must be a positive integer, got {nodes!r}")
    out = Path(out_dir)
    ca_dir, link_dir = out / "ca", out / "superlink"
    if overwrite or not (ca_dir / "ca.crt").exists():
        made = make_ca_and_server_cert(ca_dir, hosts, days, overwrite=overwrite)
        link_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(made.ca_cert, link_dir / "ca.crt")
        for src, name in ((made.server_cert, "server.pem"), (made.server_key, "server.key")):
            os.replace(src, link_dir / name)
    else:
        # Keep the CA; a host list that differs from the certificate's is an error, not a silent mismatch.
        if not (link_dir / "server.pem").is_file():
            raise CertError(f"{ca_dir} holds a CA but {link_dir} has no server.pem; pass --force to start afresh")
        cert = x509.load_pem_x509_certificate((link_dir / "server.pem").read_bytes())
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        # Only the requested hosts: a certificate made before a default name was added stays usable.
        wanted = subject_alt_names([hosts] if isinstance(hosts, str) else list(hosts), include_defaults=False)
        missing = [str(n.value) for n in wanted if n not in have]
        if missing:
            raise CertError(
                f"existing server certificate in {link_dir} lacks {', '.join(missing)}; "
                "pass --force to make a new CA and certificate"
            )
    make_superexec_secret(link_dir / "superexec.secret")
    node_dirs = []
    for i in range(nodes):
        node_dir = out / "nodes" / f"node-{i}"
        make_node_key(node_dir / "node.key", node_dir / "node.pub", comment=f"feddmmr-node-{i}")
        shutil.copy2(ca_dir / "ca.crt", node_dir / "ca.crt")
        make_superexec_secret(node_dir / "superexec.secret")
        node_dirs.append(node_dir)
    return Deployment(ca=ca_dir, superlink=link_dir, nodes=node_dirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.certs",
        description=(
            "Make the CA, the SuperLink TLS certificate, SuperNode auth keys and SuperExec secrets "
            "in the layout docker-compose.yml mounts."
        ),
    )
    parser.add_argument(
        "--host",
        action="append",
        required=True,
        help="name or IP the SuperNodes use to reach the SuperLink (repeatable)",
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (partition ids 0..N-1)")
    parser.add_argument("--out", default="deploy/certs", help="output folder (git-ignored; default deploy/certs)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days")
    parser.add_argument("--force", action="store_true", help="replace an existing CA and server certificate")
    args = parser.parse_args(argv)
    try:
        made = make_deployment(args.out, args.host, args.nodes, args.days, args.force)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA (keep ca.key off the servers): {made.ca}")
    print(f"SuperLink host files:            {made.superlink}")
    for i, node in enumerate(made.nodes):
        print(
            f"node {i} host files:              {node}   register: flwr supernode register {node}/node.pub <connection>"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
