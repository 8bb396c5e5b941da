"""The outbox: no email lost, none sent twice, failures never silent."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from typing import Any

import pytest

from emails.messages import EmailContent, Kind
from emails.outbox import claim_due_messages, enqueue
from emails.sender import SendReport, run_once
from links.hooks import apply_dead_message_policy
from plumbing.db import create_engine, create_session_factory
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_query, text_part
from tests.integration.helpers import issue_invoice

pytestmark = pytest.mark.postgres


@pytest.fixture
def worker_env(env: dict[str, str]) -> dict[str, str]:
    """These tests drive the worker themselves, like `python -m emails.worker --once`."""
    env["OUTBOX_IN_PROCESS"] = "false"
    env["OUTBOX_BACKOFF_BASE_SECONDS"] = "0.05"
    env["OUTBOX_BACKOFF_MAX_SECONDS"] = "0.1"
    return env


@pytest.fixture
def outbox_settings(worker_env: dict[str, str], settings: Settings) -> Settings:
    return Settings.from_env(worker_env)


def queue(settings: Settings, count: int, *, kind: str = Kind.RECEIPT, recipient: str = "ann@example.com") -> None:
    async def run() -> None:
        engine = create_engine(settings.database_url)
        sessions = create_session_factory(engine)
        async with sessions.begin() as session:
            for i in range(count):
                enqueue(session, settings, recipient, EmailContent(kind, f"Message {i}", f"text {i}", f"<p>html {i}</p>"))
        await engine.dispose()

    asyncio.run(run())


def work(settings: Settings) -> SendReport:
    """One `python -m emails.worker --once`: send what is due, with the invoicing code's dead-message policy."""

    async def run() -> SendReport:
        engine = create_engine(settings.database_url)
        try:
            return await run_once(create_session_factory(engine), settings, on_dead=functools.partial(apply_dead_message_policy, settings))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def work_until_settled(settings: Settings, rounds: int = 40) -> None:
    for _ in range(rounds):
        work(settings)
        if not db_query(settings.database_url, "SELECT 1 FROM outbox WHERE status = 'pending'"):
            return
        asyncio.run(asyncio.sleep(0.12))
    raise AssertionError("messages still pending")


def statuses(settings: Settings) -> list[tuple[Any, ...]]:
    return db_query(settings.database_url, "SELECT status, count(*) FROM outbox GROUP BY status ORDER BY status")


@pytest.fixture
def smtp_down(smtp: SmtpServer) -> Iterator[SmtpServer]:
    """The configured SMTP server, switched off; `smtp_down.controller` can be started again."""
    smtp.stop()
    yield smtp


class TestSmtpOutage:
    """SMTP down at 9:00 on payday: every email waits, then goes out exactly once."""

    def test_server_down_then_back_delivers_each_once(self, outbox_settings: Settings, smtp_down: SmtpServer) -> None:
        queue(outbox_settings, 5)
        report = work(outbox_settings)
        assert (report.sent, report.retrying) == (0, 5)
        assert statuses(outbox_settings) == [("pending", 5)]
        errors = db_query(outbox_settings.database_url, "SELECT DISTINCT last_error FROM outbox")
        assert all("cannot connect" in e for (e,) in errors)

        back = SmtpServer(port=smtp_down.port).start()
        try:
            work_until_settled(outbox_settings)
            assert statuses(outbox_settings) == [("sent", 5)]
            subjects = sorted(m["Subject"] for m in back.mailbox.messages)
            assert subjects == [f"Message {i}" for i in range(5)]
        finally:
            back.stop()


