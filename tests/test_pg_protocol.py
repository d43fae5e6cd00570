"""The sans-IO PostgreSQL codec: bytes in, messages out; values in, bytes out."""

import itertools
import random
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lictor_addons.postgres import _protocol as pg
from lictor_addons.postgres._protocol import ProtocolError

from tests.conftest import require

# ----------------------------------------------------------------------------------------------------------
# Every message type, built and then read back


def frontend_cases() -> list[tuple[bytes, pg.Message]]:
    """(bytes, expected message) for every typed frontend message."""
    cases: list[tuple[bytes, pg.Message]] = []

    def add(raw: bytes, make: type[pg.Message], *fields: object) -> None:
        cases.append((raw, make(raw, *fields)))  # type: ignore[call-arg]

    add(pg.query("SELECT 'é' -- ünïcode"), pg.Query, "SELECT 'é' -- ünïcode")
    add(pg.query(""), pg.Query, "")
    add(pg.parse("s1", "SELECT $1::int, $2", [23, 0xFFFFFFFF]), pg.Parse, "s1", "SELECT $1::int, $2", (23, 0xFFFFFFFF))
    add(pg.parse("", "BEGIN"), pg.Parse, "", "BEGIN", ())
    add(
        pg.bind("p", "s1", [b"42", None, b""], [0, 1, 0], [1]),
        pg.Bind,
        "p",
        "s1",
        (0, 1, 0),
        (b"42", None, b""),
        (1,),
    )
    add(pg.bind("", ""), pg.Bind, "", "", (), (), ())
    add(pg.bind("", "s", [b"\x00\xff"], [1]), pg.Bind, "", "s", (1,), (b"\x00\xff",), ())
    add(pg.describe("S", "s1"), pg.Describe, "S", "s1")
    add(pg.describe("P"), pg.Describe, "P", "")
    add(pg.execute("p", 10), pg.Execute, "p", 10)
    add(pg.execute(), pg.Execute, "", 0)
    add(pg.sync(), pg.Sync)
    add(pg.flush(), pg.Flush)
    add(pg.close("S", "s1"), pg.Close, "S", "s1")
    add(pg.close("P"), pg.Close, "P", "")
    add(pg.function_call(1234, [b"1", None], [0], 1), pg.FunctionCall, 1234, (0,), (b"1", None), 1)
    add(pg.copy_data(b"1\tx\n"), pg.CopyData)
    add(pg.copy_data(b""), pg.CopyData)
    add(pg.copy_done(), pg.CopyDone)
    add(pg.copy_fail("client gave up"), pg.CopyFail, "client gave up")
    add(pg.password_message("eyJhbGciOi.jwt.sig"), pg.PasswordMessage)
    add(pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"), pg.PasswordMessage)
    add(pg.sasl_response(b"c=biws,r=abc,p=xyz"), pg.PasswordMessage)
    return cases


def backend_cases() -> list[tuple[bytes, pg.Message]]:
    cases: list[tuple[bytes, pg.Message]] = []

    def add(raw: bytes, make: type[pg.Message], *fields: object) -> None:
        cases.append((raw, make(raw, *fields)))  # type: ignore[call-arg]

    field = pg.FieldDescription("name", 16384, 2, 25, -1, -1, 0)
    add(pg.authentication_ok(), pg.AuthenticationOk)
    add(pg.authentication_cleartext_password(), pg.AuthenticationCleartextPassword)
    add(pg.authentication_md5_password(b"\x01\x02\x03\x04"), pg.AuthenticationMD5Password, b"\x01\x02\x03\x04")
    add(
        pg.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        pg.AuthenticationSASL,
        ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
    )
    add(
        pg.authentication_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        pg.AuthenticationSASLContinue,
        b"r=abc,s=c2FsdA==,i=4096",
    )
    add(pg.authentication_sasl_final(b"v=xyz"), pg.AuthenticationSASLFinal, b"v=xyz")
    add(b"R\0\0\0\x0a\0\0\0\x07ab", pg.AuthenticationRequest, 7, b"ab")
    add(pg.parameter_status("server_version", "15.20"), pg.ParameterStatus, "server_version", "15.20")
    add(pg.backend_key_data(4242, b"\x00\x01\x02\x03"), pg.BackendKeyData, 4242, b"\x00\x01\x02\x03")
    add(pg.backend_key_data(7, bytes(range(32))), pg.BackendKeyData, 7, bytes(range(32)))
    for status in "ITE":
        add(pg.ready_for_query(status), pg.ReadyForQuery, status)
    add(
        pg.row_description([field, ("n", 0, 0, 23, 4, -1, 1)]),
        pg.RowDescription,
        (field, pg.FieldDescription("n", 0, 0, 23, 4, -1, 1)),
    )
    add(pg.row_description([]), pg.RowDescription, ())
    add(pg.data_row([b"1", None, b"", "é".encode()]), pg.DataRow)
    add(pg.data_row([]), pg.DataRow)
    add(pg.command_complete("INSERT 0 1"), pg.CommandComplete, "INSERT 0 1")
    add(
        pg.error_response("ERROR", "42501", "denied", "by rule x", "ask for approval", fields={"P": "8"}),
        pg.ErrorResponse,
        {"S": "ERROR", "V": "ERROR", "C": "42501", "M": "denied", "D": "by rule x", "H": "ask for approval", "P": "8"},
    )
    add(
        pg.notice_response("WARNING", "01000", "careful"),
        pg.NoticeResponse,
        {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"},
    )
    add(pg.parse_complete(), pg.ParseComplete)
    add(pg.bind_complete(), pg.BindComplete)
    add(pg.close_complete(), pg.CloseComplete)
    add(pg.no_data(), pg.NoData)
    add(pg.parameter_description([23, 25]), pg.ParameterDescription, (23, 25))
    add(pg.portal_suspended(), pg.PortalSuspended)
    add(pg.empty_query_response(), pg.EmptyQueryResponse)
    add(pg.copy_in_response(0, [0, 0]), pg.CopyInResponse, 0, (0, 0))
    add(pg.copy_out_response(1, [1]), pg.CopyOutResponse, 1, (1,))
    add(pg.copy_both_response(), pg.CopyBothResponse, 0, ())
    add(pg.copy_data(b"row\n"), pg.CopyData)
    add(pg.copy_done(), pg.CopyDone)
    add(pg.notification_response(99, "jobs", "payload é"), pg.NotificationResponse, 99, "jobs", "payload é")
    add(pg.negotiate_protocol_version(0, ["_pq_.foo"]), pg.NegotiateProtocolVersion, 0, ("_pq_.foo",))
    add(pg.function_call_response(b"42"), pg.FunctionCallResponse, b"42")
    add(pg.function_call_response(None), pg.FunctionCallResponse, None)
    add(b"?\0\0\0\x07abc", pg.UnknownMessage)
    return cases


def split_points(n: int, how: str) -> list[int]:
    if how == "whole":
        return [0, n]
    if how == "bytewise":
        return list(range(n + 1))
    rng = random.Random(f"{how}-{n}")
    cuts = sorted(rng.sample(range(1, n), min(n - 1, 40))) if n > 1 else []
    return [0, *cuts, n]


def feed_all(reader: pg.FrontendReader | pg.BackendReader, data: bytes, how: str) -> list[pg.Message]:
    points = split_points(len(data), how)
    out: list[pg.Message] = []
    for start, end in itertools.pairwise(points):
        out.extend(reader.feed(data[start:end]))
    return out


SPLITS = ["whole", "bytewise", "random-1", "random-2"]
STARTUP = pg.startup_message({"user": "agent", "database": "app", "application_name": "psql", "options": "-c x=1"})


@pytest.mark.parametrize("how", SPLITS)
def test_frontend_round_trip(how: str) -> None:
    cases = frontend_cases()
    stream = STARTUP + b"".join(raw for raw, _ in cases) + pg.terminate()
    reader = pg.FrontendReader()
    messages = feed_all(reader, stream, how)
    startup = messages[0]
    assert isinstance(startup, pg.StartupMessage)
    assert (startup.major, startup.minor) == (3, 0)
    assert startup.user == "agent"
    assert startup.database == "app"
    assert startup.application_name == "psql"
    assert startup.options == "-c x=1"
    assert messages[1:-1] == [expected for _, expected in cases]
    assert messages[-1] == pg.Terminate(pg.terminate())
    assert b"".join(m.raw for m in messages) == stream
    assert reader.phase == "closed"


@pytest.mark.parametrize("how", SPLITS)
def test_backend_round_trip(how: str) -> None:
    cases = backend_cases()
    stream = b"".join(raw for raw, _ in cases)
    messages = feed_all(pg.BackendReader(), stream, how)
    assert messages == [expected for _, expected in cases]
    assert b"".join(m.raw for m in messages) == stream


def test_decoded_fields() -> None:
    """Spot-check the decoded views, beyond equality with what was built."""
    by_type: dict[type, pg.Message] = {}
    for _, message in backend_cases():
        by_type.setdefault(type(message), message)
    error = by_type[pg.ErrorResponse]
    assert (error.severity, error.sqlstate, error.message) == ("ERROR", "42501", "denied")
    row = by_type[pg.DataRow]
    assert row.values == [b"1", None, b"", "é".encode()]
    unknown = by_type[pg.UnknownMessage]
    assert (unknown.type, unknown.body) == ("?", b"abc")
    assert pg.decode_backend(pg.copy_data(b"xyz")).data == b"xyz"


def test_password_message_reinterpretation() -> None:
    reader = pg.FrontendReader()
    reader.feed(STARTUP)
    (password,) = reader.feed(pg.password_message("secret"))
    assert password.password() == "secret"
    (initial,) = reader.feed(pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    sasl = initial.as_sasl_initial_response()
    assert (sasl.mechanism, sasl.data) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    (empty,) = reader.feed(pg.sasl_initial_response("SCRAM-SHA-256", None))
    assert empty.as_sasl_initial_response().data is None
    (response,) = reader.feed(pg.sasl_response(b"c=biws"))
    assert response.as_sasl_response().data == b"c=biws"
    with pytest.raises(ProtocolError, match="PasswordMessage"):
        initial.password()  # the SASL body has a NUL inside: not a password
    assert pg.password_message(b"md5abc") == pg.password_message("md5abc")


def test_bind_param_format() -> None:
    bind = pg.decode_frontend(pg.bind("", "", [b"1", b"2"], [1]))
    assert isinstance(bind, pg.Bind)
    assert [bind.param_format(i) for i in range(2)] == [1, 1]
    bind = pg.decode_frontend(pg.bind("", "", [b"1", b"2"]))
    assert [bind.param_format(i) for i in range(2)] == [0, 0]
    bind = pg.decode_frontend(pg.bind("", "", [b"1", b"2"], [0, 1]))
    assert [bind.param_format(i) for i in range(2)] == [0, 1]


@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=30))
def test_datarow_encode_decode(values: list[bytes | None]) -> None:
    raw = pg.encode_datarow(values)
    assert pg.decode_datarow(raw) == values
    assert pg.data_row(values) == raw


@given(st.lists(st.binary(min_size=1, max_size=30), max_size=20), st.randoms(use_true_random=False))
def test_any_split_gives_the_same_messages(payloads: list[bytes], rnd: random.Random) -> None:
    stream = b"".join(pg.copy_data(p) for p in payloads) + pg.command_complete("COPY") + pg.ready_for_query("I")
    whole = pg.BackendReader().feed(stream)
    reader = pg.BackendReader()
    pos, pieces = 0, []
    while pos < len(stream):
        step = rnd.randint(1, 17)
        pieces.extend(reader.feed(stream[pos : pos + step]))
        pos += step
    assert pieces == whole
    assert reader.buffered == 0


# ----------------------------------------------------------------------------------------------------------
# Relay mode: split without decoding


def test_feed_block_relays_exact_bytes() -> None:
    rows = [pg.data_row([str(i).encode(), b"x" * i]) for i in range(50)]
    stream = (
        pg.row_description([("a", 0, 0, 23, 4, -1, 0), ("b", 0, 0, 25, -1, -1, 0)])
        + b"".join(rows)
        + pg.command_complete("SELECT 50")
        + pg.ready_for_query("T")
    )
    reader = pg.BackendReader()
    relayed = b""
    types = b""
    for start in range(0, len(stream), 97):
        block = reader.feed_block(stream[start : start + 97])
        relayed += block.data
        types += block.types
        assert [frame.raw for frame in block.frames()] == [block.raw(i) for i in range(len(block))]
        assert all(block.data[offset] == block.types[i] for i, offset in enumerate(block.offsets))
    assert relayed == stream
    assert types == b"T" + b"D" * 50 + b"CZ"
    assert reader.buffered == 0
    assert block.ready_status() == "T"


def test_feed_block_without_copy_when_aligned() -> None:
    stream = pg.data_row([b"1"]) + pg.ready_for_query("I")
    block = pg.BackendReader().feed_block(stream)
    assert block.data is stream  # complete messages are passed on without a copy
    assert len(block) == 2 and bool(block)
    assert [pg.decode_backend(f.raw) for f in block.frames()] == pg.BackendReader().feed(stream)
    empty = pg.BackendReader().feed_block(stream[:3])
    assert not empty and empty.ready_status() is None and list(empty.frames()) == []


def test_frontend_feed_block_for_copy_in() -> None:
    reader = pg.FrontendReader()
    reader.feed(STARTUP)
    stream = pg.copy_data(b"1\n") + pg.copy_data(b"2\n") + pg.copy_done()
    block = reader.feed_block(stream)
    assert block.types == b"ddc" and block.data == stream
    with pytest.raises(ProtocolError, match="only valid for typed"):
        pg.FrontendReader().feed_block(stream)


# ----------------------------------------------------------------------------------------------------------
# Startup phase


def test_ssl_request_then_startup() -> None:
    reader = pg.FrontendReader()
    assert reader.feed(pg.ssl_request()) == [pg.SSLRequest(pg.ssl_request())]
    assert reader.phase == "startup" and not reader.has_buffered_data
    # After the single-byte answer, the client sends its StartupMessage (in TLS or in the clear).
    (startup,) = reader.feed(STARTUP)
    assert isinstance(startup, pg.StartupMessage)
    assert reader.phase == "typed"
    assert pg.ssl_response(True) == b"S" and pg.ssl_response(False) == b"N"


def test_gssenc_request() -> None:
    reader = pg.FrontendReader()
    assert reader.feed(pg.gssenc_request()) == [pg.GSSENCRequest(pg.gssenc_request())]


@pytest.mark.parametrize("request_bytes", [pg.ssl_request(), pg.gssenc_request()])
def test_data_after_encryption_request_is_refused(request_bytes: bytes) -> None:
    """Bytes sent in the clear along with the request would be read as if encrypted (CVE-2021-23214)."""
    with pytest.raises(ProtocolError, match="unencrypted data"):
        pg.FrontendReader().feed(request_bytes + STARTUP)


def test_cancel_request() -> None:
    reader = pg.FrontendReader()
    (cancel,) = reader.feed(pg.cancel_request(1234, b"\xde\xad\xbe\xef"))
    assert cancel == pg.CancelRequest(pg.cancel_request(1234, b"\xde\xad\xbe\xef"), 1234, b"\xde\xad\xbe\xef")
    assert reader.phase == "closed"
    with pytest.raises(ProtocolError, match="after the connection was ended"):
        reader.feed(b"x")
    long_key = bytes(range(32))  # protocol 3.2 keys are longer
    (cancel,) = pg.FrontendReader().feed(pg.cancel_request(5, long_key))
    assert cancel.key == long_key
    with pytest.raises(ProtocolError, match="after CancelRequest"):
        pg.FrontendReader().feed(pg.cancel_request(5, b"abcd") + b"\0")


def test_startup_minor_version_and_protocol_options() -> None:
    raw = pg.startup_message({"user": "u", "_pq_.extension": "on"}, minor=2)
    (startup,) = pg.FrontendReader().feed(raw)
    assert (startup.major, startup.minor) == (3, 2)
    assert startup.params == {"user": "u", "_pq_.extension": "on"}
    assert startup.database is None


def test_messages_following_startup_in_the_same_read() -> None:
    reader = pg.FrontendReader()
    messages = reader.feed(STARTUP + pg.password_message("tok") + pg.query("SELECT 1")[:3])
    assert [type(m) for m in messages] == [pg.StartupMessage, pg.PasswordMessage]
    assert reader.buffered == 3
    assert reader.feed(pg.query("SELECT 1")[3:]) == [pg.Query(pg.query("SELECT 1"), "SELECT 1")]


# ----------------------------------------------------------------------------------------------------------
# Malformed input


def startup_packet(code: int, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + code.to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ((4).to_bytes(4, "big") + b"\0\0\0\0", "invalid length of startup packet: 4"),
        ((10005).to_bytes(4, "big"), "invalid length of startup packet: 10005"),
        ((-1).to_bytes(4, "big", signed=True), "invalid length of startup packet"),
        (startup_packet(2 << 16, b"user\0u\0\0"), "unsupported frontend protocol 2.0"),
        (startup_packet(4 << 16, b"user\0u\0\0"), "unsupported frontend protocol 4.0"),
        (startup_packet(3 << 16, b"user\0u\0"), "malformed StartupMessage"),
        (startup_packet(3 << 16, b"user\0u\0x"), "expected terminator"),
        (startup_packet(3 << 16, b"user\0u\0user\0v\0\0"), "duplicate parameter 'user'"),
        (startup_packet(3 << 16, b"user\0\xff\0\0"), "not valid UTF-8"),
        (startup_packet(3 << 16, b"\0\0"), "trailing bytes"),
        (startup_packet(80877103, b"\0"), "invalid length of SSLRequest"),
        (startup_packet(80877102, b"\0\0\0\1"), "invalid length of CancelRequest"),
    ],
)
def test_bad_startup_packets(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        pg.FrontendReader().feed(data)


def typed(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + (len(body) + 4).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"Q\0\0\0\3", "invalid frontend message length 3"),
        (b"Q\xff\xff\xff\xff", "invalid frontend message length -1"),
        (b"Z\0\0\0\4", "invalid frontend message type"),
        (b"\0", "invalid frontend message type 0"),
        (b"S\0\0\x27\x15", "over the limit of 10000"),  # a Sync claiming 10001 bytes: refused from its header
        (b"p\0\1\0\5", "over the limit of 65535"),
        (typed(b"Q", b"SELECT 1"), "malformed Query message: unterminated string"),
        (typed(b"Q", b"SELECT \xc3\0"), "not valid UTF-8"),
        (typed(b"Q", b"SELECT 1\0;\0"), "trailing bytes"),
        (typed(b"P", b"s\0SELECT 1\0\0\1"), "truncated"),
        (typed(b"B", b"\0\0\0\2\0\0\0\1\0\0\0\0\0\0\0\0\0\0"), "2 parameter formats for 0 parameters"),
        (typed(b"B", b"\0\0\0\0\0\1\xff\xff\xff\xfe\0\0"), "invalid value length -2"),
        (typed(b"B", b"\0\0\0\0\0\1\0\0\0\x09ab\0\0"), "truncated"),
        (typed(b"D", b"X\0"), "invalid target type 'X'"),
        (typed(b"C", b"S"), "unterminated"),
        (typed(b"E", b"\0\0\0"), "truncated"),
        (typed(b"E", b"\0\0\0\0\0\0"), "trailing bytes"),
        (typed(b"S", b"x"), "body must be empty"),
        (typed(b"F", b"\0\0\0\1\0\2\0\0\0\0\0\1\0\0\0\0\0\0"), "2 argument formats for 1 arguments"),
        (pg.sync() + pg.terminate() + pg.sync(), "after Terminate"),
    ],
)
def test_bad_frontend_messages(data: bytes, match: str) -> None:
    reader = pg.FrontendReader()
    reader.feed(STARTUP)
    with pytest.raises(ProtocolError, match=match):
        reader.feed(data)


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    reader = pg.FrontendReader(max_message_size=1000)
    reader.feed(STARTUP)
    reader.feed(pg.query("x" * 900))  # under the limit
    with pytest.raises(ProtocolError, match="over the limit of 1000"):
        reader.feed(b"Q\0\0\x10\0")  # only the header: 4092 bytes announced
    reader = pg.FrontendReader()
    reader.feed(STARTUP)
    with pytest.raises(ProtocolError, match="over the limit of 1073741823"):
        reader.feed(b"d\x7f\xff\xff\xff")
    with pytest.raises(ValueError, match="max_message_size"):
        pg.FrontendReader(max_message_size=0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"Z\0\0\0\3", "invalid backend message length 3"),
        (typed(b"Z", b"X"), "invalid transaction status 'X'"),
        (typed(b"Z", b""), "truncated"),
        (typed(b"S", b"a" * 30001), "over the limit of 30000"),  # not a type that may be long
        (typed(b"R", b"\0\0\0\5ab"), "truncated"),
        (typed(b"R", b"\0\0\0\x0aSCRAM"), "unterminated"),
        (typed(b"T", b"\0\1a\0\0\0"), "truncated"),
        (typed(b"K", b"\0\0\0\1ab"), "invalid cancel key length 2"),
        (typed(b"G", b"\2\0\0"), "invalid overall format 2"),
        (typed(b"v", b"\0\0\0\0\xff\xff\xff\xff"), "invalid option count"),
        (typed(b"1", b"x"), "body must be empty"),
        (typed(b"C", b"SELECT 1\0\0"), "trailing"),
        (typed(b"S", b"a\0\xe9\0"), "not valid UTF-8"),
    ],
)
def test_bad_backend_messages(data: bytes, match: str) -> None:
    reader = pg.BackendReader()
    with pytest.raises(ProtocolError, match=match):
        reader.feed(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (typed(b"D", b"\0\1\xff\xff\xff\xfe"), "invalid value length -2"),
        (typed(b"D", b"\0\2\0\0\0\1a"), "truncated"),
        (typed(b"D", b"\0\0x"), "trailing bytes"),
        (typed(b"D", b"\0"), "truncated"),
    ],
)
def test_bad_datarow_is_caught_when_decoded(data: bytes, match: str) -> None:
    """DataRow bodies are decoded lazily: relaying one costs nothing, reading its values checks it."""
    (row,) = pg.BackendReader().feed(data)
    with pytest.raises(ProtocolError, match=match):
        row.values
    with pytest.raises(ProtocolError, match=match):
        pg.decode_datarow(data)


