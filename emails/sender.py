"""Sending: claim due outbox messages and send them over one reused SMTP connection.

`run_once` sends what is due now; `run_forever` polls until stopped. Both only send mail: the
reminder schedule and the policy for dead messages belong to the worker process (services.py),
which passes that policy in as `on_dead`.

How failures are classified (every one is recorded on the row and logged):
- the server cannot be reached: not the messages' fault. They are handed back untouched (no attempt
  counted, still due) and the worker waits, with capped exponential backoff and jitter
  (OUTBOX_BACKOFF_BASE_SECONDS .. OUTBOX_BACKOFF_MAX_SECONDS), before it tries the server again; when
  the server is back, everything due goes out at once. While it stays down, messages that have
  waited OUTBOX_GIVE_UP_AFTER_HOURS go dead with the reason, and the log says ERROR once the oldest
  waiting message is an hour old;
- 4xx, our own settings refused, the connection lost mid-message: that message is retried with
  capped exponential backoff, and goes dead only once it has waited OUTBOX_GIVE_UP_AFTER_HOURS;
- 5xx for a recipient: dead, and the address is at fault; 5xx at DATA: dead, the content is;
- a message that can never be built (a header with a line break, an empty part): dead;
- any other error while rendering or building (a template bug after a deploy, say): retried like a
  4xx, so fixing the bug delivers every queued message instead of losing them.
Messages queued as facts (receipts, and every message that carries a link) are rendered here, just
before they are sent: that is when a link's signed URL is built, so no table ever holds it.

Attachments (the invoice or receipt PDF) are made here too, by an `AttachmentHook` the worker passes
in (payments/documents.py: this package knows no invoice); a hook that fails is treated like a
template that fails: the message waits and is retried. The From header's display name is the
merchant's legal name (MERCHANT_NAME) unless MAIL_FROM names one itself; Reply-To is MAIL_REPLY_TO,
which defaults to MERCHANT_SUPPORT_EMAIL. Every email's layout shows the merchant's identity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from email.header import Header
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.messages import render_payload
from emails.outbox import (
    ClaimedMessage,
    DeadLetterHook,
    backoff_seconds,
    claim_due_messages,
    defer_unreachable,
    give_up_after,
    give_up_waiting,
    mark_failed,
    mark_sent,
    release,
)
from plumbing.db import utcnow
from plumbing.rendering import use_brand
from plumbing.settings import Settings

log = logging.getLogger("paylink.outbox")


class TransientSendError(Exception):
    """The server or the network said "not now": retry later."""


class ServerUnreachable(TransientSendError):
    """We could not even connect: no point trying the rest of the batch now."""


class UnbuildableMessage(ValueError):
    """The message itself can never be sent as it is (a header with a line break, an empty part)."""


class PermanentSendError(Exception):
    """The server refused this message for good (5xx): do not retry."""

    def __init__(self, detail: str, *, recipient_fault: bool) -> None:
        super().__init__(detail)
        self.recipient_fault = recipient_fault


@dataclass(frozen=True)
class Attachment:
    filename: str  # e.g. INV-000001.pdf
    content_type: str  # e.g. application/pdf
    data: bytes


# The files to attach to a claimed message (none: an empty list); the worker's domain code decides.
AttachmentHook = Callable[[ClaimedMessage], Awaitable[list[Attachment]]]


def from_address(settings: Settings) -> str:
    """MAIL_FROM; without a display name of its own, the merchant's legal name is shown."""
    name, address = parseaddr(settings.mail_from)
    return settings.mail_from if name else formataddr((settings.merchant_name, address))


def build_mime(settings: Settings, message: ClaimedMessage, attachments: Sequence[Attachment] = ()) -> Message:
    """A multipart/alternative message (text, then HTML), UTF-8, with the stable Message-ID; with
    attachments, that part comes first in a multipart/mixed message.

    Built with the classic MIME classes: about three times faster than EmailMessage's header
    policy, which matters when payday queues thousands of invoices. Header values are checked for
    line breaks first (header injection), since the classic classes would not refuse them."""
    for value in (message.subject, message.recipient, settings.mail_from, settings.merchant_name, settings.reply_to or ""):
        if "\n" in value or "\r" in value:
            raise UnbuildableMessage("a header value contains a line break")
    if not message.text.strip() or not message.html.strip():
        raise UnbuildableMessage("the message has an empty part")
    body = MIMEMultipart("alternative")
    body.attach(MIMEText(message.text, "plain", "utf-8"))
    body.attach(MIMEText(message.html, "html", "utf-8"))
    if attachments:
        mime = MIMEMultipart("mixed")
        mime.attach(body)
        for attachment in attachments:
            if any(c in attachment.filename for c in '\r\n"\\/'):
                raise UnbuildableMessage("an attachment's file name contains a line break, a quote or a slash")
            main, _, sub = attachment.content_type.partition("/")
            part = MIMEApplication(attachment.data, _subtype=sub or "octet-stream")
            part.replace_header("Content-Type", f"{main}/{sub}" if sub else "application/octet-stream")
            part.add_header("Content-Disposition", "attachment", filename=attachment.filename)
            mime.attach(part)
    else:
        mime = body
    mime["From"] = _address(from_address(settings))
    mime["To"] = _address(message.recipient)
    if settings.reply_to:
        mime["Reply-To"] = _address(settings.reply_to)
    # compat32 messages take Header objects, which fold and encode non-ASCII text (RFC 2047).
    mime["Subject"] = message.subject if message.subject.isascii() else Header(message.subject, "utf-8")  # type: ignore[assignment]
    mime["Date"] = formatdate(localtime=False, usegmt=True)
    mime["Message-ID"] = message.message_id
    mime["Auto-Submitted"] = "auto-generated"
    mime["X-Auto-Response-Suppress"] = "All"
    return mime


