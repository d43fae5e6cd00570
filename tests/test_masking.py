"""Tests for lictor.masking: detectors, styles, plans, JSON, columns, schema."""

import json
import time

import jsonschema
import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st
from lictor.masking import (
    BUILTIN_DETECTORS,
    DETECTOR_SCHEMA,
    MASK_SCHEMA,
    VALIDATORS,
    Detector,
    MaskingError,
    MaskPlan,
    compile_detector,
    parse_path,
)
from lictor.masking._validators import luhn_ok

KEY = b"test-key-0123456789abcdef"
ALL = list(BUILTIN_DETECTORS)


def plan_for(*detectors: str, **block: object) -> MaskPlan:
    return MaskPlan.compile([{"detectors": list(detectors), **block}], key=KEY)


def masked(detector: str, text: str) -> str:
    return plan_for(detector).mask_text(text)[0]


def red(name: str) -> str:
    return f"[REDACTED:{name}]"


# -- detectors: positives and near-misses --------------------------------------------------
# Each positive is masked whole by its own detector (and by the full set of built-ins);
# each near-miss is left exactly as it is by its own detector.

POSITIVES = {
    "card": [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5500 0000 0000 0004",
        "378282246310005",
        "3782 822463 10005",
        "6011000000000004",
    ],
    "email": [
        "john.doe@example.com",
        "a+tag@sub.example.co.uk",
        "x@y.io",
        "first_last-9@mail.example.org",
        "zoe@exämple.com",
        "zoë.müller@bücher.de",
        "用户@例子.com",  # internationalized addresses
    ],
    "ssn": ["123-45-6789", "123 45 6789", "078-05-1120"],
    "iban": [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82WEST12345698765432",
        "GB82 WEST 1234 5698 7654 32",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
    ],
    "phone": [
        "+1 415 555 2671",
        "+44 20 7946 0958",
        "+4915123456789",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "06 12 34 56 78",
        "020 7946 0958",
    ],
    "ipv4": ["192.168.1.10", "10.0.0.1", "255.255.255.255", "8.8.8.8"],
    "ipv6": [
        "2001:db8::1",
        "fe80::1ff:fe23:4567:890a",
        "::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "::ffff:192.0.2.1",
        "fe80::1%eth0",
    ],
    "jwt": [
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
        ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ],
    "aws_access_key_id": ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
    "github_token": [
        "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "gho_" + "a" * 36,
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
    ],
    "slack_token": ["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "xoxp-1234567890-abcdef"],
    "stripe_key": ["sk_live_4eC39HqLyjWDarjtT1zdp7dc", "rk_test_51H8abcdefghijklmnop", "whsec_" + "x" * 32],
    "private_key": [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE/Wm/Rr500P==\n"
        "-----END RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\r\nMIIEvQIBADANBg\r\n-----END PRIVATE KEY-----",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\\nMIIFDjBABgkqhkiG9w0BBQ0wMzAb\\n-----END ENCRYPTED PRIVATE KEY-----",
    ],
}

NEAR_MISSES = {
    "card": [
        "4111111111111112",  # Luhn fails
        "4111 1111 1111 1112",
        "0000 0000 0000 0000",  # passes Luhn, but no card number starts with 0
        "411111111111",  # 12 digits
        "41111111111111111111",  # 20 digits
        "x41111111111111112",  # glued to a word, Luhn fails
        "4111.1111 1111-1111",  # separators mixed
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    ],
    "email": ["foo@bar", "user@localhost", "@example.com", "a@b.c", "foo@bar.123", "foo @ bar.com"],
    "ssn": ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567", "123-45-0000", "123-45-67890"],
    "iban": [
        "DE89 3704 0044 0532 0130 01",  # checksum
        "GB82WEST12345698765433",
        "DE8937040044053201300",  # one digit short for DE
        "XX00 1234 5678 9012 34",
    ],
    "phone": ["01-02-2024", "2024-01-02", "+123", "12:30:45", "123-456-7890", "v1.2.3", "1234567"],
    "ipv4": ["256.1.1.1", "1.2.3.4.5", "1.2.3", "01.2.3.4x"],
    "ipv6": ["std::vector", "12:30:45", "00:1a:2b:3c:4d:5e", "a::b::c", "Foo::bar()", "::"],
    "jwt": ["eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9.payload", "heyJhbGciOiJIUzI1NiJ9.eyJ.x"],
    "aws_access_key_id": ["AKIAIOSFODNN7EXAMPL", "XKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLEX"],
    "github_token": ["ghp_short", "ghx_" + "a" * 36, "xghp_" + "a" * 36],
    "slack_token": ["xoxb-123", "xoxz-1234567890-abcdef"],
    "stripe_key": ["sk_live_abc", "pk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_prod_4eC39HqLyjWDarjtT1zdp7dc"],
    "private_key": [
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOC\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkq\n-----END CERTIFICATE-----",
    ],
    "secret_assignment": [
        "max_tokens: 100",
        "tokens: 5",
        "password_hash: abc",
        "http://host:8080/path",
        "password=\n",
        "secretary = Bob",
    ],
}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in POSITIVES.items() for v in vs])
def test_positive_masked_whole(name: str, value: str) -> None:
    for text in (value, f"before {value} after", f"({value}),"):
        out, counts = plan_for(name).mask_text(text)
        assert out == text.replace(value, red(name)), text
        assert counts == {name: 1}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in POSITIVES.items() for v in vs])
def test_positive_masked_among_all_detectors(name: str, value: str) -> None:
    out, counts = plan_for(*ALL).mask_text(f"value: {value} end")
    assert out == f"value: {red(name)} end"
    assert counts == {name: 1}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in NEAR_MISSES.items() for v in vs])
def test_near_miss_left_alone(name: str, value: str) -> None:
    for text in (value, f"x {value} y"):
        out, counts = plan_for(name).mask_text(text)
        assert out == text
        assert not counts


