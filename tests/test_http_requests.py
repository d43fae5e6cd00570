"""How HTTP and Kubernetes requests become policy requests (lictor_addons.http._requests)."""

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from lictor import Identity, load_policy
from lictor_addons import default_addons
from lictor_addons.http._bodies import mask_credentials
from lictor_addons.http._requests import (
    BODY_TEXT_LIMIT,
    Unreadable,
    canonical_path,
    flatten_json,
    form_attrs,
    http_request,
    json_attrs,
    k8s_request,
    loads_strict,
    php_name,
    reveal_request,
)
from lictor_addons.http.vocabulary import HTTP_VOCABULARY, K8S_VOCABULARY


def _http(path: str, method: str = "GET", body: bytes = b"", ctype: str = "", **headers: str):
    return http_request(
        method=method,
        raw_path=path,
        host="API.example.com",
        headers=list(headers.items()),
        body=body,
        content_type=ctype,
        target="api",
    )


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("/v1/customers/42", "/v1/customers/42"),
        ("/v1/customers/", "/v1/customers/"),
        ("/v1/na%20me", "/v1/na me"),
        ("/", "/"),
    ],
)
def test_canonical_paths(raw: str, decoded: str) -> None:
    assert canonical_path(raw) == decoded


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/customers/../admin",
        "/v1/./customers",
        "/v1//customers",
        "/v1/%2e%2e/admin",
        "/v1/a%2fb",
        "/v1/a%252fb",
        "/v1/admin;jsessionid=1",
        "/v1/a\\b",
        "/v1/%00",
        "/v1/%zz",
        "v1/customers",
    ],
)
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(Unreadable):
        canonical_path(raw)


def test_http_request_attrs() -> None:
    body = json.dumps({"name": "x", "tags": ["a", "b"], "force": True, "n": 1.5, "odd.key": None}).encode()
    req = _http(
        "/v1/customers?limit=10&tag=a&tag=b",
        "post",
        body,
        "application/json; charset=utf-8",
        Authorization="Bearer secret",
        Cookie="s=1",
        **{"X-Lictor-Reason": "why", "Content-Type": "application/json", "X-Trace": "t1"},
    )
    assert req.protocol == "http" and req.action == "POST" and req.target == "api"
    a = req.attrs
    assert a["method"] == "POST" and a["host"] == "api.example.com" and a["path"] == "/v1/customers"
    assert a["query"] == {"limit": ["10"], "tag": ["a", "b"]}
    assert a["headers"] == {"content-type": "application/json", "x-trace": "t1"}  # no credentials, no X-Lictor-*
    assert a["json"] == {
        "$.name": "x",
        "$.tags[*]": ["a", "b"],
        "$.force": "true",
        "$.n": "1.5",
        '$["odd.key"]': "null",
    }
    assert a["body_size"] == len(body)
    assert req.summary == "POST /v1/customers?limit=10&tag=a&tag=b"
    assert req.payload.startswith("POST /v1/customers?limit=10&tag=a&tag=b sha256:")
    assert _http("/v1/customers?limit=10&tag=a&tag=b", "POST", body + b" ").digest() != req.digest()
    assert "body_text" not in a  # approvers read JSON and forms as their fields


def test_approvers_read_text_bodies_and_only_text_bodies() -> None:
    xml = "<order><item>caf\u00e9</item></order>\n".encode()
    a = _http("/v1/orders", "POST", xml, "application/xml").attrs
    assert a["body_text"] == xml.decode() and "body_text_omitted_bytes" not in a
    long = ("é" * (BODY_TEXT_LIMIT + 10)).encode()
    a = _http("/v1/notes", "PUT", long, "text/plain").attrs
    assert a["body_text"] == "é" * BODY_TEXT_LIMIT and a["body_text_omitted_bytes"] == 20
    # Cut through a character far past the limit: still text.
    a = _http("/v1/notes", "PUT", b"a" + long, "text/plain").attrs
    assert a["body_text"] == "a" + "é" * (BODY_TEXT_LIMIT - 1)
    for binary in (b"\x89PNG\r\n\x1a\n\x00\x00", b"ok\x00", "x".encode("utf-16"), b"\xff\xfe\xfd"):
        a = _http("/v1/blobs", "PUT", binary, "application/octet-stream").attrs
        assert "body_text" not in a and a["body_size"] == len(binary)
    assert "body_text" not in _http("/v1/empty", "POST", b"", "text/plain").attrs


def test_json_bodies_that_could_be_read_two_ways_are_refused() -> None:
    with pytest.raises(Unreadable):
        json_attrs(b'{"force": false, "force": true}', "application/json")
    with pytest.raises(Unreadable):
        json_attrs(b'{"n": NaN}', "application/json")
    with pytest.raises(Unreadable):
        json_attrs(b'{"a": ', "application/json")
    with pytest.raises(Unreadable):
        json_attrs(b"[" * 100 + b"]" * 100, "application/json")
    with pytest.raises(Unreadable):
        flatten_json(list(range(20)), max_leaves=10)
    # Undeclared JSON is still read when it parses; text that does not parse is just not JSON.
    assert json_attrs(b'{"force": true}', "text/plain") == {"$.force": "true"}
    assert json_attrs(b"{not json", "text/plain") is None
    assert json_attrs(b"plain", "") is None
    assert json_attrs(b"[INFO] started", "text/plain") is None
    # ... but JSON that a lenient parser reads (Go's decoder and FastAPI read a body whatever its type) while
    # the strict one does not would carry its fields past every json: rule as text
    for lenient in (
        b'{"force": false, "force": true}',
        b'{"force": false, "Force": true}',
        b'{"force": true, "n": NaN}',
        b'{"force": true, "n": "\xff"}',
        b'{"force": true} and then text',  # Go's Decoder and Jackson read the first value only
        b'{"a": 1}{"force": true}',
        b" [" * 2000 + b"]" * 2000,
    ):
        for ctype in ("text/plain", ""):
            with pytest.raises(Unreadable):
                json_attrs(lenient, ctype)
    # A byte-order mark, UTF-16 or UTF-32 (read by Python's json, Jackson...) is read too: undeclared, it
    # carried a body past every json: rule
    doc = '{"force": true}'
    for encoded in (
        b"\xef\xbb\xbf" + doc.encode(),
        doc.encode("utf-16"),
        doc.encode("utf-16-le"),
        doc.encode("utf-32"),
    ):
        assert json_attrs(encoded, "text/plain") == {"$.force": "true"}, encoded
        assert json_attrs(encoded, "application/json") == {"$.force": "true"}, encoded
    with pytest.raises(Unreadable):
        json_attrs(b'{"a": "\xff"}', "application/json")
    with pytest.raises(Unreadable):  # Go and Node read it, the invalid byte as U+FFFD
        json_attrs(b'{"a": "\xff"}', "text/plain")
    assert json_attrs(b'\xff{"a": 1}', "text/plain") is None
    with pytest.raises(ValueError):
        loads_strict(b'{"a":1,"a":2}')


