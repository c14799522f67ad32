"""The Redis store's modes and credentials: settings, Redis Cluster, Sentinel with failover, passwords from the environment.

The tests start real redis-server processes on loopback ports. The contract tests in
test_budget_store.py also run against the cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError
from redis.crc import key_slot
from redis.exceptions import AuthenticationError

from extguard.budget.keeper import BudgetKeeper
from extguard.budget.redis_connect import StoreCredentialError
from extguard.budget.redis_store import RedisBudgetStore
from extguard.budget.store import Counter, LedgerEntry
from extguard.cli import main
from extguard.config.tenancy import StoreSettings, Tenancy
from extguard.testing.redis_server import RedisServer
from extguard.testing.redis_topologies import RedisClusterServers, RedisSentinelServers
from extguard.testing.stack import free_port

NOW = 1_800_000_000_000  # ms
LATER = NOW + 60_000
SECRET = "s3cret-Budget-pw"
TENANTS_ON_THREE_NODES = ("hooli", "umbrella", "acme")


def day(tenant: str = "acme", limit: int = 100) -> Counter:
    return Counter(tenant, "tenant", "day:2026-12-04", ttl_s=3600, limits={"total_tokens": limit})


def redis_settings(**settings: object) -> StoreSettings:
    return StoreSettings.model_validate({"backend": "redis", "timeout_ms": 2000, **settings})


def extguard(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    """Run the `extguard` command in this process and return its exit status, stdout and stderr."""
    status = main(list(arguments))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "sentinel"}, "mode sentinel needs sentinel_master and sentinels"),
        ({"mode": "sentinel", "sentinel_master": "budgets"}, "mode sentinel needs sentinels"),
        ({"sentinels": ["127.0.0.1:26379"]}, "sentinels: only mode sentinel reads these settings, but mode is standalone"),
        ({"mode": "cluster", "sentinel_password_env": "PW"}, "sentinel_password_env: only mode sentinel reads"),
        ({"mode": "cluster", "url": "redis://127.0.0.1:7000/2"}, "Redis Cluster has only database 0"),
        ({"mode": "cluster", "url": "unix:///run/redis.sock"}, "mode cluster needs a redis:// or rediss:// url"),
        ({"url": "redis://127.0.0.1:6379/zero"}, "invalid database 'zero'"),
        ({"password_env": "REDIS-PASSWORD"}, "invalid environment variable name 'REDIS-PASSWORD'"),
        ({"mode": "sentinel", "sentinel_master": "m", "sentinels": ["host:port"]}, "invalid address 'host:port'"),
        ({"mode": "sentinel", "sentinel_master": "m", "sentinels": ["a:1:2"]}, "invalid address 'a:1:2'"),
        ({"backend": "memory", "mode": "cluster"}, "mode: only the redis backend reads these settings"),
        ({"backend": "memory", "password_env": "PW"}, "password_env: only the redis backend reads"),
    ],
)
def test_store_settings_rejected(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StoreSettings.model_validate({"backend": "redis", **settings})


def test_sentinel_addresses_default_port() -> None:
    settings = redis_settings(mode="sentinel", sentinel_master="budgets", sentinels=["sentinel-0", "10.0.0.2:26380", "[::1]:26381"])

    assert settings.sentinel_addresses == [("sentinel-0", 26379), ("10.0.0.2", 26380), ("::1", 26381)]


def test_check_config_reports_mode_and_unset_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EG_REDIS_PASSWORD", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "tenancy:\n"
        "  store: {backend: redis, mode: sentinel, url: 'rediss://:inline-pw@ignored:1/3', sentinel_master: budgets,\n"
        "          sentinels: ['sentinel-0:26379', 'sentinel-1:26379'], password_env: EG_REDIS_PASSWORD}\n"
        "  tenants: {acme: {}}\n",
        encoding="utf-8",
    )
    status, output, _ = extguard(capsys, "check-config", str(policy))

    assert status == 0
    assert (
        "store redis sentinel at master 'budgets' through Sentinels sentinel-0:26379, sentinel-1:26379 "
        "(rediss://:***@ignored:1/3), password from $EG_REDIS_PASSWORD"
    ) in output
    assert "note: EG_REDIS_PASSWORD is not set here" in output
    assert "inline-pw" not in output


# -- credentials from the environment ----------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with RedisServer(arguments=["--requirepass", SECRET]) as server:
        yield server


async def test_password_from_environment(password_server: RedisServer) -> None:
    url = password_server.url.replace("redis://", "redis://:wrong-inline-password@")  # the variable wins
    store = RedisBudgetStore.from_settings(redis_settings(url=url, password_env="EG_REDIS_PASSWORD"), {"EG_REDIS_PASSWORD": SECRET})
    result = await store.reserve("r1", [day()], {"total_tokens": 10}, now_ms=NOW, expires_at_ms=LATER)
    await store.close()

    assert result.admitted


async def test_acl_user_from_environment() -> None:
    """An ACL user: username_env and password_env replace the URL's user and password."""
    acl = ["--user", "budgets", "on", f">{SECRET}", "~eg:*", "+@all", "--user", "default", "off"]
    with RedisServer(arguments=acl) as server:
        url = server.url.replace("redis://", "redis://someone:else@")
        settings = redis_settings(url=url, username_env="EG_REDIS_USER", password_env="EG_REDIS_PASSWORD")
        store = RedisBudgetStore.from_settings(settings, {"EG_REDIS_USER": "budgets", "EG_REDIS_PASSWORD": SECRET})
        result = await store.reserve("r1", [day()], {"total_tokens": 10}, now_ms=NOW, expires_at_ms=LATER)
        await store.close()

    assert result.admitted


