"""Detectors: a named re2 pattern, an optional validator, and the group to mask.

Every pattern must have a bounded match length (see :mod:`._regex`): that bound is what a
stream masker holds back between chunks. Some built-ins use an *extension* instead of a long
counted repetition: the pattern matches a short, distinctive head and a second, anchored
pattern extends the masked group up to ``extend_limit`` bytes past the pattern's match (the
rest of a token, a JWT's payload and signature, a secret's value). A *terminated* extension
(PEM blocks) looks for the literal ``extend_find`` where ``extend`` must match (the END line),
never past ``extend_stop`` (the next BEGIN line), and falls back to ``extend_fallback`` when there
is none. The e-mail detector also extends backwards, over at most ``back_limit`` bytes of its
``extend_back`` class, to the start of the local part: a counted repetition there, in front of
``@``, multiplies the states of the combined automaton and made scanning base64 very slow.
Long counted repetitions make re2 programs large, and a large program makes every match
slower to extract; extensions keep the combined program small.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import re2

from ._errors import MaskingError
from ._regex import pattern_width
from ._styles import Style
from ._validators import VALIDATORS

MAX_CUSTOM_MATCH = 4096
"""Longest match (in bytes) a custom detector pattern may be able to produce."""

PEM_LIMIT = 16384
"""A PEM private key block is masked whole up to this many bytes from its BEGIN line."""

JWT_LIMIT = 16384
"""A JWT is masked whole up to this many bytes."""

TOKEN_LIMIT = 512
"""Vendor tokens (GitHub, Slack, Stripe) are masked whole up to this many bytes."""

SECRET_LIMIT = 1024
"""``secret_assignment`` masks a value up to this many bytes from the start of the key."""

EMAIL_LIMIT = 256
"""Bytes scanned for an e-mail domain (at most 253 bytes long)."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
RESERVED_LABELS = frozenset({"column", "path"})
_BUILTIN_NAMES = frozenset(
    {
        "private_key", "jwt", "aws_access_key_id", "github_token", "slack_token", "stripe_key", "conninfo_password",
        "secret_assignment", "aws_secret_access_key", "card", "iban", "ssn", "email", "ipv6", "ipv4", "phone",
    }
)  # fmt: skip


def re2_options() -> Any:
    """re2 options for every pattern: quiet (errors become MaskingError), and re2's default
    memory budget of 8 MiB per automaton, which the combined program fits with room to spare."""
    options = re2.Options()
    options.log_errors = False
    return options


@dataclass(frozen=True, slots=True)
class Detector:
    """A named detector.

    ``group`` is the capture group whose text is masked (0: the whole match). ``style`` and
    ``keep``, when set, are the detector's own default style, used when a rule's ``mask:``
    block does not name one. ``max_len`` is the computed bound on the match length in bytes.
    The remaining fields are only used by built-in detectors.
    """

    name: str
    pattern: str
    validator: str | None = None
    group: int = 0
    style: str | None = None
    keep: int | None = None
    max_len: int = field(default=0, compare=False)
    groups: tuple[int, ...] = ()
    extend: tuple[str | None, ...] = ()
    extend_fallback: str | None = None
    extend_limit: int = 0
    extend_find: str | None = None
    extend_stop: str | None = None
    extend_back: str | None = None
    back_limit: int = 0

    @property
    def mask_groups(self) -> tuple[int, ...]:
        """Groups tried in order; the first that took part in the match is masked."""
        return self.groups or (self.group,)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MaskingError(
            f"detector name {name!r} is invalid: use lower-case letters, digits and _, starting with a letter"
        )
    if name in RESERVED_LABELS:
        raise MaskingError(f"detector name {name!r} is reserved")
    if name in _BUILTIN_NAMES:
        raise MaskingError(f"detector name {name!r} is the name of a built-in detector")


def compile_detector(
    name: str,
    pattern: str,
    validator: str | None = None,
    group: int = 0,
    *,
    style: str | None = None,
    keep: int | None = None,
) -> Detector:
    """Check and build a custom detector.

    Raises :class:`MaskingError` when re2 refuses the pattern, when the pattern can match the
    empty string or more than :data:`MAX_CUSTOM_MATCH` bytes (``+``, ``*`` and ``{n,}`` are
    unbounded: write ``{1,64}``), when the validator is unknown, or when ``group`` does not exist.
    """
    _check_name(name)
    if not isinstance(pattern, str) or not pattern:
        raise MaskingError(f"detector {name!r}: pattern must be a non-empty string")
    if validator is not None and validator not in VALIDATORS:
        raise MaskingError(
            f"detector {name!r}: unknown validator {validator!r}; expected one of {', '.join(sorted(VALIDATORS))}"
        )
    if style is not None or keep is not None:
        Style(style or "redact", 4 if keep is None else keep)  # validates both
    try:
        compiled = re2.compile(pattern, re2_options())
    except re2.error as exc:
        raise MaskingError(f"detector {name!r}: re2 refuses pattern {pattern!r}: {_reason(exc)}") from None
    if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group <= compiled.groups:
        raise MaskingError(
            f"detector {name!r}: group {group!r} does not exist (the pattern has {compiled.groups} groups)"
        )
    width = pattern_width(pattern)
    if width.min_len == 0:
        raise MaskingError(f"detector {name!r}: pattern {pattern!r} can match the empty string")
    if width.max_len is None:
        raise MaskingError(
            f"detector {name!r}: pattern {pattern!r} can match unbounded text; streams hold back at most "
            f"{MAX_CUSTOM_MATCH} bytes, so use bounded repetition such as {{1,64}} instead of + or * or {{n,}}"
        )
    if width.max_len > MAX_CUSTOM_MATCH:
        raise MaskingError(
            f"detector {name!r}: pattern {pattern!r} can match up to {width.max_len} bytes; "
            f"the limit is {MAX_CUSTOM_MATCH}"
        )
    return Detector(name, pattern, validator, group, style, keep, max_len=width.max_len)


