"""The operator in a cluster that holds thousands of Secrets it has nothing to do with (issue 8), CI-sized.

This module runs its own control plane, so that the operator can run as the default install does
(``--all-namespaces``): on the session's control plane it would also serve the ``t-*`` and ``r-*`` endpoints
of the session's operators and fight them over their token Secrets. In it, 3,000 unrelated Secrets of 1 KiB
are created (concurrently, before any operator starts) in ten namespaces besides the endpoints' own.

- Default mode: the operator starts with all of them listed (its log counts them), serves an endpoint; a
  rotation of a referenced Secret is seen at once (a new token within 3 s, one token request, made with the new
  credentials); refreshes of an endpoint whose credential Secret did not change do not read it again (the
  apiserver's audit log counts the operator's GETs: one at first, one more after a rotation); a deleted token
  Secret is written again with the token it held, without a token request; a token Secret whose fingerprint
  annotation someone changed or removed is written again, without a token request; a restart asks for no
  token, and the restarted operator still repairs a deleted token Secret without one (it has listed everything
  before deciding).
- A namespace glob (``--namespace 'sc-*'``, which matches the endpoints' namespace and the ten holding the
  3,000 Secrets, nothing else): the same operator scope by a different road (a watch of namespaces, then one
  watch per matching namespace) takes over from the stopped default-mode operator without a token request,
  serves a new endpoint and sees a rotation at once.

Every wait is bounded; the module takes about half a minute, most of it creating the 3,000 Secrets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import RECORD, TEST_OPERATOR_ENV, Kube, OperatorProcess, _token_server, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UNRELATED = 3_000
BULK_NAMESPACES = [f"sc-bulk-{index}" for index in range(10)]
APP = "sc-app"
LISTED = re.compile(r"Secrets and ConfigMaps in scope listed: (\d+) secrets")
AT_ONCE = 3.0  # seconds: "a rotation is seen at once"


# -- the module's own cluster --------------------------------------------------------------------------------


# Who read which Secret: the operator's GETs of a credential Secret are what its copy of it saves.
READS_AUDITED = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["get"]
  resources:
  - group: ""
    resources: ["secrets"]
- level: None
"""


@pytest.fixture(scope="module")
def plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane(audit_log=True, audit_policy=READS_AUDITED) as cp:
        cp.install_crds(ROOT / "crds")
        yield cp


@pytest.fixture(scope="module")
def kube(plane: controlplane.ControlPlane) -> Kube:
    api_client = plane.api_client()
    return Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client), control_plane=plane)


async def _create_unrelated(plane: controlplane.ControlPlane) -> None:
    """3,000 Secrets of 1 KiB of random data over the bulk namespaces, 16 requests in flight."""
    tls = ssl.create_default_context(cafile=str(plane.ca_path))
    async with httpx.AsyncClient(base_url=plane.server, verify=tls, timeout=60,
                                 headers={"Authorization": f"Bearer {plane.admin_token}"},
                                 limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)) as client:
        for namespace in [*BULK_NAMESPACES, APP]:
            (await client.post("/api/v1/namespaces", json={"metadata": {"name": namespace}})).raise_for_status()
        numbers = iter(range(UNRELATED))

        async def worker() -> None:
            for number in numbers:
                body = {"metadata": {"name": f"app-{number:05d}", "labels": {"app": f"app-{number % 37}"}},
                        "type": "Opaque", "data": {"blob": base64.b64encode(os.urandom(768)).decode()}}
                namespace = BULK_NAMESPACES[number % len(BULK_NAMESPACES)]
                (await client.post(f"/api/v1/namespaces/{namespace}/secrets", json=body)).raise_for_status()

        await asyncio.gather(*(worker() for _ in range(16)))


@pytest.fixture(scope="module")
def unrelated(plane: controlplane.ControlPlane) -> int:
    """Created in a thread of its own: the test session's event loop may be running in this one."""
    failure: list[BaseException] = []

    def create() -> None:
        try:
            asyncio.run(_create_unrelated(plane))
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    worker = threading.Thread(target=create, name="create unrelated Secrets")
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "creating the unrelated Secrets took over two minutes"
    if failure:
        raise failure[0]
    return UNRELATED


