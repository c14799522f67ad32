"""Budget store throughput and ext_authz latency, against a local redis-server.

1. Reserve-and-commit: several asyncio clients, each with its own Redis connection (as several
   extguard replicas would have), run reserve then commit in a loop for one tenant with a day
   and a month budget, for a fixed time. That is the five counters a request touches: the two
   budget windows, which are reserved against, and the minute, hour and week windows, which
   only count commits. Prints operations per second (one operation is one
   reserve plus one commit) and the median and p99 of each pair's latency.
2. ext_authz Check: one gRPC client calls extguard's Check with a valid API key, one call at a
   time, against a server whose policy keeps budgets in the same Redis. Prints the median and
   p99 latency of a Check, which is what the ext_authz filter adds to each request.

Run from the repository root: `.venv/bin/python benchmarks/budget_bench.py` (about 25 s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
import redis.asyncio as redis  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as auth  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc  # noqa: E402

from extguard.budget.plan import counters_for  # noqa: E402
from extguard.budget.redis_store import RedisBudgetStore  # noqa: E402
from extguard.config.tenancy import Tenant  # noqa: E402
from extguard.server import build_runtime  # noqa: E402
from extguard.telemetry.metrics import Metrics  # noqa: E402
from extguard.testing.redis_server import RedisServer  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402

API_KEY = "sk-bench-0001"


def percentile(values: list[float], rank: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * rank / 100))]


async def reserve_commit(url: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    budgets = [{"window": "day", "limit": 10**15}, {"window": "month", "limit": 10**15}]
    tenant = Tenant.model_validate({"budgets": budgets})
    counters = [item.counter for item in counters_for("bench", tenant, None, datetime.now(UTC), ZoneInfo("UTC"))]
    stores = [RedisBudgetStore(redis.Redis.from_url(url)) for _ in range(clients)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(store: RedisBudgetStore) -> int:
        done = 0
        while time.perf_counter() < deadline:
            reservation = uuid.uuid4().hex
            started = time.perf_counter()
            now_ms = int(time.time() * 1000)
            await store.reserve(reservation, counters, {"total_tokens": 500}, now_ms=now_ms, expires_at_ms=now_ms + 60_000)
            await store.commit(reservation, counters, {"total_tokens": 321}, tenant="bench")
            latencies.append((time.perf_counter() - started) * 1000)
            done += 1
        return done

    counts = await asyncio.gather(*(loop(store) for store in stores))
    for store in stores:
        await store.close()
    return sum(counts), latencies


def authz_latency(url: str, calls: int) -> list[float]:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    policy = f"""
tenancy:
  store: {{backend: redis, url: '{url}'}}
  tenants:
    bench:
      api_keys: [{{sha256: {digest}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 1000000000}}, {{window: month, metric: cost_usd, limit: 1000}}]
"""
    with tempfile.TemporaryDirectory() as work_dir:
        path = Path(work_dir) / "policy.yaml"
        path.write_text(policy, encoding="utf-8")
        server = ServerThread(build_runtime(path, Metrics()))
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = auth_grpc.AuthorizationStub(channel)
                request = auth.CheckRequest()
                request.attributes.request.http.path = "/v1/chat/completions"
                request.attributes.request.http.headers["authorization"] = f"Bearer {API_KEY}"
                for _ in range(100):
                    stub.Check(request, timeout=5)
                latencies = []
                for _ in range(calls):
                    started = time.perf_counter()
                    stub.Check(request, timeout=5)
                    latencies.append((time.perf_counter() - started) * 1000)
        finally:
            server.stop()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the reserve-and-commit run (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one connection each (default %(default)s)")
    parser.add_argument("--authz-calls", type=int, default=2000, help="Check calls to time (default %(default)s)")
    args = parser.parse_args()

    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {Path('/proc/cpuinfo').read_text().count('processor')} CPUs")
    with RedisServer() as server:
        operations, latencies = asyncio.run(reserve_commit(server.url, args.clients, args.seconds))
        print(
            f"reserve+commit, {args.clients} clients, 5 counters (2 budgets), {args.seconds:g} s: {operations / args.seconds:.0f} per second; "
            f"latency median {statistics.median(latencies):.2f} ms, p99 {percentile(latencies, 99):.2f} ms"
        )
        checks = authz_latency(server.url, args.authz_calls)
        print(
            f"ext_authz Check with 2 budget windows, {len(checks)} sequential calls: "
            f"median {statistics.median(checks):.2f} ms, p99 {percentile(checks, 99):.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
