"""The ext_authz Check service over real gRPC: identity, model access, budgets and store outages."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from google.protobuf import json_format, struct_pb2

from extguard.server import build_runtime
from extguard.telemetry.metrics import Metrics
from extguard.testing.redis_server import RedisServer
from tests.conftest import ServerThread

ACME_KEY = "sk-acme-test-key-0001"
BOT_KEY = "sk-acme-bot-key-0002"
GLOBEX_KEY = "sk-globex-test-key-0003"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def policy(store: str = "{backend: memory}", identity: str = "{}") -> str:
    return f"""
version: 1
tenancy:
  time_zone: Europe/Berlin
  identity: {identity}
  store: {store}
  tenants:
    acme:
      api_keys: [{{sha256: {sha(ACME_KEY)}}}, {{sha256: {sha(BOT_KEY)}, user: ci-bot}}]
      models: ["gpt-4o*"]
      budgets: [{{window: day, metric: total_tokens, limit: 1000, soft: 0.8}}]
    globex:
      api_keys: [{{sha256: {sha(GLOBEX_KEY)}}}]
"""


class Authz:
    """A client of the Check service plus the runtime of the server behind it."""

    def __init__(self, channel: grpc.Channel, server: ServerThread) -> None:
        self.stub = auth_grpc.AuthorizationStub(channel)
        self.server = server
        self.runtime = server.runtime

    def check(self, headers: dict[str, str], path: str = "/v1/chat/completions", body: str = "", metadata: dict | None = None) -> auth.CheckResponse:
        request = auth.CheckRequest()
        http = request.attributes.request.http
        http.path = path
        http.method = "POST"
        http.headers.update(headers)
        http.body = body
        if metadata is not None:
            for namespace, fields in metadata.items():
                struct = struct_pb2.Struct()
                struct.update(fields)
                request.attributes.metadata_context.filter_metadata[namespace].CopyFrom(struct)
        return self.stub.Check(request, timeout=10)

    def spend(self, tenant: str, tokens: int) -> None:
        """Commit `tokens` of usage to the tenant's current day window."""
        budgets = self.runtime.budgets
        counters = [item.counter for item in budgets.counters(tenant, None)]
        self.server._run(budgets.store.commit(f"spend-{tokens}-{id(counters)}", counters, {"total_tokens": tokens}, tenant=tenant))


@pytest.fixture
def authz_for(tmp_path: Path) -> Iterator:
    started: list[tuple[ServerThread, grpc.Channel]] = []

    def start(policy_yaml: str) -> Authz:
        path = tmp_path / f"policy-{len(started)}.yaml"
        path.write_text(policy_yaml, encoding="utf-8")
        server = ServerThread(build_runtime(path, Metrics()))
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        started.append((server, channel))
        return Authz(channel, server)

    yield start
    for server, channel in started:
        channel.close()
        server.stop()


def upstream_headers(response: auth.CheckResponse) -> dict[str, str]:
    return {option.header.key: option.header.value for option in response.ok_response.headers}


def error_of(response: auth.CheckResponse) -> dict:
    return json.loads(response.denied_response.body)


