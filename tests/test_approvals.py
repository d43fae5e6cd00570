"""The approval broker against real Gateway objects: holds, votes, re-checks, expiry, elevation,
tickets, webhooks, the HTTP API and page, and two replicas sharing PostgreSQL.

Requests are real SQL classified by the PostgreSQL addon's vocabulary; agents' requests go
through ``Session.decide`` exactly as a protocol addon sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lictor import AddonManager, AuditError, Decision, Gateway, GatewayConfig, Identity, Request, load_policy
from lictor.approvals import Approval, ApprovalError, ApprovalSpec, PostgresStore, SqliteStore
from lictor.policytest import build_requests
from lictor_addons import default_addons

from tests.conftest import free_port, require
from tests.idp import HeldJwks

PACK = """
format: lictor/v1
metadata: {name: approvals-test}
identities:
  - match: {claims: {role: agent}}
    roles: [agent]
  - match: {claims: {role: dba}}
    roles: [dba]
  - match: {claims: {role: reader}}
    roles: [reader]
roles:
  reader:
    rules:
      - id: read
        protocol: postgres
        when: {statements: [select]}
        action: allow
  agent:
    inherits: [reader]
    rules:
      - id: update-once
        protocol: postgres
        when: {statements: [update]}
        action: approve
        message: updates need a DBA
        approval: {approvers: [dba], timeout: 20s}
      - id: delete-two
        protocol: postgres
        when: {statements: [delete]}
        action: approve
        message: deleting needs two DBAs
        approval: {approvers: [dba], required: 2, timeout: 20s}
      - id: truncate-quick
        protocol: postgres
        when: {statements: [truncate]}
        action: approve
        approval: {approvers: [dba], timeout: 1s}
      - id: alter-elevates
        protocol: postgres
        when: {statements: [alter_table]}
        action: approve
        approval: {approvers: [dba], scope: elevation, elevate: {roles: [writer], duration: 1s}, timeout: 20s}
      - id: drop-ticket
        protocol: postgres
        when: {statements: [drop]}
        action: approve
        message: drops need a ticket
        approval: {approvers: [dba], mode: ticket, timeout: 20s}
  writer:
    rules:
      - id: writer-insert
        protocol: postgres
        when: {statements: [insert, select]}
        action: allow
  dba:
    rules: []
