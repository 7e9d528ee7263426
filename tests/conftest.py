"""Shared fixtures: a real control plane, the operator as a real process, real token servers.

- ``control_plane`` (session): etcd + kube-apiserver built from source, CRD applied and established.
- ``kube``: the official Python client's APIs bound to that control plane (tests are synchronous).
- ``namespace``: a fresh namespace; its SecuredEndpoints are deleted at the end, through the operator (a
  finalizer still there after 20 s fails the test, unless no operator serves the namespace).
- ``operator`` (session): ``secured-endpoint-operator run --namespace 't-*'`` as a subprocess whose
  log is kept for the leak scan; ``operator.restart()`` for the restart tests. No Redis.
- ``redis_server`` / ``redis_operator`` / ``redis_setup`` (session): a TLS redis-server with an ACL user, and
  a second operator for ``r-*`` namespaces configured for it (username, password file, db 3, CA, client
  certificate), so every Redis test runs through all of those settings.
- ``token_server`` / ``tls_token_server``: RFC 6749 servers on loopback, one per test.
- ``secret_values``: every client secret, password and token the session used (for the leak scan).
- ``RECORD``: what the leak scan reads besides what is left in the cluster: every operator started (whoever
  started it), statuses, Events and ``/metrics`` taken at each namespace teardown, every message on the session
  Redis' channels; the scan (tests/e2e/test_secrets_never_leak.py) is marked ``runs_last`` and runs after
  every other test.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.redisserver import RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "secured-endpoint.io_securedendpoints.yaml"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "runs_last: run after every other test of the session (the leak scan)")


def runs_last_at_the_end(items: list[pytest.Item]) -> None:
    """Move the tests marked ``runs_last`` behind all others, keeping both groups in their order."""
    items[:] = [item for item in items if item.get_closest_marker("runs_last") is None] + \
        [item for item in items if item.get_closest_marker("runs_last") is not None]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    runs_last_at_the_end(items)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail with ``message``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message} (last value: {last!r})")


@dataclass
class Kube:
    """The official client's APIs, plus shortcuts for SecuredEndpoints."""

    core: k8s.CoreV1Api
    custom: k8s.CustomObjectsApi
    control_plane: controlplane.ControlPlane

    def create_endpoint(self, namespace: str, name: str, spec: dict[str, Any],
                        annotations: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
                "spec": spec}
        return self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)

    def get_endpoint(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_endpoint(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                          patch)

    def delete_endpoint(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ready(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Ready condition, or None."""
        body = self.get_endpoint(namespace, name) or {}
        for condition in (body.get("status") or {}).get("conditions") or ():
            if condition.get("type") == api.CONDITION_READY:
                return condition  # type: ignore[no-any-return]
        return None

    def wait_ready(self, namespace: str, name: str, *, status: str = "True", reason: str | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            condition = self.ready(namespace, name)
            if condition and condition["status"] == status and (reason is None or condition["reason"] == reason):
                return condition
            return None
        return wait_for(check, timeout=timeout,  # type: ignore[no-any-return]
                        message=f"{namespace}/{name} Ready={status} reason={reason}")

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        import base64

        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}

    def create_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        self.core.create_namespaced_secret(namespace, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name), string_data=values))

    def update_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        self.core.patch_namespaced_secret(name, namespace, {"stringData": values})

    def events(self, namespace: str) -> list[Any]:
        return list(self.core.list_namespaced_event(namespace).items)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane(audit_log=True) as plane:  # the leak scan reads the audit log
        RECORD.secrets.add(plane.admin_token)
        plane.install_crds(CRD_PATH.parent)
        yield plane


@pytest.fixture(scope="session")
def kube(control_plane: controlplane.ControlPlane) -> Kube:
    api_client = control_plane.api_client()
    return Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client),
                control_plane=control_plane)


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    yield from _namespace(kube, "t")


@pytest.fixture
def redis_namespace(kube: Kube) -> Iterator[str]:
    yield from _namespace(kube, "r")


def _namespace(kube: Kube, prefix: str, *, release_timeout: float = 20.0) -> Iterator[str]:
    """A namespace ``<prefix>-<random>``; at the end its endpoints are deleted. A finalizer not released within
    ``release_timeout`` fails the test when an operator serves the namespace (its fault, or the test's); where
    none does, nothing can release it and it is dropped, with a warning."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    record_namespace(kube, name)
    # No namespace controller runs here: delete the endpoints (the operator releases them), then wait.
    items = kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, name, api.PLURAL)["items"]
    for item in items:
        kube.delete_endpoint(name, item["metadata"]["name"])
    deadline = time.monotonic() + release_timeout
    left: list[dict[str, Any]] = items
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, name, api.PLURAL)["items"]
    record_namespace(kube, name, endpoints=False)  # the Events of the deletion
    if left:
        serving = [process for process in RECORD.operators if process.serves(name, kube.control_plane.server)]
        stuck = {item["metadata"]["name"]: {"finalizers": item["metadata"].get("finalizers"),
                                            "status": item.get("status")} for item in left}
        for endpoint in stuck:  # the namespace must not keep them either way
            kube.patch_endpoint(name, endpoint, {"metadata": {"finalizers": None}})
        kube.core.delete_namespace(name)
        if serving:
            logs = ", ".join(str(process.log_path) for process in serving)
            pytest.fail(f"{name}: a finalizer of {sorted(stuck)} was not released within {release_timeout:g} s "
                        f"although an operator serves the namespace (log: {logs}): {json.dumps(stuck)}")
        warnings.warn(f"{name}: no operator serves this namespace; dropped the finalizers of {sorted(stuck)}",
                      stacklevel=1)
        return
    kube.core.delete_namespace(name)


def record_namespace(kube: Kube, namespace: str, *, endpoints: bool = True) -> None:
    """Keep what the namespace shows before it goes (its endpoints' metadata and status, its Events) and what
    every running operator's ``/metrics`` says, for the leak scan."""
    if endpoints:
        for item in kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace,
                                                              api.PLURAL)["items"]:
            RECORD.snapshots.append((f"SecuredEndpoint {namespace}/{item['metadata']['name']} at teardown",
                                     json.dumps(written_by_the_operator(item))))
        for process in RECORD.operators:
            if (scrape := process.metrics()) is not None:
                RECORD.snapshots.append((f"/metrics of {process.log_path} at the teardown of {namespace}", scrape))
    events = [event.to_dict() for event in kube.core.list_namespaced_event(namespace).items]
    RECORD.snapshots.append((f"Events of {namespace} at teardown", json.dumps(events, default=str)))


def written_by_the_operator(endpoint: dict[str, Any]) -> dict[str, Any]:
    """A SecuredEndpoint without what users write (``spec``, kubectl's copy of it): a test may put a secret in a
    spec on purpose (a password in a tokenUrl) to check that the operator repeats it nowhere."""
    metadata = {key: value for key, value in (endpoint.get("metadata") or {}).items() if key != "managedFields"}
    annotations = dict(metadata.get("annotations") or {})
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return {"metadata": {**metadata, "annotations": annotations}, "status": endpoint.get("status")}


@dataclass
class OperatorProcess:
    """The operator as users run it: a separate process with its own event loop."""

    kubeconfig: Path
    log_path: Path
    scope: tuple[str, ...] = ("--all-namespaces",)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        """Start the process; with ``wait``, until it says it has started (or exits, failing the test)."""
        if not any(known is self for known in RECORD.operators):
            RECORD.operators.append(self)  # the leak scan reads every operator's log, whoever started it
        RECORD.secrets.update(kubeconfig_tokens(self.kubeconfig))
        # a Lease of its own (unless the test names one): test operators serve different namespaces side by side
        lease = {"SEP_LEASE_NAME": f"sep-test-{uuid.uuid4().hex[:10]}", "SEP_LEASE_NAMESPACE": "default"}
        environment = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **lease, **self.env}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "secured_endpoint.cli", "run", *self.scope, "--verbose"],
            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        if not wait:
            return
        wait_for(lambda: "secured-endpoint-operator started" in self.log_text() or self.process.poll() is not None,
                 timeout=30, message="the operator to start")
        if self.process.poll() is not None:
            pytest.fail(f"the operator exited at start-up:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if (scrape := self.metrics()) is not None:
            RECORD.snapshots.append((f"/metrics of {self.log_path} at stop", scrape))
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def serves(self, namespace: str, server: str) -> bool:
        """Is this operator running against ``server`` with ``namespace`` in its scope?"""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            config = yaml.safe_load(self.kubeconfig.read_text())
            if {cluster["cluster"]["server"] for cluster in config["clusters"]} != {server}:
                return False
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            return False
        if "--all-namespaces" in self.scope or "-A" in self.scope:
            return True
        patterns = [self.scope[i + 1] for i, arg in enumerate(self.scope[:-1]) if arg in ("--namespace", "-n")]
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in patterns)

    def metrics(self) -> str | None:
        """What ``/metrics`` says, when this operator serves it and runs."""
        port = int(self.env.get("SEP_METRICS_PORT") or 0)
        if not port or self.process is None or self.process.poll() is not None:
            return None
        address = self.env.get("SEP_METRICS_ADDRESS") or "127.0.0.1"
        host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
                return str(response.read().decode(errors="replace"))
        except OSError:
            return None


