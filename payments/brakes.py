"""Brakes against card testing: how many SetupIntents, failed payments and POSTs a link, an invoice
or a client address may cause, counted in the database so that every web process on every machine
sees the same counts.

Limits (settings): SETUP_INTENTS_PER_LINK_DAY per link and per client address (SetupIntents, in a
day); PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR per invoice (counted from the payments table, see
checkout) and per client address (failed pay attempts, in an hour); POSTS_PER_CLIENT_MINUTE (every
state-changing POST of a client address, in a minute). Windows slide: a hit counts for exactly its
window after it happened.

How a hit is counted, race-free: in one transaction, lock the keys (PostgreSQL: a transaction-level
advisory lock per key, taken in sorted order; SQLite: writers are serialised by BEGIN IMMEDIATE),
count the key's hits inside the window, and insert one more only if the count is under the limit.
Concurrent requests queue on the lock, so no number of them can slip past a limit. The count is
taken BEFORE the caller calls Stripe: past a limit nothing is created there.

Past a limit: `TooManyAttempts` is raised; finance is alerted once per key and alert window (a
unique row in brake_trips, inserted with insert-or-ignore) and the audit log records the trip.
Rows do not pile up: a key's rows older than its window are deleted when it counts again, and
`purge` (the worker process calls it hourly, beside the other retention; safe from any scheduler) deletes every hit
older than a day and every trip older than two days.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.outbox import alert_finance
from payments.models import BrakeHit, BrakeTrip
from plumbing import audit
from plumbing.db import insert_ignore, utcnow
from plumbing.metrics import RATE_LIMIT_REFUSALS
from plumbing.settings import Settings

log = logging.getLogger("paylink.brakes")

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
KEEP_HITS = DAY  # the longest window
KEEP_TRIPS = 2 * DAY
MIN_ALERT_WINDOW = HOUR  # a per-minute brake alerts at most once an hour per key
_LOCK_CLASS = 0x6272  # "br": the advisory-lock namespace of the brakes (two-key form)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Brake:
    """One limit on one subject: at most `limit` hits of `what` per `window`."""

    what: str  # "setup_intents", "failed_payments", "posts"
    scope: str  # "link", "invoice", "client"
    subject: str  # link id hex, invoice id hex, or the client address's keyed hash
    limit: int
    window: timedelta
    setting: str  # the environment variable that sets `limit`
    label: str  # for people: "invoice INV-000042", "client address 3f9a…"
    audit_subject: str  # "invoice:INV-000042", "client:3f9a…"

    @property
    def key(self) -> str:
        return f"{self.what}:{self.scope}:{self.subject}"


class TooManyAttempts(Exception):
    """A brake is used up: the request is refused before anything reaches Stripe."""

    def __init__(self, brake: Brake) -> None:
        super().__init__(f"too many {brake.what} for {brake.scope}")
        self.brake = brake

    @property
    def retry_after_seconds(self) -> int:
        return int(self.brake.window.total_seconds())


_WHAT = {
    "setup_intents": "new-card setups (Stripe SetupIntents)",
    "failed_payments": "failed payment attempts",
    "posts": "form posts",
}


def _window_words(window: timedelta) -> str:
    return {MINUTE: "minute", HOUR: "hour", DAY: "day"}.get(window, f"{int(window.total_seconds())} s")


def _client(client: str) -> tuple[str, str]:
    return f"client address {client[:12]}… (keyed hash)", f"client:{client}"


# --- the brakes ------------------------------------------------------------------------------------


def setup_intents_per_link(settings: Settings, link_hex: str, invoice_number: str) -> Brake:
    return Brake(
        "setup_intents",
        "link",
        link_hex,
        settings.setup_intents_per_link_day,
        DAY,
        "SETUP_INTENTS_PER_LINK_DAY",
        f"invoice {invoice_number} (link {link_hex})",
        f"invoice:{invoice_number}",
    )


def setup_intents_per_invoice(settings: Settings, invoice_id_hex: str, invoice_number: str) -> Brake:
    """The same limit for all of the invoice's links together: each colleague link (up to 3 a day from the
    page) would otherwise bring a fresh budget of its own."""
    return Brake(
        "setup_intents",
        "invoice",
        invoice_id_hex,
        settings.setup_intents_per_link_day,
        DAY,
        "SETUP_INTENTS_PER_LINK_DAY",
        f"invoice {invoice_number} (all its links)",
        f"invoice:{invoice_number}",
    )


def setup_intents_per_client(settings: Settings, client: str) -> Brake:
    label, subject = _client(client)
    return Brake("setup_intents", "client", client, settings.setup_intents_per_link_day, DAY, "SETUP_INTENTS_PER_LINK_DAY", label, subject)


def failed_payments_per_invoice(settings: Settings, invoice_id_hex: str, invoice_number: str) -> Brake:
    """Counted from the payments table (see checkout), not from brake_hits."""
    return Brake(
        "failed_payments",
        "invoice",
        invoice_id_hex,
        settings.pay_failed_attempts_per_invoice_hour,
        HOUR,
        "PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR",
        f"invoice {invoice_number}",
        f"invoice:{invoice_number}",
    )


def failed_payments_per_client(settings: Settings, client: str) -> Brake:
    label, subject = _client(client)
    return Brake(
        "failed_payments",
        "client",
        client,
        settings.pay_failed_attempts_per_invoice_hour,
        HOUR,
        "PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR",
        label,
        subject,
    )


def posts_per_client(settings: Settings, client: str) -> Brake:
    label, subject = _client(client)
    return Brake("posts", "client", client, settings.posts_per_client_minute, MINUTE, "POSTS_PER_CLIENT_MINUTE", label, subject)


# --- counting ------------------------------------------------------------------------------------------


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big", signed=True)


async def lock_keys(session: AsyncSession, keys: list[str]) -> None:
    """Hold the keys until the transaction ends. PostgreSQL: advisory locks (sorted, so two requests
    never wait on each other crosswise); SQLite: the transaction's BEGIN IMMEDIATE already did it."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for lock_id in sorted({_lock_id(key) for key in keys}):
        await session.execute(text("SELECT pg_advisory_xact_lock(:class_id, :lock_id)"), {"class_id": _LOCK_CLASS, "lock_id": lock_id})


