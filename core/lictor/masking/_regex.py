"""Static analysis of re2 patterns: how many bytes can a match span?

A stream masker must hold back enough bytes that a match split across two chunks is still
seen whole, and it may only hold back a bounded amount. So every detector pattern must have a
finite maximum match length, which this module computes from the pattern text.

The parser below accepts the re2 syntax (https://github.com/google/re2/wiki/Syntax). It runs
only on patterns that re2 has already compiled, so it does not need to report syntax errors;
where it meets something it cannot size it answers "unbounded", which makes the caller
reject the pattern (fail closed). Widths are counted in UTF-8 bytes and rounded up: a
character class that can match a non-ASCII character counts 4 bytes, a case-insensitive
ASCII letter counts 3 (``k`` also matches KELVIN SIGN, U+212A).
"""

from dataclasses import dataclass

_UNBOUNDED = -1
_WIDE = 4  # the longest UTF-8 encoding of one character


@dataclass(frozen=True, slots=True)
class Width:
    """Minimum and maximum match length in bytes; ``max_len`` is None when unbounded."""

    min_len: int
    max_len: int | None


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0
        self.ci = False  # case-insensitive flag in the current group

    # -- helpers -----------------------------------------------------------------------------
    def _peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.p[j] if j < len(self.p) else ""

    @staticmethod
    def _add(a: int, b: int) -> int:
        return _UNBOUNDED if _UNBOUNDED in (a, b) else a + b

    def _char_width(self, ch: str) -> int:
        n = len(ch.encode("utf-8", "surrogatepass"))
        if self.ci and ch.isalpha():
            return max(n, 3) if ch.isascii() else _WIDE
        return n

    # -- grammar: alternation > concatenation > repetition > atom --------------------------
    def parse_alternation(self) -> tuple[int, int]:
        lo, hi = self.parse_concat()
        while self._peek() == "|":
            self.i += 1
            # re2 keeps a flag set by "(?i)" up to the end of the enclosing group, across "|":
            # "(?i)x|k" matches the Kelvin sign. So self.ci is not reset here.
            lo2, hi2 = self.parse_concat()
            lo = min(lo, lo2)
            hi = _UNBOUNDED if _UNBOUNDED in (hi, hi2) else max(hi, hi2)
        return lo, hi

    def parse_concat(self) -> tuple[int, int]:
        lo, hi = 0, 0
        while self.i < len(self.p) and self._peek() not in "|)":
            alo, ahi = self.parse_repeat()
            lo += alo
            hi = self._add(hi, ahi)
        return lo, hi

    def parse_repeat(self) -> tuple[int, int]:
        lo, hi = self.parse_atom()
        while True:
            c = self._peek()
            if c in ("*", "+", "?"):
                self.i += 1
                if c == "*":
                    lo, hi = 0, (_UNBOUNDED if hi != 0 else 0)
                elif c == "+":
                    hi = _UNBOUNDED if hi != 0 else 0
                else:
                    lo = 0
            elif c == "{":
                rep = self._parse_braces()
                if rep is None:
                    return lo, hi
                rmin, rmax = rep
                lo = lo * rmin
                if rmax == _UNBOUNDED:
                    hi = _UNBOUNDED if hi != 0 else 0
                elif hi != _UNBOUNDED:
                    hi = hi * rmax
            else:
                return lo, hi
            if self._peek() == "?":  # non-greedy marker
                self.i += 1

    def _parse_braces(self) -> tuple[int, int] | None:
        j = self.p.find("}", self.i)
        if j < 0:
            return None
        body = self.p[self.i + 1 : j]
        parts = body.split(",")
        try:
            if len(parts) == 1:
                n = int(parts[0])
                rep = (n, n)
            elif len(parts) == 2:
                n = int(parts[0])
                rep = (n, _UNBOUNDED if parts[1] == "" else int(parts[1]))
            else:
                return None
        except ValueError:
            return None  # a literal "{"
        self.i = j + 1
        return rep

    def parse_atom(self) -> tuple[int, int]:
        c = self._peek()
        if c == "(":
            return self._parse_group()
        if c == "[":
            w = self._parse_class()
            return 1, w
        if c == "\\":
            return self._parse_escape()
        if c in "^$":
            self.i += 1
            return 0, 0
        if c == ".":
            self.i += 1
            return 1, _WIDE
        self.i += 1
        return 1, self._char_width(c)

    def _parse_group(self) -> tuple[int, int]:
        self.i += 1  # "("
        saved_ci = self.ci
        if self._peek() == "?":
            if self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i)):
                self.i = self.p.index(">", self.i) + 1
            else:
                # flags: (?flags) or (?flags:re)
                j = self.i + 1
                while j < len(self.p) and self.p[j] not in ":)":
                    j += 1
                flags = self.p[self.i + 1 : j]
                on, _, off = flags.partition("-")
                ci = self.ci
                if "i" in on:
                    ci = True
                if "i" in off:
                    ci = False
                self.i = j + 1
                if self.p[j] == ")":
                    self.ci = ci  # applies to the rest of the enclosing group
                    return 0, 0
                self.ci = ci
        lo, hi = self.parse_alternation()
        self.i += 1  # ")"
        self.ci = saved_ci
        return lo, hi

    def _parse_escape(self) -> tuple[int, int]:
        c = self._peek(1)
        self.i += 2
        if c in "dsw":
            return 1, 1
        if c in "DSW":
            return 1, _WIDE
        if c in "bBAz":
            return 0, 0
        if c == "C":
            return 1, 1
        if c in "pP":
            if self._peek() == "{":
                self.i = self.p.index("}", self.i) + 1
            else:
                self.i += 1
            return 1, _WIDE
        if c == "Q":
            end = self.p.find("\\E", self.i)
            lit = self.p[self.i :] if end < 0 else self.p[self.i : end]
            self.i = len(self.p) if end < 0 else end + 2
            return len(lit), sum(self._char_width(ch) for ch in lit)
        if c == "x":
            if self._peek() == "{":
                j = self.p.index("}", self.i)
                cp = int(self.p[self.i + 1 : j], 16)
                self.i = j + 1
            else:
                cp = int(self.p[self.i : self.i + 2], 16)
                self.i += 2
            return 1, self._char_width(chr(cp))
        if c.isdigit():
            # An octal escape (\377 is U+00FF, two bytes in UTF-8).
            digits = c
            while len(digits) < 3 and self._peek() in tuple("01234567"):
                digits += self._peek()
                self.i += 1
            try:
                cp = int(digits, 8)
            except ValueError:  # pragma: no cover - re2 refuses \8, \9
                return 1, _WIDE
            return 1, self._char_width(chr(cp))
        return 1, self._char_width(c)

    def _parse_class(self) -> int:
        """Skip a bracketed class; return the widest byte length one of its members can have."""
        self.i += 1  # "["
        wide = False
        if self._peek() == "^":
            wide = True
            self.i += 1
        first = True
        while True:
            c = self._peek()
            if c == "" or (c == "]" and not first):
                break
            first = False
            if c == "[" and self._peek(1) == ":":
                j = self.p.index(":]", self.i + 2)
                if self.p[self.i + 2] == "^":
                    wide = True
                self.i = j + 2
                continue
            if c == "\\":
                e = self._peek(1)
                if e in "DSWpP":
                    wide = True
                if e in "pP" and self._peek(2) == "{":
                    self.i = self.p.index("}", self.i) + 1
                    continue
                if e == "x" and self._peek(2) == "{":
                    j = self.p.index("}", self.i)
                    if int(self.p[self.i + 3 : j], 16) > 0x7F:
                        wide = True
                    self.i = j + 1
                    continue
                if e == "x":  # \xHH: \x80-\xff are U+0080-U+00FF, two bytes in UTF-8
                    if int(self.p[self.i + 2 : self.i + 4], 16) > 0x7F:
                        wide = True
                    self.i += 4
                    continue
                if e.isdigit():  # octal, up to three digits: \200-\377 are two bytes
                    j = self.i + 1
                    while j < len(self.p) and j < self.i + 4 and self.p[j] in "01234567":
                        j += 1
                    if j == self.i + 1 or int(self.p[self.i + 1 : j], 8) > 0x7F:
                        wide = True
                    self.i = max(j, self.i + 2)
                    continue
                self.i += 2
                continue
            if not c.isascii() or (self.ci and c.isalpha()):
                wide = True
            self.i += 1
        self.i += 1  # "]"
        return _WIDE if wide else 1


def pattern_width(pattern: str) -> Width:
    """Bounds of the byte length of any match of ``pattern`` (already accepted by re2)."""
    parser = _Parser(pattern)
    try:
        lo, hi = parser.parse_alternation()
    except (ValueError, IndexError):  # pragma: no cover - re2 accepted the pattern
        return Width(0, None)
    if parser.i < len(pattern):  # pragma: no cover - a stray ")" that re2 would have refused
        return Width(0, None)
    return Width(lo, None if hi == _UNBOUNDED else hi)
