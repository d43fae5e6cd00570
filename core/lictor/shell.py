"""Static analysis of shell command lines, for the SSH addon and for Kubernetes exec.

Theory of operation
===================

An agent that reaches a host through Lictor's SSH gateway sends text that a shell on the target will
parse and run: an ``exec`` request's command string, or one line typed into an interactive shell. The
rules of a rule pack speak about *programs* (``allow: systemctl status *``, ``deny: rm -rf *``), so before
anything is forwarded the gateway must know every program that text would start, with its arguments
and redirections. :func:`analyse` computes that list without running anything. It is a security
boundary, so it follows one principle: **whatever cannot be known with certainty raises
ShellParseError**, and the caller denies the request. It never guesses in the agent's favour.

The pipeline is classic: a hand-written lexer and recursive-descent parser that follow the POSIX Shell
Command Language (2.3 token recognition, 2.6 expansions, 2.10 grammar) plus the bash extensions an
agent is likely to type (``[[ ]]``, ``(( ))``, ``$'...'``, ``<(...)``, ``|&``, ``&>``, ``<<<``,
``function``, ``select``, ``coproc``), then a walk over the syntax tree that emits one
:class:`Invocation` per program.

Words. A word is kept as a list of segments: literal text (remembering whether it was quoted),
parameter expansions, command substitutions, arithmetic and process substitutions. Quote removal is
done exactly as the shell does it, so ``r''m``, ``\\rm``, ``"rm"`` and ``$'\\x72\\x6d'`` are all the
program ``rm``. Expansions keep their source text (``$HOME/x``): their values are unknown at the
gateway, rules see them verbatim. Nested command substitutions, backquotes (with their extra level of
backslash processing), process substitutions and the bodies of unquoted here-documents are parsed
recursively and their invocations reported, tagged with how they were reached (``via``).

What makes a command unknowable, and therefore an error:

* a command name that comes from an expansion (``$x``, ``$(printf rm)``, ``"$@"``), contains glob or
  brace-expansion characters, or starts with ``=`` (zsh's ``=cmd`` path expansion);
* program text the gateway cannot see: a shell or interpreter reading its program from a pipe, from
  the session's own input, from a process substitution or ``/dev/stdin``; ``sh -c``/``eval``/``ssh``
  bodies built from expansions; a ``find -exec``/``xargs -I`` placeholder inside code;
* constructs that make the shell evaluate text later: alias definitions, ``hash -p``, ``enable -f``,
  ``fc``, ``bind -x``, ``mapfile -C``, ``compgen -C``, ``${x@P}``, indirect ``${!x}``, locale strings;
* assignments to variables that change what runs or load code (``PATH``, ``LD_*``, ``BASH_ENV``,
  ``PS4``, ``PROMPT_COMMAND``, pager and editor variables, ``BASH_FUNC_*``...);
* bash's arithmetic evaluates array subscripts, and a subscript may hold a command substitution:
  ``x='a[$(rm -rf /)]'; echo $((x))`` runs ``rm``. So arithmetic (``$((..))``, ``((..))``, ``let``,
  ``[[ a -eq b ]]``, ``declare -i``, ``${s:off:len}``) may only contain numbers, operators and names,
  and a name used there must not receive text from this command line (assignments other than integer
  literals, ``read``, ``for``, ``${x:=..}``...) nor be a variable whose value the agent controls
  (``_``, ``REPLY``, ``BASH_REMATCH``, ``TERM``, ``LANG``, ``LC_*``, ``SSH_*``...). Builtins that take a
  variable name (``read``, ``unset``, ``printf -v``, ``declare``, ``test -v``...) must get a plain
  literal name: ``unset 'a[$(rm -rf /)]'`` runs ``rm`` too;
* anything the parser does not understand: syntax errors, unbalanced quotes or brackets, NUL bytes,
  more than :data:`MAX_COMMAND_BYTES` of input, nesting deeper than the limits below.

Wrappers. Programs that run another program are unwrapped, and both are reported: ``sudo``, ``env``,
``nohup``, ``timeout``, ``nice``, ``ionice``, ``stdbuf``, ``time``, ``command``, ``builtin``, ``exec``,
``setsid``, ``chroot``, ``flock``, ``watch``, ``su``/``runuser``, ``doas``, ``pkexec``, ``xargs``,
``find -exec``, ``busybox``, ``ssh`` (the remote command; also the one ``systemctl -H HOST`` runs), the
shells' ``-c`` and ``eval``/``trap`` bodies, ``rsync -e``, and what runs in a container or a pod (``docker``,
``podman``, ``nerdctl`` ``exec``/``run``/``create``, ``kubectl exec``/``debug``/``run``, ``crictl exec``), with
the session's input when ``-i`` keeps it open, ``machinectl shell`` (in a container or on the host), and
the hooks of ``apt -o`` and ``dpkg --pre-invoke``.
Their options are parsed with their real option tables; an unknown option or an option position filled
by an expansion raises, because it could shift which word is the program.
Interpreters with inline code (``python -c``, ``perl -e``, ``awk``...) are reported with their
arguments and left to the rules, except where the code runs the lines the program reads as commands
(awk's ``system()`` and pipes, sed's ``e``) and those lines come from the session or a pipe: refused.
Only POSIX shells' bodies are parsed recursively (at most :data:`MAX_SHELL_DEPTH` levels).

Shell dialects. The target may run bash, dash or zsh. Where they disagree the analysis takes the
union or refuses: ``<(..)`` and ``{a,b}`` are treated as bash does, ``$'..'`` is decoded (and refused
with an escaped quote in it, where dash, which has no ``$'..'``, would end the string), zsh's
``=cmd``, ``$~x`` and precommand modifiers are handled, ``fish``/``csh`` bodies are refused. Line
continuations (backslash-newline) are removed by bash before it tokenizes, so they are refused where
they could join tokens differently from how they read: after ``$``, inside a reserved word, or where
they move the end of a here-document (bash joins lines before matching the delimiter, dash does not).

Interactive lines. ``interactive=True`` adds the rules of an interactive shell with a terminal:
history expansion (``!!``, ``^a^b``), comments after a command (zsh without ``INTERACTIVE_COMMENTS``
reads them as words) and programs that take commands from keystrokes (editors, pagers, REPLs) are
refused. Text that stops mid-command (open quote, ``if`` without ``fi``, trailing ``|``, a
here-document without its body, a final backslash) raises :class:`ShellIncompleteError`, so the
caller can buffer lines and analyse the whole command before anything reaches the shell. Lines of a
line-inspected shell (``line=True``) may not undo how the SSH gateway's shell reads them: ``unset`` of
the prompt variables, a function named ``read``, ``enable -n``, a ``DEBUG`` trap, job control turned off
and ``exec`` redirecting the shell's own input are refused (see ``_LINE_SHELL_VARS``), and so are ``&``
and ``coproc`` below the top of the line and ``setsid`` without ``-w`` (see ``_BACKGROUND_READER``).

How it is checked. Besides tables of cases and fuzzing, the tests run generated commands under real
bash and dash in a sandbox where every program is a logging stub, and require that everything the
shells ran was reported.

Programs started without a shell. ``kubectl exec -i POD -- ARGV`` runs ``ARGV`` directly, with the
agent's stream as its standard input. :func:`stdin_shell` applies the same analysis to such an argv to
tell what becomes of that input: data (``tar xf -``), the commands of a POSIX shell (``sh``, ``env sh``,
``nice bash -s``), whose lines the caller checks one by one, or program text that cannot be inspected
(``python3 -``, ``awk -f -``, ``xargs sh``), which raises.

Known limits (documented, not guessed): the content of files the command runs (``sh script.sh``,
``source f``, ``~/.bashrc``, git or ssh configuration), the environment the target's sshd provides
(the SSH addon must not forward agent-chosen variables), the login shell of the target account (it
must be a POSIX shell), a program copied under another name, and programs that run commands from
their own arguments but are not modelled here (``parallel``, ``make``, the command an image runs when
``docker run`` names none...) are outside what text analysis can see: such programs
are reported as themselves and the rules must treat them as able to run anything.
"""

import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_SHELL_DEPTH",
    "Analysis",
    "Invocation",
    "Redirect",
    "ShellIncompleteError",
    "ShellParseError",
    "ShellState",
    "analyse",
    "analyse_argv",
    "stdin_shell",
]

MAX_COMMAND_BYTES = 64 * 1024
"""Longest command line accepted, in UTF-8 bytes."""
MAX_SHELL_DEPTH = 8
"""How many shells deep (``sh -c``, ``eval``, ``ssh``, here-documents fed to a shell) we follow."""
MAX_NESTING = 48
"""Deepest syntactic nesting (``$(``, ``(``, ``{``, ``if``...) inside one shell."""
MAX_WRAPPERS = 32
"""Longest chain of wrappers (``sudo env nice timeout ...``)."""
MAX_INVOCATIONS = 20_000


class ShellParseError(ValueError):
    """The command line cannot be analysed with certainty; the request must be denied."""


class ShellIncompleteError(ShellParseError):
    """The text stops in the middle of a command: an open quote, ``if`` without ``fi``, a trailing
    ``|`` or ``&&``, a here-document without its body, or (interactive lines) a final backslash.

    An interactive shell would wait for more lines; the SSH addon can keep buffering and analyse the
    whole text once it is complete. Everything else treats it as the ShellParseError it is.
    """


