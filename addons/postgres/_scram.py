"""Client side of PostgreSQL password authentication: SCRAM-SHA-256 and md5.

The gateway logs in to the target server with credentials it holds; these are the two password methods a
server may ask for (besides cleartext). SCRAM follows RFC 5802 and RFC 7677 without channel binding
(GS2 header ``n,,``). PostgreSQL ignores the SCRAM user name (it uses the one from the startup packet), so
the client sends an empty ``n=`` by default, as libpq does.

Passwords are prepared with SASLprep (RFC 4013) like the server does when it stores a SCRAM verifier; a
password that SASLprep rejects is used as raw UTF-8 bytes, again like the server.
"""

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from functools import lru_cache

__all__ = [
    "DEFAULT_MAX_ITERATIONS",
    "SCRAM_SHA_256",
    "ScramClient",
    "ScramError",
    "choose_mechanism",
    "md5_password",
    "saslprep",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
# The server chooses the iteration count; a hostile or misconfigured one must not stall the gateway.
DEFAULT_MAX_ITERATIONS = 10_000_000
_GS2_HEADER = b"n,,"


class ScramError(Exception):
    """The SCRAM exchange failed: a malformed server message, a wrong nonce or signature, or ``e=``."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: ``"md5" + md5(md5(password + user) + salt)`` in hex."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()


def choose_mechanism(mechanisms: tuple[str, ...] | list[str]) -> str:
    """Pick SCRAM-SHA-256 from the server's list (the -PLUS variant needs channel binding over TLS)."""
    if SCRAM_SHA_256 in mechanisms:
        return SCRAM_SHA_256
    raise ScramError(f"server offers no supported SASL mechanism: {', '.join(mechanisms) or 'none'}")


def _in_prohibited(char: str) -> bool:
    return (
        stringprep.in_table_c12(char)
        or stringprep.in_table_c21_c22(char)
        or stringprep.in_table_c3(char)
        or stringprep.in_table_c4(char)
        or stringprep.in_table_c5(char)
        or stringprep.in_table_c6(char)
        or stringprep.in_table_c7(char)
        or stringprep.in_table_c8(char)
        or stringprep.in_table_c9(char)
    )


def saslprep(password: str) -> str | None:
    """SASLprep (RFC 4013, stored-strings profile); None where the server would use the raw password."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return None
    for char in normalized:
        if _in_prohibited(char) or stringprep.in_table_a1(char):
            return None
    if any(stringprep.in_table_d1(c) for c in normalized):
        if any(stringprep.in_table_d2(c) for c in normalized):
            return None
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return None
    return normalized


def _normalize_password(password: str) -> bytes:
    prepared = saslprep(password)
    return (prepared if prepared is not None else password).encode("utf-8")


@lru_cache(maxsize=64)
def _keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey); PBKDF2 costs milliseconds, and upstream logins repeat the same inputs."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return client_key, server_key


def _attributes(message: bytes, what: str) -> dict[str, bytes]:
    attributes: dict[str, bytes] = {}
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=":
            raise ScramError(f"malformed {what}: {message!r}")
        attributes.setdefault(chr(part[0]), part[2:])
    return attributes


class ScramClient:
    """One SCRAM-SHA-256 exchange, client side, without channel binding.

    Usage: send ``sasl_initial_response(SCRAM_SHA_256, client.client_first())``; on AuthenticationSASLContinue
    send ``sasl_response(client.client_final(data))``; on AuthenticationSASLFinal call
    ``client.verify_server_final(data)``, which raises :class:`ScramError` unless the server proved that it
    knows the verifier. Only then is the following AuthenticationOk to be trusted.
    """

    def __init__(
        self,
        password: str,
        *,
        user: str = "",
        nonce: str | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        """:param user: the SCRAM user name; PostgreSQL ignores it, so the default empty name is fine.
        :param nonce: the client nonce, random by default (tests pass a fixed one).
        :param max_iterations: refuse a server-first-message asking for more PBKDF2 rounds than this.
        """
        self._password = _normalize_password(password)
        self._nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(18)).decode()
        if not self._nonce or "," in self._nonce or not self._nonce.isprintable():
            raise ValueError("invalid client nonce")
        self._max_iterations = max_iterations
        name = user.replace("=", "=3D").replace(",", "=2C").encode("utf-8")
        self._client_first_bare = b"n=" + name + b",r=" + self._nonce.encode()
        self._auth_message: bytes | None = None
        self._server_key: bytes | None = None
        self.done = False

    def client_first(self) -> bytes:
        """The client-first-message (the SASLInitialResponse data)."""
        return _GS2_HEADER + self._client_first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final-message answering the server-first-message (AuthenticationSASLContinue data)."""
        if self._auth_message is not None:
            raise ScramError("client_final called twice")
        attrs = _attributes(server_first, "server-first-message")
        if "m" in attrs:
            raise ScramError("server requires an unsupported SCRAM extension")
        try:
            nonce = attrs["r"]
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except (KeyError, ValueError) as exc:
            raise ScramError(f"malformed server-first-message: {server_first!r}") from exc
        if not nonce.startswith(self._nonce.encode()) or len(nonce) <= len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        if not salt:
            raise ScramError("empty salt in server-first-message")
        if not 1 <= iterations <= self._max_iterations:
            raise ScramError(f"iteration count {iterations} out of range 1..{self._max_iterations}")
        client_key, server_key = _keys(self._password, salt, iterations)
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = b"c=" + base64.b64encode(_GS2_HEADER) + b",r=" + nonce
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._auth_message = auth_message
        self._server_key = server_key
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal data); raise ScramError if wrong."""
        if self._auth_message is None or self._server_key is None:
            raise ScramError("server-final-message before client-final-message")
        attrs = _attributes(server_final, "server-final-message")
        if "e" in attrs:
            raise ScramError(f"server reported an error: {attrs['e'].decode(errors='replace')}")
        try:
            verifier = base64.b64decode(attrs["v"], validate=True)
        except (KeyError, ValueError) as exc:
            raise ScramError(f"malformed server-final-message: {server_final!r}") from exc
        expected = hmac.digest(self._server_key, self._auth_message, "sha256")
        if not hmac.compare_digest(verifier, expected):
            raise ScramError("server signature does not match: the server does not know the password")
        self.done = True
