"""JSON Schema fragments (Draft 2020-12) for the masking parts of a rule pack.

The rule-pack schema composes them: ``MASK_SCHEMA`` is the value of a rule's ``mask:`` key and
``DETECTOR_SCHEMA`` the value of one entry of the pack-level ``detectors:`` mapping (whose keys
match ``DETECTOR_NAME_PATTERN``).
"""

from typing import Any

from ._detectors import BUILTIN_DETECTORS
from ._styles import STYLES
from ._validators import VALIDATORS

DETECTOR_NAME_PATTERN = "^[a-z][a-z0-9_]{0,63}$"

_STYLE: dict[str, Any] = {
    "enum": list(STYLES),
    "description": "How a value is masked: redact (token), partial (keep the last N letters/digits), "
    "hash (keyed HMAC token), preserve-length (same length and character classes).",
}
_KEEP: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "maximum": 64,
    "description": "For style partial: how many trailing letters/digits stay visible (default 4).",
}

MASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What to mask in the responses of the requests this rule matches.",
    "properties": {
        "detectors": {
            "type": "array",
            "description": "Detector names: built-in (" + ", ".join(BUILTIN_DETECTORS) + ") or the pack's own.",
            "items": {"type": "string", "pattern": DETECTOR_NAME_PATTERN},
            "uniqueItems": True,
        },
        "columns": {
            "type": "array",
            "description": "Column-name globs (case-insensitive); the whole value is masked.",
            "items": {"type": "string", "minLength": 1},
            "uniqueItems": True,
        },
        "json_paths": {
            "type": "array",
            "description": "JSON paths ($.a.b, $.a[*].b, $..key, $.a.*); the whole value is masked.",
            "items": {"type": "string", "pattern": "^\\$"},
            "uniqueItems": True,
        },
        "style": _STYLE,
        "keep": _KEEP,
    },
    "anyOf": [
        {"required": ["detectors"], "properties": {"detectors": {"minItems": 1}}},
        {"required": ["columns"], "properties": {"columns": {"minItems": 1}}},
        {"required": ["json_paths"], "properties": {"json_paths": {"minItems": 1}}},
    ],
    "additionalProperties": False,
}

DETECTOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A custom detector: a bounded re2 pattern, an optional validator and group.",
    "properties": {
        "pattern": {
            "type": "string",
            "minLength": 1,
            "description": "re2 syntax; matches must be bounded (use {1,64}, not + or *), at most 4096 bytes.",
        },
        "validator": {"enum": sorted(VALIDATORS), "description": "Check run on each candidate."},
        "group": {"type": "integer", "minimum": 0, "description": "Capture group to mask (0: whole match)."},
        "style": _STYLE,
        "keep": _KEEP,
    },
    "required": ["pattern"],
    "additionalProperties": False,
}