"""

# The same pack after three different edits, for the re-check at resume.
PACK_UPDATE_DENIED = PACK.replace(
    "      - id: update-once",
    "      - id: no-updates\n        protocol: postgres\n        when: {statements: [update]}\n"
    "        action: deny\n        message: updates are frozen\n      - id: update-once",
)
PACK_UPDATE_ALLOWED = PACK.replace(
    "action: approve\n        message: updates need a DBA\n        approval: {approvers: [dba], timeout: 20s}",
    "action: allow",
)
PACK_UPDATE_NEEDS_TWO = PACK.replace(
    "approval: {approvers: [dba], timeout: 20s}", "approval: {approvers: [dba], required: 2}"
)


def ident(sub: str, role: str | list[str], issuer: str = "lictor") -> Identity:
    return Identity(subject=sub, claims={"sub": sub, "role": role}, issuer=issuer)


AGENT = ident("agent-1", ["agent", "dba"])  # an agent that also holds the approver role
DBA1, DBA2, DBA3 = ident("dba-1", "dba"), ident("dba-2", "dba"), ident("dba-3", "dba")
READER = ident("reader-1", "reader")


def write_pack(directory: Path, text: str = PACK) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pack.yaml").write_text(text)
    return directory


async def make_gateway(
    tmp_path: Path,
    approvals: dict[str, Any] | None = None,
    name: str = "gw",
    identity: dict[str, Any] | None = None,
    recordings: dict[str, Any] | None = None,
) -> Gateway:
    packs = write_pack(tmp_path / "packs")
    state = tmp_path / name
    raw = {"version": 1, "state_dir": str(state), "rulepacks": [str(packs)], "approvals": approvals or {}}
    if identity is not None:
        raw["identity"] = identity
    if recordings is not None:
        raw["recordings"] = recordings
    config = GatewayConfig(None, state, raw, rulepacks=[packs])
    manager = AddonManager()
    manager.add(*default_addons())
    gateway = Gateway(config, manager)
    await gateway.start()
    assert gateway.policy.version != "empty", gateway.policy_problems
    return gateway


def policy_from(gateway: Gateway, text: str, tmp_path: Path) -> Any:
    directory = write_pack(tmp_path / f"pack-{secrets.token_hex(3)}", text)
    result = load_policy([directory], gateway.addons.vocabularies)
    assert result.policy is not None, result.errors
    return result.policy


def sql(gateway: Gateway, text: str, reason: str | None = None) -> Request:
    (req,) = build_requests(gateway.policy, {"protocol": "postgres", "sql": text, "target": "db"})
    if reason is not None:
        req = Request(req.protocol, req.action, req.attrs, req.target, req.summary, req.payload, reason)
    return req


class Agent:
    """One agent session and its held requests, with the notices the protocol would relay."""

    def __init__(self, gateway: Gateway, identity: Identity) -> None:
        self.gateway = gateway
        self.identity = identity
        self.notices: list[tuple[str, str]] = []
        self.session: Any = None

    async def open(self) -> Agent:
        self.session = await self.gateway.open_session(self.identity, protocol="postgres", target="db", peer="test")
        return self

    async def notify(self, approval_id: str, message: str) -> None:
        self.notices.append((approval_id, message))

    def ask(self, request: Request) -> asyncio.Task[Decision]:
        return asyncio.get_running_loop().create_task(self.session.decide(request, self.notify))

    async def held(self, count: int = 1, timeout: float = 5.0) -> str:
        """Wait until ``count`` requests have been announced as held; the newest approval id."""
        deadline = time.monotonic() + timeout
        while len(self.notices) < count:
            assert time.monotonic() < deadline, "the request was never held"
            await asyncio.sleep(0.01)
        return self.notices[count - 1][0]


def audit(gateway: Gateway, kind: str) -> list[dict[str, Any]]:
    return list(gateway.audit.events(kind=kind))


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 40))


# -- holding, voting ------------------------------------------------------------------------------


def test_a_request_too_long_to_show_whole_shows_its_beginning_and_its_end(tmp_path: Path) -> None:
    # A long comment in front pushed what the statement does out of what approvers saw.
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, AGENT).open()
        text = "/* " + "A" * 300_000 + " */ UPDATE t SET a = 1 WHERE id = 99"
        task = agent.ask(sql(gw, text))
        aid = await agent.held()
        record = await gw.approvals.get(aid)  # type: ignore[union-attr]
        assert record is not None and record.payload_truncated
        assert record.payload.startswith("/* AAAA") and record.payload.endswith("UPDATE t SET a = 1 WHERE id = 99")
        assert "characters not shown" in record.payload and len(record.payload) < 270_000
        task.cancel()
        await gw.stop()

    run(scenario)


def test_held_request_is_released_by_an_approver_and_never_by_its_requester(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await (Agent(gw, AGENT)).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 1 WHERE id = 1", reason="fix ticket 42"))
        aid = await agent.held()
        assert re.fullmatch(r"ap-[0-9a-f]{10}", aid)
        message = agent.notices[0][1]
        assert f"waiting for approval {aid}" in message and "updates need a DBA" in message
        assert "1 approval(s) from role dba" in message and "expires in 20s" in message

        record = await gw.approvals.get(aid)  # type: ignore[union-attr]
        assert record is not None and record.status == "pending"
        assert record.reason == "fix ticket 42" and record.rule_ids == ("update-once",)
        assert record.payload == "UPDATE t SET a = 1 WHERE id = 1" and record.target == "db"
        assert record.requester_sub == "agent-1" and record.requester_iss == "lictor"
        assert record.attrs["tables"] == ["t"]  # what approvers read: a list, not "frozenset({'t'})"

        broker = gw.approvals
        assert broker is not None
        with pytest.raises(ApprovalError, match="your own request"):
            await broker.vote(AGENT, aid, "approve")  # holds dba, but it is the requester
        with pytest.raises(ApprovalError, match="needs one of the roles dba"):
            await broker.vote(READER, aid, "approve")
        with pytest.raises(ApprovalError, match="needs a reason"):
            await broker.vote(DBA1, aid, "deny", "  ")
        assert not task.done()

        # the same subject from another issuer is another principal: it may approve
        after = await broker.vote(ident("agent-1", "dba", issuer="https://idp.example"), aid, "approve", "ok")
        assert after.status == "approved"
        decision = await task
        assert decision.action == "allow" and decision.approval_id == aid
        assert decision.rule_ids == ("update-once",)
        assert (await broker.get(aid)).status == "used"  # type: ignore[union-attr]
        with pytest.raises(ApprovalError, match="already used"):
            await broker.vote(DBA1, aid, "approve")

        created = audit(gw, "approval.created")
        assert [e["id"] for e in created] == [aid] and created[0]["reason"] == "fix ticket 42"
        decided = audit(gw, "approval.decided")
        assert decided[0]["status"] == "approved" and decided[0]["decided_by"] == ["agent-1"]
        assert [e["why"] for e in audit(gw, "approval.refused")] == ["self-approval", "not an approver"]
        phases = [(e["phase"], e["action"]) for e in audit(gw, "decision")]
        assert phases == [("decision", "approve"), ("approval", "allow")]
        await gw.stop()

    run(scenario)


def test_without_an_approvals_api_the_agent_is_not_sent_to_a_command_that_cannot_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No approvals.listen: `lictor approvals approve ID` (which talks to that API) cannot decide anything.
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        assert "approvals.listen is not set, so no approver can reach this gateway" in caplog.text
        agent = await (Agent(gw, AGENT)).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 1 WHERE id = 1"))
        aid = await agent.held()
        message = agent.notices[0][1]
        assert "serves no approvals API (approvals.listen is not set)" in message, message
        assert "lictor approvals approve" not in message
        await gw.approvals.vote(DBA1, aid, "deny", "not now")  # type: ignore[union-attr]
        assert (await task).action == "deny"
        await gw.stop()

    with caplog.at_level(logging.WARNING, logger="lictor.approvals"):
        run(scenario)


def test_two_of_three_approvers_each_counting_once_and_one_denial_decides(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        broker = gw.approvals
        assert broker is not None
        agent = await Agent(gw, ident("agent-2", "agent")).open()
        task = agent.ask(sql(gw, "DELETE FROM orders WHERE id = 7"))
        aid = await agent.held()
        assert "2 approval(s) from role dba" in agent.notices[0][1]
        first = await broker.vote(DBA1, aid, "approve")
        assert first.status == "pending" and first.approvals_given == 1
        with pytest.raises(ApprovalError, match="each approver counts once"):
            await broker.vote(DBA1, aid, "approve")
        await asyncio.sleep(0.1)
        assert not task.done()
        second = await broker.vote(DBA3, aid, "approve", "checked the ticket")
        assert second.status == "approved" and second.decided_by == ("dba-1", "dba-3")
        decision = await task
        assert decision.allowed and decision.approval_id == aid

        task2 = agent.ask(sql(gw, "DELETE FROM orders WHERE id = 8"))
        aid2 = await agent.held(2)
        await broker.vote(DBA2, aid2, "approve")
        await broker.vote(DBA1, aid2, "deny", "order 8 is\x1b[2K still open")
        denied = await task2
        assert denied.action == "deny" and denied.approval_id == aid2
        # the approver's reason reaches the agent's terminal: its control characters are escaped
        assert denied.message == f"approval {aid2} was denied by dba-1: order 8 is\\x1b[2K still open"
        assert denied.rule_ids == ("delete-two",)
        await gw.stop()

    run(scenario)


def test_an_unanswered_request_expires_and_the_agent_is_told(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, ident("agent-3", "agent")).open()
        started = time.monotonic()
        decision = await agent.ask(sql(gw, "TRUNCATE audit_trail"))
        waited = time.monotonic() - started
        aid = agent.notices[0][0]
        assert 0.9 <= waited < 3.0
        assert decision.action == "deny" and decision.approval_id == aid
        assert decision.message == f"approval {aid} expired after 1s (0 of 1 approvals given); retry to ask again"
        assert [e["id"] for e in audit(gw, "approval.expired")] == [aid]
        with pytest.raises(ApprovalError, match="already expired"):
            await gw.approvals.vote(DBA1, aid, "approve")  # type: ignore[union-attr]
        await gw.stop()

    run(scenario)


@pytest.mark.parametrize(
    ("pack", "action", "text", "why"),
    [
        (PACK_UPDATE_DENIED, "deny", "the policy live now denies this request: updates are frozen", "now denies"),
        (PACK_UPDATE_ALLOWED, "allow", "", ""),
        (
            PACK_UPDATE_NEEDS_TWO,
            "deny",
            "no longer suffices: the live rule update-once needs 2 approval(s)",
            "the live rule update-once needs 2",
        ),
    ],
    ids=["now-denied", "now-allowed", "now-needs-two"],
)
def test_resumed_request_is_decided_again_under_the_live_policy(
    tmp_path: Path, pack: str, action: str, text: str, why: str
) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, ident("agent-4", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 2 WHERE id = 2"))
        aid = await agent.held()
        gw.policy = policy_from(gw, pack, tmp_path)  # a hot reload while the request is held
        await gw.approvals.vote(DBA1, aid, "approve")  # type: ignore[union-attr]
        decision = await task
        assert decision.action == action, decision
        assert decision.approval_id == aid
        assert text in decision.message
        status = (await gw.approvals.get(aid)).status  # type: ignore[union-attr]
        assert status == ("used" if action == "allow" else "withdrawn")
        # the audit log says when and why it was withdrawn, as for any other withdrawal
        withdrawn = audit(gw, "approval.withdrawn")
        assert [e["id"] for e in withdrawn] == ([] if action == "allow" else [aid])
        assert all(why in e["reason"] for e in withdrawn), withdrawn
        await gw.stop()

    run(scenario)


PACK_ALTER_FROZEN = PACK.replace(
    "      - id: alter-elevates",
    "      - id: no-alters\n        protocol: postgres\n        when: {statements: [alter_table]}\n"
    "        action: deny\n        message: change freeze\n      - id: alter-elevates",
).replace("duration: 1s}", "duration: 10m}")


async def _held_alter(tmp_path: Path, who: Identity) -> tuple[Gateway, Any, Agent, Any, str]:
    """A gateway, its broker, and ``who``'s ALTER TABLE held for an elevation approval."""
    gw = await make_gateway(tmp_path)
    broker = gw.approvals
    assert broker is not None
    agent = await Agent(gw, who).open()
    task = agent.ask(sql(gw, "ALTER TABLE t ADD COLUMN note text"))
    return gw, broker, agent, task, await agent.held()


