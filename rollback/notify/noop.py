"""The `noop` channel: accepts every notification and delivers it nowhere.

For environments that want nothing beyond the log (`notification_channels: [noop]`), and for
tests that count deliveries without a destination.
"""

from __future__ import annotations

from rollback.payloads import Notification


class NoopChannel:
    name = "noop"

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def send(self, note: Notification) -> None:
        self.sent.append(note)
