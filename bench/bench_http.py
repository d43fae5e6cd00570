"""HTTP throughput and latency: direct vs plain mitmproxy (reverse proxy, no addons) vs Lictor.

Lictor runs as a real ``lictor run`` process with JWT auth on every request, a 100-rule policy, masking
(e-mail and card detectors on a JSON response that contains both), the audit log and session recordings.
The baseline is mitmproxy itself: a ``Master`` with only the proxy server, next-layer and TLS addons,
started the standard way (``master.run()``) on uvloop like Lictor. All three are measured in the same run
with the same load generator (``wrk`` if installed, else a multi-process asyncio client) against the same
upstream, and the ratios are printed. Goal: Lictor >= 0.9x plain mitmproxy's throughput.

    .venv/bin/python bench/bench_http.py [--duration 10] [--connections 16] [--tls]

Not part of the test suite; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
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

from bench._proc import cpu_seconds  # noqa: E402
from tests.conftest import free_port, wait_port  # noqa: E402

LICTOR = str(Path(sys.executable).parent / "lictor")
BODY = json.dumps(
    {
        "id": "42",
        "name": "Jane Doe",
        "email": "jane.doe@example.com",
        "card": "4111 1111 1111 1111",
        "plan": "gold",
        "notes": "customer since 2019; prefers e-mail; " * 4,
    }
).encode()


# -- upstream: a minimal keep-alive HTTP/1.1 server (never the bottleneck) -----------------------------


class _Upstream(asyncio.Protocol):
    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if m:
                length = int(m.group(1))
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(self.RESPONSE)


def serve_upstream(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- plain mitmproxy -----------------------------------------------------------------------------------


def serve_plain_mitmproxy(port: int, upstream: str, confdir: str, tls: bool) -> None:
    import logging

    import uvloop
    from mitmproxy.addons import next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.options import Options

    logging.getLogger("mitmproxy").setLevel(logging.WARNING)

    async def main() -> None:
        opts = Options()
        master = Master(opts, with_termlog=False)
        master.addons.add(proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig())
        opts.update(
            mode=[f"reverse:{upstream}@127.0.0.1:{port}"],
            confdir=confdir,
            http2=False,
            http3=False,
            connection_strategy="lazy",
        )
        await master.run()

    uvloop.run(main())


# -- load -------------------------------------------------------------------------------------------------


def run_wrk(url: str, token: str, duration: int, connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    out = subprocess.run(
        [
            wrk,
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"load run had errors against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def lat(pct: str) -> float:
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m, out
        value = float(m.group(1))
        return value / 1000 if m.group(2) == "us" else value * 1000 if m.group(2) == "s" else value

    return {"rps": rps, "p50_ms": lat("50"), "p99_ms": lat("99")}


async def _client(url: str, token: str, until: float, latencies: list[float], verify: Any) -> int:
    import httpx

    n = 0
    async with httpx.AsyncClient(verify=verify, timeout=30) as client:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            resp = await client.get(url, headers={"Authorization": f"Bearer {token}"})
            if resp.status_code != 200:
                raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:200]}")
            latencies.append(time.perf_counter() - t0)
            n += 1
    return n


def _client_process(url: str, token: str, duration: float, connections: int, cafile: str | None) -> list[float]:
    import ssl

    verify: Any = ssl.create_default_context(cafile=cafile) if cafile else True
    latencies: list[float] = []
    until = time.perf_counter() + duration

    async def main() -> None:
        await asyncio.gather(*(_client(url, token, until, latencies, verify) for _ in range(connections)))

    asyncio.run(main())
    return latencies


def run_python_load(url: str, token: str, duration: int, connections: int, cafile: str | None) -> dict[str, float]:
    from concurrent.futures import ProcessPoolExecutor

    procs = 2
    with ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(_client_process, url, token, duration, max(1, connections // procs), cafile)
            for _ in range(procs)
        ]
        latencies = sorted(x for f in futures for x in f.result())
    return {
        "rps": len(latencies) / duration,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


# -- Lictor -------------------------------------------------------------------------------------------------


def rule_pack(n_rules: int) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for i in range(n_rules - 2):
        rules.append(
            {
                "id": f"r{i:03d}",
                "protocol": "http",
                "when": {"methods": ["GET", "POST"][i % 2 : i % 2 + 1], "paths": [f"/v{i % 7}/things{i}/{{id}}"]},
                "action": "allow" if i % 3 else "deny",
            }
        )
    rules.append(
        {
            "id": "customers",
            "protocol": "http",
            "when": {"methods": ["GET"], "paths": ["/v1/customers/{id}"]},
            "action": "allow",
        }
    )
    rules.append(
        {
            "id": "pii",
            "protocol": "http",
            "when": {"paths": ["/v1/customers/*"]},
            "action": "mask",
            "mask": {"detectors": ["email", "card"]},
        }
    )
    return {
        "format": "lictor/v1",
        "metadata": {"name": "bench", "owner": "bench"},
        "identities": [{"match": {"claims": {"role": "agent"}}, "roles": ["agent"]}],
        "roles": {"agent": {"rules": rules}},
    }


# For --diagnose only: the same gateway with the recorder's audit and session writes replaced by no-ops.
STUBBED = """
import sys
from lictor.recorder import _recorder
_recorder.SessionRecorder.audit = lambda self, kind, event, **kw: None
_recorder.SessionRecorder.event = lambda self, session, kind, data, **kw: None
from lictor.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_lictor(
    work: Path, name: str, port: int, upstream: str, args: argparse.Namespace, *, stubbed: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    """A ``lictor run`` process with the benchmark's policy; returns it and its state directory."""
    work = work / name
    (work / "packs").mkdir(parents=True)
    (work / "packs" / "bench.yaml").write_text(yaml.safe_dump(rule_pack(args.rules)))
    state = work / "state"
    config = {
        "version": 1,
        "state_dir": str(state),
        "log": {"level": "warning"},
        "rulepacks": ["packs"],
        "targets": {
            "api": {
                "protocol": "http",
                "listen": f"127.0.0.1:{port}",
                "upstream": upstream,
                "tls": {"enabled": args.tls},
                "credentials": {"bearer": "upstream-token"},
            }
        },
    }
    (work / "lictor.yaml").write_text(yaml.safe_dump(config))
    ready = work / "ready"
    command = [sys.executable, "-c", STUBBED] if stubbed else [LICTOR]
    with (work / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [*command, "run", "-c", str(work / "lictor.yaml"), "--ready-file", str(ready)], stdout=log, stderr=log
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / "gateway.log").read_text())
        time.sleep(0.1)
    return proc, state


