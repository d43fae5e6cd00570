"""Chunked masking of byte streams with a bounded hold-back."""

from collections import Counter

from ._errors import MaskingError
from ._scan import CONTEXT, Scanner


class StreamMasker:
    """Masks a byte stream fed in chunks of any size.

    ``feed`` returns the masked bytes that are final so far and holds back the undecided tail:
    at most the plan's longest match plus a few bytes, or, while a JWT or PEM block is open,
    up to that detector's limit (16 KiB). ``close`` returns the rest. The concatenation of
    everything returned equals ``plan.mask_bytes`` of the whole input, whatever the chunking.

    ``flush`` returns the held-back tail at once (for an idle interactive session); a match
    that straddles a flush point may then be missed, so call it only when the producer is idle.
    """

    __slots__ = ("_buf", "_closed", "_pos", "_scanned", "_scanner", "counts")

    def __init__(self, scanner: Scanner | None) -> None:
        self._scanner = scanner
        self._buf = b""
        self._pos = 0  # bytes of context at the start of _buf
        self._scanned = 0  # len(_buf) when it was last scanned
        self._closed = False
        self.counts: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        """Bytes currently held back."""
        return len(self._buf) - self._pos

    def feed(self, chunk: bytes) -> bytes:
        """Add a chunk; return the masked bytes that no later input can change."""
        if self._closed:
            raise MaskingError("feed() on a closed stream masker")
        scanner = self._scanner
        if scanner is None:
            return bytes(chunk)
        if not chunk:
            return b""
        buf = self._buf + chunk if self._buf else bytes(chunk)
        self._buf = buf
        # Rescanning the held-back tail costs its length; wait for `reach` new bytes so that
        # tiny chunks do not make the work quadratic. The decisions do not depend on timing.
        if len(buf) - self._scanned < scanner.reach:
            return b""
        return self._run(eof=False)

    def flush(self) -> bytes:
        """Return everything held back, deciding it as if the input ended here."""
        if self._closed:
            raise MaskingError("flush() on a closed stream masker")
        if self._scanner is None or self.pending == 0:
            return b""
        return self._run(eof=True)

    def flush_lines(self) -> bytes:
        """Like :meth:`flush`, up to the last newline held back only: the rest of a line still being written
        (half a card number from a producer that paused) stays held back for the bytes that complete it."""
        if self._closed:
            raise MaskingError("flush_lines() on a closed stream masker")
        if self._scanner is None:
            return b""
        buf = self._buf
        end = buf.rfind(b"\n", self._pos) + 1
        if end <= 0:
            return b""
        out: list[bytes] = []
        done = self._scanner.scan(buf[:end], self._pos, True, out, self.counts)
        cut = max(0, done - CONTEXT)
        self._buf = buf = buf[cut:]
        self._pos = done - cut
        self._scanned = len(buf)
        return b"".join(out)

    def close(self) -> bytes:
        """End of input: return the masked remainder. The masker cannot be fed afterwards."""
        if self._closed:
            return b""
        out = self.flush()
        self._closed = True
        self._buf = b""
        return out

    def _run(self, eof: bool) -> bytes:
        assert self._scanner is not None
        buf = self._buf
        out: list[bytes] = []
        done = self._scanner.scan(buf, self._pos, eof, out, self.counts)
        cut = max(0, done - CONTEXT)
        self._buf = buf = buf[cut:]
        self._pos = done - cut
        self._scanned = len(buf)
        return b"".join(out)
