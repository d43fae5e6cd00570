"""Unit tests of the PostgreSQL listener's pieces, without sockets: the relay engine is driven with protocol
bytes on both sides (agent and target) and the bytes it forwards are checked exactly.

The policy is the example rule pack (examples/postgres/rulepacks); decisions go through a real Gateway
(``lictor.testing.harness``): real policy engine, real audit log.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lictor import Target, testing
from lictor_addons.postgres import _protocol as pg
from lictor_addons.postgres._listener import (
    PostgresListener,
    Route,
    build_classified,
    constant_insensitive,
    parse_listen,
    parse_options,
    read_only_session,
)
from lictor_addons.postgres._pipe import Pipe
from lictor_addons.postgres._session import Relay, reason_of
from lictor_addons.postgres._tls import client_context, ensure_certificate, server_context
from lictor_addons.postgres.addon import PostgresAddon

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
PACK = (ROOT / "examples" / "postgres" / "rulepacks" / "postgres.yaml").read_text()
TARGET = {
    "protocol": "postgres",
    "listen": "127.0.0.1:6999",
    "upstream": {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "app"},
    "read_only_roles": ["pg-readonly"],
}


class FakePipe(Pipe):
    """Collects what the relay writes; never touches a socket."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.written = bytearray()
        self.paused: set[str] = set()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data

    def write_soon(self, data: bytes) -> None:  # no turn of a loop here: at once
        self.write(data)

    def take(self) -> list[pg.BackendMessage | pg.FrontendMessage]:
        data = bytes(self.written)
        self.written.clear()
        return data  # type: ignore[return-value]

    def pause_reading(self, reason: str) -> None:
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        self.paused.discard(reason)

    def close(self) -> None:
        self.closed = True


def frontend(data: bytes) -> list[Any]:
    reader = pg.FrontendReader()
    reader.feed(pg.startup_message({"user": "x"}))
    return reader.feed(data)


def backend(data: bytes) -> list[Any]:
    return pg.BackendReader().feed(data)


class Rig:
    def __init__(self, relay: Relay, agent: FakePipe, upstream: FakePipe, harness: Any) -> None:
        self.relay = relay
        self.agent = agent
        self.upstream = upstream
        self.harness = harness

    def send(self, *messages: bytes) -> list[Any]:
        """The agent sends ``messages``; return what the relay forwarded to the target (decoded)."""
        self.relay._on_agent(b"".join(messages))
        return frontend(bytes(self.upstream.take()))  # type: ignore[arg-type]

    def reply(self, *messages: bytes) -> list[Any]:
        """The target answers; return what the agent receives (decoded)."""
        self.relay._on_upstream(b"".join(messages))
        return backend(bytes(self.agent.take()))  # type: ignore[arg-type]

    def reply_raw(self, *messages: bytes) -> bytes:
        self.relay._on_upstream(b"".join(messages))
        return bytes(self.agent.take())  # type: ignore[arg-type]


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Any]:
    async with testing.harness(PostgresAddon(), rulepacks=PACK, state_dir=tmp_path, targets={"app": TARGET}) as h:
        listener = PostgresListener(h.gateway)
        listener.configure([Target("app", "postgres", TARGET)])

        async def make(role: str, backend_pids: tuple[int, int] | None = None) -> Rig:
            session = await h.session(testing.identity(f"agent-{role}", role=role), protocol="postgres", target="app")
            agent, upstream = FakePipe("agent"), FakePipe("upstream")
            reader = pg.FrontendReader()
            reader.feed(pg.startup_message({"user": "agent"}))
            relay = Relay(
                listener,
                listener.routes[0].target,
                session,
                agent,
                upstream,
                reader=reader,
                database="app",
                read_only=read_only_session(session, listener.routes[0].target),
                status="I",
                on_done=lambda relay: None,
                backend_pids=backend_pids,
            )
            relay.start(b"", b"")
            return Rig(relay, agent, upstream, h)

        yield make


def ready(status: str = "I") -> bytes:
    return pg.ready_for_query(status)


def syntax_error() -> bytes:
    return pg.error_response("ERROR", "42601", 'syntax error at or near "LICTOR_DENIED_x"')


