"""The protocol-neutral request and decision that every addon and the policy engine share."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

__all__ = ["MAX_REASON", "Action", "Decision", "Request", "agent_reason", "combine"]

Action = Literal["allow", "deny", "approve"]

# Rule ids the core itself uses when no rule pack rule is responsible.
DEFAULT_DENY = "lictor:default-deny"
ADDON_ERROR = "lictor:addon-error"

_digest_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


MAX_REASON = 500
"""Characters of an agent's reason a request keeps: approvers, the audit log and webhooks read it."""


def agent_reason(value: str | None) -> str | None:
    """The reason an agent gives for its requests (an ``X-Lictor-Reason`` header, a ``LICTOR_REASON``
    variable) as a :class:`Request` carries it: printable characters only, at most :data:`MAX_REASON` of
    them; None when nothing is left."""
    if not value:
        return None
    text = "".join(ch for ch in value if ch.isprintable()).strip()
    return text[:MAX_REASON] or None


@dataclass(frozen=True, slots=True)
class Request:
    """One thing an agent asked for, as the protocol addon understood it.

    ``action`` is the protocol's primary verb (SQL statement kind, HTTP method, Kubernetes verb,
    program name); ``attrs`` carries every attribute the protocol's rule vocabulary matches on.
    ``payload`` is the exact request (SQL text, method + URL + body digest, command line); an
    approval is bound to its digest. ``shown_attrs``, when set, is what approvers (the approvals store,
    page and webhooks) read instead of ``attrs``: the same attributes without the credentials the agent
    sends (a password, a client secret), which the rules still match on in ``attrs``.
    """

    protocol: str
    action: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    target: str = ""
    summary: str = ""
    payload: str = ""
    reason: str | None = None
    shown_attrs: Mapping[str, Any] | None = None

    def digest(self) -> str:
        """SHA-256 over what makes this request this request (not the reason or summary)."""
        # The JSON form approvals stored by earlier versions are bound to (keep it stable): the standard
        # encoder's compact, non-ASCII output, which orjson writes byte for byte the same (and a tenth of
        # the time: this runs for every statement). What orjson refuses (a lone surrogate) goes through
        # the standard encoder; surrogatepass: no exception for it.
        parts = [self.protocol, self.target, self.action, self.payload or self.summary]
        try:
            data = orjson.dumps(parts)
        except orjson.JSONEncodeError:
            data = _digest_json(parts).encode("utf-8", "surrogatepass")
        return hashlib.sha256(data).hexdigest()


_RANK: dict[str, int] = {"allow": 0, "approve": 1, "deny": 2}


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided, and why.

    ``rule_ids`` are the rules that produced ``action`` (the deciding rules); ``shadow_rule_ids``
    are ``enforce: false`` rules that *would* have denied or held the request; ``masks`` are the
    ``mask:`` blocks that apply to what comes back; ``approval`` is the approval block of the
    deciding ``approve`` rule.
    """

    action: Action
    rule_ids: tuple[str, ...]
    message: str
    policy_version: str
    masks: tuple[Mapping[str, Any], ...] = ()
    mask_rule_ids: tuple[str, ...] = ()
    shadow_rule_ids: tuple[str, ...] = ()
    approval: Mapping[str, Any] | None = None
    approval_id: str | None = None
    explanation: str = ""
    recording: str = "best_effort"
    approval_status: str | None = None
    """With ``approval_id`` on a denial: ``pending`` (ticket mode: retry once it is approved), or how the
    request ended (``denied``, ``expired``, ``withdrawn``...), when retrying with it cannot help."""

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    @classmethod
    def deny(cls, message: str, rule_id: str, policy_version: str = "", explanation: str = "") -> Decision:
        return cls("deny", (rule_id,), message, policy_version, explanation=explanation or message)

    def with_approval(self, approval_id: str) -> Decision:
        """The decision after a human approved it: allowed, naming the approval."""
        return replace(self, action="allow", approval_id=approval_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rule_ids": list(self.rule_ids),
            "message": self.message,
            "policy_version": self.policy_version,
            "mask_rule_ids": list(self.mask_rule_ids),
            "shadow_rule_ids": list(self.shadow_rule_ids),
            "approval_id": self.approval_id,
        }


def combine(decisions: Iterable[Decision]) -> Decision:
    """One decision for a request made of parts (statements of a multi-statement string, the
    programs of a pipeline): deny wins over approve, approve over allow; masks are unioned. Among
    denials, one by a rule is reported before the default deny: ``sudo reboot`` is refused by the rule
    about reboot, not because no rule allows ``sudo``."""
    items = list(decisions)
    if not items:
        raise ValueError("combine() needs at least one decision")
    worst = max(items, key=lambda d: (_RANK[d.action], d.rule_ids != (DEFAULT_DENY,)))
    masks: list[Mapping[str, Any]] = []
    mask_ids: list[str] = []
    shadow: list[str] = []
    for d in items:
        masks.extend(m for m in d.masks if m not in masks)
        mask_ids.extend(i for i in d.mask_rule_ids if i not in mask_ids)
        shadow.extend(i for i in d.shadow_rule_ids if i not in shadow)
    strict = any(d.recording == "strict" for d in items)
    return replace(
        worst,
        masks=tuple(masks),
        mask_rule_ids=tuple(mask_ids),
        shadow_rule_ids=tuple(shadow),
        recording="strict" if strict else worst.recording,
    )
