"""The ``lictor`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._text import count_arg, printable
from ._yaml import YamlError, load_documents, plain
from .addons import AddonManager, HookError, load_addon_spec
from .audit import AuditLog, chain_problem
from .config import LOG_LEVELS, ConfigError, GatewayConfig, load_config
from .identity import LocalIssuer, parse_duration
from .policy import Trace
from .policy_types import combine
from .policytest import build_requests, format_report, identity_from_spec, run_tests
from .rulepacks import load_policy, schema_json

log = logging.getLogger("lictor")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _manager(
    config: GatewayConfig | None, specs: dict[str, list[Any]] | None = None, extra: Sequence[str] = ()
) -> AddonManager:
    """The built-in addons, those named with ``--addon``, and those the gateway config names
    (``specs`` collects the latter)."""
    from lictor_addons import default_addons

    manager = AddonManager()
    manager.add(*default_addons())
    for spec in extra:
        _add_addon(manager, spec, Path.cwd())
    if config is not None:
        base = config.path.parent if config.path else None
        for index, spec in enumerate(config.addons):
            loaded = _add_addon(manager, spec, base, f"{config.where('addons', index)}: ")
            if specs is not None:
                specs[spec] = loaded
    return manager


def _add_addon(manager: AddonManager, spec: str, base: Path | None, where: str = "") -> list[Any]:
    """Load and add the addons of one spec; a file or module that cannot be imported, names no
    addons or whose ``load`` hook raises is a configuration error that says which addon (and, for one
    the config names, ``where``: its ``FILE:LINE:COL: ``)."""
    try:
        loaded = load_addon_spec(spec, base)
        manager.add(*loaded)
    except HookError as exc:
        raise ConfigError(f"{where}addon {spec}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{where}addon {spec} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return loaded


def _config(args: argparse.Namespace) -> GatewayConfig | None:
    path = getattr(args, "config", None)
    if path:
        return load_config(path, offline=True)
    # ./lictor.yaml stands in for -c only where no --state-dir says where the gateway's state is (as for
    # `lictor sessions`): a config that names what only the gateway's environment has must not stop a
    # token or a look at the audit log in another terminal.
    default = Path("lictor.yaml")
    if getattr(args, "use_default_config", False) and not getattr(args, "state_dir", None) and default.exists():
        return load_config(default, offline=True)
    return None


def _state_dir(args: argparse.Namespace, config: GatewayConfig | None) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir)
    if config is not None:
        return config.state_dir
    return Path(os.environ.get("LICTOR_STATE_DIR", "state"))


# -- check / test / explain / schema --------------------------------------------------------------


def _packs(args: argparse.Namespace) -> tuple[GatewayConfig | None, AddonManager, list[Any]]:
    """The config, addons and rule-pack paths a pack command works on (paths default to the config's)."""
    config = _config(args)
    manager = _manager(config, extra=args.addon)
    return config, manager, args.paths or (config.rulepacks if config else [])


def _only_these_packs(args: argparse.Namespace, config: GatewayConfig | None) -> str | None:
    """When rule-pack paths were given with ``-c``: the note that the gateway loads other packs too (a pack there
    may inherit a role of one of them), for a load that failed; None otherwise."""
    if config is None or not args.paths or not config.rulepacks:
        return None
    given = {Path(p).resolve() for p in args.paths}
    others = [p for p in config.rulepacks if Path(p).resolve() not in given]
    if not others:
        return None
    shown = ", ".join(os.path.relpath(p) for p in others)
    name = args.config or config.path
    return (
        f"note: only the paths given were read; {name} also loads {shown}: leave the paths out to read "
        f"the packs as the gateway does (lictor {args.command} -c {name})"
    )


def _check_config(config: GatewayConfig, manager: AddonManager) -> int:
    """The rest of the gateway config, as ``lictor run`` checks it before it listens (printed as
    ``FILE:LINE:COL: ...``); the number of errors."""
    from .runner import check_config

    for unset in config.unset:
        # read as empty here, as for every command that reaches no target; `lictor run` requires them
        where, _, name = unset.rpartition(": ")
        print(f"{where}: warning: environment variable {name} is not set here (lictor run requires it)")
    try:
        check_config(config, manager)
    except ConfigError as exc:
        print(exc)
        return len(str(exc).splitlines())
    return 0


def _config_targets(config: GatewayConfig | None) -> dict[str, str] | None:
    """The gateway config's targets (name -> protocol), which ``lictor run`` checks the packs' ``targets`` against:
    with ``-c``, ``test`` and ``explain`` load the packs as the gateway does, so a pack it would refuse (and keep
    the last good policy instead) is not tested or explained as if it were live."""
    return {t.name: t.protocol for t in config.targets.values()} if config is not None else None


def _config_roles(config: GatewayConfig | None, manager: AddonManager) -> list[Any]:
    """The roles the gateway config names (``read_only_roles``), which the packs must define, as ``lictor run``
    checks them."""
    return config.role_references(manager.target_schemas) if config is not None else []


def cmd_check(args: argparse.Namespace) -> int:
    config, manager, paths = _packs(args)
    config_errors = _check_config(config, manager) if config is not None else 0
    unset = len(config.unset) if config is not None else 0  # warnings: variables read as empty
    if not paths and config is not None:
        if config_errors:
            print(f"{config_errors} error(s) in {config.path}")
            return EXIT_FAIL
        if args.strict and unset:
            print(f"0 error(s), {unset} warning(s) in {config.path}; --strict fails on warnings")
            return EXIT_FAIL
        print(f"OK: {config.path}, {len(config.targets)} target(s); no rule packs (every request is denied)")
        return EXIT_OK
    if not paths:
        print("nothing to check: give rule pack files or directories, or -c lictor.yaml", file=sys.stderr)
        return EXIT_USAGE
    result = load_policy(
        paths, manager.vocabularies, targets=_config_targets(config), role_references=_config_roles(config, manager)
    )
    if not result.files and not result.problems:
        # a misspelt directory of a CI job, or packs saved as .yml.txt: "OK" would pass checking nothing
        print(f"no rule pack files (*.yaml, *.yml) under {', '.join(map(str, paths))}")
        return EXIT_FAIL
    for problem in result.problems:
        print(problem)
    if config_errors:
        assert config is not None
        print(
            f"{config_errors} error(s) in {config.path}"
            + (f"; {len(result.errors)} in rule packs" if result.errors else "")
        )
        return EXIT_FAIL
    if result.errors:
        # a file that does not even parse is one of the files checked ("1 error(s) in 0 pack file(s)" read oddly)
        roots = [Path(x) for x in paths]
        unread = {
            p.loc.file for p in result.problems if p.loc.file and any(Path(p.loc.file).is_relative_to(r) for r in roots)
        }
        checked = ({str(f) for f in result.files} | unread) - {str(f) for f in result.test_files}
        print(f"{len(result.errors)} error(s), {len(result.warnings)} warning(s) in {len(checked)} pack file(s)")
        if (note := _only_these_packs(args, config)) is not None:
            print(note)
        return EXIT_FAIL
    assert result.policy is not None
    if args.strict and (result.warnings or unset):
        count = f"{len(result.warnings)} warning(s) in {len(result.files)} pack file(s)"
        if unset:
            count += f" and {unset} in {config.path if config else ''}"
        print(f"0 error(s), {count}; --strict fails on warnings")
        return EXIT_FAIL
    print(
        f"OK: {len(result.files)} pack file(s), {len(result.policy.roles)} roles, {len(result.policy.rules)} rules, "
        f"policy version {result.policy.version}" + (f", {len(result.warnings)} warning(s)" if result.warnings else "")
    )
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    config, manager, paths = _packs(args)
    result = load_policy(
        paths, manager.vocabularies, targets=_config_targets(config), role_references=_config_roles(config, manager)
    )
    if result.policy is None:
        for problem in result.errors:
            print(problem)
        print("rule packs do not load; fix them first (lictor check)")
        if (note := _only_these_packs(args, config)) is not None:
            print(note)
        return EXIT_FAIL
    if not result.test_files:
        print("no test files (format: lictor-tests/v1) found under " + ", ".join(map(str, paths)))
        return EXIT_FAIL
    report = run_tests(result.policy, result.test_files)
    for line in format_report(result.policy, report, verbose=not args.quiet):
        print(line)
    return EXIT_FAIL if report.failed or not report.cases else EXIT_OK


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k:
            raise SystemExit(f"expected KEY=VALUE, got {item!r} (no key)")
        value: Any = v
        if "," in v:
            value = [x for x in v.split(",") if x]
        if k in out:
            prev = out[k] if isinstance(out[k], list) else [out[k]]
            value = prev + (value if isinstance(value, list) else [value])
        out[k] = value
    return out


def cmd_explain(args: argparse.Namespace) -> int:
    config, manager, paths = _packs(args)
    result = load_policy(
        paths, manager.vocabularies, targets=_config_targets(config), role_references=_config_roles(config, manager)
    )
    if result.policy is None:
        for problem in result.errors:
            print(problem)
        print("rule packs do not load; fix them first (lictor check)")
        return EXIT_FAIL
    policy = result.policy
    claims = _parse_kv(args.claim)
    if args.sub:
        claims["sub"] = args.sub
    identity = identity_from_spec(claims)
    spec: dict[str, Any] = {}
    if args.request:
        try:
            docs = load_documents(args.request, "<--request>")
        except YamlError as exc:
            print(exc)
            return EXIT_USAGE
        spec = plain(docs[0]) if docs and isinstance(docs[0], dict) else {}
    for key in ("protocol", "target", "sql", "method", "path", "command"):
        value = getattr(args, key, None)
        if value is not None:  # `--sql ''` is an empty statement, not a request without SQL (and so without protocol)
            spec[key] = value
    if "sql" in spec and "protocol" not in spec:
        spec["protocol"] = "postgres"  # only PostgreSQL requests are SQL
    if config is not None and spec.get("target") and str(spec["target"]) not in config.targets:
        # target names are case-sensitive: the gateway never sees a request to `App` when its target is `app`
        known = ", ".join(sorted(config.targets)) or "none"
        print(f"cannot build the request: unknown target {spec['target']!r} (targets in {config.path}: {known})")
        return EXIT_USAGE
    try:
        requests = build_requests(policy, spec)
    except ValueError as exc:
        print(f"cannot build the request: {exc}")
        return EXIT_USAGE
    print(
        f"policy {policy.version}; identity {identity.subject} claims {json.dumps(dict(identity.claims), default=str)}"
    )
    decisions = []
    for req in requests:
        trace = Trace()
        decision = policy.decide(identity, req, trace=trace)
        decisions.append(decision)
        print(f"\nrequest: {req.summary or req.action}")
        print(f"  roles: {', '.join(trace.roles) or '(none: no identity mapping matched)'}")
        if not trace.steps:
            print("  no candidate rules for this protocol/action in these roles")
        for rule, ok, why in trace.steps:
            mark = "MATCH" if ok else "skip "
            shadow = " (shadow)" if not rule.enforce else ""
            print(f"  {mark} {rule.id} [{rule.action}{shadow}] role {rule.role} {rule.source}: {why}")
        print(f"  => {decision.action.upper()} ({decision.explanation})")
        if decision.message:
            print(f"     message: {decision.message}")
        if decision.mask_rule_ids:
            print(f"     masking by: {', '.join(decision.mask_rule_ids)}")
        if decision.shadow_rule_ids:
            print(f"     would also be stopped by (shadow): {', '.join(decision.shadow_rule_ids)}")
    final = combine(decisions)
    if len(decisions) > 1:
        print(f"\ncombined: {final.action.upper()} (deny wins over approve, approve over allow)")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    manager = _manager(_config(args), extra=args.addon)
    text = schema_json(manager.vocabularies)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


# -- tokens ---------------------------------------------------------------------------------------


def cmd_token_issue(args: argparse.Namespace) -> int:
    # a token the gateway would refuse (no subject, already expired) is an error here, not at the agent's login
    if not args.sub.strip():
        print("lictor token issue: --sub must name the agent", file=sys.stderr)
        return EXIT_USAGE
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"lictor token issue: --ttl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ttl < 1:
        print(f"lictor token issue: --ttl {args.ttl!r}: a token must live at least 1s", file=sys.stderr)
        return EXIT_USAGE
    config = _config(args)
    if config is not None:
        issuers = config.section("identity").get("issuers") or [{"type": "lictor"}]
        if not any(isinstance(entry, dict) and entry.get("type") == "lictor" for entry in issuers):
            # The gateway of this config verifies only its identity provider's tokens: this one it refuses.
            print(
                f"lictor token issue: {config.path} trusts no `type: lictor` issuer, so its gateway would refuse "
                "this token; get one from the identity provider it names, or add `- type: lictor` under "
                "identity.issuers",
                file=sys.stderr,
            )
            return EXIT_USAGE
    state = _state_dir(args, config)
    fresh = not (state / "issuer.key").exists()
    issuer = LocalIssuer(state)
    if fresh:
        # A mistyped --state-dir (or a config the gateway does not run with) gives a token no gateway takes
        print(
            f"lictor token issue: {state} had no signing key; created {issuer.key_path}. Only a gateway running "
            "with this state directory accepts the token (pass -c with the gateway's config, or its --state-dir).",
            file=sys.stderr,
        )
    claims = _parse_kv(args.claim)
    token = issuer.issue(args.sub, claims, ttl=ttl)
    print(token)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Whether the gateway of this state directory runs, its live policy (and why a reload was
    rejected), its listeners, open sessions and spool. Exit 0 when it runs, 1 when it does not."""
    from .approvals._model import format_duration
    from .runner import STATUS_FILE, STATUS_INTERVAL

    state = _state_dir(args, _config(args))
    path = state / STATUS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"no gateway has run with state directory {state} ({path} does not exist)", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, ValueError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    age = max(0.0, time.time() - float(doc.get("updated_at", 0)))
    alive = bool(doc.get("running")) and _pid_alive(int(doc.get("pid", 0))) and age < 6 * STATUS_INTERVAL
    if args.json:
        print(json.dumps({**doc, "running": alive}, indent=2))
        return EXIT_OK if alive else EXIT_FAIL
    policy = doc.get("policy") or {}
    if alive:
        up = format_duration(time.time() - float(doc.get("started_at", time.time())))
        print(f"gateway   running: pid {doc.get('pid')}, up {up} (status {format_duration(age)} old)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("updated_at", 0))))
        print(f"gateway   not running (last seen {when})")
    print(f"policy    {policy.get('version', '?')}: {policy.get('rules', '?')} rules")
    for problem in policy.get("rejected") or []:
        print(f"          rejected reload, previous policy kept: {printable(problem, keep='')}")
    for t in doc.get("targets") or []:
        print(f"target    {printable(t.get('name'))} ({printable(t.get('protocol'))}) on {printable(t.get('listen'))}")
    if alive:
        print(f"sessions  {doc.get('sessions', 0)} open")
        if doc.get("spool_bytes") is not None:
            print(f"spool     {doc['spool_bytes']} bytes on disk")
        recordings = doc.get("recordings") or {}
        if recordings.get("broken"):
            print("spool     BROKEN: a sync failed; every event is refused until the gateway is restarted")
        written = int(recordings.get("written") or 0)
        for sink in recordings.get("sinks") or []:
            behind = max(0, written - int(sink.get("committed") or 0))
            health = "ok" if sink.get("healthy") else f"unavailable ({sink.get('failures') or 0} failed attempts)"
            error = "" if sink.get("healthy") or not sink.get("last_error") else f": {sink['last_error']}"
            name = printable(sink.get("name"))
            print(f"sink      {name}: {health}, {behind} records behind{printable(error, keep='')}")
    return EXIT_OK if alive else EXIT_FAIL


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    import yaml

    cluster: dict[str, Any] = {"server": args.server}
    if args.ca:
        cluster["certificate-authority"] = str(Path(args.ca).resolve())
    if args.insecure:
        cluster["insecure-skip-tls-verify"] = True
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lictor", "cluster": cluster}],
        "users": [{"name": "lictor-agent", "user": {"token": args.token}}],
        "contexts": [
            {
                "name": "lictor",
                "context": {
                    "cluster": "lictor",
                    "user": "lictor-agent",
                    **({"namespace": args.namespace} if args.namespace else {}),
                },
            }
        ],
        "current-context": "lictor",
    }
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return EXIT_OK


# -- audit ----------------------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> AuditLog:
    config = _config(args)
    state = _state_dir(args, config)
    db = Path(args.db) if getattr(args, "db", None) else None
    if db is None and config is not None and config.section("audit").get("sqlite"):
        db = config.resolve(str(config.section("audit")["sqlite"]))
    db = db or state / "audit.db"
    if not db.exists():
        raise SystemExit(f"no audit log at {db}")
    _settle_recordings(config, state)
    problem = chain_problem(db)
    if problem:
        raise SystemExit(f"audit log BROKEN: {problem}")
    return AuditLog(db, verify_key_path=args.key if getattr(args, "key", None) else db.parent / "audit-verify.key")


def _settle_recordings(config: GatewayConfig | None, state: Path) -> None:
    """Let a running gateway's drain process write what its spool holds now (bounded), so that what was
    just done shows up."""
    from .recorder import RecordingsConfig
    from .recorder._recorder import local_store_note

    try:
        rec = RecordingsConfig.from_gateway_config(config) if config else RecordingsConfig.from_section({}, state)
        note = local_store_note(rec)
        if note:
            print(f"lictor: {note}", file=sys.stderr)
    except (ConfigError, OSError, ValueError):
        pass  # reading what is there is still right


# Fields every event has, or that the other columns show: not repeated in the SUMMARY column.
_LISTED = frozenset({"seq", "ts", "kind", "identity", "protocol", "action", "rule_ids", "request", "reason"})


def _event_summary(event: Mapping[str, Any]) -> str:
    """SUMMARY for events that are not decisions (``policy.rejected``, ``approval.*``, ``session.end``...):
    their own fields, ``key=value``, lists by their first item and length."""
    parts = []
    for key, value in event.items():
        if key in _LISTED or value in (None, "", [], {}):
            continue
        if isinstance(value, list):
            more = f" (+{len(value) - 1} more)" if len(value) > 1 else ""
            value = f"{value[0]}{more}"
        elif isinstance(value, dict):
            value = json.dumps(value, default=str, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return " ".join(parts)


def cmd_audit_list(args: argparse.Namespace) -> int:
    try:
        since = time.time() - parse_duration(args.since) if args.since else None
    except ValueError as exc:
        print(f"lictor audit list: --since: {exc}", file=sys.stderr)
        return EXIT_USAGE
    audit = _audit(args)
    filters = dict(_parse_kv(args.where)) if args.where else {}
    events = list(audit.events(since=since, kind=args.kind, filters={k: str(v) for k, v in filters.items()}))
    if args.limit:
        events = events[-args.limit :]
    if args.json:
        for e in events:
            print(json.dumps(e, default=str))
        return EXIT_OK
    print(f"{'SEQ':>6} {'TIME':19} {'KIND':16} {'WHO':16} {'PROTO':10} {'ACTION':8} {'RULES':28} SUMMARY")
    for e in events:
        # An edited event (which `audit verify` names) is listed as it reads: the listing is what shows the edit.
        try:
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("ts") or 0)))
        except (TypeError, ValueError, OverflowError, OSError):
            ts = "?"
        # a subject's line break would start a line that reads as another event: shown as \x0a, as in the summary
        identity = e.get("identity")
        who = identity.get("sub", "") if isinstance(identity, Mapping) else ""
        request = e.get("request")
        req: Mapping[str, Any] = request if isinstance(request, Mapping) else {}
        rule_ids = e.get("rule_ids")
        rules = ",".join(map(str, rule_ids)) if isinstance(rule_ids, list) else str(rule_ids or "")
        summary = req.get("summary", e.get("reason", "")) or _event_summary(e)
        print(
            f"{e['seq']:>6} {ts:19} {printable(e.get('kind', ''), keep='')[:16]:16} {printable(who, keep='')[:16]:16} "
            f"{printable(e.get('protocol', ''), keep='')[:10]:10} {printable(e.get('action', ''), keep='')[:8]:8} "
            f"{printable(rules, keep='')[:28]:28} {printable(summary, keep='')[:160]}"
        )
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    audit = _audit(args)
    key_path = audit.verify_key_path
    try:
        key = bytes.fromhex(key_path.read_text().strip())
    except FileNotFoundError:
        print(
            f"lictor audit verify: no audit verification key at {key_path}: give the key kept offline with --key FILE",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(
            f"lictor audit verify: {key_path} is not an audit verification key (64 hex digits): {exc}", file=sys.stderr
        )
        return EXIT_USAGE
    if len(key) != 32:
        print(f"lictor audit verify: {key_path} is not an audit verification key (64 hex digits)", file=sys.stderr)
        return EXIT_USAGE
    result = audit.verify(key)
    print(result)
    if result.ok:
        # The chain covers what reached the log; what a restart found torn or damaged in the recording spool
        # never did. The log says so (spool.recovered): name it here too, so an intact chain is not read as
        # "nothing was lost".
        for e in audit.events(kind="spool.recovered"):
            print(f"WARNING: event {e['seq']} (spool.recovered): {printable(str(e.get('problem', '')), keep='')}")
    return EXIT_OK if result.ok else EXIT_FAIL


# -- run ------------------------------------------------------------------------------------------


def _setup_logging(config: GatewayConfig | None, level: str | None, fmt: str | None) -> None:
    section = config.section("log") if config else {}
    fmt = fmt or str(section.get("format", "text"))
    level_name = (level or str(section.get("level", "info"))).upper()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":

        class JsonFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                entry = {
                    "ts": round(record.created, 3),
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "msg": record.getMessage(),
                }
                if record.exc_info:
                    entry["exc"] = self.formatException(record.exc_info)
                return json.dumps(entry)

        handler.setFormatter(JsonFormatter())
    else:

        class TextFormatter(logging.Formatter):
            """One record per line: text an agent chose (a statement, a token's subject) cannot start a line
            that reads as a record of its own, nor rewrite the terminal. Continuation lines (multi-line
            errors, tracebacks) are indented."""

            def format(self, record: logging.LogRecord) -> str:
                return printable(super().format(record), keep="\n\t").replace("\n", "\n    ")

        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level_name))  # one of LOG_LEVELS: the config and the option are checked


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAIL
    _setup_logging(config, args.log_level, args.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from .runner import run_gateway

    specs: dict[str, list[Any]] = {}
    try:
        manager = _manager(config, specs)
    except ConfigError as exc:
        logging.getLogger("lictor").error("gateway failed to start: %s", exc)
        return EXIT_FAIL
    return asyncio.run(run_gateway(config, manager, ready_file=args.ready_file, addon_specs=specs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lictor", description="Lictor: the gateway between agents and production.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, what: str = "its targets and addons") -> None:
        sp.add_argument("-c", "--config", help=f"gateway config (lictor.yaml): {what}")

    state_help = "the gateway's state directory (default: the config's state_dir, else $LICTOR_STATE_DIR or ./state)"
    state_config = "its state_dir (default: ./lictor.yaml unless --state-dir is given)"

    def with_addons(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--addon",
            action="append",
            default=[],
            metavar="FILE_OR_MODULE",
            help="load a third-party addon for its rule vocabulary (repeatable)",
        )

    sp = sub.add_parser(
        "check",
        help="validate rule packs, and with -c the gateway config as `lictor run` does; problems as FILE:LINE:COL",
    )
    sp.add_argument("paths", nargs="*", help="rule pack files or directories")
    with_config(sp, "checked as `lictor run` checks it before it listens; its rule packs, targets and addons")
    with_addons(sp)
    sp.add_argument("--strict", action="store_true", help="warnings fail too")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("test", help="run policy tests (format lictor-tests/v1) with rule coverage")
    sp.add_argument("paths", nargs="*", help="rule pack and test files or directories (default: the config's)")
    with_config(sp)
    with_addons(sp)
    sp.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    sp.set_defaults(func=cmd_test)

    sp = sub.add_parser("explain", help="which rules matched a request, in which order, and why")
    sp.add_argument("paths", nargs="*", help="rule pack files or directories (default: the config's)")
    with_config(sp)
    with_addons(sp)
    sp.add_argument("--sub", help="the identity's subject")
    sp.add_argument(
        "--claim", action="append", default=[], metavar="KEY=VALUE", help="a token claim (repeatable; a,b is a list)"
    )
    sp.add_argument("--request", help="the request as YAML/JSON, e.g. '{protocol: postgres, sql: \"...\"}'")
    sp.add_argument("--protocol", help="the request's protocol (postgres with --sql)")
    sp.add_argument("--target", help="the target it is sent to (for rules scoped to targets)")
    sp.add_argument("--sql", help="a PostgreSQL statement")
    sp.add_argument("--method", help="an HTTP method")
    sp.add_argument("--path", help="an HTTP path")
    sp.add_argument("--command", help="a command line (ssh, or a third-party protocol: its addon reads `command`)")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("schema", help="print the composed rule-pack JSON Schema")
    with_config(sp)
    with_addons(sp)
    sp.add_argument("--out", help="file to write (default: stdout)")
    sp.set_defaults(func=cmd_schema)

    tok = sub.add_parser("token", help="Lictor's own token issuer").add_subparsers(dest="token_cmd", required=True)
    sp = tok.add_parser("issue", help="print a token signed by the gateway's issuer key")
    sp.add_argument("--sub", required=True, help="the agent's subject: who the token says it is")
    sp.add_argument(
        "--claim", action="append", default=[], metavar="KEY=VALUE", help="a claim (repeatable; a,b is a list)"
    )
    sp.add_argument("--ttl", default="1h", help="how long the token is valid: 30s, 15m, 8h, 2d (default: 1h)")
    sp.add_argument("--state-dir", help=state_help + "; it holds the issuer key")
    with_config(sp, state_config)
    sp.set_defaults(func=cmd_token_issue, use_default_config=True)

    sp = sub.add_parser("status", help="is the gateway running; its live policy and why a reload was rejected")
    with_config(sp, state_config)
    sp.add_argument("--state-dir", help=state_help)
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=cmd_status, use_default_config=True)

    sp = sub.add_parser("kubeconfig", help="print a kubeconfig that points kubectl at the gateway")
    sp.add_argument("--server", required=True, help="the gateway's Kubernetes listener, e.g. https://127.0.0.1:8443")
    sp.add_argument("--token", required=True, help="the agent's token (`lictor token issue`)")
    sp.add_argument("--ca", help="CA file of the gateway's certificate")
    sp.add_argument("--insecure", action="store_true", help="do not check the gateway's certificate")
    sp.add_argument("--namespace", help="the context's default namespace")
    sp.set_defaults(func=cmd_kubeconfig)

    audit = sub.add_parser("audit", help="list or verify the audit log")
    audit_sub = audit.add_subparsers(dest="audit_cmd")
    for name, func, text in (
        ("list", cmd_audit_list, "audit events, oldest first (the default command)"),
        ("verify", cmd_audit_verify, "check the hash chain; names the first bad event"),
    ):
        sp = audit_sub.add_parser(name, help=text)
        with_config(sp, "its state_dir and audit.sqlite (default: ./lictor.yaml unless --state-dir is given)")
        sp.add_argument("--state-dir", help=state_help)
        sp.add_argument("--db", help="the audit database (default: STATE/audit.db)")
        sp.add_argument("--key", help="the audit verification key (default: state/audit-verify.key)")
        if name == "list":
            sp.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
            sp.add_argument("--since", help="events newer than this long ago, e.g. 1h")
            sp.add_argument("--kind", help="one event kind, e.g. decision, auth.failed, session.start")
            sp.add_argument(
                "--where",
                action="append",
                default=[],
                metavar="FIELD=VALUE",
                help="filter on a field, e.g. action=deny, identity.sub=agent-1",
            )
            sp.add_argument("--limit", type=count_arg, help="the last N events only")
        sp.set_defaults(func=func, use_default_config=True)
    audit.set_defaults(
        func=cmd_audit_list,
        use_default_config=True,
        json=False,
        since=None,
        kind=None,
        where=[],
        limit=None,
        state_dir=None,
        db=None,
        key=None,
        config=None,
    )

    sp = sub.add_parser("run", help="run the gateway")
    sp.add_argument("-c", "--config", required=True, help="gateway config (lictor.yaml)")
    sp.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="debug, info, warning or error (default: the config's log.level)",
    )
    sp.add_argument("--log-format", choices=["text", "json"], help="default: the config's log.format")
    sp.add_argument("--ready-file", help="write this file once every listener is up")
    sp.set_defaults(func=cmd_run)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands() -> list[Any]:
    """Subcommands contributed by core modules with their own CLI (approvals, sessions)."""
    registrations: list[Any] = []
    registrations.append(__import__("lictor.approvals.cli", fromlist=["register"]).register)
    registrations.append(__import__("lictor.recorder", fromlist=["register"]).register)
    return registrations


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `lictor audit list | head`: the reader has what it wanted; say nothing more (and let the
        # interpreter's final flush of stdout go nowhere instead of failing again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _entry() -> None:  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()
