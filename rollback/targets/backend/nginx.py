"""The nginx router: the upstream file that decides where traffic goes.

We own one small file (an `upstream` block) that the site's nginx.conf includes.
Changing traffic is: render the desired file, write it atomically, validate the
whole configuration, reload gracefully. Rendering is declarative (the desired set
of servers, never a toggle), so applying the same state twice changes nothing and
does not reload.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

COMMAND_TIMEOUT_SECONDS = 30


class RouterError(RuntimeError):
    """nginx refused the configuration or could not be reloaded."""


@dataclass(frozen=True)
class UpstreamServer:
    address: str
    down: bool = False


@dataclass(frozen=True)
class NginxRouter:
    upstream_file: Path
    upstream_name: str
    reload_command: tuple[str, ...]
    test_command: tuple[str, ...] = ()

    def render(self, servers: list[UpstreamServer]) -> str:
        if not any(not s.down for s in servers):
            raise RouterError("refusing to write an upstream with no live server")
        lines = ["# managed by the rollback orchestrator; do not edit by hand", f"upstream {self.upstream_name} {{"]
        for server in servers:
            # max_fails=0: nginx must not mark a server failed on its own; the
            # orchestrator decides, and proxy_next_upstream retries transient errors.
            flags = " down" if server.down else ""
            lines.append(f"    server {server.address} max_fails=0{flags};")
        lines += ["    keepalive 32;", "}", ""]
        return "\n".join(lines)

    def current(self) -> list[UpstreamServer]:
        """The servers the upstream file names now, in order."""
        try:
            text = self.upstream_file.read_text()
        except FileNotFoundError:
            return []
        servers = []
        for raw in text.splitlines():
            parts = raw.strip().rstrip(";").split()
            if len(parts) >= 2 and parts[0] == "server":
                servers.append(UpstreamServer(address=parts[1], down="down" in parts[2:]))
        return servers

    def apply(self, servers: list[UpstreamServer]) -> bool:
        """Make the upstream be exactly `servers`. Returns True if nginx was reloaded."""
        desired = self.render(servers)
        try:
            if self.upstream_file.read_text() == desired:
                return False
        except FileNotFoundError:
            pass
        previous = self.upstream_file.read_text() if self.upstream_file.exists() else None
        self._write(desired)
        try:
            if self.test_command:
                _run(self.test_command, "nginx configuration test")
            _run(self.reload_command, "nginx reload")
        except RouterError:
            # Leave the file as nginx last accepted it, so a later reload by
            # anyone does not pick up a configuration we could not apply.
            if previous is not None:
                self._write(previous)
            raise
        return True

    def _write(self, text: str) -> None:
        tmp = self.upstream_file.with_suffix(self.upstream_file.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.upstream_file)


def _run(command: tuple[str, ...], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RouterError(f"{what} failed: {err}") from err
    if done.returncode != 0:
        raise RouterError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
