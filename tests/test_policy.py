"""Decision semantics of the policy engine, on packs written for the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lictor import Enum, Glob, Identity, Policy, Request, Trace, Vocabulary, load_policy

from tests.addons.lineproto import VOCABULARY as LINE

PACK = """
format: lictor/v1
metadata: {name: t}
identities:
  - match: {claims: {role: reader}}
    roles: [reader]
  - match: {sub: "ops-*", groups: [sre]}
    roles: [operator]
roles:
  reader:
    rules:
      - id: read
        protocol: line
        when: {verbs: [get, list]}
        action: allow
      - id: no-secrets
        protocol: line
        when: {commands: ["* secret*"]}
        action: deny
        message: secrets are off limits
      - id: shadow-list-all
        protocol: line
        when: {commands: ["list *all*"]}
        action: deny
        enforce: false
  operator:
    inherits: [reader]
    rules:
      - id: restart-needs-approval
        protocol: line
        when: {verbs: restart}
        action: approve
        approval: {approvers: [reader]}
      - id: delete
        protocol: line
        when: {verbs: delete}
        unless: {commands: ["delete prod*"]}
        action: allow
"""


@pytest.fixture
def policy(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(PACK)
    result = load_policy([tmp_path], {"line": LINE})
    assert not result.errors, result.errors
    assert result.policy is not None
    return result.policy


def req(line: str) -> Request:
    verb = line.split()[0]
    return Request("line", verb, {"command": line, "verb": verb}, summary=line, payload=line)


reader = Identity("agent-1", {"role": "reader"})
operator = Identity("ops-7", {"groups": ["dev", "sre"]})
nobody = Identity("stranger", {"role": "guest"})


def test_default_deny_names_the_roles(policy):
    d = policy.decide(nobody, req("get x"))
    assert d.action == "deny"
    assert d.rule_ids == ("lictor:default-deny",)
    assert "none" in d.message
    assert d.policy_version == policy.version


def test_allow_and_deny_wins(policy):
    assert policy.decide(reader, req("get orders")).rule_ids == ("read",)
    d = policy.decide(reader, req("get secrets"))
    assert d.action == "deny" and d.rule_ids == ("no-secrets",)
    assert d.message == "secrets are off limits"


def test_a_deny_rule_without_a_message_does_not_repeat_the_request(tmp_path: Path):
    # Each protocol's denial names the request ("lictor: SELECT: select ... — <message>"): the default
    # message repeated it ("SELECT: select ... is not allowed for your roles").
    (tmp_path / "p.yaml").write_text(PACK.replace("        message: secrets are off limits\n", ""))
    result = load_policy([tmp_path], {"line": LINE})
    assert result.policy is not None, result.errors
    d = result.policy.decide(reader, req("get secrets"))
    assert d.action == "deny" and d.message == "denied by rule no-secrets, which gives no reason"


def test_shadow_rules_report_but_do_not_enforce(policy):
    d = policy.decide(reader, req("list all things"))
    assert d.action == "allow"
    assert d.shadow_rule_ids == ("shadow-list-all",)


def test_inheritance_approval_and_unless(policy):
    assert policy.roles_for(operator) == ("operator", "reader")
    assert policy.decide(operator, req("get x")).action == "allow"
    d = policy.decide(operator, req("restart web"))
    assert d.action == "approve" and d.approval == {"approvers": ["reader"]}
    assert policy.decide(operator, req("delete staging-db")).action == "allow"
    assert policy.decide(operator, req("delete prod-db")).action == "deny"


def test_identity_globs_and_list_claims(policy):
    assert policy.roles_for(Identity("ops-1", {"groups": "sre"})) == ("operator", "reader")
    assert policy.roles_for(Identity("dev-1", {"groups": ["sre"]})) == ()
    assert policy.roles_for(Identity("ops-1", {})) == ()


def test_claims_match_as_json_writes_them_and_nested_claims_by_their_path(tmp_path: Path):
    # A JSON true was compared as Python's "True", so `admin: "true"` never matched; Keycloak's
    # realm_access.roles could not be reached at all.
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: c}\n"
        'identities:\n  - match: {claims: {admin: "true"}}\n    roles: [a]\n'
        "  - match: {claims: {realm_access.roles: [sre]}}\n    roles: [b]\n"
        "roles:\n  a: {rules: []}\n  b: {rules: []}\n"
    )
    result = load_policy([tmp_path], {"line": LINE})
    assert result.policy is not None, result.errors
    roles_for = result.policy.roles_for
    assert roles_for(Identity("x", {"admin": True})) == ("a",)
    assert roles_for(Identity("x", {"admin": False})) == ()
    assert roles_for(Identity("x", {"realm_access": {"roles": ["dev", "sre"]}})) == ("b",)
    assert roles_for(Identity("x", {"realm_access": {"roles": ["dev"]}})) == ()
    # an object has no text of its own: it matches nothing, even a pattern that looks like it
    assert roles_for(Identity("x", {"admin": {"value": True}, "realm_access": {"roles": {"sre": 1}}})) == ()


def test_an_email_its_issuer_has_not_verified_matches_no_email_condition(tmp_path: Path):
    # Identity providers with self-service sign-up issue tokens for any address typed in, with
    # email_verified false until the mail is answered: `email: "*@example.com"` granted its roles to anyone
    # who signed up as ceo@example.com.
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: e}\n"
        'identities:\n  - match: {email: "*@example.com"}\n    roles: [staff]\n'
        '  - match: {claims: {email: "*@example.com"}}\n    roles: [also]\n'
        "roles:\n  staff: {rules: []}\n  also: {rules: []}\n"
    )
    result = load_policy([tmp_path], {"line": LINE})
    assert result.policy is not None, result.errors
    roles_for = result.policy.roles_for
    for unverified in (False, "false", None, 0, "no"):
        assert roles_for(Identity("x", {"email": "ceo@example.com", "email_verified": unverified})) == ()
    for verified in (True, "true"):
        assert roles_for(Identity("x", {"email": "ceo@example.com", "email_verified": verified})) == (
            "staff",
            "also",
        )
    # a provider that does not say (Lictor's own tokens, most providers' access tokens) is taken at its word
    assert roles_for(Identity("x", {"email": "ceo@example.com"})) == ("staff", "also")


def test_elevation_adds_roles(policy):
    assert policy.decide(reader, req("delete x")).action == "deny"
    assert policy.decide(reader, req("delete x"), extra_roles=["operator"]).action == "allow"


def _pg_policy(tmp_path: Path, rules: str) -> Policy:
    """A policy of one role, for every identity, with the given postgres ``rules`` (YAML list items)."""
    from lictor_addons.postgres.vocabulary import VOCABULARY as PG

    (tmp_path / "p.yaml").write_text(
        'format: lictor/v1\nmetadata: {name: pg}\nidentities: [{match: {sub: "*"}, roles: [r]}]\n'
        "roles:\n  r:\n    rules:\n" + rules
    )
    policy = load_policy([tmp_path], {"postgres": PG}).policy
    assert policy is not None
    return policy


def _pg(kinds: set[str], tables: set[str]) -> Request:
    return Request("postgres", sorted(kinds)[0], {"kinds": frozenset(kinds), "tables": frozenset(tables)})


def test_allow_must_cover_every_value_and_deny_fires_on_any(tmp_path: Path):
    policy = _pg_policy(
        tmp_path,
        """      - {id: orders, protocol: postgres, when: {statements: select, tables: [orders, "public.orders"]}, action: allow}
      - {id: no-del, protocol: postgres, when: {statements: delete}, action: deny}
