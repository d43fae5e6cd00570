"""The SSH protocol addon: vocabulary, target schema, and the listeners of ``protocol: ssh`` targets.

Hooks: ``load`` declares the vocabulary and the target schema; ``configure`` loads every target's
keys and files (a problem refuses the config); ``running`` starts one asyncssh listener per target;
``done`` stops accepting, closes agent connections and the upstream pool; ``request`` denies a
command line the shell analysis could not read (rule ``lictor:ssh-unparsable``), before the policy
sees it (and ``decision`` names that rule again, where the policy's own denial would replace it). See docs/ssh.md.
"""

from __future__ import annotations

import logging
from typing import Any

from lictor import Flow, Gateway, Loader

from ._config import SshTargetConfig, parse_target
from ._requests import UNPARSABLE_RULE
from .vocabulary import VOCABULARY

__all__ = ["TARGET_SCHEMA", "SshAddon"]

log = logging.getLogger("lictor.ssh")

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen", "upstream"],
    "properties": {
        "protocol": {"const": "ssh"},
        "description": {"type": "string"},
        "listen": {"type": "string", "description": "host:port the agents connect to"},
        "host_key": {"type": "string", "description": "the gateway's own host key (created if missing)"},
        "upstream": {
            "type": "object",
            "additionalProperties": False,
            "required": ["host", "user", "key", "known_hosts"],
            "properties": {
                "host": {"type": "string"},
                "port": {"type": ["integer", "string"]},
                "user": {"type": "string"},
                "key": {"type": "string", "description": "private key file held by the gateway"},
                "certificate": {"type": "string", "description": "OpenSSH certificate for that key"},
                "known_hosts": {"type": "string", "description": "pinned host keys of the target"},
                "max_sessions": {"type": "integer", "minimum": 1, "maximum": 1000},
                "connect_timeout": {"type": ["number", "string"]},
            },
        },
        "public_keys": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "sub"],
                "properties": {
                    "key": {"type": "string", "description": "an OpenSSH public key line or a .pub file"},
                    "sub": {"type": "string"},
                    "claims": {"type": "object"},
                },
            },
        },
        "user_ca": {"type": "array", "items": {"type": "string"}, "description": "trusted user CA key files"},
        "line_shell": {"type": "string", "description": "bash on the target, for line-inspected shells"},
        "record_output_limit": {"type": "integer", "minimum": 0},
        "max_channels": {
            "type": "integer",
            "minimum": 1,
            "maximum": 10000,
            "description": "channels an agent connection may have open at a time (sessions, sftp, forwards)",
        },
        "max_connections": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100000,
            "description": "connections one identity may have open to this target at a time",
        },
    },
}


class SshAddon:
    """Declares the ``ssh`` protocol and serves its targets."""

    name = "ssh"
    protocols = ("ssh",)  # its request hook inspects ssh requests only

    def __init__(self) -> None:
        self.targets: dict[str, SshTargetConfig] = {}
        self.listeners: list[Any] = []

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema("ssh", TARGET_SCHEMA)

    def configure(self, gateway: Gateway) -> None:
        targets: dict[str, SshTargetConfig] = {}
        for target in gateway.targets("ssh"):
            try:
                targets[target.name] = parse_target(
                    target.name,
                    target.settings,
                    gateway.config.resolve,
                    gateway.state_dir,
                    create_host_key=not gateway.checking,
                )
            except ValueError as exc:
                raise ValueError(f"{target.loc}: {exc}" if target.loc else str(exc)) from None
        self.targets = targets
        if targets:  # asyncssh logs every channel at INFO; Lictor records what matters itself
            logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.getLogger("asyncssh").level))

    async def running(self, gateway: Gateway) -> None:
        from ._env import keep_gateway_variables
        from ._exec import accept_undecodable_commands
        from ._refused import note_refused_forwarding
        from ._server import SshListener
        from ._sftp import guard_sftp_sessions
        from ._window import bound_receive_windows

        if self.targets:
            bound_receive_windows()  # channels read slower than their peer writes must not buffer without bound
            guard_sftp_sessions()  # an SFTP session that fails early must not take the agent's connection down
            keep_gateway_variables()  # environment requests are not stored without bound
            note_refused_forwarding()  # agent and X11 forwarding are refused with a message
            accept_undecodable_commands()  # a command that is not UTF-8 is denied and audited, not dropped unseen
        for config in self.targets.values():
            listener = SshListener(gateway, config)
            await listener.start()
            self.listeners.append(listener)

    async def done(self, gateway: Gateway) -> None:
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                await listener.stop()
            except Exception:
                log.exception("ssh target %s: error while stopping", listener.config.name)

    def request(self, flow: Flow) -> None:
        request = flow.request
        if request.protocol != "ssh":
            return
        error = request.attrs.get("parse_error")
        if error is not None and request.attrs.get("channel") in ("sftp", "scp"):  # names the path itself
            flow.deny(str(error), UNPARSABLE_RULE)
        elif error is not None:
            flow.deny(f"the command line cannot be analysed: {error}", UNPARSABLE_RULE)

    def decision(self, flow: Flow) -> None:
        """The policy's own denial of an unparsable request (no rule allows a request without a program) took the
        place of the hook's: the audit log named ``lictor:default-deny`` where the agent was told
        ``lictor:ssh-unparsable``. The parser's reason is what decided it, and what the audit log says."""
        self.request(flow)
