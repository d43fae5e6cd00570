"""Reading recordings back: listing sessions, loading one, verifying chains and manifests."""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..audit import AuditLog, chain_problem
from ._chain import SessionVerdict, load_public_key, verify_session
from ._sinks import INDEX_COLUMNS, PostgresSink, S3Sink
from ._util import RecordingError, parse_interval

__all__ = ["AuditedSessions", "LocalStore", "RemoteStore", "Store", "parse_time", "select_sessions"]


class Store(Protocol):
    """Where recordings are read from."""

    def rows(self) -> list[dict[str, Any]]:
        """One summary per session (unfiltered)."""
        ...

    def load_raw(self, session_id: str) -> tuple[bytes | None, list[bytes]]:
        """(signed manifest bytes or None, the stored event bytes in order)."""
        ...

    def stream_raw(self, session_id: str) -> tuple[bytes | None, Iterator[bytes]]:
        """Like :meth:`load_raw`, with the events read as they are consumed (bounded memory)."""
        ...

    def public_key_path(self) -> Path | None: ...

    def audited(self) -> AuditedSessions | None:
        """What an authenticated record other than the recordings (the audit log) says of the sessions;
        None when there is none to ask."""
        ...


@dataclass(frozen=True)
class AuditedSessions:
    """The sessions the audit log knows, read in one pass: its hash chain (``lictor audit verify``) covers
    these events, where nothing covers the index's rows and columns."""

    started: frozenset[str]
    """``session.start``: every session the index lists has its start there (the drain process appends a
    batch's audit events before it indexes the batch), unless the audit log was rolled back or replaced."""
    ended: frozenset[str]
    """``session.end``: each of these must have its manifest."""
    unrecorded: frozenset[str]
    """Started but not to be found in the store: refused before their recording started (``session.end``
    with ``recorded: false``), or removed by retention (``recording.retention``)."""
    problem: str = ""
    """Why the audit log could not be read (missing, damaged): then it vouches for no session."""
    decisions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """The ``decision`` events of each session, by action: at least as many as its signed manifest counts
    (they reach the spool before the manifest), unless the audit log was rolled back or truncated."""

    @property
    def recorded(self) -> frozenset[str]:
        """The sessions the store must hold: deleting one's files and index row together must not make it
        vanish from ``verify --all``."""
        return self.started - self.unrecorded


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "started_at": row.get("started_at"),
        "ended_at": row.get("ended_at"),
        "open": row.get("ended_at") is None,
        "sub": row.get("sub", ""),
        "protocol": row.get("protocol", ""),
        "target": row.get("target", ""),
        "peer": row.get("peer", ""),
        "events": int(row.get("events") or 0),
        "decisions": {k: int(row.get(k) or 0) for k in ("allow", "deny", "approve")},
        "interrupted": bool(row.get("interrupted")),
        "signed": bool(row.get("signed")),
        "bytes": int(row.get("bytes") or 0),
    }


