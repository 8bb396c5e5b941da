"""SMTP outages of any length: queued mail waits and goes out exactly once when the server is back;
only past OUTBOX_GIVE_UP_AFTER_HOURS does it go dead, with its reason, and finance hears of it.

The real worker (`services.run_worker`, what `python -m emails.worker` runs, and its `--once`) against
a real aiosmtpd that is switched off and on again, with the mail queued by the CLI and the services."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import services
from emails import outbox, worker
from emails.messages import Kind
from payments.checkout import pay_with_saved_profile
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_query, in_thread, wait_until
from tests.integration.helpers import Issued, issue_invoice

pytestmark = pytest.mark.postgres

# With these, the old schedule (8 tries, 0.05 s doubling to 0.2 s) was over after about 1.5 s.
FAST = {"OUTBOX_BACKOFF_BASE_SECONDS": "0.05", "OUTBOX_BACKOFF_MAX_SECONDS": "0.2", "OUTBOX_POLL_SECONDS": "0.05"}
OUTAGE_SECONDS = 3.5
GIVE_UP_HOURS = "0.0006"  # about two seconds
LONGER_THAN_GIVE_UP = 2.4


@pytest.fixture
def outage_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The worker runs here, not in a web process; the environment is the operator's."""
    env.update(FAST, OUTBOX_IN_PROCESS="false")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class Worker:
    """`python -m emails.worker` in a thread of its own: `services.run_worker` until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with services.open_services(self.settings) as opened:
            self._ready.set()
            await services.run_worker(opened, self._stop)

    def __enter__(self) -> Worker:
        self._thread.start()
        assert self._ready.wait(20), "the worker did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "the worker did not stop"


def worker_once() -> tuple[int, int, int]:
    """`python -m emails.worker --once`: (sent, retrying, dead)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert in_thread(worker.main, ["--once"]) == 0
    match = re.fullmatch(r"sent (\d+), retrying (\d+), dead (\d+)\n", out.getvalue())
    assert match, out.getvalue()
    sent, retrying, dead = (int(n) for n in match.groups())
    return sent, retrying, dead


def rows(settings: Settings) -> list[tuple[Any, ...]]:
    return db_query(settings.database_url, "SELECT kind, status, attempts, message_id, last_error FROM outbox ORDER BY id")


def pay(settings: Settings, issued: Issued) -> None:
    """The customer pays with the saved card (what POST /pay does): the receipt is queued."""
    [(link_id,)] = db_query(
        settings.database_url,
        "SELECT l.id FROM payment_links l JOIN invoices i ON i.id = l.invoice_id WHERE i.number = :n",
        n=issued.number,
    )

    async def go() -> str:
        async with services.open_services(settings) as s:
            outcome = await pay_with_saved_profile(
                s.sessions, s.gateway, s.settings, link_id=uuid.UUID(str(link_id)), payment_method_id=issued.cards[0]
            )
            return outcome.status

    assert in_thread(asyncio.run, go()) == "succeeded"


def alert_finance(settings: Settings, title: str) -> None:
    """An alert to finance, queued the way the money code queues one."""

    async def go() -> None:
        async with services.open_services(settings) as s, s.sessions.begin() as session:
            outbox.alert_finance(session, s.settings, title, ["Reason: a test of the outage"])

    in_thread(asyncio.run, go())


def unreachable_logs(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("email.server_unreachable") and r.levelno == level]


@pytest.fixture
def smtp_down(smtp: SmtpServer) -> Iterator[SmtpServer]:
    """The configured SMTP server, switched off; `back_up()` starts one on the same port."""
    smtp.stop()
    yield smtp


def back_up(down: SmtpServer) -> SmtpServer:
    return SmtpServer(port=down.port).start()


