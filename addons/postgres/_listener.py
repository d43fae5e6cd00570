"""The PostgreSQL listener: one TCP server per ``listen`` address, serving the targets configured on it.

Connection set-up, in order (each step fails closed with a FATAL ErrorResponse the agent's client prints):

1. SSLRequest is answered ``S`` and TLS is terminated with the gateway's certificate (``N`` only when the
   target disables TLS). GSSENCRequest is answered ``N``. CancelRequest is routed to the target backend
   behind the (pid, key) the gateway handed out, then the connection is closed.
2. StartupMessage: the ``database`` picks the target (see :meth:`Route.select`); ``user`` is informational.
   Startup parameters that would change how SQL is read or bypass the policy (``options``, ``replication``,
   ``client_encoding`` other than UTF-8, ...) are refused; a few harmless ones are passed on.
3. The agent authenticates with its token as the password (AuthenticationCleartextPassword), which is only
   asked over TLS or from a loopback peer (or when ``allow_plaintext: true``).
4. The gateway logs in to the target with its own credentials, read-only at the database for read-only
   roles, and hands the agent the target's ParameterStatus values, a BackendKeyData of its own and
   ReadyForQuery. From there :class:`~._session.Relay` takes over.
"""

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pgparse
from lictor import AuditError, AuthError, Request, Target

from . import _protocol as pg
from ._classify import (
    MODIFYING_KINDS,
    RELATION_READING_FUNCTIONS,
    ROUNDING_FUNCTIONS,
    SQL_EXECUTING_FUNCTIONS,
    ClassificationError,
    classify,
)
from ._pipe import Pipe, PipeClosed
from ._requests import request_for_statement, requests_for_sql
from ._session import Classified, Relay, reason_of
from ._tls import ensure_certificate, server_context
from ._upstream import UpstreamConfig, UpstreamError, connect, send_cancel

if TYPE_CHECKING:
    from lictor import Gateway, Session

__all__ = ["PostgresListener", "Route", "parse_listen"]

log = logging.getLogger("lictor.postgres")

STARTUP_TIMEOUT = 30.0
MAX_SETTING_UP = 128
"""Connections that may be setting up at once (TLS, startup packet, login), over all PostgreSQL listeners.
Each holds a descriptor for up to twice STARTUP_TIMEOUT without a login: beyond this a connection is refused
at once (FATAL 53300), so that connections that never log in cannot take every descriptor of the gateway
(which its agents' upstream connections and its recordings need too)."""
DEFAULT_MAX_CONNECTIONS = 32
"""Connections one identity may have open to a target at a time (target option ``max_connections``)."""
CACHE_LIMIT = 20_000
CACHE_TEXT_LIMIT = 16_384

