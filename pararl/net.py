"""Which network interface a process group binds: the one that reaches its rendezvous address.

Gloo and NCCL pick an interface by resolving the host name when ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` are unset. On a multi-homed node, or a node whose host name resolves to an
address it does not hold (a container, a network namespace), that address cannot be bound and gloo
falls back to loopback, so a rank on another node can never connect. The interface that routes to
the rendezvous address is the one every rank can reach; it is chosen here unless the user set one.
"""
from __future__ import annotations

import os
import socket

IFNAME_VARIABLES = {"gloo": "GLOO_SOCKET_IFNAME", "nccl": "NCCL_SOCKET_IFNAME"}


def local_address_towards(addr: str) -> str:
    """The local IPv4 address the kernel would send from to reach ``addr`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the interface that holds ``address`` (None if none does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def pin_interface(addr: str, backend: str) -> str | None:
    """Point ``backend`` at the interface that reaches ``addr``; a user's own setting is kept.
    Returns the interface now in effect (None when nothing was set and none was found)."""
    variable = IFNAME_VARIABLES.get(backend)
    if variable is None:
        return None
    if os.environ.get(variable):
        return os.environ[variable]
    name = interface_of(local_address_towards(addr))
    if name:
        os.environ[variable] = name
    return name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the rendezvous port of a group whose rank 0 runs here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
