"""Durable records the activities keep outside Temporal: versions, locks, effects, trigger replay keys.

One JSON file per environment under the config's `state_dir`, updated under an
exclusive `flock` and replaced atomically, so concurrent activities on one host
never see a torn record. (A multi-host deployment points `state_dir` at shared
storage or swaps this class for a database-backed one; the interface is small.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator


class TargetVersions(BaseModel):
    current: str | None = None
    known_good: str | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)


class LockRecord(BaseModel):
    holder: str
    acquired_at: datetime
    expires_at: datetime


class BadRelease(BaseModel):
    """A release a rollback rolled back from: the deployment gate refuses it until someone lifts the mark."""

    rollback: str = Field(description="the workflow id of the rollback that rolled it back")
    by: str = Field(description="who initiated that rollback")
    at: datetime
    lifted_by: str | None = None
    lifted_at: datetime | None = None
    lift_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.lifted_at is None


class EnvironmentState(BaseModel):
    versions: dict[str, TargetVersions] = Field(default_factory=dict)
    lock: LockRecord | None = None
    # Releases rolled back from, by target and version (kept once lifted, as the record of who allowed it).
    bad_releases: dict[str, dict[str, BadRelease]] = Field(default_factory=dict)
    # Idempotency keys of effects already performed, with what they did.
    effects: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Replay keys of inbound triggers (the API's), by source ("pipeline", "alertmanager"): key -> when it
    # was last received. Kept apart from `effects`, and trimmed by age, not count (see TRIGGER_RETENTION).
    triggers: dict[str, dict[str, datetime]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _triggers_out_of_effects(self) -> "EnvironmentState":
        # Files written before `triggers` existed kept trigger keys in `effects`: move them, so that an
        # alert Alertmanager keeps re-sending is still known after an upgrade (and starts nothing).
        for key, detail in list(self.effects.items()):
            if detail.get("effect") == "trigger":
                del self.effects[key]
                try:
                    at = datetime.fromisoformat(str(detail.get("at")))
                except ValueError:
                    at = _now()
                at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
                self.triggers.setdefault(str(detail.get("source") or "unknown"), {})[key] = at
        return self


HISTORY_LIMIT = 50
# Effects are looked up by the retries of one rollback, so old keys can go.
EFFECTS_LIMIT = 2000
# Trigger replay keys are kept for a day after they were last received, whatever else arrives. They used to
# share the count-trimmed effects journal, where two Alertmanager deliveries of 1,000 alerts pushed out a
# pipeline delivery id signed a minute earlier, which then replayed as a new trigger. A day is far beyond
# the API's signature window (5 minutes: an older pipeline delivery is refused anyway) and beyond
# Alertmanager's repeat_interval (a still-firing alert re-sent every few hours stays known, as each
# sighting renews it).
TRIGGER_RETENTION = timedelta(hours=24)
# The size bound, per source, so that one source cannot push out another's keys: a flood beyond it (ten
# deliveries of 1,000 new alerts within a day) forgets its own oldest keys first. At most ~250 bytes a key.
TRIGGER_KEYS_PER_SOURCE = 10_000


def _now() -> datetime:
    return datetime.now(timezone.utc)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _path(self, environment: str) -> Path:
        return self.state_dir / f"{environment}.json"

    @contextlib.contextmanager
    def _locked(self, environment: str) -> Iterator[EnvironmentState]:
        """Read-modify-write one environment's record under an exclusive lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._path(environment)
        with open(path.with_suffix(".lock"), "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            state = self._load(path)
            yield state
            tmp = path.with_suffix(".tmp")
            tmp.write_text(state.model_dump_json(indent=2))
            os.replace(tmp, path)

    @staticmethod
    def _load(path: Path) -> EnvironmentState:
        try:
            return EnvironmentState.model_validate_json(path.read_text())
        except FileNotFoundError:
            return EnvironmentState()

    def read(self, environment: str) -> EnvironmentState:
        return self._load(self._path(environment))

    # -- versions -----------------------------------------------------------

    def versions(self, environment: str, target: str, seed: TargetVersions | None = None) -> TargetVersions:
        recorded = self.read(environment).versions.get(target)
        return recorded or seed or TargetVersions()

    def record_deploy(self, environment: str, target: str, version: str, *, seed: TargetVersions | None = None) -> TargetVersions:
        """A new release went live: it becomes current, the previous current becomes known-good."""
        with self._locked(environment) as state:
            entry = state.versions.get(target) or (seed.model_copy(deep=True) if seed else TargetVersions())
            if entry.current != version:
                if entry.current is not None:
                    entry.known_good = entry.current
                entry.current = version
                entry.history = (entry.history + [{"event": "deployed", "version": version, "at": _now().isoformat()}])[-HISTORY_LIMIT:]
            state.versions[target] = entry
            return entry

    def record_restored(self, environment: str, target: str, version: str, *, key: str, seed: TargetVersions | None = None,
                        rolled_back_from: str | None = None, rollback: str = "", by: str = "") -> bool:
        """A rollback restored `version`: current and known-good; the release it rolled back from is marked bad
        for the deployment gate. Once per key."""
        with self._locked(environment) as state:
            if key in state.effects:
                return False
            entry = state.versions.get(target) or (seed.model_copy(deep=True) if seed else TargetVersions())
            entry.current = version
            entry.known_good = version
            entry.history = (entry.history + [{"event": "restored", "version": version, "at": _now().isoformat(), "by": key}])[-HISTORY_LIMIT:]
            state.versions[target] = entry
            if rolled_back_from and rolled_back_from != version:
                state.bad_releases.setdefault(target, {})[rolled_back_from] = BadRelease(rollback=rollback or key, by=by, at=_now())
            state.effects[key] = {"effect": "record_restored", "target": target, "version": version}
            _trim(state)
            return True

    # -- the deployment gate --------------------------------------------------

    def gate_refusal(self, environment: str, target: str, version: str) -> str | None:
        """Why a deploy of `version` must not proceed now (the lock held, the release rolled back from); None: it may."""
        state = self.read(environment)
        if state.lock is not None and state.lock.expires_at > _now():
            return f"environment {environment!r} is locked by rollback {state.lock.holder}"
        mark = state.bad_releases.get(target, {}).get(version)
        if mark is not None and mark.active:
            return (f"{target} {version} of {environment!r} was rolled back by {mark.rollback} (initiated by {mark.by or 'unknown'} "
                    f"at {mark.at:%Y-%m-%d %H:%M:%S} UTC); lift the mark with: rollback release allow -e {environment} "
                    f"-t {target} --version {version} --by NAME --reason WHY")
        return None

    def bad_releases(self, environment: str) -> dict[str, dict[str, BadRelease]]:
        return self.read(environment).bad_releases

    def allow_release(self, environment: str, target: str, version: str, *, by: str, reason: str) -> BadRelease | None:
        """Lift the mark on a release (kept, with who lifted it and why); None when it was not marked."""
        with self._locked(environment) as state:
            mark = state.bad_releases.get(target, {}).get(version)
            if mark is None or not mark.active:
                return None
            mark.lifted_by, mark.lifted_at, mark.lift_reason = by, _now(), reason
            entry = state.versions.get(target) or TargetVersions()
            entry.history = (entry.history + [{"event": "allowed", "version": version, "at": _now().isoformat(), "by": by,
                                               "reason": reason}])[-HISTORY_LIMIT:]
            state.versions[target] = entry
            return mark

    # -- the deployment lock -------------------------------------------------

    def lock_holder(self, environment: str) -> str | None:
        lock = self.read(environment).lock
        return lock.holder if lock else None

    def acquire_lock(self, environment: str, holder: str, *, ttl: timedelta, checked: tuple[str, bool | None] | None = None) -> str | None:
        """Take the environment's lock for `holder`. Returns None on success, else the current holder.

        Re-acquiring by the same holder renews the lease (idempotent). Someone
        else's lock is taken over when Temporal says that workflow is no longer
        running (`checked` = (that holder, False): terminated, or its history is
        gone), or, when Temporal cannot tell (None), once the lease has expired.
        """
        with self._locked(environment) as state:
            lock = state.lock
            now = _now()
            if lock and lock.holder != holder:
                running = checked[1] if checked and checked[0] == lock.holder else None
                stale = (not running) if running is not None else lock.expires_at <= now
                if not stale:
                    return lock.holder
            acquired = lock.acquired_at if lock and lock.holder == holder else now
            state.lock = LockRecord(holder=holder, acquired_at=acquired, expires_at=now + ttl)
            return None

    def release_lock(self, environment: str, holder: str) -> bool:
        with self._locked(environment) as state:
            if state.lock and state.lock.holder == holder:
                state.lock = None
                return True
            return False

    def force_release_lock(self, environment: str) -> str | None:
        """Operator escape hatch (`rollback unlock`): returns who held it."""
        with self._locked(environment) as state:
            holder = state.lock.holder if state.lock else None
            state.lock = None
            return holder

    # -- effects journal -----------------------------------------------------

    def effect_done(self, environment: str, key: str) -> dict[str, Any] | None:
        return self.read(environment).effects.get(key)

    def record_effect(self, environment: str, key: str, detail: dict[str, Any]) -> bool:
        """Remember that the effect named by `key` happened. False if it already had."""
        with self._locked(environment) as state:
            if key in state.effects:
                return False
            state.effects[key] = detail
            _trim(state)
            return True

    # -- trigger replay keys (the inbound API) ---------------------------------

    def triggers_seen(self, environment: str, source: str, keys: list[str]) -> list[str]:
        """Those of `keys` received from `source` within TRIGGER_RETENTION. Each is marked received again
        now: a key stays known for as long as it keeps arriving."""
        with self._locked(environment) as state:
            known = _trim_triggers(state.triggers.setdefault(source, {}))
            seen = [key for key in keys if key in known]
            for key in seen:
                known[key] = _now()
            return seen

    def record_triggers(self, environment: str, source: str, keys: list[str]) -> None:
        """Remember `keys` as received from `source` now (one write for the whole delivery)."""
        with self._locked(environment) as state:
            known = state.triggers.setdefault(source, {})
            now = _now()
            for key in keys:
                known[key] = now
            _trim_triggers(known)


def _trim(state: EnvironmentState) -> None:
    for stale in list(state.effects)[:-EFFECTS_LIMIT]:
        del state.effects[stale]


def _trim_triggers(known: dict[str, datetime]) -> dict[str, datetime]:
    """Keys younger than TRIGGER_RETENTION, at most the newest TRIGGER_KEYS_PER_SOURCE (trimmed in place)."""
    oldest = _now() - TRIGGER_RETENTION
    kept = sorted(((at, key) for key, at in known.items() if at > oldest))[-TRIGGER_KEYS_PER_SOURCE:]
    known.clear()
    known.update((key, at) for at, key in kept)
    return known
