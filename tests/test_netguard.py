"""The SSRF guard: a pure address classifier, checked on literal addresses without connecting,
and the guarded fetcher, checked against servers on loopback addresses only."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from backend.config import load_settings
from backend.errors import FetchError, ImageRefused
from backend.images.fetch import ImageFetcher
from backend.labelstudio.client import LabelStudioAccess
from backend.netguard import AddressPolicy, refusal

from .support.http_server import LoopbackServer, Route


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fd00::1", "private"), ("fc00::5", "private"),
    ("169.254.169.254", "a cloud metadata address"), ("169.254.170.2", "a cloud metadata address"),
    ("fd00:ec2::254", "a cloud metadata address"), ("100.100.100.200", "a cloud metadata address"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "not publicly routable"),           # carrier-grade NAT
    ("240.0.0.1", "private"), ("198.18.0.1", "private"), ("192.0.2.1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.2.3", "private"),  # IPv4-mapped IPv6
    ("169.254.170.23", "a cloud metadata address"),    # EKS Pod Identity agent
    ("fd00:ec2::23", "a cloud metadata address"), ("fd20:ce::254", "a cloud metadata address"),
    ("168.63.129.16", "a cloud metadata address"),     # Azure WireServer: a public address
    ("169.254.0.23", "a cloud metadata address"), ("169.254.42.42", "a cloud metadata address"),
    ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),  # NAT64 of 169.254.169.254
    ("::ffff:169.254.170.23", "a cloud metadata address"),
])
def test_non_public_addresses_are_refused_with_a_reason(address, reason):
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address)) is None


def test_allow_list_by_host_by_address_and_by_range():
    policy = AddressPolicy.parse("minio.internal, 10.20.0.0/16,192.168.1.7", hosts=["ls.local"])
    allowed = [("minio.internal", "10.9.9.9"), ("x", "10.20.3.4"), ("x", "192.168.1.7"),
               ("LS.local", "127.0.0.1"), ("public.example", "8.8.8.8")]
    for host, address in allowed:
        policy.check(host, ipaddress.ip_address(address))
    for host, address in [("x", "10.21.0.1"), ("x", "192.168.1.8"), ("x", "127.0.0.1")]:
        with pytest.raises(ImageRefused, match="IMAGE_URL_ALLOWLIST"):
            policy.check(host, ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.170.23", "fd00:ec2::254",
                                     "fd00:ec2::23", "169.254.10.10", "fe80::1"])
def test_a_host_named_in_setup_never_reaches_metadata(address):
    policy = AddressPolicy.parse("").for_label_studio()
    policy.check("ls", ipaddress.ip_address("10.0.0.5"))
    policy.check("ls", ipaddress.ip_address("127.0.0.1"))
    with pytest.raises(ImageRefused, match="refused even as a Label Studio host"):
        policy.check("ls", ipaddress.ip_address(address))


def fetch(ref: str, allow: str, ls: LabelStudioAccess | None = None) -> bytes:
    async def run() -> bytes:
        fetcher = ImageFetcher(load_settings(IMAGE_URL_ALLOWLIST=allow))
        try:
            return (await fetcher.fetch(ref, ls=ls)).data
        finally:
            await fetcher.aclose()
    return asyncio.run(run())


@pytest.fixture
def allowed_server():
    with LoopbackServer("127.0.0.3") as server:
        server.add("/a.png", Route(b"image bytes"))
        yield server


def test_only_the_allowed_loopback_address_is_reached(allowed_server):
    port = allowed_server.port
    assert fetch(f"http://127.0.0.3:{port}/a.png", "127.0.0.3") == b"image bytes"
    for url in (f"http://127.0.0.2:{port}/a.png", f"http://[::1]:{port}/a.png",
                f"http://localhost:{port}/a.png", f"http://127.0.0.1:{port}/a.png"):
        with pytest.raises(ImageRefused, match="loopback: refused"):
            fetch(url, "127.0.0.3")
    with pytest.raises(ImageRefused):  # nothing allowed: not even the server that exists
        fetch(f"http://127.0.0.3:{port}/a.png", "")
    assert allowed_server.requests and len(allowed_server.requests) == 1


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1", "017700000001",
                                  "[::ffff:127.0.0.1]", "127.0.0.1.", "[::1]"])
def test_other_spellings_of_loopback_never_reach_it(host):
    """Numeric forms a resolver maps onto 127.0.0.1, IPv4-mapped IPv6, a trailing dot: each
    is refused before a connection is made (aiohttp never asks the resolver about IP hosts,
    so the fetcher checks those itself)."""
    with LoopbackServer("127.0.0.1") as server:
        server.add("/a.png", Route(b"secret"))
        with pytest.raises((ImageRefused, FetchError)):  # refused, or (here) no lookup allowed
            fetch(f"http://{host}:{server.port}/a.png", "127.0.0.3")
        assert not server.requests


def test_every_redirect_hop_is_checked(allowed_server):
    target = f"http://127.0.0.2:{allowed_server.port}/a.png"
    allowed_server.add("/hop", Route(status=302, headers={"Location": target}))
    with pytest.raises(ImageRefused, match="127.0.0.2 resolves to 127.0.0.2, loopback"):
        fetch(allowed_server.url("/hop"), "127.0.0.3")


def test_label_studio_host_is_allowed_without_listing_it():
    with LoopbackServer("127.0.0.4") as label_studio:
        label_studio.add("/data/upload/1/a.png", Route(b"uploaded"))
        ls = LabelStudioAccess(label_studio.base, "0123456789abcdef")

        async def run() -> bytes:
            fetcher = ImageFetcher(load_settings(IMAGE_URL_ALLOWLIST="", LABEL_STUDIO_URL=label_studio.base))
            try:
                return (await fetcher.fetch("/data/upload/1/a.png", ls=ls)).data
            finally:
                await fetcher.aclose()

        assert asyncio.run(run()) == b"uploaded"


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "gopher://127.0.0.3/", "ftp://127.0.0.3/x",
                                 "dict://127.0.0.3:11211/", "javascript:alert(1)"])
def test_other_schemes_are_refused(ref):
    with pytest.raises(ImageRefused, match="unsupported image reference"):
        fetch(ref, "127.0.0.0/8")


def test_names_that_do_not_resolve_are_fetch_errors():
    with pytest.raises(FetchError, match="could not connect"):
        fetch("http://no-such-host.invalid/a.png", "")


def test_the_test_suite_itself_cannot_reach_beyond_loopback():
    """conftest installs a guard: a test that would touch the network fails instead."""
    import socket

    with socket.socket() as raw, pytest.raises(ConnectionRefusedError, match="test network guard"):
        raw.connect(("10.255.255.1", 80))
    with pytest.raises(socket.gaierror, match="test network guard"):
        socket.getaddrinfo("example.com", 443)