class TestSmtpReplies:
    """4xx is 'later', 5xx is 'never': retried, or dead with its reason."""

    def test_451_is_retried_then_delivered(self, outbox_settings: Settings, smtp: SmtpServer) -> None:
        smtp.mailbox.replies.extend(["451 4.3.0 Try again later", "451 4.3.0 Try again later"])
        queue(outbox_settings, 1)
        work_until_settled(outbox_settings)
        [message] = smtp.mailbox.messages
        assert message["Subject"] == "Message 0"
        [(status, attempts)] = db_query(outbox_settings.database_url, "SELECT status, attempts FROM outbox")
        assert (status, attempts) == ("sent", 3)

    def test_550_is_dead_with_reason_and_finance_is_told(
        self, cli, localstripe: LocalStripe, outbox_settings: Settings, smtp: SmtpServer
    ) -> None:
        smtp.mailbox.rcpt_replies.append("550 5.1.1 No such user here")
        issued = issue_invoice(cli, localstripe, CARD_OK)
        work(outbox_settings)
        rows = db_query(outbox_settings.database_url, "SELECT kind, status, attempts, last_error FROM outbox ORDER BY id")
        assert rows[0][:3] == ("invoice", "dead", 1)
        assert "550" in rows[0][3] and "No such user" in rows[0][3]
        work(outbox_settings)  # not retried forever: nothing more is tried for the dead row
        assert db_query(outbox_settings.database_url, "SELECT attempts FROM outbox WHERE kind = 'invoice'") == [(1,)]

        # Never silent: the invoice is flagged, the customer marked, finance alerted.
        listed = cli("invoice", "list", "--json").json()["invoices"]
        assert "undeliverable" in listed[0]["needs_attention"]
        shown = cli("customer", "show", issued.email, "--json").json()
        assert "550" in shown["email_undeliverable_reason"]
        [alert] = smtp.mailbox.to("finance@acme.test")
        assert issued.email in alert["Subject"]
        status = cli("outbox", "status", "--json").json()
        assert status["dead"] == 1 and status["recent_dead"][0]["recipient"] == issued.email

        # Finance fixes it and re-queues: the email goes out.
        retried = cli("outbox", "retry", "--dead", "--json")
        assert retried.json()["requeued"] == 1
        work(outbox_settings)
        assert [m["Subject"] for m in smtp.mailbox.to(issued.email)] and issued.number in smtp.mailbox.to(issued.email)[0]["Subject"]

    def test_temporary_failures_never_kill_a_message_before_the_give_up_age(self, outbox_settings: Settings, smtp: SmtpServer) -> None:
        smtp.mailbox.replies.extend(["451 busy"] * 12)  # more tries than the old limit of 8 allowed
        queue(outbox_settings, 1)
        work_until_settled(outbox_settings, rounds=80)
        assert db_query(outbox_settings.database_url, "SELECT status, attempts FROM outbox WHERE kind = 'receipt'") == [("sent", 13)]
        assert [m["Subject"] for m in smtp.mailbox.messages] == ["Message 0"]  # once, and no alert to finance

    def test_temporary_failures_past_the_give_up_age_end_dead(
        self, worker_env: dict[str, str], settings: Settings, smtp: SmtpServer
    ) -> None:
        limited = Settings.from_env({**worker_env, "OUTBOX_GIVE_UP_AFTER_HOURS": "0.0003"})  # about a second
        smtp.mailbox.replies.extend(["451 busy"] * 1000)
        queue(limited, 1)
        for _ in range(80):  # the worker's loop, until the message goes dead
            work(limited)
            if db_query(limited.database_url, "SELECT 1 FROM outbox WHERE kind = 'receipt' AND status = 'dead'"):
                break
            asyncio.run(asyncio.sleep(0.05))
        [(status, attempts, error)] = db_query(
            limited.database_url, "SELECT status, attempts, last_error FROM outbox WHERE kind = 'receipt'"
        )
        assert status == "dead" and attempts > 1
        assert "gave up after 0.0003 h" in error and "451 busy" in error
        assert smtp.mailbox.to("ann@example.com") == []

        smtp.mailbox.replies.clear()  # the server accepts mail again: finance hears of it
        work(limited)
        assert [m["Subject"] for m in smtp.mailbox.to("finance@acme.test")] == ["[Acme Consulting] Email undeliverable to ann@example.com"]

    def test_content_refused_is_dead_without_blaming_the_address(
        self, cli, localstripe: LocalStripe, outbox_settings: Settings, smtp: SmtpServer
    ) -> None:
        smtp.mailbox.replies.append("554 5.7.1 Message rejected")
        issued = issue_invoice(cli, localstripe, CARD_OK)
        work(outbox_settings)
        assert db_query(outbox_settings.database_url, "SELECT status FROM outbox WHERE kind = 'invoice'") == [("dead",)]
        shown = cli("customer", "show", issued.email, "--json").json()
        assert shown["email_undeliverable_at"] is None  # the address is fine; the message was refused
        assert "undeliverable" in cli("invoice", "show", issued.number, "--json").json()["needs_attention"]
        work(outbox_settings)  # the alert queued by the failure
        assert smtp.mailbox.to("finance@acme.test")

    def test_a_message_that_cannot_be_built_does_not_block_the_others(self, outbox_settings: Settings, smtp: SmtpServer) -> None:
        queue(outbox_settings, 1)

        async def broken() -> None:
            engine = create_engine(outbox_settings.database_url)
            async with create_session_factory(engine).begin() as session:
                enqueue(session, outbox_settings, "ann@example.com", EmailContent(Kind.RECEIPT, "bad\nsubject", "t", "h"))
            await engine.dispose()

        asyncio.run(broken())
        queue(outbox_settings, 1)
        work(outbox_settings)
        work(outbox_settings)
        assert [m["Subject"] for m in smtp.mailbox.to("ann@example.com")] == ["Message 0", "Message 0"]
        rows = db_query(outbox_settings.database_url, "SELECT subject, status, last_error FROM outbox ORDER BY id")
        assert [(r[0], r[1]) for r in rows][:3] == [("Message 0", "sent"), ("bad\nsubject", "dead"), ("Message 0", "sent")]
        assert "cannot build the message" in rows[1][2]


