"""``lictor approvals list | show ID | approve ID | deny ID``: decide from a terminal.

The CLI talks to the running gateway's approvals API (``approvals.listen`` in the config, or
``--url``) as an approver, with a token from ``--token`` or ``LICTOR_TOKEN``. The gateway checks the
token and the approver's roles exactly as for the web page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._text import count_arg, left_to_right, non_ascii_names, printable

__all__ = ["register"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _safe(text: Any, limit: int | None = None) -> str:
    """Agent-controlled text without terminal control sequences, and a left-to-right mark after each run of
    right-to-left letters (for terminals that reorder text: see left_to_right)."""
    return left_to_right(printable(text, limit))


def _one_line(text: Any, limit: int) -> str:
    return _safe(" ".join(str(text or "").split()), limit)


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    from ..config import load_config

    path = args.config or ("lictor.yaml" if Path("lictor.yaml").exists() else None)
    if path is None:
        raise CliError("no gateway to talk to: pass --url http://HOST:PORT or -c lictor.yaml", EXIT_USAGE)
    config = load_config(path, offline=True)
    listen = config.section("approvals").get("listen")
    if not listen:
        raise CliError(
            f"{path}: approvals.listen is not set, so the gateway serves no approvals API; "
            "set it (e.g. 127.0.0.1:8470) or pass --url",
            EXIT_USAGE,
        )
    host, _, port = str(listen).rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


_URL_HINT = (
    "--url takes the address the gateway's approvals.listen serves, such as http://127.0.0.1:8470, "
    "not the link to a page such as http://127.0.0.1:8470/approvals/ap-..."
)


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    token = args.token or os.environ.get("LICTOR_TOKEN", "")
    if not token:
        raise CliError("no token: pass --token or set LICTOR_TOKEN (an approver's token)", EXIT_USAGE)
    base = _base_url(args)
    url = base + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) URL from config/--url
    req.add_header("Authorization", f"Bearer {token.strip()}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # noqa: S310
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
        except ValueError:
            answer = None
        message = str(answer.get("error", "")) if isinstance(answer, dict) else ""
        if exc.code == 404:
            if not message:  # not the API's own answer (which names the id): another page or server
                raise CliError(f"not found: {url} is not the approvals API ({_URL_HINT})") from None
            raise CliError(f"not found: {message}") from None
        where = f"approvals API at {base}"
        if exc.code == 401:
            # A token that does not verify is often one from another gateway answering on this address (two
            # gateways on one machine, each with its own issuer): name the address so that it can be checked.
            where += "; is that the gateway whose approver token this is?"
        raise CliError(f"gateway refused ({exc.code}): {message or exc.reason} ({where})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the gateway's approvals API at {url}: {reason}") from None
    try:
        result = json.loads(raw or b"{}")
    except ValueError:
        # the address of a page (the link in an agent's notice) or of another server: it answers with HTML
        raise CliError(f"the answer from {url} is not the approvals API's ({_URL_HINT})") from None
    if not isinstance(result, dict):
        raise CliError("unexpected answer from the gateway")
    return result


def _left(a: dict[str, Any], now: float) -> str:
    from ._model import format_duration

    if a.get("status") != "pending":
        return str(a.get("status", ""))
    return format_duration(max(0.0, float(a["expires_at"]) - now))


def cmd_list(args: argparse.Namespace) -> int:
    which = "all" if args.all else ("decided" if args.decided else "pending")
    result = _call(args, "GET", f"/api/approvals?status={which}&limit={args.limit}")
    items = result.get("approvals", [])
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    if not items:
        print("no pending approval requests" if which == "pending" else "no approval requests")
        return EXIT_OK
    now = float(result.get("now", time.time()))
    print(f"{'ID':14} {'LEFT/STATUS':12} {'REQUESTER':18} {'TARGET':14} {'RULE':26} {'OK':5} REQUEST")
    for a in items:
        print(
            f"{_one_line(a['id'], 14):14} {_left(a, now):12} {_one_line(a['requester']['sub'], 18):18} "
            f"{_one_line(a['target'], 14):14} {_one_line(','.join(a['rule_ids']), 26):26} "
            f"{a['approvals_given']}/{a['approval']['required']:<3} {_one_line(a['summary'] or a['action'], 80)}"
        )
    return EXIT_OK


def _needs(spec: dict[str, Any]) -> str:
    """``2 of roles dba``; with several rules' approvers, each group that must approve."""
    groups = spec.get("all_of") or [spec]
    return " and ".join(f"{g['required']} of roles {', '.join(g['approvers'])}" for g in groups)


