"""What the agent gets back when Lictor answers instead of the upstream: denials it can act on.

HTTP targets answer with a JSON body (``error``, ``message``, ``rule``, ``policy_version``, ``hint``);
Kubernetes targets with a ``Status`` object, so that kubectl prints ``Error from server (Forbidden): ...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lictor import Decision

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    411: "LengthRequired",
    413: "RequestEntityTooLarge",
    431: "BadRequest",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
}
_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    411: "length_required",
    413: "too_large",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}


@dataclass
class Answer:
    """A response Lictor sends itself: status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


def _waiting(decision: Decision) -> bool:
    """The denial names an approval that may still be granted (ticket mode): retrying with it can help."""
    return bool(decision.approval_id) and decision.approval_status == "pending"


def _hint(decision: Decision, kubernetes: bool = False) -> str:
    if _waiting(decision):
        return (
            f"once approval {decision.approval_id} is approved, retry the same request with the header "
            f"X-Lictor-Approval: {decision.approval_id}"
        )
    if decision.approval_id:
        return (
            f"approval {decision.approval_id} was not granted and cannot be used; send the request again "
            "(without X-Lictor-Approval) to ask for a new approval, or ask an approver why"
        )
    rule = decision.rule_ids[0] if decision.rule_ids else ""
    if rule.startswith("lictor:default-deny"):
        return "no rule allows this request for your roles; ask the gateway operators for access"
    if rule == "lictor:unreadable-request":
        # Deterministic: the same request is refused again, so "retry later" would send the agent in circles.
        return (
            "retrying the same request cannot help; send it in its plain form (no '.', '..' or empty path "
            "segments, no trailing slash on Kubernetes, no encoded '/', '\\', '%' or '.', no ';') as the "
            "message says"
        )
    if rule == "lictor:approval-not-redeemable":
        return (
            "check the approval id and that the request is exactly the one approved (method, URL, body); "
            "without X-Lictor-Approval the request asks for a new approval"
        )
    if rule == "lictor:token-expired":
        # Retrying with the same token is refused again: only a fresh token helps.
        return "get a fresh token (from your identity provider or `lictor token issue`) and send the request again"
    if rule.startswith("lictor:"):
        return "the gateway could not check this request; retry later or contact the gateway operators"
    if kubernetes:  # kubectl sends no headers of the agent's choosing; the message already names the rule
        return "ask the rule's owners if you need it"
    return f"rule {rule!r} decided this; ask its owners if you need it, or add X-Lictor-Reason to explain why"


def denial(decision: Decision, *, kubernetes: bool, status: int = 403, hint: str | None = None) -> Answer:
    """The answer for a denied request (``decision.action == "deny"``)."""
    hint = hint or _hint(decision, kubernetes)
    rule = decision.rule_ids[0] if decision.rule_ids else ""
    headers = {"X-Lictor-Rule": rule, "X-Lictor-Policy": decision.policy_version}
    if rule == "lictor:token-expired" and status == 403:
        # An expired token is a 401 wherever it is checked (the API server answers so): kubectl's credential
        # plugins and OAuth clients get a fresh token on a 401 only, and would give up on a 403.
        status = 401
        headers["WWW-Authenticate"] = 'Bearer realm="lictor", error="invalid_token"'
    if decision.approval_id:
        headers["X-Lictor-Approval"] = decision.approval_id
    if kubernetes:
        details: dict[str, Any] = {"causes": [{"reason": "LictorPolicy", "message": hint, "field": rule}]}
        if decision.approval_id:
            details["name"] = decision.approval_id
            details["kind"] = "approval"
        message = f"lictor: {decision.message} (rule {rule}; {hint})"
        return Answer(status, k8s_status(status, message, details), headers)
    body: dict[str, Any] = {
        "error": _ERRORS.get(status, "forbidden"),
        "message": decision.message,
        "rule": rule,
        "rules": list(decision.rule_ids),
        "policy_version": decision.policy_version,
        "hint": hint,
    }
    if decision.approval_id:
        body["error"] = "approval_required" if _waiting(decision) else "approval_not_granted"
        body["approval_id"] = decision.approval_id
        if decision.approval_status:
            body["approval_status"] = decision.approval_status
    return Answer(status, body, headers)


def error(status: int, message: str, hint: str, *, kubernetes: bool, rule: str = "") -> Answer:
    """An answer that is not a policy decision: missing token (401), unreadable request (400)..."""
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="lictor"'
    if rule:
        headers["X-Lictor-Rule"] = rule
    if kubernetes:
        return Answer(status, k8s_status(status, f"lictor: {message} ({hint})"), headers)
    body = {"error": _ERRORS.get(status, "error"), "message": message, "hint": hint}
    if rule:
        body["rule"] = rule
    return Answer(status, body, headers)


def error_name(status: int) -> str:
    """The ``error`` an HTTP target's answers carry for ``status`` (``too_large`` for 413...)."""
    return _ERRORS.get(status, "error")


def k8s_status(code: int, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``meta/v1 Status`` failure as the API server writes it."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Forbidden" if code == 403 else "InternalError"),
        "code": code,
    }
    if details:
        status["details"] = details
    return status
