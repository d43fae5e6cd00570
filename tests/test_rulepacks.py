"""Rule pack loading and checking: every problem at FILE:LINE:COL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lictor import Request, load_policy, testing
from lictor.addons import AddonManager
from lictor.masking import MaskPlan
from lictor.policytest import build_requests
from lictor.rulepacks import schema_json
from lictor_addons import default_addons

ROOT = Path(__file__).resolve().parent.parent


def vocabularies():
    m = AddonManager()
    m.add(*default_addons())
    return m.vocabularies


def write(tmp_path: Path, text: str, name: str = "pack.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text.lstrip("\n"))
    return p


GOOD = """
format: lictor/v1
metadata: {name: good, owner: security}
identities:
  - match: {claims: {role: readonly}}
    roles: [ro]
roles:
  ro:
    rules:
      - id: ro-select
        protocol: postgres
        when: {statements: [select]}
        action: allow
"""


def problems(tmp_path: Path, text: str, **kw):
    path = write(tmp_path, text)
    result = load_policy([path], vocabularies(), **kw)
    return path, result


def test_good_pack_compiles_with_content_hash_version(tmp_path):
    _, result = problems(tmp_path, GOOD)
    assert not result.problems
    assert result.policy is not None and len(result.policy.version) == 16
    _, again = problems(tmp_path, GOOD.replace("security", "sec"))
    assert again.policy is not None and again.policy.version != result.policy.version


def test_unknown_key_reports_its_line(tmp_path):
    path, result = problems(
        tmp_path, GOOD.replace("        action: allow", "        action: allow\n        colour: red")
    )
    assert result.policy is None
    assert [str(p) for p in result.errors] == [
        f"{path}:13:9: unknown key 'colour' in roles.ro.rules.0; expected one of: action, approval, description, "
        "enforce, id, mask, message, protocol, targets, unless, when"
    ]


def test_unknown_when_field_names_the_vocabulary(tmp_path):
    path, result = problems(tmp_path, GOOD.replace("{statements: [select]}", "{statements: [select], tabels: [x]}"))
    (err,) = result.errors
    assert err.loc.line == 11 and "unknown key 'tabels' in roles.ro.rules.0.when" in err.message
    assert "(did you mean 'tables'?)" in err.message


def test_a_misspelt_value_names_the_likely_one_first(tmp_path):
    # The list of every statement kind is long: the author should not have to read it to find the typo.
    path, result = problems(tmp_path, GOOD.replace("[select]", "[copy_programm]").replace("allow", "Deny"))
    assert str(result.errors[0]).startswith(
        f"{path}:11:29: statements.0: unknown value 'copy_programm' "
        "(did you mean 'copy_program'?); expected one of: select, insert,"
    )
    assert str(result.errors[1]) == (
        f"{path}:12:17: roles.ro.rules.0.action: unknown value 'Deny' (did you mean 'deny'?); "
        "expected one of: allow, deny, approve, mask"
    )
    _, unrelated = problems(tmp_path, GOOD.replace("[select]", "[frobnicate]"))
    assert "unknown value 'frobnicate'; expected one of: select" in str(unrelated.errors[0])


def test_a_misspelt_mask_key_or_style_is_reported_once(tmp_path):
    # The schema's error (with its suggestion) was followed by the mask compiler's own for the same key.
    mask = "        action: mask\n        mask: {detector: [email], style: blurred}"
    path, result = problems(tmp_path, GOOD.replace("        action: allow", mask))
    assert [str(p) for p in result.errors] == [
        f"{path}:13:15: roles.ro.rules.0.mask: needs one of detectors, columns, json_paths, not empty",
        f"{path}:13:16: unknown key 'detector' in roles.ro.rules.0.mask (did you mean 'detectors'?); "
        "expected one of: columns, detectors, json_paths, keep, style",
        f"{path}:13:42: roles.ro.rules.0.mask.style: unknown value 'blurred'; "
        "expected one of: redact, partial, hash, preserve-length",
    ]


def test_a_bad_duration_and_a_value_that_should_be_a_list_are_explained_once(tmp_path):
    # A bad duration was reported twice at one place (the schema's regular expression, then the parser's own
    # words); a single name where a list belongs got "'ro' is not of type 'array'".
    text = GOOD.replace("roles: [ro]", "roles: ro").replace(
        "        action: allow", "        action: approve\n        approval: {approvers: [ro], timeout: 10 minutes}"
    )
    path, result = problems(tmp_path, text)
    messages = [str(p) for p in result.errors]
    assert f"{path}:5:12: identities.0.roles: a list is expected here: write [ro]" in messages, messages
    durations = [m for m in messages if "10 minutes" in m]
    assert durations == [
        f"{path}:13:46: roles.ro.rules.0.approval.timeout: bad duration '10 minutes': use forms like 30s, 15m, 1h, 2d"
    ], messages


def test_dangling_role_reference(tmp_path):
    path, result = problems(tmp_path, GOOD.replace("roles: [ro]", "roles: [read-only]"))
    (err,) = result.errors
    assert (err.loc.file, err.loc.line) == (str(path), 5)
    assert "unknown role 'read-only'" in err.message


def test_pattern_re2_refuses(tmp_path):
    text = GOOD + "detectors:\n  backref:\n    pattern: '(a)\\1'\n"
    path, result = problems(tmp_path, text)
    (err,) = result.errors
    assert err.loc.line == 15, str(err)
    assert "backref" in str(err) or "re2" in str(err).lower()


def test_a_gateway_config_among_the_packs_is_named_as_such(tmp_path):
    # `lictor check examples/http` reads the directory's lictor.yaml too: "unsupported format None" did not
    # say that it is the gateway's config, nor how to check it.
    path, result = problems(tmp_path, "version: 1\nrulepacks: [rulepacks]\ntargets: {}\n")
    (err,) = result.errors
    assert "this is a gateway config, not a rule pack" in err.message and f"lictor check -c {path}" in err.message


def test_tests_in_a_pack_file_are_named_as_such(tmp_path):
    # "unsupported format 'lictor-tests/v1': expected 'lictor/v1' (or 'lictor-tests/v1' for tests)" offered the
    # format the file already had, and did not say that a file holds packs or tests
    path, result = problems(tmp_path, GOOD + "---\nformat: lictor-tests/v1\ncases: []\n")
    (err,) = result.errors
    assert str(err) == (
        f"{path}:{GOOD.count(chr(10)) + 1}:9: policy tests (lictor-tests/v1) in a file that holds a rule pack: a file "
        "holds packs or tests, not both; move the tests to a file of their own (such as NAME.tests.yaml)"
    )


def test_unknown_detector_reference(tmp_path):
    text = GOOD.replace("        action: allow", "        action: allow\n        mask: {detectors: [cardz]}")
    path, result = problems(tmp_path, text)
    (err,) = result.errors
    assert err.loc.line == 13 and "cardz" in err.message


def test_wrong_format_version_and_types(tmp_path):
    _, result = problems(tmp_path, GOOD.replace("lictor/v1", "lictor/v2"))
    assert "unsupported format 'lictor/v2'" in result.errors[0].message
    _, result = problems(tmp_path, GOOD.replace("action: allow", "action: permit"))
    assert result.errors[0].loc.line == 12 and "permit" in result.errors[0].message


def test_duplicate_ids_across_files(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(
        tmp_path,
        GOOD.replace("name: good", "name: other").replace("  ro:", "  ro2:").replace("[ro]", "[ro2]"),
        "b.yaml",
    )
    result = load_policy([tmp_path], vocabularies())
    msgs = [str(p) for p in result.errors]
    assert any("b.yaml:9:13: duplicate rule id 'ro-select' (also at" in m for m in msgs), msgs


def test_unknown_target_reference(tmp_path):
    text = GOOD.replace("        protocol: postgres", "        protocol: postgres\n        targets: [prod]")
    path, result = problems(tmp_path, text, targets={"main": "postgres"})
    (err,) = result.errors
    assert err.loc.line == 11 and "unknown target 'prod'" in err.message


def test_a_target_pattern_that_names_no_target_is_a_warning(tmp_path):
    # target names are matched case-sensitively: `PROD-*` never scopes a rule to `prod-db`, and a deny
    # written that way would stop nothing
    text = GOOD.replace("        protocol: postgres", '        protocol: postgres\n        targets: ["PROD-*"]')
    path, result = problems(tmp_path, text, targets={"prod-db": "postgres"})
    assert not result.errors
    (warning,) = result.warnings
    assert warning.loc.line == 11 and "'PROD-*' matches no target" in warning.message
    assert "case-sensitive: prod-db" in warning.message
    _, result = problems(tmp_path, text.replace("PROD-*", "prod-*"), targets={"prod-db": "postgres"})
    assert not result.problems


def test_yaml_syntax_error_has_position(tmp_path):
    path, result = problems(tmp_path, "format: lictor/v1\nmetadata: {name: x\n")
    (err,) = result.errors
    assert err.loc.file == str(path) and err.loc.line >= 2


def test_a_tab_in_the_indentation_is_named(tmp_path):
    path, result = problems(tmp_path, GOOD.replace("        action: allow", "\taction: allow"))
    (err,) = result.errors
    assert (err.loc.line, err.loc.col) == (12, 1)
    assert err.message.startswith("a tab character: YAML indents with spaces only"), err.message


@pytest.mark.parametrize(
    ("before", "after", "at"),
    [
        ("        protocol: postgres", "\u00a0       protocol: postgres", (10, 1)),  # pasted from a web page
        ("action: allow", "action:\u00a0allow", (12, 16)),
        ("      - id: ro-select", "\u200b      - id: ro-select", (9, 1)),
        ("  - match", "\ufeff  - match", (4, 1)),  # files joined with cat, the second one saved with a BOM
    ],
)
def test_a_space_look_alike_where_yaml_wants_a_space_is_named(tmp_path, before: str, after: str, at: tuple) -> None:
    # The parser stopped a line or so later, where everything looks right ("mapping values are not allowed in this
    # context" at the colon of the next key): the character to replace was not named, nor where it is.
    assert before in GOOD
    path, result = problems(tmp_path, GOOD.replace(before, after, 1))
    (err,) = result.errors
    assert (err.loc.line, err.loc.col) == at, str(err)
    ch = after.strip(" -abcdefilnorstw:")[0]
    assert err.message.startswith(f"U+{ord(ch):04X} "), err.message
    assert "is not one to YAML: replace it with a space, or delete it (the parser stopped at line" in err.message
    # a no-break space inside quoted text is no suspect for an error elsewhere
    _, result = problems(
        tmp_path, GOOD.replace("owner: security}", 'owner: "sec\u00a0ops"}').replace("}\nidentities", "\nidentities", 1)
    )
    assert result.errors and not result.errors[0].message.startswith("U+"), result.errors


def test_shadowed_rule_is_a_warning(tmp_path):
    text = GOOD.replace(
        "      - id: ro-select",
        "      - id: deny-all\n        protocol: postgres\n        action: deny\n      - id: ro-select",
    )
    _, result = problems(tmp_path, text)
    assert result.policy is not None
    (w,) = result.warnings
    assert w.loc.line == 12 and "ro-select" in w.message and "can never match" in w.message


def test_a_yaml_boolean_or_number_where_text_is_expected_says_to_quote_it(tmp_path):
    path, result = problems(tmp_path, GOOD.replace("{role: readonly}", "{role: readonly, mfa: yes, tenant: 42}"))
    assert [str(p) for p in result.errors] == [
        f"{path}:4:43: identities.0.match.claims.mfa: YAML reads this value as the boolean true, not as text: "
        "put it in quotes",
        f"{path}:4:56: identities.0.match.claims.tenant: YAML reads this value as the number 42, not as text: "
        "put it in quotes",
    ]


def test_a_deny_written_after_a_rule_shadows_it_too(tmp_path):
    # A deny wins whatever the rule order, so the allow above it can never match either.
    text = GOOD + "      - id: deny-all\n        protocol: postgres\n        action: deny\n"
    _, result = problems(tmp_path, text)
    (w,) = result.warnings
    assert w.loc.line == 9 and "'ro-select' can never match: rule 'deny-all'" in w.message


def test_the_examples_in_the_rule_pack_guide_check_and_pass_their_tests(tmp_path):
    # docs/rulepacks.md opens with a pack and shows a tests file for it: copied as they stand, both must work.
    import re

    from lictor.policytest import run_tests

    pack, tests = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "rulepacks.md").read_text(), re.S)[:2]
    write(tmp_path, pack, "payments.yaml")
    write(tmp_path, tests, "payments.tests.yaml")
    result = load_policy([tmp_path], vocabularies())
    assert result.policy is not None, [str(p) for p in result.errors]
    report = run_tests(result.policy, result.test_files)
    assert report.cases and all(c.passed for c in report.cases), [c.message for c in report.cases]


def test_an_empty_masked_or_shadow_expectation_means_none_apply(tmp_path):
    # `masked: []` (the role sees values in clear) passed whatever masked them: the expected ids were
    # checked as a subset of the mask rules, and the empty set is a subset of every set.
    from lictor.policytest import run_tests

    pack = """
