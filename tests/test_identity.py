"""JWT verification: algorithm allow-list, signature, exp/nbf/iss/aud, Lictor's own issuer."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lictor import AuthError, LocalIssuer, TokenVerifier
from lictor.identity import IssuerConfig, parse_duration


@pytest.fixture
def issuer(tmp_path):
    return LocalIssuer(tmp_path)


@pytest.fixture
def verifier(issuer):
    return TokenVerifier([issuer.config()])


def test_local_tokens_verify_and_stay_short(issuer, verifier):
    token = issuer.issue("agent-1", {"role": "readonly", "groups": ["a", "b"]}, ttl=3600)
    assert len(token) < 1000
    ident = verifier.verify(token)
    assert ident.subject == "agent-1" and ident.claims["role"] == "readonly"
    assert verifier.verify("Bearer " + token).subject == "agent-1"


def test_key_persists_in_state_dir(tmp_path, issuer):
    token = issuer.issue("a")
    assert (tmp_path / "issuer.key").stat().st_mode & 0o777 == 0o600
    assert TokenVerifier([LocalIssuer(tmp_path).config()]).verify(token).subject == "a"


def test_expired_and_not_yet_valid(issuer, verifier):
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(issuer.issue("a", ttl=-120))
    key = issuer._key
    future = int(time.time()) + 3600
    token = jwt.encode({"sub": "a", "iss": "lictor", "aud": "lictor", "exp": future + 60, "nbf": future}, key, "EdDSA")
    with pytest.raises(AuthError, match="not valid yet"):
        verifier.verify(token)


def test_alg_none_is_refused(issuer, verifier):
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "root", "iss": "lictor", "aud": "lictor", "exp": time.time() + 60}).encode()
    ).rstrip(b"=")
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(f"{header.decode()}.{body.decode()}.")


def test_hmac_with_public_key_is_refused(tmp_path):
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = priv.public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cfg = IssuerConfig("idp", "static", "https://idp", ("lictor",), ("RS256",), public_keys=(pub,))
    v = TokenVerifier([cfg])
    good = jwt.encode({"sub": "a", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}, priv, "RS256")
    assert v.verify(good).subject == "a"
    # classic confusion: sign with HS256 using the public key bytes as the secret
    import hashlib
    import hmac as _hmac

    h = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
    b = base64.urlsafe_b64encode(
        json.dumps({"sub": "admin", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}).encode()
    ).rstrip(b"=")
    sig = base64.urlsafe_b64encode(_hmac.new(pem, h + b"." + b, hashlib.sha256).digest()).rstrip(b"=")
    with pytest.raises(AuthError, match="algorithm"):
        v.verify(b".".join([h, b, sig]).decode())
    with pytest.raises(ValueError, match="asymmetric"):
        TokenVerifier([IssuerConfig("x", "static", "x", ("a",), ("HS256",))])


def test_wrong_issuer_audience_signature(issuer, verifier, tmp_path):
    other = LocalIssuer(tmp_path / "other")
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(other.issue("a"))
    key = issuer._key
    exp = time.time() + 60
    with pytest.raises(AuthError, match="not trusted"):
        verifier.verify(jwt.encode({"sub": "a", "iss": "evil", "aud": "lictor", "exp": exp}, key, "EdDSA"))
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(jwt.encode({"sub": "a", "iss": "lictor", "aud": "other", "exp": exp}, key, "EdDSA"))
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(jwt.encode({"sub": "a", "iss": "lictor", "aud": "lictor"}, key, "EdDSA"))
    with pytest.raises(AuthError, match="no valid JWT"):
        verifier.verify("hunter2")


def test_parse_duration():
    assert parse_duration("90") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1h30m") == 5400
    assert parse_duration(2) == 2
    with pytest.raises(ValueError):
        parse_duration("soon")
    for endless in ("1" + "0" * 400, float("inf")):  # a token's lifetime, a leeway written `.inf` in YAML
        with pytest.raises(ValueError):
            parse_duration(endless)


def _endpoint(answer: Any) -> tuple[str, list[str], Any]:
    """An HTTP server answering every GET with ``answer()`` (body, content type): its URL, the paths asked
    for, and the server (to shut down)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body, content_type = answer()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/jwks.json", hits, server


