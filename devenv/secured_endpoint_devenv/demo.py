"""``sep-devenv demo``: the whole product on one machine, tokens flowing.

A local control plane (built from source on first use), the sample token server on
127.0.0.1:18080 (the URL the examples name; it also serves a sample backend that accepts only valid
tokens), a redis-server, the operator as its own process, ``examples/`` applied, and two replicas of the
example gateway (``examples/04-gateway``) in front of the sample backend, reading the token from Redis.

It then prints, every few seconds, what ``kubectl get sep`` says, which token each Secret and Redis key
holds (by fingerprint, never the token) and what the backend answers — directly with the Secret's token,
and through each gateway. Halfway, the token server revokes every token it issued (an IdP restart):
the gateways get a 401, ask the operator for a new token, and answer 200 again.
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

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.redisserver import RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer

TOKEN_SERVER_PORT = 18080  # the examples' tokenUrl
EXAMPLES = ("01-client-credentials", "02-password-grant", "03-redis-target")
SECRETS = ("orders-backend-token", "reports-backend-token")
REDIS_ENDPOINT = "default/inventory-backend"  # example 03
REDIS_PREFIX = "secured-endpoint"


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
    processes: list[subprocess.Popen[bytes]] = []
    with controlplane.ControlPlane() as plane, RedisServer() as redis_server, \
            tempfile.TemporaryDirectory(prefix="sep-demo-") as workdir:
        try:
            _say(f"control plane up at {plane.server} in {plane.startup_seconds:.1f} s; "
                 f"KUBECONFIG={plane.kubeconfig_path}")
            _say(f"redis-server on {redis_server.host}:{redis_server.port}")
            plane.install_crds(root / "crds")
            log_path = Path(workdir) / "operator.log"
            processes.append(_start_operator(plane, log_path, redis_server.url()))
            _say(f"operator running (pid {processes[0].pid}); its log: {log_path}")
            applied = time.monotonic()
            for example in EXAMPLES:
                _say(f"kubectl apply -f examples/{example}/")
                print(plane.kubectl("apply", "-f", str(root / "examples" / example)).stdout, end="", flush=True)
            _wait_for_secret(plane, SECRETS[0], applied)
            gateways = []
            for port in (18081, 18082):
                processes.append(_start_gateway(root, port, token_server, redis_server.url(), Path(workdir)))
                gateways.append(f"http://127.0.0.1:{port}")
            _say(f"example gateway replicas on {', '.join(gateways)} -> {token_server.url}/api "
                 f"(token of {REDIS_ENDPOINT} from Redis)")
            _show(plane, token_server, redis_server.url(), gateways, duration)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(timeout=15)
            token_server.stop()
    _say("done: control plane, operator and token server stopped")
    return 0


def _start_operator(plane: controlplane.ControlPlane, log_path: Path, redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "SEP_STARTUP_SPREAD_SECONDS": "0",
           "SEP_REDIS_URL": redis_url, "SEP_REDIS_KEY_PREFIX": REDIS_PREFIX}
    command = [sys.executable, "-m", "secured_endpoint.cli", "run", "--all-namespaces"]
    return _start(command, env, log_path, "secured-endpoint-operator started", "the operator")


def _start_gateway(root: Path, port: int, token_server: TokenServer, redis_url: str,
                   workdir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(root / "examples" / "04-gateway" / "gateway.py"),
               "--listen", f"127.0.0.1:{port}", "--upstream", f"{token_server.url}/api",
               "--redis-url", redis_url, "--endpoint", REDIS_ENDPOINT, "--prefix", REDIS_PREFIX]
    process = _start(command, dict(os.environ), workdir / f"gateway-{port}.log", None, f"the gateway on {port}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"demo: the gateway on {port} did not answer /healthz")


def _start(command: list[str], env: dict[str, str], log_path: Path, ready_line: str | None,
           what: str) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if ready_line is None:
        return process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ready_line in log_path.read_text(errors="replace"):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not start; its log:\n{log_path.read_text(errors='replace')}")


def _wait_for_secret(plane: controlplane.ControlPlane, name: str, since: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if plane.kubectl("get", "secret", name, check=False).returncode == 0:
            _say(f"Secret {name} appeared {time.monotonic() - since:.2f} s after kubectl apply")
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: Secret {name} did not appear within 30 s")


def _show(plane: controlplane.ControlPlane, token_server: TokenServer, redis_url: str, gateways: list[str],
          duration: float) -> None:
    import redis

    cache = redis.Redis.from_url(redis_url, decode_responses=True)
    started = time.monotonic()
    deadline = started + duration
    revoked = False
    while True:
        if not revoked and time.monotonic() - started >= duration / 2:
            revoked = True
            print(flush=True)
            _say(f"the IdP revokes every token it issued ({token_server.revoke_all()} tokens): "
                 f"watch the gateways recover through the operator's reactive refresh")
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
        key = f"{REDIS_PREFIX}:{REDIS_ENDPOINT.replace('/', ':')}"
        fields: dict[str, str] = cache.hgetall(key)  # type: ignore[assignment]  # decode_responses=True
        _say(f"  Redis {key}: token {fields.get('fingerprint', '-')} expires_at {fields.get('expires_at', '-')}")
        for gateway in gateways:
            answer = httpx.get(f"{gateway}/echo", timeout=10).status_code
            _say(f"  through the gateway {gateway}: backend answers {answer}")
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
