"""The embedded mitmproxy: one reverse-proxy listener per target, enforced request by request.

Theory of operation
-------------------
One mitmproxy ``Master`` runs on the gateway's event loop with a reverse-proxy mode per target
(``reverse:UPSTREAM@LISTEN``) and only the mitmproxy addons a reverse proxy needs (proxy server, next layer,
TLS). :class:`LictorProxy` sits before mitmproxy's TLS addon; :class:`FailClosedGate` is the last addon.

mitmproxy's addon manager catches an addon's exception, logs it and carries on with the flow: a failing
hook would forward the request it should have stopped. So:

1. **Default deny.** The ``request`` hook first marks the flow not allowed and sets the mark to allowed only
   as its very last step, after the decision was ``allow`` and the request was rewritten for the upstream.
2. **Every hook body is wrapped**; an exception answers the flow with a denial (or, once a response has
   started streaming, closes the client connection) instead of propagating into ``safecall``.
3. **The gate** runs after every other addon and kills a request that is not marked allowed and has no
   answer, and replaces a response whose Lictor hook did not finish. It is deliberately tiny: it holds even
   if everything before it failed.

Requests are never streamed to the upstream (``stream_large_bodies`` stays unset: a streamed request body
would reach the upstream before the ``request`` hook decides). mitmproxy buffers request bodies, chunked or
not, up to ``body_size_limit`` (the largest ``max_body`` of the targets) and answers 413 itself for a body
that declares or reaches more, before buffering it; a body over its own target's ``max_body`` is answered
413 by the ``request`` hook. mitmproxy applies the same limit to responses, before any hook sees them, so
a download larger than ``max_body`` would get a 502: :func:`_request_bodies_only` keeps that check to
requests (what a response buffers is bounded by the ``responseheaders`` hook). Responses
are relayed through ``response.stream`` functions that mask on the way (see :mod:`._bodies`), or buffered
(known length up to ``http_buffer_limit``) and masked in the ``response`` hook. A JSON document masked whole
that is larger is answered with an error; of unknown length, its head waits until its body is known to fit
(:func:`_held_response_heads`).

Sessions: one Lictor session per client connection and identity. The bearer token is verified on every
request (verified tokens are cached until they expire, for at most a minute); a request without one is
answered 401. Agent credentials (``Authorization``, ``Proxy-Authorization``) and ``X-Lictor-*`` headers
never reach the upstream; the target's credentials are set instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hashlib
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit, urlunsplit

import mitmproxy
from lictor import AuditError, AuthError, Decision, Gateway, Identity, Request, Session, agent_reason
from lictor.shell import ShellIncompleteError, ShellParseError, ShellState, analyse, stdin_shell
from mitmproxy import http, tls
from mitmproxy.addons import next_layer, proxyserver, tlsconfig
from mitmproxy.connection import Client
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from OpenSSL import SSL

from . import _bodies as bodies
from . import _dispatch, _lean
from ._config import HttpTarget
from ._requests import (
    FORWARDING_HEADERS,
    IDENTITY_HEADER_PREFIXES,
    SECRET_HEADERS,
    WS_BEARER_PREFIX,
    BodyTooLarge,
    K8sCall,
    Unreadable,
    access_review_document,
    access_review_request,
    content_codings,
    decoded_body,
    http_request,
    is_json_type,
    k8s_request,
    line_attrs,
    payload,
    redact_query,
    reveal_request,
    try_header,
)
from ._responses import Answer, denial, error, error_name, k8s_status
from ._tls import client_context, upstream_connection, upstream_context

log = logging.getLogger("lictor.http")

ALLOWED = "lictor.allowed"
STATE = "lictor.state"
ANSWERED = "lictor.answered"
EXPECTS_CONTINUE = "lictor.expect_continue"
_PARTIAL_HEADERS = frozenset({b"range", b"if-range"})  # ask for part of a response
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})  # Connection options that name no header
LINGER_CLOSE = 2.0  # seconds between a final answer written by Lictor itself and closing the connection
HEADERS_DONE = "lictor.responseheaders"
RESPONSE_DONE = "lictor.response"
WS_SEEN = "lictor.ws_seen"

DEFAULT_DENY = "lictor:default-deny"
UNREADABLE = "lictor:unreadable-request"
INTERNAL = "lictor:addon-error"
AUDIT_UNAVAILABLE = "lictor:audit-unavailable"
SPDY_RULE = "lictor:spdy-refused"
MASKED_WRITE_RULE = "lictor:masked-secret-write"
STDIN_PROGRAM_RULE = "lictor:exec-stdin-program"
STDIN_UNPARSABLE_RULE = "lictor:exec-stdin-unparsable"
TOO_LARGE_RULE = "lictor:response-too-large"
# A response withheld because the upstream sent it in a form the gateway cannot mask (compressed, UTF-16...).
UNMASKABLE_RULE = "lictor:response-unmaskable"
RETRY_HINT = "retry later or contact the gateway operators"
UNMASKABLE_HINT = (
    "the upstream sends this answer in a form the gateway cannot mask, so retrying gets the same answer; "
    "ask the gateway operators or the API's owners"
)
RULES_REVIEW_RULE = "lictor:rules-review"
HOLD_HEAD = "lictor.hold_head"  # the response's head waits for the first bytes its stream function relays
# What a masked Secret value reads as in a request body: base64 in JSON and YAML, raw bytes in protobuf.
MASKED_SECRET_FORMS = (bodies.REDACTED_B64.encode(), bodies.REDACTED.encode())
MASKED_SECRET_HINT = f"{bodies.REDACTED}, base64 {bodies.REDACTED_B64}"
PASSTHROUGH_BUFFER = 256 * 1024  # unmasked responses above this (or of unknown length) stream through
TOKEN_CACHE_TTL = 60.0
MAX_SETTING_UP = 128
"""Connections that may be waiting for their first request at once (over all HTTP/Kubernetes targets); one
more is closed at once. With the set-up timeout (option ``http_setup_timeout``), connections that send nothing
cannot take every descriptor of the gateway (the idle timeout, once a request came, is an hour)."""
TOKEN_CACHE_SIZE = 10_000
WS_RECORD_LIMIT = 4096
# Exec/attach output the masker holds back (the start of what may be a card number split across two
# messages) is released once the container has been quiet this long: all of it with a terminal (a
# prompt), whole lines without one (a pause inside a value does not split it); all of it before the
# exec's status message, which ends the output.
WS_FLUSH_IDLE = 0.05
STDIN_LINE_LIMIT = 64 * 1024
MAX_REQUEST_HEAD = 1024 * 1024  # request line and headers, as Go's servers (and so the API server) accept
# A WebSocket message is relayed (and masked) whole: mitmproxy collects its frames until the last one.
MAX_WS_MESSAGE = 16 * 1024 * 1024
CHANNEL_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
)
SPDY_MESSAGE = (
    "this gateway relays exec, attach and port-forward only over WebSockets, where it can inspect and record "
    "them; SPDY is refused. Use kubectl 1.30 or newer (WebSockets are the default since 1.31; on 1.29/1.30 "
    "set KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true)"
)


class BadAuth(ValueError):
    """The request's credentials are malformed (message for the agent)."""


@dataclass
class WsState:
    """A relayed WebSocket: Kubernetes channel protocol (exec/attach) or opaque messages."""

    channels: bool
    inspect_stdin: bool
    maskers: dict[int, Any] = field(default_factory=dict)
    stdin_buf: bytes = b""
    stdin_skip: bool = False  # dropping the rest of a refused over-long stdin line
    stdin_held: bytes = b""  # lines of a command not finished yet (if ... fi, a here-document), not forwarded
    shell_state: ShellState = field(default_factory=ShellState)  # what the lines forwarded so far may have set
    messages: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tty: bool = False
    flush_timer: asyncio.TimerHandle | None = None

    def cancel_flush(self) -> None:
        """Stop the idle release of held-back output (more output came, or the output ended)."""
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None


@dataclass
class FlowState:
    """What Lictor knows about one allowed flow."""

    target: HttpTarget
    session: Session
    request: Request
    decision: Decision
    call: K8sCall | None
    masking: bodies.Masking
    tap: bodies.Tap = field(default_factory=bodies.Tap)
    started: float = field(default_factory=time.monotonic)
    ws: WsState | None = None
    streamed: bool = False
    request_path: str = ""
    pending: dict[str, Any] | None = None  # the request's recording, written with the response


@dataclass
class ConnState:
    target: HttpTarget
    peer: str
    sessions: dict[str, Session] = field(default_factory=dict)
    waiting: set[asyncio.Task[Any]] = field(default_factory=set)  # request hooks of this connection
    deadline: asyncio.TimerHandle | None = None  # until its first request (set-up timeout); None after it


_ASCII_CHARSETS = frozenset(
    {"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1", "iso-8859-15", "windows-1252", "cp1252"}
)
# Response headers the detectors leave alone: the framing the gateway itself reads and sets.
_FRAMING_HEADERS = frozenset({"content-length", "content-type", "content-encoding", "transfer-encoding", "connection"})


def _encoding(values: Iterable[str]) -> str:
    """Every coding the headers' ``values`` declare, joined ("identity" when none)."""
    return ", ".join(content_codings(values)) or "identity"


def _unmaskable_charset(content_type: str) -> str | None:
    """A declared charset the detectors cannot read (UTF-16 and the like), None when there is none; with
    several charset parameters (clients differ on which counts), any of them."""
    found = (
        value.strip().strip('"').lower()
        for key, _, value in (param.partition("=") for param in content_type.split(";")[1:])
        if key.strip().lower() == "charset"
    )
    return next((c for c in found if c not in _ASCII_CHARSETS), None)


def _mask_headers(resp: http.Response, masking: bodies.Masking) -> None:
    """Mask what the detectors find in the response's headers (a Location with an e-mail address, a
    Content-Disposition with a card number): the agent and the recording get them masked."""
    if masking.plan_empty:
        return
    fields = resp.headers.fields
    values = [value for name, value in fields if name.lower() not in _FRAMING_HEADERS]
    if not values or not masking.plan.mask_bytes(b"\n".join(values))[1]:
        return  # one scan of them all finds nothing (the usual case): no header changes
    masked = tuple(
        (name, value if name.lower() in _FRAMING_HEADERS else masking.mask_bytes(value)) for name, value in fields
    )
    resp.headers.fields = masked


_JSON_LIKE = frozenset(
    {"text/json", "application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
     "application/json-seq"}
)  # fmt: skip


# JSON lines: one JSON value per line, which a stream of unknown length relays line by line.
_JSON_LINES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})


