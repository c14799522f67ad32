"""Tests of the evaluation harness: counting, matching, labelled_types, lookalike_of, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from extguard.evaluation import (
    COMMON_PII_TYPES,
    BinaryCounts,
    Counts,
    EvaluationDataError,
    EvaluationReport,
    InjectionRow,
    PiiRow,
    Span,
    System,
    count_exact_matches,
    count_overlap_matches,
    default_data_dir,
    evaluate,
    load_pii_rows,
    render_markdown,
    report_to_json,
    score_injection,
    score_pii,
)
from extguard.scan.findings import Finding

# -- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "fp", "fn", "precision", "recall", "f1"),
    [
        (3, 1, 2, 0.75, 0.6, 2 * 0.75 * 0.6 / 1.35),
        (4, 0, 0, 1.0, 1.0, 1.0),
        (0, 2, 1, 0.0, 0.0, 0.0),
        (0, 0, 5, None, 0.0, None),  # nothing predicted: precision undefined
        (0, 3, 0, 0.0, None, None),  # nothing to find: recall undefined
        (0, 0, 0, None, None, None),
    ],
)
def test_counts_ratios(
    tp: int, fp: int, fn: int, precision: float | None, recall: float | None, f1: float | None
) -> None:
    counts = Counts(tp, fp, fn)

    assert counts.precision == pytest.approx(precision)
    assert counts.recall == pytest.approx(recall)
    assert counts.f1 == pytest.approx(f1)


def test_binary_counts_ratios() -> None:
    counts = BinaryCounts()
    for actual, flagged in [(True, True), (True, True), (True, False), (False, True), (False, False), (False, False)]:
        counts.record(actual, flagged)

    assert (counts.tp, counts.fn, counts.fp, counts.tn) == (2, 1, 1, 2)
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.recall == pytest.approx(2 / 3)
    assert counts.false_positive_rate == pytest.approx(1 / 3)


# -- span matching ----------------------------------------------------------------------------


def spans(*ranges: tuple[int, int]) -> list[Span]:
    return [Span("PERSON", start, end) for start, end in ranges]


@pytest.mark.parametrize(
    ("gold", "predicted", "overlap", "exact"),
    [
        (spans((0, 5)), spans((0, 5)), 1, 1),
        (spans((0, 5)), spans((3, 9)), 1, 0),
        (spans((0, 5)), spans((5, 9)), 0, 0),  # adjacent, end is exclusive
        (spans((0, 5)), spans((0, 2), (3, 5)), 1, 0),  # one gold span matches one prediction only
        (spans((0, 5), (6, 10)), spans((0, 10)), 1, 0),  # one prediction matches one gold span only
        (spans((0, 4), (4, 8)), spans((3, 8), (0, 3)), 2, 0),  # larger overlaps are matched first
        (spans((0, 5), (0, 5)), spans((0, 5)), 1, 1),
        ([], spans((0, 5)), 0, 0),
    ],
)
def test_span_matching(gold: list[Span], predicted: list[Span], overlap: int, exact: int) -> None:
    assert count_overlap_matches(gold, predicted) == overlap
    assert count_exact_matches(gold, predicted) == exact


# -- PII scoring on a hand-made data set -------------------------------------------------------

# Texts are made up for these tests. Offsets: "Call Ann Lee at 555-0100" has PERSON 5:12, PHONE 16:24.
PII_RECORDS = [
    # Annotated for every type.
    {
        "text": "Call Ann Lee at 555-0100",
        "entities": [
            {"type": "PERSON", "start": 5, "end": 12, "value": "Ann Lee"},
            {"type": "PHONE_NUMBER", "start": 16, "end": 24, "value": "555-0100"},
        ],
        "category": "synthetic_sentence",
    },
    # Only IP_ADDRESS is annotated; a PERSON prediction here is neither right nor wrong.
    {
        "text": "Bob's host is 10.1.2.3",
        "entities": [{"type": "IP_ADDRESS", "start": 14, "end": 22, "value": "10.1.2.3"}],
        "labelled_types": ["IP_ADDRESS"],
        "category": "recognizer_test_positive",
    },
    # Not a valid card, and not evidence about other types.
    {
        "text": "Order 4111 1111 1111 1112 from Eve",
        "entities": [],
        "labelled_types": ["CREDIT_CARD"],
        "lookalike_of": "CREDIT_CARD",
        "category": "lookalike_negative",
    },
    # Annotated for every type, no PII.
    {"text": "The weather is fine", "entities": [], "category": "negative_no_pii"},
]

PREDICTIONS = {
    "Call Ann Lee at 555-0100": [
        Finding("pii", "PERSON", 5, 8, 0.9),  # overlaps "Ann Lee" but not exactly
        Finding("pii", "PHONE_NUMBER", 16, 24, 0.9),
        Finding("pii", "PHONE_NUMBER", 0, 4, 0.3),  # below the threshold
        Finding("secrets", "PHONE_NUMBER", 0, 4, 1.0),  # not a PII finding
    ],
    "Bob's host is 10.1.2.3": [
        Finding("pii", "PERSON", 0, 3, 0.9),  # type not labelled on this row: ignored
        Finding("pii", "IP_ADDRESS", 14, 22, 1.0),
    ],
    "Order 4111 1111 1111 1112 from Eve": [
        Finding("pii", "CREDIT_CARD", 6, 25, 1.0),  # false positive on the look-alike
        Finding("pii", "PERSON", 31, 34, 0.9),  # type not labelled on this row: ignored
    ],
    "The weather is fine": [
        Finding("pii", "URL", 4, 11, 0.9),  # a type the data never labels
        Finding("pii", "PERSON", 15, 19, 0.9),  # false positive
    ],
}


def predict(text: str) -> list[Finding]:
    return PREDICTIONS[text]


def write_jsonl(path: Path, records: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def pii_rows(tmp_path: Path) -> list[PiiRow]:
    return load_pii_rows(write_jsonl(tmp_path / "pii.jsonl", PII_RECORDS))


PRODUCIBLE = frozenset({"PERSON", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "URL"})


@pytest.mark.parametrize(
    ("entity_type", "tp", "fp", "fn"),
    [
        ("PERSON", 1, 1, 0),
        ("PHONE_NUMBER", 1, 0, 0),
        ("IP_ADDRESS", 1, 0, 0),
        ("CREDIT_CARD", 0, 1, 0),
        ("EMAIL_ADDRESS", 0, 0, 0),
    ],
)
def test_pii_overlap_counts(pii_rows: list[PiiRow], entity_type: str, tp: int, fp: int, fn: int) -> None:
    scores = score_pii("test", pii_rows, predict, PRODUCIBLE, threshold=0.5)

    counts = scores.by_type[entity_type]

    assert (counts.tp, counts.fp, counts.fn) == (tp, fp, fn)


@pytest.mark.parametrize(
    ("entity_type", "tp", "fp", "fn"),
    [
        ("PERSON", 0, 2, 1),
        ("PHONE_NUMBER", 1, 0, 0),
    ],
)
def test_pii_exact_counts(pii_rows: list[PiiRow], entity_type: str, tp: int, fp: int, fn: int) -> None:
    scores = score_pii("test", pii_rows, predict, PRODUCIBLE, threshold=0.5)

    counts = scores.exact_by_type[entity_type]

    assert (counts.tp, counts.fp, counts.fn) == (tp, fp, fn)


def test_pii_unlabelled_type_listed_apart(pii_rows: list[PiiRow]) -> None:
    scores = score_pii("test", pii_rows, predict, PRODUCIBLE, threshold=0.5)

    assert scores.unscored_predictions == {"URL": 1}
    assert "URL" not in scores.by_type


def test_pii_micro_totals(pii_rows: list[PiiRow]) -> None:
    scores = score_pii("test", pii_rows, predict, PRODUCIBLE, threshold=0.5)

    common = scores.total(COMMON_PII_TYPES)
    everything = scores.total(scores.scopes()["all labelled types"])

    # Common six: PHONE and IP right, one card false positive.
    assert (common.tp, common.fp, common.fn) == (2, 1, 0)
    # All labelled types add PERSON: one right, one false positive.
    assert (everything.tp, everything.fp, everything.fn) == (3, 2, 0)
    assert everything.f1 == pytest.approx(2 * 0.6 * 1.0 / 1.6)


def test_pii_unproduced_type_kept_in_totals(pii_rows: list[PiiRow]) -> None:
    scores = score_pii("test", pii_rows, predict, frozenset({"PERSON", "IP_ADDRESS", "CREDIT_CARD"}), threshold=0.5)
    markdown = render_markdown(EvaluationReport(Path("data"), 4, 0, 0.5, 0.8, pii=[scores]))

    assert "PHONE_NUMBER" not in scores.scopes()["types the system produces"]
    assert "PHONE_NUMBER" in scores.scopes()["all labelled types"]
    assert "PHONE_NUMBER" in scores.scopes()["common six"]
    assert "| PHONE_NUMBER (not produced) | 1 |" in markdown


def test_pii_threshold_applies(pii_rows: list[PiiRow]) -> None:
    scores = score_pii("test", pii_rows, predict, PRODUCIBLE, threshold=0.2)

    counts = scores.by_type["PHONE_NUMBER"]

    # The 0.3 prediction now counts and matches no gold span.
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)


def test_pii_lookalike_scores_its_type_only(tmp_path: Path) -> None:
    record = {"text": "ID 123-45-6789 for Eve", "entities": [], "lookalike_of": "US_SSN"}
    rows = load_pii_rows(write_jsonl(tmp_path / "pii.jsonl", [record]))
    findings = [Finding("pii", "US_SSN", 3, 14, 0.9), Finding("pii", "PERSON", 19, 22, 0.9)]

    scores = score_pii("test", rows, lambda text: findings, frozenset({"US_SSN", "PERSON"}), threshold=0.5)

    assert scores.by_type["US_SSN"].fp == 1
    assert "PERSON" not in scores.by_type


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "pii.jsonl:1: not valid JSON"),
        ('{"text": "ab", "entities": [{"type": "PERSON", "start": 1, "end": 5}]}', "outside the text"),
        ('{"entities": []}', "invalid PII row"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_pii_malformed_row_rejected(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pii.jsonl"
    path.write_text(line + "\n", encoding="utf-8")

    with pytest.raises(EvaluationDataError, match=message):
        load_pii_rows(path)


# -- injection scoring ------------------------------------------------------------------------

INJECTION_ROWS = [
    InjectionRow("override one", True, "direct"),
    InjectionRow("override two", True, "direct"),
    InjectionRow("hidden", True, "indirect"),
    InjectionRow("what is a kill signal", False, "benign_trigger"),
    InjectionRow("hello", False, "benign_trigger"),
]
INJECTION_SCORES = {"override one": 0.9, "override two": 0.85, "hidden": 0.5, "what is a kill signal": 0.95}


def predict_injection(text: str) -> list[Finding]:
    score = INJECTION_SCORES.get(text)
    return [] if score is None else [Finding("injection", "PROMPT_INJECTION", 0, len(text), score)]


@pytest.mark.parametrize(
    ("threshold", "tp", "fp", "fn", "tn"),
    [
        (0.8, 2, 1, 1, 1),
        (0.88, 1, 1, 2, 1),
        (0.4, 3, 1, 0, 1),
        (0.99, 0, 0, 3, 2),
    ],
)
def test_injection_counts_at_threshold(threshold: float, tp: int, fp: int, fn: int, tn: int) -> None:
    overall = score_injection("test", INJECTION_ROWS, predict_injection, threshold).overall

    assert (overall.tp, overall.fp, overall.fn, overall.tn) == (tp, fp, fn, tn)


def test_injection_by_category() -> None:
    by_category = score_injection("test", INJECTION_ROWS, predict_injection, 0.8).by_category

    assert by_category["direct"].recall == pytest.approx(1.0)
    assert by_category["indirect"].recall == pytest.approx(0.0)
    assert by_category["benign_trigger"].false_positive_rate == pytest.approx(0.5)
    assert by_category["benign_trigger"].recall is None


# -- whole runs and reports -------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "eval"
    folder.mkdir()
    write_jsonl(folder / "pii.jsonl", PII_RECORDS)
    injection_records = [
        {"text": row.text, "label": "injection" if row.is_injection else "benign", "category": row.category}
        for row in INJECTION_ROWS
    ]
    write_jsonl(folder / "injection.jsonl", injection_records)
    return folder


def test_evaluate_reports_both_tasks(data_dir: Path) -> None:
    def predict_both(text: str) -> list[Finding]:
        return PREDICTIONS.get(text, []) + predict_injection(text)

    report = evaluate(data_dir, [System("stand-in", predict_both, PRODUCIBLE)], pii_threshold=0.5, injection_threshold=0.8)
    data = report_to_json(report)
    markdown = render_markdown(report)

    assert data["pii"][0]["by_type"]["PERSON"]["overlap"]["tp"] == 1
    assert data["injection"][0]["overall"]["false_positive_rate"] == pytest.approx(0.5)
    assert "| PHONE_NUMBER | 1.000 |" in markdown
    assert "| EMAIL_ADDRESS (not produced) |" in markdown
    assert "not scored): URL 1." in markdown


SECRET_TEXT = "token ghp_x and postgres://app:pw@db"
SECRETS_RECORDS = [
    {"text": SECRET_TEXT, "entities": [{"type": "GITHUB_TOKEN", "start": 6, "end": 11}], "labelled_types": ["GITHUB_TOKEN"]},
    {"text": "a git sha 4b825dc", "entities": [], "labelled_types": ["GITHUB_TOKEN", "JWT"]},
]
SECRET_PREDICTIONS = {
    # The password is of a type the first row does not label, so it is not scored there.
    SECRET_TEXT: [
        Finding("secrets", "GITHUB_TOKEN", 6, 11, 1.0),
        Finding("secrets", "DATABASE_URL_PASSWORD", 30, 32, 0.9),
        Finding("pii", "GITHUB_TOKEN", 6, 11, 1.0),
    ],
    "a git sha 4b825dc": [Finding("secrets", "JWT", 10, 17, 0.9)],
}


def test_evaluate_scores_secrets_file(data_dir: Path) -> None:
    write_jsonl(data_dir / "secrets.jsonl", SECRETS_RECORDS)

    def predict_all(text: str) -> list[Finding]:
        return PREDICTIONS.get(text, []) + SECRET_PREDICTIONS.get(text, [])

    systems = [System("stand-in", predict_all, PRODUCIBLE, secrets_types=frozenset({"GITHUB_TOKEN", "JWT"}))]
    report = evaluate(data_dir, systems, pii_threshold=0.5, injection_threshold=0.8)
    (secrets,) = report_to_json(report)["secrets"]
    markdown = render_markdown(report)

    assert report.secrets_rows == 2
    assert secrets["by_type"]["GITHUB_TOKEN"]["overlap"] == Counts(tp=1).as_dict()
    assert secrets["by_type"]["JWT"]["overlap"] == Counts(fp=1).as_dict()
    assert "common six" not in secrets["totals"]
    assert "## Secrets: stand-in" in markdown
    # Secrets findings never count as PII predictions.
    assert "GITHUB_TOKEN" not in report_to_json(report)["pii"][0]["by_type"]


def test_evaluate_without_secrets_file(data_dir: Path) -> None:
    systems = [System("stand-in", predict, PRODUCIBLE, evaluate_injection=False, secrets_types=frozenset({"JWT"}))]
    report = evaluate(data_dir, systems, pii_threshold=0.5, injection_threshold=0.8)

    assert report.secrets_rows == 0
    assert report.secrets == []
    assert "## Secrets" not in render_markdown(report)


def test_test_tables_export_evaluates(tmp_path: Path) -> None:
    """The detector tests' tables export to a data folder that `extguard eval` reads."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "test_tables.py"
    exported = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "tables")], capture_output=True, text=True, timeout=120
    )
    assert exported.returncode == 0, exported.stderr

    result = run_eval_cli("--data", str(tmp_path / "tables"), "--json")
    report = json.loads(result.stdout)

    assert result.returncode == 0, result.stderr
    assert report["secrets_rows"] > 100
    assert report["secrets"][0]["by_type"]["URL_PASSWORD"]["overlap"]["tp"] > 0
    assert report["injection"][0]["by_category"]["benign"]["tn"] > 0