# -- small pieces ---------------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:6432") == ("127.0.0.1", 6432)
    assert parse_listen(":6432") == ("0.0.0.0", 6432)
    assert parse_listen("[::1]:6432") == ("::1", 6432)
    for bad in ("127.0.0.1", "host:0", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_parse_options() -> None:
    assert parse_options("-c search_path=a,b -cstatement_timeout=5s --work-mem=64MB") == [
        ("search_path", "a,b"),
        ("statement_timeout", "5s"),
        ("work_mem", "64MB"),
    ]
    assert parse_options(r"-c application_name=two\ words") == [("application_name", "two words")]
    assert parse_options("") == []
    for bad in ("-D /data", "-c nameonly", "-P", "plain"):
        with pytest.raises(Exception, match=r"not accepted|name=value"):
            parse_options(bad)


def test_reason_comment() -> None:
    assert reason_of("/* reason: INC-42 cleanup */ DELETE FROM t WHERE id = 1") == "INC-42 cleanup"
    assert reason_of("DELETE FROM t WHERE id = 1 -- reason: nightly fix\n") == "nightly fix"
    assert reason_of("SELECT 'reason: not a comment'") is None
    assert reason_of("SELECT 1") is None


def test_names_of_prepared_statements_and_cursors() -> None:
    c = build_classified("EXPLAIN ANALYZE EXECUTE wipe", "app", "")
    assert c.executes == ("wipe",)
    c = build_classified("CREATE TABLE x AS EXECUTE q(1)", "app", "")
    assert c.executes == ("q",)
    c = build_classified("DECLARE c1 CURSOR FOR SELECT 1; FETCH 2 FROM c1; MOVE c1; CLOSE c1; CLOSE ALL", "app", "")
    # a cursor this query declares is fetched as declared here (with the query's decision), not looked up
    assert c.cursors == ("c1",) and c.fetches == () and c.closes == ("c1", None)
    c = build_classified(
        "FETCH c1; DECLARE c1 CURSOR FOR SELECT 1; CLOSE c1; MOVE c1; DECLARE c1 CURSOR FOR SELECT 1", "app", ""
    )
    assert c.fetches == ("c1", "c1")
    c = build_classified(
        "DECLARE c1 CURSOR FOR SELECT 1; CALL p(); FETCH c1; PREPARE q AS SELECT 1; EXECUTE q", "app", ""
    )
    assert c.fetches == ("c1",) and c.executes == ()
    c = build_classified("PREPARE p(int) AS SELECT $1; DEALLOCATE p; DEALLOCATE ALL; DISCARD ALL", "app", "")
    assert [n for n, _ in c.prepares] == ["p"] and c.deallocates == ("p", None) and c.discard_all
    c = build_classified("SELEC nope", "app", "")
    assert c.kinds == {"unknown"} and c.requests[0].action == "unknown"


def test_classification_reused_only_when_constants_do_not_matter(tmp_path: Path) -> None:
    from lictor import GatewayConfig

    class FakeGateway:
        config = GatewayConfig.default(tmp_path)
        state_dir = tmp_path

    listener = PostgresListener(FakeGateway())  # type: ignore[arg-type]
    a = listener.classify("app", "db", "SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    b = listener.classify("app", "db", "SELECT abalance FROM pgbench_accounts WHERE aid = 2")
    assert constant_insensitive(a, "SELECT abalance FROM pgbench_accounts WHERE aid = $1")
    assert b.requests[0].payload.endswith("aid = 2") and b.requests[0].attrs == a.requests[0].attrs
    # set_config reads its constant arguments: the harmless call must not vouch for the other one.
    first = listener.classify("app", "db", "SELECT set_config('application_name', 'x', false)")
    second = listener.classify("app", "db", "SELECT set_config('default_transaction_read_only', 'off', false)")
    assert not first.requests[0].attrs["read_write_attempt"]
    assert second.requests[0].attrs["read_write_attempt"]
    # A rounding's scale decides whether it drops digits: round(x, 2) must not vouch for round(x, -4).
    kept = listener.classify("app", "db", "SELECT round(card, 2) FROM customers")
    dropped = listener.classify("app", "db", "SELECT round(card, -4) FROM customers")
    assert not kept.requests[0].attrs["transforms_data"]
    assert dropped.requests[0].attrs["transforms_data"]
    # The setting a statement reads is a constant: current_setting('search_path') must not vouch for
    # current_setting('primary_conninfo'), nor pg_settings WHERE name = 'work_mem' for another name.
    for harmless, secret in (
        ("SELECT current_setting('search_path')", "SELECT current_setting('primary_conninfo')"),
        (
            "SELECT setting FROM pg_settings WHERE name = 'work_mem'",
            "SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'",
        ),
    ):
        assert listener.classify("app", "db", harmless).requests[0].attrs["settings_read"] != {"primary_conninfo"}
        assert listener.classify("app", "db", secret).requests[0].attrs["settings_read"] == {"primary_conninfo"}
    # A LIMIT is an attribute rules can match.
    small = listener.classify("app", "db", "SELECT * FROM t LIMIT 5")
    big = listener.classify("app", "db", "SELECT * FROM t LIMIT 50000")
    assert small.requests[0].attrs["limit"] == 5 and big.requests[0].attrs["limit"] == 50000
    # The reason comment belongs to each text.
    r = listener.classify("app", "db", "/* reason: one */ SELECT abalance FROM pgbench_accounts WHERE aid = 3")
    s = listener.classify("app", "db", "/* reason: one */ SELECT abalance FROM pgbench_accounts WHERE aid = 4")
    assert r.requests[0].reason == s.requests[0].reason == "one"


def test_gateway_certificate_is_created_once_with_private_keys(tmp_path: Path) -> None:
    cert, key, ca = ensure_certificate(tmp_path / "tls", ["db.example"])
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "ca.key").st_mode) == 0o600
    again = ensure_certificate(tmp_path / "tls", ["db.example"])
    assert again == (cert, key, ca) and cert.read_bytes() == again[0].read_bytes()
    server_context(cert, key)
    client = client_context("verify-full", ca)
    assert client is not None and client.check_hostname
    assert client_context("disable", None) is None
    loose = client_context("require", None)
    assert loose is not None and not loose.check_hostname


