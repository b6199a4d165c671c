"""Stakeholder notifications through pluggable channels.

A channel is anything with `name` and `async send(message) -> None`. The `log`
channel (a JSON-lines file beside the state plus the worker log) is built in;
Slack and email plug in the same way. Each notification carries an idempotency
key (workflow id + event), recorded once delivered, so a retried or re-run
activity never notifies twice.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from temporalio import activity

from rollback.config import ConfigSource
from rollback.payloads import Notification, NotifyResult
from rollback.state import StateStore

log = logging.getLogger("rollback.notify")


class Channel(Protocol):
    name: str

    async def send(self, note: Notification) -> None: ...


class LogChannel:
    """Appends one JSON line per notification to `<state_dir>/notifications.jsonl`."""

    name = "log"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, note: Notification) -> None:
        record = {"at": datetime.now(timezone.utc).isoformat(), **note.model_dump(mode="json")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        log.info("[%s] %s: %s", note.environment, note.event, note.message)


class Notifier:
    def __init__(self, config: ConfigSource, extra_channels: list[Channel] | None = None) -> None:
        self.config = config
        self.extra = {c.name: c for c in extra_channels or []}

    def channels(self) -> dict[str, Channel]:
        state_dir = self.config.get().state_dir
        return {"log": LogChannel(state_dir / "notifications.jsonl"), **self.extra}

    @activity.defn(name="notify.send")
    async def send(self, note: Notification) -> NotifyResult:
        config = self.config.get()
        if note.environment not in config.environments:
            # A request for an unknown environment: say so in the log, create no state for it.
            log.warning("[%s] %s: %s", note.environment, note.event, note.message)
            return NotifyResult(delivered=[], skipped={"all": f"unknown environment {note.environment!r}"})
        store = StateStore(config.state_dir)
        available = self.channels()
        delivered: list[str] = []
        skipped: dict[str, str] = {}
        # The log channel always records; the others are what the config asks for.
        for name in dict.fromkeys(["log", *config.rollback.notification_channels]):
            channel = available.get(name)
            if channel is None:
                skipped[name] = "channel not configured on this worker"
                continue
            key = f"{note.key}:{name}"
            if store.effect_done(note.environment, key):
                delivered.append(name)
                continue
            await channel.send(note)
            store.record_effect(note.environment, key, {"effect": "notify", "channel": name, "event": note.event})
            delivered.append(name)
        return NotifyResult(delivered=delivered, skipped=skipped)