def test_query_separators_that_servers_disagree_on_are_refused() -> None:
    with pytest.raises(Unreadable):
        _http("/v1/x?a=1;b=2")
    # in a form body too: Perl's CGI and Python before 3.9.2 read two fields, Go, PHP and Rack one
    with pytest.raises(Unreadable, match="%3B"):
        _http("/v1/x", "POST", b"limit=5;role=admin", "application/x-www-form-urlencoded")
    assert form_attrs(b"a=1%3B2&b=3", "application/x-www-form-urlencoded") == {"$.a": "1;2", "$.b": "3"}


def test_kubernetes_attrs() -> None:
    call = k8s_request(
        method="GET",
        raw_path="/api/v1/namespaces/apps/pods/web-0/exec?command=ls&command=-la&stdin=true&stdout=true",
        headers={},
        body=b"",
        target="cluster",
    )
    assert call.request.action == "exec"
    assert call.request.attrs == {
        "verb": "exec",
        "resource": "pods/exec",
        "subresource": "exec",
        "api_group": "core",
        "namespace": "apps",
        "name": "web-0",
        "command": "ls -la",
        "programs": ["ls"],
    }
    assert call.request.summary == "exec pods/web-0 -n apps -- ls -la"
    lst = k8s_request(method="GET", raw_path="/apis/apps/v1/deployments", headers={}, body=b"", target="c")
    assert lst.request.attrs == {
        "verb": "list",
        "resource": "deployments",
        "api_group": "apps",
        "namespace": "",
        "all_namespaces": True,  # every restriction on namespaces matches it
    }
    disc = k8s_request(method="GET", raw_path="/apis/apps/v1", headers={}, body=b"", target="c")
    assert disc.request.attrs == {"verb": "get", "path": "/apis/apps/v1"}  # paths only for non-resource URLs
    reveal = reveal_request(
        k8s_request(method="GET", raw_path="/api/v1/namespaces/apps/secrets/db", headers={}, body=b"", target="c")
    )
    assert reveal.action == "reveal" and reveal.attrs["resource"] == "secrets" and reveal.attrs["name"] == "db"
    with pytest.raises(Unreadable):
        k8s_request(method="GET", raw_path="/api/v1/namespaces/apps/pods/../secrets", headers={}, body=b"", target="c")
    with pytest.raises(Unreadable):
        k8s_request(method="GET", raw_path="/internal/debug", headers={}, body=b"", target="c")


PACK = """
format: lictor/v1
metadata: {name: t, owner: sec}
identities:
  - match: {claims: {role: agent}}
    roles: [agent]
roles:
  agent:
    rules:
      - id: read-customer
        protocol: http
        when: {methods: [GET], paths: ["/v1/customers/{id}"], query: {expand: ["none", "address"]}}
        action: allow
      - id: no-force
        protocol: http
        when: {json: {"$.force": true}}
        action: deny
      - id: post
        protocol: http
        when: {methods: [POST], headers: {content-type: "application/json*"}, body_size: {max: 100}}
        action: allow
      - id: pods
        protocol: kubernetes
        when: {verbs: [get, list], resources: [pods], namespaces: [apps]}
        action: allow
"""


def test_rules_match_the_attributes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "p.yaml").write_text(PACK)
    vocabularies = {"http": HTTP_VOCABULARY, "kubernetes": K8S_VOCABULARY}
    result = load_policy([tmp_path], vocabularies)
    assert result.policy is not None, result.errors
    policy = result.policy
    who = Identity("a", {"role": "agent"})

    def decide(req):  # type: ignore[no-untyped-def]
        return policy.decide(who, req)

    assert decide(_http("/v1/customers/42?expand=none")).action == "allow"
    assert decide(_http("/v1/customers/42?expand=all")).action == "deny"
    assert decide(_http("/v1/customers/42/x?expand=none")).action == "deny"  # {id} is one segment
    small = json.dumps({"force": False}).encode()
    ok = _http("/v1/x", "POST", small, "application/json", **{"content-type": "application/json"})
    assert decide(ok).action == "allow"
    forced = _http("/v1/x", "POST", b'{"force": true}', "application/json", **{"content-type": "application/json"})
    assert decide(forced).rule_ids == ("no-force",)
    big = _http(
        "/v1/x", "POST", b'{"a": "' + b"x" * 200 + b'"}', "application/json", **{"content-type": "application/json"}
    )
    assert decide(big).action == "deny"
    pods = k8s_request(method="GET", raw_path="/api/v1/namespaces/apps/pods", headers={}, body=b"", target="c")
    assert decide(pods.request).action == "allow"
    logs = k8s_request(method="GET", raw_path="/api/v1/namespaces/apps/pods/x/log", headers={}, body=b"", target="c")
    assert decide(logs.request).action == "deny"  # logs is a verb of its own


NAMES_PACK = """format: lictor/v1
metadata: {name: n, owner: sec}
identities: [{match: {claims: {role: a}}, roles: [r]}]
roles:
  r:
    rules:
      - {id: cm, protocol: kubernetes, when: {verbs: ["*"], resources: [configmaps]}, action: allow}
      - {id: not-critical, protocol: kubernetes, when: {verbs: ["*"], names: [critical]}, action: deny}
      - {id: only-public, protocol: kubernetes, when: {verbs: [get, list], resources: [secrets], names: [public]}, action: allow}
"""


def _k8s_actions(tmp_path: Any, pack: str) -> Callable[[str, str], str]:
    """What ``pack`` decides (the action) for role ``a`` on a Kubernetes request without a body."""
    (tmp_path / "p.yaml").write_text(pack)
    result = load_policy([tmp_path], {"kubernetes": K8S_VOCABULARY})
    policy = result.policy
    assert policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def decide(method: str, path: str) -> str:
        call = k8s_request(method=method, raw_path=path, headers={}, body=b"", target="c")
        return policy.decide(who, call.request).action

    return decide


def test_a_restriction_on_names_matches_requests_that_name_no_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a list, a watch, a deletecollection or a create may touch the named object: a deny on it applies
    decide = _k8s_actions(tmp_path, NAMES_PACK)

    cms = "/api/v1/namespaces/apps/configmaps"
    assert decide("GET", f"{cms}/other") == "allow"
    for method, path in (("GET", f"{cms}/critical"), ("GET", cms), ("DELETE", cms), ("POST", cms)):
        assert decide(method, path) == "deny", (method, path)
    assert decide("GET", f"{cms}?fieldSelector=metadata.name%3Dother") == "allow"  # pinned to another name
    secrets = "/api/v1/namespaces/apps/secrets"
    assert decide("GET", f"{secrets}/public") == "allow"
    assert decide("GET", secrets) == "deny"  # a permission on names covers no list


STATUS_PACK = """format: lictor/v1
metadata: {name: s, owner: sec}
identities: [{match: {claims: {role: a}}, roles: [r]}]
roles:
  r:
    rules:
      - {id: read, protocol: kubernetes, when: {verbs: [get]}, action: allow}
      - {id: no-system-pods, protocol: kubernetes, when: {resources: [pods], namespaces: [kube-system]}, action: deny}
      - {id: write-pods, protocol: kubernetes, when: {verbs: [update], resources: [pods]}, action: allow}
"""


