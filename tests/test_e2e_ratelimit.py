"""Per-tenant limits for Envoy's own rate limiter, read from ext_authz's dynamic metadata.

The shipped bootstrap gets Envoy's global rate limit filter after ext_authz, with a route rate
limit whose `limit.dynamic_metadata` names the key extguard writes: the same override that Envoy
Gateway configures for a BackendTrafficPolicy rule with `limit.fromMetadata`. The rate limit
service is a small recording one that the test runs, because Envoy's own (a Go service) is not
installed here. It decides from the limit that Envoy sends it, so a tenant is limited by the
number in its policy only if Envoy read extguard's metadata.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import openai
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extguard.testing.stack import GUARDED_BOOTSTRAP, Stack

pytestmark = pytest.mark.e2e

ACME_KEY = "sk-acme-ratelimit-1"
GLOBEX_KEY = "sk-globex-ratelimit-2"
INITECH_KEY = "sk-initech-ratelimit-3"
STATIC_LIMIT = 5  # the rule's own number, for a tenant without a rate limit in the policy


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


POLICY = f"""
version: 1
tenancy:
  tenants:
    acme:
      api_keys: [{{sha256: {sha(ACME_KEY)}}}]
      rate_limits: {{extguard_requests: {{requests_per_unit: 600, unit: minute}}}}
    globex:
      api_keys: [{{sha256: {sha(GLOBEX_KEY)}}}]
      rate_limits: {{extguard_requests: {{requests_per_unit: 2, unit: Hour}}}}
    initech:
      api_keys: [{{sha256: {sha(INITECH_KEY)}}}]
"""

# Envoy's global rate limit filter goes after ext_authz, so that the tenant header and the
# metadata are set when it runs, and before ext_proc.
RATELIMIT_FILTER = """\
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: extguard-e2e
              failure_mode_deny: true
              rate_limit_service:
                grpc_service: { envoy_grpc: { cluster_name: ratelimit } }
                transport_api_version: V3
"""
ROUTE_RATE_LIMIT = """\
                  rate_limits:
                  - actions:
                    - request_headers: { header_name: x-extguard-tenant, descriptor_key: tenant }
                    limit:
                      dynamic_metadata:
                        metadata_key:
                          key: envoy.filters.http.ext_authz
                          path: [{ key: extguard_requests }]
"""
RATELIMIT_CLUSTER = """
  - name: ratelimit
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
    load_assignment:
      cluster_name: ratelimit
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: %d }
"""


class RecordingRateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    """Count hits per descriptor and return OVER_LIMIT past the limit Envoy sent, or STATIC_LIMIT."""

    def __init__(self) -> None:
        self.requests: list[rls_pb2.RateLimitRequest] = []
        self._hits: Counter[tuple[tuple[str, str], ...]] = Counter()
        self._lock = threading.Lock()

    def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext) -> rls_pb2.RateLimitResponse:  # noqa: N802 - gRPC method name
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        with self._lock:
            self.requests.append(request)
            for descriptor in request.descriptors:
                key = tuple((entry.key, entry.value) for entry in descriptor.entries)
                self._hits[key] += request.hits_addend or 1
                limit = descriptor.limit.requests_per_unit if descriptor.HasField("limit") else STATIC_LIMIT
                if self._hits[key] > limit:
                    response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
        return response


def with_rate_limiter(template: str, port: int) -> str:
    """Return the shipped bootstrap with the rate limit filter, route limit and cluster added."""
    filter_anchor = "          - name: envoy.filters.http.ext_proc\n"
    route_anchor = "                  timeout: 600s\n"
    assert template.count(filter_anchor) == 1
    assert template.count(route_anchor) == 1
    template = template.replace(filter_anchor, RATELIMIT_FILTER + filter_anchor)
    template = template.replace(route_anchor, route_anchor + ROUTE_RATE_LIMIT)
    return template + RATELIMIT_CLUSTER % port


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, RecordingRateLimitService]]:
    work = tmp_path_factory.mktemp("ratelimit")
    service = RecordingRateLimitService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    bootstrap = work / "bootstrap.yaml"
    bootstrap.write_text(with_rate_limiter(GUARDED_BOOTSTRAP.read_text(encoding="utf-8"), port), encoding="utf-8")
    policy = work / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    try:
        with Stack(policy=policy, bootstrap=bootstrap, work_dir=work) as stack:
            yield stack, service
    finally:
        server.stop(grace=None)


def ask(stack: Stack, key: str) -> str:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=20)
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    except openai.RateLimitError:
        return "429"
    return "ok"


def test_envoy_sends_tenant_limit_from_metadata(limited) -> None:  # type: ignore[no-untyped-def]
    stack, service = limited
    before = len(service.requests)

    assert ask(stack, ACME_KEY) == "ok"

    (request,) = service.requests[before:]
    (descriptor,) = request.descriptors
    assert [(entry.key, entry.value) for entry in descriptor.entries] == [("tenant", "acme")]
    assert (descriptor.limit.requests_per_unit, descriptor.limit.unit) == (600, rls_pb2.RateLimitResponse.RateLimit.MINUTE)


@pytest.mark.parametrize(
    "key, allowed",
    [(GLOBEX_KEY, 2), (INITECH_KEY, STATIC_LIMIT)],
    ids=["limit-from-policy", "static-limit-without-metadata"],
)
def test_tenant_limited_by_its_own_number(limited, key: str, allowed: int) -> None:  # type: ignore[no-untyped-def]
    stack, _ = limited

    outcomes = [ask(stack, key) for _ in range(allowed + 2)]

    assert outcomes == ["ok"] * allowed + ["429"] * 2
