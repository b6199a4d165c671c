"""Notification channels: one interface, one module per channel, a no-op, a factory.

A channel delivers one Notification somewhere (a file, Slack, a mailbox). It need not be
idempotent: activities/notify.py records each delivery under the notification's key and
channel, so a retried activity never delivers twice.
"""

from __future__ import annotations

from typing import Protocol

from rollback.payloads import Notification


class Channel(Protocol):
    name: str

    async def send(self, note: Notification) -> None: ...
