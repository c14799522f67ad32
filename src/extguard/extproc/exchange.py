"""The state of one HTTP request as it passes through Envoy's ext_proc filter.

Envoy opens one Process stream per HTTP request and sends, in order, request_headers,
request_body, (request_trailers), response_headers, response_body chunks, (response_trailers).
`Exchange.handle` returns exactly one ProcessingResponse for every message.

Processing modes. The shipped Envoy configs buffer request bodies (BUFFERED) and, by default,
response bodies too. At response_headers the exchange picks the response body mode with a
`mode_override` (the filter must set `allow_mode_override: true`):
- `text/event-stream` of a known API: STREAMED, rewritten event by event (`llm.streams`);
- JSON of a known API: BUFFERED, so a blocked response can still become a proper HTTP error;
- anything else: NONE, so the body never reaches extguard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extguard.config.loader import PolicySet, ResolvedPolicy
from extguard.config.policy import FailureMode, OnBadInput
from extguard.extproc import messages
from extguard.llm.apis import (
    ERROR_CODE_BAD_INPUT,
    ERROR_CODE_BLOCKED,
    ERROR_CODE_INTERNAL,
    OPENAI_CHAT,
    Api,
    ApiKind,
    BEDROCK_CONVERSE,
    api_for_path,
    response_api_for_document,
    response_api_for_stream,
)
from extguard.llm.payloads import TextSlot
from extguard.llm.streams import StreamRewriter, stream_rewriter_for
from extguard.scan.deep import DeepEngineError, DeepEngineTimeout
from extguard.scan.deep_detector import DeepDetector, is_deep
from extguard.authz.service import TENANT_HEADER, USER_HEADER
from extguard.budget.keeper import BudgetKeeper
from extguard.budget.meter import Meter
from extguard.llm.usage import ReportedUsage, usage_from_document
from extguard.scan.engine import Hit, ScanRule, guard_text
from extguard.scan.findings import Finding
from extguard.scan.redact import Masker, PseudonymVault
from extguard.scan.stream import StreamGuard
from extguard.telemetry.logs import audit, bind_request
from extguard.telemetry.metrics import Metrics
from extguard.telemetry.request_trace import GuardStage, RequestTrace
from extguard.telemetry.tracing import SPAN_COMMIT, SPAN_RESERVE

from opentelemetry.trace import NoOpTracer, Tracer

log = logging.getLogger("extguard.extproc")

# Content codings extguard can decode for scanning. Others are removed from `accept-encoding`
# on the way upstream, so a provider never responds in a coding extguard cannot read.
DECODABLE_ENCODINGS = ("gzip", "x-gzip", "deflate")
# Bedrock's binary framing of ConverseStream and InvokeModelWithResponseStream responses.
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"
# Bodies from this size on are scanned in a worker thread: a 64 KiB prompt of log lines takes
# about 20 ms to scan, a typical chat request well under 1 ms (benchmarks/scan_bench.py).
THREAD_SCAN_MIN_BYTES = 64 * 1024
_ACCEPT_ENCODING = "gzip, deflate"

_SKIP_RESPONSE = messages.ProcessingMode(
    request_body_mode=messages.NONE, response_header_mode=messages.SKIP, response_body_mode=messages.NONE
)
_RESPONSE_STREAMED = messages.ProcessingMode(response_body_mode=messages.STREAMED)
_RESPONSE_BUFFERED = messages.ProcessingMode(response_body_mode=messages.BUFFERED)
_RESPONSE_NONE = messages.ProcessingMode(response_body_mode=messages.NONE)

_JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Runtime:
    """State shared by all exchanges: the policies, the masker, metrics and tracer. Immutable."""

    policies: PolicySet
    masker: Masker
    metrics: Metrics
    budgets: BudgetKeeper | None = None  # None: the policy has no tenancy section
    tracer: Tracer = field(default_factory=NoOpTracer)
    tracer_provider: Any = None  # flushed and shut down with the server; None when tracing is off


class DeepScanFailed(Exception):
    """A deep engine failed under a fail-closed policy; the request ends with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadInput(Exception):
    """A body extguard cannot read; `kind` is the metric label (malformed_json, invalid_utf8, ...)."""

    def __init__(self, kind: str, status: int = 400) -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status


