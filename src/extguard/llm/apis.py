"""The LLM APIs extguard understands, recognized by request path, and their error formats.

Errors that extguard returns itself (a blocked prompt, an unreadable body) use the provider's
own error shape, so the official SDKs raise their usual exception classes with our message.

Requests are OpenAI Chat Completions or Anthropic Messages. Responses can also come in a
provider's native format: behind Envoy AI Gateway, which translates the response only after
extguard's filter has seen it, an OpenAI-format request to Anthropic on Vertex AI or Bedrock
gets an Anthropic Messages response, to Gemini a `generateContent` response, and to Bedrock's
Converse API a Converse response. `response_api_for_document` and `response_api_for_stream`
recognize those by their shape.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extguard.llm import payloads
from extguard.llm.eventstream import encode_message
from extguard.llm.sse import SseDecodeError, SseDecoder

ERROR_CODE_BLOCKED = "extguard_policy_violation"
ERROR_CODE_BAD_INPUT = "extguard_invalid_body"
ERROR_CODE_INTERNAL = "extguard_unavailable"


class ApiKind(enum.StrEnum):
    OPENAI_CHAT = "openai.chat_completions"
    ANTHROPIC_MESSAGES = "anthropic.messages"
    # Seen only as responses, behind a gateway that translates them for the client.
    GEMINI_GENERATE_CONTENT = "gemini.generate_content"
    BEDROCK_CONVERSE = "bedrock.converse"


@dataclass(frozen=True, slots=True)
class Api:
    kind: ApiKind
    provider: str  # as in gen_ai.provider.name: openai, anthropic, gcp.gemini, aws.bedrock
    request_slots: Callable[[dict[str, Any]], list[payloads.TextSlot]]
    response_slots: Callable[[dict[str, Any]], list[payloads.TextSlot]]

    def error_document(self, status: int, message: str, code: str) -> dict[str, Any]:
        """Return the error object this provider sends for an HTTP error of `status`."""
        if self.kind is ApiKind.ANTHROPIC_MESSAGES:
            return {"type": "error", "error": {"type": _anthropic_error_type(status), "message": message}}
        if self.kind is ApiKind.GEMINI_GENERATE_CONTENT:
            return {"error": {"code": status, "message": message, "status": _google_status(status)}}
        if self.kind is ApiKind.BEDROCK_CONVERSE:
            return {"message": message}
        return {"error": {"message": message, "type": _openai_error_type(status), "param": None, "code": code}}

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """Return an error body in this provider's format for an HTTP error of `status`."""
        return _dumps(self.error_document(status, message, code)).encode("utf-8")

    def stream_error_event(self, status: int, message: str, code: str) -> bytes:
        """Return one stream event that makes this provider's SDK raise an error mid-stream.

        An SSE event, or for Bedrock an event stream message of type exception.

        `status` is the HTTP status the error would have had before streaming began; it picks
        the error type, as in `error_body`.
        """
        data = _dumps(self.error_document(status, message, code))
        if self.kind is ApiKind.BEDROCK_CONVERSE:
            # An event stream message of type exception, which the AWS SDKs raise.
            exception = "internalServerException" if status >= 500 else "validationException"
            headers = {":message-type": "exception", ":exception-type": exception, ":content-type": "application/json"}
            return encode_message(headers, data.encode("utf-8"))
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
GEMINI_GENERATE_CONTENT = Api(
    ApiKind.GEMINI_GENERATE_CONTENT, "gcp.gemini", payloads.no_request_slots, payloads.gemini_response_slots
)
BEDROCK_CONVERSE = Api(
    ApiKind.BEDROCK_CONVERSE, "aws.bedrock", payloads.no_request_slots, payloads.bedrock_converse_response_slots
)

# Bytes of a stream's start that decide its format; the first event is far shorter.
STREAM_SNIFF_BYTES = 65536


def response_api_for_document(document: Any, request_api: Api) -> Api:
    """Return the API whose response format `document` (a parsed JSON response) has.

    A response in the request's own format, an error object or anything unrecognized is read as
    `request_api`.
    """
    if not isinstance(document, dict) or "choices" in document:
        return request_api
    if document.get("type") == "message" and isinstance(document.get("content"), list):
        return ANTHROPIC_MESSAGES
    if isinstance(document.get("candidates"), list):
        return GEMINI_GENERATE_CONTENT
    output = document.get("output")
    if isinstance(output, dict) and isinstance(output.get("message"), dict):
        return BEDROCK_CONVERSE
    return request_api


def response_api_for_stream(head: bytes, request_api: Api) -> Api | None:
    """Return the API whose SSE format the stream starting with `head` has, by its first event.

    None means undecided: `head` contains no complete event yet (comments do not count) and is
    shorter than STREAM_SNIFF_BYTES. An invalid or unrecognized first event is read as
    `request_api`, whose rewriter then handles it as bad input.
    """
    try:
        events = [event for event in SseDecoder().feed(head) if not event.is_comment]
    except SseDecodeError:
        return request_api
    if not events:
        return None if len(head) < STREAM_SNIFF_BYTES else request_api
    first = events[0]
    if first.event == "message_start":
        return ANTHROPIC_MESSAGES
    try:
        document = json.loads(first.data)
    except ValueError:
        return request_api
    if not isinstance(document, dict):
        return request_api
    if "choices" in document:
        return OPENAI_CHAT
    if document.get("type") == "message_start":
        return ANTHROPIC_MESSAGES
    if isinstance(document.get("candidates"), list):
        return GEMINI_GENERATE_CONTENT
    return request_api


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


# Google's canonical error codes by HTTP status, as the Gemini API reports them.
_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _google_status(status: int) -> str:
    return _GOOGLE_STATUSES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
