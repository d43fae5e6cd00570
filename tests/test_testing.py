"""The addon kit: the helpers addon authors use to test their addons."""

from __future__ import annotations

import asyncio
import re

import pytest
from lictor import Decision, Glob, Vocabulary, testing

from tests.addons.lineproto import LineProtocol
from tests.conftest import free_port

PACK = """
format: lictor/v1
metadata: {name: kit}
identities: [{match: {claims: {role: reader}}, roles: [reader]}]
roles:
  reader:
    rules:
      - {id: get, protocol: line, when: {verbs: get}, action: allow}
      - {id: mask-cards, protocol: line, action: mask, mask: {detectors: [card]}}
"""


def test_policy_identity_request_helpers():
    policy = testing.policy(PACK, LineProtocol())
    d = policy.decide(testing.identity("a", role="reader"), testing.request("line", "get", verb="get", command="get x"))
    testing.assert_decision(d, "allow", rule="get", masked=["mask-cards"])
    with pytest.raises(AssertionError, match="expected deny"):
        testing.assert_decision(d, "deny")
    with pytest.raises(ValueError, match=r"pack0.yaml:\d+:\d+: unknown key"):
        testing.policy(PACK.replace("action: allow", "action: allow, colour: red"), LineProtocol())


async def test_a_test_request_carries_the_agents_reason_and_payload_not_as_attributes():
    # `reason=` became an attribute named "reason": the request had no reason, and no test could show
    # what the audit and the approvers get.
    r = testing.request("line", "get", verb="get", summary="get x", payload="get x\n", reason="ticket 42")
    assert (r.reason, r.payload, r.summary) == ("ticket 42", "get x\n", "get x")
    assert r.attrs == {"verb": "get"}
    async with testing.harness(LineProtocol(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        testing.assert_decision(await session.decide(r), "allow", rule="get")
        assert [e["reason"] for e in h.audit("decision")] == ["ticket 42"]


async def test_a_request_without_a_target_is_decided_on_its_sessions_target():
    # An addon that left `target` out of its requests had every rule scoped to a target skipped: the
    # deny below did not fire on `prod`, while the audit event said the request was on `prod`.
    pack = PACK + "      - {id: no-get-on-prod, protocol: line, targets: [prod], when: {verbs: get}, action: deny}\n"
    async with testing.harness(LineProtocol(), rulepacks=pack) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line", target="prod")
        request = testing.request("line", "get", verb="get")
        assert request.target == ""
        testing.assert_decision(await session.decide(request), "deny", rule="no-get-on-prod")
        testing.assert_decision(session.decide_now(request), "deny", rule="no-get-on-prod")
        testing.assert_decision(session.policy_decision(request), "deny", rule="no-get-on-prod")
        other = await h.session(testing.identity("a", role="reader"), protocol="line", target="staging")
        testing.assert_decision(await other.decide(request), "allow", rule="get")


async def test_harness_drives_hooks_audit_and_recorder():
    async with testing.harness(LineProtocol(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        allowed = await session.decide(testing.request("line", "get", verb="get", command="get x"))
        denied = await session.decide(testing.request("line", "put", verb="put", command="put x"))
        testing.assert_decision(allowed, "allow", rule="get")
        testing.assert_decision(denied, "deny", rule="lictor:default-deny")
        session.record("command", {"command": "get x"})
        assert h.events(session, "command") == [{"command": "get x"}]
        assert [e["action"] for e in h.audit("decision")] == ["allow", "deny"]
        plan = session.mask_plan(allowed)
        masked, counts = plan.mask_text("card 4111 1111 1111 1111")
        assert "4111 1111 1111 1111" not in masked and counts["card"] == 1


async def test_a_flood_of_refusals_is_audited_as_one_event_with_a_count(monkeypatch, tmp_path):
    # A connection refused at a limit is audited; a flood of them must not fill the audit spool.
    from lictor import AuditLog
    from lictor import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "BURST_INTERVAL", 0.2)
    async with testing.harness(LineProtocol(), rulepacks=PACK, state_dir=tmp_path) as h:
        event = {"protocol": "line", "reason": "full"}
        firsts = [h.gateway.audit_burst("line:full", "connection.refused", event) for _ in range(500)]
        assert firsts == [True] + [False] * 499
        assert [e["count"] for e in h.audit("connection.refused")] == [1]
        await asyncio.sleep(0.4)
        assert [e["count"] for e in h.audit("connection.refused")] == [1, 499]
        assert h.gateway.audit_burst("line:full", "connection.refused", event)  # a new burst
        h.gateway.audit_burst("line:full", "connection.refused", event)
        await h.gateway.stop()  # what is left of a burst is written when the gateway stops
    audit = AuditLog(tmp_path / "audit.db")
    try:
        assert [e["count"] for e in audit.events(kind="connection.refused")] == [1, 499, 1, 1]
    finally:
        audit.close()


async def test_harness_starts_listeners_of_a_protocol_addon(monkeypatch):
    monkeypatch.delenv("LINEPROTO_FAIL_ON", raising=False)
    port = free_port()
    targets = {"t": {"protocol": "line", "listen": f"127.0.0.1:{port}"}}
    async with testing.harness(LineProtocol(), rulepacks=PACK, targets=targets, start=True) as h:
        token = h.gateway.issuer.issue("agent", {"role": "reader"})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"AUTH {token}\nget a\nput b\n".encode())
        await writer.drain()
        lines = [(await reader.readline()).decode().strip() for _ in range(3)]
        assert lines[0] == "READY" and lines[1].startswith("OK get") and lines[2].startswith("DENIED")
        writer.close()


class _DenyPuts:
    """A guard addon for the `line` protocol only (``protocols``), and one for every protocol."""

    name = "deny-puts"
    protocols = ("line",)

    def __init__(self) -> None:
        self.seen: list[str] = []

    def request(self, flow):
        self.seen.append(flow.request.protocol)
        if flow.request.action == "put":
            flow.deny("no puts", "test:no-puts")


class _Everywhere:
    name = "everywhere"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def decision(self, flow):
        self.seen.append(flow.request.protocol)


async def test_request_hooks_run_for_the_protocols_an_addon_names():
    guard, watcher = _DenyPuts(), _Everywhere()
    async with testing.harness(LineProtocol(), guard, watcher, rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        put = testing.request("line", "put", verb="get", command="put x")  # a rule would allow its verb
        testing.assert_decision(await session.decide(put), "deny", rule="test:no-puts")
        testing.assert_decision(session.decide_now(put), "deny", rule="test:no-puts")
        other = testing.request("other", "put", command="put x")
        testing.assert_decision(session.decide_now(other), "deny", rule="lictor:default-deny")
        assert guard.seen == ["line", "line"]  # never called for the `other` protocol
        assert watcher.seen == ["line", "line", "other"]  # no `protocols`: every request


async def test_a_hook_denial_is_reported_when_the_policy_denies_the_request_too():
    # The policy's own denial (no rule allows a put) replaced the hook's: the agent and the audit were
    # told "no rule allows", and a broken addon's stand-in or a guard's reason never showed.
    async with testing.harness(LineProtocol(), _DenyPuts(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        put = testing.request("line", "put", verb="put", command="put x")
        for decision in (await session.decide(put), session.decide_now(put)):
            testing.assert_decision(decision, "deny", rule="test:no-puts")
            assert decision.message == "no puts"
        assert [e["rule_ids"] for e in h.audit("decision")] == [["test:no-puts"]] * 2


def test_assert_decision_with_no_mask_rules_expected_fails_on_a_masked_decision():
    # `masked=[]` (nothing is masked for this role) passed whatever masked the result.
    policy = testing.policy(PACK, LineProtocol())
    d = policy.decide(testing.identity("a", role="reader"), testing.request("line", "get", verb="get", command="get x"))
    with pytest.raises(AssertionError, match=r"expected no mask rules, got \('mask-cards',\)"):
        testing.assert_decision(d, "allow", masked=[])
    testing.assert_decision(d, "allow", masked=["mask-cards"])


class _WithOption:
    name = "with-option"

    def load(self, loader):
        loader.add_option("with_option_limit", int, 10, "a limit")


def test_an_addon_with_options_can_be_removed_and_loaded_again_keeping_the_configured_value():
    # what the addon-file watcher does on a reload: remove the old instance, add the new one
    from lictor import AddonManager

    manager = AddonManager()
    old = _WithOption()
    manager.add(old)
    manager.set_options({"with_option_limit": 3})
    manager.remove(old)
    manager.add(_WithOption())
    assert manager.option("with_option_limit") == 3


class _WithNumbers:
    name = "with-numbers"

    def load(self, loader):
        loader.add_option("with_numbers_timeout", float, 2.5, "seconds")
        loader.add_option("with_numbers_limit", int, 10, "a limit")


async def test_options_take_numbers_as_yaml_writes_them():
    # `timeout: 5` was refused for a float option ("must be float, got int"), and `limit: true` was taken
    # for an int option as 1 (bool is an int to Python).
    async with testing.harness(_WithNumbers(), options={"with_numbers_timeout": 5}) as h:
        assert h.addons.option("with_numbers_timeout") == 5.0
        assert isinstance(h.addons.option("with_numbers_timeout"), float)
    for name in ("with_numbers_timeout", "with_numbers_limit"):
        with pytest.raises(ValueError, match=f"option '{name}' must be (float|int), got bool"):
            async with testing.harness(_WithNumbers(), options={name: True}):
                pass


class _RefusesSessions:
    name = "refuses-sessions"

    async def session_start(self, session):
        raise RuntimeError("no sessions today")


async def test_a_session_refused_by_a_session_start_hook_is_ended_not_left_open():
    from lictor import HookError

    async with testing.harness(LineProtocol(), _RefusesSessions(), rulepacks=PACK) as h:
        with pytest.raises(HookError, match="no sessions today"):
            await h.session(testing.identity("a", role="reader"), protocol="line")
        assert h.gateway.sessions == {}
        [started] = h.audit("session.start")
        [ended] = h.audit("session.end")
        assert ended["session"] == started["id"]
        assert ended["reason"] == (
            "refused: addon 'refuses-sessions' failed in hook 'session_start': RuntimeError: no sessions today"
        )


def test_protocols_must_name_protocols_not_be_one_string():
    from lictor import AddonManager

    class Guard:
        name = "guard"
        protocols = "redis"  # would match "re" and "is" by substring

    with pytest.raises(ValueError, match="protocols must be a tuple"):
        AddonManager().add(Guard())


def test_an_async_request_hook_for_every_protocol_is_refused_when_added():
    """PostgreSQL and SSH decide synchronously: such a guard would deny all their requests."""
    from lictor import AddonManager

    class AsyncGuard:
        name = "async-guard"

        async def request(self, flow):
            return None

    with pytest.raises(ValueError, match="async 'request' hook must name the protocols it inspects"):
        AddonManager().add(AsyncGuard())

    class AsyncLineGuard(AsyncGuard):
        protocols = ("line",)

    AddonManager().add(AsyncLineGuard())


def test_a_second_addon_cannot_replace_a_protocols_target_schema():
    # add_vocabulary refused a second vocabulary for a protocol, but add_target_schema silently replaced
    # the first addon's schema (so the gateway config of that protocol was checked against another one).
    from lictor import AddonManager
    from lictor.addons import HookError

    class Intruder:
        name = "intruder"

        def load(self, loader: object) -> None:
            loader.add_target_schema("line", {"type": "object"})  # type: ignore[attr-defined]

    manager = AddonManager()
    manager.add(LineProtocol())
    with pytest.raises(HookError, match="'line' already has a target schema"):
        manager.add(Intruder())
    first = manager.get("lineproto")
    assert first is not None
    manager.remove(first)
    manager.add(LineProtocol())  # the same protocol's addon loaded again (a reload) may declare it anew
    assert manager.target_schemas["line"]["type"] == "object"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": "verb"}, "index 'verb' names no field (fields: commands, verbs)"),
        ({"secondary": "command"}, "secondary 'command' names no field"),
        ({"fields": (Glob("verbs"), Glob("verbs", attr="verb"))}, "two fields are named 'verbs'"),
        ({"fields": ("verbs",)}, "'verbs' is not a field"),
        ({"mask_by": ("detector",)}, "mask_by 'detector' is not one of"),
        ({"protocol": ""}, "protocol must be a non-empty string"),
    ],
)
def test_a_broken_vocabulary_is_refused_saying_what_is_wrong(kwargs, message):
    # An index naming no field crashed the gateway's start with a bare KeyError from the policy engine.
    base = {"protocol": "line", "fields": (Glob("commands", attr="command"), Glob("verbs", attr="verb"))}
    with pytest.raises(ValueError, match="vocabulary '.*': " + re.escape(message)):
        Vocabulary(**{**base, **kwargs})


class _Hangs:
    name = "hangs"
    protocols = ("line",)

    async def decision(self, flow):
        await asyncio.Event().wait()  # an external check that never answers


async def test_an_async_hook_that_never_returns_is_an_audited_denial(caplog):
    # The request waited for ever: no decision for the agent, nothing in the audit.
    async with testing.harness(LineProtocol(), _Hangs(), rulepacks=PACK) as h:
        h.addons.hook_timeout = 0.2
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        decision = await asyncio.wait_for(session.decide(testing.request("line", "get", verb="get")), 10)
        testing.assert_decision(decision, "deny", rule="lictor:addon-error")
        assert "addon 'hangs'" in decision.message
        assert [e["rule_ids"] for e in h.audit("decision")] == [["lictor:addon-error"]]
        assert "failed in hook 'decision': TimeoutError: it did not return within 0.2 s" in caplog.text


class _Exits:
    name = "exits"
    protocols = ("line",)

    def request(self, flow):
        if "exit" in flow.request.payload:
            raise SystemExit(3)  # a library calling sys.exit(): it stopped the whole gateway, unaudited


class _AwaitsSomethingCancelled:
    name = "awaits-cancelled"
    protocols = ("line",)

    async def decision(self, flow):
        future = asyncio.get_running_loop().create_future()
        future.cancel()  # a shared client closed under it, say
        await future


async def test_a_hook_that_exits_or_sees_a_cancellation_is_an_audited_denial():
    async with testing.harness(LineProtocol(), _Exits(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        exiting = testing.request("line", "get", verb="get", summary="get exit")
        testing.assert_decision(await session.decide(exiting), "deny", rule="lictor:addon-error")
        testing.assert_decision(session.decide_now(exiting), "deny", rule="lictor:addon-error")
        assert [e["rule_ids"] for e in h.audit("decision")] == [["lictor:addon-error"]] * 2
    async with testing.harness(LineProtocol(), _AwaitsSomethingCancelled(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        decision = await session.decide(testing.request("line", "get", verb="get"))
        testing.assert_decision(decision, "deny", rule="lictor:addon-error")
        assert "addon 'awaits-cancelled'" in decision.message


class _ReturnsVerdict:
    name = "returns-verdict"
    protocols = ("line",)

    def request(self, flow):
        if "card" in flow.request.payload:
            return Decision.deny("no cards", "guard:no-card")  # meant as a denial; flow.deny is the way
        return None

    async def decision(self, flow):
        return "secret" not in flow.request.payload  # meant as allowed or not


async def test_a_hook_that_returns_a_verdict_instead_of_calling_deny_is_an_audited_denial(caplog):
    # The returned value was dropped: the request the hook meant to refuse was allowed.
    async with testing.harness(LineProtocol(), _ReturnsVerdict(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        for summary, hook in (("get card", "request"), ("get secret", "decision")):
            request = testing.request("line", "get", verb="get", summary=summary)
            for decision in (await session.decide(request), session.decide_now(request)):
                testing.assert_decision(decision, "deny", rule="lictor:addon-error")
                assert "addon 'returns-verdict'" in decision.message
            assert f"hook '{hook}' returned" in caplog.text and "flow.deny(message, rule_id)" in caplog.text
        assert [e["rule_ids"] for e in h.audit("decision")] == [["lictor:addon-error"]] * 4


class _RewritesRequest:
    name = "rewrites-request"
    protocols = ("line",)

    def request(self, flow):
        # meant to have the policy decide a cleaned-up request: the one passed to decide was decided
        flow.request = testing.request("line", "put", verb="put", summary="put x")


async def test_a_hook_cannot_swap_the_request_it_is_shown():
    async with testing.harness(LineProtocol(), _RewritesRequest(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        request = testing.request("line", "get", verb="get", summary="get x")
        testing.assert_decision(await session.decide(request), "deny", rule="lictor:addon-error")
        testing.assert_decision(session.decide_now(request), "deny", rule="lictor:addon-error")


async def test_cancelling_a_decision_still_cancels_it():
    # the agent went away while a hook was waiting: the caller cancels, and that is not an addon failure
    async with testing.harness(LineProtocol(), _Hangs(), rulepacks=PACK) as h:
        session = await h.session(testing.identity("a", role="reader"), protocol="line")
        task = asyncio.ensure_future(session.decide(testing.request("line", "get", verb="get")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert h.audit("decision") == []


async def test_the_harness_checks_targets_against_the_addons_target_schema():
    # The harness took any target, so a target schema that `lictor run` would refuse configs with
    # (or a target of a protocol no addon serves) passed every test.
    from lictor import ConfigError

    bad = {"t": {"protocol": "line", "listen": "127.0.0.1:1", "colour": "red"}}
    with pytest.raises(ConfigError, match="target 't': Additional properties are not allowed"):
        async with testing.harness(LineProtocol(), targets=bad):
            pass
    with pytest.raises(ConfigError, match="no loaded addon serves protocol 'kv'"):
        async with testing.harness(LineProtocol(), targets={"k": {"protocol": "kv"}}):
            pass


class _VocabularyOnly:
    name = "vocabulary-only"

    def load(self, loader):
        loader.add_vocabulary(Vocabulary(protocol="kv", fields=(Glob("verbs", attr="verb"),), index="verbs"))


async def test_a_target_of_an_addon_without_a_target_schema_names_the_addon():
    # It said "no loaded addon serves protocol 'kv'" while the addon giving that protocol was loaded.
    from lictor import ConfigError

    with pytest.raises(
        ConfigError, match="addon 'vocabulary-only' gives the vocabulary of protocol 'kv' but no target"
    ):
        async with testing.harness(_VocabularyOnly(), targets={"k": {"protocol": "kv", "listen": "127.0.0.1:1"}}):
            pass


class _BrokenTargetSchema:
    name = "broken-target-schema"

    def load(self, loader):
        loader.add_target_schema("line", {"type": "objekt", "properties": {"listen": {"type": "string"}}})


def test_a_target_schema_that_is_no_json_schema_is_refused_when_the_addon_loads():
    # It loaded, and `lictor run` then stopped with a jsonschema traceback while checking the targets.
    from lictor import AddonManager, HookError

    with pytest.raises(
        HookError, match=r"target schema of protocol 'line' is not a JSON Schema: .*objekt.* \(at type\)"
    ):
        AddonManager().add(_BrokenTargetSchema())


def test_a_second_vocabulary_for_a_protocol_is_refused_naming_the_addon_that_has_it():
    from lictor import AddonManager, HookError

    class Intruder:
        name = "intruder"

        def load(self, loader):
            loader.add_vocabulary(Vocabulary("line", (Glob("x"),)))

    manager = AddonManager()
    manager.add(LineProtocol())
    with pytest.raises(HookError, match=r"protocol 'line' already has a vocabulary \(from addon 'lineproto'\)"):
        manager.add(Intruder())


def test_an_async_load_hook_is_refused_not_skipped():
    # It was called and never awaited: the addon loaded without its vocabulary or target schema.
    from lictor import AddonManager, HookError

    class AsyncLoad:
        name = "async-load"

        async def load(self, loader):
            loader.add_vocabulary(Vocabulary("kv", (Glob("keys"),)))

    manager = AddonManager()
    with pytest.raises(HookError, match="hook 'load' must be synchronous"):
        manager.add(AsyncLoad())
    assert manager.addons == [] and "kv" not in manager.vocabularies


async def test_the_harness_reads_back_a_held_requests_approval():
    pack = (
        PACK.replace(
            "      - {id: get, protocol: line, when: {verbs: get}, action: allow}\n",
            "      - {id: get, protocol: line, when: {verbs: get}, action: allow}\n"
            "      - {id: put, protocol: line, when: {verbs: put}, action: approve, approval: {approvers: [approver]}}\n",
        )
        .replace(
            "identities: [{match: {claims: {role: reader}}, roles: [reader]}]",
            "identities:\n"
            "  - {match: {claims: {role: reader}}, roles: [reader]}\n"
            "  - {match: {claims: {role: approver}}, roles: [approver]}",
        )
        .replace("roles:\n  reader:", "roles:\n  approver: {rules: []}\n  reader:")
    )
    async with testing.harness(LineProtocol(), rulepacks=pack) as h:
        session = await h.session(testing.identity("agent-1", role="reader"), protocol="line")
        held: asyncio.Queue[str] = asyncio.Queue()

        async def notify(approval_id: str, message: str) -> None:
            held.put_nowait(approval_id)

        decide = asyncio.create_task(session.decide(testing.request("line", "put", verb="put"), notify))
        approval_id = await asyncio.wait_for(held.get(), 10)
        assert (await h.approval(approval_id)).status == "pending"
        await h.approve(approval_id, testing.identity("human-1", role="approver"))
        testing.assert_decision(await asyncio.wait_for(decide, 10), "allow", rule="put")
        assert (await h.approval(approval_id)).status != "pending"
        assert await h.approval("no-such-approval") is None


def test_an_empty_collection_is_covered_by_an_allow_and_none_is_not():
    """docs/addons.md: an empty collection is covered by every allow condition; unknown is None."""
    vocabulary = Vocabulary(
        protocol="kv", fields=(Glob("verbs", attr="verb"), Glob("keys", attr="keys")), index="verbs"
    )

    class KV:
        name = "kv"

        def load(self, loader):
            loader.add_vocabulary(vocabulary)

    pack = """
format: lictor/v1
metadata: {name: kv}
identities: [{match: {claims: {role: r}}, roles: [r]}]
roles:
  r:
    rules:
      - {id: app-keys, protocol: kv, when: {verbs: get, keys: "app:*"}, action: allow}
"""
    policy = testing.policy(pack, KV())
    who = testing.identity("a", role="r")
    assert policy.decide(who, testing.request("kv", "get", verb="get", keys=[])).action == "allow"
    assert policy.decide(who, testing.request("kv", "get", verb="get", keys=None)).action == "deny"
    assert policy.decide(who, testing.request("kv", "get", verb="get")).action == "deny"


class _RefusesListen:
    name = "refuses-listen"

    def load(self, loader):
        loader.add_target_schema("line", {"type": "object", "properties": {"listen": {"type": "string"}}})

    def configure(self, gateway):
        for target in gateway.targets("line"):
            if ":" not in str(target.get("listen")):
                raise ValueError(f"{target.where}: listen is not HOST:PORT")


async def test_the_harness_runs_configure_only_when_started_as_the_guide_says():
    # A test of what `configure` refuses, written without start=True, passed without running it.
    from lictor import HookError

    from tests.conftest import ROOT

    guide = " ".join((ROOT / "docs" / "addons.md").read_text().split())
    assert "your `configure`, `running` and (on exit) `done` hooks run only with `start=True`" in guide
    targets = {"t": {"protocol": "line", "listen": "nowhere"}}
    async with testing.harness(_RefusesListen(), targets=targets):
        pass  # configure did not run
    with pytest.raises(HookError, match="failed in hook 'configure': ValueError: target 't': listen is not"):
        async with testing.harness(_RefusesListen(), targets=targets, start=True):
            pass
