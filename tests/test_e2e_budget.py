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
from extguard.budget.store import Counter
from extguard.budget.windows import Window
from extguard.config.loader import load_policy
from extguard.scan.detectors import default_detectors
from extguard.testing.redis_server import RedisServer
from extguard.testing.stack import Stack

pytestmark = pytest.mark.e2e

ACME_KEY = "sk-acme-e2e-0001"
GLOBEX_KEY = "sk-globex-e2e-0002"
INITECH_KEY = "sk-initech-e2e-0003"


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
    initech:
      api_keys: [{{sha256: {initech}}}]
      budgets: [{{window: day, metric: total_tokens, limit: 400}}]
"""


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    work = tmp_path_factory.mktemp("budget-stack")
    with RedisServer() as redis_server:
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(url=redis_server.url, acme=sha(ACME_KEY), globex=sha(GLOBEX_KEY), initech=sha(INITECH_KEY)), encoding="utf-8")
        with Stack(policy=policy, work_dir=work) as stack:
            yield stack, policy


def keeper_for(policy: Path) -> BudgetKeeper:
    """Return a budget keeper on the store of `policy`, as a second replica would have."""
    policies = load_policy(policy, default_detectors())
    return BudgetKeeper.from_settings(policies.tenancy, policies.pricing)  # type: ignore[arg-type]


def day_counter(keeper: BudgetKeeper, tenant: str) -> Counter:
    return next(item.counter for item in keeper.counters(tenant, None) if item.period.window is Window.DAY)


def ledger_requests(policy: Path, tenant: str) -> int:
    """Return the requests in the tenant's usage ledger for today and yesterday (any model)."""
    from datetime import UTC, datetime, timedelta

    keeper = keeper_for(policy)
    today = datetime.now(UTC).astimezone(keeper.zone).date()
    days = [(today - timedelta(days=offset)).isoformat() for offset in (1, 0)]

    async def read() -> int:
        ledger = await keeper.store.usage(tenant, days)
        await keeper.store.close()
        return sum(row["requests"] for models in ledger.values() for row in models.values())

    return asyncio.run(read())


def used(policy: Path, tenant: str) -> dict[str, int]:
    """Return the tenant's used amounts in its current day window, read from Redis."""
    keeper = keeper_for(policy)

    async def read() -> dict[str, int]:
        (state,) = await keeper.store.status([day_counter(keeper, tenant)], now_ms=0)
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


def test_concurrent_requests_never_overspend(budget_stack) -> None:  # type: ignore[no-untyped-def]
    """200 concurrent requests through Envoy against a budget with room for exactly 10.

    Each request's estimate (40 characters of prompt at 4 per token, plus max_tokens 30) equals
    what the mock bills for it (10 + 30 tokens), and the check and the reservation are one Lua
    script. So the bound is exact: 10 requests pass, whatever their order, and the rest get 429.
    """
    from concurrent.futures import ThreadPoolExecutor

    stack, policy = budget_stack
    billed_before = billed(stack)
    oai = client(stack, INITECH_KEY)

    def attempt(index: int) -> str:
        prompt = f"{index:03d} " + "x" * 36
        try:
            oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=30, messages=[{"role": "user", "content": prompt}],
                extra_body={"mock": {"reply": "y" * 120}},
            )  # fmt: skip
        except openai.RateLimitError:
            return "429"
        return "ok"

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(attempt, range(200)))
    spent = settled(policy, "initech")

    assert outcomes.count("ok") == 10
    assert outcomes.count("429") == 190
    assert spent["total_tokens"] == 400
    assert billed(stack)["requests"] - billed_before["requests"] == 10


def test_tenant_key_not_sent_upstream(budget_stack) -> None:  # type: ignore[no-untyped-def]
    import json
    import urllib.request

    stack, _ = budget_stack
    client(stack, ACME_KEY).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    with urllib.request.urlopen(f"{stack.upstream_url}/mock/requests", timeout=5) as response:
        last = json.load(response)[-1]

    assert last["headers"]["x-extguard-tenant"] == "acme"
    assert "authorization" not in last["headers"]
    assert ACME_KEY not in json.dumps(last)


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


def billed(stack: Stack) -> dict[str, int]:
    """Return what the mock upstream has billed, once no stream of it is still open."""
    import json
    import time
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"{stack.upstream_url}/mock/usage", timeout=5) as response:
            usage = json.load(response)
        if not usage["streams_open"] or time.monotonic() > deadline:
            return usage
        time.sleep(0.05)


