"""No client secret, password, token or key ever reaches a log line, an Event, a status, a Redis channel,
``/metrics`` or the apiserver's audit log.

Cases:
- failure paths of its own: refused client, refused refresh token, an answer that is not JSON, an HTML page;
- the scan sees what it claims to: a value planted in an endpoint's name (which the operator repeats, as it
  must) is found in each source — the operator's log, its ``/metrics``, the audit log, the Events, the
  statuses, the Redis channels — and a secret planted in a temporary log fails the session's scan;
- the session's scan (``runs_last``: after every other test of the session, which it checks): every secret
  value the session used (``tests.leak_scan.forms``: raw, JSON-escaped, percent-encoded, base64 at every
  alignment, ``Basic base64(id:secret)``, any 8-character infix) in the logs of every operator the session
  started (whoever started it), every status and Event kept at each namespace teardown and still there at the
  end, every message on the session Redis' channels, every ``/metrics`` scrape, and the audit log of every
  write to SecuredEndpoints (status included) and Events, minus the specs users wrote.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests import leak_scan
from tests.conftest import (
    RECORD,
    ROOT,
    Kube,
    OperatorProcess,
    RedisAccess,
    Setup,
    _namespace,
    _operator,
    redis_operator_env,
    wait_for,
    written_by_the_operator,
)

pytestmark = pytest.mark.e2e

_MATRIX_MODULE = "tests.e2e.test_bad_input_matrix"


def session_secrets() -> set[str]:
    """What the session used, the bad-input matrix's own values included (when it ran)."""
    values = set(RECORD.secrets)
    matrix = sys.modules.get(_MATRIX_MODULE)
    for name in ("MATRIX_SECRETS", "SPEC_SECRETS"):
        values |= set(getattr(matrix, name, ()))
    return values


def session_needles(secrets: set[str]) -> leak_scan.Needles:
    """What the session's scan looks for: ``secrets`` in every form, the repository's texts public."""
    return leak_scan.needles(secrets, client_ids=RECORD.client_ids,
                             public_texts=leak_scan.repository_texts(ROOT))


def _without_spec(body: dict[str, Any]) -> dict[str, Any]:
    """A SecuredEndpoint (or a patch of one) without what users write: its spec and kubectl's copy of it."""
    kept = {key: value for key, value in body.items() if key != "spec"}
    annotations = (kept.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return kept


def audit_text(path: Path) -> str:
    """The audit log as JSON lines, the specs of SecuredEndpoints taken out of their requests and responses."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)
            continue
        if (event.get("objectRef") or {}).get("resource") == api.PLURAL:
            for key in ("requestObject", "responseObject"):
                if isinstance(event.get(key), dict):
                    event[key] = _without_spec(event[key])
        lines.append(json.dumps(event, ensure_ascii=False))
    return "\n".join(lines)


def _operators() -> list[OperatorProcess]:
    unique: list[OperatorProcess] = []
    for process in RECORD.operators:
        if not any(known is process for known in unique):
            unique.append(process)
    return unique


def log_source(process: OperatorProcess) -> str:
    return f"log of the operator {' '.join(process.scope)} ({process.log_path})"


def metrics_source(process: OperatorProcess) -> str:
    return f"/metrics of {process.log_path} now"


def session_texts(kube: Kube, plane: controlplane.ControlPlane) -> dict[str, str]:
    """Every place the session wrote to where no secret may be, by name."""
    texts: dict[str, str] = {}
    for process in _operators():
        texts[log_source(process)] = process.log_text()
        if (scrape := process.metrics()) is not None:
            texts[metrics_source(process)] = scrape
    for index, (what, text) in enumerate(RECORD.snapshots):
        texts[f"{what} (#{index})"] = text
    texts["Redis channels"] = "\n".join(RECORD.channel_messages)
    endpoints = kube.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL)["items"]
    texts["SecuredEndpoints at the end"] = json.dumps([written_by_the_operator(item) for item in endpoints])
    texts["Events at the end"] = json.dumps(
        [event.to_dict() for event in kube.core.list_event_for_all_namespaces().items], default=str)
    texts["Secrets' labels and annotations at the end"] = json.dumps([
        {"name": f"{secret.metadata.namespace}/{secret.metadata.name}", "labels": secret.metadata.labels,
         "annotations": {key: value for key, value in (secret.metadata.annotations or {}).items()
                         if key != "kubectl.kubernetes.io/last-applied-configuration"}}
        for secret in kube.core.list_secret_for_all_namespaces().items])
    texts["audit log"] = audit_text(plane.audit_log_path)
    return texts


def _report(findings: list[leak_scan.Finding]) -> str:
    return f"{len(findings)} leak(s):\n" + "\n".join(str(finding) for finding in findings[:20])


# -- failure paths of its own ----------------------------------------------------------------------------------


def test_no_secret_in_logs_events_or_status(operator: OperatorProcess, kube: Kube, setup: Setup,
                                            token_server: TokenServer, secret_values: set[str]) -> None:
    token_server.configure(lifetime_seconds=3, issue_refresh_tokens=True)
    setup.client(token_server)
    setup.user(token_server)
    setup.endpoint("leak-user", token_server, grantType="Password", passwordSecretRef={"name": "user"})
    setup.endpoint("leak-client", token_server, clientAuthMethod="ClientSecretPost")
    kube.wait_ready(setup.namespace, "leak-user")
    kube.wait_ready(setup.namespace, "leak-client")
    wait_for(lambda: any(r.grant_type == "refresh_token" for r in token_server.requests), timeout=8,
             message="a refresh-token grant")

    for fault, reason in (("invalid_client", "InvalidCredentials"), ("bad_json", "InvalidTokenResponse"),
                          ("html", "InvalidTokenResponse"), ("invalid_grant", "InvalidCredentials")):
        token_server.fault = fault
        kube.patch_endpoint(setup.namespace, "leak-client",
                            {"metadata": {"annotations": {api.REFRESH_ANNOTATION: fault}}})
        kube.wait_ready(setup.namespace, "leak-client", status="False", reason=reason, timeout=10)
    token_server.fault = None
    token_server.revoke_refresh_tokens()
    kube.patch_endpoint(setup.namespace, "leak-user", {"metadata": {"annotations": {
        api.REFRESH_ANNOTATION: "after-revocation"}}})
    kube.wait_ready(setup.namespace, "leak-user", timeout=10)

    used = {value for request in token_server.requests
            for value in (request.access_token, request.refresh_token) if value}
    used |= {issued.access_token for issued in token_server.issued_tokens}
    used |= {value for value in secret_values if value.startswith(("s3cr3t:", "pa55:"))}
    assert len(used) > 5
    log = operator.log_text()
    assert "Fetching a token" in log, "the log must be the operator's, with its refreshes"
    endpoints = kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, setup.namespace, api.PLURAL)
    texts = {"operator log": log, "Events": json.dumps([e.to_dict() for e in kube.events(setup.namespace)],
                                                       default=str),
             "SecuredEndpoints": json.dumps([written_by_the_operator(item) for item in endpoints["items"]])}
    findings = leak_scan.scan(texts, session_needles(used))
    assert not findings, _report(findings)


# -- the scan sees what it claims to ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def witness(control_plane: controlplane.ControlPlane, kube: Kube, tmp_path: Path, redis_access: RedisAccess
            ) -> Iterator[tuple[OperatorProcess, str]]:
    """An operator with Redis and ``/metrics`` for one namespace, named exactly (a namespace pattern would
    depend on the operator discovering a namespace created after its start), and that namespace."""
    namespaces = _namespace(kube, "leakproof")
    namespace = next(namespaces)
    env = {**redis_operator_env(redis_access, tmp_path), "SEP_METRICS_PORT": str(_free_port()),
           "SEP_METRICS_ADDRESS": "127.0.0.1"}
    for process in _operator(control_plane, tmp_path / "witness.log", RECORD.operators,
                             scope=("--namespace", namespace), env=env):
        yield process, namespace
        next(namespaces, None)  # the endpoints released while the operator still runs


def test_a_planted_value_is_found_in_every_source(witness: tuple[OperatorProcess, str], kube: Kube,
                                                  control_plane: controlplane.ControlPlane,
                                                  token_server: TokenServer, secret_values: set[str]) -> None:
    """The endpoint's name is no secret, but the operator repeats it everywhere the scan looks: so a scan for it
    proves that each source is read, through the same code as the session's scan."""
    operator, namespace = witness
    marker = f"planted-{uuid.uuid4().hex[:20]}"
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server)
    setup.endpoint(marker, token_server, target={"secret": {}, "redis": {"enabled": True}})
    kube.wait_ready(namespace, marker)
    wait_for(lambda: any(marker in message for message in RECORD.channel_messages), timeout=5,
             message="the announcement on the session Redis' channel")
    texts = session_texts(kube, control_plane)
    found = {finding.source for finding in leak_scan.scan(texts, leak_scan.needles({marker}))}
    expected = {log_source(operator), metrics_source(operator), "audit log", "Events at the end",
                "SecuredEndpoints at the end", "Redis channels"}
    assert expected - found == set(), f"the scan does not see these sources: {expected - found}"
    assert all(log_source(process) in texts for process in _operators()), "every operator's log is read"


