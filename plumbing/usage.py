"""System usage, sampled and kept: each web and worker process writes one row every
USAGE_SAMPLE_SECONDS with its CPU use, resident memory, the host's load average and the latency of
the requests it answered since the previous row (a small fixed-bucket histogram, so that a report
can give the p95 latency of any hour without keeping one row per request).

Sampling is a background task (services.py starts it): a request only adds its duration to an
in-memory histogram. Rows older than USAGE_KEEP_DAYS are deleted by the same task.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, String, delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from plumbing.db import Base, utcnow
from plumbing.metrics import resident_bytes, update_process_gauges

log = logging.getLogger("paylink.usage")

# Upper bounds in milliseconds; the last bucket is "slower than 10 s".
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class UsageSample(Base):
    __tablename__ = "usage_samples"
    __table_args__ = (Index("ix_usage_samples_at", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    role: Mapped[str] = mapped_column(String(16))  # "web" or "worker"
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    interval_seconds: Mapped[float] = mapped_column(Float)
    cpu_percent: Mapped[float] = mapped_column(Float)  # of one core, over the interval
    rss_bytes: Mapped[int] = mapped_column(BigInteger)
    load1: Mapped[float | None] = mapped_column(Float)  # the host's 1-minute load average
    requests: Mapped[int] = mapped_column(default=0)
    latency_ms_buckets: Mapped[list[int] | None] = mapped_column(JSON)  # counts per LATENCY_BUCKETS_MS (+ overflow)


class LatencyWindow:
    """Request durations since the last sample, as bucket counts (thread-safe, O(log buckets))."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS_MS, seconds * 1000)
        with self.lock:
            self.counts[index] += 1

    def drain(self) -> list[int]:
        with self.lock:
            counts, self.counts = self.counts, [0] * (len(LATENCY_BUCKETS_MS) + 1)
        return counts


latency = LatencyWindow()  # the process's requests (plumbing.web.AccessLog observes into it)


def percentile_ms(counts: Sequence[int], fraction: float = 0.95) -> float | None:
    """The upper bound of the bucket that holds the `fraction` quantile (None without requests);
    requests slower than the last bound count as twice it."""
    total = sum(counts)
    if not total:
        return None
    wanted = fraction * total
    running = 0
    for index, count in enumerate(counts):
        running += count
        if running >= wanted:
            return float(LATENCY_BUCKETS_MS[index]) if index < len(LATENCY_BUCKETS_MS) else LATENCY_BUCKETS_MS[-1] * 2.0
    return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class UsageSampler:
    """Writes this process's usage every `interval` seconds until stopped; deletes old rows hourly."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], role: str, interval: float, keep_days: int) -> None:
        self.sessions = sessions
        self.role = role
        self.interval = interval
        self.keep = timedelta(days=keep_days)
        self.stopped = asyncio.Event()
        self.host = socket.gethostname()[:255]
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()
        self._purged_at = float("-inf")  # purge on the first sample (monotonic time may be < 1 h after boot)

    @staticmethod
    def _cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def stop(self) -> None:
        self.stopped.set()

    async def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), timeout=self.interval)
            try:
                await self.sample()  # the last, partial interval is written on stop too
            except Exception:  # a database hiccup costs one sample, never the process
                log.exception("usage.sample_failed")

    def measure(self) -> dict[str, Any]:
        cpu, wall = self._cpu_seconds(), time.monotonic()
        elapsed = max(wall - self._wall, 1e-6)
        row = {
            "role": self.role,
            "host": self.host,
            "pid": os.getpid(),
            "interval_seconds": round(elapsed, 3),
            "cpu_percent": round(100.0 * (cpu - self._cpu) / elapsed, 2),
            "rss_bytes": resident_bytes(),
            "load1": load_average(),
        }
        self._cpu, self._wall = cpu, wall
        counts = latency.drain() if self.role == "web" else [0] * (len(LATENCY_BUCKETS_MS) + 1)
        row["requests"] = sum(counts)
        row["latency_ms_buckets"] = counts if any(counts) else None
        return row

    async def sample(self) -> None:
        update_process_gauges()
        row = self.measure()
        now = utcnow()
        async with self.sessions.begin() as session:
            session.add(UsageSample(at=now, **row))
            if time.monotonic() - self._purged_at > 3600:
                await session.execute(delete(UsageSample).where(UsageSample.at < now - self.keep))
                self._purged_at = time.monotonic()
