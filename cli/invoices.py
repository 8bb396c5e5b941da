"""`invoice …`: create, list, show and void invoices."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from rich.table import Column, Table

from cli.common import (
    Context,
    Parser,
    Services,
    Subcommands,
    command,
    command_group,
    emit,
    fits,
    free,
    parse_date,
    sync_quietly,
    table,
    whole,
)
from cli.links import link_record, print_link, ttl_warning
from links.customers import find_customer
from links.errors import LinkError
from links.invoices import create_invoice, default_part_rules, find_invoice_with_customer, invoice_links, void_notice
from links.issuing import issue_link
from links.lines import LineItem, lines_of, parse_item, rate_text, totals
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.partial import PartRules, balance_of
from payments.cards import sync_profiles
from payments.checkout import void_invoice
from payments.desk import FLAG_LABELS, CurrencyTotal, DeskRow, InvoicePayment, currency_totals, desk_row, desk_rows, payments_of_invoice
from payments.models import Payment, PaymentStatus
from plumbing.db import utcnow
from plumbing.i18n import MoneyError, check_currency, format_money, to_minor_units


def register(commands: Subcommands[Parser]) -> None:
    invoice = command_group(commands, "invoice", "create, list, show and void invoices")

    p = command(
        invoice,
        "create",
        "Create an invoice for a plain amount (one line, no tax) or for line items (--item, repeatable); the total is "
        "what gets charged. Each line is rounded to the cent half-up (net, then its tax), and the totals are sums of "
        "those. A due date in the past, and a total below Stripe's minimum charge for the currency (e.g. EUR 0.50, "
        "GBP 0.30, JPY 50), are refused. With --allow-partial the customer may pay in parts: at least --min-amount or "
        "--min-percent of the total, and first a deposit of --deposit-percent; the status is then partially_paid until "
        "the balance is paid. With --send, issue its link and email it; if the link would expire before the "
        "due date you are warned (the link-expiry reminder sends a fresh one; or give --ttl-days).",
        example=(
            'python -m links invoice create --customer ann@example.com --currency eur --description "November" '
            '--item "Consulting|3|400.00|19" --item "Travel|1|85.50|7" --due 2026-12-15 --send\n'
            '  python -m links invoice create --customer ann@example.com --amount 1200 --currency eur --description "Kitchen" '
            "--allow-partial --min-amount 100.00 --deposit-percent 30 --send"
        ),
        run=create,
    )
    p.add_argument("--customer", required=True, help="the customer's email")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--amount", help="a plain amount in major units, e.g. 120.50: one line without tax")
    amount.add_argument(
        "--item",
        action="append",
        metavar='"DESCRIPTION|QUANTITY|UNIT_AMOUNT|TAX_PERCENT"',
        help='a line item, e.g. "Consulting|3|400.00|19" (unit amount in major units; tax percent may be empty: '
        '"Fee|1|10.00|"); repeat for more lines',
    )
    p.add_argument("--currency", required=True, help="ISO 4217 code, e.g. eur")
    p.add_argument("--description", required=True, help="what the invoice is for (its title in emails and on the page)")
    p.add_argument("--notes", help="notes shown to the customer under the lines (e.g. payment terms)")
    p.add_argument("--due", type=parse_date, help="due date, YYYY-MM-DD: today or later (UTC); a date in the past is refused")
    p.add_argument("--number", help="invoice number (default: the next INV-nnnnnn)")
    p.add_argument("--send", action="store_true", help="issue a payment link and email it now")
    p.add_argument("--ttl-days", type=int, help="with --send: how long the link works (default LINK_TTL_DAYS)")
    partial = p.add_mutually_exclusive_group()
    partial.add_argument(
        "--allow-partial",
        action="store_true",
        default=None,
        help="the customer may pay in parts (default: PARTIAL_PAYMENTS_DEFAULT); the full balance is always allowed",
    )
    partial.add_argument("--no-partial", dest="allow_partial", action="store_false", help="only the full balance (overrides the default)")
    minimum = p.add_mutually_exclusive_group()
    minimum.add_argument("--min-amount", metavar="AMOUNT", help="with --allow-partial: a part payment is at least this, e.g. 50.00")
    minimum.add_argument("--min-percent", metavar="P", type=int, help="with --allow-partial: a part payment is at least P %% of the total")
    p.add_argument(
        "--deposit-percent", metavar="P", type=int, help="with --allow-partial: the first payment is at least P %% of the total (a deposit)"
    )

    p = command(
        invoice,
        "list",
        "List invoices with what needs doing (overdue, held: address not verified, never sent, stuck in 3-D Secure, "
        "email undeliverable, disputed, over- or underpaid, link expires before the due date) and totals per currency.",
        example="python -m links invoice list --overdue --customer ann@example.com",
        run=list_,
    )
    p.add_argument("--status", choices=[status.value for status in InvoiceStatus])
    p.add_argument("--customer", help="only this customer's invoices (email)")
    p.add_argument("--overdue", action="store_true", help="only open invoices past their due date")
    p.add_argument("--since", type=parse_date, help="only invoices created on or after this day (UTC), YYYY-MM-DD")

    p = command(
        invoice,
        "show",
        "Show an invoice: lines, tax, totals, notes, dates, what needs doing, its links (state, opens) and payments.",
        example="python -m links invoice show INV-000001",
        run=show,
    )
    p.add_argument("number")

    p = command(
        invoice,
        "void",
        "Void an open invoice; its links stop working, and a customer who was sent it gets a short, translated "
        '"this invoice was cancelled" email. The reason is for finance: kept on the invoice and in the audit log, '
        "never shown to the customer.",
        example='python -m links invoice void INV-000001 --reason "duplicate of INV-000002"',
        run=void,
    )
    p.add_argument("number")
    p.add_argument("--reason", help="why it is void (audited; shown by invoice show)")


# --- records -------------------------------------------------------------------------------------------


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
        "balance": balance_of(invoice.amount_due, invoice.amount_paid) if invoice.status in InvoiceStatus.UNSETTLED else 0,
        "part_payments": {
            "allowed": invoice.allow_partial,
            "min_amount": invoice.min_partial_amount,
            "min_percent": invoice.min_partial_percent,
            "deposit_percent": invoice.deposit_percent,
        },
        "description": invoice.description,
        "notes": invoice.notes,
        "due_date": invoice.due_date,
        "needs_attention": invoice.needs_attention,
        "void_reason": invoice.void_reason,
        "created_at": invoice.created_at,
        "paid_at": invoice.paid_at,
    }
    if customer is not None:
        record["customer"] = customer.email
        record["customer_name"] = customer.name
    return record


def _lines(invoice: Invoice) -> list[LineItem]:
    return lines_of(invoice.line_items, description=invoice.description, amount_due=invoice.amount_due)


def lines_record(invoice: Invoice) -> dict[str, Any]:
    """The lines, tax per rate and totals, in minor units and formatted (links/lines.py computes them)."""
    lines = _lines(invoice)
    summed = totals(lines)
    money = _formatter(invoice.currency)
    return {
        "lines": [{**line.to_json(), "net_formatted": money(line.net), "total": line.total} for line in lines],
        "subtotal": summed.subtotal,
        "taxes": [{"rate": str(rate), "amount": amount, "amount_formatted": money(amount)} for rate, amount in summed.taxes],
        "total": summed.total,
        "total_formatted": money(summed.total),
    }


def _row_record(row: DeskRow) -> dict[str, Any]:
    return {
        **invoice_record(row.invoice, row.customer),
        "flags": [str(flag) for flag in row.flags],
        "days_overdue": row.days_overdue,
    }


def _totals_record(currency: str, total: CurrencyTotal, refunded: int = 0) -> dict[str, Any]:
    amounts = {"due": total.due, "paid": total.paid, "outstanding": total.outstanding, "overdue": total.overdue}
    if refunded:  # as the table shows them: only where something was paid back
        amounts.update(refunded=refunded, net_paid=total.paid - refunded)
    money = _formatter(currency)
    return {"invoices": total.invoices, **amounts, "formatted": {name: money(value) for name, value in amounts.items()}}


def link_state(link: PaymentLink, now: datetime) -> str:
    if link.revoked_at is not None:
        return "revoked"
    if link.expires_at <= now:
        return "expired"
    return "live" if link.sent_at is not None else "live, not emailed"


def _link_row(link: PaymentLink, now: datetime) -> dict[str, Any]:
    return {
        "id": str(link.id),
        "state": link_state(link, now),
        "expires_at": link.expires_at,
        "revoked_at": link.revoked_at,
        "sent_at": link.sent_at,
        "open_count": link.open_count,
        "first_opened_at": link.first_opened_at,
        "last_opened_at": link.last_opened_at,
        "to": link.recipient_email,  # a colleague's link (`link issue N --to`, or sent from the pay page)
        "created_by": link.created_by,
    }


PAYMENT_STATES = {
    PaymentStatus.CREATED: "starting (no PaymentIntent yet)",
    PaymentStatus.REQUIRES_CONFIRMATION: "created at Stripe, not confirmed",
    PaymentStatus.REQUIRES_ACTION: "waiting for the customer's 3-D Secure",
    PaymentStatus.PROCESSING: "processing at the bank",
    PaymentStatus.PENDING: "waiting for Stripe's answer (reconcile asks)",
    PaymentStatus.SUCCEEDED: "paid",
    PaymentStatus.FAILED: "failed",
    PaymentStatus.CANCELED: "canceled",
}


def payment_state(payment: Payment) -> str:
    state = PAYMENT_STATES[PaymentStatus(payment.status)] if payment.status in PAYMENT_STATES else payment.status
    if payment.amount_refunded:
        state += f", {format_money(payment.amount_refunded, payment.currency)} refunded"
    return state


def rules_text(invoice: Invoice) -> str:
    """The invoice's part-payment rules, for staff: "allowed, at least €50.00, deposit 30 % first"."""
    if not invoice.allow_partial:
        return "not allowed (only the full balance)"
    parts = ["allowed"]
    if invoice.min_partial_amount:
        parts.append(f"at least {format_money(invoice.min_partial_amount, invoice.currency)}")
    if invoice.min_partial_percent:
        parts.append(f"at least {invoice.min_partial_percent} % of the total")
    if invoice.deposit_percent:
        parts.append(f"a deposit of {invoice.deposit_percent} % first")
    return ", ".join(parts)


