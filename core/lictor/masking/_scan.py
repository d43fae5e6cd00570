"""The scanner: one re2 pass over the input finds candidates for every detector of a plan.

Theory of operation
-------------------
All detector patterns of a plan are joined into one alternation ``(?:p0)|(?:p1)|...`` compiled
without capture groups, so that re2 finds the leftmost candidate with its DFA alone (asking re2
for groups costs a few microseconds per match, more than everything else together). Which
detectors match at that position is then asked of an anchored ``re2.Set`` of the same
patterns, over the candidate and one byte of left context; the lowest index is the one the
alternation picked (leftmost-first). Only then does Python run: the extension (the rest of a
token, a PEM block...), the validator, the style. A rejected candidate does not hide another
detector that matches at the same place: the next detector of the set is tried there, with its
own pattern anchored at that position. Then the scan moves on by one byte.

Streams and chunk boundaries
----------------------------
Each pattern has a bounded match length, so ``reach`` (the longest match plus two bytes of
look-ahead for ``\\b`` and the validators) bounds how far past a candidate's start its outcome
depends on the input; an extension depends on at most its limit past the pattern's match. A
decision at position ``s`` is therefore final once the input holds those bytes, or at the end
of input. ``scan`` makes exactly those decisions and reports how far it got (``done``); a
stream emits up to there, keeps the undecided tail plus a few bytes of left context, and scans
again when more bytes arrive. The e-mail detector extends backwards over the local part (at
most ``back`` bytes), so ``done`` also stays ``back`` bytes behind the first undecided position,
and a backward extension never reaches past the end of the previous masked value: both rules
give the same answer whole or in chunks. Since every decision sees the same bytes whatever
the chunking, masking a stream in chunks gives exactly the output of masking it whole.
"""

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import re2

from ._detectors import Detector, re2_options
from ._styles import Style, apply_style
from ._validators import VALIDATORS, Validator

Spans = list[tuple[int, int]]
Matcher = Callable[[Any, bytes, int, int], Spans]

UNANCHORED: Any = re2._Anchor.UNANCHORED
ANCHOR_START: Any = re2._Anchor.ANCHOR_START
_NO_SPAN = (-1, -1)

CONTEXT = 8
"""Bytes kept before the undecided tail of a stream, so ``\\b`` and validators see their left side."""


def _matcher(pattern: str, captures: bool = True) -> Matcher:
    """A fast ``(anchor, text, pos, endpos) -> spans`` for one pattern (without captures: only
    the whole match, which spares re2 the costly extraction of groups)."""
    options = re2_options()
    options.never_capture = not captures
    compiled = re2.compile(pattern, options)
    raw = getattr(compiled, "_regexp", None)
    if raw is not None and hasattr(raw, "Match"):
        match: Matcher = raw.Match
        return match
    groups = compiled.groups  # pragma: no cover - only if google-re2 changes its internals

    def fallback(anchor: Any, text: bytes, pos: int, endpos: int) -> Spans:  # pragma: no cover
        m = (compiled.match if anchor == ANCHOR_START else compiled.search)(text, pos, endpos)
        if m is None:
            return [_NO_SPAN] * (groups + 1)
        return [m.span(g) for g in range(groups + 1)]

    return fallback  # pragma: no cover


def _set(patterns: Sequence[str], prefix: str) -> Any:
    """An anchored re2.Set telling which patterns match at the start of a text (after
    ``prefix``, which consumes the byte of left context)."""
    options = re2_options()
    options.never_capture = True
    rset = re2.Set.MatchSet(options)
    for p in patterns:
        rset.Add(f"{prefix}(?:{p})")
    rset.Compile()
    raw = getattr(rset, "_set", None)
    return raw if raw is not None and hasattr(raw, "Match") else rset


def _back_matcher(char_class: str) -> Callable[[bytes], int]:
    """Length of the run of ``char_class`` at the start of a (reversed) byte string."""
    match = re.compile(f"{char_class}*".encode()).match

    def run(data: bytes) -> int:
        m = match(data)
        return m.end() if m else 0

    return run