# Startup parameters passed on to the target (the gateway sets the ones that matter for parsing itself).
_PASSED_PARAMETERS = frozenset({"application_name", "datestyle", "timezone", "intervalstyle", "extra_float_digits"})
# Parameters a client may send that the gateway ignores (it sets client_encoding itself).
_IGNORED_PARAMETERS = frozenset({"user", "database", "client_encoding", "fallback_application_name"})
# Settings the gateway fixes at login: an agent's value is decided like a SET, then the gateway's wins.
_FIXED_SETTINGS = frozenset({"client_encoding", "standard_conforming_strings", "default_transaction_read_only"})


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def parse_options(text: str) -> list[tuple[str, str]]:
    """The settings of a libpq ``options`` string: ``-c name=value`` / ``--name=value``, space-separated,
    backslash escaping a space or a backslash. Any other switch is refused (ValueError becomes _Refused)."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    settings: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            assignment = words[i + 1]
            i += 2
        elif word.startswith("-c") and len(word) > 2:
            assignment = word[2:]
            i += 1
        elif word.startswith("--") and "=" in word:
            assignment = word[2:]
            i += 1
        else:
            raise _Refused(
                "42501",
                f"startup option {word!r} is not accepted by the gateway",
                "Only -c name=value settings may be given in options.",
            )
        name, sep, value = assignment.partition("=")
        if not sep:
            raise _Refused("42501", f"startup option {assignment!r} needs name=value")
        settings.append((name.replace("-", "_"), value))
    return settings


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces)."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address {text!r} must be HOST:PORT")
    return host or "0.0.0.0", int(port)


def _is_loopback(peer: Any) -> bool:
    try:
        return ipaddress.ip_address(peer[0]).is_loopback if peer else False
    except (ValueError, TypeError, IndexError):
        return False


@dataclass
class Route:
    """One listen address and the targets behind it."""

    listener: "PostgresListener"
    host: str
    port: int
    targets: list[Target]
    ssl_context: ssl.SSLContext | None
    allow_plaintext: bool
    server: asyncio.base_events.Server | None = None
    target: Target = field(init=False)

    def __post_init__(self) -> None:
        self.target = self.targets[0]

    def select(self, database: str) -> Target | None:
        """The target for a startup ``database``: the only one, or the one named so (or whose upstream
        database is so named) when several share this address."""
        if len(self.targets) == 1:
            return self.targets[0]
        for t in self.targets:
            if t.name == database:
                return t
        for t in self.targets:
            if str((t.get("upstream") or {}).get("database") or "") == database:
                return t
        return None


@dataclass
class _CancelEntry:
    key: bytes
    upstream: UpstreamConfig
    pid: int
    real_key: bytes
    relay: Relay | None = None


class PostgresListener:
    """All PostgreSQL listeners of one gateway process."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.routes: list[Route] = []
        self.upstreams: dict[str, UpstreamConfig] = {}
        self.relays: set[Relay] = set()
        self._cancel: dict[int, _CancelEntry] = {}
        self._cache: dict[tuple[str, str, str], Classified] = {}
        self._shapes: dict[tuple[str, str, str], Classified] = {}
        self._handshakes: set[asyncio.Task[Any]] = set()
        self.per_identity: dict[tuple[str, str, str], int] = {}  # open connections per (target, issuer, sub)
        self.setting_up = 0  # connections not logged in yet (see MAX_SETTING_UP)

    # -- configuration -----------------------------------------------------------------------------

    def configure(self, targets: Iterable[Target]) -> None:
        """Group the targets by listen address and prepare TLS; raise ValueError on a bad config."""
        by_address: dict[tuple[str, int], list[Target]] = {}
        for target in targets:
            try:
                host, port = parse_listen(str(target.get("listen", "")))
                by_address.setdefault((host, port), []).append(target)
                self.upstreams[target.name] = UpstreamConfig.from_settings(
                    target.get("upstream") or {}, self.gateway.config.resolve
                )
            except ValueError as exc:
                raise ValueError(f"{target.where}: {exc}") from None
        routes = []
        for (host, port), group in by_address.items():
            tls_settings = [dict(t.get("tls") or {}) for t in group]
            enabled = [s.get("enabled", True) for s in tls_settings]
            if len(set(enabled)) > 1:
                raise ValueError(f"{group[-1].where}: targets on {host}:{port} disagree on tls.enabled")
            plaintext = {bool(t.get("allow_plaintext", False)) for t in group}
            if len(plaintext) > 1:
                raise ValueError(f"{group[-1].where}: targets on {host}:{port} disagree on allow_plaintext")
            ctx = None
            if enabled[0]:
                try:
                    ctx = self._tls_context(tls_settings[0], host)
                except (ValueError, OSError, ssl.SSLError) as exc:
                    raise ValueError(f"{group[0].where}: tls: {exc}") from None
            routes.append(Route(self, host, port, group, ctx, plaintext.pop()))
        self.routes = routes

    def _tls_context(self, settings: Mapping[str, Any], host: str) -> ssl.SSLContext:
        cert, key = settings.get("cert"), settings.get("key")
        if bool(cert) != bool(key):
            raise ValueError("tls needs both cert and key (or neither, for a gateway-made certificate)")
        if cert and key:
            cert_path, key_path = self.gateway.config.resolve(str(cert)), self.gateway.config.resolve(str(key))
        else:
            cert_path, key_path, _ = ensure_certificate(
                Path(self.gateway.state_dir) / "tls" / "postgres", [host] if host else []
            )
        return server_context(cert_path, key_path)

    # -- running -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for route in self.routes:
            names = ", ".join(t.name for t in route.targets)
            try:
                route.server = await loop.create_server(
                    lambda route=route: _AgentProtocol(route),  # type: ignore[misc]
                    route.host,
                    route.port,
                    reuse_address=True,
                    backlog=512,
                )
            except OSError as exc:
                # a pgbouncer or another gateway on 6432, say: name the setting and the way out
                why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise OSError(
                    f"postgres target {names}: cannot listen on {route.host}:{route.port} ({why}): stop what "
                    "listens there, or give the target another listen address",
                ) from exc
            log.info("postgres listener on %s:%s for %s", route.host, route.port, names)

    async def stop(self) -> None:
        for route in self.routes:
            if route.server is not None:
                route.server.close()
        for task in list(self._handshakes):
            task.cancel()
        goodbye = pg.error_response("FATAL", "57P01", "lictor: the gateway is shutting down; reconnect later")
        for relay in list(self.relays):
            relay.shutdown("gateway stopping", goodbye)
        for route in self.routes:
            if route.server is not None:
                try:
                    await asyncio.wait_for(route.server.wait_closed(), 2)
                except TimeoutError:
                    pass

    # -- connections setting up --------------------------------------------------------------------

    def set_up(self, _task: "asyncio.Task[Any]") -> None:
        """A connection's set-up ended (logged in and relayed, refused, or lost)."""
        self.setting_up -= 1

    def refuse_busy(self, agent: "_AgentProtocol") -> None:
        """Refuse a connection at once: MAX_SETTING_UP connections are setting up. It gets an ErrorResponse
        before its startup packet is read (libpq reports it, as it does the server's when it cannot start a
        backend); the refusals are audited in bursts (a flood must not fill the audit spool as well)."""
        agent.closed = True
        transport = agent.transport
        if transport is not None:
            transport.write(
                pg.error_response(
                    "FATAL",
                    "53300",
                    f"lictor: too many connections are being set up at this gateway at once ({MAX_SETTING_UP})",
                    hint="Retry in a moment.",
                )
            )
            transport.close()
        reason = f"{MAX_SETTING_UP} connections were setting up at once"
        event = {"protocol": "postgres", "sqlstate": "53300", "reason": reason}
        if self.gateway.audit_burst("postgres:setting-up", "connection.refused", event):
            log.warning("postgres: refusing connections: %s (audited with a count every 10 s)", reason)

    # -- classification cache ----------------------------------------------------------------------

    def classify(self, target: str, database: str, sql: str) -> Classified:
        """Classify ``sql``, from a cache when the same text (or the same statement with other
        constants, see :func:`constant_insensitive`) was classified before."""
        key = (target, database, sql)
        found = self._cache.get(key)
        if found is not None:
            return found
        if len(sql) > CACHE_TEXT_LIMIT:
            return build_classified(sql, target, database)
        shape_key: tuple[str, str, str] | None = None
        try:
            shape_key = (target, database, pgparse.normalize(sql))
        except Exception:  # does not parse: the full classification says so
            shape_key = None
        if shape_key is not None:
            template = self._shapes.get(shape_key)
            if template is not None:
                result = template.for_text(sql, reason_of(sql))
                self._store(key, result)
                return result
        result = build_classified(sql, target, database)
        self._store(key, result)
        if shape_key is not None and constant_insensitive(result, shape_key[2]):
            if len(self._shapes) >= CACHE_LIMIT:
                self._shapes.clear()
            self._shapes[shape_key] = result
        return result

    def _store(self, key: tuple[str, str, str], result: Classified) -> None:
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = result

    # -- cancel ------------------------------------------------------------------------------------

    def register_cancel(self, upstream: UpstreamConfig, pid: int, real_key: bytes) -> tuple[int, bytes]:
        while True:
            fake_pid = secrets.randbits(31) or 1
            if fake_pid not in self._cancel:
                break
        fake_key = secrets.token_bytes(4)
        self._cancel[fake_pid] = _CancelEntry(fake_key, upstream, pid, real_key)
        return fake_pid, fake_key

    def attach_cancel(self, fake_pid: int, relay: Relay) -> None:
        entry = self._cancel.get(fake_pid)
        if entry is not None:
            entry.relay = relay

    def forget_cancel(self, fake_pid: int) -> None:
        self._cancel.pop(fake_pid, None)

    async def cancel(self, pid: int, key: bytes) -> None:
        entry = self._cancel.get(pid)
        if entry is None or not hmac.compare_digest(entry.key, key):
            log.info("ignoring a cancel request with an unknown key")
            return
        if entry.relay is not None:
            entry.relay.cancel_hold()  # a statement waiting in the gateway (approval) is given up
        await send_cancel(entry.upstream, entry.pid, entry.real_key)


