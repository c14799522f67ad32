"""Policy files: validation with every error located, route merging and selection."""

from __future__ import annotations

import pytest

from extguard.config.loader import PolicyError, load_policy, parse_policy
from extguard.scan.detectors import default_detectors
from extguard.scan.engine import Action, guard_text
from extguard.scan.redact import Masker, MaskStyle

VALID = """
version: 1
default:
  rules:
    pii: {action: mask, entities: [EMAIL_ADDRESS]}
    cards:
      detector: pii
      entities: [CREDIT_CARD]
      action: block
    injection: {action: block, direction: request}
routes:
  - name: anthropic-strict
    match: {path_prefix: /v1/messages}
    rules:
      pii: {action: block}
  - name: mini-models
    match: {models: ["gpt-4o-mini*"]}
    max_body_bytes: 1024
    rules:
      injection: {enabled: false}
"""


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_policy(text, default_detectors(), source="policy.yaml")


def rule_names(rules) -> list[str]:  # type: ignore[no-untyped-def]
    return [rule.name for rule in rules]


def test_default_rules_split_by_direction() -> None:
    policies = parse(VALID)

    assert rule_names(policies.default.request_rules) == ["pii", "cards", "injection"]
    assert rule_names(policies.default.response_rules) == ["pii", "cards"]


def test_route_override_merges_fields() -> None:
    policy = parse(VALID).select("/v1/messages", "claude-x")
    pii = next(rule for rule in policy.request_rules if rule.name == "pii")

    assert policy.name == "anthropic-strict"
    assert pii.action is Action.BLOCK
    assert pii.entity_types == frozenset({"EMAIL_ADDRESS"})


@pytest.mark.parametrize(
    ("path", "model", "expected"),
    [
        ("/v1/chat/completions", "gpt-4o-mini-2024", "mini-models"),
        ("/v1/chat/completions", None, "default"),
        ("/v1/chat/completions", "gpt-4o", "default"),
        ("/v1/messages", "gpt-4o-mini", "anthropic-strict"),
    ],
)
def test_route_selection(path: str, model: str | None, expected: str) -> None:
    assert parse(VALID).select(path, model).name == expected


def test_disabled_rule_dropped_in_route() -> None:
    policy = parse(VALID).select("/v1/chat/completions", "gpt-4o-mini")

    assert "injection" not in rule_names(policy.request_rules)
    assert policy.settings.max_body_bytes == 1024


def test_pseudonyms_in_responses_become_placeholders() -> None:
    policies = parse("default:\n  rules:\n    pii: {mask_style: pseudonym}\n")

    assert policies.default.request_rules[0].mask_style is MaskStyle.PSEUDONYM
    assert policies.default.response_rules[0].mask_style is MaskStyle.PLACEHOLDER
    assert policies.default.uses_pseudonyms


def test_empty_file_is_the_default_policy() -> None:
    policies = parse("")

    assert policies.default.request_rules == ()
    assert policies.routes == []


INVALID = """version: 1
default:
  on_bad_input: ignore
  max_body_bytes: -5
  rules:
    pii: {action: blok, entities: [EMAIL_ADDRESS, SHOE_SIZE]}
    creditcards: {action: mask}
routes:
  - name: a
    match: {path_prefix: v1}
  - name: a
    colour: blue
"""


def test_every_error_reported_with_location() -> None:
    with pytest.raises(PolicyError) as raised:
        parse(INVALID)
    errors = raised.value.errors

    assert any(e.startswith("policy.yaml:3: default.on_bad_input:") for e in errors)
    assert any(e.startswith("policy.yaml:4: default.max_body_bytes:") for e in errors)
    assert any(e.startswith("policy.yaml:6: default.rules.pii.action:") and "'blok'" in e for e in errors)
    assert any(e.startswith("policy.yaml:10: routes[0].match.path_prefix:") for e in errors)
    assert any(e.startswith("policy.yaml:12: routes[1].colour:") for e in errors)
    assert any(e.startswith("policy.yaml:6: default.rules.pii.entities:") and "SHOE_SIZE" in e for e in errors)
    assert any(e.startswith("policy.yaml:7: default.rules.creditcards:") for e in errors)
    assert any(e.startswith("policy.yaml:11: routes[1].name: duplicate route name") for e in errors)
    assert len(errors) == 8


