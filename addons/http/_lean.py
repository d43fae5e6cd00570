"""Work the embedded mitmproxy does for every request and that changes nothing, left out.

Each function here replaces one piece of mitmproxy's per-request bookkeeping with code that has the
same result, and says why. None of them touches parsing, the HTTP state machines or what reaches the
network; each is installed once, before the proxy starts, and is idempotent. ``tests/test_http_lean.py``
compares each replacement with mitmproxy's original.
"""

from __future__ import annotations

import time
from typing import Any

from mitmproxy import hooks
from mitmproxy.proxy import context as proxy_context
from mitmproxy.utils import asyncio_utils

from ._dispatch import hook_args


def install() -> None:
    unchecked_messages()
    lean_context_fork()
    lean_task_debug_info()
    cached_hook_args()


def unchecked_messages() -> None:
    """Build mitmproxy's requests and responses without its debug-mode type check.

    mitmproxy checks every field of every ``Request``/``Response`` against its annotation when it is
    built, but only under ``__debug__``: its release mode (``python -O``) does without. The gateway keeps
    ``__debug__`` for its own asserts, and here the check costs more CPU per proxied request than the
    policy decision: about 35 µs per message, two messages per request. Messages are built only by
    mitmproxy's HTTP parsers (which produce the annotated types: str host, int port, bytes fields) and
    by the gateway's own code (integer status codes, bytes bodies)."""
    from mitmproxy.http import MessageData

    if getattr(MessageData.__post_init__, "lictor_lean", False):
        return

    def __post_init__(self: Any) -> None:
        pass

    __post_init__.lictor_lean = True  # type: ignore[attr-defined]
    MessageData.__post_init__ = __post_init__  # type: ignore[method-assign]


def lean_context_fork() -> None:
    """``Context.fork`` without building a ``Server`` it throws away.

    mitmproxy forks the connection's context for every HTTP stream (every request). Its ``fork`` calls
    ``Context(...)``, whose ``__init__`` makes a new ``Server`` (a dataclass with a fresh uuid4 and checked
    attribute writes), and then replaces it with the parent's server on the next line. That object was
    about 3% of the proxy's CPU per request."""
    cls = proxy_context.Context
    if getattr(cls.fork, "lictor_lean", False):
        return

    def fork(self: Any) -> Any:
        ret = cls.__new__(cls)
        ret.client = self.client
        ret.options = self.options
        ret.server = self.server
        ret.layers = self.layers.copy()
        return ret

    fork.lictor_lean = True  # type: ignore[attr-defined]
    cls.fork = fork  # type: ignore[method-assign]


def lean_task_debug_info() -> None:
    """mitmproxy's task naming without its test-suite hook.

    Every task mitmproxy starts (one per hook call, several per request) goes through
    ``set_task_debug_info``, which reads ``os.environ["PYTEST_CURRENT_TEST"]`` to put the name of the
    running mitmproxy test into task names, under ``__debug__`` only. The gateway keeps ``__debug__``, so it
    paid an environment lookup per task for a name no one reads. The task still gets its name, creation
    time and client address, which mitmproxy's own debug output shows."""
    if getattr(asyncio_utils.set_task_debug_info, "lictor_lean", False):
        return

    def set_task_debug_info(task: Any, *, name: str, client: tuple[Any, ...] | None = None) -> None:
        task.created = time.time()
        task.set_name(name)
        if client:
            task.client = client

    set_task_debug_info.lictor_lean = True  # type: ignore[attr-defined]
    asyncio_utils.set_task_debug_info = set_task_debug_info


def cached_hook_args() -> None:
    """``Hook.args()`` from field names looked up once per hook class.

    mitmproxy asks ``dataclasses.fields`` for a hook's fields on every call, and its connection handler
    calls ``args()`` for every hook of every request before dispatching it."""
    if getattr(hooks.Hook.args, "lictor_lean", False):
        return

    def args(self: Any) -> list[Any]:
        return hook_args(self)

    args.lictor_lean = True  # type: ignore[attr-defined]
    hooks.Hook.args = args  # type: ignore[method-assign]
