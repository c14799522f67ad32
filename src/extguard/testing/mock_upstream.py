"""Mock OpenAI- and Anthropic-compatible LLM upstream for the demo, end-to-end tests and benchmarks.

Endpoints:

- ``POST /v1/chat/completions``: OpenAI Chat Completions, as JSON or as SSE (``"stream": true``).
- ``POST /openai/deployments/NAME/chat/completions``: the same, at Azure OpenAI's path. The
  deployment name and the ``api-version`` query are recorded but not checked.
- ``POST /v1/messages``: Anthropic Messages, as JSON or as SSE.
- ``GET /v1/models``: a fixed OpenAI-style model list. The LLM endpoints accept any model name.
- ``GET /mock/raw`` and ``POST /mock/raw``: return the request body (``b"hello"`` for GET) as
  ``application/octet-stream``.
- ``GET /mock/requests`` and ``DELETE /mock/requests``: list (oldest first) or clear the
  recorded requests.
- ``GET /mock/usage`` and ``DELETE /mock/usage``: read or zero what the mock has billed (see
  below).
- ``GET /healthz``: returns ``ok``.

By default the reply text echoes the text of the last user message, so a test can see what
reached the upstream after masking. A request can script the reply with a top-level ``"mock"``
object, which the OpenAI client sends through ``extra_body``. ``MockScript`` lists its fields.

A whole server can simulate a provider outage instead: started with an ``Outage`` (the
``--fail-status`` option), it replies to every LLM request with that error status in the
endpoint's error format, optionally with a ``Retry-After`` header. A test uses it for the
primary of a failover pair, since both servers of the pair receive the same request body.

With ``--tls-cert`` and ``--tls-key`` (``ssl_context`` in the API) the server speaks HTTPS, for
tests of an Envoy cluster with upstream TLS.

Token counts in ``usage`` are an estimate of ceil(characters / 4). Prompt tokens count the text
of all messages plus the Anthropic ``system`` prompt. Completion tokens count the reply text or
the tool call arguments.

The mock bills like a provider. A successful JSON reply bills its ``usage``. A stream bills its
prompt tokens and the estimate of the text it wrote, counted when the stream ends, so a stream
that the client leaves early bills only the events sent before. An error reply bills nothing.
``GET /mock/usage`` returns the totals as ``{"requests", "input_tokens", "output_tokens",
"streams_open"}``, so a test can compare them with what a gateway metered once
``streams_open`` is 0.

Every request except those to ``/mock/...`` and ``/healthz`` is recorded with its method,
path, query string, headers (lower-case names) and body. aiohttp decompresses a request body
sent with ``content-encoding: gzip`` or ``deflate`` before it is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gzip
import json
import logging
import math
import signal
import ssl
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

RECORDED_REQUESTS = web.AppKey("recorded_requests", collections.deque)
OUTAGE: web.AppKey[Outage | None] = web.AppKey("outage")

# Request body limit. aiohttp's default of 1 MiB would reject long benchmark prompts with 413.
MAX_REQUEST_BYTES = 64 * 1024 * 1024

DEFAULT_CHUNK_CHARS = 4
CHARS_PER_TOKEN = 4
MODEL_IDS = ("mock-gpt", "mock-claude")

_UNRECORDED_PATHS = frozenset({"/mock/requests", "/mock/usage", "/healthz"})
# Maximum time a stream with `hold_after_events` stays open waiting for the client to leave.
MAX_HOLD_S = 120.0
_SCRIPT_FIELDS = frozenset(
    {
        "reply",
        "tool_call",
        "split_at",
        "chunk_chars",
        "chunk_delay_ms",
        "gzip",
        "status",
        "error_message",
        "truncate_after_events",
        "hold_after_events",
        "content_type",
        "native",
    }
)
# Native response formats that `mock.native` selects on /v1/chat/completions.
NATIVE_FORMATS = ("anthropic", "gemini", "bedrock", "bedrock_anthropic")
EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

# Error types by HTTP status, from https://docs.claude.com/en/api/errors. That page states that other
# 4xx statuses may use invalid_request_error, and the mock uses api_error for other 5xx ones.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Outage:
    """Every LLM request fails with ``status``, and ``Retry-After: retry_after_s`` when given."""

    status: int
    retry_after_s: int | None = None

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"fail status must be an HTTP error status 400-599, got {self.status}")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError(f"retry-after must be >= 0 seconds, got {self.retry_after_s}")


class InvalidRequestError(ValueError):
    """A request that the mock rejects with HTTP 400 in the endpoint's provider error format."""


@dataclass(frozen=True)
class ToolCall:
    """A scripted tool call. ``arguments`` is sent verbatim as the JSON-encoded arguments."""

    name: str
    arguments: str


