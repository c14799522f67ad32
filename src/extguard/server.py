"""Build and run the extguard gRPC server: ext_proc, ext_authz, gRPC health, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from extguard.authz.service import Authorization
from extguard.budget.admin import BudgetAdmin
from extguard.budget.keeper import BudgetKeeper
from extguard.config.loader import load_policy
from extguard.extproc.exchange import Runtime
from extguard.extproc.service import ExternalProcessor
from extguard.scan.detectors import default_detectors
from extguard.scan.redact import Masker
from extguard.telemetry.metrics import DEFAULT_MAX_LABEL_VALUES, Metrics
from extguard.telemetry.tracing import build_tracer
from extguard.v1 import admin_pb2_grpc

log = logging.getLogger("extguard.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
# Envoy sends whole buffered bodies in one message; leave room above the largest body limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"  # host:port of the gRPC server; port 0 picks a free port
    metrics_listen: str | None = "127.0.0.1:9464"  # host:port of /metrics (port 0 picks one); None: off
    grace_period_seconds: float = 10.0  # how long streams in flight may finish after SIGTERM
    admin_listen: str | None = None  # host:port of the budget admin API; None: off
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES  # distinct tenants (and models) per metric label before "other"


def build_runtime(policy_path: str | Path, metrics: Metrics | None = None) -> Runtime:
    """Load the policy and build what every exchange shares; raise PolicyError when it is invalid."""
    policies = load_policy(policy_path, default_detectors())
    metrics = metrics or Metrics()
    budgets = None
    if policies.tenancy is not None:
        budgets = BudgetKeeper.from_settings(policies.tenancy, policies.pricing, metrics)
    tracer, provider = build_tracer()
    return Runtime(
        policies=policies, masker=Masker(policies.hash_key), metrics=metrics, budgets=budgets,
        tracer=tracer, tracer_provider=provider,
    )  # fmt: skip


class GuardServer:
    """The grpc.aio server with its services; `start()` binds, `stop()` drains."""

    def __init__(self, runtime: Runtime, settings: ServerSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.port = 0
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(runtime), self.server)
        authorization = Authorization(runtime.policies.tenancy, runtime.budgets, runtime.metrics, runtime.tracer)
        auth_grpc.add_AuthorizationServicer_to_server(authorization, self.server)
        # The admin API can reset budgets, so it gets its own server and address.
        self.admin_server: grpc.aio.Server | None = None
        self.admin_port = 0
        if settings.admin_listen is not None and runtime.budgets is not None:
            self.admin_server = grpc.aio.server()
            admin_pb2_grpc.add_BudgetAdminServicer_to_server(BudgetAdmin(runtime.budgets), self.admin_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self) -> int:
        """Load the deep engines the policy uses, bind and start serving; return the bound gRPC port.

        Raise OSError when binding fails and DeepEngineError when an engine cannot load.
        """
        split_host_port(self.settings.listen, "--listen")
        for engine in self.runtime.policies.deep_detectors():
            log.info("starting deep engine %s", engine.name)
            await engine.start()
        if self.runtime.budgets is not None:
            await self.runtime.budgets.start()
        try:
            self.port = self.server.add_insecure_port(self.settings.listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"--listen: cannot listen on {self.settings.listen}: the address is in use or not local")
        await self.server.start()
        if self.admin_server is not None and self.settings.admin_listen is not None:
            split_host_port(self.settings.admin_listen, "--admin-listen")
            self.admin_port = self.admin_server.add_insecure_port(self.settings.admin_listen)
            if self.admin_port == 0:
                raise OSError(f"--admin-listen: cannot listen on {self.settings.admin_listen}")
            await self.admin_server.start()
            log.info("budget admin API on port %d", self.admin_port)
        for service in ("", EXT_PROC_SERVICE, AUTHZ_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new streams, and let streams in flight finish within the grace period."""
        for service in ("", EXT_PROC_SERVICE, AUTHZ_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.settings.grace_period_seconds)
        if self.admin_server is not None:
            await self.admin_server.stop(1.0)
        for engine in self.runtime.policies.deep_detectors():
            engine.close()
        if self.runtime.budgets is not None:
            await self.runtime.budgets.close()
        if self.runtime.tracer_provider is not None:
            self.runtime.tracer_provider.shutdown()  # exports the spans still in the batch


def split_host_port(address: str, option: str = "address") -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 hosts in brackets); raise OSError naming `option` when it is invalid."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise OSError(f"{option}: invalid address {address!r}: expected HOST:PORT with a port from 0 to 65535")
    return host, int(port)


async def serve(policy_path: str | Path, settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain streams in flight and return."""
    split_host_port(settings.listen, "--listen")
    if settings.metrics_listen:
        metrics_host, metrics_port = split_host_port(settings.metrics_listen, "--metrics-listen")
    runtime = build_runtime(policy_path, Metrics(max_label_values=settings.max_label_values))
    if runtime.policies.hash_key_is_random and runtime.policies.uses_hash_masks:
        log.warning(
            "%s is not set, so the hash mask style uses a random key: its tokens change on every restart "
            "and differ between replicas",
            runtime.policies.hash_key_env,
        )

    server = GuardServer(runtime, settings)
    port = await server.start()
    host = settings.listen.rpartition(":")[0]
    log.info("ext_proc and ext_authz server listening on %s:%d (policy %s)", host, port, policy_path)
    if settings.metrics_listen:
        try:
            metrics_server, _ = start_http_server(metrics_port, addr=metrics_host, registry=runtime.metrics.registry)
        except OSError as error:
            await server.stop()
            raise OSError(f"--metrics-listen: cannot serve metrics on {settings.metrics_listen}: {error.strerror or error}") from None
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_server.server_port)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()

    log.info("stopping: draining streams for up to %.1f s", settings.grace_period_seconds)
    await server.stop()
    log.info("stopped")
