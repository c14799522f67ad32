"""Tests of the mock LLM upstream, talking to it directly over loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from extguard.testing.mock_upstream import MockUpstream, Outage, split_text, start_mock_upstream

SRC_DIR = Path(__file__).resolve().parents[1] / "src"

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Harness:
    """A mock upstream running on an event loop in a background thread."""

    def __init__(self, outage: Outage | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.mock: MockUpstream = self.run(start_mock_upstream(outage=outage))

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one request and return the undecoded reply (gzip bodies stay compressed)."""
        return self.run(self._request(method, path, json_body, data, headers))

    async def _request(
        self,
        method: str,
        path: str,
        json_body: Any,
        data: bytes | None,
        headers: dict[str, str] | None,
    ) -> Reply:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.request(
                method, self.mock.base_url + path, json=json_body, data=data, headers=headers
            ) as response:
                body = await response.read()
                return Reply(response.status, dict(response.headers), body)

    def close(self) -> None:
        self.run(self.mock.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    running = Harness()
    yield running
    running.close()


def chat_body(text: str = "hello world", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **fields}


def messages_body(text: str = "hello world", **fields: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **fields,
    }


def parse_sse(body: bytes) -> list[tuple[str | None, str]]:
    """Return (event name or None, data) for every SSE event in the body."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        name = None
        data_lines = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data_lines.append(line[len("data: ") :])
        events.append((name, "\n".join(data_lines)))
    return events


def chat_chunks(body: bytes) -> list[dict[str, Any]]:
    """Return the JSON chunks of an OpenAI stream, without the final [DONE]."""
    return [json.loads(data) for _, data in parse_sse(body) if data != "[DONE]"]


def content_pieces(chunks: list[dict[str, Any]]) -> list[str]:
    pieces = []
    for chunk in chunks[1:]:
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                pieces.append(choice["delta"]["content"])
    return pieces


# --- split_text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "split_at", "chunk_chars", "expected"),
    [
        ("Hello, world!", (5, 9), 4, ["Hello", ", wo", "rld!"]),
        ("Hello, world!", None, 4, ["Hell", "o, w", "orld", "!"]),
        ("Hello", None, 5, ["Hello"]),
        ("Hello", (2, 50), 4, ["He", "llo"]),
        ("Hello", (0, 5), 4, ["Hello"]),
        ("", None, 4, []),
    ],
)
def test_split_text_cases(
    text: str, split_at: tuple[int, ...] | None, chunk_chars: int, expected: list[str]
) -> None:
    assert split_text(text, split_at, chunk_chars) == expected


# --- OpenAI Chat Completions: JSON ------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "plain text"}], "plain text"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "first "},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text", "text": "second"},
                    ],
                }
            ],
            "first second",
        ),
        (
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "older"},
                {"role": "assistant", "content": "reply"},
                {"role": "user", "content": "newest"},
            ],
            "newest",
        ),
        ([{"role": "system", "content": "no user message"}], ""),
    ],
)
def test_chat_json_echoes_last_user(
    harness: Harness, messages: list[dict[str, Any]], expected: str
) -> None:
    body = {"model": "gpt-test", "messages": messages}

    reply = harness.request("POST", CHAT_PATH, json_body=body)

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["choices"][0]["message"]["content"] == expected


def test_chat_json_completion_fields(harness: Harness) -> None:
    request = {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": "hello world"},
        ],
    }

    completion = harness.request("POST", CHAT_PATH, json_body=request).json()

    assert completion["id"].startswith("chatcmpl-")
    assert completion["object"] == "chat.completion"
    assert isinstance(completion["created"], int)
    assert completion["model"] == "gpt-test"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert completion["usage"] == {
        "prompt_tokens": math.ceil(len("abcdhello world") / 4),
        "completion_tokens": math.ceil(len("hello world") / 4),
        "total_tokens": math.ceil(15 / 4) + math.ceil(11 / 4),
    }


def test_chat_json_scripted_reply(harness: Harness) -> None:
    body = chat_body(mock={"reply": "scripted answer"})

    completion = harness.request("POST", CHAT_PATH, json_body=body).json()

    assert completion["choices"][0]["message"]["content"] == "scripted answer"
    assert completion["usage"]["completion_tokens"] == math.ceil(len("scripted answer") / 4)


def test_chat_json_tool_call(harness: Harness) -> None:
    tool_call = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    body = chat_body(mock={"tool_call": tool_call})

    completion = harness.request("POST", CHAT_PATH, json_body=body).json()

    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["type"] == "function"
    assert calls[0]["function"] == tool_call


# --- OpenAI Chat Completions: stream ----------------------------------------------------------


def test_chat_stream_default_chunks(harness: Harness) -> None:
    reply = harness.request("POST", CHAT_PATH, json_body=chat_body("Hello, world!", stream=True))
    events = parse_sse(reply.body)
    chunks = chat_chunks(reply.body)

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert all(name is None for name, _ in events)
    assert events[-1] == (None, "[DONE]")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content_pieces(chunks) == ["Hell", "o, w", "orld", "!"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({(chunk["id"], chunk["created"], chunk["model"]) for chunk in chunks}) == 1
    assert chunks[0]["model"] == "gpt-test"
    assert all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize(
    ("mock", "expected"),
    [
        ({"split_at": [5, 9]}, ["Hello", ", wo", "rld!"]),
        ({"split_at": [1]}, ["H", "ello, world!"]),
        ({"split_at": [7, 100]}, ["Hello, ", "world!"]),
        ({"chunk_chars": 6}, ["Hello,", " world", "!"]),
        ({"chunk_chars": 100}, ["Hello, world!"]),
    ],
)
def test_chat_stream_split_boundaries(
    harness: Harness, mock: dict[str, Any], expected: list[str]
) -> None:
    body = chat_body("Hello, world!", stream=True, mock=mock)

    reply = harness.request("POST", CHAT_PATH, json_body=body)

    assert content_pieces(chat_chunks(reply.body)) == expected


def test_chat_stream_include_usage(harness: Harness) -> None:
    body = chat_body("hello world", stream=True, stream_options={"include_usage": True})

    chunks = chat_chunks(harness.request("POST", CHAT_PATH, json_body=body).body)

    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_tool_call(harness: Harness) -> None:
    arguments = '{"city": "Oslo"}'
    mock = {"tool_call": {"name": "get_weather", "arguments": arguments}, "split_at": [3, 10]}

    reply = harness.request("POST", CHAT_PATH, json_body=chat_body(stream=True, mock=mock))
    chunks = chat_chunks(reply.body)

    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    first_call = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first_call["index"] == 0
    assert first_call["id"].startswith("call_")
    assert first_call["type"] == "function"
    assert first_call["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in chunks[2:-1]]
    arguments_pieces = [fragment["function"]["arguments"] for fragment in fragments]
    assert arguments_pieces == ['{"c', 'ity": "', 'Oslo"}']
    assert all(fragment["index"] == 0 for fragment in fragments)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_stream_chunk_delay(harness: Harness) -> None:
    body = chat_body("abcd", stream=True, mock={"chunk_chars": 1, "chunk_delay_ms": 40})

    started = time.monotonic()
    harness.request("POST", CHAT_PATH, json_body=body)
    elapsed = time.monotonic() - started

    # Seven events (role, four pieces, finish, [DONE]) give six gaps of 40 ms.
    assert elapsed >= 0.24


# --- Anthropic Messages -----------------------------------------------------------------------


def test_messages_json_fields(harness: Harness) -> None:
    body = messages_body("hello world", system=[{"type": "text", "text": "abcd"}])

    reply = harness.request("POST", MESSAGES_PATH, json_body=body)
    message = reply.json()

    assert reply.status == 200
    assert message["id"].startswith("msg_")
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == "claude-test"
    assert message["content"] == [{"type": "text", "text": "hello world"}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": math.ceil(len("abcdhello world") / 4),
        "output_tokens": math.ceil(len("hello world") / 4),
    }


def test_messages_json_echoes_text_blocks(harness: Harness) -> None:
    content = [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]
    body = messages_body()
    body["messages"] = [{"role": "user", "content": content}]

    message = harness.request("POST", MESSAGES_PATH, json_body=body).json()

    assert message["content"][0]["text"] == "part one, part two"


def test_messages_json_tool_use(harness: Harness) -> None:
    mock = {"tool_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

    message = harness.request("POST", MESSAGES_PATH, json_body=messages_body(mock=mock)).json()

    block = message["content"][0]
    assert block["type"] == "tool_use"
    assert block["id"].startswith("toolu_")
    assert block["name"] == "get_weather"
    assert block["input"] == {"city": "Oslo"}
    assert message["stop_reason"] == "tool_use"


def test_messages_stream_event_sequence(harness: Harness) -> None:
    body = messages_body("Hello, world!", stream=True, mock={"split_at": [5, 9]})

    reply = harness.request("POST", MESSAGES_PATH, json_body=body)
    events = parse_sse(reply.body)
    payloads = [json.loads(data) for _, data in events]

    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(payload["type"] == name for (name, _), payload in zip(events, payloads))
    start = payloads[0]["message"]
    assert start["content"] == []
    assert start["model"] == "claude-test"
    assert start["usage"] == {"input_tokens": 4, "output_tokens": 1}
    assert payloads[1]["index"] == 0
    assert payloads[1]["content_block"] == {"type": "text", "text": ""}
    assert [payload["delta"] for payload in payloads[3:6]] == [
        {"type": "text_delta", "text": "Hello"},
        {"type": "text_delta", "text": ", wo"},
        {"type": "text_delta", "text": "rld!"},
    ]
    assert payloads[7]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert payloads[7]["usage"] == {"output_tokens": 4}


def test_messages_stream_tool_use(harness: Harness) -> None:
    mock = {"tool_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}, "chunk_chars": 8}

    reply = harness.request("POST", MESSAGES_PATH, json_body=messages_body(stream=True, mock=mock))
    events = parse_sse(reply.body)
    payloads = [json.loads(data) for _, data in events]

    block = payloads[1]["content_block"]
    assert block["type"] == "tool_use"
    assert block["name"] == "get_weather"
    assert block["input"] == {}
    deltas = [payload["delta"] for payload in payloads if payload["type"] == "content_block_delta"]
    assert all(delta["type"] == "input_json_delta" for delta in deltas)
    assert "".join(delta["partial_json"] for delta in deltas) == '{"city": "Oslo"}'
    assert payloads[-2]["delta"]["stop_reason"] == "tool_use"


# --- gzip, truncation, content type -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"), [(CHAT_PATH, chat_body()), (MESSAGES_PATH, messages_body())]
)
def test_gzip_json_body(harness: Harness, path: str, body: dict[str, Any]) -> None:
    plain = harness.request("POST", path, json_body=body).json()

    reply = harness.request("POST", path, json_body={**body, "mock": {"gzip": True}})

    assert reply.headers["Content-Encoding"] == "gzip"
    compressed = json.loads(gzip.decompress(reply.body))
    assert compressed.keys() == plain.keys()
    assert compressed["usage"] == plain["usage"]


def comparable_events(body: bytes) -> list[tuple[str | None, Any]]:
    """Return the SSE events of a body with their JSON data parsed and ids stripped."""
    events = []
    for name, data in parse_sse(body):
        events.append((name, data if data == "[DONE]" else strip_ids(json.loads(data))))
    return events


def strip_ids(value: Any) -> Any:
    """Return a copy without the per-response id and created fields."""
    if isinstance(value, dict):
        return {key: strip_ids(item) for key, item in value.items() if key not in ("id", "created")}
    if isinstance(value, list):
        return [strip_ids(item) for item in value]
    return value


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            CHAT_PATH,
            chat_body("Hello, world!", stream=True, stream_options={"include_usage": True}),
        ),
        (MESSAGES_PATH, messages_body("Hello, world!", stream=True)),
    ],
)
def test_gzip_stream_decodes_to_same_events(
    harness: Harness, path: str, body: dict[str, Any]
) -> None:
    plain = harness.request("POST", path, json_body=body)

    reply = harness.request("POST", path, json_body={**body, "mock": {"gzip": True}})
    decoded = gzip.decompress(reply.body)

    assert reply.headers["Content-Encoding"] == "gzip"
    assert comparable_events(decoded) == comparable_events(plain.body)


def test_gzip_stream_flushes_each_event(harness: Harness) -> None:
    body = chat_body("abcdefgh", stream=True, mock={"gzip": True, "chunk_delay_ms": 60})

    async def first_received_chunk() -> bytes:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(harness.mock.base_url + CHAT_PATH, json=body) as response:
                chunk = await response.content.readany()
                await response.read()
                return chunk

    chunk = harness.run(first_received_chunk())
    decompressed = zlib.decompressobj(wbits=31).decompress(chunk)

    # Without a sync flush, the first chunk would hold only the gzip header.
    assert decompressed.startswith(b"data: ")
    assert decompressed.endswith(b"\n\n")


@pytest.mark.parametrize("events_kept", [0, 1, 3])
def test_chat_stream_truncated(harness: Harness, events_kept: int) -> None:
    body = chat_body("Hello, world!", stream=True, mock={"truncate_after_events": events_kept})

    reply = harness.request("POST", CHAT_PATH, json_body=body)
    events = parse_sse(reply.body)

    assert reply.status == 200
    assert len(events) == events_kept
    assert (None, "[DONE]") not in events
    assert all(json.loads(data)["choices"][0]["finish_reason"] is None for _, data in events)


def test_messages_stream_truncated(harness: Harness) -> None:
    body = messages_body("Hello, world!", stream=True, mock={"truncate_after_events": 4})

    events = parse_sse(harness.request("POST", MESSAGES_PATH, json_body=body).body)

    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
    ]


@pytest.mark.parametrize(
    ("path", "body", "expected_start"),
    [
        (CHAT_PATH, chat_body(mock={"content_type": "application/x-custom"}), b'{"id": "chatcmpl-'),
        (
            CHAT_PATH,
            chat_body(stream=True, mock={"content_type": "application/x-custom"}),
            b'data: {"id": "chatcmpl-',
        ),
        (
            MESSAGES_PATH,
            messages_body(stream=True, mock={"content_type": "application/x-custom"}),
            b"event: message_start\n",
        ),
    ],
)
def test_content_type_override(
    harness: Harness, path: str, body: dict[str, Any], expected_start: bytes
) -> None:
    reply = harness.request("POST", path, json_body=body)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-custom"
    assert reply.body.startswith(expected_start)


# --- Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected_type"),
    [(400, "invalid_request_error"), (429, "invalid_request_error"), (503, "server_error")],
)
def test_chat_scripted_error(harness: Harness, status: int, expected_type: str) -> None:
    body = chat_body(mock={"status": status, "error_message": "scripted failure"})

    reply = harness.request("POST", CHAT_PATH, json_body=body)

    assert reply.status == status
    assert reply.json() == {
        "error": {"message": "scripted failure", "type": expected_type, "param": None, "code": None}
    }


@pytest.mark.parametrize(
    ("status", "expected_type"),
    [
        (400, "invalid_request_error"),
        (429, "rate_limit_error"),
        (529, "overloaded_error"),
        (418, "invalid_request_error"),
        (502, "api_error"),
    ],
)
def test_messages_scripted_error(harness: Harness, status: int, expected_type: str) -> None:
    body = messages_body(stream=True, mock={"status": status, "error_message": "scripted failure"})

    reply = harness.request("POST", MESSAGES_PATH, json_body=body)

    assert reply.status == status
    assert reply.json() == {
        "type": "error",
        "error": {"type": expected_type, "message": "scripted failure"},
    }


MALFORMED_BODIES = [
    b"{not json",
    b"\xff\xfe",
    b"[1, 2]",
    b'{"model": "m"}',
    b'{"model": "m", "messages": "text", "max_tokens": 5}',
    b'{"model": "m", "messages": [], "max_tokens": 5, "stream": "yes"}',
]


@pytest.mark.parametrize("raw", MALFORMED_BODIES)
def test_chat_malformed_request(harness: Harness, raw: bytes) -> None:
    reply = harness.request("POST", CHAT_PATH, data=raw, headers=JSON_HEADERS)

    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.parametrize("raw", [*MALFORMED_BODIES, b'{"model": "m", "messages": []}'])
def test_messages_malformed_request(harness: Harness, raw: bytes) -> None:
    reply = harness.request("POST", MESSAGES_PATH, data=raw, headers=JSON_HEADERS)

    assert reply.status == 400
    body = reply.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("mock", "expected_words"),
    [
        ("reply", "mock must be an object"),
        ({"unknown": 1}, "unknown mock field"),
        ({"split_at": [5, 3]}, "strictly increasing"),
        ({"split_at": [-1]}, "non-negative"),
        ({"chunk_chars": 0}, "chunk_chars"),
        ({"status": 200}, "mock.status"),
        ({"gzip": "yes"}, "mock.gzip"),
        ({"tool_call": {"name": "f"}}, "arguments"),
        ({"reply": "a", "tool_call": {"name": "f", "arguments": "{}"}}, "cannot be used together"),
    ],
)
def test_invalid_mock_rejected(harness: Harness, mock: Any, expected_words: str) -> None:
    reply = harness.request("POST", CHAT_PATH, json_body=chat_body(mock=mock))

    assert reply.status == 400
    assert expected_words in reply.json()["error"]["message"]


def test_messages_tool_use_needs_json_object(harness: Harness) -> None:
    mock = {"tool_call": {"name": "f", "arguments": "[1, 2"}}

    reply = harness.request("POST", MESSAGES_PATH, json_body=messages_body(mock=mock))

    assert reply.status == 400
    assert "mock.tool_call.arguments" in reply.json()["error"]["message"]


# --- Recording and other endpoints ------------------------------------------------------------


def test_recording_lists_and_clears(harness: Harness) -> None:
    harness.request("DELETE", "/mock/requests")
    harness.request("POST", CHAT_PATH, json_body=chat_body("first"), headers={"X-Trace-Id": "abc"})
    harness.request("POST", "/mock/raw", data=b"\xffbinary")
    harness.request("GET", "/healthz")

    records = harness.request("GET", "/mock/requests").json()

    assert [(record["method"], record["path"]) for record in records] == [
        ("POST", CHAT_PATH),
        ("POST", "/mock/raw"),
    ]
    assert records[0]["headers"]["x-trace-id"] == "abc"
    assert all(name == name.lower() for name in records[0]["headers"])
    assert json.loads(records[0]["body"]) == chat_body("first")
    assert records[1]["body"] == "\ufffdbinary"

    assert harness.request("DELETE", "/mock/requests").status == 204
    assert harness.request("GET", "/mock/requests").json() == []


def test_recording_keeps_newest(harness: Harness) -> None:
    async def record_three() -> list[dict[str, Any]]:
        mock = await start_mock_upstream(max_recorded=2)
        try:
            async with aiohttp.ClientSession() as session:
                for text in ("one", "two", "three"):
                    await session.post(mock.base_url + "/mock/raw", data=text.encode())
                async with session.get(mock.base_url + "/mock/requests") as response:
                    return await response.json()
        finally:
            await mock.close()

    records = harness.run(record_three())

    assert [record["body"] for record in records] == ["two", "three"]


def billed(harness: Harness) -> dict[str, int]:
    return harness.request("GET", "/mock/usage").json()


def wait_for_streams_to_end(harness: Harness) -> dict[str, int]:
    deadline = time.monotonic() + 5
    while (usage := billed(harness))["streams_open"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return usage


def test_billing_counts_replies_not_errors(harness: Harness) -> None:
    assert harness.request("DELETE", "/mock/usage").status == 204
    harness.request("POST", CHAT_PATH, json_body=chat_body("12345678", mock={"reply": "abcde"}))
    harness.request("POST", MESSAGES_PATH, json_body=messages_body("1234", mock={"reply": "ab"}))
    harness.request("POST", CHAT_PATH, json_body=chat_body("1234", mock={"status": 500}))
    harness.request("POST", CHAT_PATH, json_body=chat_body("123", stream=True, mock={"reply": "abcdefghi"}))

    usage = wait_for_streams_to_end(harness)

    assert usage == {"requests": 3, "input_tokens": 2 + 1 + 1, "output_tokens": 2 + 1 + 3, "streams_open": 0}


@pytest.mark.parametrize("path, body", [(CHAT_PATH, chat_body), (MESSAGES_PATH, messages_body)])
def test_held_stream_bills_what_was_sent(harness: Harness, path: str, body: Any) -> None:
    """A client that leaves a held stream is billed for the events it was sent, no more."""
    harness.request("DELETE", "/mock/usage")
    # Events: OpenAI role, "abcd", "efgh", ...; Anthropic message_start, block start, ping, "abcd", ...
    hold = 3 if path == CHAT_PATH else 5
    script = {"reply": "abcdefgh" * 10, "chunk_chars": 4, "hold_after_events": hold}

    async def read_then_leave() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(harness.mock.base_url + path, json=body("12345678", stream=True, mock=script)) as response:
                received = b""
                while received.count(b"\n\n") < hold:
                    received += await response.content.readany()
                await asyncio.sleep(0.1)  # nothing more comes while the stream is held
                received += response.content.read_nowait()
                return received

    received = harness.run(read_then_leave())
    usage = wait_for_streams_to_end(harness)

    assert received.count(b"\n\n") == hold
    assert usage == {"requests": 1, "input_tokens": 2, "output_tokens": 2, "streams_open": 0}


def test_models_list(harness: Harness) -> None:
    models = harness.request("GET", "/v1/models").json()

    assert models["object"] == "list"
    assert models["data"]
    assert all(model["object"] == "model" for model in models["data"])


@pytest.mark.parametrize(
    ("method", "data", "expected"),
    [("GET", None, b"hello"), ("POST", b"\x00\x01payload", b"\x00\x01payload")],
)
def test_raw_endpoint(harness: Harness, method: str, data: bytes | None, expected: bytes) -> None:
    reply = harness.request(method, "/mock/raw", data=data)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.body == expected


def test_healthz(harness: Harness) -> None:
    reply = harness.request("GET", "/healthz")

    assert reply.status == 200
    assert reply.body == b"ok"


# --- Official clients -------------------------------------------------------------------------


def test_openai_client_json(harness: Harness) -> None:
    client = openai.OpenAI(base_url=harness.mock.base_url + "/v1", api_key="test", max_retries=0)

    completion = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "echo me"}]
    )

    assert completion.choices[0].message.content == "echo me"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 2 + 2


def test_openai_client_stream(harness: Harness) -> None:
    client = openai.OpenAI(base_url=harness.mock.base_url + "/v1", api_key="test", max_retries=0)

    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "ignored"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"reply": "streamed reply text", "split_at": [3, 8]}},
    )
    chunks = list(stream)

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "streamed reply text"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == math.ceil(len("streamed reply text") / 4)


def test_anthropic_client_json(harness: Harness) -> None:
    client = anthropic.Anthropic(base_url=harness.mock.base_url, api_key="test", max_retries=0)

    message = client.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "echo me"}]
    )

    assert message.content[0].type == "text"
    assert message.content[0].text == "echo me"
    assert message.usage.input_tokens == 2
    assert message.usage.output_tokens == 2


def test_anthropic_client_stream(harness: Harness) -> None:
    client = anthropic.Anthropic(base_url=harness.mock.base_url, api_key="test", max_retries=0)

    with client.messages.stream(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "ignored"}],
        extra_body={"mock": {"reply": "streamed reply text", "chunk_chars": 5}},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text == "streamed reply text"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == math.ceil(len("streamed reply text") / 4)


# --- Azure path and outages ---------------------------------------------------------------------


def test_azure_deployment_path_served(harness: Harness) -> None:
    path = "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"
    reply = harness.request("POST", path, json_body=chat_body("azure hello"))

    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == "azure hello"


@pytest.fixture(scope="module")
def failing() -> Iterator[Harness]:
    running = Harness(Outage(status=429, retry_after_s=7))
    yield running
    running.close()


@pytest.mark.parametrize(
    ("path", "body", "error_type"),
    [
        (CHAT_PATH, chat_body(), "invalid_request_error"),
        (MESSAGES_PATH, messages_body(), "rate_limit_error"),
    ],
)
def test_outage_error_in_provider_format(
    failing: Harness, path: str, body: dict[str, Any], error_type: str
) -> None:
    reply = failing.request("POST", path, json_body=body)

    assert reply.status == 429
    assert reply.headers["Retry-After"] == "7"
    assert reply.json()["error"]["type"] == error_type


def test_outage_request_still_recorded(failing: Harness) -> None:
    failing.request("DELETE", "/mock/requests")
    failing.request("POST", CHAT_PATH, json_body=chat_body("recorded anyway"))

    records = failing.request("GET", "/mock/requests").json()
    assert [json.loads(record["body"])["messages"][0]["content"] for record in records] == ["recorded anyway"]


def test_outage_spares_mock_endpoints(failing: Harness) -> None:
    assert failing.request("GET", "/healthz").status == 200
    assert failing.request("GET", "/mock/usage").status == 200


@pytest.mark.parametrize(("status", "retry_after_s"), [(200, None), (600, None), (503, -1)])
def test_outage_invalid_values_rejected(status: int, retry_after_s: int | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        Outage(status, retry_after_s)


# --- Command line -----------------------------------------------------------------------------


def test_main_serves_until_sigterm() -> None:
    python_path = os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    process = subprocess.Popen(
        [sys.executable, "-m", "extguard.testing.mock_upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1]
        with urllib.request.urlopen(base_url + "/healthz", timeout=5) as response:
            assert response.read() == b"ok"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--retry-after", "1"], "--retry-after needs --fail-status"),
        (["--fail-status", "200"], "fail status must be an HTTP error status 400-599"),
        (["--tls-cert", "server.pem"], "--tls-cert and --tls-key must be given together"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "failed to load --tls-cert missing.pem"),
    ],
)
def test_main_invalid_options_rejected(arguments: list[str], message: str) -> None:
    python_path = os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "extguard.testing.mock_upstream", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": python_path},
    )

    assert result.returncode == 2
    assert message in result.stderr