def test_jwks_is_cached_and_refreshed_on_unknown_kid():
    """A real JWKS endpoint: keys fetched once, fetched again when a token names a new kid."""
    from jwt.algorithms import RSAAlgorithm

    keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}

    def jwks() -> tuple[bytes, str]:
        doc: dict[str, list[dict[str, str]]] = {"keys": []}
        for kid, k in keys.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(k.public_key()))
            jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
            doc["keys"].append(jwk)
        return json.dumps(doc).encode(), "application/json"

    url, hits, server = _endpoint(jwks)
    try:
        v = TokenVerifier(
            [IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)], jwks_cooldown=0
        )

        def token(kid):
            claims = {"sub": f"agent-{kid}", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
            return jwt.encode(claims, keys[kid], "RS256", headers={"kid": kid})

        assert v.verify(token("k1")).subject == "agent-k1"
        assert v.verify(token("k1")).subject == "agent-k1"
        assert len(hits) == 1  # cached
        keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # key rotation
        assert v.verify(token("k2")).subject == "agent-k2"
        assert len(hits) == 2  # refreshed for the unknown kid
        forged = jwt.encode(
            {"sub": "x", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60},
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "RS256",
            headers={"kid": "k1"},
        )
        with pytest.raises(AuthError, match="signature"):
            v.verify(forged)
    finally:
        server.shutdown()


def test_static_keys_of_different_types_each_verify_their_tokens():
    # key rotation from RS256 to ES256: pyjwt's TypeError for the RSA key must not end the search
    from cryptography.hazmat.primitives.asymmetric import ec

    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = ec.generate_private_key(ec.SECP256R1())
    claims = {"sub": "a", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
    for keys in ((r, e), (e, r)):
        cfg = IssuerConfig(
            "idp",
            "static",
            "https://idp",
            ("lictor",),
            ("RS256", "ES256"),
            public_keys=tuple(k.public_key() for k in keys),
        )
        verifier = TokenVerifier([cfg])
        assert verifier.verify(jwt.encode(claims, r, "RS256")).subject == "a"
        assert verifier.verify(jwt.encode(claims, e, "ES256")).subject == "a"
    only_rsa = TokenVerifier(
        [IssuerConfig("idp", "static", "https://idp", ("lictor",), ("RS256", "ES256"), public_keys=(r.public_key(),))]
    )
    with pytest.raises(AuthError, match="no key for algorithm 'ES256'"):
        only_rsa.verify(jwt.encode(claims, e, "ES256"))


def test_two_issuer_entries_with_the_same_iss_are_refused():
    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a = IssuerConfig("old", "static", "https://idp", ("lictor",), ("RS256",), public_keys=(r.public_key(),))
    b = IssuerConfig("new", "static", "https://idp", ("lictor",), ("ES256",), public_keys=())
    with pytest.raises(ValueError, match="both have issuer 'https://idp'"):
        TokenVerifier([a, b])


def test_a_jwks_key_that_names_its_algorithm_verifies_only_tokens_of_that_algorithm():
    # The issuer allows RS256 and PS256; its key k1 is declared RS256 only, k2 declares none.
    from jwt.algorithms import RSAAlgorithm

    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}

    def jwks() -> tuple[bytes, str]:
        doc = []
        for kid, k in keys.items():
            jwk = {**json.loads(RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "use": "sig"}
            if kid == "k1":
                jwk["alg"] = "RS256"
            doc.append(jwk)
        return json.dumps({"keys": doc}).encode(), "application/json"

    url, _, server = _endpoint(jwks)
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256", "PS256"), jwks_url=url)])

        def token(kid: str, alg: str) -> str:
            claims = {"sub": f"agent-{kid}", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
            return jwt.encode(claims, keys[kid], alg, headers={"kid": kid})

        assert v.verify(token("k1", "RS256")).subject == "agent-k1"
        with pytest.raises(AuthError, match=r"token algorithm 'PS256' is not its signing key's \('RS256', key 'k1'\)"):
            v.verify(token("k1", "PS256"))
        assert v.verify(token("k2", "PS256")).subject == "agent-k2"  # a key without alg: the issuer's list decides
        assert v.verify(token("k2", "RS256")).subject == "agent-k2"
    finally:
        server.shutdown()


def test_a_jwks_endpoint_that_fails_is_refused_cleanly_and_not_asked_again_at_once():
    """A JWKS endpoint that answers something other than JSON (a login page, a proxy's error page) refuses
    the token with the reason; later tokens are refused at once, without asking it again, for a cooldown."""
    url, hits, server = _endpoint(lambda: (b"<html>please log in</html>", "text/html"))
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)])
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        token = jwt.encode(claims, key, "RS256", headers={"kid": "k1"})
        assert v.may_fetch(token) and not v.may_fetch("a.b.c")
        with pytest.raises(AuthError, match="the JWKS could not be read"):
            v.verify(token)
        with pytest.raises(AuthError, match=r"failed to load .*retry later"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k2"}))
        assert len(hits) == 1
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"keys": []}', "The JWK Set did not contain any keys"),
        (b"[]", "did not return a JSON object"),
        (b'{"keys": [{"kty": "RSA", "use": "enc", "kid": "k1", "n": "sXchMw", "e": "AQAB"}]}', "any signing keys"),
    ],
)
def test_a_jwks_without_usable_keys_is_not_asked_again_for_every_token(body: bytes, problem: str) -> None:
    url, hits, server = _endpoint(lambda: (body, "application/json"))
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)])
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        with pytest.raises(AuthError, match=f"the JWKS is unusable: .*{problem}"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        for kid in ("k2", "k3", "k4"):
            with pytest.raises(AuthError, match=r"failed to load .*retry later"):
                v.verify(jwt.encode(claims, key, "RS256", headers={"kid": kid}))
        assert len(hits) == 1
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{type: jwks}", "identity.issuers.0: 'issuer' is a required property"),
        ("{type: jwks, issuer: https://idp}", "identity.issuers.0: 'jwks_url' is a required property"),
        ('{type: jwks, issuer: https://idp, jwks_url: ""}', "identity.issuers.0.jwks_url: '' does not match"),
        ("{type: static, issuer: https://idp}", "identity.issuers.0: 'public_keys' is a required property"),
        (
            "{type: static, issuer: https://idp, public_keys: []}",
            "identity.issuers.0.public_keys: [] should be non-empty",
        ),
        ("{type: static, issuer: https://idp, public_keys: [nokey.pem]}", "issuer https://idp: public key nokey.pem: "),
        (
            "{type: static, issuer: https://idp, public_keys: [lictor.yaml]}",
            "issuer https://idp: public key lictor.yaml: ",
        ),
        ("{type: lictor, algorithms: []}", "identity.issuers.0.algorithms: [] should be non-empty"),
        ("{type: lictor, audience: []}", "identity.issuers.0.audience: [] is not valid"),
        # keys an issuer of that type does not read were accepted and ignored: an audience that did not narrow
        # what Lictor's own issuer accepts, public keys of a jwks issuer that verified nothing
        (
            "{type: lictor, audience: lictor-prod}",
            "lictor.yaml:5:22: identity.issuers.0: 'audience' does not apply to a `type: lictor` issuer (its tokens "
            "always have iss 'lictor', aud 'lictor' and alg EdDSA",
        ),
        ("{type: lictor, issuer: https://gw}", "identity.issuers.0: 'issuer' does not apply to a `type: lictor`"),
        ("{type: lictor, algorithms: [EdDSA]}", "identity.issuers.0: 'algorithms' does not apply to a `type: lictor`"),
        (
            "{type: jwks, issuer: https://idp, jwks_url: https://idp/keys, public_keys: [k.pem]}",
            "identity.issuers.0: 'public_keys' does not apply to a `type: jwks` issuer (its keys come from jwks_url)",
        ),
    ],
)
def test_an_issuer_that_could_verify_no_token_stops_the_gateway_with_a_clear_error(tmp_path, entry, problem):
    """Instead of a traceback, or a gateway that runs and refuses every token of that issuer."""
    from tests.conftest import lictor

    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\nidentity:\n  issuers:\n    - {entry}\n")
    proc = lictor("run", "-c", str(config), "--ready-file", str(tmp_path / "ready"), check=False, timeout=30)
    assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ready").exists()