@dataclass(frozen=True)
class MockScript:
    """Scripted behaviour from the request's top-level ``"mock"`` object.

    Fields:
        reply: text returned instead of the echo of the last user message.
        tool_call: a tool call returned instead of text. It excludes ``reply``.
        split_at: character offsets, increasing, at which a streamed reply text (or the tool
            call arguments) is cut into SSE events. Offsets past the end of the text are
            clamped to its length, and empty pieces are dropped.
        chunk_chars: characters per streamed event when ``split_at`` is not given.
        chunk_delay_ms: delay between SSE events, in milliseconds.
        gzip: gzip-encode the response body. SSE bodies get a sync flush after every event.
        status: HTTP status (400-599) of an error response in the provider's error format.
        error_message: message of that error response.
        truncate_after_events: end a streamed response after this many SSE events, so the
            final chunk and ``[DONE]`` (or ``message_stop``) are missing. The HTTP response
            itself ends normally.
        hold_after_events: send this many SSE events, then send nothing more and keep the
            response open until the client goes away (at most MAX_HOLD_S, then end it). A test
            reads what was sent and closes the stream, so the billed usage is exactly known.
        content_type: content type sent in place of ``application/json`` or
            ``text/event-stream``.
        native: on ``/v1/chat/completions``, reply in a provider's native format instead of
            OpenAI's, as a provider behind a translating gateway (Envoy AI Gateway) does:
            ``anthropic`` (Messages, JSON or SSE), ``gemini`` (``generateContent`` JSON, or
            ``streamGenerateContent`` SSE), ``bedrock`` (Converse JSON, or ConverseStream in
            AWS event stream framing) or ``bedrock_anthropic`` (an Anthropic model through
            Bedrock's InvokeModel: Anthropic JSON, or base64 Anthropic events in ``chunk``
            messages of an event stream).
    """

    reply: str | None = None
    tool_call: ToolCall | None = None
    split_at: tuple[int, ...] | None = None
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    chunk_delay_ms: float = 0.0
    gzip: bool = False
    status: int | None = None
    error_message: str | None = None
    truncate_after_events: int | None = None
    hold_after_events: int | None = None
    content_type: str | None = None
    native: str | None = None


