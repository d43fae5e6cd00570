"""Sans-IO codec for the PostgreSQL frontend/backend protocol, version 3.

Nothing here touches a socket: readers take ``bytes`` in and hand messages out, builders take values in and
hand ``bytes`` out. The asyncio listener only moves bytes between sockets and these objects.

Theory of operation
===================

Framing
-------
After the startup phase every message is ``type byte | int32 length | body`` where the length counts itself
and the body but not the type byte. Readers split the stream by reading headers only; a body is decoded only
when someone asks for it. Every decoded message keeps its exact ``raw`` bytes, so forwarding a message that
needs no change costs one copy at most, and :meth:`BackendReader.feed_block` forwards a whole run of complete
messages (for example a thousand ``DataRow`` messages that need no masking) without decoding any of them.

A length is checked as soon as its header arrives, before the body is buffered: a peer cannot make us buffer
more than the limit of its message type (the limits mirror the server's own, see ``_FRONTEND_LIMITS``).

Startup phase (frontend only)
-----------------------------
The first packet from a client has no type byte: ``int32 length | int32 code | payload``. The code is either
a protocol version (``3 << 16 | minor``: a StartupMessage carrying ``name\\0value\\0 ... \\0``) or one of three
magic request codes: SSLRequest, GSSENCRequest (both answered by a single unframed byte ``S``/``G`` or ``N``)
and CancelRequest (sent on a fresh connection, never answered, the connection is then closed). After an
SSLRequest or GSSENCRequest the client must wait for that single byte before sending anything else: bytes
that arrive together with the request were sent in the clear before encryption started and could be
mistaken for encrypted traffic (CVE-2021-23214), so the reader rejects them. Packets in this phase are
capped at 10000 bytes after the length word, like the server does. Once a StartupMessage is read the reader
switches to typed messages.

Authentication replies all share the type ``p``: a cleartext or md5 password, a SASLInitialResponse or a
SASLResponse. Which one it is depends on what the server asked for, so the reader hands out a
:class:`PasswordMessage` and the caller reinterprets it (:meth:`PasswordMessage.password`,
:meth:`PasswordMessage.as_sasl_initial_response`, :meth:`PasswordMessage.as_sasl_response`).

Simple and extended query
-------------------------
A ``Query`` may hold several statements; the server answers each with its own result messages and ends with
one ``ReadyForQuery``. The extended protocol splits the work into Parse / Bind / Describe / Execute / Close,
each answered with its own ``...Complete`` message, and a ``Sync`` that closes the implicit transaction
and makes the server send ``ReadyForQuery``. Error recovery is the subtle part: after an error in any
extended-protocol message the server sends one ``ErrorResponse`` and then *discards every message until the
next Sync*, which is answered with ``ReadyForQuery``. A gateway that refuses one message of a pipeline must
therefore do the same: answer with one ErrorResponse, drop the rest of the pipeline up to and including the
Sync, and answer that Sync with ``ReadyForQuery``, or the client and the server disagree about which answer
belongs to which message. ``Flush`` asks the server to send what it has without ending the pipeline.

COPY sub-protocol
-----------------
``CopyInResponse`` (COPY FROM STDIN) puts the connection in copy-in mode: the client streams ``CopyData``
and ends with ``CopyDone`` or ``CopyFail``; ``Flush`` and ``Sync`` are allowed and ignored by the server
meanwhile. ``CopyOutResponse`` (COPY TO STDOUT) makes the server stream ``CopyData`` then ``CopyDone``, then
the usual ``CommandComplete``/``ReadyForQuery``. ``CopyBothResponse`` is for replication only. CopyData
rows are opaque bytes to the codec.

Text is UTF-8: the listener forces ``client_encoding=UTF8``, and a frontend string that is not valid UTF-8
raises :class:`ProtocolError` (a decision made on one decoding while the server used another is how
encoding tricks bypass filters). Error and notice fields are display text and are decoded leniently.
"""

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

__all__ = [
    "AUTH_MESSAGE_LIMIT",
    "LARGE_MESSAGE_LIMIT",
    "MAX_STARTUP_PACKET",
    "SMALL_MESSAGE_LIMIT",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationRequest",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BackendMessage",
    "BackendReader",
    "Bind",
    "BindComplete",
    "Block",
    "CancelRequest",
    "Close",
    "CloseComplete",
    "CommandComplete",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "CopyInResponse",
    "CopyOutResponse",
    "DataRow",
    "Describe",
    "EmptyQueryResponse",
    "EncryptionResponse",
    "ErrorResponse",
    "Execute",
    "FieldDescription",
    "Flush",
    "Frame",
    "FrontendMessage",
    "FrontendReader",
    "FunctionCall",
    "FunctionCallResponse",
    "GSSENCRequest",
    "Message",
    "NegotiateProtocolVersion",
    "NoData",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "Parse",
    "ParseComplete",
    "PasswordMessage",
    "PortalSuspended",
    "ProtocolError",
    "Query",
    "ReadyForQuery",
    "RowDescription",
    "SASLInitialResponse",
    "SASLResponse",
    "SSLRequest",
    "StartupMessage",
    "Sync",
    "Terminate",
    "UnknownMessage",
    "authentication_cleartext_password",
    "authentication_md5_password",
    "authentication_ok",
    "authentication_sasl",
    "authentication_sasl_continue",
    "authentication_sasl_final",
    "backend_key_data",
    "bind",
    "bind_complete",
    "cancel_request",
    "close",
    "close_complete",
    "command_complete",
    "copy_both_response",
    "copy_data",
    "copy_done",
    "copy_fail",
    "copy_in_response",
    "copy_out_response",
    "data_row",
    "decode_backend",
    "decode_datarow",
    "decode_frontend",
    "describe",
    "empty_query_response",
    "encode_datarow",
    "error_response",
    "execute",
    "flush",
    "function_call",
    "function_call_response",
    "gssenc_request",
    "negotiate_protocol_version",
    "no_data",
    "notice_response",
    "notification_response",
    "parameter_description",
    "parameter_status",
    "parse",
    "parse_complete",
    "password_message",
    "portal_suspended",
    "query",
    "ready_for_query",
    "report",
    "row_description",
    "sasl_initial_response",
    "sasl_response",
    "ssl_request",
    "ssl_response",
    "startup_message",
    "sync",
    "terminate",
]


