"""docs/configuration.md: every example there loads as the gateway loads it, or fails with the error it shows."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from lictor import load_policy
from lictor.approvals import ApprovalBroker
from lictor.cli import _manager
from lictor.config import ConfigError, load_config
from lictor.gateway import Gateway
from lictor.identity import LocalIssuer
from lictor.policytest import run_tests
from lictor.recorder import RecordingsConfig
from lictor.runner import validate_targets

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```$", re.S | re.M)


def blocks() -> list[tuple[str, str, str | None]]:
    """The guide's YAML examples in order: (kind, text, the error the ```text block right after it shows)."""
    doc = DOC.read_text()
    fences = [(m.group(2), m.group(3), len(m.group(1)), m.start(), m.end()) for m in FENCE.finditer(doc)]
    out: list[tuple[str, str, str | None]] = []
    for i, (lang, body, indent, _, end) in enumerate(fences):
        if lang != "yaml":
            continue
        text = "".join(line[indent:] for line in body.splitlines(True))
        error = None
        if i + 1 < len(fences) and fences[i + 1][0] == "text" and not doc[end : fences[i + 1][3]].strip():
            error = fences[i + 1][1].strip()
        kind = "config"
        if text.startswith("format:"):
            kind = "tests" if text.startswith("format: lictor-tests/") else "pack"
        out.append((kind, text, error))
    return out


def load_as_the_gateway_does(path: Path, env: dict[str, str], state: Path) -> None:
    """What ``lictor run`` does with the file before it listens: load and validate it, load its addons, set
    their options, check the targets, and build the recordings, approvals and identity configuration."""
    config = load_config(path, env=env)
    manager = _manager(config)
    manager.set_options(dict(config.section("options")))
    validate_targets(config, manager)
    RecordingsConfig.from_gateway_config(config)
    stand_in = SimpleNamespace(config=config, state_dir=state, issuer=LocalIssuer(state))
    broker = ApprovalBroker.from_config(stand_in, config.section("approvals"))  # type: ignore[arg-type]
    broker.store.close()
    Gateway._make_verifier(stand_in)  # type: ignore[arg-type]


def _public_key_files(text: str, base: Path) -> None:
    """The PEM files a static issuer names, made up: the example's paths are its own."""
    for listed in re.findall(r"public_keys: \[(.*?)\]", text):
        for name in (n.strip() for n in listed.split(",")):
            key = ed25519.Ed25519PrivateKey.generate().public_key()
            pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_bytes(pem)


def test_the_guide_has_its_examples():
    kinds = [kind for kind, _, _ in blocks()]
    assert kinds.count("config") >= 11 and kinds.count("pack") == 1 and kinds.count("tests") == 1, kinds
    assert sum(1 for _, _, error in blocks() if error) >= 2


@pytest.mark.parametrize(
    ("text", "error"),
    [(text, error) for kind, text, error in blocks() if kind == "config"],
    ids=lambda v: (v or "ok").splitlines()[0][:40] if isinstance(v, str) or v is None else "",
)
def test_each_config_example_in_the_guide_loads_or_fails_as_it_says(tmp_path, text, error):
    # Paths in the examples are relative to a lictor.yaml at the repository's root (examples/..., rulepacks).
    for name in ("examples", "rulepacks"):
        (tmp_path / name).symlink_to(ROOT / name)
    _public_key_files(text, tmp_path)
    path = tmp_path / "lictor.yaml"
    path.write_text(text)
    # Variables without a default are set, except in an example that shows an error (of an unset one).
    unset = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    env = {} if error else {name: "https://placeholder.example/" for name in unset}
    if error is None:
        load_as_the_gateway_does(path, env, tmp_path / "state")
        return
    with pytest.raises((ConfigError, ValueError)) as raised:
        load_as_the_gateway_does(path, env, tmp_path / "state")
    assert str(raised.value).replace(str(path), "lictor.yaml") == error


def test_the_guide_s_identity_mapping_pack_passes_its_tests(tmp_path):
    [pack] = [text for kind, text, _ in blocks() if kind == "pack"]
    [tests] = [text for kind, text, _ in blocks() if kind == "tests"]
    (tmp_path / "sso.yaml").write_text(pack)
    (tmp_path / "sso.tests.yaml").write_text(tests)
    result = load_policy([tmp_path], _manager(None).vocabularies)
    assert result.policy is not None, [str(p) for p in result.errors]
    report = run_tests(result.policy, result.test_files)
    assert len(report.cases) == 3 and all(c.passed for c in report.cases), [c.message for c in report.cases]


