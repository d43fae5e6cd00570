"""The real kubectl through a real ``lictor run`` gateway (examples/kubernetes) to a Kubernetes-API-compatible
test server (tests/kubeapi.py), which records every request that reaches it."""

import base64
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, GatewayProcess, free_port, lictor, require_binary, wait_until
from .kubeapi import KubeAPIServer

REDACTED_B64 = base64.b64encode(b"[REDACTED:lictor]").decode()
BUFFER_LIMIT = 256 * 1024  # the gateway's http_buffer_limit here

# Roles only the tests need, next to the example's rule pack.
TEST_PACK = {
    "format": "lictor/v1",
    "metadata": {"name": "kubectl-tests", "owner": "tests"},
    "identities": [
        {"match": {"claims": {"role": "secret-lister"}}, "roles": ["secret-lister"]},
        {"match": {"claims": {"role": "secret-reader"}}, "roles": ["secret-reader"]},
        {"match": {"claims": {"role": "secret-writer"}}, "roles": ["secret-writer"]},
        {"match": {"claims": {"role": "viewer"}}, "roles": ["log-masking", "env-masking", "rules-reviewer"]},
        {"match": {"claims": {"role": "deployer"}}, "roles": ["exec-masking"]},
        {"match": {"claims": {"role": "token-issuer"}}, "roles": ["token-issuer"]},
    ],
    "roles": {
        "secret-lister": {
            "inherits": ["viewer"],
            "rules": [
                {
                    "id": "t-secrets-read",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["get", "list", "watch"], "resources": ["secrets"], "namespaces": ["apps"]},
                    "action": "allow",
                }
            ],
        },
        "secret-reader": {
            "inherits": ["secret-lister"],
            "rules": [
                {
                    "id": "t-secrets-reveal",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["reveal"], "resources": ["secrets"], "namespaces": ["apps"]},
                    "action": "allow",
                },
                {
                    "id": "t-root-key-never-revealed",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["reveal"], "resources": ["secrets"], "names": ["root-key"]},
                    "action": "deny",
                },
            ],
        },
        "secret-writer": {
            "inherits": ["secret-lister"],
            "rules": [
                {
                    "id": "t-secrets-write",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["create", "update", "patch"], "resources": ["secrets"], "namespaces": ["apps"]},
                    "action": "allow",
                }
            ],
        },
        "token-issuer": {
            "inherits": ["viewer"],
            "rules": [
                {
                    "id": "t-token-create",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["create"], "resources": ["serviceaccounts/token"], "namespaces": ["apps"]},
                    "action": "allow",
                },
                {
                    "id": "t-token-review",
                    "protocol": "kubernetes",
                    "when": {
                        "verbs": ["create"],
                        "api_groups": ["authentication.k8s.io"],
                        "resources": ["tokenreviews"],
                    },
                    "action": "allow",
                },
            ],
        },
        "exec-masking": {
            "rules": [
                {
                    "id": "t-exec-mask",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["exec"]},
                    "action": "mask",
                    "mask": {"detectors": ["card"]},
                },
                {
                    "id": "t-configmap-delete-held",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["delete"], "resources": ["configmaps"], "namespaces": ["apps"]},
                    "action": "approve",
                    "approval": {"approvers": ["oncall"], "timeout": "15m"},
                },
                {
                    "id": "t-no-system-pods",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["get", "list", "watch"], "resources": ["pods"], "namespaces": ["kube-system"]},
                    "action": "deny",
                    "message": "deployers do not read kube-system's pods",
                },
            ]
        },
        "env-masking": {
            "rules": [
                {
                    "id": "t-env-mask",
                    "protocol": "kubernetes",
                    "when": {"resources": ["pods"]},
                    "action": "mask",
                    "mask": {"json_paths": ["$.spec.containers[*].env[*].value"]},
                }
            ]
        },
        "rules-reviewer": {
            "rules": [
                {
                    "id": "t-rules-review",
                    "protocol": "kubernetes",
                    "when": {
                        "verbs": ["create"],
                        "api_groups": ["authorization.k8s.io"],
                        "resources": ["selfsubjectrulesreviews"],
                    },
                    "action": "allow",
                }
            ]
        },
        "log-masking": {
            "rules": [
                {
                    "id": "t-logs-mask",
                    "protocol": "kubernetes",
                    "when": {"verbs": ["logs"]},
                    "action": "mask",
                    "mask": {"detectors": ["email"]},
                }
            ]
        },
    },
}


