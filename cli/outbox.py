"""`outbox …`: see and retry queued email."""

from __future__ import annotations

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, table
from emails.outbox import outbox_counts, recent_dead, requeue
from plumbing import audit
from plumbing.db import utcnow


def register(commands: Subcommands[Parser]) -> None:
    outbox = command_group(commands, "outbox", "see and retry queued email")
    command(
        outbox,
        "status",
        "Counts by status, oldest pending age, recent failures.",
        example="python -m links outbox status",
        run=status,
    )
    p = command(
        outbox,
        "retry",
        "Make waiting messages due now; with --dead, re-queue failed ones too.",
        example="python -m links outbox retry --dead",
        run=retry,
    )
    p.add_argument("--dead", action="store_true")


async def status(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        counts = await outbox_counts(session)
        dead = await recent_dead(session)
    age = (utcnow() - counts.oldest_pending_at).total_seconds() if counts.oldest_pending_at else None
    record = {
        "pending": counts.pending,
        "sent": counts.sent,
        "dead": counts.dead,
        "oldest_pending_age_seconds": age,
        "recent_dead": [
            {"id": m.id, "kind": m.kind, "recipient": m.recipient, "error": m.last_error, "attempts": m.attempts} for m in dead
        ],
    }

    def human() -> None:
        ctx.console.print(f"pending {counts.pending}, sent {counts.sent}, dead {counts.dead}")
        if age is not None:
            ctx.console.print(f"oldest pending message waiting {age:.0f} s")
        if dead:
            out = table("Id", "Kind", "Recipient", "Attempts", "Reason")
            for m in dead:
                out.add_row(str(m.id), m.kind, m.recipient, str(m.attempts), m.last_error or "")
            ctx.console.print(out)

    emit(ctx, record, human)


async def retry(ctx: Context, services: Services) -> None:
    async with services.sessions.begin() as session:
        count = await requeue(session, include_dead=ctx.args.dead)
        audit.record(session, ctx.actor, "outbox.retry", "outbox", count=count, dead=ctx.args.dead)
    emit(ctx, {"requeued": count}, lambda: ctx.console.print(f"Re-queued {count} message(s); the worker sends them now."))
