"""A throwaway OpenSSH server for the SSH tests: the real ``/usr/sbin/sshd`` on a free port.

:func:`start_sshd` generates a host key and a client key in a temporary directory, writes an
``sshd_config`` that accepts only that client key, and runs ``sshd -D -e -f CONFIG``. When the tests
run as root, the target account is a dedicated unprivileged user (created with ``useradd`` if it
does not exist) so that a command that slips through can only damage that user's files; otherwise
the account is the current user (sshd can serve only its own user when it is not root).

Each server gets a fresh work directory owned by the target account (under ``/tmp``, readable by
that account, unlike pytest's ``tmp_path``); tests put marker files there and use absolute paths.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

__all__ = ["SSHD", "TARGET_USER", "GatewayClient", "PtyProcess", "Sshd", "ssh_keygen", "start_sshd"]

SSHD = "/usr/sbin/sshd"
TARGET_USER = "lictor-ssh"


def ssh_keygen(path: Path, comment: str = "lictor-test", kind: str = "ed25519") -> Path:
    """Create an unencrypted key pair at ``path`` / ``path.pub``; returns ``path``."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def _target_account() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        account = pwd.getpwnam(TARGET_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", TARGET_USER],
            check=True,
            capture_output=True,
        )
        account = pwd.getpwnam(TARGET_USER)
    # sshd without PAM refuses accounts whose password field marks them locked ("!").
    shadow = subprocess.run(["getent", "shadow", TARGET_USER], capture_output=True, text=True).stdout
    if shadow.split(":")[1:2] and shadow.split(":")[1].startswith("!"):
        subprocess.run(["usermod", "--password", "*", TARGET_USER], check=True, capture_output=True)
    return account


