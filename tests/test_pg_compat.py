"""Compatibility of standard clients through a real gateway (examples/postgres rule pack): things a
legitimate agent's driver sends on its own, which must work as they do directly against PostgreSQL.

Shares the database and gateway of test_pg_e2e (its module fixture ``env``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lictor_addons.postgres._classify import classify

from tests.test_pg_e2e import PgEnv, env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)


# -- classification (no server) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "leaves"),
    [
        ("SET default_transaction_read_only = on", False),  # psycopg2 set_session(readonly=True), autocommit
        ("SET default_transaction_read_only TO 'on'", False),
        ("SET transaction_read_only = true", False),
        ("RESET ALL", False),  # asyncpg's pool reset; the reset value is the gateway's startup setting
        ("DISCARD ALL", False),
        ("SET default_transaction_read_only = off", True),
        ("SET default_transaction_read_only = 'o'", True),
        ("SET default_transaction_read_only TO DEFAULT", True),
        ("RESET default_transaction_read_only", True),
        ("SET transaction_read_only = 0", True),
        ("SELECT set_config('default_transaction_read_only', 'on', false)", True),
    ],
)
def test_read_only_settings_that_stay_read_only(sql: str, leaves: bool) -> None:
    assert classify(sql)[0].read_write_attempt is leaves


@pytest.mark.parametrize(
    ("sql", "settings"),
    [
        ("SET client_encoding = 'UTF8'", set()),  # pg_dump scripts, pg_restore
        ("SET NAMES 'utf-8'", set()),
        ("SET client_encoding TO unicode", set()),
        ("SET standard_conforming_strings = on", set()),
        ("SET client_encoding = 'LATIN1'", {"client_encoding"}),
        ("SET client_encoding TO DEFAULT", {"client_encoding"}),
        ("SET standard_conforming_strings = off", {"standard_conforming_strings"}),
        ("SET standard_conforming_strings = 'o'", {"standard_conforming_strings"}),
    ],
)
def test_setting_a_fixed_setting_to_its_fixed_value_changes_nothing(sql: str, settings: set[str]) -> None:
    assert set(classify(sql)[0].settings) == settings


# -- through the gateway -------------------------------------------------------------------------------


def test_readonly_driver_resets_keep_the_session_read_only(env: PgEnv) -> None:  # noqa: F811
    import psycopg

    with env.connect("readonly") as conn:
        for sql in ("RESET ALL", "DISCARD ALL", "SET default_transaction_read_only = on"):
            conn.execute(sql)
            assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on", sql
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("SELECT sneaky_write()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET default_transaction_read_only = off")


def test_dump_script_settings_run_through_psql(env: PgEnv, tmp_path) -> None:  # noqa: F811
    script = tmp_path / "dump.sql"
    script.write_text(
        "SET statement_timeout = 0;\n"
        "SET client_encoding = 'UTF8';\n"
        "SET standard_conforming_strings = on;\n"
        "SELECT pg_catalog.set_config('search_path', '', false);\n"
        "SELECT 'restored' AS done;\n"
    )
    proc = env.psql("dba", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restored" in proc.stdout
    proc = env.psql("dba", "-c", "SET client_encoding = 'LATIN1'")
    assert "lictor:" in proc.stderr and "keeps it fixed" in proc.stderr


def test_masked_binary_arrays_and_void_are_masked_not_refused(env: PgEnv) -> None:  # noqa: F811
    # analyst: readonly's masks, and it may compute over columns (ARRAY[...], array_agg), which readonly may not
    with env.connect("analyst") as conn:
        cur = conn.cursor(binary=True)
        row = cur.execute(
            "SELECT ARRAY[email, NULL, 'plain'], ARRAY[4111111111111111::bigint, 7], "
            "ARRAY[ARRAY[card]], pg_sleep(0), ARRAY['customers'::regclass::oid] "
            "FROM customers WHERE id = %s",
            [1],
        ).fetchone()
        assert row is not None
        assert row[0] == ["[REDACTED:email]", None, "plain"], row
        assert row[1] == [None, 7], row
        assert "*" in row[2][0][0] and not row[2][0][0].startswith("5500"), row
        assert row[3] in (None, b"", "") and len(row[4]) == 1, row  # void: as psycopg loads it directly
        assert cur.execute("SELECT array_agg(email ORDER BY id) FROM customers").fetchone()[0][0] == "[REDACTED:email]"


def test_asyncpg_pool_and_introspection_for_a_masked_role(env: PgEnv) -> None:  # noqa: F811
    import asyncpg

    async def main() -> list[object]:
        # analyst: readonly's masks, and it may compute over columns (array_agg, convert_to)
        kw = dict(host="127.0.0.1", port=env.port, database="app", user="agent", password=env.tokens["analyst"])
        pool = await asyncpg.create_pool(min_size=1, max_size=1, ssl=False, **kw)
        out: list[object] = []
        for i in range(3):  # each release sends asyncpg's reset query (..., RESET ALL)
            async with pool.acquire() as conn:
                out.append(await conn.fetchval("SELECT email FROM customers WHERE id = $1", 1))
        async with pool.acquire() as conn:
            out.append(await conn.fetchval("SELECT array_agg(email ORDER BY id) FROM customers"))
            out.append(await conn.fetchval("SELECT pg_sleep(0)"))
            # asyncpg reads bytea in binary: the bytes are masked as the text form's are, and stay a bytea
            out.append(await conn.fetchval("SELECT convert_to(email, 'UTF8') FROM customers WHERE id = 1"))
            out.append(await conn.fetchval("SELECT ARRAY[convert_to(email, 'UTF8'), '\\x00'] FROM customers LIMIT 1"))
            out.append(await conn.fetchval("SELECT convert_to(email, 'UTF8')::text FROM customers WHERE id = 1"))
            # an enum's binary form cannot be told from another type's by its oid: refused, and the refusal says
            # what works
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.fetchval("SELECT mood FROM asyncpg_moods")
            assert "cast the column to text" in str(info.value) and "set_type_codec" in str(info.value), info.value
            await conn.set_type_codec("asyncpg_mood", encoder=str, decoder=str, format="text")
            out.append(await conn.fetchval("SELECT mood FROM asyncpg_moods"))
        await pool.close()
        return out

    env.direct(
        "CREATE TYPE asyncpg_mood AS ENUM ('calm', 'ann@example.com'); "
        "CREATE TABLE asyncpg_moods AS SELECT 'ann@example.com'::asyncpg_mood AS mood"
    )
    try:
        out = asyncio.run(main())
    finally:
        env.direct("DROP TABLE asyncpg_moods; DROP TYPE asyncpg_mood")
    assert out[:3] == ["[REDACTED:email]"] * 3
    assert out[3][0] == "[REDACTED:email]" and out[4] is None
    assert out[5] == b"[REDACTED:email]" and out[6] == [b"[REDACTED:email]", b"\x00"], out[5:7]
    assert "example.com" not in str(out[7]), out[7]
    assert out[8] == "[REDACTED:email]", out[8]


def asyncpg_connect(env: PgEnv, role: str) -> Any:  # noqa: F811
    import asyncpg

    return asyncpg.connect(
        host="127.0.0.1", port=env.port, database="app", user=f"agent-{role}", password=env.tokens[role], ssl=False
    )


def test_asyncpg_prepare_then_a_plain_statement_and_copy_records(env: PgEnv) -> None:  # noqa: F811
    # asyncpg's prepare() (and copy_records_to_table's look at the table) ends with Flush, not Sync: the Query
    # that follows it is no batch the server could skip.
    async def main() -> list[object]:
        out: list[object] = []
        conn = await asyncpg_connect(env, "writer")
        try:
            stmt = await conn.prepare("SELECT balance FROM accounts WHERE id = $1")
            out.append(await conn.execute("UPDATE accounts SET balance = 100 WHERE id = 1"))
            out.append([await stmt.fetchval(i) for i in (1, 2, 1)])
            records = [(7000 + i, i) for i in range(500)]
            out.append(await conn.copy_records_to_table("accounts", records=records, columns=["id", "balance"]))
            out.append(await conn.fetchval("SELECT count(*) FROM accounts WHERE id >= 7000"))
        finally:
            await conn.close()
        return out

    try:
        out = asyncio.run(main())
    finally:
        count = env.direct("SELECT count(*) FROM accounts WHERE id >= 7000")
        env.direct("DELETE FROM accounts WHERE id >= 7000")
    assert out == ["UPDATE 1", [100, 100, 100], "COPY 500", 500], out
    assert count == [(500,)]


def test_asyncpg_cursor_forward_and_fetch_of_its_portal_are_masked(env: PgEnv) -> None:  # noqa: F811
    # asyncpg's cursors are portals bound in the extended protocol; forward() sends MOVE FORWARD n <portal>.
    async def main() -> list[object]:
        out: list[object] = []
        conn = await asyncpg_connect(env, "readonly")
        try:
            async with conn.transaction():
                cur = await conn.cursor("SELECT id, email, card FROM customers ORDER BY id")
                out.append([tuple(r) for r in await cur.fetch(1)])
                out.append(await cur.forward(2))
                out.append(tuple(await cur.fetchrow() or ()))
                out.append([tuple(r) for r in await conn.fetch(f"FETCH 1 FROM {cur._portal_name}")])
                out.append(await conn.execute(f"FETCH 1 FROM {cur._portal_name}"))
            out.append(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()
        return out

    out = asyncio.run(main())
    assert out[0] == [(1, "[REDACTED:email]", "**** **** **** 0004")], out
    assert out[1] == 2, out
    assert out[2][:2] == (4, "[REDACTED:email]") and out[2][2].endswith("1111") and "4111" not in out[2][2], out
    assert out[3][0][:2] == (5, "[REDACTED:email]") and "5500" not in out[3][0][2], out
    assert out[4] == "FETCH 1" and out[5] == 1, out


def test_psycopg2_parameters_savepoints_named_cursors_cancel_and_copy(env: PgEnv) -> None:  # noqa: F811
    import datetime
    import decimal
    import io
    import threading
    import uuid

    import psycopg2
    import psycopg2.extensions
    import psycopg2.extras

    psycopg2.extras.register_uuid()
    values = ("it's é\\", 42, decimal.Decimal("1.50"), b"\x00'\x01", [1, None], datetime.date(2024, 2, 29))
    u = uuid.uuid4()
    for role in ("readonly", "writer"):
        conn = psycopg2.connect(env.dsn(role))  # client-side binding: one Query per execute
        try:
            cur = conn.cursor()
            cur.execute("SELECT %s, %s, %s, %s, %s, %s, %s::uuid, %s, %s::jsonb", (*values, u, None, '{"k": "v"}'))
            row = cur.fetchone()
            assert (
                row[:3] == values[:3] and bytes(row[3]) == values[3] and row[4:] == (*values[4:], u, None, {"k": "v"})
            )
            cur.execute("SAVEPOINT s1")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege) as info:
                cur.execute("DELETE FROM customers")
            assert info.value.pgerror.startswith("ERROR:  lictor: DELETE") and "HINT:" in info.value.pgerror
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
            cur.execute("ROLLBACK TO SAVEPOINT s1")
            cur.execute("SELECT count(*) FROM customers")
            assert cur.fetchone() == (20,)
            named = conn.cursor(name="agent_rows")  # DECLARE ... CURSOR, then FETCH FORWARD
            named.itersize = 3
            named.execute("SELECT id, email, card FROM customers ORDER BY id")
            rows = list(named)
            assert len(rows) == 20
            conn.rollback()
            masked = role == "readonly"
            assert all(("@" not in r[1]) == masked and ("*" in r[2]) == masked for r in rows), rows[:2]
            timer = threading.Timer(0.5, conn.cancel)
            timer.start()
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(10)")
            timer.join()
            conn.rollback()
            out = io.StringIO()
            cur.copy_expert("COPY (SELECT email, card FROM customers WHERE id = 1) TO STDOUT WITH CSV", out)
            assert ("@" not in out.getvalue()) == masked, out.getvalue()
            conn.rollback()
            if role == "writer":
                cur.copy_expert("COPY accounts (id, balance) FROM STDIN", io.StringIO("9001\t5\n9002\t6\n"))
                conn.commit()
                assert env.direct("SELECT count(*) FROM accounts WHERE id > 9000") == [(2,)]
                cur.execute("DELETE FROM accounts WHERE id > %s", (9000,))
                conn.commit()
        finally:
            conn.close()


def test_pg8000_prepared_statements_and_a_denial_in_a_transaction(env: PgEnv) -> None:  # noqa: F811
    import pg8000.native

    conn = pg8000.native.Connection(
        "agent-readonly", host="127.0.0.1", port=env.port, database="app", password=env.tokens["readonly"]
    )
    try:
        stmt = conn.prepare("SELECT email, card FROM customers WHERE id = :id")
        rows = [stmt.run(id=i % 20 + 1)[0] for i in range(40)]
        stmt.close()
        assert all(r[0] == "[REDACTED:email]" and "*" in r[1] for r in rows), rows[:2]
        conn.run("BEGIN")
        with pytest.raises(pg8000.native.DatabaseError) as info:
            conn.run("UPDATE accounts SET balance = :b WHERE id = 1", b=0)
        assert info.value.args[0]["C"] == "42501" and "read-only agents cannot change data" in info.value.args[0]["M"]
        with pytest.raises(pg8000.native.DatabaseError) as info:
            conn.run("SELECT 1")
        assert info.value.args[0]["C"] == "25P02"  # the transaction failed, as at the server
        conn.run("ROLLBACK")
        assert conn.run("SELECT count(*) FROM generate_series(1, 50000)") == [[50000]]
    finally:
        conn.close()


def test_sqlalchemy_dialects_initialise_and_nest_transactions(env: PgEnv) -> None:  # noqa: F811
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    def url(driver: str, role: str) -> str:
        return f"postgresql+{driver}://agent-{role}:{env.tokens[role]}@127.0.0.1:{env.port}/app"

    for role in ("readonly", "writer"):
        engine = sa.create_engine(url("psycopg", role), connect_args={"sslmode": "disable"})
        try:
            customers = sa.Table("customers", sa.MetaData(), autoload_with=engine)
            with engine.connect() as conn:
                with pytest.raises(sa.exc.ProgrammingError), conn.begin_nested():
                    conn.execute(sa.delete(customers))  # no WHERE: denied for both
                row = conn.execute(sa.select(customers.c.email).where(customers.c.id == 1)).one()
                assert (row.email == "[REDACTED:email]") == (role == "readonly"), row
                conn.rollback()
        finally:
            engine.dispose()

    async def with_asyncpg() -> object:
        engine = create_async_engine(url("asyncpg", "readonly"), connect_args={"ssl": False})
        try:
            async with engine.connect() as conn:
                with pytest.raises(sa.exc.ProgrammingError):
                    async with conn.begin_nested():
                        await conn.execute(sa.text("DELETE FROM customers WHERE id = 1"))
                return (await conn.execute(sa.text("SELECT email FROM customers WHERE id = :i"), {"i": 1})).scalar()
        finally:
            await engine.dispose()

    assert asyncio.run(with_asyncpg()) == "[REDACTED:email]"


def test_asyncpg_binary_results_masked_timeouts_and_a_held_statement(env: PgEnv) -> None:  # noqa: F811
    import datetime
    import decimal
    import os
    import uuid

    from tests.conftest import lictor

    env.direct(
        "CREATE TABLE IF NOT EXISTS asyncpg_profiles (id int PRIMARY KEY, doc jsonb, tags text[], cardnum bigint, "
        "balance numeric, seen timestamptz);"
        'INSERT INTO asyncpg_profiles VALUES (1, \'{"email": "ann@example.com", "card": 4111111111111111}\', '
        "ARRAY['bob@example.com', 'plain'], 4111111111111111, 12.5, '2024-01-01Z') ON CONFLICT DO NOTHING"
    )
    url = f"http://127.0.0.1:{env.approvals_port}"
    approver = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    params = ("é", 7, decimal.Decimal("1.25"), b"\x00\x01", '{"k": 1}', [1, None], uuid.uuid4(), None)
    u = params[6]

    async def main() -> list[object]:
        import asyncpg

        out: list[object] = []
        ro = await asyncpg_connect(env, "readonly")  # asyncpg asks for binary results of every type it knows
        try:
            out.append(tuple(await ro.fetchrow("SELECT doc, tags, cardnum, balance, seen FROM asyncpg_profiles")))
            with pytest.raises(asyncio.TimeoutError):
                await ro.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            async with ro.transaction():
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await ro.execute("UPDATE accounts SET balance = 0 WHERE id = $1", 1)
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await ro.fetchval("SELECT 1")
            assert not ro.is_in_transaction()  # the COMMIT of the failed transaction rolled it back
        finally:
            out.append(await ro.fetchval("SELECT $1::int", 3))
            await ro.close()
        wr = await asyncpg_connect(env, "writer")
        notices: list[str] = []
        wr.add_log_listener(lambda _conn, msg: notices.append(str(msg)))
        try:
            row = await wr.fetchrow(
                "SELECT $1::text, $2::int, $3::numeric, $4::bytea, $5::jsonb, $6::int[], $7::uuid, $8::text", *params
            )
            out.append(tuple(row))

            async def approve() -> None:
                while not any("waiting for approval " in n for n in notices):
                    await asyncio.sleep(0.1)
                note = next(n for n in notices if "waiting for approval " in n)
                ap = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                await asyncio.to_thread(lictor, "approvals", "approve", ap, "--url", url, env=approver)

            task = asyncio.create_task(approve())
            out.append(await wr.execute("CREATE TABLE asyncpg_approved (id int)"))
            await asyncio.wait_for(task, 15)
            out.append(await wr.fetchval("SELECT $1::timestamptz", datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)))
        finally:
            await wr.close()
        return out

    try:
        out = asyncio.run(main())
    finally:
        env.direct("DROP TABLE IF EXISTS asyncpg_approved; DROP TABLE asyncpg_profiles")
    doc, tags, cardnum, balance, seen = out[0]
    assert "ann@example.com" not in doc and "4111111111111111" not in doc and "[REDACTED:email]" in doc, doc
    assert tags == ["[REDACTED:email]", "plain"] and cardnum is None and balance == decimal.Decimal("12.5"), out[0]
    assert seen == datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC) and out[1] == 3, out
    assert out[2] == (*params[:4], '{"k": 1}', [1, None], u, None), out[2]
    assert out[3] == "CREATE TABLE" and out[4] == datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), out


def test_card_numbers_in_exponent_notation_inside_values_are_masked(env: PgEnv) -> None:  # noqa: F811
    # A float8 prints 4111111111111111 as 4.111111111111111e+15, which no detector reads: a float8 column comes
    # back NULL; so must its ::text, an array of them, a point, and COPY output, in text, and a point or box in
    # binary (read as its float8 numbers).
    import psycopg

    env.direct(
        "CREATE TABLE floats (id int, p point, f8 float8, f8a float8[]);"
        "INSERT INTO floats VALUES (1, point(4111111111111111, 0), 4111111111111111, ARRAY[4111111111111111, 1.5]),"
        " (2, point(1.5, 2e20), 1.5, ARRAY[1.5, 1e300])"
    )
    try:
        with env.connect("readonly") as conn:
            rows = conn.execute("SELECT p::text, f8, f8a FROM floats ORDER BY id").fetchall()
            rows += conn.execute("SELECT p, f8, f8a FROM floats ORDER BY id").fetchall()
            assert rows[0] == rows[2] == (None, None, None), rows  # p::text, a cast readonly may write, too
            assert rows[1][0] == "(1.5,2e+20)" and rows[3][1:] == (1.5, [1.5, 1e300]), rows
            assert conn.execute("SELECT f8::text FROM floats WHERE id = 1").fetchone() == (None,)
            copied = []
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                with conn.cursor().copy("COPY floats TO STDOUT") as copy:
                    copied.extend(bytes(data) for data in copy)
            assert "exponent notation" in str(info.value) and not any(b"4.111" in c for c in copied), copied
            assert conn.execute("SELECT 1").fetchone() == (1,)

        async def binary() -> list[object]:
            c = await asyncpg_connect(env, "analyst")  # readonly's masks; it may compute the box
            try:
                points = [tuple(r) for r in await c.fetch("SELECT p, box(p, point(0, 0)) FROM floats ORDER BY id")]
                return [points, await c.fetchval("SELECT f8a FROM floats WHERE id = 1")]
            finally:
                await c.close()

        points, f8a = asyncio.run(binary())
        assert points[0] == (None, None) and f8a == [None, 1.5], (points, f8a)
        assert tuple(points[1][0]) == (1.5, 2e20) and tuple(points[1][1][0]) == (1.5, 2e20), points
    finally:
        env.direct("DROP TABLE floats")


def test_masked_values_of_number_literal_types_still_load_in_text(env: PgEnv) -> None:  # noqa: F811
    # psycopg reads results as text: a card masked inside a bigint[], numeric[], int8range or point would be no
    # value of its type ({************1111}) and the driver would fail on the whole result.
    env.direct(
        "CREATE TABLE literals (id int, arr bigint[], na numeric[], r int8range, p point);"
        "INSERT INTO literals VALUES (1, ARRAY[4111111111111111, 5], ARRAY[4111111111111111], "
        "int8range(4111111111111111, 4111111111111112), point(340000000000009, 1)), "
        "(2, ARRAY[5, NULL], ARRAY[1.5], int8range(1, 5), point(1, 2))"
    )
    try:
        with env.connect("readonly") as conn:
            rows = conn.execute("SELECT arr, na, r, p FROM literals ORDER BY id").fetchall()
        assert rows[0] == (None, None, None, None), rows
        assert rows[1][:2] == ([5, None], [1.5]) and (rows[1][2].lower, rows[1][2].upper) == (1, 5), rows
        assert rows[1][3] == "(1,2)", rows
    finally:
        env.direct("DROP TABLE literals")