def kubeconfig_tokens(path: Path) -> set[str]:
    """The bearer tokens in a kubeconfig: credentials the operator must not repeat either."""
    try:
        config = yaml.safe_load(path.read_text())
        return {str(user["user"]["token"]) for user in config.get("users") or () if user["user"].get("token")}
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return set()


@dataclass
class SessionRecord:
    """What the leak scan reads besides what is left in the cluster when it runs (see the module docstring)."""

    secrets: set[str] = field(default_factory=set)
    client_ids: dict[str, str] = field(default_factory=dict)  # a client secret -> its client id
    operators: list[OperatorProcess] = field(default_factory=list)
    snapshots: list[tuple[str, str]] = field(default_factory=list)  # (what, text)
    channel_messages: list[str] = field(default_factory=list)  # "<channel> <message>" on the session Redis


RECORD = SessionRecord()


TEST_OPERATOR_ENV = {
    "SEP_STARTUP_SPREAD_SECONDS": "0",
    "SEP_REACTIVE_FLOOR_SECONDS": "1",
    "SEP_TOKEN_TIMEOUT_SECONDS": "2",
    "SEP_CREDENTIALS_RETRY_SECONDS": "60",
}


@pytest.fixture(scope="session")
def operator_processes() -> list[OperatorProcess]:
    """Every operator the session started (the leak scan reads all their logs); ``OperatorProcess.start``
    puts each in, so appending one is optional."""
    return RECORD.operators