def test_a_secret_planted_in_a_temporary_log_fails_the_session_scan(tmp_path: Path, kube: Kube,
                                                                    control_plane: controlplane.ControlPlane
                                                                    ) -> None:
    """The session's scan, as ``test_the_session_leaked_nothing`` runs it, with one leak planted: a client secret
    of this session, base64-encoded inside a longer blob, in a log line of a temporary file."""
    planted = f"s3cr3t:{uuid.uuid4().hex}&+%"
    blob = base64.b64encode(b"x" + planted.encode() + b"!").decode()
    log = tmp_path / "planted.log"
    log.write_text(f"2026-01-01 00:00:00 [INFO] request body {blob}\n")
    texts = {**session_texts(kube, control_plane), "planted log": log.read_text()}
    findings = leak_scan.scan(texts, session_needles(session_secrets() | {planted}))
    assert [(finding.source, finding.form) for finding in findings] == [("planted log", "base64@1")], \
        _report(findings)


# -- the session's scan --------------------------------------------------------------------------------------


@pytest.mark.runs_last
def test_the_session_leaked_nothing(request: pytest.FixtureRequest, kube: Kube,
                                    control_plane: controlplane.ControlPlane) -> None:
    assert request.session.items[-1] is request.node, "the leak scan must run after every other test"
    secrets = session_secrets()
    assert secrets, "the session used no secret?"
    started = time.monotonic()
    texts = session_texts(kube, control_plane)
    assert '"subresource":"status"' in texts["audit log"].replace(" ", ""), "the audit log has no status write"
    collected = time.monotonic()
    found = session_needles(secrets)
    prepared = time.monotonic()
    findings = leak_scan.scan(texts, found)
    print(f"leak scan: {len(secrets)} secrets ({len(found.infixes)} infixes), {len(texts)} sources "
          f"({sum(map(len, texts.values())) / 2**20:.1f} MiB, audit log {len(texts['audit log']) / 2**20:.1f} MiB, "
          f"{len(_operators())} operator logs); collected in {collected - started:.1f} s, needles "
          f"{prepared - collected:.1f} s, scan {time.monotonic() - prepared:.1f} s")
    assert not findings, _report(findings)
