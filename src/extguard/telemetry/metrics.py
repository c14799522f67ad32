"""Prometheus metrics of the ext_proc server, on an injectable registry so tests build their own.

Label values are names and numbers, never payload text. Tenant and model labels are bounded:
the first `max_label_values` distinct values keep their names, later ones are counted as
`other`, because model names come from clients and tenants can be many.

The token metric maps the OpenTelemetry GenAI metric `gen_ai.client.token.usage` (a histogram of
tokens per request with `gen_ai.token.type` input or output) to Prometheus conventions:
`gen_ai_client_token_usage` with labels `gen_ai_token_type`, `gen_ai_request_model`,
`gen_ai_provider_name` and `gen_ai_operation_name`, plus extguard's `tenant`.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Hold-back sizes in characters: one token is about 4 characters of English text.
_HELD_CHARS_BUCKETS = (0, 4, 8, 16, 32, 64, 128, 256, 512)
_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Tokens per request, from a one-word prompt to a long-context request (powers of 4).
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
# A whole ext_proc stream lasts as long as the LLM call: up to minutes for long completions.
_STREAM_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DEFAULT_MAX_LABEL_VALUES = 100
OTHER = "other"


class BoundedLabel:
    """Keeps the first `limit` distinct values of a label; later ones become `other`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or ""
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


class Metrics:
    # NOTE: `child` caches labelled children for the per-message hot path; prometheus_client's
    # `labels()` validates and locks on every call, which costs a few microseconds each.
    """The counters and histograms extguard updates; label values never contain payload text."""

    def __init__(self, registry: CollectorRegistry | None = None, max_label_values: int = DEFAULT_MAX_LABEL_VALUES) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tenant = BoundedLabel(max_label_values)
        self.model = BoundedLabel(max_label_values)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.streams = Counter(
            "extguard_extproc_streams",
            "ext_proc Process streams opened by Envoy (one per HTTP request).",
            registry=self.registry,
        )
        self.messages = Counter(
            "extguard_extproc_messages",
            "ext_proc ProcessingRequest messages handled, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.message_duration = Histogram(
            "extguard_extproc_message_duration_seconds",
            "Time spent handling one ProcessingRequest message, by kind.",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.guard_hits = Counter(
            "extguard_guard_hits",
            "Findings that matched a policy rule, by direction, rule, detector, entity type and action.",
            ["direction", "rule", "detector", "entity_type", "action"],
            registry=self.registry,
        )
        self.blocked = Counter(
            "extguard_blocked",
            "Requests or responses blocked, by direction and policy.",
            ["direction", "policy"],
            registry=self.registry,
        )
        self.bad_input = Counter(
            "extguard_bad_input",
            "Bodies or messages extguard could not read, by kind and the action taken (pass or reject).",
            ["kind", "action"],
            registry=self.registry,
        )
        self.internal_errors = Counter(
            "extguard_internal_errors",
            "Unexpected errors while handling a message, by stage and the failure mode applied.",
            ["stage", "failure_mode"],
            registry=self.registry,
        )
        self.deep_engine_failures = Counter(
            "extguard_deep_engine_failures",
            "Deep engine calls that timed out or failed, by engine, reason and the failure mode applied.",
            ["engine", "reason", "failure_mode"],
            registry=self.registry,
        )
        self.budget_decisions = Counter(
            "extguard_budget_decisions",
            "Budget and identity decisions, by stage (authz or reserve), decision and tenant.",
            ["stage", "decision", "tenant"],
            registry=self.registry,
        )
        self.budget_store_errors = Counter(
            "extguard_budget_store_errors",
            "Budget store calls that failed or timed out, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.budget_spool = Gauge(
            "extguard_budget_spool_records",
            "Usage records waiting in the local spool for the budget store to come back.",
            registry=self.registry,
        )
        self.budget_spool_replayed = Counter(
            "extguard_budget_spool_replayed",
            "Spooled usage records committed once the budget store was back.",
            registry=self.registry,
        )
        self.budget_spool_dropped = Counter(
            "extguard_budget_spool_dropped",
            "Usage records dropped because the spool was full.",
            registry=self.registry,
        )
        self.budget_tokens = Counter(
            "extguard_budget_tokens",
            "Tokens committed to budgets, by tenant and kind (input or output).",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.stream_held_chars = Histogram(
            "extguard_stream_held_chars",
            "Largest number of characters held back at once in one streamed response channel.",
            buckets=_HELD_CHARS_BUCKETS,
            registry=self.registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as committed or reported, by tenant, model, token type (input or output), provider and operation.",
            ["tenant", "gen_ai_request_model", "gen_ai_token_type", "gen_ai_provider_name", "gen_ai_operation_name"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.cost = Counter(
            "extguard_cost_usd",
            "Cost of the committed usage in USD at the policy's prices, by tenant and model.",
            ["tenant", "gen_ai_request_model"],
            registry=self.registry,
        )
        self.guard_decisions = Counter(
            "extguard_guard_decisions",
            "Guard verdicts, one per scanned request or response: allow, modify (masked) or deny (blocked).",
            ["direction", "verdict", "tenant"],
            registry=self.registry,
        )
        self.scan_duration = Histogram(
            "extguard_scan_duration_seconds",
            "Time one detector took to scan one request or response body, by direction and detector.",
            ["direction", "detector"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.budget_used = Gauge(
            "extguard_budget_used",
            "Used amount of each tenant budget in its current window period, as of the last check (tokens, or USD for cost_usd).",
            ["tenant", "window", "metric"],
            registry=self.registry,
        )
        self.budget_limit = Gauge(
            "extguard_budget_limit",
            "Hard limit of each tenant budget (tokens, or USD for cost_usd).",
            ["tenant", "window", "metric"],
            registry=self.registry,
        )
        self.budget_remaining = Gauge(
            "extguard_budget_remaining",
            "What is left of each tenant budget in its current window period, as of the last check; reservations count as used.",
            ["tenant", "window", "metric"],
            registry=self.registry,
        )
        self.reservations_in_flight = Gauge(
            "extguard_budget_reservations_in_flight",
            "Requests holding a budget reservation that is not yet committed, in this replica.",
            registry=self.registry,
        )
        self.failure_mode_activations = Counter(
            "extguard_failure_mode_activations",
            "Times a stage could not complete and its failure mode decided, by stage and mode (open, closed or spool).",
            ["stage", "mode"],
            registry=self.registry,
        )
        self.stream_duration = Histogram(
            "extguard_extproc_stream_duration_seconds",
            "Lifetime of one ext_proc stream, from request headers to the last response chunk.",
            buckets=_STREAM_BUCKETS,
            registry=self.registry,
        )

    def child(self, metric: Any, *values: str) -> Any:
        """Return `metric.labels(*values)`, cached; for label values that are already bounded."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
