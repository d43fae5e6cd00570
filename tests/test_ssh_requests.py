"""SSH requests and decisions without a network: command lines → requests, combined decisions,
the unparsable-command hook, denial messages, and the ``lictor test`` request builder."""

from __future__ import annotations

import asyncio
import re

import pytest
from lictor import Decision, testing
from lictor_addons.ssh._channel import READY_MARK, ShellHello, decide_all
from lictor_addons.ssh._requests import (
    UNPARSABLE_RULE,
    channel_request,
    denial_text,
    forward_request,
    requests_for_command,
    sftp_request,
)
from lictor_addons.ssh.addon import SshAddon
from lictor_addons.ssh.vocabulary import VOCABULARY

PACK = """
format: lictor/v1
metadata: {name: unit, owner: tests}
identities:
  - match: {claims: {role: reader}}
    roles: [reader]
  - match: {claims: {role: everything}}
    roles: [everything]
roles:
  reader:
    rules:
      - {id: read, protocol: ssh, when: {channels: [exec], programs: [ls, cat, systemctl]}, action: allow}
      - id: restart
        protocol: ssh
        when: {commands: ["systemctl restart *"]}
        action: approve
        approval: {approvers: [everything], timeout: 1s}
      - {id: mask, protocol: ssh, action: mask, mask: {detectors: [card]}}
      - {id: no-reboot, protocol: ssh, when: {programs: [reboot]}, action: deny, message: power actions are for humans}
  everything:
    rules:
      - {id: all, protocol: ssh, when: {channels: "*"}, action: allow}
"""


def _attrs(command: str, **kw: object) -> list[dict[str, object]]:
    return [dict(r.attrs) for r in requests_for_command(command, target="web", **kw)]  # type: ignore[arg-type]


def test_each_program_of_a_command_line_is_a_request() -> None:
    attrs = _attrs("cat /etc/hostname | grep x > /tmp/out 2>/dev/null >&/dev/stderr")
    assert [a["program"] for a in attrs] == ["cat", "grep"]
    assert attrs[0] == {
        "channel": "exec",
        "program": "cat",
        "program_path": "cat",
        "command": "cat /etc/hostname",
        "argv": "/etc/hostname",
        "writes": [],
        "via_wrapper": False,
        "via": None,
        "paths": [],
    }
    assert attrs[1]["via_wrapper"] is False  # a pipeline member is started by the agent's own shell
    assert attrs[1]["writes"] == ["/tmp/out"]  # /dev/null and /dev/stderr are left out


def test_wrapped_programs_are_marked() -> None:
    attrs = _attrs("sudo -u app systemctl restart nginx")
    assert [(a["program"], a["via_wrapper"]) for a in attrs] == [("sudo", False), ("systemctl", True)]
    assert attrs[1]["command"] == "systemctl restart nginx"
    subst = _attrs("echo $(id)")
    assert [(a["program"], a["via_wrapper"]) for a in subst] == [("id", True), ("echo", False)]


def test_path_of_a_program_is_its_name() -> None:
    (attrs,) = _attrs("/bin/ls -la /tmp")
    assert attrs["program"] == "ls" and attrs["command"] == "ls -la /tmp"


def test_unparsable_and_empty_command_lines() -> None:
    (bad,) = requests_for_command("echo $(printf rm) x; `", target="web")
    assert bad.action == "unparsable" and "parse_error" in bad.attrs
    (empty,) = requests_for_command("X=1", target="web")
    assert empty.action == "empty" and "program" not in empty.attrs


def test_requests_of_one_line_have_distinct_digests() -> None:
    a, b = requests_for_command("systemctl restart a && systemctl restart a", target="web")
    assert a.digest() != b.digest()
    assert "systemctl restart a && systemctl restart a" in a.payload


