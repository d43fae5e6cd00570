"""RESP2/RESP3 without I/O: bytes in, commands or reply events out; values in, bytes out.

Two parsers, one per direction, in the style of h11:

* :class:`CommandParser` reads what a client sends: RESP arrays of bulk strings
  (``*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n``) or inline commands (``GET k\\r\\n``, split like
  Redis' ``sdssplitargs``). It yields one :class:`Command` per complete command and raises
  :class:`ProtocolError` on anything Redis itself would reject as a protocol error.
* :class:`ReplyParser` reads what a server sends: every RESP2 and RESP3 type. It does not build
  values; it yields small events (:class:`Simple`, :class:`AggregateStart`, :class:`BulkStart`,
  :class:`BulkChunk`, :class:`BulkEnd`) so that a bulk string of hundreds of megabytes streams
  through in chunks. Each event carries its nesting ``depth`` and whether it completes a
  top-level reply (``done``), which is all a proxy needs to match replies to commands; an event
  that starts an item also says where the item sits in the reply (``path``).

Theory of operation of the reply parser: a stack holds one frame per open aggregate with the
number of items still expected (two per entry for maps and attributes). When an item completes,
the innermost frame's count drops; frames that reach zero pop and count as a completed item of
their parent, up to the top where the reply is done. An attribute (``|``) annotates the value that
follows it, so a completed attribute frame does *not* count as an item of its parent.

Limits keep memory bounded: a line (simple string, error, number, header) may not exceed
``max_line`` bytes, nesting may not exceed ``max_depth``, a command may not exceed
``max_command_bytes`` in total or ``max_args`` arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AggregateStart",
    "BulkChunk",
    "BulkEnd",
    "BulkStart",
    "Command",
    "CommandParser",
    "ProtocolError",
    "ReplyEvent",
    "ReplyParser",
    "Simple",
    "encode_bulk",
    "encode_command",
    "encode_error",
    "encode_simple",
    "split_inline",
]

CRLF = b"\r\n"

# Reply type bytes
SIMPLE_STRING = ord("+")
ERROR = ord("-")
INTEGER = ord(":")
BULK_STRING = ord("$")
ARRAY = ord("*")
NULL = ord("_")
BOOLEAN = ord("#")
DOUBLE = ord(",")
BIG_NUMBER = ord("(")
BULK_ERROR = ord("!")
VERBATIM = ord("=")
MAP = ord("%")
SET = ord("~")
ATTRIBUTE = ord("|")
PUSH = ord(">")

LINE_TYPES = frozenset({SIMPLE_STRING, ERROR, INTEGER, NULL, BOOLEAN, DOUBLE, BIG_NUMBER})
BULK_TYPES = frozenset({BULK_STRING, BULK_ERROR, VERBATIM})
AGGREGATE_TYPES = frozenset({ARRAY, MAP, SET, ATTRIBUTE, PUSH})

TYPE_NAMES = {
    SIMPLE_STRING: "simple",
    ERROR: "error",
    INTEGER: "integer",
    BULK_STRING: "bulk",
    ARRAY: "array",
    NULL: "null",
    BOOLEAN: "boolean",
    DOUBLE: "double",
    BIG_NUMBER: "bignumber",
    BULK_ERROR: "bulkerror",
    VERBATIM: "verbatim",
    MAP: "map",
    SET: "set",
    ATTRIBUTE: "attribute",
    PUSH: "push",
}


class ProtocolError(ValueError):
    """The peer sent something that is not RESP (the connection cannot continue)."""


def _parse_int(raw: bytes, what: str) -> int:
    """A strict decimal integer (optional leading ``-``), as Redis' ``string2ll`` accepts."""
    body = raw[1:] if raw[:1] == b"-" else raw
    if not body or not body.isdigit() or len(body) > 19:
        raise ProtocolError(f"invalid {what} {raw[:32]!r}")
    return int(raw)


# -- encoding -------------------------------------------------------------------------------------


