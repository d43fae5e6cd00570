"""Masking of response bodies: whole JSON documents, Kubernetes Secrets, watch streams and byte streams.

Theory of operation
-------------------
A body is transformed in one of three ways, chosen when the response headers arrive:

* **Whole document** (JSON that needs JSON-path masking or Secret masking): parsed, masked with
  :meth:`MaskPlan.mask_json` and re-serialized. Bounded by ``limit``; a bigger document is not relayed.
* **JSON stream** (Kubernetes ``watch``): one JSON object per event; each is masked on its own.
  Bounded per event.
* **Byte stream** (text, logs, ``logs -f``, anything else): detectors only, through a
  :class:`~lictor.masking.StreamMasker` that holds back the undecided tail across chunks.

Stream functions for mitmproxy's ``response.stream`` return a *list* of chunks: an empty ``bytes`` chunk
would end a chunked body early. A stream function that cannot continue raises :class:`BodyError`; the proxy
then closes the client connection, so the agent sees a truncated response, never unmasked data.

Kubernetes Secrets: values under ``data`` (base64) and ``stringData`` of every Secret object are replaced
(``data`` by valid base64 of ``[REDACTED:lictor]``, so typed clients still decode the object), and the
``kubectl.kubernetes.io/last-applied-configuration`` annotation, which repeats them, is masked the same way.

Service-account tokens: the agent gets the token a TokenRequest issues, but recordings get
:func:`mask_tokens`' copy of it and of a TokenReview, without the token. Likewise, recordings of HTTP targets get
the bodies of OAuth token requests and answers (and any JSON or form body with such fields) without the
credentials: :func:`mask_credentials`, :func:`mask_form_credentials`, :func:`mask_multipart_credentials`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import orjson

REDACTED = "[REDACTED:lictor]"
REDACTED_B64 = base64.b64encode(REDACTED.encode()).decode()
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
RECORD_LIMIT = 64 * 1024


class BodyError(Exception):
    """A body could not be masked; it must not be relayed."""


def loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _mask_secret_object(obj: dict[str, Any], counts: Counter[str]) -> None:
    data = obj.get("data")
    if isinstance(data, dict):
        for key in data:
            data[key] = REDACTED_B64
            counts["secret"] += 1
    elif data is not None and "data" in obj:
        obj["data"] = {}
    string_data = obj.get("stringData")
    if isinstance(string_data, dict):
        for key in string_data:
            string_data[key] = REDACTED
            counts["secret"] += 1
    elif string_data is not None:
        obj["stringData"] = {}
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:
            raw = annotations[LAST_APPLIED]
            try:
                inner = json.loads(raw) if isinstance(raw, str) else None
            except ValueError:
                inner = None
            if isinstance(inner, dict):
                _mask_secret_object(inner, counts)
                annotations[LAST_APPLIED] = json.dumps(inner, separators=(",", ":"))
            else:
                annotations[LAST_APPLIED] = REDACTED
            counts["secret"] += 1


def _applied_secret(node: dict[str, Any], secrets_response: bool) -> bool:
    """Does ``node``'s metadata carry a last-applied configuration that repeats a Secret's values? In a
    response about secrets any object's does (a ``PartialObjectMetadata``, which the server sends for a
    Table row and for ``as=PartialObjectMetadataList``, is a Secret's metadata); elsewhere, one that says
    it is a Secret's."""
    metadata = node.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if not isinstance(annotations, dict) or LAST_APPLIED not in annotations:
        return False
    if secrets_response:
        return True
    raw = annotations[LAST_APPLIED]
    try:
        inner = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(inner, dict) and inner.get("kind") == "Secret"


def mask_secrets(doc: Any, counts: Counter[str], *, secrets_response: bool) -> Any:
    """Mask Secret values in a parsed Kubernetes response, in place; returns ``doc``.

    Every object with ``kind: Secret`` is masked, at any depth (watch events, Table rows, lists). With
    ``secrets_response`` (the request was about the ``secrets`` resource), objects *without* a kind that
    look like API objects (``metadata`` plus ``data``/``stringData``) are masked too: list items carry no
    kind on the wire. The last-applied configuration of a Secret's metadata is masked wherever it is, also
    without the object (``PartialObjectMetadata`` in Table rows, the default of ``kubectl get secrets``).
    """
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("kind")
            if (
                kind == "Secret"
                or (
                    secrets_response
                    and kind is None
                    and "metadata" in node
                    and ("data" in node or "stringData" in node)
                )
                or _applied_secret(node, secrets_response)
            ):
                _mask_secret_object(node, counts)
            for key, value in node.items():
                if isinstance(value, (dict, list)) and key not in ("data", "stringData"):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return doc