class Cluster:
    def __init__(self, gw: GatewayProcess, kube: KubeAPIServer, ports: dict[str, int]) -> None:
        self.gw = gw
        self.kube = kube
        self.ports = ports
        self.kubectl_bin = require_binary("kubectl")
        self.oncall = gw.token("oncall-1", role="oncall")
        self.kubeconfigs: dict[str, Path] = {}
        for role in ("viewer", "deployer", "secret-lister", "secret-reader", "secret-writer", "token-issuer"):
            token = gw.token(f"{role}-1", role=role)
            out = lictor(
                "kubeconfig",
                "--server",
                f"https://127.0.0.1:{ports['gateway']}",
                "--token",
                token,
                "--ca",
                str(gw.state_dir / "tls" / "ca.crt"),
                "--namespace",
                "apps",
            ).stdout
            path = gw.workdir / f"{role}.kubeconfig"
            path.write_text(out)
            self.kubeconfigs[role] = path
        self.tokens = [yaml.safe_load(p.read_text())["users"][0]["user"]["token"] for p in self.kubeconfigs.values()]

    def env(self, role: str, **extra: str) -> dict[str, str]:
        # TMPDIR: `kubectl edit` leaves its copy of a rejected edit there
        work = str(self.gw.workdir)
        return {**os.environ, "KUBECONFIG": str(self.kubeconfigs[role]), "HOME": work, "TMPDIR": work, **extra}

    def kubectl(self, role: str, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl_bin, *args],
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
            env=self.env(role, **env),
        )

    def popen(self, role: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.kubectl_bin, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(role)
        )

    def curl(self, role: str, path: str, *headers: str, data: str | None = None) -> tuple[int, bytes]:
        """curl GET (POST with ``data``) ``path`` through the gateway with ``role``'s token and ``headers``;
        (status, body)."""
        token = yaml.safe_load(self.kubeconfigs[role].read_text())["users"][0]["user"]["token"]
        args = [require_binary("curl"), "-sS", "--cacert", str(self.gw.state_dir / "tls" / "ca.crt")]
        for header in (f"Authorization: Bearer {token}", *headers):
            args += ["-H", header]
        if data is not None:
            args += ["--data-binary", data]
        url = f"https://127.0.0.1:{self.ports['gateway']}{path}"
        out = subprocess.run([*args, "-w", "\n%{http_code}", url], capture_output=True, timeout=60, check=True)
        body, _, code = out.stdout.rpartition(b"\n")
        return int(code), body

    def approvals_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['approvals']}"

    def wait_pending(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = lictor("approvals", "list", "--url", self.approvals_url(), "--token", self.oncall).stdout
            found = re.findall(r"\bap-[0-9a-f]+\b", out)
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError("no approval request appeared")

    def approve(self, approval_id: str) -> None:
        lictor("approvals", "approve", approval_id, "--url", self.approvals_url(), "--token", self.oncall)

    def upstream(self, method: str | None = None, pattern: str = "") -> list[Any]:
        return [r for r in self.kube.requests if method in (None, r.method) and re.search(pattern, r.path)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_binary("kubectl")
    workdir = tmp_path_factory.mktemp("k8s")
    ports = {"gateway": free_port(), "approvals": free_port()}
    with KubeAPIServer(workdir=workdir / "kube") as kube:
        (workdir / "extra").mkdir()
        (workdir / "extra" / "tests.yaml").write_text(yaml.safe_dump(TEST_PACK))
        config = yaml.safe_load((ROOT / "examples" / "kubernetes" / "lictor.yaml").read_text())
        example_dir = ROOT / "examples" / "kubernetes"
        config["rulepacks"] = [str((example_dir / p).resolve()) for p in config["rulepacks"]] + [str(workdir / "extra")]
        config["state_dir"] = str(workdir / "state")
        config["options"] = {"http_buffer_limit": BUFFER_LIMIT}
        env_vars = {
            "LICTOR_K8S_SERVER": kube.url,
            "LICTOR_K8S_TOKEN": kube.token,
            "LICTOR_K8S_CA": str(kube.ca_path),
            "LICTOR_K8S_LISTEN": f"127.0.0.1:{ports['gateway']}",
            "LICTOR_APPROVALS_LISTEN": f"127.0.0.1:{ports['approvals']}",
        }
        saved = {k: os.environ.get(k) for k in env_vars}
        os.environ.update(env_vars)
        gw = GatewayProcess(workdir, config)
        try:
            gw.start()
            yield Cluster(gw, kube, ports)
        finally:
            gw.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_viewer_discovers_and_reads(cluster: Cluster) -> None:
    out = cluster.kubectl("viewer", "version", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["serverVersion"]["gitVersion"]
    out = cluster.kubectl("viewer", "get", "pods")
    assert out.returncode == 0 and "web-0" in out.stdout, out.stderr
    out = cluster.kubectl("viewer", "get", "namespaces", "-o", "name")
    assert "namespace/apps" in out.stdout
    out = cluster.kubectl("viewer", "get", "deployments", "--all-namespaces", "-o", "json")
    assert out.returncode == 0 and json.loads(out.stdout)["items"][0]["metadata"]["name"] == "web"
    # The upstream saw the gateway's credentials, never an agent's token.
    for request in cluster.kube.requests:
        assert request.header("authorization") == f"Bearer {cluster.kube.token}"
        assert not any(token in json.dumps(request.headers) for token in cluster.tokens)


def test_viewer_is_refused_secrets_writes_and_exec_with_readable_errors(cluster: Cluster) -> None:
    out = cluster.kubectl("viewer", "get", "secrets")
    assert out.returncode == 1
    assert out.stderr.startswith("Error from server (Forbidden): lictor: no rule allows list secrets -n apps")
    out = cluster.kubectl("viewer", "delete", "deployment", "web")
    assert out.returncode == 1 and "Error from server (Forbidden)" in out.stderr
    out = cluster.kubectl("viewer", "exec", "web-0", "--", "ls", "/")
    assert out.returncode == 1 and "Forbidden" in out.stderr
    out = cluster.kubectl("viewer", "get", "--raw", "/debug/pprof/heap")
    assert out.returncode == 1 and "cannot be inspected safely" in out.stderr
    assert cluster.upstream(pattern="/secrets") == []
    assert cluster.upstream(pattern="/exec") == []
    assert cluster.upstream("DELETE") == []
    assert cluster.upstream(pattern="pprof") == []


def test_deployer_rolls_out_in_apps_only(cluster: Cluster) -> None:
    out = cluster.kubectl("deployer", "create", "deployment", "api", "--image=nginx:1.27")
    assert out.returncode == 0, out.stderr
    assert cluster.kube.get_object("deployments", "api", "apps") is not None
    out = cluster.kubectl("deployer", "scale", "deployment", "api", "--replicas=3")
    assert out.returncode == 0, out.stderr
    out = cluster.kubectl("deployer", "patch", "deployment", "api", "-p", '{"metadata":{"labels":{"tier":"web"}}}')
    assert out.returncode == 0, out.stderr
    dep = cluster.kube.get_object("deployments", "api", "apps")
    assert dep is not None and dep["spec"]["replicas"] == 3 and dep["metadata"]["labels"]["tier"] == "web"
    out = cluster.kubectl("deployer", "create", "deployment", "api", "--image=nginx", "-n", "default")
    assert out.returncode == 1 and "lictor: no rule allows create deployments.apps -n default" in out.stderr
    assert cluster.kube.get_object("deployments", "api", "default") is None
    out = cluster.kubectl("deployer", "create", "secret", "generic", "x", "--from-literal=a=b")
    assert out.returncode == 1 and cluster.upstream("POST", "/secrets") == []


def test_deployer_applies_manifests_as_the_readme_says_against_the_test_server(cluster: Cluster) -> None:
    # The test server publishes no OpenAPI: kubectl's validation stops before any request, and the README
    # tells a user trying the example against it to turn validation off.
    manifest = yaml.safe_dump(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "applied", "namespace": "apps", "labels": {"app": "applied"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "applied"}},
                "template": {
                    "metadata": {"labels": {"app": "applied"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                },
            },
        }
    )
    out = cluster.kubectl("deployer", "apply", "-f", "-", stdin=manifest)
    assert out.returncode == 1 and "failed to download openapi" in out.stderr, out.stderr
    readme = (ROOT / "examples" / "kubernetes" / "README.md").read_text()
    assert "kubectl apply --validate=false -f" in readme
    for args in (["--dry-run=server"], [], []):  # a server dry run, the create, then a second apply
        out = cluster.kubectl("deployer", "apply", "--validate=false", *args, "-f", "-", stdin=manifest)
        assert out.returncode == 0, out.stderr
    dep = cluster.kube.get_object("deployments", "applied", "apps")
    assert dep is not None and dep["spec"]["replicas"] == 2
    out = cluster.kubectl("deployer", "rollout", "status", "deployment", "applied", "--timeout=10s")
    assert out.returncode == 0, out.stderr
    # kubectl edit validates what was edited the same way
    editor = cluster.gw.workdir / "edit-replicas.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/replicas: 2/replicas: 3/' \"$1\"\n")
    editor.chmod(0o755)
    before = len(cluster.upstream("PATCH", "/deployments/applied"))
    out = cluster.kubectl("deployer", "edit", "deployment", "applied", KUBE_EDITOR=str(editor))
    assert out.returncode == 1 and 'deployments.apps "applied" is invalid' in out.stderr, out.stderr
    assert len(cluster.upstream("PATCH", "/deployments/applied")) == before
    assert "kubectl edit deployment web --validate=false" in readme
    out = cluster.kubectl("deployer", "edit", "deployment", "applied", "--validate=false", KUBE_EDITOR=str(editor))
    assert out.returncode == 0 and "deployment.apps/applied edited" in out.stdout, out.stderr
    dep = cluster.kube.get_object("deployments", "applied", "apps")
    assert dep is not None and dep["spec"]["replicas"] == 3


def test_deployer_applies_server_side(cluster: Cluster) -> None:
    # kubectl apply --server-side sends the object as JSON under application/apply-patch+yaml
    def manifest(replicas: int, **container: object) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "ssa", "namespace": "apps"},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": "ssa"}},
                    "template": {
                        "metadata": {"labels": {"app": "ssa"}},
                        "spec": {"containers": [{"name": "web", "image": "nginx:1.27", **container}]},
                    },
                },
            }
        )

    for replicas in (1, 2):  # the create, then an update
        out = cluster.kubectl(
            "deployer", "apply", "--server-side", "--validate=false", "-f", "-", stdin=manifest(replicas)
        )
        assert out.returncode == 0 and "deployment.apps/ssa serverside-applied" in out.stdout, out.stderr
    dep = cluster.kube.get_object("deployments", "ssa", "apps")
    assert dep is not None and dep["spec"]["replicas"] == 2
    [sent, *_] = cluster.upstream("PATCH", "/deployments/ssa")
    assert sent.header("content-type") == "application/apply-patch+yaml"
    out = cluster.kubectl(
        "deployer", "apply", "--server-side", "--validate=false", "-f", "-",
        stdin=manifest(2, securityContext={"privileged": True}),
    )  # fmt: skip
    assert out.returncode == 1 and "k8s-deploy-no-privileged-containers" in out.stderr, out.stderr
    dep = cluster.kube.get_object("deployments", "ssa", "apps")
    assert dep is not None and "securityContext" not in dep["spec"]["template"]["spec"]["containers"][0]


