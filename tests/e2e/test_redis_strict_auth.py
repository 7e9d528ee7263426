"""The session's redis-server has the default user off and requires client certificates (tests/conftest.py
``redis_access``), so ignoring the username, the password or the certificate fails, visibly.

Cases:
- the server itself refuses a client without the username (the password alone logs in as ``default``, which is
  off), with a wrong username, without the password, or without a client certificate — and takes the full set;
- an operator given a wrong username, no username, no password or no client certificate reports
  ``Ready=False``/``TargetWriteFailed`` naming Redis, still writes the Secret target, and no key appears.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import (
    RECORD,
    Kube,
    RedisAccess,
    Setup,
    _namespace,
    _operator,
    redis_operator_env,
    wait_for,
)

pytestmark = pytest.mark.e2e

BROKEN: dict[str, dict[str, str | None]] = {
    "wrong-username": {"SEP_REDIS_USERNAME": "someone-else"},
    "no-username": {"SEP_REDIS_USERNAME": None},
    "no-password": {"SEP_REDIS_PASSWORD_FILE": None},
    "no-client-certificate": {"SEP_REDIS_CERT_FILE": None, "SEP_REDIS_KEY_FILE": None},
}


def _client_options(access: RedisAccess, broken: str) -> dict[str, Any]:
    server = access.server
    options: dict[str, Any] = {
        "host": server.host, "port": server.tls_port, "username": access.username, "password": access.password,
        "ssl": True, "ssl_ca_certs": str(server.ca_path), "ssl_certfile": str(server.client_cert_path),
        "ssl_keyfile": str(server.client_key_path), "socket_timeout": 2, "socket_connect_timeout": 2,
        "retry": Retry(NoBackoff(), 0)}  # a refusal is the answer: not asked again
    for variable in BROKEN.get(broken, {}):
        options.pop({"SEP_REDIS_USERNAME": "username", "SEP_REDIS_PASSWORD_FILE": "password",
                     "SEP_REDIS_CERT_FILE": "ssl_certfile", "SEP_REDIS_KEY_FILE": "ssl_keyfile"}[variable])
    if broken == "wrong-username":
        options["username"] = "someone-else"
    return options


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_the_server_refuses_a_client_that_ignores_a_setting(redis_access: RedisAccess, broken: str) -> None:
    with pytest.raises(redis.ConnectionError) as refused:  # AuthenticationError is one too
        redis.Redis(**_client_options(redis_access, broken)).ping()
    if broken == "no-client-certificate":
        assert "EOF" in str(refused.value) or "certificate" in str(refused.value), refused.value
    else:
        assert isinstance(refused.value, redis.AuthenticationError), refused.value


def test_the_server_takes_the_full_set(redis_access: RedisAccess) -> None:
    assert redis.Redis(**_client_options(redis_access, "")).ping()


@pytest.fixture(params=sorted(BROKEN))
def broken(request: pytest.FixtureRequest, control_plane: controlplane.ControlPlane, kube: Kube, tmp_path: Path,
           redis_access: RedisAccess, secret_values: set[str]) -> Iterator[Setup]:
    """A namespace, and an operator for it whose Redis settings lack one thing or have it wrong."""
    env: dict[str, str] = {**redis_operator_env(redis_access, tmp_path)}
    for variable, value in BROKEN[request.param].items():
        if value is None:
            env.pop(variable)
        else:
            env[variable] = value
    namespaces = _namespace(kube, "rb")
    namespace = next(namespaces)
    for _ in _operator(control_plane, tmp_path / "operator.log", RECORD.operators, scope=("--namespace", namespace),
                       env=env):
        yield Setup(kube, namespace, secret_values)
        next(namespaces, None)  # the endpoints released while the operator still runs


def test_an_operator_that_ignores_a_setting_fails_visibly(broken: Setup, kube: Kube, redis_access: RedisAccess,
                                                          token_server: TokenServer) -> None:
    name = f"cache-{uuid.uuid4().hex[:6]}"
    broken.client(token_server)
    broken.endpoint(name, token_server, target={"secret": {}, "redis": {"enabled": True}})
    condition = kube.wait_ready(broken.namespace, name, status="False", reason="TargetWriteFailed", timeout=20)
    assert "Redis" in condition["message"], condition
    wait_for(lambda: kube.secret_data(broken.namespace, f"{name}-token"), message="the Secret target")
    assert redis_access.client().exists(redis_access.key(broken.namespace, name)) == 0
