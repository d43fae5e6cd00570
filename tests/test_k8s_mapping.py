"""Table tests for the Kubernetes request mapping (lictor_addons.http._k8s)."""

from typing import Any

import pytest
from lictor_addons.http._k8s import Impersonation, K8sRequest, UnknownRequest, resolve
from mitmproxy.http import Headers, Request

NS = "/api/v1/namespaces/apps"

# (method, path with query, headers, expected fields). Fields not named keep their defaults.
CASES: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
    # --- core group, namespaced, plain verbs
    ("GET", f"{NS}/pods", {}, dict(verb="list", resource="pods", namespace="apps", api_version="v1")),
    ("HEAD", f"{NS}/pods", {}, dict(verb="list", resource="pods")),
    ("GET", f"{NS}/pods/web-0", {}, dict(verb="get", resource="pods", name="web-0", namespace="apps")),
    ("POST", f"{NS}/pods", {}, dict(verb="create", resource="pods", name="")),
    ("PUT", f"{NS}/pods/web-0", {}, dict(verb="update", name="web-0")),
    ("PATCH", f"{NS}/pods/web-0", {}, dict(verb="patch", name="web-0")),
    ("DELETE", f"{NS}/pods/web-0", {}, dict(verb="delete", name="web-0")),
    ("DELETE", f"{NS}/pods", {}, dict(verb="deletecollection", name="", action="deletecollection")),
    (
        "delete",
        f"{NS}/pods?labelSelector=app%3Dweb",
        {},
        dict(verb="deletecollection", label_selector="app=web"),
    ),
    # --- watch: query flag, server's boolean conversion, legacy path
    ("GET", f"{NS}/pods?watch=true", {}, dict(verb="watch", action="watch", watch=True)),
    ("GET", f"{NS}/pods?watch=1&resourceVersion=5", {}, dict(verb="watch", watch=True)),
    ("GET", f"{NS}/pods?watch=", {}, dict(verb="watch", watch=True)),
    ("GET", f"{NS}/pods?watch=yes", {}, dict(verb="watch", watch=True)),
    ("GET", f"{NS}/pods?watch=FALSE", {}, dict(verb="list", watch=False)),
    ("GET", f"{NS}/pods?watch=0", {}, dict(verb="list", watch=False)),
    ("GET", f"{NS}/pods?watch=false&watch=true", {}, dict(verb="list", watch=False)),
    ("GET", f"{NS}/pods/web-0?watch=true", {}, dict(verb="get", name="web-0", watch=False)),
    (
        "GET",
        "/api/v1/watch/namespaces/apps/pods",
        {},
        dict(verb="watch", resource="pods", namespace="apps", watch=True),
    ),
    ("GET", "/api/v1/watch/namespaces/apps/pods/web-0", {}, dict(verb="watch", name="web-0", watch=True)),
    ("GET", "/api/v1/watch/pods", {}, dict(verb="watch", namespace="", watch=True)),
    # --- field selector pins the name of a list/watch, as on the server
    (
        "GET",
        f"{NS}/pods?fieldSelector=metadata.name%3Dweb-0&watch=1",
        {},
        dict(verb="watch", name="web-0", field_selector="metadata.name=web-0"),
    ),
    (
        "GET",
        f"{NS}/pods?fieldSelector=status.phase%3DRunning,metadata.name%3D%3Dweb-0",
        {},
        dict(name="web-0"),
    ),
    ("GET", f"{NS}/pods?fieldSelector=metadata.name!%3Dweb-0", {}, dict(verb="list", name="")),
    ("GET", f"{NS}/pods?fieldSelector=metadata.name%3Da%5C%2Cb", {}, dict(verb="list", name="")),
    # --- all namespaces and cluster-scoped resources
    ("GET", "/api/v1/pods", {}, dict(verb="list", namespace="", cluster_scoped=False, all_namespaces=True)),
    (
        "GET",
        "/api/v1/nodes",
        {},
        dict(verb="list", resource="nodes", cluster_scoped=True, all_namespaces=False),
    ),
    ("GET", "/api/v1/nodes/node-1", {}, dict(verb="get", resource="nodes", name="node-1", namespace="")),
    ("DELETE", "/api/v1/persistentvolumes/pv-1", {}, dict(verb="delete", resource="persistentvolumes")),
    (
        "GET",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-admin",
        {},
        dict(api_group="rbac.authorization.k8s.io", resource="clusterroles", name="system:aggregate-to-admin"),
    ),
    # --- the namespace object itself
    ("GET", "/api/v1/namespaces", {}, dict(verb="list", resource="namespaces", namespace="", name="")),
    ("POST", "/api/v1/namespaces", {}, dict(verb="create", resource="namespaces")),
    (
        "GET",
        "/api/v1/namespaces/apps",
        {},
        dict(verb="get", resource="namespaces", name="apps", namespace="apps", cluster_scoped=True),
    ),
    ("DELETE", "/api/v1/namespaces/apps", {}, dict(verb="delete", resource="namespaces", name="apps")),
    (
        "PUT",
        "/api/v1/namespaces/apps/status",
        {},
        dict(verb="update", resource="namespaces", subresource="status"),
    ),
    ("PUT", "/api/v1/namespaces/apps/finalize", {}, dict(resource="namespaces", subresource="finalize")),
    # --- named groups
    (
        "GET",
        "/apis/apps/v1/namespaces/apps/deployments",
        {},
        dict(api_group="apps", api_version="v1", resource="deployments", verb="list"),
    ),
    (
        "PATCH",
        "/apis/apps/v1/namespaces/apps/deployments/web/scale",
        {},
        dict(api_group="apps", verb="patch", subresource="scale", action="patch", name="web"),
    ),
    (
        "GET",
        "/apis/apps/v1/deployments?watch=1",
        {},
        dict(api_group="apps", verb="watch", all_namespaces=True),
    ),
    (
        "POST",
        "/apis/batch/v1/namespaces/apps/jobs?dryRun=All",
        {},
        dict(api_group="batch", resource="jobs", verb="create", dry_run=True),
    ),
    ("POST", f"{NS}/pods?dryRun=Other", {}, dict(dry_run=False)),
    (
        "GET",
        "/apis/example.com/v1alpha1/namespaces/apps/widgets/w1",
        {},
        dict(api_group="example.com", api_version="v1alpha1", resource="widgets", name="w1"),
    ),
    # --- subresources
    ("GET", f"{NS}/pods/web-0/status", {}, dict(verb="get", subresource="status", action="get")),
    ("PUT", f"{NS}/pods/web-0/status", {}, dict(verb="update", subresource="status")),
    (
        "GET",
        f"{NS}/pods/web-0/log?container=web&follow=true",
        {},
        dict(verb="get", subresource="log", action="logs", follow=True, container="web", name="web-0"),
    ),
    ("GET", f"{NS}/pods/web-0/log", {}, dict(verb="get", action="logs", follow=False)),
    ("GET", f"{NS}/pods/web-0/log?follow=false", {}, dict(action="logs", follow=False)),
    ("POST", f"{NS}/pods/web-0/eviction", {}, dict(verb="create", subresource="eviction", action="create")),
    ("POST", f"{NS}/pods/web-0/binding", {}, dict(verb="create", subresource="binding")),
    (
        "PATCH",
        f"{NS}/pods/web-0/ephemeralcontainers",
        {},
        dict(verb="patch", subresource="ephemeralcontainers"),
    ),
    (
        "POST",
        f"{NS}/serviceaccounts/builder/token",
        {},
        dict(verb="create", resource="serviceaccounts", subresource="token"),
    ),
    # --- exec / attach / portforward
    (
        "GET",
        f"{NS}/pods/web-0/exec?command=sh&command=-c&command=echo+hi%3B+rm+-rf+%2F&container=web&stdin=true"
        "&stdout=true&tty=true",
        {"Upgrade": "websocket"},
        dict(
            verb="get",
            action="exec",
            subresource="exec",
            exec_command=("sh", "-c", "echo hi; rm -rf /"),
            container="web",
            stdin=True,
            tty=True,
            upgrade="websocket",
        ),
    ),
    (
        "POST",
        f"{NS}/pods/web-0/exec?command=ls&stdout=true",
        {"upgrade": "SPDY/3.1"},
        dict(verb="create", action="exec", exec_command=("ls",), stdin=False, tty=False, upgrade="spdy/3.1"),
    ),
    (
        "POST",
        f"{NS}/pods/web-0/attach?container=web&stdin=1&tty=0",
        {},
        dict(verb="create", action="attach", container="web", stdin=True, tty=False),
    ),
    (
        "GET",
        f"{NS}/pods/web-0/portforward?ports=8080&ports=9090",
        {},
        dict(verb="get", action="portforward", ports=("8080", "9090")),
    ),
    # exec parameters are only read for exec
    ("GET", f"{NS}/pods/web-0?command=rm&stdin=true", {}, dict(exec_command=(), stdin=False, action="get")),
    # --- proxy: subresource with a forwarded path, and the legacy verb path
    (
        "GET",
        f"{NS}/pods/web-0/proxy",
        {},
        dict(verb="get", action="proxy", subresource="proxy", subpath=""),
    ),
    ("GET", f"{NS}/pods/web-0/proxy/", {}, dict(action="proxy", subpath="/")),
    (
        "POST",
        f"{NS}/services/http:web:80/proxy/api/v2/items/",
        {},
        dict(verb="create", resource="services", name="http:web:80", subpath="/api/v2/items/", action="proxy"),
    ),
    ("GET", "/api/v1/nodes/node-1/proxy/metrics", {}, dict(resource="nodes", subpath="/metrics")),
    (
        "GET",
        "/api/v1/proxy/namespaces/apps/pods/web-0/healthz",
        {},
        dict(verb="proxy", action="proxy", resource="pods", name="web-0", subresource="", subpath="/healthz"),
    ),
    ("DELETE", "/api/v1/proxy/nodes/node-1/x", {}, dict(verb="proxy", resource="nodes", namespace="")),
    # --- percent escapes decode once, like the server
    ("GET", f"{NS}/p%6Fds/web%2D0", {}, dict(resource="pods", name="web-0", path=f"{NS}/pods/web-0")),
    # --- discovery and other non-resource paths
    ("GET", "/", {}, dict(is_resource_request=False, verb="get", path="/")),
    ("GET", "/api", {}, dict(is_resource_request=False, verb="get", path="/api")),
    ("GET", "/api/v1", {}, dict(is_resource_request=False, path="/api/v1", resource="")),
    ("GET", "/apis", {}, dict(is_resource_request=False)),
    ("GET", "/apis/apps", {}, dict(is_resource_request=False)),
    ("GET", "/apis/apps/v1", {}, dict(is_resource_request=False, api_group="", path="/apis/apps/v1")),
    ("GET", "/version?timeout=32s", {}, dict(is_resource_request=False, path="/version")),
    ("GET", "/healthz", {}, dict(is_resource_request=False)),
    ("GET", "/readyz/etcd", {}, dict(is_resource_request=False)),
    ("GET", "/livez/poststarthook/start-kube-aggregator-informers", {}, dict(is_resource_request=False)),
    ("GET", "/openapi/v2", {}, dict(is_resource_request=False)),
    ("GET", "/openapi/v3/apis/apps/v1?hash=ABC", {}, dict(is_resource_request=False)),
    ("POST", "/metrics", {}, dict(is_resource_request=False, verb="post", action="post")),
    ("GET", "/.well-known/openid-configuration", {}, dict(is_resource_request=False)),
    ("GET", "/openid/v1/jwks", {}, dict(is_resource_request=False)),
    # --- impersonation is always visible as its own action
    (
        "GET",
        f"{NS}/pods",
        {"Impersonate-User": "alice", "impersonate-group": "system:masters"},
        dict(
            verb="list",
            action="impersonate",
            impersonate=(Impersonation("users", "alice"), Impersonation("groups", "system:masters")),
        ),
    ),
    (
        "GET",
        f"{NS}/pods/web-0/exec?command=id",
        {"Impersonate-User": "system:serviceaccount:kube-system:admin"},
        dict(
            verb="get",
            action="impersonate",
            exec_command=("id",),
            impersonate=(Impersonation("serviceaccounts", "admin", namespace="kube-system"),),
        ),
    ),
    (
        "GET",
        "/version",
        {"Impersonate-Uid": "1234", "Impersonate-Extra-Acme.com%2Fproject": "p1"},
        dict(
            is_resource_request=False,
            action="impersonate",
            impersonate=(
                Impersonation("uids", "1234"),
                Impersonation("userextras", "p1", subresource="acme.com/project"),
            ),
        ),
    ),
]


