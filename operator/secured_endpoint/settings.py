"""Operator-wide settings: environment variables with the ``SEP_`` prefix, or an optional settings file.

The same names work as lower-case keys in a YAML/JSON file named by ``SEP_SETTINGS_FILE``; the
environment wins over the file. A bad value fails at start-up with the setting's name, not a traceback.
Redis (``SEP_REDIS_*``, SPEC §3) has its own model and loader, :class:`RedisSettings` and
:func:`load_redis_settings`: it is optional and holds credentials.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pydantic
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting is wrong; the message names it (and never echoes a password)."""


class OperatorSettings(BaseSettings):
    """Tunables of one operator replica. Defaults suit a cluster of up to ~10,000 endpoints."""

    model_config = SettingsConfigDict(env_prefix="SEP_", extra="ignore", frozen=True)

    refresh_concurrency: int = Field(default=32, ge=1, le=1024)
    """Token refreshes in flight at once (each is a token request plus target writes)."""

    kube_max_in_flight: int = Field(default=20, ge=1, le=200)
    """Kubernetes API requests in flight at once; the apiserver allows 200 mutating ones in total."""

    token_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    token_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)

    reactive_floor_seconds: float = Field(default=5.0, ge=0, le=3600)
    """Least time between two forced refreshes of one endpoint (annotation or gateway request)."""

    credentials_retry_seconds: float = Field(default=300.0, ge=5, le=86400)
    """Safety-net retry for a missing Secret; its creation normally triggers the retry at once."""

    startup_spread_seconds: float = Field(default=10.0, ge=0, le=600)
    """Refreshes already overdue at start-up are spread over this window instead of one burst."""

    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 disables it."""

    event_component: str = "secured-endpoint-operator"

    source_label_selector: str = ""
    """Watch only the Secrets and ConfigMaps carrying these labels (``key=value[,key=value]``), filtered by the
    apiserver; empty watches them all. The token Secrets get the same labels, so they stay in sight."""

    @field_validator("source_label_selector")
    @classmethod
    def _equality_selector(cls, value: str) -> str:
        return ",".join(f"{key}={label}" for key, label in parse_label_selector(value).items())

    @property
    def source_labels(self) -> dict[str, str]:
        """The labels of ``source_label_selector`` (empty: every Secret and ConfigMap is watched)."""
        return parse_label_selector(self.source_label_selector)


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_label_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value]`` (``==`` works too) as a dict; empty text gives an empty dict.

    Only equality: the operator must be able to put the same labels on the token Secrets it writes, which a
    set-based (``in``, ``notin``, ``!=``, ``!key``) requirement would not tell it.
    """
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, separator, value = item.partition("=")
        value = value.removeprefix("=")  # key==value
        key, value = key.strip(), value.strip()
        if not separator or key.endswith("!") or not value:
            raise ValueError(f"{item[:80]!r} is not key=value: only equality requirements are supported, since "
                             "the token Secrets must carry the same labels (e.g. secured-endpoint.io/credentials=true)")
        prefix, slash, name = key.rpartition("/")
        if not _LABEL_NAME.fullmatch(name) or (slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))):
            raise ValueError(f"{key[:80]!r} is not a valid label key")
        if len(value) > 63 or not _LABEL_NAME.fullmatch(value):
            raise ValueError(f"the value of {key!r} is not a valid label value")
        if labels.get(key, value) != value:
            raise ValueError(f"{key!r} is given twice with different values")
        labels[key] = value
    return labels


