"""Running the gateway process: start addons, hot-reload rule packs, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from .addons import AddonManager, HookError
from .config import ConfigError, GatewayConfig
from .gateway import Gateway

__all__ = ["PolicyWatcher", "run_gateway"]

log = logging.getLogger("lictor")


class PolicyWatcher:
    """Watches rule-pack directories (not files: editors save by rename) and reloads on change.

    Events are debounced; the reload runs on the event loop (parse/validate/compile happen in a
    worker thread, the swap is one assignment on the loop), so requests never see half a policy.
    """

    def __init__(self, gateway: Gateway, loop: asyncio.AbstractEventLoop, debounce: float = 0.3) -> None:
        self.gateway = gateway
        self.loop = loop
        self.debounce = debounce
        self._observer: Any = None
        self._pending: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self.reloads = 0

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                src = str(event.src_path)
                dest = str(getattr(event, "dest_path", "") or "")
                if any(p.endswith((".yaml", ".yml")) for p in (src, dest)) or event.is_directory:
                    watcher.loop.call_soon_threadsafe(watcher.schedule)

        observer = Observer()
        dirs: set[Path] = set()
        for p in self.gateway.config.rulepacks:
            d = p if p.is_dir() else p.parent
            if d.exists() and d not in dirs:
                dirs.add(d)
                observer.schedule(Handler(), str(d), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def schedule(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self.loop.call_later(self.debounce, lambda: asyncio.ensure_future(self.reload()))

    async def reload(self) -> None:
        async with self._lock:
            gw = self.gateway
            old = gw.policy.version
            from .rulepacks import load_policy

            targets = {t.name: t.protocol for t in gw.config.targets.values()}
            result = await asyncio.to_thread(
                load_policy,
                gw.config.rulepacks,
                gw.addons.vocabularies,
                targets=targets,
                mask_key=gw._mask_key,
            )
            if result.policy is None:
                gw.policy_problems = [str(p) for p in result.errors]
                for problem in result.errors:
                    log.error("reload rejected, keeping policy %s: %s", old, problem)
                gw.audit_event(
                    "policy.rejected",
                    {"kept_version": old, "problems": gw.policy_problems[:50]},
                    fail_closed=False,
                )
                return
            if result.policy.version == old:
                return
            gw.policy = result.policy  # the swap: one assignment
            gw.policy_problems = []
            gw._mask_cache.clear()
            self.reloads += 1
            gw.audit_event(
                "policy.loaded",
                {"version": result.policy.version, "previous": old, "files": [str(f) for f in result.files]},
                fail_closed=False,
            )
            log.info("policy %s live (was %s)", result.policy.version, old)
            try:
                await gw.addons.trigger("policy_loaded", gw.policy)
            except HookError as exc:
                log.error("%s", exc)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)


async def run_gateway(config: GatewayConfig, manager: AddonManager, ready_file: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    loop = asyncio.get_running_loop()
    try:
        manager.set_options(dict(config.section("options")))
        _validate_targets(config, manager)
        gateway = Gateway(config, manager)
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except Exception as exc:
        log.error("gateway failed to start: %s", exc)
        await gateway.stop()
        return 1
    if gateway.policy.version == "empty" and gateway.policy_problems:
        log.error("no valid policy loaded; every request will be denied until the rule packs are fixed")
    watcher = PolicyWatcher(gateway, loop)
    watcher.start()
    gateway.audit_event(
        "gateway.start",
        {"policy": gateway.policy.version, "targets": sorted(config.targets)},
        fail_closed=False,
    )
    if ready_file:
        await asyncio.to_thread(Path(ready_file).write_text, "ready\n")
    log.info("lictor running (state %s)", config.state_dir)
    await stop.wait()
    log.info("stopping: no new connections; finishing in-flight requests")
    watcher.stop()
    await gateway.stop()
    return 0


def _validate_targets(config: GatewayConfig, manager: AddonManager) -> None:
    import jsonschema

    problems = []
    for target in config.targets.values():
        schema = manager.target_schemas.get(target.protocol)
        where = f"{target.loc}: " if target.loc else ""
        if schema is None:
            known = ", ".join(sorted(manager.target_schemas)) or "none"
            problems.append(
                f"{where}target {target.name!r}: no loaded addon serves protocol "
                f"{target.protocol!r} (protocols: {known})"
            )
            continue
        for error in jsonschema.Draft202012Validator(schema).iter_errors(dict(target.settings)):
            path = ".".join(map(str, error.absolute_path))
            problems.append(f"{where}target {target.name!r}{': ' + path if path else ''}: {error.message}")
    if problems:
        raise ConfigError("\n".join(problems))


def _thread_count() -> int:  # used by tests to check watchers are stopped
    return threading.active_count()
