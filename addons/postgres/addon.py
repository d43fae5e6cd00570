"""The PostgreSQL protocol addon: rule vocabulary, target schema and (in ``_listener``) the listener."""

from __future__ import annotations

from typing import Any

from lictor import Loader

from .vocabulary import VOCABULARY

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen", "upstream"],
    "properties": {
        "protocol": {"const": "postgres"},
        "description": {"type": "string"},
        "listen": {"type": "string", "description": "host:port the agents connect to"},
        "allow_plaintext": {"type": "boolean", "description": "accept plaintext from non-loopback peers"},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"cert": {"type": "string"}, "key": {"type": "string"}},
        },
        "read_only_roles": {"type": "array", "items": {"type": "string"}},
        "upstream": {
            "type": "object",
            "additionalProperties": False,
            "required": ["host"],
            "properties": {
                "host": {"type": "string"},
                "port": {"type": ["integer", "string"]},
                "user": {"type": "string"},
                "password": {"type": "string"},
                "database": {"type": "string"},
                "sslmode": {"enum": ["disable", "prefer", "require", "verify-ca", "verify-full"]},
                "sslrootcert": {"type": "string"},
                "pool_size": {"type": "integer", "minimum": 0},
            },
        },
    },
}


class PostgresAddon:
    """Declares the ``postgres`` protocol; the listener module adds ``running``/``done``."""

    name = "postgres"

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema("postgres", TARGET_SCHEMA)
