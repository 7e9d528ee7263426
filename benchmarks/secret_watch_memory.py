"""What watching every Secret costs the operator, with many unrelated Secrets in the cluster.

    .venv/bin/python benchmarks/secret_watch_memory.py [--secrets 10000] [--size 1536] [--endpoints 5]

Starts the local control plane and a token server, then runs the operator (its own process, ``-A``) in
a few scenarios, each with fresh SecuredEndpoints whose credential Secrets carry the label
``secured-endpoint.io/credentials=true``:

1. baseline: no unrelated Secret in the cluster;

then, after creating ``--secrets`` unrelated Secrets (spread over ``--namespaces`` namespaces, each with
``--size`` bytes of incompressible data, like TLS or credential Secrets):

2. ``SEP_SOURCE_LABEL_SELECTOR=secured-endpoint.io/credentials=true``: the apiserver sends only the
   labelled Secrets and ConfigMaps;
3. namespace-scoped (``--namespace`` of the endpoints' namespace only);
4. the default mode: every Secret and ConfigMap in the cluster is listed and watched (last: it is slow).

For each it reads the operator's ``/proc/<pid>/status``: VmRSS when kopf starts (after imports, before any
listing), VmHWM (the peak, which the initial listing sets), VmRSS once settled after the tokens are written
(no change over 1 % for 3 s), the CPU seconds spent so far, and the time from process start, and from
"started", to the first and the last token Secret. If no token comes (the operator exits, or ``--timeout``
passes) the row says why. ``--scenarios label,default`` picks scenarios; ``--operator SCRIPT`` runs a
patched build instead of ``-m secured_endpoint.cli``. A figure, not a pass/fail test.

On 2 cores with kopf 1.45.2 (5 endpoints, 10,000 Secrets of 1.5 KiB): baseline, label-selected and
namespace-scoped all peak at 87 MiB with the first token 0.1 s after kopf starts; the default mode reaches
265 MiB and spends 567 s of CPU before its paged LIST fails with 410 Expired and kopf exits (1,000 / 2,000 /
4,000 Secrets: first token after 1.9 / 10.4 / 58 s, 109 / 126 / 165 MiB). See the README.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client as k8s

from secured_endpoint import api, kube
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent
LABEL_KEY, LABEL_VALUE = "secured-endpoint.io/credentials", "true"
SELECTOR = f"{LABEL_KEY}={LABEL_VALUE}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


EVERYTHING = ["--all-namespaces"]
SCENARIOS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "baseline": ("-A, no unrelated Secrets", EVERYTHING, {}),
    "label": ("-A, SEP_SOURCE_LABEL_SELECTOR", EVERYTHING, {"SEP_SOURCE_LABEL_SELECTOR": SELECTOR}),
    "namespaced": ("--namespace <the endpoints' one>", ["--namespace", "{namespace}"], {}),
    "default": ("-A, every Secret watched (default)", EVERYTHING, {}),
}


@dataclass
class Result:
    name: str
    unrelated: int
    rss_started_mib: float = 0.0
    peak_mib: float = 0.0
    settled_mib: float = 0.0
    cpu_seconds: float = 0.0
    spawn_to_started: float = 0.0
    started_to_first: float = 0.0
    started_to_last: float = 0.0
    failure: str = ""  # why no token came: the operator exited, or the timeout passed


@dataclass
class Sampler:
    """Polls /proc/<pid>/status in a thread: the last VmRSS and VmHWM, in KiB."""

    pid: int
    rss_kib: int = 0
    hwm_kib: int = 0
    cpu: float = 0.0  # seconds of CPU, user + system
    history: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_kib = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    self.hwm_kib = int(line.split()[1])
            with contextlib.suppress(OSError, IndexError, ValueError):
                self.cpu = cpu_seconds(self.pid)
            self.history.append((time.monotonic(), self.rss_kib))
            time.sleep(0.02)

    def settled(self, *, quiet_seconds: float = 3.0, tolerance: float = 0.01, timeout: float = 60.0) -> int:
        """Wait until VmRSS stays within ``tolerance`` for ``quiet_seconds``; return it (KiB)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = time.monotonic()
            window = [rss for at, rss in self.history if at >= now - quiet_seconds]
            if self.history and self.history[0][0] <= now - quiet_seconds and window \
                    and max(window) - min(window) <= tolerance * max(window):
                return self.rss_kib
        return self.rss_kib


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


