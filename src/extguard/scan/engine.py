"""Scan rules and `guard_text`, which applies a policy's rules to one whole text."""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from extguard.scan.findings import Detector, Finding
from extguard.scan.redact import Masker, MaskStyle, PseudonymVault


class Action(enum.StrEnum):
    """Action a rule takes on a hit. When hits overlap, BLOCK beats MASK beats LOG."""

    BLOCK = "block"
    MASK = "mask"
    LOG = "log"


class AllowList:
    """Values and patterns a policy never flags, whatever the detector found.

    Values compare case-insensitively with the matched text; patterns must match all of it.
    """

    __slots__ = ("_values", "_pattern")

    def __init__(self, values: Sequence[str] = (), patterns: Sequence[str] = ()) -> None:
        self._values = frozenset(value.casefold() for value in values)
        self._pattern = re.compile("|".join(f"(?:{pattern})" for pattern in patterns)) if patterns else None

    def __bool__(self) -> bool:
        return bool(self._values) or self._pattern is not None

    def allows(self, value: str) -> bool:
        if value.casefold() in self._values:
            return True
        return self._pattern is not None and self._pattern.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ScanRule:
    """One policy rule bound to its detector.

    `name` is the policy's rule name, used in reports and metrics. `entity_types` limits the
    rule to some of the detector's types, None meaning all of them. Types the detector does not
    have are not rejected here (the policy loader reports them) and never match. A finding
    counts when its score is at least `score_threshold`.
    """

    name: str
    detector: Detector
    action: Action
    entity_types: frozenset[str] | None = None
    score_threshold: float = 0.0
    mask_style: MaskStyle = MaskStyle.PLACEHOLDER
    allow: AllowList | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"rule {self.name!r}: score_threshold {self.score_threshold} is not between 0 and 1")

    def accepts(self, finding: Finding) -> bool:
        """Return whether `finding` passes this rule's entity-type filter and score threshold."""
        if finding.score < self.score_threshold:
            return False
        return self.entity_types is None or finding.entity_type in self.entity_types


@dataclass(frozen=True, slots=True)
class Hit:
    """A finding that passed its rule's filter and threshold."""

    rule: ScanRule
    finding: Finding


@dataclass(slots=True)
class TextGuardResult:
    """The outcome of `guard_text`.

    `text` is the masked text, or the input object itself when `changed` is false. `hits` are
    sorted by start offset and `blocking` is the subset whose action is BLOCK.
    """

    text: str
    hits: list[Hit]
    blocking: list[Hit]
    changed: bool


class MaskSpan(NamedTuple):
    """A range to replace, the union of overlapping MASK hits. `hit` sets the entity type and style."""

    start: int
    end: int
    hit: Hit


def guard_text(
    text: str,
    rules: Sequence[ScanRule],
    masker: Masker,
    vault: PseudonymVault | None,
    known_findings: Mapping[int, list[Finding]] | None = None,
    timings: dict[str, float] | None = None,
) -> TextGuardResult:
    """Scan `text` with `rules` and mask what the MASK rules found.

    When any hit blocks, every hit is still reported but nothing is masked. PSEUDONYM masks
    mint tokens into `vault`, and ValueError is raised when such a rule fires without a vault.
    `known_findings` maps `id(detector)` to findings computed beforehand (the deep engines run
    asynchronously); those detectors are not asked to scan. When `timings` is given, each
    detector's scan time in seconds is added to it under the detector's name.
    """
    if not rules or not text:
        return TextGuardResult(text, [], [], False)

    hits = collect_hits(text, rules, known_findings, timings)
    blocking = [hit for hit in hits if hit.rule.action == Action.BLOCK]
    if blocking:
        return TextGuardResult(text, hits, blocking, False)

    spans = merge_mask_spans(hits)
    if not spans:
        return TextGuardResult(text, hits, blocking, False)
    return TextGuardResult(apply_masks(text, spans, masker, vault), hits, blocking, True)


def _hit_start(hit: Hit) -> int:
    return hit.finding.start


def collect_hits(
    text: str,
    rules: Sequence[ScanRule],
    known_findings: Mapping[int, list[Finding]] | None = None,
    timings: dict[str, float] | None = None,
) -> list[Hit]:
    """Return the hits of `rules` in `text`, sorted by start offset, then by rule order.

    Each distinct detector scans the text once, however many rules share it, unless
    `known_findings` already contains its findings.
    """
    findings_by_detector: dict[int, list[Finding]] = dict(known_findings) if known_findings else {}
    hits: list[Hit] = []
    for rule in rules:
        findings = findings_by_detector.get(id(rule.detector))
        if findings is None:
            started = time.perf_counter()
            findings = findings_by_detector[id(rule.detector)] = rule.detector.scan(text)
            if timings is not None:
                name = rule.detector.name
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        allow = rule.allow
        for finding in findings:
            if rule.accepts(finding) and not (allow and allow.allows(text[finding.start : finding.end])):
                hits.append(Hit(rule, finding))

    # The sort is stable, so equal starts keep rule order.
    hits.sort(key=_hit_start)
    return hits


def merge_mask_spans(hits: Sequence[Hit], clip_start: int = 0) -> list[MaskSpan]:
    """Return the unions of overlapping MASK hits, in order. `hits` must be sorted by start.

    Each span takes its entity type and style from its first hit. Spans that only touch stay
    apart. Hit starts before `clip_start` are moved to it, because the text before it is gone.
    """
    spans: list[MaskSpan] = []
    for hit in hits:
        if hit.rule.action != Action.MASK:
            continue
        start = max(hit.finding.start, clip_start)
        end = hit.finding.end
        if spans and start < spans[-1].end:
            if end > spans[-1].end:
                spans[-1] = spans[-1]._replace(end=end)
        else:
            spans.append(MaskSpan(start, end, hit))
    return spans


def apply_masks(
    text: str,
    spans: Sequence[MaskSpan],
    masker: Masker,
    vault: PseudonymVault | None,
    start: int = 0,
    end: int | None = None,
) -> str:
    """Return `text[start:end]` with every span replaced by its mask.

    The spans must be sorted, must not overlap, and must lie within `start` and `end`.
    """
    end = len(text) if end is None else end
    if not spans:
        return text[start:end]

    pieces: list[str] = []
    position = start
    for span in spans:
        pieces.append(text[position : span.start])
        finding = span.hit.finding
        pieces.append(masker.mask(text[span.start : span.end], finding.entity_type, span.hit.rule.mask_style, vault))
        position = span.end
    pieces.append(text[position:end])
    return "".join(pieces)