async def test_read_only_sessions(rig_factory: Any) -> None:
    assert (await rig_factory("readonly")).relay.read_only
    assert not (await rig_factory("writer")).relay.read_only
    assert not (await rig_factory("dba")).relay.read_only
    # An approver has no rule that could write: read-only too.
    assert (await rig_factory("approver")).relay.read_only


def test_route_selects_the_target_by_database() -> None:
    listener: Any = None
    one = Route(listener, "127.0.0.1", 1, [Target("a", "postgres", {"upstream": {"database": "x"}})], None, False)
    assert one.select("anything").name == "a"  # type: ignore[union-attr]
    two = Route(
        listener,
        "127.0.0.1",
        1,
        [
            Target("sales", "postgres", {"upstream": {"database": "sales_db"}}),
            Target("hr", "postgres", {"upstream": {"database": "hr_db"}}),
        ],
        None,
        False,
    )
    assert two.select("hr").name == "hr"  # type: ignore[union-attr]
    assert two.select("sales_db").name == "sales"  # type: ignore[union-attr]
    assert two.select("other") is None


# -- the relay: simple protocol -----------------------------------------------------------------------------


async def test_allowed_query_is_forwarded_and_its_result_relayed_untouched(rig_factory: Any) -> None:
    rig = await rig_factory("writer")
    forwarded = rig.send(pg.query("SELECT 1"))
    assert [type(m).__name__ for m in forwarded] == ["Query"] and forwarded[0].sql == "SELECT 1"
    answer = (
        pg.row_description([("x", 0, 0, 23, 4, -1, 0)])
        + pg.data_row([b"1"])
        + pg.command_complete("SELECT 1")
        + ready()
    )
    assert rig.reply_raw(answer) == answer
    events = rig.harness.events(kind="statement")
    assert events[-1]["tag"] == "SELECT 1" and events[-1]["rows"] == 1 and events[-1]["decision"] == "allow"


