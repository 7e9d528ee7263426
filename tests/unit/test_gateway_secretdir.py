"""The gateway library over a mounted token Secret, and ``TokenAuth`` against ``httpx.MockTransport``.

The directory is laid out the way the kubelet writes a Secret volume: a timestamped directory, ``..data``
pointing at it, and one symlink per key into ``..data``; an update is a new directory plus an atomic swap.

Cases:
- GatewayToken: the Authorization value (``bearer`` normalised), ``expired`` with skew, repr hides the token.
- Reading: every field; cached within ``poll_interval`` (a swap is seen only after it, or by a refresh);
  re-read after a ``..data`` swap with ``poll_interval=0``; a plain directory re-read when a file changes;
  the old directory removed by the swap is never read from.
- Unavailable: missing directory, missing ``access_token``, expired token — messages name the path and
  never the token; a token inside the skew window is still returned.
- ``request_refresh``: returns once a newer token is swapped in; raises after ``refresh_wait`` when none
  comes; then fails fast during the cooldown; concurrent async callers share one re-read loop.
- TokenAuth (sync and async clients): header injected and a caller's Authorization replaced; 401 → newer
  token → exactly one retry; a second 401 is returned, not retried again; 401 with no newer token → the
  original 401; no token → ``TokenUnavailable`` and no request at all; a bytes body is replayed, a
  streaming body is not retried; a sync source works in an async client; an async source in a sync
  client is a TypeError.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from secured_endpoint_gateway import (
    GatewayToken,
    SecretDirTokenSource,
    SyncSecretDirTokenSource,
    TokenAuth,
    TokenUnavailable,
)
from secured_endpoint_gateway.wire import fingerprint


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class MountedSecret:
    """Writes a Secret volume the way the kubelet's atomic writer does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir()
        self._count = 0

    def write(self, access_token: str, *, lifetime: float = 3600, token_type: str = "Bearer",
              omit: tuple[str, ...] = ()) -> None:
        expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        values = {
            "access_token": access_token,
            "token_type": token_type,
            "expires_at": iso(expires_at),
            "authorization": f"Bearer {access_token}",
            "credential": f"Bearer {access_token}",
            "fingerprint": fingerprint(access_token),
        }
        self._count += 1
        new_dir = self.path / f"..2026_01_01_00_00_{self._count:02d}.{os.getpid()}"
        new_dir.mkdir()
        for key, value in values.items():
            if key not in omit:
                (new_dir / key).write_text(value)
        old_target = self.current_dir()
        (self.path / "..data_tmp").symlink_to(new_dir.name)
        os.replace(self.path / "..data_tmp", self.path / "..data")  # the atomic swap
        for key in values:
            link = self.path / key
            if not link.is_symlink():
                link.symlink_to(Path("..data") / key)
        if old_target is not None:
            shutil.rmtree(self.path / old_target)

    def current_dir(self) -> str | None:
        link = self.path / "..data"
        return os.readlink(link) if link.is_symlink() else None


@pytest.fixture
def secret(tmp_path: Path) -> MountedSecret:
    return MountedSecret(tmp_path / "orders-token")


def make_token(access_token: str = "tok-A", *, lifetime: float = 3600, token_type: str = "Bearer") -> GatewayToken:
    return GatewayToken(access_token=SecretStr(access_token), token_type=token_type,
                        expires_at=datetime.now(UTC) + timedelta(seconds=lifetime),
                        fingerprint=fingerprint(access_token))


# -- GatewayToken ---------------------------------------------------------------------------------------


def test_authorization_header_and_scheme_normalised() -> None:
    assert make_token("abc").authorization == "Bearer abc"
    assert make_token("abc", token_type="bearer").authorization == "Bearer abc"
    assert make_token("abc", token_type="DPoP").authorization == "DPoP abc"


def test_expired_honours_skew() -> None:
    token = make_token(lifetime=10)
    assert not token.expired()
    assert token.expired(skew=11)
    assert token.expired(now=datetime.now(UTC) + timedelta(seconds=10))


