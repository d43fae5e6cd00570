"""Approval records and the approval block of a rule, as the broker and the stores share them."""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..identity import Identity, parse_duration

__all__ = [
    "DECIDED",
    "PENDING",
    "Approval",
    "ApprovalError",
    "ApprovalSpec",
    "Vote",
    "format_duration",
    "new_approval_id",
    "shown_payload",
]

PENDING = "pending"
APPROVED = "approved"
DENIED = "denied"
EXPIRED = "expired"
USED = "used"
WITHDRAWN = "withdrawn"
DECIDED = frozenset({APPROVED, DENIED, EXPIRED, USED, WITHDRAWN})

DEFAULT_TIMEOUT = 15 * 60.0
MAX_PAYLOAD = 256 * 1024  # characters of the exact request kept for display (the digest covers all of it)
PAYLOAD_TAIL = 16 * 1024  # of which, for a longer request, its end


def shown_payload(payload: str) -> str:
    """What approvers see of a request: all of it, or when it is longer than :data:`MAX_PAYLOAD` its
    beginning and its end (a long comment must not push what the statement does out of sight)."""
    if len(payload) <= MAX_PAYLOAD:
        return payload
    head = MAX_PAYLOAD - PAYLOAD_TAIL
    omitted = len(payload) - head - PAYLOAD_TAIL
    return f"{payload[:head]}\n… {omitted} characters not shown …\n{payload[-PAYLOAD_TAIL:]}"


class ApprovalError(Exception):
    """A vote or redemption that cannot be accepted; the message says why (safe to show)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def new_approval_id() -> str:
    return "ap-" + secrets.token_hex(5)


def format_duration(seconds: float) -> str:
    """``900`` → ``15m``, ``5400`` → ``1h30m``, ``1.5`` → ``1.5s``."""
    if seconds < 60:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text}s"
    total = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts)


@dataclass(frozen=True)
class ApprovalSpec:
    """The ``approval:`` block of an ``approve`` rule, with defaults applied."""

    approvers: tuple[str, ...]
    required: int = 1
    timeout: float = DEFAULT_TIMEOUT
    scope: str = "once"
    elevate_roles: tuple[str, ...] = ()
    elevate_duration: float = 0.0
    mode: str = "hold"
    groups: tuple[tuple[tuple[str, ...], int], ...] = ()
    """When several ``approve`` rules hold one request: each one's ``(approvers, required)``, all of which must be
    met; ``approvers`` is then all their roles and ``required`` their counts added up. Empty for one rule."""

    @property
    def requirements(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        """Every ``(approver roles, approvals needed)`` that must be met."""
        return self.groups or ((self.approvers, self.required),)

    def unmet(self, voters: Sequence[Collection[str]]) -> tuple[tuple[str, ...], int] | None:
        """The first requirement that approvers holding ``voters`` roles (one collection each) do not meet."""
        for roles, needed in self.requirements:
            if sum(1 for held in voters if set(held) & set(roles)) < needed:
                return roles, needed
        return None

    @classmethod
    def parse(cls, block: Mapping[str, Any] | None) -> ApprovalSpec:
        """Read a rule's approval block; anything not understood raises ValueError (fail closed)."""
        block = block or {}
        groups: tuple[tuple[tuple[str, ...], int], ...] = ()
        if block.get("all_of") is not None:
            parts = block["all_of"]
            if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(g, Mapping) for g in parts):
                raise ValueError("approval.all_of must list approver groups")
            groups = tuple(_group(g) for g in parts)
            approvers = tuple(dict.fromkeys(r for roles, _ in groups for r in roles))
            required = sum(n for _, n in groups)
        else:
            approvers, required = _group(block)
        timeout = parse_duration(block.get("timeout", DEFAULT_TIMEOUT))
        if timeout <= 0:
            raise ValueError("approval.timeout must be positive")
        scope = block.get("scope", "once")
        mode = block.get("mode", "hold")
        if scope not in ("once", "elevation"):
            raise ValueError(f"approval.scope {scope!r} is not once or elevation")
        if mode not in ("hold", "ticket"):
            raise ValueError(f"approval.mode {mode!r} is not hold or ticket")
        roles: tuple[str, ...] = ()
        duration = 0.0
        if scope == "elevation":
            elevate = block.get("elevate") or {}
            roles = tuple(str(r) for r in elevate.get("roles") or ())
            duration = parse_duration(elevate.get("duration", 0))
            if not roles or duration <= 0:
                raise ValueError("approval.scope elevation needs elevate.roles and a positive elevate.duration")
        return cls(approvers, required, timeout, scope, roles, duration, mode, groups if len(groups) > 1 else ())

    def to_json(self) -> dict[str, Any]:
        out = {
            "approvers": list(self.approvers),
            "required": self.required,
            "timeout": self.timeout,
            "scope": self.scope,
            "elevate": {"roles": list(self.elevate_roles), "duration": self.elevate_duration}
            if self.scope == "elevation"
            else None,
            "mode": self.mode,
        }
        if self.groups:
            out["all_of"] = [{"approvers": list(roles), "required": needed} for roles, needed in self.groups]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApprovalSpec:
        elevate = data.get("elevate") or {}
        return cls(
            approvers=tuple(data["approvers"]),
            required=int(data["required"]),
            timeout=float(data["timeout"]),
            scope=str(data["scope"]),
            elevate_roles=tuple(elevate.get("roles") or ()),
            elevate_duration=float(elevate.get("duration") or 0.0),
            mode=str(data["mode"]),
            groups=tuple((tuple(g["approvers"]), int(g["required"])) for g in data.get("all_of") or ()),
        )

    def describe(self) -> str:
        text = " and ".join(_describe_group(roles, needed) for roles, needed in self.requirements)
        if self.scope == "elevation":
            text += (
                f"; grants roles {', '.join(self.elevate_roles)} on this target for "
                f"{format_duration(self.elevate_duration)}"
            )
        return text


