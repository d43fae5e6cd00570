"""A small Kubernetes-API-compatible server for tests: the real ``kubectl`` talks to it as to a cluster.

It speaks the API server's wire format for what kubectl and the gateway tests need: discovery (``/version``,
``/api``, ``/apis``, ``/api/v1``, ``/apis/apps/v1``, ``/apis/authentication.k8s.io/v1``; OpenAPI answers 404,
which kubectl accepts but for validating a manifest: ``kubectl apply --validate=false``), and namespaces, pods
(with ``log`` and ``exec``), secrets, service accounts (with
``token``: a TokenRequest answered with a JWT-shaped token and its expiry, what ``kubectl create token`` asks
for), configmaps, services and deployments (with ``scale``), ``tokenreviews`` of the tokens it issued (create
only, answered with the review's spec and the account's user info), with get / list (``meta.k8s.io/v1``
``Table`` when asked) / watch (chunked JSON lines) / create / update / patch (strategic-merge and merge as a
recursive merge, JSON patch with copy and move, server-side apply as a merge or a create) / delete / deletecollection, label and field selectors, ``dryRun=All``, and ``Status`` errors. ``pods/NAME/exec`` runs a tiny fake shell over the
WebSocket channel protocol (``v5.channel.k8s.io``, ``v4.channel.k8s.io``); SPDY upgrades are refused. Files
that ``tar x`` extracts from stdin (what ``kubectl cp`` runs) are kept in :attr:`KubeAPIServer.files`.

Every request needs ``Authorization: Bearer <token>`` and is recorded (:attr:`KubeAPIServer.requests`) so
tests can assert what reached the upstream. State lives in memory. kubectl >= 1.32 sends the objects it builds
itself (``kubectl create deployment``, ``kubectl run``, ``kubectl create secret`` ...) as protobuf; the
fields those commands set are decoded (:func:`protobuf_to_object`). Answers are always JSON. Note that kubectl
never sends a bearer token over plain HTTP: use ``tls=False`` only behind something that adds the token.

In a test (``from tests.kubeapi import KubeAPIServer``)::

    @pytest.fixture
    def kubeapi():
        with KubeAPIServer() as server:  # TLS on a free 127.0.0.1 port, in a thread with its own loop
            yield server
    # server.url, server.ca_path, server.token, server.write_kubeconfig(path), server.requests ...

By hand: ``python tests/kubeapi.py --port 6443`` prints the URL, CA path, token and a kubeconfig path.
"""

import argparse
import asyncio
import base64
import contextlib
import copy
import datetime as dt
import http
import ipaddress
import json
import posixpath
import re
import secrets
import shlex
import signal
import ssl
import tarfile
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.frames import Opcode
from websockets.http11 import Request as WSRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

__all__ = ["DEFAULT_TOKEN", "KubeAPIServer", "RecordedRequest", "write_kubeconfig"]

DEFAULT_TOKEN = "kubeapi-test-token"
SERVER_VERSION = "v1.32.4"
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the server, before authentication."""

    method: str
    path: str  # raw (percent-encoded) path, without the query
    query: dict[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


# --------------------------------------------------------------------------------------------- TLS


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """Write a fresh CA and a server certificate for 127.0.0.1/localhost; return (ca, cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def write_kubeconfig(
    path: str | Path,
    server: str,
    token: str,
    ca_path: str | Path | None = None,
    *,
    namespace: str = "default",
) -> Path:
    """Write a kubeconfig for ``server`` with a bearer ``token``; verify TLS against ``ca_path`` if given."""
    cluster: Obj = {"server": server}
    if ca_path is not None:
        cluster["certificate-authority"] = str(ca_path)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
        "current-context": "test",
    }
    out = Path(path)
    out.write_text(json.dumps(config, indent=2))  # JSON is YAML
    out.chmod(0o600)
    return out


# --------------------------------------------------------------------------------------------- resources


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(timestamp: str | None) -> str:
    """Like kubectl's HumanDuration, close enough for tables."""
    if not timestamp:
        return "<unknown>"
    created = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    seconds = max(0, int((dt.datetime.now(dt.UTC) - created).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "string"
    format: str = ""
    priority: int = 0
    description: str = ""


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    resource: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    columns: tuple[Column, ...] = ()
    cells: Callable[[Obj], list[Any]] = field(default=lambda obj: [])
    subresources: tuple[Obj, ...] = ()
    verbs: tuple[str, ...] = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def discovery(self) -> list[Obj]:
        main: Obj = {
            "name": self.resource,
            "singularName": self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        return [main, *({"singularName": "", "namespaced": self.namespaced, **s} for s in self.subresources)]


_NAME_COL = Column("Name", format="name", description="Name must be unique within a namespace.")
_AGE_COL = Column("Age", type="string", description="CreationTimestamp of the object.")


def _pod_cells(pod: Obj) -> list[Any]:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    containers = pod.get("spec", {}).get("containers", [])
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(containers)}",
        pod.get("status", {}).get("phase", "Pending"),
        restarts,
        _age(pod["metadata"].get("creationTimestamp")),
        pod.get("status", {}).get("podIP", "<none>"),
        pod.get("spec", {}).get("nodeName", "<none>"),
        "<none>",
        "<none>",
    ]


def _service_cells(svc: Obj) -> list[Any]:
    spec = svc.get("spec", {})
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", [])) or "<none>"
    selector = ",".join(f"{k}={v}" for k, v in sorted(spec.get("selector", {}).items())) or "<none>"
    return [
        svc["metadata"]["name"],
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP", "<none>"),
        "<none>",
        ports,
        _age(svc["metadata"].get("creationTimestamp")),
        selector,
    ]


def _deployment_cells(dep: Obj) -> list[Any]:
    spec, status = dep.get("spec", {}), dep.get("status", {})
    containers = spec.get("template", {}).get("spec", {}).get("containers", [])
    labels = spec.get("selector", {}).get("matchLabels", {})
    return [
        dep["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        _age(dep["metadata"].get("creationTimestamp")),
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
        ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
    ]


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        ("ns",),
        columns=(_NAME_COL, Column("Status"), _AGE_COL),
        cells=lambda o: [
            o["metadata"]["name"],
            o.get("status", {}).get("phase", "Active"),
            _age(o["metadata"].get("creationTimestamp")),
        ],
        subresources=({"name": "namespaces/status", "kind": "Namespace", "verbs": ["get", "patch", "update"]},),
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        ("po",),
        ("all",),
        columns=(
            _NAME_COL,
            Column("Ready"),
            Column("Status"),
            Column("Restarts", type="integer"),
            _AGE_COL,
            Column("IP", priority=1),
            Column("Node", priority=1),
            Column("Nominated Node", priority=1),
            Column("Readiness Gates", priority=1),
        ),
        cells=_pod_cells,
        subresources=(
            {"name": "pods/exec", "kind": "PodExecOptions", "verbs": ["create", "get"]},
            {"name": "pods/log", "kind": "Pod", "verbs": ["get"]},
            {"name": "pods/status", "kind": "Pod", "verbs": ["get", "patch", "update"]},
        ),
    ),
    ResourceType(
        "",
        "v1",
        "secrets",
        "Secret",
        True,
        columns=(_NAME_COL, Column("Type"), Column("Data", type="integer"), _AGE_COL),
        cells=lambda o: [
            o["metadata"]["name"],
            o.get("type", "Opaque"),
            len(o.get("data") or {}),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    ResourceType(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        True,
        ("sa",),
        columns=(_NAME_COL, Column("Secrets", type="integer"), _AGE_COL),
        cells=lambda o: [
            o["metadata"]["name"],
            len(o.get("secrets") or []),
            _age(o["metadata"].get("creationTimestamp")),
        ],
        subresources=(
            {
                "name": "serviceaccounts/token",
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            },
        ),
    ),
    ResourceType(
        "",
        "v1",
        "configmaps",
        "ConfigMap",
        True,
        ("cm",),
        columns=(_NAME_COL, Column("Data", type="integer"), _AGE_COL),
        cells=lambda o: [
            o["metadata"]["name"],
            len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        True,
        ("svc",),
        ("all",),
        columns=(
            _NAME_COL,
            Column("Type"),
            Column("Cluster-IP"),
            Column("External-IP"),
            Column("Port(s)"),
            _AGE_COL,
            Column("Selector", priority=1),
        ),
        cells=_service_cells,
    ),
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        ("deploy",),
        ("all",),
        columns=(
            _NAME_COL,
            Column("Ready"),
            Column("Up-to-date", type="integer"),
            Column("Available", type="integer"),
            _AGE_COL,
            Column("Containers", priority=1),
            Column("Images", priority=1),
            Column("Selector", priority=1),
        ),
        cells=_deployment_cells,
        subresources=(
            {
                "name": "deployments/scale",
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            },
            {"name": "deployments/status", "kind": "Deployment", "verbs": ["get", "patch", "update"]},
        ),
    ),
    # Not stored: the API server answers a TokenReview it is sent (create only) and keeps nothing.
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, verbs=("create",)),
)
_BY_PATH = {(r.group, r.version, r.resource): r for r in RESOURCES}
_BY_NAME = {r.resource: r for r in RESOURCES}
_GROUPS = {"apps": "v1", "authentication.k8s.io": "v1"}
# The audience of tokens the server issues when a TokenRequest names none (the API server's --api-audiences).
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"


# --------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """Answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        out: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            out["details"] = self.details
        return out


def _not_found(rtype: ResourceType, name: str) -> APIError:
    return APIError(
        404,
        "NotFound",
        f'{rtype.qualified} "{name}" not found',
        {"name": name, "group": rtype.group, "kind": rtype.resource},
    )


def _bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------- selectors


def _label_matcher(selector: str) -> Callable[[Obj], bool]:
    """Parse a label selector (=, ==, !=, in, notin, exists, !exists)."""
    terms: list[str] = []
    depth, current = 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    checks: list[Callable[[dict[str, str]], bool]] = []
    for raw in terms:
        term = raw.strip()
        if not term:
            continue
        m = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
            continue
        m = re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w.-]*)", term)
        if m:
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        m = re.fullmatch(r"(!?)([\w./-]+)", term)
        if m:
            negate, key = m.group(1) == "!", m.group(2)
            checks.append(lambda labels, k=key, n=negate: (k in labels) != n)
            continue
        raise _bad_request(f"unable to parse requirement: {term!r}")
    return lambda obj: all(c(obj.get("metadata", {}).get("labels") or {}) for c in checks)


