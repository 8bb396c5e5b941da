"""Logging on payday: one structured line per request, written by a thread of its own (never by the event
loop), and never a link's token, whatever the requests carry. The real app under uvicorn, real localstripe."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from plumbing import logs
from plumbing.logs import BatchStream, configure_logging, log_pipeline, redact, stop_logging
from plumbing.web import record_request
from tests.harness import CARD_OK, LocalStripe, wait_until
from tests.integration.helpers import csrf_of, issue_invoice


class _Recording(io.StringIO):
    """An output stream that remembers which threads wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        return super().write(text)


@pytest.fixture
def log_output() -> Iterator[dict[str, _Recording]]:
    """The app's log pipeline (as configure_logging builds it) writing text and JSON lines into memory."""
    root = logging.getLogger()
    streams = {"text": _Recording(), "json": _Recording()}
    pipelines = [log_pipeline(BatchStream(stream), fmt) for fmt, stream in streams.items()]
    level = root.level
    root.setLevel(logging.INFO)
    for handler, writer in pipelines:
        root.addHandler(handler)
        writer.start()
    yield streams
    for handler, writer in pipelines:
        root.removeHandler(handler)
        writer.stop()
    root.setLevel(level)


def written_out() -> None:
    """Wait for the writer threads to write what is queued (they wake every 50 ms)."""
    writers = [w for w in (getattr(h, "writer", None) for h in logging.getLogger().handlers) if w is not None]
    wait_until(lambda: not any(w.pending for w in writers), what="the log writers to catch up")
    time.sleep(0.2)  # the batch in hand


class TestNoTokenInAnyLine:
    """Thousands of requests of every kind (handoffs, pages, forms, forged and broken links): no log line holds a token."""

    def test_many_requests(self, cli: Any, localstripe: LocalStripe, server: Any, log_output: dict[str, _Recording]) -> None:
        issued = [issue_invoice(cli, localstripe, CARD_OK) for _ in range(3)]
        tokens = [i.url.rsplit("/", 1)[1] for i in issued]

        def browse(n: int) -> int:
            token = tokens[n % 3]
            count = 0
            with httpx.Client(base_url=server.base, timeout=30) as browser:
                handoff = browser.get(f"/pay/{token}?utm={token}")  # the token in the query too
                page = browser.get(handoff.headers["location"])
                count += 2
                for path in (
                    f"/pay/{token}/status",
                    f"/pay/{token}/nowhere",
                    f"/pay/{token}x",  # forged
                    f"/pay/{token[:-4]}",  # truncated
                    f"/verify/{token}",
                    f"{handoff.headers['location']}/status",
                    f"/pay/l/{token}",
                ):
                    browser.get(path)
                    count += 1
                if n % 4 == 0:  # forms (fewer: the client's POST brake allows 30 a minute)
                    browser.post(f"/pay/{token}", data={"csrf": "forged", "payment_method": "pm_x"})
                    browser.post(handoff.headers["location"], data={"csrf": "forged"}, headers={"origin": "https://evil.example"})
                    browser.post(f"/pay/{token}/renew", content=b"x" * 100, headers={"content-type": "multipart/form-data; boundary=b"})
                    count += 3
                if n == 0:  # one real payment, with its redirect and the receipt page
                    paid = browser.post(
                        handoff.headers["location"], data={"csrf": csrf_of(page.text), "payment_method": issued[0].cards[0]}
                    )
                    browser.get(paid.headers["location"])
                    count += 2
            return count

        with ThreadPoolExecutor(8) as pool:
            sent = sum(pool.map(browse, range(40)))
        assert sent > 350
        written_out()
        for fmt, stream in log_output.items():
            lines = stream.getvalue().splitlines()
            leaks = [line for line in lines for token in tokens if token in line or token[:24] in line]
            assert not leaks, f"{fmt}: {leaks[:3]}"
            access = [line for line in lines if "paylink.access" in line]
            assert len(access) >= sent  # one line per request (and ours only: no others in this test)
            assert stream.writers == {"log-writer"}  # written by the writer thread, never by the event loop
        records = [json.loads(line) for line in log_output["json"].getvalue().splitlines()]
        paths = {r["path"] for r in records if r.get("event") == "request"}
        assert "/pay/{token}" in paths and "/pay/l/{link}" in paths and "/verify/{token}" in paths
        assert all(r["request_id"] for r in records if r.get("event") == "request")