@dataclass
class Sshd:
    """A running sshd: where it listens, who logs in, and the files a client needs."""

    host: str
    port: int
    user: str
    uid: int
    gid: int
    dir: Path
    """Configuration directory (keys, config, known_hosts): readable by the test process only."""
    work: Path
    """Work directory on the target, owned by the target account."""
    client_key: Path
    known_hosts: Path
    host_public_key: str
    keys_dir: Path | None = None
    user_ca: Path | None = None
    """A CA the server trusts for user certificates (``TrustedUserCAKeys``)."""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def ssh_args(self, *extra: str) -> list[str]:
        """``ssh`` arguments that reach this server directly with the client key."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "LogLevel=ERROR",
            *extra,
            f"{self.user}@{self.host}",
        ]

    def run(
        self, command: str, *, input: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``command`` on the target directly (not through the gateway)."""
        return subprocess.run(
            [*self.ssh_args(), command], input=input, capture_output=True, timeout=timeout, check=False
        )

    def certify(self, key: Path, validity: str = "-5m:+1h") -> Path:
        """Sign ``key``'s public half for the target account; returns the certificate file."""
        assert self.user_ca is not None
        subprocess.run(
            ["ssh-keygen", "-q", "-s", str(self.user_ca), "-I", "lictor-gateway", "-n", self.user, "-V", validity,
             f"{key}.pub"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return Path(f"{key}-cert.pub")

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.work, ignore_errors=True)
        if self.keys_dir is not None:
            shutil.rmtree(self.keys_dir, ignore_errors=True)


def start_sshd(directory: Path, *, timeout: float = 10.0, environment: dict[str, str] | None = None) -> Sshd:
    """Start sshd with its configuration in ``directory``; the caller calls :meth:`Sshd.stop`.
    ``environment``: variables sshd sets in every session (``SetEnv``), as a host's configuration would."""
    account = _target_account()
    directory.mkdir(parents=True, exist_ok=True)
    host_key = ssh_keygen(directory / "ssh_host_ed25519_key", "sshd-host")
    client_key = ssh_keygen(directory / "client_ed25519", "lictor-gateway")
    user_ca = ssh_keygen(directory / "user_ca", "sshd-user-ca")
    # sshd reads authorized_keys as the target user: keep it in a directory that user can read.
    keys_dir = Path(tempfile.mkdtemp(prefix="lictor-sshd-keys-", dir="/tmp"))
    keys_dir.chmod(0o755)
    authorized = keys_dir / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o644)
    trusted_ca = keys_dir / "trusted_user_ca.pub"
    trusted_ca.write_text(Path(f"{user_ca}.pub").read_text())
    trusted_ca.chmod(0o644)
    work = Path(tempfile.mkdtemp(prefix="lictor-sshd-work-", dir="/tmp"))
    work.chmod(0o755)
    os.chown(work, account.pw_uid, account.pw_gid)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                f"TrustedUserCAKeys {trusted_ca}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                f"AllowUsers {account.pw_name}",
                "AllowAgentForwarding no",
                "X11Forwarding no",
                "PrintMotd no",
                "PrintLastLog no",
                "MaxSessions 64",
                "MaxStartups 200:30:400",
                "LogLevel ERROR",
                "Subsystem sftp /usr/lib/openssh/sftp-server",
                *(f"SetEnv {name}={value}" for name, value in (environment or {}).items()),
                "",
            ]
        )
    )
    known_hosts = directory / "known_hosts"
    host_public = Path(f"{host_key}.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    log_path = directory / "sshd.log"
    server = Sshd(
        host="127.0.0.1",
        port=port,
        user=account.pw_name,
        uid=account.pw_uid,
        gid=account.pw_gid,
        dir=directory,
        work=work,
        client_key=client_key,
        known_hosts=known_hosts,
        host_public_key=f"{host_public[0]} {host_public[1]}",
        keys_dir=keys_dir,
        user_ca=user_ca,
        log_path=log_path,
    )
    with log_path.open("ab") as log:
        server.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {server.proc.returncode}:\n{server.log()}")
        probe = server.run("true", timeout=10)
        if probe.returncode == 0:
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd not usable after {timeout}s: {probe.stderr!r}\n{server.log()}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# Clients through the gateway
# --------------------------------------------------------------------------------------------------

ASKPASS = """#!/bin/sh
printf '%s\\n' "$LICTOR_TEST_PASSWORD"
"""


@dataclass
class GatewayClient:
    """The real OpenSSH clients (``ssh``, ``scp``, ``sftp``) pointed at a gateway's SSH listener.

    The password (the agent's JWT) is given through ``SSH_ASKPASS`` with ``SSH_ASKPASS_REQUIRE=force``;
    the gateway's host key is pinned in ``known_hosts`` (``StrictHostKeyChecking=yes``).
    """

    host: str
    port: int
    known_hosts: Path
    askpass: Path

    @classmethod
    def create(cls, directory: Path, port: int, host_public_key: str, host: str = "127.0.0.1") -> GatewayClient:
        directory.mkdir(parents=True, exist_ok=True)
        known = directory / "gateway_known_hosts"
        known.write_text(f"[{host}]:{port} {host_public_key}\n")
        askpass = directory / "askpass.sh"
        askpass.write_text(ASKPASS)
        askpass.chmod(0o700)
        return cls(host, port, known, askpass)

    def options(self, *, password: bool = True, log_level: str = "ERROR") -> list[str]:
        opts = [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            f"LogLevel={log_level}",
            "-o",
            "ConnectTimeout=10",
        ]
        if password:
            opts += ["-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no"]
        return opts

    def env(self, token: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_AUTH_SOCK")}
        env["SSH_ASKPASS"] = str(self.askpass)
        env["SSH_ASKPASS_REQUIRE"] = "force"
        env["LICTOR_TEST_PASSWORD"] = token or ""
        return env

    def ssh_argv(
        self, command: str | None, *extra: str, user: str = "agent", password: bool = True, log_level: str = "ERROR"
    ) -> list[str]:
        opts = self.options(password=password, log_level=log_level)
        argv = ["ssh", *opts, "-p", str(self.port), *extra, f"{user}@{self.host}"]
        return [*argv, command] if command is not None else argv

    def ssh(
        self,
        token: str | None,
        command: str,
        *extra: str,
        input: bytes | None = None,
        user: str = "agent",
        password: bool = True,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ssh_argv(command, *extra, user=user, password=password),
            input=input if input is not None else b"",
            capture_output=True,
            env=self.env(token),
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def sftp(self, token: str, commands: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """Run sftp commands (one a line) read from stdin (``-b`` would forbid the password)."""
        return subprocess.run(
            ["sftp", *self.options(), "-P", str(self.port), f"agent@{self.host}"],
            input=commands.encode(),
            capture_output=True,
            env=self.env(token),
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def scp(self, token: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["scp", *self.options(), "-P", str(self.port), *args],
            capture_output=True,
            env=self.env(token),
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def remote(self, path: str | Path) -> str:
        return f"agent@{self.host}:{path}"

    def shell(
        self, token: str, command: str | None = None, *, rows: int = 24, cols: int = 80, stty: Sequence[str] = ()
    ) -> PtyProcess:
        """An interactive ``ssh -tt`` session (a shell, or ``command``) on a real pseudo-terminal, whose
        settings are first changed with ``stty`` arguments (ssh sends them to the server)."""
        return PtyProcess(self.ssh_argv(command, "-tt"), self.env(token), rows=rows, cols=cols, stty=stty)


class PtyProcess:
    """A process on its own pseudo-terminal, driven expect-style."""

    def __init__(
        self, argv: list[str], env: dict[str, str], rows: int = 24, cols: int = 80, stty: Sequence[str] = ()
    ) -> None:
        import fcntl
        import pty
        import termios

        self.master, slave = pty.openpty()
        self._winsize(slave, rows, cols)
        if stty:
            subprocess.run(["stty", *stty], stdin=slave, check=True)

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=controlling_tty,  # the child needs the pty as its controlling terminal (SIGWINCH)
        )
        os.close(slave)
        self.buffer = b""
        self.seen = b""

    @staticmethod
    def _winsize(fd: int, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size; the kernel sends SIGWINCH to ssh, which tells the server."""
        self._winsize(self.master, rows, cols)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 15) -> bytes:
        """Read until ``pattern`` (a regex) matches; return everything up to the end of the match."""
        import re
        import select

        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.buffer)
            if match:
                out, self.buffer = self.buffer[: match.end()], self.buffer[match.end() :]
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pattern!r} not seen; got {self.buffer[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            if not data:
                raise EOFError(f"{pattern!r} not seen before the end; got {self.buffer[-2000:]!r}")
            self.buffer += data
            self.seen += data

    def wait(self, timeout: float = 15) -> int:
        """Wait for the process, draining its output; returns the exit status."""
        import select

        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    data = b""
                self.buffer += data
                self.seen += data
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.master)
