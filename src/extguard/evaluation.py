"""Evaluation of the PII, secrets and prompt-injection detectors on labelled JSON-lines data.

The data folder contains `pii.jsonl` and `injection.jsonl`, and may contain `secrets.jsonl`:

- A PII row has `text` and `entities` (each with `type`, `start`, `end` in characters of
  `text`). `labelled_types`, when present, lists the only types annotated on that row, so only
  predictions of those types are scored there. `lookalike_of: X` marks a row whose text is not
  a valid X. A prediction of type X on it is a false positive, and the row is no evidence
  about other types.
- An injection row has `text`, `label` ("injection" or "benign") and `category`.
- A secrets row has the fields of a PII row, with the secrets detector's entity types.

PII and secrets predictions are scored per entity type, each against its own file. A prediction is a true positive when its type
matches a gold span that it overlaps; each gold span and each prediction is matched at most
once, larger overlaps first. The exact-span figures require equal start and end. A predicted
LOCATION counts as GPE (geopolitical entity) where the data labels GPE but not LOCATION, as
Presidio's synthetic data does. Other predicted types
that the data never labels are listed apart and left out of the totals, and gold types a system
cannot produce are marked as such and count as misses. Injection is a binary verdict per row: a
row is flagged when an injection finding scores at least the threshold.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extguard.scan.findings import Finding

COMMON_PII_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS")

Predict = Callable[[str], Sequence[Finding]]


class EvaluationDataError(Exception):
    """The data folder or one of its files is missing or malformed."""


def default_data_dir() -> Path:
    """Return `shared/data/eval-dev` beside the repository that contains this source file."""
    repository = Path(__file__).resolve().parents[2]
    return repository.parent / "shared" / "data" / "eval-dev"


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    entity_type: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class PiiRow:
    """One PII example. `labelled_types` None means every type is annotated."""

    text: str
    entities: tuple[Span, ...]
    labelled_types: frozenset[str] | None
    lookalike_of: str | None
    category: str

    def scored_types(self) -> frozenset[str] | None:
        """Return the types scored on this row, None meaning all types.

        A look-alike row without `labelled_types` scores its look-alike type and its gold types.
        """
        if self.lookalike_of is None:
            return self.labelled_types
        labelled = self.labelled_types
        if labelled is None:
            labelled = frozenset(span.entity_type for span in self.entities)
        return labelled | {self.lookalike_of}


@dataclass(frozen=True, slots=True)
class InjectionRow:
    text: str
    is_injection: bool
    category: str


def load_pii_rows(path: Path) -> list[PiiRow]:
    """Read `pii.jsonl`; raise EvaluationDataError naming the file and line of a malformed row."""
    rows = []
    for line_number, record in _read_jsonl(path):
        try:
            rows.append(_pii_row(record))
        except (KeyError, TypeError, ValueError) as error:
            raise EvaluationDataError(f"{path}:{line_number}: invalid PII row: {error}") from None
    return rows


def _pii_row(record: dict[str, Any]) -> PiiRow:
    text = record["text"]
    if not isinstance(text, str):
        raise TypeError("`text` is not a string")

    entities = tuple(Span(str(item["type"]), int(item["start"]), int(item["end"])) for item in record["entities"])
    for span in entities:
        if not 0 <= span.start < span.end <= len(text):
            raise ValueError(f"span {span.start}:{span.end} is outside the text of {len(text)} characters")

    labelled = record.get("labelled_types")
    lookalike = record.get("lookalike_of")
    return PiiRow(
        text=text,
        entities=entities,
        labelled_types=frozenset(map(str, labelled)) if labelled is not None else None,
        lookalike_of=str(lookalike) if lookalike is not None else None,
        category=str(record.get("category", "")),
    )


def load_injection_rows(path: Path) -> list[InjectionRow]:
    """Read `injection.jsonl`; raise EvaluationDataError naming the file and line of a malformed row."""
    rows = []
    for line_number, record in _read_jsonl(path):
        label = record.get("label")
        text = record.get("text")
        if label not in ("injection", "benign") or not isinstance(text, str):
            message = "expected a string `text` and `label` 'injection' or 'benign'"
            raise EvaluationDataError(f"{path}:{line_number}: invalid injection row: {message}")
        rows.append(InjectionRow(text, label == "injection", str(record.get("category", ""))))
    return rows


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationDataError(f"cannot read {path}: {error}") from None

    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvaluationDataError(f"{path}:{line_number}: not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise EvaluationDataError(f"{path}:{line_number}: expected a JSON object")
        yield line_number, record


# -- counting ---------------------------------------------------------------------------------


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass(slots=True)
class Counts:
    """True positives, false positives and false negatives of one type or total."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        """Return the harmonic mean of precision and recall; None when either is undefined."""
        precision, recall = self.precision, self.recall
        if precision is None or recall is None:
            return None
        if precision + recall == 0:
            return 0.0
        return 2 * precision * recall / (precision + recall)

    def add(self, other: Counts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def as_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def count_overlap_matches(gold: Sequence[Span], predicted: Sequence[Span]) -> int:
    """Return the size of a one-to-one matching of overlapping spans, larger overlaps first."""
    pairs = []
    for gold_index, gold_span in enumerate(gold):
        for predicted_index, predicted_span in enumerate(predicted):
            overlap = min(gold_span.end, predicted_span.end) - max(gold_span.start, predicted_span.start)
            if overlap > 0:
                pairs.append((-overlap, gold_index, predicted_index))
    pairs.sort()

    matched_gold: set[int] = set()
    matched_predicted: set[int] = set()
    for _, gold_index, predicted_index in pairs:
        if gold_index in matched_gold or predicted_index in matched_predicted:
            continue
        matched_gold.add(gold_index)
        matched_predicted.add(predicted_index)
    return len(matched_gold)


def count_exact_matches(gold: Sequence[Span], predicted: Sequence[Span]) -> int:
    """Return how many gold spans have a predicted span with the same start and end."""
    gold_counts = Counter((span.start, span.end) for span in gold)
    predicted_counts = Counter((span.start, span.end) for span in predicted)
    return sum((gold_counts & predicted_counts).values())


# -- PII scoring ------------------------------------------------------------------------------


@dataclass(slots=True)
class PiiScores:
    """PII results of one system.

    `by_type` and `exact_by_type` cover every type the data labels. `unscored_predictions`
    counts predictions of types the data never labels, by type. `producible` is the set of
    types the system can output.
    """

    system: str
    producible: frozenset[str]
    by_type: dict[str, Counts]
    exact_by_type: dict[str, Counts]
    unscored_predictions: dict[str, int]
    detector: str = "pii"

    def total(self, types: Iterable[str], *, exact: bool = False) -> Counts:
        """Return the micro-averaged counts over `types`."""
        table = self.exact_by_type if exact else self.by_type
        total = Counts()
        for entity_type in types:
            total.add(table.get(entity_type, Counts()))
        return total

    def scopes(self) -> dict[str, list[str]]:
        """Return the type lists of the reported totals, by scope name."""
        data_types = sorted(self.by_type)
        scopes = {"common six": list(COMMON_PII_TYPES)} if self.detector == "pii" else {}
        scopes["types the system produces"] = [t for t in data_types if t in self.producible]
        scopes["all labelled types"] = data_types
        return scopes


def data_types(rows: Sequence[PiiRow], base_types: Iterable[str] = COMMON_PII_TYPES) -> frozenset[str]:
    """Return `base_types` and every type the data labels: gold types, `labelled_types` and `lookalike_of`."""
    types: set[str] = set(base_types)
    for row in rows:
        types.update(span.entity_type for span in row.entities)
        types.update(row.labelled_types or ())
        if row.lookalike_of:
            types.add(row.lookalike_of)
    return frozenset(types)


def score_pii(
    system: str,
    rows: Sequence[PiiRow],
    predict: Predict,
    producible: Iterable[str],
    threshold: float,
    *,
    detector: str = "pii",
) -> PiiScores:
    """Score `predict` on `rows`; only findings of `detector` scoring at least `threshold` count.

    Secrets rows are scored with `detector="secrets"`; the common six PII types are then not
    added to the labelled types.
    """
    labelled = data_types(rows, COMMON_PII_TYPES if detector == "pii" else ())
    by_type = {entity_type: Counts() for entity_type in labelled}
    exact_by_type = {entity_type: Counts() for entity_type in labelled}
    unscored: Counter[str] = Counter()

    aliases = {source: target for source, target in _TYPE_ALIASES.items() if target in labelled and source not in labelled}
    for row in rows:
        predicted = _predicted_spans(predict(row.text), threshold, detector)
        if aliases:
            predicted = [Span(aliases.get(span.entity_type, span.entity_type), span.start, span.end) for span in predicted]
        scope = row.scored_types()
        gold_by_type = _group_by_type(row.entities)
        predicted_by_type = _group_by_type(predicted)

        for entity_type in set(gold_by_type) | set(predicted_by_type):
            if scope is not None and entity_type not in scope:
                continue
            if entity_type not in labelled:
                unscored[entity_type] += len(predicted_by_type[entity_type])
                continue
            gold = gold_by_type[entity_type]
            spans = predicted_by_type[entity_type]
            _add_matches(by_type[entity_type], gold, spans, count_overlap_matches(gold, spans))
            _add_matches(exact_by_type[entity_type], gold, spans, count_exact_matches(gold, spans))

    producible = set(producible)
    producible.update(target for source, target in aliases.items() if source in producible)
    return PiiScores(system, frozenset(producible), by_type, exact_by_type, dict(sorted(unscored.items())), detector)


# Predicted type -> the data's name for it, used where the data labels only the latter.
_TYPE_ALIASES = {"LOCATION": "GPE"}


def _predicted_spans(findings: Sequence[Finding], threshold: float, detector: str) -> list[Span]:
    """Return the distinct spans of `detector`'s findings at or above `threshold`."""
    spans = {
        Span(finding.entity_type, finding.start, finding.end)
        for finding in findings
        if finding.detector == detector and finding.score >= threshold
    }
    return sorted(spans, key=lambda span: (span.start, span.end, span.entity_type))


