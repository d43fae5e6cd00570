"""``lictor sessions list|verify|export`` and ``lictor replay``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._text import count_arg, printable
from ..config import ConfigError, load_config
from ._chain import SessionVerdict
from ._recorder import RecordingsConfig, local_store_note, make_sink
from ._replay import asciicast_lines, replay
from ._sinks import PostgresSink, Retention, S3Sink
from ._store import LocalStore, RemoteStore, Store, iter_events, resolve_id, select_sessions, verify
from ._util import RecordingError, parse_interval

__all__ = ["register"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _store(args: argparse.Namespace) -> Store:
    if args.dir:
        return LocalStore(args.dir, args.state_dir or Path(args.dir).parent)
    config_path = args.config or ("lictor.yaml" if Path("lictor.yaml").exists() and not args.state_dir else None)
    if config_path:
        config = load_config(config_path, offline=True)
        rec = RecordingsConfig.from_gateway_config(config)
        if args.source and args.source != "local":
            sink_cfg = next((s for s in rec.sinks if s.name == args.source), None)
            if sink_cfg is None:
                names = ", ".join(s.name for s in rec.sinks)
                raise RecordingError(f"no recordings sink named {args.source!r} in {config_path} (sinks: {names})")
            gid_path = rec.spool_dir / "gateway-id"
            gid = gid_path.read_text().strip() if gid_path.exists() else ""
            if sink_cfg.type not in ("postgres", "s3"):
                raise RecordingError(f"sink {args.source!r} cannot be read back")
            # The sink as the gateway builds it, without retention: reading never deletes anything.
            sink = make_sink(replace(sink_cfg, retention=Retention()), rec, gid, None)
            assert isinstance(sink, (PostgresSink, S3Sink))
            return RemoteStore(sink, rec.state_dir)
        _settle(rec)
        audit = (
            config.resolve(str(config.section("audit")["sqlite"])) if config.section("audit").get("sqlite") else None
        )
        return LocalStore(rec.local_dir, rec.state_dir, audit)
    state = Path(args.state_dir or os.environ.get("LICTOR_STATE_DIR", "state"))
    _settle(RecordingsConfig.from_section({}, state))
    return LocalStore(state / "recordings", state)


def _settle(rec: RecordingsConfig) -> None:
    """Let the local store catch up with a running gateway's spool; say on stderr when it does not hold
    everything the spool holds (a gateway behind, or one that stopped before storing it)."""
    try:
        note = local_store_note(rec)
    except (OSError, ValueError):
        return  # reading what is there is still right
    if note:
        print(f"lictor: {note}", file=sys.stderr)


def _ts(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if t else "-"


def _duration(row: dict[str, Any]) -> str:
    if not row.get("started_at"):
        return "-"
    end = row.get("ended_at") or time.time()
    seconds = max(0, int(end - row["started_at"]))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_list(args: argparse.Namespace) -> int:
    filters: dict[str, Any] = {
        k: getattr(args, k) for k in ("sub", "target", "protocol", "since", "until", "decision", "limit")
    }
    if args.open or args.ended:
        filters["open"] = bool(args.open)
    store = _store(args)
    rows = select_sessions(store.rows(), {k: v for k, v in filters.items() if v is not None})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    print(
        f"{'ID':12} {'STARTED':19} {'DURATION':>8} {'SUB':16} {'TARGET':14} {'PROTOCOL':10} "
        f"{'EVENTS':>6} {'ALLOW':>5} {'DENY':>5} {'APPR':>5} STATE"
    )
    for r in rows:
        # one line per session, control characters escaped: a line break in a token's subject is shown as \x0a,
        # not started, and an index edited by hand cannot move the cursor over the lines around its row
        state = "open" if r["open"] else ("interrupted" if r["interrupted"] else "ended")
        d = r["decisions"]
        sid, sub, target, protocol = (printable(r[k], keep="") for k in ("id", "sub", "target", "protocol"))
        print(
            f"{sid[:12]:12} {_ts(r['started_at']):19} {_duration(r):>8} {sub[:16]:16} "
            f"{target[:14]:14} {protocol[:10]:10} {r['events']:>6} {d['allow']:>5} "
            f"{d['deny']:>5} {d['approve']:>5} {state}"
        )
    if not rows:
        print("(no sessions match)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    if not args.all and not args.id:
        print("give a session id or --all", file=sys.stderr)
        return EXIT_USAGE
    # --all (None): the store's sessions, and those the audit log says it should hold
    ids = None if args.all else [resolve_id(store, args.id)]
    verdicts: list[SessionVerdict] = verify(store, ids, args.key)
    broken = unsigned = 0
    for verdict in verdicts:
        print(verdict)
        if not verdict.ok:
            broken += 1
        elif args.strict and not verdict.signed:
            unsigned += 1
    why = [f"{broken} altered" if broken else "", f"{unsigned} not signed yet (--strict)" if unsigned else ""]
    print(
        f"{len(verdicts)} session(s) checked, {broken + unsigned} failed"
        + (f" — {', '.join(w for w in why if w)}" if broken or unsigned else "")
    )
    return EXIT_FAIL if broken or unsigned else EXIT_OK


def _warn_unless_verified(store: Store, sid: str) -> bool:
    """Check the session as ``sessions verify`` does; if it does not verify, say so on stderr (before the
    session is shown, which may then be what someone edited) and return False."""
    [verdict] = verify(store, [sid])
    if verdict.ok:
        return True
    shown = printable(sid, keep="")
    problem = str(verdict).removeprefix(f"{shown}: ")
    print(
        f"lictor: WARNING: session {shown} does not verify ({problem}); what is shown may have been altered "
        f"(lictor sessions verify {shown})",
        file=sys.stderr,
    )
    return False


def cmd_export(args: argparse.Namespace) -> int:
    store = _store(args)
    sid = resolve_id(store, args.id)
    verified = _warn_unless_verified(store, sid)
    manifest_raw, lines = store.stream_raw(sid)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for line in lines:
                out.write(line.decode() + "\n")
            if manifest_raw is not None:
                out.write(manifest_raw.decode() + "\n")
        else:
            manifest = _manifest_body(manifest_raw)
            for text in asciicast_lines(manifest, iter_events(lines), title=f"lictor session {sid}"):
                out.write(text + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK if verified else EXIT_FAIL


def _manifest_body(raw: bytes | None) -> dict[str, Any] | None:
    """The manifest's body for the asciicast header; None when there is none that reads (an edited one was
    already named by the warning)."""
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    body = doc.get("manifest") if isinstance(doc, dict) else None
    return body if isinstance(body, dict) else None


def cmd_replay(args: argparse.Namespace) -> int:
    store = _store(args)
    sid = resolve_id(store, args.id)
    if args.speed <= 0:
        print("--speed must be positive", file=sys.stderr)
        return EXIT_USAGE
    verified = _warn_unless_verified(store, sid)
    _, lines = store.stream_raw(sid)
    try:
        replay(
            iter_events(lines),
            sys.stdout,
            speed=args.speed,
            wait=not args.no_wait,
            max_idle=parse_interval(args.max_idle, "--max-idle"),
            show_input=args.input,
            raw=args.raw,
        )
    except KeyboardInterrupt:
        return 130
    return EXIT_OK if verified else EXIT_FAIL


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except BrokenPipeError:
            raise  # the reader of our output went away (| head): the command line ends quietly
        except (RecordingError, ValueError, OSError) as exc:
            if isinstance(exc, ConfigError):
                raise
            print(f"lictor: {exc}", file=sys.stderr)
            return EXIT_FAIL

    return wrapped


def _where(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", help="gateway config (lictor.yaml); default ./lictor.yaml if present")
    sp.add_argument("--state-dir", help="the gateway's state directory (default: $LICTOR_STATE_DIR or ./state)")
    sp.add_argument("--dir", help="a local recordings directory (default: STATE/recordings)")
    sp.add_argument("--source", help="read from this configured sink (postgres or s3) instead of the local one")


def register(subparsers: Any) -> None:
    """Add ``sessions`` and ``replay`` to the ``lictor`` command line."""
    sessions = subparsers.add_parser("sessions", help="list, verify and export recorded sessions")
    sub = sessions.add_subparsers(dest="sessions_cmd", required=True)

    sp = sub.add_parser("list", help="recorded sessions, newest first")
    _where(sp)
    sp.add_argument("--sub", help="agent subject (glob)")
    sp.add_argument("--target", help="target name (glob)")
    sp.add_argument("--protocol", help="protocol (glob)")
    sp.add_argument("--since", help="active since: a duration ago (2h) or a time (2024-05-01T12:00)")
    sp.add_argument("--until", help="started before: a duration ago or a time")
    sp.add_argument("--decision", choices=["allow", "deny", "approve"], help="had at least one such decision")
    state = sp.add_mutually_exclusive_group()
    state.add_argument("--open", action="store_true", help="sessions still open")
    state.add_argument("--ended", action="store_true", help="ended sessions only")
    sp.add_argument("--limit", type=count_arg, help="the newest N sessions only")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=_run(cmd_list))

    sp = sub.add_parser("verify", help="check hash chains and manifest signatures; names the first bad event")
    _where(sp)
    sp.add_argument("id", nargs="?", help="session id (or a unique prefix)")
    sp.add_argument("--all", action="store_true", help="every recorded session")
    sp.add_argument("--key", help="the recording public key (default: STATE/recording.pub)")
    sp.add_argument("--strict", action="store_true", help="unsigned (open or undrained) sessions fail too")
    sp.set_defaults(func=_run(cmd_verify))

    sp = sub.add_parser("export", help="write a session as asciicast v2 or JSON lines")
    _where(sp)
    sp.add_argument("id", help="session id (or a unique prefix)")
    sp.add_argument(
        "--format", choices=["asciicast", "jsonl"], default="jsonl", help="default: jsonl, the stored events"
    )
    sp.add_argument("-o", "--output", help="file to write (default: stdout)")
    sp.set_defaults(func=_run(cmd_export))

    sp = subparsers.add_parser("replay", help="replay a recorded session in the terminal, with its timing")
    _where(sp)
    sp.add_argument("id", help="session id (or a unique prefix)")
    sp.add_argument("--speed", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    sp.add_argument("--no-wait", action="store_true", help="print everything at once")
    sp.add_argument("--max-idle", default="2s", help="cap pauses at this long (default 2s)")
    sp.add_argument("--input", action="store_true", help="also show terminal input (dimmed)")
    sp.add_argument(
        "--raw",
        action="store_true",
        help="terminal output exactly as recorded (full-screen programs of a raw shell); it drives your terminal",
    )
    sp.set_defaults(func=_run(cmd_replay))
