"""What a Redis command is: its name, permission categories, data types and the keys it touches.

The command table (``commands.json``) is generated from Redis' own ``COMMAND`` reply by
``tools/gen_command_table.py``: arity, ACL categories and key specifications of every command
and subcommand. :func:`classify` reads it:

* ``command`` is the lower-case name; container commands (``CLIENT``, ``CONFIG``, ``OBJECT``...)
  are named with their subcommand, ``"client kill"``.
* ``categories`` are Redis' ACL categories that say something about permission (``read``,
  ``write``, ``keyspace``, ``admin``, ``dangerous``, ``pubsub``, ``scripting``, ``connection``,
  ``transaction``, ``blocking``), made stricter by :data:`EXTRA_CATEGORIES` (scripts, ACL,
  ...). The data-type categories go to ``types``; ``fast``/``slow`` are dropped. A command Redis
  puts in no permission category gets ``other``, so that an ``allow`` rule for some categories
  never covers it by accident.
* ``keys`` are found with the command's key specifications, interpreted as Redis does for ACL
  checks. They are ``None`` (unknown) when a spec is incomplete or unknown (``SORT``,
  ``MIGRATE``), when the arguments do not make sense (a bad ``numkeys``), for scripts (their
  declared keys do not bind what the script touches) and for commands that act on the whole
  keyspace (``KEYS``, ``SCAN``, ``FLUSHALL``...). Channel names (``not_key`` specs) are not keys.

Commands the table does not know (newer Redis versions, modules, typos) are ``known=False``:
no categories, no keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "EXTRA_CATEGORIES",
    "TYPES",
    "WHOLE_KEYSPACE",
    "Classified",
    "CommandInfo",
    "classify",
    "display",
    "lookup",
    "quote",
    "secret_args",
    "table",
]

TYPES = ("bitmap", "geo", "hash", "hyperloglog", "list", "set", "sortedset", "stream", "string")
CATEGORIES = (
    "admin",
    "blocking",
    "connection",
    "dangerous",
    "keyspace",
    "other",
    "pubsub",
    "read",
    "scripting",
    "transaction",
    "write",
)
_DROPPED = frozenset({"fast", "slow"})

# The gateway is stricter than Redis' own categories where a command does more than its
# category says. Keys are "container|sub" for subcommands; "container|*" means all of them.
EXTRA_CATEGORIES: Mapping[str, frozenset[str]] = {
    # scripts and functions run code the gateway cannot see
    "eval": frozenset({"dangerous"}),
    "evalsha": frozenset({"dangerous"}),
    "eval_ro": frozenset({"dangerous"}),
    "evalsha_ro": frozenset({"dangerous"}),
    "fcall": frozenset({"dangerous"}),
    "fcall_ro": frozenset({"dangerous"}),
    "script|*": frozenset({"dangerous"}),
    "function|*": frozenset({"dangerous"}),
    # ACL reveals and changes the server's users (the gateway's own credentials among them)
    "acl|*": frozenset({"admin", "dangerous"}),
    # server internals Redis leaves in no category
    "cluster|*": frozenset({"admin"}),
    "memory|doctor": frozenset({"admin"}),
    "memory|malloc-stats": frozenset({"admin"}),
    "memory|purge": frozenset({"admin"}),
    "memory|stats": frozenset({"admin"}),
    "module|*": frozenset({"admin", "dangerous"}),
    "config|*": frozenset({"admin"}),
}

# Commands whose declared keys do not bound what they touch: keys are unknown.
UNBOUNDED_KEYS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})
# Commands that act on every key of the database (or all databases).
WHOLE_KEYSPACE = frozenset({"keys", "scan", "randomkey", "flushall", "flushdb", "swapdb"})


@dataclass(frozen=True, slots=True)
class KeySpec:
    not_key: bool
    incomplete: bool
    begin: tuple[Any, ...]
    find: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """One entry of the command table."""

    name: str  # "get", "client|kill"
    arity: int
    categories: frozenset[str]
    types: frozenset[str]
    keyspecs: tuple[KeySpec, ...]
    container: bool

    def arity_ok(self, argc: int) -> bool:
        return argc == self.arity if self.arity >= 0 else argc >= -self.arity


@dataclass(frozen=True, slots=True)
class Classified:
    """A command as the policy sees it."""

    command: str  # lower case, subcommand after a space: "get", "client kill"
    known: bool
    categories: frozenset[str] | None
    types: frozenset[str] | None
    keys: tuple[bytes, ...] | None
    args: tuple[bytes, ...]  # the arguments after the command name(s)
    arity_ok: bool = True

    @property
    def name(self) -> str:
        """The display name, upper case: ``GET``, ``CLIENT KILL``."""
        return self.command.upper()


@cache
def table() -> Mapping[str, CommandInfo]:
    """The command table, loaded once."""
    raw = json.loads((Path(__file__).parent / "commands.json").read_text())
    out: dict[str, CommandInfo] = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        cats = {c for c in entry["categories"] if c not in _DROPPED}
        types = frozenset(c for c in cats if c in TYPES)
        perms = {c for c in cats if c not in TYPES}
        container = name.split("|", 1)[0]
        perms |= EXTRA_CATEGORIES.get(name, frozenset())
        if "|" in name:
            perms |= EXTRA_CATEGORIES.get(f"{container}|*", frozenset())
        if not perms:
            perms = {"other"}
        specs = tuple(
            KeySpec("not_key" in flags, "incomplete" in flags, tuple(begin), tuple(find))
            for flags, begin, find in entry["keys"]
        )
        out[name] = CommandInfo(name, int(entry["arity"]), frozenset(perms), types, specs, bool(entry["container"]))
    unknown = set(CATEGORIES)
    for info in out.values():
        assert info.categories <= unknown, f"{info.name}: unexpected categories {info.categories - unknown}"
    return out


def lookup(args: Sequence[bytes]) -> CommandInfo | None:
    """The table entry for ``args`` (subcommand entries for container commands)."""
    if not args:
        return None
    name = args[0].decode("latin-1").lower()
    info = table().get(name)
    if info is None or not info.container:
        return info
    if len(args) < 2:
        return None
    return table().get(f"{name}|{args[1].decode('latin-1').lower()}")


def _to_int(raw: bytes) -> int | None:
    body = raw[1:] if raw[:1] == b"-" else raw
    if not body or not body.isdigit() or len(body) > 18:
        return None
    return int(raw)


def extract_keys(info: CommandInfo, args: Sequence[bytes]) -> tuple[bytes, ...] | None:
    """The keys of ``args`` by ``info``'s key specs, or None when they cannot be determined."""
    argc = len(args)
    positions: list[int] = []
    for spec in info.keyspecs:
        repeated: list[int] = []
        if spec.not_key:
            continue
        if spec.incomplete:
            return None
        kind = spec.begin[0]
        first = 0
        if kind == "index":
            first = int(spec.begin[1])
        elif kind == "keyword":
            word = str(spec.begin[1]).encode().lower()
            startfrom = int(spec.begin[2])
            # Redis searches forward from startfrom up to the second-to-last argument, or
            # backward from argc+startfrom down to index 2 (never index 0 or 1).
            if startfrom > 0:
                candidates = range(startfrom, argc - 1)
            else:
                candidates = range(argc + startfrom, 1, -1)
            found = [i + 1 for i in candidates if 1 <= i < argc and args[i].lower() == word]
            if not found:
                continue  # keyword absent: this spec contributes no key
            first = found[0]
            if len(found) > 1:
                if spec.find != ("range", 0, 1, 0):
                    # XREADGROUP COUNT 1 GROUP g STREAMS STREAMS app:1 other > >: the consumer
                    # is named like the keyword, and the keys Redis reads are not the ones
                    # after its first occurrence.
                    return None
                # One key after an option keyword (GEORADIUS ... STORE key): Redis' key spec
                # names the first occurrence, but the command's own parser keeps the last one,
                # so the key written may be any of them.
                repeated = found[1:]
        else:
            return None
        find = spec.find
        if find[0] == "range":
            lastkey, step, limit = int(find[1]), int(find[2]), int(find[3])
            if lastkey >= 0:
                last = first + lastkey
            elif not limit:
                last = argc + lastkey
            else:
                last = first + ((argc - first) // limit + lastkey)
        elif find[0] == "keynum":
            idx = first + int(find[1])
            if idx >= argc:
                return None
            numkeys = _to_int(args[idx])
            if numkeys is None or numkeys < 0:
                return None
            first += int(find[2])
            last = first + numkeys - 1
            step = int(find[3])
        else:
            return None
        if last >= argc or last < first or first >= argc or step < 1:
            return None
        positions.extend(range(first, last + 1, step))
        positions.extend(repeated)
    return tuple(args[i] for i in positions)


def classify(args: Sequence[bytes]) -> Classified:
    """Name, categories, types and keys of the command ``args`` (``args[0]`` is the name)."""
    if not args:
        raise ValueError("empty command")
    name = args[0].decode("utf-8", "backslashreplace").lower()
    info = lookup(args)
    top = table().get(name)
    words = 2 if top is not None and top.container and len(args) >= 2 else 1
    command = name if words == 1 else f"{name} {args[1].decode('utf-8', 'backslashreplace').lower()}"
    rest = tuple(args[words:])
    if info is None:
        return Classified(command, False, None, None, None, rest)
    if not info.arity_ok(len(args)):
        return Classified(command, True, info.categories, info.types, None, rest, arity_ok=False)
    base = info.name.split("|", 1)[0]
    keys: tuple[bytes, ...] | None
    if base in UNBOUNDED_KEYS or base in WHOLE_KEYSPACE:
        keys = None
    else:
        keys = extract_keys(info, args)
    return Classified(command, True, info.categories, info.types, keys, rest)


# -- credentials ----------------------------------------------------------------------------------

# CONFIG SET parameters whose values are secrets (requirepass, masterauth, tls-key-file-pass...).
_SECRET_CONFIG = (b"pass", b"auth", b"secret", b"key")
_SECRET_COMMANDS = frozenset({"migrate", "config set"})  # and the ACL subcommands
_NO_SECRETS: frozenset[int] = frozenset()


def secret_args(c: Classified) -> frozenset[int]:
    """The positions in ``c.args`` that carry a password the agent sends on to Redis: the passwords of
    ``MIGRATE ... AUTH password`` and ``AUTH2 user password``, the values of ``CONFIG SET`` parameters
    named like a secret, and the ``>password``, ``<password``, ``#hash`` and ``!hash`` rules of ``ACL``
    subcommands. They are kept out of what approvers and recordings read.

    Other commands carry no password: they are not scanned (an ``EXISTS`` of a million keys costs nothing here)."""
    if c.command not in _SECRET_COMMANDS and not c.command.startswith("acl "):
        return _NO_SECRETS
    found: set[int] = set()
    redact = 0
    for i, arg in enumerate(c.args):
        low = arg.lower()
        if redact:
            found.add(i)
            redact -= 1
        elif c.command == "migrate" and low in (b"auth", b"auth2"):
            redact = 1 if low == b"auth" else 2
        elif c.command == "config set" and i % 2 == 1 and any(s in c.args[i - 1].lower() for s in _SECRET_CONFIG):
            found.add(i)
        elif c.command.startswith("acl ") and arg[:1] in (b">", b"<", b"#", b"!"):
            found.add(i)
    return frozenset(found)


# -- display --------------------------------------------------------------------------------------

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-.*/@+=,;!?#$%&^~()[]{}<>|")
_PLAIN_BYTES = bytes(sorted(_PLAIN))


def quote(arg: bytes, limit: int | None = None) -> str:
    """``arg`` the way redis-cli shows it: bare when plain, else double-quoted with escapes."""
    data = arg if limit is None or len(arg) <= limit else arg[:limit]
    if data and not data.translate(None, _PLAIN_BYTES):  # every byte plain
        text = data.decode("ascii")
    else:
        parts = ['"']
        for b in data:
            if b in (0x22, 0x5C):
                parts.append("\\" + chr(b))
            elif b == 0x0A:
                parts.append("\\n")
            elif b == 0x0D:
                parts.append("\\r")
            elif b == 0x09:
                parts.append("\\t")
            elif 0x20 <= b < 0x7F:
                parts.append(chr(b))
            else:
                parts.append(f"\\x{b:02x}")
        parts.append('"')
        text = "".join(parts)
    if limit is not None and len(arg) > limit:
        text += f"…(+{len(arg) - limit} bytes)"
    return text


def display(c: Classified, max_keys: int = 8, key_limit: int = 100) -> str:
    """A short description for audit summaries and messages: the name and the keys, no values."""
    out = [c.name]
    if c.keys is None:
        if c.args:
            out.append(f"({len(c.args)} args; keys unknown)" if c.known else f"({len(c.args)} args)")
        return " ".join(out)
    out.extend(quote(k, key_limit) for k in c.keys[:max_keys])
    if len(c.keys) > max_keys:
        out.append(f"…(+{len(c.keys) - max_keys} keys)")
    others = len(c.args) - len(c.keys)
    if others > 0:
        out.append(f"(+{others} {'arg' if others == 1 else 'args'})")
    return " ".join(out)
