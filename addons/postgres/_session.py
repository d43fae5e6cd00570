"""The relay engine of one agent connection, after login: inspect, decide, forward, mask, record.

Theory of operation
===================

Both directions are driven by callbacks (``Pipe.on_data``): the agent's bytes are split into messages by the
codec's :class:`FrontendReader` without decoding (``feed_block``), and only the messages that carry SQL
(Query, Parse), name statements or portals (Bind, Execute, Describe, Close) or need a decision of their own
(FunctionCall) are looked at. Everything the gateway forwards for one received chunk is written to the target
in one write, so a pipeline of Parse/Bind/Execute/Sync costs one system call.

Decisions. A Query is classified (``_classify``, cached per text) and every statement is decided with
``Session.decide_now`` (audited); the combined decision (deny > approve > allow) applies to the whole
message. A Parse is decided once when it arrives and the decision is kept with the prepared statement; Bind
and Execute use it (it is re-decided when the policy version changes and at least every
``REDECIDE_SECONDS``, so an expired elevation does not outlive its time). SQL-level ``PREPARE`` stores the
classification of the statement it prepares (the classifier folds the inner statement in); ``EXECUTE name``
is decided as the stored statement, and ``EXECUTE`` of a name the gateway did not see prepared is denied.
``DECLARE`` stores the cursor's decision, so ``FETCH`` results are masked like the query behind the cursor.

Responses are matched to requests. Every forwarded message that the server answers pushes an expectation
on ``_expect`` (ParseComplete for a Parse, rows and a CommandComplete for an Execute, ReadyForQuery for a
Sync...). Walking the server's messages against that queue is what lets the gateway know which result a
DataRow belongs to (masking), when a statement finished (recording), and where the server stopped skipping
after an error. DataRows that need no masking are never decoded: the walk jumps over runs of them with one
regular-expression search over the block's type bytes, and the block is forwarded as received.

Denials keep client and server in step. The gateway does not answer a denied message itself: it sends the
target, in place of the denied message, a statement that cannot parse (``LICTOR_DENIED_<random>``), and
replaces the server's syntax error with its own 42501 ErrorResponse. So the server goes through exactly the
error path the agent believes happened: in the extended protocol it skips to the next Sync (the gateway
also drops the agent's messages up to that Sync, none of them reach the server) and the pipeline's implicit
transaction rolls back; inside a transaction block the transaction is aborted, and the ReadyForQuery status
the agent gets ('E') is the server's own. Nothing of a batch after a denied message is ever forwarded.

Parser-sensitive text. The classifier reads SQL with ``standard_conforming_strings=on`` and UTF-8, as the
gateway sets them at login. A statement run earlier could change them (``set_config``, a function), and a
text with a backslash or a non-ASCII character could then be read differently by the server. So such a
text is forwarded only when every earlier statement has finished and its ReadyForQuery has been seen (the
server reports changed settings just before it); a ParameterStatus that shows either setting changed, or
``default_transaction_read_only`` turned off in a read-only session, ends the connection.
"""

import asyncio
import functools
import html
import json
import logging
import re
import secrets
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from lictor import AuditError, Decision, Request, combine

from . import _protocol as pg
from ._classify import redact_secrets
from ._pipe import Pipe
from ._requests import requests_for_sql

if TYPE_CHECKING:
    from lictor import Session, Target

    from ._listener import PostgresListener

__all__ = ["Relay"]

log = logging.getLogger("lictor.postgres")

REDECIDE_SECONDS = 30.0
MAX_PREPARED = 10_000  # prepared statements / cursors tracked per connection
RECORD_SQL_LIMIT = 8192
PATH_CHANGES_SHOWN = 3
APPROVAL_QUERY_SHOWN = 3000  # characters of a multi-statement query shown with a statement held from it
RECORD_PARAM_LIMIT = 256
# The target's answer is relayed this many messages at a time when there are more; once a turn of the event loop
# has taken RELAY_TURN_SECONDS, the rest waits for the next turn (reading from the target paused meanwhile). Masking
# a 256 KiB read of rows took a quarter of a second, and every other agent on the gateway waited for it.
RELAY_SLICE = 256
RELAY_TURN_SECONDS = 0.002

# Frontend message types.
_F_QUERY, _F_PARSE, _F_BIND, _F_DESCRIBE, _F_EXECUTE = b"QPBDE"
_F_SYNC, _F_FLUSH, _F_CLOSE, _F_FCALL, _F_TERMINATE = b"SHCFX"
_F_COPYDATA, _F_COPYDONE, _F_COPYFAIL, _F_PASSWORD = b"dcfp"
_FRONTEND_NAMES = {_F_PARSE: "Parse", _F_DESCRIBE: "Describe", _F_EXECUTE: "Execute", _F_CLOSE: "Close"}
# Backend message types.
_B_ROWDESC, _B_DATAROW, _B_COMPLETE, _B_READY, _B_ERROR, _B_NOTICE = b"TDCZEN"
_B_NOTIFY, _B_PARAM, _B_PARSEOK, _B_BINDOK, _B_CLOSEOK, _B_NODATA = b"AS123n"
_B_PARAMDESC, _B_SUSPENDED, _B_EMPTY, _B_COPYIN, _B_COPYOUT, _B_COPYBOTH = b"tsIGHW"
_B_COPYDATA, _B_COPYDONE, _B_FCRESULT = b"dcV"

_NOT_DATAROW = re.compile(rb"[^D]")
# The server answers a message the gateway did not see it get: what follows cannot be matched to its statement
# (nor masked with that statement's plan).
_LOST_TRACK = "the gateway lost track of which statement the server is answering; the connection is closed"

# A JSON \u escape in COPY output (a json value keeps its text as written): jane\u0040example.com is an address
# to the agent's JSON reader, not to detectors reading the bytes, and COPY does not say which columns are json.
_UNICODE_ESCAPE = re.compile(rb"\\u[0-9A-Fa-f]{4}")

# The built-in large-object functions libpq calls through the fast path (lo_open, loread, ... for
# pg_dump, pg_restore and psql's \lo_export / \lo_import), by their oids, which PostgreSQL never changes
# and no user function can have (user objects get oids from 16384 on).
LARGE_OBJECT_FUNCTIONS = {
    715: "lo_create",
    952: "lo_open",
    953: "lo_close",
    954: "loread",
    955: "lowrite",
    956: "lo_lseek",
    957: "lo_creat",
    958: "lo_tell",
    964: "lo_unlink",
    1004: "lo_truncate",
    3170: "lo_lseek64",
    3171: "lo_tell64",
    3172: "lo_truncate64",
}

# Expectation kinds: what the server owes for a message the gateway forwarded.
_K_PARSE, _K_BIND, _K_DESC_S, _K_DESC_P, _K_EXEC, _K_CLOSE = range(6)
_K_SYNC, _K_QUERY, _K_FCALL, _K_DENY_P, _K_DENY_Q, _K_ABORT = range(6, 12)
_K_SETTING = 12  # the gateway's own SHOW of a setting (statement_timeout before a hold): answered to the gateway
# The gateway's own SHOW of a setting inside an open extended-query segment (before a Bind it holds), as Parse, Bind,
# Execute and Close of a statement and portal of its own: answered to the gateway, no ReadyForQuery.
_K_SETTING_IN_SEGMENT = 13
_Z_KINDS = frozenset({_K_SYNC, _K_QUERY, _K_FCALL, _K_DENY_Q, _K_ABORT, _K_SETTING})

_CANCELLED_BY_AGENT = "the agent cancelled the statement while it was held"

# What the server runs in a failed transaction (its IsTransactionExitStmt): COMMIT (which rolls back), ROLLBACK,
# ROLLBACK TO SAVEPOINT and PREPARE TRANSACTION; it refuses anything else with 25P02.
_ENDS_FAILED_TRANSACTION = frozenset({"commit", "rollback", "prepare_transaction"})
_FAILED_TRANSACTION = pg.error_response(
    "ERROR", "25P02", "current transaction is aborted, commands ignored until end of transaction block"
)

# Types whose binary representation is the text itself (text, varchar, bpchar, name, char, unknown, json,
# xml, citext is an extension and has no fixed oid). jsonb's binary form is a version byte then the text.
_TEXT_LIKE = frozenset({25, 1043, 1042, 19, 18, 705, 114, 142})
_JSONB = 3802
_BYTEA = 17
_JSON_TYPES = frozenset({114, _JSONB})
_NUMERIC_TYPES = frozenset({20, 21, 23, 26, 700, 701, 790, 1700})  # int8 int2 int4 oid float4/8 money numeric
# Binary values of these types cannot hold what a detector looks for (at most 10 digits, or no digits
# in a row): a detector has nothing to find; a column mask turns them into NULL.
_BINARY_NOTHING_TO_DETECT = frozenset(
    {
        *(16, 21, 23, 26, 700, 1082, 1083, 1114, 1184, 1186, 1266, 2950),  # bool int2 int4 oid float4, times, uuid
        *(1000, 1005, 1007, 1021, 1182, 1183, 1115, 1185, 1187, 2951),  # arrays of those
        *(869, 650, 829, 3904, 3912, 3908, 3910),  # inet cidr macaddr, int4/date/ts/tstz ranges
        # void (pg_sleep(), functions returning nothing), oid-valued types and their arrays (catalog
        # queries of drivers: asyncpg's type introspection returns oid[]), int2vector, oidvector, xid, cid
        *(2278, 24, 2202, 2203, 2204, 2205, 2206, 4089, 4096, 3769, 4191, 1028, 1008, 2207, 2210, 2211),
        *(22, 30, 28, 29),
    }
)
# Arrays whose elements can be masked one by one in binary: element type of each array type.
_BINARY_ARRAYS = {
    1009: 25,
    1015: 1043,
    1014: 1042,
    1003: 19,
    1002: 18,
    199: 114,
    3807: 3802,
    143: 142,  # text-like
    1016: 20,
    1022: 701,
    791: 790,
    1231: 1700,  # int8 float8 money numeric
    1001: 17,  # bytea
}
_INT8, _FLOAT8, _MONEY, _NUMERIC = 20, 701, 790, 1700
# Types whose text form is a literal made of numbers: arrays of int8, numeric, float8 and money, ranges and
# multiranges of int8 and numeric (and their arrays), geometric types (and their arrays). A detector's mask
# inside one (``{************1111}``) is no value of the type, and the agent's driver would fail on the
# whole result: such a value comes back NULL when masking changes it.
_NUMBER_LITERALS = frozenset(
    {
        *(1016, 1231, 1022, 791),
        *(3926, 3906, 4536, 4532, 3927, 3907, 6157, 6151),
        *(600, 601, 602, 603, 604, 628, 718, 1017, 1018, 1019, 1020, 1027, 629, 719),
    }
)
_BINARY_NUMBERS = frozenset({_INT8, _FLOAT8, _MONEY, _NUMERIC})  # read as numbers by _binary_number_text
# Geometric types whose binary form is a fixed number of float8 values (point x, y; lseg and box two points;
# line A, B, C; circle x, y, radius): each is read as a float8. pgjdbc reads point and box in binary.
_BINARY_FLOAT8_TUPLES = {600: 2, 601: 4, 603: 4, 628: 3, 718: 3}


# A number in exponent notation (``4.111111111111111e+15``: a float8's text form, also as text, inside an array,
# a point or another composite) spells a card number in digits no detector sees.
_EXPONENT_NUMBER = re.compile(rb"[-+]?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]{1,3}(?![0-9])")  # float8: e+308 at most


# A number with group separators: money's text form (``$4,111,111,111,111,111.00``; ``4.111.111.111.111.111,00``
# or with (narrow) no-break spaces under another lc_monetary), also as text, inside a money[] or a composite.
# The card detector allows spaces and dashes between digits, not these: the digits are read without them.
_GROUPED_NUMBER = re.compile(
    rb"(?<![0-9])(?P<whole>[0-9]{1,3}(?:(?:[,.' ]|\xc2\xa0|\xe2\x80\xaf)[0-9]{3}){3,})(?:[.,][0-9]{1,2})?(?![0-9])"
)

# What every match of _EXPONENT_NUMBER or _GROUPED_NUMBER holds: a digit before an exponent, or before a separator
# and three digits. One search rules both out for a value without them.
_NUMBER_HINT = re.compile(rb"[0-9](?:[eE][-+]?[0-9]|(?:[,.' ]|\xc2\xa0|\xe2\x80\xaf)[0-9]{3})")


# A character reference of XML or HTML: numeric (&#64;, &#x40;) or HTML's named ones (&commat;, &period;). An xml
# value, or HTML kept in a text column (a rich-text note), that writes an address or a card number with them
# (jane&#64;example.com, 4111&#32;1111 ...) holds one for every program that reads it as XML or HTML, while the
# detectors read the bytes, and see none.
_CHARACTER_REFERENCE = re.compile(rb"&(?:#[0-9]{1,8}|#[xX][0-9A-Fa-f]{1,8}|[A-Za-z][A-Za-z0-9]{1,31});")
# Characters of markup, escapes and COPY's delimiters: kept as references (written out, they would change the
# value's structure).
_KEPT_REFERENCES = frozenset(b"<>&\"'\\,;|")
_NO_BREAK_SPACES = frozenset({0xA0, 0x2007, 0x202F})  # separators of a card's groups, as the detectors read them


def _plain_reference(match: re.Match[bytes]) -> bytes:
    digits = match.group()[2:-1]
    if match.group()[1:2] != b"#":  # named: &commat;
        text = html.unescape(match.group().decode("ascii"))
        if len(text) != 1:
            return match.group()  # unknown, or more than one character
        code = ord(text)
    else:
        code = int(digits[1:], 16) if digits[:1] in (b"x", b"X") else int(digits)
    if 0x20 <= code <= 0x7E and code not in _KEPT_REFERENCES:
        return bytes((code,))
    if code in _NO_BREAK_SPACES:
        return chr(code).encode()
    return match.group()


def _referenced_masked(mask: Callable[[bytes], bytes], value: bytes) -> bytes:
    """``value`` with its character references to printable ASCII characters (and no-break spaces) written as
    those characters, masked by ``mask``, when that masks anything; else ``value`` as it is."""
    plain = _CHARACTER_REFERENCE.sub(_plain_reference, value)
    if plain == value:
        return value
    masked = mask(plain)
    return value if masked == plain else masked


def _hides_a_number(masker: Any, index: int, text: bytes) -> bool:
    """Whether a value holds a number in exponent notation that masking would change (``4.111111111111111e+15``,
    ``f8::text``; ``{4.111111111111111e+15}``, a float8[]; ``(4.111111111111111e+15,0)``, a point), or one
    written with group separators (``{"$4,111,111,111,111,111.00"}``, a money[]; ``m::text``)."""
    if _NUMBER_HINT.search(text) is None:
        return False  # neither kind of number is in it (the check of almost every masked value)
    if any(_number_masked(masker, index, m.group()) for m in _EXPONENT_NUMBER.finditer(text)):
        return True
    return _grouped_number_masked(masker, index, text)


def _grouped_number_masked(masker: Any, index: int, text: bytes) -> bool:
    """Whether a number written with group separators in ``text`` is one that masking would change when
    written in plain digits. Which separator is the decimal one depends on the locale: both readings count
    (the last group of ``4.111.111.111.111,111`` may be the fraction)."""
    for m in _GROUPED_NUMBER.finditer(text):
        whole = m.group("whole")
        digits = bytes(c for c in whole if 48 <= c <= 57)
        if len(digits) < 12:
            continue
        for candidate in (digits, digits[:-3]):
            if masker.mask_value(index, candidate) != candidate:
                return True
    return False


class _CopyNumbers:
    """The mask plan of a COPY, as _number_masked reads a masker (COPY output has no columns)."""

    __slots__ = ("plan",)

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def mask_value(self, index: int, text: bytes) -> bytes:
        return bytes(self.plan.mask_bytes(text)[0])


def _number_masked(masker: Any, index: int, text: bytes) -> bool:
    """Whether masking would change a number's text form (``4111111111111111``), or the same number spelled
    with plain digits (``4.111111111111111e+15``, ``$4,111,111,111,111,111.00``): it then comes back NULL."""
    if masker.mask_value(index, text) != text:
        return True
    if len(text) - len(text.translate(None, b"0123456789")) < 12 and b"e" not in text.lower():
        return False  # too few digits for anything a built-in detector looks for (and no exponent)
    if _grouped_number_masked(masker, index, text):
        return True  # money under an lc_monetary that groups with dots or spaces: 4.111.111.111.111.111,00 €
    kept = bytes(c for c in text if c in b"0123456789.-+eE")
    try:
        number = Decimal(kept.decode())
    except (InvalidOperation, UnicodeDecodeError):
        return False
    if not number.is_finite() or abs(number) >= Decimal("1e40"):
        return False
    plain = format(number.to_integral_value() if number == number.to_integral_value() else number, "f").encode()
    return bool(masker.mask_value(index, plain) != plain)