@pytest.mark.parametrize("live", ["frozen", "needs-two"])
def test_an_elevation_ends_when_its_approval_is_withdrawn(tmp_path: Path, live: str) -> None:
    # The approval is given, but the request it was for no longer passes the live policy: it is withdrawn,
    # and so is the elevation it granted (it was kept for its whole duration).
    async def scenario() -> None:
        who = ident("agent-7", "agent")
        gw, broker, agent, task, aid = await _held_alter(tmp_path, who)
        pack = (
            PACK_ALTER_FROZEN
            if live == "frozen"
            else PACK.replace(
                "elevate: {roles: [writer], duration: 1s}", "elevate: {roles: [writer], duration: 10m}, required: 2"
            )
        )
        gw.policy = policy_from(gw, pack, tmp_path)  # a hot reload while the request is held
        await broker.vote(DBA1, aid, "approve", reason="ok")
        decision = await task
        assert decision.action == "deny"
        got = await broker.get(aid)
        assert got.status == "withdrawn" and "withdrawn:" in got.decision_reason
        assert broker.elevated_roles(who, "db") == ()
        assert broker.store.elevations(time.time()) == []
        assert aid in broker._revoked  # a refresh that read the store before cannot bring it back
        still = await agent.session.decide(sql(gw, "INSERT INTO t VALUES (1)"))
        assert still.action == "deny" and still.rule_ids == ("lictor:default-deny",)
        await gw.stop()

    run(scenario)


