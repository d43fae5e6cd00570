"""Where a reply carries structure rather than stored values, by command.

Masking reads every string of a reply, but two kinds of strings are not values a client reads,
they are what it builds on:

* **Stream entry IDs** (``1526919030474-55``): a millisecond time and a sequence number, which a
  card detector can take for a card number. A client continues reading from the last ID it got
  (``XREAD ... STREAMS s <id>``, ``XRANGE s (<id> +``), so a masked ID breaks it. The positions
  where a command's reply holds IDs are listed here (a path of indices, ``None`` for any); in
  ``XINFO`` replies, which are maps of named values, they are the values of the names that hold
  IDs (``last-delivered-id``; ``first-entry``, ``entries`` and ``pending`` hold records that start
  with one). A string there is left alone only if it has the shape of an ID; everything else is
  masked.
* **Map keys and set members**: a client builds a dict or a set from them, so two keys that mask
  to the same text (``alice@example.com`` and ``carol@example.com`` both become
  ``*****@******e.com``) would merge and lose an entry. A masked key that repeats an earlier
  masked key of the same map gets a suffix (``*****@******e.com#2``). RESP3 maps and sets say
  what they are; RESP2 sends them as flat arrays, listed here per command.
* **Times and counts**: an integer reply is masked because it can be a stored value
  (``INCRBY app:card 0``), but ``PEXPIRETIME`` answers a time in milliseconds, as do the
  ``seen-time`` and ``delivery-time`` of ``XINFO STREAM FULL``: thirteen digits, which one time in
  ten pass the card detector. The integers of these replies are never stored values, and are
  left alone (``plain_integers``).
* **Key names the agent sent**: ``XREAD`` and the blocking pops (``BLPOP``, ``LMPOP``...) answer
  with the name of the key each result comes from, which the client matches with the keys it
  asked for (redis-py builds a dict keyed by stream). A string there that is one of the command's
  own keys is left alone: the agent named it, so it learns nothing from it.

Paths count the items of a map one by one (key 0, value 1, key 2...), as
:attr:`~lictor_redis.resp.ReplyParser.path` does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["STREAM_ID", "Shape", "reply_kind", "shape_for"]

Pattern = tuple[int | None, ...]

STREAM_ID = re.compile(rb"\A[0-9]{1,20}-[0-9]{1,20}\Z")
# XINFO: names whose value is an ID, an entry [id, fields], or a list of records that start with an ID
ID_NAMES = frozenset({b"last-generated-id", b"max-deleted-entry-id", b"recorded-first-entry-id", b"last-delivered-id"})
ENTRY_NAMES = frozenset({b"first-entry", b"last-entry"})
LIST_NAMES = frozenset({b"entries", b"pending"})


def _match(pattern: Pattern, path: tuple[int, ...]) -> bool:
    return len(pattern) == len(path) and all(p is None or p == i for p, i in zip(pattern, path, strict=True))


@dataclass(frozen=True)
class Shape:
    """Paths of a reply: ``ids`` (stream entry IDs), ``maps`` (flat arrays of field, value...),
    ``sets`` (arrays of distinct members) and ``named`` (the lengths of the paths of the items of
    XINFO's maps of named values)."""

    ids: tuple[Pattern, ...] = ()
    maps: tuple[Pattern, ...] = ()
    sets: tuple[Pattern, ...] = ()
    named: frozenset[int] = frozenset()
    key_names: tuple[Pattern, ...] = ()
    plain_integers: bool = False

    def is_key(self, path: tuple[int, ...], value: bytes, keys: Sequence[bytes]) -> bool:
        """Whether ``value`` at ``path`` names back one of the command's own ``keys``."""
        return value in keys and any(_match(p, path) for p in self.key_names)

    def is_id(self, path: tuple[int, ...], value: bytes, names: Sequence[bytes | None] = ()) -> bool:
        """Whether ``value`` at ``path`` is an entry ID; ``names[n]``: the last name (the item at an
        even index) of the open aggregate whose items have paths of length ``n``."""
        if STREAM_ID.match(value) is None:
            return False
        if any(_match(p, path) for p in self.ids):
            return True
        n = len(path)

        def name(depth: int) -> bytes | None:
            return names[depth] if 0 <= depth < len(names) else None

        if n in self.named and path[-1] % 2 == 1 and name(n) in ID_NAMES:
            return True  # last-delivered-id <id>
        if n - 1 in self.named and path[-1] == 0 and path[-2] % 2 == 1 and name(n - 1) in ENTRY_NAMES:
            return True  # first-entry [<id>, [field, value...]]
        # entries [[<id>, [field, value...]], ...]; pending [[<id>, consumer, time, count], ...]
        return n - 2 in self.named and path[-1] == 0 and path[-3] % 2 == 1 and name(n - 2) in LIST_NAMES

    def distinct(self, path: tuple[int, ...]) -> int:
        """For the aggregate at ``path``: 2 if its keys (even items) must stay distinct, 1 if all its
        items must, 0 otherwise."""
        if any(_match(p, path) for p in self.maps):
            return 2
        if any(_match(p, path) for p in self.sets):
            return 1
        return 0


PLAIN = Shape()
_ANY = None
# An entry is [id, [field, value, ...]]; a list of them is what XRANGE answers.
_ENTRIES = Shape(ids=((_ANY, 0),), maps=((_ANY, 1),))

_RESP2: dict[str, Shape] = {
    "xadd": Shape(ids=((),)),
    "xrange": _ENTRIES,
    "xrevrange": _ENTRIES,
    "xclaim": Shape(ids=((_ANY, 0), (_ANY,)), maps=((_ANY, 1),)),  # entries, or IDs with JUSTID
    # [next id, entries (or IDs with JUSTID), deleted IDs]
    "xautoclaim": Shape(ids=((0,), (1, _ANY, 0), (1, _ANY), (2, _ANY)), maps=((1, _ANY, 1),)),
    # [[stream, entries], ...]
    "xread": Shape(ids=((_ANY, 1, _ANY, 0),), maps=((_ANY, 1, _ANY, 1),), key_names=((_ANY, 0),)),
    "xreadgroup": Shape(ids=((_ANY, 1, _ANY, 0),), maps=((_ANY, 1, _ANY, 1),), key_names=((_ANY, 0),)),
    # [count, smallest id, greatest id, consumers] or [[id, consumer, idle, deliveries], ...]
    "xpending": Shape(ids=((1,), (2,), (_ANY, 0)), plain_integers=True),
    # {name: value...}; FULL: groups [{name: value...}], each with consumers [{name: value...}]
    "xinfo stream": Shape(named=frozenset({1}), plain_integers=True),
    "xinfo stream full": Shape(named=frozenset({1, 3, 5}), plain_integers=True),
    "xinfo groups": Shape(named=frozenset({2}), plain_integers=True),
    "xinfo consumers": Shape(plain_integers=True),
    **dict.fromkeys(["ttl", "pttl", "expiretime", "pexpiretime"], Shape(plain_integers=True)),
    # [key, element] / [key, member, score] / [key, [elements]] / [key, [[member, score], ...]]
    **dict.fromkeys(
        ["blpop", "brpop", "bzpopmin", "bzpopmax", "lmpop", "blmpop", "zmpop", "bzmpop"], Shape(key_names=((0,),))
    ),
    "hgetall": Shape(maps=((),)),
    "hscan": Shape(maps=((1,),)),  # [cursor, [field, value, ...]]
    "sscan": Shape(sets=((1,),)),
    "config get": Shape(maps=((),)),
    "smembers": Shape(sets=((),)),
    "sunion": Shape(sets=((),)),
    "sinter": Shape(sets=((),)),
    "sdiff": Shape(sets=((),)),
}
_RESP3 = {
    **_RESP2,
    # a map {stream: entries}
    "xread": Shape(ids=((_ANY, _ANY, 0),), maps=((_ANY, _ANY, 1),), key_names=((_ANY,),)),
    "xreadgroup": Shape(ids=((_ANY, _ANY, 0),), maps=((_ANY, _ANY, 1),), key_names=((_ANY,),)),
}


def reply_kind(command: str, args: Sequence[bytes]) -> str:
    """What :func:`shape_for` takes: the command (lower case, with its subcommand), with `` full``
    for ``XINFO STREAM key FULL``, whose reply has another shape."""
    if command == "xinfo stream" and any(a.lower() == b"full" for a in args[1:]):
        return "xinfo stream full"
    return command


def shape_for(kind: str, resp3: bool) -> Shape:
    """The shape of the reply to a command of this :func:`reply_kind`."""
    return (_RESP3 if resp3 else _RESP2).get(kind, PLAIN)