def settled(policy: Path, tenant: str) -> dict[str, int]:
    """Return the tenant's used amounts once nothing is reserved any more (cancelled streams
    settle in the background), or after 10 s."""
    import time

    keeper = keeper_for(policy)

    async def read() -> tuple[dict[str, int], int]:
        (state,) = await keeper.store.status([day_counter(keeper, tenant)], now_ms=0)
        return dict(state.used), state.reserved["total_tokens"]

    async def poll() -> dict[str, int]:
        deadline = time.monotonic() + 10
        try:
            while True:
                amounts, reserved = await read()
                if not reserved or time.monotonic() > deadline:
                    assert reserved == 0, f"{reserved} tokens still reserved"
                    return amounts
                await asyncio.sleep(0.05)
        finally:
            await keeper.store.close()

    return asyncio.run(poll())


def read_then_leave(stream: openai.Stream, chars: int) -> str:  # type: ignore[type-arg]
    """Read a held stream until more than `chars` of text arrived, then close it as a client
    that gives up would."""
    text = ""
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if len(text) > chars:
            break
    stream.close()
    return text


def test_mixed_requests_meter_exactly(budget_stack) -> None:  # type: ignore[no-untyped-def]
    """1,000 concurrent requests of seven kinds: OpenAI JSON, streamed with and without usage,
    OpenAI and Anthropic streams the client leaves midway, upstream errors, and Anthropic streams. The usage extguard
    committed equals what the mock upstream billed, token for token, and nothing stays reserved."""
    from concurrent.futures import ThreadPoolExecutor

    stack, policy = budget_stack
    before, billed_before, ledger_before = used(policy, "acme"), billed(stack), ledger_requests(policy, "acme")
    oai = client(stack, ACME_KEY)
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key=ACME_KEY, max_retries=0, timeout=20)

    def run(index: int) -> None:
        prompt = f"Request number {index}: tell me something about the number {index * 7}."
        reply = "word " * (index % 23 + 1)
        messages = [{"role": "user", "content": prompt}]
        kind = index % 6
        if kind == 0:
            answer = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=messages, extra_body={"mock": {"reply": reply}},  # type: ignore[arg-type]
            )  # fmt: skip
            assert answer.usage is not None
        elif kind == 1:
            stream = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=messages, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_body={"mock": {"reply": reply, "chunk_chars": 3}},
            )  # fmt: skip
            assert [chunk.usage for chunk in stream if chunk.usage is not None]
        elif kind == 2:
            # No usage in the stream: extguard estimates from the text, as the mock bills.
            stream = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=100, messages=messages, stream=True,  # type: ignore[arg-type]
                extra_body={"mock": {"reply": reply, "chunk_chars": 5}},
            )  # fmt: skip
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == reply
        elif kind == 3:
            # The client leaves midway. The mock sends two pieces of a long reply and waits, and the
            # client reads into the second piece and closes. Usage was requested but never sent.
            first, second = "word " * (index % 7 + 1), "more text " * 20
            script = {"reply": first + second + "never sent " * 50, "split_at": [len(first), len(first + second)], "hold_after_events": 3}
            stream = oai.chat.completions.create(
                model="gpt-4o-mini", max_tokens=500, messages=messages, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_body={"mock": script},
            )  # fmt: skip
            assert len(read_then_leave(stream, len(first))) > len(first)
        elif kind == 4:
            # An upstream error: providers do not bill it, so nothing is committed.
            with pytest.raises(openai.InternalServerError):
                oai.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=100, messages=messages,  # type: ignore[arg-type]
                    extra_body={"mock": {"status": 500, "error_message": "upstream failed"}},
                )  # fmt: skip
        elif index % 12 == 5:
            with claude.messages.stream(
                model="claude-3-5-haiku-latest", max_tokens=100, messages=messages,  # type: ignore[arg-type]
                extra_body={"mock": {"reply": reply, "chunk_chars": 4}},
            ) as stream:  # fmt: skip
                assert stream.get_final_message().usage.output_tokens > 0
        else:
            # An Anthropic stream left midway: message_start reported the input, and its output
            # count is only a placeholder, so the output is estimated from the text sent.
            first, second = "word " * (index % 7 + 1), "more text " * 20
            script = {"reply": first + second + "never sent " * 50, "split_at": [len(first), len(first + second)], "hold_after_events": 5}
            text = ""
            with claude.messages.stream(
                model="claude-3-5-haiku-latest", max_tokens=500, messages=messages, extra_body={"mock": script},  # type: ignore[arg-type]
            ) as stream:  # fmt: skip
                for piece in stream.text_stream:
                    text += piece
                    if len(text) > len(first):
                        break
            assert len(text) > len(first)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, range(1000)))

    after, billed_after = settled(policy, "acme"), billed(stack)

    assert billed_after["streams_open"] == 0
    assert billed_after["requests"] - billed_before["requests"] == sum(1 for index in range(1000) if index % 6 != 4)  # all but the errors
    assert ledger_requests(policy, "acme") - ledger_before == billed_after["requests"] - billed_before["requests"]
    assert after["input_tokens"] - before["input_tokens"] == billed_after["input_tokens"] - billed_before["input_tokens"]
    assert after["output_tokens"] - before["output_tokens"] == billed_after["output_tokens"] - billed_before["output_tokens"]


