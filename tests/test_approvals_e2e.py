"""Approvals end to end: a real ``lictor run`` process holds an agent's command (through the line
protocol test addon, loaded from the config's ``addons:`` list) until an approver decides with
``lictor approvals`` or on the web page in headless Chromium (driven over the DevTools protocol,
with page scripts disabled: the page must work without JavaScript).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import os
import pty
import re
import select
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import LICTOR, ROOT, free_port, idle_connections, lictor, require, wait_port, wait_until
from tests.test_approvals import Agent, Receiver, make_gateway, sql

CHROMIUM = "/usr/bin/chromium"

PACK = """
format: lictor/v1
metadata: {name: lines-approvals}
identities:
  - match: {claims: {role: agent}}
    roles: [agent]
  - match: {claims: {role: dba}}
    roles: [dba]
roles:
  agent:
    rules:
      - id: line-get
        protocol: line
        when: {verbs: [get]}
        action: allow
      - id: restart-needs-approval
        protocol: line
        when: {verbs: [restart]}
        action: approve
        message: restarts need an on-call approval
        approval: {approvers: [dba], timeout: 60s}
  dba:
    rules: []
"""


class LineAgent:
    """An agent on the line protocol: ``AUTH``, then one command per line."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rwb")
        self.send(f"AUTH {token}")
        assert self.recv() == "READY"

    def send(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        self.file.flush()

    def recv(self) -> str:
        return self.file.readline().decode().strip()

    def held(self, command: str) -> tuple[str, str]:
        """Send ``command``; it must be held: returns (approval id, the notice)."""
        self.send(command)
        notice = self.recv()
        m = re.match(r"WAIT (ap-[0-9a-f]{10}) (.*)", notice)
        assert m, notice
        return m.group(1), m.group(2)

    def close(self) -> None:
        self.sock.close()


def start_approvals_gateway(
    gateway_factory: Any, tmp_path: Path, pack: str = PACK, more_packs: dict[str, str] | None = None, **approvals: Any
) -> Any:
    """A gateway with the line-protocol test target and the approvals API (``approvals`` added to its section)."""
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "lines.yaml").write_text(pack)
    for name, text in (more_packs or {}).items():
        (packs / name).write_text(text)
    line_port, api_port = free_port(), free_port()
    gw = gateway_factory(
        {
            "rulepacks": [str(packs)],
            "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
            "targets": {"lines": {"protocol": "line", "listen": f"127.0.0.1:{line_port}"}},
            "approvals": {"listen": f"127.0.0.1:{api_port}", **approvals},
        }
    )
    wait_port(line_port)
    wait_port(api_port)
    gw.line_port = line_port
    gw.url = f"http://127.0.0.1:{api_port}"
    return gw


@pytest.fixture
def approvals_gateway(gateway_factory: Any, tmp_path: Path) -> Any:
    return start_approvals_gateway(gateway_factory, tmp_path)


def audit_kinds(gw: Any) -> list[str]:
    out = lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir)).stdout
    return [json.loads(line)["kind"] for line in out.splitlines() if line.strip()]


def test_cli_lists_shows_approves_and_denies_held_commands(approvals_gateway: Any) -> None:
    gw = approvals_gateway
    dba = gw.token("dba-1", role="dba")
    agent_token = gw.token("agent-1", role="agent,dba")  # the agent also holds the approver role
    agent = LineAgent(gw.line_port, agent_token)
    agent.send("get status")
    assert agent.recv().startswith("OK line-get")

    aid, notice = agent.held("restart api #reason: deploy the fix for INC-7")
    assert notice.startswith(f"waiting for approval {aid}: restarts need an on-call approval")
    assert f"{gw.url}/approvals/{aid}" in notice and f"lictor approvals approve {aid} --url {gw.url}`" in notice

    listed = lictor("approvals", "list", "--url", gw.url, "--token", dba).stdout
    (row,) = [line for line in listed.splitlines() if line.startswith(aid)]
    assert "agent-1" in row and "restart-needs-approval" in row and "0/1" in row and "restart api" in row

    shown = lictor("approvals", "show", aid, "-c", str(gw.config_path), env={**os.environ, "LICTOR_TOKEN": dba})
    assert "agent's reason:  deploy the fix for INC-7" in shown.stdout
    assert "status:          pending" in shown.stdout and "  restart api" in shown.stdout

    own = lictor("approvals", "approve", aid, "--url", gw.url, "--token", agent_token, check=False)
    assert own.returncode == 1 and "you cannot decide your own request" in own.stderr
    no_token = lictor("approvals", "list", "--url", gw.url, check=False, env={**os.environ, "LICTOR_TOKEN": ""})
    assert no_token.returncode == 2 and "no token" in no_token.stderr

    approved = lictor("approvals", "approve", aid, "--url", gw.url, "--token", dba, "--reason", "on call ok")
    assert approved.stdout.strip() == f"{aid} is now approved"
    assert agent.recv().startswith("OK restart-needs-approval ")

    aid2, _ = agent.held("restart db")
    denied = lictor("approvals", "deny", aid2, "--url", gw.url, "--token", dba, "--reason", "not during peak")
    assert denied.stdout.strip() == f"{aid2} is now denied"
    assert agent.recv() == f"DENIED restart-needs-approval: approval {aid2} was denied by dba-1: not during peak"
    again = lictor("approvals", "approve", aid2, "--url", gw.url, "--token", dba, check=False)
    assert again.returncode == 1 and f"approval {aid2} is already denied" in again.stderr

    history = lictor("approvals", "list", "--decided", "--url", gw.url, "--token", dba).stdout
    assert f"{aid}" in history and "used" in history and f"{aid2}" in history and "denied" in history
    agent.close()
    kinds = audit_kinds(gw)
    assert kinds.count("approval.created") == 2 and kinds.count("approval.decided") == 2
    assert "approval.refused" in kinds and "approval.used" in kinds