def _paid_row(item: InvoicePayment) -> dict[str, Any]:
    row = _payment_row(item.payment)
    row["scope"] = item.payment.scope
    row["receipt_number"] = item.payment.receipt_number
    row["share"] = item.share
    if item.allocation:
        row["allocation"] = [
            {"invoice": a.invoice_number, "amount": a.amount, "amount_refunded": a.amount_refunded} for a in item.allocation
        ]
    return row


def _payment_row(payment: Payment) -> dict[str, Any]:
    return {
        "id": str(payment.id),
        "status": payment.status,
        "state": payment_state(payment),
        "amount": payment.amount,
        "currency": payment.currency,
        "payment_intent": payment.stripe_payment_intent_id,
        "card": f"{payment.brand} {payment.last4}",
        "failure": payment.failure_message,
        "created_at": payment.created_at,
        "updated_at": payment.updated_at,
    }


def _formatter(currency: str) -> Callable[[int], str]:
    def money(minor: int) -> str:
        return format_money(minor, currency)

    return money


def _day(value: date | datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "-"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "-"


# --- commands ------------------------------------------------------------------------------------------


def _parse_items(specs: list[str], currency: str) -> list[LineItem]:
    currency = check_currency(currency)
    lines = []
    for spec in specs:
        try:
            lines.append(parse_item(spec, currency))
        except LinkError as exc:
            raise LinkError(f"--item {spec!r}: {exc}") from None
    return lines


def _part_rules(ctx: Context) -> PartRules:
    """--allow-partial / --no-partial, --min-amount | --min-percent, --deposit-percent; else PARTIAL_PAYMENTS_DEFAULT."""
    a = ctx.args
    detailed = a.min_amount is not None or a.min_percent is not None or a.deposit_percent is not None
    if a.allow_partial is False and detailed:
        raise LinkError("--min-amount, --min-percent and --deposit-percent need part payments: drop --no-partial")
    if a.allow_partial is None and not detailed:
        return default_part_rules(ctx.settings)
    if a.allow_partial is None:
        raise LinkError("--min-amount, --min-percent and --deposit-percent only apply with --allow-partial: add it")
    minimum = None
    if a.min_amount is not None:
        try:
            minimum = to_minor_units(a.min_amount, check_currency(a.currency))
        except MoneyError as exc:
            raise LinkError(f"--min-amount: {exc}") from None
    return PartRules(bool(a.allow_partial), minimum, a.min_percent, a.deposit_percent)


async def create(ctx: Context, services: Services) -> None:
    a = ctx.args
    if a.ttl_days is not None and not a.send:
        raise LinkError("--ttl-days is the lifetime of the link --send issues; add --send (or use `link issue N --ttl-days D` later)")
    lines = _parse_items(a.item, a.currency) if a.item else None
    part_rules = _part_rules(ctx)
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
            lines=lines,
            notes=a.notes,
            currency=a.currency,
            description=a.description,
            actor=ctx.actor,
            due_date=a.due,
            number=a.number,
            part_rules=part_rules,
        )
        issued = (
            await issue_link(session, ctx.settings, invoice=invoice, customer=customer, actor=ctx.actor, ttl_days=a.ttl_days, send=True)
            if a.send
            else None
        )
    record = {**invoice_record(invoice, customer), **lines_record(invoice)}
    warning = ttl_warning(invoice, issued.expires_at) if issued else None
    if issued:
        record["link"] = link_record(issued)
    if warning:
        record["warnings"] = [warning]
        ctx.warn(warning)

    def human() -> None:
        ctx.console.print(f"Created invoice {invoice.number} for {customer.email}: {format_money(invoice.amount_due, invoice.currency)}")
        if invoice.allow_partial:
            ctx.console.print(f"Part payments: {rules_text(invoice)}")
        if issued:
            print_link(ctx, issued)

    emit(ctx, record, human)


