"""Regenerate ``lictor_redis/commands.json`` from a running Redis server's ``COMMAND INFO``.

Usage: ``python examples/redis/tools/gen_command_table.py [HOST [PORT]]``

The table keeps, per command (``name`` or ``container|subcommand``): the arity, Redis' ACL
categories (without the ``@``), whether the command is flagged ``movablekeys``, and its key
specifications in a compact form. ``lictor_redis.commands`` interprets it; overrides that make the
gateway stricter than Redis (scripts count as dangerous, for instance) live there, not here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import redis

OUT = Path(__file__).resolve().parent.parent / "lictor_redis" / "commands.json"


def _pairs(items: list[Any] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(items, dict):
        return {str(k): v for k, v in items.items()}
    return {str(items[i]): items[i + 1] for i in range(0, len(items), 2)}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    return value


def _spec(raw: list[Any]) -> list[Any]:
    """One key spec as ``[flags, begin_search, find_keys]``:

    begin_search: ``["index", pos]`` | ``["keyword", word, startfrom]`` | ``["unknown"]``;
    find_keys: ``["range", lastkey, keystep, limit]`` | ``["keynum", keynumidx, firstkey, keystep]`` |
    ``["unknown"]``.
    """
    spec = _pairs(raw)
    flags = sorted(str(f).lower() for f in spec.get("flags", []) if str(f).lower() in ("incomplete", "not_key"))
    bs = _pairs(spec["begin_search"])
    bs_spec = _pairs(bs["spec"]) if bs["spec"] else {}
    if bs["type"] == "index":
        begin: list[Any] = ["index", bs_spec["index"]]
    elif bs["type"] == "keyword":
        begin = ["keyword", bs_spec["keyword"], bs_spec["startfrom"]]
    else:
        begin = ["unknown"]
    fk = _pairs(spec["find_keys"])
    fk_spec = _pairs(fk["spec"]) if fk["spec"] else {}
    if fk["type"] == "range":
        find: list[Any] = ["range", fk_spec["lastkey"], fk_spec["keystep"], fk_spec["limit"]]
    elif fk["type"] == "keynum":
        find = ["keynum", fk_spec["keynumidx"], fk_spec["firstkey"], fk_spec["keystep"]]
    else:
        find = ["unknown"]
    return [flags, begin, find]


def _entry(raw: list[Any], table: dict[str, Any]) -> None:
    name, arity, flags, _first, _last, _step, categories, _tips, specs, subcommands = raw
    table[str(name).lower()] = {
        "arity": arity,
        "categories": sorted(str(c).lstrip("@") for c in categories),
        "movablekeys": "movablekeys" in flags,
        "keys": [_spec(s) for s in specs],
        "container": bool(subcommands),
    }
    for sub in subcommands:
        _entry(sub, table)


def main() -> None:
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 6379
    client = redis.Redis(host, port)
    conn = client.connection_pool.get_connection()
    conn.send_command("COMMAND")  # type: ignore[no-untyped-call]  # raw reply: the client's COMMAND parser drops key specs
    raw = _decode(conn.read_response())
    client.connection_pool.release(conn)
    version = client.info("server")["redis_version"]
    table: dict[str, Any] = {}
    for entry in raw:
        _entry(entry, table)
    lines = [f'{{"_source": {json.dumps("COMMAND of Redis " + version)},']
    names = sorted(table)
    for i, name in enumerate(names):
        sep = "," if i < len(names) - 1 else ""
        lines.append(f" {json.dumps(name)}: {json.dumps(table[name], separators=(',', ':'))}{sep}")
    lines.append("}")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{len(table)} commands from Redis {version} -> {OUT}")


if __name__ == "__main__":
    main()
