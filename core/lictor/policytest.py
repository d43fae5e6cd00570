"""``lictor test``: policy unit tests in YAML, with per-rule coverage.

A test file (``format: lictor-tests/v1``) lists cases; each gives identity claims, a request in
the protocol's own terms (``sql:`` for PostgreSQL, ``method``/``path`` for HTTP, ``command:`` for
SSH, or ``action`` + ``attrs`` for any protocol) and the expected outcome.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._yaml import Location, YamlError, did_you_mean, key_location, load_documents, plain
from .identity import Identity
from .policy import Policy
from .policy_types import DEFAULT_DENY, Decision, Request, combine
from .rulepacks import TESTS_FORMAT
from .vocabulary import Boolean, Enum, Glob, Number

__all__ = ["CaseResult", "TestReport", "build_requests", "identity_from_spec", "run_tests"]


@dataclass
class CaseResult:
    file: str
    line: int
    name: str
    passed: bool
    decision: Decision | None
    message: str


@dataclass
class TestReport:
    cases: list[CaseResult] = field(default_factory=list)
    covered: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cases if not c.passed) + len(self.errors)

    @property
    def passed(self) -> int:
        return sum(1 for c in self.cases if c.passed)


def identity_from_spec(spec: Mapping[str, Any]) -> Identity:
    """``{sub: x, claims: {...}}`` or a flat mapping of claims with ``sub``."""
    given = spec.get("claims") or {}
    if not isinstance(given, Mapping):
        # `claims: [role, reader]`: what a token carries is a JSON object of claims
        raise ValueError(f"identity.claims must be a mapping of claim names to values, not {_kind(given)}")
    claims = dict(given)
    for k, v in spec.items():
        if k not in ("claims",):
            claims.setdefault(k, v)
    sub = str(claims.get("sub", "test-agent"))
    claims["sub"] = sub
    return Identity(subject=sub, claims=claims, issuer=str(claims.get("iss", "lictor")))


def build_requests(policy: Policy, spec: Mapping[str, Any]) -> list[Request]:
    for key in ("protocol", "target", "action"):
        # `target: [a, b]` was read as the target named "['a', 'b']", which no rule names: a deny scoped to
        # those targets never fired, and a case expecting the default deny passed
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"{key} must be a string, not {_kind(spec[key])}")
    protocol = str(spec.get("protocol", ""))
    target = str(spec.get("target", ""))
    if not target:
        # Every real request names its target; evaluated against no target, rules scoped to targets would be
        # skipped and a deny on `targets: [prod]` reported as allowed.
        scoped = sorted({r.id for r in policy.rules if r.protocol == protocol and r.targets})
        if scoped:
            raise ValueError(f"the request needs a target (rules {', '.join(scoped[:5])} apply only to some targets)")
    vocab = policy.vocabularies.get(protocol)
    if vocab is None:
        # an `action` + `attrs` request of a misspelt protocol met no rule: every `deny` expectation passed
        known = ", ".join(sorted(policy.vocabularies)) or "none"
        what = f"unknown protocol {protocol!r}" if protocol else "the request needs a protocol"
        raise ValueError(f"{what} (loaded: {known})")
    if "action" in spec:
        attrs = spec.get("attrs") or {}
        if not isinstance(attrs, Mapping):
            raise ValueError(f"attrs must be a mapping of attribute names to values, not {_kind(attrs)}")
        _check_attrs(vocab, attrs)
        # attrs are named as the request carries them, which is not always the `when:` field's name
        # (`statements` reads `kinds`): under the field's name no rule sees the value, and a case expecting
        # a deny passed without testing it.
        fields = [f for f in vocab.fields if isinstance(f, (Glob, Enum, Boolean, Number))]
        read = {f.attribute for f in vocab.fields}
        for f in fields:
            if isinstance(attrs, Mapping) and f.name in attrs and f.name not in read:
                raise ValueError(f"attrs.{f.name}: rules read the {f.name!r} field from the attribute {f.attribute!r}")
        return [
            Request(
                protocol=protocol,
                action=str(spec["action"]),
                attrs=dict(spec.get("attrs") or {}),
                target=target,
                summary=str(spec.get("summary", spec["action"])),
                payload=str(spec.get("payload", "")),
            )
        ]
    if vocab.build_requests is None:
        raise ValueError(f"protocol {protocol!r} needs `action` and `attrs` in test requests")
    keys = (vocab.test_request_schema or {}).get("properties")
    if isinstance(keys, Mapping):
        # A misspelt key (`comand:`, `databse:`) was ignored: the case tested another request than it says.
        unknown = sorted(str(k) for k in spec if k not in keys and k not in ("protocol", "target"))
        if unknown:
            allowed = ", ".join(sorted({"protocol", "target", *map(str, keys)}))
            hint = did_you_mean(unknown[0], [*map(str, keys), "protocol", "target"])
            raise ValueError(
                f"unknown key {unknown[0]!r} in a {protocol} test request{hint}; expected one of: {allowed}"
            )
    if vocab.test_request_schema:
        # The rest of the schema holds too: a quoted number (`size: "200000"`) would reach the builder as a
        # string, which a Number field never matches, and a case expecting a denial pass for that reason.
        _check_request(vocab.test_request_schema, {k: v for k, v in spec.items() if k not in ("protocol", "target")})
    try:
        return list(vocab.build_requests(spec, target))
    except ValueError:
        raise
    except Exception as exc:
        # The addon's builder read a key the request does not have, or failed otherwise: say which
        # protocol's addon and what it was given, not a traceback.
        given = ", ".join(sorted(str(k) for k in spec)) or "nothing"
        raise ValueError(
            f"the {protocol!r} addon cannot build a request from {given}: {type(exc).__name__}: {exc}"
        ) from exc


def _kind(value: Any) -> str:
    """How a value of the wrong type is named in a message: its YAML/JSON kind, and the value when short."""
    name = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__
    )
    shown = repr(value)
    return f"{name} ({shown})" if len(shown) <= 40 else name


def _check_attrs(vocab: Any, attrs: Mapping[str, Any]) -> None:
    """Each attribute a rule of the protocol reads must have a value of the field's type: a YAML string where a
    boolean is read (`modifies: "false"`) is true, and a number where a number is read but quoted never matches,
    so a case would test another request than it shows."""
    for f in vocab.fields:
        value = attrs.get(f.attribute)
        if value is None:
            continue
        where = f"attrs.{f.attribute}"
        if isinstance(f, Boolean) and not isinstance(value, bool):
            raise ValueError(f"{where}: true or false expected, not {_kind(value)}")
        if isinstance(f, Number) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: a number expected, not {_kind(value)}")
        if isinstance(f, (Glob, Enum)):
            items = value if isinstance(value, list) else [value]
            if isinstance(value, (Mapping, bool)) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items
            ):
                raise ValueError(f"{where}: a string or a list of strings expected, not {_kind(value)}")


def _check_request(schema: Mapping[str, Any], request: Mapping[str, Any]) -> None:
    import jsonschema

    for error in sorted(jsonschema.Draft202012Validator(schema).iter_errors(request), key=lambda e: list(e.path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
        raise ValueError(f"request{where}: {error.message}")


_EXPECT_KEYS = frozenset({"action", "rule", "masked", "shadow"})


_ACTIONS = ("allow", "deny", "approve")


def _expectation(expect: Any) -> dict[str, Any]:
    action = expect.get("action") if isinstance(expect, Mapping) else expect
    if isinstance(expect, str) or (isinstance(expect, Mapping) and "action" in expect):
        if action not in _ACTIONS:
            # `expect: alow` or `action: [deny]` could only fail, and said "expected ['deny'], got deny"
            where = "expect.action" if isinstance(expect, Mapping) else "expect"
            hint = did_you_mean(action, _ACTIONS) if isinstance(action, str) else ""
            raise ValueError(f"{where}: {_kind(action)} is not an action{hint}; expected one of: {', '.join(_ACTIONS)}")
    if isinstance(expect, str):
        return {"action": expect}
    if isinstance(expect, Mapping):
        # A misspelt key (`mask:` for `masked:`) would otherwise be ignored and the case pass unchecked.
        unknown = sorted(set(expect) - _EXPECT_KEYS)
        if unknown:
            allowed = ", ".join(sorted(_EXPECT_KEYS))
            hint = did_you_mean(unknown[0], _EXPECT_KEYS)
            raise ValueError(f"unknown key {unknown[0]!r} in expect{hint}; expected one of: {allowed}")
        if "action" not in expect:
            raise ValueError("expect needs an action (allow, deny or approve)")
        for key in ("rule", "masked", "shadow"):
            ids = expect.get(key)
            if ids is None or isinstance(ids, str):
                continue
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError(f"expect.{key} must be a rule id or a list of rule ids")
            if key == "rule" and not ids:
                # it named no rule to check, and a deny so expected passed even for an identity without roles
                raise ValueError("expect.rule: an empty list names no rule; name the deciding rule or leave rule out")
        return dict(expect)
    raise ValueError("expect must be an action or a mapping with action/rule/masked")


def _check(decision: Decision, expect: Mapping[str, Any], policy: Policy) -> str:
    problems = []
    known = {r.id for r in policy.rules} | {DEFAULT_DENY}
    for key in ("rule", "masked", "shadow"):
        ids = expect.get(key)
        for rid in [ids] if isinstance(ids, str) else ids or []:
            if rid not in known:
                problems.append(f"no loaded rule has the id {rid!r} (expect.{key})")
    if decision.action != expect.get("action"):
        problems.append(f"expected {expect.get('action')}, got {decision.action}")
    rule = expect.get("rule")
    if rule is not None:
        wanted = [rule] if isinstance(rule, str) else list(rule)
        if not set(wanted) <= set(decision.rule_ids):
            problems.append(f"expected rule {', '.join(map(str, wanted))}, got {', '.join(decision.rule_ids)}")
    # Each named id must be among the decision's; an empty list says none may be (`masked: []`: the role
    # reads values in clear), which a subset test would pass whatever applied.
    for key, kind, got in (("masked", "mask", decision.mask_rule_ids), ("shadow", "shadow", decision.shadow_rule_ids)):
        ids = expect.get(key)
        if ids is None:
            continue
        want = set([ids] if isinstance(ids, str) else ids)
        if not want and got:
            problems.append(f"expected no {kind} rules, got {', '.join(got)}")
        elif not want <= set(got):
            problems.append(f"expected {kind} rules {sorted(want)}, got {list(got)}")
    return "; ".join(problems)


def _vacuous_deny(policy: Policy, identity: Identity, decision: Decision, expect: Mapping[str, Any]) -> str | None:
    """Why a ``deny`` expectation holds only because nobody is asking, or None: a misspelt claim (``rol: readonly``,
    ``role: read-only``) maps the identity to no role, or to none beyond those every identity with its ``sub`` holds
    (a baseline granted to ``sub: "*"``), and every such case passes whatever the rules under test say."""
    if not (expect.get("action") == "deny" and expect.get("rule") is None and decision.rule_ids == (DEFAULT_DENY,)):
        return None
    held = policy.roles_for(identity)
    advice = f"give it claims that map to a role, or expect rule: {DEFAULT_DENY} to test exactly that"
    if not held:
        return (
            "the identity has no roles (no `identities` entry matches its claims), so it is denied by default "
            f"whatever the rules say; {advice}"
        )
    own = ("sub", "iss")
    extra = [k for k in identity.claims if k not in own]
    if not extra:
        return None
    bare = Identity(
        subject=identity.subject, claims={k: v for k, v in identity.claims.items() if k in own}, issuer=identity.issuer
    )
    if policy.roles_for(bare) != held:
        return None
    read = {claim for mapping in policy.mappings for claim, _ in mapping.conditions}
    unread = [k for k in extra if k not in read]
    hint = ""
    if unread:
        hint = f"; no `identities` entry reads the claim {unread[0]!r}{did_you_mean(unread[0], read)}"
    return (
        f"the identity's claims ({', '.join(extra)}) grant no role beyond those of every identity with its sub "
        f"({', '.join(held)}), so it is denied by default whatever the rules under test say{hint}; {advice}"
    )


_CASE_KEYS = frozenset({"name", "identity", "request", "expect"})
_CASE_KEY_LIST = ", ".join(sorted(_CASE_KEYS))


def run_tests(policy: Policy, files: Iterable[Path]) -> TestReport:
    report = TestReport()
    for path in files:
        try:
            docs = load_documents(path.read_text(encoding="utf-8"), str(path))
        except (OSError, YamlError) as exc:
            report.errors.append(str(exc))
            continue
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or doc.get("format") != TESTS_FORMAT:
                # a misspelt format (`lictor-test/v1`) would otherwise run none of the document's cases, silently
                fmt = doc.get("format") if isinstance(doc, dict) else None
                at = getattr(doc, "loc", Location(str(path), 1, 1))
                report.errors.append(f"{at}: a document of format {fmt!r} among policy tests: expected {TESTS_FORMAT}")
                continue
            unknown_top = sorted(set(doc) - {"format", "cases"})
            if unknown_top or not isinstance(doc.get("cases"), list):
                # `case:` for `cases:` would otherwise run nothing from this file, silently
                key = unknown_top[0] if unknown_top else "cases"
                at = key_location(doc, key, Location(str(path), 1, 1))
                hint = did_you_mean(key, ("format", "cases"))
                what = (
                    f"unknown key {key!r} in a test file{hint}; expected: format, cases"
                    if unknown_top
                    else "no cases: list"
                )
                report.errors.append(f"{at}: {what}")
                continue
            for i, case in enumerate(doc.get("cases") or []):
                line = case.loc.line if hasattr(case, "loc") else 0
                if not isinstance(case, Mapping):
                    report.cases.append(CaseResult(str(path), line, f"case {i + 1}", False, None, "not a mapping"))
                    continue
                name = str(case.get("name", f"case {i + 1}"))
                unknown = sorted(set(case) - _CASE_KEYS)
                if unknown:
                    where = case.key_locs.get(unknown[0]) if hasattr(case, "key_locs") else None
                    report.cases.append(
                        CaseResult(
                            str(path),
                            where.line if where else line,
                            name,
                            False,
                            None,
                            f"unknown key {unknown[0]!r} in a test case{did_you_mean(unknown[0], _CASE_KEYS)}; "
                            f"expected one of: {_CASE_KEY_LIST}",
                        )
                    )
                    continue
                try:
                    for key in ("identity", "request"):
                        # without an identity the case asked as nobody, and every `deny` expectation held
                        if not isinstance(case.get(key), Mapping):
                            what = "is missing" if case.get(key) is None else "must be a mapping"
                            raise ValueError(f"{key}: {what} (see docs/rulepacks.md, Testing)")
                    identity = identity_from_spec(plain(case["identity"]))
                    requests = build_requests(policy, plain(case["request"]))
                    decision = combine(policy.decide(identity, r) for r in requests)
                    expect = _expectation(plain(case.get("expect")))
                    problem = _check(decision, expect, policy)
                    if not problem:
                        problem = _vacuous_deny(policy, identity, decision, expect) or ""
                except Exception as exc:
                    report.cases.append(CaseResult(str(path), line, name, False, None, f"error: {exc}"))
                    continue
                report.covered.update(decision.rule_ids)
                report.covered.update(decision.mask_rule_ids)
                report.covered.update(decision.shadow_rule_ids)
                report.cases.append(CaseResult(str(path), line, name, not problem, decision, problem))
    return report


def format_report(policy: Policy, report: TestReport, verbose: bool = True) -> list[str]:
    lines: list[str] = []
    for c in report.cases:
        d = c.decision
        outcome = f"{d.action} by {', '.join(d.rule_ids)}" if d else "no decision"
        if c.passed:
            if verbose:
                lines.append(f"PASS {c.file}:{c.line} {c.name} -> {outcome}")
        else:
            lines.append(f"FAIL {c.file}:{c.line} {c.name} -> {outcome}: {c.message}")
    lines.extend(f"ERROR {e}" for e in report.errors)
    rules = policy.rules
    covered = [r for r in rules if r.id in report.covered]
    pct = 100.0 * len(covered) / len(rules) if rules else 100.0
    lines.append(f"coverage: {len(covered)}/{len(rules)} rules exercised ({pct:.0f}%)")
    by_pack: dict[str, list[int]] = {}
    for r in rules:
        entry = by_pack.setdefault(r.pack, [0, 0])
        entry[1] += 1
        entry[0] += r.id in report.covered
    for pack, (n_cov, n_all) in sorted(by_pack.items()):
        lines.append(f"  {pack}: {n_cov}/{n_all}")
    missing: Sequence[Any] = [r for r in rules if r.id not in report.covered]
    for r in missing:
        lines.append(f"  not exercised: {r.source} {r.id}")
    lines.append(f"{report.passed} passed, {report.failed} failed")
    return lines
