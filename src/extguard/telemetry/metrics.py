"""Prometheus metrics of the ext_proc server, on an injectable registry so tests build their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Hold-back sizes in characters: one token is about 4 characters of English text.
_HELD_CHARS_BUCKETS = (0, 4, 8, 16, 32, 64, 128, 256, 512)
_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The counters and histograms extguard updates; label values never contain payload text."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
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
