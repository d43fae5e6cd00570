"""Kubernetes protobuf request bodies, read as the JSON object the API server makes of them.

kubectl sends the built-in objects it builds itself (``kubectl create deployment``, ``kubectl run``, ``kubectl
create secret`` ...) as protobuf (``application/vnd.kubernetes.protobuf``): the bytes ``k8s\\0``, then a
``runtime.Unknown`` envelope whose ``raw`` field is the object. Rules with ``json:`` must read such a body as
they read JSON, or every deployment kubectl creates would be refused by them.

Theory of operation
-------------------
Protobuf carries field numbers, not names: only a schema says that field 11 of a PodSpec is ``hostNetwork``.
:data:`SCHEMAS` describes the messages on the way from a Deployment to what its pods run with (the pod
template, its containers and their security context, its volumes), each with *every* field it has in the
Kubernetes API. :func:`read_object` turns a body into the JSON document the API server would see, and a list
of *holes*: paths under which the body may set something the gateway did not read.

* A field described as ``opaque`` (a message whose own fields are not described: an affinity, a probe) is a
  hole at its path, unless it is empty (Go's protobuf writes every non-pointer struct, empty or not).
* A field number a described message does not have (a newer API version, or a crafted body) is a hole at the
  message's own path: it could be any field of it.
* An object of a kind without a schema is one hole at ``$``: the whole body.

A rule path under a hole may be set to anything, so every restriction (deny, approve, mask) naming it matches
and no permission naming it covers it; elsewhere the decoded values decide, as for JSON. Anything that is not
well-formed protobuf, or that protobuf decoders read differently (a non-repeated field given twice, which the
API server merges or overrides), is :class:`ProtobufUnreadable`.
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["KINDS", "MAGIC", "MEDIA_TYPE", "SCHEMAS", "ProtobufUnreadable", "protobuf_fields", "read_object"]

MAGIC = b"k8s\x00"
MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
_MAX_DEPTH = 64
_MAX_FIELDS = 100_000


class ProtobufUnreadable(ValueError):
    """Not a Kubernetes protobuf body the gateway can read unambiguously."""


# A schema maps a field number to (JSON name, kind, message). Kinds: str, bytes (base64 in JSON), bool, int,
# msg (the named message), inline (the named message's fields are the parent's own, as Go embeds them),
# opaque (a message not described here: a hole unless empty), map_str (map<string, string>), map_opaque (a map
# of messages not described here), rep_str, rep_msg (repeated named message), rep_opaque (repeated message not
# described here).
Schema = dict[int, tuple[str, str, str]]

# Field numbers and names as in the Kubernetes API's protobuf definitions (core/v1 and meta/v1 of 1.36, apps/v1
# of 1.35); a field added later is a hole where it appears.
SCHEMAS: dict[str, Schema] = {
    # apps/v1
    "Deployment": {
        1: ("metadata", "msg", "ObjectMeta"),
        2: ("spec", "msg", "DeploymentSpec"),
        3: ("status", "opaque", ""),
    },
    "DeploymentSpec": {
        1: ("replicas", "int", ""),
        2: ("selector", "msg", "LabelSelector"),
        3: ("template", "msg", "PodTemplateSpec"),
        4: ("strategy", "opaque", ""),
        5: ("minReadySeconds", "int", ""),
        6: ("revisionHistoryLimit", "int", ""),
        7: ("paused", "bool", ""),
        9: ("progressDeadlineSeconds", "int", ""),
    },
    # meta/v1
    "ObjectMeta": {
        1: ("name", "str", ""),
        2: ("generateName", "str", ""),
        3: ("namespace", "str", ""),
        4: ("selfLink", "str", ""),
        5: ("uid", "str", ""),
        6: ("resourceVersion", "str", ""),
        7: ("generation", "int", ""),
        8: ("creationTimestamp", "opaque", ""),
        9: ("deletionTimestamp", "opaque", ""),
        10: ("deletionGracePeriodSeconds", "int", ""),
        11: ("labels", "map_str", ""),
        12: ("annotations", "map_str", ""),
        13: ("ownerReferences", "rep_opaque", ""),
        14: ("finalizers", "rep_str", ""),
        17: ("managedFields", "rep_opaque", ""),
    },
    "LabelSelector": {
        1: ("matchLabels", "map_str", ""),
        2: ("matchExpressions", "rep_msg", "LabelSelectorRequirement"),
    },
    "LabelSelectorRequirement": {1: ("key", "str", ""), 2: ("operator", "str", ""), 3: ("values", "rep_str", "")},
    # core/v1
    "Pod": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "PodSpec"), 3: ("status", "opaque", "")},
    "PodTemplateSpec": {1: ("metadata", "msg", "ObjectMeta"), 2: ("spec", "msg", "PodSpec")},
    "PodSpec": {
        1: ("volumes", "rep_msg", "Volume"),
        2: ("containers", "rep_msg", "Container"),
        3: ("restartPolicy", "str", ""),
        4: ("terminationGracePeriodSeconds", "int", ""),
        5: ("activeDeadlineSeconds", "int", ""),
        6: ("dnsPolicy", "str", ""),
        7: ("nodeSelector", "map_str", ""),
        8: ("serviceAccountName", "str", ""),
        9: ("serviceAccount", "str", ""),
        10: ("nodeName", "str", ""),
        11: ("hostNetwork", "bool", ""),
        12: ("hostPID", "bool", ""),
        13: ("hostIPC", "bool", ""),
        14: ("securityContext", "opaque", ""),
        15: ("imagePullSecrets", "rep_opaque", ""),
        16: ("hostname", "str", ""),
        17: ("subdomain", "str", ""),
        18: ("affinity", "opaque", ""),
        19: ("schedulerName", "str", ""),
        20: ("initContainers", "rep_msg", "Container"),
        21: ("automountServiceAccountToken", "bool", ""),
        22: ("tolerations", "rep_opaque", ""),
        23: ("hostAliases", "rep_opaque", ""),
        24: ("priorityClassName", "str", ""),
        25: ("priority", "int", ""),
        26: ("dnsConfig", "opaque", ""),
        27: ("shareProcessNamespace", "bool", ""),
        28: ("readinessGates", "rep_opaque", ""),
        29: ("runtimeClassName", "str", ""),
        30: ("enableServiceLinks", "bool", ""),
        31: ("preemptionPolicy", "str", ""),
        32: ("overhead", "map_opaque", ""),
        33: ("topologySpreadConstraints", "rep_opaque", ""),
        34: ("ephemeralContainers", "rep_opaque", ""),
        35: ("setHostnameAsFQDN", "bool", ""),
        36: ("os", "opaque", ""),
        37: ("hostUsers", "bool", ""),
        38: ("schedulingGates", "rep_opaque", ""),
        39: ("resourceClaims", "rep_opaque", ""),
        40: ("resources", "opaque", ""),
        41: ("hostnameOverride", "str", ""),
        43: ("schedulingGroup", "opaque", ""),
    },
    "Container": {
        1: ("name", "str", ""),
        2: ("image", "str", ""),
        3: ("command", "rep_str", ""),
        4: ("args", "rep_str", ""),
        5: ("workingDir", "str", ""),
        6: ("ports", "rep_msg", "ContainerPort"),
        7: ("env", "rep_msg", "EnvVar"),
        8: ("resources", "opaque", ""),
        9: ("volumeMounts", "rep_opaque", ""),
        10: ("livenessProbe", "opaque", ""),
        11: ("readinessProbe", "opaque", ""),
        12: ("lifecycle", "opaque", ""),
        13: ("terminationMessagePath", "str", ""),
        14: ("imagePullPolicy", "str", ""),
        15: ("securityContext", "msg", "SecurityContext"),
        16: ("stdin", "bool", ""),
        17: ("stdinOnce", "bool", ""),
        18: ("tty", "bool", ""),
        19: ("envFrom", "rep_opaque", ""),
        20: ("terminationMessagePolicy", "str", ""),
        21: ("volumeDevices", "rep_opaque", ""),
        22: ("startupProbe", "opaque", ""),
        23: ("resizePolicy", "rep_opaque", ""),
        24: ("restartPolicy", "str", ""),
        25: ("restartPolicyRules", "rep_opaque", ""),
    },
    "ContainerPort": {
        1: ("name", "str", ""),
        2: ("hostPort", "int", ""),
        3: ("containerPort", "int", ""),
        4: ("protocol", "str", ""),
        5: ("hostIP", "str", ""),
    },
    "EnvVar": {1: ("name", "str", ""), 2: ("value", "str", ""), 3: ("valueFrom", "opaque", "")},
    "SecurityContext": {
        1: ("capabilities", "msg", "Capabilities"),
        2: ("privileged", "bool", ""),
        3: ("seLinuxOptions", "opaque", ""),
        4: ("runAsUser", "int", ""),
        5: ("runAsNonRoot", "bool", ""),
        6: ("readOnlyRootFilesystem", "bool", ""),
        7: ("allowPrivilegeEscalation", "bool", ""),
        8: ("runAsGroup", "int", ""),
        9: ("procMount", "str", ""),
        10: ("windowsOptions", "opaque", ""),
        11: ("seccompProfile", "opaque", ""),
        12: ("appArmorProfile", "opaque", ""),
    },
    "Capabilities": {1: ("add", "rep_str", ""), 2: ("drop", "rep_str", "")},
    "Volume": {1: ("name", "str", ""), 2: ("volumeSource", "inline", "VolumeSource")},
    "VolumeSource": {
        1: ("hostPath", "msg", "HostPathVolumeSource"),
        2: ("emptyDir", "opaque", ""),
        3: ("gcePersistentDisk", "opaque", ""),
        4: ("awsElasticBlockStore", "opaque", ""),
        5: ("gitRepo", "opaque", ""),
        6: ("secret", "opaque", ""),
        7: ("nfs", "opaque", ""),
        8: ("iscsi", "opaque", ""),
        9: ("glusterfs", "opaque", ""),
        10: ("persistentVolumeClaim", "opaque", ""),
        11: ("rbd", "opaque", ""),
        12: ("flexVolume", "opaque", ""),
        13: ("cinder", "opaque", ""),
        14: ("cephfs", "opaque", ""),
        15: ("flocker", "opaque", ""),
        16: ("downwardAPI", "opaque", ""),
        17: ("fc", "opaque", ""),
        18: ("azureFile", "opaque", ""),
        19: ("configMap", "opaque", ""),
        20: ("vsphereVolume", "opaque", ""),
        21: ("quobyte", "opaque", ""),
        22: ("azureDisk", "opaque", ""),
        23: ("photonPersistentDisk", "opaque", ""),
        24: ("portworxVolume", "opaque", ""),
        25: ("scaleIO", "opaque", ""),
        26: ("projected", "opaque", ""),
        27: ("storageos", "opaque", ""),
        28: ("csi", "opaque", ""),
        29: ("ephemeral", "opaque", ""),
        30: ("image", "opaque", ""),
    },
    "HostPathVolumeSource": {1: ("path", "str", ""), 2: ("type", "str", "")},
}

# The kinds read: (apiVersion, kind) -> message. Other kinds are not read (a hole at ``$``).
KINDS: dict[tuple[str, str], str] = {("apps/v1", "Deployment"): "Deployment", ("v1", "Pod"): "Pod"}


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ProtobufUnreadable("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos


def protobuf_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of one message, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufUnreadable("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(data, pos, end)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise ProtobufUnreadable("truncated protobuf field")
            out.append((number, wire, data[pos : pos + length]))
            pos += length
        elif wire == 1 and pos + 8 <= end:
            out.append((number, wire, data[pos : pos + 8]))
            pos += 8
        elif wire == 5 and pos + 4 <= end:
            out.append((number, wire, data[pos : pos + 4]))
            pos += 4
        else:
            raise ProtobufUnreadable(f"unexpected protobuf wire type {wire}")
    return out


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufUnreadable("a string field is not length-delimited")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtobufUnreadable("a string field is not valid UTF-8") from None


def _child(path: str, name: str) -> str:
    return f"{path}.{name}"


class _Reader:
    def __init__(self) -> None:
        self.holes: list[str] = []
        self.count = 0

    def message(self, data: bytes, name: str, path: str, depth: int, into: dict[str, Any] | None = None) -> Any:
        if depth > _MAX_DEPTH:
            raise ProtobufUnreadable(f"protobuf body nested deeper than {_MAX_DEPTH} levels")
        schema = SCHEMAS[name]
        doc: dict[str, Any] = {} if into is None else into
        seen: set[int] = set()
        for number, wire, value in protobuf_fields(data):
            self.count += 1
            if self.count > _MAX_FIELDS:
                raise ProtobufUnreadable(f"protobuf body has more than {_MAX_FIELDS} fields")
            field = schema.get(number)
            if field is None:
                # A field this table does not know: it could be any field of this message.
                self.holes.append(path)
                continue
            json_name, kind, sub = field
            here = _child(path, json_name)
            repeated = kind.startswith(("rep_", "map_"))
            if not repeated:
                if number in seen:
                    raise ProtobufUnreadable(f"protobuf field {json_name!r} given twice")
                seen.add(number)
            if kind in ("bool", "int"):
                if wire != 0 or isinstance(value, bytes):
                    raise ProtobufUnreadable(f"protobuf field {json_name!r} is not a varint")
                doc[json_name] = bool(value) if kind == "bool" else value - (1 << 64) if value >= 1 << 63 else value
                continue
            if wire != 2 or not isinstance(value, bytes):
                raise ProtobufUnreadable(f"protobuf field {json_name!r} is not length-delimited")
            if kind == "str":
                doc[json_name] = _text(value)
            elif kind == "bytes":
                doc[json_name] = base64.b64encode(value).decode("ascii")
            elif kind == "msg":
                doc[json_name] = self.message(value, sub, here, depth + 1)
            elif kind == "inline":
                inner = self.message(value, sub, path, depth + 1)
                if set(inner) & set(doc):
                    raise ProtobufUnreadable(f"protobuf field {json_name!r} repeats a field of its parent")
                doc.update(inner)
            elif kind == "opaque":
                if value:
                    self.holes.append(here)
            elif kind == "rep_str":
                doc.setdefault(json_name, []).append(_text(value))
            elif kind == "rep_msg":
                doc.setdefault(json_name, []).append(self.message(value, sub, here + "[*]", depth + 1))
            elif kind == "rep_opaque":
                doc.setdefault(json_name, []).append({})
                if value:
                    self.holes.append(here + "[*]")
            elif kind == "map_opaque":
                doc.setdefault(json_name, {})
                if value:
                    self.holes.append(here)
            elif kind == "map_str":
                entry = dict(_map_entry(value))
                mapping = doc.setdefault(json_name, {})
                key = entry.get(1, "")
                if key in mapping:
                    raise ProtobufUnreadable(f"protobuf map {json_name!r} gives key {key!r} twice")
                mapping[key] = entry.get(2, "")
            else:  # pragma: no cover - a schema mistake
                raise AssertionError(f"unknown schema kind {kind!r}")
        return doc


def _map_entry(data: bytes) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for number, _wire, value in protobuf_fields(data):
        if number not in (1, 2) or any(n == number for n, _ in out):
            raise ProtobufUnreadable("a protobuf map entry that is not one key and one value")
        out.append((number, _text(value)))
    return out


def read_object(body: bytes) -> tuple[dict[str, Any], list[str]]:
    """The JSON document of a protobuf body (``k8s\\0`` + ``runtime.Unknown``) and its holes (paths under
    which it may set what was not read; ``["$"]`` for a kind without a schema)."""
    if not body.startswith(MAGIC):
        raise ProtobufUnreadable("a protobuf body starts with k8s\\0")
    envelope: dict[int, int | bytes] = {}
    for number, wire, value in protobuf_fields(body[len(MAGIC) :]):
        if number in envelope or wire != 2:
            raise ProtobufUnreadable("not a runtime.Unknown envelope")
        envelope[number] = value
    if set(envelope) - {1, 2, 3, 4}:
        raise ProtobufUnreadable("not a runtime.Unknown envelope")
    if envelope.get(3) or envelope.get(4):
        raise ProtobufUnreadable("an encoded or nested runtime.Unknown (contentEncoding, contentType)")
    type_meta: dict[int, str] = {}
    meta = envelope.get(1, b"")
    assert isinstance(meta, bytes)
    for number, _wire, value in protobuf_fields(meta):
        if number not in (1, 2) or number in type_meta:
            raise ProtobufUnreadable("not a TypeMeta")
        type_meta[number] = _text(value)
    api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
    raw = envelope.get(2, b"")
    assert isinstance(raw, bytes)
    doc: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    message = KINDS.get((api_version, kind))
    if message is None:
        return doc, ["$"]
    reader = _Reader()
    reader.message(raw, message, "$", 0, into=doc)
    return doc, reader.holes