class LocalStore:
    """The local directory sink's files (``recordings/`` in the state directory by default)."""

    def __init__(
        self, directory: str | Path, state_dir: str | Path | None = None, audit_path: str | Path | None = None
    ) -> None:
        self.directory = Path(directory)
        self.state_dir = Path(state_dir) if state_dir is not None else self.directory.parent
        self.audit_path = Path(audit_path) if audit_path is not None else self.state_dir / "audit.db"
        if not (self.directory / "index.db").exists():
            raise RecordingError(f"no recordings at {self.directory} (index.db is missing)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.directory / 'index.db'}?mode=ro", uri=True, timeout=10)

    def rows(self) -> list[dict[str, Any]]:
        db = self._db()
        try:
            cur = db.execute(f"SELECT {','.join(INDEX_COLUMNS)} FROM sessions")  # noqa: S608
            return [_summary(dict(zip(INDEX_COLUMNS, r, strict=True))) for r in cur.fetchall()]
        finally:
            db.close()

    def _path(self, session_id: str) -> Path | None:
        db = self._db()
        try:
            row = db.execute("SELECT path FROM sessions WHERE id = ?", (session_id,)).fetchone()
        finally:
            db.close()
        return self.directory / row[0] if row else None

    def load_raw(self, session_id: str) -> tuple[bytes | None, list[bytes]]:
        manifest, lines = self.stream_raw(session_id)
        return manifest, list(lines)

    def stream_raw(self, session_id: str) -> tuple[bytes | None, Iterator[bytes]]:
        path = self._path(session_id)
        if path is None:
            raise RecordingError(f"no recorded session {session_id!r} in {self.directory}")
        manifest_path = path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json")
        manifest = manifest_path.read_bytes().rstrip(b"\n") if manifest_path.exists() else None
        return manifest, _read_lines(path)

    def public_key_path(self) -> Path | None:
        path = self.state_dir / "recording.pub"
        return path if path.exists() else None

    def audited(self) -> AuditedSessions | None:
        """The sessions the audit log knows, read through :meth:`AuditLog.events`, which filters on the
        authenticated body, not on the ``kind`` column that an edit could change."""
        # A gateway's state directory always holds its audit log: one that is gone or does not read is no
        # reason to skip the check (deleting it would hide sessions deleted with their index rows).
        nothing = frozenset[str]()
        if not self.audit_path.exists():
            return AuditedSessions(nothing, nothing, nothing, f"the audit log {self.audit_path} is missing (deleted?)")
        started: set[str] = set()
        ended: set[str] = set()
        unrecorded: set[str] = set()
        decisions: dict[str, dict[str, int]] = {}
        problem = chain_problem(self.audit_path)  # opening an emptied file as an AuditLog would make it a new log
        if problem:
            return AuditedSessions(nothing, nothing, nothing, f"the audit log {problem}")
        try:
            audit = AuditLog(self.audit_path)
        except (sqlite3.Error, OSError, ValueError) as exc:
            return AuditedSessions(nothing, nothing, nothing, f"the audit log {self.audit_path} cannot be read ({exc})")
        try:
            for e in audit.events():
                kind = e.get("kind")
                if kind == "session.start" and isinstance(e.get("id"), str):
                    started.add(e["id"])
                elif kind == "session.end" and isinstance(e.get("session"), str):
                    ended.add(e["session"])
                    if e.get("recorded") is False:
                        unrecorded.add(e["session"])
                elif kind == "recording.retention" and isinstance(e.get("sessions"), list):
                    unrecorded.update(sid for sid in e["sessions"] if isinstance(sid, str))
                elif kind == "decision" and isinstance(e.get("session"), str):
                    counts = decisions.setdefault(e["session"], {})
                    counts[str(e.get("action"))] = counts.get(str(e.get("action")), 0) + 1
        except (sqlite3.Error, ValueError) as exc:
            return AuditedSessions(nothing, nothing, nothing, f"the audit log {self.audit_path} cannot be read ({exc})")
        finally:
            audit.close()
        return AuditedSessions(frozenset(started), frozenset(ended), frozenset(unrecorded), decisions=decisions)


class RemoteStore:
    """A PostgreSQL or S3 sink, read back."""

    def __init__(self, sink: PostgresSink | S3Sink, state_dir: Path | None = None) -> None:
        self.sink = sink
        self.state_dir = state_dir

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Say which sink could not be read (down, unreachable, refused) instead of the driver's traceback."""
        try:
            yield
        except RecordingError:
            raise
        except Exception as exc:  # psycopg's and botocore's errors: the drivers load only with their sinks
            raise RecordingError(f"cannot read the recordings sink {self.sink.name!r}: {exc}") from exc

    def rows(self) -> list[dict[str, Any]]:
        with self._reading():
            return self._rows()

    def _rows(self) -> list[dict[str, Any]]:
        if isinstance(self.sink, PostgresSink):
            return [_summary(r) for r in self.sink.list_rows()]
        out = []
        for body in self.sink.manifests():
            m = json.loads(body)["manifest"]
            counts = m.get("decisions") or {}
            out.append(
                _summary(
                    {
                        "id": m["session"],
                        "started_at": m.get("started_at"),
                        "ended_at": m.get("ended_at"),
                        "sub": (m.get("identity") or {}).get("sub", ""),
                        "protocol": m.get("protocol", ""),
                        "target": m.get("target", ""),
                        "peer": m.get("peer", ""),
                        "events": m.get("events", 0),
                        "interrupted": m.get("interrupted", False),
                        "signed": True,
                        **{k: counts.get(k, 0) for k in ("allow", "deny", "approve")},
                    }
                )
            )
        return out

    def load_raw(self, session_id: str) -> tuple[bytes | None, list[bytes]]:
        with self._reading():
            return self.sink.load(session_id)

    def stream_raw(self, session_id: str) -> tuple[bytes | None, Iterator[bytes]]:
        manifest, lines = self.load_raw(session_id)
        return manifest, iter(lines)

    def audited(self) -> AuditedSessions | None:
        return None  # a remote sink's session rows say when sessions ended, next to the manifests themselves

    def public_key_path(self) -> Path | None:
        if self.state_dir is None:
            return None
        path = self.state_dir / "recording.pub"
        return path if path.exists() else None


