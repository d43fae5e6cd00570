"""Who the agent is: JWT verification and Lictor's own token issuer.

Identity says *who*; the rule packs say *what that identity may do*. Tokens are verified with
pyjwt against one of the configured issuers:

* ``lictor`` — Lictor's own issuer for setups without an identity provider. An Ed25519 key in
  the state directory signs short tokens (well under OpenSSH's 1023-byte password limit).
* ``jwks`` — an identity provider's JWKS URL, cached, refreshed when a token names an unknown
  ``kid``. After a failed fetch the provider is not asked again for a cooldown: tokens whose key is
  not already known are refused at once (``Gateway.authenticate_async`` runs such verifications in a
  thread of the issuer's, so a slow provider holds up no other connection and no other issuer's logins).
* ``static`` — one or more PEM public keys.

Only asymmetric algorithms are accepted and each issuer has its own allow-list, so neither
``alg: none`` nor the HMAC/RSA confusion (a public key used as an HMAC secret) can pass.
``exp``, ``iss`` and ``aud`` are required; ``nbf`` and ``iat`` are checked when present.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

log = logging.getLogger("lictor")

__all__ = ["AuthError", "Identity", "IssuerConfig", "LocalIssuer", "TokenVerifier", "parse_duration"]

JWKS_TIMEOUT = 10.0  # seconds for a whole JWKS answer, from connecting to its last byte
JWKS_MAX_BYTES = 1 << 20  # a provider's key set is a few kilobytes
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
LOCAL_ISSUER = "lictor"
LOCAL_AUDIENCE = "lictor"


class AuthError(Exception):
    """The agent could not be authenticated; the message is safe to show to the agent."""


@dataclass(frozen=True)
class Identity:
    """A verified agent: the token's subject, its claims and the issuer that vouched for it."""

    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    issuer: str = ""
    token_id: str = ""
    expires_at: float | None = None
    method: str = "jwt"

    def claim(self, name: str) -> Any:
        """The claim ``name``; a dotted name that is not itself a claim reaches into nested objects
        (``realm_access.roles``, as Keycloak puts a user's roles)."""
        if name == "sub":
            return self.subject
        value = self.claims.get(name)
        if value is None and "." in name:
            value = self.claims
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        return value

    def to_json(self) -> dict[str, Any]:
        return {"sub": self.subject, "iss": self.issuer, "jti": self.token_id, "method": self.method}