def _binary_number_text(type_oid: int, value: bytes) -> bytes:
    """The text form of a binary int8, float8, money or numeric value (for the detectors)."""
    if type_oid in (_INT8, _MONEY):
        (n,) = struct.unpack("!q", value)
        return str(n).encode()
    if type_oid == _FLOAT8:
        (f,) = struct.unpack("!d", value)
        return repr(f).encode()
    ndigits, weight, sign, _scale = struct.unpack_from("!hhHh", value)
    if sign in (0xC000, 0xD000, 0xF000):  # NaN, +Infinity, -Infinity
        return b"NaN"
    digits = struct.unpack_from(f"!{ndigits}h", value, 8)
    groups = [*digits[: max(weight + 1, 0)], *[0] * max(weight + 1 - ndigits, 0)]
    whole = "".join(f"{d:04d}" for d in groups).lstrip("0") or "0"
    frac = "".join(f"{d:04d}" for d in digits[max(weight + 1, 0) :])
    frac = "0000" * max(-weight - 1, 0) + frac
    text = whole + (f".{frac}" if frac else "")
    return (("-" if sign == 0x4000 else "") + text).encode()


_REASON = re.compile(r"/\*\s*reason\s*:\s*(.*?)\s*\*/|--\s*reason\s*:\s*([^\r\n]*)", re.IGNORECASE | re.DOTALL)

# Kinds after which the gateway reads names from the parse tree (prepared statements and cursors).
_NAMING_KINDS = frozenset({"prepare", "execute", "deallocate", "declare_cursor", "fetch", "close_cursor", "discard"})


def reason_of(sql: str) -> str | None:
    """The agent's reason, from a ``/* reason: ... */`` (or ``-- reason: ...``) comment."""
    if "reason" not in sql and "REASON" not in sql and "Reason" not in sql:
        return None
    m = _REASON.search(sql)
    if m is None:
        return None
    text = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
    return text[:500] or None


def _cstring_at(raw: bytes, pos: int) -> tuple[str, int]:
    end = raw.find(b"\0", pos)
    if end < 0:
        raise pg.ProtocolError(f"malformed {_FRONTEND_NAMES.get(raw[0], 'frontend')} message: unterminated string")
    return raw[pos:end].decode("utf-8"), end + 1


def _lexer_sensitive(sql: str) -> bool:
    """A text whose reading depends on standard_conforming_strings or the client encoding (the text alone: the
    message's length and a Parse's parameter types are binary, and may hold any byte)."""
    return "\\" in sql or not sql.isascii()


# Statements whose Bind and Execute change no setting: no planning, no user code (event triggers do not fire for
# them). pgjdbc sends BEGIN ahead of a transaction's first statement without a Sync between. Not ROLLBACK or
# ROLLBACK TO (they restore earlier values, which may have been set and reset in an earlier batch), nor COMMIT
# (deferred triggers run).
_SETTINGS_INERT = frozenset({"begin", "savepoint", "release"})


def _settings_inert(stmt: "Prepared") -> bool:
    kinds = stmt.classified.kinds
    return bool(kinds) and kinds <= _SETTINGS_INERT


@dataclass(eq=False)
class Classified:
    """A SQL text as the gateway understands it: one request per statement, plus naming side effects."""

    requests: tuple[Request, ...]
    kinds: frozenset[str]
    prepares: tuple[tuple[str, Request], ...] = ()  # PREPARE name -> its request
    executes: tuple[str, ...] = ()  # names run by EXECUTE (also inside EXPLAIN / CREATE TABLE AS)
    deallocates: tuple[str | None, ...] = ()  # None: DEALLOCATE ALL
    cursors: tuple[str, ...] = ()  # DECLARE name
    fetches: tuple[str, ...] = ()  # FETCH / MOVE name
    closes: tuple[str | None, ...] = ()  # CLOSE name; None: CLOSE ALL
    discard_all: bool = False
    copy_to: bool = False
    copy_from: bool = False
    copy_rewrites: bool = False  # COPY ... TO options that rewrite characters inside values
    statements: int = 1
    reads_cursors: bool | None = None  # see _reads_cursors (None: not worked out yet)

    def for_text(self, sql: str, reason: str | None) -> "Classified":
        """This classification for another text of the same single statement (other constants)."""
        (request,) = self.requests
        payload = sql.strip()
        summary = f"{request.action.upper().replace('_', ' ')}: {payload[:200]}"
        new = Request(request.protocol, request.action, request.attrs, request.target, summary, payload, reason)
        return Classified((new,), self.kinds, statements=1)


@dataclass(eq=False)
class Prepared:
    """A prepared statement known to the gateway (protocol Parse or SQL PREPARE)."""

    name: str
    text: str
    classified: Classified
    decision: Decision
    decided_at: float
    plan: Any
    fields: tuple[pg.FieldDescription, ...] | None = None
    param_types: tuple[int, ...] = ()  # declared in the Parse (kept for statements held at Bind)
    # FETCH / EXECUTE: the cursors, portals and prepared statements it named when decided (see _names_of)
    named: tuple[object, ...] = ()


@dataclass(eq=False)
class Portal:
    name: str
    stmt: Prepared
    params: tuple[tuple[int, ...], list[bytes | None]]  # parameter format codes, values
    formats: tuple[int, ...]
    fields: tuple[pg.FieldDescription, ...] | None = None
    describe_pending: bool = False
    decision: Decision | None = None  # an approved Bind: runs under its own approval, not the statement's
    plan: Any = None
    named: tuple[object, ...] = ()  # FETCH / EXECUTE: what its names held when it was bound


class RowMasker:
    """Masks DataRows of one result: text values and binary values of text-like types.

    A masked value must still parse as its column's type, or the agent's driver fails on the whole
    result: JSON documents are masked as JSON (a card number in a JSON number becomes a string), and
    a number that masking changed (a card stored as bigint) comes back as NULL."""

    __slots__ = (
        "binary_arrays",
        "binary_floats",
        "binary_jsonb",
        "binary_numbers",
        "bytea",
        "counts",
        "json",
        "masker",
        "number_literals",
        "numeric",
        "targets",
        "to_null",
    )

    def __init__(self, masker: Any, fields: Sequence[pg.FieldDescription], formats: Sequence[int] | None) -> None:
        self.masker = masker
        self.counts: Counter[str] = masker.counts
        targets: list[int] = []
        binary_jsonb: set[int] = set()
        as_json: set[int] = set()
        numeric: set[int] = set()
        binary_numbers: dict[int, int] = {}
        binary_arrays: dict[int, int] = {}
        binary_floats: dict[int, int] = {}
        to_null: set[int] = set()
        bytea: set[int] = set()
        number_literals: set[int] = set()
        for i, f in enumerate(fields):
            action = masker.action(i)
            if action == "pass":
                continue
            fmt = formats[i] if formats is not None else f.format
            if fmt == 1:
                if f.type_oid == _JSONB:
                    binary_jsonb.add(i)
                elif f.type_oid in _BINARY_NOTHING_TO_DETECT or f.type_oid in _BINARY_NUMBERS:
                    if action == "whole":
                        to_null.add(i)
                    elif f.type_oid not in _BINARY_NOTHING_TO_DETECT:
                        binary_numbers[i] = f.type_oid
                    else:
                        continue
                elif f.type_oid in _BINARY_ARRAYS:
                    if action == "whole":
                        to_null.add(i)
                    else:
                        binary_arrays[i] = _BINARY_ARRAYS[f.type_oid]
                    targets.append(i)
                    continue
                elif f.type_oid == _BYTEA:
                    # the bytes themselves, as the hex text form is read: masked, and still a bytea
                    targets.append(i)
                    continue
                elif f.type_oid in _BINARY_FLOAT8_TUPLES:
                    if action == "whole":
                        to_null.add(i)
                    else:
                        binary_floats[i] = _BINARY_FLOAT8_TUPLES[f.type_oid]
                    targets.append(i)
                    continue
                elif f.type_oid not in _TEXT_LIKE:
                    raise _BinaryRefused(f.name, f.type_oid)
            if f.type_oid in _JSON_TYPES:
                as_json.add(i)
            elif f.type_oid in _NUMERIC_TYPES:
                numeric.add(i)
            elif f.type_oid == _BYTEA:
                bytea.add(i)
            elif f.type_oid in _NUMBER_LITERALS:
                number_literals.add(i)
            targets.append(i)
        self.targets = tuple(targets)
        self.number_literals = frozenset(number_literals)
        self.bytea = frozenset(bytea)
        self.binary_jsonb = frozenset(binary_jsonb)
        self.json = frozenset(as_json)
        self.numeric = frozenset(numeric)
        self.binary_numbers = binary_numbers
        self.binary_floats = binary_floats
        # one element masker per array column, made once per result
        self.binary_arrays = {i: self._array_element_masker(i, elem) for i, elem in binary_arrays.items()}
        self.to_null = frozenset(to_null)

    def _array_element_masker(self, index: int, elem: int) -> Callable[[bytes], bytes | None]:
        masker = self.masker
        if elem in _BINARY_NUMBERS:
            return lambda v: None if _number_masked(masker, index, _binary_number_text(elem, v)) else v
        if elem == _JSONB:
            return lambda v: b"\x01" + self._mask_json(index, v[1:]) if v[:1] == b"\x01" else None
        if elem in _JSON_TYPES:
            return lambda v: self._mask_json(index, v)
        return lambda v: masker.mask_value(
            index, _referenced_masked(lambda p: masker.mask_value(index, p), v) if b"&" in v else v
        )

    def mask(self, raw: bytes) -> bytes:
        values: list[bytes | None] = pg.decode_datarow(raw)
        masker = self.masker
        changed = False
        for i in self.targets:
            value = values[i]
            if value is None:
                continue
            new: bytes | None
            if i in self.to_null:
                new = None
            elif i in self.binary_arrays:
                try:
                    new = _mask_binary_array(value, self.binary_arrays[i])
                except struct.error:  # not a value of its type: nothing of it is relayed
                    new = None
            elif i in self.binary_floats:
                # NULL when masking would change any of its numbers (a point at 4111111111111111), or when it is
                # not a value of its type: nothing of it is relayed
                count = self.binary_floats[i]
                new = (
                    None
                    if len(value) != 8 * count
                    or any(
                        _number_masked(masker, i, _binary_number_text(_FLOAT8, value[k : k + 8]))
                        for k in range(0, 8 * count, 8)
                    )
                    else value
                )
            elif i in self.binary_numbers:
                try:
                    new = (
                        None if _number_masked(masker, i, _binary_number_text(self.binary_numbers[i], value)) else value
                    )
                except struct.error:  # not a value of its type: nothing of it is relayed
                    new = None
            elif i in self.json:
                # a bytea in hex in a string of it (to_jsonb of a row with a bytea column): read as its bytes
                text = _mask_hex_runs(masker, i, value) if b"\\x" in value else value
                if i in self.binary_jsonb and text[:1] == b"\x01":
                    new = b"\x01" + self._mask_json(i, text[1:])
                else:
                    new = self._mask_json(i, text)
            else:
                if i in self.numeric:
                    new = None if _number_masked(masker, i, value) else value
                elif i in self.bytea and value[:2] == b"\\x":
                    new = _mask_bytea_hex(masker, i, value)
                else:
                    # a bytea in hex inside a text: data::text, a whole row, a bytea[]
                    text = _mask_hex_runs(masker, i, value) if b"\\x" in value else value
                    if b"&" in text:  # an xml value, HTML in a text: jane&#64;example.com
                        text = _referenced_masked(functools.partial(masker.mask_value, i), text)
                    if b"\\u" in text and _UNICODE_ESCAPE.search(text) and masker.action(i) == "detect":
                        new = masker.mask_json_value(i, text)  # JSON in a text column: masked as JSON where it parses
                    else:
                        new = masker.mask_value(i, text)
                        if new is not None and _hides_a_number(masker, i, new):
                            new = None  # f8::text, a float8[], a point: masking cannot rewrite a number inside it
                        elif new != value and i in self.number_literals:
                            new = None  # {************1111} is no int8[]: NULL, which the driver parses
            if new != value:
                values[i] = new
                changed = True
        return pg.encode_datarow(values) if changed else raw

    def _mask_json(self, index: int, text: bytes) -> bytes:
        """A JSON document masked; one whose strings hold character references (HTML in a field: a CMS page, a
        rich-text note) masked as they read, when that finds something (see _referenced_masked)."""
        masker = self.masker
        if b"&" in text:
            plain = _CHARACTER_REFERENCE.sub(_plain_reference, text)  # quotes and backslashes stay references
            if plain != text:
                before = self.counts.total()
                masked: bytes = masker.mask_json_value(index, plain)
                if self.counts.total() > before:
                    return masked
        result: bytes = masker.mask_json_value(index, text)
        return result


def _mask_bytea_hex(masker: Any, index: int, value: bytes) -> bytes:
    """A bytea in its hex text form (``\\x3431...``, the default ``bytea_output``): the detectors read the
    bytes it stands for, and a masked value is written back in hex, so that it is still a bytea."""
    try:
        raw = bytes.fromhex(value[2:].decode("ascii"))
    except ValueError:  # not hex after all: read as it is
        return bytes(masker.mask_value(index, value))
    masked = masker.mask_value(index, raw)
    return value if masked == raw else b"\\x" + masked.hex().encode("ascii")


# A bytea value in COPY's text or CSV output: \x and at least 8 bytes in hex (shorter holds no value a
# detector looks for).
_BYTEA_HEX = re.compile(rb"\\x((?:[0-9a-fA-F]{2}){8,})")


def _mask_hex_runs(masker: Any, index: int, value: bytes) -> bytes:
    """A text value with bytea values in it, in hex (``data::text``, a whole row or an array that holds a
    bytea): the detectors read the bytes each one stands for, and a masked one is written back in hex."""

    def one(match: re.Match[bytes]) -> bytes:
        raw = bytes.fromhex(match.group(1).decode("ascii"))
        masked = masker.mask_value(index, raw)
        return match.group(0) if masked == raw else b"\\x" + masked.hex().encode("ascii")

    return _BYTEA_HEX.sub(one, value)


def _mask_hex_run(plan: Any, match: re.Match[bytes], counts: Counter[str]) -> bytes:
    raw = bytes.fromhex(match.group(1).decode("ascii"))
    masked, found = plan.mask_bytes(raw)
    if not found:
        return match.group(0)
    counts.update(found)
    return b"\\x" + masked.hex().encode("ascii")


def _mask_binary_array(value: bytes, mask_element: Callable[[bytes], bytes | None]) -> bytes:
    """Masks each element of a binary array value (ndim, flags, element oid, dimensions, then elements
    as int32 length + bytes, -1 for NULL); an element masked to None becomes NULL."""
    ndim, _flags, elem_oid = struct.unpack_from("!iiI", value)
    if ndim < 0 or ndim > 6:
        raise struct.error("bad array header")
    offset = 12 + 8 * ndim
    header = value[12:offset]
    if len(header) != 8 * ndim:
        raise struct.error("short array header")
    count = 1
    for d in range(ndim):
        count *= struct.unpack_from("!i", header, 8 * d)[0]
    if ndim == 0:
        count = 0
    parts: list[bytes] = []
    has_null = False
    for _ in range(count):
        (length,) = struct.unpack_from("!i", value, offset)
        offset += 4
        if length < 0:
            parts.append(b"\xff\xff\xff\xff")
            has_null = True
            continue
        element = value[offset : offset + length]
        if len(element) != length:
            raise struct.error("short array element")
        offset += length
        new = mask_element(element)
        if new is None:
            parts.append(b"\xff\xff\xff\xff")
            has_null = True
        else:
            parts.append(struct.pack("!i", len(new)) + new)
    if offset != len(value):
        raise struct.error("trailing bytes in array")
    return struct.pack("!iiI", ndim, 1 if has_null else 0, elem_oid) + header + b"".join(parts)


class _BinaryRefused(Exception):
    def __init__(self, column: str, type_oid: int) -> None:
        super().__init__(column)
        self.column = column
        self.type_oid = type_oid


def result_formats(bind_formats: Sequence[int], count: int) -> tuple[int, ...] | None:
    """Per-column formats of a Bind's result format codes (None: unknown count)."""
    if not bind_formats:
        return (0,) * count
    if len(bind_formats) == 1:
        return (bind_formats[0],) * count
    if len(bind_formats) == count:
        return tuple(bind_formats)
    return None


class Execution:
    """One statement execution, for recording (and masking its rows)."""

    __slots__ = (
        "copy_masking",
        "decision",
        "error",
        "masker_done",
        "params",
        "plan",
        "portal",
        "rows",
        "sql",
        "stmt_name",
        "t0",
        "touched",
    )

    def __init__(self, sql: str, decision: Decision, plan: Any, stmt_name: str | None = None) -> None:
        self.touched: _Touched | None = None  # names of prepared statements and cursors it creates or drops
        self.sql = sql
        self.decision = decision
        self.plan = plan
        self.stmt_name = stmt_name
        self.t0 = time.perf_counter()
        self.rows = 0
        self.params: tuple[tuple[int, ...], list[bytes | None]] | None = None
        self.portal: Portal | None = None
        self.error: str | None = None
        self.copy_masking = False
        self.masker_done = False


