"""Load a policy file, report all its errors at once, and resolve it into per-route rule sets."""

from __future__ import annotations

import fnmatch
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extguard.config.policy import (
    DETECTOR_NAMES,
    Direction,
    GuardPolicy,
    PolicyFile,
    Route,
    Rule,
)
from extguard.scan.engine import Action, ScanRule
from extguard.scan.findings import Detector
from extguard.scan.redact import MaskStyle


class PolicyError(Exception):
    """The policy file is missing, not YAML, or invalid; `errors` lists every problem found."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        listing = "\n".join(f"  {error}" for error in errors)
        super().__init__(f"invalid policy {source}: {len(errors)} error(s)\n{listing}")


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """The effective policy of one route, with its rules bound to detectors per direction."""

    name: str  # "default" or the route's name; shown to clients in block messages
    settings: GuardPolicy
    request_rules: tuple[ScanRule, ...]
    response_rules: tuple[ScanRule, ...]

    @property
    def uses_pseudonyms(self) -> bool:
        return any(rule.mask_style is MaskStyle.PSEUDONYM for rule in self.request_rules)


class PolicySet:
    """The resolved default policy and routes, matched by path prefix and model."""

    def __init__(self, default: ResolvedPolicy, routes: list[tuple[Route, ResolvedPolicy]], hash_key: bytes):
        self.default = default
        self.routes = routes
        self.hash_key = hash_key

    def select(self, path: str, model: str | None) -> ResolvedPolicy:
        """Return the policy of the first route matching `path` and `model`, else the default.

        A route that lists models matches only once the model is known (from the request body).
        """
        for route, resolved in self.routes:
            if not path.startswith(route.match.path_prefix):
                continue
            patterns = route.match.models
            if patterns is None:
                return resolved
            if model is not None and any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns):
                return resolved
        return self.default


def load_policy(path: str | Path, detectors: dict[str, Detector]) -> PolicySet:
    """Read, validate and resolve the policy file at `path`; raise PolicyError listing every error."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(source, [f"cannot read the file: {error}"]) from None
    return parse_policy(text, detectors, source=source)


def parse_policy(text: str, detectors: dict[str, Detector], *, source: str = "<policy>") -> PolicySet:
    """Validate and resolve policy YAML text; raise PolicyError listing every error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError(source, [f"not valid YAML: {error}"]) from None

    if data is None:
        data = {}
    lines = _line_numbers(root) if root is not None else {}
    try:
        policy_file = PolicyFile.model_validate(data)
    except ValidationError as error:
        raise PolicyError(source, [_format_pydantic_error(item, lines, source) for item in error.errors()]) from None

    errors: list[str] = []
    default = _resolve("default", policy_file.default, detectors, ("default",), lines, source, errors)
    routes: list[tuple[Route, ResolvedPolicy]] = []
    for index, route in enumerate(policy_file.routes):
        merged = _merge_route(policy_file.default, route)
        resolved = _resolve(route.name, merged, detectors, ("routes", index), lines, source, errors)
        routes.append((route, resolved))
    names = [route.name for route in policy_file.routes]
    for index, name in enumerate(names):
        if name in names[:index]:
            errors.append(_located(("routes", index, "name"), lines, source, f"duplicate route name {name!r}"))
    if errors:
        raise PolicyError(source, errors)

    return PolicySet(default, routes, _hash_key(policy_file.hash_key_env))


def _merge_route(default: GuardPolicy, route: Route) -> GuardPolicy:
    fields = {
        name: getattr(route, name)
        for name in ("on_bad_input", "failure_mode", "max_body_bytes", "block_unrecognized_paths")
        if getattr(route, name) is not None
    }
    rules = dict(default.rules)
    for rule_name, override in route.rules.items():
        changes = override.model_dump(exclude_none=True)
        base = rules.get(rule_name, Rule())
        rules[rule_name] = base.model_copy(update=changes)
    return default.model_copy(update={**fields, "rules": rules})


def _resolve(
    name: str,
    policy: GuardPolicy,
    detectors: dict[str, Detector],
    location: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    source: str,
    errors: list[str],
) -> ResolvedPolicy:
    request_rules: list[ScanRule] = []
    response_rules: list[ScanRule] = []
    for rule_name, rule in policy.rules.items():
        rule_location = (*location, "rules", rule_name)
        detector_name = rule.detector or rule_name
        detector = detectors.get(detector_name)
        if detector is None:
            known = ", ".join(DETECTOR_NAMES)
            message = f"rule {rule_name!r} needs `detector:` ({known}) because its name is not a detector"
            errors.append(_located(rule_location, lines, source, message))
            continue
        entity_types = None
        if rule.entities is not None:
            entity_types = frozenset(rule.entities)
            unknown = sorted(entity_types - detector.entity_types)
            if unknown:
                known = ", ".join(sorted(detector.entity_types))
                message = f"unknown entity type(s) {', '.join(unknown)} for detector {detector_name!r}; known: {known}"
                errors.append(_located((*rule_location, "entities"), lines, source, message))
        if not rule.enabled:
            continue

        scan_rule = ScanRule(
            name=rule_name,
            detector=detector,
            action=rule.action,
            entity_types=entity_types,
            score_threshold=rule.score_threshold,
            mask_style=rule.mask_style,
        )
        if rule.direction.covers(Direction.REQUEST):
            request_rules.append(scan_rule)
        if rule.direction.covers(Direction.RESPONSE):
            if rule.mask_style is MaskStyle.PSEUDONYM and rule.action is Action.MASK:
                # A pseudonym minted in a response could never be restored; mask it as a placeholder.
                scan_rule = ScanRule(**{**_fields(scan_rule), "mask_style": MaskStyle.PLACEHOLDER})
            response_rules.append(scan_rule)

    return ResolvedPolicy(name, policy, tuple(request_rules), tuple(response_rules))


def _fields(rule: ScanRule) -> dict[str, Any]:
    return {name: getattr(rule, name) for name in ScanRule.__slots__}


def _hash_key(env_name: str) -> bytes:
    value = os.environ.get(env_name)
    if value:
        return value.encode("utf-8")
    return secrets.token_bytes(32)


def _line_numbers(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path of the YAML document to the 1-based line where its value starts."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            lines.update(_line_numbers(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_numbers(item, (*path, index)))
    return lines


def _located(location: tuple[Any, ...], lines: dict[tuple[Any, ...], int], source: str, message: str) -> str:
    dotted = ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in location)
    dotted = dotted.replace(".[", "[")
    line = None
    for end in range(len(location), -1, -1):
        line = lines.get(tuple(location[:end]))
        if line is not None:
            break
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {dotted or '<top>'}: {message}"


def _format_pydantic_error(item: Any, lines: dict[tuple[Any, ...], int], source: str) -> str:
    location = tuple(part for part in item["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    message = item["msg"]
    if item["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in item:
        message = f"{message} (got {item['input']!r})"
    return _located(location, lines, source, message)
