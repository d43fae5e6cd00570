"""Sinks: where spooled records end up. Each one is fed in spool order by its own drainer thread.

A sink's :meth:`Sink.write` must be idempotent: after a crash between a write and the commit
of the sink's offset, the same records (possibly in differently cut batches) are written again
and must not appear twice. Each sink gets that from stable event identities:

* local directory: session files are appended by event number ``n`` (a replayed event already
  in the file is skipped), the audit SQLite chain stores the spool position in the same
  transaction as the events, and the session index guards its counters with the last sequence
  number applied;
* PostgreSQL: the primary key ``(gateway_id, seq)`` with ``ON CONFLICT DO NOTHING``;
* S3: one object per batch, named by the batch's sequence range; before its first write a
  restarted sink adopts an object left by a batch whose offset commit was lost.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._files import private_database
from ..audit import AuditLog
from ._spool import AUDIT, CARRY, MANIFEST, SESSION, TYPE_NAMES, Offset, Record, Spool, SpoolReader, SpoolView
from ._util import decode_json, fsync_dir, write_atomic

__all__ = ["Drainer", "LocalSink", "PostgresSink", "Retention", "S3Sink", "Sink", "session_file_name"]

log = logging.getLogger("lictor.recorder")

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def session_file_name(session_id: str) -> str:
    """A file-name-safe stem for ``session_id`` (ids from the gateway are hex already)."""
    if _SAFE_ID.match(session_id):
        return session_id
    import hashlib

    return "x" + hashlib.sha256(session_id.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Retention:
    """Keep ended sessions at most ``max_age`` seconds and the store under ``max_bytes`` (0: no limit)."""

    max_age: float = 0.0
    max_bytes: int = 0

    @property
    def active(self) -> bool:
        return self.max_age > 0 or self.max_bytes > 0


class Sink(Protocol):
    name: str
    retention: Retention

    def prepare(self, committed: int) -> int:
        """Called before the first write (and after a failure); may advance ``committed``."""
        ...

    def write(self, records: Sequence[Record]) -> None:
        """Store ``records`` (in order, idempotently) or raise."""
        ...

    def apply_retention(self, now: float) -> int:
        """Delete what retention no longer keeps; return the number of sessions removed."""
        ...

    def close(self) -> None: ...


def _json(body: bytes) -> dict[str, Any]:
    value = decode_json(body)
    if not isinstance(value, dict):
        raise ValueError("record body is not a JSON object")
    return value


# -- local directory ------------------------------------------------------------------------------

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    gateway TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    started_at REAL,
    ended_at REAL,
    sub TEXT NOT NULL DEFAULT '',
    protocol TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    events INTEGER NOT NULL DEFAULT 0,
    allow INTEGER NOT NULL DEFAULT 0,
    deny INTEGER NOT NULL DEFAULT 0,
    approve INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    signed INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);
"""
INDEX_COLUMNS = (
    "id",
    "gateway",
    "path",
    "started_at",
    "ended_at",
    "sub",
    "protocol",
    "target",
    "peer",
    "events",
    "allow",
    "deny",
    "approve",
    "bytes",
    "interrupted",
    "signed",
    "last_seq",
)


def open_index(path: Path) -> sqlite3.Connection:
    private_database(path)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_INDEX_SCHEMA)
    return db


@dataclass
class _OpenFile:
    fd: int
    next_n: int
    path: Path


