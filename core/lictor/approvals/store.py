"""Where approval requests, votes and elevations live: SQLite (one gateway) or PostgreSQL (replicas).

Every state change is one transaction that checks the state it starts from, so two approvers (or
two replicas) racing on the same request cannot both win: ``pending → approved|denied|expired|
withdrawn`` and ``approved → used`` each happen at most once. The PostgreSQL store also sends
``NOTIFY`` in the same transaction, which wakes the replica that holds the request.

Store methods are synchronous and thread-safe; the broker calls them from a worker thread.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .._files import private_database
from ..identity import Identity
from ._model import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    USED,
    WITHDRAWN,
    Approval,
    ApprovalError,
    ApprovalSpec,
    Vote,
)

__all__ = ["ApprovalStore", "Elevation", "PostgresStore", "SqliteStore", "VoteResult"]

_COLUMNS = (
    "id",
    "status",
    "created_at",
    "expires_at",
    "requester_sub",
    "requester_iss",
    "session_id",
    "peer",
    "protocol",
    "target",
    "action",
    "summary",
    "payload",
    "payload_truncated",
    "attrs",
    "reason",
    "digest",
    "rule_ids",
    "rule_message",
    "policy_version",
    "spec",
    "replica",
    "decided_at",
    "decided_by",
    "decision_reason",
    "used_at",
    "elevated_until",
)
_SELECT = ", ".join(_COLUMNS)


@dataclass(frozen=True)
class Elevation:
    """Roles granted to ``subject``/``issuer`` on ``target`` until ``until`` by approval ``approval_id``."""

    subject: str
    issuer: str
    target: str
    roles: tuple[str, ...]
    until: float
    approval_id: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subject, self.issuer, self.target)


@dataclass(frozen=True)
class VoteResult:
    """The approval after a vote, and whether this vote decided it."""

    approval: Approval
    decided: bool


Satisfied = Callable[[Approval, Sequence[Vote]], bool]


@dataclass(frozen=True)
class Withdrawn:
    """A withdrawal that happened, and how many elevations it ended."""

    elevations: int


class ApprovalStore(Protocol):
    """What the broker needs from a store."""

    notifies: bool  # True when other replicas' changes are announced through ``listen``

    def create(self, approval: Approval, max_pending: int | None = None) -> bool: ...

    def get(self, approval_id: str) -> Approval | None: ...

    def recent(
        self,
        *,
        pending: bool | None = None,
        limit: int = 100,
        approvers: Sequence[str] | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[Approval]: ...

    def vote(
        self,
        approval_id: str,
        voter: Identity,
        verdict: str,
        reason: str,
        now: float,
        satisfied: Satisfied | None = None,
    ) -> VoteResult: ...

    def expire(self, approval_id: str, now: float) -> bool: ...

    def expire_due(self, now: float) -> list[str]: ...

    def consume(self, approval_id: str, digest: str, requester: Identity, now: float, not_before: float) -> bool: ...

    def withdraw(self, approval_id: str, reason: str, now: float) -> Withdrawn | None: ...

    def elevations(self, now: float) -> list[Elevation]: ...

    def prune(self, before: float, limit: int) -> list[str]: ...

    def close(self) -> None: ...


def _like(text: str) -> str:
    """``text`` for a LIKE pattern with ``ESCAPE '\\'``: its ``%`` and ``_`` match only themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


