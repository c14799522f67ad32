"""Budgets at run time: the store, the windows of each tenant, and the pre-check of ext_authz."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from extguard.budget.memory import MemoryBudgetStore
from extguard.budget.plan import NANOS_PER_USD, PlannedCounter, counters_for, price_for, store_limit, store_metric
from extguard.budget.redis_store import RedisBudgetStore
from extguard.budget.spool import Spool, SpooledCommit
from extguard.budget.store import BudgetStore, Counter, LedgerEntry
from extguard.config.tenancy import Price, StoreBackend, Tenancy
from extguard.telemetry.logs import audit
from extguard.telemetry.metrics import OTHER, Metrics

log = logging.getLogger("extguard.budget")
T = TypeVar("T")
# Seconds between attempts to replay spooled commits while the store is down.
SPOOL_RETRY_S = 1.0
# Soft-limit crossings remembered in memory before the set is cleared, to bound it.
MAX_ANNOUNCED = 10_000
MAX_UNPRICED_LOGGED = 100


def _post_json(url: str, event: dict[str, object], timeout_s: float) -> None:
    """POST `event` as JSON to `url`; log a failure once per call without the event's content."""
    request = urllib.request.Request(
        url, data=json.dumps(event).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with _WEBHOOK_OPENER.open(request, timeout=timeout_s) as response:
            response.read()
    except (OSError, ValueError) as error:
        log.error("soft-limit webhook %s failed: %s", url, type(error).__name__)


# The webhook goes straight to its URL, never through a proxy from the environment.
_WEBHOOK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class SoftLimit:
    """The first crossing of a soft limit in one window period."""

    tenant: str
    scope: str
    period: str
    metric: str
    percent: int


@dataclass(frozen=True, slots=True)
class Exhausted:
    """A window whose hard limit is reached, and the seconds until it resets."""

    window: str
    metric: str
    limit: int
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class PreCheck:
    """The budget state of one caller before a request: exhausted, warnings, or store unavailable."""

    exhausted: Exhausted | None = None
    warnings: list[str] = field(default_factory=list)
    store_unavailable: bool = False


class BudgetKeeper:
    """Holds the budget store and answers the questions of ext_authz and ext_proc about it."""

    def __init__(
        self, tenancy: Tenancy, pricing: dict[str, Price], store: BudgetStore, metrics: Metrics | None = None
    ) -> None:
        self.tenancy = tenancy
        self.metrics = metrics if metrics is not None else Metrics()
        self.pricing = pricing
        self.store = store
        self.zone = ZoneInfo(tenancy.time_zone)
        self.timeout_s = tenancy.store.timeout_ms / 1000
        self._store_down = False
        # Commits that failed, oldest first; bounded by store.spool_max.
        self.spool = Spool(tenancy.store.spool_max, tenancy.store.spool_file)
        self._replay_task: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()  # commits in progress
        self._closing = False
        self._announced: set[tuple[str, str, str, str]] = set()  # soft limits already reported
        self._unpriced: set[str | None] = set()  # models without a price, already logged
        self._webhook_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, tenancy: Tenancy, pricing: dict[str, Price], metrics: Metrics | None = None) -> BudgetKeeper:
        """Build the keeper and its store; raise StoreCredentialError when a named credential variable is unset or empty."""
        settings = tenancy.store
        if settings.backend is StoreBackend.REDIS:
            store: BudgetStore = RedisBudgetStore.from_settings(settings)
        else:
            store = MemoryBudgetStore()
        return cls(tenancy, pricing, store, metrics)

    def price(self, model: str | None) -> Price | None:
        """Return the price of `model`; log once per model when a pricing table has none for it."""
        price = price_for(model, self.pricing)
        # Clients choose model names, so the set of logged names is bounded.
        if price is None and self.pricing and model not in self._unpriced and len(self._unpriced) < MAX_UNPRICED_LOGGED:
            self._unpriced.add(model)
            log.warning("model %r has no entry in the pricing table, so its usage costs 0 USD in budgets and the ledger", model)
        return price

    def counters(self, tenant: str, user: str | None, now: datetime | None = None) -> list[PlannedCounter]:
        """Return the counters of `tenant` and `user` at `now` (default: the current time)."""
        moment = now or datetime.now(UTC)
        return counters_for(tenant, self.tenancy.tenants[tenant], user, moment, self.zone)

    async def pre_check(self, tenant: str, user: str | None, now: datetime | None = None) -> PreCheck:
        """Return whether any hard limit of the caller is already reached, and the soft-limit warnings."""
        moment = now or datetime.now(UTC)
        planned = [item for item in self.counters(tenant, user, moment) if item.budgets]
        if not planned:
            return PreCheck()
        try:
            states = await self.call(self.store.status([item.counter for item in planned], now_ms=int(moment.timestamp() * 1000)))
        except Exception as error:  # noqa: BLE001 - any store failure (timeout, connection, server error)
            self.note_store_down(error, "status")
            return PreCheck(store_unavailable=True)
        self.note_store_up()

        warnings: list[str] = []
        for item, state in zip(planned, states, strict=True):
            for budget in item.budgets:
                metric = store_metric(budget)
                limit = store_limit(budget)
                spent = state.used[metric] + state.reserved[metric]
                if item.counter.scope == "tenant":
                    self._show_budget(tenant, item.period.window.value, budget.metric.value, state.used[metric], spent, limit)
                if spent >= limit:
                    window = f"{item.counter.scope} {item.period.window.value}"
                    retry_after_s = item.period.seconds_left(moment)
                    return PreCheck(Exhausted(window, budget.metric.value, limit, retry_after_s))
                if budget.soft is not None and spent >= budget.soft * limit:
                    percent = int(spent * 100 / limit)
                    warnings.append(f"{item.counter.scope} {item.period.window.value} {budget.metric.value} {percent}%")
                    announcement = SoftLimit(tenant, item.counter.scope, item.period.id, budget.metric.value, percent)
                    self._announce_soft_limit(announcement, item.counter.ttl_s)
        return PreCheck(warnings=warnings)

    def _show_budget(self, tenant: str, window: str, metric: str, used: int, spent: int, limit: int) -> None:
        """Update the budget gauges of a tenant window, in USD for cost budgets.

        Tenants whose label folded into `other` get no gauges: one series cannot hold several budgets.
        """
        scale = NANOS_PER_USD if metric == "cost_usd" else 1
        label = self.metrics.tenant(tenant)
        if label == OTHER and tenant != OTHER:
            return
        labels = (label, window, metric)
        self.metrics.budget_used.labels(*labels).set(used / scale)
        self.metrics.budget_limit.labels(*labels).set(limit / scale)
        self.metrics.budget_remaining.labels(*labels).set(max(limit - spent, 0) / scale)

    async def call(self, operation: Awaitable[T]) -> T:
        """Await a store operation under the store's timeout."""
        return await asyncio.wait_for(operation, self.timeout_s)

    async def commit_or_spool(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        amounts: Mapping[str, int],
        *,
        tenant: str,
        ledger: LedgerEntry | None = None,
    ) -> None:
        """Commit usage now, or keep it in the spool for replay when the store fails.

        The commit runs in a task of its own: when the caller is cancelled meanwhile (Envoy closed
        the stream while Redis was slow), the commit still finishes or goes to the spool.
        """
        record = SpooledCommit(reservation_id, list(counters), dict(amounts), tenant, ledger)
        task = asyncio.get_running_loop().create_task(self._commit_or_spool(record))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        await asyncio.shield(task)

    async def _commit_or_spool(self, record: SpooledCommit) -> None:
        # Commits add up in any order and a repeated one counts once. So a new commit does not
        # wait behind the spool, where its reservation would hold budget until the replay.
        try:
            await self.call(record.send(self.store))
        except Exception as error:  # noqa: BLE001 - any store failure: keep the usage
            self.note_store_down(error, "commit")
            self.metrics.failure_mode_activations.labels("commit", "spool").inc()
            self._spool(record)
            return
        self.note_store_up()

    async def replay_spool(self) -> int:
        """Commit spooled usage, oldest first, until the spool is empty or the store fails; return the count."""
        replayed = 0
        while self.spool:
            try:
                await self.call(self.spool.first().send(self.store))
            except Exception as error:  # noqa: BLE001 - still down: try again later
                self.note_store_down(error, "replay")
                break
            self.spool.pop_first()
            self.metrics.budget_spool.set(len(self.spool))
            self.metrics.budget_spool_replayed.inc()
            replayed += 1
        if replayed:
            self.note_store_up()
            log.info("replayed %d spooled budget commits; %d left", replayed, len(self.spool))
        return replayed

    async def start(self) -> None:
        """Load the commits that a previous process left in the spool file, and replay them.

        Raise OSError when the spool file's folder cannot be written, so a misconfigured replica
        does not start and later lose usage, and StoreCredentialError when Redis rejects the
        credentials.
        """
        self.spool.check_folder()
        await self.store.verify()
        loaded = self.spool.load()
        if loaded:
            log.info("%d budget commits loaded from %s", loaded, self.spool.path)
            self.metrics.budget_spool.set(len(self.spool))
            self._start_replay(delay_s=0.0)

    async def close(self) -> None:
        self._closing = True
        if self._replay_task is not None:
            self._replay_task.cancel()
        await asyncio.gather(*self._commits, return_exceptions=True)
        await self.replay_spool()
        if self.spool and self.spool.path is not None:
            self.spool.save()
        if self.spool and self.spool.saved:
            log.warning("%d budget commits wait in %s for the next start", len(self.spool), self.spool.path)
        elif self.spool:
            log.error("%d budget commits could not be written before shutdown and are lost", len(self.spool))
        await self.store.close()

    def _announce_soft_limit(self, crossing: SoftLimit, ttl_s: int) -> None:
        """Log an audit line and call the webhook once per tenant, scope, period and metric.

        Once across all replicas: a marker in the store decides which replica announces. When
        the store cannot be asked, this replica announces anyway, because a repeated audit line
        is better than a missing one.
        """
        key = (crossing.tenant, crossing.scope, crossing.period, crossing.metric)
        if key in self._announced:
            return
        if len(self._announced) >= MAX_ANNOUNCED:
            self._announced.clear()  # periods end; a cleared key only costs one more store call
        self._announced.add(key)
        task = asyncio.get_running_loop().create_task(self._announce_if_first(crossing, ttl_s))
        self._webhook_tasks.add(task)
        task.add_done_callback(self._webhook_tasks.discard)

    async def _announce_if_first(self, crossing: SoftLimit, ttl_s: int) -> None:
        name = f"soft:{crossing.scope}:{crossing.period}:{crossing.metric}"
        try:
            first = await self.call(self.store.mark_once(crossing.tenant, name, ttl_s))
        except Exception as error:  # noqa: BLE001 - any store failure: announce from this replica
            self.note_store_down(error, "mark_once")
            first = True
        if not first:
            return
        self.metrics.budget_decisions.labels("authz", "soft_limit_reached", self.metrics.tenant(crossing.tenant)).inc()
        log.warning(
            "audit budget_soft_limit tenant=%s scope=%s period=%s metric=%s percent=%d",
            crossing.tenant, crossing.scope, crossing.period, crossing.metric, crossing.percent,
        )  # fmt: skip
        audit("budget_soft_limit", **asdict(crossing))
        webhook = self.tenancy.soft_limit_webhook
        if webhook is not None:
            event = {"event": "budget_soft_limit", **asdict(crossing)}
            await asyncio.to_thread(_post_json, webhook.url, event, webhook.timeout_ms / 1000)

    def note_store_down(self, error: BaseException, operation: str) -> None:
        """Count a failed store call; log only the first failure of an outage."""
        self.metrics.budget_store_errors.labels(operation).inc()
        if not self._store_down:
            self._store_down = True
            log.error("budget store unavailable (%s); failure mode %s", type(error).__name__, self.tenancy.store.failure_mode)

    def note_store_up(self) -> None:
        """Note a store call that worked: log the end of an outage and replay the spool now."""
        if self._store_down:
            self._store_down = False
            log.info("budget store available again")
        if self.spool:
            self._start_replay(delay_s=0.0)

    def _spool(self, record: SpooledCommit) -> None:
        if not self.spool.append(record):
            self.metrics.budget_spool_dropped.inc()
            log.error("budget spool full (%d): the oldest usage record was dropped", self.spool.max_records)
        self.metrics.budget_spool.set(len(self.spool))
        self._start_replay(delay_s=SPOOL_RETRY_S)

    def _start_replay(self, delay_s: float) -> None:
        """Start replaying the spool after `delay_s`, unless a replay task already runs."""
        if not self._closing and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.get_running_loop().create_task(self._replay_until_empty(delay_s))

    async def _replay_until_empty(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while self.spool:
            await self.replay_spool()
            if self.spool:
                await asyncio.sleep(SPOOL_RETRY_S)
