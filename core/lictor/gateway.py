"""The gateway: what protocol addons talk to.

A protocol addon owns its listener. For each agent connection it authenticates the agent
(:meth:`Gateway.authenticate`), opens a :class:`Session`, turns each thing the agent asks for into
a :class:`~lictor.Request` and awaits :meth:`Session.decide`, which

1. runs the ``request`` hooks of every addon (they may deny),
2. asks the live policy,
3. runs the ``decision`` hooks (they may only tighten),
4. writes the decision to the audit log *before* returning (a failed write denies),
5. holds an ``approve`` decision for a human through the approval broker,

and turns any exception on the way into an audited denial. The addon then forwards, masks
(:meth:`Session.mask_plan`) and records (:meth:`Session.record`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .addons import AddonManager, HookError
from .audit import AuditError, AuditLog
from .config import ConfigError, GatewayConfig, Target
from .identity import AuthError, Identity, IssuerConfig, LocalIssuer, TokenVerifier, parse_duration
from .policy import Policy
from .policy_types import ADDON_ERROR, Decision, Request
from .recorder import SessionRecorder
from .rulepacks import LoadResult, load_policy

if TYPE_CHECKING:  # the masking package (re2) is imported on first use, not with lictor
    from .masking import MaskPlan

__all__ = ["ApprovalBroker", "Flow", "Gateway", "Recorder", "Session"]

log = logging.getLogger("lictor")

_RANK = {"allow": 0, "approve": 1, "deny": 2}

# Audit events that report what already happened (``auth.failed``, ``session.end``, approvals'
# outcomes) cannot be refused like a decision: while the spool takes no writes they wait in memory,
# up to this many, and are written, with their own time, before the next event that gets through.
AUDIT_BACKLOG_LIMIT = 10_000
BURST_INTERVAL = 10.0
"""Seconds over which :meth:`Gateway.audit_burst` gathers the events of one key into one."""


@dataclass
class _Burst:
    kind: str
    event: Mapping[str, Any]
    count: int  # events after the first, not yet written
    handle: asyncio.TimerHandle


HoldNotifier = Callable[[str, str], Awaitable[None]]


class ApprovalBroker(Protocol):
    """Holds ``approve`` decisions for humans (``lictor.approvals`` provides the real one)."""

    async def hold(
        self, session: Session, request: Request, decision: Decision, notify: HoldNotifier | None
    ) -> Decision: ...

    def elevated_roles(self, identity: Identity, target: str) -> tuple[str, ...]: ...


class Recorder(Protocol):
    """Receives session events (``lictor.recorder.SessionRecorder`` is the durable one)."""

    def open(self, session: Session) -> None: ...

    def event(self, session: Session, kind: str, data: Mapping[str, Any]) -> None: ...

    def close(self, session: Session) -> None: ...


class Flow:
    """One request on its way through the hooks. Hooks may deny it; nothing may loosen it."""

    __slots__ = ("_decision", "_request", "metadata", "session")

    def __init__(self, session: Session, request: Request) -> None:
        self.session = session
        self._request = request
        self._decision: Decision | None = None
        self.metadata: dict[str, Any] = {}

    @property
    def request(self) -> Request:
        """The request being decided. Read-only: the policy decides, and the addon forwards, the request
        the addon passed to ``decide``; a hook that assigned another one changed nothing."""
        return self._request

    @property
    def decision(self) -> Decision | None:
        return self._decision

    def deny(self, message: str, rule_id: str) -> None:
        """Deny this request with ``message`` (shown to the agent), naming ``rule_id``."""
        version = self._decision.policy_version if self._decision else self.session.gateway.policy.version
        self._decision = Decision.deny(message, rule_id, version)

    def _set(self, decision: Decision) -> None:
        if self._decision is not None and _RANK[decision.action] <= _RANK[self._decision.action]:
            # a hook denied before the policy ran: the policy may not loosen that, and its own denial
            # (no rule allows it) must not hide the hook's rule id and message from the agent and the audit
            return
        self._decision = decision


def _on_target(session: Session, request: Request) -> Request:
    """``request`` on its session's target when the addon named none: rules scoped to that target
    (a ``deny`` on ``targets: [prod]``) must see it, as the audit event does."""
    return request if request.target else replace(request, target=session.target)


@dataclass(eq=False)
class Session:
    """One agent connection."""

    gateway: Gateway
    identity: Identity
    protocol: str
    target: str
    peer: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    closed: bool = False
    _roles_version: str = ""
    _roles: tuple[str, ...] = ()

    def roles(self, policy: Policy) -> tuple[str, ...]:
        """The identity's roles under ``policy`` (cached per policy version)."""
        if self._roles_version != policy.version:
            self._roles = policy.roles_for(self.identity)
            self._roles_version = policy.version
        return self._roles

    @property
    def policy(self) -> Policy:
        return self.gateway.policy

    async def decide(
        self, request: Request, notify: HoldNotifier | None = None, *, approval: Mapping[str, Any] | None = None
    ) -> Decision:
        """Decide, audit and (for approvals) hold ``request``. Never raises; fails closed.

        ``approval`` overrides keys of the deciding rule's approval block for this request, e.g.
        ``{"mode": "ticket"}`` for a target configured to answer with an approval id at once.
        """
        return await self.gateway.decide(self, request, notify, approval=approval)

    async def hold(self, request: Request, decision: Decision, notify: HoldNotifier | None = None) -> Decision:
        """Hold ``request``, which :meth:`decide_now` answered ``approve`` (and audited), until approved,
        denied or expired, and audit that resolution (phase ``approval``). Never raises but
        ``CancelledError``: cancelled (the agent gave up), the request is withdrawn and audited as denied,
        with the cancel message (``task.cancel(msg)``) as the reason."""
        return await self.gateway.hold(self, request, decision, notify)

    def policy_decision(self, request: Request) -> Decision:
        """What the live policy alone says (time-boxed elevations included): no hooks, no audit.

        For sub-decisions an addon makes inside an already decided request (may this response
        reveal a value, is this stdin line denied); audit the ones it acts on with :meth:`audit`.
        """
        return self.gateway._policy_decision(self, _on_target(self, request))

    def audit(self, request: Request, decision: Decision, phase: str = "decision") -> None:
        """Audit a decision the addon made or acted on itself; raises ``AuditError`` when the
        event cannot be made durable (the caller fails closed)."""
        self.gateway._write_decision(self, _on_target(self, request), decision, phase)

    def decide_now(self, request: Request) -> Decision:
        """Synchronous variant for the hot path of protocols without hooks that await.

        Same steps as :meth:`decide` except holding for approval: an ``approve`` decision is
        returned as is (audited) and the caller holds it with :meth:`hold`.
        """
        return self.gateway.decide_sync(self, request)

    def record(self, kind: str, data: Mapping[str, Any]) -> None:
        """Append an event to this session's recording (durable locally when it returns)."""
        self.gateway.recorder.event(self, kind, data)

    def mask_plan(self, decision: Decision) -> MaskPlan:
        """The compiled masking plan for ``decision`` (``MaskPlan.EMPTY`` when nothing is masked)."""
        return self.gateway.mask_plan(decision)

    async def close(self, **summary: Any) -> None:
        if self.closed:
            return
        self.closed = True
        await self.gateway.end_session(self, summary)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "protocol": self.protocol,
            "target": self.target,
            "peer": self.peer,
            "identity": self.identity.to_json(),
        }

    def end_json(self) -> dict[str, Any]:
        """What the audit's ``session.end`` says of the session: which one, whose, where (so that filters on
        the identity or protocol find the end of a session as they find its start)."""
        return {"session": self.id, **{k: v for k, v in self.to_json().items() if k != "id"}}