_Touched = tuple[tuple[str, ...], tuple[str, ...]]  # prepared statement names, cursor names


# Statements that run procedural code, which can close and open cursors under names it computes (PL/pgSQL's
# OPEN of a refcursor holding 'a'): the gateway cannot tell which, and forgets every cursor and portal it knows.
_OPAQUE_CURSOR_KINDS = frozenset({"do", "call"})
# Built-in functions that read a cursor by its name (a text value).
_CURSOR_READING_FUNCTIONS = frozenset({"cursor_to_xml", "cursor_to_xmlschema"})


def _reads_cursors(classified: Classified) -> bool:
    """Whether a statement can read a cursor other than by FETCH or MOVE: procedural code (PL/pgSQL's FETCH of
    a refcursor holding the cursor's name) or a function that takes the name as a value."""
    reads = classified.reads_cursors
    if reads is None:
        reads = classified.reads_cursors = not classified.kinds.isdisjoint(_OPAQUE_CURSOR_KINDS) or any(
            not _CURSOR_READING_FUNCTIONS.isdisjoint(r.attrs.get("functions") or ()) for r in classified.requests
        )
    return reads


def _changes_names(c: Classified) -> bool:
    """Whether a statement creates or drops prepared statements or cursors (rarely: checked per execution)."""
    return bool(
        c.prepares
        or c.deallocates
        or c.cursors
        or c.closes
        or c.discard_all
        or not c.kinds.isdisjoint(_OPAQUE_CURSOR_KINDS)
    )


def _touched(classified: Classified) -> _Touched | None:
    """The names of prepared statements and cursors a statement creates or drops (None: none)."""
    if not _changes_names(classified):
        return None
    prepared = (*(n for n, _ in classified.prepares), *(n for n in classified.deallocates if n is not None))
    cursors = (*classified.cursors, *(n for n in classified.closes if n is not None))
    return (prepared, cursors) if prepared or cursors else None


class _QueryRun:
    """A simple Query in flight: its statements, and which one the server is answering."""

    __slots__ = ("decision", "index", "plan", "t0", "texts", "touched")

    def __init__(self, texts: list[str], decision: Decision, plan: Any, touched: _Touched | None = None) -> None:
        self.touched = touched
        self.texts = texts
        self.decision = decision
        self.plan = plan
        self.index = 0
        self.t0 = time.perf_counter()

    def record(self, text: str, now: float) -> dict[str, Any]:
        """The ``statement`` event of one of its statements, as far as the decision and the clock tell."""
        record: dict[str, Any] = {
            "sql": redact_secrets(text)[:RECORD_SQL_LIMIT],
            "decision": self.decision.action,
            "rules": list(self.decision.rule_ids),
            "ms": round((now - self.t0) * 1000, 3),
        }
        if self.decision.approval_id:
            record["approval"] = self.decision.approval_id
        return record


class _Expect:
    __slots__ = ("data", "kind", "run")

    def __init__(self, kind: int, data: Any = None, run: Any = None) -> None:
        self.kind = kind
        self.data = data
        self.run = run


@dataclass
class Stats:
    statements: int = 0
    denied: int = 0
    rows: int = 0
    masked: Counter[str] = field(default_factory=Counter)


HOLD_WATCH_INTERVAL = 1.0
"""Seconds between checks that an agent whose statement is held is still connected."""

Handler = Callable[[bytes], "bytes | Coroutine[Any, Any, bytes | None] | None"]


_TEXT_MESSAGES = frozenset((_B_ERROR, _B_NOTICE, _B_NOTIFY, _B_PARAM))
_REPORT_CODES_KEPT = frozenset("SVCPFLR")  # severity, SQLSTATE, position, source location
_VALUE_FIELDS = frozenset("MDHWqp")  # message, detail, hint, context, internal query and position
# Conditions whose message names only a command or a state, never a value (their detail is withheld).
_VALUE_FREE_CONDITIONS = frozenset({"25006", "25P02", "25001", "57014", "57P01", "40001", "40P01"})
_CONDITION_CLASSES = {
    "00": "notice",
    "01": "warning",
    "08": "connection exception",
    "0A": "feature not supported",
    "20": "case not found",
    "21": "cardinality violation",
    "22": "data exception",
    "23": "integrity constraint violation",
    "24": "invalid cursor state",
    "25": "invalid transaction state",
    "26": "invalid SQL statement name",
    "28": "invalid authorization specification",
    "2B": "dependent privilege descriptors still exist",
    "2D": "invalid transaction termination",
    "2F": "SQL routine exception",
    "34": "invalid cursor name",
    "38": "external routine exception",
    "39": "external routine invocation exception",
    "3B": "savepoint exception",
    "3D": "invalid catalog name",
    "3F": "invalid schema name",
    "40": "transaction rollback",
    "42": "syntax error or access rule violation",
    "44": "WITH CHECK OPTION violation",
    "53": "insufficient resources",
    "54": "program limit exceeded",
    "55": "object not in prerequisite state",
    "57": "operator intervention",
    "58": "system error",
    "72": "snapshot failure",
    "HV": "foreign data wrapper error",
    "P0": "PL/pgSQL error",
    "XX": "internal error",
}


def _masked_texts(plan: Any, raw: bytes, why: str = "from sessions whose results are masked") -> bytes | None:
    """``raw`` (decoded and encoded by the codec) with its texts masked by ``plan``'s detectors, and the
    text of errors and notices raised while a statement ran withheld (saying ``why``); None if unchanged. Raises
    :class:`pg.ProtocolError` when it does not decode."""

    def bytea(text: str) -> str:
        """A bytea in hex (a row_to_json payload, a row in a notice) read as its bytes, and masked in hex."""
        if "\\x" not in text:
            return text
        counts: Counter[str] = Counter()
        return _BYTEA_HEX.sub(lambda m: _mask_hex_run(plan, m, counts), text.encode()).decode()

    def mask(text: str) -> str:
        text = bytea(text)
        if "&" in text:  # HTML or XML in it: jane&#64;example.com
            text = _referenced_masked(lambda v: bytes(plan.mask_bytes(v)[0]), text.encode()).decode()
        return str(plan.mask_text(text)[0]).replace("\0", "")

    message = pg.decode_backend(raw)
    if isinstance(message, pg.NotificationResponse):
        channel, payload = mask(message.channel), mask(message.payload)
        if _UNICODE_ESCAPE.search(message.payload.encode()):
            # JSON (row_to_json of a row with a json column): masked as JSON, or withheld
            try:
                doc, _ = plan.mask_json(json.loads(bytea(message.payload)))
                payload = json.dumps(doc, ensure_ascii=False).replace("\0", "")
            except (ValueError, RecursionError):
                payload = "[REDACTED:lictor]"
        if (channel, payload) == (message.channel, message.payload):
            return None
        return pg.notification_response(message.pid, channel, payload)
    if isinstance(message, pg.ParameterStatus):
        value = mask(message.value)
        return None if value == message.value else pg.parameter_status(message.name, value)
    assert isinstance(message, (pg.ErrorResponse, pg.NoticeResponse))
    fields = {k: v if k in _REPORT_CODES_KEPT or not v else mask(v) for k, v in message.fields.items()}
    # A position means the server found the problem in the statement's text, before it ran: except a syntax
    # error (the gateway parsed the text with the same grammar, so that one comes from a value parsed while
    # the statement ran, as ('x ' || reverse(card))::regtype does) and one with a context line (a value
    # parsed as a type name: invalid type name "...").
    before_run = bool(fields.get("P")) and not fields.get("W") and fields.get("C") != "42601"
    if not before_run:
        # Raised while the statement ran: the message may print a value the statement computed, which the
        # detectors do not recognise (WHERE reverse(card)::int = 0 gives invalid input syntax for type
        # integer: "1111 ..."; others print it unquoted, in hex or in an XML parser's detail). Only the
        # SQLSTATE and its class are kept, and the message of a few conditions that never print values.
        code = fields.get("C", "")
        if code in _VALUE_FREE_CONDITIONS:
            fields = {k: v for k, v in fields.items() if k not in _VALUE_FIELDS or k == "M"}
        else:
            fields = {k: v for k, v in fields.items() if k not in _VALUE_FIELDS}
            condition = _CONDITION_CLASSES.get(code[:2], "error")
            fields["M"] = f"{condition} (SQLSTATE {code}); the server's message is withheld {why}"
    return None if fields == message.fields else pg.report(raw[:1], fields)


