"""Prometheus metrics: the names, the exposition, and a collector for numbers read at scrape time.

Names (the dashboard in ops/ and the README rely on them):

- `paylink_http_request_duration_seconds{method,route}` histogram, and
  `paylink_http_requests_total{method,route,status}`: `route` is the matched route's path template
  (`/pay/l/{link}`, never a token), `unmatched` for a path no route serves.
- `paylink_pay_attempts_total{card,outcome}`: pay requests by card kind (`saved`, `new`) and outcome
  (the payment's status, or `refused`, `error`).
- `paylink_webhook_events_total{result}` (`applied`, `duplicate`, `refused`, `invalid_signature`,
  `failed`) and `paylink_webhook_lag_seconds` (now minus the event's `created`, for applied events).
- `paylink_rate_limit_refusals_total{what,scope}`.
- `paylink_outbox_pending`, `paylink_outbox_oldest_pending_age_seconds`, `paylink_outbox_dead`:
  read from the database when scraped (at most every few seconds; see `DatabaseGauges`).
- `process_*` (prometheus-client's process collector) and, so that they also add up over several
  uvicorn workers, `paylink_process_cpu_seconds` and `paylink_process_resident_memory_bytes`.

Several processes (uvicorn --workers N): set `PROMETHEUS_MULTIPROC_DIR` to an empty directory
(wiped before each start) in every process's environment; each process writes its numbers there
and a scrape of any of them adds them up. Without it each process exposes only its own numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_SECONDS = Histogram(
    "paylink_http_request_duration_seconds", "Time to answer a request, by route template", ["method", "route"], buckets=LATENCY_BUCKETS
)
REQUESTS = Counter("paylink_http_requests", "Requests answered, by route template and status", ["method", "route", "status"])
PAY_ATTEMPTS = Counter("paylink_pay_attempts", "Pay requests, by card kind and outcome", ["card", "outcome"])
WEBHOOK_EVENTS = Counter("paylink_webhook_events", "Stripe webhook deliveries, by result", ["result"])
WEBHOOK_LAG = Histogram(
    "paylink_webhook_lag_seconds",
    "Delay between an event's creation at Stripe and its application here",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600),
)
RATE_LIMIT_REFUSALS = Counter("paylink_rate_limit_refusals", "Requests refused by a brake (rate limit)", ["what", "scope"])
PROCESS_CPU = Gauge("paylink_process_cpu_seconds", "CPU time used by the process (user + system)", multiprocess_mode="livesum")
PROCESS_RSS = Gauge("paylink_process_resident_memory_bytes", "Resident memory of the process", multiprocess_mode="livesum")


def update_process_gauges() -> None:
    """This process's CPU time and resident memory (cheap: os.times and /proc/self/statm)."""
    times = os.times()
    PROCESS_CPU.set(times.user + times.system)
    PROCESS_RSS.set(resident_bytes())


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):  # not Linux: the peak, from getrusage (KiB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


# --- numbers read from the database when scraped ----------------------------------------------------------

Reading = dict[str, tuple[str, float]]  # metric name -> (help, value)


class DatabaseGauges(Collector):
    """Gauges whose values a query computes (e.g. the outbox's depth). `refresh()` runs the query
    at most every `max_age` seconds; `collect()` reports the last values. Scraped from a thread
    (the worker's metrics server), it asks the event loop for a refresh first."""

    def __init__(self, read: Callable[[], Awaitable[Reading]], *, max_age: float = 5.0) -> None:
        self.read = read
        self.max_age = max_age
        self.values: Reading = {}
        self.read_at = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.lock = asyncio.Lock()

    async def refresh(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        async with self.lock:
            if time.monotonic() - self.read_at < self.max_age:
                return
            try:
                self.values = await asyncio.wait_for(self.read(), timeout=5)
            except Exception:  # a scrape never fails because the database hiccups: the gauges go stale
                self.values = {}
            self.read_at = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        loop = self.loop
        if loop is not None and loop.is_running() and threading.get_ident() != self.loop_thread:
            with contextlib.suppress(Exception):  # the loop is busy or stopping: report what we have
                asyncio.run_coroutine_threadsafe(self.refresh(), loop).result(timeout=6)
        for name, (help_text, value) in self.values.items():
            yield GaugeMetricFamily(name, help_text, value=value)


def exposition(extra: Collector | None = None) -> tuple[bytes, str]:
    """The text a scrape gets: this process's metrics (or every process's, in multiprocess mode)
    and `extra`'s."""
    update_process_gauges()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    body = generate_latest(registry)
    if extra is not None:
        own = CollectorRegistry(auto_describe=False)
        own.register(extra)
        body += generate_latest(own)
    return body, CONTENT_TYPE_LATEST


def process_exited() -> None:
    """In multiprocess mode, drop this process's live gauges (call when a process stops)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def serve_in_thread(port: int, extra: Collector | None = None, *, token: str | None = None, host: str = "0.0.0.0") -> Any:  # noqa: S104 (an operator port, like uvicorn's)
    """A tiny HTTP server (a thread) that answers GET /metrics with the exposition (the worker's
    port); with `token`, only to `Authorization: Bearer <token>`."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            if token is not None and not bearer_ok(self.headers.get("Authorization"), token):
                self.send_error(401)
                return
            body, content_type = exposition(extra)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
