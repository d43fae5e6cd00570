"""Test helpers for addon authors, in the spirit of mitmproxy's ``taddons`` and ``tflow``.

Build an identity, a request and a loaded policy in a few lines; drive an addon's hooks against a
real :class:`~lictor.Gateway` (real policy engine, real audit log in a temporary directory, an
in-memory recorder); assert decisions, masking and recorded events::

    from lictor import testing

    async def test_my_addon(tmp_path):
        async with testing.harness(MyAddon(), rulepacks=PACK, state_dir=tmp_path) as h:
            session = await h.session(testing.identity("agent-1", role="reader"), protocol="myproto")
            decision = await session.decide(testing.request("myproto", "get", key="a"))
            testing.assert_decision(decision, "allow", rule="read-keys")
            assert h.events(session, "command") == [...]

Everything here uses only Lictor's public API.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .addons import AddonManager
from .config import GatewayConfig, Target
from .gateway import Gateway, Session
from .identity import Identity
from .policy import Policy
from .policy_types import Decision, Request
from .rulepacks import load_policy
from .runner import validate_targets
from .vocabulary import Vocabulary

__all__ = [
    "Harness",
    "MemoryRecorder",
    "assert_decision",
    "harness",
    "identity",
    "policy",
    "request",
]


def identity(sub: str = "test-agent", **claims: Any) -> Identity:
    """An already-verified identity with ``claims`` (``identity("a", role="readonly")``)."""
    return Identity(subject=sub, claims={"sub": sub, **claims}, issuer="lictor")


def request(
    protocol: str,
    action: str,
    *,
    target: str = "",
    summary: str = "",
    payload: str = "",
    reason: str | None = None,
    **attrs: Any,
) -> Request:
    """A request with attributes given as keywords (lists become frozensets). ``payload`` defaults to
    ``summary``; ``reason`` is the agent's reason (audited, shown to approvers), not an attribute."""
    clean = {k: frozenset(v) if isinstance(v, (list, set, tuple)) else v for k, v in attrs.items()}
    return Request(
        protocol,
        action,
        clean,
        target=target,
        summary=summary or action,
        payload=payload or summary or action,
        reason=reason,
    )


def _vocabularies(addons: Iterable[Any], extra: Iterable[Vocabulary] = ()) -> dict[str, Vocabulary]:
    manager = AddonManager()
    manager.add(*addons)
    vocabularies = dict(manager.vocabularies)
    vocabularies.update({v.protocol: v for v in extra})
    return vocabularies


def policy(yaml_text: str | Sequence[str], *addons: Any, vocabularies: Iterable[Vocabulary] = ()) -> Policy:
    """Compile rule packs given as YAML text, with the vocabularies of ``addons``.

    Raises ``ValueError`` listing every problem (``FILE:LINE:COL: message``) if they do not load.
    """
    texts = [yaml_text] if isinstance(yaml_text, str) else list(yaml_text)
    with tempfile.TemporaryDirectory() as d:
        for i, text in enumerate(texts):
            Path(d, f"pack{i}.yaml").write_text(text)
        result = load_policy([d], _vocabularies(addons, vocabularies))
    if result.policy is None:
        raise ValueError("rule packs do not load:\n" + "\n".join(str(p) for p in result.errors))
    return result.policy


def assert_decision(
    decision: Decision, action: str, *, rule: str | None = None, masked: Iterable[str] | None = None
) -> None:
    """Assert the action (and optionally a deciding rule and mask rules) of ``decision``.

    ``rule`` must be among ``decision.rule_ids``; ``masked`` names ids of ``mask`` rules that must be
    among ``decision.mask_rule_ids``, and ``masked=[]`` asserts that no mask rule applies."""
    assert decision.action == action, f"expected {action}, got {decision.action}: {decision.explanation}"
    if rule is not None:
        assert rule in decision.rule_ids, f"expected rule {rule}, got {decision.rule_ids}"
    if masked is not None:
        masked = list(masked)
        assert masked or not decision.mask_rule_ids, f"expected no mask rules, got {decision.mask_rule_ids}"
        missing = set(masked) - set(decision.mask_rule_ids)
        assert not missing, f"expected mask rules {sorted(missing)}, got {decision.mask_rule_ids}"


@dataclass
class MemoryRecorder:
    """Keeps session events in memory, for assertions."""

    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def open(self, session: Session) -> None:
        self.opened.append(session.id)

    def event(self, session: Session, kind: str, data: Mapping[str, Any]) -> None:
        self.records.append((session.id, kind, dict(data)))

    def close(self, session: Session) -> None:
        self.closed.append(session.id)