""",
    )
    who = Identity("a")

    assert policy.decide(who, _pg({"select"}, {"orders"})).action == "allow"
    # a JOIN on another table is not covered by the permission on orders
    assert policy.decide(who, _pg({"select"}, {"orders", "secrets"})).action == "deny"
    # a data-modifying CTE inside a SELECT is found through the nested kind
    d = policy.decide(who, _pg({"select", "delete"}, {"orders"}))
    assert d.action == "deny" and d.rule_ids == ("no-del",)
    # a missing attribute is never covered, even vacuously
    assert policy.decide(who, Request("postgres", "select", {"kinds": frozenset({"select"})})).action == "deny"


def test_unless_lifts_a_deny_or_an_approval_only_when_every_value_is_excepted(tmp_path: Path):
    # `unless` narrows a rule. On an allow rule any excepted value withdraws the permission; on a deny,
    # approve or mask rule the exception must cover every value, or one excepted table would carry
    # the others past the rule.
    policy = _pg_policy(
        tmp_path,
        """      - {id: writes, protocol: postgres, when: {statements: [delete, drop]}, action: allow}
      - {id: no-delete, protocol: postgres, when: {statements: delete}, unless: {tables: ["scratch_*"]}, action: deny}
      - {id: drop-held, protocol: postgres, when: {statements: drop}, unless: {tables: ["tmp_*"]}, action: approve,
         approval: {approvers: [r]}}
      - {id: reads, protocol: postgres, when: {statements: select}, unless: {tables: ["secret_*"]}, action: allow}
