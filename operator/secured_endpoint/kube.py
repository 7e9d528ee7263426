"""The one place that talks to the Kubernetes API (besides kopf's own watches).

An async aiohttp client built from the same kubeconfig / in-cluster credentials kopf uses (aiohttp is kopf's
own client; httpx, which the token client uses, costs about nine times its CPU per request here:
docs/benchmarks/scale_suite.md, "H"). Requests are bounded (``max_in_flight``), because neither kopf's nor the
official client limits them. Errors carry the apiserver's status message, which never contains Secret data.

Retries (:func:`retryable`): a 429 is always retried, honouring ``Retry-After`` — the server did not act on
the request. A 5xx or a broken connection is retried only for requests that are safe to repeat (GET, PUT,
PATCH, DELETE); a POST is never sent twice once it may have reached the server (a second Event, a false 409 on
a create), only when the connection could not even be opened.

Metadata-only LIST and WATCH (:class:`MetadataWatch`): the apiserver sends ``PartialObjectMetadata``
(name, namespace, labels, annotations, resourceVersion — never ``data``) when asked with the ``as=`` media
type parameter, the way cert-manager caches the Secrets it does not own. The loop is an informer's: a paged
LIST, then a WATCH from its resourceVersion with bookmarks, resumed from the last resourceVersion seen after a
dropped connection, and a fresh LIST when the apiserver no longer has that version (``410 Gone``/``Expired``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from secured_endpoint import api, schedule
from secured_endpoint.tokens import ProxyConfig, TokenError, proxy

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Repeating one of these has the same effect as sending it once (a merge patch sets the same fields again; a
# second DELETE finds nothing, and a precondition keeps it to the object meant). POST creates.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
# Raised before any byte of the request was sent: even a POST can be retried.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# What a lost, refused or silent connection raises (a status is never raised: responses are read as they come).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
_MAX_ATTEMPTS = 5
# The n-th retry waits up to 0.4 * 2^(n-1) s, at most 5 s: an apiserver hiccup is usually over by then.
RETRY_BACKOFF = schedule.Backoff(base_seconds=0.4, cap_seconds=5.0)
# A Retry-After is honoured up to this long: an operator stalled for an hour by one header helps no one.
MAX_RETRY_AFTER_SECONDS = 30.0
_rng = random.Random()  # noqa: S311 - jitter only

METADATA_LIST_MEDIA_TYPE = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_MEDIA_TYPE = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when the server was unreachable);
    ``retry_after``: the seconds the apiserver's last answer asked to wait (its ``Retry-After``), if it did —
    whoever sends that write again must wait as long."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

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
    # the same, as files (what kopf's own API client is given, so both use one loading of the kubeconfig)
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False


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
                       configuration=configuration if configuration.refresh_api_key_hook else None,
                       ca_path=configuration.ssl_ca_cert or None, cert_path=configuration.cert_file or None,
                       key_path=configuration.key_file or None, insecure=not configuration.verify_ssl)


def _bearer_of(configuration: Any) -> str | None:
    header = (configuration.get_api_key_with_prefix("authorization")
              or configuration.get_api_key_with_prefix("BearerToken"))
    if not header:
        return None
    # the in-cluster loader writes "bearer <token>", a kubeconfig "Bearer <token>": the scheme is case-insensitive
    scheme, _, token = str(header).strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else str(header).strip()


class _Bearer:
    """The bearer token. A rotating one (projected service-account token, exec plugin) is re-read at most once
    a minute — the kubernetes package's hook re-reads the whole kubeconfig, far too slow for every request — and
    at once when the apiserver answers 401; in a thread, since the hook reads files or runs a plugin."""

    REFRESH_SECONDS = 60.0

    def __init__(self, credentials: Credentials) -> None:
        self._configuration = credentials.configuration
        self._token = credentials.token
        self._refreshed_at = time.monotonic()
        self._lock = asyncio.Lock()

    async def headers(self) -> dict[str, str]:
        if self._configuration is not None and time.monotonic() - self._refreshed_at > self.REFRESH_SECONDS:
            await self.renew()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def renew(self) -> bool:
        """Read a rotating token again (after a 401); False if it cannot rotate."""
        configuration = self._configuration
        if configuration is None:
            return False
        async with self._lock:
            await asyncio.to_thread(configuration.refresh_api_key_hook, configuration)
            self._token = _bearer_of(configuration)
            self._refreshed_at = time.monotonic()
        return True


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    retry_after: str | None
    content: bytes


class KubeClient:
    """Typed, bounded access to the few API calls the operator makes."""

    def __init__(self, credentials: Credentials, *, max_in_flight: int = 20, timeout: float = 30.0) -> None:
        self._server = credentials.server
        self._tls = credentials.tls
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=10.0)
        self._bearer = _Bearer(credentials)
        self._http: aiohttp.ClientSession | None = None  # made on first use: aiohttp wants a running loop
        self._slots = asyncio.Semaphore(max_in_flight)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # The pool itself is unbounded: the semaphore bounds the requests, and each long-lived watch holds a
            # connection of its own without taking a request's place (one per watched kind and namespace).
            # HTTPS_PROXY / NO_PROXY apply as they do to kubectl, read once: aiohttp's trust_env would read them
            # and ~/.netrc again in a thread for every request.
            via = environment_proxy(self._server)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=0), timeout=self._timeout,
                proxy=via.url if via is not None else None,
                proxy_auth=aiohttp.BasicAuth(via.username, via.password.get_secret_value())
                if via is not None and via.username is not None and via.password is not None else None,
                headers={"User-Agent": "secured-endpoint-operator", "Accept": "application/json"})
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- generic request with bounded concurrency and retries -----------------------------------

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None) -> JSON:
        """One API call, at most ``max_in_flight`` at once, retried as :func:`retryable` allows."""
        method = method.upper()
        sent_headers = dict(headers or {})
        data = None
        if json_body is not None:
            sent_headers["Content-Type"] = content_type
            data = json.dumps(json_body).encode()
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            async with self._slots:
                try:
                    answer: _Answer | None = await self._exchange(method, path, data, sent_headers, params)
                except TRANSPORT_ERRORS as exc:
                    if attempt == _MAX_ATTEMPTS or not retryable(method, transport_error=exc):
                        raise KubeError(0, "Unreachable",
                                        f"Kubernetes API unreachable: {type(exc).__name__}") from None
                    answer = None
            # the wait happens outside the slot: a request that is waiting is not in flight
            if answer is None:
                await asyncio.sleep(schedule.jittered_backoff(RETRY_BACKOFF, failures=attempt, rng=_rng))
                continue
            if answer.status < 400:
                body: JSON = json.loads(answer.content) if answer.content else {}
                return body
            if attempt < _MAX_ATTEMPTS and retryable(method, status=answer.status):
                await asyncio.sleep(retry_delay(answer.retry_after, attempt))
                continue
            raise _error_of(answer.status, answer.reason, answer.content,
                            retry_after=retry_after_seconds(answer.retry_after))
        raise AssertionError("unreachable")  # the loop always returns or raises

    async def _exchange(self, method: str, path: str, data: bytes | None, headers: Mapping[str, str],
                        params: Mapping[str, str] | None) -> _Answer:
        """Send once and read the whole answer; a 401 with a rotating token is sent again with the new one."""
        session = self._session()
        url = self._server + path
        async with session.request(method, url, data=data, params=params,
                                   headers={**headers, **await self._bearer.headers()}) as response:
            content = await response.read()
        if response.status == 401 and await self._bearer.renew():
            async with session.request(method, url, data=data, params=params,
                                       headers={**headers, **await self._bearer.headers()}) as response:
                content = await response.read()
        return _Answer(response.status, response.reason or "", response.headers.get("Retry-After"), content)

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

    async def patch_endpoint_finalizers(self, namespace: str, name: str, finalizers: list[str],
                                        resource_version: str | None) -> JSON:
        """Set the endpoint's whole finalizer list, only if it is still at ``resource_version`` (409 otherwise),
        so a finalizer another controller adds at the same moment is not overwritten. An empty list removes the
        field; ``resource_version`` None or empty patches without the precondition."""
        return await self.patch_endpoint(namespace, name, {"metadata": {
            "finalizers": list(finalizers) or None, "resourceVersion": resource_version or None}})

    async def get_endpoint(self, namespace: str, name: str) -> JSON | None:
        return await self._get_or_none(self.endpoint_path(namespace, name))

    async def list_endpoints(self, *, namespace: str | None = None, limit: int = 500,
                             continue_token: str | None = None) -> JSON:
        """One page of SecuredEndpoints, cluster-wide or in ``namespace`` (``metadata.continue`` names the next;
        a 410 means the token expired)."""
        where = f"/namespaces/{namespace}" if namespace is not None else ""
        params = {"limit": str(limit)}
        if continue_token:
            params["continue"] = continue_token
        return await self.request("GET", f"/apis/{api.GROUP}/{api.VERSION}{where}/{api.PLURAL}", params=params)

    async def endpoint_pages(self, *, namespace: str | None = None,
                             limit: int = 500) -> AsyncGenerator[list[JSON], None]:
        """Every SecuredEndpoint, cluster-wide or in ``namespace``, one page at a time."""
        continue_token: str | None = None
        while True:
            page = await self.list_endpoints(namespace=namespace, limit=limit, continue_token=continue_token)
            yield list(page.get("items") or ())
            continue_token = (page.get("metadata") or {}).get("continue") or None
            if continue_token is None:
                return

    # -- metadata-only LIST and WATCH of core resources ----------------------------------------------

    async def list_metadata(self, resource: str, *, namespace: str | None = None, label_selector: str = "",
                            limit: int = 500, continue_token: str | None = None) -> JSON:
        """One page of a ``PartialObjectMetadataList`` of a core ``resource`` ("secrets", "configmaps"),
        cluster-wide or in ``namespace``. Without ``continue_token`` a consistent (quorum) read; a 410 means
        the token expired and the list must start again."""
        params = {"limit": str(limit)}
        if label_selector:
            params["labelSelector"] = label_selector
        if continue_token:
            params["continue"] = continue_token
        return await self.request("GET", collection_path(resource, namespace), params=params,
                                  headers={"Accept": METADATA_LIST_MEDIA_TYPE})

    async def may_list_everywhere(self, resource: str) -> bool:
        """Does RBAC let the operator list ``resource`` in all namespaces? (One LIST of one item; a 403 says no,
        and any other failure counts as no too.)"""
        try:
            await self.list_metadata(resource, limit=1)
        except KubeError:
            return False
        return True

    async def watch_metadata(self, resource: str, *, namespace: str | None = None, label_selector: str = "",
                             resource_version: str, timeout_seconds: int) -> AsyncGenerator[JSON, None]:
        """The watch events (``{"type", "object"}``, objects as ``PartialObjectMetadata``) after
        ``resource_version``, bookmarks included, until the apiserver ends the watch after
        ``timeout_seconds``. Raises :class:`KubeError` for a refused watch and, with status 0, for a broken
        connection (including no byte for longer than the watch should last), and ``ValueError`` for a line
        that is not a JSON object. Iterate it inside ``contextlib.aclosing`` so that leaving early closes the
        stream.

        It uses the client's connection pool and credentials but none of the ``max_in_flight`` slots: a watch
        waits for news for minutes and would otherwise starve the requests."""
        params = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": resource_version,
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        timeout = aiohttp.ClientTimeout(total=None, connect=10.0,
                                        sock_read=timeout_seconds + WATCH_READ_SLACK_SECONDS)
        headers = {"Accept": METADATA_MEDIA_TYPE, **await self._bearer.headers()}
        try:
            async with self._session().get(self._server + collection_path(resource, namespace), params=params,
                                           headers=headers, timeout=timeout) as response:
                if response.status != 200:
                    if response.status == 401:
                        await self._bearer.renew()  # the next round goes with the new token
                    raise _error_of(response.status, response.reason or "", await response.read())
                # one event per line; split here, since a line (an object's annotations) may outgrow aiohttp's
                # readline limit
                pending = b""
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _watch_event(line)
                if pending.strip():
                    yield _watch_event(pending)
        except TRANSPORT_ERRORS as exc:
            raise KubeError(0, "Unreachable", f"watch connection lost: {type(exc).__name__}") from None

    async def serves(self, group: str, version: str, plural: str) -> bool:
        """Does the apiserver's discovery list ``plural`` in ``group/version`` now? (Right after an apiserver
        starts it answers before the custom resources' groups are registered.)"""
        try:
            listing = await self.request("GET", f"/apis/{group}/{version}")
        except KubeError as exc:
            if not exc.not_found:  # 404: the group is not (yet) served; anything else is worth saying
                logger.warning("Asking the apiserver for %s/%s failed: %s", group, version, exc)
            return False
        return any(resource.get("name") == plural for resource in listing.get("resources") or ())

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

    # -- Leases (leader election) -------------------------------------------------------------------

    def lease_path(self, namespace: str, name: str | None = None) -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{path}/{name}" if name else path

    async def get_lease(self, namespace: str, name: str) -> JSON | None:
        """The ``coordination.k8s.io/v1`` Lease, or None if there is none."""
        return await self._get_or_none(self.lease_path(namespace, name))

    async def create_lease(self, namespace: str, body: JSON) -> JSON:
        """Create a Lease; 409 if it exists already (a rival was first). A POST, so never sent twice once it may
        have reached the server: after an unclear failure, read the Lease to learn who holds it."""
        return await self.request("POST", self.lease_path(namespace), json_body=body)

    async def replace_lease(self, namespace: str, name: str, body: JSON) -> JSON:
        """Replace the whole Lease (PUT), only if it is still at ``body``'s ``metadata.resourceVersion``: 409 if
        anyone wrote it since. Refused without a resourceVersion, which would overwrite blindly."""
        if not (body.get("metadata") or {}).get("resourceVersion"):
            raise ValueError("replace_lease needs metadata.resourceVersion as its precondition")
        return await self.request("PUT", self.lease_path(namespace, name), json_body=body)