class _Extension:
    """Continues a masked group past its pattern (see _detectors): a greedy run of one class,
    or a block terminated by a line found with ``find`` before the next ``stop``."""

    __slots__ = ("fallback", "find", "greedy", "limit", "match", "stop")

    def __init__(self, pattern: str, det: Detector) -> None:
        self.match = _matcher(pattern)
        self.greedy = det.extend_find is None
        self.find = det.extend_find.encode() if det.extend_find else b""
        self.stop = det.extend_stop.encode() if det.extend_stop else b""
        self.fallback = _matcher(det.extend_fallback) if det.extend_fallback else None
        self.limit = det.extend_limit

    def end(self, data: bytes, e: int, n: int, eof: bool, runs: dict[int, tuple[int, int]]) -> int:
        """End of a group extended from ``e`` (at most ``limit`` bytes), or -1 when more input
        is needed to decide. ``runs`` remembers greedy runs already measured in this scan, so
        that many candidates inside one long run cost one pass over it, not one each."""
        hard = e + self.limit
        endpos = min(n, hard)
        complete = eof or n >= hard
        if e >= endpos:
            return e if complete else -1
        if self.greedy:
            # A run of the class from `e` ends where the run from any earlier start inside it
            # ends; a run cut by the limit is only resumed from where it was cut.
            start = e
            known = runs.get(id(self))
            if known is not None and known[0] <= e < known[1]:
                start = known[1]
            end = self.match(ANCHOR_START, data, start, endpos)[0][1] if start < endpos else start
            # The run may go on in the next chunk: it reached the end of the buffer, or it
            # stopped at what may be only the first bytes of a multi-byte character, or at the last
            # byte, which a two-byte alternative may take with the next one (} in secret_assignment, conninfo_password).
            if not complete and (end >= n - 1 or (data[end] >= 0x80 and n - end < 4)):
                return -1
            if end > e:
                runs[id(self)] = (e, end)
            return max(end, e)
        stop = data.find(self.stop, e, endpos) if self.stop else -1
        upto = endpos if stop < 0 else stop
        at = data.find(self.find, e, upto)
        while at >= 0:
            spans = self.match(ANCHOR_START, data, at, endpos)
            if spans[0][0] >= 0:
                return spans[0][1]
            at = data.find(self.find, at + 1, upto)
        if stop < 0 and not complete:
            return -1
        assert self.fallback is not None
        return max(self.fallback(ANCHOR_START, data, e, upto)[0][1], e)


class _Slot:
    """What the scanner needs to know about one detector, precomputed."""

    __slots__ = (
        "back",
        "back_limit",
        "extensions",
        "find",
        "groups",
        "name",
        "redact",
        "simple",
        "style",
        "validator",
    )

    def __init__(self, det: Detector, style: Style) -> None:
        self.name = det.name
        self.style = style
        self.redact = f"[REDACTED:{det.name}]".encode() if style.kind == "redact" else None
        self.groups = det.mask_groups
        self.validator: Validator | None = VALIDATORS[det.validator] if det.validator else None
        self.extensions: tuple[_Extension | None, ...] = tuple(
            _Extension(ext, det) if ext else None for ext in det.extend
        ) or (None,) * len(self.groups)
        # Masks the whole match: the span found by the combined search is enough.
        self.simple = self.groups == (0,)
        self.find = _matcher(det.pattern, captures=not self.simple)
        # Backward extension: matched (with Python's re, linear for one class) on the reversed
        # bytes in front of the match.
        self.back = _back_matcher(det.extend_back) if det.extend_back else None
        self.back_limit = det.back_limit


