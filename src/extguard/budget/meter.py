"""Metering of one request: reserve its estimate before it goes upstream, commit its usage at the end.

The estimate is the request's text at ESTIMATE_CHARS_PER_TOKEN plus its output cap
(`max_tokens`, `max_completion_tokens`, or the policy's `default_max_output_tokens`), priced at
the model's rate. The commit is the usage the provider reported. Where it reported none (a
cancelled stream, an upstream error after some output), input is the estimate and output is
estimated from the text seen. An upstream error status before any output commits zero, because
providers do not bill those.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from extguard.budget.keeper import BudgetKeeper
from extguard.budget.plan import NANOS_PER_USD, PlannedCounter, Usage
from extguard.budget.store import LedgerEntry
from extguard.llm.usage import ReportedUsage, estimate_tokens

log = logging.getLogger("extguard.budget")


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `Meter.reserve`: admitted, or the HTTP status and message to reject with."""

    admitted: bool
    status: int = 200
    message: str = ""
    code: str = ""
    retry_after_s: int | None = None
    checked: bool = True  # False: admitted without a check, because the store was down (mode open)

    @property
    def state(self) -> str:
        """The budget state for telemetry: admitted, unchecked or rejected."""
        if not self.admitted:
            return "rejected"
        return "admitted" if self.checked else "unchecked"


@dataclass(frozen=True, slots=True)
class Committed:
    """The usage a request committed, and its cost in USD."""

    usage: Usage
    cost_usd: float


class Meter:
    """The reservation and usage of one request. `settle` commits once; later calls do nothing."""

    def __init__(self, keeper: BudgetKeeper, tenant: str, user: str | None, request_id: str) -> None:
        self.keeper = keeper
        self.tenant = tenant
        self.user = user
        self.request_id = request_id
        self.reservation_id = uuid.uuid4().hex
        self.model: str | None = None
        self.input_estimate = 0
        self.counters: list[PlannedCounter] = []
        self.started = datetime.now(UTC)
        self.reserved = False  # admitted: reserved against every counter, or there were none
        self.settled = False
        self.upstream_failed = False
        self.in_flight = False  # a reservation is held in the store and counted in the gauge

    def model_allowed(self, model: str | None) -> bool:
        return self.keeper.tenancy.tenants[self.tenant].allows_model(model)

    async def reserve(self, model: str | None, payload: dict[str, Any], text_chars: int) -> Admission:
        """Reserve the estimate of this request against every window of the tenant and user."""
        self.model = model
        self.input_estimate = estimate_tokens(text_chars)
        output_cap = _output_cap(payload, self.keeper.tenancy.default_max_output_tokens)
        price = self.keeper.price(model)
        amounts = Usage(self.input_estimate, output_cap).amounts(price)
        now = self.started = datetime.now(UTC)
        self.counters = self.keeper.counters(self.tenant, self.user, now)
        if not any(item.budgets for item in self.counters):
            self.reserved = True  # no budget to hold, but the usage is still counted and goes to the ledger
            return Admission(True)

        now_ms = int(now.timestamp() * 1000)
        expires_at_ms = now_ms + self.keeper.tenancy.reservation_ttl_s * 1000
        try:
            result = await self.keeper.call(
                self.keeper.store.reserve(
                    self.reservation_id, [item.counter for item in self.counters], amounts,
                    now_ms=now_ms, expires_at_ms=expires_at_ms,
                )
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - any store failure follows the failure mode
            self.keeper.note_store_down(error, "reserve")
            self.keeper.metrics.failure_mode_activations.labels("reserve", self.keeper.tenancy.store.failure_mode).inc()
            if self.keeper.tenancy.store.failure_mode == "closed":
                return Admission(False, 503, "The budget service is unavailable. Retry later.", "extguard_budget_unavailable")
            # Admitted unchecked: nothing was reserved, but the usage is still committed (or
            # spooled until the store is back).
            self.reserved = True
            return Admission(True, checked=False)
        self.keeper.note_store_up()

        if result.rejection is not None:
            self.keeper.metrics.budget_decisions.labels("reserve", "budget_exhausted", self.keeper.metrics.tenant(self.tenant)).inc()
            rejection = result.rejection
            planned = next(item for item in self.counters if item.counter == rejection.counter)
            window = f"{planned.counter.scope} {planned.period.window.value}"
            metric = "cost_usd" if rejection.metric == "cost_nanousd" else rejection.metric
            message = f"Budget exhausted: this request would pass the {window} {metric} limit of tenant {self.tenant!r}."
            log.info("request %s rejected: %s", self.request_id, message)
            return Admission(False, 429, message, "extguard_budget_exhausted", planned.period.seconds_left(now))
        self.reserved = True
        self.in_flight = True
        self.keeper.metrics.reservations_in_flight.inc()
        self.keeper.metrics.budget_decisions.labels("reserve", "admitted", self.keeper.metrics.tenant(self.tenant)).inc()
        return Admission(True)

    def usage(self, reported: ReportedUsage, output_chars: int) -> Usage:
        """Return the usage to commit: reported numbers where present, estimates elsewhere."""
        if self.upstream_failed and output_chars == 0 and reported.output_tokens is None:
            return Usage()
        input_tokens = reported.input_tokens if reported.input_tokens is not None else self.input_estimate
        output_tokens = reported.output_tokens if reported.output_tokens is not None else estimate_tokens(output_chars)
        return Usage(input_tokens, output_tokens, reported.cached_input_tokens)

    async def settle(self, reported: ReportedUsage, output_chars: int) -> Committed:
        """Commit the usage and release the rest of the reservation; spool it when the store fails.

        Return what was committed; a second call commits nothing and returns zero usage.
        """
        if self.settled:
            return Committed(Usage(), 0.0)
        self.settled = True
        if self.in_flight:
            self.in_flight = False
            self.keeper.metrics.reservations_in_flight.dec()
        usage = self.usage(reported, output_chars)
        amounts = usage.amounts(self.keeper.price(self.model))
        day = self.started.astimezone(self.keeper.zone).date().isoformat()
        ledger: LedgerEntry | None = LedgerEntry(day, self.model or "unknown", min(usage.cached_input_tokens, usage.input_tokens))
        if usage == Usage():
            ledger = None  # nothing billed (an upstream error): not a request in the ledger
        counters = [item.counter for item in self.counters]
        tenant_label = self.keeper.metrics.tenant(self.tenant)
        self.keeper.metrics.budget_tokens.labels(tenant_label, "input").inc(usage.input_tokens)
        self.keeper.metrics.budget_tokens.labels(tenant_label, "output").inc(usage.output_tokens)
        log.debug(
            "request %s tenant %s used %d input and %d output tokens",
            self.request_id, self.tenant, usage.input_tokens, usage.output_tokens,
        )  # fmt: skip
        await self.keeper.commit_or_spool(self.reservation_id, counters, amounts, tenant=self.tenant, ledger=ledger)
        return Committed(usage, amounts["cost_nanousd"] / NANOS_PER_USD)


def _output_cap(payload: dict[str, Any], default: int) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default

