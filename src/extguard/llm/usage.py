"""Token usage as the providers report it, in JSON responses and in SSE streams.

- OpenAI Chat Completions: `usage.prompt_tokens`, `usage.completion_tokens` and
  `usage.prompt_tokens_details.cached_tokens`; in a stream, the last chunk carries `usage` when
  the request set `stream_options.include_usage`.
- Anthropic Messages: `usage.input_tokens` (plus `cache_read_input_tokens` and
  `cache_creation_input_tokens`, which are input too) and `usage.output_tokens`. In a stream,
  `message_start` carries the input and `message_delta` the output so far. The output count in
  `message_start` is a placeholder (1, or a few tokens) and is ignored, so a stream that ends
  before `message_delta` gets its output estimated from the text.

- Gemini `generateContent` (a native response behind a translating gateway):
  `usageMetadata.promptTokenCount` (which includes `cachedContentTokenCount`) and
  `candidatesTokenCount` plus `thoughtsTokenCount` as output; every stream chunk carries the
  counts so far.
- Bedrock Converse: `usage.inputTokens` (plus `cacheReadInputTokens` and
  `cacheWriteInputTokens`) and `usage.outputTokens`.

Where a provider reports nothing (a cancelled stream, a proxy that strips usage), the caller
estimates from text at ESTIMATE_CHARS_PER_TOKEN, because no tokenizer file may be loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from extguard.llm.apis import Api, ApiKind
from extguard.llm.sse import SseEvent

_USAGE_OBJECT = re.compile(r'"usage"\s*:\s*\{')
# About 4 chars per token for English text with common BPE tokenizers; an estimate only.
ESTIMATE_CHARS_PER_TOKEN = 4
# Bounds on the response facts kept per request: they come from the upstream's payload.
MAX_FACT_CHARS = 128
MAX_FINISH_REASONS = 16


def estimate_tokens(chars: int) -> int:
    """Return an estimate of the tokens in `chars` characters of text, rounded up."""
    return math.ceil(chars / ESTIMATE_CHARS_PER_TOKEN)


@dataclass(slots=True)
class ReportedUsage:
    """Usage the provider reported so far, with None for counts it did not report.

    Also the response facts that telemetry records: the model that generated the response and the finish
    reasons (OpenAI `finish_reason`, Anthropic `stop_reason`), in the order they arrived.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)

    def note_model(self, model: Any) -> None:
        if isinstance(model, str) and model:
            self.model = model[:MAX_FACT_CHARS]

    def note_finish_reason(self, reason: Any) -> None:
        if isinstance(reason, str) and reason and len(self.finish_reasons) < MAX_FINISH_REASONS:
            self.finish_reasons.append(reason[:MAX_FACT_CHARS])


def usage_from_document(api: Api, document: Any, reported: ReportedUsage) -> None:
    """Update `reported` from a JSON response or one stream chunk of `api`."""
    if not isinstance(document, dict):
        return
    if api.kind is ApiKind.GEMINI_GENERATE_CONTENT:
        _gemini(document, reported)
        return
    if api.kind is ApiKind.BEDROCK_CONVERSE:
        _bedrock_converse(document, reported)
        return
    if api.kind is ApiKind.ANTHROPIC_MESSAGES:
        message = document.get("message")
        if document.get("type") == "message_start" and isinstance(message, dict):
            reported.note_model(message.get("model"))
            if isinstance(message.get("usage"), dict):
                _anthropic(message["usage"], reported, with_output=False)
        if document.get("type") == "message":
            reported.note_model(document.get("model"))
            reported.note_finish_reason(document.get("stop_reason"))
        delta = document.get("delta")
        if document.get("type") == "message_delta" and isinstance(delta, dict):
            reported.note_finish_reason(delta.get("stop_reason"))
        if isinstance(document.get("usage"), dict):
            _anthropic(document["usage"], reported)
        return
    if document.get("object") == "chat.completion":
        reported.note_model(document.get("model"))
        for choice in document.get("choices") or ():
            if isinstance(choice, dict):
                reported.note_finish_reason(choice.get("finish_reason"))
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if prompt is not None:
        reported.input_tokens = prompt
    if completion is not None:
        reported.output_tokens = completion
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and _int(details.get("cached_tokens")) is not None:
        reported.cached_input_tokens = _int(details.get("cached_tokens")) or 0


def usage_from_event(api: Api, event: SseEvent, reported: ReportedUsage) -> None:
    """Update `reported` from one SSE event, parsing its data only when it can carry usage."""
    if api.kind is ApiKind.ANTHROPIC_MESSAGES:
        if event.event not in ("message_start", "message_delta"):
            return
    elif api.kind is ApiKind.GEMINI_GENERATE_CONTENT:
        pass  # every chunk can carry the model, finish reasons and the counts so far
    elif '"usage"' not in event.data or not _USAGE_OBJECT.search(event.data):
        # With include_usage every chunk carries "usage": null; only the last one needs parsing.
        return
    try:
        document = json.loads(event.data)
    except ValueError:
        return
    usage_from_document(api, document, reported)


def _anthropic(usage: dict[str, Any], reported: ReportedUsage, *, with_output: bool = True) -> None:
    input_tokens = _int(usage.get("input_tokens"))
    if input_tokens is not None:
        cache_read = _int(usage.get("cache_read_input_tokens")) or 0
        cache_write = _int(usage.get("cache_creation_input_tokens")) or 0
        reported.input_tokens = input_tokens + cache_read + cache_write
        reported.cached_input_tokens = cache_read
    output_tokens = _int(usage.get("output_tokens"))
    if output_tokens is not None and with_output:
        reported.output_tokens = output_tokens


def _gemini(document: dict[str, Any], reported: ReportedUsage) -> None:
    reported.note_model(document.get("modelVersion"))
    for candidate in document.get("candidates") or ():
        if isinstance(candidate, dict):
            reported.note_finish_reason(candidate.get("finishReason"))
    usage = document.get("usageMetadata")
    if not isinstance(usage, dict):
        return
    prompt = _int(usage.get("promptTokenCount"))
    if prompt is not None:
        reported.input_tokens = prompt
        reported.cached_input_tokens = _int(usage.get("cachedContentTokenCount")) or 0
    candidates = _int(usage.get("candidatesTokenCount"))
    thoughts = _int(usage.get("thoughtsTokenCount"))
    if candidates is not None or thoughts is not None:
        reported.output_tokens = (candidates or 0) + (thoughts or 0)


def _bedrock_converse(document: dict[str, Any], reported: ReportedUsage) -> None:
    reported.note_finish_reason(document.get("stopReason"))
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return
    input_tokens = _int(usage.get("inputTokens"))
    if input_tokens is not None:
        cache_read = _int(usage.get("cacheReadInputTokens")) or 0
        cache_write = _int(usage.get("cacheWriteInputTokens")) or 0
        reported.input_tokens = input_tokens + cache_read + cache_write
        reported.cached_input_tokens = cache_read
    output_tokens = _int(usage.get("outputTokens"))
    if output_tokens is not None:
        reported.output_tokens = output_tokens


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
