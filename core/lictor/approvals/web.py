"""The approval page (server-rendered HTML, plain forms, no JavaScript) and the JSON API for the CLI.

Pages: approvers log in with a token (``lictor token issue`` or their identity provider's JWT),
verified like an agent's; the page then keeps a server-side session behind an HttpOnly,
SameSite=Strict cookie. Every form that changes something carries a CSRF token tied to the session
(the login form carries one tied to a pre-login cookie). Everything shown is escaped: the request
text, the agent's reason and even the subject come from the agent and are hostile.

API (``/api/...``): ``Authorization: Bearer <token>`` on every call; cookies are ignored there, so
the API cannot be driven cross-site.

Other parts of the gateway can mount pages behind the same login::

    web.server.add_route("GET", "/sessions", handler)   # handler(request) -> HttpResponse
    identity = web.identity(request)                    # None: not logged in
    web.login_checks.append(lambda identity: ...)       # who else may log in
    web.page("Title", body_html, request)               # the common layout
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._text import has_rtl, non_ascii_names, printable, rtl_runs
from ..identity import AuthError, Identity
from ._model import APPROVED, PENDING, Approval, ApprovalError, format_duration
from .http import BadRequest, HttpRequest, HttpResponse, HttpServer, bounded_number, error_response

if TYPE_CHECKING:
    from .broker import ApprovalBroker

__all__ = ["WebApp", "esc", "esc_attr"]

SESSION_COOKIE = "lictor_session"
LOGIN_COOKIE = "lictor_login"
MAX_SESSIONS = 10_000
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def esc_attr(value: object) -> str:
    """HTML-escape anything for a double-quoted attribute (or a ``<title>``): as :func:`esc`, without markup."""
    return html.escape(printable(value), quote=True)


def esc(value: object) -> str:
    """HTML-escape anything for the text of an element. Characters that are invisible or reorder what
    follows (bidirectional overrides, zero-width spaces, control characters) are shown as ``\\xNN``
    escapes, and every run of right-to-left letters (or Arabic digits) is isolated (``<bdi>``), so that the request an
    approver reads is the request that runs: between two Hebrew or Arabic letters, the bidirectional
    algorithm would otherwise show numbers and operators right to left (``/*א*/ 1000000 - 1 /*ב*/`` read
    as ``1 - 1000000``). Right-to-left words read in their own direction, each in its place."""
    shown = printable(value)
    if not has_rtl(shown):
        return html.escape(shown, quote=True)
    out, last = [], 0
    for m in rtl_runs().finditer(shown):
        out += [html.escape(shown[last : m.start()], quote=True), "<bdi>", html.escape(m.group(), quote=True), "</bdi>"]
        last = m.end()
    out.append(html.escape(shown[last:], quote=True))
    return "".join(out)


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def esc_marked(value: object) -> tuple[str, list[str]]:
    """:func:`esc`, with every character outside ASCII highlighted (``<mark>``), and the distinct ones named:
    a Cyrillic a (U+0430) in ``<> 'admin'`` looks like the Latin one, and the statement would then leave
    out no one."""
    shown = printable(value)
    out, last = [], 0
    for m in _NON_ASCII.finditer(shown):
        out += [html.escape(shown[last : m.start()], quote=True), "<mark>", esc(m.group()), "</mark>"]
        last = m.end()
    out.append(html.escape(shown[last:], quote=True))
    return "".join(out), non_ascii_names(shown)


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2329;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1rem;align-items:center}
header a{color:#fff}header .who{margin-left:auto}main{padding:1rem 1.2rem;max-width:72rem}
table{border-collapse:collapse;width:100%;background:#fff}th,td{border:1px solid #d8dde3;padding:.35rem .5rem;
text-align:left;vertical-align:top}th{background:#eef1f4}pre{background:#fff;border:1px solid #d8dde3;
padding:.6rem;white-space:pre-wrap;word-break:break-all}
.flash{padding:.5rem .8rem;border-radius:4px;margin:.5rem 0}.ok{background:#e3f6e8}.err{background:#fde7e7}
.warn{background:#fff4d6}form.inline{display:inline-block;margin-right:1.5rem;vertical-align:top}
textarea{width:24rem;height:4rem}button{padding:.35rem .9rem}.status-pending{color:#a05a00;font-weight:bold}
.status-approved,.status-used{color:#11702d}.status-denied,.status-expired,.status-withdrawn{color:#a01c1c}
dl{display:grid;grid-template-columns:12rem 1fr;gap:.2rem .8rem}dt{font-weight:bold}dd{margin:0}
"""


