"""Operator-wide settings: ``SEP_*`` environment variables over an optional settings file, over defaults.

One loader, :func:`load`, reads both models through pydantic-settings' own sources, in this order:

1. the environment: ``SEP_`` + the field name for :class:`OperatorSettings`, ``SEP_REDIS_`` + the field name
   for :class:`RedisSettings`;
2. the file named by ``SEP_SETTINGS_FILE`` (YAML for ``.yaml``/``.yml``, else JSON): a mapping whose keys are
   the variables' names without ``SEP_``, in lower case (``refresh_concurrency``, ``redis_host``);
3. the defaults.

An empty value — ``SEP_REDIS_HOST=""`` from a Deployment template, or a key without a value in the file —
means unset. A bad value fails at start-up with one line naming the variable (:class:`SettingsError`), never
with a traceback and never echoing a password. Redis has its own model because it is optional and holds
credentials. :func:`load_settings` and :func:`load_redis_settings` are the two entry points; both take an
``environ`` mapping instead of the process's environment (tests).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import pydantic
import yaml
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SETTINGS_FILE_VARIABLE = "SEP_SETTINGS_FILE"
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a Pod finds its own namespace (the kubelet mounts it with the service-account token)."""


class SettingsError(ValueError):
    """A setting is wrong; the one-line message names it (``SEP_X: …``) and never echoes a password."""


# -- the loader ----------------------------------------------------------------------------------------------

# The environment the sources read during one load(): a test's mapping, or None for the process's. A context
# variable rather than an argument because pydantic-settings builds the sources inside the model's __init__.
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("secured_endpoint_settings_environ", default=None)


