"""examples/ssh as shipped (its policy tests run in test_examples.py): its gateway config runs unchanged (only the
LICTOR_SSH_* environment variables point it at a real sshd) and keeps the contracts of its README
with the real OpenSSH client."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LICTOR, ROOT, free_port, lictor, require, require_binary, wait_until
from tests.sshd import SSHD, GatewayClient, Sshd, start_sshd

EXAMPLE = ROOT / "examples" / "ssh"

pytestmark = pytest.mark.timeout(120)


class Running:
    def __init__(self, sshd: Sshd, client: GatewayClient, state: Path) -> None:
        self.sshd = sshd
        self.client = client
        self.state = state
        self.tokens: dict[str, str] = {}

    def token(self, role: str) -> str:
        if role not in self.tokens:
            out = lictor(
                "token", "issue", "--state-dir", str(self.state), "--sub", f"{role}-bot", "--claim", f"role={role}"
            )
            self.tokens[role] = out.stdout.strip()
        return self.tokens[role]

    def ssh(self, role: str, command: str) -> subprocess.CompletedProcess[bytes]:
        return self.client.ssh(self.token(role), command)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    require_binary("ssh")
    require(os.path.exists(SSHD), f"{SSHD} (openssh-server) is not installed")
    tmp = tmp_path_factory.mktemp("ssh-example")
    sshd = start_sshd(tmp / "sshd")
    port = free_port()
    state = tmp / "state"
    env = {
        **os.environ,
        "LICTOR_STATE_DIR": str(state),
        "LICTOR_SSH_HOST": sshd.host,
        "LICTOR_SSH_PORT": str(sshd.port),
        "LICTOR_SSH_USER": sshd.user,
        "LICTOR_SSH_KEY": str(sshd.client_key),
        "LICTOR_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "LICTOR_SSH_LISTEN_PORT": str(port),
        "LICTOR_APPROVALS_PORT": str(free_port()),
    }
    ready = tmp / "ready"
    log = (tmp / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [LICTOR, "run", "-c", str(EXAMPLE / "lictor.yaml"), "--ready-file", str(ready)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, (tmp / "gateway.log").read_text()
            assert time.monotonic() < deadline, (tmp / "gateway.log").read_text()
            time.sleep(0.05)
        host_key = state / "ssh" / "host1_host_ed25519.pub"
        host_public = " ".join(host_key.read_text().split()[:2])
        yield Running(sshd, GatewayClient.create(tmp / "client", port, host_public), state)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        sshd.stop()


def test_a_token_that_just_expired_is_told_to_connect_again_with_a_fresh_one(running: Running) -> None:
    # Within the identity leeway the token still logs in, and every command is refused as expired: the denial
    # must not send the agent to retry later with the same token.
    token = lictor(
        "token", "issue", "--state-dir", str(running.state), "--sub", "late-bot", "--claim", "role=observer",
        "--ttl", "1s",
    ).stdout.strip()  # fmt: skip
    payload = token.split(".")[1]
    expires = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
    while time.time() <= expires + 0.5:
        time.sleep(0.2)
    denied = running.client.ssh(token, "uptime")
    assert denied.returncode == 126, denied.stderr
    text = denied.stderr.decode()
    assert "by rule lictor:token-expired" in text and "fresh token" in text, text
    assert "Retry later" not in text, text


def test_observer_contract(running: Running) -> None:
    ok = running.ssh("observer", "/bin/ls -d / && whoami && id -un && echo done")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"/\n{running.sshd.user}\n{running.sshd.user}\ndone\n".encode()
    marker = running.sshd.work / "observer_marker"
    for command in (
        "cat /etc/hostname | grep x",
        "ls; rm x",
        f"echo x > {running.sshd.work}/f",
        "sh -c ls",
        # bash and dash end $'...' at the quote after \c: the touch runs there, it is not quoted text
        f"echo $'\\c'; touch {marker}; echo ' \\'",
    ):
        denied = running.ssh("observer", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert b"lictor: denied" in denied.stderr
    assert not marker.exists()
    # a program named like an allowed one, planted elsewhere on the host, is not that program
    planted = running.sshd.work / "planted"
    planted.mkdir(exist_ok=True)
    (planted / "cat").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (planted / "cat").chmod(0o755)
    for command in (f"{planted}/cat /etc/hostname", f"cd {planted} && ./cat", f"/usr/bin/../..{planted}/cat"):
        denied = running.ssh("observer", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert b"lictor: denied" in denied.stderr and b"observer-system-programs" in denied.stderr, denied.stderr
    assert not marker.exists()
    shell = running.client.shell(running.token("observer"))
    try:
        shell.expect(rb"lictor: denied shell")
        assert shell.wait(timeout=15) == 126
    finally:
        shell.close()


def test_operator_contract(running: Running) -> None:
    held = running.ssh("operator", "systemctl status lictor-example-unit; systemctl restart lictor-example-unit; rm x")
    assert held.returncode == 126 and b"by rule lictor:default-deny" in held.stderr  # not held: part is denied
    shell = running.client.shell(running.token("operator"))
    try:
        shell.expect(rb"\$ $")
        shell.send(b"cd / && pwd\r")
        shell.expect(rb"\r\n/\r\n")
        shell.send(b"cat /etc/hostname | grep x\r")
        shell.expect(rb"lictor: denied `grep x`")
        # The shell keeps its variables between lines: a value set by one line is the agent's in the next.
        marker = running.sshd.work / "operator_marker"
        shell.send(b"echo ${x:='a[$(touch " + str(marker).encode() + b")]'}\r")
        shell.expect(rb"a\[\$\(touch [^\r]*\)\]\r\n")
        shell.send(b"echo $((x))\r")
        shell.expect(rb"lictor: denied")
        assert not marker.exists()
        shell.send(b"exit\r")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()


def test_a_command_spread_over_lines_is_refused_with_how_to_write_it_on_one(running: Running) -> None:
    # A line shell decides each line alone: a here-document or an `if` over several lines is refused. The
    # refusal told the agent to drop expansions from program names, which has nothing to do with it.
    one_line = b"write all of it on one line"
    shell = running.client.shell(running.token("operator"))
    try:
        shell.expect(rb"\$ $")
        for line in (b"cat <<EOF", b"if true", b"echo a \\"):
            shell.send(line + b"\r")
            denied = shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
            assert one_line in denied and b"expansions" not in denied, denied
        shell.send(b"cat <<< 'from one line'\r")
        shell.expect(rb"\r\nfrom one line\r\n")
        shell.send(b"exit\r")
        assert shell.wait(timeout=15) == 0
    finally:
        shell.close()
    script = running.client.ssh(running.token("operator"), "", "-T", input=b"echo one\ncat <<EOF\nabc\nEOF\n")
    assert script.returncode == 126 and script.stdout == b"one\n", script
    assert one_line in script.stderr, script.stderr


def test_a_script_for_a_shell_on_the_sessions_input_is_refused_with_where_to_send_it(running: Running) -> None:
    # `ssh HOST bash -s < script.sh` is refused (bash would run what the gateway never sees); the refusal's
    # next step asked for "plain programs with literal arguments" instead of naming the way that works.
    script = b"echo one\nid -un\n"
    refused = running.client.ssh(running.token("operator"), "bash -s", input=script)
    assert refused.returncode == 126, refused
    assert b"ssh -T HOST < script.sh" in refused.stderr and b"literal arguments" not in refused.stderr, refused.stderr
    ran = running.client.ssh(running.token("operator"), "", "-T", input=script)
    assert ran.returncode == 0 and ran.stdout == f"one\n{running.sshd.user}\n".encode(), ran


def test_a_shell_line_too_long_for_the_targets_terminal_says_how_to_send_it(running: Running) -> None:
    # The refusal's next step asked for "plain programs with literal arguments", as if the line could not be read.
    long_line = "echo " + "a" * 4100
    script = running.client.ssh(running.token("operator"), "", "-T", input=f"{long_line}\n".encode())
    assert script.returncode == 126, script
    assert b"longer than 4000 bytes" in script.stderr and b"as an exec request" in script.stderr, script.stderr
    assert b"literal arguments" not in script.stderr, script.stderr
    ran = running.ssh("operator", long_line)
    assert ran.returncode == 0 and ran.stdout == f"{long_line[5:]}\n".encode(), ran.stderr


def test_admin_contract(running: Running) -> None:
    marker = running.sshd.work / "admin_marker"
    ok = running.ssh("admin", f"touch {marker} && ls {marker}")
    assert ok.returncode == 0, ok.stderr
    for command in (
        "rm -rf /",
        "sudo rm -rf /*",
        f"cd / && rm -rf * {marker}",
        "mkfs.ext4 /dev/sdz9",
        "dd if=/dev/zero of=/dev/sdz",
    ):
        denied = running.ssh("admin", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert b"lictor: denied `" in denied.stderr
    assert running.sshd.run(f"test -e {marker}").returncode == 0


def test_only_admin_copies_files_and_the_readme_says_so(running: Running, tmp_path: Path) -> None:
    # "admin may run anything but destructive commands": scp and sftp are how agents move files, and were
    # refused to admin too. The README's table is what an agent reads to know what it may do.
    rows = {
        cells[1].strip(" `"): cells
        for line in (EXAMPLE / "README.md").read_text().splitlines()
        if line.startswith("| `") and (cells := re.split(r"(?<!\\)\|", line))
    }
    local = tmp_path / "upload.txt"
    local.write_text("data\n")
    for role in ("observer", "operator"):
        assert "sftp/scp" in rows[role][3], rows[role]
        remote = running.sshd.work / f"{role}_upload.txt"
        copied = running.client.scp(running.token(role), str(local), running.client.remote(remote))
        assert copied.returncode != 0, copied.stderr
        assert b"lictor: denied sftp" in copied.stderr, copied.stderr
        assert not remote.exists()
        listed = running.client.sftp(running.token(role), f"ls {running.sshd.work}\n")
        assert b"lictor: denied sftp" in listed.stderr, listed.stderr
    assert "`scp` and `sftp`" in rows["admin"][2], rows["admin"]
    remote = running.sshd.work / "admin_upload.txt"
    copied = running.client.scp(running.token("admin"), str(local), running.client.remote(remote))
    assert copied.returncode == 0, copied.stderr
    assert running.sshd.run(f"cat {remote}").stdout == b"data\n"
    listed = running.client.sftp(running.token("admin"), f"ls {running.sshd.work}\n")
    assert b"admin_upload.txt" in listed.stdout, (listed.stdout, listed.stderr)
    device = running.client.sftp(running.token("admin"), f"put {local} /dev/sda\n")
    assert b"lictor: denied sftp write of /dev/sda by rule guard-device-files" in device.stderr, device.stderr


def _transfer_client(running: Running, role: str) -> dict[str, str]:
    env = running.client.env(running.token(role))
    env["GIT_SSH_COMMAND"] = shlex.join(["ssh", *running.client.options(), "-p", str(running.client.port)])
    return env


def test_git_and_rsync_are_file_transfers_admin_gets_whole_and_others_are_refused(
    running: Running, tmp_path: Path
) -> None:
    # git's and rsync's far ends speak binary protocols over exec. Masked like command output, a ref name or hash
    # with a Luhn-valid digit run broke `git clone`, and a file with a card number hung an rsync pull: they are
    # file transfers, decided and relayed like scp and sftp (the README's table says who may).
    require_binary("git")
    require_binary("rsync")
    work = running.sshd.work
    repo, card = work / "cards.git", work / "cards.txt"
    made = running.sshd.run(
        f"git init -q {repo} && cd {repo} && echo data > f && git add f && "
        "git -c user.name=a -c user.email=a@b commit -qm first && git branch 4111111111111111 && "
        f"printf 'card 4111 1111 1111 1111\\n' > {card}"
    )
    assert made.returncode == 0, made.stderr
    url = f"ssh://agent@{running.client.host}:{running.client.port}{repo}"
    env = _transfer_client(running, "admin")
    clone = tmp_path / "clone"
    cloned = subprocess.run(["git", "clone", "-q", url, str(clone)], env=env, capture_output=True, timeout=60)
    assert cloned.returncode == 0, cloned.stderr
    branches = subprocess.run(["git", "-C", str(clone), "branch", "-r"], capture_output=True, text=True).stdout
    assert "origin/4111111111111111" in branches, branches
    pushed = subprocess.run(
        f"git -C {clone} -c user.name=a -c user.email=a@b commit -q --allow-empty -m second && "
        f"git -C {clone} push -q origin HEAD:refs/heads/pushed",
        shell=True, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    copy = tmp_path / "cards.txt"
    pulled = subprocess.run(
        ["rsync", "-e", env["GIT_SSH_COMMAND"], running.client.remote(card), str(copy)],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert copy.read_bytes() == b"card 4111 1111 1111 1111\n"
    for role in ("observer", "operator"):
        env = _transfer_client(running, role)
        refused = subprocess.run(
            ["git", "clone", "-q", url, str(tmp_path / role)], env=env, capture_output=True, timeout=60
        )
        assert refused.returncode != 0
        assert f"lictor: denied git read of {repo} by rule lictor:default-deny".encode() in refused.stderr
        refused = subprocess.run(
            ["rsync", "-e", env["GIT_SSH_COMMAND"], running.client.remote(card), str(tmp_path / f"{role}.txt")],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0
        assert f"lictor: denied rsync read of {card} by rule lictor:default-deny".encode() in refused.stderr


def test_rsync_server_options_the_gateway_would_misread_are_refused_and_run_nothing(
    running: Running, tmp_path: Path
) -> None:
    # rsync reads options after the files too (`. FILE --log-file=PATH` wrote PATH), and a bare -e takes the `.` as
    # its value (the next word becomes the directory the files are named from): the gateway read both as files.
    require_binary("rsync")
    work = running.sshd.work
    made = running.sshd.run(f"echo data > {work}/misread.txt")
    assert made.returncode == 0, made.stderr
    env = _transfer_client(running, "admin")
    for server, why in (
        (f"rsync --server --sender -logDtpre.iLsfxCIvu . {work}/misread.txt --log-file={work}/misread.log", b"after"),
        (f"rsync --server --sender -logDtpre . {work} --log-file={work}/misread.log", b"next word"),
    ):
        refused = subprocess.run(
            ["rsync", "-e", env["GIT_SSH_COMMAND"], f"--rsync-path={server} #",
             running.client.remote(f"{work}/misread.txt"), str(tmp_path / "copy.txt")],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0
        assert b"lictor:ssh-unparsable" in refused.stderr and why in refused.stderr, refused.stderr
    assert running.sshd.run(f"test -e {work}/misread.log").returncode != 0, "the refused rsync server ran"


def test_admin_rsync_cannot_empty_the_root_or_write_into_proc(running: Running, tmp_path: Path) -> None:
    # rsync names the files of a tree inside its stream: `--delete` into / is `rm -rf /`, and a push into /proc/ with
    # --inplace writes /proc/sysrq-trigger; both went through, the guards only seeing / and /proc. (-n: a dry run,
    # should the guard fail.)
    require_binary("rsync")
    env = _transfer_client(running, "admin")
    empty, trigger = tmp_path / "empty", tmp_path / "sysrq-trigger"
    empty.mkdir()
    trigger.write_text("h")
    for args in (
        ["-rn", "--delete", "--max-delete=1", f"{empty}/", running.client.remote("/")],
        ["-rn", "--remove-source-files", running.client.remote("/"), str(tmp_path / "root")],
        ["-n", "-W", "--inplace", str(trigger), running.client.remote("/proc/")],
    ):
        refused = subprocess.run(
            ["rsync", "-e", env["GIT_SSH_COMMAND"], *args], env=env, capture_output=True, timeout=60
        )
        assert refused.returncode != 0
        assert b"by rule guard-transfer-trees" in refused.stderr, refused.stderr
    work = running.sshd.work
    assert running.sshd.run(f"mkdir -p {work}/synced && touch {work}/synced/stale").returncode == 0
    synced = subprocess.run(
        ["rsync", "-e", env["GIT_SSH_COMMAND"], "-az", "--delete", f"{empty}/", running.client.remote(f"{work}/synced/")],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    assert running.sshd.run(f"test -e {work}/synced/stale").returncode != 0


def test_admin_rsyncs_with_resumable_transfers_and_statistics(running: Running, tmp_path: Path) -> None:
    # `rsync -P` (--partial --progress) sends the server `--log-format=X --partial`, and `--stats`, -C
    # (--cvs-exclude) and -B2048 (--block-size) are sent too: all were refused as options unknown to the gateway,
    # though they touch only the files being copied.
    require_binary("rsync")
    env = _transfer_client(running, "admin")
    work = running.sshd.work
    local = tmp_path / "resumable.bin"
    local.write_bytes(os.urandom(100_000))
    for args in (
        ["-aP", "--stats", str(local), running.client.remote(f"{work}/")],
        ["-avzP", running.client.remote(f"{work}/resumable.bin"), str(tmp_path / "back.bin")],
        ["-aC", "-B", "2048", str(local), running.client.remote(f"{work}/cvs.bin")],
    ):
        copied = subprocess.run(
            ["rsync", "-e", env["GIT_SSH_COMMAND"], *args], env=env, capture_output=True, timeout=60
        )
        assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()


def test_admin_backs_up_to_the_login_home_with_an_excluded_pattern(running: Running) -> None:
    # "$HOME" is the login user's home like ~, and an unquoted --exclude=*.tmp only ever expands to --exclude
    # options: both were refused as "only known at run time", while ~/backup.tgz and '--exclude=*.tmp' worked.
    work = running.sshd.work
    made = running.sshd.run(f"mkdir -p {work}/tree && touch {work}/tree/keep {work}/tree/drop.tmp")
    assert made.returncode == 0, made.stderr
    backed = running.ssh(
        "admin", f'cd {work} && tar -czf "$HOME/backup.tgz" --exclude=*.tmp tree && tar -tzf ~/backup.tgz'
    )
    assert backed.returncode == 0, backed.stderr
    assert sorted(backed.stdout.split()) == [b"tree/", b"tree/keep"]
    unknown = running.ssh("admin", f"cd {work} && tar -czf $HOME/b.tgz --exclude *.tmp tree")
    assert unknown.returncode == 126 and b"lictor:ssh-unparsable" in unknown.stderr, unknown.stderr


def _admin_line_shell_attempt(
    running: Running, marker_name: str, refused: tuple[str, ...], why: bytes, then: list[str]
) -> None:
    """As admin in a line shell: each of ``refused`` is denied for ``why``; the lines ``then`` (meant to delete a
    marker file through what the refused lines would have set up) leave the marker in place."""
    marker = running.sshd.work / marker_name
    assert running.sshd.run(f"touch {marker}").returncode == 0
    shell = running.client.shell(running.token("admin"))
    try:
        shell.expect(rb"\$ $")
        for line in refused:
            shell.send(f"{line}\r".encode())
            assert why in shell.expect(rb"lictor: denied[^\n]*\n[^\n]*\$ $")
        for line in then:
            shell.send(f"{line.format(marker=marker)}\r".encode())
            shell.expect(rb"\$ $")
        shell.send(b"exit\r")
        shell.wait(timeout=15)
    finally:
        shell.close()
    assert running.sshd.run(f"test -e {marker}").returncode == 0, "a command the guardrails deny ran on the target"


def test_admin_line_shell_cannot_turn_line_editing_back_on(running: Running) -> None:
    # The line shell runs bash --noediting. After `set -o emacs` its readline took the checked line `Z` as
    # a key macro from an earlier `bind` line and ran `echo ... | xargs rm` (guard-blind-deletes) instead.
    _admin_line_shell_attempt(
        running,
        "admin_line_marker",
        ("set -o emacs", "set -eo vi", "shopt -s -o emacs", "shopt -so vi"),
        b"how commands are read",
        ['bind \'"Z": "echo {marker} | xargs rm"\'', "Z"],
    )


def test_admin_line_shell_cannot_set_the_targets_kill_character(running: Running) -> None:
    # After `tset -k @` the target's terminal erased what came before an @: the checked line
    # "echo x@sh -c '...'" (one echo) reached bash as `sh -c 'echo f | xargs rm'` (guard-blind-deletes).
    _admin_line_shell_attempt(
        running,
        "admin_kill_marker",
        ("tset -k @", "reset -Q -k@", "stty kill @", "echo -F /dev/tty kill @ | xargs stty"),
        b"edits the lines it reads",
        ["echo x@sh -c 'echo {marker} | xargs rm'"],
    )


def test_operator_status_cannot_reach_another_host(running: Running) -> None:
    # `systemctl status -H HOST` runs the target's ssh to HOST (with the account's keys): the operator's
    # `systemctl status *` let it connect anywhere the target can reach.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(3)
        port = listener.getsockname()[1]
        for command in (f"systemctl status -H nobody@127.0.0.1:{port} x", f"systemctl status --host=127.0.0.1:{port}"):
            denied = running.ssh("operator", command)
            assert denied.returncode == 126, (command, denied.stderr)
            assert b"lictor: denied `ssh -xT" in denied.stderr, denied.stderr
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()


def test_admin_cannot_hide_a_command_in_an_array_value(running: Running) -> None:
    # `declare -a x='(...)'` is a compound assignment: bash ran the $(...) inside the quoted value, which the
    # analysis had taken for text, so `xargs rm` (guard-blind-deletes) ran as a declare.
    marker = running.sshd.work / "admin_array_marker"
    assert running.sshd.run(f"touch {marker}").returncode == 0
    for command in (
        f"declare -a x='([$(echo {marker} | xargs rm)]=1)'",
        f"v='($(echo {marker} | xargs rm))'; declare -a x=\"$v\"",
        f"declare -a x; declare x='($(echo {marker} | xargs rm))'",
    ):
        denied = running.ssh("admin", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert b"compound assignment" in denied.stderr, denied.stderr
    assert running.sshd.run(f"test -e {marker}").returncode == 0, "a command the guardrails deny ran on the target"


def test_admin_cannot_name_a_program_through_the_shells_tables(running: Running) -> None:
    # BASH_CMDS is bash's table of command paths (what `hash -p` fills, which is refused): after
    # `BASH_CMDS=/usr/bin/xargs`, the program `0` was xargs, and `echo f | 0 rm` deleted f past the guardrail.
    marker = running.sshd.work / "admin_table_marker"
    assert running.sshd.run(f"touch {marker}").returncode == 0
    for command in (
        f"BASH_CMDS=/usr/bin/xargs; echo {marker} | 0 rm",
        f"printf -v BASH_ALIASES 'xargs'; echo {marker} | 0 rm",
    ):
        denied = running.ssh("admin", command)
        assert denied.returncode == 126, (command, denied.stderr)
        assert b"can change which program runs" in denied.stderr, denied.stderr
    assert running.sshd.run(f"test -e {marker}").returncode == 0, "a command the guardrails deny ran on the target"


def _held_for_approval(argv: list[str], env: dict[str, str], input: bytes = b"") -> bytes:
    """Run a client until the gateway says it holds the request; then end it (which withdraws the request).
    Returns what the client wrote to stderr; fails if the client ends without being held."""
    import select

    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(input)
    proc.stdin.close()
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"lictor: waiting for approval" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, seen
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                data = os.read(proc.stderr.fileno(), 65536)
                assert data, f"{argv} ended without being held: {seen!r}"
                seen += data
    finally:
        proc.kill()
        proc.wait(timeout=15)
        proc.stderr.close()
    return seen


def test_admin_writes_to_the_accounts_startup_files_wait_for_an_approver(running: Running, tmp_path: Path) -> None:
    # Every role runs as the same account on the target, whose login shell reads ~/.bashrc for each exec request
    # and whose sshd runs ~/.ssh/rc for each session: `uptime() { touch X; }` planted there by admin made an
    # observer's allowed `uptime` run `touch`, and a key added to ~/.ssh/authorized_keys logs in around the
    # gateway. The guard holds such writes for an approver by every channel; the files are named here under the work
    # directory (the rules cannot know the home), so the account's own startup files stay as they are.
    require_binary("rsync")
    work = running.sshd.work
    assert running.sshd.run(f"mkdir -p {work}/.ssh").returncode == 0
    local = tmp_path / "authorized_keys"
    local.write_text("ssh-ed25519 AAAA planted\n")
    admin = running.client.env(running.token("admin"))
    for command in (
        f"echo 'uptime() {{ touch {work}/ran; }}' >> {work}/.bashrc",
        f"echo 'touch {work}/ran' >| {work}/.ssh/rc",
        f"echo ssh-ed25519 AAAA planted | tee -a {work}/.ssh/authorized_keys",
    ):
        held = _held_for_approval(running.client.ssh_argv(command), admin)
        assert b"startup files" in held, (command, held)
    sftp = ["sftp", *running.client.options(), "-P", str(running.client.port), f"agent@{running.client.host}"]
    for operations in (
        f"put {local} {work}/.ssh/authorized_keys\n",
        f"put {local} {work}/x\nrename {work}/x {work}/.profile\n",
    ):
        held = _held_for_approval(sftp, admin, operations.encode())
        assert b"startup files" in held, (operations, held)
    # rsync names the files it writes inside its stream: into the home as a whole (a dry run), they could be these
    env = _transfer_client(running, "admin")
    held = _held_for_approval(["rsync", "-n", "-e", env["GIT_SSH_COMMAND"], str(local), running.client.remote("")], env)
    assert b"into a home directory" in held, held
    listed = running.sshd.run(f"ls -A {work} {work}/.ssh")
    assert b".bashrc" not in listed.stdout and b"rc" not in listed.stdout.split(), listed.stdout
    assert b"authorized_keys" not in listed.stdout and b".profile" not in listed.stdout, listed.stdout
    assert not (work / "ran").exists()


def test_sftp_cannot_bring_its_own_server_past_the_decided_operations(running: Running, tmp_path: Path) -> None:
    # `sftp -s /usr/lib/openssh/sftp-server` asks for that program as a command, which admin may run: the file
    # operations then went through it undecided (a write of ~/.ssh/rc, or of a disk device, that the sftp subsystem
    # holds or denies).
    work = running.sshd.work
    assert running.sshd.run(f"mkdir -p {work}/.ssh").returncode == 0
    local = tmp_path / "rc"
    local.write_text(f"touch {work}/ran\n")
    put = subprocess.run(
        ["sftp", *running.client.options(), "-s", "/usr/lib/openssh/sftp-server", "-P", str(running.client.port),
         f"agent@{running.client.host}"],
        input=f"put {local} {work}/.ssh/rc\n".encode(), capture_output=True, env=running.client.env(running.token("admin")),
        timeout=30, start_new_session=True,
    )  # fmt: skip
    assert put.returncode != 0, put.stderr
    assert b"lictor: denied this command line by rule lictor:ssh-unparsable" in put.stderr, put.stderr
    assert b"sftp subsystem" in put.stderr, put.stderr
    assert running.sshd.run(f"test -e {work}/.ssh/rc").returncode != 0
    copied = running.client.sftp(running.token("admin"), f"put {local} {work}/copied\n")
    assert copied.returncode == 0, copied.stderr


def test_admin_commands_scheduled_for_later_wait_for_an_approver(running: Running) -> None:
    # crontab and at install commands that run later, as the account, from a file the gateway does not read: a
    # job planted by admin went on running outside the gateway, whatever the guardrails say.
    jobs = running.sshd.work / "jobs"
    assert running.sshd.run(f"echo '* * * * * touch {running.sshd.work}/ran' > {jobs}").returncode == 0
    admin = running.client.env(running.token("admin"))
    for command in (f"crontab {jobs}", f"at now + 1 hour < {jobs}"):
        held = _held_for_approval(running.client.ssh_argv(command), admin)
        assert b"run commands later" in held, (command, held)


def test_admin_cannot_write_a_startup_file_through_a_pattern(running: Running) -> None:
    # bash expands a pattern in a redirection when it matches one file: `>> ~/.bashr?` appended to ~/.bashrc, which
    # the rules saw only as the name `~/.bashr?`.
    work = running.sshd.work
    assert running.sshd.run(f"touch {work}/.bashrc").returncode == 0
    admin = running.client.env(running.token("admin"))
    held = _held_for_approval(running.client.ssh_argv(f"echo 'uptime() {{ :; }}' >> {work}/.bashr?"), admin)
    assert b"startup files" in held, held
    assert running.sshd.run(f"cat {work}/.bashrc").stdout == b""


def test_admin_cannot_write_a_startup_file_with_other_writing_programs(running: Running) -> None:
    # Programs other than cp, tee and sed write the files their arguments name too: inline Python appended to
    # ~/.bashrc, `git clone URL ~/.ssh` filled ~/.ssh, and went through unheld.
    work = running.sshd.work
    admin = running.client.env(running.token("admin"))
    for command in (
        f'python3 -c \'open("{work}/.bashrc", "a").write("uptime() {{ :; }}\\n")\'',
        f"git clone -q {work}/none.git {work}/.ssh",
    ):
        held = _held_for_approval(running.client.ssh_argv(command), admin)
        assert b"startup files" in held, (command, held)
    assert b"uptime" not in running.sshd.run(f"cat {work}/.bashrc").stdout


def test_observer_cannot_connect_to_other_ports_through_a_redirection(running: Running) -> None:
    # bash opens /dev/tcp/HOST/PORT as a connection: `cat < /dev/tcp/127.0.0.1/PORT` printed the banner of a
    # service the target reaches, though observers may only read files and run their six programs.
    port = running.sshd.port
    for command in (f"cat < /dev/tcp/127.0.0.1/{port}", f"x=/dev/tcp/127.0.0.1/{port}; cat < $x"):
        denied = running.ssh("observer", command)
        assert denied.returncode == 126, (command, denied.stdout, denied.stderr)
        assert b"by rule observer-no-writes" in denied.stderr, denied.stderr
        assert b"SSH-2.0" not in denied.stdout
    assert running.ssh("observer", "cat < /etc/hostname").returncode == 0


def test_admin_rsync_into_the_directory_of_the_homes_waits_for_an_approver(running: Running, tmp_path: Path) -> None:
    # rsync names the files of a tree inside its stream: into /home, they may be ops/.bashrc or ops/.ssh/rc, which an
    # rsync into one home as a whole already waited for. (-n: a dry run, should the hold fail.)
    require_binary("rsync")
    tree = tmp_path / "homes" / "ops"
    tree.mkdir(parents=True)
    (tree / ".bashrc").write_text("uptime() { :; }\n")
    env = _transfer_client(running, "admin")
    held = _held_for_approval(
        ["rsync", "-rn", "-e", env["GIT_SSH_COMMAND"], f"{tmp_path / 'homes'}/", running.client.remote("/home/")], env
    )
    assert b"into a home directory" in held, held


def _sessions_of(running: Running, sub: str) -> list[dict[str, object]]:
    listing = lictor("sessions", "list", "--state-dir", str(running.state), "--sub", sub, "--json")
    return list(json.loads(listing.stdout))


def test_a_replay_shows_what_was_denied_after_output_that_conceals_text(running: Running) -> None:
    # Output may set colours (ls does), so a replay keeps SGR sequences: `echo -e '\033[8m'` left the auditor's
    # terminal concealing text, and the replay's lines after it (the denied rm, the end of the session) showed
    # as nothing.
    token = lictor(
        "token", "issue", "--state-dir", str(running.state), "--sub", "conceal-bot", "--claim", "role=operator"
    )
    shell = running.client.shell(token.stdout.strip())
    try:
        shell.expect(rb"\$ $")
        shell.send(b"echo -e 'ok\\033[8m\\033[30;40m'\r")
        shell.expect(rb"ok\x1b\[8m[^$]*\$ $")
        shell.send(b"rm -rf /tmp/lictor-conceal\r")
        shell.expect(rb"lictor: denied")
        shell.send(b"exit\r")
        shell.wait(timeout=15)
    finally:
        shell.close()
    ended: list[dict[str, object]] = []
    wait_until(
        lambda: ended.extend(r for r in _sessions_of(running, "conceal-bot") if not r["open"]) or ended, 15, "the end"
    )
    shown = lictor("replay", str(ended[0]["id"]), "--no-wait", "--state-dir", str(running.state)).stdout
    assert "\x1b[8m" in shown, shown  # the output as the agent's terminal got it
    # What the terminal's attributes are at each of the replay's own lines: reset, whatever output came before.
    lines = [m for m in re.finditer(r"^(?:\x1b\[0m)?(\$ rm -rf|✗ DENY|── end of session)", shown, re.M)]
    assert len(lines) == 3, shown
    for line in lines:
        before = shown[: line.start(1)]
        assert before.rfind("\x1b[0m") > before.rfind("\x1b[8m"), shown
        assert before.rfind("\x1b[0m") > before.rfind("\x1b[30;40m"), shown


@contextlib.contextmanager
def _gateway_with_spool_on_a_tiny_disk(running: Running, tmp_path: Path) -> Iterator[tuple[Any, GatewayClient, Path]]:
    """A gateway on the example's pack whose spool lies on a 1 MiB tmpfs the test can fill."""
    from tests.conftest import GatewayProcess
    from tests.test_spool import tiny_tmpfs

    sshd = running.sshd
    port = free_port()
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        config = {
            "rulepacks": [str(EXAMPLE / "rulepacks")],
            "approvals": {"listen": f"127.0.0.1:{free_port()}"},
            "recordings": {"stop_timeout": "1s", "spool": {"path": str(disk / "spool")}},
            "targets": {
                "host1": {
                    "protocol": "ssh",
                    "listen": f"127.0.0.1:{port}",
                    "upstream": {
                        "host": sshd.host,
                        "port": sshd.port,
                        "user": sshd.user,
                        "key": str(sshd.client_key),
                        "known_hosts": str(sshd.known_hosts),
                    },
                }
            },
        }
        gateway = GatewayProcess(tmp_path, config).start()
        try:
            host_key = gateway.state_dir / "ssh" / "host1_host_ed25519.pub"
            client = GatewayClient.create(tmp_path / "client", port, " ".join(host_key.read_text().split()[:2]))
            yield gateway, client, disk
        finally:
            gateway.stop()


