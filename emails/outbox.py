"""The durable outbox: enqueue inside the caller's transaction; claim, send, retry with backoff.

Delivery is at-least-once. A row is claimed under a lease; if the worker dies before it records
the result, the lease runs out and another worker sends the row again with the same Message-ID,
so a resend after a crash is recognisable. Claiming is one atomic UPDATE ... RETURNING (with
FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE), so two
workers never hold the same row at once.

This is infrastructure: it knows nothing of customers or invoices. A message that goes dead is
reported to a `DeadLetterHook` (the invoicing code's policy, see links/hooks.py), in the same
transaction that marks the row dead. Whether a customer's address is paused is decided by the
domain code that queues a message (links.hooks.queue_customer_email), not here.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import make_msgid, parseaddr
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from emails.messages import EmailContent, finance_alert_message
from emails.models import OutboxMessage, OutboxStatus
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings


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


@dataclass(frozen=True)
class DeadMessage:
    """A message the outbox gave up on, as reported to the dead-letter hook."""

    id: int
    kind: str
    recipient: str
    subject: str
    invoice_id: uuid.UUID | None
    error: str
    recipient_fault: bool  # the server refused the address itself (not the content, not our settings)


# Applies domain policy to a dead message, inside the transaction that marks it dead.
DeadLetterHook = Callable[[AsyncSession, DeadMessage], Awaitable[None]]


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
    on_dead: DeadLetterHook | None = None,
) -> str:
    """Record a failed try: retry later with backoff, or go dead. Returns the new status.

    A dead message is never silent: it is audited, and `on_dead` (the domain's policy: flag the
    invoice, pause a refused address, alert finance) runs in the same transaction, so the row is
    dead exactly when the policy was applied. `recipient_fault` says the server refused the
    address itself; a message refused for its content or for our server's settings is not."""
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
        audit.record(session, "worker", "email.dead", f"outbox:{row.id}", kind=row.kind, error=error[:500])
        if on_dead is not None:
            dead_message = DeadMessage(row.id, row.kind, row.recipient, row.subject, row.invoice_id, error, recipient_fault)
            await on_dead(session, dead_message)
    return OutboxStatus.DEAD


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