async def list_(ctx: Context, services: Services) -> None:
    a = ctx.args
    async with services.readers() as session:
        rows = await desk_rows(session, status=a.status, customer_email=a.customer, overdue=a.overdue, since=a.since)
    sums = currency_totals(rows)
    refunded = _refunded_per_currency(rows)

    def human() -> None:
        ctx.console.print(_list_table(rows, ctx.console.width))
        if not rows:
            ctx.console.print("No invoices.")
            return
        ctx.console.print()
        ctx.console.print("Totals per currency (void invoices count as invoices, not as amounts due):")
        ctx.console.print(_totals_table(sums, refunded, ctx.console.width))

    emit(
        ctx,
        {"invoices": [_row_record(r) for r in rows], "totals": {c: _totals_record(c, t, refunded.get(c, 0)) for c, t in sums.items()}},
        human,
    )


def _refunded_per_currency(rows: list[DeskRow]) -> dict[str, int]:
    """What was paid back, per currency, of the listed invoices: only currencies with a refund."""
    refunded: dict[str, int] = {}
    for row in rows:
        if row.invoice.amount_refunded:
            currency = row.invoice.currency
            refunded[currency] = refunded.get(currency, 0) + row.invoice.amount_refunded
    return refunded


def _list_table(rows: list[DeskRow], width: int) -> Table:
    """One row per invoice. Numbers, amounts, statuses and dates are never cut; when the terminal is too
    narrow for a column each (80 columns), related values share a column, one under the other."""
    refunds = any(row.invoice.amount_refunded for row in rows)
    cells = []
    for row in rows:
        invoice = row.invoice
        money = _formatter(invoice.currency)
        labels = [FLAG_LABELS[f] + (f" {row.days_overdue}d" if f == "overdue" else "") for f in row.flags]
        cells.append(
            {
                "number": invoice.number,
                "customer": row.customer.email,
                "amount": money(invoice.amount_due),
                "paid": money(invoice.amount_paid) if invoice.amount_paid else "-",
                "refunded": money(invoice.amount_refunded) if invoice.amount_refunded else "-",
                "status": invoice.status,
                "issued": _day(invoice.created_at),
                "due": _day(invoice.due_date),
                "attention": ", ".join(labels),
            }
        )
    money_columns = ["amount", "paid", *(["refunded"] if refunds else [])]
    wide = table(
        whole("Number"), free("Customer"), whole("Amount"), whole("Paid"), *([whole("Refunded")] if refunds else []),
        whole("Status"), whole("Issued"), whole("Due"), free("Attention"),
    )  # fmt: skip
    for c in cells:
        wide.add_row(c["number"], c["customer"], *(c[name] for name in money_columns), c["status"], c["issued"], c["due"], c["attention"])
    if fits(wide, width):
        return wide
    first = Column("Number\nCustomer", overflow="fold", min_width=max((len(c["number"]) for c in cells), default=6))
    amounts = whole("Amount\nPaid" + ("\nRefunded" if refunds else ""))
    stacked = table(first, amounts, whole("Status"), whole("Issued\nDue"), free("Attention"), show_lines=True)
    for c in cells:
        figures = [c["amount"], c["paid"], *([c["refunded"]] if c["refunded"] != "-" else [])]
        stacked.add_row(f"{c['number']}\n{c['customer']}", "\n".join(figures), c["status"], f"{c['issued']}\n{c['due']}", c["attention"])
    return stacked


