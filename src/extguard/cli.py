"""The `extguard` command: serve, check-config, scan, eval, usage, budget, demo, mock-upstream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extguard import __version__


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="run the ext_proc and ext_authz gRPC server")
    parser.add_argument("--config", required=True, metavar="POLICY.yaml", help="policy file")
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC host:port (default %(default)s; port 0 picks one)")
    parser.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="Prometheus /metrics host:port (port 0 picks one), or 'off' (default %(default)s)",
    )
    parser.add_argument(
        "--admin-listen",
        default=None,
        help="host:port of the budget admin gRPC API (extguard.v1.BudgetAdmin); off unless given, "
        "because it can reset budgets (port 0 picks one)",
    )
    parser.add_argument(
        "--grace-period-seconds",
        type=float,
        default=10.0,
        help="seconds that streams in flight may take to finish after SIGTERM or SIGINT (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level; DEBUG adds one line per request with the entity types found (default %(default)s)",
    )
    parser.add_argument(
        "--max-label-values",
        type=int,
        default=100,
        metavar="N",
        help="distinct tenants, and models, that keep their own metric label; later ones count as 'other' (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="json",
        choices=["json", "text"],
        help="log lines on stderr as JSON objects or as text, each with the request id and trace id (default %(default)s)",
    )
    parser.add_argument(
        "--audit-sink",
        default="stdout",
        metavar="SINK",
        help="where audit events go, one JSON object per line: stdout, file:PATH or syslog:/path/to/socket (default %(default)s)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    from extguard.budget.redis_connect import StoreCredentialError
    from extguard.config.loader import PolicyError
    from extguard.scan.deep import DeepEngineError
    from extguard.server import ServerSettings, serve
    from extguard.telemetry.tracing import TracingUnavailable

    settings = ServerSettings(
        listen=args.listen,
        metrics_listen=None if args.metrics_listen == "off" else args.metrics_listen,
        grace_period_seconds=args.grace_period_seconds,
        admin_listen=args.admin_listen,
        max_label_values=args.max_label_values,
    )
    try:
        asyncio.run(serve(args.config, settings))
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    except (OSError, DeepEngineError, TracingUnavailable, StoreCredentialError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _add_check_config(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("check-config", help="validate a policy file and list every error")
    parser.add_argument("policy", metavar="POLICY.yaml", help="the policy file to check")


def _run_check_config(args: argparse.Namespace) -> int:
    from extguard.config.loader import PolicyError, load_policy
    from extguard.scan.detectors import default_detectors

    try:
        policies = load_policy(args.policy, default_detectors())
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    default = policies.default
    routes = ", ".join(route.name for route, _ in policies.routes) or "none"
    print(
        f"{args.policy}: valid. Default policy: {_count(len(default.request_rules), 'request rule')}, "
        f"{_count(len(default.response_rules), 'response rule')}. Routes: {routes}."
    )
    tenancy = policies.tenancy
    if tenancy is not None:
        store = tenancy.store
        redis_store = store.backend.value == "redis"
        print(
            f"Tenancy: {_count(len(tenancy.tenants), 'tenant')}, store {store.backend.value}"
            f"{f' {store.mode.value} at ' + store.display_target if redis_store else ''} (failure mode {store.failure_mode}), "
            f"windows in {tenancy.time_zone}."
        )
        for name in (store.username_env, store.password_env, store.sentinel_password_env):
            if redis_store and name is not None and not os.environ.get(name):
                print(f"note: {name} is not set here; serve will not start unless it is set to the Redis credential.")
    if policies.hash_key_is_random and policies.uses_hash_masks:
        print(
            f"note: {policies.hash_key_env} is not set here, so hash mask tokens would use a random key "
            "that changes on every restart and differs between replicas."
        )
    has_rules = default.request_rules or default.response_rules
    if not has_rules and not any(resolved.request_rules or resolved.response_rules for _, resolved in policies.routes):
        print("note: no rule is enabled, so extguard would pass every request and response unchanged.")
    for note in _deep_engine_notes(args.policy, policies):
        print(f"note: {note}")
    return 0


def _presidio_rules_name(document: dict[str, Any], entity: str) -> bool:
    """Return whether a presidio rule of the default policy or a route lists `entity`."""
    sections = [document.get("default") or {}, *(document.get("routes") or [])]
    for section in sections:
        for name, rule in ((section or {}).get("rules") or {}).items():
            detector = (rule or {}).get("detector", name)
            if detector == "presidio" and entity in ((rule or {}).get("entities") or []):
                return True
    return False


def _deep_engine_notes(path: str, policies: Any) -> list[str]:
    """Return what `extguard serve` would miss on this machine to start the policy's deep engines."""
    import importlib.util

    import yaml

    notes = []
    names = {detector.name for detector in policies.deep_detectors()}
    if "presidio" in names and importlib.util.find_spec("presidio_analyzer") is None:
        notes.append("a rule uses presidio, which is not installed here (pip install 'extguard[presidio]').")
    if "presidio" in names:
        with open(path, encoding="utf-8") as file:
            document = yaml.safe_load(file) or {}
        presidio = (document.get("deep_engines") or {}).get("presidio") or {}
        if not presidio.get("organizations") and _presidio_rules_name(document, "ORGANIZATION"):
            notes.append(
                "a presidio rule lists ORGANIZATION, which Presidio reports only with "
                "deep_engines.presidio.organizations: true."
            )
    if "llm_guard" in names:
        if importlib.util.find_spec("llm_guard") is None:
            notes.append("a rule uses llm_guard, which is not installed here (see scripts/bootstrap-llm-guard.sh).")
        with open(path, encoding="utf-8") as file:
            settings = (yaml.safe_load(file).get("deep_engines") or {}).get("llm_guard") or {}
        model_path = settings.get("model_path")
        if model_path and not Path(model_path).is_dir():
            notes.append(f"deep_engines.llm_guard.model_path {model_path} is not a folder here; serve would not start.")
    return notes


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="start Envoy, extguard and a mock LLM upstream on loopback and run a scripted series"
    )
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up after the series")


