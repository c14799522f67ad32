"""Regex detectors for PII, secrets and prompt injection.

These are the inline detectors that run on every request and response. Patterns are compiled
once at import. The detector classes keep no per-instance state, so one instance can be shared
by all concurrent streams. All offsets are `str` indices into the scanned text.

Every pattern is bounded: from a given start it inspects at most a fixed number of characters,
and a look-behind stops it from restarting inside a run it already rejected. A scan is therefore
linear in the text length, and `pending_chars` can bound how far back a new character may
change a result.
"""

from __future__ import annotations

import re

from extguard.scan.findings import Detector, Finding
from extguard.scan.injection import InjectionDetector
from extguard.scan.pii import PiiDetector


def _finding_start(finding: Finding) -> int:
    return finding.start


def _trailing_run_length(text: str, chars: frozenset[str], limit: int) -> int:
    """Return the length of the run of `chars` that ends `text`, counting at most `limit` chars."""
    stop = max(0, len(text) - limit)
    index = len(text)
    while index > stop and text[index - 1] in chars:
        index -= 1
    return len(text) - index


# -- secrets --------------------------------------------------------------------------------

_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_KEY_CHARS = 20
_AWS_KEY_PREFIX = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{0,16}|A(?:KI?|SI?)?")
_AWS_RUN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Legacy keys are `sk-` + 48 alphanumerics and project keys `sk-proj-` + about 160 chars, so
# 256 chars after `sk-` leaves room for longer formats while keeping the pattern bounded.
_OPENAI_KEY_BODY_MAX_CHARS = 256
_OPENAI_API_KEY = re.compile(
    rf"(?<![A-Za-z0-9_\-])sk-[A-Za-z0-9_\-]{{20,{_OPENAI_KEY_BODY_MAX_CHARS}}}(?![A-Za-z0-9_\-])"
)
_OPENAI_KEY_MAX_CHARS = 3 + _OPENAI_KEY_BODY_MAX_CHARS
_OPENAI_KEY_PREFIX = re.compile(rf"sk-[A-Za-z0-9_\-]{{0,{_OPENAI_KEY_BODY_MAX_CHARS}}}|sk?")
_OPENAI_RUN_CHARS = _AWS_RUN_CHARS | {"-"}


class SecretDetector:
    """AWS access key ids and OpenAI API keys, score 1.0."""

    __slots__ = ()

    name = "secrets"
    entity_types = frozenset({"AWS_ACCESS_KEY_ID", "OPENAI_API_KEY"})

    def scan(self, text: str) -> list[Finding]:
        """Return every key in `text`, sorted by start offset."""
        findings = [
            Finding("secrets", "AWS_ACCESS_KEY_ID", match.start(), match.end(), 1.0, "aws_access_key_id")
            for match in _AWS_ACCESS_KEY_ID.finditer(text)
        ]
        if "sk-" in text:
            findings.extend(
                Finding("secrets", "OPENAI_API_KEY", match.start(), match.end(), 1.0, "openai_api_key")
                for match in _OPENAI_API_KEY.finditer(text)
            )

        if len(findings) > 1:
            findings.sort(key=_finding_start)
        return findings

    def pending_chars(self, text: str) -> int:
        """Return the length of the trailing run if it is the start of a key, else 0.

        Both key kinds must start at the start of a run of key characters, so only a run that
        is still a prefix of a key can become one.
        """
        pending = 0

        aws_run = _trailing_run_length(text, _AWS_RUN_CHARS, _AWS_KEY_CHARS + 1)
        if aws_run and _AWS_KEY_PREFIX.fullmatch(text, len(text) - aws_run):
            pending = aws_run

        openai_run = _trailing_run_length(text, _OPENAI_RUN_CHARS, _OPENAI_KEY_MAX_CHARS + 1)
        if openai_run and _OPENAI_KEY_PREFIX.fullmatch(text, len(text) - openai_run):
            pending = max(pending, openai_run)

        return pending


def default_detectors() -> dict[str, Detector]:
    """Return one instance of each inline detector, keyed by detector name.

    Building them compiles their pattern databases, which takes a few hundred milliseconds:
    build once per process and share them.
    """
    detectors: tuple[Detector, ...] = (PiiDetector(), SecretDetector(), InjectionDetector())
    return {detector.name: detector for detector in detectors}
