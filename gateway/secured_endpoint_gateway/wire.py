"""The wire format the operator and the gateways share: the one place it is written down in code.

The operator writes with these names and the gateways read with them, so neither side can drift from the other
(docs/contract.md §2 the token Secret, §3 the Redis layout, §4 refresh requests). Standard library only: the operator
imports this module without pulling in anything a gateway needs.

Redis, with ``<prefix>`` = ``SEP_REDIS_KEY_PREFIX`` (default :data:`DEFAULT_PREFIX`):

- ``<prefix>:<namespace>:<name>`` (:func:`token_key`): a hash with the fields :data:`REDIS_FIELDS`;
  ``expires_at`` is unix seconds there.
- ``<prefix>:<namespace>:<name>:previous`` (:func:`previous_key`): the token it replaced.
- ``<prefix>:_alive`` (:func:`alive_key`): the operator's marker that Redis still holds its data.
- channel ``<prefix>:updated`` (:func:`updated_channel`): ``<namespace>/<name>`` (:func:`endpoint_id`) after
  every write and delete.
- channel ``<prefix>:refresh`` (:func:`refresh_channel`): ``<namespace>/<name> <fingerprint>``
  (:func:`refresh_request`, :func:`parse_refresh_request`), published by a gateway after a 401.

In Redis Cluster mode (``cluster=True``) the token keys carry a hash tag, so that an endpoint's hash and its
``:previous`` share a slot (the operator's write script touches both): ``<prefix>:{<namespace>:<name>}`` and
``<prefix>:{<namespace>:<name>}:previous``. The ``_alive`` marker is one per master there,
``<prefix>:_alive:{<n>}`` (:func:`cluster_alive_key`), each in a slot of its master. Channels are the same
(classic pub/sub reaches every node of a cluster). :func:`key_slot` is Redis Cluster's slot of a key.

The token Secret carries the keys :data:`SECRET_KEYS`; its ``expires_at`` is RFC 3339 UTC with second
precision (:func:`format_expires_at`, :func:`parse_expires_at`).
"""

from __future__ import annotations

import binascii
import hashlib
import re
from datetime import UTC, datetime

DEFAULT_PREFIX = "secured-endpoint"

#: The data keys of the token Secret.
SECRET_KEYS = ("access_token", "token_type", "expires_at", "authorization", "credential", "fingerprint")
#: The fields of the Redis token hash (and of its ``:previous``).
REDIS_FIELDS = ("access_token", "token_type", "expires_at", "scope", "fingerprint")

PREVIOUS_SUFFIX = ":previous"
ALIVE_SUFFIX = ":_alive"  # no namespace starts with "_", so it never collides with a token key
UPDATED_CHANNEL_SUFFIX = ":updated"
REFRESH_CHANNEL_SUFFIX = ":refresh"

CLUSTER_SLOTS = 16384

MAX_REFRESH_REQUEST = 512  # a namespace (63) + "/" + a name (253) + " " + a fingerprint fit easily

# Kubernetes names: a namespace is a DNS label, a resource name a DNS subdomain.
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")
_FINGERPRINT = re.compile(r"[\x21-\x7e]{1,128}")  # printable, no spaces; docs/contract.md §1.3: "sha256:<12 hex>"


def fingerprint(access_token: str) -> str:
    """Identifies a token without revealing it: ``sha256:`` + 12 hex digits (``status.tokenFingerprint``)."""
    return "sha256:" + hashlib.sha256(access_token.encode("utf-8")).hexdigest()[:12]


# -- Redis keys and channels --------------------------------------------------------------------------------

def token_key(prefix: str, namespace: str, name: str, *, cluster: bool = False) -> str:
    """``<prefix>:<namespace>:<name>``; in Redis Cluster mode ``<prefix>:{<namespace>:<name>}``."""
    if cluster:
        return f"{prefix}:{{{namespace}:{name}}}"
    return f"{prefix}:{namespace}:{name}"


def previous_key(prefix: str, namespace: str, name: str, *, cluster: bool = False) -> str:
    return token_key(prefix, namespace, name, cluster=cluster) + PREVIOUS_SUFFIX


def alive_key(prefix: str) -> str:
    return prefix + ALIVE_SUFFIX


def cluster_alive_key(prefix: str, number: int) -> str:
    """The ``number``-th candidate for a master's ``_alive`` marker in Redis Cluster mode: ``<prefix>:_alive:{n}``
    (the operator takes, for each master, the first candidate whose slot that master serves)."""
    return f"{prefix}{ALIVE_SUFFIX}:{{{number}}}"


def key_slot(key: str | bytes) -> int:
    """Redis Cluster's hash slot of ``key``: CRC16 (XMODEM) of its hash tag (the first non-empty ``{...}``), or of
    the whole key, modulo 16384."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


def updated_channel(prefix: str) -> str:
    return prefix + UPDATED_CHANNEL_SUFFIX


def refresh_channel(prefix: str) -> str:
    return prefix + REFRESH_CHANNEL_SUFFIX


def endpoint_id(namespace: str, name: str) -> str:
    """``<namespace>/<name>``: what ``:updated`` announces and what a refresh request names."""
    return f"{namespace}/{name}"


# -- refresh requests ---------------------------------------------------------------------------------------

def refresh_request(namespace: str, name: str, fingerprint: str) -> str:
    """The message a gateway publishes on ``<prefix>:refresh`` after its upstream refused this token."""
    return f"{endpoint_id(namespace, name)} {fingerprint}"


def parse_refresh_request(data: object) -> tuple[str, str, str] | None:
    """``"<namespace>/<name> <fingerprint>"`` → ``(namespace, name, fingerprint)``; None if malformed."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    if not isinstance(data, str) or len(data) > MAX_REFRESH_REQUEST:
        return None
    parts = data.strip().split(" ")
    if len(parts) != 2:
        return None
    target, token_fingerprint = parts
    namespace, slash, name = target.partition("/")
    if not slash or not _NAMESPACE.fullmatch(namespace) or not _NAME.fullmatch(name) \
            or not _FINGERPRINT.fullmatch(token_fingerprint):
        return None
    return namespace, name, token_fingerprint


# -- expires_at in the token Secret -------------------------------------------------------------------------

def format_expires_at(moment: datetime) -> str:
    """RFC 3339 UTC, second precision: ``2026-11-28T17:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expires_at(text: str) -> datetime:
    """An RFC 3339 timestamp (``Z`` or an offset; none means UTC) as an aware UTC datetime.

    ValueError if it is not one.
    """
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