def test_deployer_cannot_roll_out_pods_with_the_nodes_privileges(cluster: Cluster) -> None:
    def manifest(name: str, pod: dict[str, object]) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": "apps", "labels": {"app": name}},
                "spec": {
                    "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}}, "spec": pod},
                },
            }
        )

    web = {"containers": [{"name": "web", "image": "nginx:1.27"}]}
    privileged = {"containers": [{"name": "web", "image": "nginx:1.27", "securityContext": {"privileged": True}}]}
    for verb in (["create", "--validate=false"], ["apply", "--validate=false"]):
        out = cluster.kubectl("deployer", *verb, "-f", "-", stdin=manifest("root", privileged))
        assert out.returncode == 1, out.stdout
        assert "k8s-deploy-no-privileged-containers" in out.stderr and "node's privileges" in out.stderr
    assert cluster.kube.get_object("deployments", "root", "apps") is None

    out = cluster.kubectl("deployer", "apply", "--validate=false", "-f", "-", stdin=manifest("web", web))
    assert out.returncode == 0, out.stderr
    refused = [
        ["patch", "deployment", "web", "-p", '{"spec":{"template":{"spec":{"hostNetwork":true}}}}'],
        ["patch", "deployment", "web", "--type=merge", "-p", '{"spec":{"template":{"spec":{"hostPID":true}}}}'],
        [
            "patch", "deployment", "web", "--type=json", "-p",
            '[{"op":"add","path":"/spec/template/spec/volumes","value":[{"name":"r","hostPath":{"path":"/"}}]}]',
        ],
        [
            "patch", "deployment", "web", "--type=json", "-p",
            '[{"op":"add","path":"/spec/template/spec/containers/0/securityContext",'
            '"value":{"capabilities":{"add":["SYS_ADMIN"]}}}]',
        ],
        # the API server's JSON Patch reads +0, 00 and -1 (the last item) as array indexes, as Go's Atoi does
        *(
            [
                "patch", "deployment", "web", "--type=json", "-p",
                f'[{{"op":"add","path":"/spec/template/spec/containers/{index}/securityContext",'
                '"value":{"privileged":true}}]',
            ]
            for index in ("+0", "00", "-1")
        ),
        # containerd and CRI-O read capability names in any case
        [
            "patch", "deployment", "web", "-p",
            '{"spec":{"template":{"spec":{"containers":[{"name":"web","securityContext":'
            '{"capabilities":{"add":["sys_admin"]}}}]}}}}',
        ],
        # only the capabilities Pod Security's baseline lets a container add: SYS_BOOT loads kernels (kexec_load)
        [
            "patch", "deployment", "web", "-p",
            '{"spec":{"template":{"spec":{"containers":[{"name":"web","securityContext":'
            '{"capabilities":{"add":["NET_BIND_SERVICE","SYS_BOOT"]}}}]}}}}',
        ],
        # a JSON Patch move or copy puts an object the request shows elsewhere at a deny rule's parent path
        [
            "patch", "deployment", "web", "--type=json", "-p",
            '[{"op":"add","path":"/spec/template/spec/containers/0/sc","value":{"privileged":true}},'
            '{"op":"move","from":"/spec/template/spec/containers/0/sc",'
            '"path":"/spec/template/spec/containers/0/securityContext"}]',
        ],
        [
            "patch", "deployment", "web", "--type=json", "-p",
            '[{"op":"add","path":"/metadata/annotations/pod","value":{"hostPID":true,'
            '"containers":[{"name":"web","image":"nginx:1.27"}]}},'
            '{"op":"copy","from":"/metadata/annotations/pod","path":"/spec/template/spec"},'
            '{"op":"remove","path":"/metadata/annotations/pod"}]',
        ],
    ]  # fmt: skip
    for args in refused:
        out = cluster.kubectl("deployer", *args)
        assert out.returncode == 1 and "node's privileges" in out.stderr, (args, out.stderr)
    out = cluster.kubectl("deployer", "set", "image", "deployment/web", "web=nginx:1.28")
    assert out.returncode == 0, out.stderr
    dep = cluster.kube.get_object("deployments", "web", "apps")
    assert dep is not None
    spec = dep["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == "nginx:1.28"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("volumes")
    assert "securityContext" not in spec["containers"][0]


def test_deleting_a_deployment_waits_for_on_call(cluster: Cluster) -> None:
    cluster.kube.put_object(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "old", "namespace": "apps"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "old"}}, "template": {}},
        }
    )
    proc = cluster.popen("deployer", "delete", "deployment", "old")
    approval_id = cluster.wait_pending()
    assert cluster.kube.get_object("deployments", "old", "apps") is not None  # held, not forwarded
    cluster.approve(approval_id)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert 'deployment.apps "old" deleted' in stdout
    assert cluster.kube.get_object("deployments", "old", "apps") is None


