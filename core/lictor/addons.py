"""The addon framework: plain classes with hook methods, called through one manager.

An addon is any object. The manager calls the methods it has, named after the hooks:

==================  ===========================================================================
``load(loader)``    declare options, the rule vocabulary and the target schema of a protocol
``configure(gw)``   validate the gateway config for this addon; raise to refuse it
``running(gw)``     (async) start listeners
``done(gw)``        (async) stop accepting, finish or deny in-flight work
``policy_loaded``   ``(policy)`` a new policy went live
``session_start``   ``(session)`` an agent connected and authenticated
``request``         ``(flow)`` before the policy decides; may ``flow.deny(...)``
``decision``        ``(flow)`` after the policy decided; may only tighten (``flow.deny``)
``session_end``     ``(session)`` the connection ended
==================  ===========================================================================

An addon that inspects only some protocols says so with a ``protocols`` attribute (a tuple of
protocol names): its ``request`` and ``decision`` hooks then run only for requests of those
protocols (the other requests do not pay for them). Without it they run for every request.

Unlike mitmproxy's ``safecall``, which logs and swallows an addon's exception and lets the flow
continue, this manager re-raises every hook failure as :class:`HookError`; the gateway turns a
failure during a request into an audited denial (fail closed). An async ``request`` or
``decision`` hook that has not returned after :attr:`AddonManager.hook_timeout` seconds has failed
too: the request is denied, not left waiting for ever without a decision or an audit event.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import reprlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .vocabulary import Vocabulary

__all__ = ["AddonManager", "HookError", "Loader", "Option", "load_addon_spec"]

log = logging.getLogger("lictor.addons")

HOOKS = (
    "load",
    "configure",
    "running",
    "done",
    "policy_loaded",
    "session_start",
    "request",
    "decision",
    "session_end",
)

# Hooks whose only way to change a request is ``flow.deny``: a value they return (``False``, a
# ``Decision``) would otherwise be dropped and the request allowed as if the hook had agreed.
_FLOW_HOOKS = frozenset({"request", "decision"})


def _check_returned(hook: str, result: Any) -> None:
    if result is not None and hook in _FLOW_HOOKS:
        raise TypeError(
            f"hook {hook!r} returned {reprlib.repr(result)}; "
            "a hook denies with flow.deny(message, rule_id) and returns None"
        )


class HookError(RuntimeError):
    """An addon's hook raised; ``addon`` and ``hook`` say which."""

    def __init__(self, addon: str, hook: str, exc: BaseException) -> None:
        super().__init__(f"addon {addon!r} failed in hook {hook!r}: {type(exc).__name__}: {exc}")
        self.addon = addon
        self.hook = hook
        self.original = exc


@dataclass
class Option:
    name: str
    type: type
    default: Any
    help: str
    value: Any = None


def _option_value(name: str, typespec: type, value: Any) -> Any:
    """``value`` for an option of ``typespec``, as YAML gives it: ``5`` is a fine float (``5.0``), but
    ``true`` is no number (``bool`` is an ``int`` to Python: ``http_idle_timeout: true`` was one second)."""
    if isinstance(value, bool) and typespec is not bool:
        raise ValueError(f"option {name!r} must be {typespec.__name__}, got bool")
    if typespec is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typespec):
        raise ValueError(f"option {name!r} must be {typespec.__name__}, got {type(value).__name__}")
    return value


def addon_name(addon: Any) -> str:
    return str(getattr(addon, "name", None) or type(addon).__name__)


class Loader:
    """Handed to ``load(loader)``: what an addon declares about itself."""

    def __init__(self, manager: AddonManager, addon: Any) -> None:
        self._manager = manager
        self._addon = addon

    def add_option(self, name: str, typespec: type, default: Any, help: str) -> None:
        """Declare an option, settable under ``options:`` in the gateway config."""
        manager = self._manager
        if name in manager.options:
            raise ValueError(f"option {name!r} declared twice")
        option = Option(name, typespec, default, help, default)
        if name in manager.configured_options:  # a reloaded addon gets the value the config set
            option.value = _option_value(name, typespec, manager.configured_options[name])
        manager.options[name] = option
        manager.option_owner[name] = self._addon

    def add_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Teach rule packs the ``when:`` fields of a protocol."""
        existing = self._manager.vocabularies.get(vocabulary.protocol)
        if existing is not None and existing is not vocabulary:
            owner = addon_name(self._manager.vocabulary_owner.get(vocabulary.protocol))
            raise ValueError(f"protocol {vocabulary.protocol!r} already has a vocabulary (from addon {owner!r})")
        self._manager.vocabularies[vocabulary.protocol] = vocabulary
        self._manager.vocabulary_owner[vocabulary.protocol] = self._addon

    def add_target_schema(self, protocol: str, schema: Mapping[str, Any]) -> None:
        """The JSON Schema of this protocol's ``targets:`` entries in the gateway config."""
        owner = self._manager.target_schema_owner.get(protocol)
        if owner is not None and owner is not self._addon:
            raise ValueError(f"protocol {protocol!r} already has a target schema (from addon {addon_name(owner)!r})")
        import jsonschema

        try:
            # checked here, where the addon is named: at start-up a broken schema was a traceback
            jsonschema.Draft202012Validator.check_schema(dict(schema))
        except jsonschema.SchemaError as exc:
            at = "/".join(map(str, exc.absolute_path)) or "the top"
            problem = f"the target schema of protocol {protocol!r} is not a JSON Schema: {exc.message} (at {at})"
            raise ValueError(problem) from None
        self._manager.target_schemas[protocol] = dict(schema)
        self._manager.target_schema_owner[protocol] = self._addon


