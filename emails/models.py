"""The durable outbox: every email is a row written in the transaction that causes it."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from plumbing.db import Base, utcnow
from plumbing.logs import current_request_id


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_created_at", "created_at"),  # the purge of old bodies (OUTBOX_KEEP_DAYS)
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(300))
    text: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    # For messages rendered at send time: the facts to render from, in JSON; text and html stay
    # empty. Receipts (so that applying a payment stays cheap) and every message that carries a link
    # (invoice, new link, reminder, address confirmation): the payload names the link by id and
    # expiry, and the signed URL is built when the message is sent, so no table holds a token.
    # Bodies and payloads of sent and dead messages are purged after OUTBOX_KEEP_DAYS.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)  # stable across retries
    invoice_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("invoices.id"))
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None]  # set while a worker holds the row
    lease_token: Mapped[str | None] = mapped_column(String(36))  # which worker's claim; results must match it
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by `outbox retry`: the message waits OUTBOX_GIVE_UP_AFTER_HOURS again from here.
    requeued_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    request_id: Mapped[str | None] = mapped_column(String(64), default=current_request_id)  # the request that queued it
