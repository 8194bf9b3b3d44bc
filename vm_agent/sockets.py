"""Listening Unix sockets for Envoy's gRPC services (SDS and the ADS proxy).

The agent binds them before it starts Envoy, while the rest of it is still loading: Envoy's first
connections then wait in the listen backlog instead of failing into Envoy's retry backoff (up to 1 s).
Light on purpose (no gRPC here): it runs before anything else is imported.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

SUN_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL)."""


def listen_unix(
    path: Path, *, mode: int, what: str, replace_files: bool = False, group: str | None = None
) -> socket.socket:
    """A listening socket at ``path``: its folder created (0750), a stale socket replaced; any other file is
    refused, or replaced too with ``replace_files``. With ``group``, the folder and the socket are handed to
    that group (the one Envoy runs as)."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(
            f"{what} socket path {path} is {len(os.fsencode(path))} bytes long; Unix sockets allow at most "
            f"{SUN_PATH_MAX}"
        )
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{what} socket folder {path.parent} cannot be created: {exc.strerror or exc}") from exc
    try:
        if not replace_files and not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(
                f"{what} socket path {path} exists and is not a socket; remove it or choose another path"
            )
        path.unlink()
    except FileNotFoundError:
        pass
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise ValueError(f"{what} socket group {group!r} does not exist (the group Envoy runs as)") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        if gid != -1:
            for target in (path.parent, path):
                os.chown(target, -1, gid)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"{what}: cannot listen on unix socket {path}: {exc.strerror or exc}") from exc
    return sock


SOCKET_MODE = 0o660
"""Istio uses 0666; only Envoy (same user or group) has any business on these sockets."""


def listen_sds(path: Path, group: str | None) -> socket.socket:
    # The SDS path is ours alone (Istio's workload-spiffe-uds folder): whatever is left there goes.
    return listen_unix(path, mode=SOCKET_MODE, what="SDS", replace_files=True, group=group)


def listen_xds(path: Path) -> socket.socket:
    return listen_unix(path, mode=SOCKET_MODE, what="xDS proxy")