@dataclass
class Billing:
    """Tokens the mock has billed since it started or was last zeroed."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    streams_open: int = 0

    def bill(self, input_tokens: int, output_tokens: int) -> None:
        self.requests += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def zero(self) -> None:
        """Zero the totals. Streams still open bill into the new totals when they end."""
        self.requests = self.input_tokens = self.output_tokens = 0


BILLING = web.AppKey("billing", Billing)


@dataclass(frozen=True)
class SseEvent:
    """One encoded stream event (SSE, or an AWS event stream message) and the generated text
    (reply or tool arguments) it carries."""

    data: bytes
    generated: str = ""


@dataclass(frozen=True)
class Completion:
    """The reply to one LLM request, independent of the provider format."""

    model: str
    text: str
    tool_call: ToolCall | None
    prompt_tokens: int
    completion_tokens: int


# --- Script parsing ---------------------------------------------------------------------------


def parse_mock_script(raw: object) -> MockScript:
    """Parse and validate the ``"mock"`` request field. ``None`` gives the default script.

    Raises:
        InvalidRequestError: names the invalid field and what it must be.
    """
    if raw is None:
        return MockScript()
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"mock must be an object, got {type(raw).__name__}")

    unknown = sorted(set(raw) - _SCRIPT_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unknown mock field(s) {unknown}. Valid fields: {sorted(_SCRIPT_FIELDS)}"
        )

    script = MockScript(
        reply=_optional_field(raw, "reply", str, "a string"),
        tool_call=_parse_tool_call(raw.get("tool_call")),
        split_at=_parse_split_at(raw.get("split_at")),
        chunk_chars=_bounded_int(raw, "chunk_chars", DEFAULT_CHUNK_CHARS, minimum=1),
        chunk_delay_ms=_parse_delay(raw.get("chunk_delay_ms")),
        gzip=bool(_optional_field(raw, "gzip", bool, "a boolean")),
        status=_parse_status(raw.get("status")),
        error_message=_optional_field(raw, "error_message", str, "a string"),
        truncate_after_events=_bounded_int(raw, "truncate_after_events", None, minimum=0),
        hold_after_events=_bounded_int(raw, "hold_after_events", None, minimum=0),
        content_type=_parse_content_type(raw.get("content_type")),
        native=_parse_native(raw.get("native")),
    )

    if script.reply is not None and script.tool_call is not None:
        raise InvalidRequestError("mock.reply and mock.tool_call cannot be used together")
    return script


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_field(raw: dict[str, Any], name: str, expected: type, description: str) -> Any:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise InvalidRequestError(f"mock.{name} must be {description}, got {value!r}")
    return value


def _bounded_int(
    raw: dict[str, Any], name: str, default: int | None, *, minimum: int
) -> int | None:
    value = raw.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < minimum:
        raise InvalidRequestError(f"mock.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_tool_call(raw: object) -> ToolCall | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"mock.tool_call must be an object, got {raw!r}")

    name = raw.get("name")
    arguments = raw.get("arguments")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"mock.tool_call.name must be a non-empty string, got {name!r}")
    if not isinstance(arguments, str):
        raise InvalidRequestError(
            f"mock.tool_call.arguments must be a JSON-encoded string, got {arguments!r}"
        )
    return ToolCall(name=name, arguments=arguments)


def _parse_split_at(raw: object) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(_is_int(offset) and offset >= 0 for offset in raw):
        raise InvalidRequestError(
            f"mock.split_at must be a list of non-negative integers, got {raw!r}"
        )
    if any(later <= earlier for earlier, later in zip(raw, raw[1:])):
        raise InvalidRequestError(f"mock.split_at must be strictly increasing, got {raw!r}")
    return tuple(raw)


def _parse_delay(raw: object) -> float:
    if raw is None:
        return 0.0
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw < math.inf:
        raise InvalidRequestError(
            f"mock.chunk_delay_ms must be a non-negative number of milliseconds, got {raw!r}"
        )
    return float(raw)


def _parse_status(raw: object) -> int | None:
    if raw is None:
        return None
    if not _is_int(raw) or not 400 <= raw <= 599:
        raise InvalidRequestError(f"mock.status must be an HTTP error status 400-599, got {raw!r}")
    return raw


def _parse_native(raw: object) -> str | None:
    if raw is None:
        return None
    if raw not in NATIVE_FORMATS:
        raise InvalidRequestError(f"mock.native must be one of {list(NATIVE_FORMATS)}, got {raw!r}")
    return str(raw)


def _parse_content_type(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or "\r" in raw or "\n" in raw:
        raise InvalidRequestError(
            f"mock.content_type must be a non-empty single-line string, got {raw!r}"
        )
    return raw


# --- Request parsing --------------------------------------------------------------------------


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    """Return the request body parsed as a JSON object, or raise InvalidRequestError."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from error

    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _require_field(body: dict[str, Any], name: str, expected: type, description: str) -> Any:
    value = body.get(name)
    valid = _is_int(value) if expected is int else isinstance(value, expected)
    if not valid:
        raise InvalidRequestError(f"{name} is missing or not {description}: {value!r}")
    return value


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequestError(f"stream must be a boolean, got {stream!r}")
    return stream


def _content_text(content: object) -> str:
    """Return the text of a message content: a string, or the concatenated text blocks of a list.

    Blocks of other types (images, tool results) contribute nothing.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""

    texts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text":
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
    return "".join(texts)


def _validated_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = _require_field(body, "messages", list, "a list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{index}] must be an object, got {message!r}")
    return messages


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def estimate_tokens(text: str) -> int:
    """Return ceil(len(text) / 4), the token estimate used in every ``usage`` object."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _build_completion(
    model: str, prompt_text: str, last_user_text: str, script: MockScript
) -> Completion:
    if script.tool_call is not None:
        text = ""
        generated = script.tool_call.arguments
    else:
        text = script.reply if script.reply is not None else last_user_text
        generated = text

    return Completion(
        model=model,
        text=text,
        tool_call=script.tool_call,
        prompt_tokens=estimate_tokens(prompt_text),
        completion_tokens=estimate_tokens(generated),
    )


def split_text(text: str, split_at: tuple[int, ...] | None, chunk_chars: int) -> list[str]:
    """Cut text into the pieces sent as separate stream events.

    With ``split_at`` the cuts are at those character offsets, clamped to ``len(text)``.
    Otherwise every piece but the last has ``chunk_chars`` characters. Empty pieces are
    dropped, so an empty text gives no pieces.
    """
    if split_at is None:
        offsets = list(range(chunk_chars, len(text), chunk_chars))
    else:
        offsets = [min(offset, len(text)) for offset in split_at]

    bounds = [0, *offsets, len(text)]
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:])]
    return [piece for piece in pieces if piece]


# --- Response writing -------------------------------------------------------------------------


def _json_response(payload: object, script: MockScript, status: int = 200) -> web.Response:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": script.content_type or "application/json"}
    if script.gzip:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=headers)


