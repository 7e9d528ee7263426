"""A real local Kubernetes control plane (etcd + kube-apiserver + kubectl), envtest-style.

The binaries are built from source with the Go toolchain (prebuilt downloads are not
possible here) and cached per version; ``ControlPlane`` then runs them on free loopback
ports with a static admin token, for tests, the demo and benchmarks.

Build (``ensure_binaries``):

* kube-apiserver and kubectl come from a throw-away wrapper module that requires
  ``k8s.io/kubernetes`` and replaces every staging module (``k8s.io/api`` ...) with its
  published ``v0.X.Y`` twin, since the kubernetes go.mod points them at ``./staging``
  which only exists in the kubernetes git tree.
* etcd comes from ``go.etcd.io/etcd/server/v3``, whose root package is etcd's main.

Cache layout: ``$SEP_CACHE_DIR`` (default ``~/.cache/secured-endpoint-operator/controlplane``)
``/<kube-version>-<etcd-version>/bin/{etcd,kube-apiserver,kubectl}``.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.5.35"
# buildDate stamp when the module proxy gives no release time (it is fixed either way, so a
# rebuild of the same version reports the same /version).
BUILD_DATE = "2026-01-01T00:00:00Z"

_PREFIX = "[control-plane]"
_GET_TIMEOUT_S = 30 * 60.0
_BUILD_TIMEOUT_S = 60 * 60.0
_LOCK_TIMEOUT_S = 2 * 60 * 60.0
_HEARTBEAT_S = 60.0
_CHECKSUM_DB_DOWN = re.compile(
    r"dial tcp|lookup .*sum\.golang\.org|no such host|i/o timeout|connection refused|"
    r"TLS handshake timeout|connection reset|network is unreachable",
)

Progress = Callable[[str], None]


class ControlPlaneError(RuntimeError):
    """Building or running the local control plane failed."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kubectl: Path


# --------------------------------------------------------------------------- versions / paths


def kube_version() -> str:
    return os.environ.get("SEP_KUBE_VERSION", KUBERNETES_VERSION)


def etcd_version() -> str:
    return os.environ.get("SEP_ETCD_VERSION", ETCD_VERSION)


