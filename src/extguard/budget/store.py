"""The budget store contract: reserve before a request goes upstream, commit when it ends.

A counter is one budget scope (a tenant, or a user or API key inside it) in one window period.
It holds, per metric, the usage committed so far and the sum of the reservations still open.

- `reserve` checks every counter's hard limits against used + reserved + the estimate, and
  either rejects it (nothing changes) or adds the estimate to every counter's reserved amount, in
  one atomic step. Reservations expire at `expires_at_ms`; an expired one stops counting the
  next time a reserve touches its counter. A repeated reserve of a reservation id that is still
  open is admitted without reserving again, because clients resend a call whose reply was lost
  (redis-py 8.2's cluster client retries a command after a timeout or connection error).
- `commit` replaces a reservation by the actual usage in the counters it was made against. It
  is idempotent per reservation id, so a replay from the spool never counts twice, and it also
  works after the reservation expired.
- `status` reads counters without changing them.
- The usage ledger keeps the requests, input, cached input and output tokens and cost that
  commits recorded (`LEDGER_METRICS`) per tenant, day and model, for showback. `usage` reads it,
  and each day is kept for LEDGER_TTL_S.

Amounts are non-negative integers: tokens, and cost in nano-USD (1e-9 USD).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

METRICS = ("input_tokens", "output_tokens", "total_tokens", "cost_nanousd")
LEDGER_METRICS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost_nanousd")
LEDGER_TTL_S = 400 * 24 * 3600


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """The ledger row of one commit: the tenant's local day and the model."""

    day: str  # YYYY-MM-DD in the policy's time zone
    model: str
    cached_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Counter:
    """One scope in one window period, with the hard limit per metric that applies to it now.

    `tenant` groups the keys (a Redis Cluster hash tag). `ttl_s` is how long the counter must be
    kept after the last change: at least until its period ends.
    """

    tenant: str
    scope: str
    period_id: str
    ttl_s: int
    limits: Mapping[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scope}:{self.period_id}"


@dataclass(frozen=True, slots=True)
class CounterState:
    """Used and reserved amounts per metric of one counter."""

    counter: Counter
    used: Mapping[str, int]
    reserved: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Rejection:
    """The first counter and metric whose hard limit the estimate would pass."""

    counter: Counter
    metric: str
    used: int
    reserved: int
    requested: int
    limit: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """Either `rejection` is set and nothing was reserved, or `states` are the counters after the reservation."""

    rejection: Rejection | None
    states: Sequence[CounterState]

    @property
    def admitted(self) -> bool:
        return self.rejection is None


class BudgetStore(Protocol):
    async def reserve(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        estimate: Mapping[str, int],
        *,
        now_ms: int,
        expires_at_ms: int,
    ) -> ReserveResult:
        """Reserve `estimate` in every counter with a limit, atomically, unless one limit would be passed.

        Counters without limits are neither checked nor reserved against, only committed to.
        """
        ...

    async def commit(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        actual: Mapping[str, int],
        *,
        tenant: str,
        ledger: LedgerEntry | None = None,
    ) -> bool:
        """Record `actual` (and its ledger entry) and drop the reservation; return False when this id was committed before."""
        ...

    async def usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
        """Return the ledger of `tenant` for `days`: day -> model -> LEDGER_METRICS; days without usage are left out."""
        ...

    async def status(self, counters: Sequence[Counter], *, now_ms: int) -> list[CounterState]: ...

    async def reset(self, counter: Counter) -> None:
        """Drop the counter's used and reserved amounts, so its period starts again from zero."""
        ...

    async def mark_once(self, tenant: str, name: str, ttl_s: int) -> bool:
        """Set the marker `name` of `tenant` for `ttl_s`; return True only for the caller that set it first."""
        ...

    async def verify(self) -> None:
        """Check at start that the store accepts extguard's credentials.

        Raise StoreCredentialError when it rejects them. A store that cannot be reached passes:
        the failure mode applies to requests until it can be.
        """
        ...

    async def close(self) -> None: ...


def check_amounts(amounts: Mapping[str, int]) -> dict[str, int]:
    """Return `amounts` with every metric present, or raise ValueError for an unknown metric or a negative amount."""
    unknown = set(amounts) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown budget metrics {sorted(unknown)}; use {', '.join(METRICS)}")
    checked = {metric: int(amounts.get(metric, 0)) for metric in METRICS}
    negative = [metric for metric, amount in checked.items() if amount < 0]
    if negative:
        raise ValueError(f"budget amounts must not be negative: {negative}")
    return checked


# Seconds a commit marker is kept, so that a replayed commit is recognized: longer than any spool.
COMMIT_MARKER_TTL_S = 7 * 24 * 3600
