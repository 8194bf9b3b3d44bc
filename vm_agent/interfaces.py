"""This host's interface addresses, read with libc's getifaddrs(3): the instance IPs the loader finds
(``VM_AGENT_SCAN_INTERFACES``) and the local addresses probes may leave from.

The loader runs before Envoy starts, so this uses libc directly instead of psutil (which costs the agent
~1.4 MiB and a few ms of imports for the same call).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket

_IFF_UP = 0x1


class _SockAddr(ctypes.Structure):
    _fields_ = (("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14))


class _SockAddrIn(ctypes.Structure):
    _fields_ = (("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_ubyte * 4))


class _SockAddrIn6(ctypes.Structure):
    _fields_ = (
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("flowinfo", ctypes.c_uint32),
        ("addr", ctypes.c_ubyte * 16),
        ("scope_id", ctypes.c_uint32),
    )


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = (
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("broadcast_or_destination", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
)


def interface_addresses(*, up_only: bool = True) -> list[tuple[str, str]]:
    """(interface, address) of every IPv4/IPv6 address (on interfaces that are up, unless ``up_only`` is
    false), grouped by interface in the order the kernel lists them; ``OSError`` when they cannot be listed."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getifaddrs: {os.strerror(err)}")
    by_name: dict[str, list[str]] = {}
    try:
        entry = head
        while entry:
            item = entry.contents
            entry = item.next
            name = (item.name or b"").decode(errors="replace")
            if (up_only and not item.flags & _IFF_UP) or not item.addr:
                continue
            family = item.addr.contents.family
            if family == socket.AF_INET:
                raw = bytes(ctypes.cast(item.addr, ctypes.POINTER(_SockAddrIn)).contents.addr)
            elif family == socket.AF_INET6:
                raw = bytes(ctypes.cast(item.addr, ctypes.POINTER(_SockAddrIn6)).contents.addr)
            else:
                continue
            by_name.setdefault(name, []).append(str(ipaddress.ip_address(raw)))
    finally:
        libc.freeifaddrs(head)
    return [(name, address) for name, addresses in by_name.items() for address in addresses]


def scan_interface_ips() -> list[str]:
    """Addresses the VM can be reached at: every up interface's address but loopback, link-local, unspecified."""
    found: list[str] = []
    for _, text in interface_addresses():
        ip = ipaddress.ip_address(text)
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        found.append(str(ip))
    return found
