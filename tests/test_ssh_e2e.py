"""The SSH addon end to end: the real OpenSSH ``ssh``, ``scp`` and ``sftp`` through a real ``lictor run``
gateway to a real OpenSSH sshd started for these tests (tests/sshd.py).

Every denial is proven twice: the client sees exit status 126 and the ``lictor: denied`` message, and
the target is unchanged (marker files still there with their content, files not created).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from tests.conftest import (
    GatewayProcess,
    attach_strace,
    free_port,
    idle_connections,
    lictor,
    require,
    require_binary,
    wait_until,
)
from tests.sshd import SSHD, GatewayClient, Sshd, ssh_keygen, start_sshd

pytestmark = pytest.mark.timeout(120)

CARD = "4111 1111 1111 1111"
GBK = "zh_CN.GBK"


def _pack(work: Path) -> dict[str, Any]:
    home = pwd.getpwuid(work.stat().st_uid).pw_dir  # the target account's
    read_programs = ["ls", "cat", "echo", "id", "whoami", "head", "printf", "sha256sum", "stty", "true", "sleep", "tty"]
    return {
        "format": "lictor/v1",
        "metadata": {"name": "ssh-e2e", "owner": "tests"},
        "identities": [
            {"match": {"claims": {"role": "observer"}}, "roles": ["observer"]},
            {"match": {"claims": {"role": "operator"}}, "roles": ["operator"]},
            {"match": {"claims": {"role": "admin"}}, "roles": ["admin"]},
            {"match": {"claims": {"role": "liner"}}, "roles": ["liner"]},
            {"match": {"claims": {"role": "approver"}}, "roles": ["approver"]},
            {"match": {"claims": {"mask": "yes"}}, "roles": ["masked"]},
            {"match": {"claims": {"role": "home-sync"}}, "roles": ["home-sync"]},
            {"match": {"claims": {"role": "held-sync"}}, "roles": ["held-sync"]},
            {"match": {"sub": "cert-alice"}, "roles": ["observer"]},
        ],
        "roles": {
            "observer": {
                "rules": [
                    {
                        "id": "obs-read",
                        "protocol": "ssh",
                        "when": {"channels": ["exec", "shell_line"], "programs": read_programs},
                        "action": "allow",
                    },
                    {
                        "id": "obs-no-sha256sum-on-web1",
                        "protocol": "ssh",
                        "targets": ["web1"],
                        "when": {"programs": ["sha256sum"]},
                        "action": "deny",
                        "message": "checksums are not taken on web1",
                    },
                    {
                        "id": "obs-no-writes",
                        "protocol": "ssh",
                        "when": {"writes": "*"},
                        "action": "deny",
                        "message": "observers do not write files",
                    },
                ]
            },
            "operator": {
                "inherits": ["observer"],
                "rules": [
                    {"id": "op-shell", "protocol": "ssh", "when": {"channels": ["shell"]}, "action": "allow"},
                    {
                        "id": "op-shell-builtins",
                        "protocol": "ssh",
                        "when": {"channels": ["shell_line"], "programs": ["cd", "pwd", "exit", "read", "dd"]},
                        "action": "allow",
                    },
                    {
                        "id": "op-touch",
                        "protocol": "ssh",
                        "when": {"programs": ["touch"]},
                        "action": "approve",
                        "message": "creating files needs an approver",
                        "approval": {"approvers": ["approver"], "timeout": "30s"},
                    },
                    {
                        "id": "op-mkdir",
                        "protocol": "ssh",
                        "when": {"programs": ["mkdir"]},
                        "action": "approve",
                        "message": "directories need an approver",
                        "approval": {"approvers": ["approver"], "timeout": "2s"},
                    },
                    {
                        "id": "op-files",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp", "scp"], "paths": [str(work), f"{work}/*"]},
                        "action": "allow",
                    },
                    {
                        "id": "op-no-secret-files",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp", "scp"], "paths": [f"{work}/secret*"]},
                        "action": "deny",
                        "message": "secret files stay on the host",
                    },
                    {
                        "id": "op-drop-box",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp", "scp"], "operations": ["read"], "paths": [f"{work}/drop*"]},
                        "action": "deny",
                        "message": "the drop box is write-only",
                    },
                    {
                        "id": "op-rsync",
                        "protocol": "ssh",
                        "when": {"channels": ["exec"], "programs": ["rsync"]},
                        "action": "allow",
                    },
                    {
                        "id": "op-rsync-transfers",
                        "protocol": "ssh",
                        "when": {"channels": ["rsync"], "paths": [str(work), f"{work}/*"]},
                        "action": "allow",
                    },
                    {
                        "id": "op-frozen",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp"], "operations": ["write"], "paths": [f"{work}/frozen*"]},
                        "action": "deny",
                        "message": "frozen files keep their content",
                    },
                    {
                        "id": "op-plain-modes",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp"], "operations": ["setstat"], "paths": [f"{work}/plain*"]},
                        "action": "deny",
                        "message": "plain files keep plain modes",
                    },
                    {
                        "id": "op-held-files",
                        "protocol": "ssh",
                        "when": {"channels": ["sftp"], "operations": ["read"], "paths": [f"{work}/held*"]},
                        "action": "approve",
                        "message": "held files need an approver",
                        "approval": {"approvers": ["approver"], "timeout": "30s"},
                    },
                ],
            },
            "admin": {
                "rules": [
                    {
                        "id": "admin-all",
                        "protocol": "ssh",
                        "when": {"channels": ["exec", "shell_line"], "programs": "*"},
                        "action": "allow",
                    },
                    {
                        "id": "admin-shells",
                        "protocol": "ssh",
                        "when": {"channels": ["shell", "raw_shell"]},
                        "action": "allow",
                    },
                    {
                        "id": "admin-transfers",
                        "protocol": "ssh",
                        "when": {"channels": ["git", "rsync"]},
                        "action": "allow",
                    },
                    {
                        "id": "admin-forward",
                        "protocol": "ssh",
                        "when": {"channels": ["port_forward"], "destinations": ["127.0.0.1:*"]},
                        "action": "allow",
                    },
                ]
            },
            "liner": {  # any program, in line-mode shells only
                "rules": [
                    {"id": "liner-shell", "protocol": "ssh", "when": {"channels": ["shell"]}, "action": "allow"},
                    {
                        "id": "liner-all",
                        "protocol": "ssh",
                        "when": {"channels": ["shell_line"], "programs": "*"},
                        "action": "allow",
                    },
                ]
            },
            "approver": {"rules": []},
            "held-sync": {
                "rules": [
                    {
                        "id": "held-rsync",
                        "protocol": "ssh",
                        "when": {"channels": ["rsync"], "paths": [str(work), f"{work}/*"]},
                        "action": "approve",
                        "approval": {"approvers": ["approver"], "timeout": "30s"},
                    }
                ]
            },
            "home-sync": {
                "rules": [
                    {
                        "id": "home-transfers",
                        "protocol": "ssh",
                        "when": {"channels": ["rsync", "git"], "paths": [home, f"{home}/*"]},
                        "action": "allow",
                    }
                ]
            },
            "masked": {
                "rules": [
                    {
                        "id": "mask-cards",
                        "protocol": "ssh",
                        "when": {"channels": ["exec", "shell_line", "shell", "sftp"]},
                        "action": "mask",
                        "mask": {"detectors": ["card"], "style": "redact"},
                    },
                    {
                        "id": "mask-rsync",
                        "protocol": "ssh",
                        "when": {"channels": ["rsync"]},
                        "action": "mask",
                        "mask": {"detectors": ["card"], "style": "redact"},
                    },
                ]
            },
        },
    }


@dataclass
class Env:
    sshd: Sshd
    gw: GatewayProcess
    client: GatewayClient
    bad_client: GatewayClient
    cert_client: GatewayClient
    approvals_url: str
    tokens: dict[str, str]
    user_key: Path
    cert_key: Path
    tmp: Path

    @property
    def work(self) -> Path:
        return self.sshd.work

    def direct(self, command: str) -> subprocess.CompletedProcess[bytes]:
        return self.sshd.run(command)

    def connect(self, role: str = "", token: str | None = None) -> Any:
        """An asyncssh connection through the gateway with ``role``'s token, or ``token`` (``async with``)."""
        return asyncssh.connect(
            "127.0.0.1",
            self.client.port,
            username="agent",
            password=token if token is not None else self.tokens[role],
            known_hosts=str(self.client.known_hosts),
            client_keys=None,
            agent_path=None,
            config=None,
        )

    def ssh(self, role: str, command: str, *extra: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return self.client.ssh(self.tokens[role], command, *extra, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    for binary in ("ssh", "scp", "sftp", "ssh-keygen", "localedef"):
        require_binary(binary)
    require(os.path.exists(SSHD), f"{SSHD} (openssh-server) is not installed")
    tmp = tmp_path_factory.mktemp("ssh")
    # The target has a GBK locale installed (in its own directory, readable by the target account).
    locales = Path(tempfile.mkdtemp(prefix="lictor-locales-", dir="/tmp"))
    locales.chmod(0o755)
    subprocess.run(["localedef", "-f", "GBK", "-i", "zh_CN", str(locales / GBK)], check=True, capture_output=True)
    sshd = start_sshd(tmp / "sshd", environment={"LOCPATH": str(locales)})
    try:
        work = sshd.work
        setup = (
            f"cd {work} && printf keep > marker && printf keep > marker2 && "
            f"head -c 1000000 /dev/urandom > random.bin && printf 'card {CARD} end\\n' > card.txt && "
            "printf 'top secret\\n' > secret.txt && printf 'hello file\\n' > hello.txt"
        )
        assert sshd.run(setup).returncode == 0, sshd.log()
        gw_dir = tmp / "gw"
        gw_dir.mkdir()
        (gw_dir / "packs").mkdir()
        (gw_dir / "packs" / "e2e.yaml").write_text(yaml.safe_dump(_pack(work), sort_keys=False))
        host_key = ssh_keygen(gw_dir / "gateway_host_key", "gateway")
        user_key = ssh_keygen(tmp / "bob_key", "bob")
        cert_key = ssh_keygen(tmp / "alice_key", "alice")
        ca_key = ssh_keygen(tmp / "user_ca", "user-ca")
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-s",
                str(ca_key),
                "-I",
                "alice",
                "-n",
                "cert-alice",
                "-V",
                "-5m:+1h",
                f"{cert_key}.pub",
            ],
            check=True,
            capture_output=True,
        )
        wrong_known = tmp / "wrong_known_hosts"
        other = ssh_keygen(tmp / "other_host_key", "other")
        wrong_known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
        cert_upstream_key = ssh_keygen(tmp / "gateway_cert_key", "gateway-cert")
        cert_upstream = sshd.certify(cert_upstream_key)
        port, bad_port, cert_port, approvals_port = free_port(), free_port(), free_port(), free_port()
        upstream = {
            "host": "127.0.0.1",
            "port": sshd.port,
            "user": sshd.user,
            "key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts),
        }
        config = {
            "version": 1,
            "state_dir": str(gw_dir / "state"),
            "rulepacks": [str(gw_dir / "packs")],
            "approvals": {"listen": f"127.0.0.1:{approvals_port}"},
            "targets": {
                "web1": {
                    "protocol": "ssh",
                    "listen": f"127.0.0.1:{port}",
                    "host_key": str(host_key),
                    "upstream": upstream,
                    "public_keys": [
                        {
                            "key": Path(f"{user_key}.pub").read_text().strip(),
                            "sub": "key-bob",
                            "claims": {"role": "operator"},
                        }
                    ],
                    "user_ca": [f"{ca_key}.pub"],
                },
                "via-certificate": {
                    "protocol": "ssh",
                    "listen": f"127.0.0.1:{cert_port}",
                    "host_key": str(host_key),
                    "upstream": {**upstream, "key": str(cert_upstream_key), "certificate": str(cert_upstream)},
                },
                "pinned-wrong": {
                    "protocol": "ssh",
                    "listen": f"127.0.0.1:{bad_port}",
                    "host_key": str(host_key),
                    "upstream": {**upstream, "known_hosts": str(wrong_known)},
                },
            },
        }
        gw = GatewayProcess(gw_dir, config).start()
        try:
            host_public = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
            client = GatewayClient.create(tmp / "client", port, host_public)
            bad_client = GatewayClient.create(tmp / "bad_client", bad_port, host_public)
            cert_client = GatewayClient.create(tmp / "cert_client", cert_port, host_public)
            tokens = {
                "observer": gw.token("agent-obs", role="observer"),
                "operator": gw.token("agent-op", role="operator"),
                "admin": gw.token("agent-admin", role="admin"),
                "liner": gw.token("agent-liner", role="liner"),
                "approver": gw.token("human-approver", role="approver"),
                "masked": gw.token("agent-masked", role="observer", mask="yes"),
            }
            yield Env(
                sshd, gw, client, bad_client, cert_client, f"http://127.0.0.1:{approvals_port}", tokens, user_key,
                cert_key, tmp,
            )  # fmt: skip
        finally:
            gw.stop()
    finally:
        sshd.stop()
        shutil.rmtree(locales, ignore_errors=True)


def _err(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stderr.decode("utf-8", "replace")


def _assert_denied(proc: subprocess.CompletedProcess[bytes], rule: str | None = None) -> str:
    err = _err(proc)
    assert proc.returncode == 126, (proc.returncode, proc.stdout, err)
    assert "lictor: denied" in err, err
    if rule is not None:
        assert f"by rule {rule}" in err, err
    assert "(policy " in err
    return err


def _markers_intact(env: Env) -> None:
    out = env.direct(f"cd {env.work} && cat marker && echo / && cat marker2")
    assert out.stdout == b"keep/\nkeep", out


# -- exec ------------------------------------------------------------------------------------------


def test_allowed_exec_runs_with_output_and_exit_status(env: Env) -> None:
    proc = env.ssh("observer", "echo hello; id -un")
    assert proc.returncode == 0, _err(proc)
    assert proc.stdout == f"hello\n{env.sshd.user}\n".encode()

    missing = env.ssh("observer", "ls /definitely/not/here")
    assert missing.returncode == 2
    assert b"No such file" in missing.stderr

    status = env.ssh("admin", "sh -c 'exit 7'")
    assert status.returncode == 7, _err(status)


def test_denied_exec_exits_126_names_the_rule_and_changes_nothing(env: Env) -> None:
    proc = env.ssh("observer", f"rm {env.work}/marker")
    err = _assert_denied(proc, "lictor:default-deny")
    assert f"`rm {env.work}/marker`" in err
    redirect = env.ssh("observer", f"echo gone > {env.work}/marker")
    assert "observers do not write files" in _assert_denied(redirect, "obs-no-writes")
    _markers_intact(env)


def test_a_rule_for_a_named_target_decides_on_that_target(env: Env) -> None:
    # The target's name in lictor.yaml is what rules' `targets` match and what the audit log and the
    # recordings show, whatever the names of its upstream settings.
    proc = env.ssh("observer", f"sha256sum {env.work}/hello.txt")
    assert "checksums are not taken on web1" in _assert_denied(proc, "obs-no-sha256sum-on-web1")
    deadline = time.monotonic() + 15
    while True:
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        events = [
            e
            for e in map(json.loads, listing.stdout.splitlines())
            if "obs-no-sha256sum-on-web1" in e.get("rule_ids", [])
        ]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert events and {e.get("target") for e in events} == {"web1"}, events


def test_binary_output_is_byte_identical(env: Env) -> None:
    direct = env.direct(f"cat {env.work}/random.bin")
    assert direct.returncode == 0 and len(direct.stdout) == 1_000_000
    through = env.ssh("observer", f"cat {env.work}/random.bin")
    assert through.returncode == 0, _err(through)
    assert hashlib.sha256(through.stdout).hexdigest() == hashlib.sha256(direct.stdout).hexdigest()
    # stdin is relayed byte for byte too
    echoed = env.ssh("observer", "cat", input=direct.stdout[:300_000])
    assert echoed.stdout == direct.stdout[:300_000]


EVASIONS = [
    "ls; rm {m}",
    "ls && rm {m}",
    "false || rm {m}",
    "ls\nrm {m}",
    "echo $(rm {m})",
    "echo `rm {m}`",
    "ls $(rm {m})",
    "X=$(rm {m}) ls",
    "(rm {m})",
    "{{ rm {m}; }}",
    "ls | rm {m}",
    "cat <(rm {m})",
    "bash -c 'rm {m}'",
    'sh -c "rm {m}"',
    "eval 'rm {m}'",
    "echo {b64} | base64 -d | sh",
    "base64 -d <<< {b64} | bash",
    "find {w} -name marker -exec rm {{}} \\;",
    "find {w} -name marker -delete",
    "echo {m} | xargs rm",
    "xargs rm < /dev/null",
    "r\\m {m}",
    "'rm' {m}",
    "$'\\x72\\x6d' {m}",
    "/bin/rm {m}",
    "env rm {m}",
    "nohup rm {m}",
    "timeout 5 rm {m}",
    "a=rm; $a {m}",
    "cat {m} > {m}2",
    "echo x >> {m}",
    "cp /dev/null {m}",
    "python3 -c 'import os; os.remove(\"{m}\")'",
]


@pytest.mark.parametrize("template", EVASIONS)
def test_command_line_evasions_are_denied_and_the_target_is_unchanged(env: Env, template: str) -> None:
    marker = f"{env.work}/marker"
    b64 = base64.b64encode(f"rm {marker}".encode()).decode()
    command = template.format(m=marker, w=env.work, b64=b64)
    proc = env.ssh("observer", command)
    _assert_denied(proc)
    assert proc.stdout == b"", "nothing may run when part of a command line is denied"


def test_evasions_left_every_marker_in_place(env: Env) -> None:
    # runs after the parametrized evasions (file order): each of them was denied and changed nothing
    _markers_intact(env)


def test_unparsable_command_is_denied_with_the_parsers_reason(env: Env) -> None:
    proc = env.ssh("admin", "echo 'unterminated")
    err = _assert_denied(proc, "lictor:ssh-unparsable")
    assert "cannot be analysed" in err


def test_the_audit_log_names_the_rule_the_agent_is_told_for_an_unparsable_command(env: Env) -> None:
    # The policy's default deny replaced the addon's: the agent read lictor:ssh-unparsable, the audit log
    # said lictor:default-deny ("no rule allows exec: unparsable command ...").
    token = env.gw.token("agent-unparsable-audit", role="admin")
    _assert_denied(env.client.ssh(token, "echo 'audit-unterminated"), "lictor:ssh-unparsable")
    deadline = time.monotonic() + 15
    while True:
        audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        found = [
            e for e in map(json.loads, audit.stdout.splitlines()) if "audit-unterminated" in e["request"]["summary"]
        ]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(e["action"], e["rule_ids"]) for e in found] == [("deny", ["lictor:ssh-unparsable"])], found
    assert "cannot be analysed" in found[0]["message"], found


