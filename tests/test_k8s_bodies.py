"""Kubernetes request bodies read for ``json:`` rules: JSON, patches and kubectl's protobuf
(lictor_addons.http._requests.k8s_body_attrs, lictor_addons.http._k8s_proto)."""

import json
from pathlib import Path
from typing import Any

from lictor import Identity, load_policy
from lictor_addons.http._k8s_proto import MAGIC, MEDIA_TYPE, read_object
from lictor_addons.http._requests import k8s_request
from lictor_addons.http.vocabulary import K8S_VOCABULARY

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = "/apis/apps/v1/namespaces/apps/deployments"
DEPLOYER = Identity("deploy-bot", {"role": "deployer"})


# -- a protobuf writer for the tests (kubectl's own bodies are read in test_kubernetes_kubectl) -----------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, value: int | bytes | str | bool) -> bytes:
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def envelope(raw: bytes, api_version: str = "apps/v1", kind: str = "Deployment") -> bytes:
    return MAGIC + field(1, field(1, api_version) + field(2, kind)) + field(2, raw)


def deployment(pod_spec: bytes, name: str = "web") -> bytes:
    """A Deployment whose template's spec is ``pod_spec`` (encoded PodSpec fields)."""
    template = field(1, field(11, field(1, "app") + field(2, name))) + field(2, pod_spec)
    spec = field(1, 2) + field(3, template)
    return envelope(field(1, field(1, name)) + field(2, spec) + field(3, b""))


def container(*extra: bytes, name: str = "web", image: str = "nginx:1.27") -> bytes:
    return field(2, field(1, name) + field(2, image) + b"".join(extra))


def decide(body: bytes, ctype: str = MEDIA_TYPE, method: str = "POST", path: str = DEPLOYMENTS) -> tuple[str, str]:
    result = load_policy([ROOT / "examples" / "kubernetes" / "rulepacks"], {"kubernetes": K8S_VOCABULARY})
    assert result.policy is not None, result.errors
    request = k8s_request(
        method=method, raw_path=path, headers={"Content-Type": ctype}, body=body, target="cluster"
    ).request
    decision = result.policy.decide(DEPLOYER, request)
    return decision.action, decision.rule_ids[0]


def test_a_protobuf_deployment_is_read_as_its_json_document() -> None:
    privileged = field(15, field(2, True))
    sys_admin = field(15, field(1, field(1, "SYS_ADMIN") + field(1, "CHOWN")))
    body = deployment(container(privileged) + container(sys_admin, name="side") + field(11, True))
    doc, holes = read_object(body)
    assert holes == []
    spec = doc["spec"]["template"]["spec"]
    assert doc["kind"] == "Deployment" and doc["metadata"] == {"name": "web"} and doc["spec"]["replicas"] == 2
    assert spec["hostNetwork"] is True
    assert spec["containers"][0]["securityContext"] == {"privileged": True}
    assert spec["containers"][1]["securityContext"]["capabilities"] == {"add": ["SYS_ADMIN", "CHOWN"]}
    # A volume's source is inlined in JSON, as the API server's Go structs embed it.
    volume = field(1, field(1, "root") + field(2, field(1, field(1, "/"))))
    doc, _ = read_object(deployment(container() + volume))
    assert doc["spec"]["template"]["spec"]["volumes"] == [{"name": "root", "hostPath": {"path": "/"}}]


def test_the_example_refuses_protobuf_pod_templates_that_take_the_node() -> None:
    assert decide(deployment(container())) == ("allow", "k8s-deploy")
    assert decide(deployment(container(field(15, field(2, False))))) == ("allow", "k8s-deploy")
    cases = {
        "k8s-deploy-no-privileged-containers": container(field(15, field(2, True))),
        "k8s-deploy-no-privileged-init-containers": container() + field(20, field(1, "i") + field(15, field(2, 1))),
        "k8s-deploy-no-escaping-capabilities": container(field(15, field(1, field(1, "CAP_SYS_ADMIN")))),
        "k8s-deploy-no-host-network": container() + field(11, True),
        "k8s-deploy-no-host-pid": container() + field(12, True),
        "k8s-deploy-no-host-ipc": container() + field(13, 7),  # any non-zero varint is true
        "k8s-deploy-no-host-paths": container() + field(1, field(1, "r") + field(2, field(1, field(1, "/etc")))),
    }
    for rule, pod_spec in cases.items():
        assert decide(deployment(pod_spec)) == ("deny", rule), rule


