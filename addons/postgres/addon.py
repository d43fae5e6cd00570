"""The PostgreSQL protocol addon: rule vocabulary, target schema and (in ``_listener``) the listener."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lictor import Loader

from .vocabulary import VOCABULARY

if TYPE_CHECKING:
    from lictor import Gateway

    from ._listener import PostgresListener

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
            "description": "TLS towards agents; without cert/key the gateway makes a CA and a certificate",
            "properties": {
                "enabled": {"type": "boolean", "description": "answer SSLRequest (default true)"},
                "cert": {"type": "string"},
                "key": {"type": "string"},
            },
        },
        "max_connections": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100000,
            "description": "connections one identity may have open to this target at a time (default 32)",
        },
        "read_only_roles": {
            "type": "array",
            "items": {"type": "string", "format": "lictor-role"},  # roles the rule packs must define
            "description": "roles whose sessions run with default_transaction_read_only=on at the database",
        },
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
                "connect_timeout": {"type": "number", "exclusiveMinimum": 0},
            },
        },
    },
}


class PostgresAddon:
    """The ``postgres`` protocol: its rule vocabulary, its target schema and its listeners."""

    name = "postgres"

    def __init__(self) -> None:
        self.listener: PostgresListener | None = None

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema("postgres", TARGET_SCHEMA)

    def configure(self, gateway: Gateway) -> None:
        """Check the postgres targets (listen addresses, upstreams) and prepare TLS; raise to refuse."""
        targets = gateway.targets("postgres")
        if not targets:
            self.listener = None
            return
        from ._listener import PostgresListener

        listener = PostgresListener(gateway)
        listener.configure(targets)
        self.listener = listener

    async def running(self, gateway: Gateway) -> None:
        if self.listener is not None:
            await self.listener.start()

    async def done(self, gateway: Gateway) -> None:
        if self.listener is not None:
            await self.listener.stop()
