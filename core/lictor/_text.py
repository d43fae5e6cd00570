"""Showing text that agents control on an operator's terminal."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

__all__ = ["count_arg", "left_to_right", "non_ascii_names", "printable", "rtl_runs"]

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


def non_ascii_names(text: str) -> list[str]:
    """``U+0430 CYRILLIC SMALL LETTER A`` for each distinct character of ``text`` outside ASCII, in order: a
    Cyrillic a looks like a Latin one, and a reader can tell them apart only by name."""
    return [f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".rstrip() for ch in dict.fromkeys(text) if ord(ch) > 0x7F]


@functools.cache
def rtl_runs() -> re.Pattern[str]:
    """Runs of right-to-left letters and Arabic digits (bidirectional classes R, AL and AN) with the marks
    that follow them (NSM). Between two of them, the bidirectional algorithm draws numbers and operators
    right to left: ``/*א*/ 1000000 - 1 /*ב*/`` reads ``/*ב*/ 1 - 1000000 /*א*/``."""
    strong: list[str] = []
    marks: list[str] = []
    for code in range(0x0300, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        kind = unicodedata.bidirectional(chr(code))
        if kind in ("R", "AL", "AN"):
            strong.append(chr(code))
        elif kind == "NSM":
            marks.append(chr(code))

    def ranges(chars: list[str]) -> str:
        spans: list[list[int]] = []
        for ch in chars:
            if spans and ord(ch) == spans[-1][1] + 1:
                spans[-1][1] = ord(ch)
            else:
                spans.append([ord(ch), ord(ch)])
        return "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in spans)

    first = ranges(strong)
    return re.compile(f"[{first}][{first}{ranges(marks)}]*")


def has_rtl(text: str) -> bool:
    return bool(text) and max(text) >= "\u0590" and rtl_runs().search(text) is not None


def left_to_right(text: str) -> str:
    """``text`` (already :func:`printable`) with a LEFT-TO-RIGHT MARK after every run of right-to-left letters,
    so that what lies between two runs keeps its left-to-right order wherever the text is drawn (a chat, a
    terminal that reorders): each right-to-left word reads in its own direction, in its place."""
    if not has_rtl(text):
        return text
    return rtl_runs().sub(lambda m: m.group() + "\u200e", text)


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
