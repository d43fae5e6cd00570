"""The embedded mitmproxy's per-request bookkeeping that the gateway leaves out gives mitmproxy's results."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
from typing import Any, ClassVar

from mitmproxy import connection, hooks, http
from mitmproxy.options import Options
from mitmproxy.proxy import context as proxy_context
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow
from mitmproxy.utils import asyncio_utils

from addons.http import _lean


def _pristine(module: Any) -> Any:
    """A fresh copy of a mitmproxy module: the originals, whatever was installed in this process."""
    spec = importlib.util.find_spec(module.__name__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def test_context_fork_shares_what_mitmproxy_shares_and_builds_no_server() -> None:
    _lean.lean_context_fork()
    _lean.lean_context_fork()  # idempotent
    client = connection.Client(peername=("127.0.0.1", 5000), sockname=("127.0.0.1", 8080), timestamp_start=1.0)
    parent = proxy_context.Context(client, Options())
    parent.server = connection.Server(address=("upstream", 443))
    parent.layers = ["a", "b"]  # type: ignore[list-item]

    original = _pristine(proxy_context).Context.fork(parent)
    created = 0
    real_init = connection.Server.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal created
        created += 1
        real_init(self, *args, **kwargs)

    connection.Server.__init__ = counting_init  # type: ignore[method-assign]
    try:
        forked = parent.fork()
    finally:
        connection.Server.__init__ = real_init  # type: ignore[method-assign]
    assert created == 0
    assert type(forked) is proxy_context.Context
    assert vars(forked).keys() == vars(original).keys()
    assert forked.client is parent.client and forked.options is parent.options and forked.server is parent.server
    assert forked.layers == parent.layers and forked.layers is not parent.layers  # a copy, as mitmproxy's
    forked.layers.append("c")  # type: ignore[arg-type]
    assert parent.layers == ["a", "b"]


def test_tasks_keep_their_debug_info_without_reading_the_environment() -> None:
    _lean.lean_task_debug_info()
    _lean.lean_task_debug_info()

    async def main() -> None:
        async def nothing() -> None:
            await asyncio.sleep(0)

        before = os.environ.get("PYTEST_CURRENT_TEST")
        assert before  # pytest sets it: mitmproxy's original would put it into the name
        task = asyncio_utils.create_task(nothing(), name="hook task", keep_ref=True, client=("10.0.0.1", 4711))
        assert task.get_name() == "hook task"
        assert task.client == ("10.0.0.1", 4711)  # type: ignore[attr-defined]
        assert isinstance(task.created, float)  # type: ignore[attr-defined]
        assert "age:" in asyncio_utils.task_repr(task)
        await task

    asyncio.run(main())


@dataclasses.dataclass
class _SeveralFields(hooks.Hook):
    name: ClassVar[str] = "lictor_test_several_fields"
    zulu: int
    alpha: str
    mike: list[int]
    skipped: ClassVar[int] = 0
    init_only: dataclasses.InitVar[int] = 0


def test_hook_args_match_mitmproxys() -> None:
    _lean.cached_hook_args()
    _lean.cached_hook_args()
    assert getattr(hooks.Hook.args, "lictor_lean", False)
    original = _pristine(hooks).Hook.args
    flow = tflow.tflow(resp=True)
    several = _SeveralFields(3, "a", [1], 9)
    for hook in (HttpRequestHook(flow), HttpResponseHook(flow), hooks.UpdateHook([flow]), several):
        assert hook.args() == original(hook)
        assert all(a is b for a, b in zip(hook.args(), original(hook), strict=True))
    assert several.args() == [3, "a", [1]]  # declaration order, no ClassVar or InitVar


def test_messages_are_built_without_the_debug_type_check() -> None:
    from mitmproxy.http import Headers, RequestData

    def build() -> RequestData:
        return RequestData(
            host="example.com", port="443", method=b"GET", scheme=b"https", authority=b"", path=b"/",  # type: ignore[arg-type]
            http_version=b"HTTP/1.1", headers=Headers(), content=b"", trailers=None, timestamp_start=1.0,
            timestamp_end=None,
        )  # fmt: skip

    _lean.unchecked_messages()
    _lean.unchecked_messages()
    build()  # a str port: mitmproxy's debug-mode check would raise TypeError
    request = http.Request.make("GET", "http://example.com/x", b"body")
    assert request.port == 80 and request.content == b"body"


def test_install_puts_every_piece_in_place() -> None:
    from mitmproxy.http import MessageData

    _lean.install()
    installed = (
        MessageData.__post_init__,
        proxy_context.Context.fork,
        asyncio_utils.set_task_debug_info,
        hooks.Hook.args,
    )
    assert all(getattr(piece, "lictor_lean", False) for piece in installed)