def _address(value: str) -> str:
    """'Zoë Billing <billing@example.com>' with the display name encoded and the address left as is."""
    name, address = parseaddr(value)
    if not name or name.isascii():
        return formataddr((name, address)) if name else address
    return formataddr((str(Header(name, "utf-8")), address))


class SmtpSender:
    """One SMTP connection, opened on first use and reused across messages and batches."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._smtp: aiosmtplib.SMTP | None = None

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout_seconds,
            use_tls=s.smtp_tls == "tls",
            start_tls=True if s.smtp_tls == "starttls" else False,
            username=s.smtp_username,
            password=str(s.smtp_password) if s.smtp_password else None,
        )
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ServerUnreachable(f"cannot connect to {s.smtp_host}:{s.smtp_port}: {exc}") from None
        self._smtp = smtp
        return smtp

    async def send(self, mime: Message) -> None:
        smtp = await self._connection()
        try:
            await smtp.send_message(mime)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if all(500 <= c < 600 for c in codes):
                raise PermanentSendError(detail, recipient_fault=True) from None
            raise TransientSendError(detail) from None
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPAuthenticationError) as exc:
            # Our own settings (MAIL_FROM, credentials, TLS) are refused: not the customer's fault.
            # Retried with backoff while an operator fixes them; logged as an error each time.
            log.error("smtp.refused_our_settings code=%s message=%s", exc.code, exc.message)
            await self.close()
            raise TransientSendError(f"{exc.code} {exc.message}") from None
        except aiosmtplib.SMTPResponseException as exc:
            detail = f"{exc.code} {exc.message}"
            if 500 <= exc.code < 600:
                if exc.code == 530:  # "must issue STARTTLS" / "authentication required": our settings
                    log.error("smtp.refused_our_settings code=%s message=%s", exc.code, exc.message)
                    await self.close()
                    raise TransientSendError(detail) from None
                raise PermanentSendError(detail, recipient_fault=False) from None  # e.g. content refused at DATA
            await self.close()
            raise TransientSendError(detail) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise TransientSendError(str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()


@dataclass
class SendReport:
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    unreachable: bool = False


async def send_batch(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    sender: SmtpSender,
    report: SendReport,
    stop: asyncio.Event | None = None,
    on_dead: DeadLetterHook | None = None,
    attach: AttachmentHook | None = None,
) -> int:
    """Claim one batch of due messages and send them. Returns how many were claimed."""
    batch = await claim_due_messages(sessions, batch_size=settings.outbox_batch_size, lease_seconds=settings.outbox_lease_seconds)
    if not batch:
        return 0
    token = batch[0].lease_token
    deadline = time.monotonic() + settings.outbox_lease_seconds * 0.8
    sent: list[int] = []
    use_brand(settings)  # the merchant's identity in every email's layout

    async def failed(message: ClaimedMessage, error: str, *, permanent: bool, recipient_fault: bool = False) -> str:
        status = await mark_failed(
            sessions, settings, message, error, permanent=permanent, recipient_fault=recipient_fault, on_dead=on_dead
        )
        if status == "dead":
            report.dead += 1
        elif status == "pending":
            report.retrying += 1
        return status

    for index, message in enumerate(batch):
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            # The lease is running out (a slow server): hand the rest back before another worker
            # may claim them, rather than risk sending them twice.
            await release(sessions, token, [m.id for m in batch[index:]])
            break
        try:
            files = await attach(message) if attach is not None else []
            mime = build_mime(settings, _signed(settings, _rendered(settings, message)), files)
        except UnbuildableMessage as exc:  # never sendable as it is: must not block the queue
            status = await failed(message, f"cannot build the message: {exc}", permanent=True)
            log.error("email.unbuildable id=%s kind=%s status=%s error=%s", message.id, message.kind, status, exc)
            continue
        except Exception as exc:  # most likely our bug (a template, say): retried once it is fixed
            status = await failed(message, f"cannot render the message: {type(exc).__name__}: {exc}", permanent=False)
            log.exception("email.render_failed id=%s kind=%s status=%s", message.id, message.kind, status)
            continue
        try:
            await sender.send(mime)
        except ServerUnreachable as exc:
            # The server is down: not these messages' fault. They are handed back as they were
            # (still due, no attempt counted) without a connection attempt (and its timeout) each;
            # the worker waits before it tries the server again.
            waiting = batch[index:]
            await defer_unreachable(sessions, token, [m.id for m in waiting], str(exc))
            report.unreachable = True
            given_up = await give_up_waiting(sessions, settings, str(exc), on_dead=on_dead)
            report.dead += len(given_up)
            report.retrying += len({m.id for m in waiting} - set(given_up))
            _log_unreachable(settings, waiting, exc)
            break
        except (TransientSendError, PermanentSendError) as exc:
            permanent = isinstance(exc, PermanentSendError)
            recipient_fault = isinstance(exc, PermanentSendError) and exc.recipient_fault
            status = await failed(message, str(exc), permanent=permanent, recipient_fault=recipient_fault)
            log.warning("email.failed id=%s kind=%s status=%s error=%s", message.id, message.kind, status, exc)
            continue
        sent.append(message.id)
        # Record in small groups: a crash loses the record of at most a few sends (resent, same Message-ID).
        if len(sent) >= 20:
            await mark_sent(sessions, token, sent)
            report.sent += len(sent)
            sent = []
    await mark_sent(sessions, token, sent)
    report.sent += len(sent)
    return len(batch) if not report.unreachable else 0


def _log_unreachable(settings: Settings, waiting: list[ClaimedMessage], exc: Exception) -> None:
    """WARNING while the outage is young; ERROR once the oldest waiting message has waited an hour
    (or half of OUTBOX_GIVE_UP_AFTER_HOURS, if that is shorter): someone must look at the server."""
    since = [m.waiting_since for m in waiting if m.waiting_since is not None]
    waited = utcnow() - min(since) if since else timedelta(0)
    long_outage = min(timedelta(hours=1), give_up_after(settings) / 2)
    level = logging.ERROR if waited >= long_outage else logging.WARNING
    log.log(level, "email.server_unreachable waiting=%d oldest_waiting_s=%.0f error=%s", len(waiting), waited.total_seconds(), exc)


def _rendered(settings: Settings, message: ClaimedMessage) -> ClaimedMessage:
    """The message with its text and HTML parts, rendered now if it was queued as facts."""
    if message.payload is None:
        return message
    content = render_payload(settings, message.kind, message.payload)
    return replace(message, text=content.text, html=content.html)


def _signed(settings: Settings, message: ClaimedMessage) -> ClaimedMessage:
    """The text part ends with the merchant's signature (legal name, address, contact), as the HTML
    layout's footer does; language-neutral, so it needs no translation."""
    lines = [settings.merchant_name, *settings.merchant_address]
    lines += [v for v in (settings.merchant_support_email, settings.merchant_support_phone) if v]
    if len(lines) == 1 or message.kind == "finance_alert":
        return message
    return replace(message, text=f"{message.text.rstrip()}\n\n-- \n" + "\n".join(lines) + "\n")


