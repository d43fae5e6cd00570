"""pgbench -S through Lictor, directly, and through pgbouncer (session mode), in the same run.

    .venv/bin/python bench/bench_postgres.py [--seconds 10] [--clients 8] [--role writer] [--modes simple,prepared]

Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust), pgbench and pgbouncer (run as an unprivileged
user when this runs as root). Lictor runs as a real ``lictor run`` process with the example rule pack
(examples/postgres/rulepacks) and its token for ``--role`` (``writer``: decisions, audit and recording but no
masking; ``readonly``: every row goes through the card and email detectors).

For each mode it prints TPS and the ratios against direct and pgbouncer, the p50/p99 latency per
transaction (from pgbench's per-transaction log) and the latency each proxy adds to direct, and the CPU the
proxy used per transaction (its process and children: for Lictor that includes the audit and recording
pipeline, whose drain is a child process). Nothing here is a pass/fail assertion.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._proc import cpu_seconds  # noqa: E402
from tests.conftest import free_port, wait_port  # noqa: E402

LICTOR = str(Path(sys.executable).parent / "lictor")
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def psql(sql: str, db: str = "postgres") -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-h", PG["host"], "-U", PG["user"], "-d", db, "-c", sql], check=True, capture_output=True
    )


def start_pgbouncer(work: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    bdir = work / "pgbouncer"
    bdir.mkdir()
    (bdir / "users.txt").write_text('"postgres" ""\n')
    (bdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={PG["host"]} port={PG["port"]}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = trust
auth_file = {bdir}/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
unix_socket_dir =
logfile = {bdir}/pgbouncer.log
"""
    )
    command = [binary, str(bdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        user = pwd.getpwnam("nobody")
        for p in (work, bdir, *bdir.iterdir()):
            os.chown(p, user.pw_uid, user.pw_gid)
        command = ["runuser", "-u", "nobody", "--", *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def real_pid(proc: subprocess.Popen[bytes]) -> int:
    """The pgbouncer process itself (``runuser`` keeps running as its parent)."""
    if os.geteuid() != 0:
        return proc.pid
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return int(children[0]) if children else proc.pid


# For --diagnose only: the same gateway with the recorder's audit and session writes replaced by no-ops.
STUBBED = """
import sys
from lictor.recorder import _recorder
_recorder.SessionRecorder.audit = lambda self, kind, event, **kw: None
_recorder.SessionRecorder.event = lambda self, session, kind, data, **kw: None
from lictor.cli import main
sys.exit(main(sys.argv[1:]))
"""


# For --diagnose only: the cheapest relay Python can be (uvloop, protocol callbacks, bytes passed through
# untouched: no parsing, no policy, no audit). What Lictor does per statement comes on top of this.
BARE_RELAY = """
import asyncio, sys, uvloop
UP = (sys.argv[2], int(sys.argv[3]))
class Side(asyncio.Protocol):
    def __init__(self, peer=None):
        self.peer, self.transport, self.early = peer, None, []
    def connection_made(self, transport):
        self.transport = transport
        if self.peer is None:
            asyncio.ensure_future(self.connect())
    async def connect(self):
        _, up = await asyncio.get_running_loop().create_connection(lambda: Side(self), *UP)
        self.peer = up
        if self.early:
            up.transport.write(b"".join(self.early))
    def data_received(self, data):
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)
    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Side, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


def start_bare_relay(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", BARE_RELAY, str(port), PG["host"], str(PG["port"])])
    wait_port(port)
    return proc


def start_lictor(work: Path, port: int, db: str, stubbed: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    work = work / ("lictor-stubbed" if stubbed else "lictor")
    work.mkdir()
    state = work / "lictor-state"
    config = {
        "version": 1,
        "state_dir": str(state),
        "log": {"level": "warning"},
        "identity": {"issuers": [{"type": "lictor"}]},
        "rulepacks": [str(ROOT / "examples" / "postgres" / "rulepacks")],
        "targets": {
            "app": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{port}",
                "upstream": {**PG, "database": db, "sslmode": "disable"},
                "read_only_roles": ["pg-readonly"],
            }
        },
    }
    path = work / "lictor.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = work / "lictor.ready"
    command = [sys.executable, "-c", STUBBED] if stubbed else [LICTOR]
    proc = subprocess.Popen(
        [*command, "run", "-c", str(path), "--ready-file", str(ready)],
        stdout=open(work / "lictor.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("lictor did not start:\n" + (work / "lictor.log").read_text())
        time.sleep(0.05)
    return proc, state


def run_pgbench(
    work: Path, label: str, port: int, db: str, mode: str, seconds: int, clients: int, password: str | None
) -> tuple[float, list[float]]:
    logdir = work / f"log-{label}-{mode}"
    logdir.mkdir()
    env = {**os.environ, "PGSSLMODE": "disable"}
    user = "postgres"
    if password is not None:
        env["PGPASSWORD"] = password
        user = "bench"
    proc = subprocess.run(
        [
            "pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
            "-l", "--log-prefix", str(logdir / "tx"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=logdir,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"pgbench via {label} failed:\n{proc.stdout}\n{proc.stderr}")
    tps = next(float(line.split("=")[1].split()[0]) for line in proc.stdout.splitlines() if line.startswith("tps"))
    latencies: list[float] = []
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000.0)  # microseconds -> ms
    return tps, latencies


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--role", default="writer", help="token role for Lictor (writer: no masking; readonly: masked)")
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also run a second Lictor whose audit and recording writes are stubbed out, and a bare Python "
        "relay (diagnosis only: what the relay itself costs, and the ceiling for any Python proxy)",
    )
    args = ap.parse_args()
    for tool, path in (("psql", None), ("pgbench", None), ("pgbouncer", "/usr/sbin/pgbouncer")):
        if not shutil.which(tool) and not (path and os.access(path, os.X_OK)):
            raise SystemExit(f"{tool} is not installed (`make bench`, or scripts/ensure-system.sh bench, installs it)")
    work = Path(tempfile.mkdtemp(prefix="lictor-bench-pg-"))
    os.chmod(work, 0o755)
    db = f"lictor_bench_{secrets.token_hex(4)}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        psql(f"CREATE DATABASE {db}")
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(args.scale), "-h", PG["host"], "-U", PG["user"], db],
            check=True,
            capture_output=True,
        )
        bouncer_port, lictor_port = free_port(), free_port()
        bouncer = start_pgbouncer(work, bouncer_port)
        procs.append(bouncer)
        gateway, state = start_lictor(work, lictor_port, db)
        procs.append(gateway)
        token = subprocess.run(
            [LICTOR, "token", "issue", "--state-dir", str(state), "--sub", "bench", "--claim", f"role={args.role}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        bouncer_pid = real_pid(bouncer)
        targets = [
            ("direct", PG["port"], None, None),
            ("pgbouncer", bouncer_port, None, bouncer_pid),
            ("lictor", lictor_port, token, gateway.pid),
        ]
        if args.diagnose:
            stub_port = free_port()
            stubbed, stub_state = start_lictor(work, stub_port, db, stubbed=True)
            procs.append(stubbed)
            stub_token = subprocess.run(
                [
                    LICTOR,
                    "token",
                    "issue",
                    "--state-dir",
                    str(stub_state),
                    "--sub",
                    "bench",
                    "--claim",
                    f"role={args.role}",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            targets.append(("lictor-nr", stub_port, stub_token, stubbed.pid))
            bare_port = free_port()
            bare = start_bare_relay(bare_port)
            procs.append(bare)
            targets.append(("bare-relay", bare_port, None, bare.pid))
        print(
            f"pgbench -S, {args.clients} clients, {args.seconds} s per run, scale {args.scale}; "
            f"Lictor role {args.role!r} with the example rule pack; {os.cpu_count()} CPUs"
        )
        header = (
            f"{'mode':9} {'via':10} {'TPS':>9} {'vs direct':>9} {'vs pgb':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'proxy CPU/tx':>12}"
        )
        print(header)
        print("-" * len(header))
        for mode in args.modes.split(","):
            results: dict[str, tuple[float, float, float]] = {}
            for label, port, password, pid in targets:
                before = cpu_seconds(pid) if pid else 0.0
                tps, lat = run_pgbench(work, label, port, db, mode, args.seconds, args.clients, password)
                used = (cpu_seconds(pid) - before) if pid else 0.0
                p50, p99 = pct(lat, 50), pct(lat, 99)
                results[label] = (tps, p50, p99)
                d_tps, d50, d99 = results["direct"]
                b_tps = results.get("pgbouncer", (float("nan"),))[0]
                cpu = f"{used / max(len(lat), 1) * 1e6:9.1f} µs" if pid else ""
                vs_bouncer = tps / b_tps if label != "direct" else float("nan")
                print(
                    f"{mode:9} {label:10} {tps:9.0f} {tps / d_tps:9.2f} {vs_bouncer:7.2f} "
                    f"{p50:7.3f} {p99:7.3f} {p50 - d50:8.3f} {p99 - d99:8.3f} {cpu:>12}"
                )
            tps_l, tps_b = results["lictor"][0], results["pgbouncer"][0]
            print(f"{mode:9} Lictor / pgbouncer TPS ratio: {tps_l / tps_b:.2f}\n")
        if args.diagnose:
            print("lictor-nr: the same gateway with audit and recording writes stubbed out (diagnosis only)")
            print("bare-relay: a minimal uvloop TCP relay in Python, no parsing or policy (the ceiling for Python)")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        try:
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
