"""The invoicing code's policy around the outbox, which itself knows nothing of customers or invoices.

- `queue_customer_email` is the one way to queue an email to a customer, of any kind: it holds
  the message while the customer's address is paused (a permanent failure marked it
  undeliverable), and records the hold in the audit log.
- `apply_dead_message_policy` is the outbox's dead-letter hook: a message that can never be
  delivered (refused for good, or still undelivered after OUTBOX_GIVE_UP_AFTER_HOURS) flags its
  invoice, pauses a refused address and tells finance.
- `append_flag` adds a reason to an invoice's "needs attention" note without erasing the others.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from emails import outbox
from emails.messages import EmailContent, Kind
from emails.outbox import DeadMessage
from links.models import Customer, Invoice
from plumbing import audit
from plumbing.db import utcnow
from plumbing.settings import Settings

FLAG_SEPARATOR = "; "


def append_flag(invoice: Invoice, reason: str) -> bool:
    """Add a reason for finance to look at the invoice, keeping the earlier ones (a dispute stays on
    record when a receipt later bounces). The same reason twice is kept once. Returns whether it was new."""
    current = invoice.needs_attention
    if not current:
        invoice.needs_attention = reason
        return True
    sep = FLAG_SEPARATOR
    if current == reason or current.startswith(reason + sep) or current.endswith(sep + reason) or f"{sep}{reason}{sep}" in current:
        return False
    invoice.needs_attention = f"{current}{sep}{reason}"
    return True


def paused_reason(customer: Customer) -> str | None:
    """Why nothing may be emailed to this customer's address now (it failed permanently), or None."""
    if customer.email_undeliverable_at is None:
        return None
    return f"email undeliverable: {customer.email_undeliverable_reason or 'permanent failure'}"


def queue_customer_email(
    session: AsyncSession | Session,
    settings: Settings,
    customer: Customer,
    content: EmailContent,
    *,
    actor: str,
    payload: dict[str, Any] | None = None,
    invoice_id: uuid.UUID | None = None,
) -> bool:
    """Queue an email to the customer in the caller's transaction, unless their address is paused.

    Every message to a customer goes through here, whatever its kind (invoice, reminder, new link,
    receipt, verification), so the pause holds for all of them. With `payload`, the message is
    queued as facts that the sender renders when it sends it (`content` then carries only the kind
    and subject). A held message is recorded as `email.held` and not queued; returns whether it was
    queued. Works on a synchronous session too (the money state machine runs on one)."""
    held = paused_reason(customer)
    if held is not None:
        audit.record(
            session,
            actor,
            "email.held",
            f"customer:{customer.email}",
            kind=content.kind,
            reason=held,
            invoice=str(invoice_id) if invoice_id else None,
        )
        return False
    if payload is None:
        outbox.enqueue(session, settings, customer.email, content, invoice_id=invoice_id)
    else:
        outbox.enqueue_to_render(session, settings, customer.email, content.kind, content.subject, payload, invoice_id=invoice_id)
    return True


async def queue_recipient_email(
    session: AsyncSession,
    settings: Settings,
    recipient: str,
    content: EmailContent,
    *,
    actor: str,
    payload: dict[str, Any],
    invoice_id: uuid.UUID | None = None,
) -> bool:
    """`queue_customer_email` for an address that is not (necessarily) a customer's, such as the
    colleague an invoice is sent to: their own link is the proof of the address, so no verification
    is asked; an address that is a customer's own and is paused is held all the same."""
    customer = (await session.execute(select(Customer).where(Customer.email == recipient))).scalar_one_or_none()
    if customer is not None:
        return queue_customer_email(session, settings, customer, content, actor=actor, payload=payload, invoice_id=invoice_id)
    outbox.enqueue_to_render(session, settings, recipient, content.kind, content.subject, payload, invoice_id=invoice_id)
    return True


async def apply_dead_message_policy(settings: Settings, session: AsyncSession, dead: DeadMessage) -> None:
    """A message the outbox gave up on is never silent: flag its invoice, pause the address when the
    server refused it, and alert finance. Runs in the transaction that marks the message dead.

    Bind the settings (functools.partial) to get the outbox's `DeadLetterHook`."""
    if dead.kind == Kind.FINANCE_ALERT:
        # No alert about an alert (it could never end): the outbox logs it at ERROR, and
        # `outbox status` lists it among the dead until someone re-queues it.
        return
    error = dead.error
    customer = (await session.execute(select(Customer).where(Customer.email == dead.recipient))).scalar_one_or_none()
    if dead.recipient_fault and customer is not None and customer.email_undeliverable_at is None:
        customer.email_undeliverable_at = utcnow()
        customer.email_undeliverable_reason = error[:500]
    invoice_number = None
    if dead.invoice_id is not None:
        invoice = await session.get_one(Invoice, dead.invoice_id)
        append_flag(invoice, f"email undeliverable to {dead.recipient}: {error[:300]}")
        invoice_number = invoice.number
    lines = [f"Message: {dead.subject}", f"Invoice: {invoice_number or '-'}", f"Reason: {error[:300]}"]
    if dead.recipient_fault:
        lines.append("Sends to this address are paused until it is corrected (python -m links customer update).")
    outbox.alert_finance(session, settings, f"Email undeliverable to {dead.recipient}", lines, invoice_id=dead.invoice_id)