def test_cancelled_stream_commits_what_was_sent(budget_stack) -> None:  # type: ignore[no-untyped-def]
    stack, policy = budget_stack
    before, billed_before = used(policy, "acme"), billed(stack)
    first, second = "Once upon a time ", "a lighthouse keeper " * 10
    script = {"reply": first + second + "story " * 200, "split_at": [len(first), len(first + second)], "hold_after_events": 3}
    stream = client(stack, ACME_KEY).chat.completions.create(
        model="gpt-4o-mini", max_tokens=500, messages=[{"role": "user", "content": "Tell me a long story."}], stream=True,
        extra_body={"mock": script},
    )  # fmt: skip
    read_then_leave(stream, len(first))  # the client goes away in the second piece of text

    after, billed_after = settled(policy, "acme"), billed(stack)

    spent = {name: after[name] - before[name] for name in ("input_tokens", "output_tokens")}
    billed_now = {name: billed_after[name] - billed_before[name] for name in ("input_tokens", "output_tokens")}
    # Billed: the prompt, and the two pieces sent, far less than the 300 tokens of the whole reply.
    assert billed_now == {"input_tokens": 6, "output_tokens": (len(first + second) + 3) // 4}
    assert spent == billed_now


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
    command = [sys.executable, "-m", "extguard", "usage", "--config", str(policy), "--tenant", "umbrella"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "unknown tenants ['umbrella']" in result.stderr


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
def test_redis_killed_during_traffic(tmp_path: Path, mode: str) -> None:
    """Redis is killed with SIGKILL under concurrent traffic and restarted from its append-only
    file. Requests in flight at the kill commit through the spool. In open mode, requests admitted
    while Redis is down are counted too. In closed mode they get 503 and never reach the provider.
    Either way the counters end equal to what the mock upstream billed, so no usage is lost."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    with RedisServer(durable=True) as redis_server:
        policy = tmp_path / "policy.yaml"
        policy.write_text(OUTAGE_POLICY.format(url=redis_server.url, mode=mode, acme=sha(ACME_KEY)), encoding="utf-8")
        with Stack(policy=policy, work_dir=tmp_path) as stack:
            oai = client(stack, ACME_KEY)
            stop = threading.Event()
            outcomes: list[str] = []

            def traffic(worker: int) -> None:
                index = 0
                while not stop.is_set():
                    index += 1
                    messages = [{"role": "user", "content": f"worker {worker} request {index}"}]
                    try:
                        if index % 2:
                            oai.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
                        else:
                            stream = oai.chat.completions.create(
                                model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
                                extra_body={"mock": {"reply": "a streamed reply " * 3, "chunk_chars": 5, "chunk_delay_ms": 20}},
                            )  # fmt: skip
                            list(stream)
                        outcomes.append("ok")
                    except openai.InternalServerError as error:
                        outcomes.append(f"{error.status_code} {error.message}")

            with ThreadPoolExecutor(max_workers=4) as pool:
                workers = [pool.submit(traffic, worker) for worker in range(4)]
                # Kill only once traffic flows, so that streams are in flight at the kill even on
                # a busy machine: their commits must go through the spool.
                warm_until = time.monotonic() + 15
                while len(outcomes) < 8 and time.monotonic() < warm_until:
                    time.sleep(0.05)
                time.sleep(0.1)
                redis_server.kill()
                time.sleep(1.5)
                redis_server.start()
                time.sleep(1.0)
                stop.set()
                for worker in workers:
                    worker.result()

            expected = billed(stack)
            deadline = time.monotonic() + 15
            counted = used(policy, "acme")
            while time.monotonic() < deadline and counted["total_tokens"] != expected["input_tokens"] + expected["output_tokens"]:
                time.sleep(0.3)
                counted = used(policy, "acme")
            spool_replayed = stack.metric("extguard_budget_spool_replayed_total")

    # Closed mode: refused by ext_authz or, for a request already past it, by the reservation.
    unavailable = "503 Error code: 503 - The budget service is unavailable. Retry later."
    assert set(outcomes) == ({"ok"} if mode == "open" else {"ok", unavailable})
    assert outcomes.count("ok") == expected["requests"]
    assert (counted["input_tokens"], counted["output_tokens"]) == (expected["input_tokens"], expected["output_tokens"])
    assert spool_replayed > 0
