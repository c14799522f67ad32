"""The `extguard scan` and `extguard eval` commands.

`scan` reads JSON lines with a `text` field and writes one JSON line per input line:
`{"findings": [{"detector", "type", "start", "end", "score"}, ...], "injection": bool}`, with
offsets in characters of the input text, or `{"error": "..."}` for a line it cannot read. It
exits 1 when any line had an error, and 2 when the policy or the input file cannot be used.

`eval` scores the inline detectors, and Presidio when it is installed, on labelled data (see
`extguard.evaluation`) and prints a Markdown or JSON report.

`cli.py` registers both through `add_scan_parser`/`run_scan` and `add_eval_parser`/`run_eval`.
`python -m extguard.scan.cli_scan scan|eval ...` runs them without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from extguard.config.policy import Direction
from extguard.scan.deep import DeepEngine, DeepEngineError, LlmGuardEngine, LlmGuardSettings, PresidioEngine
from extguard.scan.engine import Action, ScanRule
from extguard.scan.findings import Detector, Finding

INLINE_DETECTORS = ("pii", "secrets", "injection")
DEEP_ENGINES = ("presidio", "llm-guard")
_DEFAULT_PII_THRESHOLD = 0.5  # the policy's default `score_threshold`
# The injection detector's combined score; on the development set no benign row scored above 0.2.
_DEFAULT_INJECTION_THRESHOLD = 0.5


class UsageError(Exception):
    """The options cannot work together, or a file they name cannot be used."""


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


# -- scan: options ----------------------------------------------------------------------------


def add_scan_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `scan` subcommand to `commands` and return its parser."""
    parser = commands.add_parser(
        "scan",
        help="scan JSON lines with a `text` field and print the findings of each as a JSON line",
        description=(
            "Read JSON lines with a `text` field and write one JSON line per input: "
            '{"findings": [{"detector", "type", "start", "end", "score"}], "injection": true|false}. '
            "Offsets are in characters. A line that is not a JSON object with a string `text` gets "
            '{"error": ...} and the exit status is 1 at the end.'
        ),
    )
    parser.add_argument("input", nargs="?", default="-", metavar="FILE|-", help="input file; - or none reads stdin")
    _add_rule_options(parser)
    _add_deep_options(parser)
    return parser


def _add_rule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        metavar="POLICY.yaml",
        help="apply the default policy's enabled rules: detectors, entity filters and score thresholds",
    )
    parser.add_argument(
        "--direction",
        choices=[direction.value for direction in Direction],
        help=f"with --policy: use the rules of this direction (default {Direction.BOTH.value})",
    )

    parser.add_argument(
        "--detectors",
        type=_comma_list,
        metavar="NAMES",
        help=f"without --policy: comma-separated detectors from {','.join(INLINE_DETECTORS)} (default: all)",
    )
    parser.add_argument(
        "--pii-threshold",
        type=_fraction,
        metavar="SCORE",
        help=f"without --policy: minimum score of a PII finding, 0 to 1 (default {_DEFAULT_PII_THRESHOLD})",
    )
    parser.add_argument(
        "--injection-threshold",
        type=_fraction,
        metavar="SCORE",
        help=f"without --policy: minimum score of an injection finding, 0 to 1 (default {_DEFAULT_INJECTION_THRESHOLD})",
    )


def _add_deep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deep",
        type=_comma_list,
        default=[],
        metavar="ENGINES",
        help=(
            f"also run these deep engines, comma-separated: {', '.join(DEEP_ENGINES)}. Their findings join "
            "the pii or injection rule and pass its entity filter and threshold; a policy rule with "
            "`detector: presidio` chooses Presidio's entities itself"
        ),
    )
    parser.add_argument(
        "--llm-guard-model", metavar="DIR", help="local folder of the classifier that --deep llm-guard loads"
    )
    parser.add_argument(
        "--deep-deadline-ms",
        type=_positive,
        default=10_000.0,
        metavar="MS",
        help="per-line deadline of each deep engine in milliseconds (default %(default)g)",
    )


