"""The notify activity: a Notification delivered once through each channel the config asks for.

The channels are rollback/notify/ (one module each, built by its factory). The `log` channel
always records. Each notification carries an idempotency key (workflow id + event), recorded
per channel once delivered, so a retried or re-run activity never notifies twice.
"""

from __future__ import annotations

import logging

from temporalio import activity

from rollback.config import ConfigSource
from rollback.notify import Channel
from rollback.notify.factory import channels
from rollback.payloads import SEND_NOTIFICATION, Notification, NotifyResult
from rollback.state import StateStore

log = logging.getLogger("rollback.notify")


class Notifier:
    def __init__(self, config: ConfigSource, extra_channels: list[Channel] | None = None) -> None:
        self.config = config
        self.extra = {c.name: c for c in extra_channels or []}

    def channels(self) -> dict[str, Channel]:
        return {**channels(self.config.get()), **self.extra}

    @activity.defn(name=SEND_NOTIFICATION)
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
