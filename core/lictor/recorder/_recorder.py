"""The gateway's recorder: session events and audit events into the spool, drained to the sinks."""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from ..audit import AuditLog
from ..config import ConfigError
from ._chain import GENESIS, SigningKey
from ._drainproc import DrainProcess
from ._sinks import Drainer, LocalSink, PostgresSink, Retention, S3Sink, Sink
from ._spool import AUDIT, CARRY, MANIFEST, OFFSETS, SESSION, Offset, Spool, SpoolReader, SpoolView, writer_alive
from ._util import RecordingError, canonical, encode_bytes, parse_interval, parse_size, sha256_hex

if TYPE_CHECKING:
    from ..config import GatewayConfig
    from ..gateway import Session

__all__ = ["RecordingsConfig", "SessionRecorder", "SinkConfig", "current_recorder"]

log = logging.getLogger("lictor.recorder")

# -- configuration ----------------------------------------------------------------------------------

_SIZE = {"type": ["string", "integer"]}
_DURATION = {"type": ["string", "number"]}
_RETENTION = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"max_age": _DURATION, "max_bytes": _SIZE},
}
_COMMON = {"type": {"type": "string"}, "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,40}$"}}
_SINK_SCHEMAS: dict[str, dict[str, Any]] = {
    "local": {
        "type": "object",
        "additionalProperties": False,
        "properties": {**_COMMON, "path": {"type": "string"}, "retention": _RETENTION},
    },
    "postgres": {
        "type": "object",
        "additionalProperties": False,
        "required": ["dsn"],
        "properties": {
            **_COMMON,
            "dsn": {"type": "string"},
            "table_prefix": {"type": "string"},
            "connect_timeout": _DURATION,
            "retention": _RETENTION,
        },
    },
    "s3": {
        "type": "object",
        "additionalProperties": False,
        "required": ["bucket"],
        "properties": {
            **_COMMON,
            "bucket": {"type": "string"},
            "prefix": {"type": "string"},
            "endpoint_url": {"type": "string"},
            "region": {"type": "string"},
            "access_key_id": {"type": "string"},
            "secret_access_key": {"type": "string"},
            "create_bucket": {"type": "boolean"},
            "timeout": _DURATION,
            "retention": _RETENTION,
        },
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "mode": {"enum": ["best_effort", "strict"]},
        "drain": {"enum": ["process", "thread"]},
        "spool": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": {"type": "string"},
                "max_bytes": _SIZE,
                "segment_bytes": _SIZE,
                "reserve_bytes": _SIZE,
                "fsync_interval": _DURATION,
            },
        },
        "sinks": {
            "type": "array",
            "items": {"type": "object", "required": ["type"], "properties": {"type": {"enum": list(_SINK_SCHEMAS)}}},
        },
        "retention": _RETENTION,
        "retention_interval": _DURATION,
        "stop_timeout": _DURATION,
    },
}


@dataclass(frozen=True)
class SinkConfig:
    type: str
    name: str
    options: Mapping[str, Any]
    retention: Retention


