"""Addons use only Lictor's public API: no ``lictor._private`` modules, no names outside ``__all__``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

PUBLIC_MODULES = {
    "lictor",
    "lictor.vocabulary",
    "lictor.masking",
    "lictor.testing",
    "lictor.policy_types",
    "lictor.shell",
}


# The line protocol's `rm` held for a `boss` approver: the guide's approval examples run against it.
HELD_RM_PACK = """
format: lictor/v1
metadata: {name: held}
identities:
  - {match: {claims: {role: ops}}, roles: [ops]}
  - {match: {claims: {role: boss}}, roles: [boss]}
roles:
  ops:
    rules:
      - {id: hold-rm, protocol: line, when: {verbs: rm}, action: approve, approval: {approvers: [boss]}}
  boss: {}
"""


def addon_files() -> list[Path]:
    files = sorted((ROOT / "addons").rglob("*.py"))
    files += sorted((ROOT / "examples").rglob("*.py"))
    files += sorted((ROOT / "tests" / "addons").rglob("*.py"))
    files += sorted((ROOT / "tests").glob("test_redis_*.py"))  # the example's tests, written as an outsider's
    return files


def private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = node.module
            if mod == "lictor" or mod.startswith("lictor."):
                if mod not in PUBLIC_MODULES:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports from {mod}")
                    continue
                exported = set(getattr(importlib.import_module(mod), "__all__", ()))
                for alias in node.names:
                    if f"{mod}.{alias.name}" in PUBLIC_MODULES:
                        continue  # `from lictor import testing`, as docs/addons.md writes it
                    if alias.name not in exported:
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {mod}.{alias.name} is not public")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.name == "lictor" or alias.name.startswith("lictor.")) and alias.name not in PUBLIC_MODULES:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lictor":
            if node.attr.startswith("_"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses lictor.{node.attr}")
    return problems


@pytest.mark.parametrize("path", addon_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_addon_uses_only_public_names(path: Path):
    assert private_imports(path) == []


def test_the_checker_catches_private_imports(tmp_path: Path):
    bad = ROOT / "tests" / "addons" / "_tmp_bad_addon_for_checker.py"
    try:
        bad.write_text("from lictor._yaml import plain\nfrom lictor import Policy, _secret\nimport lictor.audit\n")
        problems = private_imports(bad)
    finally:
        bad.unlink()
    assert len(problems) == 3


def test_public_names_exist():
    for mod in PUBLIC_MODULES:
        m = importlib.import_module(mod)
        for name in getattr(m, "__all__", ()):
            assert hasattr(m, name), f"{mod}.__all__ names missing {name}"


def test_the_checker_accepts_public_submodules_imported_from_lictor():
    good = ROOT / "tests" / "addons" / "_tmp_good_addon_for_checker.py"
    try:
        good.write_text("from lictor import testing, masking\nfrom lictor import Request, vocabulary\n")
        problems = private_imports(good)
    finally:
        good.unlink()
    assert problems == []


def test_the_guide_first_addon_loads_as_written():
    """docs/addons.md opens with an addon class: copied as it stands, it must load."""
    from lictor import AddonManager

    text = (ROOT / "docs" / "addons.md").read_text()
    section = text.split("## An addon is a plain class", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/addons.md", "exec"), namespace)
    manager = AddonManager()
    manager.add(*namespace["addons"])  # type: ignore[misc]
    assert "line" in manager.vocabularies and "line" in manager.target_schemas
    assert manager.option("line_banner") == ""


async def test_the_guide_names_only_attributes_that_exist():
    """Every ``gateway.x``, ``session.x``, ``decision.x``, ``target.x``, ``flow.x`` and ``h.x`` that
    docs/addons.md tells addon authors to use exists on the objects a real gateway hands them."""
    import re

    from lictor import Flow, testing
    from lictor.masking import MaskPlan

    from tests.addons.lineproto import LineProtocol

    text = (ROOT / "docs" / "addons.md").read_text()
    audit_kinds = {"session.start", "session.end"}
    named = {
        (obj, attr)
        for obj, attr in re.findall(r"\b(gateway|session|decision|target|flow|h|plan)\.([a-z_]+)\b", text)
        if f"{obj}.{attr}" not in audit_kinds
    }
    flows: list[Flow] = []

    class Capture:
        name = "capture"

        def decision(self, flow: Flow) -> None:
            flows.append(flow)

    targets = {"t": {"protocol": "line", "listen": "127.0.0.1:1"}}
    async with testing.harness(LineProtocol(), Capture(), targets=targets) as h:
        session = await h.session(protocol="line", target="t")
        decision = await session.decide(testing.request("line", "get", verb="get", command="get"))
        objects = {
            "gateway": h.gateway,
            "session": session,
            "decision": decision,
            "target": h.gateway.targets("line")[0],
            "flow": flows[0],
            "h": h,
            "plan": MaskPlan.EMPTY,
        }
        missing = sorted(f"{obj}.{attr}" for obj, attr in named if not hasattr(objects[obj], attr))
    assert len(named) > 30  # the pattern still finds what the guide names
    assert missing == []


def test_what_the_addons_use_of_the_gateway_is_documented():
    """The attributes of the gateway, sessions and decisions that the built-in addons and the examples
    use are in the guide: an addon author must not have to read the built-in addons to find them."""
    import re

    guide = (ROOT / "docs" / "addons.md").read_text() + (ROOT / "docs" / "approvals.md").read_text()
    used: dict[str, set[str]] = {}
    for path in addon_files():
        if path.parts[-2] == "addons" and path.parent.parent == ROOT / "tests":
            continue  # the test addons
        source = path.read_text()
        for obj, attr in re.findall(r"\b(gateway|session|decision)\.([a-z][a-z_]*)\b", source):
            used.setdefault(f"{obj}.{attr}", set()).add(str(path.relative_to(ROOT)))
        for attr in re.findall(r"\bgateway\.config\.([a-z][a-z_]*)\b", source):
            used.setdefault(f"config.{attr}", set()).add(str(path.relative_to(ROOT)))
        for attr in re.findall(r"\b(?:plan|masker)\.([a-z][a-z_]*)\b", source):  # lictor.masking's objects
            used.setdefault(f"masking.{attr}", set()).add(str(path.relative_to(ROOT)))
    masking = (ROOT / "docs" / "masking.md").read_text().split("## API", 1)[1]

    def documented(name: str) -> bool:
        obj, attr = name.split(".", 1)
        if obj == "masking":  # the API summary of docs/masking.md lists the methods of plans and maskers
            return re.search(rf"\b{attr}\b", masking) is not None
        return name in guide or f"`{attr}`" in guide

    undocumented = {name: sorted(paths) for name, paths in used.items() if not documented(name)}
    assert "session.decide" in used  # the pattern still finds what the addons use
    assert undocumented == {}


def test_masking_plans_are_typed_for_addons_checked_with_mypy():
    """An addon author who runs mypy on their addon gets the type the guide names: a masking plan is
    a ``MaskPlan`` (so a misspelt ``plan.mask_txt`` is an error), not ``Any`` that lets every typo
    through. The masking package is imported lazily, so the annotation names it for type checkers."""
    import typing

    from lictor import Gateway, Session
    from lictor.masking import MaskPlan

    for method in (Session.mask_plan, Gateway.mask_plan):
        assert typing.get_type_hints(method, localns={"MaskPlan": MaskPlan})["return"] is MaskPlan


def test_the_guide_says_that_recording_can_fail_in_every_mode():
    """``session.record`` raises when an event cannot be made durable in best-effort mode too (a full
    spool while a sink is down): the guide must not tell addon authors it raises only in strict mode,
    and must name the exception, which is public (the recorder's own class is not)."""
    import re

    from lictor import AuditError
    from lictor.recorder import RecordingError, SpoolFull

    text = " ".join((ROOT / "docs" / "addons.md").read_text().split())
    assert issubclass(SpoolFull, RecordingError) and issubclass(RecordingError, AuditError)
    assert re.search(r"`session\.record` raises `lictor\.AuditError`[^.]*whatever the role's recording mode", text)
    assert "syncs to disk before it returns and raises if it cannot" not in text


async def test_the_guide_names_the_status_a_held_request_has_once_it_went_through():
    """Testing an approval as the guide shows (hold, approve, await the ``decide``) leaves the approval
    ``used``: an author who asserts what the guide lists must not be told ``approved``."""
    import asyncio
    import re

    from lictor import testing

    from tests.addons.lineproto import LineProtocol

    text = " ".join((ROOT / "docs" / "addons.md").read_text().split())
    sentence = text.split("`await h.approval(approval_id)` to read it back", 1)[1].split(").", 1)[0]
    async with testing.harness(LineProtocol(), rulepacks=HELD_RM_PACK) as h:
        session = await h.session(testing.identity("agent-1", role="ops"), protocol="line")
        held: asyncio.Queue[str] = asyncio.Queue()

        async def notify(approval_id: str, message: str) -> None:
            held.put_nowait(approval_id)

        task = asyncio.create_task(session.decide(testing.request("line", "rm", verb="rm", command="rm x"), notify))
        approval_id = await held.get()
        await h.approve(approval_id, testing.identity("boss-1", role="boss"))
        testing.assert_decision(await task, "allow")
        status = (await h.approval(approval_id)).status
    assert re.search(rf"`{status}` once the approved request went through", sentence), (status, sentence)


async def test_the_guide_watcher_withdraws_a_held_request_when_the_agent_hangs_up():
    """The guide's ``decide_watching``, copied as it stands, returns the decision while the agent waits
    and withdraws the approval (raising ``ConnectionError``) when the agent hangs up during the hold."""
    import asyncio

    from lictor import testing

    from tests.addons.lineproto import LineProtocol

    text = (ROOT / "docs" / "addons.md").read_text()
    section = text.split("### Watching a held request", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/addons.md", "exec"), namespace)
    decide_watching = namespace["decide_watching"]
    async with testing.harness(LineProtocol(), rulepacks=HELD_RM_PACK) as h:
        held: asyncio.Queue[str] = asyncio.Queue()
        outcomes: asyncio.Queue[Any] = asyncio.Queue()

        async def notify(approval_id: str, message: str) -> None:
            held.put_nowait(approval_id)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            session = await h.session(testing.identity("agent-1", role="ops"), protocol="line")
            request = testing.request("line", "rm", verb="rm", command="rm x")
            try:
                outcomes.put_nowait(await decide_watching(session, request, reader, notify))
                outcomes.put_nowait(await reader.readline())  # the stream reads on after the watch
            except ConnectionError as exc:
                outcomes.put_nowait(exc)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)  # waits for its reply
            approval_id = await held.get()
            await h.approve(approval_id, testing.identity("boss-1", role="boss"))
            testing.assert_decision(await outcomes.get(), "allow", rule="hold-rm")
            writer.write(b"next\n")
            assert await outcomes.get() == b"next\n"
            writer.close()

            _, writer = await asyncio.open_connection("127.0.0.1", port)  # hangs up during the hold
            approval_id = await held.get()
            writer.close()
            assert isinstance(await outcomes.get(), ConnectionError)
            assert (await h.approval(approval_id)).status == "withdrawn"
        finally:
            server.close()
            await server.wait_closed()


async def test_a_failed_reload_of_the_guide_addon_denies_only_its_protocol(tmp_path: Path):
    """The guide's first addon, copied to a file, then broken: the stand-in denies line requests only,
    not those of the other protocols the gateway serves (they would all be refused by one typo)."""
    import asyncio

    from lictor import AddonManager, Gateway, GatewayConfig, Identity, Request, Vocabulary
    from lictor.runner import AddonWatcher
    from lictor.vocabulary import Glob

    text = (ROOT / "docs" / "addons.md").read_text()
    code = text.split("## An addon is a plain class", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    addon = tmp_path / "line_addon.py"
    addon.write_text(code)
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "kv.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: kv}\nidentities: [{match: {claims: {role: r}}, roles: [r]}]\n"
        "roles: {r: {rules: [{id: kv-get, protocol: kv, when: {verbs: get}, action: allow}]}}\n"
    )

    class KV:
        name = "kv"

        def load(self, loader: Any) -> None:
            loader.add_vocabulary(Vocabulary("kv", (Glob("verbs", attr="verb"),), index="verbs"))

    manager = AddonManager()
    manager.add(KV())
    gw = Gateway(GatewayConfig.default(tmp_path / "state", [str(packs)]), manager)
    watcher = AddonWatcher(gw, asyncio.get_running_loop(), {})
    await watcher.reload(str(addon))
    assert gw.load_policy().policy is not None
    addon.write_text(code + "\nthis is not python(\n")
    await watcher.reload(str(addon))
    session = await gw.open_session(Identity("a", {"role": "r"}), protocol="kv", target="t", peer="")
    line = session.decide_now(Request("line", "get", {"verb": "get", "command": "get a"}))
    kv = session.decide_now(Request("kv", "get", {"verb": "get"}))
    await session.close()
    gw.audit.close()
    assert line.rule_ids == ("lictor:addon-broken",)
    assert kv.allowed, kv.rule_ids


def test_the_guide_command_lines_for_a_third_party_protocol_work(tmp_path: Path):
    """The guide's ``lictor check/test/explain/schema --addon`` lines, run as written on a pack of the
    guide's protocol, pass; and ``explain --help`` does not tell an addon author ``--command`` is SSH's."""
    import shlex

    from tests.conftest import lictor

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "line.yaml").write_text(
        "format: lictor/v1\nmetadata: {name: line}\n"
        "identities: [{match: {claims: {role: reader}}, roles: [reader]}]\n"
        "roles: {reader: {rules: [{id: line-get, protocol: line, when: {verbs: get}, action: allow}]}}\n"
    )
    (packs / "line.tests.yaml").write_text(
        "format: lictor-tests/v1\ncases:\n"
        "  - {name: get, identity: {sub: a, claims: {role: reader}}, request: {protocol: line, command: get x},"
        " expect: {action: allow, rule: line-get}}\n"
    )
    text = (ROOT / "docs" / "addons.md").read_text()
    block = text.split("The command line knows your protocol only when it loads your addon", 1)[1]
    lines = block.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    outputs = {}
    for line in lines:
        argv = [a.replace("packs/", f"{packs}/") for a in shlex.split(line)]
        assert argv[0] == "lictor", line
        outputs[argv[1]] = lictor(*argv[1:], cwd=ROOT).stdout
    assert set(outputs) == {"check", "test", "explain", "schema"}
    assert "1 passed, 0 failed" in outputs["test"]
    assert "=> ALLOW" in outputs["explain"] and "line-get" in outputs["explain"]
    assert '"line"' in (packs / "rulepack.schema.json").read_text()
    help_text = " ".join(lictor("explain", "--help").stdout.split())
    assert "--command COMMAND a command line (ssh, or a third-party protocol" in help_text, help_text


