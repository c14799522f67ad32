"""Budgets end to end: Envoy with ext_authz and ext_proc, extguard, a real redis-server, the SDKs."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from extguard.budget.keeper import BudgetKeeper
from extguard.config.loader import load_policy
from extguard.scan.detectors import default_detectors
from extguard.testing.redis_server import RedisServer
from extguard.testing.stack import Stack

pytestmark = pytest.mark.e2e

ACME_KEY = "sk-acme-e2e-0001"
GLOBEX_KEY = "sk-globex-e2e-0002"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


POLICY = """
version: 1
default:
  rules:
    pii: {{action: mask, entities: [EMAIL_ADDRESS]}}
tenancy:
  time_zone: Europe/Berlin
  store: {{backend: redis, url: '{url}', timeout_ms: 500}}
  tenants:
    acme:
      api_keys: [{{sha256: {acme}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 100000}}]
    globex:
      api_keys: [{{sha256: {globex}}}]
      models: ["gpt-4o*", "claude-*"]
      budgets: [{{window: day, metric: total_tokens, limit: 300}}]
"""


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    work = tmp_path_factory.mktemp("budget-stack")
    with RedisServer() as redis_server:
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(url=redis_server.url, acme=sha(ACME_KEY), globex=sha(GLOBEX_KEY)), encoding="utf-8")
        with Stack(policy=policy, work_dir=work) as stack:
            yield stack, policy


def used(policy: Path, tenant: str) -> dict[str, int]:
    """Return the tenant's used amounts in its current day window, read from Redis."""
    policies = load_policy(policy, default_detectors())
    keeper = BudgetKeeper.from_settings(policies.tenancy, policies.pricing)  # type: ignore[arg-type]

    async def read() -> dict[str, int]:
        counters = [item.counter for item in keeper.counters(tenant, None)]
        (state,) = await keeper.store.status(counters, now_ms=0)
        await keeper.store.close()
        return dict(state.used)

    return asyncio.run(read())


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=20)


def test_usage_committed_equals_reported(budget_stack) -> None:  # type: ignore[no-untyped-def]
    stack, policy = budget_stack
    before = used(policy, "acme")
    oai = client(stack, ACME_KEY)

    answer = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}])
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Count to five"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    streamed_usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key=ACME_KEY, max_retries=0, timeout=20)
    message = claude.messages.create(model="claude-3-haiku", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])

    after = used(policy, "acme")
    expected_input = answer.usage.prompt_tokens + streamed_usage.prompt_tokens + message.usage.input_tokens
    expected_output = answer.usage.completion_tokens + streamed_usage.completion_tokens + message.usage.output_tokens
    assert after["input_tokens"] - before["input_tokens"] == expected_input
    assert after["output_tokens"] - before["output_tokens"] == expected_output
    assert after["total_tokens"] - before["total_tokens"] == expected_input + expected_output


def test_exhausted_budget_raises_rate_limit_error(budget_stack) -> None:  # type: ignore[no-untyped-def]
    stack, _ = budget_stack
    oai = client(stack, GLOBEX_KEY)

    with pytest.raises(openai.RateLimitError) as raised:
        for _ in range(50):
            oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "Tell me a fact"}]
            )

    assert raised.value.status_code == 429
    assert raised.value.body["code"] == "extguard_budget_exhausted"
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 25 * 3600


def test_model_not_allowed_is_403(budget_stack) -> None:  # type: ignore[no-untyped-def]
    stack, _ = budget_stack

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(stack, GLOBEX_KEY).chat.completions.create(model="o1-preview", messages=[{"role": "user", "content": "hi"}])

    assert raised.value.body["code"] == "extguard_model_not_allowed"


def test_unknown_key_is_401_and_spoofed_tenant_ignored(budget_stack) -> None:  # type: ignore[no-untyped-def]
    stack, policy = budget_stack
    globex_before = used(policy, "globex")

    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-nobody").chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    spoofing = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=ACME_KEY, max_retries=0, timeout=20,
        default_headers={"x-extguard-tenant": "globex"},
    )  # fmt: skip
    spoofing.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    assert used(policy, "globex") == globex_before


