"""pgjdbc (Java) and node-postgres through a real gateway with the example rule pack: the drivers of agents
written in Java and JavaScript, run as they are (``java``, ``node``), against the example's roles.

The Java program (tests/drivers/PgJdbc.java) is compiled with javac into a temporary directory against the
Debian package's driver (scripts/ensure-system.sh installs libpostgresql-jdbc-java); node-postgres is
installed with npm once, into .venv/node-pg. Shares the database and gateway setup of test_pg_e2e (its
module fixture ``env``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require
from tests.test_pg_e2e import PgEnv, env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)

PGJDBC_JAR = Path("/usr/share/java/postgresql.jar")
DRIVERS = Path(__file__).resolve().parent / "drivers"
NODE_PG = ROOT / ".venv" / "node-pg"
NODE_PG_VERSION = "8"


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("java", "javac"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (scripts/ensure-system.sh)")
    require(PGJDBC_JAR.exists(), f"pgjdbc is not installed at {PGJDBC_JAR} (scripts/ensure-system.sh)")
    out = tmp_path_factory.mktemp("pgjdbc")
    proc = subprocess.run(
        ["javac", "-d", str(out), "-cp", str(PGJDBC_JAR), str(DRIVERS / "PgJdbc.java")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def node_pg() -> Path:
    """A directory whose node_modules holds node-postgres (installed with npm on first use)."""
    for tool in ("node", "npm"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (scripts/ensure-system.sh)")
    if not (NODE_PG / "node_modules" / "pg" / "package.json").exists():
        staging = NODE_PG.with_name(f"node-pg.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        proc = subprocess.run(
            ["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund", f"pg@{NODE_PG_VERSION}"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        require(proc.returncode == 0, f"npm install pg failed: {proc.stderr[-2000:]}")
        shutil.rmtree(NODE_PG, ignore_errors=True)
        staging.rename(NODE_PG)
    return NODE_PG


@pytest.fixture(scope="module")
def profiles(env: PgEnv) -> Iterator[None]:  # noqa: F811
    # a card in a bigint, a point and a box: pgjdbc reads int8, point and box in binary once it prepares
    env.direct(
        "CREATE TABLE jdbc_profiles (id int PRIMARY KEY, email text, card text, cardnum bigint, seen timestamptz, "
        "p point, b box); INSERT INTO jdbc_profiles VALUES (1, 'ann@example.com', '4111111111111111', "
        "4111111111111111, '2024-01-01Z', point(4111111111111111, 0), box(point(0, 0), point(1, 4111111111111111))), "
        "(2, NULL, NULL, 7, NULL, point(1.5, 2e20), box(point(0, 0), point(1, 2)))"
    )
    yield
    env.direct("DROP TABLE jdbc_profiles")


def jdbc(env: PgEnv, classes: Path, role: str, scenario: str, options: str = "sslmode=disable") -> dict[str, str]:  # noqa: F811
    proc = subprocess.run(
        [
            "java",
            "-Duser.timezone=UTC",
            "-cp",
            f"{classes}:{PGJDBC_JAR}",
            "PgJdbc",
            str(env.port),
            env.tokens[role],
            scenario,
            options,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


MASKED = "[REDACTED:email]|************1111"


def test_pgjdbc_defaults_prepared_and_binary(env: PgEnv, jdbc_classes: Path, profiles: None) -> None:  # noqa: F811
    out = jdbc(env, jdbc_classes, "readonly", "prepared")
    # every execution masked, before and after pgjdbc switches to a named server-side statement (binary int8,
    # int4 and timestamptz results): the card held in a bigint comes back NULL
    for i in range(1, 8):
        assert out[f"row{i}"] == f"1|{MASKED}|null|2024-01-01 00:00:00+00", out
    assert out["server_prepared1"] == "false" and out["server_prepared7"] == "true", out
    assert out["update"].startswith("42501 ERROR: lictor: UPDATE") and "pg-ro-no-writes" in out["update"], out
    assert out["after"] == "10", out


def test_pgjdbc_binary_geometric_values_of_a_masked_result(env: PgEnv, jdbc_classes: Path, profiles: None) -> None:  # noqa: F811
    out = jdbc(env, jdbc_classes, "readonly", "binary")
    # a point or box holding a card number comes back NULL, in text and in binary; other values as they are
    assert out["server_prepared"] == "true", out
    for i in range(1, 8):
        assert out[f"row{i}_1"] == "null|null", out
        assert out[f"row{i}_2"] == "(1.5,2.0E20)|(1.0,2.0),(0.0,0.0)", out


def test_pgjdbc_simple_query_mode_over_tls(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    out = jdbc(env, jdbc_classes, "readonly", "simple", "sslmode=require&preferQueryMode=simple")
    assert all(out[f"row{i}"] == "2|[REDACTED:email]|****-******-*0009" for i in range(1, 7)), out
    assert out["delete"].startswith("42501 ERROR: lictor: DELETE") and "pg-ro-no-writes" in out["delete"], out
    assert out["after"] == "20|é", out


def test_pgjdbc_transaction_with_text_literals_a_denial_and_rollback(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    out = jdbc(env, jdbc_classes, "readonly", "transaction", "sslmode=require")
    # pgjdbc sends BEGIN and the first statement without a Sync between: a non-ASCII character or backslash in
    # that statement is read with the settings of the last ReadyForQuery, which BEGIN cannot change
    assert out["literal"] == "é|a\\b|[REDACTED:email]", out
    assert out["update"].startswith("42501 ERROR: lictor: UPDATE"), out
    assert out["aborted"] == "25P02", out
    assert out["after"] == "10" and out["param"] == "[REDACTED:email]|ü", out
    assert env.direct("SELECT count(*) FROM accounts WHERE balance = 100 AND id <= 10") == [(10,)]


def test_pgjdbc_text_literal_after_a_statement_evicted_from_its_cache(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    options = "sslmode=disable&preparedStatementCacheQueries=1&socketTimeout=10"
    out = jdbc(env, jdbc_classes, "readonly", "evicted", options)
    assert out["email6"] == "[REDACTED:email]" and out["card6"] == "****-******-*0009", out
    assert out["literal"] == "é", out


def test_pgjdbc_fetch_size_cursor_and_metadata_over_verified_tls(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    out = jdbc(env, jdbc_classes, "readonly", "fetch")
    assert out["rows"] == "20", out
    for i in range(1, 21):
        _, email, card = out[f"row{i}"].split("|")
        assert email == "[REDACTED:email]" and card[-4:].isdigit() and card.count("*") >= 8, out
    ca = env.gateway.state_dir / "tls" / "postgres" / "ca.pem"  # type: ignore[union-attr]
    out = jdbc(env, jdbc_classes, "readonly", "metadata", f"sslmode=verify-full&sslrootcert={ca}")
    assert {"accounts", "customers", "orders"} <= set(out["tables"].split(",")), out
    assert out["columns"] == "id:int4,name:text,email:text,card:text,note:text,", out
    assert out["keys"] == "id" and out["version"] == "15", out


def test_pgjdbc_batches_for_a_writer(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    try:
        out = jdbc(env, jdbc_classes, "writer", "batch")
        count = env.direct("SELECT count(*) FROM accounts WHERE id >= 7000")
    finally:
        env.direct("DELETE FROM accounts WHERE id >= 7000")
    assert out["batch"] == "200" and out["email"] == "user1@example.com", out
    # a denied entry stops the batch: nothing of it reaches the server
    assert out["denied_batch"].startswith("42501 Batch entry 1 DELETE FROM accounts"), out
    assert "pg-write-needs-where" in out["denied_batch"], out
    assert out["after"] == "200" and count == [(200,)], out


def test_pgjdbc_autosave_always_ends_the_connection_with_what_to_do(env: PgEnv, jdbc_classes: Path) -> None:  # noqa: F811
    # its SAVEPOINT is a Query inside an unfinished extended-query batch: after an error there the server skips it,
    # and the gateway could not tell what ran; the error names the setting
    out = jdbc(env, jdbc_classes, "readonly", "autosave", "sslmode=disable&autosave=always")
    assert out["select"].startswith("08P01 FATAL: lictor: protocol violation: a Query inside"), out
    assert "autosave at never or conservative" in out["select"] and out["closed"] == "true", out
    out = jdbc(env, jdbc_classes, "readonly", "autosave", "sslmode=disable&autosave=conservative")
    assert out["select"] == "[REDACTED:email]", out


def test_node_postgres_queries_named_statements_denials_and_masking(env: PgEnv, node_pg: Path) -> None:  # noqa: F811
    ca = env.gateway.state_dir / "tls" / "postgres" / "ca.pem"  # type: ignore[union-attr]
    try:
        proc = subprocess.run(
            ["node", str(DRIVERS / "node_pg.js"), str(env.port), env.tokens["readonly"], env.tokens["writer"], str(ca)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "NODE_PATH": str(node_pg / "node_modules")},
        )
        left = env.direct("SELECT count(*) FROM accounts WHERE id BETWEEN 6000 AND 6001")
    finally:
        env.direct("DELETE FROM accounts WHERE id BETWEEN 6000 AND 6001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["tls"] is True and out["verified"] == "[REDACTED:email]", out
    assert out["simple"] == [
        {"id": 1, "email": "[REDACTED:email]", "card": "**** **** **** 0004"},
        {"id": 2, "email": "[REDACTED:email]", "card": "****-******-*0009"},
    ], out
    assert out["params"] == [{"id": 3, "email": "[REDACTED:email]", "word": "é"}], out
    assert out["named"] == [
        {"email": "[REDACTED:email]", "card": "**** **** **** 0004"},
        {"email": "[REDACTED:email]", "card": "************1111"},
    ], out
    for key in ("denied", "denied_named", "denied_in_tx"):
        assert out[key]["code"] == "42501" and out[key]["message"].startswith("lictor: "), out[key]
        assert "read-only agents cannot change data" in out[key]["message"], out[key]
        assert out[key]["detail"].startswith("Denied by rule pg-ro-no-writes"), out[key]
    assert out["aborted"]["code"] == "25P02", out
    assert out["after"] == {"email": "[REDACTED:email]", "card": "****-******-*0009"}, out
    assert out["inserted"] == [6000, 6001] and out["deleted"] == 2 and left == [(0,)], out
    assert out["writer_email"] == "user1@example.com", out
    assert out["writer_denied"]["code"] == "42501" and "pg-write-needs-where" in out["writer_denied"]["detail"], out
