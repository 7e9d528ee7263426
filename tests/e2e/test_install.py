"""The install, proven on a real node: ``kubectl apply -k manifests/`` runs the image built here as two Pods.

One Cluster with a node (``secured_endpoint_devenv.node``) for the whole module, the image archive of
devenv/build-image.sh imported into its containerd, and a token server bound to the pod bridge's host address
(the only address besides the ``kubernetes`` Service that Pods reach). The cases run in order, each on what the
one before left:

- a server-side dry run of ``-k manifests/`` succeeds, then the apply; both operator Pods become Ready through
  their readiness probe and exactly one of them holds the Lease;
- each Pod runs as 65532 with a read-only root, all capabilities dropped and no privilege escalation: in the Pod
  spec, and on the host in ``/proc/<pid>`` of the container's main process (found with ``ctr tasks ls``);
- a SecuredEndpoint in a test namespace gets its token Secret from the operator in the Pod;
- ``kubectl auth can-i --as=<the operator's ServiceAccount>``: what it can do and what it cannot;
- the leader's Pod force-deleted, then (several times) the leader's process SIGKILLed through containerd: the
  Lease holder changes, the takeover is measured, a refresh follows; a ``rollout restart`` loses no refresh;
  the token in the Secret is never expired while this goes on;
- uninstall (``kubectl delete -k manifests/`` after the SecuredEndpoints) leaves no Pod, no ClusterRole, no
  Lease, no CRD, and the namespace goes;
- the namespaced install (rbac-namespaced.yaml instead of rbac-cluster.yaml, ``--namespace NS``) the same
  way, briefly: a token in NS, no Secret read outside NS, no CRD or namespace reads; its uninstall leaves
  nothing either.

Skipped, saying why, only when the node cannot run here (``NodeUnavailable``) or podman cannot build the
image. ``SEP_INSTALL_KILLS`` sets the number of SIGKILLs (default 3; the issue's figure is over 10).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from secured_endpoint_devenv.node import Cluster, NodeUnavailable
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import RECORD, ROOT, Kube, Setup, wait_for
from tests.e2e.test_image import SCRIPT, show, why_podman_cannot_run

pytestmark = [pytest.mark.e2e, pytest.mark.node]

MANIFESTS = ROOT / "manifests"
SYSTEM = "secured-endpoint-system"
LEASE = "secured-endpoint-operator"
SELECTOR = "app.kubernetes.io/name=secured-endpoint-operator"
PART_OF = "app.kubernetes.io/part-of=secured-endpoint-operator"
ACCOUNT = f"system:serviceaccount:{SYSTEM}:secured-endpoint-operator"
LIFETIME = 60  # short tokens, refreshed half-way: a takeover must not let one expire
KILLS = int(os.environ.get("SEP_INSTALL_KILLS", "3"))
FIGURES: dict[str, list[float]] = {}


# --------------------------------------------------------------------------- the module's cluster


@pytest.fixture(scope="module")
def archive() -> Path:
    why = why_podman_cannot_run()
    if why is not None:
        pytest.skip(why)
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, f"devenv/build-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return Path(show("archive"))


@pytest.fixture(scope="module")
def cluster(archive: Path) -> Iterator[Cluster]:
    try:
        running = Cluster(node=True).start()
    except NodeUnavailable as exc:
        pytest.skip(f"the node cannot run on this machine: {exc}")
    try:
        RECORD.secrets.add(running.control_plane.admin_token)
        references = running.image_import(archive)
        assert show("cluster-image") in references
        yield running
    finally:
        _print_figures()
        running.stop()


@pytest.fixture(scope="module")
def kube(cluster: Cluster) -> Kube:
    client = cluster.control_plane.api_client()
    return Kube(k8s.CoreV1Api(client), k8s.CustomObjectsApi(client), cluster.control_plane)


@pytest.fixture(scope="module")
def server(cluster: Cluster) -> Iterator[TokenServer]:
    """On the bridge's host address: Pods reach it, nothing outside this machine does."""
    gateway = str(next(ipaddress.ip_network(cluster.node.pod_subnet).hosts()))
    token_server = TokenServer(host=gateway)
    token_server.lifetime_seconds = LIFETIME
    token_server.start()
    yield token_server
    RECORD.secrets.update(issued.access_token for issued in token_server.issued_tokens)
    token_server.stop()


