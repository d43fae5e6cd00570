"""Median decision time for 10, 1,000 and 10,000 rules (goal: under 50 µs at 10,000).

Run: .venv/bin/python bench/bench_policy.py

The rules are PostgreSQL rules over distinct tables and statement kinds, all held by the one
identity being decided for (the worst case: no role filtering helps). Requests mix allowed,
denied-by-rule and default-denied statements. A linear scan over every rule is measured in the
same run as the baseline, and printed as a ratio.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lictor import Identity, Request, load_policy
from lictor.addons import AddonManager
from lictor_addons import default_addons

KINDS = ["select", "insert", "update", "delete", "truncate", "copy_to"]


def pack(n: int) -> str:
    lines = [
        "format: lictor/v1",
        "metadata: {name: bench}",
        "identities: [{match: {claims: {team: data}}, roles: [r]}]",
        "roles:",
        "  r:",
        "    rules:",
    ]
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        action = "deny" if i % 7 == 0 else "allow"
        lines.append(
            f"      - {{id: rule-{i}, protocol: postgres, when: {{statements: [{kind}], "
            f"tables: [app.t{i}], functions: ['f{i % 97}*']}}, unless: {{where: false}}, action: {action}}}"
        )
    lines.append(
        "      - {id: any-select, protocol: postgres, when: {statements: select, tables: ['reports.*']}, action: allow}"
    )
    return "\n".join(lines) + "\n"


def requests(n: int, count: int) -> list[Request]:
    rnd = random.Random(7)
    out = []
    for _ in range(count):
        i = rnd.randrange(n * 2)  # half of them hit no rule: default deny
        kind = KINDS[i % len(KINDS)]
        out.append(
            Request(
                "postgres",
                kind,
                {
                    "kinds": frozenset({kind}),
                    "tables": frozenset({f"app.t{i}", "reports.daily"}),
                    "functions": frozenset({f"f{i % 97}x"}),
                    "has_where": True,
                },
                summary=f"{kind} app.t{i}",
            )
        )
    return out


def linear_scan(policy, identity, request):  # the naive engine, for the ratio
    roles = policy.roles_for(identity)
    matched = [r for role in roles for r in policy.roles[role].rules if r.evaluate(request)[0]]
    return matched


def main() -> int:
    m = AddonManager()
    m.add(*default_addons())
    identity = Identity("bench", {"team": "data"})
    print(f"{'rules':>7} {'median µs':>10} {'p99 µs':>8} {'linear scan µs':>15} {'speed-up':>9}")
    worst = 0.0
    for n in (10, 1_000, 10_000):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "p.yaml").write_text(pack(n))
            t0 = time.perf_counter()
            result = load_policy([d], m.vocabularies)
            load_s = time.perf_counter() - t0
        policy = result.policy
        assert policy is not None, result.errors
        reqs = requests(n, 5000)
        roles = policy.roles_for(identity)
        samples = []
        for r in reqs:
            t = time.perf_counter_ns()
            policy.decide(identity, r, roles=roles)
            samples.append((time.perf_counter_ns() - t) / 1000)
        scan = []
        for r in reqs[:200]:
            t = time.perf_counter_ns()
            linear_scan(policy, identity, r)
            scan.append((time.perf_counter_ns() - t) / 1000)
        med = statistics.median(samples)
        p99 = sorted(samples)[int(len(samples) * 0.99)]
        smed = statistics.median(scan)
        worst = max(worst, med)
        print(f"{n:>7} {med:>10.1f} {p99:>8.1f} {smed:>15.1f} {smed / med:>8.0f}x   (compile {load_s:.2f}s)")
    print(f"goal: median under 50 µs at 10,000 rules -> {'met' if worst < 50 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