# -- scan: rules ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanSetup:
    """The rules a scan applies, and the `--deep` engines whose findings join the rules of their family.

    A policy rule may itself use a deep engine as its detector. Such a detector has `is_deep`
    set, a `family` and async `start`/`analyze`, so it is awaited instead of scanned.
    """

    rules: tuple[ScanRule, ...]
    engines: tuple[DeepEngine, ...]

    def deep_detectors(self) -> list[Any]:
        """Return the rule detectors that are deep engines, each once."""
        detectors = {id(rule.detector): rule.detector for rule in self.rules if _is_deep(rule.detector)}
        return list(detectors.values())

    async def start(self) -> None:
        for engine in [*self.engines, *self.deep_detectors()]:
            await engine.start()

    def close(self) -> None:
        for engine in [*self.engines, *self.deep_detectors()]:
            engine.close()


def _is_deep(detector: Detector) -> bool:
    return getattr(detector, "is_deep", False)


def _family(detector: Detector) -> str:
    """Return the `detector` field of the findings of `detector`: a deep engine's family, else its name."""
    return getattr(detector, "family", detector.name)


def build_scan_setup(args: argparse.Namespace, detectors: dict[str, Detector]) -> ScanSetup:
    """Build the rules from the options or the policy; raise UsageError or PolicyError."""
    rules = _policy_rules(args, detectors) if args.policy else _option_rules(args, detectors)
    families = {_family(rule.detector) for rule in rules}
    engines = tuple(_deep_engine(name, args, rules, families) for name in dict.fromkeys(args.deep))
    return ScanSetup(tuple(rules), engines)


def _policy_rules(args: argparse.Namespace, detectors: dict[str, Detector]) -> list[ScanRule]:
    from extguard.config.loader import load_policy

    for option in ("detectors", "pii_threshold", "injection_threshold"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} applies only without --policy; set it in the policy's rules instead")

    default = load_policy(args.policy, detectors).default
    direction = Direction(args.direction or Direction.BOTH.value)
    rules: dict[str, ScanRule] = {}
    if direction.covers(Direction.REQUEST):
        rules.update((rule.name, rule) for rule in default.request_rules)
    if direction.covers(Direction.RESPONSE):
        for rule in default.response_rules:
            rules.setdefault(rule.name, rule)
    return list(rules.values())


def _option_rules(args: argparse.Namespace, detectors: dict[str, Detector]) -> list[ScanRule]:
    if getattr(args, "direction", None) is not None:
        raise UsageError("--direction applies only with --policy, whose rules have a direction")
    names = args.detectors if args.detectors is not None else list(detectors)
    unknown = [name for name in names if name not in detectors]
    if unknown or not names:
        raise UsageError(f"--detectors: unknown or no detector names {unknown}; choose from {', '.join(detectors)}")

    thresholds = {
        "pii": _DEFAULT_PII_THRESHOLD if args.pii_threshold is None else args.pii_threshold,
        "injection": _DEFAULT_INJECTION_THRESHOLD if args.injection_threshold is None else args.injection_threshold,
    }
    return [
        ScanRule(name=name, detector=detectors[name], action=Action.LOG, score_threshold=thresholds.get(name, 0.0))
        for name in dict.fromkeys(names)
    ]


def _deep_engine(name: str, args: argparse.Namespace, rules: Sequence[ScanRule], families: set[str]) -> DeepEngine:
    if name not in DEEP_ENGINES:
        raise UsageError(f"--deep: unknown engine {name!r}; choose from {', '.join(DEEP_ENGINES)}")
    try:
        if name == "presidio":
            _require_family("pii", name, families)
            return PresidioEngine(deadline_ms=args.deep_deadline_ms)

        _require_family("injection", name, families)
        if not args.llm_guard_model:
            raise UsageError("--deep llm-guard needs --llm-guard-model DIR, a local model folder")
        threshold = next(rule.score_threshold for rule in rules if _family(rule.detector) == "injection")
        settings = LlmGuardSettings(args.llm_guard_model, threshold=threshold)
        return LlmGuardEngine(settings, deadline_ms=args.deep_deadline_ms)
    except (DeepEngineError, ValueError) as error:
        raise UsageError(f"--deep {name}: {error}") from None


def _require_family(family: str, engine: str, families: set[str]) -> None:
    if family not in families:
        raise UsageError(f"--deep {engine} adds {family} findings, but no {family} rule is enabled")


# -- scan: running ----------------------------------------------------------------------------


