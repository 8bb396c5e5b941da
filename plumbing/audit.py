"""The audit log: who did what to which subject, and when (and in which request: `request_id`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from plumbing.db import Base, utcnow
from plumbing.logs import current_request_id


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_subject", "subject"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))  # "cli:<user>", "link", "webhook", "worker"
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))  # e.g. "invoice:INV-0001"
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The request that caused it (the X-Request-ID header and the access log's request_id), if any.
    request_id: Mapped[str | None] = mapped_column(String(64))


def record(session: AsyncSession | Session, actor: str, action: str, subject: str, **details: Any) -> None:
    """Add an audit entry to the caller's transaction."""
    session.add(AuditEntry(actor=actor, action=action, subject=subject, details=details or None, request_id=current_request_id()))
