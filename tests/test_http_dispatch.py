"""The embedded mitmproxy's hook dispatch: the same semantics as mitmproxy's own, with handlers looked up once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from addons.http._dispatch import HookDispatch, install


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}.request")


class Failing(Recorder):
    def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}.request")
        raise ValueError("boom")


class Halting(Recorder):
    def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}.request")
        raise exceptions.AddonHalt()


class Async(Recorder):
    async def request(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.request")


class Parent(Recorder):
    def __init__(self, name: str, calls: list[str], children: list[Any]) -> None:
        super().__init__(name, calls)
        self.addons = children


class Updates(Recorder):
    def update(self, flows: list[Any]) -> None:
        self.calls.append(f"{self.name}.update:{len(flows)}")


def _master() -> tuple[Master, HookDispatch]:
    master = Master(Options(), event_loop=asyncio.get_running_loop())
    return master, install(master)


async def _request(dispatch: HookDispatch) -> None:
    await dispatch.handle_lifecycle(HttpRequestHook(tflow.tflow()))


async def test_handlers_run_in_chain_order_with_children_and_async() -> None:
    calls: list[str] = []
    _, dispatch = _master()
    dispatch.add(Recorder("a", calls), Parent("p", calls, [Async("child", calls)]), Recorder("b", calls))
    await _request(dispatch)
    assert calls == ["a.request", "p.request", "child.request", "b.request"]


async def test_an_addon_error_is_logged_and_the_next_addon_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy's ``safecall``: the failing addon's remaining handlers are skipped, the chain goes on."""
    calls: list[str] = []
    _, dispatch = _master()
    dispatch.add(Parent("p", calls, [Failing("bad", calls), Recorder("sibling", calls)]), Recorder("next", calls))
    with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
        await _request(dispatch)
    assert calls == ["p.request", "bad.request", "next.request"]
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)


async def test_addon_halt_stops_the_event() -> None:
    calls: list[str] = []
    _, dispatch = _master()
    dispatch.add(Halting("halt", calls), Recorder("after", calls))
    await _request(dispatch)
    assert calls == ["halt.request"]


async def test_options_error_propagates() -> None:
    class Bad(Recorder):
        def request(self, flow: http.HTTPFlow) -> None:
            raise exceptions.OptionsError("bad option")

    _, dispatch = _master()
    dispatch.add(Bad("bad", []))
    with pytest.raises(exceptions.OptionsError):
        await _request(dispatch)


async def test_handlers_are_looked_up_again_after_the_chain_changes() -> None:
    calls: list[str] = []
    _, dispatch = _master()
    first = Recorder("first", calls)
    dispatch.add(first)
    await _request(dispatch)
    dispatch.add(Recorder("second", calls))
    await _request(dispatch)
    dispatch.remove(first)
    await _request(dispatch)
    assert calls == ["first.request", "first.request", "second.request", "second.request"]


async def test_update_follows_a_flow_hook_only_when_someone_listens() -> None:
    calls: list[str] = []
    _, dispatch = _master()
    dispatch.add(Recorder("a", calls))
    await _request(dispatch)
    assert calls == ["a.request"]
    dispatch.add(Updates("u", calls))
    await _request(dispatch)
    assert calls == ["a.request", "a.request", "u.request", "u.update:1"]


async def test_a_hook_attribute_that_is_not_callable_is_mitmproxys_error(caplog: pytest.LogCaptureFixture) -> None:
    class NotCallable:
        request = 42

    calls: list[str] = []
    _, dispatch = _master()
    dispatch.add(NotCallable(), Recorder("after", calls))
    with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
        await _request(dispatch)
    assert any("not callable" in r.getMessage() for r in caplog.records)
    assert calls == ["after.request"]


async def test_install_refuses_a_master_with_addons() -> None:
    master = Master(Options(), event_loop=asyncio.get_running_loop())
    master.addons.add(Recorder("early", []))
    with pytest.raises(RuntimeError, match="before any addon"):
        install(master)
