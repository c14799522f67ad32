"""The policy file's `tenancy` and `pricing` sections: who is calling, and what they may spend.

```yaml
tenancy:
  time_zone: Europe/Berlin            # budget windows follow this zone's calendar
  identity:
    api_key_headers: [authorization, x-api-key, api-key]
    trusted_header: x-tenant-id       # only behind a proxy that sets it; off unless named
  store: {backend: redis, url: redis://127.0.0.1:6379/0, timeout_ms: 50, failure_mode: closed}
  tenants:
    acme:
      api_keys: [{sha256: 9f86d0..., user: ci-bot}]
      models: ["gpt-4o*", "claude-*"]
      budgets: [{window: day, metric: total_tokens, limit: 200000, soft: 0.8}]
      user_budgets: [{window: day, metric: total_tokens, limit: 20000}]
      rate_limits:                    # for Envoy Gateway's limit.fromMetadata, by metadata key
        extguard_requests: {requests_per_unit: 600, unit: minute}
pricing:                              # USD per million tokens
  gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}
```

API keys are stored only as the SHA-256 of the key, in hex. `cost_usd` budgets need a price
for every model the tenant calls; a model without one costs 0 and is logged once.
"""

from __future__ import annotations

import enum
import fnmatch
import re
import urllib.parse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from extguard.budget.windows import Window

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Keys that ext_authz's dynamic metadata already uses: extguard's own facts, and the duration
# that Envoy adds itself.
RESERVED_METADATA_KEYS = frozenset({"extguard", "ext_authz_duration"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetMetric(enum.StrEnum):
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    COST_USD = "cost_usd"


class Budget(_Strict):
    """A hard limit on one metric per window, and an optional soft limit as a fraction of it."""

    window: Window
    metric: BudgetMetric = BudgetMetric.TOTAL_TOKENS
    limit: float = Field(gt=0)  # tokens, or USD for cost_usd
    soft: float | None = Field(None, gt=0, lt=1)  # warn from this fraction of the limit

    @model_validator(mode="after")
    def _whole_tokens(self) -> Budget:
        if self.metric is not BudgetMetric.COST_USD and self.limit != int(self.limit):
            raise ValueError(f"a {self.metric.value} limit is a whole number of tokens, got {self.limit}")
        return self


class RateLimitUnit(enum.StrEnum):
    """Units of Envoy's rate limit override; the policy may spell them in any case."""

    SECOND = "SECOND"
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    WEEK = "WEEK"
    MONTH = "MONTH"
    YEAR = "YEAR"


class RateLimit(_Strict):
    """A per-tenant limit handed to Envoy's global rate limiter through dynamic metadata.

    ext_authz writes it as `{"requests_per_unit": N, "unit": "MINUTE"}`, the struct Envoy's rate
    limit override reads, so a BackendTrafficPolicy rule with `limit.fromMetadata` (namespace
    `envoy.filters.http.ext_authz`, key: the name under `rate_limits`) counts with this tenant's
    number instead of its static one. With cost-based rules the number is tokens, not requests.
    """

    requests_per_unit: int = Field(ge=0, le=4_294_967_295)  # Envoy reads it as a 32-bit count
    unit: RateLimitUnit

    @field_validator("unit", mode="before")
    @classmethod
    def _upper_unit(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def metadata(self) -> dict[str, object]:
        return {"requests_per_unit": self.requests_per_unit, "unit": self.unit.value}


class ApiKey(_Strict):
    sha256: str  # lowercase hex SHA-256 of the key; the key itself is never stored
    user: str | None = Field(None, min_length=1)  # a user or key name within the tenant

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256_HEX.fullmatch(value):
            raise ValueError("sha256 must be 64 hex digits: the SHA-256 of the API key, as `sha256sum` prints it")
        return value


class Tenant(_Strict):
    api_keys: list[ApiKey] = Field(default_factory=list)
    models: list[str] | None = Field(None, min_length=1)  # shell-style patterns; None: any model
    budgets: list[Budget] = Field(default_factory=list)
    user_budgets: list[Budget] = Field(default_factory=list)  # per user or key, inside the tenant's

    @field_validator("budgets", "user_budgets")
    @classmethod
    def _one_limit_per_window_and_metric(cls, budgets: list[Budget]) -> list[Budget]:
        seen: set[tuple[str, str]] = set()
        for budget in budgets:
            key = (budget.window.value, budget.metric.value)
            if key in seen:
                raise ValueError(f"two budgets for window {key[0]} and metric {key[1]}; keep one limit per window and metric")
            seen.add(key)
        return budgets
    # Limits for Envoy's rate limiter, by the metadata key a `limit.fromMetadata` rule names.
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)

    @field_validator("rate_limits")
    @classmethod
    def _metadata_keys(cls, limits: dict[str, RateLimit]) -> dict[str, RateLimit]:
        invalid = [key for key in limits if not _METADATA_KEY.fullmatch(key) or key in RESERVED_METADATA_KEYS]
        if invalid:
            names = ", ".join(repr(key) for key in invalid)
            raise ValueError(
                f"invalid rate limit key {names}: a key is letters, digits, '_', '-' or '.', and not one of {sorted(RESERVED_METADATA_KEYS)}"
            )
        return limits

    def allows_model(self, model: str | None) -> bool:
        """Return whether the tenant may call `model`; an unknown model (None) is allowed here."""
        if self.models is None or model is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class Identity(_Strict):
    # Headers that may carry an API key, as "Bearer KEY" or the bare key: those of the OpenAI
    # (authorization), Anthropic (x-api-key) and Azure OpenAI (api-key) clients.
    api_key_headers: list[str] = Field(default_factory=lambda: ["authorization", "x-api-key", "api-key"])
    # Remove the header that carried the tenant's key before the request goes upstream, so the
    # key never reaches a provider; Envoy adds the provider's own credential. False: keep it.
    strip_api_key: bool = True
    # A header naming the tenant, trusted only when set here (behind a proxy that sets it).
    trusted_header: str | None = None
    trusted_user_header: str | None = None
    # Claims that Envoy's jwt_authn filter wrote into metadata (`payload_in_metadata`).
    jwt_metadata_namespace: str = "envoy.filters.http.jwt_authn"
    jwt_payload_key: str | None = None  # None: JWT identity off
    jwt_tenant_claim: str = "tenant"
    jwt_user_claim: str | None = "sub"

    @model_validator(mode="after")
    def _some_source(self) -> Identity:
        if not self.api_key_headers and self.trusted_header is None and self.jwt_payload_key is None:
            raise ValueError("no identity source: list api_key_headers, or set trusted_header or jwt_payload_key")
        if self.trusted_user_header is not None and self.trusted_header is None:
            raise ValueError("trusted_user_header is read only with trusted_header; set both")
        return self

    @field_validator("api_key_headers")
    @classmethod
    def _lowercase_names(cls, names: list[str]) -> list[str]:
        return [_header_name(name) for name in names]

    @field_validator("trusted_header", "trusted_user_header")
    @classmethod
    def _lowercase_name(cls, name: str | None) -> str | None:
        return None if name is None else _header_name(name)


class StoreBackend(enum.StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class StoreMode(enum.StrEnum):
    """The deployment of the Redis store: one server, a Redis Cluster, or a master that Sentinel tracks."""

    STANDALONE = "standalone"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


DEFAULT_SENTINEL_PORT = 26379
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Settings that only the redis backend reads, and those that only sentinel mode reads.
_REDIS_ONLY = ("password_env", "username_env")
_SENTINEL_ONLY = ("sentinel_master", "sentinels", "sentinel_password_env")


class StoreSettings(_Strict):
    backend: StoreBackend = StoreBackend.MEMORY
    # standalone uses the server in `url`, and cluster uses `url` as its first node to ask for
    # the cluster's nodes. sentinel uses the master that the `sentinels` report for `sentinel_master`.
    mode: StoreMode = StoreMode.STANDALONE
    # In sentinel mode only the scheme (rediss: TLS), credentials and db number of the URL count.
    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: float = Field(50.0, gt=0)
    # closed: reject requests while the store cannot be reached; open: let them through unmetered
    # (their usage is spooled and committed later).
    failure_mode: Literal["open", "closed"] = "closed"
    spool_max: int = Field(10_000, ge=0)
    # A local file that keeps spooled usage across restarts and crashes; None: memory only.
    spool_file: str | None = Field(None, min_length=1)
    # Names of environment variables with the Redis credentials (from a Kubernetes Secret, for
    # example). A named variable replaces the username or password of `url`.
    password_env: str | None = None
    username_env: str | None = None
    sentinel_master: str | None = Field(None, min_length=1)
    sentinels: list[str] = Field(default_factory=list)  # HOST:PORT of each Sentinel; the port defaults to 26379
    sentinel_password_env: str | None = None  # the password of the Sentinels themselves, if they require one

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"store url scheme {parts.scheme!r} is not supported: use redis://, rediss:// (TLS) or unix://")
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            raise ValueError(f"invalid database {database!r} in the store url: the path is a database number, such as /0")
        return url

    @field_validator("password_env", "username_env", "sentinel_password_env")
    @classmethod
    def _environment_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}: use letters, digits and '_', not starting with a digit")
        return name

    @field_validator("sentinels")
    @classmethod
    def _sentinel_addresses(cls, sentinels: list[str]) -> list[str]:
        for address in sentinels:
            parse_host_port(address, DEFAULT_SENTINEL_PORT)
        return sentinels

    @model_validator(mode="after")
    def _settings_fit_mode(self) -> StoreSettings:
        if self.backend is StoreBackend.MEMORY:
            named = [name for name in (*_REDIS_ONLY, *_SENTINEL_ONLY) if getattr(self, name)]
            if self.mode is not StoreMode.STANDALONE:
                named.insert(0, "mode")
            if named:
                raise ValueError(f"{', '.join(named)}: only the redis backend reads these settings; set backend: redis or remove them")
            return self

        scheme = urllib.parse.urlsplit(self.url).scheme
        if self.mode is not StoreMode.STANDALONE and scheme == "unix":
            raise ValueError(f"mode {self.mode.value} needs a redis:// or rediss:// url, not unix://")
        if self.mode is StoreMode.SENTINEL:
            missing = [name for name in ("sentinel_master", "sentinels") if not getattr(self, name)]
            if missing:
                raise ValueError(f"mode sentinel needs {' and '.join(missing)}: the master's name and the HOST:PORT of its Sentinels")
            return self

        named = [name for name in _SENTINEL_ONLY if getattr(self, name)]
        if named:
            raise ValueError(f"{', '.join(named)}: only mode sentinel reads these settings, but mode is {self.mode.value}")
        if self.mode is StoreMode.CLUSTER and url_database(self.url) != 0:
            raise ValueError(f"Redis Cluster has only database 0, but the store url selects database {url_database(self.url)}")
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(address, DEFAULT_SENTINEL_PORT) for address in self.sentinels]

    @property
    def display_url(self) -> str:
        """Return `url` with its password replaced by ***, for messages and logs."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    @property
    def display_target(self) -> str:
        """Describe where the store is, without secrets: the mode, the URL or Sentinels, and where credentials come from."""
        if self.mode is StoreMode.SENTINEL:
            where = f"master {self.sentinel_master!r} through Sentinels {', '.join(self.sentinels)} ({self.display_url})"
        elif self.mode is StoreMode.CLUSTER:
            where = f"seed node {self.display_url}"
        else:
            where = self.display_url
        sources = [("username", self.username_env), ("password", self.password_env), ("Sentinel password", self.sentinel_password_env)]
        variables = [f"{credential} from ${name}" for credential, name in sources if name is not None]
        return ", ".join([where, *variables])


def parse_host_port(address: str, default_port: int) -> tuple[str, int]:
    """Split `HOST:PORT`, `HOST` or `[IPv6]:PORT`; raise ValueError for anything else."""
    parts = urllib.parse.urlsplit(f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.netloc != address or parts.username is not None:
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT, such as redis-sentinel:{default_port}")
    return parts.hostname, port if port is not None else default_port


def url_database(url: str) -> int:
    """Return the database number of a redis:// or rediss:// URL: its path or `?db=`, 0 when it names none."""
    parts = urllib.parse.urlsplit(url)
    number = parts.path.strip("/") or urllib.parse.parse_qs(parts.query).get("db", ["0"])[0]
    return int(number) if number.isdigit() else 0  # the client rejects a `?db=` that is not a number


