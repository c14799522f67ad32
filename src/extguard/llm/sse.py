"""Incremental Server-Sent Events framing: split a byte stream into events and write them back.

Events are split on a blank line (`\\n\\n`, `\\r\\n\\r\\n` or `\\r\\r`), as the SSE specification
allows. Each event keeps its raw bytes, so an event the guard leaves unchanged is forwarded byte
for byte. Field values are decoded as UTF-8 only once an event is complete, so a multi-byte
character split across two body chunks is never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(r"\r\n|\n|\r")


class SseDecodeError(ValueError):
    """An event is not valid UTF-8."""


@dataclass(slots=True)
class SseEvent:
    raw: bytes  # the event as received, including its terminating blank line
    event: str | None  # the `event:` field; None when absent
    data: str  # the `data:` lines joined with "\n"; "" when absent

    @property
    def is_comment(self) -> bool:
        return self.event is None and not self.data


class SseDecoder:
    """Feed body chunks, get back the events they complete; the rest stays buffered."""

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Return the events completed by `chunk`; raise SseDecodeError for an invalid UTF-8 event."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SseEvent] = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            if match.start() == start:
                # Blank lines with no field between them form no event.
                start = match.end()
                continue
            events.append(_parse(buffer[start : match.end()], buffer[start : match.start()]))
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def take_rest(self) -> bytes:
        """Return and clear the bytes of an event that never ended (a truncated stream)."""
        rest, self._buffer = self._buffer, b""
        return rest


def _parse(raw: bytes, block: bytes) -> SseEvent:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SseDecodeError(f"SSE event is not valid UTF-8 at byte {error.start}") from None

    event_name: str | None = None
    data_lines: list[str] = []
    for line in _LINE_END.split(text):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event_name = value
    return SseEvent(raw=raw, event=event_name, data="\n".join(data_lines))


def encode_event(data: str, event: str | None = None) -> bytes:
    """Write one SSE event; `data` must not contain newlines (compact JSON never does)."""
    if event is None:
        return b"data: " + data.encode("utf-8") + b"\n\n"
    return b"event: " + event.encode("utf-8") + b"\ndata: " + data.encode("utf-8") + b"\n\n"
