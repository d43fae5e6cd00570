"""The Kubernetes-API test server (tests/kubeapi.py) against the real kubectl, and over raw HTTP."""

import base64
import json
import os
import queue
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary
from tests.kubeapi import PROTOBUF, KubeAPIServer, protobuf_to_object

TIMEOUT = 20


@pytest.fixture
def kubeapi() -> Iterator[KubeAPIServer]:
    with KubeAPIServer() as server:
        yield server
        assert server.errors == []


@pytest.fixture
def kubectl_path() -> str:
    return require_binary("kubectl")  # skipped if missing, but fails under CI


class Kubectl:
    def __init__(self, binary: str, server: KubeAPIServer, directory: Path, token: str | None = None) -> None:
        self.binary = binary
        self.kubeconfig = server.write_kubeconfig(directory / "kubeconfig", token=token)
        self.cache = directory / "cache"
        self.env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), HOME=str(directory))

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--request-timeout=10s", f"--cache-dir={self.cache}", *args]

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env, input=input, capture_output=True, text=True, timeout=TIMEOUT
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self(*args, input=input)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def popen(self, *args: str) -> "Streaming":
        return Streaming(
            subprocess.Popen(self.argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )


class Streaming:
    """A running kubectl whose stdout lines can be read with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def line(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            stderr = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                stderr = self.proc.stderr.read()
            raise AssertionError(f"no output from kubectl within {timeout}s (exit {self.proc.poll()}): {stderr}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def kubectl(kubectl_path: str, kubeapi: KubeAPIServer, tmp_path: Path) -> Kubectl:
    return Kubectl(kubectl_path, kubeapi, tmp_path)


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


# ------------------------------------------------------------------------------------------ real kubectl


def test_version(kubectl: Kubectl) -> None:
    out = kubectl.ok("version")
    assert "Server Version: v1.32.4" in out


def test_get_namespaces_as_a_table(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    rows = _rows(kubectl.ok("get", "ns"))
    assert rows[0] == ["NAME", "STATUS", "AGE"]
    assert [(r[0], r[1]) for r in rows[1:]] == [("apps", "Active"), ("default", "Active"), ("kube-system", "Active")]
    listing = kubeapi.find_requests("GET", "/api/v1/namespaces")[-1]
    assert "as=Table" in (listing.header("accept") or "")
    assert listing.header("authorization") == f"Bearer {kubeapi.token}"


def test_get_pods_wide(kubectl: Kubectl) -> None:
    rows = _rows(kubectl.ok("get", "pods", "-n", "apps"))
    assert rows[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert rows[1][:4] == ["web-0", "1/1", "Running", "0"]
    wide = kubectl.ok("get", "pods", "-n", "apps", "-o", "wide")
    assert wide.splitlines()[0].split()[5:7] == ["IP", "NODE"]
    assert "node-1" in wide.splitlines()[1]


def test_get_pod_json(kubectl: Kubectl) -> None:
    pod = json.loads(kubectl.ok("get", "pod", "web-0", "-n", "apps", "-o", "json"))
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["name"] == "web-0"
    assert pod["metadata"]["namespace"] == "apps"
    assert pod["spec"]["containers"][0]["name"] == "web"
    assert pod["status"]["phase"] == "Running"


def test_get_secret_yaml(kubectl: Kubectl) -> None:
    secret = yaml.safe_load(kubectl.ok("get", "secret", "db-creds", "-n", "apps", "-o", "yaml"))
    assert secret["kind"] == "Secret"
    assert base64.b64decode(secret["data"]["username"]) == b"app"
    assert base64.b64decode(secret["data"]["password"]) == b"s3cr3t-p4ss"


def test_get_missing_pod_is_a_not_found_status(kubectl: Kubectl) -> None:
    result = kubectl("get", "pod", "nope", "-n", "apps")
    assert result.returncode == 1
    assert 'pods "nope" not found' in result.stderr


def test_create_deployment(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    assert kubectl.ok("create", "deployment", "x", "--image=nginx", "-n", "apps").strip() == (
        "deployment.apps/x created"
    )
    created = kubeapi.get_object("deployments", "x", "apps")
    assert created is not None
    assert created["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx"
    assert created["spec"]["selector"] == {"matchLabels": {"app": "x"}}
    assert created["metadata"]["uid"] and created["metadata"]["resourceVersion"]
    again = kubectl("create", "deployment", "x", "--image=nginx", "-n", "apps")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_create_other_kinds(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    kubectl.ok("create", "namespace", "extra")
    kubectl.ok("create", "secret", "generic", "s1", "--from-literal=token=abc", "-n", "extra")
    kubectl.ok("create", "configmap", "c1", "--from-literal=k=v", "-n", "extra")
    kubectl.ok("create", "service", "clusterip", "svc1", "--tcp=80:8080", "-n", "extra")
    kubectl.ok("run", "p1", "--image=busybox", "--env=A=B", "-n", "extra", "--restart=Never", "--", "sleep", "1")
    secret = kubeapi.get_object("secrets", "s1", "extra")
    assert secret is not None and base64.b64decode(secret["data"]["token"]) == b"abc"
    config_map = kubeapi.get_object("configmaps", "c1", "extra")
    assert config_map is not None and config_map["data"] == {"k": "v"}
    service = kubeapi.get_object("services", "svc1", "extra")
    assert service is not None
    assert service["spec"]["ports"][0]["port"] == 80 and service["spec"]["ports"][0]["targetPort"] == 8080
    pod = kubeapi.get_object("pods", "p1", "extra")
    assert pod is not None
    assert pod["spec"]["containers"][0]["args"] == ["sleep", "1"]
    assert pod["spec"]["containers"][0]["env"] == [{"name": "A", "value": "B"}]
    assert "svc1" in kubectl.ok("get", "all", "-n", "extra")


def test_scale_and_patch_deployment(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    assert "scaled" in kubectl.ok("scale", "deployment", "web", "-n", "apps", "--replicas=2")
    deployment = kubeapi.get_object("deployments", "web", "apps")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    out = kubectl.ok("patch", "deployment", "web", "-n", "apps", "-p", '{"spec":{"replicas":3}}')
    assert out.strip() == "deployment.apps/web patched"
    deployment = kubeapi.get_object("deployments", "web", "apps")
    assert deployment is not None and deployment["spec"]["replicas"] == 3
    patch = kubeapi.find_requests("PATCH", "/apis/apps/v1/namespaces/apps/deployments/web")[-1]
    assert patch.header("content-type") == "application/strategic-merge-patch+json"
    assert json.loads(patch.body) == {"spec": {"replicas": 3}}
    assert _rows(kubectl.ok("get", "deploy", "web", "-n", "apps"))[1][1] == "3/3"


def test_delete_deployment(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    assert kubectl.ok("delete", "deployment", "web", "-n", "apps").strip() == 'deployment.apps "web" deleted'
    assert kubeapi.get_object("deployments", "web", "apps") is None
    assert "No resources found" in kubectl("get", "deployments", "-n", "apps").stderr


def test_logs(kubectl: Kubectl) -> None:
    assert kubectl.ok("logs", "web-0", "-n", "apps") == "starting web-0\nlistening on :8080\nGET /healthz 200\n"
    assert kubectl.ok("logs", "web-0", "-n", "apps", "--tail=1") == "GET /healthz 200\n"


def test_logs_follow_streams_new_lines(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    follow = kubectl.popen("logs", "-f", "web-0", "-n", "apps")
    try:
        assert [follow.line() for _ in range(3)][-1] == "GET /healthz 200\n"
        kubeapi.append_log("apps", "web-0", "a later line")
        assert follow.line() == "a later line\n"
        assert follow.proc.poll() is None
    finally:
        follow.stop()


def test_exec_echo(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    result = kubectl("exec", "web-0", "-n", "apps", "--", "echo", "hello")
    assert (result.returncode, result.stdout) == (0, "hello\n")
    exec_request = kubeapi.find_requests(path="/api/v1/namespaces/apps/pods/web-0/exec")[-1]
    assert exec_request.header("upgrade") == "websocket"
    assert "v5.channel.k8s.io" in (exec_request.header("sec-websocket-protocol") or "")
    assert exec_request.query["command"] == ["echo", "hello"]


def test_exec_cat_with_stdin(kubectl: Kubectl) -> None:
    text = "first line\nsecond line\n" + "x" * 100_000 + "\n"
    result = kubectl("exec", "-i", "web-0", "-n", "apps", "--", "cat", input=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text


def test_exec_exit_code_and_stderr(kubectl: Kubectl) -> None:
    result = kubectl("exec", "web-0", "-n", "apps", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3
    assert "command terminated with exit code 3" in result.stderr
    result = kubectl("exec", "web-0", "-n", "apps", "--", "sh", "-c", "echo out; echo oops >&2; false")
    assert (result.returncode, result.stdout) == (1, "out\n")
    assert result.stderr.startswith("oops\n")


def test_exec_unknown_pod(kubectl: Kubectl) -> None:
    result = kubectl("exec", "nope", "-n", "apps", "--", "echo", "hello")
    assert result.returncode == 1
    assert 'pods "nope" not found' in result.stderr


def test_watch_pods(kubectl: Kubectl, kubeapi: KubeAPIServer) -> None:
    watch = kubectl.popen("get", "pods", "-n", "apps", "--watch")
    try:
        assert watch.line().split()[:2] == ["NAME", "READY"]
        assert watch.line().split()[0] == "web-0"
        kubeapi.put_object(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "apps"},
                "spec": {"containers": [{"name": "web", "image": "nginx"}]},
            }
        )
        assert watch.line().split()[:3] == ["web-1", "1/1", "Running"]
    finally:
        watch.stop()
    watches = [r for r in kubeapi.requests if r.query.get("watch") == ["true"]]
    assert watches and watches[0].path == "/api/v1/namespaces/apps/pods"


def test_wrong_token_is_refused(kubectl_path: str, kubeapi: KubeAPIServer, tmp_path: Path) -> None:
    bad = Kubectl(kubectl_path, kubeapi, tmp_path, token="not-the-token")
    result = bad("get", "pods", "-n", "apps")
    assert result.returncode == 1
    assert "provide credentials" in result.stderr or "Unauthorized" in result.stderr
    assert all(r.header("authorization") != f"Bearer {kubeapi.token}" for r in kubeapi.requests)


# ------------------------------------------------------------------------------------------ raw HTTP


def _call(
    server: KubeAPIServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(server.ca_path))
    data = json.dumps(body).encode() if body is not None else None
    all_headers = {"Authorization": f"Bearer {token or server.token}", **(headers or {})}
    if data is not None:
        all_headers["Content-Type"] = content_type
    request = urllib.request.Request(server.url + path, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=TIMEOUT) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def test_missing_token_is_a_401_status(kubeapi: KubeAPIServer) -> None:
    status, body = _call(kubeapi, "GET", "/api/v1/namespaces/apps/pods", token="wrong")
    assert status == 401
    assert body["kind"] == "Status" and body["reason"] == "Unauthorized"
    recorded = kubeapi.requests[-1]
    assert (recorded.method, recorded.path, recorded.header("Authorization")) == (
        "GET",
        "/api/v1/namespaces/apps/pods",
        "Bearer wrong",
    )


def test_list_update_conflict_and_json_patch(kubeapi: KubeAPIServer) -> None:
    status, pods = _call(kubeapi, "GET", "/api/v1/namespaces/apps/pods")
    assert status == 200 and pods["kind"] == "PodList" and pods["metadata"]["resourceVersion"]
    status, cm = _call(
        kubeapi,
        "POST",
        "/api/v1/namespaces/apps/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}},
    )
    assert status == 201 and cm["metadata"]["namespace"] == "apps"
    stale = json.loads(json.dumps(cm))
    cm["data"]["a"] = "2"
    status, updated = _call(kubeapi, "PUT", "/api/v1/namespaces/apps/configmaps/c", cm)
    assert status == 200 and updated["data"] == {"a": "2"}
    status, conflict = _call(kubeapi, "PUT", "/api/v1/namespaces/apps/configmaps/c", stale)
    assert status == 409 and conflict["reason"] == "Conflict"
    ops = [{"op": "add", "path": "/data/b", "value": "3"}, {"op": "remove", "path": "/data/a"}]
    status, patched = _call(
        kubeapi, "PATCH", "/api/v1/namespaces/apps/configmaps/c", ops, content_type="application/json-patch+json"
    )
    assert status == 200 and patched["data"] == {"b": "3"}
    status, bad = _call(
        kubeapi, "PATCH", "/api/v1/namespaces/apps/configmaps/c", {}, content_type="application/apply-patch+cbor"
    )
    assert status == 415 and bad["reason"] == "UnsupportedMediaType"
    # server-side apply: merged into the live object, or created
    applied = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"c": "4"}}
    for name, code in (("c", 200), ("new", 201)):
        applied["metadata"]["name"] = name
        status, obj = _call(
            kubeapi, "PATCH", f"/api/v1/namespaces/apps/configmaps/{name}", applied,
            content_type="application/apply-patch+yaml",
        )  # fmt: skip
        assert status == code and obj["metadata"]["namespace"] == "apps", obj
    assert kubeapi.get_object("configmaps", "c", "apps")["data"] == {"b": "3", "c": "4"}
    assert kubeapi.get_object("configmaps", "new", "apps")["data"] == {"c": "4"}


def test_dry_run_and_deletecollection(kubeapi: KubeAPIServer) -> None:
    status, _ = _call(kubeapi, "DELETE", "/apis/apps/v1/namespaces/apps/deployments/web?dryRun=All")
    assert status == 200 and kubeapi.get_object("deployments", "web", "apps") is not None
    # as the API server: DeleteOptions in the body (what kubectl sends) decide, the query is then not read
    web = "/apis/apps/v1/namespaces/apps/deployments/web"
    status, _ = _call(kubeapi, "DELETE", web, {"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]})
    assert status == 200 and kubeapi.get_object("deployments", "web", "apps") is not None
    status, _ = _call(kubeapi, "DELETE", web + "?dryRun=All", {"kind": "DeleteOptions", "apiVersion": "v1"})
    assert status == 200 and kubeapi.get_object("deployments", "web", "apps") is None
    status, deleted = _call(kubeapi, "DELETE", "/api/v1/namespaces/apps/pods?labelSelector=app%3Dweb")
    assert status == 200 and [p["metadata"]["name"] for p in deleted["items"]] == ["web-0"]
    assert kubeapi.list_objects("pods", "apps") == []


def test_watch_replays_history_after_a_resource_version(kubeapi: KubeAPIServer) -> None:
    _, listing = _call(kubeapi, "GET", "/api/v1/namespaces/apps/secrets")
    since = listing["metadata"]["resourceVersion"]
    kubeapi.delete_object("secrets", "db-creds", "apps")
    context = ssl.create_default_context(cafile=str(kubeapi.ca_path))
    request = urllib.request.Request(
        f"{kubeapi.url}/api/v1/namespaces/apps/secrets?watch=1&resourceVersion={since}&timeoutSeconds=1",
        headers={"Authorization": f"Bearer {kubeapi.token}"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, context=context, timeout=TIMEOUT) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        events = [json.loads(line) for line in response]
    assert 0.9 < time.monotonic() - started < 5
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "db-creds")]


def test_spdy_exec_is_refused(kubeapi: KubeAPIServer) -> None:
    status, body = _call(
        kubeapi,
        "POST",
        "/api/v1/namespaces/apps/pods/web-0/exec?command=ls&stdout=true",
        headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": "v4.channel.k8s.io"},
    )
    assert status == 400
    assert "SPDY is not supported" in body["message"]


def test_protobuf_body_is_decoded() -> None:
    # A Namespace as kubectl 1.32 sends it: k8s magic, runtime.Unknown{typeMeta, raw}.
    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    meta = field(1, b"ns1") + field(3, b"") + field(11, field(1, b"team") + field(2, b"a"))
    raw = field(1, meta) + field(2, b"")
    body = b"k8s\x00" + field(1, field(1, b"v1") + field(2, b"Namespace")) + field(2, raw)
    assert protobuf_to_object(body) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "ns1", "labels": {"team": "a"}},
    }
    assert PROTOBUF == "application/vnd.kubernetes.protobuf"


@pytest.mark.parametrize("subprotocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_exec_channel_protocol(kubeapi: KubeAPIServer, subprotocol: str) -> None:
    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=str(kubeapi.ca_path))
    url = kubeapi.url.replace("https", "wss") + "/api/v1/namespaces/apps/pods/web-0/exec"
    stdin = subprotocol.startswith("v5")  # only v5 can tell the server that stdin is closed
    query = "?command=sh&command=-c&command=cat%3B+echo+err+%3E%262%3B+exit+7&stdout=true&stderr=true"
    query += "&stdin=true" if stdin else ""
    with connect(
        url + query,
        ssl=context,
        subprotocols=[subprotocol],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {kubeapi.token}"},
        open_timeout=TIMEOUT,
    ) as ws:
        assert ws.subprotocol == subprotocol
        if stdin:
            ws.send(b"\x00piped in\n")
            ws.send(b"\xff\x00")  # v5: close stdin
        frames: dict[int, bytes] = {}
        for message in ws:
            assert isinstance(message, bytes)
            frames[message[0]] = frames.get(message[0], b"") + message[1:]
    assert frames.get(1, b"") == (b"piped in\n" if stdin else b"")
    assert frames[2] == b"err\n"
    status = json.loads(frames[3])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
