"""`link …`: issue, resend and revoke payment links."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, sync_quietly
from emails.messages import Kind
from links.invoices import find_invoice_with_customer
from links.issuing import IssuedLink, issue_link, revoke_links
from links.models import Invoice
from payments.cards import sync_profiles
from plumbing.db import utcnow

MAX_TTL_DAYS = 365


def register(commands: Subcommands[Parser]) -> None:
    link = command_group(commands, "link", "issue, resend and revoke payment links")

    p = command(
        link,
        "issue",
        "Issue a new payment link for an invoice and email it.",
        example="python -m links link issue INV-000001 --ttl-days 14",
        run=issue,
    )
    p.add_argument("number")
    p.add_argument("--ttl-days", type=int, help="how long the link works (default LINK_TTL_DAYS)")

    p = command(
        link,
        "resend",
        "Email a fresh link; older links keep working until they expire.",
        example="python -m links link resend INV-000001",
        run=resend,
    )
    p.add_argument("number")

    p = command(
        link,
        "revoke",
        "Revoke every live link of an invoice.",
        example="python -m links link revoke INV-000001",
        run=revoke,
    )
    p.add_argument("number")


def link_record(issued: IssuedLink) -> dict[str, Any]:
    return {
        "id": str(issued.link_id),
        "url": issued.url,
        "expires_at": issued.expires_at,
        "emailed": issued.emailed,
        "held_reason": issued.held_reason,
    }


def ttl_warning(invoice: Invoice, expires_at: datetime) -> str | None:
    """A link that expires before the invoice's due date is issued (the link-expiry reminder sends a
    fresh one before it lapses), with this warning naming the fix; `invoice list` flags it too."""
    due = invoice.due_date
    if due is None or expires_at.date() >= due:
        return None
    days = (due - utcnow().date()).days + 1
    fix = (
        f"or issue one that lasts: python -m links link issue {invoice.number} --ttl-days {days}"
        if days <= MAX_TTL_DAYS
        else f"and more as they lapse (a link lasts at most {MAX_TTL_DAYS} days)"
    )
    return (
        f"the link expires on {expires_at:%Y-%m-%d}, before the due date {due.isoformat()}: "
        f"the link-expiry reminder will email a fresh one, {fix}"
    )


def print_link(ctx: Context, issued: IssuedLink) -> None:
    if issued.emailed:
        ctx.console.print(f"Link emailed (queued in the outbox), valid until {issued.expires_at:%Y-%m-%d}:")
    else:
        ctx.console.print(f"Link issued, email held: {issued.held_reason}. Valid until {issued.expires_at:%Y-%m-%d}:")
    ctx.console.print(issued.url, soft_wrap=True, highlight=False)


async def issue(ctx: Context, services: Services, *, resend: bool = False) -> None:
    number = ctx.args.number
    async with services.readers() as session:
        _, customer = await find_invoice_with_customer(session, number)
    if customer.stripe_customer_id:  # the page shows the saved cards Stripe holds now
        await sync_quietly(ctx, lambda: sync_profiles(services.sessions, services.gateway, customer.id))
    async with services.sessions.begin() as session:
        invoice, customer = await find_invoice_with_customer(session, number)
        issued = await issue_link(
            session,
            ctx.settings,
            invoice=invoice,
            customer=customer,
            actor=ctx.actor,
            ttl_days=getattr(ctx.args, "ttl_days", None),
            kind=Kind.NEW_LINK if resend else Kind.INVOICE,
        )
    record: dict[str, Any] = {"invoice": invoice.number, "link": link_record(issued)}
    warning = ttl_warning(invoice, issued.expires_at)
    if warning:
        record["warnings"] = [warning]
        ctx.warn(warning)
    emit(ctx, record, lambda: print_link(ctx, issued))


async def resend(ctx: Context, services: Services) -> None:
    await issue(ctx, services, resend=True)


async def revoke(ctx: Context, services: Services) -> None:
    number = ctx.args.number
    async with services.sessions.begin() as session:
        count = await revoke_links(session, number, actor=ctx.actor)
    emit(
        ctx,
        {"invoice": number, "revoked": count},
        lambda: ctx.console.print(f"Revoked {count} live link(s) of invoice {number}."),
    )