def test_a_server_dry_run_is_decided_and_audited_as_one(cluster: Cluster) -> None:
    # kubectl delete --dry-run=server sends {"dryRun": ["All"]} in the DeleteOptions: it was held for the on-call
    # engineer as a plain delete. The example pack allows dry runs where it holds the real delete.
    before = len(cluster.upstream("DELETE", "/deployments/"))
    out = cluster.kubectl("deployer", "delete", "deployment", "web", "--dry-run=server")
    assert out.returncode == 0 and 'deployment.apps "web" deleted (server dry run)' in out.stdout, out.stderr
    assert cluster.kube.get_object("deployments", "web", "apps") is not None
    [sent] = cluster.upstream("DELETE", "/deployments/")[before:]
    assert json.loads(sent.body)["dryRun"] == ["All"]

    def decisions() -> list[dict[str, Any]]:
        out = lictor("audit", "list", "--state-dir", str(cluster.gw.state_dir), "--kind", "decision", "--json").stdout
        return [e for e in map(json.loads, out.splitlines()) if e["rule_ids"] == ["k8s-deploy-delete-dry-run"]]

    wait_until(lambda: decisions(), 20, "the dry run's audit event")
    [event] = decisions()
    assert event["request"]["summary"] == "delete deployments.apps/web -n apps (dry run)", event
    # held, it is shown to the approvers as a dry run
    cluster.kube.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry", "namespace": "apps"}})
    proc = cluster.popen("deployer", "delete", "configmap", "dry", "--dry-run=server")
    approval_id = cluster.wait_pending()
    shown = lictor("approvals", "list", "--url", cluster.approvals_url(), "--token", cluster.oncall).stdout
    assert "delete configmaps/dry -n apps (dry run)" in shown, shown
    cluster.approve(approval_id)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and 'configmap "dry" deleted (server dry run)' in stdout, stderr
    assert cluster.kube.get_object("configmaps", "dry", "apps") is not None
    # a dry run is no more allowed than the real thing to whom the real thing is not
    out = cluster.kubectl("viewer", "delete", "deployment", "web", "--dry-run=server")
    assert out.returncode == 1 and "lictor: no rule allows delete deployments.apps/web -n apps (dry run)" in out.stderr
    assert len(cluster.upstream("DELETE", "/deployments/")) == before + 1


def test_exec_over_websocket_after_approval_with_stdin_inspected(cluster: Cluster) -> None:
    proc = cluster.popen("deployer", "exec", "web-0", "--", "cat", "/etc/hostname")
    cluster.approve(cluster.wait_pending())
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == "web-0"
    upgrades = cluster.upstream("GET", "/exec$")
    assert upgrades and all(r.header("upgrade") == "websocket" for r in upgrades)

    code, stdout, stderr = _exec_shell(cluster, "echo hello\nrm -rf /data\necho after\n")
    assert code == 0, stderr
    assert stdout.splitlines() == ["hello", "after"]
    assert "lictor: denied by rule k8s-exec-no-destructive-commands" in stderr
    assert "sh: rm: not found" not in stderr  # the test server's shell never saw the rm line

    out = cluster.kubectl("deployer", "exec", "web-0", "--", "rm", "-rf", "/data")
    assert out.returncode == 1 and "destructive commands" in out.stderr
    # kubectl cannot add the X-Lictor-Reason header an HTTP client is told about, and names the rule once.
    assert "X-Lictor-Reason" not in out.stderr and out.stderr.count("k8s-exec-no-destructive-commands") == 1, out
    assert "(rule k8s-exec-no-destructive-commands; ask the rule's owners if you need it)" in out.stderr, out


def _exec_shell(cluster: Cluster, script: str, command: tuple[str, ...] = ("sh",)) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [cluster.kubectl_bin, "exec", "-i", "web-0", "--", *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.env("deployer"),
    )
    cluster.approve(cluster.wait_pending())
    stdout, stderr = proc.communicate(script, timeout=30)
    return proc.returncode, stdout, stderr


def test_exec_output_is_masked_when_a_value_is_split_across_messages(cluster: Cluster) -> None:
    # The container writes the card number in two pieces: two WebSocket messages, the first ending inside it.
    code, stdout, stderr = _exec_shell(cluster, "echo -n 'paid with 41111111'; echo '11111111 today'\n")
    assert code == 0, stderr
    assert "41111111" not in stdout and "11111111" not in stdout, stdout
    assert stdout.startswith("paid with ") and stdout.endswith(" today\n") and "REDACTED" in stdout, stdout
    # Output held back for what could follow is not lost when the command ends without a newline.
    proc = cluster.popen("deployer", "exec", "web-0", "--", "sh", "-c", "echo first; echo -n 'no newline 4111'")
    cluster.approve(cluster.wait_pending())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "first\nno newline 4111", out
    # A line held back while the container is quiet is released then, not with the next output.
    proc = cluster.popen("deployer", "exec", "web-0", "--", "sh", "-c", "echo 'line one'; sleep 30; echo two")
    try:
        cluster.approve(cluster.wait_pending())
        assert Lines(proc).until("line one", timeout=20) == ["line one"]
    finally:
        proc.kill()
        proc.communicate()


def test_exec_stdin_lines_are_checked_as_the_shell_joins_them(cluster: Cluster) -> None:
    # a backslash before the newline continues the line: the shell runs `rm -rf /data`
    code, stdout, stderr = _exec_shell(cluster, "echo hello\nr\\\nm -rf /data\necho after\n")
    assert code == 0, stderr
    assert stdout.splitlines() == ["hello", "after"]
    assert "lictor: denied by rule k8s-exec-no-destructive-commands" in stderr
    assert "m: not found" not in stderr  # neither half reached the test server's shell

    # a line too long to check in one piece is not run at all, and the lines after it are
    long_line = "echo " + "A" * 200_000 + " ; r\\\nm -rf /data\n"
    code, stdout, stderr = _exec_shell(cluster, f"echo hello\n{long_line}echo after\n")
    assert code == 0, stderr
    assert stdout.splitlines() == ["hello", "after"]
    assert "cannot be checked, so it is not run" in stderr


def test_exec_stdin_of_a_shell_behind_a_wrapper_is_checked_too(cluster: Cluster) -> None:
    # env, nice, timeout... run the shell: its stdin lines are the same commands as those of a plain sh
    for command in (("env", "sh"), ("/usr/bin/env", "-i", "LANG=C", "sh")):
        code, stdout, stderr = _exec_shell(cluster, "echo hello\nrm -rf /data\necho after\n", command)
        assert code == 0, stderr
        assert stdout.splitlines() == ["hello", "after"]
        assert "lictor: denied by rule k8s-exec-no-destructive-commands" in stderr
        assert "rm: not found" not in stderr  # the test server's shell never saw the rm line


def test_exec_stdin_lines_are_decided_by_the_programs_they_run(cluster: Cluster) -> None:
    # python3 on a line would read the lines after it as Python: the line is refused, and the Python
    # that follows is not a shell command either, so nothing of it reaches the container
    script = "echo hello\npython3\nimport os; os.system('rm -rf /data')\necho after\n"
    code, stdout, stderr = _exec_shell(cluster, script)
    assert code == 0, stderr
    assert stdout.splitlines() == ["hello", "after"]
    assert (
        "rule lictor:exec-stdin-unparsable: this line cannot be checked, so it is not run: python3 would read" in stderr
    )
    assert "not found" not in stderr  # neither line reached the test server's shell

    # quoting hides the program from a pattern on the text, not from the shell analysis
    code, stdout, stderr = _exec_shell(cluster, "'r'm -rf /data\nr\\m -rf /data\nls /\necho after\n")
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == "after" and "etc" in stdout.splitlines()
    assert stderr.count("lictor: denied by rule k8s-exec-no-destructive-commands") == 2
    assert "not found" not in stderr

    # a command spread over several lines is decided, and forwarded, once complete
    code, stdout, stderr = _exec_shell(cluster, "if true; then\n  rm -rf /data\nfi\necho after\n")
    assert code == 0, stderr
    assert stdout.splitlines() == ["after"]
    assert "lictor: denied by rule k8s-exec-no-destructive-commands" in stderr

    out = cluster.kubectl("deployer", "exec", "web-0", "--", "sh", "-c", "cd /; r\\m -rf x")
    assert out.returncode == 1 and "destructive commands" in out.stderr
    assert not cluster.upstream(pattern=r"/exec\?.*command=cd")