def _json_lines(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in _JSON_LINES


def _json_like(content_type: str) -> bool:
    """A response masked as JSON: JSON media types, and the JSON lines ones (NDJSON), whose \\u escapes the
    detectors could not read in the bytes."""
    return is_json_type(content_type) or content_type.split(";", 1)[0].strip().lower() in _JSON_LIKE


_MARKUP = frozenset(
    {"", "text/html", "text/xml", "application/xml", "application/xhtml+xml", "text/markdown", "text/x-markdown"}
)


def _markup(content_type: str) -> bool:
    """HTML or XML, whose character references a browser or parser reads as the characters they stand for;
    Markdown, whose renderers read them so too (CommonMark's entity and numeric references); without a type
    too, as browsers then sniff the body and render what looks like HTML."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _MARKUP or media.endswith("+xml")


def _mask_json_lines(masking: bodies.Masking, raw: bytes) -> bytes | None:
    """``raw`` masked as one JSON value per line (NDJSON, JSON Lines), None when a line is not JSON."""
    out: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            out.append(line)
            continue
        try:
            out.append(masking.mask_json_bytes(line))
        except bodies.BodyError:
            return None
    return b"\n".join(out)


def _peer(client: Client) -> str:
    addr = client.peername
    if not addr:
        return ""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _identity_key(identity: Identity) -> str:
    claims = {k: v for k, v in identity.claims.items() if k not in ("exp", "iat", "nbf", "jti")}
    return json.dumps([identity.issuer, identity.subject, claims], sort_keys=True, default=str)


def _header_list(headers: http.Headers) -> list[tuple[str, str]]:
    """All header fields as (lower-case name, value) text, in order: one pass over mitmproxy's fields."""
    return [
        (k.decode("utf-8", "surrogateescape").lower(), v.decode("utf-8", "surrogateescape")) for k, v in headers.fields
    ]


def _first(fields: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in fields:
        out.setdefault(k, v)
    return out


def _headers_for_record(headers: http.Headers | list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers if isinstance(headers, list) else _header_list(headers):
        if key in SECRET_HEADERS:
            value = "[REDACTED]"
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _body_for_record(data: bytes, truncated: bool = False, prefix: str = "") -> dict[str, Any]:
    if not data:
        return {}
    try:
        return {f"{prefix}body": data.decode("utf-8"), f"{prefix}body_truncated": truncated}
    except UnicodeDecodeError:
        return {f"{prefix}body_b64": base64.b64encode(data).decode(), f"{prefix}body_truncated": truncated}


_CONTINUATION = re.compile(rb"\\\n")


def _shell_text(line: bytes) -> str:
    """One line of a shell's stdin (with its continuations) as the shell analysis reads it."""
    return line.decode("utf-8", "replace").removesuffix("\n")


def _shell_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split stdin into the complete lines a shell reads (each with its newline) and the unfinished rest.

    A newline preceded by an odd number of backslashes is a line continuation: the shell joins the next line
    to this one, so it does not end the line."""
    lines: list[bytes] = []
    start = 0
    i = buf.find(b"\n")
    while i != -1:
        j = i
        while j > start and buf[j - 1] == 0x5C:
            j -= 1
        if (i - j) % 2 == 0:
            lines.append(buf[start : i + 1])
            start = i + 1
        i = buf.find(b"\n", i + 1)
    return lines, buf[start:]


class LictorProxy:
    """The mitmproxy addon that enforces Lictor's policy on every request of every HTTP/Kubernetes target."""

    def __init__(
        self, gateway: Gateway, targets: Iterable[HttpTarget], *, buffer_limit: int, setup_timeout: float = 30.0
    ) -> None:
        self.gateway = gateway
        self.setup_timeout = setup_timeout
        self.targets = {t.mode_spec: t for t in targets}
        self.buffer_limit = buffer_limit
        # mitmproxy's body_size_limit: it buffers no request body beyond the largest max_body.
        self.body_size_limit = max((t.max_body for t in self.targets.values()), default=0)
        self.upstream_contexts: dict[str, SSL.Context] = {}
        self.client_contexts: dict[str, SSL.Context] = {}
        for target in self.targets.values():
            if target.scheme == "https":
                self.upstream_contexts[target.name] = upstream_context(target)
            ctx = client_context(target)
            if ctx is not None:
                self.client_contexts[target.name] = ctx
        self.conns: dict[str, ConnState] = {}
        self.setting_up = 0  # connections without a first request yet (MAX_SETTING_UP)
        self._drop_headers: dict[tuple[str, bool], frozenset[bytes]] = {}
        self._tokens: OrderedDict[str, tuple[Identity, float, str]] = OrderedDict()
        self._recent_denials: OrderedDict[tuple[str, str], tuple[float, Decision]] = OrderedDict()
        self.proxyserver: proxyserver.Proxyserver | None = None
        # The credentials each target's upstream gets, as they could come back in an answer.
        self._secrets: dict[str, tuple[bytes, ...]] = {t.name: _credential_forms(t) for t in self.targets.values()}

    # -- helpers ------------------------------------------------------------------------------------

    def _target(self, client: Client) -> HttpTarget | None:
        mode = client.proxy_mode
        return self.targets.get(mode.full_spec) if mode is not None else None

    def _answer(self, flow: http.HTTPFlow, answer: Answer) -> None:
        flow.metadata[ALLOWED] = False
        flow.metadata[ANSWERED] = True
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store", **answer.headers}
        flow.response = http.Response.make(answer.status, answer.encode(), headers)

    def _internal_error(self, flow: http.HTTPFlow, where: str, *, unrecordable: bool = False) -> None:
        """Fail closed from anywhere in request handling: answer 500 (503 when the request could not be recorded),
        or kill if even that fails; audited."""
        flow.metadata[ALLOWED] = False
        target: HttpTarget | None = None
        status = 503 if unrecordable else 500
        outcome = f"answered {status}"
        try:
            target = self._target(flow.client_conn)
            kubernetes = bool(target and target.kubernetes)
            if unrecordable:
                answer = error(
                    503,
                    "the gateway cannot record requests right now (its audit and recording store is unavailable), "
                    "so the request was not forwarded (fail closed)",
                    "retry later: requests go through again once the store takes writes",
                    kubernetes=kubernetes,
                    rule=AUDIT_UNAVAILABLE,
                )
            else:
                answer = error(
                    500,
                    f"internal error in the gateway while {where}; the request was not forwarded (fail closed)",
                    "retry later or contact the gateway operators",
                    kubernetes=kubernetes,
                    rule=INTERNAL,
                )
            self._answer(flow, answer)
        except Exception:
            log.exception("cannot even answer the failed flow; killing it")
            outcome = "connection closed"
            if flow.killable:
                flow.kill()
        try:
            # Whatever was decided before the failure (an allow, even), this is what happened to the request.
            why = "it could not be recorded" if unrecordable else f"internal error in the gateway while {where}"
            self._audit_refused(flow, target, f"{why}; {outcome}")
        except Exception:
            log.exception("could not audit the failed flow")

    def _final_answer_and_close(self, flow: http.HTTPFlow, answer: Answer) -> None:
        """Write ``answer`` straight to the agent's connection and close it (after mitmproxy gave up on
        the flow, when its own layers will not answer any more)."""
        handler, writer = self._agent_connection(flow)
        if writer is None or writer.is_closing():
            return
        body = answer.encode()
        reason = HTTPStatus(answer.status).phrase
        head = [f"HTTP/1.1 {answer.status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in answer.headers.items()]
        head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        if flow.client_conn.tls:
            # The socket carries TLS records: plaintext written to it is garbage to the agent (its TLS
            # stack reports "wrong version number" instead of the answer). Encrypt with the connection's
            # own TLS session.
            data = _tls_records(handler, data)
            if data is None:
                writer.close()
                return
        writer.write(data)
        # Close a little later, not now: a client still uploading would get a reset that can discard the
        # answer before it reads it (mitmproxy keeps reading, and dropping, what arrives meanwhile).
        asyncio.get_running_loop().call_later(LINGER_CLOSE, writer.close)

    def close_client(self, flow: http.HTTPFlow) -> None:
        """Abort the agent's connection at once (a response already under way cannot be relayed safely).

        The socket is aborted synchronously, so nothing queued after this point (not even the terminating
        chunk of a chunked body, which would make a truncated response look complete) reaches the agent.
        """
        handler, writer = self._agent_connection(flow)
        if handler is not None:
            transport = getattr(writer, "transport", None)
            if transport is not None:
                transport.abort()
            handler.close_connection(handler.client)
        elif flow.killable:
            flow.kill()

    def _agent_connection(self, flow: http.HTTPFlow) -> tuple[Any, Any]:
        """mitmproxy's handler of the agent's connection and its stream writer (None, None once gone)."""
        ps = self.proxyserver
        handler = ps.connections.get(flow.client_conn.id) if ps is not None else None
        if handler is None:
            return None, None
        io = handler.transports.get(handler.client)
        return handler, (io.writer if io is not None else None)

    async def _authenticate(self, token: str, target: HttpTarget, peer: str) -> tuple[Identity, str]:
        """The verified identity behind ``token`` and its session key (same subject, issuer and claims)."""
        now = time.time()
        cached = self._tokens.get(token)
        if cached is not None and cached[1] > now:
            return cached[0], cached[2]
        identity = await self.gateway.authenticate_async(token, protocol=target.protocol, target=target.name, peer=peer)
        until = now + TOKEN_CACHE_TTL
        if identity.expires_at is not None:
            until = min(until, identity.expires_at)
        if len(self._tokens) >= TOKEN_CACHE_SIZE:
            self._tokens.popitem(last=False)
        key = _identity_key(identity)
        self._tokens[token] = (identity, until, key)
        return identity, key

    @staticmethod
    def _token(fields: list[tuple[str, str]]) -> str | None:
        tokens: set[str] = set()
        for name, value in fields:
            if name in ("authorization", "proxy-authorization"):
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() != "bearer" or not credential.strip():
                    raise BadAuth(f"the {name.title()} header must be `Bearer <token>` (a Lictor-accepted JWT)")
                tokens.add(credential.strip())
            if name != "sec-websocket-protocol":
                continue
            for proto in value.split(","):
                proto = proto.strip()
                if proto.startswith(WS_BEARER_PREFIX):
                    encoded = proto[len(WS_BEARER_PREFIX) :]
                    try:
                        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                        tokens.add(raw.decode("ascii"))
                    except (binascii.Error, UnicodeDecodeError):
                        raise BadAuth("malformed bearer token in Sec-WebSocket-Protocol") from None
        if len(tokens) > 1:
            raise BadAuth("the request carries several different tokens")
        return tokens.pop() if tokens else None

    async def _session(self, flow: http.HTTPFlow, identity: Identity, key: str, target: HttpTarget) -> Session:
        conn = self.conns.get(flow.client_conn.id)
        if conn is None:  # client_connected did not run (or failed): track the connection now
            conn = self.conns[flow.client_conn.id] = ConnState(target, _peer(flow.client_conn))
        session = conn.sessions.get(key)
        if session is None or session.closed:
            session = await self.gateway.open_session(
                identity, protocol=target.protocol, target=target.name, peer=conn.peer, method="jwt"
            )
            session.meta["client_connection"] = flow.client_conn.id
            conn.sessions[key] = session
        elif session.identity is not identity:
            session.identity = identity  # same subject and claims; keep the newest expiry
        return session

    def _remember_denial(self, flow: http.HTTPFlow, decision: Decision) -> None:
        key = (flow.client_conn.id, flow.request.path)
        self._recent_denials[key] = (time.monotonic() + 30, decision)
        while len(self._recent_denials) > 1000:
            self._recent_denials.popitem(last=False)

    def _recent_denial(self, flow: http.HTTPFlow) -> Decision | None:
        entry = self._recent_denials.get((flow.client_conn.id, flow.request.path))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    # -- connections --------------------------------------------------------------------------------

    def client_connected(self, client: Client) -> None:
        try:
            target = self._target(client)
            if target is None:
                client.error = "no Lictor target for this listener"
                return
            if self.setting_up >= MAX_SETTING_UP:
                client.error = "too many connections are being set up"
                reason = f"{MAX_SETTING_UP} connections were waiting for their first request at once"
                event = {"protocol": target.protocol, "reason": reason}
                if self.gateway.audit_burst("http:setting-up", "connection.refused", event):
                    log.warning("http: refusing connections: %s", reason)
                return
            conn = ConnState(target, _peer(client))
            conn.deadline = asyncio.get_running_loop().call_later(self.setup_timeout, self._setup_expired, client.id)
            self.conns[client.id] = conn
            self.setting_up += 1
        except Exception:
            log.exception("client_connected failed; refusing the connection")
            client.error = "internal error"

    def _set_up(self, conn: ConnState) -> None:
        """The connection's first request arrived (or it closed): it no longer counts as setting up."""
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None
            self.setting_up -= 1

    def _setup_expired(self, client_id: str) -> None:
        """A connection sent no request within the set-up timeout of connecting: close it."""
        conn = self.conns.get(client_id)
        if conn is None or conn.deadline is None:
            return
        self._set_up(conn)
        ps = self.proxyserver
        handler = ps.connections.get(client_id) if ps is not None else None
        if handler is not None:
            handler.close_connection(handler.client)

    async def client_disconnected(self, client: Client) -> None:
        conn = self.conns.pop(client.id, None)
        if conn is None:
            return
        self._set_up(conn)
        for task in list(conn.waiting):
            task.cancel()  # a held request nobody waits for any more: its approval is withdrawn
        for session in list(conn.sessions.values()):
            try:
                await session.close(reason="client disconnected")
            except Exception:
                log.exception("closing session %s failed", session.id)

    # -- TLS ----------------------------------------------------------------------------------------

    def tls_start_client(self, data: tls.TlsData) -> None:
        try:
            target = self._target(data.context.client)
            ctx = self.client_contexts.get(target.name) if target else None
            if ctx is not None and data.ssl_conn is None:
                conn = SSL.Connection(ctx)
                conn.set_accept_state()
                data.ssl_conn = conn
        except Exception:
            log.exception("TLS setup towards the agent failed")
            data.conn.error = "TLS setup failed"

    def tls_start_server(self, data: tls.TlsData) -> None:
        try:
            target = self._target(data.context.client)
            if target is None:
                raise RuntimeError("no target for this connection")
            data.ssl_conn = upstream_connection(self.upstream_contexts[target.name], target)
        except Exception:
            # mitmproxy's own TLS addon would then use the global options, which trust nothing (see
            # EmbeddedProxy); mark the connection failed as well.
            log.exception("TLS setup towards the upstream failed")
            data.conn.error = "TLS setup towards the upstream failed"

    # -- requests -----------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT would open a tunnel that no request hook sees: never."""
        try:
            flow.metadata[ALLOWED] = False
            flow.response = http.Response.make(405, b"CONNECT is not supported by this gateway\n")
            flow.metadata[ANSWERED] = True
        except Exception:
            log.exception("http_connect failed; killing the flow")
            if flow.killable:
                flow.kill()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata[ALLOWED] = False
        conn = self.conns.get(flow.client_conn.id)
        if conn is not None and conn.deadline is not None:
            self._set_up(conn)
        # mitmproxy answers Expect: 100-continue itself (and drops the header) once this hook returns
        flow.metadata[EXPECTS_CONTINUE] = flow.request.headers.get("expect", "").lower() == "100-continue"
        try:
            target = self._target(flow.client_conn)
            if target is None:
                raise RuntimeError("no target for this connection")
            if flow.request.method.upper() == "CONNECT":
                # mitmproxy refuses it itself once this hook returns (see make_error_response): no other
                # hook sees it, so the refusal is audited here
                self._audit_refused(flow, target, f"a proxy request ({_proxy_target(flow)}); answered 400")
                return
            headers = flow.request.headers
            lengths = headers.get_all("content-length")
            problem = ""
            codings = ",".join(headers.get_all("transfer-encoding")).replace(" ", "").lower()
            if any(b"\n" in value or b"\r" in value for _, value in headers.fields):
                # mitmproxy keeps an obsolete line folding (a header line starting with a space) inside the
                # previous header's value and forwards it as it came; an upstream that reads the folded line
                # as a header of its own (Impersonate-User, Transfer-Encoding) would act on what was never
                # decided. RFC 9112 5.2: a proxy must refuse it or unfold it.
                problem = (
                    "a folded header line (obs-fold: a line starting with a space or tab); send each header on one line"
                )
            elif len(headers.get_all("upgrade")) > 1 or len(headers.get_all("content-type")) > 1:
                # the gateway decides on the first; a server may read another (an exec over SPDY, a form
                # where the gateway read text)
                problem = "more than one Upgrade or Content-Type header"
            elif lengths and "transfer-encoding" in headers:
                problem = "both Content-Length and Transfer-Encoding (request smuggling)"
            elif codings and codings != "chunked":
                # gzip/deflate/compress transfer codings reach the upstream as they came, which may decode
                # them: the body decided on (still compressed) would not be the body it reads
                problem = f"Transfer-Encoding {codings!r} (only chunked request bodies are read)"
            elif len(set(lengths)) > 1:
                problem = "conflicting Content-Length headers"
            elif lengths:
                try:
                    size = int(lengths[0])
                except ValueError:
                    size = -1
                if size < 0:
                    problem = "invalid Content-Length"
                elif size > self.body_size_limit:
                    # mitmproxy answers 413 without reading the body (check_body_size, before this hook
                    # returns, and before any "100 Continue"); audit the refusal, forward nothing.
                    flow.metadata[EXPECTS_CONTINUE] = False
                    self._audit_refused(
                        flow,
                        target,
                        f"request body of {size} bytes is larger than max_body ({self.body_size_limit}); answered 413",
                    )
                    return
            if problem:
                log.warning("refusing request from %s: %s", _peer(flow.client_conn), problem)
                self._audit_refused(flow, target, problem)
                if flow.killable:
                    flow.kill()
                self.close_client(flow)  # reset at once: the agent may still be sending the body
        except Exception:
            log.exception("requestheaders failed; killing the flow (fail closed)")
            if flow.killable:
                flow.kill()

    async def request(self, flow: http.HTTPFlow) -> None:
        flow.metadata[ALLOWED] = False
        if flow.error is not None or flow.response is not None:
            return
        conn = self.conns.get(flow.client_conn.id)
        task = asyncio.current_task()
        if conn is not None and task is not None:
            conn.waiting.add(task)  # cancelled if the agent goes away (e.g. while held for approval)
        try:
            await self._request(flow)
        except AuditError as exc:
            # The spool is full or broken (a sink down, a full disk): nothing can be recorded, so nothing goes.
            # Not a fault of the gateway: one line in the log, and the agent is told to retry later.
            log.error("request not forwarded: it cannot be recorded (fail closed): %s", exc)
            self._internal_error(flow, "checking this request", unrecordable=True)
        except Exception:
            log.exception("request handling failed; denying (fail closed)")
            self._internal_error(flow, "checking this request")
        finally:
            if conn is not None and task is not None:
                conn.waiting.discard(task)

    async def _request(self, flow: http.HTTPFlow) -> None:
        target = self._target(flow.client_conn)
        if target is None:
            raise RuntimeError("no target for this connection")
        k8s = target.kubernetes
        if target.tls and not flow.client_conn.tls_established:
            self._audit_refused(flow, target, "plain HTTP on a TLS listener; answered 400")
            self._answer(flow, error(400, "this listener only accepts TLS", "connect with https://", kubernetes=k8s))
            return
        sent_method = flow.request.data.method.decode("ascii", "backslashreplace")
        if sent_method != sent_method.upper():
            # Methods are case-sensitive: "get" is not GET to the upstream, but mitmproxy's Request.method
            # upper-cases it, so it would be decided as GET and forwarded as "get".
            self._audit_refused(flow, target, f"method {sent_method[:40]!r} in another case; answered 400")
            self._answer(
                flow,
                error(
                    400,
                    f"HTTP methods are case-sensitive and {sent_method!r} is not a method this gateway decides",
                    f"send {sent_method.upper()!r}",
                    kubernetes=k8s,
                ),
            )
            return
        if flow.request.authority or flow.request.method.upper() == "CONNECT":
            # An absolute-form target (GET http://other-host/...) would reach the upstream as such, and an
            # origin server routes by the host in it: the request must look exactly like what was decided.
            self._audit_refused(flow, target, f"a proxy request ({_proxy_target(flow)}); answered 400")
            self._answer(flow, error(400, PROXY_REQUEST_MESSAGE, PROXY_REQUEST_HINT, kubernetes=k8s))
            return
        peer = _peer(flow.client_conn)
        fields = _header_list(flow.request.headers)
        first = _first(fields)
        try:
            token = self._token(fields)
        except BadAuth as exc:  # credentials were sent (Basic, several tokens...): a failed authentication
            self.gateway.audit_event(
                "auth.failed",
                {"protocol": target.protocol, "target": target.name, "peer": peer, "reason": str(exc)},
                fail_closed=False,
            )
            self._answer(flow, error(401, str(exc), "send Authorization: Bearer <token>", kubernetes=k8s))
            return
        if token is None:
            # No credentials at all: not a failed authentication (auth.failed), but a refusal all the same.
            self._audit_refused(flow, target, "no bearer token; answered 401")
            self._answer(
                flow,
                error(
                    401,
                    "no bearer token: every request needs Authorization: Bearer <token>",
                    "get a token from your identity provider or `lictor token issue`",
                    kubernetes=k8s,
                ),
            )
            return
        try:
            identity, key = await self._authenticate(token, target, peer)
        except AuthError as exc:
            self._answer(flow, error(401, f"token rejected: {exc}", "get a fresh token", kubernetes=k8s))
            return
        session = await self._session(flow, identity, key, target)

        headers = flow.request.headers
        reason = agent_reason(first.get("x-lictor-reason"))
        method = flow.request.method.upper()
        try:
            raw_path = flow.request.data.path.decode("ascii")
        except UnicodeDecodeError:
            raw_path = flow.request.data.path.decode("ascii", "backslashreplace")
            await self._unreadable(flow, session, target, method, raw_path, b"", reason, "non-ASCII bytes in the path")
            return
        try:
            body = decoded_body(flow.request.raw_content or b"", headers.get_all("content-encoding"), target.max_body)
        except BodyTooLarge as exc:
            await self._unreadable(
                flow,
                session,
                target,
                method,
                raw_path,
                b"",
                reason,
                f"the request body ({exc.size}) is larger than this target's max_body ({target.max_body}); "
                "send less per request",
                status=413,
            )
            return
        except Unreadable as exc:
            await self._unreadable(flow, session, target, method, raw_path, b"", reason, f"body encoding: {exc}")
            return

        call: K8sCall | None = None
        try:
            if k8s:
                call = k8s_request(
                    method=method, raw_path=raw_path, headers=headers, body=body, target=target.name, reason=reason
                )
                request = call.request
            else:
                request = http_request(
                    method=method,
                    raw_path=raw_path,
                    host=target.upstream_host,
                    headers=fields,
                    body=body,
                    content_type=first.get("content-type", ""),
                    target=target.name,
                    reason=reason,
                )
        except Unreadable as exc:
            await self._unreadable(flow, session, target, method, raw_path, body, reason, str(exc))
            return

        if call is not None and _is_review(call, "authorization.k8s.io", "selfsubjectaccessreviews"):
            self._access_review(flow, session, request, call, body)
            return
        if call is not None and _is_review(call, "authentication.k8s.io", "selfsubjectreviews"):
            self._self_review(flow, session, request, call)
            return
        if call is not None and _is_review(call, "authorization.k8s.io", "selfsubjectrulesreviews"):
            self._rules_review(flow, session, request)
            return

        inspect_stdin = False
        if call is not None and call.info.subresource == "exec" and call.info.stdin and not call.info.tty:
            # What reads the agent's stdin: data, a shell whose lines are checked, or program text that
            # cannot be (python3 -, awk -f -, sh -c 'cat | sh'): refused before anyone is asked to approve it,
            # and before the SPDY check, so that kubectl's SPDY fallback gets this answer too.
            try:
                inspect_stdin = stdin_shell(call.info.exec_command) is not None
            except ShellParseError as exc:
                if session.policy_decision(request).action != "deny":  # else the policy's own denial
                    self._refuse_stdin_program(flow, session, request, str(exc))
                    return

        upgrade = first.get("upgrade", "").strip().lower()
        if k8s and upgrade.startswith("spdy"):
            self._refuse_spdy(flow, session, request)
            return

        if call is not None and call.info.verb in ("create", "update", "patch") and _carries_masked_secret(body):
            # A Secret read through the gateway and written back (get -o yaml | replace, apply of a saved
            # copy) would replace the real values with the mask: the service using it would break silently.
            self._refuse(
                flow,
                session,
                request,
                f"the request body carries Secret values that Lictor masked ({MASKED_SECRET_HINT}); written "
                "back, the mask would overwrite what the Secret really holds",
                MASKED_WRITE_RULE,
                hint="send only the keys you change (kubectl patch, or edit without the masked keys), with real values",
            )
            return

        approval_id = first.get("x-lictor-approval", "").strip()
        redeemed = False
        if approval_id:
            approvals = self.gateway.approvals
            redeem = getattr(approvals, "redeem", None)
            ok = False
            if redeem is not None:
                ok = bool(redeem(session.identity, request, approval_id))  # synchronous by contract
            if not ok:
                decision = Decision.deny(
                    f"approval {approval_id} cannot be used for this request: it is not approved (yet), was "
                    "already used, has expired, or was given for a different request or requester",
                    "lictor:approval-not-redeemable",
                    self.gateway.policy.version,
                )
                session.audit(request, decision, "approval")
                self._deny(flow, session, request, decision, k8s)
                return
            redeemed = True

        decision = await self._decide(flow, session, request, target)
        if decision.action != "allow":
            if decision.action == "approve":  # never forwarded without a human's approval
                decision = Decision.deny(decision.message, decision.rule_ids[0], decision.policy_version)
            self._deny(flow, session, request, decision, k8s)
            if call is not None and call.info.subresource in ("exec", "attach", "portforward"):
                self._remember_denial(flow, decision)
            return

        secrets_response = bool(call and call.info.is_resource_request and call.info.resource == "secrets")
        reveal = False
        if secrets_response and call is not None:
            reveal = self._reveal(session, call)
        masking = bodies.Masking(
            session.mask_plan(decision),
            kubernetes=k8s,
            secrets=k8s and not reveal,
            secrets_response=secrets_response,
        )
        state = FlowState(target, session, request, decision, call, masking)
        secrets = self._secrets.get(target.name)
        if secrets:
            state.tap.scrubber = bodies.Scrubber(secrets)

        if upgrade:
            answer = self._prepare_upgrade(flow, state, upgrade, inspect_stdin)
            if answer is not None:
                self._record_request(flow, state, body, fields)
                self._answer(flow, answer)
                return

        state.request_path = flow.request.path
        if state.ws is not None or (call is not None and (call.info.watch or call.info.follow)):
            self._record_request(flow, state, body, fields)  # long-lived: recorded now, the response at its end
        else:
            state.pending = self._request_fields(flow, state, body, fields)  # one event with the response
        # A Range request splits a response into pieces that the detectors see one by one (a card number
        # in two ranges is in neither): when anything must be masked or scrubbed, ask for the whole body.
        self._prepare_upstream(
            flow, target, call, whole_body=masking.active or state.tap.scrubber is not None, redeemed=redeemed
        )
        flow.metadata[STATE] = state
        if decision.approval_id:
            flow.metadata["lictor.approval_id"] = decision.approval_id
        flow.metadata[ALLOWED] = True  # the one place a flow becomes forwardable

    async def _decide(self, flow: http.HTTPFlow, session: Session, request: Request, target: HttpTarget) -> Decision:
        async def notify(approval_id: str, message: str) -> None:
            flow.metadata["lictor.approval_id"] = approval_id
            log.info("request %s held: %s", flow.id, message)
            session.record("http.approval", {"flow": flow.id, "approval_id": approval_id, "message": message})

        ticket = {"mode": "ticket"} if target.approval_mode == "ticket" else None
        return await session.decide(request, notify, approval=ticket)

    def _reveal(self, session: Session, call: K8sCall) -> bool:
        """May this identity see Secret values in this response? Only an explicit ``reveal`` allow says yes."""
        request = reveal_request(call)
        decision = session.policy_decision(request)
        if decision.action != "allow":
            return False
        session.audit(request, decision, "reveal")
        return True

    async def _unreadable(
        self,
        flow: http.HTTPFlow,
        session: Session,
        target: HttpTarget,
        method: str,
        raw_path: str,
        body: bytes,
        reason: str | None,
        problem: str,
        status: int | None = None,
    ) -> None:
        request = Request(
            protocol=target.protocol,
            action="unreadable",
            attrs={},
            target=target.name,
            summary=f"{method} {redact_query(raw_path)[:500]}",
            payload=payload(method, raw_path, body),
            reason=reason,
        )
        what = "Kubernetes API request" if target.kubernetes else "request"
        decision = Decision.deny(
            f"this {what} cannot be inspected safely, so it is denied: {problem}",
            UNREADABLE,
            self.gateway.policy.version,
        )
        session.audit(request, decision, "decision")
        if status is None:
            status = 403 if target.kubernetes else 400
        self._deny(flow, session, request, decision, target.kubernetes, status=status)

    def _deny(
        self,
        flow: http.HTTPFlow,
        session: Session,
        request: Request,
        decision: Decision,
        kubernetes: bool,
        status: int = 403,
        hint: str | None = None,
    ) -> None:
        answer = denial(decision, kubernetes=kubernetes, status=status, hint=hint)
        self._answer_recorded(
            flow,
            session,
            answer,
            request.summary,
            decision,
            approval_id=decision.approval_id,
            message=decision.message,
        )

    def _answer_recorded(
        self, flow: http.HTTPFlow, session: Session, reply: Answer, summary: str, decision: Decision, **extra: Any
    ) -> None:
        """Record a request the gateway answered itself (never forwarded), then send ``reply``."""
        session.record(
            "http",
            {
                "direction": "in",
                "flow": flow.id,
                "method": flow.request.method,
                "url": redact_query(flow.request.path),
                "summary": summary[:2000],
                "decision": decision.action,
                "rules": list(decision.rule_ids),
                **extra,
                "status": reply.status,
                "request_size": len(flow.request.raw_content or b""),
            },
        )
        self._answer(flow, reply)

    def _access_review(
        self, flow: http.HTTPFlow, session: Session, request: Request, call: K8sCall, body: bytes
    ) -> None:
        """Answer ``kubectl auth can-i`` (a SelfSubjectAccessReview) from Lictor's policy for the agent.

        Forwarded, the cluster would answer for the gateway's own account, not for the agent. The review
        itself reveals only what the agent could find out by trying; an explicit deny rule on
        ``selfsubjectaccessreviews`` still refuses it.
        """
        own = session.policy_decision(request)
        if own.action == "deny" and own.rule_ids and own.rule_ids[0] != "lictor:default-deny":
            session.audit(request, own)
            self._deny(flow, session, request, own, True)
            return
        try:
            review = access_review_document(body, flow.request.headers.get("content-type", ""))
            asked = access_review_request(review, session.target)
        except (ValueError, RecursionError, Unreadable) as exc:
            refusal = Decision.deny(f"unreadable access review: {exc}", "lictor:unreadable-request", own.policy_version)
            session.audit(request, refusal)
            self._deny(flow, session, request, refusal, True, status=400)
            return
        verdict = session.policy_decision(asked)
        answered = Decision(
            "allow",
            ("lictor:access-review",),
            f"answered by the gateway: {asked.summary} -> {verdict.action}",
            own.policy_version,
        )
        session.audit(replace(request, summary=f"can-i {asked.summary} -> {verdict.action}"), answered)
        rules = ", ".join(verdict.rule_ids)
        status: dict[str, Any] = {"allowed": verdict.action == "allow"}
        if verdict.action == "allow":
            status["reason"] = (
                f"Lictor allows it (rule {rules}); the cluster's RBAC for the gateway's account applies too"
            )
        elif verdict.action == "approve":
            status["reason"] = f"only with a human's approval (rule {rules}): {verdict.message}"
        else:
            status["denied"] = True
            status["reason"] = f"Lictor denies it (rule {rules}): {verdict.message}"
        answer = Answer(
            201,
            {
                "kind": "SelfSubjectAccessReview",
                "apiVersion": f"authorization.k8s.io/{call.info.api_version or 'v1'}",
                "metadata": {"creationTimestamp": None},
                "spec": review.get("spec", {}),
                "status": status,
            },
        )
        self._answer_recorded(
            flow, session, answer, f"{request.summary}: {asked.summary}", answered, answer=verdict.action
        )

    def _self_review(self, flow: http.HTTPFlow, session: Session, request: Request, call: K8sCall) -> None:
        """Answer ``kubectl auth whoami`` (a SelfSubjectReview) with who the agent is to Lictor.

        Forwarded, the cluster would describe the gateway's own account. An explicit deny rule on
        ``selfsubjectreviews`` still refuses it; without one the agent may always ask who it is.
        """
        own = session.policy_decision(request)
        if own.action == "deny" and own.rule_ids and own.rule_ids[0] != "lictor:default-deny":
            session.audit(request, own)
            self._deny(flow, session, request, own, True)
            return
        identity = session.identity
        roles = list(session.roles(session.policy))
        answered = Decision("allow", ("lictor:self-review",), "answered by the gateway", own.policy_version)
        session.audit(
            replace(request, summary=f"whoami -> {identity.subject} ({', '.join(roles) or 'no roles'})"), answered
        )
        answer = Answer(
            201,
            {
                "kind": "SelfSubjectReview",
                "apiVersion": f"authentication.k8s.io/{call.info.api_version or 'v1'}",
                "metadata": {"creationTimestamp": None},
                "status": {
                    "userInfo": {
                        "username": identity.subject,
                        "groups": roles,  # Lictor's roles: what decides this agent's requests
                        "extra": {"lictor.dev/issuer": [identity.issuer]},
                    }
                },
            },
        )
        self._answer_recorded(flow, session, answer, request.summary, answered, answer="whoami")

    def _rules_review(self, flow: http.HTTPFlow, session: Session, request: Request) -> None:
        """Refuse ``kubectl auth can-i --list`` (a SelfSubjectRulesReview), saying what to ask instead.

        Forwarded, even where a rule allows it, the cluster would list what the gateway's own account may do,
        which is not what the agent may do. Nor do Lictor's rules reduce to such a list of grants: deny rules
        win over them, approvals hold, names, paths and bodies narrow them. A list built from them would say yes
        where Lictor says no, so none is given; one question at a time (``can-i VERB RESOURCE``) is answered.
        """
        own = session.policy_decision(request)
        refusal = Decision.deny(
            "kubectl auth can-i --list is not answered through this gateway: the cluster would list its own "
            "account's permissions, not yours, and Lictor's rules (deny rules, approvals, names) are no such list",
            RULES_REVIEW_RULE,
            own.policy_version,
        )
        if own.action == "deny" and own.rule_ids and own.rule_ids[0] != "lictor:default-deny":
            refusal = own  # an explicit rule's denial names its rule
        session.audit(request, refusal)
        self._deny(
            flow,
            session,
            request,
            refusal,
            True,
            hint="ask about one action at a time: kubectl auth can-i VERB RESOURCE [-n NAMESPACE], answered from "
            "Lictor's rules for you",
        )

    def _refuse_spdy(self, flow: http.HTTPFlow, session: Session, request: Request) -> None:
        """SPDY cannot be inspected: answer with the policy's denial if there is one, else explain."""
        earlier = self._recent_denial(flow)
        if earlier is not None:
            self._deny(flow, session, request, earlier, True)
            return
        decision = session.decide_now(request)
        if decision.action == "deny":
            self._deny(flow, session, request, decision, True)
            return
        refusal = Decision.deny(SPDY_MESSAGE, SPDY_RULE, decision.policy_version)
        session.audit(request, refusal, "protocol")
        self._deny(
            flow,
            session,
            request,
            refusal,
            True,
            status=403,
            hint="kubectl falls back to SPDY only when the WebSocket attempt fails: check that one",
        )

    def _refuse_stdin_program(self, flow: http.HTTPFlow, session: Session, request: Request, problem: str) -> None:
        """``kubectl exec -i`` of a command that would run program text from stdin that cannot be checked."""
        self._refuse(
            flow,
            session,
            request,
            f"the command's stdin cannot be checked line by line, so it is not run: {problem}",
            STDIN_PROGRAM_RULE,
            hint="put the script in a file in the container and run that (python3 /path/script.py), or send "
            "shell commands to sh (kubectl exec -i POD -- sh < script), whose stdin lines Lictor checks",
        )

    def _refuse(
        self, flow: http.HTTPFlow, session: Session, request: Request, message: str, rule: str, *, hint: str
    ) -> None:
        """Deny ``request`` on the gateway's own account (``rule``), audited, whatever the rules allow."""
        decision = Decision.deny(message, rule, self.gateway.policy.version)
        session.audit(request, decision, "decision")
        self._deny(flow, session, request, decision, True, hint=hint)

    def _prepare_upgrade(
        self, flow: http.HTTPFlow, state: FlowState, upgrade: str, inspect_stdin: bool
    ) -> Answer | None:
        """Allowed requests that ask to switch protocols: only WebSockets, and on Kubernetes only channels.
        ``inspect_stdin``: a shell reads its commands from the exec's stdin, so each line is checked."""
        headers = flow.request.headers
        k8s = state.target.kubernetes
        if upgrade != "websocket":
            # h2c and anything else: not relayed; the request goes on as plain HTTP/1.1.
            headers.pop("upgrade", None)
            headers.pop("http2-settings", None)
            connection = [t.strip() for t in headers.get("connection", "").split(",")]
            kept = [t for t in connection if t and t.lower() not in ("upgrade", "http2-settings")]
            if kept:
                headers["connection"] = ", ".join(kept)
            else:
                headers.pop("connection", None)
            return None
        offered = [
            p.strip()
            for value in headers.get_all("sec-websocket-protocol")
            for p in value.split(",")
            if p.strip() and not p.strip().startswith(WS_BEARER_PREFIX)
        ]
        if k8s:
            info = state.call.info if state.call else None
            if info is None or info.subresource not in ("exec", "attach", "portforward"):
                return error(
                    400,
                    "WebSocket upgrades are relayed only for exec, attach and portforward",
                    "use plain HTTP requests for this API",
                    kubernetes=True,
                )
            if info.subresource == "portforward":
                state.ws = WsState(channels=False, inspect_stdin=False)
            else:
                kept_protocols = [p for p in offered if p in CHANNEL_PROTOCOLS]
                if not kept_protocols:
                    return error(
                        400,
                        "none of the offered WebSocket subprotocols can be inspected "
                        f"(supported: {', '.join(CHANNEL_PROTOCOLS)})",
                        "use kubectl 1.30 or newer",
                        kubernetes=True,
                    )
                offered = kept_protocols
                state.ws = WsState(channels=True, inspect_stdin=inspect_stdin, tty=info.tty)
        else:
            state.ws = WsState(channels=False, inspect_stdin=False)
        headers.pop("sec-websocket-protocol", None)
        if offered:
            headers["sec-websocket-protocol"] = ", ".join(offered)
        return None

    def _prepare_upstream(
        self,
        flow: http.HTTPFlow,
        target: HttpTarget,
        call: K8sCall | None,
        *,
        whole_body: bool,
        redeemed: bool = False,
    ) -> None:
        """Rewrite the headers for the upstream in one pass: agent credentials, ``X-Lictor-*`` and
        forwarding headers out (``Range``/``If-Range`` too with ``whole_body``, the headers of one try that
        no approval binds with ``redeemed``: a ticket's retry goes on as approved); the target's credentials
        and ``Accept-Encoding: identity`` in."""
        headers = flow.request.headers
        drop = self._drop_headers.get((target.name, whole_body))
        if drop is None:
            # TE: no transfer codings but chunked from the upstream (a gzip transfer coding would reach the
            # agent as bytes the gateway cannot read)
            names = {"authorization", "proxy-authorization", "accept-encoding", "te", *FORWARDING_HEADERS}
            names |= {n.lower() for n, _ in target.credentials.headers}
            drop = frozenset(n.replace("_", "-").encode() for n in names) | (
                _PARTIAL_HEADERS if whole_body else frozenset()
            )
            self._drop_headers[(target.name, whole_body)] = drop
        upgrade = "upgrade" in headers
        kept: list[tuple[bytes, bytes]] = []
        accept: list[bytes] = []
        for name, value in headers.fields:
            lname = name.lower()
            cgi = lname.replace(b"_", b"-")  # X_Forwarded_For is X-Forwarded-For to PHP (header_name)
            if (
                cgi in drop
                or cgi.startswith(b"x-lictor-")
                or cgi.startswith(IDENTITY_HEADER_PREFIXES)
                or (redeemed and try_header(cgi.decode("latin-1")))
            ):
                if lname == b"accept-encoding" and upgrade:
                    kept.append((name, value))
                continue
            if call is not None and lname == b"accept":
                accept.append(value)
                continue
            if lname == b"connection":
                # A header named here is removed by every proxy that follows RFC 9110 (7.6.1) before the API
                # (Go's ReverseProxy, Traefik, Caddy, Apache): one the rules read (X-Dry-Run: true) or the
                # target's credentials would not reach it. Only the options that name no header go on.
                options = [o.strip() for o in value.split(b",") if o.strip().lower() in _CONNECTION_OPTIONS]
                if options:
                    kept.append((name, b", ".join(options)))
                continue
            kept.append((name, value))
        kept.extend((n.encode(), v.encode()) for n, v in target.credentials.headers)
        if not upgrade:
            kept.append((b"accept-encoding", b"identity"))
        if call is not None:
            media = [
                part.strip()
                for value in accept
                for part in value.decode("latin-1").split(",")
                if part.strip()
                and part.split(";", 1)[0].strip().lower()
                in ("application/json", "*/*", "application/*", "text/plain", "text/*")
            ]
            kept.append((b"accept", (", ".join(media) if media else "application/json, */*").encode("latin-1")))
        headers.fields = tuple(kept)
        if target.base_path:
            flow.request.data.path = target.base_path.encode() + flow.request.data.path

    # -- recording ----------------------------------------------------------------------------------

    def _request_fields(
        self, flow: http.HTTPFlow, state: FlowState, body: bytes, fields: list[tuple[str, str]]
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "direction": "in",
            "flow": flow.id,
            "method": flow.request.method,
            "url": redact_query(state.request_path or flow.request.path),
            "summary": state.request.summary[:2000],
            "decision": state.decision.action,
            "rules": list(state.decision.rule_ids),
            "mask_rules": list(state.decision.mask_rule_ids),
            "approval_id": state.decision.approval_id,
            "request_headers": _headers_for_record(fields),
            "request_size": len(body),
        }
        if body:
            data.update(self._recordable(body, _first(fields).get("content-type", ""), state))
        return data

    def _record_request(
        self, flow: http.HTTPFlow, state: FlowState, body: bytes, fields: list[tuple[str, str]]
    ) -> None:
        """Record the request on its own (long-lived exchanges; ordinary ones are recorded with their
        response as one event, and their decision is in the audit log before they are forwarded)."""
        state.session.record("http", self._request_fields(flow, state, body, fields))

    def _recordable(self, body: bytes, content_type: str, state: FlowState) -> dict[str, Any]:
        head = body[: bodies.RECORD_LIMIT]
        truncated = len(body) > len(head)
        masking = bodies.Masking(
            state.masking.plan, kubernetes=state.target.kubernetes, secrets=True, secrets_response=True
        )
        if state.target.kubernetes and _carries_token(state.call):
            return _masked_or_omitted(body, truncated, "request_", bodies.mask_tokens, "service-account token", masking)
        if state.target.kubernetes and state.call and state.call.info.resource == "secrets":
            # A patch names its values without the Secret around them ({"data": {...}}, JSON patch values):
            # masked as writes to secrets, and not recorded at all when not read as JSON (protobuf, YAML).
            return _masked_or_omitted(body, truncated, "request_", bodies.mask_secret_write, "secret values", masking)
        if not state.target.kubernetes:
            recorded = _credentials_masked(body, truncated, content_type, "request_", masking)
            if recorded is not None:
                return recorded
        if not truncated and (is_json_type(content_type) or body.lstrip()[:1] in (b"{", b"[")):
            try:
                return _body_for_record(masking.mask_json_bytes(body), prefix="request_")
            except bodies.BodyError:
                log.debug("request body of a JSON request is not JSON; recorded as bytes")
        return _body_for_record(masking.mask_bytes(head), truncated, prefix="request_")

    def _record_response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        if resp is None:
            return
        tap = state.tap
        if state.streamed:
            body = bytes(tap.head)
            size_out, size_in = tap.size_out, tap.size_in
        else:
            body = resp.raw_content or b""
            size_out = len(body)
            size_in = int(flow.metadata.get("lictor.upstream_size", size_out))
            body = body[: bodies.RECORD_LIMIT]
        pending, state.pending = state.pending, None
        data: dict[str, Any] = pending or {
            "direction": "out",
            "flow": flow.id,
            "method": flow.request.method,
            "url": redact_query(state.request_path),
        }
        data.update(
            {
                "status": resp.status_code,
                "response_headers": _headers_for_record(resp.headers),
                "response_size": size_out,
                "upstream_response_size": size_in,
                "masked": dict(state.masking.counts),
                "duration_ms": round((time.monotonic() - state.started) * 1000, 3),
            }
        )
        if state.target.kubernetes and state.masking.secrets_response and not state.masking.secrets:
            data["response_body_omitted"] = "revealed secret values"
        elif state.target.kubernetes and _carries_token(state.call):
            # the agent got the token it was allowed to create; the recording does not keep it
            if _encoding(resp.headers.get_all("content-encoding")) == "identity":
                data.update(
                    _masked_or_omitted(
                        body, size_out > len(body), "response_", bodies.mask_tokens, "service-account token"
                    )
                )
            else:
                data["response_body_omitted"] = "service-account token"
        elif _encoding(resp.headers.get_all("content-encoding")) == "identity":
            truncated = size_out > len(body)
            recorded = None
            if not state.target.kubernetes:  # an OAuth token endpoint's answer: the agent got it, not the recording
                recorded = _credentials_masked(body, truncated, resp.headers.get("content-type", ""), "response_")
            data.update(_body_for_record(body, truncated, prefix="response_") if recorded is None else recorded)
        state.session.record("http", data)

    def _audit_refused(self, flow: http.HTTPFlow, target: HttpTarget | None, problem: str) -> None:
        """Audit a request refused before any decision (its body was never forwarded)."""
        self._audit_client_refused(flow.client_conn, target, problem)

    def head_refused(self, client: Client, problem: str) -> None:
        """Audit a request whose head mitmproxy could not even read within its bound (see _bounded_request_heads)."""
        self._audit_client_refused(client, self._target(client), problem)

    def _audit_client_refused(self, client: Client, target: HttpTarget | None, problem: str) -> None:
        self.gateway.audit_event(
            "http.refused",
            {"target": target.name if target is not None else "", "peer": _peer(client), "problem": problem},
            fail_closed=False,
        )

    # -- responses ----------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._responseheaders(flow)
        except Exception:
            log.exception("responseheaders failed; the response is not relayed (fail closed)")
            self.replace_at_headers(flow, 502, "the gateway could not check the upstream's response")
        flow.metadata[HEADERS_DONE] = True

    def replace_at_headers(self, flow: http.HTTPFlow, status: int, message: str, *, unmaskable: bool = False) -> None:
        """Answer instead of an upstream response whose headers are known but whose body is not relayed
        (``unmaskable``: because the gateway cannot mask it as the upstream sent it; audited)."""
        target = self._target(flow.client_conn)
        kubernetes = bool(target and target.kubernetes)
        hint, rule = (UNMASKABLE_HINT, UNMASKABLE_RULE) if unmaskable else (RETRY_HINT, "")
        state = flow.metadata.get(STATE)
        if isinstance(state, FlowState):
            self._record_refusal(flow, state, status, message, unmaskable)  # audited with the upstream's status
        self._answer_at_headers(flow, error(status, message, hint, kubernetes=kubernetes, rule=rule))

    def _record_refusal(
        self, flow: http.HTTPFlow, state: FlowState, status: int, message: str, unmaskable: bool
    ) -> None:
        """Record a response answered with ``status`` instead; one the gateway cannot mask as the upstream sent
        it is also audited, under :data:`UNMASKABLE_RULE`."""
        if unmaskable:
            self._audit_response_refused(flow, state, UNMASKABLE_RULE, message)
            self._record_failure(flow, state, status=status, error=message, rule=UNMASKABLE_RULE)
        else:
            self._record_failure(flow, state, status=status, error=message)

    def _audit_response_refused(self, flow: http.HTTPFlow, state: FlowState, rule: str, problem: str) -> None:
        resp = flow.response
        self.gateway.audit_event(
            "http.response_refused",
            {
                "target": state.target.name,
                "session": state.session.id,
                "flow": flow.id,
                "method": flow.request.method,
                "url": redact_query(state.request_path),
                "upstream_status": resp.status_code if resp is not None else 0,
                "rule": rule,
                "problem": problem,
            },
            fail_closed=False,
        )

    def _answer_at_headers(self, flow: http.HTTPFlow, answer: Answer) -> None:
        """Send ``answer`` instead of the upstream's response, whose head arrived; its body is read and dropped."""
        body = answer.encode()
        resp = flow.response
        assert resp is not None
        _answer_head(resp, answer, len(body))
        sent = False

        def stream(chunk: bytes) -> list[bytes]:
            nonlocal sent
            if chunk == b"" and not sent:
                sent = True
                return [body]
            return []

        resp.stream = stream
        flow.metadata[ANSWERED] = True

    def _too_large(self, flow: http.HTTPFlow, state: FlowState, size: str) -> Answer:
        """The answer to a response that must be masked as one JSON document but is larger than
        ``http_buffer_limit``: not relayed, audited and recorded; the agent learns how to ask for less."""
        kubernetes = state.target.kubernetes
        message = (
            f"the response ({size}) is larger than the {self.buffer_limit} bytes this gateway masks as one JSON "
            "document, so it was not relayed"
        )
        if kubernetes:
            hint = (
                "ask for less at a time: smaller pages (kubectl --chunk-size=50, or limit= and continue= in the "
                "API), a label or field selector (-l, --field-selector), one namespace, or one object by name"
            )
        else:
            hint = "ask for less at a time: smaller pages (the API's limit or pagination parameters) or a filter"
        self._audit_response_refused(flow, state, TOO_LARGE_RULE, message)
        self._record_failure(flow, state, status=502, error=message, rule=TOO_LARGE_RULE)
        flow.metadata[ANSWERED] = True
        return error(502, message, hint, kubernetes=kubernetes, rule=TOO_LARGE_RULE)

    def _streamed(self, flow: http.HTTPFlow, state: FlowState, fn: bodies.StreamFn, transformed: bool) -> None:
        resp = flow.response
        assert resp is not None
        if transformed:
            resp.headers.pop("content-length", None)
            resp.headers["transfer-encoding"] = "chunked"
        resp.stream = fn
        state.streamed = True

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(ANSWERED):
            return
        state = flow.metadata.get(STATE)
        if not isinstance(state, FlowState):
            raise RuntimeError("upstream response for a flow Lictor did not allow")
        resp = flow.response
        assert resp is not None
        _relocate_headers(resp, state.target)
        scrubber = state.tap.scrubber
        if scrubber is not None:
            fields = resp.headers.fields
            cleaned = tuple((name, scrubber.whole(value)) for name, value in fields)
            if cleaned != fields:
                resp.headers.fields = cleaned
        if state.masking.active:
            _mask_headers(resp, state.masking)
        if resp.status_code == 101:
            return
        if flow.request.method.upper() == "HEAD" or resp.status_code in (204, 304):
            return
        masking = state.masking
        fields = _header_list(resp.headers)
        first = _first(fields)
        ctype = first.get("content-type", "")
        encoding = _encoding(v for k, v in fields if k == "content-encoding")
        length_s = first.get("content-length")
        length = int(length_s) if length_s is not None and length_s.isdigit() else None
        info = state.call.info if state.call else None
        live = bool(info and (info.watch or info.follow)) or ctype.lower().startswith("text/event-stream")
        masking.markup = _markup(ctype)

        def failed(exc: Exception) -> None:
            log.error("masking %s failed, closing the connection (fail closed): %s", flow.id, exc)
            self._record_failure(flow, state, error=f"masking failed: {exc}")
            self.close_client(flow)

        if not masking.active:
            if live or length is None or length > PASSTHROUGH_BUFFER:
                self._streamed(flow, state, bodies.passthrough(state.tap, failed), transformed=False)
            return
        if encoding != "identity":
            self.replace_at_headers(
                flow,
                502,
                f"the upstream sent a {encoding}-encoded body that the gateway must mask but cannot decode",
                unmaskable=True,
            )
            return
        transfer = ", ".join(
            c for c in content_codings(v for k, v in fields if k == "transfer-encoding") if c != "chunked"
        )
        if transfer:
            # A transfer coding other than chunked (never asked for: TE is not forwarded) is left on the body by
            # mitmproxy, which relays it as chunked: the detectors would read compressed bytes, the agent could
            # inflate them unmasked.
            self.replace_at_headers(
                flow,
                502,
                f"the upstream sent a body with transfer coding {transfer} that the gateway must mask but cannot "
                "decode",
                unmaskable=True,
            )
            return
        if sum(k == "content-type" for k, _ in fields) > 1:
            self.replace_at_headers(
                flow, 502, "the upstream sent two Content-Type headers; clients differ on which counts", unmaskable=True
            )
            return
        charset = _unmaskable_charset(ctype)
        if charset is not None:
            # UTF-16 and the like: card numbers and addresses are not the bytes the detectors look for
            self.replace_at_headers(
                flow,
                502,
                f"the upstream sent {charset} text that the gateway must mask; it masks UTF-8 (and ASCII) only",
                unmaskable=True,
            )
            return
        json_body = _json_like(ctype)
        if masking.needs_document and not json_body:
            self.replace_at_headers(
                flow,
                502,
                f"the upstream answered {ctype or 'without a content type'}; the gateway masks this response only "
                "as JSON",
                unmaskable=True,
            )
            return
        if json_body and (live or (length is None and _json_lines(ctype))):
            # Kubernetes watches, and JSON lines of unknown length (a feed, a generation written as it goes):
            # each value is masked and relayed as it ends, not held until the stream does
            self._streamed(flow, state, bodies.json_event_stream(masking, self.buffer_limit, state.tap, failed), True)
        elif json_body and length is not None and length <= self.buffer_limit:
            return  # buffered; masked whole in the response hook
        elif json_body and length is not None:
            self._answer_at_headers(flow, self._too_large(flow, state, f"{length} bytes"))
        elif json_body:
            # Of unknown length: the head waits until the body is known to fit, so that a larger one can still be
            # answered with an error the agent reads rather than cut short after a 200.
            def too_large() -> bytes:
                answer = self._too_large(flow, state, f"more than {self.buffer_limit} bytes")
                body = answer.encode() + b"\n"  # a line end: the credential scrubber holds back no part of it
                assert resp is not None
                _answer_head(resp, answer, len(body))
                return body

            flow.metadata[HOLD_HEAD] = True
            stream = bodies.document_stream(masking, self.buffer_limit, state.tap, failed, too_large)
            self._streamed(flow, state, stream, True)
        else:
            self._streamed(flow, state, bodies.byte_stream(masking, state.tap, failed, live=live), True)

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self._response(flow)
        except Exception:
            log.exception("response handling failed; the response is not relayed (fail closed)")
            self._fail_response(flow, "the gateway could not check the upstream's response")
        flow.metadata[RESPONSE_DONE] = True

    def _record_failure(self, flow: http.HTTPFlow, state: FlowState, **details: Any) -> None:
        pending, state.pending = state.pending, None
        base = pending or {"direction": "out", "flow": flow.id, "method": flow.request.method}
        state.session.record("http", {**base, **details})

    def _fail_response(self, flow: http.HTTPFlow, message: str, *, unmaskable: bool = False) -> None:
        state = flow.metadata.get(STATE)
        if isinstance(state, FlowState):
            self._record_refusal(flow, state, 502, message, unmaskable)
            if state.streamed:
                self.close_client(flow)
                return
        target = self._target(flow.client_conn)
        kubernetes = bool(target and target.kubernetes)
        hint, rule = (UNMASKABLE_HINT, UNMASKABLE_RULE) if unmaskable else (RETRY_HINT, "")
        answer = error(502, message, hint, kubernetes=kubernetes, rule=rule)
        flow.response = http.Response.make(502, answer.encode(), {"Content-Type": "application/json"})
        flow.metadata[ANSWERED] = True

    def _response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(ANSWERED):
            return
        state = flow.metadata.get(STATE)
        if not isinstance(state, FlowState):
            raise RuntimeError("upstream response for a flow Lictor did not allow")
        resp = flow.response
        assert resp is not None
        if state.streamed or resp.status_code == 101:
            self._record_response(flow, state)
            return
        raw = resp.raw_content or b""
        flow.metadata["lictor.upstream_size"] = len(raw)
        if raw and state.masking.active:
            encoding = _encoding(resp.headers.get_all("content-encoding"))
            if encoding != "identity":
                self._fail_response(
                    flow, f"the upstream sent a {encoding}-encoded body the gateway cannot mask", unmaskable=True
                )
                return
            try:
                bodies.check_utf8_start(raw)  # UTF-16 or UTF-32 without a charset (a BOM, JSON's zero bytes)
            except bodies.BodyError as exc:
                self._fail_response(flow, str(exc), unmaskable=True)
                return
            masked: bytes | None = None
            if _json_like(resp.headers.get("content-type", "")):
                try:
                    masked = state.masking.mask_json_bytes(raw)
                except bodies.BodyError as exc:
                    if state.masking.needs_document:
                        self._fail_response(flow, f"the upstream's JSON could not be masked: {exc}", unmaskable=True)
                        return
            if masked is None and b"\\u" in raw:
                # \u escapes outside a JSON document (text/json, NDJSON, a JSON body behind an XSSI prefix):
                # the detectors read the bytes, where jane\u0040example.com is no address. Read as JSON lines
                # where it is that; otherwise not relayed.
                masked = _mask_json_lines(state.masking, raw)
                if masked is None:
                    self._fail_response(
                        flow, "the upstream's text has \\u escapes the gateway cannot read as JSON", unmaskable=True
                    )
                    return
            resp.content = state.masking.mask_bytes(raw) if masked is None else masked
        scrubber = state.tap.scrubber
        if scrubber is not None and resp.raw_content:
            cleaned = scrubber.whole(resp.raw_content)
            if cleaned != resp.raw_content:
                resp.raw_content = cleaned
        if flow.metadata.get("lictor.approval_id"):
            resp.headers["X-Lictor-Approval"] = str(flow.metadata["lictor.approval_id"])
        self._record_response(flow, state)

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            state = flow.metadata.get(STATE)
            if state is None and flow.error is not None and "body_size_limit" in flow.error.msg:
                # A chunked request body grew past max_body: mitmproxy answered 413 and closed.
                target = self._target(flow.client_conn)
                self._audit_refused(
                    flow, target, f"request body larger than max_body ({self.body_size_limit}); answered 413"
                )
                if flow.metadata.get(EXPECTS_CONTINUE):
                    # mitmproxy already sent "100 Continue" and then has no final answer to give: the agent
                    # would wait for ever. Give it one, then end the connection.
                    self._final_answer_and_close(
                        flow,
                        error(
                            413,
                            f"the request body is larger than this gateway's limit ({self.body_size_limit} bytes)",
                            "send a smaller body",
                            kubernetes=bool(target and target.kubernetes),
                        ),
                    )
            if isinstance(state, FlowState) and flow.error is not None:
                pending, state.pending = state.pending, None
                msg = unquoted_error(flow.error.msg)
                if pending is not None:
                    state.session.record("http", {**pending, "error": msg})
                else:
                    state.session.record("http.error", {"flow": flow.id, "error": msg})
        except Exception:
            log.exception("recording a flow error failed")

    # -- WebSockets ---------------------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        try:
            state = flow.metadata.get(STATE)
            if isinstance(state, FlowState):
                _WS_CLOSE[flow.client_conn.id] = lambda reason: _close_reason(state, reason)
            if isinstance(state, FlowState) and flow.response is not None:
                state.session.record(
                    "http.websocket",
                    {
                        "flow": flow.id,
                        "event": "start",
                        "subprotocol": flow.response.headers.get("sec-websocket-protocol", ""),
                    },
                )
        except Exception:
            log.exception("recording a WebSocket start failed")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        _WS_CLOSE.pop(flow.client_conn.id, None)
        try:
            state = flow.metadata.get(STATE)
            if isinstance(state, FlowState) and state.ws is not None:
                ws = state.ws
                ws.cancel_flush()
                _WS_BEFORE.pop(flow.client_conn.id, None)
                end = {
                    "flow": flow.id,
                    "event": "end",
                    "messages": ws.messages,
                    "bytes_from_agent": ws.bytes_in,
                    "bytes_to_agent": ws.bytes_out,
                    "masked": dict(state.masking.counts),
                }
                held = sum(m.pending for m in ws.maskers.values())
                if held:  # the upstream closed without a status, right after writing them
                    end["output_held_back"] = held
                state.session.record("http.websocket", end)
        except Exception:
            log.exception("recording a WebSocket end failed")

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        try:
            if not message.injected:
                await self._websocket_message(flow, message)
            flow.metadata[WS_SEEN] = id(message)
        except Exception:
            log.exception("WebSocket message handling failed; closing (fail closed)")
            message.drop()
            flow.metadata[WS_SEEN] = id(message)
            self.close_client(flow)

    def _inject(self, flow: http.HTTPFlow, to_client: bool, data: bytes) -> None:
        if self.proxyserver is not None:
            self.proxyserver.inject_websocket(flow, to_client, data, False)

    async def _websocket_message(self, flow: http.HTTPFlow, message: Any) -> None:
        state = flow.metadata.get(STATE)
        if not isinstance(state, FlowState) or state.ws is None:
            raise RuntimeError("WebSocket message on a flow Lictor did not allow")
        ws = state.ws
        ws.messages += 1
        content: bytes = message.content
        if message.from_client:
            ws.bytes_in += len(content)
        else:
            ws.bytes_out += len(content)
        direction = "from_agent" if message.from_client else "to_agent"
        if not message.from_client and state.tap.scrubber is not None and content:
            cleaned = state.tap.scrubber.whole(content)
            if cleaned != content:
                message.content = content = cleaned
        if not ws.channels:
            if not message.from_client and not state.masking.plan_empty:
                if message.is_text and b"\\u" in content:
                    # JSON messages (GraphQL subscriptions, socket.io) escape what the detectors look for
                    # (jane\u0040example.com): masked as JSON, one value per line; otherwise not relayed.
                    # Binary messages (a port-forward tunnel, compressed data) hold these bytes by chance.
                    masked = _mask_json_lines(state.masking, content)
                    if masked is None:
                        raise bodies.BodyError("a WebSocket message has \\u escapes the gateway cannot read as JSON")
                    content = masked
                else:
                    content = state.masking.mask_bytes(content)
                message.content = content
            self._record_ws(state, flow, direction, None, content)
            return
        if not content:
            return
        channel, data = content[0], content[1:]
        if message.from_client:
            if channel == 0:
                if ws.inspect_stdin:
                    await self._inspect_stdin(flow, state, message, data, final=False)
                else:
                    self._record_ws(state, flow, direction, "stdin", data)
            elif channel == 4:
                self._record_ws(state, flow, direction, "resize", data)
            elif channel == 255:
                if ws.inspect_stdin and (ws.stdin_buf or ws.stdin_held):
                    await self._inspect_stdin(flow, state, message, b"", final=True)
                    self._inject(flow, False, content)  # the close signal, after the last line
                self._record_ws(state, flow, direction, "close", data)
            else:
                message.drop()
                self._record_ws(state, flow, direction, f"refused channel {channel}", data)
        else:
            if channel in (1, 2) and not state.masking.plan_empty:
                # A value may be split across messages (the container wrote it in two pieces, or the
                # kubelet's read ended inside it): the masker holds back what more output could still
                # complete, and releases it with the next message, when the container is idle, or
                # before the status that ends the exec.
                masker = ws.maskers.get(channel)
                if masker is None:
                    masker = ws.maskers[channel] = state.masking.plan.stream()
                data = masker.feed(data)
                state.masking.counts.update(masker.counts)
                masker.counts.clear()
                self._schedule_ws_flush(flow, state)
                if not data:
                    message.drop()
                    return
                message.content = bytes([channel]) + data
            elif any(m.pending for m in ws.maskers.values()):
                self._release_ws_output(flow, state, final=True)  # sent before this message
            name = {1: "stdout", 2: "stderr", 3: "status", 4: "resize"}.get(channel, f"channel {channel}")
            self._record_ws(state, flow, direction, name, data)

    def _schedule_ws_flush(self, flow: http.HTTPFlow, state: FlowState) -> None:
        ws = state.ws
        assert ws is not None
        ws.cancel_flush()
        if any(m.pending for m in ws.maskers.values()):
            loop = asyncio.get_running_loop()
            ws.flush_timer = loop.call_later(WS_FLUSH_IDLE, self._idle_ws_flush, flow, state)

    def _idle_ws_flush(self, flow: http.HTTPFlow, state: FlowState) -> None:
        try:
            if state.ws is not None:
                state.ws.flush_timer = None
            if flow.websocket is None or flow.websocket.timestamp_end is not None:
                return
            self._release_ws_output(flow, state, final=False)
        except Exception:
            log.exception("releasing held-back exec output failed; closing (fail closed)")
            self.close_client(flow)

    def _release_ws_output(self, flow: http.HTTPFlow, state: FlowState, *, final: bool) -> None:
        """Send the exec output the maskers hold back: all of it when ``final`` or with a terminal,
        else whole lines (see :data:`WS_FLUSH_IDLE`)."""
        ws = state.ws
        assert ws is not None
        if final:
            ws.cancel_flush()
        for channel, masker in ws.maskers.items():
            if not masker.pending:
                continue
            out = masker.flush() if final or ws.tty else masker.flush_lines()
            state.masking.counts.update(masker.counts)
            masker.counts.clear()
            if out:
                if final:
                    _ws_send_before_next(flow, bytes([channel]) + out)
                else:
                    self._inject(flow, True, bytes([channel]) + out)
                name = "stdout" if channel == 1 else "stderr"
                self._record_ws(state, flow, "to_agent", name, out)

    async def _inspect_stdin(
        self, flow: http.HTTPFlow, state: FlowState, message: Any, data: bytes, final: bool
    ) -> None:
        """Line-inspected stdin of a non-interactive shell: each line is checked before it reaches the shell.

        Lines are split as the shell reads them: a newline after an unescaped backslash continues the line,
        so ``r\\`` and ``m -rf /`` are checked as the one command they are. A line that grows past
        :data:`STDIN_LINE_LIMIT` is refused whole (checking it in pieces would let a command straddle two)."""
        ws = state.ws
        assert ws is not None
        buf = ws.stdin_buf + data
        if ws.stdin_skip:
            ended, rest = _shell_lines(buf)
            if not ended and not final:
                # still inside the refused line: keep only a trailing backslash run, which may continue it
                ws.stdin_buf = rest[len(rest.rstrip(b"\\")) :]
                message.drop()
                return
            ws.stdin_skip = False
            buf = buf[len(ended[0]) :] if ended else b""
        complete, rest = _shell_lines(buf)
        if final and (rest or (ws.stdin_held and not complete)):
            complete.append(rest)
            rest = b""
        refused = b""
        if len(rest) > STDIN_LINE_LIMIT:
            refused, rest = rest, b""
            ws.stdin_skip = True
        ws.stdin_buf = rest
        forward: list[bytes] = []
        for index, ended in enumerate(complete):
            line = ws.stdin_held + ended
            ws.stdin_held = b""
            text = _CONTINUATION.sub(b"", line).decode("utf-8", "replace").strip()
            last = final and index == len(complete) - 1
            if text and self._incomplete(line) and not last and len(line) <= STDIN_LINE_LIMIT:
                ws.stdin_held = line  # the shell reads on: decided (and forwarded) whole, once complete
                continue
            verdict = self._check_line(state, text, line) if text else None
            self._record_ws(state, flow, "from_agent", "stdin", line, blocked=verdict is not None)
            if verdict is None:
                forward.append(line)
            else:
                notice = f"lictor: denied by rule {verdict.rule_ids[0]}: {verdict.message}\n".encode()
                self._inject(flow, True, b"\x02" + notice)
        if refused:
            self._refuse_long_line(flow, state, refused)
        if forward:
            message.content = b"\x00" + b"".join(forward)
        else:
            message.drop()

    def _refuse_long_line(self, flow: http.HTTPFlow, state: FlowState, head: bytes) -> None:
        """A stdin line too long to be checked as one line is not forwarded; the agent is told why."""
        call = state.call
        assert call is not None
        message = f"a stdin line longer than {STDIN_LINE_LIMIT} bytes cannot be checked, so it is not run"
        decision = Decision.deny(message, UNREADABLE, self.gateway.policy.version)
        request = Request(
            protocol="kubernetes",
            action=str(call.request.attrs["verb"]),
            attrs={**call.request.attrs, "command": head[:500].decode("utf-8", "replace")},
            target=state.target.name,
            summary=f"{call.request.summary} | stdin: {head[:500].decode('utf-8', 'replace')}",
            payload=f"stdin {call.request.payload} sha256:{hashlib.sha256(head).hexdigest()}",
        )
        state.session.audit(request, decision, "stdin")
        self._record_ws(state, flow, "from_agent", "stdin", head, blocked=True)
        self._inject(flow, True, f"\x02lictor: denied by rule {UNREADABLE}: {message}\n".encode())

    @staticmethod
    def _incomplete(line: bytes) -> bool:
        try:
            analyse(_shell_text(line), line=True)
        except ShellIncompleteError:
            return True
        except ShellParseError:
            return False
        return False

    def _check_line(self, state: FlowState, line: str, raw: bytes) -> Decision | None:
        """A ``deny`` rule on this command line blocks it (the session itself was already allowed), and so
        does the shell analysis when it cannot tell what the line runs, or when the line starts a program
        that would read the lines after it as its own code (``python3``, ``sh``, ``perl``)."""
        call = state.call
        assert call is not None
        problem = None
        try:
            attrs = line_attrs(call.request.attrs, _shell_text(raw), state.ws.shell_state if state.ws else None)
        except ShellParseError as exc:
            problem = str(exc)
            attrs = {**call.request.attrs, "command": line, "parse_error": problem}
        attrs["command"] = line
        request = Request(
            protocol="kubernetes",
            action=str(attrs["verb"]),
            attrs=attrs,
            target=state.target.name,
            summary=f"{call.request.summary} | stdin: {line[:500]}",
            payload=f"stdin {call.request.payload} {line}",
        )
        if problem is not None:
            decision = Decision.deny(
                f"this line cannot be checked, so it is not run: {problem}. Send plain commands, one per line; "
                "put program text in a file in the container and run that (python3 /path/script.py)",
                STDIN_UNPARSABLE_RULE,
                self.gateway.policy.version,
            )
            state.session.audit(request, decision, "stdin")
            return decision
        decision = state.session.policy_decision(request)
        if decision.action == "deny" and decision.rule_ids and decision.rule_ids[0] != DEFAULT_DENY:
            state.session.audit(request, decision, "stdin")
            return decision
        return None

    def _record_ws(
        self, state: FlowState, flow: http.HTTPFlow, direction: str, channel: str | None, data: bytes, **extra: Any
    ) -> None:
        """Terminal channels as ``input``/``output``/``resize`` (replayable); other messages as ``http.ws``."""
        head = data[:WS_RECORD_LIMIT]
        event: dict[str, Any] = {"flow": flow.id, "size": len(data), **extra}
        if channel is not None:
            event["channel"] = channel
        if channel in ("stdin", "stdout", "stderr"):
            event["data"] = head.decode("utf-8", "replace")
            if len(data) > len(head):
                event["truncated"] = True
            state.session.record("input" if channel == "stdin" else "output", event)
            return
        if channel == "resize":
            try:
                size = json.loads(data)
                event["width"], event["height"] = int(size["Width"]), int(size["Height"])
            except (ValueError, KeyError, TypeError):
                event.update(_body_for_record(head))
            state.session.record("resize", event)
            return
        event["direction"] = "in" if direction == "from_agent" else "out"
        # JSON messages (an API's login, a token pushed to the client) without their credentials
        masked = _credentials_masked(head, len(data) > len(head), "", "")
        event.update(_body_for_record(head, len(data) > len(head)) if masked is None else masked)
        state.session.record("http.ws", event)


class FailClosedGate:
    """The last addon: whatever happened before, nothing undecided is forwarded or relayed."""

    name = "lictor-gate"

    def __init__(self, proxy: LictorProxy) -> None:
        self.proxy = proxy

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or not 400 <= flow.response.status_code < 600:
            log.error("CONNECT %s was not refused; killing it (fail closed)", flow.id)
            if flow.killable:
                flow.kill()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(ALLOWED) is True or flow.response is not None or flow.error is not None:
            return
        log.error("flow %s reached the gate undecided; killing it (fail closed)", flow.id)
        if flow.killable:
            flow.kill()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(HEADERS_DONE) or flow.metadata.get(ANSWERED):
            return
        log.error("response of %s was not checked; replacing it (fail closed)", flow.id)
        try:
            self.proxy.replace_at_headers(flow, 502, "the gateway could not check the upstream's response")
        except Exception:
            if flow.killable:
                flow.kill()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(RESPONSE_DONE) or flow.metadata.get(ANSWERED):
            return
        log.error("response of %s was not finished by Lictor; not relaying it (fail closed)", flow.id)
        state = flow.metadata.get(STATE)
        if isinstance(state, FlowState) and state.streamed:
            self.proxy.close_client(flow)
        else:
            flow.response = http.Response.make(502, b'{"error":"bad_gateway"}', {"Content-Type": "application/json"})

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if flow.metadata.get(WS_SEEN) != id(message):
            log.error("WebSocket message of %s was not checked; dropping it (fail closed)", flow.id)
            message.drop()
            self.proxy.close_client(flow)
        del flow.websocket.messages[:-1]  # bounded memory: mitmproxy keeps every message otherwise


_MITMPROXY_DIR = str(Path(mitmproxy.__file__).parent)


def _answer_head(resp: http.Response, answer: Answer, length: int) -> None:
    """Make ``resp``'s head (not sent yet) that of ``answer``, whose body is ``length`` bytes."""
    resp.status_code = answer.status
    resp.reason = ""
    resp.headers = http.Headers(
        [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
        + [(name.encode(), value.encode()) for name, value in answer.headers.items()]
    )


def _credential_forms(target: HttpTarget) -> tuple[bytes, ...]:
    """The injected credential values, whole and without their scheme (``Bearer xyz`` and ``xyz``), each also
    as a reflection may write it: JSON with ``/`` escaped (PHP's ``json_encode``) and percent-encoded (a
    query string, a ``Location``); values shorter than 8 bytes are left out (blanking them would blank
    ordinary text)."""
    forms: set[bytes] = set()
    for value in target.credentials.secret_values:
        for form in (value, value.split(" ", 1)[1] if " " in value.strip() else ""):
            raw = form.strip().encode("utf-8", "surrogateescape")
            if len(raw) >= 8:
                forms.add(raw)
                forms.add(raw.replace(b"/", b"\\/"))
                forms.add(quote_from_bytes(raw, safe="").encode())
                forms.add(quote_from_bytes(raw, safe=" ").replace(" ", "+").encode())
    return tuple(forms)


def _tls_records(handler: Any, data: bytes) -> bytes | None:
    """``data`` encrypted as TLS records of the agent's connection (None if its TLS layer is not found)."""
    current: Any = getattr(handler, "layer", None)
    for _ in range(32):
        if current is None:
            return None
        if isinstance(current, tls_layers.ClientTLSLayer) and current.conn is handler.client and current.tls:
            try:
                current.tls.sendall(data)
            except SSL.Error:
                return None
            out = bytearray()
            while True:
                try:
                    out += current.tls.bio_read(65535)
                except SSL.WantReadError:
                    return bytes(out)
        current = current.layer if isinstance(current, proxy_layer.NextLayer) else getattr(current, "child_layer", None)
    return None


def _carries_masked_secret(body: bytes) -> bool:
    return any(form in body for form in MASKED_SECRET_FORMS)


def _carries_token(call: K8sCall | None) -> bool:
    """A request about service-account tokens, whose bodies carry one: a TokenRequest (the ``token``
    subresource; its answer holds the token issued) or a TokenReview (request and answer hold the token
    checked). Any resource's ``token`` subresource and ``tokenreviews`` of any group count, and any verb."""
    if call is None or not call.info.is_resource_request:
        return False
    return call.info.subresource == "token" or call.info.resource == "tokenreviews"


def _masked_or_omitted(
    body: bytes,
    truncated: bool,
    prefix: str,
    mask: Callable[[Any, Counter[str]], Any],
    what: str,
    masking: bodies.Masking | None = None,
) -> dict[str, Any]:
    """A body that carries credentials (a Secret's values, a service-account token: see :func:`_carries_token`)
    as recorded: read as JSON, with ``mask`` (then ``masking``'s rules) applied, or left out, saying ``what``
    it holds, when it cannot be read as one whole JSON document (protobuf, YAML, cut at the recording limit)."""
    if not body:
        return {}
    if not truncated:
        try:
            doc = mask(bodies.loads(body), Counter())
            if masking is not None:
                doc = masking.mask_document(doc, references=bodies.may_reference(body))
            return _body_for_record(bodies.dumps(doc), prefix=prefix)
        except (bodies.BodyError, ValueError, RecursionError):  # not JSON, or too deep to mask
            pass
    return {f"{prefix}body_omitted": what}


_JSON_KEY = re.compile(rb'"((?:[^"\\]|\\.){0,256})"\s*:')
# Every credential field name holds one of these words (``code`` only next to a grant), or is escaped.
_CREDENTIAL_WORDS = re.compile(f"(?i){bodies.CREDENTIAL_WORDS}|grant|\\\\".encode())


def _may_carry_credentials(body: bytes) -> bool:
    """Does JSON text (maybe cut short) name a credential field (see :func:`bodies.credential_name`)? A key
    with an escape counts: ``\\u0070assword`` is ``password`` to a JSON parser; so does a patch operation where
    a credential word appears (its path may name the field)."""
    if _CREDENTIAL_WORDS.search(body) is None:  # the usual body: no key to look at one by one
        return False
    grant = b"grant" in body.lower()
    for match in _JSON_KEY.finditer(body):
        key = match.group(1)
        if b"\\" in key or bodies.credential_name(key.decode("utf-8", "replace"), grant):
            return True
    # a patch operation names the field it sets in its path ({"op": "replace", "path": "/password", ...})
    return b'"op"' in body


def _credentials_masked(
    body: bytes, truncated: bool, content_type: str, prefix: str, masking: bodies.Masking | None = None
) -> dict[str, Any] | None:
    """An HTTP body or WebSocket message as recorded without the credentials it carries by well-known field
    names (an OAuth token request's client secret, password or refresh token; the token endpoint's answer):
    masked in a form (urlencoded or multipart) and in JSON, JSON left out when it cannot be read whole (cut at
    the recording limit). ``masking``'s rules apply too. None when the body is neither, or names no such field:
    it is recorded as any other."""
    head = body[: bodies.RECORD_LIMIT]
    media = content_type.split(";", 1)[0].strip().lower()
    boundary = bodies.multipart_boundary(content_type) if media == "multipart/form-data" else None
    if media == "application/x-www-form-urlencoded" or boundary is not None:
        counts: Counter[str] = Counter()
        # field by field: a cut value is masked all the same
        if boundary is None:
            masked = bodies.mask_form_credentials(head, counts)
        else:
            masked = bodies.mask_multipart_credentials(head, boundary, counts)
        if not counts:
            return None
        return _body_for_record(masked if masking is None else masking.mask_bytes(masked), truncated, prefix)
    if not (is_json_type(content_type) or head.lstrip()[:1] in (b"{", b"[")) or not _may_carry_credentials(head):
        return None
    return _masked_or_omitted(body, truncated, prefix, bodies.mask_credentials, "credentials", masking)


_LOCATION_HEADERS = (b"location", b"content-location", b"link")
_LINK_TARGET = re.compile(r"<([^>]*)>")


def _relocate_headers(resp: http.Response, target: HttpTarget) -> None:
    """Rewrite the ``Location`` and ``Content-Location`` headers, and the targets of ``Link`` (pagination:
    ``<...?page=2>; rel="next"``), that name the upstream's own URL (see :func:`location_for_agent`), so that
    an agent following them stays behind the gateway."""
    fields = resp.headers.fields
    if not any(name.lower() in _LOCATION_HEADERS for name, _ in fields):
        return
    out = []
    for name, value in fields:
        if name.lower() in _LOCATION_HEADERS:
            text = value.decode("utf-8", "surrogateescape")
            if name.lower() == b"link":
                moved: str | None = _LINK_TARGET.sub(
                    lambda m: f"<{location_for_agent(m.group(1), target) or m.group(1)}>", text
                )
            else:
                moved = location_for_agent(text, target)
            if moved is not None:
                value = moved.encode("utf-8", "surrogateescape")
        out.append((name, value))
    resp.headers.fields = tuple(out)


def location_for_agent(value: str, target: HttpTarget) -> str | None:
    """A ``Location`` the upstream answered, as the agent must follow it; None to leave it as it is.

    The gateway sends the upstream its own host name (``Host``), from which frameworks build absolute URLs
    (a redirect, the ``Location`` of a ``201 Created``): followed as such, the agent would leave the gateway
    for an address it cannot reach, or reach it without the gateway. Such a URL, and a path under the
    target's base path, become a path on the gateway (the base path taken off), which every client resolves
    against the URL it asked: the gateway's."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    absolute = bool(parts.scheme or parts.netloc)
    if absolute:
        default = 443 if parts.scheme.lower() == "https" else 80
        if (
            parts.scheme.lower() != target.scheme
            or parts.username is not None
            or (parts.hostname or "").lower() != target.upstream_host.lower()
            or (port or default) != target.upstream_port
        ):
            return None
    elif not parts.path.startswith("/"):
        return None  # a relative path (or none): the agent resolves it against the gateway's URL already
    path = parts.path or "/"
    if target.base_path:
        if path != target.base_path and not path.startswith(target.base_path + "/"):
            return None  # outside what the target exposes: no path on the gateway reaches it
        path = path[len(target.base_path) :] or "/"
    elif not absolute:
        return None
    return urlunsplit(("", "", path, parts.query, parts.fragment))


def _proxy_target(flow: http.HTTPFlow) -> str:
    """A proxy request's method and target as the audit shows them: no credentials of its query."""
    req = flow.request
    if req.method.upper() == "CONNECT":
        return f"CONNECT {req.authority or req.host_header or ''}"[:300]
    return f"{req.method} {redact_query(req.path)} for host {req.authority}"[:300]


def _is_review(call: K8sCall, api_group: str, resource: str) -> bool:
    """A plain create of a review the gateway answers itself (can-i, whoami), not impersonated."""
    info = call.info
    return (
        info.is_resource_request
        and info.verb == "create"
        and info.api_group == api_group
        and info.resource == resource
        and not info.subresource
        and not info.name
        and not info.impersonate
    )


# What an agent that set the gateway as its proxy (HTTPS_PROXY, curl --proxy) is told: CONNECT, or an
# absolute-form target (GET http://host/...).
PROXY_REQUEST_MESSAGE = "this is a reverse proxy: send origin-form requests (GET /path), not proxy requests"
PROXY_REQUEST_HINT = "use the gateway's URL as the API's base URL instead of configuring it as a proxy"
# mitmproxy's own refusal of CONNECT in reverse mode, answered before any hook can answer instead
_MITMPROXY_CONNECT_ERROR = "mitmproxy received an HTTP CONNECT request"

# What mitmproxy quotes in its error messages: the bytes it could not parse (repr of bytes or str).
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"")


def unquoted_error(message: str) -> str:
    """mitmproxy's error ``message`` without the text it quotes: a response it could not parse is quoted as
    the upstream sent it (customer data, the target's credential echoed back), unmasked."""
    text = _QUOTED.sub("[...]", message)
    cut = min((i for i in (text.find("'"), text.find('"')) if i != -1), default=-1)
    return text if cut == -1 else text[:cut] + "[...]"  # a quote left open: nothing after it is kept


_PROXY_ERRORS = {
    400: "the request could not be read",
    413: "the request body is larger than this gateway accepts (max_body)",
    431: f"the request line and headers are larger than this gateway accepts ({MAX_REQUEST_HEAD} bytes)",
    502: "the gateway could not reach the upstream",
}
_PROXY_HINTS = {
    400: "retrying the same bytes cannot help; send a well-formed HTTP/1.1 request",
    413: "send a smaller body",
    431: "send fewer or shorter headers, or a shorter URL",
    502: "retry later; if it persists, ask the gateway operators",
}


def _json_error_responses() -> None:
    """Answer with JSON where mitmproxy itself answers an HTTP/1 request (a body over ``max_body``, a
    request it cannot read), instead of mitmproxy's HTML page. mitmproxy does not say which target the
    connection is for, so the document is both answers: a Kubernetes ``Status``, which kubectl prints as
    a message, with the ``error`` and ``hint`` an HTTP target's agent reads in every other refusal."""
    from mitmproxy.http import Headers, Response
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1

    if getattr(_http1.make_error_response, "lictor_json", False):
        return

    def make_error_response(status_code: int, message: str = "") -> bytes:
        text = _PROXY_ERRORS.get(status_code, "the gateway could not handle the request")
        # A 400's message is about the agent's own bytes; a 502's may quote the upstream's (a header line it
        # could not parse: customer data, or the gateway's credential echoed), which no detector has read.
        detail = f"lictor: {text}" + (f" ({message})" if message and status_code == 400 else "")
        hint = _PROXY_HINTS.get(status_code, "retry later; if it persists, ask the gateway operators")
        if message.startswith(_MITMPROXY_CONNECT_ERROR):
            detail = f"lictor: {PROXY_REQUEST_MESSAGE} (CONNECT); {PROXY_REQUEST_HINT}"
            hint = PROXY_REQUEST_HINT
        body = {**k8s_status(status_code, detail), "error": error_name(status_code), "hint": hint}
        headers = Headers(Connection="close", Content_Type="application/json")
        return bytes(http1.assemble_response(Response.make(status_code, json.dumps(body).encode(), headers)))

    make_error_response.lictor_json = True  # type: ignore[attr-defined]
    _http1.make_error_response = make_error_response


# Client connection id -> binary WebSocket messages to send to that client before the next frame to it.
_WS_BEFORE: dict[str, list[bytes]] = {}
# Client connection id -> what makes a close frame's reason fit for that client (see websocket_start).
_WS_CLOSE: dict[str, Callable[[str], str]] = {}


def _close_reason(state: FlowState, reason: str) -> str:
    """A WebSocket close reason the agent may read: the target's credentials blanked and the rules' detectors
    applied, as to a text message; none when it cannot be masked so (``\\u`` escapes) or masking fails."""
    try:
        data = reason.encode("utf-8", "surrogatepass")
        if state.tap.scrubber is not None:
            data = state.tap.scrubber.whole(data)
        if not state.masking.plan_empty:
            if b"\\u" in data:
                return ""
            data = state.masking.mask_bytes(data)
        # a close frame holds at most 123 bytes of reason; a masked one may have grown past it
        return data[:123].decode("utf-8", "ignore")
    except Exception:
        log.exception("masking a WebSocket close reason failed; sent without one")
        return ""


def _ws_send_before_next(flow: http.HTTPFlow, data: bytes) -> None:
    """Send ``data`` (one binary message) to the agent right before the next frame the proxy sends it.

    For output released in the hook of the message that ends an exec (its status): an injected message
    would be queued behind the close frame that came in the same read, and lost."""
    _WS_BEFORE.setdefault(flow.client_conn.id, []).append(data)


def _ws_messages_before() -> None:
    """Let :func:`_ws_send_before_next` put messages in front of the next frame mitmproxy sends a client."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers import websocket as ws_layer
    from wsproto.events import BytesMessage, CloseConnection

    cls = ws_layer.WebsocketConnection
    if getattr(cls.send2, "lictor_before", False):
        return

    def send2(self: Any, event: Any) -> Any:
        if isinstance(event, CloseConnection) and event.reason and isinstance(self.conn, Client):
            # mitmproxy relays the upstream's close frame as it came: its reason is the upstream's text
            clean = _WS_CLOSE.get(self.conn.id)
            event = CloseConnection(code=event.code, reason=clean(event.reason) if clean else "")
        before = _WS_BEFORE.pop(self.conn.id, None) if _WS_BEFORE else None
        if before is None:
            return commands.SendData(self.conn, self.send(event))
        data = b"".join(self.send(BytesMessage(m)) for m in before) + self.send(event)
        return commands.SendData(self.conn, data)

    send2.lictor_before = True  # type: ignore[attr-defined]
    cls.send2 = send2


def _bounded_websocket_messages() -> None:
    """Close a WebSocket whose unfinished message exceeds :data:`MAX_WS_MESSAGE` (status 1009).

    mitmproxy collects a message's frames in memory until its last frame, without a limit: one endless
    fragmented message (from an agent past its upgrade, or from the upstream) grew the gateway's memory
    until it was killed."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers import websocket as ws_layer
    from wsproto.connection import ConnectionState
    from wsproto.events import CloseConnection

    cls = ws_layer.WebsocketLayer
    original = cls.relay_messages
    if getattr(original, "lictor_bounded", False):
        return

    def relay_messages(self: Any, event: Any) -> Any:
        yield from original(self, event)
        if self._handle_event == self.done:
            return
        for src in (self.client_ws, self.server_ws):
            if sum(len(b) for b in src.frame_buf) <= MAX_WS_MESSAGE:
                continue
            side = "agent" if src is self.client_ws else "upstream"
            log.warning("closing WebSocket %s: the %s sent a message over %d bytes", self.flow.id, side, MAX_WS_MESSAGE)
            src.frame_buf = [b""]
            close = CloseConnection(code=1009, reason="message too big for the gateway")
            for ws in (self.server_ws, self.client_ws):
                if ws.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                    yield ws.send2(close)
                yield commands.CloseConnection(ws.conn)
            websocket = self.flow.websocket
            websocket.timestamp_end = time.time()
            websocket.closed_by_client = src is self.client_ws
            websocket.close_code, websocket.close_reason = close.code, close.reason
            yield ws_layer.WebsocketEndHook(self.flow)
            self.flow.live = False
            self._handle_event = self.done
            return

    relay_messages.lictor_bounded = True  # type: ignore[attr-defined]
    cls.relay_messages = relay_messages


def _head_answers_without_body() -> None:
    """Send no body after the head of a response to ``HEAD``.

    mitmproxy writes whatever body a response set in a hook has, whatever the request's method: the JSON of
    the gateway's own answers (a ``403`` to a ``HEAD`` no rule allows) went out after the head, where the agent's
    client, which reads no body after a ``HEAD`` (RFC 9110, 9.3.2), read the next response. ``curl -I`` and then
    a ``GET`` on the same connection failed with ``Received HTTP/0.9``. The head keeps its ``Content-Length``
    (the size a ``GET`` would have had); the recording keeps the answer."""
    from mitmproxy.proxy.layers.http import _http1
    from mitmproxy.proxy.layers.http._events import ResponseData

    cls = _http1.Http1Server
    original = cls.send
    if getattr(original, "lictor_head", False):
        return

    def send(self: Any, event: Any) -> Any:
        if isinstance(event, ResponseData) and self.request is not None and self.request.method.upper() == "HEAD":
            return
        yield from original(self, event)

    send.lictor_head = True  # type: ignore[attr-defined]
    cls.send = send


def _trailers_dropped() -> None:
    """Drop the trailer section of a chunked HTTP/1 body (request or response) instead of crashing.

    mitmproxy raises ``NotImplementedError`` on HTTP/1 trailers: the connection's handler crashed and the
    agent waited for the end of the body until the idle timeout. Trailer fields are neither decided nor
    masked, and RFC 9110 (6.5) lets a recipient discard them: the body now ends without them."""
    import h11
    from mitmproxy.proxy.layers.http import _http1

    make = _http1.make_body_reader
    if getattr(make, "lictor_trailers", False):
        return

    class NoTrailers:
        def __init__(self, reader: Any) -> None:
            self.reader = reader

        def _strip(self, event: Any) -> Any:
            if isinstance(event, h11.EndOfMessage) and event.headers:
                log.warning("dropping the trailer section of a chunked body (%d fields)", len(event.headers))
                return h11.EndOfMessage()
            return event

        def __call__(self, buf: Any) -> Any:
            return self._strip(self.reader(buf))

        def read_eof(self) -> Any:
            return self._strip(self.reader.read_eof())

    def make_body_reader(expected_size: int | None) -> Any:
        return NoTrailers(make(expected_size))

    make_body_reader.lictor_trailers = True  # type: ignore[attr-defined]
    _http1.make_body_reader = make_body_reader


# Told of each request refused by _bounded_request_heads, before any hook sees it: (client, problem).
_HEAD_REFUSALS: list[Callable[[Client, str], None]] = []
# The empty line that ends a request head (mitmproxy reads lines ending in LF, with or without CR).
_HEAD_END = re.compile(rb"\n\r?\n")


def _bounded_request_heads() -> None:
    """Refuse a request whose unread bytes pass :data:`MAX_REQUEST_HEAD`: a ``431`` while its head (request
    line and headers) has not ended, a ``400`` for a chunk-size or trailer line that does not end, or for
    bytes sent ahead while an earlier request is still being answered.

    mitmproxy's HTTP/1 server appends what the agent sends to its receive buffer with no bound, and reads it
    only as complete lines (``FIXME: protect against header size DoS`` in its source), before any hook or
    token check runs: a client that never ended a header line, or a chunk extension, grew the gateway's
    memory until it was killed."""
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1

    server_class = _http1.Http1Server
    if getattr(server_class._handle_event, "lictor_bounded", False):
        return
    original = _http1.Http1Connection._handle_event

    def handle_event(self: Any, event: Any) -> Any:
        if (
            isinstance(event, events.DataReceived)
            and self.state == self.read_headers
            and len(self.buf) + len(event.data) > MAX_REQUEST_HEAD
            and _HEAD_END.search(bytes(self.buf) + event.data, 0, MAX_REQUEST_HEAD + 2) is None
        ):
            # A head over the bound that arrives with its end in one read is refused as one that has not ended
            # yet would be: whether the agent's bytes come in one read or several must not decide.
            yield from refuse(self, 431, "request line and headers")
            return
        yield from original(self, event)
        if (
            isinstance(event, events.DataReceived)
            and len(self.buf) > MAX_REQUEST_HEAD
            and self.state not in (self.passthrough, self.done)
        ):
            if self.state == self.read_headers:
                yield from refuse(self, 431, "request line and headers")
            elif self.state == self.read_body:
                yield from refuse(self, 400, "a chunk-size or trailer line")
            else:
                yield from refuse(self, 400, "bytes sent before the previous request was answered")

    def refuse(self: Any, status: int, problem: str) -> Any:
        problem = f"{problem}: more than {MAX_REQUEST_HEAD} bytes unread"
        log.warning("refusing a request from %s: %s", self.conn.peername, problem)
        for report in _HEAD_REFUSALS:
            try:
                report(self.conn, f"{problem}; answered {status}")
            except Exception:
                log.exception("auditing a refused request failed")
        yield commands.SendData(self.conn, _http1.make_error_response(status, problem))
        yield commands.CloseConnection(self.conn)
        if status == 400 and self.stream_id is not None:  # a request under way ends as an error
            error = self.ReceiveProtocolError(self.stream_id, problem, code=self.ReceiveProtocolError.code)
            yield _http1.ReceiveHttp(error)
        self.state = self.done

    handle_event.lictor_bounded = True  # type: ignore[attr-defined]
    server_class._handle_event = handle_event


# The status line of an interim (1xx) response other than 101 Switching Protocols.
_INTERIM_STATUS = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9][0-9][ \r\n]")


def _interim_responses_skipped() -> None:
    """Read past the upstream's interim responses (``100 Continue``, ``103 Early Hints``) to its answer.

    mitmproxy's HTTP/1 client took the first response head for the answer: after a ``103`` the agent got that
    status with a chunked body (which no client reads after a 1xx, so its connection broke), never the
    upstream's real answer, which was left unread. Interim responses have no body (RFC 9110, 15.2); they are
    dropped, and the answer after them is read, decided and masked as any."""
    from mitmproxy.proxy import events
    from mitmproxy.proxy.layers.http import _http1

    cls = _http1.Http1Client
    original = cls.read_headers
    if getattr(original, "lictor_interim", False):
        return

    def read_headers(self: Any, event: Any) -> Any:
        if isinstance(event, events.DataReceived) and self.request is not None:
            while True:
                data = bytes(self.buf)
                end = _HEAD_END.search(data)
                if end is None or not _INTERIM_STATUS.match(data):
                    break
                self.buf.maybe_extract_at_most(end.end())
        yield from original(self, event)

    read_headers.lictor_interim = True  # type: ignore[attr-defined]
    cls.read_headers = read_headers


def _held_response_heads() -> None:
    """Send the head of a streamed response whose flow has :data:`HOLD_HEAD` right before the first bytes its
    stream function relays (or the end of the response), not when it arrives from the upstream.

    Until then the stream function may still replace the status and headers: a JSON document of unknown
    length that turns out too large to mask is answered with an error the agent reads, not cut short after a
    ``200`` it already received."""
    from mitmproxy.proxy.layers.http import ResponseHeaders, SendHttp

    stream_class = http_layers.HttpStream
    start, relay = stream_class.start_response_stream, stream_class.state_stream_response_body
    if getattr(start, "lictor_held", False):
        return

    def start_response_stream(self: Any) -> Any:
        if not self.flow.metadata.get(HOLD_HEAD):
            return (yield from start(self))
        self.server_state = self.state_stream_response_body
        return None

    def state_stream_response_body(self: Any, event: Any) -> Any:
        for command in relay(self, event):
            if (
                isinstance(command, SendHttp)
                and command.connection is self.context.client
                and self.flow.metadata.pop(HOLD_HEAD, False)
            ):
                head = ResponseHeaders(self.stream_id, self.flow.response, end_stream=False)
                yield SendHttp(head, self.context.client)
            yield command

    start_response_stream.lictor_held = True  # type: ignore[attr-defined]
    stream_class.start_response_stream = start_response_stream
    stream_class.state_stream_response_body = state_stream_response_body


def _request_bodies_only() -> None:
    """Make mitmproxy's ``body_size_limit`` a limit on request bodies only (see the module docstring).

    mitmproxy 12 checks a response's declared length against the same option before the
    ``responseheaders`` hook, and answers 502 for a larger one, whether Lictor would stream it or not."""
    stream_class = http_layers.HttpStream
    original = stream_class.check_body_size
    if getattr(original, "lictor_requests_only", False):
        return

    def check_body_size(self: Any, request: bool) -> Any:
        if not request:
            return False
        return (yield from original(self, request))

    check_body_size.lictor_requests_only = True  # type: ignore[attr-defined]
    stream_class.check_body_size = check_body_size


def _eager_for_mitmproxy(previous: Any) -> Any:
    """A task factory that starts mitmproxy's own tasks eagerly, as ``mitmproxy``'s ``master.run()`` does.

    mitmproxy runs one task per hook call and is built (and tuned) for eager tasks: a hook that completes
    without waiting then costs no extra turn of the event loop. Other tasks of the gateway keep the loop's
    previous factory, so no other addon sees a change.
    """

    ours: dict[Any, bool] = {}  # code object -> is it mitmproxy's (a few dozen coroutine functions)

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None:
            eager = ours.get(code)
            if eager is None:
                eager = ours[code] = code.co_filename.startswith(_MITMPROXY_DIR)
            if eager:
                return asyncio.eager_task_factory(loop, coro, **kwargs)
        if previous is not None:
            return previous(loop, coro, **kwargs)  # type: ignore[no-any-return]
        return asyncio.Task(coro, loop=loop, **kwargs)

    return factory


class EmbeddedProxy:
    """One mitmproxy ``Master`` on the running event loop, with a listener per target."""

    def __init__(
        self,
        gateway: Gateway,
        targets: list[HttpTarget],
        *,
        confdir: str,
        untrusted_ca: str,
        idle_timeout: int,
        buffer_limit: int,
        setup_timeout: int = 30,
    ) -> None:
        self.gateway = gateway
        self.targets = targets
        self.confdir = confdir
        self.untrusted_ca = untrusted_ca
        self.idle_timeout = idle_timeout
        self.buffer_limit = buffer_limit
        self.setup_timeout = setup_timeout
        self.master: Master | None = None
        self._previous_factory: Any = None
        self.lictor: LictorProxy | None = None
        self.proxyserver: proxyserver.Proxyserver | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # per-connection chatter
        _request_bodies_only()
        _held_response_heads()
        _ws_messages_before()
        _bounded_websocket_messages()
        _bounded_request_heads()
        _trailers_dropped()
        _head_answers_without_body()
        _interim_responses_skipped()
        _json_error_responses()
        _lean.install()
        opts = Options()
        master = Master(opts, event_loop=loop, with_termlog=False)
        _dispatch.install(master)
        self.lictor = LictorProxy(
            self.gateway, self.targets, buffer_limit=self.buffer_limit, setup_timeout=self.setup_timeout
        )
        _HEAD_REFUSALS.append(self.lictor.head_refused)
        ps = proxyserver.Proxyserver()
        self.lictor.proxyserver = ps
        master.addons.add(ps, next_layer.NextLayer(), self.lictor, tlsconfig.TlsConfig(), FailClosedGate(self.lictor))
        opts.update(
            mode=[t.mode_spec for t in self.targets],
            confdir=self.confdir,
            ssl_insecure=False,
            ssl_verify_upstream_trusted_ca=self.untrusted_ca,  # mitmproxy's own fallback trusts nothing
            upstream_cert=False,
            http2=False,
            http3=False,
            websocket=True,
            rawtcp=False,
            connection_strategy="lazy",
            tcp_timeout=self.idle_timeout,
            stream_large_bodies=None,
            body_size_limit=str(self.lictor.body_size_limit),  # mitmproxy answers 413 beyond it
            keep_host_header=False,
            validate_inbound_headers=True,
            store_streamed_bodies=False,
        )
        self.master, self.proxyserver = master, ps
        self._previous_factory = loop.get_task_factory()
        loop.set_task_factory(_eager_for_mitmproxy(self._previous_factory))
        if not await ps.setup_servers():
            raise RuntimeError(
                "cannot listen for the HTTP/Kubernetes targets: "
                + ", ".join(f"{t.name} on {t.listen_host}:{t.listen_port}" for t in self.targets)
                + " (why is in the line above): stop what listens there, or give the target another listen address"
            )
        await master.running()
        # Everything loaded so far (mitmproxy, policy, detectors) lives as long as the process; keep the
        # cyclic garbage collector from walking it again on every collection of per-request objects.
        gc.freeze()
        for target in self.targets:
            log.info(
                "%s target %r listening on %s:%d (%s) -> %s",
                target.protocol,
                target.name,
                target.listen_host or "*",
                target.listen_port,
                "https" if target.tls else "http",
                target.upstream_url,
            )

    async def stop(self) -> None:
        master, ps = self.master, self.proxyserver
        if master is None or ps is None:
            return
        try:
            await ps.servers.update([])
        finally:
            for handler in list(ps.connections.values()):
                try:
                    handler.close_connection(handler.client)
                except Exception:
                    log.exception("closing a connection failed")
            await asyncio.sleep(0)
            await master.done()
            self.master = None
            if self.lictor is not None and self.lictor.head_refused in _HEAD_REFUSALS:
                _HEAD_REFUSALS.remove(self.lictor.head_refused)
            asyncio.get_running_loop().set_task_factory(self._previous_factory)
