"""`remind`: queue the reminders that are due (the worker also does this on its schedule)."""

from __future__ import annotations

from cli.common import Context, Parser, Services, Subcommands, command, emit
from links.reminders import send_reminders


def register(commands: Subcommands[Parser]) -> None:
    p = command(
        commands,
        "remind",
        "Queue due reminders (before the due date, before the last link expires); each once.",
        example="python -m links remind --days-before-due 3",
        run=remind,
    )
    p.add_argument("--days-before-due", type=int, default=3, help="remind this many days before the due date (default 3)")
    p.add_argument("--days-before-expiry", type=int, default=3, help="remind when the last link expires within this many days (default 3)")


async def remind(ctx: Context, services: Services) -> None:
    sent = await send_reminders(
        services.sessions,
        ctx.settings,
        days_before_due=ctx.args.days_before_due,
        days_before_link_expiry=ctx.args.days_before_expiry,
    )
    record = {"sent": [{"invoice": n.invoice, "point": n.point, "recipient": n.recipient} for n in sent]}

    def human() -> None:
        for note in sent:
            ctx.console.print(f"Reminder for {note.invoice} ({note.point}) queued to {note.recipient}")
        ctx.console.print(f"{len(sent)} reminder(s) queued.")

    emit(ctx, record, human)