def test_luhn_near_miss_not_masked_by_any_detector() -> None:
    text = "order 4111111111111112 and ssn 000-12-3456 and iban GB82WEST12345698765433"
    assert plan_for(*ALL).mask_text(text) == (text, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a4111111111111111", "a{card}"),  # 'a' || card
        ("4111111111111111z", "{card}z"),
        ("Ann4111111111111111", "Ann{card}"),
        ("_4111111111111111_", "_{card}_"),
        ("4111111111111111,5500000000000004", "{card},{card}"),
        ("ann@example.com1", "{email}1"),  # email || '1'
        ("x ann@example.com2024 y", "x {email}2024 y"),
        ("ann@example.com4111111111111111", "{email}{card}"),  # email || card
        ("ann@example.com-4111111111111111", "{email}-{card}"),
        ("a4111111111111111b5500000000000004", "a{card}b{card}"),
    ],
)
def test_values_glued_to_other_text_are_masked(text: str, expected: str) -> None:
    # SQL concatenation ('a' || card, email || '1') must not get a value past its detector.
    plan = MaskPlan.compile([{"detectors": ["card", "email"]}])
    assert plan.mask_text(text)[0] == expected.format(card=red("card"), email=red("email"))


def test_card_trailing_group_not_swallowed() -> None:
    assert masked("card", "4111 1111 1111 1111 123") == f"{red('card')} 123"


@pytest.mark.parametrize("space", ["\u00a0", "\u202f", "\u2007"])
def test_card_grouped_with_no_break_spaces_is_masked(space: str) -> None:
    card = "4111 1111 1111 1111".replace(" ", space)
    assert masked("card", f"card {card}.") == f"card {red('card')}."
    assert masked("card", "3782 822463 10005".replace(" ", space)) == red("card")  # 4-6-5
    assert masked("card", f"{card}{space}123") == f"{red('card')}{space}123"  # a trailing group is dropped
    # Luhn still decides
    for text in ("4111 1111 1111 1112", "1234 5678 9012 3456", "0000 0000 0000 0000"):
        assert masked("card", text.replace(" ", space)) == text.replace(" ", space)
    assert masked("card", f"4111{space}1111 1111-1111") == f"4111{space}1111 1111-1111"  # dashes and spaces mixed
    # the styles keep the separators, and the byte length where they say so
    assert plan_for("card", style="partial").mask_text(card)[0] == "**** **** **** 1111".replace(" ", space)
    out = plan_for("card", style="preserve-length").mask_text(card)[0]
    assert len(out.encode()) == len(card.encode()) and out.count(space) == 3 and "4111" not in out


@pytest.mark.parametrize("space", ["\u00a0", "\u202f", "\u2007", "\u2009"])
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("card", "4111 1111 1111 1111"),
        ("phone", "+1 415 555 2671"),
        ("phone", "+33 6 12 34 56 78"),
        ("phone", "06 12 34 56 78"),
        ("phone", "415 555 2671"),
        ("ssn", "123 45 6789"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
    ],
)
def test_values_grouped_with_no_break_or_thin_spaces_are_masked(name: str, text: str, space: str) -> None:
    # Localized output and HTML (&nbsp;) group phone numbers, SSNs and IBANs with no-break spaces, and some
    # locales group digits with thin spaces: only cards were found with no-break spaces, and nothing with thin ones
    grouped = text.replace(" ", space)
    assert masked(name, f"x {grouped}.") == f"x {red(name)}.", grouped
    partial = plan_for(name, style="partial").mask_text(grouped)[0]
    assert partial.count(space) == text.count(" ") and partial != grouped, partial  # the groups stay readable


def test_no_break_spaces_do_not_make_near_misses_match() -> None:
    for name, text in (("iban", "DE89 3704 0044 0532 0130 01"), ("ssn", "000 45 6789"), ("phone", "06 12.34 56 78")):
        grouped = text.replace(" ", "\u00a0")
        assert masked(name, grouped) == grouped


def test_card_grouped_with_dots_is_masked() -> None:
    # 4111.1111.1111.1111 (as some countries group numbers) went out in clear
    assert masked("card", "card 4111.1111.1111.1111.") == f"card {red('card')}."
    assert masked("card", "3782.822463.10005") == red("card")  # 4-6-5
    assert masked("card", "4111.1111.1111.1111.123") == f"{red('card')}.123"  # a trailing group is dropped
    assert plan_for("card", style="partial").mask_text("4111.1111.1111.1111")[0] == "****.****.****.1111"
    # Luhn still decides, and dotted numbers that are not grouped as cards are left alone
    for text in ("4111.1111.1111.1112", "2024.1111.2222.3333", "192.168.1.1", "1.2.3.4", "4111.1111 1111-1111"):
        assert masked("card", text) == text


@pytest.mark.parametrize("space", ["+", "%20"])
def test_card_grouped_with_url_encoded_spaces_is_masked(space: str) -> None:
    # ?q=4111+1111+1111+1111 (a form, Python's urlencode) or %20 (encodeURIComponent) went out in clear
    card = "4111 1111 1111 1111".replace(" ", space)
    assert masked("card", f"/search?q={card}&page=2") == f"/search?q={red('card')}&page=2"
    assert masked("card", f"q=visa%20{card}") == f"q=visa%20{red('card')}"  # after an escape ending in a digit
    assert masked("card", "3782 822463 10005".replace(" ", space)) == red("card")  # 4-6-5
    assert masked("card", f"{card}{space}123") == f"{red('card')}{space}123"  # a trailing group is dropped
    assert plan_for("card", style="partial").mask_text(card)[0] == "**** **** **** 1111".replace(" ", space)
    out = plan_for("card", style="preserve-length").mask_text(card)[0]
    assert len(out) == len(card) and out.count(space) == 3 and "4111" not in out
    # Luhn still decides, and separators stay one kind per number
    for text in ("4111 1111 1111 1112", "2024 1111 2222 3333", "4111 1111+1111%201111", "1+2+3+4"):
        assert masked("card", text.replace(" ", space)) == text.replace(" ", space)
    assert masked("card", "q=%204111111111111111") == f"q=%20{red('card')}"