def test_an_exp_too_large_for_a_float_is_refused_like_any_bad_claim(issuer, verifier):
    """pyjwt accepts any integer; the expiry the gateway keeps is a float, and 10**400 is none."""
    header = base64.urlsafe_b64encode(b'{"alg":"EdDSA","typ":"JWT"}').rstrip(b"=")
    body = json.dumps({"sub": "a", "iss": "lictor", "aud": "lictor", "exp": 10**400}).encode()
    signed = header + b"." + base64.urlsafe_b64encode(body).rstrip(b"=")
    signature = base64.urlsafe_b64encode(issuer._key.sign(signed)).rstrip(b"=")
    with pytest.raises(AuthError, match=r"exp\) is out of range"):
        verifier.verify((signed + b"." + signature).decode())


def test_the_name_of_lictor_s_own_issuer_is_the_configured_one(tmp_path):
    """`name` is the one key other than `type` a `type: lictor` entry takes; it was accepted and ignored."""
    from types import SimpleNamespace

    from lictor.config import load_config
    from lictor.gateway import Gateway

    (tmp_path / "lictor.yaml").write_text("version: 1\nidentity: {issuers: [{type: lictor, name: ci-issuer}]}\n")
    config = load_config(tmp_path / "lictor.yaml")
    stand_in = SimpleNamespace(config=config, issuer=LocalIssuer(tmp_path / "state"))
    verifier = Gateway._make_verifier(stand_in)  # type: ignore[arg-type]
    assert verifier.issuers["lictor"].name == "ci-issuer"


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "4102444800"), ("nbf", "0"), ("iat", "1700000000"), ("exp", [4102444800])],
)
def test_times_that_are_not_json_numbers_are_refused(issuer, verifier, claim, value):
    """pyjwt reads "exp": "4102444800" as a number: an identity provider that wrote its times as strings
    would issue tokens whose expiry no reviewer sees."""
    header = base64.urlsafe_b64encode(b'{"alg":"EdDSA","typ":"JWT"}').rstrip(b"=")
    payload = {"sub": "a", "iss": "lictor", "aud": "lictor", "exp": int(time.time()) + 60, claim: value}
    signed = header + b"." + base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(issuer._key.sign(signed)).rstrip(b"=")
    with pytest.raises(AuthError, match=r"invalid token"):
        verifier.verify((signed + b"." + signature).decode())