def test_long_backend_types_follow_the_configured_limit() -> None:
    row = pg.data_row([b"x" * 50000])
    assert pg.BackendReader().feed(row)[0].values == [b"x" * 50000]
    with pytest.raises(ProtocolError, match="over the limit of 1000"):
        pg.BackendReader(max_message_size=1000).feed(row[:5])


def test_error_fields_are_decoded_leniently() -> None:
    raw = typed(b"E", b"SFATAL\0C28P01\0Mfalsches Passwort f\xfcr\0\0")
    (error,) = pg.BackendReader().feed(raw)
    assert error.sqlstate == "28P01" and error.severity == "FATAL"
    assert error.message.startswith("falsches Passwort f")


def test_decode_helpers_check_framing() -> None:
    with pytest.raises(ProtocolError, match="does not match"):
        pg.decode_backend(b"Z\0\0\0\6I")
    with pytest.raises(ProtocolError, match="shorter than its header"):
        pg.decode_frontend(b"Q\0")
    with pytest.raises(ProtocolError, match="invalid frontend message type"):
        pg.decode_frontend(pg.ready_for_query("I"))
    with pytest.raises(ProtocolError, match="wrong type"):
        pg.decode_datarow(pg.ready_for_query("I") + b"\0\0")


# ----------------------------------------------------------------------------------------------------------
# The answer to SSLRequest on the upstream side


