"""Outgoing webhooks on approval events: Slack-compatible or generic JSON, HMAC-signed, retried.

Deliveries run in the background: :meth:`Webhooks.emit` only queues, so a slow or broken receiver
never delays an agent. A delivery is retried with exponential backoff on connection errors, 5xx,
408 and 429, up to ``attempts`` times; other 4xx answers are final.

Signature: ``X-Lictor-Timestamp: <unix seconds>`` and ``X-Lictor-Signature: sha256=<hex>`` where the
hex is ``HMAC-SHA256(secret, "<timestamp>." + body)``. Signing the timestamp with the body lets a
receiver refuse replays (reject timestamps older than a few minutes).

Messages never carry an approve button: deciding from chat would let whoever can click in the
channel (the agent's own integration, say) approve. They link to the approval page instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .._text import left_to_right, printable
from ._model import Approval, format_duration

__all__ = ["WebhookTarget", "Webhooks", "sign"]

log = logging.getLogger("lictor.approvals")

EVENTS = ("approval.created", "approval.decided", "approval.expired")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Lictor-Signature`` value for ``body`` sent at ``timestamp``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    format: str = "generic"  # slack | generic
    secret: bytes | None = None
    events: frozenset[str] = frozenset(EVENTS)

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> WebhookTarget:
        url = str(entry.get("url", ""))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"approvals.webhooks: url {url!r} must be http(s)://host/...")
        fmt = str(entry.get("format", "generic"))
        if fmt not in ("slack", "generic"):
            raise ValueError(f"approvals.webhooks: format {fmt!r} is not slack or generic")
        secret = entry.get("secret")
        events = entry.get("events") or EVENTS
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            raise ValueError(f"approvals.webhooks: unknown events {unknown} (known: {', '.join(EVENTS)})")
        return cls(url, fmt, str(secret).encode() if secret else None, frozenset(events))


def _slack_escape(text: str, keep: str = "\n") -> str:
    # Slack reads <...> as links/mentions (<!channel>); agent-controlled text must not create either. Control
    # and format characters (ESC, bidi overrides such as U+202E, zero-width spaces) are shown as \xNN, as on
    # the page and in the CLI: otherwise the chat could show the approver the characters in another order.
    # Each run of right-to-left letters is followed by a left-to-right mark, so that the numbers and operators
    # between two runs are not drawn right to left (see left_to_right).
    text = left_to_right(printable(text, keep=keep))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("```", "'''")


def _slack_field(text: str) -> str:
    """A field of the message's heading or details, each on a line of its own: a line break in text the agent
    chose (its token's subject, its reason, the request) is shown as ``\\x0a``, not started, so it cannot add a
    line that reads as another field (``*Requester:*`` of someone else, a ``*Decision reason:*``)."""
    return _slack_escape(text, keep="")


def _clip_request(text: str, limit: int = 1500) -> str:
    """The request as the approver reads it in the chat: whole, or cut with a mark that says how much more
    there is (what it does may be in the rest)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"… [{len(text) - limit} more characters: read the whole request on the review page]"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# What queued and in-flight messages may hold in all: a message carries the request (up to 256 KiB of text,
# more once JSON-escaped), and an agent that opens request after request while a receiver is down or slow
# would otherwise fill the queue (1,000 messages) with up to gigabytes.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
REQUESTER_SHARE = 4  # one requester's messages may take a quarter of the queue (messages and bytes) at most


class Webhooks:
    """Queues and delivers approval events to the configured receivers."""

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        public_url: str = "",
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        timeout: float = 10.0,
        queue_size: int = 1000,
        concurrency: int = 8,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.targets = list(targets)
        self.public_url = public_url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.timeout = timeout
        self._queue: asyncio.Queue[tuple[WebhookTarget, str, bytes, tuple[str, str]]] | None = None
        self._queue_size = queue_size
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0  # of the messages queued or being delivered
        # and per requester (subject, issuer): messages, bytes. One requester's share is bounded, so that an agent
        # opening request after request while a receiver lags cannot crowd out the messages about other requests.
        self._by_requester: dict[tuple[str, str], tuple[int, int]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._concurrency = concurrency
        self._sem: asyncio.Semaphore | None = None
        self.delivered = 0
        self.failed = 0

    # -- messages ---------------------------------------------------------------------------------

    def link(self, approval_id: str) -> str:
        return f"{self.public_url}/approvals/{approval_id}" if self.public_url else ""

    def body(self, target: WebhookTarget, event: str, approval: Approval) -> bytes:
        if target.format == "slack":
            doc = self._slack(event, approval)
        else:
            doc = {"event": event, "approval": approval.to_json(), "url": self.link(approval.id) or None}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()

    def _slack(self, event: str, a: Approval) -> dict[str, Any]:
        who = _slack_field(a.requester_sub)
        target = _slack_field(a.target)
        rule = _slack_field(", ".join(a.rule_ids))
        summary = _slack_field(_clip(a.summary or a.action, 200))
        if event == "approval.created":
            head = f"Approval {a.id} requested: {who} wants to run {summary} on {target}"
        elif event == "approval.expired":
            head = f"Approval {a.id} expired after {format_duration(a.spec.timeout)}: {summary} on {target}"
        else:
            by = _slack_field(", ".join(a.decided_by) or "?")
            head = f"Approval {a.id} {a.status} by {by}: {summary} on {target}"
        details = [
            f"*Requester:* {who}",
            f"*Target:* {target} ({_slack_field(a.protocol)})",
            f"*Rule:* {rule}",
            f"*Needs:* {_slack_field(a.spec.describe())}",
        ]
        if a.reason:
            details.append(f"*Agent's reason:* {_slack_field(_clip(a.reason, 500))}")
        if a.decision_reason and event != "approval.created":
            details.append(f"*Decision reason:* {_slack_field(_clip(a.decision_reason, 500))}")
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": head}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(details)}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"```{_slack_escape(_clip_request(a.payload or a.summary))}```"},
            },
        ]
        link = self.link(a.id)
        footer = f"digest {a.digest[:16]}… · policy {a.policy_version}"
        if link:
            footer = f"<{link}|Review and decide in Lictor> · " + footer
        else:
            footer = f"decide with `lictor approvals approve {a.id}` · " + footer
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]})
        return {"text": head, "blocks": blocks}

    # -- delivery ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None and self.targets:
            self._queue = asyncio.Queue(self._queue_size)
            self._queued_bytes = 0
            self._sem = asyncio.Semaphore(self._concurrency)
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="lictor-webhooks")

    def emit(self, event: str, approval: Approval) -> None:
        """Queue ``event`` for every receiver that wants it; never blocks, never raises."""
        if self._queue is None:
            return
        for target in self.targets:
            if event not in target.events:
                continue
            key = (approval.requester_sub, approval.requester_iss)
            try:
                body = self.body(target, event, approval)
                if self._queued_bytes + len(body) > self._max_queued_bytes:
                    raise asyncio.QueueFull
                count, size = self._by_requester.get(key, (0, 0))
                if count + 1 > max(1, self._queue_size // REQUESTER_SHARE) or (
                    size + len(body) > self._max_queued_bytes // REQUESTER_SHARE
                ):
                    self.failed += 1
                    log.error(
                        "approvals: %d webhook messages about requests of %s wait for delivery, as many as one "
                        "requester may have waiting; dropping %s for %s",
                        count,
                        printable(approval.requester_sub, 200, keep=""),
                        event,
                        target.url,
                    )
                    continue
                self._queue.put_nowait((target, event, body, key))
                self._queued_bytes += len(body)
                self._by_requester[key] = (count + 1, size + len(body))
            except asyncio.QueueFull:
                self.failed += 1
                log.error("approvals: webhook queue full, dropping %s for %s", event, target.url)
            except Exception:
                self.failed += 1
                log.exception("approvals: cannot build webhook %s for %s", event, target.url)

    async def _run(self) -> None:
        assert self._queue is not None and self._sem is not None
        while True:
            target, event, body, key = await self._queue.get()
            await self._sem.acquire()
            task = asyncio.get_running_loop().create_task(self._deliver_once(target, event, body, key))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._sem is not None:
            self._sem.release()
        if self._queue is not None:
            self._queue.task_done()

    async def _deliver_once(self, target: WebhookTarget, event: str, body: bytes, key: tuple[str, str]) -> None:
        try:
            await self._deliver(target, event, body)
        finally:
            self._queued_bytes -= len(body)
            count, size = self._by_requester.pop(key, (1, len(body)))
            if count > 1:
                self._by_requester[key] = (count - 1, size - len(body))

    async def _deliver(self, target: WebhookTarget, event: str, body: bytes) -> None:
        for attempt in range(self.attempts):
            try:
                status = await asyncio.wait_for(self._post(target, event, body), self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, problem = 0, f"{type(exc).__name__}: {exc}"
            else:
                problem = f"HTTP {status}"
            if 200 <= status < 300:
                self.delivered += 1
                return
            final = 400 <= status < 500 and status not in (408, 429)
            if final or attempt + 1 == self.attempts:
                self.failed += 1
                log.error("approvals: webhook %s to %s failed (%s), giving up", event, target.url, problem)
                return
            delay = self.backoff * (2**attempt) * random.uniform(0.9, 1.1)
            log.warning("approvals: webhook %s to %s failed (%s); retry in %.1fs", event, target.url, problem, delay)
            await asyncio.sleep(delay)

    async def _post(self, target: WebhookTarget, event: str, body: bytes) -> int:
        """POST ``body`` over HTTP/1.1 and return the status code."""
        parts = urlsplit(target.url)
        host = parts.hostname or ""
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        ts = str(int(time.time()))
        headers = [
            ("Host", parts.netloc.rsplit("@", 1)[-1]),
            ("User-Agent", "lictor-approvals"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("X-Lictor-Event", event),
            ("X-Lictor-Timestamp", ts),
        ]
        if target.secret:
            headers.append(("X-Lictor-Signature", sign(target.secret, ts, body)))
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if tls else None, server_hostname=host if tls else None
        )
        try:
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            line = await reader.readline()
            fields = line.decode("latin-1").split(" ", 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
                raise ValueError(f"not an HTTP response: {line[:80]!r}")
            return int(fields[1])
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def stop(self, grace: float = 2.0) -> None:
        """Give queued and in-flight deliveries ``grace`` seconds, then cancel them."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), grace)
            except TimeoutError:
                log.warning("approvals: stopping with %d webhook deliveries unfinished", len(self._inflight))
        tasks = [*self._inflight, *([self._worker] if self._worker else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # pragma: no cover - delivery errors are handled inside
                log.exception("approvals: webhook task failed")
        self._worker = None
        self._queue = None