def encode_command(args: Sequence[bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    return b"".join([b"*%d\r\n" % len(args), *[b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args]])


def _one_line(text: str | bytes) -> bytes:
    data = text.encode("utf-8", "backslashreplace") if isinstance(text, str) else bytes(text)
    return data.replace(b"\r", b" ").replace(b"\n", b" ")


def encode_error(message: str | bytes) -> bytes:
    """A simple error reply; ``message`` starts with the error code (``ERR``, ``NOPERM``...).

    CR and LF cannot appear in a simple error, so they become spaces.
    """
    return b"-" + _one_line(message) + CRLF


def encode_simple(text: str | bytes) -> bytes:
    """A simple string reply (``+OK``)."""
    return b"+" + _one_line(text) + CRLF


def encode_bulk(value: bytes | None, prefix: int = BULK_STRING) -> bytes:
    """A bulk string (or bulk error / verbatim string with ``prefix``); None is the RESP2 null."""
    if value is None:
        return b"$-1\r\n"
    return b"%c%d\r\n%b\r\n" % (prefix, len(value), value)


# -- inline commands ------------------------------------------------------------------------------

_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"
_SPACES = b" \t\n\r\v\f\x00"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command the way Redis does (``sdssplitargs``).

    Arguments are separated by whitespace; ``"..."`` supports ``\\xHH``, ``\\n``, ``\\r``,
    ``\\t``, ``\\b``, ``\\a`` and ``\\<char>`` escapes; ``'...'`` supports ``\\'``. A closing
    quote must be followed by whitespace or the end. Raises :class:`ProtocolError` on unbalanced
    quotes.
    """
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACES:
            i += 1
        if i >= n:
            return args
        current = bytearray()
        in_dq = in_sq = False
        while True:
            if in_dq:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i]
                if (
                    c == ord("\\")
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == ord("\\") and i + 1 < n:
                    i += 1
                    current += _ESCAPES.get(line[i], bytes([line[i]]))
                elif c == ord('"'):
                    if i + 1 < n and line[i + 1] not in _SPACES:
                        raise ProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                else:
                    current.append(c)
            elif in_sq:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i]
                if c == ord("\\") and i + 1 < n and line[i + 1] == ord("'"):
                    i += 1
                    current.append(ord("'"))
                elif c == ord("'"):
                    if i + 1 < n and line[i + 1] not in _SPACES:
                        raise ProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                else:
                    current.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in _SPACES:
                    break
                if c == ord('"'):
                    in_dq = True
                elif c == ord("'"):
                    in_sq = True
                else:
                    current.append(c)
            i += 1
        args.append(bytes(current))


# -- client -> server -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One complete command: its arguments (``args[0]`` is the command name) and wire size.

    ``too_many``: the command had this many arguments, more than the parser's ``args_limit``; it was read
    to its end but not kept, and ``args`` holds only its first two arguments, cut at 64 bytes (to name it)."""

    args: tuple[bytes, ...]
    size: int
    inline: bool = False
    too_many: int = 0


class CommandParser:
    """Parses the client side of RESP: multibulk and inline commands.

    ``feed(data)`` appends bytes; ``next_command()`` returns the next complete :class:`Command`
    or None when more bytes are needed. Empty commands (``*0``, ``*-1``, blank inline lines) are
    skipped, as Redis does.

    More than ``max_args`` arguments is a protocol error (Redis' own limit is 1024 * 1024). A command with
    more than ``args_limit`` (None: no such limit) but at most ``max_args`` is read to its end without
    keeping its arguments and returned with ``too_many`` set: the caller refuses it and the stream stays in
    step. One call reads at most ``max_steps`` arguments (or empty commands): a command of a million arguments
    already buffered (pipelined behind a command held for approval) is read over several calls, between which
    the caller lets other work run.
    """

    def __init__(
        self,
        *,
        max_command_bytes: int = 64 * 1024 * 1024,
        max_args: int = 1024 * 1024,
        max_inline: int = 64 * 1024,
        args_limit: int | None = None,
        max_steps: int = 4096,
    ) -> None:
        self.max_command_bytes = max_command_bytes
        self.max_args = max_args
        self.max_inline = max_inline
        self.args_limit = args_limit
        self.max_steps = max_steps
        self.pending = False  # the last next_command() stopped at max_steps, not for want of bytes
        self._buf = bytearray()
        self._pos = 0
        # state of a partially read multibulk command
        self._expected: int | None = None
        self._args: list[bytes] = []
        self._read = 0  # arguments read (kept in _args unless skipping)
        self._skip = False  # more arguments than args_limit: read, not kept
        self._size = 0
        self._bulk_len: int | None = None

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as commands."""
        return len(self._buf) - self._pos + self._size

    def _line(self, limit: int, what: str) -> bytes | None:
        end = self._buf.find(CRLF, self._pos, self._pos + limit + 2)
        if end < 0:
            if len(self._buf) - self._pos > limit + 1:
                raise ProtocolError(f"too big {what}")
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 2
        return line

    def next_command(self) -> Command | None:
        """The next complete command, or None: more bytes are needed, or (``pending``) ``max_steps`` arguments
        were read in this call and the rest of what is buffered waits for the next call."""
        self.pending = False
        steps = 0
        while True:
            steps += 1
            if steps > self.max_steps:
                self.pending = True
                return None
            if self._expected is None:
                if self._pos >= len(self._buf):
                    return None
                if self._buf[self._pos] != ARRAY:
                    start = self._pos
                    # Inline commands end at LF (Redis accepts a bare LF too).
                    end = self._buf.find(b"\n", self._pos, self._pos + self.max_inline + 1)
                    if end < 0:
                        if len(self._buf) - self._pos > self.max_inline:
                            raise ProtocolError("too big inline request")
                        return None
                    raw = bytes(self._buf[self._pos : end])
                    self._pos = end + 1
                    if raw.endswith(b"\r"):
                        raw = raw[:-1]
                    args = split_inline(raw)
                    if not args:
                        continue
                    if self.args_limit is not None and len(args) > self.args_limit:
                        return Command(_naming(args), self._pos - start, inline=True, too_many=len(args))
                    return Command(tuple(args), self._pos - start, inline=True)
                header = self._line(64, "multibulk count")
                if header is None:
                    return None
                count = _parse_int(header[1:], "multibulk length")
                if count > self.max_args:
                    raise ProtocolError("invalid multibulk length")
                if count <= 0:
                    continue
                self._expected = count
                self._args = []
                self._read = 0
                self._skip = self.args_limit is not None and count > self.args_limit
                self._size = len(header) + 2
            while self._read < (self._expected or 0):
                steps += 1
                if steps > self.max_steps:
                    self.pending = True
                    return None
                if self._bulk_len is None:
                    header = self._line(64, "bulk length")
                    if header is None:
                        return None
                    if header[:1] != b"$":
                        raise ProtocolError(f"expected '$', got '{header[:1].decode('latin-1')}'")
                    length = _parse_int(header[1:], "bulk length")
                    if length < 0:
                        raise ProtocolError("invalid bulk length")
                    self._size += len(header) + 2 + length + 2
                    if self._size > self.max_command_bytes:
                        raise ProtocolError(
                            f"command larger than the gateway's limit of {self.max_command_bytes} bytes"
                        )
                    self._bulk_len = length
                if len(self._buf) - self._pos < self._bulk_len + 2:
                    return None
                end = self._pos + self._bulk_len
                if self._buf[end : end + 2] != CRLF:
                    raise ProtocolError("bulk string not terminated by CRLF")
                if not self._skip:
                    self._args.append(bytes(self._buf[self._pos : end]))
                elif self._read < 2:
                    self._args.append(bytes(self._buf[self._pos : min(end, self._pos + 64)]))
                self._read += 1
                self._pos = end + 2
                self._bulk_len = None
            command = Command(tuple(self._args), self._size, too_many=(self._expected or 0) if self._skip else 0)
            self._expected = None
            self._args = []
            self._read = 0
            self._skip = False
            self._size = 0
            return command


def _naming(args: Sequence[bytes]) -> tuple[bytes, ...]:
    """What is kept of a command refused for its number of arguments: the first two, cut at 64 bytes."""
    return tuple(a[:64] for a in args[:2])


# -- server -> client -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Simple:
    """A one-line item: simple string, error, integer, null, boolean, double or big number."""

    prefix: int
    body: bytes
    depth: int
    done: bool
    path: tuple[int, ...] = field(default=(), compare=False)  # see ReplyParser.path

    @property
    def raw(self) -> bytes:
        return bytes([self.prefix]) + self.body + CRLF


@dataclass(frozen=True, slots=True)
class AggregateStart:
    """The header of an array, map, set, attribute or push (``count`` -1: RESP2 null array)."""

    prefix: int
    count: int
    depth: int
    done: bool
    path: tuple[int, ...] = field(default=(), compare=False)  # see ReplyParser.path

    @property
    def raw(self) -> bytes:
        return b"%c%d\r\n" % (self.prefix, self.count)


@dataclass(frozen=True, slots=True)
class BulkStart:
    """The header of a bulk string, bulk error or verbatim string (``length`` -1: null)."""

    prefix: int
    length: int
    depth: int
    done: bool
    path: tuple[int, ...] = field(default=(), compare=False)  # see ReplyParser.path

    @property
    def raw(self) -> bytes:
        return b"%c%d\r\n" % (self.prefix, self.length)


@dataclass(frozen=True, slots=True)
class BulkChunk:
    """Part of a bulk string's payload."""

    data: bytes
    depth: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class BulkEnd:
    """The end of a bulk string's payload (its CRLF has been consumed)."""

    depth: int
    done: bool


ReplyEvent = Simple | AggregateStart | BulkStart | BulkChunk | BulkEnd


class ReplyParser:
    """Parses the server side of RESP2/RESP3 into events (see the module docstring)."""

    def __init__(self, *, max_line: int = 1024 * 1024, max_depth: int = 128, chunk: int = 64 * 1024) -> None:
        self.max_line = max_line
        self.max_depth = max_depth
        self.chunk = chunk
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[list[int]] = []  # [prefix, items still expected, items in all]
        self._bulk_left: int | None = None  # payload bytes of the current bulk still to emit
        self._bulk_depth = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def idle(self) -> bool:
        """True between replies with nothing buffered."""
        return not self._stack and self._bulk_left is None and self._pos >= len(self._buf)

    @property
    def depth(self) -> int:
        return len(self._stack)

    @property
    def path(self) -> tuple[int, ...]:
        """Where the next item sits: its index in each open aggregate, outermost first (a map's keys
        and values counted one by one: key 0, value 1, key 2...; -1 inside an attribute)."""
        return tuple(-1 if f[0] == ATTRIBUTE else f[2] - f[1] for f in self._stack)

    def _complete(self) -> bool:
        """An item finished; True when that finished a top-level reply."""
        while self._stack:
            frame = self._stack[-1]
            frame[1] -= 1
            if frame[1] > 0:
                return False
            self._stack.pop()
            if frame[0] == ATTRIBUTE:
                return False  # the annotated value follows and is the item
        return True

    def next_event(self) -> ReplyEvent | None:
        if self._bulk_left is not None:
            return self._bulk_body()
        if self._pos >= len(self._buf):
            return None
        end = self._buf.find(CRLF, self._pos, self._pos + self.max_line + 2)
        if end < 0:
            if len(self._buf) - self._pos > self.max_line + 1:
                raise ProtocolError(f"reply line longer than {self.max_line} bytes")
            return None
        prefix = self._buf[self._pos]
        body = bytes(self._buf[self._pos + 1 : end])
        depth = len(self._stack)
        path = self.path
        if prefix in LINE_TYPES:
            if prefix == INTEGER:
                _parse_int(body, "integer")
            elif prefix == NULL and body:
                raise ProtocolError("invalid null")
            elif prefix == BOOLEAN and body not in (b"t", b"f"):
                raise ProtocolError("invalid boolean")
            self._pos = end + 2
            return Simple(prefix, body, depth, self._complete(), path)
        if prefix in BULK_TYPES:
            length = _parse_int(body, "bulk length")
            if length < -1:
                raise ProtocolError("invalid bulk length")
            self._pos = end + 2
            if length == -1:
                return BulkStart(prefix, -1, depth, self._complete(), path)
            self._bulk_left = length
            self._bulk_depth = depth
            return BulkStart(prefix, length, depth, False, path)
        if prefix in AGGREGATE_TYPES:
            count = _parse_int(body, "aggregate length")
            if count < -1 or (count == -1 and prefix not in (ARRAY, MAP, SET)):
                raise ProtocolError("invalid aggregate length")
            self._pos = end + 2
            if count == 0 and prefix == ATTRIBUTE:
                return AggregateStart(prefix, 0, depth, False, path)  # annotates the value that follows
            if count <= 0:
                return AggregateStart(prefix, count, depth, self._complete(), path)
            if depth >= self.max_depth:
                raise ProtocolError(f"reply nested deeper than {self.max_depth}")
            items = count * (2 if prefix in (MAP, ATTRIBUTE) else 1)
            self._stack.append([prefix, items, items])
            return AggregateStart(prefix, count, depth, False, path)
        raise ProtocolError(f"unknown reply type byte {bytes([prefix])!r}")

    def _bulk_body(self) -> ReplyEvent | None:
        assert self._bulk_left is not None
        available = len(self._buf) - self._pos
        if self._bulk_left > 0:
            if available == 0:
                return None
            take = min(self._bulk_left, available, self.chunk)
            data = bytes(self._buf[self._pos : self._pos + take])
            self._pos += take
            self._bulk_left -= take
            return BulkChunk(data, self._bulk_depth)
        if available < 2:
            return None
        if self._buf[self._pos : self._pos + 2] != CRLF:
            raise ProtocolError("bulk string not terminated by CRLF")
        self._pos += 2
        self._bulk_left = None
        return BulkEnd(self._bulk_depth, self._complete())

    def events(self) -> Iterable[ReplyEvent]:
        """Every event available from the bytes fed so far."""
        while (event := self.next_event()) is not None:
            yield event
