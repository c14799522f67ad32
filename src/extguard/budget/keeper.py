"""Budgets at run time: the store, the windows of each tenant, and the pre-check of ext_authz."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from extguard.budget.memory import MemoryBudgetStore
from extguard.budget.plan import PlannedCounter, counters_for, store_limit, store_metric
from extguard.budget.redis_store import RedisBudgetStore
from extguard.budget.store import BudgetStore
from extguard.config.tenancy import Price, StoreBackend, Tenancy

log = logging.getLogger("extguard.budget")


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

    def __init__(self, tenancy: Tenancy, pricing: dict[str, Price], store: BudgetStore) -> None:
        self.tenancy = tenancy
        self.pricing = pricing
        self.store = store
        self.zone = ZoneInfo(tenancy.time_zone)
        self.timeout_s = tenancy.store.timeout_ms / 1000
        self._store_down = False

    @classmethod
    def from_settings(cls, tenancy: Tenancy, pricing: dict[str, Price]) -> BudgetKeeper:
        settings = tenancy.store
        if settings.backend is StoreBackend.REDIS:
            store: BudgetStore = RedisBudgetStore.from_url(settings.url, timeout_s=settings.timeout_ms / 1000)
        else:
            store = MemoryBudgetStore()
        return cls(tenancy, pricing, store)

    def counters(self, tenant: str, user: str | None, now: datetime | None = None) -> list[PlannedCounter]:
        """Return the counters of `tenant` and `user` at `now` (default: the current time)."""
        moment = now or datetime.now(UTC)
        return counters_for(tenant, self.tenancy.tenants[tenant], user, moment, self.zone)

    async def pre_check(self, tenant: str, user: str | None, now: datetime | None = None) -> PreCheck:
        """Return whether any hard limit of the caller is already reached, and the soft-limit warnings."""
        moment = now or datetime.now(UTC)
        planned = self.counters(tenant, user, moment)
        if not planned:
            return PreCheck()
        try:
            states = await asyncio.wait_for(
                self.store.status([item.counter for item in planned], now_ms=int(moment.timestamp() * 1000)),
                self.timeout_s,
            )
        except Exception as error:  # noqa: BLE001 - any store failure (timeout, connection, server error)
            self._note_store_down(error)
            return PreCheck(store_unavailable=True)
        self._note_store_up()

        warnings: list[str] = []
        for item, state in zip(planned, states, strict=True):
            for budget in item.budgets:
                metric = store_metric(budget)
                limit = store_limit(budget)
                spent = state.used[metric] + state.reserved[metric]
                if spent >= limit:
                    window = f"{item.counter.scope} {item.period.window.value}"
                    retry_after_s = item.period.seconds_left(moment)
                    return PreCheck(Exhausted(window, budget.metric.value, limit, retry_after_s))
                if budget.soft is not None and spent >= budget.soft * limit:
                    percent = int(spent * 100 / limit)
                    warnings.append(f"{item.counter.scope} {item.period.window.value} {budget.metric.value} {percent}%")
        return PreCheck(warnings=warnings)

    async def close(self) -> None:
        await self.store.close()

    def _note_store_down(self, error: BaseException) -> None:
        if not self._store_down:
            self._store_down = True
            log.error("budget store unavailable (%s); failure mode %s", type(error).__name__, self.tenancy.store.failure_mode)

    def _note_store_up(self) -> None:
        if self._store_down:
            self._store_down = False
            log.info("budget store available again")
