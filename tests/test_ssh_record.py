"""Recording channel output: text as asciicast-compatible events, binary and oversized output as a
size and a SHA-256."""

from __future__ import annotations

import hashlib
from typing import Any

from lictor_addons.ssh._record import StreamRecord


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def test_text_is_recorded_even_when_utf8_is_split() -> None:
    sink = Sink()
    rec = StreamRecord(sink, 3, "stdout", 1 << 20)
    data = "héllo wörld\n".encode()
    rec.feed(data[:2])
    rec.feed(data[2:])
    summary = rec.close()
    text = "".join(d["data"] for k, d in sink.events if k == "output")
    assert text == "héllo wörld\n"
    assert all(d["channel"] == 3 and "stream" not in d for k, d in sink.events if k == "output")
    assert summary["binary"] is False and summary["bytes"] == len(data)
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()


def test_stderr_events_name_their_stream() -> None:
    sink = Sink()
    rec = StreamRecord(sink, 1, "stderr", 1 << 20)
    rec.feed(b"oops\n")
    rec.close()
    assert sink.events[0] == ("output", {"data": "oops\n", "channel": 1, "stream": "stderr"})


def test_binary_output_becomes_a_summary() -> None:
    sink = Sink()
    rec = StreamRecord(sink, 1, "stdout", 1 << 20)
    payload = b"text first\n" + bytes(range(256)) * 10
    rec.feed(payload[:11])
    rec.feed(payload[11:])
    rec.close()
    kinds = [k for k, _ in sink.events]
    assert kinds == ["output", "output.binary"]
    summary = sink.events[-1][1]
    assert summary["bytes"] == len(payload) and summary["recorded_bytes"] == 11
    assert summary["sha256"] == hashlib.sha256(payload).hexdigest()


def test_text_past_the_limit_is_summarised() -> None:
    sink = Sink()
    rec = StreamRecord(sink, 1, "stdout", 10)
    rec.feed(b"12345")
    rec.feed(b"6789012345")
    rec.close()
    assert [k for k, _ in sink.events] == ["output", "output.binary"]
    assert sink.events[-1][1]["bytes"] == 15


def test_truncated_utf8_at_the_end_is_binary() -> None:
    sink = Sink()
    rec = StreamRecord(sink, 1, "stdout", 100)
    rec.feed(b"ok \xc3")
    assert rec.close()["binary"] is True
