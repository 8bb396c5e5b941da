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

When a message goes dead (the rules are in emails/sender.py; in short): only a 5xx refusal of that
very message, or a message that can never be built, kills it at once. While the server cannot be
reached, answers 4xx, or a template fails, a message waits, with capped exponential backoff and
jitter, for OUTBOX_GIVE_UP_AFTER_HOURS from when it was queued (or re-queued by `outbox retry`), and
only then goes dead, with the last error as its reason. An unreachable server is the worker's
condition, not the message's: the messages it could not try are handed back untouched (no
attempt counted, still due), and the worker waits before it tries the server again.

Bodies (text, html, payload) of sent and dead messages are purged after OUTBOX_KEEP_DAYS
(`purge_old_messages`); the record (recipient, subject, status, dates, Message-ID) stays.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from sqlalchemy import and_, func, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from emails.messages import EmailContent, Kind, finance_alert_message
from emails.models import OutboxMessage, OutboxStatus
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings

# A generator of our own: jitter must not depend on (or disturb) the global random state.
_jitter = random.Random()

log = logging.getLogger("paylink.outbox")


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
    waiting_since: datetime | None = None  # queued (or re-queued) at: OUTBOX_GIVE_UP_AFTER_HOURS counts from here
    invoice_id: uuid.UUID | None = None  # what the message is about (attachments: the invoice or receipt PDF)


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


def new_message_id(kind: str, domain: str) -> str:
    """A Message-ID that stays the same across retries (it is stored with the row). Made from the OS's
    random source rather than email.utils.make_msgid, which draws on the global `random` generator."""
    return f"<{int(time.time() * 1000)}.{secrets.token_hex(8)}.{kind}@{domain}>"


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
        message_id=new_message_id(content.kind, mail_domain(settings.mail_from)),
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
            OutboxMessage.created_at,
            OutboxMessage.requeued_at,
            OutboxMessage.invoice_id,
        )
    )
    async with sessions.begin() as session:
        rows = (await session.execute(claim)).all()
    claimed = [
        ClaimedMessage(
            token,
            r.id,
            r.kind,
            r.recipient,
            r.subject,
            r.text,
            r.html,
            r.message_id,
            r.attempts,
            r.payload,
            r.requeued_at or r.created_at,
            r.invoice_id,
        )
        for r in rows
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
    return _jitter.uniform(ceiling / 2, ceiling)


def give_up_after(settings: Settings) -> timedelta:
    """How long a message may wait for a server that is down or says "later" (OUTBOX_GIVE_UP_AFTER_HOURS)."""
    return timedelta(hours=settings.outbox_give_up_after_hours)


def gave_up_reason(settings: Settings, error: str) -> str:
    return f"gave up after {settings.outbox_give_up_after_hours:g} h without delivery; last error: {error}"


def _waiting_since() -> Any:
    """SQL: when the message's wait began (queued, or re-queued by `outbox retry`)."""
    return func.coalesce(OutboxMessage.requeued_at, OutboxMessage.created_at)


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
    """Record a failed try of this message: retry later with backoff, or go dead. Returns the new status.

    `permanent` (a 5xx refusal of this message, or a message that can never be built) kills it now.
    Anything else (4xx, a template error) only kills it once it has waited OUTBOX_GIVE_UP_AFTER_HOURS,
    with the last error as the reason; until then it is retried with capped exponential backoff.

    A dead message is never silent: it is audited, and `on_dead` (the domain's policy: flag the
    invoice, pause a refused address, alert finance) runs in the same transaction, so the row is
    dead exactly when the policy was applied. `recipient_fault` says the server refused the
    address itself; a message refused for its content or for our server's settings is not."""
    now = utcnow()
    async with sessions.begin() as session:
        row = await session.get_one(OutboxMessage, message.id, with_for_update=True)
        if row.lease_token != message.lease_token or row.status != OutboxStatus.PENDING:
            return row.status  # our lease ran out and another worker holds the row now
        row.attempts += 1
        row.lease_until = None
        row.lease_token = None
        overdue = (row.requeued_at or row.created_at) + give_up_after(settings) <= now
        if not permanent and not overdue:
            row.last_error = error[:2000]
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.attempts, settings))
            return OutboxStatus.PENDING
        await _mark_dead(session, row, error if permanent else gave_up_reason(settings, error), recipient_fault, on_dead)
    return OutboxStatus.DEAD


async def _mark_dead(session: AsyncSession, row: OutboxMessage, reason: str, recipient_fault: bool, on_dead: DeadLetterHook | None) -> None:
    row.status = OutboxStatus.DEAD
    row.last_error = reason[:2000]
    row.lease_until = None
    row.lease_token = None
    audit.record(session, "worker", "email.dead", f"outbox:{row.id}", kind=row.kind, error=reason[:500])
    if row.kind == Kind.FINANCE_ALERT:
        # Nobody else will hear of it: the log and `outbox status` are where it stays visible.
        log.error("email.finance_alert_dead id=%s recipient=%s subject=%r reason=%s", row.id, row.recipient, row.subject, reason[:300])
    if on_dead is not None:
        await on_dead(session, DeadMessage(row.id, row.kind, row.recipient, row.subject, row.invoice_id, reason, recipient_fault))


