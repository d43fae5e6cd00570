"""Stream masking: chunking never changes the output, and memory stays flat."""

import random
import tracemalloc
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lictor.masking import BUILTIN_DETECTORS, MaskingError, MaskPlan, compile_detector

KEY = b"stream-test-key-0123456789"
PEM = (
    b"-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9OiZ1BjP5CE/Wm/Rr500P\n"
    b"Proc-Type: 4,ENCRYPTED\nZ1BjP5CE/Wm/Rr500P==\n-----END RSA PRIVATE KEY-----"
)
JWT = (
    b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    b".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
FRAGMENTS = [
    b"4111 1111 1111 1111",
    b"4111111111111111",
    b"4111111111111112",
    b"john.doe@example.com",
    b"a@b.co",
    "zoë@exämple.com".encode(),
    b"123-45-6789",
    b"000-12-3456",
    b"DE89 3704 0044 0532 0130 00",
    b"GB82WEST12345698765433",
    b"+44 20 7946 0958",
    b"(415) 555-2671",
    b"10.0.0.1",
    b"2001:db8::1",
    b"std::vector",
    JWT,
    b"AKIAIOSFODNN7EXAMPLE",
    b"ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    b"xoxb-123456789012-abcdefABCDEF123",
    b"sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    b"password=hunter2",
    b'"token": "a b c"',
    b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    b"postgres://app:pw@db/x",
    PEM,
    b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nu",  # truncated block
    b"EMP-123456",
    b"ERR-404",
    b"\nERR-500\n",
    b"eyJaaaaaaaa.",
    b"eyJaaaaaaaa-",
    b"-----BEGIN RSA PRIVATE KEY-----\n",
    b"the order shipped",
    b"12:30:45",
    "naïve café 日本語 ☃ 😀".encode(),
    b"\xff\xfe\xc3",
    b"@",
    b"eyJ",
    b"4111 ",
    b".",
    b"-",
    b" ",
    b"\n",
    b",",
    b"\t",
    b"::",
]


def full_plan(style: str = "redact") -> MaskPlan:
    emp = compile_detector("emp", r"\bEMP-\d{6}\b")
    name = compile_detector("name", r"(?i)caf[eé]\s{1,3}(\S{1,8})", group=1)
    line = compile_detector("line", r"(?m)^ERR-\d{3}$")  # anchors depend on the neighbours
    return MaskPlan.compile(
        [{"detectors": [*BUILTIN_DETECTORS, "emp", "name", "line"], "style": style}],
        {"emp": emp, "name": name, "line": line},
        key=KEY,
    )


PLANS = {style: full_plan(style) for style in ("redact", "partial", "hash", "preserve-length")}


def stream_chunks(plan: MaskPlan, chunks: list[bytes]) -> tuple[bytes, Counter[str]]:
    stream = plan.stream()
    out = [stream.feed(c) for c in chunks]
    out.append(stream.close())
    return b"".join(out), stream.counts


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
    style=st.sampled_from(sorted(PLANS)),
)
def test_chunked_equals_whole(parts: list[bytes], cuts: list[int], style: str) -> None:
    plan = PLANS[style]
    data = b"".join(parts)
    whole, counts = plan.mask_bytes(data)
    chunked, chunk_counts = stream_chunks(plan, split(data, cuts))
    assert chunked == whole
    assert chunk_counts == counts


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_chunked_equals_whole_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    plan = PLANS["redact"]
    assert stream_chunks(plan, split(data, cuts)) == plan.mask_bytes(data)


def test_every_split_point_of_each_secret() -> None:
    plan = PLANS["hash"]
    for frag in FRAGMENTS:
        data = b"x " + frag + b" y"
        whole = plan.mask_bytes(data)
        for i in range(len(data) + 1):
            assert stream_chunks(plan, [data[:i], data[i:]]) == whole, (frag, i)


@pytest.mark.parametrize("style", sorted(PLANS))
def test_values_glued_together_at_every_split_point(style: str) -> None:
    # A card right after an e-mail address ("...example.com4111 ...") starts with one byte of left
    # context on the address's last byte: a chunk boundary right after the address used to lose it.
    plan = PLANS[style]
    for first in (b"john.doe@example.com", b"a@b.co", b"10.0.0.1", b"password=hunter2"):
        for second in FRAGMENTS:
            data = b"x " + first + second + b" y" + b"." * 160
            whole = plan.mask_bytes(data)
            for i in range(len(data) + 1):
                assert stream_chunks(plan, [data[:i], data[i:]]) == whole, (first, second, i)


def test_byte_at_a_time() -> None:
    plan = PLANS["preserve-length"]
    data = b" | ".join(FRAGMENTS) * 3
    whole = plan.mask_bytes(data)
    assert stream_chunks(plan, [data[i : i + 1] for i in range(len(data))]) == whole


def test_multibyte_character_split_across_chunks() -> None:
    plan = PLANS["preserve-length"]
    data = "Café  Zoë! and café  日本語x".encode()
    whole, counts = plan.mask_bytes(data)
    assert counts == {"name": 2}
    assert len(whole) == len(data)
    whole.decode("utf-8")
    for i in range(len(data) + 1):
        assert stream_chunks(plan, [data[:i], data[i:]]) == (whole, counts)


