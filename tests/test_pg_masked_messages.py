"""What a masked session gets of the server's errors and notices: messages that may print table data
(raised while the statement ran) are reduced to their SQLSTATE; the rest is masked by detectors."""

from __future__ import annotations

import pytest
from lictor.masking import MaskPlan
from lictor_addons.postgres import _protocol as pg
from lictor_addons.postgres._session import (
    _EXPONENT_NUMBER,
    _GROUPED_NUMBER,
    _NUMBER_HINT,
    _CopyNumbers,
    _hides_a_number,
    _masked_texts,
    _number_masked,
)

PLAN = MaskPlan.compile([{"detectors": ["card", "email"]}])


def _through(code: bytes, fields: dict[str, str]) -> dict[str, str]:
    raw = pg.report(code, fields)
    out = _masked_texts(PLAN, raw)
    message = pg.decode_backend(raw if out is None else out)
    assert isinstance(message, (pg.ErrorResponse, pg.NoticeResponse))
    return dict(message.fields)


@pytest.mark.parametrize(
    ("code", "message", "detail"),
    [
        ("22P02", 'invalid input syntax for type integer: "1111 1111 1111 1114"', None),
        ("22008", "date field value out of range: 41111111-13-01", None),
        ("22021", 'invalid byte sequence for encoding "UTF8": 0xf0 0x34 0x31 0x31', None),
        ("2200M", "invalid XML document", "line 1: Start tag expected, '<' not found\n1111111111111114\n^"),
        ("42P01", 'relation "1111_1111_1111_1114" does not exist', None),
        ("42501", 'must be superuser or have privileges of pg_read_all_settings to examine "DaTa_DiRectory"', None),
        ("P0001", "value: moc.elpmaxe@nna", None),
    ],
)
def test_an_error_raised_while_the_statement_ran_shows_only_its_sqlstate(
    code: str, message: str, detail: str | None
) -> None:
    fields = {"S": "ERROR", "V": "ERROR", "C": code, "M": message, "W": "SQL function", "F": "x.c", "L": "1"}
    if detail:
        fields["D"] = detail
    out = _through(b"E", fields)
    assert out["C"] == code and out["S"] == "ERROR" and out["F"] == "x.c"
    assert f"SQLSTATE {code}" in out["M"] and "withheld" in out["M"]
    assert "D" not in out and "W" not in out
    assert not any(part in str(out) for part in ("1111", "4111", "0x", "elpmaxe", "DaTa"))


def test_notices_raised_while_the_statement_ran_too() -> None:
    out = _through(b"N", {"S": "NOTICE", "C": "00000", "M": "value: 1111 1111 1111 1114"})
    assert out["M"].startswith("notice (SQLSTATE 00000)") and "1114" not in out["M"]


def test_conditions_that_never_print_values_keep_their_message() -> None:
    out = _through(
        b"E", {"S": "ERROR", "C": "25006", "M": "cannot execute UPDATE in a read-only transaction", "D": "x", "W": "y"}
    )
    assert out["M"] == "cannot execute UPDATE in a read-only transaction" and "D" not in out and "W" not in out


def test_an_error_found_in_the_statements_text_keeps_its_message_masked() -> None:
    out = _through(b"E", {"S": "ERROR", "C": "42703", "M": 'column "emial" does not exist', "P": "8", "H": "h"})
    assert out["M"] == 'column "emial" does not exist' and out["P"] == "8" and out["H"] == "h"
    out = _through(b"E", {"S": "ERROR", "C": "42703", "M": "column ann@example.com does not exist", "P": "8"})
    assert out["M"] == "column [REDACTED:email] does not exist"


@pytest.mark.parametrize(
    "fields",
    [
        # a value parsed as SQL while the statement ran: ('x ' || reverse(card))::regtype
        {"S": "ERROR", "C": "42601", "M": 'syntax error at or near "1111111111111114"', "P": "3"},
        {"S": "ERROR", "C": "42704", "M": 'type "x 1111111111111114" does not exist', "P": "1", "W": "invalid type"},
    ],
)
def test_a_position_inside_a_value_parsed_while_the_statement_ran_is_not_enough(fields: dict[str, str]) -> None:
    out = _through(b"E", fields)
    assert "withheld" in out["M"] and "1111" not in str(out)


@pytest.mark.parametrize(
    "text",
    [
        "$4,111,111,111,111,111.00",  # money under lc_monetary C or en_US
        "4.111.111.111.111.111,00 \u20ac",  # de_DE
        "4\u202f111\u202f111\u202f111\u202f111\u202f111,00 \u20ac",  # fr_FR: narrow no-break spaces
        "4\u00a0111\u00a0111\u00a0111\u00a0111\u00a0111,00 \u20ac",  # no-break spaces
        "CHF 4'111'111'111'111'111.00",
    ],
)
def test_a_card_spelled_as_money_in_any_locale_is_a_masked_number(text: str) -> None:
    # A masked session may SET lc_monetary: money then prints a card stored in it with other group separators.
    masker = _CopyNumbers(PLAN)
    assert _number_masked(masker, 0, text.encode())
    assert _hides_a_number(masker, 0, f'{{"{text}"}}'.encode())  # inside a money[] or a composite
    assert not _number_masked(masker, 0, text.replace("4", "5", 1).encode())  # not a valid card: kept


def test_ordinary_amounts_are_not_masked_numbers() -> None:
    masker = _CopyNumbers(PLAN)
    for text in ("$1,234,567.50", "1.234.567,50 \u20ac", '{"$12.50","$1,000,000,000.00"}', "(3,1)"):
        assert not _number_masked(masker, 0, text.encode()) and not _hides_a_number(masker, 0, text.encode())


def test_the_quick_check_for_numbers_never_rules_out_one_the_full_patterns_find() -> None:
    # _hides_a_number runs on every masked text value; one search of _NUMBER_HINT skips the two full patterns,
    # so it must find something wherever either of them would.
    import random

    alphabet = "0123456789eE+-., '$x{}()\u00a0\u202f".encode()
    rnd = random.Random(20261130)
    ruled_out = 0
    for _ in range(100_000):
        text = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(1, 24)))
        if _NUMBER_HINT.search(text) is None:
            assert _EXPONENT_NUMBER.search(text) is None and _GROUPED_NUMBER.search(text) is None, text
            ruled_out += 1
    assert 10_000 < ruled_out < 90_000  # both kinds of text were drawn
    for text in ("4.111111111111111e+15", "{4111111111111111E0}", "4\u202f111\u202f111\u202f111\u202f111"):
        assert _NUMBER_HINT.search(text.encode())