def test_a_command_that_is_not_utf8_is_denied_audited_and_recorded_escaped(env: Env) -> None:
    # asyncssh refused the exec request before any handler ran: ssh said only "exec request failed on
    # channel 0" (255), and neither the audit log nor the session's recording had anything of it.
    token = env.gw.token("agent-latin1", role="admin")
    command = b"touch " + str(env.work).encode() + b"/caf\xe9"
    proc = subprocess.run(
        [*env.client.ssh_argv(None), command],
        capture_output=True,
        env=env.client.env(token),
        timeout=30,
        check=False,
        start_new_session=True,
    )
    err = _assert_denied(proc, "lictor:ssh-unparsable")
    assert "not valid UTF-8" in err, err
    assert env.direct(f"ls {env.work}").stdout.count(b"caf") == 0
    shown = f"touch {env.work}/caf\\xe9"
    deadline = time.monotonic() + 15
    while True:
        audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        denials = [e for e in map(json.loads, audit.stdout.splitlines()) if shown in e["request"]["summary"]]
        if denials or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert denials, audit.stdout[-2000:]
    assert all(e.get("action") == "deny" for e in denials), denials
    commands = [e["data"] for e in _session_events(env, "agent-latin1") if e.get("kind") == "command"]
    assert [c["command"] for c in commands] == [shown], commands


def _decisions_of(env: Env, sub: str, count: int) -> list[dict[str, Any]]:
    """The audited decisions of ``sub``'s sessions, once there are ``count`` of them (at most 15 s)."""
    sessions = {e["s"] for e in _session_events(env, sub) if e.get("kind") == "session.start"}
    deadline = time.monotonic() + 15
    while True:
        audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        found = [e for e in map(json.loads, audit.stdout.splitlines()) if e.get("session") in sessions]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_command_line_too_long_to_forward_is_denied_audited_and_recorded(env: Env) -> None:
    # asyncssh read packets of at most 256 KiB: a longer exec request (three arguments of 100 KB) closed
    # the connection ("Max packet size exceeded", status 255), with nothing in the audit log but the end.
    token = env.gw.token("agent-long-command", role="admin")
    filler = "x" * 100_000
    argv = [*env.client.ssh_argv(f"touch {env.work}/made-by-a-long-command; :"), filler, filler, filler]
    proc = subprocess.run(argv, capture_output=True, env=env.client.env(token), timeout=30, check=False)
    err = _assert_denied(proc, "lictor:ssh-unparsable")
    assert "the command is longer than 65536 bytes" in err, err
    assert b"made-by-a-long-command" not in env.direct(f"ls {env.work}").stdout
    [denial] = _decisions_of(env, "agent-long-command", 1)
    assert (denial["action"], denial["rule_ids"]) == ("deny", ["lictor:ssh-unparsable"]), denial
    events = _session_events(env, "agent-long-command")
    [command] = [e["data"] for e in events if e.get("kind") == "command"]
    assert command["command"].startswith(f"touch {env.work}/made-by-a-long-command; : xxx"), command
    assert [e["data"]["rule_ids"] for e in events if e.get("kind") == "decision"] == [["lictor:ssh-unparsable"]]


def test_a_packet_longer_than_the_gateway_reads_closes_the_connection_audited(env: Env) -> None:
    # Past what the gateway reads at all, the connection still closes (the packet is not read), but the
    # refusal is audited and recorded in the session: it left no trace but the session's end.
    token = env.gw.token("agent-huge-packet", role="admin")

    async def run() -> None:
        async with env.connect(token=token) as conn:
            assert (await conn.run("echo before", encoding=None)).stdout == b"before\n"
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.run("echo " + "x" * (5 * 1024 * 1024), encoding=None)

    asyncio.run(run())
    denials = [e for e in _decisions_of(env, "agent-huge-packet", 2) if e["action"] == "deny"]
    assert [(e["rule_ids"], e["request"]["action"]) for e in denials] == [
        (["lictor:ssh-unparsable"], "oversized_packet")
    ], denials
    assert "longer than the 4194304 bytes the gateway reads" in denials[0]["message"], denials
    recorded = [e["data"] for e in _session_events(env, "agent-huge-packet") if e.get("kind") == "decision"]
    assert any("oversized packet" in d.get("summary", "") for d in recorded), recorded


def _connection_refusals(env: Env) -> list[dict[str, Any]]:
    audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "connection.refused", "--json")
    return [e for e in map(json.loads, audit.stdout.splitlines()) if e.get("protocol") == "ssh"]


def test_a_connection_breaking_the_protocol_before_login_is_audited(env: Env) -> None:
    # Before login there is no session to record in: a packet longer than the gateway reads (or text that is not
    # SSH) closed the connection with nothing in the audit log.
    before = len(_connection_refusals(env))
    with socket.create_connection(("127.0.0.1", env.client.port), timeout=10) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        banner = sock.recv(256)
        assert banner.startswith(b"SSH-2.0-"), banner
        sock.sendall((8 * 1024 * 1024).to_bytes(4, "big") + b"\x04" + b"\x00" * 1024)
        while sock.recv(65536):  # the gateway closes the connection
            pass
    expected = re.compile(r"a packet of 8388608 bytes before login is longer than the \d+ bytes the gateway reads")
    deadline = time.monotonic() + 25  # a burst of refusals is written as one event at most 10 s after it began
    while True:
        found = [e for e in _connection_refusals(env)[before:] if expected.fullmatch(e.get("reason", ""))]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found, _connection_refusals(env)[before:]
    assert found[0]["target"] and found[0]["peer"].startswith("127.0.0.1:"), found


def test_a_subsystem_name_too_long_to_forward_is_denied(env: Env) -> None:
    async def run() -> tuple[Any, bytes]:
        async with env.connect("admin") as conn:
            process = await conn.create_process(subsystem="n" * 300_000, encoding=None)
            err = await asyncio.wait_for(process.stderr.read(), 10)
            await process.wait_closed()
            return process.exit_status, err

    status, err = asyncio.run(run())
    assert status == 126, err
    assert b"denied this subsystem by rule lictor:ssh-unparsable" in err and b"300000 bytes, longer than 255" in err


def test_a_program_read_through_an_option_from_the_agents_input_is_denied(env: Env) -> None:
    # `psql -f -` passed (only a script operand was checked) and ran `\!` commands piped by the agent, unseen.
    marker = env.work / "psql_ran"
    script = f"\\! touch {marker}\n".encode()
    proc = env.ssh("admin", "psql -X -h 127.0.0.1 -U postgres -d postgres -f -", input=script)
    assert "would read its program from the session's input" in _assert_denied(proc, "lictor:ssh-unparsable")
    assert not marker.exists()


def test_a_makefile_read_from_the_agents_input_is_denied(env: Env) -> None:
    # `make -f -` was reported as `make` alone and ran the recipes piped by the agent, unseen.
    marker = env.work / "make_ran"
    proc = env.ssh("admin", "make -f -", input=f"all:\n\ttouch {marker}\n".encode())
    assert "would read its program from the session's input" in _assert_denied(proc, "lictor:ssh-unparsable")
    assert not marker.exists()
    netns = env.ssh("admin", f"ip netns exec lictor-none touch {marker}")
    assert "runs the command given after it" in _assert_denied(netns, "lictor:ssh-unparsable")


def test_a_shell_in_a_container_reading_the_agents_input_is_denied(env: Env) -> None:
    # `docker exec -i c sh` was reported as `docker` alone: a rule allowing docker let the agent's input run
    # as the commands of a shell in the container, and `kubectl exec` the same in a pod.
    marker = env.work / "container_ran"
    for command in ("docker exec -i c sh", "kubectl exec -i pod -- sh"):
        proc = env.ssh("admin", command, input=f"touch {marker}\n".encode())
        assert "sh would read its program from the session's input" in _assert_denied(proc, "lictor:ssh-unparsable")
    assert not marker.exists()


def test_exit_signal_and_stderr_are_relayed(env: Env) -> None:
    async def run() -> Any:
        async with env.connect("admin") as conn:
            killed = await conn.run("sh -c 'echo to-stderr >&2; kill -TERM $$'", encoding=None)
            return killed

    result = asyncio.run(run())
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM", result
    assert result.stderr == b"to-stderr\n"


def test_breaks_and_signals_relayed_to_a_command_are_recorded(env: Env) -> None:
    # A break was relayed to the target and left out of the recording (signals were in it).
    token = env.gw.token("agent-breaks", role="admin")

    async def run() -> Any:
        async with env.connect(token=token) as conn:
            process = await conn.create_process("cat", encoding=None)
            process.send_break(250)
            process.stdin.write(b"after-break\n")
            assert await process.stdout.readexactly(12) == b"after-break\n"
            process.send_signal("TERM")
            return await process.wait(check=False)

    result = asyncio.run(run())
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM", result
    deadline = time.monotonic() + 15
    while True:
        signals = [e["data"] for e in _session_events(env, "agent-breaks") if e.get("kind") == "signal"]
        if len(signals) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(s["signal"], s.get("msec")) for s in signals] == [("break", 250), ("TERM", None)], signals


def test_a_signal_name_too_long_for_the_target_is_dropped_and_the_channel_goes_on(env: Env) -> None:
    # The gateway reads packets of up to 4 MiB from agents, the target's sshd 256 KiB: a signal request with a
    # 300 KB name, relayed, would have dropped the pooled upstream connection and every channel on it.
    token = env.gw.token("agent-long-signal", role="admin")

    async def run() -> bytes:
        async with env.connect(token=token) as conn:
            process = await conn.create_process("cat", encoding=None)
            process.stdin.write(b"before\n")
            assert await asyncio.wait_for(process.stdout.readline(), 10) == b"before\n"
            process.send_signal("X" * 300_000)
            await asyncio.sleep(0.5)
            process.stdin.write(b"after\n")
            after = await asyncio.wait_for(process.stdout.readline(), 10)
            process.stdin.write_eof()
            await process.wait_closed()
            return bytes(after)

    assert asyncio.run(run()) == b"after\n"
    deadline = time.monotonic() + 10
    while True:
        signals = [e["data"] for e in _session_events(env, "agent-long-signal") if e.get("kind") == "signal"]
        if signals or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(s["signal"], s["delivered"]) for s in signals] == [("X" * 64 + "...", False)], signals


def test_reason_from_environment_reaches_the_audit_log(env: Env) -> None:
    # ... printable and at most 500 characters of it, as over HTTP: approvers and the audit read it
    reason = "checking-the-deploy" + "x" * 5000
    proc = env.ssh("observer", "echo reasoned", "-o", f"SetEnv=LICTOR_REASON={reason}")
    assert proc.returncode == 0, _err(proc)
    # The audit log is fed from the spool by the drain process: poll it (under load it lags a little).
    deadline = time.monotonic() + 15
    while True:
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        if "checking-the-deploy" in listing.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    [event] = [e for e in map(json.loads, listing.stdout.splitlines()) if "checking-the-deploy" in str(e.get("reason"))]
    assert event["reason"] == reason[:500], len(event["reason"])


def test_environment_variables_do_not_grow_the_gateway(env: Env) -> None:
    # asyncssh kept every `env` request of a channel: 2000 variables of 32 KB, which the gateway neither
    # forwards nor reads, grew it by over 100 MiB, and the agent could go on sending.
    assert env.gw.proc is not None
    pid = env.gw.proc.pid
    variables = {f"JUNK_{i}": "x" * 32000 for i in range(2000)}

    async def run() -> Any:
        async with env.connect("observer") as conn:
            return await conn.run(
                "echo still-works", env={**variables, "LICTOR_REASON": "env-bound-check"}, encoding=None
            )

    before = _rss_kib(pid)
    result = asyncio.run(run())
    grown = _rss_kib(pid) - before
    assert result.exit_status == 0 and result.stdout == b"still-works\n", result
    assert grown < 32 * 1024, f"the gateway grew by {grown // 1024} MiB"
    listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
    deadline = time.monotonic() + 15
    while "env-bound-check" not in listing.stdout and time.monotonic() < deadline:
        time.sleep(0.2)
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
    assert "env-bound-check" in listing.stdout  # the gateway's own variables are still read


def test_a_connection_has_a_bounded_number_of_open_channels(env: Env) -> None:
    # Each open channel may buffer up to its window (and takes an upstream slot): one connection opened as
    # many as it liked, 50 unread `cat /dev/zero` grew the gateway by 240 MiB.
    token = env.gw.token("channels-admin", role="admin")  # its own subject: its recordings are read below

    async def run() -> tuple[Any, Any, Any]:
        async with env.connect(token=token) as conn:
            held = [await conn.create_process("sleep 30", encoding=None) for _ in range(32)]
            refused = await asyncio.wait_for(conn.run("echo over", encoding=None), 20)
            forward_refused: Any = None
            try:
                await conn.open_connection("127.0.0.1", 1)
            except asyncssh.ChannelOpenError as exc:
                forward_refused = exc
            sftp_refused: Any = None
            try:
                async with conn.start_sftp_client():
                    pass
            except (asyncssh.Error, OSError) as exc:
                sftp_refused = exc
            held.pop().close()
            await asyncio.sleep(0.5)
            again = await asyncio.wait_for(conn.run("echo again", encoding=None), 20)
            for process in held:
                process.close()
            return refused, forward_refused, sftp_refused, again

    refused, forward_refused, sftp_refused, again = asyncio.run(run())
    assert refused.exit_status == 255 and refused.stdout == b"", refused
    assert b"lictor: this connection already has 32 open channels" in refused.stderr, refused
    assert forward_refused is not None and "32 open channels" in forward_refused.reason
    # The rules allowed the forward; the recording says it was refused all the same.
    (forward,) = _forwards(env, "channels-admin", "127.0.0.1:1")
    assert forward["action"] == "allow" and forward["result"] == "refused: channel limit", forward
    assert sftp_refused is not None
    assert again.exit_status == 0 and again.stdout == b"again\n", again