def mask_secret_write(doc: Any, counts: Counter[str]) -> Any:
    """Mask, in place, the Secret values of a request body written to ``secrets``; returns ``doc``.

    A create or update carries a whole Secret, but a merge or strategic-merge patch only its changed fields
    (``{"data": {"pw": "..."}}``, ``{"stringData": ...}``: no kind, no metadata) and a JSON patch a list of
    operations whose ``value`` may be one value, a whole ``data`` map or a last-applied annotation: the
    top-level ``data``, ``stringData`` and last-applied configuration of an object, and the ``value`` of
    every operation, are masked."""
    if isinstance(doc, dict):
        _mask_secret_object(doc, counts)
    elif isinstance(doc, list):
        for op in doc:
            if isinstance(op, dict) and op.get("value") is not None:
                op["value"] = REDACTED
                counts["secret"] += 1
    return mask_secrets(doc, counts, secrets_response=True)


def mask_tokens(doc: Any, counts: Counter[str]) -> Any:
    """Mask, in place, the service-account token of a TokenRequest (``status.token``: what the API server
    issues) or a TokenReview (``spec.token``: what is checked, and the answer repeats it); returns ``doc``.

    Field names are compared without case (a decoder may match ``Token`` to ``token``). :class:`BodyError`
    when ``doc`` is not an object, or its ``spec`` or ``status`` neither an object nor null: where the token
    would be is then unknown."""
    if not isinstance(doc, dict):
        raise BodyError("a token request or review that is not a JSON object")
    for part, section in doc.items():
        if part.lower() not in ("spec", "status") or section is None:
            continue
        if not isinstance(section, dict):
            raise BodyError(f"the {part} of a token request or review is not an object")
        for key in section:
            if key.lower() == "token" and section[key] is not None:
                section[key] = REDACTED
                counts["token"] += 1
    return doc


# OAuth 2.0 and OpenID Connect credentials (RFC 6749, 7523, 7636, 8628, 8693) and passwords, by field name
# written without case, "_" or "-" (access_token, accessToken, AccessToken).
CREDENTIAL_FIELDS = frozenset(
    {
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "clientsecret",
        "clientassertion",
        "assertion",
        "password",
        "subjecttoken",
        "actortoken",
        "codeverifier",
        "devicecode",
    }
)
# ... and the authorization code, where a token request (one with a grant_type) sends it.
GRANT_CODE = "code"
# A word that every name of CREDENTIAL_FIELDS holds: a quick test that a text may name none of them.
CREDENTIAL_WORDS = "token|secret|assertion|password|verifier|device"


def credential_name(name: str, grant: bool) -> bool:
    """Is ``name`` the name of a credential field (``grant``: of a token request, where ``code`` is one)?"""
    folded = name.lower().replace("_", "").replace("-", "")
    return folded in CREDENTIAL_FIELDS or (grant and folded == GRANT_CODE)


def is_grant_type(name: Any) -> bool:
    """Is ``name`` the ``grant_type`` of a token request (any case, ``-`` for ``_``)?"""
    return isinstance(name, str) and name.lower().replace("-", "_") == "grant_type"


def has_grant(names: Iterable[Any]) -> bool:
    return any(map(is_grant_type, names))


def patch_sets_credential(path: Any) -> bool:
    """Whether a patch operation's ``path`` (a JSON Pointer, ``/user/password``, or a SCIM path,
    ``password``) ends in the name of a credential field: its ``value`` is then one."""
    if not isinstance(path, str):
        return False
    last = re.split(r"[/.]", path)[-1].replace("~1", "/").replace("~0", "~")
    return credential_name(last, False)


