"""A small HTTP/1.1 server on asyncio streams for the gateway's own pages and API.

It serves few, short requests from approvers and the CLI, so it keeps to the simple subset:
one request per connection (``Connection: close``), bodies only with ``Content-Length`` (no
chunked uploads: 411/501), bounded request line, headers and body, a timeout on reading the
request and a bound on the connections served at once (:data:`MAX_CONNECTIONS`), so idle or slow clients
cannot hold connections. Anything malformed gets a 400.

Other parts of the gateway mount pages with :meth:`HttpServer.add_route`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Handler", "HttpRequest", "HttpResponse", "HttpServer", "bounded_number"]

log = logging.getLogger("lictor.approvals.http")

MAX_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
"""Connections served at once; one more is answered 503 and closed at once. Approvers and the CLI open a few:
this bounds the descriptors that idle or slow connections can take from the gateway process."""

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def bounded_number(text: str, ceiling: int) -> int | None:
    """``text`` as a whole number, ``ceiling`` at most; None unless it is ASCII digits (``²`` is a digit that
    int() refuses, and int() refuses 4,300 digits, so a longer number than ``ceiling`` is not converted)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return ceiling if len(digits) > len(str(ceiling)) else min(int(digits), ceiling)


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class HttpRequest:
    """One parsed request. Header names are lower-case."""

    method: str
    target: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    peer: str
    state: dict[str, Any] = field(default_factory=dict)  # for handlers/middleware

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def form(self) -> dict[str, str]:
        """The urlencoded form body (first value of each field); anything else is a BadRequest."""
        ctype = self.header("content-type").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise BadRequest(415, "expected a form (application/x-www-form-urlencoded)")
        try:
            parsed = parse_qs(self.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed form body") from None
        return {k: v[0] for k, v in parsed.items()}

    def json(self) -> Any:
        if not self.body:
            return {}
        ctype = self.header("content-type").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest(415, "expected application/json")
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed JSON body") from None

    def cookies(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.header("cookie").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in out:
                out[name] = value
        return out

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def html(cls, text: str, status: int = 200) -> HttpResponse:
        return cls(status, text.encode(), [("Content-Type", "text/html; charset=utf-8")])

    @classmethod
    def json(cls, value: Any, status: int = 200) -> HttpResponse:
        body = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":")).encode()
        return cls(status, body, [("Content-Type", "application/json")])

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> HttpResponse:
        return cls(status, text.encode(), [("Content-Type", content_type)])

    @classmethod
    def redirect(cls, location: str, status: int = 303) -> HttpResponse:
        return cls(status, b"", [("Location", location)])

    def set_cookie(self, name: str, value: str, *, max_age: int | None = None, secure: bool = False) -> None:
        """An HttpOnly, SameSite=Strict cookie on path /."""
        parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if secure:
            parts.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(parts)))


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpServer:
    """Routes requests by method and path prefix to async handlers."""

    def __init__(self, host: str, port: int, *, max_body: int = MAX_BODY) -> None:
        self.host = host
        self.port = port
        self.max_body = max_body
        self._routes: list[tuple[str, str, Handler]] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def add_route(self, method: str, path_prefix: str, handler: Handler) -> None:
        """Send ``method`` requests whose path is ``path_prefix`` or below it to ``handler``.

        The longest matching prefix wins; ``"/"`` catches everything not routed elsewhere.
        """
        if not path_prefix.startswith("/"):
            raise ValueError(f"path prefix {path_prefix!r} must start with /")
        self._routes.append((method.upper(), path_prefix.rstrip("/") or "/", handler))
        self._routes.sort(key=lambda r: len(r[1]), reverse=True)

    def _match(self, method: str, path: str) -> Handler | int:
        path_matched = False
        for m, prefix, handler in self._routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                if m == method or (method == "HEAD" and m == "GET"):
                    return handler
                path_matched = True
        return 405 if path_matched else 404

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_LINE)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            try:
                await self._write(
                    writer, HttpResponse.text("too many connections; retry in a moment\n", 503), head_only=False
                )
            except ConnectionError:
                pass
            finally:
                writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        method = "GET"
        request: HttpRequest | None = None
        try:
            try:
                request = await asyncio.wait_for(self._read(reader, peer_s), READ_TIMEOUT)
                method = request.method
                response = await self._dispatch(request)
            except BadRequest as exc:
                response = error_response(request, str(exc), exc.status)
            except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
                return
            await self._write(writer, response, head_only=method == "HEAD")
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("error answering %s", peer_s)
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _dispatch(self, request: HttpRequest) -> HttpResponse:
        handler = self._match(request.method, request.path)
        if isinstance(handler, int):
            return error_response(request, HTTPStatus(handler).phrase, handler)
        try:
            return await handler(request)
        except BadRequest:
            raise
        except Exception:
            log.exception("error handling %s %s", request.method, request.path)
            return error_response(request, "internal error", 500)

    async def _read(self, reader: asyncio.StreamReader, peer: str) -> HttpRequest:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise BadRequest(414, "request line too long") from None
        try:
            method, target, version = line.decode("ascii").rstrip("\r\n").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not target.startswith("/"):
            raise BadRequest(400, "malformed request line")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            try:
                raw = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise BadRequest(431, "header too long") from None
            if raw == b"\r\n":
                break
            try:
                text = raw.decode("latin-1").rstrip("\r\n")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
                raise BadRequest(400, "bad header") from None
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip() or text[0] in " \t":
                raise BadRequest(400, "malformed header")
            key = name.lower()
            value = value.strip()
            if key in headers:
                if key in ("content-length", "host", "authorization"):
                    raise BadRequest(400, f"duplicate {name} header")
                headers[key] += ("; " if key == "cookie" else ", ") + value
            else:
                headers[key] = value
        else:
            raise BadRequest(431, "too many headers")
        if "transfer-encoding" in headers:
            raise BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        length = bounded_number(headers.get("content-length", "0"), self.max_body + 1)
        if length is None:
            raise BadRequest(400, "bad Content-Length")
        if length > self.max_body:
            raise BadRequest(413, "request body too large")
        body = await reader.readexactly(length) if length else b""
        split = urlsplit(target)
        return HttpRequest(
            method=method.upper(),
            target=target,
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            peer=peer,
        )

    async def _write(self, writer: asyncio.StreamWriter, response: HttpResponse, *, head_only: bool) -> None:
        names = {k.lower() for k, _ in response.headers}
        headers = list(response.headers)
        headers.extend((k, v) for k, v in SECURITY_HEADERS if k.lower() not in names)
        headers.append(("Content-Length", str(len(response.body))))
        headers.append(("Connection", "close"))
        try:
            phrase = HTTPStatus(response.status).phrase
        except ValueError:
            phrase = "Status"
        for k, v in headers:
            if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
                raise ValueError("header injection")
        head = f"HTTP/1.1 {response.status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode("latin-1") + (b"" if head_only else response.body))
        await writer.drain()


def error_response(request: HttpRequest | None, message: str, status: int) -> HttpResponse:
    """An error the server answers itself: ``{"error": ...}`` under ``/api/`` (what API clients parse), else text."""
    if request is not None and (request.path == "/api" or request.path.startswith("/api/")):
        return HttpResponse.json({"error": message}, status)
    return HttpResponse.text(message + "\n", status)
