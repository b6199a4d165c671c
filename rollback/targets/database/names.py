"""Names of what a rollback creates in PostgreSQL (archives, rebuilt tables, retired databases).

Pure (hashlib only), so workflows can derive them too. PostgreSQL cuts identifiers at 63 bytes:
a name built by concatenation and cut would lose what makes it unique (a timestamp, a run), and
a later rollback would find an earlier one's object under the same name. These keep a readable
head and end with a hash of everything that makes them unique.
"""

from __future__ import annotations

import hashlib
import re

MAX_IDENTIFIER = 63


def derived_name(key: str, table: str, what: str) -> str:
    """A name for what a rollback creates: stable (a retry finds its own objects), readable, at most 63 bytes."""
    digest = hashlib.sha256(f"{key}:{table}:{what}".encode()).hexdigest()[:10]
    readable = f"{table.replace('.', '_')}_{what}"[:40]
    return f"rb_{digest}_{readable}"


def bounded_name(readable: str, unique: str) -> str:
    """`readable` ([a-z0-9_] only, cut to fit) then a hash of `unique`: at most 63 bytes, distinct
    for every `unique` however much of `readable` was cut."""
    digest = hashlib.sha256(unique.encode()).hexdigest()[:12]
    head = re.sub(r"[^a-z0-9_]+", "_", readable.lower())[:MAX_IDENTIFIER - len(digest) - 1]
    return f"{head}_{digest}"
