"""The command line as security teams use it."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, GatewayProcess, free_port, lictor


def test_check_shipped_packs_pass():
    out = lictor("check", str(ROOT / "rulepacks")).stdout
    assert out.startswith("OK:")


def test_test_shipped_packs_pass_with_coverage():
    proc = lictor("test", str(ROOT / "rulepacks"))
    assert "coverage: " in proc.stdout and " failed" in proc.stdout
    assert proc.stdout.strip().endswith(" 0 failed")


def test_check_reports_file_line_and_exit_1(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "format: lictor/v1\nmetadata: {name: b}\nidentities:\n  - match: {sub: '*'}\n    roles: [ghost]\n"
        "roles:\n  r:\n    rules:\n      - {id: x, protocol: postgres, action: allow, when: {tables: ['(']}}\n"
    )
    proc = lictor("check", str(bad), check=False)
    assert proc.returncode == 1
    assert f"{bad}:5:13: identity mapping: unknown role 'ghost'" in proc.stdout


def test_check_fails_when_it_checks_nothing(tmp_path: Path):
    # a CI job pointed at a misspelt directory, or at packs saved as .yml.txt, was told "OK"
    (tmp_path / "p.yml.txt").write_text("format: lictor/v1\n")
    proc = lictor("check", str(tmp_path), check=False)
    assert proc.returncode == 1 and "OK" not in proc.stdout
    assert proc.stdout.strip() == f"no rule pack files (*.yaml, *.yml) under {tmp_path}"
    proc = lictor("check", check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "give rule pack files or directories, or -c lictor.yaml" in proc.stderr


def test_check_refuses_a_pack_linked_to_a_fifo_or_a_device_instead_of_blocking(tmp_path: Path):
    # reading a FIFO blocks until a writer comes, /dev/zero never ends: `lictor check`, and a live reload (holding
    # its lock, so no later edit went live), hung without a word
    _ls_pack(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "pipe.yaml").symlink_to(tmp_path / "fifo")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    proc = lictor("check", str(tmp_path), check=False, timeout=30)
    assert proc.returncode == 1, proc.stdout
    for name in ("pipe.yaml", "zero.yaml"):
        assert f"{tmp_path / name}:1:1: not a regular file (a FIFO, device or socket)" in proc.stdout, proc.stdout


def _ls_pack(tmp_path: Path) -> None:
    """A pack whose only rule allows `ls` over SSH to everyone."""
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n      - {id: ok, protocol: ssh, when: {programs: ls}, action: allow}\n"
    )


def test_test_exits_1_on_a_failing_case(tmp_path: Path):
    _ls_pack(tmp_path)
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: ls ok, identity: {sub: a}, request: {protocol: ssh, action: ls, attrs: {program: ls}}, expect: allow}\n"
        "  - {name: rm allowed, identity: {sub: a}, request: {protocol: ssh, action: rm, attrs: {program: rm}}, expect: allow}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "PASS" in proc.stdout and "FAIL" in proc.stdout and "expected allow, got deny" in proc.stdout
    assert "1 passed, 1 failed" in proc.stdout
    assert "coverage: 1/1 rules exercised (100%)" in proc.stdout


def test_test_names_a_misspelt_key_in_a_case_with_its_line(tmp_path: Path):
    _ls_pack(tmp_path)
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n  - name: typo\n    identity: {sub: a}\n"
        "    requets: {protocol: ssh, action: ls, attrs: {program: ls}}\n    expect: allow\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert (
        f"FAIL {tmp_path / 'p.tests.yaml'}:5 typo -> no decision: unknown key 'requets' in a test case "
        "(did you mean 'request'?); "
        "expected one of: expect, identity, name, request"
    ) in proc.stdout


def test_explain_shows_roles_rules_and_outcome():
    out = lictor(
        "explain",
        str(ROOT / "rulepacks"),
        "--claim",
        "access=read",
        "--sub",
        "agent-9",
        "--request",
        "{protocol: kubernetes, action: get, attrs: {verb: get, resource: secrets, api_group: core, namespace: apps}}",
    ).stdout
    assert "roles: " in out and "read-only" in out
    assert "skip  ro-kubernetes-read" in out and "unless.resources matches" in out
    assert "=> DENY" in out


def test_explain_reads_sql_as_a_postgres_request_and_asks_for_a_missing_protocol():
    out = lictor("explain", str(ROOT / "rulepacks"), "--claim", "access=read", "--sql", "DELETE FROM t").stdout
    assert "request: DELETE" in out and "=> DENY" in out
    proc = lictor("explain", str(ROOT / "rulepacks"), "--path", "/x", check=False)
    assert proc.returncode != 0
    assert "cannot build the request: the request needs a protocol (loaded: " in proc.stdout


def test_token_issue_refuses_what_the_gateway_would_refuse_with_a_clear_error(tmp_path: Path):
    for args, message in [
        (["--sub", "a", "--ttl", "abc"], "--ttl: bad duration 'abc': use forms like 30s, 15m, 1h, 2d"),
        (["--sub", "a", "--ttl", "1.2.3"], "--ttl: bad duration '1.2.3'"),
        (["--sub", "a", "--ttl", ""], "--ttl: empty duration"),
        (["--sub", "a", "--ttl", "0"], "a token must live at least 1s"),
        (["--sub", " ", "--ttl", "1h"], "--sub must name the agent"),
        (
            ["--sub", "a", "--ttl", "1" + "0" * 400],
            "--ttl: bad duration '100000000000000000000000000000000000000…': too large",
        ),
    ]:
        proc = lictor("token", "issue", "--state-dir", str(tmp_path), *args, check=False)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("lictor token issue: ") and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_check_counts_a_file_that_does_not_parse_among_the_files_checked(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("format: lictor/v1\nroles: [\n")
    proc = lictor("check", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == "1 error(s), 0 warning(s) in 1 pack file(s)", proc.stdout


def test_token_issue_says_when_it_creates_the_signing_key(tmp_path: Path):
    # A mistyped --state-dir gave a token signed by a new key, which no gateway accepts, without a word
    first = lictor("token", "issue", "--state-dir", str(tmp_path / "typo"), "--sub", "agent-1")
    assert first.stdout.count(".") == 2
    assert f"{tmp_path / 'typo'} had no signing key; created {tmp_path / 'typo' / 'issuer.key'}" in first.stderr
    again = lictor("token", "issue", "--state-dir", str(tmp_path / "typo"), "--sub", "agent-1")
    assert again.stdout.count(".") == 2 and again.stderr == ""


def test_token_issue_is_short_and_verifiable(tmp_path: Path):
    token = lictor(
        "token",
        "issue",
        "--state-dir",
        str(tmp_path),
        "--sub",
        "agent-1",
        "--claim",
        "role=readonly",
        "--claim",
        "groups=a,b",
        "--ttl",
        "30m",
    ).stdout.strip()
    assert token.count(".") == 2 and len(token) < 1000
    import base64

    body = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert body["sub"] == "agent-1" and body["role"] == "readonly" and body["groups"] == ["a", "b"]
    assert body["exp"] - body["iat"] == 1800


def test_an_explicit_state_dir_does_not_read_the_lictor_yaml_of_the_working_directory(tmp_path: Path):
    # examples/http/README.md: in a second terminal, `cd examples/http` and `lictor token issue --state-dir
    # state ...`. Its lictor.yaml names the upstream by an environment variable only the gateway's terminal
    # has, and the token failed with "environment variable LICTOR_HTTP_UPSTREAM is not set".
    (tmp_path / "lictor.yaml").write_text("version: 1\nstate_dir: elsewhere\nx: ${LICTOR_TEST_UNSET_VARIABLE}\n")
    state = tmp_path / "state"
    token = lictor("token", "issue", "--state-dir", "state", "--sub", "agent-1", cwd=tmp_path).stdout.strip()
    assert token.count(".") == 2 and (state / "issuer.key").exists() and not (tmp_path / "elsewhere").exists()
    status = lictor("status", "--state-dir", "state", cwd=tmp_path, check=False)
    assert status.returncode == 1 and "no gateway has run with state directory state" in status.stderr, status
    audit = lictor("audit", "list", "--state-dir", "state", cwd=tmp_path, check=False)
    assert audit.returncode == 1 and "no audit log at state/audit.db" in audit.stderr, audit


def test_commands_that_reach_no_target_read_a_config_whose_target_variables_are_unset(tmp_path: Path):
    # examples/ssh/README.md: the agent's terminal runs `lictor token issue -c examples/ssh/lictor.yaml`; the
    # target's host, user and key come from variables set only where the gateway runs, and the token failed
    # with "environment variable LICTOR_SSH_HOST is not set". `lictor run` still needs them.
    config = tmp_path / "lictor.yaml"
    approvals_port = free_port()
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: []\n"
        f"approvals:\n  listen: '127.0.0.1:{approvals_port}'\n"
        "  webhooks: [{url: '${LICTOR_TEST_UNSET_HOOK}', secret: '${LICTOR_TEST_UNSET_HOOK_SECRET}'}]\n"
        "targets:\n  host1:\n    protocol: ssh\n    listen: 127.0.0.1:2222\n"
        "    upstream:\n      host: ${LICTOR_TEST_UNSET_HOST}\n      user: ${LICTOR_TEST_UNSET_USER}\n"
    )
    token = lictor("token", "issue", "-c", str(config), "--sub", "bot-7").stdout.strip()
    assert token.count(".") == 2 and (tmp_path / "state" / "issuer.key").exists()
    for args, expected in [
        (("status",), "no gateway has run with state directory"),
        (("audit", "list"), "no audit log at"),
        (("approvals", "list", "--token", token, "--timeout", "2"), "cannot reach the gateway's approvals API"),
        (("sessions", "list"), "no recordings at"),
    ]:
        out = lictor(*args, "-c", str(config), check=False)
        assert out.returncode != 0 and expected in out.stderr and "is not set" not in out.stderr, (args, out)
    run = lictor("run", "-c", str(config), check=False)
    assert run.returncode == 1 and "environment variable LICTOR_TEST_UNSET_HOOK is not set" in run.stderr, run


def test_audit_verify_detects_tampering_through_the_cli(tmp_path: Path):
    from lictor import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    for i in range(5):
        log.append("decision", {"n": i})
    log.close()
    assert lictor("audit", "verify", "--state-dir", str(tmp_path)).returncode == 0
    sqlite3.connect(tmp_path / "audit.db", isolation_level=None).execute("DELETE FROM events WHERE seq = 3")
    proc = lictor("audit", "verify", "--state-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "event 3 is missing (deleted)" in proc.stdout


def test_audit_and_sessions_list_refuse_a_bad_since_or_limit_in_one_line(tmp_path: Path):
    # `audit list --since abc` ended with a traceback; `--limit -2` listed every event but the first two (and
    # `sessions list --limit -1` every session but the oldest); `--limit 0` listed everything.
    from lictor import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    for i in range(5):
        log.append("decision", {"n": i})
    log.close()
    since = lictor("audit", "list", "--state-dir", str(tmp_path), "--since", "abc", check=False)
    assert since.returncode == 2 and "Traceback" not in since.stderr, since
    assert "lictor audit list: --since: bad duration 'abc'" in since.stderr, since.stderr
    for args in (("audit", "list"), ("sessions", "list"), ("approvals", "list", "--url", "http://127.0.0.1:9")):
        for bad in ("-2", "0", "x"):
            out = lictor(
                *args,
                "--state-dir" if args[0] != "approvals" else "--token",
                str(tmp_path),
                "--limit",
                bad,
                check=False,
            )
            assert out.returncode == 2 and "argument --limit:" in out.stderr and out.stdout == "", (args, bad, out)
    listed = lictor("audit", "list", "--state-dir", str(tmp_path), "--json", "--limit", "2").stdout.splitlines()
    assert [json.loads(line)["n"] for line in listed] == [3, 4]


def test_kubeconfig_prints_a_usable_config(tmp_path: Path):
    import yaml

    doc = yaml.safe_load(lictor("kubeconfig", "--server", "https://127.0.0.1:8443", "--token", "T").stdout)
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:8443"
    assert doc["users"][0]["user"]["token"] == "T"


def test_test_names_a_misspelt_key_in_expect(tmp_path: Path):
    # `mask:` for `masked:` would be ignored and the case pass without checking what it means to check
    _ls_pack(tmp_path)
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n  - name: typo\n    identity: {sub: a}\n"
        "    request: {protocol: ssh, action: ls, attrs: {program: ls}}\n    expect: {action: allow, mask: [m]}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert (
        "unknown key 'mask' in expect (did you mean 'masked'?); expected one of: action, masked, rule, shadow"
        in proc.stdout
    )


def test_test_refuses_requests_whose_mistakes_no_rule_would_see(tmp_path: Path):
    # Each of these met no rule, so a case expecting a deny passed without testing anything.
    _ls_pack(tmp_path)
    (tmp_path / "p.yaml").write_text(
        (tmp_path / "p.yaml").read_text() + "      - {id: no-rm, protocol: ssh, when: {programs: rm}, action: deny}\n"
    )
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: proto, identity: {sub: a}, request: {protocol: shh, action: rm, attrs: {program: rm}}, expect: deny}\n"
        "  - {name: field, identity: {sub: a}, request: {protocol: ssh, action: rm, attrs: {programs: rm}}, expect: deny}\n"
        "  - {name: key, identity: {sub: a}, request: {protocol: ssh, comand: rm -rf /}, expect: deny}\n"
        "  - {name: right, identity: {sub: a}, request: {protocol: ssh, command: rm -rf /}, expect: {action: deny, rule: no-rm}}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout
    assert "proto -> no decision: error: unknown protocol 'shh' (loaded: " in proc.stdout
    assert (
        "field -> no decision: error: attrs.programs: rules read the 'programs' field from the attribute 'program'"
        in (proc.stdout)
    )
    assert (
        "key -> no decision: error: unknown key 'comand' in a ssh test request (did you mean 'command'?); expected one of: "
        in proc.stdout
    )
    assert "PASS" in proc.stdout and "1 passed, 3 failed" in proc.stdout


def test_test_cases_without_an_identity_or_of_the_wrong_shape_fail_clearly(tmp_path: Path):
    # without `identity:` the case asked as nobody and passed any `deny`; the wrong shapes printed
    # "'str' object has no attribute 'get'"; `rule: [ok]` failed an allowed case ("expected rule ['ok'], got ok")
    _ls_pack(tmp_path)
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: nobody, request: {protocol: ssh, command: rm -rf /}, expect: deny}\n"
        "  - {name: str, identity: agent-1, request: {protocol: ssh, command: ls}, expect: allow}\n"
        "  - {name: list, identity: {sub: a}, request: [ssh, ls], expect: allow}\n"
        "  - {name: rules, identity: {sub: a}, request: {protocol: ssh, command: ls}, expect: {action: allow, rule: [ok]}}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "nobody -> no decision: error: identity: is missing" in proc.stdout
    assert "str -> no decision: error: identity: must be a mapping" in proc.stdout
    assert "list -> no decision: error: request: must be a mapping" in proc.stdout
    assert "PASS" in proc.stdout and "rules -> allow by ok" in proc.stdout and "1 passed, 3 failed" in proc.stdout


def test_test_names_an_expected_rule_id_that_no_pack_has(tmp_path: Path):
    _ls_pack(tmp_path)
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n  - name: typo\n    identity: {sub: a}\n"
        "    request: {protocol: ssh, action: ls, attrs: {program: ls}}\n    expect: {action: allow, rule: okk}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "no loaded rule has the id 'okk' (expect.rule)" in proc.stdout


def test_test_names_a_misspelt_cases_key(tmp_path: Path):
    _ls_pack(tmp_path)
    (tmp_path / "a.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: ls ok, identity: {sub: a}, request: {protocol: ssh, action: ls, attrs: {program: ls}}, expect: allow}\n"
    )
    (tmp_path / "b.tests.yaml").write_text(
        "format: lictor-tests/v1\ncase:\n"
        "  - {name: rm denied, identity: {sub: a}, request: {protocol: ssh, action: rm, attrs: {program: rm}}, expect: allow}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert f"{tmp_path / 'b.tests.yaml'}:2:1: unknown key 'case' in a test file" in proc.stdout


def test_explain_and_test_need_a_target_when_rules_are_scoped_to_targets(tmp_path: Path):
    # Real requests always name their target; against none, `targets: [prod]` rules were skipped and a deny
    # reported as allowed.
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n      - {id: ok, protocol: ssh, when: {programs: [ls, rm]}, action: allow}\n"
        "      - {id: no-rm, protocol: ssh, targets: [prod], when: {programs: rm}, action: deny}\n"
    )
    proc = lictor("explain", str(tmp_path), "--sub", "a", "--protocol", "ssh", "--command", "rm x", check=False)
    assert "ALLOW" not in proc.stdout and "the request needs a target (rules no-rm" in proc.stdout
    assert proc.returncode == 2
    out = lictor("explain", str(tmp_path), "--sub", "a", "--protocol", "ssh", "--target", "prod", "--command", "rm x")
    assert "=> DENY (denied by rule no-rm" in out.stdout


def test_explain_and_test_with_a_config_load_the_packs_as_the_gateway_does(tmp_path: Path, capsys) -> None:
    # A deny scoped to `targets: [App]` when the config's target is `app`: `lictor run` refuses the pack and keeps
    # its last good policy, while `explain -c` and `test -c` read the edit as live and reported it denying.
    from lictor.cli import main

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n      - {id: ok, protocol: postgres, when: {statements: select}, action: allow}\n"
        "      - {id: no-orders, protocol: postgres, targets: [App], when: {tables: orders}, action: deny}\n"
    )
    (packs / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n  - name: no orders\n    identity: {sub: a}\n"
        "    request: {protocol: postgres, target: App, sql: select * from orders}\n"
        "    expect: {action: deny, rule: no-orders}\n"
    )
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: [packs]\n"
        f"targets:\n  app:\n    protocol: postgres\n    listen: 127.0.0.1:{free_port()}\n    upstream: {{host: db}}\n"
    )
    refused = f"{packs / 'p.yaml'}:8:55: unknown target 'App' (targets in the gateway config: app)"
    assert main(["check", "-c", str(config)]) == 1
    assert refused in capsys.readouterr().out
    for command in (["test"], ["explain", "--sub", "a", "--target", "App", "--sql", "select * from orders"]):
        assert main([command[0], "-c", str(config), *command[1:]]) == 1
        out = capsys.readouterr().out
        assert refused in out and "DENY" not in out and "passed" not in out, out
    # and a request to a target the gateway does not have is not explained as if it reached one
    (packs / "p.yaml").write_text((packs / "p.yaml").read_text().replace("[App]", "[app]"))
    assert main(["explain", "-c", str(config), "--sub", "a", "--target", "App", "--sql", "select 1"]) == 2
    assert "unknown target 'App' (targets in " in capsys.readouterr().out
    assert main(["explain", "-c", str(config), "--sub", "a", "--target", "app", "--sql", "select * from orders"]) == 0
    assert "=> DENY (denied by rule no-orders" in capsys.readouterr().out


def test_run_reports_a_recordings_directory_it_cannot_make_without_a_traceback(tmp_path: Path):
    # A file where the recordings directory should be ended `lictor run` with a Python traceback.
    (tmp_path / "notadir").write_text("")
    (tmp_path / "packs").mkdir()
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: [{tmp_path / 'packs'}]\n"
        f"recordings:\n  sinks:\n    - {{type: local, path: {tmp_path / 'notadir'}}}\n"
    )
    out = lictor("run", "-c", str(config), check=False, timeout=60)
    assert out.returncode == 1, out
    assert "gateway failed to start" in out.stderr and "notadir" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_run_on_a_state_dir_a_running_gateway_holds_says_so_without_a_traceback(gateway_factory):
    # A second `lictor run` on the same state_dir (a forgotten `make run` in another terminal) ended
    # with a Python traceback around the one line that says what to do.
    gw = gateway_factory({"rulepacks": []})
    out = lictor("run", "-c", str(gw.config_path), check=False, timeout=60)
    assert out.returncode == 1, out
    assert "gateway failed to start" in out.stderr and "each gateway needs its own state_dir" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def _run_with_a_port_taken(tmp_path: Path, rest: Callable[[int], str]) -> tuple[int, Any]:
    """``lictor run`` of a config whose ``rest`` is given a port something else listens on; its port and result."""
    (tmp_path / "packs").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "lictor.yaml"
        config.write_text(
            f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: [{tmp_path / 'packs'}]\n" + rest(port)
        )
        return port, lictor("run", "-c", str(config), check=False, timeout=60)


def test_run_on_an_approvals_address_in_use_names_the_setting_and_what_to_do(tmp_path: Path):
    # Every example's approvals page is on 127.0.0.1:8470: a second example started on the same machine
    # failed with the bind error alone, which named neither approvals.listen nor a way out.
    config = tmp_path / "lictor.yaml"
    port, out = _run_with_a_port_taken(tmp_path, lambda port: f"approvals:\n  listen: 127.0.0.1:{port}\n")
    assert out.returncode == 1, out
    assert (
        f"gateway failed to start: {config}:5:11: approvals.listen 127.0.0.1:{port}: cannot listen there "
        "(address already in use): stop what listens there, or give this gateway another address in approvals.listen"
    ) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_an_approvals_port_past_65535_is_refused_by_check():
    # LICTOR_APPROVALS_PORT=99999 passed `lictor check -c`, and the gateway served the approvals page on 34463
    # (the socket layer wraps the port) while `lictor approvals -c` looked for it on 99999.
    env = {**os.environ, "LICTOR_APPROVALS_PORT": "99999"}
    proc = lictor("check", "-c", str(ROOT / "examples" / "postgres" / "lictor.yaml"), env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "approvals.listen '127.0.0.1:99999': use host:port with a port from 1 to 65535, e.g. 127.0.0.1:8470"
        in proc.stdout
    ), proc.stdout


@pytest.mark.parametrize("protocol", ["postgres", "ssh", "http"])
def test_run_on_a_listen_address_in_use_names_the_target_and_what_to_do(tmp_path: Path, protocol: str):
    # The quickstart and the PostgreSQL example listen on 127.0.0.1:6432, where a pgbouncer often is (and the
    # SSH example on 2222): the gateway printed the bind error alone, which named neither the target nor a way out.
    if protocol == "postgres":
        upstream = "{host: 127.0.0.1, user: postgres}"
    elif protocol == "http":
        upstream = "https://127.0.0.1:9/\n    tls: {enabled: false}"
    else:
        _ssh_key_and_known_hosts(tmp_path / "ops_key", tmp_path / "known_hosts", "web.internal")
        upstream = "{host: web.internal, user: ops, key: ops_key, known_hosts: known_hosts}"
    port, out = _run_with_a_port_taken(
        tmp_path,
        lambda port: (
            f"targets:\n  app:\n    protocol: {protocol}\n    listen: 127.0.0.1:{port}\n    upstream: {upstream}\n"
        ),
    )
    assert out.returncode == 1, out
    if protocol == "http":  # mitmproxy logs the reason itself
        assert (
            "address already in use" in out.stderr
            and (
                f"cannot listen for the HTTP/Kubernetes targets: app on 127.0.0.1:{port} (why is in the line above): "
                "stop what listens there, or give the target another listen address"
            )
            in out.stderr
        ), out.stderr
    else:
        assert (
            f"{protocol} target app: cannot listen on 127.0.0.1:{port} (address already in use): stop what listens "
            "there, or give the target another listen address"
        ) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_an_addon_that_cannot_be_loaded_is_one_line_naming_it(tmp_path: Path):
    """`--addon` and the config's `addons:` name a file or module; when it cannot be used the
    command says which and why, without a traceback."""
    _ls_pack(tmp_path)
    (tmp_path / "none.py").write_text("x = 1\n")
    (tmp_path / "refuses.py").write_text(
        "class Refuses:\n    name = 'refuses'\n\n    def load(self, loader):\n"
        "        raise RuntimeError('needs option x')\n\n\naddons = [Refuses()]\n"
    )
    # An addon that is a class, a list or no list at all: a class failed in `load` with a missing argument,
    # and a list loaded as an addon without hooks (then "no loaded addon serves protocol").
    (tmp_path / "klass.py").write_text("class Kv:\n    name = 'kv'\n\n\naddons = [Kv]\n")
    (tmp_path / "nested.py").write_text("class Kv:\n    name = 'kv'\n\n\naddon = [Kv()]\n")
    (tmp_path / "single.py").write_text("class Kv:\n    name = 'kv'\n\n\naddons = Kv()\n")
    cases = {
        "klass.py": "addon klass.py cannot be loaded: TypeError: klass.py: `addons` holds the class Kv; give an "
        "instance: Kv()",
        "nested.py": "addon nested.py cannot be loaded: TypeError: nested.py: `addon` is one addon object; name several "
        "with `addons = [...]`",
        "single.py": "addon single.py cannot be loaded: TypeError: single.py: `addons` must be a list of addon "
        "objects, got Kv",
        "missing.py": "addon missing.py cannot be loaded: FileNotFoundError: addon file",
        "no_such_module_xyz": "addon no_such_module_xyz cannot be loaded: ModuleNotFoundError",
        "none.py": "addon none.py cannot be loaded: ImportError: none.py: defines neither",
        "refuses.py": "addon refuses.py: addon 'refuses' failed in hook 'load': RuntimeError: needs option x",
    }
    for spec, message in cases.items():
        for command in ("check", "test", "explain") if spec == "missing.py" else ("check",):
            proc = lictor(command, "--addon", spec, "p.yaml", cwd=tmp_path, check=False)
            assert proc.returncode == 1, (command, spec, proc.stderr)
            assert message in proc.stderr and "Traceback" not in proc.stderr, (command, spec, proc.stderr)
    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\naddons: [refuses.py]\n")
    # one the config names says where it is named
    problem = f"{config}:3:10: addon refuses.py: addon 'refuses' failed in hook 'load'"
    proc = lictor("run", "-c", str(config), check=False, timeout=20)
    assert proc.returncode == 1
    assert f"gateway failed to start: {problem}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = lictor("check", "-c", str(config), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(problem), proc.stderr


def test_an_addon_request_builder_that_fails_says_what_it_was_given(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {sub: '*'}, roles: [r]}]\n"
        "roles:\n  r:\n    rules:\n      - {id: ok, protocol: line, when: {verbs: get}, action: allow}\n"
    )
    addon = str(ROOT / "tests" / "addons" / "lineproto.py")

    def explain(request: str) -> subprocess.CompletedProcess[str]:
        args = ("explain", "--addon", addon, "p.yaml", "--sub", "a", "--request", request)
        return lictor(*args, cwd=tmp_path, check=False)

    assert "=> ALLOW" in explain("{protocol: line, command: get x}").stdout
    proc = explain("{protocol: line, line: get x}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the 'line' addon cannot build a request from line, protocol: KeyError: 'command'" in proc.stdout


def test_every_command_and_option_says_what_it_is_in_its_help():
    # `lictor token issue --help` listed --sub, --claim, --ttl and --state-dir without a word, `lictor audit
    # --help` its list and verify commands, and `-c` read "targets, extra addons" where only state_dir counts.
    import argparse

    from lictor.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if a.help}
                for sub_name, sub in action.choices.items():
                    if sub_name not in described:
                        missing.append(f"{name} {sub_name}")
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "lictor")
    assert not missing, missing


def test_test_fails_a_deny_that_holds_only_because_the_identity_has_no_roles(tmp_path: Path):
    # A misspelt claim left the identity without roles: default deny, so every `deny` case passed
    # whatever the rules under test said (here: none of them denies `rm`).
    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {claims: {role: ops}}, roles: [ops]}]\n"
        "roles:\n  ops:\n    rules:\n      - {id: ok, protocol: ssh, when: {programs: [ls, rm]}, action: allow}\n"
    )
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: typo, identity: {sub: a, rol: ops}, request: {protocol: ssh, command: rm -rf /}, expect: deny}\n"
        "  - {name: stranger, identity: {sub: a}, request: {protocol: ssh, command: ls},"
        " expect: {action: deny, rule: 'lictor:default-deny'}}\n"
        "  - {name: ops, identity: {sub: a, role: ops}, request: {protocol: ssh, command: ls}, expect: allow}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout
    assert (
        "typo -> deny by lictor:default-deny: the identity has no roles (no `identities` entry matches its claims), so it is denied "
        "by default whatever the rules say; give it claims that map to a role, or expect rule: "
        "lictor:default-deny to test exactly that"
    ) in proc.stdout
    assert "2 passed, 1 failed" in proc.stdout


def test_test_fails_a_deny_whose_claims_grant_nothing_beyond_a_baseline_role(tmp_path: Path, capsys) -> None:
    # The shipped examples grant a guardrail role to `sub: "*"`: with a misspelt claim the identity still held
    # that role, so the check for an identity without roles let every such `deny` case pass vacuously.
    from lictor.cli import main

    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities:\n  - {match: {sub: '*'}, roles: [base]}\n"
        "  - {match: {claims: {role: ops}}, roles: [ops]}\nroles:\n"
        "  base:\n    rules:\n      - {id: no-shutdown, protocol: ssh, when: {programs: shutdown}, action: deny}\n"
        "  ops:\n    rules:\n      - {id: ok, protocol: ssh, when: {programs: [ls, rm]}, action: allow}\n"
    )
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: typo, identity: {sub: a, rol: ops}, request: {protocol: ssh, command: rm -rf /}, expect: deny}\n"
        "  - {name: value, identity: {sub: a, role: op}, request: {protocol: ssh, command: rm -rf /}, expect: deny}\n"
        "  - {name: ops, identity: {sub: a, role: ops}, request: {protocol: ssh, command: cat x}, expect: deny}\n"
        "  - {name: base, identity: {sub: a}, request: {protocol: ssh, command: cat x}, expect: deny}\n"
        "  - {name: stranger, identity: {sub: a, rol: ops}, request: {protocol: ssh, command: ls},"
        " expect: {action: deny, rule: 'lictor:default-deny'}}\n"
    )
    assert main(["test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        "typo -> deny by lictor:default-deny: the identity's claims (rol) grant no role beyond those of every "
        "identity with its sub (base), so it is denied by default whatever the rules under test say; no "
        "`identities` entry reads the claim 'rol' (did you mean 'role'?); give it claims that map to a role, or "
        "expect rule: lictor:default-deny to test exactly that"
    ) in out, out
    assert "value -> deny by lictor:default-deny: the identity's claims (role) grant no role beyond" in out, out
    assert "3 passed, 2 failed" in out, out


def test_test_refuses_an_expected_rule_list_that_names_no_rule(tmp_path: Path, capsys) -> None:
    # `rule: []` checked no rule, and as a rule was "named" the case also escaped the check for an identity that
    # holds no role: a misspelt claim passed; `rule: 5` failed with "'int' object is not iterable"
    from lictor.cli import main

    (tmp_path / "p.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: p}\nidentities: [{match: {claims: {role: ops}}, roles: [ops]}]\n"
        "roles:\n  ops:\n    rules:\n      - {id: ok, protocol: ssh, when: {programs: [ls, rm]}, action: allow}\n"
    )
    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: empty, identity: {sub: a, rol: ops}, request: {protocol: ssh, command: rm -rf /},"
        " expect: {action: deny, rule: []}}\n"
        "  - {name: number, identity: {sub: a, role: ops}, request: {protocol: ssh, command: ls},"
        " expect: {action: allow, masked: 5}}\n"
    )
    assert main(["test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "empty -> no decision: error: expect.rule: an empty list names no rule; name the deciding rule" in out, out
    assert "number -> no decision: error: expect.masked must be a rule id or a list of rule ids" in out, out
    assert "0 passed, 2 failed" in out, out


def test_token_issue_refuses_a_config_whose_gateway_would_refuse_the_token(tmp_path: Path):
    # With only a JWKS issuer configured, a Lictor-signed token is refused at every login.
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nidentity:\n  issuers:\n"
        "    - {type: jwks, issuer: 'https://idp.example', jwks_url: 'https://idp.example/jwks'}\n"
    )
    proc = lictor("token", "issue", "-c", str(config), "--sub", "agent-1", check=False)
    assert proc.returncode == 2 and not proc.stdout
    assert "trusts no `type: lictor` issuer, so its gateway would refuse this token" in proc.stderr
    assert not (tmp_path / "state" / "issuer.key").exists()
    config.write_text(config.read_text() + "    - {type: lictor}\n")
    proc = lictor("token", "issue", "-c", str(config), "--sub", "agent-1")
    assert proc.stdout.count(".") == 2


def test_check_with_a_config_reports_what_run_would_refuse_and_where(tmp_path: Path):
    # `check -c` checked the rule packs only: a target, option or section the gateway refuses at start-up
    # passed CI and stopped the deployment.
    _ls_pack(tmp_path)
    state = tmp_path / "state"
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {state}\nrulepacks: [p.yaml]\n"
        "options: {http_idle_timeout: 'ten'}\n"
        "recordings: {mode: strickt}\n"
        "approvals: {listen: nohost}\n"
        "targets:\n"
        "  db:\n"
        "    protocol: postgres\n"
        "    listen: 127.0.0.1:99999\n"
        "    upstream: {host: db.internal}\n"
        "  web:\n"
        "    protocol: ssh\n"
        "    listen: 127.0.0.1:2222\n"
        "    upstream: {host: web.internal, user: ops, key: k, known_hosts: kh, prot: 22}\n"
    )
    proc = lictor("check", "-c", str(config), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:-1] == [
        f"{config}:4:30: option 'http_idle_timeout' must be int, got str",
        f"{config}:15:72: target 'web': upstream: unknown key 'prot' (did you mean 'port'?)",
        f"{config}:5:20: recordings.mode: 'strickt' is not one of ['best_effort', 'strict']",
        f"{config}:6:21: approvals.listen 'nohost': use host:port with a port from 1 to 65535, e.g. 127.0.0.1:8470",
    ], proc.stdout
    assert lines[-1] == f"4 error(s) in {config}", proc.stdout
    assert not state.exists()  # nothing was started or written

    # the targets' own checks (the addons' configure hooks) once their schemas pass; `run` says the same
    config.write_text(
        f"version: 1\nstate_dir: {state}\n"
        "targets:\n"
        "  db:\n"
        "    protocol: postgres\n"
        "    listen: 127.0.0.1:99999\n"
        "    upstream: {host: db.internal}\n"
    )
    proc = lictor("check", "-c", str(config), check=False)
    problem = f"{config}:4:3: target 'db': listen address '127.0.0.1:99999' must be HOST:PORT"
    assert proc.returncode == 1 and proc.stdout.splitlines() == [problem, f"1 error(s) in {config}"], proc.stdout
    assert not state.exists()
    run = lictor("run", "-c", str(config), check=False)
    assert run.returncode == 1 and problem in run.stderr, run.stderr


def test_check_with_a_good_config_starts_nothing(tmp_path: Path):
    state = tmp_path / "state"
    config = tmp_path / "lictor.yaml"
    port = free_port()
    config.write_text(
        f"version: 1\nstate_dir: {state}\n"
        f"targets:\n  api:\n    protocol: http\n    listen: 127.0.0.1:{port}\n    upstream: https://api.internal\n"
        f"  db:\n    protocol: postgres\n    listen: 127.0.0.1:{port + 1}\n    upstream: {{host: db.internal}}\n"
    )
    proc = lictor("check", "-c", str(config), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"OK: {config}, 2 target(s); no rule packs (every request is denied)"
    assert not state.exists()


def test_run_refuses_an_unknown_log_level_option(tmp_path: Path):
    (tmp_path / "lictor.yaml").write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\n")
    proc = lictor("run", "-c", str(tmp_path / "lictor.yaml"), "--log-level", "verbose", check=False, timeout=15)
    assert proc.returncode == 2 and "invalid choice: 'verbose'" in proc.stderr, proc.stderr
    assert not (tmp_path / "state").exists()


def _ssh_key_and_known_hosts(key_file: Path, known_hosts: Path, host: str) -> None:
    """An SSH private key for an upstream, and a known_hosts file that names ``host`` with its public key."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file.write_bytes(key.export_private_key())
    known_hosts.write_text(f"{host} " + key.export_public_key().decode())


