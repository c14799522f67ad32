"""Shared fixtures: a real grpc.aio extguard server on an ephemeral port, a real Redis Cluster, and message builders."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from extguard.extproc.exchange import Runtime
from extguard.server import GuardServer, ServerSettings, build_runtime
from extguard.telemetry.metrics import Metrics
from extguard.testing.redis_topologies import RedisClusterServers


class ServerThread:
    """A GuardServer running on its own event loop in a background thread."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="extguard-server", daemon=True)
        self.server: GuardServer | None = None
        self.port = 0

    def start(self) -> None:
        self.thread.start()
        self.port = self._run(self._start())

    async def _start(self) -> int:
        settings = ServerSettings(listen="127.0.0.1:0", metrics_listen=None, grace_period_seconds=1.0)
        self.server = GuardServer(self.runtime, settings)
        return await self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def _run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=15)


class Processor:
    """A client of the ext_proc service that plays Envoy's side of one or more streams."""

    def __init__(self, channel: grpc.Channel, runtime: Runtime) -> None:
        self.stub = ext_proc_grpc.ExternalProcessorStub(channel)
        self.runtime = runtime

    def exchange(self, requests: list[ext_proc.ProcessingRequest]) -> list[ext_proc.ProcessingResponse]:
        """Send all `requests` on one stream and return every reply."""
        return list(self.stub.Process(iter(requests), timeout=10))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0


@pytest.fixture
def processor_for(tmp_path: Path) -> Iterator:
    """Return a factory: policy YAML text -> Processor bound to a fresh server with that policy."""
    started: list[tuple[ServerThread, grpc.Channel]] = []

    def start(policy_yaml: str) -> Processor:
        policy_path = tmp_path / f"policy-{len(started)}.yaml"
        policy_path.write_text(policy_yaml, encoding="utf-8")
        runtime = build_runtime(policy_path, Metrics())
        server = ServerThread(runtime)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        started.append((server, channel))
        return Processor(channel, runtime)

    yield start
    for server, channel in started:
        channel.close()
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster on loopback, shared by every test that requests it (it takes about 2 s to form)."""
    with RedisClusterServers(masters=3) as cluster:
        yield cluster


# -- ProcessingRequest builders --------------------------------------------------------------


def headers_message(kind: str, headers: dict[str, str], *, end_of_stream: bool = False) -> ext_proc.ProcessingRequest:
    header_list = [base_pb2.HeaderValue(key=key, raw_value=value.encode()) for key, value in headers.items()]
    http_headers = ext_proc.HttpHeaders(headers=base_pb2.HeaderMap(headers=header_list), end_of_stream=end_of_stream)
    return ext_proc.ProcessingRequest(**{kind: http_headers})


def trailers_message(kind: str, trailers: dict[str, str]) -> ext_proc.ProcessingRequest:
    header_list = [base_pb2.HeaderValue(key=key, raw_value=value.encode()) for key, value in trailers.items()]
    return ext_proc.ProcessingRequest(**{kind: ext_proc.HttpTrailers(trailers=base_pb2.HeaderMap(headers=header_list))})


def body_message(kind: str, body: bytes, *, end_of_stream: bool = True) -> ext_proc.ProcessingRequest:
    return ext_proc.ProcessingRequest(**{kind: ext_proc.HttpBody(body=body, end_of_stream=end_of_stream)})


def request_headers(path: str = "/v1/chat/completions", **extra: str) -> ext_proc.ProcessingRequest:
    headers = {":method": "POST", ":path": path, ":authority": "gateway", "content-type": "application/json",
               "x-request-id": "req-1", **extra}
    return headers_message("request_headers", headers)


def response_headers(content_type: str, **extra: str) -> ext_proc.ProcessingRequest:
    return headers_message("response_headers", {":status": "200", "content-type": content_type, **extra})