def test_evaluate_missing_folder_names_option(tmp_path: Path) -> None:
    with pytest.raises(EvaluationDataError, match="not found: .*absent; pass another folder with --data"):
        evaluate(tmp_path / "absent", [], pii_threshold=0.5, injection_threshold=0.8)


def test_default_data_dir_beside_repository() -> None:
    repository = Path(__file__).resolve().parents[1]

    assert default_data_dir() == repository.parent / "shared" / "data" / "eval-dev"


def run_eval_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "extguard.scan.cli_scan", "eval", "--no-presidio", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_eval_cli_json(data_dir: Path) -> None:
    result = run_eval_cli("--data", str(data_dir), "--json")
    report = json.loads(result.stdout)
    inline = report["pii"][0]

    assert result.returncode == 0
    assert inline["system"] == "extguard inline"
    overlap = inline["totals"]["common six"]["overlap"]
    assert overlap["tp"] + overlap["fn"] == sum(
        1 for record in PII_RECORDS for entity in record["entities"] if entity["type"] in COMMON_PII_TYPES
    )
    assert report["injection"][0]["overall"]["tp"] + report["injection"][0]["overall"]["fn"] == 3


def test_eval_cli_markdown(data_dir: Path) -> None:
    result = run_eval_cli("--data", str(data_dir))

    assert result.returncode == 0
    assert result.stdout.startswith("# extguard detector evaluation")
    assert "## Prompt injection" in result.stdout
    assert "Presidio was skipped (--no-presidio)." in result.stdout


