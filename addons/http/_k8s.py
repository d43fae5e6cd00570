"""Map a Kubernetes API request to what it does, the way the API server itself sees it.

Rules about Kubernetes read like RBAC: *verb* on *resource* (and *subresource*) in an *API group*, in a
*namespace*, for a *name*. The API server derives those from the URL and method (its ``RequestInfoFactory``);
:func:`resolve` does the same, so that a rule sees exactly what the server will act on, and refuses
(:class:`UnknownRequest`) whatever it cannot map without guessing.

Theory of operation
-------------------
1. **Canonical path or nothing.** The raw path must start with ``/`` and be printable ASCII. Percent escapes
   are decoded once (the server decodes them too), but an escape that decodes to ``/``, ``\\``, ``.``, ``%``,
   ``?``, ``#`` or a control character is refused, as are empty segments (``//``), ``.`` and ``..``
   segments and a trailing slash (except inside the path forwarded by a ``proxy`` request). Two spellings of
   one request are therefore either equal after decoding or refused: none can make the gateway see one
   resource while the server serves another.
2. **Non-resource requests.** ``/``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/GROUP``,
   ``/apis/GROUP/VERSION`` (discovery), ``/version``, ``/healthz``, ``/livez``, ``/readyz`` (and their
   checks), ``/openapi/v2``, ``/openapi/v3/...``, ``/metrics``, ``/logs/...``,
   ``/.well-known/openid-configuration`` and ``/openid/v1/jwks``: ``is_resource_request`` is False,
   ``verb`` is the lower-cased method and ``path`` is kept for rules in the style of RBAC
   ``nonResourceURLs``. Any other path outside ``/api`` and ``/apis`` is refused.
3. **Resource requests** are ``/api/VERSION/...`` (core group, ``api_group == ""``) and
   ``/apis/GROUP/VERSION/...``. What follows the version is, as on the server:

   - an optional legacy verb segment ``watch/`` (GET only) or ``proxy/``, which sets the verb;
   - ``namespaces/NS/`` sets the namespace, unless what follows it is ``status`` or ``finalize``: then the
     request is about the namespace object itself (``namespaces/NS`` alone is too: resource ``namespaces``,
     name ``NS`` and, as the server reports it, namespace ``NS``);
   - ``RESOURCE[/NAME[/SUBRESOURCE]]``; only ``proxy`` (as subresource or legacy verb) may be followed by
     more segments, which are kept in ``subpath``.

   Without a legacy verb segment the verb comes from the method: POST create, GET/HEAD get, PUT update,
   PATCH patch, DELETE delete. A get without a name is a ``list`` or, with ``?watch`` set, a ``watch``; a
   ``fieldSelector`` that pins ``metadata.name`` then supplies the name. A delete without a name is a
   ``deletecollection``. Boolean query parameters follow the server's conversion: absent, ``0`` or
   ``false`` (any case) is false, anything else, even an empty value, is true; a single-valued parameter
   given twice counts by its first value, as on the server.
4. **Action.** ``verb`` is the RBAC verb the server checks; ``action`` is a friendlier name for rules:
   ``exec``, ``attach``, ``portforward``, ``proxy`` and ``logs`` (``pods/log``) for those subresources, and
   ``impersonate`` whenever any ``Impersonate-*`` header is present (impersonation changes who the server
   thinks is asking, so it must never hide behind the verb); otherwise the verb. ``kubectl exec`` over
   WebSocket is a GET (verb ``get``), over SPDY a POST (verb ``create``); both are action ``exec``.
5. **Fail closed.** Unknown methods, malformed query strings (``;`` separators, bad escapes), invalid
   field selectors, unknown ``Impersonate-*`` headers and the identity headers of an authenticating proxy
   (``X-Remote-User``, ``X-Remote-Group``, ``X-Remote-Uid``, ``X-Remote-Extra-*``: the API server believes
   them from a client certificate it trusts for that, which may be the one the gateway sends) raise
   :class:`UnknownRequest`.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = ["CLUSTER_SCOPED", "Impersonation", "K8sRequest", "UnknownRequest", "resolve"]


class UnknownRequest(ValueError):
    """The request cannot be mapped to a Kubernetes action without guessing; it must be denied."""


@dataclass(frozen=True, slots=True)
class Impersonation:
    """One identity attribute a request asks to act as, named like the RBAC check the server makes.

    ``resource`` is ``users``, ``groups``, ``uids``, ``serviceaccounts`` (a user named
    ``system:serviceaccount:NS:NAME``) or ``userextras`` (with the extra's key in ``subresource``).
    """

    resource: str
    name: str
    namespace: str = ""
    subresource: str = ""


@dataclass(frozen=True, slots=True)
class K8sRequest:
    """What a Kubernetes API request does, as the API server's request info sees it."""

    method: str
    path: str
    verb: str
    action: str
    is_resource_request: bool
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    subpath: str = ""
    watch: bool = False
    follow: bool = False
    exec_command: tuple[str, ...] = ()
    container: str = ""
    stdin: bool = False
    tty: bool = False
    ports: tuple[str, ...] = ()
    label_selector: str = ""
    field_selector: str = ""
    dry_run: bool = False  # ?dryRun=All; the policy request's says whether the server surely runs a dry run
    impersonate: tuple[Impersonation, ...] = ()
    upgrade: str = ""

    @property
    def cluster_scoped(self) -> bool:
        """True for built-in resources that live outside namespaces (nodes, namespaces, clusterroles...)."""
        return self.is_resource_request and (self.api_group, self.resource) in CLUSTER_SCOPED

    @property
    def all_namespaces(self) -> bool:
        """True when a namespaced (or unknown, so presumed namespaced) resource is addressed across all
        namespaces, e.g. ``GET /api/v1/pods``."""
        return self.is_resource_request and not self.namespace and not self.cluster_scoped


CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset(
    [
        ("", "namespaces"),
        ("", "nodes"),
        ("", "persistentvolumes"),
        ("", "componentstatuses"),
        ("rbac.authorization.k8s.io", "clusterroles"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ("storage.k8s.io", "storageclasses"),
        ("storage.k8s.io", "csidrivers"),
        ("storage.k8s.io", "csinodes"),
        ("storage.k8s.io", "volumeattachments"),
        ("storage.k8s.io", "volumeattributesclasses"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("apiregistration.k8s.io", "apiservices"),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
        ("admissionregistration.k8s.io", "validatingadmissionpolicies"),
        ("admissionregistration.k8s.io", "validatingadmissionpolicybindings"),
        ("certificates.k8s.io", "certificatesigningrequests"),
        ("certificates.k8s.io", "clustertrustbundles"),
        ("scheduling.k8s.io", "priorityclasses"),
        ("node.k8s.io", "runtimeclasses"),
        ("networking.k8s.io", "ingressclasses"),
        ("networking.k8s.io", "ipaddresses"),
        ("networking.k8s.io", "servicecidrs"),
        ("flowcontrol.apiserver.k8s.io", "flowschemas"),
        ("flowcontrol.apiserver.k8s.io", "prioritylevelconfigurations"),
        ("authentication.k8s.io", "tokenreviews"),
        ("authentication.k8s.io", "selfsubjectreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
        ("authorization.k8s.io", "selfsubjectaccessreviews"),
        ("authorization.k8s.io", "selfsubjectrulesreviews"),
    ]
)

_METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_SUBRESOURCE_ACTIONS = {
    "exec": "exec",
    "attach": "attach",
    "portforward": "portforward",
    "proxy": "proxy",
    "log": "logs",
}
_NAMESPACE_SUBRESOURCES = frozenset(["status", "finalize"])

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_GROUP_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_VERSION_RE = re.compile(_LABEL)
_RESOURCE_RE = re.compile(_LABEL)
_NAMESPACE_RE = re.compile(_LABEL)
# Object names: DNS subdomains for most kinds, but RBAC and a few others allow ':' and more. Anything the
# server could not address as one path segment ('/', '%', '.', '..') is excluded.
_NAME_RE = re.compile(r"[A-Za-z0-9_:@+=~-][A-Za-z0-9._:@+=~-]*")
_CHECK = r"(?:/[A-Za-z0-9_.:-]+)*"
_NON_RESOURCE_RE = re.compile(
    rf"/(?:|api|api/{_LABEL}|apis|apis/{_LABEL}(?:\.{_LABEL})*(?:/{_LABEL})?|version|metrics"
    rf"|healthz{_CHECK}|livez{_CHECK}|readyz{_CHECK}|logs{_CHECK}|openapi/v2|openapi/v3{_CHECK}"
    r"|\.well-known/openid-configuration|openid/v1/jwks)"
)
_HEX = frozenset("0123456789abcdefABCDEF")
# Bytes that must never appear percent-encoded in a path: they would change how it splits or decodes.
_FORBIDDEN_ESCAPED = frozenset(b"/\\.%?#") | frozenset(range(0x20)) | {0x7F}
_MAX_NAME = 253


def resolve(
    method: str,
    path: str,
    query: Mapping[str, list[str]] | str,
    headers: Mapping[str, str],
) -> K8sRequest:
    """Map one Kubernetes API request to a :class:`K8sRequest`.

    :param method: the HTTP method (any case).
    :param path: the raw (still percent-encoded) request path. It may carry the query string after ``?``
        when ``query`` is empty.
    :param query: the raw query string (preferred: it is parsed here the way the server parses it), or an
        already parsed mapping of parameter to all its values in order (mitmproxy's ``request.query`` works too).
    :param headers: the request headers; matched case-insensitively. If the mapping has ``get_all`` (as
        mitmproxy's headers do), repeated headers such as ``Impersonate-Group`` are read one by one.
    :raises UnknownRequest: when the request cannot be mapped without guessing.
    """
    method = method.upper()
    if method not in _METHOD_VERBS:
        raise UnknownRequest(f"unsupported HTTP method {method!r}")
    if "?" in path:
        path, _, raw_query = path.partition("?")
        if query:
            raise UnknownRequest("query string given both in the path and separately")
        query = raw_query
    params = _parse_query(query) if isinstance(query, str) else _params_from_mapping(query)
    decoded = _decode_path(path)
    impersonate, upgrade = _read_headers(headers)

    segments = decoded[1:].split("/")
    trailing_slash = len(segments) > 1 and segments[-1] == ""
    if trailing_slash:
        segments.pop()
    if segments == [""]:
        segments = []

    if len(segments) < 3 or segments[0] not in ("api", "apis") or (segments[0] == "apis" and len(segments) < 4):
        return _non_resource(method, decoded, trailing_slash, impersonate, upgrade)
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnknownRequest(f"non-canonical path {path!r}")

    parts = segments[1:]
    group = ""
    if segments[0] == "apis":
        group = parts.pop(0)
        _check(_GROUP_RE, group, "API group")
    version = parts.pop(0)
    _check(_VERSION_RE, version, "API version")

    verb = _METHOD_VERBS[method]
    legacy_verb = ""
    if parts[0] in ("watch", "proxy"):
        if len(parts) < 2:
            raise UnknownRequest(f"legacy {parts[0]} path without a resource: {path!r}")
        legacy_verb = verb = parts.pop(0)
        if legacy_verb == "watch" and method not in ("GET", "HEAD"):
            raise UnknownRequest(f"{method} on a legacy watch path")

    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        _check(_NAMESPACE_RE, namespace, "namespace")
        if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
            parts = parts[2:]

    resource = parts[0]
    _check(_RESOURCE_RE, resource, "resource")
    name = parts[1] if len(parts) > 1 else ""
    if name:
        _check(_NAME_RE, name, "name")
    subresource = ""
    if legacy_verb == "proxy":
        rest = parts[2:]
    else:
        subresource = parts[2] if len(parts) > 2 else ""
        if subresource:
            _check(_RESOURCE_RE, subresource, "subresource")
        rest = parts[3:]
    proxying = legacy_verb == "proxy" or subresource == "proxy"
    if (rest or trailing_slash) and not proxying:
        raise UnknownRequest(f"unexpected path segments after the resource: {path!r}")
    if legacy_verb == "proxy" and not name:
        raise UnknownRequest(f"legacy proxy path without a name: {path!r}")
    subpath = ""
    if rest or trailing_slash:
        subpath = "/" + "/".join(rest) + ("/" if trailing_slash and rest else "")

    field_selector = _first(params, "fieldSelector")
    if field_selector:
        selected = _field_selector_name(field_selector)
    else:
        selected = ""
    watch = legacy_verb == "watch"
    if not name and verb == "get":
        watch = _flag(params, "watch")
        verb = "watch" if watch else "list"
        if selected and _NAME_RE.fullmatch(selected) and len(selected) <= _MAX_NAME:
            name = selected
    if not name and verb == "delete":
        verb = "deletecollection"

    action = verb
    if subresource in _SUBRESOURCE_ACTIONS:
        action = _SUBRESOURCE_ACTIONS[subresource]
    if impersonate:
        action = "impersonate"

    streaming_subresource = subresource in ("exec", "attach")
    dry_run_values = params.get("dryRun", [])
    return K8sRequest(
        method=method,
        path=decoded,
        verb=verb,
        action=action,
        is_resource_request=True,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
        subpath=subpath,
        watch=watch,
        follow=subresource == "log" and _flag(params, "follow"),
        exec_command=tuple(params.get("command", [])) if subresource == "exec" else (),
        container=_first(params, "container") if subresource in ("exec", "attach", "log") else "",
        stdin=streaming_subresource and _flag(params, "stdin"),
        tty=streaming_subresource and _flag(params, "tty"),
        ports=tuple(params.get("ports", [])) if subresource == "portforward" else (),
        label_selector=_first(params, "labelSelector"),
        field_selector=field_selector,
        dry_run=dry_run_values == ["All"],
        impersonate=impersonate,
        upgrade=upgrade,
    )


def _non_resource(
    method: str, decoded: str, trailing_slash: bool, impersonate: tuple[Impersonation, ...], upgrade: str
) -> K8sRequest:
    if trailing_slash or not _NON_RESOURCE_RE.fullmatch(decoded):
        raise UnknownRequest(f"unknown Kubernetes API path {decoded!r}")
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise UnknownRequest(f"non-canonical path {decoded!r}")
    verb = method.lower()
    return K8sRequest(
        method=method,
        path=decoded,
        verb=verb,
        action="impersonate" if impersonate else verb,
        is_resource_request=False,
        impersonate=impersonate,
        upgrade=upgrade,
    )


def _check(pattern: re.Pattern[str], value: str, what: str) -> None:
    if len(value) > _MAX_NAME or not pattern.fullmatch(value):
        raise UnknownRequest(f"invalid {what} {value!r}")


# Outside printable ASCII, or a backslash or '#': refused before decoding (one regex search, not a loop).
_BAD_PATH_CHAR = re.compile(r"[^\x21-\x7e]|[\\#]")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def _decode_path(path: str) -> str:
    """Decode percent escapes once, refusing anything that could make two parsers split it differently."""
    if not path.startswith("/"):
        raise UnknownRequest(f"path must start with '/': {path!r}")
    bad = _BAD_PATH_CHAR.search(path)
    if bad is not None:
        raise UnknownRequest(f"invalid character {bad.group()!r} in path")
    i = path.find("%")
    while i != -1:
        escape = path[i + 1 : i + 3]
        if len(escape) != 2 or not set(escape) <= _HEX:
            raise UnknownRequest(f"invalid percent escape in path {path!r}")
        if int(escape, 16) in _FORBIDDEN_ESCAPED:
            raise UnknownRequest(f"forbidden percent-encoded character in path {path!r}")
        i = path.find("%", i + 3)
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UnknownRequest(f"path is not UTF-8: {path!r}") from None
    if _CONTROL_CHAR.search(decoded) is not None:
        raise UnknownRequest(f"control character in path {path!r}")
    return decoded


def _unquote_component(value: str) -> str:
    value = value.replace("+", " ")
    i = value.find("%")
    while i != -1:
        escape = value[i + 1 : i + 3]
        if len(escape) != 2 or not set(escape) <= _HEX:
            raise UnknownRequest(f"invalid percent escape in query {value!r}")
        i = value.find("%", i + 3)
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise UnknownRequest(f"query is not UTF-8: {value!r}") from None


def _parse_query(query: str) -> dict[str, list[str]]:
    """Parse a raw query string as Go's ``url.ParseQuery`` would, refusing what it would drop."""
    params: dict[str, list[str]] = {}
    if not query:
        return params
    if ";" in query:
        raise UnknownRequest("';' in query string")
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        params.setdefault(_unquote_component(key), []).append(_unquote_component(value))
    return params


def _params_from_mapping(query: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Copy parsed parameters; mitmproxy's multi-dict (``get_all``) is read value by value."""
    get_all = getattr(query, "get_all", None)
    params: dict[str, list[str]] = {}
    for key in query:
        values = get_all(key) if callable(get_all) else query[key]
        if isinstance(values, str | bytes) or not all(isinstance(v, str) for v in values):
            raise UnknownRequest(f"query parameter {key!r} must map to a list of strings")
        params[key] = list(values)
    return params


def _first(params: Mapping[str, list[str]], key: str) -> str:
    values = params.get(key)
    return values[0] if values else ""


def _flag(params: Mapping[str, list[str]], key: str) -> bool:
    """A boolean query parameter, converted as the API server converts it."""
    values = params.get(key)
    if not values:
        return False
    return not (values[0] == "0" or values[0].lower() == "false")


def _field_selector_name(selector: str) -> str:
    """Return the name a field selector pins with ``metadata.name=`` (or ``==``), '' if none.

    Parses the selector like the server's ``fields.ParseSelector``: terms split at unescaped commas, the
    first ``!=``, ``==`` or ``=`` in a term is its operator, and values may escape ``\\``, ``,`` and ``=``.
    """
    terms: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in selector:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        raise UnknownRequest(f"invalid field selector {selector!r}")
    terms.append("".join(current))
    found = ""
    for term in terms:
        if not term:
            continue
        field, op, raw_value = _split_term(term, selector)
        value = _unescape_selector_value(raw_value, selector)
        if field == "metadata.name" and op in ("=", "==") and not found:
            found = value
    return found


def _split_term(term: str, selector: str) -> tuple[str, str, str]:
    for i in range(len(term)):
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], op, term[i + len(op) :]
    raise UnknownRequest(f"invalid field selector {selector!r}")


def _unescape_selector_value(value: str, selector: str) -> str:
    out: list[str] = []
    escaped = False
    for ch in value:
        if escaped:
            if ch not in "\\,=":
                raise UnknownRequest(f"invalid escape in field selector {selector!r}")
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",=":
            raise UnknownRequest(f"unescaped {ch!r} in field selector {selector!r}")
        else:
            out.append(ch)
    return "".join(out)


def _header_items(headers: Mapping[str, str]) -> Iterable[tuple[str, str]]:
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        for key in dict.fromkeys(k.lower() for k in headers):
            for value in get_all(key):
                yield key, str(value)
    else:
        for key, value in headers.items():
            yield key.lower(), value


# The identity an authenticating front proxy vouches for (the API server's --requestheader-* defaults): read
# from any request made with a client certificate the server trusts for that, which may be the gateway's own.
_PROXY_IDENTITY_HEADERS = frozenset(["x-remote-user", "x-remote-group", "x-remote-uid"])
_PROXY_EXTRA_PREFIX = "x-remote-extra-"


def _read_headers(headers: Mapping[str, str]) -> tuple[tuple[Impersonation, ...], str]:
    found: list[Impersonation] = []
    upgrade = ""
    for key, value in _header_items(headers):
        if key == "upgrade":
            upgrade = value.strip().lower()
        if key in _PROXY_IDENTITY_HEADERS or key.startswith(_PROXY_EXTRA_PREFIX):
            raise UnknownRequest(
                f"the {key!r} header names the user an authenticating proxy vouches for; the API server would "
                "take the request as that user's"
            )
        if not key.startswith("impersonate-"):
            continue
        value = value.strip()
        if key == "impersonate-user":
            parts = value.split(":")
            if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
                found.append(Impersonation("serviceaccounts", parts[3], namespace=parts[2]))
            else:
                found.append(Impersonation("users", value))
        elif key == "impersonate-group":
            found.append(Impersonation("groups", value))
        elif key == "impersonate-uid":
            found.append(Impersonation("uids", value))
        elif key.startswith("impersonate-extra-") and len(key) > len("impersonate-extra-"):
            extra_key = _unquote_component(key[len("impersonate-extra-") :].replace("+", "%2B"))
            found.append(Impersonation("userextras", value, subresource=extra_key))
        else:
            raise UnknownRequest(f"unknown impersonation header {key!r}")
    return tuple(found), upgrade