def _sse_data(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _sse_named(event: str, payload: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def _send_sse(
    request: web.Request,
    events: list[SseEvent],
    script: MockScript,
    prompt_tokens: int,
    content_type: str | None = None,
) -> web.StreamResponse:
    """Stream the SSE events, applying the script's delay, truncation, hold and gzip.

    ``content_type`` replaces SSE's for other framings (AWS event stream messages).

    Bills the prompt tokens and the estimate of the generated text that was written, once the
    stream ends for any reason.
    """
    response = web.StreamResponse(
        headers={
            "Content-Type": script.content_type or content_type or "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    compressor = None
    if script.gzip:
        response.headers["Content-Encoding"] = "gzip"
        compressor = zlib.compressobj(wbits=31)  # wbits 16 + 15 selects the gzip container.

    if script.truncate_after_events is not None:
        events = events[: script.truncate_after_events]
    hold = script.hold_after_events is not None and script.hold_after_events < len(events)
    if script.hold_after_events is not None:
        events = events[: script.hold_after_events]

    billing = request.app[BILLING]
    billing.streams_open += 1
    generated: list[str] = []
    try:
        await response.prepare(request)
        for index, event in enumerate(events):
            if index and script.chunk_delay_ms:
                await asyncio.sleep(script.chunk_delay_ms / 1000)
            data = event.data
            if compressor is not None:
                data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await response.write(data)
            generated.append(event.generated)

        if hold:
            await _wait_for_client_to_leave(request)
        if compressor is not None:
            await response.write(compressor.flush(zlib.Z_FINISH))
        await response.write_eof()
    except ConnectionResetError as error:
        logger.debug(
            "client of %s %s disconnected mid-stream: %r", request.method, request.path, error
        )
    finally:
        billing.streams_open -= 1
        billing.bill(prompt_tokens, estimate_tokens("".join(generated)))
    return response


async def _wait_for_client_to_leave(request: web.Request) -> None:
    """Return once the client's connection closes, or after MAX_HOLD_S."""
    deadline = time.monotonic() + MAX_HOLD_S
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left a held stream")
        await asyncio.sleep(0.01)


# --- OpenAI Chat Completions ------------------------------------------------------------------


def openai_error(message: str, status: int) -> dict[str, Any]:
    """Return an error body in OpenAI's format for the given HTTP status."""
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": error_type, "param": None, "code": None}}


def _chat_completion_object(completion: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None}
    finish_reason = "stop"
    if completion.tool_call is not None:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": _new_id("call_"),
                "type": "function",
                "function": {
                    "name": completion.tool_call.name,
                    "arguments": completion.tool_call.arguments,
                },
            }
        ]
        finish_reason = "tool_calls"

    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": completion.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": _openai_usage(completion),
    }


def _openai_usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _chat_stream_events(
    completion: Completion, script: MockScript, include_usage: bool
) -> list[SseEvent]:
    """Encode a completion as OpenAI ``chat.completion.chunk`` events, ending with ``[DONE]``.

    Every chunk carries the same id, created time and model. When ``include_usage`` is set,
    every chunk has a ``usage`` key, null except in the last chunk, whose ``choices`` is empty.
    """
    header = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": completion.model,
    }

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {**header, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return _sse_data(payload)

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    if completion.tool_call is None:
        pieces = split_text(completion.text, script.split_at, script.chunk_chars)
        deltas = [({"role": "assistant", "content": ""}, "")]
        deltas += [({"content": piece}, piece) for piece in pieces]
        finish_reason = "stop"
    else:
        deltas = _tool_call_deltas(completion.tool_call, script)
        finish_reason = "tool_calls"

    events = [SseEvent(chunk(choice(delta)), generated) for delta, generated in deltas]
    events.append(SseEvent(chunk(choice({}, finish_reason))))
    if include_usage:
        events.append(SseEvent(chunk([], _openai_usage(completion))))
    events.append(SseEvent(b"data: [DONE]\n\n"))
    return events


def _tool_call_deltas(tool_call: ToolCall, script: MockScript) -> list[tuple[dict[str, Any], str]]:
    """Return the deltas of a streamed tool call as OpenAI sends them, each with its fragment.

    The role delta has ``content: null``, the first tool delta carries the id and function
    name with empty arguments, and later deltas carry argument fragments.
    """
    first = {
        "index": 0,
        "id": _new_id("call_"),
        "type": "function",
        "function": {"name": tool_call.name, "arguments": ""},
    }
    deltas: list[tuple[dict[str, Any], str]] = [
        ({"role": "assistant", "content": None}, ""),
        ({"tool_calls": [first]}, ""),
    ]
    for piece in split_text(tool_call.arguments, script.split_at, script.chunk_chars):
        deltas.append(({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, piece))
    return deltas


async def _handle_chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await _read_json_object(request)
        model = _require_field(body, "model", str, "a string")
        messages = _validated_messages(body)
        stream = _stream_flag(body)
        include_usage = _include_usage(body)
        script = parse_mock_script(body.get("mock"))
    except InvalidRequestError as error:
        _log_rejected(request, error)
        return _json_response(openai_error(str(error), 400), MockScript(), status=400)

    if script.status is not None:
        message = script.error_message or f"mock error with status {script.status}"
        return _json_response(openai_error(message, script.status), script, status=script.status)

    prompt_text = "".join(_content_text(message.get("content")) for message in messages)
    completion = _build_completion(model, prompt_text, _last_user_text(messages), script)
    if script.native is not None:
        return await _native_reply(request, completion, script, stream)
    if stream:
        events = _chat_stream_events(completion, script, include_usage)
        return await _send_sse(request, events, script, completion.prompt_tokens)
    request.app[BILLING].bill(completion.prompt_tokens, completion.completion_tokens)
    return _json_response(_chat_completion_object(completion), script)


async def _native_reply(
    request: web.Request, completion: Completion, script: MockScript, stream: bool
) -> web.StreamResponse:
    """Reply to an OpenAI-format request in the provider's native format that the script names."""
    content_type = None
    try:
        if script.native == "anthropic":
            document = _anthropic_message(completion)
            events = _anthropic_stream_events(completion, script) if stream else []
        elif script.native == "gemini":
            document = _gemini_response(completion)
            events = _gemini_stream_events(completion, script) if stream else []
        elif script.native == "bedrock":
            document = _bedrock_converse_response(completion)
            events = _converse_stream_messages(completion, script) if stream else []
            content_type = EVENT_STREAM_CONTENT_TYPE
        else:
            document = _anthropic_message(completion)
            events = _invoke_stream_messages(completion, script) if stream else []
            content_type = EVENT_STREAM_CONTENT_TYPE
    except InvalidRequestError as error:
        return _json_response(openai_error(str(error), 400), MockScript(), status=400)
    if stream:
        return await _send_sse(request, events, script, completion.prompt_tokens, content_type)
    request.app[BILLING].bill(completion.prompt_tokens, completion.completion_tokens)
    return _json_response(document, script)


def _gemini_parts(completion: Completion) -> list[dict[str, Any]]:
    if completion.tool_call is None:
        return [{"text": completion.text}]
    return [{"functionCall": {"name": completion.tool_call.name, "args": _tool_use_input(completion.tool_call)}}]


def _gemini_usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens,
    }


def _gemini_response(completion: Completion) -> dict[str, Any]:
    """Return a Gemini ``generateContent`` response for the completion."""
    return {
        "candidates": [
            {"content": {"role": "model", "parts": _gemini_parts(completion)}, "finishReason": "STOP", "index": 0}
        ],
        "usageMetadata": _gemini_usage(completion.prompt_tokens, completion.completion_tokens),
        "modelVersion": completion.model,
        "responseId": _new_id("gemini-"),
    }


def _gemini_stream_events(completion: Completion, script: MockScript) -> list[SseEvent]:
    """Encode a completion as ``streamGenerateContent?alt=sse`` chunks.

    Each chunk carries one piece of text and the usage so far; the last one carries
    ``finishReason``. A function call comes whole in one chunk, as Gemini sends it.
    """
    if completion.tool_call is None:
        pieces = split_text(completion.text, script.split_at, script.chunk_chars) or [""]
        parts_list = [[{"text": piece}] for piece in pieces]
        generated = pieces
    else:
        parts_list = [_gemini_parts(completion)]
        generated = [completion.tool_call.arguments]
    events: list[SseEvent] = []
    written = ""
    for position, (parts, piece) in enumerate(zip(parts_list, generated)):
        written += piece
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if position == len(parts_list) - 1:
            candidate["finishReason"] = "STOP"
        chunk = {
            "candidates": [candidate],
            "usageMetadata": _gemini_usage(completion.prompt_tokens, estimate_tokens(written)),
            "modelVersion": completion.model,
        }
        events.append(SseEvent(_sse_data(chunk), piece))
    return events


def _event_stream_message(event_type: str, payload: dict[str, Any]) -> bytes:
    """Encode one AWS event stream message with string headers, as Bedrock sends them.

    Written here rather than taken from extguard's own codec, so the tests check that codec
    against an independent encoder.
    """
    headers = b""
    for name, value in ((":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")):
        headers += bytes([len(name)]) + name.encode() + b"\x07" + len(value).to_bytes(2, "big") + value.encode()
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + headers + body
    return message + zlib.crc32(message).to_bytes(4, "big")


def _converse_stream_messages(completion: Completion, script: MockScript) -> list[SseEvent]:
    """Encode a completion as Bedrock ConverseStream messages, from messageStart to metadata."""
    if completion.tool_call is None:
        pieces = split_text(completion.text, script.split_at, script.chunk_chars)
        start: dict[str, Any] = {"contentBlockIndex": 0}
        deltas = [({"text": piece}, piece) for piece in pieces]
    else:
        pieces = split_text(completion.tool_call.arguments, script.split_at, script.chunk_chars)
        tool = {"toolUseId": _new_id("tooluse_"), "name": completion.tool_call.name}
        start = {"contentBlockIndex": 0, "start": {"toolUse": tool}}
        deltas = [({"toolUse": {"input": piece}}, piece) for piece in pieces]
    messages = [
        SseEvent(_event_stream_message("messageStart", {"role": "assistant"})),
        SseEvent(_event_stream_message("contentBlockStart", start)),
    ]
    messages += [
        SseEvent(_event_stream_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}), piece)
        for delta, piece in deltas
    ]
    usage = {
        "inputTokens": completion.prompt_tokens,
        "outputTokens": completion.completion_tokens,
        "totalTokens": completion.prompt_tokens + completion.completion_tokens,
    }
    messages += [
        SseEvent(_event_stream_message("contentBlockStop", {"contentBlockIndex": 0})),
        SseEvent(_event_stream_message("messageStop", {"stopReason": _stop_reason(completion)})),
        SseEvent(_event_stream_message("metadata", {"usage": usage, "metrics": {"latencyMs": 1}})),
    ]
    return messages