def test_secret_assignment_masks_value_only() -> None:
    cases = {
        "password=hunter2": "password=",
        "DB_PASSWORD=s3cr3t;": "DB_PASSWORD=",
        "api_key: abc123 rest": "api_key: ",
        'api-key = "correct horse battery staple"': 'api-key = "',
        "token: 'a b c'": "token: '",
        "Authorization: Bearer abc.def.ghi": "Authorization: Bearer ",
        '{"client_secret": "xyz"}': '{"client_secret": "',
        "https://api.example.com/?access_token=tok&x=1": "https://api.example.com/?access_token=",
        "postgres://app:pa55w0rd@db.internal:5432/app": "postgres://app:",
    }
    for text, prefix in cases.items():
        out, counts = plan_for("secret_assignment").mask_text(text)
        assert out.startswith(prefix + red("secret_assignment")), (text, out)
        assert counts == {"secret_assignment": 1}
    assert masked("secret_assignment", "password=hunter2 next") == f"password={red('secret_assignment')} next"
    assert (
        masked("secret_assignment", '"pw": 1, password: "a b" x')
        == f'"pw": 1, password: "{red("secret_assignment")}" x'
    )
    assert masked("secret_assignment", "postgres://app:pw@db/x") == f"postgres://app:{red('secret_assignment')}@db/x"
    # an element of an array's text form keeps its closing brace; a brace inside a value is masked with it
    assert masked("secret_assignment", "{app.api_key=k3y}") == f"{{app.api_key={red('secret_assignment')}}}"
    assert masked("secret_assignment", "token=a}b}") == f"token={red('secret_assignment')}}}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # libpq's key=value form: unquoted up to white space (a backslash escapes the next character), or quoted
        # with \' and \\ inside; secret_assignment stops at , ; & and at the first quote
        ("host=db port=5432 password=a,b;c&d user=x", "host=db port=5432 password={r} user=x"),
        ("host=db password = 'a b' user=x", "host=db password = '{r}' user=x"),
        ("host=db password='a \\'b c' user=x", "host=db password='{r}' user=x"),
        ("password=a\\ b user=x", "password={r} user=x"),
        ("sslpassword=k3y sslmode=require", "sslpassword={r} sslmode=require"),
        # an array's text form (pg_db_role_setting.setconfig) doubles the backslash: masked past it
        ("{\"app.dsn=host=db password='x \\\\'y z'\"}", "{\"app.dsn=host=db password='{r}'\"}"),
        # an unquoted array element ends at } or , (psql's \\drds, pg_dump read setconfig arrays): still an array
        ("{app.dsn=password=x}y,search_path=z}", "{app.dsn=password={r}}"),
        ('{"x password=a b",y}', '{"x password={r} b",y}'),
        ("password=a}b c", "password={r} c"),
        # URIs, with a long user name and a password of characters secret_assignment stops at
        ("postgresql://" + "u" * 40 + ":p,q;r@db/app", "postgresql://" + "u" * 40 + ":{r}@db/app"),
        ("jdbc:postgresql://app:pw@db/x?sslmode=require", "jdbc:postgresql://app:{r}@db/x?sslmode=require"),
        # neither a password nor a port
        ("postgresql://db:5432/app password", "postgresql://db:5432/app password"),
        ("password_encryption = scram-sha-256", "password_encryption = scram-sha-256"),
    ],
)
def test_conninfo_password_masks_the_value_as_libpq_reads_it(text: str, expected: str) -> None:
    r = red("conninfo_password")
    assert masked("conninfo_password", text) == expected.replace("{r}", r)
    # beside secret_assignment (the masking pack's), the connection-string reading wins where both match
    assert plan_for("secret_assignment", "conninfo_password").mask_text(text)[0] == expected.replace("{r}", r)


def test_aws_secret_needs_its_key_name() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert masked("aws_secret_access_key", f"aws_secret_access_key = {secret}") == (
        f"aws_secret_access_key = {red('aws_secret_access_key')}"
    )
    assert masked("aws_secret_access_key", f'"SecretAccessKey": "{secret}"') == (
        f'"SecretAccessKey": "{red("aws_secret_access_key")}"'
    )
    # a 40-character git hash, and a secret-looking value without its key: left alone
    for text in ("commit 0123456789abcdef0123456789abcdef01234567", f"value {secret}"):
        assert masked("aws_secret_access_key", text) == text


def test_private_key_block_is_masked_whole_and_truncated_block_too() -> None:
    block = POSITIVES["private_key"][0]
    text = f"key:\n{block}\nafter the key"
    assert masked("private_key", text) == f"key:\n{red('private_key')}\nafter the key"
    truncated = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk\nAAAA+/==\n"
    assert masked("private_key", truncated + "$ ") == red("private_key") + "\n$ "


def test_jwt_runs_without_dots_are_rejected_at_once() -> None:
    from lictor.masking._validators import jwt

    run = b"eyJaaaaaaaa-eyJbbbbbbbb-eyJcccccccc"
    assert jwt(run, 0, len(run)) == -(len(run) + 2)  # no later start in the run can pass
    assert masked("jwt", run.decode()) == run.decode()
    dotted = (b"eyJaaaaaaaa." * 7).decode()  # 7 and 6 dots: no; 5 dots and a full stop: a JWE
    assert masked("jwt", dotted) == dotted[:24] + red("jwt") + "."


def test_jwt_sentence_full_stop_kept() -> None:
    token = POSITIVES["jwt"][0]
    assert masked("jwt", f"token {token}.") == f"token {red('jwt')}."


