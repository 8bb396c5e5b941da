"""`migrate`: bring the database schema up to date (alembic upgrade head)."""

from __future__ import annotations

from cli.common import Context, Parser, Subcommands, command, emit
from plumbing.db import migrate_sync


def register(commands: Subcommands[Parser]) -> None:
    command(
        commands,
        "migrate",
        "Bring the database schema up to date (alembic upgrade head).",
        example="python -m links migrate",
        run_sync=migrate,
    )


def migrate(ctx: Context) -> None:
    """Runs without the container: the schema may not exist yet."""
    migrate_sync(ctx.settings.database_url)
    emit(ctx, {"migrated": True}, lambda: ctx.console.print("Database schema is up to date."))
