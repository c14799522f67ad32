"""The in-memory budget store: one process, for the demo and single-replica deployments.

It follows the contract of `extguard.budget.store` exactly, with the same rejection order as the
Redis store, and runs each operation without awaiting, so operations on one event loop are
atomic. Counters are dropped `ttl_s` seconds after their last change, like Redis keys.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extguard.budget.store import (
    COMMIT_MARKER_TTL_S,
    LEDGER_METRICS,
    METRICS,
    LedgerEntry,
    Counter,
    CounterState,
    Rejection,
    ReserveResult,
    check_amounts,
)


@dataclass(slots=True)
class _CounterData:
    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))
    reserved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))
    # reservation id -> (expiry in ms, amounts)
    open: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    expires_at: float = 0.0  # monotonic seconds


class MemoryBudgetStore:
    """Budget counters in a dict, keyed like the Redis store's keys."""

    def __init__(self, clock: object = time.monotonic) -> None:
        self._counters: dict[tuple[str, str], _CounterData] = {}
        self._committed: dict[str, float] = {}
        self._markers: dict[tuple[str, str], float] = {}  # (tenant, name) -> expiry, monotonic seconds
        self._ledger: dict[tuple[str, str], dict[str, dict[str, int]]] = {}  # (tenant, day) -> model -> metric
        self._clock = clock

    async def reserve(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        estimate: Mapping[str, int],
        *,
        now_ms: int,
        expires_at_ms: int,
    ) -> ReserveResult:
        amounts = check_amounts(estimate)
        self._drop_stale()
        data = [self._data(counter) for counter in counters]
        for item in data:
            _sweep(item, now_ms)
        if any(reservation_id in item.open for item in data):
            # Admitted before: a repeated call reserves nothing more, as in the Redis store.
            return ReserveResult(None, [_state(counter, item) for counter, item in zip(counters, data, strict=True)])

        for counter, item in zip(counters, data, strict=True):
            for metric in METRICS:
                limit = counter.limits.get(metric)
                if limit is None:
                    continue
                if item.used[metric] + item.reserved[metric] + amounts[metric] > limit:
                    rejection = Rejection(counter, metric, item.used[metric], item.reserved[metric], amounts[metric], limit)
                    return ReserveResult(rejection, [])

        for counter, item in zip(counters, data, strict=True):
            if not counter.limits:
                continue  # only counted at commit
            for metric in METRICS:
                item.reserved[metric] += amounts[metric]
            item.open[reservation_id] = (expires_at_ms, dict(amounts))
            self._touch(item, counter)
        return ReserveResult(None, [_state(counter, item) for counter, item in zip(counters, data, strict=True)])

    async def commit(
        self,
        reservation_id: str,
        counters: Sequence[Counter],
        actual: Mapping[str, int],
        *,
        tenant: str,
        ledger: LedgerEntry | None = None,
    ) -> bool:
        amounts = check_amounts(actual)
        self._drop_stale()
        if reservation_id in self._committed:
            return False
        self._committed[reservation_id] = self._clock() + COMMIT_MARKER_TTL_S  # type: ignore[operator]
        if ledger is not None:
            row = self._ledger.setdefault((tenant, ledger.day), {}).setdefault(ledger.model, dict.fromkeys(LEDGER_METRICS, 0))
            row["requests"] += 1
            row["input_tokens"] += amounts["input_tokens"]
            row["cached_input_tokens"] += ledger.cached_input_tokens
            row["output_tokens"] += amounts["output_tokens"]
            row["cost_nanousd"] += amounts["cost_nanousd"]
        for counter in counters:
            item = self._data(counter)
            opened = item.open.pop(reservation_id, None)
            if opened is not None:
                for metric, amount in opened[1].items():
                    item.reserved[metric] -= amount
            for metric in METRICS:
                item.used[metric] += amounts[metric]
            self._touch(item, counter)
        return True

    async def status(self, counters: Sequence[Counter], *, now_ms: int) -> list[CounterState]:
        self._drop_stale()
        states = []
        for counter in counters:
            item = self._counters.get((counter.tenant, counter.name))
            if item is None:
                states.append(CounterState(counter, dict.fromkeys(METRICS, 0), dict.fromkeys(METRICS, 0)))
                continue
            _sweep(item, now_ms)
            states.append(_state(counter, item))
        return states

    async def usage(self, tenant: str, days: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
        return {day: {model: dict(row) for model, row in self._ledger[(tenant, day)].items()} for day in days if (tenant, day) in self._ledger}

    async def reset(self, counter: Counter) -> None:
        self._counters.pop((counter.tenant, counter.name), None)

    async def mark_once(self, tenant: str, name: str, ttl_s: int) -> bool:
        self._drop_stale()
        if (tenant, name) in self._markers:
            return False
        self._markers[(tenant, name)] = self._clock() + ttl_s  # type: ignore[operator]
        return True

    async def verify(self) -> None:
        pass  # nothing to connect to

    async def close(self) -> None:
        self._counters.clear()

    def _data(self, counter: Counter) -> _CounterData:
        return self._counters.setdefault((counter.tenant, counter.name), _CounterData())

    def _touch(self, item: _CounterData, counter: Counter) -> None:
        item.expires_at = max(item.expires_at, self._clock() + counter.ttl_s)  # type: ignore[operator]

    def _drop_stale(self) -> None:
        now = self._clock()
        stale = [key for key, item in self._counters.items() if item.expires_at and item.expires_at <= now]  # type: ignore[operator]
        for key in stale:
            del self._counters[key]
        for reservation_id in [rid for rid, until in self._committed.items() if until <= now]:  # type: ignore[operator]
            del self._committed[reservation_id]
        for marker in [key for key, until in self._markers.items() if until <= now]:  # type: ignore[operator]
            del self._markers[marker]


def _sweep(item: _CounterData, now_ms: int) -> None:
    """Drop the reservations of `item` that expired at or before `now_ms`."""
    for reservation_id, (expires_at_ms, amounts) in list(item.open.items()):
        if expires_at_ms <= now_ms:
            del item.open[reservation_id]
            for metric, amount in amounts.items():
                item.reserved[metric] -= amount


def _state(counter: Counter, item: _CounterData) -> CounterState:
    return CounterState(counter, dict(item.used), dict(item.reserved))