def test_check_with_a_config_creates_no_file_the_config_names(tmp_path: Path):
    # an SSH target's configured host key is created when the gateway starts; `check -c` made it too
    _ssh_key_and_known_hosts(tmp_path / "ops_key", tmp_path / "known_hosts", "web.internal")
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\n"
        f"targets:\n  web:\n    protocol: ssh\n    listen: 127.0.0.1:{free_port()}\n    host_key: keys/gw_host\n"
        "    upstream: {host: web.internal, user: ops, key: ops_key, known_hosts: known_hosts}\n"
    )
    proc = lictor("check", "-c", str(config), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "keys").exists() and not (tmp_path / "state").exists()


def test_a_broken_issuer_key_is_named_by_run_check_and_token_issue(tmp_path: Path):
    # `lictor token issue` ended in a traceback, `lictor run` said "lictor.yaml:1:1: Unable to load PEM file",
    # and `check -c` found nothing wrong
    state = tmp_path / "state"
    state.mkdir()
    (state / "issuer.key").write_text("garbage\n")
    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {state}\n")
    problem = f"{state / 'issuer.key'}: Lictor's own issuer key is not an unencrypted Ed25519 private key in PEM ("
    token = lictor("token", "issue", "-c", str(config), "--sub", "a", check=False)
    assert token.returncode == 1 and token.stderr.startswith(problem), token.stderr
    checked = lictor("check", "-c", str(config), check=False)
    assert checked.returncode == 1 and checked.stdout.startswith(problem), checked.stdout
    run = lictor("run", "-c", str(config), check=False, timeout=15)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"ERROR lictor: {problem}" in run.stderr, run.stderr