def test_listing_with_a_token_that_may_approve_nothing_is_refused_not_answered_empty(approvals_gateway: Any) -> None:
    """An agent's token in LICTOR_TOKEN by mistake: "no pending approval requests" would say nothing waits."""
    gw = approvals_gateway
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    aid, _ = agent.held("restart api")
    other = gw.token("agent-2", role="agent")
    listed = lictor("approvals", "list", "--url", gw.url, "--token", other, check=False)
    assert listed.returncode == 1, listed.stdout
    assert "gateway refused (403): agent-2 is authenticated but none of its roles may approve anything" in listed.stderr
    dba = lictor("approvals", "list", "--url", gw.url, "--token", gw.token("dba-1", role="dba")).stdout
    assert aid in dba  # an approver still sees it
    agent.close()
    deadline = time.monotonic() + 10  # the audit log is a batch behind the spool
    while True:
        out = lictor("audit", "list", "--json", "--kind", "approvals.login_refused", "--state-dir", str(gw.state_dir))
        refused = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e["via"], e["identity"]["sub"]) for e in refused] == [("api", "agent-2")]


def test_requests_that_ended_longer_than_the_retention_ago_leave_the_store_not_the_audit_log(
    approvals_gateway: Any,
) -> None:
    gw = approvals_gateway
    dba = gw.token("dba-1", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    old, _ = agent.held("restart api")
    lictor("approvals", "deny", old, "--url", gw.url, "--token", dba, "--reason", "not during peak")
    assert agent.recv().startswith("DENIED ")
    recent, _ = agent.held("restart db")
    lictor("approvals", "deny", recent, "--url", gw.url, "--token", dba, "--reason", "later")
    assert agent.recv().startswith("DENIED ")
    agent.close()
    gw.stop()
    forty_days = 40 * 86400.0  # pass for the first request: its times move back
    with contextlib.closing(sqlite3.connect(gw.state_dir / "approvals.db")) as db, db:
        db.execute(
            "UPDATE approvals SET created_at = created_at - ?, expires_at = expires_at - ?, "
            "decided_at = decided_at - ? WHERE id = ?",
            (forty_days, forty_days, forty_days, old),
        )
    gw.start()  # the first pruning pass runs as the gateway starts (default retention: 30d)
    wait_until(lambda: "approvals: removed 1 request(s) that ended more than 30d ago" in gw.log(), 20, "pruning")

    gone = f"not found: no approval request {old} that you may decide (requests that ended are removed from the store "
    shown = lictor("approvals", "show", old, "--url", gw.url, "--token", dba, check=False)
    assert shown.returncode == 1 and gone in shown.stderr and "the audit log keeps their decisions" in shown.stderr
    approve = lictor("approvals", "approve", old, "--yes", "--url", gw.url, "--token", dba, check=False)
    assert approve.returncode == 1 and f"not found: no approval request {old} (" in approve.stderr
    history = lictor("approvals", "list", "--decided", "--url", gw.url, "--token", dba).stdout
    assert recent in history and old not in history
    kept = json.loads(lictor("approvals", "show", recent, "--json", "--url", gw.url, "--token", dba).stdout)
    assert kept["status"] == "denied" and kept["decision_reason"] == "later"

    # the audit log still holds who asked for what, and who decided what, and why
    out = lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir)).stdout
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    about = {e["kind"]: e for e in events if e.get("id") == old}
    assert about["approval.created"]["request"]["summary"] == "restart api"
    assert about["approval.created"]["requester"]["sub"] == "agent-1"
    assert about["approval.voted"]["approver"]["sub"] == "dba-1" and about["approval.voted"]["verdict"] == "deny"
    assert about["approval.decided"]["status"] == "denied" and about["approval.decided"]["reason"] == "not during peak"
    (pruned,) = [e for e in events if e["kind"] == "approval.pruned"]
    assert pruned["ids"] == [old] and pruned["retention"] == 30 * 86400


