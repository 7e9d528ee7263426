"""One token request for one endpoint: credentials from its namespace + the token client → a token, or a
classified failure. No decisions about *when* (that is :mod:`secured_endpoint.policy`), no writes.

Failures come back as values, not exceptions, each with the ``Ready`` reason, a message that is safe to show
(it names objects, keys, hosts and HTTP statuses, never a secret) and what :func:`policy.failure_retry`
needs to plan the next attempt.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import SecretStr

from secured_endpoint import api, credentials, kube, metrics, schedule, tokens
from secured_endpoint.metrics import OperatorMetrics
from secured_endpoint.policy import FailureKind
from secured_endpoint.targets.base import IssuedToken

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    token: IssuedToken
    refresh_at: datetime  # when the next one is due
    source_versions: dict[str, str]  # "Secret/name" -> resourceVersion the token was made from
    refresh_token: SecretStr | None  # password grant: kept in memory only (docs/contract.md §5)


@dataclass(frozen=True)
class FetchFailed:
    kind: FailureKind
    reason: api.Reason
    message: str
    permanent: bool = False
    retry_after_seconds: float | None = None


@dataclass
class Refresher:
    sources: credentials.SourceReader
    token_client: tokens.TokenClient
    clock: Callable[[], datetime]
    rng: random.Random  # the refresh time's jitter
    metrics: OperatorMetrics = field(default_factory=lambda: metrics.default)

    async def fetch(self, namespace: str, name: str, spec: api.SecuredEndpointSpec, *,
                    refresh_token: SecretStr | None) -> Fetched | FetchFailed:
        # the lifetime counts from before the request: the server's clock started it somewhere in between
        issued_at = self.clock()
        started = time.monotonic()
        requested: float | None = None  # when the HTTP request began: reading the credentials is timed apart
        try:
            loaded = await credentials.load(self.sources, namespace, spec, refresh_token=refresh_token)
            requested = time.monotonic()
            self.metrics.observe_credentials_read(requested - started)
            response = await self.token_client.fetch(loaded.request)
        except credentials.CredentialsUnreadableError as exc:  # the API failed: transient, nothing is missing
            return self._failed(FetchFailed(FailureKind.KUBE, exc.reason, exc.message))
        except credentials.CredentialsError as exc:
            return self._failed(FetchFailed(FailureKind.CREDENTIALS, exc.reason, exc.message))
        except tokens.TokenError as exc:
            self._requested(spec, requested, str(exc.reason))
            return self._failed(FetchFailed(FailureKind.TOKEN, exc.reason, str(exc), permanent=exc.permanent,
                                            retry_after_seconds=exc.retry_after_seconds))
        except kube.KubeError as exc:
            return self._failed(FetchFailed(FailureKind.KUBE, api.Reason.CREDENTIALS_UNREADABLE,
                                            f"cannot read the referenced Secrets: {exc}"))
        except Exception as exc:
            # a library raised what the token client does not classify (a bug to fix, not a reason to leave the
            # status silent); its text may quote input, so only its type is shown
            logger.error("Unexpected %s while fetching the token of %s/%s.", type(exc).__name__, namespace, name)
            self._requested(spec, requested, str(api.Reason.TOKEN_REQUEST_FAILED))
            return self._failed(FetchFailed(FailureKind.UNEXPECTED, api.Reason.TOKEN_REQUEST_FAILED,
                                            f"unexpected {type(exc).__name__} while requesting the token"))
        self._requested(spec, requested, "issued")
        self.metrics.observe_refresh("success")
        access_token = response.access_token.get_secret_value()
        expires_at, _source = schedule.token_expiry(
            issued_at=issued_at, expires_in=response.expires_in, jwt_exp=tokens.jwt_expiry(access_token),
            jwt_lifetime=tokens.jwt_lifetime(access_token),
            default_expires_in=spec.refresh.default_expires_in_seconds)
        token = IssuedToken(access_token=response.access_token, token_type=response.token_type,
                            scope=response.scope or (" ".join(spec.scopes) or None), issued_at=issued_at,
                            expires_at=expires_at, fingerprint=tokens.fingerprint(access_token))
        refresh_at = schedule.refresh_time(
            issued_at=issued_at, expires_at=expires_at, refresh_before_seconds=spec.refresh.refresh_before_seconds,
            refresh_before_percent=spec.refresh.refresh_before_percent, rng=self.rng)
        return Fetched(token=token, refresh_at=refresh_at, source_versions=loaded.source_versions,
                       refresh_token=response.refresh_token)

    def _requested(self, spec: api.SecuredEndpointSpec, requested: float | None, result: str) -> None:
        """Count and time the HTTP token request, if it was sent (``requested``: when it began)."""
        if requested is not None:
            self.metrics.observe_idp_request(spec.token_url, result, time.monotonic() - requested)

    def _failed(self, failure: FetchFailed) -> FetchFailed:
        self.metrics.observe_refresh(str(failure.reason))
        return failure