@dataclass(frozen=True, slots=True)
class Redirect:
    """One redirection. ``op`` includes the descriptor prefix (``2>``, ``2>&``, ``{fd}>``)."""

    op: str
    target: str
    writes: bool
    body: str | None = None
    """Text fed by a here-document (``<<``) or here-string (``<<<``)."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """A program the command line would start."""

    program: str
    """As written after quote removal: ``/bin/rm``, ``rm``."""
    name: str
    """Basename of ``program``: ``rm``."""
    args: tuple[str, ...]
    """Arguments after quote removal; expansions keep their source text (``$HOME/x``)."""
    argv_text: str
    """``args`` joined with single spaces, for glob rules such as ``rm -rf *``."""
    redirects: tuple[Redirect, ...] = ()
    via: str | None = None
    """How it is reached: None at top level, else ``pipeline``, ``subshell``, ``command_substitution``,
    ``process_substitution``, ``function``, ``sh -c``, ``sh stdin``, ``eval``, ``trap``, ``xargs``,
    ``find -exec``, or the wrapper's name (``sudo``, ``env``, ``timeout``, ``ssh``...)."""
    assignments: tuple[str, ...] = ()
    """``VAR=value`` words placed before the program (or given to ``env``/``sudo``)."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """Every program a command line would run, in execution order."""

    invocations: tuple[Invocation, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(inv.name for inv in self.invocations)


class ShellState:
    """What the earlier lines of one shell may have left in its variables, for the lines after them.

    A shell that reads its commands line by line keeps its variables between lines: ``echo
    ${x:='a[$(evil)]'}`` then ``echo $((x))`` runs ``evil``, though neither line alone does. Give the
    same instance to :func:`analyse` for every line of one such shell (an SSH shell, ``kubectl exec -i
    POD -- sh``): names a line assigns count as set by the agent on every later line, and names an
    earlier line uses where a value would be evaluated (arithmetic, option positions) stay checked on the
    later lines, since a function or trap defined there may run them after the value is set.
    """

    __slots__ = ("arith_names", "arrays", "int_vars", "taint_all", "tainted", "untainted")

    def __init__(self) -> None:
        self.tainted: set[str] = set()
        self.taint_all = False
        self.int_vars: set[str] = set()
        self.arith_names: set[str] = set()
        self.untainted: set[str] = set()
        self.arrays: set[str] = set()


def analyse(
    command: str, *, interactive: bool = False, line: bool = False, state: ShellState | None = None
) -> Analysis:
    """Return every program ``command`` would run, or raise :class:`ShellParseError`.

    ``command`` is an SSH ``exec`` command string (here-document bodies follow on the next lines) or
    one line of an interactive shell. Pass ``interactive=True`` for lines typed into a shell with a
    terminal: history expansion, comments and keystroke-driven programs are then refused as well.
    Pass ``line=True`` when ``command`` is one line that a shell reads from its input and that is
    sent followed by a newline (line-inspected shells): a final unquoted backslash then joins the
    next line to it, so it is refused as incomplete instead of read as a literal backslash, and pass
    the shell's :class:`ShellState`, which a line that is not refused updates.
    No I/O, bounded time and memory.
    """
    if not isinstance(command, str):
        raise ShellParseError("the command must be text")
    if len(command) > MAX_COMMAND_BYTES or len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise ShellParseError(f"the command is longer than {MAX_COMMAND_BYTES} bytes")
    if "\x00" in command:
        raise ShellParseError("the command contains a NUL byte")
    if interactive:
        for typed in command.split("\n"):
            if typed.startswith("^"):
                raise ShellParseError("'^old^new' history substitution is not allowed in interactive lines")
    ctx = _Ctx(interactive=interactive)
    ctx.line = line or interactive  # typed text ends with a newline too: a final backslash would continue it
    if state is not None:
        ctx.tainted |= state.tainted
        ctx.taint_all = state.taint_all
        ctx.int_vars |= state.int_vars
        ctx.arith_names |= state.arith_names
        ctx.untainted |= state.untainted
        ctx.arrays |= state.arrays
    env = _Env(via=None, stdin=_CHANNEL, redirects=(), depth=0)
    try:
        _analyse_text(command, env, ctx, interactive=interactive)
    except RecursionError:
        raise ShellParseError("the command is nested too deeply") from None
    ctx.finish()
    if state is not None:
        state.tainted |= ctx.tainted
        state.taint_all = state.taint_all or ctx.taint_all
        state.int_vars |= ctx.int_vars
        state.arith_names |= ctx.arith_names
        state.untainted |= ctx.untainted
        state.arrays |= ctx.arrays
    return Analysis(tuple(ctx.out))


def analyse_argv(argv: Sequence[str]) -> Analysis:
    """Every program started by running ``argv`` directly, without a shell in between: ``kubectl exec POD
    -- ARGV``. The program is reported with what its wrappers run (``env``, ``nice``, ``xargs``...) and
    the commands of a ``sh -c`` script, as :func:`analyse` reports them. Its standard input is taken to
    be empty: what a program reading the agent's stream does with it is :func:`stdin_shell`'s question.
    Raises :class:`ShellParseError` when it cannot be known with certainty. Pure function.
    """
    if not argv:
        return Analysis(())
    if any("\x00" in a for a in argv):
        raise ShellParseError("the command contains a NUL byte")
    if sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv) > MAX_COMMAND_BYTES:
        raise ShellParseError(f"the command is longer than {MAX_COMMAND_BYTES} bytes")
    ctx = _Ctx(interactive=False)
    env = _Env(via=None, stdin=_NULL, redirects=(), depth=0)
    try:
        _run([_Arg.plain(a) for a in argv], env, ctx, _NULL, ())
    except RecursionError:
        raise ShellParseError("the command is nested too deeply") from None
    ctx.finish()
    return Analysis(tuple(ctx.out))


def stdin_shell(argv: Sequence[str]) -> str | None:
    """What becomes of the standard input of a program started directly with ``argv`` (no shell in
    between, no terminal), when that input is the agent's stream: ``kubectl exec -i POD -- ARGV``.

    Returns the name of the program that reads shell commands from it: a POSIX shell reached directly or
    through wrappers (``sh``, ``bash -s``, ``env sh``, ``nice -n 5 sh``, ``timeout 60 sh``, ``busybox env
    sh``), or one that starts such a shell (``su``, ``chroot DIR``, ``ssh HOST``). The caller must check
    each line before the shell reads it. Returns None when no program takes code
    from it, so it is data (``tar xf -``, ``cat > f``, ``tee f``, ``gzip -d``, ``sh job.sh``,
    ``python3 job.py``). Raises :class:`ShellParseError` when anything else would run code read from it:
    an interpreter or command reader (``python3``, ``python3 -``, ``perl``, ``awk -f -``, ``psql``), a
    shell it reaches through a pipe, ``xargs`` or a command string (``sh -c 'cat | sh'``, ``xargs sh``,
    ``sh -c sh``), or an ``argv`` that cannot be analysed. Pure function.
    """
    if not argv:
        return None
    if any("\x00" in a for a in argv):
        raise ShellParseError("the command contains a NUL byte")
    if sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv) > MAX_COMMAND_BYTES:
        raise ShellParseError(f"the command is longer than {MAX_COMMAND_BYTES} bytes")
    ctx = _Ctx(interactive=False)
    ctx.stdin_lines_checked = True
    env = _Env(via=None, stdin=_CHANNEL, redirects=(), depth=0)
    try:
        _run([_Arg.plain(a) for a in argv], env, ctx, _CHANNEL, ())
    except RecursionError:
        raise ShellParseError("the command is nested too deeply") from None
    ctx.finish()
    return ctx.stdin_shell


# --------------------------------------------------------------------------------------------------
# Words and syntax tree
# --------------------------------------------------------------------------------------------------


def _fs(*names: str) -> frozenset[str]:
    return frozenset(names)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _words_list(text: str) -> list[str]:
    return text.split()


_LIT, _PARAM, _SUB, _ARITH, _PROC = range(5)


@dataclass(slots=True)
class _Seg:
    text: str  # literal text after quote removal, or the source text of an expansion
    quoted: bool
    kind: int = _LIT
    name: str | None = None  # _PARAM: the variable of a plain $NAME / ${NAME}
    int_safe: bool = False  # expansion whose value is always an integer ($#, ${#x}, $((..)))


class _Word:
    __slots__ = ("_chars", "_quoted", "segs", "subs")

    def __init__(self) -> None:
        self.segs: list[_Seg] = []
        self.subs: list[tuple[str, _Node, bool]] = []  # (via, body, stdin is a pipe)
        self._chars: list[str] = []
        self._quoted = False

    def lit(self, text: str, quoted: bool) -> None:
        if self._chars and self._quoted != quoted:
            self._flush()
        self._quoted = quoted
        self._chars.append(text)

    def add(self, seg: _Seg) -> None:
        self._flush()
        self.segs.append(seg)

    def _flush(self) -> None:
        if self._chars:
            self.segs.append(_Seg("".join(self._chars), self._quoted))
            self._chars = []

    def done(self) -> "_Word":
        self._flush()
        return self

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segs)

    @property
    def literal(self) -> bool:
        return all(s.kind == _LIT for s in self.segs)

    def bare(self) -> str | None:
        """The text when the word is a single unquoted literal (reserved words, names), else None."""
        if len(self.segs) == 1 and self.segs[0].kind == _LIT and not self.segs[0].quoted:
            return self.segs[0].text
        return None


@dataclass(slots=True)
class _Redir:
    prefix: str  # io number or {varname}
    op: str
    target: _Word | None = None
    delim: str = ""
    quoted: bool = False  # here-document with a quoted delimiter: body is literal
    strip_tabs: bool = False
    body: str | None = None
    body_word: _Word | None = None  # unquoted here-document body, parsed for expansions


@dataclass(slots=True)
class _Simple:
    assigns: list[_Word]
    words: list[_Word]
    redirs: list[_Redir]


@dataclass(slots=True)
class _Pipeline:
    cmds: list["_Node"]
    timed: tuple[str, ...] | None  # `time` keyword and its options


@dataclass(slots=True)
class _List:
    items: list["_Node"]


@dataclass(slots=True)
class _Compound:
    kind: str  # subshell group if while until for select case cond arith function coproc
    bodies: list["_Node"] = field(default_factory=list)
    words: list[_Word] = field(default_factory=list)
    redirs: list[_Redir] = field(default_factory=list)
    name: str | None = None  # function name, loop variable


_Node = _Simple | _Pipeline | _List | _Compound

# --------------------------------------------------------------------------------------------------
# Lexer and parser
# --------------------------------------------------------------------------------------------------

_META = frozenset(" \t\n;&|<>()")
_DELIM_LOOKAHEAD = r"(?=[ \t\n;&|<>()]|$)"
_RESERVED_RE = re.compile(
    r"(?:if|then|else|elif|fi|do|done|case|esac|while|until|for|in|select|function|time|coproc"
    r"|\{|\}|!|\[\[|\]\])" + _DELIM_LOOKAHEAD
)
_OPS = (
    ";;&",
    "&>>",
    "<<<",
    "<<-",
    ";;",
    ";&",
    "&&",
    "||",
    "|&",
    "&>",
    "<<",
    "<&",
    "<>",
    ">>",
    ">&",
    ">|",
    ";",
    "&",
    "|",
    "(",
    ")",
    "<",
    ">",
    "\n",
)
_REDIR_OPS = frozenset({"<", ">", ">>", ">|", "<>", "<&", ">&", "&>", "&>>", "<<", "<<-", "<<<"})
_IONUM_RE = re.compile(r"(?:[0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\})(?=[<>])")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATTERN_CHAR_RE = re.compile(r"[*?\[{]")
_PLAIN_RUN_RE = re.compile(r"[^ \t\n;&|<>()'\"\\$`!]+")
_DQUOTE_RUN_RE = re.compile(r'[^"\\$`!]+')
_PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!0-]")
_FUNC_NAME_RE = re.compile(r"[^\s'\"\\$`=;&|<>()]+")
_PARAM_OPS = (":-", ":=", ":?", ":+", "-", "=", "?", "+", "##", "#", "%%", "%", "//", "/#", "/%", "/", "^^", "^")
_PARAM_OPS2 = (",,", ",", "@", ":")
_ARITH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ \t\n+-*/%<>=!&|^~?:,()#@${};")
_ARITH_TOKEN_RE = re.compile(
    r"(?P<ws>\s+)|(?P<num>[0-9][0-9A-Za-z_@#]*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\$(?:(?P<dname>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<bname>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<special>[#?$!]))"
    r"|(?P<nested>\$(?=\(\())|(?P<op>[-+*/%<>=!&|^~?:,();])"
)
_ANSI_SIMPLE = {
    "a": "\a",
    "b": "\b",
    "e": "\x1b",
    "E": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}
_OCT_RE = re.compile(r"[0-7]{0,2}")
_HEX_RES = {
    "x": re.compile(r"[0-9A-Fa-f]{1,2}"),
    "u": re.compile(r"[0-9A-Fa-f]{1,4}"),
    "U": re.compile(r"[0-9A-Fa-f]{1,8}"),
}
_TIME_P_RE = re.compile(r"-p" + _DELIM_LOOKAHEAD)
_DASHDASH_RE = re.compile(r"--" + _DELIM_LOOKAHEAD)
_COMPOUND_START = frozenset({"{", "if", "while", "until", "for", "select", "case", "[["})
_UNEXPECTED_RESERVED = frozenset({"then", "else", "elif", "fi", "do", "done", "esac", "}"})
_NO_WORDS: frozenset[str] = frozenset()


class _Parser:
    """Recursive-descent parser over one shell's source text.

    Command substitutions ``$(...)`` and process substitutions are parsed by the same parser (so
    pending here-documents and quoting work across them, as in bash); backquote bodies, ``sh -c``
    bodies and here-document text get a parser of their own sharing the analysis context.
    """

    def __init__(self, src: str, ctx: "_Ctx", *, interactive: bool, nest: int = 0, top: bool = False) -> None:
        self.top = top  # the text the session sent (not a backquote body, sh -c string...)
        self.src = src
        self.n = len(src)
        self.pos = 0
        self.ctx = ctx
        self.interactive = interactive
        self.nest = nest
        self.pending: list[_Redir] = []

    # -- helpers ------------------------------------------------------------------------------------

    def fail(self, message: str) -> NoReturn:
        if self.top and (self.pos >= self.n or message.startswith("unterminated")):
            raise ShellIncompleteError(f"incomplete command: {message}")
        raise ShellParseError(f"{message} (at offset {self.pos})")

    def continuation_at_end(self) -> None:
        if self.pos >= self.n and self.interactive and self.top:
            self.fail("the line ends with a line continuation")

    def enter(self) -> None:
        self.nest += 1
        if self.nest > MAX_NESTING:
            self.fail("the command is nested too deeply")

    def leave(self) -> None:
        self.nest -= 1

    def describe_next(self) -> str:
        if self.pos >= self.n:
            return "end of input"
        op = self.peek_op()
        if op == "\n":
            return "newline"
        if op is not None:
            return f"'{op}'"
        return repr(self.src[self.pos : self.pos + 20])

    def skip_blanks(self) -> None:
        s, n = self.src, self.n
        while self.pos < n:
            c = s[self.pos]
            if c == " " or c == "\t":
                self.pos += 1
            elif c == "\\" and self.pos + 1 < n and s[self.pos + 1] == "\n":
                self.pos += 2
                self.continuation_at_end()
            else:
                break

    def skip_comment(self, *, command_start: bool) -> bool:
        if self.pos >= self.n or self.src[self.pos] != "#":
            return False
        end = self.src.find("\n", self.pos)
        end = self.n if end < 0 else end
        if self.interactive:
            text = self.src[self.pos + 1 : end]
            if not command_start or any(c in text for c in ";&|<>()$`'\"\\{}"):
                self.fail(
                    "comments after a command or holding shell syntax are not allowed in interactive "
                    "lines (zsh treats them as words)"
                )
        self.pos = end
        return True

    def skip_blanks_comments(self) -> None:
        self.skip_blanks()
        self.skip_comment(command_start=False)

    def skip_space(self) -> None:
        """Skip blanks, comments and newlines (reading any here-document bodies that are due)."""
        while True:
            self.skip_blanks()
            if self.skip_comment(command_start=True):
                continue
            if self.pos < self.n and self.src[self.pos] == "\n":
                self.consume_newline()
                continue
            return

    def consume_newline(self) -> None:
        self.pos += 1
        if self.pending:
            self.read_heredoc_bodies()

    def peek_op(self) -> str | None:
        s, p = self.src, self.pos
        if p >= self.n:
            return None
        c = s[p]
        if c not in ";&|<>()\n":
            return None
        if (c == "<" or c == ">") and p + 1 < self.n and s[p + 1] == "(":
            return None  # process substitution: a word
        for op in _OPS:
            if s.startswith(op, p):
                return op
        return None  # pragma: no cover - every metacharacter is an operator prefix

    def peek_reserved(self) -> str | None:
        m = _RESERVED_RE.match(self.src, self.pos)
        return m.group() if m else None

    def expect_reserved(self, word: str) -> None:
        self.skip_space()
        if self.peek_reserved() != word:
            self.fail(f"expected '{word}' but found {self.describe_next()}")
        self.pos += len(word)

    def expect_op(self, op: str) -> None:
        self.skip_blanks()
        if self.peek_op() != op:
            self.fail(f"expected '{op}' but found {self.describe_next()}")
        self.pos += len(op)

    def history_check(self, in_dquote: bool) -> None:
        nxt = self.src[self.pos + 1] if self.pos + 1 < self.n else ""
        if nxt in ("", " ", "\t", "\n", "=", "(") or (in_dquote and nxt == '"'):
            return
        self.fail("history expansion ('!') is not allowed in interactive lines")

    # -- grammar ------------------------------------------------------------------------------------

    def parse_program(self) -> _Node:
        node = self.parse_list(_NO_WORDS, _NO_WORDS)
        if self.pos < self.n:
            self.fail(f"unexpected {self.describe_next()}")
        if self.pending:
            self.fail(f"here-document delimited by '{self.pending[0].delim}' has no body")
        return node

    def parse_list(self, stop_words: frozenset[str], stop_ops: frozenset[str]) -> _List:
        self.enter()
        items: list[_Node] = []
        while True:
            self.skip_space()
            if self.pos >= self.n:
                break
            op = self.peek_op()
            if op is not None and op in stop_ops:
                break
            rw = self.peek_reserved()
            if rw is not None and rw in stop_words:
                break
            items.append(self.parse_and_or())
            self.skip_blanks_comments()
            op = self.peek_op()
            if op == "&":
                self.check_background()
            if op == ";" or op == "&":
                self.pos += 1
                continue
            if op == "\n" or self.pos >= self.n:
                continue
            if op is not None and op in stop_ops:
                break
            rw = self.peek_reserved()
            if rw is not None and rw in stop_words:
                break
            self.fail(f"unexpected {self.describe_next()}")
        self.leave()
        return _List(items)

    def parse_and_or(self) -> _Node:
        items: list[_Node] = [self.parse_pipeline()]
        while True:
            self.skip_blanks_comments()
            op = self.peek_op()
            if op != "&&" and op != "||":
                break
            self.pos += 2
            self.skip_space()
            items.append(self.parse_pipeline())
        return items[0] if len(items) == 1 else _List(items)

    def parse_pipeline(self) -> _Node:
        timed: tuple[str, ...] | None = None
        while True:
            self.skip_blanks()
            rw = self.peek_reserved()
            if rw == "!":
                self.pos += 1
                continue
            if rw == "time" and timed is None:
                self.pos += 4
                self.skip_blanks()
                opts: list[str] = []
                if _TIME_P_RE.match(self.src, self.pos):
                    opts.append("-p")
                    self.pos += 2
                    self.skip_blanks()
                if _DASHDASH_RE.match(self.src, self.pos):
                    self.pos += 2
                    self.skip_blanks()
                elif self.pos < self.n and self.src[self.pos] == "-":
                    self.fail("'time' with options other than -p (dash and bash disagree on them)")
                timed = tuple(opts)
                continue
            break
        cmds: list[_Node] = [self.parse_command()]
        while True:
            self.skip_blanks_comments()
            op = self.peek_op()
            if op != "|" and op != "|&":
                break
            self.pos += len(op)
            self.skip_space()
            cmds.append(self.parse_command())
        if timed is None and len(cmds) == 1:
            return cmds[0]
        return _Pipeline(cmds, timed)

    def parse_command(self) -> _Node:
        self.skip_blanks()
        if self.src.startswith("((", self.pos):
            self.pos += 2
            self.check_arith(self.scan_arith("))"))
            return _Compound("arith", redirs=self.parse_trailing_redirects())
        op = self.peek_op()
        if op == "(":
            self.pos += 1
            body = self.parse_list(_NO_WORDS, frozenset({")"}))
            self.expect_op(")")
            return _Compound("subshell", [body], redirs=self.parse_trailing_redirects())
        rw = self.peek_reserved()
        if rw is not None:
            if rw == "{":
                self.pos += 1
                body = self.parse_list(frozenset({"}"}), _NO_WORDS)
                self.expect_reserved("}")
                return _Compound("group", [body], redirs=self.parse_trailing_redirects())
            if rw == "if":
                return self.parse_if()
            if rw == "while" or rw == "until":
                self.pos += len(rw)
                cond = self.parse_list(frozenset({"do"}), _NO_WORDS)
                self.expect_reserved("do")
                body = self.parse_list(frozenset({"done"}), _NO_WORDS)
                self.expect_reserved("done")
                return _Compound(rw, [cond, body], redirs=self.parse_trailing_redirects())
            if rw == "for" or rw == "select":
                return self.parse_for(rw)
            if rw == "case":
                return self.parse_case()
            if rw == "[[":
                return self.parse_cond()
            if rw == "function":
                self.pos += len(rw)
                self.skip_blanks()
                name = self.read_word()
                bare = name.bare()
                if bare is None or not _FUNC_NAME_RE.fullmatch(bare):
                    self.fail("bad function name")
                self.skip_blanks()
                if self.src.startswith("(", self.pos) and not self.src.startswith("((", self.pos):
                    self.pos += 1
                    self.expect_op(")")
                return self.parse_function_body(bare)
            if rw == "coproc":
                return self.parse_coproc()
            if rw in _UNEXPECTED_RESERVED:
                self.fail(f"unexpected '{rw}'")
            if rw == "!":
                self.fail("'!' is only allowed at the start of a pipeline")
            # `time` after a pipe is the program /usr/bin/time, not the keyword
        return self.parse_simple()

    def parse_if(self) -> _Compound:
        self.pos += 2
        bodies: list[_Node] = [self.parse_list(frozenset({"then"}), _NO_WORDS)]
        self.expect_reserved("then")
        bodies.append(self.parse_list(frozenset({"elif", "else", "fi"}), _NO_WORDS))
        while True:
            self.skip_space()
            rw = self.peek_reserved()
            if rw == "elif":
                self.pos += 4
                bodies.append(self.parse_list(frozenset({"then"}), _NO_WORDS))
                self.expect_reserved("then")
                bodies.append(self.parse_list(frozenset({"elif", "else", "fi"}), _NO_WORDS))
                continue
            if rw == "else":
                self.pos += 4
                bodies.append(self.parse_list(frozenset({"fi"}), _NO_WORDS))
            self.expect_reserved("fi")
            break
        return _Compound("if", bodies, redirs=self.parse_trailing_redirects())

    def parse_for(self, keyword: str) -> _Compound:
        self.pos += len(keyword)
        self.skip_blanks()
        if keyword == "for" and self.src.startswith("((", self.pos):
            self.pos += 2
            self.check_arith(self.scan_arith("))"), for_loop=True)
            self.skip_blanks()
            if self.peek_op() == ";":
                self.pos += 1
            self.expect_reserved("do")
            body = self.parse_list(frozenset({"done"}), _NO_WORDS)
            self.expect_reserved("done")
            return _Compound("for_arith", [body], redirs=self.parse_trailing_redirects())
        var = self.read_word().bare()
        if var is None or not _NAME_RE.fullmatch(var):
            self.fail(f"'{keyword}' needs a variable name")
        words: list[_Word] = []
        has_in = False
        self.skip_space()
        if self.peek_reserved() == "in":
            has_in = True
            self.pos += 2
            while True:
                self.skip_blanks()
                if self.skip_comment(command_start=False):
                    break
                op = self.peek_op()
                if op == ";" or op == "\n":
                    break
                if op is not None or self.pos >= self.n:
                    self.fail(f"unexpected {self.describe_next()} in '{keyword}' word list")
                words.append(self.read_word())
            if self.peek_op() == ";":
                self.pos += 1
        elif self.peek_op() == ";":
            self.pos += 1
        self.expect_reserved("do")
        body = self.parse_list(frozenset({"done"}), _NO_WORDS)
        self.expect_reserved("done")
        node = _Compound(keyword, [body], words, self.parse_trailing_redirects(), name=var)
        if not has_in:
            node.kind = keyword + "_positional"
        return node

    def parse_case(self) -> _Compound:
        self.pos += 4
        self.skip_blanks()
        words = [self.read_word()]
        self.expect_reserved("in")
        bodies: list[_Node] = []
        terminators = frozenset({";;", ";&", ";;&"})
        while True:
            self.skip_space()
            if self.peek_reserved() == "esac":
                self.pos += 4
                break
            if self.pos >= self.n:
                self.fail("'case' without 'esac'")
            if self.peek_op() == "(":
                self.pos += 1
            while True:
                self.skip_blanks()
                if self.pos >= self.n or self.peek_op() is not None:
                    self.fail(f"expected a case pattern but found {self.describe_next()}")
                words.append(self.read_word())
                self.skip_blanks()
                op = self.peek_op()
                if op == "|":
                    self.pos += 1
                    continue
                if op == ")":
                    self.pos += 1
                    break
                self.fail(f"expected ')' after a case pattern but found {self.describe_next()}")
            bodies.append(self.parse_list(frozenset({"esac"}), terminators))
            self.skip_blanks_comments()
            op = self.peek_op()
            if op is not None and op in terminators:
                self.pos += len(op)
        return _Compound("case", bodies, words, self.parse_trailing_redirects())

    def parse_cond(self) -> _Compound:
        """``[[ ... ]]``: operands may hold substitutions; arithmetic operators evaluate operands."""
        self.pos += 2
        tokens: list[str | _Word] = []
        while True:
            self.skip_blanks()
            if self.pos < self.n and self.src[self.pos] == "\n":
                self.consume_newline()
                continue
            if self.pos >= self.n:
                self.fail("'[[' without ']]'")
            if self.peek_reserved() == "]]":
                self.pos += 2
                break
            s, p = self.src, self.pos
            if s.startswith("&&", p) or s.startswith("||", p):
                tokens.append(s[p : p + 2])
                self.pos += 2
                continue
            c = s[p]
            if c in "()" or (c in "<>" and not s.startswith("(", p + 1)):
                tokens.append(c)
                self.pos += 1
                continue
            if c in ";&|\n":
                self.fail(f"unexpected {self.describe_next()} inside '[[ ]]'")
            regex = bool(tokens) and isinstance(tokens[-1], _Word) and tokens[-1].bare() == "=~"
            tokens.append(self.read_word(regex=regex))
        words = [t for t in tokens if isinstance(t, _Word)]
        for i, tok in enumerate(tokens):
            if not isinstance(tok, _Word):
                continue
            op = tok.bare()
            if op in ("-eq", "-ne", "-lt", "-le", "-gt", "-ge"):
                for j in (i - 1, i + 1):
                    if 0 <= j < len(tokens) and isinstance(tokens[j], _Word):
                        operand = tokens[j]
                        assert isinstance(operand, _Word)
                        self.ctx.arith_word(operand, "[[ ]]")
            elif op == "-v" and i + 1 < len(tokens) and isinstance(tokens[i + 1], _Word):
                target = tokens[i + 1]
                assert isinstance(target, _Word)
                self.ctx.variable_name(target.text if target.literal else None, "[[ -v ]]", assign=False)
        return _Compound("cond", words=words, redirs=self.parse_trailing_redirects())

    def parse_function_body(self, name: str) -> _Compound:
        self.skip_space()
        rw = self.peek_reserved()
        if not (rw in _COMPOUND_START or self.peek_op() == "(" or self.src.startswith("((", self.pos)):
            self.fail(f"function '{name}' needs a compound command as its body")
        body = self.parse_command()
        return _Compound("function", [body], name=name)

    def check_background(self) -> None:
        """``&`` or ``coproc`` here: in a line shell, only at the top of the line (see _BACKGROUND_READER)."""
        if self.ctx.line and not (self.top and self.nest == 1):
            self.fail(_BACKGROUND_READER)

    def parse_coproc(self) -> _Compound:
        self.check_background()
        self.pos += 6
        self.skip_blanks()
        if self.at_compound_start():
            return _Compound("coproc", [self.parse_command()])
        save = self.pos
        word = self.read_word()
        self.skip_blanks()
        if word.bare() is not None and self.at_compound_start():
            if not _NAME_RE.fullmatch(word.bare() or ""):
                self.fail("bad coprocess name")
            return _Compound("coproc", [self.parse_command()], name=word.bare())
        self.pos = save
        return _Compound("coproc", [self.parse_simple()])

    def at_compound_start(self) -> bool:
        rw = self.peek_reserved()
        return rw in _COMPOUND_START or self.peek_op() == "("

    def parse_trailing_redirects(self) -> list[_Redir]:
        redirs: list[_Redir] = []
        while True:
            self.skip_blanks()
            r = self.try_redirect()
            if r is None:
                return redirs
            redirs.append(r)

    def parse_simple(self) -> _Node:
        assigns: list[_Word] = []
        words: list[_Word] = []
        redirs: list[_Redir] = []
        start = self.pos
        while True:
            self.skip_blanks()
            if self.pos >= self.n:
                break
            if self.src[self.pos] == "#":
                self.skip_comment(command_start=not (words or assigns or redirs))
                break
            r = self.try_redirect()
            if r is not None:
                redirs.append(r)
                continue
            if self.peek_op() is not None:
                break
            word_start = self.pos
            word = self.read_word()
            if (
                self.src.startswith("{", word_start)
                and self.src.startswith("}", self.pos - 1)
                and self.src[self.pos : self.pos + 1] in ("<", ">")
            ):
                self.fail("a {name}> descriptor variable must be a plain name (subscripts run commands)")
            if not words and _assignment_name(word) is not None:
                assigns.append(word)
                continue
            words.append(word)
            if len(words) == 1 and not assigns and not redirs:
                save = self.pos
                self.skip_blanks()
                if self.src.startswith("(", self.pos) and not self.src.startswith("((", self.pos):
                    self.pos += 1
                    self.skip_blanks()
                    if self.src.startswith(")", self.pos):
                        self.pos += 1
                        bare = word.bare()
                        if bare is None or not _FUNC_NAME_RE.fullmatch(bare):
                            self.fail("bad function name")
                        return self.parse_function_body(bare)
                    self.fail("unexpected '(' after a command name")
                self.pos = save
        if not (assigns or words or redirs):
            self.pos = start
            self.fail(f"unexpected {self.describe_next()}")
        return _Simple(assigns, words, redirs)

    def try_redirect(self) -> _Redir | None:
        s = self.src
        save = self.pos
        prefix = ""
        m = _IONUM_RE.match(s, self.pos)
        if m:
            prefix = m.group()
            self.pos = m.end()
        op = self.peek_op()
        if op is None or op not in _REDIR_OPS:
            self.pos = save
            return None
        self.pos += len(op)
        self.skip_blanks()
        if self.pos >= self.n or (s[self.pos] in _META and self.peek_op() is not None):
            self.fail(f"'{op}' needs a target")
        word = self.read_word()
        if op in ("<<", "<<-"):
            if not word.literal:
                self.fail("here-document delimiters must be literal")
            redir = _Redir(prefix, op, word, delim=word.text, quoted=any(g.quoted for g in word.segs))
            redir.strip_tabs = op == "<<-"
            if "\n" in redir.delim:
                self.fail("here-document delimiter contains a newline")
            self.pending.append(redir)
            return redir
        return _Redir(prefix, op, word)

    def read_heredoc_bodies(self) -> None:
        pending, self.pending = self.pending, []
        s = self.src
        for redir in pending:
            lines: list[str] = []
            # bash joins backslash-newline in unquoted bodies before looking for the delimiter, dash
            # compares physical lines: where they disagree the end of the body is ambiguous.
            logical = ""
            joined_end = -1 if not redir.quoted else None
            while True:
                if self.pos >= self.n:
                    self.fail(f"here-document delimited by '{redir.delim}' is not terminated")
                end = s.find("\n", self.pos)
                line = s[self.pos : self.n if end < 0 else end]
                self.pos = self.n if end < 0 else end + 1
                if redir.strip_tabs:
                    line = line.lstrip("\t")
                if joined_end == -1:
                    if (len(line) - len(line.rstrip("\\"))) % 2 == 1 and end >= 0:
                        logical += line[:-1]
                    else:
                        logical += line
                        if logical == redir.delim:
                            joined_end = self.pos
                        logical = ""
                if line == redir.delim:
                    break
                lines.append(line + "\n")
            if joined_end is not None and joined_end != self.pos:
                self.fail(
                    f"a line continuation makes the end of the here-document '{redir.delim}' ambiguous "
                    "(bash and dash disagree); quote the delimiter"
                )
            redir.body = "".join(lines)
            if not redir.quoted:
                redir.body_word = self.parse_heredoc_text(redir.body)

    def parse_heredoc_text(self, text: str) -> _Word:
        """An unquoted here-document undergoes parameter expansion and command substitution."""
        sub = _Parser(text, self.ctx, interactive=False, nest=self.nest + 1)
        w = _Word()
        while sub.pos < sub.n:
            c = text[sub.pos]
            if c == "\\":
                d = text[sub.pos + 1] if sub.pos + 1 < sub.n else ""
                if d == "\n":
                    sub.pos += 2
                elif d in ("$", "`", "\\"):
                    w.lit(d, True)
                    sub.pos += 2
                else:
                    w.lit("\\", True)
                    sub.pos += 1
            elif c == "$":
                sub.read_dollar(w, quoted=True)
            elif c == "`":
                sub.read_backtick(w, quoted=True)
            else:
                w.lit(c, True)
                sub.pos += 1
        if sub.pending:
            sub.fail("here-document inside a here-document body")
        return w.done()

    # -- words --------------------------------------------------------------------------------------

    def read_word(self, *, regex: bool = False) -> _Word:
        w = _Word()
        s, n = self.src, self.n
        start = self.pos
        depth = 0
        continued = False
        while self.pos < n:
            c = s[self.pos]
            if (c == "<" or c == ">") and self.pos + 1 < n and s[self.pos + 1] == "(" and not regex:
                self.read_procsub(w)
                continue
            if regex:
                if c == "(":
                    depth += 1
                elif c == ")":
                    if depth == 0:
                        break
                    depth -= 1
                elif c == "|" or (depth > 0 and c in " \t<>&;"):
                    w.lit(c, False)
                    self.pos += 1
                    continue
            if c in _META and not (regex and c in "()"):
                break
            if not regex:
                m = _PLAIN_RUN_RE.match(s, self.pos)
                if m:
                    w.lit(m.group(), False)
                    self.pos = m.end()
                    continue
            if c == "\\":
                if self.pos + 1 >= n:
                    if self.top and self.ctx.line:  # the newline sent after the line follows it
                        self.fail("the line ends with a line continuation")
                    w.lit("\\", False)
                    self.pos += 1
                elif s[self.pos + 1] == "\n":
                    self.pos += 2
                    continued = True
                    self.continuation_at_end()
                else:
                    w.lit(s[self.pos + 1], True)
                    self.pos += 2
            elif c == "'":
                end = s.find("'", self.pos + 1)
                if end < 0:
                    self.fail("unterminated single quote")
                w.lit(s[self.pos + 1 : end], True)
                self.pos = end + 1
            elif c == '"':
                self.read_dquote(w)
            elif c == "$":
                self.read_dollar(w, quoted=False)
            elif c == "`":
                self.read_backtick(w, quoted=False)
            else:
                if c == "!" and self.interactive:
                    self.history_check(False)
                w.lit(c, False)
                self.pos += 1
        if self.pos == start:
            self.fail(f"expected a word but found {self.describe_next()}")
        w.done()
        if continued and _RESERVED_RE.fullmatch(w.bare() or ""):
            self.fail("a reserved word split by a line continuation is ambiguous")
        return w

    def read_dquote(self, w: _Word) -> None:
        s, n = self.src, self.n
        self.pos += 1
        w.lit("", True)
        while True:
            if self.pos >= n:
                self.fail("unterminated double quote")
            m = _DQUOTE_RUN_RE.match(s, self.pos)
            if m:
                w.lit(m.group(), True)
                self.pos = m.end()
                continue
            c = s[self.pos]
            if c == '"':
                self.pos += 1
                return
            if c == "\\":
                d = s[self.pos + 1] if self.pos + 1 < n else ""
                if d == "\n":
                    self.pos += 2
                elif d in ("$", "`", '"', "\\"):
                    w.lit(d, True)
                    self.pos += 2
                else:
                    w.lit("\\", True)
                    self.pos += 1
            elif c == "$":
                self.read_dollar(w, quoted=True)
            elif c == "`":
                self.read_backtick(w, quoted=True)
            else:
                if c == "!" and self.interactive:
                    self.history_check(True)
                w.lit(c, True)
                self.pos += 1

    def read_procsub(self, w: _Word) -> None:
        start = self.pos
        pipe_in = self.src[start] == ">"
        self.pos += 2
        self.enter()
        body = self.parse_list(_NO_WORDS, frozenset({")"}))
        self.expect_op(")")
        self.leave()
        w.add(_Seg(self.src[start : self.pos], False, _PROC))
        w.subs.append(("process_substitution", body, pipe_in))

    def read_dollar(self, w: _Word, *, quoted: bool) -> None:
        s, p = self.src, self.pos
        nxt = s[p + 1] if p + 1 < self.n else ""
        if nxt == "\\" and s.startswith("\n", p + 2):
            self.fail("a line continuation after '$' is ambiguous (bash still expands what follows)")
        if nxt == "'" and not quoted:
            self.read_ansi_c(w)
            return
        if nxt == '"' and not quoted:
            self.fail('$"..." locale-translated strings are not supported')
        if nxt == "(":
            if s.startswith("((", p + 1):
                self.pos = p + 3
                self.check_arith(self.scan_arith("))"))
                w.add(_Seg(s[p : self.pos], quoted, _ARITH, int_safe=True))
                return
            self.pos = p + 2
            self.enter()
            pending = len(self.pending)
            body = self.parse_list(_NO_WORDS, frozenset({")"}))
            self.expect_op(")")
            if len(self.pending) > pending:
                # bash reads the body after the line that closes $(...); dash runs those lines as commands
                self.fail(
                    "a here-document opened inside $(...) with its body after it is read differently by bash and dash"
                )
            self.leave()
            w.add(_Seg(s[p : self.pos], quoted, _SUB))
            w.subs.append(("command_substitution", body, False))
            return
        if nxt == "[":
            self.pos = p + 2
            self.check_arith(self.scan_arith("]"))
            w.add(_Seg(s[p : self.pos], quoted, _ARITH, int_safe=True))
            return
        if nxt == "{":
            self.read_braced_param(w, quoted)
            return
        m = _NAME_RE.match(s, p + 1)
        if m:
            self.pos = m.end()
            w.add(_Seg(s[p : self.pos], quoted, _PARAM, name=m.group()))
            return
        if nxt and (nxt in "@*#?-$!" or (nxt.isdigit() and nxt.isascii())):
            self.pos = p + 2
            w.add(_Seg(s[p : self.pos], quoted, _PARAM, name=nxt, int_safe=nxt in "#?$!"))
            return
        if nxt and nxt in "~=^+" and not quoted:
            self.fail(f"'${nxt}' is a zsh expansion; not supported")
        w.lit("$", quoted)
        self.pos = p + 1

    def read_braced_param(self, w: _Word, quoted: bool) -> None:
        s, n = self.src, self.n
        start = self.pos
        p = start + 2
        self.enter()
        length = False
        if p < n and s[p] == "#" and p + 1 < n and s[p + 1] != "}":
            length = True
            p += 1
        elif p < n and s[p] == "!" and p + 1 < n and s[p + 1] != "}":
            self.pos = p
            self.fail("indirect expansion ${!...} is not supported")
        m = _PARAM_NAME_RE.match(s, p)
        if not m:
            self.pos = p
            self.fail("bad ${...} substitution")
        name = m.group()
        p = m.end()
        if p < n and s[p] == "[":
            close = s.find("]", p)
            if close < 0:
                self.pos = p
                self.fail("unterminated array subscript")
            sub = s[p + 1 : close]
            if sub not in ("@", "*") and not (sub.isdigit() and sub.isascii()):
                self.pos = p
                self.fail("array subscripts other than [@], [*] or a number are not supported")
            p = close + 1
        if p >= n:
            self.pos = p
            self.fail("unterminated ${")
        if s[p] == "}":
            self.pos = p + 1
            plain = None if length else name
            w.add(_Seg(s[start : self.pos], quoted, _PARAM, name=plain, int_safe=length or name in "#?$!"))
            self.leave()
            return
        if length:
            self.pos = p
            self.fail("bad ${#...} substitution")
        op = next((o for o in _PARAM_OPS + _PARAM_OPS2 if s.startswith(o, p)), None)
        if op is None:
            self.pos = p
            self.fail("bad ${...} substitution")
        p += len(op)
        self.pos = p
        if op == "@":
            if p + 1 < n and s[p] in "QEAKaUuLk" and s[p + 1] == "}":
                self.pos = p + 2
                w.add(_Seg(s[start : self.pos], quoted, _PARAM))
                self.leave()
                return
            self.fail("${...@P} and unknown ${...@} transformations are not supported")
        if op == ":":
            depth = 0
            q = p
            while True:
                if q >= n:
                    self.fail("unterminated ${")
                c = s[q]
                if c == "{":
                    depth += 1
                elif c == "}":
                    if depth == 0:
                        break
                    depth -= 1
                elif c not in _ARITH_CHARS:
                    self.pos = q
                    self.fail(f"unsupported character {c!r} in a ${{...:offset:length}} expansion")
                q += 1
            for part in s[p:q].split(":", 1):
                self.check_arith(part)
            self.pos = q + 1
            w.add(_Seg(s[start : self.pos], quoted, _PARAM))
            self.leave()
            return
        if op in ("=", ":="):
            self.ctx.variable_name(name, "${...=...}", assign=True)
        inner = _Word()
        self.read_param_word(inner, quoted)
        self.pos += 1  # the closing brace
        w.subs.extend(inner.subs)
        w.add(_Seg(s[start : self.pos], quoted, _PARAM))
        self.leave()

    def read_param_word(self, w: _Word, quoted: bool) -> None:
        """Read the word of ``${x:-word}`` up to (not including) the matching ``}``."""
        s, n = self.src, self.n
        while True:
            if self.pos >= n:
                self.fail("unterminated ${")
            c = s[self.pos]
            if c == "}":
                return
            if c == "\\":
                if self.pos + 1 >= n:
                    self.fail("unterminated ${")
                self.pos += 2
            elif c == "'":
                if quoted:
                    self.fail("single quotes inside a double-quoted ${...} are ambiguous")
                end = s.find("'", self.pos + 1)
                if end < 0:
                    self.fail("unterminated single quote")
                self.pos = end + 1
            elif c == '"':
                self.read_dquote(w)
            elif c == "$":
                self.read_dollar(w, quoted=quoted)
            elif c == "`":
                self.read_backtick(w, quoted=quoted)
            else:
                self.pos += 1

    def read_ansi_c(self, w: _Word) -> None:
        s, n = self.src, self.n
        p = self.pos + 2
        out = bytearray()
        while True:
            if p >= n:
                self.fail("unterminated $'...' string")
            c = s[p]
            if c == "'":
                p += 1
                break
            if c != "\\":
                out += c.encode("utf-8", "surrogatepass")
                p += 1
                continue
            if p + 1 >= n:
                self.fail("unterminated $'...' string")
            d = s[p + 1]
            p += 2
            value: int | None = None
            if d == "'":
                # bash reads \' as a quote inside $'...'; dash and other POSIX shells have no $'...' and end
                # the quoted text right there, so the rest of the line (or the next lines) would be commands
                # to them and text to this analysis.
                self.fail(
                    "\\' inside $'...' is read differently by bash (a quote) and by dash or POSIX sh (the end of the "
                    "string); write the quote as \\x27 or outside the $'...'"
                )
            if d in _ANSI_SIMPLE:
                out += _ANSI_SIMPLE[d].encode()
                continue
            if d in "01234567":
                m = _OCT_RE.match(s, p)
                assert m is not None
                value = int(d + m.group(), 8)
                p = m.end()
                if value > 0xFF:
                    self.fail("octal escape out of range in $'...'")
            elif d in _HEX_RES:
                m = _HEX_RES[d].match(s, p)
                if m is None:
                    out += ("\\" + d).encode()
                    continue
                value = int(m.group(), 16)
                p = m.end()
                if d != "x":
                    if value == 0 or value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                        self.fail("invalid \\u escape in $'...'")
                    out += chr(value).encode()
                    continue
            elif d == "c":
                if p >= n or not s[p].isascii():
                    self.fail("invalid \\c escape in $'...'")
                if s[p] in "'\\":
                    # bash finds the end of $'...' pairing backslashes before it decodes: \c' is \c and the
                    # end of the string, and dash has no $'...' at all; reading ' as \c's argument would
                    # take what follows for quoted text where both shells run it.
                    self.fail("\\c followed by a quote or a backslash in $'...' is read differently by the shells")
                value = 0x7F if s[p] == "?" else ord(s[p]) & 0x1F
                p += 1
            else:
                out += ("\\" + d).encode("utf-8", "surrogatepass")
                continue
            if value == 0:
                self.fail("NUL escape in $'...' (it would truncate the word)")
            out.append(value)
        self.pos = p
        w.lit(out.decode("utf-8", "surrogateescape"), True)

    def read_backtick(self, w: _Word, *, quoted: bool) -> None:
        s, n = self.src, self.n
        start = self.pos
        p = start + 1
        buf: list[str] = []
        while True:
            if p >= n:
                self.pos = start
                self.fail("unterminated backquote")
            c = s[p]
            if c == "`":
                p += 1
                break
            if c == "\\" and p + 1 < n:
                d = s[p + 1]
                if d in "$`\\" or (quoted and d == '"'):
                    buf.append(d)
                else:
                    buf.append(c + d)
                p += 2
                continue
            buf.append(c)
            p += 1
        self.pos = p
        if self.nest + 1 > MAX_NESTING:
            self.fail("the command is nested too deeply")
        inner = _Parser("".join(buf), self.ctx, interactive=self.interactive, nest=self.nest + 1)
        body = inner.parse_program()
        w.add(_Seg(s[start:p], quoted, _SUB))
        w.subs.append(("command_substitution", body, False))

    # -- arithmetic ---------------------------------------------------------------------------------

    def scan_arith(self, closer: str) -> str:
        s, n = self.src, self.n
        start = self.pos
        depth = 0
        while True:
            if self.pos >= n:
                self.fail("unterminated arithmetic expression")
            c = s[self.pos]
            if closer == "]":
                if c == "]":
                    self.pos += 1
                    return s[start : self.pos - 1]
            elif c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    if s.startswith("))", self.pos):
                        self.pos += 2
                        return s[start : self.pos - 2]
                    self.fail("unsupported arithmetic expression (write '$( (...) )' for a subshell)")
                depth -= 1
            if c not in _ARITH_CHARS:
                self.fail(f"unsupported character {c!r} in an arithmetic expression")
            self.pos += 1

    def check_arith(self, text: str, *, for_loop: bool = False) -> None:
        try:
            self.ctx.check_arith(text, for_loop=for_loop)
        except ShellParseError as exc:
            self.fail(str(exc))


def _assignment_name(word: _Word) -> str | None:
    """Name assigned by an assignment word (``NAME=`` / ``NAME+=`` unquoted at its start)."""
    if not word.segs or word.segs[0].kind != _LIT or word.segs[0].quoted:
        return None
    first = word.segs[0].text
    m = _NAME_RE.match(first)
    if not m:
        return None
    rest = first[m.end() :]
    if rest.startswith("=") or rest.startswith("+="):
        return m.group()
    if rest.startswith("["):
        if "=" in word.text:
            raise ShellParseError(f"array element assignment '{word.text}' is not supported")
        if "]" not in rest:
            # bash reads NAME[ up to its matching ] across blanks, quotes and '#' before it decides what
            # the word is: "x[ ' ]=$(evil) ' ]=1" is one assignment to bash and the program "x[" here.
            raise ShellParseError(f"'{word.text}' would be read by bash up to a ']' further on; quote the '['")
    return None


def _split_assignment(word: _Word) -> tuple[str, list[_Seg]] | None:
    """Split ``NAME=value`` (the ``=`` inside leading literal text) into the name and value segments."""
    prefix: list[str] = []
    for index, seg in enumerate(word.segs):
        if seg.kind != _LIT:
            return None
        eq = seg.text.find("=")
        if eq >= 0:
            prefix.append(seg.text[:eq])
            value = [_Seg(seg.text[eq + 1 :], seg.quoted), *word.segs[index + 1 :]]
            return "".join(prefix), value
        prefix.append(seg.text)
    return None


def _word_of(segs: list[_Seg]) -> _Word:
    word = _Word()
    for seg in segs:
        word.add(seg)
    return word


def _int_safe_value(value: list[_Seg]) -> bool:
    """True when an assigned value is certainly an integer (so arithmetic on it cannot run code)."""
    parts = [s for s in value if not (s.kind == _LIT and s.text == "")]
    if all(s.kind == _LIT for s in parts):
        return re.fullmatch(r"[-+]?[0-9]*", "".join(s.text for s in parts)) is not None
    return len(parts) == 1 and parts[0].int_safe


# --------------------------------------------------------------------------------------------------
# Analysis context
# --------------------------------------------------------------------------------------------------

# Assigning these changes which program runs, loads code into programs, or makes a program run a
# command named in the variable. Refused in every form of assignment.
_DANGEROUS_VARS = _words(
    "PATH BASH_ENV ENV PS0 PS1 PS2 PS3 PS4 PROMPT_COMMAND SHELLOPTS BASHOPTS EXECIGNORE"
    " BASH_LOADABLES_PATH BASH_XTRACEFD HOME XDG_CONFIG_HOME SHELL ZDOTDIR FPATH PYTHONPATH"
    " PYTHONHOME PYTHONSTARTUP PYTHONINSPECT PYTHONUSERBASE PERL5OPT PERL5LIB PERLLIB PERL5DB"
    " RUBYOPT RUBYLIB NODE_OPTIONS NODE_PATH PAGER MANPAGER MANOPT SYSTEMD_PAGER SYSTEMD_EDITOR"
    " EDITOR VISUAL SUDO_EDITOR SUDO_ASKPASS SSH_ASKPASS LESSOPEN LESSCLOSE LESSKEY BROWSER"
    " TAR_OPTIONS TAPE RSYNC_RSH RSYNC_CONNECT_PROG GCONV_PATH HOSTALIASES LOCPATH NLSPATH OPENSSL_CONF"
    " OPENSSL_ENGINES TERMINFO TERMINFO_DIRS MAIL MAILPATH MAILCHECK TMOUT INPUTRC FCEDIT HISTFILE histchars"
    " BASH_ALIASES BASH_CMDS APT_CONFIG WGETRC WGET_ASKPASS RIPGREP_CONFIG_PATH"
    " LIBVIRT_DEFAULT_URI VIRSH_DEFAULT_CONNECT_URI"
)
_DANGEROUS_PREFIXES = ("LD_", "DYLD_", "BASH_FUNC_", "GIT_", "PYTHON", "MALLOC_", "GLIBC_")
# Variables whose value the agent can choose (or that copy text of the command line); they may not
# be evaluated as arithmetic.
_AGENT_CONTROLLED = _words(
    "_ REPLY OPTARG MAPFILE BASH_REMATCH BASH_COMMAND BASH_EXECUTION_STRING BASH_ARGV BASH_ARGV0"
    " BASH_ARGC BASH_SOURCE FUNCNAME COPROC READLINE_LINE COMP_LINE COMP_WORDS COMPREPLY PWD"
    " OLDPWD DIRSTACK TERM LANG LANGUAGE DISPLAY TZ COLUMNS LINES"
)
# Bash's own arrays: declare gives them a value starting with "(" as a compound assignment (see _h_declare).
_BASH_ARRAYS = _words(
    "BASH_REMATCH BASH_ARGV BASH_ARGC BASH_SOURCE BASH_LINENO BASH_VERSINFO FUNCNAME GROUPS DIRSTACK PIPESTATUS"
    " COMP_WORDS COMPREPLY COPROC MAPFILE BASH_ALIASES BASH_CMDS"
)
_INTEGER_SPECIALS = frozenset(
    {"RANDOM", "SRANDOM", "SECONDS", "EPOCHSECONDS", "LINENO", "BASHPID", "PPID", "UID", "EUID", "OPTIND"}
)


# The locale's character set decides where bash sees quotes and backslashes. In GBK, GB18030, BIG5 or
# SJIS the last byte of a UTF-8 character and a following backslash are one character, so the line
# `echo 中\' 'x;rm -rf /;#'`, one echo here, runs rm there. These may only be C, POSIX or a locale with
# a UTF-8 codeset.
_LOCALE_VARS = frozenset({"LANG", "LC_ALL", "LC_CTYPE"})
_SAFE_LOCALE = re.compile(r"|C|POSIX|[A-Za-z0-9_]+\.(?i:utf-?8)(?:@[A-Za-z0-9]+)?")


# git's variables that only name who and when (git reads them as text and runs nothing with them): agents set
# them to sign their commits. Every other GIT_* can run a command or load a configuration (GIT_SSH_COMMAND,
# GIT_PAGER, GIT_CONFIG_*, GIT_DIR with its hooks).
_GIT_IDENTITY_VARS = frozenset(
    f"GIT_{who}_{what}" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL", "DATE")
)


def _dangerous_var(name: str) -> bool:
    if name in _GIT_IDENTITY_VARS:
        return False
    return name in _DANGEROUS_VARS or name.startswith(_DANGEROUS_PREFIXES)


# A line-inspected shell reads each line only when it is ready for a command: before its prompt, its
# PROMPT_COMMAND (`while read -t 0; do read -r; done`) discards what a program left unread on its input, and
# the prompt tells the gateway that the next line may come. Lines may not undo that: unset these
# variables (assigning them is refused everywhere), shadow or disable `read`, run a DEBUG trap before
# each of those commands (with extdebug it can skip them), turn job control off (background jobs would
# read the terminal beside the shell), or move the shell's own input elsewhere with `exec <`.
_LINE_SHELL_VARS = frozenset({"PS0", "PS1", "PS2", "PROMPT_COMMAND"})
# Only a job the interactive shell starts itself (`cmd &` at the top of a line) gets a process group of its
# own, which the terminal stops if it reads. A command started in the background inside a subshell, a
# function or a nested shell stays in the foreground group, can start reading there and keep reading
# after the line ends, racing bash for the next line: `(head -c 5 <&3 & sleep 1) 3<&0` took `echo ` of
# the next line, and bash ran the rest. So does a program that `setsid` starts in a session of its own.
_BACKGROUND_READER = (
    "in a line shell, '&' and coproc are only allowed at the top of the line (elsewhere the command could "
    "read the terminal beside the shell and take part of the next line)"
)
_LINE_SHELL_BUILTINS = frozenset({"read"})
_JOB_CONTROL_OFF = "turning job control off would let background jobs read the terminal beside the line shell"


def _moves_stdin(op: str) -> bool:
    """The redirection (``op`` with its descriptor prefix) replaces or closes descriptor 0."""
    return op.startswith("<") or (op[:1] == "0" and not op[1:2].isdigit())


class _Ctx:
    """State shared by every parser and walker of one analysis."""

    def __init__(self, *, interactive: bool) -> None:
        self.interactive = interactive
        self.line = False  # the text is a line sent with a newline after it (see analyse)
        self.stdin_lines_checked = False  # the caller checks each line of the channel (see stdin_shell)
        self.stdin_shell: str | None = None  # the shell that reads its commands from the channel
        self.out: list[Invocation] = []
        self.tainted: set[str] = set()
        self.taint_all = False
        self.arith_names: set[str] = set()
        self.assigned: dict[str, list[_Word | None]] = {}  # non-integer values given to each name
        self.int_vars: set[str] = set()  # declared -i: every assigned value is evaluated as arithmetic
        self.untainted: set[str] = set()  # expanded where options are parsed: must come from the target
        self.arrays: set[str] = set()  # made arrays (declare -a/-A, read -a, mapfile, coproc)

    def emit(self, inv: Invocation) -> None:
        if len(self.out) >= MAX_INVOCATIONS:
            raise ShellParseError(f"the command starts more than {MAX_INVOCATIONS} programs")
        self.out.append(inv)

    def check_arith(self, text: str, *, for_loop: bool = False) -> None:
        """Arithmetic may hold numbers, operators and variable names only (see the module docstring)."""
        pos = 0
        semicolons = 0
        while pos < len(text):
            m = _ARITH_TOKEN_RE.match(text, pos)
            if m is None:
                raise ShellParseError(f"unsupported arithmetic expression {text!r}")
            pos = m.end()
            if m.group("op") == ";":
                semicolons += 1
            name = m.group("name") or m.group("dname") or m.group("bname")
            if name:
                self.arith_names.add(name)
        if semicolons != (2 if for_loop else 0):
            raise ShellParseError(f"unsupported arithmetic expression {text!r}")

    def arith_word(self, word: _Word, what: str) -> None:
        """A word whose expanded value bash evaluates as an arithmetic expression."""
        parts: list[str] = []
        for seg in word.segs:
            if seg.kind == _LIT:
                parts.append(seg.text)
            elif seg.int_safe:
                parts.append("0")
            elif seg.kind == _PARAM and seg.name is not None and _NAME_RE.fullmatch(seg.name):
                parts.append(seg.name)
            else:
                raise ShellParseError(f"{what}: {word.text!r} is evaluated as arithmetic and its value cannot be known")
        self.check_arith(" ".join(parts))

    def variable_name(
        self, name: str | None, what: str, *, assign: bool, int_safe: bool = False, value: _Word | None = None
    ) -> None:
        """Check a variable name given to a builtin; when ``assign``, record what it receives.

        ``value`` is the assigned word when the text is in the command line (None: read at run time).
        """
        if name is None or not _NAME_RE.fullmatch(name):
            shown = "an expansion" if name is None else repr(name)
            raise ShellParseError(
                f"{what}: the variable name must be a literal identifier, not {shown} "
                "(bash evaluates subscripts in names, which can run commands)"
            )
        if assign:
            if _dangerous_var(name):
                raise ShellParseError(f"{what}: assigning {name} can change which program runs")
            if name in _LOCALE_VARS and (value is None or not value.literal or not _SAFE_LOCALE.fullmatch(value.text)):
                raise ShellParseError(
                    f"{what}: {name} may only be C, POSIX or a UTF-8 locale (in others, such as GBK or BIG5, "
                    "shells read quotes and backslashes in other places)"
                )
            if not int_safe:
                self.tainted.add(name)
                self.assigned.setdefault(name, []).append(value)

    def finish(self) -> None:
        for name in sorted(self.int_vars):
            for value in self.assigned.get(name, []):
                if value is None:
                    raise ShellParseError(
                        f"{name} is declared integer and receives a value only known at run time; bash "
                        "evaluates it as arithmetic"
                    )
                self.arith_word(value, f"assignment to integer variable {name}")
            self.tainted.discard(name)  # every value it receives is evaluated into an integer
        bad = sorted(
            name
            for name in self.arith_names
            if name not in _INTEGER_SPECIALS
            and (
                self.taint_all or name in self.tainted or name in _AGENT_CONTROLLED or name.startswith(("LC_", "SSH_"))
            )
        )
        if bad:
            raise ShellParseError(
                f"arithmetic uses {', '.join(bad)}, whose value comes from this command line, an earlier line "
                "of this shell or the client; an array subscript in it would run commands"
            )
        bad = sorted(n for n in self.untainted if self.taint_all or n in self.tainted)
        if bad:
            raise ShellParseError(
                f"${bad[0]} is set by this command line and expanded where options are read; it could "
                "inject an option such as -exec"
            )


@dataclass(frozen=True, slots=True)
class _Stdin:
    kind: str  # channel pipe null file text unknown
    text: str | None = None  # kind == "text": the literal program text, None when it has expansions


_CHANNEL = _Stdin("channel")
_PIPE = _Stdin("pipe")
_NULL = _Stdin("null")
_FILE = _Stdin("file")
_UNKNOWN = _Stdin("unknown")


@dataclass(frozen=True, slots=True)
class _Env:
    via: str | None
    stdin: _Stdin
    redirects: tuple[Redirect, ...]
    depth: int  # shells deep
    placeholders: tuple[str, ...] = ()  # find's {} / xargs -I: replaced by input at run time
    placeholder_splits: bool = False  # find -exec ... {} + : one placeholder becomes many words
    appended: bool = False  # xargs appends input words to the command
    transport: bool = False  # rsync -e / scp -S: the caller appends host and command
    wrappers: int = 0


def _analyse_text(text: str, env: _Env, ctx: _Ctx, *, interactive: bool = False) -> None:
    if env.depth > MAX_SHELL_DEPTH:
        raise ShellParseError(f"commands nested more than {MAX_SHELL_DEPTH} shells deep")
    node = _Parser(text, ctx, interactive=interactive, top=env.depth == 0).parse_program()
    _walk(node, env, ctx)


# --------------------------------------------------------------------------------------------------
# Walking the tree
# --------------------------------------------------------------------------------------------------


def _walk(node: _Node, env: _Env, ctx: _Ctx) -> None:
    if isinstance(node, _List):
        for item in node.items:
            _walk(item, env, ctx)
    elif isinstance(node, _Pipeline):
        first = env
        if node.timed is not None:
            ctx.emit(Invocation("time", "time", node.timed, " ".join(node.timed), env.redirects, env.via))
            first = replace(env, via="time")
        for index, cmd in enumerate(node.cmds):
            _walk(cmd, first if index == 0 else replace(env, via="pipeline", stdin=_PIPE), ctx)
    elif isinstance(node, _Simple):
        _walk_simple(node, env, ctx)
    else:
        _walk_compound(node, env, ctx)


def _walk_subs(word: _Word, env: _Env, ctx: _Ctx) -> None:
    for via, body, pipe_in in word.subs:
        _walk(body, replace(env, via=via, redirects=(), stdin=_PIPE if pipe_in else env.stdin), ctx)


def _walk_simple(node: _Simple, env: _Env, ctx: _Ctx) -> None:
    for word in node.assigns:
        _walk_subs(word, env, ctx)
    for word in node.words:
        _walk_subs(word, env, ctx)
    own = _convert_redirects(node.redirs, env, ctx)
    stdin = _stdin_after(node.redirs, env.stdin)
    assigns: list[str] = []
    for word in node.assigns:
        split = _split_assignment(word)
        assert split is not None
        name, value = split
        ctx.variable_name(
            name.removesuffix("+"),
            "assignment",
            assign=True,
            int_safe=_int_safe_value(value),
            value=_word_of(value),
        )
        assigns.append(word.text)
    redirects = env.redirects + own
    if not node.words:
        if own:  # `> file` alone truncates a file: the rules must see it
            ctx.emit(Invocation("", "", (), "", redirects, env.via, tuple(assigns)))
        return
    _run([_Arg.of(w) for w in node.words], env, ctx, stdin, redirects, tuple(assigns))


def _walk_compound(node: _Compound, env: _Env, ctx: _Ctx) -> None:
    for word in node.words:
        _walk_subs(word, env, ctx)
    own = _convert_redirects(node.redirs, env, ctx)
    body_env = replace(env, redirects=env.redirects + own, stdin=_stdin_after(node.redirs, env.stdin))
    kind = node.kind
    if kind == "subshell":
        body_env = replace(body_env, via="subshell")
    elif kind == "coproc":
        body_env = replace(body_env, via="coproc", stdin=_PIPE)  # the shell writes to it
        ctx.arrays.add(node.name or "COPROC")
    elif kind == "function":
        if ctx.line and node.name in _LINE_SHELL_BUILTINS:
            raise ShellParseError(
                f"a function named {node.name} would replace the builtin that the line shell's prompt relies on"
            )
        # The body runs wherever the function is called, perhaps at the end of a pipe.
        body_env = replace(body_env, via="function", stdin=_UNKNOWN)
    elif kind in ("for", "select", "for_positional", "select_positional"):
        numbers = kind == "for" and all(w.literal and re.fullmatch(r"-?[0-9]+", w.text) for w in node.words)
        ctx.variable_name(node.name, kind.split("_")[0], assign=True, int_safe=numbers)
    for body in node.bodies:
        _walk(body, body_env, ctx)


_WRITE_OPS = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})


def _convert_redirects(redirs: list[_Redir], env: _Env, ctx: _Ctx) -> tuple[Redirect, ...]:
    out: list[Redirect] = []
    for r in redirs:
        op = r.prefix + r.op
        if r.op in ("<<", "<<-"):
            if r.body_word is not None:
                _walk_subs(r.body_word, env, ctx)
            out.append(Redirect(op, r.delim, False, r.body))
            continue
        assert r.target is not None
        _walk_subs(r.target, env, ctx)
        target = r.target.text
        if r.op == "<<<":
            out.append(Redirect(op, target, False, target))
        elif r.op == ">&":
            dup = r.target.literal and (target == "-" or (target.isdigit() and target.isascii()))
            out.append(Redirect(op, target, not dup))
        else:
            out.append(Redirect(op, target, r.op in _WRITE_OPS))
    return tuple(out)


_STDIN_PATH_RE = re.compile(r"(?:^|/)dev/(?:stdin|tty|console|fd(?:/|$)|pts/|tcp/|udp/)|(?:^|/)proc/[^/]+/fd(?:/|$)")


def _is_stdin_path(path: str) -> bool:
    """Paths that read the session, a descriptor or the network rather than a file."""
    norm = posixpath.normpath(path) if path else path
    return bool(_STDIN_PATH_RE.search(norm)) or path == "-"


def _may_read_session(call: "_Call", script: "_Arg") -> bool:
    """A program file that is, or may be at run time, the session's input: ``/dev/stdin`` and its
    kin, and any path not known exactly now (``/dev/stdi?``, ``/proc/$$/fd/0``, ``$f``)."""
    return not call.known(script) or script.glob or script.brace or _is_stdin_path(script.text)


def _stdin_after(redirs: list[_Redir], stdin: _Stdin) -> _Stdin:
    for r in redirs:
        if r.prefix.startswith("{") or r.op in ("&>", "&>>"):
            continue
        fd = int(r.prefix) if r.prefix else (0 if r.op.startswith("<") else 1)
        if fd != 0:
            continue
        if r.op in ("<<", "<<-"):
            if r.quoted:
                stdin = _Stdin("text", r.body)
            else:
                bw = r.body_word
                stdin = _Stdin("text", bw.text if bw is not None and bw.literal else None)
            continue
        assert r.target is not None
        if r.op == "<<<":
            stdin = _Stdin("text", r.target.text + "\n" if r.target.literal else None)
        elif r.op in ("<&", ">&"):
            stdin = _NULL if r.target.literal and r.target.text == "-" else _UNKNOWN
        elif not r.target.literal or _is_stdin_path(r.target.text):
            stdin = _UNKNOWN
        else:
            stdin = _FILE
    return stdin


@dataclass(frozen=True, slots=True)
class _Arg:
    """One argument word as the analysis of a program sees it."""

    text: str
    literal: bool  # no expansion at all
    fixed: bool  # certainly exactly one word at run time
    lead: str  # text every word it expands to starts with (up to an expansion, glob or brace)
    glob: bool = False
    brace: bool = False
    procsub: bool = False
    word: _Word | None = None

    @staticmethod
    def of(word: _Word) -> "_Arg":
        segs = word.segs
        glob, brace = _shape(segs)
        splits = any(
            (s.kind in (_PARAM, _SUB, _ARITH) and not s.quoted) or (s.kind == _PARAM and "@" in s.text) for s in segs
        )
        lead: list[str] = []
        for s in segs:
            if s.kind != _LIT:
                break
            if not s.quoted:
                m = _PATTERN_CHAR_RE.search(s.text)
                if m:
                    lead.append(s.text[: m.start()])
                    break
            lead.append(s.text)
        return _Arg(
            word.text,
            word.literal,
            not (splits or glob or brace),
            "".join(lead),
            glob,
            brace,
            any(s.kind == _PROC for s in segs),
            word,
        )

    @staticmethod
    def plain(text: str) -> "_Arg":
        return _Arg(text, True, True, text)


def _shape(segs: list[_Seg]) -> tuple[bool, bool]:
    """(glob, brace): unquoted pattern characters / brace expansion in a word."""
    chars: list[tuple[str, bool]] = []
    for s in segs:
        if s.kind == _LIT:
            chars.extend((c, not s.quoted) for c in s.text)
        else:
            chars.append(("", False))
    glob = False
    closes = [False] * (len(chars) + 1)
    for i in range(len(chars) - 1, -1, -1):
        closes[i] = closes[i + 1] or chars[i][0] == "]"
    first_open = last_close = -1
    for i, (c, active) in enumerate(chars):
        if not active:
            continue
        if c == "*" or c == "?" or (c == "[" and closes[i + 1]):
            glob = True
        elif c == "{" and first_open < 0:
            first_open = i
        elif c == "}":
            last_close = i
    brace = False
    if 0 <= first_open < last_close:
        inner = chars[first_open + 1 : last_close]
        for i, (c, active) in enumerate(inner):
            if active and (c == "," or (c == "." and i + 1 < len(inner) and inner[i + 1] == (".", True))):
                brace = True
                break
    return glob, brace


def _basename(program: str) -> str:
    return program.rstrip("/").rsplit("/", 1)[-1]


def _check_name(arg: _Arg, env: _Env) -> None:
    if any(p in arg.text for p in env.placeholders):
        raise ShellParseError(f"the program {arg.text!r} would come from the input of find or xargs")
    if not arg.literal:
        raise ShellParseError(f"the command name {arg.text!r} comes from an expansion; what it runs cannot be known")
    if arg.glob:
        raise ShellParseError(f"the command name {arg.text!r} contains glob characters")
    if arg.brace:
        raise ShellParseError(f"the command name {arg.text!r} contains a brace expansion")
    if arg.text.startswith("="):
        raise ShellParseError(f"the command name {arg.text!r} starts with '=' (zsh expands it to a path)")
    if not _basename(arg.text):
        raise ShellParseError(f"empty command name {arg.text!r}")


def _run(
    args: list[_Arg],
    env: _Env,
    ctx: _Ctx,
    stdin: _Stdin,
    redirects: tuple[Redirect, ...],
    assignments: tuple[str, ...] = (),
) -> None:
    if env.wrappers > MAX_WRAPPERS:
        raise ShellParseError("too many nested wrapper programs")
    head = args[0]
    _check_name(head, env)
    name = _basename(head.text)
    rest = args[1:]
    texts = tuple(a.text for a in rest)
    ctx.emit(Invocation(head.text, name, texts, " ".join(texts), redirects, env.via, assignments))
    handler = _handler_for(name)
    if handler is not None:
        if env.appended and handler in _APPEND_UNSAFE:
            _check_appended(name, rest, handler)
        handler(_Call(name, rest, env, ctx, stdin, redirects))


def _check_appended(name: str, rest: list[_Arg], handler: Callable[["_Call"], None]) -> None:
    """xargs appends words only known at run time to a program whose handler decides on its words."""
    if handler is _h_git:
        sub = _git_subcommand(rest)
        key = f"git {sub[0]}" if sub is not None else ""
        if sub is not None and key in _DASHES_END_OPTIONS and _final_dashes_end_options(key, sub[1]):
            return  # git add ... --: after --, what xargs appends can only be paths
        raise ShellParseError(
            f"{name}: xargs would append words only known at run time, which could be options that run a command; "
            "name a subcommand that takes paths (add, rm, checkout, restore, diff, log, ls-files) and end its "
            "arguments with -- so that they can only be paths"
        )
    if handler in _APPEND_AFTER_DASHES:
        if _final_dashes_end_options(name, rest):
            return  # after --, what xargs appends can only be operands (file names)
        raise ShellParseError(
            f"{name}: xargs would append words only known at run time, which could be options that run a command; "
            "end its arguments with -- so that they can only be file names"
        )
    raise ShellParseError(
        f"{name}: xargs would append words only known at run time, which could be options or code that run a command"
    )


def _git_subcommand(args: Sequence[_Arg]) -> tuple[str, Sequence[_Arg]] | None:
    """git's subcommand and the words after it, past its global options (None if there is none, or a word before
    it is only known at run time)."""
    i = 0
    while i < len(args):
        if not args[i].literal:
            return None
        t = args[i].text
        if t == "-c" or t in _GIT_VALUED_GLOBALS:
            i += 2
        elif t.startswith("-"):
            i += 1
        else:
            return t, args[i + 1 :]
    return None


def _final_dashes_end_options(name: str, words: Sequence[_Arg]) -> bool:
    """``words`` end with a ``--`` that ends the options, not one that is the value of the option before it (``tar
    xf --``, ``sort -T --``, ``rsync --exclude --``): only then can what follows it be nothing but operands. The
    word before it must be an operand, an attached value or options known to take none."""
    if not words or not words[-1].literal or words[-1].text != "--":
        return False
    flags, long_flags = _DASHES_END_OPTIONS.get(name, ("", frozenset()))
    first = words[0].text
    if name == "tar" and words[0].literal and not first.startswith("-"):
        # the old form's letters (xf, czf) take their values from the words after them, in order
        if sum(ch not in flags for ch in first) >= len(words) - 1:
            return False
    if len(words) < 2:
        return True
    prev = words[-2]
    if not prev.literal:
        return False
    t = prev.text
    if t in ("-", "--") or not t.startswith("-"):
        return True
    if t.startswith("--"):
        return "=" in t or t in long_flags
    return all(ch in flags for ch in t[1:])


@dataclass(slots=True)
class _Call:
    """A program about to run, as seen by its handler."""

    name: str
    args: list[_Arg]
    env: _Env
    ctx: _Ctx
    stdin: _Stdin
    redirects: tuple[Redirect, ...]

    def fail(self, message: str) -> NoReturn:
        raise ShellParseError(f"{self.name}: {message}")

    def placeholder(self, arg: _Arg) -> bool:
        return any(p in arg.text for p in self.env.placeholders)

    def known(self, arg: _Arg) -> bool:
        """The argument's text is certain (no expansion, no find/xargs placeholder)."""
        return arg.literal and not self.placeholder(arg)

    def single(self, arg: _Arg) -> bool:
        """The argument is certainly one word (its text may be unknown)."""
        return arg.fixed and not (self.env.placeholder_splits and self.placeholder(arg))

    def certain(self, arg: _Arg) -> bool:
        """Exactly one word whose text is known now."""
        return self.known(arg) and self.single(arg)

    def operand_like(self, arg: _Arg) -> bool:
        """Whatever it expands to cannot be taken for an option."""
        if arg.lead:
            return arg.lead[0] not in "-+"
        return self.home_rooted(arg)

    def home_rooted(self, arg: _Arg) -> bool:
        """``"$HOME"``, ``"$HOME/x"``, ``$HOME/x``: under the login user's home, an absolute path that comes from
        the target like ``~`` (a command line cannot assign HOME, see ``_DANGEROUS_VARS``; unset, ``"$HOME/x"``
        is ``/x`` and ``"$HOME"`` an empty word). Not a bare unquoted ``$HOME``, which would vanish if unset."""
        segs = [g for g in arg.word.segs if g.text] if arg.word is not None else []
        if not segs or segs[0].kind != _PARAM or segs[0].name != "HOME" or self.placeholder(arg):
            return False
        if len(segs) > 1 and segs[1].kind == _LIT and segs[1].text.startswith("/"):
            pass
        elif not (len(segs) == 1 and segs[0].quoted):
            return False
        self.ctx.untainted.add("HOME")  # checked when the analysis ends: never set by a line
        return True

    def pattern_value(self, arg: _Arg, options: frozenset[str]) -> bool:
        """``--exclude=*.tmp`` unquoted, for one of ``options`` that only take a pattern: every word the glob
        expands to (none with nullglob) is that option again, with another pattern, so it takes no other
        option's place."""
        key, eq, _ = arg.lead.partition("=")
        return bool(eq) and key in options and self.known(arg) and arg.glob and not arg.brace

    def option_words(self, words: Sequence[_Arg] | None = None) -> Iterator[tuple[int, _Arg]]:
        """Each of ``words`` (the arguments) with its index, for a program that reads options among them: a word
        only known at run time is skipped where it cannot be taken for an option, and refused where it could."""
        for i, a in enumerate(self.args if words is None else words):
            if not self.known(a):
                if self.operand_like(a):
                    continue
                self.fail(f"the option position holding {a.text!r} is only known at run time")
            yield i, a

    def code(self, arg: _Arg, what: str) -> str:
        """Text of an argument that will be parsed as shell code: it must be certain."""
        if not self.known(arg):
            self.fail(f"{what} {arg.text!r} is only known at run time, so its commands cannot be inspected")
        if not self.single(arg):
            self.fail(f"{what} {arg.text!r} undergoes glob or brace expansion, so the code is not its text")
        return arg.text

    def run(
        self,
        argv: list[_Arg],
        via: str | None = None,
        *,
        assignments: tuple[str, ...] = (),
        stdin: _Stdin | None = None,
        **changes: object,
    ) -> None:
        if not argv:
            if self.env.appended:
                self.fail("the program it runs would come from the input of xargs")
            return
        env = replace(self.env, via=via or self.name, wrappers=self.env.wrappers + 1, **changes)  # type: ignore[arg-type]
        _run(argv, env, self.ctx, self.stdin if stdin is None else stdin, self.redirects, assignments)

    def nested(self, text: str, via: str, *, stdin: _Stdin | None = None, transport: bool = False) -> None:
        env = _Env(
            via=via,
            stdin=self.stdin if stdin is None else stdin,
            redirects=self.redirects,
            depth=self.env.depth + 1,
            transport=transport,
        )
        _analyse_text(text, env, self.ctx)

    def program_from_stdin(self, *, posix: bool, via: str = "sh stdin") -> None:
        """The program reads the code it runs from its standard input."""
        if self.env.appended:
            self.fail("its program could come from the input of xargs")
        kind = self.stdin.kind
        if kind in ("null", "file"):
            return
        if kind == "text":
            if not posix:
                return
            if self.stdin.text is None:
                self.fail("the here-document or here-string it reads has expansions; its commands are unknown")
            self.nested(self.stdin.text, via, stdin=_UNKNOWN)
            return
        if kind == "pipe":
            raise ShellParseError(f"program text piped into {self.name} cannot be inspected")
        if kind == "channel":
            if posix and self.ctx.stdin_lines_checked and self.env.depth == 0:
                self.ctx.stdin_shell = self.name  # reached through wrappers only: it reads the lines checked
                return
            where = "stdin" if self.ctx.stdin_lines_checked else "the session's input"
            raise ShellParseError(f"{self.name} would read its program from {where}, which cannot be inspected")
        raise ShellParseError(f"{self.name} would read its program from a source that cannot be inspected")


