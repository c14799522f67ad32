"""Guard streamed responses event by event: SSE of the OpenAI, Anthropic and Gemini APIs, and
Bedrock's event streams.

Each text channel of a stream (a choice's content, one tool call's arguments, one Anthropic
content block, one Gemini candidate's text) gets its own `StreamGuard`, which holds back only the trailing characters that
could still be part of a match. Held text is released with the next event of the same channel,
or, when the channel ends, inserted into the closing event (OpenAI: the chunk carrying
`finish_reason`) or as an extra delta event just before it (Anthropic: before
`content_block_stop`; Gemini: the chunk carrying `finishReason`; Bedrock: a delta message
before `contentBlockStop`). Events the guard leaves unchanged are forwarded byte for byte.

When a blocking rule fires mid-stream, the rewriter emits one well-formed error event that the
provider's SDK raises as an API error, and drops everything the upstream sends after it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Hashable
from typing import Any

from extguard.llm.apis import ANTHROPIC_MESSAGES, ERROR_CODE_BAD_INPUT, ERROR_CODE_BLOCKED, Api, ApiKind
from extguard.llm.eventstream import EventStreamDecoder, EventStreamError, Message, encode_message
from extguard.llm.payloads import string_leaves
from extguard.llm.sse import SseDecodeError, SseDecoder, SseEvent, encode_event
from extguard.llm.usage import ReportedUsage, usage_from_document, usage_from_event
from extguard.scan.engine import Hit
from extguard.scan.stream import StreamGuard

BlockMessage = Callable[[list[Hit]], str]


def _dumps(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


# The text field of each Anthropic content delta type that carries generated text.
_ANTHROPIC_DELTA_FIELDS = {"text_delta": "text", "input_json_delta": "partial_json"}


class _Blocked(Exception):
    """Raised inside the rewriter when a channel reports a blocking hit."""


class StreamRewriter:
    """Base of the per-API rewriters: channel bookkeeping, blocking and bad-event handling."""

    def __init__(
        self,
        api: Api,
        make_guard: Callable[[], StreamGuard],
        block_message: BlockMessage,
        *,
        pass_bad_events: bool,
    ) -> None:
        self.api = api
        self.hits: list[Hit] = []
        self.problems: list[str] = []  # bad-input kinds seen, for the caller to count and log
        self.blocked = False
        self.max_held_chars = 0
        self._make_guard = make_guard
        self._block_message = block_message
        self._pass_bad_events = pass_bad_events
        self._decoder: SseDecoder | EventStreamDecoder = self._new_decoder()
        self._channels: dict[Hashable, StreamGuard] = {}
        self.usage = ReportedUsage()  # usage the provider reported in the stream so far
        self.text_chars = 0  # chars of generated text seen, to estimate output without usage

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to send downstream in place of `chunk`."""
        if self.blocked:
            return b""
        try:
            events = self._decoder.feed(chunk)
        except SseDecodeError:
            return self._bad_input("invalid_utf8")
        except EventStreamError:
            return self._bad_input("malformed_frame")

        output: list[bytes] = []
        for event in events:
            self._note_usage(event)
            try:
                output.append(self._rewrite(event))
            except _Blocked as blocked:
                output.append(blocked.args[0])
            if self.blocked:
                break
        return b"".join(output)

    def finish(self) -> bytes:
        """Return what remains at the end of the upstream body: held text, never a half event."""
        if self.blocked:
            return b""
        if self._decoder.take_rest():
            # The upstream ended mid-event. The partial event is dropped: it was never scanned.
            self.problems.append("truncated_stream")
        try:
            return self._flush_channels(lambda key: True)
        except _Blocked as blocked:
            return blocked.args[0]

    def _new_decoder(self) -> SseDecoder | EventStreamDecoder:
        return SseDecoder()

    def _note_usage(self, event: Any) -> None:
        usage_from_event(self.api, event, self.usage)

    # -- channels --------------------------------------------------------------------------

    def _feed_channel(self, key: Hashable, delta: str) -> str:
        self.text_chars += len(delta)
        guard = self._channels.get(key)
        if guard is None:
            guard = self._channels[key] = self._make_guard()
        chunk = guard.feed(delta)
        return self._take(chunk)

    def _flush_channel(self, key: Hashable) -> str:
        guard = self._channels.pop(key, None)
        if guard is None:
            return ""
        return self._take(guard.flush())

    def _take(self, chunk: Any) -> str:
        self.hits.extend(chunk.hits)
        if chunk.held_chars > self.max_held_chars:
            self.max_held_chars = chunk.held_chars
        if chunk.blocking:
            self.blocked = True
            raise _Blocked(self.api.stream_error_event(502, self._block_message(chunk.blocking), ERROR_CODE_BLOCKED))
        return chunk.text

    def _flush_channels(self, wanted: Callable[[Hashable], bool]) -> bytes:
        raise NotImplementedError

    def _rewrite(self, event: Any) -> bytes:
        raise NotImplementedError

    def _bad_input(self, kind: str, event: SseEvent | Message | None = None) -> bytes:
        self.problems.append(kind)
        if self._pass_bad_events and event is not None:
            return event.raw
        if self._pass_bad_events:
            return b""
        self.blocked = True
        message = "extguard could not read the upstream response stream, so it was stopped."
        return self.api.stream_error_event(502, message, ERROR_CODE_BAD_INPUT)