def _field_matcher(selector: str) -> Callable[[Obj], bool]:
    checks: list[Callable[[Obj], bool]] = []
    for raw in re.split(r"(?<!\\),", selector):
        term = raw.strip()
        if not term:
            continue
        m = re.fullmatch(r"([\w.]+)\s*(!=|==|=)\s*(.*)", term)
        if not m:
            raise _bad_request(f"invalid field selector: {term!r}")
        path, op, value = m.group(1), m.group(2), m.group(3).replace("\\,", ",").replace("\\=", "=")

        def lookup(obj: Obj, path: str = path) -> str:
            cur: Any = obj
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            return "" if cur is None else str(cur)

        if op == "!=":
            checks.append(lambda obj, f=lookup, v=value: f(obj) != v)
        else:
            checks.append(lambda obj, f=lookup, v=value: f(obj) == v)
    return lambda obj: all(c(obj) for c in checks)


# --------------------------------------------------------------------------------------------- patches


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch; used for strategic-merge patches too (lists are replaced, not merged)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue  # strategic-merge directives are not supported; ignore them
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise APIError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise _bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise _bad_request(f"invalid json patch operation {op!r}")
        parts = _pointer(op["path"])
        if not parts:
            raise APIError(422, "Invalid", "cannot patch the whole document")
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.get(part)
            if parent is None:
                raise APIError(422, "Invalid", f"path {op['path']!r} does not exist")
        last = parts[-1]
        kind = op["op"]
        if kind in ("copy", "move"):
            # as the API server's json-patch does: the value at "from", then an add of it at "path"
            source = _pointer(op.get("from", ""))
            if not source:
                raise APIError(422, "Invalid", "cannot copy or move the whole document")
            holder: Any = doc
            for part in source[:-1]:
                holder = holder[int(part)] if isinstance(holder, list) else holder.get(part)
                if holder is None:
                    raise APIError(422, "Invalid", f"path {op['from']!r} does not exist")
            try:
                key = int(source[-1]) if isinstance(holder, list) else source[-1]
                value = copy.deepcopy(holder[key])
                if kind == "move":
                    del holder[key]
            except (KeyError, IndexError, ValueError):
                raise APIError(422, "Invalid", f"{kind}: path {op['from']!r} does not exist") from None
            op = {"op": "add", "path": op["path"], "value": value}
            kind = "add"
        if kind in ("add", "replace"):
            value = copy.deepcopy(op.get("value"))
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, value)
                else:
                    parent[index] = value
            else:
                if kind == "replace" and last not in parent:
                    raise APIError(422, "Invalid", f"replace: path {op['path']!r} does not exist")
                parent[last] = value
        elif kind == "remove":
            try:
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            except (KeyError, IndexError, ValueError):
                raise APIError(422, "Invalid", f"remove: path {op['path']!r} does not exist") from None
        elif kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise APIError(422, "Invalid", f"test failed at {op['path']!r}")
        else:
            raise APIError(422, "Invalid", f"unsupported json patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------------------------- protobuf

# kubectl >= 1.32 sends built-in objects it generates itself (``kubectl create deployment``, ``kubectl run``,
# ``kubectl create secret`` ...) as protobuf. The schemas below name the fields of those objects that such
# commands set; other fields are skipped. A field is (json name, kind, message schema); kinds: str, bytes,
# int, int? (a pointer: kept even when zero), bool, msg, rep_str, rep_msg, map_str, map_bytes, intorstr.
PROTOBUF = "application/vnd.kubernetes.protobuf"
APPLY_PATCH = "application/apply-patch+yaml"
_PB_MAGIC = b"k8s\x00"
_PB: dict[str, dict[int, tuple[str, str, str]]] = {
    "Unknown": {1: ("typeMeta", "msg", "TypeMeta"), 2: ("raw", "bytes", "")},
    "TypeMeta": {1: ("apiVersion", "str", ""), 2: ("kind", "str", "")},
    "ObjectMeta": {
        1: ("name", "str", ""),
        2: ("generateName", "str", ""),
        3: ("namespace", "str", ""),
        11: ("labels", "map_str", ""),
        12: ("annotations", "map_str", ""),
        14: ("finalizers", "rep_str", ""),
    },
    "LabelSelector": {
        1: ("matchLabels", "map_str", ""),
        2: ("matchExpressions", "rep_msg", "LabelSelectorRequirement"),
    },
    "LabelSelectorRequirement": {1: ("key", "str", ""), 2: ("operator", "str", ""), 3: ("values", "rep_str", "")},
    "Deployment": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "DeploymentSpec")},
    "DeploymentSpec": {
        1: ("replicas", "int?", ""),
        2: ("selector", "msg", "LabelSelector"),
        3: ("template", "msg", "PodTemplateSpec"),
        4: ("strategy", "msg", "DeploymentStrategy"),
        5: ("minReadySeconds", "int", ""),
        6: ("revisionHistoryLimit", "int?", ""),
        7: ("paused", "bool", ""),
        9: ("progressDeadlineSeconds", "int?", ""),
    },
    "DeploymentStrategy": {1: ("type", "str", "")},
    "PodTemplateSpec": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "PodSpec")},
    "Pod": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "PodSpec")},
    "PodSpec": {
        2: ("containers", "rep_msg", "Container"),
        3: ("restartPolicy", "str", ""),
        4: ("terminationGracePeriodSeconds", "int?", ""),
        6: ("dnsPolicy", "str", ""),
        7: ("nodeSelector", "map_str", ""),
        8: ("serviceAccountName", "str", ""),
        10: ("nodeName", "str", ""),
        11: ("hostNetwork", "bool", ""),
        20: ("initContainers", "rep_msg", "Container"),
    },
    "Container": {
        1: ("name", "str", ""),
        2: ("image", "str", ""),
        3: ("command", "rep_str", ""),
        4: ("args", "rep_str", ""),
        5: ("workingDir", "str", ""),
        6: ("ports", "rep_msg", "ContainerPort"),
        7: ("env", "rep_msg", "EnvVar"),
        14: ("imagePullPolicy", "str", ""),
        16: ("stdin", "bool", ""),
        17: ("stdinOnce", "bool", ""),
        18: ("tty", "bool", ""),
    },
    "ContainerPort": {
        1: ("name", "str", ""),
        2: ("hostPort", "int", ""),
        3: ("containerPort", "int", ""),
        4: ("protocol", "str", ""),
    },
    "EnvVar": {1: ("name", "str", ""), 2: ("value", "str", "")},
    "ServiceAccount": {1: ("metadata", "msg", "ObjectMeta")},
    "TokenRequest": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "TokenRequestSpec")},
    "TokenRequestSpec": {
        1: ("audiences", "rep_str", ""),
        3: ("boundObjectRef", "msg", "BoundObjectReference"),
        4: ("expirationSeconds", "int?", ""),
    },
    "BoundObjectReference": {
        1: ("kind", "str", ""),
        2: ("apiVersion", "str", ""),
        3: ("name", "str", ""),
        4: ("uid", "str", ""),
    },
    "TokenReview": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "TokenReviewSpec")},
    "TokenReviewSpec": {1: ("token", "str", ""), 2: ("audiences", "rep_str", "")},
    "Namespace": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "rep_str", "")},
    "Secret": {
        1: ("metadata", "msg", "ObjectMeta"),
        2: ("data", "map_bytes", ""),
        3: ("type", "str", ""),
        4: ("stringData", "map_str", ""),
        5: ("immutable", "bool?", ""),
    },
    "ConfigMap": {
        1: ("metadata", "msg", "ObjectMeta"),
        2: ("data", "map_str", ""),
        3: ("binaryData", "map_bytes", ""),
        4: ("immutable", "bool?", ""),
    },
    "Service": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "ServiceSpec")},
    "ServiceSpec": {
        1: ("ports", "rep_msg", "ServicePort"),
        2: ("selector", "map_str", ""),
        3: ("clusterIP", "str", ""),
        4: ("type", "str", ""),
    },
    "ServicePort": {
        1: ("name", "str", ""),
        2: ("protocol", "str", ""),
        3: ("port", "int", ""),
        4: ("targetPort", "intorstr", ""),
        5: ("nodePort", "int", ""),
    },
}