async def test_denied_query_is_replaced_by_a_failing_statement(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    forwarded = rig.send(pg.query("SELECT 1; DELETE FROM orders"))
    assert len(forwarded) == 1 and "DELETE" not in forwarded[0].sql and "LICTOR_DENIED_" in forwarded[0].sql
    got = rig.reply(syntax_error(), ready("T"))
    assert [type(m).__name__ for m in got] == ["ErrorResponse", "ReadyForQuery"]
    error = got[0]
    assert error.sqlstate == "42501" and error.severity == "ERROR"
    assert error.message.startswith("lictor: DELETE: DELETE FROM orders")
    assert "policy version" in error.fields["D"] and error.fields["H"]
    assert got[1].status == "T"  # the server's own status after the failed statement


@pytest.mark.parametrize("role", ["writer", "readonly"])
async def test_a_notification_the_session_sent_itself_carries_the_pid_the_agent_was_given(
    rig_factory: Any, role: str
) -> None:
    # The agent knows its session by the BackendKeyData pid the gateway gave it, not the server's: drivers
    # compare a notification's pid with it to skip their own. Other sessions' pids are the server's.
    rig = await rig_factory(role, backend_pids=(4242, 777))
    rig.send(pg.query("LISTEN ch"))
    rig.reply(pg.command_complete("LISTEN"), ready())
    got = rig.reply(
        pg.notification_response(4242, "ch", "mine: ann@example.com"),
        pg.notification_response(5151, "ch", "theirs: bob@example.com"),
    )
    assert [(m.pid, m.channel) for m in got] == [(777, "ch"), (5151, "ch")]
    if role == "readonly":  # masked, the session's own notifications too
        assert [m.payload for m in got] == ["mine: [REDACTED:email]", "theirs: [REDACTED:email]"]
    else:
        assert [m.payload for m in got] == ["mine: ann@example.com", "theirs: bob@example.com"]


async def test_masked_rows_have_their_lengths_rewritten(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    rig.send(pg.query("SELECT id, email FROM customers"))
    got = rig.reply(
        pg.row_description([("id", 0, 0, 23, 4, -1, 0), ("email", 0, 0, 25, -1, -1, 0)]),
        pg.data_row([b"1", b"ann@example.com"]),
        pg.data_row([b"2", None]),
        pg.command_complete("SELECT 2"),
        ready(),
    )
    rows = [m.values for m in got if isinstance(m, pg.DataRow)]
    assert rows == [[b"1", b"[REDACTED:email]"], [b"2", None]]


@pytest.mark.parametrize("pending", ["nothing", "a Sync"])
async def test_an_answer_to_nothing_the_gateway_forwarded_ends_the_session(rig_factory: Any, pending: str) -> None:
    # Rows the relay cannot match to a statement have no mask plan: were the gateway ever out of step with the
    # server, relaying them would show what the statement's masks hide. Only an error (FATAL) may come unasked.
    rig = await rig_factory("readonly")
    if pending == "a Sync":
        rig.send(pg.sync())
    got = rig.reply(
        pg.row_description([("id", 0, 0, 23, 4, -1, 0), ("email", 0, 0, 25, -1, -1, 0)]),
        pg.data_row([b"1", b"ann@example.com"]),
        pg.command_complete("SELECT 1"),
        ready(),
    )
    assert [type(m).__name__ for m in got] == ["ErrorResponse"]
    assert got[0].severity == "FATAL" and got[0].sqlstate == "08P01" and rig.relay.closed


async def test_an_unasked_fatal_error_is_relayed(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    got = rig.reply(pg.error_response("FATAL", "57P01", "terminating connection due to administrator command"))
    assert [m.sqlstate for m in got] == ["57P01"] and not rig.relay.closed


async def test_copy_out_is_masked_row_by_row(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    rig.send(pg.query("COPY customers TO STDOUT"))
    got = rig.reply(
        pg.copy_out_response(0, [0, 0]),
        pg.copy_data(b"1\tann@example.com\t4111 1111 1111 1111\n"),
        pg.copy_done(),
        pg.command_complete("COPY 1"),
        ready(),
    )
    data = b"".join(m.data for m in got if isinstance(m, pg.CopyData))
    assert b"ann@example.com" not in data and b"4111 1111 1111 1111" not in data and data.endswith(b"1111\n")


async def test_binary_copy_out_is_refused_when_masking_applies(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    rig.send(pg.query("COPY customers TO STDOUT (FORMAT binary)"))
    got = rig.reply(
        pg.copy_out_response(1, [1]),
        pg.copy_data(b"PGCOPY\n\xff\r\n\x00secret"),
        pg.copy_done(),
        pg.command_complete("COPY 1"),
        ready("I"),
    )
    assert [type(m).__name__ for m in got] == ["ErrorResponse", "ReadyForQuery"]
    assert "binary COPY" in got[0].message
    # A notification the server delivers before that ReadyForQuery is another session's, not part of the
    # refused result: it still reaches the agent, masked.
    rig.send(pg.query("COPY customers TO STDOUT (FORMAT binary)"))
    got = rig.reply(
        pg.copy_out_response(1, [1]),
        pg.copy_data(b"PGCOPY\n\xff\r\n\x00secret"),
        pg.copy_done(),
        pg.command_complete("COPY 1"),
        pg.notification_response(5151, "jobs", "done for ann@example.com"),
        ready("I"),
    )
    assert [type(m).__name__ for m in got] == ["NotificationResponse", "ErrorResponse", "ReadyForQuery"]
    assert got[0].payload == "done for [REDACTED:email]" and "binary COPY" in got[1].message


async def test_parameter_change_that_breaks_parsing_ends_the_session(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    rig.send(pg.query("SELECT my_function()"))
    got = rig.reply(pg.parameter_status("standard_conforming_strings", "off"), ready())
    assert isinstance(got[-1], pg.ErrorResponse) and got[-1].severity == "FATAL"
    assert rig.relay.closed and rig.upstream.closed


async def test_read_only_turned_off_ends_a_read_only_session(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    rig.send(pg.query("SELECT f()"))
    got = rig.reply(pg.parameter_status("default_transaction_read_only", "off"), ready())
    assert got[-1].severity == "FATAL" and rig.relay.closed


async def test_function_call_message_denied(rig_factory: Any) -> None:
    rig = await rig_factory("writer")
    forwarded = rig.send(pg.function_call(2240, [b"/etc/passwd"]))
    assert [type(m).__name__ for m in forwarded] == ["Query"]  # the failing statement, not the call
    got = rig.reply(syntax_error(), ready())
    assert got[0].sqlstate == "42501" and "FUNCTION CALL" in got[0].message


def _message(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    "raw",
    [
        _message(b"E", b""),  # Execute without its portal name
        _message(b"E", b"abcd"),
        _message(b"D", b""),
        _message(b"D", b"Sname"),
        _message(b"C", b"P"),
        _message(b"P", b"name"),
        _message(b"P", b"\0SELECT 1"),
    ],
)
async def test_unterminated_strings_are_a_protocol_violation(rig_factory: Any, raw: bytes, caplog: Any) -> None:
    rig = await rig_factory("dba")
    assert rig.send(raw) == []
    (error,) = backend(bytes(rig.agent.take()))
    assert error.sqlstate == "08P01" and "unterminated string" in error.message
    assert rig.relay.closed and "Traceback" not in caplog.text


async def test_password_message_after_login_is_not_forwarded(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    assert rig.send(_message(b"p", b"secret\0")) == []
    (error,) = backend(bytes(rig.agent.take()))
    assert error.sqlstate == "08P01" and rig.relay.closed


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!ii", 8, 5 << 16),  # a protocol version nobody speaks
        struct.pack("!ii", 10, 3 << 16) + b"us",  # a startup packet without its terminator
        pg.ssl_request() + b"\x16\x03\x01",  # cleartext bytes sent along with SSLRequest
    ],
)
async def test_malformed_startup_is_answered_and_audited(tmp_path: Path, packet: bytes) -> None:
    target = {**TARGET, "listen": f"127.0.0.1:{free_port()}"}
    async with testing.harness(PostgresAddon(), rulepacks=PACK, state_dir=tmp_path, targets={"app": target}) as h:
        listener = PostgresListener(h.gateway)
        listener.configure([Target("app", "postgres", target)])
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection(*parse_listen(target["listen"]))
            writer.write(packet)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await listener.stop()
        refusals = h.audit("connection.refused")
    (error,) = [m for m in backend(answer.lstrip(b"N")) if isinstance(m, pg.ErrorResponse)]
    assert error.sqlstate == "08P01"
    (refused,) = refusals
    assert refused["sqlstate"] == "08P01" and "protocol violation" in refused["reason"]


async def test_why_the_relay_ended_a_session_is_audited(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    ended: list[str] = []
    rig.relay._on_done = lambda relay: ended.append(relay.end_reason)
    rig.relay._on_agent(_message(b"E", b""))
    assert ended and "protocol violation" in ended[0]


async def test_an_internal_error_ends_the_session_and_is_audited(rig_factory: Any, monkeypatch: Any) -> None:
    # A defect in the gateway closed the connection with XX000 and a log line: the statement it was handling was
    # in no decision, and the audit log did not show that anything had gone wrong.
    rig = await rig_factory("writer")

    def broken(*args: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(rig.relay.listener, "classify", broken)
    assert rig.send(pg.query("SELECT 1")) == []
    (fatal,) = backend(bytes(rig.agent.take()))  # type: ignore[arg-type]
    assert isinstance(fatal, pg.ErrorResponse) and fatal.sqlstate == "XX000" and rig.agent.closed
    (error,) = rig.harness.audit("postgres.internal_error")
    assert error["session"] == rig.relay.session.id and error["while"] == "relaying the agent's messages"
    assert error["error"] == "RuntimeError: a defect" and error["target"] == "app"


# -- the relay: extended protocol ---------------------------------------------------------------------------


async def test_pipeline_denial_drops_the_rest_of_the_batch(rig_factory: Any) -> None:
    rig = await rig_factory("writer")
    forwarded = rig.send(
        pg.parse("", "INSERT INTO t VALUES (1)"),
        pg.bind("", ""),
        pg.execute(""),
        pg.parse("", "DELETE FROM t"),
        pg.bind("", ""),
        pg.describe("P", ""),
        pg.execute(""),
        pg.parse("", "INSERT INTO t VALUES (2)"),
        pg.bind("", ""),
        pg.execute(""),
        pg.sync(),
        pg.parse("", "SELECT 1"),
        pg.bind("", ""),
        pg.execute(""),
        pg.sync(),
    )
    kinds = [type(m).__name__ for m in forwarded]
    assert kinds == ["Parse", "Bind", "Execute", "Parse", "Sync", "Parse", "Bind", "Execute", "Sync"]
    assert forwarded[3].query.startswith("LICTOR_DENIED_")
    assert "VALUES (2)" not in str(forwarded)
    got = rig.reply(
        pg.parse_complete(),
        pg.bind_complete(),
        pg.command_complete("INSERT 0 1"),
        syntax_error(),
        ready(),
        pg.parse_complete(),
        pg.bind_complete(),
        pg.data_row([b"1"]),
        pg.command_complete("SELECT 1"),
        ready(),
    )
    assert [type(m).__name__ for m in got] == [
        "ParseComplete",
        "BindComplete",
        "CommandComplete",
        "ErrorResponse",
        "ReadyForQuery",
        "ParseComplete",
        "BindComplete",
        "DataRow",
        "CommandComplete",
        "ReadyForQuery",
    ]
    assert got[3].sqlstate == "42501"


async def test_error_from_the_server_skips_to_sync_and_keeps_the_relay_in_step(rig_factory: Any) -> None:
    rig = await rig_factory("writer")
    rig.send(
        pg.parse("s1", "SELECT * FROM missing_table"),
        pg.bind("", "s1"),
        pg.execute(""),
        pg.sync(),
    )
    got = rig.reply(pg.error_response("ERROR", "42P01", 'relation "missing_table" does not exist'), ready())
    assert [type(m).__name__ for m in got] == ["ErrorResponse", "ReadyForQuery"]
    assert got[0].sqlstate == "42P01"  # the server's own error, untouched
    # The next denial is still recognised: the expectation queue is in step.
    rig.send(pg.parse("", "DELETE FROM t"), pg.sync())
    got = rig.reply(syntax_error(), ready())
    assert got[0].sqlstate == "42501"


async def test_bind_of_an_unknown_statement_is_denied(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    forwarded = rig.send(pg.bind("", "never_parsed"), pg.execute(""), pg.sync())
    assert [type(m).__name__ for m in forwarded] == ["Parse", "Sync"]
    got = rig.reply(syntax_error(), ready())
    assert got[0].sqlstate == "42501" and "never_parsed" in got[0].message


async def test_prepared_statement_decided_once_and_executed_many_times(rig_factory: Any) -> None:
    rig = await rig_factory("writer")
    rig.send(pg.parse("upd", "UPDATE accounts SET balance = $1 WHERE id = $2"), pg.sync())
    rig.reply(pg.parse_complete(), ready())
    audited = len(rig.harness.audit("decision"))
    for i in range(5):
        forwarded = rig.send(pg.bind("", "upd", [b"1", str(i).encode()]), pg.execute(""), pg.sync())
        assert [type(m).__name__ for m in forwarded] == ["Bind", "Execute", "Sync"]
        rig.reply(pg.bind_complete(), pg.command_complete("UPDATE 1"), ready())
    assert len(rig.harness.audit("decision")) == audited  # the Parse's decision is reused
    statements = rig.harness.events(kind="statement")
    assert [s["params"] for s in statements[-2:]] == [["1", "3"], ["1", "4"]]


ONE_ROW_RELAYED = ["ParseComplete", "BindComplete", "DataRow", "CommandComplete", "ReadyForQuery"]


def reply_one_row(rig: Any, fields: list[tuple[str, int, int, int, int, int, int]], values: list[Any]) -> list[Any]:
    """The server's answer to Parse, Bind, the gateway's Describe, Execute and Sync: one row."""
    return rig.reply(  # type: ignore[no-any-return]
        pg.parse_complete(),
        pg.bind_complete(),
        pg.row_description(fields),
        pg.data_row(values),
        pg.command_complete("SELECT 1"),
        ready(),
    )


async def test_masked_execute_without_describe_gets_one_from_the_gateway(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    forwarded = rig.send(pg.parse("", "SELECT email FROM customers"), pg.bind("", ""), pg.execute(""), pg.sync())
    assert [type(m).__name__ for m in forwarded] == ["Parse", "Bind", "Describe", "Execute", "Sync"]
    # the gateway's Describe is not relayed
    got = reply_one_row(rig, [("email", 0, 0, 25, -1, -1, 0)], [b"bob@example.org"])
    assert [type(m).__name__ for m in got] == ONE_ROW_RELAYED
    assert got[2].values == [b"[REDACTED:email]"]


async def test_binary_results_are_masked_or_refused_when_their_columns_are_known(rig_factory: Any) -> None:
    # Columns unknown at Bind (no statement Describe, as psycopg does it): decided on the portal's
    # RowDescription, before any row reaches the agent.
    rig = await rig_factory("readonly")
    query = "SELECT email, n, ok, tags FROM customers"
    forwarded = rig.send(pg.parse("", query), pg.bind("", "", result_formats=[1]), pg.execute(""), pg.sync())
    assert [type(m).__name__ for m in forwarded] == ["Parse", "Bind", "Describe", "Execute", "Sync"]
    fields = [("email", 0, 0, 25, -1, -1, 1), ("n", 0, 0, 20, 8, -1, 1), ("ok", 0, 0, 20, 8, -1, 1)]
    values = [b"bob@example.org", (4111111111111111).to_bytes(8, "big"), (7).to_bytes(8, "big")]
    got = reply_one_row(rig, fields, values)
    assert [type(m).__name__ for m in got] == ONE_ROW_RELAYED
    assert got[2].values == [b"[REDACTED:email]", None, (7).to_bytes(8, "big")]

    # a binary array of text is masked element by element; one that does not decode comes back NULL
    def text_array(*items: bytes | None) -> bytes:
        out = struct.pack("!iiIii", 1, int(None in items), 25, len(items), 1)
        return out + b"".join(b"\xff\xff\xff\xff" if i is None else struct.pack("!i", len(i)) + i for i in items)

    rig.send(pg.parse("", query), pg.bind("", "", result_formats=[1]), pg.execute(""), pg.sync())
    got = reply_one_row(
        rig,
        [("tags", 0, 0, 1009, -1, -1, 1), ("bad", 0, 0, 1009, -1, -1, 1)],
        [text_array(b"bob@example.org", None, b"x"), b"\x00binary array with bob@example.org"],
    )
    assert [type(m).__name__ for m in got] == ONE_ROW_RELAYED
    assert got[2].values == [text_array(b"[REDACTED:email]", None, b"x"), None]
    # a bytea in binary is its bytes: masked as they are, still a bytea
    rig.send(pg.parse("", query), pg.bind("", "", result_formats=[1]), pg.execute(""), pg.sync())
    got = reply_one_row(rig, [("tags", 0, 0, 17, -1, -1, 1)], [b"\x00binary bytes with bob@example.org"])
    assert [type(m).__name__ for m in got] == ONE_ROW_RELAYED
    assert got[2].values == [b"\x00binary bytes with [REDACTED:email]"]
    # a type without a fixed oid (an enum, a composite) in binary cannot be masked: the result is withheld
    rig.send(pg.parse("", query), pg.bind("", "", result_formats=[1]), pg.execute(""), pg.sync())
    got = reply_one_row(rig, [("tags", 0, 0, 16500, -1, -1, 1)], [b"bob@example.org"])
    assert [type(m).__name__ for m in got] == ["ParseComplete", "BindComplete", "ErrorResponse", "ReadyForQuery"]
    assert got[2].sqlstate == "42501" and "binary" in got[2].message


async def test_parser_sensitive_text_waits_for_the_earlier_pipeline(rig_factory: Any) -> None:
    rig = await rig_factory("dba")
    # Mid-segment (an Execute not yet synchronized): refused.
    forwarded = rig.send(
        pg.parse("", "SELECT f()"),
        pg.bind("", ""),
        pg.execute(""),
        pg.parse("", r"SELECT 'a\', 1"),
        pg.sync(),
    )
    assert forwarded[3].query.startswith("LICTOR_DENIED_")
    got = rig.reply(pg.parse_complete(), pg.bind_complete(), pg.command_complete("SELECT 1"), syntax_error(), ready())
    assert "Sync" in got[3].message
    # After a Sync: held until the server's ReadyForQuery, then forwarded.
    forwarded = rig.send(pg.query("SELECT f()"), pg.query(r"SELECT 'C:\temp'"))
    assert [m.sql for m in forwarded] == ["SELECT f()"]
    assert "hold" in rig.agent.paused
    rig.reply(pg.command_complete("SELECT 1"), ready())
    await asyncio.sleep(0.01)
    forwarded = frontend(bytes(rig.upstream.take()))
    assert [m.sql for m in forwarded] == [r"SELECT 'C:\temp'"]
    assert "hold" not in rig.agent.paused


async def test_statement_description_serves_later_executions_without_describe(rig_factory: Any) -> None:
    rig = await rig_factory("readonly")
    rig.send(pg.parse("S_1", "SELECT email FROM customers WHERE id = $1"), pg.describe("S", "S_1"), pg.sync())
    rig.reply(
        pg.parse_complete(),
        pg.parameter_description([23]),
        pg.row_description([("email", 0, 0, 25, -1, -1, 0)]),
        ready(),
    )
    for i in range(2):
        forwarded = rig.send(pg.bind("", "S_1", [str(i).encode()]), pg.execute(""), pg.sync())
        assert [type(m).__name__ for m in forwarded] == ["Bind", "Execute", "Sync"]  # no Describe injected
        got = rig.reply(pg.bind_complete(), pg.data_row([b"eve@example.net"]), pg.command_complete("SELECT 1"), ready())
        assert [m.values for m in got if isinstance(m, pg.DataRow)] == [[b"[REDACTED:email]"]]