def test_a_restriction_on_a_resource_matches_the_subresources_that_answer_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # GET pods/x/status (or ephemeralcontainers) answers with the pod itself: a deny on pods holds for it
    decide = _k8s_actions(tmp_path, STATUS_PACK)

    system = "/api/v1/namespaces/kube-system/pods/x"
    for sub in ("", "/status", "/ephemeralcontainers"):
        assert decide("GET", system + sub) == "deny", sub
    assert decide("GET", system + "/log") == "deny"  # logs: a verb no rule allows here
    assert decide("GET", "/api/v1/namespaces/apps/pods/x/status") == "allow"  # read allows every resource
    assert decide("PUT", "/api/v1/namespaces/apps/pods/x") == "allow"
    assert decide("PUT", "/api/v1/namespaces/apps/pods/x/status") == "deny"  # a permission on pods: not status


def test_default_addons_declare_both_protocols() -> None:
    http_addon = next(a for a in default_addons() if a.name == "http")
    assert http_addon is not None
    assert HTTP_VOCABULARY.build_requests is not None and K8S_VOCABULARY.build_requests is not None
    reqs = HTTP_VOCABULARY.build_requests({"method": "POST", "path": "/v1/a?b=1", "json": {"x": 1}}, "api")
    assert reqs[0].attrs["json"] == {"$.x": "1"} and reqs[0].attrs["query"] == {"b": ["1"]}
    reqs = K8S_VOCABULARY.build_requests({"method": "GET", "path": "/api/v1/namespaces/a/secrets", "reveal": True}, "c")
    assert reqs[0].action == "reveal"


def test_method_and_path_overrides_are_refused() -> None:
    with pytest.raises(Unreadable, match="x-http-method-override"):
        _http("/v1/customers", "POST", **{"X-HTTP-Method-Override": "DELETE"})
    with pytest.raises(Unreadable, match="x-http-method-override"):  # the same header to PHP, Rack and WSGI
        _http("/v1/customers", "POST", **{"X_HTTP_Method_Override": "DELETE"})
    # header rules read X_Account as X-Account, as those servers do
    assert _http("/v1/c", X_Account="production").attrs["headers"]["x-account"] == "production"
    with pytest.raises(Unreadable):
        _http("/v1/public", "GET", **{"X-Original-URL": "/admin"})
    with pytest.raises(Unreadable, match="_method"):
        _http("/v1/customers/1?_method=DELETE", "POST")
    with pytest.raises(Unreadable, match="_method"):
        _http("/v1/customers/1", "POST", b"a=1&_method=DELETE", "application/x-www-form-urlencoded")


RESTRICT = """
format: lictor/v1
metadata: {name: r, owner: sec}
identities:
  - match: {claims: {role: admin}}
    roles: [admin]
roles:
  admin:
    rules:
      - id: everything
        protocol: http
        when: {methods: ["*"]}
        action: allow
      - id: no-admin
        protocol: http
        when: {paths: ["/admin", "/admin/*"]}
        action: deny
      - id: only-lowercase-reports
        protocol: http
        when: {methods: [GET], paths: ["/reports/{id}"]}
        action: allow
"""


def test_restrictions_match_case_and_trailing_slash_variants_permissions_do_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "p.yaml").write_text(RESTRICT)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY, "kubernetes": K8S_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "admin"})
    for path in ("/admin", "/ADMIN", "/Admin/", "/admin/users", "/aDmIn/USERS/", "/admin.json", "/admin/users.csv/"):
        assert result.policy.decide(who, _http(path)).rule_ids == ("no-admin",), path
    # Rails routes /admin.json (and /admin.tar.gz) to /admin; Spring's suffix matching /admin.x.json too
    for path in ("/admin.tar.gz", "/ADMIN.x.json"):
        assert result.policy.decide(who, _http(path)).rule_ids == ("no-admin",), path
    assert result.policy.decide(who, _http("/.admin")).action == "allow"
    assert result.policy.decide(who, _http("/administrators")).action == "allow"
    # A permission is exact: the path rule covers /reports/1, not /REPORTS/1 (the wildcard rule does).
    from lictor_addons.http.vocabulary import _paths

    pred = _paths(["/reports/{id}"])
    assert pred(_http("/reports/1"), "all") and not pred(_http("/REPORTS/1"), "all")
    assert pred(_http("/REPORTS/1/"), "any")


