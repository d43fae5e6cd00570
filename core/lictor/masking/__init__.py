"""Masking engine: finds sensitive data in responses and masks it.

Detectors (re2 patterns plus validators such as Luhn) are compiled into one alternation that
scans the input in a single linear-time pass. A :class:`MaskPlan` is compiled from the
``mask:`` blocks of the rules that matched a request and is applied to free text, byte
streams (with a bounded hold-back across chunks), parsed JSON (paths and detectors) and
tabular results (column globs and detectors). See docs/masking.md.
"""

from ._detectors import (
    BUILTIN_DETECTORS,
    JWT_LIMIT,
    MAX_CUSTOM_MATCH,
    PEM_LIMIT,
    Detector,
    compile_detector,
)
from ._errors import MaskingError
from ._json import parse_path
from ._plan import ColumnMasker, MaskPlan
from ._schema import DETECTOR_NAME_PATTERN, DETECTOR_SCHEMA, MASK_SCHEMA
from ._stream import StreamMasker
from ._styles import STYLES
from ._validators import VALIDATORS

__all__ = [
    "BUILTIN_DETECTORS",
    "DETECTOR_NAME_PATTERN",
    "DETECTOR_SCHEMA",
    "JWT_LIMIT",
    "MASK_SCHEMA",
    "MAX_CUSTOM_MATCH",
    "PEM_LIMIT",
    "STYLES",
    "VALIDATORS",
    "ColumnMasker",
    "Detector",
    "MaskPlan",
    "MaskingError",
    "StreamMasker",
    "compile_detector",
    "parse_path",
]
