"""The operator's settings (``secured_endpoint.settings.load_settings``) and the loader both models share.

Cases:
- nothing set → every default (leader election on with client-go's timings, text logs, …);
- every variable through the environment and through the settings file (YAML and JSON, native or string
  values, upper-case keys), the table covering every field; the environment wins over the file;
- blank means unset: an empty (or all-space) variable, and an empty or null file value, give the default;
  keys of other models (``redis_*``) and unknown keys are ignored;
- an injected ``environ`` is all that is read (the process's environment is not), and a plain construction
  afterwards reads the process's again; the models are frozen;
- settings-file errors, for both models: missing, a directory, unreadable, not UTF-8, bad YAML, bad JSON, not
  a mapping — one line naming SEP_SETTINGS_FILE, never quoting the file's content;
- each bad value is refused naming its variable, without echoing the value; several problems at once;
- leader election: client-go's rules (lease > renew deadline > 1.2 times the retry period) at and around their
  boundaries, from the environment and the file, both broken at once; the Lease's name and namespace checked;
  the Lease namespace falls back to the service account's namespace, then ``default``;
- the CLI stops with exit status 2 and the one line for the new settings and a bad file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from secured_endpoint import cli
from secured_endpoint.settings import OperatorSettings, SettingsError, load_redis_settings, load_settings

SECRET = "hunter2-Pa55word"


def error_of(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


def settings_file(tmp_path: Path, values: dict[str, Any], suffix: str = ".yaml") -> dict[str, str]:
    """A settings file holding ``values``, and the environment that names it."""
    path = tmp_path / f"settings{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    return {"SEP_SETTINGS_FILE": str(path)}


# -- defaults and every variable ------------------------------------------------------------------------------


def test_nothing_set_gives_every_default() -> None:
    settings = load_settings({})
    assert settings.model_dump() == {
        "refresh_concurrency": 32,
        "kube_max_in_flight": 20,
        "token_timeout_seconds": 10.0,
        "token_connect_timeout_seconds": 5.0,
        "reactive_floor_seconds": 5.0,
        "credentials_retry_seconds": 300.0,
        "startup_spread_seconds": 10.0,
        "metrics_port": 0,
        "health_port": 0,
        "event_component": "secured-endpoint-operator",
        "source_label_selector": "",
        "log_format": "text",
        "leader_election": True,
        "lease_name": "secured-endpoint-operator",
        "lease_namespace": "",
        "lease_duration_seconds": 15.0,
        "renew_deadline_seconds": 10.0,
        "retry_period_seconds": 2.0,
    }
    assert settings.source_labels == {}


# field, the variable's text, the same as a native file value, the value expected
EVERY_VARIABLE: list[tuple[str, str, Any, Any]] = [
    ("refresh_concurrency", "7", 7, 7),
    ("kube_max_in_flight", "3", 3, 3),
    ("token_timeout_seconds", "2.5", 2.5, 2.5),
    ("token_connect_timeout_seconds", "1.5", 1.5, 1.5),
    ("reactive_floor_seconds", "0", 0, 0.0),
    ("credentials_retry_seconds", "60", 60, 60.0),
    ("startup_spread_seconds", "0.5", 0.5, 0.5),
    ("metrics_port", "9090", 9090, 9090),
    ("health_port", "8081", 8081, 8081),
    ("event_component", "my-operator", "my-operator", "my-operator"),
    ("source_label_selector", "team = a", "team = a", "team=a"),
    ("log_format", "json", "json", "json"),
    ("leader_election", "false", False, False),
    ("lease_name", "tokens.example.com", "tokens.example.com", "tokens.example.com"),
    ("lease_namespace", "operators", "operators", "operators"),
    ("lease_duration_seconds", "60", 60, 60.0),
    ("renew_deadline_seconds", "12.5", 12.5, 12.5),
    ("retry_period_seconds", "1", 1, 1.0),
]


def test_the_table_covers_every_field() -> None:
    assert {name for name, *_ in EVERY_VARIABLE} == set(OperatorSettings.model_fields)


@pytest.mark.parametrize(("name", "text", "native", "expected"), EVERY_VARIABLE)
def test_every_variable_through_the_environment(name: str, text: str, native: Any, expected: Any) -> None:
    settings = load_settings({f"SEP_{name.upper()}": text})
    assert getattr(settings, name) == expected
    assert settings.model_fields_set == {name}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize(("name", "text", "native", "expected"), EVERY_VARIABLE)
def test_every_variable_through_the_file(tmp_path: Path, suffix: str, name: str, text: str, native: Any,
                                         expected: Any) -> None:
    for value in (native, text):  # a YAML/JSON number or boolean, or the variable's text
        settings = load_settings(settings_file(tmp_path, {name: value}, suffix))
        assert getattr(settings, name) == expected, value
        assert settings.model_fields_set == {name}


def test_file_keys_are_case_insensitive_and_others_ignored(tmp_path: Path) -> None:
    env = settings_file(tmp_path, {"REFRESH_CONCURRENCY": 4, "Log_Format": "json", "redis_host": "redis",
                                   "redis_refresh_concurrency": 9, "no_such_setting": 1})
    settings = load_settings(env)
    assert (settings.refresh_concurrency, settings.log_format) == (4, "json")
    assert settings.model_fields_set == {"refresh_concurrency", "log_format"}


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    env = settings_file(tmp_path, {"refresh_concurrency": 4, "metrics_port": 9100, "lease_name": "from-file"})
    settings = load_settings({**env, "SEP_REFRESH_CONCURRENCY": "8", "SEP_LEASE_NAME": "from-env"})
    assert (settings.refresh_concurrency, settings.metrics_port, settings.lease_name) == (8, 9100, "from-env")


# -- blank means unset --------------------------------------------------------------------------------------


def test_an_empty_variable_means_unset(tmp_path: Path) -> None:
    # a Deployment template renders an unused value as "": the file's value (or the default) applies
    env = settings_file(tmp_path, {"metrics_port": 9100})
    settings = load_settings({**env, "SEP_METRICS_PORT": "", "SEP_REFRESH_CONCURRENCY": "  ", "SEP_LOG_FORMAT": "",
                              "SEP_LEASE_DURATION_SECONDS": "", "SEP_LEADER_ELECTION": ""})
    assert (settings.metrics_port, settings.refresh_concurrency, settings.log_format) == (9100, 32, "text")
    assert (settings.lease_duration_seconds, settings.leader_election) == (15.0, True)


def test_an_empty_or_null_file_value_means_unset(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("metrics_port:\nrefresh_concurrency: ''\nlog_format: '  '\nlease_name: null\n")
    settings = load_settings({"SEP_SETTINGS_FILE": str(path)})
    assert settings == load_settings({})
    assert settings.model_fields_set == set()


def test_an_empty_settings_file_variable_means_no_file() -> None:
    assert load_settings({"SEP_SETTINGS_FILE": ""}) == load_settings({"SEP_SETTINGS_FILE": "  "}) == load_settings({})


# -- where the values come from ------------------------------------------------------------------------------


def test_an_injected_environ_is_all_that_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEP_REFRESH_CONCURRENCY", "7")
    monkeypatch.setenv("SEP_SETTINGS_FILE", str(tmp_path / "missing.yaml"))  # would fail if it were read
    assert load_settings({}).refresh_concurrency == 32
    assert load_redis_settings({}).configured is False
    monkeypatch.delenv("SEP_SETTINGS_FILE")
    assert load_settings().refresh_concurrency == 7  # the process's environment
    assert OperatorSettings().refresh_concurrency == 7  # after a load with a mapping, too
    assert OperatorSettings(refresh_concurrency=3).refresh_concurrency == 3  # keyword arguments win


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(pydantic.ValidationError):
        settings.refresh_concurrency = 1  # type: ignore[misc]


# -- settings-file errors (both loaders read the file) --------------------------------------------------------


def _bad_files(tmp_path: Path) -> list[tuple[Path, str]]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"redis_password: {SECRET}\nrefresh_concurrency: [4\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(f'{{"redis_password": "{SECRET}",}}')
    no_suffix = tmp_path / "settings"
    no_suffix.write_text(f"redis_password: {SECRET}\n")  # YAML, but only .yaml/.yml is read as YAML
    a_list = tmp_path / "list.yaml"
    a_list.write_text(f"- redis_password: {SECRET}\n")
    a_scalar = tmp_path / "scalar.json"
    a_scalar.write_text(json.dumps(SECRET))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(f"redis_password: {SECRET}\xe9\n".encode("latin-1"))
    return [
        (tmp_path / "missing.yaml", "cannot read"),
        (tmp_path, "cannot read"),  # a directory
        (bad_yaml, "is not valid .yaml"),
        (bad_json, "is not valid .json"),
        (no_suffix, "is not valid JSON"),
        (a_list, "must hold a mapping"),
        (a_scalar, "must hold a mapping"),
        (empty, "must hold a mapping"),
        (latin1, "is not UTF-8 text"),
    ]


@pytest.mark.parametrize("loader", [load_settings, load_redis_settings])
def test_settings_file_errors_name_the_variable_and_never_the_content(tmp_path: Path, loader: Any) -> None:
    for path, expected in _bad_files(tmp_path):
        with pytest.raises(SettingsError) as caught:
            loader({"SEP_SETTINGS_FILE": str(path)})
        message = str(caught.value)
        assert message.startswith(f"SEP_SETTINGS_FILE: {path}" if expected != "cannot read"
                                  else f"SEP_SETTINGS_FILE: cannot read {path}"), message
        assert expected in message, message
        assert SECRET not in message, message
        assert len(message.splitlines()) == 1, message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_settings_file_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(f"redis_password: {SECRET}\n")
    path.chmod(0)
    with pytest.raises(SettingsError, match="SEP_SETTINGS_FILE: cannot read") as caught:
        load_settings({"SEP_SETTINGS_FILE": str(path)})
    assert SECRET not in str(caught.value)


# -- bad values -----------------------------------------------------------------------------------------------


BAD_VALUES: list[tuple[str, str]] = [
    ("SEP_REFRESH_CONCURRENCY", "many-xyzzy"),
    ("SEP_REFRESH_CONCURRENCY", "0"),
    ("SEP_REFRESH_CONCURRENCY", "1025"),
    ("SEP_KUBE_MAX_IN_FLIGHT", "201"),
    ("SEP_TOKEN_TIMEOUT_SECONDS", "0"),
    ("SEP_TOKEN_CONNECT_TIMEOUT_SECONDS", "-1"),
    ("SEP_REACTIVE_FLOOR_SECONDS", "-0.5"),
    ("SEP_CREDENTIALS_RETRY_SECONDS", "4"),
    ("SEP_STARTUP_SPREAD_SECONDS", "601"),
    ("SEP_METRICS_PORT", "65536"),
    ("SEP_METRICS_PORT", "tcp://10.0.0.1:9090"),
    ("SEP_LOG_FORMAT", "xyzzy-xml"),
    ("SEP_LEADER_ELECTION", "xyzzy-perhaps"),
    ("SEP_LEASE_NAME", "Xyzzy_Lease"),
    ("SEP_LEASE_NAME", "-xyzzy"),
    ("SEP_LEASE_NAME", "x" * 254),
    ("SEP_LEASE_NAMESPACE", "xyzzy.dotted"),
    ("SEP_LEASE_NAMESPACE", "x" * 64),
    ("SEP_LEASE_DURATION_SECONDS", "0"),
    ("SEP_LEASE_DURATION_SECONDS", "xyzzy"),
    ("SEP_RENEW_DEADLINE_SECONDS", "-1"),
    ("SEP_RETRY_PERIOD_SECONDS", "0"),
    ("SEP_RETRY_PERIOD_SECONDS", "3601"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_names_its_variable_and_is_not_echoed(variable: str, value: str) -> None:
    message = error_of({variable: value})
    assert message.startswith(f"invalid operator settings: {variable}: "), message
    if "xyzzy" in value.lower() or len(value) > 50:  # a number may well appear in the rule it breaks
        assert value not in message, message
    assert "Value error" not in message


def test_several_problems_are_reported_together() -> None:
    message = error_of({"SEP_REFRESH_CONCURRENCY": "x", "SEP_LOG_FORMAT": "xml", "SEP_LEASE_NAME": "A"})
    for variable in ("SEP_REFRESH_CONCURRENCY", "SEP_LOG_FORMAT", "SEP_LEASE_NAME"):
        assert variable in message


def test_a_bad_file_value_names_the_variable(tmp_path: Path) -> None:
    message = error_of(settings_file(tmp_path, {"refresh_concurrency": "lots", "log_format": ["json"]}))
    assert "SEP_REFRESH_CONCURRENCY" in message
    assert "SEP_LOG_FORMAT" in message


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on"])
def test_leader_election_true(text: str) -> None:
    assert load_settings({"SEP_LEADER_ELECTION": text}).leader_election is True


@pytest.mark.parametrize("text", ["false", "FALSE", "0", "no", "off"])
def test_leader_election_false(text: str) -> None:
    assert load_settings({"SEP_LEADER_ELECTION": text}).leader_election is False


# -- leader election timing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("lease", "renew", "retry"), [
    ("15", "10", "2"),
    ("10.5", "10", "2"),
    ("2", "1.3", "1"),  # 1.3 > 1.2 * 1
    ("3600", "3599", "2999"),
])
def test_lease_timing_that_client_go_accepts(lease: str, renew: str, retry: str) -> None:
    settings = load_settings({"SEP_LEASE_DURATION_SECONDS": lease, "SEP_RENEW_DEADLINE_SECONDS": renew,
                              "SEP_RETRY_PERIOD_SECONDS": retry})
    assert (settings.lease_duration_seconds, settings.renew_deadline_seconds, settings.retry_period_seconds) == (
        float(lease), float(renew), float(retry))


@pytest.mark.parametrize(("env", "named"), [
    ({"SEP_LEASE_DURATION_SECONDS": "10"}, ("SEP_LEASE_DURATION_SECONDS (10)", "SEP_RENEW_DEADLINE_SECONDS (10)")),
    ({"SEP_LEASE_DURATION_SECONDS": "9.5"}, ("SEP_LEASE_DURATION_SECONDS (9.5)", "SEP_RENEW_DEADLINE_SECONDS")),
    ({"SEP_RENEW_DEADLINE_SECONDS": "20"}, ("SEP_LEASE_DURATION_SECONDS (15)", "SEP_RENEW_DEADLINE_SECONDS (20)")),
    ({"SEP_RETRY_PERIOD_SECONDS": "9"}, ("SEP_RENEW_DEADLINE_SECONDS (10)", "SEP_RETRY_PERIOD_SECONDS (9)", "1.2")),
    ({"SEP_RENEW_DEADLINE_SECONDS": "2.4"}, ("SEP_RENEW_DEADLINE_SECONDS (2.4)", "SEP_RETRY_PERIOD_SECONDS (2)")),
    ({"SEP_LEADER_ELECTION": "false", "SEP_LEASE_DURATION_SECONDS": "5"}, ("SEP_LEASE_DURATION_SECONDS",)),
])
def test_lease_timing_that_client_go_refuses(env: dict[str, str], named: tuple[str, ...]) -> None:
    message = error_of(env)
    assert message.startswith("invalid operator settings: "), message
    for fragment in named:
        assert fragment in message, message


def test_both_lease_rules_broken_at_once_from_the_file(tmp_path: Path) -> None:
    env = settings_file(tmp_path, {"lease_duration_seconds": 5, "renew_deadline_seconds": 6,
                                   "retry_period_seconds": 5}, ".json")
    message = error_of(env)
    assert "SEP_LEASE_DURATION_SECONDS (5) must be greater than SEP_RENEW_DEADLINE_SECONDS (6)" in message
    assert "SEP_RENEW_DEADLINE_SECONDS (6) must be greater than 1.2 times SEP_RETRY_PERIOD_SECONDS (5)" in message
    # the environment mends what the file broke
    settings = load_settings({**env, "SEP_LEASE_DURATION_SECONDS": "30", "SEP_RENEW_DEADLINE_SECONDS": "20"})
    assert (settings.lease_duration_seconds, settings.renew_deadline_seconds) == (30.0, 20.0)


def test_lease_namespace_given_or_the_operators_own(tmp_path: Path) -> None:
    namespace_file = tmp_path / "namespace"
    assert load_settings({"SEP_LEASE_NAMESPACE": "ops"}).lease_namespace_or_own(namespace_file) == "ops"
    settings = load_settings({})
    assert settings.lease_namespace_or_own(namespace_file) == "default"  # not in a Pod
    namespace_file.write_text("secured-endpoint-system\n")
    assert settings.lease_namespace_or_own(namespace_file) == "secured-endpoint-system"
    namespace_file.write_text("")
    assert settings.lease_namespace_or_own(namespace_file) == "default"
    namespace_file.write_text("Not A Namespace")
    assert settings.lease_namespace_or_own(namespace_file) == "default"
    assert settings.lease_namespace_or_own(tmp_path) == "default"  # a directory: unreadable


# -- the command line -----------------------------------------------------------------------------------------


def _cli_cases(tmp_path: Path) -> list[tuple[dict[str, str], str]]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"redis_password: {SECRET}\n: [\n")
    return [
        ({"SEP_LEASE_DURATION_SECONDS": "5"}, "SEP_LEASE_DURATION_SECONDS"),
        ({"SEP_LOG_FORMAT": "xml"}, "SEP_LOG_FORMAT"),
        ({"SEP_SETTINGS_FILE": str(bad_yaml)}, "SEP_SETTINGS_FILE"),
        ({"SEP_SETTINGS_FILE": str(tmp_path / "missing.json")}, "SEP_SETTINGS_FILE"),
        ({"SEP_REDIS_HOST": "h", "SEP_REDIS_SENTINEL_PASSWORD": SECRET}, "SEP_REDIS_SENTINEL_PASSWORD"),
    ]


def test_the_cli_stops_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    for env, named in _cli_cases(tmp_path):
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert cli.main(["run", "--all-namespaces"]) == 2
        err = capsys.readouterr().err
        assert named in err, (env, err)
        assert SECRET not in err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