def parse_duration(text: str | int | float) -> float:
    """Parse ``90``, ``90s``, ``15m``, ``1h``, ``2d`` or ``1h30m`` into seconds (a finite number)."""
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"bad duration {text!r}: not a finite number")
        return float(text)
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    problem = f"bad duration {text!r}: use forms like 30s, 15m, 1h, 2d"

    def amount(number: str) -> float:
        try:
            return float(number)
        except ValueError:  # "1.2.3"
            raise ValueError(problem) from None

    total = 0.0
    number = ""
    for ch in s:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += amount(number) * units[ch]
            number = ""
        else:
            raise ValueError(problem)
    if number:
        total += amount(number)
    if not math.isfinite(total):  # hundreds of digits: a token with it as its lifetime ended in a traceback
        raise ValueError(f"bad duration {_clip(text, 40)!r}: too large")
    return total


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted token issuer from the gateway config."""

    name: str
    type: str  # "lictor" | "jwks" | "static"
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str = ""
    public_keys: tuple[Any, ...] = ()


class LocalIssuer:
    """Lictor's own token issuer: an Ed25519 key kept in the state directory."""

    def __init__(self, state_dir: Path, issuer: str = LOCAL_ISSUER, audience: str = LOCAL_AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key_path = Path(state_dir) / "issuer.key"
        self._key = self._load_or_create()

    def _load_or_create(self) -> ed25519.Ed25519PrivateKey:
        if self.key_path.exists():
            from .config import ConfigError

            # a ConfigError, not AuthError: the gateway and `lictor token issue` stop with the file's name
            # (this was a traceback, or a PEM parser's message without any name)
            problem = f"{self.key_path}: Lictor's own issuer key is not an unencrypted Ed25519 private key in PEM"
            try:
                pem = self.key_path.read_bytes()
            except OSError as exc:  # not allowed to read it (`lictor token issue` as another user), a directory
                raise ConfigError(f"{self.key_path}: cannot read Lictor's own issuer key: {exc.strerror}") from None
            try:
                key = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{problem} ({exc})") from None
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ConfigError(f"{problem} (it holds {type(key).__name__})")
            self._keep_from_others()
            return key
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key

    def _keep_from_others(self) -> None:
        """Take other users' permissions away from a key that has them (copied in with the umask's mode, or
        chmod-ed by hand), and say so: any local user who read it can mint any identity. The group's are left
        as they are (a group allowed to run `lictor token issue`)."""
        try:
            mode = stat.S_IMODE(self.key_path.stat().st_mode)
        except OSError:
            return
        if not mode & 0o007:
            return
        advice = "whoever read it can mint any identity: if that may have happened, delete it (a new key is made"
        advice += " on the next start, and the tokens signed with this one stop verifying)"
        try:
            os.chmod(self.key_path, mode & ~0o007)
        except OSError as exc:  # not the file's owner
            log.warning(
                "%s is open to every local user (mode %o) and stays so (%s); %s", self.key_path, mode, exc, advice
            )
        else:
            log.warning(
                "%s was open to every local user (mode %o); it is not any more, but %s", self.key_path, mode, advice
            )

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._key.public_key()

    def issue(self, subject: str, claims: Mapping[str, Any] | None = None, ttl: float = 3600.0) -> str:
        """Sign a token for ``subject`` with extra ``claims``, valid for ``ttl`` seconds."""
        now = int(time.time())
        payload: dict[str, Any] = dict(claims or {})
        payload.update(
            {
                "sub": subject,
                "iss": self.issuer,
                "aud": self.audience,
                "iat": now,
                "nbf": now,
                "exp": now + int(ttl),
                "jti": uuid.uuid4().hex[:16],
            }
        )
        return jwt.encode(payload, self._key, algorithm="EdDSA")

    def config(self) -> IssuerConfig:
        return IssuerConfig(
            name="lictor",
            type="lictor",
            issuer=self.issuer,
            audience=(self.audience,),
            algorithms=("EdDSA",),
            public_keys=(self.public_key,),
        )


def _clip(text: str, limit: int = 200) -> str:
    """Error text that may quote the unverified token, cut short: the message goes to the agent and into
    the audit log, and the token may be as large as the protocol allows."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: Any) -> str:
    """A value read from an unverified token, quoted for an error message (see :func:`_clip`)."""
    return _clip(repr(value))


def _usable_keys(alg: str, keys: Sequence[Any]) -> list[Any]:
    """``keys`` prepared for ``alg``, without those of another key type: pyjwt raises TypeError for an EC
    key given to RS256 (and the reverse), which would end verification before the key that signed the
    token was tried."""
    algorithm = jwt.get_algorithm_by_name(alg)
    usable = []
    for key in keys:
        try:
            usable.append(algorithm.prepare_key(key))
        except (jwt.PyJWTError, TypeError, ValueError):
            continue
    return usable


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _UnusableJwks(jwt.PyJWKClientError):
    """The key set the endpoint answered has no key to use (empty, not an object, encryption keys only)."""


class _JwksClient(jwt.PyJWKClient):
    """pyjwt's JWKS client with a deadline for the whole answer and a limit on its size.

    urllib's timeout bounds each read, not the answer: an endpoint that sent a byte every few seconds held
    the fetch, and every login waiting for that issuer's keys, for as long as it went on; and the body was
    read whole into memory however large it was. Here a timer shuts the connection's sockets down when
    ``timeout`` has passed, which ends a read blocked on them, and at most ``JWKS_MAX_BYTES`` are read."""

    def get_signing_keys(self, refresh: bool = False) -> list[jwt.PyJWK]:
        """pyjwt's, with a key set that has no key to use told apart from a token whose kid is not in it: both
        were PyJWKClientError when the set was fetched again for an unknown kid."""
        try:
            return super().get_signing_keys(refresh)
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWTError as exc:
            raise _UnusableJwks(str(exc)) from None

    def fetch_data(self) -> Any:
        sockets: list[socket.socket] = []
        expired = threading.Event()

        def watched(base: type[http.client.HTTPConnection]) -> Any:
            class Connection(base):  # type: ignore[misc,valid-type]
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    create: Any = getattr(self, "_create_connection")  # noqa: B009 (set in __init__)

                    def create_connection(*a: Any, **kw: Any) -> socket.socket:
                        sock: socket.socket = create(*a, **kw)
                        sockets.append(sock)  # until TLS takes it over
                        return sock

                    self._create_connection = create_connection

                def connect(self) -> None:
                    super().connect()
                    sockets.append(self.sock)  # the TLS socket, or the same plain one

            return Connection

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req: Any) -> Any:
                return self.do_open(watched(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req: Any) -> Any:
                return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)  # type: ignore[attr-defined]

        def cut() -> None:
            expired.set()
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected yet, or handed over to TLS
                    pass

        handlers: list[Any] = [_NoRedirect(), Http(), Https(context=self.ssl_context)]
        timer = threading.Timer(self.timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            opener = urllib.request.build_opener(*handlers)
            request = urllib.request.Request(url=self.uri, headers=self.headers)  # noqa: S310 (http(s), checked at init)
            with opener.open(request, timeout=self.timeout) as resp:
                body = resp.read(JWKS_MAX_BYTES + 1)
            if expired.is_set():
                raise OSError("cut")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()
            if expired.is_set():
                problem = f"no complete answer within {self.timeout:g} s"
            else:
                problem = str(exc) if isinstance(exc, urllib.error.URLError) else f"{type(exc).__name__}: {exc}"
            raise jwt.PyJWKClientConnectionError(f'Fail to fetch data from the url, err: "{problem}"') from None
        finally:
            timer.cancel()
        if len(body) > JWKS_MAX_BYTES:
            raise jwt.PyJWKClientConnectionError(
                f'Fail to fetch data from the url, err: "the answer is larger than {JWKS_MAX_BYTES} bytes"'
            )
        try:
            data = json.loads(body)
        except RecursionError:  # not a ValueError: it ended the login as an internal error, without cooldown
            raise ValueError("its JSON is nested too deeply") from None
        jwk_set = self._as_jwk_set_payload(data)
        keys = jwk_set.get("keys")
        if isinstance(keys, list):
            # pyjwt skips a key it cannot use, but raises TypeError for one whose "alg" is not a string (a list,
            # an object): that ended every login with the provider's tokens as an internal error
            usable = [k for k in keys if not (isinstance(k, dict) and isinstance(k.get("alg"), list | dict))]
            jwk_set = {**jwk_set, "keys": usable}
        if self.jwk_set_cache is not None:
            self.jwk_set_cache.put(jwk_set)
        self._last_successful_fetch = time.monotonic()  # pyjwt's cooldown for unknown kids counts from here
        return jwk_set


class TokenVerifier:
    """Verifies agent JWTs against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        leeway: float = 30.0,
        jwks_cooldown: float = 30.0,
        jwks_timeout: float = JWKS_TIMEOUT,
    ) -> None:
        """``jwks_cooldown``: minimum seconds between refetches of a JWKS for unknown ``kid`` values,
        so tokens with random kids cannot make the gateway hammer the identity provider.
        ``jwks_timeout``: seconds a JWKS endpoint has for its whole answer."""
        if not issuers:
            raise ValueError("at least one token issuer must be configured")
        self.issuers: dict[str, IssuerConfig] = {}
        for cfg in issuers:
            if cfg.issuer in self.issuers:
                # one would silently replace the other: tokens of the first would stop verifying
                raise ValueError(
                    f"issuers {self.issuers[cfg.issuer].name} and {cfg.name} both have issuer {cfg.issuer!r}; "
                    "list all of its public keys and algorithms in one entry"
                )
            self.issuers[cfg.issuer] = cfg
        self.leeway = leeway
        self._jwks: dict[str, jwt.PyJWKClient] = {}
        self._jwks_cooldown = jwks_cooldown
        # When each JWKS last failed to load: for a cooldown, tokens naming a key not already fetched are
        # refused at once instead of each waiting for an identity provider that is down (fail closed).
        self._jwks_failed: dict[str, tuple[float, str]] = {}
        # Static keys, prepared once per algorithm: only those of the algorithm's key type (see _usable_keys).
        self._static_keys: dict[str, dict[str, list[Any]]] = {}
        for cfg in issuers:
            bad = [a for a in cfg.algorithms if a not in ASYMMETRIC_ALGORITHMS]
            if bad:
                raise ValueError(f"issuer {cfg.name}: algorithms {bad} are not allowed (asymmetric only)")
            if cfg.type != "jwks":
                self._static_keys[cfg.issuer] = {a: _usable_keys(a, cfg.public_keys) for a in cfg.algorithms}
            else:
                self._jwks[cfg.issuer] = _JwksClient(
                    cfg.jwks_url,
                    cache_keys=False,
                    lifespan=300,
                    timeout=jwks_timeout,
                    cooldown_duration=jwks_cooldown,
                )

    def may_fetch(self, token: str) -> bool:
        """Whether verifying ``token`` may fetch an identity provider's keys over the network (its issuer
        is a JWKS one): callers on an event loop run :meth:`verify` in a thread for such tokens."""
        return self.jwks_issuer(token) is not None

    def jwks_issuer(self, token: str) -> str | None:
        """The JWKS issuer whose keys verifying ``token`` may fetch over the network, or None: callers on an
        event loop run :meth:`verify` for such tokens in a thread of that issuer's, so that a provider slow
        to answer holds up no login with another issuer's tokens."""
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            return None
        cfg = self.issuers.get(iss) if isinstance(iss, str) else None
        return cfg.issuer if cfg is not None and cfg.type == "jwks" else None

    def _jwks_key(self, issuer: str, kid: Any) -> jwt.PyJWK:
        """The key named ``kid`` in ``issuer``'s JWKS, fetched (again) when needed; raises AuthError."""
        client = self._jwks[issuer]
        failed = self._jwks_failed.get(issuer)
        if failed is not None and time.monotonic() - failed[0] < self._jwks_cooldown:
            cached = client.jwk_set_cache.get() if client.jwk_set_cache is not None else None
            for key in cached.keys if isinstance(cached, jwt.PyJWKSet) else ():
                if key.key_id == kid and key.public_key_use in ("sig", None):
                    return key
            raise AuthError(
                f"cannot find the token's signing key: the identity provider's keys failed to load ({failed[1]}); "
                "retry later"
            )
        try:
            # The key set first (from the cache while it is fresh): what fails here is the endpoint's
            # answer, not the token, so it starts the cooldown. An empty set or a JSON array was asked
            # for again for every token.
            client.get_signing_keys()
        except jwt.PyJWKClientConnectionError as exc:
            raise self._jwks_unavailable(issuer, str(exc)) from None
        except jwt.PyJWTError as exc:
            raise self._jwks_unavailable(issuer, f"the JWKS is unusable: {_clip(str(exc))}") from None
        except (OSError, ValueError) as exc:  # a connection reset while reading, a body that is not JSON
            raise self._jwks_unavailable(issuer, f"the JWKS could not be read: {type(exc).__name__}: {exc}") from None
        try:
            return client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise self._jwks_unavailable(issuer, str(exc)) from None
        except _UnusableJwks as exc:  # what the refetch for an unknown kid got: asked again for every such token
            raise self._jwks_unavailable(issuer, f"the JWKS is unusable: {_clip(str(exc))}") from None
        except jwt.PyJWTError as exc:  # the message quotes the token's kid
            raise AuthError(f"cannot find the token's signing key: {_clip(str(exc))}") from None
        except (OSError, ValueError) as exc:  # the refetch for an unknown kid failed
            raise self._jwks_unavailable(issuer, f"the JWKS could not be read: {type(exc).__name__}: {exc}") from None

    def _jwks_keys(self, issuer: str, kid: Any) -> list[jwt.PyJWK]:
        """The keys named ``kid`` in ``issuer``'s JWKS (see :meth:`_jwks_key`). Keys of different types may
        share a kid (RFC 7517, 4.5: "equivalent alternatives"): pyjwt gives the first, which refused the
        tokens signed with the others."""
        first = self._jwks_key(issuer, kid)
        cache = self._jwks[issuer].jwk_set_cache
        cached = cache.get() if cache is not None else None
        same = [
            key
            for key in (cached.keys if isinstance(cached, jwt.PyJWKSet) else ())
            if key.key_id == kid and key.public_key_use in ("sig", None)
        ]
        return same or [first]

    def _jwks_unavailable(self, issuer: str, problem: str) -> AuthError:
        """The error for a failed fetch of ``issuer``'s keys, which starts its cooldown."""
        self._jwks_failed[issuer] = (time.monotonic(), problem)
        return AuthError(f"cannot find the token's signing key: {problem}")

    def verify(self, token: str) -> Identity:
        """Return the identity in ``token`` or raise AuthError with a reason the agent can act on."""
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token or token.count(".") != 2:
            raise AuthError("no valid JWT presented: pass a token from your identity provider or `lictor token issue`")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        iss = unverified.get("iss")
        cfg = self.issuers.get(iss) if isinstance(iss, str) else None
        if cfg is None:
            raise AuthError(f"token issuer {_shown(iss)} is not trusted by this gateway")
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise AuthError(f"token algorithm {_shown(alg)} is not allowed for issuer {iss!r}")
        keys: list[Any]
        if cfg.type == "jwks":
            keys = []
            refused = ""
            for jwk in self._jwks_keys(cfg.issuer, header.get("kid")):
                # A key that names its algorithm is used with that one only (RFC 8725, 3.1): a token signed
                # with the same RSA key under PS256 or RS512 is not the key holder's RS256.
                declared = getattr(jwk, "_jwk_data", {}).get("alg")
                if declared is not None and declared != alg:
                    refused = refused or f"{_shown(declared)}, key {_shown(jwk.key_id)}"
                    continue
                keys += _usable_keys(alg, [jwk.key])
            if not keys and refused:
                raise AuthError(f"token algorithm {_shown(alg)} is not its signing key's ({refused})")
        else:
            keys = self._static_keys[cfg.issuer][alg]
        if not keys:
            raise AuthError(f"issuer {iss!r} has no key for algorithm {_shown(alg)}")
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=list(cfg.algorithms),
                    audience=list(cfg.audience),
                    issuer=cfg.issuer,
                    leeway=self.leeway,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
            except jwt.InvalidSignatureError as exc:
                last = exc
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired: get a fresh one") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("token not valid yet (nbf/iat in the future)") from None
            except jwt.PyJWTError as exc:
                raise AuthError(f"invalid token: {exc}") from None
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub:
                raise AuthError("token has no subject")
            for name in ("exp", "nbf", "iat"):
                # NumericDate is a JSON number (RFC 7519): pyjwt also takes a string of digits ("exp": "1796...")
                value = claims.get(name, 0)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise AuthError(f"invalid token: the {name} claim is not a number")
            try:
                expires_at = float(claims["exp"])
            except (OverflowError, ValueError):  # an integer of hundreds of digits passes pyjwt's check
                raise AuthError("invalid token: Expiration Time claim (exp) is out of range") from None
            if not math.isfinite(expires_at):
                raise AuthError("invalid token: Expiration Time claim (exp) is out of range")
            return Identity(
                subject=sub,
                claims=claims,
                issuer=cfg.issuer,
                token_id=str(claims.get("jti", "")),
                expires_at=expires_at,
            )
        raise AuthError(f"token signature does not verify ({last})")
