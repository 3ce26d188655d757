"""Which network addresses task image URLs may reach: the SSRF guard.

Task data comes from whoever can import tasks into Label Studio, and the backend fetches every
URL in it. So by default it refuses loopback, private, link-local, cloud-metadata and other
non-public addresses. The check runs where the connection is made — after DNS resolution,
on the address actually connected to, for every redirect hop — so a public name that resolves
(or later re-resolves) to 127.0.0.1 is refused too.

Allowed anyway: the Label Studio host, and what IMAGE_URL_ALLOWLIST names (hostnames, IPs or
CIDR ranges, e.g. `minio.internal,10.20.0.0/16`). A Label Studio named only by a /setup request
is trusted for that project's requests to its own origin (scheme, host, port) and nothing else:
the fetcher sends those through a separate client whose policy (`for_label_studio`) admits
private addresses but never cloud metadata or link-local ones.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from .errors import ImageRefused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA = frozenset(map(ipaddress.ip_address, (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, Hetzner…
    "fd00:ec2::254",     # AWS, over IPv6
    "169.254.170.2",     # AWS ECS task metadata and credentials
    "169.254.170.23",    # AWS EKS Pod Identity agent (credentials)
    "fd00:ec2::23",      # AWS EKS Pod Identity agent, over IPv6
    "fd20:ce::254",      # Google Cloud, over IPv6
    "168.63.129.16",     # Azure WireServer (a public-looking address)
    "100.100.100.200",   # Alibaba Cloud
    "169.254.0.23",      # Tencent Cloud
    "169.254.42.42",     # Scaleway
    "fd00:42::42",       # Scaleway, over IPv6
    "fd00:a9fe:a9fe::1",  # Akamai (Linode), over IPv6
    "192.0.0.192",       # Oracle Cloud (legacy)
)))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
"""IPv6 addresses that a NAT64 gateway translates to the IPv4 address in their last 32 bits."""
NEVER_FOR_LABEL_STUDIO = frozenset({"a cloud metadata address", "link-local"})
"""Refusals that even a Label Studio host named in /setup does not lift."""


def refusal(address: Address) -> str | None:
    """Why `address` is off limits for task URLs, or None for a public address.

    A pure function on a literal address: tests check it without connecting anywhere."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    elif address in NAT64:
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in METADATA:
        return "a cloud metadata address"
    for attribute, reason in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                              ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                              ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(address, attribute):
            return reason
    return None if address.is_global else "not publicly routable"


@dataclass
class AddressPolicy:
    """Refuse non-public addresses, except allowed hosts and networks."""

    hosts: set[str] = field(default_factory=set)
    networks: tuple[Network, ...] = ()
    label_studio: bool = False
    """A policy for requests to a project's own Label Studio origin only (the caller checks the
    origin): private addresses pass too, cloud metadata and link-local ones never do."""

    @classmethod
    def parse(cls, allowlist: str, hosts: Iterable[str] = ()) -> AddressPolicy:
        policy = cls(hosts={host.lower() for host in hosts})
        networks = []
        for item in filter(None, (part.strip() for part in allowlist.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                policy.hosts.add(item.lower().strip("[]"))
        policy.networks = tuple(networks)
        return policy

    def check(self, host: str, address: Address) -> None:
        """Raise ImageRefused unless `host` (as resolved to `address`) may be fetched."""
        reason = refusal(address)
        if reason is None or host.lower() in self.hosts:
            return
        if any(address in network for network in self.networks):
            return
        if self.label_studio and reason not in NEVER_FOR_LABEL_STUDIO:
            return
        if self.label_studio:
            raise ImageRefused(
                f"{host} resolves to {address}, {reason}: refused even as a Label Studio host "
                "(if Label Studio really runs there, set LABEL_STUDIO_URL to it)"
            )
        raise ImageRefused(
            f"{host} resolves to {address}, {reason}: refused (task URLs may only reach public "
            "addresses and the Label Studio host; to allow it, add it to IMAGE_URL_ALLOWLIST)"
        )

    def for_label_studio(self) -> AddressPolicy:
        """This policy for requests to a project's Label Studio origin (see `label_studio`)."""
        return AddressPolicy(set(self.hosts), self.networks, label_studio=True)


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer with the policy applied to every TCP connection it opens."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None, socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port, timeout)
        for address in addresses:
            self.policy.check(host, address)  # every address: no partial trust
        error: Exception | None = None
        for address in addresses:  # connect to the vetted address, never re-resolve the name
            try:
                return await self._inner.connect_tcp(str(address), port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise ImageRefused("unix sockets are not a task image source")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _resolve(host: str, port: int, timeout: float | None) -> list[Address]:
    try:
        return await addresses(host, port, timeout)
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from None


def literal_address(host: str) -> Address | None:
    """`host` as an IP address if it is one (`[::1]` too), else None (a name)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def addresses(host: str, port: int, timeout: float | None) -> list[Address]:
    """Every address `host` resolves to (itself if it is an IP address). OSError (a
    socket.gaierror) if it does not resolve in `timeout` seconds."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except asyncio.TimeoutError:
        raise socket.gaierror(socket.EAI_AGAIN, f"cannot resolve {host}: timed out") from None
    except OSError as exc:
        raise socket.gaierror(socket.EAI_NONAME, f"cannot resolve {host}: {exc}") from None
    unique = dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    return list(unique)


class GuardedResolver(AbstractResolver):
    """aiohttp's name resolution with the policy applied to every address a name resolves
    to: aiohttp connects only to the addresses returned here. aiohttp does not ask the
    resolver about IP-address hosts, so whoever sends the request checks those with
    `check_literal` (images.fetch does, for every redirect hop)."""

    def __init__(self, policy: AddressPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.timeout = timeout

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await addresses(host, port, self.timeout)
        for address in found:
            self.policy.check(host, address)  # every address: no partial trust
        return [ResolveResult(hostname=host, host=str(address), port=port,
                              family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for address in found]

    async def close(self) -> None:
        pass

    def check_literal(self, host: str) -> None:
        """ImageRefused if `host` is an IP address the policy refuses; nothing for names."""
        literal = literal_address(host)
        if literal is not None:
            self.policy.check(host, literal)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """httpx's default TLS settings (certifi's CAs; SSL_CERT_FILE/SSL_CERT_DIR when set, for
    a Label Studio or storage behind a private CA), made once: loading the CAs takes time."""
    return httpx.create_ssl_context(trust_env=True)


def guarded_connector(resolver: GuardedResolver, *, limit: int,
                      ssl_context: ssl.SSLContext) -> aiohttp.TCPConnector:
    """An aiohttp connector that connects only where `resolver`'s policy allows (for names;
    IP-address hosts are the sender's to check, see GuardedResolver). No proxy: aiohttp uses
    none unless a request names one."""
    return aiohttp.TCPConnector(resolver=resolver, limit=limit, limit_per_host=limit,
                                ssl=ssl_context)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, connecting only where `policy` allows. No proxy is used (a proxy
    would resolve names itself and make the guard meaningless); SSL_CERT_FILE/SSL_CERT_DIR are
    honoured, for Label Studio behind a private CA."""

    def __init__(self, policy: AddressPolicy, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx has no public hook for the network backend: rebuild its pool with ours.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(policy),
        )
