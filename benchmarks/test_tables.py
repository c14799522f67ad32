"""Write the detector tests' tables as an evaluation data folder, for `extguard eval --data`.

The tables of positives, negatives and near misses in `tests/test_scan_pii.py`,
`tests/test_scan_secrets.py` and `tests/test_scan_injection.py` become:

- `pii.jsonl`: each positive with its expected values as spans, annotated for its one type
  (`labelled_types`); each negative as a look-alike of its type.
- `secrets.jsonl`: each found secret as a span, annotated for its type. Each near miss has no
  span and is annotated for every secrets type, so any secrets finding on it is a false positive.
- `injection.jsonl`: obfuscated, encoded and multilingual attacks and adversarial suffixes as
  injections; benign text, near misses, benign encodings, code and math as benign.

Run from the repository root:

    .venv/bin/python benchmarks/test_tables.py --out /tmp/extguard-tables
    .venv/bin/extguard eval --data /tmp/extguard-tables
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import test_scan_injection  # noqa: E402
import test_scan_pii  # noqa: E402
import test_scan_secrets  # noqa: E402

from extguard.scan.secrets import ENTITY_TYPES as SECRET_TYPES  # noqa: E402


def _values(param: Any) -> Sequence[Any]:
    """Return the values of a `pytest.param` or a plain tuple."""
    return param.values if hasattr(param, "values") else param


def _spans(text: str, entity_type: str, values: Iterable[str]) -> list[dict[str, Any]]:
    """Return a span for each value, found left to right in `text`."""
    spans = []
    position = 0
    for value in values:
        start = text.find(value, position)
        if start < 0:
            raise ValueError(f"{value!r} is not in the test text {text!r}")
        spans.append({"type": entity_type, "start": start, "end": start + len(value), "value": value})
        position = start + len(value)
    return spans


def pii_rows() -> list[dict[str, Any]]:
    rows = []
    for param in test_scan_pii.POSITIVES:
        text, entity_type, values = _values(param)
        rows.append(
            {"text": text, "entities": _spans(text, entity_type, values), "labelled_types": [entity_type], "category": "positive"}
        )
    for param in test_scan_pii.NEGATIVES:
        text, entity_type = _values(param)
        rows.append(
            {"text": text, "entities": [], "labelled_types": [entity_type], "lookalike_of": entity_type, "category": "near_miss"}
        )
    return rows


def secrets_rows() -> list[dict[str, Any]]:
    rows = []
    for param in test_scan_secrets.FOUND:
        text, entity_type, value = _values(param)
        rows.append(
            {"text": text, "entities": _spans(text, entity_type, [value]), "labelled_types": [entity_type], "category": "positive"}
        )
    for param in test_scan_secrets.NOT_FOUND:
        (text,) = _values(param)
        rows.append({"text": text, "entities": [], "labelled_types": sorted(SECRET_TYPES), "category": "near_miss"})
    return rows


def injection_rows() -> list[dict[str, Any]]:
    module = test_scan_injection
    injections = {
        "obfuscated_override": [text for text, _ in module.OBFUSCATED_OVERRIDES],
        "encoded_override": [module.ENCODED_TEMPLATE.format(encoded) for encoded, _ in module.ENCODED_OVERRIDES],
        "multilingual": [text for text, _ in module.MULTILINGUAL_SIGNALS],
        "adversarial_suffix": list(module.SUFFIX_ATTACKS),
    }
    benign = {
        "benign": list(module.BENIGN),
        "benign_near_miss": list(module.NEAR_MISSES),
        "benign_encoded": list(module.ENCODED_BENIGN),
        "benign_code_and_math": list(module.CODE_AND_MATH),
    }
    rows = []
    for label, tables in (("injection", injections), ("benign", benign)):
        for category, texts in tables.items():
            rows.extend({"text": text, "label": label, "category": category} for text in texts)
    return rows


def _write(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write pii.jsonl, secrets.jsonl and injection.jsonl into")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pii", pii_rows()), ("secrets", secrets_rows()), ("injection", injection_rows())):
        print(f"{args.out / (name + '.jsonl')}: {_write(args.out / (name + '.jsonl'), rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
