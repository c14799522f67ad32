"""Build the budget store's Redis client from `tenancy.store`: one server, a Redis Cluster, or Sentinel.

Credentials come from the store URL, or from the environment variables that `username_env`,
`password_env` and `sentinel_password_env` name. A named variable replaces the URL's value.
No credential value goes into a message or a log line.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel

from extguard.config.tenancy import StoreMode, StoreSettings

RedisClient = redis.Redis | RedisCluster


class StoreCredentialError(Exception):
    """An environment variable that the store settings name for a credential is unset or empty."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Redis credentials, resolved from the URL and the environment. The repr hides them."""

    username: str | None
    password: str | None
    sentinel_password: str | None

    def __repr__(self) -> str:
        return "Credentials(***)"


def read_credentials(settings: StoreSettings, environ: Mapping[str, str]) -> Credentials:
    """Return the credentials for `settings`. Raise StoreCredentialError for a named variable that is unset or empty."""
    parts = urllib.parse.urlsplit(settings.url)
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if settings.username_env is not None:
        username = _variable(environ, settings.username_env, "username_env", "username")
    if settings.password_env is not None:
        password = _variable(environ, settings.password_env, "password_env", "password")
    sentinel_password = None
    if settings.sentinel_password_env is not None:
        sentinel_password = _variable(environ, settings.sentinel_password_env, "sentinel_password_env", "Sentinel password")
    return Credentials(username, password, sentinel_password)


def _variable(environ: Mapping[str, str], name: str, setting: str, credential: str) -> str:
    value = environ.get(name)
    if not value:
        state = "not set" if value is None else "empty"
        raise StoreCredentialError(
            f"environment variable {name} (tenancy.store.{setting}) is {state}, so extguard cannot authenticate to Redis. "
            f"Set it to the Redis {credential}."
        )
    return value


def connect(settings: StoreSettings, environ: Mapping[str, str] | None = None) -> tuple[RedisClient, Sentinel | None]:
    """Build the client for `settings.mode`, and in sentinel mode the Sentinel manager, which the caller closes too.

    Nothing connects yet, because the first command does. Raise StoreCredentialError as read_credentials does.
    """
    credentials = read_credentials(settings, os.environ if environ is None else environ)
    url = _without_credentials(settings.url)
    timeout_s = settings.timeout_ms / 1000
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "username": credentials.username,
        "password": credentials.password,
    }
    if settings.mode is StoreMode.STANDALONE:
        return redis.Redis.from_url(url, **options), None
    if settings.mode is StoreMode.CLUSTER:
        return RedisCluster.from_url(url, **options), None

    # Sentinel: the URL's host and port are not used; its TLS options and database number are.
    url_options = parse_url(url)
    url_options.pop("host", None)
    url_options.pop("port", None)
    tls_options: dict[str, Any] = {}
    if url_options.pop("connection_class", None) is SSLConnection:
        tls_options = {"ssl": True, **{key: value for key, value in url_options.items() if key.startswith("ssl_")}}
    # NOTE: with rediss:// the Sentinels are also reached over TLS; no test covers TLS yet.
    sentinel_options = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "password": credentials.sentinel_password,
        **tls_options,
    }
    sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_options)
    assert settings.sentinel_master is not None  # StoreSettings requires it in sentinel mode
    client = sentinel.master_for(settings.sentinel_master, **{**url_options, **options, **tls_options})
    return client, sentinel


def _without_credentials(url: str) -> str:
    """Return `url` without its user info, because the client gets credentials as arguments."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