@pytest.fixture(scope="module")
def idp(secret_values: set[str]) -> Iterator[TokenServer]:
    yield from _token_server(secret_values, tls=False)


@pytest.fixture(scope="module")
def default_mode(plane: controlplane.ControlPlane, unrelated: int, idp: TokenServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The default install's scope, started once every unrelated Secret exists."""
    operator = OperatorProcess(kubeconfig=plane.kubeconfig_path, scope=("--all-namespaces",),
                               log_path=tmp_path_factory.mktemp("scale-default") / "operator.log",
                               env=dict(TEST_OPERATOR_ENV))
    operator.start()
    yield operator
    operator.stop()


# -- helpers ---------------------------------------------------------------------------------------------------


def _client(kube: Kube, idp: TokenServer, secret_name: str) -> tuple[str, str]:
    """A client at the token server and its credentials in a Secret of the endpoints' namespace."""
    client_id, client_secret = f"client-{uuid.uuid4().hex[:8]}", f"s3cr3t:{uuid.uuid4().hex}&+%"
    idp.add_client(client_id, client_secret)
    kube.create_secret(APP, secret_name, {"client_id": client_id, "client_secret": client_secret})
    RECORD.secrets.add(client_secret)
    RECORD.client_ids[client_secret] = client_id
    return client_id, client_secret


def _endpoint(kube: Kube, idp: TokenServer, name: str, secret_name: str) -> None:
    kube.create_endpoint(APP, name, {"tokenUrl": idp.token_url, "allowInsecureHttp": True,
                                     "clientSecretRef": {"name": secret_name}})
    kube.wait_ready(APP, name, timeout=15)


def _token_secret(kube: Kube, name: str) -> Any:
    try:
        return kube.core.read_namespaced_secret(f"{name}-token", APP)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _fingerprint(kube: Kube, name: str) -> str | None:
    data = kube.secret_data(APP, f"{name}-token")
    return data.get("fingerprint") if data else None


def _listed_secrets(operator: OperatorProcess) -> list[int]:
    """What each start of this operator reported listing."""
    return [int(count) for count in LISTED.findall(operator.log_text())]


def _quiet(idp: TokenServer, before: int, seconds: float = 1.5) -> None:
    """No token request for a while (a rewrite that would fetch after all would show by then)."""
    time.sleep(seconds)
    assert idp.token_requests == before, f"{idp.token_requests - before} token request(s) where none was due"


# -- default mode ----------------------------------------------------------------------------------------------


def test_starts_beside_thousands_of_unrelated_secrets_and_serves(default_mode: OperatorProcess, kube: Kube,
                                                                  idp: TokenServer, unrelated: int) -> None:
    # "started" is logged before the watches have listed: the count follows
    listed = wait_for(lambda: _listed_secrets(default_mode), timeout=30,
                      message="the operator's log to say how many Secrets it listed")
    assert listed[-1] >= unrelated, f"the operator listed {listed[-1]} Secrets, not the {unrelated}"
    before = idp.token_requests
    _client(kube, idp, "serve-oauth")
    _endpoint(kube, idp, "serve", "serve-oauth")
    assert idp.token_requests == before + 1
    data = kube.secret_data(APP, "serve-token")
    assert data is not None
    assert data["authorization"].startswith("Bearer ")


def test_a_rotated_secret_is_seen_at_once(default_mode: OperatorProcess, kube: Kube, idp: TokenServer) -> None:
    client_id, _ = _client(kube, idp, "rotate-oauth")
    _endpoint(kube, idp, "rotate", "rotate-oauth")
    old, before = _fingerprint(kube, "rotate"), idp.token_requests
    rotated = f"s3cr3t:{uuid.uuid4().hex}&+%"
    idp.add_client(client_id, rotated)  # the old secret is refused from now on
    RECORD.secrets.add(rotated)
    RECORD.client_ids[rotated] = client_id
    kube.update_secret(APP, "rotate-oauth", {"client_secret": rotated})
    wait_for(lambda: _fingerprint(kube, "rotate") not in (None, old), timeout=AT_ONCE,
             message="a new token after the rotation")
    assert idp.token_requests == before + 1
    last = idp.requests[-1]
    assert (last.client_id, last.status) == (client_id, 200), "the new token was asked for with the new secret"


def _operator_reads(plane: controlplane.ControlPlane, secret_name: str) -> int:
    """How often the operator has read ``secret_name`` (GET, by the audit log)."""
    reads = 0
    for line in plane.audit_log_path.read_text().splitlines():
        event = json.loads(line)
        target = event.get("objectRef") or {}
        if (event.get("verb"), target.get("resource"), target.get("name")) == ("get", "secrets", secret_name) \
                and str(event.get("userAgent", "")).startswith("secured-endpoint-operator"):
            reads += 1
    return reads


def test_refreshes_read_an_unchanged_credential_secret_from_the_watch_copy(
        default_mode: OperatorProcess, kube: Kube, idp: TokenServer, plane: controlplane.ControlPlane) -> None:
    client_id, _ = _client(kube, idp, "copy-oauth")
    _endpoint(kube, idp, "copy", "copy-oauth")
    assert _operator_reads(plane, "copy-oauth") == 1
    for attempt in range(3):  # refresh requests: a new token each time, from the credentials read at first
        held, before = _fingerprint(kube, "copy"), idp.token_requests
        kube.patch_endpoint(APP, "copy", {"metadata": {"annotations": {api.REFRESH_ANNOTATION: f"again-{attempt}"}}})
        wait_for(lambda held=held: _fingerprint(kube, "copy") not in (None, held), timeout=10,
                 message="a new token after the refresh request")
        assert idp.token_requests == before + 1
    assert _operator_reads(plane, "copy-oauth") == 1, "an unchanged credential Secret was read again"
    rotated = f"s3cr3t:{uuid.uuid4().hex}&+%"
    idp.add_client(client_id, rotated)
    RECORD.secrets.add(rotated)
    RECORD.client_ids[rotated] = client_id
    held = _fingerprint(kube, "copy")
    kube.update_secret(APP, "copy-oauth", {"client_secret": rotated})
    wait_for(lambda: _fingerprint(kube, "copy") not in (None, held), timeout=AT_ONCE,
             message="a new token after the rotation")
    assert idp.requests[-1].client_id == client_id
    assert idp.requests[-1].status == 200, "the new token was asked for with the new secret"
    assert _operator_reads(plane, "copy-oauth") == 2, "a rotated credential Secret is read once"


def test_a_deleted_token_secret_is_written_again_without_a_token_request(
        default_mode: OperatorProcess, kube: Kube, idp: TokenServer) -> None:
    _client(kube, idp, "delete-oauth")
    _endpoint(kube, idp, "delete", "delete-oauth")
    held, before = _fingerprint(kube, "delete"), idp.token_requests
    kube.core.delete_namespaced_secret("delete-token", APP)
    wait_for(lambda: _fingerprint(kube, "delete") == held, timeout=AT_ONCE,
             message="the token Secret written again with the token it held")
    _quiet(idp, before)


@pytest.mark.parametrize("edit", ["changed", "removed"])
def test_a_token_secret_whose_fingerprint_annotation_was_edited_is_written_again(
        default_mode: OperatorProcess, kube: Kube, idp: TokenServer, edit: str) -> None:
    name = f"annotation-{edit}"
    _client(kube, idp, f"{name}-oauth")
    _endpoint(kube, idp, name, f"{name}-oauth")
    held, before = _fingerprint(kube, name), idp.token_requests
    assert _token_secret(kube, name).metadata.annotations[api.TOKEN_FINGERPRINT_ANNOTATION] == held
    value = "sha256:000000000000" if edit == "changed" else None
    kube.core.patch_namespaced_secret(f"{name}-token", APP,
                                      {"metadata": {"annotations": {api.TOKEN_FINGERPRINT_ANNOTATION: value}}})

    def restored() -> bool:
        secret = _token_secret(kube, name)
        annotations = (secret.metadata.annotations or {}) if secret is not None else {}
        return annotations.get(api.TOKEN_FINGERPRINT_ANNOTATION) == held

    wait_for(restored, timeout=AT_ONCE, message=f"the token Secret written again after its annotation was {edit}")
    assert _fingerprint(kube, name) == held
    _quiet(idp, before)


def test_a_restart_asks_for_no_token(default_mode: OperatorProcess, kube: Kube, idp: TokenServer,
                                     unrelated: int) -> None:
    _client(kube, idp, "restart-oauth")
    _endpoint(kube, idp, "restart", "restart-oauth")
    starts = len(_listed_secrets(default_mode))
    before = idp.token_requests
    default_mode.restart()
    wait_for(lambda: len(_listed_secrets(default_mode)) > starts, timeout=15,
             message="the restarted operator to list the Secrets")
    assert _listed_secrets(default_mode)[-1] >= unrelated
    # the restarted operator has taken every endpoint in: a change it must act on is acted on at once
    kube.patch_endpoint(APP, "restart", {"spec": {"scopes": ["after-restart"]}})
    wait_for(lambda: idp.token_requests > before, timeout=AT_ONCE, message="the restarted operator to act")
    assert idp.token_requests == before + 1, "one token for the changed endpoint, none for the others"
    _quiet(idp, before + 1)


def test_after_a_restart_a_deleted_token_secret_is_written_again(default_mode: OperatorProcess, kube: Kube,
                                                                 idp: TokenServer) -> None:
    """After a restart the operator holds no token in memory: a deleted token Secret (and no Redis target to read
    it back from) is written again with a new token, at once (docs/contract.md §2.3)."""
    _client(kube, idp, "after-restart-oauth")
    _endpoint(kube, idp, "after-restart", "after-restart-oauth")
    starts = len(_listed_secrets(default_mode))
    default_mode.restart()
    wait_for(lambda: len(_listed_secrets(default_mode)) > starts, timeout=15,
             message="the restarted operator to list the Secrets")
    held, before = _fingerprint(kube, "after-restart"), idp.token_requests
    time.sleep(1.0)  # every endpoint handed over after the barrier
    kube.core.delete_namespaced_secret("after-restart-token", APP)
    try:
        wait_for(lambda: _fingerprint(kube, "after-restart") not in (None, held), timeout=AT_ONCE,
                 message="the restarted operator to write the token Secret again")
        assert idp.token_requests == before + 1
    finally:  # leave no endpoint without its token Secret for the tests after this one
        kube.delete_endpoint(APP, "after-restart")
        wait_for(lambda: kube.get_endpoint(APP, "after-restart") is None, timeout=10,
                 message="the endpoint to be released")


# -- a namespace glob ------------------------------------------------------------------------------------------


def test_a_namespace_glob_takes_over_and_sees_a_rotation_at_once(
        default_mode: OperatorProcess, kube: Kube, idp: TokenServer, unrelated: int,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    default_mode.stop()
    before = idp.token_requests
    glob = OperatorProcess(kubeconfig=kube.control_plane.kubeconfig_path, scope=("--namespace", "sc-*"),
                           log_path=tmp_path_factory.mktemp("scale-glob") / "operator.log",
                           env=dict(TEST_OPERATOR_ENV))
    glob.start()
    try:
        wait_for(lambda: _listed_secrets(glob), timeout=15, message="the glob operator to list its namespaces")
        assert _listed_secrets(glob)[-1] >= unrelated
        log = glob.log_text()
        # with cluster-wide list rights a glob watches Secrets cluster-wide; per namespace only under Roles
        assert "Serving namespace" not in log
        _quiet(idp, before)  # every endpoint of the default-mode operator holds a valid token
        client_id, _ = _client(kube, idp, "glob-oauth")
        _endpoint(kube, idp, "glob", "glob-oauth")
        old, before = _fingerprint(kube, "glob"), idp.token_requests
        rotated = f"s3cr3t:{uuid.uuid4().hex}&+%"
        idp.add_client(client_id, rotated)
        RECORD.secrets.add(rotated)
        RECORD.client_ids[rotated] = client_id
        kube.update_secret(APP, "glob-oauth", {"client_secret": rotated})
        wait_for(lambda: _fingerprint(kube, "glob") not in (None, old), timeout=AT_ONCE,
                 message="a new token after the rotation")
        assert idp.token_requests == before + 1
    finally:
        glob.stop()