def test_an_issuer_key_that_cannot_be_read_is_named_by_token_issue_and_run(tmp_path: Path):
    # `lictor token issue` by a user not allowed to read the key (or with a directory in its place) ended in
    # a traceback
    state = tmp_path / "state"
    (state / "issuer.key").mkdir(parents=True)
    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {state}\n")
    problem = f"{state / 'issuer.key'}: cannot read Lictor's own issuer key: Is a directory"
    token = lictor("token", "issue", "-c", str(config), "--sub", "a", check=False)
    assert token.returncode == 1 and token.stderr.startswith(problem), token.stderr
    assert "Traceback" not in token.stderr
    run = lictor("run", "-c", str(config), check=False, timeout=15)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"ERROR lictor: {problem}" in run.stderr, run.stderr


def test_check_strict_fails_on_a_variable_it_read_as_empty(tmp_path: Path):
    # `check -c` reads an unset variable under targets: as empty, with a warning; --strict ("warnings fail
    # too") passed it, and the CI job that set --strict to catch an environment it forgot passed as well
    _ls_pack(tmp_path)
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: [p.yaml]\n"
        "targets:\n  db:\n    protocol: postgres\n    listen: 127.0.0.1:6432\n"
        "    upstream: {host: db.internal, password: '${DB_PASSWORD}'}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DB_PASSWORD"}
    warning = f"{config}:8:45: warning: environment variable DB_PASSWORD is not set here (lictor run requires it)"
    relaxed = lictor("check", "-c", str(config), check=False, env=env)
    assert relaxed.returncode == 0 and relaxed.stdout.startswith(warning + "\nOK: "), relaxed.stdout
    strict = lictor("check", "--strict", "-c", str(config), check=False, env=env)
    assert strict.returncode == 1 and strict.stdout.startswith(warning + "\n"), strict.stdout
    assert strict.stdout.splitlines()[-1].endswith(f"and 1 in {config}; --strict fails on warnings"), strict.stdout
    assert lictor("check", "--strict", "-c", str(config), env={**env, "DB_PASSWORD": "x"}).stdout.startswith("OK: ")