@pytest.fixture(scope="module")
def watched(cluster: Cluster, kube: Kube) -> str:
    name = f"inst-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    return name


# --------------------------------------------------------------------------- helpers


def _json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _pods(cluster: Cluster) -> list[dict[str, Any]]:
    items = _json(cluster, "get", "pods", "-n", SYSTEM, "-l", SELECTOR)["items"]
    return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", ()))


def _wait_two_ready(cluster: Cluster, timeout: float = 180) -> list[dict[str, Any]]:
    wait_for(lambda: len(_pods(cluster)) == 2, timeout=timeout, message="two operator Pods")
    done = cluster.kubectl("wait", "--for=condition=Ready", "pod", "-l", SELECTOR, "-n", SYSTEM,
                           f"--timeout={int(timeout)}s", timeout=timeout + 10, check=False)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{_describe(cluster)}\n{_last_logs(cluster)}"
    pods: list[dict[str, Any]] = wait_for(
        lambda: (pods := _pods(cluster)) and len(pods) == 2 and all(map(_ready, pods)) and pods,
        timeout=timeout, message="two Ready operator Pods")
    return pods


def _describe(cluster: Cluster) -> str:
    return cluster.kubectl("describe", "pods", "-n", SYSTEM, check=False).stdout[-4000:]


def _last_logs(cluster: Cluster) -> str:
    """The end of each operator container's log, of the run before the current one where it restarted."""
    tails = []
    for pod in _pods(cluster):
        name = pod["metadata"]["name"]
        done = cluster.kubectl("logs", "-n", SYSTEM, name, "--previous", "--tail=15", check=False)
        if done.returncode != 0:
            done = cluster.kubectl("logs", "-n", SYSTEM, name, "--tail=15", check=False)
        tails.append(f"--- {name}:\n{done.stdout}{done.stderr}")
    return "\n".join(tails)


def _lease(cluster: Cluster) -> dict[str, Any] | None:
    done = cluster.kubectl("get", "lease", LEASE, "-n", SYSTEM, "-o", "json", check=False)
    return json.loads(done.stdout)["spec"] if done.returncode == 0 else None


def _holder(cluster: Cluster) -> str:
    return str((_lease(cluster) or {}).get("holderIdentity") or "")


def _holder_pod(identity: str) -> str:
    return identity.rsplit("_", 1)[0]  # "<pod name>_<uuid4>"


def _container_id(pod: dict[str, Any]) -> str:
    (status,) = pod["status"]["containerStatuses"]
    return str(status["containerID"]).removeprefix("containerd://")


def _host_pid(cluster: Cluster, container_id: str) -> int:
    for line in cluster.node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"no containerd task {container_id}")


def _can(cluster: Cluster, *args: str) -> bool:
    answer = cluster.kubectl("auth", "can-i", *args, f"--as={ACCOUNT}", check=False).stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def _print_figures() -> None:
    for what, values in FIGURES.items():
        if values:
            print(f"\n[install] {what}: " + ", ".join(f"{v:.1f}" for v in values) +
                  f" s (median {statistics.median(values):.1f}, max {max(values):.1f})")