def _case_id(case: tuple[str, str, dict[str, str], dict[str, Any]]) -> str:
    return f"{case[0]} {case[1]}"[:90]


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_mapping_table(case: tuple[str, str, dict[str, str], dict[str, Any]]) -> None:
    method, path, headers, expected = case
    req = resolve(method, path, "", headers)
    if expected.get("is_resource_request", True):
        assert req.is_resource_request
        if "path" not in expected:
            assert req.path == path.partition("?")[0]
    for field, value in expected.items():
        assert getattr(req, field) == value, f"{field}: {getattr(req, field)!r} != {value!r}"


def test_defaults_of_a_plain_get() -> None:
    req = resolve("GET", "/api/v1/namespaces/apps/secrets/db-creds", "", {})
    assert req == K8sRequest(
        method="GET",
        path="/api/v1/namespaces/apps/secrets/db-creds",
        verb="get",
        action="get",
        is_resource_request=True,
        api_group="",
        api_version="v1",
        resource="secrets",
        namespace="apps",
        name="db-creds",
    )


def test_query_as_string_or_mapping_gives_the_same_answer() -> None:
    path = "/api/v1/namespaces/apps/pods/web-0/exec"
    from_string = resolve("POST", path, "command=echo&command=a+b&stdin=1", {})
    from_mapping = resolve("POST", path, {"command": ["echo", "a b"], "stdin": ["1"]}, {})
    assert from_string == from_mapping
    assert from_string.exec_command == ("echo", "a b")


