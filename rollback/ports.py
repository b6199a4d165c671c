"""Loopback ports for servers the product starts itself (a scratch PostgreSQL for point-in-time
recovery) and, through the demo stack and the tests, for everything else they start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()
# (index, count): this process hands out only the ports p with p % count == index, so that several
# processes starting servers on one machine at once (parallel test workers) never pick the same one.
_share = (0, 1)


def share_ports(index: int, count: int) -> None:
    """Take share `index` of `count` of the candidate ports (see _share)."""
    global _share
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count} does not exist")
    _share = (index, count)


class NoFreePort(RuntimeError):
    """Every candidate port was taken."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers use, so a port in TIME_WAIT after a stop counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nobody listens on right now, below the kernel's ephemeral range, never the same twice
    in one process. (A port the OS picks for bind(0) comes from the ephemeral range, which is also
    where outgoing connections take their local ports: one could take it before our server binds.)"""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    index, count = _share
    start = max(1024, low - 12000)
    candidates = range(start + (index - start) % count, low, count)
    for _ in range(500):
        port = random.choice(candidates)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    raise NoFreePort(f"no free port between {candidates.start} and {candidates.stop - 1}")
