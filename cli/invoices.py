"""`invoice …`: create, list, show and void invoices."""

from __future__ import annotations

from typing import Any

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, parse_date, sync_quietly, table
from cli.links import link_record, print_link
from links.customers import find_customer
from links.invoices import create_invoice, find_invoice_with_customer, invoice_links, list_invoices
from links.issuing import issue_link
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments.cards import sync_profiles
from payments.checkout import void_invoice
from payments.models import Payment
from payments.queries import invoice_payments
from plumbing.i18n import format_money


def register(commands: Subcommands[Parser]) -> None:
    invoice = command_group(commands, "invoice", "create, list, show and void invoices")

    p = command(
        invoice,
        "create",
        "Create an invoice; with --send, issue its link and email it.",
        example=(
            'python -m links invoice create --customer ann@example.com --amount 120.50 --currency eur --description "Consulting" --send'
        ),
        run=create,
    )
    p.add_argument("--customer", required=True, help="the customer's email")
    p.add_argument("--amount", required=True, help="in major units, e.g. 120.50")
    p.add_argument("--currency", required=True, help="ISO 4217 code, e.g. eur")
    p.add_argument("--description", required=True)
    p.add_argument("--due", type=parse_date, help="due date, YYYY-MM-DD")
    p.add_argument("--number", help="invoice number (default: the next INV-nnnnnn)")
    p.add_argument("--send", action="store_true", help="issue a payment link and email it now")

    p = command(invoice, "list", "List invoices.", example="python -m links invoice list --status open", run=list_)
    p.add_argument("--status", choices=[status.value for status in InvoiceStatus])

    p = command(
        invoice,
        "show",
        "Show an invoice with its links and payments.",
        example="python -m links invoice show INV-000001",
        run=show,
    )
    p.add_argument("number")

    p = command(
        invoice,
        "void",
        "Void an open invoice; its links stop working.",
        example="python -m links invoice void INV-000001",
        run=void,
    )
    p.add_argument("number")


def invoice_record(invoice: Invoice, customer: Customer | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
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


def _link_row(link: PaymentLink) -> dict[str, Any]:
    return {
        "id": str(link.id),
        "expires_at": link.expires_at,
        "revoked_at": link.revoked_at,
        "sent_at": link.sent_at,
        "open_count": link.open_count,
        "last_opened_at": link.last_opened_at,
    }


def _payment_row(payment: Payment) -> dict[str, Any]:
    return {
        "id": str(payment.id),
        "status": payment.status,
        "amount": payment.amount,
        "payment_intent": payment.stripe_payment_intent_id,
        "card": f"{payment.brand} {payment.last4}",
        "failure": payment.failure_message,
        "created_at": payment.created_at,
    }


async def create(ctx: Context, services: Services) -> None:
    a = ctx.args
    async with services.readers() as session:
        customer = await find_customer(session, a.customer)
    if a.send and customer.stripe_customer_id:  # the page shows the saved cards Stripe holds now
        await sync_quietly(ctx, lambda: sync_profiles(services.sessions, services.gateway, customer.id))
    async with services.sessions.begin() as session:
        customer = await find_customer(session, a.customer)
        invoice = await create_invoice(
            session,
            customer=customer,
            amount=a.amount,
            currency=a.currency,
            description=a.description,
            actor=ctx.actor,
            due_date=a.due,
            number=a.number,
        )
        issued = await issue_link(session, ctx.settings, invoice=invoice, customer=customer, actor=ctx.actor, send=True) if a.send else None
    record = invoice_record(invoice, customer)
    if issued:
        record["link"] = link_record(issued)

    def human() -> None:
        ctx.console.print(f"Created invoice {invoice.number} for {customer.email}: {format_money(invoice.amount_due, invoice.currency)}")
        if issued:
            print_link(ctx, issued)

    emit(ctx, record, human)


async def list_(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        rows = await list_invoices(session, status=ctx.args.status)

    def human() -> None:
        out = table("Number", "Customer", "Amount", "Status", "Due", "Attention")
        for invoice, customer in rows:
            out.add_row(
                invoice.number,
                customer.email,
                format_money(invoice.amount_due, invoice.currency),
                invoice.status,
                invoice.due_date.isoformat() if invoice.due_date else "-",
                invoice.needs_attention or "",
            )
        ctx.console.print(out)

    emit(ctx, {"invoices": [invoice_record(i, c) for i, c in rows]}, human)


async def show(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        invoice, customer = await find_invoice_with_customer(session, ctx.args.number)
        links = await invoice_links(session, invoice.id)
        payments = await invoice_payments(session, invoice.id)
    record = invoice_record(invoice, customer)
    record["links"] = [_link_row(k) for k in links]
    record["payments"] = [_payment_row(p) for p in payments]

    def human() -> None:
        out = table("Field", "Value")
        out.add_row("Number", invoice.number)
        out.add_row("Customer", f"{customer.name} <{customer.email}>")
        out.add_row("Amount", format_money(invoice.amount_due, invoice.currency))
        out.add_row("Paid", format_money(invoice.amount_paid, invoice.currency))
        out.add_row("Status", invoice.status)
        if invoice.needs_attention:
            out.add_row("Needs attention", invoice.needs_attention)
        for k in links:
            state = "revoked" if k.revoked_at else f"expires {k.expires_at:%Y-%m-%d}"
            out.add_row("Link", f"{k.id} {state}, sent {k.sent_at:%Y-%m-%d %H:%M}" if k.sent_at else f"{k.id} {state}, not sent")
        for p in payments:
            out.add_row(
                "Payment", f"{p.status} {format_money(p.amount, p.currency)} {p.stripe_payment_intent_id or ''} {p.failure_message or ''}"
            )
        ctx.console.print(out)

    emit(ctx, record, human)


async def void(ctx: Context, services: Services) -> None:
    async with services.sessions.begin() as session:
        invoice = await void_invoice(session, ctx.args.number, actor=ctx.actor)
    emit(ctx, invoice_record(invoice), lambda: ctx.console.print(f"Invoice {invoice.number} is void; its links no longer work."))
