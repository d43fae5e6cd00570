"""The Redis addon's command table, key extraction and rule vocabulary (examples/redis)."""

from __future__ import annotations

import socket
import sys

import pytest
from lictor import AddonManager, testing

from tests.conftest import ROOT, require

sys.path.insert(0, str(ROOT / "examples" / "redis"))

from lictor_redis import VOCABULARY, RedisAddon, build_requests, classify
from lictor_redis.commands import CATEGORIES, TYPES, table
from lictor_redis.resp import ReplyParser, encode_command, split_inline


def c(line: str):
    return classify(split_inline(line.encode()))


# -- classification ---------------------------------------------------------------------------------


def test_simple_commands():
    get = c("GET app:1")
    assert (get.command, get.known, get.categories, get.types, get.keys) == (
        "get",
        True,
        frozenset({"read"}),
        frozenset({"string"}),
        (b"app:1",),
    )
    mset = c("mset a 1 b 2")
    assert mset.name == "MSET" and mset.keys == (b"a", b"b") and mset.categories == {"write"}


def test_container_commands_are_named_with_their_subcommand():
    kill = c("client kill ID 5")
    assert kill.command == "client kill" and kill.name == "CLIENT KILL"
    assert kill.categories == {"admin", "connection", "dangerous"}
    assert kill.args == (b"ID", b"5")
    enc = c("OBJECT ENCODING app:1")
    assert enc.keys == (b"app:1",) and enc.categories == {"keyspace", "read"}


@pytest.mark.parametrize(
    ("line", "keys"),
    [
        ("XREAD COUNT 2 STREAMS s1 s2 0 0", (b"s1", b"s2")),
        ("XREADGROUP GROUP g c STREAMS s1 >", (b"s1",)),
        ("GEORADIUS g 1 2 3 m STORE dst", (b"g", b"dst")),
        ("GEORADIUS g 1 2 3 m", (b"g",)),
        # Redis stores into the last STORE key; its key spec names only the first
        ("GEORADIUS g 1 2 3 m STORE a STORE b", (b"g", b"a", b"b")),
        ("GEORADIUSBYMEMBER g m 3 m STOREDIST a STOREDIST b", (b"g", b"a", b"b")),
        ("ZUNIONSTORE d 2 a b WEIGHTS 1 2", (b"d", b"a", b"b")),
        ("LMPOP 2 a b LEFT", (b"a", b"b")),
        ("BLMOVE a b LEFT RIGHT 0", (b"a", b"b")),
        ("PUBLISH channel msg", ()),  # channels are not keys
        ("PING", ()),
        ("ZUNIONSTORE d x a b", None),  # bad numkeys: unknown, not guessed
    ],
)
def test_key_specs(line, keys):
    assert c(line).keys == keys


@pytest.mark.parametrize(
    "line",
    [
        "EVAL \"return redis.call('del', 'other')\" 1 app:1",  # a script's declared keys bind nothing
        "EVALSHA abc 0",
        "FCALL f 1 app:1",
        "SORT app:1 BY other:*",  # BY/GET patterns read other keys
        'MIGRATE h 1 "" 0 5 KEYS a b',
        "KEYS *",
        "SCAN 0",
        "FLUSHALL",
        "FLUSHDB",
        "RANDOMKEY",
        # the consumer is named like the keyword: Redis reads app:1 and other, not STREAMS and app:1
        "XREADGROUP COUNT 1 GROUP g STREAMS STREAMS app:1 other > >",
        "XREAD STREAMS STREAMS 0",
    ],
)
def test_keys_are_unknown_when_they_cannot_be_listed(line):
    assert c(line).keys is None


def test_unknown_commands_have_nothing_to_match():
    foo = c("FT.SEARCH idx hello")
    assert (foo.known, foo.categories, foo.types, foo.keys) == (False, None, None, None)
    assert foo.command == "ft.search"
    sub = c("CLIENT FROBNICATE")
    assert sub.command == "client frobnicate" and not sub.known
    assert not c("CLIENT").known


def test_wrong_arity():
    get = c("GET")
    assert get.arity_ok is False and get.keys is None
    assert c("GET a b").arity_ok is False
    assert c("MSET a").arity_ok is False