def _reason(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _builtin(name: str, pattern: str, validator: str | None = None, **extra: Any) -> Detector:
    width = pattern_width(pattern)
    assert width.max_len is not None and width.min_len > 0, name
    re2.compile(pattern, re2_options())
    for ext in (*extra.get("extend", ()), extra.get("extend_fallback")):
        if ext is not None:
            re2.compile(ext, re2_options())
    return Detector(name, pattern, validator, max_len=width.max_len, **extra)


_H = "[0-9A-Fa-f]{1,4}"
_V4 = r"(?:\d{1,3}\.){3}\d{1,3}"
# A space between digit groups, no-break and thin ones included (U+00A0, U+2007, U+202F, U+2009): an alternation
# of the characters themselves, which reads the same as UTF-8 bytes. _SEP adds a dot and a dash (phone numbers).
_SP = "(?: |\u00a0|\u2007|\u202f|\u2009)"
_SEP = "(?:[ .-]|\u00a0|\u2007|\u202f|\u2009)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_SECRET_KEYS = (
    "password|passwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    "|credentials?|authorization"
)
SECRET_KEY_AT_END = re.compile(rf"(?i)(?:{_SECRET_KEYS})$")
"""JSON object keys whose value ``secret_assignment`` masks (the key ends with one of them); a list or object
value has every scalar in it masked."""