class TestLongOutage:
    """The mail server is down for longer than any retry schedule: every queued email still goes out, once."""

    def test_invoice_receipt_verification_and_alert_all_delivered_once(
        self, cli: Any, localstripe: LocalStripe, outage_env: dict[str, str], smtp_down: SmtpServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = Settings.from_env(outage_env)
        issued = issue_invoice(cli, localstripe, CARD_OK)  # the invoice email
        paid = issue_invoice(cli, localstripe, CARD_OK)
        pay(settings, paid)  # its invoice email and the receipt
        assert cli("customer", "add", "--email", "new@example.com", "--name", "Nova New").code == 0  # the confirmation
        alert_finance(settings, f"Invoice {issued.number} needs attention")
        queued = rows(settings)
        assert Counter(kind for kind, *_ in queued) == {
            Kind.INVOICE: 2,
            Kind.RECEIPT: 1,
            Kind.VERIFICATION: 1,
            Kind.FINANCE_ALERT: 1,
        }

        with Worker(settings):
            time.sleep(OUTAGE_SECONDS)  # the server stays down: more than twice the old schedule
            assert len(unreachable_logs(caplog)) >= 8  # many tries of the server, all in vain
            during = rows(settings)
            assert {status for _, status, *_ in during} == {"pending"}  # nothing dead, nothing lost
            assert {attempts for _, _, attempts, *_ in during} == {0}  # an outage is not the messages' fault
            assert all("cannot connect" in (error or "") for *_, error in during)

            back = back_up(smtp_down)
            try:
                wait_until(lambda: {status for _, status, *_ in rows(settings)} == {"sent"}, timeout=15, what="every message to be sent")
                time.sleep(0.5)  # a few more turns of the loop: nothing is sent twice
            finally:
                back.stop()

        delivered = Counter(str(m["Message-ID"]) for m in back.mailbox.messages)
        assert delivered == Counter(message_id for *_, message_id, _ in queued)  # each exactly once
        assert [status for _, status, *_ in rows(settings)] == ["sent"] * len(queued)
        assert issued.number in str(back.mailbox.to(issued.email)[0]["Subject"])
        assert [str(m["Subject"]) for m in back.mailbox.to("finance@acme.test")] == [
            f"[Acme Consulting] Invoice {issued.number} needs attention"
        ]


class TestGivingUp:
    """Past OUTBOX_GIVE_UP_AFTER_HOURS a waiting email goes dead with its reason, and finance is told."""

    @pytest.fixture
    def impatient(self, outage_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
        monkeypatch.setenv("OUTBOX_GIVE_UP_AFTER_HOURS", GIVE_UP_HOURS)
        return Settings.from_env({**outage_env, "OUTBOX_GIVE_UP_AFTER_HOURS": GIVE_UP_HOURS})

    def test_a_message_waiting_too_long_goes_dead_and_the_alert_goes_out(
        self, cli: Any, localstripe: LocalStripe, impatient: Settings, smtp_down: SmtpServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert worker_once() == (0, 1, 0)  # waits
        assert unreachable_logs(caplog, logging.WARNING) and not unreachable_logs(caplog, logging.ERROR)
        time.sleep(LONGER_THAN_GIVE_UP)

        assert worker_once() == (0, 0, 1)  # the invoice email gave up; finance's alert about it is queued
        [invoice_mail, alert] = rows(impatient)
        assert invoice_mail[:2] == (Kind.INVOICE, "dead")
        assert f"gave up after {GIVE_UP_HOURS} h without delivery" in invoice_mail[4] and "cannot connect" in invoice_mail[4]
        assert alert[:2] == (Kind.FINANCE_ALERT, "pending")
        assert "email undeliverable" in cli("invoice", "show", issued.number, "--json").json()["needs_attention"]
        assert unreachable_logs(caplog, logging.ERROR)  # the server has been unreachable for long
        assert any(r.levelno == logging.ERROR and r.getMessage().startswith("email.gave_up count=1") for r in caplog.records)

        back = back_up(smtp_down)
        try:
            assert worker_once() == (1, 0, 0)
            [sent] = back.mailbox.messages
            assert sent["Subject"] == f"[Acme Consulting] Email undeliverable to {issued.email}"
            assert "gave up after" in str(sent.get_body(preferencelist=("plain",)).get_content())  # type: ignore[union-attr]
        finally:
            back.stop()

    def test_an_alert_that_cannot_be_sent_is_never_lost(
        self, cli: Any, localstripe: LocalStripe, impatient: Settings, smtp_down: SmtpServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        worker_once()
        time.sleep(LONGER_THAN_GIVE_UP)
        assert worker_once() == (0, 0, 1)  # the invoice email is dead; the alert is queued
        time.sleep(LONGER_THAN_GIVE_UP)
        assert worker_once() == (0, 0, 1)  # and now the alert, too, has waited too long

        [invoice_mail, alert] = rows(impatient)
        assert (invoice_mail[1], alert[:2]) == ("dead", (Kind.FINANCE_ALERT, "dead"))
        assert len(rows(impatient)) == 2  # no alert about the alert
        [logged] = [r for r in caplog.records if r.getMessage().startswith("email.finance_alert_dead")]
        assert logged.levelno == logging.ERROR and issued.email in logged.getMessage()

        # Finance's status shows it, however many customer emails died after it.
        status = cli("outbox", "status", "--json").json()
        assert status["dead"] == 2
        assert [m["kind"] for m in status["recent_dead"]] == [Kind.FINANCE_ALERT, Kind.INVOICE]
        assert "gave up after" in status["recent_dead"][0]["error"]

        # The server is back and finance re-queues: each goes out once, with a fresh wait of its own.
        back = back_up(smtp_down)
        try:
            assert cli("outbox", "retry", "--dead", "--json").json()["requeued"] == 2
            assert worker_once() == (2, 0, 0)
            assert [str(m["Subject"]) for m in back.mailbox.to("finance@acme.test")] == [
                f"[Acme Consulting] Email undeliverable to {issued.email}"
            ]
            [invoice_email] = back.mailbox.to(issued.email)
            assert issued.number in str(invoice_email["Subject"])
        finally:
            back.stop()
