"""Showing text that agents control on an operator's terminal."""

from __future__ import annotations

from typing import Any

__all__ = ["count_arg", "printable"]


def printable(text: Any, limit: int | None = None, *, keep: str = "\n\t") -> str:
    """``text`` with terminal control characters (ESC, CR, BEL...) shown as ``\\xNN`` escapes, so that
    an agent's statement or command cannot clear, rewrite or retitle an auditor's terminal."""
    s = "" if text is None else str(text)
    out = "".join(ch if ch.isprintable() or ch in keep else f"\\x{ord(ch):02x}" for ch in s)
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
