"""Tests of the inline secrets detector: kinds, near misses, offsets, allow-list, fallback, streams.

Every credential here is built from a seeded random generator when the module loads, with a
correct checksum or structure where the kind has one. None is a real credential.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import string
import threading
import zlib
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from extguard.scan import secrets as secrets_module
from extguard.scan.engine import Action, ScanRule, guard_text
from extguard.scan.findings import Finding
from extguard.scan.redact import Masker, MaskStyle
from extguard.scan.secrets import PRIVATE_KEY_MAX_CHARS, SecretDetector
from extguard.scan.stream import StreamGuard

RNG = random.Random(20240611)
ALNUM = string.ascii_letters + string.digits
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
BASE64URL = ALNUM + "-_"
HEX = "0123456789abcdef"


def chars(alphabet: str, count: int) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(count))


def b64(byte_count: int) -> str:
    return base64.b64encode(RNG.randbytes(byte_count)).decode()


def b64url_json(document: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


def github_token(prefix: str) -> str:
    """Return a classic GitHub token: 30 random base62 chars and their CRC32 in 6 base62 chars."""
    random_part = chars(ALNUM, 30)
    number = zlib.crc32(random_part.encode())
    checksum = ""
    while number:
        number, digit = divmod(number, 62)
        checksum = BASE62[digit] + checksum
    return f"{prefix}_{random_part}{checksum.rjust(6, '0')}"


def pem(label: str, byte_count: int, newline: str = "\n") -> str:
    body = b64(byte_count)
    lines = [body[index : index + 64] for index in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----{newline}" + newline.join(lines) + f"{newline}-----END {label}-----"


def swap_char(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


# The documentation example key id; end-to-end tests use it as a leaked key, so it must stay found.
AWS_DOC_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_KEY_ID = "AKIA" + chars(string.ascii_uppercase + "234567", 16)
AWS_SESSION_KEY_ID = "ASIA" + chars(string.ascii_uppercase + "234567", 16)
AWS_SECRET = chars(ALNUM + "/+", 40)
GOOGLE_KEY = "AIza" + chars(BASE64URL, 35)
GITHUB_PAT = github_token("ghp")
GITHUB_APP_TOKEN = github_token("ghs")
GITHUB_FINE_GRAINED = f"github_pat_{chars(ALNUM, 22)}_{chars(ALNUM, 59)}"
GITLAB_PAT = "glpat-" + chars(ALNUM + "_-", 20)
GITLAB_DEPLOY = "gldt-" + chars(ALNUM, 24)
SLACK_BOT = f"xoxb-{chars(string.digits, 12)}-{chars(string.digits, 13)}-{chars(ALNUM, 24)}"
SLACK_USER = f"xoxp-{chars(string.digits, 11)}-{chars(string.digits, 11)}-{chars(string.digits, 13)}-{chars(HEX, 32)}"
SLACK_APP = f"xapp-1-{chars(string.ascii_uppercase + string.digits, 11)}-{chars(string.digits, 13)}-{chars(HEX, 64)}"
SLACK_REFRESH = f"xoxe-1-{chars(ALNUM, 40)}"
SLACK_WEBHOOK = (
    f"https://hooks.slack.com/services/T{chars(string.ascii_uppercase + string.digits, 9)}"
    f"/B{chars(string.ascii_uppercase + string.digits, 9)}/{chars(ALNUM, 24)}"
)
OPENAI_PROJECT = f"sk-proj-{chars(BASE64URL, 40)}T3BlbkFJ{chars(BASE64URL, 40)}"
OPENAI_LEGACY = "sk-" + chars(ALNUM, 48)
OPENAI_PLAIN = "sk-" + chars(ALNUM, 32)
ANTHROPIC = f"sk-ant-api03-{chars(BASE64URL, 93)}AA"
ANTHROPIC_OTHER = f"sk-ant-oat01-{chars(BASE64URL, 60)}"
STRIPE_SECRET = "sk_live_" + chars(ALNUM, 24)
STRIPE_RESTRICTED = "rk_live_" + chars(ALNUM, 99)
HUGGINGFACE = "hf_" + chars(ALNUM, 34)
BEARER_OPAQUE = chars(ALNUM, 32)
BASIC_CREDENTIALS = base64.b64encode(b"deploy:" + chars(ALNUM, 12).encode()).decode()
JWT = ".".join(
    [
        b64url_json({"alg": "HS256", "typ": "JWT"}),
        b64url_json({"sub": "1234567890", "name": "Test User", "iat": 1700000000}),
        chars(BASE64URL, 43),
    ]
)
RSA_KEY = pem("RSA PRIVATE KEY", 600)
PKCS8_KEY = pem("PRIVATE KEY", 300)
OPENSSH_KEY = pem("OPENSSH PRIVATE KEY", 400)
EC_KEY = pem("EC PRIVATE KEY", 120)
PGP_KEY = (
    "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: Test 1.0\n\n"
    + "\n".join(b64(48) for _ in range(8))
    + "\n=AbCd\n-----END PGP PRIVATE KEY BLOCK-----"
)
JSON_ESCAPED_KEY = pem("PRIVATE KEY", 300, newline="\\n")
GCP_JSON = json.dumps(
    {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": chars(HEX, 40),
        "private_key": pem("PRIVATE KEY", 300) + "\n",
        "client_email": "robot@demo-project.iam.gserviceaccount.com",
        "client_id": chars(string.digits, 21),
    },
    indent=2,
)
GCP_KEY_SPAN = GCP_JSON[GCP_JSON.index('"type"') : GCP_JSON.index('"client_email"') - len(",\n  ")]
AZURE_ACCOUNT_KEY = b64(64)
AZURE_CONNECTION = (
    f"DefaultEndpointsProtocol=https;AccountName=demoaccount;AccountKey={AZURE_ACCOUNT_KEY};EndpointSuffix=core.windows.net"
)
AZURE_CONNECTION_SPAN = AZURE_CONNECTION[: AZURE_CONNECTION.index(";EndpointSuffix")]
SAS_SIGNATURE = quote(b64(32), safe="")
SAS_URL = (
    "https://demoaccount.blob.core.windows.net/data/report.csv?sv=2022-11-02&ss=b&srt=o&sp=r"
    f"&se=2030-01-01T00:00:00Z&spr=https&sig={SAS_SIGNATURE}"
)
DB_PASSWORD = chars(ALNUM, 14)
GENERIC_VALUE = chars(ALNUM + "!#%*+-.=?^_~", 24)
HEX_VALUE = chars(HEX, 32)
GIT_SHA = chars(HEX, 40)
UUID = "123e4567-e89b-12d3-a456-426614174000"

SECRETS = SecretDetector()


def spans(detector: SecretDetector, text: str) -> list[tuple[str, str]]:
    return [(finding.entity_type, text[finding.start : finding.end]) for finding in detector.scan(text)]


def entity_types(detector: SecretDetector, text: str) -> set[str]:
    return {finding.entity_type for finding in detector.scan(text)}


# (text, entity type, expected span text)
FOUND = [
    pytest.param(AWS_DOC_KEY_ID, "AWS_ACCESS_KEY_ID", AWS_DOC_KEY_ID, id="aws-doc-key-id"),
    pytest.param(f"aws_access_key_id = {AWS_KEY_ID}\n", "AWS_ACCESS_KEY_ID", AWS_KEY_ID, id="aws-key-id-assigned"),
    pytest.param(f'"{AWS_SESSION_KEY_ID}",', "AWS_ACCESS_KEY_ID", AWS_SESSION_KEY_ID, id="aws-session-key-id"),
    pytest.param(f"日本{AWS_KEY_ID}。", "AWS_ACCESS_KEY_ID", AWS_KEY_ID, id="aws-key-id-in-cjk"),
    pytest.param(f"aws_secret_access_key = {AWS_SECRET}", "AWS_SECRET_ACCESS_KEY", AWS_SECRET, id="aws-secret-ini"),
    pytest.param(f'export AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', "AWS_SECRET_ACCESS_KEY", AWS_SECRET, id="aws-secret-env"),
    pytest.param(f'{{"SecretAccessKey": "{AWS_SECRET}"}}', "AWS_SECRET_ACCESS_KEY", AWS_SECRET, id="aws-secret-json"),
    pytest.param(f"aws configure set aws_secret_access_key {AWS_SECRET}", "AWS_SECRET_ACCESS_KEY", AWS_SECRET, id="aws-secret-cli"),
    pytest.param(f"awsSecretKey: '{AWS_SECRET}'", "AWS_SECRET_ACCESS_KEY", AWS_SECRET, id="aws-secret-camel"),
    pytest.param(f"key={GOOGLE_KEY}&q=x", "GOOGLE_API_KEY", GOOGLE_KEY, id="google-api-key"),
    pytest.param(f"conn = '{AZURE_CONNECTION}'", "AZURE_STORAGE_CONNECTION_STRING", AZURE_CONNECTION_SPAN, id="azure-connection"),
    pytest.param(SAS_URL, "AZURE_SAS_TOKEN", SAS_SIGNATURE, id="azure-sas"),
    pytest.param(f"token {GITHUB_PAT}.", "GITHUB_TOKEN", GITHUB_PAT, id="github-pat"),
    pytest.param(f"GH_TOKEN={GITHUB_APP_TOKEN}", "GITHUB_TOKEN", GITHUB_APP_TOKEN, id="github-app-token"),
    pytest.param(f"use {GITHUB_FINE_GRAINED}", "GITHUB_TOKEN", GITHUB_FINE_GRAINED, id="github-fine-grained"),
    pytest.param(f"PRIVATE-TOKEN: {GITLAB_PAT}", "GITLAB_TOKEN", GITLAB_PAT, id="gitlab-pat"),
    pytest.param(f"deploy {GITLAB_DEPLOY}", "GITLAB_TOKEN", GITLAB_DEPLOY, id="gitlab-deploy-token"),
    pytest.param(f"SLACK_BOT_TOKEN={SLACK_BOT}", "SLACK_TOKEN", SLACK_BOT, id="slack-bot"),
    pytest.param(f"'{SLACK_USER}'", "SLACK_TOKEN", SLACK_USER, id="slack-user"),
    pytest.param(f"app token {SLACK_APP}", "SLACK_TOKEN", SLACK_APP, id="slack-app"),
    pytest.param(f"refresh {SLACK_REFRESH}", "SLACK_TOKEN", SLACK_REFRESH, id="slack-refresh"),
    pytest.param(f"curl -X POST {SLACK_WEBHOOK} -d x", "SLACK_WEBHOOK_URL", SLACK_WEBHOOK, id="slack-webhook"),
    pytest.param(f"Authorization: Bearer {OPENAI_PROJECT}", "OPENAI_API_KEY", OPENAI_PROJECT, id="openai-project"),
    pytest.param(f'OPENAI_API_KEY="{OPENAI_LEGACY}"', "OPENAI_API_KEY", OPENAI_LEGACY, id="openai-legacy"),
    pytest.param(f"key: {OPENAI_PLAIN}", "OPENAI_API_KEY", OPENAI_PLAIN, id="openai-plain"),
    pytest.param(f"x-api-key: {ANTHROPIC}", "ANTHROPIC_API_KEY", ANTHROPIC, id="anthropic"),
    pytest.param(f"{ANTHROPIC_OTHER}\n", "ANTHROPIC_API_KEY", ANTHROPIC_OTHER, id="anthropic-oauth"),
    pytest.param(f"stripe.api_key = '{STRIPE_SECRET}'", "STRIPE_API_KEY", STRIPE_SECRET, id="stripe-secret"),
    pytest.param(f"{STRIPE_RESTRICTED}", "STRIPE_API_KEY", STRIPE_RESTRICTED, id="stripe-restricted"),
    pytest.param(f"HF_TOKEN={HUGGINGFACE}", "HUGGINGFACE_TOKEN", HUGGINGFACE, id="huggingface"),
    pytest.param(f"curl -H 'Authorization: Bearer {BEARER_OPAQUE}' https://api.example.com", "BEARER_TOKEN", BEARER_OPAQUE, id="bearer"),
    pytest.param(f"Authorization: Basic {BASIC_CREDENTIALS}", "BASIC_AUTH", BASIC_CREDENTIALS, id="basic-auth"),
    pytest.param(f"Here is my key:\n{RSA_KEY}\nThanks", "PRIVATE_KEY", RSA_KEY, id="pem-rsa"),
    pytest.param(f"{PKCS8_KEY}\n", "PRIVATE_KEY", PKCS8_KEY, id="pem-pkcs8"),
    pytest.param(f"cat id_ed25519\n{OPENSSH_KEY}", "PRIVATE_KEY", OPENSSH_KEY, id="pem-openssh"),
    pytest.param(f"{EC_KEY}", "PRIVATE_KEY", EC_KEY, id="pem-ec"),
    pytest.param(f"gpg export:\n{PGP_KEY}\n", "PRIVATE_KEY", PGP_KEY, id="pem-pgp"),
    pytest.param(f'{{"key": "{JSON_ESCAPED_KEY}"}}', "PRIVATE_KEY", JSON_ESCAPED_KEY, id="pem-json-escaped"),
    pytest.param(f"Authorization: Bearer {JWT}", "JWT", JWT, id="jwt-bearer"),
    pytest.param(f"token={JWT}.", "JWT", JWT, id="jwt-sentence-end"),
    pytest.param(f"postgres://app:{DB_PASSWORD}@db.internal:5432/app", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="postgres"),
    pytest.param(f"postgresql+asyncpg://app:{DB_PASSWORD}@db/app", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="postgres-driver"),
    pytest.param(f"MYSQL=mysql://root:{DB_PASSWORD}@127.0.0.1/x", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="mysql"),
    pytest.param(f"mongodb+srv://app:{DB_PASSWORD}@cluster0.example.net/db", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="mongodb-srv"),
    pytest.param(f"REDIS_URL=redis://:{DB_PASSWORD}@cache:6379/0", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="redis-no-user"),
    pytest.param(f"amqp://guest:{DB_PASSWORD}@rabbit:5672/", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="amqp"),
    pytest.param(f"jdbc:postgresql://app:{DB_PASSWORD}@db/app", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="jdbc"),
    pytest.param(f"xpostgres://app:{DB_PASSWORD}@db/app", "DATABASE_URL_PASSWORD", DB_PASSWORD, id="db-scheme-in-word"),
    pytest.param(f"git clone https://alice:{DB_PASSWORD}@git.example.com/r.git", "URL_PASSWORD", DB_PASSWORD, id="url-https"),
    pytest.param(f"HTTP://alice:{DB_PASSWORD}@example.com", "URL_PASSWORD", DB_PASSWORD, id="url-http-upper"),
    pytest.param(f"ftp://bob:{DB_PASSWORD}@files.example.org/a", "URL_PASSWORD", DB_PASSWORD, id="url-ftp"),
    pytest.param(f"sftp://deploy:{DB_PASSWORD}@10.0.0.5:22/", "URL_PASSWORD", DB_PASSWORD, id="url-sftp"),
    pytest.param(f"HTTPS_PROXY=socks5h://u:{DB_PASSWORD}@proxy:1080", "URL_PASSWORD", DB_PASSWORD, id="url-socks"),
    pytest.param(f"smtps://mailer:{DB_PASSWORD}@smtp.example.com:465", "URL_PASSWORD", DB_PASSWORD, id="url-smtps"),
    pytest.param(f'password = "{GENERIC_VALUE}"', "GENERIC_SECRET", GENERIC_VALUE, id="generic-password"),
    pytest.param(f"DB_PASSWORD={GENERIC_VALUE}\n", "GENERIC_SECRET", GENERIC_VALUE, id="generic-env"),
    pytest.param(f'"api_key": "{HEX_VALUE}"', "GENERIC_SECRET", HEX_VALUE, id="generic-json-hex"),
    pytest.param(f"client_secret: '{GENERIC_VALUE}'", "GENERIC_SECRET", GENERIC_VALUE, id="generic-yaml"),
    pytest.param(f"'apiKey' => '{GENERIC_VALUE}',", "GENERIC_SECRET", GENERIC_VALUE, id="generic-php-arrow"),
    pytest.param(f'secret := "{GENERIC_VALUE}"', "GENERIC_SECRET", GENERIC_VALUE, id="generic-go"),
    pytest.param(f"X-API-Key: {HEX_VALUE}", "GENERIC_SECRET", HEX_VALUE, id="generic-header"),
    pytest.param(f'{{\\"passwd\\": \\"{GENERIC_VALUE}\\"}}', "GENERIC_SECRET", GENERIC_VALUE, id="generic-escaped-json"),
    pytest.param(f"api_key = '{UUID}'", "GENERIC_SECRET", UUID, id="generic-uuid-assigned"),
    pytest.param("password: Tr0ub4dor&3", "GENERIC_SECRET", "Tr0ub4dor&3", id="generic-short-mixed"),
]


@pytest.mark.parametrize(("text", "entity_type", "expected"), FOUND)
def test_secret_found(text: str, entity_type: str, expected: str) -> None:
    assert spans(SECRETS, text) == [(entity_type, expected)]


# Texts without any secret: near misses of every kind, placeholders and look-alikes.
NOT_FOUND = [
    pytest.param(AWS_KEY_ID[:-1], id="aws-key-id-short"),
    pytest.param(AWS_KEY_ID + "X", id="aws-key-id-long"),
    pytest.param("X" + AWS_KEY_ID, id="aws-key-id-glued"),
    pytest.param(AWS_KEY_ID.lower(), id="aws-key-id-lowercase"),
    pytest.param("AKIDIOSFODNN7EXAMPLE", id="aws-wrong-prefix"),
    pytest.param("AKIAXXXXXXXXXXXXXXXX", id="aws-key-id-filler"),
    pytest.param(f"value = {AWS_SECRET}", id="aws-secret-without-context"),
    pytest.param(f"The AWS docs are long. {AWS_SECRET}", id="aws-secret-in-prose"),
    pytest.param(swap_char(GITHUB_PAT, 10), id="github-wrong-checksum"),
    pytest.param(GITHUB_PAT[:-1], id="github-short"),
    pytest.param(GITHUB_PAT + "a", id="github-long"),
    pytest.param("ghx_" + GITHUB_PAT[4:], id="github-unknown-prefix"),
    pytest.param("ghp_" + "x" * 36, id="github-filler"),
    pytest.param("github_pat_" + chars(ALNUM, 22) + "_" + chars(ALNUM, 58), id="github-fine-grained-short"),
    pytest.param(GITLAB_PAT[:-1], id="gitlab-short"),
    pytest.param("glpat-xxxxxxxxxxxxxxxxxxxx", id="gitlab-filler"),
    pytest.param("xoxb-not-a-real-token-at-all", id="slack-slug"),
    pytest.param("xoxo-gossip-girl-1234567890", id="slack-unknown-prefix"),
    pytest.param("xoxb-123", id="slack-short"),
    pytest.param("https://hooks.slack.com/services/TXXXXXXXX/BXXXXXXXX/XXXXXXXXXXXXXXXXXXXXXXXX", id="slack-webhook-filler"),
    pytest.param("sk-" + chars(ALNUM, 19), id="openai-short"),
    pytest.param("sk-" + "a" * 257, id="openai-long"),
    pytest.param("sk-your-api-key-goes-here", id="openai-slug"),
    pytest.param("sk-proj-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", id="openai-filler"),
    pytest.param("task-" + chars(ALNUM, 30), id="openai-inside-word"),
    pytest.param("SK-" + chars(ALNUM, 30), id="openai-uppercase"),
    pytest.param("sk-ant-api03-short", id="anthropic-short"),
    pytest.param("sk_test_" + chars(ALNUM, 24), id="stripe-test-key"),
    pytest.param("sk_live_" + "a" * 30, id="stripe-filler"),
    pytest.param("sk_live_" + chars(ALNUM, 19), id="stripe-short"),
    pytest.param("AIza" + chars(BASE64URL, 34), id="google-short"),
    pytest.param("AIza" + chars(ALNUM, 36), id="google-long"),
    pytest.param("-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----", id="pem-placeholder"),
    pytest.param("The file starts with -----BEGIN RSA PRIVATE KEY----- and ends with END.", id="pem-prose"),
    pytest.param(pem("CERTIFICATE", 300), id="pem-certificate"),
    pytest.param(pem("PUBLIC KEY", 300), id="pem-public-key"),
    pytest.param("eyJub3QganNvbg." + chars(BASE64URL, 20) + "." + chars(BASE64URL, 20), id="jwt-header-not-json"),
    pytest.param(b64url_json({"typ": "JWT"}) + "." + b64url_json({"a": 1}) + "." + chars(BASE64URL, 43), id="jwt-no-alg"),
    pytest.param(JWT.rsplit(".", 1)[0], id="jwt-two-segments"),
    pytest.param(JWT.rsplit(".", 1)[0] + ".abc", id="jwt-short-signature"),
    pytest.param(JWT + "." + chars(BASE64URL, 20), id="jwt-four-segments"),
    pytest.param("from huggingface_hub import hf_hub_download", id="huggingface-function"),
    pytest.param("Authorization: Bearer <token>", id="bearer-placeholder"),
    pytest.param("Authorization: Bearer YOUR_ACCESS_TOKEN_HERE", id="bearer-words"),
    pytest.param("Basic authentication is enabled on the admin panel", id="basic-prose"),
    pytest.param("Authorization: Basic " + base64.b64encode(b"no colon here").decode(), id="basic-no-colon"),
    pytest.param("hf_" + "a" * 34, id="huggingface-filler"),
    pytest.param("postgres://app@db.internal/app", id="db-no-password"),
    pytest.param("postgres://app:password@localhost/app", id="db-placeholder-password"),
    pytest.param("mysql://app:${DB_PASSWORD}@db/app", id="db-template-password"),
    pytest.param("postgres://db.internal:5432/app", id="db-port-only"),
    pytest.param("https://user@example.com/", id="url-no-password"),
    pytest.param("postgres://postgres:postgres@localhost:5432/app", id="db-default-credentials"),
    pytest.param("amqp://guest:guest@rabbit:5672/", id="amqp-default-credentials"),
    pytest.param("https://example.com:8443/path?a=b@c", id="url-port-only"),
    pytest.param("http://admin:password@localhost/", id="url-placeholder-password"),
    pytest.param(f"foo://user:{DB_PASSWORD}@example.com/", id="url-unknown-scheme"),
    pytest.param("DefaultEndpointsProtocol=https;AccountName=demo;AccountKey=<your-account-key>", id="azure-placeholder"),
    pytest.param("DefaultEndpointsProtocol=https;AccountName=demo;EndpointSuffix=core.windows.net", id="azure-no-key"),
    pytest.param(f"https://x.blob.core.windows.net/c?sv=2022-11-02&sig={quote(b64(20), safe='')}", id="sas-wrong-length"),
    pytest.param('{"type": "service_account", "project_id": "demo", "client_email": "a@b.iam"}', id="gcp-no-key"),
    pytest.param('password = "<your-key>"', id="generic-angle-placeholder"),
    pytest.param('api_key = "xxxxxxxxxxxxxxxx"', id="generic-x-placeholder"),
    pytest.param("password: changeme123", id="generic-changeme"),
    pytest.param('token = "${API_TOKEN}"', id="generic-template"),
    pytest.param("PASSWORD=$DB_PASSWORD", id="generic-shell-variable"),
    pytest.param('secret = os.environ["APP_SECRET"]', id="generic-environ"),
    pytest.param('api_key = os.getenv("API_KEY")', id="generic-getenv"),
    pytest.param("password = get_db_password()", id="generic-call"),
    pytest.param('password = "********"', id="generic-stars"),
    pytest.param("password = self.password_field", id="generic-attribute"),
    pytest.param("token: process.env.SLACK_TOKEN", id="generic-process-env"),
    pytest.param("password = DB_PASSWORD", id="generic-constant"),
    pytest.param('secret = "my_secret_value"', id="generic-words"),
    pytest.param("password: str", id="generic-type-annotation"),
    pytest.param('password = "hunter2"', id="generic-too-short"),
    pytest.param("max_tokens: 4096", id="generic-max-tokens"),
    pytest.param("token_count = 123456789", id="generic-other-name"),
    pytest.param("password == 'S3cr3tP4ss'", id="generic-comparison"),
    pytest.param("token: https://auth.example.com/token", id="generic-url"),
    pytest.param("token: /var/run/secrets/kubernetes.io/serviceaccount/token", id="generic-path"),
    pytest.param(f"secret = '{base64.b64encode(b'the quick brown fox').decode()}'", id="generic-base64-words"),
    pytest.param(f"request_id: {UUID}", id="uuid"),
    pytest.param(f"commit {GIT_SHA} fixed the bug", id="git-sha"),
    pytest.param(f"2024-05-01 12:00:01 INFO fetched layer sha256:{chars(HEX, 64)} in 3ms", id="digest-in-log"),
    pytest.param(f"md5={chars(HEX, 32)} sha1={GIT_SHA}", id="digests"),
    pytest.param(base64.b64encode(b"Hello world, this is a perfectly ordinary sentence.").decode(), id="base64-words"),
    pytest.param("Please reset your password: click the link we sent.", id="prose-password"),
    pytest.param("Tokens: the model counts tokens, not words.", id="prose-tokens"),
]


@pytest.mark.parametrize("text", NOT_FOUND)
def test_secret_not_found(text: str) -> None:
    assert SECRETS.scan(text) == []


@pytest.mark.parametrize(
    ("text", "entity_type"),
    [
        pytest.param(f"aws_secret_access_key = {GIT_SHA}", "AWS_SECRET_ACCESS_KEY", id="aws-secret-git-sha"),
        pytest.param(f"aws_secret_access_key = {AWS_SECRET}A", "AWS_SECRET_ACCESS_KEY", id="aws-secret-41-chars"),
        pytest.param(f"token = {ANTHROPIC}", "OPENAI_API_KEY", id="anthropic-not-openai"),
        pytest.param(f"api_key = '{OPENAI_PROJECT}'", "GENERIC_SECRET", id="specific-beats-generic"),
    ],
)
def test_other_kind_not_reported(text: str, entity_type: str) -> None:
    assert entity_type not in entity_types(SECRETS, text)


@pytest.mark.parametrize(
    ("text", "score", "rule"),
    [
        (AWS_KEY_ID, 1.0, "aws_access_key_id"),
        (f"aws_secret_access_key={AWS_SECRET}", 0.9, "aws_secret_access_key"),
        (GITHUB_PAT, 1.0, "github_token_checksum"),
        (GITHUB_FINE_GRAINED, 1.0, "github_fine_grained_token"),
        (GITLAB_PAT, 1.0, "gitlab_token"),
        (GITLAB_DEPLOY, 0.9, "gitlab_token"),
        (SLACK_BOT, 1.0, "slack_token"),
        (SLACK_REFRESH, 0.9, "slack_token"),
        (SLACK_WEBHOOK, 1.0, "slack_webhook_url"),
        (OPENAI_PROJECT, 1.0, "openai_api_key"),
        (OPENAI_LEGACY, 1.0, "openai_api_key"),
        (OPENAI_PLAIN, 0.9, "openai_api_key"),
        (ANTHROPIC, 1.0, "anthropic_api_key"),
        (ANTHROPIC_OTHER, 0.9, "anthropic_api_key"),
        (STRIPE_SECRET, 0.9, "stripe_api_key"),
        (GOOGLE_KEY, 1.0, "google_api_key"),
        (RSA_KEY, 1.0, "private_key_block"),
        (RSA_KEY[: RSA_KEY.index("-----END")], 0.9, "private_key_block_cut_off"),
        (AZURE_CONNECTION, 1.0, "azure_storage_connection_string"),
        (SAS_URL, 0.9, "azure_sas_signature"),
        (JWT, 0.9, "jwt"),
        (f"redis://:{DB_PASSWORD}@cache", 0.9, "database_url_password"),
    ],
)
def test_score_and_rule(text: str, score: float, rule: str) -> None:
    (finding,) = SECRETS.scan(text)
    assert finding.score == score
    assert finding.rule == rule
    assert finding.detector == "secrets"
    assert finding.entity_type in SECRETS.entity_types


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("abcd1234", 0.6, 0.6),
        ("Tr0ub4dor&3", 0.6, 0.65),
        (GENERIC_VALUE, 0.7, 0.8),
        (chars(ALNUM + "!#%*+-.=?^_~", 64), 0.78, 0.8),
    ],
)
def test_generic_score_rises_with_entropy(value: str, low: float, high: float) -> None:
    (finding,) = SECRETS.scan(f'password = "{value}"')
    assert low <= finding.score <= high


def test_gcp_service_account_key_found() -> None:
    # The private key block starts far after the "type" key, so it is reported too.
    text = f"Here:\n{GCP_JSON}\n"
    (service_account, private_key) = SECRETS.scan(text)
    assert (service_account.entity_type, text[service_account.start : service_account.end]) == (
        "GCP_SERVICE_ACCOUNT_KEY",
        GCP_KEY_SPAN,
    )
    assert private_key.entity_type == "PRIVATE_KEY"
    assert service_account.score == 1.0
    assert service_account.rule == "gcp_service_account_key"


def test_nearby_contained_finding_dropped() -> None:
    # AKIA... inside an OpenAI key body, within 48 chars of the key's start.
    key = "sk-proj-" + chars(ALNUM, 10) + "-" + AWS_KEY_ID + "-" + chars(ALNUM, 30)
    assert spans(SECRETS, key) == [("OPENAI_API_KEY", key)]


def test_distant_contained_finding_kept() -> None:
    # A stream window may start inside the outer key, so a finding far into it stays.
    key = "sk-proj-" + chars(ALNUM, 60) + "-" + AWS_KEY_ID + "-" + chars(ALNUM, 30)
    assert spans(SECRETS, key) == [("OPENAI_API_KEY", key), ("AWS_ACCESS_KEY_ID", AWS_KEY_ID)]


def test_cut_off_private_key_covers_body() -> None:
    text = "key:\n" + RSA_KEY[: RSA_KEY.index("-----END")].rstrip() + "\n\nCan you check it?"
    (finding,) = SECRETS.scan(text)
    assert text[finding.start : finding.end] == RSA_KEY[: RSA_KEY.index("-----END")].rstrip()


def test_private_key_longer_than_maximum_is_cut_off() -> None:
    key = pem("RSA PRIVATE KEY", PRIVATE_KEY_MAX_CHARS)
    (finding,) = SECRETS.scan(key)
    assert finding.rule == "private_key_block_cut_off"
    assert finding.end <= PRIVATE_KEY_MAX_CHARS


def test_findings_sorted_and_separate() -> None:
    text = (
        f"db: postgres://app:{DB_PASSWORD}@db/app\nkey {AWS_KEY_ID} and {GITHUB_PAT}\n"
        f'password = "{GENERIC_VALUE}"\nBearer {JWT}\n{PKCS8_KEY}'
    )
    found = spans(SECRETS, text)
    assert found == [
        ("DATABASE_URL_PASSWORD", DB_PASSWORD),
        ("AWS_ACCESS_KEY_ID", AWS_KEY_ID),
        ("GITHUB_TOKEN", GITHUB_PAT),
        ("GENERIC_SECRET", GENERIC_VALUE),
        ("JWT", JWT),
        ("PRIVATE_KEY", PKCS8_KEY),
    ]


@pytest.mark.parametrize(
    "prefix",
    ["héllo wörld ", "日本語のテキスト: ", "emoji 🎉🔑 ", "mixed ß\u00a0é\u200b ", "\ud800 lone surrogate "],
    ids=["latin", "cjk", "emoji", "spaces", "surrogate"],
)
def test_offsets_after_non_ascii(prefix: str) -> None:
    text = f"{prefix}key {AWS_KEY_ID}, pwd='{GENERIC_VALUE}' {prefix}{SLACK_WEBHOOK} {prefix}{JWT}"
    assert spans(SECRETS, text) == [
        ("AWS_ACCESS_KEY_ID", AWS_KEY_ID),
        ("GENERIC_SECRET", GENERIC_VALUE),
        ("SLACK_WEBHOOK_URL", SLACK_WEBHOOK),
        ("JWT", JWT),
    ]


# -- allow-list -----------------------------------------------------------------------------


def test_allow_values_skip_exact_value() -> None:
    detector = SecretDetector(allow_values=[AWS_KEY_ID, DB_PASSWORD])
    text = f"{AWS_KEY_ID} {AWS_SESSION_KEY_ID} postgres://a:{DB_PASSWORD}@h"
    assert spans(detector, text) == [("AWS_ACCESS_KEY_ID", AWS_SESSION_KEY_ID)]


def test_allow_patterns_skip_full_matches() -> None:
    detector = SecretDetector(allow_patterns=[r"AKIA[A-Z0-9]{9}EXAMPLE|sk-proj-.*"])
    text = f"{AWS_DOC_KEY_ID} {AWS_KEY_ID} {OPENAI_PROJECT}"
    assert spans(detector, text) == [("AWS_ACCESS_KEY_ID", AWS_KEY_ID)]


def test_allow_pattern_needs_full_match() -> None:
    detector = SecretDetector(allow_patterns=["AKIA"])
    assert spans(detector, AWS_KEY_ID) == [("AWS_ACCESS_KEY_ID", AWS_KEY_ID)]


def test_allowed_specific_value_hides_generic_too() -> None:
    detector = SecretDetector(allow_values=[OPENAI_PROJECT])
    assert detector.scan(f"api_key = '{OPENAI_PROJECT}'") == []


def test_doc_example_key_not_allowed_by_default() -> None:
    assert spans(SecretDetector(), AWS_DOC_KEY_ID) == [("AWS_ACCESS_KEY_ID", AWS_DOC_KEY_ID)]


def test_invalid_allow_pattern_raises() -> None:
    with pytest.raises(ValueError, match="invalid allow pattern"):
        SecretDetector(allow_patterns=["AKIA("])


# -- engines --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regex_detector() -> SecretDetector:
    return SecretDetector(use_hyperscan=False)


def test_hyperscan_used_by_default() -> None:
    assert SECRETS.uses_hyperscan


def test_regex_fallback_when_asked(regex_detector: SecretDetector) -> None:
    assert not regex_detector.uses_hyperscan


def test_regex_fallback_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_module, "hyperscan", None)
    detector = SecretDetector()
    assert not detector.uses_hyperscan
    assert spans(detector, f"key {AWS_KEY_ID}") == [("AWS_ACCESS_KEY_ID", AWS_KEY_ID)]


def test_forced_hyperscan_without_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_module, "hyperscan", None)
    with pytest.raises(RuntimeError, match="hyperscan package is not installed"):
        SecretDetector(use_hyperscan=True)


ALL_TEXTS = [param.values[0] for param in FOUND + NOT_FOUND]


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_regex_fallback_matches_hyperscan(regex_detector: SecretDetector, text: str) -> None:
    assert regex_detector.scan(text) == SECRETS.scan(text)


@pytest.mark.parametrize("prefix", ["héllo ", "日本語 🎉 ", "\ud800 "])
def test_regex_fallback_offsets_after_non_ascii(regex_detector: SecretDetector, prefix: str) -> None:
    text = f"{prefix}{GITHUB_PAT} {prefix}password='{GENERIC_VALUE}' {prefix}{PKCS8_KEY}"
    assert regex_detector.scan(text) == SECRETS.scan(text)


def test_concurrent_scans_agree() -> None:
    text = f"{AWS_KEY_ID} " * 200 + GITHUB_PAT
    expected = SECRETS.scan(text)
    results: list[list[Finding]] = []

    def scan_many() -> None:
        for _ in range(50):
            results.append(SECRETS.scan(text))

    threads = [threading.Thread(target=scan_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 200
    assert all(result == expected for result in results)


# -- pending_chars --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("Hello, how are you today?", 0),
        ("The quick brown fox jumps over the lazy dog.", 0),
        ("Write a haiku about autumn", 0),
        ("key A", 1),
        ("key AKIA12", len("AKIA12")),
        ("key " + AWS_KEY_ID, len(AWS_KEY_ID)),
        ("key " + AWS_KEY_ID + "X", 0),
        ("key AKIAb", 0),
        ("use sk", 2),
        ("use sk-abc", len("sk-abc")),
        ("use " + OPENAI_PROJECT, len(OPENAI_PROJECT)),
        ("task-", 0),
        ("sk-" + "a" * 257, 0),
        ("token " + GITHUB_PAT[:10], 10),
        ("token " + GITHUB_PAT, len(GITHUB_PAT)),
        ("token " + GITHUB_PAT + " ", 0),
        ("x " + SLACK_BOT[:12], 12),
        ("Bearer " + JWT[:30], 30),
        ("see https://hooks.sla", len("https://hooks.sla")),
        ("see https://example.com/path", 0),
        ("postgres://app:sec", len("postgres://app:sec")),
        ("postgres://app:secret@", len("postgres://app:secret@")),
        ("postgres://app:secret@db", 0),
        ("see https://app:sec", len("https://app:sec")),
        ("see https://app:secret@example.com/path", 0),
        ("I use mongo", 0),
        ("I use mongodb://", len("mongodb://")),
        ('password = "abc', len("abc")),
        ("password=abc12", len("abc12")),
        ('password = "abc12\\', len("abc12\\")),
        ('password = "abc12"', 0),
        ("password: ", 0),
        (f"aws_secret_access_key {AWS_SECRET[:10]}", 10),
        ("sas?sv=1&sig=abc%2B", len("abc%2B")),
        ("---", 3),
        ("-----BEGIN RSA PRIV", len("-----BEGIN RSA PRIV")),
        ("text\n" + RSA_KEY[:200], 200),
        ("text\n" + RSA_KEY, 0),
        ("text\n" + RSA_KEY + "\n-----BEGIN PRIVATE KEY-----\nMII", len("-----BEGIN PRIVATE KEY-----\nMII")),
        ('{"type": "service_acc', len('"type": "service_acc')),
        ('{\n  "type": "service_account", "project_id": "p"', len('"type": "service_account", "project_id": "p"')),
        ('{"type": "service_account"}', 0),
        ("x" * 1000, 0),
    ],
)
def test_pending_chars(text: str, expected: int) -> None:
    assert SECRETS.pending_chars(text) == expected


@pytest.mark.parametrize(
    "token",
    [
        AWS_KEY_ID,
        GITHUB_PAT,
        GITHUB_FINE_GRAINED,
        GITLAB_PAT,
        "GR1348941" + chars(ALNUM, 20),
        SLACK_BOT,
        SLACK_APP,
        "xoxe.xoxp-1-" + chars(ALNUM, 40),
        OPENAI_PROJECT,
        ANTHROPIC,
        STRIPE_RESTRICTED,
        GOOGLE_KEY,
        JWT,
        SLACK_WEBHOOK,
        AZURE_CONNECTION,
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ],
    ids=lambda token: token[:6],
)
def test_pending_chars_holds_every_prefix(token: str) -> None:
    held = [SECRETS.pending_chars("see " + token[:length]) for length in range(1, len(token) + 1)]
    assert held == list(range(1, len(token) + 1))


def test_pending_chars_holds_database_url_from_separator() -> None:
    url = f"postgresql+asyncpg://app:{DB_PASSWORD}@"
    held = [SECRETS.pending_chars("see " + url[:length]) for length in range(1, len(url) + 1)]
    separator_end = len("postgresql+asyncpg://")
    assert held == [0] * (separator_end - 1) + list(range(separator_end, len(url) + 1))


def test_pending_chars_holds_assigned_value() -> None:
    text = f'AWS_SECRET_ACCESS_KEY="{AWS_SECRET}'
    held = [SECRETS.pending_chars(text[:length]) for length in range(len(text) - 40 + 1, len(text) + 1)]
    assert held == list(range(1, 41))


def test_pending_chars_open_block_capped() -> None:
    text = "-----BEGIN PRIVATE KEY-----\n" + "A" * (PRIVATE_KEY_MAX_CHARS + 100)
    assert SECRETS.pending_chars(text) == 0


def test_pending_chars_open_gcp_key() -> None:
    text = "Here:\n" + GCP_JSON[: GCP_JSON.index("-----END")]
    assert SECRETS.pending_chars(text) == len(text) - len("Here:\n{\n  ")


# -- streams --------------------------------------------------------------------------------

MASKER = Masker(b"test-hash-key")
MASK_RULES = (ScanRule("secrets", SECRETS, Action.MASK, mask_style=MaskStyle.HASH),)

PROSE = (
    "Thanks for the help yesterday! Below is the config that fails; the deploy job says the "
    "credentials are rejected, although they worked last week. Any idea what changed? "
)
STREAM_TEXTS = [
    pytest.param(
        PROSE + f"export AWS_ACCESS_KEY_ID={AWS_KEY_ID}\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET}\nregion=eu-west-1",
        id="aws-env",
    ),
    pytest.param(
        PROSE + f'DATABASE_URL = "postgres://app:{DB_PASSWORD}@db.internal/app"\npassword = "{GENERIC_VALUE}"\n'
        f"headers = {{'Authorization': 'Bearer {JWT}'}}\nwebhook: {SLACK_WEBHOOK}\n"
        f"git remote add origin https://ci:{DB_PASSWORD}@git.example.com/app.git\n"
        f"curl -H 'Authorization: Bearer {BEARER_OPAQUE}' -H 'Authorization: Basic {BASIC_CREDENTIALS}'",
        id="config-code",
    ),
    pytest.param(PROSE + f"\n{PKCS8_KEY}\nand the rest of my message.", id="private-key"),
    pytest.param(PROSE + f"\n{GCP_JSON}\nDoes it look right?", id="gcp-json"),
    pytest.param(
        "Grüße aus Köln — 日本語のテキスト 🎉 " + PROSE + f"{GITHUB_PAT} {GITLAB_PAT} {OPENAI_PROJECT} "
        f"{ANTHROPIC} {STRIPE_SECRET} {GOOGLE_KEY} {SLACK_BOT} {HUGGINGFACE}.",
        id="vendor-tokens-non-ascii",
    ),
    pytest.param(
        PROSE + f"task- --- sk-your-api-key-goes-here AKIA12 password = \"<your-key>\" {UUID} {GIT_SHA} "
        f"ghp_{chars(ALNUM, 36)} mongo postgres://app@db -----BEGIN CERTIFICATE----- end {AWS_KEY_ID}",
        id="near-misses",
    ),
    pytest.param(PROSE + f"conn='{AZURE_CONNECTION}' then {SAS_URL} done", id="azure"),
]


def expected_output(text: str) -> tuple[str, list[object]]:
    result = guard_text(text, MASK_RULES, MASKER, None)
    return result.text, result.hits


def run_stream(pieces: list[str]) -> tuple[str, list[object], int]:
    guard = StreamGuard(MASK_RULES, MASKER, None, restore_pseudonyms=False)
    released: list[str] = []
    hits: list[object] = []
    for piece in [*pieces, None]:
        chunk = guard.feed(piece) if piece is not None else guard.flush()
        released.append(chunk.text)
        hits.extend(chunk.hits)
    return "".join(released), hits, guard.max_held_chars


def two_piece_splits(text: str) -> Iterator[list[str]]:
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def random_splits(text: str, count: int, seed: int) -> Iterator[list[str]]:
    rng = random.Random(seed)
    for _ in range(count):
        cuts = [0]
        while cuts[-1] < len(text):
            cuts.append(cuts[-1] + rng.randint(1, 12))
        yield [text[start:end] for start, end in itertools.pairwise(cuts)]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_two_piece_splits_equal_whole(text: str) -> None:
    expected_text, expected_hits = expected_output(text)
    assert expected_hits, "each stream text holds at least one secret"
    for pieces in two_piece_splits(text):
        released, hits, _ = run_stream(pieces)
        assert released == expected_text, pieces
        assert hits == expected_hits, pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_random_splits_equal_whole(text: str) -> None:
    expected_text, expected_hits = expected_output(text)
    for pieces in [list(text), *random_splits(text, count=20, seed=len(text))]:
        released, hits, _ = run_stream(pieces)
        assert released == expected_text
        assert hits == expected_hits


# Whole and partial secrets, names, operators, quotes and separators, glued at random: the
# hold-back must also cover matches that start inside runs, end at odd places or nest.
SOUP_FRAGMENTS = [
    AWS_KEY_ID, AWS_SECRET, GOOGLE_KEY, GITHUB_PAT, GITHUB_FINE_GRAINED, GITLAB_PAT, SLACK_BOT, SLACK_USER,
    SLACK_WEBHOOK, OPENAI_PROJECT, OPENAI_PLAIN, ANTHROPIC, STRIPE_SECRET, HUGGINGFACE, BEARER_OPAQUE, JWT, EC_KEY, JSON_ESCAPED_KEY,
    AZURE_CONNECTION, SAS_URL, DB_PASSWORD, GENERIC_VALUE, UUID, GIT_SHA,
    "password = ", 'password = "', "passwd: ", "api_key=", "'apiKey' => '", "token: ", "secret := ",
    "aws_secret_access_key = ", "AWS_SECRET_ACCESS_KEY=", '"', "'", "\\", '\\"', "postgres://app:",
    "mongodb+srv://u:", "redis://:", "https://ci:", "@db.internal/x", "@", ":", "https://", "hooks.slack.com/services/",
    "sk-", "sk-ant-api03-", "sk_live_", "hf_", "Bearer ", "Basic ", "AKIA", "ghp_", "glpat-", "xoxb-", "eyJ", ".",
    "-----BEGIN PRIVATE KEY-----\n", "\n-----END PRIVATE KEY-----", "---", '{"type": "service_account", ',
    '"private_key": "', "}", "?sv=2022&sig=", "&sig=", "%2B", "=", "DefaultEndpointsProtocol=https;AccountKey=",
    " ", " ", "\n", ",", ";", "(", "the ", "Grüße ", "日本 ", "🎉", "-", "_", "a", "A", "0", "x", "s",
]


def fragment_soup(seed: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    length = rng.randint(80, 400)
    while sum(map(len, parts)) < length:
        fragment = rng.choice(SOUP_FRAGMENTS)
        if rng.random() < 0.2 and len(fragment) > 4:
            cut = rng.randint(1, len(fragment) - 1)
            fragment = fragment[:cut] if rng.random() < 0.5 else fragment[cut:]
        parts.append(fragment)
    return "".join(parts)


@pytest.mark.parametrize("seed", range(24))
def test_stream_fragment_soup_equals_whole(seed: int) -> None:
    text = fragment_soup(seed)
    expected_text, expected_hits = expected_output(text)
    for pieces in [list(text), *two_piece_splits(text)]:
        released, hits, _ = run_stream(pieces)
        assert released == expected_text, (text, pieces)
        assert hits == expected_hits, (text, pieces)


def test_stream_holds_little_for_prose() -> None:
    text = PROSE * 20 + "The end."
    _, _, max_held = run_stream([text[index : index + 5] for index in range(0, len(text), 5)])
    assert max_held <= 5


# -- pathological inputs --------------------------------------------------------------------

MEGABYTE = 1_000_000


def repeat_to_megabyte(fragment: str) -> str:
    return fragment * (MEGABYTE // len(fragment))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("".join(RNG.choices(ALNUM + "+/", k=MEGABYTE)), id="base64-chars"),
        pytest.param("".join(RNG.choices(BASE64URL + ".", k=MEGABYTE)), id="base64url-dots"),
        pytest.param(repeat_to_megabyte("0123456789"), id="digits"),
        pytest.param(repeat_to_megabyte("password="), id="password-equals"),
        pytest.param(repeat_to_megabyte("password = "), id="password-spaced"),
        pytest.param(repeat_to_megabyte('token: "'), id="token-quote"),
        pytest.param(repeat_to_megabyte("aws_secret_access_key "), id="aws-secret-name"),
        pytest.param(repeat_to_megabyte("sk-"), id="sk"),
        pytest.param(repeat_to_megabyte("AKIA"), id="akia"),
        pytest.param(repeat_to_megabyte("ghp_"), id="ghp"),
        pytest.param(repeat_to_megabyte("xoxb-1-"), id="slack"),
        pytest.param(repeat_to_megabyte("eyJ"), id="jwt-start"),
        pytest.param(repeat_to_megabyte("eyJhbGciOiJIUzI1NiJ9."), id="jwt-header"),
        pytest.param(repeat_to_megabyte("-----BEGIN PRIVATE KEY-----\n"), id="pem-begin"),
        pytest.param(repeat_to_megabyte("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"), id="pem-empty"),
        pytest.param(repeat_to_megabyte('"type": "service_account", '), id="gcp-marker"),
        pytest.param(repeat_to_megabyte("postgres://u:"), id="db-scheme"),
        pytest.param(repeat_to_megabyte("DefaultEndpointsProtocol=https;"), id="azure"),
        pytest.param(repeat_to_megabyte("&sig="), id="sas"),
        pytest.param(repeat_to_megabyte("hooks.slack.com/services/"), id="slack-webhook"),
        pytest.param(" " * MEGABYTE, id="spaces"),
    ],
)
def test_megabyte_input_scans(text: str) -> None:
    assert SECRETS.scan(text) == []
    assert 0 <= SECRETS.pending_chars(text) <= 2 * PRIVATE_KEY_MAX_CHARS
