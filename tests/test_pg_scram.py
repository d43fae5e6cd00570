"""SCRAM-SHA-256 and md5 client authentication, against RFC test vectors and a real PostgreSQL."""

import base64
import hashlib
import hmac

import pytest
from lictor_addons.postgres import _protocol as pg
from lictor_addons.postgres._scram import ScramClient, ScramError, choose_mechanism, md5_password, saslprep

from tests.pgcluster import WireClient, pg_cluster  # noqa: F401  (pg_cluster registers the fixture)

# RFC 7677, section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_client() -> ScramClient:
    return ScramClient("pencil", user="user", nonce=RFC_NONCE)


def test_rfc7677_vector() -> None:
    client = rfc_client()
    assert client.client_first() == b"n,,n=user,r=" + RFC_NONCE.encode()
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.done
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.done


def test_default_user_is_empty_like_libpq() -> None:
    assert ScramClient("x", nonce="abc").client_first() == b"n,,n=,r=abc"
    assert ScramClient("x", user="a=b,c", nonce="abc").client_first() == b"n,,n=a=3Db=2Cc,r=abc"


@pytest.mark.parametrize(
    ("server_final", "match"),
    [
        (b"v=" + base64.b64encode(b"\0" * 32), "does not match"),
        (b"e=invalid-proof", "invalid-proof"),
        (b"x", "malformed"),
        (b"v=@@@", "malformed"),
    ],
)
def test_bad_server_final_is_refused(server_final: bytes, match: str) -> None:
    client = rfc_client()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match=match):
        client.verify_server_final(server_final)
    assert not client.done


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
        (b"r=" + RFC_NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
        (b"r=" + RFC_NONCE.encode() + b"x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iteration"),
        (b"r=" + RFC_NONCE.encode() + b"x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999", "iteration"),
        (b"r=" + RFC_NONCE.encode() + b"x,s=,i=4096", "salt"),
        (b"r=" + RFC_NONCE.encode() + b"x,i=4096", "malformed"),
        (b"m=ext,r=" + RFC_NONCE.encode() + b"x,s=AA==,i=1", "extension"),
        (b"garbage", "malformed"),
    ],
)
def test_bad_server_first_is_refused(server_first: bytes, match: str) -> None:
    with pytest.raises(ScramError, match=match):
        rfc_client().client_final(server_first)


def test_server_final_before_client_final() -> None:
    with pytest.raises(ScramError):
        rfc_client().verify_server_final(RFC_SERVER_FINAL)


def test_choose_mechanism() -> None:
    assert choose_mechanism(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")) == "SCRAM-SHA-256"
    with pytest.raises(ScramError, match="SCRAM-SHA-256-PLUS"):
        choose_mechanism(("SCRAM-SHA-256-PLUS",))


def test_md5_password_matches_the_server_formula() -> None:
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest()
    assert md5_password("alice", "secret", b"\x01\x02\x03\x04") == expected


def test_saslprep() -> None:
    # RFC 4013 section 3 examples.
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    assert saslprep("\u0007") is None  # prohibited: the server then uses the raw bytes
    assert saslprep("\u0627\u0031") is None  # bidi rule
    # A non-ASCII space maps to an ordinary space.
    assert saslprep("a\u00a0b") == "a b"


def test_prohibited_password_proof_uses_raw_bytes() -> None:
    """Like the server: a password SASLprep rejects is hashed as its raw UTF-8 bytes."""
    password = "bell\u0007"
    client = ScramClient(password, nonce="n")
    salt = b"0123456789abcdef"
    server_first = b"r=nX,s=" + base64.b64encode(salt) + b",i=16"
    final = client.client_final(server_first)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 16)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    auth = b"n=,r=n," + server_first + b",c=biws,r=nX"
    proof = bytes(a ^ b for a, b in zip(client_key, hmac.digest(stored, auth, "sha256"), strict=True))
    assert final == b"c=biws,r=nX,p=" + base64.b64encode(proof)


# Against a real server with a pg_hba.conf that asks for scram-sha-256 and md5.

SCRAM_ROLE = "lictor_scram_test"
MD5_ROLE = "md5_lictor_test"
PASSWORD = "s3cr\u00e9t pass"


@pytest.fixture(scope="module")
def roles(pg_cluster):  # noqa: F811
    pg_cluster.execute(
        f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_ROLE} LOGIN PASSWORD '{PASSWORD}'"
    )
    pg_cluster.execute(
        f"SET password_encryption = 'md5'; CREATE ROLE {MD5_ROLE} LOGIN PASSWORD '{PASSWORD}' IN ROLE md5_users"
    )
    stored = dict(pg_cluster.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname LIKE '%lictor%'"))
    assert stored[SCRAM_ROLE].startswith("SCRAM-SHA-256$")
    assert stored[MD5_ROLE].startswith("md5")
    yield pg_cluster
    pg_cluster.execute(f"DROP ROLE {SCRAM_ROLE}")
    pg_cluster.execute(f"DROP ROLE {MD5_ROLE}")


def test_scram_login_and_select_1(roles) -> None:
    with WireClient(roles.host, roles.port) as client:
        messages = client.login(SCRAM_ROLE, "postgres", PASSWORD, client_encoding="UTF8")
        kinds = [type(m).__name__ for m in messages]
        assert kinds[:4] == [
            "AuthenticationSASL",
            "AuthenticationSASLContinue",
            "AuthenticationSASLFinal",
            "AuthenticationOk",
        ]
        assert client.scram_verified
        assert any(isinstance(m, pg.BackendKeyData) for m in messages)
        assert client.parameters["client_encoding"] == "UTF8"
        result = client.simple("SELECT 1 AS one, current_user")
        assert isinstance(result[0], pg.RowDescription)
        assert [f.name for f in result[0].fields] == ["one", "current_user"]
        assert result[1].values == [b"1", SCRAM_ROLE.encode()]
        assert result[2] == pg.CommandComplete(pg.command_complete("SELECT 1"), "SELECT 1")
        assert result[3].status == "I"


def test_scram_wrong_password_is_rejected(roles) -> None:
    with WireClient(roles.host, roles.port) as client:
        messages = client.login(SCRAM_ROLE, "postgres", "wrong")
        error = messages[-1]
        assert isinstance(error, pg.ErrorResponse)
        assert error.sqlstate == "28P01"
        assert not client.scram_verified


def test_md5_login_and_select_1(roles) -> None:
    with WireClient(roles.host, roles.port) as client:
        messages = client.login(MD5_ROLE, "postgres", PASSWORD)
        assert isinstance(messages[0], pg.AuthenticationMD5Password)
        assert isinstance(messages[1], pg.AuthenticationOk)
        result = client.simple("SELECT 2")
        assert result[1].values == [b"2"]


def test_md5_wrong_password_is_rejected(roles) -> None:
    with WireClient(roles.host, roles.port) as client:
        messages = client.login(MD5_ROLE, "postgres", "nope")
        assert isinstance(messages[-1], pg.ErrorResponse)
        assert messages[-1].sqlstate == "28P01"
