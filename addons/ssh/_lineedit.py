"""The gateway-side line editor of line-inspected shells (sans-IO: bytes in, events out).

In line mode the target shell never sees keystrokes: the gateway echoes what the agent types, keeps
the line, and hands over a complete line only when Enter is pressed, so it can be analysed and
decided before anything reaches the target. Supported keys: printable text (UTF-8), Backspace
(DEL or ^H), ^U (erase line), ^W (erase word), Enter (CR, LF or CRLF), ^C / ^Z / ^\\ (interrupt,
suspend and quit, which the gateway delivers itself; the line is discarded), ^D (end of
input on an empty line, ignored otherwise). Escape sequences (arrow keys, function keys, bracketed
paste markers) are swallowed; text pasted with newlines becomes several lines. Other control
characters ring the bell.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["Echo", "Eof", "Line", "LineEditor", "Signal"]

MAX_LINE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Echo:
    data: bytes


@dataclass(frozen=True, slots=True)
class Line:
    text: str


@dataclass(frozen=True, slots=True)
class Signal:
    char: bytes  # b"\x03", b"\x1a" or b"\x1c"


@dataclass(frozen=True, slots=True)
class Eof:
    pass


Event = Echo | Line | Signal | Eof

_BELL = b"\x07"


class LineEditor:
    """Feed bytes typed by the agent; get echo, complete lines and control events back."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars: list[str] = []
        self._size = 0
        self._max = max_line
        self._esc = 0  # 0: normal, 1: after ESC, 2: inside CSI, 3: after ESC O
        self._last_cr = False

    @property
    def text(self) -> str:
        return "".join(self._chars)

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        echo = bytearray()

        def flush_echo() -> None:
            if echo:
                out.append(Echo(bytes(echo)))
                echo.clear()

        for ch in self._decoder.decode(data):
            code = ord(ch)
            if self._esc:
                if self._esc == 1:
                    self._esc = 2 if ch == "[" else 3 if ch == "O" else 0
                elif self._esc == 2:
                    if 0x40 <= code <= 0x7E:
                        self._esc = 0
                else:
                    self._esc = 0
                continue
            if ch == "\n" and self._last_cr:
                self._last_cr = False
                continue
            self._last_cr = ch == "\r"
            if ch in "\r\n":
                echo += b"\r\n"
                flush_echo()
                out.append(Line(self.text))
                self._chars.clear()
                self._size = 0
            elif ch in "\x7f\x08":
                if self._chars:
                    gone = self._chars.pop()
                    self._size -= len(gone.encode("utf-8", "replace"))
                    echo += b"\b \b"
            elif ch == "\x15":  # ^U
                echo += b"\b \b" * len(self._chars)
                self._chars.clear()
                self._size = 0
            elif ch == "\x17":  # ^W
                while self._chars and self._chars[-1] in " \t":
                    self._size -= 1
                    self._chars.pop()
                    echo += b"\b \b"
                while self._chars and self._chars[-1] not in " \t":
                    gone = self._chars.pop()
                    self._size -= len(gone.encode("utf-8", "replace"))
                    echo += b"\b \b"
            elif ch in "\x03\x1a\x1c":
                echo += {"\x03": b"^C", "\x1a": b"^Z", "\x1c": b"^\\"}[ch]
                flush_echo()
                self._chars.clear()
                self._size = 0
                out.append(Signal(ch.encode()))
            elif ch == "\x04":
                if not self._chars:
                    flush_echo()
                    out.append(Eof())
                else:
                    echo += _BELL
            elif ch == "\x1b":
                self._esc = 1
            elif ch == "\t" or code >= 0x20:
                encoded = ch.encode("utf-8", "replace")
                if self._size + len(encoded) > self._max:
                    echo += _BELL
                    continue
                self._chars.append(ch)
                self._size += len(encoded)
                echo += encoded
            else:
                echo += _BELL
        flush_echo()
        return out