def test_mitmproxy_query_multidict_keeps_every_value() -> None:
    request = Request.make("GET", "https://k8s/api/v1/namespaces/apps/pods/web-0/exec?command=ls&command=-la&tty=1")
    req = resolve(request.method, request.path.partition("?")[0], request.query, request.headers)
    assert req.exec_command == ("ls", "-la")
    assert req.tty


def test_mapping_with_single_string_values_is_refused() -> None:
    with pytest.raises(UnknownRequest):
        resolve("GET", "/api/v1/namespaces/apps/pods/web-0/exec", {"command": "rm"}, {})  # type: ignore[dict-item]


def test_query_in_path_and_separately_is_ambiguous() -> None:
    with pytest.raises(UnknownRequest):
        resolve("GET", "/api/v1/pods?watch=1", "watch=0", {})


def test_repeated_impersonation_headers_are_each_visible() -> None:
    headers = Headers([(b"Impersonate-User", b"bob"), (b"Impersonate-Group", b"a,b"), (b"impersonate-group", b"c")])
    req = resolve("GET", "/api/v1/pods", "", headers)
    assert req.action == "impersonate"
    assert req.impersonate == (
        Impersonation("users", "bob"),
        Impersonation("groups", "a,b"),
        Impersonation("groups", "c"),
    )


