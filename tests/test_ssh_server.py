"""Authentication callbacks of the SSH listener: an identity is granted only in ``auth_completed``,
for the method whose proof succeeded last — never for a key that was merely offered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest
from lictor import testing
from lictor_addons.ssh._config import parse_target
from lictor_addons.ssh._server import AgentConnection, SshListener
from lictor_addons.ssh.addon import SshAddon


def _target(tmp: Path) -> tuple[object, asyncssh.SSHKey, asyncssh.SSHKey, asyncssh.SSHKey]:
    upstream = asyncssh.generate_private_key("ssh-ed25519")
    (tmp / "up").write_bytes(upstream.export_private_key())
    (tmp / "known_hosts").write_text(f"[10.0.0.5]:22 {upstream.export_public_key().decode().strip()}\n")
    admin_key = asyncssh.generate_private_key("ssh-ed25519")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    ca = asyncssh.generate_private_key("ssh-ed25519")
    (tmp / "ca.pub").write_bytes(ca.export_public_key())
    settings = {
        "protocol": "ssh",
        "listen": "127.0.0.1:0",
        "upstream": {"host": "10.0.0.5", "user": "ops", "key": "up", "known_hosts": "known_hosts"},
        "public_keys": [
            {"key": admin_key.export_public_key().decode(), "sub": "key-admin", "claims": {"role": "admin"}}
        ],
        "user_ca": ["ca.pub"],
    }
    cfg = parse_target("web", settings, lambda p: tmp / p, tmp / "state")
    return cfg, admin_key, stranger, ca


def _run(tmp: Path, scenario: object) -> object:
    async def main() -> object:
        cfg, admin_key, stranger, ca = _target(tmp)
        async with testing.harness(SshAddon()) as h:
            listener = SshListener(h.gateway, cfg)  # type: ignore[arg-type]
            result = await scenario(h, listener, admin_key, stranger, ca)  # type: ignore[operator]
            await listener.pool.close()
            return result

    return asyncio.run(main())


def test_an_offered_key_is_not_an_identity_a_later_password_is(tmp_path: Path) -> None:
    async def scenario(h: testing.Harness, listener: SshListener, admin_key, stranger, ca) -> object:  # type: ignore[no-untyped-def]
        agent = AgentConnection(listener)
        assert agent.validate_public_key("x", admin_key) is True  # asyncssh has not checked a signature yet
        assert not agent._session.done()
        token = h.gateway.issuer.issue("token-agent", {"role": "observer"}, 60)
        assert await agent.validate_password("x", token) is True
        await agent.auth_completed()
        session = await agent.ready()
        return session.identity

    identity = _run(tmp_path, scenario)
    assert identity.subject == "token-agent" and identity.method == "jwt"  # type: ignore[attr-defined]


def test_a_failed_later_attempt_clears_the_candidate(tmp_path: Path) -> None:
    async def scenario(h: testing.Harness, listener: SshListener, admin_key, stranger, ca) -> object:  # type: ignore[no-untyped-def]
        agent = AgentConnection(listener)
        assert agent.validate_public_key("x", admin_key) is True
        assert agent.validate_public_key("x", stranger) is False
        await agent.auth_completed()  # cannot happen in asyncssh; if it did, no identity is granted
        with pytest.raises(ConnectionError):
            await agent.ready()
        agent2 = AgentConnection(listener)
        assert agent2.validate_public_key("x", admin_key) is True
        assert await agent2.validate_password("x", "not-a-token") is False
        await agent2.auth_completed()
        with pytest.raises(ConnectionError):
            await agent2.ready()
        return True

    assert _run(tmp_path, scenario) is True


def test_registered_key_and_certificate_identities(tmp_path: Path) -> None:
    async def scenario(h: testing.Harness, listener: SshListener, admin_key, stranger, ca) -> object:  # type: ignore[no-untyped-def]
        agent = AgentConnection(listener)
        assert agent.validate_public_key("whatever", admin_key) is True
        await agent.auth_completed()
        by_key = (await agent.ready()).identity
        cert_agent = AgentConnection(listener)
        assert cert_agent.validate_ca_key("alice", stranger) is False  # not a trusted CA
        assert cert_agent.validate_ca_key("alice", ca) is True
        await cert_agent.auth_completed()
        by_cert = (await cert_agent.ready()).identity
        return by_key, by_cert

    by_key, by_cert = _run(tmp_path, scenario)  # type: ignore[misc]
    assert by_key.subject == "key-admin" and by_key.claims["role"] == "admin" and by_key.method == "publickey"
    assert by_cert.subject == "alice" and by_cert.method == "certificate"