class Exchange:
    """One HTTP request and its response; created per Process stream, never shared."""

    def __init__(self, runtime: Runtime, grpc_metadata: Any = None) -> None:
        self.runtime = runtime
        self.trace = RequestTrace(runtime.tracer, grpc_metadata)
        self.response_stage: GuardStage | None = None
        self.request_id = "-"
        self.path = ""
        self.api: Api | None = None
        self.policy: ResolvedPolicy = runtime.policies.default
        self.model: str | None = None
        self.vault: PseudonymVault | None = None
        self.request_body_mode = messages.BUFFERED
        self.response_body_mode = messages.BUFFERED
        self.request_content_encoding = ""
        self.response_content_encoding = ""
        self.response_kind = ""  # "sse", "eventstream" (Bedrock), "json" or "" (not inspected)
        self.rewriter: StreamRewriter | None = None  # made once the stream's first event shows its format
        self.stream_head = bytearray()  # the start of a stream, held until its format is known
        self.decompressor: Any = None
        self.request_buffer = bytearray()  # body chunks held when Envoy streams the body
        self.response_buffer = bytearray()
        self.logged_problems: set[str] = set()
        self.finished = False  # an ImmediateResponse was sent; Envoy sends nothing more
        self.meter: Meter | None = None  # set when the policy has budgets and a tenant is known
        self.reported = ReportedUsage()  # usage in a JSON response
        self.usage_recorded = False  # tokens of an unmetered request went to the metrics
        self.stream_scan_seconds = 0.0  # time spent guarding a streamed response so far
        self.output_chars = 0  # chars of a JSON response's text, to estimate output without usage

    # -- dispatch ------------------------------------------------------------------------------

    async def handle(self, request: ext_proc.ProcessingRequest) -> ext_proc.ProcessingResponse:
        """Return the one reply to `request`. Handler errors become the failure-mode reply."""
        if request.HasField("protocol_config"):
            self.request_body_mode = request.protocol_config.request_body_mode or self.request_body_mode
            self.response_body_mode = request.protocol_config.response_body_mode or self.response_body_mode

        kind = request.WhichOneof("request")
        if kind is None:
            self._problem("unexpected_message", "pass")
            return ext_proc.ProcessingResponse()
        try:
            if kind in _ASYNC_KINDS:
                return await _HANDLERS[kind](self, getattr(request, kind))
            return _HANDLERS[kind](self, getattr(request, kind))
        except Exception as error:
            return self._internal_error(kind, error)

    def _internal_error(self, kind: str, error: Exception) -> ext_proc.ProcessingResponse:
        mode = self.policy.settings.failure_mode
        self.runtime.metrics.internal_errors.labels(kind, mode.value).inc()
        self.runtime.metrics.failure_mode_activations.labels(kind, mode.value).inc()
        # The exception's message may quote payload text, so only its type and place are logged.
        frames = traceback.extract_tb(error.__traceback__)
        place = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown"
        log.error(
            "internal error %s at %s while handling %s (request %s); failure mode %s",
            type(error).__name__, place, kind, self.request_id, mode.value,
        )
        if mode is FailureMode.OPEN:
            return messages.continue_reply(kind)
        message = "extguard could not inspect this request, so it was stopped. Try again later."
        if kind == "response_body" and self.response_kind in ("sse", "eventstream"):
            # The error goes into the stream, in the stream's own format once that is known.
            api = self.rewriter.api if self.rewriter is not None else self._api()
            return messages.common_reply(kind, body=api.stream_error_event(500, message, ERROR_CODE_INTERNAL))
        return self._error_reply(500, message, ERROR_CODE_INTERNAL, "extguard_internal_error")

    # -- request -------------------------------------------------------------------------------

    def on_request_headers(self, headers: ext_proc.HttpHeaders) -> ext_proc.ProcessingResponse:
        values = messages.header_map(headers)
        self.request_id = values.get("x-request-id", "-")
        self.path = values.get(":path", "")
        self.trace.begin(values, self.request_id, self.path)
        bind_request(self.request_id, self.trace.trace_id)
        self.api = api_for_path(self.path)
        self.policy = self.runtime.policies.select(self.path, None)
        self.request_content_encoding = values.get("content-encoding", "").strip().lower()

        if self.api is None:
            if self.policy.settings.block_unrecognized_paths:
                path = self.path.split("?", 1)[0]
                message = f"The path {path!r} is not an LLM API that this gateway serves."
                return self._error_reply(404, message, "extguard_unknown_path", "extguard_unknown_path")
            return messages.continue_reply("request_headers", _SKIP_RESPONSE)

        if headers.end_of_stream and values.get(":method") == "POST":
            return self._bad_request_body(BadInput("empty_body"), b"", "request_headers")

        budgets = self.runtime.budgets
        if budgets is not None:
            tenant = values.get(TENANT_HEADER, "")
            if tenant not in budgets.tenancy.tenants:
                # ext_authz sets the header and removes client copies; without it nothing is metered.
                message = "No tenant identity reached the gateway's budget stage. Check the ext_authz filter."
                return self._error_reply(401, message, "extguard_unknown_tenant", "extguard_no_tenant")
            self.meter = Meter(budgets, tenant, values.get(USER_HEADER) or None, self.request_id)

        accept = values.get("accept-encoding")
        if accept is not None and not _only_decodable(accept):
            mutation = messages.header_mutation({"accept-encoding": _ACCEPT_ENCODING})
            return messages.common_reply("request_headers", headers=mutation)
        return messages.continue_reply("request_headers")

    async def on_request_body(self, body: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        if self.api is None:
            return messages.continue_reply("request_body")
        if self.request_body_mode == messages.STREAMED and not body.end_of_stream:
            # Only the complete body can be parsed: hold each chunk back and send it all at the end.
            self.request_buffer += body.body
            return messages.common_reply("request_body", body=b"")
        raw = bytes(self.request_buffer) + body.body if self.request_buffer else body.body
        self.request_buffer.clear()

        try:
            payload = self._parse_json(raw, self.request_content_encoding)
        except BadInput as error:
            return self._bad_request_body(error, raw)

        model = payload.get("model")
        self.model = model if isinstance(model, str) else None
        self.policy = self.runtime.policies.select(self.path, self.model)
        if self.policy.uses_pseudonyms:
            self.vault = PseudonymVault()
        self.trace.note_request(
            operation="chat", provider=_provider_name(self._api(), self.path), model=self.model,
            max_tokens=_max_tokens(payload), tenant=self.meter.tenant if self.meter is not None else None,
        )  # fmt: skip

        slots = self._api().request_slots(payload)
        stage = self.trace.request_stage()
        try:
            known = await self._deep_findings(slots, self._request_rules, "request")
        except DeepScanFailed as failure:
            stage.finish(blocked=True, policy=self.policy.name)
            return self._error_reply(failure.status, failure.message, ERROR_CODE_INTERNAL, "extguard_deep_scan_failed")
        hits, blocking, changed = await self._guard_slots_off_loop(slots, "request", known, len(raw))
        stage.add_hits(hits)
        self._count_verdict("request", stage, stage.finish(blocked=bool(blocking), policy=self.policy.name))
        self._record_hits("request", hits)
        if blocking:
            return self._block_request(blocking)
        if self.meter is not None:
            rejected = await self._reserve(payload, slots)
            if rejected is not None:
                return rejected
        if not changed:
            return messages.continue_reply("request_body")
        return self._replace_request_body(payload)

    async def _reserve(self, payload: dict[str, Any], slots: list[TextSlot]) -> ext_proc.ProcessingResponse | None:
        """Check the model and reserve the request's estimate; return the rejection, or None to go on."""
        meter = self.meter
        assert meter is not None
        if not meter.model_allowed(self.model):
            message = f"Tenant {meter.tenant!r} may not call model {self.model!r}."
            return self._error_reply(403, message, "extguard_model_not_allowed", "extguard_model_not_allowed")
        span = self.trace.budget_span(SPAN_RESERVE)
        admission = await meter.reserve(self.model, payload, sum(len(slot.text) for slot in slots))
        span.set_attribute("extguard.budget.state", admission.state)
        span.end()
        self.trace.note_budget(admission.state)
        if admission.admitted:
            return None
        audit(
            "budget_refused", stage="reserve", status=admission.status, code=admission.code,
            tenant=meter.tenant, user=meter.user, route=self.policy.name, model=self.model,
        )  # fmt: skip
        headers = {"retry-after": str(admission.retry_after_s)} if admission.retry_after_s is not None else {}
        return self._error_reply(admission.status, admission.message, admission.code, admission.code, headers)

    async def settle(self) -> None:
        """Commit the request's usage to its budgets, once; without a meter, only record it."""
        reported = self.rewriter.usage if self.rewriter is not None else self.reported
        output_chars = self.rewriter.text_chars if self.rewriter is not None else self.output_chars
        self.trace.note_response(model=reported.model, finish_reasons=reported.finish_reasons)
        if self.meter is None or not self.meter.reserved or self.meter.settled:
            if self.meter is None and not self.usage_recorded:
                self.usage_recorded = True
                self.trace.note_response(
                    input_tokens=reported.input_tokens, output_tokens=reported.output_tokens,
                    cached_input_tokens=reported.cached_input_tokens if reported.input_tokens is not None else None,
                )  # fmt: skip
                self._count_tokens("", reported.input_tokens, reported.output_tokens, None)
            return
        span = self.trace.budget_span(SPAN_COMMIT)
        committed = await self.meter.settle(reported, output_chars)
        span.set_attributes({
            "gen_ai.usage.input_tokens": committed.usage.input_tokens,
            "gen_ai.usage.output_tokens": committed.usage.output_tokens,
            "extguard.cost_usd": committed.cost_usd,
        })  # fmt: skip
        span.end()
        self.trace.note_response(
            input_tokens=committed.usage.input_tokens, output_tokens=committed.usage.output_tokens,
            cached_input_tokens=committed.usage.cached_input_tokens, cost_usd=committed.cost_usd,
        )  # fmt: skip
        self._count_tokens(self.meter.tenant, committed.usage.input_tokens, committed.usage.output_tokens, committed.cost_usd)

    def _count_tokens(self, tenant: str, input_tokens: int | None, output_tokens: int | None, cost_usd: float | None) -> None:
        """Record the request's tokens (and cost) in gen_ai_client_token_usage and extguard_cost_usd."""
        metrics = self.runtime.metrics
        labels = (metrics.tenant(tenant), metrics.model(self.model))
        context = (_provider_name(self._api(), self.path), "chat")
        for token_type, tokens in (("input", input_tokens), ("output", output_tokens)):
            if tokens is not None:
                metrics.child(metrics.token_usage, *labels, token_type, *context).observe(tokens)
        if cost_usd:
            metrics.child(metrics.cost, *labels).inc(cost_usd)

    def abandon(self) -> None:
        """Settle in the background when the stream ended early (client gone, reset, error)."""
        if self.meter is None or not self.meter.reserved or self.meter.settled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.error("request %s: usage could not be committed, because no event loop runs", self.request_id)
            return
        task = loop.create_task(self.settle())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def _request_rules(self, slot: TextSlot) -> tuple[ScanRule, ...]:
        # The system prompt is the application's own text, and end-user ids are not prose: both
        # are scanned for PII and secrets, but not for prompt injection.
        if slot.role in ("system", "developer", "metadata"):
            return tuple(rule for rule in self.policy.request_rules if _family(rule.detector) != "injection")
        return self.policy.request_rules

    def _response_rules(self, slot: TextSlot) -> tuple[ScanRule, ...]:
        return self.policy.response_rules

    async def _deep_findings(
        self, slots: list[TextSlot], rules_of: Callable[[TextSlot], tuple[ScanRule, ...]], direction: str
    ) -> list[dict[int, list[Finding]]]:
        """Run the deep engines that each slot's rules name, concurrently; return known findings per slot.

        A failed or timed-out engine follows the policy's failure mode: open drops its findings,
        closed raises DeepScanFailed.
        """
        known: list[dict[int, list[Finding]]] = [{} for _ in slots]
        if not self.policy.uses_deep_engines:
            return known
        jobs: list[tuple[int, DeepDetector]] = []
        for index, slot in enumerate(slots):
            engines = {id(rule.detector): rule.detector for rule in rules_of(slot) if is_deep(rule.detector)}
            jobs.extend((index, engine) for engine in engines.values())  # type: ignore[misc]
        if not jobs:
            return known

        started = time.perf_counter()
        results = await asyncio.gather(*(engine.analyze(slots[index].text) for index, engine in jobs), return_exceptions=True)
        for engine_name in {engine.name for _, engine in jobs}:
            self.runtime.metrics.scan_duration.labels(direction, engine_name).observe(time.perf_counter() - started)
        for (index, engine), result in zip(jobs, results, strict=True):
            if isinstance(result, DeepEngineError):
                self._deep_engine_failed(engine, result)
                result = []
            elif isinstance(result, BaseException):
                raise result
            known[index][id(engine)] = result
        return known

    def _deep_engine_failed(self, engine: DeepDetector, error: DeepEngineError) -> None:
        timed_out = isinstance(error, DeepEngineTimeout)
        mode = self.policy.settings.failure_mode
        self.runtime.metrics.deep_engine_failures.labels(engine.name, "timeout" if timed_out else "error", mode.value).inc()
        self.runtime.metrics.failure_mode_activations.labels(f"deep_engine_{engine.name}", mode.value).inc()
        log.warning("request %s: deep engine %s %s; failure mode %s", self.request_id, engine.name,
                    "timed out" if timed_out else f"failed ({type(error).__name__})", mode.value)
        if mode is FailureMode.CLOSED:
            what = "did not finish in time" if timed_out else "failed"
            # 504 and 500: the local bootstrap maps only the 503 and 504 replies that Envoy itself makes.
            raise DeepScanFailed(504 if timed_out else 500, f"extguard's {engine.name} scan {what}, so the request was stopped. Try again later.")

    def _replace_request_body(self, payload: dict[str, Any]) -> ext_proc.ProcessingResponse:
        new_body = _dump_json(payload)
        if self.request_body_mode == messages.BUFFERED:
            remove = ["content-encoding"] if self.request_content_encoding else []
            mutation = messages.header_mutation({"content-length": str(len(new_body))}, remove)
            return messages.common_reply("request_body", body=new_body, headers=mutation)
        return messages.common_reply("request_body", body=new_body)

    def _block_request(self, blocking: list[Hit]) -> ext_proc.ProcessingResponse:
        self.runtime.metrics.blocked.labels("request", self.policy.name).inc()
        message = f"Request blocked by extguard policy {self.policy.name!r}: {_describe(blocking)}."
        log.info("request %s blocked by policy %s: %s", self.request_id, self.policy.name, _describe(blocking))
        return self._error_reply(400, message + " Remove that content and try again.", ERROR_CODE_BLOCKED, "extguard_blocked")

    def _bad_request_body(self, error: BadInput, raw: bytes, kind: str = "request_body") -> ext_proc.ProcessingResponse:
        if self.policy.settings.on_bad_input is OnBadInput.PASS:
            self._problem(error.kind, "pass")
            return messages.continue_reply(kind)
        self._problem(error.kind, "reject")
        message = _bad_input_message(error.kind, len(raw), self.policy.settings.max_body_bytes)
        return self._error_reply(error.status, message, ERROR_CODE_BAD_INPUT, f"extguard_{error.kind}")

    # -- response ------------------------------------------------------------------------------

    def on_response_headers(self, headers: ext_proc.HttpHeaders) -> ext_proc.ProcessingResponse:
        if self.api is None:
            return messages.continue_reply("response_headers", _RESPONSE_NONE)
        values = messages.header_map(headers)
        content_type = values.get("content-type", "").split(";", 1)[0].strip().lower()
        encoding = values.get("content-encoding", "").strip().lower()
        # A metered request is read too, for the usage the provider reports.
        guarded = bool(self.policy.response_rules) or bool(self.vault) or self.meter is not None
        status = values.get(":status", "200")
        self.trace.note_response(status=int(status) if status.isdigit() else None)
        if self.meter is not None and status[:1] in ("4", "5"):
            self.meter.upstream_failed = True

        if content_type == "text/event-stream":
            self.response_kind = "sse"
        elif content_type == EVENT_STREAM_TYPE:
            self.response_kind = "eventstream"
        elif content_type == "application/json" or content_type.endswith("+json"):
            self.response_kind = "json"
        if not guarded or not self.response_kind:
            self.response_kind = ""
            self.abandon()  # the body is not read, so settle now with estimates
            return messages.continue_reply("response_headers", _RESPONSE_NONE)

        if encoding and encoding != "identity" and encoding not in DECODABLE_ENCODINGS:
            message = f"The upstream responded with content-encoding {encoding!r}, which extguard cannot inspect."
            return self._uninspectable_response("unsupported_encoding", message)
        self.response_stage = self.trace.begin_response_stage()
        self.response_content_encoding = "" if encoding == "identity" else encoding
        if self.response_kind == "json":
            self.response_body_mode = messages.BUFFERED
            return messages.continue_reply("response_headers", _RESPONSE_BUFFERED)

        self.response_body_mode = messages.STREAMED
        if self.response_kind == "eventstream":
            self._start_stream(BEDROCK_CONVERSE)  # one framing for both Bedrock stream APIs
        remove = ["content-length"]
        if self.response_content_encoding:
            # The stream is decoded for scanning and sent on as identity.
            self.decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32)
            remove.append("content-encoding")
        mutation = messages.header_mutation(remove=remove)
        return messages.common_reply("response_headers", headers=mutation, mode_override=_RESPONSE_STREAMED)

    def _new_rewriter(self, api: Api) -> StreamRewriter:
        rules = self.policy.stream_rules
        masker = self.runtime.masker
        vault = self.vault

        def make_guard() -> StreamGuard:
            return StreamGuard(rules, masker, vault, restore_pseudonyms=bool(vault))

        def block_message(blocking: list[Hit]) -> str:
            return self._block_response_message(blocking)

        pass_bad = self.policy.settings.on_bad_input is OnBadInput.PASS
        return stream_rewriter_for(api, make_guard, block_message, pass_bad_events=pass_bad)

    def _uninspectable_response(self, kind: str, message: str) -> ext_proc.ProcessingResponse:
        """Refuse a response extguard cannot read, or pass it unread when on_bad_input is pass."""
        self.response_kind = ""
        if self.policy.settings.on_bad_input is OnBadInput.PASS:
            self._problem(kind, "pass")
            return messages.continue_reply("response_headers", _RESPONSE_NONE)
        self._problem(kind, "reject")
        return self._error_reply(502, message, ERROR_CODE_BAD_INPUT, f"extguard_{kind}")

    async def on_response_body(self, body: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        if self.response_kind in ("sse", "eventstream"):
            reply = self._stream_chunk(body)
            if body.end_of_stream:
                await self.settle()
            return reply
        if self.response_kind == "json":
            return await self._json_response(body)
        return messages.continue_reply("response_body")

    def _stream_chunk(self, body: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        if self.rewriter is not None and self.rewriter.blocked:
            # The stream already ended with an error event; drop what the upstream still sends.
            self._finish_response_stage(self.rewriter.hits, blocked=True)
            return messages.common_reply("response_body", body=b"")
        chunk = body.body
        if self.decompressor is not None:
            chunk = self._decompress_stream_chunk(chunk)
        if chunk is None:
            rewriter = self.rewriter or self._start_stream(self._api())
            rewriter.blocked = True
            message = "extguard could not decode the upstream response stream, so it was stopped."
            return messages.common_reply("response_body", body=rewriter.api.stream_error_event(502, message, ERROR_CODE_BAD_INPUT))
        if self.rewriter is None:
            # The first event shows the stream's format, which behind a translating gateway can be
            # the provider's native one. Until it is complete, nothing goes downstream.
            self.stream_head += chunk
            api = response_api_for_stream(bytes(self.stream_head), self._api())
            if api is None and not body.end_of_stream:
                return messages.common_reply("response_body", body=b"")
            chunk = bytes(self.stream_head)
            self.stream_head.clear()
            self._start_stream(api or self._api())
        rewriter = self.rewriter
        assert rewriter is not None

        started = time.perf_counter()
        output = rewriter.feed(chunk)
        self.stream_scan_seconds += time.perf_counter() - started
        if body.end_of_stream:
            output += rewriter.finish()
            self._finish_stream(rewriter)
        elif rewriter.blocked:
            self._finish_response_stage(rewriter.hits, blocked=True)
        for kind in rewriter.problems:
            self._problem(kind, "pass" if self.policy.settings.on_bad_input is OnBadInput.PASS else "reject")
        rewriter.problems.clear()

        if output == body.body:
            return messages.continue_reply("response_body")
        return messages.common_reply("response_body", body=output)

    def _start_stream(self, api: Api) -> StreamRewriter:
        self.rewriter = self._new_rewriter(api)
        return self.rewriter

    def _decompress_stream_chunk(self, chunk: bytes) -> bytes | None:
        limit = self.policy.settings.max_body_bytes
        try:
            output = self.decompressor.decompress(chunk, limit)
        except zlib.error:
            self._problem("corrupt_encoding", "reject")
            return None
        if self.decompressor.unconsumed_tail:
            self._problem("body_too_large", "reject")
            return None
        return output

    def _finish_stream(self, rewriter: StreamRewriter) -> None:
        self.runtime.metrics.stream_held_chars.observe(rewriter.max_held_chars)
        # A stream is scanned chunk by chunk with all its rules at once, so its time is one sum.
        self.runtime.metrics.scan_duration.labels("response_stream", "all").observe(self.stream_scan_seconds)
        self._record_hits("response", rewriter.hits)
        self._finish_response_stage(rewriter.hits, blocked=rewriter.blocked)

    def _finish_response_stage(self, hits: list[Hit], *, blocked: bool) -> None:
        """Record the response scan's verdict on its span and close it, once."""
        stage, self.response_stage = self.response_stage, None
        if stage is None:
            return
        stage.add_hits(hits)
        self._count_verdict("response", stage, stage.finish(blocked=blocked, policy=self.policy.name))

    def _count_verdict(self, direction: str, stage: GuardStage, verdict: str) -> None:
        """Count the verdict, and write an audit event when the scan found anything."""
        tenant = self.meter.tenant if self.meter is not None else ""
        metrics = self.runtime.metrics
        metrics.child(metrics.guard_decisions, direction, verdict, metrics.tenant(tenant)).inc()
        if not stage.entities:
            return
        audit(
            "guard_decision", direction=direction, verdict=verdict, tenant=tenant or None,
            user=self.meter.user if self.meter is not None else None, route=self.policy.name, model=self.model,
            rules=stage.rules, detectors=stage.detectors, entity_types=dict(sorted(stage.entities.items())),
        )  # fmt: skip

    async def _json_response(self, body: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        if self.response_body_mode == messages.STREAMED and not body.end_of_stream:
            self.response_buffer += body.body
            return messages.common_reply("response_body", body=b"")
        raw = bytes(self.response_buffer) + body.body if self.response_buffer else body.body
        self.response_buffer.clear()
        streamed = self.response_body_mode == messages.STREAMED

        try:
            payload = self._parse_json(raw, self.response_content_encoding)
        except BadInput as error:
            await self.settle()
            return self._bad_response_body(error, raw, streamed)

        api = response_api_for_document(payload, self._api())
        slots = api.response_slots(payload)
        usage_from_document(api, payload, self.reported)
        self.output_chars = sum(len(slot.text) for slot in slots)
        await self.settle()
        try:
            known = await self._deep_findings(slots, self._response_rules, "response")
        except DeepScanFailed as failure:
            self._finish_response_stage([], blocked=True)
            return self._error_reply(failure.status, failure.message, ERROR_CODE_INTERNAL, "extguard_deep_scan_failed")
        hits, blocking, changed = await self._guard_slots_off_loop(slots, "response", known, len(raw))
        self._finish_response_stage(hits, blocked=bool(blocking))
        self._record_hits("response", hits)
        if blocking:
            return self._error_reply(502, self._block_response_message(blocking), ERROR_CODE_BLOCKED, "extguard_blocked")
        if not changed:
            return messages.common_reply("response_body", body=raw) if streamed else messages.continue_reply("response_body")

        new_body = _dump_json(payload)
        if streamed:
            return messages.common_reply("response_body", body=new_body)
        remove = ["content-encoding"] if self.response_content_encoding else []
        mutation = messages.header_mutation({"content-length": str(len(new_body))}, remove)
        return messages.common_reply("response_body", body=new_body, headers=mutation)

    def _block_response_message(self, blocking: list[Hit]) -> str:
        self.runtime.metrics.blocked.labels("response", self.policy.name).inc()
        log.info("request %s response blocked by policy %s: %s", self.request_id, self.policy.name, _describe(blocking))
        return f"Response blocked by extguard policy {self.policy.name!r}: {_describe(blocking)}."

    def _bad_response_body(self, error: BadInput, raw: bytes, streamed: bool) -> ext_proc.ProcessingResponse:
        if self.policy.settings.on_bad_input is OnBadInput.PASS:
            self._problem(error.kind, "pass")
            return messages.common_reply("response_body", body=raw) if streamed else messages.continue_reply("response_body")
        self._problem(error.kind, "reject")
        detail = _bad_input_message(error.kind, len(raw), self.policy.settings.max_body_bytes)
        message = "The upstream response could not be inspected by extguard: " + detail
        return self._error_reply(502, message, ERROR_CODE_BAD_INPUT, f"extguard_{error.kind}")

    # -- trailers ------------------------------------------------------------------------------

    def on_request_trailers(self, trailers: ext_proc.HttpTrailers) -> ext_proc.ProcessingResponse:
        return messages.continue_reply("request_trailers")

    def on_response_trailers(self, trailers: ext_proc.HttpTrailers) -> ext_proc.ProcessingResponse:
        if self.rewriter is None and self.stream_head:
            self._start_stream(self._api()).feed(bytes(self.stream_head))
        if self.rewriter is not None and not self.rewriter.blocked:
            # Trailers end the body: anything still held back can no longer be sent, so it is
            # accounted as flushed. Envoy's STREAMED mode sends end_of_stream on the last chunk
            # unless trailers follow.
            self.rewriter.finish()
            self._finish_stream(self.rewriter)
        self.abandon()
        return messages.continue_reply("response_trailers")

    # -- shared steps --------------------------------------------------------------------------

    def _api(self) -> Api:
        return self.api or OPENAI_CHAT

    def _parse_json(self, raw: bytes, encoding: str) -> dict[str, Any]:
        limit = self.policy.settings.max_body_bytes
        if len(raw) > limit:
            raise BadInput("body_too_large", 413)
        if encoding:
            raw = _decompress(raw, limit)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("invalid_utf8") from None
        try:
            payload = json.loads(text)
        except ValueError:
            raise BadInput("malformed_json") from None
        if not isinstance(payload, dict):
            raise BadInput("malformed_json")
        return payload

    async def _guard_slots_off_loop(
        self, slots: list[TextSlot], direction: str, known: list[dict[int, list[Finding]]], body_bytes: int
    ) -> tuple[list[Hit], list[Hit], bool]:
        """Run `_guard_slots`, in a worker thread for bodies over `THREAD_SCAN_MIN_BYTES`.

        The scan holds the GIL for most of its time, so a thread does not make it faster. But
        the event loop gets the GIL back every few milliseconds, so it keeps serving the other
        streams instead of waiting seconds for a multi-MB body.
        """
        if body_bytes < THREAD_SCAN_MIN_BYTES:
            return self._guard_slots(slots, direction, known)
        return await asyncio.to_thread(self._guard_slots, slots, direction, known)

    def _guard_slots(
        self, slots: list[TextSlot], direction: str, known: list[dict[int, list[Finding]]]
    ) -> tuple[list[Hit], list[Hit], bool]:
        """Scan and mask every slot in place; return (hits, blocking hits, whether text changed).

        Requests mint pseudonyms into the exchange's vault; responses are masked with their own
        rules and then have the request's pseudonyms restored.
        """
        masker = self.runtime.masker
        hits: list[Hit] = []
        blocking: list[Hit] = []
        changed = False
        timings: dict[str, float] = {}
        for slot, known_findings in zip(slots, known, strict=True):
            text = slot.text
            if direction == "request":
                result = guard_text(text, self._request_rules(slot), masker, self.vault, known_findings, timings)
                new_text = result.text
            else:
                result = guard_text(text, self.policy.response_rules, masker, None, known_findings, timings)
                new_text = self.vault.restore(result.text) if self.vault else result.text
            hits.extend(result.hits)
            blocking.extend(result.blocking)
            if new_text != text:
                slot.set(new_text)
                changed = True
        for detector, seconds in timings.items():
            self.runtime.metrics.child(self.runtime.metrics.scan_duration, direction, detector).observe(seconds)
        return hits, blocking, changed

    def _record_hits(self, direction: str, hits: list[Hit]) -> None:
        if not hits:
            return
        counter = self.runtime.metrics.guard_hits
        for hit in hits:
            self.runtime.metrics.child(counter, direction, hit.rule.name, hit.rule.detector.name, hit.finding.entity_type, hit.rule.action.value).inc()
        if not log.isEnabledFor(logging.DEBUG):
            return
        summary = ", ".join(f"{name}={count}" for name, count in sorted(Counter(h.finding.entity_type for h in hits).items()))
        log.debug("request %s %s findings under policy %s: %s", self.request_id, direction, self.policy.name, summary)

    def _problem(self, kind: str, action: str) -> None:
        self.runtime.metrics.bad_input.labels(kind, action).inc()
        if kind not in self.logged_problems:
            self.logged_problems.add(kind)
            log.info("request %s: bad input %s on %s, action %s", self.request_id, kind, self.path.split("?", 1)[0], action)

    def _error_reply(
        self, status: int, message: str, code: str, details: str, headers: dict[str, str] | None = None
    ) -> ext_proc.ProcessingResponse:
        self.finished = True
        self.trace.note_response(status=status)  # what the client gets, not what the upstream sent
        body = self._api().error_body(status, message, code)
        return messages.immediate_reply(status, body, details, {**_JSON_HEADERS, **(headers or {})})


_ASYNC_KINDS = frozenset({"request_body", "response_body"})
# Settle tasks of exchanges that ended early, kept referenced until they finish.
_BACKGROUND: set[asyncio.Task[None]] = set()
_HANDLERS: dict[str, Callable[..., Any]] = {
    "request_headers": Exchange.on_request_headers,
    "request_body": Exchange.on_request_body,
    "request_trailers": Exchange.on_request_trailers,
    "response_headers": Exchange.on_response_headers,
    "response_body": Exchange.on_response_body,
    "response_trailers": Exchange.on_response_trailers,
}


def _provider_name(api: Api, path: str) -> str:
    """Return the GenAI provider name for the request, by API and path."""
    if api.kind is ApiKind.ANTHROPIC_MESSAGES:
        return "anthropic"
    return "azure.ai.openai" if path.startswith("/openai/deployments/") else "openai"


def _max_tokens(payload: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _family(detector: Any) -> str:
    """Return the detector family (pii, secrets, injection); deep engines name theirs."""
    return getattr(detector, "family", detector.name)


def _only_decodable(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding = item.split(";", 1)[0].strip().lower()
        if coding and coding not in ("identity", "*") and coding not in DECODABLE_ENCODINGS:
            return False
    return True


def _decompress(raw: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32)
    try:
        output = decompressor.decompress(raw, limit)
    except zlib.error:
        raise BadInput("corrupt_encoding") from None
    if decompressor.unconsumed_tail:
        raise BadInput("body_too_large", 413)
    return output


def _dump_json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _describe(hits: list[Hit]) -> str:
    counts = Counter(hit.finding.entity_type for hit in hits)
    listing = ", ".join(f"{name} ({count})" for name, count in sorted(counts.items()))
    return f"found {listing}"


def _bad_input_message(kind: str, size: int, limit: int) -> str:
    return {
        "empty_body": "The request body is empty; this API expects a JSON object.",
        "malformed_json": "The body is not a valid JSON object.",
        "invalid_utf8": "The body is not valid UTF-8.",
        "body_too_large": f"The body ({size} bytes, or more once decoded) is larger than extguard's limit of "
        f"{limit} bytes (max_body_bytes in the policy).",
        "corrupt_encoding": "The body's content-encoding could not be decoded.",
    }.get(kind, "The body could not be read.")
