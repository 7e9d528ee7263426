"""Namespace patterns (secured_endpoint.sources.namespace_matches) agree with kopf's own matching, so the
Secrets watched are exactly those of the namespaces whose SecuredEndpoints kopf delivers.

Covers: plain globs, several patterns, negations with and without a leading inclusive glob, re-inclusion, and
names that match nothing."""

from __future__ import annotations

import pytest
from kopf._cogs.structs import references

from secured_endpoint.sources import namespace_matches

PATTERNS = [
    ["t-*"], ["team-a", "team-b"], ["myapp-*, !*-pr-*, *pr-123"], ["!*-pr-*, *pr-123"], ["!kube-*"],
    ["a?c"], ["*"], ["p-*", "!p-x"], ["p-*,!p-x"],
]
NAMES = ["t-1", "team-a", "team-c", "myapp-test", "myapp-pr-123", "myapp-pr-456", "otherapp-pr-123",
         "kube-system", "default", "abc", "abbc", "p-x", "p-y"]


@pytest.mark.parametrize("patterns", PATTERNS, ids=lambda p: "|".join(p))
def test_same_as_kopf(patterns: list[str]) -> None:
    for name in NAMES:
        expected = any(references.match_namespace(name, pattern) for pattern in patterns)
        assert namespace_matches(name, patterns) is expected, name


def test_examples() -> None:
    assert namespace_matches("myapp-pr-123", ["myapp-*, !*-pr-*, *pr-123"])
    assert not namespace_matches("otherapp-pr-123", ["myapp-*, !*-pr-*, *pr-123"])
    assert namespace_matches("otherapp-pr-123", ["!*-pr-*, *pr-123"])
    assert not namespace_matches("kube-system", ["!kube-*"])
