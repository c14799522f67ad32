"""Traces, dynamic metadata and the access log, end to end through a real Envoy.

Envoy (OpenTelemetry tracer) and extguard (OTLP exporter, configured by OTEL_* variables) both
export to an OTLP/gRPC collector that the test runs in process. The test thus receives every
span of a request, as a tracing backend would.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from extguard.testing.stack import Stack

pytestmark = pytest.mark.e2e

API_KEY = "sk-telemetry-e2e-1"
EMAIL = "jane.roe@example.org"
# Values the privacy test sends in prompts and replies; none may appear in any telemetry.
SECRETS = [EMAIL, "4111 1111 1111 1111", "078-05-1120", "AKIAIOSFODNN7EXAMPLE", "+1 415 555 0132", "GB82WEST12345698765432"]
POLICY = f"""
version: 1
default:
  rules:
    pii: {{action: mask, entities: [EMAIL_ADDRESS]}}
    cards: {{detector: pii, action: mask, entities: [CREDIT_CARD, US_SSN, PHONE_NUMBER, IBAN_CODE]}}
    secrets: {{action: block, direction: response}}
tenancy:
  store: {{backend: memory}}
  tenants:
    acme:
      api_keys: [{{sha256: {hashlib.sha256(API_KEY.encode()).hexdigest()}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 1000000}}]
pricing:
  gpt-4o-mini: {{input: 0.15, output: 0.60}}
"""


@dataclass
class SpanRecord:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:  # noqa: N802 - gRPC method name
        records = []
        for resource_spans in request.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    records.append(SpanRecord(
                        service=str(resource.get("service.name")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(),
                        attributes={item.key: _value(item.value) for item in span.attributes},
                        events=[(event.name, {item.key: _value(item.value) for item in event.attributes}) for event in span.events],
                    ))  # fmt: skip
        with self._lock:
            self.spans.extend(records)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, timeout_s: float = 20.0) -> list[SpanRecord]:
        """Return every span of `trace_id` once Envoy's request span and extguard's are in.

        Envoy exports its spans every 5 s by default, hence the long wait.
        """
        deadline = time.monotonic() + timeout_s
        spans: list[SpanRecord] = []
        while time.monotonic() < deadline:
            with self._lock:
                spans = [span for span in self.spans if span.trace_id == trace_id]
            envoy_done = any(span.service == "envoy" and "extguard.tenant" in span.attributes for span in spans)
            if envoy_done and any(span.name == "extguard.ext_proc" for span in spans):
                time.sleep(0.5)  # late spans of the same trace (extguard's commit) arrive with it
                with self._lock:
                    return [span for span in self.spans if span.trace_id == trace_id]
            time.sleep(0.2)
        raise AssertionError(f"no complete trace {trace_id} after {timeout_s} s; spans seen: {[(s.service, s.name) for s in spans]}")


def start_collector() -> tuple[Collector, grpc.Server, int]:
    """Start an OTLP/gRPC collector on a free loopback port; return it, its server and the port."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return collector, server, port


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Collector]]:
    work = tmp_path_factory.mktemp("telemetry")
    collector, server, port = start_collector()
    policy = work / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    environment = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SERVICE_NAME": "extguard",
    }
    audit_file = work / "audit.jsonl"
    options = ("--audit-sink", f"file:{audit_file}")
    try:
        with Stack(policy=policy, work_dir=work, otel_collector_port=port, extra_env=environment, log_level="DEBUG", extra_args=options) as stack:
            yield stack, collector
    finally:
        server.stop(grace=None)


def ask(stack: Stack, probe: str, traceparent: str | None = None, **extra: Any) -> Any:
    """Send a chat request marked with `?probe=...` in its path, as a client with or without its own trace."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=20)
    headers = {"traceparent": traceparent} if traceparent else {}
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": f"Write to {EMAIL} about the launch."}],
        extra_headers=headers, extra_query={"probe": probe}, **extra,
    )  # fmt: skip


def access_log_line(stack: Stack, probe: str) -> dict[str, Any]:
    """Return Envoy's access log line of the request marked `probe`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for text in stack.logs()["envoy"].splitlines():
            if text.startswith("{") and f"probe={probe}" in text:
                return json.loads(text)
        time.sleep(0.1)
    raise AssertionError(f"no access log line for probe {probe}")


def by_name(spans: list[SpanRecord], name: str) -> SpanRecord:
    (span,) = [span for span in spans if span.name == name]
    return span


