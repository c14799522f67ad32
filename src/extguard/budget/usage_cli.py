"""`extguard usage`: the usage ledger per tenant, day and model, as a table, CSV or JSON.

It reads the Redis store that the policy's `tenancy.store` names. With `--server` it calls a
running extguard's budget admin API instead, which also serves an in-memory store.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

from extguard.budget.plan import NANOS_PER_USD
from extguard.budget.store import LEDGER_METRICS

MAX_DAYS = 400
COLUMNS = ("day", "tenant", "model", *LEDGER_METRICS)


def add_usage_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("usage", help="print the usage ledger per tenant, day and model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="POLICY.yaml", help="the policy whose tenancy.store (Redis) to read")
    source.add_argument("--server", metavar="HOST:PORT", help="a running extguard's --admin-listen address to ask")
    parser.add_argument("--tenant", action="append", help="only this tenant; repeat for several (default: all)")
    parser.add_argument("--from", dest="start", type=date.fromisoformat, help="first day, YYYY-MM-DD (default: today)")
    parser.add_argument("--to", dest="end", type=date.fromisoformat, help="last day, YYYY-MM-DD (default: --from)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default %(default)s)")


def run_usage(args: argparse.Namespace) -> int:
    if args.server:
        return _run_remote(args)
    from zoneinfo import ZoneInfo

    from extguard.budget.keeper import BudgetKeeper
    from extguard.budget.redis_connect import StoreCredentialError
    from extguard.config.loader import PolicyError, load_policy
    from extguard.config.tenancy import StoreBackend
    from extguard.scan.detectors import default_detectors

    try:
        policies = load_policy(args.config, default_detectors())
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    tenancy = policies.tenancy
    if tenancy is None:
        print(f"error: {args.config} has no tenancy section, so there is no usage to show", file=sys.stderr)
        return 2
    if tenancy.store.backend is not StoreBackend.REDIS:
        print(
            "error: the memory store lives inside the server process, so --config can read only a redis store; "
            "use --server with the address of `extguard serve --admin-listen`",
            file=sys.stderr,
        )
        return 2

    today = datetime.now(UTC).astimezone(ZoneInfo(tenancy.time_zone)).date()
    start = args.start or today
    end = args.end or start
    if end < start or (end - start).days >= MAX_DAYS:
        print(f"error: --to must be on or after --from and at most {MAX_DAYS} days later", file=sys.stderr)
        return 2
    unknown = [name for name in args.tenant or [] if name not in tenancy.tenants]
    if unknown:
        print(f"error: unknown tenants {unknown}; the policy has {sorted(tenancy.tenants)}", file=sys.stderr)
        return 2

    tenants = args.tenant or sorted(tenancy.tenants)
    days = [(start + timedelta(days=offset)).isoformat() for offset in range((end - start).days + 1)]
    try:
        keeper = BudgetKeeper.from_settings(tenancy, policies.pricing)
    except StoreCredentialError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(_rows(keeper, tenants, days))
    except Exception as error:  # noqa: BLE001 - report any store failure in one line
        reason = str(error) or f"no answer within {tenancy.store.timeout_ms:g} ms (tenancy.store.timeout_ms)"
        print(f"error: cannot read the budget store ({tenancy.store.display_target}): {type(error).__name__}: {reason}", file=sys.stderr)
        return 1
    _print(rows, args.format)
    return 0


def _run_remote(args: argparse.Namespace) -> int:
    import grpc

    from extguard.v1 import admin_pb2, admin_pb2_grpc

    start = args.start or datetime.now(UTC).date()
    end = args.end or start
    rows: list[dict[str, Any]] = []
    with grpc.insecure_channel(args.server) as channel:
        stub = admin_pb2_grpc.BudgetAdminStub(channel)
        try:
            for tenant in args.tenant or [""]:
                request = admin_pb2.GetUsageRequest(tenant=tenant, from_day=start.isoformat(), to_day=end.isoformat())
                for row in stub.GetUsage(request, timeout=30).rows:
                    rows.append({column: getattr(row, column) for column in COLUMNS})
        except grpc.RpcError as error:
            print(f"error: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2 if error.code().name in ("INVALID_ARGUMENT", "NOT_FOUND") else 1
    _print(rows, args.format)
    return 0


async def _rows(keeper: Any, tenants: list[str], days: list[str]) -> list[dict[str, Any]]:
    rows = []
    try:
        for tenant in tenants:
            ledger = await keeper.call(keeper.store.usage(tenant, days))
            for day, models in sorted(ledger.items()):
                for model, metrics in sorted(models.items()):
                    rows.append({"day": day, "tenant": tenant, "model": model, **metrics})
    finally:
        await keeper.store.close()
    return rows


def _print(rows: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        for row in rows:
            row["cost_usd"] = row.pop("cost_nanousd") / NANOS_PER_USD
        print(json.dumps(rows, indent=2))
        return
    header = [column if column != "cost_nanousd" else "cost_usd" for column in COLUMNS]
    lines = [[str(row[column]) if column != "cost_nanousd" else f"{row[column] / NANOS_PER_USD:.9f}" for column in COLUMNS] for row in rows]
    if output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(lines)
        return
    widths = [max([len(header[index]), *(len(line[index]) for line in lines)]) for index in range(len(header))]
    print("  ".join(title.ljust(width) for title, width in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not lines:
        print("(no usage recorded for these days)")
