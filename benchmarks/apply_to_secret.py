"""Time from creating a SecuredEndpoint to its token Secret existing, on the real local stack.

    .venv/bin/python benchmarks/apply_to_secret.py [--count 20]

Starts the local control plane, a token server and the operator (as its own process), then creates
endpoints one after another and watches for each token Secret. Prints every sample and the median,
p90 and max. A figure, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as plane, TokenServer() as server, \
            tempfile.TemporaryDirectory() as workdir:
        plane.install_crds(ROOT / "crds")
        server.add_client("bench", "bench-secret")
        api_client = plane.api_client()
        core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="bench")))
        core.create_namespaced_secret("bench", k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="oauth"),
            string_data={"client_id": "bench", "client_secret": "bench-secret"}))
        log = Path(workdir) / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path)}
        with log.open("wb") as handle:
            operator = subprocess.Popen([sys.executable, "-m", "secured_endpoint.cli", "run", "-A"],
                                        env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            while "secured-endpoint-operator started" not in log.read_text():
                time.sleep(0.1)
            time.sleep(1)  # let the initial listings settle
            samples = [_one(core, custom, server, index) for index in range(args.count)]
        finally:
            operator.terminate()
            operator.wait(15)
    for index, sample in enumerate(samples):
        print(f"endpoint {index:2d}: {sample * 1000:7.1f} ms")
    ordered = sorted(samples)
    print(f"apply -> token Secret over {len(samples)} endpoints: median {statistics.median(samples) * 1000:.1f} ms, "
          f"p90 {ordered[int(0.9 * (len(ordered) - 1))] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")
    return 0


def _one(core: k8s.CoreV1Api, custom: k8s.CustomObjectsApi, server: TokenServer, index: int) -> float:
    name = f"ep-{index}"
    watcher = k8s_watch.Watch()
    body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name},
            "spec": {"tokenUrl": server.token_url, "allowInsecureHttp": True,
                     "clientSecretRef": {"name": "oauth"}}}
    resource_version = core.list_namespaced_secret("bench").metadata.resource_version
    started = time.perf_counter()
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "bench", api.PLURAL, body)
    for event in watcher.stream(core.list_namespaced_secret, "bench", resource_version=resource_version,
                                field_selector=f"metadata.name={name}-token", timeout_seconds=30):
        if event["type"] == "ADDED":
            elapsed = time.perf_counter() - started
            watcher.stop()
            return elapsed
    raise SystemExit(f"no Secret for {name} within 30 s")


if __name__ == "__main__":
    sys.exit(main())
