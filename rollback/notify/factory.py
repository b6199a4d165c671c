"""Which channels a worker can deliver through, by name."""

from __future__ import annotations

from rollback.config import AppConfig
from rollback.notify import Channel
from rollback.notify.log import LogChannel
from rollback.notify.noop import NoopChannel


def channels(config: AppConfig) -> dict[str, Channel]:
    """Every channel this version can build from the config. `log` is always there; a channel named in
    `notification_channels` but missing here is reported as skipped by the notify activity."""
    built: list[Channel] = [LogChannel(config.state_dir / "notifications.jsonl"), NoopChannel()]
    return {channel.name: channel for channel in built}