async def test_the_guide_says_how_recorded_kinds_replay(tmp_path: Path):
    """What the guide says of ``session.record``: ``command`` and a reply kind of the addon's own replay as
    a text dialogue, the reply with no direction unless its data gives one; ``output`` makes a terminal
    replay in which only the terminal streams show."""
    import json

    from lictor import AddonManager, Gateway, GatewayConfig, Identity
    from lictor.recorder import asciicast_lines, load_session

    from tests.addons.lineproto import LineProtocol

    text = " ".join((ROOT / "docs" / "addons.md").read_text().split())
    assert "[kinds and directions](recording.md#events)" in text
    assert 'stored with no direction unless `data` says `"direction": "out"`' in text
    assert "a session that has them replays as a terminal, and only those events show" in text
    manager = AddonManager()
    manager.add(LineProtocol())
    gw = Gateway(GatewayConfig.default(tmp_path / "state"), manager)
    await gw.start()
    sessions = []
    for replies in (
        [("reply", {"code": 250}), ("reply", {"code": 221, "direction": "out"})],
        [("output", {"data": "250 ok"})],
    ):
        session = await gw.open_session(Identity("a", {}, issuer="lictor"), protocol="line", target="t", peer="p")
        session.record("command", {"command": "VRFY bob"})
        for kind, data in replies:
            session.record(kind, data)
        await session.close()
        sessions.append(session.id)
    await gw.stop()
    casts = []
    for sid in sessions:
        manifest, events = load_session(sid, source=tmp_path / "state" / "recordings")
        casts.append("".join(json.loads(line)[2] for line in list(asciicast_lines(manifest, events))[1:]))
        if sid == sessions[0]:
            dirs = [(e["kind"], e["dir"]) for e in events if e["kind"] not in ("session.start", "session.end")]
            assert dirs == [("command", "in"), ("reply", ""), ("reply", "out")]
    assert "$ VRFY bob\r\n" in casts[0] and '[reply] {"code": 250}' in casts[0]
    assert casts[1] == "250 ok"
