"""A minimal protocol addon for tests, written only against Lictor's public API.

Protocol: the agent connects, sends ``AUTH <jwt>``; then every line is a command. The gateway
answers ``OK <rule ids>`` or ``DENIED <rule id>: <message>`` (or ``WAIT <approval id>`` first,
when the command is held for approval). Config: ``targets: {NAME: {protocol: line, listen: ...}}``.
Environment: ``LINEPROTO_FAIL_ON`` makes the ``request`` hook raise on commands containing that
word (fault injection).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from lictor import AuthError, Gateway, Glob, Loader, Request, Vocabulary


def build_requests(case: Mapping[str, Any], target: str) -> list[Request]:
    """A policy test case's ``request: {protocol: line, command: "get x"}`` as the listener makes it."""
    command = str(case["command"])
    verb = command.split()[0]
    attrs = {"command": command, "verb": verb}
    return [Request(protocol="line", action=verb, attrs=attrs, target=target, summary=command, payload=command)]


VOCABULARY = Vocabulary(
    protocol="line",
    fields=(
        Glob("commands", attr="command", description="the whole line"),
        Glob("verbs", attr="verb", description="the first word"),
    ),
    index="verbs",
    build_requests=build_requests,
)

TARGET_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen"],
    "properties": {"protocol": {"const": "line"}, "listen": {"type": "string"}},
}


class LineProtocol:
    name = "lineproto"

    def __init__(self) -> None:
        self.servers: list[asyncio.base_events.Server] = []
        self.fail_on = os.environ.get("LINEPROTO_FAIL_ON", "")

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema("line", TARGET_SCHEMA)

    def request(self, flow: Any) -> None:
        if self.fail_on and self.fail_on in flow.request.payload:
            raise RuntimeError("injected fault")

    async def running(self, gateway: Gateway) -> None:
        for target in gateway.targets("line"):
            host, port = str(target.get("listen")).rsplit(":", 1)

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = target.name) -> None:
                await self.serve(gateway, name, r, w)

            self.servers.append(await asyncio.start_server(handle, host, int(port)))

    async def done(self, gateway: Gateway) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()

    async def serve(self, gateway: Gateway, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = str(w.get_extra_info("peername"))
        line = (await r.readline()).decode().strip()
        if not line.startswith("AUTH "):
            w.write(b"ERROR send AUTH <token> first\n")
            await w.drain()
            w.close()
            return
        try:
            identity = await gateway.authenticate_async(line[5:], protocol="line", target=target, peer=peer)
        except AuthError as exc:
            w.write(f"ERROR {exc}\n".encode())
            await w.drain()
            w.close()
            return
        session = await gateway.open_session(identity, protocol="line", target=target, peer=peer)
        w.write(b"READY\n")
        await w.drain()

        async def notify(approval_id: str, message: str) -> None:
            w.write(f"WAIT {approval_id} {message}\n".encode())
            await w.drain()

        try:
            while True:
                raw = await r.readline()
                if not raw:
                    break
                command = raw.decode(errors="replace").strip()
                if not command:
                    continue
                reason = None
                if " #reason:" in command:
                    command, reason = command.split(" #reason:", 1)
                verb = command.split()[0]
                request = Request(
                    protocol="line",
                    action=verb,
                    attrs={"command": command, "verb": verb},
                    target=target,
                    summary=command,
                    payload=command,
                    reason=reason,
                )
                decision = await session.decide(request, notify)
                if decision.allowed:
                    session.record("command", {"command": command, "rules": list(decision.rule_ids)})
                    w.write(f"OK {','.join(decision.rule_ids)} {decision.policy_version}\n".encode())
                else:
                    w.write(f"DENIED {decision.rule_ids[0]}: {decision.message}\n".encode())
                await w.drain()
        finally:
            await session.close()
            w.close()


addons = [LineProtocol()]
