"""The gateway config (``lictor.yaml``): listeners, targets, credentials references, stores, issuers.

Written by whoever deploys the gateway; never mixed with rule packs. Strings may use
``${VAR}`` and ``${VAR:-default}`` to take values from the environment (a missing variable
without a default is an error, not an empty string; ``$${`` is a literal ``${``, any other ``${``
an error). Relative paths are relative to the file.
Each protocol addon validates the targets of its protocol with the schema it declares.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from ._yaml import Location, LocDict, LocList, YamlError, did_you_mean, key_location, load_documents, locate, plain

__all__ = ["ROLE_FORMAT", "ConfigError", "GatewayConfig", "Target", "load_config"]

ROLE_FORMAT = "lictor-role"
"""The ``format`` a target schema gives a string that names a rule-pack role (``read_only_roles``)."""

LOG_LEVELS = ("debug", "info", "warning", "error")
"""The values of ``log.level`` (and ``lictor run --log-level``), in any case."""

# ``$${`` (a literal ``${``), a reference, or any other ``${``: one that is not a reference is an error. A
# reference is ``${NAME}`` or ``${NAME:-default}``, whose default may hold references in turn, one level deep
# (``${LISTEN:-127.0.0.1:${PORT:-8470}}``).
_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}"
_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^}$]|\$\$\{|\$(?!\{)|" + _REF + r")*))?\}|\$\{")
_NESTED = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")  # inside a default


class ConfigError(ValueError):
    """A gateway config that cannot be used, with ``FILE:LINE:COL`` where known."""


CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Lictor gateway config",
    "type": "object",
    "additionalProperties": False,
    # An empty path (`${STATE_DIR:-}`) is the directory of lictor.yaml: the gateway's private keys would be
    # written next to its config, which is often in version control or a ConfigMap.
    "$defs": {"path": {"type": "string", "minLength": 1}},
    "properties": {
        "version": {"const": 1},
        "state_dir": {"$ref": "#/$defs/path"},
        "log": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"format": {"enum": ["text", "json"]}, "level": {"type": "string"}},
        },
        "identity": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "leeway": {"type": ["string", "number"]},
                "issuers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type"],
                        "properties": {
                            "type": {"enum": ["lictor", "jwks", "static"]},
                            "name": {"type": "string"},
                            "issuer": {"type": "string", "minLength": 1},
                            "audience": {
                                "oneOf": [
                                    {"type": "string", "minLength": 1},
                                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                ]
                            },
                            "algorithms": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                            "jwks_url": {"type": "string", "pattern": "^https?://."},
                            "public_keys": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                        },
                        # an issuer without its keys would refuse every token it signs, and say so only then
                        "allOf": [
                            {
                                "if": {"properties": {"type": {"const": "jwks"}}},
                                "then": {"required": ["issuer", "jwks_url"]},
                            },
                            {
                                "if": {"properties": {"type": {"const": "static"}}},
                                "then": {"required": ["issuer", "public_keys"]},
                            },
                        ],
                    },
                },
            },
        },
        "rulepacks": {"type": "array", "items": {"$ref": "#/$defs/path"}},
        "audit": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"sqlite": {"$ref": "#/$defs/path"}, "postgres": {"type": "string"}},
        },
        "recordings": {"type": "object"},
        "approvals": {"type": "object"},
        "masking": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"hash_key_file": {"$ref": "#/$defs/path"}},
        },
        "addons": {"type": "array", "items": {"$ref": "#/$defs/path"}},
        "options": {"type": "object"},
        "targets": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["protocol"],
                "properties": {"protocol": {"type": "string"}},
            },
        },
    },
}


@dataclass(frozen=True)
class Target:
    """One configured target: its name, protocol and the protocol-specific settings."""

    name: str
    protocol: str
    settings: Mapping[str, Any]
    loc: Location | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    @property
    def where(self) -> str:
        """``FILE:LINE:COL: target 'NAME'`` (``target 'NAME'`` when the config has no positions): how an error
        about this target starts."""
        return f"{self.loc}: target {self.name!r}" if self.loc else f"target {self.name!r}"


@dataclass
class GatewayConfig:
    path: Path | None
    state_dir: Path
    raw: Mapping[str, Any]
    targets: dict[str, Target] = field(default_factory=dict)
    rulepacks: list[Path] = field(default_factory=list)
    addons: list[str] = field(default_factory=list)
    doc: Any = None  # the document as parsed, with the position of every key and value
    unset: list[str] = field(default_factory=list)  # ``LOC: NAME`` of variables read as empty (``offline``)

    def where(self, *path: str | int) -> Location:
        """The position of the value at ``path`` (keys and list indexes), or of its nearest enclosing value
        that exists; the file's start when the config has no file."""
        fallback = Location(str(self.path) if self.path else "<config>", 1, 1)
        return locate(self.doc, path, fallback) if self.doc is not None else fallback

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.raw.get(name) or {}
        return value if isinstance(value, Mapping) else {}

    def where_key(self, *path: str | int) -> Location:
        """The position of the last key of ``path`` itself (for an unknown key), else of its mapping."""
        mapping_loc = self.where(*path[:-1])
        if self.doc is None:
            return mapping_loc
        node: Any = self.doc
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return mapping_loc
        return key_location(node, str(path[-1]), mapping_loc)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p

    def targets_for(self, protocol: str) -> list[Target]:
        return [t for t in self.targets.values() if t.protocol == protocol]

    def role_references(self, schemas: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Location, str]]:
        """The rule-pack roles the targets' settings name: each string its protocol's target schema marks with
        ``"format": "lictor-role"`` (``read_only_roles``), as (role, where it is written, what names it). The
        rule packs must define them: a misspelt one would leave its sessions without what the setting gives."""
        found: dict[tuple[str, Location], str] = {}

        def walk(schema: Any, value: Any, path: list[str | int], target: Target) -> None:
            if not isinstance(schema, Mapping):
                return
            if schema.get("format") == ROLE_FORMAT and isinstance(value, str):
                what = ".".join(str(p) for p in path if isinstance(p, str))
                found.setdefault((value, self.where("targets", target.name, *path)), f"target {target.name!r}: {what}")
            for key in ("allOf", "anyOf", "oneOf"):
                for alternative in schema.get(key) or ():
                    walk(alternative, value, path, target)
            properties = schema.get("properties")
            if isinstance(value, Mapping) and isinstance(properties, Mapping):
                for key, item in value.items():
                    walk(properties.get(key), item, [*path, str(key)], target)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    walk(schema.get("items"), item, [*path, i], target)

        for target in self.targets.values():
            walk(schemas.get(target.protocol), target.settings, [], target)
        return [(role, loc, what) for (role, loc), what in found.items()]

    @classmethod
    def default(cls, state_dir: str | Path, rulepacks: list[str] | None = None) -> GatewayConfig:
        raw: dict[str, Any] = {"version": 1, "state_dir": str(state_dir), "rulepacks": rulepacks or []}
        return cls(None, Path(state_dir), raw, rulepacks=[Path(p) for p in rulepacks or []])


