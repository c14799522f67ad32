"""Identify the tenant, and the user or key inside it, from an ext_authz CheckRequest.

Sources, in order:

1. a JWT payload that Envoy's jwt_authn filter put in the request's metadata, when
   `identity.jwt_payload_key` is set;
2. an API key in one of `identity.api_key_headers`, compared by its SHA-256 with the policy's keys;
3. a header that names the tenant, only when `identity.trusted_header` is set.

The first source that yields a tenant wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from extguard.config.tenancy import Tenancy


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    user: str | None
    source: str  # "jwt", "api_key" or "trusted_header", for logs and metrics
    key_header: str | None = None  # the header that carried the API key, when source is "api_key"


class UnknownCaller(Exception):
    """No source identified a configured tenant; `reason` is safe to log and to show (no key material)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Identifier:
    """Maps request headers and metadata to a `Caller` with the policy's tenancy settings."""

    def __init__(self, tenancy: Tenancy) -> None:
        self._tenancy = tenancy
        self._keys: dict[str, tuple[str, str | None]] = {
            key.sha256: (name, key.user) for name, tenant in tenancy.tenants.items() for key in tenant.api_keys
        }

    def identify(self, headers: Mapping[str, str], metadata: Any) -> Caller:
        """Return the caller, or raise UnknownCaller."""
        identity = self._tenancy.identity
        if identity.jwt_payload_key is not None:
            caller = self._from_jwt(metadata)
            if caller is not None:
                return caller

        presented = False
        for name in identity.api_key_headers:
            key = _api_key(headers.get(name, ""))
            if not key:
                continue
            presented = True
            found = self._keys.get(hashlib.sha256(key.encode("utf-8")).hexdigest())
            if found is not None:
                return Caller(found[0], found[1], "api_key", key_header=name)

        if identity.trusted_header is not None:
            tenant = headers.get(identity.trusted_header, "").strip()
            if tenant:
                if tenant not in self._tenancy.tenants:
                    raise UnknownCaller(f"tenant {tenant!r} from header {identity.trusted_header} is not configured")
                user = None
                if identity.trusted_user_header is not None:
                    user = headers.get(identity.trusted_user_header, "").strip() or None
                return Caller(tenant, user, "trusted_header")

        raise UnknownCaller("the API key is not valid" if presented else "no API key or tenant identity in the request")

    def _from_jwt(self, metadata: Any) -> Caller | None:
        identity = self._tenancy.identity
        namespace = metadata.filter_metadata.get(identity.jwt_metadata_namespace) if metadata is not None else None
        if namespace is None:
            return None
        fields = json_format.MessageToDict(namespace)
        payload = fields.get(identity.jwt_payload_key or "")
        if not isinstance(payload, dict):
            return None
        tenant = payload.get(identity.jwt_tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            return None
        if tenant not in self._tenancy.tenants:
            raise UnknownCaller(f"tenant {tenant!r} from the JWT claim {identity.jwt_tenant_claim} is not configured")
        user = payload.get(identity.jwt_user_claim) if identity.jwt_user_claim else None
        return Caller(tenant, user if isinstance(user, str) and user else None, "jwt")


def _api_key(value: str) -> str:
    """Return the key from "Bearer KEY" or a bare key; "" when the header is empty."""
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip()
    return value