def cache_root() -> Path:
    """Directory holding one sub-directory per (kube, etcd) version pair."""
    override = os.environ.get("SEP_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "secured-endpoint-operator" / "controlplane"


def version_dir() -> Path:
    return cache_root() / f"{kube_version()}-{etcd_version()}"


def binaries_in(bin_dir: Path) -> Binaries:
    return Binaries(
        etcd=bin_dir / "etcd",
        kube_apiserver=bin_dir / "kube-apiserver",
        kubectl=bin_dir / "kubectl",
    )


def _staging_version(kube: str) -> str:
    """k8s.io/kubernetes v1.34.4 ships its staging modules as v0.34.4."""
    major, _, rest = kube.removeprefix("v").partition(".")
    if major != "1" or not rest:
        raise ControlPlaneError(f"unsupported Kubernetes version {kube!r} (expected v1.X.Y)")
    return f"v0.{rest}"


# --------------------------------------------------------------------------- build: binaries


def ensure_binaries(*, progress: Progress = print) -> Binaries:
    """Return working etcd/kube-apiserver/kubectl, building (once, under a lock) if needed."""
    kube, etcd = kube_version(), etcd_version()
    bins = binaries_in(version_dir() / "bin")
    if _binaries_ok(bins, kube, etcd):
        return bins
    version_dir().mkdir(parents=True, exist_ok=True)
    with _file_lock(version_dir() / ".build.lock", progress):
        # Another process may have finished the build while we waited for the lock.
        if not _kube_ok(bins, kube):
            _build_kube(kube, bins, progress)
        if not _etcd_ok(bins.etcd, etcd):
            _build_etcd(etcd, bins.etcd, progress)
    if not _binaries_ok(bins, kube, etcd):
        raise ControlPlaneError(f"built binaries in {bins.etcd.parent} do not report the expected versions")
    return bins


def main_build() -> None:
    """CLI entry: build (or reuse) the control-plane binaries and print where they are."""
    bins = ensure_binaries()
    print(f"{_PREFIX} etcd:           {bins.etcd}")
    print(f"{_PREFIX} kube-apiserver: {bins.kube_apiserver}")
    print(f"{_PREFIX} kubectl:        {bins.kubectl}")


def _binaries_ok(bins: Binaries, kube: str, etcd: str) -> bool:
    return _kube_ok(bins, kube) and _etcd_ok(bins.etcd, etcd)


def _kube_ok(bins: Binaries, kube: str) -> bool:
    return _reports_version([str(bins.kube_apiserver), "--version"], kube) and _reports_version(
        [str(bins.kubectl), "version", "--client"], kube
    )


def _etcd_ok(path: Path, etcd: str) -> bool:
    return _reports_version([str(path), "--version"], etcd.removeprefix("v"))


def _reports_version(cmd: Sequence[str], version: str) -> bool:
    """True if the binary exists, runs, and prints the version (as a whole token)."""
    if not os.access(cmd[0], os.X_OK):
        return False
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (
        out.returncode == 0 and re.search(rf"(?<![\w.]){re.escape(version)}(?![\w.])", out.stdout) is not None
    )


@contextlib.contextmanager
def _file_lock(path: Path, progress: Progress) -> Iterator[None]:
    """Exclusive flock so concurrent test processes build only once."""
    with path.open("a") as fh:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        announced = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"timed out waiting for build lock {path}") from None
                if not announced:
                    progress(f"{_PREFIX} another process is building the binaries; waiting for {path}")
                    announced = True
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_kube(kube: str, bins: Binaries, progress: Progress) -> None:
    build_dir = version_dir() / "build" / "kube"
    _fresh_dir(build_dir)
    runner = _GoRunner(build_dir, progress)
    t0 = time.monotonic()
    progress(f"{_PREFIX} resolving k8s.io/kubernetes@{kube} …")
    gomod, released = _kubernetes_module(runner, kube)
    (build_dir / "go.mod").write_text(_kube_wrapper_gomod(gomod, kube))
    runner.run(
        [
            "go",
            "get",
            f"k8s.io/kubernetes/cmd/kube-apiserver@{kube}",
            f"k8s.io/kubernetes/cmd/kubectl@{kube}",
        ],
        step="download kube-apiserver/kubectl dependencies",
        timeout=_GET_TIMEOUT_S,
    )
    progress(f"{_PREFIX} module resolution/download took {time.monotonic() - t0:.0f}s")
    ldflags = _kube_ldflags(kube, released)
    bins.kube_apiserver.parent.mkdir(parents=True, exist_ok=True)
    for pkg, out, eta in (
        ("k8s.io/kubernetes/cmd/kube-apiserver", bins.kube_apiserver, "3-15 min"),
        # Shares most packages with kube-apiserver, so it is quick afterwards.
        ("k8s.io/kubernetes/cmd/kubectl", bins.kubectl, "under a minute to 5 min"),
    ):
        progress(
            f"{_PREFIX} building {out.name} {kube} (first run only; {eta} on 2 cores, quiet while compiling)…"
        )
        runner.build(pkg, out, ldflags)


def _build_etcd(etcd: str, out: Path, progress: Progress) -> None:
    build_dir = version_dir() / "build" / "etcd"
    _fresh_dir(build_dir)
    runner = _GoRunner(build_dir, progress)
    # The wrapper's go line is only a floor; `go get` raises it if etcd needs more.
    (build_dir / "go.mod").write_text("module sep.local/etcd-build\n\ngo 1.22\n")
    t0 = time.monotonic()
    runner.run(
        ["go", "get", f"go.etcd.io/etcd/server/v3@{etcd}"],
        step="download etcd dependencies",
        timeout=_GET_TIMEOUT_S,
    )
    progress(f"{_PREFIX} module resolution/download took {time.monotonic() - t0:.0f}s")
    progress(f"{_PREFIX} building etcd {etcd} (first run only; 1-3 min on 2 cores)…")
    out.parent.mkdir(parents=True, exist_ok=True)
    runner.build("go.etcd.io/etcd/server/v3", out, "-s -w")


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _kubernetes_module(runner: _GoRunner, kube: str) -> tuple[str, str]:
    """k8s.io/kubernetes's own go.mod text and release time, via the module cache/proxy."""
    stdout = runner.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{kube}"],
        step=f"download k8s.io/kubernetes@{kube}",
        timeout=_GET_TIMEOUT_S,
        echo=False,
    )
    info = json.loads(stdout)
    if not isinstance(info, dict) or not info.get("GoMod"):
        raise ControlPlaneError(f"`go mod download -json` gave no GoMod path: {stdout[:500]}")
    released = BUILD_DATE
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        released = str(json.loads(Path(str(info["Info"])).read_text())["Time"]) or BUILD_DATE
    return Path(str(info["GoMod"])).read_text(), released