# --------------------------------------------------------------------------------------------------
# Option parsing for the programs we look inside
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Opts:
    flags: str = ""  # short options without a value
    valued: str = ""  # short options with a value (attached or the next word)
    optional: str = ""  # short options with an optional attached value
    long_flags: frozenset[str] = frozenset()
    long_valued: frozenset[str] = frozenset()
    long_optional: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Opt:
    name: str
    value: str | None = None
    value_known: bool = True


def _long_option(call: _Call, key: str, spec: _Opts) -> str:
    every = spec.long_flags | spec.long_valued | spec.long_optional
    if key in every:
        return key
    matches = [o for o in every if o.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    call.fail(f"unknown option {key}")


def _getopt(call: _Call, spec: _Opts, start: int = 0, *, permute: bool = False) -> tuple[list[_Opt], int]:
    """Parse options like getopt_long("+..."): stop at the first operand or ``--``.

    Returns the options and the index of the first operand. An option position holding a word whose
    text is only known at run time raises: it could be an option that shifts the program's position.
    """
    opts, i, _ = _getopt_dash(call, spec, start)
    return opts, i


def _getopt_dash(call: _Call, spec: _Opts, start: int = 0) -> tuple[list[_Opt], int, bool]:
    """:func:`_getopt`, and whether it stopped at a ``--`` that ends the options (not one that is an option's
    value: ``-n --``)."""
    args = call.args
    opts: list[_Opt] = []
    i = start
    while i < len(args):
        a = args[i]
        t = a.text
        if not call.certain(a):
            if call.operand_like(a):
                break
            if call.placeholder(a):
                call.fail(f"the option position holding {t!r} would come from the input of find or xargs")
            call.fail(f"the option position holding {t!r} is only known at run time")
        if t == "--":
            return opts, i + 1, True
        if t.startswith("--") and len(t) > 2:
            key, eq, value = t.partition("=")
            full = _long_option(call, key, spec)
            if full in spec.long_flags:
                opts.append(_Opt(full))
            elif full in spec.long_optional:
                opts.append(_Opt(full, value if eq else None))
            elif eq:
                opts.append(_Opt(full, value))
            else:
                opts.append(_value_opt(call, full, i + 1))
                i += 1
            i += 1
            continue
        if t.startswith("-") and len(t) > 1:
            j = 1
            while j < len(t):
                ch = t[j]
                if ch in spec.flags:
                    opts.append(_Opt("-" + ch))
                    j += 1
                    continue
                if ch in spec.optional:
                    opts.append(_Opt("-" + ch, t[j + 1 :] or None))
                elif ch in spec.valued:
                    if j + 1 < len(t):
                        opts.append(_Opt("-" + ch, t[j + 1 :]))
                    else:
                        opts.append(_value_opt(call, "-" + ch, i + 1))
                        i += 1
                else:
                    call.fail(f"unknown option -{ch}")
                break
            i += 1
            continue
        break
    return opts, i, False


def _value_opt(call: _Call, name: str, index: int) -> _Opt:
    if index >= len(call.args):
        call.fail(f"option {name} needs a value")
    value = call.args[index]
    if not call.single(value):
        call.fail(f"the value of {name} ({value.text!r}) may expand to several words")
    return _Opt(name, value.text, call.known(value))


def _permute(call: _Call, spec: _Opts) -> tuple[list[_Opt], list[_Arg]]:
    """GNU getopt without '+': options may follow operands (until ``--``)."""
    opts: list[_Opt] = []
    operands: list[_Arg] = []
    i = 0
    args = call.args
    while i < len(args):
        got, j = _getopt(call, spec, i)
        opts.extend(got)
        if j > i and args[j - 1].text == "--" and args[j - 1].literal:
            operands.extend(args[j:])
            break
        if j >= len(args):
            break
        operands.append(args[j])
        i = j + 1
    return opts, operands


# --------------------------------------------------------------------------------------------------
# Wrappers: programs that run the program named by their operands
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WrapSpec:
    opts: _Opts = _Opts()
    positional: int = 0  # operands before the program (timeout DURATION, chroot NEWROOT)
    assignments: bool = False  # NAME=value words before the program (env, sudo)
    no_run: frozenset[str] = frozenset()  # options after which nothing is run
    shell_opts: frozenset[str] = frozenset()  # options that start a shell when no program is given
    shell_without_program: bool = False
    numeric: bool = False  # nice -10


_HELP = _fs("--help", "--version")


def _wrapper(spec: _WrapSpec) -> Callable[[_Call], None]:
    def handle(call: _Call) -> None:
        args = call.args
        start = 0
        if spec.numeric and args and call.known(args[0]) and re.fullmatch(r"-[0-9]+", args[0].text):
            start = 1
        opts, i = _getopt(call, spec.opts, start)
        names = {o.name for o in opts}
        if names & spec.no_run:
            return
        for _ in range(spec.positional):
            if i >= len(args):
                if call.env.appended:
                    call.fail("its operands would come from the input of xargs")
                return
            if not call.single(args[i]):
                call.fail(f"the operand {args[i].text!r} may expand to several words")
            i += 1
        assigns: list[str] = []
        while spec.assignments and i < len(args) and "=" in args[i].lead:
            a = args[i]
            if not call.single(a):
                call.fail(f"{a.text!r} may expand to several words, one of which could be the program")
            name = a.lead.split("=", 1)[0]
            if not _NAME_RE.fullmatch(name):
                call.fail(f"unusual environment variable name in {a.text!r}")
            split = _split_assignment(a.word) if a.word is not None else None
            if split is None and call.known(a):  # an argv without a shell: the text is the value
                split = (name, [_Seg(a.text.split("=", 1)[1], True)])
            call.ctx.variable_name(
                name,
                call.name,
                assign=True,
                int_safe=split is not None and _int_safe_value(split[1]),
                value=_word_of(split[1]) if split is not None else None,
            )
            assigns.append(a.text)
            i += 1
        if i >= len(args):
            if call.env.appended:
                call.fail("the program it runs would come from the input of xargs")
            if spec.shell_without_program or names & spec.shell_opts:
                call.program_from_stdin(posix=True, via=call.name)
            return
        call.run(args[i:], assignments=tuple(assigns))

    return handle


_WRAPPERS: dict[str, _WrapSpec] = {
    "env": _WrapSpec(
        _Opts(
            flags="i0v",
            valued="uC",
            long_flags=_fs(
                "--ignore-environment", "--null", "--debug", "--help", "--version", "--list-signal-handling"
            ),
            long_valued=_fs("--unset", "--chdir"),
            long_optional=_fs("--default-signal", "--ignore-signal", "--block-signal"),
        ),
        assignments=True,
        no_run=_HELP | {"--list-signal-handling"},
    ),
    "sudo": _WrapSpec(
        _Opts(
            flags="ABbEeHhiKklNnPSsVv",
            valued="aCcDgpRrTtUu",
            long_flags=_words(
                "--askpass --background --bell --edit --set-home --help --login --remove-timestamp"
                " --reset-timestamp --list --non-interactive --preserve-groups --stdin --shell --version"
                " --validate"
            ),
            long_valued=_words(
                "--close-from --chdir --group --host --prompt --chroot --role --type --command-timeout"
                " --other-user --user"
            ),
            long_optional=_fs("--preserve-env"),
        ),
        assignments=True,
        no_run=_HELP | {"-V", "-l", "--list", "-K", "--remove-timestamp", "-v", "--validate"},
        shell_opts=_fs("-s", "--shell", "-i", "--login"),
    ),
    "doas": _WrapSpec(_Opts(flags="Lns", valued="Cu"), no_run=_fs("-C", "-L"), shell_opts=_fs("-s")),
    "pkexec": _WrapSpec(
        _Opts(
            long_flags=_fs("--version", "--help", "--disable-internal-agent", "--keep-cwd"),
            long_valued=_fs("--user"),
        ),
        no_run=_HELP,
        shell_without_program=True,
    ),
    "nohup": _WrapSpec(_Opts(long_flags=_HELP), no_run=_HELP),
    "timeout": _WrapSpec(
        _Opts(
            flags="v",
            valued="sk",
            long_flags=_fs("--preserve-status", "--foreground", "--verbose") | _HELP,
            long_valued=_fs("--signal", "--kill-after"),
        ),
        positional=1,
        no_run=_HELP,
    ),
    "nice": _WrapSpec(_Opts(valued="n", long_flags=_HELP, long_valued=_fs("--adjustment")), no_run=_HELP, numeric=True),
    "ionice": _WrapSpec(
        _Opts(
            flags="tpPuhV",
            valued="cn",
            long_flags=_fs("--ignore", "--pid", "--pgid", "--uid") | _HELP,
            long_valued=_fs("--class", "--classdata"),
        ),
        no_run=_HELP | {"-p", "-P", "-u", "-h", "-V", "--pid", "--pgid", "--uid"},
    ),
    "stdbuf": _WrapSpec(
        _Opts(valued="ioe", long_flags=_HELP, long_valued=_fs("--input", "--output", "--error")), no_run=_HELP
    ),
    "time": _WrapSpec(
        _Opts(
            flags="pvqa",
            valued="fo",
            long_flags=_fs("--portability", "--verbose", "--quiet", "--append") | _HELP,
            long_valued=_fs("--format", "--output"),
        ),
        no_run=_HELP,
    ),
    "command": _WrapSpec(_Opts(flags="pvV"), no_run=_fs("-v", "-V")),
    "builtin": _WrapSpec(),
    "exec": _WrapSpec(_Opts(flags="cl", valued="a")),
    "setsid": _WrapSpec(
        _Opts(flags="cfwhV", long_flags=_fs("--ctty", "--fork", "--wait") | _HELP), no_run=_HELP | {"-h", "-V"}
    ),
    "chroot": _WrapSpec(
        _Opts(long_flags=_fs("--skip-chdir") | _HELP, long_valued=_fs("--userspec", "--groups")),
        positional=1,
        no_run=_HELP,
        shell_without_program=True,
    ),
    "unbuffer": _WrapSpec(_Opts(flags="p")),
    "fakeroot": _WrapSpec(
        _Opts(
            flags="uhv",
            valued="is",
            long_flags=_fs("--unknown-is-real") | _HELP,
            long_valued=_fs("--lib", "--faked"),
        ),
        no_run=_HELP | {"-h", "-v"},
        shell_without_program=True,
    ),
    "catchsegv": _WrapSpec(),
    # zsh precommand modifiers and `repeat N cmd`
    "noglob": _WrapSpec(),
    "nocorrect": _WrapSpec(),
    "-": _WrapSpec(),
    "repeat": _WrapSpec(positional=1),
    "systemd-run": _WrapSpec(
        _Opts(
            flags="hqPGdSrtV",
            valued="uEpHMs",
            long_flags=_words(
                "--user --system --scope --wait --no-block --no-ask-password --pipe --pty --quiet --collect"
                " --shell --same-dir --send-sighup --remain-after-exit"
            )
            | _HELP,
            long_valued=_words(
                "--unit --property --setenv --host --machine --slice --uid --gid --nice --working-directory"
                " --description --service-type --on-active --on-boot --on-startup --on-unit-active"
                " --on-unit-inactive --on-calendar --on-clock-change --on-timezone-change --timer-property"
                " --path-property --socket-property --expand-environment"
            ),
        ),
        no_run=_HELP | {"-h", "-V"},
        shell_opts=_words("-S --shell"),
    ),
    "taskset": _WrapSpec(
        _Opts(flags="acphV", long_flags=_fs("--all-tasks", "--cpu-list", "--pid") | _HELP),
        positional=1,
        no_run=_HELP | {"-p", "--pid", "-h", "-V"},
    ),
    # util-linux and friends: namespaces, credentials, limits, tracing
    "unshare": _WrapSpec(
        _Opts(
            flags="muinpUCTfrcVh",
            valued="RwSGl",
            long_flags=_words("--fork --map-root-user --map-current-user --keep-caps --map-auto") | _HELP,
            long_valued=_words(
                "--propagation --setgroups --map-user --map-group --map-users --map-groups --root --wd --setuid"
                " --setgid --monotonic --boottime --load-interp"
            ),
            long_optional=_words("--mount --uts --ipc --net --pid --user --cgroup --time --kill-child --mount-proc"),
        ),
        no_run=_HELP | {"-h", "-V"},
        shell_without_program=True,
    ),
    "nsenter": _WrapSpec(
        _Opts(
            flags="aeFZcVh",
            valued="tSGW",
            optional="muinpUCTrw",
            long_flags=_words("--all --preserve-credentials --no-fork --follow-context --env --join-cgroup") | _HELP,
            long_valued=_words("--target --setuid --setgid --wdns"),
            long_optional=_words("--mount --uts --ipc --net --pid --user --cgroup --time --root --wd"),
        ),
        no_run=_HELP | {"-h", "-V"},
        shell_without_program=True,
    ),
    "setpriv": _WrapSpec(
        _Opts(
            flags="dVh",
            long_flags=_words("--clear-groups --keep-groups --init-groups --reset-env --nnp --no-new-privs --dump")
            | _HELP,
            long_valued=_words(
                "--reuid --regid --ruid --rgid --euid --egid --groups --inh-caps --ambient-caps --bounding-set"
                " --securebits --pdeathsig --selinux-label --apparmor-profile --landlock-access --landlock-rule"
            ),
        ),
        no_run=_HELP | {"-h", "-V", "-d", "--dump"},
    ),
    "prlimit": _WrapSpec(
        _Opts(
            optional="cdefilmnqrstuvxyR",
            valued="po",
            long_flags=_words("--noheadings --raw --verbose") | _HELP,
            long_valued=_words("--pid --output"),
            long_optional=_words(
                "--as --core --cpu --data --fsize --locks --memlock --msgqueue --nice --nofile --nproc --rss"
                " --rtprio --rttime --sigpending --stack"
            ),
        ),
        no_run=_HELP,
    ),
    "strace": _WrapSpec(
        _Opts(
            flags="cCdDfFhiqrtTvVwxyzZkn",
            valued="abeEIoOpPsSuUX",
            long_flags=_words("--follow-forks --output-separately --summary-only --summary --no-abbrev --seccomp-bpf")
            | _HELP,
            long_valued=_words("--output --trace --attach --string-limit --signal --status --user --verbose --abbrev"),
        ),
        no_run=_HELP | {"-h", "-V"},
    ),
    "ltrace": _WrapSpec(
        _Opts(flags="bcCfhiLrStTV", valued="aeEFlnopsuwxXA", long_flags=_HELP, long_valued=_words("--output")),
        no_run=_HELP | {"-h", "-V"},
    ),
    "ssh-agent": _WrapSpec(_Opts(flags="csDdk", valued="aEOPt")),
    "eatmydata": _WrapSpec(_Opts(long_flags=_HELP), no_run=_HELP),
    "linux32": _WrapSpec(_Opts(flags="vRFZLXBIST3", long_flags=_HELP), shell_without_program=True, no_run=_HELP),
    "linux64": _WrapSpec(_Opts(flags="vRFZLXBIST3", long_flags=_HELP), shell_without_program=True, no_run=_HELP),
    "numactl": _WrapSpec(
        _Opts(
            flags="alHs",
            valued="ipmNC",
            long_flags=_words("--localalloc --all --hardware --show") | _HELP,
            long_valued=_words("--interleave --preferred --membind --cpunodebind --physcpubind"),
        ),
        no_run=_HELP | {"-H", "-s", "--hardware", "--show"},
    ),
    "chrt": _WrapSpec(
        _Opts(
            flags="bdefiorapmRvhV",
            valued="TPD",
            long_flags=_words(
                "--batch --deadline --fifo --idle --other --rr --all-tasks --pid --max --reset-on-fork --verbose"
            )
            | _HELP,
            long_valued=_fs("--sched-runtime", "--sched-period", "--sched-deadline"),
        ),
        positional=1,
        no_run=_HELP | {"-p", "--pid", "-m", "--max", "-h", "-V"},
    ),
}


def _h_sudo(call: _Call) -> None:
    opts, _ = _getopt(call, _WRAPPERS["sudo"].opts)
    if any(o.name in ("-e", "--edit") for o in opts):
        _h_command_reader(call)  # sudoedit: an editor driven by the session
        return
    _wrapper(_WRAPPERS["sudo"])(call)


_SYSTEMD_REMOTE_TOOLS = (
    *("systemctl", "loginctl", "machinectl", "busctl", "timedatectl", "hostnamectl", "localectl"),
    *("systemd-analyze", "portablectl", "homectl"),
)


def _systemd_remote_host(call: _Call, args: Sequence[_Arg]) -> _Arg | None:
    """The host of a systemd tool's -H/--host (getopt_long: anywhere before ``--``, ``--ho`` for ``--host``,
    in a cluster of short options), or None. A cluster with an H in an option's value counts too."""
    if call.env.appended:
        call.fail("xargs would append options that are only known at run time: one could be -H/--host")
    for i, a in enumerate(args):
        t = a.text
        following = args[i + 1] if i + 1 < len(args) else _Arg.plain("")
        if not call.known(a):
            if not call.operand_like(a):
                call.fail(f"{t!r} could be -H/--host, which makes it run ssh to another host")
        elif t == "--":
            return None
        elif t.startswith("--"):
            name, eq, value = t.partition("=")
            if len(name) >= 4 and "--host".startswith(name):
                return _Arg.plain(value) if eq else following
        elif t.startswith("-") and "H" in t[1:]:
            rest = t[t.index("H") + 1 :]
            return _Arg.plain(rest) if rest else following
    return None


def _h_systemd_remote(call: _Call) -> None:
    """-H HOST runs ``ssh HOST systemd-stdio-bridge``: the target's ssh, with its account's keys, to any host."""
    host = _systemd_remote_host(call, call.args)
    if host is not None:
        argv = [_Arg.plain("ssh"), _Arg.plain("-xT"), _Arg.plain("--"), host, _Arg.plain("systemd-stdio-bridge")]
        call.run(argv, f"{call.name} -H")
    if any(not call.known(a) or a.text == "edit" for a in call.args):
        _starts_an_editor(call)


def _starts_an_editor(call: _Call) -> None:
    """The program starts an editor (``$EDITOR``, vi) on its own input: commands such as vi's ``:!CMD`` that the
    editor reads there run unseen, as with ``vi`` itself."""
    if call.stdin.kind not in ("null", "file") or call.env.appended:
        call.fail("it starts an editor, which would read its commands from its input; that cannot be inspected")


def _h_systemd_run(call: _Call) -> None:
    opts, _ = _getopt(call, _WRAPPERS["systemd-run"].opts)
    host = next((o for o in opts if o.name in ("-H", "--host")), None)
    if host is not None:
        if not host.value_known or host.value is None:
            call.fail("the host of -H is only known at run time")
        argv = [_Arg.plain("ssh"), _Arg.plain("-xT"), _Arg.plain("--"), _Arg.plain(host.value)]
        call.run([*argv, _Arg.plain("systemd-stdio-bridge")], "systemd-run -H")
    for i, a in enumerate(call.args):
        t = a.text
        value = call.args[i + 1].text if t in ("-E", "--setenv") and i + 1 < len(call.args) else None
        if t.startswith("--setenv="):
            value = t[9:]
        elif t.startswith("-E") and len(t) > 2:
            value = t[2:]
        if value is not None and _dangerous_var(value.split("=", 1)[0]):
            call.fail(f"--setenv {value.split('=', 1)[0]} can change which program runs")
    _wrapper(_WRAPPERS["systemd-run"])(call)


def _h_socat(call: _Call) -> None:
    for a in call.args:
        if not call.known(a):
            call.fail(f"the address {a.text!r} is only known at run time")
        if re.search(r"(?:^|[!,])\s*(?:exec|system)\s*:", a.text, re.IGNORECASE):
            call.fail("EXEC and SYSTEM addresses run a program fed from the connection")


def _h_netcat(call: _Call) -> None:
    for a in call.args:
        t = a.text
        if t.startswith(("--exec", "--sh-exec", "--lua-exec")) or re.fullmatch(r"-[A-Za-z]*[ec].*", t):
            call.fail("-e/-c run a program fed from the network")


# Servers that start a program for each network connection (a login, a shell, or the program named in their
# arguments or configuration), fed from the network rather than the session.
_NETWORK_SERVERS = ("telnetd", "in.telnetd", "utelnetd", "tcpsvd", "udpsvd", "tcpserver", "inetd", "xinetd")


def _h_network_server(call: _Call) -> None:
    call.fail("it starts a program (a login, a shell or the one it is given) for whoever connects over the network")


_VIRSH = _Opts(
    flags="hqrtv",
    valued="cdeklK",
    optional="V",
    long_flags=_words("--help --quiet --readonly --timing --no-pkttyagent"),
    long_valued=_words("--connect --debug --escape --keepalive-interval --keepalive-count --log"),
    long_optional=_words("--version"),
)


def _h_virsh(call: _Call) -> None:
    opts, i = _getopt(call, _VIRSH)
    if any(o.name in ("-h", "--help", "-v", "-V", "--version") for o in opts):
        return
    for o in opts:
        if o.name not in ("-c", "--connect"):
            continue
        if not o.value_known:
            call.fail("its connection URI is only known at run time (qemu+ssh:// or qemu+ext:// start a program)")
        if re.search(r"\+(?:ssh|libssh2?|ext)\b", o.value or "", re.IGNORECASE):
            call.fail("a connection URI with the ssh or ext transport (qemu+ssh://...) starts a program to connect")
    if i >= len(call.args):
        _h_command_reader(call)  # its own shell, reading commands from the terminal or the input
        return
    for a in call.args[i:]:
        if not call.known(a) or re.search(r"(?:^|[;\s])console(?:$|[;\s])", a.text):
            call.fail("`virsh console` gives the session's input to a guest's console, where it cannot be inspected")


def _h_env(call: _Call) -> None:
    # `env -` is `env -i`; -S/--split-string builds a command from one string: refused as an unknown option.
    while call.args and call.args[0].literal and call.args[0].text == "-":
        call.args = call.args[1:]
    _wrapper(_WRAPPERS["env"])(call)


def _h_xargs(call: _Call) -> None:
    spec = _Opts(
        flags="0prtxo",
        valued="aEdILnPs",
        optional="eil",
        long_flags=_fs(
            "--null", "--interactive", "--no-run-if-empty", "--verbose", "--exit", "--show-limits", "--open-tty"
        )
        | _HELP,
        long_valued=_fs("--arg-file", "--delimiter", "--max-args", "--max-procs", "--max-chars", "--process-slot-var"),
        long_optional=_fs("--eof", "--replace", "--max-lines"),
    )
    opts, i = _getopt(call, spec)
    replace_str: str | None = None
    arg_file = open_tty = False
    for o in opts:
        if o.name in _HELP:
            return
        if o.name == "-I":
            replace_str = o.value
        elif o.name in ("-i", "--replace"):
            replace_str = o.value or "{}"
        elif o.name in ("-a", "--arg-file"):
            arg_file = True
        elif o.name in ("-o", "--open-tty"):
            open_tty = True
        elif o.name == "--process-slot-var":
            call.ctx.variable_name(o.value if o.value_known else None, "xargs", assign=True, int_safe=True)
    if replace_str is not None and not replace_str:
        call.fail("empty replacement string")
    argv = call.args[i:] or [_Arg.plain("echo")]
    # GNU xargs gives the command /dev/null as input, unless -a (input unchanged) or -o (the terminal).
    stdin = _CHANNEL if open_tty else call.stdin if arg_file else _NULL
    if replace_str is not None:
        call.run(argv, "xargs", stdin=stdin, placeholders=(*call.env.placeholders, replace_str))
    else:
        call.run(argv, "xargs", stdin=stdin, appended=True)


_FIND_ARITY = {
    **dict.fromkeys(
        _words_list(
            "-delete -print -print0 -ls -prune -quit -true -false -empty -executable -readable -writable"
            " -nouser -nogroup -depth -d -mount -xdev -noleaf -follow -ignore_readdir_race"
            " -noignore_readdir_race -daystart -warn -nowarn -not -a -and -o -or ! ( ) , -help --help"
            " -version --version"
        ),
        0,
    ),
    **dict.fromkeys(
        _words_list(
            "-name -iname -path -ipath -wholename -iwholename -regex -iregex -regextype -type -xtype"
            " -user -group -uid -gid -perm -size -mtime -mmin -atime -amin -ctime -cmin -newer -anewer"
            " -cnewer -links -inum -samefile -maxdepth -mindepth -fstype -lname -ilname -used -printf"
            " -fprint -fprint0 -fls -context -files0-from"
        ),
        1,
    ),
    "-fprintf": 2,
}
_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})