async def take(sessions: async_sessionmaker[AsyncSession], settings: Settings, *brakes: Brake, actor: str = "link") -> list[int]:
    """Count one hit under each brake and return the hits' ids (for `give_back`), or, when any brake
    is used up, count nothing, record the trip and raise TooManyAttempts (the first brake given
    that is used up: list the most specific first)."""
    now = utcnow()
    tripped: Brake | None = None
    async with sessions.begin() as session:
        await lock_keys(session, [brake.key for brake in brakes])
        for brake in brakes:
            await session.execute(delete(BrakeHit).where(BrakeHit.key == brake.key, BrakeHit.at <= now - brake.window))
            used = await session.scalar(select(func.count()).select_from(BrakeHit).where(BrakeHit.key == brake.key))
            if (used or 0) >= brake.limit:
                tripped = brake
                break
        if tripped is None:
            ids = [
                (await session.execute(insert(BrakeHit).values(key=brake.key, at=now).returning(BrakeHit.id))).scalar_one()
                for brake in brakes
            ]
            return ids
    raise await refuse(sessions, settings, tripped, actor=actor)


async def give_back(sessions: async_sessionmaker[AsyncSession], hit_ids: list[int]) -> None:
    """Uncount hits that turned out not to matter (a reserved pay attempt that did not fail)."""
    if hit_ids:
        async with sessions.begin() as session:
            await session.execute(delete(BrakeHit).where(BrakeHit.id.in_(hit_ids)))


async def refuse(sessions: async_sessionmaker[AsyncSession], settings: Settings, brake: Brake, *, actor: str = "link") -> TooManyAttempts:
    """Record that `brake` refused a request and return the exception to raise. The first refusal per
    key and alert window alerts finance and writes the audit entry; every refusal is logged."""
    now = utcnow()
    alert_window = max(brake.window, MIN_ALERT_WINDOW)
    window_start = _EPOCH + ((now - _EPOCH) // alert_window) * alert_window
    async with sessions.begin() as session:
        first = (
            await session.execute(
                insert_ignore(session, BrakeTrip).values(key=brake.key, window_start=window_start, tripped_at=now).returning(BrakeTrip.key)
            )
        ).first() is not None
        if first:
            per = _window_words(brake.window)
            alert_finance(
                session,
                settings,
                f"Too many attempts: {brake.label}",
                [
                    f"Limit reached: {brake.limit} {_WHAT[brake.what]} per {brake.scope} per {per} ({brake.setting}).",
                    f"Who: {brake.label}.",
                    "Further requests are refused before anything is sent to Stripe; the customer sees "
                    '"Too many attempts. Please try again later" until the count falls below the limit.',
                    "Many attempts through one link or from one address can be card testing (stolen card numbers "
                    "tried one after another). If this is a real customer, they can simply try again later.",
                ],
            )
            audit.record(
                session, actor, "brake.tripped", brake.audit_subject, brake=brake.key, limit=brake.limit, per=per, setting=brake.setting
            )
    log.warning(
        "brake.refused what=%s scope=%s limit=%d per=%s first=%s", brake.what, brake.scope, brake.limit, _window_words(brake.window), first
    )
    RATE_LIMIT_REFUSALS.labels(brake.what, brake.scope).inc()
    return TooManyAttempts(brake)


async def purge(session: AsyncSession, now: datetime | None = None) -> None:
    """Delete hits older than a day and trips older than two days (every key)."""
    now = now or utcnow()
    await session.execute(delete(BrakeHit).where(BrakeHit.at < now - KEEP_HITS))
    await session.execute(delete(BrakeTrip).where(BrakeTrip.window_start < now - KEEP_TRIPS))
