"""The compiled, immutable policy and its decision procedure.

Order of decision, for one request and one identity (docs/rulepacks.md has the long form):

1. The identity's roles are the union of the roles of every identity mapping that matches it,
   across all loaded packs, plus the roles those roles inherit, plus any time-boxed elevation.
2. Candidate rules are those of these roles for the request's protocol, found through an index
   by ``Request.action`` (and, inside a bucket, by a secondary literal field), never by scanning.
3. A rule matches when its targets, ``when`` and ``unless`` hold (see ``lictor.vocabulary`` for
   the all/any reading of lists).
4. Among matching enforced rules: any ``deny`` wins; else any ``approve`` holds the request; else
   any ``allow`` allows it; else the request is denied by default. ``mask`` rules never allow on
   their own: they add masking to what an allowed request returns.
5. ``enforce: false`` rules are evaluated the same way and reported as shadow results
   ("would deny"), without changing the decision.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._yaml import Location
from .identity import Identity, parse_duration
from .policy_types import DEFAULT_DENY, Decision, Request
from .vocabulary import Boolean, Enum, Glob, Number, Predicate, Quantifier, Vocabulary, _text, _values

__all__ = ["CompiledRule", "IdentityMapping", "Policy", "Role", "Trace"]

_MEMO_LIMIT = 4096  # memoized allow decisions per compiled policy (cleared when full)
# The memo's key holds the request's attribute values: a request whose values are longer than this in all (a
# Redis SET of a 64 MiB value, an HTTP body field) is decided without it, so the memo stays under
# _MEMO_LIMIT * _MEMO_MAX_CHARS characters instead of keeping thousands of such values alive.
_MEMO_MAX_CHARS = 16 * 1024
_TEXT = (str, bytes)
_COLLECTIONS = (tuple, list, frozenset, set)


def _memo_size_ok(attrs: Mapping[str, Any]) -> bool:
    """Whether the attribute values, and the strings in their collections, are short enough to memoize."""
    left = _MEMO_MAX_CHARS
    for value in attrs.values():
        if isinstance(value, _TEXT):
            left -= len(value)
        elif isinstance(value, _COLLECTIONS):
            left -= len(value)
            for item in value:
                if isinstance(item, _TEXT):
                    left -= len(item)
        if left < 0:
            return False
    return True


@dataclass(frozen=True, eq=False)
class CompiledRule:
    id: str
    pack: str
    role: str
    protocol: str
    action: str  # allow | deny | approve | mask
    enforce: bool
    message: str
    order: int
    targets: tuple[str, ...] = ()
    when: tuple[tuple[str, Predicate], ...] = ()
    unless: tuple[tuple[str, Predicate], ...] = ()
    index_values: frozenset[str] | None = None  # None: any action
    secondary_values: frozenset[str] | None = None
    mask: Mapping[str, Any] | None = None
    approval: Mapping[str, Any] | None = None
    source: str = ""  # FILE:LINE:COL of the rule
    location: Location | None = None
    when_raw: Mapping[str, Any] = field(default_factory=dict)
    unless_raw: Mapping[str, Any] = field(default_factory=dict)

    def target_matches(self, target: str) -> bool:
        if not self.targets:
            return True
        return any(fnmatch.fnmatchcase(target, t) for t in self.targets)

    def _miss(self, request: Request) -> tuple[str, str] | None:
        """What keeps this rule from matching ``request``: ``("target", "")``, ``("when", field)`` or
        ``("unless", field)``; None when it matches.

        An allow rule must cover every value of a list attribute and loses it if any value is excepted;
        a deny/approve/mask rule fires on any value and is lifted only if every value is excepted."""
        if not self.target_matches(request.target):
            return ("target", "")
        quantifier: Quantifier
        exception: Quantifier
        quantifier, exception = ("all", "any") if self.action == "allow" else ("any", "all")
        for name, pred in self.when:
            if not pred(request, quantifier):
                return ("when", name)
        for name, pred in self.unless:
            if pred(request, exception):
                return ("unless", name)
        return None

    def matches(self, request: Request) -> bool:
        """Whether this rule matches ``request`` (the decision path, which needs only the verdict)."""
        return self._miss(request) is None

    def evaluate(self, request: Request) -> tuple[bool, str]:
        """Whether this rule matches ``request``, and a one-line reason."""
        miss = self._miss(request)
        if miss is None:
            return True, "matches"
        kind, name = miss
        if kind == "target":
            return False, f"target {request.target!r} not in {list(self.targets)}"
        return False, f"when.{name} does not match" if kind == "when" else f"unless.{name} matches"


@dataclass(frozen=True)
class IdentityMapping:
    """``identities:`` entry: claim conditions and the roles they grant."""

    id: str
    pack: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]  # (claim name, globs)
    roles: tuple[str, ...]

    def matches(self, identity: Identity) -> bool:
        for claim, patterns in self.conditions:
            value = identity.claim(claim)
            values: Iterable[Any]
            if value is None:
                return False
            if claim == "email" and not _email_verified(identity):
                return False
            if isinstance(value, (list, tuple, set, frozenset)):
                values = value
            else:
                values = (value,)
            texts = [_claim_text(v) for v in values if not isinstance(v, (Mapping, list, tuple))]
            if not any(fnmatch.fnmatchcase(t, p) for t in texts for p in patterns):
                return False
        return True


def _email_verified(identity: Identity) -> bool:
    """Whether ``identity``'s ``email`` may be matched: not when the token says the issuer has not verified it
    (OpenID Connect's ``email_verified`` claim, anything but ``true``). Providers with self-service sign-up
    issue tokens for whatever address was typed in; one that does not say is taken at its word."""
    if "email_verified" not in identity.claims:
        return True
    verified = identity.claims["email_verified"]
    return verified is True or verified == "true"


def _combined_approval(rules: Sequence[CompiledRule]) -> Mapping[str, Any]:
    """The approval block of a request that ``approve`` rules hold: the first one's, and when they ask different
    approvers (or counts), every one's ``approvers``/``required`` under ``all_of`` (each must be met) and the
    shortest ``timeout``. Which pack or rule comes first must not decide who approves: a request that one team's
    rule gives to two of its approvers is not released by one approver of another team whose rule also holds it."""
    block = dict(rules[0].approval or {})
    groups: list[dict[str, Any]] = []
    for rule in rules:
        approval = rule.approval or {}
        group = {"approvers": list(approval.get("approvers") or ()), "required": approval.get("required", 1)}
        if group not in groups:
            groups.append(group)
    if len(groups) > 1:
        from .approvals._model import DEFAULT_TIMEOUT

        block["all_of"] = groups
        try:
            block["timeout"] = min(parse_duration((r.approval or {}).get("timeout", DEFAULT_TIMEOUT)) for r in rules)
        except ValueError:
            pass  # the broker refuses the block that holds it (fail closed)
    return block


def _claim_text(value: Any) -> str:
    """A scalar claim value as rule packs write it: JSON ``true`` is ``"true"`` (Python would say ``"True"``).
    Objects have no text of their own and match nothing: a mapping names one of their members
    (``realm_access.roles``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Role:
    name: str
    pack: str
    description: str
    inherits: tuple[str, ...]
    recording: str
    rules: tuple[CompiledRule, ...]


class _Bucket:
    """Rules of one role and protocol that share an index value, with a secondary index."""

    __slots__ = ("by_secondary", "residual", "rules")

    def __init__(self) -> None:
        self.rules: list[CompiledRule] = []
        self.by_secondary: dict[str, list[CompiledRule]] = {}
        self.residual: list[CompiledRule] = []

    def add(self, rule: CompiledRule) -> None:
        self.rules.append(rule)
        if rule.secondary_values is None:
            self.residual.append(rule)
        else:
            for v in rule.secondary_values:
                self.by_secondary.setdefault(v, []).append(rule)

    def candidates(self, request: Request, secondary_attr: str | None) -> Iterable[CompiledRule]:
        if not self.by_secondary or secondary_attr is None:
            return self.rules
        raw = request.attrs.get(secondary_attr)
        values: Sequence[Any]
        if raw is None:
            values = ()
        elif isinstance(raw, str):
            values = (raw,)
        else:
            values = list(_values(raw))
        if not values:
            # Vacuous "all" matches are possible: every rule is a candidate.
            return self.rules
        found: list[CompiledRule] = list(self.residual)
        for v in values:
            found.extend(self.by_secondary.get(_text(v, secondary_attr).lower(), ()))
        return found


@dataclass
class Trace:
    """Everything ``lictor explain`` shows: roles, each candidate rule and its verdict."""

    roles: list[str] = field(default_factory=list)
    steps: list[tuple[CompiledRule, bool, str]] = field(default_factory=list)
    decision: Decision | None = None


class Policy:
    """A compiled, immutable set of rule packs. Thread-safe for reading; replaced, never mutated."""

    def __init__(
        self,
        version: str,
        packs: Mapping[str, Mapping[str, Any]],
        roles: Mapping[str, Role],
        mappings: Sequence[IdentityMapping],
        vocabularies: Mapping[str, Vocabulary],
        detectors: Mapping[str, Any],
    ) -> None:
        self.version = version
        self.packs = dict(packs)
        self.roles = dict(roles)
        self.mappings = tuple(mappings)
        self.vocabularies = dict(vocabularies)
        self.detectors = dict(detectors)
        self.rules = tuple(r for role in self.roles.values() for r in role.rules)
        self.rules_by_id = {r.id: r for r in self.rules}
        # role -> protocol -> index value ("*" for rules without one) -> bucket
        self._index: dict[str, dict[str, dict[str, _Bucket]]] = {}
        for role in self.roles.values():
            per_protocol = self._index.setdefault(role.name, {})
            for rule in role.rules:
                buckets = per_protocol.setdefault(rule.protocol, {})
                keys = rule.index_values if rule.index_values is not None else frozenset({"*"})
                for key in keys:
                    buckets.setdefault(key, _Bucket()).add(rule)
        self._secondary_attr: dict[str, str | None] = {}
        self._index_attr: dict[str, str | None] = {}
        # Protocols whose rules only read request attributes (built-in field kinds; Custom fields and other
        # Field subclasses may read anything, the payload say): their ``allow`` decisions are memoized by
        # roles, target, action and attrs.
        self._memo_ok: dict[str, bool] = {
            name: all(isinstance(f, (Glob, Enum, Boolean, Number)) for f in vocab.fields)
            for name, vocab in self.vocabularies.items()
        }
        self._memo: dict[Any, Decision] = {}
        self._concluded: dict[tuple[Any, ...], Decision] = {}
        for name, vocab in self.vocabularies.items():
            self._secondary_attr[name] = vocab.field(vocab.secondary).attribute if vocab.secondary else None
            self._index_attr[name] = vocab.field(vocab.index).attribute if vocab.index else None

    @classmethod
    def empty(cls, vocabularies: Mapping[str, Vocabulary] | None = None) -> Policy:
        return cls("empty", {}, {}, (), vocabularies or {}, {})

    # -- identities ---------------------------------------------------------------------------

    def roles_for(self, identity: Identity, extra_roles: Iterable[str] = ()) -> tuple[str, ...]:
        """Every role ``identity`` holds, inherited roles included, in a stable order."""
        direct: list[str] = []
        for mapping in self.mappings:
            if mapping.matches(identity):
                direct.extend(r for r in mapping.roles if r not in direct)
        direct.extend(r for r in extra_roles if r not in direct)
        result: list[str] = []
        stack = list(reversed(direct))
        while stack:
            name = stack.pop()
            if name in result or name not in self.roles:
                continue
            result.append(name)
            stack.extend(reversed(self.roles[name].inherits))
        return tuple(result)

    # -- decisions ----------------------------------------------------------------------------

    def decide(
        self,
        identity: Identity,
        request: Request,
        *,
        roles: Sequence[str] | None = None,
        extra_roles: Iterable[str] = (),
        trace: Trace | None = None,
    ) -> Decision:
        """Decide ``request`` for ``identity``. Never raises for a well-formed request."""
        held = tuple(roles) if roles is not None else self.roles_for(identity, extra_roles)
        if roles is not None and extra_roles:
            held = tuple(dict.fromkeys([*held, *self.roles_for(identity, extra_roles)]))
        memo_key: Any = None
        if trace is not None:
            trace.roles = list(held)
        elif self._memo_ok.get(request.protocol):
            # Agents repeat the same kinds of requests (a statement with other constants, the same API call):
            # the rules' verdicts depend on nothing else, and an allow's message names no request.
            try:
                memo_key = (held, request.protocol, request.target, request.action, tuple(request.attrs.items()))
                hit = self._memo.get(memo_key)
            except TypeError:  # an unhashable attribute value: decide without the memo
                memo_key = hit = None
            if hit is not None:
                return hit
        secondary = self._secondary_attr.get(request.protocol)
        index_attr = self._index_attr.get(request.protocol)
        keys: list[str] = [request.action]
        if index_attr is not None:
            raw = request.attrs.get(index_attr)
            if isinstance(raw, str):
                keys = [raw]
            elif raw is not None:
                keys = [_text(v, index_attr) for v in _values(raw)]
        # A case-insensitive field indexes its rules under lower-case literals: `programs: [Rscript]` is
        # found for the program `Rscript` too (the predicate decides; extra candidates change nothing).
        keys = [*dict.fromkeys(k for key in keys for k in (key, key.lower())), "*"]
        seen: set[int] = set()
        deny: list[CompiledRule] = []
        approve: list[CompiledRule] = []
        allow: list[CompiledRule] = []
        mask: list[CompiledRule] = []
        shadow: list[CompiledRule] = []
        for role_name in held:
            buckets = self._index.get(role_name, {}).get(request.protocol)
            if not buckets:
                continue
            for key in keys:
                bucket = buckets.get(key)
                if bucket is None:
                    continue
                for rule in bucket.candidates(request, secondary):
                    if id(rule) in seen:
                        continue
                    seen.add(id(rule))
                    if trace is not None:
                        ok, why = rule.evaluate(request)
                        trace.steps.append((rule, ok, why))
                    else:
                        ok = rule.matches(request)
                    if not ok:
                        continue
                    if not rule.enforce:
                        if rule.action in ("deny", "approve"):
                            shadow.append(rule)
                        continue
                    if rule.action == "allow":
                        allow.append(rule)
                    elif rule.action == "deny":
                        deny.append(rule)
                    elif rule.action == "approve":
                        approve.append(rule)
                    else:
                        mask.append(rule)
        if trace is not None or approve or not (deny or allow):
            # an approval's and the default denial's messages name the request: concluded each time
            decision = self._conclude(request, held, deny, approve, allow, mask, shadow)
        else:
            # Otherwise the decision depends only on the matching rules and the roles held: many requests
            # (every statement a role may run, every API call under one path rule) share one.
            outcome = (held, *map(id, deny), None, *map(id, allow), None, *map(id, mask), None, *map(id, shadow))
            known = self._concluded.get(outcome)
            if known is None:
                known = self._conclude(request, held, deny, approve, allow, mask, shadow)
                if len(self._concluded) >= _MEMO_LIMIT:
                    self._concluded.clear()
                self._concluded[outcome] = known
            decision = known
        if trace is not None:
            trace.decision = decision
        elif memo_key is not None and decision.action == "allow" and _memo_size_ok(request.attrs):
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[memo_key] = decision
        return decision

    def _conclude(
        self,
        request: Request,
        held: tuple[str, ...],
        deny: list[CompiledRule],
        approve: list[CompiledRule],
        allow: list[CompiledRule],
        mask: list[CompiledRule],
        shadow: list[CompiledRule],
    ) -> Decision:
        by_order = sorted
        shadow_ids = tuple(r.id for r in by_order(shadow, key=lambda r: r.order))
        recording = "strict" if any(self.roles[r].recording == "strict" for r in held) else "best_effort"
        what = request.summary or f"{request.protocol} {request.action}"
        if deny:
            rules = by_order(deny, key=lambda r: r.order)
            first = rules[0]
            # every protocol's denial already names the request: the default message does not repeat it
            msg = first.message or f"denied by rule {first.id}, which gives no reason"
            return Decision(
                "deny",
                tuple(r.id for r in rules),
                msg,
                self.version,
                shadow_rule_ids=shadow_ids,
                explanation=f"denied by rule {first.id} ({first.source})",
                recording=recording,
            )
        masks = by_order(mask + [r for r in allow + approve if r.mask], key=lambda r: r.order)
        mask_blocks = tuple(r.mask for r in masks if r.mask is not None)
        mask_ids = tuple(r.id for r in masks)
        if approve:
            rules = by_order(approve, key=lambda r: r.order)
            first = rules[0]
            msg = first.message or f"{what} needs approval by a human"
            return Decision(
                "approve",
                tuple(r.id for r in rules),
                msg,
                self.version,
                masks=mask_blocks,
                mask_rule_ids=mask_ids,
                shadow_rule_ids=shadow_ids,
                approval=_combined_approval(rules),
                explanation=f"held for approval by rule {first.id} ({first.source})",
                recording=recording,
            )
        if allow:
            rules = by_order(allow, key=lambda r: r.order)
            return Decision(
                "allow",
                tuple(r.id for r in rules),
                "",
                self.version,
                masks=mask_blocks,
                mask_rule_ids=mask_ids,
                shadow_rule_ids=shadow_ids,
                explanation=f"allowed by rule {rules[0].id} ({rules[0].source})",
                recording=recording,
            )
        roles_text = ", ".join(held) if held else "none"
        return Decision(
            "deny",
            (DEFAULT_DENY,),
            f"no rule allows {what} for your roles ({roles_text}); ask your security team for a rule "
            "that allows it (or one that lets an approver allow it)",
            self.version,
            shadow_rule_ids=shadow_ids,
            explanation="no rule of the identity's roles matched: default deny",
            recording=recording,
        )