def test_one_trace_with_envoy_and_extguard_spans(traced) -> None:  # type: ignore[no-untyped-def]
    stack, collector = traced
    answer = ask(stack, "trace-json-1")
    spans = collector.trace(access_log_line(stack, "trace-json-1")["trace_id"])

    envoy_request = next(span for span in spans if span.service == "envoy" and "extguard.tenant" in span.attributes)
    ids = {span.span_id: span for span in spans}
    extproc = by_name(spans, "extguard.ext_proc")
    authz = by_name(spans, "extguard.authz")
    guard_input = by_name(spans, "run_guardrail llm_input")
    guard_output = by_name(spans, "run_guardrail llm_output")

    # One trace: extguard's server spans hang under Envoy's spans for its gRPC calls, which hang
    # under Envoy's request span.
    assert {span.trace_id for span in spans} == {envoy_request.trace_id}
    for ours in (extproc, authz):
        envoy_call = ids[ours.parent_id]
        assert envoy_call.service == "envoy"
        assert envoy_call.parent_id == envoy_request.span_id
    assert guard_input.parent_id == extproc.span_id
    assert guard_output.parent_id == extproc.span_id
    assert by_name(spans, "extguard.budget.reserve").parent_id == extproc.span_id
    commit = by_name(spans, "extguard.budget.commit")
    assert commit.parent_id == extproc.span_id
    assert commit.attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens

    # GenAI attributes on extguard's request span.
    assert extproc.attributes["gen_ai.operation.name"] == "chat"
    assert extproc.attributes["gen_ai.provider.name"] == "openai"
    assert extproc.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert extproc.attributes["gen_ai.request.max_tokens"] == 64
    assert extproc.attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert extproc.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert extproc.attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert extproc.attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert extproc.attributes["extguard.tenant"] == "acme"
    assert extproc.attributes["extguard.budget.state"] == "admitted"
    assert extproc.attributes["extguard.cost_usd"] > 0
    assert authz.attributes["extguard.tenant"] == "acme"

    # The guard decision, by type and count.
    assert guard_input.attributes["gen_ai.security.verdict.type"] == "modify"
    assert guard_input.attributes["gen_ai.security.action.type"] == "redact"
    assert guard_input.attributes["extguard.findings"] == "EMAIL_ADDRESS:1"
    (finding,) = [attributes for name, attributes in guard_input.events if name == "gen_ai.security.finding"]
    assert finding["gen_ai.security.risk.finding"] == "EMAIL_ADDRESS"
    assert finding["extguard.finding.count"] == 1

    # Envoy's own span carries the same facts as custom tags, read from extguard's metadata.
    assert envoy_request.attributes["extguard.tenant"] == "acme"
    assert envoy_request.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert envoy_request.attributes["gen_ai.usage.input_tokens"] == str(answer.usage.prompt_tokens)
    assert envoy_request.attributes["extguard.request_findings"] == "EMAIL_ADDRESS:1"
    assert envoy_request.attributes["extguard.budget"] == "admitted"


def test_client_trace_continued_for_a_stream(traced) -> None:  # type: ignore[no-untyped-def]
    """A client that sends its own traceparent finds Envoy's and extguard's spans in its trace."""
    stack, collector = traced
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    stream = ask(
        stack, "trace-sse-1", traceparent=f"00-{trace_id}-{client_span}-01", stream=True,
        stream_options={"include_usage": True}, extra_body={"mock": {"reply": "a short reply", "chunk_chars": 3}},
    )  # fmt: skip
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    spans = collector.trace(trace_id)

    envoy_request = next(span for span in spans if span.service == "envoy" and "extguard.tenant" in span.attributes)
    assert envoy_request.parent_id == client_span
    extproc = by_name(spans, "extguard.ext_proc")
    guard_output = by_name(spans, "run_guardrail llm_output")
    assert extproc.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert extproc.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert guard_output.attributes["gen_ai.security.verdict.type"] == "allow"


