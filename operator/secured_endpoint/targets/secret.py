"""The token Secret that gateway Deployments mount (docs/contract.md §2).

Owned by its SecuredEndpoint (ownerReference + managed-by label). A Secret of the same name that the
endpoint does not own is never overwritten. Ownership seen once is remembered by uid, so a steady-state
refresh is a single PATCH; the uid is sent as a precondition, so a Secret re-created by someone else in
between is refused by the apiserver instead of overwritten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from secured_endpoint import api, kube
from secured_endpoint.targets.base import IssuedToken, Owner, TargetError
from secured_endpoint_gateway import wire

KEYS = wire.SECRET_KEYS


# What the operator's watch of Secrets reports for a token Secret: the fingerprint it holds (None: not there).
HeldFingerprint = Callable[[str, str], str | None]


class SecretTarget:
    """The token Secret; its location is the Secret's name (``status.targets.secret.name``)."""

    kind = "secret"
    location_field = "name"
    expires_by_itself = False

    def __init__(self, client: kube.KubeClient, *, labels: Mapping[str, str] | None = None,
                 held: HeldFingerprint | None = None) -> None:
        self._client = client
        self.labels: Mapping[str, str] = dict(labels or {})  # operator-wide: SEP_SOURCE_LABEL_SELECTOR's
        self._held = held
        self._owned_uids: dict[tuple[str, str], str] = {}  # (namespace, secret name) -> Secret uid

    def location(self, owner: Owner, spec: api.SecuredEndpointSpec) -> str | None:
        return spec.secret_target_name(owner.name)

    def lost(self, namespace: str, location: str, fingerprint: str) -> bool:
        return self._held is not None and self._held(namespace, location) != fingerprint

    async def write(self, owner: Owner, spec: api.SecuredEndpointSpec, location: str, token: IssuedToken) -> None:
        name = location
        where = f"Secret/{name}"
        wanted = spec.secret_target(owner.name) or api.SecretTargetSpec()
        body = _secret_body(owner, name, token, labels={**wanted.labels, **self.labels},
                            annotations=wanted.annotations)
        cache_key = (owner.namespace, name)
        try:
            known_uid = self._owned_uids.get(cache_key)
            if known_uid is not None:
                try:
                    body["metadata"]["uid"] = known_uid
                    await self._client.patch_secret(owner.namespace, name, body)
                    return
                except kube.KubeError as exc:
                    if exc.status not in (404, 409, 422):
                        raise
                    self._owned_uids.pop(cache_key, None)
                    body["metadata"].pop("uid", None)
            if self._held is not None and self._held(owner.namespace, name) is None:
                # the watches know no token Secret of this name (a new endpoint): create it without asking
                # first; one that exists after all answers 409, and is then read as below
                try:
                    created = await self._client.create_secret(owner.namespace, body)
                except kube.KubeError as exc:
                    if not exc.conflict:
                        raise
                else:
                    self._owned_uids[cache_key] = created["metadata"]["uid"]
                    return
            existing = await self._client.get_secret(owner.namespace, name)
            if existing is None:
                try:
                    created = await self._client.create_secret(owner.namespace, body)
                except kube.KubeError as exc:
                    if not exc.conflict:
                        raise
                    raise TargetError(where, "was created by someone else meanwhile; retrying") from None
                self._owned_uids[cache_key] = created["metadata"]["uid"]
                return
            if not owned_by(existing, owner):
                raise TargetError(where, "exists and is not managed by this SecuredEndpoint; "
                                         "the operator does not overwrite it (delete it or choose "
                                         "spec.target.secret.name)")
            body["metadata"]["uid"] = existing["metadata"]["uid"]
            await self._client.patch_secret(owner.namespace, name, body)
            self._owned_uids[cache_key] = existing["metadata"]["uid"]
        except kube.KubeError as exc:
            raise TargetError(where, f"cannot be written: {exc}", retry_after=exc.retry_after) from None

    async def read(self, owner: Owner, name: str) -> IssuedToken | None:
        """The token an owned Secret holds, or None (missing, foreign, or not a token Secret)."""
        existing = await self._client.get_secret(owner.namespace, name)
        if existing is None or not owned_by(existing, owner):
            return None
        self._owned_uids[(owner.namespace, name)] = existing["metadata"]["uid"]
        try:
            data = {key: value.decode() for key, value in kube.decode_data(existing).items()}
            expires_at = wire.parse_expires_at(data["expires_at"])
            return IssuedToken(
                access_token=SecretStr(data["access_token"]), token_type=data["token_type"], scope=None,
                issued_at=datetime.fromisoformat(existing["metadata"]["creationTimestamp"].replace("Z", "+00:00")),
                expires_at=expires_at, fingerprint=data["fingerprint"],
            )
        except (KeyError, ValueError):
            return None

    async def delete(self, owner: Owner, name: str) -> None:
        """Remove the Secret if, and only if, this endpoint owns it."""
        self._owned_uids.pop((owner.namespace, name), None)
        try:
            existing = await self._client.get_secret(owner.namespace, name)
            if existing is not None and owned_by(existing, owner):
                await self._client.delete_secret(owner.namespace, name, uid=existing["metadata"]["uid"])
        except kube.KubeError as exc:
            raise TargetError(f"Secret/{name}", f"cannot be deleted: {exc}", retry_after=exc.retry_after) from None

    def forget(self, namespace: str, name: str) -> None:
        """Someone deleted the Secret: the remembered uid is void."""
        self._owned_uids.pop((namespace, name), None)


def owned_by(secret: Mapping[str, Any], owner: Owner) -> bool:
    references = secret.get("metadata", {}).get("ownerReferences") or ()
    return any(ref.get("uid") == owner.uid for ref in references)


def _secret_body(owner: Owner, name: str, token: IssuedToken, *, labels: Mapping[str, str],
                 annotations: Mapping[str, str]) -> dict[str, Any]:
    values = {
        "access_token": token.access_token.get_secret_value(),
        "token_type": token.token_type,
        "expires_at": wire.format_expires_at(token.expires_at),
        "authorization": token.authorization,
        "credential": token.authorization,
        "fingerprint": token.fingerprint,
    }
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": name, "namespace": owner.namespace,
            "labels": {**labels, api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE},
            # an annotation, not a label: endpoint names may be longer than a label value allows
            # the fingerprint also as an annotation: a metadata-only watch sees whose token the Secret holds
            "annotations": {**annotations, api.ENDPOINT_ANNOTATION: owner.name,
                            api.TOKEN_FINGERPRINT_ANNOTATION: token.fingerprint},
            "ownerReferences": [{
                "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": owner.name,
                "uid": owner.uid, "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "data": kube.encode_data(values),
    }