def _operator(control_plane: controlplane.ControlPlane, log_path: Path, processes: list[OperatorProcess], *,
              scope: tuple[str, ...], env: dict[str, str]) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kubeconfig=control_plane.kubeconfig_path, log_path=log_path, scope=scope,
                              env={**TEST_OPERATOR_ENV, **env})
    processes.append(process)
    process.start()
    yield process
    process.stop()
    if os.environ.get("SEP_SHOW_OPERATOR_LOG"):
        print(process.log_text())


@pytest.fixture(scope="session")
def operator(control_plane: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory,
             operator_processes: list[OperatorProcess]) -> Iterator[OperatorProcess]:
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    yield from _operator(control_plane, log_path, operator_processes, scope=("--namespace", "t-*"), env={})


@dataclass
class RedisAccess:
    server: RedisServer
    username: str
    password: str
    db: int
    prefix: str

    def client(self) -> redis.Redis:
        """A synchronous client as a gateway would use it (TLS, ACL user, the operator's db)."""
        return redis.Redis(host=self.server.host, port=self.server.tls_port, db=self.db, username=self.username,
                           password=self.password, ssl=True, ssl_ca_certs=str(self.server.ca_path),
                           ssl_certfile=str(self.server.client_cert_path),
                           ssl_keyfile=str(self.server.client_key_path), decode_responses=True)

    def key(self, namespace: str, name: str) -> str:
        return f"{self.prefix}:{namespace}:{name}"


@pytest.fixture(scope="session")
def redis_access(secret_values: set[str]) -> Iterator[RedisAccess]:
    password = f"redis-{uuid.uuid4().hex}"
    secret_values.add(password)
    # strict, so that a client that ignores the username, the password or the certificate fails
    with RedisServer(acl_user=("sep-operator", password), disable_default_user=True, tls=True,
                     tls_client_auth="yes") as server:
        secret_values.update(pem_secrets(server.client_key_path.read_text()))
        access = RedisAccess(server=server, username="sep-operator", password=password, db=3, prefix="sep-test")
        recorder = ChannelRecorder(access, RECORD.channel_messages)
        recorder.start()
        try:
            yield access
        finally:
            recorder.stop()


def pem_secrets(pem: str) -> set[str]:
    """The lines of a PEM private key's body: what a leak of it would show."""
    return {line.strip() for line in pem.splitlines() if line.strip() and not line.startswith("-----")}


class ChannelRecorder(threading.Thread):
    """Keeps every message published on the session Redis (pattern ``*``: ``<prefix>:updated``,
    ``<prefix>:refresh``, …), reconnecting after an outage, for the leak scan."""

    def __init__(self, access: RedisAccess, into: list[str]) -> None:
        super().__init__(name="redis-channel-recorder", daemon=True)
        self.access, self.into = access, into
        self.subscribed = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                with self.access.client() as client, client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.psubscribe("*")
                    while not self._stopped.is_set():
                        message = pubsub.get_message(timeout=0.2)
                        self.subscribed.set()
                        if message is not None:
                            self.into.append(f"{message['channel']} {message['data']}")
            except (redis.RedisError, OSError):
                self._stopped.wait(0.2)  # Redis is down (a test's outage): subscribe again when it is back

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)


