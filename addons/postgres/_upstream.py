"""The gateway's own connection to the target PostgreSQL server.

The gateway logs in with the credentials of the gateway config (trust, cleartext, md5 or SCRAM-SHA-256),
with TLS as ``sslmode`` says. Nothing of this exchange reaches the agent: on failure the agent gets a
generic error and the details (without the password) go to the gateway log.
"""

import asyncio
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _protocol as pg
from ._pipe import Pipe, PipeClosed
from ._scram import SCRAM_SHA_256, ScramClient, ScramError, choose_mechanism, md5_password
from ._tls import client_context

__all__ = ["Upstream", "UpstreamConfig", "UpstreamError", "connect", "send_cancel"]

log = logging.getLogger("lictor.postgres")


class UpstreamError(Exception):
    """The target refused or broke the login. ``sqlstate`` is the server's when it sent one."""

    def __init__(self, message: str, sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    user: str
    password: str = field(repr=False, default="")
    database: str = ""
    sslmode: str = "prefer"
    sslrootcert: Path | None = None
    connect_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], resolve: Any) -> "UpstreamConfig":
        """A target's ``upstream:``; ValueError names a setting the gateway could never connect with (an empty
        host, a port that is no number or out of range), at start-up instead of at each agent's login."""
        host = str(settings["host"]).strip()
        if not host:
            raise ValueError("upstream.host is empty")
        raw_port = settings.get("port")
        try:
            port = int(raw_port) if raw_port not in (None, "") else 5432
        except ValueError:
            raise ValueError(f"upstream.port {raw_port!r} is not a port number") from None
        if not 0 < port < 65536:
            raise ValueError(f"upstream.port {port} is out of range (1-65535)")
        root = settings.get("sslrootcert")
        config = cls(
            host=host,
            port=port,
            user=str(settings.get("user") or "postgres"),
            password=str(settings.get("password") or ""),
            database=str(settings.get("database") or settings.get("user") or "postgres"),
            sslmode=str(settings.get("sslmode") or "prefer"),
            sslrootcert=resolve(str(root)) if root else None,
            connect_timeout=float(settings.get("connect_timeout") or 10.0),
        )
        # A CA file that cannot be read would fail every login, each with a connection error that names the
        # server rather than the file: refuse it when the gateway starts (and in `lictor check -c`).
        config.ssl_context()
        return config

    @property
    def socket_path(self) -> str | None:
        """The Unix-domain socket of a ``host`` that names a directory (libpq: a host beginning with ``/``)."""
        if not self.host.startswith("/"):
            return None
        return os.path.join(self.host, f".s.PGSQL.{self.port}")

    @property
    def where(self) -> str:
        """The server's address, for messages."""
        return self.socket_path or f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for a login; ValueError when ``sslrootcert`` cannot be loaded."""
        if self.socket_path is not None:
            return None  # as libpq: sslmode applies to TCP only, a local socket never negotiates TLS
        try:
            return client_context(self.sslmode, self.sslrootcert)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            message = f"upstream.sslrootcert {self.sslrootcert}: cannot load it as CA certificates ({reason})"
            raise ValueError(message) from None


@dataclass
class Upstream:
    """A logged-in upstream connection, ready for queries."""

    pipe: Pipe
    pid: int
    key: bytes
    parameters: dict[str, str]
    status: str
    leftover: bytes
    tls: bool


async def _open(config: UpstreamConfig, name: str) -> tuple[Pipe, bool]:
    """TCP connection, then the SSLRequest dance per sslmode (or a Unix-domain socket, without TLS).
    Returns the pipe and whether TLS is on."""
    loop = asyncio.get_running_loop()
    path = config.socket_path
    if path is not None:
        _, pipe = await loop.create_unix_connection(lambda: Pipe(name), path)
        return pipe, False
    try:
        ctx = config.ssl_context()
    except ValueError as exc:  # the CA file went away (or changed) since the gateway started
        raise UpstreamError(str(exc)) from None
    transport, pipe = await loop.create_connection(lambda: Pipe(name), config.host, config.port)
    if ctx is None:
        return pipe, False
    reader = pg.BackendReader()
    reader.expect_encryption_response()
    pipe.write(pg.ssl_request())
    answer: list[pg.BackendMessage] = []
    while not answer:
        answer = reader.feed(await pipe.read())
    first = answer[0]
    if isinstance(first, pg.EncryptionResponse) and first.accepted:
        server_hostname = config.host if config.sslmode == "verify-full" else None
        tls_transport = await loop.start_tls(
            transport, pipe, ctx, server_side=False, server_hostname=server_hostname or None
        )
        if tls_transport is None:
            raise UpstreamError("TLS handshake with the target failed")
        pipe.set_transport(tls_transport)
        return pipe, True
    if config.sslmode in ("require", "verify-ca", "verify-full"):
        pipe.abort()
        raise UpstreamError(f"the target refused TLS but sslmode is {config.sslmode}")
    # prefer: fall back to plaintext on the same connection if the server said N, else reconnect.
    if isinstance(first, pg.EncryptionResponse):
        return pipe, False
    pipe.abort()
    transport, pipe = await loop.create_connection(lambda: Pipe(name), config.host, config.port)
    return pipe, False


async def connect(config: UpstreamConfig, params: Mapping[str, str], name: str = "upstream") -> Upstream:
    """Connect and log in; ``params`` are extra startup parameters (application_name, options...)."""
    try:
        return await asyncio.wait_for(_connect(config, params, name), config.connect_timeout)
    except TimeoutError:
        raise UpstreamError(f"timed out connecting to {config.where}") from None
    except (OSError, PipeClosed) as exc:
        raise UpstreamError(f"cannot reach {config.where}: {exc}") from None
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS with {config.where} failed: {exc}") from None
    except pg.ProtocolError as exc:
        raise UpstreamError(f"protocol error from {config.where}: {exc}") from None


async def _connect(config: UpstreamConfig, params: Mapping[str, str], name: str) -> Upstream:
    pipe, tls = await _open(config, name)
    ok = False
    try:
        startup = {"user": config.user, "database": config.database, **params}
        pipe.write(pg.startup_message(startup))
        reader = pg.BackendReader()
        scram: ScramClient | None = None
        parameters: dict[str, str] = {}
        pid, key = 0, b""
        while True:
            data = await pipe.read()
            messages = reader.feed(data)
            for index, message in enumerate(messages):
                if isinstance(message, pg.AuthenticationOk):
                    if scram is not None and not scram.done:
                        raise UpstreamError("the target skipped the SCRAM server signature")
                elif isinstance(message, pg.AuthenticationCleartextPassword):
                    if not tls and config.socket_path is None:
                        log.warning("target %s asks for a cleartext password without TLS", config.where)
                    pipe.write(pg.password_message(config.password))
                elif isinstance(message, pg.AuthenticationMD5Password):
                    pipe.write(pg.password_message(md5_password(config.user, config.password, message.salt)))
                elif isinstance(message, pg.AuthenticationSASL):
                    try:
                        mechanism = choose_mechanism(message.mechanisms)
                    except ScramError as exc:
                        raise UpstreamError(str(exc)) from None
                    assert mechanism == SCRAM_SHA_256
                    scram = ScramClient(config.password)
                    pipe.write(pg.sasl_initial_response(mechanism, scram.client_first()))
                elif isinstance(message, pg.AuthenticationSASLContinue):
                    if scram is None:
                        raise UpstreamError("SASL continue without a SASL exchange")
                    try:
                        pipe.write(pg.sasl_response(scram.client_final(message.data)))
                    except ScramError as exc:
                        raise UpstreamError(f"SCRAM: {exc}") from None
                elif isinstance(message, pg.AuthenticationSASLFinal):
                    if scram is None:
                        raise UpstreamError("SASL final without a SASL exchange")
                    try:
                        scram.verify_server_final(message.data)
                    except ScramError as exc:
                        raise UpstreamError(f"SCRAM: {exc}") from None
                elif isinstance(message, pg.AuthenticationRequest):
                    raise UpstreamError(f"the target asks for an unsupported authentication method {message.auth_code}")
                elif isinstance(message, pg.ParameterStatus):
                    parameters[message.name] = message.value
                elif isinstance(message, pg.BackendKeyData):
                    pid, key = message.pid, message.key
                elif isinstance(message, pg.ErrorResponse):
                    raise UpstreamError(message.message, message.sqlstate or "08006")
                elif isinstance(message, pg.ReadyForQuery):
                    if index != len(messages) - 1 or reader.buffered:
                        raise UpstreamError("the target sent data after ReadyForQuery during login")
                    ok = True
                    return Upstream(pipe, pid, key, parameters, message.status, b"", tls)
                elif isinstance(message, (pg.NoticeResponse, pg.NegotiateProtocolVersion)):
                    continue
                else:
                    raise UpstreamError(f"unexpected {type(message).__name__} during login")
    finally:
        if not ok:
            pipe.abort()


async def send_cancel(config: UpstreamConfig, pid: int, key: bytes) -> None:
    """Ask the target to cancel the query running in backend ``pid`` (fire and forget)."""
    try:
        pipe, _ = await asyncio.wait_for(_open(config, "cancel"), config.connect_timeout)
    except (OSError, TimeoutError, UpstreamError, PipeClosed, ssl.SSLError, pg.ProtocolError) as exc:
        log.warning("cancel request to %s failed: %s", config.where, exc)
        return
    try:
        pipe.write(pg.cancel_request(pid, key))
        # The server closes the connection once it has handled the request.
        try:
            await asyncio.wait_for(pipe.read(), 5)
        except (PipeClosed, TimeoutError):
            pass
    finally:
        pipe.close()
