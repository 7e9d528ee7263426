"""Which HTTP proxy a token request goes through: the endpoint's own (``spec.proxy``), else the operator's
environment (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` with ``NO_PROXY``), else none.

The decision is made here, once, for every request — not left to httpx's own environment handling — so
that it is explicit, testable and the same in every message. Environment rules, as curl and most tools:

- lower-case names win over upper-case ones; ``https_proxy`` for https token URLs, ``http_proxy`` for
  http ones, ``all_proxy`` for either when the specific one is unset;
- a proxy URL without a scheme is ``http://``; ``user:password@`` in it becomes Proxy-Authorization and
  never appears in a message;
- ``NO_PROXY`` is a comma-separated list of ``*`` (no proxy at all), host names (``example.com`` and
  ``.example.com`` both match ``example.com`` and every name below it; ``*.example.com`` likewise), IP
  addresses, CIDR ranges (``10.0.0.0/8``, ``fd00::/8``), each optionally with ``:port``. Names are not
  resolved: ``localhost`` does not match ``127.0.0.1``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import SecretStr

from secured_endpoint.tokens.errors import TokenRequestFailedError

ENVIRONMENT_NAMES = ("https_proxy", "http_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class ProxyConfig:
    """One proxy. ``url`` is ``scheme://host:port`` without credentials; ``source`` says where it came from
    (``spec.proxy.url``, ``HTTPS_PROXY``...), for messages."""

    url: str
    username: str | None = None
    password: SecretStr | None = None
    source: str = "spec.proxy.url"

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ValueError("a proxy URL is http(s)://host[:port], without credentials")
        if (self.username is None) != (self.password is None):
            raise ValueError("proxy credentials need both a username and a password")

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    @property
    def label(self) -> str:
        """``proxy 10.0.0.1:3128 (spec.proxy.url)`` — what messages call it."""
        return f"proxy {self.address} ({self.source})"

    @property
    def pool_key(self) -> str:
        """Tells apart proxies and proxy identities without revealing the password."""
        identity = ""
        if self.username is not None and self.password is not None:
            material = f"{self.username}\0{self.password.get_secret_value()}".encode()
            identity = "#" + hashlib.sha256(material).hexdigest()[:32]
        return self.url + identity

    def secret_values(self) -> list[str]:
        return [self.password.get_secret_value()] if self.password is not None else []

    def httpx_proxy(self, ssl_context: ssl.SSLContext | None = None) -> httpx.Proxy:
        """``ssl_context`` verifies an https proxy's own certificate (httpcore refuses one for http)."""
        auth = (self.username, self.password.get_secret_value()) if self.username and self.password else None
        if self.url.startswith("https:") and ssl_context is not None:
            return httpx.Proxy(self.url, auth=auth, ssl_context=ssl_context)
        return httpx.Proxy(self.url, auth=auth)


def environment_snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The proxy variables of the environment (both cases), for ``environment_proxy``."""
    source = os.environ if environ is None else environ
    names = {*ENVIRONMENT_NAMES, *(name.upper() for name in ENVIRONMENT_NAMES)}
    return {name: value for name, value in source.items() if name in names}


def _lookup(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for candidate in (name, name.upper()):
        value = environ.get(candidate, "").strip()
        if value:
            return candidate, value
    return None


def environment_proxy(token_url: str, environ: Mapping[str, str]) -> ProxyConfig | None:
    """The proxy the environment names for ``token_url``, or None (no variable, or NO_PROXY matches)."""
    url = httpx.URL(token_url)
    scheme = url.scheme
    if scheme not in ("http", "https"):
        return None
    found = _lookup(environ, f"{scheme}_proxy") or _lookup(environ, "all_proxy")
    if found is None:
        return None
    no_proxy = _lookup(environ, "no_proxy")
    port = url.port or (443 if scheme == "https" else 80)
    if no_proxy is not None and no_proxy_matches(url.host, port, no_proxy[1]):
        return None
    name, value = found
    return parse_environment_proxy(value, source=name.upper())


def parse_environment_proxy(value: str, *, source: str) -> ProxyConfig:
    """A proxy URL from the environment; refused (permanently) when it is not an http(s) proxy."""
    text = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise TokenRequestFailedError(f"{source} is not a valid proxy URL", permanent=True) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TokenRequestFailedError(f"{source} is not an http:// or https:// proxy URL", permanent=True)
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    username = unquote(parts.username) if parts.username is not None else None
    password = SecretStr(unquote(parts.password or "")) if username is not None else None
    return ProxyConfig(url=f"{parts.scheme.lower()}://{netloc}", username=username, password=password,
                       source=source)


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``host:port`` is exempt from the proxy by a NO_PROXY value (rules in the module doc)."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        try:
            entry_address = ipaddress.ip_address(entry)
        except ValueError:
            entry_address = None
        if entry_address is not None:
            if address is not None and address == entry_address:
                return True
            continue
        domain = entry.removeprefix("*").lstrip(".").rstrip(".")
        if domain and address is None and (host == domain or host.endswith("." + domain)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port or [v6]
        closing = entry.find("]")
        inner, rest = entry[1:closing], entry[closing + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            return inner, int(rest[1:])
        return inner, None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None
