"""Logging that never blocks the event loop, and the request id that ties a request's lines together.

`configure_logging(level, fmt)` (the web app's and the worker's entry points call it) puts one
`QueueHandler` on the root logger: a log call only appends to an in-memory queue, and a
`QueueListener` thread formats and writes the lines (stderr), as key=value text or, with
`LOG_FORMAT=json`, one JSON object a line.

`request_id` is a context variable: the access-log middleware sets it for each request (the
client's `X-Request-ID` if it is sane, else a new one), every line logged while the request runs
carries it, and the audit log and the outbox store it with the rows the request creates.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import secrets
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("paylink_request_id", default=None)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{8,64}")
FIELDS = "fields"  # LogRecord attribute (logging's `extra`): structured fields of a line


def current_request_id() -> str | None:
    """The id of the request being handled (None outside a request: the CLI, the worker's loops)."""
    return request_id.get()


def new_request_id(incoming: str | None) -> str:
    """The client's (or the proxy's) X-Request-ID if it looks like an id, else a fresh random one."""
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return secrets.token_hex(12)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`2026-11-23T20:45:00.123Z INFO paylink.access request method=GET … request_id=…`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
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


class _Queued(logging.handlers.QueueHandler):
    """Keeps the structured fields and the request id on the record that crosses the queue."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        rid = getattr(record, "request_id", None) or request_id.get()
        prepared: logging.LogRecord = super().prepare(record)
        prepared.request_id = rid
        return prepared


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logger -> queue -> one listener thread -> stderr, formatted as `fmt` ("text" or "json")."""
    global _listener
    if _listener is not None:
        return
    output = logging.StreamHandler()
    output.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _Queued(q)
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) is logging.StreamHandler:  # basicConfig's; a test runner's capture handlers stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _listener = logging.handlers.QueueListener(q, output, respect_handler_level=True)
    _listener.start()
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write what is still queued and stop the listener thread (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