MIN_MASK_KEY_BYTES = 16


def load_mask_key(config: GatewayConfig, *, create: bool) -> bytes | None:
    """The HMAC key of the ``hash`` and ``preserve-length`` masks: ``masking.hash_key_file``, else
    ``STATE/mask.key``; made when missing if ``create`` (else None). A file that is not at least
    :data:`MIN_MASK_KEY_BYTES` bytes in hex is a ConfigError: an empty or short key lets a masked card
    number (few unknown digits) be found by trying them all."""
    path_s = config.section("masking").get("hash_key_file")
    path = config.resolve(str(path_s)) if path_s else config.state_dir / "mask.key"
    where = f"{config.where('masking', 'hash_key_file')}: masking.hash_key_file: " if path_s else ""
    if path.exists():
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}{path}: not a key in hex ({exc})") from None
        if len(key) < MIN_MASK_KEY_BYTES:
            raise ConfigError(
                f"{where}{path}: the key is {len(key)} bytes; it must be at least {MIN_MASK_KEY_BYTES} random bytes "
                "in hex (the gateway makes 32: delete the file to have one made)"
            )
        return key
    if not create:
        return None
    key = secrets.token_bytes(32)
    # Created private, not chmod-ed afterwards: the HMAC key of hash and preserve-length masks is what
    # keeps a masked card number (few unknown digits) from being found by trying them all.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