def _invoke_stream_messages(completion: Completion, script: MockScript) -> list[SseEvent]:
    """Encode Anthropic's stream events as Bedrock InvokeModelWithResponseStream ``chunk`` messages."""
    messages = []
    for event in _anthropic_stream_events(completion, script):
        data = event.data.decode().split("data: ", 1)[1].strip()
        payload = {"bytes": base64.b64encode(data.encode()).decode()}
        messages.append(SseEvent(_event_stream_message("chunk", payload), event.generated))
    return messages


def _bedrock_converse_response(completion: Completion) -> dict[str, Any]:
    """Return a Bedrock Converse response for the completion."""
    if completion.tool_call is None:
        content: list[dict[str, Any]] = [{"text": completion.text}]
    else:
        tool_use = {
            "toolUseId": _new_id("tooluse_"),
            "name": completion.tool_call.name,
            "input": _tool_use_input(completion.tool_call),
        }
        content = [{"toolUse": tool_use}]
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": _stop_reason(completion),
        "usage": {
            "inputTokens": completion.prompt_tokens,
            "outputTokens": completion.completion_tokens,
            "totalTokens": completion.prompt_tokens + completion.completion_tokens,
        },
        "metrics": {"latencyMs": 1},
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequestError(f"stream_options must be an object, got {options!r}")
    return options.get("include_usage") is True


