"""The operator's image (Dockerfile, built by devenv/build-image.sh), run with podman the way a cluster runs it.

Cases:
- the image builds (cached after the first time) and the archive for containerd holds it under the name
  manifests/deployment.yaml uses;
- as UID 65532 with a read-only root filesystem, no capabilities and no privilege escalation (the manifest's
  securityContext): ``--version`` prints the package's version and ``run --help`` works;
- the image config: user 65532:65532, the console script as ENTRYPOINT, ``run --all-namespaces`` as CMD, the
  manifest's command and user agree with it, OCI labels; without ``--user`` it runs as 65532 too;
- the root filesystem: no development harness (secured_endpoint_devenv, the test token server), no C compiler,
  no pip cache, no pip, no build leftovers; a .pyc beside every module of the virtualenv, and every module the
  operator imports at start is read from one (nothing to compile or write at run time);
- the real proof, with the host network against the test control plane and a token server on loopback:
  ``run --namespace NS`` takes its Lease, gives a SecuredEndpoint in NS its token Secret and answers kopf's
  liveness probe; deleting the endpoint removes the Secret and releases the finalizer; SIGTERM stops it at
  once (exit 0) and releases the Lease; its log holds no secret.

Skipped, saying why, only when podman cannot run here at all (not root, podman missing and not installable,
``podman info`` failing); SEP_REQUIRE_IMAGE_TESTS=1 makes that a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from secured_endpoint import __version__
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import RECORD, ROOT, TEST_OPERATOR_ENV, Kube, Setup, _namespace, kubeconfig_tokens, wait_for

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "devenv" / "build-image.sh"
USER = "65532:65532"
# CONTAINERS.md's flags, plus what the manifest's securityContext asks (drop ALL, allowPrivilegeEscalation).
RUN_FLAGS = ("--network", "host", "--read-only", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
PYTHON = "/opt/venv/bin/python"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the storage and runtime flags of devenv/build-image.sh."""
    proc = subprocess.run([str(SCRIPT), "podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def show(name: str) -> str:
    return subprocess.run([str(SCRIPT), "show", name], capture_output=True, text=True, check=True).stdout.strip()


def why_podman_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the image is built and run with podman as root here (and apt-get installs podman): not root"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "podman is not installed and there is no apt-get to install it"
    try:
        proc = subprocess.run([str(SCRIPT), "podman", "info"], capture_output=True, text=True, timeout=300,
                              check=False)
    except subprocess.TimeoutExpired:
        return "podman info did not answer within 300 s"
    if proc.returncode != 0:
        return f"podman cannot run here: {(proc.stderr or proc.stdout).strip()[-1500:]}"
    return None


@pytest.fixture(scope="session")
def image() -> str:
    """The image, built (or found up to date) by devenv/build-image.sh."""
    why = why_podman_cannot_run()
    if why is not None:
        if os.environ.get("SEP_REQUIRE_IMAGE_TESTS"):
            pytest.fail(f"SEP_REQUIRE_IMAGE_TESTS is set, but {why}")
        pytest.skip(why)
    started = time.monotonic()
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, f"devenv/build-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "[image] done" in proc.stdout
    print(f"image built or found up to date in {time.monotonic() - started:.0f} s")
    return show("image")


@pytest.fixture(scope="session")
def config(image: str) -> dict[str, Any]:
    inspected = json.loads(podman("image", "inspect", image).stdout)
    return inspected[0]["Config"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def rootfs(image: str) -> Iterator[Path]:
    """The image's root filesystem, mounted read-only on the host."""
    yield Path(podman("image", "mount", image).stdout.strip())
    podman("image", "unmount", image, check=False)


def deployment_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pod spec, the operator's container) of manifests/deployment.yaml."""
    documents = [doc for doc in yaml.safe_load_all((ROOT / "manifests" / "deployment.yaml").read_text()) if doc]
    deployment = next(doc for doc in documents if doc.get("kind") == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_the_archive_holds_the_image_under_the_manifests_name(image: str, config: dict[str, Any]) -> None:
    archive = Path(show("archive"))
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    assert [entry["RepoTags"] for entry in manifest] == [[show("cluster-image")]]
    _, container = deployment_container()
    name = container["image"]
    normalized = name if "/" in name.split(":")[0] else f"docker.io/library/{name}"
    assert normalized == show("cluster-image"), "manifests/deployment.yaml names another image than the one built"


def test_version_and_help_as_65532_on_a_read_only_root(image: str) -> None:
    version = podman("run", "--rm", "--user", USER, *RUN_FLAGS, image, "--version")
    assert version.stdout.strip() == __version__
    helped = podman("run", "--rm", "--user", USER, *RUN_FLAGS, image, "run", "--help")
    assert "--namespace" in helped.stdout
    assert "--all-namespaces" in helped.stdout


def test_image_config_and_the_manifest_agree(config: dict[str, Any]) -> None:
    assert config["User"] == USER
    assert config["Entrypoint"] == ["secured-endpoint-operator"]
    assert config["Cmd"] == ["run", "--all-namespaces"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "secured-endpoint-operator"
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.revision"]

    pod, container = deployment_container()
    command = container.get("command") or config["Entrypoint"]
    assert command[0] == config["Entrypoint"][0]
    user = (container.get("securityContext") or {}).get("runAsUser") or pod["securityContext"]["runAsUser"]
    assert f"{user}:{pod['securityContext'].get('runAsGroup', user)}" == USER


def test_the_dockerfiles_default_version_is_the_packages() -> None:
    """``docker build .`` labels the image with the Dockerfile's default; make image passes the real one."""
    match = re.search(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match is not None
    assert match.group(1) == __version__


def test_without_user_flag_it_runs_as_65532_and_finds_no_harness(image: str) -> None:
    probe = (
        "import importlib.util, json, os, sys\n"
        "import secured_endpoint.cli, secured_endpoint.wiring, secured_endpoint_gateway\n"
        "uncompiled = sorted(name for name, module in list(sys.modules.items())\n"
        "                    if getattr(module, '__cached__', None) and not os.path.exists(module.__cached__))\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'uncompiled': uncompiled,\n"
        "                  'devenv': importlib.util.find_spec('secured_endpoint_devenv') is not None,\n"
        "                  'pip': importlib.util.find_spec('pip') is not None}))\n"
    )
    answer = json.loads(podman("run", "--rm", *RUN_FLAGS, "--entrypoint", PYTHON, image, "-c", probe).stdout)
    assert (answer["uid"], answer["gid"]) == (65532, 65532)
    assert answer["devenv"] is False
    assert answer["pip"] is False
    # every module the operator imports at start comes from a .pyc made at build time
    assert answer["uncompiled"] == []


def test_the_root_filesystem_holds_no_harness_compiler_or_caches(rootfs: Path) -> None:
    paths = [Path(directory) / name for directory, dirs, files in os.walk(rootfs) for name in (*dirs, *files)]
    relative = [path.relative_to(rootfs) for path in paths]
    assert len(relative) > 1000, "the mount looks empty"

    harness = [p for p in relative if "secured_endpoint_devenv" in str(p) or p.name == "tokenserver.py"]
    assert harness == []
    compilers = [p for p in relative
                 if re.fullmatch(r"([a-z0-9_]+-linux-gnu-)?(gcc|cc|cc1|c\+\+|g\+\+|cpp)(-[0-9]+)?", p.name)
                 and not (rootfs / p).is_dir()]  # /usr/share/gcc holds libstdc++'s debugger scripts
    assert compilers == []
    assert not (rootfs / "usr" / "include" / "stdio.h").exists()  # nor libc6-dev
    caches = [p for p in relative if p.name == "pip" and ".cache" in p.parts]
    assert caches == []
    assert not (rootfs / "root" / ".cache").exists()
    site_packages = next((rootfs / "opt" / "venv" / "lib").glob("python3.*")) / "site-packages"
    assert (site_packages / "secured_endpoint").is_dir()
    assert (site_packages / "secured_endpoint_gateway").is_dir()
    assert not (site_packages / "pip").exists()
    for leftover in ("src", "wheels", "opt/build"):
        assert not (rootfs / leftover).exists(), leftover

    # A .pyc beside every module, hash-based and unchecked: used as it is, never rewritten.
    tag = "cpython-" + site_packages.parent.name.removeprefix("python").replace(".", "")
    sources = [p for p in (rootfs / "opt" / "venv" / "lib").rglob("*.py")]
    missing = [p.relative_to(site_packages) for p in sources
               if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()]
    # pyjks imports javaobj (v1); javaobj-py3 0.6.1's v3/beans.py is Python 3.12 syntax and cannot compile here
    assert {str(p) for p in missing} <= {"javaobj/v3/beans.py"}
    ours = list((site_packages / "secured_endpoint").rglob(f"*.{tag}.pyc"))
    assert ours
    for pyc in ours:
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{pyc.name}: not an unchecked hash-based .pyc (flags {flags:#b})"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def image_namespace(kube: Kube) -> Iterator[str]:
    """A namespace no operator of the session serves (they serve t-* and r-*): only the image's can."""
    yield from _namespace(kube, "img")


def test_the_operator_in_the_image_serves_a_namespace(
        image: str, control_plane: controlplane.ControlPlane, kube: Kube, image_namespace: str,
        token_server: TokenServer, secret_values: set[str], tmp_path: Path) -> None:
    setup = Setup(kube, image_namespace, secret_values)
    client_id, client_secret = setup.client(token_server)
    # The kubeconfig as a mounted Secret would be: readable by the operator's user only.
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copyfile(control_plane.kubeconfig_path, kubeconfig)
    os.chown(kubeconfig, 65532, 65532)
    kubeconfig.chmod(0o400)
    RECORD.secrets.update(kubeconfig_tokens(kubeconfig))
    liveness = _free_port()
    name = f"sep-image-test-{uuid.uuid4().hex[:8]}"
    lease = f"sep-image-{uuid.uuid4().hex[:10]}"
    environment = {**TEST_OPERATOR_ENV, "KUBECONFIG": "/etc/secured-endpoint/kubeconfig", "POD_NAME": name,
                   "SEP_LEASE_NAME": lease, "SEP_LEASE_NAMESPACE": "default"}
    leases = k8s.CoordinationV1Api(kube.control_plane.api_client())

    def holder() -> str:
        return str(leases.read_namespaced_lease(lease, "default").spec.holder_identity or "")
    podman("run", "--detach", "--name", name, "--user", USER, *RUN_FLAGS,
           "--volume", f"{kubeconfig}:/etc/secured-endpoint/kubeconfig:ro",
           *(arg for key, value in environment.items() for arg in ("--env", f"{key}={value}")),
           image, "run", "--namespace", image_namespace, f"--liveness=http://127.0.0.1:{liveness}/healthz")

    def log() -> str:
        proc = podman("logs", name, check=False)
        return proc.stdout + proc.stderr

    def running() -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"

    try:
        wait_for(lambda: "secured-endpoint-operator started" in log() or not running(), timeout=60,
                 message="the operator in the image to start")
        assert running(), f"the operator in the image exited:\n{log()[-3000:]}"

        setup.endpoint("img", token_server)
        token = wait_for(lambda: (kube.secret_data(image_namespace, "img-token") or {}).get("access_token"),
                         timeout=30, message="the token Secret written by the operator in the image")
        assert token in {issued.access_token for issued in token_server.issued_tokens}
        assert token_server.requests[-1].client_id == client_id
        kube.wait_ready(image_namespace, "img")
        assert holder().startswith(name), "the operator in the image does not hold its Lease"
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=5) as response:
            assert response.status == 200

        kube.delete_endpoint(image_namespace, "img")
        wait_for(lambda: kube.get_endpoint(image_namespace, "img") is None and
                 kube.secret_data(image_namespace, "img-token") is None,
                 timeout=20, message="the endpoint released and its Secret removed by the operator in the image")

        stopping = time.monotonic()
        podman("stop", "--time", "20", name, timeout=60)
        stopped_after = time.monotonic() - stopping
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert stopped_after < 10, f"SIGTERM took {stopped_after:.1f} s (exit code {exit_code})"
        assert exit_code == "0", log()[-3000:]
        assert holder() == "", "the Lease was not released on SIGTERM"
    finally:
        text = log()
        RECORD.snapshots.append((f"log of the operator in the image ({name})", text))
        podman("rm", "--force", name, check=False)
    for secret in (client_secret, token, *kubeconfig_tokens(kubeconfig)):
        assert secret not in text
