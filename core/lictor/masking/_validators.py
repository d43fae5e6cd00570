"""Validators: checks that run on a regex candidate before it is masked.

A validator is called as ``validator(data, start, end)`` where ``data[start:end]`` is the
candidate (the span that would be masked) and the rest of ``data`` is context: at least one
byte before ``start`` and two bytes after ``end`` are present when they exist in the input, so
a validator may look at its neighbours. It returns the end of the accepted span, which may be
shorter than ``end`` when a trailing group was swallowed by the pattern (``4111 1111 1111 1111
12`` accepts ``4111 1111 1111 1111``), or -1 to reject the candidate. A validator that knows
that every candidate of its detector starting before some position ``p`` would be rejected too
may return ``-(p + 2)``: the scanner then skips them without asking (this keeps crafted input
from making the scan quadratic).

Validators only run on candidates, never on every byte, and they never allocate more than a
copy of the candidate.
"""

import ipaddress
import re
import string
from collections.abc import Callable, Mapping

from ._styles import WIDE_SPACES  # no-break and thin spaces, which separate digit groups as a space does

Validator = Callable[[bytes, int, int], int]

_SEPARATORS = b" -"
_DIGITS = frozenset(b"0123456789")
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_NOT_DIGITS = bytes(b for b in range(256) if b not in _DIGITS)  # bytes.translate deletion tables
_NOT_ALNUM = bytes(b for b in range(256) if b not in _ALNUM)
_HEXCOLON = frozenset(b"0123456789ABCDEFabcdef:")
_WORD = _ALNUM | frozenset(b"_")


_LUHN_DOUBLE = bytes(sum(divmod(2 * (b - 48), 10)) if 48 <= b <= 57 else 0 for b in range(256))
_LUHN_SINGLE = bytes(b - 48 if 48 <= b <= 57 else 0 for b in range(256))


def luhn_ok(digits: bytes) -> bool:
    """Luhn checksum over ASCII digits (no separators); table lookups, no per-digit Python."""
    rev = digits[::-1]
    return (sum(rev[0::2].translate(_LUHN_SINGLE)) + sum(rev[1::2].translate(_LUHN_DOUBLE))) % 10 == 0


def _trim_groups(data: bytes, start: int, end: int, check: Callable[[bytes], bool], seps: bytes, tries: int = 4) -> int:
    """Accept ``data[start:end]`` or, failing that, one of its prefixes that end before a
    separator (longest first, at most ``tries`` spans in all)."""
    for _ in range(tries):
        if check(data[start:end]):
            return end
        cut = -1
        for sep in seps:
            cut = max(cut, data.rfind(sep, start, end))
        if cut <= start:
            return -1
        end = cut
        while end > start and data[end - 1] in seps:
            end -= 1
    return -1


def _narrow(span: bytes) -> bytes:
    """``span`` with its no-break and thin spaces as ASCII spaces (for the checks, which count separators)."""
    if not span.isascii():
        for space in WIDE_SPACES:
            span = span.replace(space, b" ")
    return span


# ... and a space as URLs and forms encode it (+, %20)
_CARD_SEPARATORS = (b" ", b"-", b".", b"+", b"%20", *WIDE_SPACES)
# The separators a span may hold, by the first byte after its first group of four.
_CARD_SEPARATORS_AFTER = {
    first: tuple(sep for sep in _CARD_SEPARATORS if sep[0] == first) for first in {sep[0] for sep in _CARD_SEPARATORS}
}


def _card_ok(span: bytes) -> bool:
    if b"%" in span:
        span = span.replace(b"%20", b" ")
    digits = _narrow(span).translate(None, b" -.+")
    return 13 <= len(digits) <= 19 and digits[0] != 48 and luhn_ok(digits)