def test_categories_are_stricter_than_redis_for_scripts_and_acl():
    assert c("EVAL x 0").categories == {"scripting", "dangerous"}
    assert c("SCRIPT LOAD x").categories >= {"scripting", "dangerous"}
    assert c("ACL WHOAMI").categories == {"admin", "dangerous"}
    assert c("MEMORY PURGE").categories == {"admin"}
    for line in ["FLUSHALL", "FLUSHDB", "CONFIG GET x", "KEYS *", "DEBUG SLEEP 0", "SHUTDOWN", "MIGRATE h 1 k 0 5"]:
        assert "dangerous" in c(line).categories, line
    for line in ["CONFIG SET a b", "MODULE LIST", "REPLICAOF NO ONE", "SAVE", "ACL LIST", "DEBUG SLEEP 0"]:
        assert "admin" in c(line).categories, line


def test_every_known_command_has_a_permission_category():
    for name, info in table().items():
        assert info.categories, name
        assert info.categories <= set(CATEGORIES), name
        assert info.types <= set(TYPES), name
    assert c("TIME").categories == {"other"}  # Redis puts it in no permission category


# -- requests and the vocabulary --------------------------------------------------------------------


def test_requests_show_keys_not_values():
    (req,) = build_requests({"command": "SET app:card '4111 1111 1111 1111'"}, "cache")
    assert req.protocol == "redis" and req.action == "set" and req.target == "cache"
    assert req.summary == "SET app:card (+1 arg)"
    assert "4111" not in req.summary
    assert req.payload == 'SET app:card "4111 1111 1111 1111"'  # approvals bind to the exact command
    assert req.attrs["keys"] == {"app:card"}
    (unknown,) = build_requests({"args": ["FOO", 1]}, "")
    assert unknown.action == "unknown" and unknown.attrs["command"] == "foo"


def test_binary_keys_match_one_to_one():
    args = [b"GET", b"app:\xff"]
    from lictor_redis import request_for

    req = request_for(classify(args), args)
    (key,) = req.attrs["keys"]
    assert key.encode("utf-8", "surrogateescape") == b"app:\xff"


def test_a_long_command_shows_approvers_a_part_bound_to_the_whole_by_its_digest():
    """Every argument is decided; approvers read the first ones, each cut, and the digest of all of them (quoting
    a million keys, or a binary value of megabytes, took seconds of the event loop every agent shares)."""
    from lictor_redis import request_for

    keys = [b"app:%d" % i for i in range(5000)]
    args = [b"EXISTS", *keys]
    req = request_for(classify(args), args)
    assert req.attrs["keys"] == {k.decode() for k in keys} and len(req.attrs["args"]) == 5000  # what is decided
    assert len(req.payload) < 8000 and req.payload.startswith("EXISTS app:0 app:1 ")
    assert "…(+4744 args) (the whole command: 5000 args, " in req.payload
    shown = req.shown_attrs
    assert (
        shown is not None and len(shown["args"]) == len(shown["keys"]) == 257 and shown["keys"][-1] == "…(+4744 keys)"
    )
    other = [*args[:-1], b"app:other"]  # differs after what is shown: another digest, which an approval is bound to
    assert request_for(classify(other), other).digest() != req.digest()
    value = bytes(range(256)) * 1024
    blob = request_for(classify([b"SET", b"app:blob", value]), [b"SET", b"app:blob", value])
    assert blob.attrs["args"][1] == value.decode("utf-8", "surrogateescape")
    assert len(blob.payload) < 1000 and 'SET app:blob "\\x00\\x01' in blob.payload
    assert "(the whole command: 2 args, 262152 bytes, sha256:" in blob.payload
    # passwords stay out of a long command's payload too, and out of the digest of the whole: theirs follows
    acl = [b"ACL", b"SETUSER", b"bob", b">Secret-1", *[b"~app:%d" % i for i in range(300)]]
    held = request_for(classify(acl), acl)
    assert "Secret-1" not in held.payload + repr(held.shown_attrs) and "[REDACTED]" in held.payload
    assert "(passwords: sha256:" in held.payload
    # a short command is shown whole, as before
    assert request_for(classify([b"MGET", b"app:1", b"a b"]), [b"MGET", b"app:1", b"a b"]).payload == 'MGET app:1 "a b"'


def test_build_requests_errors():
    with pytest.raises(ValueError, match="command"):
        build_requests({"protocol": "redis"}, "")
    with pytest.raises(ValueError, match="split"):
        build_requests({"command": "GET 'x"}, "")