def _kube_wrapper_gomod(kube_gomod: str, kube: str) -> str:
    staging = sorted(set(re.findall(r"^\s*(k8s\.io/\S+)\s+=>\s+\./staging/", kube_gomod, re.MULTILINE)))
    if not staging:
        raise ControlPlaneError("found no ./staging replace directives in the kubernetes go.mod")
    go_line = re.search(r"^go\s+\S+\s*$", kube_gomod, re.MULTILINE)
    # godebug may be a single line or a block; both are copied verbatim so runtime
    # defaults match what upstream ships.
    godebug = re.search(r"^godebug\s*(\([^)]*\)|[^\n]*)$", kube_gomod, re.MULTILINE)
    pinned = _staging_version(kube)
    lines = ["module sep.local/kube-build", ""]
    lines += [go_line.group(0).strip() if go_line else "go 1.24.0", ""]
    if godebug:
        lines += [godebug.group(0).strip(), ""]
    lines += [f"require k8s.io/kubernetes {kube}", "", "replace ("]
    lines += [f"\t{mod} => {mod} {pinned}" for mod in staging]
    lines += [")", ""]
    return "\n".join(lines)


def _kube_ldflags(kube: str, build_date: str = BUILD_DATE) -> str:
    major, minor = kube.removeprefix("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    stamps = {
        "gitVersion": kube,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "gitCommit": "",  # not known from the module zip; beats the "$Format:%H$" placeholder
        "buildDate": build_date,
    }
    return " ".join(["-s", "-w", *(f"-X {pkg}.{key}={value}" for key, value in stamps.items())])


class _GoRunner:
    """Runs go commands in one wrapper module dir, streaming output and never hanging."""

    def __init__(self, cwd: Path, progress: Progress) -> None:
        self.cwd = cwd
        self.progress = progress
        self.sumdb_off = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        flags = [f for f in env.get("GOFLAGS", "").split() if not f.startswith(("-mod=", "-buildvcs="))]
        env.update(
            CGO_ENABLED="0",
            GOTOOLCHAIN="local",
            GOFLAGS=" ".join([*flags, "-mod=mod", "-buildvcs=false"]),
        )
        if self.sumdb_off:
            env["GOSUMDB"] = "off"
        return env

    def build(self, pkg: str, out: Path, ldflags: str) -> None:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        t0 = time.monotonic()
        try:
            self.run(
                ["go", "build", "-p", "2", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), pkg],
                step=f"build {out.name}",
                timeout=_BUILD_TIMEOUT_S,
            )
            os.replace(tmp, out)  # atomic: readers never see a half-written binary
        finally:
            tmp.unlink(missing_ok=True)
        self.progress(f"{_PREFIX} built {out.name} in {time.monotonic() - t0:.0f}s -> {out}")

    def run(self, cmd: Sequence[str], *, step: str, timeout: float, echo: bool = True) -> str:
        """Run cmd; on an unreachable checksum DB retry once with GOSUMDB=off. Returns stdout."""
        rc, out, err = _run_streaming(
            cmd, self.cwd, self.env(), timeout, self.progress if echo else None, step
        )
        if rc != 0 and not self.sumdb_off and _checksum_db_unreachable(err):
            self.progress(
                f"{_PREFIX} the Go checksum database is unreachable ({_first_match(err)}); "
                "retrying with GOSUMDB=off"
            )
            self.sumdb_off = True
            rc, out, err = _run_streaming(
                cmd, self.cwd, self.env(), timeout, self.progress if echo else None, step
            )
        if rc != 0:
            tail = "\n".join(err.splitlines()[-40:]) or out[-4000:]
            raise ControlPlaneError(f"{step} failed (exit {rc}): {' '.join(cmd)}\n{tail}")
        return out


def _checksum_db_unreachable(stderr: str) -> bool:
    # A checksum *mismatch* is a security error and must never be bypassed.
    if "SECURITY ERROR" in stderr or "checksum mismatch" in stderr:
        return False
    return "sum.golang.org" in stderr and _CHECKSUM_DB_DOWN.search(stderr) is not None


def _first_match(stderr: str) -> str:
    for line in stderr.splitlines():
        if "sum.golang.org" in line:
            return line.strip()[:200]
    return "no detail"