def test_email_local_part_starts_at_the_word() -> None:
    assert masked("email", "mailto:john.doe@example.com.") == f"mailto:{red('email')}."
    assert masked("email", "a@b.co,c@d.co") == f"{red('email')},{red('email')}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mailto:jane.doe%40example.com", "mailto:{email}"),
        ('<a href="mailto:jane.doe%40example.com?subject=Hi">', '<a href="mailto:{email}?subject=Hi">'),
        ("/v1/customers?email=jane.doe%40example.com&page=2", "/v1/customers?email={email}&page=2"),
        ("?email=jane%2Bbilling%40example.com", "?email={email}"),
        ("?email=jane%2bbilling%40Example.COM", "?email={email}"),
        ("?email=jane+billing%40example.com", "?email={email}"),
        ("?to=zo%C3%AB%40example.com", "?to={email}"),
        # not addresses: no domain, a one-letter top-level label, a local part ending in an escaped space
        ("?q=a%40b&r=1", "?q=a%40b&r=1"),
        ("?q=a%40b.c", "?q=a%40b.c"),
        ("?tag=foo%20%40jane.smith", "?tag=foo%20%40jane.smith"),
        ("?q=%40jane.smith", "?q=%40jane.smith"),
        ("50%40", "50%40"),
    ],
)
def test_email_with_its_at_percent_encoded_is_masked(text: str, expected: str) -> None:
    assert masked("email", text) == expected.format(email=red("email"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("var contact = 'jane.doe\\x40example.com';", "var contact = '{email}';"),
        ("Contact: jane.doe&#64;example.com.", "Contact: {email}."),
        ("1,jane.doe&#064;example.com,gold", "1,{email},gold"),
        ("data: <p>jane.doe&#x40;example.com</p>", "data: <p>{email}</p>"),
        ("data: <p>jane.doe&#X40;example.com</p>", "data: <p>{email}</p>"),
        ("jane.doe&commat;example.com", "{email}"),
        ("jane%2Bx&#64;example.com", "{email}"),
        # not addresses: no domain, a one-letter top-level label, no local part, a reference without its ';'
        ("a&#64;b", "a&#64;b"),
        ("a\\x40b.c", "a\\x40b.c"),
        ("&#64;jane.smith", "&#64;jane.smith"),
        ("50&commat; each", "50&commat; each"),
        ("jane&#64example.com", "jane&#64example.com"),
    ],
)
def test_email_with_its_at_written_as_an_escape_or_a_reference_is_masked(text: str, expected: str) -> None:
    # In JavaScript source, plain text, CSV and event streams, which no browser renders as HTML, the @ stays written
    # so; the detector reads it as the @ it stands for.
    assert masked("email", text) == expected.format(email=red("email"))


def test_email_percent_encoded_keeps_its_length_when_the_style_does() -> None:
    text = "mailto:jane.doe%40example.com"
    out = plan_for("email", style="preserve-length").mask_text(text)[0]
    assert len(out) == len(text) and "jane" not in out and out.startswith("mailto:")


def test_detectors_adjacent_to_each_other() -> None:
    text = "4111111111111111 john@example.com 10.0.0.1 123-45-6789"
    out, counts = plan_for(*ALL).mask_text(text)
    assert out == " ".join(red(n) for n in ("card", "email", "ipv4", "ssn"))
    assert counts == {"card": 1, "email": 1, "ipv4": 1, "ssn": 1}


def test_rejected_candidate_does_not_consume_its_text() -> None:
    # the phone detector takes "+1 4111..." first and rejects it (too many digits); the card
    # inside must still be found
    out, counts = plan_for("phone", "card").mask_text("+1 4111111111111111")
    assert out == f"+1 {red('card')}"
    assert counts == {"card": 1}


def test_rejected_candidate_does_not_hide_another_detector_at_same_place() -> None:
    first = compile_detector("first", r"\d{4}-\d{4}", "ssn")  # always rejected: not 9 digits
    second = compile_detector("second", r"\d{4}")
    plan = MaskPlan.compile([{"detectors": ["first", "second"]}], {"first": first, "second": second}, key=KEY)
    assert plan.mask_text("1234-5678") == (f"{red('second')}-{red('second')}", {"second": 2})


def test_skipped_detector_does_not_lend_its_span_to_the_next() -> None:
    # "a" is rejected by the jwt check (no dots) with a hint that skips its later candidates in
    # the run; "b" then matches at those places with its own, shorter span
    a = compile_detector("a", r"[a-z]{3}[a-z]{0,5}", "jwt")
    b = compile_detector("b", r"[a-z]{2}")
    plan = MaskPlan.compile([{"detectors": ["a", "b"]}], {"a": a, "b": b}, key=KEY)
    assert plan.mask_text("abcdefghij") == (red("b") * 5, {"b": 5})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_validators_read_only_their_characters_of_any_bytes(data: bytes) -> None:
    # luhn, mod97 and ssn keep the digits (alphanumerics) of a span and ignore every other byte
    digits = bytes(b for b in data if 48 <= b <= 57)
    alnum = bytes(b for b in data if chr(b).isascii() and chr(b).isalnum())
    passes = len(digits) >= 2 and luhn_ok(digits)
    assert VALIDATORS["luhn"](data, 0, len(data)) == (len(data) if passes else -1)
    assert (VALIDATORS["mod97"](data, 0, len(data)) == len(data)) == (
        bool(alnum) and VALIDATORS["mod97"](alnum, 0, len(alnum)) == len(alnum)
    )


def test_validators_listed() -> None:
    assert {"luhn", "iban", "mod97", "ssn", "card", "phone", "ipv4", "ipv6"} <= set(VALIDATORS)


def test_builtin_detectors_are_bounded() -> None:
    for det in BUILTIN_DETECTORS.values():
        assert 0 < det.max_len <= 4096, det.name


# -- custom detectors ----------------------------------------------------------------------


def test_custom_detector_with_validator_and_group() -> None:
    det = compile_detector("order_card", r"card=(\d{16})\b", "luhn", 1)
    assert det == Detector("order_card", r"card=(\d{16})\b", "luhn", 1)
    plan = MaskPlan.compile([{"detectors": ["order_card"]}], {"order_card": det}, key=KEY)
    assert plan.mask_text("card=4111111111111111 card=4111111111111112") == (
        f"card={red('order_card')} card=4111111111111112",
        {"order_card": 1},
    )