format: lictor/v1
metadata: {name: clear}
identities: [{match: {claims: {role: auditor}}, roles: [auditor]}]
roles:
  auditor:
    rules:
      - {id: read, protocol: postgres, when: {statements: select}, action: allow}
      - {id: mask-cards, protocol: postgres, action: mask, mask: {detectors: [card]}}
      - {id: try-no-where, protocol: postgres, when: {statements: select}, action: deny, enforce: false}
"""
    tests = """
format: lictor-tests/v1
cases:
  - name: auditors see cards in clear
    identity: {sub: a, claims: {role: auditor}}
    request: {protocol: postgres, sql: "SELECT card FROM customers"}
    expect: {action: allow, masked: []}
  - name: no shadow rule would deny
    identity: {sub: a, claims: {role: auditor}}
    request: {protocol: postgres, sql: "SELECT card FROM customers"}
    expect: {action: allow, shadow: []}
  - name: the masks are named
    identity: {sub: a, claims: {role: auditor}}
    request: {protocol: postgres, sql: "SELECT card FROM customers"}
    expect: {action: allow, masked: [mask-cards], shadow: [try-no-where]}
"""
    write(tmp_path, pack, "clear.yaml")
    write(tmp_path, tests, "clear.tests.yaml")
    result = load_policy([tmp_path], vocabularies())
    assert result.policy is not None, [str(p) for p in result.errors]
    report = run_tests(result.policy, result.test_files)
    assert [c.passed for c in report.cases] == [False, False, True], [c.message for c in report.cases]
    assert "expected no mask rules, got mask-cards" in report.cases[0].message
    assert "expected no shadow rules, got try-no-where" in report.cases[1].message


def test_shipped_schema_is_up_to_date():
    shipped = (ROOT / "schema" / "rulepack.schema.json").read_text()
    assert json.loads(shipped) == json.loads(schema_json(vocabularies())), (
        "run: lictor schema --out schema/rulepack.schema.json"
    )


def test_custom_detector_keeps_its_own_style(tmp_path):

    text = GOOD.replace("        action: allow", "        action: allow\n        mask: {detectors: [employee]}") + (
        "detectors:\n  employee: {pattern: 'EMP-[0-9]{6}', style: partial, keep: 2}\n"
    )
    _, result = problems(tmp_path, text)
    assert not result.errors, result.errors
    plan = MaskPlan.compile([{"detectors": ["employee"]}], custom_detectors=result.policy.detectors, key=b"k" * 32)
    masked, counts = plan.mask_text("id EMP-123456 ok")
    assert counts["employee"] == 1 and masked.endswith("56 ok") and "EMP-1234" not in masked


def test_an_empty_pack_file_is_an_error_not_a_pack_without_rules(tmp_path):
    path, result = problems(tmp_path, "# nothing here yet\n")
    assert result.policy is None
    assert [str(p) for p in result.errors] == [
        f"{path}:1:1: empty file: a rule pack file must hold a pack (delete the file to remove one)"
    ]


def test_nested_aliases_cannot_expand_a_small_file_into_billions_of_values(tmp_path):
    lines = ["format: lictor/v1", "metadata: {name: bomb, owner: x}", "x0: &a0 [t, t, t, t, t, t, t, t, t, t]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["roles: {r: {rules: [{id: a, protocol: postgres, when: {tables: *a8}, action: deny}]}}"]
    path, result = problems(tmp_path, "\n".join(lines))
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:") and "expands to more than 200000 values" in str(error)


def test_a_large_pack_written_out_in_full_is_not_mistaken_for_an_alias_bomb():
    # A generated pack of thousands of rules has more values than aliases may add, and none of them
    # repeated: only what aliases add is bounded (the file's size bounds the rest).
    from lictor._yaml import MAX_VALUES, load_documents

    items = ", ".join(f"t{i}" for i in range(MAX_VALUES + 10))
    [doc] = load_documents(f"tables: [{items}]\n", "big.yaml")
    assert len(doc["tables"]) == MAX_VALUES + 10


def test_anchors_and_merge_keys_within_bounds_still_work(tmp_path):
    text = GOOD.replace("        when: {statements: [select]}", "        when: &w {statements: [select]}")
    text += "      - {id: ro-select-2, protocol: postgres, when: *w, action: allow}\n"
    _, result = problems(tmp_path, text)
    assert result.policy is not None, result.errors


def test_check_strict_fails_on_warnings_without_saying_ok(tmp_path):
    from tests.conftest import lictor

    write(
        tmp_path,
        GOOD.replace(
            "      - id: ro-select",
            "      - id: deny-all\n        protocol: postgres\n        action: deny\n      - id: ro-select",
        ),
    )
    relaxed = lictor("check", str(tmp_path), check=False)
    assert relaxed.returncode == 0 and relaxed.stdout.splitlines()[-1].startswith("OK: ")
    strict = lictor("check", "--strict", str(tmp_path), check=False)
    assert strict.returncode == 1 and "OK" not in strict.stdout
    assert strict.stdout.splitlines()[-1] == "0 error(s), 1 warning(s) in 1 pack file(s); --strict fails on warnings"


def test_a_glob_with_an_unclosed_bracket_is_an_error(tmp_path):
    # fnmatch reads "[abc" as a literal: a deny rule written that way would never match what was meant
    path, result = problems(
        tmp_path, GOOD.replace("{statements: [select]}", '{statements: [select], tables: ["t[ab"]}')
    )
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:11:") and "'[' at position 2 is never closed" in str(error)
    _, ok = problems(
        tmp_path, GOOD.replace("{statements: [select]}", '{statements: [select], tables: ["t[ab]", "[[]x"]}')
    )
    assert ok.policy is not None, ok.errors


def test_a_glob_range_whose_ends_are_reversed_is_an_error(tmp_path):
    # fnmatch drops the range: "cust[o-a]mers" matched no table, so a deny written that way denied nothing, and a
    # mapping or a target scope with such a range matched nobody
    text = GOOD.replace("{claims: {role: readonly}}", '{sub: "agent-[9-0]*"}').replace(
        "        protocol: postgres", '        protocol: postgres\n        targets: ["prod-[b-a]"]'
    )
    text = text.replace("{statements: [select]}", '{statements: [select], tables: ["cust[o-a]mers"]}')
    path, result = problems(tmp_path, text)
    assert result.policy is None
    why = "matches no character (its first character comes after its last)"
    assert [str(e) for e in result.errors] == [
        f"{path}:4:18: match.sub: 'agent-[9-0]*': the range '9-0' {why}; write '0-9'",
        f"{path}:11:19: targets: 'prod-[b-a]': the range 'b-a' {why}; write 'a-b'",
        f"{path}:12:46: roles.ro.rules.0.when.tables: 'cust[o-a]mers': the range 'o-a' {why}; write 'a-o'",
    ]
    _, ok = problems(
        tmp_path,
        GOOD.replace("{statements: [select]}", '{statements: [select], tables: ["t[a-c-e]", "[]-a]", "[-a]"]}'),
    )
    assert ok.policy is not None, ok.errors


def test_unclosed_brackets_in_targets_and_identity_matches_are_errors(tmp_path):
    # fnmatch read them as literals: a deny scoped to `targets: ["prod-[ab"]` denied nothing, and a mapping
    # with `sub: "contractor-[0-9"` never gave contractors their restricted role
    text = GOOD.replace("{claims: {role: readonly}}", '{sub: "agent-[0-9", claims: {team: "[ops"}}').replace(
        "        protocol: postgres", '        protocol: postgres\n        targets: ["prod-[ab"]'
    )
    path, result = problems(tmp_path, text)
    assert result.policy is None
    assert [str(e) for e in result.errors] == [
        f"{path}:4:18: match.sub: 'agent-[0-9': the '[' at position 7 is never closed; write [[] for a literal '['",
        f"{path}:4:47: match.claims.team: '[ops': the '[' at position 1 is never closed; write [[] for a literal '['",
        f"{path}:11:19: targets: 'prod-[ab': the '[' at position 6 is never closed; write [[] for a literal '['",
    ]


def test_empty_lists_and_empty_claims_are_refused(tmp_path):
    # `claims: {}` held for every identity (the mapping's roles for everyone); `targets: []` meant every target
    text = GOOD.replace("{claims: {role: readonly}}", "{claims: {}}").replace(
        "        protocol: postgres", "        protocol: postgres\n        targets: []"
    )
    path, result = problems(tmp_path, text)
    assert result.policy is None
    assert sorted(str(p) for p in result.errors) == [
        f"{path}:11:18: roles.ro.rules.0.targets: [] should be non-empty",
        f"{path}:4:21: identities.0.match.claims: {{}} should be non-empty",
    ]
    _, result = problems(tmp_path, GOOD.replace("{claims: {role: readonly}}", "{sub: []}"))
    assert "identities.0.match.sub: [] should be non-empty" in str(result.errors[0])


def test_a_dangling_symlinked_pack_is_an_error_not_a_missing_pack(tmp_path):
    # e.g. a pack linked from a release directory that is being replaced: skipping it would drop its rules
    packs = tmp_path / "packs"
    packs.mkdir()
    write(packs, GOOD)
    (packs / "guardrails.yaml").symlink_to(tmp_path / "gone" / "guardrails.yaml")
    result = load_policy([packs], vocabularies())
    assert result.policy is None
    assert [e.loc.file for e in result.errors] == [str(packs / "guardrails.yaml")]
    assert "cannot read" in result.errors[0].message


def test_a_directory_linked_into_a_pack_directory_is_an_error_not_skipped(tmp_path):
    # `packs/baseline -> /usr/share/.../baseline`: the walk does not follow the link, so its deny rules were
    # left out of the policy while `lictor check` said OK
    import subprocess
    import sys

    packs, shared = tmp_path / "packs", tmp_path / "shared"
    packs.mkdir()
    shared.mkdir()
    write(packs, GOOD)
    write(shared, GOOD.replace("name: good", "name: guard").replace("ro-select", "ro-no-secrets"), "guard.yaml")
    (packs / "baseline").symlink_to(shared)
    result = load_policy([packs], vocabularies())
    assert result.policy is None
    assert [e.loc.file for e in result.errors] == [str(packs / "baseline")], result.errors
    assert "list that directory in rulepacks" in result.errors[0].message
    lictor = str(Path(sys.executable).parent / "lictor")
    check = subprocess.run([lictor, "check", str(packs)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and f"{packs / 'baseline'}:1:1: a link to the directory" in check.stdout, check
    # listed itself, or linked within a listed directory (a ConfigMap's `..data`), it is read once, no error
    both = load_policy([packs, shared], vocabularies())
    assert both.errors and not any("a link to the directory" in e.message for e in both.errors)  # only duplicates
    (packs / "baseline").unlink()
    (packs / "..data").symlink_to(".")
    assert load_policy([packs], vocabularies()).policy is not None


def test_an_editor_lock_file_is_not_a_pack(tmp_path):
    # Emacs links `.#pack.yaml` to "user@host.pid" while a buffer is modified: a running gateway rejected
    # every reload (and `lictor check` failed) until the edit was saved
    packs = tmp_path / "packs"
    packs.mkdir()
    write(packs, GOOD)
    (packs / ".#pack.yaml").symlink_to("root@host.1234:1700000000")
    result = load_policy([packs], vocabularies())
    assert result.policy is not None, result.errors
    assert result.files == [packs / "pack.yaml"]


def test_numeric_bounds_that_can_never_match_are_errors(tmp_path):
    # `limit: {max: -3}` or `{min: 10, max: 5}` matched nothing: a deny rule written so denied nothing
    path, result = problems(
        tmp_path, GOOD.replace("{statements: [select]}", "{statements: [select], limit: {max: -3}}")
    )
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:11:") and "-3 is less than the minimum of 0" in str(error)
    path, result = problems(
        tmp_path, GOOD.replace("{statements: [select]}", "{statements: [select], limit: {min: 10, max: 5}}")
    )
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:11:") and "min 10 is greater than max 5" in str(error)
    # YAML reads .nan and .inf as numbers: no limit compares with NaN, so a deny with `{min: .nan}` denied nothing
    for bound, shown in (
        ("min: .nan", "min must be a finite number, not nan"),
        ("max: .NaN", "max must be a finite number, not nan"),
        ("min: .inf", "min must be a finite number, not inf"),
    ):
        path, result = problems(
            tmp_path, GOOD.replace("{statements: [select]}", f"{{statements: [select], limit: {{{bound}}}}}")
        )
        [error] = result.errors
        assert str(error).startswith(f"{path}:11:") and str(error).endswith(f"limit: {shown}"), str(error)
    _, ok = problems(
        tmp_path, GOOD.replace("{statements: [select]}", "{statements: [select], limit: {min: 0, max: 5}}")
    )
    assert ok.policy is not None, ok.errors


def test_shipped_masking_pack_masks_secrets_by_their_name():
    policy = load_policy([ROOT / "rulepacks"], vocabularies()).policy
    assert policy is not None
    reader = testing.identity("agent-1", access="read")
    http = {"method": "GET", "host": "api", "path": "/v1/apps/1"}
    configmap = {"verb": "get", "resource": "configmaps", "api_group": "core", "namespace": "apps", "name": "app"}
    body = {
        "client": {"access_token": "opaque-0f3a9c", "client_secret": "s3cr3t-value"},
        "data": {"DB_PASSWORD": "hunter2"},
    }
    for protocol, attrs in (("http", http), ("kubernetes", configmap)):
        decision = policy.decide(reader, Request(protocol=protocol, action="get", attrs=attrs, target="t"))
        assert decision.action == "allow"
        masked, _ = MaskPlan.compile(list(decision.masks), key=b"k" * 32).mask_json(body)
        assert "opaque-0f3a9c" not in json.dumps(masked), protocol
        assert "s3cr3t-value" not in json.dumps(masked) and "hunter2" not in json.dumps(masked), protocol
    (select,) = build_requests(policy, {"protocol": "postgres", "sql": "SELECT subconninfo FROM pg_subscription"})
    decision = policy.decide(reader, select)
    assert decision.action == "allow"
    text, _ = MaskPlan.compile(list(decision.masks), key=b"k" * 32).mask_text("host=db user=repl password=s3cr3t")
    assert "s3cr3t" not in text


def test_values_of_the_wrong_shape_are_problems_not_crashes(tmp_path):
    # Each of these stopped `lictor check` with a traceback, and a live reload with no `policy.rejected`.
    approve = GOOD.replace("action: allow", "action: approve\n        approval: {approvers: [ro], timeout: 15m}")
    cases = [
        (GOOD.replace("{role: readonly}", "{role: readonly, email_verified: true}"), 4, "email_verified"),
        (GOOD.replace("{claims: {role: readonly}}", "{claims: true}"), 4, "claims"),
        (GOOD.replace("identities:\n  - match: {claims: {role: readonly}}\n    roles: [ro]", "identities: 5"), 3, ""),
        (GOOD.replace("    rules:\n", "    rules: true\n").split("      - id:")[0], 8, "rules"),
        (GOOD.replace("when: {statements: [select]}", "when: select"), 11, "when"),
        (approve.replace("{approvers: [ro], timeout: 15m}", "true"), 13, "approval"),
        (approve.replace("timeout: 15m", "timeout: null"), 13, "timeout"),
    ]
    for text, line, word in cases:
        path, result = problems(tmp_path, text)
        assert result.policy is None, text
        assert [p.loc.line for p in result.errors] == [line], (text, [str(p) for p in result.errors])
        assert word in result.errors[0].message


def test_a_program_named_with_its_directory_is_an_error(tmp_path):
    # Programs are matched by basename (`/usr/bin/rm -rf` runs `rm`): a deny on /usr/bin/rm protected nothing.
    rules = (
        "      - {id: no-rm, protocol: ssh, when: {programs: [/usr/bin/rm]}, action: deny}\n"
        "      - {id: no-psql, protocol: kubernetes, when: {verbs: [exec], programs: /usr/bin/psql}, action: deny}\n"
    )
    path, result = problems(tmp_path, GOOD + rules)
    assert [str(p) for p in result.errors] == [
        f"{path}:13:53: roles.ro.rules.1.when.programs: '/usr/bin/rm' can never match: programs are named "
        "without their directory (write 'rm')",
        f"{path}:14:77: roles.ro.rules.2.when.programs: '/usr/bin/psql' can never match: programs are named "
        "without their directory (write 'psql')",
    ]


def test_an_approval_block_on_an_allow_rule_is_an_error(tmp_path):
    # The author expected a human to approve; the rule allowed at once, and lictor check passed.
    text = GOOD.replace("        action: allow", "        action: allow\n        approval: {approvers: [ro]}")
    path, result = problems(tmp_path, text)
    assert result.policy is None
    assert [str(p) for p in result.errors] == [
        f"{path}:13:19: rule 'ro-select': an allow rule with an approval block allows without approval; "
        "write action: approve to hold for a human, or remove the approval block"
    ]
    _, result = problems(tmp_path, text.replace("action: allow", "action: deny"))
    assert result.policy is not None and "is ignored (remove it)" in result.warnings[0].message


def test_an_allow_rule_that_is_not_enforced_is_a_warning(tmp_path):
    # Shadow results exist for deny and approve only: such an allow neither allows nor reports anything.
    path, result = problems(
        tmp_path, GOOD.replace("        action: allow", "        action: allow\n        enforce: false")
    )
    assert [str(p) for p in result.warnings] == [
        f"{path}:13:18: warning: rule 'ro-select': enforce: false makes this allow rule do nothing, and nothing is "
        "reported (shadow results are for deny and approve rules); remove the rule or enforce it"
    ]


def test_a_mask_selector_the_protocol_never_applies_is_an_error(tmp_path):
    # An HTTP response has no columns and SSH output no JSON paths: such a mask block masked nothing.
    rules = (
        "      - {id: h, protocol: http, action: mask, mask: {columns: ['*password*']}}\n"
        "      - {id: s, protocol: ssh, action: mask, mask: {detectors: [card], json_paths: [$.card]}}\n"
    )
    path, result = problems(tmp_path, GOOD + rules)
    assert [str(p) for p in result.errors] == [
        f"{path}:13:63: rule 'h': mask.columns masks nothing in http responses (they are masked by detectors, "
        "json_paths)",
        f"{path}:14:84: rule 's': mask.json_paths masks nothing in ssh responses (they are masked by detectors)",
    ]


def test_a_relative_sftp_path_is_an_error(tmp_path):
    # sftp/scp paths are absolute and normalised: a deny on etc/shadow protected nothing.
    path, result = problems(
        tmp_path, GOOD + "      - {id: s, protocol: ssh, when: {paths: [etc/shadow]}, action: deny}\n"
    )
    assert [str(p) for p in result.errors] == [
        f"{path}:13:46: roles.ro.rules.1.when.paths: 'etc/shadow' can never match: paths are absolute "
        "(write '/etc/shadow')"
    ]


def test_duplicate_identity_mapping_ids_are_errors(tmp_path):
    # Two mappings with one id read as one in `lictor explain`: which one gave the roles was ambiguous.
    text = GOOD.replace(
        "  - match: {claims: {role: readonly}}\n    roles: [ro]\n",
        "  - id: ro\n    match: {claims: {role: readonly}}\n    roles: [ro]\n"
        "  - id: ro\n    match: {sub: 'agent-*'}\n    roles: [ro]\n",
    )
    path, result = problems(tmp_path, text)
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:7:") and "duplicate identity mapping id 'ro' (also at" in str(error), error


def test_a_mask_column_glob_with_an_unclosed_bracket_is_an_error(tmp_path):
    # fnmatch reads "card_[0-9" as a literal: the card columns meant would be returned unmasked
    text = GOOD + (
        "      - id: ro-mask\n"
        "        protocol: postgres\n"
        "        action: mask\n"
        '        mask: {columns: ["card_[0-9"]}\n'
    )
    path, result = problems(tmp_path, text)
    assert result.policy is None
    [error] = result.errors
    assert str(error).startswith(f"{path}:16:15: ") and "'[' at position 6 is never closed" in str(error)
    _, ok = problems(tmp_path, text.replace("card_[0-9", "card_[0-9]*"))
    assert ok.policy is not None, ok.errors


def test_look_alike_and_invisible_characters_are_warned_about(tmp_path):
    # A Cyrillic "s" (U+0455) in `unless: {tables: [secrets]}` made an exception that never applies (the allow
    # covered the secrets table), and `lictor check` said OK
    text = GOOD.replace(
        "{statements: [select]}", '{statements: [select]}\n        unless: {tables: ["\u0455ecrets", "se\u200bcrets"]}'
    ).replace("metadata: {name: good, owner: security}", "metadata: {name: good, description: Доступ for агенты}")
    path, result = problems(tmp_path, text)
    assert result.policy is not None
    assert [str(w) for w in result.warnings] == [
        f"{path}:12:27: warning: '\u0455ecrets' holds '\u0455' (CYRILLIC SMALL LETTER DZE, U+0455) at position 1 among "
        "Latin letters: a look-alike matches only text spelt with the same character; type it again",
        f"{path}:12:38: warning: 'se\\u200bcrets' holds an invisible character U+200B at position 3; delete it",
    ]
    _, result = problems(tmp_path, GOOD.replace("roles: [ro]", "roles: [r\u043e]"))
    assert [p.severity for p in result.problems] == ["warning", "error"]
    assert "CYRILLIC SMALL LETTER O" in result.problems[0].message and "unknown role" in result.problems[1].message


def test_a_space_look_alike_in_a_value_is_warned_about(tmp_path):
    # `tables: [customers, orders]` pasted from a web page holds a no-break space: the item "\xa0orders" is no
    # table's name, and a deny written so let SELECTs on orders through with `lictor check` saying OK
    text = GOOD.replace("{statements: [select]}", "{statements: [select]}\n        unless: {tables: [a,\u00a0orders]}")
    text += 'detectors:\n  spaced_id: {pattern: "ID\u00a0[0-9]{6}"}\n'  # a detector may look for one on purpose
    path, result = problems(tmp_path, text)
    assert [str(w) for w in result.warnings] == [
        f"{path}:12:29: warning: '\\xa0orders' holds U+00A0 NO-BREAK SPACE at position 1, which shows as a space but "
        "is not one (the value matches only text spelt with it); delete it or type a space"
    ]


@pytest.mark.parametrize("key", ["when", "unless"])
def test_a_condition_block_that_is_not_a_mapping_is_an_error_not_a_crash(tmp_path, key: str) -> None:
    # `when: select` (a deny elsewhere in the role) stopped `lictor check` with a TypeError, and a live reload
    # reported no position: compiled as no condition, the block reached the shadowing check as a string
    text = GOOD.replace(
        "        action: allow",
        f"        action: allow\n      - {{id: d, protocol: postgres, {key}: select, action: deny}}",
    )
    path, result = problems(tmp_path, text)
    assert [str(e) for e in result.errors] == [
        f"{path}:13:{43 if key == 'when' else 45}: roles.ro.rules.1.{key}: 'select' is not of type 'object'"
    ]


def test_rule_ids_of_the_gateways_own_decisions_are_reserved(tmp_path):
    # An allow rule named lictor:default-deny went live: the audit log read "allow ... lictor:default-deny", and a
    # policy test expecting the default deny could be met by a pack's rule
    path, result = problems(tmp_path, GOOD.replace("id: ro-select", 'id: "Lictor:default-deny"'))
    assert [str(e) for e in result.errors] == [
        f"{path}:9:13: rule id 'Lictor:default-deny': ids starting with 'lictor:' are reserved for the gateway's own "
        "decisions; name the rule otherwise"
    ]


def test_a_key_without_a_value_is_named_as_such(tmp_path):
    # `when:` with its conditions commented out read "None is not of type 'object'": Python's word for YAML's null
    text = GOOD.replace("        when: {statements: [select]}", "        when:\n        #  statements: [select]")
    path, result = problems(tmp_path, text.replace("roles: [ro]", "roles:"))
    assert [str(e) for e in result.errors] == [
        f"{path}:{line}: {where}: no value (a key with nothing after it, or only a comment, is null to YAML); "
        "write its value"
        for line, where in (("5:11", "identities.0.roles"), ("11:14", "roles.ro.rules.0.when"))
    ]


def test_an_empty_condition_block_is_an_error(tmp_path):
    # `when: {}` (a template that rendered no condition) read as no condition: an allow rule so written allowed
    # every request of its protocol, as `targets: []` would have allowed every target
    text = GOOD.replace("        when: {statements: [select]}", "        when: {}\n        unless: {}")
    path, result = problems(tmp_path, text)
    assert [str(e) for e in result.errors] == [
        f"{path}:11:15: roles.ro.rules.0.when: empty; it would read as no condition (on an allow rule: every request "
        "of the protocol): write its conditions, or leave when out for a rule that applies to every request",
        f"{path}:12:17: roles.ro.rules.0.unless: empty; write the exemption's conditions, or leave unless out",
    ]


APPROVE = """
format: lictor/v1
metadata: {name: approve}
identities:
  - match: {claims: {role: writer}}
    roles: [writer]