def build_classified(sql: str, target: str, database: str) -> Classified:
    """Classify ``sql`` into requests plus the names of prepared statements and cursors it touches."""
    reason = reason_of(sql)
    try:
        statements = classify(sql)
    except ClassificationError:
        requests = requests_for_sql(sql, target=target, database=database, reason=reason)
        return Classified(tuple(requests), frozenset({"unknown"}))
    if not statements:
        requests = requests_for_sql(sql, target=target, database=database, reason=reason)
        return Classified(tuple(requests), frozenset({"empty"}), statements=0)
    requests_list: list[Request] = []
    kinds: set[str] = set()
    prepares: list[tuple[str, Request]] = []
    executes: list[str] = []
    deallocates: list[str | None] = []
    cursors: list[str] = []
    fetches: list[str] = []
    closes: list[str | None] = []
    discard_all = False
    # Names an earlier statement of this query prepared or declared: an EXECUTE or FETCH of one runs what this
    # query's own PREPARE or DECLARE holds, which is decided (and masked) with the query. Procedural code (DO,
    # CALL) may close and open cursors of any name: after it, names are looked up as the gateway knew them.
    prepared_here: set[str] = set()
    declared_here: set[str] = set()
    for st in statements:
        request = request_for_statement(st, target=target, database=database, reason=reason)
        requests_list.append(request)
        kinds |= st.kinds
        if st.kinds & {"do", "call"}:
            prepared_here.clear()
            declared_here.clear()
        if st.kind == "prepare" and st.prepared_name:
            prepares.append((st.prepared_name, request))
            prepared_here.add(st.prepared_name)
        elif st.kind == "deallocate":
            deallocates.append(st.prepared_name)
            if st.prepared_name is None:
                prepared_here.clear()
            else:
                prepared_here.discard(st.prepared_name)
        if not (st.kinds & {"execute", "declare_cursor", "fetch", "close_cursor", "discard"}):
            continue
        for node_type, body in _nodes(st.text):
            if node_type == "ExecuteStmt":
                name = str(body.get("name", ""))
                if name not in prepared_here:
                    executes.append(name)
            elif node_type == "DeclareCursorStmt":
                cursors.append(str(body.get("portalname", "")))
                declared_here.add(cursors[-1])
            elif node_type == "FetchStmt":
                name = str(body.get("portalname", ""))
                if name not in declared_here:
                    fetches.append(name)
            elif node_type == "ClosePortalStmt":
                closes.append(str(body["portalname"]) if body.get("portalname") else None)
                if closes[-1] is None:
                    declared_here.clear()
                else:
                    declared_here.discard(closes[-1])
            elif node_type == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
                discard_all = True
                prepared_here.clear()
                declared_here.clear()
    return Classified(
        requests=tuple(requests_list),
        kinds=frozenset(kinds),
        prepares=tuple(prepares),
        executes=tuple(executes),
        deallocates=tuple(deallocates),
        cursors=tuple(cursors),
        fetches=tuple(fetches),
        closes=tuple(closes),
        discard_all=discard_all,
        copy_to="copy_to" in kinds,
        copy_from="copy_from" in kinds,
        copy_rewrites=any(st.copy_rewrites for st in statements),
        statements=len(statements),
    )