# --- Anthropic Messages -----------------------------------------------------------------------


def anthropic_error(message: str, status: int) -> dict[str, Any]:
    """Return an error body in Anthropic's format for the given HTTP status."""
    default_type = "invalid_request_error" if status < 500 else "api_error"
    error_type = _ANTHROPIC_ERROR_TYPES.get(status, default_type)
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _system_text(system: object) -> str:
    if system is None:
        return ""
    if not isinstance(system, (str, list)):
        raise InvalidRequestError(
            f"system must be a string or a list of text blocks, got {system!r}"
        )
    return _content_text(system)


def _tool_use_input(tool_call: ToolCall) -> dict[str, Any]:
    try:
        tool_input = json.loads(tool_call.arguments)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"mock.tool_call.arguments is not valid JSON: {error}") from error
    if not isinstance(tool_input, dict):
        raise InvalidRequestError("mock.tool_call.arguments must encode a JSON object for tool_use")
    return tool_input


def _anthropic_content_block(completion: Completion, streaming: bool) -> dict[str, Any]:
    """Return the single content block, empty when it opens a stream."""
    if completion.tool_call is None:
        return {"type": "text", "text": "" if streaming else completion.text}
    return {
        "type": "tool_use",
        "id": _new_id("toolu_"),
        "name": completion.tool_call.name,
        "input": {} if streaming else _tool_use_input(completion.tool_call),
    }


def _stop_reason(completion: Completion) -> str:
    return "end_turn" if completion.tool_call is None else "tool_use"


def _anthropic_message(completion: Completion) -> dict[str, Any]:
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": [_anthropic_content_block(completion, streaming=False)],
        "stop_reason": _stop_reason(completion),
        "stop_sequence": None,
        "usage": {
            "input_tokens": completion.prompt_tokens,
            "output_tokens": completion.completion_tokens,
        },
    }


