"""Turn an HTTP or Kubernetes API request into the :class:`lictor.Request` the policy decides on.

Theory of operation
-------------------
A rule must see what the upstream will act on, so anything two parsers could read differently is refused
(:class:`Unreadable`, which the proxy turns into an audited denial) rather than guessed:

* **Path.** Percent escapes are decoded once; an escape for ``/``, ``\\``, ``.``, ``%``, ``?``, ``#`` or a
  control character, a raw ``\\`` or ``;`` (path parameters that Java servers strip), non-ASCII bytes,
  empty segments (``//``) and ``.``/``..`` segments are refused. Rules match the decoded path.
* **Query.** Parsed like Go's ``url.ParseQuery`` (``;`` separators and bad escapes refused); a parameter
  keeps all its values in order.
* **JSON body.** A body that says it is JSON (``application/json``, ``*+json``) or that parses as a JSON
  object or array is flattened into ``$.a.b`` (``$.items[*].id`` for arrays, ``$['odd.key']`` for keys
  that are not plain names) -> value text (``true``, ``null``, ``12``, strings as they are). Duplicate
  keys, ``NaN``, nesting deeper than :data:`MAX_DEPTH` and more than :data:`MAX_LEAVES` leaves are
  refused: a ``deny`` rule on ``$.force`` must not be dodged by ``{"force": false, "force": true}``.
  A JSON Patch is also read as the fields it sets (:func:`patch_fields`): ``$.credit_limit`` for
  ``[{"op": "replace", "path": "/credit_limit", ...}]``.
* **Kubernetes.** :func:`lictor_addons.http._k8s.resolve` maps the request the way the API server does;
  attributes follow the ``kubernetes`` vocabulary (``verb`` is the friendly verb: ``exec``, ``logs``,
  ``impersonate``...; ``api_group`` is ``core`` for the core group; ``path`` is only set for non-resource
  URLs so that a ``paths:`` rule can never cover a resource). An exec's ``programs`` are those
  :func:`lictor.shell.analyse_argv` finds in its command (the program, what its wrappers run, the commands
  of a ``sh -c`` script); a command it cannot analyse carries ``parse_error`` instead, which every
  restriction on ``programs`` matches and no permission does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

import brotli
from lictor import Request
from lictor.shell import ShellParseError, ShellState, analyse, analyse_argv

from ._bodies import (
    CREDENTIAL_WORDS,
    GRANT_CODE,
    REDACTED,
    credential_name,
    has_grant,
    is_grant_type,
    mask_form_credentials,
    patch_sets_credential,
)
from ._k8s import _SUBRESOURCE_ACTIONS, K8sRequest, UnknownRequest, _decode_path, _parse_query, resolve
from ._k8s_proto import MAGIC as PROTOBUF_MAGIC
from ._k8s_proto import MEDIA_TYPE as PROTOBUF
from ._k8s_proto import ProtobufUnreadable, protobuf_fields, read_object

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd


def path_variants(path: str) -> tuple[str, ...]:
    """:func:`_path_variants`, remembered for recent short paths (it is called for each path rule a request is
    checked against; the cache holds at most 1024 paths of at most 2 KiB)."""
    return _recent_variants(path) if len(path) <= 2048 else _path_variants(path)


def _path_variants(path: str) -> tuple[str, ...]:
    """Spellings of ``path`` that many servers route to the same resource: with and without a trailing
    slash, and without a format suffix on the last segment (``/export.csv``, ``/42.tar.gz``: Rails takes
    what follows the first dot as the format, Spring's suffix matching what follows the last)."""
    bare = path.rstrip("/") or "/"
    if bare == "/":
        return (path,)
    variants = [path, bare, bare + "/"]
    head, _, last = bare.rpartition("/")
    for cut in (last.find("."), last.rfind(".")):
        if cut > 0:
            stem = f"{head}/{last[:cut]}"
            variants += [stem, stem + "/"]
    return tuple(dict.fromkeys(variants))


_recent_variants = functools.lru_cache(maxsize=1024)(_path_variants)


def path_keys(path: str) -> list[str]:
    """The keys a request path is looked up under in the rule index: each prefix at a segment boundary (of
    each of its :func:`path_variants`)."""
    keys = ["/"]
    for variant in path_variants(path):
        bare = variant.rstrip("/").lower()
        i = bare.find("/", 1)
        while i != -1:
            keys.append(bare[:i])
            i = bare.find("/", i + 1)
        if bare:
            keys.append(bare)
    return list(dict.fromkeys(keys))


MAX_DEPTH = 64
MAX_LEAVES = 100_000
BODY_TEXT_LIMIT = 16 * 1024  # characters of a text body that approvers read (the digest binds all of it)
# Headers some frameworks read as another method or path than the request line's: a request carrying one
# would be decided as one request and executed as another, so it is refused.
OVERRIDE_HEADERS = frozenset(
    [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-override-url",
        "x-original-method",
    ]
)
# Headers through which an agent could make the upstream believe another client address, host or scheme;
# removed before forwarding.
FORWARDING_HEADERS = frozenset(
    [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
    ]
)
# Headers an authenticating proxy in front of an application sets to say who the user is (oauth2-proxy, Grafana's
# and Kubernetes' front proxies, Kong, cloud identity-aware proxies): an upstream that sits behind one trusts
# them. Lictor is the one that authenticates here, so an agent's own are never forwarded.
IDENTITY_HEADER_PREFIXES = (
    b"x-forwarded-",
    b"x-auth-request-",
    b"x-remote-",
    b"remote-user",
    b"x-webauth-",
    b"x-authenticated-",
    b"x-consumer-",
    b"x-credential-",
    b"x-ms-client-principal",
    b"x-goog-authenticated-user-",
    b"x-goog-iap-",
    b"x-amzn-oidc-",
    b"cf-access-",
    b"x-pomerium-",
    b"x-userinfo",  # Kong's OpenID Connect plugin: the user info, base64 JSON
    b"x-id-token",  # and the ID token
    b"x-access-token",
    b"x-jwt-payload",  # Istio (outputPayloadToHeader) and Envoy's JWT filter: a verified token's claims
    b"x-auth-user",  # Traefik forward authentication's usual header
)
SECRET_HEADERS = frozenset(
    [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-amz-security-token",
        "x-csrf-token",
        "x-xsrf-token",
    ]
)
# A WebSocket client that cannot send headers (a browser, kubectl) passes its bearer token as a subprotocol.
WS_BEARER_PREFIX = "base64url.bearer.authorization.k8s.io."
_MAX_REVIEW_FIELD = 1024
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class Unreadable(ValueError):
    """The request cannot be read without guessing; it must be denied (the message is for the agent)."""


class BodyTooLarge(Unreadable):
    """The request body, as sent or once decoded, is larger than the target accepts; ``size`` says how
    large, as far as it was read."""

    def __init__(self, size: str, limit: int) -> None:
        super().__init__(f"the request body ({size}) is larger than {limit} bytes")
        self.size = size


def content_codings(values: Iterable[str]) -> list[str]:
    """The codings ``Content-Encoding`` headers (``values``) name, lower-case, in order, without
    ``identity``: a second header ("identity", then "gzip") must not hide the first's neighbour."""
    codings = [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
    return [c for c in codings if c != "identity"]


def _gzip_or_zstd(new: Any, raw: bytes, limit: int) -> bytes:
    """Every gzip member (zstd frame) in ``raw``, one after the other, as servers read concatenated ones."""
    out = bytearray()
    data = raw
    while data:
        decoder = new()
        out += decoder.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise BodyTooLarge(f"more than {limit} bytes decoded", limit)
        if not decoder.eof:
            raise ValueError("the body ends inside a compressed stream")
        data = decoder.unused_data
    return bytes(out)


def _deflate(raw: bytes, limit: int) -> bytes:
    decoder = zlib.decompressobj()  # the zlib format RFC 9110 names "deflate", header and checksum included
    out = decoder.decompress(raw, limit + 1)
    if len(out) > limit:
        raise BodyTooLarge(f"more than {limit} bytes decoded", limit)
    if not decoder.eof or decoder.unused_data:
        raise ValueError("the body is not one complete zlib stream")
    return out


def _brotli(raw: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    out = decoder.process(raw, output_buffer_limit=limit + 1)
    if len(out) > limit:
        raise BodyTooLarge(f"more than {limit} bytes decoded", limit)
    if not decoder.is_finished():
        raise ValueError("the body ends inside a brotli stream")
    return bytes(out)


_DECODERS = {
    "gzip": lambda raw, limit: _gzip_or_zstd(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), raw, limit),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": lambda raw, limit: _gzip_or_zstd(zstd.ZstdDecompressor, raw, limit),
}


def decoded_body(raw: bytes, content_encodings: Iterable[str], limit: int) -> bytes:
    """The request body as a server reads it once it undoes its ``Content-Encoding`` (``content_encodings``:
    those headers' values), of at most ``limit`` bytes as sent and decoded (:class:`BodyTooLarge` beyond: a
    small compressed body may inflate to gigabytes).

    Only the HTTP content codings are read, each as a server decodes it: every member of a concatenated gzip
    body (reading the first alone would decide on part of what the server reads), ``deflate`` in the zlib
    format. Anything else (a codec name no server applies, such as ``base64`` or ``quopri``, two codings, a
    truncated or trailing stream) is :class:`Unreadable`: a server that ignores the header would read other
    bytes than the ones decided on.
    """
    codings = content_codings(content_encodings)
    if not codings:
        if len(raw) > limit:
            raise BodyTooLarge(f"{len(raw)} bytes", limit)
        return raw
    if len(codings) > 1 or codings[0] not in _DECODERS:
        raise Unreadable(
            f"Content-Encoding {', '.join(codings)!r} is not read in a request body; send it plain or with one "
            "of gzip, deflate, br or zstd"
        )
    try:
        return _DECODERS[codings[0]](raw, limit)
    except (zlib.error, brotli.error, zstd.ZstdError, ValueError) as exc:
        if isinstance(exc, Unreadable):
            raise
        raise Unreadable(f"the body is not valid {codings[0]}: {exc}") from None


def value_text(value: Any) -> str:
    """How a JSON scalar (or a rule value) is compared: ``true``, ``false``, ``null``, numbers, strings.

    A number is its value, not its spelling: ``1e6``, ``1E6``, ``1000000.0`` and ``1000000`` are all
    ``1000000`` (a server reads them as the same amount; as spelled, ``1e6`` walked past a rule on
    ``1000000`` or on seven digits and more); other fractions are their shortest form (``0.5``)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else json.dumps(value)
    return str(value)


def canonical_path(raw: str) -> str:
    """The decoded path rules match on; :class:`Unreadable` for anything ambiguous."""
    try:
        path = _decode_path(raw)
    except UnknownRequest as exc:
        raise Unreadable(str(exc)) from None
    if ";" in path:
        raise Unreadable(f"';' in path {raw!r} (path parameters are ambiguous)")
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise Unreadable(f"dot segment in path {raw!r}")
        if segment == "" and i != len(segments) - 1:
            raise Unreadable(f"empty segment in path {raw!r}")
    return path


def parse_query(raw: str) -> dict[str, list[str]]:
    try:
        return _parse_query(raw)
    except UnknownRequest as exc:
        raise Unreadable(str(exc)) from None


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400: Infinity to a parser of doubles, a large number to one of decimals
        raise ValueError(f"the number {text[:40]} is too large to read one way only")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    folded: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        other = folded.setdefault(key.casefold(), key)
        if other != key:
            # Go's encoding/json, ASP.NET and case-insensitive Jackson read both as one field (the last
            # wins), while the rules would see two: as ambiguous as a duplicate.
            raise ValueError(f"keys {other!r} and {key!r} differ only in case")
        out[key] = value
    return out


def loads_strict(data: bytes | str) -> Any:
    """``json.loads`` refusing duplicate keys (also ignoring case) and NaN/Infinity (ValueError,
    RecursionError)."""
    return json.loads(data, object_pairs_hook=_pairs, parse_constant=_reject_constant, parse_float=_finite_float)


def _key(prefix: str, key: str) -> str:
    if _NAME.fullmatch(key):
        return f"{prefix}.{key}"
    return f"{prefix}[{json.dumps(key, ensure_ascii=False)}]"


def fold_path(path: str) -> str:
    """A path as :func:`fold_paths` reads it."""
    return path.casefold().replace("[*]", "")


def fold_paths(flattened: Mapping[str, Any]) -> FlatBody:
    """The flattened body (or query) with case-folded paths (``$.Credit_Limit`` -> ``$.credit_limit``) and
    arrays standing for their items (``$.role[*]`` -> ``$.role``), values of paths that fold together merged:
    what a server that reads keys ignoring case, or takes a one-item array for its item (Jackson's
    ``UNWRAP_SINGLE_VALUE_ARRAYS``, lenient binders), may see."""
    out = FlatBody()
    for path, value in flattened.items():
        key = fold_path(path)
        have = out.get(key)
        if have is None:
            out[key] = value
        else:
            merged = have if isinstance(have, list) else [have]
            out[key] = merged + (value if isinstance(value, list) else [value])
    return out


class EmptyValue(str):
    """An empty object or array in a body (``{}``, ``[]``): not a value the rules' globs compare, and one a
    server may read as anything its code expects there. Every restriction on its path matches it, no
    permission's value globs do."""


class FlatBody(dict[str, Any]):
    """A flattened body (:func:`flatten_json`, :func:`form_attrs`, :func:`fold_paths`) that remembers which of
    its paths hold an object or array (:func:`nested_paths`), computed once for all the rules."""

    __slots__ = ("nested",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nested: frozenset[str] | None = None


_PATH_STEP = re.compile(r"[.\[]")


def nested_paths(flattened: Mapping[str, Any]) -> frozenset[str]:
    """The paths of ``flattened`` that hold an object or array with members: those a longer path goes through
    (``$.a`` and ``$.a.b`` for ``$.a.b.c``, ``$.a.b`` and ``$.a.b[*]`` for ``$.a.b[*].c``). A cut inside a quoted
    key (``$["a.b"]``) gives a prefix no rule can name, which is harmless."""
    if isinstance(flattened, FlatBody) and flattened.nested is not None:
        return flattened.nested
    out: set[str] = set()
    for path in flattened:
        for step in _PATH_STEP.finditer(path, 2):
            out.add(path[: step.start()])
    nested = frozenset(out)
    if isinstance(flattened, FlatBody):
        flattened.nested = nested
    return nested


def flatten_json(doc: Any, max_leaves: int = MAX_LEAVES) -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"$.a.b[*]": ["1", "2"]}``; one value or a list per path. An empty object or
    array inside the document is the :class:`EmptyValue` ``{}`` or ``[]`` at its path."""
    out: dict[str, Any] = {}
    count = 0
    stack: list[tuple[str, Any, int]] = [("$", doc, 0)]
    while stack:
        path, node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Unreadable(f"JSON body nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, (dict, list)) and (node or path == "$"):
            if isinstance(node, dict):
                for k, v in node.items():
                    stack.append((_key(path, k), v, depth + 1))
            else:
                for v in node:
                    stack.append((path + "[*]", v, depth + 1))
        else:
            count += 1
            if count > max_leaves:
                raise Unreadable(f"JSON body has more than {max_leaves} values")
            text = (
                EmptyValue("{}" if isinstance(node, dict) else "[]")
                if isinstance(node, (dict, list))
                else value_text(node)
            )
            have = out.get(path)
            if have is None:
                out[path] = text
            elif isinstance(have, list):
                have.append(text)
            else:
                out[path] = [have, text]
    for value in out.values():
        if isinstance(value, list):
            value.reverse()  # the stack visits arrays backwards
    return out


def _json_text(body: bytes) -> str | None:
    """The body as JSON parsers read it: a UTF-8 byte-order mark, UTF-16 and UTF-32 (which parsers such as
    Python's and Jackson's detect from the first bytes) decoded; None when it does not decode."""
    try:
        return body.decode(json.detect_encoding(body))
    except UnicodeDecodeError:
        return None


def _lenient_json(body: bytes) -> bool:
    """Would a lenient parser read ``body`` as JSON? Many servers parse a body as JSON whatever its
    Content-Type (Go's ``json.NewDecoder(r.Body)``, FastAPI without one), keeping the last of duplicate
    keys, one of keys that differ in case (Go), ``NaN`` (Python), invalid UTF-8 as U+FFFD (Go, Node), and
    reading the first value of the body without looking at what follows it (Go's Decoder, Jackson)."""
    try:
        text = body.decode(json.detect_encoding(body), "replace").lstrip(" \t\r\n\ufeff")
        if not text.startswith(("{", "[")):
            return False
        json.JSONDecoder().raw_decode(text)
    except RecursionError:
        return True  # deeper than Python reads; Go reads 10,000 levels
    except ValueError:
        return False
    return True


def json_attrs(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The ``json`` attribute of a request body, None when the body is not JSON. A body not declared as JSON
    that a lenient parser reads as JSON but the strict one does not (duplicate keys, ``NaN``, invalid UTF-8)
    is :class:`Unreadable`: as text, it would carry its fields past every ``json:`` rule."""
    declared = is_json_type(content_type)
    text = _json_text(body)
    if text is None:
        if declared or _lenient_json(body):
            raise Unreadable("the body is JSON but is not valid UTF-8, UTF-16 or UTF-32")
        return None
    stripped = text.lstrip()
    if not declared and not stripped.startswith(("{", "[")):
        return None
    if not stripped:
        return {} if declared else None
    try:
        doc = loads_strict(text)
    except (ValueError, RecursionError) as exc:
        if declared:
            raise Unreadable(f"the body is declared as JSON but is not valid JSON: {exc}") from None
        if _lenient_json(body):
            raise Unreadable(f"the body is JSON that parsers read differently: {exc}") from None
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("application/x-www-form-urlencoded", "multipart/form-data"):
        # Declared a form, it parses as JSON too: an API that reads the form sees other fields than one that
        # reads JSON ({"a":"&credit_limit=9&"} is the field credit_limit to a form parser).
        raise Unreadable(
            "the body is declared as a form but is also valid JSON; send it as one of them, declared as such"
        )
    flattened = flatten_json(doc)
    if media == "application/json-patch+json" or _looks_like_patch(doc):
        for path, value in patch_fields(doc).items():
            have = flattened.get(path)
            flattened[path] = value if have is None else [*_listed(have), *_listed(value)]
    return flattened


class CopiedValue(str):
    """The value a JSON Patch ``copy`` or ``move`` puts at a path (or reads from one): what it is only the server
    knows. Every restriction on the path matches it, no permission's value globs do."""


# Operations of a JSON Patch (RFC 6902) and the member each needs besides "path".
_PATCH_OPS = {"add": "value", "replace": "value", "test": "value", "remove": "", "copy": "from", "move": "from"}
_POINTER_ESCAPE = re.compile(r"~(?![01])")
# What an array index is to the patch's reader: RFC 6901 says 0 or a number without leading zeros, but the
# Kubernetes API server (Go's evanphx/json-patch, strconv.Atoi) also reads 00, +0 and -1 (from the end).
_ARRAY_TOKEN = re.compile(r"-|[+-]?[0-9]+")
_MAX_AMBIGUOUS_TOKENS = 6


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _looks_like_patch(doc: Any) -> bool:
    """A JSON array of objects with ``op`` and ``path``, sent without the JSON Patch media type: some servers
    (ASP.NET Core's JsonPatchDocument, hand-written handlers) apply it as one all the same."""
    return (
        isinstance(doc, list) and bool(doc) and all(isinstance(op, dict) and "op" in op and "path" in op for op in doc)
    )


def pointer_paths(pointer: Any) -> list[str]:
    """The flattened paths (``$.a.b``, ``$.items[*].id``) a JSON Pointer (RFC 6901: ``/a/b``, ``~1`` for ``/``,
    ``~0`` for ``~``) names. A token that is an array index or ``-`` names a member of that name in an object,
    so both readings are returned (``/items/0`` is ``$.items[*]`` and ``$.items["0"]``); so does a token that
    some servers read as an index (``+0``, ``00``, ``-1``). :class:`Unreadable` for
    a pointer that is not one."""
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        raise Unreadable(f"the JSON Patch path {str(pointer)[:100]!r} is not a JSON Pointer (it starts with '/')")
    if _POINTER_ESCAPE.search(pointer):
        raise Unreadable(f"the JSON Pointer {pointer[:100]!r} has a '~' that is not ~0 or ~1")
    tokens = pointer.split("/")[1:]
    if len(tokens) > MAX_DEPTH:
        raise Unreadable(f"the JSON Pointer {pointer[:100]!r} is deeper than {MAX_DEPTH} levels")
    if sum(1 for t in tokens if _ARRAY_TOKEN.fullmatch(t)) > _MAX_AMBIGUOUS_TOKENS:
        raise Unreadable(f"the JSON Pointer {pointer[:100]!r} has more than {_MAX_AMBIGUOUS_TOKENS} array indexes")
    paths = ["$"]
    for token in tokens:
        key = token.replace("~1", "/").replace("~0", "~")
        nexts = [_key(p, key) for p in paths]
        if _ARRAY_TOKEN.fullmatch(token):
            nexts += [f"{p}[*]" for p in paths]
        paths = nexts
    return paths


def patch_fields(doc: Any) -> dict[str, Any]:
    """The fields a JSON Patch (RFC 6902) sets, flattened as a JSON body carrying them would be: the ``value`` of
    an ``add`` or ``replace`` under its path, ``null`` where ``remove`` or ``move`` takes a field away (as a merge
    patch says it), a :class:`CopiedValue` where ``copy`` or ``move`` puts one and where it is copied from. A
    ``test`` sets nothing. :class:`Unreadable` for a document that is not a list of such operations."""
    if not isinstance(doc, list):
        raise Unreadable("a JSON Patch is a JSON array of operations")
    out: dict[str, Any] = {}
    count = 0

    def put(path: str, value: Any) -> None:
        nonlocal count
        count += len(value) if isinstance(value, list) else 1
        if count > MAX_LEAVES:
            raise Unreadable(f"JSON Patch sets more than {MAX_LEAVES} values")
        have = out.get(path)
        out[path] = value if have is None else [*_listed(have), *_listed(value)]

    for i, op in enumerate(doc):
        name = op.get("op") if isinstance(op, dict) else None
        if not isinstance(name, str) or name not in _PATCH_OPS:
            raise Unreadable(
                f"JSON Patch operation {i} is not one of {', '.join(_PATCH_OPS)} (an object with op and path)"
            )
        if "path" not in op:
            raise Unreadable(f"JSON Patch operation {i} ({name}) has no path")
        member = _PATCH_OPS[name]
        if member and member not in op:
            raise Unreadable(f"JSON Patch operation {i} ({name}) has no {member}")
        targets = pointer_paths(op["path"])
        if name == "test":
            continue
        if name == "remove":
            for path in targets:
                put(path, "null")
        elif member == "value":
            for path in targets:
                if isinstance(op["value"], (dict, list)) and not op["value"]:
                    put(path, EmptyValue(json.dumps(op["value"])))
                for key, value in flatten_json(op["value"]).items():
                    put(path + key[1:], value)
        else:
            source = op["from"]
            sources = pointer_paths(source)
            for path in targets:
                put(path, CopiedValue(f"({'moved' if name == 'move' else 'copied'} from {source})"))
            for path in sources:
                put(path, "null" if name == "move" else CopiedValue(f"(copied to {op['path']})"))
    return out


_FORM_SUBKEY = re.compile(r"\[([^\[\]]*)\]")
_PHP_MANGLED = re.compile(r"[ .\[]")


def php_name(key: str) -> str | None:
    """The name PHP (``$_GET``, ``$_POST``: Laravel, Symfony, WordPress) gives a query or form field: cut
    at a NUL, without leading spaces, with spaces and dots before the first ``[`` as ``_``, and an unclosed
    ``[`` with the spaces, dots and ``[`` after it as ``_`` too (``credit.limit``, ``credit limit``,
    ``credit[limit`` and ``credit_limit%00x`` are all ``credit_limit``). None when PHP drops the field."""
    name = key.split("\x00", 1)[0].lstrip(" ")
    head, bracket, rest = name.partition("[")
    if not head:
        return None
    head = head.replace(" ", "_").replace(".", "_")
    if bracket and "]" not in rest:
        head, bracket, rest = head + "_" + _PHP_MANGLED.sub("_", rest), "", ""
    return head + bracket + rest


def bracketed_heads(params: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """``params`` with the values of a bracketed name (``credit_limit[]``, ``credit_limit[0]``) also under the
    name before its brackets: Rails, PHP and Express read ``?credit_limit[]=5`` as ``credit_limit`` holding
    ``["5"]``, which code that expects one value takes for ``5`` (JavaScript's ``Number(["5"])``), as an array
    in a JSON body stands for its items."""
    out = {name: list(values) for name, values in params.items()}
    for name, values in params.items():
        head = name.split("[", 1)[0]
        if head and head != name and name.endswith("]"):
            out.setdefault(head, []).extend(values)
    return out


def form_attrs(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The ``json`` attribute of a form body (``application/x-www-form-urlencoded`` or ``multipart/form-data``),
    None for other bodies: many APIs take a form where they take JSON, so ``json:`` rules read its fields. A field is
    its ``$.name`` path; a bracketed name (``customer[credit_limit]``, nested by Rails, PHP and Express)
    is also its nested path (``$.customer.credit_limit``, ``[]`` as ``[*]``), and a name PHP reads as another
    (``credit.limit``: see :func:`php_name`) is also that one."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        fields = _urlencoded_fields(body)
    elif media == "multipart/form-data":
        fields = _multipart_fields(body, content_type)
    else:
        return None
    out: dict[str, Any] = {}
    count = 0
    folded: dict[str, str] = {}
    for key, value in fields:
        other = folded.setdefault(key.casefold(), key)
        if other != key:
            # ASP.NET reads both as one field (the first value wins), a permission would check only one
            raise Unreadable(f"form fields {other!r} and {key!r} differ only in case")
        paths = []
        php = php_name(key)
        for name in (key, php) if php is not None and php != key else (key,):
            paths.append(_key("$", name))
            head = name.split("[", 1)[0]
            if head and head != name:
                nested = _key("$", head)
                for sub in _FORM_SUBKEY.findall(name[len(head) :]):
                    nested = f"{nested}[*]" if sub == "" else _key(nested, sub)
                paths.append(nested)
        for path in dict.fromkeys(paths):
            count += 1
            if count > MAX_LEAVES:
                raise Unreadable(f"form body has more than {MAX_LEAVES} fields")
            have = out.get(path)
            out[path] = value if have is None else [*(have if isinstance(have, list) else [have]), value]
    return out


def _urlencoded_fields(body: bytes) -> list[tuple[str, str]]:
    if b";" in body:
        # Some form parsers split fields at ';' (Perl's CGI, Python before 3.9.2), others keep it in the value:
        # 'limit=5;role=admin' is one field to one server and two to another.
        raise Unreadable("';' in a form body (fields are separated by '&'; send ';' in a value as %3B)")
    fields = []
    for pair in body.decode("latin-1").split("&"):
        if pair:
            raw_key, _, raw_value = pair.partition("=")
            key = unquote_to_bytes(raw_key.replace("+", " ")).decode("utf-8", "replace")
            fields.append((key, unquote_to_bytes(raw_value.replace("+", " ")).decode("utf-8", "replace")))
    return fields


_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_TOKEN = rb"[!#$%&*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 token characters, without the quote "'"
_PART_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*)")
_DISPOSITION = re.compile(rb"form-data((?:[ \t]*;[ \t]*[A-Za-z]+=(?:\"[^\"\\\r\n]*\"|" + _TOKEN + rb"))*)[ \t]*", re.I)
_DISPOSITION_PARAM = re.compile(rb';[ \t]*([A-Za-z]+)=(?:"([^"\\\r\n]*)"|(' + _TOKEN + rb"))")
FORM_VALUE_LIMIT = 64 * 1024  # of a text part, what rules read (file parts are read by their file name)


def _multipart_fields(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """The named parts of a ``multipart/form-data`` body: a text part's value, a file part's file name.
    Split with bytes searches (a large upload is not parsed line by line).

    Only the form clients send is read; anything parsers disagree on is :class:`Unreadable`: PHP, for one,
    also reads parts after the closing boundary, lines ending in a bare LF, folded headers, a name in single
    quotes or with a backslash escape, and a Content-Disposition without ``form-data``, all of which a
    stricter reading would pass over. So: no preamble or epilogue, every ``--boundary`` a delimiter at a
    line start, header lines ending in CRLF and unfolded, one Content-Disposition per part, ``form-data``
    with ``name`` and ``filename`` only, each once, quoted without escapes or a token, and no transfer
    encoding (base64, quoted-printable) that some parsers undo and others do not."""
    found = _BOUNDARY.findall(content_type)
    if len(found) != 1:
        raise Unreadable("the body is declared as multipart/form-data without exactly one boundary")
    delimiter = b"--" + (found[0][0] or found[0][1]).encode("latin-1", "replace")
    if not body:
        return []
    if not body.startswith(delimiter):
        raise Unreadable("a multipart/form-data body must start with its boundary")
    chunks = body[len(delimiter) :].split(b"\r\n" + delimiter)
    if body.count(delimiter) != len(chunks):
        raise Unreadable("the multipart boundary appears inside a part, or not at the start of a line")
    fields = []
    for i, chunk in enumerate(chunks):
        if chunk.startswith(b"--"):
            if i != len(chunks) - 1 or chunk[2:] not in (b"", b"\r\n"):
                raise Unreadable("a multipart/form-data body goes on after its closing boundary")
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not head.startswith(b"\r\n") or not sep:
            raise Unreadable("a multipart part whose headers do not end in a blank line (CRLF)")
        params: dict[bytes, bytes] | None = None
        for line in head[2:].split(b"\r\n"):
            header = _PART_HEADER.fullmatch(line)
            if header is None or b"\r" in line or b"\n" in line:
                raise Unreadable(f"a multipart part header that is not one 'Name: value' line: {line[:100]!r}")
            if header.group(1).lower() == b"content-transfer-encoding":
                if header.group(2).strip().lower() not in (b"7bit", b"8bit", b"binary"):
                    # some parsers decode base64 or quoted-printable parts, others read them as they are
                    raise Unreadable(f"a multipart part with a Content-Transfer-Encoding: {line[:100]!r}")
                continue
            if header.group(1).lower() != b"content-disposition":
                continue
            disposition = _DISPOSITION.fullmatch(header.group(2))
            if params is not None or disposition is None:
                raise Unreadable(f"a multipart part with two or an unreadable Content-Disposition: {line[:100]!r}")
            params = {}
            for m in _DISPOSITION_PARAM.finditer(disposition.group(1)):
                key = m.group(1).lower()
                if key not in (b"name", b"filename") or key in params:
                    raise Unreadable(f"a multipart Content-Disposition parameter that is not read: {line[:100]!r}")
                params[key] = m.group(2) if m.group(2) is not None else m.group(3)
        name = params.get(b"name") if params else None
        if name is None:
            continue
        if b"filename" in params:
            value = params[b"filename"]
        else:
            value = content[:FORM_VALUE_LIMIT]
        fields.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    else:
        raise Unreadable("a multipart/form-data body without its closing boundary")
    return fields


def header_name(name: str) -> str:
    """A header's name as CGI servers read it: lower-case, ``_`` as ``-``. PHP, Rack and WSGI servers put
    ``X_HTTP_Method_Override`` and ``X-HTTP-Method-Override`` in the same variable (the last one wins), and
    Symfony, Laravel and Rails read the method override, forwarding and account headers from there."""
    return name.lower().replace("_", "-")


def header_attrs(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header name (:func:`header_name`) -> value (repeats joined with ``, ``), without credentials and
    X-Lictor-*: not the bearer token offered as a WebSocket subprotocol either (rules, approvers and webhooks
    read these)."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = header_name(name)
        if key in SECRET_HEADERS or key.startswith("x-lictor-"):
            continue
        if key == "sec-websocket-protocol":
            value = ", ".join(p.strip() for p in value.split(",") if not p.strip().startswith(WS_BEARER_PREFIX))
            if not value:
                continue
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


_MULTIPART_METHOD = re.compile(rb'name\s*=\s*"?_method\b', re.IGNORECASE)


def _body_has_method_field(body: bytes, content_type: str) -> bool:
    """Does a form body carry ``_method`` (Rails, Laravel/Symfony, Express method-override read it as the
    method)? Form keys are read decoded (``%5Fmethod`` is ``_method`` to every form parser); multipart
    parts by their ``name``."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded" or (not media and b"method" in body and b"=" in body):
        text = body.decode("latin-1")
        for pair in text.replace(";", "&").split("&"):
            key = pair.partition("=")[0].replace("+", " ")
            if unquote_to_bytes(key).strip() == b"_method":
                return True
    if media.startswith("multipart/") and _MULTIPART_METHOD.search(body):
        return True
    return False


# Headers the gateway sets, rewrites or removes towards the upstream whatever the agent sent (the framing,
# the upstream's Host, identity encoding): no part of what an approval is bound to.
_GATEWAY_HEADERS = frozenset({"content-length", "host", "connection", "te", "accept-encoding"})
# Headers that differ from one try of the same request to the next (tracing ids, the client's clock and
# session): left out of what an approval is bound to, so that a ticket can be redeemed by a retry, and not
# forwarded with the retry that redeems it (nobody approved its values). Not X-Request-Id or Idempotency-Key:
# APIs use them to tell a new operation from a retried one; nor `baggage`, which carries the application's
# own values (a tenant, a user, a feature flag) and stays the same from one try to the next.
TRY_HEADERS = frozenset(
    {"keep-alive", "date", "traceparent", "tracestate", "sentry-trace", "x-amzn-trace-id", "kubectl-session"}
)


def try_header(name: str) -> bool:
    """Is ``name`` (as :func:`header_name` gives it) a header of one try (:data:`TRY_HEADERS`, Zipkin's
    ``X-B3-*``)?"""
    return name in TRY_HEADERS or name.startswith("x-b3-")


def credentials_digest(headers: Iterable[tuple[str, str]]) -> str:
    """A digest of the credentials an agent sends on to the upstream (``Cookie``, ``X-Api-Key`` ...: the
    secret headers but its own token, which the gateway replaces), "" without any. Approvers do not read
    them, but an approval is bound to them: a ticket redeemed with another session cookie would act as
    another account."""
    sent = sorted(
        (header_name(name), value)
        for name, value in headers
        if header_name(name) in SECRET_HEADERS and header_name(name) not in ("authorization", "proxy-authorization")
    )
    if not sent:
        return ""
    return "sha256:" + hashlib.sha256(json.dumps(sent).encode("utf-8", "surrogatepass")).hexdigest()


SECRET_QUERY_WORDS = ("token", "key", "secret", "password", "passwd", "signature", "auth", "credential")
# ... and query parameters whose whole name (without case, "_" or "-") says it carries one: an Azure shared
# access signature (sig), a JWT, a session id.
SECRET_QUERY_NAMES = frozenset({"sig", "jwt", "sid", "sessionid"})


_QUERY_SEPARATORS = re.compile(r"([&;])")


def secret_query_name(name: str, grant: bool) -> bool:
    """Is the value of query parameter ``name`` (decoded) a credential, so that recordings, the audit and
    approvers do not get it? One named with a word of :data:`SECRET_QUERY_WORDS`, or a credential field of a
    body (:func:`credential_name`: ``assertion``, ``code_verifier``, ``code`` where a ``grant_type`` is sent), or
    one of :data:`SECRET_QUERY_NAMES`."""
    lowered = name.lower()
    return (
        credential_name(name, grant)
        or any(word in lowered for word in SECRET_QUERY_WORDS)
        or lowered.replace("_", "").replace("-", "") in SECRET_QUERY_NAMES
    )


def redact_query(raw_path: str) -> str:
    """The path with values of query parameters that look like credentials (:func:`secret_query_name`, their
    names read decoded as the upstream reads them) replaced (for recordings, the audit and approvers)."""
    path, sep, query = raw_path.partition("?")
    if not sep:
        return path
    parts = _QUERY_SEPARATORS.split(query)  # ';' too: some servers split at it (such a query is refused)
    names = [unquote_plus(pair.partition("=")[0]) for pair in parts[::2]]
    grant = has_grant(names)
    for i, name in zip(range(0, len(parts), 2), names, strict=True):
        raw_name, eq, _ = parts[i].partition("=")
        if eq and secret_query_name(name, grant):
            parts[i] = f"{raw_name}=[REDACTED]"
    return f"{path}?{''.join(parts)}"


def _bound_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The header fields an approval is bound to, as sent (lower-case names, ``X_Account`` apart from
    ``X-Account``, repeated fields one by one): all but the credentials and ``X-Lictor-*`` (as for
    :func:`header_attrs`), the headers the gateway sets and those of one try (:func:`try_header`)."""
    out = []
    for name, value in headers:
        key = header_name(name)
        if key in SECRET_HEADERS or key.startswith("x-lictor-") or key in _GATEWAY_HEADERS or try_header(key):
            continue
        if key == "sec-websocket-protocol":
            value = ", ".join(p.strip() for p in value.split(",") if not p.strip().startswith(WS_BEARER_PREFIX))
            if not value:
                continue
        out.append((name.lower(), value))
    out.sort(key=lambda field: field[0])  # stable: repeated fields keep their order, which servers read
    return out


def payload(
    method: str, raw_path: str, body: bytes, headers: Iterable[tuple[str, str]] = (), credentials: str = ""
) -> str:
    """What an approval is bound to, and what its approvers read: method, raw path with query, the header
    fields as sent (:func:`_bound_headers`: without the ones that change from try to try, which are not
    forwarded with a redeemed ticket), a digest of the body and one of the credentials the agent sends on
    (:func:`credentials_digest`). A ticket is then redeemed only by the same request: another Content-Type
    (a JSON patch read as a merge patch), another account header, the same one spelt ``X_Account`` (which
    nginx drops and Go reads as another header) or another session cookie does not pass for the one
    approved. Credentials in the query (:func:`redact_query`) are not shown, but bound all the same by a
    digest of the whole path."""
    shown = redact_query(raw_path)
    text = f"{method.upper()} {shown} sha256:{hashlib.sha256(body).hexdigest()}"
    bound = _bound_headers(headers)
    if bound:
        text += "".join(f"\n{k}: {v}" for k, v in bound)
    if credentials:
        text += f"\ncredentials (not shown): {credentials}"
    if shown != raw_path:
        digest = hashlib.sha256(raw_path.encode("utf-8", "surrogatepass")).hexdigest()
        text += f"\nquery credentials (not shown): sha256:{digest}"
    return text


def body_text(body: bytes) -> tuple[str, int] | None:
    """What approvers read of a body that is neither JSON nor a form (XML, plain text, CSV, a script): its
    text up to :data:`BODY_TEXT_LIMIT` characters, and how many bytes of it are left out; None for a body
    that is not UTF-8 text or holds a NUL, of which they see the size and digest only. Where it is shown,
    control characters are shown escaped."""
    head = body[: BODY_TEXT_LIMIT * 4]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut through a character at the end is not binary; anything else is.
        if len(head) == len(body) or exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    if "\x00" in text:
        return None
    shown = text[:BODY_TEXT_LIMIT]
    return shown, len(body) - len(shown.encode())


_CREDENTIAL_PATH_WORDS = re.compile(f"(?i){CREDENTIAL_WORDS}|{GRANT_CODE}")


def _path_parent_name(path: str) -> tuple[str, str]:
    """The parent and the last key of a flattened path (``$.a["b c"][*]`` -> ``$.a``, ``b c``)."""
    while path.endswith("[*]"):
        path = path[:-3]
    if path.endswith('"]'):
        start = path.rfind('["')
        while start > 0:
            try:
                key = json.loads(path[start + 1 : -1])
            except ValueError:
                start = path.rfind('["', 0, start)
                continue
            if isinstance(key, str):
                return path[:start], key
            break
        return path, ""
    parent, _, key = path.rpartition(".")
    return parent, key


def _masked(value: Any) -> Any:
    return [REDACTED] * len(value) if isinstance(value, list) else REDACTED


def _shown_fields(flattened: Mapping[str, Any]) -> dict[str, Any] | None:
    """A flattened body (``json`` or ``json_folded``) as approvers read it: the values of credential fields
    (:func:`credential_name`, ``code`` next to a ``grant_type``) replaced; None when it has none."""
    named = {path: _path_parent_name(path) for path in flattened if _CREDENTIAL_PATH_WORDS.search(path)}
    found: list[str] = []
    if named:
        grants = {parent for parent, name in map(_path_parent_name, flattened) if is_grant_type(name)}
        found = [path for path, (parent, name) in named.items() if credential_name(name, parent in grants)]
    # a JSON Patch (or SCIM PATCH) operation setting a credential: its value is among the operations' values
    for ops in ("$[*]", "$.Operations[*]", "$.operations[*]"):
        paths = flattened.get(f"{ops}.path")
        if f"{ops}.value" in flattened and any(map(patch_sets_credential, _listed(paths))):
            found.append(f"{ops}.value")
    if not found:
        return None
    return {**flattened, **{path: _masked(flattened[path]) for path in found}}


def _shown_query(params: Mapping[str, Any]) -> dict[str, Any] | None:
    grant = has_grant(params)
    found = [name for name in params if secret_query_name(name, grant)]
    if not found:
        return None
    return {**params, **{name: _masked(params[name]) for name in found}}


def shown_attrs(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``attrs`` of an HTTP request as approvers read them (:attr:`Request.shown_attrs`): without the values of
    credentials in the query and the body (an OAuth client secret, a password), which are the agent's own and
    no approver needs to read; None when there are none."""
    shown: dict[str, Any] = {}
    for key, mask in (
        ("query", _shown_query),
        ("query_folded", _shown_query),
        ("json", _shown_fields),
        ("json_folded", _shown_fields),
    ):
        if key in attrs and (masked := mask(attrs[key])) is not None:
            shown[key] = masked
    if "body_text" in attrs:
        counts: Counter[str] = Counter()
        text = mask_form_credentials(attrs["body_text"].encode("utf-8", "surrogatepass"), counts)
        if counts:
            shown["body_text"] = text.decode("utf-8", "surrogatepass")
    return {**attrs, **shown} if shown else None


def http_request(
    *,
    method: str,
    raw_path: str,
    host: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    content_type: str,
    target: str,
    reason: str | None = None,
) -> Request:
    """The ``http`` protocol request for one HTTP request (``raw_path`` may carry the query)."""
    path_part, _, query = raw_path.partition("?")
    shown_query = redact_query(raw_path).partition("?")[2]
    path = canonical_path(path_part)
    headers = list(headers)
    override = sorted({header_name(name) for name, _ in headers} & OVERRIDE_HEADERS)
    if override:
        raise Unreadable(f"header {override[0]} would make the API run another method or path than decided")
    if content_type.strip() and not _MEDIA_TYPE.fullmatch(content_type.split(";", 1)[0].strip()):
        # PHP reads "application/x-www-form-urlencoded, text/plain" (or with a space) as a form, Laravel
        # "text/plain, application/json" as JSON: the media type must be one type/subtype
        raise Unreadable(f"Content-Type {content_type[:100]!r} is not one media type (type/subtype; parameters)")
    params = parse_query(query)
    folded_query: dict[str, str] = {}
    for name in params:
        other = folded_query.setdefault(name.casefold(), name)
        if other != name:
            # ASP.NET reads both as one parameter (the first value wins), the rules would see two
            raise Unreadable(f"query parameters {other!r} and {name!r} differ only in case")
    for name, values in list(params.items()):
        php = php_name(name)
        if php is not None and php != name:  # PHP reads ?credit.limit= as credit_limit
            params[php] = [*params.get(php, []), *values]
    if "_method" in params or _body_has_method_field(body, content_type):
        raise Unreadable("a _method parameter would make the API run another method than decided")
    attrs: dict[str, Any] = {
        "method": method.upper(),
        "host": host.lower(),
        "path": path,
        "path_keys": path_keys(path),
        "query": params,
        "query_folded": fold_paths(bracketed_heads(params)),  # ASP.NET reads ?Credit_Limit= as credit_limit
        "headers": header_attrs(headers),
        "body_size": len(body),
    }
    flattened = json_attrs(body, content_type)
    if flattened is None:
        flattened = form_attrs(body, content_type)
    if flattened is not None:
        if any(key.casefold() == "$._method" for key in flattened):  # Laravel reads JSON input as the form
            raise Unreadable("a _method field would make the API run another method than decided")
        attrs["json"] = FlatBody(flattened)
        attrs["json_folded"] = fold_paths(flattened)
    elif body:
        readable = body_text(body)
        if readable is not None:
            attrs["body_text"], omitted = readable
            if omitted:
                attrs["body_text_omitted_bytes"] = omitted
    return Request(
        protocol="http",
        action=method.upper(),
        attrs=attrs,
        target=target,
        summary=f"{method.upper()} {path}" + (f"?{shown_query}" if query else ""),
        payload=payload(method, raw_path, body, headers, credentials_digest(headers)),
        reason=reason,
        shown_attrs=shown_attrs(attrs),
    )


@dataclass(frozen=True)
class K8sCall:
    """A Kubernetes API request: what the server sees, and the policy request built from it."""

    info: K8sRequest
    request: Request


# Requests the API server can run as a dry run (nothing persisted), and the subresources whose handlers are the
# resource's own storage, which honours it. Others (eviction, binding, token, exec ...) are never taken for one.
_DRY_RUN_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
_DRY_RUN_SUBRESOURCES = frozenset({"", "status", "scale"})


def k8s_dry_run(info: K8sRequest, body: bytes) -> bool:
    """Will the API server surely run this request as a dry run (``dryRun=All``: admission and validation run,
    nothing is persisted)? A create, update or patch reads it from the query (``dryRun=All``, exactly once); a
    delete from the ``DeleteOptions`` in its body (``{"dryRun": ["All"]}``, what ``kubectl delete
    --dry-run=server`` sends) and from the query only when the body is empty, as the API server does: a body
    without it makes a ``?dryRun=All`` delete a real one. Anything else is not a dry run."""
    if not info.is_resource_request or info.action not in _DRY_RUN_VERBS:
        return False
    if info.subresource not in _DRY_RUN_SUBRESOURCES:
        return False
    if info.action in ("delete", "deletecollection") and body:
        try:
            options = loads_strict(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(options, dict) and options.get("dryRun") == ["All"]
    return info.dry_run and info.action != "deletecollection"


def k8s_attrs(info: K8sRequest) -> dict[str, Any]:
    if not info.is_resource_request:
        return {"verb": info.action, "path": info.path}
    attrs: dict[str, Any] = {
        "verb": info.action,
        "resource": f"{info.resource}/{info.subresource}" if info.subresource else info.resource,
        "api_group": info.api_group or "core",
        "namespace": info.namespace,
    }
    if info.action in _DRY_RUN_VERBS:
        attrs["dry_run"] = info.dry_run
    if info.all_namespaces:
        attrs["all_namespaces"] = True
    if info.subresource:
        attrs["subresource"] = info.subresource
    if info.name:
        attrs["name"] = info.name
    if info.subresource == "exec":
        attrs["command"] = " ".join(info.exec_command)
        if info.exec_command:
            try:
                attrs["programs"] = list(dict.fromkeys(analyse_argv(info.exec_command).names))
            except ShellParseError as exc:
                attrs["parse_error"] = str(exc)
    return attrs


def line_attrs(attrs: Mapping[str, Any], line: str, state: ShellState | None = None) -> dict[str, Any]:
    """The attributes of one line read by an exec'd shell from its stdin: those of the exec, with the line
    as ``command`` and the programs it runs as ``programs``. Raises :class:`ShellParseError` when the line
    cannot be analysed, or starts a program that would read the following lines as its own code.
    ``state``: the shell's :class:`~lictor.shell.ShellState` (what its earlier lines may have set)."""
    names = analyse(line, line=True, state=state).names
    rest = {k: v for k, v in attrs.items() if k != "parse_error"}
    return {**rest, "command": line, "programs": list(dict.fromkeys(names))}


def k8s_summary(info: K8sRequest) -> str:
    if not info.is_resource_request:
        return f"{info.action} {info.path}"
    where = f" -n {info.namespace}" if info.namespace else (" --all-namespaces" if info.all_namespaces else "")
    group = f".{info.api_group}" if info.api_group else ""
    what = f"{info.resource}{group}" + (f"/{info.name}" if info.name else "")
    text = f"{info.action} {what}{where}"
    if info.subresource and info.action != info.subresource:
        text += f" ({info.subresource})"
    if info.exec_command:
        text += " -- " + " ".join(info.exec_command)
    if info.dry_run:
        text += " (dry run)"
    return text


def k8s_request(
    *,
    method: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
    target: str,
    reason: str | None = None,
    fields: Sequence[tuple[str, str]] = (),
) -> K8sCall:
    """The ``kubernetes`` protocol request; :class:`Unreadable` for paths the API server could read otherwise.
    ``fields`` are the header fields as sent (``headers`` joins repeated ones), which an approval is bound to."""
    path_part, _, query = raw_path.partition("?")
    try:
        info = resolve(method, path_part, query, headers)
    except UnknownRequest as exc:
        raise Unreadable(str(exc)) from None
    info = dataclasses.replace(info, dry_run=k8s_dry_run(info, body))
    attrs = k8s_attrs(info)
    shown: dict[str, Any] | None = None
    if body:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        body_attrs = k8s_body_attrs(body, content_type)
        if body_attrs:
            # Approvers read the request without its body: a Secret's values, a container's environment.
            shown = dict(attrs)
            attrs.update(body_attrs)
            if "body_unreadable" in body_attrs:
                shown["body_unreadable"] = body_attrs["body_unreadable"]
    request = Request(
        protocol="kubernetes",
        action=str(attrs["verb"]),
        attrs=attrs,
        target=target,
        summary=k8s_summary(info),
        payload=payload(method, raw_path, body, fields or headers.items(), credentials_digest(headers.items())),
        reason=reason,
        shown_attrs=shown,
    )
    return K8sCall(info, request)


def k8s_body_attrs(body: bytes, content_type: str) -> dict[str, Any]:
    """The ``json`` attributes of a Kubernetes request body: the object a create or an update sends, the fields a
    merge or strategic merge patch sets, what a JSON Patch puts where (as for HTTP bodies), the object of a
    protobuf body (:mod:`._k8s_proto`, with ``json_holes`` where it may set what the gateway did not read). A
    body the API server may read but the gateway cannot (YAML that is not JSON, protobuf of a kind without a
    schema) is ``body_unreadable``: every restriction with ``json:`` matches it and no permission with ``json:``
    covers it. Invalid JSON declared as JSON is :class:`Unreadable` (the API server refuses it too)."""
    if not body:
        return {}
    media = content_type.split(";", 1)[0].strip().lower()
    if media == PROTOBUF:
        try:
            doc, holes = read_object(body)
        except ProtobufUnreadable as exc:
            return {"body_unreadable": f"{media}: {exc}"}
        if "$" in holes:
            return {"body_unreadable": f"{media}: {doc['kind'] or 'an object'} ({doc['apiVersion']}) is not read"}
        flattened = flatten_json(doc)
        attrs = {"json": FlatBody(flattened), "json_folded": fold_paths(flattened)}
        if holes:
            attrs["json_holes"] = sorted(set(holes))
        return attrs
    flattened = json_attrs(body, content_type)
    if flattened is None:
        return {"body_unreadable": media or "a body without Content-Type"}
    return {"json": FlatBody(flattened), "json_folded": fold_paths(flattened)}


_RESOURCE_ATTRIBUTE_FIELDS = {
    1: "namespace",
    2: "verb",
    3: "group",
    4: "version",
    5: "resource",
    6: "subresource",
    7: "name",
}
_NON_RESOURCE_ATTRIBUTE_FIELDS = {1: "path", 2: "verb"}


def _protobuf_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """``(field number, wire type, value)`` of one protobuf message of an access review; :class:`Unreadable`
    when it is not one."""
    try:
        return protobuf_fields(data)
    except ProtobufUnreadable as exc:
        raise Unreadable(f"{exc} in the access review") from None


def _protobuf_messages(data: bytes, *numbers: int) -> list[bytes | None]:
    """The embedded messages (length-delimited fields) ``numbers`` of ``data``, None where absent; a
    field that appears twice is :class:`Unreadable`."""
    found: dict[int, bytes] = {}
    for n, w, v in _protobuf_fields(data):
        if n in numbers and w == 2 and isinstance(v, bytes):
            if n in found:
                raise Unreadable(f"protobuf field {n} appears twice in the access review")
            found[n] = v
    return [found.get(n) for n in numbers]


def _protobuf_strings(data: bytes, names: Mapping[int, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, wire, value in _protobuf_fields(data):
        name = names.get(number)
        if name is None:
            continue  # selectors and later additions: the policy does not read them
        if wire != 2 or not isinstance(value, bytes) or name in out:
            raise Unreadable(f"protobuf field {name!r} of the access review is not one string")
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable(f"protobuf field {name!r} of the access review is not UTF-8") from None
    return out


def access_review_document(body: bytes, content_type: str) -> Any:
    """A ``SelfSubjectAccessReview`` request body as its JSON document. kubectl sends it as Kubernetes
    protobuf (``application/vnd.kubernetes.protobuf``): the magic ``k8s\\0``, then a ``runtime.Unknown``
    whose ``raw`` (field 2) is the review; only its spec's attributes are read."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != PROTOBUF:
        return loads_strict(body)
    if not body.startswith(PROTOBUF_MAGIC):
        raise Unreadable("a Kubernetes protobuf body starts with k8s\\0")
    [raw] = _protobuf_messages(body[len(PROTOBUF_MAGIC) :], 2)
    [spec] = _protobuf_messages(raw, 2) if raw is not None else [None]
    if spec is None:
        raise Unreadable("the access review has no spec")
    resource, non_resource = _protobuf_messages(spec, 1, 2)
    doc: dict[str, Any] = {}
    if resource is not None:
        doc["resourceAttributes"] = _protobuf_strings(resource, _RESOURCE_ATTRIBUTE_FIELDS)
    if non_resource is not None:
        doc["nonResourceAttributes"] = _protobuf_strings(non_resource, _NON_RESOURCE_ATTRIBUTE_FIELDS)
    return {"spec": doc}


def access_review_request(review: Any, target: str) -> Request:
    """The request a ``SelfSubjectAccessReview`` (``kubectl auth can-i``) asks about, as the policy sees it.

    Raises :class:`Unreadable` for a review that is not an object with ``spec.resourceAttributes`` or
    ``spec.nonResourceAttributes`` holding string fields.
    """
    spec = review.get("spec") if isinstance(review, dict) else None
    if not isinstance(spec, dict):
        raise Unreadable("the access review has no spec object")

    def text(attrs: Mapping[str, Any], key: str, required: bool = False) -> str:
        value = attrs.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str) or len(value) > _MAX_REVIEW_FIELD or (required and not value):
            raise Unreadable(
                f"the access review's {key!r} must be a non-empty string"
                if required
                else f"the access review's {key!r} must be a string"
            )
        return value

    resource_attrs = spec.get("resourceAttributes")
    non_resource = spec.get("nonResourceAttributes")
    if isinstance(resource_attrs, dict):
        verb = text(resource_attrs, "verb", True)
        subresource = text(resource_attrs, "subresource")
        info = K8sRequest(
            method="",
            path="",
            verb=verb,
            action=_SUBRESOURCE_ACTIONS.get(subresource, verb) if verb in ("create", "get") else verb,
            is_resource_request=True,
            api_group=text(resource_attrs, "group"),
            api_version=text(resource_attrs, "version"),
            resource=text(resource_attrs, "resource", True),
            subresource=subresource,
            namespace=text(resource_attrs, "namespace"),
            name=text(resource_attrs, "name"),
        )
    elif isinstance(non_resource, dict):
        verb = text(non_resource, "verb", True)
        info = K8sRequest(
            method="", path=text(non_resource, "path", True), verb=verb, action=verb, is_resource_request=False
        )
    else:
        raise Unreadable("the access review names neither resourceAttributes nor nonResourceAttributes")
    summary = k8s_summary(info)
    return Request(
        protocol="kubernetes",
        action=info.action,
        attrs=k8s_attrs(info),
        target=target,
        summary=summary,
        payload="can-i " + summary,
    )


def reveal_request(call: K8sCall) -> Request:
    """The second question asked for responses that carry Secret values: may this identity see them?"""
    info = call.info
    attrs = {
        "verb": "reveal",
        "resource": "secrets",
        "api_group": "core",
        "namespace": info.namespace,
        **({"all_namespaces": True} if info.all_namespaces else {}),
        **({"name": info.name} if info.name else {}),
    }
    return Request(
        protocol="kubernetes",
        action="reveal",
        attrs=attrs,
        target=call.request.target,
        summary=f"reveal secret values of: {call.request.summary}",
        payload="reveal " + call.request.payload,
        reason=call.request.reason,
    )


# -- policy tests ------------------------------------------------------------------------------------


def _test_body(case: Mapping[str, Any]) -> tuple[bytes, str]:
    if "json" in case and case["json"] is not None:
        # a JSON Patch or a merge patch is JSON too: content_type says which
        return json.dumps(case["json"]).encode(), str(case.get("content_type") or "application/json")
    body = case.get("body", "")
    return (body.encode() if isinstance(body, str) else bytes(body)), str(case.get("content_type", ""))


def build_http_requests(case: Mapping[str, Any], target: str) -> Sequence[Request]:
    """``request: {method: GET, path: /v1/x?y=1, headers: {...}, json: {...} | body: "..."}``."""
    body, content_type = _test_body(case)
    headers = [(str(k), str(v)) for k, v in (case.get("headers") or {}).items()]
    if content_type and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("content-type", content_type))
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
    return [
        http_request(
            method=str(case.get("method", "GET")),
            raw_path=str(case.get("path", "/")),
            host=str(case.get("host", "upstream")),
            headers=headers,
            body=body,
            content_type=ctype,
            target=target,
            reason=case.get("reason"),
        )
    ]


def build_k8s_requests(case: Mapping[str, Any], target: str) -> Sequence[Request]:
    """``request: {method: GET, path: /api/v1/namespaces/apps/pods}`` (``reveal: true`` asks the reveal
    question instead, as the proxy does for responses with Secret values)."""
    body, content_type = _test_body(case)
    headers = {str(k): str(v) for k, v in (case.get("headers") or {}).items()}
    if content_type and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    call = k8s_request(
        method=str(case.get("method", "GET")),
        raw_path=str(case.get("path", "/")),
        headers=headers,
        body=body,
        target=target,
        reason=case.get("reason"),
    )
    if case.get("reveal"):
        return [reveal_request(call)]
    return [call.request]
