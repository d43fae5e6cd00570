"""The HTTP and Kubernetes protocol addon: vocabularies and target schema."""

from __future__ import annotations

from typing import Any

from lictor import Loader

from .vocabulary import HTTP_VOCABULARY, K8S_VOCABULARY

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen", "upstream"],
    "properties": {
        "protocol": {"enum": ["http", "kubernetes"]},
        "description": {"type": "string"},
        "listen": {"type": "string"},
        "upstream": {"type": "string", "description": "base URL of the upstream API"},
        "upstream_ca": {"type": "string"},
        "upstream_insecure": {"type": "boolean"},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cert": {"type": "string"},
                "key": {"type": "string"},
                "enabled": {"type": "boolean"},
            },
        },
        "credentials": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "bearer": {"type": "string"},
                "basic": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"user": {"type": "string"}, "password": {"type": "string"}},
                },
                "header": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                },
                "client_cert": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"cert": {"type": "string"}, "key": {"type": "string"}},
                },
            },
        },
        "approval_mode": {"enum": ["hold", "ticket"]},
        "max_body": {"type": "integer"},
    },
}


class HttpAddon:
    """Declares the ``http`` and ``kubernetes`` protocols."""

    name = "http"

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(HTTP_VOCABULARY)
        loader.add_vocabulary(K8S_VOCABULARY)
        loader.add_target_schema("http", TARGET_SCHEMA)
        loader.add_target_schema("kubernetes", TARGET_SCHEMA)
