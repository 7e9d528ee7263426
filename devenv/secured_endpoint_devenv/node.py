"""A real node for the local control plane: kube-controller-manager, kube-scheduler and a kubelet on containerd.

The control plane of :mod:`secured_endpoint_devenv.controlplane` is envtest-like: nothing deletes what owner
references point at, a deleted namespace stays ``Terminating``, a Deployment makes no Pods. ``Cluster`` adds
what a real cluster has, on loopback:

* kube-controller-manager (garbage collector, namespace deletion, Deployments/ReplicaSets, service accounts
  and their tokens, signed with the apiserver's own service-account key) and kube-scheduler, both with the
  admin kubeconfig;
* a kubelet on containerd + runc (Debian's packages, installed when missing), with a private containerd
  (config, socket, root and state in the node's own temporary directory, never the system one), a locally
  built pause image as the sandbox image, and the CNI bridge + host-local plugins on a bridge of its own.
  Pods get one route besides the bridge's subnet, to the ``kubernetes`` Service, which a DNAT rule sends to
  the apiserver on loopback: in-cluster clients work unchanged, and nothing else is reachable.

Use::

    with Cluster() as cluster:               # Cluster(node=False): the controllers alone
        cluster.image_import(archive, also_tag=["secured-endpoint-operator:0.1.0"])
        cluster.kubectl("apply", "-k", "manifests/")
        cluster.kubeconfig_path              # admin kubeconfig, for any other client

:class:`NodeUnavailable` means the machine cannot run a node at all (its message says why); any other failure
is a :class:`NodeError` with the components' log tails. One node runs per machine at a time (a file lock).

The three binaries are built from ``k8s.io/kubernetes`` like kube-apiserver (the same wrapper module and
version stamps) and cached beside it: ``<controlplane.version_dir()>/bin/{kube-controller-manager,
kube-scheduler,kubelet}``.

Why the node is called ``127.0.0.1``: the kubelet refuses a loopback ``--node-ip``, except when its name is
itself an IP, which it then takes as the node's address unchecked. So the kubelet serves on loopback and the
apiserver still reaches it there for ``kubectl logs``/``exec``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from secured_endpoint_devenv import controlplane

_PREFIX = "[node]"
_COMPONENTS = ("kube-controller-manager", "kube-scheduler", "kubelet")


@dataclass(frozen=True)
class NodeBinaries:
    kube_controller_manager: Path
    kube_scheduler: Path
    kubelet: Path

    def all(self) -> tuple[Path, ...]:
        return (self.kube_controller_manager, self.kube_scheduler, self.kubelet)


# --------------------------------------------------------------------------- build


def node_binaries_in(bin_dir: Path) -> NodeBinaries:
    return NodeBinaries(*(bin_dir / name for name in _COMPONENTS))


def ensure_node_binaries(*, progress: controlplane.Progress = print) -> NodeBinaries:
    """Return working kube-controller-manager/kube-scheduler/kubelet, building them once (under a lock)."""
    kube = controlplane.kube_version()
    bins = node_binaries_in(controlplane.version_dir() / "bin")
    if _node_ok(bins, kube):
        return bins
    controlplane.version_dir().mkdir(parents=True, exist_ok=True)

    def relabel(line: str) -> None:  # the shared Go runner labels its lines as the control plane's
        progress(line.replace("[control-plane]", _PREFIX, 1))

    # A lock of its own: a node build never holds up a control-plane build, and the Go caches are safe to share.
    with controlplane._file_lock(controlplane.version_dir() / ".node-build.lock", relabel):
        if not _node_ok(bins, kube):  # another process may have built them while we waited
            _build_node(kube, bins, relabel)
    if not _node_ok(bins, kube):
        raise controlplane.ControlPlaneError(f"built binaries in {bins.kubelet.parent} do not report {kube}")
    return bins


def _node_ok(bins: NodeBinaries, kube: str) -> bool:
    return all(controlplane._reports_version([str(path), "--version"], kube) for path in bins.all())


def _build_node(kube: str, bins: NodeBinaries, progress: controlplane.Progress) -> None:
    build_dir = controlplane.version_dir() / "build" / "node"
    controlplane._fresh_dir(build_dir)
    runner = controlplane._GoRunner(build_dir, progress)
    started = time.monotonic()
    progress(f"{_PREFIX} resolving k8s.io/kubernetes@{kube} for {', '.join(_COMPONENTS)} …")
    gomod, released = controlplane._kubernetes_module(runner, kube)
    (build_dir / "go.mod").write_text(
        controlplane._kube_wrapper_gomod(gomod, kube).replace("sep.local/kube-build", "sep.local/node-build", 1))
    runner.run(["go", "get", *(f"k8s.io/kubernetes/cmd/{name}@{kube}" for name in _COMPONENTS)],
               step="download kube-controller-manager/kube-scheduler/kubelet dependencies",
               timeout=controlplane._GET_TIMEOUT_S)
    progress(f"{_PREFIX} module resolution/download took {time.monotonic() - started:.0f}s")
    ldflags = controlplane._kube_ldflags(kube, released)
    bins.kubelet.parent.mkdir(parents=True, exist_ok=True)
    # Measured on 2 cores after kube-apiserver's build (whose packages they share): 135 s, 5 s, 17 s.
    for path, eta in zip(bins.all(), ("2-10 min", "under a minute", "under a minute"), strict=True):
        progress(f"{_PREFIX} building {path.name} {kube} (first run only; {eta} on 2 cores, quiet while "
                 "compiling) …")
        runner.build(f"k8s.io/kubernetes/cmd/{path.name}", path, ldflags)
    progress(f"{_PREFIX} node binaries built in {time.monotonic() - started:.0f}s")


# --------------------------------------------------------------------------- errors, settings

POD_SUBNET = "10.244.0.0/24"  # on the node's own bridge only: no route leads anywhere else
BRIDGE = "sep-br0"
NODE_NAME = "127.0.0.1"  # see the module docstring
PAUSE_IMAGE = "sep.local/pause:3.10"
BUSYBOX_IMAGE = "sep.local/busybox:1.35"
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "busybox-static", "iptables")
# The chains that make the `kubernetes` Service answer inside Pods (see Node._route_kubernetes_service).
_NAT_CHAIN, _FILTER_CHAIN = "SEP-NODE-SERVICES", "SEP-NODE-LOCALNET"
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
BUSYBOX = Path("/bin/busybox")
_CNI_PLUGINS = ("bridge", "host-local", "loopback")
_LOCK_WAIT_S = 15 * 60.0
_WORKDIR_PREFIX = "sep-node-"
_STATE_FILE = "node-state.json"
# Paths the kubelet, containerd and libcni use whatever they are told; the node removes those it made, once empty.
_FIXED_DIRS = tuple(Path(path) for path in (
    "/var/lib/kubelet/device-plugins", "/var/lib/kubelet", "/var/log/containers", "/var/lib/cni/results",
    "/var/lib/cni", "/run/containerd/s", "/run/containerd"))
# What the kubelet sets for itself (protectKernelDefaults: false) and the node puts back when it stops.
_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
            "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward")


class NodeError(controlplane.ControlPlaneError):
    """Starting or running the controllers or the node failed."""


class NodeUnavailable(NodeError):
    """This machine cannot run a node at all (not root, no cgroups, packages missing and not installable).

    The message is the exact reason; everything else that goes wrong is a :class:`NodeError`."""


# --------------------------------------------------------------------------- machine: packages, preflight


def ensure_node_packages(*, progress: controlplane.Progress = print) -> None:
    """Install Debian's containerd, runc, CNI plugins and busybox-static when missing (as root, with apt-get)."""
    if not _missing_tools():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NodeUnavailable(f"missing {', '.join(_missing_tools())}, and no apt-get as root to install "
                              f"the Debian packages {' '.join(DEBIAN_PACKAGES)}")
    progress(f"{_PREFIX} installing the Debian packages {' '.join(DEBIAN_PACKAGES)} …")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=20 * 60, check=False)
        if done.returncode != 0:
            raise NodeUnavailable(f"{' '.join(cmd)} failed (exit {done.returncode}):\n"
                                  f"{(done.stderr or done.stdout).strip()[-3000:]}")
    if _missing_tools():
        raise NodeUnavailable(f"still missing after apt-get install: {', '.join(_missing_tools())}")


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "ip", "mount", "iptables")
               if _which(tool) is None]
    if _cni_dir() is None:
        missing.append(f"the CNI plugins {', '.join(_CNI_PLUGINS)} in {' or '.join(map(str, CNI_DIRS))}")
    if not BUSYBOX.is_file():
        missing.append(str(BUSYBOX))
    return missing


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _cni_dir() -> Path | None:
    for candidate in CNI_DIRS:
        if all(os.access(candidate / plugin, os.X_OK) for plugin in _CNI_PLUGINS):
            return candidate
    return None


