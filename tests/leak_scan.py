"""Looks for secret values in text, in every form a value can take on its way out (the session's leak scan).

A secret is looked for as
- the raw value, JSON-escaped (Python's ``json.dumps``, Go's ``encoding/json`` — which also writes ``&<>`` as
  ``\\u0026``… — and twice escaped, a JSON string inside a JSON log line), percent-encoded as a form body has it
  (``quote_plus``, ``quote``, upper- and lower-case hex);
- base64 and base64url of each of those raw and percent-encoded forms at each of the three alignments it can
  have inside a larger blob (only the characters that depend on the secret alone), which also covers
  ``Basic base64(id:secret)`` for any client id; with a known client id, that header value as a whole;
- for a secret of ``MIN_INFIX_SECRET`` characters or more, every ``INFIX``-character infix of each form, so a
  truncated or embedded piece is found too. Infixes that are public are left out: those of a JWT's header, those
  that overlap a ``PUBLIC_STRINGS`` entry the secret contains (a ``s3cr3t:`` prefix), those made only of digits
  (numbers are everywhere), those shared by two unrelated secrets (structure, not the secret part) and those in
  a public text (``public_texts``: the repository's sources, where a test's literal "secret" such as
  ``labelled-secret`` is written, and whose words an endpoint or a Secret may be named after). The text is
  searched for infixes with public identifiers masked (UUIDs, ``sha256:`` fingerprints and digests, ``0x``
  addresses), whose hex would otherwise match a hex secret's infix by chance.

:func:`scan` is pure (texts in, findings out), so tests plant leaks and prove it finds them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

INFIX = 8
MIN_INFIX_SECRET = 12
# Strings that are in the code or the protocol, never secret, though secrets contain them: the prefixes the
# tests give their secrets, PEM armour.
PUBLIC_STRINGS = (
    "s3cr3t:", "pa55:", "redis-", "urlpass", "mtx-token-", "client-", "secured-endpoint", "-----BEGIN ",
    "-----END ", "PRIVATE KEY-----", "CERTIFICATE-----",
)
_PUBLIC_IDENTIFIERS = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # UIDs, audit IDs
    r"|sha256:[0-9a-f]+"  # token fingerprints, config digests
    r"|0x[0-9a-f]+")  # object addresses in reprs
_JWT = re.compile(r"^(eyJ[A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)$")
_B64URL = str.maketrans("+/", "-_")


@dataclass(frozen=True)
class Finding:
    source: str  # where the text came from
    form: str  # which form of the secret matched ("raw", "base64@1", "infix of quote_plus", ...)
    secret: str  # the secret, shortened for the message
    excerpt: str  # the text around the match

    def __str__(self) -> str:
        return f"{self.source}: {self.form} of secret {self.secret!r}:\n    …{self.excerpt}…"


def _go_json(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1].replace("&", "\\u0026").replace("<", "\\u003c") \
        .replace(">", "\\u003e").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _lower_percent(value: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda match: match.group().lower(), value)


def base64_cores(data: bytes) -> dict[int, str]:
    """For each alignment (0 to 2 bytes before ``data`` in a larger blob), the base64 characters that depend on
    ``data`` alone (the ones at both ends that mix in neighbouring bytes are cut off)."""
    cores = {}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        total = offset + len(data)
        start = (0, 2, 3)[offset]
        end = 4 * (total // 3) + (0, 1, 2)[total % 3]
        cores[offset] = encoded[start:end]
    return cores


def forms(secret: str, *, client_id: str | None = None) -> dict[str, str]:
    """Every encoding of ``secret`` looked for, by name."""
    text: dict[str, str] = {
        "raw": secret,
        "JSON-escaped": json.dumps(secret)[1:-1],
        "JSON-escaped (UTF-8)": json.dumps(secret, ensure_ascii=False)[1:-1],
        "JSON-escaped (Go)": _go_json(secret),
        "JSON-escaped twice": json.dumps(json.dumps(secret)[1:-1])[1:-1],
        "quote_plus": urllib.parse.quote_plus(secret),
        "quote": urllib.parse.quote(secret, safe=""),
    }
    text["quote_plus (lower-case hex)"] = _lower_percent(text["quote_plus"])
    text["quote (lower-case hex)"] = _lower_percent(text["quote"])
    found = dict(text)
    for name in ("raw", "quote_plus", "quote"):
        for offset, core in base64_cores(text[name].encode()).items():
            suffix = "" if name == "raw" else f" of {name}"
            found[f"base64@{offset}{suffix}"] = core
            found[f"base64url@{offset}{suffix}"] = core.translate(_B64URL)
    if client_id is not None:
        # the credentials of an Authorization header (without "Basic ", so that it is one word of the text)
        for name, pair in (("Basic base64(id:secret)", f"{client_id}:{secret}"),
                           ("Basic base64(form-encoded id:secret)", f"{urllib.parse.quote_plus(client_id)}:"
                                                                    f"{urllib.parse.quote_plus(secret)}")):
            found[name] = base64.b64encode(pair.encode()).decode()
    # a form shorter than 4 characters would match everywhere (a base64 core of a 1-character secret)
    return {name: form for name, form in found.items() if len(form) >= 4}


def _infix_source(secret: str) -> str:
    """The part of ``secret`` whose infixes are secret: a JWT's header is public."""
    match = _JWT.match(secret)
    if match is None:
        return secret
    try:
        header = base64.urlsafe_b64decode(match.group(1) + "=" * (-len(match.group(1)) % 4))
        if not json.loads(header).get("alg"):
            return secret
    except (ValueError, binascii.Error, AttributeError):
        return secret
    return f"{match.group(2)}.{match.group(3)}"


