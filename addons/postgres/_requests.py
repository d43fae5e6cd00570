"""Turn SQL text into policy requests (shared by the listener and ``lictor test``)."""

from __future__ import annotations

from lictor import Request

from ._classify import ClassificationError, Statement, classify, redact_secrets


def rule_kinds(st: Statement) -> frozenset[str]:
    """The kinds rules match with ``statements:``: the statement's own kind plus every nested kind
    except plain reads. A nested SELECT (``INSERT ... VALUES``/``SELECT``, a subquery in UPDATE) is a
    read and shows up in ``tables_read``; a nested DELETE in a CTE, an EXPLAIN ANALYZE'd UPDATE or a
    DROP in a DO body is exactly what ``statements:`` must see."""
    if st.kind == "select":
        return st.kinds
    return frozenset({st.kind} | (st.kinds - {"select"}))


def statement_attrs(st: Statement, database: str = "") -> dict[str, object]:
    return {
        "kind": st.kind,
        "kinds": rule_kinds(st),
        "tables": st.tables_read | st.tables_written,
        "tables_read": st.tables_read,
        "tables_written": st.tables_written,
        "functions": st.functions,
        "columns": st.columns,
        "has_where": st.has_where,
        "limit": st.limit,
        "modifies": st.modifies,
        "dynamic_sql": st.dynamic_sql,
        "read_write_attempt": st.read_write_attempt,
        "transforms_data": st.transforms_data,
        "settings": st.settings,
        "settings_read": st.settings_read,
        "transforms_settings": st.transforms_settings,
        "database": database,
        "copy_target": st.copy_target,
        "languages": st.languages,
        "roles": st.roles,
        "objects": st.objects,
    }


def request_for_statement(st: Statement, *, target: str, database: str = "", reason: str | None = None) -> Request:
    # Shown to approvers, sent to webhooks and audited: a role's password is not (see redact_secrets).
    text = redact_secrets(st.text)
    return Request(
        protocol="postgres",
        action=st.kind,
        attrs=statement_attrs(st, database),
        target=target,
        summary=f"{st.kind.upper().replace('_', ' ')}: {text.strip()[:200]}",
        payload=text,
        reason=reason,
    )


def requests_for_sql(sql: str, *, target: str, database: str = "", reason: str | None = None) -> list[Request]:
    """One request per statement. A statement the grammar rejects becomes an ``unknown`` request,
    which no rule allows unless it names ``unknown`` explicitly (fail closed)."""
    try:
        statements = classify(sql)
    except ClassificationError as exc:
        return [
            Request(
                protocol="postgres",
                action="unknown",
                attrs={
                    "kind": "unknown",
                    "kinds": frozenset({"unknown"}),
                    "parse_error": str(exc),
                    # no `tables`: which tables it touches is unknown, and an empty set would be covered by
                    # every allow on tables (`tables: [orders]` would allow it)
                    "database": database,
                },
                target=target,
                summary=f"unparsable SQL ({exc}): {sql.strip()[:200]}",
                payload=sql,
                reason=reason,
            )
        ]
    if not statements:
        return [
            Request(
                protocol="postgres",
                action="empty",
                attrs={
                    "kind": "empty",
                    "kinds": frozenset({"empty"}),
                    "tables": frozenset(),
                    "database": database,
                    # known for an empty query: rules such as `modifies: false` cover it
                    "modifies": False,
                    "dynamic_sql": False,
                    "read_write_attempt": False,
                    "transforms_data": False,
                    "transforms_settings": False,
                },
                target=target,
                summary="empty query",
                payload=sql,
                reason=reason,
            )
        ]
    return [request_for_statement(st, target=target, database=database, reason=reason) for st in statements]