def test_an_identity_has_a_bounded_number_of_connections(env: Env) -> None:
    # Each connection may hold max_channels channels, each buffering up to its window: one agent opening
    # connections without end grew the gateway without end. 16 per identity and target by default.
    token = env.gw.token("agent-many", role="observer")

    async def run() -> tuple[bool, bool, bool]:
        held = [await env.connect(token=token) for _ in range(16)]
        try:
            try:
                async with env.connect(token=token):
                    refused = False
            except asyncssh.PermissionDenied:
                refused = True
            async with env.connect("observer") as other:  # another identity is not held up
                other_ok = (await other.run("true")).exit_status == 0
            held.pop().close()
            await asyncio.sleep(0.5)
            async with env.connect(token=token) as again:
                again_ok = (await again.run("true")).exit_status == 0
            return refused, other_ok, again_ok
        finally:
            for conn in held:
                conn.close()

    assert asyncio.run(run()) == (True, True, True)
    deadline = time.monotonic() + 10
    while True:
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
        if "agent-many already has 16 connections" in listing.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "agent-many already has 16 connections open to this target" in listing.stdout, listing.stdout


def test_connections_that_never_log_in_cannot_take_every_descriptor_of_the_gateway(env: Env) -> None:
    # Each connection that has not logged in holds a descriptor for up to a minute: enough of them took the
    # descriptors the gateway needs for its agents' upstream connections and its files. As sshd's MaxStartups
    # does, one past the limit is closed at once.
    from lictor_addons.ssh._server import MAX_SETTING_UP

    def banner() -> bytes:
        with socket.create_connection(("127.0.0.1", env.client.port), timeout=10) as sock:
            try:
                return sock.recv(64)
            except ConnectionResetError:
                return b""

    with idle_connections(env.client.port, MAX_SETTING_UP):
        # the gateway accepts the idle ones in its own time; then one more is closed
        wait_until(lambda: not banner().startswith(b"SSH-2.0-"), 10, "the connection past the limit to be closed")
    wait_until(lambda: banner().startswith(b"SSH-2.0-"), 10, "connections to be served again")
    assert env.ssh("observer", "true").returncode == 0
    listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "connection.refused", "--json")
    events = [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]
    refused = [e for e in events if e.get("protocol") == "ssh" and "logging in at once" in e.get("reason", "")]
    assert refused and refused[0]["count"] == 1, listing.stdout


def test_agent_forwarding_is_refused_with_a_message(env: Env) -> None:
    # OpenSSH asks for agent forwarding without wanting an answer: the gateway refused it silently, and
    # the agent's command ran without its keys with nothing saying why.
    require_binary("ssh-agent")
    socket_path = env.tmp / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        environ = {**env.client.env(env.tokens["admin"]), "SSH_AUTH_SOCK": str(socket_path)}
        proc = subprocess.run(
            env.client.ssh_argv("echo auth-sock=$SSH_AUTH_SOCK", "-A"),
            input=b"", capture_output=True, env=environ, timeout=30, check=False, start_new_session=True,
        )  # fmt: skip
    finally:
        agent.terminate()
        agent.wait(10)
    assert proc.returncode == 0, _err(proc)
    assert proc.stdout == b"auth-sock=\n"
    assert "lictor: agent forwarding is not allowed through the gateway" in _err(proc)


# -- authentication --------------------------------------------------------------------------------


def test_a_tunnel_device_is_refused_with_a_message_and_recorded(env: Env) -> None:
    # `ssh -w` was refused by asyncssh unseen ("TUN/TAP request refused"), with nothing in the recording.
    token = env.gw.token("agent-tunnel", role="admin")

    async def attempt() -> str:
        async with env.connect(token=token) as conn:
            try:
                await conn.open_tun(7)
            except asyncssh.ChannelOpenError as exc:
                return exc.reason
            return "opened"

    assert "lictor: tunnel devices (ssh -w, tun7) are not allowed through the gateway" in asyncio.run(attempt())
    found = [(f["action"], f["result"]) for f in _forwards(env, "agent-tunnel", "tun7")]
    assert found == [("deny", "denied")], found


def test_bad_token_is_refused_with_a_reason(env: Env) -> None:
    argv = env.client.ssh_argv("id", "-o", "NumberOfPasswordPrompts=1", log_level="INFO")
    proc = subprocess.run(
        argv, capture_output=True, env=env.client.env("not-a-jwt"), timeout=30, start_new_session=True, check=False
    )
    assert proc.returncode == 255
    assert b"lictor: authentication failed" in proc.stderr, proc.stderr  # the banner names the reason
    assert b"Permission denied" in proc.stderr


def test_a_token_longer_than_openssh_s_password_limit_is_refused_with_what_to_do(env: Env) -> None:
    # OpenSSH sends at most 1023 bytes of a password: a longer token arrived cut, and the agent read "malformed
    # token: Invalid crypto padding", which says nothing of what to do.
    long_token = env.gw.token("agent-long", role="observer", note="x" * 900)
    assert len(long_token) > 1023
    argv = env.client.ssh_argv("id", "-o", "NumberOfPasswordPrompts=1", log_level="INFO")
    proc = subprocess.run(
        argv, capture_output=True, env=env.client.env(long_token), timeout=30, start_new_session=True, check=False
    )
    assert proc.returncode == 255
    assert b"OpenSSH sends at most 1023 bytes of a password" in proc.stderr, proc.stderr


def test_a_connection_runs_nothing_once_its_token_has_expired(env: Env) -> None:
    short = env.gw.token("agent-short", ttl="3s", role="observer")

    async def run() -> tuple[Any, Any]:
        async with env.connect(token=short) as conn:
            before = await conn.run("echo before")
            await asyncio.sleep(3.5)  # the connection stays up (as with ssh's ControlMaster) past the token
            after = await conn.run("echo after")
            return before, after

    before, after = asyncio.run(run())
    assert before.exit_status == 0 and before.stdout == "before\n", before
    assert after.exit_status == 126 and after.stdout == "", after
    assert "token has expired" in after.stderr, after.stderr


def test_registered_public_key_gets_its_identity(env: Env) -> None:
    args = ["-i", str(env.user_key), "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey"]
    ok = env.client.ssh(None, "echo as-bob", *args, password=False, user="bob")
    assert ok.returncode == 0, _err(ok)
    assert ok.stdout == b"as-bob\n"
    # key-bob is an operator: an approve rule applies to it, a shell would be allowed, rm is not
    _assert_denied(env.client.ssh(None, f"rm {env.work}/marker", *args, password=False, user="bob"))
    stranger = ssh_keygen(env.tmp / "stranger_key", "stranger")
    refused = env.client.ssh(
        None,
        "id",
        "-i",
        str(stranger),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "PreferredAuthentications=publickey",
        password=False,
    )
    assert refused.returncode == 255


def test_user_certificate_principal_is_the_identity(env: Env) -> None:
    args = [
        "-i", str(env.cert_key), "-o", f"CertificateFile={env.cert_key}-cert.pub", "-o", "IdentitiesOnly=yes",
        "-o", "PreferredAuthentications=publickey",
    ]  # fmt: skip
    ok = env.client.ssh(None, "echo certified", *args, password=False, user="cert-alice")
    assert ok.returncode == 0, _err(ok)
    assert ok.stdout == b"certified\n"
    wrong_principal = env.client.ssh(None, "echo x", *args, password=False, user="mallory")
    assert wrong_principal.returncode == 255

    def audited() -> bool:
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
        return any("for 'mallory': not one of its principals" in line for line in listing.stdout.splitlines())

    wait_until(audited, 15, "the refused certificate's auth.failed event")


def test_a_user_certificate_without_principals_is_refused(env: Env) -> None:
    # asyncssh takes a certificate that names no principals as valid for every user name, and the user name is
    # the identity: its holder logged in as whoever it named. OpenSSH's sshd refuses such a certificate.
    key = ssh_keygen(env.tmp / "no_principals_key", "no-principals")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(env.tmp / "user_ca"), "-I", "no-principals", "-V", "-5m:+1h", f"{key}.pub"],
        check=True,
        capture_output=True,
    )
    args = [
        "-i", str(key), "-o", f"CertificateFile={key}-cert.pub", "-o", "IdentitiesOnly=yes",
        "-o", "PreferredAuthentications=publickey",
    ]  # fmt: skip
    argv = env.client.ssh_argv("echo as-cert-alice", *args, user="cert-alice", password=False, log_level="INFO")
    proc = subprocess.run(
        argv, capture_output=True, env=env.client.env(None), timeout=30, start_new_session=True, check=False
    )
    assert proc.returncode == 255 and proc.stdout == b"", _err(proc)
    assert b"certificate names no principals" in proc.stderr, _err(proc)
    audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
    reasons = [json.loads(line)["reason"] for line in audit.stdout.splitlines()]
    assert any("certificate names no principals" in r and "cert-alice" in r for r in reasons), reasons


def test_a_login_with_keys_the_target_does_not_accept_is_audited(env: Env) -> None:
    # A refused token was audited; a refused public key or certificate was not: a login attempt with a key that
    # is no longer registered (a leaked one) left no trace in the audit log.
    stranger = ssh_keygen(env.tmp / "stranger_key", "stranger")
    args = ["-i", str(stranger), "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey"]
    proc = env.client.ssh(None, "echo in", *args, password=False, user="key-bob")
    assert proc.returncode == 255 and proc.stdout == b"", _err(proc)
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{stranger}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]

    def audited() -> bool:
        listing = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
        return any(fingerprint in json.loads(line)["reason"] for line in listing.stdout.splitlines())

    wait_until(audited, 15, "the refused key's auth.failed event")
    # a login that succeeds, after a key the target does not accept was tried first, is not a refusal
    before = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
    ok = env.client.ssh(env.tokens["observer"], "echo in", "-i", str(stranger), "-o", "IdentitiesOnly=yes",
                        "-o", "PreferredAuthentications=publickey,password", password=False)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout == b"in\n", _err(ok)
    after = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "auth.failed", "--json")
    assert after.stdout == before.stdout


def test_unknown_upstream_host_key_is_refused(env: Env) -> None:
    proc = env.bad_client.ssh(env.tokens["observer"], "echo should-not-run")
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert b"host key does not match" in proc.stderr


def test_legacy_scp_says_why_when_the_target_cannot_be_reached(env: Env) -> None:
    # sftp (and scp over SFTP) said why; legacy scp got "internal error in the gateway".
    local = env.tmp / "unreachable.txt"
    local.write_text("payload\n")
    up = env.bad_client.scp(env.tokens["operator"], "-O", str(local), env.bad_client.remote("/tmp/unreachable.txt"))
    down = env.bad_client.ssh(env.tokens["operator"], "scp -f /tmp/unreachable.txt")
    for proc in (up, down):
        assert proc.returncode == 1, _err(proc)
        assert b"lictor: the target's host key does not match" in proc.stderr, _err(proc)
        assert b"internal error" not in proc.stderr, _err(proc)


def test_gateway_logs_in_upstream_with_a_certificate(env: Env) -> None:
    proc = env.cert_client.ssh(env.tokens["observer"], "echo via-certificate")
    assert proc.returncode == 0, _err(proc)
    assert proc.stdout == b"via-certificate\n"


def test_other_subsystems_are_decided(env: Env) -> None:
    proc = env.client.ssh(env.tokens["admin"], "netconf", "-s")
    err = _assert_denied(proc, "lictor:default-deny")
    assert "`netconf`" in err


def test_a_subsystem_name_that_is_not_ascii_is_denied_audited_and_recorded_escaped(env: Env) -> None:
    # asyncssh refused it before the gateway saw it: "subsystem request failed" (255), nothing audited.
    token = env.gw.token("agent-subsystem-bytes", role="admin")
    proc = subprocess.run(
        [*env.client.ssh_argv(None, "-s"), b"net\xffconf"],
        capture_output=True,
        env=env.client.env(token),
        timeout=30,
        check=False,
        start_new_session=True,
    )
    err = _assert_denied(proc, "lictor:ssh-unparsable")
    assert "denied this subsystem" in err and "not ASCII" in err, err
    deadline = time.monotonic() + 15
    while True:
        audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
        denials = [e for e in map(json.loads, audit.stdout.splitlines()) if "net\\xffconf" in e["request"]["summary"]]
        if denials or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [e["action"] for e in denials] == ["deny"], audit.stdout[-2000:]
    commands = [e["data"] for e in _session_events(env, "agent-subsystem-bytes") if e.get("kind") == "command"]
    assert [c["command"] for c in commands] == ["net\\xffconf"], commands


# -- forwarding -------------------------------------------------------------------------------------


def test_port_forwarding_is_decided_by_rules(env: Env) -> None:
    # (subjects of their own: finding the forward events reads every recorded session of the subject)
    tokens = {sub: env.gw.token(sub, role=role) for sub, role in (("fwd-admin", "admin"), ("fwd-obs", "observer"))}

    async def attempt(sub: str) -> bytes | str:
        async with env.connect(token=tokens[sub]) as conn:
            try:
                reader, writer = await conn.open_connection("127.0.0.1", env.sshd.port)
            except asyncssh.ChannelOpenError as exc:
                return exc.reason
            banner = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return bytes(banner)

    assert asyncio.run(attempt("fwd-admin")).startswith(b"SSH-2.0-OpenSSH")
    denied = asyncio.run(attempt("fwd-obs"))
    assert isinstance(denied, str) and "lictor: denied port forwarding (local) to 127.0.0.1:" in denied
    results = {sub: [f["result"] for f in _forwards(env, sub, f"127.0.0.1:{env.sshd.port}")] for sub in tokens}
    assert results == {"fwd-admin": ["opened"], "fwd-obs": ["denied"]}, results


def test_a_forward_to_a_host_name_too_long_for_the_target_is_denied_and_other_agents_keep_their_channels(
    env: Env,
) -> None:
    # The gateway reads packets of up to 4 MiB from agents, the target's sshd 256 KiB: a host name of 300 KB,
    # allowed by the rule on `127.0.0.1:*`, would have dropped the pooled upstream connection.
    async def run() -> tuple[str, bytes]:
        async with env.connect("observer") as other_conn, env.connect("admin") as conn:
            other = await other_conn.create_process("cat", encoding=None)
            other.stdin.write(b"before\n")
            assert await asyncio.wait_for(other.stdout.readline(), 10) == b"before\n"
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_connection("127.0.0.1:" + "x" * 300_000, 22)
            await asyncio.sleep(0.5)
            other.stdin.write(b"after\n")
            after = await asyncio.wait_for(other.stdout.readline(), 10)
            other.stdin.write_eof()
            await other.wait_closed()
            return refused.value.reason, after

    reason, after = asyncio.run(run())
    assert after == b"after\n"
    assert "by rule lictor:ssh-unparsable: the destination host name is 300010 bytes, longer than 255" in reason, (
        reason[:300]
    )


def test_how_much_went_through_a_port_forward_is_recorded(env: Env) -> None:
    # The recording had the forward's opening only: nothing of when it ended or what went through it.
    token = env.gw.token("fwd-amounts", role="admin")
    destination = f"127.0.0.1:{env.sshd.port}"

    async def forward(drop: bool) -> bytes:
        conn = await env.connect(token=token)
        reader, writer = await conn.open_connection("127.0.0.1", env.sshd.port)
        banner = bytes(await asyncio.wait_for(reader.readline(), 10))
        writer.write(b"SSH-2.0-lictor-test\r\n")
        await writer.drain()
        if not drop:
            writer.close()
            await asyncio.sleep(0.5)
        conn.close()  # with drop, the forward is still open when the connection goes
        await conn.wait_closed()
        return banner

    banners = [asyncio.run(forward(drop)) for drop in (False, True)]
    deadline = time.monotonic() + 15
    while True:
        ends = [e["data"] for e in _session_events(env, "fwd-amounts") if e.get("kind") == "forward.end"]
        if len(ends) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [e["destination"] for e in ends] == [destination, destination], ends
    for end, banner in zip(ends, banners, strict=True):
        assert end["bytes_sent"] == len(b"SSH-2.0-lictor-test\r\n"), end
        assert end["bytes_received"] >= len(banner) > 0, end


