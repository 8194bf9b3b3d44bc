"""systemd's notify protocol (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import socket

from vm_agent.logs import get_logger

log = get_logger("status")


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    # An abstract socket is written with a leading '@'.
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); False when not started by systemd with Type=notify."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("sd_notify %s failed: %s", state.split("=", 1)[0], err)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, or None when the unit sets no watchdog (or it is meant for another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2


async def watchdog_loop() -> None:
    """Ping the systemd watchdog while the event loop is alive; a wedged agent gets restarted by systemd."""
    interval = watchdog_interval()
    if interval is None or _address() is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