def _pb_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise _bad_request("truncated protobuf varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _pb_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Split a protobuf message into (field number, value) pairs."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _pb_varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _pb_varint(data, i)
        elif wire == 2:
            length, i = _pb_varint(data, i)
            value, i = data[i : i + length], i + length
            if len(value) != length:
                raise _bad_request("truncated protobuf field")
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise _bad_request(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _pb_decode(data: bytes, schema: str) -> Obj:
    fields = _PB[schema]
    out: Obj = {}
    for number, value in _pb_fields(data):
        if number not in fields:
            continue
        name, kind, sub = fields[number]
        if isinstance(value, int):
            if value >= 1 << 63:
                value -= 1 << 64
            if kind in ("int", "int?"):
                out[name] = value
            elif kind in ("bool", "bool?"):
                out[name] = bool(value)
            continue
        if kind == "str":
            out[name] = value.decode()
        elif kind == "bytes":
            out[name] = value
        elif kind == "msg":
            out[name] = _pb_decode(value, sub)
        elif kind == "rep_str":
            out.setdefault(name, []).append(value.decode())
        elif kind == "rep_msg":
            out.setdefault(name, []).append(_pb_decode(value, sub))
        elif kind in ("map_str", "map_bytes"):
            entry = dict(_pb_fields(value))
            key, item = entry.get(1, b""), entry.get(2, b"")
            assert isinstance(key, bytes) and isinstance(item, bytes)
            text = base64.b64encode(item).decode() if kind == "map_bytes" else item.decode()
            out.setdefault(name, {})[key.decode()] = text
        elif kind == "intorstr":
            parts = dict(_pb_fields(value))
            text_value = parts.get(3, b"")
            if parts.get(1) == 1:
                out[name] = text_value.decode() if isinstance(text_value, bytes) else ""
            else:
                out[name] = parts.get(2, 0)
    # Go's JSON omits empty values that protobuf carries explicitly; pointers ("int?", "bool?") stay.
    return {k: v for k, v in out.items() if v not in ("", 0, False, {}, []) or _fields_kind(fields, k).endswith("?")}


def _fields_kind(fields: dict[int, tuple[str, str, str]], name: str) -> str:
    return next(kind for json_name, kind, _ in fields.values() if json_name == name)


def protobuf_to_object(body: bytes) -> Obj:
    """Decode a ``application/vnd.kubernetes.protobuf`` body into the JSON form of the object."""
    if not body.startswith(_PB_MAGIC):
        raise _bad_request("protobuf body without the k8s magic prefix")
    envelope = _pb_decode(body[len(_PB_MAGIC) :], "Unknown")
    type_meta = envelope.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    if kind not in _PB or kind in ("Unknown", "TypeMeta"):
        raise APIError(415, "UnsupportedMediaType", f"this server cannot decode {kind!r} from protobuf")
    obj = _pb_decode(envelope.get("raw", b""), kind)
    return {"apiVersion": type_meta.get("apiVersion", ""), "kind": kind, **obj}


# --------------------------------------------------------------------------------------------- store


@dataclass(eq=False)
class _Watcher:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Obj | None]
    rtype: ResourceType
    namespace: str
    match: Callable[[Obj], bool]

    def offer(self, event: Obj) -> None:
        obj = event["object"]
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return
        if not self.match(obj):
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _Store:
    """Objects by resource type, a global resourceVersion, an event history for watches."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.rv = 0
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {r.resource: {} for r in RESOURCES}
        self.history: deque[tuple[int, str, Obj]] = deque(maxlen=10_000)
        self.watchers: set[_Watcher] = set()
        self.logs: dict[tuple[str, str, str], list[str]] = {}
        self.log_listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str | None], tuple[str, str, str]]]
        self.log_listeners = set()
        self.tokens: dict[str, Obj] = {}  # issued service-account tokens: their claims

    def _event(self, rtype: ResourceType, kind: str, obj: Obj) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self.history.append((int(obj["metadata"]["resourceVersion"]), rtype.resource, event))
        for watcher in list(self.watchers):
            if watcher.rtype is rtype:
                watcher.offer(event)

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, rtype: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects[rtype.resource].get((namespace, name))
            if obj is None:
                raise _not_found(rtype, name)
            return copy.deepcopy(obj)

    def list(self, rtype: ResourceType, namespace: str, match: Callable[[Obj], bool]) -> tuple[list[Obj], str]:
        with self.lock:
            items = [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self.objects[rtype.resource].items())
                if (not namespace or ns == namespace) and match(o)
            ]
            return items, str(self.rv)

    def create(self, rtype: ResourceType, obj: Obj, *, dry_run: bool = False) -> Obj:
        with self.lock:
            meta = obj["metadata"]
            namespace = meta.get("namespace", "")
            if rtype.namespaced and ("", namespace) not in self.objects["namespaces"]:
                raise APIError(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    {"name": namespace, "kind": "namespaces"},
                )
            key = (namespace, meta["name"])
            if key in self.objects[rtype.resource]:
                raise APIError(
                    409,
                    "AlreadyExists",
                    f'{rtype.qualified} "{meta["name"]}" already exists',
                    {"name": meta["name"], "group": rtype.group, "kind": rtype.resource},
                )
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            if rtype.resource == "deployments":
                meta["generation"] = 1
            _default(rtype, obj, None)
            if dry_run:
                meta["resourceVersion"] = str(self.rv)
                return copy.deepcopy(obj)
            self._bump(obj)
            self.objects[rtype.resource][key] = obj
            if rtype.resource == "pods":
                for c in obj["spec"].get("containers", []):
                    self.logs.setdefault((namespace, meta["name"], c["name"]), [])
            self._event(rtype, "ADDED", obj)
            return copy.deepcopy(obj)

    def replace(self, rtype: ResourceType, obj: Obj, *, dry_run: bool = False) -> Obj:
        with self.lock:
            meta = obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            old = self.objects[rtype.resource].get(key)
            if old is None:
                raise _not_found(rtype, meta["name"])
            sent_rv = meta.get("resourceVersion")
            if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                raise APIError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rtype.qualified} "{meta["name"]}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    {"name": meta["name"], "group": rtype.group, "kind": rtype.resource},
                )
            for immutable in ("uid", "creationTimestamp"):
                meta[immutable] = old["metadata"][immutable]
            if rtype.resource == "deployments":
                meta["generation"] = old["metadata"].get("generation", 1)
                if obj.get("spec") != old.get("spec"):
                    meta["generation"] += 1
            _default(rtype, obj, old)
            if dry_run:
                meta["resourceVersion"] = old["metadata"]["resourceVersion"]
                return copy.deepcopy(obj)
            self._bump(obj)
            self.objects[rtype.resource][key] = obj
            self._event(rtype, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, rtype: ResourceType, namespace: str, name: str, *, dry_run: bool = False) -> Obj:
        with self.lock:
            obj = self.objects[rtype.resource].get((namespace, name))
            if obj is None:
                raise _not_found(rtype, name)
            if dry_run:
                return copy.deepcopy(obj)
            del self.objects[rtype.resource][(namespace, name)]
            if rtype.resource == "namespaces":
                for other in RESOURCES:
                    if other.namespaced:
                        for key in [k for k in self.objects[other.resource] if k[0] == name]:
                            self.delete(other, key[0], key[1])
            self._bump(obj)
            self._event(rtype, "DELETED", obj)
            return copy.deepcopy(obj)

    def append_log(self, namespace: str, pod: str, container: str, line: str) -> None:
        with self.lock:
            key = (namespace, pod, container)
            self.logs.setdefault(key, []).append(line)
            for loop, queue, listen_key in list(self.log_listeners):
                if listen_key == key:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(queue.put_nowait, line)


def _default(rtype: ResourceType, obj: Obj, old: Obj | None) -> None:
    """What controllers and admission would fill in, done at once."""
    meta = obj["metadata"]
    if rtype.resource == "namespaces":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj["status"] = {"phase": "Active"}
    elif rtype.resource == "pods":
        spec = obj.setdefault("spec", {})
        spec.setdefault("nodeName", "node-1")
        spec.setdefault("restartPolicy", "Always")
        if old is not None and "status" not in obj:
            obj["status"] = old.get("status", {})
        status = obj.setdefault("status", {})
        status.setdefault("phase", "Running")
        status.setdefault("podIP", f"10.244.0.{secrets.randbelow(200) + 10}")
        status.setdefault("hostIP", "172.18.0.2")
        status.setdefault("startTime", meta["creationTimestamp"])
        status.setdefault(
            "containerStatuses",
            [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "ready": status["phase"] == "Running",
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": meta["creationTimestamp"]}},
                }
                for c in spec.get("containers", [])
            ],
        )
    elif rtype.resource == "secrets":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None) or {}
        data = obj.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    elif rtype.resource == "services":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if old is not None:
            spec.setdefault("clusterIP", old.get("spec", {}).get("clusterIP"))
        spec.setdefault("clusterIP", f"10.96.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}")
        for port in spec.get("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif rtype.resource == "deployments":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        replicas = spec["replicas"]
        obj["status"] = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }
        if not replicas:
            obj["status"] = {"observedGeneration": meta.get("generation", 1)}


def _seed(store: _Store) -> None:
    ts = _now()
    for name in ("default", "kube-system", "apps"):
        store.create(_BY_NAME["namespaces"], {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        # what the service-account controller creates in every namespace
        store.create(
            _BY_NAME["serviceaccounts"],
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": name}},
        )
    store.create(
        _BY_NAME["pods"],
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-0",
                "namespace": "apps",
                "labels": {"app": "web"},
                "creationTimestamp": ts,
            },
            "spec": {
                "containers": [
                    {
                        "name": "web",
                        "image": "nginx:1.27",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "env": [{"name": "APP_ENV", "value": "production"}],
                    }
                ],
            },
        },
    )
    store.create(
        _BY_NAME["secrets"],
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db-creds", "namespace": "apps"},
            "type": "Opaque",
            "data": {
                "username": base64.b64encode(b"app").decode(),
                "password": base64.b64encode(b"s3cr3t-p4ss").decode(),
            },
        },
    )
    store.create(
        _BY_NAME["deployments"],
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "apps", "labels": {"app": "web"}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                },
            },
        },
    )
    for line in ("starting web-0", "listening on :8080", "GET /healthz 200"):
        store.append_log("apps", "web-0", "web", line)


# --------------------------------------------------------------------------------------------- HTTP


def _media(req: "_Request") -> str:
    return (req.header("content-type") or "").split(";")[0].strip().lower()


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def q(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[0] != "0" and values[0].lower() != "false"


class _ExecIO:
    """The fake process's view of its streams."""

    def __init__(self, send: Callable[[int, bytes], None], tty: bool) -> None:
        self._send = send
        self.tty = tty
        self.stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._stdin_done = False

    def out(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if data:
            self._send(1, data)

    def err(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if data:
            self._send(1 if self.tty else 2, data)

    def to_stderr(self) -> "_ExecIO":
        """The same streams with stdout sent to stderr (``>&2``)."""
        redirected = _ExecIO(lambda _channel, data: self.err(data), False)
        redirected.stdin = self.stdin
        redirected._stdin_done = self._stdin_done
        return redirected

    async def read(self) -> bytes | None:
        if self._stdin_done:
            return None
        data = await self.stdin.get()
        if data is None:
            self._stdin_done = True
        return data


class _ShellExit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


_FILES = {
    "/etc/os-release": 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\n',
    "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
}
_ROOT_LISTING = "bin\ndev\netc\nhome\nproc\nroot\ntmp\nusr\nvar\n"


class KubeAPIServer:
    """An in-memory Kubernetes API server on 127.0.0.1, in a background thread with its own event loop.

    :param token: the bearer token every request must carry (401 ``Status`` otherwise).
    :param tls: serve HTTPS with a fresh CA (``ca_path``) and certificate; plain HTTP if False.
    :param port: 0 picks a free port.
    :param seed: create namespaces default/apps/kube-system, pod apps/web-0, secret apps/db-creds and
        deployment apps/web.
    :param log_tick: while a ``follow=true`` log stream is open, append a ``tick N`` line to it every
        ``log_tick`` seconds (None: only lines added with :meth:`append_log` are streamed).
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        tls: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: bool = True,
        log_tick: float | None = None,
        version: str = SERVER_VERSION,
        workdir: str | Path | None = None,
    ) -> None:
        self.token = token
        self.tls = tls
        self.host = host
        self.port = port
        self.log_tick = log_tick
        # JSON answers larger than this many bytes are written chunked, without a Content-Length, as Go's net/http
        # writes a body the handler did not size (the API server's lists, once past 2 KiB); None: all sized.
        self.chunk_over: int | None = None
        self.version = version
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kubeapi-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca_path: Path | None = None
        self._store = _Store()
        self.files: dict[str, bytes] = {}  # what exec'd `tar x` (kubectl cp) extracted, by absolute path
        if seed:
            _seed(self._store)
        self._requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()
        self.errors: list[BaseException] = []  # unexpected exceptions while serving (answered with 500)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:43121``."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> "KubeAPIServer":
        """Start serving in a background thread; returns once the port is bound."""
        ssl_context = None
        if self.tls:
            self.ca_path, cert, key = _make_certificates(self.workdir)
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(cert, key)
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._thread = threading.Thread(target=self._run, args=(ssl_context,), name="kubeapi", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._startup_error is not None:
            raise RuntimeError("kubeapi server failed to start") from self._startup_error
        if not self._ready.is_set():
            raise RuntimeError("kubeapi server did not start in time")
        return self

    def _run(self, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._connection, self.host, self.port, ssl=ssl_context, limit=MAX_HEAD)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop serving, end open streams and connections, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=5)
            loop.stop()

        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
            thread.join(10)
        self._loop = self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "KubeAPIServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- test API

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    def find_requests(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """Recorded requests with this method and/or path (exact, raw), oldest first."""
        return [r for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)]

    def write_kubeconfig(self, path: str | Path, *, token: str | None = None, server: str | None = None) -> Path:
        """Write a kubeconfig pointing at this server (or ``server``) with this server's CA."""
        return write_kubeconfig(path, server or self.url, token or self.token, self.ca_path)

    def get_object(self, resource: str, name: str, namespace: str = "") -> Obj | None:
        """A copy of the stored object, or None. ``resource`` is the plural (pods, deployments, ...)."""
        try:
            return self._store.get(_BY_NAME[resource], namespace, name)
        except APIError:
            return None

    def list_objects(self, resource: str, namespace: str = "") -> list[Obj]:
        """Copies of the stored objects of a resource, in one namespace or ('') all."""
        return self._store.list(_BY_NAME[resource], namespace, lambda _: True)[0]

    def put_object(self, obj: Obj) -> Obj:
        """Create or replace an object (from its apiVersion/kind), emitting watch events."""
        rtype = next(r for r in RESOURCES if r.kind == obj["kind"] and r.api_version == obj["apiVersion"])
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        with self._store.lock:
            if (meta.get("namespace", ""), meta["name"]) in self._store.objects[rtype.resource]:
                meta.pop("resourceVersion", None)
                return self._store.replace(rtype, obj)
            return self._store.create(rtype, obj)

    def delete_object(self, resource: str, name: str, namespace: str = "") -> None:
        self._store.delete(_BY_NAME[resource], namespace, name)

    def append_log(self, namespace: str, pod: str, line: str, container: str | None = None) -> None:
        """Add a log line to a pod's container (its first container by default); followers receive it."""
        if container is None:
            pod_obj = self._store.get(_BY_NAME["pods"], namespace, pod)
            container = pod_obj["spec"]["containers"][0]["name"]
        self._store.append_log(namespace, pod, container, line)

    # ----------------------------------------------------------------------------------- connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                req = await self._read_request(reader, writer)
                if req is None:
                    break
                keep_alive = await self._handle(req, reader, writer)
                if not keep_alive or (req.header("connection") or "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            await self._send_raw(writer, 431, b"request header too large\n", "text/plain", close=True)
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ")
        except ValueError:
            await self._send_raw(writer, 400, b"bad request line\n", "text/plain", close=True)
            return None
        headers = []
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers.append((key.strip(), value.strip()))
        req = _Request(method, target, "", {}, headers, b"", head)
        split = urlsplit(target)
        req.path = split.path
        req.query = parse_qs(split.query, keep_blank_values=True)
        if (req.header("transfer-encoding") or "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if len(body) > MAX_BODY:
                    raise ConnectionError("body too large")
            req.body = bytes(body)
        else:
            length = int(req.header("content-length") or 0)
            if length > MAX_BODY:
                raise ConnectionError("body too large")
            req.body = await reader.readexactly(length) if length else b""
        with self._requests_lock:
            self._requests.append(RecordedRequest(method, split.path, req.query, tuple(headers), req.body))
        return req

    async def _send_raw(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        content_type: str,
        *,
        close: bool = False,
        head_only: bool = False,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        lines = [
            f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-cache, private",
            f"Date: {dt.datetime.now(dt.UTC).strftime('%a, %d %b %Y %H:%M:%S GMT')}",
            *(f"{k}: {v}" for k, v in extra),
        ]
        if close:
            lines.append("Connection: close")
        if self.chunk_over is not None and len(body) > self.chunk_over and not head_only:
            lines[2] = "Transfer-Encoding: chunked"
            parts = [body[i : i + 32768] for i in range(0, len(body), 32768)]
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        await writer.drain()

    async def _send_json(self, writer: asyncio.StreamWriter, code: int, obj: Obj, req: _Request) -> None:
        await self._send_raw(writer, code, json.dumps(obj).encode(), "application/json", head_only=req.method == "HEAD")

    async def _start_stream(self, writer: asyncio.StreamWriter, content_type: str) -> None:
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Content-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n"
            "Cache-Control: no-cache, private\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        chunks: AsyncIterator[bytes],
        timeout: float | None,
    ) -> None:
        """Write ``chunks`` as a chunked body until they end, the timeout passes or the client leaves."""

        async def write_all() -> None:
            async for data in chunks:
                if data:
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()

        writing = asyncio.ensure_future(write_all())
        client_gone = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({writing, client_gone}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            for task in (writing, client_gone):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(writing, client_gone, return_exceptions=True)
            await chunks.aclose()  # type: ignore[attr-defined]
        if client_gone in done:
            return
        if writing in done and writing.exception() is not None:
            return
        with contextlib.suppress(ConnectionError):
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    # ----------------------------------------------------------------------------------- routing

    async def _handle(self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection may be reused."""
        try:
            auth = req.header("authorization") or ""
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
                raise APIError(401, "Unauthorized", "Unauthorized")
            return await self._route(req, reader, writer)
        except APIError as exc:
            await self._send_json(writer, exc.code, exc.status(), req)
            return True
        except ValueError as exc:  # includes malformed JSON bodies and numbers
            await self._send_json(writer, 400, _bad_request(f"bad request: {exc}").status(), req)
            return True
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.errors.append(exc)
            await self._send_json(writer, 500, APIError(500, "InternalError", f"internal error: {exc!r}").status(), req)
            return False

    async def _route(self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        path = unquote(req.path)
        if path in ("/healthz", "/livez", "/readyz"):
            await self._send_raw(writer, 200, b"ok", "text/plain; charset=utf-8")
            return True
        if path == "/version":
            await self._send_json(writer, 200, self._version_info(), req)
            return True
        if path == "/api":
            await self._send_json(
                writer,
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                    ],
                },
                req,
            )
            return True
        if path == "/apis":
            groups = [
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
                    "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version},
                }
                for group, version in _GROUPS.items()
            ]
            await self._send_json(writer, 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}, req)
            return True
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in _GROUPS:
            version = {"groupVersion": f"{parts[1]}/{_GROUPS[parts[1]]}", "version": _GROUPS[parts[1]]}
            group_info = {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": parts[1],
                "versions": [version],
                "preferredVersion": version,
            }
            await self._send_json(writer, 200, group_info, req)
            return True
        if parts[0] == "api" and len(parts) >= 2 and parts[1] == "v1":
            group, rest = "", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3 and _GROUPS.get(parts[1]) == parts[2]:
            group, rest = parts[1], parts[3:]
        else:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            await self._send_json(writer, 200, self._resource_list(group), req)
            return True
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        rtype = _BY_PATH.get((group, "v1", rest[0]))
        if rtype is None or (namespace and not rtype.namespaced):
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else ""
        subresource = rest[2] if len(rest) > 2 else ""
        if rtype.resource == "namespaces":
            namespace = ""
        if name and rtype.namespaced and not namespace:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return await self._resource(req, reader, writer, rtype, namespace, name, subresource)

    def _version_info(self) -> Obj:
        major, minor = self.version.lstrip("v").split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": self.version,
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.23.8",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _resource_list(self, group: str) -> Obj:
        version = _GROUPS.get(group, "v1")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for r in RESOURCES if r.group == group for entry in r.discovery()],
        }

    async def _resource(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rtype: ResourceType,
        namespace: str,
        name: str,
        subresource: str,
    ) -> bool:
        method = req.method
        dry_run = req.query.get("dryRun", []) == ["All"]
        if method == "DELETE" and req.body:
            # as the API server: a delete's DeleteOptions come from its body when it has one (kubectl sends
            # {"dryRun": ["All"]} there), the query is then not read
            try:
                options = json.loads(req.body)
            except ValueError:
                raise _bad_request("the body of a delete is not a DeleteOptions") from None
            dry_run = isinstance(options, dict) and options.get("dryRun") == ["All"]
        if subresource:
            return await self._subresource(req, reader, writer, rtype, namespace, name, subresource, dry_run)
        store = self._store
        if rtype.resource == "tokenreviews":
            if method != "POST" or name:
                raise APIError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            await self._send_json(writer, 201, self._token_review(req, rtype), req)
            return True
        if method in ("GET", "HEAD"):
            if name:
                await self._send_object(req, writer, rtype, store.get(rtype, namespace, name))
                return True
            if req.flag("watch"):
                await self._watch(req, reader, writer, rtype, namespace)
                return False
            await self._send_list(req, writer, rtype, namespace)
            return True
        if method == "POST" and not name:
            obj = self._body_object(req, rtype, namespace)
            meta = obj["metadata"]
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise APIError(422, "Invalid", f"{rtype.kind} is invalid: metadata.name: Required value")
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            _validate_name(rtype, meta["name"])
            await self._send_json(writer, 201, store.create(rtype, obj, dry_run=dry_run), req)
            return True
        if method == "PUT" and name:
            obj = self._body_object(req, rtype, namespace)
            if obj["metadata"].get("name") != name:
                raise _bad_request("the name of the object does not match the name on the URL")
            await self._send_json(writer, 200, store.replace(rtype, obj, dry_run=dry_run), req)
            return True
        if method == "PATCH" and name and _media(req) == APPLY_PATCH:
            # server-side apply (kubectl apply --server-side), simplified: the applied object merged into the
            # live one, or created (no field managers, no conflicts)
            applied = self._applied_object(req, rtype, namespace, name)
            try:
                current = store.get(rtype, namespace, name)
            except APIError as exc:
                if exc.code != 404:
                    raise
                await self._send_json(writer, 201, store.create(rtype, applied, dry_run=dry_run), req)
                return True
            patched = _merge_patch(current, applied)
            await self._send_json(writer, 200, store.replace(rtype, patched, dry_run=dry_run), req)
            return True
        if method == "PATCH" and name:
            current = store.get(rtype, namespace, name)
            patched = self._apply_patch(req, current)
            patched["metadata"]["name"], patched["metadata"]["namespace"] = name, namespace
            if not namespace:
                patched["metadata"].pop("namespace")
            if patched["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
                patched["metadata"].pop("resourceVersion")
            await self._send_json(writer, 200, store.replace(rtype, patched, dry_run=dry_run), req)
            return True
        if method == "DELETE" and name:
            await self._send_json(writer, 200, store.delete(rtype, namespace, name, dry_run=dry_run), req)
            return True
        if method == "DELETE":
            items, _ = store.list(rtype, namespace, self._matcher(req))
            deleted = [
                store.delete(rtype, o["metadata"].get("namespace", ""), o["metadata"]["name"], dry_run=dry_run)
                for o in items
            ]
            await self._send_json(writer, 200, self._list_body(rtype, deleted, str(store.rv)), req)
            return True
        raise APIError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _body_object(self, req: _Request, rtype: ResourceType, namespace: str) -> Obj:
        content_type = (req.header("content-type") or "application/json").split(";")[0].strip()
        if content_type == PROTOBUF:
            obj = protobuf_to_object(req.body)
        elif content_type in ("application/json", "*/*"):
            obj = json.loads(req.body or b"null")
        else:
            raise APIError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                f"application/json, {PROTOBUF}",
            )
        if not isinstance(obj, dict):
            raise _bad_request("the request body must be a JSON object")
        if obj.get("kind") != rtype.kind or obj.get("apiVersion") != rtype.api_version:
            raise _bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API version "
                f"({rtype.api_version}) or kind {obj.get('kind')!r} is not {rtype.kind!r}"
            )
        meta = obj.setdefault("metadata", {})
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return obj

    def _applied_object(self, req: _Request, rtype: ResourceType, namespace: str, name: str) -> Obj:
        """The object of a server-side apply: YAML (kubectl sends JSON, which is YAML too) of the URL's kind."""
        try:
            obj = yaml.safe_load(req.body or b"")
        except yaml.YAMLError as exc:
            raise _bad_request(f"error decoding YAML: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            raise _bad_request("an applied configuration is an object with metadata")
        if obj.get("kind") != rtype.kind or obj.get("apiVersion") != rtype.api_version:
            raise _bad_request(f"the applied object is not a {rtype.api_version} {rtype.kind}")
        meta = obj["metadata"]
        if meta.get("name", name) != name or (namespace and meta.get("namespace", namespace) != namespace):
            raise _bad_request("the applied object's name or namespace does not match the URL")
        meta["name"] = name
        if rtype.namespaced:
            meta["namespace"] = namespace
        return obj

    def _apply_patch(self, req: _Request, current: Obj) -> Obj:
        content_type = (req.header("content-type") or "").split(";")[0].strip()
        patch = json.loads(req.body or b"null")
        if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise _bad_request("a merge patch must be a JSON object")
            result = _merge_patch(current, patch)
        elif content_type == "application/json-patch+json":
            result = _json_patch(current, patch)
        else:
            raise APIError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, "
                f"{APPLY_PATCH}",
            )
        if not isinstance(result, dict) or not isinstance(result.get("metadata"), dict):
            raise APIError(422, "Invalid", "the patch removed the object's metadata")
        return result

    def _matcher(self, req: _Request) -> Callable[[Obj], bool]:
        labels = _label_matcher(req.q("labelSelector"))
        fields = _field_matcher(req.q("fieldSelector"))
        return lambda obj: labels(obj) and fields(obj)

    def _wants_table(self, req: _Request) -> bool:
        accept = req.header("accept") or ""
        return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))

    def _table(self, req: _Request, rtype: ResourceType, items: list[Obj], rv: str) -> Obj:
        include = req.q("includeObject", "Metadata")
        rows = []
        for obj in items:
            row: Obj = {"cells": rtype.cells(obj)}
            if include == "Object":
                row["object"] = obj
            elif include == "Metadata":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv},
            "columnDefinitions": [
                {
                    "name": c.name,
                    "type": c.type,
                    "format": c.format,
                    "description": c.description,
                    "priority": c.priority,
                }
                for c in rtype.columns
            ],
            "rows": rows,
        }

    def _list_body(self, rtype: ResourceType, items: list[Obj], rv: str) -> Obj:
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    async def _send_object(self, req: _Request, writer: asyncio.StreamWriter, rtype: ResourceType, obj: Obj) -> None:
        if self._wants_table(req):
            obj = self._table(req, rtype, [obj], obj["metadata"]["resourceVersion"])
        await self._send_json(writer, 200, obj, req)

    async def _send_list(
        self, req: _Request, writer: asyncio.StreamWriter, rtype: ResourceType, namespace: str
    ) -> None:
        items, rv = self._store.list(rtype, namespace, self._matcher(req))
        if self._wants_table(req):
            await self._send_json(writer, 200, self._table(req, rtype, items, rv), req)
        else:
            await self._send_json(writer, 200, self._list_body(rtype, items, rv), req)

    async def _watch(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rtype: ResourceType,
        namespace: str,
    ) -> None:
        match = self._matcher(req)
        loop = asyncio.get_running_loop()
        watcher = _Watcher(loop, asyncio.Queue(), rtype, namespace, match)
        since = req.q("resourceVersion")
        store = self._store
        initial: list[Obj] = []
        with store.lock:
            if since in ("", "0"):
                items, _ = store.list(rtype, namespace, match)
                initial = [{"type": "ADDED", "object": o} for o in items]
            else:
                try:
                    since_rv = int(since)
                except ValueError:
                    raise _bad_request(f"invalid resourceVersion {since!r}") from None
                oldest = store.history[0][0] if store.history else store.rv + 1
                if since_rv < oldest - 1 and since_rv < store.rv:
                    initial = [
                        {
                            "type": "ERROR",
                            "object": APIError(
                                410, "Expired", f"too old resource version: {since_rv} ({oldest})"
                            ).status(),
                        }
                    ]
                else:
                    for rv, resource, event in store.history:
                        if rv > since_rv and resource == rtype.resource:
                            watcher.offer(event)
            store.watchers.add(watcher)
        table = self._wants_table(req)

        def encode(event: Obj) -> bytes:
            obj = event["object"]
            if table and event["type"] != "ERROR":
                obj = self._table(req, rtype, [obj], obj["metadata"]["resourceVersion"])
            return json.dumps({"type": event["type"], "object": obj}).encode() + b"\n"

        async def events() -> AsyncIterator[bytes]:
            for event in initial:
                yield encode(event)
            while True:
                event = await watcher.queue.get()
                if event is None:
                    return
                yield encode(event)

        timeout = float(req.q("timeoutSeconds")) if req.q("timeoutSeconds") else None
        await self._start_stream(writer, "application/json")
        try:
            await self._pump(reader, writer, events(), timeout)
        finally:
            with store.lock:
                store.watchers.discard(watcher)

    async def _subresource(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rtype: ResourceType,
        namespace: str,
        name: str,
        subresource: str,
        dry_run: bool,
    ) -> bool:
        store = self._store
        key = (rtype.resource, subresource)
        if key in (("pods", "status"), ("deployments", "status"), ("namespaces", "status")) and req.method == "GET":
            await self._send_object(req, writer, rtype, store.get(rtype, namespace, name))
            return True
        if key == ("pods", "log") and req.method == "GET":
            return await self._logs(req, reader, writer, namespace, name)
        if key == ("pods", "exec") and req.method in ("GET", "POST"):
            return await self._exec(req, reader, writer, namespace, name)
        if key == ("serviceaccounts", "token"):
            if req.method != "POST":
                raise APIError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            await self._send_json(writer, 201, self._token_request(req, store.get(rtype, namespace, name)), req)
            return True
        if key == ("deployments", "scale"):
            dep = store.get(rtype, namespace, name)
            if req.method == "GET":
                await self._send_json(writer, 200, _scale(dep), req)
                return True
            if req.method in ("PUT", "PATCH"):
                if req.method == "PUT":
                    scale = json.loads(req.body or b"null")
                else:
                    scale = self._apply_patch(req, _scale(dep))
                dep["spec"]["replicas"] = int(scale.get("spec", {}).get("replicas", 0))
                sent_rv = scale.get("metadata", {}).get("resourceVersion")
                if sent_rv:
                    dep["metadata"]["resourceVersion"] = sent_rv
                else:
                    dep["metadata"].pop("resourceVersion")
                await self._send_json(writer, 200, _scale(store.replace(rtype, dep, dry_run=dry_run)), req)
                return True
        raise APIError(404, "NotFound", "the server could not find the requested resource")

    # ----------------------------------------------------------------------------------- tokens

    def _token_request(self, req: _Request, account: Obj) -> Obj:
        """``serviceaccounts/NAME/token``: a TokenRequest in, the same TokenRequest with a signed-looking JWT
        for the account in ``status`` out (the token is not stored by the API server, only its claims here)."""
        review_type = ResourceType("authentication.k8s.io", "v1", "tokenrequests", "TokenRequest", True)
        meta = account["metadata"]
        request = self._body_object(req, review_type, meta["namespace"])
        spec = request.get("spec") or {}
        if not isinstance(spec, dict):
            raise _bad_request("spec must be an object")
        audiences = spec.get("audiences") or [API_AUDIENCE]
        seconds = spec.get("expirationSeconds") or 3600
        if not isinstance(seconds, int) or seconds < 600:
            raise APIError(
                422,
                "Invalid",
                'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: '
                f"{seconds}: may not specify a duration less than 10 minutes",
            )
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        expires = now + dt.timedelta(seconds=seconds)
        claims = {
            "aud": audiences,
            "exp": int(expires.timestamp()),
            "iat": int(now.timestamp()),
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": meta["namespace"],
                "serviceaccount": {"name": meta["name"], "uid": meta["uid"]},
            },
            "nbf": int(now.timestamp()),
            "sub": f"system:serviceaccount:{meta['namespace']}:{meta['name']}",
        }

        def segment(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = segment(json.dumps({"alg": "RS256", "kid": "kubeapi-test"}, separators=(",", ":")).encode())
        token = f"{header}.{segment(json.dumps(claims, separators=(',', ':')).encode())}.{segment(secrets.token_bytes(256))}"
        with self._store.lock:
            self._store.tokens[token] = claims
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "creationTimestamp": None},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": spec.get("boundObjectRef"),
            },
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }

    def _token_review(self, req: _Request, rtype: ResourceType) -> Obj:
        """``tokenreviews``: who a token authenticates as. The review comes back with its ``spec`` (the token
        included) and the answer in ``status``; nothing is stored."""
        review = self._body_object(req, rtype, "")
        spec = review.get("spec") or {}
        if not isinstance(spec, dict) or not spec.get("token"):
            raise APIError(
                422, "Invalid", 'TokenReview.authentication.k8s.io "" is invalid: spec.token: Required value'
            )
        with self._store.lock:
            claims = self._store.tokens.get(spec["token"])
        wanted = spec.get("audiences") or [API_AUDIENCE]
        status: Obj = {"user": {}}
        if claims is None or claims["exp"] <= dt.datetime.now(dt.UTC).timestamp():
            status["error"] = "[invalid bearer token, service account token has expired or is not valid]"
        elif not set(wanted) & set(claims["aud"]):
            status["error"] = "[invalid bearer token, token audiences don't match]"
        else:
            k8s = claims["kubernetes.io"]
            namespace, account = k8s["namespace"], k8s["serviceaccount"]
            status = {
                "authenticated": True,
                "user": {
                    "username": claims["sub"],
                    "uid": account["uid"],
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"]},
                },
                "audiences": [a for a in wanted if a in claims["aud"]],
            }
        meta = review.get("metadata") or {}
        meta["creationTimestamp"] = None
        return {**review, "metadata": meta, "status": status}

    # ----------------------------------------------------------------------------------- logs

    async def _pod_container(self, namespace: str, name: str, container: str) -> tuple[Obj, str]:
        pod = self._store.get(_BY_NAME["pods"], namespace, name)
        names = [c["name"] for c in pod["spec"].get("containers", [])]
        if not container:
            if len(names) != 1:
                raise _bad_request(
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
                )
            container = names[0]
        if container not in names:
            raise _bad_request(f"container {container} is not valid for pod {name}")
        return pod, container

    async def _logs(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, namespace: str, name: str
    ) -> bool:
        _, container = await self._pod_container(namespace, name, req.q("container"))
        if req.flag("previous"):
            raise _bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        key = (namespace, name, container)
        timestamps = req.flag("timestamps")

        def fmt(line: str) -> bytes:
            return ((_now() + " " if timestamps else "") + line + "\n").encode()

        store = self._store
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        listener = (loop, queue, key)
        with store.lock:
            lines = list(store.logs.get(key, []))
            if req.flag("follow"):
                store.log_listeners.add(listener)
        tail = req.q("tailLines")
        if tail:
            lines = lines[-int(tail) :] if int(tail) > 0 else []
        if not req.flag("follow"):
            await self._send_raw(writer, 200, b"".join(fmt(line) for line in lines), "text/plain")
            return True

        async def follow() -> AsyncIterator[bytes]:
            for line in lines:
                yield fmt(line)
            ticks = 0
            while True:
                try:
                    line = await asyncio.wait_for(queue.get(), self.log_tick) if self.log_tick else await queue.get()
                except TimeoutError:
                    ticks += 1
                    store.append_log(namespace, name, container, f"tick {ticks}")
                    continue
                if line is None:
                    return
                yield fmt(line)

        await self._start_stream(writer, "text/plain")
        try:
            await self._pump(reader, writer, follow(), None)
        finally:
            with store.lock:
                store.log_listeners.discard(listener)
        return False

    # ----------------------------------------------------------------------------------- exec

    async def _exec(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, namespace: str, name: str
    ) -> bool:
        pod, container = await self._pod_container(namespace, name, req.q("container"))
        command = req.query.get("command", [])
        if not command:
            raise _bad_request("you must specify at least 1 command")
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            raise _bad_request("cannot exec into a container in a completed pod")
        upgrade = (req.header("upgrade") or "").lower()
        if upgrade.startswith("spdy"):
            raise APIError(
                400, "BadRequest", "SPDY is not supported by this server: use the WebSocket channel protocol"
            )
        if upgrade != "websocket":
            raise _bad_request("Upgrade request required")
        proto = ServerProtocol(subprotocols=[Subprotocol(p) for p in EXEC_PROTOCOLS], max_size=MAX_BODY)
        proto.receive_data(req.head)
        ws_request = next(e for e in proto.events_received() if isinstance(e, WSRequest))
        response = proto.accept(ws_request)
        proto.send_response(response)

        def flush() -> None:
            for data in proto.data_to_send():
                if data:
                    writer.write(data)

        flush()
        await writer.drain()
        if response.status_code != 101:
            return False
        v5 = proto.subprotocol == EXEC_PROTOCOLS[0]

        def send(channel: int, data: bytes) -> None:
            proto.send_binary(bytes([channel]) + data)
            flush()

        io = _ExecIO(send, req.flag("tty"))
        if not req.flag("stdin"):
            io.stdin.put_nowait(None)
        closed = asyncio.Event()

        async def receive() -> None:
            while True:
                data = await reader.read(65536)
                if data:
                    proto.receive_data(data)
                else:
                    proto.receive_eof()
                for frame in proto.events_received():
                    if frame.opcode is Opcode.BINARY and frame.data:
                        channel, payload = frame.data[0], bytes(frame.data[1:])
                        if channel == 0 and payload:
                            io.stdin.put_nowait(payload)
                        elif channel == 255 and v5 and payload[:1] == b"\x00":
                            io.stdin.put_nowait(None)
                    elif frame.opcode is Opcode.CLOSE:
                        closed.set()
                flush()
                await writer.drain()
                if not data or closed.is_set():
                    closed.set()
                    io.stdin.put_nowait(None)
                    return

        receiving = asyncio.ensure_future(receive())
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": name,
            "HOME": "/root",
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
        }
        for c in pod["spec"]["containers"]:
            if c["name"] == container:
                env.update({e["name"]: str(e.get("value", "")) for e in c.get("env", [])})
        # A real exec starts its process through the container runtime, tens of milliseconds after the
        # upgrade. The emulated commands take no time, and stdout sent in the same instant as the upgrade
        # answer was once missing from kubectl's output under load (stderr and the exit status arrived).
        await asyncio.sleep(0.1)
        running = asyncio.ensure_future(self._run_command(command, io, env))
        try:
            await asyncio.wait({running, receiving}, return_when="FIRST_COMPLETED")
            if not running.done():
                # The client went away before the command ended (e.g. ^C): stop the command.
                try:
                    await asyncio.wait_for(asyncio.shield(running), 0.5)
                except TimeoutError:
                    running.cancel()
                    return False
            code = running.result()
            if closed.is_set() and receiving.done():
                return False
            if code == 0:
                status: Obj = {"metadata": {}, "status": "Success"}
            else:
                status = {
                    "metadata": {},
                    "status": "Failure",
                    "message": f"command terminated with non-zero exit code: error executing command "
                    f"[{' '.join(command)}], exit code {code}",
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
                }
            send(3, json.dumps(status).encode())
            proto.send_close(1000)
            flush()
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiving, 2)
        finally:
            for task in (running, receiving):
                task.cancel()
            await asyncio.gather(running, receiving, return_exceptions=True)
        return False

    async def _run_command(self, argv: list[str], io: _ExecIO, env: dict[str, str]) -> int:
        try:
            return await self._command(argv, io, env, top=True)
        except _ShellExit as exc:
            return exc.code
        except ValueError as exc:  # e.g. "sleep abc", "exit x"
            io.err(f"{argv[0]}: {exc}\n")
            return 2

    async def _command(self, argv: list[str], io: _ExecIO, env: dict[str, str], *, top: bool = False) -> int:
        prog, args = argv[0], argv[1:]
        base = prog.rsplit("/", 1)[-1]
        if base in ("sh", "bash", "ash", "dash"):
            if args[:1] == ["-c"]:
                if len(args) < 2:
                    io.err(f"{base}: -c requires an argument\n")
                    return 2
                return await self._script(args[1], io, env)
            # Interactive: run each line read from stdin.
            buffer = b""
            code = 0
            while True:
                data = await io.read()
                if data is None:
                    if buffer.strip():
                        code = await self._script(buffer.decode(errors="replace"), io, env)
                    return code
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    code = await self._script(line.decode(errors="replace"), io, env)
        if base == "echo":
            newline = True
            if args[:1] == ["-n"]:
                newline, args = False, args[1:]
            io.out(" ".join(args) + ("\n" if newline else ""))
            return 0
        if base == "cat":
            if not args or args == ["-"]:
                while (data := await io.read()) is not None:
                    io.out(data)
                return 0
            code = 0
            for path in args:
                if path in _FILES:
                    io.out(_FILES[path])
                elif path == "/etc/hostname":
                    io.out(env["HOSTNAME"] + "\n")
                else:
                    io.err(f"cat: {path}: No such file or directory\n")
                    code = 1
            return code
        if base == "env":
            words = list(args)
            while words and (words[0] in ("-", "-i", "--ignore-environment") or "=" in words[0]):
                words = words[1:]  # env [-i] [NAME=VALUE]... COMMAND runs the command
            if words:
                return await self._command(words, io, env)
        if base == "tar":
            return await self._tar(args, io)
        if base == "test" and len(args) == 2 and args[0] == "-d":
            return 0 if posixpath.normpath(args[1]).strip("/") in ("", *_ROOT_LISTING.split()) else 1
        if base in ("env", "printenv"):
            io.out("".join(f"{k}={v}\n" for k, v in env.items()))
            return 0
        if base == "ls":
            paths = [a for a in args if not a.startswith("-")] or ["/"]
            code = 0
            for path in paths:
                if path in ("/", "."):
                    io.out(_ROOT_LISTING)
                elif path in _FILES or path == "/etc/hostname":
                    io.out(path + "\n")
                elif path == "/etc":
                    io.out("hostname\nos-release\npasswd\n")
                else:
                    io.err(f"ls: cannot access '{path}': No such file or directory\n")
                    code = 2
            return code
        if base == "hostname":
            io.out(env["HOSTNAME"] + "\n")
            return 0
        if base in ("whoami",):
            io.out("root\n")
            return 0
        if base == "id":
            io.out("uid=0(root) gid=0(root) groups=0(root)\n")
            return 0
        if base == "pwd":
            io.out("/\n")
            return 0
        if base == "true":
            return 0
        if base == "false":
            return 1
        if base == "sleep":
            await asyncio.sleep(min(float(args[0]) if args else 0, 60))
            return 0
        if base == "exit":
            raise _ShellExit(int(args[0]) if args else 0)
        if top:
            io.err(f'exec: "{prog}": executable file not found in $PATH\n')
            return 127
        io.err(f"sh: {prog}: not found\n")
        return 127

    async def _tar(self, args: list[str], io: _ExecIO) -> int:
        """``tar xf - [-C DIR]`` (with or without ``-``, ``m``, ``v``): the archive on stdin goes to :attr:`files`."""
        letters, rest = (args[0].lstrip("-"), args[1:]) if args else ("", [])
        if "x" not in letters or "f" not in letters or rest[:1] != ["-"]:
            io.err("tar: this test container only extracts an archive from stdin (tar xf - [-C DIR])\n")
            return 2
        directory = rest[2] if rest[1:2] == ["-C"] and len(rest) > 2 else "/"
        data = b""
        while (chunk := await io.read()) is not None:
            data += chunk
        with tarfile.open(fileobj=BytesIO(data)) as archive:
            for member in archive.getmembers():
                content = archive.extractfile(member) if member.isfile() else None
                if content is not None:
                    self.files[posixpath.normpath(posixpath.join("/", directory, member.name))] = content.read()
        return 0

    async def _script(self, script: str, io: _ExecIO, env: dict[str, str]) -> int:
        """Run a tiny subset of sh: commands joined by ';', '&&', '||', with '>&2' and '$VAR'."""
        last = 0

        def expand(match: re.Match[str]) -> str:
            var = match.group(1) or match.group(2)
            return str(last) if var == "?" else env.get(var, "")

        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|>")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:
            io.err(f"sh: syntax error: {exc}\n")
            return 2
        commands: list[tuple[str, list[str]]] = []
        current: list[str] = []
        joiner = ";"
        for token in [*tokens, ";"]:
            if token in (";", "&&", "||"):
                if current:
                    commands.append((joiner, current))
                current, joiner = [], token
            else:
                current.append(token)
        for joiner, words in commands:
            if (joiner == "&&" and last != 0) or (joiner == "||" and last == 0):
                continue
            words = [re.sub(r"\$(?:\{(\w+|\?)\}|(\w+|\?))", expand, w) for w in words]
            to_stderr = False
            if len(words) >= 2 and words[-2] in (">&", "1>&") and words[-1] == "2":
                to_stderr, words = True, words[:-2]
            elif len(words) >= 3 and words[-3] == "1" and words[-2] == ">&" and words[-1] == "2":
                to_stderr, words = True, words[:-3]
            if not words:
                continue
            last = await self._command(words, io.to_stderr() if to_stderr else io, env)
        return last