@dataclass
class WebSession:
    identity: Identity
    csrf: str
    expires_at: float


class WebApp:
    """Routes of the approval page and API on ``server``."""

    def __init__(self, broker: ApprovalBroker, server: HttpServer) -> None:
        self.broker = broker
        self.server = server
        self.secure_cookies = broker.public_url.startswith("https://")
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, WebSession] = {}
        self.login_checks: list[Callable[[Identity], bool]] = [broker.is_approver]
        routes = [
            ("GET", "/healthz", self.healthz),
            ("GET", "/static/lictor.css", self.css),
            ("GET", "/login", self.login_form),
            ("POST", "/login", self.login),
            ("POST", "/logout", self.logout),
            ("GET", "/approvals", self.approvals_page),
            ("POST", "/approvals", self.approvals_post),
            ("GET", "/api/approvals", self.api_get),
            ("POST", "/api/approvals", self.api_post),
            ("GET", "/", self.root),
        ]
        for method, prefix, handler in routes:
            server.add_route(method, prefix, handler)

    # -- sessions -----------------------------------------------------------------------------------

    def identity(self, request: HttpRequest) -> Identity | None:
        """The logged-in identity of a page request, or None."""
        session = self._session(request)
        return session.identity if session else None

    def _session(self, request: HttpRequest) -> WebSession | None:
        sid = request.cookies().get(SESSION_COOKIE, "")
        session = self._sessions.get(sid) if sid else None
        if session is None:
            return None
        if session.expires_at <= time.time():
            self._sessions.pop(sid, None)
            return None
        return session

    def csrf_field(self, request: HttpRequest) -> str:
        session = self._session(request)
        return f'<input type="hidden" name="csrf" value="{esc_attr(session.csrf if session else "")}">'

    def check_csrf(self, request: HttpRequest, form: dict[str, str]) -> WebSession:
        """The session of a POSTed form whose CSRF token matches; raises BadRequest otherwise."""
        session = self._session(request)
        if session is None:
            raise BadRequest(401, "not logged in")
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise BadRequest(403, "bad or missing CSRF token; reload the page and try again")
        return session

    def _login_csrf(self, nonce: str) -> str:
        return hmac.new(self._key, b"login:" + nonce.encode(), hashlib.sha256).hexdigest()

    # -- layout -------------------------------------------------------------------------------------

    def page(self, title: str, body: str, request: HttpRequest, status: int = 200) -> HttpResponse:
        identity = self.identity(request)
        who = ""
        if identity is not None:
            who = (
                f'<span class="who">{esc(identity.subject)} '
                f'<form class="inline" method="post" action="/logout">{self.csrf_field(request)}'
                '<button type="submit">Log out</button></form></span>'
            )
        doc = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc_attr(title)} · Lictor</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="stylesheet" href="/static/lictor.css"></head><body>'
            f'<header><strong>Lictor</strong><a href="/approvals">Approvals</a>{who}</header>'
            f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
        )
        return HttpResponse.html(doc, status)

    def _login_redirect(self) -> HttpResponse:
        return HttpResponse.redirect("/login")

    # -- plain pages ----------------------------------------------------------------------------------

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse.text("ok\n")

    async def css(self, request: HttpRequest) -> HttpResponse:
        resp = HttpResponse.text(CSS, content_type="text/css; charset=utf-8")
        resp.headers.append(("Cache-Control", "max-age=300"))
        return resp

    async def root(self, request: HttpRequest) -> HttpResponse:
        if request.path != "/":
            return error_response(request, "Not Found", 404)
        return HttpResponse.redirect("/approvals")

    async def login_form(self, request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
        nonce = secrets.token_urlsafe(16)
        flash = f'<p class="flash err">{esc(error)}</p>' if error else ""
        body = (
            f"{flash}<p>Log in with your approver token (from your identity provider or "
            "<code>lictor token issue</code>).</p>"
            '<form method="post" action="/login">'
            f'<input type="hidden" name="csrf" value="{esc_attr(self._login_csrf(nonce))}">'
            '<p><label for="token">Token</label><br>'
            '<textarea id="token" name="token" required autocomplete="off"></textarea></p>'
            '<p><button type="submit">Log in</button></p></form>'
        )
        resp = self.page("Log in", body, request, status)
        resp.set_cookie(LOGIN_COOKIE, nonce, max_age=900, secure=self.secure_cookies)
        return resp

    async def login(self, request: HttpRequest) -> HttpResponse:
        form = request.form()
        nonce = request.cookies().get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(form.get("csrf", "").encode(), self._login_csrf(nonce).encode()):
            return await self.login_form(request, "the login form expired; try again", 403)
        try:
            identity = await self.broker.gateway.verify_async(form.get("token", ""))
            if identity.expires_at is not None and identity.expires_at <= time.time():
                # accepted within the clock leeway, but a session cannot end before it begins
                raise AuthError("token expired: get a fresh one")
        except AuthError as exc:
            self.broker.gateway.audit_event(
                "approvals.login_failed", {"peer": request.peer, "reason": str(exc)}, fail_closed=False
            )
            return await self.login_form(request, f"login failed: {exc}", 401)
        if not any(check(identity) for check in self.login_checks):
            self.broker.gateway.audit_event(
                "approvals.login_refused", {"peer": request.peer, "identity": identity.to_json()}, fail_closed=False
            )
            return await self.login_form(
                request, f"{identity.subject} is authenticated but none of its roles may approve anything here", 403
            )
        now = time.time()
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions = {k: v for k, v in self._sessions.items() if v.expires_at > now}
            if len(self._sessions) >= MAX_SESSIONS:
                return await self.login_form(request, "too many open sessions; try again later", 503)
        expires = now + self.broker.session_ttl
        if identity.expires_at is not None:
            expires = min(expires, identity.expires_at)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = WebSession(identity, secrets.token_urlsafe(32), expires)
        self.broker.gateway.audit_event(
            "approvals.login", {"peer": request.peer, "identity": identity.to_json()}, fail_closed=False
        )
        resp = HttpResponse.redirect("/approvals")
        resp.set_cookie(SESSION_COOKIE, sid, max_age=max(1, int(expires - now)), secure=self.secure_cookies)
        resp.set_cookie(LOGIN_COOKIE, "", max_age=0, secure=self.secure_cookies)
        return resp

    async def logout(self, request: HttpRequest) -> HttpResponse:
        self.check_csrf(request, request.form())
        self._sessions.pop(request.cookies().get(SESSION_COOKIE, ""), None)
        resp = HttpResponse.redirect("/login")
        resp.set_cookie(SESSION_COOKIE, "", max_age=0, secure=self.secure_cookies)
        return resp

    # -- approval pages -----------------------------------------------------------------------------

    async def approvals_page(self, request: HttpRequest) -> HttpResponse:
        identity = self.identity(request)
        if identity is None:
            return self._login_redirect()
        rest = request.path[len("/approvals") :].strip("/")
        if not rest:
            return await self._list_page(request, identity)
        if "/" in rest or not _ID.match(rest):
            return self.page("Not found", "<p>No such page.</p>", request, 404)
        return await self._detail_page(request, identity, rest)

    async def _list_page(self, request: HttpRequest, identity: Identity) -> HttpResponse:
        now = time.time()
        pending = await self.broker.recent_for(identity, pending=True, limit=200)
        history = await self.broker.recent_for(identity, pending=False, limit=100)
        parts = ["<h2>Pending</h2>"]
        if pending:
            parts.append(
                "<table><thead><tr><th>ID</th><th>Requester</th><th>Target</th><th>Rule</th><th>Request</th>"
                "<th>Agent's reason</th><th>Approvals</th><th>Time left</th></tr></thead><tbody>"
            )
            for a in pending:
                parts.append(
                    f'<tr><td><a href="/approvals/{esc_attr(a.id)}">{esc(a.id)}</a></td>'
                    f"<td>{esc(a.requester_sub)}</td><td>{esc(a.target)} ({esc(a.protocol)})</td>"
                    f"<td>{esc(', '.join(a.rule_ids))}</td>"
                    f"<td><code>{esc(_clip(a.summary or a.action, 160))}</code></td>"
                    f"<td>{esc(_clip(a.reason or '', 160))}</td>"
                    f"<td>{a.approvals_given} of {a.spec.required}</td>"
                    f"<td>{esc(format_duration(max(0.0, a.expires_at - now)))}</td></tr>"
                )
            parts.append("</tbody></table>")
        else:
            parts.append("<p>Nothing is waiting for you.</p>")
        parts.append("<h2>History</h2>")
        if history:
            parts.append(
                "<table><thead><tr><th>ID</th><th>Status</th><th>Requester</th><th>Target</th><th>Request</th>"
                "<th>Decided by</th><th>Reason</th><th>When</th></tr></thead><tbody>"
            )
            for a in history:
                parts.append(
                    f'<tr><td><a href="/approvals/{esc_attr(a.id)}">{esc(a.id)}</a></td>'
                    f'<td class="status-{esc_attr(a.status)}">{esc(a.status)}</td><td>{esc(a.requester_sub)}</td>'
                    f"<td>{esc(a.target)}</td><td><code>{esc(_clip(a.summary or a.action, 120))}</code></td>"
                    f"<td>{esc(', '.join(a.decided_by))}</td><td>{esc(_clip(a.decision_reason, 120))}</td>"
                    f"<td>{esc(_when(a.decided_at))}</td></tr>"
                )
            parts.append("</tbody></table>")
        else:
            parts.append("<p>No decided requests yet.</p>")
        return self.page("Approvals", "".join(parts), request)

    async def _detail_page(
        self, request: HttpRequest, identity: Identity, approval_id: str, flash: str = "", status: int = 200
    ) -> HttpResponse:
        a = await self.broker.get(approval_id)
        if a is None or not self.broker.may_view(identity, a):
            kept = format_duration(self.broker.retention)
            return self.page(
                "Not found",
                "<p>No such approval request, or it is not yours to decide. Requests that ended are removed "
                f"{kept} later; the audit log keeps their decisions.</p>",
                request,
                404,
            )
        now = time.time()
        done = request.param("done")
        notes = []
        if flash:
            notes.append(f'<p class="flash err">{esc(flash)}</p>')
        elif done in ("approve", "deny"):
            notes.append(f'<p class="flash ok">Your {"approval" if done == "approve" else "denial"} was recorded.</p>')
        if a.payload_truncated:
            notes.append(
                '<p class="flash warn">The request is too long to show in full; only its beginning and its end are '
                "shown. The approval is bound to the digest of the whole request.</p>"
            )
        rows = [
            ("Status", f'<span class="status-{esc_attr(a.status)}">{esc(a.status)}</span>'),
            ("Requester", f"{esc(a.requester_sub)} <small>(issuer {esc(a.requester_iss)})</small>"),
            ("Target", f"{esc(a.target)} ({esc(a.protocol)})"),
            ("Action", esc(a.action)),
            ("Rule", f"{esc(', '.join(a.rule_ids))} — {esc(a.rule_message)}"),
            ("Needs", esc(a.spec.describe())),
            ("Agent's reason", esc(a.reason) if a.reason else "<em>none given</em>"),
            ("Requested", esc(_when(a.created_at))),
            (
                "Time left" if a.status == PENDING else "Expires",
                esc(format_duration(max(0.0, a.expires_at - now))) if a.status == PENDING else esc(_when(a.expires_at)),
            ),
            ("Approvals", f"{a.approvals_given} of {a.spec.required}"),
            ("Digest", f"<code>{esc(a.digest)}</code>"),
            ("Session", f"{esc(a.session_id)} from {esc(a.peer)}"),
            ("Policy", esc(a.policy_version)),
        ]
        if a.decided_at is not None:
            rows.append(("Decided", f"{esc(_when(a.decided_at))} by {esc(', '.join(a.decided_by))}"))
        if a.decision_reason:
            rows.append(("Decision reason", esc(a.decision_reason)))
        if a.elevated_until is not None:
            rows.append(("Elevated until", esc(_when(a.elevated_until))))
        body = [*notes, "<dl>", *(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows), "</dl>"]
        payload, foreign = esc_marked(a.payload)
        attrs = dict(a.attrs)
        text, omitted = attrs.pop("body_text", None), attrs.pop("body_text_omitted_bytes", 0)
        shown_body, body_foreign = esc_marked(text) if isinstance(text, str) else ("", [])
        foreign += [name for name in body_foreign if name not in foreign]
        if foreign:
            listed = ", ".join(foreign[:12]) + (f" and {len(foreign) - 12} more" if len(foreign) > 12 else "")
            body.append(
                f'<p class="flash warn" id="non-ascii">The request holds characters outside ASCII (highlighted); some '
                f"look like ASCII letters or digits but are not: {esc(listed)}.</p>"
            )
        body.append(f'<h2>Request</h2><pre id="payload">{payload}</pre>')
        if a.summary and a.summary != a.payload:
            body.append(f"<h3>Summary</h3><pre>{esc(a.summary)}</pre>")
        body.append(f"<h3>Attributes</h3><pre>{esc(json.dumps(attrs, indent=2, sort_keys=True))}</pre>")
        if isinstance(text, str):
            more = f"<p>… {int(omitted)} more bytes not shown; the digest covers them</p>" if omitted else ""
            body.append(f'<h3>Body</h3><pre id="body">{shown_body}</pre>{more}')
        if a.votes:
            body.append("<h2>Votes</h2><table><thead><tr><th>Approver</th><th>Verdict</th><th>Reason</th><th>When</th>")
            body.append("</tr></thead><tbody>")
            for v in a.votes:
                body.append(
                    f"<tr><td>{esc(v.subject)}</td><td>{esc(v.verdict)}</td><td>{esc(v.reason)}</td>"
                    f"<td>{esc(_when(v.at))}</td></tr>"
                )
            body.append("</tbody></table>")
        if a.status == PENDING:
            body.append(self._decision_forms(request, identity, a))
        return self.page(f"Approval {a.id}", "".join(body), request, status)

    def _decision_forms(self, request: HttpRequest, identity: Identity, a: Approval) -> str:
        if a.is_requester(identity):
            return '<p class="flash warn">This is your own request; someone else has to decide it.</p>'
        if any(v.subject == identity.subject and v.issuer == identity.issuer for v in a.votes):
            return '<p class="flash warn">You already voted; each approver counts once.</p>'
        csrf = self.csrf_field(request)
        base = f"/approvals/{esc_attr(a.id)}"
        return (
            "<h2>Decide</h2>"
            f'<form class="inline" method="post" action="{base}/approve">{csrf}'
            '<p><label for="approve-reason">Reason (optional)</label><br>'
            '<textarea id="approve-reason" name="reason"></textarea></p>'
            '<p><button type="submit" id="approve" name="verdict" value="approve">Approve</button></p></form>'
            f'<form class="inline" method="post" action="{base}/deny">{csrf}'
            '<p><label for="deny-reason">Reason (required; the agent is told)</label><br>'
            '<textarea id="deny-reason" name="reason" required></textarea></p>'
            '<p><button type="submit" id="deny" name="verdict" value="deny">Deny</button></p></form>'
        )

    async def approvals_post(self, request: HttpRequest) -> HttpResponse:
        parts = request.path[len("/approvals") :].strip("/").split("/")
        if len(parts) != 2 or not _ID.match(parts[0]) or parts[1] not in ("approve", "deny"):
            return self.page("Not found", "<p>No such page.</p>", request, 404)
        approval_id, verdict = parts
        form = request.form()
        session = self.check_csrf(request, form)
        try:
            await self.broker.vote(session.identity, approval_id, verdict, form.get("reason", ""))
        except ApprovalError as exc:
            return await self._detail_page(request, session.identity, approval_id, flash=str(exc), status=exc.status)
        return HttpResponse.redirect(f"/approvals/{approval_id}?done={verdict}")

    # -- JSON API -----------------------------------------------------------------------------------

    async def _api_identity(self, request: HttpRequest) -> Identity | HttpResponse:
        auth = request.header("authorization")
        if not auth.lower().startswith("bearer "):
            return HttpResponse.json({"error": "send Authorization: Bearer <token>"}, 401)
        try:
            identity = await self.broker.gateway.verify_async(auth)
            if identity.expires_at is not None and identity.expires_at <= time.time():
                # accepted within the clock leeway: each call is a new use, and a token is not used after its exp
                # (the page's login refuses it, a protocol session denies every request once exp has passed)
                raise AuthError("token expired: get a fresh one")
            return identity
        except AuthError as exc:
            self.broker.gateway.audit_event(
                "approvals.login_failed", {"peer": request.peer, "reason": str(exc), "via": "api"}, fail_closed=False
            )
            return HttpResponse.json({"error": f"authentication failed: {exc}"}, 401)

    async def api_get(self, request: HttpRequest) -> HttpResponse:
        identity = await self._api_identity(request)
        if isinstance(identity, HttpResponse):
            return identity
        rest = request.path[len("/api/approvals") :].strip("/")
        now = time.time()
        if not rest:
            if not self.broker.is_approver(identity):
                # as the page refuses its login: an empty list would tell whoever passed an agent's token by
                # mistake that nothing is waiting
                self.broker.gateway.audit_event(
                    "approvals.login_refused",
                    {"peer": request.peer, "identity": identity.to_json(), "via": "api"},
                    fail_closed=False,
                )
                return HttpResponse.json(
                    {"error": f"{identity.subject} is authenticated but none of its roles may approve anything here"},
                    403,
                )
            which = request.param("status", "pending")
            pending = {"pending": True, "decided": False, "all": None}.get(which, True)
            given = bounded_number(request.param("limit", ""), 500)
            limit = 100 if given is None else max(given, 1)
            items = await self.broker.recent_for(identity, pending=pending, limit=limit)
            return HttpResponse.json({"now": now, "approvals": [a.to_json() for a in items]})
        if "/" in rest or not _ID.match(rest):
            return HttpResponse.json({"error": "not found"}, 404)
        a = await self.broker.get(rest)
        if a is None or not self.broker.may_view(identity, a):
            return HttpResponse.json({"error": self.broker.not_found(rest, " that you may decide")}, 404)
        return HttpResponse.json({"now": now, "approval": a.to_json()})

    async def api_post(self, request: HttpRequest) -> HttpResponse:
        identity = await self._api_identity(request)
        if isinstance(identity, HttpResponse):
            return identity
        parts = request.path[len("/api/approvals") :].strip("/").split("/")
        if len(parts) != 2 or not _ID.match(parts[0]) or parts[1] not in ("approve", "deny"):
            return HttpResponse.json({"error": "POST /api/approvals/ID/approve or /deny"}, 404)
        body = request.json()
        reason = body.get("reason", "") if isinstance(body, dict) else ""
        if not isinstance(reason, str):
            return HttpResponse.json({"error": "reason must be a string"}, 400)
        try:
            after = await self.broker.vote(identity, parts[0], parts[1], reason)
        except ApprovalError as exc:
            return HttpResponse.json({"error": str(exc)}, exc.status)
        return HttpResponse.json(
            {"now": time.time(), "approval": after.to_json(), "approved": after.status == APPROVED}
        )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
