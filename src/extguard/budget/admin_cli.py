"""`extguard budget status|reset`: the budget admin API of a running extguard, from the shell.

Both subcommands call the `extguard.v1.BudgetAdmin` service on the address that `extguard serve
--admin-listen` opened. Exit status: 0 on success, 2 for a request the server rejects (unknown
tenant or window), 1 when the server cannot be reached or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from extguard.budget.plan import NANOS_PER_USD

_CLIENT_ERRORS = ("INVALID_ARGUMENT", "NOT_FOUND")


def add_budget_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("budget", help="show or reset a tenant's budget windows on a running extguard")
    actions = parser.add_subparsers(dest="budget_action", required=True, metavar="ACTION")

    status = actions.add_parser("status", help="print the current period of every budget window")
    status.add_argument("--server", metavar="HOST:PORT", required=True, help="a running extguard's --admin-listen address")
    status.add_argument("--tenant", required=True, help="the tenant")
    status.add_argument("--user", help="also the budgets of this user (a user name or key name inside the tenant)")
    status.add_argument("--format", choices=("table", "json"), default="table", help="output format (default %(default)s)")

    reset = actions.add_parser("reset", help="start the current period of one window again from zero")
    reset.add_argument("--server", metavar="HOST:PORT", required=True, help="a running extguard's --admin-listen address")
    reset.add_argument("--tenant", required=True, help="the tenant")
    reset.add_argument("--window", required=True, choices=("minute", "hour", "day", "week", "month"), help="the window to reset")
    reset.add_argument("--scope", default="tenant", help='"tenant" (default) or "user:NAME"')


def run_budget(args: argparse.Namespace) -> int:
    import grpc

    from extguard.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        stub = admin_pb2_grpc.BudgetAdminStub(channel)
        try:
            if args.budget_action == "reset":
                request = admin_pb2.ResetWindowRequest(tenant=args.tenant, scope=args.scope, window=args.window)
                reply = stub.ResetWindow(request, timeout=30)
                print(f"reset {args.scope} period {reply.period} of tenant {args.tenant}")
                return 0
            status = stub.GetBudgetStatus(admin_pb2.GetBudgetStatusRequest(tenant=args.tenant, user=args.user or ""), timeout=30)
        except grpc.RpcError as error:
            print(f"error: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2 if error.code().name in _CLIENT_ERRORS else 1
    rows = [_status_row(window) for window in status.windows]
    _print_status(rows, args.format)
    return 0


def _status_row(window: Any) -> dict[str, Any]:
    """Return one window's status, with cost in USD instead of the API's nano-USD."""
    scale = NANOS_PER_USD if window.metric == "cost_usd" else 1
    return {
        "scope": window.scope,
        "window": window.window,
        "period": window.period,
        "metric": window.metric,
        "used": window.used / scale if scale > 1 else window.used,
        "reserved": window.reserved / scale if scale > 1 else window.reserved,
        "limit": window.limit / scale if scale > 1 else window.limit,
        "resets_in_s": window.seconds_left,
    }


def _print_status(rows: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(no budgets configured for this tenant)")
        return
    header = list(rows[0])
    lines = [[_cell(row[column]) for column in header] for row in rows]
    widths = [max(len(title), *(len(line[index]) for line in lines)) for index, title in enumerate(header)]
    print("  ".join(title.ljust(width) for title, width in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value: object) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
