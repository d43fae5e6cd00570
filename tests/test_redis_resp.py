"""The Redis addon's sans-IO RESP codec (examples/redis/lictor_redis/resp.py), on bytes."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "examples" / "redis"))

from lictor_redis.resp import (
    AggregateStart,
    BulkChunk,
    BulkEnd,
    BulkStart,
    Command,
    CommandParser,
    ProtocolError,
    ReplyParser,
    Simple,
    encode_bulk,
    encode_command,
    encode_error,
    encode_simple,
    split_inline,
)

# -- commands ---------------------------------------------------------------------------------------


def commands(data: bytes, **limits: int) -> list[tuple[bytes, ...]]:
    parser = CommandParser(**limits)
    parser.feed(data)
    out = []
    while (c := parser.next_command()) is not None:
        out.append(c.args)
    return out


def test_multibulk_command():
    data = b"*3\r\n$3\r\nSET\r\n$5\r\napp:1\r\n$4\r\na\r\nb\r\n"
    parser = CommandParser()
    parser.feed(data)
    assert parser.next_command() == Command((b"SET", b"app:1", b"a\r\nb"), len(data))
    assert parser.next_command() is None


def test_pipelined_commands_in_one_write_and_split_anywhere():
    args = [(b"SET", b"k%d" % i, b"v" * i) for i in range(100)]
    data = b"".join(encode_command(a) for a in args)
    assert commands(data) == args
    parser = CommandParser()
    got = []
    for i in range(len(data)):  # one byte at a time
        parser.feed(data[i : i + 1])
        while (c := parser.next_command()) is not None:
            got.append(c.args)
    assert got == args


def test_empty_multibulk_is_skipped():
    assert commands(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n") == [(b"PING",)]


def test_inline_commands():
    assert commands(b"PING\r\nGET  app:1\nSET k \"a b\\x41\\n\" 'it\\'s'\r\n\r\n") == [
        (b"PING",),
        (b"GET", b"app:1"),
        (b"SET", b"k", b"a bA\n", b"it's"),
    ]


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"", []),
        (b"   ", []),
        (b'"" x', [b"", b"x"]),
        (b'"\\"quoted\\""', [b'"quoted"']),
        (b"'\\x41'", [b"\\x41"]),  # no escapes in single quotes, except \'
        (b'a"b c"', [b"ab c"]),  # a quote inside a word starts a quoted part, as in Redis
        (b'"\\xzz"', [b"xzz"]),
    ],
)
def test_split_inline(line, args):
    assert split_inline(line) == args


@pytest.mark.parametrize("line", [b'"open', b"'open", b'"closed"x', b"'closed'x"])
def test_split_inline_rejects_unbalanced_quotes(line):
    with pytest.raises(ProtocolError, match="unbalanced quotes"):
        split_inline(line)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*1\r\n+PING\r\n", "expected '\\$'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$3\r\nGETxx", "not terminated"),
        (b"*2000000\r\n", "invalid multibulk length"),
        (b"*1\r\n$99999999\r\n", "larger than the gateway's limit"),
        (b"*1\r\n$ 3\r\nGET\r\n", "invalid bulk length"),
        (b"*1\r\n$+3\r\nGET\r\n", "invalid bulk length"),
    ],
)
def test_protocol_errors(data, message):
    parser = CommandParser(max_command_bytes=1024 * 1024)
    parser.feed(data)
    with pytest.raises(ProtocolError, match=message):
        parser.next_command()


def test_limits_before_authentication_are_small():
    parser = CommandParser(max_command_bytes=64 * 1024, max_args=16)
    parser.feed(b"*17\r\n")
    with pytest.raises(ProtocolError):
        parser.next_command()
    parser = CommandParser(max_command_bytes=64 * 1024, max_args=16)
    parser.feed(b"*2\r\n$4\r\nAUTH\r\n$70000\r\n")
    with pytest.raises(ProtocolError, match="limit"):
        parser.next_command()


def test_a_command_over_the_argument_limit_is_read_to_its_end_and_refused_in_step():
    parser = CommandParser(args_limit=4)
    big = encode_command([b"EXISTS", *[b"app:%d" % i for i in range(9)]])
    parser.feed(big[:30])
    assert parser.next_command() is None
    parser.feed(big[30:] + encode_command([b"GET", b"app:1"]) + b"MGET a b c d e\r\nPING\r\n")
    refused = parser.next_command()
    assert refused is not None and refused.too_many == 10 and refused.size == len(big)
    assert refused.args == (b"EXISTS", b"app:0")  # what names it, not the arguments
    assert parser.next_command() == Command((b"GET", b"app:1"), len(encode_command([b"GET", b"app:1"])))
    inline = parser.next_command()
    assert inline is not None and (inline.too_many, inline.args) == (6, (b"MGET", b"a"))
    assert parser.next_command() == Command((b"PING",), 6, inline=True)
    long_name = CommandParser(args_limit=1)
    long_name.feed(encode_command([b"X" * 1000, b"Y" * 1000]))
    named = long_name.next_command()
    assert named is not None and named.args == (b"X" * 64, b"Y" * 64)
    exact = CommandParser(args_limit=4)
    exact.feed(encode_command([b"MGET", b"a", b"b", b"c"]))
    assert exact.next_command() == Command(
        (b"MGET", b"a", b"b", b"c"), len(encode_command([b"MGET", b"a", b"b", b"c"]))
    )


def test_a_long_buffered_command_is_read_over_several_calls():
    """What one call reads is bounded (``max_steps`` arguments or empty commands), so that a caller can let other
    work run between calls; ``pending`` tells it that the rest is already buffered."""
    big = encode_command([b"EXISTS", *[b"app:%d" % i for i in range(9)]])
    for limit in (None, 4):
        parser = CommandParser(max_steps=3, args_limit=limit)
        parser.feed(b"*0\r\n" * 5 + big + encode_command([b"PING"]))
        calls = 0
        while (command := parser.next_command()) is None:
            assert parser.pending
            calls += 1
        assert calls >= 4 and command.size == len(big) and command.too_many == (10 if limit else 0)
        assert parser.next_command() == Command((b"PING",), 14) and not parser.pending
        assert parser.next_command() is None and not parser.pending  # wants bytes now


def test_inline_line_without_end_is_bounded():
    parser = CommandParser(max_inline=100)
    parser.feed(b"x" * 101)
    with pytest.raises(ProtocolError, match="too big inline"):
        parser.next_command()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8),
    st.lists(st.integers(1, 30), min_size=1, max_size=10),
)
def test_command_roundtrip_any_chunking(cmds, cuts):
    data = b"".join(encode_command(c) for c in cmds)
    parser = CommandParser()
    got, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        parser.feed(data[pos : pos + step])
        pos += step
        i += 1
        while (c := parser.next_command()) is not None:
            got.append(list(c.args))
    assert got == cmds
    assert parser.buffered == 0


# -- encoders ---------------------------------------------------------------------------------------


def test_encoders_keep_replies_on_one_line():
    assert encode_error("NOPERM a\r\nb") == b"-NOPERM a  b\r\n"
    assert encode_simple("OK") == b"+OK\r\n"
    assert encode_bulk(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert encode_bulk(None) == b"$-1\r\n"


# -- replies ----------------------------------------------------------------------------------------


def events(data: bytes, **kw: int) -> list:
    parser = ReplyParser(**kw)
    parser.feed(data)
    return list(parser.events())


def test_resp2_replies():
    data = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*2\r\n$1\r\na\r\n:1\r\n"
    evs = events(data)
    assert evs == [
        Simple(ord("+"), b"OK", 0, True),
        Simple(ord("-"), b"ERR no", 0, True),
        Simple(ord(":"), b"42", 0, True),
        BulkStart(ord("$"), 3, 0, False),
        BulkChunk(b"abc", 0),
        BulkEnd(0, True),
        BulkStart(ord("$"), -1, 0, True),
        AggregateStart(ord("*"), -1, 0, True),
        AggregateStart(ord("*"), 2, 0, False),
        BulkStart(ord("$"), 1, 1, False),
        BulkChunk(b"a", 1),
        BulkEnd(1, False),
        Simple(ord(":"), b"1", 1, True),
    ]


def test_resp3_types_and_done_flags():
    data = (
        b"%2\r\n+a\r\n:1\r\n$1\r\nb\r\n~2\r\n#t\r\n,1.5\r\n"  # map with a set value
        b"_\r\n"
        b"(12345678901234567890\r\n"
        b"!5\r\nERR x\r\n"
        b"=8\r\ntxt:abcd\r\n"
        b">2\r\n+pubsub\r\n+x\r\n"
        b"|1\r\n+key\r\n+val\r\n*1\r\n+annotated\r\n"
    )
    evs = events(data)
    done = [i for i, e in enumerate(evs) if e.done]
    # one top-level reply ends at each: map, null, big number, bulk error, verbatim, push, array
    assert len(done) == 7
    assert evs[done[-1]] == Simple(ord("+"), b"annotated", 1, True)
    attribute = next(e for e in evs if isinstance(e, AggregateStart) and e.prefix == ord("|"))
    assert attribute.done is False  # an attribute is not a reply on its own


def test_reply_events_say_where_their_item_sits():
    # [[id, [field, value]]], then a map {stream: [...]} with an attribute before its value
    data = b"*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n+f\r\n+v\r\n%1\r\n+s\r\n|1\r\n+a\r\n+b\r\n*1\r\n+x\r\n"
    paths = [(type(e).__name__, e.path) for e in events(data) if not isinstance(e, (BulkChunk, BulkEnd))]
    assert paths == [
        ("AggregateStart", ()),
        ("AggregateStart", (0,)),
        ("BulkStart", (0, 0)),
        ("AggregateStart", (0, 1)),
        ("Simple", (0, 1, 0)),
        ("Simple", (0, 1, 1)),
        ("AggregateStart", ()),
        ("Simple", (0,)),  # a map's key...
        ("AggregateStart", (1,)),
        ("Simple", (1, -1)),  # inside an attribute
        ("Simple", (1, -1)),
        ("AggregateStart", (1,)),  # ...and its value, which the attribute annotates
        ("Simple", (1, 0)),
    ]


def test_attribute_inside_an_array_does_not_count_as_an_element():
    evs = events(b"*2\r\n|1\r\n+k\r\n+v\r\n:1\r\n:2\r\n")
    assert [e.done for e in evs] == [False, False, False, False, False, True]


def test_bulk_streams_in_chunks_without_buffering_it_whole():
    parser = ReplyParser(chunk=1000)
    parser.feed(b"$10000\r\n" + b"x" * 4000)
    evs = list(parser.events())
    assert evs[0] == BulkStart(ord("$"), 10000, 0, False)
    assert sum(len(e.data) for e in evs[1:]) == 4000 and all(len(e.data) <= 1000 for e in evs[1:])
    parser.feed(b"x" * 6000 + b"\r\n")
    rest = list(parser.events())
    assert isinstance(rest[-1], BulkEnd) and rest[-1].done
    assert parser.idle


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"?x\r\n", "unknown reply type"),
        (b"#x\r\n", "invalid boolean"),
        (b":1x\r\n", "invalid integer"),
        (b"$-2\r\n", "invalid bulk length"),
        (b">-1\r\n", "invalid aggregate length"),
        (b"$1\r\nab\r\n", "not terminated"),
        (b"_x\r\n", "invalid null"),
    ],
)
def test_reply_protocol_errors(data, message):
    with pytest.raises(ProtocolError, match=message):
        events(data)


def test_reply_limits():
    with pytest.raises(ProtocolError, match="longer than"):
        events(b"+" + b"x" * 200, max_line=100)
    with pytest.raises(ProtocolError, match="nested deeper"):
        events(b"*1\r\n" * 10, max_depth=5)


resp3_values = st.recursive(
    st.one_of(
        st.binary(max_size=30).map(lambda b: b"$%d\r\n%b\r\n" % (len(b), b)),
        st.text(alphabet="abcxyz ", max_size=10).map(lambda s: b"+" + s.encode() + b"\r\n"),
        st.integers(-(10**12), 10**12).map(lambda i: b":%d\r\n" % i),
        st.just(b"_\r\n"),
        st.just(b"$-1\r\n"),
        st.sampled_from([b"#t\r\n", b"#f\r\n", b",3.14\r\n", b"(123\r\n"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(children, max_size=4).map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)
        ),
        st.tuples(children, children).map(lambda kv: b"|1\r\n" + kv[0] + b"+v\r\n" + kv[1]),
    ),
    max_leaves=12,
)


def _raw(event) -> bytes:
    if isinstance(event, BulkChunk):
        return event.data
    if isinstance(event, BulkEnd):
        return b"\r\n"
    return event.raw


@settings(max_examples=300, deadline=None)
@given(st.lists(resp3_values, min_size=1, max_size=5), st.integers(1, 17))
def test_reply_events_reproduce_the_bytes_and_count_replies(values, step):
    data = b"".join(values)
    parser = ReplyParser(chunk=7)
    out, replies = [], 0
    for pos in range(0, len(data), step):
        parser.feed(data[pos : pos + step])
        for event in parser.events():
            out.append(_raw(event))
            replies += event.done
    assert b"".join(out) == data
    assert replies == len(values)
    assert parser.idle
