"""Shared test fixtures: real gateway processes, free ports, tokens, and the CI rule.

Real-server tests must fail, not skip, when ``CI`` is set: use :func:`require`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LICTOR = str(Path(sys.executable).parent / "lictor")
IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, why: str) -> None:
    """Skip a test whose real counterpart is missing — or fail it under CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for this test and missing under CI: {why}")
    pytest.skip(why)


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


def attach_strace(pid: int, *args: str) -> subprocess.Popen[bytes]:
    """strace with ``args`` on the running process ``pid``, returned once it has attached (it says so on stderr)."""
    tracer = subprocess.Popen([require_binary("strace"), "-p", str(pid), *args], stderr=subprocess.PIPE)
    assert tracer.stderr is not None
    said = tracer.stderr.readline()
    if b"attached" not in said:
        tracer.kill()
        tracer.wait()
        require(False, f"strace cannot attach to process {pid}: {said.decode(errors='replace').strip()}")
    return tracer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; fail, naming ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to 127.0.0.1:``port`` that send nothing (as a flood that never logs in would),
    closed on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def lictor(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the real ``lictor`` command line."""
    proc = subprocess.run([LICTOR, *args], capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"lictor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class GatewayProcess:
    """A real ``lictor run`` process with its own state directory."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "lictor.yaml"
        self.config = config
        self.config.setdefault("version", 1)
        self.config.setdefault("state_dir", str(workdir / "state"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "gateway.log"

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.write_config()
        ready = self.workdir / "ready"
        ready.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [LICTOR, "run", "-c", str(self.config_path), "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"gateway not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def token(self, sub: str, ttl: str = "1h", **claims: str) -> str:
        args = ["token", "issue", "--state-dir", str(self.state_dir), "--sub", sub, "--ttl", ttl]
        for k, v in claims.items():
            args += ["--claim", f"{k}={v}"]
        return lictor(*args).stdout.strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Build and start real gateway processes; all are stopped at teardown."""
    started: list[GatewayProcess] = []

    def make(config: dict[str, Any], start: bool = True, name: str = "gw") -> GatewayProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        gw = GatewayProcess(workdir, config)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()
