"""Masking throughput: all built-in detectors over mixed realistic text, re2 against Python's re.

Run: ``python bench/bench_masking.py [--mb 100] [--baseline-mb 4]``

The data is generated (seeded) as a mix of web-server logs, JSON API lines and CSV rows in
which a small share of the values are cards, e-mails, SSNs, IBANs, phone numbers and tokens.
Three measurements run in the same process:

- ``mask_bytes``: one call per 1 MiB block;
- ``stream``: data fed to a StreamMasker in 64 KiB chunks as it is produced, then again under
  tracemalloc to show that memory stays flat;
- ``python re``: the identical scanner (same patterns, validators, styles) with Python's
  ``re`` in place of re2, on a smaller slice of the same data (it is far slower), and re2 on
  that same slice for the ratio.

Times are CPU time of the process (one thread, so one core). The script prints MB/s and the
ratios; it asserts nothing.
"""

import argparse
import random
import re
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))

from lictor.masking import BUILTIN_DETECTORS, MaskPlan, _plan, _scan

MiB = 1 << 20

# CPU time of this process: on a machine shared with other work, wall-clock time would also
# count the time spent waiting for a core. The masking runs on one thread, so this is one core.
clock = time.process_time

CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "340000000000009", "6011000000000004"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606"]
TOKENS = [
    "ghp_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6",
    "xoxb-123456789012-abcdefABCDEF123",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
PATHS = ["/api/v1/orders", "/api/v1/users/42", "/healthz", "/static/app.js", "/login", "/api/v2/search?q=shoes"]
WORDS = (
    "the order was shipped to customer after payment confirmation and the warehouse "
    "reported stock levels normal for region eu-west with latency within budget"
).split()


def _sensitive(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(CARDS)
    if kind == 1:
        return f"{rng.choice(NAMES)}.{rng.choice(NAMES)}@example.com"
    if kind == 2:
        return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    if kind == 3:
        return rng.choice(IBANS)
    if kind == 4:
        return f"+1 415 {rng.randint(200, 999)} {rng.randint(1000, 9999)}"
    if kind == 5:
        return rng.choice(TOKENS)
    return f"password={rng.choice(NAMES)}{rng.randint(1000, 9999)}!"


def _line(rng: random.Random, sensitive_rate: float) -> str:
    kind = rng.randrange(3)
    secret = _sensitive(rng) if rng.random() < sensitive_rate else ""
    if kind == 0:  # access log
        ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" if rng.random() < 0.3 else "-"
        return (
            f'{ip} - - [28/Nov/2025:15:{rng.randint(10, 59)}:{rng.randint(10, 59)} +0000] "GET '
            f'{rng.choice(PATHS)} HTTP/1.1" {rng.choice([200, 200, 200, 304, 404, 500])} {rng.randint(100, 99999)} '
            f'"-" "Mozilla/5.0 (X11; Linux x86_64)" rt={rng.random():.3f} req={rng.getrandbits(64):016x} {secret}\n'
        )
    if kind == 1:  # JSON API line
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        return (
            f'{{"id": {rng.randint(1, 10**9)}, "user": "{rng.choice(NAMES)}", "status": "ok", '
            f'"amount": {rng.random() * 1000:.2f}, "note": "{words} {secret}", "tags": ["a", "b"]}}\n'
        )
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    return f"{rng.randint(1, 10**6)},{rng.choice(NAMES)},{words},{rng.randint(0, 500)},{secret}\n"


class Corpus:
    """A seeded sample of mixed lines; ``blocks`` slices it at random offsets (cheap to make)."""

    def __init__(self, seed: int = 7, sensitive_rate: float = 0.1) -> None:
        self.rng = random.Random(seed)
        self.sample = "".join(_line(self.rng, sensitive_rate) for _ in range(20000)).encode()

    def blocks(self, total: int, block: int = MiB) -> Iterator[bytes]:
        """Yield ``total`` bytes in blocks of ``block`` bytes."""
        produced = 0
        while produced < total:
            start = self.rng.randrange(0, len(self.sample) // 2)
            chunk = self.sample[start : start + min(block, total - produced)]
            produced += len(chunk)
            yield chunk


def _python_re_matcher(pattern: str, captures: bool = True) -> Any:
    """Same contract as _scan._matcher, implemented with Python's re."""
    compiled = re.compile(pattern.replace(r"\z", r"\Z").encode())
    groups = compiled.groups
    none = [(-1, -1)] * (groups + 1)

    def match(anchor: Any, text: bytes, pos: int, endpos: int) -> list[tuple[int, int]]:
        m = (compiled.match if anchor == _scan.ANCHOR_START else compiled.search)(text, pos, endpos)
        if m is None:
            return none
        return [m.span(g) for g in range(groups + 1)]

    return match


class _PythonReSet:
    """Same contract as the re2.Set the scanner uses: which patterns match at the start."""

    def __init__(self, patterns: list[str], prefix: str) -> None:
        prefix = "(?s:.)" if prefix else ""
        self.compiled = [re.compile(f"{prefix}(?:{p})".encode()) for p in patterns]

    def Match(self, text: bytes) -> list[int]:
        return [i for i, c in enumerate(self.compiled) if c.match(text)]


def measure(plan: MaskPlan, blocks: list[bytes], repeat: int = 1) -> tuple[float, Counter[str]]:
    """Best time of ``repeat`` passes of ``mask_bytes`` over ``blocks``, and the counts."""
    best = float("inf")
    counts: Counter[str] = Counter()
    for _ in range(repeat):
        counts = Counter()
        t0 = clock()
        for b in blocks:
            _, c = plan.mask_bytes(b)
            counts.update(c)
        best = min(best, clock() - t0)
    return best, counts


def stream_through(plan: MaskPlan, corpus: Corpus, total: int, chunk: int) -> tuple[float, int]:
    stream = plan.stream()
    out = 0
    t0 = clock()
    for block in corpus.blocks(total, block=chunk):
        out += len(stream.feed(block))
    out += len(stream.close())
    return clock() - t0, out


WORST_CASES = {
    "random bytes": lambda n: random.Random(1).randbytes(n),
    "base64": lambda n: __import__("base64").b64encode(random.Random(2).randbytes(n * 3 // 4)),
    "digits, spaces and dashes": lambda n: bytes(random.Random(3).choices(b"0123456789 -", k=n)),
    "card-shaped, Luhn fails": lambda n: b"4111 1111 1111 1112 " * (n // 20),
    "e-mail-shaped, bad TLD": lambda n: b"a@b." * (n // 4),
    "JWT-shaped, no dots": lambda n: b"eyJaaaaaaaa-" * (n // 12),
    "PEM BEGIN lines only": lambda n: b"-----BEGIN RSA PRIVATE KEY-----\n" * (n // 32),
}


def worst_cases(plan: MaskPlan, size: int) -> None:
    """Inputs crafted to put a candidate every few bytes: each costs a check in Python."""
    for name, make in WORST_CASES.items():
        data = make(size)
        t0 = clock()
        plan.mask_bytes(data)
        dt = clock() - t0
        print(f"  {name:26s}: {len(data) / dt / 1e6:7.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="MiB of data for re2 (default 100)")
    ap.add_argument("--baseline-mb", type=int, default=4, help="MiB of data for Python re (default 4)")
    ap.add_argument("--traced-mb", type=int, default=20, help="MiB streamed under tracemalloc (default 20)")
    ap.add_argument("--worst", action="store_true", help="also time crafted worst-case inputs (1 MiB each)")
    args = ap.parse_args()

    specs = [{"detectors": list(BUILTIN_DETECTORS)}]
    key = b"bench-key-0123456789abcdef"
    plan = MaskPlan.compile(specs, key=key)
    corpus = Corpus()
    total = args.mb * MiB
    print(f"all {len(BUILTIN_DETECTORS)} built-in detectors, one core (CPU time), Python {sys.version.split()[0]}")

    # 1. mask_bytes, 1 MiB per call; a 16 MiB set of blocks is made up front and passed over
    #    until `total` bytes are masked, best of 3 runs.
    blocks = list(corpus.blocks(min(total, 16 * MiB)))
    passes = max(1, total // sum(map(len, blocks)))
    t, counts = measure(plan, blocks * passes, repeat=3)
    nbytes = passes * sum(map(len, blocks))
    re2_rate = nbytes / t / 1e6
    found = sum(counts.values())
    print(f"re2 mask_bytes  : {nbytes / 1e6:7.1f} MB in {t:6.2f} s = {re2_rate:6.1f} MB/s")
    print(f"  {found / (nbytes / 1e6):.0f} masked values per MB: {dict(counts.most_common())}")

    # 2. stream in 64 KiB chunks, data produced on the fly
    dt, _ = stream_through(plan, corpus, total, 65536)
    print(f"re2 stream      : {total / 1e6:7.1f} MB in {dt:6.2f} s = {total / dt / 1e6:6.1f} MB/s (64 KiB chunks)")

    # 3. memory stays flat: peak of traced allocations while streaming
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    stream_through(plan, corpus, args.traced_mb * MiB, 65536)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"stream memory   : peak {(peak - base) / 1024:.0f} KiB above start while streaming "
        f"{args.traced_mb} MiB (tracemalloc; one chunk is 64 KiB)"
    )

    # 4. Python re doing the same job: the same scanner with re in place of re2
    original = _scan._matcher, _scan._set
    _scan._matcher, _scan._set = _python_re_matcher, _PythonReSet
    _plan._scanner.cache_clear()  # compiled scanners are shared between plans
    try:
        baseline = MaskPlan.compile(specs, key=key)
    finally:
        _scan._matcher, _scan._set = original
        _plan._scanner.cache_clear()
    small = list(corpus.blocks(args.baseline_mb * MiB))
    t_re, c_re = measure(baseline, small)
    t_re2, c_re2 = measure(plan, small, repeat=3)
    size = sum(map(len, small)) / 1e6
    print(f"python re       : {size:7.1f} MB in {t_re:6.2f} s = {size / t_re:6.1f} MB/s")
    print(f"re2, same slice : {size / t_re2:6.1f} MB/s; same masked values: {c_re == c_re2}")
    print(f"ratio re2 / re  : {t_re / t_re2:.1f}x on the same slice")

    if args.worst:
        print("worst cases (re2):")
        worst_cases(plan, MiB)


if __name__ == "__main__":
    main()