def test_encryption_response() -> None:
    for byte, accepted in [(b"S", True), (b"G", True), (b"N", False)]:
        reader = pg.BackendReader()
        reader.expect_encryption_response()
        assert reader.feed(byte) == [pg.EncryptionResponse(byte, accepted)]
        assert reader.feed(pg.authentication_ok()) == [pg.AuthenticationOk(pg.authentication_ok())]
    reader = pg.BackendReader()
    reader.expect_encryption_response()
    assert reader.feed(b"") == []
    with pytest.raises(ProtocolError, match="use feed"):
        reader.feed_block(b"S")


def test_encryption_response_followed_by_cleartext_is_refused() -> None:
    """Bytes after 'S' were not protected by the TLS handshake (CVE-2021-23222)."""
    reader = pg.BackendReader()
    reader.expect_encryption_response()
    with pytest.raises(ProtocolError, match="unencrypted data"):
        reader.feed(b"S" + pg.authentication_ok())


def test_encryption_request_answered_by_an_error() -> None:
    error = pg.error_response("FATAL", "08P01", "unsupported frontend protocol 1234.5679")
    reader = pg.BackendReader()
    reader.expect_encryption_response()
    messages = reader.feed(error)
    assert [type(m) for m in messages] == [pg.ErrorResponse]
    reader = pg.BackendReader()
    reader.expect_encryption_response()
    with pytest.raises(ProtocolError, match="invalid response"):
        reader.feed(b"X")


