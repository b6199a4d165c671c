"""The `log` channel: one JSON line per notification in `<state_dir>/notifications.jsonl`, and the worker log."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from rollback.payloads import Notification

log = logging.getLogger("rollback.notify")


class LogChannel:
    name = "log"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, note: Notification) -> None:
        record = {"at": datetime.now(timezone.utc).isoformat(), **note.model_dump(mode="json")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        log.info("[%s] %s: %s", note.environment, note.event, note.message)
