"""Every example's rule packs, as shipped: `lictor check` finds nothing and their own policy tests pass,
exercising every rule.

The examples are what security teams copy; a change to a pack (or to the policy engine) that breaks one of
their tests must fail here, not in a reader's terminal."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT, lictor

EXAMPLES = ROOT / "examples"

# How each example's packs are loaded. A config is named where the packs need it: the Redis addon it loads,
# the quickstart's baseline packs; the others' configs name targets through environment variables.
ARGS: dict[str, tuple[str, ...]] = {
    "http": ("examples/http/rulepacks",),
    "kubernetes": ("examples/kubernetes/rulepacks",),
    "postgres": ("examples/postgres/rulepacks",),
    "quickstart": ("-c", "examples/quickstart/lictor.yaml"),
    "redis": ("-c", "examples/redis/lictor.yaml", "examples/redis/rulepacks"),
    "ssh": ("examples/ssh/rulepacks",),
}


def test_every_example_with_rule_packs_is_tested_here() -> None:
    assert set(ARGS) == {p.parent.name for p in EXAMPLES.glob("*/rulepacks")}


@pytest.mark.parametrize("example", sorted(ARGS))
def test_example_packs_check_clean_and_pass_their_tests(example: str) -> None:
    checked = lictor("check", "--strict", *ARGS[example], cwd=ROOT, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = lictor("test", *ARGS[example], cwd=ROOT, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    summary = re.search(r"^(\d+) passed, (\d+) failed$", tested.stdout, re.M)
    assert summary and int(summary.group(1)) >= 5 and summary.group(2) == "0", tested.stdout
    assert re.search(r"^coverage: (\d+)/\1 rules exercised \(100%\)$", tested.stdout, re.M), tested.stdout