async def run_once(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    sender: SmtpSender | None = None,
    stop: asyncio.Event | None = None,
    on_dead: DeadLetterHook | None = None,
    attach: AttachmentHook | None = None,
) -> SendReport:
    """Send everything that is due now, batch after batch, then return what happened."""
    own_sender = sender is None
    sender = sender or SmtpSender(settings)
    report = SendReport()
    try:
        while await send_batch(sessions, settings, sender, report, stop, on_dead, attach) >= settings.outbox_batch_size:
            if stop is not None and stop.is_set():
                break
    finally:
        if own_sender:
            await sender.close()
    return report


async def run_forever(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    wakeup: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    on_dead: DeadLetterHook | None = None,
    attach: AttachmentHook | None = None,
) -> None:
    """Poll the outbox until `stop` is set (or the task is cancelled); `wakeup.set()` makes it look
    at once (used after a commit). Stopping is checked between messages: the one being sent is
    recorded first. Sends mail only: reminders are scheduled by the worker process.

    While the SMTP server cannot be reached, the loop waits with capped exponential backoff and
    jitter between tries of the server (a wakeup does not hurry it); the first try that reaches it
    sends everything that is due."""
    sender = SmtpSender(settings)
    wakeup = wakeup or asyncio.Event()
    stop = stop or asyncio.Event()
    outage = 0  # consecutive tries that found the server unreachable
    try:
        while not stop.is_set():
            report = None
            try:
                report = await run_once(sessions, settings, sender, stop, on_dead, attach)
            except Exception:  # the loop must survive a database hiccup; the error is logged
                log.exception("outbox.loop_error")
            if report is not None and report.unreachable:
                outage += 1
                await _first_of(stop, within=backoff_seconds(outage, settings))
                continue
            if outage and report is not None and report.sent:
                log.info("email.server_reachable_again after_tries=%d", outage)
            outage = 0
            wakeup.clear()
            await _first_of(wakeup, stop, within=settings.outbox_poll_seconds)
    finally:
        await sender.close()


async def _first_of(*events: asyncio.Event, within: float) -> None:
    """Wait until one of the events is set, or `within` seconds have passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
