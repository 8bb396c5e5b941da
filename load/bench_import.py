"""Benchmark: import N invoices from CSV with links issued and emails queued (`python -m links import --send`).

Goal (issue 7): 10,000 rows in under 10 s on this 2-core machine. Runs the real command as a
subprocess against a fresh SQLite file (or DATABASE_URL if set to PostgreSQL), then checks that
every invoice, link and queued email exists. Stripe is not called by an import.

Issue 11: the import writes in chunks of 500 rows, one short transaction each, so that it never
holds SQLite's write lock for long (webhooks are applied meanwhile). On SQLite a probe thread takes
the write lock (BEGIN IMMEDIATE; COMMIT) every 50 ms during the import, as the webhook writer would,
and the longest it had to wait is printed. Measured here (2 cores, other test runs sharing them),
each pair run back to back: before (one transaction for the whole file) 12.2-18.7 s, and a writer
waited up to 16.1 s for the lock (a webhook answered after 5.7 s in the test); after (chunks, and
emails queued as facts to render when sent) 9.2-13.2 s, longest wait 0.34-0.45 s.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DUE = (date.today() + timedelta(days=60)).isoformat()  # a due date in the future, whenever this runs
sys.path.insert(0, str(ROOT))


def write_csv(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "amount", "currency", "description", "due_date", "number", "locale"])
        for i in range(n):
            locale = ("en", "de", "fr", "es")[i % 4]
            writer.writerow([f"customer{i}@example.com", f"Customer {i}", f"{10 + i % 500}.{i % 100:02d}", "eur", "Annual service",
                             DUE, f"BENCH-{i:06d}", locale])  # fmt: skip


def count(url: str, table: str) -> int:
    from sqlalchemy import text

    from plumbing.db import create_engine

    async def run() -> int:
        engine = create_engine(url)
        async with engine.connect() as conn:
            value = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()  # noqa: S608 (fixed table names)
        await engine.dispose()
        return int(value)

    return asyncio.run(run())


class LockProbe:
    """Takes SQLite's write lock every 50 ms, like the webhook writer, and keeps the longest wait."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.longest = 0.0
        self.takes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("COMMIT")
                self.longest = max(self.longest, time.perf_counter() - started)
                self.takes += 1
                self._stop.wait(0.05)
        finally:
            conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{work / 'bench.db'}"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "LINK_SECRET_KEYS": secrets.token_urlsafe(32),
            "STRIPE_SECRET_KEY": "sk_test_bench",
            "STRIPE_PUBLISHABLE_KEY": "pk_test_bench",
            "STRIPE_WEBHOOK_SECRET": "whsec_bench",
            "STRIPE_API_BASE": "http://127.0.0.1:9",  # never called by an import
            "MAIL_FROM": "Bench <billing@bench.test>",
        }
        subprocess.run([sys.executable, "-m", "links", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
        path = work / "invoices.csv"
        write_csv(path, args.n)
        command = [sys.executable, "-m", "links", "import", str(path), "--send", "--verified", "--json"]
        sqlite_file = url.split(":///", 1)[1] if url.startswith("sqlite") else None
        probe = LockProbe(sqlite_file) if sqlite_file else None
        started = time.perf_counter()
        if probe is not None:
            with probe:
                run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        else:
            run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return 1
        invoices, links, emails = count(url, "invoices"), count(url, "payment_links"), count(url, "outbox")
        ok = invoices == links == emails == args.n
        print(f"rows:            {args.n}")
        print(f"wall time:       {elapsed:.2f} s (the whole command: start-up, validation, writes)")
        print(f"rows/s:          {args.n / elapsed:,.0f}")
        print(f"created:         {invoices} invoices, {links} links, {emails} queued emails  -> {'OK' if ok else 'MISMATCH'}")
        if probe is not None:
            print(f"write lock:      longest wait of another writer during the import {probe.longest:.2f} s ({probe.takes} takes)")
        verdict = "n/a (fewer rows)" if args.n < 10_000 else "met" if elapsed < 10 else "not met"
        print(f"goal:            10,000 rows in < 10 s -> {verdict}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