PACK = """
format: lictor/v1
metadata: {name: t}
identities:
  - match: {sub: "*"}
    roles: [r]
roles:
  r:
    rules:
      - {id: read-app, protocol: redis, when: {categories: [read], keys: "app:*"}, action: allow}
      - {id: foo, protocol: redis, when: {commands: [FT.SEARCH]}, action: allow}
      - {id: no-secret, protocol: redis, when: {keys: "secret:*"}, action: deny}
      - {id: no-dir, protocol: redis, when: {args: [dir]}, action: deny}
      - {id: admin, protocol: redis, when: {categories: [admin, dangerous]}, action: allow}
"""


def decide(line: str):
    policy = testing.policy(PACK, RedisAddon())
    (req,) = build_requests({"command": line}, "")
    return policy.decide(testing.identity("a"), req)


def test_vocabulary_semantics():
    testing.assert_decision(decide("MGET app:1 app:2"), "allow", rule="read-app")
    testing.assert_decision(decide("MGET app:1 other:2"), "deny", rule="lictor:default-deny")  # allow covers all
    testing.assert_decision(decide("MGET app:1 secret:2"), "deny", rule="no-secret")  # deny fires on any
    testing.assert_decision(decide("GET App:1"), "deny")  # keys are case-sensitive
    testing.assert_decision(decide("ft.search idx x"), "allow", rule="foo")  # an unknown command named by a rule
    testing.assert_decision(decide("FT.CREATE idx"), "deny", rule="lictor:default-deny")
    testing.assert_decision(decide("CONFIG GET DIR"), "deny", rule="no-dir")  # args are case-insensitive
    testing.assert_decision(decide("CONFIG GET maxmemory"), "allow", rule="admin")


def test_categories_have_no_wildcard():
    with pytest.raises(ValueError, match="categories"):
        testing.policy(PACK.replace("[admin, dangerous]", '"*"'), RedisAddon())
    assert VOCABULARY.index == "commands"


# -- key extraction against the real server ---------------------------------------------------------

GETKEYS_SAMPLES = [
    "GET app:1",
    "SET app:1 v EX 10",
    "MSET a 1 b 2 c 3",
    "MGET a b c",
    "DEL a b",
    "HSET h f v f2 v2",
    "LMOVE a b LEFT RIGHT",
    "ZUNIONSTORE d 2 a b",
    "ZINTER 2 a b WITHSCORES",
    "SINTERCARD 2 a b LIMIT 1",
    "XREAD COUNT 1 STREAMS s1 s2 0 0",
    "XREADGROUP GROUP g c COUNT 1 STREAMS s1 s2 > >",
    "GEORADIUS g 1 2 3 m STORE dst",
    "GEOSEARCHSTORE dst src FROMMEMBER m BYRADIUS 1 m",
    "BITOP AND dst a b",
    "BLMPOP 0 2 a b LEFT",
    "COPY a b",
    "RENAME a b",
    "OBJECT ENCODING a",
    "MEMORY USAGE a",
    "PFMERGE d a b",
    "SMOVE a b m",
    "ZRANGESTORE d s 0 -1",
    "LCS a b",
]


def _raw_command(args: list[bytes]) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", 6379), timeout=5) as s:
        s.sendall(encode_command(args))
        parser = ReplyParser()
        values: list[bytes] = []
        current = b""
        while True:
            parser.feed(s.recv(65536))
            for event in parser.events():
                if hasattr(event, "data"):
                    current += event.data
                elif type(event).__name__ == "BulkEnd":
                    values.append(current)
                    current = b""
                elif type(event).__name__ == "Simple" and event.prefix == ord("-"):
                    raise AssertionError(event.body.decode())
                if event.done:
                    return values


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("line", GETKEYS_SAMPLES)
def test_keys_match_redis_command_getkeys(line):
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    args = split_inline(line.encode())
    assert c(line).keys is not None
    assert sorted(c(line).keys) == sorted(_raw_command([b"COMMAND", b"GETKEYS", *args]))


def test_the_addons_guard_inspects_only_redis_requests():
    """The Redis addon's request hook is for redis requests: other protocols' decisions do not run it, and
    a broken edit of the addon file (whose stand-in denies what the addon inspected) denies only redis."""
    manager = AddonManager()
    manager.add(RedisAddon())
    assert [name for name, _ in manager.hooks_for("request", "redis")] == ["redis"]
    assert manager.hooks_for("request", "postgres") == []
    assert manager.hooks_for("request", "ssh") == []
