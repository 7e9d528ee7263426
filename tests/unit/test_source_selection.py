"""What kopf is told to list and watch: ``SEP_SOURCE_LABEL_SELECTOR`` and the namespace-scoped mode.

Cases:
- the selector setting: ``key=value[,key=value]`` (``==`` too) is normalised; set-based requirements, bare
  keys, empty values, bad keys and values, and a key given twice are refused naming the setting;
- ``configure_watches`` puts the selector on core Secrets and ConfigMaps only — not on SecuredEndpoints, not
  on a same-named resource of another API group — and nowhere when the setting is empty;
- kopf 1.45 itself sends it: the URL of its initial LIST (paged) and of its WATCH carry ``labelSelector``
  (kopf's own request code, with the HTTP call replaced), so the filtering happens in the apiserver;
- kopf observes namespaces and CRDs cluster-wide only for ``--all-namespaces`` or namespace patterns;
- the label-mode index answers for a referenced source it cannot see with the version the endpoint's status
  recorded (no refetch loop) and says once which label to add; in the default mode a source missing from
  the index is missing; ``unwatched_hint`` words the same for a status message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kopf
import pytest
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import fetching, watching
from kopf._cogs.structs import references

from secured_endpoint import api
from secured_endpoint.settings import OperatorSettings, SettingsError, load_settings, parse_label_selector
from secured_endpoint.wiring import KopfIndexes, configure_watches

SELECTOR = "secured-endpoint.io/credentials=true"
SECRETS = references.Resource("", "v1", "secrets", kind="Secret", namespaced=True, preferred=True)
CONFIGMAPS = references.Resource("", "v1", "configmaps", kind="ConfigMap", namespaced=True, preferred=True)
ENDPOINTS = references.Resource(api.GROUP, api.VERSION, api.PLURAL, kind=api.KIND, namespaced=True,
                                preferred=True)
OTHER_SECRETS = references.Resource("vault.example.com", "v1", "secrets", kind="Secret", namespaced=True,
                                    preferred=True)


# -- the setting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "normalised"), [
    ("", ""),
    (SELECTOR, SELECTOR),
    (" secured-endpoint.io/credentials == true , team=a ", f"{SELECTOR},team=a"),
    ("a=b,a=b", "a=b"),
])
def test_equality_selectors_are_accepted(given: str, normalised: str) -> None:
    settings = load_settings({"SEP_SOURCE_LABEL_SELECTOR": given})
    assert settings.source_label_selector == normalised
    assert settings.source_labels == parse_label_selector(normalised)


@pytest.mark.parametrize(("given", "message"), [
    ("tier in (a,b)", "only equality requirements"),
    ("a!=b", "only equality requirements"),
    ("!a", "only equality requirements"),
    ("a", "only equality requirements"),
    ("a=", "only equality requirements"),
    ("Not A Key=x", "not a valid label key"),
    ("Example.COM/a=b", "not a valid label key"),
    ("a=" + "v" * 64, "not a valid label value"),
    ("a=-x", "not a valid label value"),
    ("a=b,a=c", "given twice"),
])
def test_other_selectors_are_refused_naming_the_setting(given: str, message: str) -> None:
    with pytest.raises(SettingsError, match="SEP_SOURCE_LABEL_SELECTOR") as raised:
        load_settings({"SEP_SOURCE_LABEL_SELECTOR": given})
    assert message in str(raised.value)


# -- what kopf is configured with and sends ---------------------------------------------------------------


def _configured(selector: str, *, clusterwide: bool = True, namespaces: tuple[str, ...] = ()) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure_watches(settings, OperatorSettings(source_label_selector=selector), clusterwide=clusterwide,
                      namespaces=namespaces)
    return settings


def test_selector_applies_to_core_secrets_and_configmaps_only() -> None:
    selectors = _configured(SELECTOR).watching.label_selectors
    assert selectors.collect(SECRETS) == [SELECTOR]
    assert selectors.collect(CONFIGMAPS) == [SELECTOR]
    assert selectors.collect(ENDPOINTS) == []
    assert selectors.collect(OTHER_SECRETS) == []
    assert len(_configured("").watching.label_selectors) == 0


def test_kopf_sends_the_selector_on_its_list_and_watch_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _configured(SELECTOR)
    settings.watching.chunk_size = 500
    urls: list[str] = []

    async def get(url: str, **_: Any) -> dict[str, Any]:
        urls.append(url)
        return {"items": [], "metadata": {"resourceVersion": "1", "continue": ""}}

    async def stream(url: str, **_: Any) -> Any:
        urls.append(url)
        return
        yield

    monkeypatch.setattr(kopf_api, "get", get)
    monkeypatch.setattr(kopf_api, "stream", stream)

    async def main() -> None:
        logger = logging.getLogger("test")
        for resource in (SECRETS, CONFIGMAPS, ENDPOINTS):
            async for _ in fetching.fetch_objs(settings=settings, resource=resource, namespace="team-a",
                                               logger=logger):
                pass
            async for _ in watching.watch_objs(settings=settings, resource=resource, namespace="team-a",
                                               since="1", operator_pause_waiter=asyncio.Future()):
                pass

    asyncio.run(main())
    queries = [(urlsplit(url).path, parse_qs(urlsplit(url).query)) for url in urls]
    assert [path for path, _ in queries] == [
        "/api/v1/namespaces/team-a/secrets", "/api/v1/namespaces/team-a/secrets",
        "/api/v1/namespaces/team-a/configmaps", "/api/v1/namespaces/team-a/configmaps",
        f"/apis/{api.GROUP}/{api.VERSION}/namespaces/team-a/{api.PLURAL}",
        f"/apis/{api.GROUP}/{api.VERSION}/namespaces/team-a/{api.PLURAL}",
    ]
    for _, query in queries[:4]:
        assert query["labelSelector"] == [SELECTOR]
    for _, query in queries[4:]:
        assert "labelSelector" not in query
    assert queries[0][1]["limit"] == ["500"]  # the initial LIST is paged
    assert queries[1][1]["watch"] == ["true"]


@pytest.mark.parametrize(("clusterwide", "namespaces", "scanning"), [
    (True, (), True),
    (False, ("team-a",), False),
    (False, ("team-a", "team-b"), False),
    (False, ("team-a", "team-*"), True),
    (False, ("team-?",), True),
    (False, ("!kube-system",), True),
    (False, ("team-a,team-b",), True),
])
def test_cluster_scoped_observation_only_when_needed(clusterwide: bool, namespaces: tuple[str, ...],
                                                     scanning: bool) -> None:
    settings = _configured("", clusterwide=clusterwide, namespaces=namespaces)
    assert settings.scanning.disabled is not scanning


# -- the index in label mode -------------------------------------------------------------------------------


class FakeIndex(dict[Any, Any]):
    """kopf.Index's read side: key -> a store of values."""


