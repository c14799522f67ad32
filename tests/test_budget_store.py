"""The budget store contract, run against the in-memory store, a real redis-server and a real Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from extguard.budget.memory import MemoryBudgetStore
from extguard.budget.redis_connect import RedisClient
from extguard.budget.redis_store import RedisBudgetStore
from extguard.budget.store import BudgetStore, Counter
from extguard.testing.redis_server import RedisServer

NOW = 1_800_000_000_000  # ms
LATER = NOW + 60_000
# Tenants whose hash tags fall in the slots of the first, second and third node of a 3-master cluster.
TENANTS_ON_THREE_NODES = ("hooli", "umbrella", "acme")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "redis", "cluster"])
def new_client(request: pytest.FixtureRequest) -> Callable[[], RedisClient] | None:
    """Return a factory of clients of the Redis under test, or None for the memory store."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        return lambda: redis.Redis.from_url(url)
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
        return lambda: RedisCluster.from_url(url)
    return None


@pytest.fixture
async def store(new_client: Callable[[], RedisClient] | None) -> AsyncIterator[BudgetStore]:
    if new_client is None:
        built: BudgetStore = MemoryBudgetStore()
    else:
        client = new_client()
        await client.flushdb()  # on a cluster: on every primary
        built = RedisBudgetStore(client)
    yield built
    await built.close()


def day(limit: int | None = 100, scope: str = "tenant", tenant: str = "acme") -> Counter:
    limits = {} if limit is None else {"total_tokens": limit}
    return Counter(tenant, scope, "day:2026-12-04", ttl_s=3600, limits=limits)


async def test_reserve_within_limit_admits(store: BudgetStore) -> None:
    result = await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)

    assert result.admitted
    assert result.states[0].reserved["total_tokens"] == 60
    assert result.states[0].used["total_tokens"] == 0


async def test_reserve_over_limit_rejects_and_changes_nothing(store: BudgetStore) -> None:
    await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    result = await store.reserve("r2", [day()], {"total_tokens": 41}, now_ms=NOW, expires_at_ms=LATER)

    assert not result.admitted
    assert result.rejection is not None
    assert (result.rejection.metric, result.rejection.reserved, result.rejection.requested, result.rejection.limit) == (
        "total_tokens", 60, 41, 100,
    )  # fmt: skip
    (state,) = await store.status([day()], now_ms=NOW)
    assert state.reserved["total_tokens"] == 60


async def test_reserve_up_to_limit_exactly(store: BudgetStore) -> None:
    first = await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    second = await store.reserve("r2", [day()], {"total_tokens": 40}, now_ms=NOW, expires_at_ms=LATER)

    assert first.admitted
    assert second.admitted


async def test_repeated_reserve_counts_once(store: BudgetStore) -> None:
    """A client that resends a reserve after losing the reply must not reserve twice."""
    first = await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    repeated = await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    await store.commit("r1", [day()], {"total_tokens": 10}, tenant="acme")

    (state,) = await store.status([day()], now_ms=NOW)
    assert first.admitted
    assert repeated.admitted
    assert repeated.states[0].reserved["total_tokens"] == 60
    assert state.reserved["total_tokens"] == 0
    assert state.used["total_tokens"] == 10


async def test_commit_replaces_reservation_with_actual(store: BudgetStore) -> None:
    await store.reserve("r1", [day()], {"total_tokens": 60, "cost_nanousd": 900}, now_ms=NOW, expires_at_ms=LATER)
    committed = await store.commit("r1", [day()], {"total_tokens": 25, "input_tokens": 20, "output_tokens": 5}, tenant="acme")

    (state,) = await store.status([day()], now_ms=NOW)
    assert committed
    assert state.used == {"input_tokens": 20, "output_tokens": 5, "total_tokens": 25, "cost_nanousd": 0}
    assert state.reserved == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cost_nanousd": 0}