def _run_streaming(
    cmd: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    progress: Progress | None,
    step: str,
) -> tuple[int, str, str]:
    """Run cmd, forwarding stderr lines to progress, with heartbeats and a hard timeout."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if proc.stdout is None or proc.stderr is None:  # cannot happen with PIPE; narrows the types
        raise ControlPlaneError(f"{step}: no output pipes")
    err_lines: collections.deque[str] = collections.deque(maxlen=400)
    out_chunks: list[str] = []

    def pump_err(stream: IO[str]) -> None:
        for line in stream:
            err_lines.append(line.rstrip("\n"))
            if progress is not None:
                progress(f"{_PREFIX}   {line.rstrip()}")

    def pump_out(stream: IO[str]) -> None:
        out_chunks.append(stream.read())

    readers = [
        threading.Thread(target=pump_err, args=(proc.stderr,), daemon=True),
        threading.Thread(target=pump_out, args=(proc.stdout,), daemon=True),
    ]
    for reader in readers:
        reader.start()
    t0 = time.monotonic()
    while True:
        try:
            proc.wait(timeout=_HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - t0
            if elapsed > timeout:
                proc.kill()
                proc.wait(timeout=30)
                raise ControlPlaneError(f"{step} timed out after {elapsed:.0f}s: {' '.join(cmd)}") from None
            if progress is not None:
                progress(f"{_PREFIX} … still running: {step} ({elapsed / 60:.0f} min so far)")
    for reader in readers:
        reader.join(timeout=30)
    return proc.returncode, "".join(out_chunks), "\n".join(err_lines)


# --------------------------------------------------------------------------- run


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _write_rsa_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# The audit policy of ``ControlPlane(audit_log=True)``: what every write carried, where a leak would show.
# Bodies of Secrets (and service-account tokens) are never logged, so the log is no place secrets are expected;
# SecuredEndpoints (status included) and Events are logged with request and response; reads are not logged.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: None
  verbs: ["get", "list", "watch"]
- level: Metadata
  resources:
  - group: ""
    resources: ["secrets", "serviceaccounts/token", "configmaps"]
- level: RequestResponse
  resources:
  - group: "secured-endpoint.io"
    resources: ["securedendpoints", "securedendpoints/status"]
  - group: ""
    resources: ["events"]
  - group: "events.k8s.io"
    resources: ["events"]
- level: Metadata
"""