@pytest.mark.parametrize(
    ("protocol", "upstream", "problem"),
    [
        # each was accepted at start-up and failed at every agent's login, or connected elsewhere
        ("postgres", "{host: ''}", "upstream.host is empty"),
        ("postgres", "{host: db.internal, port: 99999}", "upstream.port 99999 is out of range (1-65535)"),
        ("postgres", "{host: db.internal, port: 0}", "upstream.port 0 is out of range (1-65535)"),
        ("postgres", "{host: db.internal, port: five}", "upstream.port 'five' is not a port number"),
        ("ssh", "{host: '', user: ops, key: k, known_hosts: kh}", "upstream.host is empty"),
        ("ssh", "{host: web, user: '', key: k, known_hosts: kh}", "upstream.user is empty"),
        # an empty file named the config's directory: "cannot read DIR: Is a directory"
        ("ssh", "{host: web, user: ops, key: '', known_hosts: kh}", "upstream.key is empty"),
        ("ssh", "{host: web, user: ops, key: k, known_hosts: ''}", "upstream.known_hosts is empty"),
        ("ssh", "{host: web, user: ops, port: twenty-two, key: k, known_hosts: kh}", "upstream.port 'twenty-two' is"),
    ],
)
def test_check_refuses_an_upstream_no_connection_can_use(tmp_path: Path, capsys, protocol, upstream, problem):
    from lictor.cli import main

    _ssh_key_and_known_hosts(tmp_path / "k", tmp_path / "kh", "web")
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\ntargets:\n  t:\n    protocol: {protocol}\n"
        f"    listen: 127.0.0.1:{free_port()}\n    upstream: {upstream}\n"
    )
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{config}:4:3: ") and problem in out.splitlines()[0], out