def _h_find(call: _Call) -> None:
    args = call.args
    i = 0
    while (
        i < len(args) and call.known(args[i]) and (args[i].text in ("-H", "-L", "-P") or args[i].text.startswith("-O"))
    ):
        i += 1
    if i < len(args) and call.known(args[i]) and args[i].text == "-D":
        i += 2
    while i < len(args):
        a = args[i]
        t = a.text
        if not call.certain(a):
            # A word only known at run time (or expanded into several) could be a primary such as
            # -exec, unless it cannot start with '-' or is a plain variable the command line does not set.
            if a.lead and a.lead[0] not in "-(!),":
                i += 1
                continue
            segs = [g for g in a.word.segs if g.text] if a.word is not None else []
            params = [g for g in segs if g.kind == _PARAM]
            if len(segs) == 1 and call.single(a) and params and params[0].name and _NAME_RE.fullmatch(params[0].name):
                _require_untainted(call, params[0].name)
                i += 1
                continue
            call.fail(f"the argument {t!r} is only known at run time and could be a primary such as -exec")
        if t in _FIND_EXEC:
            j = i + 1
            while j < len(args) and not (
                call.known(args[j]) and (args[j].text == ";" or (args[j].text == "+" and args[j - 1].text == "{}"))
            ):
                j += 1
            if j >= len(args):
                call.fail(f"{t} without a terminating ';' or '+'")
            if j == i + 1:
                call.fail(f"{t} without a command")
            call.run(
                args[i + 1 : j],
                f"find {t}",
                placeholders=(*call.env.placeholders, "{}"),
                placeholder_splits=args[j].text == "+",
            )
            i = j + 1
            continue
        arity = _FIND_ARITY.get(t)
        if arity is None:
            if re.fullmatch(r"-newer[aBcmt][aBcmt]", t):
                arity = 1
            elif t.startswith("-"):
                call.fail(f"unknown primary {t}")
            else:
                arity = 0  # a starting point
        if i + arity >= len(args) and arity:
            call.fail(f"{t} needs {arity} value(s)")
        for k in range(i + 1, i + 1 + arity):
            if not call.single(args[k]):
                call.fail(f"the value of {t} ({args[k].text!r}) may expand to several words")
        i += 1 + arity


