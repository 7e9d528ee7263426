"""Operator-wide settings: environment variables with the ``SEP_`` prefix, or an optional settings file.

The same names work as lower-case keys in a YAML/JSON file named by ``SEP_SETTINGS_FILE``; the
environment wins over the file. A bad value fails at start-up with the setting's name, not a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting is wrong; the message names it (and never echoes a password)."""


class OperatorSettings(BaseSettings):
    """Tunables of one operator replica. Defaults suit a cluster of up to ~10,000 endpoints."""

    model_config = SettingsConfigDict(env_prefix="SEP_", extra="ignore", frozen=True)

    refresh_concurrency: int = Field(default=32, ge=1, le=1024)
    """Token refreshes in flight at once (each is a token request plus target writes)."""

    kube_max_in_flight: int = Field(default=20, ge=1, le=200)
    """Kubernetes API requests in flight at once; the apiserver allows 200 mutating ones in total."""

    token_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    token_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)

    reactive_floor_seconds: float = Field(default=5.0, ge=0, le=3600)
    """Least time between two forced refreshes of one endpoint (annotation or gateway request)."""

    credentials_retry_seconds: float = Field(default=300.0, ge=5, le=86400)
    """Safety-net retry for a missing Secret; its creation normally triggers the retry at once."""

    startup_spread_seconds: float = Field(default=10.0, ge=0, le=600)
    """Refreshes already overdue at start-up are spread over this window instead of one burst."""

    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 disables it."""

    event_component: str = "secured-endpoint-operator"


def load_settings(environ: dict[str, str] | None = None) -> OperatorSettings:
    """Read the settings file (if any) under the environment; raise SettingsError naming a bad one."""
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    path = env.get("SEP_SETTINGS_FILE")
    if path:
        file_values = _read_settings_file(Path(path))
    env_values = {
        key.removeprefix("SEP_").lower(): value
        for key, value in env.items()
        if key.startswith("SEP_") and key != "SEP_SETTINGS_FILE"
    }
    merged = {**file_values, **env_values}
    try:
        return OperatorSettings.model_validate({k: v for k, v in merged.items()
                                                if k in OperatorSettings.model_fields})
    except pydantic.ValidationError as exc:
        problems = [
            f"SEP_{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise SettingsError("invalid operator settings: " + "; ".join(problems)) from None


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"SEP_SETTINGS_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise SettingsError(f"SEP_SETTINGS_FILE: {path} is not valid {path.suffix or 'JSON'}: "
                            f"{type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"SEP_SETTINGS_FILE: {path} must hold a mapping of setting names to values")
    return {str(key).lower(): value for key, value in data.items()}
