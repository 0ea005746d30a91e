"""TLS for stage links and the gateway's HTTP side: contexts, self-signed certificates, fingerprints.

``--tls auto`` makes (once) and caches a self-signed certificate under
``~/.cache/molink-lite/tls/``. Peers need no CA: a client accepts any certificate at the TLS
layer and then pins the one it received through the secret-authenticated handshake
(:mod:`molink_lite.wire.auth` binds the certificate's SHA-256 fingerprint into both MACs).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import secrets
import socket
import ssl
from pathlib import Path
from typing import Any, Optional, Tuple

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """TLS options that cannot be used; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("MOLINK_CACHE", Path.home() / ".cache" / "molink-lite")) / "tls"


def self_signed(directory: Optional[Path] = None, name: str = "molink-lite") -> Tuple[Path, Path]:
    """(cert, key) PEM paths of a cached self-signed certificate, made on first use (EC P-256, 10 years).

    Certificate and key live in one file that appears atomically (made under a temporary name, then
    hard-linked into place, which fails if another process got there first), so stages starting
    together on one machine all end up with the same certificate and never a mismatched pair.
    """
    d = Path(directory) if directory else cache_dir()
    pem = d / "selfsigned.pem"
    if pem.is_file():
        return pem, pem
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    pk = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {socket.gethostname()}"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    crt = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(pk.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=1))
           .not_valid_after(now + datetime.timedelta(days=3650))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
           .sign(pk, hashes.SHA256()))
    data = crt.public_bytes(serialization.Encoding.PEM) + pk.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = d / f"selfsigned.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, pem)
        log.info("made a self-signed TLS certificate %s (fingerprint %s)", pem, fingerprint_file(pem))
    except FileExistsError:
        pass  # another process made one first: use that
    except OSError:  # no hard links on this file system
        if not pem.exists():
            os.replace(tmp, pem)
    finally:
        tmp.unlink(missing_ok=True)
    return pem, pem


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER certificate, hex."""
    return hashlib.sha256(der).hexdigest()


def fingerprint_file(cert: Path) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file (which may hold the key too)."""
    text = Path(cert).read_text()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise TLSConfigError(f"{cert} holds no PEM certificate")
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(text[i:j + len(end)] + "\n"))


def resolve(tls: Optional[str], cert: Optional[str], key: Optional[str]) -> Optional[Tuple[Path, Path]]:
    """(cert, key) paths from the CLI options ``--tls auto|off`` / ``--tls-cert`` / ``--tls-key``, or None."""
    if cert or key:
        if not (cert and key):
            raise TLSConfigError("--tls-cert and --tls-key go together")
        if tls == "off":
            raise TLSConfigError("--tls off contradicts --tls-cert/--tls-key")
        for p in (cert, key):
            if not Path(p).expanduser().is_file():
                raise TLSConfigError(f"TLS file not found: {p}")
        return Path(cert).expanduser(), Path(key).expanduser()
    if tls == "auto":
        return self_signed()
    return None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"cannot load the TLS certificate {cert} / key {key}: {e}") from None
    return ctx


def client_context() -> ssl.SSLContext:
    """Encrypts; the peer's identity is checked by the handshake's certificate binding, not by a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_fingerprint(ws: Any) -> str:
    """Fingerprint of the certificate a connected (client-side) WebSocket received; '' without TLS."""
    transport = getattr(ws, "transport", None)
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if obj is None:
        return ""
    der = obj.getpeercert(binary_form=True)
    return fingerprint_der(der) if der else ""