def _totals_table(sums: dict[str, CurrencyTotal], refunded: dict[str, int], width: int) -> Table:
    """Per currency: due, paid, outstanding, overdue; with any refund, also refunded and net paid (paid
    less refunded: what was kept), which share the Paid column when the terminal is narrow."""
    paid_headers = ["Paid", *(["Refunded", "Net paid"] if refunded else [])]
    rows = []
    for currency, total in sums.items():
        money = _formatter(currency)
        back = refunded.get(currency, 0)
        paid = [money(total.paid), *([money(back), money(total.paid - back)] if refunded else [])]
        rows.append((currency.upper(), str(total.invoices), money(total.due), paid, money(total.outstanding), money(total.overdue)))
    wide = table(whole("Currency"), whole("Invoices"), whole("Due"), *map(whole, paid_headers), whole("Outstanding"), whole("Overdue"))
    for currency, count, due, paid, outstanding, overdue in rows:
        wide.add_row(currency, count, due, *paid, outstanding, overdue)
    if fits(wide, width):
        return wide
    stacked = table(
        whole("Currency"), whole("Invoices"), whole("Due"), whole("\n".join(paid_headers)), whole("Outstanding"), whole("Overdue")
    )
    for currency, count, due, paid, outstanding, overdue in rows:
        stacked.add_row(currency, count, due, "\n".join(paid), outstanding, overdue)
    return stacked


