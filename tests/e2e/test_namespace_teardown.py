"""The ``namespace`` fixtures' teardown (tests/conftest.py ``_namespace``) reports a stuck finalizer instead of
stripping it silently.

Cases:
- in a namespace an operator serves, an endpoint whose finalizer is not released (here a second, foreign one
  the operator rightly leaves alone) fails the teardown, with the endpoint's finalizers and status in the
  message; the namespace is cleaned up all the same;
- in a namespace no operator serves (schema tests), the finalizer is dropped with a warning saying so;
- an endpoint the operator releases leaves no failure and no warning.
"""

from __future__ import annotations

import warnings

import pytest

from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import Kube, OperatorProcess, Setup, _namespace

pytestmark = pytest.mark.e2e

FOREIGN = "example.com/keep-me"


def _with_foreign_finalizer(kube: Kube, namespace: str, token_server: TokenServer, secret_values: set[str],
                            *, served: bool) -> None:
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server)
    setup.endpoint("held", token_server)
    if served:
        kube.wait_ready(namespace, "held")  # the operator has put its finalizer on by now
    body = kube.get_endpoint(namespace, "held") or {}
    kube.patch_endpoint(namespace, "held", {"metadata": {
        "finalizers": [*body["metadata"].get("finalizers", []), FOREIGN]}})


def test_a_stuck_finalizer_in_a_served_namespace_fails_the_test(operator: OperatorProcess, kube: Kube,
                                                                 token_server: TokenServer,
                                                                 secret_values: set[str]) -> None:
    teardown = _namespace(kube, "t", release_timeout=2)
    namespace = next(teardown)
    _with_foreign_finalizer(kube, namespace, token_server, secret_values, served=True)
    with pytest.raises(pytest.fail.Exception) as failure:
        next(teardown, None)
    message = str(failure.value)
    assert f"{namespace}: a finalizer of ['held'] was not released" in message
    assert FOREIGN in message
    assert '"reason": "TokenIssued"' in message, "the endpoint's status is in the message"
    assert kube.get_endpoint(namespace, "held") is None, "cleaned up all the same"


def test_a_stuck_finalizer_where_no_operator_serves_is_dropped_with_a_warning(kube: Kube,
                                                                              token_server: TokenServer,
                                                                              secret_values: set[str]) -> None:
    teardown = _namespace(kube, "unserved", release_timeout=1)
    namespace = next(teardown)
    _with_foreign_finalizer(kube, namespace, token_server, secret_values, served=False)
    with pytest.warns(UserWarning, match=f"{namespace}: no operator serves this namespace; dropped the "
                                         r"finalizers of \['held'\]"):
        next(teardown, None)
    assert kube.get_endpoint(namespace, "held") is None


def test_a_released_finalizer_is_silent(operator: OperatorProcess, kube: Kube, token_server: TokenServer,
                                        secret_values: set[str]) -> None:
    teardown = _namespace(kube, "t", release_timeout=10)
    namespace = next(teardown)
    Setup(kube, namespace, secret_values).client(token_server)
    Setup(kube, namespace, secret_values).endpoint("released", token_server)
    kube.wait_ready(namespace, "released")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(teardown, None)
    assert kube.get_endpoint(namespace, "released") is None
