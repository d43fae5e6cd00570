"""Every example's rule packs, as shipped: `lictor check` finds nothing and their own policy tests pass,
exercising every rule.

The examples are what security teams copy; a change to a pack (or to the policy engine) that breaks one of
their tests must fail here, not in a reader's terminal."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LICTOR, ROOT, free_port, lictor, require, require_binary, wait_until

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


def test_quickstart_reads_pgsslmode_as_libpq_does(tmp_path: Path) -> None:
    # The quickstart fronts "the server named by libpq's PG* variables", but read PGSSLMODE nowhere: with
    # PGSSLMODE=require it logged in to a server without TLS in plaintext, where libpq would have refused.
    import psycopg

    psql = require_binary("psql")
    ssl = None
    with contextlib.suppress(psycopg.OperationalError):
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=5) as conn:
            ssl = conn.execute("SHOW ssl").fetchone()
    require(ssl is not None, "PostgreSQL at 127.0.0.1:5432 (user postgres, trust) is not reachable")
    if not ssl or ssl[0] != "off":
        pytest.skip("the PostgreSQL at 127.0.0.1:5432 has TLS on: nothing for PGSSLMODE=require to refuse")
    port = free_port()
    env = {
        **os.environ,
        "LICTOR_STATE_DIR": str(tmp_path / "state"),
        "LICTOR_PG_PORT": str(port),
        "PGHOST": "127.0.0.1",
        "PGPORT": "5432",
        "PGUSER": "postgres",
        "PGDATABASE": "postgres",
        "PGSSLMODE": "require",
    }
    config = str(EXAMPLES / "quickstart" / "lictor.yaml")
    ready = tmp_path / "ready"
    with (tmp_path / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [LICTOR, "run", "-c", config, "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(ready.exists, 30, "the quickstart gateway to listen")
        token = lictor("token", "issue", "-c", config, "--sub", "agent-1", "--claim", "access=read", env=env)
        agent_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        out = subprocess.run(
            [psql, f"host=127.0.0.1 port={port} dbname=postgres user=agent-1 sslmode=disable", "-Atc", "select 1"],
            env={**agent_env, "PGPASSWORD": token.stdout.strip(), "PGCONNECT_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
    assert out.returncode != 0, out.stdout
    assert "cannot connect to target 'main'" in out.stderr, out.stderr
    assert "the target refused TLS but sslmode is require" in (tmp_path / "gateway.log").read_text()


def test_the_postgres_example_documents_every_variable_its_config_reads() -> None:
    # A reader whose port 6432 is taken (a pgbouncer) must find the override in the example's README.
    config = (EXAMPLES / "postgres" / "lictor.yaml").read_text()
    readme = (EXAMPLES / "postgres" / "README.md").read_text()
    variables = set(re.findall(r"\$\{([A-Z_]+)", config))
    assert {"LICTOR_PG_PORT", "PGHOST"} <= variables
    assert not {v for v in variables if v not in readme}
