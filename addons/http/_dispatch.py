"""Hook dispatch for the embedded mitmproxy, with the handlers of each hook looked up once.

mitmproxy's ``AddonManager.trigger_event`` walks the whole addon chain for every hook of every flow:
for each addon it starts a coroutine, enters a context manager, walks the addon's children and looks
the hook up by name, and it rebuilds the hook's argument list from ``dataclasses.fields`` each time.
A request through the gateway fires eight such events (four hooks, each followed by ``update``), over
five addons, and that bookkeeping cost more CPU than the gateway's policy decision.

:class:`HookDispatch` keeps mitmproxy's semantics and only drops the repeated lookups: the handlers of
a hook are collected per top-level addon once (again after any addon is added or removed), addons
without a handler are not visited, and an exception in a handler is logged exactly as mitmproxy's
``safecall`` logs it (the rest of that addon's handlers are skipped, the next addon still runs;
``AddonHalt`` stops the event, ``OptionsError`` propagates). Failing closed does not rely on any of
this: the gateway's own hooks catch their exceptions and deny, and ``FailClosedGate`` checks every
flow at the end of the chain.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, cut_traceback, traverse

log = logging.getLogger("mitmproxy.addonmanager")

Handlers = tuple[tuple[Callable[..., Any], ...], ...]

_FIELDS: dict[type, tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """``event.args()`` without asking ``dataclasses`` for the fields each time."""
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in dataclasses.fields(event))  # type: ignore[arg-type]
    return [getattr(event, name) for name in names]


class HookDispatch(AddonManager):
    """``AddonManager`` with per-hook handler lists, rebuilt whenever the chain changes."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._handlers: dict[str, Handlers | None] = {}

    def register(self, addon: Any) -> Any:
        try:
            return super().register(addon)
        finally:
            self._handlers.clear()

    def add(self, *addons: Any) -> None:
        try:
            super().add(*addons)
        finally:
            self._handlers.clear()

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)
        finally:
            self._handlers.clear()

    def _collect(self, name: str) -> Handlers | None:
        """The handlers of hook ``name`` per top-level addon, or None when an addon has an attribute of
        that name that is neither callable nor a module (mitmproxy's own path then raises its error)."""
        per_addon: list[tuple[Callable[..., Any], ...]] = []
        for top in self.chain:
            found: list[Callable[..., Any]] = []
            for addon in traverse([top]):
                func = getattr(addon, name, None)
                if not func:
                    continue
                if callable(func):
                    found.append(func)
                elif not isinstance(func, types.ModuleType):
                    return None
            if found:
                per_addon.append(tuple(found))
        return tuple(per_addon)

    def _handlers_of(self, name: str) -> Handlers | None:
        try:
            return self._handlers[name]
        except KeyError:
            found = self._handlers[name] = self._collect(name)
            return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self._handlers_of(event.name)
        if handlers is None:
            await super().trigger_event(event)
            return
        if not handlers:
            return
        args = hook_args(event)
        for funcs in handlers:
            try:
                for func in funcs:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                tb = cut_traceback(e.__traceback__, "trigger_event")
                log.error(f"Addon error: {e}", exc_info=(type(e), e, tb))

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._handlers_of(hooks.UpdateHook.name) == ():
            return  # no addon listens: skip building the update event
        message = hook_args(event)[0]
        if isinstance(message, flow.Flow):
            await self.trigger_event(hooks.UpdateHook([message]))


def install(master: Any) -> HookDispatch:
    """Give ``master`` a :class:`HookDispatch`; call before any addon is added."""
    if len(master.addons):
        raise RuntimeError("the hook dispatch must be installed before any addon is added")
    master.addons = HookDispatch(master)
    return master.addons  # type: ignore[no-any-return]