class ControlPlane:
    """etcd + kube-apiserver on loopback, with an admin token and a kubeconfig.

    Use ``with ControlPlane() as cp:`` or ``cp.start()`` / ``cp.stop()``. ``audit_log=True`` writes the
    apiserver's audit log (``audit_policy``, by default ``AUDIT_POLICY``) to ``audit_log_path``.
    """

    ADMIN_USER = "sep-admin"

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        ready_timeout: float = 60.0,
        progress: Progress = print,
        audit_log: bool = False,
        audit_policy: str = AUDIT_POLICY,
        extra_apiserver_args: Sequence[str] = (),
        service_account_admission: bool = False,
    ) -> None:
        """``extra_apiserver_args`` are appended to kube-apiserver's flags; ``service_account_admission`` keeps
        the ServiceAccount admission plugin (Pods get their token volume), which only a control plane with a
        controller-manager wants: without one no ``default`` ServiceAccount exists and Pods are refused."""
        self._binaries = binaries
        self.audit_log = audit_log
        self._audit_policy = audit_policy
        self._extra_apiserver_args = list(extra_apiserver_args)
        self._service_account_admission = service_account_admission
        self.ready_timeout = ready_timeout
        self._progress = progress
        self._workdir: Path | None = None
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._apiserver_cmd: list[str] = []
        self._etcd_cmd: list[str] = []
        self._logs: list[IO[bytes]] = []
        self.admin_token = secrets.token_urlsafe(32)
        self.etcd_port = 0
        self.etcd_peer_port = 0
        self.apiserver_port = 0
        self.startup_seconds = 0.0

    # -- paths -------------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("control plane is not started")
        return self._workdir

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def service_account_key_path(self) -> Path:
        """The RSA key the apiserver signs and verifies service-account tokens with."""
        return self.workdir / "sa.key"

    @property
    def etcd_log_path(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def apiserver_log_path(self) -> Path:
        return self.workdir / "kube-apiserver.log"

    @property
    def audit_log_path(self) -> Path:
        """The apiserver's audit log (JSON lines), when started with ``audit_log=True``."""
        return self.workdir / "audit.log"

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = ensure_binaries(progress=self._progress)
        return self._binaries

    @property
    def running(self) -> bool:
        return bool(self._procs)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc in self._procs]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self._procs:
            raise ControlPlaneError("control plane is already running")
        bins = self.binaries  # may build; done before the clock starts
        t0 = time.monotonic()
        self._workdir = Path(tempfile.mkdtemp(prefix="sep-controlplane-"))
        atexit.register(self.stop)
        try:
            deadline = time.monotonic() + self.ready_timeout
            self.etcd_port, self.etcd_peer_port, self.apiserver_port = _free_ports(3)
            self._start_etcd(bins)
            self._wait_etcd(deadline)
            self._start_apiserver(bins)
            self._wait_apiserver(deadline)
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Terminate kube-apiserver, then etcd, and delete the work dir. Idempotent."""
        for name, proc in reversed(self._procs):
            _terminate(name, proc)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        atexit.unregister(self.stop)

    def stop_apiserver(self, *, grace: float = 3.0) -> None:
        """Stop kube-apiserver only (a control-plane upgrade, a crash): SIGTERM, then SIGKILL after ``grace``
        seconds, since a terminating apiserver waits for its open watches. etcd keeps running."""
        for index, (name, proc) in enumerate(self._procs):
            if name == "kube-apiserver":
                _terminate(name, proc, grace=grace)
                del self._procs[index]
                return
        raise ControlPlaneError("kube-apiserver is not running")

    def start_apiserver(self) -> None:
        """Start kube-apiserver again, as before (same port, serving certificate, tokens and etcd), and wait
        until it is ready."""
        if any(name == "kube-apiserver" for name, _ in self._procs):
            raise ControlPlaneError("kube-apiserver is already running")
        with self.apiserver_log_path.open("ab") as log:
            proc = subprocess.Popen(self._apiserver_cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self._procs.append(("kube-apiserver", proc))
        self._wait_apiserver(time.monotonic() + self.ready_timeout)

    def stop_etcd(self) -> None:
        """Kill etcd (SIGKILL: a crash, a node loss); kube-apiserver keeps running, without its storage. Nothing
        written is lost despite ``--unsafe-no-fsync``: the OS still holds what the process wrote."""
        for index, (name, proc) in enumerate(self._procs):
            if name == "etcd":
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    raise ControlPlaneError(f"etcd (pid {proc.pid}) did not die after SIGKILL") from None
                del self._procs[index]
                return
        raise ControlPlaneError("etcd is not running")

    def start_etcd(self) -> None:
        """Start etcd again, as before (same data dir, so the same revisions; same ports), and wait until it
        answers healthy. kube-apiserver reconnects by itself, within a few seconds; until then it fails requests."""
        if any(name == "etcd" for name, _ in self._procs):
            raise ControlPlaneError("etcd is already running")
        with self.etcd_log_path.open("ab") as log:
            proc = subprocess.Popen(self._etcd_cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._procs.insert(0, ("etcd", proc))  # stopped last again, after the apiserver
        self._wait_etcd(time.monotonic() + self.ready_timeout)

    # -- helpers -----------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane."""
        cmd = [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig_path), *args]
        env = dict(os.environ, KUBECACHEDIR=str(self.workdir / "kube-cache"))
        env.pop("KUBECONFIG", None)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        return proc

    def install_crds(self, directory: Path, *, timeout: float = 60.0) -> None:
        """``kubectl apply -k`` a folder of CRDs and wait until every CRD is Established."""
        self.kubectl("apply", "--server-side", "-k", str(directory))
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "crd", "--all",
                     timeout=timeout + 10)

    def api_client(self, *, pool_size: int | None = None) -> Any:
        """The official Python client's ApiClient for this control plane (tests, benchmarks)."""
        from kubernetes import client, config  # only the development tools need the official client

        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig_path), client_configuration=configuration)
        if pool_size is not None:
            configuration.connection_pool_maxsize = pool_size
        return client.ApiClient(configuration)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        """GET an API path with the admin token; returns (status, body)."""
        req = urllib.request.Request(  # noqa: S310 - https URL built from our own server
            self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:  # noqa: S310
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode(errors="replace")

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], log_path: Path) -> None:
        log = log_path.open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._procs.append((name, proc))

    def _start_etcd(self, bins: Binaries) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._etcd_cmd = [
            str(bins.etcd),
            "--name=sep",
            f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_endpoint}",
            f"--advertise-client-urls={self.etcd_endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=sep={peer}",
            "--initial-cluster-state=new",  # ignored by a restart: the data dir already holds the member
            "--unsafe-no-fsync=true",  # throw-away data: durability buys nothing
            f"--quota-backend-bytes={2 * 1024**3}",
            "--log-level=warn",
        ]
        self._spawn("etcd", self._etcd_cmd, self.etcd_log_path)

    def _start_apiserver(self, bins: Binaries) -> None:
        work = self.workdir
        sa_key = self.service_account_key_path
        _write_rsa_key(sa_key)
        tokens = work / "tokens.csv"
        tokens.write_text(f'{self.admin_token},{self.ADMIN_USER},{self.ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        (work / "certs").mkdir()
        self._apiserver_cmd = [
                str(bins.kube_apiserver),
                f"--etcd-servers={self.etcd_endpoint}",
                f"--cert-dir={work / 'certs'}",  # self-signed serving cert is generated here
                f"--secure-port={self.apiserver_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # no kubernetes Endpoints upkeep for a lone apiserver
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                # pods need no SA tokens (envtest-like), unless a controller-manager makes ServiceAccounts
                *(() if self._service_account_admission else ("--disable-admission-plugins=ServiceAccount",)),
                "--profiling=false",
                *self._audit_args(),
                *self._extra_apiserver_args,
        ]
        self._spawn("kube-apiserver", self._apiserver_cmd, self.apiserver_log_path)

    def _audit_args(self) -> list[str]:
        if not self.audit_log:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(self._audit_policy)
        # one file, never rotated, written before the request is answered: complete when read
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json", "--audit-log-mode=blocking"]

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} during startup; log tail:\n"
                    + _tail(self.etcd_log_path if name == "etcd" else self.apiserver_log_path)
                )

    def _timeout_error(self, what: str, detail: str) -> ControlPlaneError:
        return ControlPlaneError(
            f"{what} not ready after {self.ready_timeout:.0f}s ({detail})\n"
            f"--- etcd log tail ---\n{_tail(self.etcd_log_path)}\n"
            f"--- kube-apiserver log tail ---\n{_tail(self.apiserver_log_path)}"
        )

    def _wait_etcd(self, deadline: float) -> None:
        detail = "no answer"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.etcd_endpoint + "/health", timeout=2) as resp:  # noqa: S310
                    body = resp.read().decode()
                if '"health":"true"' in body.replace(" ", ""):
                    return
                detail = body
            except (OSError, urllib.error.URLError) as err:
                detail = str(err)
            time.sleep(0.1)
        raise self._timeout_error("etcd", detail)

    def _wait_apiserver(self, deadline: float) -> None:
        """Wait for /readyz and for the default namespace, which tests rely on."""
        cert = self.workdir / "certs" / "apiserver.crt"
        detail = "no answer"
        while time.monotonic() < deadline:
            self._check_alive()
            time.sleep(0.2)
            if not cert.is_file() or b"END CERTIFICATE" not in cert.read_bytes():
                detail = f"{cert.name} not written yet"
                continue
            # The generated file is the serving cert followed by its self-signed CA.
            shutil.copyfile(cert, self.ca_path)
            try:
                status, body = self.get("/readyz", timeout=2)
                if status != 200:
                    detail = f"/readyz {status}: {body[-300:]}"
                    continue
                status, body = self.get("/api/v1/namespaces/default", timeout=2)
                if status == 200:
                    return
                detail = f"default namespace: HTTP {status}"
            except (OSError, urllib.error.URLError, ssl.SSLError) as err:
                detail = str(err)
        raise self._timeout_error("kube-apiserver", detail)

    def _write_kubeconfig(self) -> None:
        # JSON is valid YAML, so kubectl and the Python client read it as a kubeconfig.
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "sep", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}
            ],
            "users": [{"name": self.ADMIN_USER, "user": {"token": self.admin_token}}],
            "contexts": [{"name": "sep", "context": {"cluster": "sep", "user": self.ADMIN_USER}}],
            "current-context": "sep",
        }
        self.kubeconfig_path.write_text(json.dumps(config, indent=2))
        self.kubeconfig_path.chmod(0o600)


def _terminate(name: str, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise ControlPlaneError(f"{name} (pid {proc.pid}) did not die after SIGKILL") from None
