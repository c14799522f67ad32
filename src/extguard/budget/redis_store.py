"""The Redis budget store: every change is one Lua script, so reserve-and-check is atomic.

Keys of one tenant share the hash tag `{tenant}`, so a tenant's keys sit in one Redis Cluster
slot and one script can touch them all. Per counter (scope and window period):

- `eg:{T}:c:SCOPE:PERIOD`, a hash: `used:METRIC` and `rsv:METRIC` totals, and `r:ID`, the
  amounts of each open reservation (`METRIC=AMOUNT` pairs joined by `,`);
- `eg:{T}:z:SCOPE:PERIOD`, a sorted set of open reservation ids scored by expiry in ms.

Both expire `ttl_s` after their last change. `eg:{T}:done:ID` marks a committed reservation for
COMMIT_MARKER_TTL_S, so a replayed commit is not counted twice. Scripts are loaded once and
called by SHA; after a NOSCRIPT error (Redis restarted or flushed its script cache) they are
loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import AuthenticationError, NoScriptError, RedisError

from extguard.budget.redis_connect import RedisClient, StoreCredentialError, connect
from extguard.budget.store import (
    COMMIT_MARKER_TTL_S,
    LEDGER_METRICS,
    LEDGER_TTL_S,
    METRICS,
    LedgerEntry,
    Counter,
    CounterState,
    Rejection,
    ReserveResult,
    check_amounts,
)
from extguard.config.tenancy import StoreSettings

log = logging.getLogger("extguard.budget")
# At most this many expired reservations are dropped per counter and call, to bound each script.
SWEEP_LIMIT = 64
# Seconds between two requests to the Sentinels for the master's address (sentinel mode).
MASTER_CHECK_INTERVAL_S = 1.0

# KEYS: counter hash and reservation set of each counter, in pairs (c1, z1, c2, z2, ...).
# ARGV: now_ms, reservation id, expiry ms, metric count M, then M metric names, M amounts,
#       then per counter: ttl_s followed by M limits (-1 for none). A counter without any
#       limit is not reserved against; it only counts commits.
# Returns {1, used and reserved per counter and metric...} when admitted, or
#         {0, counter index (1-based), metric index (1-based), used, reserved} when rejected.
# Lua shared by both scripts: drop reservation `rid` from counter hash `c` and its set `z`,
# subtracting its stored amounts from the reserved totals.
_RELEASE_LUA = """
local function release(c, z, rid)
  local stored = redis.call('HGET', c, 'r:' .. rid)
  if stored then
    for pair in string.gmatch(stored, '[^,]+') do
      local name, amount = string.match(pair, '([^=]+)=(%d+)')
      if amount ~= '0' then
        redis.call('HINCRBY', c, 'rsv:' .. name, '-' .. amount)
      end
    end
    redis.call('HDEL', c, 'r:' .. rid)
  end
  redis.call('ZREM', z, rid)
end
"""

RESERVE_SCRIPT = _RELEASE_LUA + """
local now_ms = tonumber(ARGV[1])
local id = ARGV[2]
local expires_at = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local metrics, amounts = {}, {}
for i = 1, m do
  metrics[i] = ARGV[4 + i]
  amounts[i] = ARGV[4 + m + i]
end
local counters = #KEYS / 2
local per_counter = 1 + m
local base = 4 + 2 * m

local function sweep(c, z)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now_ms, 'LIMIT', 0, %(sweep)d)
  for _, old in ipairs(expired) do
    release(c, z, old)
  end
end

for k = 1, counters do
  sweep(KEYS[2 * k - 1], KEYS[2 * k])
end

-- A reservation id that is already open was admitted before: the client repeated the call after
-- losing the reply. It is admitted again without reserving twice.
local repeated = false
for k = 1, counters do
  if redis.call('HEXISTS', KEYS[2 * k - 1], 'r:' .. id) == 1 then
    repeated = true
  end
end

for k = 1, counters do
  local c = KEYS[2 * k - 1]
  local offset = base + (k - 1) * per_counter
  for i = 1, m do
    local limit = tonumber(ARGV[offset + 1 + i])
    if limit >= 0 and not repeated then
      local used = tonumber(redis.call('HGET', c, 'used:' .. metrics[i]) or '0')
      local reserved = tonumber(redis.call('HGET', c, 'rsv:' .. metrics[i]) or '0')
      if used + reserved + tonumber(amounts[i]) > limit then
        return {0, k, i, used, reserved}
      end
    end
  end
