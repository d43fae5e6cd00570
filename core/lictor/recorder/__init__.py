"""Session recording, replay and the durable path of audit events.

A session is one agent connection. The gateway's :class:`SessionRecorder` appends each of its
events (``session.record(kind, data)``: time, direction, kind and the payload as the agent saw
it, masked) and every audit event to a local spool before the call returns; drainers (in a child
process of the gateway by default, see ``_drainproc``) copy the spool in order to the sinks (local
directory with the audit SQLite chain, PostgreSQL, S3).
Sessions are hash-chained and end with a manifest signed by the gateway's Ed25519 recording key.
See ``docs/recording.md`` for the durability guarantees and the configuration.

Reading API (used by ``lictor sessions`` and the approvals web page)::

    from lictor.recorder import list_sessions, load_session

    rows = list_sessions({"sub": "agent-*", "decision": "deny", "since": "2h"})
    manifest, events = load_session(rows[0]["id"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._chain import SessionVerdict, SigningKey, load_public_key, verify_session
from ._cli import register
from ._recorder import DIRECTIONS, RecordingsConfig, SessionRecorder, SinkConfig, current_recorder
from ._replay import asciicast_lines, render, replay
from ._sinks import LocalSink, PostgresSink, Retention, S3Sink
from ._spool import Offset, Record, Spool, SpoolReader, SpoolView
from ._store import LocalStore, RemoteStore, Store, parse_events, select_sessions
from ._store import verify as _verify
from ._util import RecordingError, SpoolFull

__all__ = [
    "DIRECTIONS",
    "LocalSink",
    "LocalStore",
    "Offset",
    "PostgresSink",
    "Record",
    "RecordingError",
    "RecordingsConfig",
    "RemoteStore",
    "Retention",
    "S3Sink",
    "SessionRecorder",
    "SessionVerdict",
    "SigningKey",
    "SinkConfig",
    "Spool",
    "SpoolFull",
    "SpoolReader",
    "SpoolView",
    "Store",
    "asciicast_lines",
    "current_recorder",
    "list_sessions",
    "load_public_key",
    "load_session",
    "register",
    "render",
    "replay",
    "verify_session",
    "verify_sessions",
]


def _resolve(source: Store | str | Path | None) -> Store:
    if source is None:
        recorder = current_recorder()
        if recorder is None:
            raise RecordingError("no gateway recorder runs in this process: pass source= (a recordings directory)")
        recorder._catch_up_local()
        audit = recorder.audit_log.path if recorder.audit_log is not None else None
        return LocalStore(recorder.local_dir, recorder.config.state_dir, audit)
    if isinstance(source, (str, Path)):
        return LocalStore(source)
    return source


def list_sessions(
    filters: Mapping[str, Any] | None = None, *, source: Store | str | Path | None = None
) -> list[dict[str, Any]]:
    """Recorded sessions matching ``filters``, newest first.

    Filter keys (all optional): ``sub``, ``target``, ``protocol`` (globs); ``since`` (sessions
    active at or after: epoch seconds, an ISO time, or a duration ago such as ``"2h"``);
    ``until`` (started at or before); ``decision`` (``"allow"|"deny"|"approve"``: at least
    one such decision); ``open`` (bool); ``id`` (prefix); ``limit``.

    Each row: ``id, started_at, ended_at, open, sub, protocol, target, peer, events,
    decisions {allow, deny, approve}, interrupted, signed, bytes``. ``source`` defaults to the
    local store of the gateway running in this process (caught up with the spool first); pass
    a recordings directory or a :class:`Store` otherwise.
    """
    return select_sessions(_resolve(source).rows(), filters)


def load_session(
    session_id: str, *, source: Store | str | Path | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``(manifest, events)`` of one session.

    ``manifest`` is the signed manifest's body (``session, started_at, ended_at, events,
    head, identity, protocol, target, peer, decisions, interrupted``), or None while the
    session is open. ``events`` are in order, each ``{"s", "n", "t", "kind", "dir", "data",
    "prev"}``. Raises :class:`RecordingError` for an unknown session.
    """
    import json

    manifest_raw, lines = _resolve(source).load_raw(session_id)
    manifest = json.loads(manifest_raw)["manifest"] if manifest_raw is not None else None
    return manifest, parse_events(lines)


def verify_sessions(
    ids: Sequence[str] | None = None,
    *,
    source: Store | str | Path | None = None,
    public_key: str | Path | None = None,
) -> list[SessionVerdict]:
    """Check chains and signatures of ``ids`` (default: every session in the store, and every session the
    audit log records as recorded: one missing from the store is reported)."""
    return _verify(_resolve(source), ids, public_key)
