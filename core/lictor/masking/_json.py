"""JSON paths and masking of parsed JSON documents.

Supported path syntax (a subset of JSONPath): ``$`` then any of ``.name``, ``['name']``,
``.*``, ``[*]``, ``[3]``, ``[-1]``, ``..name`` (recursive descent: ``name`` at any depth) and
``..*``. A path selects values; the whole selected value is masked.
"""

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import MaskingError
from ._styles import Style

_NAME = re.compile(r"[A-Za-z_$@][\w$@-]*")
_QUOTED = re.compile(r"""\[\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\s*\]""")
_INDEX = re.compile(r"\[\s*(-?\d+)\s*\]")
_STAR = re.compile(r"\[\s*\*\s*\]")


@dataclass(frozen=True, slots=True)
class Step:
    """One path step. ``kind``: key, index, wild; ``deep`` for recursive descent."""

    kind: str
    key: str | int | None = None
    deep: bool = False

    def accepts(self, key: str | int, size: int) -> bool:
        if self.kind == "wild":
            return True
        if self.kind == "index":
            assert isinstance(self.key, int)
            return isinstance(key, int) and key == (self.key if self.key >= 0 else size + self.key)
        return key == self.key


def parse_path(path: str) -> tuple[Step, ...]:
    """Parse a JSON path; raises :class:`MaskingError` naming the path on bad syntax."""
    if not isinstance(path, str) or not path.startswith("$"):
        raise MaskingError(f"json path {path!r}: must start with $")
    steps: list[Step] = []
    i = 1
    while i < len(path):
        deep = False
        if path.startswith("..", i):
            deep = True
            i += 2
        elif path[i] == ".":
            i += 1
        elif path[i] != "[":
            raise MaskingError(f"json path {path!r}: unexpected {path[i]!r} at offset {i}")
        if i < len(path) and path[i] == "*":
            steps.append(Step("wild", None, deep))
            i += 1
            continue
        if i < len(path) and path[i] == "[":
            m = _STAR.match(path, i)
            if m:
                steps.append(Step("wild", None, deep))
            elif m := _INDEX.match(path, i):
                steps.append(Step("index", int(m.group(1)), deep))
            elif m := _QUOTED.match(path, i):
                raw = m.group(1) if m.group(1) is not None else m.group(2)
                steps.append(Step("key", re.sub(r"\\(.)", r"\1", raw), deep))
            else:
                raise MaskingError(f"json path {path!r}: bad bracket expression at offset {i}")
            i = m.end()
            continue
        m = _NAME.match(path, i)
        if not m:
            raise MaskingError(f"json path {path!r}: expected a name at offset {i}")
        steps.append(Step("key", m.group(0), deep))
        i = m.end()
    if not steps:
        raise MaskingError(f"json path {path!r}: selects the whole document; name a part of it")
    return tuple(steps)


State = frozenset[tuple[int, int]]
MaskWhole = Callable[[Any, Style], Any]


class JsonMasker:
    """Walks a parsed JSON value once, applying paths, secret keys and detectors."""

    def __init__(
        self,
        paths: tuple[tuple[tuple[Step, ...], Style], ...],
        mask_whole: MaskWhole,
        mask_text: Callable[[str, Counter[str]], str] | None,
        secret_key: Callable[[str], bool] | None,
        mask_secret: Callable[[Any], Any] | None,
    ) -> None:
        self.paths = paths
        self.mask_whole = mask_whole
        self.mask_text = mask_text
        self.secret_key = secret_key
        self.mask_secret = mask_secret
        self.start: State = frozenset((p, 0) for p in range(len(paths)))

    def _advance(self, state: State, key: str | int, size: int) -> tuple[State, Style | None]:
        """Next state for child ``key``; second item is the style of a completed path, if any."""
        nxt: set[tuple[int, int]] = set()
        done: Style | None = None
        for p, i in state:
            steps, style = self.paths[p]
            step = steps[i]
            if step.deep:
                nxt.add((p, i))
            if step.accepts(key, size):
                if i + 1 == len(steps):
                    done = style if done is None else done.stronger(style)
                else:
                    nxt.add((p, i + 1))
        return frozenset(nxt), done

    def mask(self, value: Any, counts: Counter[str]) -> Any:
        try:
            return self._walk(value, self.start, counts)
        except RecursionError:
            raise MaskingError("JSON document nested too deeply to mask") from None

    def _walk(self, value: Any, state: State, counts: Counter[str], secret: bool = False) -> Any:
        """``secret``: ``value`` is (inside) the value of a secret key, so every scalar in it is masked."""
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            size = len(value)
            for k, v in value.items():
                if not isinstance(k, str):
                    raise MaskingError(f"JSON object key {type(k).__name__} is not a string")
                done: Style | None = None
                sub = state
                if state:
                    sub, done = self._advance(state, k, size)
                if done is not None:
                    counts["path"] += 1
                    v = self.mask_whole(v, done)
                elif (
                    not secret
                    and self.secret_key is not None
                    and self.mask_secret is not None
                    and v is not None
                    and self.secret_key(k)
                ):
                    # {"password": "x"}, and as well {"password": ["x", "y"]} or {"api_key": {"live": "x"}}
                    v = self._walk(v, sub, counts, secret=True)
                else:
                    v = self._walk(v, sub, counts, secret)
                if self.mask_text is not None:
                    k = self.mask_text(k, counts)
                    if k in out:
                        n = 2
                        while f"{k} ({n})" in out:
                            n += 1
                        k = f"{k} ({n})"
                out[k] = v
            return out
        if isinstance(value, list):
            size = len(value)
            result: list[Any] = []
            for idx, v in enumerate(value):
                hit: Style | None = None
                sub = state
                if state:
                    sub, hit = self._advance(state, idx, size)
                if hit is not None:
                    counts["path"] += 1
                    result.append(self.mask_whole(v, hit))
                else:
                    result.append(self._walk(v, sub, counts, secret))
            return result
        if secret and value is not None and self.mask_secret is not None:
            counts["secret_assignment"] += 1
            return self.mask_secret(value)
        if self.mask_text is None:
            return value
        if isinstance(value, str):
            return self.mask_text(value, counts)
        # A number is checked as its digits: 4111111111111111, and 4111111111111111.0 (a numeric(20,1) or
        # float8 in JSON) as the same digits.
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e21)
        if integral and not isinstance(value, bool):
            text = str(int(value))
            masked = self.mask_text(text, counts)
            return value if masked == text else masked
        return value


def scalar_text(value: Any) -> str:
    """The text a non-string scalar is masked as (its JSON form)."""
    return json.dumps(value)
