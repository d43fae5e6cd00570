"""The settings of one SSH target, read from the gateway config and checked before anything listens.

Every file named by a target (the gateway's host key, the upstream key, certificate and known_hosts,
the user CAs) is loaded here, in ``configure``: a missing or unreadable file refuses the config with
a message naming the target and the setting, instead of failing on the first agent connection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

__all__ = ["DEFAULT_LINE_SHELL", "KeyIdentity", "SshTargetConfig", "UpstreamConfig", "parse_target"]

DEFAULT_LINE_SHELL = "/bin/bash"
DEFAULT_RECORD_LIMIT = 64 << 20
DEFAULT_MAX_CHANNELS = 32
"""Channels one agent connection may have open at a time (sessions, SFTP, forwards); OpenSSH allows 10 sessions."""
DEFAULT_MAX_CONNECTIONS = 16
"""Connections one identity may have open to a target at a time."""


@dataclass(frozen=True)
class KeyIdentity:
    """A public key registered to an identity in the target config."""

    key: asyncssh.SSHKey
    subject: str
    claims: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint("sha256"))


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    user: str
    key: asyncssh.SSHKey
    certificate: asyncssh.SSHCertificate | None
    known_hosts: Path
    max_sessions: int = 8
    connect_timeout: float = 15.0


@dataclass(frozen=True)
class SshTargetConfig:
    """One ``protocol: ssh`` target, with its files loaded."""

    name: str
    listen_host: str
    listen_port: int
    host_key: asyncssh.SSHKey
    upstream: UpstreamConfig
    public_keys: tuple[KeyIdentity, ...] = ()
    user_cas: tuple[asyncssh.SSHKey, ...] = ()
    line_shell: str = DEFAULT_LINE_SHELL
    record_output_limit: int = DEFAULT_RECORD_LIMIT
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def key_identity(self, key: asyncssh.SSHKey) -> KeyIdentity | None:
        """The identity a public key is registered to, compared by the key's public blob."""
        blob = key.public_data
        for entry in self.public_keys:
            if entry.key.public_data == blob:
                return entry
        return None

    def is_trusted_ca(self, key: asyncssh.SSHKey) -> bool:
        blob = key.public_data
        return any(ca.public_data == blob for ca in self.user_cas)


def split_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must be HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"listen port out of range: {text!r}")
    return host, number


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _load_or_create_host_key(path: Path, create: bool = True) -> asyncssh.SSHKey:
    if not path.exists() and not create:  # a check of the config: the key the gateway would make
        return asyncssh.generate_private_key("ssh-ed25519")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="lictor-gateway")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
        Path(f"{path}.pub").write_bytes(key.export_public_key())
        return key
    data = _read(path, "host_key")
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"host_key: {path} is not a usable private key: {exc}") from None


def _public_key(text: str, resolve: Callable[[str], Path], what: str) -> asyncssh.SSHKey:
    stripped = text.strip()
    data: bytes
    if stripped.split(" ", 1)[0].startswith(("ssh-", "ecdsa-", "sk-")):
        data = stripped.encode()
    else:
        data = _read(resolve(stripped), what)
    try:
        return asyncssh.import_public_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"{what}: not an OpenSSH public key: {exc}") from None


def parse_target(
    name: str,
    settings: Mapping[str, Any],
    resolve: Callable[[str], Path],
    state_dir: Path,
    *,
    create_host_key: bool = True,
) -> SshTargetConfig:
    """Load one target; raise ValueError naming the target and setting on any problem. A missing host key
    is created, unless ``create_host_key`` is false (``lictor check -c``: nothing is written)."""
    try:
        return _parse(name, settings, resolve, state_dir, create_host_key)
    except ValueError as exc:
        raise ValueError(f"ssh target {name!r}: {exc}") from None


def _parse(
    name: str, settings: Mapping[str, Any], resolve: Callable[[str], Path], state_dir: Path, create_host_key: bool
) -> SshTargetConfig:
    listen_host, listen_port = split_listen(str(settings["listen"]))
    host_key_setting = settings.get("host_key")
    host_key_path = resolve(str(host_key_setting)) if host_key_setting else state_dir / "ssh" / f"{name}_host_ed25519"
    host_key = _load_or_create_host_key(host_key_path, create_host_key)

    up = settings["upstream"]
    # empty, asyncssh would pick for itself: the local host, the gateway process's own user name; an empty
    # file would name the directory of lictor.yaml (`lictor check -c` reads an unset ${VAR} as empty)
    for setting in ("host", "user", "key", "known_hosts"):
        if not str(up[setting]).strip():
            raise ValueError(f"upstream.{setting} is empty")
    key_path = resolve(str(up["key"]))
    key_data = _read(key_path, "upstream.key")
    try:
        key = asyncssh.import_private_key(key_data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"upstream.key: {key_path} is not a usable unencrypted private key: {exc}") from None
    certificate = None
    if up.get("certificate"):
        cert_path = resolve(str(up["certificate"]))
        cert_data = _read(cert_path, "upstream.certificate")
        try:
            certificate = asyncssh.import_certificate(cert_data)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"upstream.certificate: {cert_path} is not an OpenSSH certificate: {exc}") from None
    known_hosts = resolve(str(up["known_hosts"]))
    text = _read(known_hosts, "upstream.known_hosts").decode("utf-8", "replace")
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ValueError(f"upstream.known_hosts: {known_hosts} has no host keys (unknown host keys are refused)")
    try:
        asyncssh.import_known_hosts(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"upstream.known_hosts: {known_hosts}: {exc}") from None
    raw_port = up.get("port", 22)
    try:
        port = int(raw_port)
    except ValueError:
        raise ValueError(f"upstream.port {raw_port!r} is not a port number") from None
    if not 0 < port <= 65535:
        raise ValueError(f"upstream.port out of range: {port}")
    upstream = UpstreamConfig(
        host=str(up["host"]),
        port=port,
        user=str(up["user"]),
        key=key,
        certificate=certificate,
        known_hosts=known_hosts,
        max_sessions=int(up.get("max_sessions", 8)),
        connect_timeout=float(up.get("connect_timeout", 15)),
    )

    public_keys: list[KeyIdentity] = []
    for i, entry in enumerate(settings.get("public_keys") or []):
        what = f"public_keys[{i}]"
        public_keys.append(
            KeyIdentity(
                key=_public_key(str(entry["key"]), resolve, what),
                subject=str(entry["sub"]),
                claims=dict(entry.get("claims") or {}),
            )
        )
    user_cas: list[asyncssh.SSHKey] = []
    for i, path_text in enumerate(settings.get("user_ca") or []):
        path = resolve(str(path_text))
        data = _read(path, f"user_ca[{i}]")
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"user_ca[{i}]: {path} holds no public key")
        for line in lines:
            user_cas.append(_public_key(line, resolve, f"user_ca[{i}]"))

    return SshTargetConfig(
        name=name,
        listen_host=listen_host,
        listen_port=listen_port,
        host_key=host_key,
        upstream=upstream,
        public_keys=tuple(public_keys),
        user_cas=tuple(user_cas),
        line_shell=str(settings.get("line_shell", DEFAULT_LINE_SHELL)),
        record_output_limit=int(settings.get("record_output_limit", DEFAULT_RECORD_LIMIT)),
        max_channels=int(settings.get("max_channels", DEFAULT_MAX_CHANNELS)),
        max_connections=int(settings.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
        idle_timeout=float(settings.get("idle_timeout", 0)),
    )