class ProtocolError(Exception):
    """The peer broke the protocol (bad framing, bad length, bad layout).

    The connection cannot be trusted any more: answer with an ErrorResponse (SQLSTATE 08P01) and close.
    """


# Limits, named after the server's own (src/include/libpq/libpq.h, src/include/libpq/auth.h).
MAX_STARTUP_PACKET = 10000
SMALL_MESSAGE_LIMIT = 10000
LARGE_MESSAGE_LIMIT = 0x3FFFFFFF  # 1 GiB - 1
AUTH_MESSAGE_LIMIT = 65535
# libpq treats a backend message longer than this as a loss of sync unless its type may be long.
_BACKEND_SHORT_LIMIT = 30000
_BACKEND_LONG_TYPES = b"TDdVENAt"

_SSL_REQUEST_CODE = 80877103
_GSSENC_REQUEST_CODE = 80877104
_CANCEL_REQUEST_CODE = 80877102
_PROTOCOL_MAJOR = 3
_MAX_CANCEL_KEY = 256  # protocol 3.2 allows keys of up to 256 bytes

# Per frontend type: None means "large" (capped by the reader's max_message_size).
_FRONTEND_LIMITS: dict[int, int | None] = {
    ord("Q"): None,
    ord("P"): None,
    ord("B"): None,
    ord("F"): None,
    ord("d"): None,
    ord("c"): None,
    ord("f"): None,
    ord("D"): SMALL_MESSAGE_LIMIT,
    ord("E"): SMALL_MESSAGE_LIMIT,
    ord("C"): SMALL_MESSAGE_LIMIT,
    ord("S"): SMALL_MESSAGE_LIMIT,
    ord("H"): SMALL_MESSAGE_LIMIT,
    ord("X"): SMALL_MESSAGE_LIMIT,
    ord("p"): AUTH_MESSAGE_LIMIT,
}

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")
_NULL = b"\xff\xff\xff\xff"


# --------------------------------------------------------------------------------------------------------
# Body decoding helpers


class _Body:
    """A cursor over one message body; every read is bounds-checked."""

    __slots__ = ("data", "name", "pos")

    def __init__(self, data: bytes, name: str, pos: int = 5) -> None:
        self.data = data
        self.name = name
        self.pos = pos

    def fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.name} message: {what}")

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self.fail("truncated")
        (value,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def uint16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self.fail("truncated")
        (value,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self.fail("truncated")
        (value,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise self.fail("truncated")
        value = chr(self.data[self.pos])
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("truncated")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.data[self.pos :]
        self.pos = len(self.data)
        return value

    def cstring_bytes(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value

    def cstring(self, *, lenient: bool = False) -> str:
        value = self.cstring_bytes()
        if lenient:
            return value.decode("utf-8", "replace")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not valid UTF-8") from None

    def value(self) -> bytes | None:
        """An int32 length (-1 = NULL) followed by that many bytes."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise self.fail(f"invalid value length {n}")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unexpected trailing bytes")


# --------------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message; ``raw`` is its exact bytes on the wire (type byte and length included)."""

    raw: bytes


class Frame(NamedTuple):
    """One undecoded message: its type letter and its raw bytes."""

    type: str
    raw: bytes


# Frontend: startup phase


@dataclass(frozen=True, slots=True)
class StartupMessage(Message):
    major: int
    minor: int
    params: dict[str, str] = field(hash=False)

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        return self.params.get("database")

    @property
    def application_name(self) -> str | None:
        return self.params.get("application_name")

    @property
    def options(self) -> str | None:
        return self.params.get("options")


@dataclass(frozen=True, slots=True)
class SSLRequest(Message):
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest(Message):
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    pid: int
    key: bytes


# Frontend: typed messages


@dataclass(frozen=True, slots=True)
class Query(Message):
    code: ClassVar[str] = "Q"
    sql: str


@dataclass(frozen=True, slots=True)
class Parse(Message):
    code: ClassVar[str] = "P"
    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind(Message):
    code: ClassVar[str] = "B"
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def param_format(self, index: int) -> int:
        """The format code (0 text, 1 binary) that applies to parameter ``index``."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]


@dataclass(frozen=True, slots=True)
class Describe(Message):
    code: ClassVar[str] = "D"
    kind: str  # "S" prepared statement, "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Execute(Message):
    code: ClassVar[str] = "E"
    portal: str
    max_rows: int  # 0 = no limit


@dataclass(frozen=True, slots=True)
class Sync(Message):
    code: ClassVar[str] = "S"


@dataclass(frozen=True, slots=True)
class Flush(Message):
    code: ClassVar[str] = "H"


@dataclass(frozen=True, slots=True)
class Close(Message):
    code: ClassVar[str] = "C"
    kind: str  # "S" prepared statement, "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    code: ClassVar[str] = "F"
    oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    """CopyData, in either direction. ``data`` is sliced from ``raw`` on access."""

    code: ClassVar[str] = "d"

    @property
    def data(self) -> bytes:
        return self.raw[5:]


@dataclass(frozen=True, slots=True)
class CopyDone(Message):
    """CopyDone, in either direction."""

    code: ClassVar[str] = "c"


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    code: ClassVar[str] = "f"
    message: str


@dataclass(frozen=True, slots=True)
class Terminate(Message):
    code: ClassVar[str] = "X"


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    code: ClassVar[str] = "p"
    mechanism: str
    data: bytes | None


@dataclass(frozen=True, slots=True)
class SASLResponse(Message):
    code: ClassVar[str] = "p"
    data: bytes


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """A ``p`` message: password, SASLInitialResponse or SASLResponse, depending on what was asked."""

    code: ClassVar[str] = "p"

    def password(self) -> str:
        """The cleartext (or ``md5...``) password; raises :class:`ProtocolError` if malformed."""
        body = _Body(self.raw, "PasswordMessage")
        value = body.cstring()
        body.end()
        return value

    def as_sasl_initial_response(self) -> SASLInitialResponse:
        body = _Body(self.raw, "SASLInitialResponse")
        mechanism = body.cstring()
        data = body.value()
        body.end()
        return SASLInitialResponse(self.raw, mechanism, data)

    def as_sasl_response(self) -> SASLResponse:
        return SASLResponse(self.raw, self.raw[5:])


# Backend messages


@dataclass(frozen=True, slots=True)
class EncryptionResponse(Message):
    """The single unframed byte answering an SSLRequest or GSSENCRequest: ``S``/``G`` yes, ``N`` no."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Message):
    code: ClassVar[str] = "R"


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Message):
    code: ClassVar[str] = "R"


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Message):
    code: ClassVar[str] = "R"
    salt: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Message):
    code: ClassVar[str] = "R"
    mechanisms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Message):
    code: ClassVar[str] = "R"
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Message):
    code: ClassVar[str] = "R"
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationRequest(Message):
    """Any other authentication request (Kerberos, GSS, SSPI, ...): the gateway does not speak them."""

    code: ClassVar[str] = "R"
    auth_code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    code: ClassVar[str] = "S"
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    code: ClassVar[str] = "K"
    pid: int
    key: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    code: ClassVar[str] = "Z"
    status: str  # "I" idle, "T" in a transaction block, "E" in a failed transaction block


