"""The approval broker: hold → notify → approve / deny / expire, bound to the exact request.

Theory of operation
-------------------
When the policy answers ``approve``, :meth:`ApprovalBroker.hold` stores an :class:`Approval`: the
exact request and its digest, the requester (subject *and* issuer), the rule and its approval block.

* ``mode: hold`` (default): the agent's request waits. ``notify(id, message)`` is called once so
  the protocol can tell the agent it is waiting and under which id; then the broker waits for a
  local decision (an event), a change announced by another replica (PostgreSQL ``NOTIFY``) or,
  as a safety net, the next poll of the store. On expiry the store transition
  ``pending → expired`` decides the race with a late approval.
* ``mode: ticket``: the request is denied at once with the id; once approved the agent retries
  with the id (HTTP ``X-Lictor-Approval``). The protocol addon calls :meth:`redeem`, which uses the
  approval up (single use, same digest, same requester, approved, not stale) and leaves a short-
  lived pass that the next :meth:`hold` of the same request by the same identity consumes.

Votes (:meth:`vote`) are checked against the live policy: the approver must hold one of the rule's
approver roles and must not be the requester; each approver counts once (the store's primary key).
One denial decides; ``required`` approvals approve.

When a held request resumes after approval it is decided again by the policy live *now*: deny →
denied; allow → allowed; approve → the approval counts only if it is for this very request (digest)
and its votes still satisfy the live rule's approver roles and count. The approval is then used up.

``scope: elevation`` also grants the rule's ``elevate.roles`` to the requester on that target for
``elevate.duration``. :meth:`elevated_roles` is on every decision's path, so it reads an in-memory
map refreshed from the store (on local approvals, on notifications, and every few seconds); expiry
is checked against the clock on each call, so a stale map never extends an elevation.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._text import printable
from ..identity import Identity, parse_duration
from ..policy_types import Decision, Request
from ._model import (
    APPROVED,
    DENIED,
    EXPIRED,
    MAX_PAYLOAD,
    PENDING,
    USED,
    WITHDRAWN,
    Approval,
    ApprovalError,
    ApprovalSpec,
    Vote,
    format_duration,
    new_approval_id,
    shown_payload,
)
from .store import Elevation, PostgresStore, _SqlStore, open_store
from .webhooks import Webhooks, WebhookTarget

if TYPE_CHECKING:
    from ..gateway import Gateway, Session
    from .http import HttpServer
    from .web import WebApp

__all__ = ["CONFIG_SCHEMA", "ApprovalBroker"]

log = logging.getLogger("lictor.approvals")

Notifier = Callable[[str, str], Awaitable[None]]

APPROVAL_RULE = "lictor:approval"

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "listen": {"type": "string", "description": "host:port of the approval page and API"},
        "public_url": {"type": "string", "description": "how approvers reach the page (links in messages)"},
        "store": {"enum": ["sqlite", "postgres"]},
        "sqlite": {"type": "string", "description": "SQLite file (default: state/approvals.db)"},
        "dsn": {"type": "string", "description": "PostgreSQL connection string (store: postgres)"},
        "schema": {"type": "string", "description": "PostgreSQL schema for the tables (default lictor)"},
        "poll_interval": {"type": ["string", "number"]},
        "session_ttl": {"type": ["string", "number"], "description": "web login lifetime (default 8h)"},
        "max_pending_per_requester": {
            "type": "integer",
            "minimum": 1,
            "description": "requests one identity may have waiting at a time (default 20)",
        },
        "max_requests_per_requester_per_hour": {
            "type": "integer",
            "minimum": 1,
            "description": "requests one identity may open in an hour, whatever became of them (default 120)",
        },
        "retention": {
            "type": ["string", "number"],
            "description": "how long requests that ended stay in the store (default 30d, at least 1h)",
        },
        "webhook_attempts": {"type": "integer", "minimum": 1, "maximum": 20},
        "webhook_backoff": {"type": ["string", "number"]},
        "webhooks": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["url"],
                "properties": {
                    "url": {"type": "string"},
                    "format": {"enum": ["slack", "generic"]},
                    "secret": {"type": "string"},
                    "events": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

# Requests one identity may have waiting at a time: a flood of requests would bury other agents' requests
# (the page lists the newest pending ones) and wear the approvers down.
DEFAULT_MAX_PENDING = 20
DEFAULT_MAX_PER_HOUR = 120

PASS_TTL = 60.0  # seconds a redeemed ticket waits for the retried request to reach hold()

# Requests that ended (and their votes and elevations) stay in the store this long; the audit log keeps their
# decisions for good. Shorter than an hour is refused: a bare number is seconds, and ``retention: 30`` meant
# as days would remove each decision half a minute after it was made.
DEFAULT_RETENTION = "30d"
MIN_RETENTION = 3600.0
PRUNE_INTERVAL = 600.0  # seconds between pruning passes (the first one runs when the broker starts)
PRUNE_BATCH = 500  # requests removed per transaction: no pass holds the store's lock for long
PRUNE_BATCHES = 20  # transactions per sweep; a larger backlog goes on at the next sweep


def parse_retention(value: str | float) -> float:
    """``approvals.retention`` in seconds: a finite duration of at least :data:`MIN_RETENTION`."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"approvals.retention: {exc}") from None
    if not math.isfinite(seconds) or seconds < MIN_RETENTION:
        raise ValueError(f"approvals.retention {value!r}: use a duration of at least 1h, e.g. 30d")
    return seconds


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    # A port past 65535 would be wrapped by the socket layer (99999 listens on 34463), out of approvers' reach.
    if not sep or not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"approvals.listen {text!r}: use host:port with a port from 1 to 65535, e.g. 127.0.0.1:8470")
    return host.strip("[]") or "127.0.0.1", int(port)