class _Settings(BaseSettings):
    """What both models share: frozen, unknown names ignored, empty means unset, and where the values come from."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    settings_title: ClassVar[str]
    """How an error message introduces this model (``invalid <title>: …``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments (tests), then the environment, then the settings file; no .env file and no secrets
        # directory. Both environment and file are taken from the mapping load() was given.
        environ = _environ.get()
        if environ is None:
            environ = os.environ
        return init_settings, _EnvironSource(settings_cls, environ), _SettingsFileSource(settings_cls, environ)


_S = TypeVar("_S", bound=_Settings)


def load(model: type[_S], environ: Mapping[str, str] | None = None) -> _S:
    """Read ``model`` from ``environ`` (default: the process's environment) and the settings file it names.

    Raises :class:`SettingsError` with every problem on one line, each naming its variable.
    """
    token = _environ.set(os.environ if environ is None else environ)
    try:
        return model()
    except pydantic.ValidationError as exc:
        problems = "; ".join(_problems(model, exc))
        raise SettingsError(_one_line(f"invalid {model.settings_title}: {problems}")) from None
    finally:
        _environ.reset(token)


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """The operator's settings (``SEP_*``); see :func:`load`."""
    return load(OperatorSettings, environ)


def load_redis_settings(environ: Mapping[str, str] | None = None) -> RedisSettings:
    """The Redis settings (``SEP_REDIS_*``, ``redis_*`` keys in the settings file); see :func:`load`."""
    return load(RedisSettings, environ)


def _problems(model: type[_Settings], exc: pydantic.ValidationError) -> Iterator[str]:
    # include_input=False: the value given may be a password. A field's error gets its variable's name; a
    # cross-field error (no location) already names the variables it is about.
    prefix = model.model_config.get("env_prefix", "")
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        message = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            variable = prefix + "_".join(str(part) for part in err["loc"]).upper()
            message = f"{variable}: {message}"
        yield message


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (the process's environment or a test's)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # before super().__init__(), which loads the variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # env_ignore_empty drops ""; a template's "  " is just as unset
        return {
            name if self.case_sensitive else name.lower(): value
            for name, value in self._environ.items()
            if not (self.env_ignore_empty and not value.strip())
        }


class _SettingsFileSource(InitSettingsSource):
    """The mapping in ``SEP_SETTINGS_FILE``, restricted to the model's own keys.

    A key is its variable's name without ``SEP_`` in lower case, so the Redis model (``SEP_REDIS_``) takes the
    ``redis_*`` keys without ``redis_``, and the operator's model (``SEP_``) the keys that name its fields.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        prefix = settings_cls.model_config.get("env_prefix", "").lower().removeprefix("sep_")
        values: dict[str, Any] = {}
        path = environ.get(SETTINGS_FILE_VARIABLE, "").strip()
        if path:
            for key, value in read_settings_file(Path(path)).items():
                name = key.removeprefix(prefix)
                if key.startswith(prefix) and name in settings_cls.model_fields and not _blank(value):
                    values[name] = value
        super().__init__(settings_cls, init_kwargs=values)


def _blank(value: Any) -> bool:
    """An empty string, only spaces, or no value at all (``key:`` in YAML): unset, like an empty variable."""
    return value is None or (isinstance(value, str) and not value.strip())


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings file as a mapping with lower-case keys; SettingsError naming ``SEP_SETTINGS_FILE`` if bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: cannot read {path}: {exc.strerror or type(exc).__name__}"
                            ) from None
    except UnicodeDecodeError:
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        # only the error's type: the parser's message quotes the file, which may hold a password
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: {path} is not valid {path.suffix or 'JSON'}: "
                            f"{type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: {path} must hold a mapping of setting names to values")
    return {str(key).lower(): value for key, value in data.items()}


# -- the operator ----------------------------------------------------------------------------------------------

_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LEADER_ELECTION_JITTER = 1.2  # client-go's JitterFactor: a follower waits 1 to 2.2 retry periods


class OperatorSettings(_Settings):
    """The operator's own settings (``SEP_*``): the tunables of one operator replica.

    Not to be confused with ``kopf.OperatorSettings``, kopf's settings object, which the kopf wiring fills in
    at start-up. Defaults suit a cluster of up to ~10,000 endpoints.
    """

    model_config = SettingsConfigDict(env_prefix="SEP_")
    settings_title: ClassVar[str] = "operator settings"

    refresh_concurrency: int = Field(default=32, ge=1, le=1024)
    """Token refreshes in flight at once (each is a token request plus target writes)."""

    kube_max_in_flight: int = Field(default=20, ge=1, le=200)
    """Kubernetes API requests in flight at once; the apiserver allows 200 mutating ones in total."""

    token_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """The whole token request, from connecting to the last byte of the answer."""

    token_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    """Connecting to the token endpoint (or its proxy), TLS handshake included."""

    reactive_floor_seconds: float = Field(default=5.0, ge=0, le=3600)
    """Least time between two forced refreshes of one endpoint (annotation or gateway request)."""

    credentials_retry_seconds: float = Field(default=300.0, ge=5, le=86400)
    """Safety-net retry for a missing Secret; its creation normally triggers the retry at once."""

    startup_spread_seconds: float = Field(default=10.0, ge=0, le=600)
    """Refreshes already overdue at start-up are spread over this window instead of one burst."""

    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 disables it."""

    health_port: int = Field(default=0, ge=0, le=65535)
    """Port of the ``/livez`` and ``/readyz`` probes (the manifests use 8081); 0 disables them."""

    event_component: str = "secured-endpoint-operator"
    """The ``source.component`` of the Events the operator posts."""

    source_label_selector: str = ""
    """Watch only the Secrets and ConfigMaps carrying these labels (``key=value[,key=value]``), filtered by the
    apiserver; empty watches them all. The token Secrets get the same labels, so they stay in sight."""

    log_format: Literal["text", "json"] = "text"
    """``text``: one plain line per record; ``json``: one JSON object per record (for log collectors)."""

    # Leader election, with client-go's defaults and rules (k8s.io/client-go/tools/leaderelection): replicas
    # compete for one coordination.k8s.io Lease, and only its holder refreshes tokens.

    leader_election: bool = True
    """Elect one active replica through a Lease; false: this replica acts alone (run exactly one)."""

    lease_name: str = "secured-endpoint-operator"
    """Name of the Lease the replicas compete for."""

    lease_namespace: str = ""
    """Namespace of the Lease; empty: the operator's own (see :meth:`lease_namespace_or_own`)."""

    lease_duration_seconds: float = Field(default=15.0, gt=0, le=3600)
    """How long a Lease not renewed stays held: the longest a stand-by replica waits for a leader that died."""

    renew_deadline_seconds: float = Field(default=10.0, gt=0, le=3600)
    """How long the leader keeps failing to renew before it stops acting as the leader."""

    retry_period_seconds: float = Field(default=2.0, gt=0, le=3600)
    """Time between two renewals of the Lease; a follower tries every 1 to 2.2 of these (client-go's jitter)."""

    @field_validator("source_label_selector")
    @classmethod
    def _equality_selector(cls, value: str) -> str:
        return ",".join(f"{key}={label}" for key, label in parse_label_selector(value).items())

    @field_validator("lease_name")
    @classmethod
    def _lease_name(cls, value: str) -> str:
        if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
            raise ValueError("must be a Kubernetes object name: lower-case letters, digits, '-' and '.', starting "
                             "and ending with a letter or digit, at most 253 characters")
        return value

    @field_validator("lease_namespace")
    @classmethod
    def _lease_namespace(cls, value: str) -> str:
        if value and not _DNS_LABEL.fullmatch(value):
            raise ValueError("must be a namespace name: lower-case letters, digits and '-', starting and ending "
                             "with a letter or digit, at most 63 characters (or empty for the operator's own)")
        return value

    @model_validator(mode="after")
    def _lease_timing(self) -> OperatorSettings:
        # client-go refuses these too: a leader must notice it cannot renew before its Lease runs out, and must
        # have time for more than one (jittered) retry before it gives up
        problems = []
        lease, renew, retry = self.lease_duration_seconds, self.renew_deadline_seconds, self.retry_period_seconds
        if lease <= renew:
            problems.append(f"SEP_LEASE_DURATION_SECONDS ({lease:g}) must be greater than "
                            f"SEP_RENEW_DEADLINE_SECONDS ({renew:g})")
        if renew <= _LEADER_ELECTION_JITTER * retry:
            problems.append(f"SEP_RENEW_DEADLINE_SECONDS ({renew:g}) must be greater than "
                            f"{_LEADER_ELECTION_JITTER:g} times SEP_RETRY_PERIOD_SECONDS ({retry:g})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def source_labels(self) -> dict[str, str]:
        """The labels of ``source_label_selector`` (empty: every Secret and ConfigMap is watched)."""
        return parse_label_selector(self.source_label_selector)

    def lease_namespace_or_own(self, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE) -> str:
        """``lease_namespace``, or if empty the operator's own namespace (from its service account), else
        ``default`` (outside a Pod, e.g. run from a laptop)."""
        if self.lease_namespace:
            return self.lease_namespace
        try:
            own = namespace_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            own = ""
        return own if _DNS_LABEL.fullmatch(own) else "default"


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


# -- Redis ---------------------------------------------------------------------------------------------------
#
# A separate model: Redis is optional, its settings are only looked at when one of URL, HOST or SENTINELS is
# given (CLUSTER makes URL/HOST a seed node), and they carry credentials that must never end up in an error
# message or a repr (the passwords and the URL are SecretStr; messages name variables, never values that may
# hold a secret).

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


@dataclass(frozen=True)
class SentinelCredentials:
    """How to authenticate to the sentinels themselves (not to the Redis server they name); None: no AUTH."""

    username: str | None
    password: SecretStr | None = field(repr=False)


class RedisSettings(_Settings):
    """Operator-wide Redis connection settings (``SEP_REDIS_*``, or ``redis_*`` keys in the settings file).

    Read them with :func:`load_redis_settings`, which turns every problem into a :class:`SettingsError` naming
    the variable. Validation reads the password files, and merges the URL with the discrete settings into
    :attr:`connection`.
    """

    model_config = SettingsConfigDict(env_prefix="SEP_REDIS_")
    settings_title: ClassVar[str] = "Redis settings"

    url: SecretStr | None = None
    """``redis://[user:pass@]host[:port][/db]`` or ``rediss://…``; a SecretStr since it may hold the password."""

    host: str | None = None
    """The Redis server's host name or address (instead of a URL); Redis is off without URL, host or sentinels."""

    port: int = Field(default=6379, ge=1, le=65535)
    """The server's port; a URL's own port wins (and must agree if both are given)."""

    username: str | None = None
    """The ACL user (Redis 6+); none: the default user."""

    password: SecretStr | None = None
    """The server's password (AUTH); or in the URL, or in :attr:`password_file`."""

    password_file: Path | None = None
    """A file holding the password (a mounted Secret), read once at load; one trailing newline is dropped."""

    db: int = Field(default=0, ge=0, le=2**31 - 1)
    """The database index."""

    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """Opening a connection to Redis or a sentinel, TLS handshake included."""

    socket_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """Waiting for one answer on an open connection."""

    tls: bool = False
    """TLS to Redis (and to the sentinels), verifying the server's certificate and host name."""

    ca_file: Path | None = None
    """PEM CA bundle to verify the server with (TLS only); none: the system's CAs."""

    cert_file: Path | None = None
    """PEM client certificate (TLS only), with :attr:`key_file`."""

    key_file: Path | None = None
    """PEM key of :attr:`cert_file`."""

    cluster: bool = False
    """Redis Cluster mode: :attr:`url` or :attr:`host`/:attr:`port` is a seed node (a Service in front of the
    nodes does well), the rest of the cluster is discovered from it; keys carry a hash tag (docs/contract.md §3.2)."""

    sentinels: str | None = None
    """``host:port,host:port`` (``[v6addr]:port`` for IPv6); Sentinel mode when given."""

    sentinel_master: str | None = None
    """The name the sentinels know the master by (Sentinel mode)."""

    sentinel_username: str | None = None
    """The ACL user for the sentinels themselves (Sentinel mode); the Redis server's is :attr:`username`."""

    sentinel_password: SecretStr | None = None
    """The sentinels' own password (their ``requirepass``), if they require one (Sentinel mode)."""

    sentinel_password_file: Path | None = None
    """A file holding the sentinels' password, read like :attr:`password_file`."""

    key_prefix: str = Field(default="secured-endpoint", min_length=1, max_length=200, pattern=r"^\S+$")
    """The first part of every key and channel name (``<prefix>:<namespace>:<name>``)."""

    _connection: RedisConnection | None = PrivateAttr(default=None)
    _sentinel_addresses: tuple[tuple[str, int], ...] = PrivateAttr(default=())
    _sentinel_credentials: SentinelCredentials = PrivateAttr(default=SentinelCredentials(None, None))

    @model_validator(mode="before")
    @classmethod
    def _rediss_means_tls(cls, data: Any) -> Any:
        # so that `tls` always tells whether TLS is on
        if not isinstance(data, dict):
            return data
        url = data.get("url")
        url_text = url.get_secret_value() if isinstance(url, SecretStr) else url
        if isinstance(url_text, str) and url_text.strip().lower().startswith("rediss://"):
            data = {**data, "tls": True}
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
        if self.cluster and self.sentinels is not None:
            raise ValueError("SEP_REDIS_CLUSTER and SEP_REDIS_SENTINELS are both set: a Redis Cluster fails over by "
                             "itself, give SEP_REDIS_CLUSTER with SEP_REDIS_URL or SEP_REDIS_HOST (a seed node)")
        if self.cluster and self.url is None and self.host is None:
            raise ValueError("SEP_REDIS_CLUSTER is set but neither SEP_REDIS_URL nor SEP_REDIS_HOST: name a seed node")
        if self.cluster and ("{" in self.key_prefix or "}" in self.key_prefix):
            raise ValueError("SEP_REDIS_KEY_PREFIX must not contain { or } in Redis Cluster mode: the keys' hash tag "
                             "is the braces after the prefix")
        if self.sentinels is not None and self.sentinel_master is None:
            raise ValueError("SEP_REDIS_SENTINELS is set but SEP_REDIS_SENTINEL_MASTER is not: name the master")
        if self.sentinel_master is not None and self.sentinels is None:
            raise ValueError("SEP_REDIS_SENTINEL_MASTER is set but SEP_REDIS_SENTINELS is not: list the sentinels")
        if self.sentinel_master is not None and any(c.isspace() for c in self.sentinel_master):
            raise ValueError("SEP_REDIS_SENTINEL_MASTER must not contain whitespace")
        if self.password is not None and self.password_file is not None:
            raise ValueError("SEP_REDIS_PASSWORD and SEP_REDIS_PASSWORD_FILE are both set: give one of them")
        if self.sentinel_password is not None and self.sentinel_password_file is not None:
            raise ValueError("SEP_REDIS_SENTINEL_PASSWORD and SEP_REDIS_SENTINEL_PASSWORD_FILE are both set: give "
                             "one of them")
        sentinel_auth = {"SEP_REDIS_SENTINEL_USERNAME": self.sentinel_username,
                         "SEP_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
                         "SEP_REDIS_SENTINEL_PASSWORD_FILE": self.sentinel_password_file}
        given = [variable for variable, value in sentinel_auth.items() if value is not None]
        if given and self.sentinels is None:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
                             "SEP_REDIS_SENTINELS is not: credentials for the sentinels apply only in Sentinel mode")
        if self.sentinels is not None:
            self._sentinel_addresses = _parse_sentinels(self.sentinels)

        password = self.password
        if self.password_file is not None:
            password = SecretStr(_read_password_file(self.password_file, "SEP_REDIS_PASSWORD_FILE"))
        sentinel_password = self.sentinel_password
        if self.sentinel_password_file is not None:
            sentinel_password = SecretStr(_read_password_file(self.sentinel_password_file,
                                                               "SEP_REDIS_SENTINEL_PASSWORD_FILE"))
        self._sentinel_credentials = SentinelCredentials(username=self.sentinel_username, password=sentinel_password)
        connection = RedisConnection(host=self.host, port=self.port, username=self.username, password=password,
                                     db=self.db, tls=self.tls)
        if self.url is not None:
            connection = self._merge_url(self.url.get_secret_value(), connection)
        if self.cluster and connection.db != 0:
            raise ValueError("SEP_REDIS_DB (or the URL's database) must be 0 in Redis Cluster mode: a cluster has "
                             "only database 0")

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

    @property
    def sentinel_credentials(self) -> SentinelCredentials:
        """What to authenticate to the sentinels with (password file already read); both None: no AUTH."""
        return self._sentinel_credentials

    def describe(self) -> str:
        """Where Redis is, for logs and messages: never a password, never the URL as given."""
        connection = self.connection
        suffix = f" db {connection.db}" + (" (TLS)" if connection.tls else "")
        if self.sentinels is not None:
            addresses = ",".join(_host_port(host, port) for host, port in self._sentinel_addresses)
            return f"Redis master {self.sentinel_master!r} via sentinels {addresses}{suffix}"
        if self.cluster:
            tls = " (TLS)" if connection.tls else ""
            return f"Redis Cluster via {_host_port(connection.host or '?', connection.port)}{tls}"
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


def _read_password_file(path: Path, variable: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{variable}: {path} is not UTF-8 text") from None
    # a mounted Secret written with `echo` ends in a newline that is not part of the password
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"{variable}: {path} is empty")
    return password