roles:
  writer:
    rules:
      - id: ddl-approval
        protocol: postgres
        when: {statements: [drop]}
        action: approve
        approval: {approvers: [dba]}
  dba: {}
"""


def test_an_approve_rule_nobody_can_approve_is_warned_about(tmp_path):
    # `dba` is defined but no identity holds it: every DROP waited for its timeout and was denied
    path, result = problems(tmp_path, APPROVE)
    assert result.policy is not None
    [warning] = result.warnings
    assert str(warning).startswith(f"{path}:13:31: warning: rule 'ddl-approval': no identity mapping grants dba ")
    granted = APPROVE + "  lead:\n    inherits: [dba]\n"
    granted = granted.replace("roles: [writer]", "roles: [writer]\n  - match: {sub: lead-*}\n    roles: [lead]")
    _, result = problems(tmp_path, granted)
    assert not result.problems, result.problems


def test_shadowed_rules_are_found_without_comparing_every_pair(tmp_path):
    # A generated role of thousands of rules took minutes to check (and to reload, holding the interpreter)
    import time

    from lictor.policy import CompiledRule
    from lictor.rulepacks import _Compiler

    compiler = _Compiler(vocabularies(), None, b"k" * 32)
    rules = [
        CompiledRule(
            id=f"r{i}",
            pack="big",
            role="r",
            protocol="postgres",
            action="deny" if i % 2 else "allow",
            enforce=True,
            message="",
            order=i,
            when_raw={"statements": ["select"], "tables": [f"t{i}"]},
            index_values=frozenset({"select"}),
            secondary_values=frozenset({f"t{i}"}),
        )
        for i in range(4000)
    ]
    rules.append(
        CompiledRule("last", "big", "r", "postgres", "allow", True, "", 4000, when_raw={"tables": ["t7"]}, source="s")
    )
    rules.append(
        CompiledRule(
            "sel",
            "big",
            "r",
            "postgres",
            "allow",
            True,
            "",
            4001,
            when_raw={"statements": ["select"], "tables": ["t7"]},
        )
    )
    started = time.monotonic()
    compiler._shadowed(rules, None)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    assert [w.message.split(":")[0] for w in compiler.problems] == ["rule 'sel' can never match"]
    assert "rule 'r7'" in compiler.problems[0].message


def test_list_items_yaml_reads_as_booleans_numbers_or_dates_say_so(tmp_path):
    # `settings: [on]` was reported as "True is not of type 'string'": the author wrote no True
    text = GOOD.replace("{statements: [select]}", "{statements: [select], settings: [on], tables: [orders, 0x1f]}")
    path, result = problems(tmp_path, text)
    assert [str(e) for e in result.errors] == [
        f"{path}:11:49: settings.0: YAML reads this value as the boolean true, not as text: put it in quotes",
        f"{path}:11:71: tables.1: YAML reads this value as the number 31, not as text: put it in quotes",
    ]
    _, result = problems(
        tmp_path, GOOD.replace("{statements: [select]}", "{statements: [select], tables: [2024-01-01]}")
    )
    assert "tables.0: YAML reads this value as the date 2024-01-01, not as text: put it in quotes" in str(result.errors)


def test_a_rule_shadowed_by_a_deny_of_an_inherited_role_is_warned_about(tmp_path):
    # every holder of `child` holds `base`: its deny of DELETE wins over child's allow, whatever the tables
    text = """
