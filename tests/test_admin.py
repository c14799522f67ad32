"""The budget admin gRPC API (extguard.v1.BudgetAdmin) on its own port, and its generated code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from extguard.budget.store import LedgerEntry
from extguard.server import GuardServer, ServerSettings, build_runtime
from extguard.telemetry.metrics import Metrics
from extguard.v1 import admin_pb2, admin_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICY = """
tenancy:
  store: {backend: memory}
  identity: {trusted_header: x-tenant-id, trusted_user_header: x-user-id}
  tenants:
    acme:
      budgets: [{window: day, metric: total_tokens, limit: 1000}, {window: month, metric: cost_usd, limit: 5}]
      user_budgets: [{window: day, metric: total_tokens, limit: 100}]
    globex: {}
"""


class AdminServer:
    """A GuardServer with the admin API on its own event loop thread."""

    def __init__(self, policy: Path, admin_listen: str | None) -> None:
        self.runtime = build_runtime(policy, Metrics())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = ServerSettings(listen="127.0.0.1:0", metrics_listen=None, grace_period_seconds=0.5, admin_listen=admin_listen)
        self.server = self.run(self._start(settings))

    async def _start(self, settings: ServerSettings) -> GuardServer:
        server = GuardServer(self.runtime, settings)  # grpc.aio servers belong to the loop they are made on
        await server.start()
        return server

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=15)

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[AdminServer, admin_pb2_grpc.BudgetAdminStub]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    server = AdminServer(policy, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.server.admin_port}")
    yield server, admin_pb2_grpc.BudgetAdminStub(channel)
    channel.close()
    server.stop()


def spend(server: AdminServer, tokens: int, user: str | None = None) -> None:
    keeper = server.runtime.budgets
    counters = [item.counter for item in keeper.counters("acme", user)]
    usage = {"input_tokens": tokens - 10, "output_tokens": 10, "total_tokens": tokens, "cost_nanousd": 7}
    server.run(keeper.store.commit(f"spend-{tokens}-{user}", counters, usage, tenant="acme", ledger=LedgerEntry("2026-12-04", "gpt-4o", 5)))


def test_status_lists_every_window(admin) -> None:  # type: ignore[no-untyped-def]
    server, stub = admin
    spend(server, 300, user="alice")
    response = stub.GetBudgetStatus(admin_pb2.GetBudgetStatusRequest(tenant="acme", user="alice"), timeout=5)

    rows = {(w.scope, w.window, w.metric): (w.used, w.limit) for w in response.windows}
    assert rows == {
        ("tenant", "day", "total_tokens"): (300, 1000),
        ("tenant", "month", "cost_usd"): (7, 5_000_000_000),
        ("user:alice", "day", "total_tokens"): (300, 100),
    }
    assert all(w.seconds_left > 0 for w in response.windows)


def test_usage_rows_from_ledger(admin) -> None:  # type: ignore[no-untyped-def]
    server, stub = admin
    spend(server, 300)
    response = stub.GetUsage(admin_pb2.GetUsageRequest(from_day="2026-12-01", to_day="2026-12-31"), timeout=5)

    (row,) = response.rows
    assert (row.day, row.tenant, row.model, row.requests) == ("2026-12-04", "acme", "gpt-4o", 1)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.cost_nanousd) == (290, 5, 10, 7)


def test_reset_window_starts_period_again(admin) -> None:  # type: ignore[no-untyped-def]
    server, stub = admin
    spend(server, 300)
    reset = stub.ResetWindow(admin_pb2.ResetWindowRequest(tenant="acme", window="day"), timeout=5)
    status = stub.GetBudgetStatus(admin_pb2.GetBudgetStatusRequest(tenant="acme"), timeout=5)

    assert reset.period.startswith("day:")
    used = {(w.window, w.metric): w.used for w in status.windows}
    assert used == {("day", "total_tokens"): 0, ("month", "cost_usd"): 7}


@pytest.mark.parametrize(
    ("call", "request_message", "code"),
    [
        ("GetBudgetStatus", admin_pb2.GetBudgetStatusRequest(tenant="initech"), grpc.StatusCode.NOT_FOUND),
        ("ResetWindow", admin_pb2.ResetWindowRequest(tenant="acme", window="year"), grpc.StatusCode.INVALID_ARGUMENT),
        ("ResetWindow", admin_pb2.ResetWindowRequest(tenant="globex", window="day", scope="user:bob"), grpc.StatusCode.NOT_FOUND),
        ("GetUsage", admin_pb2.GetUsageRequest(tenant="acme", from_day="12/04/2026"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_rejected(admin, call: str, request_message: object, code: grpc.StatusCode) -> None:  # type: ignore[no-untyped-def]
    _, stub = admin
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, call)(request_message, timeout=5)

    assert raised.value.code() == code


def test_admin_api_off_by_default(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    server = AdminServer(policy, None)
    try:
        assert server.server.admin_server is None
        assert server.server.admin_port == 0
    finally:
        server.stop()


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """src/extguard/v1 was generated from proto/extguard/v1 as it is now (scripts/gen-proto)."""
    descriptor_set = tmp_path / "admin.pb"
    command = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO_ROOT / "proto"),
        f"--descriptor_set_out={descriptor_set}", str(REPO_ROOT / "proto" / "extguard" / "v1" / "admin.proto"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file

    assert result.returncode == 0, result.stderr
    compiled = files[0]
    for message in compiled.message_type:
        for field in message.field:
            field.ClearField("json_name")  # protoc adds it to descriptor sets, not to generated code
    assert compiled == descriptor_pb2.FileDescriptorProto.FromString(admin_pb2.DESCRIPTOR.serialized_pb)


def test_usage_command_asks_running_server(admin) -> None:  # type: ignore[no-untyped-def]
    server, _ = admin
    spend(server, 300)
    command = [
        sys.executable, "-m", "extguard", "usage", "--server", f"127.0.0.1:{server.server.admin_port}",
        "--from", "2026-12-01", "--to", "2026-12-31", "--format", "csv",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "day,tenant,model,requests,input_tokens,cached_input_tokens,output_tokens,cost_usd",
        "2026-12-04,acme,gpt-4o,1,290,5,10,0.000000007",
    ]


def extguard(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extguard", *arguments], capture_output=True, text=True, timeout=60)


def test_usage_table_without_rows(admin) -> None:  # type: ignore[no-untyped-def]
    server, _ = admin
    result = extguard("usage", "--server", f"127.0.0.1:{server.server.admin_port}", "--from", "2026-01-01")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "(no usage recorded for these days)"


def test_budget_command_shows_and_resets(admin) -> None:  # type: ignore[no-untyped-def]
    server, _ = admin
    spend(server, 300)
    address = f"127.0.0.1:{server.server.admin_port}"
    before = extguard("budget", "status", "--server", address, "--tenant", "acme", "--format", "json")
    reset = extguard("budget", "reset", "--server", address, "--tenant", "acme", "--window", "day")
    after = extguard("budget", "status", "--server", address, "--tenant", "acme")

    assert before.returncode == 0, before.stderr
    rows = {(row["window"], row["metric"]): (row["used"], row["limit"]) for row in json.loads(before.stdout)}
    assert rows == {("day", "total_tokens"): (300, 1000), ("month", "cost_usd"): (7e-9, 5.0)}
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.startswith("reset tenant period day:")
    header, *lines = after.stdout.splitlines()
    assert header.split() == ["scope", "window", "period", "metric", "used", "reserved", "limit", "resets_in_s"]
    assert [line.split()[:5] for line in lines] == [["tenant", "day", lines[0].split()[2], "total_tokens", "0"], ["tenant", "month", lines[1].split()[2], "cost_usd", "0.000000"]]


@pytest.mark.parametrize(
    ("arguments", "status", "words"),
    [
        (("status", "--tenant", "initech"), 2, "NOT_FOUND: unknown tenant 'initech'"),
        (("reset", "--tenant", "globex", "--window", "day", "--scope", "user:bob"), 2, "NOT_FOUND"),
    ],
)
def test_budget_command_errors(admin, arguments: tuple[str, ...], status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    server, _ = admin
    result = extguard("budget", arguments[0], "--server", f"127.0.0.1:{server.server.admin_port}", *arguments[1:])

    assert result.returncode == status
    assert words in result.stderr


def test_budget_command_without_server() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    result = extguard("budget", "status", "--server", f"127.0.0.1:{port}", "--tenant", "acme")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
