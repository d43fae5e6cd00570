"""The HTTP and Kubernetes protocol addon: agents' API calls and kubectl through an embedded mitmproxy.

``load`` declares the ``http`` and ``kubernetes`` rule vocabularies, the target schema and the addon's
options; ``configure`` checks every target (a bad one stops the gateway before it listens); ``running``
starts one mitmproxy reverse-proxy listener per target on the gateway's event loop; ``done`` stops them.
See :mod:`._proxy` for how each request is decided, forwarded, masked and recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lictor import Gateway, Loader

from ._config import HttpTarget, TargetConfigError, parse_target
from .vocabulary import HTTP_VOCABULARY, K8S_VOCABULARY

log = logging.getLogger("lictor.http")

PROTOCOLS = ("http", "kubernetes")
DEFAULT_IDLE_TIMEOUT = 3600
DEFAULT_BUFFER_LIMIT = 64 * 1024 * 1024
DEFAULT_SETUP_TIMEOUT = 30

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
    """Serves the ``http`` and ``kubernetes`` targets of the gateway config."""

    name = "http"

    def __init__(self) -> None:
        self.targets: list[HttpTarget] = []
        self.proxy: Any = None
        self._options: dict[str, Any] = {}
        self._manager: Any = None

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(HTTP_VOCABULARY)
        loader.add_vocabulary(K8S_VOCABULARY)
        loader.add_target_schema("http", TARGET_SCHEMA)
        loader.add_target_schema("kubernetes", TARGET_SCHEMA)
        loader.add_option(
            "http_idle_timeout",
            int,
            DEFAULT_IDLE_TIMEOUT,
            "seconds an HTTP/Kubernetes connection may stay idle (also bounds how long a request can be held "
            "for approval without traffic)",
        )
        loader.add_option(
            "http_setup_timeout",
            int,
            DEFAULT_SETUP_TIMEOUT,
            "seconds a new HTTP/Kubernetes connection has for its TLS handshake and the headers of its first request",
        )
        loader.add_option(
            "http_buffer_limit",
            int,
            DEFAULT_BUFFER_LIMIT,
            "largest JSON response (bytes) masked as a whole document; larger ones are not relayed when they "
            "need JSON-path or Secret masking",
        )

    def configure(self, gateway: Gateway) -> None:
        """Check every http/kubernetes target; raise to refuse the config."""
        targets: list[HttpTarget] = []
        problems: list[str] = []
        for protocol in PROTOCOLS:
            for target in gateway.targets(protocol):
                try:
                    targets.append(parse_target(target, gateway.config.resolve, gateway.state_dir))
                except TargetConfigError as exc:
                    problems.append(str(exc))
        listens: dict[tuple[str, int], str] = {}
        for t in targets:
            key = (t.listen_host, t.listen_port)
            if key in listens:
                problems.append(f"targets {listens[key]!r} and {t.name!r} both listen on {key[0]}:{key[1]}")
            listens[key] = t.name
        if problems:
            raise ValueError("\n".join(problems))
        options = gateway.addons.options
        self._options = {
            "idle_timeout": int(options["http_idle_timeout"].value),
            "buffer_limit": int(options["http_buffer_limit"].value),
            "setup_timeout": int(options["http_setup_timeout"].value),
        }
        refused = [f"http_{name} must be positive" for name, value in self._options.items() if value <= 0]
        if refused:
            raise ValueError("; ".join(refused))
        self.targets = targets
        if targets:
            from ._tls import ensure_ca, untrusted_ca

            ensure_ca(gateway.state_dir)
            untrusted_ca(gateway.state_dir)
            # Building the TLS contexts now reports unreadable CA files and client certificates at start-up.
            from ._tls import client_context, upstream_context

            for t in targets:
                if t.scheme == "https":
                    upstream_context(t)
                client_context(t)

    async def running(self, gateway: Gateway) -> None:
        """Start the listeners (one embedded mitmproxy for all targets)."""
        if not self.targets:
            return
        from ._proxy import EmbeddedProxy
        from ._tls import ensure_ca, untrusted_ca

        confdir = ensure_ca(gateway.state_dir)
        self.proxy = EmbeddedProxy(
            gateway,
            self.targets,
            confdir=str(confdir),
            untrusted_ca=str(untrusted_ca(gateway.state_dir)),
            idle_timeout=self._options["idle_timeout"],
            buffer_limit=self._options["buffer_limit"],
            setup_timeout=self._options["setup_timeout"],
        )
        await self.proxy.start()
        log.info("gateway CA for agents: %s", Path(confdir) / "ca.crt")

    async def done(self, gateway: Gateway) -> None:
        """Stop accepting; close the agents' connections (their sessions close with them)."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            await proxy.stop()