async def show(ctx: Context, services: Services) -> None:
    now = utcnow()
    async with services.readers() as session:
        invoice, customer = await find_invoice_with_customer(session, ctx.args.number)
        links = await invoice_links(session, invoice.id)
        payments = await payments_of_invoice(session, invoice.id)
        row = await desk_row(session, invoice, customer, now=now)
    record = {**_row_record(row), **lines_record(invoice)}
    record["links"] = [_link_row(k, now) for k in links]
    record["payments"] = [_paid_row(p) for p in payments]

    def human() -> None:
        money = _formatter(invoice.currency)
        out = table("Field", "Value")
        out.add_row("Number", invoice.number)
        out.add_row("Customer", f"{customer.name} <{customer.email}>")
        out.add_row("Status", invoice.status)
        out.add_row("Description", invoice.description)
        out.add_row("Issued", _day(invoice.created_at))
        due = _day(invoice.due_date)
        out.add_row("Due", f"{due} (overdue {row.days_overdue} days)" if row.days_overdue else due)
        lines = _lines(invoice)
        summed = totals(lines)
        for line in lines:
            tax = f", tax {rate_text(line.tax_percent)}" if line.tax_percent is not None else ", no tax"
            out.add_row("Item", f"{line.description}: {line.quantity} × {money(line.unit_amount)}{tax} = {money(line.net)}")
        out.add_row("Subtotal", money(summed.subtotal))
        for rate, amount in summed.taxes:
            out.add_row(f"Tax {rate_text(rate)}", money(amount))
        out.add_row("Total", money(invoice.amount_due))
        out.add_row("Paid", money(invoice.amount_paid) + (f" on {_when(invoice.paid_at)}" if invoice.paid_at else ""))
        if invoice.status in InvoiceStatus.UNSETTLED:
            out.add_row("Balance", money(balance_of(invoice.amount_due, invoice.amount_paid)))
        out.add_row("Part payments", rules_text(invoice))
        if invoice.amount_refunded:
            out.add_row("Refunded", money(invoice.amount_refunded))
        if invoice.notes:
            out.add_row("Notes", invoice.notes)
        if invoice.void_reason:
            out.add_row("Void reason", invoice.void_reason)
        if row.flags:
            out.add_row("Attention", ", ".join(FLAG_LABELS[f] for f in row.flags))
        if invoice.needs_attention:
            out.add_row("Needs attention", invoice.needs_attention)
        for k in links:
            sent = f"emailed {_when(k.sent_at)}" if k.sent_at else "not emailed"
            opened = f"opened {k.open_count} time(s), last {_when(k.last_opened_at)}" if k.open_count else "never opened"
            to = f"to {k.recipient_email} (by {k.created_by}), " if k.recipient_email else ""
            label = "Colleague link" if k.recipient_email else "Link"
            out.add_row(label, f"{to}{link_state(k, now)}: expires {_when(k.expires_at)}, {sent}, {opened}")
        for item in payments:
            p = item.payment
            card = f" {(p.brand or 'card').title()} •••• {p.last4}" if p.last4 else ""
            failure = f" ({p.failure_message})" if p.failure_message else ""
            receipt = f" {p.receipt_number}" if p.receipt_number else ""
            out.add_row(
                "Payment", f"{payment_state(p)}{failure}: {format_money(p.amount, p.currency)}{card}, {_when(p.created_at)}"
                f"{receipt} {p.stripe_payment_intent_id or ''}".rstrip()
            )  # fmt: skip
            if item.allocation:
                split = ", ".join(
                    f"{a.invoice_number} {format_money(a.amount, p.currency)}"
                    + (f" ({format_money(a.amount_refunded, p.currency)} refunded)" if a.amount_refunded else "")
                    for a in item.allocation
                )
                out.add_row("  pays all", split)
        ctx.console.print(out)

    emit(ctx, record, human)


async def void(ctx: Context, services: Services) -> None:
    async with services.sessions.begin() as session:
        invoice = await void_invoice(session, ctx.args.number, actor=ctx.actor)
        emailed = await void_notice(session, ctx.settings, invoice, reason=ctx.args.reason, actor=ctx.actor)
    record = {**invoice_record(invoice), "customer_notified": emailed}
    note = " The customer is told by email." if emailed else " No email (the customer was never sent it, or the address is paused)."
    emit(ctx, record, lambda: ctx.console.print(f"Invoice {invoice.number} is void; its links no longer work.{note}"))
