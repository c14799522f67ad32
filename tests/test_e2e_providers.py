"""End to end through envoy/extguard-providers.yaml: provider routes, credentials, retries, failover.

Each provider of the bootstrap is a mock upstream on loopback. Most tests reach the mocks over
plain HTTP (UPSTREAM_TLS=plaintext), and the TLS tests give them certificates from a test CA.
The OpenAI cluster's primary is a mock in a simulated outage, a port where nothing listens, or a
mock with the wrong certificate, and its secondary is a healthy mock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import certifi
import openai
import pytest

from extguard.testing.stack import ENVOY_DIR, EXAMPLE_POLICY, LOOPBACK_OPENER, Stack

pytestmark = pytest.mark.e2e

PROVIDERS_BOOTSTRAP = ENVOY_DIR / "extguard-providers.yaml"

# What Envoy sends upstream in place of the client's key.
PROVIDER_KEYS = {
    "OPENAI_API_KEY": "sk-openai-provider-key",
    "ANTHROPIC_API_KEY": "sk-ant-provider-key",
    "AZURE_OPENAI_API_KEY": "azure-provider-key",
}
CLIENT_KEY = "tenant-key-of-the-client"


_DIRECT = LOOPBACK_OPENER  # test certificates: reading a TLS mock's record skips verification


def providers_stack(
    primary: tuple[str, ...] | None,
    *,
    secondary: tuple[str, ...] = (),
    upstream_tls: str = "plaintext",
    ca_file: Path | None = None,
    provider_host: str = "127.0.0.1",
) -> Stack:
    """Return a stack of the providers bootstrap whose OpenAI mocks run with these options.

    With `primary=None` nothing listens on the primary's port, as when the provider is down.
    Any `upstream_tls` other than "plaintext" keeps TLS toward the mocks, so they must serve
    HTTPS with a certificate for `provider_host` from the CA in `ca_file`.
    """
    mocks = {"OPENAI_SECONDARY_PORT": secondary, "ANTHROPIC_PORT": (), "AZURE_PORT": ()}
    extra_ports: tuple[str, ...] = ()
    if primary is None:
        extra_ports = ("OPENAI_PORT",)
    else:
        mocks["OPENAI_PORT"] = primary
    provider_hosts = ("OPENAI_HOST", "OPENAI_SECONDARY_HOST", "ANTHROPIC_HOST", "AZURE_HOST")
    placeholders = {
        "LISTEN_HOST": "127.0.0.1",
        "EXTGUARD_HOST": "127.0.0.1",
        **{name: provider_host for name in provider_hosts},
        "UPSTREAM_TLS": upstream_tls,
        # Never read with UPSTREAM_TLS=plaintext, but Envoy checks that the file exists.
        "UPSTREAM_CA_FILE": str(ca_file or certifi.where()),
    }
    return Stack(
        policy=EXAMPLE_POLICY,
        bootstrap=PROVIDERS_BOOTSTRAP,
        mock_upstream=False,
        extra_mock_upstreams=mocks,
        extra_ports=extra_ports,
        placeholders=placeholders,
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


@dataclass(frozen=True)
class CertificateFiles:
    ca: Path
    localhost_cert: Path  # subjectAltName DNS:localhost
    localhost_key: Path
    other_cert: Path  # subjectAltName DNS:other.invalid, from the same CA
    other_key: Path


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """Create a test CA and two server certificates it signed, with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing; it creates the test certificates")
    folder = tmp_path_factory.mktemp("tls")
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec_key, "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem"),
        "-days", "2", "-subj", "/CN=extguard test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    for name, dns_name in (("localhost", "localhost"), ("other", "other.invalid")):
        extensions = folder / f"{name}.ext"
        extensions.write_text(f"subjectAltName=DNS:{dns_name}\nextendedKeyUsage=serverAuth\n", encoding="utf-8")
        openssl(
            "req", *ec_key, "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"),
            "-subj", f"/CN={dns_name}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / "ca.pem"),
            "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(extensions), "-out", str(folder / f"{name}.pem"),
        )  # fmt: skip
    return CertificateFiles(
        ca=folder / "ca.pem",
        localhost_cert=folder / "localhost.pem",
        localhost_key=folder / "localhost.key",
        other_cert=folder / "other.pem",
        other_key=folder / "other.key",
    )


def test_tls_verifies_provider_name(certificates: CertificateFiles) -> None:
    """The primary's certificate names another host, so Envoy rejects it and uses the secondary."""
    wrong_name = ("--tls-cert", str(certificates.other_cert), "--tls-key", str(certificates.other_key))
    right_name = ("--tls-cert", str(certificates.localhost_cert), "--tls-key", str(certificates.localhost_key))
    # "localhost" resolves to loopback, and Envoy prefers its IPv4 address, where the mocks listen.
    stack = providers_stack(
        wrong_name, secondary=right_name, upstream_tls="on", ca_file=certificates.ca, provider_host="localhost"
    )
    with stack:
        completion = openai_client(stack).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Over TLS to kim@example.com"}]
        )

        secondary = recorded(stack, "OPENAI_SECONDARY_PORT")
        assert completion.choices[0].message.content == "Over TLS to <EMAIL_ADDRESS>"
        assert recorded(stack, "OPENAI_PORT") == []
        assert [prompt_of(record) for record in secondary] == ["Over TLS to <EMAIL_ADDRESS>"]
        assert secondary[0]["headers"]["host"] == "localhost"
        assert envoy_counter(stack, "cluster.openai.ssl.fail_verify_san") >= 1
        assert envoy_counter(stack, "cluster.openai.ssl.handshake") >= 1
