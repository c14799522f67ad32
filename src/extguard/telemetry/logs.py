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

import asyncio
import atexit
import contextvars
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("extguard_request_id", default="")
TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("extguard_trace_id", default="")
AUDIT_LOGGER = "extguard.audit"
_audit = logging.getLogger(AUDIT_LOGGER)
_sink: AuditSink | None = None
# Syslog priority <38>: facility auth (4) times 8, plus severity informational (6).
SYSLOG_PREFIX = b"<38>"


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

    global _sink
    if _sink is not None:
        _sink.close()
    _sink = open_audit_sink(audit_sink)
    atexit.register(_sink.close)


class AuditSink:
    """Collects audit lines and writes them in batches: every FLUSH_DELAY_S, or at FLUSH_LINES.

    A write per event would cost each guarded request a system call on the event loop. Lines
    wait at most FLUSH_DELAY_S while an event loop runs; without one they are written at once.
    """

    FLUSH_DELAY_S = 0.2
    FLUSH_LINES = 256

    def __init__(self, write_lines: Callable[[list[str]], None], close: Callable[[], None] = lambda: None) -> None:
        self._write_lines = write_lines
        self._close = close
        self._pending: list[str] = []
        self._scheduled = False
        self._failed = False

    def emit(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_later(self.FLUSH_DELAY_S, self.flush)
            self._scheduled = True
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            self._write_lines(lines)
            self._failed = False
        except OSError as error:
            if not self._failed:  # once per failure streak, without the events themselves
                logging.getLogger("extguard.telemetry").error("audit sink write failed (%s); %d events lost", error, len(lines))
            self._failed = True

    def close(self) -> None:
        self.flush()
        self._close()


def open_audit_sink(sink: str) -> AuditSink:
    """Return the sink for "stdout", "file:PATH" or "syslog:SOCKET_PATH"; raise ValueError or OSError otherwise."""
    if sink == "stdout":
        def write_stdout(lines: list[str]) -> None:
            sys.stdout.write("".join(line + "\n" for line in lines))
            sys.stdout.flush()

        return AuditSink(write_stdout)
    if sink.startswith("file:") and len(sink) > 5:
        file = open(sink[5:], "a", encoding="utf-8")  # noqa: SIM115 - the sink owns it until close

        def write_file(lines: list[str]) -> None:
            file.write("".join(line + "\n" for line in lines))
            file.flush()

        return AuditSink(write_file, file.close)
    if sink.startswith("syslog:") and sink[7:].startswith("/"):
        path = sink[7:]
        if not stat.S_ISSOCK(os.stat(path).st_mode):  # raises FileNotFoundError when missing
            raise ValueError(f"--audit-sink {sink!r}: {path} is not a socket")
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

        def write_syslog(lines: list[str]) -> None:
            for line in lines:
                connection.sendto(SYSLOG_PREFIX + line.encode("utf-8"), path)

        return AuditSink(write_syslog, connection.close)
    raise ValueError(f"--audit-sink {sink!r}: use stdout, file:PATH or syslog:/path/to/socket")


def audit(event: str, **fields: Any) -> None:
    """Write one audit event; fields that are None are left out.

    Without a configured sink (tests, library use) events go to the `extguard.audit` logger.
    """
    entry: dict[str, Any] = {"time": _utc(time.time()), "event": event}
    if REQUEST_ID.get():
        entry["request_id"] = REQUEST_ID.get()
    if TRACE_ID.get():
        entry["trace_id"] = TRACE_ID.get()
    for key, value in fields.items():
        if value is not None:
            entry[key] = value
    line = json.dumps(entry, ensure_ascii=False)
    if _sink is not None:
        _sink.emit(line)
    elif _audit.isEnabledFor(logging.INFO):
        _audit.info(line)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