def issue_token(state: Path) -> str:
    command = [LICTOR, "token", "issue", "--state-dir", str(state), "--sub", "bench-agent", "--claim", "role=agent"]
    return subprocess.run([*command, "--ttl", "2h"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds of load per target, split into rounds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rules", type=int, default=100)
    ap.add_argument("--tls", action="store_true", help="TLS between the load generator and the proxies")
    ap.add_argument(
        "--python-load", action="store_true", help="use the asyncio/httpx load generator even if wrk exists"
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also measure a gateway whose audit and recording writes are no-ops (where does the time go?)",
    )
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-plain", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.serve_plain:
        port, upstream, confdir, tls = args.serve_plain
        serve_plain_mitmproxy(int(port), upstream, confdir, tls == "1")
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, plain_port, lictor_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port)]))
        wait_port(up_port, timeout=20)

        lictor_proc, lictor_state = start_lictor(work, "lictor", lictor_port, upstream, args, stubbed=False)
        procs.append(lictor_proc)
        stubbed_port = free_port()
        if args.diagnose:
            stubbed_proc, stubbed_state = start_lictor(
                work, "lictor-stubbed", stubbed_port, upstream, args, stubbed=True
            )
            procs.append(stubbed_proc)
        confdir = str(lictor_state / "tls")
        plain_proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-plain",
                str(plain_port),
                upstream,
                confdir,
                "1" if args.tls else "0",
            ]
        )
        procs.append(plain_proc)
        wait_port(plain_port, timeout=20)
        token = issue_token(lictor_state)
        tokens = {"lictor-stubbed": issue_token(stubbed_state)} if args.diagnose else {}
        scheme = "https" if args.tls else "http"
        path = "/v1/customers/42"
        targets = {
            "direct": f"{upstream}{path}",
            "mitmproxy": f"{scheme}://127.0.0.1:{plain_port}{path}",
            "lictor": f"{scheme}://127.0.0.1:{lictor_port}{path}",
        }
        if args.diagnose:
            targets["lictor-stubbed"] = f"{scheme}://127.0.0.1:{stubbed_port}{path}"
        cafile = str(lictor_state / "tls" / "ca.crt") if args.tls else None
        use_wrk = shutil.which("wrk") is not None and not args.python_load
        generator = "wrk" if use_wrk else "asyncio/httpx (2 processes)"

        import httpx

        check = httpx.get(targets["lictor"], headers={"Authorization": f"Bearer {token}"}, verify=cafile or True)
        assert check.status_code == 200 and "[REDACTED:email]" in check.text, check.text

        pids = {"mitmproxy": plain_proc.pid, "lictor": lictor_proc.pid}
        if args.diagnose:
            pids["lictor-stubbed"] = stubbed_proc.pid

        def load(name: str, seconds: int) -> dict[str, float]:
            url, tok = targets[name], tokens.get(name, token)
            before = cpu_seconds(pids[name]) if name in pids else 0.0
            if use_wrk:
                result = run_wrk(url, tok, seconds, args.connections)
            else:
                result = run_python_load(url, tok, seconds, args.connections, cafile)
            used = cpu_seconds(pids[name]) - before if name in pids else 0.0
            result["cpu_us"] = used / max(result["rps"] * seconds, 1) * 1e6
            return result

        for name in targets:
            load(name, 2)  # warm-up
        # Interleaved rounds: a burst of other load on the machine hits all three alike.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        per_round = max(2, args.duration // args.rounds)
        for _ in range(args.rounds):
            for name in targets:
                rounds[name].append(load(name, per_round))
        results = {
            name: {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms", "cpu_us")}
            for name, runs in rounds.items()
        }

        print(
            f"HTTP GET {path} ({len(BODY)} B JSON), {args.connections} connections, {args.rounds} interleaved rounds "
            f"of {per_round}s per target (median), load: {generator}"
        )
        tls = ", TLS" if args.tls else ""
        print(f"Lictor: JWT on every request, {args.rules} rules, e-mail/card masking, audit + recording{tls}")
        print(f"{'':16}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'proxy CPU/req':>15}")
        for name, r in results.items():
            cpu = f"{r['cpu_us']:>12.0f} µs" if name in pids else ""
            print(f"{name:16}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{cpu:>15}")
        ratio = results["lictor"]["rps"] / results["mitmproxy"]["rps"]
        print(f"lictor / plain mitmproxy throughput: {ratio:.2f}x (goal >= 0.90x)")
        lictor_r, plain_r, direct_r = results["lictor"], results["mitmproxy"], results["direct"]
        print(f"lictor / direct throughput:          {lictor_r['rps'] / direct_r['rps']:.2f}x")
        print(f"added p50 latency vs mitmproxy:      {lictor_r['p50_ms'] - plain_r['p50_ms']:+.2f} ms")
        if args.diagnose:
            stub_ratio = results["lictor-stubbed"]["rps"] / plain_r["rps"]
            print(f"diagnosis: without audit/recording writes, lictor / plain mitmproxy = {stub_ratio:.2f}x")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