def _group(block: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    approvers = block.get("approvers") or []
    if isinstance(approvers, str) or not approvers or not all(isinstance(a, str) and a for a in approvers):
        raise ValueError("approval.approvers must name at least one role")
    required = block.get("required", 1)
    if not isinstance(required, int) or isinstance(required, bool) or required < 1:
        raise ValueError(f"approval.required must be a positive integer, got {required!r}")
    return tuple(approvers), required


def _describe_group(roles: Sequence[str], needed: int) -> str:
    who = ", ".join(roles)
    return f"{needed} approval(s) from role {who}" if len(roles) == 1 else f"{needed} approval(s) from roles {who}"


@dataclass(frozen=True)
class Vote:
    """One approver's verdict. ``claims`` are kept so the vote can be re-checked against a newer policy."""

    subject: str
    issuer: str
    verdict: str  # approve | deny
    reason: str
    at: float
    claims: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> Identity:
        return Identity(subject=self.subject, claims=dict(self.claims), issuer=self.issuer)

    def to_json(self) -> dict[str, Any]:
        return {"sub": self.subject, "iss": self.issuer, "verdict": self.verdict, "reason": self.reason, "at": self.at}


@dataclass(frozen=True)
class Approval:
    """One approval request: the exact request, who asked, under which rule, and what happened to it."""

    id: str
    status: str
    created_at: float
    expires_at: float
    requester_sub: str
    requester_iss: str
    session_id: str
    peer: str
    protocol: str
    target: str
    action: str
    summary: str
    payload: str
    payload_truncated: bool
    attrs: Mapping[str, Any]
    reason: str | None
    digest: str
    rule_ids: tuple[str, ...]
    rule_message: str
    policy_version: str
    spec: ApprovalSpec
    replica: str = ""
    votes: tuple[Vote, ...] = ()
    decided_at: float | None = None
    decided_by: tuple[str, ...] = ()
    decision_reason: str = ""
    used_at: float | None = None
    elevated_until: float | None = None

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    @property
    def approvals_given(self) -> int:
        return sum(1 for v in self.votes if v.verdict == "approve")

    def is_requester(self, identity: Identity) -> bool:
        """The requester is the same principal: same subject from the same issuer."""
        return identity.subject == self.requester_sub and identity.issuer == self.requester_iss

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "requester": {"sub": self.requester_sub, "iss": self.requester_iss},
            "session": self.session_id,
            "peer": self.peer,
            "protocol": self.protocol,
            "target": self.target,
            "action": self.action,
            "summary": self.summary,
            "payload": self.payload,
            "payload_truncated": self.payload_truncated,
            "attrs": dict(self.attrs),
            "reason": self.reason,
            "digest": self.digest,
            "rule_ids": list(self.rule_ids),
            "rule_message": self.rule_message,
            "policy_version": self.policy_version,
            "approval": self.spec.to_json(),
            "approvals_given": self.approvals_given,
            "votes": [v.to_json() for v in self.votes],
            "decided_at": self.decided_at,
            "decided_by": list(self.decided_by),
            "decision_reason": self.decision_reason,
            "used_at": self.used_at,
            "elevated_until": self.elevated_until,
            "replica": self.replica,
        }
