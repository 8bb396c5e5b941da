"""Logging that never blocks the event loop, and the request id that ties a request's lines together.

`configure_logging(level, fmt)` (the web app's and the worker's entry points call it) puts one
`QueueHandler` on the root logger: a log call only appends to an in-memory deque, and a writer
thread formats and writes the lines (stderr) in batches, as key=value text or, with
`LOG_FORMAT=json`, one JSON object a line; a link's token is redacted from every line.

`request_id` is a context variable: the access-log middleware sets it for each request (the
client's `X-Request-ID` if it is sane, else a new one), every line logged while the request runs
carries it, and the audit log and the outbox store it with the rows the request creates.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import logging.handlers
import os
import random
import re
import threading
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("paylink_request_id", default=None)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{8,64}")
FIELDS = "fields"  # LogRecord attribute (logging's `extra`): structured fields of a line


def current_request_id() -> str | None:
    """The id of the request being handled (None outside a request: the CLI, the worker's loops)."""
    return request_id.get()


# Request ids need to be unique, not secret: a generator of our own, seeded from the OS (not the global
# one, and no system call per request).
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))  # a forked worker draws its own ids


def new_request_id(incoming: str | None) -> str:
    """The client's (or the proxy's) X-Request-ID if it looks like an id, else a fresh random one."""
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_ids.getrandbits(96):024x}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`2026-11-23T20:45:00.123Z INFO paylink.access request method=GET … request_id=…`."""

    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:  # thousands of lines a second share it
            self._second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        stamp = f"{self._second[1]}.{int((record.created - second) * 1000):03d}Z"
        line = f"{stamp} {record.levelname} {record.name} {record.getMessage()}"
        rid = getattr(record, "request_id", None)
        if rid and "request_id=" not in line:
            line += f" request_id={rid}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id and the line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            data["request_id"] = rid
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str, separators=(",", ":"))


# --- the pipeline: a log call appends to a deque on the caller's thread; one thread writes in batches ---
#
# logging.handlers.QueueListener wakes its thread for every record, and each wake-up takes the GIL
# from the event loop mid-request (on payday: thousands of times a second, one line each). Here a
# log call only appends the record to a deque (no lock, no wake-up, no formatting: `prepare` keeps
# the record as it is); the writer thread wakes every WRITE_INTERVAL_SECONDS, formats what has
# accumulated and writes it with one write and one flush. The backlog is bounded: past
# MAX_PENDING_RECORDS (a writer that cannot keep up, a stuck stderr) records are dropped and
# counted, and the count is logged once the writer catches up. Every line also passes `redact`, so
# a link's token never reaches the output even if some message carried one.

WRITE_INTERVAL_SECONDS = 0.05
MAX_PENDING_RECORDS = 100_000
WRITE_SLICE = 64  # records formatted and written between two chances for the event loop to run
_TOKEN_PATH = re.compile(r"/(pay|verify)/(?!l/|\{)[A-Za-z0-9_.\-]{16,}")
# A signed token anywhere (a query string, a message): payload[.timestamp].signature, URL-safe base64.
_SIGNED = re.compile(r"[A-Za-z0-9_\-]{20,}(?:\.[A-Za-z0-9_\-]{4,12})?\.[A-Za-z0-9_\-]{20,}")


def redact(line: str) -> str:
    """`/pay/<token>` and `/verify/<token>` anywhere in a line become `/pay/{token}`, `/verify/{token}`,
    and any other signed token becomes `{token}`."""
    if "/pay/" in line or "/verify/" in line:
        line = _TOKEN_PATH.sub(lambda m: f"/{m.group(1)}/{{token}}", line)
    return _SIGNED.sub("{token}", line) if "." in line else line


class _Redacting(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        return line if getattr(record, "token_free", False) else redact(line)


class _Queued(logging.handlers.QueueHandler):
    """Appends the record, with the request id, to the writer's deque: no copy, no formatting here."""

    def __init__(self, writer: _BatchWriter) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # the deque below stands for the queue
        self.writer = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.writer.put(record)


