"""The one error a gateway sees from this library.

::

    TokenUnavailable        no usable token: the Redis key or the Secret directory is missing, unreadable
                            or holds an expired token, or a refresh request brought no newer token in time

Messages name where the token was looked for (``namespace/name`` and the Redis key, or the directory) and
why it is not usable; they never contain a token, only fingerprints.
"""

from __future__ import annotations


class TokenUnavailable(Exception):
    """No usable token right now. A gateway answers 503 (or its upstream's 401) and never forwards the
    request without a token.

    ``endpoint`` is ``namespace/name`` when known (Redis), ``location`` the Redis key or Secret directory.
    """

    def __init__(self, location: str, reason: str, *, endpoint: str | None = None) -> None:
        self.location = location
        self.reason = reason
        self.endpoint = endpoint
        where = f"{endpoint} ({location})" if endpoint else location
        super().__init__(f"no usable token for {where}: {reason}")