def card(data: bytes, start: int, end: int) -> int:
    """Payment card: 13-19 digits (spaces, no-break spaces, dashes or dots allowed, and spaces encoded as
    ``+`` or ``%20``), not starting with 0, Luhn valid.

    A trailing group the pattern took in (``4111 1111 1111 1111 123``) may be dropped; a
    grouped card has at most two groups too many to be tried."""
    # The built-in pattern puts one kind of separator between all the groups: only that one is looked for.
    seps = _CARD_SEPARATORS_AFTER.get(data[start + 4], _CARD_SEPARATORS) if end - start > 4 else _CARD_SEPARATORS
    for _ in range(3):
        span = data[start:end]
        if _card_ok(span):
            return end
        if span.isdigit():  # no group to drop
            return -1
        cut = max(data.rfind(sep, start, end) for sep in seps)
        if cut <= start:
            return -1
        end = cut
        while end > start and (sep := next((s for s in seps if data.endswith(s, start, end)), None)):
            end -= len(sep)
    return -1


def luhn(data: bytes, start: int, end: int) -> int:
    """Any digit string whose digits (separators ignored) pass the Luhn check."""
    digits = data[start:end].translate(None, _NOT_DIGITS)  # in C: custom patterns may offer many candidates
    return end if len(digits) >= 2 and luhn_ok(digits) else -1


def _mod97_value(text: bytes) -> int:
    """ISO 7064 MOD 97-10 remainder after turning letters into 10..35."""
    rem = 0
    for ch in text:
        if 48 <= ch <= 57:
            rem = (rem * 10 + ch - 48) % 97
        else:
            v = (ch | 0x20) - 87  # a=10 .. z=35
            if not 10 <= v <= 35:
                return -1
            rem = (rem * 100 + v) % 97
    return rem


def mod97(data: bytes, start: int, end: int) -> int:
    """Alphanumerics (separators ignored) read as an ISO 7064 MOD 97-10 number equal 1 mod 97."""
    text = data[start:end].translate(None, _NOT_ALNUM)
    return end if text and _mod97_value(text) == 1 else -1