def run_scan(args: argparse.Namespace) -> int:
    """Run `extguard scan`; return 0, 1 when some input lines had errors, 2 on a usage error."""
    from extguard.config.loader import PolicyError
    from extguard.scan.detectors import default_detectors

    try:
        setup = build_scan_setup(args, default_detectors())
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    except OSError as error:
        print(f"error: cannot read {args.input}: {error.strerror}", file=sys.stderr)
        return 2

    try:
        errors = asyncio.run(scan_lines(source, sys.stdout, setup))
    except DeepEngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`| head`); point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        setup.close()
    return 1 if errors else 0


async def scan_lines(source: Iterable[bytes], output: TextIO, setup: ScanSetup) -> int:
    """Write one result line to `output` per non-blank line of `source` (UTF-8); return the error count."""
    await setup.start()

    errors = 0
    for line_number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            result = await scan_line(line, setup)
        except (ValueError, DeepEngineError) as error:
            result = {"error": f"line {line_number}: {error}"}
            errors += 1
        output.write(json.dumps(result) + "\n")
        output.flush()
    return errors


async def scan_line(line: bytes, setup: ScanSetup) -> dict[str, Any]:
    """Return the result object of one input line; raise ValueError or DeepEngineError."""
    text = _read_text(line)
    findings_by_detector: dict[int, list[Finding]] = {}
    for rule in setup.rules:
        if id(rule.detector) not in findings_by_detector:
            findings_by_detector[id(rule.detector)] = await _detect(rule.detector, text)

    engine_findings: dict[str, list[Finding]] = {}
    for engine in setup.engines:
        engine_findings.setdefault(engine.detector, []).extend(await engine.analyze(text))

    # A finding that several rules or engines report is kept once, with its highest score.
    best: dict[tuple[str, str, int, int], Finding] = {}
    for rule in setup.rules:
        candidates = findings_by_detector[id(rule.detector)] + engine_findings.get(_family(rule.detector), [])
        for finding in candidates:
            key = (finding.detector, finding.entity_type, finding.start, finding.end)
            if not rule.accepts(finding) or (rule.allow and rule.allow.allows(text[finding.start : finding.end])):
                continue
            if key not in best or best[key].score < finding.score:
                best[key] = finding

    findings = sorted(best.values(), key=lambda f: (f.start, f.end, f.detector, f.entity_type))
    return {
        "findings": [_finding_json(finding) for finding in findings],
        "injection": any(finding.detector == "injection" for finding in findings),
    }


async def _detect(detector: Detector, text: str) -> list[Finding]:
    if _is_deep(detector):
        return await detector.analyze(text)  # type: ignore[attr-defined]
    return detector.scan(text)


def _read_text(line: bytes) -> str:
    try:
        # utf-8-sig drops the byte order mark that some editors write at the start of a file.
        record = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not valid UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with a `text` field")
    if "text" not in record:
        raise ValueError("missing field `text`")
    text = record["text"]
    if not isinstance(text, str):
        raise ValueError(f"field `text` must be a string, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"field `text` is not valid Unicode: a lone surrogate escape at character {error.start}") from None
    return text


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "detector": finding.detector,
        "type": finding.entity_type,
        "start": finding.start,
        "end": finding.end,
        "score": finding.score,
    }


# -- eval -------------------------------------------------------------------------------------