def _run_demo(args: argparse.Namespace) -> int:
    from extguard.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def _add_mock_upstream(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("mock-upstream", help="run the OpenAI/Anthropic-compatible mock upstream")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default %(default)s)")
    parser.add_argument(
        "--fail-status", type=int, metavar="CODE",
        help="reply to every LLM request with this HTTP error status (400-599), as a provider in an outage would",
    )
    parser.add_argument("--retry-after", type=int, metavar="SECONDS", help="with --fail-status: send this Retry-After header")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain (PEM); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (PEM)")


def _run_mock_upstream(args: argparse.Namespace) -> int:
    from extguard.testing.mock_upstream import main as mock_main

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.fail_status is not None:
        argv += ["--fail-status", str(args.fail_status)]
    if args.retry_after is not None:
        argv += ["--retry-after", str(args.retry_after)]
    if args.tls_cert is not None:
        argv += ["--tls-cert", args.tls_cert]
    if args.tls_key is not None:
        argv += ["--tls-key", args.tls_key]
    return mock_main(argv)


def _add_scan(commands: argparse._SubParsersAction) -> None:
    from extguard.scan.cli_scan import add_scan_parser

    add_scan_parser(commands)


def _run_scan(args: argparse.Namespace) -> int:
    from extguard.scan.cli_scan import run_scan

    return run_scan(args)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    from extguard.scan.cli_scan import add_eval_parser

    add_eval_parser(commands)


def _run_eval(args: argparse.Namespace) -> int:
    from extguard.scan.cli_scan import run_eval

    return run_eval(args)


def _add_budget(commands: argparse._SubParsersAction) -> None:
    from extguard.budget.admin_cli import add_budget_parser

    add_budget_parser(commands)


def _run_budget(args: argparse.Namespace) -> int:
    from extguard.budget.admin_cli import run_budget

    return run_budget(args)


def _add_usage(commands: argparse._SubParsersAction) -> None:
    from extguard.budget.usage_cli import add_usage_parser

    add_usage_parser(commands)


def _run_usage(args: argparse.Namespace) -> int:
    from extguard.budget.usage_cli import run_usage

    return run_usage(args)


_COMMANDS = {
    "serve": (_add_serve, _run_serve),
    "usage": (_add_usage, _run_usage),
    "budget": (_add_budget, _run_budget),
    "check-config": (_add_check_config, _run_check_config),
    "scan": (_add_scan, _run_scan),
    "eval": (_add_eval, _run_eval),
    "demo": (_add_demo, _run_demo),
    "mock-upstream": (_add_mock_upstream, _run_mock_upstream),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extguard", description="Guard LLM traffic behind Envoy.")
    parser.add_argument("--version", action="version", version=f"extguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add, _ in _COMMANDS.values():
        add(commands)
    args = parser.parse_args(argv)

    level = getattr(args, "log_level", "INFO")
    if args.command == "serve":
        from extguard.telemetry.logs import configure_logging

        try:
            configure_logging(level, args.log_format, args.audit_sink)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _COMMANDS[args.command][1](args)
