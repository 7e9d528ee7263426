"""Which Secrets and ConfigMaps the operator sees: ``SEP_SOURCE_LABEL_SELECTOR``, namespace scopes, and the
controller's view of sources it cannot see.

Cases:
- the selector setting: ``key=value[,key=value]`` (``==`` too) is normalised; set-based requirements, bare
  keys, empty values, bad keys and values, and a key given twice are refused naming the setting;
- kopf observes namespaces and CRDs cluster-wide only for ``--all-namespaces`` or namespace patterns;
- the view in label mode answers for a referenced source the cache cannot see with the version the endpoint's
  status recorded (no refetch loop) and says once which label to add; the same for a namespace whose watch is
  refused; in the default mode a source missing from the cache is missing; ``unwatched_hint`` words the same
  for a status message;
- a namespace scope of patterns adds the namespaces that match as they come and go, and the barrier of the
  cache falls only once they are listed; an endpoint's namespace waits until its Secrets are listed.
(The selector reaching the apiserver on the LIST and WATCH is tested against the real one in
``tests/e2e/test_metadata_watch.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from secured_endpoint import api, kube, sources
from secured_endpoint.settings import SettingsError, load_settings, parse_label_selector
from secured_endpoint.wiring import configure_watches

SELECTOR = "secured-endpoint.io/credentials=true"
LABELS = {"secured-endpoint.io/credentials": "true"}


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
    settings = kopf.OperatorSettings()
    configure_watches(settings, clusterwide=clusterwide, namespaces=namespaces)
    assert settings.scanning.disabled is not scanning


# -- the view over the cache -------------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[kube.KubeClient]:
    # never used for a request: these tests feed the watches' sinks directly
    instance = kube.KubeClient(kube.Credentials(server="https://127.0.0.1:9", tls=ssl.create_default_context()))
    yield instance
    asyncio.run(instance.aclose())


def _meta(namespace: str, name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": rv}}


def _listed(cache: sources.MetadataCache, resource: str, *items: dict[str, Any], namespace: str | None = None
            ) -> None:
    (watch,) = [w for w in cache.watches if w.resource == resource and w.namespace == namespace]
    watch.sink.list_started()
    watch.sink.list_page(list(items))
    watch.sink.list_done("100")


def _endpoint(versions: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "orders"}, "status": {"sourceVersions": versions}}


def test_label_mode_answers_for_unwatched_sources_from_the_status(client: kube.KubeClient,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = sources.MetadataCache(client, label_selector=SELECTOR)
    _listed(cache, "secrets", _meta("team-a", "labelled", "7"))
    _listed(cache, "configmaps")
    view = sources.SourceView(cache, source_labels=LABELS)
    plain, labelled = api.SourceRef("Secret", "plain"), api.SourceRef("Secret", "labelled")
    assert view.source_version("team-a", plain) is None  # never recorded: unknown
    with caplog.at_level(logging.WARNING):
        view.learn(_endpoint({"Secret/plain": "5", "Secret/labelled": "7", "ConfigMap/ca": "9"}))
        view.learn(_endpoint({"Secret/plain": "6", "Secret/labelled": "7", "ConfigMap/ca": "9"}))
    assert view.source_version("team-a", plain) == "6"  # the last version a GET saw
    assert view.source_version("team-a", api.SourceRef("ConfigMap", "ca")) == "9"
    assert view.source_version("team-a", labelled) == "7"  # the watch knows it: the watch answers
    hints = [record.getMessage() for record in caplog.records]
    assert len(hints) == 2, "once per source"
    assert "kubectl label -n team-a secret plain secured-endpoint.io/credentials=true" in hints[0]
    assert "kubectl label -n team-a configmap ca secured-endpoint.io/credentials=true" in hints[1]
    (watch,) = [w for w in cache.watches if w.resource == "secrets"]
    watch.sink.watch_event("ADDED", _meta("team-a", "plain", "8"))  # labelled now: the watch answers
    assert view.source_version("team-a", plain) == "8"


def test_default_mode_takes_a_missing_source_for_missing(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client)
    _listed(cache, "secrets")
    _listed(cache, "configmaps")
    view = sources.SourceView(cache)
    view.learn(_endpoint({"Secret/plain": "5"}))
    assert view.source_version("team-a", api.SourceRef("Secret", "plain")) is None


def test_a_refused_namespace_answers_from_the_status(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, namespaces=["team-a"])
    (secrets,) = [w for w in cache.watches if w.resource == "secrets"]
    secrets.sink.failed(kube.KubeError(403, "Forbidden", "no"))
    _listed(cache, "configmaps", namespace="team-a")
    assert cache.synced.is_set(), "a refused watch holds no barrier"
    view = sources.SourceView(cache)
    view.learn(_endpoint({"Secret/plain": "5"}))
    assert view.source_version("team-a", api.SourceRef("Secret", "plain")) == "5"


def test_the_status_hint_names_the_unwatched_sources(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, label_selector=SELECTOR)
    _listed(cache, "secrets", _meta("team-a", "labelled", "7"))
    view = sources.SourceView(cache, source_labels=LABELS)
    labelled, plain, ca = (api.SourceRef("Secret", "labelled"), api.SourceRef("Secret", "plain"),
                           api.SourceRef("ConfigMap", "ca"))
    assert view.unwatched_hint("team-a", [labelled]) is None
    assert view.unwatched_hint("team-a", [labelled, plain]) == (
        "Secret/plain not labelled secured-endpoint.io/credentials=true: a change to it is picked up at the next "
        "refresh, not at once")
    hint = view.unwatched_hint("team-a", [ca, plain])
    assert hint is not None
    assert hint.startswith("ConfigMap/ca, Secret/plain not labelled")
    assert sources.SourceView(cache).unwatched_hint("team-a", [plain]) is None


def test_a_pattern_scope_follows_the_namespaces(client: kube.KubeClient) -> None:
    async def main() -> None:
        cache = sources.MetadataCache(client, namespaces_to_come=True)
        scope = sources.NamespaceScope(client, cache, ["team-*"])
        waiter = asyncio.ensure_future(cache.wait_synced("team-b"))
        scope.list_started()
        scope.list_page([{"metadata": {"name": name}} for name in ("team-a", "default", "team-c")])
        scope.list_done("5")
        assert {w.namespace for w in cache.watches} == {"team-a", "team-c"}
        assert not cache.synced.is_set(), "listed namespaces, not yet their Secrets"
        for namespace in ("team-a", "team-c"):
            _listed(cache, "secrets", namespace=namespace)
            _listed(cache, "configmaps", namespace=namespace)
        assert cache.synced.is_set()
        await asyncio.sleep(0)
        assert not waiter.done(), "team-b does not exist yet"
        scope.watch_event("ADDED", {"metadata": {"name": "team-b"}})
        scope.watch_event("ADDED", {"metadata": {"name": "other"}})
        assert {w.namespace for w in cache.watches} == {"team-a", "team-b", "team-c"}
        await asyncio.sleep(0)
        assert not waiter.done(), "team-b's Secrets are not listed yet"
        _listed(cache, "secrets", _meta("team-b", "oauth", "3"), namespace="team-b")
        _listed(cache, "configmaps", namespace="team-b")
        await asyncio.wait_for(waiter, 1)
        assert cache.source_version("team-b", "Secret", "oauth") == "3"
        scope.watch_event("DELETED", {"metadata": {"name": "team-b"}})
        assert cache.source_version("team-b", "Secret", "oauth") is None
        assert {w.namespace for w in cache.watches} == {"team-a", "team-c"}

    asyncio.run(main())