class Relay:
    """Drives one established agent connection; see the module docstring."""

    def __init__(
        self,
        listener: "PostgresListener",
        target: "Target",
        session: "Session",
        agent: Pipe,
        upstream: Pipe,
        *,
        reader: pg.FrontendReader,
        database: str,
        read_only: bool,
        status: str,
        on_done: Callable[["Relay"], None],
        backend_pids: tuple[int, int] | None = None,
    ) -> None:
        self.listener = listener
        self.target = target
        self.session = session
        self.agent = agent
        self.upstream = upstream
        self.database = database
        self.read_only = read_only
        self.status = status
        self._on_done = on_done
        # The server's pid of this session and the one the agent was given (BackendKeyData): a notification
        # this session sent itself carries the server's, which the agent's driver compares with its own
        # (psycopg's conn.info.backend_pid, asyncpg's get_server_pid()) to skip its own notifications.
        self._own_pid = struct.pack("!i", backend_pids[0]) if backend_pids else None
        self._agent_pid = struct.pack("!i", backend_pids[1]) if backend_pids else b""
        login = listener.upstreams.get(target.name)
        self._login = login.user if login is not None else ""
        # What names the role the gateway logs in as: ALTER/DROP/RENAME of one of these is refused
        self._login_roles = frozenset({"current_user", "session_user", "current_role", "*", self._login})
        self._fe = reader
        self._be = pg.BackendReader()
        self._deferred_syncs = listener.gateway.defer_strict_sync()
        # the rest of the target's answer (block, first message not yet relayed), for the loop's next turns
        self._be_backlog: deque[tuple[pg.Block, int]] = deque()
        self._expect: deque[_Expect] = deque()
        self._up: list[bytes] = []
        self._pending: deque[tuple[bytes, list[int], bytes, int]] = deque()
        self._holding = False
        self._discard = False  # dropping the agent's messages until Sync, after a denial
        self._be_skip = False  # the server is skipping messages until Sync, after an error
        self._segment_execs = 0  # Executes forwarded since the last forwarded Sync
        # Extended-query messages forwarded since the last Sync: after an error the server skips everything up
        # to Sync, a Query or function call too, and the gateway cannot know which it ran.
        self._open_segment = False
        self._segment_bound = False  # a Bind was forwarded since the last forwarded Sync
        # A Bind or Execute forwarded since the last forwarded Sync could have changed a setting (it was not of a
        # BEGIN, SAVEPOINT or RELEASE): the server's settings are known again only at its ReadyForQuery.
        self._segment_may_set = False
        self._segment_masked = False  # an Execute with a mask plan in the open segment: its Sync waits (see _on_sync)
        self._pending_z = 0  # ReadyForQuery messages the server still owes
        self._clean_waiters: list[asyncio.Future[None]] = []
        self._answer_waiters: list[asyncio.Future[None]] = []  # woken by any answer from the server
        self._rows: RowMasker | None = None
        self._exec_pending_masker = False  # an Execute with a mask plan is queued: build its masker lazily
        self._copy_plan: Any = None
        # A forwarded Query or Execute of COPY ... FROM STDIN, until the agent ends its data: the server
        # ignores Sync while it reads COPY data (libpq sends one after an Execute before it knows the
        # statement is a COPY), so such a Sync is owed no ReadyForQuery.
        self._copy_run: Any = None
        self._copy_started = False  # the server answered _copy_run with CopyInResponse
        self._copy_waiters: list[asyncio.Future[None]] = []  # a Sync held until _copy_run is answered
        # The latest mask plan with detectors decided on this connection: server messages that are not
        # rows (errors, notices, notifications, parameter values) can echo masked data too.
        self._text_plan: Any = None
        self._masked_since = ""  # the mask rules of the first statement that made _text_plan (for the agent)
        self._drop_segment = False  # swallowing the rest of a poisoned result, up to ReadyForQuery
        self._poison_error: bytes | None = None
        self._prepared: dict[str, Prepared] = {}
        self._portals: dict[str, Portal] = {}
        # The latest statements run here that changed search_path: approvers of a held statement read its
        # unqualified names with it (``DROP TABLE orders`` after ``SET search_path = prod``).
        self._path_changes: deque[str] = deque(maxlen=PATH_CHANGES_SHOWN)
        self._cursors: dict[str, Decision] = {}
        self._token = "LICTOR_DENIED_" + secrets.token_hex(8)
        self._deny_query = pg.query(f"/* lictor: statement denied */ {self._token}")
        self._deny_parse = pg.parse(f"lictor_denied_{secrets.token_hex(8)}", self._token)
        self.stats = Stats()
        self.closed = False
        self.end_reason = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hold_task: asyncio.Task[Any] | None = None
        self._hold_kind = 0
        self._expires_at = session.identity.expires_at
        self._user_cancel = False
        self._reading_setting = False  # a _K_SETTING is owed: its DataRow is the gateway's, not the agent's
        self._handlers: dict[int, Handler] = {
            _F_QUERY: self._on_query,
            _F_PARSE: self._on_parse,
            _F_BIND: self._on_bind,
            _F_EXECUTE: self._on_execute,
            _F_DESCRIBE: self._on_describe,
            _F_CLOSE: self._on_close,
            _F_SYNC: self._on_sync,
            _F_FCALL: self._on_function_call,
            _F_TERMINATE: self._on_terminate,
            _F_PASSWORD: self._on_password,
            _F_COPYDONE: self._on_copy_end,
            _F_COPYFAIL: self._on_copy_end,
        }

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, agent_leftover: bytes, upstream_leftover: bytes) -> None:
        self.agent.peer = self.upstream
        self.upstream.peer = self.agent
        self.agent.on_close = lambda exc: self.shutdown("agent closed the connection")
        self.upstream.on_close = lambda exc: self.shutdown("target closed the connection")
        self.agent.on_data = self._on_agent
        self.upstream.on_data = self._on_upstream
        self.agent.before_output = self.upstream.before_output = self._durable
        if upstream_leftover:
            self._on_upstream(upstream_leftover)
        if agent_leftover:
            self._on_agent(agent_leftover)
        if self.agent.closed:
            self.shutdown("agent closed the connection")
        elif self.upstream.closed:
            self.shutdown("target closed the connection")

    def _durable(self) -> bool:
        """Before output leaves (see _pipe): the strict recording's events deferred while the loop handled this turn
        (see _on_agent) are made durable, in one fdatasync for every connection. When they cannot be, the output
        is dropped and the connection ends, as when an event cannot be written."""
        gateway = self.listener.gateway
        if not gateway.owes_sync():
            return True
        try:
            gateway.sync_owed()
        except AuditError as exc:
            for pipe in (self.agent, self.upstream):
                pipe.before_output = None
                pipe.drop_queued()
            if not self.closed:
                self._unrecordable(exc)
            return False
        return True

    def shutdown(self, why: str, fatal: bytes | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.end_reason = why
        self._record_unanswered(why)
        if fatal is not None:
            self.agent.write(fatal)
        self.agent.on_data = None
        self.upstream.on_data = None
        self.upstream.close()
        self.agent.close()
        for waiter in (*self._clean_waiters, *self._answer_waiters):
            if not waiter.done():
                waiter.set_exception(ConnectionError(why))
        self._clean_waiters.clear()
        self._answer_waiters.clear()
        for task in list(self._tasks):
            task.cancel(why)  # a held statement's request is withdrawn with this reason
        log.debug("session %s ended: %s", self.session.id, why)
        self._on_done(self)

    def _record_unanswered(self, why: str) -> None:
        """Statements the server had not answered when the connection ended go into the recording too: the
        one running then (which may have changed data) is otherwise only in the audit log's decision."""
        try:
            for head in self._expect:
                run = head.run
                if head.kind == _K_QUERY and isinstance(run, _QueryRun):
                    now = time.perf_counter()
                    for text in run.texts[run.index :]:
                        self.session.record("statement", {**run.record(text, now), "error": "unanswered", "ended": why})
                elif head.kind == _K_EXEC and isinstance(run, Execution):
                    run.error = "unanswered"
                    self._record_exec(run)
        except AuditError as exc:
            log.error("session %s: statements running at its end could not be recorded: %s", self.session.id, exc)

    def _fatal(self, sqlstate: str, message: str) -> bytes:
        return pg.error_response("FATAL", sqlstate, message)

    def _unrecordable(self, exc: AuditError) -> None:
        """What this connection does next could not be recorded (the spool is full or broken): end it."""
        log.error("session %s: cannot be recorded, closing the connection (fail closed): %s", self.session.id, exc)
        self.shutdown(
            "recording unavailable",
            pg.error_response(
                "FATAL",
                "53000",
                "lictor: this session can no longer be recorded (the gateway's audit and recording store is "
                "unavailable); the connection is closed (fail closed)",
                hint="Reconnect later: the gateway accepts connections again once the store takes writes.",
            ),
        )

    def _internal_error(self, doing: str, exc: Exception) -> None:
        """A defect in the gateway: the connection ends (fail closed), and the audit log says so, with what the
        gateway was doing: the statement it was handling is in no decision."""
        log.error("internal error %s; closing the connection (fail closed)", doing, exc_info=exc)
        self.listener.gateway.audit_event(
            "postgres.internal_error",
            {
                "session": self.session.id,
                "protocol": "postgres",
                "target": self.target.name,
                "while": doing,
                "error": f"{type(exc).__name__}: {exc}"[:500],
            },
            fail_closed=False,
        )
        self.shutdown(
            "internal error",
            self._fatal("XX000", "lictor: internal error in the gateway; the connection is closed (fail closed)"),
        )

    def _protocol_violation(self, what: str) -> None:
        self.shutdown(f"protocol violation: {what}", self._fatal("08P01", f"lictor: protocol violation: {what}"))

    # -- frontend --------------------------------------------------------------------------------------

    def _on_agent(self, data: bytes) -> None:
        if self.closed:
            return
        # Events of a strict recording written while this runs are synced once, before the turn's output leaves
        # (_durable), not one by one: an fdatasync per statement stalled every connection on the gateway.
        with self._deferred_syncs:
            self._agent_data(data)

    def _agent_data(self, data: bytes) -> None:
        expires = self._expires_at
        if expires is not None and time.time() > expires:
            # A connection does not outlive the token that opened it.
            self.shutdown(
                "token expired",
                pg.error_response(
                    "FATAL",
                    "28000",
                    "lictor: your token has expired; the connection is closed",
                    hint="Reconnect with a fresh token.",
                ),
            )
            return
        try:
            block = self._fe.feed_block(data)
        except pg.ProtocolError as exc:
            self._protocol_violation(str(exc))
            return
        if not block:
            return
        if self._holding or self._pending:
            self._pending.append((block.data, block.offsets, block.types, 0))
            self._pump()
            return
        self._run_frontend(block.data, block.offsets, block.types, 0)
        self._flush_up()

    def _pump(self) -> None:
        while self._pending and not self._holding and not self.closed:
            data, offsets, types, index = self._pending.popleft()
            self._run_frontend(data, offsets, types, index)
        self._flush_up()

    def _flush_up(self) -> None:
        up = self._up
        if up:
            self.upstream.write_soon(up[0] if len(up) == 1 else b"".join(up))
            up.clear()

    def _run_frontend(self, data: bytes, offsets: list[int], types: bytes, index: int) -> None:
        """Handle messages ``index``.. of a block; forwarded runs are appended to ``_up`` as slices."""
        n = len(offsets)
        size = len(data)
        up = self._up
        handlers = self._handlers
        fwd = offsets[index] if index < n else size
        i = index
        try:
            while i < n:
                start = offsets[i]
                end = offsets[i + 1] if i + 1 < n else size
                t = types[i]
                if self._discard:
                    if fwd < start:
                        up.append(data[fwd:start])
                    fwd = end
                    if t == _F_SYNC:
                        self._discard = False
                        up.append(data[start:end])
                        self._push_sync()
                    elif t == _F_TERMINATE:
                        up.append(data[start:end])
                        self._on_terminate(data[start:end])
                    i += 1
                    continue
                handler = handlers.get(t)
                if handler is None:  # Flush, CopyData, CopyDone, CopyFail: forwarded as they are
                    i += 1
                    continue
                result = handler(data[start:end])
                if result is None:
                    i += 1
                    continue
                if fwd < start:
                    up.append(data[fwd:start])
                fwd = end
                if isinstance(result, bytes):
                    if result:
                        up.append(result)
                    i += 1
                    continue
                # The handler needs to wait (approval, an earlier statement to finish): hold the rest.
                if i + 1 < n:
                    self._pending.appendleft((data, offsets, types, i + 1))
                self._hold(result, t)
                return
        except pg.ProtocolError as exc:
            self._protocol_violation(str(exc))
            return
        except UnicodeDecodeError:
            self._protocol_violation("text is not valid UTF-8")
            return
        except AuditError as exc:
            self._unrecordable(exc)
            return
        except Exception as exc:
            self._internal_error("relaying the agent's messages", exc)
            return
        if fwd < size:
            up.append(data[fwd:] if fwd else data)

    def _hold(self, coro: Coroutine[Any, Any, bytes | None], kind: int) -> None:
        self._holding = True
        self._flush_up()
        self.agent.pause_reading("hold")
        task = asyncio.ensure_future(self._held(coro, kind))
        self._hold_task = task
        self._hold_kind = kind
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        watcher = asyncio.ensure_future(self._watch_agent_while_held(task))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)

    async def _watch_agent_while_held(self, task: asyncio.Task[Any]) -> None:
        """Reading from the agent is paused during a hold, so its going away would go unnoticed until the
        hold ends: look every second, and end the session (which withdraws the approval request)."""
        while not task.done() and not self.closed:
            await asyncio.sleep(HOLD_WATCH_INTERVAL)
            if not task.done() and self.agent.peer_gone():
                self.shutdown("agent closed the connection while a statement was held")
                return

    def cancel_hold(self) -> bool:
        """The agent sent a CancelRequest: give up a statement held in the gateway (e.g. for approval)."""
        task = self._hold_task
        if not self._holding or task is None or task.done() or self._hold_kind == _F_SYNC:
            return False  # a Sync held behind a COPY: the cancel is for the COPY, at the server
        self._user_cancel = True
        task.cancel(_CANCELLED_BY_AGENT)
        return True

    async def _held(self, coro: Coroutine[Any, Any, bytes | None], kind: int) -> None:
        try:
            result = await coro
        except asyncio.CancelledError:
            if not self._user_cancel or self.closed:
                raise
            self._user_cancel = False
            error = pg.error_response(
                "ERROR",
                "57014",
                "lictor: canceling statement due to user request (it was held by the gateway)",
                hint="Run it again to ask again.",
            )
            result = self._deny_simple(error) if kind in (_F_QUERY, _F_FCALL) else self._deny_extended(error)
        except ConnectionError:
            return
        except AuditError as exc:
            self._unrecordable(exc)
            return
        except Exception as exc:
            self._internal_error("holding a statement", exc)
            return
        if self.closed:
            return
        if result:
            self._up.append(result)
        self._holding = False
        self.agent.resume_reading("hold")
        self._pump()

    # -- expectations ----------------------------------------------------------------------------------

    def _push(self, kind: int, data: Any = None, run: Any = None) -> None:
        if kind == _K_EXEC and run.plan is not None:
            self._exec_pending_masker = True
            self._segment_masked = True
        if self._be_skip:
            # The server is skipping everything up to the next Sync: it will not answer this.
            if kind == _K_EXEC and isinstance(run, Execution):
                run.error = "skipped"
                self._finish(run, None)  # the names a PREPARE or DECLARE in it would have made are forgotten
            return
        self._expect.append(_Expect(kind, data, run))

    def _push_sync(self) -> None:
        self._be_skip = False
        self._segment_masked = False
        self._segment_execs = 0
        self._open_segment = False
        self._segment_bound = False
        self._segment_may_set = False
        self._pending_z += 1
        self._expect.append(_Expect(_K_SYNC))

    def _push_z(self, kind: int, data: Any = None, run: Any = None) -> None:
        self._pending_z += 1
        self._expect.append(_Expect(kind, data, run))

    def _is_clean(self) -> bool:
        return self._pending_z == 0 and self._segment_execs == 0 and not self._expect

    def _segment_settled(self) -> bool:
        """The open extended-query segment ran nothing (no Bind, no Execute) and the server answered all of it
        without an error: it is not skipping to a Sync, so a Query sent now runs, and runs alone."""
        return self._is_clean() and not self._segment_bound and not self._be_skip and not self._discard

    async def _wait_answered(self) -> None:
        """Wait until the server has answered every message forwarded before (a Flush makes it answer those of
        an open extended-query segment), or reported an error and skips the rest of the segment."""
        if not self._expect:
            return
        self._up.append(pg.flush())
        self._flush_up()
        while self._expect and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._answer_waiters.append(waiter)
            await waiter

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        woken = list(waiters)
        waiters.clear()
        for waiter in woken:
            if not waiter.done():
                waiter.set_result(None)

    def _refused_in_failed_transaction(self, classified: Classified, sql: str) -> Decision | None:
        """In a transaction that has already failed (the server's last word), the server refuses every
        statement but one ending the transaction or rolling back to a savepoint (SQLSTATE 25P02) and, in a
        query of several, those after it: such a statement cannot run, so no approver is asked about it. The
        refusal, audited and recorded; None when the statement would run."""
        if self.status != "E" or not classified.requests:
            return None
        if classified.requests[0].action in _ENDS_FAILED_TRANSACTION:
            return None
        refusal = Decision.deny(
            "current transaction is aborted, commands ignored until end of transaction block (the statement was "
            "not held for approval: it cannot run)",
            "lictor:failed-transaction",
            self.session.policy.version,
        )
        self._audit_refusal(classified.requests, refusal, "protocol")
        self._record_denial(sql, refusal)
        return refusal

    async def _wait_clean(self) -> None:
        await self._wait_for(lambda: self._pending_z == 0 and not self._expect)

    async def _wait_for(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, checked again at each ReadyForQuery (what was held back is sent meanwhile)."""
        while not done():
            waiter = asyncio.get_running_loop().create_future()
            self._clean_waiters.append(waiter)
            self._flush_up()
            await waiter

    # -- classification and decisions ------------------------------------------------------------------

    def _classify(self, sql: str) -> Classified:
        return self.listener.classify(self.target.name, self.database, sql)

    def _decide(self, classified: Classified, extra: Sequence[Decision] = ()) -> tuple[Decision, list[Decision]]:
        decide_now = self.session.decide_now
        login_roles = self._login_roles
        decisions = [
            self._login_change(r)
            if r.attrs.get("roles") and not login_roles.isdisjoint(r.attrs["roles"])
            else decide_now(r)
            for r in classified.requests
        ]
        if _reads_cursors(classified):
            masked = self._masked_cursor()
            if masked is None and classified.cursors:
                # a cursor this same query declares is not known yet: masked, the code after it could read it
                masked = next(
                    (
                        (classified.cursors[0], d.mask_rule_ids[0] if d.mask_rule_ids else "lictor:mask")
                        for d in decisions
                        if d.action != "deny" and not self._mask_plan(d).is_empty
                    ),
                    None,
                )
            if masked is not None:
                name, rule = masked
                refusal = Decision.deny(
                    f"cursor {name!r} is open and its rows are masked, and this statement can read a cursor by its "
                    "name past the masking (a DO block or CALL, cursor_to_xml); close it first (CLOSE ALL), or "
                    "FETCH from it",
                    rule,
                    self.session.policy.version,
                )
                self._audit_refusal(classified.requests, refusal, "masking")
                decisions.append(refusal)
        # EXECUTE / FETCH are decided as the statement they run.
        for name in classified.executes:
            stmt = self._prepared.get(name)
            if stmt is None:
                decisions.append(
                    self._unknown_name(
                        classified,
                        f"prepared statement {name!r} was not prepared through the gateway, so its statement "
                        "is unknown; prepare it again in this connection",
                        "lictor:unknown-prepared-statement",
                    )
                )
            else:
                decisions.append(self._stmt_decision(stmt))
        for name in classified.fetches:
            cursor = self._cursors.get(name)
            portal = self._portals.get(name) if cursor is None else None
            if portal is not None:
                # A portal bound in the extended protocol (asyncpg's cursors, whose forward() sends MOVE): FETCH
                # and MOVE are decided, and their rows masked, like the portal's statement.
                decisions.append(self._stmt_decision(portal.stmt))
            elif cursor is None:
                decisions.append(
                    self._unknown_name(
                        classified,
                        f"cursor {name!r} was not declared through the gateway, so its query is unknown; "
                        "declare it with DECLARE in this connection",
                        "lictor:unknown-cursor",
                    )
                )
            else:
                decisions.append(cursor)
        decisions.extend(extra)
        final = decisions[0] if len(decisions) == 1 else combine(decisions)
        return final, decisions

    def _login_change(self, request: Request) -> Decision:
        """Refuse (and audit) a change to the role the gateway logs in as, whatever the agent's rules say: a
        new password there would hand the agent the gateway's credential, and NOLOGIN, VALID UNTIL, a
        rename or ``ALTER ROLE ... SET`` would change or break every other agent's sessions."""
        refusal = Decision.deny(
            f"it changes the role the gateway itself logs in as ({self._login!r}, or every role), which every "
            "agent's connection through this gateway uses; change that role directly on the server",
            "lictor:gateway-login",
            self.session.policy.version,
        )
        try:
            self.session.audit(request, refusal)
        except (AuditError, OSError):
            log.error("could not audit a refused change of the gateway's login role")
        return refusal

    def _stmt_decision(self, stmt: Prepared) -> Decision:
        now = time.monotonic()
        decision = stmt.decision
        renamed = self._renamed(stmt, stmt.named)
        if (
            renamed
            or decision.policy_version != self.session.policy.version
            or now - stmt.decided_at > REDECIDE_SECONDS
        ):
            decision, _ = self._decide(stmt.classified)
            stmt.decision = decision
            stmt.decided_at = now
            stmt.plan = self._mask_plan(decision) if decision.action != "deny" else None
            stmt.named = self._names_of(stmt.classified)
            if renamed:
                stmt.fields = None  # the columns of what it names now: the server describes them again
        return decision

    def _masked_cursor(self) -> tuple[str, str] | None:
        """A cursor or named portal the gateway knows whose rows are masked, with its first mask rule."""
        for name, decision in self._cursors.items():
            if not self._mask_plan(decision).is_empty:
                return name, decision.mask_rule_ids[0] if decision.mask_rule_ids else "lictor:mask"
        for name, portal in self._portals.items():
            # the unnamed portal is dropped by the next Query or Bind, before a statement of either runs
            decision = portal.decision or portal.stmt.decision
            if name and decision.action != "deny" and not self._mask_plan(decision).is_empty:
                return name, decision.mask_rule_ids[0] if decision.mask_rule_ids else "lictor:mask"
        return None

    def _names_of(self, classified: Classified) -> tuple[object, ...]:
        """The cursors, portals and prepared statements a FETCH or EXECUTE names, as the gateway knows them now
        (each DECLARE, Bind and PREPARE makes a new object): a prepared FETCH or EXECUTE runs on what its names
        hold when it runs, so its decision is made again once they hold something else. For a statement that
        can read cursors by a name it computes (see _reads_cursors): whether a masked cursor is open."""
        if classified.fetches or classified.executes:
            cursors, portals = self._cursors, self._portals
            names: tuple[object, ...] = (
                *(self._prepared.get(name) for name in classified.executes),
                *(cursors[name] if name in cursors else portals.get(name) for name in classified.fetches),
            )
        else:
            names = ()
        if _reads_cursors(classified):
            names += (self._masked_cursor() is None,)
        return names

    def _renamed(self, stmt: Prepared, named: tuple[object, ...]) -> bool:
        """Whether a FETCH or EXECUTE names other cursors or statements now than ``named``."""
        now = self._names_of(stmt.classified)
        if not now and not named:  # it names nothing (most statements): checked at every Bind and Execute
            return False
        return len(now) != len(named) or any(a is not b for a, b in zip(now, named, strict=False))

    async def _approve(
        self, classified: Classified, decision: Decision, decisions: list[Decision], whole: str | None = None
    ) -> Decision:
        """Hold an ``approve`` decision for a human, statement by statement; deny wins. ``whole``: the query the
        statements came in (approvers of one of several statements see the others too)."""

        async def notify(approval_id: str, message: str) -> None:
            text = message if approval_id in message else f"waiting for approval {approval_id}: {message}"
            self.agent.write(
                pg.notice_response(
                    "NOTICE",
                    "01000",
                    f"lictor: {text}",
                    hint="The statement runs as soon as an approver allows it; cancel the query to give up.",
                )
            )

        finals: list[Decision] = []
        count = len(classified.requests)
        for index, (request, d) in enumerate(zip(classified.requests, decisions, strict=False)):
            if d.action == "approve":
                shown = self._approval_context(request, index, count, whole)
                # decide_now audited the decision: the hold audits only its resolution.
                finals.append(await self.session.hold(shown, d, notify))
            else:
                finals.append(d)
        finals.extend(d for d in decisions[len(classified.requests) :] if d.action != "approve")
        if any(d.action == "approve" for d in decisions[len(classified.requests) :]):
            finals.append(
                Decision.deny(
                    "a prepared statement or cursor behind this statement needs approval; execute it directly",
                    decision.rule_ids[0],
                    decision.policy_version,
                )
            )
        final = combine(finals)
        if final.action == "approve":  # defensive: a broker must resolve to allow or deny
            return Decision.deny("approval did not resolve", final.rule_ids[0], final.policy_version)
        return final

    def _approval_context(self, request: Request, index: int, count: int, whole: str | None) -> Request:
        """``request`` with what else decides what it does in its summary, for approvers: the other statements
        of its query, and the statements that changed search_path earlier in this connection (an unqualified
        name in the held statement is looked up with it). The payload, which the approval is bound to, is
        unchanged."""
        context: list[str] = []
        if count > 1 and whole:
            text = redact_secrets(whole)
            if len(text) > APPROVAL_QUERY_SHOWN:
                text = text[: APPROVAL_QUERY_SHOWN - 1] + "…"
            context.append(f"Statement {index + 1} of {count} in one query; the whole query:\n{text}")
        if self._path_changes:
            context.append("search_path was changed earlier in this connection by: " + "; ".join(self._path_changes))
        if not context:
            return request
        return replace(request, summary="\n".join([request.summary, *context]))

    def _note_path_changes(self, classified: Classified) -> None:
        """Remember the statements about to run that change search_path (SET, RESET, set_config, DISCARD ALL)."""
        for request in classified.requests:
            settings = request.attrs.get("settings") or ()
            if "search_path" in settings or "all" in settings:
                self._path_changes.append(_short(request.payload))

    # -- denials ---------------------------------------------------------------------------------------

    def _denial_error(
        self, classified: Classified | None, decisions: Sequence[Decision], final: Decision, what: str = "statement"
    ) -> bytes:
        denied = [d for d in decisions if d.action == "deny"] or [final]
        first = denied[0]
        if classified is not None:
            for request, d in zip(classified.requests, decisions, strict=False):
                if d.action == "deny":
                    what = request.summary or request.action
                    break
            else:
                if classified.requests:
                    what = classified.requests[0].summary or classified.requests[0].action
        rules = ", ".join(first.rule_ids) or "none"
        detail = f"Denied by rule {rules} (policy version {first.policy_version or 'none'})."
        if first.approval_id:
            detail += f" Approval {first.approval_id}."
        if first.rule_ids and first.rule_ids[0] == "lictor:default-deny":
            hint = (
                "No rule allows this for your roles. Run only what your role allows, or ask your security team "
                "for a rule (or an approval rule) that covers it."
            )
        elif first.approval_id and first.approval_status not in (None, "pending"):
            # denied, expired, withdrawn: this request is over; running the statement again asks anew
            hint = "This approval request has ended; running the statement again asks for a new approval."
        elif first.approval_id or any(
            getattr(self.session.policy.rules_by_id.get(rule), "action", "") == "approve" for rule in first.rule_ids
        ):
            hint = "An approver must allow this statement; retry once it is approved, or ask an approver."
        else:
            hint = "This statement is blocked by policy. Rewrite it within your permissions, or ask your security team."
        if classified is not None and classified.statements > 1:
            # (not the decisions: an EXECUTE or FETCH is decided as itself and as what it runs)
            hint += " A message with several statements is denied as a whole."
        reason = first.message or "denied"
        if first.rule_ids and first.rule_ids[0] == "lictor:default-deny":
            roles = ", ".join(self.session.roles(self.session.policy)) or "none"
            reason = f"no rule allows it for your roles ({roles})"
        message = f"lictor: {what} — {reason}"
        return pg.error_response("ERROR", "42501", message[:4000], detail, hint)

    def _deny_simple(self, error: bytes) -> bytes:
        """Send the target a failing statement in place of the denied Query or FunctionCall."""
        self.stats.denied += 1
        self._push_z(_K_DENY_Q, error)
        return self._deny_query

    def _deny_extended(self, error: bytes) -> bytes:
        """Fail the target's pipeline like the denied message would have, then drop until Sync."""
        self.stats.denied += 1
        self._discard = True
        self._push(_K_DENY_P, error)
        return self._deny_parse

    def _unknown_name(self, classified: Classified, message: str, rule: str) -> Decision:
        """The denial of an EXECUTE or FETCH of a name the gateway does not know, audited."""
        unknown = Decision.deny(message, rule, self.session.policy.version)
        self._audit_refusal(classified.requests, unknown, "protocol")
        return unknown

    def _audit_refusal(self, requests: Sequence[Request], decision: Decision, phase: str) -> None:
        """Audit a denial the gateway makes of requests the rules allowed (and the policy audited as allowed):
        a result masking cannot cover (``phase`` "masking"), a name or call the gateway cannot decide
        ("protocol"). The request is denied whether or not this event is written."""
        for request in requests:
            try:
                self.session.audit(request, decision, phase)
            except (AuditError, OSError) as exc:
                log.error("session %s: could not audit a refused statement: %s", self.session.id, exc)

    def _record_denial(self, sql: str, decision: Decision, kind: str = "statement") -> None:
        try:
            self.session.record(
                kind,
                {
                    "sql": redact_secrets(sql)[:RECORD_SQL_LIMIT],
                    "decision": decision.action,
                    "rules": list(decision.rule_ids),
                    "message": decision.message,
                    "policy": decision.policy_version,
                },
            )
        except AuditError as exc:
            # Nothing is forwarded: the agent still gets the denial (lictor:audit-unavailable when the spool
            # takes no writes) on a connection that works again once the recording store is back.
            log.error("session %s: could not record a denied statement: %s", self.session.id, exc)

    # -- Query -----------------------------------------------------------------------------------------

    def _on_query(self, raw: bytes) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        if raw[-1] != 0:
            raise pg.ProtocolError("malformed Query message")
        sql = raw[5:-1].decode("utf-8")
        if "\0" in sql:
            raise pg.ProtocolError("malformed Query message: NUL inside the text")
        if self._open_segment:
            if not self._segment_settled():
                raise pg.ProtocolError(
                    "a Query inside an extended-query batch; send Sync before it (pgjdbc's autosave=always sends "
                    "its SAVEPOINT so: leave autosave at never or conservative)"
                )
            # Only Parse, Describe or Close since the last Sync, each answered without an error (asyncpg's
            # prepare() ends with Flush, not Sync): the server runs the Query as it would after a Sync.
            self._open_segment = False
        if _lexer_sensitive(sql) and not self._is_clean():
            if self._segment_execs:
                return self._refuse_sensitive_query(sql)
            return self._query_when_clean(raw, sql)
        return self._query(raw, sql)

    def _refuse_sensitive_query(self, sql: str) -> bytes:
        decision = Decision.deny(
            "a statement with a backslash or a non-ASCII character cannot follow unsynchronized statements "
            "in a pipeline (the gateway must see the server's settings first); send Sync before it",
            "lictor:pipeline-sensitive-text",
            self.session.policy.version,
        )
        self._record_denial(sql, decision)
        return self._deny_simple(self._denial_error(None, [decision], decision, _short(sql)))

    async def _query_when_clean(self, raw: bytes, sql: str) -> bytes | None:
        await self._wait_clean()
        result = self._query(raw, sql)
        if isinstance(result, Coroutine):
            return await result
        return raw if result is None else result

    def _query(self, raw: bytes, sql: str) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        classified = self._classify(sql)
        decision, decisions = self._decide(classified)
        action = decision.action
        if action == "allow":
            return self._allow_query(raw, sql, classified, decision, decisions)
        if action == "approve":
            return self._query_after_approval(raw, sql, classified, decision, decisions)
        self._record_denial(sql, decision)
        return self._deny_simple(self._denial_error(classified, decisions, decision))

    async def _statement_timeout(self) -> float | None:
        """The session's statement_timeout in seconds (None: none), asked of the server once the statements
        before the held one are answered: the agent's SET, SET LOCAL, set_config, options or role default, as
        the server would apply it. None in a failed transaction (the server would refuse the statement)."""
        await self._wait_clean()
        if self.closed or self.status == "E":
            return None
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reading_setting = True
        self._push_z(_K_SETTING, answer)
        self._up.append(pg.query("SHOW statement_timeout"))
        self._flush_up()
        return _timeout_seconds(await answer)

    async def _statement_timeout_in_segment(self) -> float | None:
        """The session's statement_timeout in seconds (None: none) before a Bind held in an open extended-query
        segment, once the server has answered what came before it without an error (``_wait_answered``).

        A Query cannot be sent there: the server would run it as the end of the segment (dropping the agent's
        unnamed statement and portal, ending its implicit transaction). The gateway parses, binds, executes
        and closes a statement and portal of its own instead, with a name nobody else uses, and a Flush: the
        server answers them in the segment, in the agent's transaction, after the agent's SET (pipelined
        before, unsynchronized) has run, and the agent's statements and portals stay as they were."""
        name = f"lictor_setting_{secrets.token_hex(8)}"
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reading_setting = True
        self._push(_K_SETTING_IN_SEGMENT, answer, [2])  # done at the second CloseComplete
        self._up.append(
            pg.parse(name, "SHOW statement_timeout")
            + pg.bind(name, name)
            + pg.execute(name)
            + pg.close("S", name)
            + pg.close("P", name)
            + pg.flush()
        )
        self._flush_up()
        return _timeout_seconds(await answer)

    async def _approve_within(
        self, sql: str, limit: float | None, coro: Coroutine[Any, Any, Decision]
    ) -> Decision | None:
        """Hold (``coro``, see _approve) no longer than ``limit`` seconds (None: until it resolves): None
        when the time ran out. The hold runs in a task of its own, cancelled with the reason (which the audit
        log gives as its resolution) when the time runs out or this one is cancelled; a cancel from the agent
        is recorded as the statement's end, and passed on."""
        hold = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({hold}, timeout=limit)
        except asyncio.CancelledError as exc:
            hold.cancel(exc.args[0] if exc.args and isinstance(exc.args[0], str) else None)
            if self._user_cancel and not self.closed:
                cancelled = Decision.deny(
                    f"{_CANCELLED_BY_AGENT}; the request was withdrawn", "lictor:cancelled", self.session.policy.version
                )
                self._record_denial(sql, cancelled)
            raise
        if hold in done:
            return hold.result()
        hold.cancel(f"statement_timeout = {limit:g}s ran out while the statement was held")
        await asyncio.wait({hold})  # its withdrawal audited; a cancel of this task still ends the wait
        if hold.cancelled():
            return None
        return hold.result()  # resolved as the time ran out

    def _held_past_statement_timeout(self, sql: str, decision: Decision, timeout: float) -> bytes:
        """The wait for an approval lasted the session's statement_timeout: the request is withdrawn (the
        caller cancelled it), the statement recorded as the denial it is to the agent, and the agent gets
        57014, as from the server."""
        ended = Decision.deny(
            f"the approval did not come within statement_timeout = {timeout:g}s; the request was withdrawn",
            decision.rule_ids[0],
            decision.policy_version,
        )
        self._record_denial(sql, ended)
        return pg.error_response(
            "ERROR",
            "57014",
            "lictor: canceling statement due to statement timeout (it was held by the gateway for an "
            f"approval, which did not come within statement_timeout = {timeout:g}s)",
            hint="Raise statement_timeout (SET statement_timeout = 0 waits until an approver decides) "
            "and run it again to ask again.",
        )

    async def _query_after_approval(
        self, raw: bytes, sql: str, classified: Classified, decision: Decision, decisions: list[Decision]
    ) -> bytes | None:
        # A statement held here has not reached the server, whose statement_timeout would end it: the wait for
        # an approval ends at the same time (node-postgres's `statement_timeout` is how its agents give up).
        # Where the query itself changes it (`SET statement_timeout = 0; VACUUM`), the value before it is not
        # the one the held statement would run with: the wait is not bounded (as before; cancel ends it).
        await self._wait_clean()
        if self.closed:
            return None
        if self._refused_in_failed_transaction(classified, sql) is not None:
            return self._deny_simple(_FAILED_TRANSACTION)
        timeout = None if _sets_statement_timeout(classified) else await self._statement_timeout()
        if self.closed:
            return None
        final = await self._approve_within(sql, timeout, self._approve(classified, decision, decisions, sql))
        if self.closed:
            return None
        if final is None:
            assert timeout is not None
            # Recorded as the denial it is to the agent: replaying the session shows the statement never ran.
            return self._deny_simple(self._held_past_statement_timeout(sql, decision, timeout))
        if final.action == "allow":
            result = self._allow_query(raw, sql, classified, final)
            return raw if result is None else result
        self._record_denial(sql, final)
        return self._deny_simple(self._denial_error(classified, [final], final))

    def _allow_query(
        self,
        raw: bytes,
        sql: str,
        classified: Classified,
        decision: Decision,
        decisions: Sequence[Decision] | None = None,
    ) -> bytes | None:
        plan = self._mask_plan(decision)
        if plan.is_empty:
            plan = None
        else:
            denial = self._copy_refusal(classified, decision, plan)
            if denial is not None:
                self._audit_refusal(classified.requests, denial, "masking")
                self._record_denial(sql, denial)
                return self._deny_simple(self._denial_error(classified, [denial], denial))
        self._apply_names(classified, decision, decisions)
        self._note_path_changes(classified)
        if classified.statements == 1:
            texts = [sql]
        else:
            texts = [r.payload for r in classified.requests]
        self.stats.statements += len(texts)
        run = _QueryRun(texts, decision, plan, _touched(classified))
        if classified.copy_from:
            self._copy_run = run
        self._push_z(_K_QUERY, None, run)
        return None

    @staticmethod
    def _copy_refusal(classified: Classified, decision: Decision, plan: Any) -> Decision | None:
        """A COPY ... TO whose output masking could not cover, under a non-empty mask plan."""
        if not classified.copy_to:
            return None
        if plan.has_columns:
            message = (
                "COPY ... TO is not available when column masking applies to your results; use SELECT, "
                "whose columns the gateway can mask"
            )
        elif classified.copy_rewrites:
            message = (
                "COPY ... TO with a QUOTE, ESCAPE, DELIMITER or ENCODING option is not available when masking "
                "applies to your results: these options rewrite characters inside values, where masking looks "
                "for sensitive data; use the default options (FORMAT csv, HEADER, NULL and a comma, semicolon, "
                "bar or tab delimiter are fine) or SELECT"
            )
        else:
            return None
        rule_id = decision.mask_rule_ids[0] if decision.mask_rule_ids else "lictor:copy-masking"
        return Decision.deny(message, rule_id, decision.policy_version)

    def _apply_names(
        self, classified: Classified, decision: Decision, decisions: Sequence[Decision] | None = None
    ) -> None:
        """Track prepared statements and cursors the statement creates or removes (optimistically)."""
        if classified.discard_all:
            self._prepared.clear()
            self._cursors.clear()
            self._portals.clear()
        elif not classified.kinds.isdisjoint(_OPAQUE_CURSOR_KINDS):
            # A FETCH of a name it may have reused would be decided and masked as what was declared before:
            # forgotten, a FETCH or Execute of them is denied until they are declared or bound again.
            self._cursors.clear()
            self._portals.clear()
        for name in classified.deallocates:
            if name is None:
                self._prepared.clear()
            else:
                self._prepared.pop(name, None)
        for name, request in classified.prepares:
            inner = Classified(requests=(request,), kinds=frozenset(request.attrs.get("kinds") or ()))
            d = decision
            if decisions is not None and len(classified.requests) > 1:
                index = classified.requests.index(request)
                if index < len(decisions) and decisions[index].action == "allow":
                    d = decisions[index]
            # An approved PREPARE ran nothing: its executions are decided (and held) afresh, each one.
            decided_at = time.monotonic() if d.approval_id is None else float("-inf")
            self._remember(Prepared(name, request.payload, inner, d, decided_at, self._mask_plan(d)))
        # Cursors and the extended protocol's portals share one namespace on the server: CLOSE closes either,
        # and a DECLARE replaces what the gateway knew of a portal of that name (it is gone, or DECLARE fails).
        for name in classified.closes:
            if name is None:
                self._cursors.clear()
                self._portals.clear()
            else:
                self._cursors.pop(name, None)
                self._portals.pop(name, None)
        for name in classified.cursors:
            if len(self._cursors) >= MAX_PREPARED:
                self._cursors.clear()
            # a new object for each DECLARE (the policy may hand out one Decision for equal requests): a FETCH
            # prepared on an earlier cursor of this name sees that it names another one now
            self._cursors[name] = replace(decision)
            self._portals.pop(name, None)

    def _remember(self, stmt: Prepared) -> None:
        if len(self._prepared) >= MAX_PREPARED and stmt.name not in self._prepared:
            # Forgetting fails closed: a Bind to a forgotten name is denied.
            self._prepared.pop(next(iter(self._prepared)))
        self._prepared[stmt.name] = stmt

    # -- extended protocol -----------------------------------------------------------------------------

    def _on_parse(self, raw: bytes) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        self._open_segment = True
        name, pos = _cstring_at(raw, 5)
        sql, pos = _cstring_at(raw, pos)
        # The server reads this text with the settings the gateway knows once everything up to the last Sync
        # is answered (its ReadyForQuery reported them) and this batch has bound and run only statements that
        # change no setting (pgjdbc's BEGIN before a transaction's first statement). Its Parse, Describe and
        # Close messages change none either, and the server answers them only at a Sync or Flush: not awaited.
        if _lexer_sensitive(sql) and (self._pending_z or self._segment_may_set):
            if self._segment_may_set:
                decision = Decision.deny(
                    "a statement with a backslash or a non-ASCII character cannot follow unsynchronized "
                    "Bind or Execute messages in a pipeline (the gateway must see the server's settings first); "
                    "send Sync before it",
                    "lictor:pipeline-sensitive-text",
                    self.session.policy.version,
                )
                self._record_denial(sql, decision)
                return self._deny_extended(self._denial_error(None, [decision], decision, _short(sql)))
            return self._parse_when_settled(raw, name, sql)
        return self._parse(raw, name, sql)

    async def _parse_when_settled(self, raw: bytes, name: str, sql: str) -> bytes | None:
        # Only earlier, already synchronized work is outstanding: it finishes without us.
        await self._wait_for(lambda: not self._pending_z)
        result = self._parse(raw, name, sql)
        if isinstance(result, Coroutine):
            return await result
        return raw if result is None else result

    def _parse(self, raw: bytes, name: str, sql: str) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        classified = self._classify(sql)
        decision, decisions = self._decide(classified)
        if decision.action == "allow":
            self._allow_parse(name, sql, classified, decision)
            return None
        if decision.action == "approve":
            # Preparing runs nothing: the statement is held at each Bind, where its parameter values are
            # known, so that an approval covers one execution with the values the approvers saw.
            stmt = Prepared(name, sql, classified, decision, time.monotonic(), self._mask_plan(decision))
            stmt.param_types = _param_types(raw)
            stmt.named = self._names_of(classified)
            self._parsed(stmt)
            return None
        self._prepared.pop(name, None)
        self._record_denial(sql, decision)
        return self._deny_extended(self._denial_error(classified, decisions, decision))

    def _allow_parse(self, name: str, sql: str, classified: Classified, decision: Decision) -> None:
        # A PREPARE, DECLARE or DEALLOCATE sent as a Parse changes names when an Execute of it runs (see
        # _on_execute): parsed and never executed, it must not rename what the server holds.
        plan = self._mask_plan(decision)
        stmt = Prepared(name, sql, classified, decision, time.monotonic(), plan)
        stmt.named = self._names_of(classified)
        self._parsed(stmt)

    def _parsed(self, stmt: Prepared) -> None:
        """A Parse is forwarded: its statement is known under its name, unless the server skips it (after an
        error, up to Sync), which leaves what the server holds under that name as it was."""
        if self._be_skip:
            return
        self._remember(stmt)
        self._push(_K_PARSE, stmt)

    def _parse_failed(self, stmt: Prepared) -> None:
        """A Parse failed or was skipped: the server does not hold its statement (a skipped Parse leaves an
        earlier one of that name, whose text the gateway no longer has): forgotten, so a Bind of it is denied."""
        if self._prepared.get(stmt.name) is stmt:
            del self._prepared[stmt.name]

    def _on_bind(self, raw: bytes) -> bytes | None:
        self._open_segment = True
        self._segment_bound = True
        portal_name, stmt_name, param_formats, params, formats = _parse_bind(raw)
        stmt = self._prepared.get(stmt_name)
        if stmt is None or not _settings_inert(stmt):
            self._segment_may_set = True
        if stmt is None:
            decision = Decision.deny(
                f"prepared statement {stmt_name!r} is unknown to the gateway (it was not prepared through it, "
                "or its preparation was denied); prepare it again",
                "lictor:unknown-prepared-statement",
                self.session.policy.version,
            )
            self._record_denial(f"BIND {stmt_name}", decision)
            return self._deny_extended(self._denial_error(None, [decision], decision, f"Bind of {stmt_name!r}"))
        decision = self._stmt_decision(stmt)
        if decision.action == "approve":
            return self._bind_after_approval(raw, portal_name, stmt, param_formats, params, formats)
        if decision.action != "allow":
            self._record_denial(stmt.text, decision)
            return self._deny_extended(self._denial_error(stmt.classified, [decision], decision))
        return self._bind(portal_name, stmt, decision, stmt.plan, param_formats, params, formats)

    async def _bind_after_approval(
        self,
        raw: bytes,
        portal_name: str,
        stmt: Prepared,
        param_formats: tuple[int, ...],
        params: list[bytes | None],
        formats: tuple[int, ...],
    ) -> bytes | None:
        """Hold one Bind of a statement that needs approval: what the approvers see, and what the approval
        is bound to, is the statement with these parameter values; the approval covers this portal only."""
        values = _param_text(stmt.param_types, param_formats, params)
        if values and _FAKE_PARAMS.search(stmt.text):
            # Approvers read the values on a "-- parameters:" line after the statement: a comment of the
            # statement's own that mentions parameters could show them other values than the ones bound.
            decision = Decision.deny(
                "a statement held for approval with parameters may not have a comment about parameters (approvers "
                "would read it as the values bound); remove the comment",
                "lictor:approval-display",
                self.session.policy.version,
            )
            for request in stmt.classified.requests[:1]:
                try:
                    self.session.audit(request, decision)
                except (AuditError, OSError):
                    log.error("could not audit a refused approval request")
            self._record_denial(stmt.text, decision)
            return self._deny_extended(self._denial_error(None, [decision], decision, _short(stmt.text)))
        # An earlier message of this segment may have failed (the server then skips this Bind), or the
        # transaction may have failed before it: what the server has answered so far says.
        executed_before = self._segment_execs > 0
        await self._wait_answered()
        if self.closed:
            return None
        if self._be_skip:
            skipped = Decision.deny(
                "not run: an earlier message of its pipeline failed, so the server skipped it",
                "lictor:failed-transaction",
                self.session.policy.version,
            )
            self._record_denial(stmt.text, skipped)
            return self._deny_extended(_FAILED_TRANSACTION)  # skipped by the server too: the agent sees nothing
        if not executed_before and self._refused_in_failed_transaction(stmt.classified, stmt.text) is not None:
            return self._deny_extended(_FAILED_TRANSACTION)
        bound = replace(
            stmt.classified,
            requests=tuple(replace(r, payload=f"{r.payload}\n{values}") for r in stmt.classified.requests)
            if values
            else stmt.classified.requests,
        )
        timeout = None
        if not _sets_statement_timeout(stmt.classified) and not self._drop_segment:
            # The statement would run with the session's statement_timeout: the wait for an approval ends then.
            timeout = await self._statement_timeout_in_segment()
            if self.closed:
                return None
            if self._be_skip:  # the gateway's SHOW failed (the agent got the server's error): skipped too
                return self._deny_extended(_FAILED_TRANSACTION)
        decision, decisions = self._decide(bound)
        if decision.action == "approve":
            final = await self._approve_within(stmt.text, timeout, self._approve(bound, decision, decisions))
            if self.closed:
                return None
            if final is None:
                assert timeout is not None
                return self._deny_extended(self._held_past_statement_timeout(stmt.text, decision, timeout))
            decision = final
        if decision.action != "allow":
            self._record_denial(stmt.text, decision)
            return self._deny_extended(self._denial_error(bound, [decision], decision))
        result = self._bind(
            portal_name, stmt, decision, self._mask_plan(decision), param_formats, params, formats, approved=True
        )
        return raw if result is None else result

    def _bind(
        self,
        portal_name: str,
        stmt: Prepared,
        decision: Decision,
        plan: Any,
        param_formats: tuple[int, ...],
        params: list[bytes | None],
        formats: tuple[int, ...],
        *,
        approved: bool = False,
    ) -> bytes | None:
        if plan is not None and not plan.is_empty:
            denial = self._copy_refusal(stmt.classified, decision, plan)
            if denial is not None:
                self._audit_refusal(stmt.classified.requests, denial, "masking")
                self._record_denial(stmt.text, denial)
                return self._deny_extended(self._denial_error(stmt.classified, [denial], denial))
        if plan is not None and not plan.is_empty and 1 in formats:
            refusal = self._binary_refusal(stmt, formats)
            if refusal is not None:
                denial = Decision.deny(
                    refusal,
                    decision.mask_rule_ids[0] if decision.mask_rule_ids else "lictor:mask",
                    decision.policy_version,
                )
                self._audit_refusal(stmt.classified.requests, denial, "masking")
                self._record_denial(stmt.text, denial)
                return self._deny_extended(self._denial_error(stmt.classified, [denial], denial))
        if len(self._portals) >= MAX_PREPARED and portal_name not in self._portals:
            self._portals.pop(next(iter(self._portals)))  # forgetting fails closed: Execute is denied
        portal = Portal(portal_name, stmt, (param_formats, params), formats)
        portal.named = self._names_of(stmt.classified)
        if approved:
            portal.decision, portal.plan = decision, plan
        # Portals and SQL cursors share one namespace on the server.
        self._cursors.pop(portal_name, None)
        if not self._be_skip:  # the server skips it: the portal of that name, if any, stays what it was
            self._portals[portal_name] = portal
        self._push(_K_BIND, portal)
        return None

    def _binary_refusal(self, stmt: Prepared, formats: tuple[int, ...]) -> str | None:
        base = (
            "binary result format is refused for results the gateway masks (it can only mask the text form); "
            "ask for text results (psycopg: binary=False), or cast the column to text in the query (drivers such "
            "as asyncpg and JDBC choose binary for some types themselves; asyncpg reads an enum or composite type "
            "as text after conn.set_type_codec(type_name, encoder=str, decoder=str, format='text'))"
        )
        if stmt.fields is None:
            return None  # decided when the portal's columns are known, before its first row
        per_column = result_formats(formats, len(stmt.fields))
        if per_column is None:
            return base
        try:
            RowMasker(stmt.plan.columns([f.name for f in stmt.fields]), stmt.fields, per_column)
        except _BinaryRefused as exc:
            return f"{base}; column {exc.column!r} (type oid {exc.type_oid}) would be masked"
        return None

    def _on_execute(self, raw: bytes) -> bytes | None:
        self._open_segment = True
        portal_name, _ = _cstring_at(raw, 5)
        portal = self._portals.get(portal_name)
        if portal is None or not _settings_inert(portal.stmt):
            self._segment_may_set = True
        if portal is None:
            if portal_name in self._cursors:
                # A SQL cursor executed as a portal: decided and masked like its DECLARE.
                decision = self._cursors[portal_name]
                plan = self._mask_plan(decision)
                run = Execution(f"EXECUTE PORTAL {portal_name}", decision, None if plan.is_empty else plan)
                if run.plan is not None:
                    prefix = pg.describe("P", portal_name)
                    self._push(_K_DESC_P, None, run)
                    self._segment_execs += 1
                    self.stats.statements += 1
                    self._push(_K_EXEC, None, run)
                    return prefix + raw
                self._segment_execs += 1
                self.stats.statements += 1
                self._push(_K_EXEC, None, run)
                return None
            decision = Decision.deny(
                f"portal {portal_name!r} is unknown to the gateway; bind it again",
                "lictor:unknown-portal",
                self.session.policy.version,
            )
            self._record_denial(f"EXECUTE {portal_name}", decision)
            return self._deny_extended(self._denial_error(None, [decision], decision, f"Execute of {portal_name!r}"))
        stmt = portal.stmt
        if self._renamed(stmt, portal.named):
            # A pipeline declared or prepared again, after this Bind, what its FETCH or EXECUTE names: the server
            # runs it on that, the decision and the columns were those of the earlier one.
            refusal = Decision.deny(
                "the cursor or prepared statement it names was declared or prepared again after it was bound; "
                "bind it again",
                "lictor:renamed-after-bind",
                self.session.policy.version,
            )
            self._portals.pop(portal_name, None)
            self._audit_refusal(stmt.classified.requests, refusal, "protocol")
            self._record_denial(stmt.text, refusal)
            return self._deny_extended(self._denial_error(stmt.classified, [refusal], refusal))
        decision, plan = (stmt.decision, stmt.plan) if portal.decision is None else (portal.decision, portal.plan)
        run = Execution(stmt.text, decision, None if plan is None or plan.is_empty else plan, stmt.name)
        c = stmt.classified
        if _changes_names(c):
            # A PREPARE, DECLARE, DEALLOCATE or CLOSE sent as a Parse changes names when it is executed (not
            # when parsed: parsed and never run, it must not rename what the server holds), before its result,
            # so that the next statement of a pipeline sees them; forgotten if it fails (see _finish).
            self._apply_names(c, decision)
            run.touched = _touched(c)
        self._note_path_changes(c)
        run.params = portal.params
        run.portal = portal
        if c.copy_from and not self._be_skip:
            self._copy_run = run
        self._segment_execs += 1
        self.stats.statements += 1
        if run.plan is not None and portal.fields is None and stmt.fields is not None:
            formats = result_formats(portal.formats, len(stmt.fields))
            if formats is not None:  # the statement's description plus the Bind's formats describe the portal
                portal.fields = tuple(f._replace(format=fmt) for f, fmt in zip(stmt.fields, formats, strict=True))
        if run.plan is not None and portal.fields is None and not portal.describe_pending:
            # The gateway needs the column names to mask: ask the server, and keep the answer to itself.
            portal.describe_pending = True
            self._push(_K_DESC_P, portal, run)
            self._push(_K_EXEC, None, run)
            return pg.describe("P", portal_name) + raw
        self._push(_K_EXEC, None, run)
        return None

    def _on_describe(self, raw: bytes) -> bytes | None:
        self._open_segment = True
        kind = raw[5:6]
        name, _ = _cstring_at(raw, 6)
        if kind == b"S":
            self._push(_K_DESC_S, self._prepared.get(name))
        elif kind == b"P":
            portal = self._portals.get(name)
            if portal is not None:
                portal.describe_pending = True
            self._push(_K_DESC_P, portal)
        else:
            raise pg.ProtocolError("malformed Describe message")
        return None

    def _on_close(self, raw: bytes) -> bytes | None:
        self._open_segment = True
        kind = raw[5:6]
        name, _ = _cstring_at(raw, 6)
        if kind == b"S":
            self._prepared.pop(name, None)
        elif kind == b"P":
            self._portals.pop(name, None)
            self._cursors.pop(name, None)
        else:
            raise pg.ProtocolError("malformed Close message")
        self._push(_K_CLOSE)
        return None

    def _on_sync(self, raw: bytes) -> bytes | None:
        if self._copy_run is not None:
            if self._copy_started:
                # The server reads COPY data, and ignores a Sync; or it stopped on an error, and its Sync must
                # come after the agent's CopyDone. Never forwarded, so the server and the gateway agree.
                return b""
            return self._sync_behind_copy(raw)
        if self._segment_masked and not self.read_only:
            return self._sync_after_masked_results(raw)
        self._push_sync()
        # Unnamed portals end with the transaction; named ones live on in a transaction block.
        self._portals.pop("", None)
        return None

    async def _sync_after_masked_results(self, raw: bytes) -> bytes | None:
        """A Sync ending a segment with a result to mask, in a session that may write: held until the server has
        answered the segment. A result the gateway refuses (masking cannot cover it) is an error to the agent,
        which then takes nothing of the segment to have run, as after an error of the server. The server saw no
        error, and would commit the segment's implicit transaction at this Sync (an INSERT after the refused
        SELECT): a failing message goes before it, and the server rolls back as after an error of its own."""
        await self._wait_answered()
        if self.closed:
            return None
        prefix = b""
        if self._drop_segment and not self._be_skip:
            self.stats.denied += 1
            self._push(_K_DENY_P, _FAILED_TRANSACTION)
            prefix = self._deny_parse
        self._push_sync()
        self._portals.pop("", None)
        return prefix + raw

    async def _sync_behind_copy(self, raw: bytes) -> bytes | None:
        """A Sync right behind a COPY ... FROM STDIN (libpq sends one after an Execute before it knows the
        statement is a COPY): held, with what follows, until the server has answered the statement. If it
        reads COPY data it would ignore the Sync, which is dropped; otherwise it is forwarded and answered."""
        while self._copy_run is not None and not self._copy_started:
            waiter = asyncio.get_running_loop().create_future()
            self._copy_waiters.append(waiter)
            self._flush_up()
            await waiter
        if self._copy_run is not None:
            return b""
        self._push_sync()
        self._portals.pop("", None)
        return raw

    def _wake_copy_waiters(self) -> None:
        waiters, self._copy_waiters = self._copy_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_copy_end(self, raw: bytes) -> bytes | None:
        # CopyDone / CopyFail: the server reads the next Sync again (outside COPY, it ignores these).
        self._copy_run = None
        self._copy_started = False
        return None

    def _copy_in_started(self, run: Any) -> None:
        """The server answered ``run`` with CopyInResponse: the Syncs the agent sent after it, which the
        server ignores while it reads COPY data, are owed nothing."""
        if self._copy_run is run:
            self._copy_started = True
            self._wake_copy_waiters()

    def _copy_run_done(self, run: Any) -> None:
        """``run`` finished: a COPY it did not start will not read the agent's data."""
        if self._copy_run is run:
            self._copy_run = None
            self._copy_started = False
            self._wake_copy_waiters()

    def _on_function_call(self, raw: bytes) -> bytes | None:
        if self._open_segment:
            raise pg.ProtocolError("a function call inside an extended-query batch; send Sync before it")
        message = pg.decode_frontend(raw)
        assert isinstance(message, pg.FunctionCall)
        name = LARGE_OBJECT_FUNCTIONS.get(message.oid)
        if name is not None:
            return self._large_object_call(message.oid, name)
        request = Request(
            protocol="postgres",
            action="function_call",
            attrs={
                "kind": "function_call",
                "kinds": frozenset({"function_call"}),
                "database": self.database,  # no `tables`: a function called by oid may read any
                "function_oid": message.oid,
            },
            target=self.target.name,
            summary=f"FUNCTION CALL: function oid {message.oid} (protocol-level call)",
            payload=f"function_call:{message.oid}",
        )
        decision = self.session.decide_now(request)
        if decision.action != "allow":
            if decision.action == "approve":
                decision = Decision.deny(
                    f"{decision.message} — protocol-level function calls cannot wait for approval; use SELECT",
                    decision.rule_ids[0],
                    decision.policy_version,
                )
                self._audit_refusal((request,), decision, "protocol")
            self._record_denial(request.summary, decision)
            return self._deny_simple(self._denial_error(None, [decision], decision, request.summary))
        self.stats.statements += 1
        run = Execution(request.summary, decision, None)
        self._push_z(_K_FCALL, None, run)
        return None

    def _large_object_call(self, oid: int, name: str) -> bytes | None:
        """A fast-path call of a built-in large-object function: decided as ``SELECT pg_catalog.<name>()``
        (so ``functions:`` and ``modifies`` rules see it); refused where masking applies, since large
        object contents are bytes the gateway cannot mask."""
        (request,) = requests_for_sql(f"SELECT pg_catalog.{name}()", target=self.target.name, database=self.database)
        summary = f"FUNCTION CALL: pg_catalog.{name} (oid {oid}, protocol-level call)"
        request = Request(
            request.protocol,
            request.action,
            {**request.attrs, "function_oid": oid},
            request.target,
            summary,
            f"function_call:{oid}:pg_catalog.{name}",
        )
        decision = self.session.decide_now(request)
        if decision.action == "allow" and not self._mask_plan(decision).is_empty:
            decision = Decision.deny(
                "large object contents cannot be masked, and masking applies to your results, so large objects "
                "are not read through the gateway for you; read table columns instead (pg_dump: add -B, which "
                "leaves large objects out)",
                decision.mask_rule_ids[0] if decision.mask_rule_ids else "lictor:mask",
                decision.policy_version,
            )
            self._audit_refusal((request,), decision, "masking")
        elif decision.action == "approve":
            decision = Decision.deny(
                f"{decision.message} — protocol-level function calls cannot wait for approval; use SELECT",
                decision.rule_ids[0],
                decision.policy_version,
            )
            self._audit_refusal((request,), decision, "protocol")
        if decision.action != "allow":
            self._record_denial(summary, decision)
            return self._deny_simple(self._denial_error(None, [decision], decision, summary))
        self.stats.statements += 1
        self._push_z(_K_FCALL, None, Execution(summary, decision, None))
        return None

    def _on_password(self, raw: bytes) -> bytes | None:
        # The gateway logged in to the target itself: an authentication reply now answers nothing.
        raise pg.ProtocolError("unexpected password message after authentication")

    def _on_terminate(self, raw: bytes) -> bytes | None:
        self.agent.on_data = None
        # The target closes because the agent asked it to, whichever close arrives first.
        self.upstream.on_close = lambda exc: self.shutdown("agent closed the connection")
        return None

    # -- backend ---------------------------------------------------------------------------------------

    def _on_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        with self._deferred_syncs:
            self._upstream_data(data)

    def _upstream_data(self, data: bytes) -> None:
        try:
            block = self._be.feed_block(data)
            if not block:
                return
            if self._be_backlog:  # reading is paused, but what was read before keeps its place
                self._be_backlog.append((block, 0))
            elif len(block) <= RELAY_SLICE:
                self._relay_backend(block.data, block.offsets, block.types)
            else:
                self._be_backlog.append((block, 0))
                self._relay_backlog()
        except Exception as exc:
            self._backend_failed(exc)

    def _relay_backend(self, data: bytes, offsets: list[int], types: bytes) -> None:
        out = self._run_backend(data, offsets, types)
        if out and not self.closed:
            self.agent.write_soon(out)
        if self._answer_waiters:
            self._wake(self._answer_waiters)

    def _relay_backlog(self) -> None:
        """Relay the backlog a slice at a time until this turn of the loop has taken RELAY_TURN_SECONDS; then
        pause reading from the target and come back on the next turn, after the other connections' callbacks."""
        backlog = self._be_backlog
        deadline = time.perf_counter() + RELAY_TURN_SECONDS
        while backlog and not self.closed:
            block, start = backlog[0]
            offsets = block.offsets
            n = len(offsets)
            stop = min(start + RELAY_SLICE, n)
            base = offsets[start]
            end = offsets[stop] if stop < n else len(block.data)
            if stop < n:
                backlog[0] = (block, stop)
            else:
                backlog.popleft()
            self._relay_backend(block.data[base:end], [o - base for o in offsets[start:stop]], block.types[start:stop])
            if backlog and time.perf_counter() > deadline:
                break
        if backlog and not self.closed:
            self.upstream.pause_reading("relay")
            asyncio.get_running_loop().call_soon(self._relay_later)
        else:
            backlog.clear()
            self.upstream.resume_reading("relay")

    def _relay_later(self) -> None:
        with self._deferred_syncs:
            try:
                self._relay_backlog()
            except Exception as exc:
                self._backend_failed(exc)

    def _backend_failed(self, exc: Exception) -> None:
        """Relaying the target's answer failed: the connection ends (every path below shuts it down), so what is
        left of the answer is dropped."""
        self._be_backlog.clear()
        if isinstance(exc, pg.ProtocolError):
            self.shutdown(
                f"target protocol error: {exc}",
                self._fatal("08P01", "lictor: the target sent data the gateway could not read; connection closed"),
            )
        elif isinstance(exc, _Fatal):
            self.shutdown(str(exc), self._fatal(exc.sqlstate, f"lictor: {exc}"))
        elif isinstance(exc, AuditError):
            self._unrecordable(exc)
        else:
            self._internal_error("relaying the target's answer", exc)

    def _run_backend(self, data: bytes, offsets: list[int], types: bytes) -> bytes:
        n = len(offsets)
        size = len(data)
        out: list[bytes] | None = None
        keep = 0  # start of the run of messages forwarded unchanged
        i = 0
        while i < n:
            t = types[i]
            if t == _B_DATAROW and not self._reading_setting:
                rows = self._rows
                if rows is None and self._exec_pending_masker:
                    rows = self._exec_masker()
                if rows is None and not self._drop_segment:
                    if not self._expect:
                        raise _Fatal(_LOST_TRACK, "08P01")
                    m = _NOT_DATAROW.search(types, i)
                    j = m.start() if m is not None else n
                    self._count_rows(j - i)
                    i = j
                    continue
                start = offsets[i]
                end = offsets[i + 1] if i + 1 < n else size
                if self._drop_segment:
                    new = b""
                else:
                    assert rows is not None
                    raw = data[start:end]
                    new = rows.mask(raw)
                    self._count_rows(1)
                    if new is raw:
                        i += 1
                        continue
                if out is None:
                    out = []
                if keep < start:
                    out.append(data[keep:start])
                if new:
                    out.append(new)
                keep = end
                i += 1
                continue
            start = offsets[i]
            end = offsets[i + 1] if i + 1 < n else size
            raw = data[start:end]
            replacement = self._backend_message(t, raw)
            if replacement is None and self._text_plan is not None and t in _TEXT_MESSAGES:
                replacement = self._mask_server_text(t, raw)
            if replacement is not None:
                if out is None:
                    out = []
                if keep < start:
                    out.append(data[keep:start])
                if replacement:
                    out.append(replacement)
                keep = end
            i += 1
        if out is None:
            return data
        if keep < size:
            out.append(data[keep:])
        return b"".join(out)

    def _count_rows(self, count: int) -> None:
        head = self._expect[0] if self._expect else None
        if head is None:
            return
        if head.kind == _K_EXEC or head.kind == _K_QUERY:
            run = head.run
            if isinstance(run, Execution):
                run.rows += count
        self.stats.rows += count

    def _mask_plan(self, decision: Decision) -> Any:
        plan = self.session.mask_plan(decision)
        if plan is not None and plan.has_detectors:
            if self._text_plan is None:
                self._masked_since = ", ".join(decision.mask_rule_ids)
            self._text_plan = plan
        return plan

    def _withheld_why(self) -> str:
        """What a withheld error message says of why (see _masked_texts): since which rule, and for a session that
        is masked only since it read such data, that a new connection gets the messages."""
        since = f" (this one since rule {self._masked_since})" if self._masked_since else ""
        again = "" if self.read_only else "; a new connection gets full messages until it reads masked data"
        return f"from sessions whose results are masked{since}, as it may show what was masked{again}"

    def _mask_server_text(self, t: int, raw: bytes) -> bytes | None:
        """``raw`` (an ErrorResponse, NoticeResponse, NotificationResponse or ParameterStatus) with detector
        matches masked in its texts, or None when nothing needed masking. ``invalid input syntax for type
        integer: "ann@example.com"``, a RAISE NOTICE or a pg_notify() payload carry row data too."""
        try:
            return _masked_texts(self._text_plan, raw, self._withheld_why())
        except (pg.ProtocolError, ValueError):
            # Not well formed: nothing of it reaches the agent unmasked.
            if t == _B_ERROR:
                return pg.error_response("ERROR", "XX000", "lictor: the server's error message was withheld")
            return b""

    def _backend_message(self, t: int, raw: bytes) -> bytes | None:
        """Handle one non-DataRow message; return its replacement (b"" drops it) or None to keep it."""
        if t == _B_NOTIFY:
            # Another session's (or this one's) NOTIFY, delivered between statements: never part of a result,
            # so relayed (masked) even inside a segment whose result was refused.
            if raw[5:9] != self._own_pid:
                return None
            own = raw[:5] + self._agent_pid + raw[9:]
            if self._text_plan is None:
                return own
            masked = self._mask_server_text(t, own)
            return own if masked is None else masked
        if t == _B_NOTICE:
            # The answer to the gateway's own SHOW (client_min_messages = debug5 reports its transaction) is not
            # the agent's: only the statements it sent are.
            return b"" if self._drop_segment or self._reading_setting else None
        if t == _B_PARAM:
            self._check_parameter(raw)
            return None
        expect = self._expect
        if not expect:
            if t == _B_ERROR:
                return None  # an asynchronous error (FATAL: shutdown, idle timeout)
            raise _Fatal(_LOST_TRACK, "08P01")
        head = expect[0]
        kind = head.kind
        if self._drop_segment and t != _B_READY:
            self._advance_dropped(t, head)
            return b""
        if kind == _K_QUERY:
            return self._query_message(t, raw, head)
        if kind == _K_EXEC:
            return self._exec_message(t, raw, head)
        if kind == _K_SYNC:
            if t == _B_READY:
                expect.popleft()
                self._ready(raw)
                return self._poisoned_ready(raw)
            if t != _B_ERROR:
                raise _Fatal(_LOST_TRACK, "08P01")
            return None
        if kind == _K_PARSE:
            if t == _B_PARSEOK:
                expect.popleft()
                return None
            if t == _B_ERROR:
                self._extended_error(None)
            return None
        if kind == _K_BIND:
            if t == _B_BINDOK:
                expect.popleft()
            elif t == _B_ERROR:
                self._extended_error(None)
            return None
        if kind == _K_DESC_S:
            if t == _B_PARAMDESC:
                return None
            if t == _B_ROWDESC or t == _B_NODATA:
                expect.popleft()
                stmt = head.data
                if isinstance(stmt, Prepared):
                    stmt.fields = self._fields(raw) if t == _B_ROWDESC else ()
                return None
            if t == _B_ERROR:
                self._extended_error(None)
            return None
        if kind == _K_DESC_P:
            if t == _B_ROWDESC or t == _B_NODATA:
                expect.popleft()
                portal = head.data
                plan = None if portal is None else portal.stmt.plan if portal.decision is None else portal.plan
                if head.run is None and (plan is None or plan.is_empty):
                    if portal is not None:  # nothing to mask: the columns are not needed
                        portal.describe_pending = False
                    return None
                fields = self._fields(raw) if t == _B_ROWDESC else ()
                if isinstance(portal, Portal):
                    portal.describe_pending = False
                    portal.fields = fields
                    if portal.stmt.fields is None and all(f.format == 0 for f in fields):
                        portal.stmt.fields = fields
                if head.run is not None:  # the gateway asked for this one: the agent did not
                    run = head.run
                    run.portal = run.portal or Portal("", _dummy_stmt(run), ((), []), (), fields)
                    if run.portal.fields is None:
                        run.portal.fields = fields
                    return b""
                return None
            if t == _B_ERROR:
                self._extended_error(None)
            return None
        if kind == _K_CLOSE:
            if t == _B_CLOSEOK:
                expect.popleft()
            elif t == _B_ERROR:
                self._extended_error(None)
            return None
        if kind == _K_FCALL:
            if t == _B_READY:
                expect.popleft()
                self._finish(head.run, None)
                self._ready(raw)
                return None
            if t == _B_ERROR:
                head.run.error = pg.decode_backend(raw).sqlstate  # type: ignore[union-attr]
            return None
        if kind == _K_DENY_P:
            if t == _B_ERROR:
                expect.popleft()
                self._extended_error(None, popped=True)
                return bytes(head.data)
            return None
        if kind == _K_DENY_Q:
            if t == _B_ERROR:
                return bytes(head.data)
            if t == _B_READY:
                expect.popleft()
                self._ready(raw)
            return None
        if kind == _K_ABORT:
            if t == _B_READY:
                expect.popleft()
                self._ready(raw)
            return b""
        if kind == _K_SETTING_IN_SEGMENT:
            found: asyncio.Future[str | None] = head.data
            if t == _B_DATAROW:
                _answer_setting(found, raw)
            elif t == _B_CLOSEOK or t == _B_ERROR:
                head.run[0] -= 1
                if t == _B_ERROR or not head.run[0]:
                    expect.popleft()
                    self._reading_setting = False
                    if not found.done():
                        found.set_result(None)
                if t == _B_ERROR:
                    # The server skips the rest of the segment (the agent's Bind too): the agent is told why.
                    self._extended_error(None, popped=True)
                    return None
            return b""
        if kind == _K_SETTING:
            answer: asyncio.Future[str | None] = head.data
            if t == _B_DATAROW:
                _answer_setting(answer, raw)
            elif t == _B_READY:
                expect.popleft()
                self._reading_setting = False
                if not answer.done():
                    answer.set_result(None)  # an error instead of a row: as if unset
                self._ready(raw)
            return b""
        return None

    def _advance_dropped(self, t: int, head: _Expect) -> None:
        """While a poisoned segment is swallowed, keep the expectation queue in step."""
        kind = head.kind
        if kind == _K_EXEC and t in (_B_COMPLETE, _B_EMPTY, _B_SUSPENDED, _B_ERROR):
            self._expect.popleft()
            run = head.run
            self._copy_run_done(run)
            run.error = run.error or "refused"
            self._record_exec(run)
            self._rows = None
        elif kind == _K_QUERY and t == _B_ERROR:
            pass
        elif kind in (_K_PARSE,) and t in (_B_PARSEOK, _B_ERROR):
            self._expect.popleft()
            if t == _B_ERROR:
                self._parse_failed(head.data)
        elif kind == _K_BIND and t in (_B_BINDOK, _B_ERROR):
            self._expect.popleft()
            if t == _B_ERROR:
                self._bind_failed(head.data)
        elif kind == _K_CLOSE and t in (_B_CLOSEOK, _B_ERROR):
            self._expect.popleft()
        elif kind == _K_DESC_S and t in (_B_ROWDESC, _B_NODATA, _B_ERROR):
            self._expect.popleft()
        elif kind == _K_DESC_P and t in (_B_ROWDESC, _B_NODATA, _B_ERROR):
            self._expect.popleft()
        elif kind == _K_DENY_P and t == _B_ERROR:
            self._expect.popleft()
        if t == _B_ERROR and kind in (_K_PARSE, _K_BIND, _K_CLOSE, _K_DESC_S, _K_DESC_P, _K_EXEC, _K_DENY_P):
            self._extended_error(None, popped=True)

    def _poisoned_ready(self, raw: bytes) -> bytes | None:
        """At the end of a segment whose result was refused: the error, then a consistent status."""
        if not self._drop_segment:
            return None
        self._drop_segment = False
        error = self._poison_error or b""
        self._poison_error = None
        status = chr(raw[5])
        if status == "T":
            # The agent sees its transaction failed; make the server's fail too before anything else runs.
            self._push_z(_K_ABORT)
            self._up.append(self._deny_query)
            self._flush_up()
            return error + pg.ready_for_query("E")
        return error + raw

    def _poison(self, message: str, run: Execution | None) -> None:
        """Refuse the result being streamed: swallow the rest of the segment and report ``message``."""
        self._drop_segment = True
        self._rows = None
        self._copy_plan = None
        self.stats.denied += 1
        self._poison_error = pg.error_response(
            "ERROR",
            "42501",
            f"lictor: {message}",
            "The rest of this result was withheld by the gateway.",
            "Ask for text format, or a query whose result the gateway can mask.",
        )
        if run is not None:
            run.error = "refused"
        self.session.record(
            "refused", {"sql": redact_secrets(run.sql if run else "")[:RECORD_SQL_LIMIT], "message": message}
        )

    def _query_message(self, t: int, raw: bytes, head: _Expect) -> bytes | None:
        q: _QueryRun = head.run
        if t == _B_ROWDESC:
            self._rows = None
            if q.plan is not None:
                fields = self._fields(raw)
                masker = q.plan.columns([f.name for f in fields])
                if masker.needs_masking:
                    try:
                        self._rows = RowMasker(masker, fields, None)
                    except _BinaryRefused as exc:
                        self._poison(
                            f"binary result for masked column {exc.column!r} (type oid {exc.type_oid}) is refused; "
                            "the gateway can only mask text results",
                            None,
                        )
                        return b""
            return None
        if t == _B_COMPLETE or t == _B_EMPTY:
            self._statement_done(q, raw if t == _B_COMPLETE else None, None)
            return None
        if t == _B_ERROR:
            self._statement_done(q, None, raw)
            return None
        if t == _B_READY:
            self._expect.popleft()
            self._rows = None
            self._copy_plan = None
            self._copy_run_done(q)
            self._ready(raw)
            return self._poisoned_ready(raw)
        if t == _B_COPYIN:
            self._copy_in_started(q)
            return None
        return self._copy_out(t, raw, q.plan, None)

    def _forget(self, touched: _Touched) -> None:
        """A statement that creates or drops prepared statements or cursors failed: the names it touched were
        tracked as if it had worked (PREPARE s over an existing s fails, and EXECUTE s would have been decided
        as the new text while the server ran the old one). Forgotten instead: fails closed, an EXECUTE or
        FETCH of them is denied until they are prepared or declared again."""
        prepared, cursors = touched
        for name in prepared:
            self._prepared.pop(name, None)
        for name in cursors:
            self._cursors.pop(name, None)

    def _statement_done(self, q: _QueryRun, complete: bytes | None, error: bytes | None) -> None:
        if error is not None and q.touched is not None:
            self._forget(q.touched)
        self._rows = None
        self._copy_plan = None
        index = q.index
        q.index += 1
        now = time.perf_counter()
        record = q.record(q.texts[index] if index < len(q.texts) else q.texts[-1], now)
        q.t0 = now
        if complete is not None:
            tag = complete[5:-1].decode("utf-8", "replace")
            record["tag"] = tag
            record["rows"] = _rows_of(tag)
        elif error is not None:
            message = pg.decode_backend(error)
            record["error"] = getattr(message, "sqlstate", "")
        self.session.record("statement", record)

    def _exec_message(self, t: int, raw: bytes, head: _Expect) -> bytes | None:
        run: Execution = head.run
        if t == _B_COMPLETE or t == _B_EMPTY or t == _B_SUSPENDED:
            self._expect.popleft()
            self._rows = None
            self._copy_plan = None
            self._finish(run, raw if t == _B_COMPLETE else None)
            return None
        if t == _B_ERROR:
            run.error = _sqlstate(raw)
            self._extended_error(None)
            return None
        if t == _B_COPYIN:
            self._copy_in_started(run)
            return None
        return self._copy_out(t, raw, run.plan, run)

    def _copy_out(self, t: int, raw: bytes, plan: Any, run: Execution | None) -> bytes | None:
        """COPY ... TO STDOUT of a simple query or a portal: binary output is refused where masking
        applies; text/CSV CopyData is masked message by message. Other message types pass."""
        if t == _B_COPYOUT or t == _B_COPYBOTH:
            if plan is not None:
                if raw[5] != 0 or t == _B_COPYBOTH:
                    self._poison("binary COPY output is refused where masking applies; use text or CSV format", run)
                    return b""
                self._copy_plan = plan
            return None
        if t == _B_COPYDATA:
            copy_plan = self._copy_plan
            if copy_plan is not None:
                if _UNICODE_ESCAPE.search(raw, 5):
                    self._poison(
                        "COPY output with \\u escapes (a json value) cannot be masked; use SELECT, which masks "
                        "json values as JSON",
                        run,
                    )
                    return b""
                data = raw[5:]
                if _hides_a_number(_CopyNumbers(copy_plan), 0, data):
                    self._poison(
                        "COPY output with a number in exponent notation or with group separators that spells a "
                        "masked value (a float8 or money column) cannot be masked; use SELECT, which returns such a "
                        "value as NULL",
                        run,
                    )
                    return b""
                hex_counts: Counter[str] = Counter()
                if b"&" in data:  # an xml value, HTML in a text: jane&#64;example.com

                    def referenced(value: bytes) -> bytes:
                        masked, found = copy_plan.mask_bytes(value)
                        hex_counts.update(found)
                        return bytes(masked)

                    data = _referenced_masked(referenced, data)
                if b"\\x" in data:  # bytea values, in hex: the detectors read the bytes they stand for
                    data = _BYTEA_HEX.sub(lambda m: _mask_hex_run(copy_plan, m, hex_counts), data)
                masked, counts = copy_plan.mask_bytes(data)
                counts.update(hex_counts)
                if counts:
                    self.stats.masked.update(counts)
                    return pg.copy_data(masked)
            return None
        if t == _B_COPYDONE:
            self._copy_plan = None
        return None

    def _exec_masker(self) -> RowMasker | None:
        """The row masker of the Execute at the head of the queue, built when its rows start."""
        expect = self._expect
        if not expect or expect[0].kind != _K_EXEC:
            return None
        run: Execution = expect[0].run
        if run.plan is None or run.masker_done:
            return None
        run.masker_done = True
        portal = run.portal
        fields = portal.fields if portal is not None else None
        if fields is None:
            self._poison("the gateway could not learn the result's columns, so it cannot mask them", run)
            return None
        masker = run.plan.columns([f.name for f in fields])
        if not masker.needs_masking:
            return None
        try:
            self._rows = RowMasker(masker, fields, None)
        except _BinaryRefused as exc:
            self._poison(
                f"binary result for masked column {exc.column!r} (type oid {exc.type_oid}) is refused; "
                "the gateway can only mask text results",
                run,
            )
            return None
        return self._rows

    def _extended_error(self, _unused: Any, popped: bool = False) -> None:
        """The server reported an error in the extended protocol: it skips everything up to Sync."""
        expect = self._expect
        if not popped and expect:
            head = expect.popleft()
            if head.kind == _K_EXEC:
                self._finish(head.run, None)
            elif head.kind == _K_BIND:
                self._bind_failed(head.data)
            elif head.kind == _K_PARSE:
                self._parse_failed(head.data)
        self._rows = None
        self._copy_plan = None
        while expect and expect[0].kind not in _Z_KINDS:
            item = expect.popleft()
            if item.kind == _K_EXEC:
                item.run.error = item.run.error or "skipped"
                self._finish(item.run, None)
            elif item.kind == _K_BIND:
                self._bind_failed(item.data)
            elif item.kind == _K_PARSE:
                self._parse_failed(item.data)
        if not expect:
            self._be_skip = True

    def _bind_failed(self, portal: Portal | None) -> None:
        """A Bind failed or was skipped: the server holds no such portal (or another one of that name, a SQL
        cursor's or an earlier Bind's, whose decision and columns the gateway no longer has): forgotten, so an
        Execute of that name is denied."""
        if portal is not None and self._portals.get(portal.name) is portal:
            del self._portals[portal.name]

    def _finish(self, run: Execution | None, complete: bytes | None) -> None:
        if run is None:
            return
        self._copy_run_done(run)
        if complete is None and run.error and run.touched is not None:
            self._forget(run.touched)
        tag = complete[5:-1].decode("utf-8", "replace") if complete is not None else None
        self._record_exec(run, tag)

    def _record_exec(self, run: Execution, tag: str | None = None) -> None:
        record: dict[str, Any] = {
            "sql": redact_secrets(run.sql)[:RECORD_SQL_LIMIT],
            "decision": run.decision.action,
            "rules": list(run.decision.rule_ids),
            "ms": round((time.perf_counter() - run.t0) * 1000, 3),
        }
        if run.stmt_name:
            record["statement"] = run.stmt_name
        if run.params is not None:
            record["params"] = _params_for_record(run.params, run.plan)
        if tag is not None:
            record["tag"] = tag
            record["rows"] = _rows_of(tag)
        elif run.error:
            record["error"] = run.error
        if run.decision.approval_id:
            record["approval"] = run.decision.approval_id
        self.session.record("statement", record)

    def _ready(self, raw: bytes) -> None:
        self.status = chr(raw[5])
        self._pending_z -= 1
        if self._pending_z <= 0:
            self._pending_z = 0
            # each waiter checks what it waits for (_wait_clean: no answers owed either)
            waiters, self._clean_waiters = self._clean_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    @staticmethod
    def _fields(raw: bytes) -> tuple[pg.FieldDescription, ...]:
        message = pg.decode_backend(raw)
        assert isinstance(message, pg.RowDescription)
        return message.fields

    def _check_parameter(self, raw: bytes) -> None:
        message = pg.decode_backend(raw)
        assert isinstance(message, pg.ParameterStatus)
        name, value = message.name, message.value
        if name == "standard_conforming_strings" and value != "on":
            raise _Fatal(
                "the session turned standard_conforming_strings off, which would let SQL text be read "
                "differently by the server and the gateway; the connection is closed",
                "42501",
            )
        if name == "client_encoding" and value.upper() not in ("UTF8", "UNICODE"):
            raise _Fatal(
                f"the session changed client_encoding to {value}; the gateway reads SQL as UTF-8 only, so the "
                "connection is closed",
                "42501",
            )
        if name == "default_transaction_read_only" and self.read_only and value != "on":
            raise _Fatal(
                "the session left read-only mode (default_transaction_read_only), which your role may not do; "
                "the connection is closed",
                "42501",
            )


class _Fatal(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _answer_setting(answer: "asyncio.Future[str | None]", raw: bytes) -> None:
    """Answer the gateway's own ``SHOW`` with the value in DataRow ``raw`` (None when NULL)."""
    row = pg.decode_backend(raw)
    assert isinstance(row, pg.DataRow)
    value = row.values[0] if row.values else None
    if not answer.done():
        answer.set_result(None if value is None else bytes(value).decode("utf-8", "replace"))


def _param_types(raw: bytes) -> tuple[int, ...]:
    """The parameter type oids a Parse message declares (0: the server infers the type)."""
    try:
        message = pg.decode_frontend(raw)
    except pg.ProtocolError:
        return ()
    return message.param_types if isinstance(message, pg.Parse) else ()


_PARAM_STRUCTS = {16: "!?", 20: "!q", 21: "!h", 23: "!i", 26: "!I", 700: "!f", 701: "!d"}
_PARAM_TEXT_TYPES = frozenset({18, 19, 25, 114, 1042, 1043})


def _param_value(oid: int, fmt: int, value: bytes | None) -> str:
    if value is None:
        return "NULL"
    text: str | None = None
    if fmt == 0 or oid in _PARAM_TEXT_TYPES:
        text = value.decode("utf-8", "replace")
    elif oid in _PARAM_STRUCTS and len(value) == struct.calcsize(_PARAM_STRUCTS[oid]):
        return str(struct.unpack(_PARAM_STRUCTS[oid], value)[0]).lower()
    elif oid == 3802 and value[:1] == b"\1":  # jsonb: version 1, then the text
        text = value[1:].decode("utf-8", "replace")
    elif oid == 2950 and len(value) == 16:
        text = str(uuid.UUID(bytes=value))
    if text is None:
        return f"(binary, type oid {oid}) 0x{value.hex()}"
    return json.dumps(text, ensure_ascii=False)


_FAKE_PARAMS = re.compile(r"(?i)(--|/\*)[^\n]*param")
"""A comment mentioning parameters: in a statement held with bound values it could pass for their line."""


def _param_text(types: tuple[int, ...], param_formats: tuple[int, ...], params: list[bytes | None]) -> str:
    """A Bind's parameter values as a SQL comment line, for approvers (and the approval's digest)."""
    if not params:
        return ""
    shown = []
    for i, value in enumerate(params):
        fmt = param_formats[0] if len(param_formats) == 1 else (param_formats[i] if param_formats else 0)
        oid = types[i] if i < len(types) else 0
        shown.append(f"${i + 1} = {_param_value(oid, fmt, value)}")
    return "-- parameters: " + ", ".join(shown)


def _sets_statement_timeout(classified: Classified) -> bool:
    """Whether one of the statements changes statement_timeout (SET, RESET, set_config, DISCARD ALL)."""
    for request in classified.requests:
        settings = request.attrs.get("settings") or ()
        if "statement_timeout" in settings or "all" in settings:
            return True
    return False


_TIME_UNITS_MS = {"": 1, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_TIME_SETTING = re.compile(r"([0-9]+)\s*(ms|s|min|h|d)?")


def _timeout_seconds(shown: str | None) -> float | None:
    """A time setting as SHOW gives it (``0``, ``2500ms``, ``2s``, ``1min``) in seconds; None for 0 (no
    timeout) or anything else."""
    m = _TIME_SETTING.fullmatch((shown or "").strip())
    if m is None:
        return None
    ms = int(m.group(1)) * _TIME_UNITS_MS[m.group(2) or ""]
    return ms / 1000 if ms > 0 else None


def _short(sql: str) -> str:
    text = " ".join(redact_secrets(sql).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _dummy_stmt(run: Execution) -> Prepared:
    return Prepared("", run.sql, Classified((), frozenset()), run.decision, 0.0, run.plan)


def _sqlstate(raw: bytes) -> str:
    try:
        message = pg.decode_backend(raw)
    except pg.ProtocolError:
        return ""
    return str(getattr(message, "sqlstate", ""))


def _rows_of(tag: str) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")


def _parse_bind(raw: bytes) -> tuple[str, str, tuple[int, ...], list[bytes | None], tuple[int, ...]]:
    """Portal, statement, parameter formats, parameter values and result formats of a Bind message."""
    try:
        end = raw.index(b"\0", 5)
        portal = raw[5:end].decode("utf-8")
        pos = end + 1
        end = raw.index(b"\0", pos)
        statement = raw[pos:end].decode("utf-8")
        pos = end + 1
        (count,) = _U16.unpack_from(raw, pos)
        pos += 2
        param_formats = struct.unpack_from(f"!{count}h", raw, pos) if count else ()
        pos += 2 * count
        (nparams,) = _U16.unpack_from(raw, pos)
        pos += 2
        if len(param_formats) not in (0, 1, nparams):
            raise pg.ProtocolError("malformed Bind message: parameter formats do not match the parameters")
        params: list[bytes | None] = []
        unpack = _I32.unpack_from
        for _ in range(nparams):
            (n,) = unpack(raw, pos)
            pos += 4
            if n < 0:
                if n != -1:
                    raise pg.ProtocolError("malformed Bind message: invalid value length")
                params.append(None)
                continue
            if pos + n > len(raw):
                raise pg.ProtocolError("malformed Bind message: truncated")
            params.append(raw[pos : pos + n])
            pos += n
        (count,) = _U16.unpack_from(raw, pos)
        pos += 2
        if pos + 2 * count != len(raw):
            raise pg.ProtocolError("malformed Bind message")
        formats = struct.unpack_from(f"!{count}h", raw, pos) if count else ()
    except (ValueError, struct.error):
        raise pg.ProtocolError("malformed Bind message") from None
    return portal, statement, param_formats, params, formats


def _params_for_record(bound: tuple[tuple[int, ...], list[bytes | None]], plan: Any) -> list[str | None]:
    param_formats, params = bound
    out: list[str | None] = []
    for i, value in enumerate(params):
        if value is None:
            out.append(None)
            continue
        fmt = param_formats[0] if len(param_formats) == 1 else param_formats[i] if param_formats else 0
        if fmt == 1:
            out.append(f"<binary {len(value)} bytes>")
            continue
        text = value[:RECORD_PARAM_LIMIT].decode("utf-8", "replace")
        if plan is not None:
            text, _ = plan.mask_text(text)
        out.append(text + ("…" if len(value) > RECORD_PARAM_LIMIT else ""))
    return out