def add_eval_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to `commands` and return its parser."""
    parser = commands.add_parser(
        "eval",
        help="score the detectors, and Presidio when installed, on labelled PII and injection data",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="folder with pii.jsonl and injection.jsonl (default: shared/data/eval-dev beside the repository)",
    )
    parser.add_argument(
        "--pii-threshold",
        type=_fraction,
        default=_DEFAULT_PII_THRESHOLD,
        metavar="SCORE",
        help="minimum score of a PII prediction, 0 to 1 (default %(default)g)",
    )
    parser.add_argument(
        "--injection-threshold",
        type=_fraction,
        default=_DEFAULT_INJECTION_THRESHOLD,
        metavar="SCORE",
        help="minimum injection score that flags a row, 0 to 1 (default %(default)g)",
    )
    parser.add_argument(
        "--detectors-from",
        default="extguard.scan.detectors:default_detectors",
        metavar="MODULE:FUNCTION",
        help="function that returns the inline detectors by name, to compare versions (default %(default)s)",
    )
    parser.add_argument("--no-presidio", action="store_true", help="skip Presidio even when it is installed")
    parser.add_argument(
        "--presidio-all-recognizers",
        action="store_true",
        help="also score Presidio with every predefined pattern recognizer enabled",
    )
    parser.add_argument("--llm-guard-model", metavar="DIR", help="also score llm-guard's injection classifier in DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Run `extguard eval`; return 0, or 2 when the data or an engine cannot be used."""
    from extguard.evaluation import EvaluationDataError, default_data_dir, evaluate, render_markdown, report_to_json

    data_dir = args.data if args.data is not None else default_data_dir()
    try:
        systems, notes = _eval_systems(args)
        report = evaluate(
            data_dir,
            systems,
            pii_threshold=args.pii_threshold,
            injection_threshold=args.injection_threshold,
            notes=notes,
        )
    except (EvaluationDataError, DeepEngineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps(report_to_json(report), indent=2))
    else:
        print(render_markdown(report), end="")
    return 0


def _eval_systems(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """Return the systems to evaluate and notes on what was left out."""
    from extguard.evaluation import System
    from extguard.scan.deep import LlmGuardModel, PresidioModel, PresidioSettings

    detectors = list(_load_detectors(args.detectors_from).values())
    pii_types = frozenset().union(*(d.entity_types for d in detectors if d.name == "pii"))
    secrets_types = frozenset().union(*(d.entity_types for d in detectors if d.name == "secrets"))
    systems = [
        System(
            "extguard inline",
            lambda text: [f for d in detectors for f in d.scan(text)],
            pii_types,
            secrets_types=secrets_types,
        )
    ]
    notes: list[str] = []

    if args.no_presidio:
        notes.append("Presidio was skipped (--no-presidio).")
    elif importlib.util.find_spec("presidio_analyzer") is None:
        notes.append("Presidio is not installed (extra `presidio`), so it was not scored.")
    else:
        configurations = [("presidio", PresidioSettings())]
        if args.presidio_all_recognizers:
            configurations.append(("presidio all recognizers", PresidioSettings(all_recognizers=True)))
        models = [(name, PresidioModel(settings)) for name, settings in configurations]
        for name, model in models:
            systems.append(System(name, model.analyze, model.entity_types, evaluate_injection=False))
        systems.append(_inline_with_presidio(detectors, pii_types, models[0][1]))

    if args.llm_guard_model:
        model = LlmGuardModel(LlmGuardSettings(args.llm_guard_model, threshold=args.injection_threshold))
        systems.append(System("llm-guard", model.analyze, frozenset(), evaluate_pii=False))
    return systems, notes


# The named-entity types a policy would add with a Presidio rule, because patterns cannot find them.
_PRESIDIO_NER_TYPES = frozenset({"PERSON", "LOCATION", "ORGANIZATION", "NRP"})


def _inline_with_presidio(detectors: list[Detector], pii_types: frozenset[str], presidio: Any) -> Any:
    """Return the system of a policy with an inline PII rule and a Presidio rule for named entities."""
    from extguard.evaluation import System

    ner_types = _PRESIDIO_NER_TYPES & presidio.entity_types

    def predict(text: str) -> list[Finding]:
        inline = [finding for detector in detectors if detector.name == "pii" for finding in detector.scan(text)]
        return inline + [finding for finding in presidio.analyze(text) if finding.entity_type in ner_types]

    name = "extguard inline + Presidio NER"
    return System(name, predict, pii_types | ner_types, evaluate_injection=False)


def _load_detectors(reference: str) -> dict[str, Detector]:
    """Call the function that `reference` ("module:function") names; raise ValueError when it cannot."""
    module_name, _, function_name = reference.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"--detectors-from {reference!r}: cannot load it: {error}") from None
    return function()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scan` or `eval` as `python -m extguard.scan.cli_scan`."""
    parser = argparse.ArgumentParser(prog="extguard", description="Scan texts or evaluate the detectors.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_scan_parser(commands)
    add_eval_parser(commands)
    args = parser.parse_args(argv)
    return run_scan(args) if args.command == "scan" else run_eval(args)


if __name__ == "__main__":
    raise SystemExit(main())
