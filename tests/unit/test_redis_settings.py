"""Redis settings (``secured_endpoint.settings.load_redis_settings``, docs/contract.md §3).

Cases:
- nothing set → not configured, the defaults (port 6379, db 0, timeouts 5/5, no TLS, prefix secured-endpoint,
  no sentinel credentials); blank values ("" or spaces from a template, empty or null in the file) count as
  unset; the operator's own settings ignore SEP_REDIS_*.
- every variable through the environment and through the settings file (a table covering every field);
  discrete variables parsed (host, port, username, password as SecretStr, db, timeouts, TLS + files, prefix);
  repr and describe() never show the password.
- URL: parts merged (user, percent-encoded password, port, db); rediss:// turns TLS on; a password may come from
  SEP_REDIS_PASSWORD(_FILE) when the URL has none; a repeated value that agrees is fine.
- password file: read at load, one trailing newline (LF or CRLF) dropped, nothing else; missing, unreadable,
  a directory or empty → SettingsError naming SEP_REDIS_PASSWORD_FILE.
- settings file: redis_* keys (JSON and YAML), the environment wins, sentinels as a YAML list.
- Cluster: SEP_REDIS_CLUSTER with the URL or host as the seed node; describe() says so; refused without a seed,
  with sentinels, with a database other than 0, or with braces in the prefix (they would break the hash tag).
- Sentinel: "host:port,host:port" (IPv6 in brackets, spaces tolerated) parsed; describe() names master and
  sentinels. Credentials for the sentinels themselves (username, password or password file, from the
  environment or the file) are exposed apart from the server's; both password sources, or any of them
  outside Sentinel mode, refused naming the variables; an unreadable sentinel password file named.
- every cross-field and value error names its variable (table), and with a password set — discretely, in the
  URL, in a file, or as the sentinels' password — no message ever contains it; several problems are reported
  together.
- SEP_REDIS_PORT=tcp://… (a Kubernetes service link) gets a hint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from secured_endpoint.settings import (
    RedisSettings,
    SentinelCredentials,
    SettingsError,
    load_redis_settings,
    load_settings,
)

PASSWORD = "Pa55-w0rd:with@odd/chars%"
PASSWORD_IN_URL = "Pa55-w0rd%3Awith%40odd%2Fchars%25"  # PASSWORD, percent-encoded


def load(**env: str) -> RedisSettings:
    return load_redis_settings({f"SEP_REDIS_{key.upper()}": value for key, value in env.items()})


def error_of(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_redis_settings(env)
    return str(caught.value)


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n")
    return path


# -- defaults and discrete variables ---------------------------------------------------------------------


def test_nothing_set_means_redis_off_with_the_defaults() -> None:
    settings = load_redis_settings({})
    assert not settings.configured
    assert (settings.port, settings.db, settings.tls, settings.key_prefix) == (6379, 0, False, "secured-endpoint")
    assert (settings.connect_timeout_seconds, settings.socket_timeout_seconds) == (5.0, 5.0)
    assert settings.sentinel_addresses == ()
    assert settings.sentinel_credentials == SentinelCredentials(username=None, password=None)
    assert settings.model_fields_set == set()


def test_blank_values_count_as_unset() -> None:
    settings = load(host="", url="  ", password="", sentinels="", sentinel_master="", ca_file="", db="",
                    port=" ", tls="", sentinel_password="", sentinel_username=" ", sentinel_password_file="")
    assert not settings.configured
    assert settings.connection.password is None
    assert settings.model_fields_set == set()


def test_blank_file_values_count_as_unset(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("redis_host: ''\nredis_url:\nredis_port: '  '\nredis_password: null\n")
    settings = load_redis_settings({"SEP_SETTINGS_FILE": str(path)})
    assert not settings.configured
    assert settings.model_fields_set == set()


# -- every variable, through the environment and through the file --------------------------------------------


def _every_variable(tmp_path: Path, pem: Path) -> list[tuple[str, str, Any, dict[str, str]]]:
    """Field, the value given, the value expected (secrets unwrapped), other settings it needs."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("cert")
    key.write_text("key")
    host = {"host": "redis"}
    sentinel = {"sentinels": "s1:26379", "sentinel_master": "mymaster"}
    return [
        ("url", "redis://redis:6380/1", "redis://redis:6380/1", {}),
        ("host", "redis.cache.svc", "redis.cache.svc", {}),
        ("port", "6380", 6380, host),
        ("username", "operator", "operator", host),
        ("password", PASSWORD, PASSWORD, host),
        ("password_file", str(password_file), password_file, host),
        ("db", "7", 7, host),
        ("connect_timeout_seconds", "1.5", 1.5, host),
        ("socket_timeout_seconds", "2", 2.0, host),
        ("tls", "true", True, host),
        ("ca_file", str(pem), pem, {**host, "tls": "true"}),
        ("cert_file", str(cert), cert, {**host, "tls": "true", "key_file": str(key)}),
        ("key_file", str(key), key, {**host, "tls": "true", "cert_file": str(cert)}),
        ("sentinels", "s1:26379,s2:26380", "s1:26379,s2:26380", {"sentinel_master": "mymaster"}),
        ("sentinel_master", "mymaster", "mymaster", {"sentinels": "s1:26379"}),
        ("sentinel_username", "sentinel-user", "sentinel-user", sentinel),
        ("sentinel_password", PASSWORD, PASSWORD, sentinel),
        ("sentinel_password_file", str(password_file), password_file, sentinel),
        ("key_prefix", "gw", "gw", host),
        ("cluster", "true", True, host),
    ]


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_the_table_covers_every_field(tmp_path: Path, pem: Path) -> None:
    assert {name for name, *_ in _every_variable(tmp_path, pem)} == set(RedisSettings.model_fields)