def retryable(method: str, *, status: int | None = None, transport_error: Exception | None = None) -> bool:
    """Whether a request that got ``status`` (or failed with ``transport_error``) may be sent again.

    429: always — the server refused before acting. 5xx or a connection lost mid-request: only an idempotent
    method, since the server may have acted. A connection that could not be opened: always — nothing was sent.
    """
    if transport_error is not None:
        return method.upper() in IDEMPOTENT_METHODS or isinstance(transport_error, _NOT_SENT)
    if status == 429:
        return True
    return status in _RETRY_STATUSES and method.upper() in IDEMPOTENT_METHODS


def retry_after_seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` header's seconds, up to ``MAX_RETRY_AFTER_SECONDS``; None without one (or a date)."""
    seconds = schedule.parse_retry_after(retry_after)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER_SECONDS)


def retry_delay(retry_after: str | None, attempt: int, *, rng: random.Random = _rng) -> float:
    """Seconds before retry ``attempt`` (1 = the first): the server's ``Retry-After`` up to
    ``MAX_RETRY_AFTER_SECONDS``, else the jittered :data:`RETRY_BACKOFF`."""
    seconds = retry_after_seconds(retry_after)
    if seconds is not None:
        return seconds
    return schedule.jittered_backoff(RETRY_BACKOFF, failures=attempt, rng=rng)


def environment_proxy(server: str) -> ProxyConfig | None:
    """The proxy the environment names for ``server``, by the rules the token requests follow
    (docs/contract.md §6: lower case wins, ``ALL_PROXY``, ``NO_PROXY`` with suffixes, IPs and CIDR ranges)."""
    try:
        return proxy.environment_proxy(server, proxy.environment_snapshot())
    except TokenError as exc:
        raise KubeError(0, "BadProxy", f"the proxy for the Kubernetes API: {exc}") from None


def collection_path(resource: str, namespace: str | None = None) -> str:
    """The URL path of a core (``/api/v1``) collection, cluster-wide or in one namespace."""
    return f"/api/v1/namespaces/{namespace}/{resource}" if namespace else f"/api/v1/{resource}"


def _error_of(status: int, reason: str, content: bytes, *, retry_after: float | None = None) -> KubeError:
    try:
        body = json.loads(content)
        return KubeError(status, str(body.get("reason", "")), str(body.get("message", "")), retry_after=retry_after)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not a Status object
        return KubeError(status, reason, "non-JSON error from the apiserver", retry_after=retry_after)


def _watch_event(line: bytes) -> JSON:
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError("a watch event that is not a JSON object")
    return event


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



# ----------------------------------------------------------------------------------------------------
# Metadata-only LIST + WATCH, the informer loop
# ----------------------------------------------------------------------------------------------------

# Reconnect after a failed LIST or WATCH: half a second at first, then doubling up to half a minute.
WATCH_BACKOFF = schedule.Backoff(base_seconds=0.5, cap_seconds=30.0)
# The apiserver ends a watch after timeoutSeconds; each watch asks for this long times a random factor in
# [1, 1.5), so that many watches opened together do not all reconnect together.
WATCH_TIMEOUT_SECONDS = 300.0
# The read timeout of a watch is its timeoutSeconds plus this: silence longer than the server's own deadline
# means a dead connection, not a quiet cluster (the apiserver sends a bookmark at least once a minute).
WATCH_READ_SLACK_SECONDS = 30.0
LIST_PAGE_SIZE = 500


class MetadataSink(Protocol):
    """What a :class:`MetadataWatch` reports to. Objects are ``PartialObjectMetadata`` dicts; the calls are
    synchronous and must not block. A LIST is ``list_started``, ``list_page`` per page, then ``list_done``; a
    LIST that fails midway (an expired continue token) is followed by a new ``list_started``."""

    def list_started(self) -> None: ...

    def list_page(self, items: list[JSON]) -> None: ...

    def list_done(self, resource_version: str) -> None:
        """The LIST is complete: what the pages held is the whole collection at ``resource_version``."""
        ...

    def watch_event(self, event_type: str, obj: JSON) -> None:
        """``ADDED``, ``MODIFIED`` or ``DELETED`` after the last ``list_done`` (bookmarks are not reported)."""
        ...

    def failed(self, error: KubeError) -> None:
        """A LIST or WATCH failed (status 0: unreachable or a broken stream); a retry follows after backoff."""
        ...


class _Relist(Exception):
    """The apiserver no longer has the watch's resourceVersion: only a fresh LIST can go on."""


class MetadataWatch:
    """LIST + WATCH of one core resource's metadata, cluster-wide or in one namespace, forever.

    - The LIST is paged (``page_size``) and consistent (no resourceVersion: a quorum read); a 410 on a continue
      token (the apiserver compacted past the list's snapshot) starts the LIST again.
    - The WATCH starts at the LIST's resourceVersion with ``allowWatchBookmarks``; every event and bookmark moves
      :attr:`resource_version` on, and a dropped connection or an ended watch resumes from there.
    - ``410 Gone``/``Expired`` from the watch (an HTTP status or an ``ERROR`` event), or "resourceVersion too
      large" (etcd restored from a backup), leads to a fresh LIST; the sink tells what changed meanwhile.
    - Every other failure (unreachable, 5xx, 403, a broken stream) is reported to the sink and retried after a
      jittered backoff capped at ``backoff.cap_seconds``; it never ends the loop. :meth:`run` only ends by
      cancellation, which closes the stream.
    """

    def __init__(self, client: KubeClient, resource: str, sink: MetadataSink, *, namespace: str | None = None,
                 label_selector: str = "", page_size: int = LIST_PAGE_SIZE,
                 timeout_seconds: float = WATCH_TIMEOUT_SECONDS, backoff: schedule.Backoff = WATCH_BACKOFF,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.sink = sink
        self.page_size = page_size
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self._rng = rng or random.Random()  # noqa: S311 - jitter only
        self.resource_version: str | None = None  # None: the next round starts with a LIST
        self.lists = 0  # completed LISTs: the first, then one per relist
        self.bookmarks = 0
        self.failures = 0  # consecutive failed rounds (0 while healthy)

    def __str__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        selected = f" labelled {self.label_selector}" if self.label_selector else ""
        return f"{self.resource}{selected} in {where}"

    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    self.failures = 0
                if await self._watch():
                    self.failures = 0
                    continue
                error = KubeError(0, "WatchEnded", "the watch ended at once without a single event")
            except _Relist as relist:
                logger.info("Listing %s again: %s", self, relist)
                self.resource_version = None
                continue
            except KubeError as exc:
                error = exc
                if exc.status == 410:  # a continue token expired while paging: start the LIST over
                    self.resource_version = None
            except ValueError:
                error = KubeError(0, "BadResponse", "the apiserver sent a line that is not a JSON object")
            self.failures += 1
            self.sink.failed(error)
            delay = schedule.jittered_backoff(self.backoff, failures=self.failures, rng=self._rng)
            # the first failure and every tenth after it: a lasting one (403) stays visible, not a flood
            level = logging.WARNING if self.failures % 10 == 1 else logging.DEBUG
            logger.log(level, "Watching %s failed (%s; %d in a row); retrying in %.1f s.", self, error,
                       self.failures, delay)
            await asyncio.sleep(delay)

    async def _list(self) -> None:
        self.sink.list_started()
        token: str | None = None
        while True:
            page = await self.client.list_metadata(self.resource, namespace=self.namespace,
                                                   label_selector=self.label_selector, limit=self.page_size,
                                                   continue_token=token)
            if page.get("kind") != "PartialObjectMetadataList":
                # never keep full objects: a proxy that dropped the media type parameters would send data
                raise KubeError(0, "BadResponse", f"expected a PartialObjectMetadataList, got {page.get('kind')!r}")
            self.sink.list_page(list(page.get("items") or ()))
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                resource_version = str(meta.get("resourceVersion") or "")
                if not resource_version:
                    raise KubeError(0, "BadResponse", "a LIST without a resourceVersion")
                self.sink.list_done(resource_version)
                self.resource_version = resource_version
                self.lists += 1
                return

    async def _watch(self) -> bool:
        """One watch request. True if it was healthy (it delivered something or lasted a good while)."""
        assert self.resource_version is not None
        timeout = int(self.timeout_seconds * self._rng.uniform(1.0, 1.5))
        loop = asyncio.get_running_loop()
        started, delivered = loop.time(), False
        try:
            stream = self.client.watch_metadata(self.resource, namespace=self.namespace,
                                                label_selector=self.label_selector,
                                                resource_version=self.resource_version, timeout_seconds=timeout)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    delivered = True
                    self._handle(event)
        except KubeError as exc:
            if exc.status == 410:
                raise _Relist(exc.message or "410 Gone") from None
            raise
        return delivered or loop.time() - started >= timeout / 2

    def _handle(self, event: JSON) -> None:
        event_type = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError("a watch event without an object")
        if event_type == "ERROR":
            if needs_relist(obj):
                raise _Relist(str(obj.get("message") or obj.get("reason") or "410 Gone"))
            raise KubeError(int(obj.get("code") or 0), str(obj.get("reason") or "Error"),
                            str(obj.get("message") or "an ERROR event"))
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            self.sink.watch_event(event_type, obj)
        elif event_type == "BOOKMARK":
            self.bookmarks += 1
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)


def needs_relist(status: Mapping[str, Any]) -> bool:
    """Whether a watch ``ERROR`` event's Status says the resourceVersion cannot be served any more: 410
    Gone/Expired (compacted away, or older than the apiserver's watch cache after its restart), or too large
    (the apiserver's storage was restored to an older state)."""
    if status.get("code") == 410 or status.get("reason") in ("Gone", "Expired"):
        return True
    causes = (status.get("details") or {}).get("causes") or ()
    return any(isinstance(cause, Mapping) and cause.get("reason") == "ResourceVersionTooLarge" for cause in causes)
