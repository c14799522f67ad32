"""The LLM APIs extguard understands, recognized by request path, and their error formats.

Errors that extguard returns itself (a blocked prompt, an unreadable body) use the provider's
own error shape, so the official SDKs raise their usual exception classes with our message.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extguard.llm import payloads

ERROR_CODE_BLOCKED = "extguard_policy_violation"
ERROR_CODE_BAD_INPUT = "extguard_invalid_body"
ERROR_CODE_INTERNAL = "extguard_unavailable"


class ApiKind(enum.StrEnum):
    OPENAI_CHAT = "openai.chat_completions"
    ANTHROPIC_MESSAGES = "anthropic.messages"


@dataclass(frozen=True, slots=True)
class Api:
    kind: ApiKind
    provider: str  # "openai" or "anthropic", as in gen_ai.provider.name
    request_slots: Callable[[dict[str, Any]], list[payloads.TextSlot]]
    response_slots: Callable[[dict[str, Any]], list[payloads.TextSlot]]

    def error_document(self, status: int, message: str, code: str) -> dict[str, Any]:
        """Return the error object this provider sends for an HTTP error of `status`."""
        if self.kind is ApiKind.ANTHROPIC_MESSAGES:
            return {"type": "error", "error": {"type": _anthropic_error_type(status), "message": message}}
        return {"error": {"message": message, "type": _openai_error_type(status), "param": None, "code": code}}

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """Return an error body in this provider's format for an HTTP error of `status`."""
        return _dumps(self.error_document(status, message, code)).encode("utf-8")

    def stream_error_event(self, status: int, message: str, code: str) -> bytes:
        """Return one SSE event that makes this provider's SDK raise an error mid-stream.

        `status` is the HTTP status the error would have had before streaming began; it picks
        the error type, as in `error_body`.
        """
        data = _dumps(self.error_document(status, message, code))
        if self.kind is ApiKind.ANTHROPIC_MESSAGES:
            return f"event: error\ndata: {data}\n\n".encode()
        return f"data: {data}\n\n".encode()


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


OPENAI_CHAT = Api(
    ApiKind.OPENAI_CHAT, "openai", payloads.openai_request_slots, payloads.openai_response_slots
)
ANTHROPIC_MESSAGES = Api(
    ApiKind.ANTHROPIC_MESSAGES, "anthropic", payloads.anthropic_request_slots, payloads.anthropic_response_slots
)


def api_for_path(path: str) -> Api | None:
    """Return the API served at `path` (query string allowed), or None for any other path.

    Matching is on the path's end, so prefixes such as `/openai/deployments/NAME` (Azure OpenAI)
    or a gateway's own route prefix still match.
    """
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return OPENAI_CHAT
    if path.endswith("/v1/messages") or path == "/messages":
        return ANTHROPIC_MESSAGES
    return None


def _openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "insufficient_quota"
    return "invalid_request_error"


# Anthropic's error types by HTTP status (its API documentation's list of errors).
_ANTHROPIC_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def _anthropic_error_type(status: int) -> str:
    if status >= 500:
        return "api_error"
    return _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error")
