"""The deployment lock's lease (rollback/state.py): who may take it over, and when. No server needed:
what Temporal says of the holder is the `checked` argument the lock activity passes."""

from __future__ import annotations

from datetime import timedelta

from rollback.state import StateStore

HOUR = timedelta(hours=1)


def test_a_live_holder_keeps_the_lock_whatever_its_lease(tmp_path):
    store = StateStore(tmp_path)
    assert store.acquire_lock("demo", "rollback-a", ttl=timedelta(0)) is None  # a lease that has already run out
    assert store.acquire_lock("demo", "rollback-b", ttl=HOUR, checked=("rollback-a", True)) == "rollback-a"
    assert store.lock_holder("demo") == "rollback-a"


def test_a_holder_temporal_says_has_ended_is_taken_over_at_once(tmp_path):
    store = StateStore(tmp_path)
    assert store.acquire_lock("demo", "rollback-a", ttl=HOUR) is None
    assert store.acquire_lock("demo", "rollback-b", ttl=HOUR, checked=("rollback-a", False)) is None
    assert store.lock_holder("demo") == "rollback-b"
    assert store.release_lock("demo", "rollback-a") is False, "the old holder cannot release the new one's lock"


def test_when_temporal_cannot_tell_the_lease_decides(tmp_path):
    store = StateStore(tmp_path)
    assert store.acquire_lock("demo", "rollback-a", ttl=HOUR) is None
    assert store.acquire_lock("demo", "rollback-b", ttl=HOUR, checked=("rollback-a", None)) == "rollback-a"
    assert store.acquire_lock("demo", "rollback-b", ttl=HOUR) == "rollback-a", "no word of the holder: its lease holds"
    store.acquire_lock("demo", "rollback-a", ttl=timedelta(0))  # the holder renews with a lease that ends now
    assert store.acquire_lock("demo", "rollback-b", ttl=HOUR, checked=("rollback-a", None)) is None
    assert store.lock_holder("demo") == "rollback-b"


def test_renewing_keeps_the_first_acquisition_and_force_release_says_who_held_it(tmp_path):
    store = StateStore(tmp_path)
    store.acquire_lock("demo", "rollback-a", ttl=HOUR)
    first = store.read("demo").lock
    store.acquire_lock("demo", "rollback-a", ttl=HOUR)
    renewed = store.read("demo").lock
    assert first is not None and renewed is not None
    assert renewed.acquired_at == first.acquired_at and renewed.expires_at >= first.expires_at
    assert store.force_release_lock("demo") == "rollback-a" and store.lock_holder("demo") is None