def test_every_variable_through_the_environment(tmp_path: Path, pem: Path) -> None:
    for name, given, expected, needs in _every_variable(tmp_path, pem):
        settings = load(**{**needs, name: given})
        assert _plain(getattr(settings, name)) == expected, name
        assert settings.model_fields_set == {name, *needs}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_variable_through_the_file(tmp_path: Path, pem: Path, suffix: str) -> None:
    path = tmp_path / f"settings{suffix}"
    for name, given, expected, needs in _every_variable(tmp_path, pem):
        values = {f"redis_{key}": value for key, value in {**needs, name: given}.items()}
        path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
        settings = load_redis_settings({"SEP_SETTINGS_FILE": str(path)})
        assert _plain(getattr(settings, name)) == expected, name
        assert settings.model_fields_set == {name, *needs}


def test_operator_settings_ignore_redis_variables() -> None:
    assert load_settings({"SEP_REDIS_HOST": "redis", "SEP_REDIS_PORT": "tcp://x:1"}).refresh_concurrency == 32


def test_discrete_variables(pem: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("cert")
    key.write_text("key")
    settings = load(host="redis.cache.svc", port="6380", username="operator", password=PASSWORD, db="7",
                    connect_timeout_seconds="1.5", socket_timeout_seconds="2", tls="true", ca_file=str(pem),
                    cert_file=str(cert), key_file=str(key), key_prefix="sep")
    assert settings.configured
    connection = settings.connection
    assert (connection.host, connection.port, connection.username, connection.db, connection.tls) == (
        "redis.cache.svc", 6380, "operator", 7, True)
    assert connection.password is not None
    assert connection.password.get_secret_value() == PASSWORD
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (pem, cert, key)
    assert (settings.connect_timeout_seconds, settings.socket_timeout_seconds, settings.key_prefix) == (
        1.5, 2.0, "sep")
    assert settings.describe() == "Redis at redis.cache.svc:6380 db 7 (TLS)"
    for text in (repr(settings), str(settings), repr(connection), settings.describe()):
        assert PASSWORD not in text


# -- URL --------------------------------------------------------------------------------------------------


def test_url_parts_are_merged() -> None:
    settings = load(url=f"redis://gateway:{PASSWORD_IN_URL}@10.0.0.5:7000/3")
    connection = settings.connection
    assert (connection.host, connection.port, connection.username, connection.db, connection.tls) == (
        "10.0.0.5", 7000, "gateway", 3, False)
    assert connection.password is not None
    assert connection.password.get_secret_value() == PASSWORD
    assert PASSWORD_IN_URL not in repr(settings)
    assert PASSWORD not in repr(settings)
    assert settings.describe() == "Redis at 10.0.0.5:7000 db 3"


def test_rediss_implies_tls() -> None:
    settings = load(url="rediss://redis.example:6380")
    assert settings.tls
    assert settings.connection.tls
    assert settings.connection.db == 0


def test_url_without_password_takes_the_password_file(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    settings = load(url="redis://redis:6379", username="operator", password_file=str(password_file))
    connection = settings.connection
    assert connection.username == "operator"
    assert connection.password is not None
    assert connection.password.get_secret_value() == PASSWORD


def test_url_and_agreeing_discrete_values_are_fine() -> None:
    settings = load(url="redis://redis:6380/2", port="6380", db="2")
    assert (settings.connection.port, settings.connection.db) == (6380, 2)
    assert load(url="redis://redis/4").connection.port == 6379  # no port in the URL: the default


# -- password file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (PASSWORD, PASSWORD),
    (PASSWORD + "\n", PASSWORD),
    (PASSWORD + "\r\n", PASSWORD),
    (PASSWORD + "\n\n", PASSWORD + "\n"),  # only one newline belongs to the file, not the password
    (" " + PASSWORD + " \n", " " + PASSWORD + " "),
])
def test_password_file_drops_one_trailing_newline(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "password"
    path.write_text(content, newline="")
    password = load(host="redis", password_file=str(path)).connection.password
    assert password is not None
    assert password.get_secret_value() == expected


def test_password_file_missing_unreadable_or_empty(tmp_path: Path) -> None:
    missing = error_of({"SEP_REDIS_HOST": "redis", "SEP_REDIS_PASSWORD_FILE": str(tmp_path / "nope")})
    assert "SEP_REDIS_PASSWORD_FILE" in missing
    assert "cannot read" in missing
    assert "SEP_REDIS_PASSWORD_FILE" in error_of({"SEP_REDIS_HOST": "redis",
                                                  "SEP_REDIS_PASSWORD_FILE": str(tmp_path)})  # a directory
    empty = tmp_path / "empty"
    empty.write_text("\n")
    message = error_of({"SEP_REDIS_HOST": "redis", "SEP_REDIS_PASSWORD_FILE": str(empty)})
    assert "SEP_REDIS_PASSWORD_FILE" in message
    assert "empty" in message
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text(PASSWORD)
        locked.chmod(0)
        message = error_of({"SEP_REDIS_HOST": "redis", "SEP_REDIS_PASSWORD_FILE": str(locked)})
        assert "SEP_REDIS_PASSWORD_FILE" in message
        assert PASSWORD not in message


# -- settings file ----------------------------------------------------------------------------------------


def test_settings_file_json_and_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"redis_host": "from-file", "redis_port": 6390, "redis_key_prefix": "file",
                                "refresh_concurrency": 4}))
    settings = load_redis_settings({"SEP_SETTINGS_FILE": str(path), "SEP_REDIS_KEY_PREFIX": "env"})
    assert (settings.connection.host, settings.connection.port, settings.key_prefix) == ("from-file", 6390, "env")


