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
    DeepEngines,
    Direction,
    GuardPolicy,
    PresidioEngineSettings,
    PolicyFile,
    Route,
    Rule,
)
from extguard.config.tenancy import DUPLICATE_API_KEY, Price, Tenancy, duplicate_key_message
from extguard.scan.engine import Action, AllowList, ScanRule
from extguard.scan.deep_detector import LLM_GUARD_ENTITY_TYPES, PRESIDIO_ENTITY_TYPES, DeepDetector, is_deep
from extguard.scan.findings import Detector
from extguard.scan.redact import MaskStyle


class PolicyError(Exception):
    """The policy file is missing, not YAML, or invalid; `errors` lists every problem found."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = sorted(errors, key=_line_of)  # in file order; errors without a line first
        listing = "\n".join(f"  {error}" for error in errors)
        super().__init__(f"invalid policy {source}: {len(errors)} error(s)\n{listing}")


def _line_of(error: str) -> int:
    """Return the line number of a located error ("file:LINE: ..."), or 0."""
    parts = error.split(":", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """The effective policy of one route, with its rules bound to detectors per direction."""

    name: str  # "default" or the route's name; shown to clients in block messages
    settings: GuardPolicy
    request_rules: tuple[ScanRule, ...]
    response_rules: tuple[ScanRule, ...]
    stream_rules: tuple[ScanRule, ...]  # response rules for SSE streams: inline detectors only
    uses_deep_engines: bool

    @property
    def uses_pseudonyms(self) -> bool:
        return any(rule.mask_style is MaskStyle.PSEUDONYM for rule in self.request_rules)


class PolicySet:
    """The resolved default policy and routes, matched by path prefix and model."""

    def __init__(
        self,
        default: ResolvedPolicy,
        routes: list[tuple[Route, ResolvedPolicy]],
        hash_key: bytes,
        hash_key_env: str,
        hash_key_is_random: bool,
        tenancy: Tenancy | None = None,
        pricing: dict[str, Price] | None = None,
    ) -> None:
        self.default = default
        self.routes = routes
        self.hash_key = hash_key
        self.hash_key_env = hash_key_env
        self.hash_key_is_random = hash_key_is_random  # the variable was unset, so a random key was drawn
        self.tenancy = tenancy
        self.pricing = pricing or {}

    def deep_detectors(self) -> list[DeepDetector]:
        """Return the deep engines that some enabled rule uses, each once."""
        used: dict[int, DeepDetector] = {}
        for policy in [self.default, *(resolved for _, resolved in self.routes)]:
            for rule in (*policy.request_rules, *policy.response_rules):
                if is_deep(rule.detector):
                    used[id(rule.detector)] = rule.detector  # type: ignore[assignment]
        return list(used.values())

    @property
    def uses_hash_masks(self) -> bool:
        policies = [self.default, *(resolved for _, resolved in self.routes)]
        return any(
            rule.mask_style is MaskStyle.HASH
            for policy in policies
            for rule in (*policy.request_rules, *policy.response_rules)
        )

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
        raise PolicyError(source, [f"{source}: cannot read the file: {error}"]) from None
    return parse_policy(text, detectors, source=source, base_dir=Path(path).parent)


def parse_policy(
    text: str, detectors: dict[str, Detector], *, source: str = "<policy>", base_dir: Path | None = None
) -> PolicySet:
    """Validate and resolve policy YAML text; raise PolicyError listing every error.

    A relative `tenancy.api_keys_file` is read from `base_dir` (the policy file's folder), else
    from the working directory.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise PolicyError(source, [_yaml_error(error, source)]) from None
    data = yaml.safe_load(text) if root is not None else None
    if data is None:
        data = {}

    lines: dict[tuple[Any, ...], int] = {}
    errors: list[str] = []
    if root is not None:
        _index_yaml(root, (), lines, errors, source)
    errors.extend(_merge_api_keys_file(data, base_dir))
    policy_file: PolicyFile | None = None
    try:
        policy_file = PolicyFile.model_validate(data)
    except ValidationError as error:
        # Duplicate API keys are found on the raw document below, also beside other errors.
        items = [item for item in error.errors() if item["type"] != DUPLICATE_API_KEY]
        errors.extend(_format_pydantic_error(item, lines, source) for item in items)
    engines = policy_file.deep_engines if policy_file is not None else DeepEngines()
    detectors = {**detectors, **_deep_detectors(engines)}
    unavailable = {} if engines.llm_guard else {"llm_guard": "needs `deep_engines.llm_guard.model_path` at the top level"}
    errors.extend(_reference_errors(data, detectors, unavailable, lines, source))
    errors.extend(_duplicate_key_errors(data, lines, source))
    if errors or policy_file is None:
        raise PolicyError(source, errors)

    default = _resolve("default", policy_file.default, detectors)
    routes = [(route, _resolve(route.name, _merge_route(policy_file.default, route), detectors)) for route in policy_file.routes]
    env_name = policy_file.hash_key_env
    configured_key = os.environ.get(env_name)
    hash_key = configured_key.encode("utf-8") if configured_key else secrets.token_bytes(32)
    return PolicySet(
        default,
        routes,
        hash_key,
        env_name,
        hash_key_is_random=not configured_key,
        tenancy=policy_file.tenancy,
        pricing=dict(policy_file.pricing),
    )


def _merge_api_keys_file(data: Any, base_dir: Path | None) -> list[str]:
    """Add the API key hashes of `tenancy.api_keys_file` to the tenants of the raw document.

    The file maps tenant names to lists of `{sha256, user}` entries, so key hashes can live in a
    Kubernetes Secret apart from the policy's ConfigMap. Merged before validation, its entries
    are checked like keys written in the policy (hex digests, one tenant per key).
    """
    tenancy = data.get("tenancy") if isinstance(data, dict) else None
    name = tenancy.get("api_keys_file") if isinstance(tenancy, dict) else None
    if not isinstance(name, str) or not name:
        return []  # absent, or a wrong type that validation reports
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        keys = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        return [f"{path}: cannot read tenancy.api_keys_file: {error.strerror or error}"]
    except yaml.YAMLError as error:
        return [_yaml_error(error, str(path))]
    if keys is None:
        return []
    if not isinstance(keys, dict):
        return [f"{path}: tenancy.api_keys_file must map tenant names to lists of {{sha256, user}} entries"]
    tenants = tenancy.get("tenants")
    tenants = tenants if isinstance(tenants, dict) else {}
    errors: list[str] = []
    for tenant, entries in keys.items():
        if not isinstance(tenants.get(tenant), dict):
            errors.append(f"{path}: tenant {tenant!r} is not in tenancy.tenants of the policy")
        elif not isinstance(entries, list):
            errors.append(f"{path}: tenant {tenant!r}: a list of {{sha256, user}} entries is expected")
        else:
            listed = tenants[tenant].setdefault("api_keys", [])
            if isinstance(listed, list):
                listed.extend(entries)
    return errors


def _reference_errors(
    data: Any,
    detectors: dict[str, Detector],
    unavailable: dict[str, str],
    lines: dict[tuple[Any, ...], int],
    source: str,
) -> list[str]:
    """Check what the schema cannot: rule-to-detector references, entity types, route names.

    Runs on the raw document, so these errors are reported together with schema errors.
    """
    errors: list[str] = []
    if not isinstance(data, dict):
        return errors
    default = data.get("default") if isinstance(data.get("default"), dict) else {}
    default_rules = default.get("rules") if isinstance(default.get("rules"), dict) else {}
    inherited: dict[str, str | None] = {}
    for name, rule in default_rules.items():
        location = ("default", "rules", name)
        inherited[name] = _check_rule(name, rule, None, location, detectors, unavailable, lines, source, errors)

    routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    seen_names: set[str] = set()
    for index, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        rules = route.get("rules") if isinstance(route.get("rules"), dict) else {}
        for name, rule in rules.items():
            location = ("routes", index, "rules", name)
            _check_rule(name, rule, inherited.get(name), location, detectors, unavailable, lines, source, errors)
        route_name = route.get("name")
        if isinstance(route_name, str) and route_name in seen_names:
            errors.append(_located(("routes", index, "name"), lines, source, f"duplicate route name {route_name!r}"))
        seen_names.add(route_name)
    return errors


def _duplicate_key_errors(data: Any, lines: dict[tuple[Any, ...], int], source: str) -> list[str]:
    """Return an error for each API key hash listed again, at the line of the repeat."""
    tenancy = data.get("tenancy") if isinstance(data, dict) else None
    tenants = tenancy.get("tenants") if isinstance(tenancy, dict) else None
    if not isinstance(tenants, dict):
        return []
    errors: list[str] = []
    owners: dict[str, str] = {}
    for name, tenant in tenants.items():
        keys = tenant.get("api_keys") if isinstance(tenant, dict) else None
        for index, key in enumerate(keys if isinstance(keys, list) else []):
            digest = key.get("sha256") if isinstance(key, dict) else None
            if not isinstance(digest, str):
                continue
            digest = digest.lower()
            if digest in owners:
                location = ("tenancy", "tenants", name, "api_keys", index, "sha256")
                errors.append(_located(location, lines, source, duplicate_key_message(digest, owners[digest], str(name))))
            owners.setdefault(digest, str(name))
    return errors


def _check_rule(
    name: Any,
    rule: Any,
    inherited_detector: str | None,
    location: tuple[Any, ...],
    detectors: dict[str, Detector],
    unavailable: dict[str, str],
    lines: dict[tuple[Any, ...], int],
    source: str,
    errors: list[str],
) -> str | None:
    """Append the reference errors of one rule; return the name of the detector it uses."""
    fields = rule if isinstance(rule, dict) else {}
    if "detector" in fields:
        # An unknown value here is a schema error, already reported.
        detector_name = fields["detector"] if fields["detector"] in detectors else None
    else:
        detector_name = inherited_detector or (name if name in detectors else None)
        if detector_name is None:
            known = ", ".join(DETECTOR_NAMES)
            message = f"rule {name!r} needs `detector:` ({known}) because its name is not a detector"
            errors.append(_located(location, lines, source, message))
    if detector_name is None:
        return None
    if detector_name in unavailable and fields.get("enabled", True) is not False:
        errors.append(_located(location, lines, source, f"detector {detector_name!r} {unavailable[detector_name]}"))

    entities = fields.get("entities")
    if isinstance(entities, list):
        detector = detectors[detector_name]
        unknown = sorted(str(entity) for entity in entities if entity not in detector.entity_types)
        if unknown:
            known = ", ".join(sorted(detector.entity_types))
            message = f"unknown entity type(s) {', '.join(unknown)} for detector {detector_name!r}; known: {known}"
            errors.append(_located((*location, "entities"), lines, source, message))
    return detector_name


def _deep_detectors(engines: DeepEngines) -> dict[str, DeepDetector]:
    """Return the deep engines as detectors; nothing is imported or loaded until `start()`."""
    presidio = engines.presidio or PresidioEngineSettings()

    def build_presidio() -> Any:
        from extguard.scan.deep import PresidioEngine, PresidioSettings

        settings = PresidioSettings(
            spacy_model=presidio.spacy_model,
            all_recognizers=presidio.all_recognizers,
            organizations=presidio.organizations,
        )
        return PresidioEngine(settings, workers=presidio.workers, deadline_ms=presidio.deadline_ms)

    def build_llm_guard() -> Any:
        from extguard.scan.deep import LlmGuardEngine, LlmGuardSettings

        llm_guard = engines.llm_guard
        assert llm_guard is not None  # the loader rejects llm_guard rules without settings
        settings = LlmGuardSettings(model_path=llm_guard.model_path, threshold=llm_guard.threshold)
        return LlmGuardEngine(settings, workers=llm_guard.workers, deadline_ms=llm_guard.deadline_ms)

    return {
        "presidio": DeepDetector("presidio", "pii", PRESIDIO_ENTITY_TYPES, build_presidio),
        "llm_guard": DeepDetector("llm_guard", "injection", LLM_GUARD_ENTITY_TYPES, build_llm_guard),
    }


def _merge_route(default: GuardPolicy, route: Route) -> GuardPolicy:
    fields = {
        name: getattr(route, name)
        for name in ("on_bad_input", "failure_mode", "max_body_bytes", "block_unrecognized_paths", "allow")
        if getattr(route, name) is not None
    }
    rules = dict(default.rules)
    for rule_name, override in route.rules.items():
        changes = override.model_dump(exclude_none=True)
        base = rules.get(rule_name, Rule())
        rules[rule_name] = base.model_copy(update=changes)
    return default.model_copy(update={**fields, "rules": rules})


def _resolve(name: str, policy: GuardPolicy, detectors: dict[str, Detector]) -> ResolvedPolicy:
    """Bind the enabled rules of a validated policy to their detectors, per direction."""
    request_rules: list[ScanRule] = []
    response_rules: list[ScanRule] = []
    allow = AllowList(policy.allow.values, policy.allow.patterns) or None
    for rule_name, rule in policy.rules.items():
        if not rule.enabled:
            continue
        scan_rule = ScanRule(
            allow=allow,
            name=rule_name,
            detector=detectors[rule.detector or rule_name],
            action=rule.action,
            entity_types=frozenset(rule.entities) if rule.entities is not None else None,
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

    stream_rules = tuple(rule for rule in response_rules if not is_deep(rule.detector))
    uses_deep = any(is_deep(rule.detector) for rule in (*request_rules, *response_rules))
    return ResolvedPolicy(name, policy, tuple(request_rules), tuple(response_rules), stream_rules, uses_deep)


def _fields(rule: ScanRule) -> dict[str, Any]:
    return {name: getattr(rule, name) for name in ScanRule.__slots__}


def _index_yaml(
    node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int], errors: list[str], source: str
) -> None:
    """Record the 1-based line of every key path, and report keys that appear twice in a mapping.

    PyYAML keeps the last of two equal keys without a word, which hides a typo'd override.
    """
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            if key in seen:
                errors.append(_located(child, {child: key_node.start_mark.line + 1}, source, "duplicate key"))
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _index_yaml(value_node, child, lines, errors, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_yaml(item, (*path, index), lines, errors, source)


def _yaml_error(error: yaml.YAMLError, source: str) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"{source}: not valid YAML: {problem}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"


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
