"""YAML loading that remembers where every value came from.

Rule-pack authors need ``FILE:LINE:COL: message`` for every problem, including problems found
long after parsing (JSON Schema validation, unknown role references, re2 refusing a pattern).
PyYAML's composer knows the marks of every node; we keep them by building ``LocDict`` /
``LocList`` containers that carry the position of each key and item.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Location:
    """A position in a source file, 1-based like editors show it."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class LocDict(dict[str, Any]):
    """A mapping that knows the location of itself, its keys and its values."""

    loc: Location
    key_locs: dict[str, Location]
    value_locs: dict[str, Location]


class LocList(list[Any]):
    """A sequence that knows the location of itself and of each item."""

    loc: Location
    item_locs: list[Location]


class YamlError(ValueError):
    """A file that is not valid YAML, with the position the parser stopped at."""

    def __init__(self, loc: Location, message: str) -> None:
        super().__init__(f"{loc}: {message}")
        self.loc = loc
        self.message = message


def _loc(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 5-10x faster


class _Loader(_Base):  # type: ignore[misc]
    """SafeLoader that builds LocDict/LocList and refuses duplicate keys."""

    filename = "<string>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocDict:
    # Keys written in this mapping, as opposed to those a merge key (`<<: *base`) brings in: a merged key is a
    # default that the mapping's own key overrides, and only two written keys are a duplicate.
    written = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    result = LocDict()
    result.loc = _loc(loader.filename, node)
    result.key_locs = {}
    result.value_locs = {}
    own: set[str] = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in own and id(key_node) in written:
            first = result.key_locs[key]
            raise YamlError(
                _loc(loader.filename, key_node),
                f"duplicate key {key!r} (also at line {first.line}, column {first.col}): "
                "a mapping holds each key once; keep one of them",
            )
        if id(key_node) in written:
            own.add(key)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_locs[key] = _loc(loader.filename, key_node)
        result.value_locs[key] = _loc(loader.filename, value_node)
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocList:
    result = LocList(loader.construct_object(child, deep=True) for child in node.value)
    result.loc = _loc(loader.filename, node)
    result.item_locs = [_loc(loader.filename, child) for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


MAX_BYTES = 8 << 20
"""Largest YAML file read (a rule pack is a few kilobytes; a huge one is a mistake or an attack)."""
MAX_VALUES = 200_000
"""Most values aliases may add to one document: an alias (``*a``) repeats what its anchor holds, so a
kilobyte of nested aliases can stand for billions of values (the "billion laughs"). What is written
out in full is bounded by :data:`MAX_BYTES` instead (a generated pack of 10,000 rules is legitimate)."""


def _expanded_size(root: yaml.Node, filename: str) -> int:
    """How many values ``root`` stands for once aliases are expanded (shared nodes counted each time).

    Raises when that is more than :data:`MAX_VALUES` beyond the number of distinct nodes, i.e. when the
    aliases alone would add more than that.
    """
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes and not done:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if not done:
            sizes[key] = -1  # in progress (a recursive alias is refused by the composer)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        total = 1 + sum(max(sizes.get(id(child), 1), 1) for child in children)
        if total - len(sizes) > MAX_VALUES:  # len(sizes): the distinct nodes seen so far
            raise YamlError(
                _loc(filename, node),
                f"this document expands to more than {MAX_VALUES} values (nested YAML aliases?); "
                "write the values out or split the pack",
            )
        sizes[key] = total
    return sizes[id(root)]


def load_documents(text: str, filename: str) -> list[Any]:
    """Parse every YAML document in ``text``; raise YamlError with the position on failure."""
    if len(text) > MAX_BYTES:
        raise YamlError(Location(filename, 1, 1), f"file larger than {MAX_BYTES >> 20} MiB; split it")
    loader = _Loader(text)
    loader.filename = filename
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _expanded_size(node, filename)
            docs.append(loader.construct_document(node))
        return docs
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        col = mark.column + 1 if mark else 1
        message = str(exc.problem or exc)
        lines = text.splitlines()
        where = lines[mark.line] if mark and mark.line < len(lines) else ""
        if mark and where[mark.column : mark.column + 1] == "\t":
            message = f"a tab character: YAML indents with spaces only, replace it with spaces ({message})"
        elif mark and (odd := _odd_space_before(text, mark.line, mark.column)) is not None:
            # a no-break space pasted from a web page or a chat shows as a space, and YAML reads it as a letter: the
            # parser stops later, at a place that looks right
            at, ch = odd
            before = text[:at]
            odd_line = before.count("\n") + 1
            odd_col = at - (before.rfind("\n") + 1) + 1
            name = unicodedata.name(ch, "")
            raise YamlError(
                Location(filename, odd_line, odd_col),
                f"U+{ord(ch):04X} {name} here, which shows as a space (or as nothing) but is not one to YAML: "
                f"replace it with a space, or delete it (the parser stopped at line {line}, column {col}: {message})",
            ) from None
        raise YamlError(Location(filename, line, col), message) from None
    except yaml.YAMLError as exc:
        raise YamlError(Location(filename, 1, 1), str(exc)) from None
    finally:
        loader.dispose()


# Characters that look like a space, or like nothing, and that YAML reads as part of a word (a BOM is skipped at the
# very start of a file only).
_ODD_SPACES = frozenset("\u00a0\u1680\u180e\u200b\u200c\u200d\u202f\u205f\u2060\u3000\ufeff") | frozenset(
    map(chr, range(0x2000, 0x200B))
)


def _odd_space_before(text: str, line: int, column: int) -> tuple[int, str] | None:
    """The last look-alike of a space where YAML expects one (in an indentation, after ``:`` or ``-``) on the
    0-based ``line`` where the parser stopped or on the three lines before it, at or before ``column``; or None."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for piece in lines:
        starts.append(starts[-1] + len(piece))
    for number in range(min(line, len(lines) - 1), max(line - 3, 0) - 1, -1):
        piece = lines[number]
        last = column if number == line else len(piece) - 1
        for col in range(min(last, len(piece) - 1), -1, -1):
            ch = piece[col]
            if ch not in _ODD_SPACES or (number == 0 and col == 0 and ch == "\ufeff"):
                continue
            lead = piece[:col]
            if ch == "\ufeff" or not lead.strip(" " + "".join(_ODD_SPACES)) or lead.rstrip(" ").endswith((":", "-")):
                return starts[number] + col, ch
    return None


def locate(root: Any, path: Iterable[Any], fallback: Location) -> Location:
    """The location of the value at ``path`` (keys and indexes) inside ``root``."""
    loc = getattr(root, "loc", fallback)
    node = root
    for part in path:
        if isinstance(node, LocDict) and isinstance(part, str) and part in node:
            loc = node.value_locs.get(part, loc)
            node = node[part]
        elif isinstance(node, LocList) and isinstance(part, int) and 0 <= part < len(node):
            loc = node.item_locs[part]
            node = node[part]
        else:
            break
    return loc


def key_location(mapping: Any, key: str, fallback: Location) -> Location:
    """The location of ``key`` itself inside a LocDict (for "unknown key" errors)."""
    if isinstance(mapping, LocDict):
        return mapping.key_locs.get(key, mapping.loc)
    return fallback


def plain(value: Any) -> Any:
    """Convert LocDict/LocList trees into plain dicts and lists (for hashing, JSON, tests)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def did_you_mean(key: str, known: Collection[str]) -> str:
    """`` (did you mean 'targets'?)`` for a misspelt ``key``, or ``""``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
