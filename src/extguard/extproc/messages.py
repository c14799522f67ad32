"""Builders for ext_proc ProcessingResponse messages, in Envoy's own vocabulary."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3 import http_status_pb2

ProcessingMode = processing_mode_pb2.ProcessingMode
BUFFERED = ProcessingMode.BUFFERED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE
SKIP = ProcessingMode.SKIP

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# The response message type that replies to each request message type.
_REPLY_TYPES = {
    "request_headers": ext_proc.HeadersResponse,
    "response_headers": ext_proc.HeadersResponse,
    "request_body": ext_proc.BodyResponse,
    "response_body": ext_proc.BodyResponse,
    "request_trailers": ext_proc.TrailersResponse,
    "response_trailers": ext_proc.TrailersResponse,
}
REQUEST_KINDS = tuple(_REPLY_TYPES)


def header_map(headers: ext_proc.HttpHeaders) -> dict[str, str]:
    """Return the headers as a dict of lower-case names; values come from `raw_value`."""
    result: dict[str, str] = {}
    for header in headers.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        result[header.key.lower()] = value
    return result


def header_mutation(
    set_headers: dict[str, str] | None = None, remove: list[str] | None = None
) -> ext_proc.HeaderMutation:
    options = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)
        for key, value in (set_headers or {}).items()
    ]
    return ext_proc.HeaderMutation(set_headers=options, remove_headers=remove or [])


def continue_reply(kind: str, mode_override: ProcessingMode | None = None) -> ext_proc.ProcessingResponse:
    """Let the message through unchanged."""
    response = ext_proc.ProcessingResponse(**{kind: _REPLY_TYPES[kind]()})
    if mode_override is not None:
        response.mode_override.CopyFrom(mode_override)
    return response


def common_reply(
    kind: str,
    *,
    body: bytes | None = None,
    headers: ext_proc.HeaderMutation | None = None,
    mode_override: ProcessingMode | None = None,
) -> ext_proc.ProcessingResponse:
    """Continue with a replaced body and/or changed headers (headers and body messages only)."""
    common = ext_proc.CommonResponse()
    if body is not None:
        common.body_mutation.body = body
    if headers is not None:
        common.header_mutation.CopyFrom(headers)
    response = ext_proc.ProcessingResponse(**{kind: _REPLY_TYPES[kind](response=common)})
    if mode_override is not None:
        response.mode_override.CopyFrom(mode_override)
    return response


def immediate_reply(status: int, body: bytes, details: str, headers: dict[str, str]) -> ext_proc.ProcessingResponse:
    """Respond to the client directly with `status` and `body`; nothing more goes upstream."""
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=details,
        )
    )
