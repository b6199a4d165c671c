"""The demo application's write load: new orders (and now and then a customer), continuously.

`python -m rollback.dev.writer` with DEMO_DATABASE_URL set. It only uses columns every
schema revision of the demo has, keeps going through errors (a rollback's short locks,
a restart of the database), and prints a line per 100 rows so its progress is visible.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

import asyncpg

INTERVAL_SECONDS = 0.05


async def write_forever(dsn: str) -> None:
    written = failures = 0
    conn: asyncpg.Connection | None = None
    while True:
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": "demo-writer"})
            if written % 20 == 0:
                await conn.execute("INSERT INTO customers (name) VALUES ($1)", f"new customer {written}", timeout=5)
            customer = await conn.fetchval("SELECT id FROM customers ORDER BY id DESC LIMIT 1 OFFSET $1",
                                           random.randint(0, 50), timeout=5)
            await conn.execute("INSERT INTO orders (customer_id, amount) VALUES ($1, $2)", customer,
                               round(random.uniform(1, 500), 2), timeout=5)
            written += 1
            if written % 100 == 0:
                print(f"writer: {written} orders written, {failures} failed attempts", flush=True)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as err:
            failures += 1
            print(f"writer: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            if conn is not None and not conn.is_closed():
                await conn.close()
            conn = None
            await asyncio.sleep(0.5)
        await asyncio.sleep(INTERVAL_SECONDS)


def main() -> None:
    dsn = os.environ.get("DEMO_DATABASE_URL")
    if not dsn:
        print("writer: set DEMO_DATABASE_URL", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(write_forever(dsn))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