def test_custom_detector_own_style_applies_unless_the_rule_sets_one() -> None:
    det = compile_detector("emp", r"\bEMP-\d{6}\b", style="partial", keep=2)
    plan = MaskPlan.compile([{"detectors": ["emp"]}], {"emp": det}, key=KEY)
    assert plan.mask_text("id EMP-123456")[0] == "id ***-****56"
    plan = MaskPlan.compile([{"detectors": ["emp"], "style": "redact"}], {"emp": det}, key=KEY)
    assert plan.mask_text("id EMP-123456")[0] == f"id {red('emp')}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("bad", r"(a)\1"), "re2 refuses"),
        (("bad", r"(?=x)y"), "re2 refuses"),
        (("bad", r"[a-"), "re2 refuses"),
        (("bad", r"\d+"), "unbounded"),
        (("bad", r"x.*"), "unbounded"),
        (("bad", r"a{2,}"), "unbounded"),
        (("bad", r"a?"), "empty string"),
        (("bad", r"\b"), "empty string"),
        (("bad", r"\w{1,1000}[^x]{1,1000}"), "limit is 4096"),
        (("bad", r"(\d{4})", "nope"), "unknown validator"),
        (("bad", r"(\d{4})", None, 2), "group 2 does not exist"),
        (("Bad", r"x"), "invalid"),
        (("column", r"x"), "reserved"),
    ],
)
def test_custom_detector_errors(args: tuple[object, ...], needle: str) -> None:
    with pytest.raises(MaskingError, match=needle) as info:
        compile_detector(*args)  # type: ignore[arg-type]
    if args[0] == "bad":
        assert "'bad'" in str(info.value)


def test_pattern_width_handles_re2_syntax() -> None:
    widths = {
        r"\QA.B\E{2}": 6,
        r"(?i)k": 3,
        r"[[:alpha:]]{3}": 3,
        r"\pL": 4,
        r"[^a]": 4,
        r"\x{263a}": 3,
        r"(?P<n>ab|abcd)c": 5,
        r"a{3}|b{2,5}": 5,
        r"\d{4}-\d{2}": 7,
        r"é": 2,
        r"x{": 2,
        r"(?:a(?i)b)c": 5,
    }
    for pattern, width in widths.items():
        assert compile_detector("w", pattern).max_len == width, pattern


def test_custom_patterns_run_in_linear_time() -> None:
    # a pattern that backtracking engines take exponential time on
    det = compile_detector("evil", r"(?:a|aa){1,40}b")
    plan = MaskPlan.compile([{"detectors": ["evil"]}], {"evil": det}, key=KEY)
    data = b"a" * 2_000_000
    t0 = time.perf_counter()
    assert plan.mask_bytes(data) == (data, {})
    assert time.perf_counter() - t0 < 10


def test_custom_pattern_flags_stay_inside_their_detector() -> None:
    loose = compile_detector("loose", r"(?i)zzz\d{2}")
    strict = compile_detector("strict", r"XYZ\d{2}")
    plan = MaskPlan.compile([{"detectors": ["loose", "strict"]}], {"loose": loose, "strict": strict}, key=KEY)
    assert plan.mask_text("ZZZ12 xyz12 XYZ12") == (f"{red('loose')} xyz12 {red('strict')}", {"loose": 1, "strict": 1})


def test_custom_anchors() -> None:
    line = compile_detector("line", r"(?m)^ERR-\d{3}$")
    plan = MaskPlan.compile([{"detectors": ["line"]}], {"line": line}, key=KEY)
    assert plan.mask_text("ERR-404\nx ERR-500\nERR-501") == (f"{red('line')}\nx ERR-500\n{red('line')}", {"line": 2})


def test_custom_name_may_not_shadow_builtin() -> None:
    with pytest.raises(MaskingError, match="built-in"):
        compile_detector("card", r"\d{4}")
    det = compile_detector("my_card", r"\d{4}")
    with pytest.raises(MaskingError, match="built-in"):
        MaskPlan.compile([{"detectors": ["card"]}], {"card": det})
    with pytest.raises(MaskingError, match="must be a Detector named"):
        MaskPlan.compile([{"detectors": ["x"]}], {"x": det})


def test_custom_detector_is_recompiled_by_the_plan() -> None:
    forged = Detector("loose", r"\d+")  # built without compile_detector
    with pytest.raises(MaskingError, match="unbounded"):
        MaskPlan.compile([{"detectors": ["loose"]}], {"loose": forged})


# -- plan compilation ----------------------------------------------------------------------


def test_unknown_detector_is_named() -> None:
    with pytest.raises(MaskingError, match="'credit_card'"):
        MaskPlan.compile([{"detectors": ["credit_card"]}])


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"detectors": ["card"], "colums": ["x"]}, "unknown key"),
        ({"style": "hash"}, "must name"),
        ({"detectors": []}, "must name"),
        ({"detectors": ["card"], "style": "blur"}, "unknown masking style"),
        ({"detectors": ["card"], "keep": -1}, "keep"),
        ({"detectors": ["card"], "keep": True}, "keep"),
        ({"detectors": "card"}, "list of non-empty strings"),
        ({"columns": [""]}, "list of non-empty strings"),
        ({"json_paths": ["a.b"]}, "must start with"),
        ({"json_paths": ["$"]}, "whole document"),
        ({"json_paths": ["$.a["]}, "bad bracket"),
        ({"json_paths": ["$.a b"]}, "unexpected"),
    ],
)
def test_bad_mask_blocks(block: dict[str, object], needle: str) -> None:
    with pytest.raises(MaskingError, match=needle):
        MaskPlan.compile([block])


def test_bad_key() -> None:
    with pytest.raises(MaskingError, match="16 bytes"):
        MaskPlan.compile([{"detectors": ["card"]}], key=b"short")