@pytest.mark.parametrize(("environ", "state"), [({}, "not set"), ({"EG_REDIS_PASSWORD": ""}, "empty")])
def test_password_variable_missing(environ: dict[str, str], state: str) -> None:
    settings = redis_settings(password_env="EG_REDIS_PASSWORD")
    with pytest.raises(StoreCredentialError) as raised:
        RedisBudgetStore.from_settings(settings, environ)

    assert str(raised.value) == (
        f"environment variable EG_REDIS_PASSWORD (tenancy.store.password_env) is {state}, "
        "so extguard cannot authenticate to Redis. Set it to the Redis password."
    )


async def test_wrong_password_error_hides_it(password_server: RedisServer) -> None:
    store = RedisBudgetStore.from_settings(redis_settings(url=password_server.url, password_env="PW"), {"PW": "not-the-password"})
    with pytest.raises(AuthenticationError) as raised:
        await store.reserve("r1", [day()], {"total_tokens": 10}, now_ms=NOW, expires_at_ms=LATER)
    await store.close()

    assert "not-the-password" not in str(raised.value)


async def test_verify_rejects_wrong_password(password_server: RedisServer) -> None:
    store = RedisBudgetStore.from_settings(redis_settings(url=password_server.url, password_env="PW"), {"PW": "not-the-password"})
    with pytest.raises(StoreCredentialError) as raised:
        await store.verify()
    await store.close()

    assert "rejected extguard's credentials: check the password in $PW (tenancy.store.password_env)" in str(raised.value)
    assert "not-the-password" not in str(raised.value)


async def test_verify_says_no_password_was_sent(password_server: RedisServer) -> None:
    store = RedisBudgetStore.from_settings(redis_settings(url=password_server.url))
    with pytest.raises(StoreCredentialError) as raised:
        await store.verify()
    await store.close()

    assert "no password was sent; name the variable that holds it in tenancy.store.password_env" in str(raised.value)


async def test_verify_passes_while_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisBudgetStore.from_settings(redis_settings(url=f"redis://127.0.0.1:{free_port()}/0"))
    await store.verify()  # the failure mode applies to requests until Redis is back
    await store.close()

    assert "not reachable at start (ConnectionError); requests follow failure_mode closed until it is reachable" in caplog.text


def test_serve_stops_on_wrong_password(tmp_path: Path, password_server: RedisServer) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"tenancy:\n  store: {{backend: redis, url: '{password_server.url}', password_env: EG_REDIS_PASSWORD}}\n"
        "  tenants: {acme: {}}\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "extguard", "serve", "--config", str(policy), "--listen", "127.0.0.1:0", "--metrics-listen", "off"]
    serve = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "EG_REDIS_PASSWORD": "wrong-one"})

    assert serve.returncode == 1
    assert "rejected extguard's credentials: check the password in $EG_REDIS_PASSWORD" in serve.stderr
    assert "wrong-one" not in serve.stderr


