"""Showing a recorded session: the dialogue as text with its timing, and asciicast v2 export."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

from .._text import printable

__all__ = ["asciicast_lines", "is_terminal", "render", "replay", "terminal_text"]


def _when(t: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError):
        return "?"


def _pretty_sql(sql: str) -> str:
    import sqlparse  # display only: decisions never depend on it

    try:
        return str(sqlparse.format(sql, reindent=True, keyword_case="upper")).strip()
    except Exception:
        return sql.strip()


def _indent(text: str, first: str, rest: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join([first + lines[0], *(rest + line for line in lines[1:])])


_CSI = re.compile(r"\x1b\[([0-9;]*)([mKCDG])")
"""The control sequences terminal output keeps in a replay: colours and attributes (SGR), erasing in the line
(EL) and moving along it. None of them reaches above the cursor's line, where the replay's own lines are."""


def terminal_text(text: str) -> str:
    """Terminal output the agent controls, made safe for an auditor's terminal: text, newlines, ``\\r``,
    backspace and tabs, colours and the sequences that stay on the current line pass; every other control
    character or sequence is shown as ``\\xNN`` escapes. Output could otherwise move the cursor up and erase
    the replay's lines naming what ran and what was denied, switch to the alternate screen, write the
    clipboard (OSC 52) or make the terminal answer a query as if typed."""
    out: list[str] = []
    start = 0
    for match in _CSI.finditer(text):
        out.append(printable(text[start : match.start()], keep="\n\t\r\b"))
        out.append(match.group(0))
        start = match.end()
    out.append(printable(text[start:], keep="\n\t\r\b"))
    return "".join(out)


def _time(event: Mapping[str, Any]) -> float | None:
    """The event's time; None when it is not a number (an edited recording: shown all the same)."""
    t = event.get("t")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t)
    return None


def render(event: Mapping[str, Any], *, show_input: bool = False, raw: bool = False) -> str | None:
    """The text of one event as the replay shows it (None: nothing to show).

    Everything is a line or a block ending in a newline, with control characters escaped: a statement, a
    command or a URL is the agent's text, and must not drive the auditor's terminal. Terminal ``output``
    keeps what draws text on the current line (see :func:`terminal_text`); ``raw=True`` returns it as
    recorded, for full-screen programs of a raw shell.
    """
    try:
        text = _render(event, show_input=show_input)
    except (TypeError, ValueError, AttributeError):  # fields of unexpected types (an edited recording)
        text = f"[{event.get('kind', '')}] {json.dumps(event.get('data'), ensure_ascii=False, default=str)}\n"
    if text is None:
        return text
    kind = str(event.get("kind", ""))
    if kind == "output":
        return text if raw else terminal_text(text)
    if kind == "input":  # dimmed
        return f"\x1b[2m{text if raw else printable(text, keep=chr(10) + chr(9))}\x1b[0m"
    return printable(text)


def _render(event: Mapping[str, Any], *, show_input: bool = False) -> str | None:
    kind = str(event.get("kind", ""))
    data = event.get("data")
    d: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    if kind == "output":
        return str(d.get("data", ""))
    if kind == "input":
        return str(d.get("data", "")) if show_input else None
    if kind == "resize":
        return None
    if kind == "session.start":
        ident = d.get("identity") if isinstance(d.get("identity"), Mapping) else {}
        assert isinstance(ident, Mapping)
        return (
            f"── session {event.get('s')} · {ident.get('sub', '?')} → {d.get('target', '?')} "
            f"({d.get('protocol', '?')}) from {d.get('peer', '?')} · {_when(event.get('t'))}\n"
        )
    if kind == "session.end":
        return f"── end of session ({d.get('reason', '')}) · {_when(event.get('t'))}\n"
    if kind == "statement":
        text = _indent(_pretty_sql(str(d.get("sql", ""))), "sql> ", "     ")
        if d.get("params"):
            text += f"\n     params: {json.dumps(d.get('params'), ensure_ascii=False, default=str)}"
        outcome = [str(d[k]) for k in ("decision", "tag") if d.get(k)]
        if d.get("rows") is not None:
            outcome.append(f"{d['rows']} rows")
        if d.get("ms") is not None:
            outcome.append(f"{d['ms']} ms")
        if d.get("error"):
            outcome.append(f"error: {d['error']}")
        return text + ("\n  ← " + " · ".join(outcome) if outcome else "") + "\n"
    if kind == "http":
        line = f"→ {d.get('method', '?')} {d.get('url', d.get('path', '?'))}"
        if d.get("status") is not None:
            line += f"\n← {d.get('status')}"
            sizes = [f"{k.replace('_', ' ')} {d[k]}" for k in ("request_size", "response_size") if d.get(k) is not None]
            if sizes:
                line += f" ({', '.join(sizes)} bytes)"
        return line + "\n"
    if kind == "command":
        return f"$ {d.get('command', '')}\n"
    if kind == "decision":
        rules = ", ".join(map(str, d.get("rule_ids") or [])) or "?"
        what = str(d.get("action", "?")).upper()
        mark = "✓" if what == "ALLOW" else "✗"
        text = f"{mark} {what} [{rules}] {d.get('summary', '')}"
        if d.get("message"):
            text += f"\n  {d.get('message')}"
        return text + "\n"
    return f"[{kind}] {json.dumps(d, ensure_ascii=False, default=str)}\n"


