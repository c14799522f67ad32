"""The record of one LLM request: spans, and facts for Envoy's dynamic metadata.

One `RequestTrace` lives as long as an ext_proc stream. It opens the `extguard.ext_proc` span
when the request headers arrive and a `run_guardrail llm_input` span around the request scan.
A `run_guardrail llm_output` span covers the response scan, from the first response byte to the
last for a stream, and budget spans cover the reservation and the commit. The same facts go
into `facts`, which the service sends to Envoy as dynamic metadata under the `extguard`
namespace, so Envoy's own span (custom tags) and access log show them without extguard's spans.

Facts and attributes are tenant names, models, token counts, costs, rule and entity type names
and counts: never request or response text, nor matched values.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, Tracer

from extguard.telemetry.tracing import (
    SPAN_COMMIT,
    SPAN_EXTPROC,
    SPAN_GUARD_REQUEST,
    SPAN_GUARD_RESPONSE,
    SPAN_RESERVE,
    parent_context,
    set_attributes,
)

METADATA_NAMESPACE = "extguard"
GUARDRAIL_NAME = "extguard"
# Draft GenAI security conventions: what was checked, the verdict, and what extguard enforced.
TARGET_INPUT = "llm_input"
TARGET_OUTPUT = "llm_output"
# Rule actions in the draft convention's words: a masked value is redacted; `log` only records.
_ACTIONS = {"mask": "redact", "block": "block", "log": "allow"}


class RequestTrace:
    """Spans and facts of one request. Not thread-safe; one per ext_proc stream."""

    def __init__(self, tracer: Tracer, grpc_metadata: Iterable[tuple[str, Any]] | None) -> None:
        self._tracer = tracer
        self._grpc_metadata = list(grpc_metadata or ())
        self._span: trace.Span | None = None
        self._response_span: trace.Span | None = None
        self._context: Any = None
        self.facts: dict[str, Any] = {}
        self._sent: dict[str, Any] = {}
        self._trace_id = ""

    # -- the request span ----------------------------------------------------------------------

    def begin(self, http_headers: Mapping[str, str], request_id: str, path: str) -> None:
        """Open the request span, continuing Envoy's trace (or the client's)."""
        client_traceparent = http_headers.get("traceparent")
        if isinstance(self._tracer, NoOpTracer):
            # Tracing is off: no spans, but log lines still get the trace id Envoy or the client sent.
            self._trace_id = _trace_id_of(dict(self._grpc_metadata).get("traceparent")) or _trace_id_of(client_traceparent)
            return
        parent = parent_context(self._grpc_metadata, {"traceparent": client_traceparent} if client_traceparent else None)
        self._span = self._tracer.start_span(SPAN_EXTPROC, context=parent, kind=SpanKind.SERVER)
        self._context = trace.set_span_in_context(self._span, parent)
        set_attributes(self._span, {"extguard.request_id": request_id, "url.path": path.split("?", 1)[0]})
        context = self._span.get_span_context()
        self._trace_id = format(context.trace_id, "032x") if context.is_valid else ""

    @property
    def trace_id(self) -> str:
        """The trace id in hex, or "" when none is known."""
        return self._trace_id

    def note_request(self, *, operation: str, provider: str, model: str | None, max_tokens: int | None, tenant: str | None) -> None:
        """Record the request's GenAI operation, provider, model and output cap."""
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "extguard.tenant": tenant,
        }
        self._set(attributes)
        self.facts.update({"operation": operation, "provider": provider, "model": model, "tenant": tenant})

    def note_response(
        self,
        *,
        status: int | None = None,
        model: str | None = None,
        finish_reasons: list[str] | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cached_input_tokens: int | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """Record the response facts known so far; None leaves a fact as it was."""
        attributes = {
            "http.response.status_code": status,
            "gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": tuple(finish_reasons) if finish_reasons else None,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.usage.cache_read.input_tokens": cached_input_tokens,
            "extguard.cost_usd": cost_usd,
        }
        self._set(attributes)
        facts = {
            "response_status": status,
            "response_model": model,
            "finish_reasons": ",".join(finish_reasons) if finish_reasons else None,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_input_tokens": cached_input_tokens,
            "cost_usd": cost_usd,
        }
        self.facts.update({key: value for key, value in facts.items() if value is not None})

    def note_budget(self, state: str) -> None:
        """Record the budget decision: admitted, rejected, unchecked, or not_metered."""
        self._set({"extguard.budget.state": state})
        self.facts["budget"] = state

    def end(self, error: str | None = None) -> None:
        """Close the response stage (if open) and the request span."""
        self.end_response_stage()
        if self._span is None:
            return
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()
        self._span = None

    # -- guard stages --------------------------------------------------------------------------

    def request_stage(self) -> GuardStage:
        """Return the span of the request scan; call `finish` on it when the scan is done."""
        return GuardStage(self, self._child(SPAN_GUARD_REQUEST), TARGET_INPUT, "request")

    def begin_response_stage(self) -> GuardStage:
        """Open the span of the response scan, which ends with `end_response_stage`."""
        self._response_span = self._child(SPAN_GUARD_RESPONSE)
        return GuardStage(self, self._response_span, TARGET_OUTPUT, "response")

    def end_response_stage(self) -> None:
        """End the response scan's span unless its stage already finished it."""
        span, self._response_span = self._response_span, None
        if span is not None and span.is_recording():
            span.end()

    def budget_span(self, name: str) -> trace.Span:
        """Return a started child span for a budget step (SPAN_RESERVE or SPAN_COMMIT)."""
        assert name in (SPAN_RESERVE, SPAN_COMMIT)
        return self._child(name)

    # -- dynamic metadata ----------------------------------------------------------------------

    def take_metadata(self) -> struct_pb2.Struct | None:
        """Return the facts that changed since the last call, as Envoy dynamic metadata, or None."""
        changed = {key: value for key, value in self.facts.items() if value is not None and self._sent.get(key) != value}
        if not changed:
            return None
        self._sent.update(changed)
        metadata = struct_pb2.Struct()
        fields = metadata.fields[METADATA_NAMESPACE].struct_value.fields
        for key, value in changed.items():
            # Set each value directly: Struct.update walks every value generically and is slower.
            if isinstance(value, str):
                fields[key].string_value = value
            elif isinstance(value, bool):
                fields[key].bool_value = value
            else:
                fields[key].number_value = value
        return metadata

    # -- internals -----------------------------------------------------------------------------

    def _child(self, name: str) -> trace.Span:
        return self._tracer.start_span(name, context=self._context, kind=SpanKind.INTERNAL)

    def _set(self, attributes: Mapping[str, Any]) -> None:
        if self._span is not None:
            set_attributes(self._span, attributes)


class GuardStage:
    """One guard step: its span, and the decision it records on that span and in the facts."""

    def __init__(self, owner: RequestTrace, span: trace.Span, target: str, direction: str) -> None:
        self._owner = owner
        self._span = span
        self._target = target
        self._direction = direction
        self._started = time.perf_counter()
        self._findings: Counter[tuple[str, str, str, str]] = Counter()  # (rule, detector, entity, action)
        self.entities: Counter[str] = Counter()  # entity type -> count, once finished
        set_attributes(span, {
            "gen_ai.operation.name": "run_guardrail",
            "gen_ai.security.guardrail.name": GUARDRAIL_NAME,
            "gen_ai.security.target.type": target,
        })  # fmt: skip

    @property
    def detectors(self) -> list[str]:
        return sorted({detector for _, detector, _, _ in self._findings})

    @property
    def rules(self) -> list[str]:
        return sorted({rule for rule, _, _, _ in self._findings})

    def add_hits(self, hits: Iterable[Any]) -> None:
        """Count findings by rule, detector, entity type and action (from `scan.engine.Hit`)."""
        for hit in hits:
            self._findings[(hit.rule.name, hit.rule.detector.name, hit.finding.entity_type, hit.rule.action.value)] += 1

    def finish(self, *, blocked: bool, policy: str, end: bool = True) -> str:
        """Record the verdict and, unless `end` is False (a stream goes on), close the span; return the verdict."""
        modified = any(action == "mask" for *_, action in self._findings)
        if blocked:
            verdict, action = "deny", "block"
        elif modified:
            verdict, action = "modify", "redact"
        else:
            verdict, action = "allow", "allow"

        entities = self.entities
        recording = self._span.is_recording()
        for (rule, detector, entity, rule_action), count in sorted(self._findings.items()):
            entities[entity] += count
            if not recording:
                continue
            self._span.add_event("gen_ai.security.finding", {
                "gen_ai.security.risk.finding": entity,
                "gen_ai.security.policy.rule.id": rule,
                "gen_ai.security.action.type": _ACTIONS.get(rule_action, rule_action),
                "gen_ai.security.target.type": self._target,
                "extguard.detector": detector,
                "extguard.finding.count": count,
            })  # fmt: skip

        summary = ",".join(f"{entity}:{count}" for entity, count in sorted(entities.items()))
        if recording:
            set_attributes(self._span, {
                "gen_ai.security.verdict.type": verdict,
                "gen_ai.security.action.type": action,
                "gen_ai.security.policy.id": policy,
                "gen_ai.security.content.modified": modified,
                "extguard.findings": summary or None,
                "extguard.finding.count": sum(entities.values()),
                "extguard.scan.duration_ms": round((time.perf_counter() - self._started) * 1000, 3),
            })  # fmt: skip
        if blocked:
            self._span.set_status(Status(StatusCode.ERROR, "blocked by policy"))

        self._owner.facts[f"{self._direction}_action"] = action
        if summary:
            self._owner.facts[f"{self._direction}_findings"] = summary
        if end:
            self._span.end()
        return verdict


def _trace_id_of(traceparent: str | None) -> str:
    """Return the trace id of a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>"), or ""."""
    if not traceparent:
        return ""
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return ""
    return parts[1].lower()