def _require_untainted(call: _Call, name: str) -> None:
    """The variable's value must not come from this command line (checked when the analysis ends)."""
    if name in _AGENT_CONTROLLED or name.startswith(("LC_", "SSH_")):
        call.fail(f"${name} is controlled by the client and could inject options")
    call.ctx.untainted.add(name)


def _h_watch(call: _Call) -> None:
    spec = _Opts(
        flags="bcCeghptwrx",
        valued="nq",
        optional="d",
        long_flags=_words(
            "--beep --color --no-color --errexit --chgexit --precise --no-title --no-wrap --no-rerun --exec"
        )
        | _HELP,
        long_valued=_fs("--interval", "--equexit", "--shotsdir"),
        long_optional=_fs("--differences"),
    )
    opts, i = _getopt(call, spec)
    names = {o.name for o in opts}
    if names & _HELP:
        return
    rest = call.args[i:]
    if not rest:
        return
    if names & {"-x", "--exec"}:
        call.run(rest, "watch")
        return
    call.nested(" ".join(call.code(a, "the command") for a in rest), "watch")


def _h_flock(call: _Call) -> None:
    spec = _Opts(
        flags="sxeunoFhV",
        valued="wE",
        long_flags=_fs("--shared", "--exclusive", "--unlock", "--nonblock", "--nb", "--close", "--no-fork", "--verbose")
        | _HELP,
        long_valued=_fs("--wait", "--timeout", "--conflict-exit-code"),
    )
    opts, i = _getopt(call, spec)
    if {o.name for o in opts} & (_HELP | {"-h", "-V"}):
        return
    rest = call.args[i + 1 :]
    if not rest:
        return
    if call.known(rest[0]) and rest[0].text in ("-c", "--command"):
        if len(rest) != 2:
            call.fail("-c takes exactly one command string")
        call.nested(call.code(rest[1], "the command string"), "flock")
        return
    call.run(rest, "flock")


def _h_su(call: _Call) -> None:
    spec = _Opts(
        flags="lmpfPhV",
        valued="cgGswu" if call.name == "runuser" else "cgGsw",
        long_flags=_fs("--login", "--preserve-environment", "--fast", "--pty") | _HELP,
        long_valued=_fs(
            "--command", "--session-command", "--group", "--supp-group", "--shell", "--whitelist-environment"
        )
        | ({"--user"} if call.name == "runuser" else set()),
    )
    opts, operands = _permute(call, spec)
    names = {o.name for o in opts}
    if names & (_HELP | {"-h", "-V"}):
        return
    command: _Opt | None = None
    for o in opts:
        if o.name in ("-c", "--command", "--session-command"):
            command = o
        elif o.name in ("-s", "--shell"):
            if not o.value_known or _basename(o.value or "") not in _POSIX_SHELLS:
                call.fail(f"the shell {o.value!r} is not a POSIX shell we can analyse")
    if operands and operands[0].literal and operands[0].text == "-":
        operands = operands[1:]
    if names & {"-u", "--user"}:
        if command is None:
            if operands:
                call.run(operands, call.name)
            else:
                call.program_from_stdin(posix=True, via=call.name)
            return
        operands = []
    extra = operands[1:]
    if command is not None:
        if not command.value_known or command.value is None:
            call.fail("the command string is only known at run time")
        call.nested(command.value, call.name)
        return
    if extra:
        call.run([_Arg.plain("sh"), *extra], call.name)
        return
    call.program_from_stdin(posix=True, via=call.name)


def _h_busybox(call: _Call) -> None:
    if call.args and call.known(call.args[0]) and not call.args[0].text.startswith("-"):
        call.run(call.args, "busybox")


# --------------------------------------------------------------------------------------------------
# Shells and interpreters
# --------------------------------------------------------------------------------------------------

_POSIX_SHELLS = _words("sh bash dash ash ksh ksh93 mksh lksh pdksh oksh zsh yash posh rbash hush")
_OTHER_SHELLS = frozenset(
    {"fish", "csh", "tcsh", "xonsh", "nu", "elvish", "pwsh", "powershell", "rc", "es", "ion", "osh", "ysh"}
)
_SHELL_LONG = _words(
    "--norc --noprofile --posix --login --restricted --verbose --noediting --debugger"
    " --dump-strings --dump-po-strings --pretty-print --protected --version --help"
)


def _h_posix_shell(call: _Call) -> None:
    args = call.args
    i = 0
    command = read_stdin = info = False
    while i < len(args):
        a = args[i]
        t = a.text
        if not call.certain(a):
            if command:
                break  # the command string: checked below
            if a.procsub:
                call.fail("it would run a program from a process substitution, which cannot be inspected")
            if call.operand_like(a):
                break
            call.fail(f"the option position holding {t!r} is only known at run time")
        if t in ("-", "--"):
            i += 1
            break
        if t.startswith("--"):
            if t in ("--rcfile", "--init-file", "--emulate"):
                _value_opt(call, t, i + 1)
                i += 2
                continue
            if t.startswith(("--rcfile=", "--init-file=", "--emulate=")):
                i += 1
                continue
            if t in _SHELL_LONG or (call.name == "zsh" and re.fullmatch(r"--[a-z][a-z0-9_-]*", t)):
                info = info or t in _HELP
                i += 1
                continue
            call.fail(f"unknown option {t}")
        if t[:1] in ("-", "+") and len(t) > 1:
            step = 1
            for j, ch in enumerate(t[1:], start=1):
                if ch == "c":
                    command = True
                elif ch == "s":
                    read_stdin = True
                elif ch in "oO":
                    if j + 1 == len(t):
                        _value_opt(call, "-" + ch, i + 1)
                        step = 2
                        if t[0] == "-":
                            _check_shell_option_cluster(call, t, args[i + 1].text)
                    break
                elif ch in "kH" and t[0] == "-":
                    call.fail(f"option {t} changes how commands are read")
                elif not (ch.isascii() and ch.isalpha()):
                    call.fail(f"unknown option {t}")
            i += step
            continue
        break
    if info:
        return
    operands = args[i:]
    if command:
        if not operands:
            if call.env.appended:
                call.fail("its command string would come from the input of xargs")
            call.fail("-c needs a command string")
        call.nested(call.code(operands[0], "the command string"), "sh -c")
        return
    if operands and not read_stdin:
        script = operands[0]
        if script.procsub:
            call.fail("it would run a program from a process substitution, which cannot be inspected")
        if _may_read_session(call, script):
            call.program_from_stdin(posix=True)
        return
    call.program_from_stdin(posix=True)


def _h_other_shell(call: _Call) -> None:
    if not call.args:
        if call.stdin.kind not in ("null", "file") or call.env.appended:
            call.fail(f"{call.name} syntax is not analysed; its commands cannot be inspected")
        return
    first = call.args[0]
    if not first.text.startswith("-") and not _may_read_session(call, first):
        return  # a script file: the rules decide
    call.fail(f"{call.name} syntax is not analysed; only POSIX shells' -c bodies are")


@dataclass(frozen=True, slots=True)
class _Interp:
    inline: frozenset[str] = frozenset()  # options whose value is program text
    values: frozenset[str] = frozenset()  # options that take the next word as value (when bare)
    flags: str = ""  # single-letter options without value
    attached: str = ""  # letters whose value is the rest of the word
    long_flags: frozenset[str] = frozenset()
    script: frozenset[str] = frozenset()  # options naming the program file or module
    interactive: frozenset[str] = frozenset()  # read more program from stdin afterwards
    info: frozenset[str] = frozenset()  # print something and exit
    operand_is_script: bool = True  # the first operand is the program file (psql: a database)


_INTERPRETERS: dict[str, _Interp] = {
    "python": _Interp(
        inline=_fs("-c"),
        values=_fs("-W", "-X", "--check-hash-based-pycs"),
        flags="bBdEIOPqRsSuvx",
        script=_fs("-m"),
        interactive=_fs("-i"),
        info=_fs("-h", "-V", "-?", "--help", "--version", "--help-env", "--help-xoptions", "--help-all"),
    ),
    "perl": _Interp(
        inline=_fs("-e", "-E"),
        values=_fs("-I", "-M", "-m"),
        flags="acnpsStTuUwWX",
        attached="0CdDFiIlmMx",
        info=_fs("-v", "-V", "-h", "--help", "--version"),
    ),
    "ruby": _Interp(
        inline=_fs("-e"),
        values=_fs("-I", "-r", "-C", "-E"),
        flags="acdlnpsSvwWyU",
        attached="0FiKTWx",
        info=_fs("-h", "--help", "--version"),
    ),
    "node": _Interp(
        inline=_fs("-e", "--eval", "-p", "--print"),
        values=_words(
            "-r --require --import --loader --experimental-loader -C --conditions --input-type"
            " --title --env-file --inspect-port"
        ),
        flags="c",
        long_flags=_words(
            "--no-warnings --trace-warnings --inspect --inspect-brk --expose-gc --enable-source-maps"
            " --no-deprecation --trace-deprecation --preserve-symlinks --abort-on-uncaught-exception"
            " --check --experimental-vm-modules"
        ),
        interactive=_fs("-i", "--interactive"),
        info=_fs("-v", "--version", "-h", "--help", "--v8-options"),
    ),
    "php": _Interp(
        inline=_fs("-r", "-B", "-R", "-E"),
        values=_fs("-c", "-d", "-z", "-t"),
        flags="nqsHwlCe",
        script=_fs("-f", "-S"),
        interactive=_fs("-a"),
        info=_fs("-v", "-h", "-i", "-m", "--version", "--help", "--info", "--modules"),
    ),
    "lua": _Interp(inline=_fs("-e"), values=_fs("-l"), flags="EW", interactive=_fs("-i"), info=_fs("-v")),
    "tclsh": _Interp(values=_fs("-encoding")),
    "expect": _Interp(inline=_fs("-c"), flags="bdDinNv", script=_fs("-f"), interactive=_fs("-i")),
    "Rscript": _Interp(inline=_fs("-e"), info=_fs("--version", "--help")),
    "R": _Interp(inline=_fs("-e"), script=_fs("-f", "--file"), info=_fs("--version", "--help")),
    "osascript": _Interp(inline=_fs("-e"), values=_fs("-l", "-s")),
    "dc": _Interp(inline=_fs("-e", "--expression"), script=_fs("-f", "--file"), info=_words("-h -V --help --version")),
    "psql": _Interp(
        inline=_fs("-c", "--command"),
        script=_fs("-f", "--file"),
        values=_words(
            "-d -h -p -U -v -P -o -L -T -F -R --dbname --host --port --username --set --variable"
            " --pset --output --log-file"
        ),
        flags="aAbeEHnqsStxXwW01",
        long_flags=_fs("--no-psqlrc", "--quiet", "--echo-all", "--echo-errors", "--echo-queries", "--tuples-only"),
        info=_fs("-V", "--version", "-?", "--help", "-l", "--list"),
        operand_is_script=False,
    ),
    "mysql": _Interp(
        inline=_fs("-e", "--execute"),
        values=_fs("-h", "-u", "-P", "-D", "-S", "--host", "--user", "--port", "--database", "--socket"),
        flags="BNrstvEfnqX",
        attached="p",
        long_flags=_fs("--batch", "--silent", "--skip-column-names", "--raw", "--table", "--verbose"),
        info=_fs("-V", "--version", "--help", "-?"),
        operand_is_script=False,
    ),
}
# Read-eval-print loops: a script operand or inline code is reported, a program from stdin is refused.
for _repl, _inline in {
    "irb": "-e",
    "ipython": "-c",
    "ipython3": "-c",
    "bpython": "-c",
    "jshell": "",
    "ghci": "-e",
    "julia": "-e --eval",
    "sbcl": "--eval",
    "guile": "-c",
    "racket": "-e --eval",
    "erl": "-eval",
    "iex": "-e",
    "elixir": "-e --eval",
    "octave": "--eval",
    "gnuplot": "-e",
    "sqlplus": "",
    "mongo": "--eval",
    "mongosh": "--eval",
    "lldb": "-o --one-line",
    "deno": "eval",
    "bun": "-e --eval",
    "scala": "-e",
    "groovy": "-e",
    "groovysh": "",
    "kotlinc": "",
    "ocaml": "",
    "swift": "",
    "clojure": "-e --eval",
    "clj": "-e --eval",
    "cqlsh": "-e --execute",
    "clickhouse-client": "-q --query",
    "sqlcmd": "-Q -q",
    "influx": "-execute",
}.items():
    _INTERPRETERS.setdefault(_repl, _Interp(inline=_words(_inline)))
# Database shells whose operands name the server or data source (host, DSN), not a script: they read SQL or
# CQL from stdin unless given it inline.
_INTERPRETERS["cqlsh"] = _Interp(inline=_fs("-e", "--execute"), operand_is_script=False)
_INTERPRETERS["isql"] = _INTERPRETERS["iusql"] = _Interp(operand_is_script=False)
# Redis clients run the command given as arguments; without one (or with --pipe) they run those of stdin.
_INTERPRETERS["redis-cli"] = _Interp(
    values=_fs("-h", "-p", "-a", "-n", "-u", "-s", "--user", "--pass"),
    flags="xce",
    info=_fs("-v", "--version", "--help"),
)
_INTERPRETERS["valkey-cli"] = _INTERPRETERS["keydb-cli"] = _INTERPRETERS["redis-cli"]
_INTERPRETERS["nodejs"] = _INTERPRETERS["node"]
_INTERPRETERS["luajit"] = _INTERPRETERS["lua"]
_INTERPRETERS["wish"] = _INTERPRETERS["tclsh"]
_INTERPRETERS["mariadb"] = _INTERPRETERS["mysql"]
_INTERPRETER_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:python|pypy)[0-9.]*(?:-dbg)?"), "python"),
    (re.compile(r"perl[0-9.]*"), "perl"),
    (re.compile(r"ruby[0-9.]*"), "ruby"),
    (re.compile(r"node(?:js)?[0-9.]*"), "node"),
    (re.compile(r"php(?:-?cli)?[0-9.]*(?:-cli)?"), "php"),
    (re.compile(r"lua(?:jit)?[0-9.]*"), "lua"),
    (re.compile(r"tclsh[0-9.]*"), "tclsh"),
    (re.compile(r"(?:bash|zsh|ksh)[0-9.]+"), "sh"),
)


def _interpreter(spec: _Interp) -> Callable[[_Call], None]:
    def handle(call: _Call) -> None:
        args = call.args
        i = 0
        interactive = uncertain = False
        result = "stdin"
        script: _Arg | None = None
        while i < len(args):
            a = args[i]
            t = a.text
            if a.procsub:
                call.fail("it would run a program from a process substitution, which cannot be inspected")
            if not call.certain(a) and not call.operand_like(a):
                call.fail(f"the option position holding {t!r} is only known at run time")
            if t == "-":
                break
            if t == "--" or not t.startswith("-"):
                if t == "--":
                    i += 1
                    if i >= len(args):
                        break
                if spec.operand_is_script:
                    script = args[i]
                    result = "script"
                    break
                i += 1
                continue
            step = 1
            if t.startswith("--"):
                key = t.split("=", 1)[0]
                if key in spec.inline:
                    result = "inline"
                elif key in spec.info:
                    result = "info"
                elif key in spec.script:
                    result = "script"
                    value = args[i + 1] if "=" not in t and i + 1 < len(args) else None
                    interactive = interactive or _script_from_session(call, a, t.partition("=")[2], value, "=" in t)
                elif key in spec.interactive:
                    interactive = True
                elif key in spec.values and "=" not in t:
                    step = 2
                elif not (key in spec.long_flags or key in spec.values or "=" in t):
                    uncertain = True
            else:
                for j in range(1, len(t)):
                    opt = "-" + t[j]
                    if opt in spec.inline:
                        result = "inline"
                    elif opt in spec.info:
                        result = "info"
                    elif opt in spec.script:
                        result = "script"
                        rest = t[j + 1 :]
                        value = args[i + 1] if not rest and i + 1 < len(args) else None
                        interactive = interactive or _script_from_session(call, a, rest, value, bool(rest))
                    elif opt in spec.values:
                        step = 2 if j + 1 == len(t) else 1  # the value is the next word or the rest of this one
                    elif t[j] in spec.attached:
                        pass
                    elif opt in spec.interactive:
                        interactive = True
                        continue
                    elif t[j] not in spec.flags:
                        uncertain = True
                    else:
                        continue
                    break
            if result != "stdin":
                break
            i += step
        if result == "info":
            return
        if script is not None:
            if script.procsub:
                call.fail("it would run a program from a process substitution, which cannot be inspected")
            if _may_read_session(call, script):
                interactive = True
        if result == "stdin" or interactive or (uncertain and result == "script"):
            call.program_from_stdin(posix=False)

    return handle


def _script_from_session(call: _Call, arg: _Arg, attached: str, value: _Arg | None, has_attached: bool) -> bool:
    """Whether the program file an option names (``psql -f -``, ``php -f /dev/stdin``, ``R --file=-``) is, or
    may be, the session's input: ``-``, a path to standard input, a value only known at run time, or none."""
    if has_attached:
        return attached == "-" or not call.known(arg) or arg.glob or arg.brace or _is_stdin_path(attached)
    if value is None:
        return True
    return value.text == "-" or _may_read_session(call, value)


def _h_sqlite(call: _Call) -> None:
    operands = [a for a in call.args if not (call.known(a) and a.text.startswith("-"))]
    if len(operands) >= 2:  # the second operand is SQL text given inline
        return
    if any(
        call.known(a) and a.text in ("-cmd", "-init", "-version", "-help", "--version", "--help") for a in call.args
    ):
        return
    call.program_from_stdin(posix=False)


_AWK_RUNS = re.compile(
    r"\bsystem\s*\(|\|\s*(?:getline\b|&)|\b(?:print|printf)\b[^;{}\n]*(?<!\|)\|(?!\|)"
    r"|@\s*[A-Za-z_]\w*\s*\("  # gawk's indirect call: @f(...) with f = "system"
)


def _runs_its_input(call: _Call, what: str) -> None:
    """``what`` (awk's system() or pipes, sed's e) runs text as commands: when that text can be the lines
    the program reads from the session's input or from another program, nothing can check it."""
    if call.env.appended or call.stdin.kind not in ("null", "file", "text"):
        call.fail(f"{what} would run text it reads from its input as commands, which cannot be inspected")


