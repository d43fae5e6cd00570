"""Lictor: the gateway between autonomous agents and production.

The public API for addon authors and embedders. Everything not named in ``__all__`` (and every
module whose name starts with ``_``) is private and may change without notice.
"""

from __future__ import annotations

from .addons import AddonManager, HookError, Loader, Option
from .audit import AuditError, AuditLog, VerifyResult
from .config import ConfigError, GatewayConfig, Target, load_config
from .gateway import ApprovalBroker, Flow, Gateway, Recorder, Session
from .identity import AuthError, Identity, LocalIssuer, TokenVerifier, parse_duration
from .policy import Policy, Trace
from .policy_types import MAX_REASON, Decision, Request, agent_reason, combine
from .rulepacks import LoadResult, PolicyLoadError, Problem, load_policy
from .vocabulary import Boolean, Custom, Enum, Field, Glob, Number, Vocabulary

__version__ = "0.1.0"

__all__ = [
    "MAX_REASON",
    "AddonManager",
    "ApprovalBroker",
    "AuditError",
    "AuditLog",
    "AuthError",
    "Boolean",
    "ConfigError",
    "Custom",
    "Decision",
    "Enum",
    "Field",
    "Flow",
    "Gateway",
    "GatewayConfig",
    "Glob",
    "HookError",
    "Identity",
    "LoadResult",
    "Loader",
    "LocalIssuer",
    "Number",
    "Option",
    "Policy",
    "PolicyLoadError",
    "Problem",
    "Recorder",
    "Request",
    "Session",
    "Target",
    "TokenVerifier",
    "Trace",
    "VerifyResult",
    "Vocabulary",
    "__version__",
    "agent_reason",
    "combine",
    "load_config",
    "load_policy",
    "parse_duration",
]
