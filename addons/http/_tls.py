"""TLS on both sides of the proxy.

* Towards the agent: the target's own certificate (``tls: {cert, key}``), or else a leaf certificate signed
  by the gateway's CA. That CA is created on first start in ``STATE/tls`` (``ca.crt`` is the file to give
  ``lictor kubeconfig --ca`` or ``curl --cacert``); leaves name what the agent connected to (its SNI, or the
  listener's IP address when it sent none, e.g. ``https://127.0.0.1:8443``).
* Towards the upstream: verified against ``upstream_ca`` (or the system's trusted CAs) with the hostname
  checked during the handshake, unless ``upstream_insecure: true``; a client certificate when configured.
  Each target has its own context: one target's trust settings never apply to another.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

from mitmproxy import certs
from mitmproxy.net import tls as net_tls
from mitmproxy.options import CONF_BASENAME
from OpenSSL import SSL

from ._config import HttpTarget

CA_NAME = "Lictor gateway CA"
_HTTP11 = b"http/1.1"
_NO_PARTIAL_WILDCARDS = 0x4  # X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS


def ensure_ca(state_dir: Path) -> Path:
    """Create the gateway CA in ``STATE/tls`` unless it exists; return that directory (mitmproxy's confdir)."""
    confdir = state_dir / "tls"
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (confdir / f"{CONF_BASENAME}-ca.pem").exists():
        certs.CertStore.create_store(confdir, CONF_BASENAME, 2048, organization="Lictor", cn=CA_NAME)
    ca_cert = confdir / f"{CONF_BASENAME}-ca-cert.pem"
    public = confdir / "ca.crt"
    if not public.exists() or public.read_bytes() != ca_cert.read_bytes():
        shutil.copyfile(ca_cert, public)
    return confdir


def _alpn_http11(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    return _HTTP11 if _HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def client_context(target: HttpTarget) -> SSL.Context | None:
    """The server-side context for agents when the target has its own certificate, else None."""
    if target.tls_cert is None or target.tls_key is None:
        return None
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.use_certificate_chain_file(str(target.tls_cert))
    ctx.use_privatekey_file(str(target.tls_key))
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_alpn_http11)
    return ctx


def upstream_context(target: HttpTarget) -> SSL.Context:
    """The client-side context towards the upstream of ``target``."""
    return net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD,
        min_version=net_tls.Version.TLS1_2,
        max_version=net_tls.Version.UNBOUNDED,
        cipher_list=None,
        ecdh_curve=None,
        verify=net_tls.Verify.VERIFY_NONE if target.upstream_insecure else net_tls.Verify.VERIFY_PEER,
        ca_path=None,
        ca_pemfile=str(target.upstream_ca) if target.upstream_ca else None,
        client_cert=str(target.credentials.client_cert_file) if target.credentials.client_cert_file else None,
        legacy_server_connect=False,
    )


def upstream_connection(ctx: SSL.Context, target: HttpTarget) -> SSL.Connection:
    """One connection to the upstream; its certificate must name ``target.upstream_host``."""
    conn = SSL.Connection(ctx)
    host = target.upstream_host
    lib = SSL._lib  # type: ignore[attr-defined]
    param = lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    lib.X509_VERIFY_PARAM_set_hostflags(param, _NO_PARTIAL_WILDCARDS)
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        name = host.encode("idna")
        conn.set_tlsext_host_name(name)
        ok = lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise RuntimeError(f"cannot set the expected upstream name {host!r}")
    conn.set_alpn_protos([_HTTP11])
    conn.set_connect_state()
    return conn


def untrusted_ca(state_dir: Path) -> Path:
    """A CA file nothing chains to (its key was thrown away): mitmproxy's own TLS fallback trusts nothing."""
    path = state_dir / "tls" / "untrusted-ca.pem"
    if path.exists():
        return path
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lictor trusts nothing here")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