async def test_commit_twice_counts_once(store: BudgetStore) -> None:
    await store.reserve("r1", [day()], {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    first = await store.commit("r1", [day()], {"total_tokens": 25}, tenant="acme")
    second = await store.commit("r1", [day()], {"total_tokens": 25}, tenant="acme")

    (state,) = await store.status([day()], now_ms=NOW)
    assert (first, second) == (True, False)
    assert state.used["total_tokens"] == 25


async def test_expired_reservation_stops_counting(store: BudgetStore) -> None:
    await store.reserve("r1", [day()], {"total_tokens": 90}, now_ms=NOW, expires_at_ms=NOW + 1000)
    rejected = await store.reserve("r2", [day()], {"total_tokens": 50}, now_ms=NOW + 999, expires_at_ms=LATER)
    admitted = await store.reserve("r3", [day()], {"total_tokens": 50}, now_ms=NOW + 1000, expires_at_ms=LATER)

    assert not rejected.admitted
    assert admitted.admitted
    assert admitted.states[0].reserved["total_tokens"] == 50


async def test_commit_after_expiry_records_usage(store: BudgetStore) -> None:
    await store.reserve("r1", [day()], {"total_tokens": 90}, now_ms=NOW, expires_at_ms=NOW + 1000)
    await store.reserve("r2", [day()], {"total_tokens": 5}, now_ms=NOW + 2000, expires_at_ms=LATER)
    await store.commit("r1", [day()], {"total_tokens": 70}, tenant="acme")

    (state,) = await store.status([day()], now_ms=NOW + 2000)
    assert state.used["total_tokens"] == 70
    assert state.reserved["total_tokens"] == 5


async def test_rejection_in_second_counter_leaves_first(store: BudgetStore) -> None:
    tenant_day = day(limit=1000)
    user_day = day(limit=10, scope="user:alice")
    result = await store.reserve("r1", [tenant_day, user_day], {"total_tokens": 11}, now_ms=NOW, expires_at_ms=LATER)

    assert result.rejection is not None
    assert result.rejection.counter == user_day
    states = await store.status([tenant_day, user_day], now_ms=NOW)
    assert [state.reserved["total_tokens"] for state in states] == [0, 0]


async def test_counter_without_limit_only_counts(store: BudgetStore) -> None:
    counters = [day(limit=None, scope="user:u1"), day(limit=10**10)]
    result = await store.reserve("r1", counters, {"total_tokens": 60}, now_ms=NOW, expires_at_ms=LATER)
    await store.commit("r1", counters, {"total_tokens": 10**9}, tenant="acme")
    unlimited, limited = await store.status(counters, now_ms=NOW)

    assert result.admitted
    assert [state.reserved["total_tokens"] for state in result.states] == [0, 60]
    assert unlimited.used["total_tokens"] == 10**9
    assert (unlimited.reserved["total_tokens"], limited.reserved["total_tokens"]) == (0, 0)


async def test_mark_once_first_caller_only(store: BudgetStore) -> None:
    assert await store.mark_once("acme", "soft:tenant:day:2026-12-04:total_tokens", 60)
    assert not await store.mark_once("acme", "soft:tenant:day:2026-12-04:total_tokens", 60)
    assert await store.mark_once("globex", "soft:tenant:day:2026-12-04:total_tokens", 60)


async def test_tenants_do_not_share_counters(store: BudgetStore) -> None:
    await store.reserve("r1", [day(tenant="acme")], {"total_tokens": 100}, now_ms=NOW, expires_at_ms=LATER)
    other = await store.reserve("r2", [day(tenant="globex")], {"total_tokens": 100}, now_ms=NOW, expires_at_ms=LATER)

    assert other.admitted


async def test_negative_or_unknown_amounts_rejected(store: BudgetStore) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        await store.reserve("r1", [day()], {"total_tokens": -1}, now_ms=NOW, expires_at_ms=LATER)
    with pytest.raises(ValueError, match="unknown budget metrics"):
        await store.commit("r1", [day()], {"tokens": 1}, tenant="acme")


async def test_concurrent_reserves_never_overspend(store: BudgetStore, new_client: Callable[[], RedisClient] | None) -> None:
    """200 concurrent requests of 10 tokens against 100, per tenant: exactly 10 per tenant are admitted."""
    if new_client is not None:
        # Several connections, as several extguard replicas would have.
        stores: list[BudgetStore] = [RedisBudgetStore(new_client()) for _ in range(8)]
    else:
        stores = [store]

    async def attempt(index: int, tenant: str) -> bool:
        chosen = stores[index % len(stores)]
        result = await chosen.reserve(f"r{index}", [day(tenant=tenant)], {"total_tokens": 10}, now_ms=NOW, expires_at_ms=LATER)
        return result.admitted

    attempts = [(index, tenant) for index in range(200) for tenant in TENANTS_ON_THREE_NODES]
    outcomes = await asyncio.gather(*(attempt(index, tenant) for index, tenant in attempts))
    states = await store.status([day(tenant=tenant) for tenant in TENANTS_ON_THREE_NODES], now_ms=NOW)
    if new_client is not None:
        for extra in stores:
            await extra.close()

    for tenant in TENANTS_ON_THREE_NODES:
        admitted = [admitted for (_, name), admitted in zip(attempts, outcomes, strict=True) if name == tenant]
        assert sum(admitted) == 10, tenant
    assert [state.reserved["total_tokens"] for state in states] == [100, 100, 100]


async def test_every_operation_for_tenants_on_three_nodes(store: BudgetStore) -> None:
    """Each tenant's calls touch one slot, so they work wherever the tenant's slot lives."""
    from extguard.budget.store import LedgerEntry

    for tenant in TENANTS_ON_THREE_NODES:
        counters = [day(tenant=tenant), day(limit=None, scope="user:u1", tenant=tenant)]
        reserved = await store.reserve(f"{tenant}-r1", counters, {"total_tokens": 30}, now_ms=NOW, expires_at_ms=LATER)
        committed = await store.commit(
            f"{tenant}-r1", counters, {"total_tokens": 20}, tenant=tenant, ledger=LedgerEntry("2026-12-04", "gpt-4o")
        )
        tenant_day, user_day = await store.status(counters, now_ms=NOW)
        ledger = await store.usage(tenant, ["2026-12-04"])
        first_mark = await store.mark_once(tenant, "soft:tenant:day:2026-12-04:total_tokens", 60)
        await store.reset(counters[0])
        (after_reset,) = await store.status(counters[:1], now_ms=NOW)

        assert reserved.admitted, tenant
        assert committed, tenant
        assert (tenant_day.used["total_tokens"], user_day.used["total_tokens"]) == (20, 20), tenant
        assert ledger["2026-12-04"]["gpt-4o"]["requests"] == 1, tenant
        assert first_mark, tenant
        assert after_reset.used["total_tokens"] == 0, tenant


async def test_redis_reloads_flushed_scripts(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    await client.flushdb()
    store = RedisBudgetStore(client)
    await store.reserve("r1", [day()], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    await client.script_flush()

    result = await store.reserve("r2", [day()], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    await store.close()

    assert result.admitted
    assert result.states[0].reserved["total_tokens"] == 2


async def test_redis_keys_expire_and_share_hash_tag(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    await client.flushdb()
    store = RedisBudgetStore(client)
    await store.reserve("r1", [day()], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    await store.commit("r1", [day()], {"total_tokens": 1}, tenant="acme")

    keys = sorted(key.decode() for key in await client.keys("*"))
    ttls = [await client.ttl(key) for key in keys]
    await store.close()

    assert keys == ["eg:{acme}:c:tenant:day:2026-12-04", "eg:{acme}:done:r1"]
    assert all(0 < ttl for ttl in ttls)


async def test_commit_spooled_while_redis_down_then_replayed() -> None:
    """Usage committed during an outage waits in the spool and reaches Redis once it is back."""
    from extguard.budget.keeper import BudgetKeeper
    from extguard.config.tenancy import Tenancy

    server = RedisServer()
    server.start()
    tenancy = Tenancy.model_validate(
        {"store": {"backend": "redis", "url": server.url, "timeout_ms": 300}, "tenants": {"acme": {}}}
    )
    keeper = BudgetKeeper.from_settings(tenancy, {})
    try:
        await keeper.store.reserve("r1", [day()], {"total_tokens": 50}, now_ms=NOW, expires_at_ms=LATER)
        server.stop()
        await keeper.commit_or_spool("r1", [day()], {"total_tokens": 30}, tenant="acme")
        await keeper.commit_or_spool("r2", [day()], {"total_tokens": 5}, tenant="acme")
        spooled = len(keeper.spool)
        spool_gauge = keeper.metrics.registry.get_sample_value("extguard_budget_spool_records")
        errors = keeper.metrics.registry.get_sample_value("extguard_budget_store_errors_total", {"operation": "commit"})

        server.start()  # an empty Redis on the same port, as after a restart without persistence
        replayed = await keeper.replay_spool()
        (state,) = await keeper.store.status([day()], now_ms=NOW)
    finally:
        await keeper.close()
        server.close()

    assert (spooled, spool_gauge, errors) == (2, 2.0, 2.0)
    assert replayed == 2
    assert state.used["total_tokens"] == 35
    assert len(keeper.spool) == 0


async def test_commit_outlives_cancelled_caller() -> None:
    """Envoy may close the ext_proc stream while a commit waits for a slow store; the usage still lands."""
    from extguard.budget.keeper import BudgetKeeper
    from extguard.config.tenancy import Tenancy

    class SlowStore(MemoryBudgetStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def commit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            await self.release.wait()
            return await super().commit(*args, **kwargs)

    store = SlowStore()
    keeper = BudgetKeeper(Tenancy.model_validate({"tenants": {"acme": {}}, "store": {"timeout_ms": 5000}}), {}, store)
    caller = asyncio.create_task(keeper.commit_or_spool("r1", [day()], {"total_tokens": 30}, tenant="acme"))
    await asyncio.sleep(0.01)
    caller.cancel()
    store.release.set()
    await asyncio.sleep(0.01)
    (state,) = await store.status([day()], now_ms=NOW)
    await keeper.close()

    assert caller.cancelled()
    assert state.used["total_tokens"] == 30


async def test_spool_is_bounded() -> None:
    from extguard.budget.keeper import BudgetKeeper
    from extguard.config.tenancy import Tenancy

    server = RedisServer()  # never started
    tenancy = Tenancy.model_validate(
        {"store": {"backend": "redis", "url": server.url, "timeout_ms": 100, "spool_max": 3}, "tenants": {"acme": {}}}
    )
    keeper = BudgetKeeper.from_settings(tenancy, {})
    for index in range(5):
        await keeper.commit_or_spool(f"r{index}", [day()], {"total_tokens": 1}, tenant="acme")
    spooled_ids = [record.reservation_id for record in keeper.spool]
    dropped = keeper.metrics.registry.get_sample_value("extguard_budget_spool_dropped_total")
    await keeper.close()
    server.close()

    assert spooled_ids == ["r2", "r3", "r4"]
    assert dropped == 2.0


async def test_ledger_sums_commits_per_day_and_model(store: BudgetStore) -> None:
    from extguard.budget.store import LedgerEntry

    usage = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120, "cost_nanousd": 5000}
    await store.commit("r1", [day()], usage, tenant="acme", ledger=LedgerEntry("2026-12-04", "gpt-4o", 40))
    await store.commit("r2", [], usage, tenant="acme", ledger=LedgerEntry("2026-12-04", "gpt-4o", 0))
    await store.commit("r3", [], usage, tenant="acme", ledger=LedgerEntry("2026-12-05", "claude-3-haiku", 0))
    await store.commit("r3", [], usage, tenant="acme", ledger=LedgerEntry("2026-12-05", "claude-3-haiku", 0))

    ledger = await store.usage("acme", ["2026-12-03", "2026-12-04", "2026-12-05"])

    assert ledger == {
        "2026-12-04": {"gpt-4o": {"requests": 2, "input_tokens": 200, "cached_input_tokens": 40, "output_tokens": 40, "cost_nanousd": 10000}},
        "2026-12-05": {"claude-3-haiku": {"requests": 1, "input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 20, "cost_nanousd": 5000}},
    }
    assert await store.usage("globex", ["2026-12-04"]) == {}


async def test_changed_budget_keeps_counted_usage(redis_server: RedisServer) -> None:
    """A policy that moves a budget to another window, or lowers it, counts what was already spent."""
    from datetime import UTC, datetime

    from extguard.budget.keeper import BudgetKeeper
    from extguard.budget.windows import Window
    from extguard.config.tenancy import Tenancy

    def keeper_for(budgets: list[dict]) -> BudgetKeeper:
        store = {"backend": "redis", "url": redis_server.url, "timeout_ms": 1000}
        return BudgetKeeper.from_settings(Tenancy.model_validate({"store": store, "tenants": {"acme": {"budgets": budgets}}}), {})

    await redis.Redis.from_url(redis_server.url).flushdb()
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    before = keeper_for([{"window": "day", "limit": 1000}])
    counters = [item.counter for item in before.counters("acme", None, now)]
    await before.commit_or_spool("r1", counters, {"total_tokens": 600}, tenant="acme")
    await before.close()

    after = keeper_for([{"window": "day", "limit": 500}, {"window": "week", "limit": 700}])
    planned = after.counters("acme", None, now)
    check = await after.pre_check("acme", None, now)
    now_ms = int(now.timestamp() * 1000)
    week_only = [item.counter for item in planned if item.period.window is Window.WEEK]
    reserve = await after.store.reserve("r2", week_only, {"total_tokens": 200}, now_ms=now_ms, expires_at_ms=now_ms + 60_000)
    await after.close()

    assert check.exhausted is not None
    assert (check.exhausted.window, check.exhausted.limit) == ("tenant day", 500)
    assert reserve.rejection is not None
    assert (reserve.rejection.used, reserve.rejection.limit) == (600, 700)


def spool_keeper(url: str, spool_file: Path, spool_max: int = 100):  # type: ignore[no-untyped-def]
    from extguard.budget.keeper import BudgetKeeper
    from extguard.config.tenancy import Tenancy

    store = {"backend": "redis", "url": url, "timeout_ms": 300, "spool_max": spool_max, "spool_file": str(spool_file)}
    return BudgetKeeper.from_settings(Tenancy.model_validate({"store": store, "tenants": {"acme": {}}}), {})


async def test_spool_file_keeps_usage_across_restart(tmp_path: Path) -> None:
    """Usage spooled while Redis is down is written to the spool file at shutdown and replayed at the next start."""
    from extguard.budget.store import LedgerEntry

    spool_file = tmp_path / "spool.jsonl"
    server = RedisServer()  # not started yet: Redis is down
    first = spool_keeper(server.url, spool_file)
    await first.start()
    await first.commit_or_spool("r1", [day()], {"total_tokens": 30}, tenant="acme", ledger=LedgerEntry("2026-12-04", "gpt-4o", 4))
    await first.commit_or_spool("r2", [day(), day(scope="user:u1")], {"total_tokens": 5}, tenant="acme")
    await first.close()
    lines_after_shutdown = spool_file.read_text(encoding="utf-8").splitlines()

    server.start()
    try:
        second = spool_keeper(server.url, spool_file)
        await second.start()
        await asyncio.sleep(0.3)  # the replay runs in the background
        tenant_day, user_day = await second.store.status([day(), day(scope="user:u1")], now_ms=NOW)
        ledger = await second.store.usage("acme", ["2026-12-04"])
        await second.close()
    finally:
        server.close()

    assert len(lines_after_shutdown) == 2
    assert (tenant_day.used["total_tokens"], user_day.used["total_tokens"]) == (35, 5)
    assert ledger["2026-12-04"]["gpt-4o"]["cached_input_tokens"] == 4
    assert not spool_file.exists()


async def test_spool_file_survives_crash(tmp_path: Path) -> None:
    """Records are in the file as soon as they are spooled, so a crash without shutdown keeps them.
    A record replayed before the crash is counted once."""
    spool_file = tmp_path / "spool.jsonl"
    server = RedisServer(durable=True)
    server.start()
    try:
        crashed = spool_keeper(server.url, spool_file)
        await crashed.store.commit("r1", [day()], {"total_tokens": 30}, tenant="acme")  # committed before the outage
        server.stop()
        await crashed.commit_or_spool("r2", [day()], {"total_tokens": 5}, tenant="acme")
        spool_file.write_text(
            spool_file.read_text(encoding="utf-8").replace('"r2"', '"r1"', 1)  # a record that was already committed
            + spool_file.read_text(encoding="utf-8") + '{"reservation_id": "cut sh', encoding="utf-8"
        )  # fmt: skip
        # No close(): the process is gone.
        server.start()
        restarted = spool_keeper(server.url, spool_file)
        await restarted.start()
        await asyncio.sleep(0.3)
        (state,) = await restarted.store.status([day()], now_ms=NOW)
        await restarted.close()
        await crashed.store.close()
    finally:
        server.close()

    assert state.used["total_tokens"] == 35
    assert not spool_file.exists()


async def test_spool_off_drops_usage_and_counts_it(tmp_path: Path) -> None:
    server = RedisServer()  # never started
    keeper = spool_keeper(server.url, tmp_path / "spool.jsonl", spool_max=0)
    await keeper.commit_or_spool("r1", [day()], {"total_tokens": 1}, tenant="acme")
    dropped = keeper.metrics.registry.get_sample_value("extguard_budget_spool_dropped_total")
    await keeper.close()
    server.close()

    assert dropped == 1.0
    assert len(keeper.spool) == 0


async def test_cost_budget_rejection_and_unpriced_model(caplog: pytest.LogCaptureFixture) -> None:
    """A cost budget's 429 names cost_usd, not the store's nano-USD, and a model without a price is logged once."""
    from extguard.budget.keeper import BudgetKeeper
    from extguard.budget.meter import Meter
    from extguard.config.tenancy import Price, Tenancy

    tenancy = Tenancy.model_validate({"tenants": {"acme": {"budgets": [{"window": "day", "metric": "cost_usd", "limit": 0.001}]}}})
    keeper = BudgetKeeper(tenancy, {"gpt-4o*": Price(input=2.5, output=10)}, MemoryBudgetStore())
    # 400 characters (100 tokens) at 2.5 USD and 1000 output tokens at 10 USD per million: 0.01025 USD.
    priced = await Meter(keeper, "acme", None, "request-1").reserve("gpt-4o-mini", {"max_tokens": 1000}, 400)
    caplog.set_level("WARNING", logger="extguard.budget")
    unpriced = [await Meter(keeper, "acme", None, f"request-{n}").reserve("mystery-model", {"max_tokens": 1000}, 400) for n in (2, 3)]
    await keeper.close()

    assert (priced.status, priced.code) == (429, "extguard_budget_exhausted")
    assert "tenant day cost_usd limit of tenant 'acme'" in priced.message
    assert [admission.admitted for admission in unpriced] == [True, True]
    assert caplog.text.count("model 'mystery-model' has no entry in the pricing table") == 1


async def test_spool_file_in_missing_folder(tmp_path: Path) -> None:
    """A spool file that cannot be written stops the start; while running, usage stays in memory."""
    server = RedisServer()  # never started
    keeper = spool_keeper(server.url, tmp_path / "missing" / "spool.jsonl")
    with pytest.raises(OSError, match="does not exist or is not writable"):
        await keeper.start()
    await keeper.commit_or_spool("r1", [day()], {"total_tokens": 1}, tenant="acme")
    spooled = len(keeper.spool)
    await keeper.close()  # logs the lost record; must not raise
    server.close()

    assert spooled == 1
    assert not (tmp_path / "missing").exists()