# ----------------------------------------------------------------------------------------------------------
# Builders refuse what would corrupt the stream


@pytest.mark.parametrize(
    "build",
    [
        lambda: pg.query("SELECT 1\0; DROP TABLE t"),
        lambda: pg.error_response("ERROR", "42501", "bad\0M injected"),
        lambda: pg.error_response("ERROR", "425", "short sqlstate"),
        lambda: pg.error_response("ERROR", "42501", "m", fields={"MM": "x"}),
        lambda: pg.ready_for_query("X"),
        lambda: pg.describe("X", "s"),
        lambda: pg.authentication_md5_password(b"abc"),
        lambda: pg.cancel_request(1, b"abc"),
        lambda: pg.backend_key_data(1, b""),
        lambda: pg.copy_in_response(2),
        lambda: pg.password_message(b"a\0b"),
        lambda: pg.startup_message({"user": "a\0b"}),
        lambda: pg.data_row([b""] * 70000),
        lambda: pg.bind("", "", [b""] * 70000),
    ],
)
def test_builders_refuse_bad_values(build) -> None:
    with pytest.raises(ValueError):
        build()


# ----------------------------------------------------------------------------------------------------------
# Real server bytes: the machine's PostgreSQL (trust auth for postgres on 127.0.0.1:5432)


