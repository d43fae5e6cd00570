"""Tamper evidence for recordings: a hash chain per session and an Ed25519-signed manifest.

Every session event is stored as the exact bytes that were spooled (compact ASCII JSON)::

    {"s": SESSION, "n": N, "t": TIME, "kind": KIND, "dir": DIRECTION, "data": {...}, "prev": HEX}

``n`` counts from 0 without gaps; ``prev`` is SHA-256 of the previous event's bytes (64 zeros for
event 0). When the session ends, a manifest names the number of events and SHA-256 of the last
one (``head``) and is signed with the gateway's recording key (``recording.key`` in the state
directory, created on first use; ``recording.pub`` next to it is what verifiers need). The
signature covers ``"lictor-recording-manifest/v1\\n" || canonical JSON of the manifest``.

What this detects: an edited, deleted, inserted or reordered event (the chain breaks at it); a
truncated tail or a swapped session (the manifest's count and head); an edited manifest (the
signature). What it does not: someone holding ``recording.key`` can rewrite a whole session and
sign it again, so keep a copy of ``recording.pub`` (and ideally of the manifests) where the
gateway cannot write; a session whose gateway died is signed when the gateway restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .._text import printable
from ._util import RecordingError, b64, canonical, sha256_hex, unb64

__all__ = ["GENESIS", "SessionVerdict", "SigningKey", "load_public_key", "verify_manifest", "verify_session"]

GENESIS = "0" * 64
_DOMAIN = b"lictor-recording-manifest/v1\n"


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


class SigningKey:
    """The gateway's Ed25519 recording key: ``recording.key`` (private) and ``recording.pub``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "recording.key"
        self.public_path = Path(state_dir) / "recording.pub"
        if self.path.exists():
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise RecordingError(f"{self.path}: not an Ed25519 private key")
            self._key = key
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._key = ed25519.Ed25519PrivateKey.generate()
            pem = self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
        self.public = self._key.public_key()
        self.key_id = key_id(self.public)
        pub_pem = self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not self.public_path.exists() or self.public_path.read_bytes() != pub_pem:
            self.public_path.write_bytes(pub_pem)

    def sign(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The stored manifest document: ``{"manifest": ..., "key": KEY_ID, "sig": BASE64}``."""
        signature = self._key.sign(_DOMAIN + canonical(manifest))
        return {"manifest": dict(manifest), "key": self.key_id, "sig": b64(signature)}


def load_public_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from PEM (``recording.pub``) or from the private key file."""
    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise RecordingError(f"{path}: not an Ed25519 key")
        return private.public_key()
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise RecordingError(f"{path}: not an Ed25519 public key")
    return public


def verify_manifest(doc: Mapping[str, Any], public: ed25519.Ed25519PublicKey) -> str:
    """ "" when ``doc`` carries a valid signature by ``public``, else what is wrong."""
    manifest = doc.get("manifest")
    sig = doc.get("sig")
    if not isinstance(manifest, Mapping) or not isinstance(sig, str):
        return "the manifest is malformed"
    try:
        public.verify(unb64(sig), _DOMAIN + canonical(manifest))
    except (InvalidSignature, ValueError):
        if doc.get("key") != key_id(public):
            return f"the manifest is signed by key {doc.get('key')}, not by {key_id(public)}"
        return "the manifest signature does not verify (manifest edited)"
    return ""


def _with_last(lines: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Each of ``lines`` with whether it is the last one (read one ahead: the lines may be streamed)."""
    stream = iter(lines)
    current = next(stream, None)
    while current is not None:
        following = next(stream, None)
        yield current, following is None
        current = following


@dataclass(frozen=True)
class SessionVerdict:
    """The result of checking one session: ``first_bad`` is the event number to look at."""

    session: str
    ok: bool
    events: int
    signed: bool
    first_bad: int | None = None
    problem: str = ""
    interrupted: bool = False

    def __str__(self) -> str:
        # One line, control characters escaped: the id and the problem quote the files checked, which someone
        # who edited them chose (a "\r\x1b[2K...: OK" in a manifest would redraw the verdict on a terminal).
        session, problem = printable(self.session, keep=""), printable(self.problem, keep="")
        if not self.ok:
            where = f" at event {self.first_bad}" if self.first_bad is not None else ""
            return f"{session}: BROKEN{where}: {problem}"
        if not self.signed:
            return f"{session}: chain OK ({self.events} events), UNSIGNED: {problem}"
        note = " (interrupted: signed at gateway restart)" if self.interrupted else ""
        return f"{session}: OK, {self.events} events, chain intact, manifest signed{note}"


def verify_session(
    session_id: str,
    lines: Iterable[bytes],
    manifest: Mapping[str, Any] | None,
    public: ed25519.Ed25519PublicKey | None,
) -> SessionVerdict:
    """Check the chain of ``lines`` (the stored event bytes, in order) and the signed manifest."""
    prev = GENESIS
    count = 0
    for index, (raw, last) in enumerate(_with_last(lines)):
        line = raw.rstrip(b"\n")
        try:
            event = json.loads(line)
        except ValueError:
            # Every stored event ends with a newline: only the last one can be cut short by a write that did
            # not finish (a full disk), or by someone; a line with others after it that does not parse was
            # edited (the stores hand lines over without their newline: the position tells).
            problem = (
                "the last event is cut short (a write that did not finish, as on a full disk, or an edit)"
                if last and not raw.endswith(b"\n")
                else "the event is not valid JSON (edited)"
            )
            return SessionVerdict(session_id, False, index, False, index, problem)
        if not isinstance(event, dict):
            return SessionVerdict(session_id, False, index, False, index, "the event is not a JSON object (edited)")
        if event.get("s") != session_id:
            return SessionVerdict(session_id, False, index, False, index, "the event belongs to another session")
        if event.get("n") != index:
            return SessionVerdict(
                session_id,
                False,
                index,
                False,
                index,
                f"event number {event.get('n')!r} where {index} was expected (events deleted, inserted or reordered)",
            )
        if event.get("prev") != prev:
            bad = max(index - 1, 0)
            return SessionVerdict(
                session_id,
                False,
                index,
                False,
                bad,
                f"event {index} does not chain to event {bad}: event {bad} was altered (or event {index}'s prev-hash)",
            )
        prev = sha256_hex(line)
        count = index + 1
    if manifest is None:
        return SessionVerdict(session_id, True, count, False, None, "no manifest yet (session open, or not drained)")
    body = manifest.get("manifest") if isinstance(manifest, Mapping) else None
    if not isinstance(body, Mapping) or body.get("session") != session_id:
        return SessionVerdict(session_id, False, count, False, None, "the manifest is malformed or for another session")
    interrupted = bool(body.get("interrupted"))
    if public is None:
        return SessionVerdict(session_id, False, count, False, None, "no public key to check the manifest signature")
    problem = verify_manifest(manifest, public)
    if problem:
        return SessionVerdict(session_id, False, count, False, None, problem, interrupted)
    expected = body.get("events")
    if not isinstance(expected, int) or expected != count:
        bad = min(count, expected) if isinstance(expected, int) else count
        return SessionVerdict(
            session_id,
            False,
            count,
            True,
            bad,
            f"the signed manifest lists {expected} events, the recording has {count} (truncated or extended)",
            interrupted,
        )
    if body.get("head") != prev:
        return SessionVerdict(
            session_id,
            False,
            count,
            True,
            max(count - 1, 0),
            f"event {max(count - 1, 0)} does not match the signed manifest head (altered)",
            interrupted,
        )
    return SessionVerdict(session_id, True, count, True, None, "", interrupted)
