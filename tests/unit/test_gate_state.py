"""The deployment gate's record: a rollback marks the release it rolled back from; the gate refuses it, and
the lock, until a person lifts the mark (which is kept, with who and why)."""

from __future__ import annotations

from datetime import timedelta

from rollback.state import StateStore


def test_a_rollback_marks_the_release_it_left_once_and_the_gate_refuses_it_until_allowed(tmp_path):
    store = StateStore(tmp_path)
    assert store.record_restored("shop", "backend", "v1", key="rb-1:record:backend", rolled_back_from="v2", rollback="rb-1", by="ana")
    assert not store.record_restored("shop", "backend", "v1", key="rb-1:record:backend", rolled_back_from="v2", rollback="rb-1", by="x")
    refusal = store.gate_refusal("shop", "backend", "v2")
    assert refusal is not None and refusal.startswith("backend v2 of 'shop' was rolled back by rb-1 (initiated by ana at ")
    assert "rollback release allow -e shop -t backend --version v2 --by NAME --reason WHY" in refusal
    assert store.gate_refusal("shop", "backend", "v3") is None and store.gate_refusal("shop", "frontend", "v2") is None

    mark = store.allow_release("shop", "backend", "v2", by="bo", reason="fixed by config, same build")
    assert mark is not None and mark.rollback == "rb-1"
    assert store.gate_refusal("shop", "backend", "v2") is None
    assert store.allow_release("shop", "backend", "v2", by="bo", reason="again") is None  # nothing left to lift
    kept = store.bad_releases("shop")["backend"]["v2"]
    assert (kept.lifted_by, kept.lift_reason, kept.active) == ("bo", "fixed by config, same build", False)
    assert store.versions("shop", "backend").history[-1]["event"] == "allowed"


def test_a_held_lock_refuses_every_deploy_and_an_expired_one_none(tmp_path):
    store = StateStore(tmp_path)
    assert store.acquire_lock("shop", "rb-2", ttl=timedelta(minutes=5)) is None
    assert store.gate_refusal("shop", "frontend", "v9") == "environment 'shop' is locked by rollback rb-2"
    store.release_lock("shop", "rb-2")
    assert store.gate_refusal("shop", "frontend", "v9") is None