""",
    )
    who = Identity("a")

    def pg(kind: str, tables: set[str]) -> Request:
        return _pg({kind}, tables)

    assert policy.decide(who, pg("delete", {"scratch_a"})).action == "allow"
    assert policy.decide(who, pg("delete", {"scratch_a", "orders"})).action == "deny"
    assert policy.decide(who, pg("drop", {"tmp_a"})).action == "allow"
    assert policy.decide(who, pg("drop", {"tmp_a", "orders"})).action == "approve"
    assert policy.decide(who, pg("select", {"orders"})).action == "allow"
    assert policy.decide(who, pg("select", {"orders", "secret_keys"})).action == "deny"
    # an attribute the protocol could not determine never lifts a deny
    assert policy.decide(who, Request("postgres", "delete", {"kinds": frozenset({"delete"})})).action == "deny"


def test_trace_lists_candidates_in_order(policy):
    trace = Trace()
    policy.decide(reader, req("get secret-key"), trace=trace)
    assert trace.roles == ["reader"]
    names = [(r.id, ok) for r, ok, _ in trace.steps]
    assert ("read", True) in names and ("no-secrets", True) in names
    assert trace.decision is not None and trace.decision.action == "deny"


def test_index_does_not_lose_rules_with_many_rules(tmp_path: Path):
    rules = "\n".join(
        f"      - {{id: r{i}, protocol: line, when: {{verbs: v{i % 50}, commands: ['v{i % 50} t{i}']}}, action: allow}}"
        for i in range(2000)
    )
    (tmp_path / "p.yaml").write_text(
        f"format: lictor/v1\nmetadata: {{name: big}}\nidentities: [{{match: {{sub: '*'}}, roles: [r]}}]\n"
        f"roles:\n  r:\n    rules:\n{rules}\n"
    )
    policy = load_policy([tmp_path], {"line": LINE}).policy
    assert policy is not None
    who = Identity("x")
    assert policy.decide(who, req("v7 t1957")).rule_ids == ("r1957",)
    assert policy.decide(who, req("v7 t1958")).action == "deny"


def test_allow_decisions_are_memoized_by_roles_and_attributes_only(policy):
    first = policy.decide(reader, req("get a"))
    again = policy.decide(reader, Request("line", "get", {"command": "get a", "verb": "get"}, summary="other text"))
    assert first.action == "allow" and again is first  # same roles, action and attributes: the memo
    other = policy.decide(reader, req("get b"))
    assert other.action == "allow" and len(policy._memo) == 2  # other attributes: decided again
    # A denial names the request in its message: never memoized, so each names its own.
    one, two = policy.decide(nobody, req("get x")), policy.decide(nobody, req("get y"))
    assert "get x" in one.message and "get y" in two.message
    # Other roles, same request: the other roles' rules decide (the secret rule does not apply to `get a`,
    # but the operator's inherited roles are in the key).
    assert policy.decide(operator, req("get a")) is not first
    denied = policy.decide(reader, req("get secret"))
    assert denied.action == "deny" and denied.rule_ids == ("no-secrets",)
    # explain (a trace) never reads or fills the memo.
    trace = Trace()
    traced = policy.decide(reader, req("get a"), trace=trace)
    assert traced is not first and traced.action == "allow" and trace.steps
    # Unhashable attribute values: decided without the memo, same result.
    odd = policy.decide(reader, Request("line", "get", {"command": "get a", "verb": "get", "x": ["list"]}))
    assert odd.action == "allow"


def test_the_memo_keeps_no_long_attribute_values_alive(policy):
    # The memo's keys are the attribute values: 4096 allowed requests of a few MiB each (Redis SETs of big
    # values, 64 MiB allowed) stayed alive in it, gigabytes for one agent to fill.
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20):
            assert policy.decide(reader, req(f"get {i} " + "x" * (1 << 20))).action == "allow"
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2 << 20, kept
    assert policy.decide(reader, req("get a")) is policy.decide(reader, req("get a"))  # short ones still share


def test_requests_matched_by_the_same_rules_share_their_decision(tmp_path: Path):
    # Custom fields: no memo by attributes, but the conclusion from the same matching rules is reused,
    # except where its message names the request (approvals and the default denial).
    def compile_text(value):
        return lambda request, quantifier: value in request.summary

    policy = _mentions_policy(tmp_path, compile_text, {"type": "string"}, "hello")
    who = Identity("a", {"role": "r"})
    one = policy.decide(who, Request("txt", "say", {}, summary="hello there"))
    two = policy.decide(who, Request("txt", "say", {}, summary="hello again"))
    assert one.action == "allow" and two is one and one.rule_ids == ("ok",)
    no, nope = (policy.decide(who, Request("txt", "say", {}, summary=s)) for s in ("bye", "ciao"))
    assert no.action == nope.action == "deny" and "bye" in no.message and "ciao" in nope.message
    trace = Trace()
    assert policy.decide(who, Request("txt", "say", {}, summary="hello"), trace=trace) is not one
    assert trace.decision is not None and trace.decision.rule_ids == ("ok",)


def test_no_memo_for_protocols_with_custom_fields(tmp_path: Path):
    def compile_text(value):  # a Custom predicate may read anything, here the request's summary
        return lambda request, quantifier: value in request.summary

    policy = _mentions_policy(tmp_path, compile_text, {"type": "string"}, "hello")
    who = Identity("a", {"role": "r"})
    assert policy.decide(who, Request("txt", "say", {}, summary="hello there")).action == "allow"
    assert policy.decide(who, Request("txt", "say", {}, summary="goodbye")).action == "deny"


def _mentions_policy(tmp_path: Path, compiler: Any, schema: dict[str, Any], when: str) -> Policy:
    """A policy for protocol ``txt`` whose role ``r`` is allowed on ``mentions: WHEN``, a Custom field."""
    from lictor import Custom, Vocabulary

    vocab = Vocabulary(protocol="txt", fields=(Custom("mentions", json_schema=schema, compiler=compiler),))
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: t}\nidentities: [{match: {claims: {role: r}}, roles: [r]}]\n"
        f"roles: {{r: {{rules: [{{id: ok, protocol: txt, when: {{mentions: {when}}}, action: allow}}]}}}}\n"
    )
    result = load_policy([tmp_path], {"txt": vocab})
    assert result.policy is not None, result.errors
    return result.policy


def test_a_custom_predicate_that_returns_an_iterator_fails_instead_of_matching(tmp_path: Path):
    def compile_words(value):  # forgot any(): the generator is truthy, so it would match every request
        return lambda request, quantifier: (w in request.summary for w in value)

    policy = _mentions_policy(tmp_path, compile_words, {"type": "array"}, "[hello]")
    with pytest.raises(TypeError, match="returned generator, not a truth value"):
        policy.decide(Identity("a", {"role": "r"}), Request("txt", "say", {}, summary="goodbye"))


def test_index_finds_rules_whatever_the_case_of_the_request_value(tmp_path: Path):
    # Glob fields match ignoring case and index their literals lower-case: a request whose index value has
    # capitals (a program named `Rscript`) must still find the deny among the candidates.
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: c}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n"
        "      - {id: any, protocol: line, when: {commands: '*'}, action: allow}\n"
        "      - {id: no-purge, protocol: line, when: {verbs: [Purge]}, action: deny}\n"
    )
    policy = load_policy([tmp_path], {"line": LINE}).policy
    assert policy is not None
    who = Identity("x")
    for line in ("purge all", "Purge all", "PURGE all"):
        d = policy.decide(who, req(line))
        assert d.action == "deny" and d.rule_ids == ("no-purge",), line
    assert policy.decide(who, req("get x")).action == "allow"


def test_bytes_in_a_request_attribute_are_refused_not_matched_as_their_repr(tmp_path: Path):
    # An addon of a binary protocol that left its attributes as bytes had them matched as "b'...'" (and
    # an index value iterated as integers): no rule named them, so every deny below was skipped and the
    # allow on everything let the request through.
    vocabulary = Vocabulary(
        protocol="kv",
        fields=(
            Glob("verbs", attr="verb"),
            Glob("keys", attr="key"),
            Enum("modes", attr="mode", values=("read", "write")),
        ),
        index="verbs",
        secondary="keys",
    )
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: b}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n"
        "      - {id: any, protocol: kv, when: {verbs: '*'}, action: allow}\n"
        "      - {id: no-flush, protocol: kv, when: {verbs: flushall}, action: deny}\n"
        "      - {id: no-card, protocol: kv, when: {keys: card}, action: deny}\n"
        "      - {id: no-write, protocol: kv, when: {modes: write}, action: deny}\n"
    )
    policy = load_policy([tmp_path], {"kv": vocabulary}).policy
    assert policy is not None
    who = Identity("x")
    for attrs, attr in (
        ({"verb": b"flushall"}, "verb"),
        ({"verb": "get", "key": b"card"}, "key"),
        ({"verb": "get", "key": ["x", b"card"]}, "key"),
        ({"verb": "set", "mode": b"write"}, "mode"),
    ):
        with pytest.raises(TypeError, match=f"request attribute '{attr}' holds bytes"):
            policy.decide(who, Request("kv", "x", attrs))
    assert policy.decide(who, Request("kv", "get", {"verb": "get", "key": "card"})).rule_ids == ("no-card",)
    assert policy.decide(who, Request("kv", "get", {"verb": "get", "key": "x", "mode": "read"})).action == "allow"


def test_a_missing_boolean_covers_no_permission(tmp_path: Path):
    # An unparsable statement has no `modifies`: "missing is false" would let `modifies: false` allow it.
    from lictor_addons.postgres._requests import requests_for_sql

    policy = _pg_policy(
        tmp_path,
        """      - {id: ro, protocol: postgres, when: {modifies: false}, action: allow}
      - {id: sel, protocol: postgres, when: {statements: select}, action: allow}
      - {id: no-dyn, protocol: postgres, when: {statements: select}, unless: {dynamic_sql: false}, action: deny}
