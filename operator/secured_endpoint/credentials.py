"""Read what a token request needs from the endpoint's own namespace: client id/secret, username/password,
parameter values, the assertion signing key, the client certificate, the trust store and the proxy
credentials, and say which Secret/ConfigMap versions they came from.

Values are taken as stored except for one trailing newline, which ``echo secret > file; kubectl create
secret --from-file`` adds and no token server expects. Key material is parsed and checked here (a key
that cannot sign, a certificate that does not match its key or has expired: ``ClientKeyInvalid``; a trust
store with a wrong password or without a valid certificate: ``TrustStoreInvalid``), and every trust store
format becomes the PEM bundle the token client takes. Errors name the object, the key and the spec field,
never a value.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from secured_endpoint import api, kube
from secured_endpoint.tokens import (
    ClientAssertion,
    ClientCertificate,
    ClientKeyInvalidError,
    ProxyConfig,
    TokenRequest,
    TrustStoreInvalidError,
    to_pem_bundle,
)

TLS_CERT_KEY = "tls.crt"  # the keys of a kubernetes.io/tls Secret
TLS_KEY_KEY = "tls.key"


class CredentialsError(Exception):
    """A referenced Secret, ConfigMap or key is missing or unusable (``Ready=False``)."""

    def __init__(self, reason: api.Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class LoadedCredentials:
    request: TokenRequest
    source_versions: dict[str, str]  # "Secret/name" -> resourceVersion, as recorded in the status


# The watches' resourceVersion of a referenced object now (None: unknown, e.g. not labelled for the selector).
CurrentVersion = Callable[[str, api.SourceRef], str | None]


class SourceReader:
    """Reads the referenced Secrets and ConfigMaps, and serves a read of an object the metadata watch says is
    unchanged from the copy read last time: a refresh then costs no GET, and a Secret shared by a thousand
    endpoints is read once per change, not a thousand times. Only what the token request needs is kept (kind,
    data, resourceVersion), at most ``capacity`` objects, least recently used out first."""

    def __init__(self, client: kube.KubeClient, current_version: CurrentVersion, *, capacity: int = 16384) -> None:
        self._client = client
        self._current_version = current_version
        self._capacity = capacity
        self._copies: OrderedDict[tuple[str, api.SourceRef], dict[str, Any]] = OrderedDict()
        # GETs on their way, with the version the watches knew when each began: a read that wants the same
        # version waits for that answer (a rotated Secret shared by many endpoints is read once, not once per job)
        self._reading: dict[tuple[str, api.SourceRef], tuple[str | None, asyncio.Future[dict[str, Any] | None]]] = {}
        self.reads = 0  # GETs sent (the rest came from the copies)

    async def read(self, namespace: str, ref: api.SourceRef) -> dict[str, Any] | None:
        key = (namespace, ref)
        copy = self._copies.get(key)
        current = self._current_version(namespace, ref)
        if copy is not None and current is not None and copy["metadata"]["resourceVersion"] == current:
            self._copies.move_to_end(key)
            return copy
        reading = self._reading.get(key)
        if reading is None or current is None or reading[0] != current:
            reading = (current, asyncio.ensure_future(self._get(namespace, ref)))
            self._reading[key] = reading
            reading[1].add_done_callback(functools.partial(self._read_done, key))
        # shielded: one waiter cancelled (its endpoint deleted) does not cancel the read the others wait for
        return await asyncio.shield(reading[1])

    def _read_done(self, key: tuple[str, api.SourceRef], task: asyncio.Future[dict[str, Any] | None]) -> None:
        if (entry := self._reading.get(key)) is not None and entry[1] is task:
            del self._reading[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters that are left got it; none left is no error to report

    async def _get(self, namespace: str, ref: api.SourceRef) -> dict[str, Any] | None:
        key = (namespace, ref)
        self.reads += 1
        obj = await _fetch(self._client, namespace, ref)
        if obj is None:
            self._copies.pop(key, None)
            return None
        self._copies[key] = {"kind": obj.get("kind") or ref.kind, "data": obj.get("data"),
                             "binaryData": obj.get("binaryData"),
                             "metadata": {"resourceVersion": str(obj["metadata"]["resourceVersion"])}}
        self._copies.move_to_end(key)
        while len(self._copies) > self._capacity:
            self._copies.popitem(last=False)
        return self._copies[key]

    def forget(self, namespace: str, ref: api.SourceRef) -> None:
        """The object is gone: drop its copy at once rather than when it ages out."""
        self._copies.pop((namespace, ref), None)


async def load(reader: SourceReader, namespace: str, spec: api.SecuredEndpointSpec,
               *, refresh_token: SecretStr | None = None) -> LoadedCredentials:
    """Read every referenced object once (concurrently) and assemble the token request."""
    refs = sorted(spec.referenced_sources())
    fetched = await asyncio.gather(*(reader.read(namespace, ref) for ref in refs))
    objects = dict(zip(refs, fetched, strict=True))
    missing = [str(ref) for ref, obj in objects.items() if obj is None]
    if missing:
        raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                               f"{', '.join(missing)} not found in namespace {namespace}")
    data = {ref: kube.decode_data(obj) for ref, obj in objects.items() if obj is not None}
    versions = {str(ref): str(obj["metadata"]["resourceVersion"]) for ref, obj in objects.items()
                if obj is not None}

    def raw_value(kind: str, name: str, key: str, field: str) -> bytes:
        raw = data[api.SourceRef(kind, name)].get(key)
        if raw is None:
            raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                                   f"{kind}/{name} has no key {key!r} (spec.{field})")
        return raw

    def value(kind: str, name: str, key: str, field: str) -> str:
        raw = raw_value(kind, name, key, field)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                                   f"{kind}/{name} key {key!r} is not UTF-8 text (spec.{field})") from None
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                                   f"{kind}/{name} key {key!r} is empty (spec.{field})")
        return text

    client_ref = spec.client_secret_ref
    client_id = value("Secret", client_ref.name, client_ref.client_id_key, "clientSecretRef.clientIdKey")
    client_secret = None
    if spec.client_auth_method.uses_client_secret:
        client_secret = SecretStr(value("Secret", client_ref.name, client_ref.client_secret_key,
                                        "clientSecretRef.clientSecretKey"))
    username = password = None
    if spec.password_secret_ref is not None:
        user_ref = spec.password_secret_ref
        username = value("Secret", user_ref.name, user_ref.username_key, "passwordSecretRef.usernameKey")
        password = SecretStr(value("Secret", user_ref.name, user_ref.password_key,
                                   "passwordSecretRef.passwordKey"))
    parameters: list[tuple[str, SecretStr]] = []
    for index, parameter in enumerate(spec.parameters):
        if parameter.value_from is not None:
            selector = parameter.value_from.secret_key_ref
            parameters.append((parameter.name, SecretStr(value(
                "Secret", selector.name, selector.key, f"parameters[{index}].valueFrom.secretKeyRef"))))
        else:
            parameters.append((parameter.name, SecretStr(parameter.value or "")))
    client_assertion = None
    if spec.client_auth_method is api.ClientAuthMethod.CLIENT_SECRET_JWT:
        assert client_secret is not None
        settings = spec.client_assertion or api.ClientAssertion()
        try:
            client_assertion = ClientAssertion.from_client_secret(
                client_secret, algorithm=settings.algorithm, key_id=settings.key_id,
                lifetime_seconds=settings.lifetime_seconds, audience=settings.audience)
        except ClientKeyInvalidError as exc:
            raise CredentialsError(
                exc.reason, f"Secret/{client_ref.name} key {client_ref.client_secret_key!r}: {exc.message} "
                            "(spec.clientAuthMethod: ClientSecretJWT)") from None
    elif spec.client_auth_method is api.ClientAuthMethod.PRIVATE_KEY_JWT:
        signing = spec.client_assertion
        assert signing is not None  # the model checks both
        assert signing.private_key_secret_ref is not None
        key_ref = signing.private_key_secret_ref
        field = "clientAssertion.privateKeySecretRef"
        pem = raw_value("Secret", key_ref.name, key_ref.key, f"{field}.key")
        try:
            client_assertion = ClientAssertion.from_private_key_pem(
                pem, algorithm=signing.algorithm, key_id=signing.key_id,
                lifetime_seconds=signing.lifetime_seconds, audience=signing.audience)
        except ClientKeyInvalidError as exc:
            raise CredentialsError(
                exc.reason, f"Secret/{key_ref.name} key {key_ref.key!r}: {exc.message} (spec.{field})") from None

    client_certificate = None
    if spec.client_certificate_secret_ref is not None:
        name, field = spec.client_certificate_secret_ref.name, "clientCertificateSecretRef"
        certificate_pem = raw_value("Secret", name, TLS_CERT_KEY, field)
        key_pem = raw_value("Secret", name, TLS_KEY_KEY, field)
        try:
            client_certificate = ClientCertificate.load(certificate_pem, key_pem)
        except ClientKeyInvalidError as exc:
            raise CredentialsError(exc.reason, f"Secret/{name}: {exc.message} (spec.{field})") from None

    trust_store_pem = None
    if spec.trust_store is not None:
        trust_store_pem = _trust_store(spec.trust_store, raw_value, value)

    proxy = None
    if spec.proxy is not None:
        proxy_username = proxy_password = None
        if spec.proxy.credentials_secret_ref is not None:
            proxy_ref = spec.proxy.credentials_secret_ref
            field = "proxy.credentialsSecretRef"
            proxy_username = value("Secret", proxy_ref.name, proxy_ref.username_key, f"{field}.usernameKey")
            proxy_password = SecretStr(value("Secret", proxy_ref.name, proxy_ref.password_key,
                                             f"{field}.passwordKey"))
        proxy = ProxyConfig(url=spec.proxy.url.rstrip("/"), username=proxy_username, password=proxy_password,
                            source="spec.proxy.url")

    request = TokenRequest(
        token_url=spec.token_url, grant_type=spec.grant_type, client_auth_method=spec.client_auth_method,
        client_id=client_id, client_secret=client_secret, username=username, password=password,
        scopes=tuple(spec.scopes), audience=spec.audience, parameters=tuple(parameters),
        trust_store_pem=trust_store_pem, refresh_token=refresh_token, client_assertion=client_assertion,
        client_certificate=client_certificate, proxy=proxy,
    )
    return LoadedCredentials(request=request, source_versions=versions)


def _trust_store(trust_store: api.TrustStore, raw_value: Callable[[str, str, str, str], bytes],
                 value: Callable[[str, str, str, str], str]) -> bytes:
    """The store as a PEM bundle of the certificates valid now, whatever its format."""
    if trust_store.config_map_ref is not None:
        kind, selector, field = "ConfigMap", trust_store.config_map_ref, "trustStore.configMapRef"
    else:
        assert trust_store.secret_ref is not None  # the model guarantees exactly one
        kind, selector, field = "Secret", trust_store.secret_ref, "trustStore.secretRef"
    content = raw_value(kind, selector.name, selector.key, f"{field}.key")
    password = None
    if trust_store.password_key is not None:
        password = SecretStr(value(kind, selector.name, trust_store.password_key, "trustStore.passwordKey"))
    try:
        return to_pem_bundle(content, format=trust_store.format, password=password)
    except TrustStoreInvalidError as exc:
        raise CredentialsError(exc.reason, f"{kind}/{selector.name} key {selector.key!r}: {exc.message}"
                                           f"{'' if 'spec.' in exc.message else f' (spec.{field})'}") from None


class CredentialsUnreadableError(CredentialsError):
    """The Kubernetes API failed or refused while a referenced object was read: it may well exist."""

    def __init__(self, message: str) -> None:
        super().__init__(api.Reason.CREDENTIALS_UNREADABLE, message)


async def _fetch(client: kube.KubeClient, namespace: str, ref: api.SourceRef) -> dict[str, Any] | None:
    try:
        if ref.kind == "ConfigMap":
            return await client.get_configmap(namespace, ref.name)
        return await client.get_secret(namespace, ref.name)
    except kube.KubeError as exc:
        raise CredentialsUnreadableError(unreadable_message(namespace, ref, exc)) from None


def unreadable_message(namespace: str, ref: api.SourceRef, error: kube.KubeError) -> str:
    """Why ``ref`` could not be read, in words that point at the cause: the apiserver or the operator's RBAC."""
    resource = "configmaps" if ref.kind == "ConfigMap" else "secrets"
    if error.status == 403:
        return (f"{ref} cannot be read: the operator is not allowed to get {resource} in namespace {namespace} "
                f"(its RBAC needs get on {resource} there): {error.message}")
    if error.status == 401:
        return f"{ref} cannot be read: the apiserver refused the operator's credentials (401)"
    if error.status == 0:
        return f"{ref} cannot be read: the Kubernetes API is unreachable ({error.message})"
    return f"{ref} cannot be read: the Kubernetes API answered {error.status} {error.reason}".rstrip()
