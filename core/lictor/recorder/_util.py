"""Small helpers shared by the recorder modules: JSON encoding, sizes, durations, atomic files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..audit import AuditError

__all__ = [
    "RecordingError",
    "SpoolFull",
    "canonical",
    "encode",
    "parse_interval",
    "parse_size",
    "sha256_hex",
    "write_atomic",
]


class RecordingError(AuditError):
    """An event could not be made durable locally; the command it describes must not go ahead.

    A subclass of :class:`~lictor.AuditError`, so every place that fails closed on an audit
    failure fails closed on a recording failure too.
    """


class SpoolFull(RecordingError):
    """The spool reached its configured maximum size (a sink is behind or down)."""


# One encoder instance: ``json.dumps`` with options builds a new encoder per call, which costs
# more than the encoding of a small event. ASCII output keeps every body valid UTF-8 (lone
# surrogates from undecodable terminal bytes are escaped) and never contains a raw newline.
def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


encode = json.JSONEncoder(separators=(",", ":"), default=_default).encode
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode_bytes(value: Any) -> bytes:
    """Compact JSON as bytes, for events on the hot path: orjson (about 10x the standard encoder).

    Its output is UTF-8 with control characters escaped (never a raw newline). What orjson
    refuses (lone surrogates, integers beyond 64 bits) goes through the standard encoder, whose
    ASCII output is valid UTF-8 too.
    """
    try:
        return orjson.dumps(value, default=_default, option=_ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        return encode(value).encode()


def decode_json(data: bytes) -> Any:
    """Parse JSON bytes (orjson; the standard parser for what it refuses, such as NaN)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=_default).encode


def canonical(value: Mapping[str, Any]) -> bytes:
    """Sorted-key compact JSON: the bytes a manifest signature covers."""
    return _canonical(value).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: Any, what: str) -> int:
    """``1048576``, ``512KiB``, ``64MB``, ``1GiB`` -> bytes (KB = 1000, KiB = 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: a size cannot be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{what}: expected a size like 512MiB or 10GB, got {value!r}")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary or unit == "" else 1000
    return int(number * base ** _UNITS[unit])


_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_interval(value: Any, what: str) -> float:
    """``5ms``, ``2s``, ``30d``, ``1h30m`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like 5ms or 30d, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what}: a duration cannot be negative")
        return float(value)
    text = str(value).strip().lower()
    pos, total = 0, 0.0
    for m in _INTERVAL.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{what}: expected a duration like 5ms, 10s, 15m or 30d, got {value!r}")
    return total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` by write + fsync + rename + directory fsync."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
