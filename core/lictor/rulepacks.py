"""Rule packs: YAML written by security teams, validated, compiled into an immutable Policy.

Loading happens off to the side: every file is parsed, validated against the JSON Schema (the
core's part composed with the ``when:`` vocabulary of every loaded protocol addon), cross-checked
(duplicate ids, dangling role references, unknown detectors, patterns google-re2 refuses) and
compiled. Only a load without errors yields a Policy; a caller swaps it in with one assignment.

Every problem carries ``FILE:LINE:COL``.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from ._yaml import Location, LocDict, LocList, YamlError, did_you_mean, key_location, load_documents, locate, plain
from .identity import parse_duration
from .policy import CompiledRule, IdentityMapping, Policy, Role
from .vocabulary import Predicate, Vocabulary, glob_to_regex

__all__ = [
    "FORMAT",
    "TESTS_FORMAT",
    "LoadResult",
    "PolicyLoadError",
    "Problem",
    "compose_schema",
    "discover",
    "load_policy",
]

FORMAT = "lictor/v1"
TESTS_FORMAT = "lictor-tests/v1"
ACTIONS = ("allow", "deny", "approve", "mask")
IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$"


MAX_MESSAGE = 2000  # a problem quotes the offending value; a huge value is cut, not logged whole
MAX_PACK_BYTES = 16 << 20  # the largest shipped pack is ~50 KiB; a link to a huge file is a mistake, not a pack


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


@dataclass(frozen=True)
class Problem:
    loc: Location
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        tag = "" if self.severity == "error" else "warning: "
        return f"{self.loc}: {tag}{self.message}"


class PolicyLoadError(ValueError):
    """Rule packs that did not load; ``problems`` lists each with its position."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems if p.severity == "error"))


@dataclass
class LoadResult:
    policy: Policy | None
    problems: list[Problem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    test_files: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


# -- schema ---------------------------------------------------------------------------------------

_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
# An empty list is refused: it would read as "no condition" (``targets: []`` would mean every target)
# or as a condition nothing can meet, and an author who wrote one (or a template that rendered one)
# meant neither.
_STRING_OR_STRINGS = {"oneOf": [{"type": "string", "minLength": 1}, {**_STRINGS, "minItems": 1}]}
_DURATION = {"oneOf": [{"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?[smhd]?)+$"}, {"type": "number"}]}


def _approval_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["approvers"],
        "properties": {
            "approvers": {**_STRINGS, "minItems": 1, "description": "roles whose holders may approve"},
            "required": {"type": "integer", "minimum": 1, "description": "approvals needed (N of the group)"},
            "timeout": {**_DURATION, "description": "how long the request waits (default 15m)"},
            "scope": {"enum": ["once", "elevation"], "description": "this exact request once, or elevation"},
            "elevate": {
                "type": "object",
                "additionalProperties": False,
                "required": ["roles", "duration"],
                "properties": {"roles": _STRINGS, "duration": _DURATION},
            },
            "mode": {"enum": ["hold", "ticket"], "description": "hold the request, or answer with an id"},
        },
    }


def _rule_schema(protocols: Sequence[str]) -> dict[str, Any]:
    from .masking import MASK_SCHEMA

    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "protocol", "action"],
        "properties": {
            "id": {"type": "string", "pattern": IDENT, "description": "unique across all loaded packs"},
            "description": {"type": "string"},
            "protocol": {"type": "string", "enum": list(protocols)},
            "targets": {**_STRING_OR_STRINGS, "description": "target names (globs); default: all"},
            # `when: {}` (a template that rendered no condition) would read as "no condition": on an allow rule,
            # every request of the protocol; a rule meant for every request leaves `when` out
            "when": {
                "type": "object",
                "minProperties": 1,
                "description": "conditions; vocabulary depends on the protocol",
            },
            "unless": {"type": "object", "minProperties": 1, "description": "exemptions; same vocabulary as when"},
            "action": {"enum": list(ACTIONS)},
            "message": {"type": "string", "description": "shown to the agent on deny/approve"},
            "enforce": {"type": "boolean", "description": "false: shadow mode, audit only"},
            "mask": MASK_SCHEMA,
            "approval": _approval_schema(),
        },
    }


def compose_schema(vocabularies: Mapping[str, Vocabulary]) -> dict[str, Any]:
    """The full rule-pack JSON Schema: the core's part plus each protocol's ``when:`` vocabulary."""
    from .masking import DETECTOR_SCHEMA

    protocols = sorted(vocabularies)
    rule = _rule_schema(protocols)
    rule["allOf"] = [
        {
            "if": {"properties": {"protocol": {"const": name}}, "required": ["protocol"]},
            "then": {
                "properties": {
                    "when": vocabularies[name].when_schema(),
                    "unless": vocabularies[name].when_schema(),
                }
            },
        }
        for name in protocols
    ]
    match_schema = {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "sub": _STRING_OR_STRINGS,
            "email": _STRING_OR_STRINGS,
            "groups": _STRING_OR_STRINGS,
            "issuer": _STRING_OR_STRINGS,
            # `claims: {}` would be a condition that always holds: the mapping's roles for every identity
            "claims": {"type": "object", "minProperties": 1, "additionalProperties": _STRING_OR_STRINGS},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://lictor.dev/schema/rulepack.schema.json",
        "title": "Lictor rule pack",
        "type": "object",
        "additionalProperties": False,
        "required": ["format", "metadata"],
        "properties": {
            "format": {"const": FORMAT},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": IDENT},
                    "description": {"type": "string"},
                    "owner": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "detectors": {"type": "object", "additionalProperties": DETECTOR_SCHEMA},
            "identities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["match", "roles"],
                    "properties": {
                        "id": {"type": "string"},
                        "description": {"type": "string"},
                        "match": match_schema,
                        "roles": {**_STRINGS, "minItems": 1},
                    },
                },
            },
            "roles": {
                "type": "object",
                "propertyNames": {"pattern": IDENT},
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "description": {"type": "string"},
                        "inherits": _STRINGS,
                        "recording": {"enum": ["strict", "best_effort"]},
                        "rules": {"type": "array", "items": rule},
                    },
                },
            },
        },
    }


