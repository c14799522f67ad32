"""SSE framing and the text slots of OpenAI and Anthropic payloads."""

from __future__ import annotations

import pytest

from extguard.llm.apis import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    GEMINI_GENERATE_CONTENT,
    OPENAI_CHAT,
    api_for_path,
    response_api_for_document,
    response_api_for_stream,
)
from extguard.llm.eventstream import EventStreamDecoder, EventStreamError, encode_message, encode_raw
from extguard.llm.payloads import anthropic_request_slots, anthropic_response_slots, openai_request_slots
from extguard.llm.sse import SseDecodeError, SseDecoder, encode_event
from extguard.llm.usage import ReportedUsage, usage_from_document


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", OPENAI_CHAT),
        ("/openai/deployments/gpt4/chat/completions?api-version=2024-10-21", OPENAI_CHAT),
        ("/v1/messages", ANTHROPIC_MESSAGES),
        ("/v1/messages/", ANTHROPIC_MESSAGES),
        ("/v1/embeddings", None),
        ("/v1/messages/batches", None),
        ("/", None),
    ],
)
def test_api_for_path(path: str, api) -> None:  # type: ignore[no-untyped-def]
    assert api_for_path(path) is api


def test_sse_events_across_chunk_boundaries() -> None:
    stream = b'event: a\ndata: {"x": 1}\n\n: keep-alive\n\ndata: line1\ndata: line2\r\n\r\ndata: [DONE]\n\n'
    decoder = SseDecoder()
    events = []
    for i in range(0, len(stream), 5):
        events.extend(decoder.feed(stream[i : i + 5]))

    assert [(e.event, e.data) for e in events] == [("a", '{"x": 1}'), (None, ""), (None, "line1\nline2"), (None, "[DONE]")]
    assert b"".join(e.raw for e in events) == stream
    assert decoder.pending_bytes == 0


def test_sse_multibyte_character_split() -> None:
    raw = "data: café ☕\n\n".encode()
    decoder = SseDecoder()
    events = decoder.feed(raw[:10]) + decoder.feed(raw[10:])

    assert events[0].data == "café ☕"


def test_sse_invalid_utf8_raises() -> None:
    with pytest.raises(SseDecodeError):
        SseDecoder().feed(b"data: \xff\n\n")


def test_sse_truncated_rest() -> None:
    decoder = SseDecoder()
    decoder.feed(b"data: complete\n\ndata: {\"par")

    assert decoder.take_rest() == b'data: {"par'


def test_encode_event() -> None:
    assert encode_event('{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event("{}", "ping") == b"event: ping\ndata: {}\n\n"


def test_openai_request_slots_cover_all_text() -> None:
    payload = {
        "user": "end-user-7",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "result"},
        ]
    }
    slots = openai_request_slots(payload)

    assert [(slot.role, slot.text) for slot in slots] == [
        ("metadata", "end-user-7"), ("system", "sys"), ("user", "part"), ("assistant", "{}"), ("tool", "result")]


def test_slot_set_writes_back() -> None:
    payload = {"messages": [{"role": "user", "content": "old"}]}
    openai_request_slots(payload)[0].set("new")

    assert payload["messages"][0]["content"] == "new"


def test_anthropic_slots_include_system_tool_use_and_results() -> None:
    payload = {
        "system": [{"type": "text", "text": "sys"}],
        "metadata": {"user_id": "u-1"},
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"to": "a", "n": 2}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "done"}]},
        ],
    }
    slots = anthropic_request_slots(payload)

    assert [(slot.role, slot.text) for slot in slots] == [
        ("system", "sys"), ("metadata", "u-1"), ("assistant", "a"), ("tool", "done")]