class OpenAiStreamRewriter(StreamRewriter):
    """Chat Completions chunks: `choices[].delta.content`, `.refusal` and tool-call arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._template: dict[str, Any] = {"object": "chat.completion.chunk"}

    def _rewrite(self, event: SseEvent) -> bytes:
        data = event.data
        if not data:
            return event.raw
        if data == "[DONE]":
            return self._flush_channels(lambda key: True) + event.raw
        try:
            chunk = json.loads(data)
        except ValueError:
            return self._bad_input("malformed_json", event)
        if not isinstance(chunk, dict) or "error" in chunk:
            return event.raw
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return event.raw

        self._remember_template(chunk)
        changed = False
        for choice in choices:
            if isinstance(choice, dict) and self._rewrite_choice(choice):
                changed = True
        return encode_event(_dumps(chunk)) if changed else event.raw

    def _remember_template(self, chunk: dict[str, Any]) -> None:
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk:
                self._template[name] = chunk[name]
        if self.usage.model is None:
            self.usage.note_model(chunk.get("model"))

    def _rewrite_choice(self, choice: dict[str, Any]) -> bool:
        index = choice.get("index", 0)
        delta = choice.get("delta")
        changed = False
        if isinstance(delta, dict):
            for field in ("content", "refusal"):
                text = delta.get(field)
                if isinstance(text, str) and text:
                    released = self._feed_channel((index, field), text)
                    if released != text:
                        delta[field] = released
                        changed = True
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str) and arguments:
                    released = self._feed_channel((index, "tool", call.get("index", 0)), arguments)
                    if released != arguments:
                        function["arguments"] = released
                        changed = True

        if choice.get("finish_reason") is not None:
            self.usage.note_finish_reason(choice["finish_reason"])
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if self._flush_into_delta(index, delta):
                changed = True
        return changed

    def _flush_into_delta(self, index: Any, delta: dict[str, Any]) -> bool:
        changed = False
        for key in [key for key in self._channels if key[0] == index]:  # type: ignore[index]
            text = self._flush_channel(key)
            if not text:
                continue
            changed = True
            if key[1] == "tool":  # type: ignore[index]
                self._append_tool_arguments(delta, key[2], text)  # type: ignore[index]
            else:
                field = key[1]  # type: ignore[index]
                delta[field] = (delta.get(field) or "") + text
        return changed

    @staticmethod
    def _append_tool_arguments(delta: dict[str, Any], tool_index: Any, text: str) -> None:
        calls = delta.setdefault("tool_calls", [])
        for call in calls:
            if isinstance(call, dict) and call.get("index", 0) == tool_index:
                function = call.setdefault("function", {})
                function["arguments"] = (function.get("arguments") or "") + text
                return
        calls.append({"index": tool_index, "function": {"arguments": text}})

    def _flush_channels(self, wanted: Callable[[Hashable], bool]) -> bytes:
        output: list[bytes] = []
        for index in sorted({key[0] for key in self._channels if wanted(key)}, key=str):  # type: ignore[index]
            delta: dict[str, Any] = {}
            if self._flush_into_delta(index, delta):
                chunk = {**self._template, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}
                output.append(encode_event(_dumps(chunk)))
        return b"".join(output)


class AnthropicStreamRewriter(StreamRewriter):
    """Messages events: `content_block_delta` text and tool-input JSON, per content block."""

    def _rewrite(self, event: SseEvent) -> bytes:
        name = event.event
        if name not in ("content_block_delta", "content_block_stop", "message_stop"):
            return event.raw
        if name == "message_stop":
            return self._flush_channels(lambda key: True) + event.raw
        try:
            document = json.loads(event.data)
        except ValueError:
            return self._bad_input("malformed_json", event)
        if not isinstance(document, dict):
            return event.raw

        index = document.get("index", 0)
        if name == "content_block_stop":
            return self._flush_channels(lambda key: key[0] == index) + event.raw  # type: ignore[index]

        delta = document.get("delta")
        if not isinstance(delta, dict):
            return event.raw
        field = _ANTHROPIC_DELTA_FIELDS.get(delta.get("type", ""))
        text = delta.get(field) if field else None
        if not isinstance(text, str) or not text:
            return event.raw
        released = self._feed_channel((index, field), text)
        if released == text:
            return event.raw
        delta[field] = released
        return encode_event(_dumps(document), "content_block_delta")

    def _flush_channels(self, wanted: Callable[[Hashable], bool]) -> bytes:
        output: list[bytes] = []
        for key in [key for key in self._channels if wanted(key)]:
            text = self._flush_channel(key)
            if not text:
                continue
            index, field = key  # type: ignore[misc]
            delta_type = "text_delta" if field == "text" else "input_json_delta"
            document = {"type": "content_block_delta", "index": index, "delta": {"type": delta_type, field: text}}
            output.append(encode_event(_dumps(document), "content_block_delta"))
        return b"".join(output)


class GeminiStreamRewriter(StreamRewriter):
    """`streamGenerateContent` chunks: each candidate's text parts, and function-call arguments.

    A function call arrives whole in one chunk, so its arguments are scanned at once.
    """

    def _rewrite(self, event: SseEvent) -> bytes:
        if not event.data:
            return event.raw
        try:
            chunk = json.loads(event.data)
        except ValueError:
            return self._bad_input("malformed_json", event)
        candidates = chunk.get("candidates") if isinstance(chunk, dict) else None
        if not isinstance(candidates, list):
            return event.raw
        changed = False
        for position, candidate in enumerate(candidates):
            if isinstance(candidate, dict) and self._rewrite_candidate(candidate, position):
                changed = True
        return encode_event(_dumps(chunk)) if changed else event.raw

    def _rewrite_candidate(self, candidate: dict[str, Any], position: int) -> bool:
        index = candidate.get("index", position)
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        changed = False
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str) and text:
                released = self._feed_channel((index, "text"), text)
                if released != text:
                    part["text"] = released
                    changed = True
            call = part.get("functionCall")
            if isinstance(call, dict):
                for slot in string_leaves(call.get("args"), "assistant"):
                    released = self._feed_channel((index, "call"), slot.text) + self._flush_channel((index, "call"))
                    if released != slot.text:
                        slot.set(released)
                        changed = True
        if candidate.get("finishReason") is not None:
            held = self._flush_channel((index, "text"))
            if held:
                if not isinstance(content, dict):
                    content = candidate["content"] = {"role": "model"}
                if not isinstance(content.get("parts"), list):
                    content["parts"] = []
                content["parts"].append({"text": held})
                changed = True
        return changed

    def _flush_channels(self, wanted: Callable[[Hashable], bool]) -> bytes:
        output: list[bytes] = []
        for key in [key for key in self._channels if wanted(key)]:
            text = self._flush_channel(key)
            if text:
                index = key[0]  # type: ignore[index]
                chunk = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": index}]}
                output.append(encode_event(_dumps(chunk)))
        return b"".join(output)


# Headers of the delta messages that a Bedrock rewriter adds to release held text.
_BEDROCK_EVENT = {":message-type": "event", ":content-type": "application/json"}
_CONVERSE_DELTA_FIELDS = {"text": ("text",), "tool": ("toolUse", "input"), "reasoning": ("reasoningContent", "text")}


class BedrockStreamRewriter(StreamRewriter):
    """Bedrock event streams, in either of two shapes.

    ConverseStream: `contentBlockDelta` messages with text, tool-use input or reasoning text per
    content block, and usage in the `metadata` message. InvokeModelWithResponseStream (Anthropic
    models): `chunk` messages whose `bytes` field is a base64 Anthropic Messages stream event.
    """

    def _new_decoder(self) -> EventStreamDecoder:
        return EventStreamDecoder()

    def _note_usage(self, event: Any) -> None:
        pass  # read in _rewrite, which parses every payload anyway

    def _rewrite(self, message: Message) -> bytes:
        if message.message_type != "event":
            return message.raw
        try:
            document = json.loads(message.payload)
        except ValueError:
            return self._bad_input("malformed_json", message)
        if not isinstance(document, dict):
            return message.raw
        if message.event_type == "chunk":
            return self._rewrite_chunk(message, document)
        return self._rewrite_converse(message, document)

    def _rewrite_converse(self, message: Message, document: dict[str, Any]) -> bytes:
        usage_from_document(self.api, document, self.usage)
        name = message.event_type
        index = document.get("contentBlockIndex", 0)
        if name == "contentBlockStop":
            return self._flush_channels(lambda key: key[:2] == ("converse", index)) + message.raw  # type: ignore[index]
        if name == "messageStop":
            return self._flush_channels(lambda key: True) + message.raw
        delta = document.get("delta")
        if name != "contentBlockDelta" or not isinstance(delta, dict):
            return message.raw
        for kind, path in _CONVERSE_DELTA_FIELDS.items():
            container = delta
            for step in path[:-1]:
                container = container.get(step) if isinstance(container, dict) else None
            text = container.get(path[-1]) if isinstance(container, dict) else None
            if isinstance(text, str) and text:
                released = self._feed_channel(("converse", index, kind), text)
                if released == text:
                    return message.raw
                container[path[-1]] = released  # type: ignore[index]
                return message.with_payload(_dumps(document).encode("utf-8"))
        return message.raw

    def _rewrite_chunk(self, message: Message, document: dict[str, Any]) -> bytes:
        try:
            event = json.loads(base64.b64decode(document["bytes"], validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            return self._bad_input("malformed_json", message)
        if not isinstance(event, dict):
            return message.raw
        usage_from_document(ANTHROPIC_MESSAGES, event, self.usage)
        name = event.get("type")
        index = event.get("index", 0)
        if name == "content_block_stop":
            return self._flush_channels(lambda key: key[:2] == ("chunk", index)) + message.raw  # type: ignore[index]
        if name == "message_stop":
            return self._flush_channels(lambda key: True) + message.raw
        delta = event.get("delta")
        if name != "content_block_delta" or not isinstance(delta, dict):
            return message.raw
        field = _ANTHROPIC_DELTA_FIELDS.get(delta.get("type", ""))
        text = delta.get(field) if field else None
        if not isinstance(text, str) or not text:
            return message.raw
        released = self._feed_channel(("chunk", index, field), text)
        if released == text:
            return message.raw
        delta[field] = released
        document["bytes"] = base64.b64encode(_dumps(event).encode("utf-8")).decode("ascii")
        return message.with_payload(_dumps(document).encode("utf-8"))

    def _flush_channels(self, wanted: Callable[[Hashable], bool]) -> bytes:
        output: list[bytes] = []
        for key in [key for key in self._channels if wanted(key)]:
            text = self._flush_channel(key)
            if not text:
                continue
            shape, index, kind = key  # type: ignore[misc]
            if shape == "converse":
                *outer, last = _CONVERSE_DELTA_FIELDS[kind]
                delta: dict[str, Any] = {last: text}
                for step in reversed(outer):
                    delta = {step: delta}
                payload = {"contentBlockIndex": index, "delta": delta}
                output.append(encode_message({":event-type": "contentBlockDelta", **_BEDROCK_EVENT}, _dumps(payload).encode("utf-8")))
            else:
                delta_type = "text_delta" if kind == "text" else "input_json_delta"
                event = {"type": "content_block_delta", "index": index, "delta": {"type": delta_type, kind: text}}
                payload = {"bytes": base64.b64encode(_dumps(event).encode("utf-8")).decode("ascii")}
                output.append(encode_message({":event-type": "chunk", **_BEDROCK_EVENT}, _dumps(payload).encode("utf-8")))
        return b"".join(output)


def stream_rewriter_for(api: Api, *args: Any, **kwargs: Any) -> StreamRewriter:
    if api.kind is ApiKind.BEDROCK_CONVERSE:
        return BedrockStreamRewriter(api, *args, **kwargs)
    if api.kind is ApiKind.ANTHROPIC_MESSAGES:
        return AnthropicStreamRewriter(api, *args, **kwargs)
    if api.kind is ApiKind.GEMINI_GENERATE_CONTENT:
        return GeminiStreamRewriter(api, *args, **kwargs)
    return OpenAiStreamRewriter(api, *args, **kwargs)
