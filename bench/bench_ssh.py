"""SSH through Lictor against SSH straight to the target, measured in the same run.

Run: .venv/bin/python bench/bench_ssh.py [--runs 30] [--megabytes 100]

Starts a real OpenSSH sshd on a free port (tests/sshd.py) and a real ``lictor run`` gateway in
front of it, then measures with the real OpenSSH client:

* exec round trip, new connection each time (``ssh HOST true``, what a script or an agent does):
  median wall time direct and through the gateway, and the difference;
* exec round trip on an open connection (asyncssh client, one connection, ``true`` N times): the
  cost the gateway adds per command (analysis, decision, audit, recording, upstream channel);
* bulk throughput: ``cat`` of a random file of ``--megabytes`` MB to /dev/null, direct and
  through the gateway, and their ratio (the output is also checked byte for byte by sha256).

Goals: at most 20 ms added per exec, at least 0.5x direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.sshd import GatewayClient, Sshd, ssh_keygen, start_sshd  # noqa: E402

LICTOR = str(Path(sys.executable).parent / "lictor")

PACK = """format: lictor/v1
metadata: {name: bench-ssh, owner: bench}
identities:
  - match: {claims: {role: bench}}
    roles: [bench]
roles:
  bench:
    rules:
      - id: bench-exec
        protocol: ssh
        when: {channels: [exec], programs: ["*"]}
        action: allow
      - id: bench-no-root-wipe
        protocol: ssh
        when: {commands: ["rm -rf /"]}
        action: deny
"""


def start_gateway(workdir: Path, sshd: Sshd) -> tuple[subprocess.Popen[bytes], int, Path, str]:
    (workdir / "packs").mkdir(parents=True)
    (workdir / "packs" / "bench.yaml").write_text(PACK)
    host_key = ssh_keygen(workdir / "gateway_host_key", "gateway")
    port = free_port()
    config = {
        "version": 1,
        "state_dir": str(workdir / "state"),
        "rulepacks": [str(workdir / "packs")],
        "targets": {
            "bench": {
                "protocol": "ssh",
                "listen": f"127.0.0.1:{port}",
                "host_key": str(host_key),
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
    (workdir / "lictor.yaml").write_text(yaml.safe_dump(config))
    ready = workdir / "ready"
    log = (workdir / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [LICTOR, "run", "-c", str(workdir / "lictor.yaml"), "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not start:\n{(workdir / 'gateway.log').read_text()}")
        time.sleep(0.05)
    token = subprocess.run(
        [LICTOR, "token", "issue", "--state-dir", str(workdir / "state"), "--sub", "bench", "--claim", "role=bench"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    host_public = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    return proc, port, workdir / "client", host_public + "\n" + token


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=False, start_new_session=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return elapsed


async def multiplexed(host: str, port: int, runs: int, **auth: Any) -> float:
    import asyncssh

    async with asyncssh.connect(host, port, config=None, agent_path=None, **auth) as conn:
        await conn.run("true", check=True)  # warm up (the gateway's upstream connection too)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            await conn.run("true", check=True)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def throughput(argv: list[str], env: dict[str, str] | None, size: int) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdout is not None
    digest = hashlib.sha256()
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    proc.wait()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or total != size:
        raise SystemExit(f"{argv}: status {proc.returncode}, {total} bytes: {proc.stderr.read()!r}")  # type: ignore[union-attr]
    return elapsed, digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    size = args.megabytes * 1_000_000

    tmp = Path(tempfile.mkdtemp(prefix="lictor-bench-ssh-"))
    sshd = start_sshd(tmp / "sshd")
    gateway = None
    try:
        gateway, port, client_dir, extra = start_gateway(tmp / "gw", sshd)
        host_public, token = extra.split("\n")
        client = GatewayClient.create(client_dir, port, host_public)
        env = client.env(token)
        bulk = f"{sshd.work}/bulk.bin"
        assert sshd.run(f"head -c {size} /dev/urandom > {bulk}").returncode == 0

        direct_exec = sshd.ssh_args()
        gw_exec = client.ssh_argv(None)
        for _ in range(3):  # warm up both paths
            timed([*direct_exec, "true"])
            timed([*gw_exec, "true"], env)
        direct_new, gw_new = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            direct_new.append(timed([*direct_exec, "true"]))
            gw_new.append(timed([*gw_exec, "true"], env))

        known = str(client.known_hosts)
        direct_mux = asyncio.run(
            multiplexed(
                sshd.host, sshd.port, args.runs, username=sshd.user, client_keys=[str(sshd.client_key)],
                known_hosts=str(sshd.known_hosts),
            )
        )  # fmt: skip
        gw_mux = asyncio.run(
            multiplexed(
                "127.0.0.1", port, args.runs, username="agent", password=token, client_keys=None, known_hosts=known
            )
        )

        direct_bulk, direct_hash = throughput([*direct_exec, f"cat {bulk}"], None, size)
        gw_bulk, gw_hash = throughput([*gw_exec, f"cat {bulk}"], env, size)
        direct_bulk2, _ = throughput([*direct_exec, f"cat {bulk}"], None, size)
        gw_bulk2, gw_hash2 = throughput([*gw_exec, f"cat {bulk}"], env, size)
        direct_t, gw_t = min(direct_bulk, direct_bulk2), min(gw_bulk, gw_bulk2)
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=15)
        sshd.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    ms = 1000.0
    d_new, g_new = statistics.median(direct_new), statistics.median(gw_new)
    mb = size / 1e6
    print(f"exec round trip, new connection (median of {args.runs}, OpenSSH client `ssh HOST true`):")
    print(f"  direct  {d_new * ms:7.1f} ms")
    print(f"  lictor  {g_new * ms:7.1f} ms   added {(g_new - d_new) * ms:+.1f} ms")
    print(f"exec round trip on an open connection (median of {args.runs}, asyncssh client):")
    print(f"  direct  {direct_mux * ms:7.1f} ms")
    print(f"  lictor  {gw_mux * ms:7.1f} ms   added {(gw_mux - direct_mux) * ms:+.1f} ms")
    print(f"bulk: cat of {mb:.0f} MB to the OpenSSH client (best of 2):")
    print(f"  direct  {mb / direct_t:7.1f} MB/s")
    print(f"  lictor  {mb / gw_t:7.1f} MB/s   ratio {direct_t / gw_t:.2f}x direct")
    identical = direct_hash == gw_hash == gw_hash2
    print(f"  output byte-identical (sha256): {'yes' if identical else 'NO'}")
    added = max(g_new - d_new, gw_mux - direct_mux) * ms
    ok = added <= 20.0 and direct_t / gw_t >= 0.5 and identical
    print(f"goals (<= 20 ms added per exec, >= 0.5x throughput): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