def test_eval_cli_unknown_detectors_from(data_dir: Path) -> None:
    result = run_eval_cli("--data", str(data_dir), "--detectors-from", "extguard.scan.detectors:absent")

    assert result.returncode == 2
    assert "--detectors-from 'extguard.scan.detectors:absent': cannot load it" in result.stderr


def test_eval_cli_missing_data(tmp_path: Path) -> None:
    result = run_eval_cli("--data", str(tmp_path / "absent"))

    assert result.returncode == 2
    assert "evaluation data folder not found" in result.stderr


class StandInPresidio:
    """Has the two members of a Presidio model that the combined system uses."""

    entity_types = frozenset({"PERSON", "DATE_TIME", "EMAIL_ADDRESS"})

    def analyze(self, text: str) -> list[Finding]:
        return [
            Finding("pii", "PERSON", 0, 5, 0.85),
            Finding("pii", "DATE_TIME", 6, 10, 0.85),
            Finding("pii", "EMAIL_ADDRESS", 14, 30, 1.0),
        ]


def test_inline_with_presidio_keeps_ner_types() -> None:
    from extguard.scan.cli_scan import _inline_with_presidio
    from extguard.scan.detectors import default_detectors

    detectors = list(default_detectors().values())
    pii_types = default_detectors()["pii"].entity_types
    system = _inline_with_presidio(detectors, pii_types, StandInPresidio())
    text = "Alice 2024 at alice@example.com"
    findings = system.predict(text)

    assert sorted((f.entity_type, text[f.start : f.end]) for f in findings) == [
        ("EMAIL_ADDRESS", "alice@example.com"),
        ("PERSON", "Alice"),
    ]
    assert "PERSON" in system.pii_types
    assert "DATE_TIME" not in system.pii_types
    assert not system.evaluate_injection


def test_location_counts_as_gpe_where_data_labels_gpe(tmp_path: Path) -> None:
    records = [{"text": "from Lisbon", "entities": [{"type": "GPE", "start": 5, "end": 11}]}]
    rows = load_pii_rows(write_jsonl(tmp_path / "pii.jsonl", records))

    def predict_location(text: str) -> list[Finding]:
        return [Finding("pii", "LOCATION", 5, 11, 0.85)]

    scores = score_pii("stand-in", rows, predict_location, frozenset({"LOCATION"}), 0.5)

    assert scores.by_type["GPE"] == Counts(tp=1)
    assert "GPE" in scores.producible
    assert scores.unscored_predictions == {}