def test_remote_port_forwarding_is_refused_with_a_reason_the_agent_sees_and_the_audit_keeps(env: Env) -> None:
    # The SSH reply to `ssh -R` carries no text: OpenSSH said only "remote port forwarding failed", and when the
    # policy allowed it, the audit log had an allow for a forward the gateway then refused.
    tokens = {sub: env.gw.token(sub, role=role) for sub, role in (("rfwd-admin", "admin"), ("rfwd-obs", "observer"))}
    forward = ["-R", "127.0.0.1:18080:127.0.0.1:22"]
    admin = env.client.ssh(tokens["rfwd-admin"], "echo ran", *forward)
    assert admin.returncode == 0 and admin.stdout == b"ran\n", _err(admin)
    assert (
        b"lictor: denied port forwarding (remote) to 127.0.0.1:18080 by rule lictor:ssh-unsupported: remote port "
        b"forwarding (-R) is not supported by the gateway" in admin.stderr
    ), admin.stderr
    assert b"forward from your side instead (ssh -L or -D)" in admin.stderr, admin.stderr
    observer = env.client.ssh(tokens["rfwd-obs"], "echo ran", *forward)
    assert b"lictor: denied port forwarding (remote) to 127.0.0.1:18080 by rule lictor:default-deny" in observer.stderr
    # without a session channel, `ssh -v` shows it (a debug message: OpenSSH shows those at debug level only)
    quiet = subprocess.run(
        [*env.client.ssh_argv(None, "-N", "-o", "ExitOnForwardFailure=yes", *forward, log_level="DEBUG")],
        capture_output=True,
        env=env.client.env(tokens["rfwd-obs"]),
        timeout=30,
        check=False,
        start_new_session=True,
    )
    assert quiet.returncode == 255, _err(quiet)
    assert b"Remote: lictor: denied port forwarding (remote) to 127.0.0.1:18080" in quiet.stderr, _err(quiet)
    audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
    found = [
        (e["identity"]["sub"], e["action"], e["rule_ids"], e.get("phase"))
        for e in map(json.loads, audit.stdout.splitlines())
        if e["request"]["summary"] == "port forwarding (remote) to 127.0.0.1:18080"
    ]
    assert ("rfwd-admin", "deny", ["lictor:ssh-unsupported"], "protocol") in found, found
    assert ("rfwd-obs", "deny", ["lictor:default-deny"], "decision") in found, found
    assert [f["result"] for f in _forwards(env, "rfwd-admin", "127.0.0.1:18080")] == [
        "refused: remote forwarding is not supported"
    ]


def test_socket_forwarding_is_decided_audited_recorded_and_refused_with_a_message(env: Env) -> None:
    # asyncssh refused Unix socket forwarding unseen: `ssh -L sock:/path` said only "Connection refused",
    # and neither the audit log nor the recording had the attempt.
    token = env.gw.token("fwd-socket", role="admin")
    local = env.tmp / "forwarded.sock"
    local.unlink(missing_ok=True)
    forward = subprocess.Popen(
        env.client.ssh_argv(None, "-N", "-L", f"{local}:/run/lictor-none.sock", log_level="INFO"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env.client.env(token),
        start_new_session=True,
    )
    try:
        wait_until(local.exists, 15, "the local end of the forward")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(local))
            sock.settimeout(15)
            assert sock.recv(100) == b""  # refused: the client closes its end
    finally:
        # OpenSSH's client now and then misses a SIGTERM that arrives while it handles the failed channel open,
        # and waits in poll() for good: what it had to say is written by then, so end it for sure.
        forward.terminate()
        try:
            _, stderr = forward.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            forward.kill()
            _, stderr = forward.communicate(timeout=15)
    assert b"lictor: denied socket forwarding (local) to /run/lictor-none.sock" in stderr, stderr
    remote = env.client.ssh(
        token, "", "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{env.work}/remote.sock:127.0.0.1:{env.sshd.port}"
    )
    assert remote.returncode == 255 and b"forwarding failed" in remote.stderr, remote
    assert not (env.work / "remote.sock").exists()
    for destination in ("/run/lictor-none.sock", f"{env.work}/remote.sock"):
        found = [(f["action"], f["result"]) for f in _forwards(env, "fwd-socket", destination)]
        assert found == [("deny", "denied")], (destination, found)
    audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
    summaries = [e["request"]["summary"] for e in map(json.loads, audit.stdout.splitlines())]
    assert "socket forwarding (local) to /run/lictor-none.sock" in summaries, summaries[-5:]


# -- approvals -------------------------------------------------------------------------------------