format: lictor/v1
metadata: {name: inh}
identities:
  - match: {sub: a}
    roles: [child]
roles:
  base:
    rules:
      - {id: no-delete, protocol: postgres, when: {statements: [delete]}, action: deny}
  child:
    inherits: [base]
    rules:
      - {id: delete-scratch, protocol: postgres, when: {statements: [delete], tables: [scratch]}, action: allow}
      - {id: read, protocol: postgres, when: {statements: [select]}, action: allow}
"""
    path, result = problems(tmp_path, text)
    assert [str(w) for w in result.warnings] == [
        f"{path}:13:9: warning: rule 'delete-scratch' can never match: rule 'no-delete' ({path}:9:9) of role 'base', "
        "which 'child' inherits, denies everything it covers (a deny wins whatever the rule order)"
    ]


def test_a_duplicate_key_names_both_places(tmp_path):
    # YAML would keep the last `action:`; the author must see which two lines disagree
    path, result = problems(tmp_path, GOOD.replace("action: allow", "action: deny\n        action: allow"))
    assert [str(e) for e in result.errors] == [
        f"{path}:13:9: duplicate key 'action' (also at line 12, column 9): a mapping holds each key once; "
        "keep one of them"
    ]


def test_a_merge_key_gives_defaults_the_mapping_overrides(tmp_path):
    # `<<: *base` then `id: r2` is how YAML reuses a rule; it was refused as a duplicate `id`
    text = GOOD.replace(
        "      - id: ro-select\n",
        "      - &base\n        id: ro-select\n",
    ) + ("      - <<: *base\n        id: ro-show\n        when: {statements: [show]}\n")
    _, result = problems(tmp_path, text)
    assert result.policy is not None, result.errors
    rules = {r.id: r for r in result.policy.rules}
    assert rules["ro-show"].when_raw == {"statements": ["show"]} and rules["ro-show"].action == "allow"
    assert rules["ro-select"].when_raw == {"statements": ["select"]}


def test_a_pack_that_is_not_utf8_names_the_line_and_column(tmp_path):
    # an editor saving Windows-1252 left "1:1: cannot read: 'utf-8' codec can't decode byte 0xe9 in position 230"
    path = tmp_path / "pack.yaml"
    path.write_bytes(
        GOOD.lstrip("\n").replace("owner: security", "owner: s\u00e9curit\u00e9").encode("utf-8") + b"# caf\xe9\n"
    )
    result = load_policy([path], vocabularies())
    assert [str(e) for e in result.errors] == [
        f"{path}:13:6: not UTF-8: byte 0xe9 cannot start or continue a character; save the file as UTF-8"
    ]


def test_a_test_request_is_checked_against_the_schema_its_protocol_declares():
    # Only the keys of `test_request_schema` were read: `size: "200000"` (quoted) reached the builder as a
    # string, a Number field never matches one, and a case expecting the size limit to deny passed.
    from lictor import Glob, Number, Vocabulary

    def build(case, target):
        verb = str(case["command"]).split()[0].lower()
        attrs = {"verb": verb, "size": case.get("size", 0)}
        return [Request(protocol="mail", action=verb, attrs=attrs, target=target, summary=str(case["command"]))]

    vocabulary = Vocabulary(
        "mail",
        (Glob("verbs", attr="verb"), Number("size", attr="size")),
        index="verbs",
        build_requests=build,
        test_request_schema={
            "type": "object",
            "properties": {"command": {"type": "string"}, "size": {"type": "integer", "minimum": 0}},
        },
    )

    class Mail:
        name = "mail"

        def load(self, loader):
            loader.add_vocabulary(vocabulary)

    pack = (
        "format: lictor/v1\nmetadata: {name: mail}\nidentities: [{match: {claims: {role: r}}, roles: [r]}]\n"
        "roles: {r: {rules: [{id: small, protocol: mail, when: {verbs: data, size: {max: 100}}, action: allow}]}}\n"
    )
    policy = testing.policy(pack, Mail())
    (request,) = build_requests(policy, {"protocol": "mail", "command": "DATA", "size": 10})
    assert request.attrs["size"] == 10
    with pytest.raises(ValueError, match=r"^request\.size: '200000' is not of type 'integer'$"):
        build_requests(policy, {"protocol": "mail", "command": "DATA", "size": "200000"})
    with pytest.raises(ValueError, match=r"^request\.size: -1 is less than the minimum of 0$"):
        build_requests(policy, {"protocol": "mail", "command": "DATA", "size": -1})
