"""Structured logs and audit events.

Every log line can carry the request id and trace id of the request being handled: the gRPC
handlers set them in context variables (`bind_request`), which are per asyncio task, so
concurrent streams never mix them up. With `--log-format json` each line is one JSON object.

Audit events are separate JSON lines, one per guard decision that found something, budget
refusal and soft-limit crossing, written to a configurable sink: stdout, a file, or a local
syslog socket. Like logs, they carry names, types, counts and token figures, never prompt text,
completions or matched values.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import stat
import sys
import time
from collections.abc import Mapping
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("extguard_request_id", default="")
TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("extguard_trace_id", default="")
AUDIT_LOGGER = "extguard.audit"
_audit = logging.getLogger(AUDIT_LOGGER)


def bind_request(request_id: str | None = None, trace_id: str | None = None) -> None:
    """Set the request id and trace id that the log lines of this task carry."""
    if request_id is not None:
        REQUEST_ID.set(request_id if request_id != "-" else "")
    if trace_id is not None:
        TRACE_ID.set(trace_id)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `trace_id` to every record, empty outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.trace_id = TRACE_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The usual text line, followed by the request and trace ids when a request is handled."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name} {value}" for name, value in (("request", getattr(record, "request_id", "")), ("trace", getattr(record, "trace_id", ""))) if value]
        return f"{line} [{', '.join(ids)}]" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, trace_id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id  # type: ignore[attr-defined]
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id  # type: ignore[attr-defined]
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__  # the type only: a message may quote payload text
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str, audit_sink: str) -> None:
    """Set up the root logger (text or json on stderr) and the audit sink."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    _audit.handlers[:] = [audit_handler(audit_sink)]
    _audit.propagate = False
    _audit.setLevel(logging.INFO)


def audit_handler(sink: str) -> logging.Handler:
    """Return the handler for `sink`: "stdout", "file:PATH" or "syslog:SOCKET_PATH"; raise ValueError otherwise."""
    if sink == "stdout":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    elif sink.startswith("file:") and len(sink) > 5:
        handler = logging.FileHandler(sink[5:], encoding="utf-8")
    elif sink.startswith("syslog:") and sink[7:].startswith("/"):
        if not stat.S_ISSOCK(os.stat(sink[7:]).st_mode):  # raises FileNotFoundError when missing
            raise ValueError(f"--audit-sink {sink!r}: {sink[7:]} is not a socket")
        handler = logging.handlers.SysLogHandler(address=sink[7:], facility=logging.handlers.SysLogHandler.LOG_AUTH)
    else:
        raise ValueError(f"--audit-sink {sink!r}: use stdout, file:PATH or syslog:/path/to/socket")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def audit(event: str, **fields: Any) -> None:
    """Write one audit event; fields that are None are left out."""
    if not _audit.isEnabledFor(logging.INFO):
        return
    entry: dict[str, Any] = {"time": _utc(time.time()), "event": event}
    if REQUEST_ID.get():
        entry["request_id"] = REQUEST_ID.get()
    if TRACE_ID.get():
        entry["trace_id"] = TRACE_ID.get()
    entry.update({key: _plain(value) for key, value in fields.items() if value is not None})
    _audit.info(json.dumps(entry, ensure_ascii=False, sort_keys=False))


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