def test_semantic_errors_reported_together() -> None:
    text = """default:
  rules:
    pii: {entities: [EMAIL_ADDRESS, SHOE_SIZE]}
    creditcards: {action: mask}
routes:
  - name: a
  - name: a
"""
    with pytest.raises(PolicyError) as raised:
        parse(text)
    errors = raised.value.errors

    assert any("SHOE_SIZE" in e and e.startswith("policy.yaml:3:") for e in errors)
    assert any("'creditcards' needs `detector:`" in e and e.startswith("policy.yaml:4:") for e in errors)
    assert any("duplicate route name 'a'" in e and e.startswith("policy.yaml:7:") for e in errors)


def test_yaml_syntax_error() -> None:
    with pytest.raises(PolicyError) as raised:
        parse("default: [unclosed")

    assert raised.value.errors == ["policy.yaml:1:19: not valid YAML: expected ',' or ']', but got '<stream end>'"]


def test_schema_and_reference_errors_reported_together() -> None:
    text = """default:
  rules:
    pii: {action: blok, entities: [PHONE_NUMBR]}
    toxicity: {action: block}
"""
    with pytest.raises(PolicyError) as raised:
        parse(text)
    errors = raised.value.errors

    assert any(e.startswith("policy.yaml:3: default.rules.pii.action:") for e in errors)
    assert any(e.startswith("policy.yaml:3: default.rules.pii.entities:") and "PHONE_NUMBR" in e for e in errors)
    assert any(e.startswith("policy.yaml:4: default.rules.toxicity:") for e in errors)
    assert len(errors) == 3


def test_duplicate_key_reported() -> None:
    with pytest.raises(PolicyError) as raised:
        parse("default:\n  rules:\n    pii: {action: mask}\n    pii: {action: block}\n")

    assert raised.value.errors == ["policy.yaml:4: default.rules.pii: duplicate key"]


def test_empty_entity_list_rejected() -> None:
    with pytest.raises(PolicyError) as raised:
        parse("default:\n  rules:\n    pii: {entities: []}\n")

    assert raised.value.errors[0].startswith("policy.yaml:3: default.rules.pii.entities:")


def test_route_rule_inherits_custom_detector() -> None:
    text = """default:
  rules:
    cards: {detector: pii, entities: [CREDIT_CARD]}
routes:
  - name: strict
    rules:
      cards: {action: block, entities: [CREDIT_CARD]}
"""
    rule = parse(text).select("/v1/chat/completions", None).request_rules[0]

    assert rule.detector.name == "pii"
    assert rule.action is Action.BLOCK


def test_allow_list_skips_listed_values() -> None:
    text = """default:
  allow:
    values: [support@example.com]
    patterns: ['.*@test\\.invalid']
  rules:
    pii: {action: mask}
"""
    rules = parse(text).default.request_rules
    result = guard_text("a support@example.com b x@test.invalid c bob@example.com", rules, Masker(b"k"), None)

    assert result.text == "a support@example.com b x@test.invalid c <EMAIL_ADDRESS>"


def test_allow_list_invalid_pattern_reported() -> None:
    with pytest.raises(PolicyError) as raised:
        parse("default:\n  allow:\n    patterns: ['(unclosed']\n")

    assert raised.value.errors[0].startswith("policy.yaml:3: default.allow.patterns:")


def test_rate_limits_take_envoy_units_in_any_case() -> None:
    text = """tenancy:
  tenants:
    acme:
      rate_limits:
        requests: {requests_per_unit: 600, unit: Minute}
        tokens: {requests_per_unit: 100000, unit: hour}
"""
    limits = parse(text).tenancy.tenants["acme"].rate_limits

    assert {key: limit.metadata() for key, limit in limits.items()} == {
        "requests": {"requests_per_unit": 600, "unit": "MINUTE"},
        "tokens": {"requests_per_unit": 100000, "unit": "HOUR"},
    }