def test_exec_of_a_program_read_from_stdin_is_refused_before_approval(cluster: Cluster) -> None:
    before = len(cluster.upstream(pattern="/exec"))
    script = "import shutil; shutil.rmtree('/data')\n"
    readers = [
        (("python3", "-"), "python3"),
        (("nice", "perl"), "perl"),
        (("awk", "-f", "-"), "awk"),
        (("redis-cli", "-h", "cache"), "redis-cli"),  # FLUSHALL on stdin
        (("cqlsh", "cassandra-0"), "cqlsh"),
        (("duckdb", "/data/app.db"), "duckdb"),
        (("scala",), "scala"),
    ]
    for command, reader in readers:
        out = cluster.kubectl("deployer", "exec", "-i", "web-0", "--", *command, stdin=script)
        assert out.returncode == 1
        assert out.stderr.startswith("Error from server (Forbidden): lictor: the command's stdin cannot be checked")
        assert f"{reader} would read its program from stdin" in out.stderr
        assert "rule lictor:exec-stdin-program" in out.stderr and "whose stdin lines Lictor checks" in out.stderr
    assert len(cluster.upstream(pattern="/exec")) == before
    out = lictor("approvals", "list", "--url", cluster.approvals_url(), "--token", cluster.oncall).stdout
    assert not re.findall(r"\bap-[0-9a-f]+\b", out)  # nobody was asked to approve what cannot run


def _approving(cluster: Cluster, args: list[str], stdin: bytes | None = None) -> tuple[int, str]:
    """Run kubectl, approving every request it holds (kubectl cp execs more than once); (exit code, stderr)."""
    proc = subprocess.Popen(
        [cluster.kubectl_bin, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cluster.env("deployer"),
    )
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.extend(proc.communicate(stdin or b"", timeout=60)))
    reader.start()
    approved: set[str] = set()
    while reader.is_alive():
        out = lictor("approvals", "list", "--url", cluster.approvals_url(), "--token", cluster.oncall).stdout
        for approval_id in sorted(set(re.findall(r"\bap-[0-9a-f]+\b", out)) - approved):
            cluster.approve(approval_id)
            approved.add(approval_id)
        reader.join(0.2)
    return proc.returncode, result[1].decode()


def test_data_on_stdin_still_reaches_the_container(cluster: Cluster) -> None:
    local = cluster.gw.workdir / "notes.txt"
    local.write_text("rm -rf /data is only text here\n")
    code, stderr = _approving(cluster, ["cp", str(local), "web-0:/tmp/notes.txt"])
    assert code == 0, stderr
    assert cluster.kube.files["/tmp/notes.txt"] == b"rm -rf /data is only text here\n"
    archive = subprocess.run(["tar", "cf", "-", "notes.txt"], cwd=local.parent, capture_output=True, check=True)
    code, stderr = _approving(cluster, ["exec", "-i", "web-0", "--", "tar", "xf", "-", "-C", "/srv"], archive.stdout)
    assert code == 0, stderr
    assert cluster.kube.files["/srv/notes.txt"] == b"rm -rf /data is only text here\n"


