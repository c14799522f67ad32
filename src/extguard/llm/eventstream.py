"""AWS event stream framing (`application/vnd.amazon.eventstream`), in which Bedrock streams.

A message is a 12-byte prelude (total length, headers length, CRC32 of those 8 bytes), the
headers, the payload and a CRC32 of everything before it, all integers big-endian. Bedrock's
ConverseStream and InvokeModelWithResponseStream send one JSON payload per message and name it
in the `:event-type` header (`:message-type` is `event`, or `exception` for an error).

Rewriting a message keeps its header bytes as received and computes new lengths and CRCs.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

_PRELUDE = struct.Struct(">II")
_PRELUDE_BYTES = 12  # total length, headers length, prelude CRC
_CRC_BYTES = 4
# Bedrock's messages are a few hundred bytes; a length past this is a broken stream.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_STRING = 7  # the header value type of a UTF-8 string (2-byte length, then the bytes)
# Byte sizes of the fixed-size header value types: bool true and false, byte, short, int,
# long, timestamp and UUID.
_FIXED_SIZES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


class EventStreamError(ValueError):
    """A message's lengths or CRCs are wrong, or its headers cannot be read."""


@dataclass(slots=True)
class Message:
    raw: bytes  # the message as received
    raw_headers: bytes  # the header block as received, written back unchanged
    headers: dict[str, str]  # the string-valued headers, decoded
    payload: bytes

    @property
    def event_type(self) -> str:
        return self.headers.get(":event-type", "")

    @property
    def message_type(self) -> str:
        return self.headers.get(":message-type", "event")

    def with_payload(self, payload: bytes) -> bytes:
        """Return this message encoded with `payload` in place of its own."""
        return encode_raw(self.raw_headers, payload)


class EventStreamDecoder:
    """Feed body chunks, get back the messages they complete; the rest stays buffered."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Message]:
        """Return the messages completed by `chunk`; raise EventStreamError for a broken one."""
        buffer = self._buffer + chunk if self._buffer else chunk
        messages: list[Message] = []
        start = 0
        while len(buffer) - start >= _PRELUDE_BYTES:
            total, headers_length = _PRELUDE.unpack_from(buffer, start)
            (prelude_crc,) = struct.unpack_from(">I", buffer, start + 8)
            if zlib.crc32(buffer[start : start + 8]) != prelude_crc:
                raise EventStreamError("prelude CRC mismatch")
            if not _PRELUDE_BYTES + headers_length + _CRC_BYTES <= total <= MAX_MESSAGE_BYTES:
                raise EventStreamError(f"invalid message length {total}")
            if len(buffer) - start < total:
                break
            message = buffer[start : start + total]
            (message_crc,) = struct.unpack_from(">I", message, total - _CRC_BYTES)
            if zlib.crc32(message[:-_CRC_BYTES]) != message_crc:
                raise EventStreamError("message CRC mismatch")
            raw_headers = message[_PRELUDE_BYTES : _PRELUDE_BYTES + headers_length]
            payload = message[_PRELUDE_BYTES + headers_length : -_CRC_BYTES]
            messages.append(Message(message, raw_headers, _string_headers(raw_headers), payload))
            start += total
        self._buffer = buffer[start:]
        return messages

    def take_rest(self) -> bytes:
        """Return and clear the bytes of a message that never ended (a truncated stream)."""
        rest, self._buffer = self._buffer, b""
        return rest


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """Return one message with string `headers` and `payload`."""
    block = bytearray()
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode("utf-8"), value.encode("utf-8")
        block += bytes([len(name_bytes)]) + name_bytes + bytes([_STRING]) + struct.pack(">H", len(value_bytes)) + value_bytes
    return encode_raw(bytes(block), payload)


def encode_raw(raw_headers: bytes, payload: bytes) -> bytes:
    """Return one message with an encoded header block `raw_headers` and `payload`."""
    total = _PRELUDE_BYTES + len(raw_headers) + len(payload) + _CRC_BYTES
    prelude = _PRELUDE.pack(total, len(raw_headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _string_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    position = 0
    try:
        while position < len(block):
            name_length = block[position]
            name = block[position + 1 : position + 1 + name_length].decode("utf-8")
            position += 1 + name_length
            value_type = block[position]
            position += 1
            if value_type in (6, _STRING):
                (length,) = struct.unpack_from(">H", block, position)
                value = block[position + 2 : position + 2 + length]
                position += 2 + length
                if value_type == _STRING:
                    headers[name] = value.decode("utf-8")
            elif value_type in _FIXED_SIZES:
                position += _FIXED_SIZES[value_type]
            else:
                raise EventStreamError(f"unknown header value type {value_type}")
    except (IndexError, struct.error, UnicodeDecodeError) as error:
        raise EventStreamError("unreadable headers") from error
    if position != len(block):
        raise EventStreamError("unreadable headers")
    return headers
