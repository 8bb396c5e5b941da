"""The outbox worker: `python -m emails.worker` sends due messages over one reused SMTP connection.

`--once` sends what is due and exits. The demo and the tests may run `run_forever` in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from emails.messages import render_payload
from emails.outbox import ClaimedMessage, claim_due_messages, mark_failed, mark_sent, release
from settings import ConfigError, Settings

log = logging.getLogger("paylink.outbox")


class TransientSendError(Exception):
    """The server or the network said "not now": retry later."""


class ServerUnreachable(TransientSendError):
    """We could not even connect: no point trying the rest of the batch now."""


class PermanentSendError(Exception):
    """The server refused this message for good (5xx): do not retry."""

    def __init__(self, detail: str, *, recipient_fault: bool) -> None:
        super().__init__(detail)
        self.recipient_fault = recipient_fault


def build_mime(settings: Settings, message: ClaimedMessage) -> Message:
    """A multipart/alternative message (text, then HTML), UTF-8, with the stable Message-ID.

    Built with the classic MIME classes: about three times faster than EmailMessage's header
    policy, which matters when payday queues thousands of invoices. Header values are checked for
    line breaks first (header injection), since the classic classes would not refuse them."""
    for value in (message.subject, message.recipient, settings.mail_from, settings.reply_to or ""):
        if "\n" in value or "\r" in value:
            raise ValueError("a header value contains a line break")
    if not message.text.strip() or not message.html.strip():
        raise ValueError("the message has an empty part")
    mime = MIMEMultipart("alternative")
    mime["From"] = _address(settings.mail_from)
    mime["To"] = _address(message.recipient)
    if settings.reply_to:
        mime["Reply-To"] = _address(settings.reply_to)
    # compat32 messages take Header objects, which fold and encode non-ASCII text (RFC 2047).
    mime["Subject"] = message.subject if message.subject.isascii() else Header(message.subject, "utf-8")  # type: ignore[assignment]
    mime["Date"] = formatdate(localtime=False, usegmt=True)
    mime["Message-ID"] = message.message_id
    mime["Auto-Submitted"] = "auto-generated"
    mime["X-Auto-Response-Suppress"] = "All"
    mime.attach(MIMEText(message.text, "plain", "utf-8"))
    mime.attach(MIMEText(message.html, "html", "utf-8"))
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
) -> int:
    """Claim one batch of due messages and send them. Returns how many were claimed."""
    batch = await claim_due_messages(sessions, batch_size=settings.outbox_batch_size, lease_seconds=settings.outbox_lease_seconds)
    if not batch:
        return 0
    token = batch[0].lease_token
    deadline = time.monotonic() + settings.outbox_lease_seconds * 0.8
    sent: list[int] = []
    for index, message in enumerate(batch):
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            # The lease is running out (a slow server): hand the rest back before another worker
            # may claim them, rather than risk sending them twice.
            await release(sessions, token, [m.id for m in batch[index:]])
            break
        try:
            if message.payload is not None:
                content = render_payload(message.kind, message.payload)
                message = replace(message, text=content.text, html=content.html)
            mime = build_mime(settings, message)
        except Exception as exc:  # a message that cannot be built must not block the queue
            await mark_failed(sessions, settings, message, f"cannot build the message: {exc}", permanent=True)
            report.dead += 1
            log.error("email.unbuildable id=%s kind=%s error=%s", message.id, message.kind, exc)
            continue
        try:
            await sender.send(mime)
        except ServerUnreachable as exc:
            # The server is down: every message of the batch waits for its next try, without
            # a connection attempt (and its timeout) each.
            for waiting in batch[index:]:
                await mark_failed(sessions, settings, waiting, str(exc), permanent=False)
            report.retrying += len(batch) - index
            report.unreachable = True
            log.warning("email.server_unreachable waiting=%d error=%s", len(batch) - index, exc)
            break
        except (TransientSendError, PermanentSendError) as exc:
            permanent = isinstance(exc, PermanentSendError)
            recipient_fault = isinstance(exc, PermanentSendError) and exc.recipient_fault
            status = await mark_failed(sessions, settings, message, str(exc), permanent=permanent, recipient_fault=recipient_fault)
            log.warning("email.failed id=%s kind=%s status=%s error=%s", message.id, message.kind, status, exc)
            if status == "dead":
                report.dead += 1
            else:
                report.retrying += 1
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


async def run_once(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    sender: SmtpSender | None = None,
    stop: asyncio.Event | None = None,
) -> SendReport:
    """Send everything that is due now, batch after batch, then return what happened."""
    own_sender = sender is None
    sender = sender or SmtpSender(settings)
    report = SendReport()
    try:
        while await send_batch(sessions, settings, sender, report, stop) >= settings.outbox_batch_size:
            if stop is not None and stop.is_set():
                break
    finally:
        if own_sender:
            await sender.close()
    return report


async def queue_reminders(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    from links.lifecycle import send_reminders

    sent = await send_reminders(
        sessions, settings, days_before_due=settings.reminder_days_before_due, days_before_link_expiry=settings.reminder_days_before_expiry
    )
    if sent:
        log.info("reminders.queued count=%d", len(sent))


async def run_forever(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    wakeup: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Poll the outbox until `stop` is set (or the task is cancelled); `wakeup.set()` makes it look
    at once (used after a commit). Every REMINDER_INTERVAL_SECONDS (0 turns it off) it also queues
    due reminders. Stopping is checked between messages: the one being sent is recorded first."""
    sender = SmtpSender(settings)
    wakeup = wakeup or asyncio.Event()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    next_reminders = loop.time() if settings.reminder_interval_seconds > 0 else float("inf")
    try:
        while not stop.is_set():
            try:
                if loop.time() >= next_reminders:
                    next_reminders = loop.time() + settings.reminder_interval_seconds
                    await queue_reminders(sessions, settings)
                await run_once(sessions, settings, sender, stop)
            except Exception:  # the loop must survive a database hiccup; the error is logged
                log.exception("outbox.loop_error")
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=settings.outbox_poll_seconds)
            except TimeoutError:
                pass
    finally:
        await sender.close()


async def _main(once: bool) -> int:
    from db import create_engine, create_session_factory

    settings = Settings.from_env()
    engine = create_engine(settings.database_url)
    sessions = create_session_factory(engine)
    try:
        if once:
            report = await run_once(sessions, settings)
            print(f"sent {report.sent}, retrying {report.retrying}, dead {report.dead}")
        else:
            log.info("outbox worker started")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)  # finish the current email, then exit
            await run_forever(sessions, settings, stop=stop)
    finally:
        await engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emails.worker", description="Send queued emails from the outbox.")
    parser.add_argument("--once", action="store_true", help="send what is due now and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return asyncio.run(_main(args.once))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