def test_the_path_index_never_hides_a_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Decisions with the path index equal decisions that evaluate every rule, for many paths and patterns."""
    import dataclasses
    import random

    rng = random.Random(7)
    segments = ["v1", "V1", "customers", "admin", "a", "x.json", "{id}", "*", "cust*", "?"]
    patterns = ["*", "/", "/*", "/admin", "/admin/", "/ADMIN/*"]
    for _ in range(60):
        patterns.append("/" + "/".join(rng.choice(segments) for _ in range(rng.randint(1, 4))))
    rules = []
    for i, pattern in enumerate(patterns):
        action = rng.choice(["allow", "deny", "approve"])
        rule = {"id": f"r{i}", "protocol": "http", "when": {"paths": [pattern]}, "action": action}
        if action == "approve":
            rule["approval"] = {"approvers": ["agent"]}
        rules.append(rule)
    pack = {
        "format": "lictor/v1",
        "metadata": {"name": "idx", "owner": "t"},
        "identities": [{"match": {"claims": {"role": "agent"}}, "roles": ["agent"]}],
        "roles": {"agent": {"rules": rules}},
    }
    (tmp_path / "p.yaml").write_text(json.dumps(pack))
    plain_vocab = dataclasses.replace(HTTP_VOCABULARY, secondary=None)
    indexed = load_policy([tmp_path], {"http": HTTP_VOCABULARY}).policy
    unindexed = load_policy([tmp_path], {"http": plain_vocab}).policy
    assert indexed is not None and unindexed is not None
    assert indexed._secondary_attr["http"] == "path_keys"  # the index is in use
    who = Identity("a", {"role": "agent"})
    words = ["v1", "V1", "customers", "admin", "ADMIN", "a", "x.json", "42", "cust1", "b", "admin.csv", "a.tar.gz"]
    for _ in range(2000):
        path = "/" + "/".join(rng.choice(words) for _ in range(rng.randint(0, 4))) + rng.choice(["", "/"])
        if path == "//":
            continue
        req = _http(path)
        a, b = indexed.decide(who, req), unindexed.decide(who, req)
        assert (a.action, a.rule_ids) == (b.action, b.rule_ids), path


@pytest.mark.parametrize("pattern", ["/v1/users/{user-id}", "/v1/users/{id", "/v1/users/id}", "/v1/{}/x"])
def test_path_braces_that_are_not_templates_are_errors(tmp_path, pattern: str) -> None:  # type: ignore[no-untyped-def]
    # A deny rule on "/v1/users/{user-id}" that was read as a literal would never match: an error instead.
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p, owner: sec}\nroles:\n  r:\n    rules:\n"
        f"      - {{id: d, protocol: http, when: {{paths: [{json.dumps(pattern)}]}}, action: deny}}\n"
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is None
    assert [str(e.loc.line) + ": " + e.message for e in result.errors] == [
        f"6: roles.r.rules.0.when.paths: {pattern!r}: "
        + (f"{'{' if '{' in pattern else '}'!r}")
        + " is not part of a template parameter {name} (letters, digits and _); write [{] or [}] for a literal brace"
    ]


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (
            "{paths: ['api/v1/*']}",
            "paths: 'api/v1/*' can never match: request paths start with '/' (write '/api/v1/*')",
        ),
        ("{json: {a.b: x}}", "json: 'a.b' can never match: JSON paths start at the document, as in '$.a.b'"),
        # bodies are flattened as $.a.b, $.items[*].id and $["odd key"]: a key written otherwise is never found
        (
            '{json: {"$.addresses[0].country": x}}',
            "json: '$.addresses[0].country' can never match: the gateway reads this path as '$.addresses[*].country' "
            "(array items are read as [*], whatever their index); write that",
        ),
        (
            """{json: {"$['vip']": x}}""",
            "json: \"$['vip']\" can never match: the gateway reads this path as '$.vip' (a plain name follows a dot, "
            "any other key is in double quotes as in JSON); write that",
        ),
        (
            """{json: {'$.a["b"].odd key': x}}""",
            """json: '$.a["b"].odd key' can never match: the gateway reads this path as '$.a.b["odd key"]' (a plain """
            "name follows a dot, any other key is in double quotes as in JSON); write that",
        ),
        (
            '{json: {"$..role": x}}',
            "json: '$..role' can never match: JSON paths are literal keys (the part at position 2 is not one); write "
            'them as $.a.b, $.items[*].id (every array item) or $["odd key"]',
        ),
        (
            "{hosts: ['https://api.internal']}",
            "hosts: 'https://api.internal' can never match: hosts are host names alone, without scheme, port or "
            "path (write 'api.internal')",
        ),
        (
            "{hosts: ['*.internal', '::1', 'api.internal:8443']}",
            "hosts: 'api.internal:8443' can never match: hosts are host names alone, without scheme, port or "
            "path (write 'api.internal')",
        ),
        (
            "{resources: [pods, secret/status]}",
            "resources: 'secret/status' can never match: resources are plural, as in 'secrets/status'",
        ),
        # as kubectl and Lictor's own denials name a resource ("delete deployments.apps/web -n apps")
        (
            "{resources: [pods, deployments.apps]}",
            "resources: 'deployments.apps' can never match: resources are named without their API group (write "
            "'deployments' and api_groups: ['apps'])",
        ),
        (
            "{resources: [deployments.apps/scale]}",
            "resources: 'deployments.apps/scale' can never match: resources are named without their API group "
            "(write 'deployments/scale' and api_groups: ['apps'])",
        ),
        (
            "{resources: [deploy]}",
            "resources: 'deploy' can never match: resources are the API's plural names, not kubectl's short names "
            "(write 'deployments')",
        ),
        (
            "{resources: [deployments], api_groups: [apps/v1]}",
            "api_groups: 'apps/v1' can never match: API groups are named without their version (write 'apps')",
        ),
        (
            "{resources: [pods], subresources: [pods/exec]}",
            "subresources: 'pods/exec' can never match: subresources are named alone (write 'exec', or resources: "
            "['pods/exec'])",
        ),
        (
            "{resources: [secrets], names: [other, secret/db-creds]}",
            "names: 'secret/db-creds' can never match: names are the object's name alone, as in the API's paths "
            "(write 'db-creds', and the resource under resources:, not 'secret' as kubectl -o name prints it)",
        ),
        (
            "{resources: [configmaps], api_groups: [v1]}",
            "api_groups: 'v1' can never match: it is an API version, not a group (the group of apiVersion v1 is "
            "'core'; others are named without their version: 'apps', 'batch')",
        ),
    ],
)
def test_paths_that_no_request_has_are_errors(tmp_path, when: str, message: str) -> None:  # type: ignore[no-untyped-def]
    # Request paths start with "/", JSON bodies are flattened as "$.a.b" and the host is the upstream's
    # name alone: a deny rule written otherwise would protect nothing.
    protocol = "kubernetes" if "resources" in when else "http"
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p, owner: sec}\nroles:\n  r:\n    rules:\n"
        f"      - {{id: d, protocol: {protocol}, when: {when}, action: deny}}\n"
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY, "kubernetes": K8S_VOCABULARY})
    assert [f"{e.loc.line}: {e.message}" for e in result.errors] == [f"6: roles.r.rules.0.when.{message}"]


def test_json_paths_spelt_as_the_gateway_reads_bodies_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    when = """{json: {$: x, $.a-b: x, '$.items[*].id': x, '$["odd key"][*]': x, '$["café"]': x, '$[*].op': x}}"""
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p, owner: sec}\nroles:\n  r:\n    rules:\n"
        f"      - {{id: d, protocol: http, when: {when}, action: deny}}\n"
    )
    assert load_policy([tmp_path], {"http": HTTP_VOCABULARY}).errors == []


def test_a_bracketed_brace_is_a_literal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p, owner: sec}\nidentities: [{match: {claims: {role: a}}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n"
        "      - {id: a, protocol: http, when: {paths: ['/v1/[{]x[}]/{id}']}, action: allow}\n"
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})
    assert result.policy.decide(who, _http("/v1/%7Bx%7D/42")).action == "allow"
    assert result.policy.decide(who, _http("/v1/x/42")).action == "deny"


@pytest.mark.parametrize("kubernetes", [False, True])
@pytest.mark.parametrize("rule", ["lictor:unreadable-request", "lictor:approval-not-redeemable"])
def test_deterministic_refusals_do_not_tell_the_agent_to_retry_later(rule: str, kubernetes: bool) -> None:
    # These refusals are not gateway failures: the same request is refused again, whenever it is retried.
    from lictor import Decision
    from lictor_addons.http._responses import denial

    answer = denial(Decision.deny("non-canonical path '/a//b'", rule, "v1"), kubernetes=kubernetes)
    text = json.dumps(answer.body)
    assert "retry later" not in text and "could not check" not in text, text


JSON_PACK = """format: lictor/v1
metadata: {name: p, owner: sec}
identities: [{match: {claims: {role: a}}, roles: [r]}]
roles:
  r:
    rules:
      - {id: writes, protocol: http, when: {methods: [POST]}, action: allow}
      - {id: no-limit, protocol: http, when: {methods: [POST], json: {"$.credit_limit": "*"}}, action: deny}
      - {id: no-admin, protocol: http, when: {methods: [POST], json: {'$["rôle"]': admin}}, action: deny}
      - {id: safe-items, protocol: http, when: {methods: [PUT], json: {"$.items[*].kind": safe}}, action: allow}
      - {id: expand, protocol: http, when: {methods: [GET], query: {expand: [none, address]}}, action: allow}
      - {id: no-limit-query, protocol: http, when: {methods: [POST], query: {credit_limit: "*"}}, action: deny}
"""


def test_json_keys_in_another_case_do_not_walk_past_a_deny(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Go's encoding/json, ASP.NET and case-insensitive Jackson read "Credit_Limit" as credit_limit.
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def post(body: str) -> str:
        return result.policy.decide(who, _http("/v1/c", "POST", body.encode(), "application/json")).action  # type: ignore[union-attr]

    assert post('{"name": "x"}') == "allow"
    for spelling in ("credit_limit", "Credit_Limit", "CREDIT_LIMIT"):
        assert post(f'{{"name": "x", "{spelling}": 5}}') == "deny", spelling
    assert post('{"RÔLE": "admin"}') == "deny"  # non-ASCII keys fold too
    # a server that takes a one-item array for its item (Jackson's UNWRAP_SINGLE_VALUE_ARRAYS) sets it too
    assert post('{"name": "x", "credit_limit": [5]}') == "deny"
    assert post('{"rôle": ["admin"]}') == "deny"
    assert post('{"rôle": [["user"], ["admin"]]}') == "deny"
    assert post('{"rôle": ["user"]}') == "allow"
    # both spellings in one object: two parsers would disagree on which one counts
    with pytest.raises(Unreadable, match="differ only in case"):
        _http("/v1/c", "POST", b'{"limit": 1, "Limit": 2}', "application/json")


def test_an_item_list_rule_also_reads_a_lone_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # ... and the other way round: a deny on $.items[*].kind fires for {"items": {"kind": ...}}.
    (tmp_path / "p.yaml").write_text(
        JSON_PACK + "      - {id: no-unsafe, protocol: http, when: {json: {'$.items[*].kind': unsafe}}, action: deny}\n"
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})
    for body in ('{"items": [{"kind": "unsafe"}]}', '{"items": {"kind": "unsafe"}}'):
        request = _http("/v1/c", "POST", body.encode(), "application/json")
        assert result.policy.decide(who, request).rule_ids == ("no-unsafe",), body  # type: ignore[union-attr]


def test_an_object_or_array_at_a_restricted_key_matches_it_and_no_permission_covers_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # {"credit_limit": {"value": 5}} or a MongoDB operator ({"$gt": 0}) is no value a glob compares, and a server
    # may read it as the amount; the deny on $.credit_limit saw no value there and let it through.
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def decide(method: str, body: str, ctype: str = "application/json") -> tuple[str, tuple[str, ...]]:
        decision = result.policy.decide(who, _http("/v1/c", method, body.encode(), ctype))  # type: ignore[union-attr]
        return decision.action, decision.rule_ids

    for body in (
        '{"credit_limit": {"value": 5}}',
        '{"credit_limit": {"$gt": 0}}',
        '{"Credit_Limit": {"value": 5}}',
        '{"credit_limit": [{"value": 5}]}',
        '{"credit_limit": {}}',
        '{"credit_limit": []}',
        '{"credit_limit": [[]]}',
        '{"rôle": {"name": "user"}}',  # a restriction on a value matches an object there whatever it holds
    ):
        assert decide("POST", body)[0] == "deny", body
    assert decide("POST", "credit_limit[value]=5", "application/x-www-form-urlencoded") == ("deny", ("no-limit",))
    patch = '[{"op": "add", "path": "/credit_limit", "value": {}}]'
    assert decide("POST", patch, "application/json-patch+json") == ("deny", ("no-limit",))
    assert decide("POST", '{"name": {"first": "x"}, "limits": {}, "credit": []}') == ("allow", ("writes",))
    # a permission on every item's kind covers no item whose kind is an object, nor an empty one
    assert decide("PUT", '{"items": [{"kind": "safe"}]}')[0] == "allow"
    for body in ('{"items": [{"kind": "safe"}, {"kind": {"$ne": "safe"}}]}', '{"items": [{"kind": {}}]}'):
        assert decide("PUT", body)[0] == "deny", body


def test_json_numbers_are_compared_by_value_not_spelling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A server reads 1e6 as the amount 1000000; the rules saw "1000000.0" and a deny on the amount (or on
    # seven digits and more) let it through.
    (tmp_path / "p.yaml").write_text(
        """format: lictor/v1
metadata: {name: p, owner: sec}
identities: [{match: {claims: {role: a}}, roles: [r]}]
roles:
  r:
    rules:
      - {id: pay, protocol: http, when: {methods: [POST]}, action: allow}
      - {id: no-million, protocol: http, when: {json: {"$.amount": "1000000"}}, action: deny}
      - {id: no-huge, protocol: http, when: {json: {"$.amount": "?????????*"}}, action: deny}
"""
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def post(amount: str) -> tuple[str, tuple[str, ...]]:
        request = _http("/v1/pay", "POST", f'{{"amount": {amount}}}'.encode(), "application/json")
        decision = result.policy.decide(who, request)  # type: ignore[union-attr]
        return decision.action, decision.rule_ids

    assert post("999999") == ("allow", ("pay",))
    for spelling in ("1000000", "1e6", "1E6", "1e+6", "1000000.0", "10e5", "1000000.000"):
        assert post(spelling) == ("deny", ("no-million",)), spelling
    assert post("1e300")[0] == "deny" and post("123456789.5")[0] == "deny"
    assert json_attrs(b'{"a": 0.5, "b": -0.0, "c": 2.50}', "application/json") == {
        "$.a": "0.5",
        "$.b": "0",
        "$.c": "2.5",
    }
    with pytest.raises(Unreadable, match="too large"):
        json_attrs(b'{"amount": 1e400}', "application/json")


def test_query_parameters_in_another_case_do_not_walk_past_a_deny(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # ASP.NET reads query parameters ignoring case: ?Credit_Limit=5 is its credit_limit.
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    decide, who = result.policy.decide, Identity("a", {"role": "a"})
    assert decide(who, _http("/v1/c?name=x", "POST")).action == "allow"
    for spelling in ("credit_limit", "Credit_Limit", "CREDIT_LIMIT"):
        assert decide(who, _http(f"/v1/c?name=x&{spelling}=5", "POST")).action == "deny", spelling
    assert decide(who, _http("/v1/c?Expand=none")).action == "deny"  # a permission reads names exactly
    with pytest.raises(Unreadable, match="differ only in case"):  # forms too
        _http("/v1/c", "PUT", b"Expand=secrets&expand=none", "application/x-www-form-urlencoded")
    # both spellings: ASP.NET reads the first value of either, a permission would check only one
    with pytest.raises(Unreadable, match="differ only in case"):
        _http("/v1/c?Expand=secrets&expand=none")


def test_form_bodies_are_read_by_json_rules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An API that takes a form where it takes JSON received a credit limit no json: rule had read.
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def post(body: bytes, content_type: str) -> str:
        return result.policy.decide(who, _http("/v1/c", "POST", body, content_type)).action  # type: ignore[union-attr]

    form = "application/x-www-form-urlencoded"
    assert post(b"name=x", form) == "allow"
    for body in (b"name=x&credit_limit=5", b"Credit_Limit=5", b"credit%5Flimit=5"):
        assert post(body, form) == "deny", body
    with pytest.raises(Unreadable):  # servers disagree on ';' (refused before any rule)
        post(b"name=x;credit_limit=5", form)
    # Rails, PHP and Express nest bracketed names
    assert form_attrs(b"customer%5Bcredit_limit%5D=9&tags[]=a&tags[]=b", form) == {
        '$["customer[credit_limit]"]': "9",
        "$.customer.credit_limit": "9",
        '$["tags[]"]': ["a", "b"],
        "$.tags[*]": ["a", "b"],
    }
    multipart = "multipart/form-data; boundary=----x"
    parts = (
        b'------x\r\nContent-Disposition: form-data; name="name"\r\n\r\nJane\r\n'
        b'------x\r\nContent-Disposition: form-data; name="credit_limit"\r\n\r\n5\r\n'
        b'------x\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\n\r\nfile body\r\n'
        b"------x--\r\n"
    )
    assert form_attrs(parts, multipart) == {"$.name": "Jane", "$.credit_limit": "5", "$.doc": "a.txt"}
    assert post(parts, multipart) == "deny"
    assert post(parts.replace(b"credit_limit", b"nickname"), multipart) == "allow"


def test_fields_are_also_read_by_the_name_php_gives_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # PHP ($_GET, $_POST: Laravel, Symfony) reads dots and spaces in a name, and an unclosed '[', as '_', drops
    # leading spaces and cuts at a NUL: each of these is its credit_limit (as php's parse_str shows)
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    decide, who = result.policy.decide, Identity("a", {"role": "a"})
    form = "application/x-www-form-urlencoded"
    for name in ("credit.limit", "credit+limit", "+credit_limit", "credit[limit", "credit_limit%00x"):
        assert decide(who, _http("/v1/c", "POST", f"name=x&{name}=5".encode(), form)).action == "deny", name
        assert decide(who, _http(f"/v1/c?name=x&{name}=5", "POST")).action == "deny", name
    assert php_name("a.b[c.d]") == "a_b[c.d]" and php_name("a[b.c") == "a_b_c" and php_name("[a") is None
    assert form_attrs(b"customer.x[credit_limit]=9", form)["$.customer_x.credit_limit"] == "9"
    # and Symfony's method override reads _method
    for spelling in (b".method=DELETE", b"%20_method=DELETE", b"_method%00=DELETE"):
        with pytest.raises(Unreadable, match="_method"):
            _http("/v1/c", "POST", spelling, form)
        with pytest.raises(Unreadable, match="_method"):
            _http("/v1/c?" + spelling.decode(), "POST")


@pytest.mark.parametrize(
    "body",
    [  # each is credit_limit=5 to PHP (or to a parser that decodes base64 parts), and no field to a strict reading
        b'--b\nContent-Disposition: form-data; name="credit_limit"\n\n5\n--b--\n',
        b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--\r\n'
        b'--b\r\nContent-Disposition: form-data; name="credit_limit"\r\n\r\n5\r\n--b--\r\n',
        b'--b\r\nContent-Disposition: form-data;\r\n\tname="credit_limit"\r\n\r\n5\r\n--b--\r\n',
        b"--b\r\nContent-Disposition: form-data; name='credit_limit'\r\n\r\n5\r\n--b--\r\n",
        b'--b\r\nContent-Disposition: name="credit_limit"\r\n\r\n5\r\n--b--\r\n',
        b'--b\r\nContent-Disposition: form-data; name="x"; name="credit_limit"\r\n\r\n5\r\n--b--\r\n',
        b'--b\r\nContent-Disposition: form-data; name="x"\r\nContent-Disposition: form-data; name="y"\r\n\r\n5\r\n--b--\r\n',
        b"--b\r\nContent-Disposition: form-data; name*=UTF-8''credit_limit\r\n\r\n5\r\n--b--\r\n",
        b'--b\r\nContent-Disposition: form-data; name="credit\\_limit"\r\n\r\n5\r\n--b--\r\n',
        b'--b\r\nContent-Disposition: form-data; name="role"\r\nContent-Transfer-Encoding: base64\r\n\r\nYWRtaW4=\r\n--b--\r\n',
        b'--b\r\nContent-Disposition: form-data; name="credit_limit"\r\n\r\n5\r\n',
        b'preamble\r\n--b\r\nContent-Disposition: form-data; name="credit_limit"\r\n\r\n5\r\n--b--\r\n',
    ],
)
def test_multipart_bodies_that_parsers_read_differently_are_refused(body: bytes) -> None:
    with pytest.raises(Unreadable):
        form_attrs(body, "multipart/form-data; boundary=b")
    with pytest.raises(Unreadable):  # and two boundaries
        form_attrs(b"", "multipart/form-data; boundary=a; boundary=b")
    ok = (
        b"--b\r\nContent-Disposition: form-data; name=credit_limit\r\nContent-Transfer-Encoding: 8bit\r\n\r\n5\r\n--b--"
    )
    assert form_attrs(ok, "multipart/form-data; boundary=b") == {"$.credit_limit": "5"}


def test_a_permission_covers_every_value_of_a_json_path_or_query_parameter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "p.yaml").write_text(JSON_PACK)
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})
    decide = result.policy.decide

    def put(body: str) -> str:
        return decide(who, _http("/v1/c", "PUT", body.encode(), "application/json")).action

    assert put('{"items": [{"kind": "safe"}, {"kind": "safe"}]}') == "allow"
    assert put('{"items": [{"kind": "safe"}, {"kind": "wipe"}]}') == "deny"
    assert put('{"items": [{"Kind": "safe"}]}') == "deny"  # a permission reads keys exactly
    assert decide(who, _http("/v1/c?expand=none&expand=address")).action == "allow"
    assert decide(who, _http("/v1/c?expand=none&expand=secrets")).action == "deny"


# What kubectl 'auth can-i get pods -n apps' sends (application/vnd.kubernetes.protobuf).
KUBECTL_CAN_I = (
    b'k8s\x00\n2\n\x17authorization.k8s.io/v1\x12\x17SelfSubjectAccessReview\x129\n\x10\n\x00\x12\x00\x1a\x00"\x00*'
    b'\x002\x008\x00B\x00\x12\x1b\n\x19\n\x04apps\x12\x03get\x1a\x00"\x00*\x04pods2\x00:\x00\x1a\x08\x08\x00\x12'
    b'\x00\x1a\x00 \x00\x1a\x00"\x00'
)
PROTOBUF = "application/vnd.kubernetes.protobuf"


def test_access_reviews_are_read_from_protobuf_and_json() -> None:
    from lictor_addons.http._requests import access_review_document, access_review_request

    doc = access_review_document(KUBECTL_CAN_I, PROTOBUF)
    assert doc == {
        "spec": {
            "resourceAttributes": {
                "namespace": "apps", "verb": "get", "group": "", "version": "", "resource": "pods",
                "subresource": "", "name": "",
            }
        }
    }  # fmt: skip
    request = access_review_request(doc, "k8s")
    assert request.action == "get" and request.attrs["resource"] == "pods" and request.attrs["namespace"] == "apps"
    body = b'{"spec": {"resourceAttributes": {"verb": "create", "resource": "pods", "subresource": "exec"}}}'
    exec_request = access_review_request(access_review_document(body, "application/json"), "k8s")
    assert exec_request.action == "exec" and exec_request.attrs["resource"] == "pods/exec"
    raw = b'{"spec": {"nonResourceAttributes": {"verb": "get", "path": "/healthz"}}}'
    health = access_review_request(access_review_document(raw, "application/json"), "k8s")
    assert health.attrs == {"verb": "get", "path": "/healthz"}


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (KUBECTL_CAN_I[:-9], PROTOBUF),  # truncated
        (b"k8s\x01" + KUBECTL_CAN_I[4:], PROTOBUF),  # not the magic
        (KUBECTL_CAN_I[:4] + b"\xff" * 12, PROTOBUF),  # a varint that never ends
        (b"k8s\x00\x12\x00", PROTOBUF),  # no review in it
        (b'{"spec": {}}', "application/json"),
        (b'{"spec": {"resourceAttributes": {"verb": 1, "resource": "pods"}}}', "application/json"),
        (b'{"spec": {"resourceAttributes": {"verb": "get"}}}', "application/json"),
        (b"[]", "application/json"),
    ],
)
def test_unreadable_access_reviews_are_refused(body: bytes, ctype: str) -> None:
    from lictor_addons.http._requests import access_review_document, access_review_request

    with pytest.raises((Unreadable, ValueError)):
        access_review_request(access_review_document(body, ctype), "k8s")


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"%5Fmethod=DELETE", "application/x-www-form-urlencoded"),
        (b"a=1&%5f%6Dethod=DELETE", "application/x-www-form-urlencoded; charset=utf-8"),
        (
            b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
        (b'{"_method": "DELETE"}', "application/json"),
        (b"_method=DELETE", "application/x-www-form-urlencoded, text/plain"),  # a form to PHP
        (b"_method=DELETE", "application/x-www-form-urlencoded text/plain"),
    ],
)
def test_method_override_fields_in_any_body_spelling_are_refused(body: bytes, ctype: str) -> None:
    from lictor_addons.http._requests import Unreadable, http_request

    with pytest.raises(Unreadable):
        http_request(
            method="POST",
            raw_path="/v1/customers",
            host="api",
            headers=[("content-type", ctype)],
            body=body,
            content_type=ctype,
            target="t",
        )


def test_a_form_body_that_is_also_json_is_refused() -> None:
    # {"note": "&credit_limit=9&"} is the field credit_limit to a form parser, and no such field as JSON
    body = b'{"name": "Jane", "note": "&credit_limit=99999&"}'
    for media in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        with pytest.raises(Unreadable, match="declared as a form but is also valid JSON"):
            http_request(
                method="POST", raw_path="/v1/c", host="h", headers=[("content-type", media)], body=body,
                content_type=media, target="t",
            )  # fmt: skip
    form = http_request(
        method="POST", raw_path="/v1/c", host="h", headers=[], body=b"name=x&credit_limit=9",
        content_type="application/x-www-form-urlencoded", target="t",
    )  # fmt: skip
    assert form.attrs["json"]["$.credit_limit"] == "9"


def test_approvers_do_not_read_a_credential_a_patch_operation_sets() -> None:
    # JSON Patch and SCIM PATCH name the credential in the operation's path; its value was shown as it was sent.
    patch = b'[{"op": "replace", "path": "/user/password", "value": "p1"}, {"op": "add", "path": "/n", "value": "x"}]'
    scim = b'{"Operations": [{"op": "replace", "path": "password", "value": "p2"}]}'
    for body, ctype, key in (
        (patch, "application/json-patch+json", "$[*].value"),
        (scim, "application/scim+json", "$.Operations[*].value"),
    ):
        req = http_request(
            method="PATCH", raw_path="/u/1", host="h", headers=[], body=body, content_type=ctype, target="t"
        )
        assert req.shown_attrs is not None, body
        shown = json.dumps(req.shown_attrs["json"])
        assert "p1" not in shown and "p2" not in shown and "[REDACTED:lictor]" in shown, shown
        assert key in req.shown_attrs["json"], shown
    counts: Counter[str] = Counter()
    recorded = mask_credentials(json.loads(patch), counts)
    assert recorded[0]["value"] == "[REDACTED:lictor]" and recorded[1]["value"] == "x" and counts["credential"] == 1


def test_approvers_read_the_request_without_its_credentials() -> None:
    multipart = (
        b'--XX\r\nContent-Disposition: form-data; name="Client-Secret"\r\n\r\ns3cr3t\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="username"\r\n\r\nsvc\r\n--XX--\r\n'
    )
    req = http_request(
        method="POST", raw_path="/t?refresh_token=rt1&x=1", host="h", headers=[], body=multipart,
        content_type="multipart/form-data; boundary=XX", target="t",
    )  # fmt: skip
    assert req.attrs["json"]["$.Client-Secret"] == "s3cr3t" and req.attrs["query"]["refresh_token"] == ["rt1"]
    shown = req.shown_attrs
    assert shown is not None
    assert shown["json"] == {"$.Client-Secret": "[REDACTED:lictor]", "$.username": "svc"}
    assert shown["json_folded"]["$.client-secret"] == "[REDACTED:lictor]"
    assert shown["query"] == {"refresh_token": ["[REDACTED:lictor]"], "x": ["1"]}
    assert "rt1" not in req.summary and "rt1" not in req.payload
    body = b'{"a": {"grant_type": "authorization_code", "code": "c1"}, "code": "ZIP", "b c": {"password": ["p", "q"]}}'
    req = http_request(
        method="POST", raw_path="/t", host="h", headers=[], body=body, content_type="application/json", target="t"
    )
    assert req.shown_attrs is not None
    assert req.shown_attrs["json"] == {
        "$.a.grant_type": "authorization_code",
        "$.a.code": "[REDACTED:lictor]",
        "$.code": "ZIP",  # not next to a grant_type: not a credential
        '$["b c"].password[*]': ["[REDACTED:lictor]"] * 2,
    }
    plain = http_request(
        method="POST", raw_path="/t?x=1", host="h", headers=[], body=b'{"name": "x"}', content_type="", target="t"
    )
    assert plain.shown_attrs is None
    # the approval is bound to the real query: another credential is another request, shown the same
    one, two = (
        http_request(
            method="POST", raw_path=f"/t?refresh_token={t}", host="h", headers=[], body=b"", content_type="", target="t"
        )
        for t in ("rt1", "rt2")
    )
    assert one.summary == two.summary == "POST /t?refresh_token=[REDACTED]" and one.digest() != two.digest()


def test_a_json_patch_is_read_as_the_fields_it_sets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # [{"op": "replace", "path": "/credit_limit", ...}] flattened as $[*].op, $[*].path and $[*].value: the
    # deny on $.credit_limit never saw the field the patch sets, so a pack that allows PATCH let it through.
    (tmp_path / "p.yaml").write_text(
        JSON_PACK.replace("methods: [POST]", "methods: [POST, PATCH]")
        + "      - {id: notes, protocol: http, when: {methods: [PATCH], json: {'$.note': 'ok*'}}, action: allow}\n"
        + "      - {id: tags, protocol: http, when: {methods: [PATCH], json: {'$.tags[*]': '*'}}, action: allow}\n"
    )
    result = load_policy([tmp_path], {"http": HTTP_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def patch(ops: list[dict[str, object]], ctype: str = "application/json-patch+json") -> tuple[str, ...]:
        request = _http("/v1/c/42", "PATCH", json.dumps(ops).encode(), ctype)
        return result.policy.decide(who, request).rule_ids  # type: ignore[union-attr]

    def replace(path: str, value: object = 1000000) -> list[dict[str, object]]:
        return [{"op": "replace", "path": path, "value": value}]

    assert patch(replace("/name", "Jane")) == ("writes",)
    for ops in (
        replace("/credit_limit"),
        replace("/Credit_Limit"),  # read ignoring case, as for a JSON body
        [{"op": "add", "path": "/credit_limit", "value": 5}],
        [{"op": "remove", "path": "/credit_limit"}],  # taken away, as a merge patch's null
        [{"op": "move", "from": "/credit_limit", "path": "/old_limit"}],
        [{"op": "copy", "from": "/credit_limit", "path": "/old_limit"}],
        [{"op": "copy", "from": "/old_limit", "path": "/credit_limit"}],
        [{"op": "test", "path": "/name", "value": "Jane"}, *replace("/credit_limit")],
        replace("", {"name": "Jane", "credit_limit": 5}),  # the whole document
    ):
        assert patch(ops) == ("no-limit",), ops
    # ~1 is '/', ~0 is '~'; an index or '-' is an array item, or a member so named
    assert patch(replace("/rôle", "admin")) == ("no-admin",)
    assert patch(replace("/a~1b", "admin")) == ("writes",)
    assert (
        _http("/v1/c", "PATCH", json.dumps(replace("/a~1b~0c/0")).encode(), "application/json-patch+json").attrs[
            "json"
        ]['$["a/b~c"][*]']
        == "1000000"
    )
    assert "tags" in patch([{"op": "add", "path": "/tags/-", "value": "x"}])
    # a copied value may be anything: no permission's value glob covers it
    assert "notes" in patch(replace("/note", "ok, done"))
    assert "notes" not in patch([{"op": "copy", "from": "/other", "path": "/note"}])
    # sent as application/json, an array of operations is still applied as a patch by some servers
    assert patch(replace("/credit_limit"), "application/json") == ("no-limit",)
    # a merge patch already carries the fields it sets (null for one it takes away)
    for body in (b'{"credit_limit": 5}', b'{"credit_limit": null}'):
        request = _http("/v1/c/42", "PATCH", body, "application/merge-patch+json")
        assert result.policy.decide(who, request).rule_ids == ("no-limit",)  # type: ignore[union-attr]
    # a patch that cannot be read is refused
    for bad in (
        b'{"op": "replace", "path": "/credit_limit", "value": 5}',
        b'[{"op": "set", "path": "/credit_limit", "value": 5}]',
        b'[{"op": "replace", "path": "credit_limit", "value": 5}]',
        b'[{"op": "replace", "path": "/credit_limit~2", "value": 5}]',
        b'[{"op": "replace", "path": "/credit_limit"}]',
        b'[{"op": "move", "path": "/credit_limit"}]',
        b'[{"op": "copy", "from": 5, "path": "/x"}]',
        b'[{"op": "replace", "value": 5}]',
        b"[5]",
    ):
        with pytest.raises(Unreadable):
            _http("/v1/c/42", "PATCH", bad, "application/json-patch+json")


def test_a_kubernetes_dry_run_is_an_attribute_rules_and_approvers_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # dryRun was parsed and never used: a dry-run delete was held and shown to approvers as a plain delete, and
    # no rule could tell it from one.
    deploy = "/apis/apps/v1/namespaces/apps/deployments"

    def k8s(method: str, path: str, body: bytes = b"") -> Any:
        return k8s_request(method=method, raw_path=path, headers={}, body=body, target="c").request

    options = b'{"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"'
    dry = {
        ("POST", f"{deploy}?dryRun=All", b"{}"): True,
        ("PUT", f"{deploy}/web?dryRun=All", b"{}"): True,
        ("PATCH", f"{deploy}/web/scale?dryRun=All", b"{}"): True,
        ("DELETE", f"{deploy}/web?dryRun=All", b""): True,
        ("DELETE", f"{deploy}/web", options + b', "dryRun": ["All"]}'): True,  # kubectl delete --dry-run=server
        ("DELETE", f"{deploy}?labelSelector=a%3Db", options + b', "dryRun": ["All"]}'): True,
        # not dry runs: a body that says nothing of one (the API server then ignores the query), other values
        ("DELETE", f"{deploy}/web?dryRun=All", options + b"}"): False,
        ("DELETE", f"{deploy}/web?dryRun=All", b"not json"): False,
        ("DELETE", f"{deploy}/web", options + b', "dryRun": ["all"]}'): False,
        ("PATCH", f"{deploy}/web?dryRun=all", b"{}"): False,
        ("PATCH", f"{deploy}/web?dryRun=All&dryRun=All", b"{}"): False,
        ("PATCH", f"{deploy}/web", b'{"dryRun": ["All"]}'): False,  # an object's field, not an option
        ("DELETE", f"{deploy}?dryRun=All", b""): False,
        ("POST", "/api/v1/namespaces/apps/pods/web-0/eviction?dryRun=All", b"{}"): False,
    }
    for (method, path, body), expected in dry.items():
        request = k8s(method, path, body)
        assert request.attrs["dry_run"] is expected, (method, path, body)
        assert request.summary.endswith(" (dry run)") is expected, request.summary
    assert k8s("DELETE", f"{deploy}/web?dryRun=All").summary == "delete deployments.apps/web -n apps (dry run)"
    # reads, exec and the like have no dry run: the API server runs them whatever the query says
    for method, path in (
        ("GET", "/api/v1/namespaces/apps/secrets/db?dryRun=All"),
        ("POST", "/api/v1/namespaces/apps/pods/web-0/exec?command=rm&stdout=true&dryRun=All"),
    ):
        request = k8s(method, path)
        assert "dry_run" not in request.attrs and "dry run" not in request.summary, request

    (tmp_path / "p.yaml").write_text(
        """format: lictor/v1
metadata: {name: p, owner: sec}
identities: [{match: {claims: {role: a}}, roles: [r]}]
roles:
  r:
    rules:
      - id: delete-held
        protocol: kubernetes
        when: {verbs: [delete]}
        unless: {dry_run: true}
        action: approve
        approval: {approvers: [r]}
      - {id: delete-dry-run, protocol: kubernetes, when: {verbs: [delete], dry_run: true}, action: allow}
      - {id: writes, protocol: kubernetes, when: {verbs: [patch], dry_run: false}, action: allow}
      - {id: no-real-pod-deletes, protocol: kubernetes, when: {resources: [pods], dry_run: false}, action: deny}
"""
    )
    result = load_policy([tmp_path], {"kubernetes": K8S_VOCABULARY})
    assert result.policy is not None, result.errors
    who = Identity("a", {"role": "a"})

    def decide(method: str, path: str, body: bytes = b"") -> tuple[str, tuple[str, ...]]:
        decision = result.policy.decide(who, k8s(method, path, body))  # type: ignore[union-attr]
        return decision.action, decision.rule_ids

    assert decide("DELETE", f"{deploy}/web", options + b', "dryRun": ["All"]}') == ("allow", ("delete-dry-run",))
    assert decide("DELETE", f"{deploy}/web?dryRun=All", options + b"}") == ("approve", ("delete-held",))
    assert decide("DELETE", f"{deploy}/web") == ("approve", ("delete-held",))
    assert decide("PATCH", f"{deploy}/web", b"{}") == ("allow", ("writes",))
    assert decide("GET", f"{deploy}/web?dryRun=All") == ("deny", ("lictor:default-deny",))  # no dry run to allow
    assert decide("DELETE", "/api/v1/namespaces/apps/pods/web-0")[1] == ("no-real-pod-deletes",)
    assert decide("DELETE", "/api/v1/namespaces/apps/pods/web-0?dryRun=All") == ("allow", ("delete-dry-run",))