def test_empty_plan() -> None:
    assert MaskPlan.EMPTY.is_empty
    assert MaskPlan.compile([]).is_empty
    assert MaskPlan.EMPTY.mask_text("4111111111111111") == ("4111111111111111", {})
    assert MaskPlan.EMPTY.mask_bytes(b"x") == (b"x", {})
    assert MaskPlan.EMPTY.mask_json({"a": "4111111111111111"}) == ({"a": "4111111111111111"}, {})
    assert not MaskPlan.EMPTY.columns(["a"]).needs_masking
    stream = MaskPlan.EMPTY.stream()
    assert stream.feed(b"4111111111111111") == b"4111111111111111"
    assert stream.close() == b""
    assert not plan_for("card").is_empty


def test_union_of_blocks_and_strongest_style() -> None:
    plan = MaskPlan.compile(
        [
            {"detectors": ["card"], "style": "partial"},
            {"detectors": ["card", "email"], "style": "hash"},
            {"detectors": ["email"], "style": "partial", "keep": 2},
            {"columns": ["ssn"], "style": "partial"},
        ],
        key=KEY,
    )
    assert plan.detectors == ("card", "email")
    out, counts = plan.mask_text("4111111111111111 a@b.co")
    assert out.startswith("[HASH:card:") and "[HASH:email:" in out
    assert counts == {"card": 1, "email": 1}
    plan = MaskPlan.compile(
        [{"detectors": ["card"], "style": "partial", "keep": 6}, {"detectors": ["card"], "style": "partial"}]
    )
    assert plan.mask_text("4111111111111111")[0] == "************1111"


def test_detector_order_is_canonical() -> None:
    a = MaskPlan.compile([{"detectors": ["ipv4", "card"]}])
    b = MaskPlan.compile([{"detectors": ["card"]}, {"detectors": ["ipv4"]}])
    assert a.detectors == b.detectors == ("card", "ipv4")


# -- styles --------------------------------------------------------------------------------


def test_partial_keeps_last_four_and_separators() -> None:
    plan = plan_for("card", "email", style="partial")
    assert plan.mask_text("4111 1111 1111 1111")[0] == "**** **** **** 1111"
    assert plan.mask_text("4111-1111-1111-1111")[0] == "****-****-****-1111"
    assert plan.mask_text("john.doe@example.com")[0] == "****.***@******e.com"


def test_partial_never_shows_more_than_half() -> None:
    det = compile_detector("pin", r"PIN:\d{1,6}")
    plan = MaskPlan.compile([{"detectors": ["pin"], "style": "partial", "keep": 4}], {"pin": det}, key=KEY)
    assert plan.mask_text("PIN:1234")[0] == "***:*234"  # 7 letters and digits: at most 3 shown
    plan = MaskPlan.compile([{"detectors": ["pin"], "style": "partial", "keep": 0}], {"pin": det}, key=KEY)
    assert plan.mask_text("PIN:1234")[0] == "***:****"


def test_hash_is_keyed_deterministic_and_label_independent() -> None:
    plan = MaskPlan.compile([{"detectors": ["email"], "columns": ["mail"], "style": "hash"}], key=KEY)
    a = plan.mask_text("x a@b.co y a@b.co z c@d.co")[0]
    tokens = a.split()
    assert tokens[1] == tokens[3] != tokens[5]
    assert tokens[1].startswith("[HASH:email:") and len(tokens[1]) == len("[HASH:email:]") + 16
    cm = plan.columns(["mail"])
    col = cm.mask_value(0, b"a@b.co").decode()
    assert col.startswith("[HASH:column:") and col[-17:] == tokens[1][-17:]  # joins still work
    other = MaskPlan.compile([{"detectors": ["email"], "style": "hash"}], key=b"another-key-0123456789")
    assert other.mask_text("a@b.co")[0] != tokens[1]


def test_preserve_length_keeps_classes_and_is_deterministic() -> None:
    plan = plan_for("card", "email", style="preserve-length")
    src = "4111-1111-1111-1111 John.Doe@Example.com"
    out = plan.mask_text(src)[0]
    assert len(out) == len(src) and out != src
    for a, b in zip(src, out, strict=True):
        assert a.isdigit() == b.isdigit() and a.isupper() == b.isupper() and a.islower() == b.islower()
        if not a.isalnum():
            assert a == b
    assert plan.mask_text(src)[0] == out
    other = MaskPlan.compile([{"detectors": ["card", "email"], "style": "preserve-length"}], key=b"k" * 32)
    assert other.mask_text(src)[0] != out


def test_preserve_length_keeps_byte_length_of_non_ascii() -> None:
    det = compile_detector("name", r"name=\S{1,20}")
    plan = MaskPlan.compile([{"detectors": ["name"], "style": "preserve-length"}], {"name": det}, key=KEY)
    data = "name=Zoë-Ørsted".encode()
    out, _ = plan.mask_bytes(data)
    assert len(out) == len(data)
    out.decode("utf-8")  # still valid UTF-8
    assert out[4:5] == b"=" and b"-" in out


def test_counts_never_contain_values() -> None:
    out, counts = plan_for(*ALL).mask_text("4111111111111111 john@example.com")
    assert set(counts) == {"card", "email"}
    assert all(isinstance(v, int) for v in counts.values())


# -- text and bytes ------------------------------------------------------------------------


def test_mask_bytes_passes_invalid_utf8_through_and_scans_ascii() -> None:
    data = b"\xff\xfe card 4111111111111111\xff\x80 john@example.com\xc3"
    out, counts = plan_for(*ALL).mask_bytes(data)
    assert out == b"\xff\xfe card [REDACTED:card]\xff\x80 [REDACTED:email]\xc3"
    assert counts == {"card": 1, "email": 1}


def test_mask_text_keeps_non_ascii_and_lone_surrogates() -> None:
    text = "naïve ☃ \udcff 4111111111111111 日本"
    assert plan_for("card").mask_text(text)[0] == f"naïve ☃ \udcff {red('card')} 日本"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_mask_bytes_never_corrupts_unmatched_bytes(data: bytes) -> None:
    out, counts = plan_for(*ALL).mask_bytes(data)
    if not counts:
        assert out == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_mask_text_identity_when_nothing_found(text: str) -> None:
    out, counts = plan_for(*ALL).mask_text(text)
    if not counts:
        assert out == text


