"""OpenTelemetry spans of extguard, continuing the trace that Envoy started.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
(and `OTEL_SDK_DISABLED` is not `true`, and `OTEL_TRACES_EXPORTER` is not `none`). Spans go over
OTLP/gRPC; the SDK reads the rest of the standard variables itself: `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and its argument, `OTEL_BSP_*` for batching,
and `OTEL_EXPORTER_OTLP_*` for headers, TLS and timeouts. Without an endpoint every span is a
no-op and costs next to nothing.

The parent of each span comes from the gRPC metadata of the ext_authz or ext_proc call, where
Envoy puts the context of its own span for that call (W3C `traceparent` with the OpenTelemetry
tracer, or whatever `OTEL_PROPAGATORS` names). When the call carries none, the `traceparent` of
the HTTP request is used, so a client's trace still continues.

Attribute names follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`, development
status in semantic-conventions 1.37) and, for guard decisions, the draft "run guardrail span and
security finding" proposal of the GenAI SIG (open-telemetry/semantic-conventions-genai pull
request 427, open in August 2026): names there may still change. Span attributes carry types,
counts, names and numbers only: never prompt text, completions or matched values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NoOpTracer, Tracer

log = logging.getLogger("extguard.telemetry")

TRACER_NAME = "extguard"
# Span names. The guard stages follow the draft convention `run_guardrail {target}`.
SPAN_AUTHZ = "extguard.authz"
SPAN_EXTPROC = "extguard.ext_proc"
SPAN_GUARD_REQUEST = "run_guardrail llm_input"
SPAN_GUARD_RESPONSE = "run_guardrail llm_output"
SPAN_RESERVE = "extguard.budget.reserve"
SPAN_COMMIT = "extguard.budget.commit"


class TracingUnavailable(RuntimeError):
    """Tracing is configured, but its exporter cannot be loaded."""


def tracing_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Return whether the OTEL_* variables ask for exported spans."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def build_tracer(environ: Mapping[str, str] = os.environ) -> tuple[Tracer, Any]:
    """Return the tracer extguard uses, and the provider to shut down at exit (None when off)."""
    if not tracing_enabled(environ):
        return NoOpTracer(), None

    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        # xds-protos ships an old copy of the opentelemetry/proto modules; installed after
        # opentelemetry-proto, it replaces that package's files (scripts/bootstrap.sh repairs it).
        raise TracingUnavailable(
            f"tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT) but the OTLP exporter cannot load: {error}. "
            "Reinstall the exporter's protos: pip install --force-reinstall --no-deps opentelemetry-proto"
        ) from None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol != "grpc":
        log.warning("OTLP protocol %s is not supported; extguard exports spans over OTLP/gRPC", protocol)
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "extguard"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing on: spans go to %s over OTLP/gRPC", endpoint)
    return provider.get_tracer(TRACER_NAME), provider


def parent_context(grpc_metadata: Iterable[tuple[str, Any]] | None, http_headers: Mapping[str, str] | None = None) -> otel_context.Context:
    """Return the context to start a span in: Envoy's call span first, else the HTTP request's trace."""
    carrier = {key.lower(): value for key, value in grpc_metadata or () if isinstance(value, str)}
    parent = propagate.extract(carrier)
    if trace.get_current_span(parent).get_span_context().is_valid or not http_headers:
        return parent
    return propagate.extract(dict(http_headers))


def set_attributes(span: trace.Span, attributes: Mapping[str, Any]) -> None:
    """Set the attributes whose value is known; None values are left out."""
    if not span.is_recording():
        return
    span.set_attributes({key: value for key, value in attributes.items() if value is not None})
