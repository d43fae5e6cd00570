"""The gateway process end to end, through a protocol addon that uses only the public API.

Covers fault injection (an addon that raises → audited denial), hot reload (a broken edit keeps
the old policy; a good edit goes live without dropping connections), SIGTERM, and the CLI's
audit commands against what the process wrote.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from lictor import Identity, Request

from tests.conftest import ROOT, free_port, lictor, wait_port

PACK = """
format: lictor/v1
metadata: {name: lines}
identities:
  - match: {claims: {role: reader}}
    roles: [reader]
roles:
  reader:
    rules:
      - id: line-get
        protocol: line
        when: {verbs: [get]}
        action: allow
      - id: line-no-secrets
        protocol: line
        when: {commands: ["* secret*"]}
        action: deny
        message: secrets are off limits
"""


class Client:
    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rwb")
        self.send(f"AUTH {token}")
        self.greeting = self.recv()

    def send(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        self.file.flush()

    def recv(self) -> str:
        return self.file.readline().decode().strip()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def line_gateway(gateway_factory, tmp_path, monkeypatch):
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    port = free_port()
    monkeypatch.setenv("LINEPROTO_FAIL_ON", "explode")
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        }
    )
    wait_port(port)
    gw.port = port
    gw.packs = packs
    return gw


def audit_events(gw, *extra: str) -> list[dict]:
    out = lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir), *extra).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_allow_deny_and_bad_token(line_gateway):
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.greeting == "READY"
    assert c.ask("get orders").startswith("OK line-get ")
    assert c.ask("get secret-plans") == "DENIED line-no-secrets: secrets are off limits"
    denied = c.ask("put orders")
    assert denied.startswith("DENIED lictor:default-deny: no rule allows put orders for your roles (reader)")
    c.close()
    bad = Client(gw.port, "not-a-token")
    assert bad.greeting.startswith("ERROR no valid JWT")
    events = audit_events(gw)
    decisions = [e for e in events if e["kind"] == "decision"]
    assert [d["action"] for d in decisions] == ["allow", "deny", "deny"]
    assert decisions[1]["rule_ids"] == ["line-no-secrets"]
    assert any(e["kind"] == "auth.failed" for e in events)


def test_a_huge_unverified_token_is_not_echoed_into_the_answer_and_the_audit(line_gateway):
    """Refusing a token quotes what it claims (its issuer, algorithm), cut short: an unauthenticated peer
    cannot make each of its attempts write tens of kilobytes to the audit log."""
    import base64

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    gw = line_gateway
    big = "x" * 30_000
    tokens = [
        part({"alg": "EdDSA"}) + "." + part({"iss": big, "sub": "a"}) + ".sig",
        part({"alg": big}) + "." + part({"iss": "lictor", "sub": "a"}) + ".sig",
    ]
    for token in tokens:
        c = Client(gw.port, token)
        assert c.greeting.startswith("ERROR token ") and "xxx…" in c.greeting, c.greeting[:300]
        assert len(c.greeting) < 500
        c.close()
    deadline = time.monotonic() + 10  # the audit log is a batch behind the spool
    while len(failed := audit_events(gw, "--kind", "auth.failed")) < 2:
        assert time.monotonic() < deadline, failed
        time.sleep(0.1)
    assert all(len(e["reason"]) < 500 for e in failed), [e["reason"][:300] for e in failed]


def test_fault_in_an_addon_hook_is_an_audited_denial(line_gateway):
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    reply = c.ask("get explode")  # the rule would allow it; the hook raises
    assert reply.startswith("DENIED lictor:addon-error: internal error in addon 'lineproto'")
    assert c.ask("get fine").startswith("OK")  # the connection survives
    decisions = audit_events(gw, "--kind", "decision")
    assert decisions[0]["rule_ids"] == ["lictor:addon-error"] and decisions[0]["action"] == "deny"
    assert "injected fault" in gw.log()


def _log_once_it_shows(gw: Any, text: str, timeout: float = 10) -> str:
    """The gateway's log, once it holds ``text`` (a reload is noticed a moment after the edit), or at the
    deadline."""
    deadline = time.monotonic() + timeout
    while text not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return gw.log()


def test_hot_reload_keeps_connections_and_rejects_broken_edits(line_gateway):
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    first = c.ask("get a").split()[2]  # policy version
    pack = gw.packs / "lines.yaml"

    # a broken edit (unknown key) keeps the last good policy
    pack.write_text(PACK.replace("action: allow", "action: allow\n        colour: red"))
    assert "lines.yaml:14:9: unknown key 'colour'" in _log_once_it_shows(gw, "colour")
    assert c.ask("get a").split()[2] == first
    # lictor status says the gateway runs, which policy is live, and why the edit was not taken
    deadline = time.monotonic() + 10
    status = lictor("status", "--state-dir", str(gw.state_dir), check=False)
    while "colour" not in status.stdout and time.monotonic() < deadline:
        time.sleep(0.2)
        status = lictor("status", "--state-dir", str(gw.state_dir), check=False)
    assert status.returncode == 0 and "gateway   running: pid" in status.stdout, status
    assert f"policy    {first}:" in status.stdout, status.stdout
    assert "rejected reload, previous policy kept:" in status.stdout and "unknown key 'colour'" in status.stdout

    # a half-saved edit (the file truncated first, as `cat > lines.yaml` does) is broken too, not "no rules"
    pack.write_text("")
    assert "lines.yaml:1:1: empty file" in _log_once_it_shows(gw, "lines.yaml:1:1: empty file")
    assert c.ask("get a").split()[2] == first

    # a good edit, saved the way editors do (write elsewhere, rename over), goes live
    tmp = gw.packs / ".lines.yaml.swp"
    tmp.write_text(PACK.replace("verbs: [get]", "verbs: [get, put]"))
    os.replace(tmp, pack)
    deadline = time.monotonic() + 10
    reply = c.ask("put a")
    while not reply.startswith("OK") and time.monotonic() < deadline:
        time.sleep(0.1)
        reply = c.ask("put a")
    assert reply.startswith("OK line-get"), reply
    assert reply.split()[2] != first
    kinds = [e["kind"] for e in audit_events(gw)]
    assert "policy.rejected" in kinds and kinds.count("policy.loaded") >= 2
    # the table says why a reload was rejected and what went live, not an empty SUMMARY
    table = lictor("audit", "list", "--state-dir", str(gw.state_dir), "--kind", "policy.rejected").stdout
    assert f"kept_version={first} problems={pack}:14:9: unknown key 'colour'" in table, table
    table = lictor("audit", "list", "--state-dir", str(gw.state_dir), "--kind", "policy.loaded").stdout
    assert f"previous={first}" in table and f"files={pack}" in table, table
    c.close()


def test_undoing_a_broken_edit_is_logged_and_audited(line_gateway):
    # the policy live stays the same, but the log and the audit ended on the rejection, as if still broken
    gw = line_gateway
    pack = gw.packs / "lines.yaml"
    pack.write_text(PACK.replace("action: allow", "action: alow"))
    assert "alow" in _log_once_it_shows(gw, "alow")
    pack.write_text(PACK)
    assert "rule packs load again; policy " in _log_once_it_shows(gw, "rule packs load again")
    kinds = [e["kind"] for e in audit_events(gw) if e["kind"].startswith("policy.")]
    assert kinds[-2:] == ["policy.rejected", "policy.loaded"], kinds
    deadline = time.monotonic() + 5
    status = lictor("status", "--state-dir", str(gw.state_dir), check=False).stdout
    while "rejected reload" in status and time.monotonic() < deadline:
        time.sleep(0.2)
        status = lictor("status", "--state-dir", str(gw.state_dir), check=False).stdout
    assert "rejected reload" not in status, status


def _wait_reply(c: Client, line: str, want: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    reply = c.ask(line)
    while not reply.startswith(want) and time.monotonic() < deadline:
        time.sleep(0.1)
        reply = c.ask(line)
    return reply


def test_a_replaced_rulepack_directory_is_watched_again(line_gateway):
    # Deploys swap the whole directory (mv new packs) or a symlink to it: the new packs must go live, and so
    # must later edits of them, instead of the gateway enforcing the old directory's policy for good.
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.ask("get orders").startswith("OK")
    new = gw.packs.parent / "packs.new"
    new.mkdir()
    (new / "lines.yaml").write_text(PACK.replace('["* secret*"]', '["* secret*", "* orders*"]'))
    os.rename(gw.packs, gw.packs.parent / "packs.old")
    os.rename(new, gw.packs)
    assert _wait_reply(c, "get orders", "DENIED").startswith("DENIED line-no-secrets")
    # and the new directory is watched: an edit in it goes live too
    (gw.packs / "lines.yaml").write_text(PACK.replace('["* secret*"]', '["* secret*", "* invoices*"]'))
    assert _wait_reply(c, "get invoices", "DENIED").startswith("DENIED line-no-secrets")
    c.close()


def test_edits_behind_a_symlinked_rulepack_directory_go_live(gateway_factory, tmp_path):
    # Deploys point `rulepacks` at `current -> releases/N`. The watch was set on the link itself (watchdog does not
    # follow it), so a switch of the link went live but no edit of the packs behind it did, before or after.
    releases = tmp_path / "releases"
    for n in (1, 2):
        (releases / str(n)).mkdir(parents=True)
        (releases / str(n) / "lines.yaml").write_text(PACK)
    current = tmp_path / "current"
    current.symlink_to(releases / "1")
    port = free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(current)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        }
    )
    wait_port(port)
    c = Client(port, gw.token("agent-1", role="reader"))
    assert c.ask("get orders").startswith("OK")
    deny = PACK.replace('["* secret*"]', '["* secret*", "* WORD*"]')
    (releases / "1" / "lines.yaml").write_text(deny.replace("WORD", "orders"))
    assert _wait_reply(c, "get orders", "DENIED", timeout=5).startswith("DENIED line-no-secrets")
    (tmp_path / "next").symlink_to(releases / "2")
    os.replace(tmp_path / "next", current)
    assert _wait_reply(c, "get orders", "OK", timeout=5).startswith("OK")
    (releases / "2" / "lines.yaml").write_text(deny.replace("WORD", "invoices"))
    assert _wait_reply(c, "get invoices", "DENIED", timeout=5).startswith("DENIED line-no-secrets")
    c.close()


def test_a_pack_still_being_written_does_not_go_live(line_gateway):
    # The first part of a pack parses as a pack without its last rule (a deny): loading it while the file is
    # still open for writing would allow what the deny stops.
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.ask("get secret-plans").startswith("DENIED line-no-secrets")
    head, sep, tail = PACK.partition("      - id: line-no-secrets")
    with open(gw.packs / "lines.yaml", "w") as fh:
        fh.write(head)
        fh.flush()
        time.sleep(2)  # well past the reload debounce
        assert c.ask("get secret-plans").startswith("DENIED line-no-secrets")
        # the log says why the edit is not live yet (a reload that never came read as a lost edit)
        log = _log_once_it_shows(gw, "open for writing")
        assert (
            f"rule-pack files open for writing ({gw.packs / 'lines.yaml'}): the reload waits until they are closed"
            in log
        )
        fh.write(sep + tail.replace("secrets are off limits", "still off limits"))
    assert _wait_reply(c, "get secret-plans", "DENIED line-no-secrets: still").endswith("still off limits")
    assert " live (was " in gw.log().split("until they are closed")[-1], gw.log()  # then it went live, and says so
    c.close()


def test_a_pack_moved_in_whole_goes_live_at_once(line_gateway, tmp_path):
    # A pack written elsewhere and renamed into the directory (an atomic deploy from /tmp, a Kubernetes
    # ConfigMap's new timestamped directory) is reported as created, and its close happened outside the
    # watch: taken for a file still open for writing, the new deny went live only after 30 s.
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.ask("get orders").startswith("OK")
    staged = tmp_path / "staged.yaml"
    staged.write_text(PACK.replace('["* secret*"]', '["* secret*", "* orders*"]'))
    os.replace(staged, gw.packs / "lines.yaml")
    assert _wait_reply(c, "get orders", "DENIED", timeout=5).startswith("DENIED line-no-secrets")
    # a ConfigMap update: files written into a new directory, which then takes the old one's place
    new = gw.packs / "..2026_01_01_00_00_00.000000001"
    new.mkdir()
    (new / "lines.yaml").write_text(PACK.replace('["* secret*"]', '["* secret*", "* invoices*"]'))
    os.replace(gw.packs / "lines.yaml", tmp_path / "old.yaml")
    os.symlink(f"{new.name}/lines.yaml", gw.packs / "lines.yaml")
    assert _wait_reply(c, "get invoices", "DENIED", timeout=5).startswith("DENIED line-no-secrets")
    assert "open for writing" not in gw.log()
    c.close()


def test_an_edit_of_a_pack_linked_from_another_directory_goes_live(line_gateway, tmp_path):
    # A pack that is a symlink to a shared file elsewhere: an edit of that file happens outside the watched
    # directory, and the gateway kept enforcing the pack as it was (a new deny never went live).
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    shared = tmp_path / "shared"
    shared.mkdir()
    extra = shared / "extra.yaml"
    rule = "      - {id: no-RID, protocol: line, when: {commands: ['* WORD*']}, action: deny}\n"
    extra.write_text(
        "format: lictor/v1\nmetadata: {name: extra}\nroles:\n  reader-extra:\n    rules:\n"
        + rule.replace("RID", "a").replace("WORD", "invoices")
        + "identities: [{match: {claims: {role: reader}}, roles: [reader-extra]}]\n"
    )
    os.symlink(extra, gw.packs / "extra.yaml")
    assert _wait_reply(c, "get invoices", "DENIED", timeout=5).startswith("DENIED no-a")
    assert c.ask("get orders").startswith("OK")
    text = extra.read_text()
    with open(extra, "w") as fh:  # an edit in place, as most editors save
        fh.write(text.replace("    rules:\n", "    rules:\n" + rule.replace("RID", "b").replace("WORD", "orders"), 1))
    assert _wait_reply(c, "get orders", "DENIED", timeout=5).startswith("DENIED no-b")
    c.close()


def test_a_symlink_loop_among_the_packs_is_a_rejected_reload(line_gateway):
    # Resolving a.yaml -> b.yaml -> a.yaml raised: the reload died with a traceback in the log, and neither the audit
    # nor `lictor status` said that the edit was not taken.
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    first = c.ask("get a").split()[2]
    os.symlink("loop-b.yaml", gw.packs / "loop-a.yaml")
    os.symlink("loop-a.yaml", gw.packs / "loop-b.yaml")
    log = _log_once_it_shows(gw, "loop-b.yaml:1:1: cannot read")
    assert f"{gw.packs / 'loop-a.yaml'}:1:1: cannot read: [Errno 40] Too many levels of symbolic links" in log, log
    assert "Traceback" not in log
    assert c.ask("get secret-plans").startswith("DENIED line-no-secrets") and c.ask("get a").split()[2] == first
    deadline = time.monotonic() + 10  # the audit log is a batch behind the spool
    while not (rejected := audit_events(gw, "--kind", "policy.rejected")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "loop-a.yaml:1:1: cannot read" in rejected[-1]["problems"][0], rejected
    c.close()


def test_a_pack_whose_suffix_is_upper_case_goes_live(line_gateway):
    # `deny.YAML`, as saved on Windows, was neither loaded nor watched: its deny never went live, and `lictor check`
    # said OK with one file fewer
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.ask("get invoices").startswith("OK")
    (gw.packs / "deny.YAML").write_text(
        "format: lictor/v1\nmetadata: {name: deny}\nidentities: [{match: {claims: {role: reader}}, roles: [d]}]\n"
        "roles:\n  d:\n    rules:\n      - {id: no-invoices, protocol: line, when: {commands: ['* invoices*']}, "
        "action: deny}\n"
    )
    assert _wait_reply(c, "get invoices", "DENIED", timeout=5).startswith("DENIED no-invoices")
    c.close()


def test_sigterm_stops_cleanly_and_audit_verifies(line_gateway):
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-2", role="reader"))
    c.ask("get x")
    assert gw.stop() == 0
    status = lictor("status", "--state-dir", str(gw.state_dir), check=False)
    assert status.returncode == 1 and "gateway   not running (last seen" in status.stdout, status
    kinds = [e["kind"] for e in audit_events(gw)]
    assert kinds[-1] == "gateway.stop" and "session.end" in kinds
    assert "chain intact" in lictor("audit", "verify", "--state-dir", str(gw.state_dir)).stdout
    table = lictor("audit", "list", "--state-dir", str(gw.state_dir), "--where", "action=allow").stdout
    assert "get x" in table and "line-get" in table


def test_ctrl_c_on_the_terminal_stops_cleanly_without_killing_the_drain(gateway_factory, tmp_path):
    # Ctrl-C in a terminal (make run) signals the whole foreground process group. The recording drain
    # process died of it, so the last events stayed in the spool and the log showed an error.
    import signal
    import subprocess

    from tests.conftest import LICTOR

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    port = free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        },
        start=False,
    )
    gw.write_config()
    ready = gw.workdir / "ready"
    with gw.log_path.open("ab") as log:
        gw.proc = subprocess.Popen(
            [LICTOR, "run", "-c", str(gw.config_path), "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    for _ in range(600):
        if ready.exists():
            break
        time.sleep(0.05)
    wait_port(port)
    Client(port, gw.token("agent-3", role="reader")).ask("get y")
    os.killpg(gw.proc.pid, signal.SIGINT)
    assert gw.proc.wait(30) == 0, gw.log()
    log_text = gw.log()
    assert "drain process" not in log_text and "behind" not in log_text, log_text
    kinds = [e["kind"] for e in audit_events(gw)]
    assert kinds[-1] == "gateway.stop" and "session.end" in kinds


def test_addon_file_reload_and_broken_edit_denies(gateway_factory, tmp_path):
    import shutil

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    hook = tmp_path / "denyword.py"
    shutil.copy(ROOT / "tests" / "addons" / "denyword.py", hook)
    port = free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py"), str(hook)],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        }
    )
    wait_port(port)
    c = Client(port, gw.token("agent-1", role="reader"))
    assert c.ask("get forbidden").startswith("DENIED denyword:block")
    assert c.ask("get other").startswith("OK")

    def until(predicate, line):
        deadline = time.monotonic() + 10
        reply = c.ask(line)
        while not predicate(reply) and time.monotonic() < deadline:
            time.sleep(0.1)
            reply = c.ask(line)
        return reply

    hook.write_text(hook.read_text().replace('DENY_WORD = "forbidden"', 'DENY_WORD = "other"'))
    assert until(lambda r: r.startswith("DENIED"), "get other").startswith("DENIED denyword:block")
    assert c.ask("get forbidden").startswith("OK")

    hook.write_text("this is not python(\n")
    reply = until(lambda r: "lictor:addon-broken" in r, "get anything")
    assert reply.startswith("DENIED lictor:addon-broken: the addon 'denyword' failed to reload;"), reply
    assert "SyntaxError" not in reply and "denyword.py" not in reply  # the details are the operators'
    assert "SyntaxError" in gw.log()

    hook.write_text((ROOT / "tests" / "addons" / "denyword.py").read_text())
    assert until(lambda r: r.startswith("OK"), "get anything").startswith("OK")
    assert c.ask("get forbidden").startswith("DENIED denyword:block")
    kinds = [e["kind"] for e in audit_events(gw)]
    assert "addon.reload_failed" in kinds and "addon.reloaded" in kinds


def test_every_addon_of_a_reloaded_file_runs_again(gateway_factory, tmp_path):
    # After a reload only the file's last addon had its `running` hook called: the others' listeners
    # stayed stopped.
    marks = tmp_path / "marks"
    marks.mkdir()
    source = (
        "from pathlib import Path\n"
        "class Marker:\n"
        "    def __init__(self, name):\n"
        "        self.name = name\n"
        "    async def running(self, gateway):\n"
        f"        Path({str(marks)!r}, self.name).write_text(VERSION)\n"
        "addons = [Marker('first'), Marker('second')]\n"
    )
    addon = tmp_path / "markers.py"
    addon.write_text("VERSION = '1'\n" + source)
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    port = free_port()
    gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py"), str(addon)],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        }
    )
    wait_port(port)
    assert {p.name: p.read_text() for p in marks.iterdir()} == {"first": "1", "second": "1"}
    addon.write_text("VERSION = '2'\n" + source)
    deadline = time.monotonic() + 10
    while (marks / "second").read_text() != "2" and time.monotonic() < deadline:
        time.sleep(0.1)
    # the addons run in the file's order: once the second one ran again, the first one has too
    assert {p.name: p.read_text() for p in marks.iterdir()} == {"first": "2", "second": "2"}


def _line_gateway(gateway_factory, tmp_path):  # type: ignore[no-untyped-def]
    """A gateway running a copy of the line-protocol addon (edit ``addon`` to reload it) and PACK."""
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    addon = tmp_path / "lineproto.py"
    original = (ROOT / "tests" / "addons" / "lineproto.py").read_text()
    addon.write_text(original)
    port = free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(addon)],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        }
    )
    wait_port(port)
    return gw, addon, original, port, gw.token("agent-1", role="reader")


def test_addon_reload_compiles_the_rule_packs_with_its_new_vocabulary(gateway_factory, tmp_path):
    """Live rules read the request attributes the vocabulary named when they were compiled: an
    addon whose reload renames an attribute must not leave a deny rule reading one nobody sets."""
    gw, addon, original, port, token = _line_gateway(gateway_factory, tmp_path)
    assert Client(port, token).ask("get secret").startswith("DENIED line-no-secrets")

    def reloaded(kind: str) -> list[dict]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            events = audit_events(gw)
            if any(e["kind"] == kind for e in events):
                return events
            time.sleep(0.2)
        raise AssertionError(gw.log())

    renamed = original.replace('attr="command"', 'attr="line"').replace('{"command": command', '{"line": command')
    assert 'attrs={"line": command' in renamed and 'attr="line"' in renamed
    addon.write_text(renamed)
    reloaded("addon.reloaded")
    wait_port(port)
    assert Client(port, token).ask("get secret").startswith("DENIED line-no-secrets")
    assert Client(port, token).ask("get other").startswith("OK")

    # a vocabulary the live packs no longer load with: the addon's requests are denied, saying why
    addon.write_text(renamed.replace('Glob("commands"', 'Glob("lines"'))
    [failed] = [e for e in reloaded("addon.reload_failed") if e["kind"] == "addon.reload_failed"]
    assert "the rule packs do not load with the reloaded addon" in failed["error"]
    assert "unknown key 'commands'" in failed["error"]


def test_a_broken_addon_denies_only_the_protocols_it_inspected():
    # A typo in one protocol's addon took every protocol of the gateway down with it.
    from lictor.addons import AddonManager
    from lictor.runner import BrokenAddon

    manager = AddonManager()
    manager.add(BrokenAddon("kv", "kv.py", "SyntaxError", ("kv",)), BrokenAddon("guard", "guard.py", "SyntaxError"))
    assert [name for name, _ in manager.hooks_for("request", "kv")] == ["kv", "guard"]
    assert [name for name, _ in manager.hooks_for("request", "postgres")] == ["guard"]


def test_a_reload_that_fails_after_starting_a_listener_stops_it(gateway_factory, tmp_path):
    # The new code's `running` opened a listener and then raised: the file was marked broken, but
    # its listener stayed open for good, so the fixed file could never bind its port again.
    gw, addon, original, port, token = _line_gateway(gateway_factory, tmp_path)
    assert Client(port, token).ask("get a").startswith("OK")

    def audited(kind: str, count: int) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if sum(e["kind"] == kind for e in audit_events(gw)) >= count:
                return
            time.sleep(0.2)
        raise AssertionError(gw.log())

    started = "self.servers.append(await asyncio.start_server(handle, host, int(port)))"
    assert started in original
    addon.write_text(original.replace(started, started + '\n            raise RuntimeError("after listening")'))
    audited("addon.reload_failed", 1)
    addon.write_text(original + "\n")
    audited("addon.reloaded", 1)
    assert "Address already in use" not in gw.log()
    assert Client(port, token).ask("get a").startswith("OK")


async def test_a_failed_reload_leaves_none_of_the_new_code_loaded(tmp_path):
    # The failed file's addons were removed by their old names: one renamed in the edit stayed loaded
    # (its hooks running), and every later reload was refused as "already loaded".
    import asyncio

    from lictor import AddonManager, Gateway, GatewayConfig
    from lictor.runner import AddonWatcher

    addon = tmp_path / "guard.py"
    source = "class Guard:\n    name = {name!r}\n    def configure(self, gateway):\n{body}\naddons = [Guard()]\n"
    addon.write_text(source.format(name="guard", body="        pass"))
    config = GatewayConfig.default(tmp_path / "state")
    gw = Gateway(config, AddonManager())
    watcher = AddonWatcher(gw, asyncio.get_running_loop(), {})
    await watcher.reload(str(addon))
    assert [type(a).__name__ for a in gw.addons.addons] == ["Guard"]
    addon.write_text(source.format(name="guard-2", body="        raise ValueError('bad config')"))
    await watcher.reload(str(addon))
    assert [(type(a).__name__, a.name) for a in gw.addons.addons] == [("BrokenAddon", "guard")]
    addon.write_text(source.format(name="guard-2", body="        pass"))
    await watcher.reload(str(addon))
    assert [(type(a).__name__, a.name) for a in gw.addons.addons] == [("Guard", "guard-2")]
    gw.audit.close()


async def test_a_reload_that_fails_unforeseen_is_audited_as_rejected(tmp_path, monkeypatch):
    # Any exception of a reload ended its task with a traceback: the live policy stayed, but nothing audited the
    # rejection or showed it in `lictor status`.
    import asyncio

    from lictor import AddonManager, Gateway, GatewayConfig
    from lictor.runner import PolicyWatcher

    gw = Gateway(GatewayConfig.default(tmp_path / "state", [str(tmp_path)]), AddonManager())
    before = gw.policy.version

    def fail() -> None:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(gw, "compile_policy", fail)
    await PolicyWatcher(gw, asyncio.get_running_loop()).reload()
    assert gw.policy.version == before
    assert gw.policy_problems == [
        f"{tmp_path}:1:1: the rule packs could not be loaded (RuntimeError: the disk went away)"
    ]
    gw.audit.close()


async def test_rule_pack_edits_go_live_while_an_addon_is_broken(tmp_path):
    # The broken addon's vocabulary went with it: every later edit of the packs was rejected as using an
    # unknown protocol, so revoking a permission of another protocol kept it allowed until the fix.
    import asyncio

    from lictor import AddonManager, Gateway, GatewayConfig
    from lictor.runner import AddonWatcher

    from tests.addons.lineproto import LineProtocol

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    (packs / "kv.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: kv}\nidentities: [{match: {claims: {role: reader}}, roles: [kv]}]\n"
        "roles: {kv: {rules: [{id: kv-get, protocol: kv, "
        "when: {verbs: get}, action: allow}]}}\n"
    )
    addon = tmp_path / "kv.py"
    addon.write_text(
        "from lictor import Glob, Vocabulary\n"
        "class KV:\n"
        "    name = 'kv'\n"
        "    protocols = ('kv',)\n"
        "    def load(self, loader):\n"
        "        loader.add_vocabulary(Vocabulary('kv', (Glob('verbs', attr='verb'),), index='verbs'))\n"
        "addons = [KV()]\n"
    )
    manager = AddonManager()
    manager.add(LineProtocol())
    gw = Gateway(GatewayConfig.default(tmp_path / "state", [str(packs)]), manager)
    watcher = AddonWatcher(gw, asyncio.get_running_loop(), {})
    await watcher.reload(str(addon))
    assert gw.load_policy().policy is not None
    addon.write_text("this is not python(\n")
    await watcher.reload(str(addon))
    (packs / "lines.yaml").write_text(PACK.replace("verbs: [get]", "verbs: [list]"))  # reads revoked
    result = gw.load_policy()
    assert result.errors == [] and gw.policy is result.policy
    session = await gw.open_session(Identity("a", {"role": "reader"}), protocol="line", target="lines", peer="")
    get = Request("line", "get", {"verb": "get", "command": "get a"})
    assert session.decide_now(get).rule_ids == ("lictor:default-deny",)
    kv = Request("kv", "get", {"verb": "get"})
    assert session.decide_now(kv).rule_ids == ("lictor:addon-broken",)
    await session.close()
    gw.audit.close()


def test_the_masking_key_is_never_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was written with the umask's mode (0644) and chmod-ed after: for a moment any local user could
    # read the key that keeps hashed card numbers from being found by trying every number.
    import stat

    from lictor import AddonManager, Gateway, GatewayConfig

    seen: list[int] = []
    real_chmod = Path.chmod

    def chmod(self: Path, mode: int, **kw: Any) -> None:
        if self.name == "mask.key":
            seen.append(stat.S_IMODE(os.stat(self).st_mode))
        real_chmod(self, mode, **kw)

    monkeypatch.setattr(Path, "chmod", chmod)
    old = os.umask(0o022)
    try:
        (tmp_path / "state").mkdir()
        Gateway(GatewayConfig.default(tmp_path / "state"), AddonManager())
    finally:
        os.umask(old)
    key = tmp_path / "state" / "mask.key"
    assert all(mode & 0o077 == 0 for mode in seen), [oct(m) for m in seen]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(bytes.fromhex(key.read_text().strip())) == 32


def test_what_agents_did_is_not_readable_by_other_users(gateway_factory, tmp_path):
    # The audit log, the approval requests and the recordings index were created with the umask's mode (0644):
    # every local user could read the statements, commands and token claims in them. The session recordings
    # next to them were 0640 already.
    import stat

    state = tmp_path / "state"
    state.mkdir()
    (state / "audit.db").touch(mode=0o644)  # as an older version left it: the gateway takes it back
    os.chmod(state / "audit.db", 0o644)
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    port = free_port()
    old = os.umask(0o022)
    try:
        gw = gateway_factory(
            {
                "state_dir": str(state),
                "rulepacks": [str(packs)],
                "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
                "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
            }
        )
    finally:
        os.umask(old)
    wait_port(port)
    c = Client(port, gw.token("agent-1", role="reader"))
    assert c.ask("get orders").startswith("OK line-get ")
    c.close()
    assert gw.stop() == 0
    held = [
        p for p in state.rglob("*") if p.is_file() and p.name.split("-")[0] in ("audit.db", "approvals.db", "index.db")
    ]
    assert {p.name for p in held} >= {"audit.db", "approvals.db", "index.db"}, held
    assert any(p.suffix == ".jsonl" for p in state.rglob("*"))
    for p in [*held, *(q for q in state.rglob("*") if q.suffix in (".jsonl", ".json") and "sessions" in q.parts)]:
        assert stat.S_IMODE(p.stat().st_mode) & 0o007 == 0, (p, oct(p.stat().st_mode))


def test_a_database_of_another_owner_is_opened_as_it_is(tmp_path, monkeypatch):
    # Only its owner may change a file's mode: an auditor's `lictor audit list` on a log an older gateway left
    # readable by others must read it, not fail because it could not take the permissions away.
    import sqlite3
    import stat

    from lictor._files import private_database

    db = tmp_path / "audit.db"
    sqlite3.connect(db).close()
    os.chmod(db, 0o644)

    def chmod(path: Any, mode: int, **kw: Any) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", chmod)
    private_database(db)
    assert stat.S_IMODE(db.stat().st_mode) == 0o644


def test_a_tests_file_that_does_not_parse_does_not_keep_a_pack_edit_from_going_live(line_gateway):
    # The packs are what enforces; the tests beside them are for `lictor test`. A tests file with a YAML error failed
    # the whole load: a good edit of the policy (a new deny, say) stayed out until someone fixed the tests.
    gw = line_gateway
    c = Client(gw.port, gw.token("agent-1", role="reader"))
    assert c.ask("get orders").startswith("OK")
    tests = gw.packs / "lines.tests.yaml"
    tests.write_text("format: lictor-tests/v1\ncases:\n  - name: broken\n    identity: {sub: a\n")
    (gw.packs / "lines.yaml").write_text(PACK.replace('["* secret*"]', '["* secret*", "* orders*"]'))
    assert _wait_reply(c, "get orders", "DENIED").startswith("DENIED line-no-secrets")
    log = _log_once_it_shows(gw, "policy tests that do not parse")
    assert f"{tests}:5:1: warning: policy tests that do not parse" in log, log
    assert "rule pack problem" not in log, log
    # `lictor check` says what the gateway does (it loads the packs) and warns; `lictor test` fails on the file
    check = lictor("check", "-c", str(gw.config_path), check=False)
    assert check.returncode == 0 and f"{tests}:5:1: warning: policy tests that do not parse" in check.stdout, check
    assert lictor("check", "--strict", "-c", str(gw.config_path), check=False).returncode == 1
    test = lictor("test", "-c", str(gw.config_path), check=False)
    assert test.returncode == 1 and f"ERROR {tests}:5:1: " in test.stdout, test.stdout
    c.close()


def test_a_role_the_config_names_must_be_one_the_packs_define(gateway_factory, tmp_path):
    # `read_only_roles: [raeder]` passed `lictor check -c` and `lictor run`: sessions of `reader` were not read-only
    # at the database, and nothing said so. The config is checked against the packs, as the packs' targets are
    # against the config; a pack edit that drops such a role is a rejected reload.
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(PACK)
    port = free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
            "targets": {
                "lines": {"protocol": "line", "listen": f"127.0.0.1:{port}"},
                "db": {
                    "protocol": "postgres",
                    "listen": f"127.0.0.1:{free_port()}",
                    "read_only_roles": ["writer", "raeder"],
                    "upstream": {"host": "127.0.0.1"},
                },
            },
        },
        start=False,
    )
    gw.write_config()
    lines = gw.config_path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines, 1) if "raeder" in line)
    where = f"{gw.config_path}:{row}:{lines[row - 1].index('raeder') + 1}"
    check = lictor("check", "-c", str(gw.config_path), check=False)
    assert check.returncode == 1, check.stdout
    assert f"{where}: target 'db': read_only_roles: unknown role 'raeder' (roles defined: reader)" in check.stdout
    assert "unknown role 'writer'" in check.stdout, check.stdout  # every one, not the first
    # the gateway refuses to start on it, before it listens
    run = lictor("run", "-c", str(gw.config_path), check=False, timeout=30)
    assert run.returncode == 1, run.stderr
    assert "gateway failed to start: " in run.stderr, run.stderr
    assert f"    {where}: target 'db': read_only_roles: unknown role 'raeder'" in run.stderr, run.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)

    gw.config["targets"]["db"]["read_only_roles"] = ["reader"]
    gw.start()
    wait_port(port)
    assert lictor("check", "-c", str(gw.config_path), check=False).returncode == 0
    c = Client(port, gw.token("agent-1", role="reader"))
    first = c.ask("get a").split()[2]
    (packs / "lines.yaml").write_text(PACK.replace("[reader]", "[readers]").replace("  reader:", "  readers:"))
    log = _log_once_it_shows(gw, "unknown role 'reader'")
    assert f"{gw.config_path}:" in log and "target 'db': read_only_roles: unknown role 'reader'" in log, log
    assert c.ask("get a").split()[2] == first  # the policy that defines the role stays live
    c.close()
    # a pack that does not parse is one error, not also one about each role the config names
    (packs / "lines.yaml").write_text(PACK + "  writer: [\n")
    check = lictor("check", "-c", str(gw.config_path), check=False)
    assert check.returncode == 1 and "lines.yaml:20:1: " in check.stdout and "lictor.yaml" not in check.stdout, check
