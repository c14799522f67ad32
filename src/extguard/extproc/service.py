"""The ExternalProcessor gRPC service: one Exchange per Process stream."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from extguard.extproc.exchange import Exchange, Runtime

log = logging.getLogger("extguard.extproc")
_METADATA_KINDS = frozenset({"request_body", "response_trailers"})


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):
    """Returns exactly one ProcessingResponse for each ProcessingRequest, in order.

    `runtime` is read once per stream, so a policy reload applies to new requests only.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Process(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        runtime = self.runtime
        metrics = runtime.metrics
        metrics.streams.inc()
        exchange = Exchange(runtime, context.invocation_metadata())
        opened = time.perf_counter()

        try:
            async for request in request_iterator:
                started = time.perf_counter()
                response = await exchange.handle(request)
                kind = request.WhichOneof("request") or "unknown"
                if kind in _METADATA_KINDS or exchange.finished or (kind == "response_body" and request.response_body.end_of_stream):
                    # Envoy reads the facts when the request ends: send them once the request is
                    # scanned (in case the response never comes) and with the last reply.
                    facts = exchange.trace.take_metadata()
                    if facts is not None:
                        response.dynamic_metadata.CopyFrom(facts)
                metrics.child(metrics.messages, kind).inc()
                metrics.child(metrics.message_duration, kind).observe(time.perf_counter() - started)
                yield response
                if exchange.finished:
                    # After an ImmediateResponse Envoy sends nothing more on this stream.
                    return
        finally:
            # A stream that ends before its response did (client gone, reset, upstream error)
            # still commits what it used.
            exchange.abandon()
            exchange.trace.end()
            metrics.stream_duration.observe(time.perf_counter() - opened)