# -- discovery ------------------------------------------------------------------------------------


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """YAML files under ``paths`` (files as given, directories recursively), sorted."""
    given = [Path(raw) for raw in paths]
    roots = [p.resolve() for p in given if p.is_dir()]
    found: list[Path] = []
    for p in given:
        if p.is_dir():
            # A symlinked pack whose target is gone is kept (reading it fails with an error): skipping it would
            # silently drop the pack's rules, deny rules included, from a running gateway.
            # Emacs marks a file being edited with a dangling symlink `.#name.yaml` (a lock, never a pack): read
            # as a pack, it would fail the whole load while the buffer is modified.
            # `deny.YAML` (saved on Windows) is a pack too: left out, its deny rules would be missing without a word.
            # A symlink to a directory elsewhere is kept too (loading it is an error): the walk does not follow
            # it, and the packs there, deny rules among them, would be left out without a word. One to a
            # directory read anyway (a Kubernetes ConfigMap's `..data`, another listed directory) is not.
            found.extend(
                sorted(
                    x
                    for x in p.rglob("*")
                    if (
                        x.suffix.lower() in (".yaml", ".yml")
                        and not x.name.startswith(".#")
                        and (x.is_file() or x.is_symlink())
                    )
                    or (x.is_symlink() and x.is_dir() and not any(x.resolve().is_relative_to(r) for r in roots))
                )
            )
        else:
            found.append(p)
    seen: set[Path] = set()
    result = []
    for f in found:
        # realpath, not resolve(): a symlink loop (a.yaml -> b.yaml -> a.yaml) is kept, and reading it is an error
        # with its position; resolve() raised, which stopped `lictor check` and a live reload with a traceback
        r = Path(os.path.realpath(f))
        if r not in seen:
            seen.add(r)
            result.append(f)
    return result


# -- loading --------------------------------------------------------------------------------------