class Sampler(threading.Thread):
    """Reads the token Secret every half second: each token seen, with when it was seen."""

    def __init__(self, kube: Kube, namespace: str, secret: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.namespace, self.secret = kube, namespace, secret
        self.seen: list[tuple[float, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            data = self.kube.secret_data(self.namespace, self.secret) or {}
            if "access_token" in data:
                self.seen.append((time.time(), data["access_token"]))

    def expired(self, server: TokenServer) -> list[str]:
        expiry = {issued.access_token: issued.expires_at for issued in server.issued_tokens}
        return [f"seen at {at:.1f}, expired at {expiry.get(token, 0):.1f}" for at, token in self.seen
                if expiry.get(token, 0) <= at]


def _issued_after(server: TokenServer, client_id: str, moment: float) -> list[Any]:
    return [issued for issued in server.issued_tokens if issued.client_id == client_id and issued.issued_at > moment]


_STATE: dict[str, Any] = {}


# --------------------------------------------------------------------------- the cluster-wide install


def test_dry_run_then_apply_and_two_pods_ready(cluster: Cluster) -> None:
    # On an empty cluster a dry run cannot admit the namespaced objects: their namespace is not created by it.
    fresh = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(MANIFESTS), check=False)
    assert fresh.returncode != 0
    assert set(fresh.stderr.splitlines()) == {f'Error from server (NotFound): namespaces "{SYSTEM}" not found'}
    assert cluster.kubectl("get", "namespace", SYSTEM, check=False).returncode != 0, "a dry run created something"
    # With the namespace there, everything passes the server's admission and validation without being stored.
    cluster.kubectl("apply", "--server-side", "-f", str(MANIFESTS / "namespace.yaml"))
    dry = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(MANIFESTS), check=False)
    assert dry.returncode == 0, dry.stderr
    assert "(server dry run)" in dry.stdout
    assert _json(cluster, "get", "deployments,serviceaccounts,roles", "-n", SYSTEM, "-l", PART_OF)["items"] == []
    started = time.monotonic()
    cluster.kubectl("apply", "-k", str(MANIFESTS))
    pods = _wait_two_ready(cluster)
    FIGURES["install to two Ready Pods"] = [time.monotonic() - started]
    assert all(pod["spec"]["containers"][0]["image"] == "secured-endpoint-operator:0.1.0" for pod in pods)
    # Ready through the readiness probe: the kubelet's HTTP GET of /readyz on 8081.
    probe = pods[0]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert probe["httpGet"]["port"] in (8081, "health")


def test_exactly_one_pod_holds_the_lease(cluster: Cluster) -> None:
    names = {pod["metadata"]["name"] for pod in _pods(cluster)}
    holder = wait_for(lambda: _holder(cluster), timeout=30, message="a Lease holder")
    assert _holder_pod(holder) in names, (holder, names)
    table = cluster.kubectl("get", "lease", LEASE, "-n", SYSTEM).stdout
    assert holder in table


def test_pods_run_as_non_root_read_only_without_capabilities(cluster: Cluster) -> None:
    for pod in _pods(cluster):
        spec, (container,) = pod["spec"], pod["spec"]["containers"]
        security = {**spec.get("securityContext", {}), **container["securityContext"]}
        assert security["runAsUser"] == 65532
        assert security["runAsGroup"] == 65532
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert not security["capabilities"].get("add")
        # What the kernel says about the container's main process, seen from the host.
        pid = _host_pid(cluster, _container_id(pod))
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split() == ["65532"] * 4, status["Uid"]
        assert status["Gid"].split() == ["65532"] * 4, status["Gid"]
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, (capabilities, status[capabilities])
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"  # RuntimeDefault: a filter
        mounts = {fields[4]: fields[5].split(",") for fields in
                  (line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())}
        assert "ro" in mounts["/"], mounts["/"]
        assert "rw" in mounts["/tmp"], mounts["/tmp"]  # the emptyDir
        assert b"secured-endpoint-operator" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_an_endpoint_gets_its_token_from_the_operator_in_the_pod(
        cluster: Cluster, kube: Kube, server: TokenServer, watched: str) -> None:
    setup = Setup(kube, watched, RECORD.secrets)
    client_id, _ = setup.client(server)
    assert server.token_url.startswith("http://10.244.0.1:")
    setup.endpoint("api", server, refresh={"refreshBeforePercent": 50})
    token = wait_for(lambda: (kube.secret_data(watched, "api-token") or {}).get("access_token"), timeout=60,
                     message="the token Secret written by the operator in the Pod")
    assert token in {issued.access_token for issued in server.issued_tokens}
    assert server.requests[-1].client_id == client_id
    kube.wait_ready(watched, "api", timeout=30)
    sampler = Sampler(kube, watched, "api-token")
    sampler.start()
    _STATE.update(client_id=client_id, sampler=sampler)


def test_what_the_operator_may_and_may_not_do(cluster: Cluster, watched: str) -> None:
    may = [("get", "secrets", "-n", watched), ("create", "secrets", "-n", watched),
           ("patch", "securedendpoints.secured-endpoint.io", "-n", watched),
           ("patch", "securedendpoints.secured-endpoint.io/status", "-n", watched),
           ("list", "customresourcedefinitions.apiextensions.k8s.io"),
           ("update", f"leases.coordination.k8s.io/{LEASE}", "-n", SYSTEM)]
    may_not = [("delete", "customresourcedefinitions.apiextensions.k8s.io"),
               ("create", "clusterroles.rbac.authorization.k8s.io"),
               ("create", "rolebindings.rbac.authorization.k8s.io", "-n", watched),
               ("update", "securedendpoints.secured-endpoint.io", "-n", watched),
               ("delete", "securedendpoints.secured-endpoint.io", "-n", watched),
               ("create", "pods", "-n", SYSTEM), ("get", "nodes"), ("list", "namespaces"),
               ("delete", "namespaces"), ("update", "leases.coordination.k8s.io/another", "-n", SYSTEM),
               ("create", "serviceaccounts/token", "-n", SYSTEM), ("impersonate", "users")]
    assert [args for args in may if not _can(cluster, *args)] == []
    assert [args for args in may_not if _can(cluster, *args)] == []


def _take_over(cluster: Cluster, server: TokenServer, kill: Any, what: str) -> None:
    """Kill the leader with ``kill(pod)``; the Lease goes to another identity, a refresh follows."""
    before = wait_for(lambda: _holder(cluster), timeout=30, message="a Lease holder")
    (leader,) = [pod for pod in _pods(cluster) if pod["metadata"]["name"] == _holder_pod(before)]
    killed = time.monotonic()
    killed_at = time.time()
    kill(leader)
    after = wait_for(lambda: (holder := _holder(cluster)) and holder != before and holder, timeout=60,
                     interval=0.1, message=f"another Lease holder after {what}")
    FIGURES.setdefault(f"takeover after {what}", []).append(time.monotonic() - killed)
    FIGURES.setdefault(f"holder after {what} is the other Pod (1) or the restarted one (0)", []).append(
        float(_holder_pod(after) != _holder_pod(before)))
    # Refreshed half-way through 60 s: one more refresh within a lifetime, by the new leader.
    wait_for(lambda: _issued_after(server, _STATE["client_id"], killed_at), timeout=LIFETIME, interval=0.5,
             message=f"a refresh after {what}")
    _wait_two_ready(cluster)


def test_the_leaders_pod_force_deleted_the_other_takes_over(cluster: Cluster, server: TokenServer) -> None:
    def force_delete(pod: dict[str, Any]) -> None:
        cluster.kubectl("delete", "pod", "-n", SYSTEM, pod["metadata"]["name"], "--grace-period=0", "--force")
    _take_over(cluster, server, force_delete, "a forced Pod deletion")
    assert FIGURES["holder after a forced Pod deletion is the other Pod (1) or the restarted one (0)"] == [1.0]


def test_the_leaders_process_sigkilled_another_takes_over(cluster: Cluster, server: TokenServer) -> None:
    def sigkill(pod: dict[str, Any]) -> None:
        cluster.node.ctr("tasks", "kill", "--signal", "SIGKILL", _container_id(pod))
    for _ in range(KILLS):
        _take_over(cluster, server, sigkill, "SIGKILL")
    # client-go's rules: a holder that stopped renewing is replaced after the 15 s lease, plus < 2.2 retries.
    assert max(FIGURES["takeover after SIGKILL"]) < 25, FIGURES["takeover after SIGKILL"]


def test_a_rolling_update_loses_no_refresh(cluster: Cluster, kube: Kube, server: TokenServer, watched: str) -> None:
    old = {pod["metadata"]["name"] for pod in _pods(cluster)}
    started_at = time.time()
    started = time.monotonic()
    cluster.kubectl("rollout", "restart", "-n", SYSTEM, "deployment/secured-endpoint-operator")
    cluster.kubectl("rollout", "status", "-n", SYSTEM, "deployment/secured-endpoint-operator", "--timeout=240s",
                    timeout=250)
    FIGURES["rollout restart"] = [time.monotonic() - started]
    # the old Pods gone, terminating ones included (kubectl wait -l would wait for them to be Ready)
    wait_for(lambda: not old & {pod["metadata"]["name"] for pod in _json(
        cluster, "get", "pods", "-n", SYSTEM, "-l", SELECTOR)["items"]}, timeout=60, message="the old Pods gone")
    pods = _wait_two_ready(cluster)
    assert not old & {pod["metadata"]["name"] for pod in pods}
    wait_for(lambda: _holder_pod(_holder(cluster)) in {pod["metadata"]["name"] for pod in pods}, timeout=30,
             message="a new Pod holds the Lease")
    ends = time.time() + LIFETIME / 2 + 5
    wait_for(lambda: time.time() > ends, timeout=LIFETIME, interval=1, message="one more refresh period")
    issued = sorted(i.issued_at for i in server.issued_tokens if i.client_id == _STATE["client_id"]
                    and i.issued_at > started_at - LIFETIME)
    gaps = [later - earlier for earlier, later in itertools.pairwise(issued)]
    # Every token refreshed half-way: no gap reaches a lifetime, so none expired in between.
    assert gaps, issued
    assert max(gaps) < LIFETIME, gaps
    sampler: Sampler = _STATE["sampler"]
    assert sampler.expired(server) == []
    assert len(sampler.seen) > 50


def test_uninstall_leaves_nothing_behind(cluster: Cluster, kube: Kube, server: TokenServer, watched: str) -> None:
    sampler: Sampler = _STATE["sampler"]
    sampler.stopping.set()
    sampler.join()
    assert sampler.expired(server) == [], "a target held an expired token"
    for pod in _pods(cluster):
        logs = cluster.kubectl("logs", "-n", SYSTEM, pod["metadata"]["name"], check=False).stdout
        RECORD.snapshots.append((f"log of the operator Pod {pod['metadata']['name']}", logs))
    kube.delete_endpoint(watched, "api")
    wait_for(lambda: kube.get_endpoint(watched, "api") is None and kube.secret_data(watched, "api-token") is None,
             timeout=30, message="the endpoint released and its token Secret removed by the operator")
    started = time.monotonic()
    cluster.kubectl("delete", "-k", str(MANIFESTS), "--timeout=120s", timeout=130)
    wait_for(lambda: cluster.kubectl("get", "namespace", SYSTEM, check=False).returncode != 0, timeout=120,
             message=f"namespace {SYSTEM} gone")
    FIGURES["uninstall"] = [time.monotonic() - started]
    _assert_nothing_left(cluster)


def _assert_nothing_left(cluster: Cluster) -> None:
    assert _json(cluster, "get", "pods", "-A", "-l", SELECTOR)["items"] == []
    for kind in ("clusterroles", "clusterrolebindings", "roles", "rolebindings", "serviceaccounts",
                 "poddisruptionbudgets", "deployments"):
        assert _json(cluster, "get", kind, "-A", "-l", PART_OF)["items"] == [], kind
    assert _lease(cluster) is None
    crds = [crd["metadata"]["name"] for crd in _json(cluster, "get", "crd")["items"]]
    assert "securedendpoints.secured-endpoint.io" not in crds
    leases = [lease["metadata"]["name"] for lease in _json(cluster, "get", "leases", "-A")["items"]]
    assert LEASE not in leases


# --------------------------------------------------------------------------- the namespaced install


def _namespaced_documents(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """``-k manifests/`` with rbac-namespaced.yaml's Roles (for ``namespace``) instead of the ClusterRole, and
    ``--namespace NS`` instead of ``--all-namespaces``."""
    built = [doc for doc in yaml.safe_load_all(cluster.kubectl("kustomize", str(MANIFESTS)).stdout) if doc]
    cluster_rbac = {(doc["kind"], doc["metadata"]["name"]) for doc in yaml.safe_load_all(
        (MANIFESTS / "rbac-cluster.yaml").read_text()) if doc and doc["kind"].startswith("Cluster")}
    documents = [doc for doc in built if (doc["kind"], doc["metadata"]["name"]) not in cluster_rbac]
    present = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]) for doc in documents}
    for doc in yaml.safe_load_all((MANIFESTS / "rbac-namespaced.yaml").read_text()):
        if doc["metadata"]["namespace"] == "team-a":
            doc["metadata"]["namespace"] = namespace
        if (doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]) not in present:
            documents.append(doc)  # the Lease Role is in both files
    (deployment,) = [doc for doc in documents if doc["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--all-namespaces" in command
    command[command.index("--all-namespaces"):] = ["--namespace", namespace]
    assert not [doc for doc in documents if doc["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    return documents


def test_the_namespaced_install_serves_its_namespace_only(cluster: Cluster, kube: Kube, server: TokenServer) -> None:
    namespace = f"inst-ns-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    # a server-side dry run stores nothing, not even the namespace the other objects go to: that one first
    cluster.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": _namespaced_documents(cluster, namespace)})
    dry = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=listed, check=False)
    assert dry.returncode == 0, dry.stderr
    cluster.kubectl("apply", "-f", "-", input=listed)
    _wait_two_ready(cluster)
    wait_for(lambda: _holder(cluster), timeout=30, message="a Lease holder")

    setup = Setup(kube, namespace, RECORD.secrets)
    client_id, _ = setup.client(server)
    setup.endpoint("api", server)
    token = wait_for(lambda: (kube.secret_data(namespace, "api-token") or {}).get("access_token"), timeout=60,
                     message="the token Secret written by the namespaced operator")
    assert token in {issued.access_token for issued in server.issued_tokens if issued.client_id == client_id}

    assert _can(cluster, "get", "secrets", "-n", namespace)
    assert _can(cluster, "patch", "securedendpoints.secured-endpoint.io", "-n", namespace)
    assert _can(cluster, "update", f"leases.coordination.k8s.io/{LEASE}", "-n", SYSTEM)
    may_not = [("get", "secrets", "-n", "kube-system"), ("get", "secrets", "-n", "default"),
               ("list", "secrets", "--all-namespaces"), ("get", "secrets", "-n", SYSTEM),
               ("list", "customresourcedefinitions.apiextensions.k8s.io"), ("list", "namespaces"),
               ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
               ("create", "clusterroles.rbac.authorization.k8s.io"),
               ("list", "securedendpoints.secured-endpoint.io", "--all-namespaces")]
    assert [args for args in may_not if _can(cluster, *args)] == []

    for pod in _pods(cluster):
        logs = cluster.kubectl("logs", "-n", SYSTEM, pod["metadata"]["name"], check=False).stdout
        RECORD.snapshots.append((f"log of the namespaced operator Pod {pod['metadata']['name']}", logs))
        assert "forbidden" not in logs.lower(), logs[-3000:]
    kube.delete_endpoint(namespace, "api")
    wait_for(lambda: kube.get_endpoint(namespace, "api") is None, timeout=30, message="the endpoint released")
    cluster.kubectl("delete", "-f", "-", "--timeout=120s", input=listed, timeout=130)
    wait_for(lambda: cluster.kubectl("get", "namespace", SYSTEM, check=False).returncode != 0, timeout=120,
             message=f"namespace {SYSTEM} gone")
    _assert_nothing_left(cluster)
    assert _json(cluster, "get", "roles,rolebindings", "-n", namespace)["items"] == []
