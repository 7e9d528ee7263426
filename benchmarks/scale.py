"""Many SecuredEndpoints on one operator replica: time to all Ready, restart cost, memory.

    .venv/bin/python benchmarks/scale.py [--endpoints 1000] [--lifetime 3600]

Creates the endpoints (bounded concurrency), starts the operator as its own process and reports:
time until every token Secret exists and every endpoint is Ready, token requests, the operator's peak
and settled RSS; then restarts the operator and reports the token requests the restart caused (goal: 0)
and the time until it has re-read everything. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "scale"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--lifetime", type=int, default=3600)
    parser.add_argument("--profile", metavar="PATH", help="run the operator under cProfile, write stats here")
    parser.add_argument("--log", metavar="PATH", help="keep the operator's log here")
    args = parser.parse_args()
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as plane, TokenServer() as server, tempfile.TemporaryDirectory() as workdir:
        server.add_client("scale", "scale-secret")
        server.lifetime_seconds = args.lifetime
        plane.install_crds(ROOT / "crds")
        api_client = plane.api_client(pool_size=32)
        core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NAMESPACE)))
        credentials = {"client_id": "scale", "client_secret": "scale-secret"}
        core.create_namespaced_secret(NAMESPACE, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="oauth"),
                                                              string_data=credentials))
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path)}
        log = Path(args.log) if args.log else Path(workdir) / "operator.log"
        operator = _start(env, log, args.profile)
        try:
            time.sleep(3)
            baseline = _rss(operator.pid, "VmRSS")
            print(f"operator RSS with no endpoint: {baseline:.0f} MiB")
            cpu_before = _cpu_seconds(operator.pid)
            started = time.monotonic()
            _create_endpoints(custom, server, args.endpoints)
            print(f"created {args.endpoints} SecuredEndpoints in {time.monotonic() - started:.1f} s")
            peak = _wait_all_ready(custom, core, args.endpoints, operator.pid)
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds(operator.pid) - cpu_before
            print(f"all {args.endpoints} Ready with their Secret {elapsed:.1f} s after the first create "
                  f"({args.endpoints / elapsed:.0f} endpoints/s); token requests: {server.token_requests}; "
                  f"operator CPU {cpu:.1f} s ({cpu / elapsed * 100:.0f} % of one core)")
            time.sleep(5)
            settled, peak = _rss(operator.pid, "VmRSS"), max(peak, _rss(operator.pid, "VmHWM"))
            print(f"operator RSS settled {settled:.0f} MiB, peak {peak:.0f} MiB: "
                  f"{(settled - baseline) * 1024 / args.endpoints:.1f} KiB per endpoint (its token Secret included)")
            if args.profile:
                return 0  # the profile covers start-up and creation; the finally clause stops the operator
            before = server.token_requests
            operator.terminate()
            operator.wait(30)
            operator = _start(env, log)
            time.sleep(15)  # the start-up spread is 10 s: anything overdue would have fired by now
            print(f"restart: {server.token_requests - before} token requests in the first 15 s (goal 0); "
                  f"operator CPU {_cpu_seconds(operator.pid):.1f} s, RSS {_rss(operator.pid, 'VmRSS'):.0f} MiB")
        finally:
            operator.terminate()
            operator.wait(30)
    return 0


def _create_endpoints(custom: k8s.CustomObjectsApi, server: TokenServer, count: int) -> None:
    def create(index: int) -> None:
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, {
            "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": f"ep-{index:05d}"},
            "spec": {"tokenUrl": server.token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"}}})
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, range(count)))


def _start(env: dict[str, str], log: Path, profile: str | None = None) -> subprocess.Popen[bytes]:
    profiler = ["-m", "cProfile", "-o", profile] if profile else []
    with log.open("ab") as handle:
        process = subprocess.Popen([sys.executable, *profiler, "-m", "secured_endpoint.cli", "run", "-A"],
                                   env=env, stdout=handle, stderr=subprocess.STDOUT)
    return process


def _wait_all_ready(custom: k8s.CustomObjectsApi, core: k8s.CoreV1Api, count: int, pid: int) -> float:
    peak = 0.0
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        peak = max(peak, _rss(pid, "VmRSS"))
        items = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL)["items"]
        ready = sum(1 for item in items for c in (item.get("status") or {}).get("conditions") or ()
                    if c["type"] == "Ready" and c["status"] == "True")
        if ready == count:
            managed = f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}"
            secrets = core.list_namespaced_secret(NAMESPACE, label_selector=managed)
            if len(secrets.items) == count:
                return peak
        time.sleep(0.5)
    raise SystemExit("not all endpoints became Ready within 30 minutes")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
