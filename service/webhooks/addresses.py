"""Webhook receivers must be public addresses: checked at submit and again at every delivery.

The URL's host must resolve only to public addresses (no loopback, private, link-local such as
cloud metadata at 169.254.169.254, multicast or reserved). `FTUNE_WEBHOOK_ALLOW_PRIVATE=true`
lifts the rule for installations whose receivers live on the private network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable
from typing import Any

import msgspec

from service.logs import redact

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


DNS_TIMEOUT_SECONDS = 5.0


class UnsafeWebhookURL(ValueError):
    """The URL is malformed or its host is not a public address: never retried."""


class UnresolvableHost(ValueError):
    """The host did not resolve (at submit: refused; at delivery: retried)."""


_ALLOW_HINT = (
    "webhooks go only to public addresses (an operator can set "
    "FTUNE_WEBHOOK_ALLOW_PRIVATE=true to allow private ones)"
)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _why_not_public(ip: IPAddress) -> str | None:
    """Why an address is not a public one, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = _why_not_public(embedded)
            return f"{why} (embedded in {ip})" if why else None
    checks = (
        ("is_unspecified", "the unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    )
    for attr, why in checks:
        if getattr(ip, attr):
            return why
    return None if ip.is_global else "not a public address"


class Target(msgspec.Struct, frozen=True):
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _parse(url: str) -> tuple[str, str, int]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookURL(f"webhook_url {redact(url)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookURL(f"webhook_url must be http:// or https://, got {redact(url)!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeWebhookURL(f"webhook_url {redact(url)!r} has no host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _check(host: str, port: int, infos: Iterable[Any], *, allow_private: bool) -> list[str]:
    addresses: list[str] = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        ip = ipaddress.ip_address(text)
        why = None if allow_private else _why_not_public(ip)
        if why is not None:
            is_literal = text == host.strip("[]")
            where = f"is {why}" if is_literal else f"resolves to {ip}, {why}"
            raise UnsafeWebhookURL(f"webhook_url host {host!r} {where}; {_ALLOW_HINT}")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise UnresolvableHost(f"webhook_url host {host!r} has no address")
    return addresses


def _localhost(host: str, allow_private: bool) -> None:
    # RFC 6761: *.localhost is loopback whatever a resolver says.
    if not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise UnsafeWebhookURL(f"webhook_url host {host!r} is a loopback name; {_ALLOW_HINT}")


def _unresolvable(host: str, exc: BaseException) -> UnresolvableHost:
    return UnresolvableHost(
        f"webhook_url host {host!r} does not resolve ({exc}); check the name, or that the "
        "API can reach DNS"
    )


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a webhook URL whose host is not public (every address it resolves to must be).

    Raises ValueError (UnsafeWebhookURL or UnresolvableHost) with a message for the user.
    Blocking (DNS); from async code use `check_url_async`.
    """
    _scheme, host, port = _parse(url)
    _localhost(host, allow_private)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _unresolvable(host, exc) from None
    _check(host, port, infos, allow_private=allow_private)


async def resolve(url: str, *, allow_private: bool) -> Target:
    scheme, host, port = _parse(url)
    _localhost(host, allow_private)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DNS_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError) as exc:
        raise _unresolvable(host, exc) from None
    addresses = _check(host, port, infos, allow_private=allow_private)
    return Target(scheme=scheme, host=host, port=port, addresses=tuple(addresses))


async def check_url_async(url: str, *, allow_private: bool) -> None:
    """`check_url` without blocking the event loop (DNS limited to 5 s)."""
    await resolve(url, allow_private=allow_private)
