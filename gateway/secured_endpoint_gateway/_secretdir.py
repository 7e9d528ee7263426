"""Tokens from the token Secret mounted as a directory (docs/contract.md §2), for asyncio and for threads.

Kubernetes writes a Secret volume as timestamped directories plus a ``..data`` symlink to the current one,
and each key is a symlink ``<key> -> ..data/<key>``; an update writes a new directory and swaps ``..data``
atomically. So the source resolves ``..data`` once and reads every file from that one directory: the
files of one read always belong to one token. A directory without ``..data`` (docker-compose, tests) is
read as it is; there, write the files atomically (write elsewhere, then rename).

Change detection is polling, at most every ``poll_interval`` seconds: the ``..data`` target plus the
mtime/size/inode of the files form a stamp, and the files are re-read only when it changes. No inotify
dependency, and a stat of a few tmpfs files costs microseconds. The reads are that small too, which is
why the async source does them inline instead of in a worker thread.

The reactive path is weak here, by design: a mounted Secret cannot ask the operator for anything.
``request_refresh(stale)`` only re-reads the directory (every 100 ms, up to ``refresh_wait``) for a token
with another fingerprint — which helps when the operator has already written one that the kubelet is
delivering (that takes up to a minute or so, the kubelet sync period plus its cache TTL). Reactive refresh
needs the Redis source (docs/contract.md §4), or a patch of the SecuredEndpoint's ``secured-endpoint.io/
refresh-requested-at`` annotation, which needs RBAC on the resource and is not done by this library.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from secured_endpoint_gateway._errors import TokenUnavailable
from secured_endpoint_gateway._token import GatewayToken, RefreshCooldown, parse_secret_files

DATA_LINK = "..data"
# The files this library reads; authorization/credential are derived from these and not needed.
FILES = ("access_token", "token_type", "expires_at", "fingerprint")
_REREAD_INTERVAL = 0.1
_Stamp = tuple[str | None, tuple[tuple[str, int, int, int], ...]]


class _SecretDir:
    """The synchronous core both twins share; the async twin calls it inline (tmpfs reads are tiny)."""

    def __init__(self, path: str | os.PathLike[str], *, poll_interval: float = 1.0, refresh_wait: float = 3.0,
                 expiry_skew: float = 5.0, refresh_cooldown: float = 10.0) -> None:
        if poll_interval < 0 or refresh_wait < 0 or expiry_skew < 0 or refresh_cooldown < 0:
            raise ValueError("poll_interval, refresh_wait, expiry_skew and refresh_cooldown must be >= 0")
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.refresh_wait = refresh_wait
        self.expiry_skew = expiry_skew
        self.cooldown = RefreshCooldown(refresh_cooldown)
        self._state: tuple[_Stamp, GatewayToken] | None = None  # what was read, and the stamp it was read at
        self._checked_at = float("-inf")  # monotonic time of the last stamp check

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"

    def _unavailable(self, reason: str) -> TokenUnavailable:
        return TokenUnavailable(str(self.path), reason)

    def _data_target(self) -> str | None:
        try:
            return os.readlink(self.path / DATA_LINK)
        except (FileNotFoundError, OSError):  # no ..data: a plain directory
            return None

    def _stamp_now(self) -> _Stamp:
        stats: list[tuple[str, int, int, int]] = []
        for name in FILES:
            try:
                info = os.stat(self.path / name)
            except OSError:
                stats.append((name, -1, -1, -1))
            else:
                stats.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
        return self._data_target(), tuple(stats)

    def _read_files(self) -> dict[str, str]:
        for _ in range(3):
            target = self._data_target()
            base = self.path / target if target is not None else self.path
            files: dict[str, str] = {}
            try:
                for name in FILES:
                    file = base / name
                    if file.exists():
                        files[name] = file.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # the kubelet removed the old directory while we read it: read the new one
            except OSError as exc:
                raise self._unavailable(f"cannot read the token files: {type(exc).__name__}: "
                                        f"{exc.strerror or exc}") from None
            return files
        raise self._unavailable("the directory kept changing while it was read")

    def _current(self, *, force: bool = False) -> GatewayToken:
        """The token, from memory while the stamp is unchanged; ``force`` reads the files regardless."""
        state = self._state
        stamp: _Stamp | None = None
        if not force and state is not None and not state[1].expired(skew=self.expiry_skew):
            now = time.monotonic()
            if now - self._checked_at < self.poll_interval:
                return state[1]
            stamp = self._stamp_now()
            self._checked_at = now
            if stamp == state[0]:
                return state[1]
        if stamp is None:
            stamp = self._stamp_now()  # taken before the read: a change during it only costs one more read
            self._checked_at = time.monotonic()
        if not self.path.is_dir():
            raise self._unavailable("the directory does not exist (is the token Secret mounted here?)")
        try:
            token = parse_secret_files(self._read_files())
        except ValueError as exc:
            raise self._unavailable(str(exc)) from None
        if token.expired():
            raise self._unavailable(f"the token {token.fingerprint} expired at {token.expires_at.isoformat()}")
        # One assignment, so threads racing here leave a stamp and a token that belong together.
        self._state = None if token.expired(skew=self.expiry_skew) else (stamp, token)
        return token

    def _newer(self, stale: GatewayToken) -> GatewayToken | None:
        try:
            token = self._current(force=True)
        except TokenUnavailable:
            return None
        return token if token.fingerprint != stale.fingerprint else None

    def _no_newer(self, stale: GatewayToken) -> TokenUnavailable:
        return self._unavailable(
            f"the token {stale.fingerprint} was refused and no newer one appeared within {self.refresh_wait:g}s; "
            "a mounted Secret cannot ask the operator for a refresh (use the Redis source for that)")

    def _cooling_down(self, stale: GatewayToken) -> TokenUnavailable | None:
        ago = self.cooldown.since(stale.fingerprint)
        if ago is None:
            return None
        return self._unavailable(f"no newer token than {stale.fingerprint} appeared {ago:.1f}s ago; not waiting "
                                 f"again for {self.cooldown.seconds:g}s")


class SecretDirTokenSource(_SecretDir):
    """Asynchronous token source over a mounted token Secret; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], *, poll_interval: float = 1.0, refresh_wait: float = 3.0,
                 expiry_skew: float = 5.0, refresh_cooldown: float = 10.0) -> None:
        super().__init__(path, poll_interval=poll_interval, refresh_wait=refresh_wait, expiry_skew=expiry_skew,
                         refresh_cooldown=refresh_cooldown)
        self._refreshes: dict[str, asyncio.Task[GatewayToken]] = {}

    async def get(self) -> GatewayToken:
        """The current token (re-read when the files changed). TokenUnavailable if missing or expired."""
        return self._current()

    async def request_refresh(self, stale: GatewayToken) -> GatewayToken:
        """A token with another fingerprint than ``stale`` once the directory holds one (bounded wait)."""
        task = self._refreshes.get(stale.fingerprint)
        if task is None:
            # One poller per stale token, however many requests saw the 401.
            task = asyncio.create_task(self._refresh(stale), name=f"reread {self.path}")
            self._refreshes[stale.fingerprint] = task
            task.add_done_callback(lambda done: self._refresh_done(stale.fingerprint, done))
        return await asyncio.shield(task)

    def _refresh_done(self, fingerprint: str, task: asyncio.Task[GatewayToken]) -> None:
        if self._refreshes.get(fingerprint) is task:
            del self._refreshes[fingerprint]
        if not task.cancelled():
            task.exception()

    async def _refresh(self, stale: GatewayToken) -> GatewayToken:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.refresh_wait
        cooling = self._cooling_down(stale)
        while True:
            token = self._newer(stale)
            if token is not None:
                self.cooldown.answered(stale.fingerprint)
                return token
            if cooling is not None:
                raise cooling
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.cooldown.failed(stale.fingerprint)
                raise self._no_newer(stale)
            await asyncio.sleep(min(_REREAD_INTERVAL, remaining))

    async def aclose(self) -> None:
        """Nothing to release; here so that every source can be closed the same way."""
        for task in list(self._refreshes.values()):
            task.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class SyncSecretDirTokenSource(_SecretDir):
    """The blocking twin of ``SecretDirTokenSource``. Thread-safe: the worst a race does is one extra read."""

    def get(self) -> GatewayToken:
        return self._current()

    def request_refresh(self, stale: GatewayToken) -> GatewayToken:
        deadline = time.monotonic() + self.refresh_wait
        cooling = self._cooling_down(stale)
        while True:
            token = self._newer(stale)
            if token is not None:
                self.cooldown.answered(stale.fingerprint)
                return token
            if cooling is not None:
                raise cooling
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.cooldown.failed(stale.fingerprint)
                raise self._no_newer(stale)
            time.sleep(min(_REREAD_INTERVAL, remaining))

    def close(self) -> None:
        """Nothing to release; here so that every source can be closed the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
