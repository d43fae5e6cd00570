"""The ``redis`` rule vocabulary and how a command becomes a :class:`lictor.Request`.

``when:`` fields of ``protocol: redis`` rules:

==============  ==================================================================================
``commands``    globs over the command name, case-insensitive: ``GET``, ``CLIENT KILL``, ``H*``
                (a container command is named with its subcommand; ``CLIENT *`` covers them all)
``categories``  permission categories (see :mod:`lictor_redis.commands`): ``read``, ``write``,
                ``keyspace``, ``admin``, ``dangerous``, ``pubsub``, ``scripting``, ``connection``,
                ``transaction``, ``blocking``, ``other``
``types``       data types the command works on: ``string``, ``hash``, ``list``, ``set``, ...
``keys``        globs over key names, case-sensitive (``app:*``)
``args``        globs over each argument after the command name, case-insensitive
==============  ==================================================================================

An ``allow`` rule must cover **every** category, type, key and argument of a command; ``deny``,
``approve`` and ``mask`` rules fire on **any**. Unknown things are ``None`` and never match:
a command the gateway does not know has action ``unknown`` and no categories, types or keys, so
only a rule naming it in ``commands`` (or ``commands: "*"``) can allow it; a command whose keys
cannot be determined (scripts, ``SORT``, ``KEYS``, ``SCAN``, ``FLUSHALL``...) is never allowed
by a rule with ``keys``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from lictor import Enum, Glob, Request, Vocabulary

from .commands import CATEGORIES, TYPES, Classified, classify, display, quote, secret_args
from .resp import ProtocolError, encode_command, split_inline

__all__ = ["PROTOCOL", "VOCABULARY", "build_requests", "request_for"]

PROTOCOL = "redis"


def _text(value: bytes) -> str:
    # surrogateescape keeps the mapping from bytes to text one-to-one, so a glob cannot be
    # fooled by two different keys that decode to the same text.
    return value.decode("utf-8", "surrogateescape")


SHOWN_ARGS = 256
"""Arguments of a long command that approvers read (each cut at :data:`SHOWN_ARG_BYTES`); the digest of the whole
command stands for the rest."""
SHOWN_ARG_BYTES = 128
LONG_BYTES = 64 * 1024
"""A command with more than :data:`SHOWN_ARGS` arguments or :data:`LONG_BYTES` bytes of them is long: its payload
shows a part of it, not every byte of it quoted (which took seconds for a million keys, or a 4 MiB binary value)."""


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_ARG_BYTES else f"{text[:SHOWN_ARG_BYTES]}…(+{len(text) - SHOWN_ARG_BYTES} chars)"


def request_for(c: Classified, args: Sequence[bytes], target: str = "", reason: str | None = None) -> Request:
    """The request the policy decides for the command ``args`` (classified as ``c``).

    The rules match the real arguments, every one of them; approvers read passwords sent on to Redis (``CONFIG SET
    requirepass``, ``MIGRATE ... AUTH``, ``ACL SETUSER >...``, see :func:`secret_args`) as
    ``[REDACTED]``, and the payload carries their digest instead, to which an approval stays bound.

    Of a long command (see :data:`LONG_BYTES`) approvers read the first :data:`SHOWN_ARGS` arguments, each cut,
    and the number and size of them all; the payload then ends with the SHA-256 of the whole command (its
    passwords left out: their own digest follows), so that an approval stays bound to every byte of it."""
    attrs: dict[str, Any] = {
        "command": c.command,
        "categories": c.categories,
        "types": c.types,
        "keys": None if c.keys is None else frozenset(_text(k) for k in c.keys),
        "args": tuple(_text(a) for a in c.args),
    }
    secret = secret_args(c)
    names = args[: len(args) - len(c.args)]  # the command name, and the subcommand of a container
    size = sum(map(len, c.args))
    long = len(c.args) > SHOWN_ARGS or size > LONG_BYTES
    shown: dict[str, Any] | None = None
    if long:
        shown_args = tuple("[REDACTED]" if i in secret else _cut(a) for i, a in enumerate(attrs["args"][:SHOWN_ARGS]))
        more = len(c.args) - SHOWN_ARGS
        shown = {**attrs, "args": shown_args + ((f"…(+{more} args)",) if more > 0 else ())}
        if c.keys is not None:
            keys = tuple(_cut(_text(k)) for k in c.keys[:SHOWN_ARGS])
            more = len(c.keys) - SHOWN_ARGS
            shown["keys"] = keys + ((f"…(+{more} keys)",) if more > 0 else ())
        whole = c.args if not secret else tuple(b"" if i in secret else a for i, a in enumerate(c.args))
        rest = ["[REDACTED]" if i in secret else quote(a, SHOWN_ARG_BYTES) for i, a in enumerate(c.args[:SHOWN_ARGS])]
        if len(c.args) > SHOWN_ARGS:
            rest.append(f"…(+{len(c.args) - SHOWN_ARGS} args)")
        digest = hashlib.sha256(encode_command([*names, *whole])).hexdigest()
        rest.append(f"(the whole command: {len(c.args)} args, {size} bytes, sha256:{digest})")
    elif secret:
        shown = {**attrs, "args": tuple("[REDACTED]" if i in secret else a for i, a in enumerate(attrs["args"]))}
        rest = ["[REDACTED]" if i in secret else quote(a) for i, a in enumerate(c.args)]
    else:
        rest = [quote(a) for a in c.args]
    if secret:
        digest = hashlib.sha256(b"\0".join(c.args[i] for i in sorted(secret))).hexdigest()
        rest.append(f"(passwords: sha256:{digest})")
    payload = " ".join([*(quote(a) for a in names), *rest])
    return Request(
        protocol=PROTOCOL,
        action=c.command if c.known else "unknown",
        attrs=attrs,
        target=target,
        summary=display(c),
        payload=payload,
        reason=reason,
        shown_attrs=shown,
    )


def build_requests(case: Mapping[str, Any], target: str) -> list[Request]:
    """Requests of a policy test case: ``command: "SET app:1 x"`` (split like redis-cli input)
    or ``args: [SET, app:1, x]``."""
    if "args" in case:
        raw = case["args"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("`args` must be a non-empty list")
        args = [str(a).encode() for a in raw]
    elif "command" in case:
        try:
            args = split_inline(str(case["command"]).encode())
        except ProtocolError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not args:
            raise ValueError("`command` is empty")
    else:
        raise ValueError('a redis test request needs `command: "GET key"` or `args: [GET, key]`')
    return [request_for(classify(args), args, target=target, reason=case.get("reason"))]


VOCABULARY = Vocabulary(
    protocol=PROTOCOL,
    fields=(
        Glob("commands", attr="command", description="command names, e.g. GET or CLIENT KILL (globs)"),
        Enum(
            "categories",
            attr="categories",
            values=CATEGORIES,
            wildcard=False,
            description="permission categories of the command (Redis ACL categories, stricter)",
        ),
        Enum("types", attr="types", values=TYPES, wildcard=False, description="data types the command works on"),
        Glob("keys", attr="keys", case_sensitive=True, description="key names (globs, case-sensitive)"),
        Glob("args", attr="args", description="arguments after the command name (globs)"),
    ),
    index="commands",
    description="Redis commands (RESP2/RESP3), decided one by one, in pipelines and MULTI/EXEC too",
    build_requests=build_requests,
)
