"""The SSH listener of one target and the agent connections it accepts.

Authentication (theory of operation)
====================================

Three ways in, each ending in an :class:`~lictor.Identity`:

* **password**: the password is a JWT, verified by the gateway's issuers (``Gateway.authenticate``;
  failures are audited and the reason is sent to the agent as an authentication banner). The SSH
  user name is ignored. OpenSSH cuts passwords at 1023 bytes: prefer short tokens.
* **public key** registered in the target's ``public_keys`` (``{key, sub, claims}``).
* **OpenSSH user certificate** signed by a CA listed in ``user_ca``; asyncssh checks the signature,
  validity and that the SSH user name is one of the certificate's principals; the identity's
  subject is that user name. A certificate without principals is refused, as sshd refuses it
  (asyncssh would take it for any user name: see ``AgentConnection._require_principals``).

asyncssh calls ``validate_public_key``/``validate_ca_key`` *before* it checks the signature that
proves possession of the key (and also for the "would you accept this key?" probe that carries no
signature). So those callbacks only remember a candidate; the identity is granted in
``auth_completed``, which runs only after a signature (or a password) was verified. Each callback
first clears the previous candidate, and asyncssh evaluates one authentication request at a time
and runs no other method here (no keyboard-interactive, host-based or GSS), so the candidate at
``auth_completed`` is the one whose proof succeeded.

Agent forwarding and X11 forwarding are switched off in asyncssh (it would otherwise accept agent
forwarding by default): forwarding an agent's keys or display to the target defeats a gateway that
holds the credentials. Port forwarding is decided by rules (channel ``port_forward``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable
from typing import Any

import asyncssh
from lictor import AuthError, Decision, Gateway, Identity, Request, Session

from ._channel import handle_process
from ._config import SshTargetConfig
from ._forward import Bridge
from ._requests import UNPARSABLE_RULE, UNSUPPORTED_RULE, denial_text, forward_request, socket_forward_request
from ._sftp import make_sftp_server
from ._upstream import UpstreamError, UpstreamPool

__all__ = ["AgentConnection", "SshListener"]

log = logging.getLogger("lictor.ssh")

LOGIN_TIMEOUT = 60.0
MAX_SETTING_UP = 128
"""Connections of one SSH target that may be logging in at once. Each holds a descriptor for up to
LOGIN_TIMEOUT: beyond this a connection is closed at once (as sshd's MaxStartups does), so that connections
that never log in cannot take every descriptor of the gateway."""
OPENSSH_PASSWORD_MAX = 1023
"""Bytes of a password OpenSSH's ``ssh`` sends at most: a longer token arrives cut, and fails to verify with a
message about its encoding; a failed password of exactly this length is told why."""
MAX_PACKET = 4 * 1024 * 1024
"""Longest SSH packet read from an agent once it has logged in (asyncssh reads 256 KiB, and closed the
connection on a longer exec request, unaudited). Twice the 2 MiB Linux gives a program's arguments by
default, so a command ``ssh`` can be given arrives whole and is denied with a message the agent can act on
(the analysis reads 64 KiB of it); a longer packet still closes the connection, audited (``_oversized``).
Before login the limit stays asyncssh's: those connections hold no session yet."""
MAX_HOST_NAME = 255
"""Longest destination host name of a port forward (a DNS name has at most 253 characters). A longer one
would end the pooled upstream connection, with other agents' channels on it: OpenSSH's sshd drops its
connection on a packet over 256 KiB, which the gateway reads from agents (``MAX_PACKET``)."""


class SshListener:
    """Accepts agents for one target."""

    def __init__(self, gateway: Gateway, config: SshTargetConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.pool = UpstreamPool(config.upstream, config.name)
        self.server: asyncssh.SSHAcceptor | None = None
        self.connections: set[AgentConnection] = set()
        self.closing: set[asyncio.Future[None]] = set()

    def open_for(self, key: tuple[str, str] | None) -> int:
        """How many connections the identity ``key`` (issuer, subject) has logged in and open; with None, how
        many connections are logging in."""
        return sum(1 for agent in self.connections if agent.identity_key == key)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        cfg = self.config
        try:
            self.server = await self._create_server(cfg)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise OSError(
                f"ssh target {cfg.name}: cannot listen on {cfg.listen_host}:{cfg.listen_port} ({why}): stop what "
                "listens there, or give the target another listen address",
            ) from exc
        log.info("ssh target %s: listening on %s:%s", cfg.name, cfg.listen_host, self.port)

    async def _create_server(self, cfg: Any) -> Any:
        return await asyncssh.create_server(
            lambda: AgentConnection(self),
            cfg.listen_host,
            cfg.listen_port,
            server_host_keys=[cfg.host_key],
            process_factory=handle_process,
            sftp_factory=make_sftp_server,
            allow_scp=False,  # asyncssh would take every exec starting with "scp ": see handle_process
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=True,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            password_auth=True,
            public_key_auth=bool(cfg.public_keys or cfg.user_cas),
            login_timeout=LOGIN_TIMEOUT,
            config=None,
            server_version="Lictor",
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
        for agent in list(self.connections):
            agent.close()
        if self.closing:
            await asyncio.wait(list(self.closing), timeout=5)
        await self.pool.close()


REFUSALS_TOLD = 8
"""Refused remote forwards of one connection kept to be told on its next session channel."""
KEYS_REFUSED_TOLD = 8
"""Refused public keys and certificates of one connection named in its audited refusal."""


class AgentConnection(asyncssh.SSHServer):
    """One agent's SSH connection: authentication, its gateway session, and its channels."""

    def __init__(self, listener: SshListener) -> None:
        self.listener = listener
        self.gateway = listener.gateway
        self.config = listener.config
        self.pool = listener.pool
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.username = ""
        self._candidate: tuple[Identity, str] | None = None
        self._session: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._channels = 0
        self._open = 0
        self.identity_key: tuple[str, str] | None = None  # (issuer, subject) once logged in
        self.sftp_servers: set[Any] = set()  # the SFTP sessions of this connection (ProxySFTPServer)
        self.bridges: set[Bridge] = set()  # the open port forwards of this connection
        self._refusals: list[asyncio.Future[str | None]] = []  # remote forwards refused, for the next session
        self._certificates_unchecked = False  # see _require_principals
        self._keys_refused: list[str] = []  # public keys and certificates refused, audited if no login follows
        self._told_no_principals = False

    # -- connection -----------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        if self.listener.open_for(None) >= MAX_SETTING_UP:
            reason = f"{MAX_SETTING_UP} connections were logging in at once"
            event = {"protocol": "ssh", "target": self.config.name, "reason": reason}
            if self.gateway.audit_burst(f"ssh:{self.config.name}:setting-up", "connection.refused", event):
                log.warning("ssh target %s: refusing connections: %s", self.config.name, reason)
            conn.abort()
            return
        self.listener.connections.add(self)
        self._require_principals(conn)

    def _require_principals(self, conn: asyncssh.SSHServerConnection) -> None:
        """Refuse user certificates that name no principals, as OpenSSH's sshd does ("Certificate lacks
        principal list"). asyncssh takes such a certificate as valid for every user name, and the user name
        is the identity's subject: its holder would log in as whoever it named. asyncssh shows the certificate
        to no public callback (``validate_ca_key`` gets only the CA's key), so its check is wrapped; where it
        cannot be, no certificate is accepted."""
        check = getattr(conn, "_validate_openssh_certificate", None)
        if check is None:
            self._certificates_unchecked = True
            return

        async def principals_required(username: str, cert: Any) -> Any:
            if not cert.principals:
                self._candidate = None
                if not self._told_no_principals:
                    self._told_no_principals = True
                    reason = f"the certificate names no principals, so it cannot log in as {username!r}"
                    self._audit_login_refused(reason)
                    self._banner(f"lictor: authentication failed: {reason}\n")
                return None
            key = await check(username, cert)
            if key is None and self.config.is_trusted_ca(cert.signing_key):
                self._key_refused(
                    f"certificate {cert.key.get_fingerprint('sha256')} for {username!r}: not one of its principals, "
                    "outside its validity or from an address it does not allow"
                )
            return key

        conn._validate_openssh_certificate = principals_required  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        if not self._session.done():
            self._session.set_exception(ConnectionError("the connection was closed"))
            self._session.exception()  # nobody waits: mark it retrieved
            if isinstance(exc, asyncssh.ProtocolError):
                self._refused_before_login(exc)
            self._audit_keys_refused()
            return
        if self._session.exception() is None:
            session = self._session.result()
            try:
                self._oversized(session, exc)
            except Exception:
                log.exception("ssh target %s: auditing an oversized packet failed", self.config.name)
            for bridge in list(self.bridges):  # forwards still open: how much went through, before the session ends
                bridge.close()
            for server in list(self.sftp_servers):  # files still open: their transfers, before the session ends
                try:
                    server.record_open_transfers()
                except Exception:
                    log.exception("ssh target %s: recording the open transfers failed", self.config.name)
            task = asyncio.ensure_future(session.close(channels=self._channels, reason=str(exc) if exc else "closed"))
            self.listener.closing.add(task)
            task.add_done_callback(self.listener.closing.discard)

    def _audit_login_refused(self, reason: str) -> None:
        """Audit a login this connection was refused (``auth.failed``; never fails the connection's close)."""
        self.gateway.audit_event(
            "auth.failed",
            {"protocol": "ssh", "target": self.config.name, "peer": self.peer, "reason": reason},
            fail_closed=False,
        )

    def _key_refused(self, what: str) -> None:
        if what not in self._keys_refused and len(self._keys_refused) < KEYS_REFUSED_TOLD:
            self._keys_refused.append(what)

    def _audit_keys_refused(self) -> None:
        """A connection that never logged in and offered public keys or certificates the target does not accept:
        audited once, as each failed token is (asyncssh refuses a key without a word to anyone). A login that
        succeeds after the client tried its other keys first is not a refusal."""
        if not self._keys_refused:
            return
        reason = f"no public key or certificate offered was accepted: {', '.join(self._keys_refused)}"
        self._audit_login_refused(reason)

    def _refused_before_login(self, exc: asyncssh.ProtocolError) -> None:
        """A connection asyncssh closed for breaking the protocol before anyone logged in (a packet longer than it
        reads, text that is not SSH): there is no session to record it in, so it is audited as a refused
        connection, floods of them as one event with a count."""
        length = getattr(self.conn, "_pktlen", 0)
        limit = getattr(self.conn, "_max_recv_pktlen", MAX_PACKET)
        reason = (
            f"a packet of {length} bytes before login is longer than the {limit} bytes the gateway reads"
            if length > limit
            else f"the client broke the SSH protocol before login: {exc.reason}"
        )
        event = {"protocol": "ssh", "target": self.config.name, "peer": self.peer, "reason": reason}
        if self.gateway.audit_burst(f"ssh:{self.config.name}:protocol-error", "connection.refused", event):
            log.warning("ssh target %s: closed a connection from %s: %s", self.config.name, self.peer, reason)

    def _oversized(self, session: Session, exc: Exception | None) -> None:
        """When asyncssh closed the connection for a packet longer than it reads, audit (and so record) that as a
        denial of the session: whatever the packet asked for was refused, and the agent saw only the connection
        close ("Max packet size exceeded")."""
        conn = self.conn
        length = getattr(conn, "_pktlen", 0)
        limit = getattr(conn, "_max_recv_pktlen", MAX_PACKET)
        if not isinstance(exc, asyncssh.ProtocolError) or length <= limit:
            return
        message = (
            f"a packet of {length} bytes is longer than the {limit} bytes the gateway reads; "
            "the connection was closed and what the packet asked for was not done"
        )
        request = Request(
            protocol="ssh",
            action="oversized_packet",
            attrs={"channel": "connection", "parse_error": message},
            target=self.config.name,
            summary=f"oversized packet ({length} bytes)",
            payload=f"oversized packet {length}",
        )
        session.audit(request, Decision.deny(message, UNPARSABLE_RULE, session.policy.version))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def _disconnect(self, reason: str) -> None:
        """Close the connection with ``reason``, which the agent's ssh prints ("Received disconnect ...")."""
        if self.conn is None:
            return
        try:
            self.conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE, reason)
        except Exception:
            self.conn.close()

    def next_channel(self) -> int:
        self._channels += 1
        return self._channels

    def take_channel(self) -> str | None:
        """Count a channel as open; when the connection already has ``max_channels``, the refusal to
        show the agent (each open channel may buffer up to its window: memory is bounded per connection)."""
        if self._open >= self.config.max_channels:
            return (
                f"lictor: this connection already has {self._open} open channels (the limit); "
                "close some or open another connection"
            )
        self._open += 1
        return None

    def release_channel(self) -> None:
        self._open -= 1

    async def ready(self) -> Session:
        """The gateway session, once authentication has completed."""
        return await asyncio.shield(self._session)

    def session_mask_plan(self, decision: Decision) -> Any:
        session = self._session.result()
        return session.mask_plan(decision)

    # -- authentication -------------------------------------------------------------------------

    def _over_limit(self, identity: Identity) -> bool:
        """Whether ``identity`` already has ``max_connections`` connections open to this target; if so the
        refusal is audited and shown to the agent (each connection may hold ``max_channels`` channels, each
        buffering up to its window: without a limit per identity, one agent could open them without end)."""
        limit = self.config.max_connections
        if self.listener.open_for((identity.issuer, identity.subject)) < limit:
            return False
        reason = (
            f"{identity.subject} already has {limit} connections open to this target (the limit); "
            "close one, or share one connection (ssh -o ControlMaster=auto -o ControlPath=...)"
        )
        self._audit_login_refused(reason)
        self._banner(f"lictor: {reason}\n")
        return True

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        self._candidate = None
        try:
            identity = await self.gateway.authenticate_async(
                password, protocol="ssh", target=self.config.name, peer=self.peer
            )
        except AuthError as exc:
            self._candidate = None  # nothing offered while the token was checked stands in for it
            cut = ""
            if len(password.encode()) == OPENSSH_PASSWORD_MAX:
                cut = (
                    f" (OpenSSH sends at most {OPENSSH_PASSWORD_MAX} bytes of a password, and this one is that long: "
                    "the token was probably cut; use a shorter token, or a key or certificate)"
                )
            self._banner(f"lictor: authentication failed: {exc}{cut}\n")
            return False
        except Exception:
            self._candidate = None
            log.exception("ssh target %s: token verification failed", self.config.name)
            self._banner("lictor: authentication failed: internal error\n")
            return False
        if self._over_limit(identity):
            return False
        self._candidate = (identity, "jwt")
        return True

    def public_key_auth_supported(self) -> bool:
        return bool(self.config.public_keys or self.config.user_cas)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._candidate = None
        entry = self.config.key_identity(key)
        if entry is None:
            self._key_refused(f"public key {key.get_fingerprint('sha256')} is not registered")
            return False
        identity = Identity(
            subject=entry.subject,
            claims={**entry.claims, "sub": entry.subject},
            issuer=f"ssh-public-key:{self.config.name}",
            token_id=entry.fingerprint,
            method="publickey",
        )
        if self._over_limit(identity):
            return False
        self._candidate = (identity, "publickey")
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._candidate = None
        if not self.config.is_trusted_ca(key):
            self._key_refused(f"certificate signed by {key.get_fingerprint('sha256')}, not a trusted CA")
            return False
        if not username:
            return False
        if self._certificates_unchecked:
            log.error(
                "ssh target %s: cannot check user certificates' principals; refusing the certificate", self.config.name
            )
            return False
        identity = Identity(
            subject=username,
            claims={"sub": username},
            issuer=f"ssh-user-ca:{key.get_fingerprint('sha256')}",
            method="certificate",
        )
        if self._over_limit(identity):
            return False
        self._candidate = (identity, "certificate")
        return True

    async def auth_completed(self) -> None:
        if self.conn is not None and getattr(self.conn, "_max_recv_pktlen", MAX_PACKET) < MAX_PACKET:
            self.conn._max_recv_pktlen = MAX_PACKET  # see MAX_PACKET
        candidate, self._candidate = self._candidate, None
        if candidate is None:  # cannot happen with the methods enabled; refuse rather than guess
            log.error("ssh target %s: authentication completed without an identity; closing", self.config.name)
            self._session.set_exception(ConnectionError("no identity"))
            self._session.exception()
            self.close()
            return
        identity, method = candidate
        key = (identity.issuer, identity.subject)
        if self.listener.open_for(key) >= self.config.max_connections:
            # another connection of the same identity completed its login meanwhile
            log.warning("ssh target %s: %s is at its connection limit; closing", self.config.name, identity.subject)
            self._session.set_exception(ConnectionError("connection limit"))
            self._session.exception()
            self.close()
            return
        self.identity_key = key
        try:
            session = await self.gateway.open_session(
                identity, protocol="ssh", target=self.config.name, peer=self.peer, method=method
            )
        except Exception as exc:
            log.exception("ssh target %s: could not open a session", self.config.name)
            if not self._session.done():
                self._session.set_exception(ConnectionError(f"the session could not be recorded ({exc})"))
                self._session.exception()
            # past authentication no banner can be sent: the disconnect's reason is what ssh prints
            self._disconnect("lictor: the gateway cannot record a session now, so it opens none; retry later")
            return
        session.meta["ssh_user"] = self.username
        if self._session.done():  # the connection went away meanwhile
            await session.close(reason="closed during authentication")
            return
        self._session.set_result(session)

    def _banner(self, text: str) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.send_auth_banner(text)

    # -- forwarding -----------------------------------------------------------------------------

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        return self._forward_local(dest_host, dest_port)

    async def _forward_local(self, host: str, port: int) -> asyncssh.SSHTCPSession[bytes]:
        session = await self.ready()
        request = forward_request("local", host, port, target=self.config.name)
        if len(host) > MAX_HOST_NAME:  # denied whatever the rules say (a rule on `*:22` would match it)
            message = f"the destination host name is {len(host)} bytes, longer than {MAX_HOST_NAME}"
            decision = Decision.deny(message, UNPARSABLE_RULE, session.policy.version)
            session.audit(request, decision)
        else:
            decision = session.decide_now(request)
        if decision.action == "approve":
            decision = await session.decide(request)

        def record(result: str) -> None:
            """The forward and what became of it: an allowed forward may still be refused or fail to connect."""
            session.record(
                "forward",
                {
                    "direction": "local",
                    "destination": f"{host}:{port}",
                    "action": decision.action,
                    "rule_ids": list(decision.rule_ids),
                    "result": result,
                },
            )

        if decision.action != "allow":
            record("denied")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, denial_text(request, decision))
        refused = self.take_channel()
        if refused is not None:
            record("refused: channel limit")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, refused)
        try:
            lease = await self.pool.acquire()
        except UpstreamError as exc:
            self.release_channel()
            record(f"failed: {exc}")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"lictor: {exc}") from None

        def ended(bridge: Bridge) -> None:
            """How much went each way, once the forward has closed (the recording had only its opening)."""
            self.bridges.discard(bridge)
            if not session.closed:
                session.record(
                    "forward.end",
                    {"destination": f"{host}:{port}", "bytes_sent": bridge.sent, "bytes_received": bridge.received},
                )

        bridge = Bridge(lease, self.release_channel)
        try:
            await lease.conn.create_connection(bridge.upstream_session, host, port)
        except (OSError, asyncssh.Error) as exc:
            bridge.close()
            record(f"failed: the target could not connect: {exc}")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"lictor: the target could not connect to {host}:{port}: {exc}"
            ) from None
        record("opened")
        bridge.ended = ended
        self.bridges.add(bridge)
        return bridge.agent_session()

    def tun_requested(self, unit: int | None) -> Awaitable[asyncssh.SSHTunTapSession]:
        return self._tunnel_refused("tun", unit)

    def tap_requested(self, unit: int | None) -> Awaitable[asyncssh.SSHTunTapSession]:
        return self._tunnel_refused("tap", unit)

    async def _tunnel_refused(self, kind: str, unit: int | None) -> asyncssh.SSHTunTapSession:
        """``ssh -w``: a network device on the target is never granted (it would route the agent's traffic past
        every rule); recorded like refused agent forwarding, and the agent told why (asyncssh refused it unseen)."""
        session = await self.ready()
        device = f"{kind}{'' if unit is None else unit}"
        session.record(
            "forward",
            {"direction": "tunnel", "destination": device, "action": "deny", "rule_ids": [], "result": "denied"},
        )
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            f"lictor: tunnel devices (ssh -w, {device}) are not allowed through the gateway",
        )

    def unix_connection_requested(self, dest_path: str) -> Awaitable[asyncssh.SSHUNIXSession[bytes]]:
        return self._forward_socket("local", dest_path)

    def unix_server_requested(self, listen_path: str) -> Awaitable[bool]:
        return self._forward_socket_remote(listen_path)

    def _socket_refused(self, session: Session, direction: str, path: str) -> str:
        """Decide (and audit) a Unix socket forwarding request, record it, and return the refusal: the gateway
        does not forward sockets, whatever the policy says (asyncssh refused them unseen, with nothing in the
        audit log or the recording and "Connection refused" as the only word to the agent)."""
        request = socket_forward_request(direction, path, target=self.config.name)
        decision = session.decide_now(request)
        allowed = decision.action == "allow"
        session.record(
            "forward",
            {
                "direction": f"{direction}-socket",
                "destination": path,
                "action": decision.action,
                "rule_ids": list(decision.rule_ids),
                "result": "refused: socket forwarding is not supported" if allowed else "denied",
            },
        )
        if allowed:
            return f"lictor: socket forwarding ({direction}) to {path} is not supported by the gateway"
        return denial_text(request, decision)

    async def _forward_socket(self, direction: str, path: str) -> asyncssh.SSHUNIXSession[bytes]:
        session = await self.ready()
        message = self._socket_refused(session, direction, path)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, message)

    async def _forward_socket_remote(self, path: str) -> bool:
        session = await self.ready()
        self._socket_refused(session, "remote", path)
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> Awaitable[bool]:
        told: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._refusals.append(told)  # taken (in order) by the session channels opened after this request
        del self._refusals[:-REFUSALS_TOLD]  # an agent asking again and again: the last ones are told (all audited)
        return self._forward_remote(listen_host, listen_port, told)

    async def _forward_remote(self, host: str, port: int, told: asyncio.Future[str | None]) -> bool:
        """Decide (and audit) an ``ssh -R`` request, which is refused whatever the policy says. The SSH reply to
        it carries no text (OpenSSH prints only "remote port forwarding failed"): the reason goes to the agent as
        a debug message (``ssh -v`` shows it) and on the stderr of the session channels it opens next."""
        text: str | None = None
        try:
            session = await self.ready()
            request = forward_request("remote", host, port, target=self.config.name)
            decision = session.decide_now(request)
            result = "denied"
            if decision.action == "allow":  # the policy allows it; the gateway does not forward to the agent
                log.warning("ssh target %s: remote port forwarding allowed by policy, not supported", self.config.name)
                result = "refused: remote forwarding is not supported"
                message = "remote port forwarding (-R) is not supported by the gateway"
                decision = Decision.deny(message, UNSUPPORTED_RULE, decision.policy_version)
                session.audit(request, decision, phase="protocol")  # what the agent got
            session.record(
                "forward",
                {
                    "direction": "remote",
                    "destination": f"{host}:{port}",
                    "action": decision.action,
                    "rule_ids": list(decision.rule_ids),
                    "result": result,
                },
            )
            text = denial_text(request, decision)
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.send_debug(text, always_display=True)
        finally:
            if not told.done():
                told.set_result(text)
        return False

    async def remote_forward_refusals(self) -> list[str]:
        """Why the remote forwards asked for on this connection so far were refused, each told once: a session
        channel writes them to its stderr."""
        taken, self._refusals = self._refusals, []
        texts = [await told for told in taken]
        return [text for text in texts if text]
