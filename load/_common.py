"""Shared plumbing for the benchmarks in load/: paths, free ports, a test environment, server
subprocesses (the real app under `uvicorn --factory app:create_app`, bare Starlette), wrk, fresh
databases (SQLite files, PostgreSQL databases created and dropped here), a bulk payday seed, and
the min/median/max summary with goals that every benchmark prints.

Every benchmark only talks to 127.0.0.1, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "load"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LINK_KEY = "load-link-key-0123456789abcdef"
STRIPE_SECRET = "sk_test_paylink_load"
WEBHOOK_SECRET = "whsec_paylink_load_secret"
# Where fresh PostgreSQL databases are created (and dropped): any database on the server will do.
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL") or os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unused_port() -> int:
    """A port nothing listens on: the app is pointed at it as its Stripe API base and must not call it."""
    return free_port()


def bench_env(database_url: str, *, app_port: int, smtp_port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment an operator would set, pointed at local, throw-away components only."""
    env = {
        "DATABASE_URL": database_url,
        "BASE_URL": f"http://127.0.0.1:{app_port}",
        "LINK_SECRET_KEYS": LINK_KEY,
        "STRIPE_SECRET_KEY": STRIPE_SECRET,
        "STRIPE_PUBLISHABLE_KEY": "pk_test_paylink_load",
        "STRIPE_API_BASE": f"http://127.0.0.1:{unused_port()}",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "STRIPE_TIMEOUT_SECONDS": "2",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port or unused_port()),
        "MAIL_FROM": "Acme Billing <billing@acme.test>",
        "MERCHANT_NAME": "Acme Consulting",
        "OUTBOX_IN_PROCESS": "false",
    }
    env.update(extra)
    return env


@contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A private temporary directory for the database and logs (kept with --keep, for a look afterwards)."""
    path = Path(tempfile.mkdtemp(prefix=f"paylink-{prefix}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept work directory: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# --- databases: a fresh one per benchmark, on SQLite or PostgreSQL -------------------------------------


def _admin_dsn() -> Any:
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_ADMIN_URL)


def _pg_admin(sql: str) -> None:
    import asyncpg

    dsn = _admin_dsn().set(drivername="postgresql").render_as_string(hide_password=False)

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def fresh_database(kind: str, work: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file in `work`, or a PostgreSQL database created on the
    server of BENCH_POSTGRES_URL (default 127.0.0.1:5432) and dropped afterwards, whatever happens."""
    from plumbing.db import migrate_sync

    if kind == "sqlite":
        url = sqlite_url(work / "paylink.db")
        migrate_sync(url)
        yield url
        return
    name = f"paylink_load_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        url = _admin_dsn().set(database=name).render_as_string(hide_password=False)
        migrate_sync(url)
        yield url
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_available() -> bool:
    try:
        _pg_admin("SELECT 1")
    except Exception:  # any failure means "not here"
        return False
    return True


def db_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Read the app's database the way an operator would, on SQLite or PostgreSQL alike."""
    from sqlalchemy import text

    from plumbing.db import create_engine

    async def run() -> list[tuple[Any, ...]]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return [tuple(row) for row in (await conn.execute(text(sql))).all()]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def db_scalar(url: str, sql: str) -> int:
    return int(db_rows(url, sql)[0][0] or 0)