class FieldDescription(NamedTuple):
    name: str
    table_oid: int
    column: int
    type_oid: int
    typlen: int
    typmod: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    code: ClassVar[str] = "T"
    fields: tuple[FieldDescription, ...]


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """A row. ``values`` decodes ``raw`` on every access: read it once, or relay ``raw`` untouched."""

    code: ClassVar[str] = "D"

    @property
    def values(self) -> list[bytes | None]:
        return decode_datarow(self.raw)


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    code: ClassVar[str] = "C"
    tag: str


@dataclass(frozen=True, slots=True)
class _Report(Message):
    fields: dict[str, str] = field(hash=False)

    @property
    def severity(self) -> str:
        """Non-localized severity (``V``) when sent, else the localized one (``S``)."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Report):
    code: ClassVar[str] = "E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Report):
    code: ClassVar[str] = "N"


@dataclass(frozen=True, slots=True)
class ParseComplete(Message):
    code: ClassVar[str] = "1"


@dataclass(frozen=True, slots=True)
class BindComplete(Message):
    code: ClassVar[str] = "2"


@dataclass(frozen=True, slots=True)
class CloseComplete(Message):
    code: ClassVar[str] = "3"


@dataclass(frozen=True, slots=True)
class NoData(Message):
    code: ClassVar[str] = "n"


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    code: ClassVar[str] = "t"
    type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PortalSuspended(Message):
    code: ClassVar[str] = "s"


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(Message):
    code: ClassVar[str] = "I"


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    format: int  # 0 text, 1 binary (overall)
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    code: ClassVar[str] = "G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    code: ClassVar[str] = "H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    code: ClassVar[str] = "W"


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    code: ClassVar[str] = "A"
    pid: int
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    code: ClassVar[str] = "v"
    newest_minor: int
    unrecognized: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    code: ClassVar[str] = "V"
    value: bytes | None


@dataclass(frozen=True, slots=True)
class UnknownMessage(Message):
    """A backend message type this codec does not know; relayable as ``raw``."""

    @property
    def type(self) -> str:
        return chr(self.raw[0])

    @property
    def body(self) -> bytes:
        return self.raw[5:]


type FrontendMessage = (
    StartupMessage
    | SSLRequest
    | GSSENCRequest
    | CancelRequest
    | Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Sync
    | Flush
    | Close
    | FunctionCall
    | CopyData
    | CopyDone
    | CopyFail
    | Terminate
    | PasswordMessage
)

type BackendMessage = (
    EncryptionResponse
    | AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationRequest
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | ErrorResponse
    | NoticeResponse
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | ParameterDescription
    | PortalSuspended
    | EmptyQueryResponse
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | NotificationResponse
    | NegotiateProtocolVersion
    | FunctionCallResponse
    | UnknownMessage
)


# --------------------------------------------------------------------------------------------------------
# Decoding typed messages


def _formats(body: _Body, count: int) -> tuple[int, ...]:
    return tuple(body.int16() for _ in range(count))


def _values(body: _Body, count: int) -> tuple[bytes | None, ...]:
    return tuple(body.value() for _ in range(count))


def _kind(body: _Body) -> str:
    kind = body.byte()
    if kind not in ("S", "P"):
        raise body.fail(f"invalid target type {kind!r} (expected 'S' or 'P')")
    return kind


def _decode_query(raw: bytes) -> Query:
    b = _Body(raw, "Query")
    sql = b.cstring()
    b.end()
    return Query(raw, sql)


def _decode_parse(raw: bytes) -> Parse:
    b = _Body(raw, "Parse")
    name = b.cstring()
    sql = b.cstring()
    count = b.uint16()
    types = tuple(b.int32() & 0xFFFFFFFF for _ in range(count))
    b.end()
    return Parse(raw, name, sql, types)


def _decode_bind(raw: bytes) -> Bind:
    b = _Body(raw, "Bind")
    portal = b.cstring()
    statement = b.cstring()
    param_formats = _formats(b, b.uint16())
    params = _values(b, b.uint16())
    if len(param_formats) not in (0, 1, len(params)):
        raise b.fail(f"{len(param_formats)} parameter formats for {len(params)} parameters")
    result_formats = _formats(b, b.uint16())
    b.end()
    return Bind(raw, portal, statement, param_formats, params, result_formats)


def _decode_describe(raw: bytes) -> Describe:
    b = _Body(raw, "Describe")
    kind = _kind(b)
    name = b.cstring()
    b.end()
    return Describe(raw, kind, name)


def _decode_execute(raw: bytes) -> Execute:
    b = _Body(raw, "Execute")
    portal = b.cstring()
    max_rows = b.int32()
    b.end()
    return Execute(raw, portal, max_rows)


def _decode_close(raw: bytes) -> Close:
    b = _Body(raw, "Close")
    kind = _kind(b)
    name = b.cstring()
    b.end()
    return Close(raw, kind, name)


def _decode_function_call(raw: bytes) -> FunctionCall:
    b = _Body(raw, "FunctionCall")
    oid = b.int32() & 0xFFFFFFFF
    arg_formats = _formats(b, b.uint16())
    args = _values(b, b.uint16())
    if len(arg_formats) not in (0, 1, len(args)):
        raise b.fail(f"{len(arg_formats)} argument formats for {len(args)} arguments")
    result_format = b.int16()
    b.end()
    return FunctionCall(raw, oid, arg_formats, args, result_format)


def _decode_copy_fail(raw: bytes) -> CopyFail:
    b = _Body(raw, "CopyFail")
    message = b.cstring()
    b.end()
    return CopyFail(raw, message)


_Decoder = Callable[[bytes], Message]


def _empty(cls: type[Message], name: str) -> _Decoder:
    def decode(raw: bytes) -> Message:
        if len(raw) != 5:
            raise ProtocolError(f"malformed {name} message: body must be empty")
        return cls(raw)

    return decode


_FRONTEND_DECODERS: dict[int, _Decoder] = {
    ord("Q"): _decode_query,
    ord("P"): _decode_parse,
    ord("B"): _decode_bind,
    ord("D"): _decode_describe,
    ord("E"): _decode_execute,
    ord("C"): _decode_close,
    ord("F"): _decode_function_call,
    ord("d"): CopyData,
    ord("c"): _empty(CopyDone, "CopyDone"),
    ord("f"): _decode_copy_fail,
    ord("S"): _empty(Sync, "Sync"),
    ord("H"): _empty(Flush, "Flush"),
    ord("X"): _empty(Terminate, "Terminate"),
    ord("p"): PasswordMessage,
}


def decode_frontend(raw: bytes) -> FrontendMessage:
    """Decode one complete typed frontend message (as split by :class:`FrontendReader`)."""
    _check_frame(raw)
    decoder = _FRONTEND_DECODERS.get(raw[0])
    if decoder is None:
        raise ProtocolError(f"invalid frontend message type {raw[0]!r} ({chr(raw[0])!r})")
    return decoder(raw)  # type: ignore[return-value]


def _decode_auth(raw: bytes) -> Message:
    b = _Body(raw, "Authentication")
    auth = b.int32()
    if auth == 0:
        b.end()
        return AuthenticationOk(raw)
    if auth == 3:
        b.end()
        return AuthenticationCleartextPassword(raw)
    if auth == 5:
        salt = b.take(4)
        b.end()
        return AuthenticationMD5Password(raw, salt)
    if auth == 10:
        mechanisms: list[str] = []
        while True:
            name = b.cstring()
            if not name:
                break
            mechanisms.append(name)
        b.end()
        return AuthenticationSASL(raw, tuple(mechanisms))
    if auth == 11:
        return AuthenticationSASLContinue(raw, b.rest())
    if auth == 12:
        return AuthenticationSASLFinal(raw, b.rest())
    return AuthenticationRequest(raw, auth, b.rest())


def _decode_parameter_status(raw: bytes) -> ParameterStatus:
    b = _Body(raw, "ParameterStatus")
    name = b.cstring()
    value = b.cstring()
    b.end()
    return ParameterStatus(raw, name, value)


def _decode_backend_key_data(raw: bytes) -> BackendKeyData:
    b = _Body(raw, "BackendKeyData")
    pid = b.int32()
    key = b.rest()
    if not 4 <= len(key) <= _MAX_CANCEL_KEY:
        raise b.fail(f"invalid cancel key length {len(key)}")
    return BackendKeyData(raw, pid, key)


def _decode_ready_for_query(raw: bytes) -> ReadyForQuery:
    b = _Body(raw, "ReadyForQuery")
    status = b.byte()
    b.end()
    if status not in ("I", "T", "E"):
        raise b.fail(f"invalid transaction status {status!r}")
    return ReadyForQuery(raw, status)


def _decode_row_description(raw: bytes) -> RowDescription:
    b = _Body(raw, "RowDescription")
    count = b.uint16()
    fields = []
    for _ in range(count):
        name = b.cstring()
        table_oid = b.int32() & 0xFFFFFFFF
        column = b.int16()
        type_oid = b.int32() & 0xFFFFFFFF
        typlen = b.int16()
        typmod = b.int32()
        fmt = b.int16()
        fields.append(FieldDescription(name, table_oid, column, type_oid, typlen, typmod, fmt))
    b.end()
    return RowDescription(raw, tuple(fields))


def _decode_datarow_message(raw: bytes) -> DataRow:
    return DataRow(raw)


def _decode_command_complete(raw: bytes) -> CommandComplete:
    b = _Body(raw, "CommandComplete")
    tag = b.cstring()
    b.end()
    return CommandComplete(raw, tag)


def _decode_fields(b: _Body) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = b.byte()
        if code == "\0":
            break
        fields[code] = b.cstring(lenient=True)
    b.end()
    return fields


def _decode_error(raw: bytes) -> ErrorResponse:
    return ErrorResponse(raw, _decode_fields(_Body(raw, "ErrorResponse")))


def _decode_notice(raw: bytes) -> NoticeResponse:
    return NoticeResponse(raw, _decode_fields(_Body(raw, "NoticeResponse")))


def _decode_parameter_description(raw: bytes) -> ParameterDescription:
    b = _Body(raw, "ParameterDescription")
    count = b.uint16()
    oids = tuple(b.int32() & 0xFFFFFFFF for _ in range(count))
    b.end()
    return ParameterDescription(raw, oids)


def _copy_response(cls: type[_CopyResponse], name: str) -> _Decoder:
    def decode(raw: bytes) -> Message:
        b = _Body(raw, name)
        fmt = b.byte()
        if fmt not in ("\0", "\1"):
            raise b.fail(f"invalid overall format {ord(fmt)}")
        formats = _formats(b, b.uint16())
        b.end()
        return cls(raw, ord(fmt), formats)

    return decode


def _decode_notification(raw: bytes) -> NotificationResponse:
    b = _Body(raw, "NotificationResponse")
    pid = b.int32()
    channel = b.cstring()
    payload = b.cstring()
    b.end()
    return NotificationResponse(raw, pid, channel, payload)


def _decode_negotiate(raw: bytes) -> NegotiateProtocolVersion:
    b = _Body(raw, "NegotiateProtocolVersion")
    newest = b.int32()
    count = b.int32()
    if count < 0:
        raise b.fail(f"invalid option count {count}")
    names = tuple(b.cstring() for _ in range(count))
    b.end()
    return NegotiateProtocolVersion(raw, newest, names)


def _decode_function_call_response(raw: bytes) -> FunctionCallResponse:
    b = _Body(raw, "FunctionCallResponse")
    value = b.value()
    b.end()
    return FunctionCallResponse(raw, value)


_BACKEND_DECODERS: dict[int, _Decoder] = {
    ord("R"): _decode_auth,
    ord("S"): _decode_parameter_status,
    ord("K"): _decode_backend_key_data,
    ord("Z"): _decode_ready_for_query,
    ord("T"): _decode_row_description,
    ord("D"): _decode_datarow_message,
    ord("C"): _decode_command_complete,
    ord("E"): _decode_error,
    ord("N"): _decode_notice,
    ord("1"): _empty(ParseComplete, "ParseComplete"),
    ord("2"): _empty(BindComplete, "BindComplete"),
    ord("3"): _empty(CloseComplete, "CloseComplete"),
    ord("n"): _empty(NoData, "NoData"),
    ord("t"): _decode_parameter_description,
    ord("s"): _empty(PortalSuspended, "PortalSuspended"),
    ord("I"): _empty(EmptyQueryResponse, "EmptyQueryResponse"),
    ord("G"): _copy_response(CopyInResponse, "CopyInResponse"),
    ord("H"): _copy_response(CopyOutResponse, "CopyOutResponse"),
    ord("W"): _copy_response(CopyBothResponse, "CopyBothResponse"),
    ord("d"): CopyData,
    ord("c"): _empty(CopyDone, "CopyDone"),
    ord("A"): _decode_notification,
    ord("v"): _decode_negotiate,
    ord("V"): _decode_function_call_response,
}


def decode_backend(raw: bytes) -> BackendMessage:
    """Decode one complete backend message; unknown types become :class:`UnknownMessage`."""
    _check_frame(raw)
    decoder = _BACKEND_DECODERS.get(raw[0])
    if decoder is None:
        return UnknownMessage(raw)
    return decoder(raw)  # type: ignore[return-value]


def decode_datarow(raw: bytes) -> list[bytes | None]:
    """The column values of a DataRow message (``raw`` includes the header); ``None`` is SQL NULL."""
    if len(raw) < 7 or raw[0] != 0x44:
        raise ProtocolError("malformed DataRow message: truncated or wrong type")
    count = (raw[5] << 8) | raw[6]
    values: list[bytes | None] = []
    append = values.append
    pos = 7
    end = len(raw)
    unpack = _I32.unpack_from
    for _ in range(count):
        if pos + 4 > end:
            raise ProtocolError("malformed DataRow message: truncated")
        (n,) = unpack(raw, pos)
        pos += 4
        if n < 0:
            if n != -1:
                raise ProtocolError(f"malformed DataRow message: invalid value length {n}")
            append(None)
            continue
        if pos + n > end:
            raise ProtocolError("malformed DataRow message: truncated")
        append(raw[pos : pos + n])
        pos += n
    if pos != end:
        raise ProtocolError("malformed DataRow message: unexpected trailing bytes")
    return values


def _check_frame(raw: bytes) -> None:
    if len(raw) < 5:
        raise ProtocolError("message shorter than its header")
    (length,) = _I32.unpack_from(raw, 1)
    if length != len(raw) - 1:
        raise ProtocolError(f"message length {length} does not match its {len(raw) - 1} bytes")


# --------------------------------------------------------------------------------------------------------
# Readers


class Block:
    """A run of complete messages exactly as received, plus where each one starts.

    ``types`` holds one type byte per message, so ``b"Z" in block.types`` or ``block.types.count(b"D")`` are
    C-speed checks; ``data`` can be forwarded as is.
    """

    __slots__ = ("data", "offsets", "types")

    def __init__(self, data: bytes, types: bytes, offsets: list[int]) -> None:
        self.data = data
        self.types = types
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def __bool__(self) -> bool:
        return bool(self.offsets)

    def raw(self, index: int) -> bytes:
        """The raw bytes of message ``index``."""
        start = self.offsets[index]
        end = self.offsets[index + 1] if index + 1 < len(self.offsets) else len(self.data)
        return self.data[start:end]

    def frames(self) -> Iterator[Frame]:
        data = self.data
        offsets = self.offsets
        if not offsets:
            return
        ends = [*offsets[1:], len(data)]
        for start, end in zip(offsets, ends, strict=True):
            yield Frame(chr(data[start]), data[start:end])

    def ready_status(self) -> str | None:
        """The transaction status of the last ReadyForQuery in the block, or None if there is none."""
        index = self.types.rfind(b"Z")
        if index < 0:
            return None
        return chr(self.data[self.offsets[index] + 5])


_LIMIT_TABLES: dict[tuple[type, int], tuple[int, ...]] = {}


class _TypedReader:
    """Splits a stream of typed messages; subclasses say how long each type may be."""

    _side = ""

    def __init__(self, max_message_size: int = LARGE_MESSAGE_LIMIT) -> None:
        if not 0 < max_message_size <= LARGE_MESSAGE_LIMIT:
            raise ValueError(f"max_message_size must be in 1..{LARGE_MESSAGE_LIMIT}")
        self.max_message_size = max_message_size
        self._buf = bytearray()
        # The limit of every type byte, -1 for an invalid type: one list lookup per message in _scan.
        # Computed once per reader class and size limit, not per connection.
        key = (type(self), max_message_size)
        limits = _LIMIT_TABLES.get(key)
        if limits is None:
            limits = _LIMIT_TABLES[key] = tuple(self._limit_or_invalid(t) for t in range(256))
        self._limits = limits

    def _limit_or_invalid(self, type_byte: int) -> int:
        try:
            return self._limit(type_byte)
        except ProtocolError:
            return -1

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def _limit(self, type_byte: int) -> int:
        raise NotImplementedError

    def _scan(self, data: bytes | bytearray) -> tuple[bytes, list[int], int]:
        """Find complete messages in ``data``; return their types, offsets and the end of the last one."""
        types = bytearray()
        offsets: list[int] = []
        pos = 0
        size = len(data)
        unpack = _I32.unpack_from
        limits = self._limits
        while pos + 5 <= size:
            type_byte = data[pos]
            (length,) = unpack(data, pos + 1)
            if length < 4:
                raise ProtocolError(f"invalid {self._side} message length {length} (type {chr(type_byte)!r})")
            limit = limits[type_byte]
            if limit < 0:
                self._limit(type_byte)  # raises, naming the type
            if length - 4 > limit:
                raise ProtocolError(
                    f"{self._side} message of type {chr(type_byte)!r} is {length - 4} bytes, over the limit of {limit}"
                )
            end = pos + 1 + length
            if end > size:
                break
            types.append(type_byte)
            offsets.append(pos)
            pos = end
        if pos < size:
            # The header of the next message is incomplete; check its type early for a clear error.
            self._limit(data[pos])
        return bytes(types), offsets, pos

    def _take_block(self, data: bytes) -> Block:
        buf = self._buf
        if not buf:
            types, offsets, end = self._scan(data)
            if end == len(data):
                return Block(data, types, offsets)
            buf += memoryview(data)[end:]
            return Block(data[:end], types, offsets)
        buf += data
        types, offsets, end = self._scan(buf)
        if not offsets:
            return Block(b"", b"", [])
        block = bytes(buf[:end])
        del buf[:end]
        return Block(block, types, offsets)


class FrontendReader(_TypedReader):
    """Reads what a client sends: the startup phase, then typed messages.

    :param max_message_size: the largest body accepted for the large message types (Query, Parse, Bind,
        FunctionCall, CopyData, ...); smaller types keep the server's own limits.
    """

    _side = "frontend"

    def __init__(self, max_message_size: int = LARGE_MESSAGE_LIMIT) -> None:
        super().__init__(max_message_size)
        self._phase = "startup"

    @property
    def phase(self) -> str:
        """``startup`` (untyped packets), ``typed`` (after a StartupMessage) or ``closed``."""
        return self._phase

    @property
    def has_buffered_data(self) -> bool:
        """True if bytes beyond the last message are buffered (check before starting TLS)."""
        return bool(self._buf)

    def _limit(self, type_byte: int) -> int:
        if type_byte not in _FRONTEND_LIMITS:
            raise ProtocolError(f"invalid frontend message type {type_byte} ({chr(type_byte)!r})")
        limit = _FRONTEND_LIMITS[type_byte]
        return self.max_message_size if limit is None else min(limit, self.max_message_size)

    def feed(self, data: bytes) -> list[FrontendMessage]:
        """Take received bytes; return the complete messages they finish, in order."""
        if self._phase == "closed":
            if data:
                raise ProtocolError("data received after the connection was ended")
            return []
        messages: list[FrontendMessage] = []
        if self._phase == "startup":
            self._buf += data
            data = b""
            while self._phase == "startup":
                message = self._startup_packet()
                if message is None:
                    return messages
                messages.append(message)
            if self._phase == "closed":
                if self._buf:
                    raise ProtocolError("data received after CancelRequest")
                return messages
        block = self._take_block(data)
        messages.extend(decode_frontend(frame.raw) for frame in block.frames())
        self._check_terminate(block)
        return messages

    def feed_block(self, data: bytes) -> Block:
        """Like :meth:`feed` but without decoding, for relaying (COPY data). Typed phase only."""
        if self._phase != "typed":
            raise ProtocolError(f"feed_block is only valid for typed messages (phase {self._phase})")
        block = self._take_block(data)
        self._check_terminate(block)
        return block

    def _check_terminate(self, block: Block) -> None:
        if b"X" in block.types:
            self._phase = "closed"
            if self._buf or block.types.index(b"X") != len(block.types) - 1:
                raise ProtocolError("data received after Terminate")

    def _startup_packet(self) -> FrontendMessage | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _I32.unpack_from(buf, 0)
        if length < 8 or length - 4 > MAX_STARTUP_PACKET:  # like the server, the limit excludes the length
            raise ProtocolError(f"invalid length of startup packet: {length}")
        if len(buf) < length:
            return None
        raw = bytes(buf[:length])
        del buf[:length]
        (code,) = _I32.unpack_from(raw, 4)
        if code == _SSL_REQUEST_CODE or code == _GSSENC_REQUEST_CODE:
            name = "SSLRequest" if code == _SSL_REQUEST_CODE else "GSSENCRequest"
            if length != 8:
                raise ProtocolError(f"invalid length of {name}: {length}")
            if buf:
                raise ProtocolError(f"received unencrypted data after {name}")
            return SSLRequest(raw) if code == _SSL_REQUEST_CODE else GSSENCRequest(raw)
        if code == _CANCEL_REQUEST_CODE:
            if not 12 + 4 <= length <= 12 + _MAX_CANCEL_KEY:
                raise ProtocolError(f"invalid length of CancelRequest: {length}")
            (pid,) = _I32.unpack_from(raw, 8)
            self._phase = "closed"
            return CancelRequest(raw, pid, raw[12:])
        major, minor = code >> 16, code & 0xFFFF
        if major != _PROTOCOL_MAJOR:
            raise ProtocolError(f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.x")
        message = _decode_startup(raw, major, minor)
        self._phase = "typed"
        return message


def _decode_startup(raw: bytes, major: int, minor: int) -> StartupMessage:
    b = _Body(raw, "StartupMessage", pos=8)
    if raw[-1] != 0:
        raise b.fail("expected terminator as last byte")
    params: dict[str, str] = {}
    while True:
        name = b.cstring()
        if not name:
            break
        if name in params:
            raise b.fail(f"duplicate parameter {name!r}")
        params[name] = b.cstring()
    b.end()
    return StartupMessage(raw, major, minor, params)


class BackendReader(_TypedReader):
    """Reads what a server sends.

    :param max_message_size: the largest body accepted for the long message types (RowDescription,
        DataRow, CopyData, ErrorResponse, ...). Other types are capped at 30000 bytes, like libpq does.
    """

    _side = "backend"

    def __init__(self, max_message_size: int = LARGE_MESSAGE_LIMIT) -> None:
        super().__init__(max_message_size)
        self._expect_encryption = False

    def expect_encryption_response(self) -> None:
        """Call after sending SSLRequest/GSSENCRequest: the next byte is the unframed answer."""
        self._expect_encryption = True

    def _limit(self, type_byte: int) -> int:
        if type_byte in _BACKEND_LONG_TYPES:
            return self.max_message_size
        return min(_BACKEND_SHORT_LIMIT, self.max_message_size)

    def feed(self, data: bytes) -> list[BackendMessage]:
        """Take received bytes; return the complete messages they finish, decoded, in order."""
        messages: list[BackendMessage] = []
        if self._expect_encryption:
            self._buf += data
            data = b""
            if not self._buf:
                return messages
            first = self._buf[0]
            if first in b"SGN":
                self._expect_encryption = False
                del self._buf[:1]
                accepted = first != ord("N")
                if accepted and self._buf:
                    # Bytes after 'S' were not protected by the handshake (CVE-2021-23222).
                    raise ProtocolError("received unencrypted data after the encryption response")
                messages.append(EncryptionResponse(bytes([first]), accepted))
            elif first == ord("E"):
                # A server too old to know the request answers with an ErrorResponse; read it as one.
                self._expect_encryption = False
            else:
                raise ProtocolError(f"invalid response to encryption request: {bytes([first])!r}")
        messages.extend(decode_backend(frame.raw) for frame in self._take_block(data).frames())
        return messages

    def feed_block(self, data: bytes) -> Block:
        """Take received bytes; return the complete messages they finish, undecoded, for relaying."""
        if self._expect_encryption:
            raise ProtocolError("an SSL/GSS response is expected; use feed()")
        return self._take_block(data)


# --------------------------------------------------------------------------------------------------------
# Builders


def _cstr(value: str) -> bytes:
    encoded = value.encode("utf-8")
    if b"\0" in encoded:
        raise ValueError(f"string contains a NUL byte: {value!r}")
    return encoded + b"\0"


def _msg(code: bytes, body: bytes = b"") -> bytes:
    if len(body) > LARGE_MESSAGE_LIMIT:
        raise ValueError(f"message body of {len(body)} bytes is over the protocol limit")
    return code + (len(body) + 4).to_bytes(4, "big") + body


def _int16s(values: Sequence[int]) -> bytes:
    return len(values).to_bytes(2, "big") + b"".join(_I16.pack(v) for v in values)


def _value_bytes(value: bytes | bytearray | memoryview | None) -> bytes:
    if value is None:
        return _NULL
    return _I32.pack(len(value)) + bytes(value)


def _values_bytes(values: Sequence[bytes | bytearray | memoryview | None]) -> bytes:
    if len(values) > 0xFFFF:
        raise ValueError(f"too many values: {len(values)}")
    return len(values).to_bytes(2, "big") + b"".join(_value_bytes(v) for v in values)


def _oid(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "big")


# Frontend builders (the gateway's upstream side)


def startup_message(params: Mapping[str, str], *, major: int = 3, minor: int = 0) -> bytes:
    """A StartupMessage with ``params`` (``user`` is required by servers)."""
    body = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    length = 8 + len(body)
    return _I32.pack(length) + _I32.pack((major << 16) | minor) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(_SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _I32.pack(8) + _I32.pack(_GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: bytes) -> bytes:
    """A CancelRequest for the backend ``pid`` with its secret ``key`` (from BackendKeyData)."""
    if not 4 <= len(key) <= _MAX_CANCEL_KEY:
        raise ValueError(f"invalid cancel key length {len(key)}")
    return _I32.pack(12 + len(key)) + _I32.pack(_CANCEL_REQUEST_CODE) + _I32.pack(pid) + key


def password_message(password: str | bytes) -> bytes:
    """A cleartext password or an md5 answer (``md5`` + hex digest, see ``_scram.md5_password``)."""
    if isinstance(password, str):
        return _msg(b"p", _cstr(password))
    if b"\0" in password:
        raise ValueError("password contains a NUL byte")
    return _msg(b"p", password + b"\0")


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    return _msg(b"p", _cstr(mechanism) + _value_bytes(data))


def sasl_response(data: bytes) -> bytes:
    return _msg(b"p", data)


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def parse(name: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    if len(param_types) > 0xFFFF:
        raise ValueError(f"too many parameter types: {len(param_types)}")
    types = len(param_types).to_bytes(2, "big") + b"".join(_oid(t) for t in param_types)
    return _msg(b"P", _cstr(name) + _cstr(query) + types)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | bytearray | memoryview | None] = (),
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = _cstr(portal) + _cstr(statement) + _int16s(param_formats) + _values_bytes(params) + _int16s(result_formats)
    return _msg(b"B", body)


def _target(kind: str, name: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"kind must be 'S' or 'P', not {kind!r}")
    return kind.encode() + _cstr(name)


def describe(kind: str, name: str = "") -> bytes:
    return _msg(b"D", _target(kind, name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + _I32.pack(max_rows))


def close(kind: str, name: str = "") -> bytes:
    return _msg(b"C", _target(kind, name))


def sync() -> bytes:
    return b"S\0\0\0\4"


def flush() -> bytes:
    return b"H\0\0\0\4"


def terminate() -> bytes:
    return b"X\0\0\0\4"


def function_call(
    oid: int,
    args: Sequence[bytes | None] = (),
    arg_formats: Sequence[int] = (),
    result_format: int = 0,
) -> bytes:
    return _msg(b"F", _oid(oid) + _int16s(arg_formats) + _values_bytes(args) + _I16.pack(result_format))


def copy_data(data: bytes | bytearray | memoryview) -> bytes:
    """CopyData, in either direction."""
    return _msg(b"d", bytes(data))


def copy_done() -> bytes:
    """CopyDone, in either direction."""
    return b"c\0\0\0\4"


def copy_fail(message: str) -> bytes:
    return _msg(b"f", _cstr(message))


# Backend builders (the gateway's own answers to agents)


def ssl_response(accepted: bool) -> bytes:
    """The single unframed byte answering SSLRequest/GSSENCRequest."""
    return b"S" if accepted else b"N"


def authentication_ok() -> bytes:
    return _msg(b"R", _I32.pack(0))


def authentication_cleartext_password() -> bytes:
    return _msg(b"R", _I32.pack(3))


def authentication_md5_password(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    return _msg(b"R", _I32.pack(5) + salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    return _msg(b"R", _I32.pack(10) + b"".join(_cstr(m) for m in mechanisms) + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(11) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    if not 4 <= len(key) <= _MAX_CANCEL_KEY:
        raise ValueError(f"invalid cancel key length {len(key)}")
    return _msg(b"K", _I32.pack(pid) + key)


_READY = {"I": b"Z\0\0\0\5I", "T": b"Z\0\0\0\5T", "E": b"Z\0\0\0\5E"}


def ready_for_query(status: str) -> bytes:
    """ReadyForQuery with ``status`` I (idle), T (in a transaction) or E (in a failed transaction)."""
    try:
        return _READY[status]
    except KeyError:
        raise ValueError(f"invalid transaction status {status!r}") from None


def row_description(fields: Sequence[FieldDescription | tuple[str, int, int, int, int, int, int]]) -> bytes:
    """RowDescription; each field is (name, table_oid, column, type_oid, typlen, typmod, format)."""
    parts = [len(fields).to_bytes(2, "big")]
    for name, table_oid, column, type_oid, typlen, typmod, fmt in fields:
        parts.append(_cstr(name) + _oid(table_oid) + _I16.pack(column) + _oid(type_oid))
        parts.append(_I16.pack(typlen) + _I32.pack(typmod) + _I16.pack(fmt))
    return _msg(b"T", b"".join(parts))


def encode_datarow(values: Sequence[bytes | bytearray | memoryview | None]) -> bytes:
    """A DataRow message for ``values`` (``None`` is SQL NULL)."""
    if len(values) > 0xFFFF:
        raise ValueError(f"too many values: {len(values)}")
    parts = [len(values).to_bytes(2, "big")]
    append = parts.append
    pack = _I32.pack
    for value in values:
        if value is None:
            append(_NULL)
        else:
            append(pack(len(value)))
            append(bytes(value))
    return _msg(b"D", b"".join(parts))


data_row = encode_datarow


def command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


def _report(
    code: bytes,
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
    fields: Mapping[str, str] | None,
) -> bytes:
    if len(sqlstate) != 5:
        raise ValueError(f"SQLSTATE must be 5 characters: {sqlstate!r}")
    items: dict[str, str] = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        items["D"] = detail
    if hint is not None:
        items["H"] = hint
    items.update(fields or {})
    return report(code, items)


def report(code: bytes, fields: Mapping[str, str]) -> bytes:
    """An ErrorResponse (``b"E"``) or NoticeResponse (``b"N"``) with exactly ``fields``, in their order."""
    for key in fields:
        if len(key) != 1 or key == "\0":
            raise ValueError(f"invalid field code {key!r}")
    return _msg(code, b"".join(k.encode() + _cstr(v) for k, v in fields.items()) + b"\0")


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    fields: Mapping[str, str] | None = None,
) -> bytes:
    """ErrorResponse; ``severity`` is ERROR, FATAL or PANIC; ``fields`` adds other codes (P, W, ...)."""
    return _report(b"E", severity, sqlstate, message, detail, hint, fields)


def notice_response(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    fields: Mapping[str, str] | None = None,
) -> bytes:
    """NoticeResponse; ``severity`` is WARNING, NOTICE, DEBUG, INFO or LOG."""
    return _report(b"N", severity, sqlstate, message, detail, hint, fields)


def empty_query_response() -> bytes:
    return b"I\0\0\0\4"


def parse_complete() -> bytes:
    return b"1\0\0\0\4"


def bind_complete() -> bytes:
    return b"2\0\0\0\4"


def close_complete() -> bytes:
    return b"3\0\0\0\4"


def no_data() -> bytes:
    return b"n\0\0\0\4"


def portal_suspended() -> bytes:
    return b"s\0\0\0\4"


def parameter_description(type_oids: Sequence[int]) -> bytes:
    return _msg(b"t", len(type_oids).to_bytes(2, "big") + b"".join(_oid(t) for t in type_oids))


def _copy_response_bytes(code: bytes, fmt: int, column_formats: Sequence[int]) -> bytes:
    if fmt not in (0, 1):
        raise ValueError("copy format must be 0 (text) or 1 (binary)")
    return _msg(code, bytes([fmt]) + _int16s(column_formats))


def copy_in_response(format: int = 0, column_formats: Sequence[int] = ()) -> bytes:
    return _copy_response_bytes(b"G", format, column_formats)


def copy_out_response(format: int = 0, column_formats: Sequence[int] = ()) -> bytes:
    return _copy_response_bytes(b"H", format, column_formats)


def copy_both_response(format: int = 0, column_formats: Sequence[int] = ()) -> bytes:
    return _copy_response_bytes(b"W", format, column_formats)


def notification_response(pid: int, channel: str, payload: str) -> bytes:
    return _msg(b"A", _I32.pack(pid) + _cstr(channel) + _cstr(payload))


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str] = ()) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized)) + b"".join(_cstr(n) for n in unrecognized)
    return _msg(b"v", body)


def function_call_response(value: bytes | None) -> bytes:
    return _msg(b"V", _value_bytes(value))
