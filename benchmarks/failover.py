"""Failover of two operator replicas on one Lease, with the default timings (15 s lease, 10 s renew deadline, 2 s
retry): the leader is SIGKILLed N times (or SIGTERMed with --signal TERM); each time, how long until the other
replica leads, and whether any token Secret ever held an expired token meanwhile.

    .venv/bin/python benchmarks/failover.py [--kills 10] [--signal KILL|TERM]

Runs on the local control plane (built from source like the tests), a sample token server and two operator
processes; prints the figures and writes docs/benchmarks/failover.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent
LEASE = f"sep-failover-{uuid.uuid4().hex[:6]}"
NAMESPACE = "failover"
ENDPOINTS = 5


def start_replica(plane: controlplane.ControlPlane, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "SEP_LEASE_NAME": LEASE,
           "SEP_LEASE_NAMESPACE": "default", "SEP_STARTUP_SPREAD_SECONDS": "0"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "secured_endpoint.cli", "run", "--namespace", NAMESPACE],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def holder(coordination: k8s.CoordinationV1Api) -> str | None:
    try:
        lease = coordination.read_namespaced_lease(LEASE, "default")
    except k8s.ApiException:
        return None
    return lease.spec.holder_identity or None


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Sampler(threading.Thread):
    def __init__(self, core: k8s.CoreV1Api) -> None:
        super().__init__(daemon=True)
        self.core, self.reads, self.expired = core, 0, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for secret in self.core.list_namespaced_secret(NAMESPACE).items:
                value = (secret.data or {}).get("expires_at")
                if value is None:
                    continue
                self.reads += 1
                expires = datetime.fromisoformat(base64.b64decode(value).decode().replace("Z", "+00:00"))
                self.expired += expires <= datetime.now(UTC)
            self.halt.wait(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL")
    args = parser.parse_args()
    controlplane.ensure_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="sep-failover-"))
    with controlplane.ControlPlane() as plane, TokenServer() as server:
        plane.install_crds(ROOT / "crds")
        server.lifetime_seconds = 60
        api_client = plane.api_client()
        core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
        coordination = k8s.CoordinationV1Api(api_client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NAMESPACE)))
        server.add_client("failover", "failover-secret")
        core.create_namespaced_secret(NAMESPACE, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="oauth"),
            string_data={"client_id": "failover", "client_secret": "failover-secret"}))
        logs = [workdir / f"replica-{index}-start.log" for index in range(2)]
        replicas = [start_replica(plane, log) for log in logs]
        for index in range(ENDPOINTS):
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, {
                "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": f"e{index}"},
                "spec": {"tokenUrl": server.token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"}},
            })
        wait(lambda: len([s for s in core.list_namespaced_secret(NAMESPACE).items
                          if s.metadata.name.endswith("-token")]) == ENDPOINTS, 60, "the first tokens")
        sampler = Sampler(core)
        sampler.start()
        takeovers: list[float] = []
        requests_before = server.token_requests
        started = time.monotonic()
        try:
            for kill in range(args.kills):
                leader = wait(lambda: holder(coordination), 60, "a leader")
                # the identity is POD_NAME (the host name here) + "_" + a uuid: each replica logs its own
                (victim,) = [index for index in range(2) if f"{leader} (this replica)" in logs[index].read_text()]
                killed_at = time.monotonic()
                replicas[victim].send_signal(getattr(signal, f"SIG{args.signal}"))
                replicas[victim].wait(timeout=30)
                wait(lambda leader=leader: (current := holder(coordination)) is not None and current != leader,
                     40, "the other replica to lead")
                takeovers.append(time.monotonic() - killed_at)
                print(f"kill {kill + 1}: the other replica leads after {takeovers[-1]:.1f} s", flush=True)
                logs[victim] = workdir / f"replica-{victim}-after-kill-{kill + 1}.log"
                replicas[victim] = start_replica(plane, logs[victim])
                time.sleep(5)  # the new follower is up and warm before the next kill
        finally:
            sampler.halt.set()
            sampler.join(timeout=5)
            for process in replicas:
                process.send_signal(signal.SIGTERM)
            for process in replicas:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
        elapsed = time.monotonic() - started
        figures = {
            "signal": args.signal, "kills": len(takeovers), "lease_seconds": 15, "renew_deadline_seconds": 10,
            "retry_period_seconds": 2, "takeover_seconds": [round(t, 2) for t in takeovers],
            "takeover_median_seconds": round(statistics.median(takeovers), 2),
            "takeover_max_seconds": round(max(takeovers), 2),
            "expired_tokens_seen": sampler.expired, "sampler_reads": sampler.reads,
            "token_requests_during_run": server.token_requests - requests_before,
            "refresh_cycles_expected": round(elapsed / 40 * ENDPOINTS, 1),
        }
    print(json.dumps(figures, indent=2))
    out = ROOT / "docs" / "benchmarks" / f"failover-{args.signal.lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
