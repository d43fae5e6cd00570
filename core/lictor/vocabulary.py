"""Rule vocabularies: how a protocol addon teaches rule packs its ``when:`` fields.

A protocol addon declares a :class:`Vocabulary`: the protocol name, the fields a rule's ``when:``
(and ``unless:``) block may use, and how to build requests from a policy test case. The core
composes the JSON Schema of every loaded vocabulary into the rule-pack schema, so a new protocol
extends the format without editing the core.

Matching semantics, the same for every field kind that takes a list:

* A request attribute may hold one value (``"select"``) or several (the tables a statement
  touches). A rule value may be one pattern or a list of patterns.
* For an ``allow`` rule, **every** value of the request attribute must match one of the rule's
  patterns: a permission must cover everything the request touches
  (``SELECT * FROM orders JOIN secrets`` is not covered by ``tables: [orders]``).
* For ``deny``, ``approve`` and ``mask`` rules, **any** value matching is enough: a restriction
  fires on anything it touches.
* Inside ``unless:`` the reading is the other way round: on an ``allow`` rule any value is enough
  (``unless: {resources: [secrets]}`` withdraws the permission from every request that touches a
  secret); on a ``deny``, ``approve`` or ``mask`` rule every value must match, so an exception
  never carries the values it does not name past the rule.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .policy_types import Request

Quantifier = Literal["all", "any"]
Predicate = Callable[[Request, Quantifier], bool]

__all__ = [
    "Boolean",
    "Custom",
    "Enum",
    "Field",
    "Glob",
    "Number",
    "Predicate",
    "Quantifier",
    "Vocabulary",
    "glob_to_regex",
]

_GLOB_CHARS = re.compile(r"[*?\[]")


def glob_to_regex(pattern: str, *, case_sensitive: bool = False) -> re.Pattern[str]:
    """Compile a shell-style glob (``*``, ``?``, ``[...]``) into an anchored regex.

    Globs come from rule-pack authors; translating them with fnmatch yields only linear-time
    constructs, so Python's ``re`` is safe here.
    """
    at = _unclosed_bracket(pattern)
    if at is not None:
        # fnmatch would read it as a literal "[", so "tables: [app_[ab]" would never match what was meant
        raise ValueError(f"{pattern!r}: the '[' at position {at + 1} is never closed; write [[] for a literal '['")
    empty = _reversed_range(pattern)
    if empty is not None:
        # fnmatch drops a range whose ends are reversed: "[z-a]" matches no character, and "[z-a]*" nothing at all
        raise ValueError(
            f"{pattern!r}: the range {empty!r} matches no character (its first character comes after its last); "
            f"write {empty[2] + '-' + empty[0]!r}"
        )
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(fnmatch.translate(pattern), flags | re.DOTALL)


def _classes(pattern: str) -> Iterator[tuple[int, int]]:
    """Each ``[`` that starts a character class (fnmatch's reading): its index and that of the ``]`` closing it,
    or -1 (fnmatch then reads the ``[`` as itself, and no later ``[`` is closed either)."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        end = pattern.find("]", j)
        yield i, end
        if end < 0:
            return
        i = end + 1


def _reversed_range(pattern: str) -> str | None:
    """The first range ``x-y`` of a character class whose ``x`` comes after ``y`` (fnmatch's reading), or None."""
    for start, end in _classes(pattern):
        body = pattern[start + 1 : end] if end >= 0 else ""
        k = 1 if body.startswith("!") else 0
        while k < len(body):
            if k + 2 < len(body) and body[k + 1] == "-" and body[k] > body[k + 2]:
                return body[k : k + 3]
            k += 3 if k + 2 < len(body) and body[k + 1] == "-" else 1
    return None


def _unclosed_bracket(pattern: str) -> int | None:
    """The index of a ``[`` that starts no character class (fnmatch's reading), or None."""
    return next((start for start, end in _classes(pattern) if end < 0), None)


_SCALARS = (str, bytes, int, float, bool)
_COLLECTIONS = (frozenset, set, tuple, list)


def _values(value: Any) -> tuple[Any, ...] | frozenset[Any] | set[Any] | list[Any]:
    kind = type(value)
    if kind in _COLLECTIONS:  # the hot path: exact types, no ABC checks
        return value  # type: ignore[no-any-return]
    if kind in _SCALARS:
        return (value,)
    if value is None:
        return ()
    if isinstance(value, (str, bytes, int, float, bool)):
        return (value,)
    if isinstance(value, Mapping):
        return tuple(value)
    if isinstance(value, Iterable):
        return tuple(value)
    return (value,)


def _text(value: Any, attr: str) -> str:
    """A request attribute value as the text rules match. Bytes are refused, not matched as their
    ``str()`` (``"b'card'"``), which no rule names: a ``deny`` would never fire on them."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"request attribute {attr!r} holds bytes ({bytes(value[:40])!r}); rules match text: decode it")
    return str(value)


def _quantify(values: Iterable[Any], test: Callable[[Any], bool], quantifier: Quantifier) -> bool:
    if quantifier == "all":
        return all(test(v) for v in values)
    return any(test(v) for v in values)


@dataclass(frozen=True)
class Field:
    """Base of all field kinds: ``name`` is the key in ``when:``; ``attr`` the request attribute."""

    name: str
    attr: str = ""
    description: str = ""

    @property
    def attribute(self) -> str:
        return self.attr or self.name

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def compile(self, value: Any) -> Predicate:
        raise NotImplementedError

    def literals(self, value: Any) -> frozenset[str] | None:
        """Exact values this condition can match, or None when it uses patterns."""
        return None


@dataclass(frozen=True)
class Glob(Field):
    """One glob or a list of globs matched against a string (or strings) attribute."""

    case_sensitive: bool = False
    basename: bool = False  # the attribute is a program's basename: a pattern with a '/' can never match

    def schema(self) -> dict[str, Any]:
        item = {"type": "string", "minLength": 1}
        return {
            "description": self.description,
            "oneOf": [item, {"type": "array", "items": item, "minItems": 1}],
        }

    def compile(self, value: Any) -> Predicate:
        patterns = [str(p) for p in _values(value)]
        for p in patterns:
            if self.basename and "/" in p:
                name = p.rstrip("/").rsplit("/", 1)[-1]
                raise ValueError(f"{p!r} can never match: programs are named without their directory (write {name!r})")
        attr = self.attribute
        exact = {p if self.case_sensitive else p.lower() for p in patterns if not _GLOB_CHARS.search(p)}
        regexes = [glob_to_regex(p, case_sensitive=self.case_sensitive) for p in patterns if _GLOB_CHARS.search(p)]
        fold = not self.case_sensitive

        def one(v: Any) -> bool:
            s = v if type(v) is str else _text(v, attr)
            if (s.lower() if fold else s) in exact:
                return True
            return any(r.match(s) for r in regexes)

        def predicate(request: Request, quantifier: Quantifier) -> bool:
            raw = request.attrs.get(attr)
            if raw is None:  # unknown is never covered, even vacuously
                return False
            return _quantify(_values(raw), one, quantifier)

        return predicate

    def literals(self, value: Any) -> frozenset[str] | None:
        patterns = [str(p) for p in _values(value)]
        if any(_GLOB_CHARS.search(p) for p in patterns):
            return None
        return frozenset(p if self.case_sensitive else p.lower() for p in patterns)


@dataclass(frozen=True)
class Enum(Field):
    """One value or a list from a fixed set (statement kinds, Kubernetes verbs)."""

    values: tuple[str, ...] = ()
    wildcard: bool = True

    def schema(self) -> dict[str, Any]:
        allowed = [*self.values, "*"] if self.wildcard else list(self.values)
        item = {"type": "string", "enum": allowed}
        return {
            "description": self.description,
            "oneOf": [item, {"type": "array", "items": item, "minItems": 1}],
        }

    def compile(self, value: Any) -> Predicate:
        wanted = frozenset(str(v) for v in _values(value))
        attr = self.attribute
        if "*" in wanted:
            return lambda request, quantifier: True

        def one(v: Any) -> bool:
            return (v if type(v) is str else _text(v, attr)) in wanted

        def predicate(request: Request, quantifier: Quantifier) -> bool:
            raw = request.attrs.get(attr)
            if raw is None:
                return False
            return _quantify(_values(raw), one, quantifier)

        return predicate

    def literals(self, value: Any) -> frozenset[str] | None:
        wanted = frozenset(str(v) for v in _values(value))
        return None if "*" in wanted else wanted


@dataclass(frozen=True)
class Boolean(Field):
    """True or false; matches when the request attribute equals it. A missing attribute is false for a
    restriction (``any``) and covers no permission (``all``): an unparsable statement, which has no
    ``modifies``, is not allowed by ``modifies: false``."""

    def schema(self) -> dict[str, Any]:
        return {"description": self.description, "type": "boolean"}

    def compile(self, value: Any) -> Predicate:
        wanted = bool(value)
        attr = self.attribute

        def predicate(request: Request, quantifier: Quantifier) -> bool:
            v = request.attrs.get(attr)
            if v is None and quantifier == "all":
                return False
            return bool(v) is wanted

        return predicate


@dataclass(frozen=True)
class Number(Field):
    """A numeric bound: ``{max: N}``, ``{min: N}`` or both. A missing attribute does not match.

    ``minimum`` is the smallest value the attribute can take (0 for sizes and counts): a bound below it
    is a mistake in the rule pack (``{max: -3}`` would match nothing), refused when the pack is checked.
    """

    minimum: float | None = None

    def schema(self) -> dict[str, Any]:
        bound: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            bound["minimum"] = self.minimum
        return {
            "description": self.description,
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {"max": bound, "min": bound},
        }

    def compile(self, value: Any) -> Predicate:
        lo = value.get("min")
        hi = value.get("max")
        for key, bound in (("min", lo), ("max", hi)):
            # YAML reads .nan and .inf as numbers: no value compares with NaN, and none reaches an infinite min
            if isinstance(bound, float) and not math.isfinite(bound):
                raise ValueError(f"{self.name}: {key} must be a finite number, not {bound}")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{self.name}: min {lo} is greater than max {hi}, so this condition never matches")
        attr = self.attribute

        def predicate(request: Request, quantifier: Quantifier) -> bool:
            v = request.attrs.get(attr)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return False
            return (lo is None or v >= lo) and (hi is None or v <= hi)

        return predicate


@dataclass(frozen=True)
class Custom(Field):
    """A field with its own schema and compiler, for what the built-in kinds cannot express."""

    json_schema: Mapping[str, Any] = field(default_factory=dict)
    compiler: Callable[[Any], Predicate] | None = None

    def schema(self) -> dict[str, Any]:
        return dict(self.json_schema)

    def compile(self, value: Any) -> Predicate:
        if self.compiler is None:
            raise ValueError(f"field {self.name!r} has no compiler")
        predicate = self.compiler(value)
        name = self.name

        def checked(request: Request, quantifier: Quantifier) -> bool:
            # Any truthy result matches (a regex match object does), but an iterator or awaitable is a
            # predicate that forgot to run (`any(...)` left as a generator): it would match every request.
            result = predicate(request, quantifier)
            if result is True or result is False or result is None:
                return bool(result)
            if isinstance(result, (Iterator, Awaitable)):
                raise TypeError(f"the predicate of field {name!r} returned {type(result).__name__}, not a truth value")
            return bool(result)

        return checked


RequestBuilder = Callable[[Mapping[str, Any], str], Sequence[Request]]


@dataclass(frozen=True)
class Vocabulary:
    """What a protocol contributes to rule packs.

    ``index`` names the field whose values correspond to ``Request.action`` (statement kind,
    HTTP method, Kubernetes verb, program name): the policy engine buckets rules by it.
    ``secondary`` optionally names a field with mostly literal values (tables, resources) that
    the engine uses as an inverted index inside a bucket.

    ``build_requests(case, target)`` turns the ``request:`` mapping of a policy test case into
    the requests the addon would produce (for instance one per SQL statement). Without it, a test
    case must spell out ``action`` and ``attrs``. ``test_request_schema`` (an object schema) names in
    its ``properties`` the keys such a ``request:`` may have besides ``protocol`` and ``target``;
    ``lictor test`` refuses any other key, which the builder would ignore, and checks the request
    against the schema (a quoted number where an ``integer`` is declared is refused).

    ``mask_by`` names the ``mask:`` selectors (``detectors``, ``columns``, ``json_paths``) the
    addon applies to what its targets return; a rule of the protocol with another one is an error,
    since it would mask nothing. None: any.
    """

    protocol: str
    fields: tuple[Field, ...]
    index: str | None = None
    secondary: str | None = None
    description: str = ""
    build_requests: RequestBuilder | None = None
    test_request_schema: Mapping[str, Any] | None = None
    mask_by: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # A mistake here would otherwise surface as a bare KeyError while the gateway starts, or as
        # rules that silently read another field: say which vocabulary and what is wrong, at once.
        where = f"vocabulary {self.protocol!r}"
        if not isinstance(self.protocol, str) or not self.protocol:
            raise ValueError(f"{where}: protocol must be a non-empty string")
        names: list[str] = []
        for f in self.fields:
            if not isinstance(f, Field):
                raise ValueError(f"{where}: {f!r} is not a field (Glob, Enum, Boolean, Number, Custom)")
            if f.name in names:
                raise ValueError(f"{where}: two fields are named {f.name!r}")
            names.append(f.name)
        for role in ("index", "secondary"):
            name = getattr(self, role)
            if name is not None and name not in names:
                raise ValueError(f"{where}: {role} {name!r} names no field (fields: {', '.join(names) or 'none'})")
        for selector in self.mask_by or ():
            if selector not in ("detectors", "columns", "json_paths"):
                raise ValueError(f"{where}: mask_by {selector!r} is not one of detectors, columns, json_paths")

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def when_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {f.name: f.schema() for f in self.fields},
        }