_SHAPE_KINDS = frozenset({"select", "insert", "update", "delete", "merge"})
# Functions whose constant arguments the classifier reads (a setting name, SQL text, a rounding's scale, the
# relation table_to_xml reads).
_CONSTANT_READERS = frozenset(
    {"set_config", *SQL_EXECUTING_FUNCTIONS, *ROUNDING_FUNCTIONS, *RELATION_READING_FUNCTIONS}
)
_SHAPE_KEYWORDS = re.compile(r"\b(limit|fetch|offset)\b", re.IGNORECASE)


def constant_insensitive(classified: Classified, normalized: str) -> bool:
    """Whether every text that normalizes like this one (same statement, other constants) classifies
    the same way, so the classification can be reused for it.

    True only for one plain SELECT/INSERT/UPDATE/DELETE/MERGE whose classification reads no constant:
    no ``set_config`` or SQL-running function (their arguments are read), no LIMIT/FETCH/OFFSET (the
    limit is an attribute), no settings changed or read, no dynamic SQL, no bodies, no COPY.
    """
    if classified.statements != 1 or len(classified.requests) != 1:
        return False
    attrs = classified.requests[0].attrs
    if not classified.kinds <= _SHAPE_KINDS:
        return False
    if attrs.get("limit") is not None or attrs.get("dynamic_sql") or attrs.get("read_write_attempt"):
        return False
    if attrs.get("settings") or attrs.get("languages") or attrs.get("copy_target") is not None:
        return False
    if attrs.get("settings_read"):  # current_setting('x'), pg_settings WHERE name = 'x': the name is a constant
        return False
    functions = attrs.get("functions") or ()
    if any(str(f).rsplit(".", 1)[-1] in _CONSTANT_READERS for f in functions):
        return False
    return _SHAPE_KEYWORDS.search(normalized) is None