def secret_parts(secret: str, public_strings: Iterable[str] = PUBLIC_STRINGS) -> list[str]:
    """The pieces of ``secret`` whose infixes are secret: a JWT without its header, cut at the public strings it
    contains; pieces shorter than ``INFIX`` have no infix."""
    public = sorted(set(public_strings), key=len, reverse=True)
    source = _infix_source(secret)
    parts = re.split("|".join(map(re.escape, public)), source) if public else [source]
    return [part for part in parts if len(part) >= INFIX]


def repository_texts(root: Path) -> list[str]:
    """The repository's sources and documents: public texts for :func:`needles`."""
    folders = ("operator", "gateway", "devenv", "tests", "docs", "examples", "crds", "manifests", "charts",
               "benchmarks")
    return [path.read_text(errors="replace") for folder in folders for path in sorted((root / folder).rglob("*"))
            if path.suffix in (".py", ".md", ".yaml", ".yml", ".json", ".lua", ".tpl") and path.is_file()]


def windows(text: str, width: int = INFIX) -> set[str]:
    return {text[index:index + width] for index in range(len(text) - width + 1)}


# Text is cut into words at these characters (none is in a secret the session uses; a secret that has one is
# looked for in the whole text instead), so that repeated words are searched once.
_DELIMITERS = re.compile(r"[\s\"',{}\[\]()<>=;|`]+")


@dataclass
class Needles:
    """What :func:`scan` looks for: whole forms (by their first ``INFIX`` characters, or whole when shorter or
    cut by a delimiter) and infixes, each mapped to the secret and form it comes from."""

    whole: dict[str, list[tuple[str, str, str]]]  # first INFIX characters -> [(form, secret, form name)]
    anywhere: list[tuple[str, str, str]]  # (form, secret, form name) searched in the whole text
    infixes: dict[str, tuple[str, str]]  # infix -> (secret, "infix of <form name>")


def _groups(secrets: list[str]) -> dict[str, int]:
    """Related secrets (one contains the other, e.g. a value and the value with a newline) share a group: an
    infix shared within a group is no sign of public structure."""
    group: dict[str, int] = {}
    ordered = sorted(secrets, key=len)
    for index, secret in enumerate(ordered):
        group[secret] = next((group[shorter] for shorter in ordered[:index] if shorter in secret), index)
    return group