# -- JSON ----------------------------------------------------------------------------------


DOC = {
    "data": {"name": "Ada", "age": 36, "admin": True, "none": None, "tags": ["a", "b"]},
    "users": [{"email": "a@b.co", "id": 1}, {"email": "c@d.co", "id": 2}],
    "meta": {"token": "abc", "inner": {"token": 42}},
    "note": "card 4111111111111111",
    "key with space": "v",
}


def test_json_paths() -> None:
    plan = MaskPlan.compile(
        [{"json_paths": ["$.data.*", "$.users[*].email", "$..token", "$['key with space']"]}], key=KEY
    )
    out, counts = plan.mask_json(DOC)
    r = red("path")
    assert out["data"] == {"name": r, "age": r, "admin": r, "none": None, "tags": [r, r]}
    assert out["users"] == [{"email": r, "id": 1}, {"email": r, "id": 2}]
    assert out["meta"] == {"token": r, "inner": {"token": r}}
    assert out["note"] == DOC["note"]  # no detectors in this plan
    assert out["key with space"] == r
    assert counts == {"path": 5 + 2 + 2 + 1}
    assert json.loads(json.dumps(out)) == out
    assert DOC["data"]["name"] == "Ada"  # input untouched


def test_json_index_paths() -> None:
    plan = MaskPlan.compile([{"json_paths": ["$.users[0].id", "$.users[-1].email"]}], key=KEY)
    out, _ = plan.mask_json(DOC)
    assert out["users"] == [{"email": "a@b.co", "id": red("path")}, {"email": red("path"), "id": 2}]


def test_json_detectors_on_strings_keys_and_integers() -> None:
    plan = plan_for("card", "email", "secret_assignment")
    doc = {
        "note": "pay with 4111111111111111",
        "a@b.co": {"x": 1},
        "pan": 4111111111111111,
        "count": 3,
        "password": "hunter2",
        "nested": [{"apiKey": 12345}, {"credentials": {"user": "u"}}],
        "ok": True,
    }
    out, counts = plan.mask_json(doc)
    assert out["note"] == f"pay with {red('card')}"
    assert out[red("email")] == {"x": 1}
    assert out["pan"] == red("card")
    assert out["count"] == 3
    assert out["password"] == red("secret_assignment")
    assert out["nested"] == [{"apiKey": red("secret_assignment")}, {"credentials": {"user": red("secret_assignment")}}]
    assert out["ok"] is True
    assert counts == {"card": 2, "email": 1, "secret_assignment": 3}


def test_json_secret_keys_mask_every_scalar_of_a_list_or_object_value() -> None:
    # {"password": ["x"]} and {"api_key": {"live": "x"}} carried the secrets past the key check
    plan = plan_for("secret_assignment")
    doc = {
        "password": ["hunter2", 12345, None],
        "api_key": {"live": "sk_live_abc", "test": {"v": "sk_test_def"}, "rotated": True},
        "tokens": ["not a secret key: left alone"],
        "note": "plain",
    }
    out, counts = plan.mask_json(doc)
    r = red("secret_assignment")
    assert out["password"] == [r, r, None]
    assert out["api_key"] == {"live": r, "test": {"v": r}, "rotated": r}
    assert out["tokens"] == doc["tokens"] and out["note"] == "plain"
    assert counts == {"secret_assignment": 5}
    body, _ = plan.mask_json_bytes(json.dumps(doc).encode())
    assert b"hunter2" not in body and b"sk_live_abc" not in body and b"sk_test_def" not in body


def test_json_masked_keys_never_collide() -> None:
    out, _ = plan_for("email").mask_json({"a@b.co": 1, "c@d.co": 2})
    assert out == {red("email"): 1, red("email") + " (2)": 2}


def test_json_styles_on_scalars() -> None:
    plan = MaskPlan.compile([{"json_paths": ["$.a", "$.b", "$.c"], "style": "partial"}], key=KEY)
    out, _ = plan.mask_json({"a": "4111111111111111", "b": 123456789, "c": False})
    assert out == {"a": "************1111", "b": "*****6789", "c": "***se"}
    plan = MaskPlan.compile([{"json_paths": ["$.a"], "style": "hash"}], key=KEY)
    assert plan.mask_json({"a": {"x": 1}})[0]["a"]["x"].startswith("[HASH:path:")


def test_mask_json_bytes() -> None:
    plan = plan_for("email")
    assert plan.mask_json_bytes(b'{"m": "a@b.co", "n": "\\u00e9"}') == (
        '{"m":"[REDACTED:email]","n":"é"}'.encode(),
        {"email": 1},
    )
    with pytest.raises(MaskingError, match="not valid JSON"):
        plan.mask_json_bytes(b'{"m": ')


def test_parse_path() -> None:
    steps = parse_path("$.a[*].b..c['d.e'][2].*")
    assert [(s.kind, s.key, s.deep) for s in steps] == [
        ("key", "a", False),
        ("wild", None, False),
        ("key", "b", False),
        ("key", "c", True),
        ("key", "d.e", False),
        ("index", 2, False),
        ("wild", None, False),
    ]


# -- columns -------------------------------------------------------------------------------


def test_columns_globs_and_detectors() -> None:
    plan = MaskPlan.compile(
        [{"columns": ["*password*", "SSN"], "detectors": ["email"]}, {"columns": ["api_*"], "style": "hash"}], key=KEY
    )
    cm = plan.columns(["id", "UserPassword", "ssn", "note", "API_TOKEN"])
    assert cm.needs_masking
    assert [cm.action(i) for i in range(5)] == ["detect", "whole", "whole", "detect", "whole"]
    assert cm.mask_value(0, b"42") == b"42"
    assert cm.mask_value(1, b"hunter2") == b"[REDACTED:column]"
    assert cm.mask_value(3, b"mail a@b.co") == b"mail [REDACTED:email]"
    assert cm.mask_value(4, b"tok").startswith(b"[HASH:column:")
    assert cm.counts == {"column": 2, "email": 1}
    with pytest.raises(MaskingError, match="out of range"):
        cm.mask_value(5, b"x")