def test_repr_hides_the_token() -> None:
    token = make_token("very-secret-token-value")
    assert "very-secret-token-value" not in repr(token)
    assert "very-secret-token-value" not in str(token)
    assert token.fingerprint in repr(token)


# -- reading ----------------------------------------------------------------------------------------------


def test_reads_every_field(secret: MountedSecret) -> None:
    secret.write("tok-A", lifetime=600)
    token = SyncSecretDirTokenSource(secret.path).get()
    assert token.access_token.get_secret_value() == "tok-A"
    assert token.token_type == "Bearer"
    assert token.fingerprint == fingerprint("tok-A")
    assert 590 < token.seconds_left() <= 600
    assert token.authorization == "Bearer tok-A"


async def test_async_source_reads(secret: MountedSecret) -> None:
    secret.write("tok-A")
    async with SecretDirTokenSource(secret.path) as source:
        assert (await source.get()).access_token.get_secret_value() == "tok-A"


def test_cached_within_poll_interval(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SyncSecretDirTokenSource(secret.path, poll_interval=3600)
    stale = source.get()
    secret.write("tok-B")
    assert source.get() == stale  # not looked at again yet
    assert source.request_refresh(stale).access_token.get_secret_value() == "tok-B"  # a refresh looks at once
    assert source.get().access_token.get_secret_value() == "tok-B"


def test_reread_after_data_swap(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SyncSecretDirTokenSource(secret.path, poll_interval=0)
    assert source.get().access_token.get_secret_value() == "tok-A"
    old_dir = secret.current_dir()
    secret.write("tok-B")
    assert secret.current_dir() != old_dir
    assert not (secret.path / str(old_dir)).exists()  # the old files are gone, as after a kubelet update
    assert source.get().access_token.get_secret_value() == "tok-B"


def test_reread_after_poll_interval(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SyncSecretDirTokenSource(secret.path, poll_interval=0.2)
    source.get()
    secret.write("tok-B")
    deadline = time.monotonic() + 2
    while source.get().access_token.get_secret_value() != "tok-B":
        assert time.monotonic() < deadline, "the swap was never noticed"
        time.sleep(0.05)


def test_plain_directory_reread_when_a_file_changes(tmp_path: Path) -> None:
    directory = tmp_path / "plain"
    directory.mkdir()
    expires = iso(datetime.now(UTC) + timedelta(hours=1))
    (directory / "access_token").write_text("tok-A\n")
    (directory / "expires_at").write_text(expires)
    source = SyncSecretDirTokenSource(directory, poll_interval=0)
    token = source.get()
    assert token.access_token.get_secret_value() == "tok-A"
    assert token.token_type == "Bearer"  # defaulted
    assert token.fingerprint == fingerprint("tok-A")  # computed when the file is missing
    (directory / "access_token").write_text("tok-Bee\n")
    assert source.get().access_token.get_secret_value() == "tok-Bee"


# -- unavailable ------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenUnavailable, match="does not exist") as caught:
        SyncSecretDirTokenSource(tmp_path / "nowhere").get()
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_missing_access_token(secret: MountedSecret) -> None:
    secret.write("tok-A", omit=("access_token",))
    with pytest.raises(TokenUnavailable, match="access_token is missing"):
        SyncSecretDirTokenSource(secret.path).get()


def test_expired_token_is_refused_without_showing_it(secret: MountedSecret) -> None:
    secret.write("expired-secret-value", lifetime=-5)
    with pytest.raises(TokenUnavailable, match="expired") as caught:
        SyncSecretDirTokenSource(secret.path).get()
    assert "expired-secret-value" not in str(caught.value)
    assert fingerprint("expired-secret-value") in str(caught.value)


def test_token_inside_skew_is_returned_but_not_cached(secret: MountedSecret) -> None:
    secret.write("tok-A", lifetime=3)
    source = SyncSecretDirTokenSource(secret.path, poll_interval=3600, expiry_skew=5)
    assert source.get().access_token.get_secret_value() == "tok-A"  # still works for 3 s: better than nothing
    secret.write("tok-B")
    assert source.get().access_token.get_secret_value() == "tok-B"  # not cached, despite the poll interval


# -- request_refresh --------------------------------------------------------------------------------------


def test_request_refresh_waits_for_a_newer_token(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SyncSecretDirTokenSource(secret.path, refresh_wait=5)
    stale = source.get()
    timer = threading.Timer(0.3, secret.write, args=("tok-B",))
    timer.start()
    started = time.monotonic()
    try:
        fresh = source.request_refresh(stale)
    finally:
        timer.join()
    assert fresh.access_token.get_secret_value() == "tok-B"
    assert 0.2 < time.monotonic() - started < 3


def test_request_refresh_times_out_then_cools_down(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SyncSecretDirTokenSource(secret.path, refresh_wait=0.3, refresh_cooldown=30)
    stale = source.get()
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="cannot ask the operator"):
        source.request_refresh(stale)
    assert 0.3 <= time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="not waiting again"):
        source.request_refresh(stale)
    assert time.monotonic() - started < 0.2
    secret.write("tok-B")  # a newer token is still found during the cooldown
    assert source.request_refresh(stale).access_token.get_secret_value() == "tok-B"


async def test_async_request_refresh_shared_between_callers(secret: MountedSecret) -> None:
    secret.write("tok-A")
    source = SecretDirTokenSource(secret.path, refresh_wait=5)
    stale = await source.get()
    waiters = [asyncio.create_task(source.request_refresh(stale)) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert len(source._refreshes) == 1  # one re-read loop for all twenty
    secret.write("tok-B")
    results = await asyncio.gather(*waiters)
    assert {token.access_token.get_secret_value() for token in results} == {"tok-B"}
    assert not source._refreshes


# -- TokenAuth --------------------------------------------------------------------------------------------


class Backend:
    """A mock upstream that accepts one token at a time and records what it was sent."""

    def __init__(self, valid: str, on_refused: Callable[[], None] | None = None) -> None:
        self.valid = valid
        self.on_refused = on_refused
        self.seen: list[str | None] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        authorization = request.headers.get("Authorization")
        self.seen.append(authorization)
        self.bodies.append(b"".join(request.stream))  # type: ignore[arg-type]
        if authorization == f"Bearer {self.valid}":
            return httpx.Response(200, json={"ok": True})
        if self.on_refused is not None:
            self.on_refused()
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                              json={"error": "invalid_token"})


class StreamingTransport(httpx.BaseTransport):
    """Unlike MockTransport (which reads, and so buffers, every body first), iterates the body as it is,
    as the real transport does."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.backend(request)


@pytest.fixture
def revoked_then_rotated(secret: MountedSecret) -> tuple[MountedSecret, Backend]:
    """tok-A is in the directory but the backend only takes tok-B, which appears at the first 401."""
    secret.write("tok-A")
    backend = Backend("tok-B")

    def rotate() -> None:
        if secret.current_dir() is not None and backend.on_refused is not None:
            backend.on_refused = None
            secret.write("tok-B")

    backend.on_refused = rotate
    return secret, backend


def test_header_injected_and_caller_authorization_replaced(secret: MountedSecret) -> None:
    secret.write("tok-A")
    backend = Backend("tok-A")
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = client.get("http://upstream/api", headers={"Authorization": "Bearer from-the-caller"})
    assert response.status_code == 200
    assert backend.seen == ["Bearer tok-A"]


def test_sync_401_refresh_and_one_retry(revoked_then_rotated: tuple[MountedSecret, Backend]) -> None:
    secret, backend = revoked_then_rotated
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path, refresh_wait=2))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = client.post("http://upstream/api", content=b'{"order": 1}')
        assert response.status_code == 200
        assert [r.status_code for r in response.history] == [401]
        assert backend.seen == ["Bearer tok-A", "Bearer tok-B"]
        assert backend.bodies == [b'{"order": 1}', b'{"order": 1}']  # the body was replayed
        assert client.get("http://upstream/api").status_code == 200  # the new token is used from now on
    assert backend.seen[-1] == "Bearer tok-B"


async def test_async_401_refresh_and_one_retry(revoked_then_rotated: tuple[MountedSecret, Backend]) -> None:
    secret, backend = revoked_then_rotated
    auth = TokenAuth(SecretDirTokenSource(secret.path, refresh_wait=2))
    async with httpx.AsyncClient(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = await client.post("http://upstream/api", json={"order": 1})
    assert response.status_code == 200
    assert backend.seen == ["Bearer tok-A", "Bearer tok-B"]
    assert backend.bodies[0] == backend.bodies[1] != b""


def test_only_one_retry(secret: MountedSecret) -> None:
    secret.write("tok-A")
    backend = Backend("nothing-is-valid")
    backend.on_refused = lambda: secret.write(f"tok-{len(backend.seen)}")  # always a newer token, always refused
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path, refresh_wait=2))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = client.get("http://upstream/api")
    assert response.status_code == 401
    assert len(backend.seen) == 2


def test_401_without_newer_token_returns_the_original(secret: MountedSecret) -> None:
    secret.write("tok-A")
    backend = Backend("tok-B")
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path, refresh_wait=0.3))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = client.get("http://upstream/api")
        assert response.status_code == 401
        assert response.json() == {"error": "invalid_token"}
        assert response.history == []
        assert backend.seen == ["Bearer tok-A"]
        started = time.monotonic()
        assert client.get("http://upstream/api").status_code == 401  # cooldown: no second wait
        assert time.monotonic() - started < 0.25


async def test_async_401_without_newer_token_returns_the_original(secret: MountedSecret) -> None:
    secret.write("tok-A")
    backend = Backend("tok-B")
    auth = TokenAuth(SecretDirTokenSource(secret.path, refresh_wait=0.3))
    async with httpx.AsyncClient(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = await client.get("http://upstream/api")
    assert response.status_code == 401
    assert backend.seen == ["Bearer tok-A"]


def test_no_token_means_no_request(tmp_path: Path) -> None:
    backend = Backend("tok-A")
    auth = TokenAuth(SyncSecretDirTokenSource(tmp_path / "not-mounted"))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client, \
            pytest.raises(TokenUnavailable):
        client.get("http://upstream/api")
    assert backend.seen == []


async def test_async_no_token_means_no_request(secret: MountedSecret) -> None:
    secret.write("tok-A", lifetime=-1)
    backend = Backend("tok-A")
    auth = TokenAuth(SecretDirTokenSource(secret.path))
    async with httpx.AsyncClient(transport=httpx.MockTransport(backend), auth=auth) as client:
        with pytest.raises(TokenUnavailable, match="expired"):
            await client.get("http://upstream/api")
    assert backend.seen == []


def test_streaming_body_is_not_retried(revoked_then_rotated: tuple[MountedSecret, Backend]) -> None:
    secret, backend = revoked_then_rotated
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path, refresh_wait=2))

    def chunks() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    with httpx.Client(transport=StreamingTransport(backend), auth=auth) as client:
        response = client.post("http://upstream/api", content=chunks())
        assert response.status_code == 401
        assert backend.seen == ["Bearer tok-A"]
        assert client.get("http://upstream/api").status_code == 200  # but the new token is ready
    assert backend.seen == ["Bearer tok-A", "Bearer tok-B"]


async def test_sync_source_in_async_client(revoked_then_rotated: tuple[MountedSecret, Backend]) -> None:
    secret, backend = revoked_then_rotated
    auth = TokenAuth(SyncSecretDirTokenSource(secret.path, refresh_wait=2))
    async with httpx.AsyncClient(transport=httpx.MockTransport(backend), auth=auth) as client:
        response = await client.get("http://upstream/api")
    assert response.status_code == 200
    assert backend.seen == ["Bearer tok-A", "Bearer tok-B"]


def test_async_source_in_sync_client_is_a_type_error(secret: MountedSecret) -> None:
    secret.write("tok-A")
    backend = Backend("tok-A")
    auth = TokenAuth(SecretDirTokenSource(secret.path))
    with httpx.Client(transport=httpx.MockTransport(backend), auth=auth) as client, \
            pytest.raises(TypeError, match="AsyncClient"):
        client.get("http://upstream/api")
    assert backend.seen == []