def _awk_begin_only(program: str) -> bool:
    """A program of one BEGIN block without getline: awk reads no input, so what system() runs is the
    program's own text (reported with the arguments, left to the rules). Unsure: False."""
    m = re.match(r"\s*BEGIN\s*\{", program)
    if m is None or "getline" in program:
        return False
    depth, i, quoted = 1, m.end(), False
    while i < len(program) and depth:
        c = program[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        i += 1
    return depth == 0 and not program[i:].strip()


def _sed_runs_commands(script: str) -> bool:
    """Whether a sed script has GNU sed's ``e`` command or an ``s///e`` flag (unsure: True)."""
    i, n = 0, len(script)

    def line_end(j: int) -> int:  # past the rest of the line (text, a file name or a label)
        end = script.find("\n", j)
        return n if end < 0 else end + 1

    def skip_delimited(j: int, delim: str, parts: int) -> int:
        for _ in range(parts):
            while j < n and script[j] != delim:
                j += 2 if script[j] == "\\" else 1
            if j >= n:
                raise ValueError
            j += 1
        return j

    try:
        while i < n:
            c = script[i]
            if c in " \t\n;{}!" or c.isdigit() or c in "$,~+":
                i += 1
                continue
            if c == "/":
                i = skip_delimited(i + 1, "/", 1)
                continue
            if c == "\\" and i + 1 < n:  # \cREGEXc
                i = skip_delimited(i + 2, script[i + 1], 1)
                continue
            if c == "#" or c in "aicrRwWbtT:v":  # the rest of the line is text, a file or a label
                i = line_end(i)
                continue
            if c == "e":
                return True
            if c == "s" and i + 1 < n:
                j = skip_delimited(i + 2, script[i + 1], 2)
                while j < n and script[j] in "gpiImMe0123456789":
                    if script[j] == "e":
                        return True
                    j += 1
                if j < n and script[j] == "w":  # the rest of the line is a file name
                    j = line_end(j)
                i = j
                continue
            if c == "y" and i + 1 < n:
                i = skip_delimited(i + 2, script[i + 1], 2)
                continue
            if c in "dDgGhHlnNpPqQxz=F":
                i += 1
                continue
            return True  # not a command we know: unsure
    except ValueError:
        return True
    return False


def _h_awk(call: _Call) -> None:
    spec = _Opts(
        flags="bcCdDgMNOPrStVhkz",
        valued="FvfEieLlo",
        long_flags=_words(
            "--characters-as-bytes --traditional --copyright --debug --gen-pot --bignum"
            " --use-lc-numeric --non-decimal-data --optimize --posix --re-interval --sandbox --lint"
            " --version --help"
        ),
        long_valued=_fs("--field-separator", "--assign", "--file", "--exec", "--source", "--include", "--load"),
        long_optional=_fs("--dump-variables", "--profile", "--pretty-print"),
    )
    opts, index = _getopt(call, spec)
    programs = [o.value or "" for o in opts if o.name in ("-e", "--source")]
    for o in opts:
        if o.name in ("-l", "--load"):
            call.fail("-l loads a shared library")
        if o.name in ("-f", "-E", "--file", "--exec") and (not o.value_known or _is_stdin_path(o.value or "")):
            call.program_from_stdin(posix=False)
    if not any(o.name in ("-f", "-E", "--file", "--exec", "-e", "--source") for o in opts) and index < len(call.args):
        programs.append(call.args[index].text)
    if any(_AWK_RUNS.search(text) and not _awk_begin_only(text) for text in programs):
        _runs_its_input(call, "awk's system() or pipes")


def _h_sed(call: _Call) -> None:
    scripts: list[str] = []
    explicit = False
    for i, a in enumerate(call.args):
        t = a.text
        if t in ("-e", "--expression") and i + 1 < len(call.args):
            scripts.append(call.args[i + 1].text)
            explicit = True
        elif t.startswith("--expression="):
            scripts.append(t[13:])
            explicit = True
        elif re.fullmatch(r"-[nErsuz]*e.*", t):
            scripts.append(t.split("e", 1)[1] or (call.args[i + 1].text if i + 1 < len(call.args) else ""))
            explicit = True
        value: str | None = None
        if t in ("-f", "--file") and i + 1 < len(call.args):
            value = call.args[i + 1].text
        elif t.startswith("--file="):
            value = t[7:]
        elif re.fullmatch(r"-[a-zA-Z]*f.*", t) and not t.startswith("--"):
            value = t.split("f", 1)[1] or (call.args[i + 1].text if i + 1 < len(call.args) else None)
        if value is not None:
            explicit = True
            if _is_stdin_path(value):
                call.program_from_stdin(posix=False)
    if not explicit:
        # the first operand, past the options and the values of -l N / --line-length N
        args = [a.text for a in call.args]
        i = 0
        while i < len(args):
            t = args[i]
            if t == "--":
                scripts.extend(args[i + 1 : i + 2])
                break
            if t == "-" or not t.startswith("-"):
                scripts.append(t)
                break
            if t == "--line-length" or (not t.startswith("--") and t.endswith("l") and "l" not in t[1:-1]):
                i += 1  # its value is the next word
            i += 1
    if call.env.appended and not (scripts and _final_dashes_end_options("sed", call.args)):
        call.fail(
            "xargs would append words only known at run time, which could be a script or options; give the script "
            "and end the arguments with -- so that they can only be file names"
        )
    if any(_sed_runs_commands(script) for script in scripts):
        _runs_its_input(call, "sed's e command")


def _h_source(call: _Call) -> None:
    call.ctx.taint_all = True  # the file may set any variable
    args = call.args
    if args and args[0].literal and args[0].text == "--":
        args = args[1:]
    if not args:
        return
    script = args[0]
    if script.procsub:
        call.fail("it would run a program from a process substitution, which cannot be inspected")
    if _may_read_session(call, script):
        call.program_from_stdin(posix=True)


def _h_command_reader(call: _Call) -> None:
    """Programs that take commands (able to start a shell) from the terminal or their input."""
    if call.ctx.interactive:
        call.fail("it takes commands typed at the terminal, which cannot be inspected")
    inline = _READER_INLINE.get(_READER_FAMILY.get(call.name, call.name))
    if inline is not None:
        for _, a in call.option_words():
            if inline.fullmatch(a.text):
                call.fail(f"{a.text!r} gives it a command to run, which can run a shell command")
    if call.name in ("sftp",):
        for i, a in enumerate(call.args):
            if a.text == "-b" and i + 1 < len(call.args):
                if _is_stdin_path(call.args[i + 1].text):
                    call.program_from_stdin(posix=False)
                return
            if a.text.startswith("-b") and len(a.text) > 2:
                if _is_stdin_path(a.text[2:]):
                    call.program_from_stdin(posix=False)
                return
    if call.name in ("tmux", "screen"):
        # `tmux new -d 'cmd'`, `screen -dm cmd`, `tmux send-keys`: commands given as arguments; only asking
        # what runs is left
        words = [a.text for a in call.args]
        if words and words not in (["ls"], ["list-sessions"], ["-V"], ["-ls"], ["-list"], ["-v"]):
            call.fail(
                "it runs the commands given in its arguments (new sessions, windows, keys), which are not analysed"
            )
        return
    if call.name == "script":
        return
    call.program_from_stdin(posix=False)


def _h_split(call: _Call) -> None:
    for a in call.args:
        key = a.text.split("=", 1)[0]
        if len(key) > 3 and "--filter".startswith(key):
            call.fail("--filter runs a shell command for each piece")


_PERF_RUNS = _words("stat record trace kvm sched lock mem c2c kmem ftrace script timechart kwork daemon test bench")


def _h_perf(call: _Call) -> None:
    if any(not call.certain(a) for a in call.args):
        call.fail("its subcommand or options are only known at run time")
    sub = next((a.text for a in call.args if not a.text.startswith("-")), "")
    if sub in _PERF_RUNS:
        call.fail(f"perf {sub} runs the command given after it (or scripts), which is not analysed here")


# Programs that run a program named in their arguments with option syntaxes not modelled here: refused
# rather than taken for programs whose arguments are data.
_UNMODELLED_RUNNERS = (
    *("valgrind", "xvfb-run", "dbus-run-session", "dbus-launch", "firejail", "bwrap", "proot", "faketime"),
    *("proxychains", "proxychains4", "torsocks", "sshpass", "daemonize", "chpst", "softlimit", "setuidgid"),
    *("envdir", "envuidgid", "cgexec", "start-stop-daemon", "systemd-cat", "systemd-inhibit", "nq", "entr"),
    *("lckdo", "chronic", "ifne", "expect", "run-parts", "tcpsvd", "tcpserver", "pee", "mispipe", "dtach"),
    *("abduco", "sg", "newgrp", "gdbserver", "ltrace64", "catchsegv.sh", "cpulimit", "trickle", "ionice.sh"),
    *("gosu", "su-exec", "mpirun", "mpiexec", "srun", "systemd-nspawn", "lxc-attach", "lxc-execute", "toolbox"),
    *("distrobox-enter", "nocache", "capsh", "run0", "schroot", "dchroot", "lxc-unshare"),
)


def _h_ip(call: _Call) -> None:
    """``ip netns exec NS CMD`` and ``ip vrf exec VRF CMD`` run CMD; ``ip -batch FILE`` runs ip commands from a
    file (``-`` is the session's input), which may be those."""
    words = [a.text for a in call.args]
    if any(not call.certain(a) for a in call.args):
        call.fail("its subcommand or options are only known at run time")
    if "exec" in words:  # `ip [OPTIONS] netns exec` (objects and options may be abbreviated): refused wherever
        call.fail("ip netns/vrf exec runs the command given after it, which is not analysed here")
    for word in words:
        if not word.startswith("-"):
            return
        option = word.lstrip("-")
        if option and "batch".startswith(option.split("=")[0]) and option[0] == "b":
            call.fail("ip -batch runs ip commands (such as netns exec) from a file, which cannot be inspected")


_M4_VALUES = frozenset(("-D", "-U", "-I", "-d", "-l", "-o", "-t", "-F", "-R", "--define", "--undefine",
                        "--include", "--debugfile", "--arglength", "--error-output", "--trace",
                        "--freeze-state", "--reload-state"))  # fmt: skip


def _h_m4(call: _Call) -> None:
    """m4 runs ``syscmd``/``esyscmd`` of the text it reads: without an input file, that is the session's input."""
    operands: list[_Arg] = []
    skip = False
    for a in call.args:
        if skip:
            skip = False
        elif not call.certain(a):
            call.fail("its options are only known at run time")
        elif a.text.startswith("-") and a.text != "-":
            skip = a.text in _M4_VALUES  # the value is the next word
        else:
            operands.append(a)
    if any(a.text == "-" or _may_read_session(call, a) for a in operands):
        call.program_from_stdin(posix=False)
    elif not operands and not any(call.known(a) and a.text in ("--help", "--version") for a in call.args):
        call.program_from_stdin(posix=False)


def _h_cmake(call: _Call) -> None:
    """``cmake -P FILE`` runs a CMake script (``execute_process`` runs programs): one that is the session's input
    is a program no rule sees (a script on disk is like ``sh script.sh``)."""
    args = call.args
    for i, a in enumerate(args):
        if not call.certain(a):
            call.fail("its options are only known at run time")
        if a.text == "-P" and (i + 1 >= len(args) or args[i + 1].text == "-" or _may_read_session(call, args[i + 1])):
            call.program_from_stdin(posix=False)


def _h_make(call: _Call) -> None:
    """make runs the recipes of its makefile as shell commands: one read from the session's input, or given
    inline with ``--eval``, is a program no rule sees (a makefile on disk is like ``sh script.sh``)."""
    args = call.args
    for i, a in enumerate(args):
        if not call.certain(a):
            call.fail("its options are only known at run time")
        t = a.text
        if t == "--":
            return
        key, eq, value = t.partition("=")
        if key in ("--eval", "-E") or (t.startswith("-E") and not t.startswith("--")):
            call.fail("make --eval runs make code given inline, whose recipes are shell commands")
        if key in ("--file", "--makefile") or (len(key) >= 3 and "--makefile".startswith(key) and key != "--"):
            target = value if eq else (args[i + 1].text if i + 1 < len(args) else "-")
        elif t.startswith("-f") and not t.startswith("--"):
            target = t[2:] or (args[i + 1].text if i + 1 < len(args) else "-")
        else:
            continue
        if target == "-" or _is_stdin_path(target):
            call.program_from_stdin(posix=False)


def _h_pager(call: _Call) -> None:
    if call.ctx.interactive:
        call.fail("it takes commands typed at the terminal (such as '!cmd'), which cannot be inspected")
    for a in call.args:
        if a.text.startswith("+") and any(c in a.text for c in "!|"):
            call.fail(f"the startup command {a.text!r} runs a shell command")


_STTY_QUERIES = frozenset({"-a", "--all", "-g", "--save", "size", "speed"})


def _h_stty(call: _Call) -> None:
    """stty may print settings, not change them: a line shell's terminal on the target has fixed settings
    (no erase, kill or extra end-of-line character), and ``stty kill @`` there (or ``-F`` on another
    channel's terminal) would make it edit a checked line: ``echo x@rm -rf /`` reaching bash as
    ``rm -rf /``."""
    if call.env.appended:
        call.fail("xargs would append settings, which may change how the target's terminal edits the lines it reads")
    for a in call.args:
        if not (call.known(a) and a.text in _STTY_QUERIES):
            call.fail(
                f"{a.text!r} may change how the target's terminal edits the lines it reads "
                "(only stty -a, -g, size and speed are allowed)"
            )


def _h_tset(call: _Call) -> None:
    """tset and reset set the erase, kill and interrupt characters with -e, -k and -i (see _h_stty)."""
    if call.env.appended:
        call.fail("xargs would append options, which may change how the target's terminal edits the lines it reads")
    for a in call.args:
        if not (call.known(a) and re.fullmatch(r"-[IQVcqrsw]+", a.text)):
            call.fail(
                f"{a.text!r} may change how the target's terminal edits the lines it reads "
                "(only -I, -Q, -V, -c, -q, -r, -s and -w are allowed)"
            )


def _h_script(call: _Call) -> None:
    spec = _Opts(
        flags="aefqhV",
        valued="cEIOBTm",
        optional="t",
        long_flags=_fs("--append", "--return", "--flush", "--force", "--quiet") | _HELP,
        long_valued=_fs("--command", "--echo", "--log-in", "--log-out", "--log-io", "--log-timing", "--logging-format"),
        long_optional=_fs("--timing"),
    )
    opts, _ = _getopt(call, spec)
    if {o.name for o in opts} & (_HELP | {"-h", "-V"}):
        return
    for o in opts:
        if o.name in ("-c", "--command"):
            if not o.value_known or o.value is None:
                call.fail("the command string is only known at run time")
            call.nested(o.value, "script")
            return
    if call.ctx.interactive:
        call.fail("it starts a shell reading the terminal, which cannot be inspected")
    call.program_from_stdin(posix=True, via="script")


def _h_at(call: _Call) -> None:
    spec = _Opts(flags="mMvVlrdcbKh", valued="qftT", long_flags=_HELP)
    opts, _ = _getopt(call, spec)
    names = {o.name for o in opts}
    if names & {"-l", "-r", "-d", "-c", "-V", "-h", "--help", "--version"} or "-f" in names:
        return
    call.program_from_stdin(posix=True, via="at")


def _h_crontab(call: _Call) -> None:
    opts, i = _getopt(call, _Opts(flags="lreisThV", valued="uc", long_flags=_HELP))
    names = {o.name for o in opts}
    if names & {"-l", "-r", "-T", "-h", "-V", "--help", "--version"}:
        return
    operands = call.args[i:]
    if "-e" in names or not operands or (call.known(operands[0]) and _is_stdin_path(operands[0].text)):
        if call.stdin.kind in ("null", "file") and not call.env.appended:
            return
        call.fail("crontab entries read from its input or an editor cannot be inspected")


# --------------------------------------------------------------------------------------------------
# Builtins that evaluate text or take variable names
# --------------------------------------------------------------------------------------------------


def _h_eval(call: _Call) -> None:
    args = call.args
    if args and call.known(args[0]) and args[0].text == "--":
        args = args[1:]  # bash's eval ends its (empty) option list at --
    text = " ".join(call.code(a, "the evaluated text") for a in args)
    if text.strip():
        call.nested(text, "eval")


def _h_trap(call: _Call) -> None:
    args = call.args
    if args and call.known(args[0]) and args[0].text == "--":
        args = args[1:]
    if len(args) < 2:
        return  # list, print or reset
    if call.known(args[0]) and args[0].text in ("-", "-l", "-p", "-P"):
        return
    if call.ctx.line:
        for spec in args[1:]:
            if not call.known(spec) or spec.text.upper() in ("DEBUG", "SIGDEBUG"):
                call.fail("a DEBUG trap would run before the commands of the line shell's prompt, and could skip them")
    text = call.code(args[0], "the trap command")
    if text.strip():
        call.nested(text, "trap")


def _h_declare(call: _Call) -> None:
    flags: set[str] = set()
    for a in call.args:
        t = a.text
        if a.literal and t[:1] in ("-", "+"):
            if t not in ("--", "-"):
                flags.update(t[1:])
            continue
        if flags & {"f", "F"}:
            continue  # function names
        if "n" in flags and call.name != "export":
            call.fail("name references (-n) are not supported: they hide which variable is assigned")
        split = _split_assignment(a.word) if a.word is not None else None
        if split is None:
            if not a.literal:
                call.fail(f"cannot tell which variable {t!r} names")
            call.ctx.variable_name(t, call.name, assign=False)
            if "i" in flags:
                call.ctx.int_vars.add(t)
            if flags & {"a", "A"}:
                call.ctx.arrays.add(t)
            continue
        name, value = split
        name = name.removesuffix("+")
        value_word = _word_of(value)
        if "i" in flags:
            call.ctx.int_vars.add(name)
        call.ctx.variable_name(name, call.name, assign=True, int_safe=_int_safe_value(value), value=value_word)
        # `declare -a x='([$(cmd)]=1)'` (or "$y" holding that, or any value for a name that is already an
        # array) is a compound assignment: bash expands its subscripts and values, running $(cmd).
        array = bool(flags & {"a", "A"}) or name in call.ctx.arrays or name in _BASH_ARRAYS or call.ctx.taint_all
        first = next((seg for seg in value if not (seg.kind == _LIT and seg.text == "")), None)
        if array and first is not None and (first.kind != _LIT or first.text.startswith("(")):
            call.fail(
                f"the value given to the array {name} may start with '(': bash would read it as a compound "
                "assignment and expand what is inside, running any $(...) there"
            )
        if flags & {"a", "A"}:
            call.ctx.arrays.add(name)


def _h_set(call: _Call) -> None:
    args = call.args
    for i, a in enumerate(args):
        t = a.text
        if not call.known(a):
            call.fail(f"{t!r} could be an option such as -k; use 'set -- ...' for positional parameters")
        if t in ("--", "-"):
            return
        following = args[i + 1].text if i + 1 < len(args) else ""
        if t.startswith("-") and not t.startswith("--"):
            _check_shell_option_cluster(call, t, following)
        if t.startswith("+") and call.ctx.line and ("m" in t[1:] or (t.endswith("o") and following == "monitor")):
            call.fail(_JOB_CONTROL_OFF)


# -o options that change how commands are read: keyword assignments, history expansion, and line editing
# (emacs, vi: readline in a line shell started with --noediting would apply key bindings, macros and
# completion to a line after the gateway checked it).
_READING_OPTIONS = frozenset({"keyword", "histexpand", "history", "emacs", "vi"})


def _check_shell_option_cluster(call: _Call, cluster: str, following: str) -> None:
    """-k puts later NAME=value arguments in the environment; -H/history enable history expansion."""
    if "k" in cluster[1:] or "H" in cluster[1:]:
        call.fail(f"option {cluster} changes how commands are read (keyword assignments or history)")
    if cluster.endswith("o") and following in _READING_OPTIONS:
        call.fail(f"-o {following} changes how commands are read")


def _h_shopt(call: _Call) -> None:
    """``shopt -s -o NAME`` sets the options of ``set -o``: the same ones are refused."""
    flags = ""
    names: list[str] = []
    for a in call.args:
        t = a.text
        if not call.known(a):
            call.fail(f"{t!r} could be an option of set -o that changes how commands are read")
        if t.startswith("-") and not names:
            flags += t[1:]
        else:
            names.append(t)
    for name in names:
        if "o" in flags and "s" in flags and name in _READING_OPTIONS:
            call.fail(f"-o {name} changes how commands are read")
        if "o" in flags and "u" in flags and name == "monitor" and call.ctx.line:
            call.fail(_JOB_CONTROL_OFF)


def _h_unset(call: _Call) -> None:
    functions = False
    for a in call.args:
        t = a.text
        if a.literal and t.startswith("-") and len(t) > 1:
            functions = functions or "f" in t
            continue
        if functions:
            continue
        call.ctx.variable_name(t if a.literal else None, "unset", assign=False)
        if call.ctx.line and t in _LINE_SHELL_VARS:
            call.fail(f"the line shell's prompt needs {t}")


def _h_read(call: _Call) -> None:
    opts, i = _getopt(call, _Opts(flags="ers", valued="adinNptu"))
    for o in opts:
        if o.name == "-a":
            call.ctx.variable_name(o.value if o.value_known else None, "read -a", assign=True)
            call.ctx.arrays.add(o.value or "")
    for a in call.args[i:]:
        call.ctx.variable_name(a.text if call.known(a) else None, "read", assign=True)


def _h_mapfile(call: _Call) -> None:
    opts, i = _getopt(call, _Opts(flags="t", valued="dnOsuCc"))
    if any(o.name == "-C" for o in opts):
        call.fail("-C evaluates a callback as shell code")
    for a in call.args[i : i + 1]:
        call.ctx.variable_name(a.text if call.known(a) else None, call.name, assign=True)
        call.ctx.arrays.add(a.text)


def _h_printf(call: _Call) -> None:
    args = call.args
    if args and call.known(args[0]) and args[0].text.startswith("-v"):
        name = args[0].text[2:] or (args[1].text if len(args) > 1 and call.known(args[1]) else None)
        call.ctx.variable_name(name, "printf -v", assign=True)


def _h_getopts(call: _Call) -> None:
    if len(call.args) >= 2:
        call.ctx.variable_name(call.args[1].text if call.known(call.args[1]) else None, "getopts", assign=True)


def _h_test(call: _Call) -> None:
    args = call.args
    for i, a in enumerate(args[:-1]):
        if a.literal and a.text == "-v":
            target = args[i + 1]
            call.ctx.variable_name(target.text if call.known(target) else None, f"{call.name} -v", assign=False)


def _h_let(call: _Call) -> None:
    for a in call.args:
        if a.word is None or call.placeholder(a):
            call.fail("its expression is only known at run time")
        call.ctx.arith_word(a.word, "let")


def _h_enable(call: _Call) -> None:
    _refuse_options("f", "enable -f loads code into the shell")(call)
    if call.ctx.line and any(a.text.startswith("-") and "n" in a.text for a in call.args):
        call.fail("disabling builtins could disable the one that the line shell's prompt relies on")


def _h_strace(call: _Call) -> None:
    """strace -o '|CMD' (or '!CMD') pipes its trace into CMD, run by a shell."""
    opts, _ = _getopt(call, _WRAPPERS["strace"].opts)
    for o in opts:
        if o.name in ("-o", "--output"):
            if not o.value_known or o.value is None:
                call.fail("the output of -o is only known at run time; '|CMD' there runs CMD")
            if o.value.startswith(("|", "!")):
                call.nested(o.value[1:], "strace -o", stdin=_PIPE)
    _wrapper(_WRAPPERS["strace"])(call)


def _h_setsid(call: _Call) -> None:
    opts, _ = _getopt(call, _Opts(flags="cfwhV", long_flags=_fs("--ctty", "--fork", "--wait") | _HELP))
    names = {o.name for o in opts}
    if call.ctx.line and not names & {"-w", "--wait", "--help", "--version", "-h", "-V"}:
        call.fail(
            "without -w, the program runs on in a session of its own, where it could read the line shell's "
            "terminal beside the shell and take part of the next line"
        )
    _wrapper(_WRAPPERS["setsid"])(call)


def _h_exec(call: _Call) -> None:
    """``exec`` without a program keeps its redirections for the shell itself: in a line shell, one of its
    input would make the shell read its next commands from there instead of the checked lines."""
    _, i = _getopt(call, _Opts(flags="cl", valued="a"))
    if call.ctx.line and i >= len(call.args) and any(_moves_stdin(r.op) for r in call.redirects):
        call.fail("it would make the line shell read its commands from somewhere else than the checked lines")
    _wrapper(_WRAPPERS["exec"])(call)


def _h_wait(call: _Call) -> None:
    opts, _ = _getopt(call, _Opts(flags="nf", valued="p"))
    for o in opts:
        call.ctx.variable_name(o.value if o.value_known else None, "wait -p", assign=True, int_safe=True)


def _refuse(reason: str) -> Callable[[_Call], None]:
    def handle(call: _Call) -> None:
        call.fail(reason)

    return handle


def _refuse_options(letters: str, reason: str, *, defining: bool = False) -> Callable[[_Call], None]:
    def handle(call: _Call) -> None:
        for a in call.args:
            if not call.known(a):
                call.fail(f"{a.text!r} is only known at run time")
            t = a.text
            if t.startswith("-") and not t.startswith("--") and any(c in letters for c in t[1:]):
                call.fail(reason)
            if defining and "=" in t:
                call.fail(reason)

    return handle


# --------------------------------------------------------------------------------------------------
# Programs with options that run commands
# --------------------------------------------------------------------------------------------------

_SSH_OPTS = _Opts(flags="46AaCfGgKkMNnqsTtVvXxYy", valued="BbcDEeFIiJLlmOopQRSWw")
_SSH_COMMAND_KEYS = frozenset({"proxycommand", "localcommand", "knownhostscommand"})


def _ssh_config_option(call: _Call, opt: _Opt) -> str | None:
    """Check one ``-o`` option; return the remote command it sets, if any."""
    if not opt.value_known or opt.value is None:
        call.fail("an -o option is only known at run time")
    m = re.match(r"\s*([A-Za-z0-9]+)\s*(?:=\s*|\s+)(.*)", opt.value, re.S)
    key, value = (m.group(1).lower(), m.group(2).strip()) if m else (opt.value.strip().lower(), "")
    if key in ("match", "include", "host"):
        call.fail(f"-o {key} is not supported")
    if key in ("pkcs11provider", "securitykeyprovider") and value.lower() not in ("none", "internal", ""):
        call.fail(f"-o {key} loads a library into {call.name}, which runs its code")
    if key in _SSH_COMMAND_KEYS and value.lower() != "none":
        call.nested(value, f"{call.name} -o {key}", stdin=_UNKNOWN)
    if key in ("setenv", "sendenv"):
        for item in value.split():
            name = item.split("=", 1)[0]
            if _dangerous_var(name) or "*" in name:
                call.fail(f"-o {key} {name} can change which program runs on the remote host")
    if key == "remotecommand" and value.lower() != "none":
        return value
    return None


def _ssh_files(call: _Call, opts: list[_Opt]) -> None:
    """-I loads a PKCS#11 library (its code runs in ssh); -F reads a configuration, which names commands
    (ProxyCommand): one that is the session's input is a program nobody sees."""
    for o in opts:
        if o.name == "-I":
            call.fail("-I loads a PKCS#11 library, whose code runs in ssh")
        if o.name == "-F" and (not o.value_known or _is_stdin_path(o.value or "")):
            call.program_from_stdin(posix=False)


def _h_ssh(call: _Call) -> None:
    opts, i = _getopt(call, _SSH_OPTS)
    args = call.args
    _ssh_files(call, opts)
    if i >= len(args):
        # usage, -V, -G without a destination... or a transport (rsync -e, git's GIT_SSH) that adds the
        # host later: the -o options (ProxyCommand, LocalCommand) run all the same
        for o in opts:
            if o.name == "-o":
                _ssh_config_option(call, o)
        return
    more, j = _getopt(call, _SSH_OPTS, i + 1)  # OpenSSH reads options after the destination too
    _ssh_files(call, more)
    opts += more
    names = {o.name for o in opts}
    remote: str | None = None
    for o in opts:
        if o.name == "-o":
            remote = _ssh_config_option(call, o) or remote
    if names & {"-N", "-W", "-O", "-G", "-V", "-Q", "-s"}:
        return
    command = args[j:]
    stdin = _NULL if names & {"-n", "-f"} else call.stdin
    if command:
        call.nested(" ".join(call.code(a, "the remote command") for a in command), "ssh", stdin=stdin)
        return
    if remote is not None:
        call.nested(remote, "ssh", stdin=stdin)
        return
    if call.env.transport or names & {"-n", "-f"}:
        return
    call.program_from_stdin(posix=True, via="ssh")


def _h_scp(call: _Call) -> None:
    if call.name == "scp":
        spec = _Opts(flags="346ABCOpqRrTv", valued="cDFiJlPSoX")
    else:
        spec = _Opts(flags="46aCfNpqrv", valued="BbcDFiJlPRSos")
    opts, _ = _permute(call, spec)
    _ssh_files(call, opts)
    for o in opts:
        if o.name == "-o":
            _ssh_config_option(call, o)
        elif o.name == "-S" or (o.name == "-D" and call.name == "sftp"):
            if not o.value_known or not o.value:
                call.fail(f"the program given to {o.name} is only known at run time")
            call.run([_Arg.plain(o.value)], f"{call.name} {o.name}", transport=True)
        elif o.name == "-b" and call.name == "sftp":
            if not o.value_known or _is_stdin_path(o.value or ""):
                call.program_from_stdin(posix=False)
            return
    if call.name == "sftp":
        _h_command_reader(call)


_RSYNC_PATTERNS = frozenset({"--exclude", "--include"})
"""rsync's options whose value is only a pattern (see :meth:`_Call.pattern_value`)."""


def _h_rsync(call: _Call) -> None:
    args = call.args
    if any(call.known(a) and a.text == "--daemon" for a in args):
        # A daemon (also `--server --daemon`, run over a remote shell) runs the `pre-xfer exec`, `post-xfer exec`
        # and `early exec` commands of its configuration: a file named by --config, or items set with --dparam.
        for a in args:
            t = a.text
            if not call.known(a):
                call.fail(f"{t!r} is only known at run time and could be --config or --dparam")
            if t.startswith(("--config", "--dparam")) or re.match(r"-[0-9A-Za-z]*M", t):
                call.fail("a daemon's --config file or --dparam items can name commands it runs")
    # The far end of a copy (`rsync -e ssh src host:dst` runs `rsync --server -logDtpre.iLsfxCIvu . dst`
    # there): a server starts no remote shell, and its -e carries protocol flags, not a command. Not so
    # in daemon mode (--daemon, whose --config may name programs to run), nor for words known at run time.
    if (
        args
        and all(call.certain(a) for a in args)
        and args[0].text == "--server"
        and not any(a.text.startswith(("--da", "--co")) for a in args)
    ):
        return
    i = 0
    while i < len(args):
        a = args[i]
        t = a.text
        if not call.certain(a):
            if call.operand_like(a) or call.pattern_value(a, _RSYNC_PATTERNS):
                i += 1
                continue
            call.fail(f"the option position holding {t!r} is only known at run time")
        if t == "--":
            break
        value: str | None = None
        option = ""
        step = 1
        if t.startswith("--"):
            key, eq, rest = t.partition("=")
            for full in ("--rsh", "--rsync-path"):
                if len(key) > 4 and full.startswith(key):
                    option = full
                    if eq:
                        value = rest
                    elif i + 1 < len(args):
                        value = call.code(args[i + 1], f"the value of {full}")
                        step = 2
        elif t.startswith("-") and len(t) > 1:
            for j in range(1, len(t)):
                if t[j] in "BfMT@":
                    if j + 1 == len(t):
                        step = 2
                    break
                if t[j] == "e":
                    option = "-e"
                    if j + 1 < len(t):
                        value = t[j + 1 :]
                    elif i + 1 < len(args):
                        value = call.code(args[i + 1], "the value of -e")
                        step = 2
                    break
        if option and value is None:
            call.fail(f"{option} needs a value")
        if option == "-e" or option == "--rsh":
            call.nested(value or "", "rsync -e", stdin=_UNKNOWN, transport=True)
        elif option == "--rsync-path":
            call.nested(value or "", "rsync --rsync-path", stdin=_UNKNOWN, transport=True)
        i += step


_TAR_DANGEROUS = (
    "--to-command",
    "--checkpoint-action",
    "--use-compress-program",
    "--rsh-command",
    "--rmt-command",
    "--info-script",
    "--new-volume-script",
)


def _remote_archive(text: str) -> bool:
    """``[user@]host:file``, which GNU tar and cpio reach by starting a remote shell (``rsh host /usr/sbin/rmt``):
    a colon after the first character with no ``/`` before it."""
    colon = text.find(":")
    return colon > 0 and "/" not in text[:colon]


def _refuse_remote_archive(call: _Call, values: list[_Arg]) -> None:
    if any(a.text.startswith("--forc") and "--force-local".startswith(a.text) for a in call.args):
        return
    for a in values:
        if _remote_archive(a.text):
            call.fail(
                f"the archive {a.text!r} names another host, which {call.name} reaches by starting a remote shell; "
                "copy the file with scp or rsync instead, or add --force-local if it is a local file"
            )


_TAR_VALUED = "bCfFgHIKLNTVX"  # short options of GNU tar that take a value


def _tar_archives(call: _Call) -> list[_Arg]:
    """The archive names given to tar (``-f NAME``, ``-fNAME``, ``cvf NAME``, ``--file=NAME``)."""
    args, found, i = call.args, [], 0
    if args and call.known(args[0]) and re.fullmatch(r"[A-Za-z0-9]+", args[0].text):
        letters = [c for c in args[0].text if c in _TAR_VALUED]  # old style: each letter's value, in order
        found += [args[1 + k] for k, c in enumerate(letters) if c == "f" and 1 + k < len(args)]
        i = 1 + len(letters)
    while i < len(args):
        t = args[i].text
        if t == "--" and args[i].literal:
            break
        if t == "--file" and i + 1 < len(args):
            found.append(args[i + 1])
            i += 1
        elif t.startswith("--file="):
            found.append(replace(args[i], text=t[len("--file=") :]))
        elif re.match(r"-[A-Za-z0-9]", t):
            for j in range(1, len(t)):
                if t[j] in _TAR_VALUED:
                    if j + 1 < len(t):
                        if t[j] == "f":
                            found.append(replace(args[i], text=t[j + 1 :]))
                    elif i + 1 < len(args):
                        if t[j] == "f":
                            found.append(args[i + 1])
                        i += 1
                    break
        i += 1
    return found


_TAR_PATTERNS = frozenset({"--exclude"})
"""tar's options whose value is only a pattern (see :meth:`_Call.pattern_value`)."""


def _h_tar(call: _Call) -> None:
    for index, a in enumerate(call.args):
        if not call.certain(a):
            if call.operand_like(a) or call.pattern_value(a, _TAR_PATTERNS):
                continue
            call.fail(f"the option position holding {a.text!r} is only known at run time")
        t = a.text
        if t.startswith("--"):
            key = t.split("=", 1)[0]
            if len(key) > 3 and key != "--checkpoint" and any(d.startswith(key) for d in _TAR_DANGEROUS):
                call.fail(f"option {key} runs a command")
        elif (t.startswith("-") or index == 0) and re.fullmatch(r"-?[A-Za-z0-9]+", t) and any(c in t for c in "IF"):
            call.fail(f"option cluster {t!r} includes -I or -F, which run a command")
    _refuse_remote_archive(call, _tar_archives(call))


_CPIO = _Opts(
    flags="iopt0aAbBcdfLlmnrsSuvV",
    valued="CDEFHIMORW",
    long_flags=_words(
        "--absolute-filenames --append --create --dereference --device-independent --dot --extract --force-local"
        " --ignore-devno --link --list --make-directories --no-absolute-filenames --no-preserve-owner --nonmatching"
        " --null --numeric-uid-gid --only-verify-crc --pass-through --preserve-modification-time --quiet --rename"
        " --renumber-inodes --reproducible --reset-access-time --sparse --swap --swap-bytes --swap-halfwords"
        " --to-stdout --unconditional --verbose"
    )
    | _HELP,
    long_valued=_words(
        "--block-size --directory --file --format --io-size --message --owner --pattern-file --rsh-command --warning"
    ),
)


def _h_cpio(call: _Call) -> None:
    opts, _ = _permute(call, _CPIO)
    if any(o.name == "--rsh-command" for o in opts):
        call.fail("--rsh-command names the command it runs to reach a remote archive")
    _refuse_remote_archive(
        call, [_Arg(o.value or "", o.value_known, True, "") for o in opts if o.name in ("-F", "--file", "-I", "-O")]
    )


_GIT_DANGEROUS_KEY = re.compile(
    r"(?:alias|credential|filter|diff|merge|pager|gpg|uploadpack|receivepack|sendemail|protocol|remote|url"
    r"|include|includeif|http|ssh|interactive|instaweb|browser|web|man|difftool|mergetool|submodule|sequence"
    r"|init|trailer|uploadarchive|tar|hook)\.|core\.(?:sshcommand|pager|editor|fsmonitor|hookspath|gitproxy"
    r"|askpass|attributesfile|worktree|alternaterefscommand)",
    re.IGNORECASE,
)
_GIT_DANGEROUS_SUB = {
    "rebase": ("-x", "--exec", "-i", "--interactive"),
    "bisect": ("run",),
    "submodule": ("foreach",),
    "filter-branch": ("",),
    "difftool": ("-x", "--extcmd", "-t", "--tool"),
    "mergetool": ("",),
    "grep": ("-O", "--open-files-in-pager"),
    "clone": ("-u", "--upload-pack", "--template", "-c", "--config"),
    "fetch": ("--upload-pack",),
    "pull": ("--upload-pack",),
    "ls-remote": ("--upload-pack",),
    "push": ("--receive-pack", "--exec"),
    "archive": ("--exec",),
    "send-pack": ("--receive-pack", "--exec"),
    "fetch-pack": ("--upload-pack", "--exec"),
    "instaweb": ("",),
    "daemon": ("--access-hook",),
    "send-email": ("--sendmail-cmd", "--to-cmd", "--cc-cmd", "--header-cmd"),
}


_GIT_MESSAGE = re.compile(r"--(?:message|file|reuse-message|fixup|no-edit)(?:=.*)?|-[a-zA-Z]*[mFC].*", re.S)
_GIT_EDIT = re.compile(r"--(?:edit|reedit-message)(?:=.*)?|-[a-zA-Z]*[ec].*", re.S)
_GIT_VALUED = re.compile(
    r"-[a-zA-Z]*[mFCctu]|--(?:message|file|reuse-message|reedit-message|author|date|cleanup|trailer)"
)


# Options that start an editor on a file (git add -e, git config -e) or a prompt reading the input whose `e` answer
# starts one (git add -p, git checkout -p, git am -i): short letters (alone or in a group) and long options.
_GIT_EDITING = {
    "add": ("epi", ("--edit", "--patch", "--interactive")),
    "checkout": ("p", ("--patch",)),
    "reset": ("p", ("--patch",)),
    "restore": ("p", ("--patch",)),
    "stash": ("p", ("--patch",)),
    "commit": ("p", ("--patch", "--interactive")),
    "config": ("e", ("--edit",)),
    "branch": ("", ("--edit-description",)),
    "am": ("i", ("--interactive",)),
}

# Their options that take the next word as their value
_GIT_EDITING_VALUED = {
    "commit": re.compile(r"-[a-zA-Z]*[mFCct]|--(?:message|file|reuse-message|reedit-message|template|author|date)"),
    "checkout": re.compile(r"-[a-zA-Z]*[bB]|--orphan"),
}


def _git_edits(call: _Call, sub: str, rest: Sequence[_Arg]) -> bool:
    """Whether git would start an editor, or a prompt that starts one, through one of :data:`_GIT_EDITING`'s options
    (or ``git config edit``); a word only known at run time could be one, unless it is a variable of the target's."""
    letters, longs = _GIT_EDITING[sub]
    if sub == "stash" and rest and call.known(rest[0]) and not rest[0].text.startswith("-"):
        if rest[0].text not in ("push", "save"):
            return False  # git stash show -p shows a diff
    if sub == "config" and any(call.known(r) and r.text == "edit" for r in rest):
        return True
    for k, r in enumerate(rest):
        if not call.known(r):
            valued = _GIT_EDITING_VALUED.get(sub)
            if call.operand_like(r) or (
                k and valued is not None and call.known(rest[k - 1]) and valued.fullmatch(rest[k - 1].text)
            ):
                continue  # not an option, or the value of one (git commit -m "$msg", git checkout -b "$name")
            segs = [g for g in r.word.segs if g.text] if r.word is not None else []
            if len(segs) == 1 and segs[0].kind == _PARAM and segs[0].name and _NAME_RE.fullmatch(segs[0].name):
                _require_untainted(call, segs[0].name)
                continue
            return True
        t = r.text
        if t == "--":
            return False
        if t.startswith("--"):
            key = t.split("=", 1)[0]
            if len(key) > 3 and any(option.startswith(key) for option in longs):
                return True
        elif t.startswith("-") and any(ch in letters for ch in t[1:]):
            return True
    return False


# git's options before the subcommand that take the next word as their value (-c aside)
_GIT_VALUED_GLOBALS = frozenset({"-C", "--git-dir", "--work-tree", "--namespace", "--super-prefix", "--attr-source"})


def _git_starts_an_editor(call: _Call, sub: str, rest: Sequence[_Arg]) -> bool:
    """Whether git would start an editor for a message: ``git commit`` and ``git notes add`` without -m, -F or -C,
    ``git tag -a`` without a message, any of them (and merge, revert, cherry-pick) with -e; or through
    :func:`_git_edits`."""
    if sub in _GIT_EDITING and _git_edits(call, sub, rest):
        return True
    if sub not in ("commit", "tag", "notes", "merge", "revert", "cherry-pick"):
        return False
    message = edit = False
    for k, r in enumerate(rest):
        if not call.known(r):
            if k == 0 or not (call.known(rest[k - 1]) and _GIT_VALUED.fullmatch(rest[k - 1].text)):
                edit = True  # could be -e
            continue
        edit = edit or bool(_GIT_EDIT.fullmatch(r.text))
        message = message or bool(_GIT_MESSAGE.fullmatch(r.text))
    words = {r.text for r in rest if call.known(r)}
    if sub == "tag":
        return edit or (not message and bool(words & {"-a", "--annotate", "-s", "--sign", "-u", "--local-user"}))
    if sub == "notes":
        return edit or "edit" in words or (not message and bool(words & {"add", "append"}))
    if sub == "commit":
        return edit or not message
    return edit


def _h_git(call: _Call) -> None:
    args = call.args
    i = 0
    while i < len(args):
        a = args[i]
        if not call.known(a):
            call.fail(f"the argument {a.text!r} before the subcommand is only known at run time")
        t = a.text
        if t == "-c":
            if i + 1 >= len(args) or not call.known(args[i + 1]):
                call.fail("-c needs a literal key=value")
            if _GIT_DANGEROUS_KEY.match(args[i + 1].text):
                call.fail(f"-c {args[i + 1].text.split('=')[0]} can make git run a command")
            i += 2
            continue
        if t.startswith("--config-env") or t.startswith("--exec-path="):
            call.fail(f"{t.split('=')[0]} can make git run a command")
        if t in _GIT_VALUED_GLOBALS:
            i += 2
            continue
        if t.startswith("-"):
            i += 1
            continue
        break
    if i >= len(args):
        return
    sub = args[i].text
    rest = args[i + 1 :]
    if sub == "config":
        if _git_starts_an_editor(call, sub, rest):
            _starts_an_editor(call)
        # The key is not always the first operand: `git config set KEY VALUE`, `-f FILE KEY VALUE`, `--type T ...`.
        # A key that can run a command, followed by any word (a value), is refused.
        operands = [r for r in rest if not (call.known(r) and r.text.startswith("-"))]
        for k, r in enumerate(operands):
            if not call.known(r):
                call.fail(f"the argument {r.text!r} is only known at run time and could be a key that runs a command")
            if k + 1 < len(operands) and _GIT_DANGEROUS_KEY.match(r.text):
                call.fail(f"setting {r.text} can make git run a command")
        return
    if sub == "send-email":  # --smtp-server=/path is a sendmail-like program it runs
        for k, r in enumerate(rest):
            server = r.text[14:] if r.text.startswith("--smtp-server=") else None
            if r.text == "--smtp-server" and k + 1 < len(rest):
                server = rest[k + 1].text if call.known(rest[k + 1]) else "/"
            if not call.known(r) or (server is not None and not server[:1].isalnum()):
                call.fail("'git send-email --smtp-server' with a path runs that program")
    if _git_starts_an_editor(call, sub, rest):
        _starts_an_editor(call)
    dangerous = _GIT_DANGEROUS_SUB.get(sub)
    if dangerous is None:
        return
    if dangerous == ("",):
        call.fail(f"'git {sub}' runs commands")
    for r in rest:
        t = r.text
        for d in dangerous:
            if (
                t == d
                or (d.startswith("--") and t.startswith(d + "="))
                or (len(d) == 2 and d.startswith("-") and t.startswith(d) and not t.startswith("--"))
            ):
                call.fail(f"'git {sub} {d}' runs a command")


# dpkg runs these with ``sh -c``: --status-logger with the status lines on its input
_DPKG_COMMANDS = {"--pre-invoke": "dpkg --pre-invoke", "--post-invoke": "dpkg --post-invoke",
                  "--status-logger": "dpkg --status-logger"}  # fmt: skip


def _dpkg_options(call: _Call, words: Sequence[_Arg], *, split: bool) -> None:
    """The commands dpkg's --pre-invoke, --post-invoke and --status-logger run. ``split``: a value may be the
    next word (dpkg's own command line; apt's ``Dpkg::Options`` give one word each and cannot split them)."""
    for i, a in call.option_words(words):
        key, eq, value = a.text.partition("=")
        if key == "--":
            return
        if key not in _DPKG_COMMANDS:
            continue
        if not eq:
            if not split or i + 1 >= len(words):
                call.fail(f"{key} needs its command in the same word")
            value = call.code(words[i + 1], f"the command of {key}")
        call.nested(value, _DPKG_COMMANDS[key], stdin=_PIPE if key == "--status-logger" else None)


def _h_dpkg(call: _Call) -> None:
    if call.env.appended:
        call.fail("xargs would append options that are only known at run time: one could be --pre-invoke")
    _dpkg_options(call, call.args, split=True)


# apt configuration items (any scope: Binary::apt-get::...) whose value is a shell command apt runs, and items
# that make it run other programs or read other configuration (Dir::Bin::dpkg, Dir::Etc::parts, RootDir...)
_APT_HOOK = re.compile(r"invoke|pre-install-pkgs", re.IGNORECASE)
_APT_RUNS = re.compile(r"(?:^|::)(?:dir|rootdir)(?:::|$)|proxy-?auto-?detect|command|dpkg::path", re.IGNORECASE)


def _h_apt(call: _Call) -> None:
    """apt's ``-o KEY=VALUE`` sets any configuration item, among them the hooks apt runs with ``sh -c``
    (``DPkg::Pre-Invoke``, ``APT::Update::Post-Invoke-Success``...) and the options it gives dpkg
    (``Dpkg::Options::=--pre-invoke=CMD``); ``-c FILE`` reads configuration that may set them."""
    if call.env.appended and not (call.name != "aptitude" and _final_dashes_end_options(call.name, call.args)):
        call.fail(
            "xargs would append options that are only known at run time: one could be -o; end its arguments with -- "
            "so that they can only be package names"
        )
    args = call.args
    items: list[_Arg] = []
    for i, a in enumerate(args):
        t = a.text
        following = args[i + 1] if i + 1 < len(args) else None
        if not call.known(a):
            if call.operand_like(a):
                continue
            call.fail(f"the option position holding {t!r} is only known at run time")
        if t == "--":
            break
        key, eq, value = t.partition("=")
        if t.startswith("--"):
            if len(key) >= 4 and "--config-file".startswith(key):
                call.fail("--config-file reads configuration that can name commands to run")
            if len(key) >= 4 and "--option".startswith(key):
                if eq:
                    items.append(_Arg.plain(value))
                elif following is not None:
                    items.append(following)
            continue
        m = re.fullmatch(r"-[A-Za-z]*?([oc])(.*)", t, re.DOTALL)
        if m is None:
            continue
        if m.group(1) == "c":
            call.fail("-c reads configuration that can name commands to run")
        if m.group(2):
            items.append(_Arg.plain(m.group(2)))
        elif following is not None:
            items.append(following)
    dpkg_options: list[_Arg] = []
    for item in items:
        if not call.known(item):
            call.fail(f"the configuration item {item.text!r} is only known at run time")
        key, _, value = item.text.partition("=")
        key = key.strip()
        if _APT_HOOK.search(key):
            call.nested(value, f"{call.name} -o {key.rstrip(':')}", stdin=_PIPE if "pkgs" in key.lower() else None)
        elif _APT_RUNS.search(key):
            call.fail(f"-o {key} makes it run another program or read other configuration")
        elif re.search(r"dpkg::options", key, re.IGNORECASE):
            dpkg_options.append(_Arg.plain(value))
    _dpkg_options(call, dpkg_options, split=False)


def _h_openssl(call: _Call) -> None:
    """Without a command, openssl (before 3.0) reads its commands from its input, as a shell does: ``engine``
    there can load a library that runs any code."""
    if not call.args:
        if call.env.appended:
            call.fail("its command would come from the input of xargs")
        call.program_from_stdin(posix=False)
    # An engine given by its path, engine's SO_PATH and a provider directory load a library whose code runs in it.
    args = call.args
    for i, a in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else None
        if value is None:
            continue
        library = not call.known(value) or "/" in value.text or value.text.upper().startswith("SO_PATH")
        if not call.known(a):
            if library:
                call.fail(f"{a.text!r} is only known at run time and could be an option that loads a library")
            continue
        if not call.known(value) and a.text.endswith(("engine", "-pre", "-post", "-provider-path")):
            call.fail(f"the value of {a.text} is only known at run time and could be a library")
        if (a.text.endswith("engine") and "/" in value.text) or a.text == "-provider-path":
            call.fail(f"{a.text} loads a library, whose code runs in openssl")
        if a.text in ("-pre", "-post") and value.text.upper().startswith("SO_PATH"):
            call.fail("engine's SO_PATH loads a library, whose code runs in openssl")


def _h_tcpdump(call: _Call) -> None:
    """tcpdump -z CMD runs CMD (without a shell, the file as its argument) on each capture file it closes."""
    args = call.args
    for i, a in call.option_words(args):
        t = a.text
        if not t.startswith("-") or t.startswith("--"):
            continue
        for j, ch in enumerate(t[1:], start=1):
            if ch == "z":
                program = _Arg.plain(t[j + 1 :]) if j + 1 < len(t) else args[i + 1] if i + 1 < len(args) else None
                if program is None:
                    call.fail("-z needs a command")
                call.run([program], "tcpdump -z", stdin=_NULL)
            if ch in "BcCEFGijMmQrsTVwWyzZ":
                break  # the rest of the word, or the next one, is its value


def _h_wget(call: _Call) -> None:
    """wget --use-askpass=CMD runs CMD to ask for credentials; so does a ``use_askpass`` command given with -e or
    read from a --config file."""
    args = call.args
    for i, a in call.option_words(args):
        t = a.text
        if t == "--":
            return
        key, eq, value = t.partition("=")
        following = args[i + 1] if i + 1 < len(args) else None
        execute: str | None = None
        if t.startswith("--"):
            if len(key) >= 7 and "--use-askpass".startswith(key):
                program = _Arg.plain(value) if eq else following
                if program is None:
                    call.fail("--use-askpass needs a command")
                call.run([program], "wget --use-askpass", stdin=_NULL)
            elif len(key) >= 6 and "--config".startswith(key):
                call.fail("--config reads wgetrc commands, which can name a command to run (use_askpass)")
            elif len(key) >= 5 and "--execute".startswith(key):
                execute = value if eq else call.code(following, "the command of --execute") if following else ""
        elif t.startswith("-"):
            for j, ch in enumerate(t[1:], start=1):
                if ch == "e":
                    rest = t[j + 1 :]
                    execute = rest or (call.code(following, "the command of -e") if following else "")
                    break
                if ch in "OoaiBtTwQPlARDIXUSY":
                    break
        if execute is not None and re.sub(r"[\s_-]", "", execute.split("=", 1)[0]).lower() == "useaskpass":
            call.fail("-e use_askpass runs a command to ask for credentials")


def _h_rg(call: _Call) -> None:
    """ripgrep's --pre CMD runs CMD on every file it searches (the file's path as argument, its content as input)."""
    args = call.args
    for i, a in call.option_words(args):
        key, eq, value = a.text.partition("=")
        if key == "--":
            return
        if key == "--pre":
            program = _Arg.plain(value) if eq else args[i + 1] if i + 1 < len(args) else None
            if program is None:
                call.fail("--pre needs a command")
            call.run([program], "rg --pre", stdin=_FILE)


def _h_lxd(call: _Call) -> None:
    """``lxc exec``/``incus exec`` (and ``shell``, ``console``) run a command, or a shell on the session's input, in
    a container or a virtual machine, with options not modelled here."""
    for a in call.args:
        if not call.known(a) or a.text in ("exec", "shell", "console"):
            call.fail("'exec', 'shell' and 'console' run a command in a container, which is not analysed here")


_ANSIBLE_READ_ONLY = frozenset({"ping", "setup", "gather_facts", "ansible.builtin.ping", "ansible.builtin.setup"})


def _h_ansible(call: _Call) -> None:
    """``ansible HOSTS -a CMD`` runs CMD on every host (``command`` is the default module; ``shell``, ``raw`` and
    most others run or change anything there), and extra variables can choose the programs it starts. Only
    read-only modules without arguments are left to the rules; ``ansible-console`` is a prompt reading commands,
    and a playbook that is the session's input is a program nobody sees."""
    if call.name == "ansible-console":
        call.program_from_stdin(posix=False)
        return
    if call.env.appended:
        call.fail("xargs would append options that are only known at run time: one could be -a")
    if call.name == "ansible-playbook":
        if any(not call.known(a) or _is_stdin_path(a.text) for a in call.args):
            call.program_from_stdin(posix=False)
        return
    module = "command"
    args = call.args
    for i, a in enumerate(args):
        t = a.text
        if not call.known(a):
            call.fail(f"{t!r} is only known at run time and could be a module or its arguments")
        key, eq, value = t.partition("=")
        if key in ("-m", "--module-name"):
            module = value if eq else args[i + 1].text if i + 1 < len(args) else ""
        elif t.startswith("-m") and not t.startswith("--"):
            module = t[2:]
        elif key in ("-a", "--args", "-e", "--extra-vars") or (
            re.match(r"-[a-zA-Z]*[ae]", t) and not t.startswith("--")
        ):
            call.fail(f"{t.split('=')[0]} gives the commands or variables it runs on the hosts, which are not analysed")
    if module not in _ANSIBLE_READ_ONLY and not {a.text for a in args} & {"--list-hosts", "--version", "--help", "-h"}:
        call.fail(f"the module {module!r} runs commands or changes the hosts, which is not analysed here")


# Project and environment managers whose subcommand runs the program given after it (bundle exec rake, poetry run
# python, npm exec -- CMD, nix-shell --run CMD), with options of their own: refused rather than taken for a
# program whose arguments are data. Running a project's own scripts (npm run, make) stays with the rules.
_ENV_RUNNERS = {
    **dict.fromkeys(("bundle", "rbenv", "pyenv", "direnv", "stack", "cabal", "opam"), frozenset({"exec"})),
    **dict.fromkeys(
        ("poetry", "pipenv", "pipx", "conda", "mamba", "micromamba", "uv", "hatch", "pdm"), frozenset({"run"})
    ),
    **dict.fromkeys(("npm", "pnpm", "yarn", "bun"), frozenset({"exec", "x", "dlx", "explore"})),
    **dict.fromkeys(("asdf", "mise", "rtx", "nvm"), frozenset({"exec", "x", "run", "env"})),
    "nix": frozenset({"run", "shell", "develop"}),
    "guix": frozenset({"shell", "environment"}),
}
_ENV_RUNNER_ALWAYS = ("npx", "pnpx", "bunx", "uvx", "nix-shell")


def _h_env_runner(call: _Call) -> None:
    if call.name in _ENV_RUNNER_ALWAYS:
        call.fail(f"{call.name} runs the program it is given (or a shell), which is not analysed here")
    for a in call.args:
        if not call.known(a) or a.text in _ENV_RUNNERS[call.name]:
            call.fail(f"'{call.name} {a.text}' runs the program given after it, which is not analysed here")


_HELPER_OPTIONS = {"sort": "--compress-program", "diff3": "--diff-program", "sdiff": "--diff-program"}


def _h_helper_program(call: _Call) -> None:
    """GNU sort --compress-program=PROG runs PROG on its temporary files, diff3 and sdiff --diff-program=PROG run
    PROG instead of diff (long options may be abbreviated)."""
    option = _HELPER_OPTIONS[call.name]
    args = call.args
    for i, a in enumerate(args):
        if not call.known(a):
            if call.operand_like(a):
                continue
            segs = [g for g in a.word.segs if g.text] if a.word is not None else []
            if segs and segs[0].kind == _PARAM and segs[0].name and _NAME_RE.fullmatch(segs[0].name):
                _require_untainted(call, segs[0].name)  # a path from the target's environment ("$HOME/x")
                continue
            call.fail(f"the option position holding {a.text!r} is only known at run time; it could be {option}")
        key, eq, value = a.text.partition("=")
        if key == "--":
            return
        if len(key) >= 4 and option.startswith(key):
            program = _Arg.plain(value) if eq else args[i + 1] if i + 1 < len(args) else None
            if program is None:
                call.fail(f"{option} needs a program")
            call.run([program], f"{call.name} {option}", stdin=_PIPE)


def _h_zip(call: _Call) -> None:
    for a in call.args:
        if a.text.startswith("-TT") or (a.text.startswith("--unzip") and len(a.text) > 7):
            call.fail("the test command option runs a command")


def _h_man(call: _Call) -> None:
    for a in call.args:
        t = a.text
        if re.match(r"-[A-Za-z]*[PH]", t) or t.startswith(("--pager", "--html")):
            call.fail("a pager or browser option runs a command")
    _h_pager(call)


# --------------------------------------------------------------------------------------------------
# Programs that run a program in a container, a pod or a machine
# --------------------------------------------------------------------------------------------------

_DOCKER_GLOBAL = _Opts(
    flags="Dv",
    valued="cHl",
    long_flags=_words("--debug --tls --tlsverify") | _HELP,
    long_valued=_words("--config --context --host --log-level --tlscacert --tlscert --tlskey"),
)
_CONTAINER_GLOBALS = {
    "docker": _DOCKER_GLOBAL,
    "podman": _DOCKER_GLOBAL,
    "nerdctl": replace(
        _DOCKER_GLOBAL,
        valued="cHlna",
        long_flags=_DOCKER_GLOBAL.long_flags | _words("--debug-full --experimental --insecure-registry"),
        long_valued=_DOCKER_GLOBAL.long_valued
        | _words("--address --namespace --snapshotter --storage-driver --hosts-dir"),
    ),
}
_COMPOSE_GLOBALS = _Opts(
    flags="h",
    valued="fp",
    long_flags=_words("--all-resources --compatibility --dry-run --help"),
    long_valued=_words("--ansi --env-file --file --parallel --profile --progress --project-directory --project-name"),
)
_COMPOSE_EXEC = _Opts(
    flags="dTit",
    valued="euw",
    long_flags=_words("--detach --dry-run --interactive --no-TTY --privileged --tty --help"),
    long_valued=_words("--env --index --user --workdir"),
)
_CONTAINER_EXEC = _Opts(
    flags="dit",
    valued="euw",
    long_flags=_words("--detach --interactive --tty --privileged --help"),
    long_valued=_words("--detach-keys --env --env-file --user --workdir"),
)
_CONTAINER_RUN = _Opts(
    flags="ditPq",
    valued="acehlmpuvw",
    long_flags=_words(
        "--detach --disable-content-trust --help --init --interactive --no-healthcheck --oom-kill-disable"
        " --privileged --publish-all --quiet --read-only --rm --sig-proxy --tty --use-api-socket"
    ),
    long_valued=_words(
        "--add-host --annotation --attach --blkio-weight --blkio-weight-device --cap-add --cap-drop --cgroup-parent"
        " --cgroupns --cidfile --cpu-count --cpu-percent --cpu-period --cpu-quota --cpu-rt-period --cpu-rt-runtime"
        " --cpu-shares --cpus --cpuset-cpus --cpuset-mems --detach-keys --device --device-cgroup-rule"
        " --device-read-bps --device-read-iops --device-write-bps --device-write-iops --dns --dns-option"
        " --dns-search --domainname --entrypoint --env --env-file --expose --gpus --group-add --health-cmd"
        " --health-interval --health-retries --health-start-interval --health-start-period --health-timeout"
        " --hostname --io-maxbandwidth --io-maxiops --ip --ip6 --ipc --isolation --kernel-memory --label"
        " --label-file --link --link-local-ip --log-driver --log-opt --mac-address --memory --memory-reservation"
        " --memory-swap --memory-swappiness --mount --name --network --network-alias --oom-score-adj --pid"
        " --pids-limit --platform --publish --pull --restart --runtime --security-opt --shm-size --stop-signal"
        " --stop-timeout --storage-opt --sysctl --tmpfs --ulimit --user --userns --uts --volume --volume-driver"
        " --volumes-from --workdir"
    ),
)


def _container_env(call: _Call, opts: list[_Opt]) -> None:
    """-e/--env NAME[=value] reaches the program in the container: the same names as ``env``'s are refused; an
    --env-file holds names nobody sees."""
    for o in opts:
        if o.name == "--env-file":
            call.fail("--env-file sets variables that cannot be seen, which can change which program runs")
        if o.name in ("-e", "--env", "-E", "--setenv"):
            if not o.value_known or o.value is None:
                call.fail(f"the variable of {o.name} is only known at run time")
            name = o.value.split("=", 1)[0]
            if _dangerous_var(name) or not _NAME_RE.fullmatch(name):
                call.fail(f"{o.name} {name} can change which program runs in the container")


def _container_run(call: _Call, verb: str, spec: _Opts) -> None:
    """``docker exec CONTAINER ARGV`` and ``docker run IMAGE [ARGV]``: ARGV runs in the container, without a
    shell, with the session's input when -i (or --attach stdin) keeps it open. Without ARGV the image's own
    command runs: what it is cannot be known, so it may not read the session's input."""
    opts, i = _getopt(call, spec)
    names = {o.name for o in opts}
    if names & _HELP:
        return
    _container_env(call, opts)
    attached = bool(names & {"-i", "--interactive"}) or any(
        o.name in ("-a", "--attach") and (not o.value_known or (o.value or "").lower() == "stdin") for o in opts
    )
    stdin = call.stdin if attached else _NULL
    via = f"{call.name} {verb}"
    for o in opts:
        if o.name == "--health-cmd":
            if not o.value_known or o.value is None:
                call.fail("the command of --health-cmd is only known at run time")
            call.nested(o.value, f"{via} --health-cmd", stdin=_NULL)
    if i >= len(call.args):
        if call.env.appended:
            call.fail("the container and its command would come from the input of xargs")
        return
    argv = call.args[i + 1 :]
    entrypoint = next((o for o in reversed(opts) if o.name == "--entrypoint"), None)
    if entrypoint is not None and entrypoint.value != "":
        if not entrypoint.value_known or entrypoint.value is None:
            call.fail("the program of --entrypoint is only known at run time")
        argv = [_Arg.plain(entrypoint.value), *argv]
    if argv:
        call.run(argv, via, stdin=stdin)
    elif call.env.appended:
        call.fail("the command it runs in the container would come from the input of xargs")
    elif verb != "exec":
        _Call(call.name, [], call.env, call.ctx, stdin, call.redirects).program_from_stdin(posix=False)


def _h_container(call: _Call) -> None:
    """docker, podman, nerdctl: ``exec``, ``run`` and ``create`` run a program in a container (``create`` when it
    is started); ``attach`` and ``start -i`` give the session's input to a program started earlier, which may be
    a shell."""
    opts, i = _getopt(call, _CONTAINER_GLOBALS[call.name])
    if {o.name for o in opts} & (_HELP | {"-v"}):
        return
    for o in opts:
        if o.name in ("-H", "--host") and call.name == "docker":
            _ssh_url_host(call, o.value, o.value_known, f"{call.name} -H")
    args = call.args[i:]
    verb = ""
    while args and not verb:
        if not call.certain(args[0]):
            call.fail(f"the subcommand {args[0].text!r} is only known at run time")
        verb = args[0].text
        args = args[1:]
        if verb == "container":
            verb = ""
    sub = replace(call, args=args)
    if verb in ("exec", "run", "create"):
        _container_run(sub, verb, _CONTAINER_EXEC if verb == "exec" else _CONTAINER_RUN)
    elif verb == "attach":
        if not any(call.known(a) and a.text.startswith("--no-stdin") for a in args):
            call.program_from_stdin(posix=False)
    elif verb == "start":
        if any(
            not call.known(a) or re.fullmatch(r"-[a-z]*i[a-z]*", a.text) or a.text.split("=")[0] == "--interactive"
            for a in args
        ):
            call.program_from_stdin(posix=False)
    elif verb == "compose":
        _compose(sub)
    elif verb == "service" and any(not call.known(a) or a.text in ("create", "update") for a in args):
        call.fail("'service create' and 'service update' run the command given in a container, which is not analysed")
    elif not verb and call.env.appended:
        call.fail("its subcommand would come from the input of xargs")


def _compose(call: _Call) -> None:
    """``docker compose [OPTIONS] exec [OPTIONS] SERVICE ARGV`` (or ``docker-compose ...``) runs ARGV in the
    service's running container, as ``docker exec`` does, with the session's input open (compose's -i is on by
    default). ``run`` starts a new container with the service's entrypoint, taken from the compose file: what runs
    there is not seen."""
    args = call.args
    for a in args:
        if call.known(a) and (_is_stdin_path(a.text) or a.text in ("-f-", "--file=-")):
            call.program_from_stdin(posix=False)  # a compose file with commands in it
    opts, i = _getopt(call, _COMPOSE_GLOBALS) if call.env.appended or "exec" in [a.text for a in args] else ([], 0)
    if call.env.appended and i >= len(args):
        call.fail("its compose subcommand would come from the input of xargs")
    if not {o.name for o in opts} & _HELP and i < len(args) and call.certain(args[i]) and args[i].text == "exec":
        sub = replace(call, args=args[i + 1 :])
        opts, j = _getopt(sub, _COMPOSE_EXEC)
        if {o.name for o in opts} & _HELP:
            return
        _container_env(sub, opts)
        if j + 1 >= len(sub.args):
            if call.env.appended:
                call.fail("the service or the command it runs in the container would come from the input of xargs")
            call.fail("'compose exec' needs a service and the command to run in it")
        via = f"{call.name} exec" if call.name == "docker-compose" else f"{call.name} compose exec"
        sub.run(sub.args[j + 1 :], via, stdin=call.stdin)
        return
    for a in args:
        if not call.known(a) or a.text in ("run", "exec"):
            call.fail(
                "'compose run' (and 'compose exec' after options not known here) run the command given after them, "
                "which is not analysed"
            )


def _ssh_url_host(call: _Call, value: str | None, known: bool, via: str) -> None:
    """A daemon address ``ssh://[USER@]HOST[:PORT]``: the client reaches it with the target's ssh, with its
    account's keys, to run the daemon's client there."""
    if not known or value is None:
        call.fail(f"the address given to {via} is only known at run time")
    if value.lower().startswith("ssh://"):
        m = re.fullmatch(r"ssh://([^/:]+)(?::([0-9]+))?/?", value, re.IGNORECASE)
        if m is None:
            call.fail(f"unsupported ssh address {value!r}")
        port = [_Arg.plain("-p"), _Arg.plain(m.group(2))] if m.group(2) else []
        argv = [_Arg.plain("ssh"), *port, _Arg.plain("--"), _Arg.plain(m.group(1))]
        call.run([*argv, _Arg.plain(call.name), _Arg.plain("system"), _Arg.plain("dial-stdio")], via)


_KUBECTL_GLOBAL = _Opts(
    flags="h",
    valued="nsv",
    long_flags=_words("--disable-compression --insecure-skip-tls-verify --match-server-version --warnings-as-errors")
    | _HELP,
    long_valued=_words(
        "--as --as-group --as-uid --cache-dir --certificate-authority --client-certificate --client-key --cluster"
        " --context --kubeconfig --log-flush-frequency --namespace --password --profile --profile-output"
        " --request-timeout --server --tls-server-name --token --user --username --v --vmodule"
    ),
)
_KUBECTL_COMMANDS = {
    "exec": _Opts(
        flags="qit",
        valued="cf",
        long_flags=_words("--quiet --stdin --tty"),
        long_valued=_words("--container --filename --pod-running-timeout"),
    ),
    "attach": _Opts(
        flags="qit",
        valued="c",
        long_flags=_words("--quiet --stdin --tty"),
        long_valued=_words("--container --pod-running-timeout"),
    ),
    "debug": _Opts(
        flags="qit",
        valued="cf",
        long_flags=_words(
            "--arguments-only --attach --keep-annotations --keep-init-containers --keep-labels --keep-liveness"
            " --keep-readiness --keep-startup --quiet --replace --same-node --share-processes --stdin --tty"
        ),
        long_valued=_words(
            "--container --copy-to --custom --env --filename --image --image-pull-policy --profile --set-image --target"
        ),
    ),
    "run": _Opts(
        flags="qitR",
        valued="fklo",
        long_flags=_words(
            "--allow-missing-template-keys --attach --command --expose --force --leave-stdin-open --privileged --quiet"
            " --recursive --rm --save-config --show-managed-fields --stdin --tty --wait"
        ),
        long_valued=_words(
            "--annotations --env --field-manager --filename --grace-period --image --image-pull-policy --kustomize"
            " --labels --output --override-type --overrides --pod-running-timeout --port --restart --template --timeout"
        ),
        long_optional=_words("--dry-run --cascade"),
    ),
}


def _h_kubectl(call: _Call) -> None:
    """``kubectl exec POD -- ARGV``, ``kubectl debug ... -- ARGV`` and ``kubectl run NAME --image=I -- ARGV`` run
    ARGV in a pod (without a shell), with the session's input when -i/--stdin; ``kubectl attach -i`` gives it to
    a program started earlier, which may be a shell. Options may follow the operands, up to ``--``."""
    first, i = _getopt(call, _KUBECTL_GLOBAL)
    if i >= len(call.args) or {o.name for o in first} & (_HELP | {"-h"}):
        if call.env.appended:
            call.fail("its subcommand would come from the input of xargs")
        return
    if not call.certain(call.args[i]):
        call.fail(f"the subcommand {call.args[i].text!r} is only known at run time")
    verb = call.args[i].text
    if verb == "create" and any(call.known(a) and a.text == "--" for a in call.args):
        call.fail("'kubectl create' runs the command given after -- in a pod, which is not analysed here")
    if verb in ("edit", "create") and any(
        call.known(a) and a.text.split("=")[0] in ("--edit", "edit") for a in call.args
    ):
        _starts_an_editor(call)  # kubectl edit, kubectl create --edit
    spec = _KUBECTL_COMMANDS.get(verb)
    if spec is None:
        return
    spec = _Opts(
        flags=spec.flags + _KUBECTL_GLOBAL.flags,
        valued=spec.valued + _KUBECTL_GLOBAL.valued,
        long_flags=spec.long_flags | _KUBECTL_GLOBAL.long_flags,
        long_valued=spec.long_valued | _KUBECTL_GLOBAL.long_valued,
        long_optional=spec.long_optional,
    )
    sub = replace(call, args=call.args[i + 1 :])
    if sub.env.appended:
        call.fail("xargs would append options or a command that are only known at run time")
    opts: list[_Opt] = []
    operands: list[_Arg] = []
    after_dash: list[_Arg] | None = None
    j = 0
    while j < len(sub.args):
        got, k, dashed = _getopt_dash(sub, spec, j)
        opts.extend(got)
        if dashed:
            after_dash = sub.args[k:]
            break
        if k >= len(sub.args):
            break
        operands.append(sub.args[k])
        j = k + 1
    names = {o.name for o in opts}
    if names & (_HELP | {"-h"}):
        return
    stdin = call.stdin if names & {"-i", "--stdin"} else _NULL
    if verb == "attach":
        if stdin is not _NULL:
            call.program_from_stdin(posix=False)
        return
    for o in opts:
        if o.name in ("--overrides", "--custom"):
            call.fail(f"{o.name} can set the command and the environment of the container, which are not analysed")
    _container_env(sub, opts)
    argv = after_dash if after_dash is not None else operands[1:]
    if argv:
        sub.run(argv, f"kubectl {verb}", stdin=stdin)
    elif verb != "exec":
        _Call(call.name, [], call.env, call.ctx, stdin, call.redirects).program_from_stdin(posix=False)


_CRICTL_GLOBAL = _Opts(
    flags="Dhv",
    valued="cirt",
    long_flags=_words("--debug --enable-tracing") | _HELP,
    long_valued=_words(
        "--config --image-endpoint --runtime-endpoint --timeout --tracing-endpoint --tracing-sampling-rate-per-million"
    ),
)
_CRICTL_EXEC = _Opts(
    flags="itsh", long_flags=_words("--interactive --tty --sync --help"), long_valued=_words("--timeout --transport")
)


def _h_crictl(call: _Call) -> None:
    """``crictl exec [-i] CONTAINER ARGV`` runs ARGV in the container, without a shell; ``crictl attach -i``
    gives the session's input to a program started earlier."""
    opts, i = _getopt(call, _CRICTL_GLOBAL)
    if i >= len(call.args) or {o.name for o in opts} & (_HELP | {"-h", "-v"}):
        return
    if not call.certain(call.args[i]):
        call.fail(f"the subcommand {call.args[i].text!r} is only known at run time")
    verb = call.args[i].text
    sub = replace(call, args=call.args[i + 1 :])
    if verb == "attach":
        if any(not call.known(a) or re.fullmatch(r"-[a-z]*i[a-z]*|--(?:interactive|stdin)", a.text) for a in sub.args):
            call.program_from_stdin(posix=False)
        return
    if verb != "exec":
        return
    opts, j = _getopt(sub, _CRICTL_EXEC)
    if {o.name for o in opts} & {"-h", "--help"} or j >= len(sub.args):
        if sub.env.appended:
            call.fail("the container and its command would come from the input of xargs")
        return
    stdin = call.stdin if {o.name for o in opts} & {"-i", "--interactive"} else _NULL
    sub.run(sub.args[j + 1 :], "crictl exec", stdin=stdin)


_MACHINECTL_OPTS = _Opts(
    flags="halqV",
    valued="psHMnoE",
    long_flags=_words(
        "--value --all --full --no-pager --no-legend --no-ask-password --read-only --mkdir --quiet --force"
    )
    | _HELP,
    long_valued=_words(
        "--property --kill-whom --signal --host --machine --lines --output --verify --uid --setenv --max-addresses"
        " --format --runner"
    ),
)


def _h_machinectl(call: _Call) -> None:
    """``machinectl shell [[USER@]MACHINE [ARGV]]`` runs ARGV (or the user's shell, reading the session's input)
    in a container or on the host (``.host``), as any user; ``machinectl login`` asks for a login on the
    session's input and then runs a shell."""
    _h_systemd_remote(call)
    opts, i = _getopt(call, _MACHINECTL_OPTS)
    if i >= len(call.args) or {o.name for o in opts} & (_HELP | {"-h", "-V"}):
        return
    if not call.certain(call.args[i]):
        call.fail(f"the verb {call.args[i].text!r} is only known at run time")
    verb = call.args[i].text
    if verb == "login":
        call.program_from_stdin(posix=False)
        return
    if verb != "shell":
        return
    sub = replace(call, args=call.args[i + 1 :])
    more, j = _getopt(sub, _MACHINECTL_OPTS)
    for o in opts + more:
        if o.name in ("-E", "--setenv"):
            _container_env(sub, [o])
    if j + 1 < len(sub.args):
        sub.run(sub.args[j + 1 :], "machinectl shell")
    elif sub.env.appended:
        call.fail("the machine and its command would come from the input of xargs")
    else:
        call.program_from_stdin(posix=True, via="machinectl shell")


_KEYSTROKE_READERS = (
    *("ed", "red", "ex", "vi", "vim", "nvim", "view", "vimdiff", "rvim", "emacs", "nano", "pico"),
    *("sudoedit", "visudo", "vipw", "vigr"),
    # the names distributions install editors under (Debian's alternatives, vim's builds) and other editors
    *("editor", "sensible-editor", "vim.basic", "vim.tiny", "vim.nox", "vim.gtk", "vim.gtk3", "gvim", "nvi"),
    *("elvis", "vile", "emacs-nox", "emacsclient", "jed", "joe", "jmacs", "jpico", "mcedit", "micro", "mg"),
    *("ne", "kak", "hx"),
)
_COMMAND_READERS = ("gdb", "ftp", "lftp", "tmux", "screen", "telnet", "mail", "mutt")
# Options whose value is a command in the program's own language, which can run a shell command (vim's `-c '!rm x'`
# and `+cmd`, gdb's `-ex 'shell rm x'`, emacs' `--eval '(shell-command "rm x")'`, lftp's `-c '!rm x'`): they run
# whatever the input is. gdb's and emacs' long options may be abbreviated.
_READER_INLINE = {
    "vim": re.compile(r"-c.*|--cmd(?:=.*)?|\+(?![0-9]*$|/).*", re.S),
    "gdb": re.compile(r"--?(?:ex|iex|eva[a-z-]*|init-e[a-z-]*)(?:=.*)?", re.S),
    "emacs": re.compile(r"--?(?:ev[a-z]*|exe[a-z]*|f|fu[a-z]*)(?:=.*)?", re.S),
    "lftp": re.compile(r"-[ce].*", re.S),
    "mutt": re.compile(r"-e.*", re.S),
}
_READER_FAMILY = {
    **dict.fromkeys(
        ("ex", "vi", "nvim", "view", "vimdiff", "rvim", "vim.basic", "vim.tiny", "vim.nox", "vim.gtk", "vim.gtk3"),
        "vim",
    ),
    **dict.fromkeys(("gvim", "editor", "sensible-editor"), "vim"),
    **dict.fromkeys(("emacs-nox", "emacsclient"), "emacs"),
}
_PAGERS = ("less", "more", "most", "pager", "pg", "sensible-pager")

_HANDLERS: dict[str, Callable[[_Call], None]] = {
    **{name: _wrapper(spec) for name, spec in _WRAPPERS.items()},
    "exec": _h_exec,
    "setsid": _h_setsid,
    "strace": _h_strace,
    "env": _h_env,
    "sudo": _h_sudo,
    "xargs": _h_xargs,
    "find": _h_find,
    "watch": _h_watch,
    "flock": _h_flock,
    "su": _h_su,
    "runuser": _h_su,
    "busybox": _h_busybox,
    "toybox": _h_busybox,
    **dict.fromkeys(_POSIX_SHELLS, _h_posix_shell),
    **dict.fromkeys(_OTHER_SHELLS, _h_other_shell),
    **{name: _interpreter(spec) for name, spec in _INTERPRETERS.items()},
    "sqlite3": _h_sqlite,
    "duckdb": _h_sqlite,  # the same shell: a database file, then SQL inline or from stdin
    **dict.fromkeys(("awk", "gawk", "mawk", "nawk", "busybox-awk"), _h_awk),
    "sed": _h_sed,
    "source": _h_source,
    ".": _h_source,
    **dict.fromkeys(_KEYSTROKE_READERS + _COMMAND_READERS, _h_command_reader),
    **dict.fromkeys(_PAGERS, _h_pager),
    "man": _h_man,
    "script": _h_script,
    "stty": _h_stty,
    "tset": _h_tset,
    "reset": _h_tset,
    "at": _h_at,
    "batch": _h_at,
    "crontab": _h_crontab,
    "eval": _h_eval,
    "trap": _h_trap,
    **dict.fromkeys(("declare", "typeset", "local", "export", "readonly"), _h_declare),
    "unset": _h_unset,
    "read": _h_read,
    "mapfile": _h_mapfile,
    "readarray": _h_mapfile,
    "printf": _h_printf,
    "getopts": _h_getopts,
    "test": _h_test,
    "[": _h_test,
    "let": _h_let,
    "wait": _h_wait,
    "alias": _refuse_options("", "alias definitions are not allowed (aliases can hide any command)", defining=True),
    "hash": _refuse_options("p", "hash -p and name=path make a name run another program", defining=True),
    "enable": _h_enable,
    "compgen": _refuse_options("CW", "compgen -C/-W evaluate text as shell code"),
    "complete": _refuse_options("CW", "complete -C/-W evaluate text as shell code"),
    "bind": _refuse_options("x", "bind -x runs shell code from key bindings"),
    "fc": _refuse("fc runs commands from the history"),
    **{
        name: _refuse(f"{name} runs a program named in its arguments, which this analysis does not model")
        for name in _UNMODELLED_RUNNERS
    },
    "split": _h_split,
    "perf": _h_perf,
    "parallel": _refuse("GNU parallel runs the commands it builds from its arguments and input"),
    "sem": _refuse("GNU parallel's sem runs the commands it builds from its arguments"),
    "setarch": _refuse(
        "setarch takes its options after the architecture; use linux32/linux64 or run the program directly"
    ),
    "r": _refuse("zsh's r runs commands from the history"),
    "sched": _refuse("zsh's sched runs a command string later"),
    "zpty": _refuse("zsh's zpty runs a command string"),
    "emulate": _refuse_options("c", "emulate -c evaluates a command string"),
    "set": _h_set,
    **dict.fromkeys(_SYSTEMD_REMOTE_TOOLS, _h_systemd_remote),
    "shopt": _h_shopt,
    "systemd-run": _h_systemd_run,
    "socat": _h_socat,
    **dict.fromkeys(_NETWORK_SERVERS, _h_network_server),
    "virsh": _h_virsh,
    **dict.fromkeys(("nc", "ncat", "netcat", "nc.traditional", "nc.openbsd"), _h_netcat),
    "ssh": _h_ssh,
    "scp": _h_scp,
    "sftp": _h_scp,
    "rsync": _h_rsync,
    "ip": _h_ip,
    "m4": _h_m4,
    "gm4": _h_m4,
    "make": _h_make,
    "cmake": _h_cmake,
    "gmake": _h_make,
    "tar": _h_tar,
    "cpio": _h_cpio,
    "git": _h_git,
    "zip": _h_zip,
    **dict.fromkeys(_CONTAINER_GLOBALS, _h_container),
    "docker-compose": _compose,
    "kubectl": _h_kubectl,
    "crictl": _h_crictl,
    "machinectl": _h_machinectl,
    **dict.fromkeys(("apt", "apt-get", "apt-cache", "apt-mark", "aptitude"), _h_apt),
    "dpkg": _h_dpkg,
    "openssl": _h_openssl,
    "tcpdump": _h_tcpdump,
    "wget": _h_wget,
    **dict.fromkeys(("rg", "ripgrep"), _h_rg),
    **dict.fromkeys(("lxc", "incus"), _h_lxd),
    **dict.fromkeys(("ansible", "ansible-console", "ansible-playbook"), _h_ansible),
    **dict.fromkeys((*_ENV_RUNNERS, *_ENV_RUNNER_ALWAYS), _h_env_runner),
    **dict.fromkeys(_HELPER_OPTIONS, _h_helper_program),
}


# Handlers that decide on the words of their command line (options that run a command, code joined into one
# command string, a subcommand or program they name): what xargs appends to them is not seen. Some take only
# operands after a final `--`; sed checks itself (its script must then be among the words given).
_APPEND_UNSAFE = frozenset(
    {_h_find, _h_watch, _h_flock, _h_busybox, _h_awk, _h_command_reader, _h_script, _h_pager, _h_man, _h_split}
    | {_h_perf, _h_socat, _h_netcat, _h_ssh, _h_scp, _h_rsync, _h_ip, _h_make, _h_cmake, _h_tar, _h_git, _h_zip}
    | {_h_sqlite, _h_crictl, _h_tcpdump, _h_wget, _h_rg, _h_lxd, _h_openssl, _h_env_runner, _h_helper_program}
    | {_h_cpio, _h_virsh}
)
_APPEND_AFTER_DASHES = frozenset(
    {_h_tar, _h_rsync, _h_scp, _h_split, _h_pager, _h_man, _h_helper_program, _h_rg, _h_wget}
)

# Short options that take no value (and long ones, exactly as written), of the programs that may get what xargs
# appends after a final `--`: the word before that `--` must not be an option whose value it would be.
_DASHES_END_OPTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "tar": ("AcdrtuxzjJZvpkmOSWhlaPiBGMnUwo", _words("--verbose --extract --create --list --gzip --bzip2 --xz")),
    "rsync": (
        "avzrlptgoDHAXSxunhcWqPRbdkKLOiICyFm8E0sJUN46",
        _words(
            "--archive --verbose --compress --recursive --delete --delete-after --progress --partial --dry-run"
            " --checksum --update --stats --human-readable --inplace --remove-source-files --ignore-existing"
        ),
    ),
    "scp": ("346ABCOpqRrsTv", frozenset()),
    "split": ("dexu", frozenset()),
    "man": ("acdDfkKiIluwWtZ7", frozenset()),
    "sed": ("nrEsuzi", _words("--quiet --silent --regexp-extended --separate --unbuffered --null-data --posix")),
    "sort": ("bdfgiMhnRrVcCmsuz", _words("--unique --reverse --numeric-sort --human-numeric-sort --version-sort")),
    "diff3": ("AeExX3imTa", frozenset()),
    "sdiff": ("abBdEHilstWZ", frozenset()),
    "rg": ("ilnwvxcoqsSFHINuUzLap0.", frozenset()),
    "ripgrep": ("ilnwvxcoqsSFHINuUzLap0.", frozenset()),
    "wget": ("qvdNrpkKmcSxEHFLb46", frozenset()),
    **dict.fromkeys(_PAGERS, ("RSNiFXrMmEeKsUwcaGgQqLIdJfl", frozenset())),
    **dict.fromkeys(
        ("apt", "apt-get"),
        (
            "yqsdfmubV",
            _words("--yes --assume-yes --quiet --no-install-recommends --fix-broken --reinstall --purge --simulate"),
        ),
    ),
    # git subcommands whose words after -- are paths
    "git add": ("vfnNuA", _words("--all --update --verbose --force --dry-run --intent-to-add --no-all")),
    "git rm": ("nfrq", _words("--cached --force --quiet --dry-run --ignore-unmatch")),
    "git checkout": ("fqm", _words("--force --quiet --merge --ours --theirs")),
    "git restore": ("WSq", _words("--staged --worktree --quiet --ours --theirs")),
    "git diff": ("pRwbuz", _words("--stat --name-only --name-status --cached --staged --numstat")),
    "git log": ("p", _words("--oneline --stat --follow --name-only")),
    "git ls-files": ("cdmosuzkt", _words("--cached --deleted --modified --others --stage --unmerged --killed")),
}


def _handler_for(name: str) -> Callable[[_Call], None] | None:
    handler = _HANDLERS.get(name)
    if handler is not None:
        return handler
    for pattern, family in _INTERPRETER_PATTERNS:
        if pattern.fullmatch(name):
            return _h_posix_shell if family == "sh" else _HANDLERS[family]
    return None