def connect_local() -> socket.socket:
    try:
        sock = socket.create_connection(("127.0.0.1", 5432), timeout=10)
    except OSError:
        require(False, "PostgreSQL is not running on 127.0.0.1:5432")
        raise
    sock.sendall(pg.startup_message({"user": "postgres", "database": "test", "client_encoding": "UTF8"}))
    return sock


def exchange(sock: socket.socket, request: bytes, ready_count: int = 1) -> bytes:
    """Send ``request``; return the raw bytes up to the ``ready_count``-th ReadyForQuery."""
    sock.sendall(request)
    data = b""
    reader = pg.BackendReader()
    seen = 0
    while seen < ready_count:
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        data += chunk
        seen += reader.feed_block(chunk).types.count(b"Z")
    return data


@pytest.fixture
def server() -> socket.socket:
    sock = connect_local()
    exchange(sock, b"")
    yield sock
    sock.sendall(pg.terminate())
    sock.close()


def read_bytewise(data: bytes) -> list[pg.Message]:
    reader = pg.BackendReader()
    messages = [m for i in range(len(data)) for m in reader.feed(data[i : i + 1])]
    assert messages == pg.BackendReader().feed(data)
    assert b"".join(m.raw for m in messages) == data
    return messages


def test_real_startup_sequence() -> None:
    sock = connect_local()
    try:
        messages = read_bytewise(exchange(sock, b""))
    finally:
        sock.close()
    assert isinstance(messages[0], pg.AuthenticationOk)
    params = {m.name: m.value for m in messages if isinstance(m, pg.ParameterStatus)}
    assert params["client_encoding"] == "UTF8"
    assert params["standard_conforming_strings"] == "on"
    key = next(m for m in messages if isinstance(m, pg.BackendKeyData))
    assert key.pid > 0 and len(key.key) == 4
    assert messages[-1] == pg.ReadyForQuery(pg.ready_for_query("I"), "I")


