"""The detector contract shared by the inline detectors, the deep engines and the stream scanner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected span of text.

    Offsets are in characters (Python `str` indices) of the text that was scanned, end exclusive.
    `rule` names the pattern or heuristic that fired; it is safe to log. The matched value is
    never stored here: callers slice the text when they must mask it.
    """

    detector: str  # "pii", "secrets" or "injection"
    entity_type: str  # Presidio's names for PII (EMAIL_ADDRESS, CREDIT_CARD, ...), else a kind
    start: int
    end: int
    score: float  # 0.0 to 1.0
    rule: str = ""


class Detector(Protocol):
    """A detector finds spans of one family (PII, secrets, injection) in a text.

    Implementations are immutable after construction and safe to share between streams.
    """

    name: str
    entity_types: frozenset[str]

    def scan(self, text: str) -> list[Finding]:
        """Return every finding in `text`, sorted by start offset."""
        ...

    def pending_chars(self, text: str) -> int:
        """Return how many trailing characters of `text` could still become part of a match.

        The stream scanner holds back that many characters until more text arrives, so a value
        split across SSE events is still found. Returning 0 means nothing needs holding back.
        The value never exceeds the longest match the detector can produce.
        """
        ...
