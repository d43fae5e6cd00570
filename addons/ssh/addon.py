"""The SSH protocol addon: vocabulary and target schema."""

from __future__ import annotations

from typing import Any

from lictor import Loader

from .vocabulary import VOCABULARY

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen", "upstream"],
    "properties": {
        "protocol": {"const": "ssh"},
        "description": {"type": "string"},
        "listen": {"type": "string"},
        "host_key": {"type": "string", "description": "the gateway's own host key (created if missing)"},
        "upstream": {
            "type": "object",
            "additionalProperties": False,
            "required": ["host", "user", "key", "known_hosts"],
            "properties": {
                "host": {"type": "string"},
                "port": {"type": ["integer", "string"]},
                "user": {"type": "string"},
                "key": {"type": "string"},
                "certificate": {"type": "string"},
                "known_hosts": {"type": "string"},
            },
        },
        "public_keys": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "sub"],
                "properties": {
                    "key": {"type": "string"},
                    "sub": {"type": "string"},
                    "claims": {"type": "object"},
                },
            },
        },
        "user_ca": {"type": "array", "items": {"type": "string"}},
    },
}


class SshAddon:
    """Declares the ``ssh`` protocol."""

    name = "ssh"

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema("ssh", TARGET_SCHEMA)
