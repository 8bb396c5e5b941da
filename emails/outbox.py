"""The durable outbox: enqueue inside the caller's transaction; claim, send, retry with backoff.

Delivery is at-least-once. A row is claimed under a lease; if the worker dies before it records
the result, the lease runs out and another worker sends the row again with the same Message-ID,
so a resend after a crash is recognisable. Claiming is one atomic UPDATE ... RETURNING (with
FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE), so two
workers never hold the same row at once.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import make_msgid, parseaddr
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

import audit
from db import utcnow
from emails.messages import EmailContent, Kind, finance_alert_message
from emails.models import OutboxMessage, OutboxStatus
from links.models import Customer, Invoice
from settings import Settings


@dataclass(frozen=True)
class ClaimedMessage:
    lease_token: str
    id: int
    kind: str
    recipient: str
    subject: str
    text: str
    html: str
    message_id: str
    attempts: int
    payload: dict[str, Any] | None  # facts to render at send time, or None when text and html are set


def mail_domain(mail_from: str) -> str:
    address = parseaddr(mail_from)[1]
    return address.rpartition("@")[2] or "localhost"


def enqueue(
    session: AsyncSession | Session,
    settings: Settings,
    recipient: str,
    content: EmailContent,
    *,
    invoice_id: uuid.UUID | None = None,
) -> OutboxMessage:
    """Add a message to the caller's transaction: if it rolls back, the email never existed."""
    message = OutboxMessage(
        kind=content.kind,
        recipient=recipient,
        subject=content.subject,
        text=content.text,
        html=content.html,
        message_id=make_msgid(idstring=content.kind, domain=mail_domain(settings.mail_from)),
        invoice_id=invoice_id,
        status=OutboxStatus.PENDING,
        next_attempt_at=utcnow(),
    )
    session.add(message)
    return message


def enqueue_to_render(
    session: AsyncSession | Session,
    settings: Settings,
    recipient: str,
    kind: str,
    subject: str,
    payload: dict[str, Any],
    *,
    invoice_id: uuid.UUID | None = None,
) -> OutboxMessage:
    """Like `enqueue`, for a message the worker renders from `payload` when it sends it."""
    message = enqueue(session, settings, recipient, EmailContent(kind, subject, "", ""), invoice_id=invoice_id)
    message.payload = payload
    return message


def alert_finance(
    session: AsyncSession | Session, settings: Settings, title: str, lines: list[str], *, invoice_id: uuid.UUID | None = None
) -> None:
    """Queue an alert for the finance team, if FINANCE_EMAIL is configured."""
    if settings.finance_email:
        enqueue(
            session, settings, settings.finance_email, finance_alert_message(settings.merchant_name, title, lines), invoice_id=invoice_id
        )


async def claim_due_messages(
    sessions: async_sessionmaker[AsyncSession], *, batch_size: int, lease_seconds: float, now: datetime | None = None
) -> list[ClaimedMessage]:
    """Claim up to batch_size due messages under a lease. Only the holder of the lease token may
    record their result, so a worker that outlived its lease cannot overwrite another's."""
    now = now or utcnow()
    token = str(uuid.uuid4())
    due = (
        select(OutboxMessage.id)
        .where(
            OutboxMessage.status == OutboxStatus.PENDING,
            OutboxMessage.next_attempt_at <= now,
            or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now),
        )
        .order_by(OutboxMessage.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claim = (
        update(OutboxMessage)
        .where(OutboxMessage.id.in_(due))
        .values(lease_until=now + timedelta(seconds=lease_seconds), lease_token=token)
        .returning(
            OutboxMessage.id,
            OutboxMessage.kind,
            OutboxMessage.recipient,
            OutboxMessage.subject,
            OutboxMessage.text,
            OutboxMessage.html,
            OutboxMessage.message_id,
            OutboxMessage.attempts,
            OutboxMessage.payload,
        )
    )
    async with sessions.begin() as session:
        rows = (await session.execute(claim)).all()
    claimed = [
        ClaimedMessage(token, r.id, r.kind, r.recipient, r.subject, r.text, r.html, r.message_id, r.attempts, r.payload) for r in rows
    ]
    return sorted(claimed, key=lambda m: m.id)


async def mark_sent(sessions: async_sessionmaker[AsyncSession], lease_token: str, message_ids: list[int]) -> None:
    if not message_ids:
        return
    async with sessions.begin() as session:
        await session.execute(
            update(OutboxMessage)
            .where(
                OutboxMessage.id.in_(message_ids), OutboxMessage.lease_token == lease_token, OutboxMessage.status == OutboxStatus.PENDING
            )
            .values(
                status=OutboxStatus.SENT,
                sent_at=utcnow(),
                lease_until=None,
                lease_token=None,
                attempts=OutboxMessage.attempts + 1,
                last_error=None,
            )
        )


async def release(sessions: async_sessionmaker[AsyncSession], lease_token: str, message_ids: list[int]) -> None:
    """Give claimed messages back untried (the lease is running out): due again at once."""
    if not message_ids:
        return
    async with sessions.begin() as session:
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(message_ids), OutboxMessage.lease_token == lease_token)
            .values(lease_until=None, lease_token=None)
        )