def test_real_extended_protocol_pipeline_with_error_recovery(server: socket.socket) -> None:
    request = (
        pg.parse("s1", "SELECT $1::int + 1 AS n, NULL::text AS t", [23])
        + pg.describe("S", "s1")
        + pg.bind("p1", "s1", [b"41"])
        + pg.describe("P", "p1")
        + pg.execute("p1")
        + pg.close("S", "s1")
        + pg.sync()
        # The server reports the error, then discards everything up to the next Sync.
        + pg.parse("", "SELEC broken")
        + pg.bind("", "")
        + pg.execute("")
        + pg.sync()
        + pg.parse("", "SELECT generate_series(1, 3)")
        + pg.bind("", "")
        + pg.execute("", 2)
        + pg.execute("", 0)
        + pg.sync()
        + pg.parse("", "SET application_name = 'x'")
        + pg.bind("", "")
        + pg.describe("P", "")
        + pg.execute("")
        + pg.sync()
    )
    messages = read_bytewise(exchange(server, request, ready_count=4))
    names = [type(m).__name__ for m in messages]
    assert names == [
        "ParseComplete",
        "ParameterDescription",
        "RowDescription",
        "BindComplete",
        "RowDescription",
        "DataRow",
        "CommandComplete",
        "CloseComplete",
        "ReadyForQuery",
        "ErrorResponse",
        "ReadyForQuery",
        "ParseComplete",
        "BindComplete",
        "DataRow",
        "DataRow",
        "PortalSuspended",
        "DataRow",
        "CommandComplete",
        "ReadyForQuery",
        "ParseComplete",
        "BindComplete",
        "NoData",
        "CommandComplete",
        "ParameterStatus",
        "ReadyForQuery",
    ]
    assert messages[1].type_oids == (23,)
    fields = messages[2].fields
    assert [(f.name, f.type_oid) for f in fields] == [("n", 23), ("t", 25)]
    assert messages[5].values == [b"42", None]
    assert messages[9].sqlstate == "42601"
    assert [m.values for m in messages if isinstance(m, pg.DataRow)][1:] == [[b"1"], [b"2"], [b"3"]]