@pytest.mark.parametrize(
    ("command", "action", "rule"),
    [
        ("ls -la; cat /etc/hostname", "allow", "read"),
        ("ls; rm -rf /tmp/x", "deny", "lictor:default-deny"),
        ("ls $(rm -rf /tmp/x)", "deny", "lictor:default-deny"),
        # approval needed for one part, but another part is denied: denied at once, nobody is asked
        ("systemctl restart nginx; rm x", "deny", "lictor:default-deny"),
        # the wrapper is denied by default, what it runs by a rule: the rule is the answer, whatever the order
        ("sudo reboot", "deny", "no-reboot"),
        ("rm x; reboot", "deny", "no-reboot"),
        # this gateway has no approval service configured in the harness: the hold is a denial
        ("systemctl status nginx && systemctl restart nginx", "deny", "restart"),
    ],
)
def test_a_command_line_is_decided_as_a_whole(command: str, action: str, rule: str) -> None:
    async def run() -> Decision:
        async with testing.harness(SshAddon(), rulepacks=PACK) as h:
            h.gateway.approvals = None
            session = await h.session(testing.identity("bot", role="reader"), protocol="ssh", target="web")
            decision, _ = await decide_all(session, requests_for_command(command, target="web"), None)
            return decision

    decision = asyncio.run(run())
    testing.assert_decision(decision, action, rule=rule)
    if action == "allow":
        assert decision.mask_rule_ids == ("mask",)


def test_unparsable_command_is_denied_even_when_the_policy_allows_everything() -> None:
    async def run() -> Decision:
        async with testing.harness(SshAddon(), rulepacks=PACK) as h:
            session = await h.session(testing.identity("root-ish", role="everything"), protocol="ssh", target="web")
            allowed, _ = await decide_all(session, requests_for_command("ls", target="web"), None)
            testing.assert_decision(allowed, "allow", rule="all")
            decision, _ = await decide_all(session, requests_for_command("$(printf rm) -rf /", target="web"), None)
            return decision

    decision = asyncio.run(run())
    testing.assert_decision(decision, "deny", rule=UNPARSABLE_RULE)
    assert "cannot be analysed" in decision.message


def test_denial_text_names_what_rule_policy_and_next_step() -> None:
    (request,) = requests_for_command("rm -rf /srv", target="web")
    decision = Decision.deny("destructive commands are for humans", "no-rm", "abc123")
    text = denial_text(request, decision)
    assert re.fullmatch(
        r"lictor: denied `rm -rf /srv` by rule no-rm: destructive commands are for humans "
        r"\(policy abc123\)\. This is a deliberate restriction; .+",
        text,
    ), text
    (bad,) = requests_for_command("echo 'open", target="web")
    text = denial_text(bad, Decision.deny("x", "lictor:default-deny", "v1"))
    assert text.startswith(f"lictor: denied this command line by rule {UNPARSABLE_RULE}: the command line cannot")
    assert "literal arguments" in text
    # a shell on the session's input is sent where its lines are decided; other interpreters are not shells
    for command, step in (("sudo bash -s", "ssh -T HOST < script.sh"), ("python3 -", "literal arguments")):
        (bad,) = requests_for_command(command, target="web")
        assert step in denial_text(bad, Decision.deny("x", "lictor:default-deny", "v1")), command


def test_other_requests_have_readable_denials() -> None:
    decision = Decision.deny("no", "r1", "v")
    assert "denied shell by rule r1" in denial_text(channel_request("shell", target="t"), decision)
    assert "port forwarding (local) to db:5432" in denial_text(
        forward_request("local", "db", 5432, target="t"), decision
    )
    text = denial_text(sftp_request("read", ["/etc/shadow"], target="t"), decision)
    assert "denied sftp read of /etc/shadow by rule r1" in text


def test_policy_test_requests_are_built_like_the_gateway_builds_them() -> None:
    build = VOCABULARY.build_requests
    assert build is not None
    reqs = build({"command": "ls | grep x"}, "web")
    assert [r.attrs["program"] for r in reqs] == ["ls", "grep"]
    (line,) = build({"command": "ls", "channel": "shell_line"}, "web")
    assert line.attrs["channel"] == "shell_line"
    (op,) = build({"channel": "sftp", "operation": "write", "path": "/srv/x"}, "web")
    assert op.attrs == {"channel": "sftp", "operation": "write", "paths": ["/srv/x"]}
    (fwd,) = build({"channel": "port_forward", "destination": "db:5432"}, "web")
    assert fwd.attrs["destination"] == "db:5432"
    (shell,) = build({"channel": "shell"}, "web")
    assert shell.attrs == {"channel": "shell"}
    with pytest.raises(ValueError, match="unknown ssh channel"):
        build({"channel": "telnet"}, "web")