def test_a_request_approved_after_the_agents_token_expired_does_not_run(approvals_gateway: Any) -> None:
    """A connection does not outlive its token, not even through a request it asked for before."""
    gw = approvals_gateway
    dba = gw.token("dba-1", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-short", ttl="2s", role="agent"))
    aid, _ = agent.held("restart api")
    time.sleep(3)  # the token has expired while the request waits
    approved = lictor("approvals", "approve", aid, "--url", gw.url, "--token", dba)
    assert approved.stdout.strip() == f"{aid} is now approved"
    answer = agent.recv()
    assert answer.startswith("DENIED lictor:token-expired: ") and "your token has expired" in answer, answer
    agent.close()
    shown = json.loads(lictor("approvals", "show", aid, "--json", "--url", gw.url, "--token", dba).stdout)
    assert shown["status"] == "withdrawn" and "lictor:token-expired" in shown["decision_reason"]


def test_what_an_agent_sends_cannot_forge_lines_of_the_gateway_log(approvals_gateway: Any) -> None:
    gw = approvals_gateway
    forged = "2030-01-01 00:00:00,000 INFO lictor.approvals: approval ap-0000000000 approved by alice"
    agent = LineAgent(gw.line_port, gw.token(f"agent-1\n{forged}", role="agent"))
    aid, _ = agent.held("restart api\r" + forged.replace("alice", "bob"))
    lictor("approvals", "deny", aid, "--url", gw.url, "--token", gw.token("dba-1", role="dba"), "--reason", "no")
    assert agent.recv().startswith("DENIED ")
    agent.close()
    log = gw.log()
    assert f"approval {aid} requested by agent-1" in log and "\r" not in log and "\x1b" not in log
    assert not [line for line in log.splitlines() if line.startswith("2030-")], log


def test_failed_authentications_on_the_approvals_api_are_audited(approvals_gateway: Any) -> None:
    gw = approvals_gateway
    other = gw.workdir / "other-issuer"  # a key this gateway does not trust
    forged = lictor("token", "issue", "--state-dir", str(other), "--sub", "dba-1", "--claim", "role=dba").stdout.strip()
    for token in (forged, "not-a-token"):
        result = lictor("approvals", "list", "--url", gw.url, "--token", token, check=False)
        assert result.returncode == 1 and "gateway refused (401): authentication failed" in result.stderr
        # the address is named: with two gateways on one machine, the token may be for the other one
        assert f"approvals API at {gw.url}; is that the gateway whose approver token this is?" in result.stderr
    deadline = time.monotonic() + 10  # the audit log is a batch behind the spool
    while True:
        out = lictor("audit", "list", "--json", "--kind", "approvals.login_failed", "--state-dir", str(gw.state_dir))
        failed = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if len(failed) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e["via"], e["reason"].split(":")[0]) for e in failed] == [
        ("api", "token signature does not verify (Signature verification failed)"),
        ("api", "no valid JWT presented"),
    ]
    assert forged not in out.stdout