def _anthropic_stream_events(completion: Completion, script: MockScript) -> list[SseEvent]:
    """Encode a completion as Anthropic's named SSE events, from message_start to message_stop."""
    message_start = {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": completion.prompt_tokens, "output_tokens": 1},
    }
    if completion.tool_call is None:
        pieces = split_text(completion.text, script.split_at, script.chunk_chars)
        deltas = [({"type": "text_delta", "text": piece}, piece) for piece in pieces]
    else:
        pieces = split_text(completion.tool_call.arguments, script.split_at, script.chunk_chars)
        deltas = [({"type": "input_json_delta", "partial_json": piece}, piece) for piece in pieces]

    first_block = _anthropic_content_block(completion, streaming=True)
    events: list[tuple[str, dict[str, Any], str]] = [
        ("message_start", {"message": message_start}, ""),
        ("content_block_start", {"index": 0, "content_block": first_block}, ""),
        ("ping", {}, ""),
    ]
    events += [
        ("content_block_delta", {"index": 0, "delta": delta}, piece) for delta, piece in deltas
    ]
    events += [
        ("content_block_stop", {"index": 0}, ""),
        (
            "message_delta",
            {
                "delta": {"stop_reason": _stop_reason(completion), "stop_sequence": None},
                "usage": {"output_tokens": completion.completion_tokens},
            },
            "",
        ),
        ("message_stop", {}, ""),
    ]
    return [
        SseEvent(_sse_named(name, {"type": name, **data}), generated)
        for name, data, generated in events
    ]


async def _handle_messages(request: web.Request) -> web.StreamResponse:
    try:
        body = await _read_json_object(request)
        model = _require_field(body, "model", str, "a string")
        max_tokens = _require_field(body, "max_tokens", int, "an integer")
        messages = _validated_messages(body)
        system_text = _system_text(body.get("system"))
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        stream = _stream_flag(body)
        script = parse_mock_script(body.get("mock"))
        if script.tool_call is not None:
            _tool_use_input(script.tool_call)
    except InvalidRequestError as error:
        _log_rejected(request, error)
        return _json_response(anthropic_error(str(error), 400), MockScript(), status=400)

    if script.status is not None:
        message = script.error_message or f"mock error with status {script.status}"
        return _json_response(anthropic_error(message, script.status), script, status=script.status)

    # NOTE: max_tokens is validated but never cuts the reply, so the echo stays exact.
    message_texts = [_content_text(message.get("content")) for message in messages]
    prompt_text = system_text + "".join(message_texts)
    completion = _build_completion(model, prompt_text, _last_user_text(messages), script)
    if stream:
        events = _anthropic_stream_events(completion, script)
        return await _send_sse(request, events, script, completion.prompt_tokens)
    request.app[BILLING].bill(completion.prompt_tokens, completion.completion_tokens)
    return _json_response(_anthropic_message(completion), script)


# --- Other endpoints --------------------------------------------------------------------------


async def _handle_models(request: web.Request) -> web.Response:
    created = int(time.time())
    models = [
        {"id": model_id, "object": "model", "created": created, "owned_by": "extguard-mock"}
        for model_id in MODEL_IDS
    ]
    return web.json_response({"object": "list", "data": models})


async def _handle_raw(request: web.Request) -> web.Response:
    body = await request.read() if request.method == "POST" else b"hello"
    return web.Response(body=body, content_type="application/octet-stream")


async def _handle_list_requests(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[RECORDED_REQUESTS]))


async def _handle_clear_requests(request: web.Request) -> web.Response:
    request.app[RECORDED_REQUESTS].clear()
    return web.Response(status=204)


async def _handle_usage(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[BILLING]))


async def _handle_clear_usage(request: web.Request) -> web.Response:
    request.app[BILLING].zero()
    return web.Response(status=204)


async def _handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@web.middleware
async def _record_request(request: web.Request, handler: Any) -> web.StreamResponse:
    """Append the request to the app's bounded record before handling it."""
    if request.path not in _UNRECORDED_PATHS:
        body = await request.read()
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        request.app[RECORDED_REQUESTS].append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": headers,
                "body": body.decode("utf-8", errors="replace"),
            }
        )
    return await handler(request)


@web.middleware
async def _simulate_outage(request: web.Request, handler: Any) -> web.StreamResponse:
    """Reply to every LLM request with the app's outage error, when the app has one."""
    outage = request.app[OUTAGE]
    if outage is None or request.path.startswith("/mock/") or request.path == "/healthz":
        return await handler(request)

    message = f"mock outage with status {outage.status}"
    if request.path == "/v1/messages":
        payload = anthropic_error(message, outage.status)
    else:
        payload = openai_error(message, outage.status)
    response = _json_response(payload, MockScript(), status=outage.status)
    if outage.retry_after_s is not None:
        response.headers["Retry-After"] = str(outage.retry_after_s)
    return response