def test_settings_file_yaml_with_sentinel_list(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("REDIS_SENTINELS: [s1:26379, 's2:26380']\nredis_sentinel_master: mymaster\n")
    settings = load_redis_settings({"SEP_SETTINGS_FILE": str(path)})
    assert settings.configured
    assert settings.sentinel_addresses == (("s1", 26379), ("s2", 26380))


def test_unreadable_settings_file_names_it(tmp_path: Path) -> None:
    assert "SEP_SETTINGS_FILE" in error_of({"SEP_SETTINGS_FILE": str(tmp_path / "missing.yaml")})


# -- Sentinel ---------------------------------------------------------------------------------------------


def test_sentinels_parsed() -> None:
    settings = load(sentinels=" s1:26379 ,[fd00::1]:26380,10.0.0.3:26381,", sentinel_master="mymaster",
                    password=PASSWORD, db="2")
    assert settings.sentinel_addresses == (("s1", 26379), ("fd00::1", 26380), ("10.0.0.3", 26381))
    assert settings.connection.host is None
    assert settings.connection.db == 2
    assert settings.describe() == ("Redis master 'mymaster' via sentinels s1:26379,[fd00::1]:26380,10.0.0.3:26381 "
                                   "db 2")
    assert settings.sentinel_credentials == SentinelCredentials(username=None, password=None)


SENTINEL_PASSWORD = "S3ntinel-only:pass@word"
SENTINEL = {"SEP_REDIS_SENTINELS": "s1:26379", "SEP_REDIS_SENTINEL_MASTER": "mymaster"}


def test_sentinel_credentials_apart_from_the_servers(tmp_path: Path) -> None:
    settings = load_redis_settings({**SENTINEL, "SEP_REDIS_USERNAME": "operator", "SEP_REDIS_PASSWORD": PASSWORD,
                                    "SEP_REDIS_SENTINEL_USERNAME": "sentinel-user",
                                    "SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD})
    credentials = settings.sentinel_credentials
    assert credentials.username == "sentinel-user"
    assert credentials.password is not None
    assert credentials.password.get_secret_value() == SENTINEL_PASSWORD
    connection = settings.connection
    assert connection.username == "operator"
    assert connection.password is not None
    assert connection.password.get_secret_value() == PASSWORD
    for text in (repr(settings), str(settings), repr(credentials), settings.describe()):
        assert SENTINEL_PASSWORD not in text
        assert PASSWORD not in text


def test_sentinel_password_alone_leaves_the_server_without_one() -> None:
    settings = load_redis_settings({**SENTINEL, "SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD})
    assert settings.connection.password is None
    assert settings.sentinel_credentials.username is None
    assert settings.sentinel_credentials.password is not None


@pytest.mark.parametrize(("content", "expected"), [
    (SENTINEL_PASSWORD + "\n", SENTINEL_PASSWORD),
    (SENTINEL_PASSWORD + "\r\n", SENTINEL_PASSWORD),
    (SENTINEL_PASSWORD + "\n\n", SENTINEL_PASSWORD + "\n"),
])
def test_sentinel_password_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "sentinel-password"
    path.write_text(content, newline="")
    password = load_redis_settings({**SENTINEL, "SEP_REDIS_SENTINEL_PASSWORD_FILE": str(path)}
                                   ).sentinel_credentials.password
    assert password is not None
    assert password.get_secret_value() == expected


def test_sentinel_credentials_from_the_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"redis_sentinels": ["s1:26379"], "redis_sentinel_master": "mymaster",
                                    "redis_sentinel_username": "from-file",
                                    "redis_sentinel_password": "file-password"}))
    settings = load_redis_settings({"SEP_SETTINGS_FILE": str(path),
                                    "SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD})  # the environment wins
    credentials = settings.sentinel_credentials
    assert credentials.username == "from-file"
    assert credentials.password is not None
    assert credentials.password.get_secret_value() == SENTINEL_PASSWORD


def test_sentinel_password_file_missing_or_empty(tmp_path: Path) -> None:
    message = error_of({**SENTINEL, "SEP_REDIS_SENTINEL_PASSWORD_FILE": str(tmp_path / "nope")})
    assert "SEP_REDIS_SENTINEL_PASSWORD_FILE: cannot read" in message
    empty = tmp_path / "empty"
    empty.write_text("\n")
    message = error_of({**SENTINEL, "SEP_REDIS_SENTINEL_PASSWORD_FILE": str(empty)})
    assert "SEP_REDIS_SENTINEL_PASSWORD_FILE" in message
    assert "empty" in message


def test_both_sentinel_password_sources_refused(tmp_path: Path) -> None:
    path = tmp_path / "sentinel-password"
    path.write_text(SENTINEL_PASSWORD)
    message = error_of({**SENTINEL, "SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
                        "SEP_REDIS_SENTINEL_PASSWORD_FILE": str(path)})
    assert "SEP_REDIS_SENTINEL_PASSWORD and SEP_REDIS_SENTINEL_PASSWORD_FILE are both set" in message
    assert SENTINEL_PASSWORD not in message


@pytest.mark.parametrize(("extra", "named"), [
    ({"SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD}, "SEP_REDIS_SENTINEL_PASSWORD is set"),
    ({"SEP_REDIS_SENTINEL_USERNAME": "u"}, "SEP_REDIS_SENTINEL_USERNAME is set"),
    ({"SEP_REDIS_SENTINEL_PASSWORD_FILE": "/etc/hostname"}, "SEP_REDIS_SENTINEL_PASSWORD_FILE is set"),
    ({"SEP_REDIS_SENTINEL_USERNAME": "u", "SEP_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD},
     "SEP_REDIS_SENTINEL_USERNAME and SEP_REDIS_SENTINEL_PASSWORD are set"),
])
@pytest.mark.parametrize("server", [{"SEP_REDIS_HOST": "redis"}, {"SEP_REDIS_URL": "redis://redis"}, {}])
def test_sentinel_credentials_only_in_sentinel_mode(extra: dict[str, str], named: str,
                                                    server: dict[str, str]) -> None:
    message = error_of({**server, **extra})
    assert named in message
    assert "SEP_REDIS_SENTINELS is not" in message
    assert SENTINEL_PASSWORD not in message


# -- errors -----------------------------------------------------------------------------------------------


def _errors(pem: Path, tmp_path: Path) -> list[tuple[dict[str, str], tuple[str, ...]]]:
    missing = str(tmp_path / "missing.pem")
    return [
        ({"URL": "redis://a", "HOST": "b"}, ("SEP_REDIS_URL", "SEP_REDIS_HOST")),
        ({"SENTINELS": "s:26379"}, ("SEP_REDIS_SENTINELS", "SEP_REDIS_SENTINEL_MASTER")),
        ({"SENTINEL_MASTER": "m", "HOST": "h"}, ("SEP_REDIS_SENTINEL_MASTER", "SEP_REDIS_SENTINELS")),
        ({"SENTINELS": "s:26379", "SENTINEL_MASTER": "m", "HOST": "h"}, ("SEP_REDIS_SENTINELS", "SEP_REDIS_HOST")),
        ({"SENTINELS": "s:26379", "SENTINEL_MASTER": "m", "URL": "redis://h"}, ("SEP_REDIS_SENTINELS",)),
        ({"SENTINELS": "s", "SENTINEL_MASTER": "m"}, ("SEP_REDIS_SENTINELS", "host:port")),
        ({"SENTINELS": "s:0", "SENTINEL_MASTER": "m"}, ("SEP_REDIS_SENTINELS",)),
        ({"SENTINELS": ",,", "SENTINEL_MASTER": "m"}, ("SEP_REDIS_SENTINELS",)),
        ({"SENTINELS": "s:1", "SENTINEL_MASTER": "my master"}, ("SEP_REDIS_SENTINEL_MASTER",)),
        ({"HOST": "h", "TLS": "true", "CERT_FILE": str(pem)}, ("SEP_REDIS_CERT_FILE", "SEP_REDIS_KEY_FILE")),
        ({"HOST": "h", "TLS": "true", "KEY_FILE": str(pem)}, ("SEP_REDIS_KEY_FILE", "SEP_REDIS_CERT_FILE")),
        ({"HOST": "h", "TLS": "true", "CA_FILE": missing}, ("SEP_REDIS_CA_FILE", "does not exist")),
        ({"HOST": "h", "TLS": "true", "CERT_FILE": missing, "KEY_FILE": str(pem)}, ("SEP_REDIS_CERT_FILE",)),
        ({"HOST": "h", "TLS": "true", "CERT_FILE": str(pem), "KEY_FILE": missing}, ("SEP_REDIS_KEY_FILE",)),
        ({"HOST": "h", "CA_FILE": str(pem)}, ("SEP_REDIS_CA_FILE", "SEP_REDIS_TLS")),
        ({"URL": "http://h:6379"}, ("SEP_REDIS_URL", "redis://", "http")),
        ({"URL": "h:6379"}, ("SEP_REDIS_URL",)),
        ({"URL": "redis://h:99999"}, ("SEP_REDIS_URL",)),
        ({"URL": "redis://:6379"}, ("SEP_REDIS_URL", "host")),
        ({"URL": "redis://h/db3"}, ("SEP_REDIS_URL", "database")),
        ({"URL": "redis://h/0?ssl_cert_reqs=none"}, ("SEP_REDIS_URL", "query")),
        ({"URL": "redis://user@h", "USERNAME": "other"}, ("SEP_REDIS_USERNAME", "SEP_REDIS_URL")),
        ({"URL": "redis://h:7000", "PORT": "7001"}, ("SEP_REDIS_PORT", "SEP_REDIS_URL")),
        ({"URL": "redis://h/1", "DB": "2"}, ("SEP_REDIS_DB", "SEP_REDIS_URL")),
        ({"HOST": "redis://h"}, ("SEP_REDIS_HOST", "SEP_REDIS_URL")),
        ({"HOST": "h", "PORT": "0"}, ("SEP_REDIS_PORT",)),
        ({"HOST": "h", "PORT": "six"}, ("SEP_REDIS_PORT",)),
        ({"HOST": "h", "DB": "-1"}, ("SEP_REDIS_DB",)),
        ({"HOST": "h", "CONNECT_TIMEOUT_SECONDS": "0"}, ("SEP_REDIS_CONNECT_TIMEOUT_SECONDS",)),
        ({"HOST": "h", "SOCKET_TIMEOUT_SECONDS": "-1"}, ("SEP_REDIS_SOCKET_TIMEOUT_SECONDS",)),
        ({"HOST": "h", "TLS": "perhaps"}, ("SEP_REDIS_TLS",)),
        ({"HOST": "h", "KEY_PREFIX": "has space"}, ("SEP_REDIS_KEY_PREFIX",)),
        ({"CLUSTER": "true"}, ("SEP_REDIS_CLUSTER", "seed")),
        ({"CLUSTER": "true", "SENTINELS": "s:1", "SENTINEL_MASTER": "m"}, ("SEP_REDIS_CLUSTER", "SEP_REDIS_SENTINELS")),
        ({"CLUSTER": "true", "HOST": "h", "DB": "3"}, ("SEP_REDIS_DB", "Cluster")),
        ({"CLUSTER": "true", "URL": "redis://h:7000/2"}, ("SEP_REDIS_DB", "Cluster")),
        ({"CLUSTER": "true", "HOST": "h", "KEY_PREFIX": "a{b}"}, ("SEP_REDIS_KEY_PREFIX", "hash tag")),
        ({"CLUSTER": "maybe", "HOST": "h"}, ("SEP_REDIS_CLUSTER",)),
    ]


def test_every_error_names_its_variable_and_never_the_password(pem: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    for env, expected in _errors(pem, tmp_path):
        # the same case with the password given each way it can be given (where that is allowed)
        ways: list[dict[str, str]] = [{"PASSWORD": PASSWORD}, {"PASSWORD_FILE": str(password_file)}]
        if "SENTINELS" in env:
            ways += [{"SENTINEL_PASSWORD": PASSWORD}, {"SENTINEL_PASSWORD_FILE": str(password_file)}]
        if "URL" in env and "://" in env["URL"] and "@" not in env["URL"]:
            scheme, rest = env["URL"].split("://", 1)
            ways.append({"URL": f"{scheme}://user:{PASSWORD_IN_URL}@{rest}"})
        for way in ways:
            full = {f"SEP_REDIS_{key}": value for key, value in {**env, **way}.items()}
            message = error_of(full)
            for fragment in expected:
                assert fragment in message, (full, message)
            assert PASSWORD not in message, (full, message)
            assert PASSWORD_IN_URL not in message, (full, message)
            assert message.startswith("invalid Redis settings: "), message


def test_both_password_sources_refused() -> None:
    message = error_of({"SEP_REDIS_HOST": "h", "SEP_REDIS_PASSWORD": PASSWORD,
                        "SEP_REDIS_PASSWORD_FILE": "/etc/hostname"})
    assert "SEP_REDIS_PASSWORD" in message
    assert "SEP_REDIS_PASSWORD_FILE" in message
    assert PASSWORD not in message
    message = error_of({"SEP_REDIS_URL": f"redis://:{PASSWORD_IN_URL}@h", "SEP_REDIS_PASSWORD": "other-password"})
    assert "SEP_REDIS_URL" in message
    assert "SEP_REDIS_PASSWORD" in message
    assert PASSWORD not in message
    assert "other-password" not in message


def test_several_problems_reported_together() -> None:
    message = error_of({"SEP_REDIS_HOST": "h", "SEP_REDIS_PORT": "x", "SEP_REDIS_DB": "-2"})
    assert "SEP_REDIS_PORT" in message
    assert "SEP_REDIS_DB" in message


def test_cluster_mode_seeds_with_the_url_or_host() -> None:
    settings = load(cluster="true", url=f"redis://operator:{PASSWORD_IN_URL}@redis-cluster.cache:7000")
    assert settings.configured
    assert settings.cluster
    assert (settings.connection.host, settings.connection.port, settings.connection.db) == (
        "redis-cluster.cache", 7000, 0)
    assert settings.describe() == "Redis Cluster via redis-cluster.cache:7000"
    assert load(cluster="true", host="10.0.0.7", tls="true").describe() == "Redis Cluster via 10.0.0.7:6379 (TLS)"
    assert not load(host="h").cluster


def test_service_link_port_gets_a_hint() -> None:
    message = error_of({"SEP_REDIS_HOST": "h", "SEP_REDIS_PORT": "tcp://10.0.0.1:6379"})
    assert "SEP_REDIS_PORT" in message
    assert "enableServiceLinks" in message