def test_the_program_as_written_is_a_rule_attribute() -> None:
    # `programs` is the basename: /tmp/x/cat is cat to it. `program_paths` keeps the path, plain too.
    def paths(command: str) -> list[object]:
        return [r.attrs["program_path"] for r in requests_for_command(command, target="t")]

    assert paths("cat x") == ["cat"]
    assert paths("/usr/bin/cat x | ./ls") == ["/usr/bin/cat", ["./ls", "ls"]]
    assert paths("/usr/bin/../../tmp/p/cat") == [["/usr/bin/../../tmp/p/cat", "/tmp/p/cat"]]
    assert paths("xargs /tmp/p/cat") == ["xargs", "/tmp/p/cat"]


def test_the_line_shells_process_id_is_read_only_before_its_first_prompt() -> None:
    # The gateway's command prints it before bash starts; after the first prompt, output comes from the
    # agent's lines, which could print a hello of their own (the nonce is no secret: `echo "$PS1"`).
    mark = READY_MARK.format("ab12").encode()
    hello = ShellHello("ab12", mark)
    out = b"".join(hello.feed(bytes([b])) for b in b"motd\r\n\x1b]7374;ab12;4242\x07")
    assert (out, hello.pid, hello.done) == (b"motd\r\n", 4242, True)
    assert hello.feed(b"\x1b]7374;ab12;1\x07") == b"\x1b]7374;ab12;1\x07" and hello.pid == 4242
    late = ShellHello("ab12", mark)
    assert late.feed(b"$ " + mark + b"\x1b]7374;ab12;99\x07") == b"$ " + mark + b"\x1b]7374;ab12;99\x07"
    assert (late.pid, late.done) == (None, True)
    other = ShellHello("ab12", mark)
    assert other.feed(b"\x1b]7374;cd34;7\x07\x1b[1m") == b"\x1b]7374;cd34;7\x07\x1b[1m" and other.pid is None


