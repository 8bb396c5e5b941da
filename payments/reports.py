"""Read-only views for finance: the accounting export, usage by hour and day (with the servers' CPU,
memory and latency then), aging, the audit trail.

They read invoices, payments and the outbox together, so they live with payments (links never
imports payments)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from emails.models import OutboxMessage, OutboxStatus
from links.models import Customer, Invoice, InvoiceStatus, LinkOpen, PaymentLink
from payments.models import Payment, PaymentAllocation, PaymentStatus
from plumbing.audit import AuditEntry
from plumbing.db import chunked
from plumbing.i18n import format_money
from plumbing.usage import LATENCY_BUCKETS_MS, UsageSample, percentile_ms

EXPORT_COLUMNS = (
    "number", "customer_email", "customer_name", "status", "currency", "amount_due", "amount_due_formatted", "amount_paid",
    "amount_paid_formatted", "amount_refunded", "description", "due_date", "created_at", "paid_at", "stripe_payment_intent",
    "card", "link_sent_at", "link_first_opened_at", "link_last_opened_at", "link_opens", "needs_attention", "balance", "payments",
    "allocation", "payment_intents", "receipt_numbers", "payment_amounts",
)  # fmt: skip
# The last three: every successful payment of the invoice, oldest first, one value per payment (JSON: lists;
# CSV: joined with "; "). A part-paid invoice has several, and finance matches each PaymentIntent to a payout;
# stripe_payment_intent and card stay the latest payment's, and payments their count, for the tools that read them.


# CSV injection (formula injection), OWASP: https://owasp.org/www-community/attacks/CSV_Injection
# A spreadsheet treats a cell that begins with =, +, -, @, a tab (0x09) or a carriage return (0x0D)
# as a formula; OWASP's remedy is to prefix such a cell with a single quote ('), which the
# spreadsheet reads as "this is text" (and shows without the quote), and to quote every cell that
# holds a separator or a quote (the csv module does that, so a value cannot open a new cell). We
# also treat a leading line feed and NUL (OWASP ASVS 1.2.10) as triggers, and look past leading
# spaces, which some spreadsheets skip before they evaluate the cell.
FORMULA_TRIGGERS = ("=", "+", "-", "@")
LEADING_TRIGGERS = ("\t", "\r", "\n", "\0")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet evaluates: text that could start a formula gets a leading `'`.
    Numbers, dates and plain text are returned unchanged."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(LEADING_TRIGGERS) or value.lstrip().startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


async def export_rows(session: AsyncSession, since: date | None) -> list[dict[str, Any]]:
    """One row per invoice, with the PaymentIntents that paid it and link activity, ready for an accounting import."""
    query = select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).order_by(Invoice.created_at, Invoice.number)
    if since is not None:
        query = query.where(Invoice.created_at >= datetime.combine(since, time.min, tzinfo=UTC))
    invoices = (await session.execute(query)).all()
    ids = [i.id for i, _ in invoices]
    paid_by: dict[Any, list[tuple[Payment, int]]] = {}  # invoice id -> (payment, this invoice's share) per successful payment
    splits: dict[Any, list[str]] = {}  # invoice id -> "pi_…: INV-1 10000 + INV-2 20000" per pay-all payment that paid it
    links: dict[Any, tuple[Any, Any, Any, int]] = {}
    for chunk in chunked(ids):
        paid = await session.execute(
            select(Payment).where(Payment.invoice_id.in_(chunk), Payment.status == PaymentStatus.SUCCEEDED, Payment.scope != "all")
        )
        for p in paid.scalars():
            paid_by.setdefault(p.invoice_id, []).append((p, p.amount))
        shared = await session.execute(
            select(PaymentAllocation.invoice_id, PaymentAllocation.amount, Payment)
            .join(Payment, Payment.id == PaymentAllocation.payment_id)
            .where(PaymentAllocation.invoice_id.in_(chunk), Payment.status == PaymentStatus.SUCCEEDED)
        )
        pay_all = list(shared.all())
        lines = await _allocation_lines(session, list({p.id for _, _, p in pay_all}))
        for invoice_id, share, p in pay_all:
            paid_by.setdefault(invoice_id, []).append((p, share))
            splits.setdefault(invoice_id, []).append(f"{p.stripe_payment_intent_id}: {lines.get(p.id, '')}")
        activity = await session.execute(
            select(
                PaymentLink.invoice_id,
                func.min(PaymentLink.sent_at),
                func.min(PaymentLink.first_opened_at),
                func.max(PaymentLink.last_opened_at),
                func.sum(PaymentLink.open_count),
            )
            .where(PaymentLink.invoice_id.in_(chunk))
            .group_by(PaymentLink.invoice_id)
        )
        links.update({row[0]: (row[1], row[2], row[3], int(row[4] or 0)) for row in activity})
    rows = []
    for invoice, customer in invoices:
        # Its own payments and the pay-all payments it was part of, oldest first; the last one is "the" payment.
        paid_parts = sorted(paid_by.get(invoice.id, []), key=lambda part: (part[0].succeeded_at or part[0].created_at, part[0].created_at))
        payment = paid_parts[-1][0] if paid_parts else None
        sent, first_open, last_open, opens = links.get(invoice.id, (None, None, None, 0))
        rows.append(
            {
                "number": invoice.number,
                "customer_email": customer.email,
                "customer_name": customer.name,
                "status": invoice.status,
                "currency": invoice.currency,
                "amount_due": invoice.amount_due,
                "amount_due_formatted": format_money(invoice.amount_due, invoice.currency),
                "amount_paid": invoice.amount_paid,
                "amount_paid_formatted": format_money(invoice.amount_paid, invoice.currency),
                "amount_refunded": invoice.amount_refunded,
                "description": invoice.description,
                "due_date": invoice.due_date,
                "created_at": invoice.created_at,
                "paid_at": invoice.paid_at,
                "stripe_payment_intent": payment.stripe_payment_intent_id if payment else None,
                "card": f"{payment.brand} {payment.last4}" if payment and payment.last4 else None,
                "link_sent_at": sent,
                "link_first_opened_at": first_open,
                "link_last_opened_at": last_open,
                "link_opens": opens,
                "needs_attention": invoice.needs_attention,
                "balance": max(invoice.amount_due - invoice.amount_paid, 0) if invoice.status in InvoiceStatus.UNSETTLED else 0,
                "payments": len(paid_parts),  # payments that counted (part payments: more than one)
                "allocation": "; ".join(splits.get(invoice.id, [])) or None,  # paid together with other invoices
                "payment_intents": [p.stripe_payment_intent_id for p, _ in paid_parts],
                "receipt_numbers": [p.receipt_number for p, _ in paid_parts],
                "payment_amounts": [share for _, share in paid_parts],  # minor units; a pay-all payment: this invoice's share
            }
        )
    return rows


async def _allocation_lines(session: AsyncSession, payment_ids: list[Any]) -> dict[Any, str]:
    """Each pay-all payment's allocation as one cell: "INV-000001 10000 + INV-000002 20000" (minor units)."""
    result: dict[Any, list[str]] = {}
    for chunk in chunked(payment_ids):
        rows = await session.execute(
            select(PaymentAllocation.payment_id, Invoice.number, PaymentAllocation.amount)
            .join(Invoice, Invoice.id == PaymentAllocation.invoice_id)
            .where(PaymentAllocation.payment_id.in_(chunk))
            .order_by(Invoice.number)
        )
        for payment_id, number, amount in rows:
            result.setdefault(payment_id, []).append(f"{number} {amount}")
    return {payment_id: " + ".join(parts) for payment_id, parts in result.items()}