def _print_approval(a: dict[str, Any], now: float) -> None:
    spec = a["approval"]
    rows = [
        ("id", a["id"]),
        ("status", a["status"]),
        ("requester", f"{a['requester']['sub']} (issuer {a['requester']['iss']})"),
        ("target", f"{a['target']} ({a['protocol']})"),
        ("action", a["action"]),
        ("rule", f"{', '.join(a['rule_ids'])}: {a['rule_message']}"),
        ("needs", f"{_needs(spec)} (scope {spec['scope']})"),
        ("approvals", f"{a['approvals_given']} of {spec['required']}"),
        ("time left", _left(a, now)),
        ("agent's reason", a.get("reason") or "(none)"),
        ("digest", a["digest"]),
        ("session", f"{a['session']} from {a['peer']}"),
    ]
    if a.get("decided_by"):
        rows.append(("decided by", ", ".join(a["decided_by"])))
    if a.get("decision_reason"):
        rows.append(("decision reason", a["decision_reason"]))
    for k, v in rows:
        print(f"{k + ':':16} {_one_line(v, 400)}")
    for v in a.get("votes", []):
        print(f"{'vote:':16} {_one_line(v['sub'], 40)} {v['verdict']} {_one_line(v.get('reason', ''), 200)}")
    attrs = dict(a.get("attrs") or {})
    text, omitted = attrs.pop("body_text", None), attrs.pop("body_text_omitted_bytes", 0)
    summary = a.get("summary") or ""
    if summary == a["payload"]:
        summary = ""
    names = non_ascii_names(printable(a["payload"]) + printable(text or "") + printable(summary))
    if names:
        # a Cyrillic a looks like a Latin one: the terminal cannot show the difference, the names can
        more = f" and {len(names) - 12} more" if len(names) > 12 else ""
        print(f"{'note:':16} the request holds characters outside ASCII: {', '.join(names[:12])}{more}")
    print("request:")
    for line in _safe(a["payload"]).splitlines() or [""]:
        print(f"  {line}")
    if a.get("payload_truncated"):
        print("  … (its middle is not shown; the approval is bound to the digest of the whole request)")
    if summary:
        # as the page shows it: the addon's summary can say what else decides what the request does
        print("summary:")
        for line in _safe(summary).splitlines():
            print(f"  {line}")
    if attrs:
        print("attributes:")
        for line in _safe(json.dumps(attrs, indent=2, sort_keys=True, ensure_ascii=False)).splitlines():
            print(f"  {line}")
    if isinstance(text, str):
        print("body:")
        for line in _safe(text).splitlines() or [""]:
            print(f"  {line}")
        if omitted:
            print(f"  … {omitted} more bytes not shown (the approval is bound to the digest of the whole body)")


def cmd_show(args: argparse.Namespace) -> int:
    result = _call(args, "GET", f"/api/approvals/{quote(args.id, safe='')}")
    if args.json:
        print(json.dumps(result["approval"], indent=2))
    else:
        _print_approval(result["approval"], float(result.get("now", time.time())))
    return EXIT_OK


def _confirmed(args: argparse.Namespace) -> bool:
    """On a terminal, ``approve`` shows the request and asks first: an agent's notice hands out the very
    command, and an approver who pastes it must not approve what they never saw."""
    if args.yes or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return True
    result = _call(args, "GET", f"/api/approvals/{quote(args.id, safe='')}")
    _print_approval(result["approval"], float(result.get("now", time.time())))
    try:
        answer = input(f"approve {_safe(args.id)} as shown above? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _vote(args: argparse.Namespace, verdict: str) -> int:
    reason = args.reason or ""
    if verdict == "deny" and not reason.strip():
        raise CliError("deny needs --reason (the agent is told why)", EXIT_USAGE)
    if verdict == "approve" and not _confirmed(args):
        raise CliError(f"{_safe(args.id)} not approved")
    result = _call(args, "POST", f"/api/approvals/{quote(args.id, safe='')}/{verdict}", {"reason": reason})
    a = result["approval"]
    if a["status"] == "pending":
        print(
            f"{verdict}d {_safe(a['id'])}: {a['approvals_given']} of {a['approval']['required']} approvals; "
            "still waiting for more"
        )
    else:
        print(f"{_safe(a['id'])} is now {a['status']}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _vote(args, "approve")


def cmd_deny(args: argparse.Namespace) -> int:
    return _vote(args, "deny")


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except CliError as exc:
            print(f"lictor approvals: {exc}", file=sys.stderr)
            return exc.code

    return run


def register(subparsers: Any) -> None:
    """Add ``lictor approvals ...`` to the ``lictor`` command line."""
    parser = subparsers.add_parser("approvals", help="list and decide approval requests on a running gateway")
    sub = parser.add_subparsers(dest="approvals_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c", "--config", help="gateway config (default: ./lictor.yaml): the API address is its approvals.listen"
        )
        sp.add_argument("--url", help="the approvals API, e.g. http://127.0.0.1:8470 (overrides the config)")
        sp.add_argument("--token", help="your approver token (default: $LICTOR_TOKEN)")
        sp.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the gateway")

    sp = sub.add_parser("list", help="pending requests (or --all / --decided)")
    common(sp)
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="pending and decided requests")
    group.add_argument("--decided", action="store_true", help="decided requests only")
    sp.add_argument("--limit", type=count_arg, default=100, help="at most this many (default: 100)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=_guard(cmd_list))

    sp = sub.add_parser("show", help="the full request and context of one approval")
    common(sp)
    sp.add_argument("id", help="the approval id, ap-...")
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=_guard(cmd_show))

    sp = sub.add_parser("approve", help="approve a request (counts once per approver)")
    common(sp)
    sp.add_argument("id", help="the approval id, ap-...")
    sp.add_argument("--reason", default="", help="why (recorded with your vote)")
    sp.add_argument(
        "-y", "--yes", action="store_true", help="do not show the request and ask first (on a terminal, it does)"
    )
    sp.set_defaults(func=_guard(cmd_approve))

    sp = sub.add_parser("deny", help="deny a request; the agent is told the reason")
    common(sp)
    sp.add_argument("id", help="the approval id, ap-...")
    sp.add_argument("--reason", required=True, help="why; the agent is told it")
    sp.set_defaults(func=_guard(cmd_deny))
