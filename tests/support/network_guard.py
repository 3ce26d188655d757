"""No test may connect to anything but loopback, not even by mistake.

An audit hook (it cannot be removed, which is the point) refuses, in this process, every
socket connection and every name lookup that is not for a loopback address. A test that
would reach the network fails loudly instead.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: Any) -> bool:
    if host is None or host in ("", b""):
        return True  # binding or resolving "any": no outbound traffic
    text = host.decode() if isinstance(host, bytes) else str(host)
    if text.lower() in LOOPBACK_NAMES or text.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not is_loopback(address[0]):
            raise ConnectionRefusedError(f"test network guard: connection to {address} refused")
    elif event == "socket.getaddrinfo" and not is_loopback(args[0]):
        raise socket.gaierror(socket.EAI_NONAME, f"test network guard: no lookup of {args[0]!r}")


def install_loopback_only_guard() -> None:
    if not getattr(sys, "_loopback_only_guard", False):
        sys.addaudithook(_guard)
        sys._loopback_only_guard = True  # type: ignore[attr-defined]