def _endpoint(versions: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "orders"}, "status": {"sourceVersions": versions}}


def test_label_mode_answers_for_unwatched_sources_from_the_status(caplog: pytest.LogCaptureFixture) -> None:
    secrets = FakeIndex({("team-a", "labelled"): ["7"]})
    indexes = KopfIndexes(secrets, FakeIndex(), FakeIndex(), source_labels={"secured-endpoint.io/credentials": "true"})
    plain, labelled = api.SourceRef("Secret", "plain"), api.SourceRef("Secret", "labelled")
    assert indexes.source_version("team-a", plain) is None  # never recorded: unknown
    with caplog.at_level(logging.WARNING):
        indexes.learn(_endpoint({"Secret/plain": "5", "Secret/labelled": "7", "ConfigMap/ca": "9"}))
        indexes.learn(_endpoint({"Secret/plain": "6", "Secret/labelled": "7", "ConfigMap/ca": "9"}))
    assert indexes.source_version("team-a", plain) == "6"  # the last version a GET saw
    assert indexes.source_version("team-a", api.SourceRef("ConfigMap", "ca")) == "9"
    assert indexes.source_version("team-a", labelled) == "7"  # the watch knows it: the watch answers
    hints = [record.getMessage() for record in caplog.records]
    assert len(hints) == 2, "once per source"
    assert "kubectl label -n team-a secret plain secured-endpoint.io/credentials=true" in hints[0]
    assert "kubectl label -n team-a configmap ca secured-endpoint.io/credentials=true" in hints[1]
    secrets[("team-a", "plain")] = ["8"]  # labelled now: the watch answers
    assert indexes.source_version("team-a", plain) == "8"


def test_default_mode_takes_a_missing_source_for_missing() -> None:
    indexes = KopfIndexes(FakeIndex(), FakeIndex(), FakeIndex())
    indexes.learn(_endpoint({"Secret/plain": "5"}))
    assert indexes.source_version("team-a", api.SourceRef("Secret", "plain")) is None


def test_the_status_hint_names_the_unwatched_sources() -> None:
    secrets = FakeIndex({("team-a", "labelled"): ["7"]})
    indexes = KopfIndexes(secrets, FakeIndex(), FakeIndex(), source_labels={"secured-endpoint.io/credentials": "true"})
    labelled, plain, ca = (api.SourceRef("Secret", "labelled"), api.SourceRef("Secret", "plain"),
                           api.SourceRef("ConfigMap", "ca"))
    assert indexes.unwatched_hint("team-a", [labelled]) is None
    assert indexes.unwatched_hint("team-a", [labelled, plain]) == (
        "Secret/plain not labelled secured-endpoint.io/credentials=true: a change to it is picked up at the next "
        "refresh, not at once")
    assert indexes.unwatched_hint("team-a", [ca, plain]).startswith("ConfigMap/ca, Secret/plain not labelled")
    assert KopfIndexes(FakeIndex(), FakeIndex(), FakeIndex()).unwatched_hint("team-a", [plain]) is None