def parse_time(value: Any, what: str) -> float:
    """Epoch seconds from a number, an ISO date/time, or a duration meaning "that long ago"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return time.time() - parse_interval(text, what)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}: expected a time like 2024-05-01T12:00, or a duration like 2h (ago)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


FILTER_KEYS = ("sub", "target", "protocol", "since", "until", "decision", "open", "id", "limit")


def select_sessions(rows: Sequence[Mapping[str, Any]], filters: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Filter summaries; newest first. See :func:`lictor.recorder.list_sessions` for the keys."""
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(FILTER_KEYS))
    if unknown:
        raise ValueError(f"unknown session filter(s) {', '.join(unknown)}; known: {', '.join(FILTER_KEYS)}")
    since = parse_time(filters["since"], "since") if filters.get("since") is not None else None
    until = parse_time(filters["until"], "until") if filters.get("until") is not None else None
    decision = filters.get("decision")
    if decision is not None and decision not in ("allow", "deny", "approve"):
        raise ValueError(f"decision filter must be allow, deny or approve, not {decision!r}")
    out = []
    for row in rows:
        if filters.get("id") and not str(row["id"]).startswith(str(filters["id"])):
            continue
        if any(
            filters.get(k) is not None and not fnmatch.fnmatchcase(str(row.get(k, "")), str(filters[k]))
            for k in ("sub", "target", "protocol")
        ):
            continue
        started = row.get("started_at") or 0.0
        ended = row.get("ended_at")
        if since is not None and (ended if ended is not None else time.time()) < since:
            continue
        if until is not None and started > until:
            continue
        if decision is not None and not row["decisions"].get(decision):
            continue
        if filters.get("open") is not None and bool(row["open"]) != bool(filters["open"]):
            continue
        out.append(dict(row))
    out.sort(key=lambda r: r.get("started_at") or 0.0, reverse=True)
    if filters.get("limit"):
        out = out[: int(filters["limit"])]
    return out


def resolve_id(store: Store, session_id: str) -> str:
    """A full session id from an unambiguous prefix."""
    ids = [str(r["id"]) for r in store.rows() if str(r["id"]).startswith(session_id)]
    if session_id in ids:
        return session_id
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise RecordingError(f"no recorded session matches {session_id!r}")
    raise RecordingError(f"{session_id!r} matches {len(ids)} sessions; give more of the id")


def _broken(sid: str, problem: str, *, events: int = 0, signed: bool = False) -> SessionVerdict:
    """A session that fails verification for ``problem`` found beside its chain (not at one of its events)."""
    return SessionVerdict(sid, False, events, signed, None, problem)


def _read_lines(path: Path) -> Iterator[bytes]:
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            yield line.rstrip(b"\n")


