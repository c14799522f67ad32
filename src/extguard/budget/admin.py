"""The `extguard.v1.BudgetAdmin` gRPC service: budget status, usage ledger and window reset."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc

from extguard.budget.keeper import BudgetKeeper
from extguard.budget.plan import store_limit, store_metric
from extguard.budget.windows import Window
from extguard.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("extguard.admin")
MAX_USAGE_DAYS = 400


class BudgetAdmin(admin_pb2_grpc.BudgetAdminServicer):
    def __init__(self, keeper: BudgetKeeper) -> None:
        self._keeper = keeper

    async def GetBudgetStatus(self, request: admin_pb2.GetBudgetStatusRequest, context: grpc.aio.ServicerContext) -> admin_pb2.GetBudgetStatusResponse:  # noqa: N802
        await self._known_tenant(request.tenant, context)
        now = datetime.now(UTC)
        planned = self._keeper.counters(request.tenant, request.user or None, now)
        states = await self._store_call(
            self._keeper.store.status([item.counter for item in planned], now_ms=int(now.timestamp() * 1000)), context
        )
        response = admin_pb2.GetBudgetStatusResponse()
        for item, state in zip(planned, states, strict=True):
            for budget in item.budgets:
                metric = store_metric(budget)
                response.windows.add(
                    scope=item.counter.scope, window=item.period.window.value, period=item.period.id,
                    metric=budget.metric.value, used=state.used[metric], reserved=state.reserved[metric],
                    limit=store_limit(budget), seconds_left=item.period.seconds_left(now),
                )  # fmt: skip
        return response

    async def GetUsage(self, request: admin_pb2.GetUsageRequest, context: grpc.aio.ServicerContext) -> admin_pb2.GetUsageResponse:  # noqa: N802
        tenants = [request.tenant] if request.tenant else sorted(self._keeper.tenancy.tenants)
        for tenant in tenants:
            await self._known_tenant(tenant, context)
        try:
            start = date.fromisoformat(request.from_day)
            end = date.fromisoformat(request.to_day or request.from_day)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_day and to_day must be dates as YYYY-MM-DD")
        if end < start or (end - start).days >= MAX_USAGE_DAYS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"to_day must be on or after from_day and at most {MAX_USAGE_DAYS} days later")
        days = [(start + timedelta(days=offset)).isoformat() for offset in range((end - start).days + 1)]

        response = admin_pb2.GetUsageResponse()
        for tenant in tenants:
            ledger = await self._store_call(self._keeper.store.usage(tenant, days), context)
            for day, models in sorted(ledger.items()):
                for model, metrics in sorted(models.items()):
                    response.rows.add(day=day, tenant=tenant, model=model, **metrics)
        return response

    async def ResetWindow(self, request: admin_pb2.ResetWindowRequest, context: grpc.aio.ServicerContext) -> admin_pb2.ResetWindowResponse:  # noqa: N802
        await self._known_tenant(request.tenant, context)
        try:
            window = Window(request.window)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown window {request.window!r}; use one of {', '.join(w.value for w in Window)}")
        scope = request.scope or "tenant"
        user = scope.removeprefix("user:") if scope.startswith("user:") else None
        matching = [item for item in self._keeper.counters(request.tenant, user) if item.counter.scope == scope and item.period.window is window]
        if not matching:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"tenant {request.tenant!r} has no counters for scope {scope!r}; users are counted only in tenants with user_budgets",
            )
        await self._store_call(self._keeper.store.reset(matching[0].counter), context)
        log.info("budget window reset: tenant %s scope %s period %s", request.tenant, scope, matching[0].period.id)
        return admin_pb2.ResetWindowResponse(period=matching[0].period.id)

    async def _store_call(self, operation: Any, context: grpc.aio.ServicerContext) -> Any:
        """Await a store call; a store that fails or times out ends the RPC with UNAVAILABLE."""
        try:
            return await self._keeper.call(operation)
        except Exception as error:  # noqa: BLE001 - any store failure becomes one readable status
            reason = type(error).__name__
            log.warning("budget admin call failed: the budget store is unavailable (%s)", reason)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the budget store is unavailable ({reason}); retry when it is back")

    async def _known_tenant(self, tenant: str, context: grpc.aio.ServicerContext) -> None:
        if tenant not in self._keeper.tenancy.tenants:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tenant {tenant!r}")