class LocalSink:
    """Per-session JSON-lines files plus an index, and the audit SQLite chain (:class:`AuditLog`).

    Layout under ``directory``: ``index.db`` (SQLite, one row per session), and
    ``sessions/YYYY-MM-DD/ID.jsonl`` (one event per line, exactly the spooled bytes) with
    ``ID.manifest.json`` (the signed manifest) next to it once the session has ended.
    """

    MAX_OPEN = 128

    def __init__(
        self, name: str, directory: Path, audit: AuditLog | None, gateway_id: str, retention: Retention
    ) -> None:
        self.name = name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.audit = audit
        self.gateway_id = gateway_id
        self.source = f"spool:{gateway_id}"
        self.retention = retention
        self.removed: list[str] = []  # sessions retention removed, until the drainer reports them
        self.index = open_index(self.directory / "index.db")
        self._index_file = _file_id(self.directory / "index.db")
        self._files: collections.OrderedDict[str, _OpenFile] = collections.OrderedDict()

    def prepare(self, committed: int) -> int:
        return committed

    # -- writing ---------------------------------------------------------------------------------

    def _rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            cur = self.index.execute(f"SELECT {','.join(INDEX_COLUMNS)} FROM sessions WHERE id IN ({marks})", part)  # noqa: S608
            for values in cur.fetchall():
                rows[values[0]] = dict(zip(INDEX_COLUMNS, values, strict=True))
        return rows

    def _new_row(self, sid: str, t: float) -> dict[str, Any]:
        day = datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")
        row = dict.fromkeys(INDEX_COLUMNS)
        row.update(
            id=sid,
            gateway=self.gateway_id,
            path=f"sessions/{day}/{session_file_name(sid)}.jsonl",
            started_at=t,
            sub="",
            protocol="",
            target="",
            peer="",
            events=0,
            allow=0,
            deny=0,
            approve=0,
            bytes=0,
            interrupted=0,
            signed=0,
            last_seq=0,
        )
        return row

    def write(self, records: Sequence[Record]) -> None:
        if _file_id(self.directory / "index.db") != self._index_file:
            # The recordings directory (or its index) was deleted or replaced: SQLite and the open session
            # files would go on writing to files nobody can open any more, and the batch would be lost.
            raise OSError(
                f"the recordings index {self.directory / 'index.db'} was deleted or replaced while in use; "
                "nothing more is written to it until the gateway is restarted"
            )
        parsed: list[tuple[Record, dict[str, Any]]] = []
        audit_rows: list[tuple[int, Mapping[str, Any], bytes]] = []
        ids: list[str] = []
        for record in records:
            if record.type == CARRY:
                continue
            doc = _json(record.body)
            if record.type == AUDIT:
                audit_rows.append((record.seq, doc, record.body))
                sid = doc.get("session") if doc.get("kind") == "decision" else None
            elif record.type == SESSION:
                sid = doc.get("s")
            else:
                sid = (doc.get("manifest") or {}).get("session")
            if isinstance(sid, str):
                parsed.append((record, doc))
                ids.append(sid)
        rows = self._rows(sorted(set(ids)))
        lines: dict[str, list[tuple[int, bytes]]] = {}
        manifests: list[tuple[dict[str, Any], bytes]] = []
        for record, doc in parsed:
            if record.type == AUDIT:
                sid = str(doc["session"])
                row = rows.get(sid)
                if row is None:
                    continue  # a decision outside any recorded session (e.g. its session never opened)
                if record.seq > row["last_seq"]:
                    action = doc.get("action")
                    if action in ("allow", "deny", "approve"):
                        row[str(action)] += 1
                    row["last_seq"] = record.seq
                continue
            if record.type == SESSION:
                sid = str(doc["s"])
                row = rows.get(sid)
                if row is None:
                    row = rows[sid] = self._new_row(sid, float(doc.get("t") or time.time()))
                lines.setdefault(sid, []).append((int(doc["n"]), record.body))
                if record.seq > row["last_seq"]:
                    if doc.get("kind") == "session.start" and isinstance(doc.get("data"), dict):
                        data = doc["data"]
                        ident = data.get("identity") if isinstance(data.get("identity"), dict) else {}
                        row.update(
                            sub=str(ident.get("sub", "")),
                            protocol=str(data.get("protocol", "")),
                            target=str(data.get("target", "")),
                            peer=str(data.get("peer", "")),
                            started_at=float(doc.get("t") or 0),
                        )
                    row["events"] = max(int(row["events"]), int(doc["n"]) + 1)
                    row["bytes"] += len(record.body) + 1
                    row["last_seq"] = record.seq
                continue
            manifest = doc["manifest"]
            sid = str(manifest["session"])
            row = rows.get(sid)
            if row is None:
                row = rows[sid] = self._new_row(sid, float(manifest.get("started_at") or time.time()))
            manifests.append((row, record.body))
            if record.seq > row["last_seq"]:
                counts = manifest.get("decisions") or {}
                row.update(
                    ended_at=float(manifest.get("ended_at") or time.time()),
                    events=int(manifest.get("events", row["events"])),
                    interrupted=1 if manifest.get("interrupted") else 0,
                    signed=1,
                    last_seq=record.seq,
                    **{k: int(counts.get(k, row[k])) for k in ("allow", "deny", "approve")},
                )
        touched: list[_OpenFile] = []
        dirs: set[Path] = set()
        try:
            for sid, items in lines.items():
                handle = self._open(sid, rows[sid]["path"], dirs)
                chunk: list[bytes] = []
                for n, body in items:
                    if n < handle.next_n:
                        continue  # already in the file (replayed after a crash)
                    if n > handle.next_n:
                        log.error("session %s: event %d follows event %d in the spool (gap)", sid, n, handle.next_n - 1)
                    chunk.append(body + b"\n")
                    handle.next_n = n + 1
                if chunk:
                    _write_all(handle.fd, b"".join(chunk))
                    touched.append(handle)
            for handle in touched:
                os.fdatasync(handle.fd)
        except OSError:
            self._drop_files()  # reopen and re-scan the files on retry (cuts partial lines)
            raise
        for row, body in manifests:
            path = self.directory / row["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json"), body + b"\n", 0o640)
        for d in dirs:
            fsync_dir(d)
        if audit_rows and self.audit is not None:
            self.audit.append_batch(audit_rows, source=self.source)
        if rows:
            with self.index:
                self.index.execute("BEGIN IMMEDIATE")
                self.index.executemany(
                    f"INSERT OR REPLACE INTO sessions ({','.join(INDEX_COLUMNS)}) "  # noqa: S608
                    f"VALUES ({','.join('?' * len(INDEX_COLUMNS))})",
                    [tuple(row[c] for c in INDEX_COLUMNS) for row in rows.values()],
                )

    def _open(self, sid: str, rel: str, dirs: set[Path]) -> _OpenFile:
        handle = self._files.get(sid)
        if handle is not None and os.fstat(handle.fd).st_nlink == 0:
            # the session's file was deleted: write a new one (a gap that verify reports), not into the void
            log.error("session %s: its recording file %s was deleted; starting a new one", sid, handle.path)
            self.forget(sid)
            handle = None
        if handle is not None:
            self._files.move_to_end(sid)
            return handle
        path = self.directory / rel
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(path.parent)
            dirs.add(path.parent.parent)
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if not existed:
            dirs.add(path.parent)
        next_n = _scan_tail(fd)
        handle = _OpenFile(fd, next_n, path)
        self._files[sid] = handle
        while len(self._files) > self.MAX_OPEN:
            _, old = self._files.popitem(last=False)
            os.close(old.fd)
        return handle

    def _drop_files(self) -> None:
        for handle in self._files.values():
            try:
                os.close(handle.fd)
            except OSError:
                pass
        self._files.clear()

    def forget(self, session_id: str) -> None:
        handle = self._files.pop(session_id, None)
        if handle is not None:
            os.close(handle.fd)

    # -- retention -------------------------------------------------------------------------------

    def apply_retention(self, now: float) -> int:
        if not self.retention.active:
            return 0
        doomed: list[tuple[str, str]] = []
        if self.retention.max_age > 0:
            cutoff = now - self.retention.max_age
            doomed += self.index.execute(
                "SELECT id, path FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?", (cutoff,)
            ).fetchall()
        if self.retention.max_bytes > 0:
            total = int(self.index.execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()[0])
            gone = {d[0] for d in doomed}
            if total > self.retention.max_bytes:
                for sid, rel, size in self.index.execute(
                    "SELECT id, path, bytes FROM sessions WHERE ended_at IS NOT NULL ORDER BY ended_at"
                ).fetchall():
                    if total <= self.retention.max_bytes:
                        break
                    total -= int(size)
                    if sid not in gone:
                        doomed.append((sid, rel))
        for sid, rel in doomed:
            self.forget(sid)
            path = self.directory / rel
            path.unlink(missing_ok=True)
            path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json").unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
        if doomed:
            with self.index:
                self.index.execute("BEGIN IMMEDIATE")
                self.index.executemany("DELETE FROM sessions WHERE id = ?", [(d[0],) for d in doomed])
            self.removed += [d[0] for d in doomed]
        return len(doomed)

    def close(self) -> None:
        self._drop_files()
        self.index.close()


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write")
        view = view[written:]


