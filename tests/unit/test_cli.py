"""The command line refuses bad operator settings with one clear line, not a traceback.

Cases: a bad number, a Redis password file that cannot be read, contradicting Redis settings, and no
namespace scope — each exits 2 and names the setting; a Redis password never appears in the message.
"""

from __future__ import annotations

import pytest

from secured_endpoint import cli


@pytest.mark.parametrize(("environment", "named"), [
    ({"SEP_REFRESH_CONCURRENCY": "many"}, "SEP_REFRESH_CONCURRENCY"),
    ({"SEP_REDIS_PASSWORD_FILE": "/nonexistent/redis-password"}, "SEP_REDIS_PASSWORD_FILE"),
    ({"SEP_REDIS_URL": "redis://u:hunter2-secret@127.0.0.1:6379/0", "SEP_REDIS_HOST": "127.0.0.1"},
     "SEP_REDIS_HOST"),
    ({"SEP_REDIS_SENTINELS": "127.0.0.1:26379"}, "SEP_REDIS_SENTINEL_MASTER"),
])
def test_bad_settings_exit_2_naming_the_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 environment: dict[str, str], named: str) -> None:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["run", "--all-namespaces"]) == 2
    captured = capsys.readouterr()
    assert named in captured.err
    assert "Traceback" not in captured.err
    assert "hunter2-secret" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_a_scope_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run"]) == 2
    assert "--all-namespaces" in capsys.readouterr().err
