"""The finance CLI: `python -m links …`. Thin: parse, call a service, print. Every command takes --json.

Exit codes: 0 ok, 1 user error (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from i18n import MoneyError, format_money
from settings import ConfigError, Settings

EPILOG_EXAMPLES = {
    "customer add": 'python -m links customer add --email ann@example.com --name "Ann Lee" --verified',
    "customer show": "python -m links customer show ann@example.com",
    "customer verify": "python -m links customer verify ann@example.com",
    "customer update": "python -m links customer update ann@example.com --email ann.lee@example.org",
    "remind": "python -m links remind --days-before-due 3",
    "invoice create": (
        'python -m links invoice create --customer ann@example.com --amount 120.50 --currency eur --description "Consulting" --send'
    ),
    "invoice list": "python -m links invoice list --status open",
    "invoice show": "python -m links invoice show INV-000001",
    "invoice void": "python -m links invoice void INV-000001",
    "link issue": "python -m links link issue INV-000001 --ttl-days 14",
    "link resend": "python -m links link resend INV-000001",
    "link revoke": "python -m links link revoke INV-000001",
    "reconcile": "python -m links reconcile --json",
    "import": "python -m links import samples/invoices.csv --send",
    "export": "python -m links export --since 2026-01-01 --format csv > invoices.csv",
    "report usage": "python -m links report usage --days 90",
    "report aging": "python -m links report aging",
    "audit": "python -m links audit --invoice INV-000001",
    "outbox status": "python -m links outbox status",
    "outbox retry": "python -m links outbox retry --dead",
    "migrate": "python -m links migrate",
}


class UserError(Exception):
    """Something the operator can fix; printed as one line on stderr, exit code 1."""


@dataclass
class Context:
    settings: Settings
    args: argparse.Namespace
    console: Console

    @property
    def actor(self) -> str:
        return f"cli:{self.args.actor or _os_user()}"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (use YYYY-MM-DD)") from None


# --- output ------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def emit(ctx: Context, result: dict[str, Any], human: Callable[[], None]) -> None:
    if ctx.args.json:
        print(json.dumps(_jsonable(result), indent=2, ensure_ascii=False))
    else:
        human()


def _table(*columns: str) -> Table:
    table = Table(*columns, show_edge=False, header_style="bold")
    return table


# --- runtime -----------------------------------------------------------------------------------------


class Runtime:
    """Engine, sessions and the Stripe gateway for one command."""

    def __init__(self, settings: Settings) -> None:
        from db import create_engine, create_session_factory
        from payments.gateway import StripeGateway

        self.engine = create_engine(settings.database_url)
        self.sessions = create_session_factory(self.engine)
        self.gateway = StripeGateway(settings)

    async def close(self) -> None:
        await self.engine.dispose()


def invoice_record(invoice: Any, customer: Any | None = None) -> dict[str, Any]:
    record = {
        "id": str(invoice.id),
        "number": invoice.number,
        "status": invoice.status,
        "currency": invoice.currency,
        "amount_due": invoice.amount_due,
        "amount_paid": invoice.amount_paid,
        "amount_refunded": invoice.amount_refunded,
        "amount_due_formatted": format_money(invoice.amount_due, invoice.currency),
        "description": invoice.description,
        "due_date": invoice.due_date,
        "needs_attention": invoice.needs_attention,
        "created_at": invoice.created_at,
        "paid_at": invoice.paid_at,
    }
    if customer is not None:
        record["customer"] = customer.email
        record["customer_name"] = customer.name
    return record


def customer_record(customer: Any) -> dict[str, Any]:
    return {
        "id": str(customer.id),
        "email": customer.email,
        "name": customer.name,
        "locale": customer.locale,
        "verified": customer.email_verified_at is not None,
        "email_verified_at": customer.email_verified_at,
        "email_verified_by": customer.email_verified_by,
        "stripe_customer_id": customer.stripe_customer_id,
        "address": customer.address_lines,
        "email_undeliverable_at": customer.email_undeliverable_at,
        "email_undeliverable_reason": customer.email_undeliverable_reason,
        "created_at": customer.created_at,
    }


# --- commands ----------------------------------------------------------------------------------------


async def cmd_customer_add(ctx: Context, rt: Runtime) -> None:
    from links import lifecycle, service

    a = ctx.args
    email = service.normalize_email(a.email)
    async with rt.sessions() as session:
        if await _exists_customer(session, email):
            raise UserError(f"a customer with email {email} already exists")
    stripe_id = a.stripe_customer or await rt.gateway.create_customer(email, a.name)
    async with rt.sessions.begin() as session:
        customer = await service.add_customer(
            session,
            email=email,
            name=a.name,
            actor=ctx.actor,
            locale=a.locale,
            stripe_customer_id=stripe_id,
            verified=a.verified,
            address=_address(a),
        )
        if not a.verified:
            lifecycle.request_verification(session, ctx.settings, customer, actor=ctx.actor)
    if stripe_id:
        from payments.service import sync_profiles

        await _sync_quietly(ctx, lambda: sync_profiles(rt.sessions, rt.gateway, customer.id))
    state = "verified (attested)" if a.verified else "not verified yet: a confirmation email is on its way"
    emit(
        ctx, customer_record(customer), lambda: ctx.console.print(f"Added customer {customer.email}, {state}. Stripe customer {stripe_id}.")
    )


ADDRESS_FIELDS = ("address_line1", "address_line2", "postal_code", "city", "country")


def _address(args: argparse.Namespace) -> dict[str, str]:
    """Billing address options given on the command line (shown prefilled on the pay page)."""
    address = {f: str(getattr(args, f)).strip() for f in ADDRESS_FIELDS if getattr(args, f, None)}
    if "country" in address:
        if len(address["country"]) != 2 or not address["country"].isalpha():
            raise UserError("--country takes a two-letter code, e.g. DE")
        address["country"] = address["country"].upper()
    return address


def _address_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address-line1", help="billing address, first line")
    parser.add_argument("--address-line2", help="billing address, second line")
    parser.add_argument("--postal-code")
    parser.add_argument("--city")
    parser.add_argument("--country", help="two-letter country code, e.g. DE")


async def _exists_customer(session: Any, email: str) -> bool:
    from sqlalchemy import select

    from links.models import Customer

    return (await session.execute(select(Customer.id).where(Customer.email == email))).first() is not None


async def cmd_customer_show(ctx: Context, rt: Runtime) -> None:
    from sqlalchemy import select

    from links import service
    from payments.models import PaymentProfile

    async with rt.sessions() as session:
        customer = await service.find_customer(session, ctx.args.email)
        profiles = (await session.execute(select(PaymentProfile).where(PaymentProfile.customer_id == customer.id))).scalars().all()
    record = customer_record(customer)
    record["payment_profiles"] = [
        {
            "payment_method": p.stripe_payment_method_id,
            "brand": p.brand,
            "last4": p.last4,
            "exp_month": p.exp_month,
            "exp_year": p.exp_year,
            "default": p.is_default,
        }
        for p in profiles
    ]

    def human() -> None:
        table = _table("Field", "Value")
        table.add_row("Email", customer.email)
        table.add_row("Name", customer.name)
        verified = (
            f"yes, {customer.email_verified_at:%Y-%m-%d %H:%M} UTC ({customer.email_verified_by})" if customer.email_verified_at else "no"
        )
        table.add_row("Verified", verified)
        if customer.email_undeliverable_at:
            table.add_row("Undeliverable", customer.email_undeliverable_reason or "yes")
        table.add_row("Stripe customer", customer.stripe_customer_id or "-")
        table.add_row("Locale", customer.locale or "-")
        for p in profiles:
            expiry = f" exp {p.exp_month:02d}/{p.exp_year}" if p.exp_month and p.exp_year else ""
            table.add_row("Saved card", f"{p.brand.title()} •••• {p.last4}{expiry}{' (default)' if p.is_default else ''}")
        ctx.console.print(table)

    emit(ctx, record, human)


async def cmd_customer_verify(ctx: Context, rt: Runtime) -> None:
    from links import lifecycle, service

    async with rt.sessions.begin() as session:
        customer = await service.find_customer(session, ctx.args.email)
        if customer.email_verified_at is not None:
            raise UserError(f"{customer.email} is already verified")
        lifecycle.request_verification(session, ctx.settings, customer, actor=ctx.actor)
    emit(ctx, customer_record(customer), lambda: ctx.console.print(f"Confirmation email queued for {customer.email}."))


async def cmd_customer_update(ctx: Context, rt: Runtime) -> None:
    import audit
    from i18n import normalize_locale
    from links import lifecycle, service

    a = ctx.args
    async with rt.sessions.begin() as session:
        customer = await service.find_customer(session, a.email)
        if a.name:
            customer.name = a.name.strip()
        if a.locale:
            customer.locale = normalize_locale(a.locale)
        address = _address(a)
        for field_name, value in address.items():
            setattr(customer, field_name, value)
        if a.name or a.locale or address:
            audit.record(session, ctx.actor, "customer.update", f"customer:{customer.email}", name=a.name, locale=a.locale, **address)
        if a.new_email:
            await lifecycle.change_email(session, ctx.settings, customer, a.new_email, actor=ctx.actor)
    note = " The new address must be confirmed before anything is sent to it." if a.new_email else ""
    emit(ctx, customer_record(customer), lambda: ctx.console.print(f"Updated customer {customer.email}.{note}"))


async def cmd_remind(ctx: Context, rt: Runtime) -> None:
    from links import lifecycle

    sent = await lifecycle.send_reminders(
        rt.sessions, ctx.settings, days_before_due=ctx.args.days_before_due, days_before_link_expiry=ctx.args.days_before_expiry
    )
    record = {"sent": [{"invoice": n.invoice, "point": n.point, "recipient": n.recipient} for n in sent]}

    def human() -> None:
        for note in sent:
            ctx.console.print(f"Reminder for {note.invoice} ({note.point}) queued to {note.recipient}")
        ctx.console.print(f"{len(sent)} reminder(s) queued.")

    emit(ctx, record, human)


async def cmd_invoice_create(ctx: Context, rt: Runtime) -> None:
    from links import service
    from payments.service import sync_profiles

    a = ctx.args
    async with rt.sessions() as session:
        customer = await service.find_customer(session, a.customer)
    if a.send and customer.stripe_customer_id:
        await _sync_quietly(ctx, lambda: sync_profiles(rt.sessions, rt.gateway, customer.id))
    async with rt.sessions.begin() as session:
        customer = await service.find_customer(session, a.customer)
        invoice = await service.create_invoice(
            session,
            customer=customer,
            amount=a.amount,
            currency=a.currency,
            description=a.description,
            actor=ctx.actor,
            due_date=a.due,
            number=a.number,
        )
        issued = (
            await service.issue_link(session, ctx.settings, invoice=invoice, customer=customer, actor=ctx.actor, send=True)
            if a.send
            else None
        )
    record = invoice_record(invoice, customer)
    if issued:
        record["link"] = _link_record(issued)

    def human() -> None:
        ctx.console.print(f"Created invoice {invoice.number} for {customer.email}: {format_money(invoice.amount_due, invoice.currency)}")
        if issued:
            _print_link(ctx, issued)

    emit(ctx, record, human)


async def _sync_quietly(ctx: Context, sync: Callable[[], Awaitable[Any]]) -> None:
    from payments.gateway import GatewayError

    try:
        await sync()
    except GatewayError as exc:
        print(f"warning: could not refresh saved cards from Stripe ({exc}); the page shows the last known ones", file=sys.stderr)


def _link_record(issued: Any) -> dict[str, Any]:
    return {
        "id": str(issued.link_id),
        "url": issued.url,
        "expires_at": issued.expires_at,
        "emailed": issued.emailed,
        "held_reason": issued.held_reason,
    }


def _print_link(ctx: Context, issued: Any) -> None:
    if issued.emailed:
        ctx.console.print(f"Link emailed (queued in the outbox), valid until {issued.expires_at:%Y-%m-%d}:")
    else:
        ctx.console.print(f"Link issued, email held: {issued.held_reason}. Valid until {issued.expires_at:%Y-%m-%d}:")
    ctx.console.print(issued.url, soft_wrap=True, highlight=False)


async def cmd_invoice_list(ctx: Context, rt: Runtime) -> None:
    from sqlalchemy import select

    from links.models import Customer, Invoice

    query = select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).order_by(Invoice.created_at)
    if ctx.args.status:
        query = query.where(Invoice.status == ctx.args.status)
    async with rt.sessions() as session:
        rows = (await session.execute(query)).all()
    records = [invoice_record(i, c) for i, c in rows]

    def human() -> None:
        table = _table("Number", "Customer", "Amount", "Status", "Due", "Attention")
        for invoice, customer in rows:
            table.add_row(
                invoice.number,
                customer.email,
                format_money(invoice.amount_due, invoice.currency),
                invoice.status,
                invoice.due_date.isoformat() if invoice.due_date else "-",
                invoice.needs_attention or "",
            )
        ctx.console.print(table)

    emit(ctx, {"invoices": records}, human)


async def cmd_invoice_show(ctx: Context, rt: Runtime) -> None:
    from sqlalchemy import select

    from links import service
    from links.models import Customer, PaymentLink
    from payments.models import Payment

    async with rt.sessions() as session:
        invoice = await service.find_invoice(session, ctx.args.number)
        customer = await session.get_one(Customer, invoice.customer_id)
        links = (
            (await session.execute(select(PaymentLink).where(PaymentLink.invoice_id == invoice.id).order_by(PaymentLink.created_at)))
            .scalars()
            .all()
        )
        payments = (
            (await session.execute(select(Payment).where(Payment.invoice_id == invoice.id).order_by(Payment.created_at))).scalars().all()
        )
    record = invoice_record(invoice, customer)
    record["links"] = [
        {
            "id": str(k.id),
            "expires_at": k.expires_at,
            "revoked_at": k.revoked_at,
            "sent_at": k.sent_at,
            "open_count": k.open_count,
            "last_opened_at": k.last_opened_at,
        }
        for k in links
    ]
    record["payments"] = [
        {
            "id": str(p.id),
            "status": p.status,
            "amount": p.amount,
            "payment_intent": p.stripe_payment_intent_id,
            "card": f"{p.brand} {p.last4}",
            "failure": p.failure_message,
            "created_at": p.created_at,
        }
        for p in payments
    ]

    def human() -> None:
        table = _table("Field", "Value")
        table.add_row("Number", invoice.number)
        table.add_row("Customer", f"{customer.name} <{customer.email}>")
        table.add_row("Amount", format_money(invoice.amount_due, invoice.currency))
        table.add_row("Paid", format_money(invoice.amount_paid, invoice.currency))
        table.add_row("Status", invoice.status)
        if invoice.needs_attention:
            table.add_row("Needs attention", invoice.needs_attention)
        for k in links:
            state = "revoked" if k.revoked_at else f"expires {k.expires_at:%Y-%m-%d}"
            table.add_row("Link", f"{k.id} {state}, sent {k.sent_at:%Y-%m-%d %H:%M}" if k.sent_at else f"{k.id} {state}, not sent")
        for p in payments:
            table.add_row(
                "Payment", f"{p.status} {format_money(p.amount, p.currency)} {p.stripe_payment_intent_id or ''} {p.failure_message or ''}"
            )
        ctx.console.print(table)

    emit(ctx, record, human)


async def cmd_invoice_void(ctx: Context, rt: Runtime) -> None:
    from links import lifecycle

    async with rt.sessions.begin() as session:
        invoice = await lifecycle.void_invoice(session, ctx.args.number, actor=ctx.actor)
    emit(ctx, invoice_record(invoice), lambda: ctx.console.print(f"Invoice {invoice.number} is void; its links no longer work."))


async def cmd_link_issue(ctx: Context, rt: Runtime, *, resend: bool = False) -> None:
    from emails.messages import Kind
    from links import service
    from links.models import Customer
    from payments.service import sync_profiles

    async with rt.sessions() as session:
        invoice = await service.find_invoice(session, ctx.args.number)
        customer = await session.get_one(Customer, invoice.customer_id)
    if customer.stripe_customer_id:
        await _sync_quietly(ctx, lambda: sync_profiles(rt.sessions, rt.gateway, customer.id))
    async with rt.sessions.begin() as session:
        invoice = await service.find_invoice(session, ctx.args.number)
        customer = await session.get_one(Customer, invoice.customer_id)
        issued = await service.issue_link(
            session,
            ctx.settings,
            invoice=invoice,
            customer=customer,
            actor=ctx.actor,
            ttl_days=getattr(ctx.args, "ttl_days", None),
            kind=Kind.NEW_LINK if resend else Kind.INVOICE,
        )
    emit(ctx, {"invoice": invoice.number, "link": _link_record(issued)}, lambda: _print_link(ctx, issued))


async def cmd_link_resend(ctx: Context, rt: Runtime) -> None:
    await cmd_link_issue(ctx, rt, resend=True)


async def cmd_link_revoke(ctx: Context, rt: Runtime) -> None:
    from links import lifecycle

    async with rt.sessions.begin() as session:
        count = await lifecycle.revoke_links(session, ctx.args.number, actor=ctx.actor)
    emit(
        ctx,
        {"invoice": ctx.args.number, "revoked": count},
        lambda: ctx.console.print(f"Revoked {count} live link(s) of invoice {ctx.args.number}."),
    )


async def cmd_reconcile(ctx: Context, rt: Runtime) -> None:
    from payments.reconcile import reconcile

    report = await reconcile(rt.sessions, rt.gateway, ctx.settings)
    record = {"checked_payments": report.checked, "events_applied": report.events_applied, "changes": report.changes}

    def human() -> None:
        ctx.console.print(f"Checked {report.checked} payment(s), applied {report.events_applied} missed event(s).")
        for change in report.changes:
            what = f"payment {change['payment']}" if change["payment"] else "invoice"
            ctx.console.print(f"  {change['invoice']}: {what} {change['from']} -> {change['to']}")
        if not report.changes:
            ctx.console.print("Nothing changed: our records match Stripe.")

    emit(ctx, record, human)


async def cmd_outbox_status(ctx: Context, rt: Runtime) -> None:
    from db import utcnow
    from emails.outbox import outbox_counts, recent_dead

    async with rt.sessions() as session:
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
            table = _table("Id", "Kind", "Recipient", "Attempts", "Reason")
            for m in dead:
                table.add_row(str(m.id), m.kind, m.recipient, str(m.attempts), m.last_error or "")
            ctx.console.print(table)

    emit(ctx, record, human)


async def cmd_outbox_retry(ctx: Context, rt: Runtime) -> None:
    import audit
    from emails.outbox import requeue

    async with rt.sessions.begin() as session:
        count = await requeue(session, include_dead=ctx.args.dead)
        audit.record(session, ctx.actor, "outbox.retry", "outbox", count=count, dead=ctx.args.dead)
    emit(ctx, {"requeued": count}, lambda: ctx.console.print(f"Re-queued {count} message(s); the worker sends them now."))


def _progress(ctx: Context, total: int, description: str) -> Any:
    """A progress bar on a terminal (on stderr); nothing when piped or with --json."""
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if ctx.args.json or not sys.stderr.isatty():
        return nullcontext(None)
    progress = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True
    )
    progress.add_task(description, total=total)
    return progress


async def cmd_import(ctx: Context, rt: Runtime) -> None:
    from pathlib import Path

    from links import importer

    a = ctx.args
    try:
        text = await asyncio.to_thread(Path(a.file).read_text, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {a.file}: {exc}") from None
    try:
        rows, bad = importer.parse_csv(text)
    except importer.ImportError_ as exc:
        raise UserError(f"{a.file}: {exc}") from None
    report = importer.ImportReport(rows=len(rows) + len(bad))
    async with rt.sessions.begin() as session:
        new, done, conflicts = await importer.check_against_database(session, rows)
        report.bad = sorted(bad + conflicts, key=lambda b: b.line)
        report.already_imported = len(done)
        if report.bad and not a.skip_bad:
            pass  # validate everything, write nothing
        else:
            with _progress(ctx, len(new), "Importing") as progress:
                advance = (lambda n: progress.advance(progress.task_ids[0], n)) if progress else (lambda n: None)
                await importer.write_rows(
                    session, ctx.settings, new, actor=ctx.actor, send=a.send, verified=a.verified, report=report, progress=advance
                )
            report.written = True
    record = {
        "rows": report.rows, "written": report.written, "created_invoices": report.created_invoices,
        "created_customers": report.created_customers, "already_imported": report.already_imported,
        "emailed": report.emailed, "held": report.held, "bad_rows": [{"line": b.line, "reason": b.reason} for b in report.bad],
    }  # fmt: skip
    for b in report.bad:
        print(f"{a.file}:{b.line}: {b.reason}", file=sys.stderr)
    emit(ctx, record, lambda: _print_import(ctx, report))
    if report.bad and not a.skip_bad:
        raise UserError(f"{len(report.bad)} bad row(s); nothing was imported (fix them, or use --skip-bad to import the rest)")


def _print_import(ctx: Context, report: Any) -> None:
    if not report.written:
        return
    ctx.console.print(
        f"Imported {report.created_invoices} invoice(s) and {report.created_customers} new customer(s); "
        f"{report.already_imported} already imported; {report.emailed} emailed, {report.held} held; {len(report.bad)} bad row(s) skipped."
    )


async def cmd_export(ctx: Context, rt: Runtime) -> None:
    import csv

    from links.reports import EXPORT_COLUMNS, export_rows

    async with rt.sessions() as session:
        rows = await export_rows(session, ctx.args.since)
    if ctx.args.format == "json" or ctx.args.json:
        print(json.dumps([{k: _jsonable(v) for k, v in row.items()} for row in rows], indent=2, ensure_ascii=False))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    with _progress(ctx, len(rows), "Exporting") as progress:
        for row in rows:
            writer.writerow({k: _jsonable(v) if v is not None else "" for k, v in row.items()})
            if progress:
                progress.advance(progress.task_ids[0])


async def cmd_report_usage(ctx: Context, rt: Runtime) -> None:
    from db import utcnow
    from links.reports import usage

    async with rt.sessions() as session:
        report = await usage(session, ctx.args.days, utcnow())
    peak = report.peak_hour()
    record = {"days": report.days, "by_hour_utc": report.by_hour, "by_day_of_month": report.by_day, "peak_hour_utc": peak}

    def human() -> None:
        ctx.console.print(f"Usage over the last {report.days} days (hours in UTC)")
        _bars(ctx, "Link opens by hour of day", [f"{h:02d}:00" for h in range(24)], report.by_hour["opens"])
        _bars(ctx, "Payments by hour of day", [f"{h:02d}:00" for h in range(24)], report.by_hour["payments"])
        _bars(ctx, "Emails sent by hour of day", [f"{h:02d}:00" for h in range(24)], report.by_hour["emails"])
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


async def cmd_report_aging(ctx: Context, rt: Runtime) -> None:
    from links.reports import AGING_BUCKETS, aging

    async with rt.sessions() as session:
        table = await aging(session, date.today())
    record = {
        bucket: {cur: {"count": n, "total": t, "total_formatted": format_money(t, cur)} for cur, (n, t) in row.items()}
        for bucket, row in table.items()
    }

    def human() -> None:
        out = _table("Overdue", "Currency", "Invoices", "Outstanding")
        for name, _, _ in AGING_BUCKETS:
            for currency, (count, total) in sorted(table[name].items()):
                out.add_row(name, currency.upper(), str(count), format_money(total, currency))
        ctx.console.print(out)

    emit(ctx, record, human)


async def cmd_audit(ctx: Context, rt: Runtime) -> None:
    from links.reports import audit_entries

    async with rt.sessions() as session:
        entries = await audit_entries(session, ctx.args.invoice, ctx.args.limit)
    record = {"entries": [{"at": e.at, "actor": e.actor, "action": e.action, "subject": e.subject, "details": e.details} for e in entries]}

    def human() -> None:
        out = _table("When (UTC)", "Who", "What", "Subject", "Details")
        for e in entries:
            details = ", ".join(f"{k}={v}" for k, v in (e.details or {}).items())
            out.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject, details)
        ctx.console.print(out)

    emit(ctx, record, human)


def cmd_migrate(ctx: Context) -> None:
    from db import migrate_sync

    migrate_sync(ctx.settings.database_url)
    emit(ctx, {"migrated": True}, lambda: ctx.console.print("Database schema is up to date."))


# --- argument parsing ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON result")
    common.add_argument("--actor", help="who is acting, for the audit log (default: your OS user)")
    parser = argparse.ArgumentParser(prog="python -m links", description="Paylink finance desk.", parents=[common])
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(sub: Any, name: str, key: str, help_text: str) -> argparse.ArgumentParser:
        example = EPILOG_EXAMPLES.get(key)
        return sub.add_parser(  # type: ignore[no-any-return]
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}" if example else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    customer = groups.add_parser("customer", help="add and look up customers").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    p = command(customer, "add", "customer add", "Add a customer (creates the Stripe customer unless --stripe-customer is given).")
    p.add_argument("--email", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--locale", help="language for pages and emails: en, de, fr, es")
    p.add_argument("--stripe-customer", help="an existing Stripe customer id (cus_…)")
    p.add_argument("--verified", action="store_true", help="finance attests the address (e.g. from the CRM); recorded in the audit log")
    _address_options(p)
    p.set_defaults(handler=cmd_customer_add)
    p = command(customer, "show", "customer show", "Show a customer, verification state and saved cards.")
    p.add_argument("email")
    p.set_defaults(handler=cmd_customer_show)
    p = command(customer, "verify", "customer verify", "Email the customer a link that confirms their address.")
    p.add_argument("email")
    p.set_defaults(handler=cmd_customer_verify)
    p = command(customer, "update", "customer update", "Change a customer's name, language or email (a new email is re-verified).")
    p.add_argument("email", help="the customer's current email")
    p.add_argument("--email", dest="new_email", help="the new email address")
    p.add_argument("--name")
    p.add_argument("--locale")
    _address_options(p)
    p.set_defaults(handler=cmd_customer_update)

    invoice = groups.add_parser("invoice", help="create, list, show and void invoices").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    p = command(invoice, "create", "invoice create", "Create an invoice; with --send, issue its link and email it.")
    p.add_argument("--customer", required=True, help="the customer's email")
    p.add_argument("--amount", required=True, help="in major units, e.g. 120.50")
    p.add_argument("--currency", required=True, help="ISO 4217 code, e.g. eur")
    p.add_argument("--description", required=True)
    p.add_argument("--due", type=parse_date, help="due date, YYYY-MM-DD")
    p.add_argument("--number", help="invoice number (default: the next INV-nnnnnn)")
    p.add_argument("--send", action="store_true", help="issue a payment link and email it now")
    p.set_defaults(handler=cmd_invoice_create)
    p = command(invoice, "list", "invoice list", "List invoices.")
    p.add_argument("--status", choices=["open", "processing", "paid", "void", "refunded", "partially_refunded"])
    p.set_defaults(handler=cmd_invoice_list)
    p = command(invoice, "show", "invoice show", "Show an invoice with its links and payments.")
    p.add_argument("number")
    p.set_defaults(handler=cmd_invoice_show)
    p = command(invoice, "void", "invoice void", "Void an open invoice; its links stop working.")
    p.add_argument("number")
    p.set_defaults(handler=cmd_invoice_void)

    link = groups.add_parser("link", help="issue, resend and revoke payment links").add_subparsers(
        dest="command", required=True, metavar="ACTION"
    )
    p = command(link, "issue", "link issue", "Issue a new payment link for an invoice and email it.")
    p.add_argument("number")
    p.add_argument("--ttl-days", type=int, help="how long the link works (default LINK_TTL_DAYS)")
    p.set_defaults(handler=cmd_link_issue)
    p = command(link, "resend", "link resend", "Email a fresh link; older links keep working until they expire.")
    p.add_argument("number")
    p.set_defaults(handler=cmd_link_resend)
    p = command(link, "revoke", "link revoke", "Revoke every live link of an invoice.")
    p.add_argument("number")
    p.set_defaults(handler=cmd_link_revoke)

    p = command(groups, "remind", "remind", "Queue due reminders (before the due date, before the last link expires); each once.")
    p.add_argument("--days-before-due", type=int, default=3, help="remind this many days before the due date (default 3)")
    p.add_argument("--days-before-expiry", type=int, default=3, help="remind when the last link expires within this many days (default 3)")
    p.set_defaults(handler=cmd_remind)

    p = command(groups, "reconcile", "reconcile", "Ask Stripe for the truth about every unfinished payment and missed event.")
    p.set_defaults(handler=cmd_reconcile)

    outbox = groups.add_parser("outbox", help="see and retry queued email").add_subparsers(dest="command", required=True, metavar="ACTION")
    p = command(outbox, "status", "outbox status", "Counts by status, oldest pending age, recent failures.")
    p.set_defaults(handler=cmd_outbox_status)
    p = command(outbox, "retry", "outbox retry", "Make waiting messages due now; with --dead, re-queue failed ones too.")
    p.add_argument("--dead", action="store_true")
    p.set_defaults(handler=cmd_outbox_retry)

    p = command(
        groups, "import", "import", "Import invoices from a CSV file; every row is checked first, nothing is written if any is bad."
    )
    p.add_argument("file", help="CSV with the header email,name,amount,currency,description,due_date,number,locale")
    p.add_argument("--send", action="store_true", help="issue links and queue the invoice emails")
    p.add_argument("--skip-bad", action="store_true", help="import the good rows even if some are bad")
    p.add_argument("--verified", action="store_true", help="finance attests the new customers' addresses (audited)")
    p.set_defaults(handler=cmd_import)

    p = command(groups, "export", "export", "Export invoices with payments and link activity for accounting (CSV or JSON on stdout).")
    p.add_argument("--since", type=parse_date, help="only invoices created on or after this date, YYYY-MM-DD")
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.set_defaults(handler=cmd_export)

    report = groups.add_parser("report", help="usage and aging reports").add_subparsers(dest="command", required=True, metavar="REPORT")
    p = command(report, "usage", "report usage", "Link opens, payments and emails by hour of day and day of month, with the peak hour.")
    p.add_argument("--days", type=int, default=30)
    p.set_defaults(handler=cmd_report_usage)
    p = command(report, "aging", "report aging", "Open invoices by days overdue, with totals per currency.")
    p.set_defaults(handler=cmd_report_aging)

    p = command(groups, "audit", "audit", "Show the audit trail: who did what, when.")
    p.add_argument("--invoice", help="only entries about this invoice number")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(handler=cmd_audit)

    p = command(groups, "migrate", "migrate", "Bring the database schema up to date (alembic upgrade head).")
    p.set_defaults(sync_handler=cmd_migrate)
    return parser


async def _run(ctx: Context) -> None:
    rt = Runtime(ctx.settings)
    try:
        await ctx.args.handler(ctx, rt)
    finally:
        await rt.close()


def main(argv: Sequence[str] | None = None) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from links.service import LinkError
    from payments.gateway import GatewayError
    from payments.service import PaymentRefused

    args = build_parser().parse_args(argv)
    try:
        ctx = Context(Settings.from_env(), args, Console(highlight=False, soft_wrap=True))
        if getattr(args, "sync_handler", None):
            args.sync_handler(ctx)
        else:
            asyncio.run(_run(ctx))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    except (UserError, LinkError, MoneyError, PaymentRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"error: Stripe: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        # e.g. a database that was never migrated, or a value the database refuses: one line, no traceback.
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        print(f"error: database: {reason} (is the schema up to date? run `python -m links migrate`)", file=sys.stderr)
        return 1
    return 0
