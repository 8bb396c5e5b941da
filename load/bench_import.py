"""Benchmark: import N invoices from CSV with links issued and emails queued (`python -m links import --send`).

Goal (issue 7): 10,000 rows in under 10 s on this 2-core machine. Runs the real command as a
subprocess against a fresh SQLite file (or DATABASE_URL if set to PostgreSQL), then checks that
every invoice, link and queued email exists. Stripe is not called by an import.

    .venv/bin/python load/bench_import.py [--n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_csv(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "amount", "currency", "description", "due_date", "number", "locale"])
        for i in range(n):
            locale = ("en", "de", "fr", "es")[i % 4]
            writer.writerow([f"customer{i}@example.com", f"Customer {i}", f"{10 + i % 500}.{i % 100:02d}", "eur", "Annual service",
                             "2027-01-31", f"BENCH-{i:06d}", locale])  # fmt: skip


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
        started = time.perf_counter()
        command = [sys.executable, "-m", "links", "import", str(path), "--send", "--verified", "--json"]
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
        verdict = "n/a (fewer rows)" if args.n < 10_000 else "met" if elapsed < 10 else "not met"
        print(f"goal:            10,000 rows in < 10 s -> {verdict}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
