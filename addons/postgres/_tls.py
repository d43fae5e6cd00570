"""TLS for the PostgreSQL listener: the gateway's certificate towards agents, verification towards targets.

When a target configures no ``tls.cert``/``tls.key``, the gateway creates a private CA and a server
certificate signed by it in ``STATE_DIR/tls/postgres/`` on first start (``ca.pem`` is what agents put in
``sslrootcert`` to verify the gateway with ``sslmode=verify-full``). Keys are written with mode 0600.
"""

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

__all__ = ["client_context", "ensure_certificate", "server_context"]

_VALIDITY_DAYS = 825


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_certificate(directory: Path, hostnames: list[str]) -> tuple[Path, Path, Path]:
    """Return ``(cert, key, ca)`` under ``directory``, creating a CA and a server certificate if missing.

    The server certificate names ``localhost``, the loopback addresses and ``hostnames``. A certificate
    that exists is reused as is (an operator may replace the files).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    if ca_path.exists() and cert_path.exists() and key_path.exists():
        return cert_path, key_path, ca_path
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lictor PostgreSQL gateway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    seen = {"localhost"}
    for host in ["127.0.0.1", "::1", *hostnames]:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lictor-postgres")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_private(
        directory / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_private(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    return cert_path, key_path, ca_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context that terminates agents' TLS (TLS 1.2 or newer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(sslmode: str, rootcert: Path | None) -> ssl.SSLContext | None:
    """The context for the gateway's own connection to a target, following libpq's ``sslmode``.

    ``disable``: no TLS. ``prefer``/``require``: encrypted, not verified (as in libpq; ``require`` with a
    root certificate verifies the chain, like libpq does). ``verify-ca``: chain verified.
    ``verify-full``: chain and host name verified.
    """
    if sslmode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verify = sslmode in ("verify-ca", "verify-full") or (sslmode == "require" and rootcert is not None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if rootcert is not None:
        ctx.load_verify_locations(cafile=str(rootcert))
    else:
        ctx.load_default_certs()
    ctx.check_hostname = sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