def test_what_the_gateway_did_not_read_matches_every_restriction_and_no_permission(tmp_path: Path) -> None:
    # A field number the schema does not have could be any field of its message: a hole at the message's path.
    body = deployment(container() + field(99, b"\x08\x01"))
    doc, holes = read_object(body)
    assert holes == ["$.spec.template.spec"]
    assert decide(body)[0] == "deny"
    # A described field whose own message is not (an affinity): a hole at its path only.
    body = deployment(container() + field(18, field(1, b"\x0a\x00")))
    assert read_object(body)[1] == ["$.spec.template.spec.affinity"]
    assert decide(body) == ("allow", "k8s-deploy")
    # Empty structs, which Go's protobuf writes for every non-pointer field, hide nothing.
    assert read_object(deployment(container(field(8, b"")) + field(18, b"")))[1] == []

    (tmp_path / "p.yaml").write_text(
        """format: lictor/v1
metadata: {name: p}
identities: [{id: all, match: {claims: {role: deployer}}, roles: [d]}]
roles:
  d:
    rules:
      - id: images
        protocol: kubernetes
        when: {verbs: [create], json: {"$.spec.template.spec.containers[*].image": "registry.local/*"}}
        action: allow
      - id: no-affinity-on-ssd
        protocol: kubernetes
        when:
          verbs: [create]
          json:
            "$.spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[*].matchExpressions[*].key": "disk"
            "$.metadata.name": "db-*"
        action: deny
"""
    )
    result = load_policy([tmp_path], {"kubernetes": K8S_VOCABULARY})
    assert result.policy is not None, result.errors

    def rules(body: bytes) -> tuple[str, ...]:
        request = k8s_request(
            method="POST", raw_path=DEPLOYMENTS, headers={"Content-Type": MEDIA_TYPE}, body=body, target="c"
        ).request
        return result.policy.decide(DEPLOYER, request).rule_ids  # type: ignore[union-attr]

    local = container(image="registry.local/web:1")
    assert rules(deployment(local)) == ("images",)
    assert rules(deployment(container(image="docker.io/web:1"))) == ("lictor:default-deny",)
    # The affinity was not read: the deny matches wherever its other path matches too.
    affinity = field(18, field(1, b"\x0a\x00"))
    assert rules(deployment(local + affinity, name="db-1")) == ("no-affinity-on-ssd",)
    assert rules(deployment(local + affinity, name="web")) == ("images",)
    # An unread part of the containers: no permission on the containers covers it.
    assert rules(deployment(container(field(77, b"x"), image="registry.local/web:1"))) == ("lictor:default-deny",)


def test_protobuf_the_gateway_cannot_read_unambiguously_is_unreadable() -> None:
    twice = deployment(container() + field(11, False) + field(11, True))
    other_kind = envelope(field(1, field(1, "x")), "v1", "Secret")
    truncated = deployment(container())[:-3]
    for body in (twice, other_kind, truncated, b"k8s\x00\xff", b"not protobuf at all"):
        request = k8s_request(
            method="POST", raw_path=DEPLOYMENTS, headers={"Content-Type": MEDIA_TYPE}, body=body, target="c"
        ).request
        assert "body_unreadable" in request.attrs and "json" not in request.attrs, body
        assert decide(body)[0] == "deny"


def test_json_bodies_and_patches_of_a_deployment() -> None:
    def doc(spec: dict[str, Any]) -> bytes:
        return json.dumps(
            {"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": spec}}}
        ).encode()

    web = {"containers": [{"name": "web", "image": "nginx"}]}
    assert decide(doc(web), "application/json") == ("allow", "k8s-deploy")
    assert decide(doc({**web, "hostPID": True}), "application/json") == ("deny", "k8s-deploy-no-host-pid")
    patch = f"{DEPLOYMENTS}/web"
    merge = json.dumps({"spec": {"template": {"spec": {"hostIPC": True}}}}).encode()
    for ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        assert decide(merge, ctype, "PATCH", patch) == ("deny", "k8s-deploy-no-host-ipc")
    ops = [{"op": "replace", "path": "/spec/template/spec/containers/0/securityContext/privileged", "value": True}]
    body = json.dumps(ops).encode()
    assert decide(body, "application/json-patch+json", "PATCH", patch) == (
        "deny",
        "k8s-deploy-no-privileged-containers",
    )
    # Server-side apply as kubectl sends it (JSON) is read; YAML that is not JSON is not.
    assert decide(doc(web), "application/apply-patch+yaml", "PATCH", patch) == ("allow", "k8s-deploy")
    assert decide(b"spec:\n  template: {}\n", "application/apply-patch+yaml", "PATCH", patch)[0] == "deny"


def test_approvers_read_the_request_without_its_body() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"password": "hunter2"}}
    request = k8s_request(
        method="POST",
        raw_path="/api/v1/namespaces/apps/secrets",
        headers={"Content-Type": "application/json"},
        body=json.dumps(secret).encode(),
        target="c",
    ).request
    assert request.attrs["json"]["$.stringData.password"] == "hunter2"
    assert request.shown_attrs is not None and "hunter2" not in json.dumps(request.shown_attrs)


def test_a_policy_test_case_says_which_json_its_body_is(tmp_path: Path) -> None:
    # `json:` with `content_type: application/json-patch+json` was sent as application/json, so a JSON Patch
    # in a rule pack's tests was read as a document ($[*].path ...), not as the fields it sets.
    from lictor_addons.http._requests import build_k8s_requests

    case = {
        "method": "PATCH",
        "path": f"{DEPLOYMENTS}/web",
        "content_type": "application/json-patch+json",
        "json": [{"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True}],
    }
    [request] = build_k8s_requests(case, "cluster")
    assert request.attrs["json"]["$.spec.template.spec.hostNetwork"] == "true"