def test_serve_and_usage_stop_without_password(
    tmp_path: Path, password_server: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EG_REDIS_PASSWORD", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"tenancy:\n  store: {{backend: redis, url: '{password_server.url}', password_env: EG_REDIS_PASSWORD}}\n"
        "  tenants: {acme: {}}\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "extguard", "serve", "--config", str(policy), "--listen", "127.0.0.1:0", "--metrics-listen", "off"]
    serve = subprocess.run(command, capture_output=True, text=True, timeout=60)
    usage_status, _, usage_errors = extguard(capsys, "usage", "--config", str(policy))
    expected = "error: environment variable EG_REDIS_PASSWORD (tenancy.store.password_env) is not set"

    assert serve.returncode == 1
    assert serve.stderr.startswith(expected)
    assert usage_status == 2
    assert usage_errors.startswith(expected)


# -- Redis Cluster -----------------------------------------------------------------------------


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisBudgetStore]:
    """A store on the shared cluster, emptied first: other test modules write to the same cluster."""
    with redis.RedisCluster.from_url(redis_cluster.url) as client:
        client.flushdb()  # on every primary
    store = RedisBudgetStore.from_settings(redis_settings(mode="cluster", url=redis_cluster.url))
    yield store
    await store.close()


def test_sample_tenants_span_three_nodes(redis_cluster: RedisClusterServers) -> None:
    ports = {redis_cluster.port_for_slot(key_slot(tenant.encode())) for tenant in TENANTS_ON_THREE_NODES}

    assert len(ports) == 3


async def test_cluster_keeps_each_tenant_on_its_node(redis_cluster: RedisClusterServers, cluster_store: RedisBudgetStore) -> None:
    for tenant in TENANTS_ON_THREE_NODES:
        await cluster_store.reserve(f"{tenant}-r1", [day(tenant)], {"total_tokens": 5}, now_ms=NOW, expires_at_ms=LATER)
        await cluster_store.commit(f"{tenant}-r1", [day(tenant)], {"total_tokens": 4}, tenant=tenant, ledger=LedgerEntry("2026-12-04", "m"))

    for tenant in TENANTS_ON_THREE_NODES:
        port = redis_cluster.port_for_slot(key_slot(tenant.encode()))
        with redis.Redis(port=port) as node:
            keys = {key.decode() for key in node.keys(f"eg:{{{tenant}}}:*")}
        assert keys == {
            f"eg:{{{tenant}}}:c:tenant:day:2026-12-04",
            f"eg:{{{tenant}}}:ledger:2026-12-04",
            f"eg:{{{tenant}}}:done:{tenant}-r1",
        }, tenant