def test_api_key_identifies_tenant(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check({"authorization": f"Bearer {ACME_KEY}"})

    assert response.status.code == 0
    assert upstream_headers(response) == {"x-extguard-tenant": "acme"}
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert metadata["extguard"]["tenant"] == "acme"
    assert metadata["extguard"]["budget"] == "ok"
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_azure_api_key_header_identifies_tenant(authz_for) -> None:  # type: ignore[no-untyped-def]
    # The Azure OpenAI client sends its key in `api-key`.
    response = authz_for(policy()).check({"api-key": ACME_KEY})

    assert upstream_headers(response) == {"x-extguard-tenant": "acme"}
    assert list(response.ok_response.headers_to_remove) == ["api-key"]


def test_api_key_kept_when_configured(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy(identity="{strip_api_key: false}")).check({"x-api-key": ACME_KEY})

    assert response.status.code == 0
    assert list(response.ok_response.headers_to_remove) == []


def test_rate_limits_in_dynamic_metadata(authz_for) -> None:  # type: ignore[no-untyped-def]
    limited = policy().replace("      models:", "      rate_limits: {extguard_requests: {requests_per_unit: 600, unit: minute}}\n      models:", 1)
    authz = authz_for(limited)

    acme = json_format.MessageToDict(authz.check({"authorization": f"Bearer {ACME_KEY}"}).dynamic_metadata)
    globex = json_format.MessageToDict(authz.check({"authorization": f"Bearer {GLOBEX_KEY}"}).dynamic_metadata)

    assert acme["extguard_requests"] == {"requests_per_unit": 600, "unit": "MINUTE"}
    assert sorted(globex) == ["extguard"]


def test_key_names_user_inside_tenant(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check({"x-api-key": BOT_KEY})

    assert upstream_headers(response) == {"x-extguard-tenant": "acme", "x-extguard-user": "ci-bot"}


def test_unknown_key_gets_401_in_openai_format(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check({"authorization": "Bearer sk-unknown"})

    assert response.denied_response.status.code == 401
    assert error_of(response)["error"]["code"] == "extguard_unknown_tenant"
    assert "sk-unknown" not in response.denied_response.body


def test_missing_identity_gets_401_in_anthropic_format(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check({}, path="/v1/messages")

    assert response.denied_response.status.code == 401
    assert error_of(response)["error"]["type"] == "authentication_error"


def test_spoofed_tenant_headers_removed(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check(
        {"authorization": f"Bearer {GLOBEX_KEY}", "x-extguard-tenant": "acme", "x-extguard-user": "admin"}
    )

    assert upstream_headers(response) == {"x-extguard-tenant": "globex"}
    assert "x-extguard-user" in response.ok_response.headers_to_remove


def test_untrusted_tenant_header_ignored(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for(policy()).check({"x-tenant-id": "acme"})

    assert response.denied_response.status.code == 401


def test_trusted_header_when_configured(authz_for) -> None:  # type: ignore[no-untyped-def]
    client = authz_for(policy(identity="{trusted_header: X-Tenant-Id, trusted_user_header: x-user-id}"))
    response = client.check({"x-tenant-id": "acme", "x-user-id": "alice"})
    unknown = client.check({"x-tenant-id": "initech"})

    assert upstream_headers(response) == {"x-extguard-tenant": "acme", "x-extguard-user": "alice"}
    assert unknown.denied_response.status.code == 401


def test_jwt_claims_from_metadata(authz_for) -> None:  # type: ignore[no-untyped-def]
    client = authz_for(policy(identity="{jwt_payload_key: payload}"))
    metadata = {"envoy.filters.http.jwt_authn": {"payload": {"tenant": "globex", "sub": "user-7"}}}
    response = client.check({}, metadata=metadata)

    assert upstream_headers(response) == {"x-extguard-tenant": "globex", "x-extguard-user": "user-7"}


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ({"headers": {"x-ai-eg-model": "gpt-4o-mini"}}, 0),
        ({"headers": {"x-ai-eg-model": "claude-3-haiku"}}, 403),
        ({"body": json.dumps({"model": "o1-preview", "messages": []})}, 403),
        ({"body": json.dumps({"model": "gpt-4o", "messages": []})}, 0),
        ({}, 0),  # no model known yet: the ext_proc stage checks it from the body
    ],
)
def test_model_access(authz_for, source: dict, status: int) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": f"Bearer {ACME_KEY}", **source.get("headers", {})}
    response = authz_for(policy()).check(headers, body=source.get("body", ""))

    if status == 0:
        assert response.status.code == 0
    else:
        assert response.denied_response.status.code == status
        assert error_of(response)["error"]["code"] == "extguard_model_not_allowed"


def test_soft_limit_warns_client(authz_for) -> None:  # type: ignore[no-untyped-def]
    client = authz_for(policy())
    client.spend("acme", 850)
    response = client.check({"authorization": f"Bearer {ACME_KEY}"})

    warnings = {option.header.key: option.header.value for option in response.ok_response.response_headers_to_add}
    facts = json_format.MessageToDict(response.dynamic_metadata)["extguard"]
    assert response.status.code == 0
    assert warnings == {"x-extguard-budget-warning": "tenant day total_tokens 85%"}
    assert (facts["budget"], facts["budget_warning"]) == ("soft_limit", "tenant day total_tokens 85%")


def test_spent_budget_gets_429_with_retry_after(authz_for) -> None:  # type: ignore[no-untyped-def]
    client = authz_for(policy())
    client.spend("acme", 1000)
    response = client.check({"authorization": f"Bearer {ACME_KEY}"})
    other = client.check({"authorization": f"Bearer {GLOBEX_KEY}"})

    denied = response.denied_response
    headers = {option.header.key: option.header.value for option in denied.headers}
    assert denied.status.code == 429
    assert error_of(response)["error"]["type"] == "insufficient_quota"
    assert 1 <= int(headers["retry-after"]) <= 25 * 3600
    assert other.status.code == 0
    decisions = client.runtime.metrics.registry.get_sample_value(
        "extguard_budget_decisions_total", {"stage": "authz", "decision": "budget_exhausted", "tenant": "acme"}
    )
    assert decisions == 1.0


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 0)])
def test_store_down_follows_failure_mode(authz_for, mode: str, status: int) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer()  # never started: nothing listens on its port
    store = f"{{backend: redis, url: '{server.url}', timeout_ms: 200, failure_mode: {mode}}}"
    response = authz_for(policy(store=store)).check({"authorization": f"Bearer {ACME_KEY}"})
    server.close()

    if status:
        assert response.denied_response.status.code == status
        assert error_of(response)["error"]["code"] == "extguard_budget_unavailable"
    else:
        assert response.status.code == 0
        assert upstream_headers(response)["x-extguard-budget"] == "unchecked"
        assert json_format.MessageToDict(response.dynamic_metadata)["extguard"]["budget"] == "unchecked"


def test_redis_store_counts_across_checks(authz_for) -> None:  # type: ignore[no-untyped-def]
    with RedisServer() as server:
        client = authz_for(policy(store=f"{{backend: redis, url: '{server.url}'}}"))
        client.spend("acme", 1000)
        response = client.check({"authorization": f"Bearer {ACME_KEY}"})

    assert response.denied_response.status.code == 429


def test_no_tenancy_allows_everything(authz_for) -> None:  # type: ignore[no-untyped-def]
    response = authz_for("version: 1\n").check({})

    assert response.status.code == 0
    assert list(response.ok_response.headers) == []


@pytest.mark.parametrize("replicas", [1, 2])
def test_soft_limit_calls_webhook_once(authz_for, replicas: int) -> None:  # type: ignore[no-untyped-def]
    """One event per window period, also when two replicas share the Redis store."""
    import http.server
    import threading
    import time

    events: list[dict] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's method name
            events.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with RedisServer() as redis_server:
            webhook = f"\n  soft_limit_webhook: {{url: 'http://127.0.0.1:{receiver.server_port}/budget'}}"
            text = policy(store=f"{{backend: redis, url: '{redis_server.url}'}}")
            clients = [authz_for(text.replace("  time_zone: Europe/Berlin", "  time_zone: Europe/Berlin" + webhook)) for _ in range(replicas)]
            clients[0].spend("acme", 850)
            for _ in range(3):
                for client in clients:
                    client.check({"authorization": f"Bearer {ACME_KEY}"})
            deadline = time.monotonic() + 5
            while not events and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # a second event, if any, would arrive by now
    finally:
        receiver.shutdown()

    assert len(events) == 1
    assert events[0] == {
        "event": "budget_soft_limit", "tenant": "acme", "scope": "tenant",
        "period": events[0]["period"], "metric": "total_tokens", "percent": 85,
    }  # fmt: skip
    assert events[0]["period"].startswith("day:")