def test_requests_an_agent_opens_and_drops_leave_nothing_in_memory(tmp_path: Path) -> None:
    # Only a withdrawn elevation is remembered (for a day): an agent that opens and drops requests one after
    # the other must not grow the gateway's memory with each of them.
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        broker = gw.approvals
        assert broker is not None
        agent = await Agent(gw, ident("agent-8", "agent")).open()
        for n in range(5):
            task = agent.ask(sql(gw, f"UPDATE t SET a = {n} WHERE id = 1"))
            aid = await agent.held(n + 1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            got = await broker.get(aid)
            assert got is not None and got.status == "withdrawn"
        assert broker._revoked == {}
        await gw.stop()

    run(scenario)


def test_elevation_grants_roles_on_that_target_for_a_while(tmp_path: Path) -> None:
    async def scenario() -> None:
        who = ident("agent-5", "agent")
        gw, broker, agent, task, aid = await _held_alter(tmp_path, who)
        insert = sql(gw, "INSERT INTO t VALUES (1)")
        assert (await agent.session.decide(insert)).action == "deny"  # not a writer yet
        assert "grants roles writer on this target for 1s" in agent.notices[0][1]
        await broker.vote(DBA2, aid, "approve")
        decision = await task
        assert decision.allowed and decision.approval_id == aid
        assert broker.elevated_roles(who, "db") == ("writer",)
        assert broker.elevated_roles(who, "other-db") == ()
        assert broker.elevated_roles(ident("agent-6", "agent"), "db") == ()
        allowed = await agent.session.decide(insert)
        assert allowed.allowed and allowed.rule_ids == ("writer-insert",)
        await asyncio.sleep(1.1)
        assert broker.elevated_roles(who, "db") == ()
        expired = await agent.session.decide(insert)
        assert expired.action == "deny" and expired.rule_ids == ("lictor:default-deny",)
        await gw.stop()

    run(scenario)


def test_ticket_is_single_use_and_bound_to_the_request_and_requester(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        broker = gw.approvals
        assert broker is not None
        who = ident("agent-7", "agent")
        agent = await Agent(gw, who).open()
        drop = sql(gw, "DROP TABLE staging_2023")
        first = await agent.session.decide(drop, agent.notify)
        assert first.action == "deny" and first.approval_id and not agent.notices  # ticket: no waiting
        aid = first.approval_id
        assert f"this needs approval {aid}" in first.message
        assert f"header X-Lictor-Approval: {aid}" in first.message
        assert not broker.redeem(who, drop, aid)  # not approved yet
        await broker.vote(DBA1, aid, "approve")
        other = sql(gw, "DROP TABLE customers")
        assert not broker.redeem(who, other, aid)  # another request: other digest
        assert not broker.redeem(ident("agent-8", "agent"), drop, aid)  # another requester
        assert not broker.redeem(ident("agent-7", "agent", issuer="elsewhere"), drop, aid)
        assert broker.redeem(who, drop, aid)
        assert not broker.redeem(who, drop, aid)  # single use
        allowed = await agent.session.decide(drop)
        assert allowed.allowed and allowed.approval_id == aid
        again = await agent.session.decide(drop)  # the pass is gone too: a new ticket
        assert again.action == "deny" and again.approval_id not in (None, aid)
        assert [e["id"] for e in audit(gw, "approval.redeemed")] == [aid]
        await gw.stop()

    run(scenario)


def test_store_transitions_bind_the_digest_and_happen_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        broker = gw.approvals
        assert broker is not None
        who = ident("agent-9", "agent")
        agent = await Agent(gw, who).open()
        result = await agent.session.decide(sql(gw, "DROP TABLE x"))
        aid = result.approval_id
        assert aid
        await broker.vote(DBA1, aid, "approve")
        store, now = broker.store, time.time()
        assert not store.consume(aid, "0" * 64, who, now, now - 60)  # wrong digest
        record = store.get(aid)
        assert record is not None and record.status == "approved"
        assert not store.consume(aid, record.digest, who, now, now + 1)  # approval too old
        assert store.consume(aid, record.digest, who, now, now - 60)
        assert not store.consume(aid, record.digest, who, now, now - 60)
        assert not store.expire(aid, now) and not store.withdraw(aid, "x", now)
        await gw.stop()

    run(scenario)


def test_stopping_the_gateway_denies_held_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, ident("agent-10", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 3 WHERE id = 3"))
        aid = await agent.held()
        await gw.approvals.stop()  # type: ignore[union-attr]
        decision = await task
        assert decision.action == "deny" and "withdrawn (the gateway stopped)" in decision.message
        assert decision.approval_id == aid
        gw.audit.close()

    run(scenario)


def test_an_agent_that_goes_away_withdraws_its_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, ident("agent-11", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 4 WHERE id = 4"))
        aid = await agent.held()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await gw.approvals.get(aid)).status == "withdrawn"  # type: ignore[union-attr]
        with pytest.raises(ApprovalError, match="already withdrawn"):
            await gw.approvals.vote(DBA1, aid, "approve")  # type: ignore[union-attr]
        await gw.stop()

    run(scenario)


async def _gateway_with_a_small_spool(tmp_path: Path) -> Gateway:
    spool = {"max_bytes": 60_000, "segment_bytes": 8192, "reserve_bytes": 8192}
    return await make_gateway(tmp_path, recordings={"drain": "thread", "spool": spool})


def _fill_the_spool(gw: Gateway) -> None:
    """Stop the only sink and write until the spool takes no more."""
    for drainer in gw.recordings.drainers:
        drainer.stop()
    with pytest.raises(AuditError, match="full"):
        for i in range(1000):
            gw.audit_event("test.filler", {"n": i, "pad": "x" * 500})


def _drain_the_spool(gw: Gateway) -> None:
    """Start the sink again; the next event that gets through writes the ones the gateway kept meanwhile."""
    for drainer in gw.recordings.drainers:
        drainer.start()
    assert gw.recordings.flush(10)
    gw.audit_event("test.after", {})
    assert gw.recordings.flush(10)


def test_a_vote_the_store_took_reaches_the_audit_log_even_when_the_spool_is_full_at_that_moment(
    tmp_path: Path,
) -> None:
    # The store records a vote before it is audited: refusing the audit event then would undo nothing, and
    # would leave the vote and its outcome only in the store, which approvals.retention empties.
    async def scenario() -> None:
        gw = await _gateway_with_a_small_spool(tmp_path)
        broker = gw.approvals
        assert broker is not None
        agent = await Agent(gw, ident("agent-15", "agent")).open()
        aid = (await agent.session.decide(sql(gw, "DROP TABLE archive_2019"))).approval_id
        assert aid
        _fill_the_spool(gw)
        after = await broker.vote(DBA1, aid, "approve", "checked the backup")
        assert after.status == "approved"
        _drain_the_spool(gw)
        (voted,) = [e for e in audit(gw, "approval.voted") if e["id"] == aid]
        (decided,) = [e for e in audit(gw, "approval.decided") if e["id"] == aid]
        assert voted["approver"]["sub"] == "dba-1" and voted["reason"] == "checked the backup"
        assert decided["status"] == "approved" and decided["delayed"] is True
        await gw.stop()

    run(scenario)


def test_an_approval_the_store_marked_used_reaches_the_audit_log_even_when_the_spool_is_full(tmp_path: Path) -> None:
    # The store marks the approval used before that is audited: refusing the event then left the approval
    # used up with no trace of it in the audit log, which approvals.retention leaves as the only record.
    async def scenario() -> None:
        gw = await _gateway_with_a_small_spool(tmp_path)
        broker = gw.approvals
        assert broker is not None
        agent = await Agent(gw, ident("agent-16", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 2 WHERE id = 2"))
        aid = await agent.held()
        _fill_the_spool(gw)
        await broker.vote(DBA1, aid, "approve", "checked the backup")
        with contextlib.suppress(AuditError):
            decision = await task
            assert decision.action == "deny", decision  # what cannot be audited does not run
        assert (await broker.get(aid)).status == "used"  # type: ignore[union-attr]
        _drain_the_spool(gw)
        (used,) = [e for e in audit(gw, "approval.used") if e["id"] == aid]
        assert used["session"] == agent.session.id and used["delayed"] is True
        await gw.stop()

    run(scenario)


def test_bad_approvals_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="colour"):
        asyncio.run(make_gateway(tmp_path, {"colour": "red"}))
    with pytest.raises(ValueError, match="format"):
        asyncio.run(make_gateway(tmp_path, {"webhooks": [{"url": "http://x/", "format": "teams"}]}, name="g2"))
    with pytest.raises(ValueError, match="host:port"):
        asyncio.run(make_gateway(tmp_path, {"listen": "8470"}, name="g3"))
    # a bare number is seconds: `retention: 30` meant as days would remove each decision at once
    for n, retention in enumerate((30, "30m", "-1d", "soon", float("inf"), float("nan"))):
        with pytest.raises(ValueError, match=r"approvals\.retention"):
            asyncio.run(make_gateway(tmp_path, {"retention": retention}, name=f"r{n}"))
    with pytest.raises(ValueError, match=r"approvals\.retention: True is not of type"):
        asyncio.run(make_gateway(tmp_path, {"retention": True}, name="r-bool"))


# -- webhooks ---------------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server that records deliveries and answers 500 to the first one."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = [500]
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        self.received.append((path, headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    def events(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.received if p == path]


def test_webhooks_are_signed_slack_compatible_and_retried_after_a_500(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = Receiver()
        await receiver.start()
        base = f"http://127.0.0.1:{receiver.port}"
        gw = await make_gateway(
            tmp_path,
            {
                "public_url": "https://approvals.example",
                "webhook_backoff": 0.05,
                "webhooks": [
                    {"url": f"{base}/slack", "format": "slack", "secret": "s3cret"},
                    {"url": f"{base}/generic", "secret": "other", "events": ["approval.decided"]},
                ],
            },
        )
        agent = await Agent(gw, ident("agent-<b>", "agent")).open()
        reason = "<!channel> please <http://evil|click> \u202e\u2066 ;)lanigiro-ton(\u2069 \x1b[2J\u200b"
        task = agent.ask(sql(gw, "UPDATE t SET a = 5 WHERE id = 5", reason=reason))
        aid = await agent.held()
        await gw.approvals.vote(DBA1, aid, "approve")  # type: ignore[union-attr]
        assert (await task).allowed
        deadline = time.monotonic() + 5
        while (len(receiver.events("/slack")) < 3 or not receiver.events("/generic")) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        slack = receiver.events("/slack")
        assert len(slack) == 3  # created (500), created again (200), decided
        signed = [(b"s3cret", h, b) for h, b in slack] + [(b"other", h, b) for h, b in receiver.events("/generic")]
        for secret, headers, body in signed:
            ts = headers["x-lictor-timestamp"]
            assert abs(int(ts) - time.time()) < 30
            expected = "sha256=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-lictor-signature"], expected)
        kinds = sorted(h["x-lictor-event"] for h, _ in slack)
        assert kinds == ["approval.created", "approval.created", "approval.decided"]
        first, retry = [b for h, b in slack if h["x-lictor-event"] == "approval.created"]
        assert first == retry  # the retry carries the same message (freshly signed)
        # bidi overrides, zero-width and terminal control characters are shown escaped, not applied
        for raw in ("\u202e", "\u2066", "\u2069", "\u200b", "\x1b"):
            assert raw.encode() not in first, repr(raw)
        assert "\\x202e" in first.decode() and "\\x1b[2J" in first.decode()
        created = json.loads(first)
        assert created["text"].startswith(f"Approval {aid} requested: agent-&lt;b&gt; wants to run")
        text = json.dumps(created)
        assert "<!channel>" not in text and "<http://evil" not in text and "&lt;!channel&gt;" in text
        assert f"<https://approvals.example/approvals/{aid}|Review and decide in Lictor>" in text
        assert all(block["type"] in ("section", "context") for block in created["blocks"])  # no buttons
        decided = json.loads(next(b for h, b in slack if h["x-lictor-event"] == "approval.decided"))
        assert decided["text"].startswith(f"Approval {aid} approved by dba-1")
        (generic,) = receiver.events("/generic")
        doc = json.loads(generic[1])
        assert doc["event"] == "approval.decided" and doc["approval"]["id"] == aid
        assert doc["approval"]["reason"] == reason  # the generic format carries the data as it is
        assert generic[0]["x-lictor-event"] == "approval.decided"
        await gw.stop()
        assert receiver.server is not None
        receiver.server.close()

    run(scenario)


def test_a_slack_message_keeps_each_field_on_its_own_line() -> None:
    # The requester (a token's subject), the agent's reason and the request's summary are text the agent may
    # choose: a line break in one started a line of the message that read as another field ("*Requester:*"
    # of someone else, a "*Decision reason:*" nobody gave).
    import dataclasses

    from lictor.approvals.webhooks import Webhooks, WebhookTarget

    forged = "\n*Requester:* dba-lead\n*Decision reason:* approved by the DBA lead"
    approval = dataclasses.replace(
        _request("ap-forged0000", time.time()),
        requester_sub="agent-1" + forged,
        summary="UPDATE t SET a = 1" + forged,
        reason="fix" + forged,
    )
    target = WebhookTarget.parse({"url": "http://127.0.0.1:9/slack", "format": "slack"})
    doc = json.loads(Webhooks([target]).body(target, "approval.created", approval))
    head, details = (block["text"]["text"] for block in doc["blocks"][:2])
    assert "\n" not in head and "\n" not in doc["text"], head
    fields = [line.split(":*")[0] for line in details.splitlines()]
    assert fields == ["*Requester", "*Target", "*Rule", "*Needs", "*Agent's reason"], details
    assert "agent-1\\x0a*Requester:* dba-lead" in details  # shown, escaped


def test_webhook_messages_waiting_for_delivery_take_bounded_memory(tmp_path: Path) -> None:
    # Each message carries the request; one full of control characters is six times its size as JSON. An
    # agent opening request after request while the receiver lags must not pile up gigabytes (1,000 of them).
    async def scenario() -> None:
        receiver = Receiver()
        receiver.statuses = []
        await receiver.start()
        gw = await make_gateway(tmp_path, {"webhooks": [{"url": f"http://127.0.0.1:{receiver.port}/generic"}]})
        broker = gw.approvals
        assert broker is not None
        agent = await Agent(gw, ident("agent-9", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = '" + "\x01" * 200_000 + "' WHERE id = 1"))
        approval = await broker.get(await agent.held())
        assert approval is not None
        size = len(broker.webhooks.body(broker.webhooks.targets[0], "approval.created", approval))
        assert size > 1_000_000
        failed = broker.webhooks.failed
        for _ in range(80):  # as many requests: more than the budget holds, far fewer than the queue's 1,000
            broker.webhooks.emit("approval.created", approval)
        kept = 64 * 1024 * 1024 // size
        assert broker.webhooks.failed - failed >= 80 - kept  # the rest was dropped (and logged), not queued
        task.cancel()
        await gw.stop()
        assert receiver.server is not None
        receiver.server.close()

    run(scenario)


def test_one_agents_requests_cannot_take_the_webhook_queue_from_the_others(tmp_path: Path) -> None:
    # While the receiver lags (a chat service answering 429), messages wait; an agent opening request after request
    # took all the room there is, and the messages about every other agent's requests were dropped: approvers
    # were told only about the flood.
    async def scenario() -> None:
        lagging = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # takes messages, never answers
        port = lagging.sockets[0].getsockname()[1]
        gw = await make_gateway(tmp_path, {"webhooks": [{"url": f"http://127.0.0.1:{port}/generic"}]})
        broker = gw.approvals
        assert broker is not None
        flooding = await Agent(gw, ident("agent-9", "agent")).open()
        task = flooding.ask(sql(gw, "UPDATE t SET a = '" + "\x01" * 200_000 + "' WHERE id = 1"))
        big = await broker.get(await flooding.held())
        assert big is not None
        for _ in range(1_100):  # more than the whole queue's room, in bytes and in messages
            broker.webhooks.emit("approval.created", big)
        small = replace(big, payload="x", summary="x", attrs={})
        for _ in range(2):
            for _ in range(1_100):
                broker.webhooks.emit("approval.created", small)
            await asyncio.sleep(0.5)  # the first few are taken out of the queue to be delivered
        failed = broker.webhooks.failed
        other = await Agent(gw, ident("agent-1", "agent")).open()
        other_task = other.ask(sql(gw, "UPDATE t SET a = 2 WHERE id = 7"))
        aid = await other.held()
        assert broker.webhooks.failed == failed, aid  # queued, not dropped
        task.cancel()
        other_task.cancel()
        await gw.stop()
        lagging.close()

    run(scenario)


def test_unclaimed_tickets_expire_in_the_background_with_a_webhook(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = Receiver()
        receiver.statuses = []
        await receiver.start()
        url = f"http://127.0.0.1:{receiver.port}/hook"
        gw = await make_gateway(
            tmp_path, {"poll_interval": 0.05, "webhooks": [{"url": url, "events": ["approval.expired"]}]}
        )
        gw.policy = policy_from(gw, PACK.replace("mode: ticket, timeout: 20s", "mode: ticket, timeout: 0.3s"), tmp_path)
        agent = await Agent(gw, ident("agent-14", "agent")).open()
        ticket = await agent.session.decide(sql(gw, "DROP TABLE old_orders"))
        aid = ticket.approval_id
        assert ticket.action == "deny" and aid
        deadline = time.monotonic() + 5
        while not receiver.events("/hook") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        (hook,) = receiver.events("/hook")
        doc = json.loads(hook[1])
        assert doc["event"] == "approval.expired" and doc["approval"]["id"] == aid
        assert doc["approval"]["status"] == "expired" and "x-lictor-signature" not in hook[0]
        assert [e["id"] for e in audit(gw, "approval.expired")] == [aid]
        await gw.stop()
        assert receiver.server is not None
        receiver.server.close()

    run(scenario)


# -- HTTP API and page ------------------------------------------------------------------------------


def test_http_server_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    async def raw(port: int, data: bytes) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer.decode("latin-1")

    async def scenario() -> None:
        port = free_port()
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}"})
        assert (await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith("HTTP/1.1 200 OK")
        assert (await raw(port, b"GET /nothing-here HTTP/1.1\r\n\r\n")).startswith("HTTP/1.1 404")
        assert (await raw(port, b"DELETE /api/approvals/x HTTP/1.1\r\n\r\n")).startswith("HTTP/1.1 405")
        assert (await raw(port, b"GARBAGE\r\n\r\n")).startswith("HTTP/1.1 400")
        assert (await raw(port, b"GET http://evil/ HTTP/1.1\r\n\r\n")).startswith("HTTP/1.1 400")
        chunked = b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        assert (await raw(port, chunked)).startswith("HTTP/1.1 501")
        big = b"POST /login HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n"
        assert (await raw(port, big)).startswith("HTTP/1.1 413")
        twice = b"GET /healthz HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"
        assert (await raw(port, twice)).startswith("HTTP/1.1 400")
        long_line = b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"
        assert (await raw(port, long_line)).startswith("HTTP/1.1 414")
        json_as_form = b"POST /login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        assert (await raw(port, json_as_form)).startswith("HTTP/1.1 415")
        await gw.stop()

    run(scenario)


def test_the_approvals_api_and_page_do_not_wait_for_a_slow_identity_provider(tmp_path: Path) -> None:
    # A token of a JWKS issuer was verified on the event loop: while the identity provider was slow, the
    # whole gateway (every agent connection, the approvals page) stood still.
    idp = HeldJwks()

    async def scenario() -> None:
        port = free_port()
        identity = {"issuers": [{"type": "lictor"}, idp.issuer]}
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}"}, identity=identity)
        dba = gw.issuer.issue("dba-1", {"role": "dba"}, ttl=600)
        idp_token = idp.token("idp-dba", role="dba")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            slow = asyncio.create_task(http.get("/api/approvals", headers={"Authorization": f"Bearer {idp_token}"}))
            assert await asyncio.to_thread(idp.asked.wait, 15), "the API did not ask the identity provider"
            backstop = threading.Timer(20, idp.release.set)  # a stalled gateway answers only after this
            backstop.start()
            fast = await http.get("/api/approvals", headers={"Authorization": f"Bearer {dba}"})
            answered_while_held = not idp.release.is_set()
            idp.release.set()
            backstop.cancel()
            assert fast.status_code == 200 and answered_while_held
            assert (await slow).status_code == 200
        await gw.stop()

    try:
        run(scenario)
    finally:
        idp.close()


def test_the_api_takes_no_vote_from_a_token_that_has_expired(tmp_path: Path) -> None:
    # The clock leeway lets a token in a little after its exp; the page refused such a login ("a session cannot
    # end before it begins") and a protocol session denies every request once exp has passed, but the API took
    # the vote of an approver whose token had expired 10 seconds earlier.
    async def scenario() -> None:
        port = free_port()
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}"})
        expired = gw.issuer.issue("dba-1", {"role": "dba"}, ttl=-10)
        assert gw.verifier.verify(expired).subject == "dba-1"  # within the leeway
        agent = await Agent(gw, gw.verifier.verify(gw.issuer.issue("agent-x", {"role": "agent"}))).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 1 WHERE id = 6"))
        aid = await agent.held()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            headers = {"Authorization": f"Bearer {expired}"}
            vote = await http.post(f"/api/approvals/{aid}/approve", headers=headers)
            assert vote.status_code == 401 and "token expired" in vote.json()["error"], vote.text
            assert (await http.get("/api/approvals", headers=headers)).status_code == 401
        approval = await gw.approvals.get(aid)  # type: ignore[union-attr]
        assert approval is not None and approval.pending
        task.cancel()
        await gw.stop()

    run(scenario)


def test_api_and_page_authenticate_escape_and_check_csrf(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}"})
        base = f"http://127.0.0.1:{port}"
        dba = gw.issuer.issue("dba-1", {"role": "dba"}, ttl=600)
        reader = gw.issuer.issue("reader-1", {"role": "reader"}, ttl=600)
        agent = await Agent(gw, gw.verifier.verify(gw.issuer.issue("agent-x", {"role": "agent"}))).open()
        task = agent.ask(
            sql(gw, "UPDATE t SET a = '<script>alert(1)</script>\u202e' WHERE id = 6", reason="<img src=x>")
        )
        aid = await agent.held()
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            assert (await http.get("/api/approvals")).status_code == 401
            bad = await http.get("/api/approvals", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and "authentication failed" in bad.json()["error"]
            listed = await http.get("/api/approvals", headers={"Authorization": f"Bearer {dba}"})
            assert [a["id"] for a in listed.json()["approvals"]] == [aid]
            hidden = await http.get("/api/approvals", headers={"Authorization": f"Bearer {reader}"})
            assert hidden.status_code == 403 and "may approve anything" in hidden.json()["error"]
            refused = await http.post(f"/api/approvals/{aid}/approve", headers={"Authorization": f"Bearer {reader}"})
            assert refused.status_code == 403
            no_reason = await http.post(
                f"/api/approvals/{aid}/deny", json={"reason": ""}, headers={"Authorization": f"Bearer {dba}"}
            )
            assert no_reason.status_code == 400

            # the page: a login form with a CSRF token, then a session cookie
            assert (await http.get("/approvals")).headers["location"] == "/login"
            form = await http.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf and "HttpOnly" in form.headers["set-cookie"]
            assert "default-src 'none'" in form.headers["content-security-policy"]
            assert form.headers["x-frame-options"] == "DENY"
            wrong = await http.post("/login", data={"csrf": "forged", "token": dba})
            assert wrong.status_code == 403 and "login form expired" in wrong.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', wrong.text)  # a fresh form came back
            assert csrf
            denied = await http.post("/login", data={"csrf": csrf.group(1), "token": reader})
            assert denied.status_code == 403 and "may approve anything" in denied.text
            form = await http.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf
            login = await http.post("/login", data={"csrf": csrf.group(1), "token": dba})
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert "lictor_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            page = await http.get(f"/approvals/{aid}")
            assert page.status_code == 200
            assert "<script>" not in page.text and "<img" not in page.text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "&lt;img src=x&gt;" in page.text
            # a right-to-left override would show the approver the rest of the statement reversed
            assert "\u202e" not in page.text and "&lt;/script&gt;\\x202e&#x27; WHERE id = 6" in page.text
            record = await gw.approvals.get(aid)  # type: ignore[union-attr]
            assert record is not None and record.digest in page.text
            listing = await http.get("/approvals")
            assert f'href="/approvals/{aid}"' in listing.text and "update-once" in listing.text
            forged = await http.post(f"/approvals/{aid}/approve", data={"csrf": "x", "reason": ""})
            assert forged.status_code == 403 and not task.done()
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token
            ok = await http.post(f"/approvals/{aid}/approve", data={"csrf": token.group(1), "reason": "looks fine"})
            assert ok.status_code == 303 and ok.headers["location"] == f"/approvals/{aid}?done=approve"
        decision = await task
        assert decision.allowed and decision.approval_id == aid
        await gw.stop()

    run(scenario)


# -- replicas -------------------------------------------------------------------------------------


def _postgres_up() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2):
            return True
    except Exception:
        return False


def test_approval_on_one_replica_releases_the_request_held_on_another(tmp_path: Path) -> None:
    require(_postgres_up(), "PostgreSQL at 127.0.0.1:5432 (database test) is not reachable")
    schema = f"lictor_test_{secrets.token_hex(4)}"
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    # A long poll interval: only LISTEN/NOTIFY can wake the holding replica in time.
    section = {"store": "postgres", "dsn": dsn, "schema": schema, "poll_interval": 30}

    async def scenario() -> None:
        a = await make_gateway(tmp_path, section, name="replica-a")
        b = await make_gateway(tmp_path, section, name="replica-b")
        try:
            agent = await Agent(a, ident("agent-12", "agent")).open()
            task = agent.ask(sql(a, "UPDATE t SET a = 7 WHERE id = 7"))
            aid = await agent.held()
            listed = await b.approvals.recent(pending=True)  # type: ignore[union-attr]
            assert [x.id for x in listed] == [aid]
            started = time.monotonic()
            await b.approvals.vote(DBA1, aid, "approve", "from replica b")  # type: ignore[union-attr]
            decision = await asyncio.wait_for(task, 5)
            assert decision.allowed and decision.approval_id == aid
            assert time.monotonic() - started < 3

            # an elevation held and approved on b reaches a's in-memory map through the notification
            who = ident("agent-13", "agent")
            elevated = await Agent(b, who).open()
            task = elevated.ask(sql(b, "ALTER TABLE t ADD COLUMN c int"))
            aid2 = await elevated.held()
            assert a.approvals.elevated_roles(who, "db") == ()  # type: ignore[union-attr]
            await b.approvals.vote(DBA2, aid2, "approve")  # type: ignore[union-attr]
            assert (await asyncio.wait_for(task, 5)).allowed
            deadline = time.monotonic() + 3
            while not a.approvals.elevated_roles(who, "db") and time.monotonic() < deadline:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
            assert a.approvals.elevated_roles(who, "db") == ("writer",)  # type: ignore[union-attr]
            on_a = await Agent(a, who).open()
            assert (await on_a.session.decide(sql(a, "INSERT INTO t VALUES (2)"))).allowed
        finally:
            await a.stop()
            await b.stop()
            PostgresStore(dsn, schema).drop()

    run(scenario)


# -- retention --------------------------------------------------------------------------------------

DAY = 86400.0
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _request(aid: str, created: float, timeout: float = 900.0, **spec: Any) -> Approval:
    return Approval(
        id=aid,
        status="pending",
        created_at=created,
        expires_at=created + timeout,
        requester_sub="agent-1",
        requester_iss="lictor",
        session_id="s-1",
        peer="test",
        protocol="postgres",
        target="db",
        action="update",
        summary=f"UPDATE t SET a = 1 -- {aid}",
        payload=f"UPDATE t SET a = 1 -- {aid}",
        payload_truncated=False,
        attrs={},
        reason=None,
        digest=hashlib.sha256(aid.encode()).hexdigest(),
        rule_ids=("update-once",),
        rule_message="updates need a DBA",
        policy_version="v1",
        spec=ApprovalSpec(approvers=("dba",), timeout=timeout, **spec),
    )


def _fill_for_retention(store: Any, now: float) -> tuple[set[str], set[str]]:
    """Requests in every state, most of them 40 days old, with retention 30 days in mind: (the ids that ended
    before it, the ids that must stay)."""
    requester = ident("agent-1", "agent")
    old = now - 40 * DAY
    gone: set[str] = set()
    kept: set[str] = set()

    def new(aid: str, created: float, timeout: float = 900.0, **spec: Any) -> str:
        assert store.create(_request(aid, created, timeout, **spec))
        return aid

    gone.add(new("ap-denied0000", old))
    store.vote("ap-denied0000", DBA1, "deny", "no", old + 60)
    gone.add(new("ap-expired000", old))
    assert store.expire_due(old + 900) == ["ap-expired000"]
    gone.add(new("ap-used000000", old))
    store.vote("ap-used000000", DBA1, "approve", "", old + 60)
    assert store.consume("ap-used000000", _request("ap-used000000", old).digest, requester, old + 90, old - 840)
    gone.add(new("ap-withdrawn0", old))
    assert store.withdraw("ap-withdrawn0", "the agent stopped waiting", old + 30)
    gone.add(new("ap-stale00000", old))  # approved, never used, and its window of use closed 40 days ago
    store.vote("ap-stale00000", DBA1, "approve", "", old + 60)
    gone.add(new("ap-elevended0", old, scope="elevation", elevate_roles=("writer",), elevate_duration=3600.0))
    store.vote("ap-elevended0", DBA1, "approve", "", old + 60)  # its elevation ended 40 days ago

    kept.add(new("ap-pending000", old, timeout=50 * DAY))  # still waiting for approvers
    kept.add(new("ap-overdue000", old))  # past its deadline, but nothing has expired it yet: still pending
    kept.add(new("ap-usable0000", old, timeout=45 * DAY))  # approved 40 days ago, usable for 45
    store.vote("ap-usable0000", DBA2, "approve", "", old + 60)
    elevated = new("ap-elevlive00", old, scope="elevation", elevate_roles=("writer",), elevate_duration=60 * DAY)
    store.vote(elevated, DBA1, "approve", "", old + 60)  # its elevation lasts 20 more days
    assert store.consume(elevated, _request(elevated, old).digest, requester, old + 90, old - 840)
    kept.add(elevated)
    kept.add(new("ap-recent0000", now - DAY))
    store.vote("ap-recent0000", DBA1, "deny", "no", now - DAY + 60)
    kept.add(new("ap-border0000", now - 30 * DAY + 600))  # denied 30 days ago less ten minutes
    store.vote("ap-border0000", DBA1, "deny", "no", now - 30 * DAY + 600)
    return gone, kept


def _rows(store: Any, table: str, ids: set[str]) -> int:
    column = "id" if table == "approvals" else "approval_id"
    with store._tx() as cur:
        marks = ", ".join("?" for _ in ids)
        cur.execute(store._sql(f"SELECT count(*) FROM {{{table}}} WHERE {column} IN ({marks})"), tuple(ids))
        return int(cur.fetchone()[0])


def _check_retention(store: Any) -> None:
    now = time.time()
    gone, kept = _fill_for_retention(store, now)
    assert _rows(store, "votes", gone) == 4 and _rows(store, "elevations", gone) == 1
    removed: list[str] = []
    while batch := store.prune(now - 30 * DAY, 2):  # small batches, each its own transaction
        assert len(batch) <= 2
        removed += batch
    assert sorted(removed) == sorted(gone)
    for table in ("approvals", "votes", "elevations"):
        assert _rows(store, table, gone) == 0, table
    for aid in gone:
        assert store.get(aid) is None
    assert {a.id for a in store.recent(limit=100)} == kept
    assert [e.approval_id for e in store.elevations(now)] == ["ap-elevlive00"]
    usable = store.get("ap-usable0000")
    assert usable is not None and usable.status == "approved" and [v.subject for v in usable.votes] == ["dba-2"]
    # what stayed still works: the usable approval is used once, the pending request can be decided
    digest = _request("ap-usable0000", 0).digest
    assert store.consume("ap-usable0000", digest, ident("agent-1", "agent"), now, now - 45 * DAY)
    assert store.vote("ap-pending000", DBA1, "approve", "", now).decided
    assert store.prune(now - 30 * DAY, 100) == []


def test_retention_removes_requests_that_ended_and_keeps_the_rest_sqlite(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "approvals.db")
    try:
        _check_retention(store)
    finally:
        store.close()


def test_retention_removes_requests_that_ended_and_keeps_the_rest_postgres() -> None:
    require(_postgres_up(), "PostgreSQL at 127.0.0.1:5432 (database test) is not reachable")
    store = PostgresStore(PG_DSN, f"lictor_test_{secrets.token_hex(4)}")
    try:
        _check_retention(store)
    finally:
        store.drop()
        store.close()


def test_replicas_pruning_at_once_remove_each_request_once_and_skip_locked_ones() -> None:
    require(_postgres_up(), "PostgreSQL at 127.0.0.1:5432 (database test) is not reachable")
    import psycopg

    schema = f"lictor_test_{secrets.token_hex(4)}"
    first, second = PostgresStore(PG_DSN, schema), PostgresStore(PG_DSN, schema)
    try:
        now = time.time()
        old = now - 40 * DAY
        ids = {f"ap-{i:010x}" for i in range(120)}
        for aid in sorted(ids):
            assert first.create(_request(aid, old))
            first.vote(aid, DBA1, "deny", "no", old + 60)
        # a vote or withdrawal in progress on another replica holds a request's row: pruning passes it by
        with psycopg.connect(PG_DSN, autocommit=False) as holder:
            holder.execute(f"SELECT id FROM {schema}.approvals WHERE id = %s FOR UPDATE", ("ap-0000000000",))
            outcome: dict[str, list[str]] = {}
            pruner = threading.Thread(target=lambda: outcome.setdefault("ids", first.prune(now - 30 * DAY, 500)))
            pruner.start()
            pruner.join(10)
            assert not pruner.is_alive(), "pruning waited for a locked request"
            assert sorted(outcome["ids"]) == sorted(ids - {"ap-0000000000"})
            holder.rollback()
        assert first.prune(now - 30 * DAY, 500) == ["ap-0000000000"]

        # two replicas pruning the same backlog at once, in small batches
        again = {"ap-1" + aid[4:] for aid in ids}
        for aid in sorted(again):
            assert first.create(_request(aid, old))
            first.vote(aid, DBA1, "deny", "no", old + 60)
        removed: list[list[str]] = [[], []]
        errors: list[BaseException] = []

        def prune(store: PostgresStore, into: list[str]) -> None:
            try:
                while batch := store.prune(now - 30 * DAY, 7):
                    into.extend(batch)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=prune, args=(s, r)) for s, r in zip((first, second), removed, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert sorted(removed[0] + removed[1]) == sorted(again)  # each removed once, by one of them
        assert first.recent(limit=1000) == []
    finally:
        first.drop()
        first.close()
        second.close()


def test_request_digest_is_stable_and_unambiguous() -> None:
    # Held approvals and redeemable tickets stored by an earlier gateway version are bound to this digest:
    # its definition (compact JSON of protocol, target, action, payload) must not drift.
    request = Request("postgres", "delete", target="app", payload="DELETE FROM t")
    text = '["postgres","app","delete","DELETE FROM t"]'
    assert request.digest() == hashlib.sha256(text.encode()).hexdigest()
    assert Request("p", "a", payload="é\n").digest() == hashlib.sha256('["p","","a","é\\n"]'.encode()).hexdigest()
    # The summary and the reason describe the request; they are not part of it.
    assert (
        request.digest()
        == Request("postgres", "delete", target="app", payload="DELETE FROM t", summary="other", reason="why").digest()
    )
    # Field boundaries cannot be shifted: "ab"+"c" differs from "a"+"bc".
    assert Request("p", "c", target="ab").digest() != Request("p", "bc", target="a").digest()


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(codec=None, exclude_categories=())), st.text(max_size=3))
def test_request_digest_is_the_standard_json_form_for_any_text(payload: str, action: str) -> None:
    # The fast encoder must give the exact bytes of the standard one: control characters, non-ASCII,
    # U+2028, and lone surrogates (which only the standard encoder takes).
    standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode(["p", "t", action, payload])
    expected = hashlib.sha256(standard.encode("utf-8", "surrogatepass")).hexdigest()
    assert Request("p", action, target="t", payload=payload).digest() == expected
    lone = payload + "\ud800"
    standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode(["p", "t", action, lone])
    assert (
        Request("p", action, target="t", payload=lone).digest()
        == hashlib.sha256(standard.encode("utf-8", "surrogatepass")).hexdigest()
    )


def test_requests_held_by_a_crashed_gateway_are_withdrawn_at_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        gw = await make_gateway(tmp_path)
        agent = await Agent(gw, ident("agent-40", "agent")).open()
        task = agent.ask(sql(gw, "UPDATE t SET a = 40 WHERE id = 40"))
        held = await agent.held()
        ticket = await agent.ask(sql(gw, "DROP TABLE t40"))
        assert ticket.action == "deny" and ticket.approval_id
        # The process dies with the request held: no withdraw, no stop (SIGKILL).
        gw.approvals._stopping = True  # type: ignore[union-attr]
        task.cancel()
        gw.approvals._withdraw_now = lambda *a: None  # type: ignore[union-attr]
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await gw.approvals.get(held)).status == "pending"  # type: ignore[union-attr]
        gw.approvals.store.close()  # type: ignore[union-attr]
        gw.audit.close()

        again = await make_gateway(tmp_path)  # same state directory: the restarted gateway
        try:
            assert (await again.approvals.get(held)).status == "withdrawn"  # type: ignore[union-attr]
            with pytest.raises(ApprovalError, match="already withdrawn"):
                await again.approvals.vote(DBA1, held, "approve")  # type: ignore[union-attr]
            # a ticket's agent comes back with the id later: it stays pending
            assert (await again.approvals.get(ticket.approval_id)).status == "pending"  # type: ignore[union-attr]
        finally:
            await again.stop()

    run(scenario)
