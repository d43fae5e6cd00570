"""The audit log: every decision, hash-chained with a forward-ratcheting HMAC key.

Theory of operation
-------------------
The log starts from a secret ``K0`` (``audit-verify.key`` in the state directory; an operator may
move it offline: only ``lictor audit verify`` needs it). Event ``i`` (1-based) is stored with

    mac_i = HMAC-SHA256(K_{i-1}, mac_{i-1} || seq_i || canonical_json(event_i))
    K_i   = SHA-256("lictor-ratchet" || K_{i-1})

and only the newest key ``K_n`` is kept next to the log. Because the ratchet is one-way, someone
who takes the gateway's storage cannot re-MAC older events, so:

* an edited event fails its MAC;
* a deleted event leaves a gap in ``seq`` and breaks the chain of the next one;
* reordered events fail their MACs (seq and the previous MAC are inside each MAC);
* a truncated tail is caught because the stored head (``seq``, ``K_n``) must equal the state
  reached by ratcheting ``K0`` once per event present; rolling the head back would need an
  older key, which no longer exists anywhere but in the verifier's ``K0``.

Writes use SQLite in WAL mode. In a running gateway, events reach this log through the recording
spool (``lictor.recorder``), which makes them durable before the command they describe goes
ahead; its local sink hands them over in batches with :meth:`AuditLog.append_batch`, which
remembers the spool position in the same transaction so a replayed batch is not appended twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._files import private_database

__all__ = ["AuditError", "AuditLog", "VerifyResult", "chain_problem"]

_RATCHET = b"lictor-ratchet"


class AuditError(RuntimeError):
    """The audit store could not record an event (callers fail closed)."""


def _canonical(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _ratchet(key: bytes) -> bytes:
    return hashlib.sha256(_RATCHET + key).digest()


def _mac(key: bytes, prev: bytes, seq: int, body: bytes) -> bytes:
    return hmac.new(key, prev + seq.to_bytes(8, "big") + body, hashlib.sha256).digest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    first_bad: int | None = None
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"audit log OK: {self.events} events, chain intact"
        return f"audit log BROKEN at event {self.first_bad}: {self.problem}"


class AuditLog:
    """Append-only, hash-chained audit store on SQLite."""

    def __init__(self, path: str | Path, verify_key_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.verify_key_path = Path(verify_key_path or self.path.parent / "audit-verify.key")
        self._lock = threading.Lock()
        private_database(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY,
                ts REAL NOT NULL,
                kind TEXT NOT NULL,
                body TEXT NOT NULL,
                mac TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
            CREATE TABLE IF NOT EXISTS head (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                seq INTEGER NOT NULL,
                key TEXT NOT NULL,
                mac TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS sources (
                name TEXT PRIMARY KEY,
                position INTEGER NOT NULL
            );
            """
        )
        self._file = self._file_id()  # the file this connection writes, until the path names another
        self._batch_sync = False
        # Called before reads so they see events still on their way from the spool.
        self.before_read: Callable[[], None] | None = None
        row = self._db.execute("SELECT seq, key, mac FROM head WHERE id = 1").fetchone()
        if row is None:
            k0 = self._load_or_create_k0()
            self._db.execute("INSERT INTO head (id, seq, key, mac) VALUES (1, 0, ?, ?)", (k0.hex(), (b"\0" * 32).hex()))
            self._seq, self._key, self._prev = 0, k0, b"\0" * 32
        else:
            self._seq, self._key, self._prev = int(row[0]), bytes.fromhex(row[1]), bytes.fromhex(row[2])

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _load_or_create_k0(self) -> bytes:
        if self.verify_key_path.exists():
            return bytes.fromhex(self.verify_key_path.read_text().strip())
        k0 = secrets.token_bytes(32)
        fd = os.open(self.verify_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(k0.hex() + "\n")
        return k0

    def append(self, kind: str, event: Mapping[str, Any]) -> int:
        """Record one event durably; return its sequence number. Raises AuditError on failure."""
        record = {"kind": kind, "ts": time.time(), **event}
        with self._lock:
            chained = self._chain([(kind, record["ts"], _canonical(record))])
            self._commit(*chained)
            return self._seq

    def append_batch(
        self, records: Sequence[tuple[int, Mapping[str, Any]] | tuple[int, Mapping[str, Any], bytes]], *, source: str
    ) -> int:
        """Append ``(position, record)`` pairs (or ``(position, record, json_text)`` when the
        caller holds the record's JSON text already) from ``source`` in one transaction; return how many.

        Each record already holds its ``kind`` and ``ts``. Records at or below the position stored
        for ``source`` were appended before and are skipped; the new position is stored in the same
        transaction, so a batch replayed after a crash adds nothing twice. The commit is fsync'd
        (``synchronous=FULL``): the caller deletes its own copy once this returns.
        """
        with self._lock:
            if not self._batch_sync:
                self._db.execute("PRAGMA synchronous=FULL")
                self._batch_sync = True
            row = self._db.execute("SELECT position FROM sources WHERE name = ?", (source,)).fetchone()
            done = int(row[0]) if row else 0
            todo = [item for item in records if item[0] > done]
            if not todo:
                return 0
            # The JSON text the caller already has (the spool record) is chained as it is: the MAC covers
            # the stored text, whatever its key order, so there is no need to encode it again.
            chained = self._chain(
                (
                    str(item[1].get("kind", "")),
                    float(item[1].get("ts") or time.time()),
                    item[2] if len(item) > 2 else _canonical(item[1]),
                )
                for item in todo
            )
            self._commit(
                *chained,
                (
                    "INSERT INTO sources (name, position) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                    (source, todo[-1][0]),
                ),
            )
            return len(todo)

    def _chain(
        self, items: Iterable[tuple[str, float, bytes]]
    ) -> tuple[list[tuple[int, float, str, str, str]], int, bytes, bytes]:
        """The rows for ``(kind, ts, body)`` items after the head, and the head that follows them."""
        seq, key, prev = self._seq, self._key, self._prev
        rows = []
        for kind, ts, body in items:
            seq += 1
            mac = _mac(key, prev, seq, body)
            rows.append((seq, ts, kind, body.decode(), mac.hex()))
            prev, key = mac, _ratchet(key)
        return rows, seq, key, prev

    def _commit(
        self,
        rows: list[tuple[int, float, str, str, str]],
        seq: int,
        key: bytes,
        prev: bytes,
        *also: tuple[str, tuple[Any, ...]],
    ) -> None:
        """Insert ``rows`` and move the head in one transaction (with ``also``); then adopt the new head."""
        if self._file_id() != self._file:
            # Deleted or replaced while open: SQLite would go on writing to a file no reader can open any
            # more, and every event written there would be lost. Refuse: the events wait (in the spool).
            raise AuditError(
                f"audit store {self.path} was deleted or replaced while in use; nothing more is written to it "
                "until the gateway is restarted"
            )
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO events (seq, ts, kind, body, mac) VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute("UPDATE head SET seq = ?, key = ?, mac = ? WHERE id = 1", (seq, key.hex(), prev.hex()))
            for statement, args in also:
                self._db.execute(statement, args)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise AuditError(f"audit store {self.path}: {exc}") from exc
        self._seq, self._key, self._prev = seq, key, prev

    def position(self, source: str) -> int:
        """The last position appended from ``source`` by :meth:`append_batch` (0 if none)."""
        with self._lock:
            row = self._db.execute("SELECT position FROM sources WHERE name = ?", (source,)).fetchone()
        return int(row[0]) if row else 0

    def _catch_up(self) -> None:
        if self.before_read is not None:
            self.before_read()

    def events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        kind: str | None = None,
        limit: int | None = None,
        filters: Mapping[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Events in order, newest last, filtered on time, kind and top-level fields."""
        # The ``ts`` and ``kind`` columns are not covered by the MAC (only ``body`` is): filter on the
        # authenticated body, so that editing a column cannot hide an event from a filtered listing.
        sql = "SELECT seq, body FROM events ORDER BY seq"
        count = 0
        self._catch_up()
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        for seq, body in rows:
            event = json.loads(body)
            event["seq"] = seq
            ts = event.get("ts")
            ts = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None
            if since is not None and (ts is None or ts < since):
                continue
            if until is not None and (ts is None or ts > until):
                continue
            if kind is not None and event.get("kind") != kind:
                continue
            if filters and not all(_field_matches(event, k, v) for k, v in filters.items()):
                continue
            yield event
            count += 1
            if limit is not None and count >= limit:
                return

    def verify(self, verify_key: bytes | None = None) -> VerifyResult:
        """Walk the whole chain from K0; name the first event that does not verify."""
        k0 = verify_key if verify_key is not None else bytes.fromhex(self.verify_key_path.read_text().strip())
        key, prev, expected = k0, b"\0" * 32, 1
        self._catch_up()
        with self._lock:
            rows = self._db.execute("SELECT seq, body, mac, kind, ts FROM events ORDER BY seq").fetchall()
            head = self._db.execute("SELECT seq, key, mac FROM head WHERE id = 1").fetchone()
        for seq, body, mac, kind, ts in rows:
            if seq != expected:
                return VerifyResult(False, len(rows), expected, f"event {expected} is missing (deleted)")
            if not hmac.compare_digest(_mac(key, prev, seq, body.encode()), bytes.fromhex(mac)):
                return VerifyResult(False, len(rows), seq, "MAC does not verify (edited or reordered)")
            # kind and ts are stored next to the MAC'd body (for filtering): they must say what it says.
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if (
                not isinstance(doc, dict)
                or str(doc.get("kind", "")) != kind
                or (isinstance(doc.get("ts"), (int, float)) and doc["ts"] and float(doc["ts"]) != float(ts))
            ):
                return VerifyResult(False, len(rows), seq, "the kind or ts column does not match the event (edited)")
            prev, key, expected = bytes.fromhex(mac), _ratchet(key), expected + 1
        if head is None:
            return VerifyResult(False, len(rows), 1, "chain head is missing")
        head_seq, head_key, head_mac = int(head[0]), bytes.fromhex(head[1]), bytes.fromhex(head[2])
        if head_seq != expected - 1 or not hmac.compare_digest(head_key, key) or head_mac != prev:
            if head_seq > expected - 1:
                return VerifyResult(
                    False, len(rows), expected, f"events {expected}..{head_seq} are missing (truncated)"
                )
            return VerifyResult(False, len(rows), expected, "chain head does not match the events (tampered)")
        return VerifyResult(True, len(rows))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def chain_problem(path: str | Path) -> str:
    """Why ``path`` is not an audit log that can be read ("" when it is one), found without writing to it:
    opening a file as an :class:`AuditLog` makes an empty or foreign SQLite file a new, valid, empty log."""
    path = Path(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"events", "head"} <= tables or db.execute("SELECT count(*) FROM head").fetchone()[0] == 0:
                return f"{path} holds no audit chain (emptied or replaced)"
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"{path} cannot be read ({exc})"
    return ""


def _field_matches(event: Mapping[str, Any], key: str, value: str) -> bool:
    node: Any = event
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    if isinstance(node, list):
        return value in [str(x) for x in node]
    return str(node) == value