def test_mixed_requests_meter_exactly(budget_stack) -> None:  # type: ignore[no-untyped-def]
    """1,000 concurrent JSON, streamed (with and without usage) and failing requests: the committed
    usage equals what the mock upstream reported or would have billed, and nothing stays reserved."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    stack, policy = budget_stack
    before = used(policy, "acme")
    oai = client(stack, ACME_KEY)

    def run(index: int) -> tuple[int, int]:
        prompt = f"Request number {index}: tell me something about the number {index * 7}."
        reply = "word " * (index % 23 + 1)
        kind = index % 4
        if kind == 0:
            answer = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": prompt}],
                extra_body={"mock": {"reply": reply}},
            )  # fmt: skip
            return answer.usage.prompt_tokens, answer.usage.completion_tokens
        if kind == 1:
            stream = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": prompt}], stream=True,
                stream_options={"include_usage": True}, extra_body={"mock": {"reply": reply, "chunk_chars": 3}},
            )  # fmt: skip
            usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
            return usage.prompt_tokens, usage.completion_tokens
        if kind == 2:
            # No usage in the stream: extguard estimates ceil(chars / 4), as the mock counts.
            stream = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": prompt}], stream=True,
                extra_body={"mock": {"reply": reply, "chunk_chars": 5}},
            )  # fmt: skip
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            return math.ceil(len(prompt) / 4), math.ceil(len(text) / 4)
        # An upstream error: providers do not bill it, so nothing is committed.
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": prompt}],
                extra_body={"mock": {"status": 500, "error_message": "upstream failed"}},
            )  # fmt: skip
        return 0, 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(1000)))

    after = used(policy, "acme")
    policies = load_policy(policy, default_detectors())
    keeper = BudgetKeeper.from_settings(policies.tenancy, policies.pricing)  # type: ignore[arg-type]

    async def reserved() -> int:
        counters = [item.counter for item in keeper.counters("acme", None)]
        (state,) = await keeper.store.status(counters, now_ms=0)
        await keeper.store.close()
        return state.reserved["total_tokens"]

    assert after["input_tokens"] - before["input_tokens"] == sum(result[0] for result in results)
    assert after["output_tokens"] - before["output_tokens"] == sum(result[1] for result in results)
    assert asyncio.run(reserved()) == 0


def test_cancelled_stream_commits_what_was_sent(budget_stack) -> None:  # type: ignore[no-untyped-def]
    import math
    import time

    stack, policy = budget_stack
    before = used(policy, "acme")
    prompt = "Tell me a long story about a lighthouse keeper."
    stream = client(stack, ACME_KEY).chat.completions.create(
        model="gpt-4o-mini", max_tokens=500, messages=[{"role": "user", "content": prompt}], stream=True,
        extra_body={"mock": {"reply": "story " * 200, "chunk_chars": 6, "chunk_delay_ms": 100}},
    )  # fmt: skip
    first = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
    stream.close()  # the client goes away after the first chunk of text

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and used(policy, "acme")["input_tokens"] == before["input_tokens"]:
        time.sleep(0.2)
    after = used(policy, "acme")

    assert first.choices
    assert after["input_tokens"] - before["input_tokens"] == math.ceil(len(prompt) / 4)
    # Output is estimated from the text that passed before the reset: at least one chunk, far
    # less than the 300 tokens of the whole reply.
    assert 1 <= after["output_tokens"] - before["output_tokens"] < 300


def test_usage_command_matches_counters(budget_stack) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    stack, policy = budget_stack
    client(stack, ACME_KEY).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    counters = used(policy, "acme")
    command = [sys.executable, "-m", "extguard", "usage", "--config", str(policy), "--tenant", "acme", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    rows = json.loads(result.stdout)
    table = subprocess.run(command[:-2], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert {row["model"] for row in rows} >= {"gpt-4o-mini", "claude-3-haiku"}
    assert sum(row["input_tokens"] for row in rows) == counters["input_tokens"]
    assert sum(row["output_tokens"] for row in rows) == counters["output_tokens"]
    assert table.stdout.splitlines()[0].split()[:4] == ["day", "tenant", "model", "requests"]


def test_usage_command_rejects_unknown_tenant(budget_stack) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    _, policy = budget_stack
    command = [sys.executable, "-m", "extguard", "usage", "--config", str(policy), "--tenant", "initech"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "unknown tenants ['initech']" in result.stderr


OUTAGE_POLICY = """
version: 1
tenancy:
  store: {{backend: redis, url: '{url}', timeout_ms: 200, failure_mode: {mode}}}
  tenants:
    acme:
      api_keys: [{{sha256: {acme}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 100000}}]
"""


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_restart_during_traffic(tmp_path: Path, mode: str) -> None:
    """Redis stops and comes back empty. Open mode lets requests through and replays their usage
    from the spool. Closed mode rejects them with 503, so nothing reaches the provider."""
    import time

    with RedisServer() as redis_server:
        policy = tmp_path / "policy.yaml"
        policy.write_text(OUTAGE_POLICY.format(url=redis_server.url, mode=mode, acme=sha(ACME_KEY)), encoding="utf-8")
        with Stack(policy=policy, work_dir=tmp_path) as stack:
            oai = client(stack, ACME_KEY)
            oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "before"}])

            redis_server.stop()
            during: list[tuple[int, int]] = []
            for index in range(5):
                try:
                    answer = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"during {index}"}])
                    during.append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
                except openai.InternalServerError as error:
                    assert error.status_code == 503
            redis_server.start()  # no persistence: the counters of "before" are gone

            expected = (sum(item[0] for item in during), sum(item[1] for item in during))
            deadline = time.monotonic() + 15
            counted = used(policy, "acme")
            while time.monotonic() < deadline and (counted["input_tokens"], counted["output_tokens"]) != expected:
                time.sleep(0.3)
                counted = used(policy, "acme")
            after = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "after"}])

    if mode == "open":
        assert len(during) == 5
    else:
        assert during == []
    assert (counted["input_tokens"], counted["output_tokens"]) == expected
    assert after.choices[0].message.content