def _log_rejected(request: web.Request, error: InvalidRequestError) -> None:
    logger.info("rejected %s %s with 400: %s", request.method, request.path, error)


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# --- Application and server -------------------------------------------------------------------


def build_app(*, max_recorded: int = 100, outage: Outage | None = None) -> web.Application:
    """Build the mock upstream application, recording at most ``max_recorded`` requests.

    Older records are dropped first. With ``outage``, every LLM request gets its error, after
    being recorded. All state lives on the returned application.
    """
    if max_recorded < 0:
        raise ValueError(f"max_recorded must be >= 0, got {max_recorded}")

    app = web.Application(
        middlewares=[_record_request, _simulate_outage], client_max_size=MAX_REQUEST_BYTES
    )
    app[RECORDED_REQUESTS] = collections.deque(maxlen=max_recorded)
    app[BILLING] = Billing()
    app[OUTAGE] = outage
    app.router.add_post("/v1/chat/completions", _handle_chat_completions)
    app.router.add_post(
        "/openai/deployments/{deployment}/chat/completions", _handle_chat_completions
    )
    app.router.add_post("/v1/messages", _handle_messages)
    app.router.add_get("/v1/models", _handle_models)
    app.router.add_route("GET", "/mock/raw", _handle_raw)
    app.router.add_route("POST", "/mock/raw", _handle_raw)
    app.router.add_get("/mock/requests", _handle_list_requests)
    app.router.add_delete("/mock/requests", _handle_clear_requests)
    app.router.add_get("/mock/usage", _handle_usage)
    app.router.add_delete("/mock/usage", _handle_clear_usage)
    app.router.add_get("/healthz", _handle_healthz)
    return app


class MockUpstream:
    """A running mock upstream server. ``close()`` stops it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, scheme: str = "http") -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.scheme = scheme

    @property
    def base_url(self) -> str:
        """The server's URL without a trailing slash, such as ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def close(self) -> None:
        """Stop accepting connections and wait up to 1 s for requests in progress."""
        await self._runner.cleanup()


async def start_mock_upstream(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_recorded: int = 100,
    outage: Outage | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> MockUpstream:
    """Start the mock upstream on host and port, where port 0 picks a free port.

    Pass a literal address as host: with port 0, a name that resolves to several addresses
    gets a different free port on each, and ``.port`` reports only the first. With
    ``ssl_context`` (a server context with its certificate loaded) it serves HTTPS.

    Raises:
        OSError: the address could not be bound.
    """
    app = build_app(max_recorded=max_recorded, outage=outage)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return MockUpstream(runner, host, bound_port, "http" if ssl_context is None else "https")


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Return a TLS server context with the PEM certificate chain and key loaded.

    Raises:
        OSError: a file could not be read.
        ssl.SSLError: a file is not a valid PEM certificate or key, or they do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


async def _serve_until_signal(
    host: str, port: int, outage: Outage | None, ssl_context: ssl.SSLContext | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)

    mock = await start_mock_upstream(host, port, outage=outage, ssl_context=ssl_context)
    print(f"mock upstream listening on {mock.base_url}", flush=True)
    logger.info("mock upstream started on %s", mock.base_url)
    try:
        await stop.wait()
    finally:
        await mock.close()
        logger.info("mock upstream on %s stopped", mock.base_url)


def main(argv: list[str] | None = None) -> int:
    """Run the mock upstream until SIGINT or SIGTERM and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m extguard.testing.mock_upstream",
        description="Mock OpenAI- and Anthropic-compatible LLM upstream for tests and benchmarks.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="TCP port to listen on; 0 picks a free port (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-status",
        type=int,
        metavar="CODE",
        help="reply to every LLM request with this HTTP error status (400-599), as a provider "
        "in an outage or over its rate limit would (default: answer normally)",
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        metavar="SECONDS",
        help="with --fail-status: send this Retry-After header, in seconds",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve HTTPS with this certificate chain (PEM); needs --tls-key",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (PEM)")
    args = parser.parse_args(argv)
    if args.retry_after is not None and args.fail_status is None:
        parser.error("--retry-after needs --fail-status")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key must be given together")
    try:
        outage = None if args.fail_status is None else Outage(args.fail_status, args.retry_after)
    except ValueError as error:
        parser.error(str(error))
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as error:
            parser.error(f"failed to load --tls-cert {args.tls_cert} and --tls-key {args.tls_key}: {error}")

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve_until_signal(args.host, args.port, outage, ssl_context))
    except OSError as error:
        logger.error("failed to listen on %s port %d: %s", args.host, args.port, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