def mask_credentials(doc: Any, counts: Counter[str]) -> Any:
    """Mask, in place, the values of credential fields (:data:`CREDENTIAL_FIELDS`, and ``code`` next to a
    ``grant_type``) at any depth of a parsed JSON document; returns ``doc``. For recordings: an OAuth token
    endpoint's answer carries live tokens, its request a client secret, a password or a refresh token."""
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            grant = has_grant(node)
            # a patch operation setting a credential ({"op": "replace", "path": "/password", "value": ...})
            patched = "op" in node and node.get("value") is not None and patch_sets_credential(node.get("path"))
            for key, value in node.items():
                if (
                    isinstance(key, str)
                    and value is not None
                    and (credential_name(key, grant) or (patched and key == "value"))
                ):
                    node[key] = REDACTED
                    counts["credential"] += 1
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return doc


def mask_form_credentials(data: bytes, counts: Counter[str]) -> bytes:
    """The same for an ``application/x-www-form-urlencoded`` body: the value of each credential field is
    replaced, every other byte is kept."""
    pairs = data.split(b"&")
    names = [unquote_plus(pair.split(b"=", 1)[0].decode("utf-8", "replace")) for pair in pairs]
    grant = has_grant(names)
    out = []
    for pair, name in zip(pairs, names, strict=True):
        if b"=" in pair and credential_name(name.strip(), grant):
            pair = pair.split(b"=", 1)[0] + b"=" + quote_plus(REDACTED).encode()
            counts["credential"] += 1
        out.append(pair)
    return b"&".join(out)