class Webhook(_Strict):
    url: str = Field(pattern=r"^https?://")  # called with POST and a JSON event
    timeout_ms: float = Field(1000.0, gt=0)


class Tenancy(_Strict):
    time_zone: str = "UTC"
    # Called once per tenant, scope, window period and metric when a soft limit is first reached.
    soft_limit_webhook: Webhook | None = None
    identity: Identity = Field(default_factory=Identity)
    # A YAML file mapping tenant names to more `api_keys` entries (for a Kubernetes Secret);
    # the policy loader merges it into `tenants`.
    api_keys_file: str | None = Field(None, min_length=1)
    store: StoreSettings = Field(default_factory=StoreSettings)
    reservation_ttl_s: int = Field(900, gt=0)  # an unsettled reservation stops counting after this
    default_max_output_tokens: int = Field(4096, gt=0)  # output estimate when a request sets none
    tenants: dict[str, Tenant] = Field(default_factory=dict, min_length=1)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, Tenant]) -> dict[str, Tenant]:
        invalid = [name for name in tenants if not _TENANT_NAME.fullmatch(name)]
        if invalid:
            names = ", ".join(repr(name) for name in invalid)
            raise ValueError(
                f"invalid tenant name {names}: a name is 1 to 64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit, because it goes into headers and store keys"
            )
        return tenants

    @model_validator(mode="after")
    def _user_budgets_can_apply(self) -> Tenancy:
        identity = self.identity
        users_from_identity = identity.trusted_user_header is not None or (
            identity.jwt_payload_key is not None and identity.jwt_user_claim is not None
        )
        for name, tenant in self.tenants.items():
            if tenant.user_budgets and not users_from_identity and not any(key.user for key in tenant.api_keys):
                raise ValueError(
                    f"tenant {name!r} has user_budgets, but none of its callers has a user: give an API key a "
                    "`user:`, or set identity.trusted_user_header or identity.jwt_payload_key"
                )
        return self

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Europe/Berlin") from None
        return value

    @model_validator(mode="after")
    def _unique_keys(self) -> Tenancy:
        owners: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for key in tenant.api_keys:
                if key.sha256 in owners:
                    raise PydanticCustomError(DUPLICATE_API_KEY, duplicate_key_message(key.sha256, owners[key.sha256], name))
                owners[key.sha256] = name
        return self


DUPLICATE_API_KEY = "duplicate_api_key"  # the error type, which the policy loader reports with its line


def duplicate_key_message(digest: str, first: str, second: str) -> str:
    where = f"tenant {first!r} twice" if first == second else f"tenants {first!r} and {second!r}"
    return f"API key sha256 {digest[:12]}... is listed for {where}; each key must identify one tenant"


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)  # None: the input price


def _header_name(name: str) -> str:
    lowered = name.strip().lower()
    if not _HEADER_NAME.fullmatch(lowered):
        raise ValueError(f"invalid header name {name!r}")
    return lowered