def _scan_tail(fd: int) -> int:
    """The event number after the last complete line of a session file; cuts a partial last line."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    block = 1 << 16
    end = size
    tail = b""
    while end > 0:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        if tail.count(b"\n") >= 2 or end == 0:
            break
    if not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n") + 1
        keep = size - (len(tail) - cut)
        os.ftruncate(fd, keep)
        tail = tail[:cut]
        log.warning("session file cut after %d bytes: its last line was incomplete", keep)
    lines = tail.rstrip(b"\n").split(b"\n")
    if not lines or not lines[-1]:
        return 0
    return int(json.loads(lines[-1])["n"]) + 1


# -- PostgreSQL ------------------------------------------------------------------------------------


class PostgresSink:
    """Tables ``<prefix>events`` (every record, keyed by gateway id and spool sequence) and
    ``<prefix>sessions`` (one row per session, with the signed manifest once it ended).

    Created on the first connection. ``body`` holds the exact spooled bytes as text, so chains
    verify from the database as they do from files.
    """

    def __init__(
        self,
        name: str,
        dsn: str,
        gateway_id: str,
        retention: Retention,
        *,
        prefix: str = "lictor_",
        connect_timeout: float = 3.0,
    ) -> None:
        if not re.match(r"^[a-z_][a-z0-9_]{0,40}$", prefix):
            raise ValueError(f"recordings sink {name!r}: table_prefix must be lower-case letters, digits, _")
        self.name = name
        self.dsn = dsn
        self.gateway_id = gateway_id
        self.retention = retention
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self._conn: Any = None

    def _q(self, template: str) -> Any:
        """``template`` with ``{events}``/``{sessions}``/``{index}`` bound to quoted table names."""
        from psycopg import sql

        return sql.SQL(template).format(
            events=sql.Identifier(self.prefix + "events"),
            sessions=sql.Identifier(self.prefix + "sessions"),
            index=sql.Identifier(self.prefix + "events_session"),
        )

    def _connect(self) -> Any:
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout)), autocommit=False)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('lictor-recorder-schema'))")
            conn.execute(
                self._q(
                    """CREATE TABLE IF NOT EXISTS {events} (
                    gateway_id text NOT NULL, seq bigint NOT NULL, type text NOT NULL,
                    session_id text, n bigint, ts double precision, kind text, body text NOT NULL,
                    PRIMARY KEY (gateway_id, seq))"""
                )
            )
            conn.execute(self._q("CREATE INDEX IF NOT EXISTS {index} ON {events} (session_id, n)"))
            conn.execute(
                self._q(
                    """CREATE TABLE IF NOT EXISTS {sessions} (
                    session_id text PRIMARY KEY, gateway_id text, started_at double precision,
                    ended_at double precision, sub text, protocol text, target text, peer text,
                    events bigint, allow bigint, deny bigint, approve bigint, interrupted boolean,
                    manifest text)"""
                )
            )
        self._conn = conn
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: S110 - closing a broken connection
                pass
        self._conn = None

    def prepare(self, committed: int) -> int:
        try:
            self._connect()
        except Exception:
            self._drop()
            raise
        return committed

    def write(self, records: Sequence[Record]) -> None:
        rows: list[tuple[Any, ...]] = []
        starts: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        gid = self.gateway_id
        for record in records:
            if record.type == CARRY:
                continue
            doc = _json(record.body)
            text = record.body.decode()
            kind_name = TYPE_NAMES[record.type]
            if record.type == SESSION:
                rows.append((gid, record.seq, kind_name, doc["s"], doc["n"], doc.get("t"), doc.get("kind"), text))
                if doc.get("kind") == "session.start" and isinstance(doc.get("data"), dict):
                    data = doc["data"]
                    ident = data.get("identity") if isinstance(data.get("identity"), dict) else {}
                    starts.append(
                        (
                            doc["s"],
                            gid,
                            doc.get("t"),
                            str(ident.get("sub", "")),
                            str(data.get("protocol", "")),
                            str(data.get("target", "")),
                            str(data.get("peer", "")),
                        )
                    )
            elif record.type == AUDIT:
                sid = doc.get("session") if isinstance(doc.get("session"), str) else None
                rows.append((gid, record.seq, kind_name, sid, None, doc.get("ts"), doc.get("kind"), text))
            else:
                m = doc["manifest"]
                rows.append((gid, record.seq, kind_name, m["session"], None, m.get("ended_at"), "manifest", text))
                counts = m.get("decisions") or {}
                ident = m.get("identity") or {}
                ends.append(
                    (
                        m["session"],
                        gid,
                        m.get("started_at"),
                        m.get("ended_at"),
                        str(ident.get("sub", "")),
                        str(m.get("protocol", "")),
                        str(m.get("target", "")),
                        str(m.get("peer", "")),
                        m.get("events"),
                        int(counts.get("allow", 0)),
                        int(counts.get("deny", 0)),
                        int(counts.get("approve", 0)),
                        bool(m.get("interrupted")),
                        text,
                    )
                )
        if not rows:
            return
        try:
            conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "INSERT INTO {events} (gateway_id, seq, type, session_id, n, ts, kind, body) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                    ),
                    rows,
                )
                if starts:
                    cur.executemany(
                        self._q(
                            "INSERT INTO {sessions} (session_id, gateway_id, started_at, sub, protocol, target, peer) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                        ),
                        starts,
                    )
                if ends:
                    cur.executemany(
                        self._q(
                            "INSERT INTO {sessions} (session_id, gateway_id, started_at, ended_at, sub, protocol, "
                            "target, peer, events, allow, deny, approve, interrupted, manifest) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT (session_id) DO UPDATE SET ended_at = excluded.ended_at, "
                            "events = excluded.events, allow = excluded.allow, deny = excluded.deny, "
                            "approve = excluded.approve, interrupted = excluded.interrupted, "
                            "manifest = excluded.manifest"
                        ),
                        ends,
                    )
        except Exception:
            self._drop()
            raise

    def apply_retention(self, now: float) -> int:
        if not self.retention.active:
            return 0
        removed = 0
        try:
            conn = self._connect()
            with conn.transaction():
                if self.retention.max_age > 0:
                    cutoff = now - self.retention.max_age
                    cur = conn.execute(
                        self._q("DELETE FROM {sessions} WHERE ended_at < %s RETURNING session_id"), (cutoff,)
                    )
                    ids = [r[0] for r in cur.fetchall()]
                    removed += len(ids)
                    if ids:
                        conn.execute(self._q("DELETE FROM {events} WHERE session_id = ANY(%s)"), (ids,))
                    conn.execute(self._q("DELETE FROM {events} WHERE type = 'audit' AND ts < %s"), (cutoff,))
                if self.retention.max_bytes > 0:
                    total = int(
                        conn.execute(self._q("SELECT COALESCE(SUM(length(body)), 0) FROM {events}")).fetchone()[0]
                    )
                    while total > self.retention.max_bytes:
                        row = conn.execute(
                            self._q(
                                "SELECT session_id FROM {sessions} WHERE ended_at IS NOT NULL ORDER BY ended_at LIMIT 1"
                            )
                        ).fetchone()
                        if row is None:
                            break
                        freed = conn.execute(
                            self._q("DELETE FROM {events} WHERE session_id = %s RETURNING length(body)"), (row[0],)
                        ).fetchall()
                        conn.execute(self._q("DELETE FROM {sessions} WHERE session_id = %s"), (row[0],))
                        total -= sum(int(f[0]) for f in freed)
                        removed += 1
        except Exception:
            self._drop()
            raise
        return removed

    # -- reading -----------------------------------------------------------------------------------

    def records(self) -> list[tuple[str, int, str, str]]:
        """(gateway_id, seq, type, body) of every stored record, in spool order per gateway."""
        conn = self._connect()
        with conn.transaction():
            cur = conn.execute(self._q("SELECT gateway_id, seq, type, body FROM {events} ORDER BY gateway_id, seq"))
            return [tuple(r) for r in cur.fetchall()]

    def list_rows(self) -> list[dict[str, Any]]:
        conn = self._connect()
        columns = (
            "id, gateway, started_at, ended_at, sub, protocol, target, peer, events, allow, deny, approve, "
            "interrupted, signed"
        ).split(", ")
        with conn.transaction():
            cur = conn.execute(
                self._q(
                    "SELECT session_id, gateway_id, started_at, ended_at, sub, protocol, target, peer, events, "
                    "allow, deny, approve, interrupted, manifest IS NOT NULL FROM {sessions}"
                )
            )
            return [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]

    def load(self, session_id: str) -> tuple[bytes | None, list[bytes]]:
        conn = self._connect()
        with conn.transaction():
            lines = [
                r[0].encode()
                for r in conn.execute(
                    self._q("SELECT body FROM {events} WHERE session_id = %s AND type = 'session' ORDER BY n"),
                    (session_id,),
                )
            ]
            row = conn.execute(
                self._q("SELECT manifest FROM {sessions} WHERE session_id = %s"), (session_id,)
            ).fetchone()
        return (row[0].encode() if row and row[0] else None), lines

    def close(self) -> None:
        self._drop()


# -- S3 ----------------------------------------------------------------------------------------------


class S3Sink:
    """S3-compatible object storage: ``PREFIX/GATEWAY/events/FIRST-LAST.log`` per batch.

    Each line of an events object is ``SEQ TYPE BODY`` (the exact spooled bytes); manifests are
    also stored alone as ``PREFIX/GATEWAY/manifests/SESSION.json`` for listing.
    """

    def __init__(
        self,
        name: str,
        gateway_id: str,
        retention: Retention,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.gateway_id = gateway_id
        self.retention = retention
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.create_bucket = create_bucket
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url or None,
            "region_name": region or None,
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
        }
        self.timeout = timeout
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                config=Config(
                    connect_timeout=self.timeout,
                    read_timeout=self.timeout,
                    retries={"max_attempts": 1, "mode": "standard"},
                ),
                **self._client_args,
            )
        return self._client

    def _events_prefix(self, gateway_id: str | None = None) -> str:
        return f"{self.prefix}{gateway_id or self.gateway_id}/events/"

    def prepare(self, committed: int) -> int:
        client = self.client
        if self.create_bucket:
            from botocore.exceptions import ClientError

            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError:
                client.create_bucket(Bucket=self.bucket)
        # Adopt objects written by batches whose offset commit was lost (crash between the two).
        while True:
            start = f"{self._events_prefix()}{committed + 1:020d}"
            resp = client.list_objects_v2(Bucket=self.bucket, Prefix=self._events_prefix(), StartAfter=start, MaxKeys=5)
            adopted = False
            for item in resp.get("Contents", []):
                first, last = _range(item["Key"])
                if first == committed + 1:
                    log.info("sink %s: adopting %s written before a restart", self.name, item["Key"])
                    committed = last
                    adopted = True
                    break
            if not adopted:
                return committed

    def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        lines: list[bytes] = []
        manifests: list[tuple[str, bytes]] = []
        for record in records:
            if record.type == CARRY:
                continue
            lines.append(b"%d %s " % (record.seq, TYPE_NAMES[record.type].encode()) + record.body + b"\n")
            if record.type == MANIFEST:
                sid = str(_json(record.body)["manifest"]["session"])
                manifests.append((sid, record.body))
        # Manifests first: a batch object is adopted after a failure (see prepare), so once it exists the
        # manifests it holds must exist too, or a failure between the two writes would lose them for good.
        for sid, body in manifests:
            self.client.put_object(
                Bucket=self.bucket,
                Key=f"{self.prefix}{self.gateway_id}/manifests/{session_file_name(sid)}.json",
                Body=body + b"\n",
            )
        if lines:
            key = f"{self._events_prefix()}{records[0].seq:020d}-{records[-1].seq:020d}.log"
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"".join(lines))

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self.client.list_objects_v2(**kwargs)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def apply_retention(self, now: float) -> int:
        if not self.retention.active:
            return 0
        objects = sorted(self._objects(self.prefix), key=lambda o: o["LastModified"])
        doomed: list[str] = []
        if self.retention.max_age > 0:
            cutoff = now - self.retention.max_age
            doomed += [o["Key"] for o in objects if o["LastModified"].timestamp() < cutoff]
        if self.retention.max_bytes > 0:
            total = sum(int(o["Size"]) for o in objects if o["Key"] not in doomed)
            for o in objects:
                if total <= self.retention.max_bytes:
                    break
                if o["Key"] not in doomed:
                    doomed.append(o["Key"])
                    total -= int(o["Size"])
        for start in range(0, len(doomed), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in doomed[start : start + 1000]]}
            )
        return len(doomed)

    # -- reading -----------------------------------------------------------------------------------

    def gateways(self) -> list[str]:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
        return [p["Prefix"][len(self.prefix) :].rstrip("/") for p in resp.get("CommonPrefixes", [])]

    def records(self, gateway_id: str | None = None) -> Iterator[tuple[int, str, bytes]]:
        """(seq, type, body) of every stored record of one gateway, in spool order."""
        for item in sorted(self._objects(self._events_prefix(gateway_id)), key=lambda o: str(o["Key"])):
            data = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            for line in data.splitlines():
                seq, rtype, body = line.split(b" ", 2)
                yield int(seq), rtype.decode(), body

    def manifests(self) -> Iterator[bytes]:
        for gid in self.gateways():
            for item in self._objects(f"{self.prefix}{gid}/manifests/"):
                yield self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read().rstrip(b"\n")

    def load(self, session_id: str) -> tuple[bytes | None, list[bytes]]:
        manifest: bytes | None = None
        spool: Mapping[str, Any] = {}
        for body in self.manifests():
            doc = _json(body)
            if doc.get("manifest", {}).get("session") == session_id:
                manifest, spool = body, doc["manifest"].get("spool") or {}
                break
        gid = str(spool.get("gateway") or self.gateway_id)
        first, last = int(spool.get("first") or 0), int(spool.get("last") or 1 << 62)
        lines: list[bytes] = []
        for item in sorted(self._objects(self._events_prefix(gid)), key=lambda o: str(o["Key"])):
            lo, hi = _range(item["Key"])
            if hi < first or lo > last:
                continue
            data = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            for line in data.splitlines():
                _, rtype, body = line.split(b" ", 2)
                if rtype == b"session" and _json(body).get("s") == session_id:
                    lines.append(body)
        return manifest, lines

    def close(self) -> None:
        self._client = None


def _range(key: str) -> tuple[int, int]:
    stem = key.rsplit("/", 1)[-1].removesuffix(".log")
    first, _, last = stem.partition("-")
    return int(first), int(last)


# -- draining ----------------------------------------------------------------------------------------


@dataclass
class DrainerStatus:
    name: str
    committed: int
    healthy: bool
    last_error: str
    failures: int


@dataclass
class Drainer:
    """Feeds one sink from the spool in order and commits its offset after each batch."""

    sink: Sink
    spool: Spool | SpoolView
    offset: Offset
    on_commit: Callable[[], None] = lambda: None
    # Told which sessions retention removed from a local store (the audit log records it, so that
    # ``sessions verify --all`` tells them from deleted ones).
    on_retention: Callable[[str, list[str]], None] | None = None
    batch_records: int = 2048
    idle: float = 0.02
    # After a partial batch, wait this long before the next one (flush() wakes it early). The spool
    # already holds every event durably, so a sink may lag a little; fewer, larger batches keep the
    # drainer's Python work (and fdatasyncs) from competing with the event loop for the GIL.
    linger: float = 0.05
    _last_batch: int = 0
    _idle_waiting: bool = False
    retention_interval: float = 3600.0
    committed: int = 0
    healthy: bool = True
    last_error: str = ""
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _reader: SpoolReader | None = None
    _batch: list[Record] = field(default_factory=list)
    _prepared: bool = False
    _next_retention: float = 0.0

    def __post_init__(self) -> None:
        first = self.spool.first_seq() - 1
        self.committed = self.offset.position if self.offset.exists else first
        if self.committed > self.spool.written_seq:
            log.error(
                "sink %s: committed offset %d is beyond the spool (%d); resending what the spool holds",
                self.sink.name,
                self.committed,
                self.spool.written_seq,
            )
            self.committed = first

    @property
    def name(self) -> str:
        return self.sink.name

    def status(self) -> DrainerStatus:
        return DrainerStatus(self.name, self.committed, self.healthy, self.last_error, self.failures)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"lictor-sink-{self.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def nudge(self) -> None:
        """The spool grew: wake the drainer if it is waiting for work (never cut a linger short)."""
        if self._idle_waiting:
            self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                progressed = self.drain_once()
            except Exception as exc:
                self._failed(exc)
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            if not progressed:
                self._idle_waiting = True
                self._retention()
                self._wake.wait(self.idle)
                self._wake.clear()
                self._idle_waiting = False
            elif self._last_batch < self.batch_records and self.linger > 0:
                self._wake.wait(self.linger)
                self._wake.clear()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        message = f"{type(exc).__name__}: {exc}"
        if self.healthy or message != self.last_error:
            log.warning(
                "recording sink %s unavailable (%s); events stay in the spool and are sent when it is back",
                self.name,
                message,
            )
        self.healthy = False
        self.last_error = message
        self._prepared = False

    def drain_once(self) -> bool:
        """Send one batch; True if something was committed. Raises when the sink fails."""
        with self._lock:
            if not self._prepared:
                committed = self.sink.prepare(self.committed)
                if committed != self.committed:
                    self._commit(committed)
                    self._batch = [r for r in self._batch if r.seq > committed]
                    if self._reader is not None and self._reader.position < committed:
                        self._reader.close()
                        self._reader = None
                self._prepared = True
            if not self._batch:
                if self._reader is None:
                    self._reader = SpoolReader(self.spool, self.committed)
                self._batch = self._reader.read(self.batch_records)
            if not self._batch:
                return False
            self._last_batch = len(self._batch)
            self.sink.write(self._batch)
            last = self._batch[-1].seq
            self._batch = []
            self._commit(last)
            if not self.healthy:
                log.warning("recording sink %s is back; caught up to %d", self.name, last)
            self.healthy, self.last_error = True, ""
        self.on_commit()
        return True

    def _commit(self, position: int) -> None:
        self.offset.commit(position)
        self.committed = position

    def drain(self, deadline: float) -> bool:
        """Drain synchronously until caught up or ``deadline`` (monotonic); True when caught up.

        A failing sink is retried with backoff until the deadline: one transient error (a timeout, a
        reset connection) must not leave events behind at shutdown when there is time to send them."""
        backoff = 0.05
        while time.monotonic() < deadline:
            target = self.spool.written_seq
            if self.committed >= target:
                return True
            try:
                if not self.drain_once():
                    return self.committed >= self.spool.written_seq
                backoff = 0.05
            except Exception as exc:
                self._failed(exc)
                time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, 1.0)
        return self.committed >= self.spool.written_seq

    def _retention(self) -> None:
        if not self.sink.retention.active:
            return
        now = time.time()
        if now < self._next_retention:
            return
        self._next_retention = now + self.retention_interval
        try:
            with self._lock:
                removed = self.sink.apply_retention(now)
            if removed:
                log.info("recording sink %s: retention removed %d sessions/objects", self.name, removed)
        except Exception as exc:
            log.warning("recording sink %s: retention failed: %s", self.name, exc)
        if isinstance(self.sink, LocalSink) and self.sink.removed:
            sessions, self.sink.removed = self.sink.removed, []
            if self.on_retention is not None:
                try:
                    self.on_retention(self.name, sessions)
                except Exception as exc:
                    log.error(
                        "recording sink %s: could not report %d sessions retention removed: %s",
                        self.name,
                        len(sessions),
                        exc,
                    )

    def close_reader(self) -> None:
        """Let go of the spool files (another reader takes over); the committed offset stays."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._batch = []

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self.sink.close()
            self.offset.close()
