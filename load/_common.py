"""Shared plumbing for the benchmarks in load/: paths, free ports, a test environment, a server subprocess.

Every benchmark only talks to 127.0.0.1, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "load"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LINK_KEY = "load-link-key-0123456789abcdef"
STRIPE_SECRET = "sk_test_paylink_load"
WEBHOOK_SECRET = "whsec_paylink_load_secret"


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
            for child in sorted(path.rglob("*"), reverse=True):
                child.unlink() if child.is_file() or child.is_symlink() else child.rmdir()
            path.rmdir()


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


class Server:
    """A uvicorn process (one worker) started from load/_serve.py; stopped with SIGINT so profiles are written."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log_path: Path, wrapper: list[str] | None = None) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")  # closed in stop()
        self.log_path = log_path
        self.process = subprocess.Popen(
            [*(wrapper or []), sys.executable, str(LOAD / "_serve.py"), "--port", str(port), *args],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_ready(self, path: str = "/health", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}; see {self.log_path}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.base}{path}", timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
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
