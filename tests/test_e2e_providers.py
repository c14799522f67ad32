"""End to end through envoy/extguard-providers.yaml: provider routes, credentials, retries, failover.

Each provider of the bootstrap is a mock upstream on loopback, reached over plain HTTP
(UPSTREAM_TLS=plaintext). The OpenAI cluster's primary is a mock in a simulated outage, or a
port where nothing listens, and its secondary is a healthy mock.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import anthropic
import openai
import pytest

from extguard.testing.stack import ENVOY_DIR, EXAMPLE_POLICY, Stack

pytestmark = pytest.mark.e2e

PROVIDERS_BOOTSTRAP = ENVOY_DIR / "extguard-providers.yaml"

# What Envoy sends upstream in place of the client's key.
PROVIDER_KEYS = {
    "OPENAI_API_KEY": "sk-openai-provider-key",
    "ANTHROPIC_API_KEY": "sk-ant-provider-key",
    "AZURE_OPENAI_API_KEY": "azure-provider-key",
}
CLIENT_KEY = "tenant-key-of-the-client"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def providers_stack(primary: tuple[str, ...] | None, upstream_tls: str = "plaintext") -> Stack:
    """Return a stack of the providers bootstrap whose OpenAI primary runs with `primary` options.

    With `primary=None` nothing listens on the primary's port, as when the provider is down.
    Any `upstream_tls` other than "plaintext" keeps TLS toward the mocks, which speak plain HTTP.
    """
    mocks = {"OPENAI_SECONDARY_PORT": (), "ANTHROPIC_PORT": (), "AZURE_PORT": ()}
    extra_ports: tuple[str, ...] = ()
    if primary is None:
        extra_ports = ("OPENAI_PORT",)
    else:
        mocks["OPENAI_PORT"] = primary
    hosts = ("LISTEN_HOST", "EXTGUARD_HOST", "OPENAI_HOST", "OPENAI_SECONDARY_HOST", "ANTHROPIC_HOST", "AZURE_HOST")
    return Stack(
        policy=EXAMPLE_POLICY,
        bootstrap=PROVIDERS_BOOTSTRAP,
        mock_upstream=False,
        extra_mock_upstreams=mocks,
        extra_ports=extra_ports,
        placeholders={**{name: "127.0.0.1" for name in hosts}, "UPSTREAM_TLS": upstream_tls},
        extra_env=PROVIDER_KEYS,
    )


def recorded(stack: Stack, port_placeholder: str) -> list[dict]:
    """Return the POST requests that reached the mock upstream on that port, oldest first."""
    with _DIRECT.open(f"{stack.mock_url(port_placeholder)}/mock/requests", timeout=5) as response:
        return [record for record in json.load(response) if record["method"] == "POST"]


def clear_records(stack: Stack, *port_placeholders: str) -> None:
    for name in port_placeholders:
        request = urllib.request.Request(f"{stack.mock_url(name)}/mock/requests", method="DELETE")
        _DIRECT.open(request, timeout=5).close()


def envoy_counter(stack: Stack, name: str) -> int:
    """Return one counter from Envoy's admin /stats."""
    url = f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{name}$"
    with _DIRECT.open(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.startswith(f"{name}: "))


def openai_client(stack: Stack) -> openai.OpenAI:
    # max_retries=0: the SDK's own retries would hide whether Envoy retried.
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)


def prompt_of(record: dict) -> str:
    return json.loads(record["body"])["messages"][0]["content"]


@pytest.fixture(scope="module")
def outage_stack() -> Iterator[Stack]:
    """The OpenAI primary fails every request with 503."""
    with providers_stack(("--fail-status", "503")) as running:
        yield running


# -- Failover ----------------------------------------------------------------------------------


def test_failover_after_503_masks_prompt(outage_stack: Stack) -> None:
    clear_records(outage_stack, "OPENAI_PORT", "OPENAI_SECONDARY_PORT")

    completion = openai_client(outage_stack).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Mail kim@example.com today"}]
    )

    primary = recorded(outage_stack, "OPENAI_PORT")
    secondary = recorded(outage_stack, "OPENAI_SECONDARY_PORT")
    assert completion.choices[0].message.content == "Mail <EMAIL_ADDRESS> today"
    assert [prompt_of(record) for record in primary] == ["Mail <EMAIL_ADDRESS> today"]
    assert [prompt_of(record) for record in secondary] == ["Mail <EMAIL_ADDRESS> today"]
    assert primary[0]["headers"]["x-envoy-attempt-count"] == "1"
    assert secondary[0]["headers"]["x-envoy-attempt-count"] == "2"


