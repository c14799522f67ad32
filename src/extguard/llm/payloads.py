"""Text locations in LLM request and response payloads, and how to write text back.

A `TextSlot` points at one string inside a parsed JSON payload (a dict key or list index).
Scanning reads `slot.text`, and masking writes `slot.set(new_text)`. The caller then
re-serializes the payload, so everything that is not text (ids, numbers, tool schemas) is left
as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class TextSlot:
    container: dict[str, Any] | list[Any]
    key: str | int
    role: str  # the message role of the text (system, developer, user, assistant, tool) or "metadata"

    @property
    def text(self) -> str:
        return self.container[self.key]  # type: ignore[index]

    def set(self, text: str) -> None:
        self.container[self.key] = text  # type: ignore[index]


def string_leaves(value: Any, role: str) -> Iterator[TextSlot]:
    """Yield a slot for every string inside a JSON object (tool inputs are free-form objects)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield TextSlot(value, key, role)
            else:
                yield from string_leaves(item, role)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield TextSlot(value, index, role)
            else:
                yield from string_leaves(item, role)


def _text_parts(container: dict[str, Any], key: str, role: str) -> Iterator[TextSlot]:
    """Yield slots for a `content` that is a string or a list of typed parts."""
    content = container.get(key)
    if isinstance(content, str):
        yield TextSlot(container, key, role)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, dict):
            continue
        part_type = part.get("type")
        if part_type in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            yield TextSlot(part, "text", role)
        elif part_type == "refusal" and isinstance(part.get("refusal"), str):
            yield TextSlot(part, "refusal", role)
        elif part_type == "tool_use":
            yield from string_leaves(part.get("input"), role)
        elif part_type == "tool_result":
            yield from _text_parts(part, "content", "tool")


# --- OpenAI Chat Completions -------------------------------------------------------------


def openai_request_slots(payload: dict[str, Any]) -> list[TextSlot]:
    # `user` identifies the end user to the provider and is often an e-mail address.
    slots = [TextSlot(payload, "user", "metadata")] if isinstance(payload.get("user"), str) else []
    for message in payload.get("messages") or ():
        if not isinstance(message, dict):
            continue
        role = str(message.get("role") or "user")
        slots.extend(_text_parts(message, "content", role))
        slots.extend(_openai_tool_call_slots(message.get("tool_calls"), role))
    return slots


def openai_response_slots(payload: dict[str, Any]) -> list[TextSlot]:
    slots: list[TextSlot] = []
    for choice in payload.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        slots.extend(_text_parts(message, "content", "assistant"))
        if isinstance(message.get("refusal"), str):
            slots.append(TextSlot(message, "refusal", "assistant"))
        slots.extend(_openai_tool_call_slots(message.get("tool_calls"), "assistant"))
    return slots


def _openai_tool_call_slots(tool_calls: Any, role: str) -> Iterator[TextSlot]:
    if not isinstance(tool_calls, list):
        return
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield TextSlot(function, "arguments", role)


# --- Anthropic Messages ------------------------------------------------------------------


def anthropic_request_slots(payload: dict[str, Any]) -> list[TextSlot]:
    slots = list(_text_parts(payload, "system", "system"))
    metadata = payload.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        slots.append(TextSlot(metadata, "user_id", "metadata"))
    for message in payload.get("messages") or ():
        if isinstance(message, dict):
            slots.extend(_text_parts(message, "content", str(message.get("role") or "user")))
    return slots


def anthropic_response_slots(payload: dict[str, Any]) -> list[TextSlot]:
    return list(_text_parts(payload, "content", "assistant"))


# --- Response-only formats: Gemini generateContent and Bedrock Converse --------------------


def no_request_slots(payload: dict[str, Any]) -> list[TextSlot]:
    """Requests never arrive in these formats: extguard reads only their responses."""
    return []


def _gemini_parts_slots(parts: Any, role: str) -> Iterator[TextSlot]:
    """Yield slots for the text and function-call arguments of Gemini `parts`."""
    if not isinstance(parts, list):
        return
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            yield TextSlot(part, "text", role)
        call = part.get("functionCall")
        if isinstance(call, dict):
            yield from string_leaves(call.get("args"), role)


def gemini_response_slots(payload: dict[str, Any]) -> list[TextSlot]:
    slots: list[TextSlot] = []
    for candidate in payload.get("candidates") or ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        if isinstance(content, dict):
            slots.extend(_gemini_parts_slots(content.get("parts"), "assistant"))
    return slots


def bedrock_converse_response_slots(payload: dict[str, Any]) -> list[TextSlot]:
    output = payload.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    slots: list[TextSlot] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            slots.append(TextSlot(block, "text", "assistant"))
        tool_use = block.get("toolUse")
        if isinstance(tool_use, dict):
            slots.extend(string_leaves(tool_use.get("input"), "assistant"))
    return slots
