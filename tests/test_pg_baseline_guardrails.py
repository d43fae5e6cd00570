"""rulepacks/baseline-postgres.yaml beside a pack that allows an agent every statement, through a real ``lictor run``
gateway in front of a throwaway cluster (tests/pgcluster.py) that the tests may change: the baseline alone holds
its guardrails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, GatewayProcess, free_port
from tests.pgcluster import PgCluster, running_cluster

pytestmark = pytest.mark.timeout(120)

ALLOW_ALL = """
format: lictor/v1
metadata: {name: allow-all, description: every statement for the tests' agent, owner: tests}
identities:
  - id: everyone
    match: {sub: "*"}
    roles: [everything]
roles:
  everything:
    rules:
      - id: allow-all
        protocol: postgres
        when: {statements: "*"}
        action: allow
"""


class Env:
    def __init__(self, cluster: PgCluster, port: int, token: str) -> None:
        self.cluster = cluster
        self.port = port
        self.token = token

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="agent",
            dbname="app",
            password=self.token,
            sslmode="disable",
            connect_timeout=5,
            autocommit=True,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work: Path = tmp_path_factory.mktemp("pg-baseline")
    (work / "allow-all.yaml").write_text(ALLOW_ALL)
    with running_cluster() as cluster:
        cluster.execute("CREATE DATABASE app")
        port = free_port()
        config = {
            "version": 1,
            "state_dir": str(work / "state"),
            "identity": {"issuers": [{"type": "lictor"}]},
            "rulepacks": [str(ROOT / "rulepacks" / "baseline-postgres.yaml"), str(work / "allow-all.yaml")],
            "targets": {
                "app": {
                    "protocol": "postgres",
                    "listen": f"127.0.0.1:{port}",
                    "upstream": {
                        "host": cluster.host,
                        "port": cluster.port,
                        "user": "postgres",  # a superuser login: what the guardrails are for
                        "database": "app",
                        "sslmode": "disable",
                    },
                }
            },
        }
        gateway = GatewayProcess(work, config).start()
        try:
            yield Env(cluster, port, gateway.token("agent"))
        finally:
            gateway.stop()


def test_no_server_file_is_read_through_pg_read_file_old(env: Env) -> None:
    # PostgreSQL 11 to 15 keep the function behind adminpack 1.0's pg_file_read as a built-in of its own
    import psycopg

    if env.cluster.execute("SELECT count(*) FROM pg_proc WHERE proname = 'pg_read_file_old'") == [(0,)]:
        pytest.skip("this PostgreSQL has no pg_read_file_old")
    with env.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT pg_read_file_old('PG_VERSION', 0, 100)").fetchall()
        assert "pg-deny-server-files" in str(info.value.diag.message_detail), info.value
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_function_is_renamed_past_the_guardrails_through_the_catalog(env: Env) -> None:
    # pg_read_file renamed in pg_proc (directly, through an updatable view, or through a table an ON SELECT rule
    # made a view) would be called under its new name: the function rules go by name
    import psycopg

    with env.connect() as conn:
        conn.execute("CREATE TABLE procs (LIKE pg_catalog.pg_proc)")
        try:
            writes, views = "pg-write-no-catalogs", "pg-no-views-over-catalogs"
            for sql, rule in (
                ("UPDATE pg_catalog.pg_proc SET proname = 'innocent' WHERE proname = 'pg_read_file'", writes),
                ("UPDATE pg_proc SET prosrc = 'pg_read_file_all' WHERE proname = 'md5'", writes),
                ("CREATE VIEW procs_view AS SELECT * FROM pg_catalog.pg_proc", views),
                ('CREATE RULE "_RETURN" AS ON SELECT TO procs DO INSTEAD SELECT * FROM pg_proc', views),
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert rule in str(info.value.diag.message_detail), (sql, info.value)
        finally:
            conn.execute("DROP TABLE IF EXISTS procs")
    assert env.cluster.execute("SELECT count(*) FROM pg_proc WHERE proname = 'innocent'", dbname="app") == [(0,)]
    assert env.cluster.execute("SELECT count(*) FROM pg_class WHERE relname = 'procs_view'", dbname="app") == [(0,)]
    assert env.cluster.execute("SELECT prosrc FROM pg_proc WHERE proname = 'md5' LIMIT 1", dbname="app") != [
        ("pg_read_file_all",)
    ]


def test_no_password_hash_is_read_from_the_statistics_toast_table(env: Env) -> None:
    # With a few dozen roles, pg_authid's histogram of password hashes is stored in pg_statistic's TOAST table
    import psycopg

    roles = [f"toasted_{i}" for i in range(40)]
    env.cluster.execute("; ".join(f"CREATE ROLE {r} LOGIN PASSWORD 'pw-{r}'" for r in roles))
    try:
        env.cluster.execute("ANALYZE pg_authid", dbname="app")
        with env.connect() as conn:
            for sql in (
                "SELECT chunk_data FROM pg_toast.pg_toast_2619",
                "SET search_path = pg_toast; SELECT chunk_data FROM pg_toast_2619",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    psycopg.ClientCursor(conn).execute(sql)
                assert "pg-deny-credential-catalogs" in str(info.value.diag.message_detail), (sql, info.value)
    finally:
        env.cluster.execute("; ".join(f"DROP ROLE {r}" for r in roles))


def test_a_user_mapping_password_under_a_quoted_option_name_comes_back_masked(env: Env) -> None:
    # OPTIONS ("user" 'app', "password" '...'), as tools that quote every identifier write it, stays in
    # pg_stat_activity as the idle human session's last statement
    import psycopg

    password = "quoted-" + os.urandom(4).hex()
    env.cluster.execute(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER quoted FOREIGN DATA WRAPPER postgres_fdw",
        dbname="app",
    )
    try:
        with psycopg.connect(
            host=str(env.cluster.socket_dir), port=env.cluster.port, user="postgres", dbname="app", autocommit=True
        ) as human:
            human.execute(
                f"""CREATE USER MAPPING FOR postgres SERVER quoted OPTIONS ("user" 'app', "password" '{password}')"""
            )
            with env.connect() as conn:
                (activity,) = conn.execute(
                    "SELECT query FROM pg_stat_activity WHERE query LIKE '%SERVER quoted%' AND pid <> pg_backend_pid()"
                ).fetchone()
            assert password not in activity and "[REDACTED:sql_password" in activity, activity
    finally:
        env.cluster.execute("DROP SERVER quoted CASCADE", dbname="app")


@pytest.mark.parametrize(
    "spelling",
    [
        "ALTER ROLE {role} PASSWORD'{pw}'",  # no space before the quote: PostgreSQL reads it all the same
        "ALTER ROLE {role} ENCRYPTED PASSWORD'{pw}'",
        "ALTER ROLE {role} PASSWORD\f'{pw}'",  # any white space PostgreSQL skips
        "ALTER ROLE {role} PASSWORD/* set by ops */'{pw}'",  # a comment between the two
        "ALTER ROLE {role} PASSWORD -- set by ops\n '{pw}'",
        "ALTER ROLE {role} PASSWORD E'se\\'{pw}'",  # an escaped quote inside an E'' string
        "ALTER ROLE {role} PASSWORD U&'{pw}'",  # a Unicode-escape string
        "ALTER ROLE {role} PASSWORD/**/$q${pw}$q$",
        """CREATE USER MAPPING FOR postgres SERVER spelled OPTIONS ("password"'{pw}')""",
    ],
)
def test_a_role_password_comes_back_masked_however_it_is_spelled(env: Env, spelling: str) -> None:
    # The password of an idle human session's ALTER ROLE stays in pg_stat_activity as its last statement.
    import psycopg

    role = "spelled_" + os.urandom(3).hex()
    password = "pw" + os.urandom(6).hex()
    env.cluster.execute(f"CREATE ROLE {role}")
    env.cluster.execute(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER IF NOT EXISTS spelled FOREIGN DATA WRAPPER postgres_fdw",
        dbname="app",
    )
    try:
        with psycopg.connect(
            host=str(env.cluster.socket_dir), port=env.cluster.port, user="postgres", dbname="app", autocommit=True
        ) as human:
            human.execute(spelling.format(role=role, pw=password).encode())
            with env.connect() as conn:
                (activity,) = conn.execute(
                    "SELECT query FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                    (f"%{password}%",),
                ).fetchone()
            assert password not in activity and "[REDACTED:sql_password" in activity, activity
    finally:
        env.cluster.execute("DROP SERVER spelled CASCADE", dbname="app")
        env.cluster.execute(f"DROP ROLE {role}")