def test_value_run_cut_inside_a_multibyte_character() -> None:
    # the secret's value runs on over "naïve"; a chunk boundary between the two bytes of "ï"
    # must not end the value early
    plan = PLANS["redact"]
    data = ("password=" + "h" * 200 + "-naïve café").encode()
    whole = plan.mask_bytes(data)
    assert whole[0] == b"password=[REDACTED:conninfo_password] caf\xc3\xa9"
    for i in range(len(data) + 1):
        assert stream_chunks(plan, [data[:i], data[i:]]) == whole, i


@pytest.mark.parametrize("detector", ["conninfo_password", "secret_assignment"])
def test_value_run_cut_after_a_brace_it_may_take(detector: str) -> None:
    # a } is part of an unquoted value when a character other than white space, a comma or } follows it: a
    # chunk that ends on it cannot tell yet (also far past where the detector's pattern matched)
    plan = MaskPlan.compile([{"detectors": [detector]}])
    data = b"{password=" + b"a" * 300 + b"}b}cd} password=e} x"
    whole = plan.mask_bytes(data)
    assert whole[0] == f"{{password=[REDACTED:{detector}]}} password=[REDACTED:{detector}]}} x".encode()
    for i in range(len(data) + 1):
        assert stream_chunks(plan, [data[:i], data[i:]]) == whole, i


def test_pem_block_held_until_complete() -> None:
    plan = MaskPlan.compile([{"detectors": ["private_key"]}])
    stream = plan.stream()
    head, tail = PEM[:60], PEM[60:]
    out = stream.feed(b"before\n" + head + b"\n" * 200)  # far more than the plain hold-back
    assert b"BEGIN" not in out and b"MIIE" not in out
    out += stream.feed(tail + b"\nafter" + b" " * 300)
    out += stream.close()
    assert out == b"before\n[REDACTED:private_key]\nafter" + b" " * 300


def test_flush_and_close() -> None:
    plan = MaskPlan.compile([{"detectors": ["card"]}])
    stream = plan.stream()
    assert stream.feed(b"card 4111111111111111") == b""  # could still grow
    assert stream.pending > 0
    assert stream.flush() == b"card [REDACTED:card]"
    assert stream.pending == 0
    assert stream.feed(b" x") == b""
    assert stream.close() == b" x"
    assert stream.close() == b""
    with pytest.raises(MaskingError, match="closed"):
        stream.feed(b"more")
    with pytest.raises(MaskingError, match="closed"):
        stream.flush()
    assert stream.counts == {"card": 1}


def test_flush_lines_keeps_the_line_being_written() -> None:
    plan = MaskPlan.compile([{"detectors": ["card"]}])
    stream = plan.stream()
    out = stream.feed(b"a 4111111111111111\ncard 4111 1111 ")
    assert out + stream.flush_lines() == b"a [REDACTED:card]\n"
    assert stream.flush_lines() == b""  # no newline left: nothing more until the line goes on
    assert stream.pending == len(b"card 4111 1111 ")
    out = stream.feed(b"1111 1111 end")
    assert out + stream.close() == b"card [REDACTED:card] end"
    assert stream.counts == {"card": 2}
    with pytest.raises(MaskingError, match="closed"):
        stream.flush_lines()


def _mixed_lines(seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(8000):
        secret = rng.choice(FRAGMENTS[:24]).decode("utf-8", "replace") if i % 10 == 0 else ""
        lines.append(
            f'10.{i % 256}.0.{i % 200} - - [28/Nov/2025:15:{i % 60:02d}:00] "GET /api/v1/items/{i} HTTP/1.1" '
            f'200 {rng.randint(100, 9999)} {{"id": {i}, "note": "ok {secret}", "user": "u{i}"}}\n'
        )
    return "".join(lines).encode()


def _generate(total: int, chunk: int) -> Iterator[bytes]:
    """`total` bytes of realistic mixed text, made on the fly from a 1 MiB sample."""
    sample = _mixed_lines(3)
    offset = 0
    produced = 0
    while produced < total:
        if offset + chunk > len(sample):
            offset = (offset * 7 + 13) % (len(sample) // 2)
        piece = sample[offset : offset + min(chunk, total - produced)]
        offset += len(piece)
        produced += len(piece)
        yield piece


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


def test_memory_flat_over_100_mb() -> None:
    """100 MiB through one stream in 64 KiB chunks: the process does not grow."""
    plan = PLANS["redact"]
    stream = plan.stream()
    chunk = 65536
    gen = _generate(100 << 20, chunk)
    stream.feed(next(gen))  # build the sample and warm up before measuring
    start = peak = _rss()
    out_bytes = 0
    for i, piece in enumerate(gen):
        out_bytes += len(stream.feed(piece))
        assert stream.pending <= plan.max_hold_back + chunk
        if i % 64 == 0:
            peak = max(peak, _rss())
    out_bytes += len(stream.close())
    assert peak - start < 16 << 20, f"RSS grew by {(peak - start) >> 20} MiB"
    assert sum(stream.counts.values()) > 10_000
    assert out_bytes > 98 << 20


def test_traced_allocations_stay_under_a_mebibyte() -> None:
    """The same with every allocation traced, over 16 MiB: the peak stays under 1 MiB."""
    plan = PLANS["redact"]
    stream = plan.stream()
    gen = _generate(16 << 20, 65536)
    stream.feed(next(gen))
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for piece in gen:
            stream.feed(piece)
        stream.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 1 << 20, f"peak {peak - base} bytes"