async def test_cluster_reloads_flushed_scripts(redis_cluster: RedisClusterServers, cluster_store: RedisBudgetStore) -> None:
    """After SCRIPT FLUSH on every node (as after restarts), EVALSHA's NOSCRIPT makes the store load the scripts again."""
    first = await cluster_store.reserve("r1", [day("umbrella")], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    for server in redis_cluster.servers:
        with redis.Redis(port=server.port) as node:
            node.script_flush()
    results = [
        await cluster_store.reserve("r2", [day(tenant)], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
        for tenant in TENANTS_ON_THREE_NODES
    ]

    assert first.admitted
    assert all(result.admitted for result in results)


async def test_cluster_store_during_resharding(redis_cluster: RedisClusterServers, cluster_store: RedisBudgetStore) -> None:
    """A tenant's slot moves to another node: calls work before and after, and fail in between without changing anything.

    While the slot migrates, every script names a key that the source node lacks (a reservation
    set emptied by its commit, a new commit marker), so Redis replies TRYAGAIN until the client
    gives up.
    """
    tenant = "initech"  # not one of TENANTS_ON_THREE_NODES, whose nodes other tests check
    slot = key_slot(tenant.encode())
    source = redis_cluster.port_for_slot(slot)
    target = next(server.port for server in redis_cluster.servers if server.port != source)
    counters = [day(tenant, limit=1000), Counter(tenant, "user:u1", "day:2026-12-04", ttl_s=3600, limits={"total_tokens": 1000})]

    async def spend(reservation_id: str) -> bool:
        reserved = await cluster_store.reserve(reservation_id, counters, {"total_tokens": 50}, now_ms=NOW, expires_at_ms=LATER)
        committed = await cluster_store.commit(reservation_id, counters, {"total_tokens": 10}, tenant=tenant)
        return reserved.admitted and committed

    before = await spend("r1")
    redis_cluster.begin_slot_migration(slot, source, target)
    with pytest.raises(redis.exceptions.ClusterError, match="TTL exhausted"):
        await spend("r2")
    moved = redis_cluster.migrate_keys(slot, source, target, count=1)
    with pytest.raises(redis.exceptions.ClusterError, match="TTL exhausted"):
        await spend("r3")
    while moved:
        moved = redis_cluster.migrate_keys(slot, source, target, count=100)
    redis_cluster.finish_slot_migration(slot, target)
    after = await spend("r4")
    states = await cluster_store.status(counters, now_ms=NOW)

    assert (before, after) == (True, True)
    assert redis_cluster.port_for_slot(slot) == target
    assert [state.used["total_tokens"] for state in states] == [20, 20]
    assert [state.reserved["total_tokens"] for state in states] == [0, 0]


def test_usage_and_budget_commands_on_cluster(
    tmp_path: Path, redis_cluster: RedisClusterServers, capsys: pytest.CaptureFixture[str]
) -> None:
    """`extguard usage --config` reads the cluster, and `budget status|reset` work through a server that uses it."""
    with redis.RedisCluster.from_url(redis_cluster.url) as client:
        client.flushdb()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"tenancy:\n  store: {{backend: redis, mode: cluster, url: '{redis_cluster.url}', timeout_ms: 2000}}\n"
        "  tenants:\n"
        + "".join(f"    {tenant}: {{budgets: [{{window: day, limit: 1000}}]}}\n" for tenant in TENANTS_ON_THREE_NODES),
        encoding="utf-8",
    )
    asyncio.run(spend_in_cluster(policy))

    usage_status, usage, _ = extguard(capsys, "usage", "--config", str(policy), "--format", "json")
    admin_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "extguard", "serve", "--config", str(policy), "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--admin-listen", f"127.0.0.1:{admin_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(admin_port, server)
        address = f"127.0.0.1:{admin_port}"
        before = extguard(capsys, "budget", "status", "--server", address, "--tenant", "umbrella", "--format", "json")
        reset = extguard(capsys, "budget", "reset", "--server", address, "--tenant", "umbrella", "--window", "day")
        after = extguard(capsys, "budget", "status", "--server", address, "--tenant", "umbrella", "--format", "json")
        untouched = extguard(capsys, "budget", "status", "--server", address, "--tenant", "hooli", "--format", "json")
    finally:
        server.terminate()
        server.wait(timeout=15)

    assert usage_status == 0
    assert sorted((row["tenant"], row["input_tokens"]) for row in json.loads(usage)) == [
        ("acme", 30), ("hooli", 10), ("umbrella", 20),
    ]  # fmt: skip
    assert before[0] == 0, before[2]
    assert json.loads(before[1])[0]["used"] == 20
    assert reset[0] == 0, reset[2]
    assert json.loads(after[1])[0]["used"] == 0
    assert json.loads(untouched[1])[0]["used"] == 10


async def spend_in_cluster(policy: Path) -> None:
    """Commit 10, 20 and 30 input tokens today for hooli, umbrella and acme, as a replica would."""
    from extguard.config.loader import load_policy
    from extguard.scan.detectors import default_detectors

    tenancy = load_policy(policy, default_detectors()).tenancy
    assert tenancy is not None
    keeper = BudgetKeeper.from_settings(tenancy, {})
    for amount, tenant in zip((10, 20, 30), TENANTS_ON_THREE_NODES, strict=True):
        planned = keeper.counters(tenant, None)
        today = next(item.period.id for item in planned if item.period.window.value == "day").removeprefix("day:")
        usage = {"input_tokens": amount, "total_tokens": amount}
        ledger = LedgerEntry(today, "gpt-4o")
        await keeper.commit_or_spool(f"{tenant}-1", [item.counter for item in planned], usage, tenant=tenant, ledger=ledger)
    assert len(keeper.spool) == 0
    await keeper.close()


def wait_for_port(port: int, process: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"extguard serve exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"extguard serve did not listen on {port} within {timeout_s} s")


# -- Sentinel ----------------------------------------------------------------------------------


@pytest.fixture
def sentinel_group() -> Iterator[RedisSentinelServers]:
    with RedisSentinelServers("budgets", password=SECRET, sentinel_password="sentinel-" + SECRET) as group:
        yield group


def sentinel_settings(group: RedisSentinelServers) -> StoreSettings:
    return redis_settings(
        mode="sentinel", url="redis://sentinel-mode/0", sentinel_master=group.master_name, sentinels=[group.sentinel_address],
        password_env="EG_REDIS_PASSWORD", sentinel_password_env="EG_SENTINEL_PASSWORD",
    )  # fmt: skip


SENTINEL_ENVIRON = {"EG_REDIS_PASSWORD": SECRET, "EG_SENTINEL_PASSWORD": "sentinel-" + SECRET}


async def test_sentinel_store_follows_failover(sentinel_group: RedisSentinelServers) -> None:
    """After SENTINEL FAILOVER the old master still accepts writes for seconds: the store must move to the new one."""
    store = RedisBudgetStore.from_settings(sentinel_settings(sentinel_group), SENTINEL_ENVIRON, master_check_interval_s=0.05)
    old_master = sentinel_group.master_port()
    await store.reserve("r1", [day()], {"total_tokens": 50}, now_ms=NOW, expires_at_ms=LATER)
    await store.commit("r1", [day()], {"total_tokens": 30}, tenant="acme")
    with redis.Redis(port=old_master, password=SECRET) as master:
        replicated = master.wait(1, 5000)  # the replica has every write before it is promoted

    new_master = sentinel_group.failover()
    await asyncio.sleep(0.5)  # time for several master checks
    reserved = await store.reserve("r2", [day()], {"total_tokens": 70}, now_ms=NOW, expires_at_ms=LATER)
    rejected = await store.reserve("r3", [day()], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    committed = await store.commit("r2", [day()], {"total_tokens": 60}, tenant="acme")
    await store.close()
    with redis.Redis(port=new_master, password=SECRET) as master:
        used_on_new_master = int(master.hget("eg:{acme}:c:tenant:day:2026-12-04", "used:total_tokens") or 0)

    assert replicated == 1
    assert new_master != old_master
    assert reserved.admitted
    assert reserved.states[0].used["total_tokens"] == 30
    assert not rejected.admitted
    assert committed
    assert used_on_new_master == 90


async def test_sentinel_rejects_wrong_sentinel_password(sentinel_group: RedisSentinelServers) -> None:
    environ = {**SENTINEL_ENVIRON, "EG_SENTINEL_PASSWORD": "wrong"}
    store = RedisBudgetStore.from_settings(sentinel_settings(sentinel_group), environ)
    with pytest.raises(redis.exceptions.ConnectionError) as raised:
        await store.reserve("r1", [day()], {"total_tokens": 1}, now_ms=NOW, expires_at_ms=LATER)
    await store.close()

    assert "wrong" not in str(raised.value)
    assert SECRET not in str(raised.value)


async def test_keeper_spools_while_sentinel_master_is_down(sentinel_group: RedisSentinelServers) -> None:
    """With master and replica down, a commit goes to the spool, and it lands once the master is back."""
    settings = sentinel_settings(sentinel_group).model_copy(update={"timeout_ms": 300})
    tenancy = Tenancy(store=settings, tenants={"acme": {}})  # type: ignore[arg-type]
    keeper = BudgetKeeper(tenancy, {}, RedisBudgetStore.from_settings(settings, SENTINEL_ENVIRON))
    sentinel_group.master.stop()
    sentinel_group.replica.stop()
    await keeper.commit_or_spool("r1", [day()], {"total_tokens": 5}, tenant="acme")
    spooled = len(keeper.spool)
    sentinel_group.master.start()
    replayed = await keeper.replay_spool()
    (state,) = await keeper.store.status([day()], now_ms=NOW)
    await keeper.close()

    assert spooled == 1
    assert replayed == 1
    assert state.used["total_tokens"] == 5
