"""Deep engines as detectors of the rule engine.

A `DeepDetector` takes an inline detector's place in a policy rule, but its findings come from
`analyze()`, which awaits a worker pool (see `extguard.scan.deep`). The exchange calls it for
whole request bodies and buffered JSON responses, then hands the findings to `guard_text` as
known findings. Streamed responses are guarded by the inline detectors only: a model call per
SSE event would cost far more than the event. The engine is built and its workers started by
`start()`, so a policy that names a deep engine validates without the engine's packages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extguard.scan.findings import Finding

# Presidio's entity names that its AnalyzerEngine returns for English with the en_core_web_sm
# model and its predefined recognizers (presidio-analyzer 2.2). ORGANIZATION needs
# `deep_engines.presidio.organizations: true`; the country-specific types need `all_recognizers`.
PRESIDIO_ENTITY_TYPES = frozenset({
    "PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME",
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL", "CRYPTO",
    "MAC_ADDRESS", "UUID",
    "MEDICAL_LICENSE", "US_SSN", "US_ITIN", "US_PASSPORT", "US_DRIVER_LICENSE", "US_BANK_NUMBER",
    "UK_NHS", "UK_NINO", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "IT_DRIVER_LICENSE", "IT_VAT_CODE",
    "IT_PASSPORT", "IT_IDENTITY_CARD", "PL_PESEL", "SG_NRIC_FIN", "SG_UEN", "AU_ABN", "AU_ACN",
    "AU_TFN", "AU_MEDICARE", "IN_PAN", "IN_AADHAAR", "IN_VEHICLE_REGISTRATION", "IN_VOTER",
    "IN_PASSPORT", "FI_PERSONAL_IDENTITY_CODE", "KR_RRN", "TH_TNIN",
})  # fmt: skip
LLM_GUARD_ENTITY_TYPES = frozenset({"PROMPT_INJECTION"})


class DeepDetector:
    """A deep engine (`presidio` or `llm_guard`) bound to a rule; see the module docstring."""

    is_deep = True

    def __init__(self, name: str, family: str, entity_types: frozenset[str], build_engine: Callable[[], Any]) -> None:
        self.name = name
        self.family = family  # the `detector` of its findings: "pii" or "injection"
        self.entity_types = entity_types
        self._build_engine = build_engine
        self._engine: Any = None

    async def start(self) -> None:
        """Build the engine and start its workers; raise DeepEngineError when it cannot load."""
        if self._engine is None:
            self._engine = self._build_engine()
        await self._engine.start()

    async def analyze(self, text: str) -> list[Finding]:
        if self._engine is None:
            raise RuntimeError(f"deep engine {self.name} was not started")
        return await self._engine.analyze(text)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def scan(self, text: str) -> list[Finding]:
        raise RuntimeError(f"deep engine {self.name} runs through analyze(), never inline")

    def pending_chars(self, text: str) -> int:
        return 0


def is_deep(detector: object) -> bool:
    return getattr(detector, "is_deep", False)
