"""The settings of one ``http`` or ``kubernetes`` target, checked once at start-up.

Everything the proxy needs per target is resolved here (paths made absolute, files read, URLs split),
so that a bad config stops the gateway with a clear message instead of failing on the first request.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lictor import Target

DEFAULT_MAX_BODY = 16 * 1024 * 1024
HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authenticate"]
)


class TargetConfigError(ValueError):
    """A target's settings cannot be used; the message names the target and the setting."""


@dataclass(frozen=True)
class UpstreamCredentials:
    """What the gateway adds to every forwarded request; never shown to the agent."""

    headers: tuple[tuple[str, str], ...] = ()
    client_cert_file: Path | None = None  # PEM with certificate chain and key, written 0600

    @property
    def secret_values(self) -> tuple[str, ...]:
        return tuple(v for _, v in self.headers)


@dataclass(frozen=True)
class HttpTarget:
    """One listener: where it listens, where it forwards, how it authenticates on both sides."""

    name: str
    protocol: str  # "http" | "kubernetes"
    listen_host: str
    listen_port: int
    scheme: str  # upstream scheme: "http" | "https"
    upstream_host: str
    upstream_port: int
    base_path: str  # upstream path prefix, "" or "/prefix" (no trailing slash)
    upstream_ca: Path | None = None
    upstream_insecure: bool = False
    tls: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    credentials: UpstreamCredentials = field(default_factory=UpstreamCredentials)
    approval_mode: str = "hold"
    max_body: int = DEFAULT_MAX_BODY

    @property
    def kubernetes(self) -> bool:
        return self.protocol == "kubernetes"

    @property
    def mode_spec(self) -> str:
        """mitmproxy's reverse-proxy mode for this target (unique per listener)."""
        host = f"[{self.upstream_host}]" if ":" in self.upstream_host else self.upstream_host
        listen = f"{self.listen_host}:{self.listen_port}" if self.listen_host else str(self.listen_port)
        return f"reverse:{self.scheme}://{host}:{self.upstream_port}@{listen}"

    @property
    def upstream_url(self) -> str:
        host = f"[{self.upstream_host}]" if ":" in self.upstream_host else self.upstream_host
        return f"{self.scheme}://{host}:{self.upstream_port}{self.base_path}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise TargetConfigError(f"{where}: listen must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_s)


def _file(raw: str, resolve: Any, where: str) -> Path:
    path = Path(resolve(raw))
    if not path.is_file():
        raise TargetConfigError(f"{where}: file {path} does not exist")
    return path