_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_PART_NAME = re.compile(rb'(?i)[;\s]name\s*=\s*(?:"([^"\r\n]*)"|([^;\s]+))')


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type; None without exactly one."""
    found = _BOUNDARY.findall(content_type)
    if len(found) != 1:
        return None
    return (found[0][0] or found[0][1]).encode("latin-1", "replace")


def mask_multipart_credentials(data: bytes, boundary: bytes, counts: Counter[str]) -> bytes:
    """The same for a ``multipart/form-data`` body (maybe cut short): the value of each part named as a
    credential field is replaced (to its end, or to the end of ``data`` when it is cut), every other byte is
    kept."""
    delimiter = b"\r\n--" + boundary
    pieces = (b"\r\n" + data).split(delimiter)  # the first is what comes before the first part
    names: list[str | None] = []
    for piece in pieces[1:]:
        head, sep, _ = piece.partition(b"\r\n\r\n")
        found = _PART_NAME.search(head) if sep else None
        names.append((found.group(1) or found.group(2) or b"").decode("utf-8", "replace") if found else None)
    grant = has_grant(names)
    out = pieces[:1]
    for piece, name in zip(pieces[1:], names, strict=True):
        if name is not None and credential_name(name.strip(), grant):
            head, sep, _ = piece.partition(b"\r\n\r\n")
            piece = head + sep + REDACTED.encode()
            counts["credential"] += 1
        out.append(piece)
    return delimiter.join(out)[2:]


def _embedded_objects(doc: Any) -> list[tuple[Any, Any]]:
    """Where a Kubernetes response carries API objects inside another document: the ``items`` of a list,
    the ``object`` of a watch event, the ``object`` of a Table row; nested ones too (a watch event of a
    Table). Returned as (container, key), outer ones before those inside them."""
    found: list[tuple[Any, Any]] = []
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        here: list[tuple[Any, Any]] = []
        items = node.get("items")
        if isinstance(items, list):
            here += [(items, i) for i, item in enumerate(items) if isinstance(item, dict)]
        rows = node.get("rows")
        if isinstance(rows, list):
            here += [(row, "object") for row in rows if isinstance(row, dict) and isinstance(row.get("object"), dict)]
        if isinstance(node.get("type"), str) and isinstance(node.get("object"), dict):
            here.append((node, "object"))
        for container, key in here:
            found.append((container, key))
            stack.append(container[key])
    return found


def mask_embedded_objects(doc: Any, plan: Any, counts: Counter[str]) -> Any:
    """Apply the plan's anchored JSON paths to every API object ``doc`` embeds, as to the object itself.

    A rule's ``json_paths`` name a field of an object (``$.spec.containers[*].env[*].value``); the same pod
    reaches the agent as the whole document of a get, but as an item of a list (``kubectl get pods -o
    yaml``), the object of a watch event (``-w``) or of a Table row (``includeObject=Object``): masked only
    at the root, it would be masked for one request and shown for the next. Inner objects are masked first
    and put back into the outer ones, which are masked after them."""
    for container, key in reversed(_embedded_objects(doc)):
        container[key], found = plan.mask_json_anchored(container[key])
        counts.update(found)
    return doc


def mask_applied_configurations(doc: Any, plan: Any, counts: Counter[str]) -> None:
    """Mask, in place, the ``kubectl.kubernetes.io/last-applied-configuration`` annotation of ``doc`` and of each
    API object it embeds, as the object it repeats: ``kubectl apply`` keeps there a copy of what it applied
    (``env`` values and all), which the plan's paths, naming the object's fields, would not reach inside a
    string. One that is not a JSON object is masked whole."""
    for node in [doc, *(container[key] for container, key in _embedded_objects(doc))]:
        metadata = node.get("metadata") if isinstance(node, dict) else None
        annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
        if not isinstance(annotations, dict) or LAST_APPLIED not in annotations:
            continue
        raw = annotations[LAST_APPLIED]
        try:
            inner = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):
            inner = None
        if not isinstance(inner, dict):
            annotations[LAST_APPLIED] = REDACTED
            counts["path"] += 1
            continue
        masked, found = plan.mask_json(inner)
        if found:
            annotations[LAST_APPLIED] = json.dumps(masked, ensure_ascii=False, separators=(",", ":")) + "\n"
            counts.update(found)


# A character reference of HTML or XML: numeric (&#64; &#x40;) or named (&commat;), the ';' optional as HTML
# parsers read legacy ones.
_REFERENCE = re.compile(rb"&(?:#[0-9]{1,8}|#[xX][0-9A-Fa-f]{1,8}|[A-Za-z][A-Za-z0-9]{0,31});?")
_REFERENCE_TEXT = re.compile(r"&(?:#[0-9]{1,8}|#[xX][0-9A-Fa-f]{1,8}|[A-Za-z][A-Za-z0-9]{0,31});?")
# The characters of markup, and JSON's backslash: written as references they stay so.
_MARKUP_SIGNIFICANT = frozenset("<>&\"'\\")


def _plain_character(match: re.Match[bytes]) -> bytes:
    text = html.unescape(match.group().decode("ascii"))
    if len(text) != 1 or not " " <= text <= "~" or text in _MARKUP_SIGNIFICANT:
        return match.group()  # not one printable ASCII character, or one that is markup: kept as written
    return text.encode("ascii")


# A reference to a no-break space (U+00A0, figure U+2007, narrow U+202F) between two digits: the separator of a
# card number's groups (4111&nbsp;1111&nbsp;...), written as an ASCII space for the same reason.
_DIGIT_SPACE = r"(?<=[0-9])&(?:nbsp|#0*160|#[xX]0*[aA]0|#0*8199|#[xX]0*2007|#0*8239|#[xX]0*202[fF]);?(?=[0-9])"
_DIGIT_SPACE_BYTES = re.compile(_DIGIT_SPACE.encode())
_DIGIT_SPACE_TEXT = re.compile(_DIGIT_SPACE)


def plain_references(data: bytes) -> bytes:
    """HTML or XML with its character references to printable ASCII characters written as those characters
    (``jane&#64;example.com`` as ``jane@example.com``), as a browser shows them: in the references the
    detectors would find no address or card number. The characters of markup (``<`` ``&`` quotes) stay
    references; ASCII reads the same in UTF-8 and in the single-byte charsets the gateway relays. A no-break
    space written as a reference between two digits becomes an ASCII space (``4111&nbsp;1111...``)."""
    if b"&" not in data:
        return data
    return _REFERENCE.sub(_plain_character, _DIGIT_SPACE_BYTES.sub(b" ", data))


def may_reference(data: bytes) -> bool:
    """JSON text whose strings may hold a character reference: a ``&``, written or escaped (``\\u0026``)."""
    return b"&" in data or b"\\u0026" in data.lower()


def _plain_text_character(match: re.Match[str]) -> str:
    text = html.unescape(match.group())
    if len(text) != 1 or not " " <= text <= "~" or text in _MARKUP_SIGNIFICANT:
        return match.group()
    return text


def _plain_strings(doc: Any) -> Any:
    """``doc`` with :func:`plain_references` applied to its string values (HTML in a JSON field: a CMS page, a
    rich-text note). Keys stay as they are: two could become one."""
    if isinstance(doc, str):
        return _REFERENCE_TEXT.sub(_plain_text_character, _DIGIT_SPACE_TEXT.sub(" ", doc)) if "&" in doc else doc
    if isinstance(doc, list):
        return [_plain_strings(v) for v in doc]
    if isinstance(doc, dict):
        return {k: _plain_strings(v) for k, v in doc.items()}
    return doc


class Masking:
    """Everything that applies to one response: the decision's plan and Kubernetes Secret masking."""

    def __init__(self, plan: Any, *, kubernetes: bool, secrets: bool, secrets_response: bool) -> None:
        self.plan = plan
        self.kubernetes = kubernetes
        self.secrets = secrets  # mask Secret values (not revealed)
        self.secrets_response = secrets_response
        self.markup = False  # HTML or XML: character references are read as the characters they stand for
        self.counts: Counter[str] = Counter()

    @property
    def plan_empty(self) -> bool:
        return bool(self.plan.is_empty)

    @property
    def needs_document(self) -> bool:
        """JSON must be parsed as a whole (paths, Secrets)."""
        return bool(self.plan.has_json_paths) or (self.secrets and self.secrets_response)

    @property
    def active(self) -> bool:
        return not self.plan_empty or (self.secrets and self.secrets_response)

    def mask_document(self, doc: Any, *, references: bool = False) -> Any:
        """``references``: the document's text has a ``&``, so a string may hold HTML whose character
        references hide what the detectors look for (``jane&#64;example.com``); read as a browser shows it."""
        if references and not self.plan_empty:
            doc = _plain_strings(doc)
        if self.secrets:
            mask_secrets(doc, self.counts, secrets_response=self.secrets_response)
        if self.kubernetes and self.plan.has_json_paths:
            mask_applied_configurations(doc, self.plan, self.counts)
        if not self.plan_empty:
            doc, counts = self.plan.mask_json(doc)
            self.counts.update(counts)
            if self.kubernetes and self.plan.has_json_paths:
                doc = mask_embedded_objects(doc, self.plan, self.counts)
        return doc

    def mask_json_bytes(self, data: bytes) -> bytes:
        if not data.strip():
            return data
        if self.needs_document or b"\\u" in data:
            return dumps(self.mask_document(loads(data), references=may_reference(data)))
        # Detectors only. Without any escape, a scan of the JSON text finds exactly what a scan of each string
        # would, and it is several times cheaper than parsing. Otherwise the parsed document is masked: in the
        # text, an escape hides a value ({\"password\": \"x\"} in a string, https:\/\/user:pw@host), a card
        # may be a number (masked, it must become a string), and a secret key's value may be a list or an
        # object (masked whole there, not up to its first quote).
        if b"\\" not in data and b"&" not in data:  # a & may begin a character reference (see mask_document)
            masked, counts = self.plan.mask_bytes(data)
            if not counts:
                return data
            # Without escapes every string's text is its value, so what the scan masked inside strings is right;
            # it went wrong only where the result is no longer JSON (a card sent as a number, a secret key whose
            # value is a list or object). Checking that is a tenth of masking the parsed document.
            out = bytes(masked)
            try:
                orjson.loads(out)
            except orjson.JSONDecodeError:
                pass
            else:
                self.counts.update(counts)
                return out
        try:
            doc = json.loads(data)
        except ValueError:  # not JSON after all: masked as text
            return self.mask_bytes(data)
        except RecursionError as exc:
            raise BodyError(f"the body is not valid JSON: {exc}") from None
        return dumps(self.mask_document(doc, references=may_reference(data)))

    def mask_bytes(self, data: bytes) -> bytes:
        if self.plan_empty:
            return data
        if self.markup:
            data = plain_references(data)
        out, counts = self.plan.mask_bytes(data)
        self.counts.update(counts)
        return bytes(out)


class Scrubber:
    """Blanks the target's own credentials (the values the gateway injects) out of what the upstream
    answers, should it echo them (a debug endpoint reflecting request headers): same length, ``*``, so a
    declared Content-Length stays right. Across chunks, the bytes that could begin a credential are
    held back, but never past a newline (credentials have none), so line-by-line streams are not delayed."""

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.held = b""

    def whole(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, b"*" * len(secret))
        return data

    def feed(self, chunks: list[bytes], final: bool) -> list[bytes]:
        data = self.whole(self.held + b"".join(chunks))
        if final:
            self.held = b""
            return [data] if data else []
        cut = max(len(data) - self.keep, data.rfind(b"\n") + 1, 0)
        self.held = data[cut:]
        return [data[:cut]] if cut else []


class Tap:
    """Counts what went through and keeps the first bytes for the recording."""

    def __init__(self, limit: int = RECORD_LIMIT) -> None:
        self.size_in = 0
        self.size_out = 0
        self.limit = limit
        self.head = bytearray()
        self.scrubber: Scrubber | None = None

    def seen(self, chunk: bytes) -> None:
        self.size_in += len(chunk)

    def sent(self, chunks: list[bytes], final: bool = False) -> list[bytes]:
        if self.scrubber is not None:
            chunks = self.scrubber.feed(chunks, final)
        for chunk in chunks:
            self.size_out += len(chunk)
            room = self.limit - len(self.head)
            if room > 0:
                self.head += chunk[:room]
        return chunks


StreamFn = Callable[[bytes], list[bytes]]


def _guard(fn: Callable[[bytes, bool], list[bytes]], tap: Tap, on_error: Callable[[Exception], None]) -> StreamFn:
    """Adapt ``fn(chunk, final)`` to mitmproxy's stream protocol: ``b""`` marks the end, never return b""."""
    failed = False

    def stream(chunk: bytes) -> list[bytes]:
        nonlocal failed
        if failed:
            return []
        try:
            tap.seen(chunk)
            final = chunk == b""
            return tap.sent([c for c in fn(chunk, final) if c], final)
        except Exception as exc:  # fail closed: nothing more is relayed
            failed = True
            on_error(exc)
            return []

    return stream


def passthrough(tap: Tap, on_error: Callable[[Exception], None]) -> StreamFn:
    return _guard(lambda chunk, final: [chunk], tap, on_error)


def check_utf8_start(data: bytes) -> None:
    """Refuse UTF-16 or UTF-32 text (a byte order mark, or zero bytes among the first ones): the detectors
    read UTF-8, and in those encodings a card number or an address is not the bytes they look for."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or b"\x00" in data[:4]:
        raise BodyError("the upstream sent UTF-16 or UTF-32 text; the gateway masks UTF-8 only")


ESCAPED_LINE_LIMIT = 1024 * 1024  # a line is held back up to this size until it ends, in case it has \u escapes


def _escaped_line(masking: Masking, line: bytes) -> bytes:
    """A streamed line with ``\\u`` escapes, where the detectors cannot read the bytes (``jane\\u0040example.com``
    is no address): masked as JSON (a JSON line, or the ``data:`` field of a server-sent event), refused when
    it is neither."""
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :]
    try:
        return masking.mask_json_bytes(body) + ending
    except BodyError:
        if not body.startswith(b"data:"):
            raise BodyError("the upstream's text has \\u escapes the gateway cannot read as JSON") from None
    return b"data: " + masking.mask_json_bytes(body[5:]) + ending


def byte_stream(masking: Masking, tap: Tap, on_error: Callable[[Exception], None], *, live: bool = False) -> StreamFn:
    """Detector masking across chunk boundaries.

    ``live`` streams (``logs -f``, server-sent events) must not sit on a finished line until more output
    comes: when a chunk ends with a newline the held-back tail is decided at once (a match cannot span that
    newline unless it is a multi-line one such as a PEM block, which is then masked by its fallback pattern).

    A line is held back until it ends (up to ``ESCAPED_LINE_LIMIT``): one with ``\\u`` escapes is masked as JSON
    (see :func:`_escaped_line`), as a buffered body is.
    """
    masker = masking.plan.stream()
    head = bytearray()  # the first bytes, until there are 4 to check (see check_utf8_start)
    line = bytearray()  # the start of the current line, held back until it ends
    fed = b""  # the last byte of the current line already given to the masker (b"" when none was)

    def plain(data: bytes) -> bytes:
        return plain_references(data) if masking.markup else data

    def escaped(done: bytes) -> bytes:
        out: list[bytes] = []
        for each in done.split(b"\n")[:-1]:
            each += b"\n"
            if b"\\u" in each:
                out.append(masker.flush())
                out.append(_escaped_line(masking, each))
            else:
                out.append(masker.feed(plain(each)))
        return b"".join(out)

    def lines(chunk: bytes) -> bytes:
        nonlocal fed
        out = b""
        if fed:  # a line too long to hold back is being fed as it comes
            nl = chunk.find(b"\n")
            piece = chunk if nl < 0 else chunk[: nl + 1]
            if b"\\u" in fed + piece:
                raise BodyError("the upstream's text has \\u escapes in a line too long to read as JSON")
            if masking.markup and b"&" in fed + piece:  # a reference may straddle two pieces
                raise BodyError("the upstream's markup has character references in a line too long to read")
            out = masker.feed(piece)
            if nl < 0:
                fed = piece[-1:]
                return out
            fed = b""
            chunk = chunk[nl + 1 :]
        last = chunk.rfind(b"\n") + 1
        line.extend(chunk)
        if last:
            cut = len(line) - len(chunk) + last
            done = bytes(line[:cut])
            del line[:cut]
            out += escaped(done) if b"\\u" in done else masker.feed(plain(done))
        if len(line) > ESCAPED_LINE_LIMIT:
            if b"\\u" in line:
                raise BodyError("the upstream's text has \\u escapes in a line too long to read as JSON")
            if masking.markup and b"&" in line:
                raise BodyError("the upstream's markup has character references in a line too long to read")
            out += masker.feed(bytes(line))
            fed = bytes(line[-1:])
            line.clear()
        return out

    def fn(chunk: bytes, final: bool) -> list[bytes]:
        if len(head) < 4 and (chunk or final):
            head.extend(chunk[: 4 - len(head)])
            if len(head) >= 4 or final:
                check_utf8_start(bytes(head))
        if final:
            out = b""
            if line:
                out = (
                    masker.flush() + _escaped_line(masking, bytes(line))
                    if b"\\u" in line
                    else masker.feed(plain(bytes(line)))
                )
                line.clear()
            out += masker.close()
            masking.counts.update(masker.counts)
            return [out]
        out = lines(chunk)
        if live and chunk.endswith(b"\n"):
            out += masker.flush()
        return [out]

    return _guard(fn, tap, on_error)


def document_stream(
    masking: Masking,
    limit: int,
    tap: Tap,
    on_error: Callable[[Exception], None],
    too_large: Callable[[], bytes] | None = None,
) -> StreamFn:
    """Buffer a JSON document of unknown length (up to ``limit`` bytes), mask it whole at the end.

    Past ``limit``, what was buffered is dropped and so is the rest of the body: ``too_large()`` gives what the
    agent gets instead (it is called once, while the response's head can still be replaced); without it, the
    stream fails."""
    buf = bytearray()
    refused = False

    def fn(chunk: bytes, final: bool) -> list[bytes]:
        nonlocal refused
        if refused:
            return []
        if not final:
            buf.extend(chunk)
            if len(buf) > limit:
                if too_large is None:
                    raise BodyError(f"JSON response larger than {limit} bytes cannot be masked as a whole")
                refused = True
                buf.clear()
                return [too_large()]
            return []
        check_utf8_start(bytes(buf[:4]))
        return [masking.mask_json_bytes(bytes(buf))]

    return _guard(fn, tap, on_error)


def json_event_stream(masking: Masking, limit: int, tap: Tap, on_error: Callable[[Exception], None]) -> StreamFn:
    """A stream of JSON values (Kubernetes watch: one object per line), each masked on its own.

    Values are split at newlines; a segment that does not parse yet (an object spread over lines) waits for
    the next newline. One value may not exceed ``limit`` bytes.
    """
    buf = bytearray()

    def emit(segment: bytes) -> bytes:
        return masking.mask_json_bytes(segment) + b"\n"

    def fn(chunk: bytes, final: bool) -> list[bytes]:
        out: list[bytes] = []
        if final:
            if bytes(buf).strip():
                out.append(emit(bytes(buf)))
            buf.clear()
            return out
        start = len(buf)
        buf.extend(chunk)
        search = start
        begin = 0
        while True:
            nl = buf.find(b"\n", search)
            if nl < 0:
                break
            segment = bytes(buf[begin:nl])
            if segment.strip():
                try:
                    doc = json.loads(segment)
                except ValueError:
                    search = nl + 1  # incomplete: keep accumulating
                    continue
                except RecursionError as exc:
                    raise BodyError(f"watch event nested too deeply: {exc}") from None
                out.append(dumps(masking.mask_document(doc, references=may_reference(segment))) + b"\n")
            begin = search = nl + 1
        del buf[:begin]
        if len(buf) > limit:
            raise BodyError(f"a streamed JSON value is larger than {limit} bytes")
        return out

    return _guard(fn, tap, on_error)
