"""``prefect`` CLI whose server begins every SQLite transaction with ``BEGIN IMMEDIATE``.

    python -m mergeflow.services.prefect_sqlite server start --host H --port P

Prefect begins its server's transactions ``DEFERRED`` on SQLite unless the caller asks
for a row lock. A deferred transaction that reads, then writes while another connection
has written since its read, fails at once with "database is locked": SQLite cannot
upgrade a stale snapshot, and its busy timeout does not apply. Under load (many fold
runs inserting task runs, taking concurrency slots, writing events) that is Prefect's
own task-run recorder and event writer against its API. ``IMMEDIATE`` takes the write
lock when the transaction begins, so a second writer waits for the first (Prefect's
busy timeout, 60 s) instead of failing. Reads outside transactions are unchanged.

The embedded stack starts the Prefect server this way only on SQLite
(docs/reliability.md, Load); PostgreSQL runs ``prefect`` itself.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from prefect.server.database.configurations import AioSqliteConfiguration
from prefect.server.database.dependencies import set_database_config
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction


class ImmediateSqliteConfiguration(AioSqliteConfiguration):
    """Prefect's SQLite configuration, every transaction begun ``IMMEDIATE``."""

    @asynccontextmanager
    async def begin_transaction(
        self, session: AsyncSession, with_for_update: bool = False
    ) -> AsyncGenerator[AsyncSessionTransaction, None]:
        """Prefect's own, as if every caller asked for a row lock (its ``IMMEDIATE`` mode)."""
        async with super().begin_transaction(session, with_for_update=True) as transaction:
            yield transaction


def main() -> None:
    """Install the configuration for ``PREFECT_API_DATABASE_CONNECTION_URL``, run the CLI."""
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if not url.startswith("sqlite"):
        raise SystemExit(
            f"prefect_sqlite: PREFECT_API_DATABASE_CONNECTION_URL must be a SQLite URL, got {url!r}"
        )
    set_database_config(ImmediateSqliteConfiguration(connection_url=url))
    from prefect.cli import app

    app()


if __name__ == "__main__":
    main()