def test_access_log_line_has_the_facts(traced) -> None:  # type: ignore[no-untyped-def]
    stack, _ = traced
    answer = ask(stack, "access-log-1")
    line = access_log_line(stack, "access-log-1")

    assert (line["status"], line["tenant"], line["model"], line["response_model"]) == (200, "acme", "gpt-4o-mini", "gpt-4o-mini")
    assert (line["input_tokens"], line["output_tokens"]) == (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert (line["request_action"], line["request_findings"], line["budget"]) == ("redact", "EMAIL_ADDRESS:1", "admitted")
    assert line["cost_usd"] > 0
    assert len(line["trace_id"]) == 32


def test_no_values_in_any_telemetry(traced) -> None:  # type: ignore[no-untyped-def]
    """PII and a secret in prompts and replies, JSON and streamed, masked and blocked: every span,
    log line (at DEBUG), audit event, metric and access log line of the run is free of them."""
    stack, collector = traced
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=20)
    prompt = "Customer: " + ", ".join(SECRETS) + ". Summarise the launch plan."
    reply = "Noted for " + ", ".join(value for value in SECRETS if not value.startswith("AKIA")) + ". Summarise the launch plan."
    for probe, mock in (("privacy-json", {"reply": reply}), ("privacy-sse", {"reply": reply, "chunk_chars": 7})):
        stream = probe.endswith("sse")
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=stream,
            extra_query={"probe": probe}, extra_body={"mock": mock},
        )  # fmt: skip
        if stream:
            list(answer)
    with pytest.raises(openai.APIError):  # the reply leaks an AWS key: the secrets rule blocks it
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "keys?"}],
            extra_query={"probe": "privacy-block"}, extra_body={"mock": {"reply": "use AKIAIOSFODNN7EXAMPLE now"}},
        )  # fmt: skip
    spans = [span for probe in ("privacy-json", "privacy-sse") for span in collector.trace(access_log_line(stack, probe)["trace_id"])]
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    audit_events = (stack.work_dir / "audit.jsonl").read_text(encoding="utf-8")  # type: ignore[operator]

    telemetry = {
        "spans": json.dumps([[span.name, span.attributes, span.events] for span in spans], default=str),
        "extguard log": stack.logs()["extguard"],
        "envoy log and access log": stack.logs()["envoy"],
        "audit events": audit_events,
        "metrics": metrics,
    }
    for where, text in telemetry.items():
        for value in [*SECRETS, "Summarise the launch plan"]:
            assert value not in text, f"{value!r} found in {where}"
    # The run did produce telemetry about those values, by type and count.
    assert '"event": "guard_decision"' in audit_events
    assert "CREDIT_CARD" in audit_events
    assert "AWS_ACCESS_KEY_ID" in audit_events
    assert any("run_guardrail" in span.name for span in spans)


def test_tracing_off_without_endpoint(tmp_path: Path) -> None:
    """Without an OTLP endpoint extguard exports nothing, while Envoy still traces."""
    collector, server, port = start_collector()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    unset = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    try:
        with Stack(policy=policy, work_dir=tmp_path, otel_collector_port=port, extra_env=unset) as stack:
            ask(stack, "untraced-1")
            deadline = time.monotonic() + 15
            while not any(span.service == "envoy" for span in collector.spans) and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        server.stop(grace=None)

    assert any(span.service == "envoy" for span in collector.spans)
    assert not [span for span in collector.spans if span.service == "extguard"]


def test_metrics_after_a_scripted_run(traced) -> None:  # type: ignore[no-untyped-def]
    """The Prometheus endpoint counts the tokens, cost, decisions and budget of the run."""
    stack, _ = traced
    tokens_before = stack.metric("gen_ai_client_token_usage_sum", **TOKEN_LABELS, gen_ai_token_type="input")
    answers = [ask(stack, f"metrics-{index}") for index in range(3)]

    input_tokens = stack.metric("gen_ai_client_token_usage_sum", **TOKEN_LABELS, gen_ai_token_type="input") - tokens_before
    assert input_tokens == sum(answer.usage.prompt_tokens for answer in answers)
    assert stack.metric("gen_ai_client_token_usage_count", **TOKEN_LABELS, gen_ai_token_type="output") >= 3
    assert stack.metric("extguard_cost_usd_total", tenant="acme", gen_ai_request_model="gpt-4o-mini") > 0
    assert stack.metric("extguard_guard_decisions_total", direction="request", verdict="modify", tenant="acme") >= 3
    assert stack.metric("extguard_guard_hits_total", direction="request", rule="pii", detector="pii", entity_type="EMAIL_ADDRESS", action="mask") >= 3
    assert stack.metric("extguard_scan_duration_seconds_count", direction="request", detector="pii") >= 3
    assert stack.metric("extguard_extproc_stream_duration_seconds_count") >= 3
    assert stack.metric("extguard_budget_reservations_in_flight") == 0
    used = stack.metric("extguard_budget_used", tenant="acme", window="day", metric="total_tokens")
    limit = stack.metric("extguard_budget_limit", tenant="acme", window="day", metric="total_tokens")
    remaining = stack.metric("extguard_budget_remaining", tenant="acme", window="day", metric="total_tokens")
    assert (limit, used + remaining) == (1_000_000, 1_000_000)
    assert used > 0


TOKEN_LABELS = {"tenant": "acme", "gen_ai_request_model": "gpt-4o-mini", "gen_ai_provider_name": "openai", "gen_ai_operation_name": "chat"}


def test_log_lines_carry_request_and_trace_ids(traced) -> None:  # type: ignore[no-untyped-def]
    stack, _ = traced
    ask(stack, "log-ids-1")
    line = access_log_line(stack, "log-ids-1")

    entries = [json.loads(text) for text in stack.logs()["extguard"].splitlines() if text.startswith("{")]
    ours = [entry for entry in entries if entry.get("request_id") == line["request_id"]]
    assert ours, "no extguard log line for the request"
    assert {entry["trace_id"] for entry in ours} == {line["trace_id"]}
    assert any("findings under policy" in entry["message"] for entry in ours)
