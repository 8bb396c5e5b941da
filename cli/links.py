"""`link …`: issue, resend and revoke payment links."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, sync_quietly
from emails.messages import Kind
from links.colleagues import check_recipient, issue_colleague_link
from links.invoices import find_invoice_with_customer
from links.issuing import IssuedLink, Revoked, issue_link, revoke_links
from links.models import Invoice, InvoiceStatus
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
    p.add_argument(
        "--to",
        metavar="EMAIL",
        help="send it to someone other than the customer (e.g. their accounts payable) with a link of their own, "
        "which never offers the customer's saved cards",
    )

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
        "Revoke every live link of an invoice (or, with --to, only the links sent to that colleague).",
        example="python -m links link revoke INV-000001 --to ap@customer.example",
        run=revoke,
    )
    p.add_argument("number")
    p.add_argument("--to", metavar="EMAIL", help="revoke only the links sent to this address with `link issue N --to`")


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
    if getattr(ctx.args, "to", None):
        await issue_to_colleague(ctx, services)
        return
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
            # Finance's resend is the invoice email again (the "new link, as you asked" email is the
            # customer's own request from an expired link: links/fresh_links.py).
            kind=Kind.INVOICE,
        )
    record: dict[str, Any] = {"invoice": invoice.number, "link": link_record(issued)}
    warning = ttl_warning(invoice, issued.expires_at)
    if warning:
        record["warnings"] = [warning]
        ctx.warn(warning)
    emit(ctx, record, lambda: print_link(ctx, issued))


async def resend(ctx: Context, services: Services) -> None:
    await issue(ctx, services, resend=True)


async def issue_to_colleague(ctx: Context, services: Services) -> None:
    """`link issue N --to EMAIL`: the invoice to a colleague of the customer, with a link of their own."""
    recipient = check_recipient(ctx.args.to)
    async with services.sessions.begin() as session:
        invoice, customer = await find_invoice_with_customer(session, ctx.args.number)
        issued = await issue_colleague_link(
            session,
            ctx.settings,
            invoice=invoice,
            customer=customer,
            recipient_email=recipient,
            actor=ctx.actor,
            asked_by_customer=False,
            ttl_days=ctx.args.ttl_days,
        )
    record: dict[str, Any] = {"invoice": invoice.number, "to": recipient, "link": link_record(issued)}

    def human() -> None:
        if issued.emailed:
            ctx.console.print(f"Link for {recipient} emailed (queued in the outbox), valid until {issued.expires_at:%Y-%m-%d}:")
        else:
            ctx.console.print(f"Link for {recipient} issued, email held: {issued.held_reason}. Valid until {issued.expires_at:%Y-%m-%d}:")
        ctx.console.print(issued.url, soft_wrap=True, highlight=False)

    emit(ctx, record, human)


async def revoke(ctx: Context, services: Services) -> None:
    async with services.sessions.begin() as session:
        revoked = await revoke_links(session, ctx.args.number, actor=ctx.actor, recipient_email=ctx.args.to)
    note = revoke_note(revoked)
    record: dict[str, Any] = {"invoice": revoked.invoice, "revoked": revoked.count, "invoice_status": revoked.status, "to": ctx.args.to}
    if note:
        record["note"] = note
    whose = f" sent to {ctx.args.to}" if ctx.args.to else ""
    emit(
        ctx,
        record,
        lambda: ctx.console.print(f"Revoked {revoked.count} live link(s){whose} of invoice {revoked.invoice}.{' ' + note if note else ''}"),
    )


def revoke_note(revoked: Revoked) -> str | None:
    """What revoking meant, when it is not simply "nothing can be paid through it any more"."""
    if revoked.status in InvoiceStatus.HAS_RECEIPT:
        return (
            f"The invoice is {revoked.status.replace('_', ' ')}: nothing can be paid through its links, "
            "and they keep showing the receipt until they expire."
        )
    if revoked.status == InvoiceStatus.VOID:
        return "The invoice is void: its links already showed that it was cancelled."
    return None