class TestRedaction:
    """A token that some message carries is redacted from the line on its way out."""

    def test_token_paths_are_redacted(self) -> None:
        token = "WyI5ZTc5MmRmM2EzZGY0NmQ0YjRmYmFjZmZiMjgyM2ZhNCIsMTc5ODA2NjY4MV0.mXYXIsO8apmKF8YO4M1-cls1MML0mrBHNU0znNklReo"
        line = f"outbox.failed url=https://pay.example.com/pay/{token} verify=/verify/{token}/x link=/pay/l/0123 ?t={token}"
        redacted = "outbox.failed url=https://pay.example.com/pay/{token} verify=/verify/{token}/x link=/pay/l/0123 ?t={token}"
        assert redact(line) == redacted
        kept = "request path=/pay/{token} status=200 host=pay.example.com email=ann.lee@example.com request_id=ab12"
        assert redact(kept) == kept

    def test_a_slow_writer_never_blocks_and_the_backlog_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from plumbing import logs

        monkeypatch.setattr(logs, "MAX_PENDING_RECORDS", 100)
        stream = _Recording()
        handler, writer = log_pipeline(BatchStream(stream), "text")  # not started: a writer that has stalled
        logger = logging.getLogger("paylink.test.backlog")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            for n in range(250):
                logger.warning("line %d", n)
            assert len(writer.pending) == 100 and writer.dropped == 150
            writer.drain()
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
        lines = stream.getvalue().splitlines()
        assert len(lines) == 101 and "logs.dropped count=150" in lines[-1]


FORGED_PATH = "/pay/AAAAAAAAAAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


class TestTheDirectWay:
    """With configure_logging's pipeline and nothing else listening (the web app in production), an access
    line skips logging's machinery; it is written exactly as the same line through logging, in both formats."""

    @pytest.mark.parametrize("fmt", ["text", "json"])
    def test_same_line_either_way(self, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
        root = logging.getLogger()
        others = list(root.handlers)
        for handler in others:  # a test runner's capture handlers: "nothing else listens"
            root.removeHandler(handler)
        try:
            configure_logging("INFO", fmt)
            writer = logs._writer
            assert writer is not None
            stream = io.StringIO()
            monkeypatch.setattr(writer.handlers[0], "stream", stream)
            record_request(
                "GET", "/pay/AAAAAAAAAAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", "/pay/{token}", 404, 0.0004, "rid-0123456789"
            )
            assert len(writer.pending) == 1 and isinstance(writer.pending[0], logs._Line)  # straight to the queue
            root.addHandler(logging.NullHandler())  # someone else listens now: the usual way
            record_request(
                "GET", "/pay/AAAAAAAAAAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", "/pay/{token}", 404, 0.0004, "rid-0123456789"
            )
            assert len(writer.pending) == 2 and not isinstance(writer.pending[1], logs._Line)
            writer.drain()
        finally:
            stop_logging()
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in others:
                root.addHandler(handler)
        direct, usual = stream.getvalue().splitlines()
        if fmt == "json":
            direct_fields, usual_fields = json.loads(direct), json.loads(usual)
            direct_fields.pop("ts"), usual_fields.pop("ts")  # (a few microseconds apart)
            assert direct_fields == usual_fields
            assert direct_fields["path"] == "/pay/{token}" and direct_fields["request_id"] == "rid-0123456789"
        else:
            assert direct.split(" ", 1)[1] == usual.split(" ", 1)[1]
            assert "path=/pay/{token} status=404" in direct and "AAAAAAAA" not in direct