@dataclass(frozen=True)
class HourSystem:
    """What the servers did in one hour of the day (UTC), over the report's days."""

    cpu_percent: float | None  # web processes' mean CPU use (% of one core) in the hour's samples
    cpu_percent_max: float | None  # the busiest sample's
    rss_bytes_max: int | None  # the largest resident memory of any process
    load1: float | None  # the hosts' mean 1-minute load average
    p95_ms: float | None  # p95 request latency (web), from the samples' histograms
    requests: int


@dataclass(frozen=True)
class Usage:
    days: int
    by_hour: dict[str, list[int]]  # series name -> 24 counts (UTC hour of day)
    by_day: dict[str, list[int]]  # series name -> 31 counts (day of month)
    system: list[HourSystem] = field(default_factory=list)  # 24 hours; empty hours have None
    samples: int = 0

    def peak_hour(self, series: str = "opens") -> int | None:
        counts = self.by_hour[series]
        return counts.index(max(counts)) if any(counts) else None

    def busiest_days(self, series: str = "opens", top: int = 5) -> list[tuple[int, int]]:
        """(day of month, count), busiest first, days without any left out."""
        ranked = sorted(((count, -day) for day, count in enumerate(self.by_day[series], start=1) if count), reverse=True)
        return [(-day, count) for count, day in ranked[:top]]


