"""A real node beside the control plane: ``secured_endpoint_devenv.node.Cluster``.

kube-controller-manager, kube-scheduler and a kubelet on containerd + runc, all built or installed here. Cases:

- stopping the cluster leaves nothing behind: no process, mount, bridge or work dir; the kernel settings the
  kubelet changed are back (this runs first, on a cluster of its own, with a Pod running);
- a node whose process died without stopping it (SIGKILL) is cleaned up by the next node: its kubelet,
  containerd, shims and containers killed, mounts and work dir gone, kernel settings put back;
- the node registers as ``127.0.0.1`` and is Ready, with kubelet v1.34.4 on containerd;
- a Pod from an image imported with ``image_import`` (under the name its manifest uses) runs to completion, its
  service-account token is mounted, and its output comes back through ``kubectl logs`` (apiserver -> kubelet);
- a Pod reaches the apiserver like an in-cluster client (the ``kubernetes`` Service, its mounted token) and is
  authenticated as its ServiceAccount;
- a Deployment gets Ready (an HTTP readiness probe from the kubelet into the pod network), and deleting it
  deletes its ReplicaSet and Pods;
- the garbage collector deletes an object whose owner is gone, and waits for it in a foreground deletion;
- a deleted namespace really goes, with what was in it;
- the token controller signs service-account tokens with the apiserver's key: the apiserver authenticates one.

Without a node (a machine that cannot run one: the skip says exactly why), the controller tests still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint_devenv import controlplane, node
from secured_endpoint_devenv.node import Cluster, NodeUnavailable
from tests.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.node]

_UNAVAILABLE: dict[str, str] = {}


def _start(*, with_node: bool = True) -> Cluster:
    return Cluster(node=with_node).start()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    try:
        running = _start()
    except NodeUnavailable as exc:
        _UNAVAILABLE["reason"] = str(exc)
        print(f"\n[node] this machine cannot run a node: {exc}\n[node] controllers only")
        running = _start(with_node=False)
    yield running
    running.stop()


def _needs_node(cluster: Cluster) -> node.Node:
    if "reason" in _UNAVAILABLE:
        pytest.skip(f"the node cannot run on this machine: {_UNAVAILABLE['reason']}")
    return cluster.node


@pytest.fixture
def core(cluster: Cluster) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(cluster.control_plane.api_client())


@pytest.fixture
def namespace(cluster: Cluster, core: k8s.CoreV1Api) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    # Pods are admitted only once the service-account controller has made the namespace's `default`.
    wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", name)), timeout=30,
             message=f"ServiceAccount {name}/default")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _exists(read: Any) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def _pod(name: str, image: str, script: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", script]}], **spec}}


def _phase(core: k8s.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, namespace).status.phase)


# --------------------------------------------------------------------------- first: a cluster of its own


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True, check=False).returncode == 0


def test_stop_leaves_nothing_behind() -> None:
    try:
        running = _start()
    except NodeUnavailable as exc:
        pytest.skip(f"the node cannot run on this machine: {exc}")
    try:
        _apply(running, "default", _pod("sleeper", node.BUSYBOX_IMAGE, "trap 'exit 0' TERM; sleep 3600 & wait"))
        core = k8s.CoreV1Api(running.control_plane.api_client())
        wait_for(lambda: _phase(core, "default", "sleeper") == "Running", timeout=60, message="sleeper Running")
        workdir = running.node.workdir
        address = str(running.node.containerd_address)
        pids = [*running.node.pids, *running.controllers.pids, *running.control_plane.pids]
        shims = node._pids_whose_cmdline_has("containerd-shim", address)
        mounts = node._mounts_under(workdir)
        # What the node found when it started (under its machine lock), to be found again after it stopped.
        sysctls, made_dirs = dict(running.node._sysctls), list(running.node._made_dirs)
        assert shims, "a running Pod has a containerd shim"
        assert any("rootfs" in point for point in mounts), mounts
        assert _link_exists(node.BRIDGE)
        assert Path("/sys/fs/cgroup/memory/kubepods").is_dir()
    finally:
        running.stop()
    # Checked under the machine lock: a node another test run starts right now must not be taken for ours.
    with contextlib.closing(node._machine_lock(print)):
        assert [pid for pid in [*pids, *shims] if node.process_running(pid)] == []
        assert node._mounts_under(workdir) == []
        assert not workdir.exists()
        assert not _link_exists(node.BRIDGE)
        assert {name: node._read_sysctl(name) for name in sysctls} == sysctls
        assert [path for path in made_dirs if path.exists()] == []
        assert not Path("/sys/fs/cgroup/memory/kubepods").exists()
        for table in ("nat", "filter"):
            rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
            assert "SEP-NODE" not in rules, rules
        results = Path("/var/lib/cni/results")
        leftovers = [name for name in os.listdir(results) if name.startswith("sep-pods-")] if results.is_dir() else []
        assert leftovers == []


_DOOMED = """
import json, sys, time
import yaml
from secured_endpoint_devenv import node
cluster = node.Cluster(progress=lambda line: None).start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan"}, "spec": {"containers": [
    {"name": "main", "image": node.BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}