# Paths and queries that must be refused: each could make the gateway and the server disagree.
MALICIOUS: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/api/v1/namespaces/apps/pods/../secrets", {}),
    ("GET", "/api/v1/namespaces/apps/pods/%2e%2e/secrets", {}),
    ("GET", "/api/v1/namespaces/apps/pods/%2E%2E/secrets", {}),
    ("GET", "/api/v1/namespaces/apps/pods/./web-0", {}),
    ("GET", "/api/v1/namespaces/apps/%2e/pods", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0%2Fexec", {}),
    ("GET", "/api/v1/namespaces/apps%2fpods/x", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0%5Cexec", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0\\exec", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%250", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%3Fx", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%00", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%zz", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%", {}),
    ("GET", "/api/v1/namespaces/apps/pods/%ff", {}),
    ("GET", "/api/v1//namespaces/apps/pods", {}),
    ("GET", "//api/v1/namespaces/apps/pods", {}),
    ("GET", "/api/v1/namespaces//pods", {}),
    ("GET", "/api/v1/namespaces/apps/pods/", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0/exec/extra", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0/log/", {}),
    ("GET", "/api/v1/namespaces/apps/status/extra", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0/proxy/../../secrets", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web-0/proxy/a//b", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web 0", {}),
    ("GET", "/api/v1/namespaces/apps/pods/web%200", {}),
    ("GET", "/api/v1/namespaces/apps/pods/wéb", {}),
    ("GET", "/api/v1/namespaces/apps/pods#x", {}),
    ("GET", "/api/v1/namespaces/Apps/pods", {}),
    ("GET", "/api/v1/namespaces/apps/Pods", {}),
    ("GET", "/apis/Apps/v1/deployments", {}),
    ("GET", "/apis/apps/V1/deployments", {}),
    ("GET", "/api/v1/namespaces/apps/pods/" + "a" * 254, {}),
    ("GET", "api/v1/pods", {}),
    ("GET", "", {}),
    ("GET", "/api/v1/watch", {}),
    ("GET", "/api/v1/proxy", {}),
    ("GET", "/api/v1/proxy/nodes", {}),
    ("POST", "/api/v1/watch/pods", {}),
    # unknown non-resource paths
    ("GET", "/foo", {}),
    ("GET", "/healthz/", {}),
    ("GET", "/healthz/..", {}),
    ("GET", "/apis/", {}),
    ("GET", "/openapi/v4", {}),
    ("GET", "/ui/api/v1/pods", {}),
    # unknown methods
    ("OPTIONS", "/api/v1/pods", {}),
    ("TRACE", "/api/v1/pods", {}),
    ("CONNECT", "/api/v1/namespaces/apps/pods/web-0/exec", {}),
    # query strings the server would read differently
    ("GET", "/api/v1/pods?watch=false;watch=true", {}),
    ("GET", "/api/v1/pods?watch=%zz", {}),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name", {}),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3Da%3Db", {}),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3Da%5Cx", {}),
    ("GET", "/api/v1/pods?fieldSelector=metadata.name%3Da%5C", {}),
    # unknown impersonation headers
    ("GET", "/api/v1/pods", {"Impersonate-Whatever": "x"}),
    ("GET", "/api/v1/pods", {"Impersonate-Extra-": "x"}),
]


@pytest.mark.parametrize("case", MALICIOUS, ids=[_case_id((c[0], c[1], c[2], {})) for c in MALICIOUS])
def test_malicious_or_unknown_requests_fail_closed(case: tuple[str, str, dict[str, str]]) -> None:
    method, path, headers = case
    with pytest.raises(UnknownRequest):
        resolve(method, path, "", headers)


def test_unknown_request_is_a_value_error() -> None:
    assert issubclass(UnknownRequest, ValueError)
