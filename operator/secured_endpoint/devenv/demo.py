"""``secured-endpoint-operator demo``: the whole product on one machine, tokens flowing.

A local control plane (built from source on first use), the sample token server on
127.0.0.1:18080 (the URL the examples name), the operator as its own process, and ``examples/``
applied. It then prints, every few seconds, what ``kubectl get sep`` says, which token each Secret
holds (by fingerprint, never the token) and what the sample backend answers when called with it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from secured_endpoint.devenv import controlplane
from secured_endpoint.devenv.tokenserver import TokenServer

TOKEN_SERVER_PORT = 18080  # the examples' tokenUrl
EXAMPLES = ("01-client-credentials", "02-password-grant")
SECRETS = ("orders-backend-token", "reports-backend-token")


def _project_root() -> Path:
    """The checkout the demo runs from (examples/ and crds/ live there, not in the wheel)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "crds").is_dir() and (parent / "examples").is_dir():
            return parent
    raise SystemExit("demo: run it from a checkout of secured-endpoint-operator (crds/ and examples/ needed)")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def main(*, duration: float, token_lifetime: int) -> int:
    root = _project_root()
    _say("ensuring kube-apiserver, kubectl and etcd (the first run builds them from source: minutes)")
    controlplane.ensure_binaries(progress=lambda line: print(f"[build] {line}", flush=True))
    token_server = TokenServer(port=TOKEN_SERVER_PORT)
    try:
        token_server.start()
    except OSError as exc:
        raise SystemExit(f"demo: port {TOKEN_SERVER_PORT} is busy ({exc.strerror}); stop what uses it") from None
    token_server.configure(lifetime_seconds=token_lifetime, issue_refresh_tokens=True)
    token_server.add_client("demo-client", "demo-secret")
    token_server.add_user("demo-user", "demo-password")
    _say(f"sample token server on {token_server.url} (tokens live {token_lifetime} s)")
    operator: subprocess.Popen[bytes] | None = None
    with controlplane.ControlPlane() as plane, tempfile.TemporaryDirectory(prefix="sep-demo-") as workdir:
        try:
            _say(f"control plane up at {plane.server} in {plane.startup_seconds:.1f} s; "
                 f"KUBECONFIG={plane.kubeconfig_path}")
            plane.kubectl("apply", "--server-side", "-k", str(root / "crds"))
            plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          "crd/securedendpoints.secured-endpoint.io")
            log_path = Path(workdir) / "operator.log"
            operator = _start_operator(plane, log_path)
            _say(f"operator running (pid {operator.pid}); its log: {log_path}")
            applied = time.monotonic()
            for example in EXAMPLES:
                _say(f"kubectl apply -f examples/{example}/")
                print(plane.kubectl("apply", "-f", str(root / "examples" / example)).stdout, end="", flush=True)
            _wait_for_secret(plane, SECRETS[0], applied)
            _show(plane, token_server, duration)
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=15)
            token_server.stop()
    _say("done: control plane, operator and token server stopped")
    return 0


def _start_operator(plane: controlplane.ControlPlane, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "SEP_STARTUP_SPREAD_SECONDS": "0"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "secured_endpoint.cli", "run", "--all-namespaces"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "secured-endpoint-operator started" in log_path.read_text(errors="replace"):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"demo: the operator did not start; its log:\n{log_path.read_text(errors='replace')}")


def _wait_for_secret(plane: controlplane.ControlPlane, name: str, since: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if plane.kubectl("get", "secret", name, check=False).returncode == 0:
            _say(f"Secret {name} appeared {time.monotonic() - since:.2f} s after kubectl apply")
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: Secret {name} did not appear within 30 s")


def _show(plane: controlplane.ControlPlane, token_server: TokenServer, duration: float) -> None:
    deadline = time.monotonic() + duration
    while True:
        print(flush=True)
        _say(f"kubectl get sep  ({time.strftime('%H:%M:%S')})")
        print(plane.kubectl("get", "sep").stdout, end="", flush=True)
        for name in SECRETS:
            data = _secret(plane, name)
            if data is None:
                _say(f"  {name}: not there yet")
                continue
            answer = httpx.get(f"{token_server.url}/api/echo",
                               headers={"Authorization": data["authorization"]}, timeout=5).status_code
            _say(f"  {name}: token {data['fingerprint']} expires {data['expires_at']}; "
                 f"sample backend answers {answer}")
        _say(f"  token server: {token_server.token_requests} token requests so far")
        if time.monotonic() >= deadline:
            return
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _secret(plane: controlplane.ControlPlane, name: str) -> dict[str, str] | None:
    result = plane.kubectl("get", "secret", name, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    body: dict[str, Any] = json.loads(result.stdout)
    return {key: base64.b64decode(value).decode() for key, value in (body.get("data") or {}).items()}