def test_real_copy_out_and_in(server: socket.socket) -> None:
    out = read_bytewise(exchange(server, pg.query("COPY (SELECT g, 'é' || g FROM generate_series(1, 3) g) TO STDOUT")))
    assert isinstance(out[0], pg.CopyOutResponse)
    assert out[0].column_formats == (0, 0)
    assert [m.data for m in out if isinstance(m, pg.CopyData)] == [f"{i}\té{i}\n".encode() for i in (1, 2, 3)]
    assert [type(m).__name__ for m in out[-3:]] == ["CopyDone", "CommandComplete", "ReadyForQuery"]

    exchange(server, pg.query("CREATE TEMP TABLE lictor_copy_in (a int, b text)"))
    server.sendall(pg.query("COPY lictor_copy_in FROM STDIN"))
    reader = pg.BackendReader()
    (copy_in,) = reader.feed(server.recv(65536))
    assert isinstance(copy_in, pg.CopyInResponse)
    done = read_bytewise(exchange(server, pg.copy_data(b"1\tx\n2\t\\N\n") + pg.copy_done()))
    assert done[0].tag == "COPY 2"
    server.sendall(pg.query("COPY lictor_copy_in FROM STDIN"))
    reader.feed(server.recv(65536))
    failed = read_bytewise(exchange(server, pg.copy_data(b"3\ty\n") + pg.copy_fail("agent gave up")))
    assert failed[0].sqlstate == "57014" and "agent gave up" in failed[0].message
    rows = read_bytewise(exchange(server, pg.query("SELECT a, b FROM lictor_copy_in ORDER BY a")))
    assert [m.values for m in rows if isinstance(m, pg.DataRow)] == [[b"1", b"x"], [b"2", None]]