def test_the_api_reads_any_limit_it_is_given(approvals_gateway: Any) -> None:
    gw = approvals_gateway
    dba = gw.token("dba-1", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    aid, _ = agent.held("restart api")
    for limit in ("9" * 5000, "%C2%B2", "0", "00000000000000000000007", "abc", ""):
        req = urllib.request.Request(
            f"{gw.url}/api/approvals?limit={limit}", headers={"Authorization": f"Bearer {dba}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert [a["id"] for a in json.loads(resp.read())["approvals"]] == [aid], limit
    agent.close()
    for length, status in (("\u00b2", b"400"), ("9" * 5000, b"413")):
        with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(
                f"POST /api/approvals/{aid}/approve HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode("latin-1")
            )
            assert sock.makefile("rb").readline().split(b" ")[1] == status, length


def test_the_api_answers_its_errors_in_json_as_documented(approvals_gateway: Any) -> None:
    # docs/approvals.md: errors are {"error": "..."}. Those the HTTP server answers itself (a body that is not JSON,
    # a path or method the API does not have) came as text, which a client parsing the API's JSON choked on.
    gw = approvals_gateway
    dba = {"Authorization": f"Bearer {gw.token('dba-1', role='dba')}"}
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    aid, _ = agent.held("restart api")
    with httpx.Client(base_url=gw.url, timeout=10, headers=dba) as api:
        answers = [
            api.post(f"/api/approvals/{aid}/approve", content=b"reason=ok", headers={"Content-Type": "text/plain"}),
            api.post(
                f"/api/approvals/{aid}/approve", content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            api.get("/api/nothing-here"),
            api.delete(f"/api/approvals/{aid}"),
        ]
        page = api.get("/nothing-here")  # the page's own errors stay text
    assert [(r.status_code, r.headers["content-type"]) for r in answers] == [
        (415, "application/json"),
        (400, "application/json"),
        (404, "application/json"),
        (405, "application/json"),
    ]
    assert [r.json() for r in answers] == [
        {"error": "expected application/json"},
        {"error": "malformed JSON body"},
        {"error": "Not Found"},
        {"error": "Method Not Allowed"},
    ]
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/plain")
    lictor("approvals", "deny", aid, "--url", gw.url, "--token", gw.token("dba-1", role="dba"), "--reason", "no")
    assert agent.recv().startswith("DENIED ")
    agent.close()


def test_idle_connections_cannot_take_every_descriptor_of_the_gateway(approvals_gateway: Any) -> None:
    # Each connection that sends nothing is held until the read times out: enough of them took the descriptors
    # the gateway needs for its agents' connections and its files.
    from lictor.approvals.http import MAX_CONNECTIONS

    gw = approvals_gateway
    port = int(gw.url.rsplit(":", 1)[1])

    def status() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/approvals HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.makefile("rb").readline().split(b" ")[1]

    with idle_connections(port, MAX_CONNECTIONS):
        # the server accepts the idle ones in its own time; then one more gets 503
        wait_until(lambda: status() == b"503", 10, "a 503 for the connection past the limit")
    # served again (and refused for want of a token) once they are gone
    wait_until(lambda: status() == b"401", 10, "connections to be served again")


def test_a_token_that_just_expired_is_refused_at_the_page_login_with_a_reason(approvals_gateway: Any) -> None:
    """The clock leeway lets it verify, but the session would end before it begins: the approver would be
    sent back to an empty login form, with a successful login audited."""
    gw = approvals_gateway
    token = gw.token("dba-1", ttl="1s", role="dba")
    time.sleep(2)
    with httpx.Client(base_url=gw.url, timeout=10) as web:
        csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text)
        assert csrf
        login = web.post("/login", data={"csrf": csrf.group(1), "token": token})
    assert login.status_code == 401 and "login failed: token expired: get a fresh one" in login.text


def test_cli_given_the_link_to_a_page_says_what_url_it_takes(approvals_gateway: Any) -> None:
    """The agent's notice links to the page (URL/approvals/ID): given as --url, the CLI reaches HTML pages."""
    gw = approvals_gateway
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    aid, _ = agent.held("restart api")
    dba = gw.token("dba-1", role="dba")
    for args in (("list",), ("show", aid), ("approve", aid, "--yes")):
        page = f"{gw.url}/approvals" if args[0] == "list" else f"{gw.url}/approvals/{aid}"
        result = lictor("approvals", *args, "--url", page, "--token", dba, check=False)
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert "--url takes the address the gateway's approvals.listen serves" in result.stderr, result.stderr
    listed = lictor("approvals", "list", "--url", gw.url, "--token", dba).stdout
    assert aid in listed  # nothing was decided
    agent.close()


def test_cli_explains_a_gateway_without_an_approvals_listener(tmp_path: Path) -> None:
    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\n")
    result = lictor("approvals", "list", "-c", str(config), "--token", "x", check=False)
    assert result.returncode == 2 and "approvals.listen is not set" in result.stderr


# -- the web page in Chromium ---------------------------------------------------------------------


class DevTools:
    """Just enough of the Chrome DevTools Protocol: DOM queries, real mouse clicks, typing."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.loaded = asyncio.Event()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self.pending.pop(msg["id"])
                if "error" in msg:
                    fut.set_exception(RuntimeError(f"{msg['error']}"))
                else:
                    fut.set_result(msg.get("result", {}))
            elif msg.get("method") == "Page.loadEventFired":
                self.loaded.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 10)

    async def node(self, selector: str) -> int:
        root = (await self.call("DOM.getDocument", depth=0))["root"]["nodeId"]
        return int((await self.call("DOM.querySelector", nodeId=root, selector=selector))["nodeId"])

    async def html(self) -> str:
        root = (await self.call("DOM.getDocument", depth=0))["root"]["nodeId"]
        return str((await self.call("DOM.getOuterHTML", nodeId=root))["outerHTML"])

    async def outer_html(self, selector: str) -> str:
        node = await self.node(selector)
        assert node, f"no {selector} on the page"
        return str((await self.call("DOM.getOuterHTML", nodeId=node))["outerHTML"])

    async def shown_left_to_right(self, element_id: str) -> str:
        """The text of the element with ``element_id`` as the page draws it: its pieces (text boxes, after
        bidirectional reordering) from left to right, top to bottom."""
        snap = await self.call("DOMSnapshot.captureSnapshot", computedStyles=[])
        strings, doc = snap["strings"], snap["documents"][0]
        nodes, layout, boxes = doc["nodes"], doc["layout"], doc["textBoxes"]
        (root,) = [
            node
            for node, pairs in enumerate(nodes["attributes"])
            if any(strings[pairs[k]] == "id" and strings[pairs[k + 1]] == element_id for k in range(0, len(pairs), 2))
        ]

        def inside(node: int) -> bool:
            while node >= 0:
                if node == root:
                    return True
                node = nodes["parentIndex"][node]
            return False

        pieces = []
        for i, entry in enumerate(boxes["layoutIndex"]):
            if inside(layout["nodeIndex"][entry]):
                text = strings[layout["text"][entry]]
                start, length = boxes["start"][i], boxes["length"][i]
                x, y = boxes["bounds"][i][:2]
                pieces.append((round(y), x, text[start : start + length]))
        return "".join(text for _, _, text in sorted(pieces))

    async def url(self) -> str:
        history = await self.call("Page.getNavigationHistory")
        return str(history["entries"][history["currentIndex"]]["url"])

    async def navigate(self, url: str) -> None:
        self.loaded.clear()
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), 10)

    async def type(self, selector: str, text: str) -> None:
        node = await self.node(selector)
        assert node, f"no {selector} on the page"
        await self.call("DOM.focus", nodeId=node)
        await self.call("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """A real mouse click on ``selector``; waits for the page it leads to."""
        node = await self.node(selector)
        assert node, f"no {selector} on the page"
        await self.call("DOM.scrollIntoViewIfNeeded", nodeId=node)
        quad = (await self.call("DOM.getBoxModel", nodeId=node))["model"]["content"]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
        self.loaded.clear()
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.wait_for(self.loaded.wait(), 10)


def _chromium_usable() -> bool:
    return os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)


@contextlib.asynccontextmanager
async def _chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with page scripts disabled, driven over the DevTools protocol."""
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(profile)},  # its scratch directories go with the profile
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
            targets = json.loads(resp.read())
        page = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            tools = DevTools(ws)
            await tools.call("Page.enable")
            await tools.call("Emulation.setScriptExecutionDisabled", value=True)
            try:
                yield tools
            finally:
                tools.reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _log_in(tools: DevTools, url: str, token: str) -> None:
    await tools.navigate(f"{url}/login")
    await tools.type("#token", token)
    await tools.click("form[action='/login'] button")
    assert await tools.url() == f"{url}/approvals"


def _in_chromium(steps: Callable[[DevTools], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    require(_chromium_usable(), f"chromium is not installed at {CHROMIUM}")

    async def main() -> dict[str, Any]:
        async with _chromium(profile) as tools:
            return await steps(tools)

    profile = Path(tempfile.mkdtemp(prefix="lictor-chromium-"))
    try:
        return asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def _browse(url: str, token: str, aid: str, profile: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with _chromium(profile) as tools:
        await tools.navigate(f"{url}/approvals")
        seen["redirected_to"] = await tools.url()
        await tools.type("#token", token)
        await tools.click("form[action='/login'] button")
        seen["after_login"] = await tools.url()
        seen["list"] = await tools.html()
        await tools.click(f"a[href='/approvals/{aid}']")
        seen["detail"] = await tools.html()
        seen["injected_elements"] = await tools.node("dd b, pre b")
        await tools.type("#approve-reason", "checked from the browser")
        await tools.click("#approve")
        seen["after_approve_url"] = await tools.url()
        seen["after_approve"] = await tools.html()
    return seen


def test_web_page_in_chromium_logs_in_shows_the_request_and_approves_it(approvals_gateway: Any) -> None:
    require(_chromium_usable(), f"chromium is not installed at {CHROMIUM}")
    gw = approvals_gateway
    dba = gw.token("dba-2", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-2", role="agent"))
    aid, _ = agent.held("restart payments --force #reason: <b>urgent</b> & customers waiting")
    profile = Path(tempfile.mkdtemp(prefix="lictor-chromium-"))
    try:
        seen = asyncio.run(asyncio.wait_for(_browse(gw.url, dba, aid, profile), 60))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert seen["redirected_to"] == f"{gw.url}/login"
    assert seen["after_login"] == f"{gw.url}/approvals"
    assert f">{aid}</a>" in seen["list"] and "restart payments --force" in seen["list"]
    detail = seen["detail"]
    assert "restart-needs-approval" in detail and "agent-2" in detail
    assert "&lt;b&gt;urgent&lt;/b&gt; &amp; customers waiting" in detail
    assert seen["injected_elements"] == 0  # the agent's markup stayed text
    assert '<pre id="payload">restart payments --force</pre>' in detail
    assert seen["after_approve_url"] == f"{gw.url}/approvals/{aid}?done=approve"
    assert "Your approval was recorded." in seen["after_approve"]
    assert 'class="status-used"' in seen["after_approve"] or 'class="status-approved"' in seen["after_approve"]
    assert agent.recv().startswith("OK restart-needs-approval ")
    agent.close()
    shown = lictor("approvals", "show", aid, "--json", "--url", gw.url, "--token", dba).stdout
    record = json.loads(shown)
    assert record["status"] == "used" and record["votes"][0]["reason"] == "checked from the browser"


def test_the_page_shows_characters_that_render_as_nothing_as_escapes(approvals_gateway: Any) -> None:
    """Variation selectors, Hangul fillers and tag characters are letters or marks to Python but show as
    nothing: in a name or a path they make the command that runs differ from the one the approver reads."""
    gw = approvals_gateway
    agent = LineAgent(gw.line_port, gw.token("agent-3", role="agent"))
    hidden = "\u3164\ufe0f\U000e0100\u034f\u2800\u115f"
    command = "restart payments" + "".join(f"{ch}x{i}" for i, ch in enumerate(hidden))
    aid, _ = agent.held(command)

    async def steps(tools: DevTools) -> dict[str, Any]:
        await _log_in(tools, gw.url, gw.token("dba-3", role="dba"))
        await tools.navigate(f"{gw.url}/approvals/{aid}")
        return {"payload": await tools.outer_html("#payload"), "list": await tools.html()}

    seen = _in_chromium(steps)
    assert seen["payload"] == (
        '<pre id="payload">restart payments\\x3164x0\\xfe0fx1\\xe0100x2\\x34fx3\\x2800x4\\x115fx5</pre>'
    )
    assert not set(hidden) & set(seen["list"])
    lictor("approvals", "deny", aid, "--url", gw.url, "--token", gw.token("dba-3", role="dba"), "--reason", "no")
    assert agent.recv().startswith("DENIED ")
    agent.close()


def test_the_page_shows_a_long_request_whole_without_a_scroll_box(tmp_path: Path) -> None:
    """A statement padded with blank lines must not hide its end in a box that scrolls on its own (whose
    scroll bar some systems do not even draw): the approver reads it down to the decision forms."""
    require(_chromium_usable(), f"chromium is not installed at {CHROMIUM}")
    lines = 200
    text = "UPDATE t SET a = 1 WHERE id = 6" + "\n" * lines + "OR true"

    async def scenario() -> tuple[float, float]:
        port = free_port()
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}"})
        base = f"http://127.0.0.1:{port}"
        agent = await Agent(gw, gw.verifier.verify(gw.issuer.issue("agent-x", {"role": "agent"}))).open()
        task = agent.ask(sql(gw, text))
        aid = await agent.held()
        profile = Path(tempfile.mkdtemp(prefix="lictor-chromium-"))
        try:
            async with _chromium(profile) as tools:
                await _log_in(tools, base, gw.issuer.issue("dba-1", {"role": "dba"}, ttl=600))
                await tools.navigate(f"{base}/approvals/{aid}")
                payload = await tools.call("DOM.getBoxModel", nodeId=await tools.node("#payload"))
                form = await tools.call("DOM.getBoxModel", nodeId=await tools.node("#approve"))
        finally:
            shutil.rmtree(profile, ignore_errors=True)
            task.cancel()
            await gw.stop()
        return float(payload["model"]["height"]), float(form["model"]["content"][1])

    height, approve_top = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert height > lines * 10, height  # every line has its height on the page
    assert approve_top > height  # the Approve button comes after all of it


def test_one_identity_cannot_flood_the_approvers_with_requests(gateway_factory: Any, tmp_path: Path) -> None:
    gw = start_approvals_gateway(gateway_factory, tmp_path, max_pending_per_requester=2)
    line_port, url = gw.line_port, gw.url
    dba = gw.token("dba-1", role="dba")
    flooding = [LineAgent(line_port, gw.token("agent-1", role="agent")) for _ in range(3)]
    first, _ = flooding[0].held("restart api")
    flooding[1].held("restart db")
    flooding[2].send("restart cache")
    answer = flooding[2].recv()
    assert answer.startswith("DENIED restart-needs-approval: restarts need an on-call approval — and 2 of your ")
    assert "as many as one identity may have waiting" in answer
    other = LineAgent(line_port, gw.token("agent-2", role="agent"))
    other_id, _ = other.held("restart web")  # another agent is not held up by the first one's requests
    lictor("approvals", "deny", first, "--url", url, "--token", dba, "--reason", "not now")
    assert flooding[0].recv().startswith("DENIED ")
    flooding[2].held("restart cache")  # once one is decided, the agent may ask again
    listed = json.loads(lictor("approvals", "list", "--json", "--url", url, "--token", dba).stdout)
    assert len(listed) == 3 and other_id in [a["id"] for a in listed]
    for agent in (*flooding, other):
        agent.close()


def test_requests_for_other_approvers_cannot_push_a_request_out_of_an_approvers_list(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """The lists were the newest requests of all, then those the approver may decide: newer requests for
    another team's approvers (or from agents filling the store) left "no pending approval requests" while one
    waited for this approver."""
    pack = PACK.replace(
        "  dba:\n",
        "      - id: reboot-needs-netops\n        protocol: line\n        when: {verbs: [reboot]}\n"
        "        action: approve\n        approval: {approvers: [netops], mode: ticket, timeout: 60s}\n"
        "  netops:\n    rules: []\n  dba:\n",
    ).replace("    roles: [dba]\n", "    roles: [dba]\n  - match: {claims: {role: netops}}\n    roles: [netops]\n")
    gw = start_approvals_gateway(gateway_factory, tmp_path, pack=pack)
    dba = gw.token("dba-1", role="dba")
    token = gw.token("agent-1", role="agent")
    agent = LineAgent(gw.line_port, token)
    aid, _ = agent.held("restart api")
    other = LineAgent(gw.line_port, token)
    for n in range(5):  # newer than the one for the DBAs
        other.send(f"reboot host-{n}")
        assert other.recv().startswith("DENIED reboot-needs-netops: "), n
    listed = lictor("approvals", "list", "--limit", "3", "--url", gw.url, "--token", dba).stdout
    assert [line.split()[0] for line in listed.splitlines()[1:]] == [aid], listed
    headers = {"Authorization": f"Bearer {dba}"}
    with httpx.Client(base_url=gw.url, timeout=10, headers=headers) as api:
        for which in ("pending", "all"):
            got = api.get("/api/approvals", params={"status": which, "limit": "1"}).json()["approvals"]
            assert [a["id"] for a in got] == [aid], which
    agent.close()
    other.close()


SECURITY_PACK = """
format: lictor/v1
metadata: {name: security-approvals}
identities:
  - match: {claims: {role: agent}}
    roles: [payments-agent]
  - match: {claims: {role: security}}
    roles: [security]
roles:
  payments-agent:
    rules:
      - id: payments-restart-needs-two-security
        protocol: line
        when: {commands: ["restart payments*"]}
        action: approve
        approval: {approvers: [security], required: 2, timeout: 30s}
  security:
    rules: []
"""


def test_a_request_two_teams_rules_hold_needs_the_approvers_of_both(gateway_factory: Any, tmp_path: Path) -> None:
    """Only the first approve rule's approval block counted: one DBA released what the security team's pack
    gives to two of its approvers (and which one came first was the packs' file names)."""
    gw = start_approvals_gateway(gateway_factory, tmp_path, more_packs={"z-security.yaml": SECURITY_PACK})
    dba = gw.token("dba-1", role="dba")
    security = [gw.token(f"security-{n}", role="security") for n in (1, 2)]
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    aid, notice = agent.held("restart payments")
    assert "needs 1 approval(s) from role dba and 2 approval(s) from role security; expires in 30s" in notice
    approved = lictor("approvals", "approve", aid, "--url", gw.url, "--token", dba)
    assert approved.stdout.strip().endswith("1 of 3 approvals; still waiting for more"), approved.stdout
    shown = lictor("approvals", "show", aid, "--url", gw.url, "--token", security[0]).stdout
    assert "needs:           1 of roles dba and 2 of roles security" in shown and "status:          pending" in shown
    with httpx.Client(base_url=gw.url, timeout=10) as api:
        for n, token in enumerate(security):
            voted = api.post(f"/api/approvals/{aid}/approve", json={}, headers={"Authorization": f"Bearer {token}"})
            assert voted.json()["approval"]["status"] == ("pending", "approved")[n], voted.text
    answer = agent.recv()
    assert answer.startswith("OK restart-needs-approval,payments-restart-needs-two-security "), answer
    agent.close()


def test_right_to_left_letters_cannot_reorder_the_numbers_the_approver_reads(approvals_gateway: Any) -> None:
    """Between two Hebrew letters, the bidirectional algorithm draws numbers and operators right to left:
    without isolating the letters, ``א 1000000 - 1 ב`` showed as ``ב 1 - 1000000 א``."""
    gw = approvals_gateway
    agent = LineAgent(gw.line_port, gw.token("agent-4", role="agent"))
    command = "restart api --budget /*א*/ 1000000 - 1 /*ב*/ --note שלום עולם"
    aid, _ = agent.held(command)

    async def steps(tools: DevTools) -> dict[str, Any]:
        await _log_in(tools, gw.url, gw.token("dba-4", role="dba"))
        await tools.navigate(f"{gw.url}/approvals/{aid}")
        return {"payload": await tools.shown_left_to_right("payload")}

    seen = _in_chromium(steps)
    # each right-to-left word reads in its own direction, in its place
    assert seen["payload"] == "restart api --budget /*א*/ 1000000 - 1 /*ב*/ --note שלום עולם"
    lictor("approvals", "deny", aid, "--url", gw.url, "--token", gw.token("dba-4", role="dba"), "--reason", "no")
    assert agent.recv().startswith("DENIED ")
    agent.close()


def test_right_to_left_letters_cannot_reorder_numbers_in_the_chat_or_the_cli(tmp_path: Path) -> None:
    """The Slack message and ``lictor approvals show`` mark the end of each right-to-left run, so that a chat
    client (drawn here by Chromium) shows the numbers between two runs in their order."""
    require(_chromium_usable(), f"chromium is not installed at {CHROMIUM}")
    statement = "UPDATE accounts SET balance = balance + /*א*/ 1000000 - 1 /*ב*/ WHERE id = 5"

    async def scenario() -> tuple[str, str]:
        receiver = Receiver()
        receiver.statuses = []
        await receiver.start()
        port = free_port()
        webhook = {"url": f"http://127.0.0.1:{receiver.port}/slack", "format": "slack"}
        gw = await make_gateway(tmp_path, {"listen": f"127.0.0.1:{port}", "webhooks": [webhook]})
        agent = await Agent(gw, gw.verifier.verify(gw.issuer.issue("agent-x", {"role": "agent"}))).open()
        task = agent.ask(sql(gw, statement))
        aid = await agent.held()
        dba = gw.issuer.issue("dba-1", {"role": "dba"}, ttl=600)
        shown = await asyncio.to_thread(
            lictor, "approvals", "show", aid, "--url", f"http://127.0.0.1:{port}", "--token", dba
        )
        while not receiver.events("/slack"):
            await asyncio.sleep(0.02)
        task.cancel()
        await gw.stop()
        assert receiver.server is not None
        receiver.server.close()
        message = json.loads(receiver.events("/slack")[0][1])
        (code,) = [b["text"]["text"] for b in message["blocks"] if b.get("text", {}).get("text", "").startswith("```")]
        return code.strip("`"), shown.stdout

    code, cli = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert f"  {statement.replace('א', 'א\u200e').replace('ב', 'ב\u200e')}\n" in cli

    async def steps(tools: DevTools) -> dict[str, Any]:
        page = f'<!doctype html><meta charset="utf-8"><pre id="chat">{html.escape(code)}</pre>'
        await tools.navigate("data:text/html;base64," + base64.b64encode(page.encode()).decode())
        return {"chat": await tools.shown_left_to_right("chat")}

    assert _in_chromium(steps)["chat"].replace("\u200e", "") == statement


def _on_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """Run ``lictor`` with a terminal for its input and output; answer its question with ``answer``."""
    main, tty = pty.openpty()
    proc = subprocess.Popen([LICTOR, *args], stdin=tty, stdout=tty, stderr=tty, start_new_session=True)
    os.close(tty)
    out = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: the command ended
                    break
                if not chunk:
                    break
                out += chunk
            if not answered and b"[y/N]" in out:
                os.write(main, answer.encode() + b"\n")
                answered = True
    finally:
        os.close(main)
    return proc.wait(timeout=10), out.decode(errors="replace")


def test_approving_on_a_terminal_shows_the_request_and_asks_first(approvals_gateway: Any) -> None:
    """The agent's notice hands out the command; an approver who pastes it sees what they approve."""
    gw = approvals_gateway
    dba = gw.token("dba-5", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-5", role="agent"))
    aid, notice = agent.held("restart payments --drop-queue")
    command = ["approvals", "approve", aid, "--url", gw.url, "--token", dba]
    code, out = _on_a_terminal(command, "n")
    assert code == 1 and f"{aid} not approved" in out, out
    assert "  restart payments --drop-queue" in out and f"approve {aid} as shown above? [y/N]" in out
    shown = json.loads(lictor("approvals", "show", aid, "--json", "--url", gw.url, "--token", dba).stdout)
    assert shown["status"] == "pending" and shown["votes"] == []
    code, out = _on_a_terminal(command, "y")
    assert code == 0 and f"{aid} is now approved" in out, out
    assert agent.recv().startswith("OK restart-needs-approval ")
    agent.close()


def test_the_page_highlights_and_names_characters_outside_ascii(approvals_gateway: Any) -> None:
    """A Cyrillic letter looks like a Latin one: excluding the account "\u0430dmin" excludes no one."""
    gw = approvals_gateway
    agent = LineAgent(gw.line_port, gw.token("agent-6", role="agent"))
    aid, _ = agent.held("restart all --except \u0430dmin")

    async def steps(tools: DevTools) -> dict[str, Any]:
        await _log_in(tools, gw.url, gw.token("dba-6", role="dba"))
        await tools.navigate(f"{gw.url}/approvals/{aid}")
        return {"payload": await tools.outer_html("#payload"), "note": await tools.outer_html("#non-ascii")}

    seen = _in_chromium(steps)
    assert seen["payload"] == '<pre id="payload">restart all --except <mark>\u0430</mark>dmin</pre>'
    assert "U+0430 CYRILLIC SMALL LETTER A" in seen["note"]
    shown = lictor("approvals", "show", aid, "--url", gw.url, "--token", gw.token("dba-6", role="dba")).stdout
    assert "note:            the request holds characters outside ASCII: U+0430 CYRILLIC SMALL LETTER A\n" in shown
    lictor("approvals", "deny", aid, "--url", gw.url, "--token", gw.token("dba-6", role="dba"), "--reason", "no")
    assert agent.recv().startswith("DENIED ")
    agent.close()


def test_one_identity_cannot_open_requests_without_end(gateway_factory: Any, tmp_path: Path) -> None:
    """The pending cap counts only requests still waiting: an agent that retried as each one was refused (or
    that it gave up on) opened requests without end, each one a message to the approvers."""
    gw = start_approvals_gateway(gateway_factory, tmp_path, max_requests_per_requester_per_hour=3)
    dba = gw.token("dba-1", role="dba")
    agent = LineAgent(gw.line_port, gw.token("agent-1", role="agent"))
    for n in range(3):
        aid, _ = agent.held(f"restart api-{n}")
        lictor("approvals", "deny", aid, "--url", gw.url, "--token", dba, "--reason", "not now")
        assert agent.recv().startswith("DENIED ")
    agent.send("restart api-3")
    answer = agent.recv()
    assert answer.startswith("DENIED restart-needs-approval: restarts need an on-call approval — and you opened 3 ")
    assert "as many as one identity may" in answer
    listed = json.loads(lictor("approvals", "list", "--json", "--all", "--url", gw.url, "--token", dba).stdout)
    assert not any("api-3" in a["summary"] for a in listed), listed  # no request was opened for it
    other = LineAgent(gw.line_port, gw.token("agent-2", role="agent"))
    other.held("restart web")  # another agent is not held up by the first one's requests
    for a in (agent, other):
        a.close()
