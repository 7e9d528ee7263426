"""Read what a token request needs from the endpoint's own namespace: client id/secret, username/password,
parameter values and the trust store, and say which Secret/ConfigMap versions they came from.

Values are taken as stored except for one trailing newline, which ``echo secret > file; kubectl create
secret --from-file`` adds and no token server expects. Errors name the object and key, never a value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from secured_endpoint import api, kube
from secured_endpoint.tokens import TokenRequest


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


async def load(client: kube.KubeClient, namespace: str, spec: api.SecuredEndpointSpec,
               *, refresh_token: SecretStr | None = None) -> LoadedCredentials:
    """Fetch every referenced object once (concurrently) and assemble the token request."""
    refs = sorted(spec.referenced_sources())
    fetched = await asyncio.gather(*(_fetch(client, namespace, ref) for ref in refs))
    objects = dict(zip(refs, fetched, strict=True))
    missing = [str(ref) for ref, obj in objects.items() if obj is None]
    if missing:
        raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                               f"{', '.join(missing)} not found in namespace {namespace}")
    data = {ref: kube.decode_data(obj) for ref, obj in objects.items() if obj is not None}
    versions = {str(ref): str(obj["metadata"]["resourceVersion"]) for ref, obj in objects.items()
                if obj is not None}

    def value(kind: str, name: str, key: str, field: str) -> str:
        raw = data[api.SourceRef(kind, name)].get(key)
        if raw is None:
            raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                                   f"{kind}/{name} has no key {key!r} (spec.{field})")
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
    client_secret = value("Secret", client_ref.name, client_ref.client_secret_key,
                          "clientSecretRef.clientSecretKey")
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
    trust_store_pem = None
    if spec.trust_store is not None:
        trust_store_pem = _trust_store(spec.trust_store, data)

    request = TokenRequest(
        token_url=spec.token_url, grant_type=spec.grant_type, client_auth_method=spec.client_auth_method,
        client_id=client_id, client_secret=SecretStr(client_secret), username=username, password=password,
        scopes=tuple(spec.scopes), audience=spec.audience, parameters=tuple(parameters),
        trust_store_pem=trust_store_pem, refresh_token=refresh_token,
    )
    return LoadedCredentials(request=request, source_versions=versions)


def _trust_store(trust_store: api.TrustStore, data: Mapping[api.SourceRef, dict[str, bytes]]) -> bytes:
    if trust_store.config_map_ref is not None:
        ref, selector, field = "ConfigMap", trust_store.config_map_ref, "trustStore.configMapRef"
    else:
        assert trust_store.secret_ref is not None  # the model guarantees exactly one
        ref, selector, field = "Secret", trust_store.secret_ref, "trustStore.secretRef"
    pem = data[api.SourceRef(ref, selector.name)].get(selector.key)
    if pem is None:
        raise CredentialsError(api.Reason.CREDENTIALS_NOT_FOUND,
                               f"{ref}/{selector.name} has no key {selector.key!r} (spec.{field}.key)")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CredentialsError(api.Reason.TRUST_STORE_INVALID,
                               f"{ref}/{selector.name} key {selector.key!r} holds no PEM certificate "
                               f"(spec.{field})")
    return pem


async def _fetch(client: kube.KubeClient, namespace: str, ref: api.SourceRef) -> dict[str, Any] | None:
    if ref.kind == "ConfigMap":
        return await client.get_configmap(namespace, ref.name)
    return await client.get_secret(namespace, ref.name)