class Scanner:
    """Finds and masks every detector of a plan in bytes; see the module docstring."""

    def __init__(self, detectors: Sequence[Detector], styles: Sequence[Style], key: bytes) -> None:
        self.detectors = tuple(detectors)
        self.key = key
        self.slots = [_Slot(d, s) for d, s in zip(self.detectors, styles, strict=True)]
        self.reach = max(d.max_len for d in self.detectors) + 2
        self.back = max(d.back_limit for d in self.detectors)
        patterns = [d.pattern for d in self.detectors]
        self._find = _matcher("|".join(f"(?:{p})" for p in patterns), captures=False)
        self._sets = (_set(patterns, ""), _set(patterns, "\\C")) if len(patterns) > 1 else None

    def _candidates(self, data: bytes, s: int) -> list[int]:
        """Indexes of the detectors that match at ``s`` (in context), in precedence order."""
        assert self._sets is not None
        if s == 0:
            found = self._sets[0].Match(data[: self.reach])
        else:
            found = self._sets[1].Match(data[s - 1 : s + self.reach])
        if not found:  # pragma: no cover - the combined search matched here
            return []
        return found if len(found) == 1 else sorted(found)

    def scan(self, data: bytes, pos: int, eof: bool, out: list[bytes], counts: Counter[str]) -> int:
        """Mask ``data[pos:done]`` into ``out`` and return ``done``.

        Without ``eof``, only decisions that more input cannot change are made; ``data[done:]``
        must be scanned again later with more bytes appended (and ``data[:pos]`` is context).
        """
        n = len(data)
        limit = n if eof else n - self.reach  # a candidate at s is decidable iff s <= limit
        find = self._find
        slots = self.slots
        candidates = self._candidates
        only = [0] if self._sets is None else None
        in_context = self._sets[1].Match if self._sets is not None else None
        reach = self.reach
        runs: dict[int, tuple[int, int]] = {}
        skip: dict[int, int] = {}  # detector index -> no candidate of it can pass before this
        emitted = pos
        # Start one byte early, as a scan resumes after a match (see the end of the loop): a stream's
        # previous scan may have stopped right after a masked value, and a card glued to it begins
        # with one byte of left context on that value's last byte. Nothing before ``pos`` is emitted.
        c = pos - 1 if pos > 0 else pos
        while True:
            s, e = find(UNANCHORED, data, c, n)[0]
            if s < 0 or s > limit:
                # Decided up to `safe`; but a later match may extend backwards by `back` bytes.
                done = n if eof else max(emitted, max(c, limit) - self.back)
                break
            slot = None
            ms = me = -1
            if only is not None:
                found = only
            elif s and in_context is not None:  # the usual case, inlined: this runs per match
                found = in_context(data[s - 1 : s + reach])
                if len(found) > 1:
                    found.sort()
            else:
                found = candidates(data, s)
            first = found[0]  # the alternative the combined search matched: (s, e) is its span
            for di in found:
                if skip and skip.get(di, -1) > s:
                    continue
                slot = slots[di]
                ext = slot.extensions[0]
                if di == first and slot.simple:
                    ms, me = s, e
                else:
                    spans = slot.find(ANCHOR_START, data, s, n)
                    for i, g in enumerate(slot.groups):
                        ms, me = spans[g]
                        if ms >= 0:
                            ext = slot.extensions[i]
                            break
                if 0 <= ms < emitted:  # it would overlap what was just masked (see the resume below)
                    ms = -1
                if ms >= 0 and slot.back is not None:
                    lo = max(emitted, ms - slot.back_limit)
                    ms -= slot.back(data[lo:ms][::-1])
                if ms >= 0 and ext is not None:
                    me = ext.end(data, me, n, eof, runs)
                    if me < 0:  # an open token or block whose end is not here yet: wait
                        hold = min(s, ms)
                        out.append(data[emitted:hold])
                        return hold
                if ms >= 0 and slot.validator is not None:
                    me = slot.validator(data, ms, me)
                    if me < -1:  # rejected, and so is any candidate of this detector before -me - 2
                        skip[di] = -me - 2
                if ms >= 0 and me > ms:
                    break
                slot = None
            if slot is None:
                c = s + 1
                continue
            out.append(data[emitted:ms])
            out.append(slot.redact or apply_style(slot.style, self.key, slot.name, data[ms:me]))
            counts[slot.name] += 1
            # Resume one byte early: a pattern that starts with one byte of left context (a card after
            # a letter) may begin on the last byte of this match; its masked part starts at or after it.
            emitted = me
            c = me - 1 if me - 1 > ms else me
        if done > emitted:
            out.append(data[emitted:done])
        return done
