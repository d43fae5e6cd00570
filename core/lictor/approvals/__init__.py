"""Just-in-time approvals: hold a request for humans, bound to that exact request, single use.

:class:`ApprovalBroker` is what the gateway calls for ``approve`` decisions (``hold``) and for every
decision (``elevated_roles``); protocols with a retry flow call ``redeem``. Approvers decide on the
page and API served by :class:`HttpServer` (``approvals.listen``) or with ``lictor approvals``.
See docs/approvals.md.
"""

from __future__ import annotations

from ._model import Approval, ApprovalError, ApprovalSpec, Vote, format_duration
from .broker import CONFIG_SCHEMA, ApprovalBroker
from .http import HttpRequest, HttpResponse, HttpServer
from .store import ApprovalStore, Elevation, PostgresStore, SqliteStore, VoteResult, open_store
from .web import WebApp, esc
from .webhooks import Webhooks, WebhookTarget, sign

__all__ = [
    "CONFIG_SCHEMA",
    "Approval",
    "ApprovalBroker",
    "ApprovalError",
    "ApprovalSpec",
    "ApprovalStore",
    "Elevation",
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "PostgresStore",
    "SqliteStore",
    "Vote",
    "VoteResult",
    "WebApp",
    "WebhookTarget",
    "Webhooks",
    "esc",
    "format_duration",
    "open_store",
    "sign",
]