def _nodes(sql: str) -> list[tuple[str, dict[str, Any]]]:
    """Every parse-tree node of ``sql`` whose key ends in ``Stmt`` (iteratively)."""
    found: list[tuple[str, dict[str, Any]]] = []
    try:
        stack: list[Any] = [pgparse.parse(sql)]
    except Exception:  # already classified: a failure here cannot happen for a text that parsed
        return found
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("Stmt") and isinstance(value, dict):
                    found.append((key, value))
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return found


def read_only_session(session: "Session", target: Target) -> bool:
    """Whether the target session runs read-only at the database (``default_transaction_read_only``).

    Read-only when the identity holds a role listed in the target's ``read_only_roles``, or when none of
    its roles has an allow or approve rule (for PostgreSQL and this target) that could let a modifying
    statement through: a rule matching any statement kind, or naming a modifying kind.
    """
    policy = session.policy
    roles = session.roles(policy)
    if set(roles) & {str(r) for r in target.get("read_only_roles") or ()}:
        return True
    for name in roles:
        role = policy.roles.get(name)
        if role is None:
            continue
        for rule in role.rules:
            if rule.protocol != "postgres" or rule.action not in ("allow", "approve"):
                continue
            if not rule.target_matches(target.name):
                continue
            if rule.index_values is None or rule.index_values & MODIFYING_KINDS:
                return False
    return True


class _AgentProtocol(Pipe):
    """The agent side; starts the handshake task when the connection is made."""

    def __init__(self, route: Route) -> None:
        super().__init__("agent")
        self.route = route

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        listener = self.route.listener
        if listener.setting_up >= MAX_SETTING_UP:
            listener.refuse_busy(self)
            return
        listener.setting_up += 1
        task = asyncio.ensure_future(_Handshake(self.route, self).run())
        listener._handshakes.add(task)
        task.add_done_callback(listener._handshakes.discard)
        task.add_done_callback(listener.set_up)