def test_real_notices_notifications_and_empty_query(server: socket.socket) -> None:
    messages = read_bytewise(
        exchange(
            server,
            pg.query("LISTEN lictor_chan; NOTIFY lictor_chan, 'hello é'; ; DO $$BEGIN RAISE NOTICE 'note'; END$$"),
        )
    )
    notification = next(m for m in messages if isinstance(m, pg.NotificationResponse))
    assert (notification.channel, notification.payload) == ("lictor_chan", "hello é")
    notice = next(m for m in messages if isinstance(m, pg.NoticeResponse))
    assert (notice.severity, notice.message) == ("NOTICE", "note")
    assert any(isinstance(m, pg.EmptyQueryResponse) for m in read_bytewise(exchange(server, pg.query(""))))


def test_real_function_call(server: socket.socket) -> None:
    rows = read_bytewise(exchange(server, pg.query("SELECT 'abs(int4)'::regprocedure::oid")))
    oid = int(next(m for m in rows if isinstance(m, pg.DataRow)).values[0])
    messages = read_bytewise(exchange(server, pg.function_call(oid, [b"-5"], [0], 0)))
    assert messages[0] == pg.FunctionCallResponse(pg.function_call_response(b"5"), b"5")


def test_real_server_rejects_what_the_reader_rejects() -> None:
    """A startup packet announcing more than 10000 bytes: the server hangs up, the reader raises."""
    header = (10005).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big")
    try:
        sock = socket.create_connection(("127.0.0.1", 5432), timeout=10)
    except OSError:
        require(False, "PostgreSQL is not running on 127.0.0.1:5432")
        raise
    with sock:
        sock.sendall(header)
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""
    assert reply == b""  # the server logs the error and closes without a word
    with pytest.raises(ProtocolError, match="invalid length of startup packet: 10005"):
        pg.FrontendReader().feed(header)
    # The largest packet the server accepts is accepted too.
    largest = startup_packet(3 << 16, b"user\0" + b"u" * (10000 - 4 - 7) + b"\0\0")
    assert len(largest) == 10004
    assert pg.FrontendReader().feed(largest)[0].user == "u" * 9989