def replay(
    events: Iterable[Mapping[str, Any]],
    out: TextIO,
    *,
    speed: float = 1.0,
    wait: bool = True,
    max_idle: float = 2.0,
    show_input: bool = False,
    raw: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write the dialogue to ``out``, pausing between events as they happened (``speed`` x); ``raw``: terminal
    output exactly as recorded (see :func:`render`)."""
    previous: float | None = None
    styled = False  # terminal output since the last reset set colours or attributes
    for event in events:
        t = _time(event)
        if t is not None:
            if wait and previous is not None and t > previous:
                delay = min(t - previous, max_idle) / max(speed, 1e-6)
                if delay > 0.0005:
                    out.flush()
                    sleep(delay)
            previous = t
        text = render(event, show_input=show_input, raw=raw)
        if text:
            if event.get("kind") == "output":
                styled = styled or "\x1b" in text
            elif styled:
                # The attributes terminal output set (concealed, black on black) would otherwise hide the
                # replay's own lines after it: what ran, what was denied, the end of the session.
                text = _RESET + text
                styled = False
            out.write(text)
    if styled:
        out.write(_RESET)  # and leave the auditor's terminal as it was
    out.flush()


_RESET = "\x1b[0m"


def is_terminal(events: Iterable[Mapping[str, Any]]) -> bool:
    return any(e.get("kind") in ("output", "input") for e in events)


_PEEK = 1000  # events looked at to find the terminal size and whether it is a terminal at all


def _size(data: Mapping[str, Any]) -> tuple[int, int] | None:
    for wk, hk in (("width", "height"), ("cols", "rows"), ("columns", "lines")):
        if isinstance(data.get(wk), int) and isinstance(data.get(hk), int):
            return int(data[wk]), int(data[hk])
    return None


def asciicast_lines(
    manifest: Mapping[str, Any] | None, events: Iterable[Mapping[str, Any]], *, title: str = ""
) -> Iterator[str]:
    """asciicast v2: a header line, then ``[time, code, data]`` lines.

    Terminal sessions (``output``/``input`` events among the first events) map ``output``,
    ``input`` and ``resize`` to ``o``/``i``/``r``; any other session is rendered as the text
    dialogue (``o`` events), so it plays in any player. Events are consumed as they come.
    """
    stream = iter(events)
    head = list(itertools.islice(stream, _PEEK))
    start = next((t for t in map(_time, head) if t is not None), 0.0)
    width, height = 80, 24
    for event in head:
        data = event.get("data")
        if isinstance(data, Mapping):
            size = _size(data)
            if size is not None:
                width, height = size
                break
        if event.get("kind") == "output":
            break
    header: dict[str, Any] = {
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": int(start),
        "env": {"TERM": "xterm-256color"},
    }
    if title:
        header["title"] = title
    if manifest and isinstance(manifest.get("ended_at"), (int, float)):
        header["duration"] = round(float(manifest["ended_at"]) - start, 6)
    yield json.dumps(header)
    terminal = is_terminal(head)
    at = 0.0
    for event in itertools.chain(head, stream):
        t = _time(event)
        at = round(max(t - start, 0.0), 6) if t is not None else at  # no time of its own: with the one before
        kind = event.get("kind")
        data = event.get("data")
        d: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if terminal:
            if kind == "output":
                yield json.dumps([at, "o", str(d.get("data", ""))])
            elif kind == "input":
                yield json.dumps([at, "i", str(d.get("data", ""))])
            elif kind == "resize":
                size = _size(d)
                if size is not None:
                    yield json.dumps([at, "r", f"{size[0]}x{size[1]}"])
            continue
        text = render(event)
        if text:
            yield json.dumps([at, "o", text.replace("\r\n", "\n").replace("\n", "\r\n")])