def parse_target(target: Target, resolve: Any, state_dir: Path) -> HttpTarget:
    """Validate ``target`` (already checked against the JSON Schema) and resolve its files.

    :param resolve: turns a config-relative path into a :class:`~pathlib.Path` (``GatewayConfig.resolve``).
    :param state_dir: where derived secrets (a combined client certificate file) are written.
    """
    s: Mapping[str, Any] = target.settings
    where = target.where
    listen_host, listen_port = parse_listen(str(s["listen"]), where)

    url = urlsplit(str(s["upstream"]))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise TargetConfigError(f"{where}: upstream must be an http:// or https:// URL, got {s['upstream']!r}")
    if url.query or url.fragment or url.username or url.password:
        raise TargetConfigError(
            f"{where}: upstream URL must not carry a query, fragment or credentials (use `credentials:`)"
        )
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:
        raise TargetConfigError(f"{where}: upstream port: {exc}") from None
    base_path = url.path.rstrip("/")

    tls_cfg: Mapping[str, Any] = s.get("tls") or {}
    tls = bool(tls_cfg.get("enabled", True))
    tls_cert = tls_key = None
    if tls_cfg.get("cert") or tls_cfg.get("key"):
        if not (tls_cfg.get("cert") and tls_cfg.get("key")):
            raise TargetConfigError(f"{where}: tls needs both cert and key")
        tls_cert = _file(str(tls_cfg["cert"]), resolve, f"{where}: tls.cert")
        tls_key = _file(str(tls_cfg["key"]), resolve, f"{where}: tls.key")
    if not tls and not _loopback(listen_host):
        raise TargetConfigError(
            f"{where}: tls.enabled is false but the listener is not on a loopback address; agents' tokens "
            "would cross the network in clear text"
        )

    upstream_ca = None
    if s.get("upstream_ca"):
        upstream_ca = _file(str(s["upstream_ca"]), resolve, f"{where}: upstream_ca")
    insecure = bool(s.get("upstream_insecure", False))
    if insecure and upstream_ca is not None:
        raise TargetConfigError(f"{where}: upstream_ca and upstream_insecure exclude each other")

    credentials = _credentials(s.get("credentials") or {}, resolve, state_dir, target.name, where)
    if credentials.client_cert_file is not None and url.scheme != "https":
        raise TargetConfigError(f"{where}: a client certificate needs an https:// upstream")

    max_body = int(s.get("max_body", DEFAULT_MAX_BODY))
    if max_body < 0:
        raise TargetConfigError(f"{where}: max_body must not be negative")
    return HttpTarget(
        name=target.name,
        protocol=target.protocol,
        listen_host=listen_host,
        listen_port=listen_port,
        scheme=url.scheme,
        upstream_host=url.hostname,
        upstream_port=port,
        base_path=base_path,
        upstream_ca=upstream_ca,
        upstream_insecure=insecure,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        credentials=credentials,
        approval_mode=str(s.get("approval_mode", "hold")),
        max_body=max_body,
    )


def _credentials(cfg: Mapping[str, Any], resolve: Any, state_dir: Path, name: str, where: str) -> UpstreamCredentials:
    headers: list[tuple[str, str]] = []
    kinds = [k for k in ("bearer", "basic", "header") if cfg.get(k)]
    if len([k for k in kinds if k in ("bearer", "basic")]) > 1:
        raise TargetConfigError(f"{where}: credentials: bearer and basic exclude each other")
    if cfg.get("bearer"):
        headers.append(("Authorization", f"Bearer {cfg['bearer']}"))
    if cfg.get("basic"):
        basic = cfg["basic"]
        if "user" not in basic or "password" not in basic:
            raise TargetConfigError(f"{where}: credentials.basic needs user and password")
        raw = f"{basic['user']}:{basic['password']}".encode()
        headers.append(("Authorization", "Basic " + base64.b64encode(raw).decode()))
    if cfg.get("header"):
        header = cfg["header"]
        hname, hvalue = str(header.get("name", "")), str(header.get("value", ""))
        if not hname or not hvalue or any(c in hname for c in ":\r\n ") or any(c in hvalue for c in "\r\n"):
            raise TargetConfigError(f"{where}: credentials.header needs a valid name and value")
        if hname.lower() in HOP_BY_HOP or hname.lower().startswith("x-lictor-"):
            raise TargetConfigError(f"{where}: credentials.header may not set {hname!r}")
        if any(h.lower() == hname.lower() for h, _ in headers):
            raise TargetConfigError(f"{where}: credentials set {hname!r} twice")
        headers.append((hname, hvalue))
    for _, value in headers:
        if any(c in value for c in "\r\n"):
            raise TargetConfigError(f"{where}: credentials contain a line break")
    client_file = None
    if cfg.get("client_cert"):
        cc = cfg["client_cert"]
        if not cc.get("cert") or not cc.get("key"):
            raise TargetConfigError(f"{where}: credentials.client_cert needs cert and key")
        cert = _file(str(cc["cert"]), resolve, f"{where}: credentials.client_cert.cert")
        key = _file(str(cc["key"]), resolve, f"{where}: credentials.client_cert.key")
        directory = state_dir / "tls" / "upstream"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        client_file = directory / f"{name}-client.pem"
        data = key.read_bytes().rstrip() + b"\n" + cert.read_bytes()
        fd = os.open(client_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return UpstreamCredentials(tuple(headers), client_file)
