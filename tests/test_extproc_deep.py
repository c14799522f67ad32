"""Deep engines through the ext_proc service: Presidio findings masked, failure modes applied."""

from __future__ import annotations

import json

import pytest

from extguard.scan.deep import DeepEngineError, DeepEngineTimeout
from extguard.scan.deep_detector import DeepDetector
from tests.conftest import body_message, request_headers

POLICY = """
deep_engines:
  presidio: {deadline_ms: 20000}
default:
  failure_mode: {mode}
  rules:
    pii: {action: mask, entities: [EMAIL_ADDRESS]}
    names: {detector: presidio, entities: [PERSON], action: mask, direction: request}
"""


def chat(content: str) -> bytes:
    return json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": content}]}).encode()


def test_presidio_person_masked(processor_for) -> None:  # type: ignore[no-untyped-def]
    processor = processor_for(POLICY.replace("{mode}", "closed"))
    prompt = "Please write to John Smith at js@example.com about the invoice."
    replies = processor.exchange([request_headers(), body_message("request_body", chat(prompt))])

    sent = json.loads(replies[1].request_body.response.body_mutation.body)["messages"][0]["content"]
    assert sent == "Please write to <PERSON> at <EMAIL_ADDRESS> about the invoice."


@pytest.mark.parametrize(
    ("mode", "error", "expected_status"),
    [
        ("closed", DeepEngineTimeout("presidio: no answer within 1 ms"), 504),
        ("closed", DeepEngineError("presidio: worker died"), 500),
        ("open", DeepEngineTimeout("presidio: no answer within 1 ms"), None),
    ],
)
def test_deep_failure_follows_failure_mode(processor_for, monkeypatch, mode, error, expected_status) -> None:  # type: ignore[no-untyped-def]
    async def no_start(self) -> None:  # type: ignore[no-untyped-def]
        return None

    async def failing_analyze(self, text: str):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(DeepDetector, "start", no_start)
    monkeypatch.setattr(DeepDetector, "analyze", failing_analyze)
    processor = processor_for(POLICY.replace("{mode}", mode))
    replies = processor.exchange([request_headers(), body_message("request_body", chat("Hi Ann, mail a@example.com"))])

    reason = "timeout" if isinstance(error, DeepEngineTimeout) else "error"
    labels = {"engine": "presidio", "reason": reason, "failure_mode": mode}
    assert processor.metric("extguard_deep_engine_failures_total", labels) == 1
    if expected_status is None:
        sent = json.loads(replies[1].request_body.response.body_mutation.body)["messages"][0]["content"]
        assert sent == "Hi Ann, mail <EMAIL_ADDRESS>"
    else:
        assert replies[1].immediate_response.status.code == expected_status
        assert json.loads(replies[1].immediate_response.body)["error"]["code"] == "extguard_unavailable"