def _group_by_type(spans: Iterable[Span]) -> defaultdict[str, list[Span]]:
    grouped: defaultdict[str, list[Span]] = defaultdict(list)
    for span in spans:
        grouped[span.entity_type].append(span)
    return grouped


def _add_matches(counts: Counts, gold: Sequence[Span], predicted: Sequence[Span], matches: int) -> None:
    counts.tp += matches
    counts.fp += len(predicted) - matches
    counts.fn += len(gold) - matches


# -- injection scoring ------------------------------------------------------------------------


@dataclass(slots=True)
class BinaryCounts(Counts):
    """Confusion counts of a binary verdict: `Counts` plus true negatives."""

    tn: int = 0

    @property
    def false_positive_rate(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def rows(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def record(self, actual: bool, flagged: bool) -> None:
        if actual:
            if flagged:
                self.tp += 1
            else:
                self.fn += 1
        elif flagged:
            self.fp += 1
        else:
            self.tn += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
        }


@dataclass(slots=True)
class InjectionScores:
    system: str
    overall: BinaryCounts
    by_category: dict[str, BinaryCounts]


def score_injection(system: str, rows: Sequence[InjectionRow], predict: Predict, threshold: float) -> InjectionScores:
    """Score `predict` on `rows`: a row is flagged when an injection finding scores at least `threshold`."""
    overall = BinaryCounts()
    by_category: defaultdict[str, BinaryCounts] = defaultdict(BinaryCounts)
    for row in rows:
        flagged = any(f.detector == "injection" and f.score >= threshold for f in predict(row.text))
        overall.record(row.is_injection, flagged)
        by_category[row.category].record(row.is_injection, flagged)
    return InjectionScores(system, overall, dict(sorted(by_category.items())))


# -- the whole evaluation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class System:
    """A system under evaluation: a name, a predict function and the PII and secret types it can output.

    Secrets are scored only for a system with `secrets_types`.
    """

    name: str
    predict: Predict
    pii_types: frozenset[str]
    evaluate_pii: bool = True
    evaluate_injection: bool = True
    secrets_types: frozenset[str] = frozenset()


@dataclass(slots=True)
class EvaluationReport:
    data_dir: Path
    pii_rows: int
    injection_rows: int
    pii_threshold: float
    injection_threshold: float
    pii: list[PiiScores] = field(default_factory=list)
    injection: list[InjectionScores] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    secrets_rows: int = 0
    secrets: list[PiiScores] = field(default_factory=list)


def evaluate(
    data_dir: Path,
    systems: Sequence[System],
    *,
    pii_threshold: float,
    injection_threshold: float,
    notes: Sequence[str] = (),
) -> EvaluationReport:
    """Run every system on the data in `data_dir` and return the scores.

    Raise EvaluationDataError when the folder or a file in it is missing or malformed.
    """
    if not data_dir.is_dir():
        raise EvaluationDataError(f"evaluation data folder not found: {data_dir}; pass another folder with --data")
    pii_rows = load_pii_rows(data_dir / "pii.jsonl")
    injection_rows = load_injection_rows(data_dir / "injection.jsonl")
    secrets_path = data_dir / "secrets.jsonl"
    secrets_rows = load_pii_rows(secrets_path) if secrets_path.exists() else []

    report = EvaluationReport(
        data_dir,
        len(pii_rows),
        len(injection_rows),
        pii_threshold,
        injection_threshold,
        notes=list(notes),
        secrets_rows=len(secrets_rows),
    )
    for system in systems:
        if system.evaluate_pii:
            report.pii.append(score_pii(system.name, pii_rows, system.predict, system.pii_types, pii_threshold))
        if secrets_rows and system.secrets_types:
            secrets = score_pii(
                system.name, secrets_rows, system.predict, system.secrets_types, pii_threshold, detector="secrets"
            )
            report.secrets.append(secrets)
        if system.evaluate_injection:
            report.injection.append(score_injection(system.name, injection_rows, system.predict, injection_threshold))
    return report


# -- output -----------------------------------------------------------------------------------


def report_to_json(report: EvaluationReport) -> dict[str, Any]:
    """Return the report as JSON-serializable data; undefined ratios are null."""
    return {
        "data_dir": str(report.data_dir),
        "pii_rows": report.pii_rows,
        "injection_rows": report.injection_rows,
        "pii_threshold": report.pii_threshold,
        "injection_threshold": report.injection_threshold,
        "notes": report.notes,
        "pii": [_pii_json(scores) for scores in report.pii],
        "secrets_rows": report.secrets_rows,
        "secrets": [_pii_json(scores) for scores in report.secrets],
        "injection": [
            {
                "system": scores.system,
                "overall": scores.overall.as_dict(),
                "by_category": {name: counts.as_dict() for name, counts in scores.by_category.items()},
            }
            for scores in report.injection
        ],
    }


def _pii_json(scores: PiiScores) -> dict[str, Any]:
    return {
        "system": scores.system,
        "producible_types": sorted(scores.producible),
        "totals": {
            scope: {
                "overlap": scores.total(types).as_dict(),
                "exact": scores.total(types, exact=True).as_dict(),
            }
            for scope, types in scores.scopes().items()
        },
        "by_type": {
            entity_type: {
                "produced_by_system": entity_type in scores.producible,
                "overlap": counts.as_dict(),
                "exact": scores.exact_by_type[entity_type].as_dict(),
            }
            for entity_type, counts in sorted(scores.by_type.items())
        },
        "unscored_predictions": scores.unscored_predictions,
    }


def _format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def render_markdown(report: EvaluationReport) -> str:
    """Return the report as a Markdown document."""
    lines = [
        "# extguard detector evaluation",
        "",
        f"Data: `{report.data_dir}` ({report.pii_rows} PII rows, {report.injection_rows} injection rows, "
        f"{report.secrets_rows} secrets rows).",
        f"PII and secrets findings count at score ≥ {report.pii_threshold:g}; a row is flagged as injection at score ≥ "
        f"{report.injection_threshold:g}.",
        "A PII prediction is a true positive when its type matches and its span overlaps a gold span "
        "(one-to-one); the exact columns require the same start and end.",
    ]
    lines.extend(f"- {note}" for note in report.notes)

    if report.pii:
        lines.extend(_render_pii_comparison(report.pii))
        for scores in report.pii:
            lines.extend(_render_pii_system(scores))
    for scores in report.secrets:
        lines.extend(_render_pii_system(scores))
    if report.injection:
        lines.extend(_render_injection(report.injection))
    return "\n".join(lines) + "\n"


def _render_pii_comparison(all_scores: Sequence[PiiScores]) -> list[str]:
    header = ["type", *(f"{scores.system} F1" for scores in all_scores)]
    rows = []
    for entity_type in COMMON_PII_TYPES:
        row = [entity_type]
        for scores in all_scores:
            f1 = _format_ratio(scores.by_type.get(entity_type, Counts()).f1)
            row.append(f1 if entity_type in scores.producible else f"{f1} (not produced)")
        rows.append(row)
    for scope in ("common six", "types the system produces", "all labelled types"):
        rows.append([f"**micro, {scope}**", *(_format_ratio(s.total(s.scopes()[scope]).f1) for s in all_scores)])
    return ["", "## PII: F1 by system (overlap match)", "", *_table(header, rows)]


def _counts_row(label: str, counts: Counts, exact: Counts) -> list[str]:
    return [
        label,
        str(counts.tp + counts.fn),
        str(counts.tp + counts.fp),
        str(counts.tp),
        str(counts.fp),
        str(counts.fn),
        _format_ratio(counts.precision),
        _format_ratio(counts.recall),
        _format_ratio(counts.f1),
        _format_ratio(exact.precision),
        _format_ratio(exact.recall),
        _format_ratio(exact.f1),
    ]


def _render_pii_system(scores: PiiScores) -> list[str]:
    header = ["type", "gold", "predicted", "TP", "FP", "FN", "P", "R", "F1", "exact P", "exact R", "exact F1"]
    totals = [
        _counts_row(f"**micro, {scope}**", scores.total(types), scores.total(types, exact=True))
        for scope, types in scores.scopes().items()
    ]
    per_type = []
    for entity_type, counts in sorted(scores.by_type.items()):
        label = entity_type if entity_type in scores.producible else f"{entity_type} (not produced)"
        per_type.append(_counts_row(label, counts, scores.exact_by_type[entity_type]))

    title = "PII" if scores.detector == "pii" else "Secrets"
    lines = ["", f"## {title}: {scores.system}", "", *_table(header, totals), "", *_table(header, per_type)]
    if scores.unscored_predictions:
        listing = ", ".join(f"{name} {count}" for name, count in scores.unscored_predictions.items())
        lines.extend(["", f"Predictions of types the data does not label (not scored): {listing}."])
    return lines


def _render_injection(all_scores: Sequence[InjectionScores]) -> list[str]:
    header = ["system", "rows", "TP", "FP", "FN", "TN", "precision", "recall", "FPR"]
    overall = [_binary_row(scores.system, scores.overall) for scores in all_scores]
    lines = ["", "## Prompt injection", "", *_table(header, overall)]

    for scores in all_scores:
        rows = [_binary_row(category, counts) for category, counts in scores.by_category.items()]
        lines.extend(["", f"### Injection by category: {scores.system}", "", *_table(["category", *header[1:]], rows)])
    return lines


def _binary_row(label: str, counts: BinaryCounts) -> list[str]:
    return [
        label,
        str(counts.rows),
        str(counts.tp),
        str(counts.fp),
        str(counts.fn),
        str(counts.tn),
        _format_ratio(counts.precision),
        _format_ratio(counts.recall),
        _format_ratio(counts.false_positive_rate),
    ]
