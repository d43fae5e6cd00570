"""The audit chain detects edits, deletions, reordering and truncation."""

from __future__ import annotations

import sqlite3

import pytest
from lictor import AuditLog


@pytest.fixture
def log(tmp_path):
    audit = AuditLog(tmp_path / "audit.db")
    for i in range(10):
        audit.append("decision", {"i": i, "action": "allow" if i % 2 else "deny", "identity": {"sub": f"a{i % 3}"}})
    yield audit
    audit.close()


def raw(log):
    return sqlite3.connect(log.path, isolation_level=None)


def test_intact_chain_verifies(log):
    r = log.verify()
    assert r.ok and r.events == 10


def test_edited_event(log):
    db = raw(log)
    body = db.execute("SELECT body FROM events WHERE seq = 4").fetchone()[0]
    edited = body.replace('"action":"allow"', '"action":"deny"')
    assert edited != body
    db.execute("UPDATE events SET body = ? WHERE seq = 4", (edited,))
    r = log.verify()
    assert not r.ok and r.first_bad == 4 and "edited" in r.problem


def test_deleted_event(log):
    raw(log).execute("DELETE FROM events WHERE seq = 6")
    r = log.verify()
    assert not r.ok and r.first_bad == 6 and "deleted" in r.problem


def test_reordered_events(log):
    db = raw(log)
    a = db.execute("SELECT body, mac FROM events WHERE seq = 2").fetchone()
    b = db.execute("SELECT body, mac FROM events WHERE seq = 3").fetchone()
    db.execute("UPDATE events SET body = ?, mac = ? WHERE seq = 2", b)
    db.execute("UPDATE events SET body = ?, mac = ? WHERE seq = 3", a)
    r = log.verify()
    assert not r.ok and r.first_bad == 2


def test_truncated_tail(log):
    raw(log).execute("DELETE FROM events WHERE seq > 7")
    r = log.verify()
    assert not r.ok and r.first_bad == 8 and "truncated" in r.problem


def test_truncation_with_rolled_back_head_is_still_caught(log):
    db = raw(log)
    mac7 = db.execute("SELECT mac FROM events WHERE seq = 7").fetchone()[0]
    db.execute("DELETE FROM events WHERE seq > 7")
    # the attacker rewrites the head to claim 7 events but cannot produce K7 from K10
    db.execute("UPDATE head SET seq = 7, mac = ?", (mac7,))
    r = log.verify()
    assert not r.ok and "tampered" in r.problem


def test_chain_continues_across_reopen(tmp_path):
    a = AuditLog(tmp_path / "a.db")
    a.append("x", {"n": 1})
    a.close()
    b = AuditLog(tmp_path / "a.db")
    b.append("x", {"n": 2})
    assert b.verify().ok and b.verify().events == 2
    assert [e["n"] for e in b.events()] == [1, 2]
    assert [e["n"] for e in b.events(filters={"n": "2"})] == [2]


def test_unauthenticated_columns_cannot_hide_an_event(log):
    # kind and ts are stored next to the MAC'd body: editing them must not hide an event from a
    # filtered listing while verify still says OK.
    raw(log).execute("UPDATE events SET kind = 'x', ts = 0 WHERE seq = 5")
    assert 5 in [e["seq"] for e in log.events(kind="decision")]
    assert 5 in [e["seq"] for e in log.events(since=1.0)]
    r = log.verify()
    assert not r.ok and r.first_bad == 5