def test_spdy_is_refused_with_a_message_kubectl_prints(cluster: Cluster) -> None:
    before = len(cluster.upstream(pattern="/exec"))
    out = cluster.kubectl("deployer", "exec", "web-0", "--", "ls", "/", KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false")
    assert out.returncode == 1
    assert "Error from server (Forbidden)" in out.stderr and "only over WebSockets" in out.stderr
    assert len(cluster.upstream(pattern="/exec")) == before


class Lines:
    """Lines of a running process's stdout, read in a thread so that a test can wait with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))

    def until(self, wanted: str, timeout: float = 10, *, partial: bool = False) -> list[str]:
        """Lines up to the first that is ``wanted`` (or contains it, with ``partial``)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not seen or not (wanted in seen[-1] if partial else seen[-1] == wanted):
            seen.append(self.queue.get(timeout=max(0.01, deadline - time.monotonic())))
        return seen


def test_logs_follow_streams_and_is_masked(cluster: Cluster) -> None:
    proc = cluster.popen("viewer", "logs", "-f", "web-0")
    try:
        lines = Lines(proc)
        assert lines.until("GET /healthz 200") == ["starting web-0", "listening on :8080", "GET /healthz 200"]
        cluster.kube.append_log("apps", "web-0", "login by jane.doe@example.com")
        assert lines.until("login by [REDACTED:email]") == ["login by [REDACTED:email]"]
        # a JSON log line whose address is written with \\u escapes, as JSON loggers may
        cluster.kube.append_log("apps", "web-0", '{"msg": "login", "user": "jane.doe\\u0040example.com"}')
        assert lines.until('{"msg":"login","user":"[REDACTED:email]"}') == ['{"msg":"login","user":"[REDACTED:email]"}']
        assert proc.poll() is None  # still following: the lines came while the stream stayed open
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_watch_streams(cluster: Cluster) -> None:
    proc = cluster.popen("viewer", "get", "deployments", "--watch", "-o", "name")
    try:
        lines = Lines(proc)
        lines.until("deployment.apps/web")
        cluster.kube.put_object(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "watched", "namespace": "apps"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "w"}}, "template": {}},
            }
        )
        lines.until("deployment.apps/watched")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_json_path_masks_apply_to_each_object_of_lists_watches_and_tables(cluster: Cluster) -> None:
    # t-env-mask names a pod's field; the pod in a list, a watch event or a Table row was shown unmasked.
    def env_values(pod: dict[str, Any]) -> list[str]:
        return [e["value"] for c in pod["spec"]["containers"] for e in c.get("env", [])]

    out = cluster.kubectl("viewer", "get", "pod", "web-0", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert env_values(json.loads(out.stdout)) == ["[REDACTED:path]"]
    out = cluster.kubectl("viewer", "get", "pods", "-o", "json")
    assert out.returncode == 0, out.stderr
    values = [v for pod in json.loads(out.stdout)["items"] for v in env_values(pod)]
    assert values and set(values) == {"[REDACTED:path]"}
    proc = cluster.popen("viewer", "get", "pods", "--watch", "-o", "jsonpath={.spec.containers[0].env[0].value}{'\\n'}")
    try:
        lines = Lines(proc)
        assert lines.queue.get(timeout=20) == "[REDACTED:path]"  # the list kubectl reads first
        pod = cluster.kube.get_object("pods", "web-0", "apps")
        assert pod is not None
        pod["metadata"] = {"name": "watched-0", "namespace": "apps"}
        pod["spec"]["containers"][0]["env"] = [{"name": "TOKEN", "value": "watched-value"}]
        cluster.kube.put_object(pod)
        assert lines.queue.get(timeout=20) == "[REDACTED:path]"  # the watch event
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        cluster.kube.delete_object("pods", "watched-0", "apps")
    code, table = cluster.curl(
        "viewer",
        "/api/v1/namespaces/apps/pods?includeObject=Object",
        "Accept: application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    assert code == 200, table
    values = [v for row in json.loads(table)["rows"] for v in env_values(row["object"])]
    assert values and set(values) == {"[REDACTED:path]"}
    assert b"production" not in table


def test_json_path_masks_apply_to_the_last_applied_configuration(cluster: Cluster) -> None:
    # kubectl apply keeps a copy of what it applied in an annotation: t-env-mask masked the pod's env value, and
    # the same value was shown in that copy (a string, which the path did not reach).
    applied = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "applied-0", "namespace": "apps"},
        "spec": {"containers": [{"name": "app", "image": "busybox", "env": [{"name": "DB", "value": "hunter2-pw"}]}]},
    }
    pod = json.loads(json.dumps(applied))
    pod["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied) + "\n"}
    cluster.kube.put_object(pod)
    try:
        for args in (("get", "pod", "applied-0", "-o", "json"), ("get", "pods", "-o", "yaml"), ("get", "pods")):
            out = cluster.kubectl("viewer", *args)
            assert out.returncode == 0, out.stderr
            assert "hunter2" not in out.stdout
        out = cluster.kubectl("viewer", "get", "pod", "applied-0", "-o", "json")
        annotation = json.loads(out.stdout)["metadata"]["annotations"][
            "kubectl.kubernetes.io/last-applied-configuration"
        ]
        assert json.loads(annotation)["spec"]["containers"][0]["env"] == [{"name": "DB", "value": "[REDACTED:path]"}]
        for accept in (
            "Accept: application/json;as=Table;v=v1;g=meta.k8s.io",  # rows carry the metadata (kubectl get)
            "Accept: application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
        ):
            code, body = cluster.curl("viewer", "/api/v1/namespaces/apps/pods", accept)
            assert code == 200 and b"applied-0" in body, body
            assert b"hunter2" not in body
    finally:
        cluster.kube.delete_object("pods", "applied-0", "apps")


def test_rules_on_a_resource_hold_for_its_status_which_answers_with_the_object(cluster: Cluster) -> None:
    # GET pods/NAME/status answers with the whole pod: t-no-system-pods (deny) and t-env-mask (mask) name pods,
    # and kubectl get --subresource=status read a kube-system pod, env values unmasked.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sys-0", "namespace": "kube-system"},
        "spec": {"containers": [{"name": "app", "image": "busybox", "env": [{"name": "K", "value": "status-secret"}]}]},
    }
    cluster.kube.put_object(pod)
    try:
        out = cluster.kubectl(
            "deployer", "get", "pod", "sys-0", "-n", "kube-system", "--subresource=status", "-o", "json"
        )
        assert out.returncode == 1 and "status-secret" not in out.stdout
        assert "Error from server (Forbidden): lictor: deployers do not read kube-system's pods" in out.stderr
        assert cluster.upstream(pattern="/namespaces/kube-system/pods/sys-0/status") == []
        out = cluster.kubectl(
            "viewer", "get", "pod", "sys-0", "-n", "kube-system", "--subresource=status", "-o", "json"
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["spec"]["containers"][0]["env"] == [{"name": "K", "value": "[REDACTED:path]"}]
    finally:
        cluster.kube.delete_object("pods", "sys-0", "kube-system")


def test_authenticating_proxy_identity_headers_are_refused(cluster: Cluster) -> None:
    # With a client certificate the API server trusts as a front proxy's (the gateway's own may be one), it
    # takes X-Remote-User/-Group/-Extra-* as who is asking: a viewer would have been system:masters upstream.
    for header in ("X-Remote-User: system:admin", "X-Remote-Group: system:masters", "X-Remote-Extra-Scopes: all"):
        code, body = cluster.curl("viewer", "/api/v1/namespaces/apps/pods", header)
        status = json.loads(body)
        assert code == 403 and status["kind"] == "Status" and status["code"] == 403, body
        assert "authenticating proxy" in status["message"], body
    code, body = cluster.curl("viewer", "/api/v1/namespaces/apps/pods")  # without them: allowed
    assert code == 200, body
    assert not any(r.header("x-remote-user") or r.header("x-remote-group") for r in cluster.kube.requests)
    assert not any(k.lower().startswith("x-remote-") for r in cluster.kube.requests for k, _ in r.headers)


def test_secret_values_are_masked_unless_revealed(cluster: Cluster) -> None:
    out = cluster.kubectl("secret-lister", "get", "secret", "db-creds", "-o", "json")
    assert out.returncode == 0, out.stderr
    secret = json.loads(out.stdout)
    assert secret["data"] and all(v == REDACTED_B64 for v in secret["data"].values())
    out = cluster.kubectl("secret-lister", "get", "secrets", "-o", "json")
    assert all(v == REDACTED_B64 for item in json.loads(out.stdout)["items"] for v in item["data"].values())
    out = cluster.kubectl("secret-lister", "describe", "secret", "db-creds")  # typed clients still decode it
    assert out.returncode == 0 and "db-creds" in out.stdout, out.stderr
    out = cluster.kubectl("secret-reader", "get", "secret", "db-creds", "-o", "json")
    revealed = json.loads(out.stdout)["data"]
    assert all(v != REDACTED_B64 for v in revealed.values())
    stored = cluster.kube.get_object("secrets", "db-creds", "apps")
    assert stored is not None and revealed == stored["data"]


def test_applied_secret_values_are_masked_in_table_rows(cluster: Cluster) -> None:
    # `kubectl apply` keeps the whole Secret in an annotation, and the Table kubectl asks for carries each
    # row's metadata (PartialObjectMetadata, no kind Secret): its values reached kubectl unmasked.
    applied = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "applied", "namespace": "apps"},
        "data": {"pw": base64.b64encode(b"applied-pw-value").decode()},
    }
    annotations = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied)}
    cluster.kube.put_object({**applied, "metadata": {**applied["metadata"], "annotations": annotations}})
    try:
        out = cluster.kubectl("secret-lister", "get", "secrets", "-v=9")
        assert out.returncode == 0 and "applied" in out.stdout, out.stderr
        assert "PartialObjectMetadata" in out.stderr  # the Table kubectl read, as its log shows it
        assert applied["data"]["pw"] not in out.stderr and REDACTED_B64 in out.stderr
    finally:
        cluster.kube.delete_object("secrets", "applied", "apps")


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
def test_a_list_too_large_to_mask_is_a_status_kubectl_prints(cluster: Cluster, chunked: bool) -> None:
    # A Secret list is masked as one document, up to http_buffer_limit: a larger one was relayed as a 200 cut
    # short (kubectl: "unexpected EOF"), with no word of why or what to do. The API server writes a large list
    # chunked, of unknown length, as well as sized.

    def refused() -> list[dict[str, Any]]:
        out = lictor(
            "audit", "list", "--json", "--kind", "http.response_refused", "--state-dir", str(cluster.gw.state_dir)
        ).stdout
        return [e for e in map(json.loads, out.splitlines()) if e["url"].startswith("/api/v1/namespaces/apps/secrets?")]

    before = len(refused())
    value = base64.b64encode(b"v" * 2048).decode()
    names = [f"bulk-{i}" for i in range(150)]  # about 420 KiB as a list
    for name in names:
        cluster.kube.put_object(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": "apps"},
                "data": {"v": value},
            }
        )
    cluster.kube.chunk_over = 2048 if chunked else None
    try:
        out = cluster.kubectl("secret-lister", "get", "secrets", "-o", "json")
    finally:
        cluster.kube.chunk_over = None
        for name in names:
            cluster.kube.delete_object("secrets", name, "apps")
    assert out.returncode == 1 and "bulk-" not in out.stdout, out.stdout[:300]  # kubectl prints an empty List
    assert out.stderr.startswith("Error from server (BadGateway): lictor: the response ("), out.stderr
    assert f"is larger than the {BUFFER_LIMIT} bytes this gateway masks as one JSON document" in out.stderr
    assert "--chunk-size" in out.stderr and "--field-selector" in out.stderr, out.stderr
    assert value not in out.stderr
    code, body = cluster.curl("secret-lister", "/api/v1/namespaces/apps/secrets")
    assert code == 200 and len(json.loads(body)["items"]) < 10  # the same list, smaller, is relayed
    wait_until(lambda: len(refused()) > before, 20, "the refusal's audit event")
    assert refused()[-1]["rule"] == "lictor:response-too-large"


