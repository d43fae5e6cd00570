"""Showing text that agents control on an operator's terminal."""

from __future__ import annotations

from typing import Any

__all__ = ["count_arg", "printable"]

# Characters str.isprintable() accepts that show as nothing or as a blank: Unicode's default-ignorable code
# points that are not format characters (variation selectors, the combining grapheme joiner, Hangul fillers,
# Mongolian and Khmer ones, tag-range variation selectors) and the blank Braille pattern. In an identifier,
# a path or a quoted value they make the text that runs differ from the text a reader sees.
_BLANK = frozenset(
    chr(c)
    for first, last in (
        (0x034F, 0x034F),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x180B, 0x180F),
        (0x2800, 0x2800),
        (0x3164, 0x3164),
        (0xFE00, 0xFE0F),
        (0xFFA0, 0xFFA0),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0000, 0xE0FFF),
    )
    for c in range(first, last + 1)
)


def printable(text: Any, limit: int | None = None, *, keep: str = "\n\t") -> str:
    """``text`` with terminal control characters (ESC, CR, BEL...) shown as ``\\xNN`` escapes, so that
    an agent's statement or command cannot clear, rewrite or retitle an auditor's terminal; so are
    characters that show as nothing (bidirectional overrides, zero-width spaces, variation selectors,
    Hangul fillers), so that what a reader sees is all of what is there."""
    s = "" if text is None else str(text)
    out = "".join(ch if (ch.isprintable() and ch not in _BLANK) or ch in keep else f"\\x{ord(ch):02x}" for ch in s)
    if limit is not None and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


def count_arg(text: str) -> int:
    """An argparse type for counts such as ``--limit``: a whole number of at least 1 (a negative
    ``--limit`` cut the list from the wrong end, and 0 meant no limit)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