def _error_location(doc: Any, error: jsonschema.ValidationError, fallback: Location) -> tuple[Location, str]:
    path = list(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        if extra:
            node = doc
            for part in path:
                node = node[part]
            loc = key_location(node, extra[0], locate(doc, path, fallback))
            where = ".".join(str(p) for p in path) or "top level"
            hint = f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""
            return loc, f"unknown key {extra[0]!r} in {where}{did_you_mean(extra[0], allowed)}{hint}"
    if error.validator == "enum" and isinstance(error.instance, str) and isinstance(error.validator_value, list):
        # `statements: [copy_programm]`: name the likely value before the list of every value
        known = [str(v) for v in error.validator_value]
        where = ".".join(str(p) for p in path)
        hint = did_you_mean(error.instance, known)
        message = f"unknown value {error.instance!r}{hint}; expected one of: {', '.join(known)}"
        return locate(doc, path, fallback), f"{where}: {message}" if where else message
    if error.instance is None and error.validator in ("type", "oneOf", "anyOf") and path:
        # `when:` with its conditions commented out: "None is not of type 'object'" named Python's word for it
        where = ".".join(str(p) for p in path)
        return locate(doc, path, fallback), (
            f"{where}: no value (a key with nothing after it, or only a comment, is null to YAML); write its value"
        )
    if error.validator == "minProperties" and error.instance == {} and path and path[-1] in ("when", "unless"):
        where = ".".join(str(p) for p in path)
        if path[-1] == "unless":
            return locate(doc, path, fallback), f"{where}: empty; write the exemption's conditions, or leave unless out"
        return locate(doc, path, fallback), (
            f"{where}: empty; it would read as no condition (on an allow rule: every request of the protocol): "
            "write its conditions, or leave when out for a rule that applies to every request"
        )
    if error.validator == "required":
        where = ".".join(str(p) for p in path) or "top level"
        return locate(doc, path, fallback), f"{where}: {message}"
    if error.validator == "type" and error.validator_value == "array" and isinstance(error.instance, str):
        where = ".".join(str(p) for p in path)
        return locate(doc, path, fallback), f"{where}: a list is expected here: write [{error.instance}]"
    if error.validator == "pattern" and error.validator_value == _DURATION["oneOf"][0]["pattern"]:
        where = ".".join(str(p) for p in path)
        return locate(doc, path, fallback), f"{where}: bad duration {error.instance!r}: use forms like 30s, 15m, 1h, 2d"
    alternatives = error.validator_value if error.validator == "anyOf" else None
    if isinstance(alternatives, list) and all(isinstance(a, dict) and a.get("required") for a in alternatives):
        # a mask block's `detectors`, `columns` or `json_paths`: say which keys, not "not valid under any schema"
        names = [str(name) for a in alternatives for name in a["required"]]
        where = ".".join(str(p) for p in path) or "top level"
        return locate(doc, path, fallback), f"{where}: needs one of {', '.join(names)}, not empty"
    if isinstance(error.instance, (bool, int, float, datetime.date)):
        if error.validator == "oneOf":
            types = {str(alt.get("type")) for alt in error.validator_value if isinstance(alt, dict)}
        else:  # a list item: `settings: [on]`, `tables: [0x1f]`
            types = {str(error.validator_value)} if error.validator == "type" else set()
        if "string" in types and "boolean" not in types and "number" not in types:
            # YAML reads true, yes, on, 42, 0x1f and 2024-01-01 as booleans, numbers and dates; here only text will do
            if isinstance(error.instance, datetime.date):
                read = f"the date {error.instance.isoformat()}"
            else:
                kind = "boolean" if isinstance(error.instance, bool) else "number"
                read = f"the {kind} {json.dumps(error.instance)}"
            message = f"YAML reads this value as {read}, not as text: put it in quotes"
    where = ".".join(str(p) for p in path)
    return locate(doc, path, fallback), f"{where}: {message}" if where else message


def _validate(
    doc: Any, schema: Mapping[str, Any], fallback: Location, validator: jsonschema.Draft202012Validator | None = None
) -> list[Problem]:
    validator = validator or jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        # oneOf errors are noisy; report the most specific sub-error.
        best = jsonschema.exceptions.best_match([error])
        loc, msg = _error_location(doc, best, fallback)
        problems.append(Problem(loc, msg))
    return problems


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


_PROSE = frozenset({"description", "message", "metadata"})  # free text: words of any script, side by side
_INVISIBLE = (
    frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad")
    | frozenset(map(chr, range(0x202A, 0x202F)))
    | frozenset(map(chr, range(0x2066, 0x206A)))
)


# Characters drawn as a space that YAML keeps in a value (it separates words with spaces and tabs only).
_SPACE_LOOKALIKES = frozenset("\u00a0\u1680\u202f\u205f\u3000") | frozenset(map(chr, range(0x2000, 0x200B)))


def _lookalike(text: str, spaces: bool = True) -> str | None:
    """Why ``text`` likely does not say what it shows: an invisible character, or a word mixing Latin
    letters with letters of another script (a Cyrillic "e", U+0435, in "reader" matches only text spelt
    with it)."""
    if text.isascii():
        return None
    for i, ch in enumerate(text):
        if ch in _INVISIBLE:
            return f"an invisible character U+{ord(ch):04X} at position {i + 1}; delete it"
        if spaces and ch in _SPACE_LOOKALIKES:
            # `tables: [secrets, audit_log]` pasted from a web page: the item is "\xa0audit_log", which no table is
            return (
                f"U+{ord(ch):04X} {unicodedata.name(ch, '')} at position {i + 1}, which shows as a space but is not "
                "one (the value matches only text spelt with it); delete it or type a space"
            )
    for word in text.split():
        latin = foreign = None
        for ch in word:
            if not ch.isalpha():
                continue
            name = unicodedata.name(ch, "")
            if name.startswith("LATIN") and ch.isascii():
                latin = latin or ch
            elif not name.startswith("LATIN") and foreign is None:
                foreign = ch
        if latin and foreign:
            at = text.index(foreign) + 1
            return (
                f"{foreign!r} ({unicodedata.name(foreign, '?')}, U+{ord(foreign):04X}) at position {at} among Latin "
                "letters: a look-alike matches only text spelt with the same character; type it again"
            )
    return None


class _Compiler:
    def __init__(
        self,
        vocabularies: Mapping[str, Vocabulary],
        targets: Mapping[str, str] | None,
        mask_key: bytes,
    ) -> None:
        self.vocabularies = vocabularies
        self.targets = targets  # target name -> protocol (None: not checked)
        self.mask_key = mask_key
        self.problems: list[Problem] = []
        self.roles: dict[str, tuple[Role, Location]] = {}
        self.role_refs: list[tuple[str, Location, str]] = []
        self.mappings: list[IdentityMapping] = []
        self.rule_ids: dict[str, Location] = {}
        self.identity_ids: dict[tuple[str, str], Location] = {}  # (pack, id): each pack names its own
        self.pack_names: dict[str, Location] = {}
        self.detectors: dict[str, Any] = {}
        self.packs: dict[str, Mapping[str, Any]] = {}
        self.mask_blocks: list[tuple[Mapping[str, Any], Location]] = []
        self.approver_sets: list[tuple[str, tuple[str, ...], Location]] = []  # approve rules: (id, approvers, at)
        self.elevation_roles: set[str] = set()
        self.order = 0
        self._when_validators: dict[str, jsonschema.Draft202012Validator] = {}
        self._schema_problems = False  # the document being compiled already failed the schema check
        self._doc: Any = None  # the document being compiled
        base = {name: Vocabulary(name, ()) for name in vocabularies}
        schema = compose_schema(base)
        rule = schema["properties"]["roles"]["additionalProperties"]["properties"]["rules"]["items"]
        rule.pop("allOf", None)
        rule["properties"]["protocol"] = {"type": "string"}  # unknown protocols: one clearer error below
        self.base_schema = schema

    def error(self, loc: Location, message: str) -> None:
        message = _bounded(message)
        if any(p.loc == loc and p.message.endswith(f": {message}") for p in self.problems):
            return  # the schema said it already, naming where (a bad duration)
        self.problems.append(Problem(loc, message))

    def warn(self, loc: Location, message: str) -> None:
        self.problems.append(Problem(loc, _bounded(message), "warning"))

    @contextlib.contextmanager
    def _part(self, loc: Location) -> Iterator[None]:
        """Compile one part of a pack. A value of the wrong shape is a problem at ``loc``, never a crash
        (a crash would stop ``lictor check`` and, on a live reload, leave the rejection unreported)."""
        try:
            yield
        except Exception as exc:
            if not self._schema_problems:  # otherwise the schema problems already say what is wrong
                self.error(loc, f"cannot compile this part of the pack ({type(exc).__name__}: {exc})")

    def add_document(self, doc: Any, path: Path, fallback: Location) -> None:
        problems = _validate(doc, self.base_schema, fallback)
        self._schema_problems = bool(problems)
        if problems:
            self.problems.extend(problems)
            if isinstance(doc, dict) and doc.get("format") != FORMAT:
                return
        if not isinstance(doc, LocDict):
            return
        self._doc = doc
        self._lookalikes(doc, doc.loc)
        meta = doc.get("metadata") or {}
        name = str(meta.get("name", path.stem)) if isinstance(meta, dict) else path.stem
        if name in self.pack_names:
            self.error(
                locate(doc, ["metadata", "name"], fallback),
                f"duplicate pack name {name!r} (also at {self.pack_names[name]})",
            )
        self.pack_names[name] = locate(doc, ["metadata", "name"], fallback)
        self.packs[name] = {"file": str(path), **plain(meta)} if isinstance(meta, dict) else {}
        with self._part(locate(doc, ["detectors"], fallback)):
            self._detectors(doc, fallback)
        identities = doc.get("identities")
        for i, entry in enumerate(identities if isinstance(identities, list) else []):
            if not isinstance(entry, dict):
                continue
            with self._part(locate(doc, ["identities", i], fallback)):
                self._identity(doc, name, i, entry, fallback)
        roles = doc.get("roles") or {}
        if isinstance(roles, LocDict):
            for role_name, body in roles.items():
                if isinstance(body, dict):
                    with self._part(key_location(roles, role_name, fallback)):
                        self._role(doc, name, role_name, body, fallback)

    def _globs(self, node: Any, loc: Location, what: str) -> None:
        """An unclosed ``[`` is read by fnmatch as a literal: the glob would never match what was meant (a deny
        scoped to ``targets: ["prod-[ab"]`` would deny nothing), so it is an error here as in ``when:``."""
        items = [node] if isinstance(node, str) else list(node) if isinstance(node, list) else []
        locs = node.item_locs if isinstance(node, LocList) else [loc] * len(items)
        for item, item_loc in zip(items, locs, strict=False):
            try:
                glob_to_regex(str(item))
            except ValueError as exc:
                self.error(item_loc, f"{what}: {exc}")

    def _lookalikes(self, node: Any, loc: Location, spaces: bool = True) -> None:
        """Warn about keys and values that do not read as they look (see ``_lookalike``). ``spaces``: warn about
        look-alikes of a space too (not in detector patterns, which may look for a no-break space on purpose)."""
        if isinstance(node, LocDict):
            for key, value in node.items():
                why = _lookalike(key, spaces)
                if why:
                    self.warn(node.key_locs.get(key, node.loc), f"{key!r} holds {why}")
                if key not in _PROSE:
                    self._lookalikes(
                        value,
                        node.value_locs.get(key, node.loc),
                        spaces and not (node is self._doc and key == "detectors"),
                    )
        elif isinstance(node, LocList):
            for item, item_loc in zip(node, node.item_locs, strict=False):
                self._lookalikes(item, item_loc, spaces)
        elif isinstance(node, str):
            why = _lookalike(node, spaces)
            if why:
                self.warn(loc, f"{node!r} holds {why}")

    def _detectors(self, doc: LocDict, fallback: Location) -> None:
        from .masking import MaskingError, compile_detector

        dets = doc.get("detectors") or {}
        if not isinstance(dets, dict):
            return
        for det_name, spec in dets.items():
            loc = locate(doc, ["detectors", det_name], fallback)
            duplicate = det_name in self.detectors
            if duplicate:
                self.error(loc, f"duplicate detector {det_name!r}")  # its pattern is still checked, not kept
            if not isinstance(spec, dict) or "pattern" not in spec:
                continue
            try:
                detector = compile_detector(
                    det_name,
                    str(spec["pattern"]),
                    spec.get("validator"),
                    int(spec.get("group", 0)),
                    style=spec.get("style"),
                    keep=spec.get("keep"),
                )
                if not duplicate:
                    self.detectors[det_name] = detector
            except MaskingError as exc:
                self.error(locate(doc, ["detectors", det_name, "pattern"], loc), str(exc))

    def _identity(self, doc: LocDict, pack: str, i: int, entry: Mapping[str, Any], fb: Location) -> None:
        match = entry.get("match") or {}
        conditions: list[tuple[str, tuple[str, ...]]] = []
        if isinstance(match, dict):
            for key in ("sub", "email", "groups", "issuer"):
                if key in match:
                    claim = "iss" if key == "issuer" else key
                    conditions.append((claim, _strings(match[key])))
                    self._globs(match[key], locate(doc, ["identities", i, "match", key], fb), f"match.{key}")
            for claim, value in (match.get("claims") or {}).items():
                conditions.append((str(claim), _strings(value)))
                self._globs(
                    value, locate(doc, ["identities", i, "match", "claims", claim], fb), f"match.claims.{claim}"
                )
        roles = _strings(entry.get("roles"))
        roles_node = entry.get("roles")
        for j, role in enumerate(roles):
            loc = roles_node.item_locs[j] if isinstance(roles_node, LocList) else locate(doc, ["identities", i], fb)
            self.role_refs.append((role, loc, "identity mapping"))
        if "id" in entry:
            # an identity mapping's id names it in `lictor explain` and in what a pack's tests report
            mid = (pack, str(entry["id"]))
            where = locate(doc, ["identities", i, "id"], fb)
            if mid in self.identity_ids:
                self.error(where, f"duplicate identity mapping id {mid[1]!r} (also at {self.identity_ids[mid]})")
            else:
                self.identity_ids[mid] = where
        self.mappings.append(IdentityMapping(str(entry.get("id", f"{pack}#{i}")), pack, tuple(conditions), roles))

    def _role(self, doc: LocDict, pack: str, role_name: str, body: Mapping[str, Any], fb: Location) -> None:
        loc = key_location(doc["roles"], role_name, fb)
        duplicate = role_name in self.roles
        if duplicate:
            # the body is still compiled (and not kept): its own errors are reported in the same load, not one
            # load later, once the name is fixed
            self.error(loc, f"duplicate role {role_name!r} (also at {self.roles[role_name][1]})")
        inherits = _strings(body.get("inherits"))
        inh_node = body.get("inherits")
        for j, parent in enumerate(inherits):
            ploc = inh_node.item_locs[j] if isinstance(inh_node, LocList) else loc
            self.role_refs.append((parent, ploc, f"role {role_name!r} inherits"))
        rules: list[CompiledRule] = []
        rule_nodes = body.get("rules")
        for k, rule in enumerate(rule_nodes if isinstance(rule_nodes, list) else []):
            if isinstance(rule, dict):
                with self._part(locate(doc, ["roles", role_name, "rules", k], fb)):
                    compiled = self._rule(doc, pack, role_name, k, rule, fb)
                    if compiled is not None:
                        rules.append(compiled)
        role = Role(
            role_name,
            pack,
            str(body.get("description", "")),
            inherits,
            str(body.get("recording", "best_effort")),
            tuple(rules),
        )
        if not duplicate:
            self.roles[role_name] = (role, loc)

    def _conditions(
        self, doc: LocDict, path: list[Any], vocab: Vocabulary, block: Any, fb: Location
    ) -> tuple[tuple[tuple[str, Predicate], ...], bool]:
        preds: list[tuple[str, Predicate]] = []
        ok = True
        if block is None:
            return (), True
        if not isinstance(block, dict):
            # `when: select`: the schema says it is not a mapping; compiled as "no condition", the rule would have
            # matched every request (and the checks that read its conditions failed on it)
            return (), False
        validator = self._when_validators.get(vocab.protocol)
        if validator is None:
            validator = jsonschema.Draft202012Validator(vocab.when_schema())
            self._when_validators[vocab.protocol] = validator
        where = ".".join(str(p) for p in path)
        for problem in _validate(block, {}, locate(doc, path, fb), validator):
            self.error(problem.loc, problem.message.replace("in top level", f"in {where}", 1))
            ok = False
        if not ok:
            return (), False
        for name, value in block.items():
            try:
                preds.append((name, vocab.field(name).compile(plain(value))))
            except (ValueError, KeyError) as exc:
                self.error(locate(doc, [*path, name], fb), f"{'.'.join(map(str, path))}.{name}: {exc}")
                ok = False
        return tuple(preds), ok

    def _rule(
        self, doc: LocDict, pack: str, role: str, k: int, rule: Mapping[str, Any], fb: Location
    ) -> CompiledRule | None:
        path: list[Any] = ["roles", role, "rules", k]
        loc = locate(doc, path, fb)
        rid = str(rule.get("id", ""))
        # A rule whose id is refused is still checked to the end (and then not kept): every error of a load is
        # reported together, not the rest of the rule's one load after its id is fixed.
        id_ok = True
        if rid.lower().startswith("lictor:"):
            # the gateway's own decisions carry these ids (lictor:default-deny...): a rule so named would read, in
            # the audit log and in policy tests, as one of them
            self.error(
                locate(doc, [*path, "id"], loc),
                f"rule id {rid!r}: ids starting with 'lictor:' are reserved for the gateway's own decisions; "
                "name the rule otherwise",
            )
            id_ok = False
        elif rid in self.rule_ids:
            self.error(locate(doc, [*path, "id"], loc), f"duplicate rule id {rid!r} (also at {self.rule_ids[rid]})")
            id_ok = False
        else:
            self.rule_ids[rid] = locate(doc, [*path, "id"], loc)
        protocol = str(rule.get("protocol", ""))
        vocab = self.vocabularies.get(protocol)
        if vocab is None:
            known = ", ".join(sorted(self.vocabularies)) or "none"
            self.error(
                locate(doc, [*path, "protocol"], loc),
                f"unknown protocol {protocol!r} (loaded: {known}; load its addon with -c lictor.yaml or --addon)",
            )
            return None
        targets = _strings(rule.get("targets"))
        self._globs(rule.get("targets"), locate(doc, [*path, "targets"], loc), "targets")
        if self.targets is not None:
            tnode = rule.get("targets")
            for j, t in enumerate(targets):
                tloc = tnode.item_locs[j] if isinstance(tnode, LocList) else locate(doc, [*path, "targets"], loc)
                if any(c in t for c in "*?["):
                    # a pattern that names no target makes the rule do nothing, a deny included
                    if not any(fnmatch.fnmatchcase(name, t) for name in self.targets):
                        folded = sorted(n for n in self.targets if fnmatch.fnmatchcase(n.lower(), t.lower()))
                        hint = f" (target names are case-sensitive: {', '.join(folded)})" if folded else ""
                        self.warn(tloc, f"target pattern {t!r} matches no target in the gateway config{hint}")
                    continue
                if t not in self.targets:
                    known = ", ".join(sorted(self.targets)) or "none"
                    self.error(tloc, f"unknown target {t!r} (targets in the gateway config: {known})")
                elif self.targets[t] != protocol and not (
                    protocol == "kubernetes" and self.targets[t] in ("http", "kubernetes")
                ):
                    self.error(tloc, f"target {t!r} is a {self.targets[t]} target, not {protocol}")
        when, ok1 = self._conditions(doc, [*path, "when"], vocab, rule.get("when"), fb)
        unless, ok2 = self._conditions(doc, [*path, "unless"], vocab, rule.get("unless"), fb)
        action = str(rule.get("action"))
        mask = rule.get("mask")
        if action == "mask" and not mask:
            self.error(loc, f"rule {rid!r}: action mask needs a mask: block")
        if action == "deny" and mask:
            self.warn(locate(doc, [*path, "mask"], loc), f"rule {rid!r}: mask on a deny rule has no effect")
        if mask:
            self.mask_blocks.append((plain(mask), locate(doc, [*path, "mask"], loc)))
        if isinstance(mask, dict) and vocab.mask_by is not None:
            for key in ("detectors", "columns", "json_paths"):
                if key in mask and key not in vocab.mask_by:
                    self.error(
                        locate(doc, [*path, "mask", key], loc),
                        f"rule {rid!r}: mask.{key} masks nothing in {protocol} responses "
                        f"(they are masked by {', '.join(vocab.mask_by)})",
                    )
        approval = rule.get("approval")
        if action == "approve":
            approval = approval or {}
            if not approval.get("approvers"):
                self.error(
                    loc,
                    f"rule {rid!r}: an approve rule needs approval.approvers (the roles that may approve)",
                )
            if approval.get("approvers"):
                self.approver_sets.append(
                    (rid, _strings(approval.get("approvers")), locate(doc, [*path, "approval", "approvers"], loc))
                )
            for j, a in enumerate(_strings(approval.get("approvers"))):
                anode = approval.get("approvers")
                aloc = anode.item_locs[j] if isinstance(anode, LocList) else loc
                self.role_refs.append((a, aloc, f"rule {rid!r} approvers"))
            el = approval.get("elevate") or {}
            for a in _strings(el.get("roles")):
                self.elevation_roles.add(a)
                self.role_refs.append((a, locate(doc, [*path, "approval", "elevate"], loc), f"rule {rid!r} elevation"))
            for key in ("timeout",):
                if key in approval:
                    try:
                        parse_duration(approval[key])
                    except ValueError as exc:
                        self.error(locate(doc, [*path, "approval", key], loc), str(exc))
            if approval.get("scope") == "elevation" and not el:
                self.error(loc, f"rule {rid!r}: scope elevation needs approval.elevate (roles, duration)")
        elif approval and action == "allow":
            # the author expected a human to approve, and the rule would allow without one
            self.error(
                locate(doc, [*path, "approval"], loc),
                f"rule {rid!r}: an allow rule with an approval block allows without approval; "
                "write action: approve to hold for a human, or remove the approval block",
            )
        elif approval:
            self.warn(
                locate(doc, [*path, "approval"], loc),
                f"rule {rid!r}: approval block on a {action} rule is ignored (remove it)",
            )
        if rule.get("enforce") is False and action in ("allow", "mask"):
            self.warn(
                locate(doc, [*path, "enforce"], loc),
                f"rule {rid!r}: enforce: false makes this {action} rule do nothing, and nothing is reported "
                "(shadow results are for deny and approve rules); remove the rule or enforce it",
            )
        if not (ok1 and ok2 and id_ok):
            return None
        when_raw = plain(rule.get("when") or {})
        index_values: frozenset[str] | None = None
        secondary_values: frozenset[str] | None = None
        if vocab.index and vocab.index in when_raw:
            index_values = vocab.field(vocab.index).literals(when_raw[vocab.index])
        if vocab.secondary and vocab.secondary in when_raw:
            secondary_values = vocab.field(vocab.secondary).literals(when_raw[vocab.secondary])
        self.order += 1
        return CompiledRule(
            id=rid,
            pack=pack,
            role=role,
            protocol=protocol,
            action=action,
            enforce=bool(rule.get("enforce", True)),
            message=str(rule.get("message", "")).strip(),
            order=self.order,
            targets=targets,
            when=when,
            unless=unless,
            index_values=index_values,
            secondary_values=secondary_values,
            mask=plain(mask) if mask else None,
            approval=plain(approval) if approval else None,
            source=str(loc),
            location=loc,
            when_raw=when_raw,
            unless_raw=plain(rule.get("unless") or {}),
        )

    def _shadowed(self, rules: list[CompiledRule], fb: Location, inherited: Sequence[CompiledRule] = ()) -> None:
        """Warn about rules an unconditional-enough deny of the same role makes unreachable.

        Rule order does not change a decision, so a deny written after the rule shadows it too; so does a deny
        of a role it inherits (``inherited``: every holder of the role holds that one too). A deny covers a
        rule when its targets are none or the rule's, it has no ``unless`` and every one of its conditions is
        also one of the rule's (or its only condition is a literal index field that includes the rule's values).

        The denies are indexed by the fields they use, not compared with every rule: a generated pack of
        thousands of rules in one role would otherwise take minutes to reload."""

        def canon(value: Any) -> str:
            return json.dumps(value, sort_keys=True, default=str)

        # (protocol, condition fields) -> (targets, each field's value) -> position of the first such deny
        by_shape: dict[tuple[str, tuple[str, ...]], dict[tuple[Any, ...], int]] = {}
        # protocol -> one index value -> (position, targets, index values) of denies on the index field alone
        by_index: dict[str, dict[str, list[tuple[int, tuple[str, ...], frozenset[str]]]]] = {}
        every = [*rules, *inherited]
        for pos, rule in enumerate(every):
            if rule.action != "deny" or not rule.enforce or rule.unless_raw:
                continue
            keys = tuple(sorted(rule.when_raw))
            signature = (rule.targets, *(canon(rule.when_raw[k]) for k in keys))
            by_shape.setdefault((rule.protocol, keys), {}).setdefault(signature, pos)
            idx = self.vocabularies[rule.protocol].index
            if idx is not None and keys == (idx,) and rule.index_values is not None:
                for value in rule.index_values:
                    by_index.setdefault(rule.protocol, {}).setdefault(value, []).append(
                        (pos, rule.targets, rule.index_values)
                    )
        for later in rules:
            if later.action == "deny":
                continue
            found: int | None = None
            for (protocol, keys), signatures in by_shape.items():
                if protocol != later.protocol or not all(k in later.when_raw for k in keys):
                    continue
                shown = tuple(canon(later.when_raw[k]) for k in keys)
                for targets in {(), later.targets}:
                    hit = signatures.get((targets, *shown))
                    if hit is not None and (found is None or hit < found):
                        found = hit
            if later.index_values:
                some = min(later.index_values)
                for pos, targets, values in by_index.get(later.protocol, {}).get(some, ()):
                    if found is not None and pos >= found:
                        break
                    if (not targets or targets == later.targets) and later.index_values <= values:
                        found = pos
                        break
            if found is None:
                continue
            earlier = every[found]
            of = "" if earlier.role == later.role else f" of role {earlier.role!r}, which {later.role!r} inherits,"
            self.warn(
                later.location or fb,
                f"rule {later.id!r} can never match: rule {earlier.id!r} ({earlier.source}){of} denies "
                "everything it covers (a deny wins whatever the rule order)",
            )

    def finish(self) -> None:
        from .masking import STYLES, MaskingError, MaskPlan

        for role_name, loc, what in self.role_refs:
            if role_name not in self.roles:
                known = ", ".join(sorted(self.roles)) or "none"
                self.error(loc, f"{what}: unknown role {role_name!r} (roles defined: {known})")
        # What each role inherits, directly or through others, nearest first (a role in its own list is a cycle).
        lineage = {name: self._inherited(name) for name in self.roles}
        # Roles someone can hold: granted by an identity mapping or an elevation, or inherited from such a role. An
        # approve rule whose approvers are none of these holds every request it matches until the timeout, then
        # denies it.
        held = {r for m in self.mappings for r in m.roles} | self.elevation_roles
        held |= {a for r in held if r in lineage for a in lineage[r]}
        for rid, approvers, loc in self.approver_sets:
            if all(a in self.roles for a in approvers) and not held & set(approvers):
                self.warn(
                    loc,
                    f"rule {rid!r}: no identity mapping grants {', '.join(approvers)} (directly or by inheritance), so "
                    "nobody can approve: what the rule holds waits for its timeout and is denied; map the approvers' "
                    "identities to one of these roles",
                )
        for block, loc in self.mask_blocks:
            if isinstance(block, Mapping) and (
                set(block) - {"detectors", "columns", "json_paths", "style", "keep"}
                or block.get("style", "redact") not in STYLES
            ):
                continue  # the schema has reported the unknown key or style, with a suggestion: not twice
            try:
                MaskPlan.compile([block], custom_detectors=self.detectors, key=self.mask_key)
            except MaskingError as exc:
                self.error(loc, str(exc))
        for name, (role, loc) in self.roles.items():
            inherited = [r for a in lineage[name] if a != name for r in self.roles[a][0].rules if r.action == "deny"]
            self._shadowed(list(role.rules), loc, inherited)
            if name in lineage[name]:
                self.error(loc, f"role {name!r} inherits itself (cycle)")

    def _inherited(self, name: str) -> list[str]:
        """The defined roles ``name`` inherits, directly or through others, nearest first; ``name`` itself is
        among them when the inheritance comes back to it (a cycle)."""
        found: list[str] = []
        pending = list(self.roles[name][0].inherits)
        while pending:
            parent = pending.pop(0)
            if parent not in found and parent in self.roles:
                found.append(parent)
                pending.extend(self.roles[parent][0].inherits)
        return found


# A file whose top level says it holds policy tests, and nowhere that it holds a pack: read even when it does not parse.
_TESTS_LINE = re.compile(r"^format[ \t]*:[ \t]*(['\"]?)" + re.escape(TESTS_FORMAT) + r"\1[ \t]*(#.*)?\r?$", re.M)
_PACK_LINE = re.compile(r"^format[ \t]*:[ \t]*['\"]?" + re.escape(FORMAT), re.M)
_NOT_TESTS = (
    "a document of format {fmt!r} in a file of policy tests: `lictor test` fails on it (a file holds packs or tests, "
    "not both; tests are format: " + TESTS_FORMAT + ")"
)


def load_policy(
    paths: Iterable[str | Path],
    vocabularies: Mapping[str, Vocabulary],
    *,
    targets: Mapping[str, str] | None = None,
    mask_key: bytes = b"lictor-check-only-key-32-bytes!!",
    role_references: Iterable[tuple[str, Location, str]] = (),
) -> LoadResult:
    """Load every rule pack under ``paths``. The result has a Policy only when there are no errors.

    Files whose ``format`` is ``lictor-tests/v1`` are policy tests: listed, not loaded. ``targets`` (name ->
    protocol) and ``role_references`` (role, location, what names it) come from the gateway config: the packs'
    ``targets`` must name its targets, and the roles it names must be defined by the packs.
    """
    files = discover(paths)
    result = LoadResult(policy=None, files=[])
    compiler = _Compiler(vocabularies, targets, mask_key)
    digest = hashlib.sha256()
    for path in files:
        fallback = Location(str(path), 1, 1)
        if path.is_dir():
            compiler.error(
                fallback,
                f"a link to the directory {path.resolve()}: packs are not read through links to directories; "
                "list that directory in rulepacks (or pass it to lictor check) instead",
            )
            continue
        if path.exists() and not path.is_file():
            # a FIFO or a device (a pack linked to /dev/zero): reading it would block or never end, and with it
            # the reload, which holds its lock meanwhile, so no later edit of any pack would go live
            compiler.error(fallback, "not a regular file (a FIFO, device or socket): rule packs are read from files")
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_size > MAX_PACK_BYTES:
                compiler.error(
                    fallback,
                    f"{path.stat().st_size} bytes, more than a rule pack may have ({MAX_PACK_BYTES}); "
                    "split it into several files",
                )
                continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            # saved as Latin-1 or Windows-1252 by an editor: point at the byte, not at the top of the file
            before = exc.object[: exc.start]
            line = before.count(b"\n") + 1
            col = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
            compiler.error(
                Location(str(path), line, col),
                f"not UTF-8: byte 0x{exc.object[exc.start]:02x} cannot start or continue a character; "
                "save the file as UTF-8",
            )
            continue
        except OSError as exc:
            compiler.error(fallback, f"cannot read: {exc}")
            continue
        try:
            docs = load_documents(text, str(path))
        except YamlError as exc:
            if _TESTS_LINE.search(text) and not _PACK_LINE.search(text):
                # Policy tests, not policy: what enforces is the packs, and a tests file that does not parse must not
                # keep a good edit of them from going live (nor fail a gateway's start). `lictor test` fails on it.
                result.test_files.append(path)
                compiler.warn(exc.loc, f"policy tests that do not parse ({exc.message}); `lictor test` fails on them")
                continue
            compiler.error(exc.loc, exc.message)
            continue
        docs = [d for d in docs if d is not None]
        if not docs:
            # An error, not a warning: a half-saved edit (`cat > pack.yaml`) would otherwise drop the pack's
            # rules from a running gateway. To remove a pack, delete its file.
            compiler.error(fallback, "empty file: a rule pack file must hold a pack (delete the file to remove one)")
            continue
        formats = [d.get("format") if isinstance(d, dict) else None for d in docs]
        if TESTS_FORMAT in formats and FORMAT not in formats:
            # policy tests (a document among them that is not, a misspelt format, is for `lictor test` to fail on)
            result.test_files.append(path)
            for doc, fmt in zip(docs, formats, strict=True):
                if fmt != TESTS_FORMAT:
                    compiler.warn(getattr(doc, "loc", fallback), _NOT_TESTS.format(fmt=fmt))
            continue
        result.files.append(path)
        digest.update(path.name.encode() + b"\0" + text.encode() + b"\0")
        for doc in docs:
            if not isinstance(doc, dict):
                compiler.error(getattr(doc, "loc", fallback), "a rule pack must be a mapping")
                continue
            if doc.get("format") != FORMAT:
                message = (
                    f"unsupported format {doc.get('format')!r}: expected {FORMAT!r} (or {TESTS_FORMAT!r} for tests)"
                )
                if doc.get("format") == TESTS_FORMAT:
                    # accepted as the format of a tests file, and refused here: say what is wrong with it
                    message = (
                        f"policy tests ({TESTS_FORMAT}) in a file that holds a rule pack: a file holds packs or "
                        "tests, not both; move the tests to a file of their own (such as NAME.tests.yaml)"
                    )
                elif "format" not in doc and ("targets" in doc or "rulepacks" in doc):
                    # `lictor check examples/http` reads the directory's lictor.yaml as a pack too
                    message = (
                        f"this is a gateway config, not a rule pack: `lictor check -c {path}` checks it and the "
                        "rule packs it lists; give only rule pack files or directories as paths"
                    )
                compiler.error(locate(doc, ["format"], fallback), message)
                continue
            compiler.add_document(doc, path, fallback)
    if len(result.files) + len(result.test_files) == len(files):
        # Only when every pack was read: a role of a pack that does not parse would be "unknown" here, a second error
        # about the config for what one error in the pack says.
        compiler.role_refs.extend(role_references)
    compiler.finish()
    result.problems = sorted(compiler.problems, key=lambda p: (p.loc.file, p.loc.line, p.loc.col))
    if not result.errors:
        roles = {name: role for name, (role, _) in compiler.roles.items()}
        version = digest.hexdigest()[:16] if result.files else "empty"
        result.policy = Policy(version, compiler.packs, roles, compiler.mappings, vocabularies, compiler.detectors)
    return result


def schema_json(vocabularies: Mapping[str, Vocabulary]) -> str:
    return json.dumps(compose_schema(vocabularies), indent=2, sort_keys=True) + "\n"