class AddonManager:
    """Holds the addons in order and calls their hooks."""

    hook_timeout: float = 30.0
    """Seconds an async ``request`` or ``decision`` hook may take before the request is denied."""

    def __init__(self) -> None:
        self.addons: list[Any] = []
        self.options: dict[str, Option] = {}
        self.option_owner: dict[str, Any] = {}
        self.configured_options: dict[str, Any] = {}  # what set_options was given (kept for reloads)
        self.vocabularies: dict[str, Vocabulary] = {}
        self.vocabulary_owner: dict[str, Any] = {}
        self.target_schemas: dict[str, dict[str, Any]] = {}
        self.target_schema_owner: dict[str, Any] = {}
        self._hooks: dict[str, list[tuple[str, Callable[..., Any]]]] = {}
        self._for_protocol: dict[tuple[str, str], list[tuple[str, Callable[..., Any]]]] = {}

    def add(self, *addons: Any) -> None:
        """Register addons and call their ``load`` hook (errors propagate: a broken addon stops start-up)."""
        for addon in addons:
            name = addon_name(addon)
            if any(addon_name(a) == name for a in self.addons):
                raise ValueError(f"an addon named {name!r} is already loaded")
            wanted = getattr(addon, "protocols", None)
            if wanted is not None and (
                isinstance(wanted, (str, bytes)) or not all(isinstance(p, str) and p for p in wanted)
            ):
                # a plain string would be matched by substring, and a guard meant for "redis" run for "re"
                raise ValueError(f"addon {name!r}: protocols must be a tuple of protocol names, got {wanted!r}")
            for hook in ("request", "decision"):
                if wanted is None and inspect.iscoroutinefunction(getattr(addon, hook, None)):
                    # PostgreSQL and SSH decide on the synchronous path (Session.decide_now), where a
                    # coroutine cannot run: every one of their requests would be denied at run time.
                    raise ValueError(
                        f"addon {name!r}: an async {hook!r} hook must name the protocols it inspects "
                        f"(protocols = (...)); one that sees every protocol must be a plain function, "
                        f"because some protocols decide synchronously"
                    )
            self.addons.append(addon)
            load = getattr(addon, "load", None)
            if load is not None:
                try:
                    result = load(Loader(self, addon))
                    if inspect.isawaitable(result):
                        result.close()  # type: ignore[attr-defined]
                        # never run: the addon would be loaded without what it meant to declare
                        raise TypeError("hook 'load' must be synchronous")
                except Exception as exc:
                    self.remove(addon)
                    raise HookError(name, "load", exc) from exc
        self._rebuild()

    def remove(self, addon: Any) -> None:
        self.addons.remove(addon)
        for name, owner in list(self.option_owner.items()):
            if owner is addon:  # a reloaded addon declares its options again
                del self.option_owner[name]
                del self.options[name]
        for proto, owner in list(self.vocabulary_owner.items()):
            if owner is addon:
                del self.vocabulary_owner[proto]
                del self.vocabularies[proto]
        for proto, owner in list(self.target_schema_owner.items()):
            if owner is addon:
                del self.target_schema_owner[proto]
                del self.target_schemas[proto]
        self._rebuild()

    def get(self, name: str) -> Any | None:
        for a in self.addons:
            if addon_name(a) == name:
                return a
        return None

    def _rebuild(self) -> None:
        self._for_protocol = {}
        self._hooks = {}
        for hook in HOOKS:
            entries = []
            for addon in self.addons:
                fn = getattr(addon, hook, None)
                if callable(fn):
                    entries.append((addon_name(addon), fn))
            self._hooks[hook] = entries

    def set_options(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            opt = self.options.get(key)
            if opt is None:
                known = ", ".join(sorted(self.options)) or "none"
                raise ValueError(f"unknown option {key!r} (declared options: {known})")
            opt.value = _option_value(key, opt.type, value)
            self.configured_options[key] = value

    def option(self, name: str) -> Any:
        return self.options[name].value

    async def trigger(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every addon in order; the first failure raises HookError."""
        await self._run(hook, self._hooks.get(hook, ()), args)

    def trigger_sync(self, hook: str, *args: Any) -> None:
        """Call a synchronous hook on every addon; an async implementation is an error."""
        self._run_sync(hook, self._hooks.get(hook, ()), args)

    def hooks_for(self, hook: str, protocol: str) -> list[tuple[str, Callable[..., Any]]]:
        """The ``hook`` entries that apply to requests of ``protocol`` (see ``protocols`` above)."""
        key = (hook, protocol)
        entries = self._for_protocol.get(key)
        if entries is None:
            entries = []
            for name, fn in self._hooks.get(hook, ()):
                wanted = getattr(getattr(fn, "__self__", None), "protocols", None)
                if wanted is None or protocol in wanted:
                    entries.append((name, fn))
            self._for_protocol[key] = entries
        return entries

    async def trigger_for(self, hook: str, protocol: str, *args: Any) -> None:
        """:meth:`trigger` for the addons that inspect ``protocol``, each bounded by :attr:`hook_timeout`."""
        await self._run(hook, self.hooks_for(hook, protocol), args, self.hook_timeout)

    def trigger_sync_for(self, hook: str, protocol: str, *args: Any) -> None:
        """:meth:`trigger_sync` for the addons that inspect ``protocol``."""
        self._run_sync(hook, self.hooks_for(hook, protocol), args)

    @staticmethod
    async def _run(
        hook: str,
        entries: Iterable[tuple[str, Callable[..., Any]]],
        args: tuple[Any, ...],
        seconds: float | None = None,
    ) -> None:
        for name, fn in entries:
            try:
                result = fn(*args)
                if result is not None and inspect.isawaitable(result):
                    if seconds is None:
                        result = await result
                    else:
                        deadline = asyncio.timeout(seconds)
                        try:
                            async with deadline:
                                result = await result
                        except TimeoutError:
                            if not deadline.expired():
                                raise
                            raise TimeoutError(f"it did not return within {seconds:g} s") from None
                _check_returned(hook, result)
            except HookError:
                raise
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the caller is being cancelled (an agent that went away): not the addon's failure
                raise HookError(name, hook, exc) from exc  # something the hook awaited was cancelled
            except (Exception, SystemExit) as exc:  # sys.exit() in a hook would stop the whole gateway
                raise HookError(name, hook, exc) from exc

    @staticmethod
    def _run_sync(hook: str, entries: Iterable[tuple[str, Callable[..., Any]]], args: tuple[Any, ...]) -> None:
        for name, fn in entries:
            try:
                result = fn(*args)
                if result is not None and inspect.isawaitable(result):
                    result.close()  # type: ignore[attr-defined]
                    raise TypeError(f"hook {hook!r} must be synchronous")
                _check_returned(hook, result)
            except (Exception, SystemExit) as exc:
                raise HookError(name, hook, exc) from exc


def load_addon_spec(spec: str, base: Path | None = None) -> list[Any]:
    """Instantiate the addons named by ``spec``: a module path (``pkg.mod``) or a ``.py`` file.

    The module provides ``addons = [...]`` (mitmproxy's convention) or a single ``addon``.
    """
    module: ModuleType
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.exists():
            raise FileNotFoundError(f"addon file {path} does not exist")
        mod_name = f"lictor_user_addon_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load addon file {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    else:
        module = importlib.import_module(spec)
    found: Iterable[Any]
    if hasattr(module, "addons"):
        found = module.addons
        if not isinstance(found, (list, tuple)):
            raise TypeError(f"{spec}: `addons` must be a list of addon objects, got {type(found).__name__}")
        where = "`addons`"
    elif hasattr(module, "addon"):
        if isinstance(module.addon, (list, tuple)):
            raise TypeError(f"{spec}: `addon` is one addon object; name several with `addons = [...]`")
        found = [module.addon]
        where = "`addon`"
    else:
        raise ImportError(f"{spec}: defines neither `addons = [...]` nor `addon`")
    for addon in found:
        # A class, a list or a module has no hooks of its own: taken as an addon, it loaded without
        # error and declared nothing, and the config then failed on "no loaded addon serves protocol".
        if isinstance(addon, type):
            raise TypeError(f"{spec}: {where} holds the class {addon.__name__}; give an instance: {addon.__name__}()")
        if isinstance(addon, (list, tuple, set, dict, str, bytes, ModuleType)) or addon is None:
            raise TypeError(f"{spec}: {where} holds {type(addon).__name__} {reprlib.repr(addon)}, not an addon object")
    return list(found)