def _jwks_of(key: Any, kid: str = "k1") -> dict[str, Any]:
    from jwt.algorithms import RSAAlgorithm

    return {"keys": [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "alg": "RS256", "use": "sig"}]}


def test_a_jwks_endpoint_that_trickles_its_answer_is_cut_off_at_the_deadline():
    """An endpoint sending a byte now and then never hit urllib's timeout, which bounds each read: the fetch,
    and every login waiting for it, went on for as long as the endpoint liked. The whole answer has a
    deadline; the token is refused with it and later ones at once (the cooldown)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release, hits = threading.Event(), []
    body = json.dumps(_jwks_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))).encode()

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body:  # a byte every 0.2 s until the test ends: about 100 s for the whole set
                if release.wait(0.2):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backstop = threading.Timer(60, release.set)
    backstop.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/jwks"
        v = TokenVerifier(
            [IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)], jwks_timeout=1
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        with pytest.raises(AuthError, match=r"no complete answer within 1 s"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        assert not release.is_set(), "the fetch went on until the endpoint stopped"
        with pytest.raises(AuthError, match=r"failed to load .*no complete answer.*retry later"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        assert len(hits) == 1
    finally:
        release.set()
        backstop.cancel()
        server.shutdown()


def test_a_jwks_answer_larger_than_a_key_set_is_refused_without_reading_it_whole():
    """The answer was read into memory whole, however large; a key set is a few kilobytes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    huge = json.dumps({"padding": "x" * (2 << 20), **_jwks_of(key)}).encode()
    url, hits, server = _endpoint(lambda: (huge, "application/json"))
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)])
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        with pytest.raises(AuthError, match="the answer is larger than 1048576 bytes"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        with pytest.raises(AuthError, match=r"failed to load .*retry later"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        assert len(hits) == 1
    finally:
        server.shutdown()


def test_a_jwks_answer_nested_too_deeply_is_refused_like_one_that_is_not_json():
    """Python's JSON parser raises RecursionError, not ValueError, on deep nesting: the login ended as an
    internal error without its reason, and every later token asked the endpoint again."""
    nested = b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    url, hits, server = _endpoint(lambda: (nested, "application/json"))
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)])
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        with pytest.raises(AuthError, match="the JWKS could not be read: ValueError: its JSON is nested too deeply"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"}))
        with pytest.raises(AuthError, match=r"failed to load .*retry later"):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k2"}))
        assert len(hits) == 1
    finally:
        server.shutdown()


def test_an_issuer_key_open_to_every_local_user_is_closed_to_them_and_reported(gateway_factory, tmp_path):
    """A key copied in with the umask's mode (0644) was used as it was, without a word: any local user could
    read it and mint any identity for the gateway."""
    import os
    import stat

    from tests.conftest import lictor

    gw = gateway_factory({}, start=False)
    key = gw.state_dir / "issuer.key"
    LocalIssuer(gw.state_dir)
    os.chmod(key, 0o644)
    proc = lictor("token", "issue", "--state-dir", str(gw.state_dir), "--sub", "agent-1")
    assert proc.stdout.count(".") == 2
    assert f"{key} was open to every local user (mode 644)" in proc.stderr, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    os.chmod(key, 0o604)
    gw.start()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f"{key} was open to every local user (mode 604)" in gw.log(), gw.log()
    assert "whoever read it can mint any identity: if that may have happened, delete it" in gw.log()


def test_a_jwks_key_whose_alg_is_not_a_string_is_skipped_like_any_unusable_key():
    """pyjwt raises TypeError for a key whose "alg" is a list or an object: every token of the provider, whatever
    its key, ended as an internal error, and the endpoint was asked again for each."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = _jwks_of(key)["keys"][0]
    body = json.dumps({"keys": [{**good, "kid": "k0", "alg": ["RS256"]}, {**good, "kid": "k9", "alg": {}}, good]})
    url, hits, server = _endpoint(lambda: (body.encode(), "application/json"))
    try:
        v = TokenVerifier([IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)])
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        assert v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"})).subject == "agent"
        with pytest.raises(AuthError, match='Unable to find a signing key that matches: "k0"'):
            v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k0"}))
        assert len(hits) == 1
    finally:
        server.shutdown()


def test_keys_of_different_types_sharing_a_kid_each_verify_their_tokens():
    """RFC 7517 lets keys of different types share a kid ("equivalent alternatives"): only the first key of
    the set with the token's kid was tried, so the tokens signed with the other were refused."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_jwk = {**json.loads(ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "k1", "use": "sig"}
    body = json.dumps({"keys": [ec_jwk, *_jwks_of(rsa_key)["keys"]]}).encode()
    url, hits, server = _endpoint(lambda: (body, "application/json"))
    try:
        v = TokenVerifier(
            [IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256", "ES256", "PS256"), jwks_url=url)]
        )
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        assert v.verify(jwt.encode(claims, ec_key, "ES256", headers={"kid": "k1"})).subject == "agent"
        assert v.verify(jwt.encode(claims, rsa_key, "RS256", headers={"kid": "k1"})).subject == "agent"
        # the RSA key names RS256: the same key under PS256 is still refused
        with pytest.raises(AuthError, match="token algorithm 'PS256' is not its signing key's"):
            v.verify(jwt.encode(claims, rsa_key, "PS256", headers={"kid": "k1"}))
        with pytest.raises(AuthError, match="signature"):
            v.verify(jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256", headers={"kid": "k1"}))
        assert len(hits) == 1
    finally:
        server.shutdown()


@pytest.mark.parametrize("answer", [b'{"keys": []}', b"[]"])
def test_an_unusable_answer_to_the_refetch_for_an_unknown_kid_starts_the_cooldown(answer: bytes) -> None:
    """Once the cooldown after the last fetch had passed, a token naming an unknown kid fetched the set again;
    when that answer had no key to use, nothing held the next one back: every token with a made-up kid (no
    signature needed) made the gateway ask the identity provider again."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bodies = [json.dumps(_jwks_of(key)).encode()]
    url, hits, server = _endpoint(lambda: (bodies[-1], "application/json"))
    try:
        v = TokenVerifier(
            [IssuerConfig("idp", "jwks", "https://idp", ("lictor",), ("RS256",), jwks_url=url)], jwks_cooldown=3
        )
        claims = {"sub": "agent", "iss": "https://idp", "aud": "lictor", "exp": time.time() + 60}
        assert v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"})).subject == "agent"
        bodies.append(answer)
        made_up = iter(range(10**6))
        deadline = time.monotonic() + 30
        while len(hits) == 1:  # until the cooldown after the first fetch has passed and a made-up kid refetched
            assert time.monotonic() < deadline, "no token with an unknown kid fetched the key set again"
            with pytest.raises(AuthError):
                v.verify(jwt.encode(claims, key, "RS256", headers={"kid": f"made-up-{next(made_up)}"}))
            time.sleep(0.1)
        for _ in range(3):
            with pytest.raises(AuthError, match=r"failed to load \(the JWKS is unusable: .*retry later"):
                v.verify(jwt.encode(claims, key, "RS256", headers={"kid": f"made-up-{next(made_up)}"}))
        assert len(hits) == 2
        # the keys fetched before still verify their tokens meanwhile
        assert v.verify(jwt.encode(claims, key, "RS256", headers={"kid": "k1"})).subject == "agent"
    finally:
        server.shutdown()


def test_a_negative_leeway_stops_the_gateway_with_a_clear_error(tmp_path):
    """A negative leeway was taken: every token was refused as "not valid yet" for that long after it was
    issued, and refused that long before its exp."""
    from tests.conftest import lictor

    config = tmp_path / "lictor.yaml"
    config.write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\nidentity:\n  leeway: -60\n")
    problem = "lictor.yaml:4:11: identity.leeway: -60 is negative: it is the clock skew allowed for exp, nbf and iat"
    checked = lictor("check", "-c", str(config), check=False)
    assert checked.returncode == 1 and problem in checked.stdout, checked.stdout
    proc = lictor("run", "-c", str(config), "--ready-file", str(tmp_path / "ready"), check=False, timeout=30)
    assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ready").exists()