def test_anthropic_response_slots() -> None:
    payload = {"content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "input": {"q": "x"}}]}

    assert [slot.text for slot in anthropic_response_slots(payload)] == ["hi", "x"]


@pytest.mark.parametrize(
    ("api", "events", "expected"),
    [
        # OpenAI JSON response, with prompt-cache details.
        (OPENAI_CHAT, [("json", '{"usage": {"prompt_tokens": 20, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 8}}}')], (20, 7, 8)),
        # OpenAI stream: "usage": null in every chunk but the last.
        (OPENAI_CHAT, [(None, '{"choices": [], "usage": null}'), (None, '{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}')], (5, 9, 0)),
        (OPENAI_CHAT, [(None, '{"choices": [{"delta": {"content": "hi"}}]}')], (None, None, 0)),
        # Anthropic JSON response: cache reads and writes are input too.
        (ANTHROPIC_MESSAGES, [("json", '{"type": "message", "usage": {"input_tokens": 3, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 2, "output_tokens": 40}}')], (15, 40, 10)),
        # Anthropic stream: message_start's output count is a placeholder, message_delta's is real.
        (ANTHROPIC_MESSAGES, [("message_start", '{"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}')], (12, None, 0)),
        (
            ANTHROPIC_MESSAGES,
            [
                ("message_start", '{"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}'),
                ("message_delta", '{"type": "message_delta", "usage": {"output_tokens": 250}}'),
            ],
            (12, 250, 0),
        ),
        (ANTHROPIC_MESSAGES, [("ping", '{"type": "ping", "usage": {"output_tokens": 99}}')], (None, None, 0)),
        # Malformed or hostile values are ignored, not counted.
        (OPENAI_CHAT, [("json", '{"usage": {"prompt_tokens": -4, "completion_tokens": true}}')], (None, None, 0)),
        (OPENAI_CHAT, [(None, '{"usage": {')], (None, None, 0)),
    ],
    ids=["openai-json", "openai-stream", "openai-no-usage", "anthropic-json", "anthropic-start", "anthropic-delta", "anthropic-ping", "invalid-values", "truncated"],
)
def test_reported_usage(api, events: list[tuple[str | None, str]], expected: tuple) -> None:  # type: ignore[no-untyped-def]
    """A JSON response ("json") or SSE events, by event name (None for OpenAI's unnamed events)."""
    import json

    from extguard.llm.sse import SseEvent
    from extguard.llm.usage import ReportedUsage, usage_from_document, usage_from_event

    reported = ReportedUsage()
    for name, data in events:
        if name == "json":
            usage_from_document(api, json.loads(data), reported)
        else:
            usage_from_event(api, SseEvent(raw=b"", event=name, data=data), reported)

    assert (reported.input_tokens, reported.output_tokens, reported.cached_input_tokens) == expected


# -- native response formats ------------------------------------------------------------------


def test_stream_format_undecided_until_first_event_completes() -> None:
    assert response_api_for_stream(b'data: {"candidates": [', OPENAI_CHAT) is None
    assert response_api_for_stream(b": keep-alive\n\n", OPENAI_CHAT) is None
    assert response_api_for_stream(b': keep-alive\n\ndata: {"candidates": []}\n\n', OPENAI_CHAT) is GEMINI_GENERATE_CONTENT
    assert response_api_for_stream(b"event: message_start\ndata: {}\r\n\r\n", OPENAI_CHAT) is ANTHROPIC_MESSAGES
    assert response_api_for_stream(b'data: {"type": "message_start"}\n\n', OPENAI_CHAT) is ANTHROPIC_MESSAGES
    assert response_api_for_stream(b'data: {"choices": []}\n\n', ANTHROPIC_MESSAGES) is OPENAI_CHAT
    assert response_api_for_stream(b"data: not json\n\n", OPENAI_CHAT) is OPENAI_CHAT
    assert response_api_for_stream(b"x" * 70000, ANTHROPIC_MESSAGES) is ANTHROPIC_MESSAGES


def test_document_format_by_shape() -> None:
    assert response_api_for_document({"type": "message", "content": []}, OPENAI_CHAT) is ANTHROPIC_MESSAGES
    assert response_api_for_document({"candidates": []}, OPENAI_CHAT) is GEMINI_GENERATE_CONTENT
    assert response_api_for_document({"output": {"message": {}}}, OPENAI_CHAT) is BEDROCK_CONVERSE
    assert response_api_for_document({"error": {"message": "x"}}, OPENAI_CHAT) is OPENAI_CHAT
    assert response_api_for_document({"choices": [], "candidates": []}, OPENAI_CHAT) is OPENAI_CHAT


def test_gemini_usage_counts_thoughts_as_output() -> None:
    reported = ReportedUsage()
    usage_from_document(GEMINI_GENERATE_CONTENT, {
        "candidates": [{"finishReason": "STOP"}], "modelVersion": "gemini-2.5-flash",
        "usageMetadata": {"promptTokenCount": 120, "cachedContentTokenCount": 100, "candidatesTokenCount": 7, "thoughtsTokenCount": 30},
    }, reported)  # fmt: skip

    assert (reported.input_tokens, reported.cached_input_tokens, reported.output_tokens) == (120, 100, 37)
    assert (reported.model, reported.finish_reasons) == ("gemini-2.5-flash", ["STOP"])


def test_bedrock_converse_usage_adds_cache_tokens_to_input() -> None:
    reported = ReportedUsage()
    usage_from_document(BEDROCK_CONVERSE, {
        "stopReason": "end_turn",
        "usage": {"inputTokens": 10, "cacheReadInputTokens": 50, "cacheWriteInputTokens": 5, "outputTokens": 9},
    }, reported)  # fmt: skip

    assert (reported.input_tokens, reported.cached_input_tokens, reported.output_tokens) == (65, 50, 9)
    assert reported.finish_reasons == ["end_turn"]


# -- AWS event stream framing -----------------------------------------------------------------


def test_event_stream_messages_survive_any_split() -> None:
    first = encode_message({":event-type": "contentBlockDelta", ":message-type": "event"}, b'{"a":1}')
    second = encode_message({":event-type": "metadata"}, b"{}")
    stream = first + second

    for cut in range(len(stream) + 1):
        decoder = EventStreamDecoder()
        messages = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [(message.event_type, message.payload) for message in messages] == [("contentBlockDelta", b'{"a":1}'), ("metadata", b"{}")]


def test_event_stream_rewrite_keeps_headers() -> None:
    (message,) = EventStreamDecoder().feed(encode_message({":event-type": "chunk", ":content-type": "application/json"}, b"{}"))

    (rewritten,) = EventStreamDecoder().feed(message.with_payload(b'{"bytes":""}'))

    assert rewritten.raw_headers == message.raw_headers
    assert rewritten.payload == b'{"bytes":""}'


def test_event_stream_skips_non_string_headers() -> None:
    # A bool (type 0) and an int32 (type 4) header before a string header.
    headers = b"\x04flag\x00" + b"\x05count\x04\x00\x00\x00\x07" + b"\x0b:event-type\x07\x00\x05chunk"
    (message,) = EventStreamDecoder().feed(encode_raw(headers, b"{}"))

    assert message.headers == {":event-type": "chunk"}


@pytest.mark.parametrize("position", [9, -2])
def test_event_stream_corruption_detected(position: int) -> None:
    data = bytearray(encode_message({":event-type": "chunk"}, b"{}"))
    data[position] ^= 0xFF

    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(bytes(data))