@pytest.mark.parametrize(
    ("command", "channel", "operation", "paths"),
    [
        ("git-upload-pack '/srv/git/app.git'", "git", "read", ["/srv/git/app.git"]),
        ("git-upload-archive '/srv/git//app.git/'", "git", "read", ["/srv/git/app.git"]),
        ("git-receive-pack 'app.git'", "git", "write", ["app.git"]),
        ("git receive-pack '~/app.git'", "git", "write", ["~/app.git", "./~/app.git"]),
        ("rsync --server --sender -e.LsfxCIvu . '~/x' ~", "rsync", "read", ["~/x", "./~/x", "~", "./~"]),
        ("rsync --server --sender -logDtpre.iLsfxCIvu . /var/log/syslog /etc/hostname", "rsync", "read",
         ["/var/log/syslog", "/etc/hostname"]),
        ("rsync --server -e.LsfxCIvu . /srv/app/", "rsync", "write", ["/srv/app"]),
        ("rsync --server -logDtpre.iLsfxCIvu --log-format=X --partial --stats . /srv/app/", "rsync", "write",
         ["/srv/app"]),
        ("rsync --server -logDtprCe.iLsfxCIvu -B2048 . /srv/app/", "rsync", "write", ["/srv/app"]),
        ("rsync --server -be.LsfxCIvu --backup-dir=~/bk . /srv/app/", "rsync", "write",
         ["/srv/app", "/srv/app/~/bk", "~/bk", "./~/bk"]),
        # without a trailing /, the destination may be the directory a relative --backup-dir is in, or a file in it
        ("rsync --server -be.LsfxCIvu --backup-dir bk . /srv/app", "rsync", "write",
         ["/srv/app", "/srv/app/bk", "/srv/bk"]),
        ("rsync --server -logDtpre.iLsfxCIvu --delete --partial-dir .p --backup-dir /srv/old . /srv/app/", "rsync",
         ["write", "remove"], ["/srv/app", "/srv/app/.p", "/srv/old"]),
        ("rsync --server --sender -vlogDtprze.iLsfxCIvu --remove-source-files . /srv/out", "rsync", ["read", "remove"],
         ["/srv/out"]),
    ],
)  # fmt: skip
def test_git_and_rsync_servers_are_decided_as_file_transfers(
    command: str, channel: str, operation: object, paths: list[str]
) -> None:
    # Their output is a binary protocol: masking it broke `git clone` (a Luhn-valid digit run in a ref or a
    # hash) and hung rsync. They are the file transfers sftp and scp are, and are decided as such.
    [attrs] = _attrs(command)
    assert attrs == {"channel": channel, "operation": operation, "paths": paths}


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("cd /srv && git-upload-pack app.git", "whole command line"),
        ("sudo rsync --server --sender -e.LsfxCIvu . /etc/shadow", "whole command line"),
        ("git-upload-pack /srv/*.git", "only known at run time"),
        ("/tmp/planted/git-upload-pack /srv/app.git", "run by its name"),
        ("./rsync --server --sender -e.LsfxCIvu . /srv/app", "run by its name"),
        ("git-upload-pack $HOME/app.git", "only known at run time"),
        ("git-upload-pack ~root/app.git", "only known at run time"),
        ("git-upload-pack --timeout=1 a b", "no other argument"),
        ("rsync --server --sender -Le.LsfxCIvu . /srv/app", "--copy-links"),
        ("rsync --server -se.LsfxCIvu .", "--secluded-args"),
        ("rsync --server --log-file=/etc/cron.d/x -e.LsfxCIvu . /srv/app", "--log-file"),
        ("rsync --server --files-from=/etc/list -e.LsfxCIvu . /srv/app", "--files-from"),
        ("rsync --server --suffix=/../../x -be.LsfxCIvu . /srv/app", "--suffix"),
        ("rsync --server --daemon .", "--daemon"),
        ("rsync --server -e.LsfxCIvu", "`.`"),
        # rsync reads options after the files too, and -e without its value takes the `.` (then the next word is
        # the directory the files are named from)
        ("rsync --server --sender -e.LsfxCIvu . /srv/app --log-file=/etc/cron.d/x", "after the `.`"),
        ("rsync --server --sender -e.LsfxCIvu . /srv/app -L", "after the `.`"),
        ("rsync --server -e.LsfxCIvu . /srv/app -- -x", "after the `.`"),
        ("rsync --server --sender -ve . /etc shadow", "next word"),
        ("rsync --server --sender -e . /etc shadow", "next word"),
        # what `sftp -s /usr/lib/openssh/sftp-server` sends: SFTP outside the subsystem, whose operations no rule saw
        ("/usr/lib/openssh/sftp-server", "sftp subsystem"),
        ("cd / && exec /usr/libexec/openssh/sftp-server -e", "sftp subsystem"),
        ("sh -c 'sftp-server -d /'", "sftp subsystem"),
    ],
)
def test_transfers_the_gateway_cannot_see_whole_are_refused(command: str, why: str) -> None:
    [attrs] = _attrs(command)
    assert attrs["channel"] == "exec" and why in str(attrs["parse_error"]), attrs


def test_a_transfer_is_allowed_by_a_transfer_rule_only() -> None:
    policy = testing.policy(
        PACK.replace(
            "  everything:",
            "      - {id: files, protocol: ssh, when: {channels: [git], paths: ['/srv/*'], operations: [read]},"
            " action: allow}\n  everything:",
        ),
        vocabularies=[VOCABULARY],
    )
    reader = testing.identity("r", role="reader")
    [clone] = requests_for_command("git-upload-pack '/srv/app.git'", target="web")
    [push] = requests_for_command("git-receive-pack '/srv/app.git'", target="web")
    assert policy.decide(reader, clone).action == "allow"
    denied = policy.decide(reader, push)
    assert denied.action == "deny"
    assert "denied git write of /srv/app.git by rule lictor:default-deny" in denial_text(push, denied)


@pytest.mark.parametrize(
    ("command", "writes"),
    [
        # bash opens a socket for /dev/tcp and /dev/udp whichever way it redirects: `cat < /dev/tcp/HOST/PORT`
        # connected an observer, whose rules forbid writes, to any port the target reaches
        ("cat < /dev/tcp/10.0.0.9/5432", ["/dev/tcp/10.0.0.9/5432"]),
        ("cat 3</dev/udp/10.0.0.9/53 <&3", ["/dev/udp/10.0.0.9/53"]),
        ("x=/dev/tcp/10.0.0.9/22; cat < $x", ["$x"]),
        ("cat < /etc/hostname", []),
        ('cat < "$HOME/notes"', []),
        ("cat <<< $x", []),
    ],
)
def test_a_redirection_that_may_connect_is_a_write(command: str, writes: list[str]) -> None:
    assert _attrs(command)[-1]["writes"] == writes