def parse_events(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def iter_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The events to show (replay, export): a line that is not a JSON object (an edit, a write cut short) is
    shown as what it is, an ``unreadable`` event, and the events after it still are."""
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            yield event
        else:
            yield {"kind": "unreadable", "data": {"line": line.decode("utf-8", "replace")}}


def verify(
    store: Store, ids: Sequence[str] | None = None, public_key: str | Path | None = None
) -> list[SessionVerdict]:
    """Check each session of ``ids``; None: every session of the store (oldest first), then those the audit
    log says were recorded and the store lacks."""
    key_path = Path(public_key) if public_key else store.public_key_path()
    public = load_public_key(key_path) if key_path is not None else None
    audited = store.audited()
    if ids is None:
        ids = [str(r["id"]) for r in sorted(store.rows(), key=lambda r: r.get("started_at") or 0.0)]
        ids += sorted((audited.recorded if audited else frozenset()) - set(ids))
    verdicts = []
    index: dict[str, dict[str, Any]] | None = None
    for sid in ids:
        try:
            manifest_raw, lines = store.stream_raw(sid)
        except RecordingError:
            if audited is None or sid not in audited.recorded:
                raise
            verdicts.append(
                _broken(
                    sid,
                    "the audit log records this session, but the store holds no recording of it (deleted?)",
                )
            )
            continue
        try:
            manifest = json.loads(manifest_raw) if manifest_raw is not None else None
        except ValueError:
            verdicts.append(_broken(sid, "the manifest is not valid JSON (edited)"))
            continue
        if manifest_raw is not None and not isinstance(manifest, dict):
            # e.g. ``null`` or ``[]``: a manifest file is there, but it is not a signed manifest document
            verdicts.append(_broken(sid, "the manifest is not a JSON object (edited)"))
            continue
        verdict = verify_session(sid, lines, manifest, public)
        if manifest is None:
            # No manifest: a session still open, or one whose manifest was deleted (perhaps with the events
            # after some point). The index says which: an ended or signed session must have its manifest;
            # so does one whose end the audit log records (the index can be edited as easily as the files).
            if index is None:
                index = {str(r["id"]): r for r in store.rows()}
            row = index.get(sid)
            if audited is not None and sid in audited.ended:
                verdicts.append(
                    _broken(
                        sid,
                        "the manifest is missing, but the audit log records the end of the session "
                        f"(deleted or truncated? {verdict.events} events left)",
                        events=verdict.events,
                    )
                )
                continue
            if row is not None and (not row["open"] or row["signed"]):
                verdict = _broken(
                    sid,
                    f"the manifest is missing, but the index records the session as ended with {row['events']} "
                    "events (deleted or truncated?)",
                    events=verdict.events,
                )
        if verdict.ok and audited is not None and sid not in audited.started:
            verdict = _broken(
                sid,
                f"{audited.problem}: nothing shows whether sessions were deleted from the store"
                if audited.problem
                else "the audit log does not record the start of this session: it was rolled back, truncated "
                "or replaced (lictor audit verify cannot see that on its own)",
                events=verdict.events,
                signed=verdict.signed,
            )
        if verdict.ok and verdict.signed and audited is not None and isinstance(manifest, dict):
            missing = _decisions_missing(manifest, audited.decisions.get(sid, {}))
            if missing:
                verdict = _broken(
                    sid,
                    f"{missing}: it was rolled back or truncated (lictor audit verify cannot see that on its own)",
                    events=verdict.events,
                    signed=verdict.signed,
                )
        if (
            verdict.ok
            and verdict.signed
            and audited is not None
            and isinstance(manifest, dict)
            and (manifest.get("manifest") or {}).get("audited_end") is True
            and sid not in audited.ended
        ):
            verdict = _broken(
                sid,
                "the audit log does not record the end of this session, which the signed manifest says it holds: "
                "it was rolled back or truncated (lictor audit verify cannot see that on its own)",
                events=verdict.events,
                signed=verdict.signed,
            )
        verdicts.append(verdict)
    return verdicts


def _decisions_missing(manifest: Mapping[str, Any], audited: Mapping[str, int]) -> str:
    """What the audit log lacks of the decisions a (verified) signed manifest counts; "" if nothing."""
    counts = (manifest.get("manifest") or {}).get("decisions") or {}
    if not isinstance(counts, Mapping):
        return ""
    for action, count in sorted(counts.items()):
        if isinstance(count, int) and audited.get(str(action), 0) < count:
            return (
                f"the audit log holds {audited.get(str(action), 0)} of the {count} {str(action)!r} decisions "
                "the signed manifest counts"
            )
    return ""