class ApprovalBroker:
    """Holds ``approve`` decisions until enough approvers decide; see the module docstring."""

    def __init__(
        self,
        gateway: Gateway,
        store: _SqlStore,
        *,
        listen: tuple[str, int] | None = None,
        public_url: str = "",
        webhooks: Webhooks | None = None,
        poll_interval: float = 2.0,
        session_ttl: float = 8 * 3600.0,
        max_pending_per_requester: int = DEFAULT_MAX_PENDING,
        max_requests_per_requester_per_hour: int = DEFAULT_MAX_PER_HOUR,
        retention: float = 30 * 86400.0,
    ) -> None:
        self.gateway = gateway
        self.store = store
        self.listen = listen
        self.public_url = public_url.rstrip("/")
        self.webhooks = webhooks or Webhooks([], self.public_url)
        self.poll_interval = poll_interval
        self.session_ttl = session_ttl
        self.max_pending_per_requester = max_pending_per_requester
        self.max_requests_per_requester_per_hour = max_requests_per_requester_per_hour
        # When each identity (issuer, subject) opened its requests in the last hour (time.monotonic()).
        self._opened: dict[tuple[str, str], collections.deque[float]] = {}
        self.retention = retention
        self._prune_at = 0.0  # time.monotonic() of the next pruning pass
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.server: HttpServer | None = None
        self.web: WebApp | None = None
        if listen is not None:
            from .http import HttpServer
            from .web import WebApp

            # Created now so other parts of the gateway can mount routes before it starts listening.
            self.server = HttpServer(*listen)
            self.web = WebApp(self, self.server)
        self._waiters: dict[str, asyncio.Event] = {}
        self._elevations: dict[tuple[str, str, str], tuple[Elevation, ...]] = {}
        # Withdrawn approvals, for a day (the races are seconds long): neither a refresh that read the store
        # before the withdrawal nor a vote that finishes after it may bring their elevations back.
        self._revoked: dict[str, float] = {}
        self._passes: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()  # redeem() may run in a worker thread
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh_wanted: asyncio.Event | None = None
        self._stopping = False
        self._started = False
        self._idle = asyncio.Event()  # set while no request is held
        self._idle.set()

    @classmethod
    def from_config(cls, gateway: Gateway, section: Mapping[str, Any]) -> ApprovalBroker:
        """Build the broker from the gateway config's ``approvals:`` section (ValueError if invalid)."""
        settings = cls._settings(section)
        store = open_store(section, gateway.state_dir, gateway.config.resolve)
        assert store is not None
        return cls(gateway, store, **settings)

    @classmethod
    def check_config(cls, section: Mapping[str, Any], state_dir: Path, resolve: Callable[[str], Path]) -> None:
        """Raise what :meth:`from_config` raises for ``section``, without opening the store or starting
        anything (``lictor check -c``)."""
        cls._settings(section)
        open_store(section, state_dir, resolve, open_sqlite=False)

    @staticmethod
    def _settings(section: Mapping[str, Any]) -> dict[str, Any]:
        """The broker's settings from ``section``, validated (ConfigError or ValueError)."""
        import jsonschema

        problems = [
            ".".join(["approvals", *map(str, e.absolute_path)]) + f": {e.message}"
            for e in jsonschema.Draft202012Validator(CONFIG_SCHEMA).iter_errors(dict(section))
        ]
        if problems:
            from ..config import ConfigError

            raise ConfigError("\n".join(problems))
        listen = parse_listen(str(section["listen"])) if section.get("listen") else None
        public_url = str(section.get("public_url") or "")
        if not public_url and listen is not None:
            host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
            public_url = f"http://{host}:{listen[1]}"
        targets = [WebhookTarget.parse(w) for w in section.get("webhooks") or []]
        webhooks = Webhooks(
            targets,
            public_url,
            attempts=int(section.get("webhook_attempts", 5)),
            backoff=parse_duration(section.get("webhook_backoff", 1.0)),
        )
        return {
            "listen": listen,
            "public_url": public_url,
            "webhooks": webhooks,
            "poll_interval": parse_duration(section.get("poll_interval", 2.0)),
            "session_ttl": parse_duration(section.get("session_ttl", "8h")),
            "max_pending_per_requester": int(section.get("max_pending_per_requester", DEFAULT_MAX_PENDING)),
            "max_requests_per_requester_per_hour": int(
                section.get("max_requests_per_requester_per_hour", DEFAULT_MAX_PER_HOUR)
            ),
            "retention": parse_retention(section.get("retention", DEFAULT_RETENTION)),
        }

    def _may_open(self, identity: Identity) -> bool:
        """Whether ``identity`` may open another request: at most ``max_requests_per_requester_per_hour`` in any
        hour, counted in this process. The pending cap alone let an agent that retries (a client timeout, a
        hang-up, a denial) open requests without end, each one a message to the approvers and a row kept for
        ``retention``."""
        now = time.monotonic()
        key = (identity.issuer, identity.subject)
        opened = self._opened.get(key)
        if opened is None:
            if len(self._opened) >= 10_000:  # drop identities whose hour has passed
                for k in [k for k, q in self._opened.items() if not q or q[-1] <= now - 3600]:
                    del self._opened[k]
            opened = self._opened[key] = collections.deque()
        while opened and opened[0] <= now - 3600:
            opened.popleft()
        if len(opened) >= self.max_requests_per_requester_per_hour:
            return False  # the denial is audited; a log line per retry would flood the log
        opened.append(now)
        return True

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the web server (if ``listen`` is set), the sweeper, webhooks and (PostgreSQL) LISTEN."""
        if self._started:
            return
        self._started = True
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._refresh_wanted = asyncio.Event()
        if isinstance(self.store, PostgresStore):
            try:
                await asyncio.to_thread(self.store.ensure)
            except Exception as exc:  # the gateway runs; approve decisions are denied until it is back
                log.error("approvals: PostgreSQL store unreachable (%s); held requests are denied until it is", exc)
            self._tasks.append(
                loop.create_task(self.store.listen(self._on_change, lambda: self._stopping), name="approvals-listen")
            )
        if not self.store.notifies:
            # One gateway per SQLite store: a request still pending in ``hold`` mode was held by a process
            # that is gone (crash, SIGKILL), together with its agent's connection. Nobody waits for it, so
            # approving it would only mislead the approver (and, for elevations, grant roles nobody asked
            # for any more). Ticket requests stay: their agents come back with the id.
            try:
                await asyncio.to_thread(self._withdraw_orphans)
            except Exception as exc:
                log.error("approvals: cannot withdraw requests left by a previous run (%s)", exc)
        try:
            await self._refresh_elevations()
        except Exception as exc:
            log.error("approvals: cannot read elevations (%s)", exc)
        self.webhooks.start()
        self._tasks.append(loop.create_task(self._sweeper(), name="approvals-sweeper"))
        if self._unreachable:
            log.warning(
                "approvals: approvals.listen is not set, so no approver can reach this gateway "
                "(`lictor approvals` and the page use its API): requests held for approval expire denied"
            )
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as exc:
                # Every example listens on 127.0.0.1:8470: a second gateway on one machine ends here.
                why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise ValueError(
                    f"approvals.listen {self.server.url.removeprefix('http://')}: cannot listen there ({why}): "
                    "stop what listens there, or give this gateway another address in approvals.listen"
                ) from exc
            log.info("approvals: page and API on %s", self.server.url)

    async def stop(self) -> None:
        """Release every held request (denied: the gateway is stopping) and stop background work."""
        self._stopping = True
        for event in self._waiters.values():
            event.set()
        try:
            await asyncio.wait_for(self._idle.wait(), 5.0)
        except TimeoutError:
            log.warning("approvals: %d held requests did not finish", len(self._waiters))
        if self.server is not None:
            await self.server.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("approvals: background task failed")
        self._tasks.clear()
        await self.webhooks.stop()
        try:
            await asyncio.to_thread(self.store.close)
        except Exception:
            log.exception("approvals: closing the store failed")
        self._started = False

    async def _sweeper(self) -> None:
        """Expire overdue requests (ticket mode has nobody waiting), refresh elevations and remove requests
        that ended longer than the retention ago."""
        assert self._refresh_wanted is not None
        healthy = True
        while True:
            try:
                await asyncio.wait_for(self._refresh_wanted.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._refresh_wanted.clear()
            try:
                for approval_id in await asyncio.to_thread(self.store.expire_due, time.time()):
                    await self._announce_expired(approval_id)
                await self._refresh_elevations()
                await self._prune()
                if not healthy:
                    log.warning("approvals: the store is reachable again")
                    healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if healthy:  # once per outage, not once per poll
                    log.error("approvals: store unavailable (%s); new approvals are denied until it is back", exc)
                    healthy = False

    async def _prune(self) -> None:
        """One pruning pass when it is due: requests that ended before ``now - retention`` go, a batch per
        transaction (see :meth:`~lictor.approvals.store._SqlStore.prune` for what counts as ended). Each
        batch removed is audited (``approval.pruned``, with the ids) and the pass logged."""
        if time.monotonic() < self._prune_at:
            return
        before = time.time() - self.retention
        removed = 0
        full = False
        try:
            for _ in range(PRUNE_BATCHES):
                ids = await asyncio.to_thread(self.store.prune, before, PRUNE_BATCH)
                if ids:
                    removed += len(ids)
                    self.gateway.audit_event(
                        "approval.pruned",
                        {"ids": ids, "retention": self.retention, "ended_before": before},
                        fail_closed=False,
                    )
                full = len(ids) == PRUNE_BATCH
                if not full:
                    break
        except Exception as exc:  # nothing is removed then, which is safe; approvals go on
            log.warning("approvals: removing requests past approvals.retention failed (%s); retrying later", exc)
            full = False
        # a backlog larger than one pass goes on at the next sweep, the expiry of pending requests in between
        self._prune_at = time.monotonic() + (0.0 if full else PRUNE_INTERVAL)
        if removed:
            log.info(
                "approvals: removed %d request(s) that ended more than %s ago from the store (approvals.retention); "
                "the audit log keeps their decisions",
                removed,
                format_duration(self.retention),
            )

    def _on_change(self, approval_id: str) -> None:
        """Another replica (or this one) changed ``approval_id`` ("" = anything)."""
        if approval_id:
            event = self._waiters.get(approval_id)
            if event is not None:
                event.set()
        else:
            for event in self._waiters.values():
                event.set()
        if self._refresh_wanted is not None:
            self._refresh_wanted.set()

    # -- elevation ----------------------------------------------------------------------------------

    def elevated_roles(self, identity: Identity, target: str) -> tuple[str, ...]:
        """Roles ``identity`` holds on ``target`` through a live time-boxed elevation. Fast: memory only."""
        entries = self._elevations.get((identity.subject, identity.issuer, target))
        if not entries:
            return ()
        now = time.time()
        roles: list[str] = []
        for e in entries:
            if e.until > now:
                roles.extend(r for r in e.roles if r not in roles)
        return tuple(roles)

    async def _refresh_elevations(self) -> None:
        rows = await asyncio.to_thread(self.store.elevations, time.time())
        fresh: dict[tuple[str, str, str], list[Elevation]] = {}
        with self._lock:
            now = time.time()
            self._revoked = {aid: until for aid, until in self._revoked.items() if until > now}
            revoked = set(self._revoked)
        for e in rows:
            if e.approval_id not in revoked:
                fresh.setdefault(e.key, []).append(e)
        with self._lock:
            self._elevations = {k: tuple(v) for k, v in fresh.items()}  # one assignment: readers see old or new

    def _withdraw(self, approval_id: str, reason: str, now: float) -> bool:
        """Withdraw a pending or approved request; the elevation it granted, if any, ends with it."""
        withdrawn = self.store.withdraw(approval_id, reason, now)
        if withdrawn is None:
            return False
        if not withdrawn.elevations:
            # It granted nothing, and being withdrawn it never will (votes need it pending): nothing for a
            # refresh or a late vote to bring back, so nothing to remember (a day of every withdrawn request
            # an agent opens and drops would be memory without bound).
            return True
        with self._lock:
            self._revoked[approval_id] = time.time() + 24 * 3600
            current = {
                key: kept
                for key, entries in self._elevations.items()
                if (kept := tuple(e for e in entries if e.approval_id != approval_id))
            }
            self._elevations = current
        return True

    def _add_elevation(self, approval: Approval) -> None:
        if approval.elevated_until is None:
            return
        e = Elevation(
            approval.requester_sub,
            approval.requester_iss,
            approval.target,
            approval.spec.elevate_roles,
            approval.elevated_until,
            approval.id,
        )
        with self._lock:
            current = dict(self._elevations)
            if e.approval_id in self._revoked or any(x.approval_id == e.approval_id for x in current.get(e.key, ())):
                return
            current[e.key] = (*current.get(e.key, ()), e)
            self._elevations = current

    # -- holding ----------------------------------------------------------------------------------

    def review_url(self, approval_id: str) -> str:
        return f"{self.public_url}/approvals/{approval_id}" if self.public_url else ""

    @property
    def _unreachable(self) -> bool:
        """Nothing serves the approvals API (the CLI and the page use it), and no other replica shares the
        store: only this gateway's addons can decide."""
        return self.server is None and not self.store.notifies

    def _how_to_decide(self, approval_id: str) -> str:
        url = self.review_url(approval_id)
        # with the URL: the command works as printed from any directory (not only next to lictor.yaml)
        where = f" --url {self.public_url}" if self.public_url else ""
        cli = f"`lictor approvals approve {approval_id}{where}`"
        if not url and self._unreachable:
            return "this gateway serves no approvals API (approvals.listen is not set), so no approver can reach it"
        return f"an approver can decide at {url} or with {cli}" if url else f"an approver can decide with {cli}"

    def _deny(self, decision: Decision, approval_id: str | None, message: str, status: str | None = None) -> Decision:
        rule = decision.rule_ids[0] if decision.rule_ids else APPROVAL_RULE
        denied = Decision.deny(message, rule, decision.policy_version)
        return replace(denied, approval_id=approval_id, masks=(), mask_rule_ids=(), approval_status=status)

    async def hold(self, session: Session, request: Request, decision: Decision, notify: Notifier | None) -> Decision:
        """Hold ``request`` (policy said ``approve``) until approved, denied or expired."""
        try:
            spec = ApprovalSpec.parse(decision.approval)
        except ValueError as exc:
            return self._deny(decision, None, f"{decision.message} — and its approval rule is unusable ({exc}); denied")
        if self._stopping:
            return self._deny(decision, None, "the gateway is stopping; retry in a moment")
        identity = session.identity
        digest = request.digest()
        ticket = self._take_pass(identity, digest)
        if ticket is not None:
            return await self._resume(session, request, decision, ticket, consumed=True)

        if not self._may_open(identity):
            return self._deny(
                decision,
                None,
                f"{decision.message} — and you opened {self.max_requests_per_requester_per_hour} approval requests "
                "in the last hour, as many as one identity may; retry later, or ask an approver",
            )
        approval = self._new_approval(session, request, decision, spec, digest)
        if not await asyncio.to_thread(self.store.create, approval, self.max_pending_per_requester):
            return self._deny(
                decision,
                None,
                f"{decision.message} — and {self.max_pending_per_requester} of your requests already wait for "
                "approval, as many as one identity may have waiting; retry once some are decided or expired",
            )
        try:
            self.gateway.audit_event("approval.created", self._audit_record(approval))
        except BaseException:
            await asyncio.to_thread(self._withdraw, approval.id, "audit store unavailable", time.time())
            raise
        self.webhooks.emit("approval.created", approval)
        log.info("approval %s requested by %s for %s", approval.id, identity.subject, request.summary[:200])

        if spec.mode == "ticket":
            return self._deny(
                decision,
                approval.id,
                f"{decision.message} — this needs approval {approval.id} ({spec.describe()}); "
                f"{self._how_to_decide(approval.id)}. Once it is approved, retry the same request with "
                f"approval id {approval.id} (HTTP: header X-Lictor-Approval: {approval.id}) within "
                f"{format_duration(spec.timeout)} of the approval.",
                PENDING,
            )

        event = asyncio.Event()
        self._waiters[approval.id] = event
        self._idle.clear()
        try:
            if notify is not None:
                await notify(
                    approval.id,
                    f"waiting for approval {approval.id}: {decision.message} — needs {spec.describe()}; "
                    f"expires in {format_duration(spec.timeout)}; {self._how_to_decide(approval.id)}",
                )
            final = await self._wait(approval, event)
        except asyncio.CancelledError as exc:
            # The agent went away or gave up (or the gateway is cancelling): nobody waits for this any more.
            # The request's resolution is audited like any other (approved, denied, expired), with why.
            why = exc.args[0] if exc.args and isinstance(exc.args[0], str) and exc.args[0] else None
            reason = why or "the agent stopped waiting"
            self._withdraw_now(approval.id, reason)
            withdrawn = self._deny(decision, approval.id, f"{decision.message} — withdrawn: {reason}", WITHDRAWN)
            try:
                session.audit(request, withdrawn, phase="approval")
            except Exception:
                log.exception("approvals: cannot audit the withdrawal of %s", approval.id)
            raise
        except BaseException:
            self._withdraw_now(approval.id, "error while waiting")
            raise
        finally:
            self._waiters.pop(approval.id, None)
            if not self._waiters:
                self._idle.set()
        return await self._conclude(session, request, decision, final)

    def _withdraw_orphans(self) -> None:
        reason = "the gateway restarted while the request was held; the agent was disconnected"
        for a in self.store.recent(pending=True, limit=1_000_000):
            if a.spec.mode == "hold" and self._withdraw(a.id, reason, time.time()):
                log.warning("approvals: %s withdrawn: %s", a.id, reason)
                self.gateway.audit_event(
                    "approval.withdrawn", {"id": a.id, "reason": "gateway restarted"}, fail_closed=False
                )

    async def _withdraw_audited(self, approval_id: str, reason: str, now: float) -> None:
        """Withdraw an approval its request can no longer use, and say so in the audit log."""
        if await asyncio.to_thread(self._withdraw, approval_id, reason, now):
            self.gateway.audit_event("approval.withdrawn", {"id": approval_id, "reason": reason}, fail_closed=False)

    def _withdraw_now(self, approval_id: str, reason: str) -> None:
        try:
            if self._withdraw(approval_id, reason, time.time()):
                self.gateway.audit_event("approval.withdrawn", {"id": approval_id, "reason": reason}, fail_closed=False)
        except Exception:
            log.exception("approvals: cannot withdraw %s", approval_id)

    def _new_approval(
        self, session: Session, request: Request, decision: Decision, spec: ApprovalSpec, digest: str
    ) -> Approval:
        now = time.time()
        payload = request.payload or request.summary
        import json

        shown = request.attrs if request.shown_attrs is None else request.shown_attrs
        try:
            attrs = json.loads(json.dumps(dict(shown), default=_plain))
        except (TypeError, ValueError):
            attrs = {"unserializable": repr(shown)[:2000]}
        return Approval(
            id=new_approval_id(),
            status=PENDING,
            created_at=now,
            expires_at=now + spec.timeout,
            requester_sub=session.identity.subject,
            requester_iss=session.identity.issuer,
            session_id=session.id,
            peer=session.peer,
            protocol=request.protocol,
            target=session.target,
            action=request.action,
            summary=request.summary[:4000],
            payload=shown_payload(payload),
            payload_truncated=len(payload) > MAX_PAYLOAD,
            attrs=attrs,
            reason=request.reason,
            digest=digest,
            rule_ids=decision.rule_ids,
            rule_message=decision.message,
            policy_version=decision.policy_version,
            spec=spec,
            replica=self.replica,
        )

    def _audit_record(self, a: Approval) -> dict[str, Any]:
        return {
            "id": a.id,
            "session": a.session_id,
            "requester": {"sub": a.requester_sub, "iss": a.requester_iss},
            "protocol": a.protocol,
            "target": a.target,
            "request": {"action": a.action, "summary": a.summary[:2000], "digest": a.digest},
            "reason": a.reason,
            "rule_ids": list(a.rule_ids),
            "policy_version": a.policy_version,
            "approval": a.spec.to_json(),
            "expires_at": a.expires_at,
        }

    async def _wait(self, approval: Approval, event: asyncio.Event) -> Approval:
        """Wait until the request is decided or expires; return its final record."""
        current = approval
        while True:
            if self._stopping:
                if await asyncio.to_thread(self._withdraw, approval.id, "the gateway stopped", time.time()):
                    self.gateway.audit_event(
                        "approval.withdrawn", {"id": approval.id, "reason": "gateway stopping"}, fail_closed=False
                    )
                got = await asyncio.to_thread(self.store.get, approval.id)
                return got or current
            remaining = current.expires_at - time.time()
            if remaining <= 0:
                if await asyncio.to_thread(self.store.expire, approval.id, time.time()):
                    await self._announce_expired(approval.id)
                got = await asyncio.to_thread(self.store.get, approval.id)
                if got is None:
                    raise ApprovalError(f"approval {approval.id} vanished from the store", 500)
                if got.status != PENDING:
                    return got
                continue  # pragma: no cover - expire() lost to nobody yet still pending: re-check
            try:
                await asyncio.wait_for(event.wait(), min(self.poll_interval, remaining))
            except TimeoutError:
                pass
            event.clear()
            try:
                got = await asyncio.to_thread(self.store.get, approval.id)
            except Exception as exc:
                log.warning("approvals: cannot read %s (%s); still waiting", approval.id, exc)
                continue
            if got is None:
                raise ApprovalError(f"approval {approval.id} vanished from the store", 500)
            current = got
            if current.status != PENDING:
                return current

    async def _announce_expired(self, approval_id: str) -> None:
        got = await asyncio.to_thread(self.store.get, approval_id)
        if got is None:
            return
        self.gateway.audit_event(
            "approval.expired",
            {"id": got.id, "approvals_given": got.approvals_given, "required": got.spec.required},
            fail_closed=False,
        )
        self.webhooks.emit("approval.expired", got)
        self._on_change(approval_id)

    async def _conclude(self, session: Session, request: Request, decision: Decision, final: Approval) -> Decision:
        if final.status == APPROVED:
            return await self._resume(session, request, decision, final.id, consumed=False)
        if final.status == DENIED:
            # an approver's words go into the agent's error text (and its terminal): no control characters
            who = printable(", ".join(final.decided_by), keep="") or "an approver"
            why = f": {printable(final.decision_reason, 2000, keep='')}" if final.decision_reason else ""
            return self._deny(decision, final.id, f"approval {final.id} was denied by {who}{why}", final.status)
        if final.status == EXPIRED:
            return self._deny(
                decision,
                final.id,
                f"approval {final.id} expired after {format_duration(final.spec.timeout)} "
                f"({final.approvals_given} of {final.spec.required} approvals given); retry to ask again",
                final.status,
            )
        if final.status == WITHDRAWN:
            why = printable(final.decision_reason, 2000, keep="") or "withdrawn"
            return self._deny(
                decision, final.id, f"approval {final.id} was withdrawn ({why}); retry to ask again", final.status
            )
        return self._deny(
            decision, final.id, f"approval {final.id} is {final.status}; it cannot be used again", final.status
        )

    async def _resume(
        self, session: Session, request: Request, decision: Decision, approval_id: str, *, consumed: bool
    ) -> Decision:
        """Decide ``request`` again under the live policy and use the approval up if it still applies."""
        identity = session.identity
        # as any other request on this connection: the live policy, elevations, and a token that has expired
        # meanwhile denies it
        live = session.policy_decision(request)
        now = time.time()
        ended = USED if consumed else WITHDRAWN  # how the approval ends if it cannot be used: agents are told
        if live.action == "deny":
            if not consumed:
                await self._withdraw_audited(approval_id, f"the live policy now denies it ({live.rule_ids[0]})", now)
            return replace(
                live,
                approval_id=approval_id,
                approval_status=ended,
                message=f"approval {approval_id} was given, but the policy live now denies this request: "
                f"{live.message}",
            )
        approval = await asyncio.to_thread(self.store.get, approval_id)
        if approval is None:
            return self._deny(decision, approval_id, f"approval {approval_id} is not in the store; denied")
        digest = request.digest()
        if approval.digest != digest or not approval.is_requester(identity):
            return self._deny(
                decision, approval_id, f"approval {approval_id} was given for a different request; denied"
            )
        if live.action == "approve":
            problem = self._still_satisfies(approval, live)
            if problem:
                if not consumed:
                    await self._withdraw_audited(approval_id, problem, now)
                return self._deny(live, approval_id, f"approval {approval_id} no longer suffices: {problem}", ended)
        if not consumed:
            ok = await asyncio.to_thread(
                self.store.consume, approval_id, digest, identity, now, now - approval.spec.timeout
            )
            if not ok:
                return self._deny(decision, approval_id, f"approval {approval_id} was already used; denied", USED)
        # The store has it used up already: the event reports what happened and waits in the gateway's backlog
        # while the spool takes no writes. The request itself is audited (fail closed) when it is decided.
        self.gateway.audit_event(
            "approval.used",
            {"id": approval_id, "session": session.id, "digest": digest, "live_action": live.action},
            fail_closed=False,
        )
        if approval.elevated_until is not None:
            self._add_elevation(approval)
        if live.action == "allow":
            return replace(live, approval_id=approval_id)
        return live.with_approval(approval_id)

    def _still_satisfies(self, approval: Approval, live: Decision) -> str:
        """Why the votes do not satisfy the live ``approve`` decision ("" if they do)."""
        try:
            spec = ApprovalSpec.parse(live.approval)
        except ValueError as exc:
            return f"the live approval rule is unusable ({exc})"
        unmet = spec.unmet(self._approvers_roles(approval, approval.votes))
        if unmet is not None:
            roles, _ = unmet
            valid = sum(1 for held in self._approvers_roles(approval, approval.votes) if set(held) & set(roles))
            return (
                f"the live rule {live.rule_ids[0]} needs {spec.describe()} and {valid} of the given approvals "
                f"qualify for role {', '.join(roles)}; retry to ask again"
            )
        return ""

    def _approvers_roles(self, approval: Approval, votes: Sequence[Vote]) -> list[tuple[str, ...]]:
        """The roles that the approvers of ``votes`` hold under the live policy (not the requester's)."""
        policy = self.gateway.policy
        return [
            policy.roles_for(v.identity())
            for v in votes
            if v.verdict == "approve" and not approval.is_requester(v.identity())
        ]

    # -- tickets ----------------------------------------------------------------------------------

    def redeem(self, identity: Identity, request: Request, approval_id: str) -> bool:
        """Use an approved ticket for ``request`` (synchronous; called by a protocol before deciding).

        True when approval ``approval_id`` is approved, for this exact request (digest), asked by the
        same identity, and not used or stale; it is then used up, and the next ``hold`` of this
        request by this identity on this gateway is allowed (after the live policy re-check).
        """
        now = time.time()
        digest = request.digest()
        try:
            approval = self.store.get(approval_id)
            if approval is None or approval.status != APPROVED:
                return False
            if approval.digest != digest or not approval.is_requester(identity):
                return False
            if not self.store.consume(approval_id, digest, identity, now, now - approval.spec.timeout):
                return False
        except Exception:
            log.exception("approvals: cannot redeem %s (denying)", approval_id)
            return False
        self.gateway.audit_event(
            "approval.redeemed",
            {"id": approval_id, "identity": identity.to_json(), "digest": digest},
            fail_closed=False,
        )
        with self._lock:
            self._passes = {k: v for k, v in self._passes.items() if v[1] > now}
            if len(self._passes) < 10_000:
                self._passes[(identity.subject, identity.issuer, digest)] = (approval_id, now + PASS_TTL)
        if approval.elevated_until is not None:
            self._add_elevation(approval)
        return True

    def _take_pass(self, identity: Identity, digest: str) -> str | None:
        with self._lock:
            entry = self._passes.pop((identity.subject, identity.issuer, digest), None)
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0]

    # -- approvers --------------------------------------------------------------------------------

    def approver_roles(self, identity: Identity, approval: Approval) -> tuple[str, ...]:
        """The roles through which ``identity`` may decide ``approval`` under the live policy."""
        held = self.gateway.policy.roles_for(identity)
        return tuple(r for r in approval.spec.approvers if r in held)

    def may_view(self, identity: Identity, approval: Approval) -> bool:
        return bool(self.approver_roles(identity, approval))

    def is_approver(self, identity: Identity) -> bool:
        """Whether ``identity`` may approve anything under the live policy (to log in to the page)."""
        policy = self.gateway.policy
        held = set(policy.roles_for(identity))
        for rule in policy.rules:
            if rule.action == "approve" and rule.approval and held & set(rule.approval.get("approvers") or ()):
                return True
        return False

    async def get(self, approval_id: str) -> Approval | None:
        return await asyncio.to_thread(self.store.get, approval_id)

    def not_found(self, approval_id: str, suffix: str = "") -> str:
        """What an approver is told about an id the store does not hold (or holds, but not for them)."""
        return (
            f"no approval request {approval_id}{suffix} (requests that ended are removed from the store "
            f"{format_duration(self.retention)} later; the audit log keeps their decisions)"
        )

    async def recent(self, *, pending: bool | None = None, limit: int = 100) -> list[Approval]:
        """The newest approvals (``pending`` True: waiting ones; False: decided ones; None: all)."""
        return await asyncio.to_thread(lambda: self.store.recent(pending=pending, limit=limit))

    async def recent_for(self, identity: Identity, *, pending: bool | None = None, limit: int = 100) -> list[Approval]:
        """The newest ``limit`` approvals that ``identity`` may decide (see :meth:`recent`). Chosen among those
        it may decide, not among all: newer requests for other approvers would push its own out of its list."""
        roles = self.gateway.policy.roles_for(identity)
        found: list[Approval] = []
        before: tuple[float, str] | None = None
        while roles and len(found) < limit:
            batch = max(limit - len(found), 100)
            rows = await asyncio.to_thread(
                functools.partial(self.store.recent, pending=pending, limit=batch, approvers=roles, before=before)
            )
            found.extend(a for a in rows if self.may_view(identity, a))
            if len(rows) < batch:
                break
            before = (rows[-1].created_at, rows[-1].id)
        return found[:limit]

    async def vote(self, approver: Identity, approval_id: str, verdict: str, reason: str = "") -> Approval:
        """Record ``approver``'s ``approve``/``deny``; raises ApprovalError with a reason if refused."""
        reason = reason.strip()[:2000]
        if verdict == "deny" and not reason:
            raise ApprovalError("a denial needs a reason (the agent is told why)", 400)
        approval = await asyncio.to_thread(self.store.get, approval_id)
        if approval is None:
            raise ApprovalError(self.not_found(approval_id), 404)
        if approval.is_requester(approver):
            self.gateway.audit_event(
                "approval.refused",
                {"id": approval_id, "approver": approver.to_json(), "why": "self-approval"},
                fail_closed=False,
            )
            raise ApprovalError("you cannot decide your own request", 403)
        if not self.approver_roles(approver, approval):
            self.gateway.audit_event(
                "approval.refused",
                {"id": approval_id, "approver": approver.to_json(), "why": "not an approver"},
                fail_closed=False,
            )
            raise ApprovalError(
                f"approval {approval_id} needs one of the roles {', '.join(approval.spec.approvers)}; "
                "you hold none of them",
                403,
            )
        result = await asyncio.to_thread(
            self.store.vote,
            approval_id,
            approver,
            verdict,
            reason,
            time.time(),
            # the rules of several teams may hold one request: each one's approvers must have approved
            lambda current, votes: current.spec.unmet(self._approvers_roles(current, votes)) is None,
        )
        after = result.approval
        # The store has the vote (and the outcome) already: these events report what happened, and wait in the
        # gateway's backlog while the spool takes no writes (refusing them would only lose them).
        self.gateway.audit_event(
            "approval.voted",
            {"id": approval_id, "approver": approver.to_json(), "verdict": verdict, "reason": reason},
            fail_closed=False,
        )
        if result.decided:
            self.gateway.audit_event(
                "approval.decided",
                {
                    "id": approval_id,
                    "status": after.status,
                    "decided_by": list(after.decided_by),
                    "reason": after.decision_reason,
                    "votes": [v.to_json() for v in after.votes],
                    "elevated_until": after.elevated_until,
                },
                fail_closed=False,
            )
            self.webhooks.emit("approval.decided", after)
            if after.status == APPROVED:
                self._add_elevation(after)
            log.info("approval %s %s by %s", approval_id, after.status, ", ".join(after.decided_by))
        self._on_change(approval_id)
        return after


def _plain(value: Any) -> Any:
    """A request attribute as approvers read it: sets as sorted lists (not ``frozenset({...})``)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)