cluster.kubectl("apply", "-n", "default", "-f", "-", input=yaml.safe_dump(pod))
cluster.kubectl("wait", "--for=condition=Ready", "pod/orphan", "--timeout=60s", timeout=70)
print(json.dumps({"workdir": str(cluster.node.workdir), "node": cluster.node.pids, "sysctls": cluster.node._sysctls,
                  "others": [*cluster.controllers.pids, *cluster.control_plane.pids],
                  "other_dirs": [str(cluster._workdir), str(cluster.controllers.workdir),
                                 str(cluster.control_plane.workdir)]}), flush=True)
time.sleep(3600)
"""


def test_a_node_that_was_not_stopped_is_cleaned_up_by_the_next() -> None:
    doomed = subprocess.Popen([sys.executable, "-c", _DOOMED], stdout=subprocess.PIPE, text=True)
    try:
        assert doomed.stdout is not None
        line = doomed.stdout.readline()
    finally:
        doomed.kill()  # SIGKILL: no stop(), no atexit
        doomed.wait()
    if not line:
        pytest.skip("the first node did not start (see its output above)")
    left = json.loads(line)
    for pid in left["others"]:  # the control plane's and the controllers' orphans are not the node's to reap
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for directory in left["other_dirs"]:
        shutil.rmtree(directory, ignore_errors=True)
    workdir = Path(left["workdir"])
    shims = node._pids_whose_cmdline_has("containerd-shim", str(workdir))
    assert [pid for pid in left["node"] if node.process_running(pid)] == left["node"], "kubelet, containerd orphaned"
    assert shims
    assert node._mounts_under(workdir)

    running = _start()
    try:
        assert not workdir.exists()
        assert [pid for pid in [*left["node"], *shims] if node.process_running(pid)] == []
        assert node._mounts_under(workdir) == []
        assert running.node._sysctls == left["sysctls"]  # what the killed node found, put back before this one
    finally:
        running.stop()


# --------------------------------------------------------------------------- the node


def test_node_registered_and_ready(cluster: Cluster, core: k8s.CoreV1Api) -> None:
    the_node = _needs_node(cluster)
    status = core.read_node(the_node.name).status
    assert {c.type: c.status for c in status.conditions}["Ready"] == "True"
    assert status.node_info.kubelet_version == controlplane.kube_version()
    assert status.node_info.container_runtime_version.startswith("containerd://")
    assert [(a.type, a.address) for a in status.addresses if a.type == "InternalIP"] == [("InternalIP", "127.0.0.1")]


def test_pod_from_an_imported_image_runs_to_completion(cluster: Cluster, core: k8s.CoreV1Api, namespace: str,
                                                       tmp_path: Path) -> None:
    the_node = _needs_node(cluster)
    archive = node.write_busybox_image(tmp_path / "tools.tar", "sep.local/e2e-tools:1")
    references = cluster.image_import(archive, also_tag=["e2e-tools:1"])
    assert references == ["sep.local/e2e-tools:1", "docker.io/library/e2e-tools:1"]
    assert "docker.io/library/e2e-tools:1" in the_node.images()

    script = ('echo "hello from $(hostname) as uid $(id -u)"; '
              'echo "namespace $(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"')
    _apply(cluster, namespace, _pod("hello", "e2e-tools:1", script))  # the name a manifest would use
    wait_for(lambda: _phase(core, namespace, "hello") in ("Succeeded", "Failed"), timeout=60,
             message="hello finished")
    pod = core.read_namespaced_pod("hello", namespace)
    assert pod.status.phase == "Succeeded", pod.status
    assert pod.spec.node_name == the_node.name
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    logs = cluster.kubectl("logs", "-n", namespace, "hello").stdout  # through the apiserver to the kubelet
    assert logs.splitlines() == ["hello from hello as uid 0", f"namespace {namespace}"]


def test_deployment_gets_ready_and_its_deletion_removes_the_pods(cluster: Cluster, core: k8s.CoreV1Api,
                                                                 namespace: str) -> None:
    _needs_node(cluster)
    container = {
        "name": "web", "image": node.BUSYBOX_IMAGE, "imagePullPolicy": "Never",
        "command": ["sh", "-c", "mkdir -p /www && echo ready > /www/index.html && exec httpd -f -p 8080 -h /www"],
        # The kubelet probes from the host into the pod network, so Ready proves the bridge works.
        "readinessProbe": {"httpGet": {"path": "/index.html", "port": 8080}, "periodSeconds": 1},
    }
    _apply(cluster, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}}},
    })
    cluster.kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=90s", timeout=100)
    deployment = json.loads(cluster.kubectl("get", "-n", namespace, "deployment/web", "-o", "json").stdout)
    assert deployment["status"]["readyReplicas"] == 2
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    ips = sorted(pod.status.pod_ip for pod in pods)
    assert len(set(ips)) == 2, ips
    assert all(ip.startswith("10.244.0.") for ip in ips), ips

    cluster.kubectl("delete", "-n", namespace, "deployment/web", "--wait=false")
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app=web").items, timeout=60,
             message="the Deployment's Pods deleted by the garbage collector")
    replica_sets = json.loads(cluster.kubectl("get", "-n", namespace, "replicasets", "-o", "json").stdout)
    assert replica_sets["items"] == []


def test_pod_reaches_the_apiserver_as_its_service_account(cluster: Cluster, namespace: str,
                                                          core: k8s.CoreV1Api) -> None:
    the_node = _needs_node(cluster)
    host, port = the_node.kubernetes_service
    review = '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}'
    # What an in-cluster client does: the Service address from the environment, the mounted token.
    script = ('T=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token); '
              'echo "service $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"; '
              f"wget -q -O- --no-check-certificate --header 'Authorization: Bearer '$T "
              f"--header 'Content-Type: application/json' --post-data '{review}' "
              "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews")
    _apply(cluster, namespace, _pod("caller", node.BUSYBOX_IMAGE, script))
    wait_for(lambda: _phase(core, namespace, "caller") in ("Succeeded", "Failed"), timeout=60,
             message="caller finished")
    first, _, body = cluster.kubectl("logs", "-n", namespace, "caller").stdout.partition("\n")
    assert first == f"service {host}:{port}"
    assert json.loads(body)["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default"
    assert _phase(core, namespace, "caller") == "Succeeded"


# --------------------------------------------------------------------------- the controllers (node or not)


def _config_map(core: k8s.CoreV1Api, namespace: str, name: str, owner: Any = None) -> Any:
    references = None
    if owner is not None:
        references = [k8s.V1OwnerReference(api_version="v1", kind="ConfigMap", name=owner.metadata.name,
                                           uid=owner.metadata.uid, block_owner_deletion=True)]
    return core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name=name, owner_references=references), data={"k": "v"}))


def test_garbage_collector_deletes_what_an_owner_leaves(core: k8s.CoreV1Api, namespace: str) -> None:
    owner = _config_map(core, namespace, "owner")
    _config_map(core, namespace, "owned", owner)
    _config_map(core, namespace, "unrelated")
    core.delete_namespaced_config_map("owner", namespace)  # background propagation
    wait_for(lambda: not _exists(lambda: core.read_namespaced_config_map("owned", namespace)), timeout=30,
             message="owned ConfigMap deleted by the garbage collector")
    assert _exists(lambda: core.read_namespaced_config_map("unrelated", namespace))

    owner = _config_map(core, namespace, "parent")
    _config_map(core, namespace, "child", owner)
    core.delete_namespaced_config_map("parent", namespace, propagation_policy="Foreground")
    wait_for(lambda: not _exists(lambda: core.read_namespaced_config_map("parent", namespace)), timeout=30,
             message="parent gone after its child (foreground deletion)")
    assert not _exists(lambda: core.read_namespaced_config_map("child", namespace))


def test_deleted_namespace_goes_with_its_contents(cluster: Cluster, core: k8s.CoreV1Api) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    _config_map(core, name, "content")
    if "reason" not in _UNAVAILABLE:  # with a node, a running Pod must be stopped by the kubelet first
        wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", name)), timeout=30,
                 message="default ServiceAccount")
        _apply(cluster, name, _pod("sleeper", node.BUSYBOX_IMAGE, "trap 'exit 0' TERM; sleep 3600 & wait"))
        wait_for(lambda: _phase(core, name, "sleeper") == "Running", timeout=60, message="sleeper Running")
    core.delete_namespace(name)
    wait_for(lambda: not _exists(lambda: core.read_namespace(name)), timeout=60,
             message=f"namespace {name} deleted by the namespace controller")


def test_token_controller_signs_with_the_apiservers_key(cluster: Cluster, core: k8s.CoreV1Api,
                                                        namespace: str) -> None:
    core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="robot")))
    core.create_namespaced_secret(namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="robot-token", annotations={"kubernetes.io/service-account.name": "robot"}),
        type="kubernetes.io/service-account-token"))

    def token() -> str | None:
        data = core.read_namespaced_secret("robot-token", namespace).data or {}
        return data.get("token")

    import base64

    value = base64.b64decode(wait_for(token, timeout=30, message="token filled in")).decode()
    review = k8s.AuthenticationV1Api(cluster.control_plane.api_client()).create_token_review(
        k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=value)))
    assert review.status.authenticated is True, review.status
    assert review.status.user.username == f"system:serviceaccount:{namespace}:robot"