class _SqlStore:
    """The SQL shared by both stores, written with ``?`` placeholders."""

    notifies = False
    _for_update = ""
    _skip_locked = ""
    _pyformat = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.t_approvals = "approvals"
        self.t_votes = "approval_votes"
        self.t_elevations = "approval_elevations"

    # -- dialect hooks ----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Any]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield None

    def _announce(self, cur: Any, payload: str) -> None:
        """Tell other replicas that ``payload`` changed (PostgreSQL only)."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _ddl(self, real: str) -> list[str]:
        a, v, e = self.t_approvals, self.t_votes, self.t_elevations
        return [
            f"""CREATE TABLE IF NOT EXISTS {a} (
                id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at {real} NOT NULL, expires_at {real} NOT NULL,
                requester_sub TEXT NOT NULL, requester_iss TEXT NOT NULL, session_id TEXT NOT NULL,
                peer TEXT NOT NULL, protocol TEXT NOT NULL, target TEXT NOT NULL, action TEXT NOT NULL,
                summary TEXT NOT NULL, payload TEXT NOT NULL, payload_truncated INTEGER NOT NULL,
                attrs TEXT NOT NULL, reason TEXT, digest TEXT NOT NULL, rule_ids TEXT NOT NULL,
                rule_message TEXT NOT NULL, policy_version TEXT NOT NULL, spec TEXT NOT NULL,
                replica TEXT NOT NULL, decided_at {real}, decided_by TEXT NOT NULL DEFAULT '[]',
                decision_reason TEXT NOT NULL DEFAULT '', used_at {real}, elevated_until {real})""",
            f"CREATE INDEX IF NOT EXISTS {a.replace('.', '_')}_pending ON {a} (status, expires_at)",
            f"CREATE INDEX IF NOT EXISTS {a.replace('.', '_')}_decided ON {a} (decided_at)",
            f"""CREATE TABLE IF NOT EXISTS {v} (
                approval_id TEXT NOT NULL, voter_sub TEXT NOT NULL, voter_iss TEXT NOT NULL,
                verdict TEXT NOT NULL, reason TEXT NOT NULL, at {real} NOT NULL, claims TEXT NOT NULL,
                PRIMARY KEY (approval_id, voter_sub, voter_iss))""",
            f"""CREATE TABLE IF NOT EXISTS {e} (
                approval_id TEXT PRIMARY KEY, subject TEXT NOT NULL, issuer TEXT NOT NULL, target TEXT NOT NULL,
                roles TEXT NOT NULL, until {real} NOT NULL)""",
        ]

    # -- rows -----------------------------------------------------------------------------------

    def _row(self, row: Sequence[Any], votes: Sequence[Vote]) -> Approval:
        d = dict(zip(_COLUMNS, row, strict=True))
        return Approval(
            id=d["id"],
            status=d["status"],
            created_at=float(d["created_at"]),
            expires_at=float(d["expires_at"]),
            requester_sub=d["requester_sub"],
            requester_iss=d["requester_iss"],
            session_id=d["session_id"],
            peer=d["peer"],
            protocol=d["protocol"],
            target=d["target"],
            action=d["action"],
            summary=d["summary"],
            payload=d["payload"],
            payload_truncated=bool(d["payload_truncated"]),
            attrs=json.loads(d["attrs"]),
            reason=d["reason"],
            digest=d["digest"],
            rule_ids=tuple(json.loads(d["rule_ids"])),
            rule_message=d["rule_message"],
            policy_version=d["policy_version"],
            spec=ApprovalSpec.from_json(json.loads(d["spec"])),
            replica=d["replica"],
            votes=tuple(votes),
            decided_at=None if d["decided_at"] is None else float(d["decided_at"]),
            decided_by=tuple(json.loads(d["decided_by"] or "[]")),
            decision_reason=d["decision_reason"] or "",
            used_at=None if d["used_at"] is None else float(d["used_at"]),
            elevated_until=None if d["elevated_until"] is None else float(d["elevated_until"]),
        )

    def _votes(self, cur: Any, ids: Sequence[str]) -> dict[str, list[Vote]]:
        out: dict[str, list[Vote]] = {i: [] for i in ids}
        if not ids:
            return out
        marks = ", ".join("?" for _ in ids)
        cur.execute(
            self._sql(
                "SELECT approval_id, voter_sub, voter_iss, verdict, reason, at, claims FROM {votes} "
                "WHERE approval_id IN ({marks}) ORDER BY at",
                marks=marks,
            ),
            tuple(ids),
        )
        for aid, sub, iss, verdict, reason, at, claims in cur.fetchall():
            out[aid].append(Vote(sub, iss, verdict, reason, float(at), json.loads(claims)))
        return out

    def _sql(self, sql: str, **parts: str) -> str:
        """``sql`` with the table names filled in (and ``%s`` placeholders for PostgreSQL).

        Only identifiers validated at construction and ``?`` lists built here are formatted in;
        values always travel as parameters.
        """
        text = sql.format(
            approvals=self.t_approvals, votes=self.t_votes, elevations=self.t_elevations, cols=_SELECT, **parts
        )
        return text.replace("?", "%s") if self._pyformat else text

    def _get(self, cur: Any, approval_id: str, lock: bool = False) -> Approval | None:
        cur.execute(
            self._sql("SELECT {cols} FROM {approvals} WHERE id = ?{lock}", lock=self._for_update if lock else ""),
            (approval_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return self._row(row, self._votes(cur, [approval_id])[approval_id])

    # -- operations -----------------------------------------------------------------------------

    def create(self, approval: Approval, max_pending: int | None = None) -> bool:
        """Store a new request; False (nothing stored) when its requester already has ``max_pending``
        requests pending and not yet past their deadline."""
        a = approval
        values = (
            a.id,
            a.status,
            a.created_at,
            a.expires_at,
            a.requester_sub,
            a.requester_iss,
            a.session_id,
            a.peer,
            a.protocol,
            a.target,
            a.action,
            a.summary,
            a.payload,
            int(a.payload_truncated),
            _dumps(dict(a.attrs)),
            a.reason,
            a.digest,
            _dumps(list(a.rule_ids)),
            a.rule_message,
            a.policy_version,
            _dumps(a.spec.to_json()),
            a.replica,
            a.decided_at,
            _dumps(list(a.decided_by)),
            a.decision_reason,
            a.used_at,
            a.elevated_until,
        )
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._tx() as cur:
            if max_pending is not None:
                cur.execute(
                    self._sql(
                        "SELECT count(*) FROM {approvals} WHERE status = ? AND requester_sub = ? "
                        "AND requester_iss = ? AND expires_at > ?"
                    ),
                    (PENDING, a.requester_sub, a.requester_iss, a.created_at),
                )
                if int(cur.fetchone()[0]) >= max_pending:
                    return False
            cur.execute(self._sql("INSERT INTO {approvals} ({cols}) VALUES ({marks})", marks=marks), values)
            self._announce(cur, a.id)
            return True

    def get(self, approval_id: str) -> Approval | None:
        with self._tx() as cur:
            return self._get(cur, approval_id)

    def recent(
        self,
        *,
        pending: bool | None = None,
        limit: int = 100,
        approvers: Sequence[str] | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[Approval]:
        """The newest requests (``pending`` True: waiting ones; False: the others; None: all), newest first.

        ``approvers``: only requests whose approval block may name one of these roles (a coarse match on the
        stored block: the caller checks the roles exactly). ``before``: only requests older than this
        ``(created_at, id)``, to read on after the last one of a previous call.
        """
        conditions: list[str] = []
        params: list[Any] = []
        if pending is True:
            conditions.append(f"status = '{PENDING}'")
        elif pending is False:
            conditions.append(f"status <> '{PENDING}'")
        if approvers is not None:
            if not approvers:
                return []
            conditions.append("(" + " OR ".join("spec LIKE ? ESCAPE '\\'" for _ in approvers) + ")")
            params.extend(f"%{_like(json.dumps(str(role), ensure_ascii=False))}%" for role in approvers)
        if before is not None:
            conditions.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((before[0], before[0], before[1]))
        where = "WHERE " + " AND ".join(conditions) if conditions else ""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT {cols} FROM {approvals} {where} ORDER BY created_at DESC, id DESC LIMIT ?", where=where
                ),
                (*params, int(limit)),
            )
            rows = cur.fetchall()
            votes = self._votes(cur, [r[0] for r in rows])
            return [self._row(r, votes[r[0]]) for r in rows]

    def vote(
        self,
        approval_id: str,
        voter: Identity,
        verdict: str,
        reason: str,
        now: float,
        satisfied: Satisfied | None = None,
    ) -> VoteResult:
        """Record ``voter``'s verdict and decide the request when it has enough approvals (or one denial).

        The caller has checked that ``voter`` may approve (roles under the live policy, not the
        requester); this transaction enforces the rest: pending, not expired, one vote per approver.
        ``satisfied(request, votes)``, when given, must also hold of the votes with this one for the request to
        be approved (each group of an approval block with ``all_of``).
        """
        if verdict not in ("approve", "deny"):
            raise ApprovalError(f"unknown verdict {verdict!r}", 400)
        with self._tx() as cur:
            current = self._get(cur, approval_id, lock=True)
            if current is None:
                raise ApprovalError(f"no approval request {approval_id}", 404)
            if current.status != PENDING:
                raise ApprovalError(f"approval {approval_id} is already {current.status}")
            if now >= current.expires_at:
                raise ApprovalError(f"approval {approval_id} has expired")
            if any(v.subject == voter.subject and v.issuer == voter.issuer for v in current.votes):
                raise ApprovalError(f"you already voted on approval {approval_id}; each approver counts once")
            cur.execute(
                self._sql(
                    "INSERT INTO {votes} (approval_id, voter_sub, voter_iss, verdict, reason, at, claims) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)"
                ),
                (approval_id, voter.subject, voter.issuer, verdict, reason, now, _dumps(dict(voter.claims))),
            )
            approvals = current.approvals_given + (verdict == "approve")
            status = PENDING
            by: list[str] = []
            elevated_until: float | None = None
            if verdict == "deny":
                status, by = DENIED, [voter.subject]
            elif approvals >= current.spec.required and (
                satisfied is None
                or satisfied(
                    current, [*current.votes, Vote(voter.subject, voter.issuer, verdict, reason, now, voter.claims)]
                )
            ):
                status = APPROVED
                by = [v.subject for v in current.votes if v.verdict == "approve"] + [voter.subject]
                if current.spec.scope == "elevation":
                    elevated_until = now + current.spec.elevate_duration
                    cur.execute(
                        self._sql(
                            "INSERT INTO {elevations} (approval_id, subject, issuer, target, roles, until) "
                            "VALUES (?, ?, ?, ?, ?, ?)"
                        ),
                        (
                            approval_id,
                            current.requester_sub,
                            current.requester_iss,
                            current.target,
                            _dumps(list(current.spec.elevate_roles)),
                            elevated_until,
                        ),
                    )
            if status != PENDING:
                cur.execute(
                    self._sql(
                        "UPDATE {approvals} SET status = ?, decided_at = ?, decided_by = ?, "
                        "decision_reason = ?, elevated_until = ? WHERE id = ? AND status = ?"
                    ),
                    (status, now, _dumps(by), reason, elevated_until, approval_id, PENDING),
                )
                if cur.rowcount != 1:  # pragma: no cover - the row is locked by this transaction
                    raise ApprovalError(f"approval {approval_id} changed while voting; retry")
            self._announce(cur, approval_id)
            after = self._get(cur, approval_id)
            assert after is not None
            return VoteResult(after, status != PENDING)

    def _transition(
        self,
        cur: Any,
        approval_id: str,
        to: str,
        reason: str,
        now: float,
        sources: Sequence[str],
        *,
        append_reason: bool = False,
    ) -> bool:
        """Move a request from one of ``sources`` to ``to``. Its reason is ``reason`` if it has none yet; with
        ``append_reason``, one it has is kept and ``(to: reason)`` added after it."""
        marks = ", ".join("?" for _ in sources)
        kept = "decision_reason || ' (' || ? || ': ' || ? || ')'" if append_reason else "decision_reason"
        cur.execute(
            self._sql(
                "UPDATE {approvals} SET status = ?, decided_at = COALESCE(decided_at, ?), "
                "decision_reason = CASE WHEN decision_reason = '' THEN ? ELSE {kept} END "
                "WHERE id = ? AND status IN ({marks})",
                marks=marks,
                kept=kept,
            ),
            (to, now, reason, *((to, reason) if append_reason else ()), approval_id, *sources),
        )
        changed = bool(cur.rowcount == 1)
        if changed:
            self._announce(cur, approval_id)
        return changed

    def expire(self, approval_id: str, now: float) -> bool:
        """Mark a pending request expired; False if it was decided first."""
        with self._tx() as cur:
            return self._transition(cur, approval_id, EXPIRED, "", now, (PENDING,))

    def expire_due(self, now: float) -> list[str]:
        """Expire every pending request past its deadline; returns the ids this call expired."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE {approvals} SET status = ?, decided_at = ? "
                    "WHERE status = ? AND expires_at <= ? RETURNING id"
                ),
                (EXPIRED, now, PENDING, now),
            )
            ids = [str(r[0]) for r in cur.fetchall()]
            for aid in ids:
                self._announce(cur, aid)
            return ids

    def consume(self, approval_id: str, digest: str, requester: Identity, now: float, not_before: float) -> bool:
        """Use an approved request once: only for the same request (digest) and the same requester."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE {approvals} SET status = ?, used_at = ? WHERE id = ? AND status = ? "
                    "AND digest = ? AND requester_sub = ? AND requester_iss = ? AND decided_at >= ?"
                ),
                (USED, now, approval_id, APPROVED, digest, requester.subject, requester.issuer, not_before),
            )
            changed = bool(cur.rowcount == 1)
            if changed:
                self._announce(cur, approval_id)
            return changed

    def withdraw(self, approval_id: str, reason: str, now: float) -> Withdrawn | None:
        """Close a request nobody waits for any more (agent gone, policy changed, gateway stopping); None if
        it was not pending or approved.

        An approved request may be withdrawn (the live policy no longer lets it run): the time-boxed
        elevation it granted ends too, and the reason says why it was withdrawn after the approver's.
        """
        with self._tx() as cur:
            if not self._transition(cur, approval_id, WITHDRAWN, reason, now, (PENDING, APPROVED), append_reason=True):
                return None
            cur.execute(self._sql("DELETE FROM {elevations} WHERE approval_id = ?"), (approval_id,))
            return Withdrawn(max(0, int(cur.rowcount)))

    def elevations(self, now: float) -> list[Elevation]:
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT subject, issuer, target, roles, until, approval_id FROM {elevations} WHERE until > ?"
                ),
                (now,),
            )
            return [
                Elevation(sub, iss, target, tuple(json.loads(roles)), float(until), aid)
                for sub, iss, target, roles, until, aid in cur.fetchall()
            ]

    def prune(self, before: float, limit: int) -> list[str]:
        """Remove at most ``limit`` requests that ended before ``before``, with their votes and elevations, in
        one short transaction; returns the ids removed (oldest first).

        A request ends when nothing can change it or come of it any more: denied or expired when decided;
        used when used; approved or withdrawn when its window of use (the rule's timeout after the
        approval, ``expires_at - created_at``) has passed, since an approval withdrawn when its request
        resumed was withdrawn within that window. An elevation it granted must have ended before
        ``before`` too. Pending requests, and statuses not named here, are never removed. On PostgreSQL
        the rows are locked ``SKIP LOCKED``: replicas pruning at once remove different requests, and a
        vote or withdrawal in progress is neither waited for nor lost.
        """
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT a.id FROM {approvals} AS a WHERE a.status IN (?, ?, ?, ?, ?) AND a.decided_at < ? "
                    "AND (CASE WHEN a.status IN (?, ?) THEN a.decided_at WHEN a.status = ? THEN a.used_at "
                    "ELSE a.decided_at + (a.expires_at - a.created_at) END) < ? "
                    "AND (a.elevated_until IS NULL OR a.elevated_until < ?) "
                    "AND NOT EXISTS (SELECT 1 FROM {elevations} AS e WHERE e.approval_id = a.id AND e.until >= ?) "
                    "ORDER BY a.decided_at LIMIT ?{skip_locked}",
                    skip_locked=self._skip_locked,
                ),
                (
                    *(APPROVED, USED, DENIED, EXPIRED, WITHDRAWN),
                    before,
                    *(DENIED, EXPIRED),
                    USED,
                    before,
                    before,
                    before,
                    int(limit),
                ),
            )
            ids = [str(r[0]) for r in cur.fetchall()]
            if not ids:
                return []
            marks = ", ".join("?" for _ in ids)
            cur.execute(self._sql("DELETE FROM {votes} WHERE approval_id IN ({marks})", marks=marks), tuple(ids))
            cur.execute(self._sql("DELETE FROM {elevations} WHERE approval_id IN ({marks})", marks=marks), tuple(ids))
            cur.execute(self._sql("DELETE FROM {approvals} WHERE id IN ({marks})", marks=marks), tuple(ids))
            return ids


class SqliteStore(_SqlStore):
    """The default store: a SQLite file in the state directory (one gateway process)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_database(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._tx() as cur:
            for stmt in self._ddl("REAL"):
                cur.execute(stmt)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


class PostgresStore(_SqlStore):
    """Shared store for several gateway replicas; changes are announced with ``NOTIFY``.

    ``schema`` (default ``lictor``) holds the tables; the notification channel is
    ``<schema>_approvals``. The connection is opened lazily and re-opened after a failure, so a
    database that is down makes approvals fail (and the request is denied), not the gateway.
    """

    notifies = True
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    _pyformat = True

    def __init__(self, dsn: str, schema: str = "lictor") -> None:
        super().__init__()
        if not _IDENT.match(schema):
            raise ValueError(f"approvals.schema {schema!r}: use lower-case letters, digits and _")
        self.dsn = dsn
        self.schema = schema
        self.channel = f"{schema}_approvals"
        self.t_approvals = f"{schema}.approvals"
        self.t_votes = f"{schema}.approval_votes"
        self.t_elevations = f"{schema}.approval_elevations"
        self._conn: Any = None

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.channel,))
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            for stmt in self._ddl("DOUBLE PRECISION"):
                cur.execute(stmt)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = self._connect()
            conn = self._conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except Exception:
                if conn.broken:
                    self._conn = None
                raise

    def _announce(self, cur: Any, payload: str) -> None:
        cur.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    def ensure(self) -> None:
        """Connect and create the tables now (used at start-up to report a bad DSN early)."""
        with self._tx():
            pass

    def drop(self) -> None:
        """Drop the schema and everything in it (tests and decommissioning)."""
        with self._tx() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    async def listen(self, on_change: Callable[[str], None], stop: Callable[[], bool]) -> None:
        """Call ``on_change(approval_id)`` for every change any replica makes, until ``stop()``.

        Reconnects with backoff; the broker also polls, so a missed notification only delays.
        """
        import asyncio
        import logging

        import psycopg

        log = logging.getLogger("lictor.approvals")
        delay = 0.5
        while not stop():
            try:
                aconn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
                async with aconn:
                    await aconn.execute(f"LISTEN {self.channel}")
                    delay = 0.5
                    on_change("")  # (re)connected: anything may have changed meanwhile
                    async for note in aconn.notifies():
                        on_change(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("approvals: LISTEN on %s failed (%s); retrying in %.1fs", self.channel, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_store(
    section: Mapping[str, Any], state_dir: Path, resolve: Callable[[str], Path], *, open_sqlite: bool = True
) -> _SqlStore | None:
    """The store named by the ``approvals:`` config section (a PostgreSQL store connects when first used).
    ``open_sqlite=False`` checks the section only: no SQLite file is opened (or created), None returned."""
    kind = section.get("store", "sqlite")
    if kind == "sqlite":
        path = section.get("sqlite")
        return SqliteStore(resolve(str(path)) if path else state_dir / "approvals.db") if open_sqlite else None
    if kind == "postgres":
        dsn = section.get("dsn")
        if not dsn:
            raise ValueError("approvals: store postgres needs a dsn")
        return PostgresStore(str(dsn), str(section.get("schema", "lictor")))
    raise ValueError(f"approvals.store {kind!r} is not sqlite or postgres")