def test_a_deny_on_one_secret_is_not_dodged_by_listing_them_all(cluster: Cluster) -> None:
    # secret-reader may see the values of Secrets in apps, but never root-key's: listing them all returned it
    root = base64.b64encode(b"root-key-material").decode()
    cluster.kube.put_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "root-key", "namespace": "apps"},
            "data": {"k": root},
        }
    )
    try:
        out = cluster.kubectl("secret-reader", "get", "secret", "root-key", "-o", "json")
        assert out.returncode == 0 and json.loads(out.stdout)["data"] == {"k": REDACTED_B64}, out.stderr
        for args in (
            ["get", "secrets", "-o", "json"],
            ["get", "secrets", "--watch", "--request-timeout=2s", "-o", "json"],
        ):
            out = cluster.kubectl("secret-reader", *args)
            assert "root-key" in out.stdout and root not in out.stdout, (out.stdout, out.stderr)
        out = cluster.kubectl("secret-reader", "get", "secret", "db-creds", "-o", "json")  # the others still are
        assert json.loads(out.stdout)["data"]["password"] != REDACTED_B64
    finally:
        cluster.kube.delete_object("secrets", "root-key", "apps")


def test_a_deny_on_one_namespace_is_not_dodged_by_listing_all_of_them(cluster: Cluster) -> None:
    cluster.kube.put_object(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "etcd-0", "namespace": "kube-system"}, "spec": {}}
    )
    try:
        out = cluster.kubectl("deployer", "get", "pods", "-n", "kube-system")
        assert out.returncode == 1 and "t-no-system-pods" in out.stderr, out.stderr
        out = cluster.kubectl("deployer", "get", "pods", "--all-namespaces", "-o", "name")
        assert out.returncode == 1 and "t-no-system-pods" in out.stderr and "etcd-0" not in out.stdout, out
        out = cluster.kubectl("deployer", "get", "pods", "-n", "apps", "-o", "name")  # one namespace still is
        assert out.returncode == 0 and "web-0" in out.stdout, out.stderr
    finally:
        cluster.kube.delete_object("pods", "etcd-0", "kube-system")


def test_masked_secret_values_are_not_written_back(cluster: Cluster) -> None:
    out = cluster.kubectl("secret-writer", "create", "secret", "generic", "round-trip", "--from-literal=pw=real-value")
    assert out.returncode == 0, out.stderr
    copy = cluster.kubectl("secret-writer", "get", "secret", "round-trip", "-o", "yaml").stdout
    assert REDACTED_B64 in copy
    out = cluster.kubectl("secret-writer", "replace", "--validate=false", "-f", "-", stdin=copy)
    assert out.returncode == 1 and "Secret values that Lictor masked" in out.stderr, out.stderr
    assert not cluster.upstream("PUT", "/secrets/round-trip$")
    stored = cluster.kube.get_object("secrets", "round-trip", "apps")
    assert stored is not None and base64.b64decode(stored["data"]["pw"]) == b"real-value"
    # writing real values still works
    out = cluster.kubectl("secret-writer", "patch", "secret", "round-trip", "-p", '{"stringData":{"pw":"next"}}')
    assert out.returncode == 0, out.stderr


def test_secret_values_written_by_patches_are_not_recorded(cluster: Cluster) -> None:
    # A patch carries the values without the Secret around them: the recording kept them in clear.
    out = cluster.kubectl("secret-writer", "create", "secret", "generic", "patched", "--from-literal=pw=first")
    assert out.returncode == 0, out.stderr
    written = {
        "merge": base64.b64encode(b"merge-patched-value").decode(),
        "json": base64.b64encode(b"json-patched-value").decode(),
        "string": "string-data-value",
    }
    patches = [
        ("strategic", json.dumps({"data": {"pw": written["merge"]}})),
        ("json", json.dumps([{"op": "replace", "path": "/data/pw", "value": written["json"]}])),
        ("merge", json.dumps({"stringData": {"extra": written["string"]}})),
    ]
    for kind, patch in patches:
        out = cluster.kubectl("secret-writer", "patch", "secret", "patched", "--type", kind, "-p", patch)
        assert out.returncode == 0, out.stderr
    stored = cluster.kube.get_object("secrets", "patched", "apps")
    assert stored is not None and stored["data"]["pw"] == written["json"]
    sessions = cluster.gw.state_dir / "recordings" / "sessions"

    def recorded() -> str:
        return "".join(p.read_text() for p in sessions.rglob("*.jsonl"))

    def patch_records() -> int:
        return sum('"method":"PATCH"' in line and "/secrets/patched" in line for line in recorded().splitlines())

    wait_until(lambda: patch_records() >= 3, 20, "the patches' recordings")
    text = recorded()
    assert '"request_body":' in text and REDACTED_B64 in text
    for value in written.values():
        assert value not in text


def test_watched_secrets_are_masked_as_they_stream(cluster: Cluster) -> None:
    proc = cluster.popen("secret-lister", "get", "secrets", "--watch", "--output-watch-events", "-o", "json")
    try:
        lines = Lines(proc)
        cluster.kube.put_object(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "fresh", "namespace": "apps"},
                "data": {"token": base64.b64encode(b"super-secret-token").decode()},
            }
        )
        event = json.loads(lines.until('"name":"fresh"', partial=True)[-1])  # one event per line
        assert event["type"] == "ADDED" and event["object"]["data"] == {"token": REDACTED_B64}
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_auth_whoami_says_who_the_agent_is_to_lictor(cluster: Cluster) -> None:
    # Forwarded (or refused), the review described the gateway's own account, or nothing at all.
    out = cluster.kubectl("viewer", "auth", "whoami")
    assert out.returncode == 0, out.stderr
    assert re.search(r"Username\s+viewer-1", out.stdout), out.stdout
    assert re.search(r"Groups\s+\[.*\bviewer\b", out.stdout), out.stdout
    doc = json.loads(cluster.kubectl("deployer", "auth", "whoami", "-o", "json").stdout)
    assert doc["kind"] == "SelfSubjectReview" and doc["status"]["userInfo"]["username"] == "deployer-1"
    assert doc["status"]["userInfo"]["extra"]["lictor.dev/issuer"] == ["lictor"]
    assert cluster.upstream(pattern="selfsubjectreviews") == []


