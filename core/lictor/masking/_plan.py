"""MaskPlan: the compiled union of the ``mask:`` blocks that apply to a request."""

import fnmatch
import functools
import json
import re
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..vocabulary import glob_to_regex
from ._detectors import BUILTIN_DETECTORS, SECRET_KEY_AT_END, Detector, compile_detector
from ._errors import MaskingError
from ._json import JsonMasker, Step, parse_path, scalar_text
from ._scan import Scanner
from ._stream import StreamMasker
from ._styles import DEFAULT_KEEP, STYLES, Style, apply_style

_PROCESS_KEY = secrets.token_bytes(32)


@functools.lru_cache(maxsize=64)
def _scanner(detectors: tuple[Detector, ...], styles: tuple[Style, ...], key: bytes) -> Scanner:
    """Scanners are immutable and costly to build (re2 compiles the combined automaton), and the
    same combinations of rules come back request after request: share them."""
    return Scanner(detectors, styles, key)


_MASK_KEYS = frozenset({"detectors", "columns", "json_paths", "style", "keep"})
_UTF8 = "utf-8"
_SURR = "surrogatepass"


def _str_list(block: Mapping[str, Any], field: str) -> list[str]:
    value = block.get(field, [])
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise MaskingError(f"mask.{field} must be a list of non-empty strings, got {value!r}")
    return list(value)


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: json.loads accepts them and json.dumps would write them back."""
    raise ValueError(f"{name} is not valid JSON")


# A JSON \u escape, also with its backslash doubled (or doubled again) as a row's or an array's text writes
# a json value inside it: ""jane\\u0040example.com"" is still an escape to whoever reads the row, then the JSON.
_U_ESCAPE = re.compile(rb"\\+u([0-9A-Fa-f]{4})")


def _unescape(m: re.Match[bytes]) -> bytes:
    return chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass")


class ColumnMasker:
    """Masks the values of a result set's columns, by column index.

    A column whose name matches a glob of the plan is masked whole (counted as ``column``);
    the other columns are scanned by the plan's detectors. ``needs_masking`` is False when no
    column is masked and the plan has no detector, so the caller can relay rows untouched.
    Values are the column's text representation in UTF-8.
    """

    __slots__ = ("_plan", "_styles", "counts", "names", "needs_masking")

    _DETECT: ClassVar[Style] = Style("redact")  # sentinel: scan with detectors

    def __init__(self, plan: "MaskPlan", names: Sequence[str]) -> None:
        self._plan = plan
        self.names = tuple(names)
        styles: list[Style | None] = []
        for name in self.names:
            lname = name.lower()
            chosen: Style | None = None
            for glob, style in plan._columns:
                if fnmatch.fnmatchcase(lname, glob):
                    chosen = style if chosen is None else chosen.stronger(style)
            if chosen is None and plan._scanner is not None:
                chosen = self._DETECT
            styles.append(chosen)
        self._styles = tuple(styles)
        self.needs_masking = any(s is not None for s in styles)
        self.counts: Counter[str] = Counter()

    def action(self, index: int) -> str:
        """``pass``, ``detect`` or ``whole`` for column ``index``."""
        style = self._style(index)
        return "pass" if style is None else "detect" if style is self._DETECT else "whole"

    def _style(self, index: int) -> Style | None:
        if not 0 <= index < len(self._styles):
            raise MaskingError(f"column index {index} out of range (the result has {len(self._styles)} columns)")
        return self._styles[index]

    def mask_value(self, index: int, value: bytes) -> bytes:
        """The masked value of column ``index``."""
        style = self._style(index)
        if style is None:
            return value
        plan = self._plan
        if style is self._DETECT:
            assert plan._scanner is not None
            out: list[bytes] = []
            plan._scanner.scan(value, 0, True, out, self.counts)
            return b"".join(out)
        self.counts["column"] += 1
        return apply_style(style, plan._key, "column", value)

    def mask_json_value(self, index: int, value: bytes) -> bytes:
        """Like :meth:`mask_value` for a column holding a JSON document: the result stays valid JSON
        (a detector match in a number becomes a string, a masked whole value a JSON string)."""
        style = self._style(index)
        if style is None:
            return value
        if style is self._DETECT:
            try:
                masked, counts = self._plan.mask_json_bytes(value)
            except MaskingError:  # not JSON after all: mask it as text
                plain = _U_ESCAPE.sub(_unescape, value)
                if plain != value:
                    # jane\u0040example.com as plain text: anyone reads the address in it. What the detectors
                    # find once the escapes are read is masked, in the text as read.
                    found, counts = self._plan.mask_bytes(plain)
                    if counts:
                        self.counts.update(counts)
                        return found
                return self.mask_value(index, value)
            self.counts.update(counts)
            return masked
        whole = self.mask_value(index, value)
        return json.dumps(whole.decode("utf-8", "replace"), ensure_ascii=False).encode()


class MaskPlan:
    """What to mask and how, compiled once per rule-pack version and shared by all requests.

    Build one with :meth:`compile`. A plan is immutable and thread-safe; the objects it hands
    out (stream and column maskers) carry the per-response state.
    """

    EMPTY: ClassVar["MaskPlan"]

    def __init__(
        self,
        detectors: Sequence[Detector] = (),
        detector_styles: Sequence[Style] = (),
        columns: Sequence[tuple[str, Style]] = (),
        json_paths: Sequence[tuple[str, Style]] = (),
        key: bytes | None = None,
    ) -> None:
        if key is None:
            key = _PROCESS_KEY
        if not isinstance(key, bytes) or len(key) < 16:
            raise MaskingError("the masking key must be at least 16 bytes")
        self._key = key
        self._detectors = tuple(detectors)
        self._detector_styles = tuple(detector_styles)
        self._columns = tuple((glob.lower(), style) for glob, style in columns)
        self._json_paths = tuple(json_paths)
        self._scanner = _scanner(self._detectors, self._detector_styles, key) if self._detectors else None
        parsed: tuple[tuple[tuple[Step, ...], Style], ...] = tuple(
            (parse_path(path), style) for path, style in self._json_paths
        )
        secret = self._style_of("secret_assignment")
        self._json = JsonMasker(
            parsed,
            self._mask_json_whole,
            self._mask_json_text if self._scanner is not None else None,
            (lambda k: SECRET_KEY_AT_END.search(k) is not None) if secret is not None else None,
            (lambda v: self._mask_json_scalar(v, secret, "secret_assignment")) if secret is not None else None,
        )
        # The paths anchored at the root ($.a.b, not $..b), alone: applied again to a document embedded in
        # the response (see mask_json_anchored), where recursive ones already reached.
        self._anchored = JsonMasker(
            tuple(p for p in parsed if not p[0][0].deep), self._mask_json_whole, None, None, None
        )

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def compile(
        cls,
        specs: Sequence[Mapping[str, Any]],
        custom_detectors: Mapping[str, Detector] = {},
        key: bytes | None = None,
    ) -> "MaskPlan":
        """Merge several ``mask:`` blocks into one plan (union; the strongest style wins).

        ``custom_detectors`` are the pack's own detectors by name. ``key`` is the gateway's
        secret for the ``hash`` and ``preserve-length`` styles; without it a random key of this
        process is used, so tokens are stable only until the process restarts.
        Raises :class:`MaskingError` on an unknown detector, style, key or a bad path.
        """
        custom: dict[str, Detector] = {}
        for name, given in custom_detectors.items():
            if name in BUILTIN_DETECTORS:
                raise MaskingError(f"custom detector {name!r} has the name of a built-in detector")
            if not isinstance(given, Detector) or given.name != name:
                raise MaskingError(f"custom detector {name!r} must be a Detector named {name!r}")
            custom[name] = compile_detector(
                given.name, given.pattern, given.validator, given.group, style=given.style, keep=given.keep
            )
        det_styles: dict[str, Style] = {}
        columns: dict[str, Style] = {}
        paths: dict[str, Style] = {}
        for block in specs:
            if not isinstance(block, Mapping):
                raise MaskingError(f"a mask block must be a mapping, got {type(block).__name__}")
            unknown = set(block) - _MASK_KEYS
            if unknown:
                raise MaskingError(
                    f"unknown key(s) in mask block: {', '.join(sorted(map(str, unknown)))}; "
                    f"expected {', '.join(sorted(_MASK_KEYS))}"
                )
            names = _str_list(block, "detectors")
            globs = _str_list(block, "columns")
            jpaths = _str_list(block, "json_paths")
            if not (names or globs or jpaths):
                raise MaskingError("a mask block must name detectors, columns or json_paths")
            explicit = "style" in block
            kind = block.get("style", "redact")
            if kind not in STYLES:
                raise MaskingError(f"unknown masking style {kind!r}; expected one of {', '.join(STYLES)}")
            keep = block.get("keep")
            block_style = Style(kind, DEFAULT_KEEP if keep is None else keep)
            for name in names:
                det: Detector | None = BUILTIN_DETECTORS.get(name) or custom.get(name)
                if det is None:
                    raise MaskingError(
                        f"unknown detector {name!r}; built-in detectors are "
                        f"{', '.join(BUILTIN_DETECTORS)}" + (f", custom ones {', '.join(custom)}" if custom else "")
                    )
                if explicit or det.style is None:
                    style = block_style
                else:
                    own_keep = det.keep if det.keep is not None else DEFAULT_KEEP
                    style = Style(det.style, own_keep if keep is None else keep)
                prev = det_styles.get(name)
                det_styles[name] = style if prev is None else prev.stronger(style)
            for glob in globs:
                try:
                    # fnmatch would read an unclosed "[" as a literal: the column meant would go unmasked
                    glob_to_regex(glob)
                except ValueError as exc:
                    raise MaskingError(f"mask.columns: {exc}") from None
                prev = columns.get(glob.lower())
                columns[glob.lower()] = block_style if prev is None else prev.stronger(block_style)
            for jpath in jpaths:
                parse_path(jpath)
                prev = paths.get(jpath)
                paths[jpath] = block_style if prev is None else prev.stronger(block_style)
        ordered = [d for d in BUILTIN_DETECTORS.values() if d.name in det_styles]
        ordered += [d for d in custom.values() if d.name in det_styles]
        return cls(
            ordered,
            [det_styles[d.name] for d in ordered],
            list(columns.items()),
            list(paths.items()),
            key,
        )

    # -- introspection ---------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        """True when the plan masks nothing: callers may relay data untouched."""
        return not (self._detectors or self._columns or self._json_paths)

    @property
    def detectors(self) -> tuple[str, ...]:
        """Names of the detectors the plan scans for, in precedence order."""
        return tuple(d.name for d in self._detectors)

    @property
    def has_detectors(self) -> bool:
        return self._scanner is not None

    @property
    def has_columns(self) -> bool:
        return bool(self._columns)

    @property
    def has_json_paths(self) -> bool:
        return bool(self._json_paths)

    @property
    def max_hold_back(self) -> int:
        """Upper bound of the bytes a stream masker of this plan holds back, beyond one chunk."""
        if self._scanner is None:
            return 0
        ext = max((d.extend_limit for d in self._detectors), default=0)
        return 2 * self._scanner.reach + self._scanner.back + ext

    def _style_of(self, name: str) -> Style | None:
        for det, style in zip(self._detectors, self._detector_styles, strict=True):
            if det.name == name:
                return style
        return None

    def __repr__(self) -> str:
        return (
            f"MaskPlan(detectors={list(self.detectors)}, columns={[g for g, _ in self._columns]}, "
            f"json_paths={[p for p, _ in self._json_paths]})"
        )

    # -- masking ---------------------------------------------------------------------------
    def mask_bytes(self, data: bytes) -> tuple[bytes, Counter[str]]:
        """Mask detector matches in ``data`` (UTF-8; invalid bytes pass through unchanged)."""
        counts: Counter[str] = Counter()
        if self._scanner is None:
            return bytes(data), counts
        out: list[bytes] = []
        self._scanner.scan(bytes(data), 0, True, out, counts)
        return b"".join(out), counts

    def mask_text(self, text: str) -> tuple[str, Counter[str]]:
        """Mask detector matches in ``text``; returns the masked text and counts per detector."""
        counts: Counter[str] = Counter()
        if self._scanner is None:
            return text, counts
        return self._mask_str(text, counts), counts

    def _mask_str(self, text: str, counts: Counter[str]) -> str:
        assert self._scanner is not None
        data = text.encode(_UTF8, _SURR)
        out: list[bytes] = []
        self._scanner.scan(data, 0, True, out, counts)
        if len(out) == 1:
            return text
        return b"".join(out).decode(_UTF8, _SURR)

    def stream(self) -> StreamMasker:
        """A masker for one byte stream (one response body, one SSH channel direction...)."""
        return StreamMasker(self._scanner)

    def columns(self, names: Sequence[str]) -> ColumnMasker:
        """A masker for one result set with these column names."""
        return ColumnMasker(self, names)

    def mask_json(self, obj: Any) -> tuple[Any, Counter[str]]:
        """Mask a parsed JSON value: paths (whole value), secret keys, detectors on strings.

        Returns a new value; the input is not modified. Strings, numbers and booleans at a
        masked path become masked strings, ``null`` stays ``null``, and inside a masked object
        or array every scalar is masked (keys stay). Integers are scanned as their decimal text.
        """
        counts: Counter[str] = Counter()
        if self.is_empty:
            return obj, counts
        return self._json.mask(obj, counts), counts

    def mask_json_anchored(self, obj: Any) -> tuple[Any, Counter[str]]:
        """Apply only the JSON paths anchored at the root (``$.spec.x``, not ``$..x``) to ``obj``, taken
        as a document of its own: an object a response embeds (an item of a list, the object of a watch
        event), which :meth:`mask_json` of the whole response reached with its detectors and recursive
        paths but not with paths written for the object. Returns a new value and the counts."""
        counts: Counter[str] = Counter()
        if not self._anchored.paths:
            return obj, counts
        return self._anchored.mask(obj, counts), counts

    def mask_json_bytes(self, data: bytes) -> tuple[bytes, Counter[str]]:
        """Parse, mask and serialize a JSON document (compact UTF-8 output).

        Raises :class:`MaskingError` when ``data`` is not JSON.
        """
        try:
            obj = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise MaskingError(f"body is not valid JSON: {exc}") from None
        masked, counts = self.mask_json(obj)
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode(_UTF8, _SURR), counts

    # -- JSON helpers ----------------------------------------------------------------------
    def _mask_json_text(self, text: str, counts: Counter[str]) -> str:
        return self._mask_str(text, counts)

    def _mask_json_scalar(self, value: Any, style: Style, label: str) -> Any:
        if value is None:
            return None
        text = value if isinstance(value, str) else scalar_text(value)
        return apply_style(style, self._key, label, text.encode(_UTF8, _SURR)).decode(_UTF8, _SURR)

    def _mask_json_whole(self, value: Any, style: Style) -> Any:
        if isinstance(value, dict):
            return {k: self._mask_json_whole(v, style) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mask_json_whole(v, style) for v in value]
        return self._mask_json_scalar(value, style, "path")


MaskPlan.EMPTY = MaskPlan()
