"""A Redis protocol addon for Lictor, written only against Lictor's public API.

``examples/redis/redis_addon.py`` is the file a gateway config names under ``addons:``; this
package holds the pieces: :mod:`.resp` (sans-IO RESP2/RESP3), :mod:`.commands` (the command
table: categories and keys), :mod:`.vocabulary` (the ``redis`` rule vocabulary and requests),
:mod:`.proxy` (the per-connection relay) and :mod:`.addon` (hooks and listeners).
"""

from __future__ import annotations

from .addon import TARGET_SCHEMA, UNSUPPORTED, RedisAddon
from .commands import Classified, classify
from .vocabulary import PROTOCOL, VOCABULARY, build_requests, request_for

__all__ = [
    "PROTOCOL",
    "TARGET_SCHEMA",
    "UNSUPPORTED",
    "VOCABULARY",
    "Classified",
    "RedisAddon",
    "build_requests",
    "classify",
    "request_for",
]