class _Refused(Exception):
    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.hint = hint


class _Handshake:
    def __init__(self, route: Route, agent: _AgentProtocol) -> None:
        self.route = route
        self.listener = route.listener
        self.gateway = route.listener.gateway
        self.agent = agent
        self.peer = agent.transport.get_extra_info("peername") if agent.transport else None
        self.peer_text = f"{self.peer[0]}:{self.peer[1]}" if self.peer else "?"
        self.tls = False
        self.reader = pg.FrontendReader()
        self._counted: tuple[str, str, str] | None = None  # the identity this connection counts against
        self._relaying = False  # the relay owns the count from here on

    async def run(self) -> None:
        session = None
        try:
            startup = await asyncio.wait_for(self._startup(), STARTUP_TIMEOUT)
            if startup is None:
                self.agent.close()
                return
            target = self._select_target(startup)
            params, settings = self._check_parameters(startup)
            identity = await asyncio.wait_for(self._authenticate(target), STARTUP_TIMEOUT)
            self._count(target, identity)
            try:
                session = await self.gateway.open_session(
                    identity, protocol="postgres", target=target.name, peer=self.peer_text, method="jwt"
                )
            except AuditError as exc:
                log.error("postgres session refused: it cannot be recorded: %s", exc)
                raise _Refused(
                    "57P03",
                    "the gateway cannot record sessions right now (its audit and recording store is unavailable), "
                    "so new connections are refused (fail closed)",
                    "Retry later: connections are accepted again once the store takes writes.",
                ) from None
            session.meta["pg_user"] = startup.user or ""
            session.meta["pg_database"] = startup.database or ""
            session.meta["tls"] = self.tls
            self._decide_settings(session, target, settings)
            params.update((name.lower(), value) for name, value in settings if name.lower() not in _FIXED_SETTINGS)
            await self._relay(session, target, startup, params)
        except _Refused as exc:
            self.agent.write(pg.error_response("FATAL", exc.sqlstate, f"lictor: {exc}", hint=exc.hint))
            self.agent.close()
            self._audit_refusal(exc.sqlstate, str(exc))
            if session is not None:
                await session.close(reason=str(exc))
        except pg.ProtocolError as exc:
            self.agent.write(pg.error_response("FATAL", "08P01", f"lictor: protocol violation: {exc}"))
            self.agent.close()
            self._audit_refusal("08P01", f"protocol violation: {exc}")
            if session is not None:
                await session.close(reason=f"protocol violation: {exc}")
        except (PipeClosed, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            self.agent.abort()
            if session is not None:
                await session.close(reason=f"connection lost during set-up: {exc}")
        except asyncio.CancelledError:
            self.agent.abort()
            if session is not None:
                await session.close(reason="gateway stopping")
            raise
        except Exception:
            log.exception("internal error during PostgreSQL connection set-up (connection refused)")
            self.agent.write(pg.error_response("FATAL", "XX000", "lictor: internal error in the gateway"))
            self.agent.close()
            self._audit_refusal("XX000", "internal error in the gateway")
            if session is not None:
                await session.close(reason="internal error")
        finally:
            if not self._relaying:
                self._uncount()

    def _count(self, target: Target, identity: Any) -> None:
        """Count this connection against its identity, or refuse it at ``max_connections``: each one holds a
        server backend, and an agent looping over connections would take the database's all."""
        limit = int(target.get("max_connections", DEFAULT_MAX_CONNECTIONS))
        key = (target.name, str(identity.issuer), str(identity.subject))
        if self.listener.per_identity.get(key, 0) >= limit:
            raise _Refused(
                "53300",
                f"{identity.subject} already has {limit} connections open to target {target.name!r} (the limit)",
                "Close connections you no longer use, or share them (a connection pool of fewer connections).",
            )
        self.listener.per_identity[key] = self.listener.per_identity.get(key, 0) + 1
        self._counted = key

    def _uncount(self) -> None:
        key, self._counted = self._counted, None
        if key is None:
            return
        left = self.listener.per_identity.get(key, 1) - 1
        if left > 0:
            self.listener.per_identity[key] = left
        else:
            self.listener.per_identity.pop(key, None)

    def _audit_refusal(self, sqlstate: str, reason: str) -> None:
        self.gateway.audit_event(
            "connection.refused",
            {"protocol": "postgres", "peer": self.peer_text, "sqlstate": sqlstate, "reason": reason},
            fail_closed=False,
        )

    async def _read(self) -> list[pg.FrontendMessage]:
        while True:
            messages = self.reader.feed(await self.agent.read())
            if messages:
                return messages

    async def _startup(self) -> pg.StartupMessage | None:
        loop = asyncio.get_running_loop()
        while True:
            messages = await self._read()
            message = messages[0]
            if len(messages) > 1:
                raise pg.ProtocolError("unexpected data after the startup packet")
            if isinstance(message, pg.SSLRequest):
                ctx = self.route.ssl_context
                if self.tls or ctx is None:
                    self.agent.write(pg.ssl_response(False))
                    continue
                self.agent.write(pg.ssl_response(True))
                transport = self.agent.transport
                assert transport is not None
                tls_transport = await loop.start_tls(transport, self.agent, ctx, server_side=True)
                if tls_transport is None:
                    raise ConnectionError("TLS handshake failed")
                self.agent.set_transport(tls_transport)
                self.tls = True
                continue
            if isinstance(message, pg.GSSENCRequest):
                self.agent.write(pg.ssl_response(False))
                continue
            if isinstance(message, pg.CancelRequest):
                await self.listener.cancel(message.pid, message.key)
                return None
            if isinstance(message, pg.StartupMessage):
                return message
            raise pg.ProtocolError(f"unexpected {type(message).__name__} during startup")

    def _select_target(self, startup: pg.StartupMessage) -> Target:
        database = startup.database or startup.user or ""
        target = self.route.select(database)
        if target is None:
            names = ", ".join(sorted(t.name for t in self.route.targets))
            raise _Refused(
                "3D000",
                f'database "{database}" is not served by this gateway address',
                f"Connect with dbname set to one of: {names}.",
            )
        return target

    def _check_parameters(self, startup: pg.StartupMessage) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Split the startup parameters: passed on as they are, or settings the policy must decide."""
        passed: dict[str, str] = {}
        settings: list[tuple[str, str]] = []
        for name, value in startup.params.items():
            lname = name.lower()
            if lname in _IGNORED_PARAMETERS or name.startswith("_pq_."):
                continue
            if lname in _PASSED_PARAMETERS:
                passed[name] = value
            elif lname == "options":
                settings.extend(parse_options(value))
            elif lname == "replication":
                raise _Refused("42501", "replication connections are not served by the gateway")
            else:
                settings.append((name, value))
        for name, _ in settings:
            if not _SETTING_NAME.fullmatch(name):
                raise _Refused("42501", f"startup setting {name!r} is not a valid setting name")
        return passed, settings

    def _decide_settings(self, session: "Session", target: Target, settings: list[tuple[str, str]]) -> None:
        """Startup settings are decided exactly like the SET statements they amount to."""
        for name, value in settings:
            sql = f"SET {name} = '{value.replace(chr(39), chr(39) * 2)}'"
            classified = self.listener.classify(target.name, "", sql)
            for request in classified.requests:
                decision = session.decide_now(request)
                if decision.action != "allow":
                    raise _Refused(
                        "42501",
                        f"startup setting {name}={value!r} is not allowed: {decision.message}",
                        f"Remove it from the connection string (rule {', '.join(decision.rule_ids)}).",
                    )

    async def _authenticate(self, target: Target) -> Any:
        if not (self.tls or _is_loopback(self.peer) or self.route.allow_plaintext):
            raise _Refused(
                "28000",
                "TLS is required to send a token to this gateway",
                "Connect with sslmode=require (or verify-full with the gateway's CA certificate).",
            )
        self.agent.write(pg.authentication_cleartext_password())
        messages = await self._read()
        message = messages[0]
        if len(messages) > 1 or not isinstance(message, pg.PasswordMessage):
            raise pg.ProtocolError("expected a password message")
        token = message.password().strip()
        if not token:
            raise _Refused("28P01", "no token given", "Use a Lictor token as the password (PGPASSWORD).")
        try:
            return await self.gateway.authenticate_async(
                token, protocol="postgres", target=target.name, peer=self.peer_text
            )
        except AuthError as exc:
            raise _Refused(
                "28P01",
                f"authentication failed: {exc}",
                "Use a valid Lictor token as the password (PGPASSWORD); get one with `lictor token issue`.",
            ) from None

    async def _relay(
        self, session: "Session", target: Target, startup: pg.StartupMessage, params: dict[str, str]
    ) -> None:
        config = self.listener.upstreams[target.name]
        read_only = read_only_session(session, target)
        upstream_params = {
            **params,
            "client_encoding": "UTF8",
            "standard_conforming_strings": "on",
        }
        upstream_params.setdefault("application_name", "lictor")
        if read_only:
            upstream_params["default_transaction_read_only"] = "on"
        try:
            upstream = await connect(config, upstream_params, name=f"upstream:{target.name}")
        except UpstreamError as exc:
            log.warning("target %s: login failed: %s", target.name, exc)
            if exc.sqlstate[:2] in ("22", "25", "42", "55") and exc.sqlstate != "42501":
                # A bad startup setting of the agent's (invalid value, unknown parameter, one that cannot be
                # set at login or without a restart): say which.
                raise _Refused(exc.sqlstate, f"the target refused the connection: {exc}") from None
            raise _Refused(
                "08006",
                f"cannot connect to target {target.name!r}",
                "The gateway could not log in to the database; tell the gateway operators.",
            ) from None
        if upstream.parameters.get("standard_conforming_strings", "on") != "on":
            upstream.pipe.abort()
            raise _Refused("42501", f"target {target.name!r} runs with standard_conforming_strings off")
        fake_pid, fake_key = self.listener.register_cancel(config, upstream.pid, upstream.key)
        hello = [pg.authentication_ok()]
        for name, value in upstream.parameters.items():
            hello.append(pg.parameter_status(name, value))
        hello.append(pg.backend_key_data(fake_pid, fake_key))
        hello.append(pg.ready_for_query(upstream.status))
        session.meta["read_only"] = read_only
        session.record(
            "connect",
            {
                "target": target.name,
                "database": startup.database,
                "user": startup.user,
                "read_only": read_only,
                "tls": self.tls,
                "server_version": upstream.parameters.get("server_version", ""),
            },
        )

        def done(relay: Relay) -> None:
            self._uncount()
            self.listener.relays.discard(relay)
            self.listener.forget_cancel(fake_pid)
            task = asyncio.ensure_future(
                session.close(
                    statements=relay.stats.statements,
                    denied=relay.stats.denied,
                    rows=relay.stats.rows,
                    reason=relay.end_reason,
                )
            )
            self.listener._handshakes.add(task)
            task.add_done_callback(self.listener._handshakes.discard)

        relay = Relay(
            self.listener,
            target,
            session,
            self.agent,
            upstream.pipe,
            reader=self.reader,
            database=startup.database or "",
            read_only=read_only,
            status=upstream.status,
            on_done=done,
            backend_pids=(upstream.pid, fake_pid),
        )
        self._relaying = True
        self.listener.relays.add(relay)
        self.listener.attach_cancel(fake_pid, relay)
        self.agent.write(b"".join(hello))
        relay.start(self.agent.take_buffered(), upstream.pipe.take_buffered())