class Gateway:
    """Shared state of one gateway process: config, live policy, audit, approvals, recorder."""

    checking = False
    """True for the stand-in ``lictor check -c`` hands to ``configure`` hooks: check, start and write nothing
    (its ``state_dir`` is a temporary directory; files named by the config are not created)."""

    def __init__(
        self,
        config: GatewayConfig,
        addons: AddonManager | None = None,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.addons = addons or AddonManager()
        self.policy: Policy = Policy.empty(self.addons.vocabularies)
        self.policy_problems: list[str] = []
        self.audit = audit or AuditLog(
            config.resolve(str(config.section("audit").get("sqlite", self.state_dir / "audit.db")))
        )
        self.issuer = LocalIssuer(self.state_dir)
        self.verifier = self._make_verifier()
        # One thread per JWKS issuer: a provider slow to answer holds up only the logins with its own tokens.
        self._verify_threads: dict[str, ThreadPoolExecutor] = {}
        # The spool every audit and session event goes through before anything is forwarded.
        self.recordings = SessionRecorder.for_gateway(config, self.audit)
        self.recorder: Recorder = self.recordings
        from .approvals import ApprovalBroker as _ApprovalBroker

        self.approvals: ApprovalBroker | None = _ApprovalBroker.from_config(self, config.section("approvals"))
        self.sessions: dict[str, Session] = {}
        self._mask_key = self._load_mask_key()
        self._mask_cache: dict[tuple[str, tuple[str, ...]], MaskPlan] = {}
        self._empty_plan: MaskPlan | None = None
        self._audit_backlog: deque[tuple[str, dict[str, Any]]] = deque()
        self._audit_overflow = 0
        self._bursts: dict[str, _Burst] = {}
        self.started = time.time()

    # -- setup --------------------------------------------------------------------------------

    def _load_mask_key(self) -> bytes:
        key = load_mask_key(self.config, create=True)
        assert key is not None
        return key

    def _make_verifier(self) -> TokenVerifier:
        """The verifier of the ``identity:`` section; ConfigError says which entry is wrong, and where."""
        config = self.config
        section = config.section("identity")
        issuers_cfg = section.get("issuers") or [{"type": "lictor"}]
        issuers: list[IssuerConfig] = []
        for index, entry in enumerate(issuers_cfg):
            kind = entry["type"]
            if kind == "lictor":
                issuers.append(dataclasses.replace(self.issuer.config(), name=str(entry.get("name", "lictor"))))
                continue
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            audience = entry.get("audience", "lictor")
            auds = (audience,) if isinstance(audience, str) else tuple(audience)
            keys = []
            for k, p in enumerate(entry.get("public_keys", [])):
                try:
                    keys.append(load_pem_public_key(config.resolve(p).read_bytes()))
                except (OSError, ValueError, TypeError) as exc:  # missing, unreadable, not a PEM public key
                    where = config.where("identity", "issuers", index, "public_keys", k)
                    raise ConfigError(f"{where}: identity issuer {entry['issuer']}: public key {p}: {exc}") from None
            issuers.append(
                IssuerConfig(
                    name=str(entry.get("name", entry.get("issuer", kind))),
                    type=kind,
                    issuer=str(entry["issuer"]),
                    audience=auds,
                    algorithms=tuple(entry.get("algorithms", ["RS256", "ES256", "EdDSA"])),
                    jwks_url=str(entry.get("jwks_url", "")),
                    public_keys=tuple(keys),
                )
            )
        try:
            leeway = parse_duration(section.get("leeway", 30))
        except ValueError as exc:
            raise ConfigError(f"{config.where('identity', 'leeway')}: identity.leeway: {exc}") from None
        if leeway < 0:  # it refused every token for that long after it was issued, as "not valid yet"
            raise ConfigError(
                f"{config.where('identity', 'leeway')}: identity.leeway: {section.get('leeway')!r} is negative: "
                "it is the clock skew allowed for exp, nbf and iat (0 allows none)"
            )
        try:
            return TokenVerifier(issuers, leeway=leeway)
        except ValueError as exc:
            raise ConfigError(f"{config.where('identity', 'issuers')}: identity.issuers: {exc}") from None

    # -- policy -------------------------------------------------------------------------------

    def compile_policy(self) -> LoadResult:
        """Parse, validate and compile the configured rule packs off to the side (no swap)."""
        targets = {t.name: t.protocol for t in self.config.targets.values()}
        return load_policy(
            self.config.rulepacks,
            self.addons.vocabularies,
            targets=targets,
            mask_key=self._mask_key,
            role_references=self.config.role_references(self.addons.target_schemas),
        )

    def apply_policy(self, result: LoadResult, *, force: bool = False) -> bool:
        """Swap in a compiled policy if it is valid and new; True when a new version went live.

        An invalid result keeps the live policy; both outcomes are logged and audited. ``force``
        swaps in a valid policy of the live version too (the same packs compiled with a reloaded
        addon's vocabulary).
        """
        if result.policy is None:
            self.policy_problems = [str(p) for p in result.errors]
            for problem in result.errors:
                log.error("rule pack problem, keeping policy %s: %s", self.policy.version, problem)
            self.audit_event(
                "policy.rejected",
                {"kept_version": self.policy.version, "problems": self.policy_problems[:50]},
                fail_closed=False,
            )
            return False
        rejected = bool(self.policy_problems)
        self.policy_problems = []
        old = self.policy.version
        if result.policy.version == old and not force:
            if rejected:
                # the broken edit was undone: say so, or the log and the audit end on the rejection
                log.info("rule packs load again; policy %s stays live", old)
                self.audit_event(
                    "policy.loaded",
                    {"version": old, "previous": old, "files": [str(f) for f in result.files]},
                    fail_closed=False,
                )
            return False
        for problem in result.warnings:
            log.warning("%s", problem)
        self.policy = result.policy  # one assignment: requests see the old or the new policy
        self._mask_cache.clear()
        self.audit_event(
            "policy.loaded",
            {"version": result.policy.version, "previous": old, "files": [str(f) for f in result.files]},
            fail_closed=False,
        )
        log.info(
            "policy %s live (was %s; %d rules from %d files)",
            result.policy.version,
            old,
            len(result.policy.rules),
            len(result.files),
        )
        return True

    def load_policy(self) -> LoadResult:
        """Compile the configured rule packs and swap them in only if they are valid."""
        result = self.compile_policy()
        self.apply_policy(result)
        return result

    # -- identity -----------------------------------------------------------------------------

    def authenticate(self, token: str, *, protocol: str, target: str, peer: str) -> Identity:
        """Verify an agent token; failures are audited and raise AuthError (message for the agent).

        A token of a JWKS issuer may need the identity provider's keys fetched first: on an event loop,
        use :meth:`authenticate_async`, which does not hold up the other connections meanwhile."""
        try:
            identity = self.verifier.verify(token)
        except AuthError as exc:
            self._auth_failed(exc, protocol, target, peer)
            raise
        return identity

    async def authenticate_async(self, token: str, *, protocol: str, target: str, peer: str) -> Identity:
        """:meth:`authenticate` for addons on the event loop: a verification that may fetch keys over the
        network runs in its issuer's thread (one at a time per issuer: the fetch is shared anyway)."""
        try:
            return await self.verify_async(token)
        except AuthError as exc:
            self._auth_failed(exc, protocol, target, peer)
            raise

    async def verify_async(self, token: str) -> Identity:
        """Verify ``token`` (raises ``AuthError``) without blocking the event loop when that may fetch keys;
        nothing is audited (for the approvals page and API, which audit on their own)."""
        issuer = self.verifier.jwks_issuer(token)
        if issuer is None:
            return self.verifier.verify(token)
        thread = self._verify_threads.get(issuer)
        if thread is None:
            thread = self._verify_threads[issuer] = ThreadPoolExecutor(1, thread_name_prefix="lictor-jwks")
        return await asyncio.get_running_loop().run_in_executor(thread, self.verifier.verify, token)

    def _auth_failed(self, exc: AuthError, protocol: str, target: str, peer: str) -> None:
        self.audit_event(
            "auth.failed",
            {"protocol": protocol, "target": target, "peer": peer, "reason": str(exc)},
            fail_closed=False,
        )

    async def open_session(
        self, identity: Identity, *, protocol: str, target: str, peer: str, method: str = "jwt"
    ) -> Session:
        session = Session(self, identity, protocol, target, peer)
        session.meta["auth_method"] = method
        self.audit_event("session.start", session.to_json())  # raises (refusing the session) if not durable
        try:
            self.recorder.open(session)
        except BaseException as exc:
            # Refused before anything was recorded: the audit log says so, so that a session it knows of
            # and the recordings lack is never one whose recording was deleted.
            session.closed = True
            log.error("session of %s on %s refused: its recording could not start: %s", identity.subject, target, exc)
            self.audit_event(
                "session.end",
                {
                    **session.end_json(),
                    "reason": f"refused: its recording could not start ({exc})",
                    "recorded": False,
                },
                fail_closed=False,
            )
            raise
        self.sessions[session.id] = session
        try:
            await self.addons.trigger("session_start", session)
        except BaseException as exc:
            # The session is refused: the caller never gets it, so nobody would ever close it. Its
            # session_end hooks do not run: for the addons it never started. The operator learns which
            # addon refused it and why, whatever the protocol addon tells the agent.
            session.closed = True
            reason = "refused: a session_start hook failed"
            if isinstance(exc, HookError):
                reason = f"refused: {exc}"
                log.error("session of %s on %s refused: %s", identity.subject, target, exc)
            await self.end_session(session, {"reason": reason}, hooks=False)
            raise
        return session

    async def end_session(self, session: Session, summary: Mapping[str, Any], *, hooks: bool = True) -> None:
        self.sessions.pop(session.id, None)
        if hooks:
            try:
                await self.addons.trigger("session_end", session)
            except HookError as exc:
                log.error("%s", exc)
        # The audit's end first: the signed manifest that closes the recording then vouches for it (see
        # ``audited_end`` in docs/recording.md), so an audit log rolled back to before it does not go unseen.
        self.audit_event("session.end", {**session.end_json(), **summary}, fail_closed=False)
        self.recorder.close(session)

    # -- decisions ----------------------------------------------------------------------------

    def _policy_decision(self, session: Session, request: Request) -> Decision:
        policy = self.policy
        expires = session.identity.expires_at
        if expires is not None and time.time() > expires:
            # A connection does not outlive the token that opened it (an SSH connection shared by many
            # commands, a long shell): once the token has expired, nothing more is allowed on it.
            return Decision.deny(
                "your token has expired; reconnect with a fresh one", "lictor:token-expired", policy.version
            )
        extra: tuple[str, ...] = ()
        if self.approvals is not None:
            extra = self.approvals.elevated_roles(session.identity, session.target)
        return policy.decide(session.identity, request, roles=session.roles(policy), extra_roles=extra)

    def decide_sync(self, session: Session, request: Request) -> Decision:
        request = _on_target(session, request)
        try:
            addons, protocol = self.addons, request.protocol
            if addons.hooks_for("request", protocol) or addons.hooks_for("decision", protocol):
                flow = Flow(session, request)
                addons.trigger_sync_for("request", protocol, flow)
                flow._set(self._policy_decision(session, request))
                addons.trigger_sync_for("decision", protocol, flow)
                decision = flow.decision
                assert decision is not None
            else:
                decision = self._policy_decision(session, request)
        except Exception as exc:
            decision = self._failure(exc)
        return self._audited(session, request, decision)

    async def decide(
        self,
        session: Session,
        request: Request,
        notify: HoldNotifier | None = None,
        *,
        approval: Mapping[str, Any] | None = None,
    ) -> Decision:
        request = _on_target(session, request)
        try:
            addons, protocol = self.addons, request.protocol
            if addons.hooks_for("request", protocol) or addons.hooks_for("decision", protocol):
                flow = Flow(session, request)
                await addons.trigger_for("request", protocol, flow)
                flow._set(self._policy_decision(session, request))
                await addons.trigger_for("decision", protocol, flow)
                decision = flow.decision
                assert decision is not None
            else:
                decision = self._policy_decision(session, request)
        except Exception as exc:
            decision = self._failure(exc)
        decision = self._audited(session, request, decision)
        if decision.action != "approve":
            return decision
        return await self._hold(session, request, decision, notify, approval)

    async def hold(
        self, session: Session, request: Request, decision: Decision, notify: HoldNotifier | None = None
    ) -> Decision:
        """See :meth:`Session.hold`."""
        request = _on_target(session, request)
        if decision.action != "approve":
            return decision
        return await self._hold(session, request, decision, notify, None)

    async def _hold(
        self,
        session: Session,
        request: Request,
        decision: Decision,
        notify: HoldNotifier | None,
        approval: Mapping[str, Any] | None,
    ) -> Decision:
        if self.approvals is None:
            final = Decision.deny(
                f"{decision.message} — but this gateway has no approval service configured, so it is denied",
                decision.rule_ids[0],
                decision.policy_version,
            )
        else:
            if approval:
                decision = replace(decision, approval={**dict(decision.approval or {}), **approval})
            try:
                self.sync_owed()  # approvers see nothing of a hold whose decision is not yet durable
                final = await self.approvals.hold(session, request, decision, notify)
            except Exception as exc:
                final = self._failure(exc)
        return self._audited(session, request, final, phase="approval")

    def _failure(self, exc: BaseException) -> Decision:
        if isinstance(exc, HookError):
            log.error("%s — request denied (fail closed)", exc)
            where = f"addon {exc.addon!r}"
        else:
            log.exception("internal error while deciding — request denied (fail closed)")
            where = "the gateway"
        return Decision.deny(
            f"internal error in {where} while checking this request; it was denied (fail closed). "
            "Retry later or contact the gateway operators.",
            ADDON_ERROR,
            self.policy.version,
        )

    def _write_decision(self, session: Session, request: Request, decision: Decision, phase: str) -> None:
        event = {
            "session": session.id,
            "identity": session.identity.to_json(),
            "protocol": request.protocol,
            "target": request.target or session.target,
            "request": {
                "action": request.action,
                "summary": request.summary[:2000],
                "digest": request.digest(),
            },
            "reason": request.reason,
            "phase": phase,
            **decision.to_json(),
        }
        self.recordings.audit("decision", event, strict=decision.recording == "strict")

    def _audited(self, session: Session, request: Request, decision: Decision, phase: str = "decision") -> Decision:
        try:
            if self._audit_backlog:
                self._write_backlog()
            self._write_decision(session, request, decision, phase)
        except (AuditError, OSError) as exc:
            log.error("audit write failed, denying: %s", exc)
            return Decision.deny(
                "the audit store is unavailable, so nothing can be allowed right now (fail closed); retry later",
                "lictor:audit-unavailable",
                decision.policy_version,
            )
        return decision

    def defer_strict_sync(self) -> AbstractContextManager[None]:
        """Inside this context manager, on the calling thread, events of strict recordings are written but not
        synced one by one: they are owed until :meth:`sync_owed`, which must run before anything that depends on
        them leaves the gateway. For an addon that writes its output once per turn of the event loop, this makes
        one ``fdatasync`` per turn instead of one per event (and per connection)."""
        return self.recordings.defer_syncs()

    def owes_sync(self) -> bool:
        """Whether events deferred by :meth:`defer_strict_sync` are not yet on disk."""
        return self.recordings.owes_sync()

    def sync_owed(self) -> None:
        """Make the events deferred by :meth:`defer_strict_sync` durable; raises :class:`AuditError` when it cannot,
        and then nothing that depends on them may go out."""
        self.recordings.sync_owed()

    def audit_event(self, kind: str, event: Mapping[str, Any], *, fail_closed: bool = True) -> None:
        """Append an audit event. ``fail_closed=False`` is for events that report what already happened
        (nothing is left to refuse): if the spool takes no writes, the event waits in a bounded backlog
        and is written before the next event that gets through (see :data:`AUDIT_BACKLOG_LIMIT`)."""
        try:
            if self._audit_backlog:
                self._write_backlog()
            self.recordings.audit(kind, event)
        except (AuditError, OSError) as exc:
            if fail_closed:
                raise
            self._keep_for_later(kind, event, exc)

    def audit_burst(self, key: str, kind: str, event: Mapping[str, Any]) -> bool:
        """Audit an event that can come in floods (a connection refused at a limit) without letting the flood
        fill the audit spool: the first event of ``key`` is written at once (``count`` 1), the ones after it
        within :data:`BURST_INTERVAL` seconds as one event with their ``count`` when the interval ends (or
        the gateway stops). Like ``audit_event(..., fail_closed=False)``, it never raises. Returns True for
        the first event of a burst (log it then, not every time). Call it from the event loop."""
        burst = self._bursts.get(key)
        if burst is not None:
            burst.count += 1
            burst.event = event
            return False
        self.audit_event(kind, {**event, "count": 1}, fail_closed=False)
        handle = asyncio.get_running_loop().call_later(BURST_INTERVAL, self._end_burst, key)
        self._bursts[key] = _Burst(kind, event, 0, handle)
        return True

    def _end_burst(self, key: str) -> None:
        burst = self._bursts.pop(key, None)
        if burst is not None and burst.count:
            self.audit_event(burst.kind, {**burst.event, "count": burst.count}, fail_closed=False)

    def _keep_for_later(self, kind: str, event: Mapping[str, Any], exc: BaseException) -> None:
        if len(self._audit_backlog) >= AUDIT_BACKLOG_LIMIT:
            self._audit_overflow += 1
            log.error("audit write failed for %s and the backlog is full; event lost: %s", kind, exc)
            return
        self._audit_backlog.append((kind, {"ts": time.time(), **event, "delayed": True}))
        log.warning("audit write failed for %s (%s); kept in memory until the audit store takes writes", kind, exc)

    def _write_backlog(self) -> None:
        """Write the events kept while the spool took no writes (oldest first); raises on failure."""
        backlog = self._audit_backlog
        while backlog:
            kind, event = backlog[0]
            self.recordings.audit(kind, event)
            backlog.popleft()
        if self._audit_overflow:
            lost, self._audit_overflow = self._audit_overflow, 0
            self.recordings.audit("audit.lost", {"events": lost, "reason": "the in-memory backlog was full"})
        log.info("the audit events kept in memory are written")

    # -- masking ------------------------------------------------------------------------------

    def mask_plan(self, decision: Decision) -> MaskPlan:
        if not decision.masks:
            empty = self._empty_plan
            if empty is None:  # the masking package (re2) is imported on first use, not with lictor
                from .masking import MaskPlan

                empty = self._empty_plan = MaskPlan.EMPTY
            return empty
        key = (decision.policy_version, decision.mask_rule_ids)
        plan = self._mask_cache.get(key)
        if plan is None:
            from .masking import MaskPlan

            plan = MaskPlan.compile(list(decision.masks), custom_detectors=self.policy.detectors, key=self._mask_key)
            if len(self._mask_cache) > 1024:
                self._mask_cache.clear()
            self._mask_cache[key] = plan
        return plan

    # -- lifecycle ----------------------------------------------------------------------------

    def targets(self, protocol: str) -> list[Target]:
        return self.config.targets_for(protocol)

    async def start(self) -> None:
        self.recordings.start()
        self.addons.trigger_sync("configure", self)
        result = self.load_policy()
        if self.config.doc is not None:
            # A role the config names (read_only_roles) that no pack defines is the config's error, and the config is
            # read only now: refused here, before anything listens, so that the deployment that brought it fails
            # (and the replicas it would replace keep serving). A pack edit that drops such a role later is a
            # rejected reload like any other: the policy that defines it stays live.
            config_file = self.config.where().file
            wrong = [p for p in result.errors if p.loc.file == config_file]
            if wrong:
                raise ConfigError("\n".join(str(p) for p in wrong))
        await self.addons.trigger("policy_loaded", self.policy)
        if (start_approvals := getattr(self.approvals, "start", None)) is not None:
            await start_approvals()  # approval page/API, expiry sweeper, webhooks, LISTEN
        await self.addons.trigger("running", self)

    async def stop(self) -> None:
        try:
            if (stop_approvals := getattr(self.approvals, "stop", None)) is not None:
                await stop_approvals()  # held requests are denied before the listeners drain
            await self.addons.trigger("done", self)
        finally:
            for session in list(self.sessions.values()):
                await session.close(reason="gateway stopping")
            for key, burst in list(self._bursts.items()):
                burst.handle.cancel()
                self._end_burst(key)
            self.audit_event("gateway.stop", {"uptime": time.time() - self.started}, fail_closed=False)
            if self._audit_backlog:
                log.error(
                    "%d audit events kept in memory could not be written before stopping (the spool takes no "
                    "writes); they are lost: %s",
                    len(self._audit_backlog),
                    ", ".join(kind for kind, _ in self._audit_backlog),
                )
            for thread in self._verify_threads.values():
                thread.shutdown(wait=False, cancel_futures=True)
            self.recordings.stop()
            self.audit.close()