async def create_unrelated(plane: controlplane.ControlPlane, *, count: int, namespaces: int, size: int,
                           in_flight: int) -> float:
    """Create ``count`` Secrets over ``namespaces`` namespaces, ``in_flight`` requests at once; seconds taken."""
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=str(plane.kubeconfig_path))
    client = kube.KubeClient(credentials, max_in_flight=in_flight)
    started = time.monotonic()
    try:
        for index in range(namespaces):
            await client.request("POST", "/api/v1/namespaces",
                                 json_body={"metadata": {"name": f"unrelated-{index:02d}"}})

        async def one(index: int) -> None:
            cert = base64.b64encode(os.urandom(size * 3 // 4)).decode()
            key = base64.b64encode(os.urandom(size // 4)).decode()
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": f"app-{index:05d}-tls", "labels": {"app": f"app-{index % 97}"}},
                    "data": kube.encode_data({"tls.crt": cert[:size * 3 // 4], "tls.key": key[:size // 4]})}
            await client.create_secret(f"unrelated-{index % namespaces:02d}", body)

        batch = in_flight * 8  # bounded: never 10,000 coroutines at once
        for first in range(0, count, batch):
            await asyncio.gather(*(one(index) for index in range(first, min(first + batch, count))))
    finally:
        await client.aclose()
    return time.monotonic() - started


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if "Error" in line or "failed" in line]
    return (lines[-1] if lines else "the operator exited")[:300]


def run_scenario(plane: controlplane.ControlPlane, core: k8s.CoreV1Api, custom: k8s.CustomObjectsApi,
                 server: TokenServer, workdir: Path, *, name: str, number: int, unrelated: int, endpoints: int,
                 scope: list[str], env: dict[str, str], timeout: float, command: list[str]) -> Result:
    namespace = f"bench-{number}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    client_id = f"bench-{number}"
    server.add_client(client_id, "bench-secret")
    core.create_namespaced_secret(namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="oauth", labels={LABEL_KEY: LABEL_VALUE}),
        string_data={"client_id": client_id, "client_secret": "bench-secret"}))
    for index in range(endpoints):
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, {
            "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": f"ep-{index}"},
            "spec": {"tokenUrl": server.token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"}}})
    scope = [namespace if item == "{namespace}" else item for item in scope]

    log = workdir / f"operator-{number}.log"
    environment = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "SEP_STARTUP_SPREAD_SECONDS": "0", **env}
    result = Result(name=name, unrelated=unrelated)
    spawned = time.monotonic()
    with log.open("wb") as handle:
        operator = subprocess.Popen([sys.executable, *command, "run", *scope],
                                    env=environment, stdout=handle, stderr=subprocess.STDOUT)
    sampler = Sampler(operator.pid)
    sampler.start()
    try:
        while "secured-endpoint-operator started" not in log.read_text():
            if operator.poll() is not None:
                raise SystemExit(f"the operator exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        started = time.monotonic()
        result.spawn_to_started = started - spawned
        result.rss_started_mib = sampler.rss_kib / 1024
        first = None
        while True:
            tokens = core.list_namespaced_secret(
                namespace, label_selector=f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}").items
            if tokens and first is None:
                first = time.monotonic()
            if len(tokens) >= endpoints:
                break
            if operator.poll() is not None or time.monotonic() - started > timeout:
                result.cpu_seconds = sampler.cpu
                result.peak_mib = sampler.hwm_kib / 1024
                result.settled_mib = sampler.rss_kib / 1024
                why = _last_error(log) if operator.poll() is not None else "still no token"
                result.failure = f"no token after {time.monotonic() - started:.0f} s: {why}"
                print(f"  {name}: {result.failure}", flush=True)
                return result
            time.sleep(0.05)
        last = time.monotonic()
        result.started_to_first = (first or last) - started
        result.started_to_last = last - started
        result.settled_mib = sampler.settled() / 1024
        result.peak_mib = sampler.hwm_kib / 1024
        result.cpu_seconds = cpu_seconds(operator.pid)
        # clean up through the operator (it holds the finalizers), so later scenarios start alike
        for index in range(endpoints):
            custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, f"ep-{index}")
        deadline = time.monotonic() + 60
        while custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: endpoints not released:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        sampler.stop()
        operator.terminate()
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
    print(f"  {name}: done ({result.started_to_last:.1f} s to the last token)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", type=int, default=10_000, help="unrelated Secrets to create")
    parser.add_argument("--namespaces", type=int, default=20, help="namespaces to spread them over")
    parser.add_argument("--size", type=int, default=1536, help="bytes of data per unrelated Secret")
    parser.add_argument("--endpoints", type=int, default=5, help="SecuredEndpoints per scenario")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent creates")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the tokens")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--operator", default=None, metavar="SCRIPT",
                        help="run this script instead of `-m secured_endpoint.cli` (to compare a patched build)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    command = [args.operator] if args.operator else ["-m", "secured_endpoint.cli"]
    controlplane.ensure_binaries()
    results: list[Result] = []
    with controlplane.ControlPlane() as plane, TokenServer() as server, \
            tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        plane.install_crds(ROOT / "crds")
        api_client = plane.api_client()
        core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
        created = False

        for number, key in enumerate(chosen, start=1):
            name, scope, env = SCENARIOS[key]
            if key != "baseline" and not created:
                print(f"creating {args.secrets} unrelated Secrets of {args.size} bytes …", flush=True)
                seconds = asyncio.run(create_unrelated(plane, count=args.secrets, namespaces=args.namespaces,
                                                       size=args.size, in_flight=args.in_flight))
                print(f"  created in {seconds:.1f} s ({args.secrets / seconds:.0f}/s)", flush=True)
                created = True
            print(f"scenario {number}: {name}", flush=True)
            results.append(run_scenario(plane, core, custom, server, workdir, name=name, number=number,
                                        unrelated=args.secrets if created else 0, endpoints=args.endpoints,
                                        scope=scope, env=env, timeout=args.timeout, command=command))

    header = (f"{'scenario':38} {'unrelated':>9} {'RSS@start':>9} {'peak RSS':>9} {'settled':>9} {'CPU s':>6} "
              f"{'1st token':>9} {'all tokens':>10}")
    print()
    print(f"{args.endpoints} endpoints; RSS in MiB; token times in s from kopf's start "
          f"(+ {results[0].spawn_to_started:.1f} s of process start and imports)")
    print(header)
    print("-" * len(header))
    for r in results:
        times = f"{r.started_to_first:>9.2f} {r.started_to_last:>10.2f}" if not r.failure else f"{'—':>9} {'—':>10}"
        print(f"{r.name:38} {r.unrelated:>9} {r.rss_started_mib:>9.1f} {r.peak_mib:>9.1f} {r.settled_mib:>9.1f} "
              f"{r.cpu_seconds:>6.1f} {times}")
    for r in results:
        if r.failure:
            print(f"{r.name}: {r.failure} (settled = RSS at that moment)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
