"""From a tenant's configured budgets to store counters, and from token usage to cost.

`counters_for` returns one `Counter` per scope and window for the period that contains `now`,
each with the hard limits per metric of the budgets on that window. Every window is counted,
budget or not, so a budget added or moved to another window later starts from the usage already
spent in its current period. Counters without a limit are not reserved against, only committed
to. Costs are integers in nano-USD: a price per million tokens times the tokens, rounded up
per request, so a stored cost is never below the true cost.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from extguard.budget.store import Counter
from extguard.budget.windows import Period, Window, period_at
from extguard.config.tenancy import Budget, BudgetMetric, Price, Tenant

NANOS_PER_USD = 1_000_000_000
# A window's counter is kept this long after its period ends, for status and late commits.
COUNTER_GRACE_S = 3600


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request. `cached_input_tokens` is the part of `input_tokens` read from a prompt cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    def amounts(self, price: Price | None) -> dict[str, int]:
        """Return the store amounts of this usage, with its cost at `price` (0 without one)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "cost_nanousd": cost_nanousd(self, price),
        }


@dataclass(frozen=True, slots=True)
class PlannedCounter:
    """A store counter with the budgets it enforces and the period it covers."""

    counter: Counter
    period: Period
    budgets: Sequence[Budget]


def counters_for(tenant_name: str, tenant: Tenant, user: str | None, now: datetime, zone: ZoneInfo) -> list[PlannedCounter]:
    """Return the counters that a request of `tenant_name` (and `user`) at `now` counts against.

    Users are counted only in a tenant with `user_budgets`, so that many users without budgets
    do not fill the store.
    """
    scopes: list[tuple[str, Sequence[Budget]]] = [("tenant", tenant.budgets)]
    if user is not None and tenant.user_budgets:
        scopes.append((f"user:{user}", tenant.user_budgets))

    planned: list[PlannedCounter] = []
    for scope, budgets in scopes:
        by_window: dict[Window, list[Budget]] = {window: [] for window in Window}
        for budget in budgets:
            by_window[budget.window].append(budget)
        for window, window_budgets in by_window.items():
            period = period_at(window, now, zone)
            limits = {store_metric(budget): store_limit(budget) for budget in window_budgets}
            ttl_s = period.seconds_left(now) + COUNTER_GRACE_S
            counter = Counter(tenant_name, scope, period.id, ttl_s=ttl_s, limits=limits)
            planned.append(PlannedCounter(counter, period, window_budgets))
    return planned


def price_for(model: str | None, pricing: Mapping[str, Price]) -> Price | None:
    """Return the price of `model`: an exact entry first, else the first matching shell-style pattern."""
    if model is None:
        return None
    if model in pricing:
        return pricing[model]
    for pattern, price in pricing.items():
        if fnmatch.fnmatchcase(model, pattern):
            return price
    return None


def cost_nanousd(usage: Usage, price: Price | None) -> int:
    """Return the cost of `usage` in nano-USD, rounded up; 0 without a price."""
    if price is None:
        return 0
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    cached_price = price.input if price.cached_input is None else price.cached_input
    usd = (
        Decimal(str(price.input)) * (usage.input_tokens - cached)
        + Decimal(str(cached_price)) * cached
        + Decimal(str(price.output)) * usage.output_tokens
    ) / 1_000_000
    return math.ceil(usd * NANOS_PER_USD)


def store_metric(budget: Budget) -> str:
    """Return the store's metric name for `budget`."""
    return "cost_nanousd" if budget.metric is BudgetMetric.COST_USD else budget.metric.value


def store_limit(budget: Budget) -> int:
    """Return `budget.limit` in the store's unit: tokens, or nano-USD for cost."""
    if budget.metric is BudgetMetric.COST_USD:
        return int(Decimal(str(budget.limit)) * NANOS_PER_USD)
    return int(budget.limit)