def postgres_transactions(url: str) -> int:
    """Committed + rolled-back transactions of this database so far (pg_stat_database, flushed ~1 s late)."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    return db_scalar(url, f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{name}'")  # noqa: S608


# --- payday's data: N customers, each with a saved card and an open invoice with an issued link -----------


@dataclass(frozen=True)
class SeededLink:
    link_id: uuid.UUID
    token: str
    invoice_id: uuid.UUID
    customer_email: str
    number: str  # the invoice's number, shown on its page

    @property
    def page_path(self) -> str:
        return f"/pay/l/{self.link_id.hex}"

    @property
    def cookie(self) -> str:
        return f"pl_{self.link_id.hex}={self.token}"


def seed_payday(
    url: str, n: int, *, prefix: str = "payday", cards: Sequence[tuple[str, str]] | None = None, locales: Sequence[str | None] = (None,)
) -> list[SeededLink]:
    """N verified customers, each with one saved Visa 4242 (PaymentProfile) and an open invoice of
    EUR 120.50 whose link was issued and sent 1 minute ago: what `invoice create --send` leaves, in
    bulk SQL (10,000 in a few seconds). `cards` gives real (stripe customer, payment method) ids."""
    from sqlalchemy import insert

    from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
    from payments.models import PaymentProfile
    from plumbing.db import create_engine, utcnow
    from plumbing.settings import Settings
    from plumbing.signing import pay_signer

    signer = pay_signer(Settings.from_env(bench_env(url, app_port=free_port())))
    now = utcnow()
    expires_at = (now + timedelta(days=30)).replace(microsecond=0)
    tables: dict[Any, list[dict[str, Any]]] = {Customer: [], Invoice: [], PaymentLink: [], PaymentProfile: []}
    seeded: list[SeededLink] = []
    for i in range(n):
        customer_id, invoice_id, link_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        stripe_customer, pm = cards[i] if cards else (f"cus_{prefix}{i:07d}", f"pm_{prefix}{i:07d}")
        email = f"{prefix}{i}@example.com"
        tables[Customer].append(
            {"id": customer_id, "email": email, "name": f"Payday Customer {i}", "stripe_customer_id": stripe_customer,
             "email_verified_at": now, "email_verified_by": "load", "locale": locales[i % len(locales)]}
        )  # fmt: skip
        tables[PaymentProfile].append(
            {"customer_id": customer_id, "stripe_payment_method_id": pm, "brand": "visa", "last4": "4242",
             "exp_month": 12, "exp_year": 2030, "is_default": True}
        )  # fmt: skip
        number = f"{prefix.upper()}-{i + 1:06d}"
        tables[Invoice].append(
            {"id": invoice_id, "number": number, "customer_id": customer_id, "currency": "eur",
             "amount_due": 12050, "description": "Monthly service", "status": InvoiceStatus.OPEN}
        )  # fmt: skip
        tables[PaymentLink].append(
            {"id": link_id, "invoice_id": invoice_id, "expires_at": expires_at, "sent_at": now - timedelta(minutes=1), "created_by": "load"}
        )
        seeded.append(SeededLink(link_id, signer.sign(link_id, expires_at), invoice_id, email, number))

    async def write() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                for model in (Customer, PaymentProfile, Invoice, PaymentLink):
                    values = tables[model]
                    for start in range(0, len(values), 1000):
                        await conn.execute(insert(model), values[start : start + 1000])
        finally:
            await engine.dispose()

    asyncio.run(write())
    return seeded


def forged_token(token: str) -> str:
    """The same length and shape as a real token, with a signature that is not ours."""
    head, tail = token[:-8], token[-8:]
    return head + "".join("A" if c != "A" else "B" for c in tail)


# --- servers ---------------------------------------------------------------------------------------------


def app_command(port: int, workers: int = 1) -> list[str]:
    """The Procfile's web command (one process per worker), on 127.0.0.1. --proxy-headers as there:
    X-Forwarded-For is believed from 127.0.0.1 only (uvicorn's default), as from a load balancer."""
    return [sys.executable, "-m", "uvicorn", "--factory", "app:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--proxy-headers", "--no-access-log", "--no-server-header", "--log-level", "warning"]  # fmt: skip


def serve_command(port: int, *args: str) -> list[str]:
    """load/_serve.py: bare Starlette (--bare) or the app in-process (--profile)."""
    return [sys.executable, str(LOAD / "_serve.py"), "--port", str(port), *args]


class Server:
    """A server subprocess (uvicorn): started, waited for, stopped with SIGINT so that the app's
    shutdown runs (the open recorder writes what it holds; profiles are written)."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path, wrapper: list[str] | None = None) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")  # closed in stop()
        self.log_path = log_path
        self.process = subprocess.Popen(
            [*(wrapper or []), *command],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_ready(self, path: str = "/health", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}{path}", timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout}s; see {self.log_path}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def server_errors(self) -> int:
        """Tracebacks and 5xx the server logged (the app logs every unhandled error)."""
        text = self.log_path.read_text(errors="replace")
        return text.count("Traceback") + len(re.findall(r"\bstatus=5\d\d\b", text))

    def workers(self) -> list[int]:
        """The processes that serve requests: uvicorn's children with --workers > 1, else itself."""
        children = child_pids(self.process.pid)
        return children or [self.process.pid]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(parent: int) -> list[int]:
    """Direct children of `parent` that are not multiprocessing's resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- wrk ---------------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk's path, installed from Debian's packages when missing (as scripts/test.sh installs chromium)."""
    found = shutil.which("wrk")
    if found:
        return found
    print("== installing wrk from Debian's packages", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and could not be installed (apt-get install -y wrk)")
    return found


# One line per request in the file named by WRK_REQUESTS: "PATH" or "PATH<TAB>COOKIE"; each request
# picks a random line. The requests are formatted once, in init (after wrk has set the Host header).
WRK_SCRIPT = r"""
local requests = {}
function init(args)
  for line in io.lines(os.getenv("WRK_REQUESTS")) do
    local path, cookie = line:match("^([^\t]+)\t?(.*)$")
    if path then
      local headers = {}
      if cookie ~= "" then headers["Cookie"] = cookie end
      requests[#requests + 1] = wrk.format("GET", path, headers)
    end
  end
  math.randomseed(os.time())
end
request = function() return requests[math.random(#requests)] end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d non2xx=%d errors=%d p50=%d p95=%d p99=%d max=%d\n", summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


@dataclass
class Wrk:
    requests: int
    non2xx: int  # wrk counts 4xx/5xx ("status errors")
    errors: int  # connect, read, write, timeout
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx - self.errors


def write_requests(path: Path, lines: Sequence[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{p}\t{c}\n" if c else f"{p}\n" for p, c in lines))
    return path


def run_wrk(base: str, requests_file: Path, duration: float, connections: int = 32, threads: int = 1) -> Wrk:
    """wrk -t1 -c32 for `duration` seconds over the requests in `requests_file` (random order)."""
    wrk = ensure_wrk()
    script = requests_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(script), f"{base}/"]
    result = subprocess.run(
        command, env={**os.environ, "WRK_REQUESTS": str(requests_file)}, capture_output=True, text=True, timeout=duration + 60
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    summary = re.search(r"RESULT requests=(\d+) non2xx=(\d+) errors=(\d+) p50=(\d+) p95=(\d+) p99=(\d+) max=([\d.]+)", result.stdout)
    if result.returncode != 0 or not rps or not summary:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    requests, non2xx, errors, p50, p95, p99 = (int(g) for g in summary.groups()[:6])
    return Wrk(requests, non2xx, errors, float(rps.group(1)), p50 / 1000, p95 / 1000, p99 / 1000, float(summary.group(7)) / 1000)


# --- figures over several runs: min / median / max, and the goals -----------------------------------------


@dataclass(frozen=True)
class Goal:
    figure: str
    op: str  # ">=", ">", "<=" or "<"
    target: float
    why: str = ""

    def met(self, value: float) -> bool:
        return {">=": value >= self.target, ">": value > self.target, "<=": value <= self.target, "<": value < self.target}[self.op]


def command_line() -> str:
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(shlex.quote(a) for a in [python, script, *sys.argv[1:]])


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def summarise(title: str, runs: list[dict[str, float]], goals: Sequence[Goal], notes: Sequence[str] = ()) -> bool:
    """Print every figure as min / median / max over the runs, then each goal with PASS or MISS
    (judged on the median), the date, the machine and the exact command. True when every goal passed."""
    figures: list[str] = []
    for run in runs:
        figures += [k for k in run if k not in figures]
    width = max([len(f) for f in figures] + [6])
    print()
    print(f"=== {title} ===")
    print(f"  {'figure'.ljust(width)}  {'min':>10}  {'median':>10}  {'max':>10}   (over {len(runs)} run{'s' * (len(runs) != 1)})")
    medians: dict[str, float] = {}
    for figure in figures:
        values = [run[figure] for run in runs if figure in run]
        medians[figure] = statistics.median(values)
        print(f"  {figure.ljust(width)}  {_fmt(min(values)):>10}  {_fmt(medians[figure]):>10}  {_fmt(max(values)):>10}")
    ok = True
    if goals:
        print("  -- goals (judged on the median) --")
    for goal in goals:
        value = medians.get(goal.figure, float("nan"))
        passed = value == value and goal.met(value)
        ok &= passed
        worst = [run[goal.figure] for run in runs if goal.figure in run]
        all_runs = "every run" if worst and all(goal.met(v) for v in worst) else "not every run"
        verdict = "PASS" if passed else "MISS"
        why = f"  - {goal.why}" if goal.why else ""
        print(f"  {verdict}  {goal.figure} {goal.op} {_fmt(goal.target)}: median {_fmt(value)} ({all_runs}){why}")
    for note in notes:
        print(f"  note: {note}")
    print(f"  date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}")
    print(f"  command: {command_line()}")
    return ok


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}, load average {load:.2f} at the end"


def repeat(runs: int, one_run: Callable[[int], dict[str, float]]) -> list[dict[str, float]]:
    results = []
    for index in range(runs):
        print(f"-- run {index + 1} of {runs} ({datetime.now(UTC):%H:%M:%S} UTC)", flush=True)
        results.append(one_run(index))
    return results


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print()
    print(f"=== {title} ===")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


# --- sampling profiles with py-spy (optional: `pip install --target /tmp/pyspy py-spy`) ----------------


def py_spy_wrapper(binary: str, output: Path, rate: int = 250) -> list[str]:
    """Prefix for a server command line: sample every thread, write collapsed stacks ("raw") to `output`."""
    return [binary, "record", "--format", "raw", "--rate", str(rate), "--threads", "--nonblocking", "--output", str(output), "--"]


def print_py_spy(path: Path, limit: int = 25) -> None:
    """Summarise py-spy's collapsed stacks: samples per thread, then the hottest functions (self and inclusive)."""
    import collections
    import re

    if not path.exists():
        print(f"(no py-spy output at {path})")
        return
    per_thread: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]  # fold line numbers into one entry per function
        total += count
        per_thread[thread] += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"\n=== py-spy: {total} samples on CPU (all threads; {path}) ===")
    for thread, count in per_thread.most_common(8):
        print(f"  {count / total:6.1%}  {thread}")
    print("  -- self time --")
    for frame, count in own.most_common(limit):
        print(f"  {count / total:6.1%}  {frame}")
    print("  -- inclusive time --")
    for frame, count in inclusive.most_common(limit):
        print(f"  {count / total:6.1%}  {frame}")


# --- a minimal HTTP/1.1 keep-alive client, to measure servers beyond what httpx can push on this box -----


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: no pooling, no redirects, Content-Length bodies only."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length = 0
        close = False
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self._reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
