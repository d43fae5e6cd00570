"""Running the gateway process: start addons, hot-reload rule packs, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ._yaml import Location, did_you_mean
from .addons import AddonManager, HookError, Loader, addon_name
from .audit import AuditError
from .config import ConfigError, GatewayConfig
from .gateway import Gateway, load_mask_key
from .rulepacks import LoadResult, Problem, discover
from .vocabulary import Vocabulary

__all__ = ["PolicyWatcher", "check_config", "run_gateway", "validate_targets"]

log = logging.getLogger("lictor")


def _empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


class PolicyWatcher:
    """Watches rule-pack directories (not files: editors save by rename) and reloads on change.

    Events are debounced; the reload runs on the event loop (parse/validate/compile happen in a
    worker thread, the swap is one assignment on the loop), so requests never see half a policy.

    Two things a directory watch alone misses are handled here:

    * A file still being written (``cat > pack.yaml``, a slow copy) may already parse as a smaller pack
      whose last rules, deny rules among them, are missing. Where the platform reports when a written file
      is closed (inotify), a reload waits until no pack file is open for writing (at most ``write_grace``).
    * A watch follows the directory it was set on: when the configured directory is renamed away, replaced
      (``mv new rulepacks``), re-created or is a symlink switched to another directory, its events stop.
      The configured paths are polled every ``poll_interval`` seconds; when what they name changes, the
      watches are set again and the packs reloaded.
    * A pack that is a symlink to a file in another directory (a shared baseline) changes where the link points,
      not in a watched directory: the directories such links lead to are watched too (not recursively), and the
      set of them is worked out again on every reload.
    """

    def __init__(
        self,
        gateway: Gateway,
        loop: asyncio.AbstractEventLoop,
        debounce: float = 0.3,
        poll_interval: float = 1.0,
        write_grace: float = 30.0,
    ) -> None:
        self.gateway = gateway
        self.loop = loop
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.write_grace = write_grace
        self._observer: Any = None
        self._pending: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._writing: dict[str, float] = {}  # pack files open for writing -> when first seen
        self._waited_for: set[str] = set()  # those of them a reload has waited for (and said so)
        self._roots: dict[Path, tuple[int, int]] = {}
        self._linked: frozenset[Path] = frozenset()  # directories outside the roots that pack symlinks lead to
        self._poller: asyncio.Task[None] | None = None
        self.reloads = 0

    def _watched_roots(self) -> dict[Path, tuple[int, int]]:
        """The directories to watch, each with the (device, inode) it names now."""
        roots: dict[Path, tuple[int, int]] = {}
        for p in self.gateway.config.rulepacks:
            d = p if p.is_dir() else p.parent
            try:
                st = d.stat()
            except OSError:
                continue
            roots.setdefault(d, (st.st_dev, st.st_ino))
        for d in self._linked:
            try:
                st = d.stat()
            except OSError:
                continue
            roots.setdefault(d, (st.st_dev, st.st_ino))
        return roots

    def _linked_dirs(self) -> frozenset[Path]:
        """The directories, outside the configured ones, of the files that pack symlinks lead to: an edit there
        changes a pack, and no watched directory reports it."""
        inside: list[Path] = []
        for p in self.gateway.config.rulepacks:
            with contextlib.suppress(OSError):
                inside.append((p if p.is_dir() else p.parent).resolve())
        linked: set[Path] = set()
        for f in discover(self.gateway.config.rulepacks):
            try:
                parent = f.resolve(strict=True).parent
            except (OSError, RuntimeError):  # a broken link or a loop: an error of the load itself
                continue
            if not any(parent.is_relative_to(d) for d in inside):
                linked.add(parent)
        return frozenset(linked)

    def start(self) -> None:
        try:
            self._linked = self._linked_dirs()
        except Exception:
            log.exception("finding the directories rule-pack symlinks lead to failed")
        self._start_observer()
        self._poller = self.loop.create_task(self._poll())

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self
        observer = Observer()
        try:
            from watchdog.observers.inotify import InotifyObserver

            reports_close = isinstance(observer, InotifyObserver)
        except ImportError:  # pragma: no cover - not Linux
            reports_close = False

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                src = str(event.src_path)
                dest = str(getattr(event, "dest_path", "") or "")
                if not (any(p.lower().endswith((".yaml", ".yml")) for p in (src, dest)) or event.is_directory):
                    return
                # A write (or a truncation) means the file is open for writing until it is closed. "created"
                # does only while the file is empty: a file renamed in from outside the watch (an atomic
                # deploy from /tmp) and the files of a directory that appeared (a ConfigMap's new version)
                # are reported as created too, whole, and their close is never seen.
                writing = (
                    reports_close
                    and not event.is_directory
                    and (event.event_type == "modified" or (event.event_type == "created" and _empty(src)))
                    and not os.path.islink(src)
                )
                watcher.loop.call_soon_threadsafe(watcher._file_event, src, dest, writing)

        roots = self._watched_roots()
        watched: set[Path] = set()
        for d in roots:
            # The directory a symlink names (`current -> releases/2`), not the link: watchdog watches a link itself
            # (IN_DONT_FOLLOW), which reports no edit of the packs behind it. A switch of the link is the poll's.
            try:
                where = d.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if where not in watched:
                watched.add(where)
                observer.schedule(Handler(), str(where), recursive=d not in self._linked)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._roots = roots

    def _file_event(self, src: str, dest: str, writing: bool) -> None:
        if writing:
            self._writing.setdefault(src, self.loop.time())
        else:
            self._writing.pop(src, None)
            if dest:
                self._writing.pop(dest, None)
        self.schedule()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                roots = await asyncio.to_thread(self._watched_roots)
                if roots != self._roots:
                    log.warning(
                        "rule-pack directories were renamed, replaced or re-created (%s); watching them again "
                        "and reloading",
                        ", ".join(str(d) for d in sorted(set(roots) | set(self._roots))),
                    )
                    self._stop_observer()
                    self._start_observer()
                    self.schedule()
            except Exception:
                log.exception("checking the rule-pack directories failed")

    def schedule(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self.loop.call_later(self.debounce, lambda: asyncio.ensure_future(self.reload()))

    async def reload(self) -> None:
        self._waited_for &= set(self._writing)
        if self._writing:
            oldest = min(self._writing.values())
            if self.loop.time() - oldest < self.write_grace:
                self.schedule()  # a pack file is still open for writing: it may be half written
                if new := sorted(set(self._writing) - self._waited_for):
                    # said once per file, so that an edit that does not go live at once is not taken for a lost one
                    log.info(
                        "rule-pack files open for writing (%s): the reload waits until they are closed (at most "
                        "%.0fs); policy %s stays live meanwhile",
                        ", ".join(new),
                        self.write_grace,
                        self.gateway.policy.version,
                    )
                    self._waited_for.update(new)
                return
            log.warning(
                "rule-pack files open for writing for over %.0fs (%s); loading them as they are",
                self.write_grace,
                ", ".join(sorted(self._writing)),
            )
            self._writing.clear()
        async with self._lock:
            gw = self.gateway
            try:
                result = await asyncio.to_thread(gw.compile_policy)
            except Exception as exc:
                # A load that fails in an unforeseen way is a rejected reload like any other: the live policy stays,
                # and the log, the audit and `lictor status` say why (the task's traceback alone said nothing there).
                log.exception("loading the rule packs failed")
                where = Location(str(gw.config.rulepacks[0]) if gw.config.rulepacks else "rulepacks", 1, 1)
                result = LoadResult(
                    None, [Problem(where, f"the rule packs could not be loaded ({type(exc).__name__}: {exc})")]
                )
            try:
                linked = await asyncio.to_thread(self._linked_dirs)
            except Exception:
                log.exception("finding the directories rule-pack symlinks lead to failed")
                linked = self._linked
            if linked != self._linked:
                # a pack now links to a file elsewhere (or no longer does): watch where the links lead
                self._linked = linked
                self._stop_observer()
                self._start_observer()
                self.schedule()  # an edit while no watch was set is not lost
            if not gw.apply_policy(result):
                return
            self.reloads += 1
            try:
                await gw.addons.trigger("policy_loaded", gw.policy)
            except HookError as exc:
                log.error("%s", exc)

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._stop_observer()


class BrokenAddon:
    """Stands in for an addon whose file failed to reload: it denies the requests it would have seen.

    Those are the requests of the protocols it named (its ``protocols``), or every request when it
    named none: none of them passes unchecked. The agent is told which addon is broken; the error
    itself (a file name, a Python exception) goes to the log and the audit, for the operators.

    It keeps the rule vocabularies the broken addon declared: the rule packs go on compiling, so an
    edit to them (a revocation for another protocol) still goes live while the addon is broken.
    """

    def __init__(
        self,
        name: str,
        spec: str,
        error: str,
        protocols: tuple[str, ...] | None = None,
        vocabularies: tuple[Vocabulary, ...] = (),
    ) -> None:
        self.name = name
        self.spec = spec
        self.error = error
        self.vocabularies = vocabularies
        if protocols is not None:
            self.protocols = protocols

    def load(self, loader: Loader) -> None:
        for vocabulary in self.vocabularies:
            loader.add_vocabulary(vocabulary)

    def request(self, flow: Any) -> None:
        flow.deny(
            f"the addon {self.name!r} failed to reload; requests are denied until it is fixed "
            "(the gateway's log and audit say why)",
            "lictor:addon-broken",
        )


class AddonWatcher:
    """Reloads addons loaded from files when the file changes (mitmproxy's script reloading, but
    a failed reload denies instead of silently dropping the addon's hooks)."""

    def __init__(self, gateway: Gateway, loop: asyncio.AbstractEventLoop, specs: dict[str, list[Any]]) -> None:
        self.gateway = gateway
        self.loop = loop
        self.specs = specs  # spec -> addon instances currently loaded for it
        self._observer: Any = None
        self._mtimes: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def _path(self, spec: str) -> Path:
        p = Path(spec)
        if not p.is_absolute() and self.gateway.config.path is not None:
            p = self.gateway.config.path.parent / p
        return p

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        files = {str(self._path(s).resolve()): s for s in self.specs if s.endswith(".py")}
        if not files:
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                for p in (str(event.src_path), str(getattr(event, "dest_path", "") or "")):
                    spec = files.get(p)
                    if spec is not None and event.event_type not in ("opened", "closed_no_write"):
                        watcher.loop.call_soon_threadsafe(watcher.schedule, spec)

        observer = Observer()
        for d in {str(Path(p).parent) for p in files}:
            observer.schedule(Handler(), d, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def schedule(self, spec: str) -> None:
        handle = self._pending.pop(spec, None)
        if handle is not None:
            handle.cancel()
        self._pending[spec] = self.loop.call_later(0.3, lambda: asyncio.ensure_future(self.reload(spec)))

    async def _done(self, addon: Any, when: str) -> None:
        from .addons import addon_name

        try:
            done = getattr(addon, "done", None)
            if done is not None:
                result = done(self.gateway)
                if asyncio.iscoroutine(result):
                    await result
        except Exception:
            log.exception("addon %s failed while stopping %s", addon_name(addon), when)

    async def reload(self, spec: str) -> None:
        from .addons import addon_name, load_addon_spec

        async with self._lock:
            gw = self.gateway
            old = self.specs.get(spec, [])
            manager = gw.addons
            kept = tuple(  # for the stand-ins, should the reload fail
                v for p, v in manager.vocabularies.items() if any(manager.vocabulary_owner[p] is a for a in old)
            )
            for addon in old:
                await self._done(addon, "for reload")
                gw.addons.remove(addon)
            names = [addon_name(a) for a in old] or [Path(spec).stem]
            new: list[Any] = []
            started_addons: list[Any] = []  # the new ones whose `running` was called (they may hold listeners)
            try:
                new = load_addon_spec(spec, gw.config.path.parent if gw.config.path else None)
                gw.addons.add(*new)
                for addon in new:
                    configure = getattr(addon, "configure", None)
                    if configure is not None:
                        configure(gw)
                # The live policy's rules were compiled with the old vocabulary and read the request
                # attributes the old code set: compile the packs again with the new one, or deny.
                result = gw.compile_policy()
                if result.policy is None:
                    problems = "; ".join(str(p) for p in result.errors[:5])
                    raise ConfigError(f"the rule packs do not load with the reloaded addon: {problems}")
                if gw.apply_policy(result, force=True):
                    try:
                        await gw.addons.trigger("policy_loaded", gw.policy)
                    except HookError as exc:
                        log.error("%s", exc)
                for addon in new:  # every addon of the file starts again, not only the last one
                    running = getattr(addon, "running", None)
                    if running is not None:
                        started_addons.append(addon)
                        started = running(gw)
                        if asyncio.iscoroutine(started):
                            await started
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.error("addon file %s failed to reload; its requests are denied: %s", spec, error)
                # What the new code started before it failed (a listener) is stopped: it would serve agents
                # with code that is not loaded, and keep its port from the fixed file's next reload.
                for addon in started_addons:
                    await self._done(addon, "after a failed reload")
                for addon in list(gw.addons.addons):
                    if addon_name(addon) in names or any(addon is n for n in new):
                        gw.addons.remove(addon)
                scopes = [getattr(a, "protocols", None) for a in old]
                # one stand-in for every name; it sees what all of them saw (every protocol if one saw all)
                scope = None if not scopes or None in scopes else tuple(sorted({p for s in scopes for p in s or ()}))
                kept = tuple(v for v in kept if v.protocol not in gw.addons.vocabularies)
                new = [BrokenAddon(n, spec, error, scope, kept if i == 0 else ()) for i, n in enumerate(names)]
                gw.addons.add(*new)
                gw.audit_event("addon.reload_failed", {"spec": spec, "error": error}, fail_closed=False)
            else:
                log.info("addon file %s reloaded", spec)
                gw.audit_event("addon.reloaded", {"spec": spec}, fail_closed=False)
            self.specs[spec] = new

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)


async def run_gateway(
    config: GatewayConfig,
    manager: AddonManager,
    ready_file: str | None = None,
    addon_specs: dict[str, list[Any]] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    loop = asyncio.get_running_loop()
    try:
        apply_options(config, manager)
        validate_targets(config, manager)
        gateway = Gateway(config, manager)
    except (ConfigError, ValueError) as exc:
        log.error("%s", located(config, exc))
        return 1
    except (OSError, AuditError) as exc:  # a state directory that cannot be made, or one another gateway holds
        log.error("gateway failed to start: %s", exc)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except Exception as exc:
        log.error("gateway failed to start: %s", located(config, exc))
        await gateway.stop()
        return 1
    if gateway.policy.version == "empty" and gateway.policy_problems:
        log.error("no valid policy loaded; every request will be denied until the rule packs are fixed")
    watcher = PolicyWatcher(gateway, loop)
    watcher.start()
    addon_watcher = AddonWatcher(gateway, loop, dict(addon_specs or {}))
    addon_watcher.start()
    gateway.audit_event(
        "gateway.start",
        {"policy": gateway.policy.version, "targets": sorted(config.targets)},
        fail_closed=False,
    )
    status = asyncio.create_task(_publish_status(gateway, config))
    if ready_file:
        await asyncio.to_thread(Path(ready_file).write_text, "ready\n")
    log.info("lictor running (state %s)", config.state_dir)
    await stop.wait()
    log.info("stopping: no new connections; finishing in-flight requests")
    status.cancel()
    watcher.stop()
    addon_watcher.stop()
    await gateway.stop()
    await asyncio.to_thread(_write_status, config, {**status_document(gateway, config), "running": False})
    return 0


STATUS_FILE = "status.json"
STATUS_INTERVAL = 5.0
"""How often a running gateway rewrites ``STATE/status.json`` (``lictor status`` reads it)."""


def status_document(gateway: Gateway, config: GatewayConfig) -> dict[str, Any]:
    """What ``lictor status`` shows: the process, the live policy and why a reload was rejected, the
    listeners, the open sessions and the recording spool."""
    spool = getattr(gateway.recordings, "spool", None)
    return {
        "running": True,
        "pid": os.getpid(),
        "started_at": gateway.started,
        "updated_at": time.time(),
        "policy": {
            "version": gateway.policy.version,
            "rules": len(gateway.policy.rules),
            "rejected": list(gateway.policy_problems[:20]),
        },
        "targets": [
            {"name": t.name, "protocol": t.protocol, "listen": str(t.get("listen", ""))}
            for t in config.targets.values()
        ],
        "sessions": len(gateway.sessions),
        "spool_bytes": getattr(spool, "total_bytes", None),
        "recordings": _recordings_status(gateway),
    }


def _recordings_status(gateway: Gateway) -> dict[str, Any] | None:
    """The spool's last record and whether it is broken, and each sink's committed position and health."""
    status = getattr(gateway.recordings, "status", None)
    if status is None:
        return None
    doc = status()
    spool = doc.get("spool") or {}
    return {
        "written": spool.get("written"),
        "broken": bool(spool.get("broken")),
        "sinks": [
            {k: sink.get(k) for k in ("name", "committed", "healthy", "last_error", "failures")}
            for sink in doc.get("sinks") or []
        ],
    }


def _write_status(config: GatewayConfig, doc: dict[str, Any]) -> None:
    path = Path(config.state_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)  # readers see the old document or the new one


async def _publish_status(gateway: Gateway, config: GatewayConfig) -> None:
    """Rewrite the status every :data:`STATUS_INTERVAL`, and at once when the policy changes or a reload
    is rejected (what someone who just edited a pack wants to see)."""
    shown: tuple[str, list[str]] | None = None
    written = 0.0
    while True:
        now = (gateway.policy.version, gateway.policy_problems)
        if now != shown or time.monotonic() - written >= STATUS_INTERVAL:
            try:
                await asyncio.to_thread(_write_status, config, status_document(gateway, config))
            except Exception as exc:  # status is for operators: never a reason to stop the gateway
                log.warning("could not write %s: %s", STATUS_FILE, exc)
            shown, written = now, time.monotonic()
        await asyncio.sleep(0.5)


def validate_targets(config: GatewayConfig, manager: AddonManager) -> None:
    """Check every target against the schema its protocol's addon declared; ConfigError lists the problems."""
    import jsonschema

    problems = []
    for target in config.targets.values():
        schema = manager.target_schemas.get(target.protocol)
        if schema is None:
            owner = manager.vocabulary_owner.get(target.protocol)
            if owner is not None:
                # the addon is loaded: saying that none serves the protocol sent its author looking elsewhere
                problems.append(
                    f"{target.where}: addon {addon_name(owner)!r} gives the vocabulary of protocol "
                    f"{target.protocol!r} but no target schema (loader.add_target_schema in its load hook)"
                )
                continue
            known = ", ".join(sorted(manager.target_schemas)) or "none"
            problems.append(f"{target.where}: no loaded addon serves protocol {target.protocol!r} (protocols: {known})")
            continue
        for error in jsonschema.Draft202012Validator(schema).iter_errors(dict(target.settings)):
            path = ".".join(map(str, error.absolute_path))
            at = ["targets", target.name, *error.absolute_path]
            if config.doc is None:  # a config made in code: no positions
                problems.append(f"{target.where}{': ' + path if path else ''}: {error.message}")
                continue
            if error.validator == "additionalProperties" and isinstance(error.instance, dict):
                # each unknown key where it is written (the target's line was a guess in a long entry)
                declared = set(error.schema.get("properties", {}))
                patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
                for key in error.instance:
                    if key not in declared and not any(p.search(key) for p in patterns):
                        problems.append(
                            f"{config.where_key(*at, key)}: target {target.name!r}"
                            f"{': ' + path if path else ''}: unknown key {key!r}{did_you_mean(key, declared)}"
                        )
                continue
            at_path = f": {path}" if path else ""
            problems.append(f"{config.where(*at)}: target {target.name!r}{at_path}: {error.message}")
    if problems:
        raise ConfigError("\n".join(problems))


def apply_options(config: GatewayConfig, manager: AddonManager) -> None:
    """Set the addons' options from ``options:``; ConfigError names each key that is unknown or of the wrong
    type, with its position."""
    problems = []
    section = config.section("options")
    for key, value in section.items():
        try:
            manager.set_options({key: value})
        except ValueError as exc:
            problems.append(f"{config.where('options', key)}: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))


# FILE:LINE:COL, or the absolute path of a file the gateway reads besides lictor.yaml (a key in the state)
_LOCATED = re.compile(r"^(\S.*?:\d+:\d+|/\S*): ")
_SECTION_PATH = re.compile(r"^(approvals|recordings|identity|masking|audit|log)((?:\.[A-Za-z0-9_-]+)*)")


def located(config: GatewayConfig, exc: BaseException, section: tuple[str, ...] = ()) -> str:
    """The lines of a start-up error, each with the ``FILE:LINE:COL`` it is about: kept where the line has
    one, else that of the config path it begins with (``approvals.listen ...``), else that of the section
    the failing step reads (a configure hook: ``targets``)."""
    text = str(exc)
    if not isinstance(exc, (ValueError, HookError)):
        return text
    if isinstance(exc, HookError) and exc.hook != "configure":
        return text  # a listener that cannot bind, say: not a problem of the file
    if isinstance(exc, HookError):
        section = section or ("targets",)
        text = f"addon {exc.addon!r} refused the config: {exc.original}"
        if all(_LOCATED.match(line) for line in str(exc.original).splitlines() if line.strip()):
            text = str(exc.original)  # each line says where and what; the addon's name adds nothing
    lines = []
    for line in text.splitlines() or [text]:
        if _LOCATED.match(line):
            lines.append(line)
            continue
        m = _SECTION_PATH.match(line)
        # an option the config sets, named by an addon that refuses its value (http_idle_timeout: -5)
        named = [(h.start(), k) for k in config.section("options") if (h := re.search(rf"\b{re.escape(k)}\b", line))]
        option = min(named)[1] if named else None
        if m:
            parts: list[str | int] = [m.group(1)]
            parts += [int(p) if p.isdigit() else p for p in m.group(2).split(".") if p]
            lines.append(f"{config.where(*parts)}: {line}")
        elif option is not None:
            lines.append(f"{config.where('options', option)}: {line}")
        else:
            lines.append(f"{config.where(*section)}: {line}")
    return "\n".join(lines)


class _CheckGateway(Gateway):
    """What the addons' ``configure`` hooks see under ``lictor check -c``: the real config, addons and
    identity issuers, but a throwaway state directory (keys and certificates an addon makes go there) and
    no audit log, recorder or approval broker: nothing is opened, started or written where the gateway
    keeps its state."""

    checking = True

    def __init__(self, config: GatewayConfig, addons: AddonManager, state_dir: Path) -> None:
        from .identity import LocalIssuer
        from .policy import Policy

        self.config = config
        self.state_dir = state_dir
        self.addons = addons
        self.policy = Policy.empty(addons.vocabularies)
        self.policy_problems = []
        self.sessions = {}
        self.approvals = None
        # the gateway's issuer key, read if it is there (not made: that is for the gateway)
        self.issuer = LocalIssuer(config.state_dir if (config.state_dir / "issuer.key").exists() else state_dir)
        self.verifier = self._make_verifier()
        self._bursts = {}
        self.started = time.time()

    def audit_event(self, kind: str, event: Any, *, fail_closed: bool = True) -> None:
        pass


def check_config(config: GatewayConfig, manager: AddonManager) -> None:
    """What ``lictor run`` checks of ``config`` before it listens, through the same code, without starting
    anything, connecting anywhere or writing to the state directory: the addons' options, every target
    against its protocol's schema and then its addon's ``configure`` hook, ``recordings:``, ``approvals:``
    and the identity issuers (key files, algorithms). Raises ConfigError with every problem found, each
    ``FILE:LINE:COL: ...``."""
    import tempfile

    from .approvals import ApprovalBroker
    from .recorder import RecordingsConfig

    problems: list[str] = []

    def step(fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
        except (ConfigError, ValueError, OSError, HookError) as exc:
            problems.append(located(config, exc))
            return False
        return True

    options_ok = step(apply_options, config, manager)
    targets_ok = step(validate_targets, config, manager)
    step(RecordingsConfig.from_gateway_config, config)
    step(ApprovalBroker.check_config, config.section("approvals"), config.state_dir, config.resolve)
    step(lambda: load_mask_key(config, create=False))
    with tempfile.TemporaryDirectory(prefix="lictor-check-") as tmp:
        dry: list[_CheckGateway] = []
        if step(lambda: dry.append(_CheckGateway(config, manager, Path(tmp)))) and options_ok and targets_ok:
            # configure hooks read targets their schemas passed, and the options as set
            step(manager.trigger_sync, "configure", dry[0])
    if problems:
        raise ConfigError("\n".join(problems))