@dataclass(frozen=True)
class RecordingsConfig:
    """The ``recordings:`` section of the gateway config, validated, with defaults applied."""

    state_dir: Path
    spool_dir: Path
    local_dir: Path
    mode: str = "best_effort"
    max_bytes: int = 1 << 30
    segment_bytes: int = 16 << 20
    reserve_bytes: int = 1 << 20
    fsync_interval: float = 0.005
    retention_interval: float = 3600.0
    stop_timeout: float = 10.0
    sinks: tuple[SinkConfig, ...] = ()
    # "process": the sinks are fed by a child process (the gateway process only appends to the
    # spool); "thread": by threads of the gateway process.
    drain: str = "process"

    def offset_path(self, sink: str) -> Path:
        """Where the committed position of ``sink`` is kept (by whichever process drains it)."""
        return self.spool_dir / OFFSETS / f"{sink}.off"

    def to_json(self) -> dict[str, Any]:
        """This configuration as JSON (for the drain process)."""
        return {
            "state_dir": str(self.state_dir),
            "spool_dir": str(self.spool_dir),
            "local_dir": str(self.local_dir),
            "mode": self.mode,
            "max_bytes": self.max_bytes,
            "segment_bytes": self.segment_bytes,
            "reserve_bytes": self.reserve_bytes,
            "fsync_interval": self.fsync_interval,
            "retention_interval": self.retention_interval,
            "stop_timeout": self.stop_timeout,
            "drain": self.drain,
            "sinks": [
                {
                    "type": s.type,
                    "name": s.name,
                    "options": dict(s.options),
                    "retention": [s.retention.max_age, s.retention.max_bytes],
                }
                for s in self.sinks
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RecordingsConfig:
        return cls(
            state_dir=Path(doc["state_dir"]),
            spool_dir=Path(doc["spool_dir"]),
            local_dir=Path(doc["local_dir"]),
            mode=str(doc["mode"]),
            max_bytes=int(doc["max_bytes"]),
            segment_bytes=int(doc["segment_bytes"]),
            reserve_bytes=int(doc["reserve_bytes"]),
            fsync_interval=float(doc["fsync_interval"]),
            retention_interval=float(doc["retention_interval"]),
            stop_timeout=float(doc["stop_timeout"]),
            drain=str(doc["drain"]),
            sinks=tuple(
                SinkConfig(
                    str(s["type"]),
                    str(s["name"]),
                    dict(s["options"]),
                    Retention(float(s["retention"][0]), int(s["retention"][1])),
                )
                for s in doc["sinks"]
            ),
        )

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any], state_dir: Path, resolve: Callable[[str], Path] | None = None
    ) -> RecordingsConfig:
        """Validate ``section``; raise :class:`~lictor.ConfigError` naming the offending key."""
        resolve = resolve or (lambda p: Path(p) if Path(p).is_absolute() else Path(state_dir) / p)

        def fail(where: str, message: str) -> ConfigError:
            return ConfigError(f"recordings{'.' + where if where else ''}: {message}")

        errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(dict(section)), key=lambda e: e.path)
        if errors:
            e = errors[0]
            raise fail(".".join(map(str, e.absolute_path)), e.message)
        spool = section.get("spool") or {}
        try:
            default_retention = _retention(section.get("retention") or {}, "recordings.retention")
            sinks: list[SinkConfig] = []
            names: set[str] = set()
            raw_sinks = list(section.get("sinks") or [])
            if not any(s.get("type") == "local" for s in raw_sinks):
                raw_sinks.insert(0, {"type": "local"})
            for index, raw in enumerate(raw_sinks):
                kind = str(raw["type"])
                sink_errors = list(jsonschema.Draft202012Validator(_SINK_SCHEMAS[kind]).iter_errors(raw))
                if sink_errors:
                    raise fail(f"sinks.{index}", sink_errors[0].message)
                name = str(raw.get("name") or kind)
                if name in names:
                    raise fail(f"sinks.{index}", f"two sinks are named {name!r}; give them distinct names")
                if kind == "local" and any(s.type == "local" for s in sinks):
                    raise fail(f"sinks.{index}", "only one local sink is supported")
                names.add(name)
                retention = (
                    _retention(raw["retention"], f"recordings.sinks.{index}.retention")
                    if "retention" in raw
                    else default_retention
                )
                options = {k: v for k, v in raw.items() if k not in ("type", "name", "retention")}
                sinks.append(SinkConfig(kind, name, options, retention))
            local = next(s for s in sinks if s.type == "local")
            local_dir = resolve(str(local.options["path"])) if local.options.get("path") else state_dir / "recordings"
            spool_dir = resolve(str(spool["path"])) if spool.get("path") else state_dir / "spool"
            max_bytes = parse_size(spool.get("max_bytes", 1 << 30), "recordings.spool.max_bytes")
            return cls(
                state_dir=Path(state_dir),
                spool_dir=spool_dir,
                local_dir=local_dir,
                mode=str(section.get("mode", "best_effort")),
                max_bytes=max_bytes,
                segment_bytes=max(
                    4096,
                    parse_size(
                        spool.get("segment_bytes", min(16 << 20, max(max_bytes // 8, 4096))),
                        "recordings.spool.segment_bytes",
                    ),
                ),
                reserve_bytes=parse_size(
                    spool.get("reserve_bytes", min(1 << 20, max(max_bytes // 64, 4096))),
                    "recordings.spool.reserve_bytes",
                ),
                fsync_interval=parse_interval(spool.get("fsync_interval", "5ms"), "recordings.spool.fsync_interval"),
                retention_interval=parse_interval(
                    section.get("retention_interval", "1h"), "recordings.retention_interval"
                ),
                stop_timeout=parse_interval(section.get("stop_timeout", "10s"), "recordings.stop_timeout"),
                sinks=tuple(sinks),
                drain=str(section.get("drain", "process")),
            )
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_gateway_config(cls, config: GatewayConfig) -> RecordingsConfig:
        return cls.from_section(config.section("recordings"), config.state_dir, config.resolve)


def local_store_note(config: RecordingsConfig, timeout: float = 3.0) -> str:
    """For readers in another process: let a running gateway's local store catch up with its spool (see
    :func:`wait_for_local_store`); "" when the local store holds what the spool holds, else what to tell the
    reader: a gateway that died (SIGKILL, a crash) or stopped while a sink was down leaves records in its
    spool that reach the audit log and the recordings only when it starts again, and an intact chain says
    nothing of them."""
    if writer_alive(config.spool_dir):
        if wait_for_local_store(config, timeout):
            return ""
        return "the gateway's drain process is behind; showing what is stored so far"
    local = next((s.name for s in config.sinks if s.type == "local"), "local")
    committed = Offset.peek(config.offset_path(local)) or 0
    reader = SpoolReader(SpoolView(config.spool_dir), committed)
    left, more = 0, True
    try:
        for _ in range(4):  # at most ~16 MiB of the spool: enough to tell
            batch = reader.read()
            if not batch:
                more = False
                break
            left += sum(1 for record in batch if record.type != CARRY)
    finally:
        reader.close()
    if not left:
        return ""
    return (
        f"the spool {config.spool_dir} holds {left}{' or more' if more else ''} audit and session record(s) that "
        "are not stored yet (the gateway stopped before it could store them: they are when it starts again); "
        "showing what is stored"
    )


def wait_for_local_store(config: RecordingsConfig, timeout: float = 3.0) -> bool:
    """For readers in another process (``lictor audit list``, ``lictor sessions``): wait, at most
    ``timeout`` seconds, until a running gateway's local store (the audit log and local recordings)
    holds every event its spool holds now. The drain process writes them a batch behind the spool;
    without a running gateway there is nothing to wait for. True when caught up."""
    spool_dir = config.spool_dir
    if not writer_alive(spool_dir):
        return True  # no gateway running: nothing more will be drained now
    local = next((s.name for s in config.sinks if s.type == "local"), "local")
    offset = config.offset_path(local)
    committed = Offset.peek(offset) or 0
    reader = SpoolReader(SpoolView(spool_dir), committed)
    try:
        last = committed
        for _ in range(4):  # at most ~16 MiB of the spool: far behind, waiting could not help anyway
            batch = reader.read()
            if not batch:
                break
            last = batch[-1].seq
    finally:
        reader.close()
    deadline = time.monotonic() + timeout
    while (Offset.peek(offset) or 0) < last:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _retention(raw: Mapping[str, Any], where: str) -> Retention:
    return Retention(
        max_age=parse_interval(raw["max_age"], f"{where}.max_age") if "max_age" in raw else 0.0,
        max_bytes=parse_size(raw["max_bytes"], f"{where}.max_bytes") if "max_bytes" in raw else 0,
    )


# -- per-session state --------------------------------------------------------------------------------

# The direction of an event when its data does not say (``data["direction"]``): "in" is what the
# agent sent, "out" what it received, "gw" what the gateway itself did.
DIRECTIONS = {
    "input": "in",
    "resize": "in",
    "command": "in",
    "statement": "in",
    "http": "in",
    "output": "out",
    "decision": "gw",
    "session.start": "gw",
    "session.end": "gw",
}


@dataclass(slots=True)
class _Live:
    """What the recorder keeps per open session: the chain head and what the manifest needs."""

    n: int = 0
    prev: str = GENESIS
    strict: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    first_seq: int = 0
    last_seq: int = 0
    started_at: float = 0.0
    end_seq: int = 0  # its session.end, once written (the manifest may still be missing)
    audited_end: bool = False  # the audit's session.end of it is in the spool (before its manifest, then)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "prev": self.prev,
            "strict": self.strict,
            "meta": self.meta,
            "counts": self.counts,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "started_at": self.started_at,
            "audited_end": self.audited_end,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> _Live:
        return cls(
            n=int(doc["n"]),
            prev=str(doc["prev"]),
            strict=bool(doc.get("strict")),
            meta=dict(doc.get("meta") or {}),
            counts={str(k): int(v) for k, v in (doc.get("counts") or {}).items()},
            first_seq=int(doc.get("first_seq") or 0),
            last_seq=int(doc.get("last_seq") or 0),
            started_at=float(doc.get("started_at") or 0.0),
            audited_end=bool(doc.get("audited_end")),
        )


_CURRENT: list[weakref.ref[SessionRecorder]] = []


def current_recorder() -> SessionRecorder | None:
    """The recorder of the gateway running in this process (the newest one), if any."""
    while _CURRENT:
        recorder = _CURRENT[-1]()
        if recorder is not None and not recorder._stopped:
            return recorder
        _CURRENT.pop()
    return None


class DeferredSyncs:
    """See :meth:`SessionRecorder.defer_syncs` (re-entrant; one object can be entered again and again)."""

    __slots__ = ("_local",)

    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1


class SessionRecorder:
    """Records sessions and audit events durably; implements the gateway's ``Recorder``.

    Every event is appended to the spool before the call returns (``strict`` sessions: and
    fsync'd); drainers then copy the spool, in order, to each configured sink: in a child
    process (``recordings.drain: process``, the default) or in threads of this one. Calls
    raise :class:`RecordingError` (an :class:`~lictor.AuditError`) when an event cannot be
    made durable; the gateway then refuses the command.
    """

    def __init__(self, config: RecordingsConfig, *, audit: AuditLog | None = None) -> None:
        self.config = config
        self.audit_log = audit
        self.spool = Spool(
            config.spool_dir,
            max_bytes=config.max_bytes,
            segment_bytes=config.segment_bytes,
            fsync_interval=config.fsync_interval,
            reserve_bytes=config.reserve_bytes,
        )
        try:
            self.key = SigningKey(config.state_dir)
            self._lock = threading.RLock()
            self._sessions: dict[str, _Live] = {}
            self._rotate_after = 0.0
            # Sessions that ended while the spool took no writes: their end and manifest are written as soon
            # as it takes writes again (before the next event), not only when the gateway stops.
            self._unclosed: dict[str, str] = {}
            self._started = False
            self._stopped = False
            self._proc: DrainProcess | None = None
            # Strict events appended while this thread defers their fdatasync (see defer_syncs), and the last of
            # them: one sync_owed() makes them all durable.
            self._deferring = threading.local()
            self._owed = 0
            orphans = self._recover()
            self._sessions.update(orphans)
            self.spool.start_segment((CARRY, self._carry()))
            self.sinks: list[Sink] = [self._make_sink(s) for s in config.sinks]
            self.drainers = [
                Drainer(
                    sink,
                    self.spool,
                    Offset(config.offset_path(sink.name)),
                    on_commit=self._release,
                    retention_interval=config.retention_interval,
                )
                for sink in self.sinks
            ]
        except BaseException:
            self.spool.close()
            raise
        self.local = next(d for d in self.drainers if isinstance(d.sink, LocalSink))
        self.interrupted: list[str] = []
        for sid in sorted(orphans):
            log.warning("session %s was interrupted (the gateway stopped without closing it): signing it now", sid)
            with self._lock:
                try:
                    self._audit_interrupted(sid, self._sessions[sid])
                    self._finish(
                        sid, self._sessions[sid], interrupted=True, reason="interrupted: the gateway restarted"
                    )
                except RecordingError as exc:
                    log.error("session %s stays open in the spool (signed at next start): %s", sid, exc)
                    continue
                del self._sessions[sid]
                self.interrupted.append(sid)
        # What a restart cut from the spool (a torn write) or found damaged in it (records lost between valid
        # ones) may never have reached the sinks: the audit chain says so, not only the log. What the spool
        # cannot take now (it is full) is audited before the next audit event it takes.
        self._recoveries = list(self.spool.recovery_problems)
        self._audit_recoveries(at_start=True)
        if audit is not None:
            audit.before_read = self._catch_up_local
        self.spool.on_takeover = self._abandon
        _CURRENT.append(weakref.ref(self))

    def _audit_interrupted(self, sid: str, live: _Live) -> None:
        """The audit's ``session.end`` of a session the dead process left open, unless it got there first: like
        every other ended session, its end is in the audit log, and its manifest says so (``audited_end``), so
        that deleting the manifest (and cutting the events before it) does not pass as a session still open."""
        if live.audited_end:
            return
        meta = live.meta
        event = {
            "kind": "session.end",
            "ts": time.time(),
            "session": sid,
            **{k: meta.get(k, "") for k in ("protocol", "target", "peer")},
            "identity": meta.get("identity") or {},
            "reason": "interrupted: the gateway restarted",
            "interrupted": True,
        }
        self._append(AUDIT, encode_bytes(event), reserve=True)
        live.audited_end = True

    def _audit_recoveries(self, *, at_start: bool = False) -> None:
        """Audit the spool's recovery problems (``spool.recovered``) not audited yet; the spool forgets each once
        its event is durable, so a gateway stopped before then audits it at its next start."""
        done: list[str] = []
        with self._lock:
            try:
                for problem in self._recoveries:
                    body = {"kind": "spool.recovered", "ts": time.time(), "spool": str(self.config.spool_dir)}
                    self._append(AUDIT, encode_bytes({**body, "problem": problem}))
                    done.append(problem)
            except RecordingError as exc:
                if at_start:
                    log.error("could not audit a spool recovery yet (%s): %s", self._recoveries[len(done)], exc)
            if not done:
                return
            self._recoveries = self._recoveries[len(done) :]
        try:
            self.spool.sync()
            self.spool.recovery_reported(done)
        except (RecordingError, OSError) as exc:
            log.error("the spool recovery is audited again at the next start: %s", exc)

    @classmethod
    def for_gateway(cls, config: GatewayConfig, audit: AuditLog | None) -> SessionRecorder:
        return cls(RecordingsConfig.from_gateway_config(config), audit=audit)

    def _make_sink(self, cfg: SinkConfig) -> Sink:
        return make_sink(cfg, self.config, self.spool.gateway_id, self.audit_log)

    # -- recovery ------------------------------------------------------------------------------------

    def _recover(self) -> dict[str, _Live]:
        """The sessions left open by the previous run: from the newest carry record onwards."""
        state: dict[str, _Live] = {}
        after = 0
        for segment in reversed(self.spool.segments):
            reader = SpoolReader(self.spool, segment.first_seq - 1)
            try:
                first = reader.read(1)
            finally:
                reader.close()
            if first and first[0].type == CARRY and first[0].seq == segment.first_seq:
                state = self._parse_carry(first[0].body)
                after = first[0].seq
                break
        for record in self.spool.records(after):
            if record.type == SESSION:
                doc = json.loads(record.body)
                sid = str(doc["s"])
                live = state.get(sid)
                if live is None:
                    live = state[sid] = _Live(first_seq=record.seq, started_at=float(doc.get("t") or 0))
                if doc.get("kind") == "session.start" and isinstance(doc.get("data"), dict):
                    live.meta = _meta(doc["data"])
                    live.started_at = float(doc.get("t") or 0)
                    live.strict = bool(doc["data"].get("recording") == "strict")
                live.n = int(doc["n"]) + 1
                live.prev = sha256_hex(record.body)
                live.last_seq = record.seq
            elif record.type == MANIFEST:
                state.pop(str(json.loads(record.body)["manifest"]["session"]), None)
            elif record.type == AUDIT:
                doc = json.loads(record.body)
                if doc.get("kind") == "decision" and doc.get("session") in state:
                    live = state[str(doc["session"])]
                    action = str(doc.get("action"))
                    live.counts[action] = live.counts.get(action, 0) + 1
                elif doc.get("kind") == "session.end" and doc.get("session") in state:
                    state[str(doc["session"])].audited_end = True  # audited before the process died
            elif record.type == CARRY:
                state = self._parse_carry(record.body)
        return state

    @staticmethod
    def _parse_carry(body: bytes) -> dict[str, _Live]:
        doc = json.loads(body)
        return {str(sid): _Live.from_json(v) for sid, v in (doc.get("sessions") or {}).items()}

    def _carry(self) -> bytes:
        return encode_bytes({"v": 1, "t": time.time(), "sessions": {k: v.to_json() for k, v in self._sessions.items()}})

    # -- the hot path ----------------------------------------------------------------------------------

    def _append(self, rtype: int, body: bytes, reserve: bool = False) -> int:
        spool = self.spool
        if spool.active_size >= spool.segment_bytes and time.monotonic() >= self._rotate_after:
            try:
                spool.start_segment((CARRY, self._carry()))
            except OSError as exc:  # RecordingError is an AuditError, not an OSError: caught below
                self._rotate_later(exc)
            except RecordingError as exc:
                self._rotate_later(exc)
        return spool.append(rtype, body, reserve=reserve)

    def _rotate_later(self, exc: BaseException) -> None:
        log.warning("could not start a new spool segment (%s); appending to the current one", exc)
        self._rotate_after = time.monotonic() + 1.0

    def _session_event(self, sid: str, live: _Live, kind: str, data: Mapping[str, Any], reserve: bool = False) -> int:
        if type(data) is not dict or "direction" in data:
            data = dict(data)
        direction = data.pop("direction", None) if "direction" in data else None
        body = encode_bytes(
            {
                "s": sid,
                "n": live.n,
                "t": time.time(),
                "kind": kind,
                "dir": direction or DIRECTIONS.get(kind, ""),
                "data": data,
                "prev": live.prev,
            }
        )
        seq = self._append(SESSION, body, reserve)
        live.n += 1
        live.prev = sha256_hex(body)
        live.last_seq = seq
        if not live.first_seq:
            live.first_seq = seq
        return seq

    def _sync(self, seq: int) -> None:
        if getattr(self._deferring, "depth", 0):
            if seq > self._owed:
                self._owed = seq
            return
        self.spool.sync(seq)

    def defer_syncs(self) -> DeferredSyncs:
        """A context manager: on this thread, strict events appended inside it are not synced one by one; they
        are owed until :meth:`sync_owed`, which the caller must run before anything that depends on them leaves
        the gateway (an event loop that writes its output once per turn: one ``fdatasync`` per turn)."""
        return DeferredSyncs(self._deferring)

    def owes_sync(self) -> bool:
        """Whether strict events appended under :meth:`defer_syncs` are not yet on disk."""
        return self._owed > self.spool.synced_seq

    def sync_owed(self) -> None:
        """Make the strict events owed by :meth:`defer_syncs` durable (one ``fdatasync`` for all of them).
        Raises :class:`RecordingError` when they cannot be (nothing that depends on them may then go out)."""
        owed = self._owed
        if owed > self.spool.synced_seq:
            self.spool.sync(owed)

    def open(self, session: Session) -> None:
        """Start recording ``session`` (its first event, ``session.start``)."""
        strict = self._strict_for(session)
        data = {
            **session.to_json(),
            "auth_method": session.meta.get("auth_method", ""),
            "started_at": session.started_at,
            "recording": "strict" if strict else "best_effort",
        }
        live = _Live(strict=strict, meta=_meta(data), started_at=session.started_at)
        with self._lock:
            if self._unclosed:
                self._close_unclosed()
            if session.id in self._sessions:
                raise RecordingError(f"session {session.id} is already being recorded")
            seq = self._session_event(session.id, live, "session.start", data)
            self._sessions[session.id] = live
        if strict:
            self._sync(seq)

    def event(self, session: Session, kind: str, data: Mapping[str, Any]) -> None:
        """Append one event (``kind`` + JSON ``data``, masked as the agent saw it) to ``session``."""
        with self._lock:
            if self._unclosed:
                self._close_unclosed()
            live = self._sessions.get(session.id)
            if live is None or session.id in self._unclosed:
                raise RecordingError(f"session {session.id} is not being recorded (closed, or never opened)")
            seq = self._session_event(session.id, live, kind, data)
        if live.strict or self.config.mode == "strict":
            self._sync(seq)

    def audit(self, kind: str, event: Mapping[str, Any], *, strict: bool = False) -> None:
        """Append an audit event; decisions other than ``allow`` also go into their session."""
        if self._recoveries:
            self._audit_recoveries()
        body = encode_bytes({"kind": kind, "ts": time.time(), **event})
        sid = event.get("session") if kind == "decision" else None
        with self._lock:
            if self._unclosed:
                self._close_unclosed()
            seq = self._append(AUDIT, body)
            if kind == "session.end":
                ended = self._sessions.get(str(event.get("session")))
                if ended is not None:
                    ended.audited_end = True
            live = self._sessions.get(sid) if isinstance(sid, str) else None
            if live is not None:
                assert isinstance(sid, str)
                action = str(event.get("action"))
                live.counts[action] = live.counts.get(action, 0) + 1
                if strict:
                    live.strict = True
                strict = strict or live.strict
                if action != "allow":
                    request = event.get("request") or {}
                    seq = self._session_event(
                        sid,
                        live,
                        "decision",
                        {
                            "action": action,
                            "rule_ids": event.get("rule_ids", []),
                            "message": event.get("message", ""),
                            "summary": request.get("summary", "") if isinstance(request, Mapping) else "",
                            "phase": event.get("phase", "decision"),
                            "approval_id": event.get("approval_id"),
                        },
                    )
        if strict or self.config.mode == "strict":
            self._sync(seq)

    def close(self, session: Session) -> None:
        """End the recording of ``session``: ``session.end`` and the signed manifest."""
        with self._lock:
            live = self._sessions.get(session.id)
            if live is None or session.id in self._unclosed:
                return
            try:
                seq = self._finish(session.id, live, interrupted=False, reason="closed")
            except RecordingError as exc:
                log.error(
                    "could not close the recording of session %s (retried once the spool takes writes): %s",
                    session.id,
                    exc,
                )
                self._unclosed[session.id] = "closed"
                return
            del self._sessions[session.id]
        self._sync_end(session.id, live, seq)

    def _sync_end(self, sid: str, live: _Live, seq: int) -> None:
        """In strict mode, make the end of a recording durable (a failure is logged: the session is over)."""
        if live.strict or self.config.mode == "strict":
            try:
                self._sync(seq)
            except RecordingError as exc:
                log.error("session %s: the end of its recording is not durable: %s", sid, exc)

    def _close_unclosed(self) -> None:
        """Write the end and manifest of the sessions whose close found the spool taking no writes (under the
        lock); those that still cannot be written wait for the next event."""
        for sid, reason in list(self._unclosed.items()):
            live = self._sessions.get(sid)
            if live is not None:
                try:
                    seq = self._finish(sid, live, interrupted=False, reason=reason)
                except RecordingError:
                    return
                del self._sessions[sid]
                self._sync_end(sid, live, seq)
                log.info("the recording of session %s is closed now that the spool takes writes", sid)
            del self._unclosed[sid]

    def _finish(self, sid: str, live: _Live, *, interrupted: bool, reason: str) -> int:
        end_seq = live.end_seq or self._session_event(
            sid, live, "session.end", {"reason": reason, "decisions": dict(live.counts)}, reserve=True
        )
        live.end_seq = end_seq  # a manifest that fails now does not write the end twice when retried
        meta = live.meta
        manifest = {
            "v": 1,
            "session": sid,
            "gateway": self.spool.gateway_id,
            "started_at": live.started_at,
            "ended_at": time.time(),
            "events": live.n,
            "head": live.prev,
            "identity": meta.get("identity") or {},
            "protocol": meta.get("protocol", ""),
            "target": meta.get("target", ""),
            "peer": meta.get("peer", ""),
            "decisions": dict(live.counts),
            "interrupted": interrupted,
            "spool": {"gateway": self.spool.gateway_id, "first": live.first_seq, "last": end_seq},
        }
        if live.audited_end:
            # The audit log holds this session's end (it reached the spool first): an audit log rolled back to
            # before it, which its own chain cannot show, does not pass `sessions verify` (a session whose end
            # could not be audited then, on a full disk or after a crash, is signed without the promise).
            manifest["audited_end"] = True
        return self.spool.append(MANIFEST, canonical(self.key.sign(manifest)), reserve=True)

    def _strict_for(self, session: Session) -> bool:
        if self.config.mode == "strict":
            return True
        try:
            policy = session.gateway.policy
            roles = session.roles(policy)
            return any(getattr(policy.roles.get(r), "recording", "") == "strict" for r in roles)
        except Exception:
            log.exception("could not tell the recording mode of session %s; recording it strictly", session.id)
            return True

    # -- draining ----------------------------------------------------------------------------------------

    def _release(self) -> None:
        upto = min(d.committed for d in self.drainers)
        self.spool.release(upto)

    def _catch_up_local(self) -> None:
        """Before an in-process read of the local store: let it catch up with the spool (bounded)."""
        if self._stopped:
            return
        if self._proc is not None:
            if not self._proc.wait(self.spool.written_seq, time.monotonic() + 5.0, [self.local.name]):
                log.warning("the local recording store is behind the spool; reading what it has")
            return
        try:
            self.local.drain(time.monotonic() + 5.0)
        except Exception as exc:
            log.warning("could not catch up the local recording store: %s", exc)

    def start(self) -> None:
        """Start the group-commit thread, and the drain process (or one drainer thread per sink)."""
        if self._started:
            return
        self._started = True
        if self.config.drain == "process":
            self.spool.sync_elsewhere()  # the drain process runs the group commit (GroupCommit)
            for drainer in self.drainers:
                drainer.close_reader()  # the drain process reads the spool from now on
            self._proc = DrainProcess(self.config, self.spool, self.drainers, self.audit_log)
            self._proc.on_retention = self._retained
            self._proc.start()
            return
        self.spool.start_sync_thread()
        for drainer in self.drainers:
            drainer.on_retention = self._retained
            drainer.start()

    def _retained(self, sink: str, sessions: list[str]) -> None:
        """Audit the sessions retention removed from a local store (``sessions verify`` reads it)."""
        for start in range(0, len(sessions), 500):
            self.audit("recording.retention", {"sink": sink, "sessions": sessions[start : start + 500]})

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every sink has committed everything appended so far; False on timeout."""
        deadline = time.monotonic() + timeout
        target = self.spool.written_seq
        if self._proc is not None:
            return self._proc.wait(target, deadline)
        for drainer in self.drainers:
            if drainer._thread is None:
                drainer.drain(deadline)
                continue
            while drainer.committed < target and time.monotonic() < deadline:
                drainer.wake()
                time.sleep(0.005)
        return all(d.committed >= target for d in self.drainers)

    def status(self) -> dict[str, Any]:
        """Spool size and, per sink, the committed position and health (for /status pages)."""
        return {
            "drain": {"mode": "process", "pid": self._proc.pid, "restarts": self._proc.restarts}
            if self._proc is not None
            else {"mode": "thread" if self._started else "none"},
            "spool": {
                "bytes": self.spool.total_bytes,
                "max_bytes": self.spool.max_bytes,
                "written": self.spool.written_seq,
                "synced": self.spool.synced_seq,
                "broken": self.spool.broken,
            },
            "sinks": [vars(d.status()) for d in self.drainers],
            "open_sessions": len(self._sessions),
        }

    def _abandon(self) -> None:
        """Another recorder took the spool over in this process: stop draining, touch nothing."""
        self._stopped = True
        if self._proc is not None:
            self._proc.kill()
        for drainer in self.drainers:
            drainer.stop(timeout=5.0)
        if self.audit_log is not None and self.audit_log.before_read == self._catch_up_local:
            self.audit_log.before_read = None

    def stop(self) -> None:
        """Close what is still open, drain the sinks (up to ``stop_timeout``), close the spool."""
        if self._stopped:
            return
        with self._lock:
            for sid, live in list(self._sessions.items()):
                try:
                    self._finish(sid, live, interrupted=False, reason=self._unclosed.pop(sid, "gateway stopping"))
                    del self._sessions[sid]
                except RecordingError as exc:
                    log.error("session %s stays open in the spool (signed at next start): %s", sid, exc)
        deadline = time.monotonic() + self.config.stop_timeout
        if self._proc is not None:
            self._proc.stop(self.config.stop_timeout)
        for drainer in self.drainers:
            drainer.stop(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for drainer in self.drainers:
            behind = drainer.committed < self.spool.written_seq
            if self._proc is None and drainer._thread is None:
                behind = not drainer.drain(deadline)
            if behind:
                log.warning(
                    "recording sink %s is %d events behind; they stay in the spool and are sent at next start",
                    drainer.name,
                    self.spool.written_seq - drainer.committed,
                )
        self._stopped = True
        if self.audit_log is not None and self.audit_log.before_read == self._catch_up_local:
            self.audit_log.before_read = None
        for drainer in self.drainers:
            if drainer._thread is None:
                drainer.close()
        self.spool.close()

    # -- reading -----------------------------------------------------------------------------------------

    @property
    def local_dir(self) -> Path:
        return self.config.local_dir


def make_sink(cfg: SinkConfig, config: RecordingsConfig, gateway_id: str, audit: AuditLog | None) -> Sink:
    """The sink ``cfg`` describes (nothing is connected yet)."""
    o = cfg.options
    if cfg.type == "local":
        return LocalSink(cfg.name, config.local_dir, audit, gateway_id, cfg.retention)
    if cfg.type == "postgres":
        return PostgresSink(
            cfg.name,
            str(o["dsn"]),
            gateway_id,
            cfg.retention,
            prefix=str(o.get("table_prefix", "lictor_")),
            connect_timeout=parse_interval(o.get("connect_timeout", 3), f"recordings sink {cfg.name}"),
        )
    return S3Sink(
        cfg.name,
        gateway_id,
        cfg.retention,
        bucket=str(o["bucket"]),
        prefix=str(o.get("prefix", "")),
        endpoint_url=o.get("endpoint_url"),
        region=o.get("region"),
        access_key_id=o.get("access_key_id"),
        secret_access_key=o.get("secret_access_key"),
        create_bucket=bool(o.get("create_bucket", False)),
        timeout=parse_interval(o.get("timeout", 5), f"recordings sink {cfg.name}"),
    )


def _meta(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "identity": data.get("identity") or {},
        "protocol": data.get("protocol", ""),
        "target": data.get("target", ""),
        "peer": data.get("peer", ""),
    }