class TestCrashedWorker:
    """A worker killed mid-batch loses nothing: its rows come back after the lease."""

    def test_claimed_rows_are_delivered_by_the_next_worker(self, outbox_settings: Settings, smtp: SmtpServer) -> None:
        queue(outbox_settings, 3)

        async def claim_and_die() -> int:
            engine = create_engine(outbox_settings.database_url)
            claimed = await claim_due_messages(create_session_factory(engine), batch_size=10, lease_seconds=0.3)
            await engine.dispose()
            return len(claimed)  # ...and the process dies before sending anything

        assert asyncio.run(claim_and_die()) == 3
        assert work(outbox_settings).sent == 0  # still leased to the dead worker
        asyncio.run(asyncio.sleep(0.4))
        assert work(outbox_settings).sent == 3
        assert sorted(m["Subject"] for m in smtp.mailbox.messages) == ["Message 0", "Message 1", "Message 2"]
        ids = db_query(outbox_settings.database_url, "SELECT message_id FROM outbox ORDER BY id")
        assert [m["Message-ID"] for m in smtp.mailbox.messages] == [i for (i,) in ids]  # stable across the resend

    def test_a_worker_that_outlived_its_lease_cannot_overwrite(self, outbox_settings: Settings, smtp: SmtpServer) -> None:
        from emails.outbox import mark_failed

        queue(outbox_settings, 1)

        async def slow_worker_then_fast_worker() -> str:
            engine = create_engine(outbox_settings.database_url)
            sessions = create_session_factory(engine)
            [slow] = await claim_due_messages(sessions, batch_size=10, lease_seconds=0.2)
            await asyncio.sleep(0.3)
            assert (await run_once(sessions, outbox_settings)).sent == 1  # another worker takes over
            status = await mark_failed(sessions, outbox_settings, slow, "timed out", permanent=True)
            await engine.dispose()
            return status

        assert asyncio.run(slow_worker_then_fast_worker()) == "sent"
        assert db_query(outbox_settings.database_url, "SELECT status, attempts, last_error FROM outbox") == [("sent", 1, None)]


class TestConcurrentWorkers:
    """Two workers at once never send the same row."""

    def test_two_workers_share_without_duplicates(self, worker_env: dict[str, str], settings: Settings, smtp: SmtpServer) -> None:
        outbox_settings = Settings.from_env({**worker_env, "OUTBOX_BATCH_SIZE": "10"})
        settings = outbox_settings
        queue(settings, 60)

        async def two_workers() -> list[SendReport]:
            engine = create_engine(settings.database_url)
            sessions = create_session_factory(engine)
            try:
                return list(await asyncio.gather(run_once(sessions, settings), run_once(sessions, settings)))
            finally:
                await engine.dispose()

        reports = asyncio.run(two_workers())
        assert sum(r.sent for r in reports) == 60
        subjects = [m["Subject"] for m in smtp.mailbox.messages]
        assert len(subjects) == 60 and len(set(subjects)) == 60


class TestTransactions:
    """An email exists only if the change that caused it committed."""

    def test_rolled_back_transaction_leaves_no_outbox_row(self, outbox_settings: Settings) -> None:
        async def roll_back() -> None:
            engine = create_engine(outbox_settings.database_url)
            sessions = create_session_factory(engine)
            with pytest.raises(RuntimeError):
                async with sessions.begin() as session:
                    enqueue(session, outbox_settings, "ann@example.com", EmailContent(Kind.INVOICE, "s", "t", "h"))
                    await session.flush()
                    raise RuntimeError("the business change failed")
            await engine.dispose()

        asyncio.run(roll_back())
        assert db_query(outbox_settings.database_url, "SELECT count(*) FROM outbox") == [(0,)]

    def test_failed_invoice_creation_queues_no_email(self, cli, localstripe: LocalStripe, outbox_settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        duplicate = cli(
            "invoice",
            "create",
            "--customer",
            issued.email,
            "--amount",
            "5",
            "--currency",
            "eur",
            "--description",
            "x",
            "--number",
            issued.number,
            "--send",
        )
        assert duplicate.code == 1
        assert "already used" in duplicate.err
        assert db_query(outbox_settings.database_url, "SELECT count(*) FROM outbox") == [(1,)]


class TestHeaders:
    """Every message is a proper, recognisable, automated email."""

    def test_headers_and_parts(self, cli, localstripe: LocalStripe, outbox_settings: Settings, smtp: SmtpServer) -> None:
        issue_invoice(cli, localstripe, CARD_OK)
        work(outbox_settings)
        [message] = smtp.mailbox.messages
        assert message["From"] == "Acme Billing <billing@acme.test>"
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["Date"]
        assert message["Message-ID"].endswith("@acme.test>")
        assert "/pay/" in text_part(message)
        assert message.get_body(preferencelist=("html",)) is not None