# Official IBAN lengths per country (SWIFT IBAN registry). Unknown countries only need mod 97.
_IBAN_LENGTHS: Mapping[bytes, int] = {
    k.encode(): v
    for k, v in {
        "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
        "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
        "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
        "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
        "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
        "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
        "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
        "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
        "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    }.items()
}  # fmt: skip


def _iban_ok(span: bytes) -> bool:
    text = _narrow(span).translate(None, b" ")
    if not 15 <= len(text) <= 34:
        return False
    expected = _IBAN_LENGTHS.get(text[:2])
    if expected is not None and expected != len(text):
        return False
    return _mod97_value(text[4:] + text[:4]) == 1


def iban(data: bytes, start: int, end: int) -> int:
    """IBAN: country code, check digits, BBAN; the registry length where known; MOD 97 == 1."""
    return _trim_groups(data, start, end, _iban_ok, b" ")


def ssn(data: bytes, start: int, end: int) -> int:
    """US SSN: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    digits = data[start:end].translate(None, _NOT_DIGITS)
    if len(digits) != 9:
        return -1
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in (b"000", b"666") or area[0] == 57 or group == b"00" or serial == b"0000":
        return -1
    return end


def _phone_ok(span: bytes) -> bool:
    span = _narrow(span)
    digits = sum(1 for b in span if b in _DIGITS)
    if span[:1] == b"+":
        return 8 <= digits <= 15
    if span[:1] == b"(" or span[:1] != b"0":
        return digits == 10  # North American: (NXX) NXX-XXXX
    if not 9 <= digits <= 12:
        return False
    # National numbers with a trunk 0 must use one separator throughout ("06 12 34 56 78"),
    # which tells them apart from dates such as 01-02-2024 12.
    seps = {b for b in span if b not in _DIGITS}
    return len(seps) == 1


def phone(data: bytes, start: int, end: int) -> int:
    """Phone number: E.164 (+ and 8-15 digits), North American, or national with a trunk 0."""
    return _trim_groups(data, start, end, _phone_ok, b" .-")


def ipv4(data: bytes, start: int, end: int) -> int:
    """Dotted quad not embedded in a longer dotted number (``1.2.3.4.5`` is left alone)."""
    if start > 0 and data[start - 1] == 46:  # "."
        return -1
    if end + 1 < len(data) and data[end] == 46 and data[end + 1] in _DIGITS:
        return -1
    return end


def ipv6(data: bytes, start: int, end: int) -> int:
    """IPv6 address accepted by :mod:`ipaddress`, not glued to surrounding hex or word text."""
    if start > 0 and (data[start - 1] in _WORD or data[start - 1] in b":."):
        return -1
    if end < len(data) and (data[end] in _HEXCOLON or data[end] in _WORD):
        return -1
    text = data[start:end]
    if text == b"::":
        return -1
    addr = text.split(b"%", 1)[0]
    try:
        ipaddress.IPv6Address(addr.decode("ascii"))
    except ValueError:
        return -1
    return end


def aws_secret(data: bytes, start: int, end: int) -> int:
    """A 40-character base64 run with upper, lower case and digits (not a hex digest)."""
    span = data[start:end]
    if span.lower() == span or span.upper() == span:
        return -1
    if not any(b in _DIGITS for b in span):
        return -1
    return end


_LETTERS = string.ascii_letters.encode()
# Hex of the percent-escapes that may end a local part before %40: an ASCII character allowed there (+ above all)
# or a byte of a UTF-8 character (zo%C3%AB%40example.com).
_LOCAL_ESCAPES = frozenset(
    f"{b:02X}".encode()
    for b in range(256)
    if b >= 0x80 or chr(b) in string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
)


# An @ written otherwise: percent-encoded, a source code escape, an HTML character reference.
_WRITTEN_AT = re.compile(rb"%40|\\x40|&#0{0,3}64;|&#[xX]0{0,2}40;|&commat;")


def email(data: bytes, start: int, end: int) -> int:
    """E-mail address: the domain is trimmed to its last label of 2-24 letters after a dot (digits
    right after those letters are not part of it). In a URL the ``@`` may be written ``%40``; the local
    part then does not end in an escape of a character no address has there (``foo%20%40bar.com``). It may
    also be written ``\x40`` (JavaScript, C, Python) or as a character reference (``&#64;``, ``&#x40;``,
    ``&commat;``)."""
    at = data.find(b"@", start, end)
    domain = at + 1
    if at < 0:
        # the domain never holds a %, \ or &: the last one is the separator (the local part may hold a %40 too)
        at = data.rfind(b"%40", start, end)
        if at >= 0 and data.find(b"\\", at, end) < 0 and data.find(b"&", at, end) < 0:
            domain = at + 3  # the common case, without the regular expression
        else:
            spans = [m.span() for m in _WRITTEN_AT.finditer(data, start, end)]
            if not spans:
                return -1
            at, domain = spans[-1]
        escaped = at - 3 >= start and data[at - 3] == 37  # %40 after another escape: foo%20%40bar.com
        if data[at] == 37 and escaped and data[at - 2 : at].upper() not in _LOCAL_ESCAPES:
            return -1
    while end > domain:
        while end > domain and data[end - 1] in b".-":
            end -= 1
        dot = data.rfind(b".", domain, end)
        if dot < 0:
            return -1
        tld = data[dot + 1 : end]
        letters = len(tld) - len(tld.lstrip(_LETTERS))
        # ann@example.com1, ann@example.com-4111... (text glued to the address, as by email||'1'): the
        # address ends with the letters
        if 2 <= letters <= 24:
            return dot + 1 + letters
        end = dot
    return -1


def jwt(data: bytes, start: int, end: int) -> int:
    """JWT (JWS or JWE compact form): base64url segments joined by 2 or 4 dots.

    With fewer than 2 dots, no token starting later in the same run can have more: the
    candidates up to ``end`` are all rejected at once (see ``Validator``)."""
    dots: list[int] = []
    at = data.find(b".", start, end)
    while at >= 0 and len(dots) < 6:
        dots.append(at)
        at = data.find(b".", at + 1, end)
    if len(dots) < 2:
        return -(end + 2)
    if len(dots) in (3, 5) and dots[-1] == end - 1:  # a sentence's full stop after the token
        end -= 1
        dots.pop()
    if len(dots) not in (2, 4) or dots[0] - start < 10:
        return -1
    return end


VALIDATORS: Mapping[str, Validator] = {
    "luhn": luhn,
    "card": card,
    "mod97": mod97,
    "iban": iban,
    "ssn": ssn,
    "phone": phone,
    "ipv4": ipv4,
    "ipv6": ipv6,
    "aws_secret": aws_secret,
    "email": email,
    "jwt": jwt,
}
"""Validators a custom detector may name. Each is documented in docs/masking.md."""
