"""`report …` (usage, aging) and `audit`: read-only views for finance."""

from __future__ import annotations

from datetime import date

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, table
from payments.reports import AGING_BUCKETS, aging, audit_entries, usage
from plumbing.db import utcnow
from plumbing.i18n import format_money


def register(commands: Subcommands[Parser]) -> None:
    report = command_group(commands, "report", "usage and aging reports", metavar="REPORT")
    p = command(
        report,
        "usage",
        "Link opens, payments and emails by hour of day and day of month, with the peak hour.",
        example="python -m links report usage --days 90",
        run=report_usage,
    )
    p.add_argument("--days", type=int, default=30)
    command(
        report,
        "aging",
        "Open invoices by days overdue, with totals per currency.",
        example="python -m links report aging",
        run=report_aging,
    )

    p = command(
        commands,
        "audit",
        "Show the audit trail: who did what, when.",
        example="python -m links audit --invoice INV-000001",
        run=show_audit,
    )
    p.add_argument("--invoice", help="only entries about this invoice number")
    p.add_argument("--limit", type=int, default=200)


async def report_usage(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        report = await usage(session, ctx.args.days, utcnow())
    peak = report.peak_hour()
    record = {"days": report.days, "by_hour_utc": report.by_hour, "by_day_of_month": report.by_day, "peak_hour_utc": peak}
    hours = [f"{h:02d}:00" for h in range(24)]

    def human() -> None:
        ctx.console.print(f"Usage over the last {report.days} days (hours in UTC)")
        _bars(ctx, "Link opens by hour of day", hours, report.by_hour["opens"])
        _bars(ctx, "Payments by hour of day", hours, report.by_hour["payments"])
        _bars(ctx, "Emails sent by hour of day", hours, report.by_hour["emails"])
        _bars(ctx, "Link opens by day of month", [f"day {d:2d}" for d in range(1, 32)], report.by_day["opens"])
        if peak is None:
            ctx.console.print("No link opens in this period.")
        else:
            ctx.console.print(f"Peak hour for link opens: {peak:02d}:00-{peak:02d}:59 UTC ({report.by_hour['opens'][peak]} opens).")

    emit(ctx, record, human)


def _bars(ctx: Context, title: str, labels: list[str], counts: list[int], width: int = 40) -> None:
    top = max(counts) or 1
    ctx.console.print(f"\n[bold]{title}[/bold]")
    for label, count in zip(labels, counts, strict=True):
        if count or title.endswith("hour of day"):
            ctx.console.print(f"  {label}  {'█' * round(count / top * width):<{width}} {count}")


async def report_aging(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        buckets = await aging(session, date.today())
    record = {
        bucket: {cur: {"count": n, "total": t, "total_formatted": format_money(t, cur)} for cur, (n, t) in row.items()}
        for bucket, row in buckets.items()
    }

    def human() -> None:
        out = table("Overdue", "Currency", "Invoices", "Outstanding")
        for name, _, _ in AGING_BUCKETS:
            for currency, (count, total) in sorted(buckets[name].items()):
                out.add_row(name, currency.upper(), str(count), format_money(total, currency))
        ctx.console.print(out)

    emit(ctx, record, human)


async def show_audit(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        entries = await audit_entries(session, ctx.args.invoice, ctx.args.limit)
    record = {"entries": [{"at": e.at, "actor": e.actor, "action": e.action, "subject": e.subject, "details": e.details} for e in entries]}

    def human() -> None:
        out = table("When (UTC)", "Who", "What", "Subject", "Details")
        for e in entries:
            details = ", ".join(f"{k}={v}" for k, v in (e.details or {}).items())
            out.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject, details)
        ctx.console.print(out)

    emit(ctx, record, human)
