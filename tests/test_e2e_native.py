"""Responses in a provider's native format, as they reach extguard behind Envoy AI Gateway.

AI Gateway translates the provider's response into OpenAI's format only after extguard's filter
has read it, so an OpenAI-format request can get an Anthropic Messages, Gemini or Bedrock
Converse response here. The mock upstream replies in those formats when a request sets `mock.native`.
These tests read the raw bodies, since the OpenAI SDK would not parse them (the gateway would).
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from extguard.testing.stack import Stack

pytestmark = pytest.mark.e2e

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
KEY = "sk-native-e2e-0001"

POLICY = f"""
version: 1
default:
  on_bad_input: reject
  rules:
    pii: {{action: mask, direction: both, entities: [EMAIL_ADDRESS]}}
    secrets: {{action: block, direction: both}}
tenancy:
  store: {{backend: memory}}
  tenants:
    acme:
      api_keys: [{{sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 10000000}}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("native")
    policy = work / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    with Stack(policy=policy, work_dir=work) as running:
        yield running


def chat(stack: Stack, mock: dict, *, stream: bool = False) -> tuple[int, dict[str, str], bytes]:
    """POST an OpenAI-format chat request through Envoy; return status, headers and raw body."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "stream": stream, "mock": mock}
    request = urllib.request.Request(
        f"{stack.base_url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    try:
        with _DIRECT.open(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def billed(stack: Stack) -> dict[str, int]:
    with _DIRECT.open(f"{stack.upstream_url}/mock/usage", timeout=5) as response:
        return json.load(response)


def committed(stack: Stack) -> dict[str, float]:
    return {kind: stack.metric("extguard_budget_tokens_total", kind=kind, tenant="acme") for kind in ("input", "output")}


def sse_documents(raw: bytes) -> list[tuple[str | None, dict]]:
    """Return (event name, parsed data) for every SSE event of a raw body."""
    documents = []
    for block in raw.decode().split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            documents.append((name, json.loads("\n".join(data))))
    return documents


def json_text(native: str, document: dict) -> str:
    if native == "anthropic":
        return "".join(block.get("text", "") for block in document["content"])
    if native == "gemini":
        return "".join(part.get("text", "") for part in document["candidates"][0]["content"]["parts"])
    return "".join(block.get("text", "") for block in document["output"]["message"]["content"])


def stream_text(native: str, raw: bytes) -> str:
    documents = sse_documents(raw)
    if native == "anthropic":
        return "".join(data["delta"].get("text", "") for name, data in documents if name == "content_block_delta")
    return "".join(
        part.get("text", "") for _, data in documents for candidate in data.get("candidates", ())
        for part in candidate["content"]["parts"]
    )  # fmt: skip


def settled(stack: Stack, before: dict[str, float], billed_before: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Wait until the mock's stream has ended and extguard has committed, then return both deltas."""
    import time

    deadline = time.monotonic() + 5
    while True:
        now_billed, now_committed = billed(stack), committed(stack)
        billed_delta = {"input": now_billed["input_tokens"] - billed_before["input_tokens"],
                        "output": now_billed["output_tokens"] - billed_before["output_tokens"]}  # fmt: skip
        committed_delta = {kind: now_committed[kind] - before[kind] for kind in before}
        if (now_billed["streams_open"] == 0 and committed_delta == billed_delta) or time.monotonic() > deadline:
            return committed_delta, billed_delta
        time.sleep(0.05)


@pytest.mark.parametrize("native", ["anthropic", "gemini", "bedrock"])
def test_native_json_masked_and_metered(stack, native) -> None:  # type: ignore[no-untyped-def]
    before, billed_before = committed(stack), billed(stack)

    status, _, raw = chat(stack, {"native": native, "reply": "write to sam@example.net today"})

    assert status == 200
    assert json_text(native, json.loads(raw)) == "write to <EMAIL_ADDRESS> today"
    committed_delta, billed_delta = settled(stack, before, billed_before)
    assert billed_delta["output"] > 0
    assert committed_delta == billed_delta


@pytest.mark.parametrize("native", ["anthropic", "gemini"])
def test_native_stream_split_value_masked_and_metered(stack, native) -> None:  # type: ignore[no-untyped-def]
    before, billed_before = committed(stack), billed(stack)

    # Three characters per event: the address arrives in pieces across several events.
    status, headers, raw = chat(stack, {"native": native, "reply": "write to sam@example.net today", "chunk_chars": 3}, stream=True)

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert stream_text(native, raw) == "write to <EMAIL_ADDRESS> today"
    assert b"sam@" not in raw
    committed_delta, billed_delta = settled(stack, before, billed_before)
    assert billed_delta["output"] > 0
    assert committed_delta == billed_delta


def test_gemini_stream_secret_ends_with_gemini_error(stack) -> None:  # type: ignore[no-untyped-def]
    status, _, raw = chat(stack, {"native": "gemini", "reply": "the key is AKIAIOSFODNN7EXAMPLE, keep it", "chunk_chars": 5}, stream=True)

    assert status == 200  # the stream had begun: the error is its last event
    documents = sse_documents(raw)
    error = documents[-1][1]["error"]
    assert error["status"] == "INTERNAL"
    assert error["code"] == 502
    assert "AWS_ACCESS_KEY_ID" in error["message"]
    assert b"AKIA" not in raw


def test_anthropic_native_stream_secret_ends_with_anthropic_error(stack) -> None:  # type: ignore[no-untyped-def]
    status, _, raw = chat(stack, {"native": "anthropic", "reply": "the key is AKIAIOSFODNN7EXAMPLE", "chunk_chars": 5}, stream=True)

    assert status == 200
    name, data = sse_documents(raw)[-1]
    assert name == "error"
    assert data["type"] == "error"
    assert b"AKIA" not in raw


@pytest.mark.parametrize("native", ["gemini", "bedrock"])
def test_native_tool_arguments_masked(stack, native) -> None:  # type: ignore[no-untyped-def]
    tool_call = {"name": "send_mail", "arguments": json.dumps({"to": "sam@example.net", "subject": "hi"})}

    status, _, raw = chat(stack, {"native": native, "tool_call": tool_call})

    document = json.loads(raw)
    if native == "gemini":
        arguments = document["candidates"][0]["content"]["parts"][0]["functionCall"]["args"]
    else:
        arguments = document["output"]["message"]["content"][0]["toolUse"]["input"]
    assert status == 200
    assert arguments == {"to": "<EMAIL_ADDRESS>", "subject": "hi"}


def test_gemini_stream_function_call_masked(stack) -> None:  # type: ignore[no-untyped-def]
    tool_call = {"name": "send_mail", "arguments": json.dumps({"to": "sam@example.net"})}

    status, _, raw = chat(stack, {"native": "gemini", "tool_call": tool_call}, stream=True)

    (_, chunk), = sse_documents(raw)
    assert status == 200
    assert chunk["candidates"][0]["content"]["parts"][0]["functionCall"]["args"] == {"to": "<EMAIL_ADDRESS>"}


def test_gzip_native_stream_decoded_and_masked(stack) -> None:  # type: ignore[no-untyped-def]
    status, headers, raw = chat(stack, {"native": "gemini", "reply": "mail sam@example.net", "gzip": True}, stream=True)

    assert status == 200
    assert "content-encoding" not in {name.lower() for name in headers}
    assert stream_text("gemini", raw) == "mail <EMAIL_ADDRESS>"


def event_stream_messages(raw: bytes) -> list[tuple[dict[str, str], dict]]:
    """Return (string headers, parsed payload) of every AWS event stream message, checking CRCs.

    Written apart from extguard's codec, so the two check each other.
    """
    messages = []
    while raw:
        total, headers_length = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
        message, raw = raw[:total], raw[total:]
        assert zlib.crc32(message[:8]) == int.from_bytes(message[8:12], "big")
        assert zlib.crc32(message[:-4]) == int.from_bytes(message[-4:], "big")
        block, headers = message[12 : 12 + headers_length], {}
        while block:
            name_length = block[0]
            name = block[1 : 1 + name_length].decode()
            value_length = int.from_bytes(block[2 + name_length : 4 + name_length], "big")
            headers[name] = block[4 + name_length : 4 + name_length + value_length].decode()
            block = block[4 + name_length + value_length :]
        messages.append((headers, json.loads(message[12 + headers_length : -4])))
    return messages


def bedrock_stream_text(native: str, raw: bytes) -> str:
    texts = []
    for headers, payload in event_stream_messages(raw):
        if native == "bedrock" and headers[":event-type"] == "contentBlockDelta":
            texts.append(payload["delta"].get("text", ""))
        if native == "bedrock_anthropic" and headers[":event-type"] == "chunk":
            event = json.loads(base64.b64decode(payload["bytes"]))
            if event["type"] == "content_block_delta":
                texts.append(event["delta"].get("text", ""))
    return "".join(texts)


@pytest.mark.parametrize("native", ["bedrock", "bedrock_anthropic"])
def test_bedrock_event_stream_masked_and_metered(stack, native) -> None:  # type: ignore[no-untyped-def]
    before, billed_before = committed(stack), billed(stack)

    status, headers, raw = chat(stack, {"native": native, "reply": "write to sam@example.net today", "chunk_chars": 3}, stream=True)

    assert status == 200
    assert headers["content-type"] == "application/vnd.amazon.eventstream"
    assert bedrock_stream_text(native, raw) == "write to <EMAIL_ADDRESS> today"
    assert b"sam@" not in raw
    committed_delta, billed_delta = settled(stack, before, billed_before)
    assert billed_delta["output"] > 0
    assert committed_delta == billed_delta


def test_bedrock_stream_tool_input_masked(stack) -> None:  # type: ignore[no-untyped-def]
    tool_call = {"name": "send_mail", "arguments": json.dumps({"to": "sam@example.net"})}

    status, _, raw = chat(stack, {"native": "bedrock", "tool_call": tool_call, "chunk_chars": 4}, stream=True)

    deltas = [payload["delta"]["toolUse"]["input"] for headers, payload in event_stream_messages(raw)
              if headers[":event-type"] == "contentBlockDelta"]  # fmt: skip
    assert status == 200
    assert json.loads("".join(deltas)) == {"to": "<EMAIL_ADDRESS>"}


@pytest.mark.parametrize("native", ["bedrock", "bedrock_anthropic"])
def test_bedrock_stream_secret_ends_with_exception(stack, native) -> None:  # type: ignore[no-untyped-def]
    status, _, raw = chat(stack, {"native": native, "reply": "the key is AKIAIOSFODNN7EXAMPLE, keep it", "chunk_chars": 5}, stream=True)

    headers, payload = event_stream_messages(raw)[-1]
    assert status == 200
    assert headers[":message-type"] == "exception"
    assert headers[":exception-type"] == "internalServerException"
    assert "AWS_ACCESS_KEY_ID" in payload["message"]
    assert b"AKIA" not in raw


def test_broken_event_stream_refused_in_stream(stack) -> None:  # type: ignore[no-untyped-def]
    # A body that claims to be an event stream but is not one: extguard cannot read it.
    status, _, raw = chat(stack, {"native": "gemini", "reply": "sam@example.net", "content_type": "application/vnd.amazon.eventstream"}, stream=True)

    headers, payload = event_stream_messages(raw)[-1]
    assert status == 200
    assert headers[":message-type"] == "exception"
    assert b"sam@" not in raw
    assert stack.metric("extguard_bad_input_total", action="reject", kind="malformed_frame") >= 1