def test_approval_holds_the_command_until_an_approver_decides(env: Env) -> None:
    target = env.work / "approved_file"
    proc = subprocess.Popen(
        env.client.ssh_argv(f"touch {target}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env.client.env(env.tokens["operator"]),
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        match = re.search(r"waiting for approval (\S+?):", line)
        assert match, line
        assert env.direct(f"test -e {target}").returncode == 1, "nothing runs before the approval"
        approve = lictor(
            "approvals", "approve", match.group(1), "--url", env.approvals_url, "--token", env.tokens["approver"],
            check=False,
        )  # fmt: skip
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert env.direct(f"test -e {target}").returncode == 0
    # Audited once as held and once as resolved (it was audited twice as held)
    audit = lictor("audit", "list", "--state-dir", str(env.gw.state_dir), "--kind", "decision", "--json")
    touches = [json.loads(line) for line in audit.stdout.splitlines() if str(target) in line]
    assert [(e["action"], e["phase"]) for e in touches] == [("approve", "decision"), ("allow", "approval")], touches


def test_a_transfer_whose_links_change_while_it_is_approved_is_refused(env: Env) -> None:
    # git and rsync open the paths as written: approved while a link led inside the allowed tree, the transfer ran
    # once the link had been turned elsewhere, and read what nobody approved.
    rsync = require_binary("rsync")
    inside, outside = f"{env.work}/held_inside", f"{env.work}-held_outside"
    made = env.direct(
        f"mkdir -p {inside} {outside} && echo approved > {inside}/s && echo secret > {outside}/s && "
        f"ln -sfn {inside} {env.work}/held_link"
    )
    assert made.returncode == 0, made.stderr
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    copy = env.tmp / "held_copy"
    proc = subprocess.Popen(
        [rsync, "-e", transport, env.client.remote(f"{env.work}/held_link/s"), str(copy)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env.client.env(env.gw.token("agent-held-sync", role="held-sync")), start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        match = re.search(r"waiting for approval (\S+?):", line)
        assert match, line
        assert env.direct(f"ln -sfn {outside} {env.work}/held_link").returncode == 0
        approve = lictor(
            "approvals", "approve", match.group(1), "--url", env.approvals_url, "--token", env.tokens["approver"],
            check=False,
        )  # fmt: skip
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert proc.wait(timeout=30) != 0
        err = proc.stderr.read().decode()
        assert not copy.exists() or copy.read_bytes() != b"secret\n", "a file nobody approved was read"
        assert "changed" in err and f"{outside}/s" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        env.direct(f"rm -rf {inside} {outside} {env.work}/held_link")


def test_approval_that_expires_is_a_denial(env: Env) -> None:
    target = env.work / "never_made"
    started = time.monotonic()
    proc = env.ssh("operator", f"mkdir {target}")
    err = _assert_denied(proc, "op-mkdir")
    assert "waiting for approval" in err and "expired" in err
    assert time.monotonic() - started >= 1.5
    assert env.direct(f"test -e {target}").returncode == 1


# -- shells ----------------------------------------------------------------------------------------


PROMPT = rb"\$ $"


@contextlib.contextmanager
def _line_shell(client: GatewayClient, *args: Any, **kw: Any) -> Iterator[Any]:
    """An interactive shell through the gateway (``client.shell(*args, **kw)``), at its first prompt; once the
    block is done, ``exit`` must end it with status 0."""
    shell = client.shell(*args, **kw)
    try:
        shell.expect(PROMPT)
        yield shell
        shell.send(b"exit\r")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()


def test_line_mode_shell_checks_each_line_before_the_target_sees_it(env: Env) -> None:
    shell = env.client.shell(env.tokens["operator"])
    try:
        shell.expect(PROMPT)
        shell.send(b"echo first-line\r")
        assert b"first-line\r\n" in shell.expect(PROMPT)
        denied_file = env.work / "from_denied_line"
        shell.send(f"echo ok; cat > {denied_file} </dev/null\r".encode())
        out = shell.expect(rb"lictor: denied[^\n]*\n")
        assert b"obs-no-writes" in out
        shell.send(f"r\x7f\x7frm {env.work}/marker\r".encode())  # backspace editing, then a denied line
        shell.expect(rb"lictor: denied `rm [^\n]*\n")
        shell.send(b"echo still-usable\r")
        assert b"still-usable" in shell.expect(rb"still-usable\r\n[^\n]*\$ $")
        shell.send(b"sleep 30\r")
        time.sleep(0.5)
        shell.send(b"\x03")  # Ctrl-C interrupts the running command
        shell.expect(PROMPT, timeout=10)
        shell.resize(40, 100)
        time.sleep(0.3)
        shell.send(b"stty size\r")
        assert b"40 100" in shell.expect(PROMPT)
        shell.send(b"exit 3\r")
        assert shell.wait(timeout=15) == 3
    finally:
        shell.close()
    assert env.direct(f"test -e {denied_file}").returncode == 1, "a denied line must never reach the target"
    _markers_intact(env)


def test_the_agents_terminal_settings_cannot_edit_a_checked_line(env: Env) -> None:
    # With the agent's own modes on the target's terminal, `stty kill @` turned the checked line
    # "echo @touch X" into "touch X" there, and `iuclc` turned "echo ABC" into "echo abc".
    marker = env.work / "edited_after_check"
    with _line_shell(
        env.client, env.tokens["operator"], stty=["kill", "@", "erase", "~", "eol", "%", "iuclc"]
    ) as shell:
        shell.send(f"echo @touch {marker}\r".encode())
        assert f"@touch {marker}".encode() in shell.expect(PROMPT)
        shell.send(b"echo A~B%C\r")
        assert b"A~B%C\r\n" in shell.expect(PROMPT)
    assert env.direct(f"test -e {marker}").returncode == 1


def test_a_line_cannot_change_the_targets_terminal_settings(env: Env) -> None:
    # `stty` is allowed (`stty size`), but `stty kill @` run on the target gave its terminal an erase-line
    # character: the next checked line "echo x@touch X" reached bash as "touch X".
    marker = env.work / "edited_by_the_targets_terminal"
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        for settings in ("kill @", "werase @", "-F /dev/tty lnext @", "eol @", "iuclc", "sane"):
            shell.send(f"stty {settings}\r".encode())
            assert b"the target's terminal edits" in shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
        shell.send(f"echo x@touch {marker}\r".encode())
        assert f"x@touch {marker}\r\n".encode() in shell.expect(PROMPT)
        shell.send(b"stty size\r")
        assert b"24 80" in shell.expect(PROMPT)
    assert env.direct(f"test -e {marker}").returncode == 1, "a command no rule allowed ran on the target"


def test_a_line_cannot_choose_another_history_expansion_character(env: Env) -> None:
    # `!` is refused in typed lines, but after `printf -v histchars Q` the target's bash expanded the
    # checked `echo "QQ:1"` into `echo "'"; touch X; "'"` (a word of the previous, checked, echo line).
    marker = env.work / "run_by_history_expansion"
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        shell.send(b"printf -v histchars Q\r")
        assert b"histchars" in shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
        shell.send(f"echo '\"; touch {marker}; \"'\r".encode())
        shell.expect(PROMPT)
        shell.send(b'echo "QQ:1"\r')
        assert b"QQ:1\r\n" in shell.expect(PROMPT)
    assert env.direct(f"test -e {marker}").returncode == 1, "a command no rule allowed ran on the target"


def test_a_line_cannot_switch_the_shell_to_a_locale_that_reads_quotes_elsewhere(env: Env) -> None:
    # In GBK the last byte of the UTF-8 "中" and the backslash after it are one character: bash read the
    # checked `echo 中\' 'x;touch X;#'` (one echo) as `echo 中\ ' 'x`, then `touch X`.
    marker = env.work / "run_in_gbk"
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        for line in (f"printf -v LC_ALL {GBK}", f"printf -v LC_CTYPE %s {GBK}"):
            shell.send(f"{line}\r".encode())
            assert b"UTF-8 locale" in shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
        shell.send(f"echo 中\\' 'x;touch {marker};#'\r".encode())
        assert f"中' x;touch {marker};#\r\n".encode() in shell.expect(PROMPT)
    assert env.direct(f"test -e {marker}").returncode == 1, "a command no rule allowed ran on the target"
    # the target does have the locale: there, that line runs the touch
    ran = env.direct(f"cd {env.work} && LC_ALL={GBK} bash -c \"echo 中\\\\' 'x;touch {marker}.direct;#'\"")
    assert ran.returncode == 0 and env.direct(f"test -e {marker}.direct").returncode == 0, ran


def test_a_denied_line_shows_the_prompt_again(env: Env) -> None:
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        shell.send(f"rm {env.work}/marker\r".encode())
        shell.expect(rb"lictor: denied `rm [^\n]*\n[^\n]*\$ $", timeout=5)  # nothing typed after the denial
    _markers_intact(env)


def test_a_line_longer_than_the_targets_terminal_line_is_denied(env: Env) -> None:
    # The target's terminal (canonical mode) keeps 4095 bytes of a line and silently drops the rest:
    # an allowed `echo 'AAAA...'` lost its closing quote there, so bash read the next (allowed) line
    # `echo "';touch X;#"` as the end of that string followed by `touch X`.
    marker = env.work / "after_a_cut_line"
    shell = env.client.shell(env.tokens["operator"])
    try:
        shell.expect(PROMPT)
        line = b"echo '" + b"A" * 4200 + b"'\r"
        for i in range(0, len(line), 512):
            shell.send(line[i : i + 512])
            time.sleep(0.02)
        shell.expect(rb"lictor: denied[^\n]*\n", timeout=10)
        shell.send(f'echo "\';touch {marker};#"\r'.encode())
        shell.expect(PROMPT)
        shell.send(b"exit\r")
        shell.wait(timeout=15)
    finally:
        shell.close()
    assert env.direct(f"test -e {marker}").returncode == 1, "a command no rule allowed ran on the target"


def test_a_line_ending_in_a_backslash_is_denied(env: Env) -> None:
    # Each line is decided alone, but the target joins `echo one \` and `echo two` into one command.
    argv = env.client.ssh_argv(None, "-T")
    run = subprocess.run(
        argv, input=b"echo one \\\necho two\n", capture_output=True, env=env.client.env(env.tokens["operator"]),
        timeout=30, start_new_session=True,
    )  # fmt: skip
    assert run.returncode == 126, run
    assert run.stdout == b""
    assert b"line continuation" in run.stderr


def test_comment_lines_in_a_piped_script_run_nothing_and_are_not_denied(env: Env) -> None:
    # A script's comments were decided as requests for "no program", which no rule allowed: the first
    # comment ended the script.
    script = b"#!/bin/sh\n# say hello\n   # indented comment\necho hello # and a trailing comment\n"
    argv = env.client.ssh_argv(None, "-T")
    run = subprocess.run(
        argv, input=script, capture_output=True, env=env.client.env(env.tokens["operator"]), timeout=30,
        start_new_session=True,
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (0, b"hello\n"), run
    # a line without a program that changes the shell is still decided (and no rule allows it)
    run = subprocess.run(
        argv, input=b"# next: a variable\nPATH=/tmp\necho after\n", capture_output=True,
        env=env.client.env(env.tokens["operator"]), timeout=30, start_new_session=True,
    )  # fmt: skip
    assert run.returncode == 126 and run.stdout == b"" and b"lictor: denied" in run.stderr, run


# A program that reads only part of a line (`head -c 5` reads "echo ") left the rest of that line, the
# unchecked " rm -f VICTIM", for the target's bash to run as a command.
PARTIAL_READERS = ["head -c 5", "dd bs=1 count=5 status=none", "read -t 1 -n 5 x"]


@pytest.mark.parametrize("reader", PARTIAL_READERS)
def test_a_program_reading_part_of_a_typed_line_leaves_nothing_for_the_shell_to_run(env: Env, reader: str) -> None:
    victim = env.work / f"victim-tty-{reader.split()[0]}"
    assert env.direct(f"touch {victim}").returncode == 0
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        # typed ahead while the reader runs: decided as `echo ...`, and never given to the reader
        shell.send(f"{reader}\recho rm -f {victim}\r".encode())
        shell.send(b"\x04")  # end of input for the running program
        shell.expect(rf"\$ rm -f {victim}\r\n[^\n]*\$ $".encode())  # the echo ran, whole, after the reader
        shell.send(b"echo still-usable\r")
        shell.expect(rb"still-usable\r\n[^\n]*\$ $")
    assert env.direct(f"test -e {victim}").returncode == 0, "an unchecked rest of a line ran on the target"


@pytest.mark.parametrize("reader", PARTIAL_READERS)
def test_a_program_reading_part_of_a_piped_line_leaves_nothing_for_the_shell_to_run(env: Env, reader: str) -> None:
    victim = env.work / f"victim-pipe-{reader.split()[0]}"
    assert env.direct(f"touch {victim}").returncode == 0
    script = f"{reader}\necho rm -f {victim}\necho done\n".encode()
    run = subprocess.run(
        env.client.ssh_argv(None, "-T"), input=script, capture_output=True,
        env=env.client.env(env.tokens["operator"]), timeout=30, start_new_session=True,
    )  # fmt: skip
    assert env.direct(f"test -e {victim}").returncode == 0, ("an unchecked rest of a line ran on the target", run)
    assert (run.returncode, run.stdout) == (0, f"rm -f {victim}\ndone\n".encode()), run


def test_a_program_that_prints_the_ready_mark_gets_only_whole_lines_and_leaves_nothing_behind(env: Env) -> None:
    # The mark the target's bash prints with its prompt is no secret: a line can print it while a program
    # reads. The gateway then sends the next line early, but the terminal hands it out whole and bash
    # discards what the program left of it before reading a command.
    victim = env.work / "victim-forged-mark"
    assert env.direct(f"touch {victim}").returncode == 0
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        shell.send(b'printf "\\e]7373;${PS1##*7373;}"; head -c 5; echo " <- read"\r')
        shell.send(f"echo rm -f {victim}\r".encode())
        shell.expect(rb"\r\necho  <- read\r\n[^\n]*\$ $")
        shell.send(b"echo still-usable\r")
        shell.expect(rb"\nstill-usable\r\n[^\n]*\$ $")
    assert env.direct(f"test -e {victim}").returncode == 0, "an unchecked rest of a line ran on the target"


@pytest.mark.parametrize(
    "line",
    [
        "exec 0< <(printf 'rm -f {victim}\\n')",
        "unset PROMPT_COMMAND",
        "read() { :; }",
        "enable -n read",
        "trap true DEBUG",
        "set +m",
        # a reader left blocked on the terminal took `echo ` of the next line, and bash ran `rm -f ...`
        "(head -c 5 <&3 & sleep 0.3) 3<&0",
        "setsid -f head -c 5",
    ],
)
def test_a_line_cannot_undo_what_keeps_the_shell_reading_only_checked_lines(env: Env, line: str) -> None:
    victim = env.work / "victim-undo"
    assert env.direct(f"touch {victim}").returncode == 0
    with _line_shell(env.client, env.tokens["liner"]) as shell:  # may run any program, so only the analysis refuses
        shell.send(line.replace("{victim}", str(victim)).encode() + b"\r")
        assert b"lictor:ssh-unparsable" in shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
        shell.send(f"echo rm -f {victim}\r".encode())
        shell.expect(rf"\nrm -f {victim}\r\n[^\n]*\$ $".encode())
        shell.send(b"echo still-usable\r")
        shell.expect(rb"\nstill-usable\r\n[^\n]*\$ $")
    assert env.direct(f"test -e {victim}").returncode == 0, "a command no line asked for ran on the target"


def test_a_program_in_a_piped_script_that_reads_its_input_gets_its_end_not_the_next_lines(env: Env) -> None:
    script = b"cat\nhead -n 1\necho after\nhead -c 1 /nonexistent 2>/dev/null\n"
    run = subprocess.run(
        env.client.ssh_argv(None, "-T"), input=script, capture_output=True,
        env=env.client.env(env.tokens["operator"]), timeout=30, start_new_session=True,
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (1, b"after\n"), run


def test_observer_gets_no_shell(env: Env) -> None:
    shell = env.client.shell(env.tokens["observer"])
    try:
        out = shell.expect(rb"lictor: denied[^\n]*\n")
        assert b"shell" in out
        assert shell.wait(timeout=15) == 126
    finally:
        shell.close()


def test_script_piped_into_a_shell_stops_at_the_first_denied_line(env: Env) -> None:
    created = env.work / "after_denial"
    script = f"echo step-one\nrm {env.work}/marker\ntouch {created}\n".encode()
    argv = env.client.ssh_argv(None, "-T")
    run = subprocess.run(
        argv, input=script, capture_output=True, env=env.client.env(env.tokens["operator"]), timeout=30,
        start_new_session=True,
    )  # fmt: skip
    assert run.stdout == b"step-one\n", run
    assert run.returncode == 126
    assert b"lictor: denied `rm" in run.stderr
    assert env.direct(f"test -e {created}").returncode == 1
    _markers_intact(env)


def test_exec_with_a_terminal_gets_one_only_with_raw_shell(env: Env) -> None:
    # observer: no terminal on the target (a pager's `!cmd` could not be inspected); the gateway
    # plays the terminal: echo, Enter, line editing, ^D
    shell = env.client.shell(env.tokens["observer"], "tty; head -n 1")
    try:
        shell.expect(rb"not a tty\r\n")
        shell.send(b"helo\x7flo\r")
        shell.expect(rb"hello\r\n")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()
    admin = env.client.shell(env.tokens["admin"], "tty")
    try:
        admin.expect(rb"/dev/pts/\d+")
        assert admin.wait(timeout=15) == 0
    finally:
        admin.close()


def test_what_the_gateway_echoes_for_a_program_without_a_terminal_is_recorded(env: Env) -> None:
    # The gateway echoes the keys it plays the terminal for; the recording left the echo out, so a replay
    # showed the typed line once where the agent saw it twice (typed, then printed by the program).
    token = env.gw.token("agent-cooked-echo", role="observer")
    shell = env.client.shell(token, "head -n 1")
    try:
        shell.send(b"typed-line\r")
        shell.expect(rb"typed-line\r\n(.|\n)*typed-line\r\n")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()
    deadline = time.monotonic() + 10
    while True:
        seen = "".join(
            e["data"]["data"] for e in _session_events(env, "agent-cooked-echo") if e.get("kind") == "output"
        )
        if seen.count("typed-line") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert seen.count("typed-line\r\n") == 2, seen


@pytest.mark.parametrize(
    ("term", "shown"), [("xterm\x00", b"'xterm\\x00'"), ("x" * 300_000, b"'" + b"x" * 300 + b"'")], ids=["nul", "long"]
)
def test_a_terminal_type_the_target_would_choke_on_is_refused_and_other_agents_keep_their_channels(
    env: Env, term: str, shown: bytes
) -> None:
    # A NUL in the terminal type went to the target in the pty request; sshd took it for a broken packet
    # and dropped the pooled upstream connection, ending every other agent's channel on it. So would a
    # terminal type longer than sshd's packets.
    async def run() -> tuple[Any, bytes, bytes]:
        async with env.connect("observer") as other_conn, env.connect("operator") as conn:
            other = await other_conn.create_process("cat", encoding=None)
            other.stdin.write(b"before\n")
            assert await asyncio.wait_for(other.stdout.readline(), 10) == b"before\n"
            shell = await conn.create_process(term_type=term, encoding=None)
            err = await asyncio.wait_for(shell.stderr.read(), 10)
            await shell.wait_closed()
            await asyncio.sleep(0.5)
            other.stdin.write(b"after\n")
            after = await asyncio.wait_for(other.stdout.readline(), 10)
            other.stdin.write_eof()
            await other.wait_closed()
            return shell.exit_status, err, after

    status, err, after = asyncio.run(run())
    assert after == b"after\n"
    assert status == 255
    assert b"lictor: the terminal type " + shown + b" is not a terminal name" in err, err[:500]


def test_a_terminal_without_raw_shell_is_not_recorded_as_a_denial(env: Env) -> None:
    # Every terminal of a role without raw_shell was audited as a denied "raw interactive shell":
    # sessions where nothing was refused were listed under --decision deny.
    token = env.gw.token("agent-no-raw", role="operator")
    with _line_shell(env.client, token):
        pass  # a shell at its prompt, then exit
    exec_tty = env.client.shell(token, "echo with-a-terminal")
    try:
        exec_tty.expect(rb"with-a-terminal")
        assert exec_tty.wait(timeout=15) == 0
    finally:
        exec_tty.close()
    events = _session_events(env, "agent-no-raw")
    shells = [e["data"] for e in events if e.get("kind") == "shell"]
    assert shells and shells[0]["mode"] == "line"
    assert [e["data"] for e in events if e.get("kind") == "decision" and e["data"].get("action") != "allow"] == []
    rows = json.loads(
        lictor("sessions", "list", "--state-dir", str(env.gw.state_dir), "--sub", "agent-no-raw", "--json").stdout
    )
    assert len(rows) == 2 and all(row["decisions"]["deny"] == 0 for row in rows), rows


def test_raw_shell_for_trusted_roles(env: Env) -> None:
    shell = env.client.shell(env.tokens["admin"])
    try:
        shell.expect(rb"[$#] $")
        shell.send(b"printf 'raw-%s\\n' mode\r")
        shell.expect(rb"raw-mode\r\n")
        shell.send(b"exit\r")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()


# -- sftp and scp ----------------------------------------------------------------------------------


def test_sftp_put_get_ls_and_denied_paths(env: Env) -> None:
    local = env.tmp / "upload.txt"
    local.write_bytes(b"uploaded through sftp\n" * 100)
    fetched = env.tmp / "fetched.txt"
    secret = env.tmp / "secret_copy.txt"
    outside = env.tmp / "outside.txt"
    w = env.work
    proc = env.client.sftp(
        env.tokens["operator"],
        f"put {local} {w}/uploaded.txt\nls -l {w}\nget {w}/uploaded.txt {fetched}\nget {w}/secret.txt {secret}\n"
        f"get /etc/hostname {outside}\nrm {w}/marker2\n",
    )
    assert proc.returncode in (0, 1), _err(proc)
    assert b"uploaded.txt" in proc.stdout
    assert fetched.read_bytes() == local.read_bytes()
    assert not secret.exists() and not outside.exists()
    # OpenSSH's sftp prints only "not found" for a refused stat: the reason comes on stderr
    assert b"lictor: denied sftp stat of /etc/hostname by rule lictor:default-deny" in proc.stderr, _err(proc)
    assert b"by rule op-no-secret-files: secret files stay on the host" in proc.stderr, _err(proc)
    assert env.direct(f"cat {w}/uploaded.txt").stdout == local.read_bytes()
    assert env.direct(f"test -e {w}/marker2").returncode == 1  # removing inside the work directory is allowed
    assert env.direct(f"printf keep > {w}/marker2").returncode == 0


def test_an_sftp_path_that_is_not_utf8_is_denied_with_a_reason_audited_and_recorded(env: Env) -> None:
    # The refusal was a bare SFTP status: OpenSSH's sftp printed only "Permission denied", and neither the audit
    # log nor the session's recording had the operation.
    token = env.gw.token("agent-latin1-files", role="operator")
    local = env.tmp / "caf\udce9"  # the file name's bytes: caf\xe9
    local.write_bytes(b"latin-1 name\n")
    proc = subprocess.run(
        ["sftp", *env.client.options(), "-P", str(env.client.port), f"agent@{env.client.host}"],
        input=b"put " + os.fsencode(local) + b" " + str(env.work).encode() + b"/caf\xe9\n",
        capture_output=True,
        env=env.client.env(token),
        timeout=30,
        check=False,
        start_new_session=True,
    )
    err = _err(proc)
    assert "lictor: denied this sftp operation by rule lictor:ssh-unparsable" in err, err
    assert f"{env.work}/caf\\xe9" in err and "not valid UTF-8" in err and "UTF-8 path names only" in err, err
    assert env.direct(f"ls {env.work}").stdout.count(b"caf") == 0
    denials = _decisions_of(env, "agent-latin1-files", 1)  # sftp asks twice: is it a directory, then the open
    assert denials and {(e["action"], *e["rule_ids"]) for e in denials} == {("deny", "lictor:ssh-unparsable")}, denials
    assert all(f"{env.work}/caf\\xe9" in e["request"]["summary"] for e in denials), denials
    events = [e["data"] for e in _session_events(env, "agent-latin1-files") if e.get("kind") == "sftp"]
    assert events and all((e["operation"], e["paths"], e["action"]) == ("unparsable", [f"{env.work}/caf\\xe9"], "deny")
               for e in events), events  # fmt: skip


def test_an_sftp_session_that_ends_before_its_handshake_leaves_the_connection_and_the_target_clean(
    env: Env,
) -> None:
    # The agent's stdin closed before the SFTP handshake: asyncssh raised into the connection, which closed
    # the agent's whole connection (every session over a ControlMaster) and left the target's sftp-server
    # running for ever.
    control = env.tmp / "cm-sftp-eof"
    base = env.client.ssh_argv(None, "-o", f"ControlPath={control}")
    agent_env = env.client.env(env.tokens["operator"])
    master = subprocess.Popen(
        [*base[:-1], "-o", "ControlMaster=yes", "-N", base[-1]], env=agent_env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while not control.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert control.exists(), "the master connection did not come up"
        for _ in range(3):
            subprocess.run(
                [*base[:-1], "-s", base[-1], "sftp"], stdin=subprocess.DEVNULL, capture_output=True,
                env=agent_env, timeout=30, start_new_session=True,
            )  # fmt: skip
        check = subprocess.run([*base[:-1], "-O", "check", base[-1]], capture_output=True, env=agent_env, timeout=30)
        assert check.returncode == 0, check.stderr  # the master (the agent's connection) is still up
        listed = env.client.sftp(env.tokens["operator"], f"ls {env.work}\n")
        assert listed.returncode == 0, _err(listed)
        deadline = time.monotonic() + 10
        left = b""
        while time.monotonic() < deadline:
            left = env.direct('pgrep -c -u "$(id -u)" -f "[s]ftp-server" || true').stdout.strip()
            if left == b"0":
                break
            time.sleep(0.2)
        assert left == b"0", f"{left!r} sftp-server processes left on the target"
    finally:
        master.terminate()
        master.wait(10)


def _operator_sftp(env: Env) -> subprocess.Popen[bytes]:
    """Real sftp as the operator, commands on its stdin, in its own process group."""
    return subprocess.Popen(
        ["sftp", *env.client.options(), "-P", str(env.client.port), f"agent@{env.client.host}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env.client.env(env.tokens["operator"]), start_new_session=True,
    )  # fmt: skip


def test_a_path_that_changes_while_it_is_decided_is_not_used(env: Env) -> None:
    # The path is resolved, decided (here: held for an approver), then used. A link swapped in meanwhile
    # made the approved read of a file in the work directory read a file outside it.
    outside = f"/tmp/lictor-outside-{os.getpid()}"
    held = f"{env.work}/held.txt"
    assert env.direct(f"printf OUTSIDE-SECRET > {outside} && printf fine > {held}").returncode == 0
    local = env.tmp / "held_copy.txt"
    proc = _operator_sftp(env)
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"get {held} {local}\n".encode())
        proc.stdin.close()
        deadline = time.monotonic() + 20
        approval = None
        while approval is None and time.monotonic() < deadline:
            listed = lictor("approvals", "list", "--url", env.approvals_url, "--token", env.tokens["approver"]).stdout
            approval = next((line.split()[0] for line in listed.splitlines() if "held.txt" in line), None)
            time.sleep(0.2)
        assert approval, "the read was not held"
        # while an approver looks at .../held.txt, it becomes a link to a file outside the work directory
        assert env.direct(f"rm {held} && ln -s {outside} {held}").returncode == 0
        approve = lictor(
            "approvals", "approve", approval, "--url", env.approvals_url, "--token", env.tokens["approver"],
            check=False,
        )  # fmt: skip
        assert approve.returncode == 0, approve.stdout + approve.stderr
        proc.wait(timeout=30)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        env.direct(f"rm -f {held} {outside}")
    assert not local.exists() or b"OUTSIDE-SECRET" not in local.read_bytes()
    assert b"the path changed while it was being decided" in err, err


def test_an_sftp_operation_held_for_an_approver_says_so(env: Env) -> None:
    # The transfer stood still with nothing said: no "waiting for approval", no id to give an approver.
    held = f"{env.work}/held-notice.txt"
    assert env.direct(f"printf approved-content > {held}").returncode == 0
    local = env.tmp / "held_notice_copy.txt"
    proc = _operator_sftp(env)
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(f"get {held} {local}\n".encode())
        proc.stdin.close()
        lines = [proc.stderr.readline().decode() for _ in range(2)]  # sftp's "Connected to ...", then the gateway's
        match = re.search(r"lictor: waiting for approval (\S+?):", lines[-1])
        assert match, lines
        approve = lictor(
            "approvals", "approve", match.group(1), "--url", env.approvals_url, "--token", env.tokens["approver"],
            check=False,
        )  # fmt: skip
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        env.direct(f"rm -f {held}")
    assert local.read_bytes() == b"approved-content"


def test_an_sftp_agent_that_goes_away_while_held_withdraws_its_request(env: Env) -> None:
    # The approval stayed pending for an agent that was gone: an approver was still asked, and approving it
    # would have carried out the operation for nobody.
    held = f"{env.work}/held-withdrawn.txt"
    assert env.direct(f"printf x > {held}").returncode == 0
    proc = _operator_sftp(env)

    def pending() -> list[str]:
        listed = lictor("approvals", "list", "--url", env.approvals_url, "--token", env.tokens["approver"]).stdout
        return [line for line in listed.splitlines() if "held-withdrawn.txt" in line]

    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(f"get {held} {env.tmp / 'withdrawn_copy.txt'}\n".encode())
        proc.stdin.flush()
        lines = [proc.stderr.readline().decode() for _ in range(2)]
        assert "waiting for approval" in lines[-1], lines
        assert pending()
        os.killpg(proc.pid, signal.SIGKILL)  # sftp and the ssh it runs: the connection drops
        proc.wait(timeout=10)
        wait_until(lambda: not pending(), 15, "the held request to be withdrawn")
    finally:
        if proc.poll() is None:
            proc.kill()
        env.direct(f"rm -f {held}")


def test_opening_with_create_append_or_truncate_alone_is_decided_as_a_read(env: Env) -> None:
    # Without the WRITE flag the target opens a file read-only, whatever else is asked for: CREAT or
    # APPEND alone gave a readable handle that was decided as a write only, so a file the agent may
    # write but not read (op-drop-box) could be read.
    drop = f"{env.work}/drop-box.txt"
    assert env.direct(f"printf DROPPED-CONTENT > {drop}").returncode == 0

    async def run() -> list[str]:
        results = []
        async with (
            env.connect("operator") as conn,
            conn.start_sftp_client() as sftp,
        ):
            for flags in (asyncssh.FXF_CREAT, asyncssh.FXF_APPEND, asyncssh.FXF_CREAT | asyncssh.FXF_EXCL):
                try:
                    file = await sftp.open(drop.encode(), flags, encoding=None)
                except asyncssh.SFTPError as exc:
                    results.append(exc.reason)
                    continue
                try:
                    results.append(repr(await file.read(100, 0)))
                except asyncssh.SFTPError as exc:
                    results.append(exc.reason)
                finally:
                    await file.close()
            async with sftp.open(drop.encode(), asyncssh.FXF_WRITE | asyncssh.FXF_APPEND, encoding=None) as file:
                await file.write(b" and more")  # writing is still allowed
        return results

    try:
        results = asyncio.run(run())
        assert env.direct(f"cat {drop}").stdout == b"DROPPED-CONTENT and more"
    finally:
        env.direct(f"rm -f {drop}")
    assert not any("DROPPED" in r for r in results), results
    assert sum("lictor: denied sftp read of" in r and "by rule op-drop-box" in r for r in results) == 3, results


def test_a_symlink_is_decided_on_where_it_really_points(env: Env) -> None:
    # What a new link points to was resolved from the directory as written: through a link to its own
    # directory (D -> .), D/esc -> ../x looked like a link to x in the work directory, and the target
    # made esc -> ../x one level up, outside it.
    w = env.work
    proc = env.client.sftp(env.tokens["operator"], f"ln -s . {w}/here\nln -s ../outside-link-target {w}/here/escape\n")
    try:
        assert env.direct(f"test -L {w}/here").returncode == 0, _err(proc)  # a link inside is allowed
        assert env.direct(f"test -L {w}/escape").returncode == 1, _err(proc)
        assert (
            f"lictor: denied sftp symlink of {w}/here/escape, {w}/escape, {w}/outside-link-target, "
            f"{w.parent}/outside-link-target by rule lictor:default-deny"
        ).encode() in proc.stderr, _err(proc)
    finally:
        env.direct(f"rm -f {w}/here {w}/escape")


def test_a_setstat_that_truncates_is_a_write_and_a_special_mode_on_create_is_a_setstat(env: Env) -> None:
    frozen, plain = f"{env.work}/frozen.txt", f"{env.work}/plain-tool"
    assert env.direct(f"printf FROZEN-CONTENT > {frozen}").returncode == 0

    async def run() -> list[str]:
        results = []
        async with (
            env.connect("operator") as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.chmod(frozen, 0o640)  # its mode may change, not its content
            for attempt in (
                sftp.setstat(frozen, asyncssh.SFTPAttrs(size=0)),
                sftp.truncate(frozen, 3),
                sftp.open(plain, "w", asyncssh.SFTPAttrs(permissions=0o4755)),
            ):
                try:
                    await attempt
                    results.append("done")
                except asyncssh.SFTPError as exc:
                    results.append(exc.reason)
            async with sftp.open(frozen, "rb") as file:
                try:
                    await file.setstat(asyncssh.SFTPAttrs(size=0))
                    results.append("done")
                except asyncssh.SFTPError as exc:
                    results.append(exc.reason)
            async with sftp.open(plain, "w", asyncssh.SFTPAttrs(permissions=0o755)) as file:
                await file.write("#!/bin/sh\n")  # plain permission bits: the write it is
        return results

    try:
        results = asyncio.run(run())
        assert env.direct(f"cat {frozen}").stdout == b"FROZEN-CONTENT"
        assert env.direct(f"stat -c %a {frozen} {plain}").stdout.split() == [b"640", b"755"]
    finally:
        env.direct(f"rm -f {frozen} {plain}")
    assert ["by rule op-frozen" in r for r in results] == [True, True, False, True], results
    assert "lictor: denied sftp setstat of" in results[2] and "by rule op-plain-modes" in results[2], results


def test_scp_over_sftp_and_legacy_scp(env: Env) -> None:
    local = env.tmp / "scp_up.bin"
    local.write_bytes(os.urandom(200_000))
    w = env.work
    up = env.client.scp(env.tokens["operator"], str(local), env.client.remote(f"{w}/scp_up.bin"))
    assert up.returncode == 0, _err(up)
    back = env.tmp / "scp_back.bin"
    down = env.client.scp(env.tokens["operator"], env.client.remote(f"{w}/scp_up.bin"), str(back))
    assert down.returncode == 0, _err(down)
    assert back.read_bytes() == local.read_bytes()
    legacy = env.client.scp(env.tokens["operator"], "-O", str(local), env.client.remote(f"{w}/legacy.bin"))
    assert legacy.returncode == 0, _err(legacy)
    assert (
        env.direct(f"sha256sum < {w}/legacy.bin").stdout.split()[0].decode()
        == hashlib.sha256(local.read_bytes()).hexdigest()
    )
    refused = env.client.scp(env.tokens["operator"], "-O", str(local), env.client.remote("/tmp/outside-work.bin"))
    assert refused.returncode != 0
    assert b"lictor: denied" in refused.stderr
    outside = env.client.scp(env.tokens["operator"], env.client.remote("/etc/hostname"), str(env.tmp / "outside"))
    assert outside.returncode != 0
    assert b"lictor: denied sftp stat of /etc/hostname" in outside.stderr, _err(outside)
    observer = env.client.scp(env.tokens["observer"], str(local), env.client.remote(f"{w}/obs.bin"))
    assert observer.returncode != 0
    assert b"lictor: denied sftp write of " in observer.stderr, _err(observer)
    assert env.direct(f"test -e {w}/obs.bin").returncode == 1


def test_rsync_over_ssh_for_a_role_allowed_rsync(env: Env) -> None:
    # The far end of `rsync -e ssh` is `rsync --server -logDtpre.iLsfxCIvu . DEST`, whose -e carries protocol
    # flags: read as rsync's remote-shell option, it named a program no rule allows.
    rsync = require_binary("rsync")
    local = env.tmp / "rsync_up.bin"
    local.write_bytes(os.urandom(50_000))
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    up = subprocess.run(
        [rsync, "-t", "-e", transport, str(local), env.client.remote(f"{env.work}/rsync_up.bin")],
        capture_output=True,
        env=env.client.env(env.tokens["operator"]),
        timeout=60,
        check=False,
        start_new_session=True,
    )
    try:
        assert up.returncode == 0, _err(up)
        assert env.direct(f"sha256sum < {env.work}/rsync_up.bin").stdout.split()[0].decode() == (
            hashlib.sha256(local.read_bytes()).hexdigest()
        )
    finally:
        env.direct(f"rm -f {env.work}/rsync_up.bin")
    # A daemon started the same way serves the modules of a configuration, whose paths cannot be decided.
    daemon = env.ssh("operator", "rsync --server --daemon -e 'no-such-tool /tmp/x' .")
    _assert_denied(daemon, "lictor:ssh-unparsable")
    assert b"daemon" in daemon.stderr, daemon.stderr


def test_a_transfer_path_leaving_through_a_link_and_dot_dot_is_decided_where_it_leads(env: Env) -> None:
    # rsync opens `WORK/l/../secret` as the kernel does: `..` after the link `l` leads out of WORK. The gateway
    # resolved the `..` as text first (WORK/secret) and let a role allowed WORK read a file outside it.
    rsync = require_binary("rsync")
    outside = f"{env.work}-outside"
    made = env.direct(
        f"mkdir -p {outside}/d && echo secret > {outside}/secret && ln -sfn {outside}/d {env.work}/out_link"
    )
    assert made.returncode == 0, made.stderr
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    copy = env.tmp / "leaked_secret"
    try:
        pulled = subprocess.run(
            [rsync, "-e", transport, env.client.remote(f"{env.work}/out_link/../secret"), str(copy)],
            capture_output=True, env=env.client.env(env.tokens["operator"]), timeout=60, check=False,
            start_new_session=True,
        )  # fmt: skip
        assert pulled.returncode != 0 and not copy.exists(), "a file outside the allowed directory was read"
        assert f"denied rsync read of {env.work}/secret, {outside}/secret by rule lictor:default-deny" in _err(
            pulled
        ), _err(pulled)
        # a link and `..` that lead back inside are allowed
        assert env.direct(f"echo inside > {env.work}/inside.txt").returncode == 0
        back = f"{env.work}/out_link/../../{env.work.name}/inside.txt"
        inside = subprocess.run(
            [rsync, "-e", transport, env.client.remote(back), str(env.tmp / "inside.txt")],
            capture_output=True, env=env.client.env(env.tokens["operator"]), timeout=60, check=False,
            start_new_session=True,
        )  # fmt: skip
        assert inside.returncode == 0, _err(inside)
        assert (env.tmp / "inside.txt").read_bytes() == b"inside\n"
    finally:
        env.direct(f"rm -rf {outside} {env.work}/out_link {env.work}/inside.txt")


def test_a_quoted_tilde_is_decided_as_the_file_of_that_name_too(env: Env) -> None:
    # The analysis reads '~/x' and ~/x alike, but quoted the ~ is not expanded: rsync opens ./~/x. With a link named
    # ~ to / (rsync -l pushes one), a role allowed its home read /etc files while rules saw ~/etc/...
    rsync = require_binary("rsync")
    home = pwd.getpwuid(env.work.stat().st_uid).pw_dir
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    token = env.gw.token("agent-home-sync", role="home-sync")
    try:
        # the home directory, named with ~, syncs
        assert env.direct(f"echo mine > {home}/tilde_mine").returncode == 0
        mine = subprocess.run(
            [rsync, "-e", transport, env.client.remote("~/tilde_mine"), str(env.tmp / "tilde_mine")],
            capture_output=True, env=env.client.env(token), timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
        assert mine.returncode == 0, _err(mine)
        assert (env.tmp / "tilde_mine").read_bytes() == b"mine\n"
        made = env.direct(f"echo secret > {env.work}/tilde_secret && ln -sfn / {home}/~")
        assert made.returncode == 0, made.stderr
        copy = env.tmp / "tilde_secret"
        server = f"rsync --server --sender -e.LsfxCIvu . '~/{str(env.work).lstrip('/')}/tilde_secret' #"
        pulled = subprocess.run(
            [rsync, "-e", transport, f"--rsync-path={server}", env.client.remote("tilde_secret"), str(copy)],
            capture_output=True, env=env.client.env(token), timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
        assert pulled.returncode != 0 and not copy.exists(), "a file outside the home directory was read"
        assert f"denied rsync read of {home}{env.work}/tilde_secret, {home}/~{env.work}/tilde_secret, " in _err(
            pulled
        ), _err(pulled)
    finally:
        env.direct(f"rm -f {home}/~ {home}/tilde_mine {env.work}/tilde_secret")


def test_a_git_path_is_decided_with_where_the_names_git_tries_after_it_lead(env: Env) -> None:
    # git's far end given `~/app` opens `~/app.git` when `~/app` is not a repository: a link by that name took a
    # role allowed its home to a repository elsewhere, while rules saw ~/app.
    git = require_binary("git")
    home = pwd.getpwuid(env.work.stat().st_uid).pw_dir
    elsewhere = f"{env.work}/elsewhere.git"
    made = env.direct(
        f"git init -q --bare {elsewhere} && ln -sfn {elsewhere} {home}/app.git && git init -q --bare {home}/mine.git"
    )
    assert made.returncode == 0, made.stderr
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    client_env = {**env.client.env(env.gw.token("agent-home-git", role="home-sync")), "GIT_SSH_COMMAND": transport}
    try:
        linked = subprocess.run(
            [git, "clone", "-q", f"agent@{env.client.host}:app", str(env.tmp / "app")],
            capture_output=True, env=client_env, timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
        assert linked.returncode != 0, "a repository outside the home directory was read"
        assert f"denied git read of {home}/app, {elsewhere}" in _err(linked), _err(linked)
        assert "by rule lictor:default-deny" in _err(linked), _err(linked)
        mine = subprocess.run(
            [git, "clone", "-q", f"agent@{env.client.host}:mine", str(env.tmp / "mine")],
            capture_output=True, env=client_env, timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
        assert mine.returncode == 0, _err(mine)
    finally:
        env.direct(f"rm -rf {elsewhere} {home}/app.git {home}/mine.git")
        shutil.rmtree(env.tmp / "mine", ignore_errors=True)


def test_a_relative_backup_dir_is_decided_inside_a_destination_named_without_a_slash(env: Env) -> None:
    # `rsync -b --backup-dir=l/bk src/ HOST:WORK/dst` keeps backups in WORK/dst/l/bk (dst is a directory); the gateway
    # read it as WORK/l/bk, so a link WORK/dst/l to a directory outside WORK took the backups there.
    rsync = require_binary("rsync")
    outside = f"{env.work}-backups"
    made = env.direct(
        f"mkdir -p {outside} {env.work}/dst && echo old > {env.work}/dst/f && ln -sfn {outside} {env.work}/dst/l"
    )
    assert made.returncode == 0, made.stderr
    source = env.tmp / "backup_src"
    source.mkdir(exist_ok=True)
    (source / "f").write_text("new\n")
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    try:
        pushed = subprocess.run(
            [rsync, "-rI", "-b", "--backup-dir=l/bk", "-e", transport, f"{source}/",
             env.client.remote(f"{env.work}/dst")],
            capture_output=True, env=env.client.env(env.tokens["operator"]), timeout=60, check=False,
            start_new_session=True,
        )  # fmt: skip
        assert env.direct(f"test -e {outside}/bk/f").returncode != 0, "a backup was written outside the allowed tree"
        assert pushed.returncode != 0
        assert f"{outside}/bk" in _err(pushed) and "by rule lictor:default-deny" in _err(pushed), _err(pushed)
    finally:
        env.direct(f"rm -rf {outside} {env.work}/dst")


def test_a_backup_dir_with_an_unexpanded_tilde_is_decided_inside_the_destination(env: Env) -> None:
    # `--backup-dir=~/bk` (attached, the shell leaves the ~) is a directory named ~ inside the destination: the gateway
    # read it as the home's bk, so a link named ~ in the destination took backups anywhere.
    rsync = require_binary("rsync")
    home = pwd.getpwuid(env.work.stat().st_uid).pw_dir
    outside = f"{env.work}/tilde_backups"
    made = env.direct(f"mkdir -p {outside} {home}/tdst && echo old > {home}/tdst/f && ln -sfn {outside} {home}/tdst/~")
    assert made.returncode == 0, made.stderr
    source = env.tmp / "tilde_backup_src"
    source.mkdir(exist_ok=True)
    (source / "f").write_text("new\n")
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    server = "rsync --server -brIe.iLsfxCIvu --backup-dir=~/bk . tdst/ #"
    try:
        pushed = subprocess.run(
            [rsync, "-rI", "-b", "--backup-dir=x", "-e", transport, f"--rsync-path={server}", f"{source}/",
             env.client.remote("tdst/")],
            capture_output=True, env=env.client.env(env.gw.token("agent-home-backup", role="home-sync")),
            timeout=60, check=False, start_new_session=True,
        )  # fmt: skip
        assert env.direct(f"test -e {outside}/bk/f").returncode != 0, "a backup was written outside the home"
        assert pushed.returncode != 0
        assert f"{outside}/bk" in _err(pushed) and "by rule lictor:default-deny" in _err(pushed), _err(pushed)
    finally:
        env.direct(f"rm -rf {outside} {home}/tdst")


def test_an_rsync_daemon_with_a_configuration_of_the_agents_choosing_is_denied(env: Env) -> None:
    # `rsync --config=FILE --server --daemon .` (what `rsync --rsync-path='rsync --config=FILE' host::m` runs) was
    # allowed by a rule for rsync, and the daemon ran the `pre-xfer exec` command of that file.
    rsync = require_binary("rsync")
    marker = env.work / "rsync_hook_ran"
    config = env.work / "rsyncd-hook.conf"
    config.write_text(f"use chroot = no\n[m]\npath = {env.work}\npre-xfer exec = touch {marker}\n")
    config.chmod(0o644)
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    try:
        listing = subprocess.run(
            [rsync, "-e", transport, f"--rsync-path=rsync --config={config}", f"agent@{env.client.host}::m/"],
            capture_output=True,
            env=env.client.env(env.tokens["operator"]),
            timeout=60,
            check=False,
            start_new_session=True,
        )
        assert listing.returncode != 0, listing.stdout
        assert "lictor:ssh-unparsable" in _err(listing), _err(listing)
        assert "--config file or --dparam items can name commands" in _err(listing), _err(listing)
        assert not marker.exists()
    finally:
        config.unlink()
        env.direct(f"rm -f {marker}")


def test_git_clone_and_push_over_ssh(env: Env) -> None:
    # Agents use git over SSH: the far end is `git-upload-pack '/path'` (fetch) and `git-receive-pack` (push),
    # each an exec request decided as the file transfer it is (channel git), with a binary pack protocol on stdin
    # and stdout.
    git = require_binary("git")
    repo = f"{env.work}/repo.git"
    seeded = env.direct(
        f"git init -q --bare {repo} && git init -q {env.work}/seed && cd {env.work}/seed && "
        "git -c user.email=s@x -c user.name=s commit -q --allow-empty -m seed && "
        f"git push -q {repo} HEAD:refs/heads/main"
    )
    assert seeded.returncode == 0, seeded.stderr
    transport = shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)])
    url = f"ssh://agent@{env.client.host}{repo}"

    def run(role: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        environ = {**env.client.env(env.tokens[role]), "GIT_SSH_COMMAND": transport, "GIT_TERMINAL_PROMPT": "0"}
        return subprocess.run(
            [git, *args], cwd=cwd, capture_output=True, env=environ, timeout=60, check=False, start_new_session=True
        )

    clone = env.tmp / "git_clone"
    try:
        cloned = run("admin", "clone", "-q", "-b", "main", url, str(clone))
        assert cloned.returncode == 0, _err(cloned)
        (clone / "agent.txt").write_text("from the agent\n")
        run("admin", "add", "agent.txt", cwd=clone)
        committed = run("admin", "-c", "user.email=a@x", "-c", "user.name=a", "commit", "-q", "-m", "agent", cwd=clone)
        assert committed.returncode == 0, _err(committed)
        pushed = run("admin", "push", "-q", "origin", "main", cwd=clone)
        assert pushed.returncode == 0, _err(pushed)
        log = env.direct(f"git --git-dir={repo} log --format=%s main")
        assert log.stdout.split() == [b"agent", b"seed"], log
        # a role without a git rule: refused, and git says why
        refused = run("observer", "clone", "-q", url, str(env.tmp / "git_refused"))
        assert refused.returncode != 0
        assert f"lictor: denied git read of {repo} by rule lictor:default-deny" in _err(refused), _err(refused)
        # a role whose transfers would be masked: an rsync stream cannot be, so it is refused, and says where to look
        masked = subprocess.run(
            [require_binary("rsync"), "-e", transport, env.client.remote(f"{repo}/HEAD"), str(env.tmp / "HEAD")],
            capture_output=True,
            env=env.client.env(env.gw.token("agent-masked-admin", role="admin", mask="yes")),
            timeout=60,
            check=False,
            start_new_session=True,
        )
        assert masked.returncode != 0
        assert f"lictor: denied rsync read of {repo}/HEAD: its content would be masked (rule mask-rsync)" in _err(
            masked
        ), _err(masked)
    finally:
        shutil.rmtree(clone, ignore_errors=True)
        env.direct(f"rm -rf {repo} {env.work}/seed")


def test_an_scp_command_line_run_on_the_target_is_an_exec_request(env: Env) -> None:
    # Every exec starting with "scp " was taken for the far end of legacy scp: a copy the target
    # makes itself failed with "scp: one of the arguments -f -t is required".
    w = env.work
    copy = env.ssh("admin", f"scp {w}/marker {w}/scp_local_copy")
    assert copy.returncode == 0, _err(copy)
    assert env.direct(f"cat {w}/scp_local_copy").stdout == b"keep"
    denied = env.ssh("observer", f"scp {w}/marker {w}/scp_observer_copy")
    _assert_denied(denied, "lictor:default-deny")
    assert env.direct(f"test -e {w}/scp_observer_copy").returncode == 1


@pytest.mark.parametrize(
    ("command", "server"),
    [
        ("scp -t /srv/x", True),
        ("scp -v -r -d -p -t -- /srv/x", True),
        ("scp -pf '/srv/a b'", True),
        ("scp f other:/srv/", False),
        ("scp -r dir other:", False),
        ("scp -oStrictHostKeyChecking=no f other:", False),
        ("scp -t", True),
        ("/usr/bin/scp -t /x", False),
        ("scp 'unbalanced", False),
    ],
)
def test_only_scp_with_f_or_t_is_served_as_legacy_scp(command: str, server: bool) -> None:
    from lictor_addons.ssh._sftp import is_scp_server

    assert is_scp_server(command) is server


# -- masking and recording -------------------------------------------------------------------------


def test_output_is_masked_by_detectors(env: Env) -> None:
    plain = env.ssh("observer", f"cat {env.work}/card.txt")
    assert CARD.encode() in plain.stdout
    masked = env.ssh("masked", f"cat {env.work}/card.txt")
    assert masked.returncode == 0, _err(masked)
    assert CARD.encode() not in masked.stdout
    assert masked.stdout.startswith(b"card ") and masked.stdout.endswith(b" end\n")
    shell = env.client.shell(env.tokens["masked"])
    try:
        shell.expect(rb"lictor: denied[^\n]*\n")  # observers get no shell, masked or not
    finally:
        shell.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_masked_output_faster_than_masking_keeps_memory_bounded(env: Env) -> None:
    # The target writes faster than the gateway masks. asyncssh granted the upstream channel a full
    # window again each time reading resumed, with data still buffered, so the target could keep
    # sending: the gateway grew by tens of MB a second until the kernel killed it.
    assert env.gw.proc is not None
    pid = env.gw.proc.pid
    before = _rss_kib(pid)
    proc = subprocess.Popen(
        env.client.ssh_argv("head -c 2000000000 /dev/urandom"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # the agent reads everything at once: the masking is the bottleneck
        stderr=subprocess.DEVNULL,
        env=env.client.env(env.tokens["masked"]),
        start_new_session=True,
    )
    peak = before
    try:
        for _ in range(40):
            time.sleep(0.25)
            peak = max(peak, _rss_kib(pid))
            assert proc.poll() is None, "the command ended early"
    finally:
        proc.kill()
        proc.wait(10)
    assert (peak - before) < 96 * 1024, f"the gateway grew by {(peak - before) // 1024} MiB"


def test_shell_output_is_masked_too(env: Env) -> None:
    token = env.gw.token("agent-masked-op", role="operator", mask="yes")
    shell = env.client.shell(token)
    try:
        shell.expect(PROMPT)
        shell.send(f"cat {env.work}/card.txt\r".encode())
        out = shell.expect(rb"end\r\n")
        assert CARD.encode() not in out
        assert b"card " in out
        shell.send(b"exit\r")
        shell.wait(timeout=15)
    finally:
        shell.close()
    assert CARD.encode() not in shell.seen


def _session_events(env: Env, sub: str) -> list[dict[str, Any]]:
    listing = lictor("sessions", "list", "--state-dir", str(env.gw.state_dir), "--sub", sub, "--json")
    rows = json.loads(listing.stdout)
    events: list[dict[str, Any]] = []
    for row in rows:
        sid = row.get("id") or row.get("session")
        out = lictor("sessions", "export", sid, "--state-dir", str(env.gw.state_dir), "--format", "jsonl")
        events.extend(json.loads(line) for line in out.stdout.splitlines() if line.strip())
    return events


def _shell_line(env: Env, token: str, line: bytes, **size: int) -> None:
    """One line typed into an interactive shell (``ssh -tt``), then ``exit``."""
    shell = env.client.shell(token, **size)
    try:
        shell.expect(PROMPT)
        shell.send(line + b"\r")
        shell.expect(PROMPT)
        shell.send(b"exit\r")
        shell.wait(timeout=15)
    finally:
        shell.close()


def _forwards(env: Env, sub: str, destination: str) -> list[dict[str, Any]]:
    """The ``forward`` events of ``sub``'s sessions to ``destination``, once there are any (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            e["data"]
            for e in _session_events(env, sub)
            if e.get("kind") == "forward" and e["data"].get("destination") == destination
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def _transfers(env: Env, sub: str) -> list[dict[str, Any]]:
    """The ``transfer`` events of ``sub``'s sessions, once there are any (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        transfers = [e for e in _session_events(env, sub) if e.get("kind") == "transfer"]
        if transfers or time.monotonic() > deadline:
            return transfers
        time.sleep(0.3)


def test_sessions_are_recorded_with_commands_decisions_and_output(env: Env) -> None:
    token = env.gw.token("agent-recorded", role="operator")
    assert env.client.ssh(token, "echo recorded-output").returncode == 0
    assert env.client.ssh(token, f"rm {env.work}/marker").returncode == 126
    _shell_line(env, token, b"echo in-the-shell")
    deadline = time.monotonic() + 10
    while True:
        events = _session_events(env, "agent-recorded")
        kinds = [e.get("kind") for e in events]
        texts = json.dumps(events)
        if ("in-the-shell" in texts and "recorded-output" in texts) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "command" in kinds and "decision" in kinds and "output" in kinds and "input" in kinds, kinds
    assert "recorded-output" in texts and "in-the-shell" in texts
    assert f"rm {env.work}/marker" in texts
    # the shell plays back as asciicast v2
    listing = json.loads(
        lictor("sessions", "list", "--state-dir", str(env.gw.state_dir), "--sub", "agent-recorded", "--json").stdout
    )
    casts = [
        lictor("sessions", "export", r.get("id") or r.get("session"), "--state-dir", str(env.gw.state_dir),
               "--format", "asciicast").stdout
        for r in listing
    ]  # fmt: skip
    shell_cast = next(c for c in casts if "in-the-shell" in c)
    header, *lines = shell_cast.splitlines()
    assert json.loads(header)["version"] == 2
    codes = {json.loads(line)[1] for line in lines}
    assert {"o", "i"} <= codes


def test_what_an_agent_pipes_into_a_command_is_recorded(env: Env) -> None:
    # Only the number of bytes was recorded: what `ssh host psql < queries.sql` sent, or the content of
    # `ssh host 'cat > file' < data`, was nowhere in the session's recording.
    token = env.gw.token("agent-piped", role="observer")
    text = b"piped line one\npiped line two\n"
    binary = b"\xff\xfe" + bytes(range(256)) * 4
    assert env.client.ssh(token, "cat > /dev/null", input=text).returncode == 0
    assert env.client.ssh(token, "cat > /dev/null", input=binary).returncode == 0
    deadline = time.monotonic() + 15
    while True:
        events = _session_events(env, "agent-piped")
        sums = [e["data"] for e in events if e.get("kind") == "input.bytes"]
        if len(sums) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    typed = "".join(e["data"]["data"] for e in events if e.get("kind") == "input")
    assert typed == text.decode(), events
    assert sorted(s["sha256"] for s in sums) == sorted(hashlib.sha256(d).hexdigest() for d in (text, binary)), sums
    [summary] = [e["data"] for e in events if e.get("kind") == "input.binary"]
    assert summary["bytes"] == len(binary) and summary["sha256"] == hashlib.sha256(binary).hexdigest(), summary


def _sftp_packet(kind: int, request_id: int, body: bytes) -> bytes:
    payload = bytes([kind]) + request_id.to_bytes(4, "big") + body
    return len(payload).to_bytes(4, "big") + payload


def _sftp_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


async def _sftp_reply(reader: Any) -> tuple[int, bytes]:
    length = int.from_bytes(await reader.readexactly(4), "big")
    packet = await reader.readexactly(length)
    return packet[0], packet[5:]


def test_sftp_reads_are_bounded_in_size_and_by_what_the_agent_takes(env: Env) -> None:
    # One read asking for 64 MiB made the gateway read (and hold, several times over) all of it, and
    # reads sent without taking the replies piled up in the gateway: the agent chose its memory use.
    assert env.sshd.run(f"truncate -s 64M {env.work}/sparse.bin").returncode == 0
    assert env.gw.proc is not None
    pid = env.gw.proc.pid

    async def run() -> tuple[int, int]:
        async with env.connect("operator") as conn:
            writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
            writer.write((5).to_bytes(4, "big") + bytes([1]) + (3).to_bytes(4, "big"))  # SSH_FXP_INIT, v3
            assert (await _sftp_reply(reader))[0] == 2  # SSH_FXP_VERSION
            path = f"{env.work}/sparse.bin".encode()
            writer.write(_sftp_packet(3, 1, _sftp_string(path) + (1).to_bytes(4, "big") + bytes(4)))  # OPEN, READ
            kind, body = await _sftp_reply(reader)
            assert kind == 102, body  # SSH_FXP_HANDLE
            handle = body[4 : 4 + int.from_bytes(body[:4], "big")]
            read = _sftp_string(handle) + (0).to_bytes(8, "big")
            writer.write(_sftp_packet(5, 2, read + (64 << 20).to_bytes(4, "big")))  # READ 64 MiB
            kind, body = await _sftp_reply(reader)
            assert kind == 103, body  # SSH_FXP_DATA
            first = int.from_bytes(body[:4], "big")
            before = _rss_kib(pid)
            for i in range(300):  # 75 MiB asked for, no reply taken
                writer.write(_sftp_packet(5, 10 + i, read + (256 << 10).to_bytes(4, "big")))
            await writer.drain()
            await asyncio.sleep(4)
            return first, _rss_kib(pid) - before

    first, grown = asyncio.run(run())
    assert 0 < first <= 4 << 20, first
    assert grown < 32 * 1024, f"the gateway grew by {grown // 1024} MiB"


def test_an_sftp_session_whose_connection_drops_with_a_file_open_ends_on_the_target(env: Env) -> None:
    # Closing the open file recorded its transfer into the session the dropped connection had already
    # ended: that raised, so the upstream SFTP session was never ended and its slot never released, and
    # an sftp-server process stayed on the target for every such drop.
    def sftp_servers() -> bytes:
        return env.direct('pgrep -c -u "$(id -u)" -f "[s]ftp-server" || true').stdout.strip()

    async def drop() -> None:
        conn = await env.connect("operator")
        sftp = await conn.start_sftp_client()
        await sftp.open(f"{env.work}/hello.txt", "rb")
        conn.close()  # no close of the file, no end of the SFTP session
        await conn.wait_closed()

    for _ in range(3):
        asyncio.run(drop())
    deadline = time.monotonic() + 10
    left = sftp_servers()
    while left != b"0" and time.monotonic() < deadline:
        time.sleep(0.2)
        left = sftp_servers()
    assert left == b"0", f"{left!r} sftp-server processes left on the target"


def test_a_transfer_cut_short_by_a_dropped_connection_is_recorded(env: Env) -> None:
    # The transfer event was written when asyncssh closed the file, after the dropped connection had ended
    # the session: a file read (or written) and then the connection cut left only the decision behind.
    token = env.gw.token("agent-dropped-transfer", role="operator")

    async def drop() -> bytes:
        conn = await env.connect(token=token)
        sftp = await conn.start_sftp_client()
        file = await sftp.open(f"{env.work}/hello.txt", "rb")
        data = bytes(await file.read())
        conn.close()  # no close of the file, no end of the SFTP session
        await conn.wait_closed()
        return data

    data = asyncio.run(drop())
    assert data == b"hello file\n"
    deadline = time.monotonic() + 15
    while True:
        events = _session_events(env, "agent-dropped-transfer")
        transfers = [e["data"] for e in events if e.get("kind") == "transfer"]
        if transfers or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(t["path"], t["bytes_read"], t["sha256"], t.get("interrupted")) for t in transfers] == [
        (f"{env.work}/hello.txt", len(data), hashlib.sha256(data).hexdigest(), True)
    ], transfers


def test_a_terminal_sessions_recording_has_the_agents_terminal_size(env: Env) -> None:
    # Only later size changes were recorded: a shell on a 132x40 terminal was exported (and replayed) as
    # an 80x24 one, its lines wrapped where the agent's were not.
    token = env.gw.token("agent-sized", role="operator")
    _shell_line(env, token, b"echo sized", rows=40, cols=132)
    deadline = time.monotonic() + 10
    while True:
        rows = json.loads(
            lictor("sessions", "list", "--state-dir", str(env.gw.state_dir), "--sub", "agent-sized", "--json").stdout
        )
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    sid = rows[0].get("id") or rows[0].get("session")
    cast = lictor("sessions", "export", sid, "--state-dir", str(env.gw.state_dir), "--format", "asciicast").stdout
    header = json.loads(cast.splitlines()[0])
    assert (header["width"], header["height"]) == (132, 40), header


def test_sftp_transfers_are_recorded_with_sizes_and_hashes(env: Env) -> None:
    token = env.gw.token("agent-transfer", role="operator")
    local = env.tmp / "hashed.bin"
    payload = os.urandom(70_000)
    local.write_bytes(payload)
    proc = env.client.sftp(token, f"put {local} {env.work}/hashed.bin\n")
    assert proc.returncode == 0, _err(proc)
    data = _transfers(env, "agent-transfer")[0]["data"]
    assert data["bytes"] == len(payload)
    assert data["sha256"] == hashlib.sha256(payload).hexdigest()
    assert data["path"] == f"{env.work}/hashed.bin"


def test_the_names_sftp_returns_are_recorded_and_a_long_listing_is_cut(env: Env) -> None:
    # realpath answers and directory listings were decided but what they returned was in no recording: a
    # replay showed `ls` without the names the agent then acted on.
    token = env.gw.token("agent-listing", role="operator")
    listing = f"{env.work}/listing"
    made = env.direct(f"mkdir {listing} && cd {listing} && touch $(seq -f 'n%04g' 1 1005) && printf x > {listing}.txt")
    assert made.returncode == 0, made
    proc = env.client.sftp(token, f"cd {listing}\nls\nls {env.work}\n")
    assert proc.returncode == 0, _err(proc)
    assert b"n1005" in proc.stdout and b"listing.txt" in proc.stdout
    deadline = time.monotonic() + 10
    while True:
        names = [e for e in _session_events(env, "agent-listing") if e.get("kind") == "sftp.names"]
        lists = [e["data"] for e in names if e["data"]["operation"] == "list"]
        if len(lists) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {e["dir"] for e in names} == {"out"}, names
    resolved = [(e["data"]["path"], e["data"]["names"]) for e in names if e["data"]["operation"] == "realpath"]
    assert (listing, [listing]) in resolved, resolved
    [long, work] = sorted(lists, key=lambda d: d["path"], reverse=True)
    assert (long["path"], long["count"], long["truncated"], long["complete"]) == (listing, 1007, True, True), {
        k: v for k, v in long.items() if k != "names"
    }
    assert len(long["names"]) == 1000 and set(long["names"]) <= {".", ".."} | {f"n{i:04}" for i in range(1, 1006)}
    assert (work["path"], work["truncated"], work["complete"]) == (str(env.work), False, True), work
    assert {"listing", "listing.txt", "hello.txt"} <= set(work["names"]) and work["count"] == len(work["names"])


def test_a_file_read_and_written_through_one_handle_is_recorded_both_ways(env: Env) -> None:
    path = f"{env.work}/rw.txt"
    assert env.direct(f"printf 0123456789 > {path}").returncode == 0

    async def run() -> bytes:
        async with (
            env.connect(token=env.gw.token("agent-rw", role="operator")) as conn,
            conn.start_sftp_client() as sftp,
        ):
            async with sftp.open(path.encode(), asyncssh.FXF_READ | asyncssh.FXF_WRITE, encoding=None) as file:
                head = await file.read(4, 0)
                await file.write(b"abcdef", 4)
                return bytes(head)

    try:
        assert asyncio.run(run()) == b"0123"
        assert env.direct(f"cat {path}").stdout == b"0123abcdef"
    finally:
        env.direct(f"rm -f {path}")
    data = _transfers(env, "agent-rw")[0]["data"]
    assert data["operation"] == "read+write" and data["bytes_read"] == 4 and data["bytes_written"] == 6, data
    assert data["sha256"] is None and data["sequential"] is False, data


def test_output_that_pauses_inside_a_value_is_still_masked(env: Env) -> None:
    # A producer that stalls in the middle of a line (a slow network, a program writing in pieces): without
    # a terminal nobody waits for a prompt, so an idle pause does not release half a card number.
    first, second = CARD[:9], CARD[9:]
    masked = env.ssh("masked", f"printf '{first}'; sleep 0.4; printf '{second} end\\n'")
    assert masked.returncode == 0, _err(masked)
    assert masked.stdout == b"[REDACTED:card] end\n"


def test_a_program_waiting_for_the_agents_answer_gets_it_through_masked_output(env: Env) -> None:
    # Without a terminal, a pause released whole lines only: the end of what a program wrote before waiting for
    # the agent (a prompt; a protocol turn of git-upload-pack or rsync --server) stayed in the gateway, and both
    # sides waited for ever. `git clone` over ssh hung for every role whose output is masked. While the agent's
    # input is open, a longer pause (ANSWER_IDLE) now releases the line being written too.
    token = env.gw.token("agent-masked-admin", role="admin", mask="yes")
    command = f"printf 'card {CARD} ready> '; read -r answer; printf 'got %s\\n' \"$answer\""
    proc = subprocess.Popen(
        env.client.ssh_argv(command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env.client.env(token),
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        seen = b""
        deadline = time.monotonic() + 15
        while not seen.endswith(b"ready> "):
            assert time.monotonic() < deadline, f"the prompt did not reach the agent: {seen!r}"
            if select.select([proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"the output ended early: {seen!r}"
                seen += chunk
        assert seen == b"card [REDACTED:card] ready> "
        proc.stdin.write(b"yes\n")
        proc.stdin.close()
        assert proc.stdout.read() == b"got yes\n"
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    # A shorter pause inside a value, with the agent's input open all along, still does not split it.
    split = subprocess.Popen(
        env.client.ssh_argv(f"printf '{CARD[:9]}'; sleep 0.3; printf '{CARD[9:]} end\\n'"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env.client.env(token),
        start_new_session=True,
    )
    assert split.stdin is not None and split.stdout is not None
    try:
        assert split.stdout.read() == b"[REDACTED:card] end\n"
    finally:
        split.stdin.close()
        split.wait(timeout=15)
    # git's far end is a file transfer (channel git), which the mask rule does not cover: the clone is unmasked.
    git = require_binary("git")
    repo = f"{env.work}/masked_repo.git"
    seeded = env.direct(
        f"git init -q --bare {repo} && git init -q {env.work}/masked_seed && cd {env.work}/masked_seed && "
        "GIT_AUTHOR_DATE='2020-01-01T00:00:00Z' GIT_COMMITTER_DATE='2020-01-01T00:00:00Z' "
        "git -c user.email=s@x -c user.name=s commit -q --allow-empty -m seed && "
        f"git push -q {repo} HEAD:refs/heads/main"
    )
    assert seeded.returncode == 0, seeded.stderr
    clone = env.tmp / "masked_clone"
    environ = {
        **env.client.env(token),
        "GIT_SSH_COMMAND": shlex.join(["ssh", *env.client.options(), "-p", str(env.client.port)]),
        "GIT_TERMINAL_PROMPT": "0",
    }
    try:
        cloned = subprocess.run(
            [git, "clone", "-q", "-b", "main", f"ssh://agent@{env.client.host}{repo}", str(clone)],
            capture_output=True,
            env=environ,
            timeout=30,
            check=False,
            start_new_session=True,
        )
        assert cloned.returncode == 0, _err(cloned)
        assert subprocess.run([git, "-C", str(clone), "log", "--format=%s"], capture_output=True).stdout == b"seed\n"
    finally:
        shutil.rmtree(clone, ignore_errors=True)
        env.direct(f"rm -rf {repo} {env.work}/masked_seed")


def _stall_reads(pid: int) -> subprocess.Popen[bytes]:
    """Hold the target's process ``pid`` for a second on its way back from each read (strace injects the delay):
    a signal sent meanwhile reaches bash after it has read a line, before it has parsed it."""
    return attach_strace(pid, "-e", "trace=read", "-e", "inject=read:delay_exit=1000000", "-o", "/dev/null")


def test_an_interrupt_never_makes_the_shell_run_the_rest_of_a_line_it_was_reading(env: Env) -> None:
    # bash interrupted while it reads a line drops what it has taken in and runs the rest as a command. The ^C
    # the gateway passed on right after the allowed `'echo' 'x;touch X;#'` made bash run `echo' 'x;touch X;#'`:
    # `echo x` (not found), then a `touch` no rule allowed.
    victim = env.work / "victim-interrupted-line"
    with _line_shell(env.client, env.tokens["operator"]) as shell:
        shell.send(b"echo pid=$$\r")
        pid = int(re.findall(rb"pid=(\d+)", shell.expect(rb"pid=\d+\r\n[^\n]*\$ $"))[-1])
        tracer = _stall_reads(pid)
        try:
            shell.send(f"'echo' 'x;touch {victim};#'\r".encode())
            time.sleep(0.3)  # the line is sent, and bash held on its way back from reading it
            shell.send(b"\x03")
            out = shell.expect(PROMPT, timeout=15)
        finally:
            tracer.terminate()
            tracer.wait(timeout=10)
        assert env.direct(f"test -e {victim}").returncode == 1, ("the rest of a checked line ran", out)
        assert f"x;touch {victim};#\r\n".encode() in out, out  # the decided line ran, whole
        shell.send(b"echo still-usable\r")
        shell.expect(rb"\nstill-usable\r\n[^\n]*\$ $")


def test_a_signal_request_never_reaches_a_line_shells_bash(env: Env) -> None:
    # An SSH "signal" request was passed on to the target, whose sshd sends it to the shell's process group:
    # bash itself, interrupted the same way after reading the allowed line.
    victim = env.work / "victim-signal-request"

    async def run() -> tuple[bytes, Any]:
        async with env.connect("operator") as conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
            buffer = b""

            async def expect(pattern: bytes) -> bytes:
                nonlocal buffer
                while (found := re.search(pattern, buffer)) is None:
                    data = await asyncio.wait_for(proc.stdout.read(65536), 15)
                    assert data, buffer
                    buffer += data
                out, buffer = buffer[: found.end()], buffer[found.end() :]
                return out

            await expect(PROMPT)
            proc.stdin.write(b"echo pid=$$\r")
            pid = int(re.findall(rb"pid=(\d+)", await expect(rb"pid=\d+\r\n[^\n]*\$ $"))[-1])
            tracer = _stall_reads(pid)
            try:
                proc.stdin.write(f"'echo' 'x;touch {victim};#'\r".encode())
                await asyncio.sleep(0.3)
                proc.send_signal("INT")
                out = await expect(PROMPT)
            finally:
                tracer.terminate()
                tracer.wait(timeout=10)
            assert env.direct(f"test -e {victim}").returncode == 1, ("the rest of a checked line ran", out)
            proc.stdin.write(b"sleep 30\r")
            await asyncio.sleep(0.5)
            proc.send_signal("INT")  # still reaches what a line runs
            await expect(PROMPT)
            proc.stdin.write(b"exit\r")
            await asyncio.wait_for(proc.wait_closed(), 15)
            # without a terminal (a script) too, and the script goes on
            script = await conn.create_process(encoding=None)
            script.stdin.write(b"sleep 30\necho after-signal\n")
            await asyncio.sleep(0.5)
            script.send_signal("INT")
            script.stdin.write_eof()
            done = await asyncio.wait_for(script.wait(), 15)
            return out, done.stdout

    out, script_out = asyncio.run(run())
    assert f"x;touch {victim};#\r\n".encode() in out, out
    assert script_out.endswith(b"after-signal\n"), script_out


def test_interrupt_suspend_and_quit_reach_what_a_line_runs_and_no_line_is_lost(env: Env) -> None:
    with _line_shell(env.client, env.tokens["liner"]) as shell:
        # at the prompt: the line being typed is dropped, nothing reaches the target
        shell.send(b"echo never-sent\x03")
        shell.expect(rb"never-sent\^C\r\n[^\n]*\$ $")
        # a running program is interrupted, and the line typed after the ^C runs once the shell is back
        shell.send(b"sleep 30\r")
        time.sleep(0.5)
        shell.send(b"\x03echo after-interrupt\r")
        shell.expect(rb"\$ after-interrupt\r\n[^\n]*\$ $", timeout=10)
        # so is a program in a command substitution (in the shell's own process group, which bash never is
        # signalled in: it then interrupts itself, having read nothing more)
        shell.send(b"echo [$(sleep 30)] not-shown\r")
        time.sleep(0.5)
        shell.send(b"\x03")
        shell.expect(rb"\^C\r\n[^\n]*\$ $", timeout=10)
        # ^C right after a line: the line runs (it was decided and sent), or is interrupted, and the shell goes on
        for n in range(20):
            shell.send(f"sleep 0.1; echo round-{n}\r\x03".encode())
            shell.expect(PROMPT, timeout=10)
        shell.send(b"echo still-usable\r")
        shell.expect(rb"\nstill-usable\r\n[^\n]*\$ $")
        assert b"command not found" not in shell.seen
        # a program that ignores SIGINT goes on
        shell.send(b"bash -c \"trap '' INT; sleep 1; echo survived\"\r")
        time.sleep(0.3)
        shell.send(b"\x03")
        shell.expect(rb"\^Csurvived\r\n[^\n]*\$ $", timeout=10)
        # ^Z stops the running program, a job of the shell's
        shell.send(b"sleep 30\r")
        time.sleep(0.5)
        shell.send(b"\x1a")
        shell.expect(rb"Stopped[^\n]*sleep 30\r\n[^\n]*\$ $", timeout=10)
        shell.send(b"kill -9 %1\r")
        shell.expect(PROMPT)
        # ^\ quits it
        shell.send(b"sleep 30\r")
        time.sleep(0.5)
        shell.send(b"\x1c")
        shell.expect(rb"Quit[^\n]*\r\n[^\n]*\$ $", timeout=10)
        # bash's own builtins get no signal (bash is never interrupted); ^D ends a read
        shell.send(b"read x\r")
        time.sleep(0.3)
        shell.send(b"\x03")
        time.sleep(0.3)
        shell.send(b"\x04")
        shell.send(b"echo after-read\r")
        shell.expect(rb"after-read\r\n[^\n]*\$ $", timeout=10)
        shell.send(b"true\r")
        shell.expect(PROMPT)
        assert b"\x1b]7374" not in shell.seen  # the shell's process id, read by the gateway


def test_lines_typed_ahead_that_an_interrupt_drops_are_recorded_and_the_agent_is_told(env: Env) -> None:
    # ^C drops the lines typed ahead, as a terminal does; but the agent had seen them echoed, the recording
    # had them as allowed commands, and nothing said that they never ran.
    token = env.gw.token("agent-typed-ahead", role="liner")
    with _line_shell(env.client, token) as shell:
        shell.send(b"sleep 31\r")
        wait_until(lambda: env.direct("pgrep -fx 'sleep 31'").returncode == 0, 10, "the sleep to run")
        shell.send(b"echo typed-ahead-one\recho typed-ahead-two\r\x03")
        shell.expect(rb"dropped 2 lines typed ahead, which did not run: `echo typed-ahead-one`, `echo typed-ahead-two`")
        shell.expect(PROMPT, timeout=10)
        shell.send(b"echo after-drop\r")
        shell.expect(rb"\nafter-drop\r\n[^\n]*\$ $", timeout=10)
        assert b"\ntyped-ahead-one\r\n" not in shell.seen and b"\ntyped-ahead-two\r\n" not in shell.seen
    deadline = time.monotonic() + 10
    while True:
        dropped = [e["data"] for e in _session_events(env, "agent-typed-ahead") if e.get("kind") == "lines.dropped"]
        if dropped or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(d["signal"], d["lines"]) for d in dropped] == [
        ("INT", ["echo typed-ahead-one", "echo typed-ahead-two"])
    ], dropped