def needles(secrets: Iterable[str], *, client_ids: Mapping[str, str] | None = None,
            public_strings: Iterable[str] = PUBLIC_STRINGS, public_texts: Iterable[str] = ()) -> Needles:
    """The needles for ``secrets`` (``client_ids``: secret -> its client id, for the Basic header)."""
    client_ids = client_ids or {}
    public_strings = tuple(public_strings)
    chosen = sorted({secret for secret in secrets if len(secret.strip()) >= 4})
    whole: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    anywhere: list[tuple[str, str, str]] = []
    for secret in chosen:
        seen: set[str] = set()
        for name, form in forms(secret, client_id=client_ids.get(secret)).items():
            if form in seen:
                continue
            seen.add(form)
            if len(form) < INFIX or _DELIMITERS.search(form):
                anywhere.append((form, secret, name))
            else:
                whole[form[:INFIX]].append((form, secret, name))
    group = _groups(chosen)
    owners: dict[str, set[int]] = defaultdict(set)
    candidates: dict[str, tuple[str, str]] = {}
    for secret in chosen:
        if len(secret) < MIN_INFIX_SECRET:
            continue
        for part in secret_parts(secret, public_strings):
            for name, form in forms(part).items():
                for infix in windows(form):
                    owners[infix].add(group[secret])
                    candidates.setdefault(infix, (secret, f"infix of {name}"))
    public = {infix for text in public_texts for line in text.splitlines() if len(line) >= INFIX
              for infix in windows(line) & candidates.keys()}
    infixes = {infix: origin for infix, origin in candidates.items()
               if len(owners[infix]) == 1 and infix not in public and not infix.isdigit()
               and not _DELIMITERS.search(infix) and _PUBLIC_IDENTIFIERS.sub("", infix) == infix}
    return Needles(whole=dict(whole), anywhere=anywhere, infixes=infixes)


def _shorten(secret: str) -> str:
    return secret if len(secret) <= 12 else f"{secret[:6]}…{secret[-4:]} ({len(secret)} characters)"


def _excerpt(text: str, piece: str) -> str:
    start = max(text.find(piece), 0)
    return text[max(0, start - 120): start + len(piece) + 120].replace("\n", "⏎")


def _mask(word: str) -> str:
    return _PUBLIC_IDENTIFIERS.sub(lambda match: "\0" * len(match.group()), word)


def scan(texts: Mapping[str, str], found: Needles) -> list[Finding]:
    """Every secret in ``texts`` (source name -> text), in any form; at most one finding per source and secret
    (the longest whole form that matched, else an infix)."""
    return [finding for source, text in texts.items() for finding in _scan_one(source, text, found)]


def _scan_one(source: str, text: str, found: Needles) -> list[Finding]:
    hits: dict[str, tuple[str, str]] = {}  # secret -> (form name, matched text)
    infix_hits: dict[str, tuple[str, str]] = {}

    def hit(secret: str, name: str, form: str) -> None:
        if len(form) > len(hits.get(secret, ("", ""))[1]):  # the longest form that matched says most
            hits[secret] = (name, form)

    for form, secret, name in found.anywhere:
        if form in text:
            hit(secret, name, form)
    for word in set(_DELIMITERS.split(text)):
        if len(word) < INFIX:
            continue
        for first in windows(word) & found.whole.keys():
            for form, secret, name in found.whole[first]:
                if form in word:
                    hit(secret, name, form)
        for infix in windows(_mask(word)) & found.infixes.keys():
            secret, name = found.infixes[infix]
            infix_hits.setdefault(secret, (name, infix))
    return [Finding(source, name, _shorten(secret), _excerpt(text, piece))
            for secret, (name, piece) in {**infix_hits, **hits}.items()]