def backoff_seconds(attempts: int, settings: Settings) -> float:
    """Exponential backoff with full jitter, capped: attempt 1 -> up to base, 2 -> 2x base, ..."""
    ceiling = min(settings.outbox_backoff_max_seconds, settings.outbox_backoff_base_seconds * 2 ** max(attempts - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


async def mark_failed(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    message: ClaimedMessage,
    error: str,
    *,
    permanent: bool,
    recipient_fault: bool = False,
) -> str:
    """Record a failed try: retry later with backoff, or go dead (and tell finance). Returns the new status.

    `recipient_fault` (the server refused the address itself) also marks the customer's address
    undeliverable; a message refused for its content or our server's settings does not."""
    attempts = message.attempts + 1
    dead = permanent or attempts >= settings.outbox_max_attempts
    async with sessions.begin() as session:
        row = await session.get_one(OutboxMessage, message.id, with_for_update=True)
        if row.lease_token != message.lease_token or row.status != OutboxStatus.PENDING:
            return row.status  # our lease ran out and another worker holds the row now
        row.attempts = attempts
        row.last_error = error[:2000]
        row.lease_until = None
        row.lease_token = None
        if not dead:
            row.next_attempt_at = utcnow() + timedelta(seconds=backoff_seconds(attempts, settings))
            return OutboxStatus.PENDING
        row.status = OutboxStatus.DEAD
        await _flag_undeliverable(session, settings, row, error, recipient_fault=recipient_fault)
    return OutboxStatus.DEAD


async def _flag_undeliverable(session: AsyncSession, settings: Settings, row: OutboxMessage, error: str, *, recipient_fault: bool) -> None:
    """A permanent failure is never silent: flag the invoice (and a refused address), alert finance."""
    audit.record(session, "worker", "email.dead", f"outbox:{row.id}", kind=row.kind, error=error[:500])
    if row.kind == Kind.FINANCE_ALERT:
        return
    customer = (await session.execute(select(Customer).where(Customer.email == row.recipient))).scalar_one_or_none()
    if recipient_fault and customer is not None and customer.email_undeliverable_at is None:
        customer.email_undeliverable_at = utcnow()
        customer.email_undeliverable_reason = error[:500]
    invoice_number = None
    if row.invoice_id is not None:
        invoice = await session.get_one(Invoice, row.invoice_id)
        invoice.needs_attention = f"email undeliverable to {row.recipient}: {error[:300]}"
        invoice_number = invoice.number
    alert_finance(
        session,
        settings,
        f"Email undeliverable to {row.recipient}",
        [
            f"Message: {row.subject}",
            f"Invoice: {invoice_number or '-'}",
            f"Reason: {error[:300]}",
            "Sends to this address are paused until it is corrected (python -m links customer update).",
        ],
        invoice_id=row.invoice_id,
    )


@dataclass(frozen=True)
class OutboxCounts:
    pending: int
    sent: int
    dead: int
    oldest_pending_at: datetime | None


async def outbox_counts(session: AsyncSession) -> OutboxCounts:
    rows = (await session.execute(select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status))).all()
    counts = {status: count for status, count in rows}
    oldest = (
        await session.execute(select(func.min(OutboxMessage.created_at)).where(OutboxMessage.status == OutboxStatus.PENDING))
    ).scalar_one_or_none()
    return OutboxCounts(
        pending=counts.get(OutboxStatus.PENDING, 0),
        sent=counts.get(OutboxStatus.SENT, 0),
        dead=counts.get(OutboxStatus.DEAD, 0),
        oldest_pending_at=oldest,
    )


async def recent_dead(session: AsyncSession, limit: int = 10) -> list[OutboxMessage]:
    query = select(OutboxMessage).where(OutboxMessage.status == OutboxStatus.DEAD).order_by(OutboxMessage.id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


async def requeue(session: AsyncSession, *, include_dead: bool) -> int:
    """Make waiting (and, with include_dead, dead) messages due now. Returns how many."""
    statuses = [OutboxStatus.PENDING] + ([OutboxStatus.DEAD] if include_dead else [])
    result = await session.execute(
        update(OutboxMessage)
        .where(
            and_(
                OutboxMessage.status.in_(statuses), or_(OutboxMessage.status == OutboxStatus.DEAD, OutboxMessage.next_attempt_at > utcnow())
            )
        )
        .values(status=OutboxStatus.PENDING, next_attempt_at=utcnow(), lease_until=None, lease_token=None, attempts=0)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