class Harness:
    """A real gateway around the addons under test, with a temporary state directory."""

    def __init__(self, gateway: Gateway, recorder: MemoryRecorder) -> None:
        self.gateway = gateway
        self.recorder = recorder

    @property
    def addons(self) -> AddonManager:
        return self.gateway.addons

    async def session(
        self, who: Identity | None = None, *, protocol: str, target: str = "test", peer: str = "127.0.0.1:0"
    ) -> Session:
        """Open a session as ``who`` (default: ``identity()``), running ``session_start`` hooks."""
        return await self.gateway.open_session(who or identity(), protocol=protocol, target=target, peer=peer)

    def set_policy(self, yaml_text: str | Sequence[str]) -> Policy:
        """Replace the live policy, the way a hot reload does."""
        texts = [yaml_text] if isinstance(yaml_text, str) else list(yaml_text)
        with tempfile.TemporaryDirectory() as d:
            for i, text in enumerate(texts):
                Path(d, f"pack{i}.yaml").write_text(text)
            result = load_policy([d], self.gateway.addons.vocabularies)
        if result.policy is None:
            raise ValueError("rule packs do not load:\n" + "\n".join(str(p) for p in result.errors))
        self.gateway.policy = result.policy
        return result.policy

    async def approve(self, approval_id: str, approver: Identity, reason: str = "") -> Any:
        """Approve a held request as ``approver`` (who must hold an approver role), as the CLI or
        the web page would. Returns the approval record."""
        return await self._vote(approval_id, approver, "approve", reason)

    async def deny(self, approval_id: str, approver: Identity, reason: str = "denied in a test") -> Any:
        """Deny a held request as ``approver``."""
        return await self._vote(approval_id, approver, "deny", reason)

    async def approval(self, approval_id: str) -> Any:
        """The approval record of ``approval_id`` (None when there is none): its ``status`` is
        ``pending`` while the request is held, then ``approved``, ``denied``, ``expired``, ``withdrawn``
        (the agent went away) or ``used``."""
        get = getattr(self.gateway.approvals, "get", None)
        if get is None:
            raise RuntimeError("this gateway has no approval broker that keeps approvals")
        return await get(approval_id)

    async def _vote(self, approval_id: str, approver: Identity, verdict: str, reason: str) -> Any:
        broker = self.gateway.approvals
        vote = getattr(broker, "vote", None)
        if vote is None:
            raise RuntimeError("this gateway has no approval broker that accepts votes")
        return await vote(approver, approval_id, verdict, reason)

    def events(self, session: Session | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Recorded session events, optionally of one session and one kind."""
        return [
            data
            for sid, k, data in self.recorder.records
            if (session is None or sid == session.id) and (kind is None or k == kind)
        ]

    def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Audit events written so far (decisions are ``kind="decision"``)."""
        return list(self.gateway.audit.events(kind=kind))


@asynccontextmanager
async def harness(
    *addons: Any,
    rulepacks: str | Sequence[str] = (),
    state_dir: str | Path | None = None,
    targets: Mapping[str, Mapping[str, Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    start: bool = False,
) -> AsyncIterator[Harness]:
    """A :class:`Harness` for ``addons``: loads them (``load``), sets ``options``, checks ``targets``
    against the target schemas the addons declared (raising ``ConfigError``, as ``lictor run`` refuses
    such a config), compiles ``rulepacks`` (YAML text), and with ``start=True`` also runs ``configure``
    and ``running`` (so listeners come up) and, on exit, ``done``."""
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory()
        state_dir = tmp.name
    try:
        manager = AddonManager()
        manager.add(*addons)
        if options:
            manager.set_options(options)
        config = GatewayConfig.default(state_dir)
        for name, settings in (targets or {}).items():
            config.targets[name] = Target(name, str(settings["protocol"]), dict(settings))
        validate_targets(config, manager)  # as `lictor run` does: against each protocol's target schema
        gateway = Gateway(config, manager)
        recorder = MemoryRecorder()
        gateway.recorder = recorder
        h = Harness(gateway, recorder)
        if rulepacks:
            h.set_policy(rulepacks)
        if start:
            manager.trigger_sync("configure", gateway)
            await manager.trigger("policy_loaded", gateway.policy)
            await manager.trigger("running", gateway)
        try:
            yield h
        finally:
            if start:
                await manager.trigger("done", gateway)
            for session in list(gateway.sessions.values()):
                await session.close(reason="harness exit")
            gateway.audit.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
