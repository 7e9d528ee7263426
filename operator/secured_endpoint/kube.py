"""The one place that talks to the Kubernetes API (besides kopf's own watches).

An async httpx client built from the same kubeconfig / in-cluster credentials kopf uses. Requests are
bounded (``max_in_flight``), because neither kopf's nor the official client limits them, and a 429 or a
5xx from the apiserver is retried honouring ``Retry-After``. Errors carry the apiserver's status message,
which never contains Secret data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import ssl
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from secured_endpoint import api

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_ATTEMPTS = 5


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass(frozen=True)
class Credentials:
    """Where the apiserver is and how to authenticate, as loaded by the kubernetes package."""

    server: str
    tls: ssl.SSLContext
    token: str | None = None
    configuration: Any = None  # kept when its token rotates (projected service-account tokens, exec plugins)


def load_credentials(*, kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """In-cluster service account (unless a kubeconfig is named), else the kubeconfig. Blocking: run it
    in a thread."""
    from kubernetes import client, config  # the official client only loads configuration here

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            raise config.ConfigException("explicit kubeconfig")
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration)
    tls = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    if configuration.cert_file and configuration.key_file:
        tls.load_cert_chain(configuration.cert_file, configuration.key_file)
    return Credentials(server=configuration.host.rstrip("/"), tls=tls, token=_bearer_of(configuration),
                       configuration=configuration if configuration.refresh_api_key_hook else None)


def _bearer_of(configuration: Any) -> str | None:
    header = (configuration.get_api_key_with_prefix("authorization")
              or configuration.get_api_key_with_prefix("BearerToken"))
    if not header:
        return None
    return str(header).removeprefix("Bearer ").strip()


class _BearerAuth(httpx.Auth):
    """Adds the bearer token. A rotating one (projected service-account token, exec plugin) is re-read at
    most once a minute — the kubernetes package's hook re-reads the whole kubeconfig, far too slow for every
    request — and at once when the apiserver answers 401."""

    REFRESH_SECONDS = 60.0

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._token = credentials.token
        self._refreshed_at = time.monotonic()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if time.monotonic() - self._refreshed_at > self.REFRESH_SECONDS:
            self._refresh()
        self._apply(request)
        response = yield request
        if response.status_code == 401 and self._credentials.configuration is not None:
            self._refresh()
            self._apply(request)
            yield request

    def _refresh(self) -> None:
        configuration = self._credentials.configuration
        self._refreshed_at = time.monotonic()
        if configuration is not None:
            configuration.refresh_api_key_hook(configuration)
            self._token = _bearer_of(configuration)

    def _apply(self, request: httpx.Request) -> None:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"


class KubeClient:
    """Typed, bounded access to the few API calls the operator makes."""

    def __init__(self, credentials: Credentials, *, max_in_flight: int = 20, timeout: float = 30.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=credentials.server, verify=credentials.tls, auth=_BearerAuth(credentials),
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            headers={"User-Agent": "secured-endpoint-operator", "Accept": "application/json"},
        )
        self._slots = asyncio.Semaphore(max_in_flight)

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- generic request with bounded concurrency and retries -----------------------------------

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> JSON:
        headers = {"Content-Type": content_type} if json_body is not None else {}
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            async with self._slots:
                try:
                    response = await self._client.request(method, path, json=json_body, headers=headers,
                                                          params=params)
                except httpx.TransportError as exc:
                    if attempt == _MAX_ATTEMPTS:
                        raise KubeError(0, "Unreachable",
                                        f"Kubernetes API unreachable: {type(exc).__name__}") from None
                    await asyncio.sleep(min(0.2 * 2 ** attempt, 5) * random.uniform(0.5, 1.0))  # noqa: S311
                    continue
            if response.status_code < 400:
                body: JSON = response.json() if response.content else {}
                return body
            if response.status_code in _RETRY_STATUSES and attempt < _MAX_ATTEMPTS:
                await asyncio.sleep(_retry_after(response, attempt))
                continue
            raise _error_of(response)
        raise AssertionError("unreachable")  # the loop always returns or raises

    # -- Secrets and ConfigMaps -----------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> JSON | None:
        return await self._get_or_none(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    async def get_configmap(self, namespace: str, name: str) -> JSON | None:
        return await self._get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    async def create_secret(self, namespace: str, body: JSON) -> JSON:
        return await self.request("POST", f"/api/v1/namespaces/{namespace}/secrets", json_body=body)

    async def patch_secret(self, namespace: str, name: str, patch: JSON) -> JSON:
        return await self.request("PATCH", f"/api/v1/namespaces/{namespace}/secrets/{name}",
                                  json_body=patch, content_type="application/merge-patch+json")

    async def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete; with ``uid`` only that very object (a precondition). False if it was already gone."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            await self.request("DELETE", f"/api/v1/namespaces/{namespace}/secrets/{name}", json_body=body)
        except KubeError as exc:
            if exc.not_found or exc.conflict:
                return False
            raise
        return True

    # -- SecuredEndpoints -------------------------------------------------------------------------

    def endpoint_path(self, namespace: str, name: str) -> str:
        return f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}"

    async def patch_endpoint_status(self, namespace: str, name: str, status: JSON) -> JSON:
        return await self.request("PATCH", self.endpoint_path(namespace, name) + "/status",
                                  json_body={"status": status}, content_type="application/merge-patch+json")

    async def patch_endpoint(self, namespace: str, name: str, patch: JSON) -> JSON:
        return await self.request("PATCH", self.endpoint_path(namespace, name), json_body=patch,
                                  content_type="application/merge-patch+json")

    async def get_endpoint(self, namespace: str, name: str) -> JSON | None:
        return await self._get_or_none(self.endpoint_path(namespace, name))

    # -- Events -----------------------------------------------------------------------------------

    async def post_event(self, *, namespace: str, name: str, uid: str, event_type: str, reason: str,
                         message: str, component: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                               "name": name, "namespace": namespace, "uid": uid},
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "reportingComponent": component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", json_body=body)

    async def _get_or_none(self, path: str) -> JSON | None:
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.not_found:
                return None
            raise


def _retry_after(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("Retry-After", "")
    if header.isdigit():
        return min(float(header), 30.0)
    backoff: float = min(0.2 * 2 ** attempt, 5.0) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter only
    return backoff


def _error_of(response: httpx.Response) -> KubeError:
    try:
        status = response.json()
        return KubeError(response.status_code, str(status.get("reason", "")), str(status.get("message", "")))
    except ValueError:
        return KubeError(response.status_code, response.reason_phrase, "non-JSON error from the apiserver")


def decode_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's ``data`` decoded; a ConfigMap's ``data``/``binaryData`` likewise."""
    decoded = {key: base64.b64decode(value) for key, value in (secret.get("binaryData") or {}).items()}
    if secret.get("kind") == "ConfigMap":
        decoded.update({key: str(value).encode() for key, value in (secret.get("data") or {}).items()})
    else:
        decoded.update({key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()})
    return decoded


def encode_data(values: Mapping[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}