async def defer_unreachable(sessions: async_sessionmaker[AsyncSession], lease_token: str, message_ids: list[int], error: str) -> None:
    """Hand back claimed messages that could not be tried because the server is unreachable.

    Not a failure of theirs: no attempt is counted and they stay due, so they go out at the first
    try after the server is back (the worker itself waits before it tries the server again). The
    error is kept on the row, for `outbox status`."""
    if not message_ids:
        return
    async with sessions.begin() as session:
        await session.execute(
            update(OutboxMessage)
            .where(
                OutboxMessage.id.in_(message_ids), OutboxMessage.lease_token == lease_token, OutboxMessage.status == OutboxStatus.PENDING
            )
            .values(lease_until=None, lease_token=None, last_error=error[:2000])
        )


async def give_up_waiting(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    error: str,
    *,
    on_dead: DeadLetterHook | None = None,
    now: datetime | None = None,
    chunk: int = 200,
) -> list[int]:
    """The server is unreachable: every waiting message queued longer than OUTBOX_GIVE_UP_AFTER_HOURS
    ago goes dead now, with `error` in its reason, and is reported to `on_dead` (which queues the
    alert to finance: that alert is new, so it waits its own full period). Returns their ids."""
    now = now or utcnow()
    cutoff = now - give_up_after(settings)
    dead: list[int] = []
    while True:
        overdue = (
            select(OutboxMessage)
            .where(
                OutboxMessage.status == OutboxStatus.PENDING,
                or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now),
                _waiting_since() <= cutoff,
            )
            .order_by(OutboxMessage.id)
            .limit(chunk)
            .with_for_update(skip_locked=True)
        )
        async with sessions.begin() as session:
            rows = list((await session.execute(overdue)).scalars())
            for row in rows:
                await _mark_dead(session, row, gave_up_reason(settings, error), False, on_dead)
        dead += [row.id for row in rows]
        if len(rows) < chunk:
            break
    if dead:
        log.error("email.gave_up count=%d after_hours=%g error=%s", len(dead), settings.outbox_give_up_after_hours, error)
    return dead


@dataclass(frozen=True)
class OutboxCounts:
    pending: int
    sent: int
    dead: int
    oldest_pending_at: datetime | None
    dead_finance_alerts: int = 0  # alerts finance never got: each is also logged at ERROR


async def outbox_counts(session: AsyncSession) -> OutboxCounts:
    rows = (await session.execute(select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status))).all()
    counts = {status: count for status, count in rows}
    oldest = (
        await session.execute(select(func.min(OutboxMessage.created_at)).where(OutboxMessage.status == OutboxStatus.PENDING))
    ).scalar_one_or_none()
    dead_alerts = (
        await session.execute(
            select(func.count()).where(OutboxMessage.status == OutboxStatus.DEAD, OutboxMessage.kind == Kind.FINANCE_ALERT)
        )
    ).scalar_one()
    return OutboxCounts(
        pending=counts.get(OutboxStatus.PENDING, 0),
        sent=counts.get(OutboxStatus.SENT, 0),
        dead=counts.get(OutboxStatus.DEAD, 0),
        oldest_pending_at=oldest,
        dead_finance_alerts=int(dead_alerts),
    )


async def recent_dead(session: AsyncSession, limit: int = 10) -> list[OutboxMessage]:
    """The newest dead messages, newest first, and with them the newest dead alerts to finance, however
    many customer emails died after them: an alert finance never got must stay in sight."""
    dead = select(OutboxMessage).where(OutboxMessage.status == OutboxStatus.DEAD).order_by(OutboxMessage.id.desc()).limit(limit)
    alerts = dead.where(OutboxMessage.kind == Kind.FINANCE_ALERT)
    found = {m.id: m for query in (dead, alerts) for m in (await session.execute(query)).scalars()}
    return sorted(found.values(), key=lambda m: m.id, reverse=True)


def _has_body() -> Any:
    """SQL: the message can still be sent (its body was not purged)."""
    return or_(OutboxMessage.payload.is_not(None), OutboxMessage.text != "")


async def requeue(session: AsyncSession, *, include_dead: bool) -> int:
    """Make waiting (and, with include_dead, dead) messages due now, each with a fresh
    OUTBOX_GIVE_UP_AFTER_HOURS to wait. Messages whose body was purged stay as they are.
    Returns how many."""
    now = utcnow()
    statuses = [OutboxStatus.PENDING] + ([OutboxStatus.DEAD] if include_dead else [])
    result = await session.execute(
        update(OutboxMessage)
        .where(
            and_(
                OutboxMessage.status.in_(statuses),
                _has_body(),
                or_(OutboxMessage.status == OutboxStatus.DEAD, OutboxMessage.next_attempt_at > now),
            )
        )
        .values(status=OutboxStatus.PENDING, next_attempt_at=now, requeued_at=now, lease_until=None, lease_token=None, attempts=0)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def purge_old_messages(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, *, now: datetime | None = None, chunk: int = 1000
) -> int:
    """Empty the bodies (text, html, payload) of sent and dead messages queued more than
    OUTBOX_KEEP_DAYS ago; the record (recipient, subject, status, dates, Message-ID) stays.
    In chunks, each its own short transaction. Returns how many were emptied."""
    cutoff = (now or utcnow()) - timedelta(days=settings.outbox_keep_days)
    total = 0
    while True:
        async with sessions.begin() as session:
            ids = list(
                (
                    await session.execute(
                        select(OutboxMessage.id)
                        .where(
                            OutboxMessage.created_at < cutoff,
                            OutboxMessage.status.in_([OutboxStatus.SENT, OutboxStatus.DEAD]),
                            or_(_has_body(), OutboxMessage.html != ""),
                        )
                        .order_by(OutboxMessage.id)
                        .limit(chunk)
                    )
                ).scalars()
            )
            if ids:
                await session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(text="", html="", payload=null()))
        total += len(ids)
        if len(ids) < chunk:
            return total