USAGE_SERIES = ("opens", "attempts", "payments", "emails")


async def usage(session: AsyncSession, days: int, now: datetime) -> Usage:
    """Opens, pay attempts, payments and emails by hour of day and day of month, joined with the
    system usage samples (CPU, memory, load, p95 latency) of the same hours."""
    since = now - timedelta(days=days)
    one = literal(1)
    series = {  # (when, how many): a row of link_opens counts a link's opens in a minute (links/opens.py)
        "opens": select(LinkOpen.opened_at, LinkOpen.opens).where(LinkOpen.opened_at >= since),
        "attempts": select(Payment.created_at, one).where(Payment.created_at >= since),
        "payments": select(Payment.succeeded_at, one).where(Payment.succeeded_at >= since),
        "emails": select(OutboxMessage.sent_at, one).where(OutboxMessage.status == OutboxStatus.SENT, OutboxMessage.sent_at >= since),
    }
    by_hour: dict[str, list[int]] = {}
    by_day: dict[str, list[int]] = {}
    for name, query in series.items():
        hours: Counter[int] = Counter()
        month_days: Counter[int] = Counter()
        for at, count in await session.execute(query):
            if at is not None:
                hours[at.hour] += count
                month_days[at.day] += count
        by_hour[name] = [hours.get(h, 0) for h in range(24)]
        by_day[name] = [month_days.get(d, 0) for d in range(1, 32)]
    system, samples = await _system_by_hour(session, since)
    return Usage(days, by_hour, by_day, system, samples)


async def _system_by_hour(session: AsyncSession, since: datetime) -> tuple[list[HourSystem], int]:
    rows = (
        await session.execute(
            select(
                UsageSample.at,
                UsageSample.role,
                UsageSample.cpu_percent,
                UsageSample.rss_bytes,
                UsageSample.load1,
                UsageSample.latency_ms_buckets,
            ).where(UsageSample.at >= since)
        )
    ).all()
    cpu: list[list[float]] = [[] for _ in range(24)]
    rss: list[int] = [0] * 24
    load: list[list[float]] = [[] for _ in range(24)]
    buckets: list[list[int]] = [[0] * (len(LATENCY_BUCKETS_MS) + 1) for _ in range(24)]
    for at, role, cpu_percent, rss_bytes, load1, latency in rows:
        hour = at.hour
        if role == "web":
            cpu[hour].append(cpu_percent)
        rss[hour] = max(rss[hour], rss_bytes)
        if load1 is not None:
            load[hour].append(load1)
        if latency:
            buckets[hour] = [a + b for a, b in zip(buckets[hour], latency, strict=False)]
    hours = [
        HourSystem(
            cpu_percent=round(sum(cpu[h]) / len(cpu[h]), 1) if cpu[h] else None,
            cpu_percent_max=round(max(cpu[h]), 1) if cpu[h] else None,
            rss_bytes_max=rss[h] or None,
            load1=round(sum(load[h]) / len(load[h]), 2) if load[h] else None,
            p95_ms=percentile_ms(buckets[h]),
            requests=sum(buckets[h]),
        )
        for h in range(24)
    ]
    return hours, len(rows)


AGING_BUCKETS = (("not yet due", None, 0), ("1-30 days", 1, 30), ("31-60 days", 31, 60), ("61-90 days", 61, 90), ("over 90 days", 91, None))


async def aging(session: AsyncSession, today: date) -> dict[str, dict[str, tuple[int, int]]]:
    """Open invoices by days overdue: bucket -> currency -> (count, total in minor units)."""
    rows = (
        await session.execute(
            select(Invoice.due_date, Invoice.currency, Invoice.amount_due - Invoice.amount_paid).where(
                Invoice.status.in_(InvoiceStatus.UNSETTLED)
            )
        )
    ).all()
    table: dict[str, dict[str, tuple[int, int]]] = {name: {} for name, _, _ in AGING_BUCKETS}
    for due, currency, outstanding in rows:
        overdue = (today - due).days if due else 0
        for name, low, high in AGING_BUCKETS:
            if (low is None or overdue >= low) and (high is None or overdue <= high):
                count, total = table[name].get(currency, (0, 0))
                table[name][currency] = (count + 1, total + int(outstanding))
                break
    return table


async def audit_entries(session: AsyncSession, invoice_number: str | None, limit: int) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if invoice_number:
        query = query.where(AuditEntry.subject == f"invoice:{invoice_number}")
    return list(reversed((await session.execute(query)).scalars().all()))
