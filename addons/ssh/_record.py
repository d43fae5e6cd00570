"""Recording what flows through a channel as asciicast-compatible session events.

``output`` events carry text (``{"data": ..., "channel": n}``, plus ``"stream": "stderr"`` for
stderr), ``input`` events what the agent typed, ``resize`` events the terminal size. Output that is
not UTF-8 text (a binary file sent through ``cat``) cannot be represented in a terminal recording:
from the first byte that does not decode, the stream is recorded as a count and a SHA-256 only
(``output.binary`` at the end). Past ``limit`` bytes a text stream is also summarised the same way,
so a recording stays bounded whatever the command prints. The input of a program without a terminal (what
an agent pipes into ``ssh host 'psql'``) is recorded the same way, as ``input`` events (``input.binary``).
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Callable
from typing import Any

__all__ = ["StreamRecord"]


class StreamRecord:
    """Records one output stream of one channel (bounded memory)."""

    __slots__ = (
        "_decoder", "_hash", "_limit", "_record", "binary", "channel", "kind", "recorded", "stream", "total",
    )  # fmt: skip

    def __init__(
        self,
        record: Callable[[str, dict[str, Any]], None],
        channel: int,
        stream: str,
        limit: int,
        kind: str = "output",
    ) -> None:
        self._record = record
        self.kind = kind
        self.channel = channel
        self.stream = stream
        self._limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._hash = hashlib.sha256()
        self.binary = False
        self.total = 0
        self.recorded = 0

    def _event(self, text: str) -> dict[str, Any]:
        event: dict[str, Any] = {"data": text, "channel": self.channel}
        if self.stream not in ("stdout", "stdin"):
            event["stream"] = self.stream
        return event

    def feed(self, data: bytes) -> None:
        """Record ``data`` as the agent saw it (after masking)."""
        if not data:
            return
        self.total += len(data)
        self._hash.update(data)
        if self.binary:
            return
        if self.recorded + len(data) > self._limit:
            self.binary = True
            return
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError:
            self.binary = True
            return
        if text:
            self.recorded += len(data)
            self._record(self.kind, self._event(text))

    def close(self) -> dict[str, Any]:
        """End of stream: record the summary; return it (bytes, sha256, whether text was recorded)."""
        summary: dict[str, Any] = {
            "channel": self.channel,
            "stream": self.stream,
            "bytes": self.total,
            "sha256": self._hash.hexdigest(),
        }
        if not self.binary:
            try:
                tail = self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.binary = True
                tail = ""
            if tail:
                self._record(self.kind, self._event(tail))
        if self.binary:
            summary["recorded_bytes"] = self.recorded
            self._record(f"{self.kind}.binary", summary)
        summary["binary"] = self.binary
        return summary
