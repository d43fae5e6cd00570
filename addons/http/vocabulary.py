"""The ``when:`` vocabularies of HTTP and Kubernetes rules."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lictor import Request
from lictor.vocabulary import Boolean, Custom, Enum, Glob, Number, Predicate, Quantifier, Vocabulary, glob_to_regex

from ._requests import (
    CopiedValue,
    EmptyValue,
    _key,
    build_http_requests,
    build_k8s_requests,
    fold_path,
    nested_paths,
    path_variants,
    value_text,
)

_TEMPLATE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_BRACKETED = re.compile(r"\[[^\]]*\]")  # glob character classes such as [{]
_STRAY_BRACE = re.compile(r"[{}]")


def path_pattern(pattern: str) -> re.Pattern[str]:
    """``/v1/customers/{id}`` matches one path segment per ``{name}``; ``*`` and ``?`` are globs.

    A brace that is not part of a ``{name}`` is an error, not a literal: ``/users/{user-id}`` or an
    unclosed ``/users/{id`` would otherwise never match, and a deny rule written that way would
    silently protect nothing. ``[{]`` matches a literal brace."""
    if pattern[:1] not in ("/", "*", "?", "["):
        raise ValueError(f"{pattern!r} can never match: request paths start with '/' (write '/{pattern}')")
    stray = _STRAY_BRACE.search(_TEMPLATE.sub("", _BRACKETED.sub("", pattern)))
    if stray is not None:
        raise ValueError(
            f"{pattern!r}: {stray.group()!r} is not part of a template parameter {{name}} (letters, digits and _); "
            "write [{] or [}] for a literal brace"
        )
    if _TEMPLATE.search(pattern):
        parts = _TEMPLATE.split(pattern)
        regex = "[^/]+".join(glob_to_regex(p, case_sensitive=True).pattern[4:-3] for p in parts)
        return re.compile(f"(?s:{regex})\\Z")
    return glob_to_regex(pattern, case_sensitive=True)


def _paths(value: Any) -> Predicate:
    """Allow rules (``all``) match the path exactly. Restrictions (``any``: deny, approve, mask) also match
    other spellings many servers treat as the same resource: any letter case, with or without a trailing
    slash and with or without a format suffix (Rails routes ``/admin/export.csv`` to ``/admin/export``, as
    Spring's suffix matching did), so ``/ADMIN/`` or ``/admin.json`` cannot dodge a deny on ``/admin``."""
    exact = [path_pattern(str(v)) for v in ([value] if isinstance(value, str) else value)]
    loose = [re.compile(p.pattern, p.flags | re.IGNORECASE) for p in exact]

    def pred(request: Request, quantifier: Quantifier) -> bool:
        path = request.attrs.get("path")
        if not isinstance(path, str):
            return False
        if quantifier == "all":
            return any(p.match(path) for p in exact)
        return any(p.match(v) for p in loose for v in path_variants(path))

    return pred


_SPECIAL = re.compile(r"[*?\[{]")


def _index_key(pattern: str) -> str | None:
    """The literal path prefix (at a segment boundary, lower-case) every path matching ``pattern`` starts
    with, or None when the pattern starts with a wildcard."""
    special = _SPECIAL.search(pattern)
    literal = pattern if special is None else pattern[: special.start()]
    if not literal.startswith("/"):
        return None
    if special is not None:
        literal = literal[: literal.rfind("/")]
    return (literal.rstrip("/") or "/").lower()


@dataclass(frozen=True)
class _Paths(Custom):
    """``paths:`` with an index: rules are looked up by the literal prefix of their patterns, so a request
    is checked only against rules whose paths could match it (and rules without ``paths``)."""

    def literals(self, value: Any) -> frozenset[str] | None:
        keys = [_index_key(str(v)) for v in ([value] if isinstance(value, str) else value)]
        if any(k is None for k in keys):
            return None
        return frozenset(k for k in keys if k is not None)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith((parent + ".", parent + "["))


def _copied_paths(flattened: Mapping[str, Any]) -> list[str]:
    """The paths where a JSON Patch ``copy`` or ``move`` puts a value the request does not show."""
    if "$[*].op" not in flattened and "$.op" not in flattened:
        return []  # not a JSON Patch (flattened, or folded): the cheap answer for every other body
    return [
        path
        for path, value in flattened.items()
        if isinstance(value, CopiedValue)
        or (isinstance(value, list) and any(isinstance(v, CopiedValue) for v in value))
    ]


_INDEX = re.compile(r"\[(-?[0-9]+)\]")


def _json_path_problem(path: str) -> str | None:
    """Why the ``json:`` key ``path`` can never name a path of a body as the gateway flattens it, or None.

    A body is read as ``$.a.b``, ``$.items[*].id`` and ``$["odd key"]`` (a key that is not a plain name, in JSON
    quotes): a key written otherwise (``$.items[0].id``, ``$['vip']``, ``$["vip"]``) is looked up as written and
    never found, and a deny so written would deny nothing."""
    if path != "$" and not path.startswith(("$.", "$[")):
        return f"{path!r} can never match: JSON paths start at the document, as in '$.{path}'"
    canonical, i, n, indexed = "$", 1, len(path), False
    decoder = json.JSONDecoder()
    while i < n:
        if path.startswith("[*]", i):
            canonical, i = canonical + "[*]", i + 3
            continue
        index = _INDEX.match(path, i)
        if index is not None:
            canonical, i, indexed = canonical + "[*]", index.end(), True
            continue
        name: str | None = None
        start = i
        if path[i] == "." and i + 1 < n and path[i + 1] not in ".[":
            end = min((j for j in (path.find(".", i + 1), path.find("[", i + 1)) if j >= 0), default=n)
            name, i = path[i + 1 : end], end
        elif path.startswith("['", i) and "']" in path[i + 2 :]:
            end = path.index("']", i + 2)
            name, i = path[i + 2 : end], end + 2
        elif path.startswith('["', i):
            try:
                key, end = decoder.raw_decode(path, i + 1)
            except ValueError:
                key, end = None, i
            if isinstance(key, str) and path[end : end + 1] == "]":
                name, i = key, end + 1
        if name is None or name == "*":
            return (
                f"{path!r} can never match: JSON paths are literal keys (the part at position {start + 1} is not one); "
                'write them as $.a.b, $.items[*].id (every array item) or $["odd key"]'
            )
        canonical = _key(canonical, name)
    if canonical != path:
        why = (
            "array items are read as [*], whatever their index"
            if indexed
            else "a plain name follows a dot, any other key is in double quotes as in JSON"
        )
        return f"{path!r} can never match: the gateway reads this path as {canonical!r} ({why}); write that"
    return None


def _mapping_of_globs(attr: str, case_insensitive_keys: bool, folded_attr: str | None = None) -> Any:
    """A ``name -> value globs`` condition. Every named key must be present; for an ``allow`` rule
    (``all``) every value under it must match, for the others (``any``) one is enough.

    With ``folded_attr`` (JSON bodies, query strings) the ``any`` reading also looks at keys spelled in
    another case, as a server that reads keys ignoring case would (ASP.NET model binding, Go's JSON):
    ``{"Credit_Limit": 5}`` or ``?Credit_Limit=5`` does not walk past a deny on ``credit_limit``; and an array
    stands for its items, as for a server that takes ``["admin"]`` for ``"admin"``: ``{"role": ["admin"]}``
    does not walk past a deny on ``$.role``. The ``all`` reading of a permission stays exact.
    """

    def compile_(value: Any) -> Predicate:
        if attr == "json":
            for k in value:
                problem = _json_path_problem(str(k))
                if problem is not None:
                    raise ValueError(problem)
        wanted = {
            (k.lower() if case_insensitive_keys else k): [
                glob_to_regex(value_text(p), case_sensitive=True)
                for p in ([v] if isinstance(v, (str, int, float, bool)) else v)
            ]
            for k, v in value.items()
        }
        folded = {fold_path(k): pats for k, pats in wanted.items()} if folded_attr else wanted

        def pred(request: Request, quantifier: Quantifier) -> bool:
            if folded_attr is not None and quantifier == "any":
                have, keys = request.attrs.get(folded_attr), folded
            else:
                have, keys = request.attrs.get(attr), wanted
            if not isinstance(have, Mapping):
                return False
            every = quantifier == "all"
            body = attr == "json"
            copied = _copied_paths(have) if body else ()
            for key, pats in keys.items():
                if copied and any(_under(key, path) for path in copied):
                    # a JSON Patch copies or moves an object to this key's parent: it may hold any value here
                    if every:
                        return False
                    continue
                # An object or array at the key ({"credit_limit": {"value": 5}}, a MongoDB operator, PHP's
                # credit_limit[value]=5) is no value the globs compare, and a server may read it as the value
                # its code expects there: every restriction matches it, no permission covers it.
                values = have.get(key)
                if values is None:
                    if body and not every and key in nested_paths(have):
                        continue
                    return False
                vals = [values] if isinstance(values, (str, int, float, bool)) else list(values)
                # a value a JSON Patch copies from elsewhere, or an empty object or array, may be anything:
                # every restriction matches it
                matched = (
                    not every if isinstance(v, (CopiedValue, EmptyValue)) else any(p.match(value_text(v)) for p in pats)
                    for v in vals
                )
                if not vals or not (all(matched) if every else any(matched)):
                    if body and not every and key in nested_paths(have):
                        continue
                    return False
                if body and every and key in nested_paths(have):
                    return False
            return True

        return pred

    return compile_


_GLOB_MAP = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": {
        "oneOf": [
            {"type": ["string", "number", "boolean"]},
            {"type": "array", "items": {"type": ["string", "number", "boolean"]}, "minItems": 1},
        ]
    },
}

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")

_HOST_WITH_PORT = re.compile(r"[^:]+:[0-9]+")


@dataclass(frozen=True)
class _HostNames(Glob):
    """``hosts`` match the upstream's host name as configured (``api.internal``): a pattern with a scheme, a
    path or a port (``https://api.internal``, ``api.internal:8443``) can never match, and a deny so written
    would deny nothing."""

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            text = str(pattern)
            if "/" in text or _HOST_WITH_PORT.fullmatch(text):
                name = text.split("://", 1)[-1].split("/", 1)[0]
                name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
                raise ValueError(
                    f"{text!r} can never match: hosts are host names alone, without scheme, port or path "
                    f"(write {name!r})"
                )
        return super().compile(value)


HTTP_VOCABULARY = Vocabulary(
    protocol="http",
    fields=(
        Enum("methods", attr="method", values=HTTP_METHODS, description="HTTP methods"),
        _HostNames("hosts", attr="host", description="the upstream's host name, without port (globs)"),
        _Paths(
            "paths",
            attr="path_keys",  # the index; the predicate itself reads `path`
            json_schema={
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                "description": "path globs or templates like /v1/customers/{id}",
            },
            compiler=_paths,
        ),
        Custom(
            "query",
            json_schema={**_GLOB_MAP, "description": "query parameter name -> value globs"},
            compiler=_mapping_of_globs("query", False, "query_folded"),
        ),
        Custom(
            "headers",
            json_schema={**_GLOB_MAP, "description": "header name -> value globs"},
            compiler=_mapping_of_globs("headers", True),
        ),
        Custom(
            "json",
            json_schema={**_GLOB_MAP, "description": "JSON path ($.a.b) -> value globs"},
            compiler=_mapping_of_globs("json", False, "json_folded"),
        ),
        Number("body_size", minimum=0, description="request body size in bytes: {max: N}"),
    ),
    index="methods",
    secondary="paths",
    description="HTTP requests through the reverse proxy",
    build_requests=build_http_requests,
    test_request_schema={
        "type": "object",
        "properties": {
            "method": {},
            "path": {},
            "host": {},
            "headers": {},
            "json": {},
            "body": {},
            "content_type": {},
            "reason": {},
        },
    },
    mask_by=("detectors", "json_paths"),
)

K8S_VERBS = (
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "exec",
    "attach",
    "portforward",
    "proxy",
    "impersonate",
    "logs",
    "reveal",
    "head",
    "post",
    "put",
)


def _programs(value: Any) -> Predicate:
    """``programs:`` of an exec command or stdin line. A command the shell analysis could not read
    (``parse_error``) may run anything: every restriction (``any``: deny, approve, mask) matches it and
    no permission (``all``) covers it."""
    field = Glob("programs", attr="programs", basename=True)
    matches = field.compile(value)

    def pred(request: Request, quantifier: Quantifier) -> bool:
        if "parse_error" in request.attrs:
            return quantifier == "any"
        return matches(request, quantifier)

    return pred


def _k8s_json(value: Any) -> Predicate:
    """``json:`` of a Kubernetes request body, read as for HTTP. A body the gateway cannot read (YAML that is
    not JSON, protobuf of a kind it has no schema for) may set anything: every restriction (``any``: deny,
    approve, mask) matches it and no permission (``all``) covers it. So does a path under one of a protobuf
    body's ``json_holes`` (a part the gateway did not read); the other paths decide as usual."""
    matches = _mapping_of_globs("json", False, "json_folded")(value)
    folded = {key: fold_path(key) for key in value}
    partial: dict[frozenset[str], Predicate] = {}

    def pred(request: Request, quantifier: Quantifier) -> bool:
        attrs = request.attrs
        if "body_unreadable" in attrs:
            return quantifier == "any"
        holes = attrs.get("json_holes")
        if holes:
            hidden = {key for key, path in folded.items() if any(_under(path, fold_path(h)) for h in holes)}
            if hidden:
                if quantifier == "all":
                    return False
                rest = frozenset(folded) - hidden
                if not rest:
                    return True
                check = partial.get(rest)
                if check is None:
                    check = partial[rest] = _mapping_of_globs("json", False, "json_folded")(
                        {key: value[key] for key in rest}
                    )
                return check(request, quantifier)
        return matches(request, quantifier)

    return pred


@dataclass(frozen=True)
class _Names(Glob):
    """``names:``. A resource request that names no object (a list, a watch or a deletecollection without a
    field selector pinning one, a create, and the ``reveal`` of such a list) may read, change or delete any
    of them: every restriction (``any``: deny, approve, mask) with ``names`` matches it, so that a deny on one
    Secret is not dodged by listing them all. No permission (``all``) with ``names`` covers it. A name holds no
    ``/``: ``secret/db-creds`` (kubectl's ``-o name``) would never match the object it names."""

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            text = str(pattern)
            if "/" in text and "[" not in text:
                kind, _, name = text.rpartition("/")
                raise ValueError(
                    f"{pattern!r} can never match: names are the object's name alone, as in the API's paths (write "
                    f"{name!r}, and the resource under resources:, not {kind!r} as kubectl -o name prints it)"
                )
        matches = super().compile(value)

        def pred(request: Request, quantifier: Quantifier) -> bool:
            if quantifier == "any" and "resource" in request.attrs and not request.attrs.get("name"):
                return True
            return matches(request, quantifier)

        return pred


@dataclass(frozen=True)
class _Namespaces(Glob):
    """``namespaces:``. A request across all namespaces (``kubectl get pods -A``, and the ``reveal`` of its
    answer) reads every namespace: every restriction (deny, approve, mask) with ``namespaces`` matches it,
    so that a deny on ``kube-system`` is not dodged by listing all of them. Permissions read the request's
    namespace, ``""`` for such a request as for a cluster-scoped one."""

    def compile(self, value: Any) -> Predicate:
        matches = super().compile(value)

        def pred(request: Request, quantifier: Quantifier) -> bool:
            if quantifier == "any" and request.attrs.get("all_namespaces") is True:
                return True
            return matches(request, quantifier)

        return pred


# kubectl's singular names of built-in resources; the API (and RBAC, and these rules) use the plural
_K8S_SINGULAR = {
    "pod": "pods",
    "secret": "secrets",
    "configmap": "configmaps",
    "service": "services",
    "namespace": "namespaces",
    "node": "nodes",
    "deployment": "deployments",
    "statefulset": "statefulsets",
    "daemonset": "daemonsets",
    "replicaset": "replicasets",
    "job": "jobs",
    "cronjob": "cronjobs",
    "ingress": "ingresses",
    "serviceaccount": "serviceaccounts",
    "persistentvolumeclaim": "persistentvolumeclaims",
    "persistentvolume": "persistentvolumes",
    "role": "roles",
    "rolebinding": "rolebindings",
    "clusterrole": "clusterroles",
    "clusterrolebinding": "clusterrolebindings",
    "networkpolicy": "networkpolicies",
    "event": "events",
}


# kubectl's short names of built-in resources (kubectl api-resources)
_K8S_SHORT = {
    "po": "pods",
    "cm": "configmaps",
    "svc": "services",
    "ns": "namespaces",
    "sa": "serviceaccounts",
    "ep": "endpoints",
    "ev": "events",
    "rc": "replicationcontrollers",
    "pvc": "persistentvolumeclaims",
    "pv": "persistentvolumes",
    "deploy": "deployments",
    "rs": "replicasets",
    "ds": "daemonsets",
    "sts": "statefulsets",
    "cj": "cronjobs",
    "ing": "ingresses",
    "netpol": "networkpolicies",
    "hpa": "horizontalpodautoscalers",
    "pdb": "poddisruptionbudgets",
    "crd": "customresourcedefinitions",
    "csr": "certificatesigningrequests",
    "sc": "storageclasses",
    "pc": "priorityclasses",
}


# Subresources whose GET answers with the whole object they belong to (kubectl get --subresource=status).
_OBJECT_SUBRESOURCES = ("status", "ephemeralcontainers", "resize", "approval")


@dataclass(frozen=True)
class _Resources(Glob):
    """``resources:`` are the API's plural names, without their group: ``pod`` (kubectl's singular), ``deploy``
    (its short name) or ``deployments.apps`` (its ``resource.group``, as denials and summaries name a resource)
    would never match.

    A restriction (``any``: deny, approve, mask) naming a resource (``pods``) also matches its subresources
    that read or write the whole object (``pods/status``, ``pods/ephemeralcontainers`` ...): the GET of
    ``pods/x/status`` answers with the pod, spec and all, so a deny on reading pods, or a mask of their
    fields, is not dodged by ``kubectl get pod x --subresource=status``. A permission (``all``) naming
    ``pods`` does not cover ``pods/status``, as in RBAC."""

    def literals(self, value: Any) -> frozenset[str] | None:
        found = super().literals(value)
        if found is None:
            return None
        return found | {f"{r}/{sub}" for r in found if "/" not in r for sub in _OBJECT_SUBRESOURCES}

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            head, sep, sub = str(pattern).partition("/")
            plural = _K8S_SINGULAR.get(head.lower())
            if plural is not None:
                raise ValueError(f"{pattern!r} can never match: resources are plural, as in {plural + sep + sub!r}")
            plural = _K8S_SHORT.get(head.lower())
            if plural is not None:
                raise ValueError(
                    f"{pattern!r} can never match: resources are the API's plural names, not kubectl's short names "
                    f"(write {plural + sep + sub!r})"
                )
            if "." in head and "[" not in head:  # no resource name holds a dot
                name, _, group = head.partition(".")
                raise ValueError(
                    f"{pattern!r} can never match: resources are named without their API group (write "
                    f"{name + sep + sub!r} and api_groups: [{group!r}])"
                )
        matches = super().compile(value)

        def pred(request: Request, quantifier: Quantifier) -> bool:
            if matches(request, quantifier):
                return True
            resource = request.attrs.get("resource")
            if quantifier != "any" or not isinstance(resource, str):
                return False
            head, _, sub = resource.partition("/")
            if sub not in _OBJECT_SUBRESOURCES:
                return False
            return matches(dataclasses.replace(request, attrs={**request.attrs, "resource": head}), quantifier)

        return pred


@dataclass(frozen=True)
class _Subresources(Glob):
    """``subresources:`` are named alone: ``pods/exec`` would never match (that is ``resources: [pods/exec]``)."""

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            text = str(pattern)
            if "/" in text and "[" not in text:  # no subresource holds a slash
                raise ValueError(
                    f"{pattern!r} can never match: subresources are named alone (write "
                    f"{text.rpartition('/')[2]!r}, or resources: [{text!r}])"
                )
        return super().compile(value)


_K8S_VERSION = re.compile(r"v[0-9]+(?:(?:alpha|beta)[0-9]+)?", re.IGNORECASE)


@dataclass(frozen=True)
class _ApiGroups(Glob):
    """``api_groups:`` are group names alone: ``apps/v1`` (an apiVersion) would never match."""

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            text = str(pattern)
            if "/" in text and "[" not in text:  # no API group holds a slash
                raise ValueError(
                    f"{pattern!r} can never match: API groups are named without their version (write "
                    f"{text.partition('/')[0] or 'core'!r})"
                )
            if _K8S_VERSION.fullmatch(text):  # the core group's apiVersion, or a version alone
                raise ValueError(
                    f"{pattern!r} can never match: it is an API version, not a group (the group of apiVersion v1 "
                    "is 'core'; others are named without their version: 'apps', 'batch')"
                )
        return super().compile(value)


K8S_VOCABULARY = Vocabulary(
    protocol="kubernetes",
    fields=(
        Enum(
            "verbs",
            attr="verb",
            values=K8S_VERBS,
            description=(
                "exec/attach/portforward/proxy/impersonate/logs are verbs of their own here; `reveal` is asked "
                "for responses carrying Secret values (masked unless allowed); non-resource URLs other than GET "
                "use the lower-case HTTP method (head, post, put)"
            ),
        ),
        _Resources(
            "resources",
            attr="resource",
            description="resource, or resource/subresource (pods/log); `*` covers subresources too",
        ),
        _Subresources("subresources", attr="subresource", description="subresource (log, exec, status, scale, ...)"),
        _ApiGroups("api_groups", attr="api_group", description="API group; `core` is the core group"),
        _Namespaces(
            "namespaces",
            attr="namespace",
            description=(
                "namespace; cluster-scoped requests have none; a request across all namespaces matches every "
                "deny, approve or mask rule with namespaces"
            ),
        ),
        _Names(
            "names",
            attr="name",
            description=(
                "object names; a request that names none (a list, a create) matches every deny, approve or mask "
                "rule with names and no allow"
            ),
        ),
        Glob("paths", attr="path", description="non-resource URLs such as /api, /version (discovery)"),
        Boolean(
            "dry_run",
            description=(
                "a create, update, patch or delete the API server runs as a dry run, nothing persisted (dryRun=All, "
                "kubectl --dry-run=server); other requests are no dry run"
            ),
        ),
        Custom(
            "json",
            json_schema={
                **_GLOB_MAP,
                "description": (
                    "JSON path ($.spec.template.spec.hostNetwork) -> value globs, in the object a create or update "
                    "sends and the fields a patch sets (merge, strategic merge, JSON Patch); a body the gateway "
                    "cannot read (protobuf, YAML that is not JSON) matches every deny and never an allow"
                ),
            },
            compiler=_k8s_json,
        ),
        Glob("commands", attr="command", description="kubectl exec command line (space-joined)"),
        Custom(
            "programs",
            json_schema={
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                ],
                "description": (
                    "programs (basenames, globs) an exec command or a line of an exec'd shell's stdin would run, "
                    "through sh -c, pipelines, $(...) and wrappers (env, nice, xargs, find -exec...); a command "
                    "that cannot be analysed matches every deny and never an allow"
                ),
            },
            compiler=_programs,
        ),
    ),
    index="verbs",
    secondary="resources",
    description="Kubernetes API requests, mapped like the API server's RBAC",
    build_requests=build_k8s_requests,
    test_request_schema={
        "type": "object",
        "properties": {
            "method": {},
            "path": {},
            "headers": {},
            "json": {},
            "body": {},
            "content_type": {},
            "reason": {},
            "reveal": {},
        },
    },
    mask_by=("detectors", "json_paths"),
)