class _BatchWriter:
    """The thread that formats and writes the queued records, a batch at a time."""

    def __init__(self, handlers: list[logging.Handler], interval: float = WRITE_INTERVAL_SECONDS) -> None:
        self.handlers = handlers
        self.interval = interval
        self.pending: collections.deque[logging.LogRecord] = collections.deque()
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def put(self, record: logging.LogRecord) -> None:
        if len(self.pending) >= MAX_PENDING_RECORDS:
            self.dropped += 1
            return
        self.pending.append(record)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()

    def drain(self) -> None:
        batch: list[logging.LogRecord] = []
        pending = self.pending
        while pending:
            batch.append(pending.popleft())
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            batch.append(
                logging.makeLogRecord(
                    {
                        "name": "paylink.logs",
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                        "msg": "logs.dropped count=%d (the log writer fell behind)",
                        "args": (dropped,),
                    }
                )
            )
        # In slices, giving the GIL up between them: formatting a second of payday's lines in one go held
        # it for milliseconds at a time, and the event loop waited (the pages' p99).
        for start in range(0, len(batch), WRITE_SLICE):
            if start:
                time.sleep(0)
            self._write(batch[start : start + WRITE_SLICE])

    def _write(self, batch: list[logging.LogRecord]) -> None:
        for handler in self.handlers:
            write_batch = getattr(handler, "write_batch", None)
            if write_batch is not None:
                write_batch([r for r in batch if r.levelno >= handler.level])
            else:
                for record in batch:
                    if record.levelno >= handler.level:
                        handler.handle(record)


class BatchStream(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes a batch of lines with one write and one flush."""

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        lines = []
        for record in records:
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        if lines:
            with self.lock:  # type: ignore[union-attr]
                self.stream.write("\n".join(lines) + "\n")
                self.flush()


_writer: _BatchWriter | None = None
_handler: logging.Handler | None = None


class _Line(logging.LogRecord):
    """A record built with only what our formatters read (logging's own constructor looks up the
    time, thread, process and more: most of a log call's cost)."""

    def __init__(self, name: str, msg: str, args: tuple[Any, ...], fields: dict[str, Any], rid: str | None) -> None:
        self.name, self.msg, self.args = name, msg, args
        self.levelno, self.levelname = logging.INFO, "INFO"
        self.created = time.time()
        self.exc_info = self.exc_text = self.stack_info = None
        self.request_id = rid
        setattr(self, FIELDS, fields)


def info_line(logger: logging.Logger, msg: str, args: tuple[Any, ...], fields: dict[str, Any], rid: str | None) -> None:
    """`logger.info(msg, *args, extra={FIELDS: fields})` for a line logged on every request: when the
    pipeline is configure_logging's and nothing else listens (the web app in production), the record
    goes straight to the writer's queue; otherwise (tests capturing logs, another handler) through
    logging as usual. Only for lines whose parts cannot hold a token (the access line: a templated path,
    the method, status, time and a request id of at most 64 characters, shorter than any signed token):
    the writer does not search them for one (it does for every other line)."""
    if _writer is not None and logger.isEnabledFor(logging.INFO):
        root = logging.getLogger()
        if logger.propagate and not logger.handlers and root.handlers == [_handler]:
            _writer.put(_Line(logger.name, msg, args, fields, rid))
            return
    logger.info(msg, *args, extra={FIELDS: fields, "request_id": rid})


def log_pipeline(output: logging.Handler, fmt: str = "text") -> tuple[logging.Handler, _BatchWriter]:
    """A handler for the root logger and the writer thread behind it that formats (as `fmt`, tokens
    redacted) and writes to `output`. `configure_logging` installs one; tests build their own."""
    output.setFormatter(_Redacting(JsonFormatter() if fmt == "json" else TextFormatter()))
    writer = _BatchWriter([output])
    handler = _Queued(writer)
    handler.addFilter(_RequestIdFilter())
    return handler, writer


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logger -> deque -> one writer thread -> stderr, formatted as `fmt` ("text" or "json")."""
    global _writer, _handler
    if _writer is not None:
        return
    # What a log call records on the caller's thread: no thread or process names (nobody reads them).
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logging._srcfile = None  # nor the caller's file and line (a walk up the stack per call; the docs' "Optimization")
    handler, writer = log_pipeline(BatchStream(), fmt)
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) is logging.StreamHandler:  # basicConfig's; a test runner's capture handlers stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _writer, _handler = writer, handler
    writer.start()
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write what is still queued and stop the writer thread (at exit)."""
    global _writer, _handler
    if _writer is not None:
        _writer.stop()
        _writer = None
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
