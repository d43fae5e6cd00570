"""Masking styles: what a sensitive value is replaced with.

All styles work on UTF-8 bytes and return UTF-8 bytes:

- ``redact``: ``[REDACTED:<label>]``.
- ``partial``: every letter and digit becomes ``*`` except the last ``keep`` of them; other
  characters (separators, no-break spaces and ``%20``, ``@``, ``.``) are kept so the shape stays
  readable. At most half of the letters and digits are ever kept, so a short value is never shown whole.
- ``hash``: ``[HASH:<label>:<16 hex>]``, the first 64 bits of HMAC-SHA256(key, value). The
  same value gives the same token under every label, so equality and joins still work.
- ``preserve-length``: the same number of bytes; ASCII digits become digits, ASCII letters
  letters of the same case, other ASCII characters, no-break spaces and ``%20`` are kept, and each byte
  of another non-ASCII character becomes an ASCII letter (so the byte length is kept and the result is valid
  UTF-8). The replacement characters come from HMAC-SHA256(key, value): deterministic per key,
  different for different values.
"""

import hashlib
import hmac
from dataclasses import dataclass

from ._errors import MaskingError

STYLES = ("redact", "partial", "hash", "preserve-length")
DEFAULT_KEEP = 4

# Strength used when several rules mask the same thing differently: the strongest wins.
_STRENGTH = {"partial": 0, "preserve-length": 1, "hash": 2, "redact": 3}

_DIGITS = b"0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = b"abcdefghijklmnopqrstuvwxyz"


def _build_preserve_table() -> bytes:
    """table[(byte << 8) | keystream_byte] -> replacement byte."""
    table = bytearray(65536)
    for b in range(256):
        for k in range(256):
            if 48 <= b <= 57:
                out = _DIGITS[(b - 48 + k) % 10]
            elif 65 <= b <= 90:
                out = _UPPER[(b - 65 + k) % 26]
            elif 97 <= b <= 122:
                out = _LOWER[(b - 97 + k) % 26]
            elif b >= 128:
                out = _LOWER[k % 26]
            else:
                out = b
            table[(b << 8) | k] = out
    return bytes(table)


_PRESERVE = _build_preserve_table()
_PARTIAL_TABLE = bytes(42 if (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or b >= 128) else b for b in range(256))


@dataclass(frozen=True, slots=True)
class Style:
    """A masking style and its parameter (``keep`` is only used by ``partial``)."""

    kind: str = "redact"
    keep: int = DEFAULT_KEEP

    def __post_init__(self) -> None:
        if self.kind not in STYLES:
            raise MaskingError(f"unknown masking style {self.kind!r}; expected one of {', '.join(STYLES)}")
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or not 0 <= self.keep <= 64:
            raise MaskingError(f"keep must be an integer between 0 and 64, got {self.keep!r}")

    @property
    def needs_key(self) -> bool:
        return self.kind in ("hash", "preserve-length")

    def stronger(self, other: "Style") -> "Style":
        """The more protective of two styles (for merging several rules)."""
        a, b = _STRENGTH[self.kind], _STRENGTH[other.kind]
        if a != b:
            return self if a > b else other
        return self if self.keep <= other.keep else other


def _keystream(key: bytes, value: bytes, n: int) -> bytes:
    out = hmac.digest(key, b"preserve-length\x00" + value, "sha256")
    counter = 1
    while len(out) < n:
        out += hmac.digest(key, counter.to_bytes(4, "big") + b"preserve-length\x00" + value, "sha256")
        counter += 1
    return out


def hash_hex(key: bytes, value: bytes) -> str:
    return hmac.digest(key, value, hashlib.sha256).hex()[:16]


def apply_style(style: Style, key: bytes, label: str, value: bytes) -> bytes:
    """Masked replacement for ``value``; ``label`` names the detector, ``column`` or ``path``."""
    kind = style.kind
    if kind == "redact":
        return b"[REDACTED:" + label.encode() + b"]"
    if kind == "hash":
        return f"[HASH:{label}:{hash_hex(key, value)}]".encode()
    if kind == "partial":
        return _partial(value, style.keep)
    ks = _keystream(key, value, len(value))
    return _keep_spaces(value, bytes([_PRESERVE[(b << 8) | k] for b, k in zip(value, ks, strict=False)]))


# No-break and thin spaces (U+00A0, U+2007, U+202F, U+2009) separate digit groups as a space does: partial and
# preserve-length keep them where they are, as they keep ASCII separators.
WIDE_SPACES = ("\u00a0".encode(), "\u2007".encode(), "\u202f".encode(), "\u2009".encode())


# ... and so does a space a URL encodes (4111%201111...): kept whole, the escape stays one.
URL_SPACE = b"%20"


def _keep_spaces(value: bytes, masked: bytes) -> bytes:
    if value.isascii() and URL_SPACE not in value:
        return masked
    out = bytearray(masked)
    for space in (*WIDE_SPACES, URL_SPACE):
        at = value.find(space)
        while at >= 0:
            out[at : at + len(space)] = space
            at = value.find(space, at + len(space))
    return bytes(out)


def _partial(value: bytes, keep: int) -> bytes:
    masked = _keep_spaces(value, value.translate(_PARTIAL_TABLE))
    if keep == 0:
        return masked
    # Positions of ASCII letters and digits: the only characters partial keeps (not the 20 of a %20).
    positions = [i for i, b in enumerate(value) if 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122]
    if URL_SPACE in value:
        positions = [i for i in positions if value[i - 1 : i + 1] != b"%2" and value[i - 2 : i + 1] != URL_SPACE]
    keep = min(keep, len(positions) // 2)
    if keep == 0:
        return masked
    out = bytearray(masked)
    for i in positions[-keep:]:
        out[i] = value[i]
    return bytes(out)