@pytest.mark.parametrize(
    "entry, words",
    [
        ("extguard: {requests_per_unit: 1, unit: minute}", "invalid rate limit key 'extguard'"),
        ("{'a b': {requests_per_unit: 1, unit: minute}, 'c!': {requests_per_unit: 1, unit: minute}}", "invalid rate limit key 'a b', 'c!'"),
        ("requests: {requests_per_unit: 1, unit: fortnight}", "unit"),
        ("requests: {requests_per_unit: 4294967296, unit: minute}", "requests_per_unit"),
        ("requests: {requests: 1, unit: minute}", "requests_per_unit"),
    ],
)
def test_invalid_rate_limit_reported(entry: str, words: str) -> None:
    text = f"tenancy:\n  tenants:\n    acme:\n      rate_limits:\n        {entry}\n"
    if entry.startswith("{"):
        text = f"tenancy:\n  tenants:\n    acme:\n      rate_limits: {entry}\n"
    with pytest.raises(PolicyError) as raised:
        parse(text)

    assert any(words in error and "rate_limits" in error for error in raised.value.errors)


def test_duplicate_api_key_reported_with_other_errors() -> None:
    text = f"""tenancy:
  store: {{timeout_ms: -1}}
  tenants:
    acme:
      api_keys: [{{sha256: {"a" * 64}}}]
    globex:
      api_keys: [{{sha256: {"A" * 64}}}]
"""
    with pytest.raises(PolicyError) as raised:
        parse(text)
    errors = raised.value.errors

    assert any(e.startswith("policy.yaml:2: tenancy.store.timeout_ms:") for e in errors)
    assert any(
        e.startswith("policy.yaml:7: tenancy.tenants.globex.api_keys[0].sha256:") and "tenants 'acme' and 'globex'" in e for e in errors
    )
    assert len(errors) == 2


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://app:s3cret@cache.internal:6380/2", "rediss://app:***@cache.internal:6380/2"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_store_url_shown_without_password(url: str, shown: str) -> None:
    from extguard.config.tenancy import StoreSettings

    assert StoreSettings(url=url).display_url == shown


def test_api_keys_file_adds_keys_to_tenants(tmp_path) -> None:  # type: ignore[no-untyped-def]
    digest = "b" * 64
    (tmp_path / "keys.yaml").write_text(f"acme:\n  - {{sha256: {digest}, user: ci-bot}}\n", encoding="utf-8")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"tenancy:\n  api_keys_file: keys.yaml\n  tenants:\n    acme:\n      api_keys: [{{sha256: {'a' * 64}}}]\n    globex: {{}}\n",
        encoding="utf-8",
    )

    policies = load_policy(policy, default_detectors())

    tenants = policies.tenancy.tenants
    assert [(key.sha256, key.user) for key in tenants["acme"].api_keys] == [("a" * 64, None), (digest, "ci-bot")]
    assert tenants["globex"].api_keys == []


def test_api_keys_file_errors_listed_together(tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"acme: [{{sha256: not-hex}}]\nnobody: [{{sha256: {'c' * 64}}}]\nglobex: [{{sha256: {'A' * 64}}}]\n", encoding="utf-8")
    text = f"tenancy:\n  api_keys_file: {keys}\n  tenants:\n    acme:\n      api_keys: [{{sha256: {'a' * 64}}}]\n    globex: {{}}\n"
    with pytest.raises(PolicyError) as raised:
        parse(text)
    errors = raised.value.errors

    assert any(error == f"{keys}: tenant 'nobody' is not in tenancy.tenants of the policy" for error in errors)
    assert any("tenancy.tenants.acme.api_keys[1].sha256" in error and "64 hex digits" in error for error in errors)
    assert any("tenants 'acme' and 'globex'" in error for error in errors)
    assert len(errors) == 3


def test_api_keys_file_missing_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as raised:
        parse(f"tenancy:\n  api_keys_file: {missing}\n  tenants:\n    acme: {{}}\n")

    assert raised.value.errors == [f"{missing}: cannot read tenancy.api_keys_file: No such file or directory"]