def preflight() -> None:
    """Raise :class:`NodeUnavailable` with the exact reason when this machine cannot run a kubelet."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()}): the kubelet, containerd and runc need root")
    controllers = _cgroup_v1_controllers()
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2 brings its own check (kubelet)
        lacking = sorted({"cpu", "cpuacct", "cpuset", "memory", "pids"} - controllers)
        if lacking:
            problems.append(f"cgroup v1 controllers not mounted: {', '.join(lacking)}")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        problems.append("no overlay filesystem in /proc/filesystems (containerd's overlayfs snapshotter)")
    if problems:
        raise NodeUnavailable("; ".join(problems))


def _cgroup_v1_controllers() -> set[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ", 1)
            if len(fields) == 2 and fields[1].startswith("cgroup "):
                found.update(fields[1].split()[-1].split(","))
    return found


# --------------------------------------------------------------------------- images

_PAUSE_GO = """\
// The sandbox process of every Pod: holds the Pod's namespaces, reaps orphans, exits on SIGINT/SIGTERM.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsignals := make(chan os.Signal, 8)
\tsignal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor sig := range signals {
\t\tif sig != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tpid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
\t\t\tif pid <= 0 || err != nil {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""


def write_image_archive(path: Path, reference: str, files: Mapping[str, bytes | Path], *,
                        entrypoint: Sequence[str], cmd: Sequence[str] = (),
                        symlinks: Mapping[str, str] | None = None, user: str = "") -> Path:
    """Write a one-layer image (docker-archive, what ``ctr images import`` and ``podman load`` read).

    ``files`` maps paths in the image to contents (a Path is copied, executable); ``symlinks`` maps
    paths to targets. Deterministic: the same inputs give the same image ID."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(parent) for name in [*files, *(symlinks or {})]
                       for parent in Path(name.lstrip("/")).parents if str(parent) != "."})
        for directory in dirs:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, content in sorted(files.items()):
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode = len(data), 0o755 if isinstance(content, Path) else 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in sorted((symlinks or {}).items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": list(entrypoint), "Cmd": list(cmd) or None, "User": user,
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "secured-endpoint-devenv"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": [f"{diff_id}/layer.tar"]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, mode="w") as archive:
        for name, data in ((config_name, config_bytes), (f"{diff_id}/layer.tar", layer_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def ensure_pause_image(*, progress: controlplane.Progress = print) -> Path:
    """The sandbox image's archive: a static Go binary in an otherwise empty image, built once and cached."""
    digest = hashlib.sha256(f"{_PAUSE_GO}{PAUSE_IMAGE}".encode()).hexdigest()[:12]
    archive = controlplane.version_dir() / "images" / f"pause-{digest}.tar"
    if archive.is_file():
        return archive
    build_dir = Path(tempfile.mkdtemp(prefix="sep-pause-build-"))
    try:
        (build_dir / "go.mod").write_text("module sep.local/pause\n\ngo 1.22\n")
        (build_dir / "main.go").write_text(_PAUSE_GO)
        runner = controlplane._GoRunner(build_dir, lambda line: progress(line.replace("[control-plane]", _PREFIX)))
        progress(f"{_PREFIX} building the pause image {PAUSE_IMAGE} …")
        runner.build("sep.local/pause", build_dir / "pause", "-s -w")
        write_image_archive(archive, PAUSE_IMAGE, {"/pause": build_dir / "pause"}, entrypoint=["/pause"])
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return archive


_BUSYBOX_APPLETS = ("sh", "echo", "cat", "sleep", "ls", "wget", "httpd", "hostname", "id", "env", "true",
                    "false", "ip", "ps", "test", "date", "mkdir", "touch", "nc", "grep")


def write_busybox_image(path: Path, reference: str = BUSYBOX_IMAGE) -> Path:
    """An image of Debian's static busybox with a few applets linked (``sh``, ``sleep``, ``httpd`` …)."""
    return write_image_archive(path, reference, {"/bin/busybox": BUSYBOX}, entrypoint=[], cmd=["sh"],
                               symlinks={f"/bin/{applet}": "busybox" for applet in _BUSYBOX_APPLETS})


# --------------------------------------------------------------------------- apiserver -> kubelet credentials


@dataclass(frozen=True)
class KubeletClientPKI:
    """A CA the kubelet trusts for client certificates, and the apiserver's client certificate from it
    (``kubectl logs``/``exec`` go apiserver -> kubelet)."""

    ca_cert: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> KubeletClientPKI:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sep-kubelet-client-ca")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pki = cls(directory / "kubelet-client-ca.crt", directory / "apiserver-kubelet-client.crt",
                  directory / "apiserver-kubelet-client.key")
        pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        pki.client_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.client_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        pki.client_key.chmod(0o600)
        return pki

    def apiserver_args(self) -> list[str]:
        return [f"--kubelet-client-certificate={self.client_cert}", f"--kubelet-client-key={self.client_key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname"]


# --------------------------------------------------------------------------- processes


class _Processes:
    """Child processes with their logs, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        log = log_path.open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=None if env is None else dict(env))
        self.procs.append((name, proc, log_path))

    def check_alive(self) -> None:
        for name, proc, log_path in self.procs:
            if proc.poll() is not None:
                raise NodeError(f"{name} exited with code {proc.returncode}; log tail:\n"
                                f"{controlplane._tail(log_path, 40)}")

    def stop(self, name: str | None = None, *, grace: float = 10.0) -> None:
        for entry in reversed(list(self.procs)):
            if name is None or entry[0] == name:
                controlplane._terminate(entry[0], entry[1], grace=grace)
                self.procs.remove(entry)
        if not self.procs:
            for log in self._logs:
                log.close()
            self._logs.clear()

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {name} log tail ---\n{controlplane._tail(path, lines)}"
                         for name, _, path in self.procs)


def _https_ok(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """GET a component's own /healthz (self-signed serving certificate: no verification, loopback only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # noqa: S310
            body = resp.read().decode(errors="replace")
            return resp.status == 200 and body.strip() == "ok", body[-300:]
    except urllib.error.HTTPError as err:
        return False, f"HTTP {err.code}: {err.read().decode(errors='replace')[-300:]}"
    except (OSError, urllib.error.URLError, ssl.SSLError) as err:
        return False, str(err)


def _get_json(cp: controlplane.ControlPlane, path: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, urllib.error.URLError, ssl.SSLError, ValueError):
        status, body = cp.get(path, timeout=5)
        if status == 200:
            value = json.loads(body)
            return value if isinstance(value, dict) else None
    return None


# --------------------------------------------------------------------------- controllers


class Controllers:
    """kube-controller-manager and kube-scheduler against a running :class:`ControlPlane`, on loopback.

    ``controllers`` is kube-controller-manager's ``--controllers`` (all by default); ``("garbagecollector",)``
    adds only the garbage collector to an envtest-like control plane, leaving namespaces and service accounts as
    they were. ``scheduler=False`` runs no kube-scheduler."""

    def __init__(self, control_plane: controlplane.ControlPlane, binaries: NodeBinaries | None = None, *,
                 ready_timeout: float = 60.0, progress: controlplane.Progress = print,
                 controllers: Sequence[str] = ("*",), scheduler: bool = True) -> None:
        self.control_plane = control_plane
        self.controllers = tuple(controllers)
        self.with_scheduler = scheduler
        self._binaries = binaries
        self.ready_timeout = ready_timeout
        self._progress = progress
        self._procs = _Processes()
        self._workdir: Path | None = None
        self.controller_manager_port = 0
        self.scheduler_port = 0
        self.startup_seconds = 0.0

    @property
    def binaries(self) -> NodeBinaries:
        if self._binaries is None:
            self._binaries = ensure_node_binaries(progress=self._progress)
        return self._binaries

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise NodeError("the controllers are not started")
        return self._workdir

    @property
    def controller_manager_log_path(self) -> Path:
        return self.workdir / "kube-controller-manager.log"

    @property
    def scheduler_log_path(self) -> Path:
        return self.workdir / "kube-scheduler.log"

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc, _ in self._procs.procs]

    def __enter__(self) -> Controllers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Controllers:
        bins = self.binaries
        cp = self.control_plane
        started = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix="sep-controllers-"))
        atexit.register(self.stop)
        try:
            self.controller_manager_port, self.scheduler_port = controlplane._free_ports(2)
            common = [f"--kubeconfig={cp.kubeconfig_path}", "--bind-address=127.0.0.1", "--leader-elect=false",
                      "--profiling=false"]
            self._procs.spawn("kube-controller-manager", [
                str(bins.kube_controller_manager), *common, f"--secure-port={self.controller_manager_port}",
                f"--controllers={','.join(self.controllers)}",
                # Legacy service-account token Secrets are signed with the apiserver's own key, so it accepts them.
                f"--service-account-private-key-file={cp.service_account_key_path}",
                f"--root-ca-file={cp.ca_path}",  # published to every namespace as kube-root-ca.crt
                f"--flex-volume-plugin-dir={self.workdir / 'flex-volume'}",  # it creates the directory
            ], self.controller_manager_log_path)
            if self.with_scheduler:
                self._procs.spawn("kube-scheduler", [
                    str(bins.kube_scheduler), *common, f"--secure-port={self.scheduler_port}",
                ], self.scheduler_log_path)
            self._wait_ready(time.monotonic() + self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        self._progress(f"{_PREFIX} kube-controller-manager ({','.join(self.controllers)})"
                       f"{' and kube-scheduler' if self.with_scheduler else ''} ready in {self.startup_seconds:.1f}s")
        return self

    def stop(self) -> None:
        self._procs.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        atexit.unregister(self.stop)

    def _wait_ready(self, deadline: float) -> None:
        detail = "no answer"
        # The service-account controller's first act proves the controllers really run, not only serve; with
        # it left out, kube-controller-manager's /healthz (a check per started controller) is all there is.
        accounts = "*" in self.controllers or "serviceaccount" in self.controllers
        while time.monotonic() < deadline:
            self._procs.check_alive()
            manager_ok, manager = _https_ok(f"https://127.0.0.1:{self.controller_manager_port}/healthz")
            scheduler_ok, scheduler = (_https_ok(f"https://127.0.0.1:{self.scheduler_port}/healthz")
                                       if self.with_scheduler else (True, "not run"))
            account = (_get_json(self.control_plane, "/api/v1/namespaces/default/serviceaccounts/default")
                       if accounts else {})
            if manager_ok and scheduler_ok and account is not None:
                return
            detail = (f"controller-manager /healthz: {manager}; scheduler /healthz: {scheduler}; "
                      f"default ServiceAccount: {'yes' if account else 'not yet' if accounts else 'not awaited'}")
            time.sleep(0.2)
        raise NodeError(f"controllers not ready after {self.ready_timeout:.0f}s ({detail})\n{self._procs.tails()}")


# --------------------------------------------------------------------------- node


class Node:
    """A kubelet on a private containerd + runc, registered as node ``127.0.0.1`` of a running control plane.

    The control plane must have been started with ``pki.apiserver_args()`` (its client certificate for the
    kubelet) and a controller-manager must run (node lifecycle, ServiceAccounts); :class:`Cluster` does both."""

    def __init__(self, control_plane: controlplane.ControlPlane, pki: KubeletClientPKI,
                 binaries: NodeBinaries | None = None, *, ready_timeout: float = 120.0,
                 progress: controlplane.Progress = print, pod_subnet: str = POD_SUBNET,
                 bridge: str = BRIDGE) -> None:
        self.control_plane = control_plane
        self.pki = pki
        self._binaries = binaries
        self.ready_timeout = ready_timeout
        self._progress = progress
        self.pod_subnet = pod_subnet
        self.bridge = bridge
        self.name = NODE_NAME
        self._procs = _Processes()
        self._workdir: Path | None = None
        self._lock: IO[str] | None = None
        self._sysctls: dict[str, str] = {}
        self._made_dirs: list[Path] = []
        self._bridge_made = False
        self._iptables_made = False
        self.kubernetes_service = ("", 0)  # the `kubernetes` Service's ClusterIP and port, reachable from Pods
        self.kubelet_port = 0
        self.kubelet_healthz_port = 0
        self.startup_seconds = 0.0

    # -- paths -------------------------------------------------------------------------------

    @property
    def binaries(self) -> NodeBinaries:
        if self._binaries is None:
            self._binaries = ensure_node_binaries(progress=self._progress)
        return self._binaries

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise NodeError("the node is not started")
        return self._workdir

    @property
    def containerd_address(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def containerd_log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def kubelet_log_path(self) -> Path:
        return self.workdir / "kubelet.log"

    @property
    def pod_logs_dir(self) -> Path:
        """``<namespace>_<pod>_<uid>/<container>/<restart>.log``: the containers' output, as the kubelet keeps it."""
        return self.workdir / "pod-logs"

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc, _ in self._procs.procs]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Node:
        ensure_node_packages(progress=self._progress)
        preflight()
        bins = self.binaries
        pause = ensure_pause_image(progress=self._progress)
        self._lock = _machine_lock(self._progress)  # one bridge, one set of sysctls: one node per machine
        started = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        atexit.register(self.stop)
        try:
            _reap_stale_nodes(self._workdir, self._progress)
            self._sysctls = {name: _read_sysctl(name) for name in _SYSCTLS}
            self._made_dirs = [path for path in _FIXED_DIRS if not path.exists()]
            # What to put back, kept where a later node finds it should this process die without stop().
            (self._workdir / _STATE_FILE).write_text(json.dumps(
                {"sysctls": self._sysctls, "made_dirs": [str(path) for path in self._made_dirs]}))
            self._make_bridge()
            self._route_kubernetes_service()
            self._start_containerd()
            self.image_import(pause)
            self.image_import(write_busybox_image(self.workdir / "images" / "busybox.tar"))
            self._start_kubelet(bins)
            self._wait_ready(time.monotonic() + self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        self._progress(f"{_PREFIX} node {self.name} Ready in {self.startup_seconds:.1f}s "
                       f"(kubelet {controlplane.kube_version()}, containerd, runc, pods on {self.pod_subnet})")
        return self

    def stop(self) -> None:
        """Stop the kubelet, remove every container, stop containerd and its shims, unmount, delete the bridge,
        put the kernel settings back. Idempotent."""
        self._procs.stop("kubelet")
        sandboxes = _remove_containers(self._workdir) if self._workdir is not None else set()
        self._procs.stop()
        if self._workdir is not None:
            _kill_shims(self._workdir, sandboxes)
            _unmount_under(self._workdir)
        if self._iptables_made:
            self._remove_iptables()
            self._iptables_made = False
        if self._bridge_made:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
            self._bridge_made = False
        if self._workdir is not None:
            _put_back(self._workdir, self._sysctls, self._made_dirs, sandboxes)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._sysctls, self._made_dirs = {}, []
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None
        atexit.unregister(self.stop)

    # -- images ------------------------------------------------------------------------------

    def ctr(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` in containerd's ``k8s.io`` namespace (the one the kubelet's images live in)."""
        cmd = ["ctr", "--address", str(self.containerd_address), "--namespace", "k8s.io", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise NodeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}")
        return done

    def image_import(self, path: Path | str, *, also_tag: Sequence[str] = ()) -> list[str]:
        """Import an image archive (docker-archive or OCI layout tar, e.g. from ``podman save``) into the
        node's containerd and return the references it now holds, ``also_tag`` included.

        A Pod names the image as written in its manifest; the kubelet normalises an unqualified name
        (``secured-endpoint-operator:0.1.0`` -> ``docker.io/library/…``), so ``also_tag`` takes the names Pods
        will use (normalised the same way). Use ``imagePullPolicy: Never`` or ``IfNotPresent``: nothing can be
        pulled here."""
        started = time.monotonic()
        done = self.ctr("images", "import", str(path))
        references = [line.split()[1] for line in done.stdout.splitlines()
                      if line.startswith("unpacking ") and len(line.split()) > 1]
        if not references:
            raise NodeError(f"ctr images import {path} named no image:\n{done.stdout.strip()}\n{done.stderr.strip()}")
        for name in also_tag:
            target = normalize_reference(name)
            if target not in references:
                self.ctr("images", "tag", "--force", references[0], target)
                references.append(target)
        self._progress(f"{_PREFIX} imported {', '.join(references)} in {time.monotonic() - started:.1f}s")
        return references

    def images(self) -> list[str]:
        return [line for line in self.ctr("images", "list", "--quiet").stdout.splitlines() if line]

    # -- internals ---------------------------------------------------------------------------

    def _make_bridge(self) -> None:
        # The bridge gets the pods' gateway address from us, not from the CNI plugin: with isGateway the plugin
        # would also switch on IP forwarding for the whole machine. Pods get no default route either, so the
        # only addresses they reach are each other and this host.
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)  # a crashed run's
        gateway = _gateway(self.pod_subnet)
        prefix = self.pod_subnet.split("/")[1]
        for cmd in (["ip", "link", "add", "name", self.bridge, "type", "bridge"],
                    ["ip", "addr", "add", f"{gateway}/{prefix}", "dev", self.bridge],
                    ["ip", "link", "set", self.bridge, "up"]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise NodeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()}")
            self._bridge_made = True

    def _route_kubernetes_service(self) -> None:
        """In-cluster clients in Pods dial the `kubernetes` Service's ClusterIP; with no kube-proxy, one DNAT
        rule for packets from the bridge sends it to the apiserver on loopback (route_localnet on the bridge
        only, as kube-proxy does for node ports on localhost). Any other packet from a Pod to 127.0.0.0/8 is
        dropped, so the Pods reach the apiserver and nothing else that listens on loopback."""
        deadline = time.monotonic() + 30.0
        service = None
        while service is None and time.monotonic() < deadline:
            service = _get_json(self.control_plane, "/api/v1/namespaces/default/services/kubernetes")
            if service is None:
                time.sleep(0.2)
        if service is None:
            raise NodeError("the apiserver made no default/kubernetes Service within 30s")
        cluster_ip, port = str(service["spec"]["clusterIP"]), int(service["spec"]["ports"][0]["port"])
        self.kubernetes_service = (cluster_ip, port)
        self._remove_iptables()  # a crashed run's
        self._iptables_made = True
        _write_sysctl(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")
        for table, rule in (
            ("nat", ["-N", _NAT_CHAIN]),
            ("nat", ["-A", _NAT_CHAIN, "-d", f"{cluster_ip}/32", "-p", "tcp", "--dport", str(port), "-j", "DNAT",
                     "--to-destination", f"127.0.0.1:{self.control_plane.apiserver_port}"]),
            ("nat", ["-A", "PREROUTING", "-i", self.bridge, "-j", _NAT_CHAIN]),
            ("filter", ["-N", _FILTER_CHAIN]),
            ("filter", ["-A", _FILTER_CHAIN, "-d", "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate", "DNAT",
                        "-j", "DROP"]),
            ("filter", ["-A", "INPUT", "-i", self.bridge, "-j", _FILTER_CHAIN]),
        ):
            done = subprocess.run(["iptables", "-w", "5", "-t", table, *rule], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise NodeError(f"iptables -t {table} {' '.join(rule)} failed: {done.stderr.strip()}")

    def _remove_iptables(self) -> None:
        for table, hook, chain in (("nat", "PREROUTING", _NAT_CHAIN), ("filter", "INPUT", _FILTER_CHAIN)):
            for rule in (["-D", hook, "-i", self.bridge, "-j", chain], ["-F", chain], ["-X", chain]):
                subprocess.run(["iptables", "-w", "5", "-t", table, *rule], capture_output=True, check=False)

    def _start_containerd(self) -> None:
        work = self.workdir
        cni_conf = work / "cni"
        cni_conf.mkdir()
        cni_bin = _cni_dir()
        runc = _which("runc")
        if cni_bin is None or runc is None:
            raise NodeUnavailable(f"missing: {', '.join(_missing_tools())}")
        (cni_conf / "10-sep-pods.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": "sep-pods",
            "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(work / "cni-ipam"),
                         "ranges": [[{"subnet": self.pod_subnet, "gateway": _gateway(self.pod_subnet)}]],
                         # one route besides the bridge's own subnet: to the `kubernetes` Service
                         "routes": [{"dst": f"{self.kubernetes_service[0]}/32",
                                     "gw": _gateway(self.pod_subnet)}]},
            }],
        }, indent=2))
        root, state = work / "containerd" / "root", work / "containerd" / "state"
        config = work / "containerd" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_CONTAINERD_CONFIG.format(
            root=root, state=state, address=self.containerd_address, sandbox_image=PAUSE_IMAGE, runc=runc,
            runc_root=state / "runc", cni_bin=cni_bin, cni_conf=cni_conf))
        self._procs.spawn("containerd", [_which("containerd") or "containerd", "--config", str(config)],
                          self.containerd_log_path)
        deadline = time.monotonic() + 30.0
        detail = "no socket yet"
        while time.monotonic() < deadline:
            self._procs.check_alive()
            if self.containerd_address.exists():
                done = self.ctr("version", check=False, timeout=10)
                if done.returncode == 0:
                    return
                detail = done.stderr.strip()
            time.sleep(0.1)
        raise NodeError(f"containerd not ready after 30s ({detail})\n{self._procs.tails()}")

    def _start_kubelet(self, bins: NodeBinaries) -> None:
        work = self.workdir
        self.kubelet_port, self.kubelet_healthz_port = controlplane._free_ports(2)
        for directory in ("kubelet", "pod-logs", "volume-plugins"):
            (work / directory).mkdir(exist_ok=True)
        config = work / "kubelet-config.json"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.kubelet_healthz_port,
            # Only the apiserver's client certificate gets in (kubectl logs/exec); no anonymous access.
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.pki.ca_cert)}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # this machine kind has cgroup v1; kubelet 1.34 still runs there when told
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_address}",
            "podLogsDir": str(self.pod_logs_dir),
            "volumePluginDir": str(work / "volume-plugins"),
            "resolvConf": "/etc/resolv.conf",
            # Never garbage-collect the imported images (nothing can be pulled back) and evict only when
            # the disk is really full.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "protectKernelDefaults": False,  # it sets its sysctls; stop() puts the old values back
            "serializeImagePulls": False,
            "shutdownGracePeriod": "0s",
            "makeIPTablesUtilChains": False,  # its hint/canary/firewall chains would outlive it
        }, indent=2))
        self._procs.spawn("kubelet", [
            str(bins.kubelet), f"--config={config}", f"--kubeconfig={self.control_plane.kubeconfig_path}",
            f"--hostname-override={self.name}", f"--root-dir={work / 'kubelet'}",
            f"--cert-dir={work / 'kubelet' / 'pki'}",  # not derived from --root-dir
        ], self.kubelet_log_path)

    def _wait_ready(self, deadline: float) -> None:
        detail = "not registered"
        while time.monotonic() < deadline:
            self._procs.check_alive()
            node = _get_json(self.control_plane, f"/api/v1/nodes/{self.name}")
            if node is not None:
                ready = [c for c in node.get("status", {}).get("conditions", []) if c.get("type") == "Ready"]
                taints = [t.get("key") for t in node.get("spec", {}).get("taints", []) or []]
                if ready and ready[0].get("status") == "True" and "node.kubernetes.io/not-ready" not in taints:
                    return
                detail = f"Ready={ready[0] if ready else None}, taints={taints}"
            time.sleep(0.3)
        raise NodeError(f"node {self.name} not Ready after {self.ready_timeout:.0f}s ({detail})\n"
                        f"{self._procs.tails(40)}")


_CONTAINERD_CONFIG = """\
# The node's own containerd: nothing under /var/lib/containerd or /etc/containerd is read or written.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{address}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # Sandboxes ask for oom_score_adj -998, but this machine kind refuses any negative value (EIO), which kills
  # runc's init ("can't get final child's PID from pipe"): never go below containerd's own score.
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"""


def normalize_reference(name: str) -> str:
    """What the kubelet makes of an image name: ``nginx:1`` -> ``docker.io/library/nginx:1``."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        reference = name
    elif rest:
        reference = f"docker.io/{name}"
    else:
        reference = f"docker.io/library/{name}"
    last = reference.rsplit("/", 1)[-1]
    return reference if ":" in last or "@" in last else f"{reference}:latest"


def _gateway(subnet: str) -> str:
    import ipaddress

    return str(next(ipaddress.ip_network(subnet).hosts()))


def _machine_lock(progress: controlplane.Progress) -> IO[str]:
    path = Path(tempfile.gettempdir()) / "sep-node.lock"
    handle = path.open("a")
    deadline = time.monotonic() + _LOCK_WAIT_S
    announced = False
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise NodeError(f"another node kept {path} for {_LOCK_WAIT_S:.0f}s") from None
            if not announced:
                progress(f"{_PREFIX} another node runs on this machine; waiting for {path}")
                announced = True
            time.sleep(1)


def _read_sysctl(name: str) -> str:
    return (Path("/proc/sys") / name).read_text().strip()


def _write_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name
    if path.read_text().strip() != value:
        path.write_text(value)


def process_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie waits only for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _pids_whose_cmdline_has(*needles: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in cmdline for needle in needles):
            pids.append(int(proc.name))
    return pids


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                point = _unescape_mount(fields[4])
                if point.startswith(prefix):
                    points.append(point)
    return points


def _unescape_mount(field: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _unmount_under(root: Path) -> None:
    """Lazily unmount everything below root (overlay rootfs, network namespaces, tmpfs volumes), deepest first."""
    for _ in range(3):  # a lazily unmounted parent can reveal nothing new, but stacked mounts need another pass
        points = _mounts_under(root)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _remove_containers(workdir: Path) -> set[str]:
    """Kill and delete every container of a node's containerd with runc itself (whether or not containerd
    still answers); returns their ids."""
    runc = _which("runc") or "runc"
    removed: set[str] = set()
    for root in sorted((workdir / "containerd" / "state" / "runc").glob("*")):
        listed = subprocess.run([runc, "--root", str(root), "list", "--quiet"], capture_output=True, text=True,
                                check=False, timeout=30)
        for container in listed.stdout.split():
            removed.add(container)
            subprocess.run([runc, "--root", str(root), "delete", "--force", container], capture_output=True,
                           check=False, timeout=30)
    return removed


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)
    deadline = time.monotonic() + 10.0
    while any(process_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_shims(workdir: Path, containers: set[str]) -> None:
    # Shims outlive containerd (they are daemons of their own); only the ones of this node's socket go.
    address = str(workdir / "containerd" / "containerd.sock")
    _kill(_pids_whose_cmdline_has("containerd-shim", address))
    # A killed shim leaves its socket, at a path containerd 1.6 derives from its own address and the id.
    for container in containers:
        name = hashlib.sha256(f"{address}/k8s.io/{container}".encode()).hexdigest()
        with contextlib.suppress(OSError):
            (Path("/run/containerd/s") / name).unlink()


def _put_back(workdir: Path, sysctls: Mapping[str, str], made_dirs: Sequence[Path], containers: set[str]) -> None:
    """Undo what a node did outside its work dir, once its processes are gone."""
    for name, value in sysctls.items():
        with contextlib.suppress(OSError):
            _write_sysctl(name, value)
    _remove_empty_cgroups("kubepods")
    # libcni keeps each attachment's result until its DEL, which a Pod killed with the node never gets.
    for container in containers:
        for name in (f"sep-pods-{container}-eth0", f"cni-loopback-{container}-lo"):
            with contextlib.suppress(OSError):
                (Path("/var/lib/cni/results") / name).unlink()
    _remove_links_into(Path("/var/log/containers"), workdir)
    with contextlib.suppress(OSError):
        if Path("/var/lib/kubelet/device-plugins") in made_dirs:
            Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink()
    for path in made_dirs:  # deepest first; a directory someone else filled meanwhile stays
        with contextlib.suppress(OSError):
            path.rmdir()


def _reap_stale_nodes(own: Path, progress: controlplane.Progress) -> None:
    """Clean up after nodes whose process died without stop(). Called under the machine lock, which a node
    holds from before it makes its work dir until after it removed it: any other work dir is stale."""
    for stale in sorted(Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*")):
        if stale == own or not stale.is_dir():
            continue
        progress(f"{_PREFIX} cleaning up after a node that was not stopped: {stale}")
        _kill(_pids_whose_cmdline_has("--config", f"{stale}/"))  # its kubelet and containerd, before anything else
        containers = _remove_containers(stale)
        _kill_shims(stale, containers)
        _unmount_under(stale)
        state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((stale / _STATE_FILE).read_text())
        _put_back(stale, dict(state.get("sysctls") or {}), [Path(path) for path in state.get("made_dirs") or ()],
                  containers)
        shutil.rmtree(stale, ignore_errors=True)


def _remove_links_into(directory: Path, target: Path | None) -> None:
    """The kubelet's /var/log/containers links to this node's logs (it removes them only with the container)."""
    if target is None or not directory.is_dir():
        return
    for link in directory.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(f"{target}/"):
                link.unlink()


def _remove_empty_cgroups(name: str) -> None:
    """Remove the kubelet's (now empty) cgroups; a cgroup still in use cannot be removed and stays."""
    for hierarchy in Path("/sys/fs/cgroup").glob("*"):
        top = hierarchy / name
        if not top.is_dir():
            continue
        for directory, _, _ in sorted(os.walk(top, topdown=False), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A control plane with its controllers and (``node=True``, the default) a real node.

    ``with Cluster() as cluster:`` then ``cluster.kubectl(...)``, ``cluster.kubeconfig_path``,
    ``cluster.image_import(path, also_tag=[...])``. ``node=False`` gives the controllers alone (garbage
    collector, namespace deletion, Deployments -> ReplicaSets -> Pods that stay Pending)."""

    def __init__(self, *, node: bool = True, ready_timeout: float = 120.0,
                 progress: controlplane.Progress = print, extra_apiserver_args: Sequence[str] = ()) -> None:
        self.with_node = node
        self.ready_timeout = ready_timeout
        self._progress = progress
        self._extra_apiserver_args = list(extra_apiserver_args)
        self._workdir: Path | None = None
        self._control_plane: controlplane.ControlPlane | None = None
        self._controllers: Controllers | None = None
        self._node: Node | None = None
        self.startup_seconds = 0.0

    @property
    def control_plane(self) -> controlplane.ControlPlane:
        if self._control_plane is None:
            raise NodeError("the cluster is not started")
        return self._control_plane

    @property
    def controllers(self) -> Controllers:
        if self._controllers is None:
            raise NodeError("the cluster is not started")
        return self._controllers

    @property
    def node(self) -> Node:
        if self._node is None:
            raise NodeError("the cluster has no node" if self._control_plane else "the cluster is not started")
        return self._node

    @property
    def kubeconfig_path(self) -> Path:
        return self.control_plane.kubeconfig_path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, input=input, check=check, timeout=timeout)

    def image_import(self, path: Path | str, *, also_tag: Sequence[str] = ()) -> list[str]:
        return self.node.image_import(path, also_tag=also_tag)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Cluster:
        if self.with_node:  # a machine that cannot run a node says so before anything starts
            ensure_node_packages(progress=self._progress)
            preflight()
        binaries = controlplane.ensure_binaries(progress=self._progress)
        node_binaries = ensure_node_binaries(progress=self._progress)
        started = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix="sep-cluster-"))
        atexit.register(self.stop)
        try:
            pki = KubeletClientPKI.create(self._workdir / "pki") if self.with_node else None
            self._control_plane = controlplane.ControlPlane(
                binaries, progress=self._progress, service_account_admission=True,
                extra_apiserver_args=[*(pki.apiserver_args() if pki else ()), *self._extra_apiserver_args])
            self._control_plane.start()
            self._controllers = Controllers(self._control_plane, node_binaries, ready_timeout=self.ready_timeout,
                                            progress=self._progress).start()
            if pki is not None:
                self._node = Node(self._control_plane, pki, node_binaries, ready_timeout=self.ready_timeout,
                                  progress=self._progress).start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        for part in (self._node, self._controllers, self._control_plane):
            if part is not None:
                part.stop()
        self._node = self._controllers = self._control_plane = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        atexit.unregister(self.stop)