def test_state_dir_expands_the_home_directory_like_every_other_path(tmp_path, monkeypatch):
    # It was the one path left as written: `~/lictor` became a directory named `~` next to lictor.yaml.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "lictor.yaml").write_text("version: 1\nstate_dir: ~/lictor-state\n")
    assert load_config(tmp_path / "lictor.yaml", offline=True).state_dir == tmp_path / "home" / "lictor-state"


def test_an_unknown_log_level_is_an_error_that_says_where(tmp_path):
    # `verbose` was taken as info without a word: the debug lines it was meant to show never came
    path = tmp_path / "lictor.yaml"
    path.write_text("version: 1\nlog:\n  format: text\n  level: verbose\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, offline=True)
    assert str(raised.value) == f"{path}:4:10: log.level 'verbose' is not one of debug, info, warning, error"
    path.write_text("version: 1\nlog: {level: WARNING}\n")
    assert load_config(path, offline=True).section("log")["level"] == "WARNING"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # kept as written: the password sent upstream was the text `${DB-PASS}`
        ("${DB-PASS}", "'${DB-PASS}': `${` starts no variable reference"),
        ("${DB_PASS:default}", "'${DB_PASS:default}': `${` starts no variable reference"),
        ("${DB_PASS", "'${DB_PASS': `${` starts no variable reference"),
        # the inner default ended at the first `}`: the value was the text `${C` followed by `}}`
        ("${A:-${B:-${C}}}", "${B:-...}: a default may hold references one level deep only"),
    ],
)
def test_a_dollar_brace_that_is_no_variable_reference_is_an_error(tmp_path, value, problem):
    path = tmp_path / "lictor.yaml"
    path.write_text(f'version: 1\nstate_dir: "{value}"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={"HOME": "/home/op"}, offline=True)
    assert str(raised.value).startswith(f"{path}:2:12: {problem}"), raised.value


def test_a_default_may_name_another_variable(tmp_path):
    # `${LICTOR_APPROVALS_LISTEN:-127.0.0.1:${LICTOR_APPROVALS_PORT:-8470}}`: either variable moves the address
    path = tmp_path / "lictor.yaml"
    path.write_text('version: 1\nstate_dir: "${STATE:-${HOME}/x}/${SUB:-${NAME:-s}}"\n')
    assert load_config(path, env={"HOME": "/home/op"}).state_dir == Path("/home/op/x/s")
    assert load_config(path, env={"HOME": "/home/op", "NAME": "n"}).state_dir == Path("/home/op/x/n")
    assert load_config(path, env={"STATE": "/srv", "SUB": "b", "NAME": "n"}).state_dir == Path("/srv/b")
    with pytest.raises(ConfigError, match="environment variable HOME is not set"):
        load_config(path, env={})


@pytest.mark.parametrize("example", ["http", "kubernetes", "postgres", "redis", "ssh"])
def test_every_example_moves_its_approvals_page_with_either_variable(example):
    # Two examples at once both want 8470; the README names one variable for all of them.
    path = Path(__file__).parent.parent / "examples" / example / "lictor.yaml"
    for env, listen in [
        ({}, "127.0.0.1:8470"),
        ({"LICTOR_APPROVALS_PORT": "8471"}, "127.0.0.1:8471"),
        ({"LICTOR_APPROVALS_LISTEN": "0.0.0.0:8472", "LICTOR_APPROVALS_PORT": "8471"}, "0.0.0.0:8472"),
    ]:
        assert load_config(path, env=env, offline=True).section("approvals")["listen"] == listen, env


def test_a_literal_dollar_brace_is_written_twice(tmp_path):
    path = tmp_path / "lictor.yaml"
    path.write_text('version: 1\nstate_dir: "/srv/$${NAME}/${SUB:-x}"\n')
    assert load_config(path, env={}).state_dir == Path("/srv/${NAME}/x")


def test_an_empty_path_is_an_error_not_the_config_s_directory(tmp_path):
    # `state_dir: ${LICTOR_STATE_DIR:-}` put the issuer, audit and masking keys next to lictor.yaml
    path = tmp_path / "lictor.yaml"
    path.write_text(
        'version: 1\nstate_dir: "${LICTOR_STATE_DIR:-}"\nrulepacks: [""]\naudit: {sqlite: ""}\n'
        'masking: {hash_key_file: ""}\naddons: [""]\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={}, offline=True)
    assert str(raised.value).splitlines() == [
        f"{path}:6:10: addons.0: '' should be non-empty",
        f"{path}:4:17: audit.sqlite: '' should be non-empty",
        f"{path}:5:26: masking.hash_key_file: '' should be non-empty",
        f"{path}:3:13: rulepacks.0: '' should be non-empty",
        f"{path}:2:12: state_dir: '' should be non-empty",
    ]


def test_audit_postgres_is_refused_not_ignored(tmp_path):
    # the audit log is SQLite: a DSN there was accepted, and a fleet's audit events stayed on each replica
    path = tmp_path / "lictor.yaml"
    path.write_text("version: 1\naudit:\n  postgres: postgresql://audit@db/lictor\n")
    with pytest.raises(ConfigError, match=r"lictor.yaml:3:3: audit.postgres is not supported: the audit log is SQLite"):
        load_config(path, offline=True)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # an empty key (a file made with `touch`, or cut short) made hash masks a plain hash: a masked card
        # number, few unknown digits, was found by trying them all
        ("", "the key is 0 bytes; it must be at least 16 random bytes in hex"),
        ("abcd\n", "the key is 2 bytes; it must be at least 16 random bytes in hex"),
        # not hex: the error named neither the file nor the setting
        ("not hex\n", "not a key in hex (non-hexadecimal number found"),
    ],
)
def test_a_masking_key_that_protects_nothing_stops_the_gateway_and_check(tmp_path, content, problem):
    from lictor import AddonManager
    from lictor.cli import main

    (tmp_path / "mask.key").write_text(content)
    path = tmp_path / "lictor.yaml"
    path.write_text(f"version: 1\nstate_dir: {tmp_path / 'state'}\nmasking: {{hash_key_file: mask.key}}\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as raised:
        Gateway(config, AddonManager())
    assert str(raised.value).startswith(f"{path}:3:26: masking.hash_key_file: {tmp_path / 'mask.key'}: {problem}")
    assert main(["check", "-c", str(path)]) == 1
    (tmp_path / "mask.key").write_text("ab" * 16)
    assert main(["check", "-c", str(path)]) == 0
    gateway = Gateway(config, AddonManager())
    assert gateway._mask_key == b"\xab" * 16
    gateway.audit.close()


def test_every_unknown_key_is_reported_with_the_key_it_may_mean(tmp_path):
    # only the first unknown key of a mapping was reported: fix one, run again, find the next
    path = tmp_path / "lictor.yaml"
    path.write_text("version: 1\ntarget: {}\nrulepack: [packs]\nlog: {levl: info}\nextra: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, offline=True)
    assert str(raised.value).splitlines() == [
        f"{path}:2:1: unknown key 'target' (did you mean 'targets'?)",
        f"{path}:3:1: unknown key 'rulepack' (did you mean 'rulepacks'?)",
        f"{path}:5:1: unknown key 'extra'",
        f"{path}:4:7: unknown key 'levl' (did you mean 'level'?)",
    ]


def test_a_misspelt_value_names_the_likely_one(tmp_path):
    path = tmp_path / "lictor.yaml"
    path.write_text("version: 1\nidentity:\n  issuers: [{type: jwsk}]\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, offline=True)
    assert str(raised.value) == (
        f"{path}:3:20: identity.issuers.0.type: unknown value 'jwsk' (did you mean 'jwks'?); "
        "expected one of: lictor, jwks, static"
    )


def test_relative_paths_of_a_symlinked_config_are_all_relative_to_one_directory(tmp_path):
    # state_dir was relative to the directory of the symlink, every other path to that of the file it points
    # to (as a Kubernetes ConfigMap mounts lictor.yaml: a symlink into a directory the next update removes)
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "real" / "lictor.yaml").write_text(
        "version: 1\nstate_dir: state\nrulepacks: [rulepacks]\naudit: {sqlite: audit/audit.db}\n"
    )
    (tmp_path / "etc" / "lictor.yaml").symlink_to(tmp_path / "real" / "lictor.yaml")
    config = load_config(tmp_path / "etc" / "lictor.yaml", offline=True)
    assert config.state_dir == tmp_path / "etc" / "state"
    assert config.rulepacks == [tmp_path / "etc" / "rulepacks"]
    assert config.resolve("audit/audit.db") == tmp_path / "etc" / "audit" / "audit.db"