def test_an_option_an_addon_refuses_is_reported_where_it_is_set(tmp_path: Path, capsys):
    # the addon's configure hook names the option; the position was that of `targets:` (or the file's start)
    from lictor.cli import main

    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\noptions:\n  http_buffer_limit: 1000\n  http_idle_timeout: -5\n"
        f"targets:\n  api: {{protocol: http, listen: '127.0.0.1:{free_port()}', upstream: 'https://api.internal'}}\n"
    )
    assert main(["check", "-c", str(config)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{config}:5:22: addon 'http' refused the config: http_idle_timeout must be positive"
    )


def test_packs_given_with_a_config_that_loads_more_say_so_when_they_do_not_load(capsys) -> None:
    # The quickstart's pack inherits a role of the baseline packs its config also loads: given alone with -c, it
    # failed with "unknown role 'read-only'" and nothing said the gateway reads it together with others.
    from lictor.cli import main

    for command in ("test", "check"):
        args = [command, "examples/quickstart/rulepacks", "-c", "examples/quickstart/lictor.yaml"]
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            assert main(args) == 1
            out = capsys.readouterr().out
            assert "unknown role 'read-only'" in out, out
            assert out.splitlines()[-1] == (
                "note: only the paths given were read; examples/quickstart/lictor.yaml also loads rulepacks: leave "
                f"the paths out to read the packs as the gateway does (lictor {command} -c examples/quickstart/lictor.yaml)"
            ), out
            assert main([command, "-c", "examples/quickstart/lictor.yaml"]) == 0
            capsys.readouterr()
        finally:
            os.chdir(cwd)


def test_audit_verify_reports_an_emptied_or_unreadable_log_and_writes_nothing(tmp_path: Path):
    # An audit log emptied in place (`: > audit.db`) passed as "audit log OK: 0 events": verifying made it a new
    # log, with tables and a chain head, and with no verification key around it even created one. A file that
    # is not a database ended in a traceback.
    from lictor import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    for i in range(3):
        log.append("decision", {"n": i})
    log.close()
    db = tmp_path / "audit.db"
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"audit.db{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"")
    for command in ("verify", "list"):
        out = lictor("audit", command, "--state-dir", str(tmp_path), check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out
        assert f"audit log BROKEN: {db} holds no audit chain (emptied or replaced)" in out.stderr, out
    assert db.read_bytes() == b""
    db.write_bytes(b"not a database at all, but long enough to look like a file header.....")
    out = lictor("audit", "verify", "--state-dir", str(tmp_path), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    assert f"audit log BROKEN: {db} cannot be read (file is not a database)" in out.stderr, out
    # another SQLite file named with --db, with no verification key next to it: nothing is created there
    other = tmp_path / "other" / "index.db"
    other.parent.mkdir()
    sqlite3.connect(other).execute("CREATE TABLE sessions (id TEXT)").connection.close()
    out = lictor("audit", "verify", "--db", str(other), check=False)
    assert out.returncode == 1 and f"audit log BROKEN: {other} holds no audit chain" in out.stderr, out
    assert sorted(p.name for p in other.parent.iterdir()) == ["index.db"]
    tables = sqlite3.connect(other).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("sessions",)]


def test_audit_verify_without_its_key_says_where_it_looked(tmp_path: Path):
    # The verification key may be kept offline (only `audit verify` needs it); without it, or with a file that
    # is not a key, verify ended in a traceback.
    from lictor import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    log.append("decision", {"n": 1})
    log.close()
    key = tmp_path / "audit-verify.key"
    offline = tmp_path / "offline.key"
    key.rename(offline)
    out = lictor("audit", "verify", "--state-dir", str(tmp_path), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert f"no audit verification key at {key}: give the key kept offline with --key FILE" in out.stderr, out
    assert lictor("audit", "list", "--state-dir", str(tmp_path)).returncode == 0  # listing needs no key
    ok = lictor("audit", "verify", "--state-dir", str(tmp_path), "--key", str(offline))
    assert "audit log OK: 1 events" in ok.stdout
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    out = lictor("audit", "verify", "--state-dir", str(tmp_path), "--key", str(bad), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert f"{bad} is not an audit verification key (64 hex digits)" in out.stderr, out


def test_sessions_commands_name_a_remote_sink_they_cannot_reach(tmp_path: Path):
    # `lictor sessions list --source pg` with the database down ended in a psycopg traceback.
    pg_port, s3_port = free_port(), free_port()
    config = tmp_path / "lictor.yaml"
    config.write_text(
        f"version: 1\nstate_dir: {tmp_path / 'state'}\nrulepacks: []\n"
        "recordings:\n  sinks:\n    - {type: local}\n"
        f"    - {{type: postgres, name: pg, dsn: 'host=127.0.0.1 port={pg_port} dbname=x user=x connect_timeout=2'}}\n"
        f"    - {{type: s3, name: archive, bucket: b, endpoint_url: 'http://127.0.0.1:{s3_port}', region: us-east-1,"
        " access_key_id: k, secret_access_key: s}\n"
    )
    for source in ("pg", "archive"):
        for args in (("sessions", "list"), ("sessions", "verify", "--all"), ("replay", "abc")):
            out = lictor(*args, "-c", str(config), "--source", source, check=False, timeout=120)
            assert out.returncode == 1 and "Traceback" not in out.stderr, (source, args, out.stderr[-600:])
            assert f"lictor: cannot read the recordings sink {source!r}: " in out.stderr, (source, args, out.stderr)


def _refused_http_requests(tmp_path: Path, sub: str, count: int = 1) -> GatewayProcess:
    """A gateway with one HTTP target and no rule packs, stopped after ``count`` requests with a token of ``sub``,
    each refused (default deny: a session and a decision each, nothing sent upstream)."""
    import urllib.error
    import urllib.request

    from tests.conftest import wait_port

    port = free_port()
    target = {"protocol": "http", "listen": f"127.0.0.1:{port}", "upstream": "http://127.0.0.1:9"}
    gw = GatewayProcess(tmp_path, {"rulepacks": [], "targets": {"api": {**target, "tls": {"enabled": False}}}})
    gw.start()
    try:
        wait_port(port)
        token = gw.token(sub)
        for _ in range(count):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/x", headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 403
    finally:
        gw.stop()
    return gw


def test_audit_and_sessions_list_show_a_subject_s_line_breaks_escaped(tmp_path: Path):
    # A token's subject is text the token's holder may have chosen: a newline in it started a line of its own in
    # `audit list` and `sessions list`, which read as another event or session (here, another identity's).
    forged = "    99 2026-11-30 12:00:00 decision         admin"
    gw = _refused_http_requests(tmp_path, f"agent-7\n{forged}")
    state = str(gw.state_dir)
    events = lictor("audit", "list", "--state-dir", state, "--json").stdout.splitlines()
    audit = lictor("audit", "list", "--state-dir", state).stdout.splitlines()
    sessions = lictor("sessions", "list", "--state-dir", state).stdout.splitlines()
    assert len(audit) == 1 + len(events), audit  # a heading, then one line per event
    assert len(sessions) == 1 + 1, sessions  # a heading and the one session
    of_the_session = [line for line in audit[1:] if line.split()[3] in ("session.start", "decision", "session.end")]
    assert len(of_the_session) == 3, audit
    for line in [*of_the_session, sessions[1]]:
        assert "agent-7\\x0a" in line, line


def test_listings_escape_what_an_edited_store_says(tmp_path: Path):
    # `sessions list` printed the id, target and protocol of the index, and `audit list` the kind and protocol of
    # the events, as they were: a row edited by hand ("\x1b[1A\x1b[2K" in an id) erased the line above it, and a
    # line break started a line that read as another session.
    import sqlite3

    gw = _refused_http_requests(tmp_path, "agent-7", count=2)
    state = gw.state_dir
    erase = "\x1b[1A\x1b[2K"
    with sqlite3.connect(state / "recordings" / "index.db") as db:
        [(sid,)] = db.execute("SELECT id FROM sessions ORDER BY started_at LIMIT 1").fetchall()
        db.execute(
            "UPDATE sessions SET id = ?, protocol = ?, target = ? WHERE id = ?", (erase + sid, "http\nx", "a\tb", sid)
        )
    db.close()
    with sqlite3.connect(state / "audit.db") as db:
        db.execute(
            'UPDATE events SET body = replace(body, \'"protocol":"http"\', ?)', ('"protocol":"' + '\\u001b[8m"',)
        )
        db.execute('UPDATE events SET body = replace(body, \'"kind":"decision"\', ?)', ('"kind":"' + '\\u001b[2J"',))
    db.close()
    sessions = lictor("sessions", "list", "--state-dir", str(state)).stdout
    audit = lictor("audit", "list", "--state-dir", str(state)).stdout
    assert "\\x1b[1A" in sessions and "http\\x0ax" in sessions and "a\\x09b" in sessions, sessions
    assert len(sessions.splitlines()) == 1 + 2, sessions
    assert "\\x1b[2J" in audit and "\\x1b[8m" in audit, audit
    for shown in (sessions, audit):
        assert "\x1b" not in shown and "\t" not in shown, shown


def test_audit_list_lists_an_edited_log_that_audit_verify_names(tmp_path: Path):
    # `audit verify` names an edited event; `audit list`, which shows what the edit changed, stopped on it with a
    # TypeError traceback when a rule id was a number or the time a string.
    import sqlite3

    gw = _refused_http_requests(tmp_path, "a")
    state = str(gw.state_dir)
    with sqlite3.connect(gw.state_dir / "audit.db") as db:
        db.execute(
            """UPDATE events SET body = replace(body, '"rule_ids":[', '"rule_ids":[7,') WHERE kind = 'decision'"""
        )
        db.execute(
            """UPDATE events SET body = replace(body, '"ts":', '"ts":"noon","was":') WHERE kind = 'session.end'"""
        )
        db.execute(
            """UPDATE events SET body = replace(body, '"identity":{', '"identity":"x","i":{') WHERE kind = 'session.start'"""
        )
    db.close()
    assert "BROKEN" in lictor("audit", "verify", "--state-dir", state, check=False).stdout
    listed = lictor("audit", "list", "--state-dir", state, check=False)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(" decision " in line and "7,lictor:default-deny" in line for line in lines), listed.stdout
    assert any(line.split()[1:3] == ["?", "session.end"] for line in lines), listed.stdout


def test_check_reports_the_errors_a_duplicate_id_or_role_would_hide_in_the_same_run(tmp_path: Path):
    # A duplicate rule id, a reserved one or a duplicate role stopped the checking of that rule or role: its other
    # errors showed only in the next run, once the name was fixed.
    (tmp_path / "a.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: a}\nroles:\n  reader:\n    rules:\n"
        "      - {id: r1, protocol: postgres, when: {statements: [select]}, action: allow}\n"
        "      - {id: r1, protocol: postgers, action: allow}\n"
        "      - {id: 'lictor:r2', protocol: postgres, when: {statement: [select]}, action: allow}\n"
        "detectors:\n  emp: {pattern: 'EMP-[0-9]{6}'}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: b}\ndetectors:\n  emp: {pattern: '(?<=x)y'}\nroles:\n  reader:\n"
        "    inherits: [ghost]\n    rules:\n      - {id: r3, protocol: postgres, action: alow}\n"
    )
    proc = lictor("check", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for expected in (
        f"{a}:7:14: duplicate rule id 'r1' (also at {a}:6:14)",
        f"{a}:7:28: unknown protocol 'postgers'",
        f"{a}:8:14: rule id 'lictor:r2': ids starting with 'lictor:' are reserved",
        f"{a}:8:54: unknown key 'statement' in roles.reader.rules.2.when (did you mean 'statements'?)",
        f"{b}:4:8: duplicate detector 'emp'",
        f"{b}:4:18: detector 'emp'",
        f"{b}:6:3: duplicate role 'reader' (also at {a}:4:3)",
        f"{b}:7:16: role 'reader' inherits: unknown role 'ghost'",
        f"{b}:9:46: roles.reader.rules.0.action: unknown value 'alow' (did you mean 'allow'?)",
    ):
        assert expected in proc.stdout, (expected, proc.stdout)
    assert proc.stdout.splitlines()[-1] == "9 error(s), 0 warning(s) in 2 pack file(s)", proc.stdout


def test_test_fails_on_a_document_among_the_tests_that_is_not_tests(tmp_path: Path):
    # a second document whose format is misspelt ran none of its cases, and the run passed
    _ls_pack(tmp_path)
    case = "cases:\n  - {name: n, identity: {sub: a}, request: {protocol: ssh, command: ls}, expect: allow}\n"
    (tmp_path / "p.tests.yaml").write_text(f"format: lictor-tests/v1\n{case}---\nformat: lictor-test/v1\n{case}")
    proc = lictor("check", str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout
    assert f"{tmp_path / 'p.tests.yaml'}:5:1: warning: a document of format 'lictor-test/v1'" in proc.stdout
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"ERROR {tmp_path / 'p.tests.yaml'}:5:1: a document of format 'lictor-test/v1'" in proc.stdout
    assert proc.stdout.strip().endswith("1 passed, 1 failed"), proc.stdout


def test_explain_and_test_refuse_requests_and_identities_of_the_wrong_shape_clearly(tmp_path: Path):
    # `attrs: [..]` ended `lictor explain` with a traceback; a quoted boolean (`modifies: "false"`, which is true), a
    # list for the target, or claims given as a list were taken as some other request or identity than the case shows
    _ls_pack(tmp_path)
    for request, problem in (
        ("{protocol: postgres, action: select, attrs: [1]}", "attrs must be a mapping of attribute names to values"),
        ("{protocol: postgres, action: select, attrs: {kinds: [select], modifies: 'false'}}", "attrs.modifies: true"),
        ("{protocol: http, action: GET, attrs: {method: GET, body_size: '5'}}", "attrs.body_size: a number expected"),
        ("{protocol: ssh, action: exec, attrs: {program: {ls: 1}}}", "attrs.program: a string or a list of strings"),
        ("{protocol: ssh, command: ls, target: [a, b]}", "target must be a string, not a list (['a', 'b'])"),
        ("{protocol: ssh, action: [exec]}", "action must be a string, not a list (['exec'])"),
    ):
        proc = lictor("explain", str(tmp_path), "--request", request, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout.startswith(f"cannot build the request: {problem}"), proc.stdout
    proc = lictor("explain", str(tmp_path), "--claim", "=x", "--sql", "SELECT 1", check=False)
    assert proc.returncode == 1 and "expected KEY=VALUE, got '=x' (no key)" in proc.stderr, proc.stderr
    # an empty statement is a PostgreSQL request, not one without a protocol
    proc = lictor("explain", str(tmp_path), "--sql", "", check=False)
    assert proc.returncode == 0 and "request: empty query" in proc.stdout, proc.stdout

    (tmp_path / "p.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: claims, identity: {claims: [role]}, request: {protocol: ssh, command: ls}, expect: allow}\n"
        "  - {name: attrs, identity: {sub: a}, request: {protocol: ssh, action: exec, attrs: [ls]}, expect: deny}\n"
        "  - {name: action, identity: {sub: a}, request: {protocol: ssh, command: ls}, expect: {action: [allow]}}\n"
        "  - {name: alow, identity: {sub: a}, request: {protocol: ssh, command: ls}, expect: alow}\n"
    )
    proc = lictor("test", str(tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    for line, name, problem in (
        (3, "claims", "identity.claims must be a mapping of claim names to values, not a list (['role'])"),
        (4, "attrs", "attrs must be a mapping of attribute names to values, not a list (['ls'])"),
        (5, "action", "expect.action: a list (['allow']) is not an action; expected one of: allow, deny, approve"),
        (6, "alow", "expect: a string ('alow') is not an action (did you mean 'allow'?)"),
    ):
        assert f"FAIL {tmp_path / 'p.tests.yaml'}:{line} {name} -> no decision: error: {problem}" in proc.stdout, (
            line,
            proc.stdout,
        )