""",
    )
    who = Identity("a")

    def decide(sql: str) -> str:
        return policy.decide(who, requests_for_sql(sql, target="db")[0]).action

    assert decide("SELEC x") == "deny"
    assert decide("SHOW search_path") == "allow"
    assert decide(";") == "allow"  # an empty query modifies nothing, and says so
    # an exception on a deny is not taken from an attribute that is not there either
    assert policy.decide(who, Request("postgres", "select", {"kinds": frozenset({"select"})})).action == "deny"
    assert decide("SELECT 1") == "allow"


def test_an_unparsable_statement_is_not_covered_by_an_allow_on_tables(tmp_path: Path):
    from lictor_addons.postgres._requests import requests_for_sql

    policy = _pg_policy(tmp_path, "      - {id: orders, protocol: postgres, when: {tables: [orders]}, action: allow}\n")
    who = Identity("a")
    assert policy.decide(who, requests_for_sql("SELECT * FROM orders", target="db")[0]).action == "allow"
    assert policy.decide(who, requests_for_sql("SELEC * FROM orders", target="db")[0]).action == "deny"


def test_no_memo_for_protocols_with_fields_of_their_own_kind(tmp_path: Path):
    # A Field subclass reading the payload was memoized like the built-in kinds: once one request was
    # allowed, another with the same attributes but a payload the rule does not cover was allowed too.
    from dataclasses import dataclass

    from lictor import Field, Glob, Vocabulary

    @dataclass(frozen=True)
    class PayloadPrefix(Field):
        def schema(self):
            return {"type": "string"}

        def compile(self, value):
            return lambda request, quantifier: request.payload.startswith(value)

    vocab = Vocabulary("kv", (Glob("verbs", attr="verb"), PayloadPrefix("prefix")), index="verbs")
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: t}\nidentities: [{match: {claims: {role: r}}, roles: [r]}]\n"
        "roles: {r: {rules: [{id: ok, protocol: kv, when: {verbs: get, prefix: 'get app:'}, action: allow}]}}\n"
    )
    result = load_policy([tmp_path], {"kv": vocab})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "r"})
    assert result.policy.decide(who, Request("kv", "get", {"verb": "get"}, payload="get app:1")).action == "allow"
    assert result.policy.decide(who, Request("kv", "get", {"verb": "get"}, payload="get secret:1")).action == "deny"
