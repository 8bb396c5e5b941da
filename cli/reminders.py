"""`remind`: queue the reminders that are due (the worker also does this on its schedule)."""

from __future__ import annotations

import argparse

from cli.common import Context, Parser, Services, Subcommands, command, emit
from emails.messages import Kind
from links.reminders import send_reminders
from plumbing.settings import parse_reminder_schedule


def _schedule(value: str) -> tuple[int, ...]:
    try:
        return parse_reminder_schedule(value, "--schedule")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(commands: Subcommands[Parser]) -> None:
    p = command(
        commands,
        "remind",
        "Queue due reminders: at the latest point of the schedule reached (days relative to the due date) and before the "
        "last link expires; each point once per invoice. An invoice that was never emailed gets the invoice email instead "
        "(a reminder is never the first contact); after the due date the reminder says since when it is overdue.",
        example="python -m links remind --schedule=-3,0,7,14",
        run=remind,
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--schedule",
        type=_schedule,
        help="days relative to the due date, e.g. --schedule=-3,0,7,14 (write it with '=': it starts with a minus); "
        "default REMINDER_SCHEDULE",
    )
    when.add_argument("--days-before-due", type=int, help="the older form: one point, this many days before the due date")
    p.add_argument(
        "--days-before-expiry",
        type=int,
        help="remind when the last link expires within this many days (default REMINDER_DAYS_BEFORE_EXPIRY)",
    )


async def remind(ctx: Context, services: Services) -> None:
    a = ctx.args
    if a.days_before_due is not None:
        schedule: tuple[int, ...] = (-a.days_before_due,)
    else:
        schedule = a.schedule if a.schedule is not None else ctx.settings.reminder_schedule
    sent = await send_reminders(
        services.sessions,
        ctx.settings,
        schedule=schedule,
        days_before_link_expiry=a.days_before_expiry if a.days_before_expiry is not None else ctx.settings.reminder_days_before_expiry,
    )
    record = {
        "schedule": list(schedule),
        "sent": [{"invoice": n.invoice, "point": n.point, "recipient": n.recipient, "kind": n.kind} for n in sent],
    }

    def human() -> None:
        for note in sent:
            if note.kind == Kind.INVOICE:
                ctx.console.print(f"Invoice {note.invoice} had never been sent: invoice email ({note.point}) queued to {note.recipient}")
            else:
                ctx.console.print(f"Reminder for {note.invoice} ({note.point}) queued to {note.recipient}")
        ctx.console.print(f"{len(sent)} email(s) queued.")

    emit(ctx, record, human)