@pytest.fixture(scope="session")
def redis_operator(control_plane: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory,
                   operator_processes: list[OperatorProcess], redis_access: RedisAccess
                   ) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("redis-operator")
    yield from _operator(control_plane, workdir / "operator.log", operator_processes,
                         scope=("--namespace", "r-*"), env=redis_operator_env(redis_access, workdir))


def redis_operator_env(redis_access: RedisAccess, workdir: Path) -> dict[str, str]:
    """The settings of an operator that writes to the session's redis-server through every Redis setting."""
    password_file = workdir / "redis-password"
    password_file.write_text(redis_access.password + "\n")  # as a mounted Secret often has it
    server = redis_access.server
    return {
        "SEP_REDIS_HOST": server.host, "SEP_REDIS_PORT": str(server.tls_port),
        "SEP_REDIS_USERNAME": redis_access.username, "SEP_REDIS_PASSWORD_FILE": str(password_file),
        "SEP_REDIS_DB": str(redis_access.db), "SEP_REDIS_TLS": "true", "SEP_REDIS_CA_FILE": str(server.ca_path),
        "SEP_REDIS_CERT_FILE": str(server.client_cert_path), "SEP_REDIS_KEY_FILE": str(server.client_key_path),
        "SEP_REDIS_KEY_PREFIX": redis_access.prefix, "SEP_REDIS_SOCKET_TIMEOUT_SECONDS": "2",
        "SEP_REDIS_CONNECT_TIMEOUT_SECONDS": "2",
    }


@pytest.fixture(scope="session")
def secret_values() -> set[str]:
    """Every secret value the session handed out or saw issued; the leak scan looks for each."""
    return RECORD.secrets


def _token_server(secret_values: set[str], *, tls: bool) -> Iterator[TokenServer]:
    server = TokenServer(tls=tls)
    server.start()
    try:
        yield server
    finally:
        for issued in server.issued_tokens:
            secret_values.add(issued.access_token)
        for request in server.requests:
            secret_values.update(filter(None, (request.access_token, request.refresh_token)))
        server.stop()


@pytest.fixture
def token_server(secret_values: set[str]) -> Iterator[TokenServer]:
    yield from _token_server(secret_values, tls=False)


@pytest.fixture
def tls_token_server(secret_values: set[str]) -> Iterator[TokenServer]:
    yield from _token_server(secret_values, tls=True)


@dataclass
class Setup:
    """Creates what a test endpoint needs — credentials on both sides — and remembers every secret."""

    kube: Kube
    namespace: str
    secret_values: set[str]

    def client(self, server: TokenServer, *, secret_name: str = "oauth", **client_options: Any
               ) -> tuple[str, str]:
        client_id = f"client-{uuid.uuid4().hex[:8]}"
        client_secret = f"s3cr3t:{uuid.uuid4().hex}&+%"
        server.add_client(client_id, client_secret, **client_options)
        self.kube.create_secret(self.namespace, secret_name,
                                {"client_id": client_id, "client_secret": client_secret})
        self.secret_values.add(client_secret)
        RECORD.client_ids[client_secret] = client_id  # the scan also looks for Basic base64(id:secret)
        return client_id, client_secret

    def user(self, server: TokenServer, *, secret_name: str = "user") -> tuple[str, str]:
        username = f"user-{uuid.uuid4().hex[:8]}"
        password = f"pa55:{uuid.uuid4().hex}"
        server.add_user(username, password)
        self.kube.create_secret(self.namespace, secret_name, {"username": username, "password": password})
        self.secret_values.add(password)
        return username, password

    def endpoint(self, name: str, server: TokenServer, **spec: Any) -> dict[str, Any]:
        full = {"tokenUrl": server.token_url, "clientSecretRef": {"name": "oauth"}, **spec}
        if full["tokenUrl"].startswith("http://"):
            full.setdefault("allowInsecureHttp", True)
        return self.kube.create_endpoint(self.namespace, name, full)


@pytest.fixture
def setup(kube: Kube, namespace: str, secret_values: set[str]) -> Setup:
    return Setup(kube, namespace, secret_values)


@pytest.fixture
def redis_setup(kube: Kube, redis_namespace: str, secret_values: set[str]) -> Setup:
    return Setup(kube, redis_namespace, secret_values)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