def test_auth_can_i_answers_from_lictors_policy_for_the_agent(cluster: Cluster) -> None:
    # Forwarded, the review would be answered for the gateway's own account; Lictor answers for the agent.
    def can_i(role: str, *args: str) -> tuple[int, str]:
        out = cluster.kubectl(role, "auth", "can-i", *args)
        return out.returncode, out.stdout.strip() + out.stderr.strip()

    assert can_i("viewer", "get", "pods") == (0, "yes")
    assert can_i("viewer", "list", "deployments", "-n", "apps") == (0, "yes")
    code, text = can_i("viewer", "get", "secrets")
    assert code == 1 and text.startswith("no - Lictor denies it"), text
    code, text = can_i("viewer", "create", "pods/exec", "-n", "apps")
    assert code == 1 and text.startswith("no"), text
    assert can_i("deployer", "patch", "deployments", "-n", "apps") == (0, "yes")
    code, text = can_i("deployer", "create", "deployments", "-n", "default")
    assert code == 1 and "no rule allows create deployments.apps -n default" in text, text
    code, text = can_i("deployer", "delete", "deployments", "-n", "apps")
    assert code == 1 and "only with a human's approval" in text, text
    assert cluster.upstream(pattern="selfsubjectaccessreviews") == []
    # the review is audited as what it asked
    out = lictor("audit", "list", "--state-dir", str(cluster.gw.state_dir), "--kind", "decision", "--json").stdout
    reviews = [e for e in map(json.loads, out.splitlines()) if e["rule_ids"] == ["lictor:access-review"]]
    summaries = [e["request"]["summary"] for e in reviews]
    assert "can-i delete deployments.apps -n apps -> approve" in summaries, summaries
    assert "can-i get secrets -n apps -> deny" in summaries, summaries


def test_auth_can_i_list_is_refused_with_what_to_ask_instead(cluster: Cluster) -> None:
    # Allowed (t-rules-review), the review was forwarded: the cluster listed the gateway's own permissions as if
    # they were the agent's.
    out = cluster.kubectl("viewer", "auth", "can-i", "--list", "-n", "apps")
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("Error from server (Forbidden): lictor: kubectl auth can-i --list is not answered"), (
        out.stderr
    )
    assert "rule lictor:rules-review" in out.stderr and "kubectl auth can-i VERB RESOURCE" in out.stderr, out.stderr
    assert cluster.upstream(pattern="selfsubjectrulesreviews") == []
    out = cluster.kubectl("deployer", "auth", "can-i", "--list")  # no rule allows it: the same answer
    assert out.returncode == 1 and "rule lictor:rules-review" in out.stderr, out.stderr

    def reviews() -> list[dict[str, Any]]:
        out = lictor("audit", "list", "--state-dir", str(cluster.gw.state_dir), "--kind", "decision", "--json").stdout
        return [e for e in map(json.loads, out.splitlines()) if e["rule_ids"] == ["lictor:rules-review"]]

    wait_until(lambda: len(reviews()) >= 2, 20, "the refusals' audit events")
    assert {e["action"] for e in reviews()} == {"deny"}


def test_service_account_tokens_reach_the_agent_but_not_the_recording(cluster: Cluster) -> None:
    # A TokenRequest's answer and a TokenReview (request and answer) hold a live token: recorded in clear before.
    out = cluster.kubectl("token-issuer", "create", "token", "default", "--duration=1h")
    assert out.returncode == 0, out.stderr
    issued = out.stdout.strip()
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", issued), issued
    assert cluster.upstream("POST", "/namespaces/apps/serviceaccounts/default/token$")
    out = cluster.kubectl("token-issuer", "create", "token", "default", "--audience=vault", "-o", "json")
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout)["status"]["token"]
    review = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": issued}})
    code, body = cluster.curl(
        "token-issuer",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        "Content-Type: application/json",
        data=review,
    )
    assert code == 201, body
    answer = json.loads(body)
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == "system:serviceaccount:apps:default"
    assert answer["spec"]["token"] == issued
    # still refused where no rule allows it
    out = cluster.kubectl("viewer", "create", "token", "default")
    assert out.returncode == 1 and "lictor: no rule allows create serviceaccounts/default" in out.stderr, out.stderr

    sessions = cluster.gw.state_dir / "recordings" / "sessions"

    def recorded(path: str) -> list[dict[str, Any]]:
        lines = "".join(p.read_text() for p in sessions.rglob("*.jsonl")).splitlines()
        events = [json.loads(line) for line in lines if path in line]
        return [e["data"] for e in events if e["kind"] == "http" and e["data"].get("url") == path]

    token_path = "/api/v1/namespaces/apps/serviceaccounts/default/token"
    review_path = "/apis/authentication.k8s.io/v1/tokenreviews"
    wait_until(lambda: len(recorded(token_path)) >= 3, 20, "the token requests' recordings")
    wait_until(lambda: recorded(review_path), 20, "the review's recording")
    (reviewed,) = recorded(review_path)
    assert json.loads(reviewed["request_body"])["spec"]["token"] == "[REDACTED:lictor]"
    assert json.loads(reviewed["response_body"])["spec"]["token"] == "[REDACTED:lictor]"
    assert json.loads(reviewed["response_body"])["status"]["authenticated"] is True
    created = [r for r in recorded(token_path) if r.get("status") == 201]
    assert len(created) == 2
    for record in created:
        assert json.loads(record["response_body"])["status"]["token"] == "[REDACTED:lictor]"
    for path in cluster.gw.state_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for token in (issued, second):
                assert token.encode() not in content, path
                assert token.split(".")[2].encode() not in content, path


def test_kubectl_gets_a_fresh_token_from_its_credential_plugin_when_its_token_expires(cluster: Cluster) -> None:
    # A token past its expiry but within the identity leeway was refused with a 403, on which kubectl gives up;
    # its credential plugins (as OAuth clients) are asked for a fresh token on a 401 only, as the API server
    # answers an expired one.
    work = cluster.gw.workdir / "exec-plugin"
    work.mkdir()
    tokens = [cluster.gw.token("viewer-exec", role="viewer", ttl="2s"), cluster.gw.token("viewer-exec", role="viewer")]
    calls = work / "calls"
    plugin = work / "plugin.py"
    plugin.write_text(
        "import json, pathlib, sys\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "n = int(calls.read_text()) if calls.exists() else 0\n"
        "calls.write_text(str(n + 1))\n"
        f"token = {tokens!r}[min(n, 1)]\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': {'token': token}}))\n"
    )
    config = yaml.safe_load(cluster.kubeconfigs["viewer"].read_text())
    config["users"][0]["user"] = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    payload = tokens[0].split(".")[1]
    expires = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
    while time.time() <= expires + 0.5:  # expired, and within the gateway's leeway
        time.sleep(0.2)
    proc = cluster.kubectl("viewer", "get", "pods", "-o", "name", KUBECONFIG=str(kubeconfig))
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text() == "2", "kubectl did not ask its plugin for a fresh token"