def test_columns_without_detectors_relay_raw() -> None:
    plan = MaskPlan.compile([{"columns": ["secret"]}])
    cm = plan.columns(["id", "name"])
    assert not cm.needs_masking
    assert [cm.action(i) for i in range(2)] == ["pass", "pass"]
    assert plan.columns(["id", "Secret"]).needs_masking


# -- schema --------------------------------------------------------------------------------


def test_schemas_are_valid_and_strict() -> None:
    for schema in (MASK_SCHEMA, DETECTOR_SCHEMA):
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False
    mask = jsonschema.Draft202012Validator(MASK_SCHEMA)
    mask.validate({"detectors": ["card", "email"], "columns": ["*password*"], "style": "partial", "keep": 4})
    mask.validate({"json_paths": ["$.data.*", "$..token"]})
    for bad in ({}, {"style": "redact"}, {"detectors": []}, {"detectors": ["card"], "extra": 1}, {"json_paths": ["a"]}):
        assert not mask.is_valid(bad), bad
    det = jsonschema.Draft202012Validator(DETECTOR_SCHEMA)
    det.validate({"pattern": r"EMP-\d{6}", "validator": "luhn", "group": 1, "style": "partial"})
    for bad in ({}, {"pattern": "x", "validator": "nope"}, {"pattern": "x", "flags": "i"}):
        assert not det.is_valid(bad), bad


def test_every_schema_valid_block_compiles() -> None:
    block = {
        "detectors": ALL,
        "columns": ["*"],
        "json_paths": ["$..x"],
        "style": "preserve-length",
        "keep": 0,
    }
    jsonschema.validate(block, MASK_SCHEMA)
    assert not MaskPlan.compile([block]).is_empty


WIDTH_PATTERNS = [
    r"[a-z]{2,5}(?:-[0-9]{1,3}){0,2}",
    r"(?:ab|c(?:de|f{2,3}))\.x?",
    r"(?i)k[^a]{1,3}",
    r"[^\x00-\x7f]{1,2}é",
    r"[A-Za-z0-9_]{1,4}[ \t][^A-Za-z0-9_]",
    r"(a|bc|def){1,3}",
    r"[0-9]{3}(?:[ -][0-9]{2}){1,2}",
]


@pytest.mark.parametrize("pattern", WIDTH_PATTERNS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_pattern_width_bounds_every_match(pattern: str, data: st.DataObject) -> None:
    det = compile_detector("w", pattern)
    text = data.draw(st.from_regex(pattern, fullmatch=True))
    encoded = text.encode("utf-8", "surrogatepass")
    assert re2.fullmatch(pattern, encoded) is not None
    assert len(encoded) <= det.max_len


def test_json_columns_stay_json_when_masked() -> None:
    plan = MaskPlan.compile([{"detectors": ["card"]}, {"columns": ["doc_whole"], "style": "redact"}])
    columns = plan.columns(["doc", "doc_whole"])
    doc = b'{"card": 4111111111111111, "list": ["4111 1111 1111 1111", 4111111111111111.0], "ok": 7, "f": 2.5}'
    assert json.loads(columns.mask_json_value(0, doc)) == {
        "card": red("card"),
        "list": [red("card"), red("card")],
        "ok": 7,
        "f": 2.5,
    }
    assert json.loads(columns.mask_json_value(1, doc)) == "[REDACTED:column]"
    assert columns.mask_json_value(0, b"not json 4111111111111111") == b"not json " + red("card").encode()


@pytest.mark.parametrize(
    ("pattern", "sample"),
    [
        # re2 keeps (?i) across "|": k also matches the Kelvin sign (3 bytes).
        (r"(?i)x|k{1000}", "\u212a" * 1000),
        # \xHH and octal escapes above 0x7f are two-byte characters in UTF-8.
        (r"[\x80-\xff]{1000}", "\u00ff" * 1000),
        (r"[\0-\377]{1000}", "\u00ff" * 1000),
        (r"\377{1000}", "\u00ff" * 1000),
    ],
)
def test_pattern_width_counts_wide_escapes_and_flags(pattern: str, sample: str) -> None:
    det = compile_detector("wide", pattern)
    data = sample.encode()
    assert re2.fullmatch(pattern, sample)
    assert det.max_len >= len(data)
    plan = MaskPlan.compile([{"detectors": ["wide"]}], custom_detectors={"wide": det})
    body = b"hello " + data + b" bye"
    whole, _ = plan.mask_bytes(body)
    assert b"[REDACTED:wide]" in whole and data[:20] not in whole
    stream = plan.stream()
    chunked = b"".join(stream.feed(body[i : i + 500]) for i in range(0, len(body), 500)) + stream.close()
    assert chunked == whole


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_mask_json_bytes_refuses_non_json_constants(constant: bytes) -> None:
    plan = MaskPlan.compile([{"detectors": ["card"]}])
    with pytest.raises(MaskingError):
        plan.mask_json_bytes(b'{"x":' + constant + b"}")


def test_a_text_value_with_json_escapes_that_is_not_json_is_masked_as_read() -> None:
    # jane\u0040example.com in a text column, not JSON: the detectors read no address in the bytes,
    # anyone reading the value does.
    plan = plan_for("email")
    cm = plan.columns(["note"])
    assert cm.mask_json_value(0, b"mail jane\\u0040example.com today") == b"mail [REDACTED:email] today"
    assert cm.mask_json_value(0, b'{"to": "jane\\u0040example.com"}') == b'{"to":"[REDACTED:email]"}'
    assert cm.mask_json_value(0, b"caf\\u00e9 au lait") == b"caf\\u00e9 au lait"  # nothing found: as it was