def test_failover_sends_provider_key(outage_stack: Stack) -> None:
    openai_client(outage_stack).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Which key do you see?"}]
    )

    headers = recorded(outage_stack, "OPENAI_SECONDARY_PORT")[-1]["headers"]
    assert headers["authorization"] == f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"
    assert CLIENT_KEY not in json.dumps(headers)


def test_connect_failure_fails_over_then_ejects() -> None:
    """Each failed connection fails over, and the third in a row ejects the primary."""
    with providers_stack(primary=None) as stack:
        client = openai_client(stack)
        prompts = [f"Is anyone there? ({attempt})" for attempt in range(4)]

        replies = []
        for prompt in prompts:
            completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
            replies.append(completion.choices[0].message.content)

        secondary = recorded(stack, "OPENAI_SECONDARY_PORT")
        assert replies == prompts
        assert [prompt_of(record) for record in secondary] == prompts
        assert [record["headers"]["x-envoy-attempt-count"] for record in secondary] == ["2", "2", "2", "1"]
        assert envoy_counter(stack, "cluster.openai.upstream_cx_connect_fail") == 3
        assert envoy_counter(stack, "cluster.openai.outlier_detection.ejections_enforced_consecutive_5xx") == 1


def test_rate_limited_retry_honours_retry_after() -> None:
    with providers_stack(("--fail-status", "429", "--retry-after", "1")) as stack:
        completion = openai_client(stack).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Over the limit?"}]
        )

        assert completion.choices[0].message.content == "Over the limit?"
        assert len(recorded(stack, "OPENAI_PORT")) == 1
        assert recorded(stack, "OPENAI_SECONDARY_PORT")[0]["headers"]["x-envoy-attempt-count"] == "2"
        # The wait before the retry came from retry-after, not from the exponential back-off.
        assert envoy_counter(stack, "cluster.openai.upstream_rq_retry_backoff_ratelimited") == 1


# -- Anthropic and Azure routes ----------------------------------------------------------------


def test_anthropic_route_reaches_anthropic(outage_stack: Stack) -> None:
    claude = anthropic.Anthropic(base_url=outage_stack.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=20)

    message = claude.messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Card 5555555555554444"}]
    )

    records = recorded(outage_stack, "ANTHROPIC_PORT")
    assert message.content[0].text == "Card <CREDIT_CARD>"
    assert [record["path"] for record in records] == ["/v1/messages"]
    assert records[0]["headers"]["x-api-key"] == PROVIDER_KEYS["ANTHROPIC_API_KEY"]
    assert "authorization" not in records[0]["headers"]


def test_azure_route_reaches_azure(outage_stack: Stack) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=outage_stack.base_url, api_key=CLIENT_KEY, api_version="2024-10-21", max_retries=0, timeout=20
    )

    completion = azure.chat.completions.create(
        model="my-gpt-deployment", messages=[{"role": "user", "content": "Reach lee@example.org"}]
    )

    records = recorded(outage_stack, "AZURE_PORT")
    assert completion.choices[0].message.content == "Reach <EMAIL_ADDRESS>"
    assert [record["path"] for record in records] == ["/openai/deployments/my-gpt-deployment/chat/completions"]
    assert records[0]["query"] == "api-version=2024-10-21"
    assert records[0]["headers"]["api-key"] == PROVIDER_KEYS["AZURE_OPENAI_API_KEY"]


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_kept_unless_plaintext_requested() -> None:
    """Without UPSTREAM_TLS=plaintext, Envoy speaks only TLS upstream, so a plain-HTTP mock is unusable."""
    with providers_stack(primary=(), upstream_tls="on") as stack:
        with pytest.raises(openai.InternalServerError) as raised:
            openai_client(stack).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Plain text, please"}]
            )

        assert raised.value.status_code == 503
        assert recorded(stack, "OPENAI_PORT") == []
        assert recorded(stack, "OPENAI_SECONDARY_PORT") == []
        assert envoy_counter(stack, "cluster.openai.ssl.connection_error") >= 1