def _scale(dep: Obj) -> Obj:
    meta = dep["metadata"]
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace", ""),
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": dep["spec"].get("replicas", 1)},
        "status": {
            "replicas": dep.get("status", {}).get("replicas", 0),
            "selector": ",".join(
                f"{k}={v}" for k, v in sorted(dep["spec"].get("selector", {}).get("matchLabels", {}).items())
            ),
        },
    }


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _validate_name(rtype: ResourceType, name: str) -> None:
    pattern = _DNS_LABEL if rtype.resource in ("namespaces", "services") else _DNS_SUBDOMAIN
    if not pattern.fullmatch(name) or len(name) > (63 if pattern is _DNS_LABEL else 253):
        raise APIError(
            422,
            "Invalid",
            f'{rtype.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase RFC 1123 '
            "name must consist of lower case alphanumeric characters, '-' or '.'",
        )


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the in-memory Kubernetes API test server.")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--plain", action="store_true", help="serve plain HTTP instead of HTTPS")
    parser.add_argument("--dir", help="where to write the CA, certificate and kubeconfig (default: a temp dir)")
    parser.add_argument("--log-tick", type=float, default=1.0, help="seconds between lines of a followed log")
    args = parser.parse_args(argv)
    server = KubeAPIServer(
        token=args.token,
        tls=not args.plain,
        host=args.host,
        port=args.port,
        log_tick=args.log_tick,
        workdir=args.dir,
    )
    server.start()
    kubeconfig = server.write_kubeconfig(server.workdir / "kubeconfig")
    print(f"url:        {server.url}")
    print(f"ca:         {server.ca_path}")
    print(f"token:      {server.token}")
    print(f"kubeconfig: {kubeconfig}   (export KUBECONFIG={kubeconfig})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