def load_settings(environ: dict[str, str] | None = None) -> OperatorSettings:
    """Read the settings file (if any) under the environment; raise SettingsError naming a bad one."""
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    path = env.get("SEP_SETTINGS_FILE")
    if path:
        file_values = _read_settings_file(Path(path))
    env_values = {
        key.removeprefix("SEP_").lower(): value
        for key, value in env.items()
        if key.startswith("SEP_") and key != "SEP_SETTINGS_FILE"
    }
    merged = {**file_values, **env_values}
    try:
        return OperatorSettings.model_validate({k: v for k, v in merged.items()
                                                if k in OperatorSettings.model_fields})
    except pydantic.ValidationError as exc:
        problems = [
            f"SEP_{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise SettingsError("invalid operator settings: " + "; ".join(problems)) from None


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"SEP_SETTINGS_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise SettingsError(f"SEP_SETTINGS_FILE: {path} is not valid {path.suffix or 'JSON'}: "
                            f"{type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"SEP_SETTINGS_FILE: {path} must hold a mapping of setting names to values")
    return {str(key).lower(): value for key, value in data.items()}


# -- Redis (SPEC §3) -------------------------------------------------------------------------------------
#
# A separate model and loader: Redis is optional, its settings are only looked at when one of URL, HOST or
# SENTINELS is given, and they carry credentials that must never end up in an error message or a repr (the
# password and the URL are SecretStr; messages name variables, never values that may hold a secret).

_REDIS_ENV_PREFIX = "SEP_REDIS_"
_REDIS_FILE_PREFIX = "redis_"
_URL_SCHEMES = ("redis", "rediss")


@dataclass(frozen=True)
class RedisConnection:
    """Where and how to reach the Redis server, with the URL and the discrete settings merged.

    ``host`` is None in Sentinel mode (the sentinels name the master); the rest applies either way.
    """

    host: str | None
    port: int
    username: str | None
    password: SecretStr | None = field(repr=False)
    db: int
    tls: bool


class RedisSettings(BaseSettings):
    """Operator-wide Redis connection settings (``SEP_REDIS_*``; see SPEC §3).

    Use :func:`load_redis_settings` to read them: it applies the settings file, reads
    ``SEP_REDIS_PASSWORD_FILE`` and turns every problem into a :class:`SettingsError` naming the variable.
    """

    model_config = SettingsConfigDict(env_prefix=_REDIS_ENV_PREFIX, extra="ignore", frozen=True)

    url: SecretStr | None = None
    """``redis://[user:pass@]host[:port][/db]`` or ``rediss://…``; a SecretStr since it may hold the password."""

    host: str | None = None
    port: int = Field(default=6379, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    """A file holding the password (a mounted Secret), read once at load; one trailing newline is dropped."""

    db: int = Field(default=0, ge=0, le=2**31 - 1)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    socket_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    sentinels: str | None = None
    """``host:port,host:port`` (``[v6addr]:port`` for IPv6); Sentinel mode when given."""

    sentinel_master: str | None = None
    key_prefix: str = Field(default="secured-endpoint", min_length=1, max_length=200, pattern=r"^\S+$")

    _connection: RedisConnection | None = PrivateAttr(default=None)
    _sentinel_addresses: tuple[tuple[str, int], ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _blank_means_unset(cls, data: Any) -> Any:
        # Deployment templates often render an unused variable as "" (SEP_REDIS_HOST=""): that means "not set",
        # not "a host named ''".
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if not (isinstance(value, str) and not value.strip())}
        url = data.get("url")
        url_text = url.get_secret_value() if isinstance(url, SecretStr) else url
        if isinstance(url_text, str) and url_text.strip().lower().startswith("rediss://"):
            data["tls"] = True  # rediss:// implies TLS, so `tls` always tells whether TLS is on
        return data

    @field_validator("port", mode="before")
    @classmethod
    def _port_is_no_service_link(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            # Kubernetes injects SEP_REDIS_PORT=tcp://10.0.0.1:6379 for a Service named "sep-redis".
            raise ValueError("must be a port number; a value like tcp://host:port comes from a Kubernetes Service "
                             "named sep-redis (set enableServiceLinks: false in the Pod spec, or rename it)")
        return value

    @field_validator("sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):  # a list in the settings file
            return ",".join(str(item) for item in value)
        return value

    @model_validator(mode="after")
    def _check(self) -> RedisSettings:
        """Cross-field rules; every message names the variables involved and never a secret value."""
        if self.host is not None and ("://" in self.host or "/" in self.host or any(c.isspace() for c in self.host)):
            raise ValueError("SEP_REDIS_HOST must be a bare host name or address (use SEP_REDIS_URL for a URL)")
        if self.url is not None and self.host is not None:
            raise ValueError("SEP_REDIS_URL and SEP_REDIS_HOST are both set: give one of them")
        if self.sentinels is not None and (self.url is not None or self.host is not None):
            raise ValueError("SEP_REDIS_SENTINELS is set together with SEP_REDIS_URL or SEP_REDIS_HOST: in Sentinel "
                             "mode the sentinels name the server, give only SEP_REDIS_SENTINELS and "
                             "SEP_REDIS_SENTINEL_MASTER")
        if self.sentinels is not None and self.sentinel_master is None:
            raise ValueError("SEP_REDIS_SENTINELS is set but SEP_REDIS_SENTINEL_MASTER is not: name the master")
        if self.sentinel_master is not None and self.sentinels is None:
            raise ValueError("SEP_REDIS_SENTINEL_MASTER is set but SEP_REDIS_SENTINELS is not: list the sentinels")
        if self.sentinel_master is not None and any(c.isspace() for c in self.sentinel_master):
            raise ValueError("SEP_REDIS_SENTINEL_MASTER must not contain whitespace")
        if self.password is not None and self.password_file is not None:
            raise ValueError("SEP_REDIS_PASSWORD and SEP_REDIS_PASSWORD_FILE are both set: give one of them")
        if self.sentinels is not None:
            self._sentinel_addresses = _parse_sentinels(self.sentinels)

        password = self.password
        if self.password_file is not None:
            password = SecretStr(_read_password_file(self.password_file))
        connection = RedisConnection(host=self.host, port=self.port, username=self.username, password=password,
                                     db=self.db, tls=self.tls)
        if self.url is not None:
            connection = self._merge_url(self.url.get_secret_value(), connection)

        if self.cert_file is not None and self.key_file is None:
            raise ValueError("SEP_REDIS_CERT_FILE is set but SEP_REDIS_KEY_FILE is not: a client certificate needs "
                             "its key")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("SEP_REDIS_KEY_FILE is set but SEP_REDIS_CERT_FILE is not: a client key needs its "
                             "certificate")
        tls_files = {"SEP_REDIS_CA_FILE": self.ca_file, "SEP_REDIS_CERT_FILE": self.cert_file,
                     "SEP_REDIS_KEY_FILE": self.key_file}
        for variable, path in tls_files.items():
            if path is None:
                continue
            if not connection.tls:
                raise ValueError(f"{variable} is set but TLS is off: set SEP_REDIS_TLS=true or use a rediss:// URL")
            if not path.is_file():
                raise ValueError(f"{variable}: {path} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise ValueError(f"{variable}: {path} is not readable")
        self._connection = connection
        return self

    def _merge_url(self, url: str, discrete: RedisConnection) -> RedisConnection:
        """The URL's parts, with SEP_REDIS_USERNAME/PASSWORD(_FILE)/PORT/DB filling gaps; disagreement is an error."""
        scheme, separator, _ = url.partition("://")
        if not separator or scheme.lower() not in _URL_SCHEMES:
            shown = scheme.lower() if separator and len(scheme) <= 16 else "(none)"
            raise ValueError(f"SEP_REDIS_URL must start with redis:// or rediss:// (scheme given: {shown})")
        try:
            parts = urlsplit(url)
            url_port = parts.port
        except ValueError:
            raise ValueError("SEP_REDIS_URL is not a valid URL (check the host and the port)") from None
        if not parts.hostname:
            raise ValueError("SEP_REDIS_URL names no host")
        if parts.query or parts.fragment:
            raise ValueError("SEP_REDIS_URL must not have a query or fragment: use the SEP_REDIS_* variables for "
                             "timeouts and TLS files")
        url_db: int | None = None
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError("SEP_REDIS_URL: the path must be a database index (redis://host:6379/3)")
            url_db = int(path)
        url_username = unquote(parts.username) if parts.username else None
        url_password = SecretStr(unquote(parts.password)) if parts.password else None
        fields_set = self.model_fields_set
        if url_username is not None and discrete.username is not None and url_username != discrete.username:
            raise ValueError("SEP_REDIS_USERNAME differs from the user in SEP_REDIS_URL: give it once")
        if url_password is not None and discrete.password is not None:
            raise ValueError("SEP_REDIS_URL holds a password and SEP_REDIS_PASSWORD or SEP_REDIS_PASSWORD_FILE is "
                             "set too: give it once")
        port = url_port if url_port is not None else discrete.port
        if url_port is not None and "port" in fields_set and url_port != discrete.port:
            raise ValueError("SEP_REDIS_PORT differs from the port in SEP_REDIS_URL: give it once")
        if url_db is not None and "db" in fields_set and url_db != discrete.db:
            raise ValueError("SEP_REDIS_DB differs from the database in SEP_REDIS_URL: give it once")
        return RedisConnection(
            host=parts.hostname, port=port, username=url_username or discrete.username,
            password=url_password or discrete.password, db=url_db if url_db is not None else discrete.db,
            tls=discrete.tls or scheme.lower() == "rediss",  # rediss:// implies TLS
        )

    @property
    def configured(self) -> bool:
        """Is Redis on at all (a URL, a host or sentinels given)?"""
        return self.url is not None or self.host is not None or self.sentinels is not None

    @property
    def connection(self) -> RedisConnection:
        """The merged connection parameters (URL or discrete settings, password file already read)."""
        if self._connection is None:  # only when validation was bypassed (model_construct)
            raise SettingsError("Redis settings were not validated")
        return self._connection

    @property
    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        """The parsed ``SEP_REDIS_SENTINELS``; empty unless in Sentinel mode."""
        return self._sentinel_addresses

    def describe(self) -> str:
        """Where Redis is, for logs and messages: never a password, never the URL as given."""
        connection = self.connection
        suffix = f" db {connection.db}" + (" (TLS)" if connection.tls else "")
        if self.sentinels is not None:
            addresses = ",".join(_host_port(host, port) for host, port in self._sentinel_addresses)
            return f"Redis master {self.sentinel_master!r} via sentinels {addresses}{suffix}"
        return f"Redis at {_host_port(connection.host or '?', connection.port)}{suffix}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    addresses: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            port_text = rest[1:] if bracket and rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":")
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535 \
                or any(c.isspace() or c in "/@" for c in host):
            raise ValueError(f"SEP_REDIS_SENTINELS: {item[:64]!r} is not host:port (expected "
                             "\"host:port,host:port\")")
        addresses.append((host, int(port_text)))
    if not addresses:
        raise ValueError("SEP_REDIS_SENTINELS lists no sentinel (expected \"host:port,host:port\")")
    return tuple(addresses)


def _read_password_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"SEP_REDIS_PASSWORD_FILE: cannot read {path}: {exc.strerror or type(exc).__name__}"
                         ) from None
    except UnicodeDecodeError:
        raise ValueError(f"SEP_REDIS_PASSWORD_FILE: {path} is not UTF-8 text") from None
    # a mounted Secret written with `echo` ends in a newline that is not part of the password
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"SEP_REDIS_PASSWORD_FILE: {path} is empty")
    return password


def load_redis_settings(environ: dict[str, str] | None = None) -> RedisSettings:
    """Read the Redis settings like :func:`load_settings`: ``SEP_REDIS_*`` variables over ``redis_*`` keys of
    the ``SEP_SETTINGS_FILE``. Raise SettingsError naming a bad one; the message never holds a password."""
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    path = env.get("SEP_SETTINGS_FILE")
    if path:
        file_values = {
            key.removeprefix(_REDIS_FILE_PREFIX): value
            for key, value in _read_settings_file(Path(path)).items()
            if key.startswith(_REDIS_FILE_PREFIX)
        }
    env_values = {
        key.removeprefix(_REDIS_ENV_PREFIX).lower(): value
        for key, value in env.items()
        if key.startswith(_REDIS_ENV_PREFIX)
    }
    merged = {**file_values, **env_values}
    try:
        return RedisSettings.model_validate({k: v for k, v in merged.items() if k in RedisSettings.model_fields})
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                variable = _REDIS_ENV_PREFIX + "_".join(str(part) for part in err["loc"]).upper()
                message = f"{variable}: {message}"
            problems.append(message)
        raise SettingsError("invalid Redis settings: " + "; ".join(problems)) from None