_BUILTINS = (
    _builtin(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----",
        extend=(r"-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----",),
        extend_find="-----END ",
        extend_stop="-----BEGIN ",
        extend_fallback=r"(?:(?:\r?\n|\\r\\n|\\n)(?:[A-Za-z0-9+/=]{1,128}|[A-Za-z-]{1,32}: ?[^\r\n]{0,128}))*",
        extend_limit=PEM_LIMIT,
    ),
    _builtin(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8}",
        "jwt",
        extend=(r"[A-Za-z0-9_.-]*",),
        extend_limit=JWT_LIMIT,
    ),
    _builtin(
        "aws_access_key_id",
        r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}\b",
    ),
    _builtin(
        "github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22})",
        extend=(r"[A-Za-z0-9_]*",),
        extend_limit=TOKEN_LIMIT,
    ),
    _builtin(
        "slack_token",
        r"\b(?:xox[abposre]|xapp-\d)-[A-Za-z0-9-]{10}",
        extend=(r"[A-Za-z0-9-]*",),
        extend_limit=TOKEN_LIMIT,
    ),
    _builtin(
        "stripe_key",
        r"\b(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10}|whsec_[A-Za-z0-9]{24})",
        extend=(r"[A-Za-z0-9]*",),
        extend_limit=TOKEN_LIMIT,
    ),
    _builtin(
        "conninfo_password",
        # libpq connection strings (primary_conninfo, a subscription's, a setting holding one): the value of
        # password= (and sslpassword=), quoted ('...' with \' and \\ inside) or up to white space (\ escapes the
        # next character), and the password of a URI's user:password@. An array's or JSON's text doubles
        # backslashes: \\' is taken as an escaped quote too, which masks more, never less. Before
        # secret_assignment, which stops an unquoted value at , ; & and a quoted one at the first quote.
        r"(?i:password)[ \t\r\n\f\v]{0,16}=[ \t\r\n\f\v]{0,16}(?:'((?s:[^'\\]|\\{1,2}.))|((?s:[^\s'\\]|\\{1,2}.)))"
        r"|\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s:@/]{0,128}:([^\s@/]{1,128})@",
        groups=(1, 2, 3),
        # an unquoted value is not taken to end in " or } before white space, a comma, } or the end: those close
        # an element of an array's text form ({app.dsn=password=x}), which stays well-formed
        extend=(r"(?s:[^'\\]|\\{1,2}.)*", r"(?s:[^\s\\\"}]|\\{1,2}.|[\"}][^\s,}])*", None),
        extend_limit=SECRET_LIMIT,
    ),
    _builtin(
        "secret_assignment",
        rf"(?i:{_SECRET_KEYS})[\"']?[ \t]{{0,4}}[:=][ \t]{{0,4}}(?:(?i:bearer|basic|token)[ \t]{{1,4}})?"
        r"(?:\"([^\"\r\n])|'([^'\r\n])|([^\s\"',;&]))"
        r"|://[!-.0-9;-?A-~]{1,32}:([!-.0-?A-~]{1,64})@",
        groups=(1, 2, 3, 4),
        # } ends an unquoted value before white space, a comma, } or the end (an element of an array's text form)
        extend=(r"[^\"\r\n]*", r"[^'\r\n]*", r"(?:[^\s\"',;&}]|\}[^\s\"',;&}])*", None),
        extend_limit=SECRET_LIMIT,
    ),
    _builtin(
        "aws_secret_access_key",
        r"(?i:aws_?secret_?access_?key|secret_?access_?key|aws_?secret_?key|aws_?secret)[\"']?[ \t]{0,4}"
        r"[:=][ \t]{0,4}[\"']?([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+=])",
        "aws_secret",
        group=1,
    ),
    _builtin(
        "card",
        # Bounded by non-digits, not only by word boundaries: 'a'||card or card||'z' glues letters to it.
        # (Not [^0-9]: in UTF-8 mode that cannot match a byte of invalid UTF-8 next to the number.)
        # Groups separated by spaces, a no-break space included (U+00A0, narrow U+202F, figure U+2007: what
        # formatted amounts and localized output put between digit groups), by dashes, or by dots; and by a
        # space as a URL or a form encodes it (?q=4111+1111+..., %20), after an escaped character too (%20).
        rf"(?:\b|[A-Za-z_]|%[0-9A-Fa-f]{{2}})(\d{{13,19}}|\d{{4}}(?:{_SP}\d{{4}}){{2}}{_SP}\d{{1,4}}(?:{_SP}\d{{1,3}})?"
        r"|\d{4}(?:-\d{4}){2}-\d{1,4}(?:-\d{1,3})?"
        r"|\d{4}(?:\.\d{4}){2}\.\d{1,4}(?:\.\d{1,3})?"
        r"|\d{4}(?:\+\d{4}){2}\+\d{1,4}(?:\+\d{1,3})?"
        r"|\d{4}(?:%20\d{4}){2}%20\d{1,4}(?:%20\d{1,3})?"
        rf"|\d{{4}}(?:{_SP}|-|\.|\+|%20)\d{{6}}(?:{_SP}|-|\.|\+|%20)\d{{4,5}})(?:\b|[A-Za-z_])",
        "card",
        group=1,
    ),
    _builtin("iban", rf"\b[A-Z]{{2}}\d{{2}}(?:{_SP}?[A-Z0-9]){{11,30}}\b", "iban"),
    _builtin("ssn", rf"\b\d{{3}}(?:-\d{{2}}-|{_SP}\d{{2}}{_SP})\d{{4}}\b", "ssn"),
    _builtin(
        "email",
        # Internationalized addresses too (zoë@exämple.com): any non-ASCII character counts as a letter. In a
        # URL the @ is percent-encoded (mailto:jane%40example.com, ?email=jane%2Bx%40example.com); in JavaScript
        # (and C, Python, shell) source it may be an escape (jane\x40example.com), and in text no browser renders
        # (plain text, CSV, an event stream) an HTML character reference (jane&#64;example.com, &commat;).
        r"(?:[A-Za-z0-9._%+-]|[^\x00-\x7f])(?:@|%40|\\x40|&#0{0,3}64;|&#[xX]0{0,2}40;|&commat;)"
        r"(?:[A-Za-z0-9]|[^\x00-\x7f])",
        "email",
        extend=(r"(?:[A-Za-z0-9.-]|[^\x00-\x7f])*",),
        extend_limit=EMAIL_LIMIT,
        extend_back=r"[A-Za-z0-9._%+\x80-\xff-]",
        back_limit=63,
    ),
    _builtin(
        "ipv6",
        rf"\b(?:{_H}:){{6}}{_V4}|\b(?:{_H}:){{7}}{_H}"
        rf"|(?:\b{_H}(?::{_H}){{0,6}})?::(?:(?:{_H}:){{0,5}}{_V4}|{_H}(?::{_H}){{0,6}})?"
        r"(?:%[0-9A-Za-z._~-]{1,16})?",
        "ipv6",
    ),
    _builtin("ipv4", rf"\b{_OCTET}(?:\.{_OCTET}){{3}}\b", "ipv4"),
    _builtin(
        "phone",
        # Groups separated by a space (no-break and thin ones included), a dot or a dash.
        rf"\+[1-9]\d{{0,3}}(?:{_SEP}?\(\d{{1,4}}\))?(?:{_SEP}?\d{{1,4}}){{1,6}}\b"
        rf"|(?:\([2-9]\d{{2}}\){_SP}?|\b[2-9]\d{{2}}{_SEP})[2-9]\d{{2}}{_SEP}\d{{4}}\b"
        rf"|\b0[1-9]\d{{0,3}}(?:{_SEP}\d{{2,4}}){{2,4}}\b",
        "phone",
    ),
)

BUILTIN_DETECTORS: Mapping[str, Detector] = MappingProxyType({d.name: d for d in _BUILTINS})
assert set(BUILTIN_DETECTORS) == _BUILTIN_NAMES
"""Built-in detectors by name, in the order they take precedence when two match at one place."""