def _fill(disk: Path) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)


def test_output_the_full_spool_cannot_record_does_not_reach_the_agent(running: Running, tmp_path: Path) -> None:
    # Output was written to the agent, then recorded: with the spool's disk full, `cat` of a file reached the
    # agent whole while the recording had none of it ("lictor: internal error in the gateway").
    with _gateway_with_spool_on_a_tiny_disk(running, tmp_path) as (gateway, client, disk):
        token = gateway.token("full-bot", role="admin")
        ran = subprocess.Popen(
            client.ssh_argv("echo STARTED; sleep 1.5; echo SECRET-LINE; cat /etc/services"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=client.env(token),
            start_new_session=True,
        )
        assert ran.stdout is not None
        first = ran.stdout.readline()  # the command was decided and runs: now the disk fills up
        _fill(disk)
        out, err = ran.communicate(timeout=30)
        (disk / "filler").unlink()
    assert first == b"STARTED\n", (first, err)
    assert b"SECRET-LINE" not in out and out == b"", out[:300]
    assert b"lictor: this session can no longer be recorded" in err, err
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def test_a_session_the_full_spool_cannot_record_is_refused_with_a_reason(running: Running, tmp_path: Path) -> None:
    # The login succeeded, the session could not be opened (its start cannot be spooled), and the connection
    # closed with nothing for the agent to read but "Connection closed".
    with _gateway_with_spool_on_a_tiny_disk(running, tmp_path) as (gateway, client, disk):
        token = gateway.token("full-bot", role="admin")
        _fill(disk)
        # the segment the spool writes in has room left: output that cannot be recorded takes it
        spent = client.ssh(token, "cat /etc/services /etc/services")
        ran = client.ssh(token, "echo RAN")
        (disk / "filler").unlink()
    assert b"lictor: this session can no longer be recorded" in spent.stderr, spent.stderr
    assert ran.returncode != 0 and b"RAN" not in ran.stdout, ran
    assert b"the gateway cannot record a session now" in ran.stderr and b"retry later" in ran.stderr, ran.stderr