end

local pairs_text = {}
for i = 1, m do
  pairs_text[i] = metrics[i] .. '=' .. amounts[i]
end
local record = table.concat(pairs_text, ',')
local result = {1}
for k = 1, counters do
  local c, z = KEYS[2 * k - 1], KEYS[2 * k]
  local offset = base + (k - 1) * per_counter
  local limited = false
  for i = 1, m do
    if tonumber(ARGV[offset + 1 + i]) >= 0 then
      limited = true
    end
  end
  if limited and not repeated then
    for i = 1, m do
      redis.call('HINCRBY', c, 'rsv:' .. metrics[i], amounts[i])
    end
    redis.call('HSET', c, 'r:' .. id, record)
    redis.call('ZADD', z, expires_at, id)
    redis.call('EXPIRE', c, tonumber(ARGV[offset + 1]))
    redis.call('EXPIRE', z, tonumber(ARGV[offset + 1]))
  end
  for i = 1, m do
    table.insert(result, tonumber(redis.call('HGET', c, 'used:' .. metrics[i]) or '0'))
    table.insert(result, tonumber(redis.call('HGET', c, 'rsv:' .. metrics[i]) or '0'))
  end
end
return result
""" % {"sweep": SWEEP_LIMIT}

# KEYS: counter hash and reservation set of each counter in pairs, then the ledger hash of the
#       day, then the commit marker.
# ARGV: reservation id, marker ttl_s, metric count M, M metric names, M actual amounts,
#       then ttl_s per counter, then: ledger flag ("1" or "0"), model, cached input tokens, ledger ttl_s.
# Returns 1, or 0 when the marker shows the reservation was committed before.
COMMIT_SCRIPT = _RELEASE_LUA + """
local id = ARGV[1]
local m = tonumber(ARGV[3])
local marker = KEYS[#KEYS]
if not redis.call('SET', marker, '1', 'NX', 'EX', tonumber(ARGV[2])) then
  return 0
end
local counters = (#KEYS - 2) / 2
for k = 1, counters do
  local c, z = KEYS[2 * k - 1], KEYS[2 * k]
  release(c, z, id)
  for i = 1, m do
    redis.call('HINCRBY', c, 'used:' .. ARGV[3 + i], ARGV[3 + m + i])
  end
  local ttl = tonumber(ARGV[3 + 2 * m + k])
  redis.call('EXPIRE', c, ttl)
  redis.call('EXPIRE', z, ttl)
end
local ledger_at = 3 + 2 * m + counters
if ARGV[ledger_at + 1] == '1' then
  local ledger, model = KEYS[#KEYS - 1], ARGV[ledger_at + 2]
  redis.call('HINCRBY', ledger, model .. '|requests', 1)
  redis.call('HINCRBY', ledger, model .. '|cached_input_tokens', ARGV[ledger_at + 3])
  for i = 1, m do
    local name = ARGV[3 + i]
    if name ~= 'total_tokens' then
      redis.call('HINCRBY', ledger, model .. '|' .. name, ARGV[3 + m + i])
    end
  end
  redis.call('EXPIRE', ledger, tonumber(ARGV[ledger_at + 4]))
end
return 1
"""


def counter_keys(counter: Counter) -> tuple[str, str]:
    """Return the counter's hash key and reservation set key."""
    prefix = f"eg:{{{counter.tenant}}}"
    return f"{prefix}:c:{counter.name}", f"{prefix}:z:{counter.name}"


def commit_marker_key(tenant: str, reservation_id: str) -> str:
    return f"eg:{{{tenant}}}:done:{reservation_id}"


def ledger_key(tenant: str, day: str) -> str:
    return f"eg:{{{tenant}}}:ledger:{day}"


class RedisBudgetStore:
    """Budget counters in Redis, changed only by RESERVE_SCRIPT and COMMIT_SCRIPT.

    `client` is a `redis.asyncio.Redis` (one server, or a master that `sentinel` finds) or a
    `redis.asyncio.RedisCluster`; its socket timeouts bound each call. All counters of one call
    must belong to one tenant, so every call touches one cluster slot.
    """

    def __init__(
        self, client: RedisClient, sentinel: Sentinel | None = None, *, master_check_interval_s: float = MASTER_CHECK_INTERVAL_S
    ) -> None:
        self._client = client
        self._sentinel = sentinel
        self._shas: dict[str, str] = {}
        self._master_check_interval_s = master_check_interval_s
        self._master_watch: asyncio.Task[None] | None = None
        self._closing = False
        self._settings: StoreSettings | None = None  # set by from_settings, for start-up messages

    @classmethod
    def from_settings(
        cls, settings: StoreSettings, environ: Mapping[str, str] | None = None, *, master_check_interval_s: float = MASTER_CHECK_INTERVAL_S
    ) -> RedisBudgetStore:
        """Build the store for `settings`. Raise StoreCredentialError when a named credential variable is unset or empty."""
        client, sentinel = connect(settings, environ)
        store = cls(client, sentinel, master_check_interval_s=master_check_interval_s)
        store._settings = settings
        return store

    async def reserve(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        estimate: Mapping[str, int],
        *,
        now_ms: int,
        expires_at_ms: int,
    ) -> ReserveResult:
        self._watch_master()
        amounts = check_amounts(estimate)
        _one_tenant(counters)
        keys = [key for counter in counters for key in counter_keys(counter)]
        args: list[Any] = [now_ms, reservation_id, expires_at_ms, len(METRICS), *METRICS]
        args += [amounts[metric] for metric in METRICS]
        for counter in counters:
            args.append(counter.ttl_s)
            args += [counter.limits.get(metric, -1) for metric in METRICS]

        result = await self._run(RESERVE_SCRIPT, keys, args)
        if int(result[0]) == 0:
            counter = counters[int(result[1]) - 1]
            metric = METRICS[int(result[2]) - 1]
            rejection = Rejection(counter, metric, int(result[3]), int(result[4]), amounts[metric], counter.limits[metric])
            return ReserveResult(rejection, [])

        values = [int(value) for value in result[1:]]
        states = []
        for index, counter in enumerate(counters):
            chunk = values[index * 2 * len(METRICS) : (index + 1) * 2 * len(METRICS)]
            used = {metric: chunk[2 * i] for i, metric in enumerate(METRICS)}
            reserved = {metric: chunk[2 * i + 1] for i, metric in enumerate(METRICS)}
            states.append(CounterState(counter, used, reserved))
        return ReserveResult(None, states)

    async def commit(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        actual: Mapping[str, int],
        *,
        tenant: str,
        ledger: LedgerEntry | None = None,
    ) -> bool:
        self._watch_master()
        amounts = check_amounts(actual)
        if any(counter.tenant != tenant for counter in counters):
            raise ValueError(f"every counter of a commit must belong to tenant {tenant!r}")
        keys = [key for counter in counters for key in counter_keys(counter)]
        keys.append(ledger_key(tenant, ledger.day if ledger is not None else "none"))
        keys.append(commit_marker_key(tenant, reservation_id))
        args: list[Any] = [reservation_id, COMMIT_MARKER_TTL_S, len(METRICS), *METRICS]
        args += [amounts[metric] for metric in METRICS]
        args += [counter.ttl_s for counter in counters]
        if ledger is None:
            args += ["0", "", 0, 0]
        else:
            args += ["1", ledger.model, ledger.cached_input_tokens, LEDGER_TTL_S]
        return int(await self._run(COMMIT_SCRIPT, keys, args)) == 1

    async def usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
        self._watch_master()
        result: dict[str, dict[str, dict[str, int]]] = {}
        for day in days:
            fields = await self._client.hgetall(ledger_key(tenant, day))
            if not fields:
                continue
            models: dict[str, dict[str, int]] = {}
            for field, value in fields.items():
                model, _, metric = field.decode().rpartition("|")
                models.setdefault(model, dict.fromkeys(LEDGER_METRICS, 0))[metric] = int(value)
            result[day] = models
        return result

    async def status(self, counters: Sequence[Counter], *, now_ms: int) -> list[CounterState]:
        self._watch_master()
        fields = [f"used:{metric}" for metric in METRICS] + [f"rsv:{metric}" for metric in METRICS]
        states = []
        for counter in counters:
            values = await self._client.hmget(counter_keys(counter)[0], fields)
            numbers = [int(value) if value is not None else 0 for value in values]
            used = dict(zip(METRICS, numbers[: len(METRICS)], strict=True))
            reserved = dict(zip(METRICS, numbers[len(METRICS) :], strict=True))
            states.append(CounterState(counter, used, reserved))
        return states

    async def reset(self, counter: Counter) -> None:
        self._watch_master()
        await self._client.delete(*counter_keys(counter))

    async def mark_once(self, tenant: str, name: str, ttl_s: int) -> bool:
        self._watch_master()
        return bool(await self._client.set(f"eg:{{{tenant}}}:once:{name}", "1", nx=True, ex=max(ttl_s, 1)))

    async def verify(self) -> None:
        self._watch_master()
        try:
            await self._client.ping()
        except AuthenticationError as error:
            # A wrong password stays wrong: failing at start beats a Ready replica that refuses
            # every tenant's request.
            raise StoreCredentialError(f"Redis at {self._target()} rejected extguard's credentials: {self._credential_hint()} ({error})") from None
        except (RedisError, OSError) as error:
            mode = self._settings.failure_mode if self._settings is not None else "the configured"
            log.warning(
                "budget store %s not reachable at start (%s); requests follow failure_mode %s until it is reachable",
                self._target(), type(error).__name__, mode,
            )  # fmt: skip

    def _target(self) -> str:
        return self._settings.display_target if self._settings is not None else "the configured address"

    def _credential_hint(self) -> str:
        """Say where the rejected credentials came from, naming variables but never values."""
        settings = self._settings
        if settings is None:
            return "check the password and user that tenancy.store names"
        if settings.password_env is not None:
            return f"check the password in ${settings.password_env} (tenancy.store.password_env)"
        if urllib.parse.urlsplit(settings.url).password is not None:
            return "check the credentials in tenancy.store.url"
        return "no password was sent; name the variable that holds it in tenancy.store.password_env"

    async def close(self) -> None:
        self._closing = True
        if self._master_watch is not None:
            # redis-py 8.2 swallowed a cancellation that arrived as a Sentinel request completed,
            # so the loop also stops on `_closing`, at the latest one interval later.
            self._master_watch.cancel()
            await asyncio.gather(self._master_watch, return_exceptions=True)
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    def _watch_master(self) -> None:
        """Start following the Sentinels' master in the background, once, in sentinel mode."""
        if self._sentinel is not None and self._master_watch is None and not self._closing:
            self._master_watch = asyncio.get_running_loop().create_task(self._follow_master())

    async def _follow_master(self) -> None:
        """Request the master's address from the Sentinels every interval, and drop the connections to an old master.

        The client by itself moves only when a connection breaks or the old master rejects a
        write. In a test with Redis 7.0.15, the old master accepted writes for about 11 s after
        SENTINEL FAILOVER, until Sentinel turned it into a replica and so dropped them.
        """
        pool = self._client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        failing = False
        while not self._closing:
            try:
                await pool.get_master_address()  # bounded by the Sentinel connections' socket timeouts
            except (RedisError, OSError) as error:
                if not failing:
                    log.warning(
                        "request to the Sentinels for the budget store's master failed (%s), retrying every %.1f s",
                        type(error).__name__, self._master_check_interval_s,
                    )  # fmt: skip
                failing = True
            else:
                if failing:
                    log.info("the Sentinels respond again")
                failing = False
            await asyncio.sleep(self._master_check_interval_s)

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = await self._client.script_load(script)
        try:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            self._shas[script] = await self._client.script_load(script)
            return await self._client.evalsha(self._shas[script], len(keys), *keys, *args)


def _one_tenant(counters: Sequence[Counter]) -> str:
    tenants = {counter.tenant for counter in counters}
    if len(tenants) != 1:
        raise ValueError(f"one budget call must name counters of exactly one tenant, got {sorted(tenants)}")
    return tenants.pop()