def _interpolate(
    value: Any,
    loc: Location,
    env: Mapping[str, str],
    unset_ok: bool = False,
    unset_ok_keys: Collection[str] = (),
    unset: list[str] | None = None,
) -> Any:
    """``${NAME}`` and ``${NAME:-default}`` from ``env``. An unset variable without a default is an error,
    except with ``unset_ok`` (below the keys ``unset_ok_keys`` of this mapping), where it is empty (and
    ``LOC: NAME`` is added to ``unset``)."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if m.group(0) == "$${":
                return "${"
            if name is None:
                # `${DB-PASS}`, `${PASS:default}`, a missing `}`: it was kept as it stood, as a password, say
                shown = value[m.start() : m.start() + 40]
                raise ConfigError(
                    f"{loc}: {shown!r}: `${{` starts no variable reference: write ${{NAME}} or ${{NAME:-default}} "
                    "(NAME: letters, digits and _), or $${ for a literal ${"
                )
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                if "${" not in default:
                    return default
                if m.re is _NESTED:
                    # `${A:-${B:-${C}}}` ended at the first `}`: the default was the text `${C` and `}}` were left
                    raise ConfigError(f"{loc}: ${{{name}:-...}}: a default may hold references one level deep only")
                return _NESTED.sub(sub, default)
            if unset_ok:
                if unset is not None:
                    unset.append(f"{loc}: {name}")
                return ""
            raise ConfigError(f"{loc}: environment variable {name} is not set (use ${{{name}:-default}})")

        return _ENV.sub(sub, value)
    if isinstance(value, LocDict):
        out = LocDict()
        out.loc, out.key_locs, out.value_locs = value.loc, value.key_locs, value.value_locs
        for k, v in value.items():
            out[k] = _interpolate(v, value.value_locs.get(k, loc), env, unset_ok or k in unset_ok_keys, unset=unset)
        return out
    if isinstance(value, LocList):
        out_list = LocList(_interpolate(v, value.item_locs[i], env, unset_ok, unset=unset) for i, v in enumerate(value))
        out_list.loc, out_list.item_locs = value.loc, value.item_locs
        return out_list
    if isinstance(value, list):
        return [_interpolate(v, loc, env, unset_ok, unset=unset) for v in value]
    return value


# The keys each kind of issuer reads: any other was accepted and ignored (an `audience` on Lictor's own
# issuer did not narrow what it accepts; `public_keys` on a jwks issuer verified nothing).
_ISSUER_KEYS = {
    "lictor": ("type", "name"),
    "jwks": ("type", "name", "issuer", "audience", "algorithms", "jwks_url"),
    "static": ("type", "name", "issuer", "audience", "algorithms", "public_keys"),
}
_WHY = {
    "lictor": "its tokens always have iss 'lictor', aud 'lictor' and alg EdDSA, signed with STATE/issuer.key; "
    "to trust tokens with other values, add the issuer that signs them as type jwks or static",
    "jwks": "its keys come from jwks_url",
    "static": "its keys are its public_keys",
}


def _check_issuer_keys(doc: LocDict, fallback: Location) -> None:
    """Refuse a key an issuer of that ``type`` would not read (the schema allows the union of all types')."""
    issuers = (doc.get("identity") or {}).get("issuers") or []
    lines = []
    for index, entry in enumerate(issuers):
        kind = entry["type"]
        for key in entry:
            if key not in _ISSUER_KEYS[kind]:
                where = key_location(entry, key, fallback)
                lines.append(
                    f"{where}: identity.issuers.{index}: {key!r} does not apply to a `type: {kind}` issuer "
                    f"({_WHY[kind]})"
                )
    if lines:
        raise ConfigError("\n".join(lines))


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *, offline: bool = False) -> GatewayConfig:
    """Load and validate ``lictor.yaml``; raise ConfigError with the position of the problem.

    ``offline``: for commands that never reach a target (tokens, status, audit, approvals, recordings,
    rule packs), an unset variable in ``targets:`` or ``approvals:`` is empty instead of an error: it names
    what only the gateway's environment has, such as a target's host or credentials, or a webhook's secret.
    (``lictor approvals`` then finds an unset ``approvals.listen`` empty, and says it is not set.)"""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        docs = [d for d in load_documents(text, str(path)) if d is not None]
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    if len(docs) != 1 or not isinstance(docs[0], LocDict):
        raise ConfigError(f"{path}:1:1: the gateway config must be one YAML mapping")
    fallback = Location(str(path), 1, 1)
    unset: list[str] = []
    doc = _interpolate(docs[0], fallback, env, unset_ok_keys=("targets", "approvals") if offline else (), unset=unset)
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for error in errors:
            p = list(error.absolute_path)
            if error.validator == "additionalProperties" and isinstance(error.instance, dict):
                allowed = list(error.schema.get("properties", {}))
                extra = [k for k in error.instance if k not in allowed]
                node = doc
                for part in p:
                    node = node[part]
                for key in extra:  # every one, each where it is written
                    lines.append(
                        f"{key_location(node, key, fallback)}: unknown key {key!r}{did_you_mean(key, allowed)}"
                    )
            elif error.validator == "enum" and isinstance(error.instance, str):
                known = [str(v) for v in error.validator_value]
                lines.append(
                    f"{locate(doc, p, fallback)}: {'.'.join(map(str, p))}: unknown value {error.instance!r}"
                    f"{did_you_mean(error.instance, known)}; expected one of: {', '.join(known)}"
                )
            else:
                where = ".".join(map(str, p))
                lines.append(f"{locate(doc, p, fallback)}: {where + ': ' if where else ''}{error.message}")
        raise ConfigError("\n".join(lines))
    _check_issuer_keys(doc, fallback)
    audit = doc.get("audit") or {}
    if "postgres" in audit:
        # accepted and ignored, it let a fleet's operators believe their audit events were gathered there
        raise ConfigError(
            f"{key_location(audit, 'postgres', fallback)}: audit.postgres is not supported: the audit log is "
            "SQLite (audit.sqlite); to gather the audit events of several gateways in PostgreSQL, add a "
            "recordings sink of type postgres (recordings.sinks)"
        )
    level = (doc.get("log") or {}).get("level")
    if level is not None and level.lower() not in LOG_LEVELS:
        # Python's logging took any other name as info: `verbose` hid the debug lines it was meant to show
        raise ConfigError(
            f"{locate(doc, ['log', 'level'], fallback)}: log.level {level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    state_dir = Path(str(doc.get("state_dir", "state"))).expanduser()  # as every other path
    # Relative paths are relative to the directory the file is named in, its symlinks not followed: state_dir
    # was, the other paths were relative to the directory of the file a symlink points to (a ConfigMap's
    # timestamped directory, which the next update removes).
    here = Path(os.path.abspath(path))
    if not state_dir.is_absolute():
        state_dir = here.parent / state_dir
    cfg = GatewayConfig(path=here, state_dir=state_dir.resolve(), raw=plain(doc), doc=doc, unset=unset)
    cfg.rulepacks = [cfg.resolve(p) for p in doc.get("rulepacks", [])]
    cfg.addons = [str(a) for a in doc.get("addons", [])]
    for name, body in (doc.get("targets") or {}).items():
        tloc = doc["targets"].key_locs.get(name) if isinstance(doc["targets"], LocDict) else None
        cfg.targets[name] = Target(name, str(body["protocol"]), plain(body), tloc)
    return cfg
