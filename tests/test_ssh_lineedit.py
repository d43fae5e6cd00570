"""The gateway-side line editor of line-inspected shells: bytes in, echo, lines and controls out."""

from __future__ import annotations

from lictor_addons.ssh._lineedit import Echo, Eof, Line, LineEditor, Signal


def _lines(events: list[object]) -> list[str]:
    return [e.text for e in events if isinstance(e, Line)]


def _echo(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Echo))


def test_typing_echoes_and_enter_submits() -> None:
    ed = LineEditor()
    events = ed.feed(b"ls -la\r")
    assert _lines(events) == ["ls -la"]
    assert _echo(events) == b"ls -la\r\n"
    assert ed.text == ""


def test_crlf_and_lf_are_one_enter_each() -> None:
    ed = LineEditor()
    assert _lines(ed.feed(b"a\r\nb\nc\r")) == ["a", "b", "c"]
    assert _lines(ed.feed(b"\n")) == []  # the LF of a CRLF split across reads


def test_backspace_kill_line_and_kill_word() -> None:
    ed = LineEditor()
    events = ed.feed(b"rmm\x7f x\x08y")
    assert ed.text == "rm y"
    assert b"\b \b" in _echo(events)
    ed.feed(b" --force\x17")
    assert ed.text == "rm y "
    ed.feed(b"\x15")
    assert ed.text == ""
    assert _lines(ed.feed(b"echo ok\r")) == ["echo ok"]


def test_utf8_split_across_reads() -> None:
    ed = LineEditor()
    data = "echo héllo €\r".encode()
    events: list[object] = []
    for i in range(len(data)):
        events += ed.feed(data[i : i + 1])
    assert _lines(events) == ["echo héllo €"]
    ed.feed("é".encode() + b"\x7f")
    assert ed.text == ""


def test_escape_sequences_are_swallowed() -> None:
    ed = LineEditor()
    events = ed.feed(b"ls\x1b[A\x1b[1;5C\x1bOP -l\x1b[200~ x\x1b[201~\r")
    assert _lines(events) == ["ls -l x"]


def test_control_keys() -> None:
    ed = LineEditor()
    events = ed.feed(b"sleep 10\x03")
    assert Signal(b"\x03") in events and ed.text == ""
    assert Signal(b"\x1a") in ed.feed(b"\x1a")
    assert ed.feed(b"\x04") == [Eof()]  # ^D on an empty line ends the input
    events = ed.feed(b"x\x04")
    assert Eof() not in events and ed.text == "x"
    assert b"\x07" in _echo(ed.feed(b"\x01"))  # other controls ring the bell and are not inserted
    assert ed.text == "x"


def test_lines_are_bounded() -> None:
    ed = LineEditor(max_line=8)
    events = ed.feed(b"123456789012\r")
    assert _lines(events) == ["12345678"]
    assert b"\x07" in _echo(events)
